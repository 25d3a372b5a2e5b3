#!/usr/bin/env bash
# Full benchmark runs (minutes, not seconds). Extra arguments go to every benchmark binary, e.g.
#   bash scripts/bench.sh --benchmark_filter=TrainStep
# The comparison with PyTorch (Debian's python3-torch; Hugging Face PEFT's algorithms, written out in
# benchmarks/compare_pytorch.py) on the same shapes and threads, one after the other:
#   bash scripts/bench.sh --pytorch [THREADS]      (THREADS: default every core)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/deps.sh
peft_require_packages "${PEFT_BUILD_PACKAGES[@]}"
cmake --preset bench >/dev/null

if [[ ${1:-} == --pytorch ]]; then
  cmake --build --preset bench --target step_bench
  threads=${2:-$(nproc)}
  python=/usr/bin/python3
  [[ -x $python ]] || python=python3
  if ! "$python" -c "import torch" 2>/dev/null; then
    echo "bench.sh --pytorch: PyTorch is not installed; on Debian: sudo apt-get install -y python3-torch" >&2
    exit 1
  fi
  out=build/bench/step_bench.json
  OMP_NUM_THREADS=$threads build/bench/benchmarks/step_bench --benchmark_repetitions=9 \
    --benchmark_report_aggregates_only=true --benchmark_min_time=0.1 --benchmark_format=json >"$out"
  OMP_NUM_THREADS=$threads "$python" benchmarks/compare_pytorch.py --threads "$threads" --ours "$out"
  exit 0
fi

cmake --build --preset bench
for bench in build/bench/benchmarks/*_bench; do
  "$bench" --benchmark_counters_tabular=true "$@"
done
