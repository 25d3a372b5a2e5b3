// The product kernels every adapter goes through (kernels.hpp): kernels::gemm and kernels::gemm_on_stack
// for each transpose of each operand, assigning and accumulating, and the front end's views of any
// destination and operand (row-major matrices, blocks, maps, transposes), against a product computed
// entry by entry in long double. Shapes cover Eigen's GEMM, its GEMV (one column, one row) and empty
// products.
#include "support/catch.hpp"
#include "support/matrices.hpp"

#include <peft/peft.hpp>  // the library, then the internals under test
#include <peft/core/threads.hpp>
#include <peft/detail/kernels.hpp>

#include <limits>

using peft::test::eps;
using peft::test::random_matrix;

namespace {

/// op(a) op(b) entry by entry in long double, and the bound k eps |op(a)| |op(b)| of its computation.
template <class S>
std::pair<Eigen::MatrixXd, Eigen::MatrixXd> exact(const peft::MatrixX<S>& a, bool ta, const peft::MatrixX<S>& b,
                                                  bool tb, double alpha) {
  const peft::MatrixX<S> A = ta ? peft::MatrixX<S>(a.transpose()) : a;
  const peft::MatrixX<S> B = tb ? peft::MatrixX<S>(b.transpose()) : b;
  Eigen::MatrixXd value(A.rows(), B.cols()), bound(A.rows(), B.cols());
  for (Eigen::Index i = 0; i < A.rows(); ++i)
    for (Eigen::Index j = 0; j < B.cols(); ++j) {
      long double sum = 0, mag = 0;
      for (Eigen::Index k = 0; k < A.cols(); ++k) {
        sum += static_cast<long double>(A(i, k)) * static_cast<long double>(B(k, j));
        mag += std::abs(static_cast<long double>(A(i, k)) * static_cast<long double>(B(k, j)));
      }
      value(i, j) = static_cast<double>(alpha * sum);
      bound(i, j) = static_cast<double>(2.0L * (A.cols() + 2) * eps<S>() * std::abs(alpha) * mag);
    }
  return {value, bound};
}

template <class S, class Kernel>
void check_kernel(Kernel kernel) {
  using Matrix = peft::MatrixX<S>;
  const double alpha = -1.25;
  // (m, n, k): a GEMM, one column (GEMV), one row (GEMV of the transpose), tiny, and empty products.
  const Eigen::Index shapes[][3] = {{37, 23, 41}, {64, 1, 50}, {1, 45, 33}, {3, 2, 4}, {0, 5, 3}, {5, 0, 3}, {6, 4, 0}};
  for (const auto& shape : shapes) {
    const Eigen::Index m = shape[0], n = shape[1], k = shape[2];
    for (bool ta : {false, true})
      for (bool tb : {false, true})
        for (bool accumulate : {false, true}) {
          CAPTURE(m, n, k, ta, tb, accumulate);
          const Matrix a = ta ? random_matrix<Matrix>(k, m, 1) : random_matrix<Matrix>(m, k, 1);
          const Matrix b = tb ? random_matrix<Matrix>(n, k, 2) : random_matrix<Matrix>(k, n, 2);
          const auto [value, bound] = exact<S>(a, ta, b, tb, alpha);
          Matrix C = random_matrix<Matrix>(m, n, 3);
          const Matrix C0 = C;
          // Assigning must not read C (the BLAS backend's beta = 0): NaN there would show.
          if (!accumulate) C.setConstant(std::numeric_limits<S>::quiet_NaN());
          kernel(peft::kernels::view(C), peft::kernels::Operand<S>{peft::detail::operand(a).view, ta},
                 peft::kernels::Operand<S>{peft::detail::operand(b).view, tb}, S(alpha), accumulate);
          const Eigen::MatrixXd expected = value + (accumulate ? Eigen::MatrixXd(C0.template cast<double>()) : Eigen::MatrixXd::Zero(m, n));
          const Eigen::MatrixXd slack = bound.array() + 2 * eps<S>() * expected.cwiseAbs().array();
          REQUIRE(((C.template cast<double>() - expected).cwiseAbs().array() <= slack.array()).all());
          // The same with every matrix a block of a taller one (outer strides beyond the rows: a row
          // operand's elements lie a stride apart, as the BLAS's GEMV increments must say). Not for
          // empty products, whose matrices have no storage to take blocks of.
          if (m == 0 || n == 0 || k == 0) continue;
          Matrix a_pad = Matrix::Constant(a.rows() + 3, a.cols(), S(7)), b_pad = Matrix::Constant(b.rows() + 2, b.cols(), S(7));
          Matrix C_pad = Matrix::Constant(m + 5, n, S(7));
          a_pad.topRows(a.rows()) = a;
          b_pad.topRows(b.rows()) = b;
          C_pad.topRows(m) = accumulate ? C0 : Matrix::Constant(m, n, std::numeric_limits<S>::quiet_NaN());
          const auto c_view = peft::kernels::View<S>(C_pad.data(), m, n, Eigen::OuterStride<>(C_pad.rows()));
          kernel(c_view, peft::kernels::Operand<S>{peft::detail::operand(a_pad.topRows(a.rows())).view, ta},
                 peft::kernels::Operand<S>{peft::detail::operand(b_pad.topRows(b.rows())).view, tb}, S(alpha),
                 accumulate);
          const Eigen::MatrixXd C_strided = C_pad.topRows(m).template cast<double>();
          REQUIRE(((C_strided - expected).cwiseAbs().array() <= slack.array()).all());
          REQUIRE((C_pad.bottomRows(5).array() == S(7)).all());  // nothing written beyond the block
        }
  }
}

}  // namespace

