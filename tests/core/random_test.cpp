// The seeded Rng: reproducible, the right moments, storage-order-independent fills.
#include "support/catch.hpp"

#include <peft/core/random.hpp>

#include <Eigen/Core>

#include <cmath>

TEST_CASE("Rng is reproducible from its seed and copies replay the stream") {
  peft::Rng a(123), b(123), c(124);
  for (int i = 0; i < 10; ++i) {
    const double x = a.uniform();
    REQUIRE(x == b.uniform());
    REQUIRE(x >= 0.0);
    REQUIRE(x < 1.0);
  }
  REQUIRE(a.uniform() != c.uniform());
  peft::Rng copy = a;
  REQUIRE(copy.normal() == a.normal());
  REQUIRE(copy.normal() == a.normal());  // the spare of the Box-Muller pair is copied too
}

TEST_CASE("Rng uniform and normal have the documented moments") {
  peft::Rng rng(5);
  const int n = 200000;
  double su = 0, su2 = 0, sn = 0, sn2 = 0, sn4 = 0;
  for (int i = 0; i < n; ++i) {
    const double u = rng.uniform(-2.0, 4.0);
    su += u;
    su2 += u * u;
    const double z = rng.normal(1.0, 0.5);
    sn += z;
    sn2 += (z - 1.0) * (z - 1.0);
    sn4 += std::pow(z - 1.0, 4);
  }
  REQUIRE_THAT(su / n, WithinAbs(1.0, 0.02));                  // mean of U(-2, 4)
  REQUIRE_THAT(su2 / n - (su / n) * (su / n), WithinRel(3.0, 0.02));  // variance 36 / 12
  REQUIRE_THAT(sn / n, WithinAbs(1.0, 0.005));
  REQUIRE_THAT(sn2 / n, WithinRel(0.25, 0.02));
  REQUIRE_THAT(sn4 / n / (0.25 * 0.25), WithinRel(3.0, 0.05));  // normal kurtosis
}

TEST_CASE("Rng fills matrices in storage order, through maps and blocks") {
  Eigen::MatrixXd col(3, 4);
  Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> row(3, 4);
  peft::Rng(9).fill_uniform(col, -1, 1);
  peft::Rng(9).fill_uniform(row, -1, 1);
  // Same stream, storage order: row-major's first row holds the column-major's first column's draws.
  REQUIRE(row(0, 0) == col(0, 0));
  REQUIRE(row(0, 1) == col(1, 0));
  Eigen::MatrixXd big = Eigen::MatrixXd::Zero(5, 5);
  peft::Rng rng(1);
  rng.fill_normal(big.block(1, 1, 2, 2), 0.0, 1.0);
  REQUIRE(big.row(0).isZero(0));
  REQUIRE(big(1, 1) != 0.0);
  REQUIRE(big(3, 3) == 0.0);
}
