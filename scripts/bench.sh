#!/usr/bin/env bash
# Full benchmark runs (minutes, not seconds). Extra arguments go to every benchmark binary, e.g.
#   bash scripts/bench.sh --benchmark_filter=TrainStep
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/deps.sh
peft_require_packages "${PEFT_BUILD_PACKAGES[@]}"
cmake --preset bench >/dev/null
cmake --build --preset bench
for bench in build/bench/benchmarks/*_bench; do
  "$bench" --benchmark_counters_tabular=true "$@"
done
