#pragma once
/// \file svd.hpp
/// \brief Truncated SVD of a weight: exact (Eigen's BDCSVD) or randomized (Halko, Martinsson & Tropp
/// 2011, Alg. 4.4 and 5.1: Gaussian sketch with oversampling, power iterations re-orthonormalised by
/// QR, then a small SVD). Used by PiSSA; usable on its own.

#include "peft/core/config.hpp"  // first: the detail headers check for it
#include "peft/core/error.hpp"
#include "peft/core/random.hpp"
#include "peft/core/types.hpp"
#include "peft/detail/checks.hpp"
#include "peft/detail/kernels.hpp"

#include <Eigen/QR>
#include <Eigen/SVD>

#include <algorithm>
#include <cstdint>

namespace peft {

/// \brief The top-`rank` singular triplets: W ≈ U diag(S) Vᵀ, S descending.
template <class Scalar>
struct TruncatedSVD {
  MatrixX<Scalar> U;  ///< d_out x rank, orthonormal columns
  VectorX<Scalar> S;  ///< rank, descending, >= 0
  MatrixX<Scalar> V;  ///< d_in x rank, orthonormal columns
};

/// \brief Settings of randomized_svd().
struct RandomizedSVDConfig {
  Index oversampling = 8;      ///< p: extra sketch columns beyond the rank (Halko et al. suggest 5 to 10)
  int power_iterations = 2;    ///< q >= 0: each one multiplies by W Wᵀ once, sharpening a slow spectrum
  std::uint64_t seed = 0;      ///< seeds the Gaussian sketch
};

namespace detail {

inline void check_svd_rank(const Where& where, Index rank, Index rows, Index cols) {
  if (rank < 1 || rank > std::min(rows, cols))
    raise<ConfigError>(where, "rank is ", rank, ", expected 1 <= rank <= min(d_out, d_in) = ", std::min(rows, cols));
}

/// Replaces the columns of M by an orthonormal basis of their span (thin Householder QR).
template <class Scalar>
void orthonormalize(MatrixX<Scalar>& M) {
  const Index rows = M.rows(), cols = M.cols();
  Eigen::HouseholderQR<MatrixX<Scalar>> qr(M);
  M.setIdentity(rows, cols);
  M.applyOnTheLeft(qr.householderQ());
}

}  // namespace detail

namespace kernels {

/// \brief The exact truncated SVD of op(W), one instantiation per scalar type (BDCSVD of a
/// column-major matrix). The rank was checked by the caller.
template <class S>
PEFT_NOINLINE TruncatedSVD<S> exact_svd(const Operand<S>& W, Index rank) {
  // The SVD of W itself, whatever its storage order, so that a row-major and a column-major weight give
  // the same singular vectors (signs included): BDCSVD copies its input anyway.
  MatrixX<S> dense(W.rows(), W.cols());
  if (W.transposed)
    dense = W.view.transpose();
  else
    dense = W.view;
  Eigen::BDCSVD<MatrixX<S>> svd(dense, Eigen::ComputeThinU | Eigen::ComputeThinV);
  return {svd.matrixU().leftCols(rank), svd.singularValues().head(rank), svd.matrixV().leftCols(rank)};
}

/// \brief The randomized truncated SVD of op(W) (see peft::randomized_svd), one instantiation per
/// scalar type. The arguments were checked by the caller.
template <class S>
PEFT_NOINLINE TruncatedSVD<S> randomized_svd(const Operand<S>& W, Index rank, const RandomizedSVDConfig& cfg) {
  using Matrix = MatrixX<S>;
  const Index l = std::min({rank + cfg.oversampling, W.rows(), W.cols()});
  const auto plain = [](const Matrix& M) { return detail::operand(M); };
  Matrix omega(W.cols(), l);
  Rng(cfg.seed).fill_normal(omega, 0.0, 1.0);
  Matrix Q(W.rows(), l);
  gemm<S>(view(Q), W, plain(omega), S(1), false);  // Q = W Ω
  detail::orthonormalize(Q);
  Matrix Z(W.cols(), l);
  for (int it = 0; it < cfg.power_iterations; ++it) {
    gemm<S>(view(Z), detail::transposed(W), plain(Q), S(1), false);  // Z = Wᵀ Q
    detail::orthonormalize(Z);
    gemm<S>(view(Q), W, plain(Z), S(1), false);  // Q = W Z
    detail::orthonormalize(Q);
  }
  Matrix C(l, W.cols());
  gemm<S>(view(C), detail::transposed(plain(Q)), W, S(1), false);  // C = Qᵀ W
  Eigen::BDCSVD<Matrix> small(C, Eigen::ComputeThinU | Eigen::ComputeThinV);
  TruncatedSVD<S> out;
  out.U.resize(W.rows(), rank);
  const Matrix U_small = small.matrixU().leftCols(rank);
  gemm<S>(view(out.U), plain(Q), plain(U_small), S(1), false);  // U = Q Ũ
  out.S = small.singularValues().head(rank);
  out.V = small.matrixV().leftCols(rank);
  return out;
}

#ifdef PEFT_COMPILED
extern template TruncatedSVD<float> exact_svd<float>(const Operand<float>&, Index);
extern template TruncatedSVD<double> exact_svd<double>(const Operand<double>&, Index);
extern template TruncatedSVD<float> randomized_svd<float>(const Operand<float>&, Index, const RandomizedSVDConfig&);
extern template TruncatedSVD<double> randomized_svd<double>(const Operand<double>&, Index, const RandomizedSVDConfig&);
#endif

}  // namespace kernels

/// \brief Exact truncated SVD through Eigen's BDCSVD: O(d_out d_in min(d_out, d_in)) flops.
/// \param W a dense matrix, Map, Ref or block (or its transpose), either storage order
/// \throws ConfigError unless 1 <= rank <= min(d_out, d_in)
template <class Derived>
TruncatedSVD<typename Derived::Scalar> exact_svd(const Eigen::MatrixBase<Derived>& W, Index rank) {
  detail::check_svd_rank({"peft::exact_svd", "svd"}, rank, W.rows(), W.cols());
  return kernels::exact_svd<typename Derived::Scalar>(detail::operand(W), rank);
}

/// \brief Randomized truncated SVD: O(d_out d_in (rank + p)(2q + 2)) flops and O((d_out + d_in)(rank + p))
/// memory; never copies W.
///
///     Ω ~ N(0,1)^{d_in x l}, l = min(rank + p, d_out, d_in);  Q = orth(W Ω)
///     q times:  Q = orth(W orth(Wᵀ Q))
///     Qᵀ W = Ũ S Vᵀ (small SVD);  U = Q Ũ;  keep the top rank
///
/// \param W a dense matrix, Map, Ref or block (or its transpose), either storage order
/// \throws ConfigError unless 1 <= rank <= min(d_out, d_in), p >= 0 and q >= 0
template <class Derived>
TruncatedSVD<typename Derived::Scalar> randomized_svd(const Eigen::MatrixBase<Derived>& W, Index rank,
                                                      const RandomizedSVDConfig& cfg = {}) {
  const detail::Where where{"peft::randomized_svd", "svd"};
  detail::check_svd_rank(where, rank, W.rows(), W.cols());
  detail::check_at_least<Index>(where, "oversampling", cfg.oversampling, 0);
  detail::check_at_least(where, "power_iterations", cfg.power_iterations, 0);
  return kernels::randomized_svd<typename Derived::Scalar>(detail::operand(W), rank, cfg);
}

}  // namespace peft
