#pragma once
// Double-precision arithmetic the tests' references share, compiled once (tests/support/numeric.cpp)
// instead of in every test in every matrix type: products through Eigen's own GEMM (not the library's
// kernels, so the references stay independent of them), and a matrix with a known SVD.
#include <Eigen/Core>

#include <cstdint>

namespace peft::test {

/// \returns a b, in double.
Eigen::MatrixXd mul(const Eigen::MatrixXd& a, const Eigen::MatrixXd& b);

/// \returns |a| |b| (element-wise absolute values, then the product): the scale of a computed product.
Eigen::MatrixXd abs_mul(const Eigen::MatrixXd& a, const Eigen::MatrixXd& b);

/// \returns m in double.
template <class D>
Eigen::MatrixXd to_double(const Eigen::DenseBase<D>& m) {
  return m.template cast<double>();
}

/// A known singular value decomposition W = U diag(s) Vᵀ (rows x cols) with random orthonormal U, V
/// and s_i = 3 decay^i: a known, decaying spectrum, in double.
struct KnownSVD {
  Eigen::MatrixXd U, V;
  Eigen::VectorXd s;
  /// \returns U_r diag(s_r) V_rᵀ, the best rank-r approximation of W (Eckart-Young).
  Eigen::MatrixXd best_rank(Eigen::Index r) const;
};

KnownSVD known_svd(Eigen::Index rows, Eigen::Index cols, double decay, std::uint64_t seed);

}  // namespace peft::test
