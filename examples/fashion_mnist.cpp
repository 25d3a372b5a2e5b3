// Fashion-MNIST transfer learning: the library's adapters inside an existing, hand-written C++ training
// loop, compared with a linear probe and full fine-tuning, then merged for deployment.
//
// The "existing code" is a small MLP (784 -> 256 -> 256 -> classes, ReLU, softmax cross-entropy) with
// its forward and backward written by hand in plain Eigen, as many C++ code bases have one.
//
//   1. Pretrain it on classes 0-4 of Fashion-MNIST (T-shirt, trouser, pullover, dress, coat): the
//      upstream task.
//   2. Fine-tune it on classes 5-9 (sandal, shirt, sneaker, bag, ankle boot) with a new 5-class head,
//      once per method, from the same pretrained weights, same data order and epochs: the head alone
//      (linear probe), full fine-tuning, and LoRA, DoRA, SSF, PiSSA on both hidden layers. The head is
//      trained in every method.
//   3. Print a table: trainable parameters, test accuracy, seconds per epoch.
//   4. For each adapter, merge it into the weights: the user's own plain forward then computes the
//      adapted network (same predictions), at the base network's inference cost. Unmerge: the weights,
//      and the upstream accuracy, are back.
//
// Without the dataset (Debian package dataset-fashion-mnist) or zlib it says so and runs a built-in
// synthetic task of the same shape. `--help` lists the flags; `--quick` is the small run CTest uses.
// It runs on one thread unless told otherwise (`--threads`): the per-batch products are small, and
// Eigen's parallel GEMM busy-waits, so a process that takes the other core made epochs 20 times slower.
//
// What to copy into your own loop is marked in the code with `// --- adapter: <step>` (here, and in
// fashion_mnist_train.hpp, the training code this demo shares with its MPI version fashion_mnist_mpi.cpp):
//   wrap       build one adapter per frozen layer, over your W and b (by reference, no copy)
//   optimizer  register the adapters' parameters (and anything else that trains) with peft::AdamW
//   forward    adapter.forward(X, cache) in place of your layer's W X + b
//   backward   adapter.backward(dY, cache) in place of your layer's hand-written backward, or
//              adapter.backward_params(dY, cache) for the first layer (no dL/dX)
//   merge      merge() for deployment: your plain forward now runs the adapted network at no extra cost
//   unmerge    unmerge() to get the base weights back (PiSSA: then release_to_lora())
#include <peft/peft.hpp>
#include <peft/optim/adamw.hpp>
#include <peft/optim/schedule.hpp>
#ifdef PEFT_DEMO_HAVE_IO
#include <peft/io/adapter_set_io.hpp>
#include <peft/io/safetensors.hpp>
#include <peft/model/adapter_set.hpp>
#endif

#include "fashion_mnist_model.hpp"
#include "fashion_mnist_train.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cctype>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>
#include <utility>
#include <vector>

