#pragma once
// What every benchmark shares: a frozen layer with its inputs and the base work it is measured against,
// the timing of several workloads in rotation in one loop, and the machine context. Noisy 2-core
// machines make absolute times unreliable; the ratio of workloads timed alternately in the same loop is
// not.
#include <peft/peft.hpp>

#include <benchmark/benchmark.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif

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

namespace detail {

/// FMAs in `chains` independent dependency chains of `Vec` (at least twice the FMA latency times the
/// FMA ports, so that the loop is bound by the ports' throughput alone), `iterations` times; returns
/// the flops done and a value that depends on every result (so nothing is optimised away).
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PEFT_BENCH_FMA_CHAINS(X, P, Q) \
  X(0, P, Q) X(1, P, Q) X(2, P, Q) X(3, P, Q) X(4, P, Q) X(5, P, Q) X(6, P, Q) X(7, P, Q) X(8, P, Q) X(9, P, Q) X(10, P, Q) X(11, P, Q)
// Twelve named accumulators, not an array: an array is kept in memory unless the compiler unrolls
// the loop over it (GCC at -O2 does not), and the probe then measures store forwarding instead.
#define PEFT_BENCH_FMA_PROBE(NAME, TARGET, VEC, SET1, FMA, LANES)                                      \
  __attribute__((target(TARGET))) inline double NAME(std::int64_t iterations, float* sink) {          \
    const VEC mul = SET1(0.9999999f), add = SET1(1e-7f);                                              \
    PEFT_BENCH_FMA_CHAINS(PEFT_BENCH_FMA_INIT, VEC, SET1)                                             \
    for (std::int64_t i = 0; i < iterations; ++i) {                                                  \
      PEFT_BENCH_FMA_CHAINS(PEFT_BENCH_FMA_STEP, FMA, _)                                              \
    }                                                                                                \
    const VEC acc[] = {a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11};                             \
    float lanes[LANES];                                                                              \
    float total = 0.0f;                                                                              \
    for (const VEC& v : acc) {                                                                       \
      std::memcpy(lanes, &v, sizeof lanes);                                                          \
      for (float x : lanes) total += x;                                                              \
    }                                                                                                \
    *sink = total;                                                                                   \
    return 2.0 * LANES * 12 * double(iterations);                                                    \
  }
#define PEFT_BENCH_FMA_INIT(c, VEC, SET1) VEC a##c = SET1(1.0f + 1e-3f * float(c));
#define PEFT_BENCH_FMA_STEP(c, FMA, unused) a##c = FMA(a##c, mul, add);
PEFT_BENCH_FMA_PROBE(fma_avx2, "avx2,fma", __m256, _mm256_set1_ps, _mm256_fmadd_ps, 8)
PEFT_BENCH_FMA_PROBE(fma_avx512, "avx512f", __m512, _mm512_set1_ps, _mm512_fmadd_ps, 16)
#undef PEFT_BENCH_FMA_PROBE
#undef PEFT_BENCH_FMA_INIT
#undef PEFT_BENCH_FMA_STEP
#undef PEFT_BENCH_FMA_CHAINS
#endif

/// float GFLOP/s of `threads` threads each running `probe` at once, for about `seconds`.
template <class Probe>
double probe_rate(Probe probe, int threads, double seconds) {
  std::int64_t iterations = 1 << 16;
  float sink = 0.0f;
  for (;;) {  // one thread: grow the count until one run takes a tenth of the time
    const auto t0 = Clock::now();
    probe(iterations, &sink);
    if (std::chrono::duration<double>(Clock::now() - t0).count() > seconds / 10) break;
    iterations *= 2;
  }
  iterations *= 10;
  std::vector<double> flops(std::size_t(threads), 0.0);
  std::vector<float> sinks(std::size_t(threads), 0.0f);
  std::vector<std::thread> pool;
  const auto t0 = Clock::now();
  for (int t = 0; t < threads; ++t)
    pool.emplace_back([&, t] { flops[std::size_t(t)] = probe(iterations, &sinks[std::size_t(t)]); });
  for (auto& th : pool) th.join();
  const double wall = std::chrono::duration<double>(Clock::now() - t0).count();
  benchmark::DoNotOptimize(sinks.data());
  double total = 0.0;
  for (double f : flops) total += f;
  return total / wall * 1e-9;
}

}  // namespace detail

/// \brief The machine's measured float peak, GFLOP/s on `threads` threads at once: the best of FMA
/// loops in AVX2 and AVX-512 (those the CPU has, whatever the build's own flags), each thread running
/// independent chains that no latency bounds. 0 where it cannot be probed (not x86-64 with FMA).
/// Measured once (a quarter of a second or so), then cached.
inline double peak_gflops(int threads) {
  static double cached = -1.0;
  static int cached_threads = 0;
  if (cached >= 0.0 && cached_threads == threads) return cached;
  double best = 0.0;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    best = std::max(best, detail::probe_rate(detail::fma_avx2, threads, 0.1));
  if (__builtin_cpu_supports("avx512f"))
    best = std::max(best, detail::probe_rate(detail::fma_avx512, threads, 0.1));
#endif
  cached = best;
  cached_threads = threads;
  return best;
}

/// Adds the GFLOPS counter and, where the peak is known, `peak_GFLOPS` (peak_gflops() on the products'
/// threads) and `of_peak`, the rate over it: the efficiency column.
inline void gflops_of_peak(benchmark::State& state, double flops, double seconds_per_iteration) {
  const double rate = flops / seconds_per_iteration * 1e-9;
  state.counters["GFLOPS"] = rate;
  const double peak = peak_gflops(peft::num_threads());
  if (peak > 0.0) {
    state.counters["peak_GFLOPS"] = peak;
    state.counters["of_peak"] = rate / peak;
  }
}

/// Records the machine facts that make ratios comparable: the threads and SIMD, the BLAS backend,
/// peft's version.
inline void add_context() {
  benchmark::AddCustomContext("threads", std::to_string(peft::num_threads()));
  benchmark::AddCustomContext("blas_backend", peft::blas_backend ? "OpenBLAS" : "none (Eigen's GEMM)");
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
