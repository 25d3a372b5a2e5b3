#pragma once
// safetensors files built by hand, byte by byte, for the safetensors tests (independently of the
// library's writer): the values' little-endian bytes, a header member formatted as text, the 8-byte
// length, the header as written (padded as asked), the buffer; and reproducible random values to fill
// them with.
#include "support/bytes.hpp"

#include <cstddef>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

namespace peft::test {

inline Bytes f32_bytes(const std::vector<float>& v) {
  Bytes b;
  for (float x : v) put_le(b, bits_of(x), 4);
  return b;
}

inline Bytes f64_bytes(const std::vector<double>& v) {
  Bytes b;
  for (double x : v) put_le(b, bits_of(x), 8);
  return b;
}

inline Bytes u16_bytes(const std::vector<std::uint16_t>& v) {
  Bytes b;
  for (auto x : v) put_le(b, x, 2);
  return b;
}

/// `n` floats drawn from N(0, 3²) by std::mt19937(seed).
inline std::vector<float> random_floats(std::size_t n, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.0f, 3.0f);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

/// `n` doubles drawn from N(0, 3²) by std::mt19937_64(seed).
inline std::vector<double> random_doubles(std::size_t n, std::uint32_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> d(0.0, 3.0);
  std::vector<double> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

/// A whole file from its header text (unpadded, as given) and its byte buffer.
inline Bytes file_of(const std::string& header, const Bytes& buffer = {}) {
  Bytes b;
  put_le(b, header.size(), 8);
  b.insert(b.end(), header.begin(), header.end());
  b.insert(b.end(), buffer.begin(), buffer.end());
  return b;
}

/// A header member for one tensor, formatted by hand: "name":{"dtype":..,"shape":..,"data_offsets":[b,e]}.
inline std::string entry(const std::string& name, const std::string& dtype, const std::string& shape,
                         std::uint64_t begin, std::uint64_t end) {
  return "\"" + name + "\":{\"dtype\":\"" + dtype + "\",\"shape\":" + shape + ",\"data_offsets\":[" +
         std::to_string(begin) + "," + std::to_string(end) + "]}";
}

/// Builds a file tensor by tensor, the offsets contiguous in the order added.
struct Builder {
  std::vector<std::string> members;
  Bytes buffer;
  std::size_t align = 8;  // the header is padded with spaces so that 8 + N is a multiple of this
  std::size_t extra = 0;  // ... plus this many more spaces

  Builder& tensor(const std::string& name, const std::string& dtype, const std::string& shape, const Bytes& data) {
    members.push_back(entry(name, dtype, shape, buffer.size(), buffer.size() + data.size()));
    buffer.insert(buffer.end(), data.begin(), data.end());
    return *this;
  }
  Builder& member(const std::string& text) {
    members.push_back(text);
    return *this;
  }
  std::string header() const {
    std::string h = "{";
    for (std::size_t i = 0; i < members.size(); ++i) h += (i ? "," : "") + members[i];
    h += "}";
    while ((8 + h.size()) % align != 0) h += ' ';
    h.append(extra, ' ');
    return h;
  }
  Bytes bytes() const { return file_of(header(), buffer); }
};

}  // namespace peft::test
