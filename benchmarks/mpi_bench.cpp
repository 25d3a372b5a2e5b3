// Data-parallel training steps under MPI: what the gradient allreduce costs against the step it belongs
// to. Run it on several ranks (scripts/bench.sh --mpi does, on 2):
//
//     mpirun -np 2 ./mpi_bench [--iterations=N] [Google Benchmark flags]
//
//   BM_MPI_DemoStep   the Fashion-MNIST demo's LoRA step (784 -> 256 -> 256 -> 5, LoRA r = 8 on both
//                     hidden layers, the head trained), global batch 128 split between the ranks:
//                     forward and backward of this rank's share, DataParallel::average_gradients,
//                     clipping, AdamW
//   BM_MPI_LayerStep  one d x d layer (d = 4096) with LoRA r = 16 at N = 512 tokens over all ranks:
//                     forward_into and backward_into (dX, as inside a network) of this rank's share,
//                     then the same allreduce and step
//   BM_MPI_Allreduce  average_gradients alone, on those two gradient sizes (the ranks arrive together,
//                     so this is the wire's cost, without waiting for a slower rank)
//
// Counters (rank 0's): allreduce_share, the allreduce's time over the whole step's, both measured in the
// same iterations; bytes, what one allreduce carries. The time is wall-clock (an allreduce waits, it
// does not compute).
//
// Every rank must run the same benchmarks the same number of times, or the collective calls would not
// match: each runs a fixed number of iterations (--iterations, default 50) instead of Google Benchmark's
// adaptive count; rank 0 alone reports.
#include <peft/adapters/lora.hpp>
#include <peft/core/threads.hpp>
#include <peft/distributed/mpi.hpp>
#include <peft/optim/adamw.hpp>

#include "bench_support.hpp"
#include "fashion_mnist_train.hpp"

#include <benchmark/benchmark.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

using peft::bench::Clock;
using Eigen::MatrixXf;
using Eigen::VectorXf;

int g_iterations = 50;

double since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

void report(benchmark::State& state, double reduce_seconds, double step_seconds, std::size_t bytes) {
  state.counters["allreduce_share"] = reduce_seconds / step_seconds;
  state.counters["bytes"] = double(bytes);
  int size = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  state.counters["ranks"] = size;
}

// The demo's network with LoRA on both hidden layers, random weights and data of the demo's shapes.
struct Demo {
  demo::Body net;
  demo::Head head = demo::new_head(3);
  peft::LoRA<MatrixXf> fc1, fc2;
  peft::AdamW<float> opt;
  demo::Workspace w;
  demo::Adapted<peft::LoRA<MatrixXf>> layer1, layer2;
  int rank = 0, size = 1;

  static peft::LoRAConfig config(std::uint64_t seed) {
    peft::LoRAConfig c;
    c.rank = 8;
    c.alpha = 16;
    c.seed = seed;
    c.init = peft::LoRAInit::random;
    return c;
  }
  static demo::Body body() {
    peft::Rng rng(1);
    demo::Body b;
    demo::init_linear(rng, b.W1, b.b1, demo::kHidden, demo::kInput);
    demo::init_linear(rng, b.W2, b.b2, demo::kHidden, demo::kHidden);
    return b;
  }
  Demo()
      : net(body()),
        fc1(net.W1, net.b1, config(1)),
        fc2(net.W2, net.b2, config(2)),
        layer1(fc1),
        layer2(fc2) {
    opt.add(fc1, peft::ParamOptions{1.0, true, 1.0, "fc1"});
    opt.add(fc2, peft::ParamOptions{1.0, true, 1.0, "fc2"});
    opt.add("head.weight", head.W, head.dW);
    opt.add("head.bias", head.b, head.db);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    const Eigen::Index local = (demo::kBatch - rank + size - 1) / size;  // this rank's share of 128
    w.X = peft::bench::random_matrix(demo::kInput, local, 5 + std::uint64_t(rank));
    w.y.resize(std::size_t(local));
    for (std::size_t j = 0; j < w.y.size(); ++j) w.y[j] = int(j % demo::kClasses);
  }
};

void BM_MPI_DemoStep(benchmark::State& state) {
  Demo d;
  peft::mpi::DataParallel<peft::AdamW<float>> dp(d.opt);
  double reduce = 0, step = 0;
  for (auto _ : state) {
    const auto t0 = Clock::now();
    d.opt.zero_grad();
    demo::forward_backward(d.layer1, d.layer2, d.head, true, d.w);
    const auto t1 = Clock::now();
    dp.average_gradients(d.w.X.cols());
    reduce += since(t1);
    dp.clip_grad_norm(1.0f);
    d.opt.step();
    step += since(t0);
  }
  report(state, reduce, step, dp.last_reduce().bytes);
}

