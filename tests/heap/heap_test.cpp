// What the library takes from the heap, measured with the heap probe (tests/support/heap_probe.hpp),
// which interposes malloc for this whole executable: so these tests live in an executable of their own.
// stack_product takes nothing where Eigen's own product packs into a heap buffer; a warm DoRA training
// step takes no more than the base step of the same batch, at every batch size and thread count.
#include "support/catch.hpp"
#include "support/heap_probe.hpp"  // defines malloc & co. for this executable
#include "support/matrices.hpp"
#include "support/threads.hpp"

#include <peft/adapters/dora.hpp>
#include <peft/core/threads.hpp>
#include <peft/detail/kernels.hpp>

#include <algorithm>
#include <utility>
#include <vector>

using peft::test::EigenThreads;
using peft::test::eps;
using peft::test::largest_allocation;
using peft::test::MatrixXd;
using peft::test::MatrixXf;
using peft::test::random_matrix;
using peft::test::RowMajorXd;
using peft::test::RowMajorXf;

namespace {

/// With the BLAS backend, OpenBLAS's threaded GEMM (driver/level3/level3_thread.c) mallocs and frees a
/// table of jobs on every call that runs on more than one thread, of one size whatever the product's
/// shape (Debian's build: 512 KiB, MAX_CPU_NUMBER x sizeof(job_t)); its serial GEMMs and its GEMVs take
/// nothing. \returns that size, checked to be one constant (0 on one thread or without the backend).
double blas_job_table() {
#ifdef PEFT_BLAS
  if (!peft::test::heap_probe_available || peft::num_threads() == 1) return 0.0;
  double table = -1.0;
  for (Eigen::Index d : {512, 1500}) {
    const MatrixXf a = random_matrix<MatrixXf>(d, d, 1), b = random_matrix<MatrixXf>(d, 64, 2);
    MatrixXf c(d, 64);
    const double taken = largest_allocation([&] { peft::detail::product(c, a, b, 1.0f, false); });
    REQUIRE(taken > 0.0);  // the probe sees it
    if (table >= 0.0) REQUIRE(taken == table);
    table = taken;
  }
  return table;
#else
  return 0.0;
#endif
}

}  // namespace

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
#ifdef PEFT_BLAS
    // The backend: stack_product is OpenBLAS's product, which takes its job table alone (on one thread,
    // nothing).
    const double table = blas_job_table();
    CAPTURE(table, eigen);
    CHECK(eigen <= table);
    CHECK(col <= table);
    CHECK(row <= table);
    CHECK(transposed <= table);
    const peft::test::EigenThreads one(1);
    CHECK(largest_allocation([&] { peft::detail::stack_product(out, W, X, 1.0f, false); }) == 0.0);
#else
    REQUIRE(eigen > 128.0 * 1024);  // the probe works: Eigen's own GEMM packs W into a heap buffer
    CHECK(col == 0.0);
    CHECK(row == 0.0);
    CHECK(transposed == 0.0);
#endif
  }
}

TEMPLATE_TEST_CASE("a warm DoRA step at one token allocates no more than the base step", "[dora][heap]", PEFT_TEST_EVERY_MATRIX) {
  using Scalar = typename TestType::Scalar;
  using Matrix = peft::MatrixX<Scalar>;
  using Vector = peft::VectorX<Scalar>;
  // Where the heap is not tracked (sanitizers), the steps still run and their outputs are checked.
  const bool tracked = peft::test::heap_probe_available;
  if (!tracked) WARN("heap allocations are not tracked in this build (sanitizer or not glibc)");
  const Eigen::Index d_out = 600, d_in = 700;
  TestType W = random_matrix<TestType>(d_out, d_in, 1, 0.05);
  Vector b = random_matrix<Vector>(d_out, 1, 2);
  const Matrix X = random_matrix<Matrix>(d_in, 1, 3), G = random_matrix<Matrix>(d_out, 1, 4);
  // The base step written the ordinary way: fresh outputs, y = W x + b and dx = W^T g (two GEMVs).
  Matrix Yb, dXb;  // empty: the base step allocates its outputs
  const double base_own = largest_allocation([&] {
    Yb = W * X;
    Yb.colwise() += b;
    dXb = W.transpose() * G;
  });
  REQUIRE(Yb.allFinite());
  REQUIRE(dXb.allFinite());
  if (tracked) REQUIRE(base_own >= double(d_in * sizeof(Scalar)));  // the probe saw at least the outputs
  for (bool detach : {true, false}) {
    CAPTURE(detach);
    peft::DoRAConfig cfg;
    cfg.rank = 16;
    cfg.init = peft::LoRAInit::random;  // B != 0
    cfg.detach_norm = detach;
    peft::DoRA<TestType> dora(W, b, cfg);
    typename peft::DoRA<TestType>::Cache cache;
    Matrix Y, dX;
    const auto step = [&] {
      dora.forward_into(X, Y, cache);
      dora.backward_into(G, cache, dX);
    };
    step();  // the first step sizes the cache
    const Matrix Y_cold = Y, dX_cold = dX;
    const double warm = largest_allocation(step);
    if (tracked) {
      // The target, and what the design gives: no heap allocation at all; with the BLAS backend,
      // OpenBLAS's job table where it runs the joint product [X | Aᵀ] on two threads and the base's two
      // GEMVs take nothing (blas_job_table).
      CHECK(warm <= std::max(base_own, blas_job_table()));
      CHECK(warm <= blas_job_table());
    }
    REQUIRE(Y == Y_cold);  // the same step again: the same outputs
    REQUIRE(dX == dX_cold);
    // The same step through Eigen's product where the base is a GEMM too (N = 64) still runs.
    const Matrix X64 = random_matrix<Matrix>(d_in, 64, 5), G64 = random_matrix<Matrix>(d_out, 64, 6);
    dora.forward_into(X64, Y, cache);
    dora.backward_into(G64, cache, dX);
    REQUIRE(dX.allFinite());
  }
}

