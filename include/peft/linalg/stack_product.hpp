#pragma once
/// \file stack_product.hpp
/// \brief `dst (+)= alpha lhs rhs` through Eigen's GEMM, run serially in tiles whose packing buffers
/// Eigen keeps on the stack: a product that allocates nothing on the heap. The library calls it through
/// kernels::gemm_on_stack (kernels.hpp), on column-major views.
///
/// Why: Eigen sizes its GEMM packing buffers at run time and takes them from the stack only up to
/// EIGEN_STACK_ALLOCATION_LIMIT (128 KiB by default); beyond, and always for the shared lhs buffer of
/// its parallel (OpenMP) GEMM, they come from the heap: rows x kc elements, 5 MiB for a 4096 x 4096
/// float lhs. DoRA's training step uses it where a wider product would take more from the heap than the
/// base product does (linalg/product_plan.hpp).
///
/// How (the rules are in Eigen/src/Core/products/GeneralMatrixMatrix.h): a destination whose
/// MaxRowsAtCompileTime is at most 32 runs serially; the destination blocks below carry that bound
/// through a transposed view of blocks of at most 32 columns, which Eigen evaluates as the same
/// column-major product. Each tile of lhs is at most stack_packing_bytes, so Eigen's buffers (lhs tile,
/// rhs panel) stay on the stack. The products go through gemm_add(), Eigen's GEMM entry point.
///
/// Cost: the product's own 2 m n k flops on one core; lhs is read from memory once (each tile is used
/// for every column of dst while in cache), rhs and dst once per tile row. Measured speeds against
/// Eigen's own GEMM are in docs/implementation.md.

#include "peft/core/types.hpp"

#include <algorithm>
#include <type_traits>

namespace peft {
namespace detail {

/// \brief dst += alpha lhs rhs through Eigen's GEMM (or its GEMV when dst has one row or column),
/// without the coefficient-based path that `dst.noalias() += alpha * lhs * rhs` also instantiates for
/// products whose dimensions sum to less than 20: calling Eigen 3.4's own GEMM entry point, as that
/// expression does for every larger product, costs a third of the compile time and gives the same
/// values. Other Eigen versions take the expression.
template <class Dst, class Lhs, class Rhs, class S>
void gemm_add(Dst& dst, const Lhs& lhs, const Rhs& rhs, S alpha) {
#if EIGEN_VERSION_AT_LEAST(3, 4, 0) && !EIGEN_VERSION_AT_LEAST(3, 4, 90)
  Eigen::internal::generic_product_impl<Lhs, Rhs, Eigen::DenseShape, Eigen::DenseShape,
                                        Eigen::GemmProduct>::scaleAndAddTo(dst, lhs, rhs, alpha);
#else
  dst.noalias() += alpha * lhs * rhs;
#endif
}

/// \brief The largest lhs tile of stack_product_impl(), in bytes: Eigen's default stack limit, up to which
/// Eigen packs on the stack itself.
constexpr Index stack_packing_bytes = Index(128) * 1024;

/// \brief `dst = alpha lhs rhs` (accumulate = false) or `dst += alpha lhs rhs`, serially, with no heap
/// allocation (see the file comment).
/// \param dst column-major with unit inner stride (a matrix, a Map, or a block of columns of one),
///        lhs.rows() x rhs.cols(); it must not alias lhs or rhs.
/// \param lhs, rhs any dense expressions Eigen can take into a GEMM (blocks, transposes, Maps).
///
/// Tiles: a column-major lhs is read in tiles 64 bytes deep (one cache line of each column) and as
/// tall as the budget allows (all its rows when it has few); a row-major lhs in tiles 2 KiB deep.
/// Each tile of lhs is read from memory once and used for every column of dst while in cache.
template <class DstType, class LhsType, class RhsType, class Scalar>
void stack_product_impl(DstType&& dst, const Eigen::MatrixBase<LhsType>& lhs, const Eigen::MatrixBase<RhsType>& rhs,
                   Scalar alpha, bool accumulate) {
  using Dst = std::decay_t<DstType>;
  static_assert(!Dst::IsRowMajor && Dst::InnerStrideAtCompileTime == 1,
                "stack_product writes a column-major destination with unit inner stride");
  static_assert(std::is_same<typename Dst::Scalar, Scalar>::value, "alpha has the destination's scalar type");
  eigen_assert(dst.rows() == lhs.rows() && dst.cols() == rhs.cols() && lhs.cols() == rhs.rows());
  if (!accumulate) dst.setZero();
  const Index m = dst.rows(), n = dst.cols(), k = lhs.cols();
  if (m == 0 || n == 0 || k == 0) return;

  constexpr Index budget = stack_packing_bytes / Index(sizeof(Scalar));  // elements of one lhs tile
  constexpr Index bounded = 32;  // Eigen runs a GEMM serially when the destination has at most 32 rows
  const Index preferred_depth = (LhsType::IsRowMajor ? Index(2048) : Index(64)) / Index(sizeof(Scalar));
  Scalar* const out = dst.data();
  const Index stride = dst.outerStride();

  // Tiles of lhs, and for each the destination in groups of at most 32 columns, written through a
  // transposed view (MaxRows 32), which Eigen evaluates as this column-major product. (One path for
  // every shape, so that each operand combination instantiates one tiled product.)
  using Group = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::ColMajor, Eigen::Dynamic, bounded>;
  const Index rows = std::min(m, std::max<Index>(1, budget / preferred_depth));
  const Index depth = std::min(k, std::max<Index>(1, budget / rows));
  for (Index i0 = 0; i0 < m; i0 += rows) {
    const Index mb = std::min(rows, m - i0);
    for (Index k0 = 0; k0 < k; k0 += depth) {
      const Index kb = std::min(depth, k - k0);
      for (Index j0 = 0; j0 < n; j0 += bounded) {
        const Index nb = std::min(bounded, n - j0);
        Eigen::Map<Group, 0, Eigen::OuterStride<>> blk(out + i0 + j0 * stride, mb, nb, Eigen::OuterStride<>(stride));
        auto blk_t = blk.transpose();
        gemm_add(blk_t, rhs.block(k0, j0, kb, nb).transpose(), lhs.block(i0, k0, mb, kb).transpose(), alpha);
      }
    }
  }
}

}  // namespace detail
}  // namespace peft
