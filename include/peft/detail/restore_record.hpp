#pragma once
/// \file restore_record.hpp
/// \brief What a merge (or fold) keeps so that its reverse gives the weights back bit for bit: the data
/// of the exact restore, whose kernels are in detail/exact_restore.hpp (docs/math.md, Exact restore).

#include "peft/detail/internal_header_check.hpp"

#include "peft/core/types.hpp"

#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

namespace peft {
namespace detail {

/// \brief What exact_merge() keeps for exact_unmerge(): one code per element, a hash per tile, and the
/// elements kept exactly. Empty when nothing is recorded.
template <class S>
struct RestoreRecord {
  Index inner = 0, outer = 0;            ///< the view's shape at the merge
  Index tile_rows = 0, tile_cols = 0;    ///< the tile shape (part of what the values depend on)
  std::vector<std::int8_t> codes;        ///< W0 − P in ulps, in the view's order; -128: kept exactly
  std::vector<std::uint64_t> hashes;     ///< per tile, of the merged values
  std::vector<std::vector<std::pair<std::uint32_t, S>>> exact;  ///< per tile: (index in the tile, W0)

  bool empty() const { return hashes.empty(); }
  void clear() { *this = RestoreRecord(); }
  /// \returns the memory held, in bytes.
  std::size_t bytes() const {
    std::size_t n = codes.capacity() + hashes.capacity() * sizeof(std::uint64_t) + exact.capacity() * sizeof(exact[0]);
    for (const auto& e : exact) n += e.capacity() * sizeof(e[0]);
    return n;
  }
};

/// \brief A vector changed by a merge (a bias, a LayerNorm's parameters): kept whole before and after,
/// O(d), so that the reverse gives it back exactly unless it was written since.
template <class S>
struct VectorRecord {
  VectorX<S> before, after;
  void clear() {
    before.resize(0);
    after.resize(0);
  }
  std::size_t bytes() const { return sizeof(S) * std::size_t(before.size() + after.size()); }
  /// \returns whether v still holds the merged values, bit for bit.
  bool unchanged(const Eigen::Ref<const VectorX<S>>& v) const {
    return v.size() == after.size() &&
           (v.size() == 0 || std::memcmp(v.data(), after.data(), sizeof(S) * std::size_t(v.size())) == 0);
  }
};

}  // namespace detail
}  // namespace peft
