// A Hugging Face PEFT adapter merged into a model's weights in C++: the deployment path.
//
//   merge_adapter                          makes a small model and a PEFT LoRA directory in a scratch
//                                          directory (as Python would have saved them), then merges
//   merge_adapter MODEL.safetensors DIR    merges the adapter directory DIR into the model's weights in
//                                          memory and prints what changed (the files are only read)
//
// Two ways, which must agree: the weights read with SafetensorsFile and merged with the Eigen-only
// free functions of peft/io/merge.hpp (what an inference server holding its own weights does), and
// peft::io::merge_model, what the peft-merge program runs, writing a merged file.
#include <peft/core/random.hpp>
#include <peft/io/merge.hpp>
#include <peft/io/merge_model.hpp>
#include <peft/io/peft_adapter.hpp>
#include <peft/io/safetensors.hpp>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>

#include <unistd.h>

namespace fs = std::filesystem;

namespace {

/// A two-layer model and a LoRA (rank 4, rsLoRA) on one of its projections, as PEFT would save it.
void make_demo(const fs::path& dir) {
  fs::create_directories(dir / "adapter");
  peft::Rng rng(7);
  Eigen::MatrixXf q(32, 32), o(32, 32), A(4, 32), B(32, 4);
  rng.fill_uniform(q, -1, 1);
  rng.fill_uniform(o, -1, 1);
  rng.fill_uniform(A, -0.2, 0.2);
  rng.fill_uniform(B, -0.2, 0.2);
  peft::io::save_safetensors<float>((dir / "model.safetensors").string(),
                                    {{"model.layers.0.self_attn.q_proj.weight", q},
                                     {"model.layers.0.self_attn.o_proj.weight", o}},
                                    peft::io::Dtype::BF16, {{"format", "pt"}});
  peft::io::save_safetensors<float>((dir / "adapter/adapter_model.safetensors").string(),
                                    {{"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", A},
                                     {"base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight", B}});
  std::ofstream(dir / "adapter/adapter_config.json")
      << R"({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_rslora": true, "target_modules": ["q_proj"],
             "bias": "none", "task_type": "CAUSAL_LM"})";
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 1 && argc != 3) {
    std::cerr << "usage: merge_adapter [MODEL.safetensors ADAPTER_DIR]\n";
    return 2;
  }
  const fs::path scratch = fs::temp_directory_path() / ("peft_merge_adapter_" + std::to_string(::getpid()));
  try {
    std::string model, adapter_dir;
    if (argc == 3) {
      model = argv[1];
      adapter_dir = argv[2];
    } else {
      make_demo(scratch);
      model = (scratch / "model.safetensors").string();
      adapter_dir = (scratch / "adapter").string();
    }

    // 1. In memory: the adapter read and checked, each adapted weight read (as float) and merged.
    const peft::io::PeftAdapter<float> adapter(adapter_dir);
    const peft::io::SafetensorsFile base(model);
    std::cout << adapter.modules().size() << " adapted modules ("
              << (adapter.config().use_dora ? "DoRA" : "LoRA") << ", rsLoRA " << std::boolalpha
              << adapter.config().use_rslora << ")\n";
    for (const auto& m : adapter.modules()) {
      Eigen::MatrixXf W = base.view().read<float>(m.path + ".weight");
      const Eigen::MatrixXf W0 = W;
      if (m.magnitude.size())
        peft::merge::dora(W, m.A, m.B, m.magnitude, m.scale, adapter.config().fan_in_fan_out);
      else
        peft::merge::lora(W, m.A, m.B, m.scale, adapter.config().fan_in_fan_out);
      std::printf("  %-45s r=%ld s=%.4f  largest change %.4g\n", m.path.c_str(), long(m.A.rows()), m.scale,
                  double((W - W0).cwiseAbs().maxCoeff()));
    }

    // 2. As peft-merge does it, into a file (only for the demo's own files: yours are only read).
    if (argc == 1) {
      const std::string merged = (scratch / "merged.safetensors").string();
      std::ostringstream report, progress;
      peft::io::merge_model({model, adapter_dir, merged, 1.0}, report, progress);
      std::cout << report.str();
      // The merged file holds the BF16 rounding of what step 1 computed in float.
      const peft::io::SafetensorsFile out(merged);
      const auto& m = adapter.modules().front();
      Eigen::MatrixXf W = base.view().read<float>(m.path + ".weight");
      peft::merge::lora(W, m.A, m.B, m.scale);
      const Eigen::MatrixXf got = out.view().read<float>(m.path + ".weight");
      const float gap = (got - W).cwiseAbs().maxCoeff() / W.cwiseAbs().maxCoeff();
      std::printf("merged file vs in-memory merge: largest gap %.3g of max |W| (BF16 keeps 8 bits)\n", gap);
      fs::remove_all(scratch);
      if (!(gap <= 1.0f / 256)) return 1;
    }
    return 0;
  } catch (const peft::Error& e) {
    std::cerr << "merge_adapter: " << e.what() << "\n";
    std::error_code ec;
    fs::remove_all(scratch, ec);
    return 1;
  }
}
