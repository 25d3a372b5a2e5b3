#pragma once
// What every benchmark shares: a frozen layer with its inputs and the base work it is measured against,
// the timing of several workloads in rotation in one loop, and the machine context. Noisy 2-core
// machines make absolute times unreliable; the ratio of workloads timed alternately in the same loop is
// not.
#include <peft/peft.hpp>

#include <benchmark/benchmark.h>

#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>

namespace peft::bench {

using Clock = std::chrono::steady_clock;
using Matrix = Eigen::MatrixXf;
using Vector = Eigen::VectorXf;

/// A rows x cols float matrix with entries U(-1, 1) from the seed.
inline Matrix random_matrix(Eigen::Index rows, Eigen::Index cols, std::uint64_t seed) {
  Matrix m(rows, cols);
  peft::Rng(seed).fill_uniform(m, -1.0, 1.0);
  return m;
}

/// A frozen d_out x d_in layer (W, b), N tokens of input X and upstream gradient G, and the base work of
/// that shape: the forward `W X + b` and a training step's `W X + b` and `Wᵀ G`, into Y and dX.
struct Layer {
  Matrix W;
  Vector b;
  Matrix X, G, Y, dX;

  Layer(Eigen::Index d_out, Eigen::Index d_in, Eigen::Index tokens)
      : W(random_matrix(d_out, d_in, 1)),
        b(random_matrix(d_out, 1, 2)),
        X(random_matrix(d_in, tokens, 3)),
        G(random_matrix(d_out, tokens, 4)),
        Y(d_out, tokens),
        dX(d_in, tokens) {}

  void base_forward() {
    Y.noalias() = W * X;
    Y.colwise() += b;
    benchmark::DoNotOptimize(Y.data());
  }
  void base_step() {
    base_forward();
    dX.noalias() = W.transpose() * G;
    benchmark::DoNotOptimize(dX.data());
  }
};

/// Runs the workloads in rotation (which one goes first moves on every iteration), after one warm-up
/// call each (caches, buffers, OpenMP threads); reports the first one's time as the iteration time
/// (UseManualTime) and returns each one's mean time per call, in seconds.
template <std::size_t K>
std::array<double, K> rotation(benchmark::State& state, const std::array<std::function<void()>, K>& work) {
  std::array<double, K> total{};
  for (const auto& w : work) w();
  std::size_t first = 0;
  for (auto _ : state) {
    for (std::size_t k = 0; k < K; ++k) {
      const std::size_t i = (first + k) % K;
      const auto t0 = Clock::now();
      work[i]();
      const double seconds = std::chrono::duration<double>(Clock::now() - t0).count();
      total[i] += seconds;
      if (i == 0) state.SetIterationTime(seconds);
    }
    first = (first + 1) % K;
  }
  for (auto& t : total) t /= double(state.iterations());
  return total;
}

/// The adapter against the base work, in rotation: the adapter's time is the iteration time, and the
/// counters are `ratio_vs_base` (adapter / base) and the mean `base_ms`, `adapter_ms`.
inline void interleaved(benchmark::State& state, std::function<void()> base, std::function<void()> adapter) {
  const auto t = rotation<2>(state, {std::move(adapter), std::move(base)});
  state.counters["ratio_vs_base"] = t[0] / t[1];
  state.counters["base_ms"] = 1e3 * t[1];
  state.counters["adapter_ms"] = 1e3 * t[0];
}

/// One read-and-write pass over m (m *= 1, the factor hidden from the optimiser): the unit in which
/// merge and fold costs are reported.
template <class M>
void read_write_pass(M& m) {
  static volatile float one_v = 1.0f;
  const typename M::Scalar one = static_cast<typename M::Scalar>(one_v);
  m *= one;
  benchmark::DoNotOptimize(m.data());
}

/// Times `pass` (one read-and-write pass over a weight), then `apply` and `undo`, in every iteration;
/// reports `apply`'s time as the iteration time and the counters `<apply_name>_vs_pass`,
/// `<undo_name>_vs_pass` and `pass_ms`.
template <class Pass, class Apply, class Undo>
void against_pass(benchmark::State& state, Pass pass, Apply apply, Undo undo, const std::string& apply_name,
                  const std::string& undo_name) {
  double pass_s = 0.0, apply_s = 0.0, undo_s = 0.0;
  for (auto _ : state) {
    const auto t0 = Clock::now();
    pass();
    const auto t1 = Clock::now();
    apply();
    const auto t2 = Clock::now();
    undo();
    const auto t3 = Clock::now();
    pass_s += std::chrono::duration<double>(t1 - t0).count();
    apply_s += std::chrono::duration<double>(t2 - t1).count();
    undo_s += std::chrono::duration<double>(t3 - t2).count();
    state.SetIterationTime(std::chrono::duration<double>(t2 - t1).count());
  }
  state.counters[apply_name + "_vs_pass"] = apply_s / pass_s;
  state.counters[undo_name + "_vs_pass"] = undo_s / pass_s;
  state.counters["pass_ms"] = 1e3 * pass_s / double(state.iterations());
}

/// Adds a GFLOPS counter: `flops` per iteration, as a rate over the (manual) iteration time.
inline void gflops(benchmark::State& state, double flops) {
  state.counters["GFLOPS"] = benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

/// Records the machine facts that make ratios comparable: Eigen's threads and SIMD, peft's version.
inline void add_context() {
  benchmark::AddCustomContext("eigen_threads", std::to_string(Eigen::nbThreads()));
  benchmark::AddCustomContext("eigen_simd", Eigen::SimdInstructionSetsInUse());
  benchmark::AddCustomContext("peft_version", peft::version_string);
}

}  // namespace peft::bench

/// BENCHMARK_MAIN with the context added first.
#define PEFT_BENCHMARK_MAIN()                                   \
  int main(int argc, char** argv) {                             \
    peft::bench::add_context();                                 \
    benchmark::Initialize(&argc, argv);                         \
    if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1; \
    benchmark::RunSpecifiedBenchmarks();                        \
    benchmark::Shutdown();                                      \
    return 0;                                                   \
  }
