#pragma once
/// \file low_rank_branch.hpp
/// \brief The adapter branch shared by the LoRA family (LoRA, DoRA, PiSSA): `s B A D(X)` with dropout
/// D on its input, its cache, and its backward (docs/math.md, LoRA). Adapter machinery, not linear
/// algebra: it draws the dropout masks from the adapter's random stream and refuses caches that do not
/// fit.
///
/// Every product goes through the library's GEMM kernels (kernels.hpp) with the scalar folded in; the
/// only temporaries are r x N (and d_in x N with dropout).

#include "peft/detail/internal_header_check.hpp"

#include "peft/core/config.hpp"
#include "peft/core/error.hpp"
#include "peft/core/random.hpp"
#include "peft/core/types.hpp"
#include "peft/detail/kernels.hpp"

namespace peft {
namespace detail {

/// \brief What the branch's backward needs from its training forward. Buffers are reused from call to
/// call (no allocation once the shapes are stable).
template <class Scalar>
struct LowRankCache {
  MatrixX<Scalar> X;     ///< D(X): the input after dropout (a copy of X when p = 0), d_in x N
  MatrixX<Scalar> mask;  ///< p > 0: the dropout mask scaled by 1/(1-p), d_in x N; empty when p = 0
  MatrixX<Scalar> H;     ///< A D(X), r x N
  MatrixX<Scalar> U;     ///< backward scratch: B^T G, r x N
  MatrixX<Scalar> T;     ///< backward scratch with dropout: A^T U, d_in x N
};

/// The branch's functions depend on the scalar type alone (their matrices are taken as Refs), so LoRA,
/// DoRA and PiSSA, in either storage order, share one instantiation of each per scalar.

/// \brief Refuses (StateError) a branch cache whose buffers do not fit rank r and a d_in x N input:
/// one filled by another adapter that lived at the same address, or edited by hand. Without it,
/// backward would read out of bounds.
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
template <class Scalar>
PEFT_NOINLINE void low_rank_forward_train(const Eigen::Ref<const MatrixX<Scalar>>& A,
                                          const Eigen::Ref<const MatrixX<Scalar>>& B, Scalar s, double p, Rng& rng,
                                          const Eigen::Ref<const MatrixX<Scalar>>& X, LowRankCache<Scalar>& cache,
                                          MatrixX<Scalar>& Y) {
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
  product(cache.H, A, cache.X, Scalar(1), false);
  product(Y, B, cache.H, s, true);
}

/// \brief Inference forward of the branch (no dropout): Y += s B (A X). Allocates only H (r x N).
template <class Scalar>
PEFT_NOINLINE void low_rank_forward(const Eigen::Ref<const MatrixX<Scalar>>& A,
                                    const Eigen::Ref<const MatrixX<Scalar>>& B, Scalar s,
                                    const Eigen::Ref<const MatrixX<Scalar>>& X, MatrixX<Scalar>& Y) {
  MatrixX<Scalar> H(A.rows(), X.cols());
  product(H, A, X, Scalar(1), false);
  product(Y, B, H, s, true);
}

/// \brief Backward of the branch with upstream gradient G (d_out x N):
///     U = B^T G,  dB += s G H^T,  dA += s U D(X)^T,  and, unless dX is null, dX += s D'(A^T U).
template <class Scalar>
PEFT_NOINLINE void low_rank_backward(const Eigen::Ref<const MatrixX<Scalar>>& A,
                                     const Eigen::Ref<const MatrixX<Scalar>>& B, Scalar s,
                                     const Eigen::Ref<const MatrixX<Scalar>>& G, LowRankCache<Scalar>& cache,
                                     Eigen::Ref<MatrixX<Scalar>> dA, Eigen::Ref<MatrixX<Scalar>> dB, MatrixX<Scalar>* dX) {
  cache.U.resize(B.cols(), G.cols());
  product(cache.U, B.transpose(), G, Scalar(1), false);
  product(dB, G, cache.H.transpose(), s, true);
  product(dA, cache.U, cache.X.transpose(), s, true);
  if (dX == nullptr) return;
  if (cache.mask.size() == 0) {
    product(*dX, A.transpose(), cache.U, s, true);
  } else {
    cache.T.resize(A.cols(), G.cols());
    product(cache.T, A.transpose(), cache.U, Scalar(1), false);
    dX->array() += s * cache.T.array() * cache.mask.array();
  }
}

}  // namespace detail
}  // namespace peft