namespace {

using namespace demo;  // the data and the network: fashion_mnist_model.hpp

// ------------------------------------------------------------------------------------------------
// Command line

struct Options {
  std::string data_dir = "/usr/share/datasets/fashion-mnist";
  bool quick = false;
  bool synthetic = false;
  int epochs = 0;           // fine-tuning epochs per method; 0: the mode's default
  int pretrain_epochs = 0;  // 0: the mode's default
  int threads = 1;          // Eigen's GEMM threads; 0: Eigen's default (OMP_NUM_THREADS, else every core)
  std::uint64_t seed = 1;
  std::string save_dir;     // --save: the pretrained base and each trained adapter, for examples/deploy.cpp
};

void usage(const char* argv0) {
  std::printf(
      "usage: %s [--data DIR] [--synthetic] [--quick] [--epochs N] [--pretrain-epochs N] [--threads N]\n"
      "       [--seed S] [--save DIR]\n"
      "  --data DIR           Fashion-MNIST's gzip'd IDX files (default /usr/share/datasets/fashion-mnist)\n"
      "  --synthetic          use the built-in synthetic task even if the data is there\n"
      "  --quick              small run with checks (exit code 1 if one fails), as CTest runs it\n"
      "  --epochs N           fine-tuning epochs per method (default 6; quick: 1)\n"
      "  --pretrain-epochs N  epochs of the upstream pretraining (default 6; quick: 2)\n"
      "  --threads N          threads of Eigen's GEMM (default 1; 0: OMP_NUM_THREADS, else every core)\n"
      "  --seed S             initialisation, data order and synthetic data (default 1)\n"
      "  --save DIR           write the pretrained base (DIR/base.safetensors) and each trained adapter\n"
      "                       as a PEFT directory (DIR/lora, DIR/dora, DIR/ssf, DIR/pissa), for deploy\n",
      argv0);
}

bool parse_int(const char* text, long min, long max, long& out) {
  char* end = nullptr;
  out = std::strtol(text, &end, 10);
  return end != text && *end == '\0' && out >= min && out <= max;
}

// \returns -1 to go on, else the exit code (0 after --help, 2 for a bad argument).
int parse_options(int argc, char** argv, Options& o) {
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const bool has_value = i + 1 < argc;
    long value = 0;
    if (arg == "--quick") {
      o.quick = true;
    } else if (arg == "--synthetic") {
      o.synthetic = true;
    } else if (arg == "--data" && has_value) {
      o.data_dir = argv[++i];
    } else if (arg == "--epochs" && has_value && parse_int(argv[i + 1], 1, 1000, value)) {
      o.epochs = int(value);
      ++i;
    } else if (arg == "--pretrain-epochs" && has_value && parse_int(argv[i + 1], 1, 1000, value)) {
      o.pretrain_epochs = int(value);
      ++i;
    } else if (arg == "--threads" && has_value && parse_int(argv[i + 1], 0, 1024, value)) {
      o.threads = int(value);
      ++i;
    } else if (arg == "--seed" && has_value && parse_int(argv[i + 1], 0, std::numeric_limits<long>::max(), value)) {
      o.seed = std::uint64_t(value);
      ++i;
    } else if (arg == "--save" && has_value) {
      o.save_dir = argv[++i];
#ifndef PEFT_DEMO_HAVE_IO
      std::fprintf(stderr, "fashion_mnist: --save needs peft::io (nlohmann-json: apt-get install nlohmann-json3-dev)\n");
      return 2;
#endif
    } else if (arg == "--help" || arg == "-h") {
      usage(argv[0]);
      return 0;
    } else {
      std::fprintf(stderr, "fashion_mnist: bad argument '%s'\n", arg.c_str());
      usage(argv[0]);
      return 2;
    }
  }
  if (o.epochs == 0) o.epochs = o.quick ? 1 : 6;
  if (o.pretrain_epochs == 0) o.pretrain_epochs = o.quick ? 2 : 6;
  return -1;
}


// ------------------------------------------------------------------------------------------------
// The comparison

struct Setup {
  const Options& options;
  const Data& data;
  Body pretrained;     // the pristine pretrained body: every method starts from it
  Head upstream_head;  // the pretrained classifier of classes 0-4
  double upstream_accuracy = 0.0;
  std::vector<std::string> failures;  // failed checks
};

struct MergeReport {
  Index changed_predictions = 0;  // merged vs unmerged argmax, over the downstream test set
  float max_dY = 0.0f;            // max |logits merged - logits unmerged|
  double merged_ratio = 0.0;      // plain forward with merged weights / with the base weights
  double unmerged_ratio = 0.0;    // forward through the unmerged adapters / plain base forward
  float max_dW = 0.0f;            // after unmerge: max |W - W0| and |b - b0| over both layers
  float max_W0 = 0.0f;
  double upstream_accuracy = 0.0;  // the base network's upstream accuracy after unmerge
  double merged_accuracy = 0.0;    // the merged network's downstream test accuracy
  std::string refused;             // the library's message if it refused the merge (W untouched)
};

struct MethodResult {
  std::string name;
  std::string label;  // "lora", ...: its directory under --save
  Index parameters = 0;
  double test_accuracy = 0.0;
  double seconds_per_epoch = 0.0;
  bool adapter = false;
  MergeReport merge;
};

