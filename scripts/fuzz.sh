#!/usr/bin/env bash
# The long fuzzing run of the safetensors reader (fuzz/safetensors_fuzz.cpp; docs/files.md reports it):
# builds the libFuzzer target with clang -O1 -g, AddressSanitizer and UndefinedBehaviorSanitizer in
# build/fuzz, then runs 10^7 executions (the first argument changes the count; further arguments go to
# libFuzzer, e.g. -jobs=2 -workers=2) from the seed corpus, fuzz/corpus/safetensors/, which it only
# reads: new inputs go to build/fuzz/run/corpus and any crash, timeout or leak reproducer to
# build/fuzz/run/artifacts/. Ends with libFuzzer's final statistics; fails if the fuzzer finds anything.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/deps.sh
peft_require_packages cmake clang libomp-dev libeigen3-dev nlohmann-json3-dev

runs=${1:-10000000}
(($# > 0)) && shift
build=build/fuzz
cmake -S . -B "$build" -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -g" -DPEFT_SANITIZE=ON -DPEFT_BUILD_FUZZERS=ON \
  -DPEFT_BUILD_TESTS=OFF -DPEFT_BUILD_BENCHMARKS=OFF -DPEFT_BUILD_EXAMPLES=OFF -DPEFT_BUILD_COMPILED=OFF \
  -DPEFT_INSTALL=OFF >/dev/null
cmake --build "$build" --target safetensors_fuzz
if [[ ! -x $build/fuzz/safetensors_fuzz ]]; then
  echo "peft: safetensors_fuzz was not built (clang without libFuzzer? see the configure output)" >&2
  exit 1
fi

root=$PWD
run=$root/$build/run  # the working directory too (-jobs writes its fuzz-<n>.log files there)
rm -rf "$run"
mkdir -p "$run/corpus" "$run/artifacts"
echo "== peft: safetensors_fuzz, $runs executions, clang $(clang++ -dumpversion) -O1, $(nproc) cores"
start=$SECONDS
status=0
(cd "$run" && "../fuzz/safetensors_fuzz" -runs="$runs" -max_len=4096 -timeout=10 -rss_limit_mb=2048 \
  -malloc_limit_mb=1024 -print_final_stats=1 -artifact_prefix="$run/artifacts/" "$@" "$run/corpus" \
  "$root/fuzz/corpus/safetensors" >"$run/log.txt" 2>&1) || status=$?
elapsed=$((SECONDS - start))
# The last status line (#<runs> DONE cov: ... ft: ... corp: ... exec/s: ...) and the final statistics.
grep -E '^#[0-9]+' "$run/log.txt" | tail -n 1 || true
grep -E '^stat::' "$run/log.txt" || true
echo "wall time ${elapsed} s; corpus $(find "$run/corpus" -type f | wc -l) files; full log $run/log.txt"
if ((status != 0)); then
  echo "peft: safetensors_fuzz failed (exit $status); the report:" >&2
  grep -E -A 40 '^==[0-9]+==|ERROR: libFuzzer|SUMMARY' "$run/log.txt" | head -n 80 >&2 || true
  echo "reproducer(s): $(ls "$run/artifacts")" >&2
  exit "$status"
fi