// The same bound at every batch size, on one thread and on two, for square, wide and tall layers.
// Where Eigen runs the base product serially (one token, a few tokens, small layers, one thread), one
// GEMM over [X | A^T] would pack up to twice what the base product does (300 x 300 at N = 2 to 7, two
// threads): DoRA then uses stack_product, or the base product plus stack_product (detail/product_plan.hpp).
TEMPLATE_TEST_CASE("a warm DoRA step allocates no more than the base step at every batch size and thread count",
                   "[dora][heap]", MatrixXf, RowMajorXf, MatrixXd) {
  using Scalar = typename TestType::Scalar;
  using Matrix = peft::MatrixX<Scalar>;
  using Vector = peft::VectorX<Scalar>;
  const bool tracked = peft::test::heap_probe_available;
  if (!tracked) WARN("heap allocations are not tracked in this build: only the steps' outputs are checked");
  const std::pair<Eigen::Index, Eigen::Index> shapes[] = {{64, 64}, {300, 300}, {40, 600}, {600, 40}};
  const std::vector<Eigen::Index> batches =
      tracked ? std::vector<Eigen::Index>{1, 2, 7, 8, 12, 80, 81, 200} : std::vector<Eigen::Index>{2, 81};
  for (int threads : {2, 1}) {
    const EigenThreads eigen_threads(threads);
    const double table = blas_job_table();
    for (const auto& [d_out, d_in] : shapes) {
      for (const Eigen::Index N : batches) {
        TestType W = random_matrix<TestType>(d_out, d_in, 1, 0.05);
        Vector b = random_matrix<Vector>(d_out, 1, 2);
        const Matrix X = random_matrix<Matrix>(d_in, N, 3), G = random_matrix<Matrix>(d_out, N, 4);
        Matrix Yb, dXb;  // the base step, written the ordinary way: fresh outputs
        const double base_own = largest_allocation([&] {
          Yb = W * X;
          Yb.colwise() += b;
          dXb = W.transpose() * G;
        });
        for (bool detach : {true, false}) {
          CAPTURE(threads, d_out, d_in, N, detach);
          peft::DoRAConfig cfg;
          cfg.rank = 16;
          cfg.init = peft::LoRAInit::random;  // B != 0
          cfg.detach_norm = detach;
          peft::DoRA<TestType> dora(W, b, cfg);
          typename peft::DoRA<TestType>::Cache cache;
          Matrix Y, dX;
          const auto step = [&] {
            dora.forward_into(X, Y, cache);
            dora.backward_into(G, cache, dX);
          };
          step();  // sizes the cache
          const double warm = largest_allocation(step);
          CAPTURE(warm, base_own);
          // With the BLAS backend on two threads, OpenBLAS's job table (blas_job_table) where it threads
          // DoRA's wider product and not the base's: to the byte otherwise.
          const double allowed = std::max(base_own, table);
          if (tracked) CHECK(warm <= allowed);
          // A first layer's step (backward_params: no dX) takes no more either.
          const auto params_step = [&] {
            dora.forward_into(X, Y, cache);
            dora.backward_params(G, cache);
          };
          params_step();
          const double warm_params = largest_allocation(params_step);
          CAPTURE(warm_params);
          if (tracked) CHECK(warm_params <= allowed);
          // The step's output equals the const forward's (Eigen's GEMM on all threads) within rounding.
          const Matrix reference = dora.forward(X);
          const Scalar scale = (W.cwiseAbs() * X.cwiseAbs()).maxCoeff() * std::max(Scalar(1), cache.g.maxCoeff());
          REQUIRE((Y - reference).cwiseAbs().maxCoeff() <= Scalar(16 * (d_in + 16)) * eps<Scalar>() * scale);
          REQUIRE(dX.allFinite());
        }
      }
    }
  }
}