// Best-of-`reps` times of two callables, run alternately so that load changes hit both alike.
template <class F, class G>
std::pair<double, double> best_times(F&& f, G&& g, int reps) {
  double best_f = 1e300, best_g = 1e300;
  for (int i = 0; i < reps; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    f();
    best_f = std::min(best_f, seconds_since(t0));
    t0 = std::chrono::steady_clock::now();
    g();
    best_g = std::min(best_g, seconds_since(t0));
  }
  return {best_f, best_g};
}

float max_abs_diff(const MatrixXf& a, const MatrixXf& b) { return (a - b).cwiseAbs().maxCoeff(); }

// Step 4: merge both adapters, compare the user's plain forward on the merged weights with the adapted
// network, time it against the base, unmerge, and check that the base network is back.
template <class Adapter, class RestoreBase>
MergeReport merge_and_unmerge(Adapter& fc1, Adapter& fc2, Body& net, const Head& head, RestoreBase&& restore_base,
                              Setup& s) {
  const MatrixXf& X = s.data.downstream.test.X;
  const int reps = s.options.quick ? 2 : 7;
  MergeReport m;
  const auto adapted_layer = [](const Adapter& a) {
    return [&a](const MatrixXf& in, MatrixXf& out) { a.forward_into(in, out); };
  };
  const MatrixXf Y_adapter = predict(adapted_layer(fc1), adapted_layer(fc2), head, X);

  // --- adapter: merge. W <- W + dW (SSF: also b): from here on the user's plain forward (`predict(net,
  // ...)`, which knows nothing about adapters) computes the fine-tuned network.
  try {
    fc1.merge();
    fc2.merge();
  } catch (const peft::Error& e) {  // refused before writing anything: W is as it was
    m.refused = e.what();
    if (fc1.is_merged()) fc1.unmerge();
    restore_base();
    return m;
  }
  const MatrixXf Y_merged = predict(net, head, X);
  m.merged_accuracy = accuracy(Y_merged, s.data.downstream.test.y);
  const std::vector<int> p_adapter = argmax(Y_adapter), p_merged = argmax(Y_merged);
  for (std::size_t j = 0; j < p_adapter.size(); ++j) m.changed_predictions += p_adapter[j] != p_merged[j];
  m.max_dY = max_abs_diff(Y_merged, Y_adapter);
  MatrixXf sink;
  const auto t_merged =
      best_times([&] { sink = predict(s.pretrained, head, X); }, [&] { sink = predict(net, head, X); }, reps);
  m.merged_ratio = t_merged.second / t_merged.first;

  // --- adapter: unmerge. W back to the pretrained weights (within rounding); PiSSA's W now holds its
  // residual, which restore_base() replaces by the original weight.
  fc1.unmerge();
  fc2.unmerge();
  const auto t_unmerged = best_times([&] { sink = predict(s.pretrained, head, X); },
                                     [&] { sink = predict(adapted_layer(fc1), adapted_layer(fc2), head, X); }, reps);
  m.unmerged_ratio = t_unmerged.second / t_unmerged.first;
  restore_base();

  m.max_dW = std::max({max_abs_diff(net.W1, s.pretrained.W1), max_abs_diff(net.b1, s.pretrained.b1),
                       max_abs_diff(net.W2, s.pretrained.W2), max_abs_diff(net.b2, s.pretrained.b2)});
  m.max_W0 = std::max({s.pretrained.W1.cwiseAbs().maxCoeff(), s.pretrained.b1.cwiseAbs().maxCoeff(),
                       s.pretrained.W2.cwiseAbs().maxCoeff(), s.pretrained.b2.cwiseAbs().maxCoeff()});
  m.upstream_accuracy = accuracy(predict(net, s.upstream_head, s.data.upstream.test.X), s.data.upstream.test.y);
  return m;
}

