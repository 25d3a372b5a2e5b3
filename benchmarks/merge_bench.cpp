// peft-merge's work (peft::io::merge_model) against copying the same file, timed in rotation:
//
//   BM_MergeModel   merge_model(base, adapter, out)  vs  copying base to out through a 1 MiB buffer
//                                                       (read, write, fsync: what any tool must do)
//
// The model is generated once per size in a scratch directory: d/128 layers of four d x d F32
// projections (q, k, v, o), so d = 2048 is a 1 GiB file; the adapter is a LoRA of rank 16 on q_proj and
// v_proj of every layer, as PEFT writes it. Both workloads read the base from the page cache and sync
// their output to disk. Arguments: d. Counters: ratio_vs_copy (merge / copy), copy_ms, merge_ms,
// model_MB.
#include "bench_support.hpp"

#include <peft/io/merge_model.hpp>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <fcntl.h>
#include <unistd.h>

namespace {

namespace fs = std::filesystem;

struct Model {
  fs::path dir;
  std::uint64_t bytes = 0;
  explicit Model(Eigen::Index d) : dir(fs::temp_directory_path() / ("peft_merge_bench_" + std::to_string(::getpid()))) {
    fs::create_directories(dir / "adapter");
    const Eigen::Index layers = d / 128, r = 16;
    const Eigen::MatrixXf W = peft::bench::random_matrix(d, d, 1);
    std::vector<peft::io::TensorSpec> specs;
    const std::vector<std::string> proj = {"q_proj", "k_proj", "v_proj", "o_proj"};
    for (Eigen::Index l = 0; l < layers; ++l)
      for (const auto& p : proj)
        specs.push_back({name(l, p) + ".weight", peft::io::Dtype::F32, {std::uint64_t(d), std::uint64_t(d)}});
    peft::io::SafetensorsWriter w((dir / "model.safetensors").string(), specs, {{"format", "pt"}});
    for (const auto& s : specs) w.write(s.name, W);
    w.commit();
    bytes = fs::file_size(dir / "model.safetensors");
    std::vector<std::pair<std::string, Eigen::MatrixXf>> factors;
    for (Eigen::Index l = 0; l < layers; ++l)
      for (const char* p : {"q_proj", "v_proj"}) {
        factors.emplace_back("base_model.model." + name(l, p) + ".lora_A.weight", peft::bench::random_matrix(r, d, 2));
        factors.emplace_back("base_model.model." + name(l, p) + ".lora_B.weight", peft::bench::random_matrix(d, r, 3));
      }
    peft::io::save_safetensors<float>((dir / "adapter/adapter_model.safetensors").string(), factors);
    std::ofstream((dir / "adapter/adapter_config.json").string())
        << R"({"peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"]})";
  }
  ~Model() {
    std::error_code ec;
    fs::remove_all(dir, ec);
  }
  static std::string name(Eigen::Index layer, const std::string& proj) {
    return "model.layers." + std::to_string(layer) + ".self_attn." + proj;
  }
};

/// Copies `from` to `to` through a 1 MiB buffer and syncs it.
void copy_file(const std::string& from, const std::string& to) {
  const int in = ::open(from.c_str(), O_RDONLY);
  const int out = ::open(to.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  std::vector<char> buf(1 << 20);
  ssize_t n;
  while ((n = ::read(in, buf.data(), buf.size())) > 0)
    if (::write(out, buf.data(), std::size_t(n)) != n) break;
  ::fsync(out);
  ::close(out);
  ::close(in);
}

void BM_MergeModel(benchmark::State& state) {
  const Model model(state.range(0));
  const std::string base = (model.dir / "model.safetensors").string();
  const std::string copy = (model.dir / "copy.safetensors").string();
  const std::string merged = (model.dir / "merged.safetensors").string();
  peft::io::MergeOptions options{base, (model.dir / "adapter").string(), merged, 1.0};
  std::ostringstream report, progress;
  const auto t = peft::bench::rotation<2>(state, {[&] {
                                                    report.str("");
                                                    progress.str("");
                                                    peft::io::merge_model(options, report, progress);
                                                  },
                                                  [&] { copy_file(base, copy); }});
  state.counters["ratio_vs_copy"] = t[0] / t[1];
  state.counters["copy_ms"] = 1e3 * t[1];
  state.counters["merge_ms"] = 1e3 * t[0];
  state.counters["model_MB"] = double(model.bytes) / 1e6;
}

}  // namespace

BENCHMARK(BM_MergeModel)->ArgName("d")->Arg(1024)->Arg(2048)->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(3);
PEFT_BENCHMARK_MAIN()
