#pragma once
// What the GGUF export tests share (gguf_export_test.cpp, gguf_end_to_end_test.cpp): a small Llama-shaped
// model's Hugging Face config, PEFT adapter directories written as Hugging Face PEFT writes them (its key
// names and config fields, random factors stored as float32), llama.cpp's converter's rotary row order
// written out here, PEFT's merge and llama.cpp's merge of an exported adapter in float, and the check
// that an exported file's every module merges by llama.cpp's formula as PEFT merges the original.
#include "support/catch.hpp"
#include "support/files.hpp"
#include "support/gguf_reader.hpp"
#include "support/scratch.hpp"

#include <peft/io/gguf_export.hpp>
#include <peft/io/safetensors.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <map>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace peft::test::gguf_fixture {

using Eigen::Index;
using Eigen::MatrixXd;
using Eigen::MatrixXf;
using Eigen::VectorXd;

/// A Llama-shaped model's shapes and config.json: by default hidden 16, 4 heads of 4 (2 key-value heads),
/// intermediate 24, 2 layers, vocabulary 32.
struct Model {
  std::string architecture = "LlamaForCausalLM";
  Index hidden = 16, heads = 4, kv_heads = 2, head_dim = 4, intermediate = 24, layers = 2, vocab = 32;
  bool tied = false;
  std::string json() const {
    std::ostringstream s;
    s << R"({"architectures": [")" << architecture << R"("], "model_type": "x", "hidden_size": )" << hidden
      << R"(, "intermediate_size": )" << intermediate << R"(, "num_hidden_layers": )" << layers
      << R"(, "num_attention_heads": )" << heads << R"(, "num_key_value_heads": )" << kv_heads
      << R"(, "vocab_size": )" << vocab << R"(, "rms_norm_eps": 1e-6, "tie_word_embeddings": )"
      << (tied ? "true" : "false") << "}";
    return s.str();
  }
  /// (d_out, d_in) of a module path's weight.
  std::pair<Index, Index> shape(const std::string& path) const {
    const auto ends = [&](const char* t) { return path.size() >= std::strlen(t) && path.compare(path.size() - std::strlen(t), std::string::npos, t) == 0; };
    if (ends("q_proj")) return {heads * head_dim, hidden};
    if (ends("k_proj") || ends("v_proj")) return {kv_heads * head_dim, hidden};
    if (ends("o_proj")) return {hidden, heads * head_dim};
    if (ends("gate_proj") || ends("up_proj")) return {intermediate, hidden};
    if (ends("down_proj")) return {hidden, intermediate};
    if (path == "lm_head") return {vocab, hidden};
    FAIL("no shape for " << path);
    return {0, 0};
  }
};

inline const std::vector<std::string> projections = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                              "self_attn.o_proj", "mlp.gate_proj",    "mlp.up_proj",
                                              "mlp.down_proj"};

inline std::vector<std::string> all_modules(const Model& m, bool lm_head) {
  std::vector<std::string> out;
  for (Index l = 0; l < m.layers; ++l)
    for (const auto& p : projections) out.push_back("model.layers." + std::to_string(l) + "." + p);
  if (lm_head) out.push_back("lm_head");
  return out;
}

struct ModuleFactors {
  MatrixXd A, B;
  VectorXd magnitude;
};

/// Writes a PEFT adapter directory: adapter_config.json (with `config_extra` fields) and
/// adapter_model.safetensors with PEFT's key names, ranks from `rank_of`; factors as float32.
inline std::map<std::string, ModuleFactors> write_adapter(const std::string& dir, const Model& model,
                                                   const std::vector<std::string>& modules, Index r, double alpha,
                                                   const std::string& config_extra,
                                                   const std::map<std::string, Index>& rank_of = {},
                                                   bool dora = false, unsigned seed = 1) {
  std::filesystem::create_directories(dir);
  std::ostringstream c;
  c << R"({"peft_type": "LORA", "r": )" << r << R"(, "lora_alpha": )" << alpha << R"(, "use_dora": )"
    << (dora ? "true" : "false") << R"(, "bias": "none", "target_modules": ["q_proj"])" << config_extra << "}";
  write_file(dir + "/adapter_config.json", c.str());
  std::vector<std::pair<std::string, MatrixXd>> tensors;
  std::map<std::string, ModuleFactors> out;
  unsigned k = seed * 1000;
  for (const auto& path : modules) {
    const auto [d_out, d_in] = model.shape(path);
    const auto it = rank_of.find(path);
    const Index rank = it == rank_of.end() ? r : it->second;
    ModuleFactors f;
    f.A = uniform_matrix(rank, d_in, ++k, 0.5);
    f.B = uniform_matrix(d_out, rank, ++k, 0.5);
    // What the file holds, as the float32 the exporter reads.
    f.A = f.A.cast<float>().cast<double>();
    f.B = f.B.cast<float>().cast<double>();
    const std::string key = "base_model.model." + path;
    tensors.emplace_back(key + ".lora_A.weight", f.A);
    tensors.emplace_back(key + ".lora_B.weight", f.B);
    if (dora) {
      f.magnitude = (uniform_matrix(d_out, 1, ++k, 0.5).array() + 1.0).matrix().cast<float>().cast<double>();
      tensors.emplace_back(key + ".lora_magnitude_vector", MatrixXd(f.magnitude));
    }
    out[path] = f;
  }
  peft::io::save_safetensors<double>(dir + "/adapter_model.safetensors", tensors, peft::io::Dtype::F32);
  return out;
}

