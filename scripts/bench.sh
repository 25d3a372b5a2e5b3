#!/usr/bin/env bash
# Full benchmark runs (minutes, not seconds). Extra arguments go to every benchmark binary, e.g.
#   bash scripts/bench.sh --benchmark_filter=TrainStep
# The comparison with PyTorch (Debian's python3-torch; Hugging Face PEFT's algorithms, written out in
# benchmarks/compare_pytorch.py) on the same shapes and threads, one after the other:
#   bash scripts/bench.sh --pytorch [THREADS]      (THREADS: default every core)
# The data-parallel steps and their allreduce (benchmarks/mpi_bench.cpp) under mpirun, on RANKS ranks of
# this machine (default 2; one thread each):
#   bash scripts/bench.sh --mpi [RANKS]
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

if [[ ${1:-} == --mpi ]]; then
  cmake --build --preset bench --target mpi_bench
  ranks=${2:-2}
  flags=()
  if mpirun --version 2>/dev/null | grep -q "Open MPI"; then
    flags+=(--oversubscribe)
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1  # read by Open MPI only when run as root
  fi
  mpirun -np "$ranks" "${flags[@]}" build/bench/benchmarks/mpi_bench --benchmark_counters_tabular=true
  exit 0
fi

cmake --build --preset bench
for bench in build/bench/benchmarks/*_bench; do
  [[ $bench == */mpi_bench ]] && continue  # under mpirun: --mpi
  "$bench" --benchmark_counters_tabular=true "$@"
done
