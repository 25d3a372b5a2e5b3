#pragma once
/// \file exact_restore.hpp
/// \brief Merges that unmerge bit for bit: a reversible change of a weight W (a merge, a fold) applied
/// tile by tile, together with a record from which the reverse change gives W0 back exactly, whatever
/// happened in between (other than a write to W), however many times (docs/math.md, Exact restore).
///
/// The reverse of a merge computes, for every element, a value P that is W0 to within a few units in
/// the last place (ulps). At merge time the same P is computed, by the same kernels in the same order,
/// and the record keeps, per element, the difference between W0 and P counted in ulps (the distance
/// between their positions in the ordered list of floating-point numbers): one signed byte. The rare
/// element whose difference does not fit in [-127, 127] (where the merged value cancelled W0's digits)
/// is kept exactly on the side. The reverse adds the byte back to P's position: W0, bit for bit.
///
/// What P depends on is fixed at merge time: the tile shape is stored, the low-rank term D = s B A of
/// each tile comes from Eigen's GEMM run serially with a blocking set by the tile's shape alone
/// (stack_product.hpp), never from a threaded or BLAS product, and every element-wise pass performs one
/// IEEE operation per element, so no compiler contraction (a fused multiply-add) or vector/scalar code
/// path can change a rounding. Tiles are independent: they run on Eigen's thread count, in any order.
///
/// A hash of the merged values of each tile is kept too: the reverse checks each tile before restoring
/// it, and a tile whose values were written by someone else since the merge gets the ordinary reverse
/// (the same formula without the record), so the user's write is kept and nothing is made up.
///
/// Memory: one byte per element (25 % of a float W, 12.5 % of a double one) plus 8 bytes per tile and
/// the exceptional elements (index and value). Time: the merge and the reverse each read and write W
/// once, tile by tile (there is no separate finiteness pass: on a failure, the tiles already done are
/// put back exactly as they were).

#include "peft/detail/internal_header_check.hpp"

#include "peft/core/config.hpp"
#include "peft/core/error.hpp"
#include "peft/core/types.hpp"
#include "peft/detail/kernels.hpp"
#include "peft/detail/hash.hpp"
#include "peft/detail/restore_record.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