// --save: the trained adapters of one method as a PEFT adapter directory DIR/<name> (fc1 and fc2 adapted,
// the new head as modules_to_save), and the pretrained base as DIR/base.safetensors with PyTorch's names
// (fc1.weight, fc1.bias, fc2.*, head.*). examples/deploy.cpp loads them in another process.
#ifdef PEFT_DEMO_HAVE_IO
template <class Adapter>
void save_adapter(const std::string& name, const Adapter& fc1, const Adapter& fc2, Body& net, Head& head,
                  const Setup& s) {
  if (s.options.save_dir.empty()) return;
  peft::ModelWeights<MatrixXf> model;
  model.add("fc1", net.W1, net.b1);
  model.add("fc2", net.W2, net.b2);
  model.add("head", head.W, head.b);
  peft::AdapterSet<MatrixXf> set(model);
  set.insert("fc1", peft::AnyAdapter<float>(Adapter(fc1)));  // copies: they share W and b, not the parameters
  set.insert("fc2", peft::AnyAdapter<float>(Adapter(fc2)));
  set.train_whole("head");
  peft::io::SaveOptions options;
  options.base_model_name_or_path = "base.safetensors";
  peft::io::save_peft(set, s.options.save_dir + "/" + name, options);
}

void save_base(const Setup& s) {
  if (s.options.save_dir.empty()) return;
  const Body& b = s.pretrained;
  const Head& h = s.upstream_head;
  const bool synthetic = s.data.source.compare(0, 9, "synthetic") == 0;
  peft::io::Metadata meta{{"format", "pt"},
                          {"demo.data", s.options.data_dir},
                          {"demo.synthetic", synthetic ? "1" : "0"},
                          {"demo.quick", s.options.quick ? "1" : "0"},
                          {"demo.seed", std::to_string(s.options.seed)}};
  std::filesystem::create_directories(s.options.save_dir);
  peft::io::save_safetensors<float>(s.options.save_dir + "/base.safetensors",
                                    {{"fc1.bias", b.b1}, {"fc1.weight", b.W1}, {"fc2.bias", b.b2},
                                     {"fc2.weight", b.W2}, {"head.bias", h.b}, {"head.weight", h.W}},
                                    peft::io::Dtype::F32, meta);
}
#else
template <class Adapter>
void save_adapter(const std::string&, const Adapter&, const Adapter&, Body&, Head&, const Setup&) {}
void save_base(const Setup&) {}
#endif

// Fine-tunes through two adapters (and the head), then merges and unmerges them. `add_adapters`
// registers the adapters' parameters with the optimizer; `restore_base` runs after unmerge.
std::string label_lower(const char* label) {
  std::string out(label);
  for (char& c : out) c = char(std::tolower(static_cast<unsigned char>(c)));
  return out;
}

template <class Adapter, class AddAdapters, class RestoreBase>
MethodResult run_adapter(const char* name, const char* label, const char* how, Adapter& fc1, Adapter& fc2, double lr,
                         AddAdapters&& add_adapters, RestoreBase&& restore_base, Body& net, Setup& s) {
  Head head = new_head(s.options.seed + 77);
  MethodResult r;
  r.name = name;
  r.label = label_lower(label);
  r.adapter = true;
  {
    // --- adapter: optimizer. The adapters' parameters, plus the new head (a plain Eigen matrix and
    // its gradient). Nothing else is registered: W and b stay frozen.
    peft::AdamWConfig cfg;
    cfg.lr = lr;
    peft::AdamW<float> opt(cfg);
    add_adapters(opt);
    opt.add("head.weight", head.W, head.dW);
    opt.add("head.bias", head.b, head.db, no_decay());
    r.parameters = Index(opt.num_parameters());
    std::printf("%s: %s; AdamW lr %.0e; %ld trainable\n", name, how, lr, long(r.parameters));

    Adapted<Adapter> layer1(fc1), layer2(fc2);
    const TrainResult t =
        train(label, layer1, layer2, head, true, opt, lr, s.data.downstream, s.options.epochs, s.options.seed);
    r.test_accuracy = t.test_accuracy;
    r.seconds_per_epoch = t.seconds_per_epoch;
  }  // the optimizer holds pointers into the adapters and the head: it goes first
  save_adapter(r.label, fc1, fc2, net, head, s);
  r.merge = merge_and_unmerge(fc1, fc2, net, head, restore_base, s);
  return r;
}

