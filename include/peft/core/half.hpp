#pragma once
/// \file half.hpp
/// \brief IEEE binary16 (F16) and bfloat16 (BF16) to and from float, bit for bit as PyTorch converts.
///
/// Widening (F16 or BF16 to float) is exact: every F16 and BF16 value is a float. Narrowing rounds to
/// nearest, ties to even; values beyond the largest finite F16 (65504) round to infinity as IEEE
/// requires (those below 65520 round down to 65504), a NaN becomes PyTorch's canonical quiet NaN
/// (BF16 0x7FC0; F16 0x7E00 with the sign kept), and F16 subnormals are produced where they belong. These are the conversions of PyTorch's `c10::Half` and
/// `c10::BFloat16` (round_to_nearest_even). A double is narrowed through float, as PyTorch's
/// `tensor.to(torch.float16)` of a float64 tensor does. Only the standard library is needed. In `peft` (and,
/// as before, `peft::io`, where the file formats use them).

#include <cstdint>
#include <cstring>

namespace peft {

/// \returns the float whose bits are `bits`.
inline float float_from_bits(std::uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

/// \returns the bits of `f`.
inline std::uint32_t bits_from_float(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

/// \returns the BF16 value `h` as a float (exact).
inline float bf16_to_float(std::uint16_t h) { return float_from_bits(std::uint32_t(h) << 16); }

/// \returns `f` rounded to BF16, to nearest with ties to even; a NaN becomes 0x7FC0.
inline std::uint16_t float_to_bf16(float f) {
  const std::uint32_t u = bits_from_float(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0u;
  const std::uint32_t rounding = 0x7fffu + ((u >> 16) & 1u);
  return std::uint16_t((u + rounding) >> 16);  // carries into the exponent, up to infinity, as it should
}

/// \returns the F16 value `h` as a float (exact, subnormals included).
inline float f16_to_float(std::uint16_t h) {
  const std::uint32_t sign = std::uint32_t(h & 0x8000u) << 16;
  const std::uint32_t exponent = (h >> 10) & 0x1fu;
  std::uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0x1f) return float_from_bits(sign | 0x7f800000u | (mantissa << 13));  // inf, NaN
  if (exponent != 0) return float_from_bits(sign | ((exponent + 112u) << 23) | (mantissa << 13));
  if (mantissa == 0) return float_from_bits(sign);  // ±0
  // Subnormal: mantissa × 2^-24, normalised into a float.
  std::uint32_t e = 113;  // float exponent of 2^-14, minus the shifts below
  while ((mantissa & 0x400u) == 0) {
    mantissa <<= 1;
    --e;
  }
  return float_from_bits(sign | (e << 23) | ((mantissa & 0x3ffu) << 13));
}

/// \returns `f` rounded to F16, to nearest with ties to even (subnormals, overflow to infinity); a NaN
/// becomes 0x7E00 with its sign.
inline std::uint16_t float_to_f16(float f) {
  const std::uint32_t u = bits_from_float(f);
  const std::uint16_t sign = std::uint16_t((u >> 16) & 0x8000u);
  const std::uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return std::uint16_t(sign | 0x7e00u);  // NaN
  if (a >= 0x477ff000u) return std::uint16_t(sign | 0x7c00u);  // ≥ 65520 (rounds past 65504), or inf
  if (a < 0x38800000u) {  // below 2^-14: an F16 subnormal or zero, in units of 2^-24
    if (a < 0x33000000u) return sign;  // below 2^-25: rounds to zero
    const std::uint32_t exponent = a >> 23;
    const std::uint32_t mantissa = (a & 0x7fffffu) | 0x800000u;
    const std::uint32_t shift = 126u - exponent;  // value = mantissa × 2^(exponent - 150); unit 2^-24
    const std::uint32_t kept = mantissa >> shift;
    const std::uint32_t rest = mantissa & ((1u << shift) - 1u);
    const std::uint32_t half = 1u << (shift - 1u);
    const std::uint32_t rounded = kept + ((rest > half || (rest == half && (kept & 1u))) ? 1u : 0u);
    return std::uint16_t(sign | rounded);  // a carry into 0x400 is the smallest normal, as it should be
  }
  // Normal: rebias the exponent (127 → 15) and round 13 mantissa bits away.
  const std::uint32_t rebiased = a - 0x38000000u;  // exponent - 112
  const std::uint32_t rounding = 0xfffu + ((rebiased >> 13) & 1u);
  return std::uint16_t(sign | ((rebiased + rounding) >> 13));
}

namespace io {
using peft::bf16_to_float;
using peft::bits_from_float;
using peft::f16_to_float;
using peft::float_from_bits;
using peft::float_to_bf16;
using peft::float_to_f16;
}  // namespace io

}  // namespace peft