/// llama.cpp's converter's reordering of q_proj / k_proj rows, written as the converter writes it:
/// reshape(heads, 2, h/2, cols), swap the middle axes, reshape back.
template <class M>
M llama_permute(const M& W, Index heads) {
  const Index h = W.rows() / heads;
  M out(W.rows(), W.cols());
  for (Index head = 0; head < heads; ++head)
    for (Index half = 0; half < 2; ++half)
      for (Index i = 0; i < h / 2; ++i)  // [head][half][i] -> [head][i][half]
        out.row(head * h + i * 2 + half) = W.row(head * h + half * (h / 2) + i);
  return out;
}

/// PEFT's merge in float: W + fl(s) (B A), the product summed in order of k.
inline MatrixXf peft_merge(const MatrixXf& W, const MatrixXf& A, const MatrixXf& B, float s) {
  MatrixXf out = W;
  for (Index i = 0; i < W.rows(); ++i)
    for (Index j = 0; j < W.cols(); ++j) {
      float d = 0;
      for (Index k = 0; k < A.rows(); ++k) d += B(i, k) * A(k, j);
      out(i, j) = W(i, j) + d * s;
    }
  return out;
}

/// llama.cpp's application to W (its rows in llama.cpp's order): W + σ (b a), σ = α / r' in float with r'
/// the stored rank (ne[0] of lora_b).
inline MatrixXf llama_merge(const MatrixXf& W, const GgufRead& g, const std::string& tensor) {
  const GgufTensorRead& a = g.tensors.at(tensor + ".lora_a");
  const GgufTensorRead& b = g.tensors.at(tensor + ".lora_b");
  const float alpha = float(g.kv.at("adapter.lora.alpha").number);
  const float sigma = alpha / float(b.ne[0]);
  return peft_merge(W, a.values, b.values, sigma);
}
inline peft::io::GgufExportSummary export_quiet(const peft::io::GgufExportOptions& o) {
  std::ostringstream report, progress;
  return peft::io::export_gguf(o, report, progress);
}

/// Checks every module: names, shapes and types as llama.cpp's loader checks them, and the merge from the
/// file equal, bit for bit when `exact`, to PEFT's merge of the original factors (rows reordered for q
/// and k of the llama architecture). \returns the largest relative difference.
inline double check_export(const GgufRead& g, const Model& model, const std::map<std::string, ModuleFactors>& factors,
                    const peft::io::PeftConfig& config, bool permuted, bool exact, std::uint32_t type = 0) {
  double worst = 0;
  unsigned seed = 77;
  for (const auto& [path, f] : factors) {
    const peft::io::LlamaFamilyConfig c = peft::io::parse_model_config(model.json(), "config.json");
    const std::string tensor = peft::io::gguf_target(path, c).name;
    INFO("module " << path << " -> " << tensor);
    REQUIRE(g.tensors.count(tensor + ".lora_a") == 1);
    REQUIRE(g.tensors.count(tensor + ".lora_b") == 1);
    const GgufTensorRead& a = g.tensors.at(tensor + ".lora_a");
    const GgufTensorRead& b = g.tensors.at(tensor + ".lora_b");
    const auto [d_out, d_in] = model.shape(path);
    // llama.cpp: model ne = [d_in, d_out]; a.ne[0] == d_in, b.ne[1] == d_out, a.ne[1] == b.ne[0].
    REQUIRE(a.ne.size() == 2);
    REQUIRE(b.ne.size() == 2);
    CHECK(a.ne[0] == std::uint64_t(d_in));
    CHECK(b.ne[1] == std::uint64_t(d_out));
    CHECK(a.ne[1] == b.ne[0]);
    CHECK(b.ne[0] >= std::uint64_t(f.A.rows()));
    CHECK(a.type == type);
    CHECK(b.type == type);
    // The padding is zeros.
    const Index r = f.A.rows(), stored = Index(b.ne[0]);
    if (stored > r) {
      CHECK(a.values.bottomRows(stored - r).cwiseAbs().maxCoeff() == 0.0f);
      CHECK(b.values.rightCols(stored - r).cwiseAbs().maxCoeff() == 0.0f);
    }
    const MatrixXf W = uniform_matrix(d_out, d_in, ++seed).cast<float>();
    const float s = float(config.scale_for(path));
    MatrixXf expected = peft_merge(W, f.A.cast<float>(), f.B.cast<float>(), s);
    MatrixXf base = W;
    const bool qk = path.find("q_proj") != std::string::npos || path.find("k_proj") != std::string::npos;
    if (permuted && qk) {
      const Index heads = path.find("q_proj") != std::string::npos ? model.heads : model.kv_heads;
      expected = llama_permute(expected, heads);
      base = llama_permute(base, heads);
    }
    const MatrixXf got = llama_merge(base, g, tensor);
    const double update = (expected - base).cwiseAbs().maxCoeff();
    const double diff = (got - expected).cwiseAbs().maxCoeff();
    worst = std::max(worst, diff / update);
    if (exact) {
      INFO("largest difference " << diff << " (update " << update << ")");
      CHECK(diff == 0.0);
    }
  }
  return worst;
}

inline peft::io::GgufExportOptions options(const peft::test::Scratch& s, const std::string& adapter = "adapter") {
  peft::io::GgufExportOptions o;
  o.adapter = s / adapter;
  o.config = s / "config.json";
  o.out = s / "adapter.gguf";
  return o;
}

}  // namespace peft::test::gguf_fixture
