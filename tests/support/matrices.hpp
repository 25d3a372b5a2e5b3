#pragma once
// Seeded test matrices and the matrix types every templated test runs over.
#include "support/numeric.hpp"

#include <peft/core/random.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cmath>

#include <cstdint>
#include <limits>

namespace peft::test {

using MatrixXf = Eigen::MatrixXf;
using MatrixXd = Eigen::MatrixXd;
using RowMajorXf = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using RowMajorXd = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// The types of a test that runs in every matrix type: two per CI phase, so that every type runs in one
/// of them and each phase runs both scalars and both storage orders (the code that differs between the
/// four types differs by scalar or by storage order). The Release build runs MatrixXd and row-major
/// float; the sanitizer build (PEFT_TEST_SANITIZER_TYPES, set by the asan preset's PEFT_SANITIZE)
/// MatrixXf and row-major double. PEFT_TEST_ALL_TYPES runs all four.
#if defined(PEFT_TEST_ALL_TYPES)
#define PEFT_TEST_EVERY_MATRIX MatrixXf, MatrixXd, RowMajorXf, RowMajorXd
#elif defined(PEFT_TEST_SANITIZER_TYPES)
#define PEFT_TEST_EVERY_MATRIX MatrixXf, RowMajorXd
#else
#define PEFT_TEST_EVERY_MATRIX MatrixXd, RowMajorXf
#endif

/// A rows x cols matrix of type M with entries U(-1, 1) from the given seed (same values for every
/// storage order and scalar type: drawn in double, column by column).
template <class M>
M random_matrix(Eigen::Index rows, Eigen::Index cols, std::uint64_t seed, double scale = 1.0) {
  Eigen::MatrixXd m(rows, cols);
  peft::Rng rng(seed);
  rng.fill_uniform(m, -scale, scale);
  return m.cast<typename M::Scalar>();
}

/// W = U diag(s) Vᵀ of known_svd(), as the matrix type M. `spectrum`, if given, receives s.
template <class M>
M with_spectrum(Eigen::Index rows, Eigen::Index cols, double decay, std::uint64_t seed,
                Eigen::VectorXd* spectrum = nullptr) {
  const KnownSVD svd = known_svd(rows, cols, decay, seed);
  if (spectrum) *spectrum = svd.s;
  return svd.best_rank(svd.s.size()).cast<typename M::Scalar>();
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
