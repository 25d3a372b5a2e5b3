#!/usr/bin/env bash
# The main demo: builds the examples in Release and runs examples/fashion_mnist.cpp (pretraining on
# Fashion-MNIST classes 0-4, then linear probe, full fine-tuning, LoRA, DoRA, SSF and PiSSA on classes
# 5-9, and merging each adapter for deployment). Arguments go to the program (--help lists them).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/deps.sh
peft_require_packages cmake g++ libeigen3-dev zlib1g-dev dataset-fashion-mnist
cmake --preset demo >/dev/null
cmake --build --preset demo --target fashion_mnist
./build/demo/examples/fashion_mnist "$@"
