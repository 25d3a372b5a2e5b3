// The 16-bit float conversions (core/half.hpp): F16 and BF16 widening to float is exact, for every one of
// the 65536 bit patterns, against a value computed from sign, exponent and mantissa with std::ldexp;
// narrowing rounds to nearest with ties to even (overflow to infinity, F16 subnormals, canonical NaNs),
// against a reference that finds the two neighbouring representable values in a table and compares
// distances in double: for every rounding boundary of both formats, for exhaustive ranges of floats
// around the boundaries that matter (2^-25, 2^-14, 65504 / 65520, the largest float) and for millions
// of random floats.
#include "support/bytes.hpp"
#include "support/catch.hpp"

#include <peft/core/half.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <vector>

// Fewer random and exhaustive floats where the checks run far slower (sanitizers, unoptimised builds).
#if defined(PEFT_TEST_SANITIZER_TYPES) || defined(__SANITIZE_ADDRESS__) || !defined(__OPTIMIZE__)
#define PEFT_HALF_TEST_LIGHT 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(undefined_behavior_sanitizer)
#define PEFT_HALF_TEST_LIGHT 1
#endif
#endif

using peft::io::bf16_to_float;
using peft::io::f16_to_float;
using peft::io::float_to_bf16;
using peft::io::float_to_f16;
using peft::test::bf16_value;
using peft::test::bits_of;
using peft::test::f16_value;
using peft::test::float_of;

namespace {

#if defined(PEFT_HALF_TEST_LIGHT)
constexpr std::uint32_t light = 16;  // divides the random counts and strides the long ranges
#else
constexpr std::uint32_t light = 1;
#endif

std::string hex(std::uint32_t v) {
  std::ostringstream os;
  os << "0x" << std::hex << v;
  return os.str();
}

/// The non-negative finite values of a 16-bit format in order of their bits (which is their order),
/// followed by the value infinity stands for when rounding: the next power of two, 2^(emax+1), with even
/// bits (0x7C00, 0x7F80) as IEEE's rounding with an unbounded exponent requires.
struct Table {
  std::vector<double> values;  // values[k] is the value of bits k
  std::uint16_t inf_bits;
};

Table f16_table() {
  Table t{{}, 0x7c00};
  for (std::uint32_t k = 0; k < 0x7c00; ++k) t.values.push_back(f16_value(std::uint16_t(k)));
  t.values.push_back(65536.0);
  return t;
}

Table bf16_table() {
  Table t{{}, 0x7f80};
  for (std::uint32_t k = 0; k < 0x7f80; ++k) t.values.push_back(bf16_value(std::uint16_t(k)));
  t.values.push_back(std::ldexp(1.0, 128));
  return t;
}

const Table& f16s() {
  static const Table t = f16_table();
  return t;
}

const Table& bf16s() {
  static const Table t = bf16_table();
  return t;
}

/// The bits of the value of `t` nearest to x >= 0 (finite), ties to the even bits. The distances are
/// exact in double (Sterbenz: both neighbours lie within a factor of two of x, or the lower one is 0).
std::uint16_t nearest(const Table& t, double x) {
  const auto hi = std::upper_bound(t.values.begin(), t.values.end(), x);  // first value > x
  if (hi == t.values.end()) return t.inf_bits;                            // x >= 2^(emax+1)
  const auto lo = hi - 1;
  const auto k = std::uint16_t(lo - t.values.begin());
  if (*lo == x) return k;
  const double below = x - *lo, above = *hi - x;
  if (below < above) return k;
  if (above < below) return std::uint16_t(k + 1);
  return (k & 1u) ? std::uint16_t(k + 1) : k;
}

std::uint16_t reference_f16(float f) {
  const std::uint16_t sign = std::signbit(f) ? 0x8000 : 0;
  if (std::isnan(f)) return std::uint16_t(sign | 0x7e00);
  if (std::isinf(f)) return std::uint16_t(sign | 0x7c00);
  return std::uint16_t(sign | nearest(f16s(), std::fabs(double(f))));
}

std::uint16_t reference_bf16(float f) {
  if (std::isnan(f)) return 0x7fc0;
  const std::uint16_t sign = std::signbit(f) ? 0x8000 : 0;
  if (std::isinf(f)) return std::uint16_t(sign | 0x7f80);
  return std::uint16_t(sign | nearest(bf16s(), std::fabs(double(f))));
}

/// Narrowing of floats checked against the references: counts mismatches and keeps the first few.
struct Narrowing {
  std::uint64_t checked = 0, f16_wrong = 0, bf16_wrong = 0;
  std::vector<std::string> examples;

