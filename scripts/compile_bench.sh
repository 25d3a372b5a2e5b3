#!/usr/bin/env bash
# The compile-time benchmark: how long a user's program takes to compile with g++ -O2 (what the
# README's "Build times" section reports). Compiles benchmarks/compile_time/user_program.cpp (two
# layers, LoRA and DoRA, AdamW, merge and unmerge; in float, row-major float and double)
#   1. header-only,
#   2. with the compiled part (-DPEFT_COMPILED, linked against libpeft_compiled.a, built first and timed
#      on its own),
# and plain_program.cpp, the same program's own Eigen code without the library (the floor no library
# can go under), printing wall time and peak memory of each. Run it on an idle machine. Extra
# arguments go to every compiler command (e.g. -O0).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/deps.sh
peft_require_packages cmake g++ libeigen3-dev time

out=build/compile_bench
cxx=(g++ -std=c++17 -O2 -fopenmp -I include -isystem /usr/include/eigen3 "$@")
mkdir -p "$out"
measure() {  # measure <label> <command...>: prints "<label>  <seconds> s  <MB> MB"
  local label=$1
  shift
  /usr/bin/time -f "%e %M" -o "$out/time.txt" "$@"
  read -r seconds kb < "$out/time.txt"
  printf '%-46s %7.1f s %7.0f MB\n' "$label" "$seconds" "$((kb / 1024))"
}

cmake -S . -B "$out/lib" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_FLAGS_RELEASE="-O2 -DNDEBUG" \
  -DPEFT_BUILD_TESTS=OFF -DPEFT_BUILD_BENCHMARKS=OFF -DPEFT_BUILD_EXAMPLES=OFF -DPEFT_INSTALL=OFF >/dev/null
echo "g++ $(g++ -dumpfullversion), $(nproc) cores; wall time and peak memory of one compiler process"
measure "the compiled part (once; 10 parts, 2 jobs)" \
  bash -c "cmake --build '$out/lib' --target peft_compiled -j 2 >/dev/null"
measure "user_program.cpp, header-only" "${cxx[@]}" benchmarks/compile_time/user_program.cpp -o "$out/header_only"
measure "user_program.cpp, with the compiled part" "${cxx[@]}" -DPEFT_COMPILED benchmarks/compile_time/user_program.cpp \
  "$out/lib/libpeft_compiled.a" -o "$out/compiled"
measure "plain_program.cpp (its own Eigen code alone)" "${cxx[@]}" benchmarks/compile_time/plain_program.cpp \
  -o "$out/plain"
"$out/header_only" >/dev/null
"$out/compiled" >/dev/null
