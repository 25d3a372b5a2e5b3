// The Fashion-MNIST demo's LoRA fine-tuning, data-parallel over MPI ranks:
//
//     mpirun -np 2 ./fashion_mnist_mpi [--quick]
//
// Every rank holds the frozen network and the same two LoRA adapters (fc1, fc2) and the new head; each
// processes its share of every global batch of 128 (peft::BatchShards), and peft::mpi::DataParallel
// averages the gradients, weighted by each rank's examples, before each AdamW step. The data, the network
// and the training code are the single-process demo's (fashion_mnist_model.hpp, fashion_mnist_train.hpp).
//
// Rank 0 pretrains the base network, as the demo does, and broadcasts it (a real run would have every
// rank load the same checkpoint). The adapters are initialized from a different seed on each rank on
// purpose: DataParallel's construction gives every rank rank 0's values, so the ranks cannot start apart.
// Dropout is off: a rank draws masks for its own examples only, so with dropout p ranks would not
// compute what one rank computes.
//
// At the end rank 0 prints the test accuracy and `checksum <value>` (the sum of every trained parameter,
// in double). `--dump FILE` writes the trained parameters; `--compare FILE` compares with such a file
// (written by a run on another number of ranks) and fails unless every parameter agrees within
// --tolerance relative (max |difference| over max |value|, per tensor) and the test accuracy is equal.
// CTest runs `--quick --steps 50` on 1 rank with --dump, then on 2 ranks with --compare.
#include <peft/adapters/lora.hpp>
#include <peft/core/threads.hpp>
#include <peft/distributed/mpi.hpp>
#include <peft/optim/adamw.hpp>
#include <peft/optim/schedule.hpp>

#include "fashion_mnist_model.hpp"
#include "fashion_mnist_train.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

namespace {

using namespace demo;

struct Options {
  std::string data_dir = "/usr/share/datasets/fashion-mnist";
  bool quick = false;
  bool synthetic = false;
  int epochs = 0;           // 0: the mode's default
  long steps = 0;           // stop after this many steps (0: run every epoch)
  std::uint64_t seed = 1;
  int threads = 1;          // per rank
  std::string dump, compare;
  double tolerance = 1e-5;
};

void usage(const char* argv0) {
  std::printf(
      "usage: mpirun -np P %s [--data DIR] [--synthetic] [--quick] [--epochs N] [--steps N] [--seed S]\n"
      "       [--threads N] [--dump FILE] [--compare FILE] [--tolerance T]\n"
      "  --data DIR      Fashion-MNIST's gzip'd IDX files (default /usr/share/datasets/fashion-mnist)\n"
      "  --synthetic     use the built-in synthetic task\n"
      "  --quick         small run with checks (exit code 1 if one fails)\n"
      "  --epochs N      fine-tuning epochs (default 6; quick: 3)\n"
      "  --steps N       stop after N steps (global batches)\n"
      "  --seed S        initialisation, data order and synthetic data (default 1)\n"
      "  --threads N     threads per rank for the matrix products (default 1)\n"
      "  --dump FILE     rank 0 writes the trained parameters and the test accuracy to FILE\n"
      "  --compare FILE  compare with a --dump FILE: fail unless within --tolerance (default 1e-5)\n",
      argv0);
}

// \returns -1 to go on, else the exit code.
int parse_options(int argc, char** argv, Options& o, bool talk) {
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const bool has_value = i + 1 < argc;
    char* end = nullptr;
    if (arg == "--quick") {
      o.quick = true;
    } else if (arg == "--synthetic") {
      o.synthetic = true;
    } else if (arg == "--data" && has_value) {
      o.data_dir = argv[++i];
    } else if (arg == "--dump" && has_value) {
      o.dump = argv[++i];
    } else if (arg == "--compare" && has_value) {
      o.compare = argv[++i];
    } else if ((arg == "--epochs" || arg == "--steps" || arg == "--threads" || arg == "--seed") && has_value) {
      const long v = std::strtol(argv[++i], &end, 10);
      if (*end != '\0' || v < (arg == "--seed" || arg == "--threads" ? 0 : 1) || v > 1000000) {
        if (talk) std::fprintf(stderr, "fashion_mnist_mpi: bad value for %s\n", arg.c_str());
        return 2;
      }
      if (arg == "--epochs") o.epochs = int(v);
      if (arg == "--steps") o.steps = v;
      if (arg == "--threads") o.threads = int(v);
      if (arg == "--seed") o.seed = std::uint64_t(v);
    } else if (arg == "--tolerance" && has_value) {
      o.tolerance = std::strtod(argv[++i], &end);
      if (*end != '\0' || !(o.tolerance >= 0)) {
        if (talk) std::fprintf(stderr, "fashion_mnist_mpi: bad value for --tolerance\n");
        return 2;
      }
    } else if (arg == "--help" || arg == "-h") {
      if (talk) usage(argv[0]);
      return 0;
    } else {
      if (talk) {
        std::fprintf(stderr, "fashion_mnist_mpi: bad argument '%s'\n", arg.c_str());
        usage(argv[0]);
      }
      return 2;
    }
  }
  if (o.epochs == 0) o.epochs = o.quick ? 3 : 6;
  return -1;
}

