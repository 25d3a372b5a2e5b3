#!/usr/bin/env bash
# The compile-time benchmark: how long a user's program takes to compile with g++ -O2 (what
# docs/building.md's "Build times" reports). Compiles benchmarks/compile_time/user_program.cpp (two
# layers, LoRA and DoRA, AdamW, merge and unmerge; in float, row-major float and double)
#   1. header-only,
#   2. with the compiled part (-DPEFT_COMPILED, linked against libpeft_compiled.a, built first and timed
#      on its own),
# and plain_program.cpp, the same program's own Eigen code without the library (the floor no library
# can go under), printing wall time and peak memory of each. Run it on an idle machine. Extra
# arguments go to every compiler command (e.g. -O0).
#
# The programs are compiled as a CMake user's would be: where the library is configured with the BLAS
# backend (OpenBLAS found, the default), with EIGEN_USE_BLAS and PEFT_BLAS and linked against OpenBLAS,
# since the compiled part then calls it.
#
#   scripts/compile_bench.sh --smoke LIBDIR: what CI runs (a CTest test of the Release build) so that the
#   script cannot rot: the program with the compiled part already built in LIBDIR (a configured build
#   directory of this project) and the plain one, at -O0, linked and run; nothing timed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

smoke=""
if [[ ${1:-} == --smoke ]]; then
  smoke=$2
  shift 2
fi

out=build/compile_bench${smoke:+_smoke}
mkdir -p "$out"
if [[ -n $smoke ]]; then
  lib=$smoke
else
  source scripts/deps.sh
  peft_require_packages cmake g++ libeigen3-dev time
  lib=$out/lib
  cmake -S . -B "$lib" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_FLAGS_RELEASE="-O2 -DNDEBUG" \
    -DPEFT_BUILD_TESTS=OFF -DPEFT_BUILD_BENCHMARKS=OFF -DPEFT_BUILD_EXAMPLES=OFF -DPEFT_BUILD_TOOLS=OFF \
    -DPEFT_INSTALL=OFF >/dev/null
fi

# The flags a CMake consumer of peft::peft gets from this configuration (its cache says whether the BLAS
# backend was found).
cxx=(g++ -std=c++17 -O2 -I include -isystem /usr/include/eigen3)
libs=()
if grep -q '^PEFT_OPENMP:BOOL=ON' "$lib/CMakeCache.txt" && grep -q '^OpenMP_CXX_FLAGS:' "$lib/CMakeCache.txt"; then
  cxx+=(-fopenmp)
fi
if grep -q '^PEFT_BLAS:BOOL=ON' "$lib/CMakeCache.txt" && grep -qE '^BLAS_openblas_LIBRARY:FILEPATH=/' "$lib/CMakeCache.txt"; then
  cxx+=(-DEIGEN_USE_BLAS -DPEFT_BLAS)
  libs+=(-lopenblas)
fi
[[ -n $smoke ]] && cxx+=(-O0)
cxx+=("$@")

if [[ -n $smoke ]]; then
  set -x
  "${cxx[@]}" -DPEFT_COMPILED benchmarks/compile_time/user_program.cpp "$lib/libpeft_compiled.a" "${libs[@]}" \
    -o "$out/compiled"
  "${cxx[@]}" benchmarks/compile_time/plain_program.cpp "${libs[@]}" -o "$out/plain"
  "$out/compiled" >/dev/null
  "$out/plain" >/dev/null
  exit 0
fi

measure() {  # measure <label> <command...>: prints "<label>  <seconds> s  <MB> MB"
  local label=$1
  shift
  /usr/bin/time -f "%e %M" -o "$out/time.txt" "$@"
  read -r seconds kb < "$out/time.txt"
  printf '%-46s %7.1f s %7.0f MB\n' "$label" "$seconds" "$((kb / 1024))"
}

echo "g++ $(g++ -dumpfullversion), $(nproc) cores, $(lscpu | sed -n 's/^Model name: *//p');" \
  "wall time and peak memory of one compiler process"
measure "the compiled part (once; 10 parts, 2 jobs)" \
  bash -c "cmake --build '$lib' --target peft_compiled -j 2 >/dev/null"
measure "user_program.cpp, header-only" "${cxx[@]}" benchmarks/compile_time/user_program.cpp "${libs[@]}" \
  -o "$out/header_only"
measure "user_program.cpp, with the compiled part" "${cxx[@]}" -DPEFT_COMPILED benchmarks/compile_time/user_program.cpp \
  "$lib/libpeft_compiled.a" "${libs[@]}" -o "$out/compiled"
measure "plain_program.cpp (its own Eigen code alone)" "${cxx[@]}" benchmarks/compile_time/plain_program.cpp \
  "${libs[@]}" -o "$out/plain"
"$out/header_only" >/dev/null
"$out/compiled" >/dev/null