// Linear probe (train_body false) or full fine-tuning: the user's own Dense layers.
MethodResult run_plain(const char* name, const char* label, const char* how, bool train_body, double lr, Body& net,
                       Setup& s) {
  Head head = new_head(s.options.seed + 77);
  Dense layer1(net.W1, net.b1), layer2(net.W2, net.b2);
  peft::AdamWConfig cfg;
  cfg.lr = lr;
  peft::AdamW<float> opt(cfg);
  if (train_body) add_body(opt, net, layer1, layer2);
  add_head(opt, head);
  MethodResult r;
  r.name = name;
  r.parameters = Index(opt.num_parameters());
  std::printf("%s: %s; AdamW lr %.0e; %ld trainable\n", name, how, lr, long(r.parameters));
  const TrainResult t =
      train(label, layer1, layer2, head, train_body, opt, lr, s.data.downstream, s.options.epochs, s.options.seed);
  r.test_accuracy = t.test_accuracy;
  r.seconds_per_epoch = t.seconds_per_epoch;
  return r;
}

// Pretraining on the upstream task, with the user's own layers and loop (fashion_mnist_train.hpp).
void pretrain(Setup& s) {
  Pretrained p = demo::pretrain(s.data.upstream, s.options.pretrain_epochs, s.options.seed);
  s.pretrained = std::move(p.body);
  s.upstream_head = std::move(p.head);
  s.upstream_accuracy = p.accuracy;
}

void check(Setup& s, bool ok, const std::string& what) {
  if (!ok) s.failures.push_back(what);
}

}  // namespace