  void check(std::uint32_t u) {
    for (const std::uint32_t bits : {u, u ^ 0x80000000u}) {  // each float and its negation
      const float f = float_of(bits);
      ++checked;
      const std::uint16_t h = float_to_f16(f), want_h = reference_f16(f);
      if (h != want_h) {
        ++f16_wrong;
        note("F16", bits, h, want_h);
      }
      const std::uint16_t b = float_to_bf16(f), want_b = reference_bf16(f);
      if (b != want_b) {
        ++bf16_wrong;
        note("BF16", bits, b, want_b);
      }
    }
  }
  /// Every float with bits in [first, last] (positive and negated), every `stride`-th one.
  void range(std::uint32_t first, std::uint32_t last, std::uint32_t stride = 1) {
    for (std::uint64_t u = first; u <= last; u += stride) check(std::uint32_t(u));
  }
  /// The floats within `radius` bit patterns of u: all of them within 4096, every `light`-th beyond.
  void around(std::uint32_t u, std::uint32_t radius) {
    const std::uint32_t near = std::min<std::uint32_t>(radius, 4096);
    range(u - near, u + near);
    if (radius > near) {
      range(u - radius, u - near - 1, light);
      range(u + near + 1, u + radius, light);
    }
  }

  void note(const char* format, std::uint32_t bits, std::uint16_t got, std::uint16_t want) {
    if (examples.size() < 8)
      examples.push_back(std::string(format) + " of float " + hex(bits) + ": got " + hex(got) + ", expected " +
                         hex(want));
  }
  void require() const {
    std::string all;
    for (const auto& e : examples) all += e + "\n";
    INFO(checked << " floats checked; first mismatches:\n" << all);
    REQUIRE(checked > 0);
    REQUIRE(f16_wrong == 0);
    REQUIRE(bf16_wrong == 0);
  }
};

}  // namespace

TEST_CASE("the references agree with the formats' definitions", "[half]") {
  // The tables the narrowing references search: increasing, with the documented landmarks.
  const Table& h = f16s();
  const Table& b = bf16s();
  REQUIRE(std::is_sorted(h.values.begin(), h.values.end()));
  REQUIRE(std::adjacent_find(h.values.begin(), h.values.end()) == h.values.end());
  REQUIRE(std::is_sorted(b.values.begin(), b.values.end()));
  REQUIRE(std::adjacent_find(b.values.begin(), b.values.end()) == b.values.end());
  REQUIRE(h.values[1] == std::ldexp(1.0, -24));      // smallest F16 subnormal
  REQUIRE(h.values[0x3ff] == 1023 * std::ldexp(1.0, -24));
  REQUIRE(h.values[0x400] == std::ldexp(1.0, -14));  // smallest F16 normal
  REQUIRE(h.values[0x3c00] == 1.0);
  REQUIRE(h.values[0x7bff] == 65504.0);
  REQUIRE(b.values[0x3f80] == 1.0);
  REQUIRE(b.values[1] == std::ldexp(1.0, -133));
  REQUIRE(b.values[0x7f7f] == double(float_of(0x7f7f0000u)));
  // The reference itself on hand-worked cases.
  REQUIRE(reference_f16(1.0f + std::ldexp(1.0f, -11)) == 0x3c00);      // tie, down to even
  REQUIRE(reference_f16(1.0f + 3 * std::ldexp(1.0f, -11)) == 0x3c02);  // tie, up to even
  REQUIRE(reference_f16(65520.0f) == 0x7c00);
  REQUIRE(reference_bf16(float_of(0x7f7fffffu)) == 0x7f80);
}

