#pragma once
// Seeded test matrices and the matrix types every templated test runs over.
#include <peft/core/random.hpp>

#include <Eigen/Core>
#include <Eigen/QR>

#include <algorithm>
#include <cmath>

#include <cstdint>
#include <limits>

namespace peft::test {

using MatrixXf = Eigen::MatrixXf;
using MatrixXd = Eigen::MatrixXd;
using RowMajorXf = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using RowMajorXd = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// A rows x cols matrix of type M with entries U(-1, 1) from the given seed (same values for every
/// storage order and scalar type: drawn in double, column by column).
template <class M>
M random_matrix(Eigen::Index rows, Eigen::Index cols, std::uint64_t seed, double scale = 1.0) {
  Eigen::MatrixXd m(rows, cols);
  peft::Rng rng(seed);
  rng.fill_uniform(m, -scale, scale);
  return m.cast<typename M::Scalar>();
}

/// W = U diag(s) Vᵀ (rows x cols) with random orthonormal U, V and s_i = 3 decay^i: a known, decaying
/// spectrum. `spectrum`, if given, receives s.
template <class M>
M with_spectrum(Eigen::Index rows, Eigen::Index cols, double decay, std::uint64_t seed,
                Eigen::VectorXd* spectrum = nullptr) {
  const Eigen::Index k = std::min(rows, cols);
  const Eigen::MatrixXd G1 = random_matrix<Eigen::MatrixXd>(rows, k, seed);
  const Eigen::MatrixXd G2 = random_matrix<Eigen::MatrixXd>(cols, k, seed + 1);
  Eigen::HouseholderQR<Eigen::MatrixXd> q1(G1), q2(G2);
  const Eigen::MatrixXd U = q1.householderQ() * Eigen::MatrixXd::Identity(rows, k);
  const Eigen::MatrixXd V = q2.householderQ() * Eigen::MatrixXd::Identity(cols, k);
  Eigen::VectorXd s(k);
  for (Eigen::Index i = 0; i < k; ++i) s(i) = 3.0 * std::pow(decay, double(i));
  if (spectrum) *spectrum = s;
  return (U * s.asDiagonal() * V.transpose()).cast<typename M::Scalar>();
}

/// Unit round-off of the scalar type.
template <class Scalar>
constexpr double eps() {
  return static_cast<double>(std::numeric_limits<Scalar>::epsilon()) / 2.0;
}

/// The same matrix type with another scalar (same storage order).
template <class M, class S>
using rebind_t = Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic, M::IsRowMajor ? Eigen::RowMajor : Eigen::ColMajor>;

}  // namespace peft::test