int main(int argc, char** argv) {
  Options options;
  if (const int exit_code = parse_options(argc, argv, options); exit_code >= 0) return exit_code;
  const auto t_start = std::chrono::steady_clock::now();
  if (options.threads > 0) Eigen::setNbThreads(options.threads);

  const Data data = load_data(options.data_dir, options.quick, options.synthetic, options.seed);
  std::printf("data: %s\n", data.source.c_str());
  std::printf("  upstream   (classes 0-4): %ld train, %ld test images\n", long(data.upstream.train.X.cols()),
              long(data.upstream.test.X.cols()));
  std::printf("  downstream (classes 5-9): %ld train, %ld test images\n", long(data.downstream.train.X.cols()),
              long(data.downstream.test.X.cols()));
  std::printf("model: MLP 784 -> 256 -> 256 -> 5, ReLU, softmax cross-entropy; batch %ld, AdamW, warm-up + cosine\n",
              long(kBatch));
  std::printf("epochs: %d pretraining, %d per fine-tuning method%s; Eigen threads: %d\n\n", options.pretrain_epochs,
              options.epochs, options.quick ? " (quick mode)" : "", Eigen::nbThreads());

  Setup s{options, data, {}, {}, 0.0, {}};
  pretrain(s);
  save_base(s);
  std::printf("pretrained: upstream test accuracy %.2f %%\n\n", 100.0 * s.upstream_accuracy);

  std::printf(
      "fine-tuning on the downstream task (classes 5-9), from the same pretrained weights, with the same\n"
      "freshly initialised 5-class head (trained by every method)\n");
  Body net = s.pretrained;  // the network every method adapts; reset to the pretrained body before each
  std::vector<MethodResult> results;

  results.push_back(run_plain("head only (linear probe)", "probe", "the body frozen", false, 3e-2, net, s));
  net = s.pretrained;
  results.push_back(run_plain("full fine-tuning", "full", "every weight and bias", true, 3e-3, net, s));
  net = s.pretrained;

  {  // LoRA on both hidden layers, rank 8, alpha 16, LoRA+ (lora_B at 16 x the learning rate)
    // --- adapter: wrap. Each adapter holds its layer's W and b by reference (no copy); B = 0, so the
    // network starts exactly as the pretrained one. Give each layer its own seed.
    peft::LoRAConfig cfg;
    cfg.rank = 8;
    cfg.alpha = 16;
    cfg.seed = 1;
    peft::LoRA<MatrixXf> fc1(net.W1, net.b1, cfg);
    cfg.seed = 2;
    peft::LoRA<MatrixXf> fc2(net.W2, net.b2, cfg);
    results.push_back(run_adapter(
        "LoRA r=8 (LoRA+)", "LoRA", "rank 8, alpha 16, lora_B at 16 x lr", fc1, fc2, 1e-3,
        [&](peft::AdamW<float>& opt) {  // --- adapter: optimizer (LoRA+: lora_B learns 16 x faster)
          opt.add(fc1, peft::lora_plus(16));
          opt.add(fc2, peft::lora_plus(16));
        },
        [] {}, net, s));
  }
  net = s.pretrained;

  {  // DoRA: LoRA's direction update plus a trained magnitude per output row
    peft::DoRAConfig cfg;
    cfg.rank = 8;
    cfg.alpha = 16;
    cfg.seed = 1;
    peft::DoRA<MatrixXf> fc1(net.W1, net.b1, cfg);
    cfg.seed = 2;
    peft::DoRA<MatrixXf> fc2(net.W2, net.b2, cfg);
    results.push_back(run_adapter(
        "DoRA r=8", "DoRA", "rank 8, alpha 16", fc1, fc2, 3e-3,
        [&](peft::AdamW<float>& opt) {  // no weight decay: it would pull the magnitudes towards 0
          opt.add(fc1, no_decay());
          opt.add(fc2, no_decay());
        },
        [] {}, net, s));
  }
  net = s.pretrained;

  {  // SSF: a scale and a shift per output feature of each hidden layer
    peft::SSFConfig cfg;
    cfg.seed = 1;
    peft::SSF<MatrixXf> fc1(net.W1, net.b1, cfg);
    cfg.seed = 2;
    peft::SSF<MatrixXf> fc2(net.W2, net.b2, cfg);
    results.push_back(run_adapter(
        "SSF", "SSF", "a scale and a shift per hidden feature", fc1, fc2, 1e-2,
        [&](peft::AdamW<float>& opt) {  // no weight decay: it would pull the scales towards 0
          opt.add(fc1, no_decay());
          opt.add(fc2, no_decay());
        },
        [] {}, net, s));
  }
  net = s.pretrained;

  {  // PiSSA: LoRA started from each weight's top-8 singular triplets (randomized SVD); W becomes the residual
    peft::PiSSAConfig cfg;
    cfg.rank = 8;
    cfg.alpha = 8;
    cfg.svd_iterations = 2;
    cfg.seed = 1;
    peft::PiSSA<MatrixXf> fc1(net.W1, net.b1, cfg);
    cfg.seed = 2;
    peft::PiSSA<MatrixXf> fc2(net.W2, net.b2, cfg);
    results.push_back(run_adapter(
        "PiSSA r=8 (randomized SVD)", "PiSSA", "rank 8, alpha 8, 2 power iterations", fc1, fc2, 6e-3,
        [&](peft::AdamW<float>& opt) {  // no weight decay: A and B hold the principal part of W
          opt.add(fc1, no_decay());
          opt.add(fc2, no_decay());
        },
        [&] {
          // --- adapter: unmerge (PiSSA). W holds the residual; put the original weight back (the trained
          // adapter comes back as a rank-2r LoRA on it, which we do not need here).
          std::move(fc1).release_to_lora();
          std::move(fc2).release_to_lora();
        },
        net, s));
  }
  net = s.pretrained;

  // The table.
  const double full_parameters = double(results[1].parameters);
  const double probe_accuracy = results[0].test_accuracy, full_accuracy = results[1].test_accuracy;
  std::printf("\n%-28s %12s %10s %15s %9s\n", "method", "trainable", "% of full", "test accuracy", "s/epoch");
  for (const MethodResult& r : results)
    std::printf("%-28s %12ld %9.2f%% %14.2f%% %9.2f\n", r.name.c_str(), long(r.parameters),
                100.0 * double(r.parameters) / full_parameters, 100.0 * r.test_accuracy, r.seconds_per_epoch);
  std::printf("(trainable parameters include the new head's %ld)\n", long(kClasses * (kHidden + 1)));

  // Merging.
  std::printf("\nmerged into the weights (downstream test set, %ld images), then unmerged:\n",
              long(data.downstream.test.X.cols()));
  std::printf("%-28s %11s %10s %14s %15s %11s %15s\n", "adapter", "same preds", "max |dY|", "merged/base t",
              "unmerged/base t", "max |dW|", "upstream acc");
  for (const MethodResult& r : results) {
    if (!r.adapter) continue;
    const MergeReport& m = r.merge;
    const Index n = data.downstream.test.X.cols();
    if (!m.refused.empty()) {
      std::printf("%-28s merge refused: %s\n", r.name.c_str(), m.refused.c_str());
      check(s, false, r.name + ": merge refused");
      continue;
    }
    std::printf("%-28s %5ld/%-5ld %10.2e %14.2f %15.2f %11.1e %14.2f%%\n", r.name.c_str(),
                long(n - m.changed_predictions), long(n), double(m.max_dY), m.merged_ratio, m.unmerged_ratio,
                double(m.max_dW), 100.0 * m.upstream_accuracy);
    check(s, m.changed_predictions == 0, r.name + ": merged predictions differ from the adapter's");
    check(s, m.max_dY <= 1e-3f, r.name + ": merged logits differ by more than 1e-3");
    check(s, m.max_dW <= 1e-5f * m.max_W0, r.name + ": unmerge did not restore the weights within rounding");
    check(s, m.upstream_accuracy == s.upstream_accuracy, r.name + ": upstream accuracy not restored after unmerge");
  }
  std::printf(
      "same preds: argmax of the merged network (the plain forward) = the adapted network's; max |dY|: of\n"
      "the logits; merged/base t: plain forward on the merged weights / on the base weights (same code);\n"
      "unmerged/base t: forward through the unmerged adapters / plain base forward (times: best of %d);\n"
      "after unmerge: max |dW| = max |W - W0|, |b - b0|; upstream acc: the base network (pretrained: %.2f %%)\n",
      options.quick ? 2 : 7, 100.0 * s.upstream_accuracy);
  for (const MethodResult& r : results)
    if (r.adapter) check(s, r.test_accuracy > 2.0 / kClasses, r.name + ": accuracy not above twice chance");

  std::printf("\n");
  for (const MethodResult& r : results) {
    if (!r.adapter) continue;
    std::printf("%-28s %+6.2f points vs linear probe, %+6.2f vs full fine-tuning\n", r.name.c_str(),
                100.0 * (r.test_accuracy - probe_accuracy), 100.0 * (r.test_accuracy - full_accuracy));
  }
  if (!options.save_dir.empty()) {
    // What deploy (another process, from the saved files alone) must reproduce: the merged accuracies.
    std::ofstream out(options.save_dir + "/merged_accuracy.txt");
    std::printf("\nsaved %s/base.safetensors (the pretrained network) and, as PEFT adapter directories:\n",
                options.save_dir.c_str());
    for (const MethodResult& r : results) {
      if (!r.adapter) continue;
      char line[128];
      std::snprintf(line, sizeof line, "%s %.17g\n", r.label.c_str(), r.merge.merged_accuracy);
      out << line;
      std::printf("  %s/%-6s merged downstream test accuracy %.2f %%\n", options.save_dir.c_str(), r.label.c_str(),
                  100.0 * r.merge.merged_accuracy);
    }
    check(s, bool(out.flush()), "writing " + options.save_dir + "/merged_accuracy.txt");
  }
  std::printf("\ntotal time %.1f s\n", seconds_since(t_start));
  if (!s.failures.empty()) {
    for (const std::string& f : s.failures) std::printf("CHECK FAILED: %s\n", f.c_str());
    return 1;
  }
  std::printf("all checks passed\n");
  return 0;
}
