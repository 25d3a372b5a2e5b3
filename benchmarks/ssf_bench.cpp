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

using Matrix = Eigen::MatrixXf;
using Vector = Eigen::VectorXf;

Matrix make(Eigen::Index rows, Eigen::Index cols, std::uint64_t seed) {
  Matrix m(rows, cols);
  peft::Rng(seed).fill_uniform(m, -1.0, 1.0);
  return m;
}

struct Setup {
  Matrix W;
  Vector b;
  Matrix X, G, Y, dX;
  peft::SSF<Matrix> ssf;

  Setup(Eigen::Index d, Eigen::Index n)
      : W(make(d, d, 1)), b(make(d, 1, 2)), X(make(d, n, 3)), G(make(d, n, 4)), Y(d, n), dX(d, n), ssf(W, b) {}

  void base_forward() {
    Y.noalias() = W * X;
    Y.colwise() += b;
    benchmark::DoNotOptimize(Y.data());
  }
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
  peft::bench::interleaved(state,
                           [&] {
                             s.base_forward();
                             s.dX.noalias() = s.W.transpose() * s.G;
                             benchmark::DoNotOptimize(s.dX.data());
                           },
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
  Matrix W1 = make(d, d, 5);
  Vector b1 = make(d, 1, 6);
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