TEMPLATE_TEST_CASE("kernels::gemm computes each transpose combination assigning and accumulating", "[kernels]", float,
                   double) {
  check_kernel<TestType>([](auto C, const auto& A, const auto& B, TestType alpha, bool acc) {
    peft::kernels::gemm<TestType>(C, A, B, alpha, acc);
  });
}

TEMPLATE_TEST_CASE("kernels::gemm_on_stack computes each transpose combination assigning and accumulating",
                   "[kernels]", float, double) {
  check_kernel<TestType>([](auto C, const auto& A, const auto& B, TestType alpha, bool acc) {
    peft::kernels::gemm_on_stack<TestType>(C, A, B, alpha, acc);
  });
}

TEST_CASE("the product front end views row-major destinations, blocks, maps and transposes correctly", "[kernels]") {
  using RowMajor = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const Eigen::MatrixXd A = random_matrix<Eigen::MatrixXd>(9, 7, 4);
  const RowMajor B = random_matrix<RowMajor>(7, 11, 5);
  const double tol = 1e-13;
  // A row-major destination (written as the transpose of the product), plain and accumulating.
  RowMajor C = RowMajor::Constant(9, 11, 2.0);
  peft::detail::product(C, A, B, 0.5, true);
  REQUIRE((C - (RowMajor::Constant(9, 11, 2.0) + 0.5 * A * B)).cwiseAbs().maxCoeff() < tol);
  peft::detail::stack_product(C, A, B, 0.5, false);
  REQUIRE((C - 0.5 * A * B).cwiseAbs().maxCoeff() < tol);
  // Blocks of both storage orders as destination and operands, and a transposed row-major block.
  Eigen::MatrixXd big = Eigen::MatrixXd::Zero(20, 20);
  RowMajor bigr = RowMajor::Zero(20, 20);
  peft::detail::product(big.block(2, 3, 9, 11), A, B, 1.0, false);
  peft::detail::product(bigr.block(1, 4, 11, 9), B.transpose(), A.block(0, 0, 9, 7).transpose(), 1.0, false);
  REQUIRE((big.block(2, 3, 9, 11) - A * B).cwiseAbs().maxCoeff() < tol);
  REQUIRE((bigr.block(1, 4, 11, 9) - (A * B).transpose()).cwiseAbs().maxCoeff() < tol);
  REQUIRE(big.leftCols(3).isZero(0));   // nothing written outside the blocks
  REQUIRE(bigr.topRows(1).isZero(0));
  // A map with an outer stride, and a vector destination (a GEMV).
  const Eigen::Map<const Eigen::MatrixXd, 0, Eigen::OuterStride<>> strided(big.data() + 2 + 3 * 20, 9, 11,
                                                                           Eigen::OuterStride<>(20));
  Eigen::VectorXd y = Eigen::VectorXd::Zero(9);
  const Eigen::VectorXd x = random_matrix<Eigen::MatrixXd>(11, 1, 6);
  peft::detail::product(y, strided, x, 1.0, false);
  REQUIRE((y - (A * B) * x).cwiseAbs().maxCoeff() < 1e-12);
}

TEST_CASE("set_num_threads sets the threads of Eigen and of the BLAS backend", "[kernels][threads]") {
  const int saved = peft::num_threads();
  for (int threads : {1, 2, 3}) {
    peft::set_num_threads(threads);
#ifdef EIGEN_HAS_OPENMP
    CHECK(Eigen::nbThreads() == threads);
    CHECK(peft::num_threads() == threads);
#elif defined(PEFT_BLAS)
    CHECK(peft::num_threads() == threads);
#else
    CHECK(peft::num_threads() == 1);  // no threads without OpenMP or the backend
#endif
  }
  peft::set_num_threads(0);  // clamped to one
  CHECK(peft::num_threads() == 1);
  peft::set_num_threads(saved);
#ifdef PEFT_BLAS
  CHECK(peft::blas_backend);
#else
  CHECK(!peft::blas_backend);
#endif
}