namespace peft {
namespace detail {

/// \brief One element-wise step of a reversible change, with D the tile of s B A and d the row scales:
/// add: W + D; sub: W − D; add_scale: d ⊙ (W + D); scale_sub: d ⊙ W − D; scale: d ⊙ W; divide: W ⊘ d.
enum class TileOp : unsigned char { add, sub, add_scale, scale_sub, scale, divide };

/// \brief A reversible change of W = op(view) (transposed: W = viewᵀ, a row-major W): `forward` (the
/// merge) and `backward` (the unmerge), with the low-rank term D = s B A (rank 0: none; B is W's rows x
/// r, A is r x W's columns, both column-major) and the row scales of each direction (W's rows, or with
/// `scale_columns` W's columns: a fold into the next layer scales its columns).
template <class S>
struct TileUpdate {
  bool transposed = false;
  TileOp forward = TileOp::add;
  TileOp backward = TileOp::sub;
  S s = S(0);
  const S* B = nullptr;
  Index ldb = 0;
  const S* A = nullptr;
  Index lda = 0;
  Index rank = 0;
  const S* forward_scale = nullptr;
  const S* backward_scale = nullptr;
  bool scale_columns = false;
};

namespace exact {

template <class S>
using Bits = std::conditional_t<sizeof(S) == 4, std::uint32_t, std::uint64_t>;

/// The position of x in the order of the floating-point numbers, as an unsigned integer: monotone, with
/// -0 and +0 adjacent. Its inverse is from_key.
template <class S>
inline Bits<S> key(S x) {
  using U = Bits<S>;
  U u;
  std::memcpy(&u, &x, sizeof u);
  constexpr U sign = U(1) << (8 * sizeof(U) - 1);
  return u ^ ((U(0) - (u >> (8 * sizeof(U) - 1))) | sign);  // negative: all bits flipped; else the sign set
}

template <class S>
inline S from_key(Bits<S> k) {
  using U = Bits<S>;
  constexpr U sign = U(1) << (8 * sizeof(U) - 1);
  const U u = k ^ (~(U(0) - (k >> (8 * sizeof(U) - 1))) | sign);
  S x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

constexpr std::int8_t kept_exactly = -128;

/// The tiles of a view of inner x outer elements, in column-major order of tiles.
struct Tiling {
  Index inner, outer, rows, cols, row_tiles, col_tiles;
  Tiling(Index inner_, Index outer_, Index rows_, Index cols_)
      : inner(inner_), outer(outer_), rows(rows_), cols(cols_),
        row_tiles((inner_ + rows_ - 1) / rows_), col_tiles((outer_ + cols_ - 1) / cols_) {}
  Index count() const { return row_tiles * col_tiles; }
  Index i0(Index t) const { return (t % row_tiles) * rows; }
  Index j0(Index t) const { return (t / row_tiles) * cols; }
  Index mb(Index t) const { return std::min(rows, inner - i0(t)); }
  Index nb(Index t) const { return std::min(cols, outer - j0(t)); }
};

/// The tile shape for a view with `inner` rows: up to 512 rows and 16 Ki elements, small enough for the
/// tile and its D to stay in a core's cache, tall enough that each tile's GEMM packs little.
inline Tiling tiling(Index inner, Index outer) {
  const Index rows = std::max<Index>(1, std::min<Index>(inner, 512));
  const Index cols = std::max<Index>(1, (Index(1) << 14) / rows);
  return Tiling(inner, outer, rows, cols);
}

/// Runs f(t) for every tile t on Eigen's thread count; rethrows the exception of the lowest tile that
/// threw (after every tile has run), so that the outcome does not depend on the schedule.
template <class F>
void for_each_tile(Index count, F&& f) {
#ifdef _OPENMP
  const int threads = int(std::max<Index>(1, std::min<Index>(Eigen::nbThreads(), count)));
  if (threads > 1) {
    std::vector<std::exception_ptr> errors(static_cast<std::size_t>(count));
#pragma omp parallel for num_threads(threads) schedule(dynamic, 2)
    for (Index t = 0; t < count; ++t) {
      try {
        f(t);
      } catch (...) {
        errors[std::size_t(t)] = std::current_exception();
      }
    }
    for (const auto& e : errors)
      if (e) std::rethrow_exception(e);
    return;
  }
#endif
  for (Index t = 0; t < count; ++t) f(t);
}

/// D = s B A for the tile (rows i0.. of the view, columns j0..), serially, with a blocking fixed by the
/// tile's shape: the same values on every call.
template <class S>
void tile_delta(const TileUpdate<S>& u, Index i0, Index j0, Index mb, Index nb, MatrixX<S>& D) {
  D.resize(mb, nb);
  if (u.transposed)  // the view is Wᵀ: its tile is (s B A)ᵀ = s Aᵀ Bᵀ, rows i0.. of Aᵀ, columns j0.. of Bᵀ
    kernels::gemm_serial<S>(kernels::view(D), {kernels::ConstView<S>(u.A + i0 * u.lda, u.rank, mb, Eigen::OuterStride<>(u.lda)), true},
                            {kernels::ConstView<S>(u.B + j0, nb, u.rank, Eigen::OuterStride<>(u.ldb)), true}, u.s, false);
  else
    kernels::gemm_serial<S>(kernels::view(D), {kernels::ConstView<S>(u.B + i0, mb, u.rank, Eigen::OuterStride<>(u.ldb)), false},
                            {kernels::ConstView<S>(u.A + j0 * u.lda, u.rank, nb, Eigen::OuterStride<>(u.lda)), false}, u.s, false);
}

/// The pairs of steps (forward, backward) the library uses.
enum Pair : int { add_sub, sub_add, add_scale_sub, scale_divide };

inline Pair pair_of(const Where& where, TileOp forward, TileOp backward) {
  if (forward == TileOp::add && backward == TileOp::sub) return add_sub;
  if (forward == TileOp::sub && backward == TileOp::add) return sub_add;
  if (forward == TileOp::add_scale && backward == TileOp::scale_sub) return add_scale_sub;
  if (forward == TileOp::scale && backward == TileOp::divide) return scale_divide;
  raise<ConfigError>(where, "no exact restore for this pair of steps");
}

// The loops below are written for the compiler to vectorise, one IEEE operation per statement and with
// contraction into fused multiply-adds off (PEFT_EXACT_LOOPS): the merge and the unmerge compute P with
// the same roundings, whichever code path (vector or scalar) an element takes.

/// One column of a tile at the merge: m = forward(w), p = backward(m), the codes W0 − P, the column's
/// hash term of m, and whether any m is not finite. \returns how many codes did not fit a byte
template <class S, int P>
PEFT_EXACT_LOOPS Bits<S> merge_column(const S* w, const S* d, const S* g, const S* rho, Index n, S* m_out,
                                      std::int8_t* codes, Bits<S>& hash, Bits<S>& not_finite) {
  using U = Bits<S>;
  constexpr int top = 8 * int(sizeof(U)) - 1;
  constexpr U sign = U(1) << top;
  constexpr U exponent = sizeof(S) == 4 ? U(0x7f800000u) : U(0x7ff0000000000000ull);
  constexpr U mix = U(0x9E3779B97F4A7C15ull);
  U missed = 0, h = 0, bad = 0;
  for (Index i = 0; i < n; ++i) {
    S m, p;
    if constexpr (P == add_sub) {
      m = w[i] + d[i];
      p = m - d[i];
    } else if constexpr (P == sub_add) {
      m = w[i] - d[i];
      p = m + d[i];
    } else if constexpr (P == add_scale_sub) {
      const S v = w[i] + d[i];
      m = v * g[i];
      const S t = rho[i] * m;
      p = t - d[i];
    } else {
      m = w[i] * g[i];
      p = m / g[i];
    }
    U u0, up, um;
    std::memcpy(&u0, w + i, sizeof u0);
    std::memcpy(&up, &p, sizeof up);
    std::memcpy(&um, &m, sizeof um);
    const U k0 = u0 ^ ((U(0) - (u0 >> top)) | sign);
    const U kp = up ^ ((U(0) - (up >> top)) | sign);
    const U diff = U(k0 - kp + U(127));  // in [0, 254] when W0 − P is in [-127, 127] ulps
    const bool fits = diff <= U(254);
    codes[i] = fits ? static_cast<std::int8_t>(static_cast<int>(diff & U(0xff)) - 127) : kept_exactly;
    missed += fits ? U(0) : U(1);
    h += um ^ (U(i) * mix);
    bad |= U((um & exponent) == exponent);
    m_out[i] = m;
  }
  hash = h;
  not_finite = bad;
  return missed;
}

/// One column at the unmerge, in place: w = backward(w), moved by the codes when `Decode` (W0 then,
/// but for the elements kept exactly, written afterwards).
template <class S, int P, bool Decode>
PEFT_EXACT_LOOPS void unmerge_column(S* w, const S* d, const S* scale, const std::int8_t* codes, Index n) {
  using U = Bits<S>;
  using SU = std::make_signed_t<U>;
  constexpr int top = 8 * int(sizeof(U)) - 1;
  constexpr U sign = U(1) << top;
  for (Index i = 0; i < n; ++i) {
    S p;
    if constexpr (P == add_sub) {
      p = w[i] - d[i];
    } else if constexpr (P == sub_add) {
      p = w[i] + d[i];
    } else if constexpr (P == add_scale_sub) {
      const S t = scale[i] * w[i];
      p = t - d[i];
    } else {
      p = w[i] / scale[i];
    }
    if constexpr (Decode) {
      U up;
      std::memcpy(&up, &p, sizeof up);
      const U k = U((up ^ ((U(0) - (up >> top)) | sign)) + U(SU(codes[i])));
      const U u = k ^ (~(U(0) - (k >> top)) | sign);
      std::memcpy(w + i, &u, sizeof u);
    } else {
      w[i] = p;
    }
  }
}

/// The hash term of a column (as merge_column computes it).
template <class S>
PEFT_EXACT_LOOPS Bits<S> hash_column(const S* x, Index n) {
  using U = Bits<S>;
  constexpr U mix = U(0x9E3779B97F4A7C15ull);
  U h = 0;
  for (Index i = 0; i < n; ++i) {
    U u;
    std::memcpy(&u, x + i, sizeof u);
    h += u ^ (U(i) * mix);
  }
  return h;
}

constexpr std::uint64_t hash_basis = fnv1a_basis;
constexpr std::uint64_t hash_step(std::uint64_t h, std::uint64_t column) { return fnv1a_step(h, column); }

/// The scales of one column of a tile: W's row scales along the view's rows (from i0), or one scale per
/// view column (repeated into `buffer`).
template <class S>
const S* column_scales(const S* scale, bool per_view_column, Index i0, Index j, Index mb, std::vector<S>& buffer) {
  if (scale == nullptr) return nullptr;
  if (!per_view_column) return scale + i0;
  buffer.assign(std::size_t(mb), scale[j]);
  return buffer.data();
}

/// Dispatches a column kernel on the pair of steps.
template <class F>
void with_pair(Pair p, F&& f) {
  switch (p) {
    case add_sub: f(std::integral_constant<int, add_sub>()); break;
    case sub_add: f(std::integral_constant<int, sub_add>()); break;
    case add_scale_sub: f(std::integral_constant<int, add_scale_sub>()); break;
    case scale_divide: f(std::integral_constant<int, scale_divide>()); break;
  }
}

/// Applies the backward step in place to the tile of the view at (i0, j0), mb x nb, held at `tile` with
/// outer stride `ld` (in W, or a copy): moved by the codes (outer stride `ldc`) and the elements kept
/// exactly, W0 bit for bit; with `codes` null, the ordinary formula.
template <class S>
void backward_tile(const TileUpdate<S>& u, Pair pair, S* tile, Index ld, Index i0, Index j0, Index mb, Index nb,
                   const std::int8_t* codes, Index ldc, const std::vector<std::pair<std::uint32_t, S>>* kept) {
  const bool per_col = u.scale_columns != u.transposed;
  MatrixX<S> D;
  if (u.rank > 0) tile_delta(u, i0, j0, mb, nb, D);
  std::vector<S> buffer;
  for (Index jj = 0; jj < nb; ++jj) {
    S* w = tile + jj * ld;
    const S* d = u.rank > 0 ? D.data() + jj * mb : nullptr;
    const S* scale = column_scales(u.backward_scale, per_col, i0, j0 + jj, mb, buffer);
    with_pair(pair, [&](auto P) {
      if (codes)
        unmerge_column<S, decltype(P)::value, true>(w, d, scale, codes + jj * ldc, mb);
      else
        unmerge_column<S, decltype(P)::value, false>(w, d, scale, nullptr, mb);
    });
  }
  if (codes && kept)
    for (const auto& [at, value] : *kept) tile[(Index(at) / mb) * ld + Index(at) % mb] = value;
}

/// backward_tile() on tile t of W, from the record (null: the ordinary formula).
template <class S>
void backward_tile(const TileUpdate<S>& u, Pair pair, kernels::View<S> W, const Tiling& g, Index t,
                   const RestoreRecord<S>* rec) {
  const Index i0 = g.i0(t), j0 = g.j0(t);
  backward_tile(u, pair, W.data() + j0 * W.outerStride() + i0, W.outerStride(), i0, j0, g.mb(t), g.nb(t),
                rec ? rec->codes.data() + j0 * g.inner + i0 : nullptr, g.inner,
                rec ? &rec->exact[std::size_t(t)] : nullptr);
}

/// Applies the forward step in place to a tile (as exact_merge() does, without keeping a record): a tile
/// restored from its record gets its merged values back, bit for bit.
template <class S>
void forward_tile(const TileUpdate<S>& u, Pair pair, S* tile, Index ld, Index i0, Index j0, Index mb, Index nb) {
  const bool per_col = u.scale_columns != u.transposed;
  MatrixX<S> D;
  if (u.rank > 0) tile_delta(u, i0, j0, mb, nb, D);
  std::vector<S> merged(static_cast<std::size_t>(mb)), gbuf, rbuf;
  std::vector<std::int8_t> codes(static_cast<std::size_t>(mb));
  for (Index jj = 0; jj < nb; ++jj) {
    S* w = tile + jj * ld;
    const S* d = u.rank > 0 ? D.data() + jj * mb : nullptr;
    const S* gs = column_scales(u.forward_scale, per_col, i0, j0 + jj, mb, gbuf);
    const S* rs = column_scales(u.backward_scale, per_col, i0, j0 + jj, mb, rbuf);
    Bits<S> hash = 0, bad = 0;
    with_pair(pair, [&](auto P) {
      merge_column<S, decltype(P)::value>(w, d, gs, rs, mb, merged.data(), codes.data(), hash, bad);
    });
    std::copy(merged.begin(), merged.end(), w);
  }
}

template <class S>
[[noreturn]] PEFT_COLD void raise_not_finite(const Where& where, const TileUpdate<S>& u, const S* values, Index ld,
                                             Index i0, Index j0, Index mb, Index nb, const char* what) {
  for (Index c = 0; c < nb; ++c)
    for (Index r = 0; r < mb; ++r)
      if (!std::isfinite(values[c * ld + r])) {
        const Index vi = i0 + r, vj = j0 + c;  // the view's (row, column)
        const Index i = u.transposed ? vj : vi, k = u.transposed ? vi : vj;
        raise<NumericalError>(where, "W(", i, ",", k, ") would become ", values[c * ld + r], "; ", what);
      }
  raise<NumericalError>(where, "a value would not be finite; ", what);
}

}  // namespace exact

/// \brief Applies u.forward to W = op(view) and records what exact_unmerge() needs to give W back bit for
/// bit (the record is replaced). Strong guarantee: if a value would not be finite, the tiles already
/// written are restored exactly, the record is cleared, and NumericalError names the element.
template <class S>
PEFT_NOINLINE void exact_merge(const Where& where, kernels::View<S> W, const TileUpdate<S>& u, RestoreRecord<S>& rec) {
  using namespace exact;
  const Pair pair = pair_of(where, u.forward, u.backward);
  const Tiling g = tiling(W.rows(), W.cols());
  const bool per_col = u.scale_columns != u.transposed;
  RestoreRecord<S> r;  // allocated whole before W is written
  r.inner = g.inner;
  r.outer = g.outer;
  r.tile_rows = g.rows;
  r.tile_cols = g.cols;
  r.codes.resize(std::size_t(W.size()));
  r.hashes.resize(std::size_t(g.count()));
  r.exact.resize(std::size_t(g.count()));
  std::vector<char> written(std::size_t(g.count()), 0);
  try {
    for_each_tile(g.count(), [&](Index t) {
      const Index i0 = g.i0(t), j0 = g.j0(t), mb = g.mb(t), nb = g.nb(t);
      MatrixX<S> D;
      if (u.rank > 0) tile_delta(u, i0, j0, mb, nb, D);
      std::vector<S> merged(static_cast<std::size_t>(mb)), gbuf, rbuf;
      auto& kept = r.exact[std::size_t(t)];
      std::uint64_t h = hash_basis;
      Bits<S> bad = 0;
      for (Index jj = 0; jj < nb; ++jj) {
        S* w = W.data() + (j0 + jj) * W.outerStride() + i0;
        std::int8_t* codes = r.codes.data() + (j0 + jj) * g.inner + i0;
        const S* d = u.rank > 0 ? D.data() + jj * mb : nullptr;
        const S* gs = column_scales(u.forward_scale, per_col, i0, j0 + jj, mb, gbuf);
        const S* rs = column_scales(u.backward_scale, per_col, i0, j0 + jj, mb, rbuf);
        Bits<S> column_hash = 0, column_bad = 0, missed = 0;
        with_pair(pair, [&](auto P) {
          missed = merge_column<S, decltype(P)::value>(w, d, gs, rs, mb, merged.data(), codes, column_hash, column_bad);
        });
        h = hash_step(h, column_hash);
        bad |= column_bad;
        if (missed != 0)  // W0 of the elements kept exactly, before the column is overwritten
          for (Index i = 0; i < mb; ++i)
            if (codes[i] == kept_exactly) kept.emplace_back(std::uint32_t(jj * mb + i), w[i]);
        std::copy(merged.begin(), merged.end(), w);
      }
      written[std::size_t(t)] = 1;  // even if not finite: the rollback restores this tile too
      if (bad != 0)
        raise_not_finite(where, u, W.data() + j0 * W.outerStride() + i0, W.outerStride(), i0, j0, mb, nb,
                         "W is left untouched");
      r.hashes[std::size_t(t)] = h;
    });
  } catch (...) {
    for (Index t = 0; t < g.count(); ++t)  // roll back exactly: the codes of every written tile are complete
      if (written[std::size_t(t)]) backward_tile<S>(u, pair, W, g, t, &r);
    rec.clear();
    throw;
  }
  rec = std::move(r);
}

/// \brief Applies u.backward to W = op(view), giving back, bit for bit, the W that exact_merge() recorded
/// in `rec` (u must describe the same change). A tile written since the merge (its hash differs) gets
/// the ordinary u.backward instead. One pass over W, tile by tile. Strong guarantee: if a value of such a
/// tile would not be finite, every tile is put back as it was (the restored ones merged again, which
/// gives their merged values bit for bit; the written ones copied back) and NumericalError names it.
/// \returns whether every tile was restored exactly
/// \throws ShapeError if the record is not one of W's shape
template <class S>
PEFT_NOINLINE bool exact_unmerge(const Where& where, kernels::View<S> W, const TileUpdate<S>& u,
                                 const RestoreRecord<S>& rec) {
  using namespace exact;
  if (rec.inner != W.rows() || rec.outer != W.cols())
    raise<ShapeError>(where, "the restore record is for a ", rec.inner, "x", rec.outer, " view, W's is ", W.rows(), "x",
                      W.cols());
  const Pair pair = pair_of(where, u.forward, u.backward);
  const Tiling g(rec.inner, rec.outer, rec.tile_rows, rec.tile_cols);
  enum : char { untouched, restored, overwritten };
  std::vector<char> state(std::size_t(g.count()), untouched);
  std::vector<MatrixX<S>> written(std::size_t(g.count()));  // what was in a tile written since the merge
  try {
    for_each_tile(g.count(), [&](Index t) {
      const Index i0 = g.i0(t), j0 = g.j0(t), mb = g.mb(t), nb = g.nb(t);
      S* tile = W.data() + j0 * W.outerStride() + i0;
      std::uint64_t h = hash_basis;
      for (Index jj = 0; jj < nb; ++jj) h = hash_step(h, hash_column(tile + jj * W.outerStride(), mb));
      if (h == rec.hashes[std::size_t(t)]) {
        backward_tile<S>(u, pair, W, g, t, &rec);
        state[std::size_t(t)] = restored;
        return;
      }
      // Written since the merge: the ordinary formula, computed on a copy and checked first.
      MatrixX<S> before = W.block(i0, j0, mb, nb);
      MatrixX<S> P = before;
      backward_tile<S>(u, pair, P.data(), mb, i0, j0, mb, nb, nullptr, 0, nullptr);
      if (!P.allFinite())
        raise_not_finite(where, u, P.data(), mb, i0, j0, mb, nb, "W (written since the merge) is left untouched");
      written[std::size_t(t)].swap(before);
      W.block(i0, j0, mb, nb) = P;
      state[std::size_t(t)] = overwritten;
    });
  } catch (...) {
    for_each_tile(g.count(), [&](Index t) {  // put every tile back as it was
      const Index i0 = g.i0(t), j0 = g.j0(t), mb = g.mb(t), nb = g.nb(t);
      if (state[std::size_t(t)] == overwritten) W.block(i0, j0, mb, nb) = written[std::size_t(t)];
      if (state[std::size_t(t)] == restored)
        forward_tile<S>(u, pair, W.data() + j0 * W.outerStride() + i0, W.outerStride(), i0, j0, mb, nb);
    });
    throw;
  }
  for (char c : state)
    if (c != restored) return false;
  return true;
}

#ifdef PEFT_COMPILED
extern template void exact_merge<float>(const Where&, kernels::View<float>, const TileUpdate<float>&,
                                        RestoreRecord<float>&);
extern template void exact_merge<double>(const Where&, kernels::View<double>, const TileUpdate<double>&,
                                         RestoreRecord<double>&);
extern template bool exact_unmerge<float>(const Where&, kernels::View<float>, const TileUpdate<float>&,
                                          const RestoreRecord<float>&);
extern template bool exact_unmerge<double>(const Where&, kernels::View<double>, const TileUpdate<double>&,
                                           const RestoreRecord<double>&);
#endif

/// \brief The TileUpdate of a low-rank change of W (a writable dense matrix, map or block, either storage
/// order): D = s B A, with optional row scales for each direction. \returns the view and the update
template <class WType, class BType, class AType, class S>
std::pair<kernels::View<S>, TileUpdate<S>> low_rank_tiles(WType&& W, S s, const Eigen::MatrixBase<BType>& B,
                                                          const Eigen::MatrixBase<AType>& A, TileOp forward,
                                                          TileOp backward, const S* forward_scale = nullptr,
                                                          const S* backward_scale = nullptr) {
  const auto [view, transposed] = destination(W);
  const auto b = operand(B), a = operand(A);
  eigen_assert(!b.transposed && !a.transposed);  // the factors are column-major
  TileUpdate<S> u;
  u.transposed = transposed;
  u.forward = forward;
  u.backward = backward;
  u.s = s;
  u.B = b.view.data();
  u.ldb = b.view.outerStride();
  u.A = a.view.data();
  u.lda = a.view.outerStride();
  u.rank = a.view.rows();
  u.forward_scale = forward_scale;
  u.backward_scale = backward_scale;
  return {view, u};
}

/// \brief The TileUpdate of a scaling of W's rows (or, with `columns`, of its columns) by d: forward
/// multiplies, backward divides.
template <class WType, class S>
std::pair<kernels::View<S>, TileUpdate<S>> scaling_tiles(WType&& W, const S* d, bool columns) {
  const auto [view, transposed] = destination(W);
  TileUpdate<S> u;
  u.transposed = transposed;
  u.forward = TileOp::scale;
  u.backward = TileOp::divide;
  u.forward_scale = d;
  u.backward_scale = d;
  u.scale_columns = columns;
  return {view, u};
}

}  // namespace detail
}  // namespace peft
