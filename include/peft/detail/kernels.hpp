#pragma once
/// \file kernels.hpp
/// \brief The products every adapter runs, as a small set of kernels per scalar type.
///
/// Every matrix product of the library goes through two function templates over the scalar alone,
/// `kernels::gemm<S>` (Eigen's GEMM) and `kernels::gemm_on_stack<S>` (Eigen's GEMM run serially with its packing
/// on the stack, see stack_product.hpp). Their operands are column-major views with a transpose
/// flag: a row-major matrix is the transpose of a column-major one, and a row-major destination is
/// written as the transpose of the product. So LoRA, DoRA, PiSSA and SSF, in either storage order, share
/// the same few instantiations of Eigen's GEMM per scalar, instead of one per combination of expression
/// types: the bulk of what a translation unit that uses the adapters costs to compile.
///
/// With the optional compiled part (CMake target `peft::compiled`, which defines `PEFT_COMPILED`), these
/// kernels are instantiated once, for float and double, in the library; a translation unit that links it
/// sees only the `extern template` declarations below and instantiates none of them.

#include "peft/detail/internal_header_check.hpp"

#include "peft/core/config.hpp"
#include "peft/core/error.hpp"
#include "peft/core/types.hpp"
#include "peft/detail/stack_product.hpp"

#include <algorithm>
#include <limits>
#include <type_traits>
#include <utility>

