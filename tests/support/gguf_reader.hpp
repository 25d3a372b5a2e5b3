#pragma once
// The tests' own GGUF reader, written from the format's description (the bytes, not the library's
// writer, io/gguf.hpp, which it checks): the magic and version, every metadata key with its type and
// value (numbers, strings, arrays of either), the tensor infos, the alignment and the zero padding, and
// each F32, F16 or BF16 tensor's values, read as a matrix of ne[1...] rows by ne[0] columns.
#include "support/bytes.hpp"
#include "support/catch.hpp"
#include "support/files.hpp"

#include <Eigen/Core>

#include <cstdint>
#include <cstring>
#include <map>
#include <string>
#include <vector>

namespace peft::test {

/// A metadata value: its type, and the field of that type.
struct GgufValue {
  std::uint32_t type = 0;
  std::string text;                 // STRING
  double number = 0;                // the numeric types and BOOL
  std::uint32_t element_type = 0;   // ARRAY
  std::vector<std::string> texts;   // ARRAY of STRING
  std::vector<double> numbers;      // ARRAY of numbers
};

/// A tensor: its extents (ne[0] the fastest), its type, its offset in the data, its values.
struct GgufTensorRead {
  std::vector<std::uint64_t> ne;
  std::uint32_t type = 0;
  std::uint64_t offset = 0;
  Eigen::MatrixXf values;  // ne[1...] x ne[0]
};

/// A whole file, its keys and tensors in the order written.
struct GgufRead {
  std::uint32_t version = 0;
  std::map<std::string, GgufValue> kv;
  std::vector<std::string> kv_order;
  std::map<std::string, GgufTensorRead> tensors;
  std::vector<std::string> tensor_order;
  std::uint64_t data_start = 0, alignment = 32, file_size = 0;
};

/// Reads the GGUF file at `path`, checking its layout as it goes (the test fails on what is not GGUF).
inline GgufRead read_gguf(const std::string& path) {
  const std::string all = read_file(path);
  GgufRead g;
  g.file_size = all.size();
  std::size_t at = 0;
  const auto need = [&](std::size_t n) { REQUIRE(at + n <= all.size()); };
  const auto u = [&](int bytes) {
    need(std::size_t(bytes));
    const std::uint64_t v = get_le(all.data() + at, bytes);
    at += std::size_t(bytes);
    return v;
  };
  const auto str = [&] {
    const std::uint64_t n = u(8);
    need(std::size_t(n));
    std::string s = all.substr(at, std::size_t(n));
    at += std::size_t(n);
    return s;
  };
  const auto scalar = [&](std::uint32_t type) -> double {
    switch (type) {
      case 0: return double(u(1));
      case 1: return double(std::int8_t(u(1)));
      case 2: return double(u(2));
      case 3: return double(std::int16_t(u(2)));
      case 4: return double(u(4));
      case 5: return double(std::int32_t(u(4)));
      case 6: { const std::uint32_t b = std::uint32_t(u(4)); float f; std::memcpy(&f, &b, 4); return f; }
      case 7: return double(u(1));
      case 10: return double(u(8));
      case 11: return double(std::int64_t(u(8)));
      case 12: { const std::uint64_t b = u(8); double d; std::memcpy(&d, &b, 8); return d; }
      default: FAIL("unknown GGUF value type " << type); return 0;
    }
  };
  REQUIRE(all.compare(0, 4, "GGUF") == 0);
  at = 4;
  g.version = std::uint32_t(u(4));
  const std::uint64_t n_tensors = u(8), n_kv = u(8);
  for (std::uint64_t k = 0; k < n_kv; ++k) {
    const std::string key = str();
    GgufValue v;
    v.type = std::uint32_t(u(4));
    if (v.type == 8) {
      v.text = str();
    } else if (v.type == 9) {
      v.element_type = std::uint32_t(u(4));
      const std::uint64_t count = u(8);
      for (std::uint64_t i = 0; i < count; ++i) {
        if (v.element_type == 8)
          v.texts.push_back(str());
        else
          v.numbers.push_back(scalar(v.element_type));
      }
    } else {
      v.number = scalar(v.type);
    }
    REQUIRE(g.kv.count(key) == 0);
    g.kv[key] = v;
    g.kv_order.push_back(key);
  }
  if (g.kv.count("general.alignment")) g.alignment = std::uint64_t(g.kv["general.alignment"].number);
  for (std::uint64_t k = 0; k < n_tensors; ++k) {
    const std::string name = str();
    GgufTensorRead t;
    const std::uint32_t dims = std::uint32_t(u(4));
    REQUIRE(dims >= 1);
    REQUIRE(dims <= 4);
    for (std::uint32_t d = 0; d < dims; ++d) t.ne.push_back(u(8));
    t.type = std::uint32_t(u(4));
    t.offset = u(8);
    REQUIRE(name.size() < 64);
    REQUIRE(g.tensors.count(name) == 0);
    g.tensors[name] = t;
    g.tensor_order.push_back(name);
  }
  g.data_start = (at + g.alignment - 1) / g.alignment * g.alignment;
  for (std::size_t i = at; i < g.data_start; ++i) REQUIRE(all[i] == '\0');
  std::uint64_t previous_end = 0;
  for (const auto& name : g.tensor_order) {
    GgufTensorRead& t = g.tensors[name];
    REQUIRE(t.offset % g.alignment == 0);
    REQUIRE(t.offset >= previous_end);
    const std::uint64_t size = t.type == 0 ? 4 : 2;
    REQUIRE((t.type == 0 || t.type == 1 || t.type == 30));
    std::uint64_t rows = 1;
    for (std::size_t d = 1; d < t.ne.size(); ++d) rows *= t.ne[d];
    const std::uint64_t bytes = rows * t.ne[0] * size;
    REQUIRE(g.data_start + t.offset + bytes <= all.size());
    previous_end = t.offset + bytes;
    t.values.resize(Eigen::Index(rows), Eigen::Index(t.ne[0]));
    const char* p = all.data() + g.data_start + t.offset;
    for (Eigen::Index r = 0; r < t.values.rows(); ++r)
      for (Eigen::Index c = 0; c < t.values.cols(); ++c, p += size) {
        if (t.type == 0) {
          std::memcpy(&t.values(r, c), p, 4);
        } else {
          const std::uint16_t h = std::uint16_t(static_cast<unsigned char>(p[0]) | (static_cast<unsigned char>(p[1]) << 8));
          if (t.type == 1) {
            t.values(r, c) = float(f16_value(h));
          } else {
            const std::uint32_t b = std::uint32_t(h) << 16;
            std::memcpy(&t.values(r, c), &b, 4);
          }
        }
      }
  }
  REQUIRE(all.size() % g.alignment == 0);  // padded after the last tensor too
  return g;
}

}  // namespace peft::test