TEST_CASE("F16 widening is exact for every bit pattern and narrowing gives the bits back", "[half][f16]") {
  std::uint32_t wrong_value = 0, wrong_round_trip = 0, nans = 0;
  std::vector<std::string> examples;
  for (std::uint32_t k = 0; k <= 0xffff; ++k) {
    const auto h = std::uint16_t(k);
    const float f = f16_to_float(h);
    const double want = f16_value(h);
    if (std::isnan(want)) {
      ++nans;
      // A NaN stays a NaN with its sign and payload (PyTorch keeps the mantissa bits), and narrows to
      // the canonical quiet NaN with its sign.
      const bool ok = std::isnan(f) && std::signbit(f) == bool(h & 0x8000) &&
                      (bits_of(f) & 0x7fffffu) == std::uint32_t(h & 0x3ffu) << 13;
      if (!ok) ++wrong_value;
      if (float_to_f16(f) != std::uint16_t((h & 0x8000) | 0x7e00)) ++wrong_round_trip;
    } else {
      // Bits, not ==: -0.0 must stay -0.0.
      if (bits_of(f) != bits_of(float(want))) ++wrong_value;
      if (float_to_f16(f) != h) ++wrong_round_trip;
    }
    if ((bits_of(f) != bits_of(float(want)) || float_to_f16(f) != h) && !std::isnan(want) && examples.size() < 8)
      examples.push_back("F16 " + hex(k) + ": widened " + hex(bits_of(f)) + ", back " + hex(float_to_f16(f)));
  }
  std::string all;
  for (const auto& e : examples) all += e + "\n";
  INFO(all);
  REQUIRE(nans == 2 * 1023);
  REQUIRE(wrong_value == 0);
  REQUIRE(wrong_round_trip == 0);
  // Landmarks.
  REQUIRE(f16_to_float(0x0001) == std::ldexp(1.0f, -24));
  REQUIRE(f16_to_float(0x03ff) == 1023 * std::ldexp(1.0f, -24));
  REQUIRE(f16_to_float(0x0400) == std::ldexp(1.0f, -14));
  REQUIRE(f16_to_float(0x3c00) == 1.0f);
  REQUIRE(f16_to_float(0xc000) == -2.0f);
  REQUIRE(f16_to_float(0x7bff) == 65504.0f);
  REQUIRE(f16_to_float(0x7c00) == std::numeric_limits<float>::infinity());
  REQUIRE(f16_to_float(0xfc00) == -std::numeric_limits<float>::infinity());
  REQUIRE(bits_of(f16_to_float(0x8000)) == 0x80000000u);
}

TEST_CASE("BF16 widening is exact for every bit pattern and narrowing gives the bits back", "[half][bf16]") {
  std::uint32_t wrong_value = 0, wrong_round_trip = 0, nans = 0;
  std::vector<std::string> examples;
  for (std::uint32_t k = 0; k <= 0xffff; ++k) {
    const auto h = std::uint16_t(k);
    const float f = bf16_to_float(h);
    const double want = bf16_value(h);
    // BF16 is the top half of a float: widening is bits << 16, NaNs included.
    if (bits_of(f) != k << 16) ++wrong_value;
    if (std::isnan(want)) {
      ++nans;
      if (!std::isnan(f)) ++wrong_value;
      if (float_to_bf16(f) != 0x7fc0) ++wrong_round_trip;
    } else {
      if (bits_of(f) != bits_of(float(want))) ++wrong_value;
      if (float_to_bf16(f) != h) ++wrong_round_trip;
    }
    if ((bits_of(f) != k << 16 || (!std::isnan(want) && float_to_bf16(f) != h)) && examples.size() < 8)
      examples.push_back("BF16 " + hex(k) + ": widened " + hex(bits_of(f)) + ", back " + hex(float_to_bf16(f)));
  }
  std::string all;
  for (const auto& e : examples) all += e + "\n";
  INFO(all);
  REQUIRE(nans == 2 * 127);
  REQUIRE(wrong_value == 0);
  REQUIRE(wrong_round_trip == 0);
  REQUIRE(bf16_to_float(0x3f80) == 1.0f);
  REQUIRE(bf16_to_float(0x0001) == std::ldexp(1.0f, -133));
  REQUIRE(bf16_to_float(0x7f80) == std::numeric_limits<float>::infinity());
}

