// PiSSA initialisation: exact SVD (BDCSVD) against the randomized SVD with q power iterations.
//
//   BM_PiSSA_Init          one init (SVD, factors, W <- W − s B A) per iteration; q = 0 is the exact SVD
//   BM_PiSSA_InitVsExact   the randomized init and the exact init timed alternately in the same loop
//
// Arguments: d (d_out = d_in), r (rank), q (power iterations; 0 = exact). The weight has a decaying
// spectrum (σ_i = 0.95^i over 256 directions, plus a 1e-3 noise floor). Counters: residual = ‖W_res‖_F,
// the Frobenius norm of what the rank-r part leaves (the best possible is the exact SVD's);
// ratio_vs_base and residual_vs_exact in the interleaved benchmark.
#include "bench_support.hpp"

namespace {

using Matrix = Eigen::MatrixXf;

Matrix decaying(Eigen::Index d) {
  const Eigen::Index k = std::min<Eigen::Index>(256, d);
  Matrix G1(d, k), G2(d, k), noise(d, d);
  peft::Rng rng(7);
  rng.fill_normal(G1, 0.0, 1.0 / std::sqrt(double(d)));
  rng.fill_normal(G2, 0.0, 1.0 / std::sqrt(double(d)));
  rng.fill_normal(noise, 0.0, 1e-3 / std::sqrt(double(d)));
  Eigen::VectorXf s(k);
  for (Eigen::Index i = 0; i < k; ++i) s(i) = std::pow(0.95f, float(i));
  Matrix W = noise;
  W.noalias() += G1 * s.asDiagonal() * G2.transpose();
  return W;
}

peft::PiSSAConfig config(Eigen::Index r, int q) {
  peft::PiSSAConfig cfg;
  cfg.rank = r;
  cfg.alpha = double(r);
  cfg.svd_iterations = q;
  return cfg;
}

// One init on a fresh copy of W0 (the copy is not timed); returns the seconds and ‖W_res‖_F.
std::pair<double, double> init_once(const Matrix& W0, Matrix& W, Eigen::Index r, int q) {
  W = W0;
  const auto t0 = peft::bench::Clock::now();
  peft::PiSSA<Matrix> pissa(W, config(r, q));
  const auto t1 = peft::bench::Clock::now();
  benchmark::DoNotOptimize(pissa.A().data());
  return {std::chrono::duration<double>(t1 - t0).count(), double(W.norm())};
}

void BM_PiSSA_Init(benchmark::State& state) {
  const Matrix W0 = decaying(state.range(0));
  Matrix W;
  double residual = 0.0;
  for (auto _ : state) {
    const auto [seconds, res] = init_once(W0, W, state.range(1), int(state.range(2)));
    state.SetIterationTime(seconds);
    residual = res;
  }
  state.counters["residual"] = residual;
}

void BM_PiSSA_InitVsExact(benchmark::State& state) {
  const Matrix W0 = decaying(state.range(0));
  Matrix W;
  double exact_s = 0.0, rand_s = 0.0, exact_res = 0.0, rand_res = 0.0;
  for (auto _ : state) {
    const auto [te, re] = init_once(W0, W, state.range(1), 0);
    const auto [tr, rr] = init_once(W0, W, state.range(1), int(state.range(2)));
    exact_s += te;
    rand_s += tr;
    exact_res = re;
    rand_res = rr;
    state.SetIterationTime(tr);
  }
  state.counters["ratio_vs_base"] = rand_s / exact_s;
  state.counters["exact_ms"] = 1e3 * exact_s / double(state.iterations());
  state.counters["residual_vs_exact"] = rand_res / exact_res;
}

}  // namespace

BENCHMARK(BM_PiSSA_Init)
    ->ArgNames({"d", "r", "q"})
    ->ArgsProduct({{1024, 2048}, {16}, {0, 1, 2, 4}})
    ->ArgsProduct({{4096}, {16}, {1, 2, 4}})
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_PiSSA_InitVsExact)
    ->ArgNames({"d", "r", "q"})
    ->Args({1024, 16, 4})
    ->Args({2048, 16, 4})
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond)
    ->Iterations(2);

PEFT_BENCHMARK_MAIN();
