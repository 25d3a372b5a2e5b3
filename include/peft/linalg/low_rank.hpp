#pragma once
/// \file low_rank.hpp
/// \brief Checked in-place low-rank updates of a weight, with the strong guarantee (nothing is written
/// unless every new value is finite): `W <- W + s B A` (the merges and unmerges of LoRA and PiSSA) and
/// the row-scaled `W <- diag(d) (W + s B A)` and `W <- diag(d) W + s B A` (DoRA's merge and unmerge).
/// docs/math.md, LoRA and DoRA, gives the bounds these checks rely on.
///
/// Every product goes through Eigen's GEMM with the scalar folded in and `noalias()`. Nothing here
/// allocates a d_out x d_in matrix: the exact check works in scratch blocks of about 2 MiB.

#include "peft/core/error.hpp"
#include "peft/core/types.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

namespace peft {
namespace detail {

/// \brief The walk behind every checked update: W in blocks along its storage order (columns of a
/// column-major W, rows of a row-major one), `update(blk, j0, nb)` applied to each block of nb outer
/// slices starting at j0, in place.
///
/// With `check`, two passes: the first applies `update` to a scratch copy of each block (about
/// `block_elems` elements, never d_out x d_in) and checks it for finiteness; only if every block passes
/// does the second apply the same update (same kernels, so the same values) to W itself. Memory traffic:
/// one read of W, then one read and one write. Without `check`, only the writing pass: the caller has
/// shown that every value is finite.
/// \throws NumericalError naming the first non-finite entry; W is then untouched
template <class WType, class Update>
void blocked_update(const Where& where, WType&& W, Update&& update, bool check, Index block_elems = Index(1) << 19) {
  using W_t = std::decay_t<WType>;
  constexpr bool row_major = W_t::IsRowMajor;
  const Index outer = row_major ? W.rows() : W.cols();
  const Index inner = row_major ? W.cols() : W.rows();
  const Index block = std::max<Index>(1, block_elems / std::max<Index>(inner, 1));
  const auto slices = [&](auto&& M, Index j0, Index nb) {
    if constexpr (row_major)
      return M.middleRows(j0, nb);
    else
      return M.middleCols(j0, nb);
  };
  if (check) {
    typename W_t::PlainObject scratch;  // W's storage order, so both passes run the same kernels
    for (Index j0 = 0; j0 < outer; j0 += block) {
      const Index nb = std::min(block, outer - j0);
      scratch = slices(W, j0, nb);
      update(scratch, j0, nb);
      if (scratch.allFinite()) continue;
      for (Index c = 0; c < scratch.cols(); ++c)
        for (Index r = 0; r < scratch.rows(); ++r)
          if (!std::isfinite(scratch(r, c))) {
            const Index i = row_major ? j0 + r : r;
            const Index k = row_major ? c : j0 + c;
            raise<NumericalError>(where, "W(", i, ",", k, ") would become ", scratch(r, c), " (W is ", W(i, k),
                                  "); W is left untouched");
          }
    }
  }
  for (Index j0 = 0; j0 < outer; j0 += block) {
    const Index nb = std::min(block, outer - j0);
    update(slices(W, j0, nb), j0, nb);
  }
}

/// \brief One block of `W + s B A`'s update: the rows of B (row-major W) or columns of A (column-major
/// W) that match the block [j0, j0 + nb) of outer slices.
template <bool RowMajor, class Blk, class Scalar, class BType, class AType>
void add_low_rank_block(Blk&& blk, Index j0, Index nb, Scalar s, const Eigen::MatrixBase<BType>& B,
                        const Eigen::MatrixBase<AType>& A) {
  if constexpr (RowMajor)
    blk.noalias() += s * B.middleRows(j0, nb) * A;
  else
    blk.noalias() += s * B * A.middleCols(j0, nb);
}

/// \brief W <- W + s B A with every new value computed and checked before anything is written (the
/// exact path of add_low_rank_checked()).
/// \throws NumericalError naming the first non-finite entry; W is then untouched
template <class WType, class Scalar, class BType, class AType>
void add_low_rank_checked_exact(const Where& where, WType&& W, Scalar s, const Eigen::MatrixBase<BType>& B,
                                const Eigen::MatrixBase<AType>& A, Index block_elems = Index(1) << 19) {
  constexpr bool row_major = std::decay_t<WType>::IsRowMajor;
  blocked_update(
      where, W, [&](auto&& blk, Index j0, Index nb) { add_low_rank_block<row_major>(blk, j0, nb, s, B, A); }, true,
      block_elems);
}

/// \brief The sufficient finiteness bound of an update: `m = max |W|` (one read of W; NaN propagates)
/// and `c = |s| max_i ||B_i,:||_1 max |A|`, which bounds every |(s B A)_ij|.
struct LowRankBound {
  double m;
  double c;
  /// \returns whether `bound` (a function of m and c), and both, are finite and at most max/2: then
  /// every value of the update is finite, rounding included.
  template <class Scalar>
  bool safe(double bound) const {
    const double limit = 0.5 * static_cast<double>(std::numeric_limits<Scalar>::max());
    return std::isfinite(m) && std::isfinite(c) && std::isfinite(bound) && bound <= limit;
  }
};

template <class WType, class Scalar, class BType, class AType>
LowRankBound low_rank_bound(const WType& W, Scalar s, const Eigen::MatrixBase<BType>& B,
                            const Eigen::MatrixBase<AType>& A) {
  const double m = static_cast<double>(W.cwiseAbs().template maxCoeff<Eigen::PropagateNaN>());
  const double c = std::abs(static_cast<double>(s)) *
                   static_cast<double>(B.cwiseAbs().rowwise().sum().template maxCoeff<Eigen::PropagateNaN>()) *
                   static_cast<double>(A.cwiseAbs().template maxCoeff<Eigen::PropagateNaN>());
  return {m, c};
}

/// \brief W <- W + s B A, in place, with the strong guarantee. Used by every merge and unmerge of LoRA
/// and PiSSA.
///
/// One read of W for the bound (low_rank_bound); when m + c <= max/2 every sum is finite and one GEMM
/// `W += s B A` reads and writes W once. Otherwise (non-finite entries, values near overflow) the exact
/// blocked check decides. Memory traffic on the fast path: one read, then one read and one write.
/// \throws NumericalError naming the first non-finite entry; W is then untouched
template <class WType, class Scalar, class BType, class AType>
void add_low_rank_checked(const Where& where, WType&& W, Scalar s, const Eigen::MatrixBase<BType>& B,
                          const Eigen::MatrixBase<AType>& A) {
  const LowRankBound bound = low_rank_bound(W, s, B, A);
  if (bound.safe<Scalar>(bound.m + bound.c)) {
    W.noalias() += s * B * A;
    return;
  }
  add_low_rank_checked_exact(where, W, s, B, A);
}

/// \brief The row-scaled update of DoRA's merge and unmerge, in place, with the strong guarantee:
///     ScaleFirst = false:  W <- diag(d) (W + s B A)     (merge: d = m / n)
///     ScaleFirst = true:   W <- diag(d) W + s B A       (unmerge: d = n / m, s negated)
/// in blocks along W's storage order, so each block is still in cache for its second operation.
/// `check` false skips the checking pass (the caller has shown every value is finite).
/// \throws NumericalError (check = true) naming the first non-finite entry; W is then untouched
template <bool ScaleFirst, class WType, class DType, class Scalar, class BType, class AType>
void scale_rows_add_low_rank_blocked(const Where& where, WType&& W, const Eigen::MatrixBase<DType>& d, Scalar s,
                                     const Eigen::MatrixBase<BType>& B, const Eigen::MatrixBase<AType>& A,
                                     bool check, Index block_elems = Index(1) << 19) {
  constexpr bool row_major = std::decay_t<WType>::IsRowMajor;
  const auto update = [&](auto&& blk, Index j0, Index nb) {
    const auto scale = [&] {
      if constexpr (row_major)
        blk.array().colwise() *= d.segment(j0, nb).array();
      else
        blk.array().colwise() *= d.array();
    };
    if (ScaleFirst) scale();
    add_low_rank_block<row_major>(blk, j0, nb, s, B, A);
    if (!ScaleFirst) scale();
  };
  blocked_update(where, W, update, check, block_elems);
}

/// \brief W <- diag(d) (W + s B A) (ScaleFirst = false) or W <- diag(d) W + s B A (ScaleFirst = true),
/// in place, with the strong guarantee. DoRA's merge and unmerge.
///
/// One read of W for the bound; with dm = max |d|, every intermediate and final value is finite when
/// the bound below is at most max/2 (low_rank_bound's m and c):
///     ScaleFirst = false:  max(m + c, dm (m + c));    ScaleFirst = true:  dm m + c.
/// Then one blocked pass reads and writes W once; otherwise the checked two-pass walk decides.
/// \throws NumericalError naming the first non-finite entry; W is then untouched
template <bool ScaleFirst, class WType, class DType, class Scalar, class BType, class AType>
void scale_rows_add_low_rank_checked(const Where& where, WType&& W, const Eigen::MatrixBase<DType>& d, Scalar s,
                                     const Eigen::MatrixBase<BType>& B, const Eigen::MatrixBase<AType>& A) {
  const LowRankBound b = low_rank_bound(W, s, B, A);
  const double dm = static_cast<double>(d.cwiseAbs().template maxCoeff<Eigen::PropagateNaN>());
  const double bound = ScaleFirst ? dm * b.m + b.c : std::max(b.m + b.c, dm * (b.m + b.c));
  const bool safe = std::isfinite(dm) && b.safe<Scalar>(bound);
  scale_rows_add_low_rank_blocked<ScaleFirst>(where, W, d, s, B, A, !safe);
}

}  // namespace detail
}  // namespace peft
