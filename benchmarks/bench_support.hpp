#pragma once
// Shared benchmark helpers: interleaved timing of the frozen base against the adapter, and the
// machine context. Noisy 2-core machines make absolute times unreliable; the ratio of two workloads
// timed alternately in the same loop is not.
#include <peft/peft.hpp>

#include <benchmark/benchmark.h>

#include <chrono>
#include <string>

namespace peft::bench {

using Clock = std::chrono::steady_clock;

/// Runs `base` and `adapter` alternately (which one goes first flips every iteration), reports the
/// adapter's time as the iteration time (UseManualTime) and the counters `ratio_vs_base` (total adapter
/// time / total base time) and `base_ms`, `adapter_ms` (mean per call).
template <class Base, class Adapter>
void interleaved(benchmark::State& state, Base&& base, Adapter&& adapter) {
  double base_s = 0.0, adapter_s = 0.0;
  bool base_first = true;
  base();  // warm-up: caches, allocations, OpenMP threads
  adapter();
  for (auto _ : state) {
    const auto t0 = Clock::now();
    if (base_first) base(); else adapter();
    const auto t1 = Clock::now();
    if (base_first) adapter(); else base();
    const auto t2 = Clock::now();
    const double first = std::chrono::duration<double>(t1 - t0).count();
    const double second = std::chrono::duration<double>(t2 - t1).count();
    const double a = base_first ? second : first;
    base_s += base_first ? first : second;
    adapter_s += a;
    state.SetIterationTime(a);
    base_first = !base_first;
  }
  const double n = static_cast<double>(state.iterations());
  state.counters["ratio_vs_base"] = adapter_s / base_s;
  state.counters["base_ms"] = 1e3 * base_s / n;
  state.counters["adapter_ms"] = 1e3 * adapter_s / n;
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
