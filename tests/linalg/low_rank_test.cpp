// The checked in-place update W += s B A shared by every merge and unmerge; stack_product (Eigen's GEMM
// in tiles packed on the stack): its values against a double-precision product over every tile shape
// and both code paths, and the heap it does not take.
#include "support/catch.hpp"
#include "support/errors.hpp"
#include "support/heap_probe.hpp"  // defines malloc & co. for this executable
#include "support/matrices.hpp"

#include <peft/linalg/low_rank.hpp>
#include <peft/linalg/stack_product.hpp>

#include <cstring>
#include <limits>

using peft::test::largest_allocation;
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

// ---------------------------------------------------------------------------------------------------
// stack_product

namespace {

/// The standard bound of a computed product: |fl(L R) - L R| <= k eps |L| |R| elementwise (with a
/// factor 2 of slack for the tile-by-tile accumulation order).
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

// The tiles, from stack_product.hpp's 128 KiB budget: a column-major lhs in 2048 x 16 (float) or
// 2048 x 8 (double) tiles, a row-major one in 64 x 512 or 64 x 256, destinations of at most 32 rows in
// one block of budget / m depth; columns in groups of 32 (or budget / depth for few rows). Each shape
// below spans several tiles in every direction and ends in partial ones.
TEMPLATE_TEST_CASE("stack_product equals the exact product over several tiles, groups and both paths",
                   "[stack_product]", float, double) {
  using Scalar = TestType;
  using ColMajor = peft::MatrixX<Scalar>;
  using RowMajor = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  SECTION("many rows, column-major lhs") { check_product<Scalar>(random_matrix<ColMajor>(2100, 40, 1), 70, false); }
  SECTION("many rows, row-major lhs") { check_product<Scalar>(random_matrix<RowMajor>(150, 1100, 2), 70, false); }
  SECTION("many rows, transposed column-major lhs") {
    check_product<Scalar>(random_matrix<ColMajor>(1100, 150, 3), 37, true);
  }
  SECTION("few rows (at most 32), depth and columns in several blocks") {
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

TEST_CASE("stack_product takes nothing from the heap where Eigen's product does", "[stack_product][heap]") {
  // Where the heap is not tracked (sanitizers), the products still run and are checked for their values.
  const bool tracked = peft::test::heap_probe_available;
  if (!tracked) WARN("heap allocations are not tracked in this build (sanitizer or not glibc)");
  const MatrixXf W = random_matrix<MatrixXf>(1500, 1200, 1);
  const RowMajorXf Wr = W;
  const MatrixXf X = random_matrix<MatrixXf>(1200, 17, 2);
  MatrixXf ref(1500, 17), out(1500, 17), out_r(1500, 17), back(1200, 17);
  const double eigen = largest_allocation([&] { ref.noalias() = W * X; });
  const double col = largest_allocation([&] { peft::detail::stack_product(out, W, X, 1.0f, false); });
  const double row = largest_allocation([&] { peft::detail::stack_product(out_r, Wr, X, 1.0f, false); });
  const double transposed =
      largest_allocation([&] { peft::detail::stack_product(back, W.transpose(), out, 1.0f, false); });
  const float tol = 4 * 1200 * float(peft::test::eps<float>()) * ref.cwiseAbs().maxCoeff();
  REQUIRE((out - ref).cwiseAbs().maxCoeff() <= tol);
  REQUIRE((out_r - ref).cwiseAbs().maxCoeff() <= tol);
  REQUIRE(back.isApprox(W.transpose() * out, 1e-4f));
  if (tracked) {
    REQUIRE(eigen > 128.0 * 1024);  // the probe works: Eigen's own GEMM packs W into a heap buffer
    CHECK(col == 0.0);
    CHECK(row == 0.0);
    CHECK(transposed == 0.0);
  }
}

