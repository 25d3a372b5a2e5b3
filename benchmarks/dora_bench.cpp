// DoRA against LoRA of the same rank, against a PEFT-style materialised DoRA (written here, as the
// baseline only) and against the frozen base, timed in rotation in the same loop.
//
//   BM_DoRA_TrainStep       forward(X, cache) + backward, detached norm (PEFT's default), in rotation
//                           with LoRA's step, the materialised DoRA's step and the base step
//                           (W X + b, W^T G). Iteration time: DoRA's.
//                           Counters: dora_vs_lora, dora_vs_materialised, dora_vs_base, *_ms (mean per
//                           step), and the largest single heap allocation (bytes, relative to the base
//                           product's output d_out N): alloc_dora_vs_base_out (a warm step, the cache
//                           reused as a training loop does), alloc_dora_cold_vs_base_out (the first
//                           step, which sizes the cache), alloc_base_vs_base_out (the base step written
//                           the ordinary way, fresh outputs: "the base product's own"),
//                           alloc_materialised_vs_base_out (its first step: the d_out x d_in direction).
//   BM_DoRA_TrainStepExact  the exact-gradient mode (detach_norm = false) against the detached one.
//   BM_DoRA_Forward         inference forward against the base forward and LoRA's forward.
//   BM_DoRA_Merge           merge() then unmerge() against one read-and-write pass over W.
//
// Arguments: d (d_in = d_out), N (tokens), r (rank). float, column-major.
#include "bench_support.hpp"
#include "support/heap_probe.hpp"  // tests/support: the largest heap allocation of a region

#include <array>
#include <cstddef>
#include <functional>

namespace {

using peft::test::largest_allocation;

using peft::bench::Matrix;
using peft::bench::rotation;
using peft::bench::Vector;

peft::DoRAConfig config(Eigen::Index r, bool detach_norm = true) {
  peft::DoRAConfig cfg;
  cfg.rank = r;
  cfg.alpha = 2.0 * double(r);
  cfg.init = peft::LoRAInit::random;  // B != 0: the branch's and the norms' work is real
  cfg.detach_norm = detach_norm;
  return cfg;
}

/// PEFT's DoRA (peft/tuners/lora/dora.py, DoraLinearLayer) as a PyTorch user runs it, written with
/// Eigen for this comparison only: every step materialises the direction V = W0 + s B A (d_out x d_in)
/// to take its row norms, detached (no gradient through them); the base product is computed once and
/// shared with the base layer's output; no dropout. Favourable to PEFT: V's buffer is kept from step
/// to step (PyTorch allocates B A and W0 + s B A afresh), and V is built in one copy and one GEMM.
struct MaterialisedDoRA {
  const Matrix& W;
  const Vector& b;
  Matrix A, B;
  Vector m;
  float s;
  Matrix V, base, H, Z, Gp, U, dA, dB;
  Vector n, g, dm;
  const Matrix* X = nullptr;  // autograd keeps the input by reference

  MaterialisedDoRA(const Matrix& W_, const Vector& b_, const peft::DoRA<Matrix>& dora)
      : W(W_), b(b_), A(dora.A()), B(dora.B()), m(dora.magnitude()), s(dora.scaling()),
        dA(Matrix::Zero(A.rows(), A.cols())), dB(Matrix::Zero(B.rows(), B.cols())), dm(Vector::Zero(m.size())) {}

  void forward(const Matrix& X_, Matrix& Y) {
    X = &X_;
    V = W;                                       // weight + scaling * (lora_B @ lora_A)
    V.noalias() += s * B * A;
    n = V.rowwise().norm();                      // weight_norm, detached
    g = m.cwiseQuotient(n);                      // mag_norm_scale
    base.noalias() = W * X_;                     // base_result (the base layer's own product)
    H.noalias() = A * X_;
    Z = base;
    Z.noalias() += s * B * H;                    // base_result + scaling * lora_result
    Y = g.asDiagonal() * Z;                      // (g - 1) base + g s lora, plus the base layer's output
    Y.colwise() += b;
  }

  void backward(const Matrix& G, Matrix& dX) {
    dm += G.cwiseProduct(Z).rowwise().sum().cwiseQuotient(n);
    Gp = g.asDiagonal() * G;
    U.noalias() = B.transpose() * Gp;
    dB.noalias() += s * Gp * H.transpose();
    dA.noalias() += s * U * X->transpose();
    dX.noalias() = W.transpose() * Gp;
    dX.noalias() += s * A.transpose() * U;
  }
};

/// A d x d layer with N tokens, and a DoRA and a LoRA of rank r over it.
struct Setup : peft::bench::Layer {
  peft::DoRA<Matrix> dora;
  peft::LoRA<Matrix> lora;

  Setup(Eigen::Index d, Eigen::Index n, Eigen::Index r, bool detach_norm = true)
      : Layer(d, d, n), dora(W, b, config(r, detach_norm)), lora(W, b, config(r)) {}
};

void Args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"d", "N", "r"});
  for (int d : {1024, 4096})
    for (int n : {1, 4, 64, 512}) b->Args({d, n, 16});
  b->Args({1024, 64, 64});
  b->UseManualTime()->Unit(benchmark::kMillisecond);
}