// The test set's accuracy, each rank predicting a contiguous part of it, the counts summed.
template <class Layer>
double test_accuracy(const Layer& fc1, const Layer& fc2, const Head& head, const Split& test, MPI_Comm comm) {
  int rank = 0, size = 1;
  MPI_Comm_rank(comm, &rank);
  MPI_Comm_size(comm, &size);
  const Index n = test.X.cols(), first = n * rank / size, last = n * (rank + 1) / size;
  const auto layer = [](const Layer& a) { return [&a](const MatrixXf& in, MatrixXf& out) { a.forward_into(in, out); }; };
  const std::vector<int> predicted = argmax(predict(layer(fc1), layer(fc2), head, test.X.middleCols(first, last - first)));
  long right = 0, total = 0;
  for (Index j = first; j < last; ++j) right += predicted[std::size_t(j - first)] == test.y[std::size_t(j)];
  MPI_Allreduce(&right, &total, 1, MPI_LONG, MPI_SUM, comm);
  return double(total) / double(n);
}

// The trained parameters, one tensor per line after the accuracy: "name count v0 v1 ...".
void dump(const std::string& path, peft::AdamW<float>& opt, double test_accuracy) {
  std::ofstream out(path);
  out.precision(9);
  out << "accuracy " << test_accuracy << '\n';
  for (auto& p : opt.flat_parameters()) {
    out << p.slot->name << ' ' << p.value.size();
    for (Index i = 0; i < p.value.size(); ++i) out << ' ' << p.value[i];
    out << '\n';
  }
  if (!out) throw std::runtime_error("cannot write " + path);
}

// \returns the largest relative difference (per tensor: max |a - b| / max |b|) to a dump, or +inf if the
// file does not hold the same tensors; reference_accuracy gets its accuracy, worst_name the tensor.
double compare(const std::string& path, peft::AdamW<float>& opt, double& reference_accuracy, std::string& worst_name) {
  std::ifstream in(path);
  std::string word;
  if (!(in >> word >> reference_accuracy) || word != "accuracy") return std::numeric_limits<double>::infinity();
  double worst = 0;
  for (auto& p : opt.flat_parameters()) {
    Index count = 0;
    if (!(in >> word >> count) || word != p.slot->name || count != p.value.size())
      return std::numeric_limits<double>::infinity();
    double largest = 0, diff = 0;
    for (Index i = 0; i < count; ++i) {
      double v = 0;
      if (!(in >> v)) return std::numeric_limits<double>::infinity();
      largest = std::max(largest, std::abs(v));
      diff = std::max(diff, std::abs(double(p.value[i]) - v));
    }
    const double relative = largest > 0 ? diff / largest : diff;
    if (relative >= worst) {
      worst = relative;
      worst_name = p.slot->name;
    }
  }
  return worst;
}

