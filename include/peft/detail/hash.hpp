#pragma once
/// \file hash.hpp
/// \brief The two non-cryptographic hashes of the library, written once: 64-bit FNV-1a (of module
/// paths, of bit patterns compared across ranks or tiles) and SplitMix64's mixing function (seeds
/// derived from other seeds: nearby inputs, unrelated outputs).

#include "peft/detail/internal_header_check.hpp"

#include <cstddef>
#include <cstdint>

namespace peft {
namespace detail {

/// FNV-1a's 64-bit offset basis and prime.
constexpr std::uint64_t fnv1a_basis = 0xcbf29ce484222325ull;
constexpr std::uint64_t fnv1a_prime = 0x100000001b3ull;

/// \returns h after one FNV-1a step on `word` (a byte, or a whole 64-bit word).
constexpr std::uint64_t fnv1a_step(std::uint64_t h, std::uint64_t word) { return (h ^ word) * fnv1a_prime; }

/// \returns the 64-bit FNV-1a hash of n bytes, continuing from h.
inline std::uint64_t fnv1a(const void* data, std::size_t n, std::uint64_t h = fnv1a_basis) {
  const auto* p = static_cast<const unsigned char*>(data);
  for (std::size_t i = 0; i < n; ++i) h = fnv1a_step(h, p[i]);
  return h;
}

/// \returns SplitMix64's output for the state x: x advanced by the golden-ratio increment, then mixed.
constexpr std::uint64_t splitmix64(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

}  // namespace detail
}  // namespace peft
