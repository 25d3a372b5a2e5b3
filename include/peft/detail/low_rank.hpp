#pragma once
/// \file low_rank.hpp
/// \brief Checked in-place low-rank updates of a weight, with the strong guarantee (nothing is written
/// unless every new value is finite): `W <- W + s B A` (the merges and unmerges of LoRA and PiSSA) and
/// the row-scaled `W <- diag(d) (W + s B A)` and `W <- diag(d) W + s B A` (DoRA's merge and unmerge).
/// docs/math.md, LoRA and DoRA, gives the bounds these checks rely on.
///
/// The work is done by functions of the scalar type alone, on a column-major view of W (a row-major W
/// is the transpose of a column-major one, kernels.hpp), so both storage orders share one instantiation
/// per scalar. Every product goes through the library's GEMM kernels. Nothing here allocates a
/// d_out x d_in matrix: the exact check works in scratch blocks of about 2 MiB.

#include "peft/detail/internal_header_check.hpp"

#include "peft/core/config.hpp"
#include "peft/core/error.hpp"
#include "peft/core/types.hpp"
#include "peft/detail/kernels.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

namespace peft {
namespace detail {

/// \brief A low-rank update of W = op(view), in place: `W <- diag(d) (W + s B A)`, `W <- diag(d) W + s B A`
/// or `W <- W + s B A`, on blocks of W along its storage order (the view's columns).
template <class S>
struct LowRankUpdate {
  enum class Scaling { none, after, before };
  bool transposed;                 ///< W = viewᵀ (a row-major W)
  S s;
  kernels::ConstView<S> B, A;      ///< d_out x r, r x d_in
  const S* d;                      ///< d_out row scales (Scaling != none)
  Scaling scaling;

  /// Applies the update to the block of W's outer slices [j0, j0 + nb) held in blk (the view's
  /// columns j0 .. j0 + nb, or a scratch copy of them).
  void operator()(kernels::View<S> blk, Index j0, Index nb) const {
    if (scaling == Scaling::before) scale(blk, j0, nb);
    if (transposed)  // blk = (rows j0.. of W)ᵀ: += s (B_rows A)ᵀ = s Aᵀ B_rowsᵀ
      kernels::gemm<S>(blk, {A, true}, {kernels::ConstView<S>(B.data() + j0, nb, B.cols(), Eigen::OuterStride<>(B.outerStride())), true},
                       s, true);
    else  // blk = columns j0.. of W: += s B A_cols
      kernels::gemm<S>(blk, {B, false},
                       {kernels::ConstView<S>(A.data() + j0 * A.outerStride(), A.rows(), nb, Eigen::OuterStride<>(A.outerStride())), false},
                       s, true);
    if (scaling == Scaling::after) scale(blk, j0, nb);
  }

