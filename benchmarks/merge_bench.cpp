// peft-merge's work (peft::io::merge_model) against copying the same file, and peft-export-gguf's DoRA
// approximation against merging the same layer, timed in rotation:
//
//   BM_MergeModel    merge_model(base, adapter, out)  vs  copying base to out through a 1 MiB buffer
//                                                        (read, write, fsync: what any tool must do)
//   BM_DoraLowRank   dora_low_rank(randomized) and dora_low_rank(exact SVD)  vs  peft::merge::dora of the
//                    same d x d float layer (DoRA's own merge, the base work of the same shape); rank 16,
//                    r = 16, the magnitude ‖W0 + sBA‖ moved by up to 1 %. Counters: randomized_vs_merge,
//                    exact_vs_merge, and each one's relative error ‖ΔW − U S Vᵀ‖_F / ‖ΔW‖_F.
//
// The model is generated once per size in a scratch directory: d/128 layers of four d x d F32
// projections (q, k, v, o), so d = 2048 is a 1 GiB file; the adapter is a LoRA of rank 16 on q_proj and
// v_proj of every layer, as PEFT writes it. Both workloads read the base from the page cache and sync
// their output to disk. Arguments: d. Counters: ratio_vs_copy (merge / copy), copy_ms, merge_ms,
// model_MB.
#include "bench_support.hpp"

#include <peft/io/gguf_export.hpp>
#include <peft/io/merge.hpp>
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

void BM_DoraLowRank(benchmark::State& state) {
  const Eigen::Index d = state.range(0), r = 16, K = 16;
  const fs::path dir = fs::temp_directory_path() / ("peft_dora_bench_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  const Eigen::MatrixXf W = peft::bench::random_matrix(d, d, 1);
  peft::io::save_safetensors<float>((dir / "model.safetensors").string(), {{"w.weight", W}});
  const peft::io::SafetensorsFile file((dir / "model.safetensors").string());
  peft::io::PeftModule<double> m;
  m.path = "w";
  m.A = peft::bench::random_matrix(r, d, 2).cast<double>() * 0.1;
  m.B = peft::bench::random_matrix(d, r, 3).cast<double>() * 0.1;
  // A trained magnitude: ‖W0 + s B A‖ per row, moved by up to 1 % (DoRA starts from ‖W0‖ and learns it).
  const Eigen::MatrixXd V = W.cast<double>() + 2.0 * m.B * m.A;
  m.magnitude = V.rowwise().norm().cwiseProduct(
      (Eigen::VectorXd::Ones(d) + 0.01 * peft::bench::random_matrix(d, 1, 4).cast<double>()));
  const Eigen::MatrixXf Af = m.A.cast<float>(), Bf = m.B.cast<float>();
  const Eigen::VectorXf mf = m.magnitude.cast<float>();
  Eigen::MatrixXf merged = W;
  double randomized_error = 0, exact_error = 0;
  const auto t = peft::bench::rotation<3>(
      state, {[&] {
                randomized_error = peft::io::dora_low_rank(file.view(), file.view().at("w.weight"), m, 2.0, K,
                                                           peft::io::SvdMethod::Randomized).relative_error;
              },
              [&] {
                exact_error = peft::io::dora_low_rank(file.view(), file.view().at("w.weight"), m, 2.0, K,
                                                      peft::io::SvdMethod::Exact).relative_error;
              },
              [&] {
                merged = W;
                peft::merge::dora(merged, Af, Bf, mf, 2.0);
                benchmark::DoNotOptimize(merged.data());
              }});
  state.counters["randomized_vs_merge"] = t[0] / t[2];
  state.counters["exact_vs_merge"] = t[1] / t[2];
  state.counters["randomized_error"] = randomized_error;
  state.counters["exact_error"] = exact_error;
  std::error_code ec;
  fs::remove_all(dir, ec);
}

}  // namespace

BENCHMARK(BM_DoraLowRank)->ArgName("d")->Arg(1024)->Arg(2048)->Arg(4096)->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(1);
BENCHMARK(BM_MergeModel)->ArgName("d")->Arg(1024)->Arg(2048)->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(3);
PEFT_BENCHMARK_MAIN()
