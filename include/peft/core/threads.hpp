#pragma once
/// \file threads.hpp
/// \brief One thread count for every matrix product: Eigen's (OpenMP) and, with the BLAS backend
/// (CMake option `PEFT_BLAS`, which defines `PEFT_BLAS` and `EIGEN_USE_BLAS`), OpenBLAS's own.
///
/// With the backend, every GEMM and GEMV goes to OpenBLAS, which runs on its own pthreads; Eigen then
/// starts no OpenMP threads for products (it parallelises nothing else), so the two pools are never busy
/// at once and the cores are not oversubscribed. Both read `OMP_NUM_THREADS` at start (OpenBLAS prefers
/// `OPENBLAS_NUM_THREADS` when it is set); without either, both use every core. set_num_threads() sets
/// both at run time.

#include <Eigen/Core>

#ifdef PEFT_BLAS
extern "C" {
// OpenBLAS's own calls (cblas.h declares them too; declared here so that no BLAS header is needed).
void openblas_set_num_threads(int num_threads);
int openblas_get_num_threads(void);
}
#endif

namespace peft {

/// \brief Whether this program was built with the BLAS backend (products run on OpenBLAS).
constexpr bool blas_backend =
#ifdef PEFT_BLAS
    true;
#else
    false;
#endif

/// \brief Sets the threads of every matrix product: Eigen's (Eigen::setNbThreads) and, with the BLAS
/// backend, OpenBLAS's (openblas_set_num_threads). Not while another thread is running a product.
/// \param threads at least 1
inline void set_num_threads(int threads) {
  if (threads < 1) threads = 1;
  Eigen::setNbThreads(threads);
#ifdef PEFT_BLAS
  openblas_set_num_threads(threads);
#endif
}

/// \returns the threads a large product runs on: OpenBLAS's with the backend, else Eigen's.
inline int num_threads() {
#ifdef PEFT_BLAS
  return openblas_get_num_threads();
#else
  return Eigen::nbThreads();
#endif
}

}  // namespace peft