namespace peft {
namespace kernels {

/// A writable column-major view with unit inner stride (a matrix, Map, Ref, or block of one).
template <class S>
using View = Eigen::Map<MatrixX<S>, 0, Eigen::OuterStride<>>;
/// A read-only column-major view with unit inner stride.
template <class S>
using ConstView = Eigen::Map<const MatrixX<S>, 0, Eigen::OuterStride<>>;

/// An operand of a product: a column-major view, and whether it enters the product transposed.
template <class S>
struct Operand {
  ConstView<S> view;
  bool transposed;
  Index rows() const { return transposed ? view.cols() : view.rows(); }
  Index cols() const { return transposed ? view.rows() : view.cols(); }
};

/// \returns the view of a whole column-major matrix (its rows are its outer stride).
template <class S>
View<S> view(MatrixX<S>& m) {
  return View<S>(m.data(), m.rows(), m.cols(), Eigen::OuterStride<>(std::max<Index>(m.rows(), 1)));
}

/// \returns the read-only view of a writable one.
template <class S>
ConstView<S> as_const(const View<S>& v) {
  return ConstView<S>(v.data(), v.rows(), v.cols(), Eigen::OuterStride<>(v.outerStride()));
}

#ifdef PEFT_BLAS
namespace blas {

// The Fortran BLAS entry points, as Eigen declares them (Eigen/src/misc/blas.h, included by Eigen/Core
// under EIGEN_USE_BLAS), one overload per scalar.
inline void gemm(char ta, char tb, int m, int n, int k, float alpha, const float* a, int lda, const float* b,
                 int ldb, float beta, float* c, int ldc) {
  sgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}
inline void gemm(char ta, char tb, int m, int n, int k, double alpha, const double* a, int lda, const double* b,
                 int ldb, double beta, double* c, int ldc) {
  dgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}
inline void gemv(char t, int m, int n, float alpha, const float* a, int lda, const float* x, int incx, float* y,
                 int incy) {
  const float one = 1.0f;
  sgemv_(&t, &m, &n, &alpha, a, &lda, x, &incx, &one, y, &incy);
}
inline void gemv(char t, int m, int n, double alpha, const double* a, int lda, const double* x, int incx,
                 double* y, int incy) {
  const double one = 1.0;
  dgemv_(&t, &m, &n, &alpha, a, &lda, x, &incx, &one, y, &incy);
}

/// \returns i as the BLAS's 32-bit integer; ShapeError beyond it.
inline int dim(Index i) {
  if (i > Index(std::numeric_limits<int>::max()))
    detail::raise<ShapeError>(detail::Where{"peft::kernels", "gemm"}, "a dimension or stride of ", i,
                              " exceeds the BLAS's 32-bit index; build without PEFT_BLAS for such a product");
  return static_cast<int>(i);
}

/// \brief C = alpha op(A) op(B) + beta C through the BLAS: its GEMV for one column or row of C (which
/// it runs in parallel, unlike Eigen's), else its GEMM, whose beta = 0 writes C without reading it (no
/// pass to zero C first).
template <class S>
void product(View<S> C, const Operand<S>& A, const Operand<S>& B, S alpha, bool accumulate) {
  const int m = dim(C.rows()), n = dim(C.cols()), k = dim(A.cols());
  const int lda = dim(A.view.outerStride()), ldb = dim(B.view.outerStride()), ldc = dim(C.outerStride());
  if (n == 1) {  // c = alpha op(A) b: b is B's column (or B's row when B enters transposed)
    if (!accumulate) C.setZero();
    gemv(A.transposed ? 'T' : 'N', dim(A.view.rows()), dim(A.view.cols()), alpha, A.view.data(), lda,
         B.view.data(), B.transposed ? ldb : 1, C.data(), 1);
  } else if (m == 1) {  // cᵀ = alpha op(B)ᵀ aᵀ: aᵀ is A's row (or A's column when A enters transposed)
    if (!accumulate) C.setZero();
    gemv(B.transposed ? 'N' : 'T', dim(B.view.rows()), dim(B.view.cols()), alpha, B.view.data(), ldb,
         A.view.data(), A.transposed ? 1 : lda, C.data(), ldc);
  } else {
    gemm(A.transposed ? 'T' : 'N', B.transposed ? 'T' : 'N', m, n, k, alpha, A.view.data(), lda, B.view.data(), ldb,
         accumulate ? S(1) : S(0), C.data(), ldc);
  }
}

}  // namespace blas
#endif

/// \brief C = alpha op(A) op(B) (accumulate = false) or C += alpha op(A) op(B), through Eigen's GEMM
/// (parallel where Eigen's rules say so; its GEMV for one row or column), or with the BLAS backend
/// (PEFT_BLAS) through the BLAS's. C must not alias A or B.
template <class S>
PEFT_NOINLINE void gemm(View<S> C, const Operand<S>& A, const Operand<S>& B, S alpha, bool accumulate) {
#ifdef PEFT_BLAS
  if (C.size() == 0) return;
  if (A.cols() == 0) {
    if (!accumulate) C.setZero();
    return;
  }
  blas::product<S>(C, A, B, alpha, accumulate);
#else
  if (!accumulate) C.setZero();
  if (C.size() == 0 || A.cols() == 0) return;
  const auto At = A.view.transpose();
  const auto Bt = B.view.transpose();
  if (!A.transposed && !B.transposed)
    detail::gemm_add(C, A.view, B.view, alpha);
  else if (!A.transposed)
    detail::gemm_add(C, A.view, Bt, alpha);
  else if (!B.transposed)
    detail::gemm_add(C, At, B.view, alpha);
  else
    detail::gemm_add(C, At, Bt, alpha);
#endif
}

/// \brief `C += alpha op(A) op(B)` (or `=`) through Eigen's GEMM run serially, with its packing buffers on
/// the stack (stack_product.hpp), whatever the backend: no heap allocation, and values that depend on
/// the operands' shapes alone, never on a thread count (the exact restore, exact_restore.hpp, relies on
/// that).
template <class S>
PEFT_NOINLINE void gemm_serial(View<S> C, const Operand<S>& A, const Operand<S>& B, S alpha, bool accumulate) {
  if (!accumulate) C.setZero();
  const Index m = C.rows(), n = C.cols(), k = A.cols();
  const S* a = A.view.data();
  const S* b = B.view.data();
  const Index lda = A.view.outerStride(), ldb = B.view.outerStride(), ldc = C.outerStride();
  if (!A.transposed && !B.transposed)
    detail::stack_gemm<S, Eigen::ColMajor, Eigen::ColMajor>(m, n, k, a, lda, b, ldb, C.data(), ldc, alpha);
  else if (!A.transposed)
    detail::stack_gemm<S, Eigen::ColMajor, Eigen::RowMajor>(m, n, k, a, lda, b, ldb, C.data(), ldc, alpha);
  else if (!B.transposed)
    detail::stack_gemm<S, Eigen::RowMajor, Eigen::ColMajor>(m, n, k, a, lda, b, ldb, C.data(), ldc, alpha);
  else
    detail::stack_gemm<S, Eigen::RowMajor, Eigen::RowMajor>(m, n, k, a, lda, b, ldb, C.data(), ldc, alpha);
}

/// \brief The same product, run serially with Eigen's packing buffers on the stack: no heap allocation
/// (stack_product.hpp), gemm_serial(). With the BLAS backend it is gemm(): OpenBLAS packs into buffers
/// it allocated at its start; its threaded GEMM still mallocs a fixed table of jobs per call (docs/performance.md,
/// Threads and the BLAS backend), which no serial call avoids from here (OpenBLAS's thread count is
/// global).
template <class S>
PEFT_NOINLINE void gemm_on_stack(View<S> C, const Operand<S>& A, const Operand<S>& B, S alpha, bool accumulate) {
#ifdef PEFT_BLAS
  gemm<S>(C, A, B, alpha, accumulate);
#else
  gemm_serial<S>(C, A, B, alpha, accumulate);
#endif
}

#ifdef PEFT_COMPILED
extern template void gemm<float>(View<float>, const Operand<float>&, const Operand<float>&, float, bool);
extern template void gemm<double>(View<double>, const Operand<double>&, const Operand<double>&, double, bool);
extern template void gemm_serial<float>(View<float>, const Operand<float>&, const Operand<float>&, float, bool);
extern template void gemm_serial<double>(View<double>, const Operand<double>&, const Operand<double>&, double, bool);
extern template void gemm_on_stack<float>(View<float>, const Operand<float>&, const Operand<float>&, float, bool);
extern template void gemm_on_stack<double>(View<double>, const Operand<double>&, const Operand<double>&, double,
                                           bool);
#endif

}  // namespace kernels

namespace detail {

template <class T>
struct is_transpose : std::false_type {};
template <class T>
struct is_transpose<Eigen::Transpose<T>> : std::true_type {};

/// \returns the column-major view of a dense expression with direct access and unit inner stride (a
/// matrix, Map, Ref or block; a Transpose of one), and whether it is the transpose of the expression.
template <class D>
kernels::Operand<typename D::Scalar> operand(const Eigen::MatrixBase<D>& m) {
  using S = typename D::Scalar;
  if constexpr (is_transpose<D>::value) {
    auto inner = operand(m.derived().nestedExpression());
    inner.transposed = !inner.transposed;
    return inner;
  } else {
    static_assert(bool(Eigen::internal::traits<D>::Flags & Eigen::DirectAccessBit),
                  "peft: a product operand must be a matrix, Map, Ref or block (or its transpose)");
    static_assert(D::InnerStrideAtCompileTime == 1 || D::InnerStrideAtCompileTime == Eigen::Dynamic,
                  "peft: a product operand must have unit inner stride");
    eigen_assert(m.innerStride() == 1 || m.size() <= 1);
    const Index outer = std::max<Index>(m.outerStride(), m.innerSize());
    if (D::IsRowMajor)
      return {kernels::ConstView<S>(m.derived().data(), m.cols(), m.rows(), Eigen::OuterStride<>(outer)), true};
    return {kernels::ConstView<S>(m.derived().data(), m.rows(), m.cols(), Eigen::OuterStride<>(outer)), false};
  }
}

/// \returns the writable column-major view of a destination, and whether it is the transpose of it.
template <class D>
std::pair<kernels::View<typename std::decay_t<D>::Scalar>, bool> destination(D&& m) {
  using Dst = std::decay_t<D>;
  using S = typename Dst::Scalar;
  static_assert(bool(Eigen::internal::traits<Dst>::Flags & Eigen::DirectAccessBit) &&
                    bool(Eigen::internal::traits<Dst>::Flags & Eigen::LvalueBit),
                "peft: a product destination must be a writable matrix, Map, Ref or block");
  eigen_assert(m.innerStride() == 1 || m.size() <= 1);
  const Index outer = std::max<Index>(m.outerStride(), m.innerSize());
  if (Dst::IsRowMajor)
    return {kernels::View<S>(m.data(), m.cols(), m.rows(), Eigen::OuterStride<>(outer)), true};
  return {kernels::View<S>(m.data(), m.rows(), m.cols(), Eigen::OuterStride<>(outer)), false};
}

template <class S>
kernels::Operand<S> transposed(kernels::Operand<S> op) {
  op.transposed = !op.transposed;
  return op;
}

/// \brief `dst = alpha lhs rhs` (accumulate = false) or `dst += alpha lhs rhs` through kernels::gemm,
/// for any dense expressions with direct access (and their transposes). dst must not alias them.
template <class Dst, class Lhs, class Rhs, class S>
void product(Dst&& dst, const Eigen::MatrixBase<Lhs>& lhs, const Eigen::MatrixBase<Rhs>& rhs, S alpha,
             bool accumulate) {
  static_assert(std::is_same<typename Lhs::Scalar, S>::value && std::is_same<typename Rhs::Scalar, S>::value,
                "peft: one scalar type per product");
  eigen_assert(dst.rows() == lhs.rows() && dst.cols() == rhs.cols() && lhs.cols() == rhs.rows());
  auto [C, t] = destination(dst);
  if (!t)
    kernels::gemm<S>(C, operand(lhs), operand(rhs), alpha, accumulate);
  else  // a row-major destination holds (lhs rhs)ᵀ = rhsᵀ lhsᵀ in column-major order
    kernels::gemm<S>(C, transposed(operand(rhs)), transposed(operand(lhs)), alpha, accumulate);
}

/// \brief The same through kernels::gemm_on_stack: serial, no heap allocation.
template <class Dst, class Lhs, class Rhs, class S>
void stack_product(Dst&& dst, const Eigen::MatrixBase<Lhs>& lhs, const Eigen::MatrixBase<Rhs>& rhs, S alpha,
                   bool accumulate) {
  eigen_assert(dst.rows() == lhs.rows() && dst.cols() == rhs.cols() && lhs.cols() == rhs.rows());
  auto [C, t] = destination(dst);
  if (!t)
    kernels::gemm_on_stack<S>(C, operand(lhs), operand(rhs), alpha, accumulate);
  else
    kernels::gemm_on_stack<S>(C, transposed(operand(rhs)), transposed(operand(lhs)), alpha, accumulate);
}

}  // namespace detail
}  // namespace peft
