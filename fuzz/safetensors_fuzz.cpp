// libFuzzer target for the safetensors reader (include/peft/io/safetensors.hpp).
//
// Each input is taken as a whole safetensors file:
//   1. SafetensorsView parses and validates it (peft::io::parse_header). On success, for every tensor:
//      its byte range is touched at the first and last byte (ASan reports any range outside the
//      input), matrix_shape() is taken, and a floating tensor (F32, F64, F16, BF16) of at most two
//      dimensions and at most 1e6 elements is read with read<float>() and read<double>() and viewed
//      with view<float>() and view<double>() (every element of the views is summed); at() and find()
//      are checked against tensors(), and the metadata is iterated.
//   2. parse_header() is called again with only the first half of the input (and the first 8 + N
//      bytes) available, as for a file whose header is read before the rest: the "header not in the
//      bytes given" path and the header-only parse.
// The contract under test: every failure is a peft::Error (the reader throws FormatError). Only
// peft::Error is caught here; any other exception escapes, so libFuzzer reports it as a crash, as it
// does for sanitizer reports, timeouts (-timeout) and huge allocations (-rss_limit_mb, -malloc_limit_mb).
//
// Build: configure with clang++ and -DPEFT_BUILD_FUZZERS=ON (the asan preset does), then
//   cmake --build <build> --target safetensors_fuzz
// Run: `ctest -R fuzz` runs a bounded number of executions on the seed corpus (fuzz/CMakeLists.txt);
// scripts/fuzz.sh builds at -O1 and runs 10^7 executions (an argument changes the count). By hand:
//   mkdir -p /tmp/corpus && <build>/fuzz/safetensors_fuzz -max_len=4096 /tmp/corpus fuzz/corpus/safetensors
// (new inputs go into the first directory only; keep the seed corpus out of it).

#include "peft/io/safetensors.hpp"

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

namespace {

// Keeps a value alive, so that reads of the tensors' bytes are not optimized away.
volatile double sink;

constexpr std::uint64_t max_elements = 1'000'000;

template <class S>
void exercise_view(const peft::io::SafetensorsView& v, const peft::io::TensorInfo& t) {
  try {
    const auto m = v.view<S>(t.name);
    if (std::uint64_t(m.rows()) * std::uint64_t(m.cols()) != t.elements()) std::abort();
    double s = 0;
    if (m.size() > 0)  // not row by row: a [rows, 0] view may have 2^62 rows
      for (peft::Index i = 0; i < m.rows(); ++i)
        for (peft::Index j = 0; j < m.cols(); ++j) s += double(m(i, j));
    sink = s;
  } catch (const peft::Error&) {
    // wrong dtype or not aligned for S: expected
  }
}

template <class S>
void exercise_read(const peft::io::SafetensorsView& v, const peft::io::TensorInfo& t, peft::Index rows,
                   peft::Index cols) {
  const auto m = v.read<S>(t.name);  // must succeed: the dtype converts and the shape is a matrix
  if (m.rows() != rows || m.cols() != cols) std::abort();
  if (m.size() > 0) sink = double(m(0, 0)) + double(m(m.rows() - 1, m.cols() - 1));
}

void exercise(const peft::io::SafetensorsView& v) {
  for (const peft::io::TensorInfo& t : v.tensors()) {
    if (v.find(t.name) != &t || &v.at(t.name) != &t) std::abort();
    if (t.end < t.begin) std::abort();
    const std::uint64_t n = t.end - t.begin;
    if (n != t.elements() * peft::io::dtype_size(t.dtype)) std::abort();
    const unsigned char* p = v.bytes(t);
    if (n > 0) sink = double(p[0]) + double(p[n - 1]);

    peft::Index rows = 0, cols = 0;
    try {
      const auto rc = v.matrix_shape(t);
      rows = rc.first;
      cols = rc.second;
    } catch (const peft::Error&) {
      // more than two dimensions, or a dimension beyond Index: read() and view() must refuse it too
      try {
        (void)v.read<float>(t.name);
        std::abort();
      } catch (const peft::Error&) {
      }
      continue;
    }
    if (!peft::io::is_float_dtype(t.dtype)) {
      try {
        (void)v.read<double>(t.name);
        std::abort();  // an integer dtype must not convert
      } catch (const peft::Error&) {
      }
      continue;
    }
    if (t.elements() > max_elements) continue;  // keeps each run fast
    exercise_read<float>(v, t, rows, cols);
    exercise_read<double>(v, t, rows, cols);
    exercise_view<float>(v, t);
    exercise_view<double>(v, t);
  }
  std::size_t chars = 0;
  for (const auto& [key, value] : v.metadata()) chars += key.size() + value.size();
  sink = double(chars);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const auto* bytes = reinterpret_cast<const unsigned char*>(data);
  const std::string label = "fuzz.safetensors";

  // 1. The whole file.
  try {
    const peft::io::SafetensorsView v(bytes, size, label);
    exercise(v);
  } catch (const peft::Error&) {
  }

  // 2. The header alone: the first half of the file available, then exactly its first 8 + N bytes.
  try {
    const peft::io::Header h = peft::io::parse_header(bytes, size / 2, size, label);
    if (h.buffer_offset > size / 2 || h.buffer_offset + h.buffer_size != size) std::abort();
  } catch (const peft::Error&) {
  }
  if (size >= 8) {
    std::uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | bytes[i];
    if (n <= size - 8) {
      try {
        (void)peft::io::parse_header(bytes, std::size_t(8 + n), size, label);
      } catch (const peft::Error&) {
      }
    }
  }
  return 0;
}
