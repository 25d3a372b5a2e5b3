#pragma once
/// \file stack_product.hpp
/// \brief `C += alpha op(A) op(B)` through Eigen's GEMM, run serially with packing buffers small enough
/// for Eigen to keep on the stack: a product that allocates nothing on the heap. The library calls it
/// through kernels::gemm_on_stack (kernels.hpp), on column-major views.
///
/// Why: Eigen sizes its GEMM packing buffers at run time and takes them from the stack only up to
/// EIGEN_STACK_ALLOCATION_LIMIT (128 KiB by default); beyond, and always for the shared lhs buffer of
/// its parallel (OpenMP) GEMM, they come from the heap: rows x kc elements, 5 MiB for a 4096 x 4096
/// float lhs. DoRA's training step uses it where a wider product would take more from the heap than the
/// base product does (detail/product_plan.hpp).
///
/// How (Eigen 3.4, Eigen/src/Core/products/GeneralMatrixMatrix.h): the product runs the sequential loop
/// of Eigen's own GEMM (`general_matrix_matrix_product<...>::run` without parallel info) on Eigen's
/// packing routines and kernel (`gemm_pack_lhs`, `gemm_pack_rhs`, `gebp_kernel`), with a blocking whose
/// lhs block (mc x kc) and rhs panel (kc x nc) each fit stack_packing_bytes. It shares those kernels,
/// and so most of its compile time, with kernels::gemm.
///
/// Cost: the product's own 2 m n k flops on one core; lhs is read from memory once (each packed block
/// is used for every column of C while in cache when C has at most nc columns), rhs once per block of
/// mc rows. Measured speeds against Eigen's own GEMM are in docs/implementation.md.

#include "peft/detail/internal_header_check.hpp"

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

/// \brief The largest packing buffer of stack_gemm(), in bytes: Eigen's default stack limit, up to which
/// Eigen packs on the stack itself.
constexpr Index stack_packing_bytes = Index(128) * 1024;

/// \brief `C += alpha op(A) op(B)` for raw column-major storage, serially, with no heap allocation (see
/// the file comment). C is m x n with outer stride ldc; A (m x k, or k x m when LhsOrder is RowMajor,
/// i.e. the product reads its transpose) and B likewise, with outer strides lda and ldb. C must not
/// alias A or B. The values depend on the shapes alone (the blocking is theirs), never on a thread
/// count, and never go through the BLAS: with EIGEN_USE_BLAS, Eigen hands its own GEMM entry point to
/// the BLAS (GeneralMatrixMatrix_BLAS.h), so this runs Eigen's sequential loop itself, on Eigen's
/// packing routines and kernel, as Eigen's entry point does (GeneralMatrixMatrix.h).
template <class S, int LhsOrder, int RhsOrder>
void stack_gemm(Index m, Index n, Index k, const S* A, Index lda, const S* B, Index ldb, S* C, Index ldc, S alpha) {
  if (m == 0 || n == 0 || k == 0) return;
#if EIGEN_VERSION_AT_LEAST(3, 4, 0) && !EIGEN_VERSION_AT_LEAST(3, 4, 90)
  namespace ei = Eigen::internal;
  // The blocks: the lhs block (mc x kc) and the rhs panel (kc x nc) each within the budget, so both stay
  // on Eigen's stack. A column-major lhs is packed in blocks one cache line deep and as tall as the
  // budget allows (long contiguous runs of each column; few pages touched), a row-major one in blocks
  // 2 KiB deep; a short lhs is packed whole in depth. The loop then reads each lhs block from memory
  // once and uses it for every column of C in panels of nc.
  constexpr Index budget = stack_packing_bytes / Index(sizeof(S));
  constexpr Index preferred_depth = (LhsOrder == Eigen::RowMajor ? Index(2048) : Index(64)) / Index(sizeof(S));
  const Index mc = std::min(m, budget / preferred_depth);
  const Index kc = std::min(k, budget / mc);
  const Index nc = std::min(n, budget / kc);
  using Traits = ei::gebp_traits<S, S>;
  using LhsMapper = ei::const_blas_data_mapper<S, Index, LhsOrder>;
  using RhsMapper = ei::const_blas_data_mapper<S, Index, RhsOrder>;
  using ResMapper = ei::blas_data_mapper<S, Index, Eigen::ColMajor, Eigen::Unaligned, 1>;
  ei::gemm_pack_lhs<S, Index, LhsMapper, Traits::mr, Traits::LhsProgress, typename Traits::LhsPacket4Packing, LhsOrder>
      pack_lhs;
  ei::gemm_pack_rhs<S, Index, RhsMapper, Traits::nr, RhsOrder> pack_rhs;
  ei::gebp_kernel<S, S, Index, ResMapper, Traits::mr, Traits::nr, false, false> gebp;
  const LhsMapper lhs(A, lda);
  const RhsMapper rhs(B, ldb);
  const ResMapper res(C, ldc, 1);
  using namespace Eigen;  // the macro below names internal:: unqualified
  ei_declare_aligned_stack_constructed_variable(S, blockA, std::size_t(kc * mc), nullptr);
  ei_declare_aligned_stack_constructed_variable(S, blockB, std::size_t(kc * nc), nullptr);
  const bool pack_rhs_once = mc != m && kc == k && nc == n;
  for (Index i2 = 0; i2 < m; i2 += mc) {
    const Index actual_mc = std::min(i2 + mc, m) - i2;
    for (Index k2 = 0; k2 < k; k2 += kc) {
      const Index actual_kc = std::min(k2 + kc, k) - k2;
      pack_lhs(blockA, lhs.getSubMapper(i2, k2), actual_kc, actual_mc);
      for (Index j2 = 0; j2 < n; j2 += nc) {
        const Index actual_nc = std::min(j2 + nc, n) - j2;
        if (!pack_rhs_once || i2 == 0) pack_rhs(blockB, rhs.getSubMapper(k2, j2), actual_kc, actual_nc);
        gebp(res.getSubMapper(i2, j2), blockA, blockB, actual_mc, actual_kc, actual_nc, alpha);
      }
    }
  }
#else  // another Eigen: its GEMM, which may pack on the heap
  using Lhs = Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic, LhsOrder>;
  using Rhs = Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic, RhsOrder>;
  Eigen::Map<MatrixX<S>, 0, Eigen::OuterStride<>> dst(C, m, n, Eigen::OuterStride<>(ldc));
  const Eigen::Map<const Lhs, 0, Eigen::OuterStride<>> lhs(A, m, k, Eigen::OuterStride<>(lda));
  const Eigen::Map<const Rhs, 0, Eigen::OuterStride<>> rhs(B, k, n, Eigen::OuterStride<>(ldb));
  dst.noalias() += alpha * lhs * rhs;
#endif
}

}  // namespace detail
}  // namespace peft
