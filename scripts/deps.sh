# Sourced by the other scripts: peft_require_packages <debian-package>... installs the missing ones
# (as root: `apt-get update` once, then `apt-get install -y`), or says exactly what to install.
peft_require_packages() {
  local missing=() pkg
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  ((${#missing[@]} == 0)) && return 0
  if [[ $(id -u) -eq 0 ]]; then
    echo "peft: installing ${missing[*]}"
    if [[ -z ${PEFT_APT_UPDATED:-} ]]; then
      apt-get update -qq
      export PEFT_APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "peft: missing Debian packages. Install them with:" >&2
    echo "  sudo apt-get install -y ${missing[*]}" >&2
    return 1
  fi
}

# What the test command needs: the build, Catch2, Google Benchmark, nlohmann-json (peft::io), OpenBLAS
# (the BLAS backend, PEFT_BLAS), Open MPI (peft::mpi, whose tests run under mpirun), and zlib plus
# Fashion-MNIST for the demo's quick run (without them that test falls back to the synthetic task).
PEFT_BUILD_PACKAGES=(cmake g++ libeigen3-dev catch2 libbenchmark-dev nlohmann-json3-dev libopenblas-dev
                     libopenmpi-dev openmpi-bin zlib1g-dev dataset-fashion-mnist)
# The sanitizer phase builds with clang, with its OpenMP runtime and libFuzzer (in clang's runtime
# package, libclang-rt-14-dev on Debian 12, which clang pulls in), and links with lld.
PEFT_SANITIZER_PACKAGES=(clang libomp-dev lld)
