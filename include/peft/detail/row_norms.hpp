#pragma once
/// \file row_norms.hpp
/// \brief Row norms of `V = W0 + s B A` without forming V (DoRA's norms, docs/math.md, DoRA): from
/// `P = W0 Aᵀ` and `K = A Aᵀ`, `n_i² = ||W0_i||² + s <B_i, P_i + (P + s B K)_i>`, with the rows where
/// that difference of large terms has lost its digits recomputed from the row itself.
///
/// Cost: O(d_out r²) flops beyond P (O(d_out d_in r), computed by the caller), O(d_out r) memory; a
/// recomputed row costs O(d_in r) and no allocation. No d_out x d_in temporary. The functions take
/// W0 as a column-major view (kernels.hpp): one instantiation per scalar type.

#include "peft/detail/internal_header_check.hpp"

#include "peft/core/config.hpp"
#include "peft/core/types.hpp"
#include "peft/detail/kernels.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

namespace peft {
namespace detail {

/// \returns ||W0_i + s B_i A|| for W0 = op(W0.view), the row formed in chunks of at most 256 entries on
/// the stack (no allocation; r scaled rows of A added to each, O(r d_in) flops), each chunk's norm
/// taken with stableNorm() and combined with hypot (no overflow or underflow).
template <class S>
PEFT_NOINLINE S direct_row_norm(const kernels::Operand<S>& W0, Index i, const kernels::ConstView<S>& A,
                  const kernels::ConstView<S>& B, S s) {
  constexpr int chunk_max = 256;
  Eigen::Matrix<S, 1, Eigen::Dynamic, Eigen::RowMajor, 1, chunk_max> chunk;
  S norm(0);
  for (Index k0 = 0; k0 < A.cols(); k0 += chunk_max) {
    const Index kb = std::min<Index>(chunk_max, A.cols() - k0);
    if (W0.transposed)  // row i of W0 is column i of the view
      chunk = W0.view.col(i).segment(k0, kb).transpose();
    else
      chunk = W0.view.row(i).segment(k0, kb);
    for (Index j = 0; j < A.rows(); ++j) chunk += (s * B(i, j)) * A.row(j).segment(k0, kb);
    norm = std::hypot(norm, chunk.stableNorm());
  }
  return norm;
}

/// \brief n_i = ||W0_i + s B_i A|| for every row of W0 = op(W0.view), from P = W0 Aᵀ (d_out x r) and the
/// cached squared row norms w2 of W0. Fills K = A Aᵀ (r x r) and VAt = P + s B K = (W0 + s B A) Aᵀ
/// (d_out x r), which DoRA's exact backward reuses.
///
/// The factored n_i² has a rounding error of about eps σ_i² with σ_i = ||W0_i|| + |s| Σ_j |B_ij| ||A_j||;
/// a row whose n_i² is not above σ_i² / 16 (or not finite) is recomputed by direct_row_norm(), so every
/// n_i is accurate to about (d_in + r) eps σ_i, as a materialised norm would be. The two small products
/// run serially on the stack (kernels::gemm_on_stack): a parallel GEMM would only add heap packing
/// buffers to products of O(d_out r²) flops.
template <class S>
PEFT_NOINLINE void factored_norms(const kernels::Operand<S>& W0, const VectorX<S>& w2, const kernels::ConstView<S>& A,
                    const kernels::ConstView<S>& B, S s, const kernels::ConstView<S>& P, MatrixX<S>& K,
                    MatrixX<S>& VAt, VectorX<S>& n) {
  const Index r = A.rows();
  K.resize(r, r);
  kernels::gemm_on_stack<S>(kernels::view(K), {A, false}, {A, true}, S(1), false);
  VAt = P;
  kernels::gemm_on_stack<S>(kernels::view(VAt), {B, false}, {kernels::as_const(kernels::view(K)), false}, s, true);
  n.resize(B.rows());
  n.noalias() = B.cwiseProduct(P + VAt).rowwise().sum();
  // ||A_j,:||, as an expression (r square roots per row, no allocation in a training step)
  const auto a = K.diagonal().cwiseMax(S(0)).cwiseSqrt();
  const S abs_s = std::abs(s);
  const S largest = std::numeric_limits<S>::max();
  for (Index i = 0; i < n.size(); ++i) {
    const S n2 = w2(i) + s * n(i);
    const S sigma = std::sqrt(w2(i)) + abs_s * B.row(i).cwiseAbs().dot(a.transpose());
    if (n2 > sigma * sigma / S(16) && n2 <= largest)
      n(i) = std::sqrt(n2);
    else  // cancellation (n2 may even be negative), or overflow: the row itself
      n(i) = direct_row_norm<S>(W0, i, A, B, s);
  }
}

/// \brief factored_norms for any dense expressions with direct access (W0 of either storage order).
template <class W0Type, class AType, class BType, class PType, class S>
void factored_row_norms(const W0Type& W0, const VectorX<S>& w2, const Eigen::MatrixBase<AType>& A,
                        const Eigen::MatrixBase<BType>& B, S s, const Eigen::MatrixBase<PType>& P, MatrixX<S>& K,
                        MatrixX<S>& VAt, VectorX<S>& n) {
  factored_norms<S>(operand(W0), w2, operand(A).view, operand(B).view, s, operand(P).view, K, VAt, n);
}

}  // namespace detail
}  // namespace peft
