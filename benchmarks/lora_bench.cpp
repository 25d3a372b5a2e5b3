// LoRA against the frozen base product of the same shape, timed interleaved in the same loop.
//
//   BM_LoRA_Forward        unmerged inference forward   vs  base forward (W X + b)
//   BM_LoRA_ForwardMerged  merged inference forward     vs  base forward
//   BM_LoRA_TrainStep      forward(X, cache) + backward vs  base forward + input gradient (W^T G)
//   BM_LoRA_Merge          merge() then unmerge()       vs  one read-and-write pass over W
//
// Arguments: d (d_in = d_out), N (tokens), r (rank). Counters: ratio_vs_base, base_ms, adapter_ms,
// GFLOPS (of the adapter's call, base product included).
#include "bench_support.hpp"

namespace {

using peft::bench::Matrix;

peft::LoRAConfig config(Eigen::Index r) {
  peft::LoRAConfig cfg;
  cfg.rank = r;
  cfg.alpha = 2.0 * double(r);
  cfg.init = peft::LoRAInit::random;  // B != 0: the branch's work is real
  return cfg;
}

/// A d x d layer with N tokens, and a LoRA of rank r over it.
struct Setup : peft::bench::Layer {
  peft::LoRA<Matrix> lora;
  Setup(Eigen::Index d, Eigen::Index n, Eigen::Index r) : Layer(d, d, n), lora(W, b, config(r)) {}
};

void Args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"d", "N", "r"});
  for (int d : {1024, 4096})
    for (int n : {1, 64, 512})
      for (int r : {8, 16, 64}) b->Args({d, n, r});
  b->UseManualTime()->Unit(benchmark::kMillisecond);
}

double base_flops(const benchmark::State& s) { return 2.0 * double(s.range(0)) * double(s.range(0)) * double(s.range(1)); }
double branch_flops(const benchmark::State& s) { return 4.0 * double(s.range(2)) * double(s.range(0)) * double(s.range(1)); }

void BM_LoRA_Forward(benchmark::State& state) {
  Setup s(state.range(0), state.range(1), state.range(2));
  Matrix Ya;
  peft::bench::interleaved(state, [&] { s.base_forward(); },
                           [&] {
                             s.lora.forward_into(s.X, Ya);
                             benchmark::DoNotOptimize(Ya.data());
                           });
  peft::bench::gflops(state, base_flops(state) + branch_flops(state));
}

void BM_LoRA_ForwardMerged(benchmark::State& state) {
  Setup s(state.range(0), state.range(1), state.range(2));
  s.lora.merge();
  Matrix Ya;
  peft::bench::interleaved(state, [&] { s.base_forward(); },
                           [&] {
                             s.lora.forward_into(s.X, Ya);
                             benchmark::DoNotOptimize(Ya.data());
                           });
  peft::bench::gflops(state, base_flops(state));
}

void BM_LoRA_TrainStep(benchmark::State& state) {
  Setup s(state.range(0), state.range(1), state.range(2));
  peft::LoRA<Matrix>::Cache cache;
  Matrix Ya, dXa;
  peft::bench::interleaved(state, [&] { s.base_step(); },
                           [&] {
                             s.lora.forward_into(s.X, Ya, cache);
                             s.lora.backward_into(s.G, cache, dXa);
                             benchmark::DoNotOptimize(dXa.data());
                           });
  // Branch: forward 2r(d_in + d_out) N, backward about 2r(2 d_in + 3 d_out) N.
  peft::bench::gflops(state, 2 * base_flops(state) + 2.0 * double(state.range(2)) * double(state.range(0)) *
                                                         double(state.range(1)) * 7.0);
}

void BM_LoRA_Merge(benchmark::State& state) {
  Setup s(state.range(0), 1, state.range(2));
  peft::bench::against_pass(
      state, [&] { peft::bench::read_write_pass(s.W); }, [&] { s.lora.merge(); }, [&] { s.lora.unmerge(); }, "merge",
      "unmerge");
}

void MergeArgs(benchmark::internal::Benchmark* b) {
  b->ArgNames({"d", "N", "r"});
  for (int d : {1024, 4096})
    for (int r : {8, 16, 64}) b->Args({d, 1, r});
  b->UseManualTime()->Unit(benchmark::kMillisecond);
}

}  // namespace

BENCHMARK(BM_LoRA_Forward)->Apply(Args);
BENCHMARK(BM_LoRA_ForwardMerged)->Apply(Args);
BENCHMARK(BM_LoRA_TrainStep)->Apply(Args);
BENCHMARK(BM_LoRA_Merge)->Apply(MergeArgs);

PEFT_BENCHMARK_MAIN();
