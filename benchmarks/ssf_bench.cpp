// SSF against the frozen base product of the same shape, timed interleaved in the same loop.
//
//   BM_SSF_Forward          SSF inference forward        vs  base forward (W X + b)
//   BM_SSF_TrainStep        forward(X, cache) + backward vs  base forward + input gradient (W^T G)
//   BM_SSF_Merge            merge() then unmerge()       vs  one read-and-write pass over W
//   BM_StandaloneSSF_Fold   fold_into_next + unfold      vs  one read-and-write pass over W1
//
// Arguments: d (d_in = d_out), N (tokens). Counters: ratio_vs_base (or *_vs_pass), base_ms, adapter_ms.
#include "bench_support.hpp"

namespace {

using peft::bench::Matrix;
using peft::bench::Vector;

/// A d x d layer with N tokens, and an SSF over it.
struct Setup : peft::bench::Layer {
  peft::SSF<Matrix> ssf;
  Setup(Eigen::Index d, Eigen::Index n) : Layer(d, d, n), ssf(W, b) {}
};

void Args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"d", "N"});
  for (int d : {1024, 4096})
    for (int n : {1, 64, 512}) b->Args({d, n});
  b->UseManualTime()->Unit(benchmark::kMillisecond);
}

void BM_SSF_Forward(benchmark::State& state) {
  Setup s(state.range(0), state.range(1));
  Matrix Ya;
  peft::bench::interleaved(state, [&] { s.base_forward(); },
                           [&] {
                             s.ssf.forward_into(s.X, Ya);
                             benchmark::DoNotOptimize(Ya.data());
                           });
}

void BM_SSF_TrainStep(benchmark::State& state) {
  Setup s(state.range(0), state.range(1));
  peft::SSF<Matrix>::Cache cache;
  Matrix Ya, dXa;
  peft::bench::interleaved(state, [&] { s.base_step(); },
                           [&] {
                             s.ssf.forward_into(s.X, Ya, cache);
                             s.ssf.backward_into(s.G, cache, dXa);
                             benchmark::DoNotOptimize(dXa.data());
                           });
}

void BM_SSF_Merge(benchmark::State& state) {
  Setup s(state.range(0), 1);
  peft::bench::against_pass(
      state, [&] { peft::bench::read_write_pass(s.W); }, [&] { s.ssf.merge(); }, [&] { s.ssf.unmerge(); }, "merge",
      "unmerge");
}

void BM_StandaloneSSF_Fold(benchmark::State& state) {
  const Eigen::Index d = state.range(0);
  Matrix W1 = peft::bench::random_matrix(d, d, 5);
  Vector b1 = peft::bench::random_matrix(d, 1, 6);
  peft::StandaloneSSF<float> ssf(d);
  peft::bench::against_pass(
      state, [&] { peft::bench::read_write_pass(W1); }, [&] { ssf.fold_into_next(W1, b1); },
      [&] { ssf.unfold_from_next(W1, b1); }, "fold", "unfold");
}

void MergeArgs(benchmark::internal::Benchmark* b) {
  b->ArgNames({"d", "N"});
  for (int d : {1024, 4096}) b->Args({d, 1});
  b->UseManualTime()->Unit(benchmark::kMillisecond);
}

}  // namespace

BENCHMARK(BM_SSF_Forward)->Apply(Args);
BENCHMARK(BM_SSF_TrainStep)->Apply(Args);
BENCHMARK(BM_SSF_Merge)->Apply(MergeArgs);
BENCHMARK(BM_StandaloneSSF_Fold)->Apply(MergeArgs);

PEFT_BENCHMARK_MAIN();