int run(const Options& o, int rank, int size) {
  const bool root = rank == 0;
  std::FILE* const log = root ? stdout : nullptr;
  const auto say = [&](const char* fmt, auto... args) {
    if (log) std::fprintf(log, fmt, args...);
  };
  peft::set_num_threads(o.threads > 0 ? o.threads : 1);
  const auto t_start = std::chrono::steady_clock::now();

  // Every rank reads the data (the same files, the same standardisation).
  const Data data = load_data(o.data_dir, o.quick, o.synthetic, o.seed);
  const Task& task = data.downstream;
  say("data: %s; %d ranks, %d thread%s each\n", data.source.c_str(), size, o.threads, o.threads == 1 ? "" : "s");

  // The frozen base: rank 0 pretrains it (printing its epochs), every rank receives it.
  Body net;
  if (root) net = pretrain(data.upstream, o.quick ? 2 : 6, o.seed).body;
  peft::mpi::broadcast(net.W1);
  peft::mpi::broadcast(net.b1);
  peft::mpi::broadcast(net.W2);
  peft::mpi::broadcast(net.b2);

  // --- adapter: wrap. LoRA on both hidden layers, as the demo (rank 8, alpha 16, LoRA+), no dropout;
  // seeded differently on each rank: construction of the DataParallel below makes them rank 0's.
  peft::LoRAConfig cfg;
  cfg.rank = 8;
  cfg.alpha = 16;
  cfg.seed = 1 + 1000 * std::uint64_t(rank);
  peft::LoRA<MatrixXf> fc1(net.W1, net.b1, cfg);
  cfg.seed = 2 + 1000 * std::uint64_t(rank);
  peft::LoRA<MatrixXf> fc2(net.W2, net.b2, cfg);
  Head head = new_head(o.seed + 77 + std::uint64_t(rank));

  const double lr = 1e-3;
  peft::AdamWConfig acfg;
  acfg.lr = lr;
  peft::AdamW<float> opt(acfg);
  opt.add(fc1, peft::lora_plus(16));
  opt.add(fc2, peft::lora_plus(16));
  opt.add("head.weight", head.W, head.dW);
  opt.add("head.bias", head.b, head.db, no_decay());
  // --- mpi: one DataParallel over the optimizer, on every rank (collective: the layouts are compared,
  // rank 0's parameters and optimizer state broadcast).
  peft::mpi::DataParallel<peft::AdamW<float>> dp(opt);

  peft::BatchShards shards(task.train.X.cols(), kBatch, rank, size, o.seed);
  Index total_steps = shards.steps_per_epoch() * o.epochs;
  if (o.steps > 0) total_steps = std::min<Index>(total_steps, o.steps);
  const peft::WarmupCosine schedule(lr, total_steps / 10, total_steps);
  say("fine-tuning LoRA r=8 on classes 5-9: %ld trainable parameters, global batch %ld (%ld per rank), "
      "%ld steps\n",
      long(opt.num_parameters()), long(kBatch), long((kBatch + size - 1) / size), long(total_steps));

  Adapted<peft::LoRA<MatrixXf>> layer1(fc1), layer2(fc2);
  Workspace w;
  double reduce_seconds = 0, step_seconds = 0;
  std::size_t bytes_per_step = 0;
  bool bytes_ok = true;
  Index steps = 0;
  double acc = 0;  // test accuracy after each epoch
  for (int epoch = 1; epoch <= o.epochs && steps < total_steps; ++epoch) {
    shards.start_epoch(epoch);
    double sums[2] = {0, 0}, totals[2] = {0, 0};  // loss and examples, over this rank's examples
    for (Index step = 0; step < shards.steps_per_epoch() && steps < total_steps; ++step, ++steps) {
      const auto t0 = std::chrono::steady_clock::now();
      const peft::BatchShards::Slice local = shards.local_batch(step);
      opt.zero_grad();
      if (!local.empty()) {
        w.X.resize(kInput, local.size());
        w.y.resize(std::size_t(local.size()));
        for (Index j = 0; j < local.size(); ++j) {
          w.X.col(j) = task.train.X.col(local[j]);
          w.y[std::size_t(j)] = task.train.y[std::size_t(local[j])];
        }
        // the mean loss over this rank's examples, and its gradients
        sums[0] += double(forward_backward(layer1, layer2, head, true, w)) * double(local.size());
        sums[1] += double(local.size());
      }
      const auto t1 = std::chrono::steady_clock::now();
      // --- mpi: the average over every rank's examples, then the global norm's clipping, then the step
      const peft::mpi::ReduceStats& r = dp.average_gradients(local.size());
      reduce_seconds += seconds_since(t1);
      bytes_per_step = r.bytes;
      bytes_ok = bytes_ok && r.gradient_bytes == std::size_t(opt.num_parameters()) * sizeof(float) &&
                 r.bytes == r.gradient_bytes + sizeof(float);
      dp.clip_grad_norm(1.0f);
      opt.set_lr(schedule(opt.step_count()));
      opt.step();
      step_seconds += seconds_since(t0);
    }
    MPI_Allreduce(sums, totals, 2, MPI_DOUBLE, MPI_SUM, dp.comm());
    acc = test_accuracy(fc1, fc2, head, task.test, dp.comm());  // the last epoch's is the result
    say("  LoRA-mpi   epoch %d  loss %.4f  test accuracy %6.2f %%\n", epoch, totals[0] / totals[1], 100.0 * acc);
  }
  dp.check_in_sync();  // every rank holds the same parameters, bit for bit

  double checksum = 0;
  for (auto& p : opt.flat_parameters()) checksum += p.value.cast<double>().sum();
  say("allreduce per step: %zu bytes in %d call(s) (the %ld gradients, %zu bytes, and the token count); "
      "%.1f %% of the step time on rank 0\n",
      bytes_per_step, dp.last_reduce().calls, long(opt.num_parameters()), dp.last_reduce().gradient_bytes,
      100.0 * reduce_seconds / step_seconds);
  say("test accuracy %.2f %%\n", 100.0 * acc);
  say("checksum %.9e\n", checksum);

  int failed = 0;
  if (root) {
    if (!bytes_ok) {
      std::printf("CHECK FAILED: the bytes allreduced per step are not the gradients' and the token count's\n");
      failed = 1;
    }
    if (o.quick && acc < 0.70) {
      std::printf("CHECK FAILED: test accuracy %.2f %% < 70 %%\n", 100.0 * acc);
      failed = 1;
    }
    if (!o.dump.empty()) {
      try {
        dump(o.dump, opt, acc);
        std::printf("wrote %s\n", o.dump.c_str());
      } catch (const std::exception& e) {
        std::printf("CHECK FAILED: %s\n", e.what());
        failed = 1;
      }
    }
    if (!o.compare.empty()) {
      double reference_accuracy = -1;
      std::string worst_name;
      const double worst = compare(o.compare, opt, reference_accuracy, worst_name);
      std::printf("max relative difference to %s: %.3g in %s (tolerance %.3g); test accuracy there %.2f %%\n",
                  o.compare.c_str(), worst, worst_name.c_str(), o.tolerance, 100.0 * reference_accuracy);
      if (!(worst <= o.tolerance) || reference_accuracy != acc) {
        std::printf("CHECK FAILED: %s\n", worst <= o.tolerance ? "the test accuracy differs"
                                                                : "the parameters differ (or the file does not match)");
        failed = 1;
      }
    }
    std::printf("total time %.1f s\n%s\n", seconds_since(t_start), failed ? "a check failed" : "all checks passed");
  }
  MPI_Bcast(&failed, 1, MPI_INT, 0, dp.comm());
  return failed;
}

}  // namespace

int main(int argc, char** argv) {
  peft::mpi::Session mpi(argc, argv);  // outside the try: an error is reported before MPI_Finalize waits
  try {
    Options options;
    if (const int code = parse_options(argc, argv, options, mpi.rank() == 0); code >= 0) return code;
    return run(options, mpi.rank(), mpi.size());
  } catch (const std::exception& e) {
    // peft::mpi raises its errors on every rank alike, but another error may be this rank's alone, with the
    // others waiting for it in a collective call: end them all.
    std::fprintf(stderr, "fashion_mnist_mpi: rank %d: %s\n", mpi.rank(), e.what());
    if (mpi.size() > 1) MPI_Abort(MPI_COMM_WORLD, 1);
    return 1;
  }
}
