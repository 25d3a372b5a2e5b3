#!/usr/bin/env bash
# The main demo: builds the examples in Release and runs examples/fashion_mnist.cpp (pretraining on
# Fashion-MNIST classes 0-4, then linear probe, full fine-tuning, LoRA, DoRA, SSF and PiSSA on classes
# 5-9, and merging each adapter for deployment). Arguments go to the program (--help lists them).
# With --save DIR it also writes the pretrained base and each adapter there, and builds examples/deploy.cpp,
# which loads them in another process: ./build/demo/examples/deploy --model DIR/base.safetensors
# --adapter DIR/lora --expect DIR/merged_accuracy.txt
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/deps.sh
peft_require_packages cmake g++ libeigen3-dev libopenblas-dev zlib1g-dev nlohmann-json3-dev dataset-fashion-mnist
cmake --preset demo >/dev/null
targets=(fashion_mnist)
for arg in "$@"; do if [[ $arg == --save ]]; then targets+=(deploy); fi; done
cmake --build --preset demo --target "${targets[@]}"
./build/demo/examples/fashion_mnist "$@"
