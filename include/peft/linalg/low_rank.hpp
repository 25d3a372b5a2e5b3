#pragma once
/// \file low_rank.hpp
/// \brief The low-rank kernels shared by the LoRA family (LoRA, DoRA, PiSSA): the adapter branch's
/// forward and backward (MATH.md, LoRA section), dropout on that branch, and the checked in-place
/// update W <- W + s B A used by merge and unmerge.
///
/// Every product goes through Eigen's GEMM with the scalar folded in and `noalias()`; nothing here
/// allocates a d_out x d_in matrix.

#include "peft/core/error.hpp"
#include "peft/core/random.hpp"
#include "peft/core/types.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

namespace peft {
namespace detail {

/// \brief What the low-rank branch's backward needs from its training forward. Buffers are reused
/// from call to call (no allocation once the shapes are stable).
template <class Scalar>
struct LowRankCache {
  MatrixX<Scalar> X;     ///< D(X): the input after dropout (a copy of X when p = 0), d_in x N
  MatrixX<Scalar> mask;  ///< p > 0: the dropout mask scaled by 1/(1-p), d_in x N; empty when p = 0
  MatrixX<Scalar> H;     ///< A D(X), r x N
  MatrixX<Scalar> U;     ///< backward scratch: B^T G, r x N
  MatrixX<Scalar> T;     ///< backward scratch with dropout: A^T U, d_in x N
};

/// \brief Refuses (StateError) a cache whose buffers do not fit rank r and a d_in x N input: one
/// filled by another adapter that lived at the same address, or edited by hand.
template <class Scalar>
void check_low_rank_cache(const Where& where, const LowRankCache<Scalar>& cache, Index r, Index d_in, Index tokens) {
  const bool dropout = cache.mask.size() != 0;
  if (cache.H.rows() != r || cache.H.cols() != tokens || cache.X.rows() != d_in || cache.X.cols() != tokens ||
      (dropout && (cache.mask.rows() != d_in || cache.mask.cols() != tokens)))
    raise<StateError>(where, "the cache does not fit this adapter (rank ", r, ", d_in ", d_in, ", N ", tokens,
                      "); fill it with this adapter's forward(X, cache)");
}

/// \brief Training forward of the branch: draws the dropout mask (p > 0), stores D(X) and H = A D(X)
/// in the cache, and adds s B H to Y.
template <class Scalar, class AType, class BType>
void low_rank_forward_train(const Eigen::MatrixBase<AType>& A, const Eigen::MatrixBase<BType>& B, Scalar s,
                            double p, Rng& rng, const Eigen::Ref<const MatrixX<Scalar>>& X,
                            LowRankCache<Scalar>& cache, MatrixX<Scalar>& Y) {
  if (p > 0.0) {
    cache.mask.resize(X.rows(), X.cols());
    const Scalar keep_scale = static_cast<Scalar>(1.0 / (1.0 - p));
    Scalar* m = cache.mask.data();
    for (Index i = 0, n = cache.mask.size(); i < n; ++i) m[i] = rng.uniform() < p ? Scalar(0) : keep_scale;
    cache.X.resize(X.rows(), X.cols());
    cache.X.array() = X.array() * cache.mask.array();
  } else {
    cache.mask.resize(0, 0);
    cache.X = X;
  }
  cache.H.resize(A.rows(), X.cols());
  cache.H.noalias() = A * cache.X;
  Y.noalias() += s * B * cache.H;
}

/// \brief Inference forward of the branch (no dropout): Y += s B (A X). Allocates only H (r x N).
template <class Scalar, class AType, class BType>
void low_rank_forward(const Eigen::MatrixBase<AType>& A, const Eigen::MatrixBase<BType>& B, Scalar s,
                      const Eigen::Ref<const MatrixX<Scalar>>& X, MatrixX<Scalar>& Y) {
  MatrixX<Scalar> H(A.rows(), X.cols());
  H.noalias() = A * X;
  Y.noalias() += s * B * H;
}

/// \brief Backward of the branch with upstream gradient G (d_out x N):
///     U = B^T G,  dB += s G H^T,  dA += s U D(X)^T,  dX += s D'(A^T U).
template <class Scalar, class AType, class BType, class GType, class dAType, class dBType>
void low_rank_backward(const Eigen::MatrixBase<AType>& A, const Eigen::MatrixBase<BType>& B, Scalar s,
                       const Eigen::MatrixBase<GType>& G, LowRankCache<Scalar>& cache,
                       Eigen::MatrixBase<dAType>& dA, Eigen::MatrixBase<dBType>& dB, MatrixX<Scalar>& dX) {
  cache.U.resize(B.cols(), G.cols());
  cache.U.noalias() = B.transpose() * G;
  dB.noalias() += s * G * cache.H.transpose();
  dA.noalias() += s * cache.U * cache.X.transpose();
  if (cache.mask.size() == 0) {
    dX.noalias() += s * A.transpose() * cache.U;
  } else {
    cache.T.resize(A.cols(), G.cols());
    cache.T.noalias() = A.transpose() * cache.U;
    dX.array() += s * cache.T.array() * cache.mask.array();
  }
}

/// \brief W <- W + s B A with the strong guarantee, the exact way: every new value is computed and
/// checked for finiteness before anything is written. The fallback of add_low_rank_checked().
///
/// Two passes over W in blocks along its storage order (columns of a column-major W, rows of a
/// row-major one): the first computes each block of W + s B A into a small scratch (about 2 MiB, never
/// d_out x d_in) and checks it; the second computes the same blocks with the same operations, so the
/// same values, and writes them. Memory traffic: one read of W, then one read and one write.
/// \param block_elems the scratch's size in elements (rounded to whole columns or rows)
/// \throws NumericalError naming the first non-finite entry; W is then untouched
template <class WType, class Scalar, class BType, class AType>
void add_low_rank_checked_exact(const Where& where, WType&& W, Scalar s, const Eigen::MatrixBase<BType>& B,
                          const Eigen::MatrixBase<AType>& A, Index block_elems = Index(1) << 19) {
  using W_t = std::decay_t<WType>;
  constexpr bool row_major = W_t::IsRowMajor;
  const Index outer = row_major ? W.rows() : W.cols();
  const Index inner = row_major ? W.cols() : W.rows();
  const Index block = std::max<Index>(1, block_elems / std::max<Index>(inner, 1));
  typename W_t::PlainObject scratch;  // W's storage order, so both passes run the same kernels
  for (Index j0 = 0; j0 < outer; j0 += block) {
    const Index nb = std::min(block, outer - j0);
    if constexpr (row_major) {
      scratch = W.middleRows(j0, nb);
      scratch.noalias() += s * B.middleRows(j0, nb) * A;
    } else {
      scratch = W.middleCols(j0, nb);
      scratch.noalias() += s * B * A.middleCols(j0, nb);
    }
    if (!scratch.allFinite()) {
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
    if constexpr (row_major)
      W.middleRows(j0, nb).noalias() += s * B.middleRows(j0, nb) * A;
    else
      W.middleCols(j0, nb).noalias() += s * B * A.middleCols(j0, nb);
  }
}

/// \brief W <- W + s B A, in place, with the strong guarantee: nothing is written unless every new
/// value is finite. Used by every merge and unmerge of the LoRA family.
///
/// First one read of W: its largest magnitude m (NaN-propagating). With the bound
/// |s B A|_ij <= |s| max_i ||B_i,:||_1 max |A| =: c, every W_ij + (s B A)_ij is finite (rounding
/// included) when m + c <= max/2; then one GEMM `W += s B A` reads and writes W once. Otherwise
/// (non-finite entries, or values near overflow) the exact check of add_low_rank_checked_exact()
/// decides. Memory traffic on the fast path: one read of W, then one read and one write.
/// \throws NumericalError naming the first non-finite entry; W is then untouched
template <class WType, class Scalar, class BType, class AType>
void add_low_rank_checked(const Where& where, WType&& W, Scalar s, const Eigen::MatrixBase<BType>& B,
                          const Eigen::MatrixBase<AType>& A) {
  const double m = static_cast<double>(W.cwiseAbs().template maxCoeff<Eigen::PropagateNaN>());
  const double c = std::abs(static_cast<double>(s)) *
                   static_cast<double>(B.cwiseAbs().rowwise().sum().template maxCoeff<Eigen::PropagateNaN>()) *
                   static_cast<double>(A.cwiseAbs().template maxCoeff<Eigen::PropagateNaN>());
  const double limit = 0.5 * static_cast<double>(std::numeric_limits<Scalar>::max());
  if (std::isfinite(m) && std::isfinite(c) && m + c <= limit) {
    W.noalias() += s * B * A;
    return;
  }
  add_low_rank_checked_exact(where, W, s, B, A);
}

/// \brief One outer block of a row-scaled low-rank update, in place on `blk` (a block of W or a
/// scratch copy of it): `blk <- diag(d) (blk + s B A)` (ScaleFirst = false) or
/// `blk <- diag(d) blk + s B A` (ScaleFirst = true). `d`, `B` and `A` are the parts matching the block.
template <bool ScaleFirst, class Blk, class DType, class Scalar, class BType, class AType>
void scale_rows_add_low_rank_block(Blk&& blk, const Eigen::MatrixBase<DType>& d, Scalar s,
                                   const Eigen::MatrixBase<BType>& B, const Eigen::MatrixBase<AType>& A) {
  if constexpr (ScaleFirst) {
    blk.array().colwise() *= d.array();
    blk.noalias() += s * B * A;
  } else {
    blk.noalias() += s * B * A;
    blk.array().colwise() *= d.array();
  }
}

/// \brief The row-scaled update of DoRA's merge and unmerge, in place, with the strong guarantee:
///     ScaleFirst = false:  W <- diag(d) (W + s B A)     (merge: d = m / n)
///     ScaleFirst = true:   W <- diag(d) W + s B A       (unmerge: d = n / m, s negated)
/// Blocks along W's storage order as add_low_rank_checked_exact(), so each block is still in cache
/// for its second operation and nothing of size d_out x d_in is allocated.
///
/// With `check` true, two passes: the first computes every block into a scratch (about 2 MiB) and
/// checks it for finiteness, the second computes the same blocks with the same operations (so the
/// same values) and writes them. With `check` false, only the writing pass: the caller has shown
/// that every value is finite.
/// \throws NumericalError (check = true) naming the first non-finite entry; W is then untouched
template <bool ScaleFirst, class WType, class DType, class Scalar, class BType, class AType>
void scale_rows_add_low_rank_blocked(const Where& where, WType&& W, const Eigen::MatrixBase<DType>& d, Scalar s,
                                     const Eigen::MatrixBase<BType>& B, const Eigen::MatrixBase<AType>& A,
                                     bool check, Index block_elems = Index(1) << 19) {
  using W_t = std::decay_t<WType>;
  constexpr bool row_major = W_t::IsRowMajor;
  const Index outer = row_major ? W.rows() : W.cols();
  const Index inner = row_major ? W.cols() : W.rows();
  const Index block = std::max<Index>(1, block_elems / std::max<Index>(inner, 1));
  const auto update = [&](auto&& blk, Index j0, Index nb) {
    if constexpr (row_major)
      scale_rows_add_low_rank_block<ScaleFirst>(blk, d.segment(j0, nb), s, B.middleRows(j0, nb), A);
    else
      scale_rows_add_low_rank_block<ScaleFirst>(blk, d, s, B, A.middleCols(j0, nb));
  };
  if (check) {
    typename W_t::PlainObject scratch;  // W's storage order, so both passes run the same kernels
    for (Index j0 = 0; j0 < outer; j0 += block) {
      const Index nb = std::min(block, outer - j0);
      if constexpr (row_major)
        scratch = W.middleRows(j0, nb);
      else
        scratch = W.middleCols(j0, nb);
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
    if constexpr (row_major)
      update(W.middleRows(j0, nb), j0, nb);
    else
      update(W.middleCols(j0, nb), j0, nb);
  }
}

/// \brief W <- diag(d) (W + s B A) (ScaleFirst = false) or W <- diag(d) W + s B A (ScaleFirst = true),
/// in place, with the strong guarantee: nothing is written unless every new value is finite. DoRA's
/// merge and unmerge.
///
/// First one read of W for its largest magnitude m (NaN-propagating). With c = |s| max_i ||B_i,:||_1
/// max |A| bounding |s B A| and dm = max |d|, every intermediate and final value is finite (rounding
/// included) when the bound below is at most max/2:
///     ScaleFirst = false:  max(m + c, dm (m + c));    ScaleFirst = true:  dm m + c.
/// Then one blocked pass reads and writes W once. Otherwise (non-finite entries, values near overflow)
/// the checked two-pass path decides.
/// \throws NumericalError naming the first non-finite entry; W is then untouched
template <bool ScaleFirst, class WType, class DType, class Scalar, class BType, class AType>
void scale_rows_add_low_rank_checked(const Where& where, WType&& W, const Eigen::MatrixBase<DType>& d, Scalar s,
                                     const Eigen::MatrixBase<BType>& B, const Eigen::MatrixBase<AType>& A) {
  const double m = static_cast<double>(W.cwiseAbs().template maxCoeff<Eigen::PropagateNaN>());
  const double c = std::abs(static_cast<double>(s)) *
                   static_cast<double>(B.cwiseAbs().rowwise().sum().template maxCoeff<Eigen::PropagateNaN>()) *
                   static_cast<double>(A.cwiseAbs().template maxCoeff<Eigen::PropagateNaN>());
  const double dm = static_cast<double>(d.cwiseAbs().template maxCoeff<Eigen::PropagateNaN>());
  const double bound = ScaleFirst ? dm * m + c : std::max(m + c, dm * (m + c));
  const double limit = 0.5 * static_cast<double>(std::numeric_limits<Scalar>::max());
  const bool safe = std::isfinite(m) && std::isfinite(c) && std::isfinite(dm) && std::isfinite(bound) && bound <= limit;
  scale_rows_add_low_rank_blocked<ScaleFirst>(where, W, d, s, B, A, !safe);
}

}  // namespace detail
}  // namespace peft
