#pragma once
// The tests' own safetensors reader, independent of the library's (io/safetensors.hpp), which it
// checks: it parses a file's bytes itself (the 8-byte little-endian header length, the JSON header by
// nlohmann::json directly, the buffer), checks what every valid file satisfies (each tensor's byte count
// is its dtype's size times its element count, and the tensors tile the buffer from its start to the end
// of the file), and decodes F64, F32, F16 and BF16 elements from their little-endian bytes. A writer of
// hand-edited files (write_raw_safetensors) goes with it, for the tests that corrupt one on purpose.
#include "support/bytes.hpp"
#include "support/catch.hpp"
#include "support/files.hpp"

#include <Eigen/Core>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace peft::test {

/// One tensor of a safetensors file as the file holds it.
struct RawTensor {
  std::string dtype;
  std::vector<std::uint64_t> shape;
  std::string bytes;  // its data_offsets' range of the buffer
};

/// A safetensors file as parsed here.
struct RawSafetensors {
  std::uint64_t header_length = 0;      // N, the first 8 bytes
  std::string header_text;              // the N bytes of the header, padding included
  nlohmann::json header;                // the header, parsed (tensors and __metadata__)
  std::uint64_t buffer_size = 0;        // the bytes after the header
  std::map<std::string, RawTensor> tensors;
  nlohmann::json metadata;              // null when the file has none
};

/// \returns the size in bytes of an element of the safetensors dtype `dtype`; fails the test for a name
/// the format does not define.
inline std::uint64_t raw_dtype_size(const std::string& dtype) {
  static const std::vector<std::pair<std::string, std::uint64_t>> sizes = {
      {"BOOL", 1}, {"U8", 1},  {"I8", 1},  {"F8_E5M2", 1}, {"F8_E4M3", 1}, {"F8_E8M0", 1},
      {"I16", 2},  {"U16", 2}, {"F16", 2}, {"BF16", 2},    {"I32", 4},     {"U32", 4},
      {"F32", 4},  {"I64", 8}, {"U64", 8}, {"F64", 8},     {"C64", 8}};
  const auto it = std::find_if(sizes.begin(), sizes.end(), [&](const auto& s) { return s.first == dtype; });
  INFO("dtype " << dtype);
  REQUIRE(it != sizes.end());
  return it->second;
}

/// Parses the bytes of a whole safetensors file.
inline RawSafetensors parse_safetensors(const std::string& all) {
  RawSafetensors out;
  REQUIRE(all.size() >= 8);
  out.header_length = get_le(all.data(), 8);
  REQUIRE(out.header_length <= all.size() - 8);
  const std::size_t n = std::size_t(out.header_length);
  out.header_text = all.substr(8, n);
  out.header = nlohmann::json::parse(out.header_text);
  REQUIRE(out.header.is_object());
  out.buffer_size = all.size() - 8 - n;
  std::vector<std::pair<std::uint64_t, std::uint64_t>> ranges;
  for (const auto& [name, v] : out.header.items()) {
    if (name == "__metadata__") {
      out.metadata = v;
      continue;
    }
    INFO("tensor " << name);
    REQUIRE(v.at("data_offsets").size() == 2);
    const std::uint64_t b = v.at("data_offsets").at(0), e = v.at("data_offsets").at(1);
    REQUIRE(b <= e);
    REQUIRE(e <= out.buffer_size);
    RawTensor t{v.at("dtype").get<std::string>(), v.at("shape").get<std::vector<std::uint64_t>>(),
                all.substr(8 + n + std::size_t(b), std::size_t(e - b))};
    std::uint64_t elements = 1;
    for (std::uint64_t d : t.shape) elements *= d;
    REQUIRE((elements * raw_dtype_size(t.dtype) == e - b));
    out.tensors[name] = std::move(t);
    ranges.emplace_back(b, e);
  }
  // The tensors tile the buffer: no gap, no overlap, nothing after the last one.
  std::sort(ranges.begin(), ranges.end());
  std::uint64_t at = 0;
  for (const auto& [b, e] : ranges) {
    REQUIRE(b == at);
    at = e;
  }
  REQUIRE(at == out.buffer_size);
  return out;
}

inline RawSafetensors parse_safetensors(const Bytes& all) { return parse_safetensors(std::string(all.begin(), all.end())); }

/// Reads and parses the safetensors file at `path`.
inline RawSafetensors read_safetensors(const std::string& path) { return parse_safetensors(read_file(path)); }