 private:
  void scale(kernels::View<S> blk, Index j0, Index nb) const {
    if (transposed)  // W's rows j0.. are blk's columns
      blk.array().rowwise() *= Eigen::Map<const Eigen::Array<S, 1, Eigen::Dynamic>>(d + j0, nb);
    else
      blk.array().colwise() *= Eigen::Map<const Eigen::Array<S, Eigen::Dynamic, 1>>(d, blk.rows());
  }
};

/// \brief The walk behind every checked update: W = op(view) in blocks along its storage order (the
/// view's columns), `update` applied to each block of nb outer slices starting at j0, in place.
///
/// With `check`, two passes: the first applies `update` to a scratch copy of each block (about
/// `block_elems` elements, never d_out x d_in) and checks it for finiteness; only if every block passes
/// does the second apply the same update (same kernels, so the same values) to W itself. Memory traffic:
/// one read of W, then one read and one write. Without `check`, only the writing pass: the caller has
/// shown that every value is finite.
/// \throws NumericalError naming the first non-finite entry; W is then untouched
template <class S>
PEFT_NOINLINE void blocked_update(const Where& where, kernels::View<S> W, const LowRankUpdate<S>& update, bool check,
                    Index block_elems = Index(1) << 19) {
  const Index outer = W.cols(), inner = W.rows();
  const Index block = std::max<Index>(1, block_elems / std::max<Index>(inner, 1));
  const auto slices = [&](Index j0, Index nb) {
    return kernels::View<S>(W.data() + j0 * W.outerStride(), inner, nb, Eigen::OuterStride<>(W.outerStride()));
  };
  if (check) {
    MatrixX<S> scratch;
    for (Index j0 = 0; j0 < outer; j0 += block) {
      const Index nb = std::min(block, outer - j0);
      scratch = slices(j0, nb);
      update(kernels::view(scratch), j0, nb);
      if (scratch.allFinite()) continue;
      for (Index c = 0; c < scratch.cols(); ++c)
        for (Index r = 0; r < scratch.rows(); ++r)
          if (!std::isfinite(scratch(r, c))) {
            const Index i = update.transposed ? j0 + c : r;
            const Index k = update.transposed ? r : j0 + c;
            const S before = update.transposed ? W(k, i) : W(i, k);
            raise<NumericalError>(where, "W(", i, ",", k, ") would become ", scratch(r, c), " (W is ", before,
                                  "); W is left untouched");
          }
    }
  }
  for (Index j0 = 0; j0 < outer; j0 += block) {
    const Index nb = std::min(block, outer - j0);
    update(slices(j0, nb), j0, nb);
  }
}

/// \brief The sufficient finiteness bound of an update: `m = max |W|` (one read of W; NaN propagates)
/// and `c = |s| max_i ||B_i,:||_1 max |A|`, which bounds every |(s B A)_ij|.
struct LowRankBound {
  double m;
  double c;
  /// \returns whether `bound` (a function of m and c), and both, are finite and at most max/2: then
  /// every value of the update is finite, rounding included.
  template <class S>
  bool safe(double bound) const {
    const double limit = 0.5 * static_cast<double>(std::numeric_limits<S>::max());
    return std::isfinite(m) && std::isfinite(c) && std::isfinite(bound) && bound <= limit;
  }
};

template <class S>
LowRankBound low_rank_bound(const kernels::View<S>& W, const LowRankUpdate<S>& u) {
  const double m = static_cast<double>(W.cwiseAbs().template maxCoeff<Eigen::PropagateNaN>());
  const double c = std::abs(static_cast<double>(u.s)) *
                   static_cast<double>(u.B.cwiseAbs().rowwise().sum().template maxCoeff<Eigen::PropagateNaN>()) *
                   static_cast<double>(u.A.cwiseAbs().template maxCoeff<Eigen::PropagateNaN>());
  return {m, c};
}

/// \brief Applies a checked low-rank update to W = op(view), in place, with the strong guarantee.
///
/// One read of W for the bound (low_rank_bound): with dm = max |d| (1 without scaling), every value is
/// finite, rounding included, when this is at most max/2:
///     none:    m + c        (then one GEMM W += s B A reads and writes W once)
///     after:   max(m + c, dm (m + c))     before:  dm m + c   (one blocked pass, W read and written once)
/// Otherwise (non-finite entries, values near overflow) the checked two-pass walk decides.
/// \throws NumericalError naming the first non-finite entry; W is then untouched
template <class S>
PEFT_NOINLINE void checked_update(const Where& where, kernels::View<S> W, const LowRankUpdate<S>& u) {
  using Scaling = typename LowRankUpdate<S>::Scaling;
  const LowRankBound b = low_rank_bound(W, u);
  double dm = 1.0;
  if (u.scaling != Scaling::none)
    dm = static_cast<double>(Eigen::Map<const VectorX<S>>(u.d, u.transposed ? W.cols() : W.rows())
                                 .cwiseAbs()
                                 .template maxCoeff<Eigen::PropagateNaN>());
  const double bound = u.scaling == Scaling::before  ? dm * b.m + b.c
                       : u.scaling == Scaling::after ? std::max(b.m + b.c, dm * (b.m + b.c))
                                                     : b.m + b.c;
  const bool safe = std::isfinite(dm) && b.safe<S>(bound);
  if (safe && u.scaling == Scaling::none) {  // one GEMM over the whole of W
    u(W, 0, W.cols());
    return;
  }
  blocked_update(where, W, u, !safe);
}

/// \brief The update of W (a writable dense matrix, map or block, either storage order) by s B A with
/// row scales d (null without scaling).
template <class WType, class BType, class AType, class S>
std::pair<kernels::View<S>, LowRankUpdate<S>> low_rank_update(WType&& W, S s, const Eigen::MatrixBase<BType>& B,
                                                              const Eigen::MatrixBase<AType>& A, const S* d,
                                                              typename LowRankUpdate<S>::Scaling scaling) {
  const auto [view, transposed] = destination(W);
  const auto b = operand(B), a = operand(A);
  eigen_assert(!b.transposed && !a.transposed);  // the factors are column-major
  return {view, LowRankUpdate<S>{transposed, s, b.view, a.view, d, scaling}};
}

/// \brief W <- W + s B A, in place, with the strong guarantee. Used by every merge and unmerge of LoRA
/// and PiSSA. Memory traffic on the fast path: one read of W, then one read and one write (one GEMM).
/// \throws NumericalError naming the first non-finite entry; W is then untouched
template <class WType, class S, class BType, class AType>
void add_low_rank_checked(const Where& where, WType&& W, S s, const Eigen::MatrixBase<BType>& B,
                          const Eigen::MatrixBase<AType>& A) {
  const auto [view, u] = low_rank_update(W, s, B, A, static_cast<const S*>(nullptr), LowRankUpdate<S>::Scaling::none);
  checked_update<S>(where, view, u);
}

/// \brief W <- W + s B A with every new value computed and checked before anything is written, whatever
/// the bound says (the exact path of add_low_rank_checked()), in blocks of `block_elems` elements.
template <class WType, class S, class BType, class AType>
void add_low_rank_checked_exact(const Where& where, WType&& W, S s, const Eigen::MatrixBase<BType>& B,
                                const Eigen::MatrixBase<AType>& A, Index block_elems = Index(1) << 19) {
  const auto [view, u] = low_rank_update(W, s, B, A, static_cast<const S*>(nullptr), LowRankUpdate<S>::Scaling::none);
  blocked_update<S>(where, view, u, true, block_elems);
}

/// \brief The row-scaled update of DoRA's merge and unmerge, in place, with the strong guarantee:
///     ScaleFirst = false:  W <- diag(d) (W + s B A)     (merge: d = m / n)
///     ScaleFirst = true:   W <- diag(d) W + s B A       (unmerge: d = n / m, s negated)
/// in blocks along W's storage order, so each block is still in cache for its second operation.
/// \throws NumericalError naming the first non-finite entry; W is then untouched
template <bool ScaleFirst, class WType, class DType, class S, class BType, class AType>
void scale_rows_add_low_rank_checked(const Where& where, WType&& W, const Eigen::MatrixBase<DType>& d, S s,
                                     const Eigen::MatrixBase<BType>& B, const Eigen::MatrixBase<AType>& A) {
  const VectorX<S> scales = d;  // d_out values, contiguous
  using Scaling = typename LowRankUpdate<S>::Scaling;
  const auto [view, u] = low_rank_update(W, s, B, A, scales.data(), ScaleFirst ? Scaling::before : Scaling::after);
  checked_update<S>(where, view, u);
}

/// \brief scale_rows_add_low_rank_checked with the check forced (`check` true) or skipped, in blocks of
/// `block_elems` elements (the tests use it to walk several blocks).
template <bool ScaleFirst, class WType, class DType, class S, class BType, class AType>
void scale_rows_add_low_rank_blocked(const Where& where, WType&& W, const Eigen::MatrixBase<DType>& d, S s,
                                     const Eigen::MatrixBase<BType>& B, const Eigen::MatrixBase<AType>& A, bool check,
                                     Index block_elems = Index(1) << 19) {
  const VectorX<S> scales = d;
  using Scaling = typename LowRankUpdate<S>::Scaling;
  const auto [view, u] = low_rank_update(W, s, B, A, scales.data(), ScaleFirst ? Scaling::before : Scaling::after);
  blocked_update<S>(where, view, u, check, block_elems);
}

}  // namespace detail
}  // namespace peft