TEST_CASE("narrowing: the documented cases", "[half]") {
  const float inf = std::numeric_limits<float>::infinity();
  const float ulp_2m25 = std::ldexp(1.0f, -48);  // the float spacing at 2^-25

  SECTION("F16 ties go to the even neighbour") {
    REQUIRE(float_to_f16(1.0f + std::ldexp(1.0f, -11)) == 0x3c00);       // between 0x3c00 (even) and 0x3c01
    REQUIRE(float_to_f16(1.0f + 3 * std::ldexp(1.0f, -11)) == 0x3c02);   // between 0x3c01 and 0x3c02 (even)
    REQUIRE(float_to_f16(-(1.0f + 3 * std::ldexp(1.0f, -11))) == 0xbc02);
    REQUIRE(float_to_f16(std::nextafter(1.0f + std::ldexp(1.0f, -11), 2.0f)) == 0x3c01);  // just past: up
    REQUIRE(float_to_f16(std::nextafter(1.0f + 3 * std::ldexp(1.0f, -11), 0.0f)) == 0x3c01);  // just before: down
    REQUIRE(float_to_f16(2048.0f + 1.0f) == 0x6800);  // 2049: between 2048 and 2050, to 2048 (even)
    REQUIRE(float_to_f16(2048.0f + 3.0f) == 0x6802);  // 2051: to 2052 (even)
  }
  SECTION("F16 subnormals, 2^-25 and below") {
    REQUIRE(float_to_f16(std::ldexp(1.0f, -24)) == 0x0001);
    REQUIRE(float_to_f16(std::ldexp(1.5f, -24)) == 0x0002);   // tie between 1 (odd) and 2: to 2
    REQUIRE(float_to_f16(std::ldexp(2.5f, -24)) == 0x0002);   // tie between 2 and 3 (odd): to 2
    REQUIRE(float_to_f16(std::ldexp(3.5f, -24)) == 0x0004);
    REQUIRE(float_to_f16(std::ldexp(1023.0f, -24)) == 0x03ff);
    REQUIRE(float_to_f16(std::ldexp(1023.5f, -24)) == 0x0400);  // tie between 0x3ff and 0x400: the smallest normal
    REQUIRE(float_to_f16(std::nextafter(std::ldexp(1.0f, -14), 0.0f)) == 0x0400);
    REQUIRE(float_to_f16(std::ldexp(1.0f, -25)) == 0x0000);  // tie between 0 (even) and 2^-24
    REQUIRE(float_to_f16(-std::ldexp(1.0f, -25)) == 0x8000);
    REQUIRE(float_to_f16(std::ldexp(1.0f, -25) + ulp_2m25) == 0x0001);  // just above: up
    REQUIRE(float_to_f16(std::ldexp(1.0f, -25) - ulp_2m25 / 2) == 0x0000);  // just below
    REQUIRE(float_to_f16(std::ldexp(1.0f, -26)) == 0x0000);
    REQUIRE(float_to_f16(std::numeric_limits<float>::denorm_min()) == 0x0000);
    REQUIRE(float_to_f16(-std::numeric_limits<float>::denorm_min()) == 0x8000);
  }
  SECTION("F16 overflow: 65504 is the largest, 65520 rounds to infinity") {
    REQUIRE(float_to_f16(65504.0f) == 0x7bff);
    REQUIRE(float_to_f16(65519.99f) == 0x7bff);
    REQUIRE(float_to_f16(std::nextafter(65520.0f, 0.0f)) == 0x7bff);
    REQUIRE(float_to_f16(65520.0f) == 0x7c00);
    REQUIRE(float_to_f16(-65520.0f) == 0xfc00);
    REQUIRE(float_to_f16(65536.0f) == 0x7c00);
    REQUIRE(float_to_f16(std::numeric_limits<float>::max()) == 0x7c00);
    REQUIRE(float_to_f16(inf) == 0x7c00);
    REQUIRE(float_to_f16(-inf) == 0xfc00);
  }
  SECTION("zeros keep their sign") {
    REQUIRE(float_to_f16(0.0f) == 0x0000);
    REQUIRE(float_to_f16(-0.0f) == 0x8000);
    REQUIRE(float_to_bf16(0.0f) == 0x0000);
    REQUIRE(float_to_bf16(-0.0f) == 0x8000);
  }
  SECTION("BF16 ties to even, overflow to infinity") {
    REQUIRE(float_to_bf16(1.0f + std::ldexp(1.0f, -8)) == 0x3f80);       // tie to 0x3f80 (even)
    REQUIRE(float_to_bf16(1.0f + 3 * std::ldexp(1.0f, -8)) == 0x3f82);   // tie to 0x3f82 (even)
    REQUIRE(float_to_bf16(std::nextafter(1.0f + std::ldexp(1.0f, -8), 2.0f)) == 0x3f81);
    REQUIRE(float_to_bf16(std::numeric_limits<float>::max()) == 0x7f80);   // past the overflow tie
    REQUIRE(float_to_bf16(-std::numeric_limits<float>::max()) == 0xff80);
    REQUIRE(float_to_bf16(float_of(0x7f7f8000u)) == 0x7f80);  // the tie itself: 0x7f7f is odd, so up
    REQUIRE(float_to_bf16(float_of(0x7f7f7fffu)) == 0x7f7f);  // just below the tie
    REQUIRE(float_to_bf16(float_of(0x7f7e8000u)) == 0x7f7e);  // a tie down to even
    REQUIRE(float_to_bf16(inf) == 0x7f80);
    REQUIRE(float_to_bf16(-inf) == 0xff80);
    REQUIRE(float_to_bf16(float_of(0x00008000u)) == 0x0000);  // subnormal tie to 0
    REQUIRE(float_to_bf16(float_of(0x00018000u)) == 0x0002);  // subnormal tie to 2
  }
  SECTION("NaNs become the canonical quiet NaNs, whatever their payload") {
    // Payloads only in the bits narrowing drops: a truncation would make them infinities.
    for (const std::uint32_t nan : {0x7fc00000u, 0x7f800001u, 0x7f801000u, 0x7fa00000u, 0x7fffffffu, 0x7f80ffffu}) {
      INFO("NaN " << hex(nan));
      REQUIRE(float_to_f16(float_of(nan)) == 0x7e00);
      REQUIRE(float_to_f16(float_of(nan | 0x80000000u)) == 0xfe00);
      REQUIRE(float_to_bf16(float_of(nan)) == 0x7fc0);
      REQUIRE(float_to_bf16(float_of(nan | 0x80000000u)) == 0x7fc0);
    }
  }
}

