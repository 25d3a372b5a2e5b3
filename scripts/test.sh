#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls this and nothing else):
#   1. Release build with -Werror: every test, the packaging and compile-fail tests, the examples,
#      and every benchmark run briefly;
#      llama.cpp itself (npm's node-llama-cpp, installed here when Node.js 20 and npm are present) runs
#      the exported GGUF adapters;
#   2. the tests again under AddressSanitizer + UndefinedBehaviorSanitizer (clang at -O0; where a test
#      runs in four matrix types, it runs in two here: tests/support/matrices.hpp).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/deps.sh
peft_require_packages "${PEFT_BUILD_PACKAGES[@]}" "${PEFT_SANITIZER_PACKAGES[@]}"
peft_install_llama_cpp

echo "== peft: release build, warnings as errors, tests and benchmark smoke runs"
cmake --workflow --preset ci
echo "== peft: AddressSanitizer + UndefinedBehaviorSanitizer"
cmake --workflow --preset asan
echo "== peft: all tests passed"
