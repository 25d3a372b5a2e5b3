// The serial no-heap product (peft::detail::stack_product, which DoRA's training step runs where Eigen
// would run the base product serially) against Eigen's own GEMM of the same product, timed in rotation:
//
//   BM_StackProduct   stack_product(out, op(W), X)  vs  out.noalias() = op(W) * X  on Eigen's threads
//                                                   and on one thread (Eigen::setNbThreads(1))
//
// Arguments: d (W is d x d), N (columns of X: r + tokens, e.g. 17 for r = 16 at one token), lhs (0: a
// column-major W, 1: a row-major W, 2: the transpose of a column-major W, as in an input gradient).
// Counters: vs_parallel and vs_serial (stack_product's time over Eigen's), stack_ms, GFLOPS.
#include "bench_support.hpp"

namespace {

using peft::bench::Matrix;
using RowMajor = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

template <class Lhs>
void run(benchmark::State& state, const Lhs& lhs, const Matrix& X) {
  Matrix out(lhs.rows(), X.cols()), ref(lhs.rows(), X.cols()), serial(lhs.rows(), X.cols());
  const int threads = Eigen::nbThreads();
  const auto t = peft::bench::rotation<3>(
      state, {[&] {
                peft::detail::stack_product(out, lhs, X, 1.0f, false);
                benchmark::DoNotOptimize(out.data());
              },
              [&] {
                ref.noalias() = lhs * X;
                benchmark::DoNotOptimize(ref.data());
              },
              [&] {
                Eigen::setNbThreads(1);
                serial.noalias() = lhs * X;
                Eigen::setNbThreads(threads);
                benchmark::DoNotOptimize(serial.data());
              }});
  if (!out.isApprox(ref, 1e-4f)) state.SkipWithError("stack_product differs from Eigen's product");
  state.counters["vs_parallel"] = t[0] / t[1];
  state.counters["vs_serial"] = t[0] / t[2];
  state.counters["stack_ms"] = 1e3 * t[0];
  peft::bench::gflops(state, 2.0 * double(lhs.rows()) * double(lhs.cols()) * double(X.cols()));
}

void BM_StackProduct(benchmark::State& state) {
  const Eigen::Index d = state.range(0), n = state.range(1);
  const Matrix W = peft::bench::random_matrix(d, d, 1);
  const Matrix X = peft::bench::random_matrix(d, n, 2);
  if (state.range(2) == 0) {
    run(state, W, X);
  } else if (state.range(2) == 1) {
    const RowMajor Wr = W;
    run(state, Wr, X);
  } else {
    run(state, W.transpose(), X);
  }
}

void Args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"d", "N", "lhs"});
  for (int d : {1024, 4096})
    for (int n : {17, 48, 96})
      for (int lhs : {0, 1, 2}) b->Args({d, n, lhs});
  b->UseManualTime()->Unit(benchmark::kMillisecond);
}

}  // namespace

BENCHMARK(BM_StackProduct)->Apply(Args);
PEFT_BENCHMARK_MAIN()
