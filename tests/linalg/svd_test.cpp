// The truncated SVDs: exact (BDCSVD) and randomized (Halko et al.), on matrices with a known spectrum.
#include "support/catch.hpp"
#include "support/matrices.hpp"

#include <peft/linalg/svd.hpp>

#include <cmath>

namespace {

using peft::test::with_spectrum;

template <class M, class F>
double residual(const M& W, const F& f) {
  return (W.template cast<double>() - (f.U * f.S.asDiagonal() * f.V.transpose()).template cast<double>()).norm();
}

}  // namespace

TEMPLATE_TEST_CASE("exact_svd gives the best rank-r approximation", "[svd]", peft::test::MatrixXd,
                   peft::test::RowMajorXf) {
  Eigen::VectorXd s;
  const TestType W = with_spectrum<TestType>(60, 45, 0.8, 1, &s);
  const auto f = peft::exact_svd(W, 7);
  REQUIRE(f.U.cols() == 7);
  REQUIRE(f.V.rows() == 45);
  const double tol = std::is_same<typename TestType::Scalar, float>::value ? 1e-5 : 1e-12;
  for (int i = 0; i < 7; ++i) REQUIRE_THAT(double(f.S(i)), WithinRel(s(i), tol));
  // Eckart-Young: the residual is the norm of the dropped singular values.
  REQUIRE_THAT(residual(W, f), WithinRel(s.tail(45 - 7).norm(), 100 * tol));
}

TEMPLATE_TEST_CASE("randomized_svd is within one percent of the exact residual on a decaying spectrum", "[svd]",
                   peft::test::MatrixXf, peft::test::MatrixXd, peft::test::RowMajorXf) {
  Eigen::VectorXd s;
  const TestType W = with_spectrum<TestType>(300, 200, 0.93, 3, &s);
  const Eigen::Index r = 16;
  const double best = s.tail(200 - r).norm();
  for (int q : {1, 2, 4}) {
    peft::RandomizedSVDConfig cfg;
    cfg.power_iterations = q;
    cfg.seed = 11;
    const auto f = peft::randomized_svd(W, r, cfg);
    INFO("q = " << q);
    REQUIRE(residual(W, f) <= 1.01 * best);
    for (Eigen::Index i = 0; i < r; ++i) REQUIRE_THAT(double(f.S(i)), WithinRel(s(i), 1e-2));
    // Orthonormal factors.
    const double tol = std::is_same<typename TestType::Scalar, float>::value ? 1e-5 : 1e-12;
    REQUIRE((f.U.transpose() * f.U - peft::MatrixX<typename TestType::Scalar>::Identity(r, r)).norm() < tol);
    REQUIRE((f.V.transpose() * f.V - peft::MatrixX<typename TestType::Scalar>::Identity(r, r)).norm() < tol);
  }
  // Without power iterations and oversampling the sketch is visibly worse: the test can tell.
  peft::RandomizedSVDConfig crude;
  crude.power_iterations = 0;
  crude.oversampling = 0;
  REQUIRE(residual(W, peft::randomized_svd(W, r, crude)) > 1.01 * best);
}

TEST_CASE("truncated SVDs reject ranks and settings out of range") {
  const Eigen::MatrixXd W = peft::test::random_matrix<Eigen::MatrixXd>(5, 4, 1);
  REQUIRE_THROWS_AS(peft::exact_svd(W, 0), peft::ConfigError);
  REQUIRE_THROWS_AS(peft::exact_svd(W, 5), peft::ConfigError);
  REQUIRE_THROWS_AS(peft::randomized_svd(W, 5), peft::ConfigError);
  peft::RandomizedSVDConfig bad;
  bad.oversampling = -1;
  REQUIRE_THROWS_AS(peft::randomized_svd(W, 2, bad), peft::ConfigError);
  bad.oversampling = 2;
  bad.power_iterations = -1;
  REQUIRE_THROWS_AS(peft::randomized_svd(W, 2, bad), peft::ConfigError);
  // Oversampling past the matrix size is clipped, not an error.
  peft::RandomizedSVDConfig wide;
  wide.oversampling = 100;
  REQUIRE(peft::randomized_svd(W, 4, wide).S.size() == 4);
}
