// The checked in-place update W += s B A shared by every merge and unmerge.
#include "support/catch.hpp"
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
    peft::detail::add_low_rank_checked(peft::detail::Where{"test", "add"}, W, s, B, A, block_elems);
    REQUIRE((W - expected).cwiseAbs().maxCoeff() <= 8 * peft::test::eps<Scalar>() * expected.cwiseAbs().maxCoeff());
  }
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
    REQUIRE_THROWS_AS(peft::detail::add_low_rank_checked(peft::detail::Where{"test", "add"}, W, Scalar(1.5), B, A,
                                                         block_elems),
                      peft::NumericalError);
    // NaN != NaN: compare the bytes.
    REQUIRE(std::memcmp(W.data(), W0.data(), sizeof(Scalar) * W.size()) == 0);
  }
}
