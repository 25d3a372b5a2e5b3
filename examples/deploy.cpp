// Deployment in another process: the pretrained network and one trained adapter, from the files the
// demo wrote (`bash scripts/demo.sh --save DIR`), merged into the weights, then the user's plain
// forward on the downstream test set. Nothing of the training run is needed but those files.
//
//   deploy --model DIR/base.safetensors --adapter DIR/lora [--data DIR] [--expect DIR/merged_accuracy.txt]
//          [--merged FILE]
//
// --expect: fail (exit 1) unless the accuracy equals the one the training run measured on its merged
// network (the file the demo wrote beside the adapters). --merged: a model merged by `peft-merge --base
// DIR/base.safetensors --adapter DIR/lora --out FILE`; fail unless its weights are the ones merged here
// (within float rounding: the same formula, summed in another order).
#include <peft/io/adapter_set_io.hpp>
#include <peft/io/safetensors.hpp>
#include <peft/model/adapter_set.hpp>

#include "fashion_mnist_model.hpp"

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>

using namespace demo;

namespace {

int usage() {
  std::fprintf(stderr,
               "usage: deploy --model DIR/base.safetensors --adapter DIR/<method> [--data DIR]\n"
               "              [--expect DIR/merged_accuracy.txt] [--merged FILE]\n");
  return 2;
}

// The relative difference of two tensors (0 when equal bit for bit).
double relative_difference(const MatrixXf& a, const MatrixXf& b) {
  const double scale = std::max(1e-30, double(b.cwiseAbs().maxCoeff()));
  return double((a - b).cwiseAbs().maxCoeff()) / scale;
}

}  // namespace

int main(int argc, char** argv) {
  std::string model_path, adapter_dir, data_dir, expect_path, merged_path;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (i + 1 >= argc) return usage();
    const std::string value = argv[++i];
    if (arg == "--model") model_path = value;
    else if (arg == "--adapter") adapter_dir = value;
    else if (arg == "--data") data_dir = value;
    else if (arg == "--expect") expect_path = value;
    else if (arg == "--merged") merged_path = value;
    else return usage();
  }
  if (model_path.empty() || adapter_dir.empty()) return usage();
  while (adapter_dir.size() > 1 && adapter_dir.back() == '/') adapter_dir.pop_back();

  try {
    // --- deploy: the base network from its file, in the user's own structs.
    const peft::io::SafetensorsFile base(model_path);
    Body net{base->read<float>("fc1.weight"), base->read<float>("fc1.bias"), base->read<float>("fc2.weight"),
             base->read<float>("fc2.bias")};
    Head head{base->read<float>("head.weight"), {}, base->read<float>("head.bias"), {}};
    // The data the demo ran on (its settings are in the base file's metadata).
    const auto& meta = base->metadata();
    const auto setting = [&](const char* key) {
      const auto it = meta.find(key);
      if (it == meta.end()) throw peft::FormatError(model_path + " has no \"" + key + "\" metadata: not the demo's");
      return it->second;
    };
    const Data data = load_data(data_dir.empty() ? setting("demo.data") : data_dir, setting("demo.quick") == "1",
                                setting("demo.synthetic") == "1", std::stoull(setting("demo.seed")));

    // --- deploy: the adapter directory onto those weights (the new head comes from its modules_to_save),
    // merged: from here on the plain forward computes the fine-tuned network at the base's cost.
    peft::ModelWeights<MatrixXf> model;
    model.add("fc1", net.W1, net.b1);
    model.add("fc2", net.W2, net.b2);
    model.add("head", head.W, head.b);
    peft::AdapterSet<MatrixXf> adapters = peft::io::load_peft(adapter_dir, model);
    adapters.merge();
    const double acc = accuracy(predict(net, head, data.downstream.test.X), data.downstream.test.y);
    std::printf("%s: %zu adapted modules, merged downstream test accuracy %.2f %% (%ld images; data: %s)\n",
                adapter_dir.c_str(), adapters.size(), 100.0 * acc, long(data.downstream.test.X.cols()),
                data.source.c_str());

    int failures = 0;
    if (!expect_path.empty()) {
      const std::string method = adapter_dir.substr(adapter_dir.find_last_of('/') + 1);
      std::ifstream in(expect_path);
      std::string name;
      double expected = -1;
      for (double value; in >> name >> value;)
        if (name == method) expected = value;
      if (expected < 0) throw peft::FileError(expect_path + " has no line for \"" + method + "\"");
      const bool same = acc == expected;
      std::printf("%s: the training run's merged accuracy was %.2f %%: %s\n", same ? "ok" : "FAILED",
                  100.0 * expected, same ? "the same" : "different");
      failures += same ? 0 : 1;
    }
    if (!merged_path.empty()) {
      const peft::io::SafetensorsFile merged(merged_path);
      const double d1 = relative_difference(merged->read<float>("fc1.weight"), net.W1);
      const double d2 = relative_difference(merged->read<float>("fc2.weight"), net.W2);
      const bool head_same = merged->read<float>("head.weight") == head.W &&
                             MatrixXf(merged->read<float>("head.bias")) == MatrixXf(head.b);
      const bool ok = d1 <= 1e-6 && d2 <= 1e-6 && head_same;
      std::printf("%s: peft-merge's %s: fc1, fc2 within %.1e and %.1e relative of the weights merged here, head %s\n",
                  ok ? "ok" : "FAILED", merged_path.c_str(), d1, d2, head_same ? "identical" : "DIFFERENT");
      failures += ok ? 0 : 1;
    }
    return failures == 0 ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "deploy: %s\n", e.what());
    return 1;
  }
}
