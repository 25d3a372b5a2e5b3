// The checked in-place low-rank updates behind every merge and unmerge: W += s B A (LoRA, PiSSA) and the
// row-scaled forms of DoRA, against the formula for any block size, the fast path and the exact one, and
// the strong guarantee (nothing written when a value would not be finite).
#include "support/catch.hpp"
#include "support/errors.hpp"
#include "support/matrices.hpp"

#include <peft/peft.hpp>  // the library, then the internals under test
#include <peft/detail/low_rank.hpp>

#include <cstring>
#include <limits>

using peft::test::eps;
using peft::test::MatrixXd;
using peft::test::MatrixXf;
using peft::test::random_matrix;
using peft::test::RowMajorXd;
using peft::test::RowMajorXf;
using peft::test::same_bits;

TEMPLATE_TEST_CASE("add_low_rank_checked equals W plus s B A for any block size", "[low_rank]", PEFT_TEST_EVERY_MATRIX) {
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

TEMPLATE_TEST_CASE("the row-scaled low-rank update equals its formula and checks every block before writing", "[low_rank]", MatrixXf,
                   RowMajorXd) {
  using Scalar = typename TestType::Scalar;
  const peft::detail::Where where{"test", "update"};
  const TestType W0 = random_matrix<TestType>(13, 17, 1);
  const peft::MatrixX<Scalar> B = random_matrix<peft::MatrixX<Scalar>>(13, 3, 2);
  const peft::MatrixX<Scalar> A = random_matrix<peft::MatrixX<Scalar>>(3, 17, 3);
  const peft::VectorX<Scalar> d = random_matrix<peft::MatrixX<Scalar>>(13, 1, 4).array() + Scalar(2);
  const Scalar s = Scalar(1.5);
  const TestType after = d.asDiagonal() * (W0 + s * B * A);    // merge: scale after the add
  const TestType before = d.asDiagonal() * W0 + s * B * A;     // unmerge: scale before the add
  const double tol = 16 * eps<Scalar>() * after.cwiseAbs().maxCoeff();
  for (Eigen::Index block_elems : {Eigen::Index(1), Eigen::Index(40), Eigen::Index(1) << 19})
    for (bool check : {true, false}) {
      TestType W = W0;
      peft::detail::scale_rows_add_low_rank_blocked<false>(where, W, d, s, B, A, check, block_elems);
      REQUIRE((W - after).cwiseAbs().maxCoeff() <= tol);
      W = W0;
      peft::detail::scale_rows_add_low_rank_blocked<true>(where, W, d, s, B, A, check, block_elems);
      REQUIRE((W - before).cwiseAbs().maxCoeff() <= tol);
    }
  TestType W = W0;
  peft::detail::scale_rows_add_low_rank_checked<false>(where, W, d, s, B, A);
  REQUIRE((W - after).cwiseAbs().maxCoeff() <= tol);

  // A NaN in the last block: found after earlier blocks were computed, and nothing is written.
  W = W0;
  W(12, 16) = std::numeric_limits<Scalar>::quiet_NaN();
  const TestType with_nan = W;
  for (Eigen::Index block_elems : {Eigen::Index(13), Eigen::Index(1) << 19}) {
    REQUIRE_THROWS_AS(peft::detail::scale_rows_add_low_rank_blocked<false>(where, W, d, s, B, A, true, block_elems),
                      peft::NumericalError);
    REQUIRE(same_bits(W, with_nan));
  }
  REQUIRE_THROWS_AS(peft::detail::scale_rows_add_low_rank_checked<true>(where, W, d, s, B, A), peft::NumericalError);
  REQUIRE(same_bits(W, with_nan));

  // Near overflow but finite: beyond the fast bound (max / 2), accepted by the exact check.
  const Scalar quarter = std::numeric_limits<Scalar>::max() / 4;
  TestType Wbig = TestType::Constant(5, 4, Scalar(1.5) * quarter);
  const peft::MatrixX<Scalar> ones_B = peft::MatrixX<Scalar>::Constant(5, 1, Scalar(1));
  const peft::MatrixX<Scalar> ones_A = peft::MatrixX<Scalar>::Constant(1, 4, quarter);
  const peft::VectorX<Scalar> half = peft::VectorX<Scalar>::Constant(5, Scalar(0.5));
  const TestType expected_big = (Wbig + ones_B * ones_A) * Scalar(0.5);  // 1.25 quarter
  REQUIRE(expected_big.allFinite());
  peft::detail::scale_rows_add_low_rank_checked<false>(where, Wbig, half, Scalar(1), ones_B, ones_A);
  REQUIRE(((Wbig - expected_big).array().abs() <= 4 * eps<Scalar>() * expected_big.array()).all());
}
