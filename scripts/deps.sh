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
# Fashion-MNIST for the demo's quick run (without them that test falls back to the synthetic task), and
# Doxygen (the API reference, which the Release phase builds with warnings as errors).
PEFT_BUILD_PACKAGES=(cmake g++ libeigen3-dev catch2 libbenchmark-dev nlohmann-json3-dev libopenblas-dev
                     libopenmpi-dev openmpi-bin zlib1g-dev dataset-fashion-mnist doxygen)
# The sanitizer phase builds with clang, with its OpenMP runtime and libFuzzer (in clang's runtime
# package, libclang-rt-14-dev on Debian 12, which clang pulls in), and links with lld.
PEFT_SANITIZER_PACKAGES=(clang libomp-dev lld)

# llama.cpp itself, for the test that runs the exported GGUF adapters in it (tests/io/gguf_end_to_end_test.cpp):
# the prebuilt CPU build of the npm package node-llama-cpp (pinned), in build/node-llama-cpp. Needs
# Node.js 20 or newer and npm; without them, or without the npm registry, that test case says it did not
# run and the rest of the suite is unaffected.
PEFT_NODE_LLAMA_CPP_VERSION=3.22.1
peft_install_llama_cpp() {
  local dir=build/node-llama-cpp arch
  case "$(uname -m)" in
    x86_64) arch=x64 ;;
    aarch64) arch=arm64 ;;
    *) echo "peft: no prebuilt llama.cpp for $(uname -m): the llama.cpp test will not run"; return 0 ;;
  esac
  if ! command -v node >/dev/null || ! command -v npm >/dev/null ||
     ! node -e 'process.exit(+process.versions.node.split(".")[0] >= 20 ? 0 : 1)'; then
    echo "peft: Node.js 20+ and npm not found: the llama.cpp test will not run"
    return 0
  fi
  if [[ -f $dir/node_modules/node-llama-cpp/package.json ]] &&
     grep -q "\"version\": \"$PEFT_NODE_LLAMA_CPP_VERSION\"" "$dir/node_modules/node-llama-cpp/package.json"; then
    return 0
  fi
  echo "peft: installing node-llama-cpp $PEFT_NODE_LLAMA_CPP_VERSION (llama.cpp's CPU build) into $dir"
  mkdir -p "$dir"
  if ! npm install --prefix "$dir" --no-save --no-audit --no-fund --omit=optional --ignore-scripts --loglevel=error \
       "node-llama-cpp@$PEFT_NODE_LLAMA_CPP_VERSION" "@node-llama-cpp/linux-$arch@$PEFT_NODE_LLAMA_CPP_VERSION" >/dev/null; then
    echo "peft: npm could not install node-llama-cpp: the llama.cpp test will not run"
  fi
  return 0
}