TEST_CASE("narrowing rounds to nearest even at every rounding boundary of both formats", "[half]") {
  // For every pair of neighbouring values (infinity standing for 2^(emax+1)), the floats at and around
  // their midpoint (a tie) and around each value.
  Narrowing n;
  for (const Table* t : {&f16s(), &bf16s()})
    for (std::size_t k = 0; k + 1 < t->values.size(); ++k) {
      const float value = float(t->values[k]);
      const float mid = float((t->values[k] + t->values[k + 1]) / 2);
      REQUIRE(double(mid) == (t->values[k] + t->values[k + 1]) / 2);  // the tie is a float
      n.around(bits_of(mid), light > 1 ? 1 : 3);
      if (k > 0) n.around(bits_of(value), light > 1 ? 1 : 2);
    }
  n.check(0);
  n.check(0x7f800000u);  // infinities
  n.require();
}

TEST_CASE("narrowing matches the reference on exhaustive ranges around the boundaries", "[half]") {
  Narrowing n;
  n.range(0x00000000u, 0x00010000u);               // float subnormals (to zero)
  n.around(0x33000000u, 1u << 18);                 // 2^-25: the F16 tie with zero
  n.around(0x33800000u, 1u << 16);                 // 2^-24: the smallest F16 subnormal
  n.range(0x33800000u, 0x38800000u, 97 * light);   // all F16 subnormals, strided
  n.around(0x38800000u, 1u << 18);                 // 2^-14: the smallest F16 normal
  n.around(0x3f800000u, 1u << 18);                 // 1
  n.around(0x477ff000u, 1u << 16);                 // 65504 (0x477fe000) .. 65520 (0x477ff000) .. 65536
  n.range(0x7f700000u, 0x7f800000u, light);        // the largest floats: BF16 overflow
  n.require();
}

TEST_CASE("narrowing matches the reference on random floats", "[half]") {
  Narrowing n;
  std::mt19937 rng(20240607);
  const std::uint32_t count = 2'000'000 / light;
  for (std::uint32_t i = 0; i < count; ++i) n.check(rng());  // any bits: zero, subnormal, normal, inf, NaN
  // Floats of magnitude in F16's range, 2^-26 .. 2^17, where uniform bits rarely fall.
  std::uniform_int_distribution<std::uint32_t> in_range(0x32800000u, 0x48000000u);
  for (std::uint32_t i = 0; i < count; ++i) n.check(in_range(rng));
  n.require();
}

TEST_CASE("every NaN narrows to the canonical NaN", "[half]") {
  std::uint64_t wrong = 0, checked = 0;
  for (std::uint32_t payload = 1; payload < (1u << 23); payload += light) {
    for (const std::uint32_t sign : {0u, 0x80000000u}) {
      const float f = float_of(sign | 0x7f800000u | payload);
      ++checked;
      if (float_to_f16(f) != std::uint16_t((sign >> 16) | 0x7e00) || float_to_bf16(f) != 0x7fc0) ++wrong;
    }
  }
  INFO(checked << " NaNs checked");
  REQUIRE(checked >= 2 * ((1u << 23) - 1) / light);
  REQUIRE(wrong == 0);
}
