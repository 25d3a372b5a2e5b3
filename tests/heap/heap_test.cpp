// What the library takes from the heap, measured with the heap probe (tests/support/heap_probe.hpp),
// which interposes malloc for this whole executable: so these tests live in an executable of their own.
// stack_product takes nothing where Eigen's own product packs into a heap buffer; a warm DoRA training
// step takes no more than the base step of the same batch, at every batch size and thread count.
#include "support/catch.hpp"
#include "support/heap_probe.hpp"  // defines malloc & co. for this executable
#include "support/matrices.hpp"
#include "support/threads.hpp"

#include <peft/adapters/dora.hpp>
#include <peft/linalg/kernels.hpp>

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
      CHECK(warm <= base_own);  // the target
      CHECK(warm == 0.0);       // and what the design gives: no heap allocation at all
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
// threads): DoRA then uses stack_product, or the base product plus stack_product (linalg/product_plan.hpp).
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
          if (tracked) CHECK(warm <= base_own);
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
