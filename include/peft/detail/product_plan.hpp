#pragma once
/// \file product_plan.hpp
/// \brief Products with a frozen weight that take no more from the heap than the base product of the
/// same batch does (DoRA's training step, docs/implementation.md).
///
/// A training step of DoRA multiplies W0 (or W0ᵀ) by N tokens and r more columns at once (W0 [X | Aᵀ]):
/// one read of W0 for two products. Where Eigen runs the base product W0 X on several threads, its
/// packing buffer is shared by the threads and sized by rows and depth, not by columns, so the wider
/// product takes what the base takes. Where Eigen runs it serially (one token, a few tokens, small
/// layers, one thread), a wider serial GEMM packs more than the base would, so the product goes through
/// stack_product (no heap at all) or is split.

#include "peft/detail/internal_header_check.hpp"

#include "peft/core/types.hpp"
#include "peft/detail/kernels.hpp"

#include <algorithm>

namespace peft {
namespace detail {

/// \brief Whether Eigen 3.4 runs a GEMM into a column-major dynamic destination (rows x cols, inner
/// dimension depth) on more than one thread. Its rule (Eigen/src/Core/products/Parallelizer.h): no
/// more threads than cols / nr (nr = 4 columns per kernel pass), nor than work / 50000 (work = rows
/// cols depth), nor than nbThreads(); none at all inside an OpenMP parallel region, or without OpenMP.
/// The tests check the consequence, DoRA's allocations against the base's, over many shapes.
inline bool eigen_gemm_runs_parallel(Index rows, Index cols, Index depth) {
#ifdef EIGEN_HAS_OPENMP
  if (omp_get_num_threads() > 1) return false;
#endif
  constexpr Index nr = 4;
  constexpr double min_task = 50000.0;
  const double work = double(rows) * double(cols) * double(depth);
  const Index by_size = std::min<Index>(cols / nr, static_cast<Index>(std::min(work / min_task, 1e9)));
  return std::min<Index>(Eigen::nbThreads(), std::max<Index>(1, by_size)) > 1;
}

/// \brief The widest product with the weight that a serial step runs in one piece through
/// stack_product(); wider ones are split (see product_with_base()). Where the crossover was measured
/// is in docs/implementation.md.
constexpr Index stack_product_max_cols = 96;

/// \brief out = lhs in, where lhs is W0 or W0ᵀ and `in` holds N = `tokens` columns, then more (Aᵀ, or
/// diag(c) B), so that the product takes no more from the heap than the base product lhs X does:
/// - where Eigen runs that base product on several threads: one GEMM over all columns (W0 read once);
/// - where it runs serially: stack_product() (kernels.hpp) over all columns (W0 read once) while there are at most
///   stack_product_max_cols of them, else the base product itself over the N tokens plus
///   stack_product() over the others (W0 read twice).
template <class Scalar, class LhsType>
void product_with_base(MatrixX<Scalar>& out, const Eigen::MatrixBase<LhsType>& lhs, const MatrixX<Scalar>& in,
                       Index tokens) {
  const Index extra = in.cols() - tokens;
  const Scalar one(1);
#ifdef PEFT_BLAS
  // The BLAS backend: OpenBLAS packs into buffers allocated at its start, whatever the product's width,
  // so one product over all columns reads W0 once; its threaded GEMM's fixed job table is the only heap
  // it takes (docs/performance.md, Threads and the BLAS backend).
  (void)extra;
  product(out, lhs, in, one, false);
#else
  if (eigen_gemm_runs_parallel(lhs.rows(), tokens, lhs.cols())) {
    product(out, lhs, in, one, false);
  } else if (in.cols() <= stack_product_max_cols) {
    stack_product(out, lhs, in, one, false);
  } else {
    product(out.leftCols(tokens), lhs, in.leftCols(tokens), one, false);
    stack_product(out.rightCols(extra), lhs, in.rightCols(extra), one, false);
  }
#endif
}

}  // namespace detail
}  // namespace peft