peft::LoRAConfig layer_config(Eigen::Index r) {
  peft::LoRAConfig c = Demo::config(3);
  c.rank = r;
  c.alpha = 2.0 * double(r);
  return c;
}

// One d x d layer with bias and LoRA r, N tokens over all ranks.
void BM_MPI_LayerStep(benchmark::State& state) {
  const Eigen::Index d = state.range(0), n = state.range(1), r = state.range(2);
  MatrixXf W = peft::bench::random_matrix(d, d, 1);
  VectorXf b = VectorXf::Zero(d);
  peft::LoRA<MatrixXf> lora(W, b, layer_config(r));
  peft::AdamW<float> opt;
  opt.add(lora);
  int rank = 0, size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  const Eigen::Index local = (n - rank + size - 1) / size;
  const MatrixXf X = peft::bench::random_matrix(d, local, 7 + std::uint64_t(rank));
  const MatrixXf G = peft::bench::random_matrix(d, local, 9 + std::uint64_t(rank));
  MatrixXf Y(d, local), dX(d, local);
  peft::LoRA<MatrixXf>::Cache cache;
  peft::mpi::DataParallel<peft::AdamW<float>> dp(opt);
  double reduce = 0, step = 0;
  for (auto _ : state) {
    const auto t0 = Clock::now();
    opt.zero_grad();
    lora.forward_into(X, Y, cache);
    lora.backward_into(G, cache, dX);
    const auto t1 = Clock::now();
    dp.average_gradients(local);
    reduce += since(t1);
    dp.clip_grad_norm(1.0f);
    opt.step();
    step += since(t0);
  }
  report(state, reduce, step, dp.last_reduce().bytes);
}

// average_gradients alone, the ranks in step with each other (a barrier before each call).
void BM_MPI_Allreduce(benchmark::State& state) {
  const Eigen::Index elements = state.range(0);
  MatrixXf value = MatrixXf::Zero(elements, 1), grad = MatrixXf::Ones(elements, 1);
  peft::AdamW<float> opt;
  opt.add("gradients", value, grad);
  peft::mpi::DataParallel<peft::AdamW<float>> dp(opt);
  double reduce = 0;
  for (auto _ : state) {
    state.PauseTiming();
    MPI_Barrier(MPI_COMM_WORLD);
    state.ResumeTiming();
    const auto t0 = Clock::now();
    dp.average_gradients(64);
    reduce += since(t0);
  }
  state.counters["bytes"] = double(dp.last_reduce().bytes);
  state.counters["us_per_call"] = 1e6 * reduce / double(state.iterations());
}

void register_all() {
  benchmark::RegisterBenchmark("BM_MPI_DemoStep", BM_MPI_DemoStep)
      ->Iterations(g_iterations)->UseRealTime()->Unit(benchmark::kMicrosecond);
  benchmark::RegisterBenchmark("BM_MPI_LayerStep", BM_MPI_LayerStep)
      ->ArgNames({"d", "N", "r"})->Args({4096, 512, 16})
      ->Iterations(std::max(1, g_iterations / 10))->UseRealTime()->Unit(benchmark::kMillisecond);
  const Eigen::Index demo_gradients = Demo().opt.num_parameters();
  benchmark::RegisterBenchmark("BM_MPI_Allreduce", BM_MPI_Allreduce)
      ->ArgNames({"elements"})->Arg(demo_gradients)->Arg(2 * 4096 * 16)
      ->Iterations(g_iterations)->UseRealTime()->Unit(benchmark::kMicrosecond);
}

// Rank 0 reports; the others run the same benchmarks silently.
class Silent : public benchmark::BenchmarkReporter {
 public:
  bool ReportContext(const Context&) override { return true; }
  void ReportRuns(const std::vector<Run>&) override {}
};

}  // namespace

int main(int argc, char** argv) {
  peft::mpi::Session mpi(argc, argv);
  std::vector<char*> args;
  for (int i = 0; i < argc; ++i) {
    if (std::strncmp(argv[i], "--iterations=", 13) == 0)
      g_iterations = std::max(1, std::atoi(argv[i] + 13));
    else
      args.push_back(argv[i]);
  }
  int n = int(args.size());
  benchmark::Initialize(&n, args.data());
  if (benchmark::ReportUnrecognizedArguments(n, args.data())) return 1;
  peft::set_num_threads(1);  // one thread per rank: the ranks share the cores
  register_all();
  if (mpi.rank() == 0) {
    benchmark::RunSpecifiedBenchmarks();
  } else {
    Silent silent;
    benchmark::RunSpecifiedBenchmarks(&silent);
  }
  return 0;
}
