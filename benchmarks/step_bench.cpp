// One training step of a frozen d x d layer with bias, as a user's loop runs it, on the shapes of the
// comparison with PyTorch (benchmarks/compare_pytorch.py, which times the same steps with Hugging Face
// PEFT's algorithms; scripts/bench.sh --pytorch prints both side by side):
//
//   BM_Step_Base   Y = W X + b, then dX = Wᵀ G                  (the frozen layer alone)
//   BM_Step_LoRA   forward_into(X, Y, cache) + backward_into   (dA, dB and dX)
//   BM_Step_DoRA   the same for DoRA (norms detached, as PEFT)  (dA, dB, dm and dX)
//   BM_Step_CopyX  one copy of X (d x N), what the training forward's cache costs
//
// With dx:0 the step computes no input gradient: the base step is its forward alone, the adapters' end
// with backward_params (a network's first layer; PyTorch skips dX when X does not require grad).
//
// Arguments: d (d_in = d_out), N (tokens), r (rank), dx (1: with the input gradient). Counters:
// GFLOPS and of_peak, the base products' flops (2 d² N per product with W) over the step's time and
// that rate over the machine's measured peak (bench_support.hpp, peak_gflops): for BM_Step_Base, the
// efficiency of the base GEMM.
#include "bench_support.hpp"

namespace {

using peft::bench::Matrix;

template <class Config>
Config adapter_config(Eigen::Index r) {
  Config cfg;
  cfg.rank = r;
  cfg.alpha = 2.0 * double(r);
  cfg.init = peft::LoRAInit::random;  // B != 0: the branch's work is real
  return cfg;
}

void Args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"d", "N", "r", "dx"});
  for (int dx : {1, 0})
    for (int d : {1024, 2048, 4096})
      for (int n : {1, 64, 512}) b->Args({d, n, 16, dx});
  b->Unit(benchmark::kMillisecond);
}

void CopyArgs(benchmark::internal::Benchmark* b) {
  b->ArgNames({"d", "N", "r", "dx"});
  for (int d : {1024, 2048, 4096})
    for (int n : {1, 64, 512}) b->Args({d, n, 16, 1});
  b->Unit(benchmark::kMillisecond);
}

/// Runs `step` as the benchmark's loop after one warm-up call; with `counters`, adds GFLOPS and
/// of_peak for the base products' flops.
template <class Step>
void run(benchmark::State& state, Step step, bool counters = true) {
  step();
  const auto t0 = peft::bench::Clock::now();
  for (auto _ : state) step();
  if (!counters) return;
  const double seconds = std::chrono::duration<double>(peft::bench::Clock::now() - t0).count();
  const double d = double(state.range(0)), n = double(state.range(1));
  const double products = state.range(3) != 0 ? 2.0 : 1.0;
  peft::bench::gflops_of_peak(state, products * 2.0 * d * d * n, seconds / double(state.iterations()));
}

void BM_Step_Base(benchmark::State& state) {
  peft::bench::Layer l(state.range(0), state.range(0), state.range(1));
  if (state.range(3) != 0)
    run(state, [&] { l.base_step(); });
  else
    run(state, [&] { l.base_forward(); });
}

template <class Adapter>
void adapter_step(benchmark::State& state) {
  peft::bench::Layer l(state.range(0), state.range(0), state.range(1));
  Adapter a(l.W, l.b, adapter_config<typename Adapter::Config>(state.range(2)));
  typename Adapter::Cache cache;
  if (state.range(3) != 0) {
    run(state, [&] {
      a.forward_into(l.X, l.Y, cache);
      a.backward_into(l.G, cache, l.dX);
      benchmark::DoNotOptimize(l.dX.data());
    });
  } else {
    run(state, [&] {
      a.forward_into(l.X, l.Y, cache);
      a.backward_params(l.G, cache);
      benchmark::DoNotOptimize(a.flat_grads().data());
    });
  }
}

/// What the training forward's copy of X into the cache costs (the LoRA family keeps D(X) for dA, so
/// that X may change after the forward): one d x N copy, to set against the steps above.
void BM_Step_CopyX(benchmark::State& state) {
  peft::bench::Layer l(state.range(0), state.range(0), state.range(1));
  Matrix copy(l.X.rows(), l.X.cols());
  run(
      state,
      [&] {
        copy = l.X;
        benchmark::DoNotOptimize(copy.data());
      },
      false);  // no flops: its time alone
}

void BM_Step_LoRA(benchmark::State& state) { adapter_step<peft::LoRA<Matrix>>(state); }
void BM_Step_DoRA(benchmark::State& state) { adapter_step<peft::DoRA<Matrix>>(state); }

}  // namespace

BENCHMARK(BM_Step_Base)->Apply(Args);
BENCHMARK(BM_Step_LoRA)->Apply(Args);
BENCHMARK(BM_Step_DoRA)->Apply(Args);
BENCHMARK(BM_Step_CopyX)->Apply(CopyArgs);

PEFT_BENCHMARK_MAIN();