/// Element k (in row-major order) of an F64, F32, F16 or BF16 tensor, decoded from its little-endian bytes.
/// (Called once per element: it fails the test on a wrong dtype or index without counting assertions.)
inline double element(const RawTensor& t, std::uint64_t k) {
  const std::uint64_t size = t.dtype == "F64" ? 8 : t.dtype == "F32" ? 4 : t.dtype == "F16" || t.dtype == "BF16" ? 2 : 0;
  if (size == 0) FAIL("element of a tensor of dtype " << t.dtype << ", not a floating one");
  if ((k + 1) * size > t.bytes.size()) FAIL("element " << k << " of a tensor of " << t.bytes.size() << " bytes");
  const char* p = t.bytes.data() + k * size;
  if (size == 8) return double_of(get_le(p, 8));
  if (size == 4) return double(float_of(std::uint32_t(get_le(p, 4))));
  if (t.dtype == "F16") return f16_value(std::uint16_t(get_le(p, 2)));
  return double(float_of(std::uint32_t(get_le(p, 2)) << 16));
}

/// The number of columns of a tensor read as a matrix: a 2-D tensor's second extent, 1 otherwise.
inline std::uint64_t raw_cols(const RawTensor& t) { return t.shape.size() < 2 ? 1 : t.shape[1]; }

/// Element (i, j) of a tensor read as a matrix (row-major on disk; a 1-D tensor is a column).
inline double element(const RawTensor& t, std::uint64_t i, std::uint64_t j) { return element(t, i * raw_cols(t) + j); }

/// The bits of element (i, j) of an F16 or BF16 tensor read as a matrix.
inline std::uint16_t element_bits16(const RawTensor& t, std::uint64_t i, std::uint64_t j) {
  if (t.dtype != "F16" && t.dtype != "BF16") FAIL("16-bit element of a tensor of dtype " << t.dtype);
  const std::uint64_t k = i * raw_cols(t) + j;
  if (2 * (k + 1) > t.bytes.size()) FAIL("element " << k << " of a tensor of " << t.bytes.size() << " bytes");
  return std::uint16_t(get_le(t.bytes.data() + 2 * k, 2));
}

/// Element (i, j) of the tensor `name` of a parsed file, read as a matrix.
inline double element(const RawSafetensors& f, const std::string& name, std::uint64_t i, std::uint64_t j) {
  if (f.tensors.count(name) == 0) FAIL("no tensor " << name);
  return element(f.tensors.at(name), i, j);
}

/// The bits of element (i, j) of the F16 or BF16 tensor `name` of a parsed file, read as a matrix.
inline std::uint16_t element_bits16(const RawSafetensors& f, const std::string& name, std::uint64_t i,
                                    std::uint64_t j) {
  if (f.tensors.count(name) == 0) FAIL("no tensor " << name);
  return element_bits16(f.tensors.at(name), i, j);
}

/// A 1-D or 2-D floating tensor as a matrix: [r, c] as r x c, [n] as n x 1.
inline Eigen::MatrixXd decode(const RawTensor& t) {
  REQUIRE((t.shape.size() == 1 || t.shape.size() == 2));
  const Eigen::Index rows = Eigen::Index(t.shape[0]), cols = Eigen::Index(raw_cols(t));
  Eigen::MatrixXd m(rows, cols);
  for (Eigen::Index i = 0; i < rows; ++i)
    for (Eigen::Index j = 0; j < cols; ++j) m(i, j) = element(t, std::uint64_t(i * cols + j));
  return m;
}

/// Writes a safetensors file from raw tensors (laid out in name order, whatever their offsets were) and
/// metadata (none when null), its header padded with spaces to a multiple of 8.
inline void write_raw_safetensors(const std::string& path, const RawSafetensors& f) {
  nlohmann::json h = nlohmann::json::object();
  if (!f.metadata.is_null()) h["__metadata__"] = f.metadata;
  std::string data;
  for (const auto& [name, r] : f.tensors) {
    h[name] = {{"dtype", r.dtype}, {"shape", r.shape}, {"data_offsets", {data.size(), data.size() + r.bytes.size()}}};
    data += r.bytes;
  }
  std::string text = h.dump();
  while (text.size() % 8 != 0) text += ' ';
  Bytes length;
  put_le(length, text.size(), 8);
  write_file(path, std::string(length.begin(), length.end()) + text + data);
}

}  // namespace peft::test
