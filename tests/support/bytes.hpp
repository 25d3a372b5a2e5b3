#pragma once
// Bytes and bits, written out here for the file-format tests' independent readers and hand-built files
// (little-endian by construction, whatever the host), and the values of 16-bit float bits computed from
// sign, exponent and mantissa with std::ldexp: never with the library's code, which they check.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace peft::test {

using Bytes = std::vector<unsigned char>;

/// Appends the `n` low bytes of `v`, least significant first.
inline void put_le(Bytes& out, std::uint64_t v, int n) {
  for (int i = 0; i < n; ++i) out.push_back(static_cast<unsigned char>((v >> (8 * i)) & 0xffu));
}

/// \returns the little-endian unsigned integer of the `n` bytes at `p`.
inline std::uint64_t get_le(const unsigned char* p, int n) {
  std::uint64_t v = 0;
  for (int i = n - 1; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

/// \returns the little-endian unsigned integer of the `n` bytes at `p`.
inline std::uint64_t get_le(const char* p, int n) { return get_le(reinterpret_cast<const unsigned char*>(p), n); }

inline std::uint32_t bits_of(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline std::uint64_t bits_of(double d) {
  std::uint64_t u;
  std::memcpy(&u, &d, sizeof u);
  return u;
}

inline float float_of(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline double double_of(std::uint64_t u) {
  double d;
  std::memcpy(&d, &u, sizeof d);
  return d;
}

/// The value of F16 bits: (-1)^s m 2^-24 (subnormal) or (-1)^s (1024 + m) 2^(e-25), in double (exact in
/// float too).
inline double f16_value(std::uint16_t h) {
  const int e = (h >> 10) & 0x1f;
  const int m = h & 0x3ff;
  double v;
  if (e == 0x1f)
    v = m ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
  else if (e == 0)
    v = std::ldexp(double(m), -24);
  else
    v = std::ldexp(double(1024 + m), e - 25);
  return (h & 0x8000) ? -v : v;
}

/// The value of BF16 bits: (-1)^s m 2^-133 (subnormal) or (-1)^s (128 + m) 2^(e-134), in double (exact
/// in float too).
inline double bf16_value(std::uint16_t h) {
  const int e = (h >> 7) & 0xff;
  const int m = h & 0x7f;
  double v;
  if (e == 0xff)
    v = m ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
  else if (e == 0)
    v = std::ldexp(double(m), -133);
  else
    v = std::ldexp(double(128 + m), e - 134);
  return (h & 0x8000) ? -v : v;
}

/// Equal values, bit for bit but any NaN equal to any NaN.
inline bool same(double a, double b) { return (std::isnan(a) && std::isnan(b)) || bits_of(a) == bits_of(b); }

}  // namespace peft::test
