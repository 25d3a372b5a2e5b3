// The checked in-place update W += s B A shared by every merge and unmerge.
#include "support/catch.hpp"
#include "support/errors.hpp"
#include "support/matrices.hpp"

#include <peft/linalg/low_rank.hpp>

#include <cstring>
#include <limits>

using peft::test::MatrixXd;
using peft::test::MatrixXf;
using peft::test::random_matrix;
using peft::test::RowMajorXd;
using peft::test::RowMajorXf;

TEMPLATE_TEST_CASE("add_low_rank_checked equals W plus s B A for any block size", "[low_rank]", MatrixXf, MatrixXd,
                   RowMajorXf, RowMajorXd) {
  using Scalar = typename TestType::Scalar;
  const TestType W0 = random_matrix<TestType>(13, 17, 1);
  const peft::MatrixX<Scalar> B = random_matrix<peft::MatrixX<Scalar>>(13, 3, 2);
  const peft::MatrixX<Scalar> A = random_matrix<peft::MatrixX<Scalar>>(3, 17, 3);
  const Scalar s = Scalar(1.5);
  const TestType expected = W0 + s * B * A;
  for (Eigen::Index block_elems : {Eigen::Index(1), Eigen::Index(40), Eigen::Index(1) << 19}) {
    TestType W = W0;
    peft::detail::add_low_rank_checked_exact(peft::detail::Where{"test", "add"}, W, s, B, A, block_elems);
    REQUIRE((W - expected).cwiseAbs().maxCoeff() <= 8 * peft::test::eps<Scalar>() * expected.cwiseAbs().maxCoeff());
  }
  TestType W = W0;  // the fast path (far from overflow)
  peft::detail::add_low_rank_checked(peft::detail::Where{"test", "add"}, W, s, B, A);
  REQUIRE((W - expected).cwiseAbs().maxCoeff() <= 8 * peft::test::eps<Scalar>() * expected.cwiseAbs().maxCoeff());
}

TEMPLATE_TEST_CASE("add_low_rank_checked throws before writing anything", "[low_rank]", MatrixXf, RowMajorXd) {
  using Scalar = typename TestType::Scalar;
  TestType W = random_matrix<TestType>(9, 11, 1);
  // The bad entry sits in the last block, so earlier blocks were computed before the check fails.
  W(8, 10) = std::numeric_limits<Scalar>::quiet_NaN();
  const TestType W0 = W;
  const peft::MatrixX<Scalar> B = random_matrix<peft::MatrixX<Scalar>>(9, 2, 2);
  const peft::MatrixX<Scalar> A = random_matrix<peft::MatrixX<Scalar>>(2, 11, 3);
  for (Eigen::Index block_elems : {Eigen::Index(9), Eigen::Index(1) << 19}) {
    REQUIRE_THROWS_AS(peft::detail::add_low_rank_checked_exact(peft::detail::Where{"test", "add"}, W, Scalar(1.5),
                                                               B, A, block_elems),
                      peft::NumericalError);
    REQUIRE(peft::test::same_bits(W, W0));  // NaN != NaN: compare the bytes
  }
}

TEMPLATE_TEST_CASE("add_low_rank_checked falls back to the exact check near overflow", "[low_rank]", MatrixXf,
                   RowMajorXd) {
  using Scalar = typename TestType::Scalar;
  const Scalar big = std::numeric_limits<Scalar>::max() / 4;
  const peft::MatrixX<Scalar> B = peft::MatrixX<Scalar>::Constant(5, 1, Scalar(1));
  const peft::MatrixX<Scalar> A = peft::MatrixX<Scalar>::Constant(1, 4, big);
  const peft::detail::Where where{"test", "add"};

  // m + c = 3 max / 4 exceeds the fast bound, yet every sum is finite: the exact path must accept it.
  TestType W = TestType::Constant(5, 4, big / 2);
  peft::detail::add_low_rank_checked(where, W, Scalar(1), B, A);
  REQUIRE((W.array() == big / 2 + big).all());

  // One entry would overflow: refused, W untouched; a NaN entry likewise.
  W.setConstant(Scalar(1));
  W(3, 2) = std::numeric_limits<Scalar>::max();
  const TestType W0 = W;
  REQUIRE_THROWS_AS(peft::detail::add_low_rank_checked(where, W, Scalar(1), B, A), peft::NumericalError);
  REQUIRE(W == W0);
  W(3, 2) = std::numeric_limits<Scalar>::infinity();
  REQUIRE_THROWS_AS(peft::detail::add_low_rank_checked(where, W, Scalar(0), B, A), peft::NumericalError);
}
