// stack_product (Eigen's serial GEMM in blocks packed on the stack): its values against a double-precision
// product over several blocks in every direction, for every storage combination. What it takes from the heap is tested in
// tests/heap/heap_test.cpp.
#include "support/catch.hpp"
#include "support/matrices.hpp"

#include <peft/peft.hpp>  // the library, then the internals under test
#include <peft/detail/kernels.hpp>

#include <limits>

using peft::test::MatrixXd;
using peft::test::MatrixXf;
using peft::test::random_matrix;

namespace {

/// The standard bound of a computed product: |fl(L R) - L R| <= k eps |L| |R| elementwise (with a
/// factor 2 of slack for the block-by-block accumulation order).
template <class Scalar, class Lhs>
void check_product(const Lhs& L, Eigen::Index n, bool transposed_lhs) {
  using Matrix = peft::MatrixX<Scalar>;
  const Eigen::Index m = transposed_lhs ? L.cols() : L.rows(), k = transposed_lhs ? L.rows() : L.cols();
  const Matrix R = random_matrix<Matrix>(k, n, 31);
  const MatrixXd Ld = transposed_lhs ? MatrixXd(L.transpose().template cast<double>()) : MatrixXd(L.template cast<double>());
  const MatrixXd Rd = R.template cast<double>();
  const double alpha = -0.75;
  const MatrixXd exact = alpha * Ld * Rd;
  const MatrixXd bound = 2.0 * double(k + 2) * peft::test::eps<Scalar>() * (Ld.cwiseAbs() * Rd.cwiseAbs());
  const Matrix before = random_matrix<Matrix>(m, n + 3, 32);

  // Assign: into columns 1 .. n of a wider matrix (outer stride != rows), its NaN contents overwritten;
  // the columns around it untouched.
  Matrix out = before;
  out.middleCols(1, n).setConstant(std::numeric_limits<Scalar>::quiet_NaN());
  if (transposed_lhs)
    peft::detail::stack_product(out.middleCols(1, n), L.transpose(), R, Scalar(alpha), false);
  else
    peft::detail::stack_product(out.middleCols(1, n), L, R, Scalar(alpha), false);
  const MatrixXd err = (out.middleCols(1, n).template cast<double>() - exact).cwiseAbs();
  REQUIRE(out.middleCols(1, n).allFinite());
  REQUIRE((err.array() <= bound.array()).all());
  REQUIRE(out.col(0) == before.col(0));
  REQUIRE(out.rightCols(2) == before.rightCols(2));

  // Accumulate: adds to what is there.
  Matrix acc = before.leftCols(n);
  if (transposed_lhs)
    peft::detail::stack_product(acc, L.transpose(), R, Scalar(alpha), true);
  else
    peft::detail::stack_product(acc, L, R, Scalar(alpha), true);
  const MatrixXd expected = before.leftCols(n).template cast<double>() + exact;
  const MatrixXd slack = bound.array() + 2.0 * peft::test::eps<Scalar>() * expected.cwiseAbs().array();
  REQUIRE(((acc.template cast<double>() - expected).cwiseAbs().array() <= slack.array()).all());
}

}  // namespace

// The blocks, from stack_product.hpp's 128 KiB budget: a column-major lhs in 2048 x 16 (float) or
// 2048 x 8 (double) blocks, a row-major one in 64 x 512 or 64 x 256; a shorter lhs whole in rows, in
// blocks of budget / m depth; columns in panels of budget / depth. Each shape below spans several
// blocks in every direction and ends in partial ones.
TEMPLATE_TEST_CASE("stack_product equals the exact product over several blocks in every direction",
                   "[stack_product]", float, double) {
  using Scalar = TestType;
  using ColMajor = peft::MatrixX<Scalar>;
  using RowMajor = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  SECTION("many rows, column-major lhs") { check_product<Scalar>(random_matrix<ColMajor>(2100, 40, 1), 70, false); }
  SECTION("many rows, row-major lhs") { check_product<Scalar>(random_matrix<RowMajor>(150, 1100, 2), 70, false); }
  SECTION("many rows, transposed column-major lhs") {
    check_product<Scalar>(random_matrix<ColMajor>(1100, 150, 3), 37, true);
  }
  SECTION("few rows, depth and columns in several blocks") {
    check_product<Scalar>(random_matrix<ColMajor>(16, 5000, 4), 40, false);
    check_product<Scalar>(random_matrix<ColMajor>(2100, 32, 5), 300, true);
  }
  SECTION("one column, one row") {
    check_product<Scalar>(random_matrix<ColMajor>(300, 200, 6), 1, false);
    check_product<Scalar>(random_matrix<ColMajor>(1, 200, 7), 50, false);
  }
}

TEST_CASE("stack_product with an empty depth assigns zeros and accumulates nothing", "[stack_product]") {
  const MatrixXf L(5, 0), R(0, 4);
  MatrixXf out = MatrixXf::Constant(5, 4, 3.0f);
  peft::detail::stack_product(out, L, R, 1.0f, true);
  REQUIRE(out == MatrixXf::Constant(5, 4, 3.0f));
  peft::detail::stack_product(out, L, R, 1.0f, false);
  REQUIRE(out == MatrixXf::Zero(5, 4));
}
