// The test references' double-precision arithmetic (numeric.hpp), compiled once.
#include "support/numeric.hpp"

#include "support/matrices.hpp"

#include <Eigen/QR>

#include <cmath>

namespace peft::test {

Eigen::MatrixXd mul(const Eigen::MatrixXd& a, const Eigen::MatrixXd& b) { return a * b; }

Eigen::MatrixXd abs_mul(const Eigen::MatrixXd& a, const Eigen::MatrixXd& b) { return a.cwiseAbs() * b.cwiseAbs(); }

Eigen::MatrixXd KnownSVD::best_rank(Eigen::Index r) const {
  return U.leftCols(r) * s.head(r).asDiagonal() * V.leftCols(r).transpose();
}

KnownSVD known_svd(Eigen::Index rows, Eigen::Index cols, double decay, std::uint64_t seed) {
  const Eigen::Index k = std::min(rows, cols);
  const Eigen::MatrixXd G1 = random_matrix<Eigen::MatrixXd>(rows, k, seed);
  const Eigen::MatrixXd G2 = random_matrix<Eigen::MatrixXd>(cols, k, seed + 1);
  Eigen::HouseholderQR<Eigen::MatrixXd> q1(G1), q2(G2);
  KnownSVD svd;
  svd.U = q1.householderQ() * Eigen::MatrixXd::Identity(rows, k);
  svd.V = q2.householderQ() * Eigen::MatrixXd::Identity(cols, k);
  svd.s.resize(k);
  for (Eigen::Index i = 0; i < k; ++i) svd.s(i) = 3.0 * std::pow(decay, double(i));
  return svd;
}

}  // namespace peft::test
