#pragma once
/// \file row_norms.hpp
/// \brief Row norms of `V = W0 + s B A` without forming V (DoRA's norms, docs/math.md, DoRA): from
/// `P = W0 Aᵀ` and `K = A Aᵀ`, `n_i² = ||W0_i||² + s <B_i, P_i + (P + s B K)_i>`, with the rows where
/// that difference of large terms has lost its digits recomputed from the row itself.
///
/// Cost: O(d_out r²) flops beyond P (O(d_out d_in r), computed by the caller), O(d_out r) memory; a
/// recomputed row costs O(d_in r) and no allocation. No d_out x d_in temporary.

#include "peft/core/types.hpp"
#include "peft/linalg/stack_product.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

namespace peft {
namespace detail {

/// \returns ||W0_i + s B_i A||, the row formed in chunks of at most 256 entries on the stack (no
/// allocation), each chunk's norm taken with stableNorm() and combined with hypot (no overflow or
/// underflow).
template <class W0Type, class AType, class BType, class Scalar>
Scalar direct_row_norm(const W0Type& W0, Index i, const Eigen::MatrixBase<AType>& A, const Eigen::MatrixBase<BType>& B,
                       Scalar s) {
  constexpr int chunk_max = 256;
  Eigen::Matrix<Scalar, 1, Eigen::Dynamic, Eigen::RowMajor, 1, chunk_max> chunk;
  Scalar norm(0);
  for (Index k0 = 0; k0 < A.cols(); k0 += chunk_max) {
    const Index kb = std::min<Index>(chunk_max, A.cols() - k0);
    chunk.resize(kb);
    chunk.noalias() = s * B.row(i) * A.middleCols(k0, kb);
    chunk += W0.row(i).segment(k0, kb);
    norm = std::hypot(norm, chunk.stableNorm());
  }
  return norm;
}

/// \brief n_i = ||W0_i + s B_i A|| for every row, from P = W0 Aᵀ (d_out x r) and the cached squared row
/// norms w2 of W0. Fills K = A Aᵀ (r x r) and VAt = P + s B K = (W0 + s B A) Aᵀ (d_out x r), which
/// DoRA's exact backward reuses.
///
/// The factored n_i² has a rounding error of about eps σ_i² with σ_i = ||W0_i|| + |s| Σ_j |B_ij| ||A_j||;
/// a row whose n_i² is not above σ_i² / 16 (or not finite) is recomputed by direct_row_norm(), so every
/// n_i is accurate to about (d_in + r) eps σ_i, as a materialised norm would be. The two small products
/// run serially on the stack (stack_product): a parallel GEMM would only add heap packing buffers to
/// products of O(d_out r²) flops.
template <class W0Type, class AType, class BType, class PType, class Scalar>
void factored_row_norms(const W0Type& W0, const VectorX<Scalar>& w2, const Eigen::MatrixBase<AType>& A,
                        const Eigen::MatrixBase<BType>& B, Scalar s, const Eigen::MatrixBase<PType>& P,
                        MatrixX<Scalar>& K, MatrixX<Scalar>& VAt, VectorX<Scalar>& n) {
  const Index r = A.rows();
  K.resize(r, r);
  stack_product(K, A, A.transpose(), Scalar(1), false);
  VAt = P;
  stack_product(VAt, B, K, s, true);
  n.resize(B.rows());
  n.noalias() = B.cwiseProduct(P + VAt).rowwise().sum();
  // ||A_j,:||, as an expression (r square roots per row, no allocation in a training step)
  const auto a = K.diagonal().cwiseMax(Scalar(0)).cwiseSqrt();
  const Scalar abs_s = std::abs(s);
  const Scalar largest = std::numeric_limits<Scalar>::max();
  for (Index i = 0; i < n.size(); ++i) {
    const Scalar n2 = w2(i) + s * n(i);
    const Scalar sigma = std::sqrt(w2(i)) + abs_s * B.row(i).cwiseAbs().dot(a.transpose());
    if (n2 > sigma * sigma / Scalar(16) && n2 <= largest)
      n(i) = std::sqrt(n2);
    else  // cancellation (n2 may even be negative), or overflow: the row itself
      n(i) = direct_row_norm(W0, i, A, B, s);
  }
}

}  // namespace detail
}  // namespace peft