void BM_DoRA_TrainStep(benchmark::State& state) {
  const Eigen::Index d = state.range(0), N = state.range(1), r = state.range(2);
  Setup s(d, N, r);
  MaterialisedDoRA mat(s.W, s.b, s.dora);
  peft::DoRA<Matrix>::Cache dora_cache;
  peft::LoRA<Matrix>::Cache lora_cache;
  Matrix Yd, dXd, Yl, dXl, Ym, dXm;
  const auto dora_step = [&] {
    s.dora.forward_into(s.X, Yd, dora_cache);
    s.dora.backward_into(s.G, dora_cache, dXd);
    benchmark::DoNotOptimize(dXd.data());
  };
  const auto lora_step = [&] {
    s.lora.forward_into(s.X, Yl, lora_cache);
    s.lora.backward_into(s.G, lora_cache, dXl);
    benchmark::DoNotOptimize(dXl.data());
  };
  const auto materialised_step = [&] {
    mat.forward(s.X, Ym);
    mat.backward(s.G, dXm);
    benchmark::DoNotOptimize(dXm.data());
  };

  // Allocations first, on fresh state: the first DoRA step sizes its cache, the second reuses it.
  const double out_bytes = double(d) * double(N) * sizeof(float);
  const double dora_cold = largest_allocation(dora_step);
  const double dora_warm = largest_allocation(dora_step);
  const double materialised_cold = largest_allocation(materialised_step);
  const double base_own = largest_allocation([&] {
    Matrix Yb = s.W * s.X;  // the base product written the ordinary way: fresh outputs
    Yb.colwise() += s.b;
    Matrix dXb = s.W.transpose() * s.G;
    benchmark::DoNotOptimize(dXb.data());
  });

  const auto t = rotation<4>(state, {dora_step, lora_step, materialised_step, [&] { s.base_step(); }});
  state.counters["dora_vs_lora"] = t[0] / t[1];
  state.counters["dora_vs_materialised"] = t[0] / t[2];
  state.counters["dora_vs_base"] = t[0] / t[3];
  state.counters["dora_ms"] = 1e3 * t[0];
  state.counters["lora_ms"] = 1e3 * t[1];
  state.counters["materialised_ms"] = 1e3 * t[2];
  state.counters["base_ms"] = 1e3 * t[3];
  state.counters["alloc_dora_vs_base_out"] = dora_warm / out_bytes;
  state.counters["alloc_dora_cold_vs_base_out"] = dora_cold / out_bytes;
  state.counters["alloc_base_vs_base_out"] = base_own / out_bytes;
  state.counters["alloc_materialised_vs_base_out"] = materialised_cold / out_bytes;
}

void BM_DoRA_TrainStepExact(benchmark::State& state) {
  const Eigen::Index d = state.range(0), N = state.range(1), r = state.range(2);
  Setup detached(d, N, r, true);
  peft::DoRA<Matrix> exact(detached.W, detached.b, config(r, false));
  peft::DoRA<Matrix>::Cache cd, ce;
  Matrix Yd, dXd, Ye, dXe;
  peft::bench::interleaved(state,
                           [&] {
                             detached.dora.forward_into(detached.X, Yd, cd);
                             detached.dora.backward_into(detached.G, cd, dXd);
                             benchmark::DoNotOptimize(dXd.data());
                           },
                           [&] {
                             exact.forward_into(detached.X, Ye, ce);
                             exact.backward_into(detached.G, ce, dXe);
                             benchmark::DoNotOptimize(dXe.data());
                           });
  state.counters["exact_vs_detached"] = state.counters["ratio_vs_base"];
}

void BM_DoRA_Forward(benchmark::State& state) {
  const Eigen::Index d = state.range(0), N = state.range(1), r = state.range(2);
  Setup s(d, N, r);
  Matrix Yd, Yl;
  const auto t = rotation<3>(state, {[&] {
                                       s.dora.forward_into(s.X, Yd);
                                       benchmark::DoNotOptimize(Yd.data());
                                     },
                                     [&] {
                                       s.lora.forward_into(s.X, Yl);
                                       benchmark::DoNotOptimize(Yl.data());
                                     },
                                     [&] { s.base_forward(); }});
  state.counters["dora_vs_lora"] = t[0] / t[1];
  state.counters["dora_vs_base"] = t[0] / t[2];
  state.counters["dora_ms"] = 1e3 * t[0];
  state.counters["base_ms"] = 1e3 * t[2];
}

void BM_DoRA_Merge(benchmark::State& state) {
  Setup s(state.range(0), 1, state.range(2));
  peft::bench::against_pass(
      state, [&] { peft::bench::read_write_pass(s.W); }, [&] { s.dora.merge(); }, [&] { s.dora.unmerge(); }, "merge",
      "unmerge");
}

void MergeArgs(benchmark::internal::Benchmark* b) {
  b->ArgNames({"d", "N", "r"});
  for (int d : {1024, 4096}) b->Args({d, 1, 16});
  b->UseManualTime()->Unit(benchmark::kMillisecond);
}

void ExactArgs(benchmark::internal::Benchmark* b) {
  b->ArgNames({"d", "N", "r"});
  for (int d : {1024, 4096})
    for (int n : {1, 512}) b->Args({d, n, 16});
  b->UseManualTime()->Unit(benchmark::kMillisecond);
}

}  // namespace

BENCHMARK(BM_DoRA_TrainStep)->Apply(Args);
BENCHMARK(BM_DoRA_TrainStepExact)->Apply(ExactArgs);
BENCHMARK(BM_DoRA_Forward)->Apply(Args);
BENCHMARK(BM_DoRA_Merge)->Apply(MergeArgs);

PEFT_BENCHMARK_MAIN();
