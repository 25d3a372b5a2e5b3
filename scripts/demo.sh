#!/usr/bin/env bash
# The main demo: builds the examples in Release and runs the quick start.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/deps.sh
peft_require_packages cmake g++ libeigen3-dev
cmake --preset demo >/dev/null
cmake --build --preset demo --target quickstart
./build/demo/examples/quickstart "$@"
