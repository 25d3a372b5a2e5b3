// The exported adapter end to end: peft-export-gguf, the program, writes what the library does and fails
// cleanly; and llama.cpp itself (the prebuilt CPU build of the npm package node-llama-cpp, where
// scripts/deps.sh installed it) applies an exported adapter to a tiny Llama converted to GGUF here as
// PEFT's merged model computes, its logits compared with Hugging Face's Llama forward pass computed here
// in double. The adapter directories, the reader and the merge check are the export test's
// (support/gguf_export_fixture.hpp, support/gguf_reader.hpp); the library's writer and exporter are
// tested in gguf_export_test.cpp.
#include "support/catch.hpp"
#include "support/files.hpp"
#include "support/gguf_export_fixture.hpp"
#include "support/gguf_reader.hpp"
#include "support/scratch.hpp"

#include <peft/io/gguf.hpp>
#include <peft/io/gguf_export.hpp>

#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include <sys/wait.h>

namespace fs = std::filesystem;
using peft::test::read_gguf;
using peft::test::Scratch;
using peft::test::uniform_matrix;
using peft::test::write_file;
using namespace peft::test::gguf_fixture;

namespace {

std::string exporter_binary() { return PEFT_EXPORT_GGUF_BINARY; }

struct RunResult {
  int status;
  std::string output;
};
/// Runs a shell command, its stderr with its stdout.
RunResult run_command(const std::string& cmd) {
  std::FILE* p = ::popen((cmd + " 2>&1").c_str(), "r");
  REQUIRE(p != nullptr);
  std::string out;
  char buf[4096];
  std::size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  const int status = ::pclose(p);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, out};
}
RunResult run(const std::string& args) { return run_command(exporter_binary() + " " + args); }

}  // namespace

TEST_CASE("peft-export-gguf: the program writes what the library does, and fails cleanly") {
  Scratch s("cli");
  Model model;
  write_file(s / "config.json", model.json());
  const auto factors = write_adapter(s / "adapter", model, {"model.layers.1.self_attn.k_proj", "lm_head"}, 4, 8,
                                     R"(, "use_rslora": true)");
  const std::string common = "--adapter " + (s / "adapter") + " --config " + (s / "config.json");
  const RunResult ok = run(common + " --out " + (s / "a.gguf"));
  INFO(ok.output);
  REQUIRE(ok.status == 0);
  CHECK(ok.output.find("blk.1.attn_k.weight <- model.layers.1.self_attn.k_proj") != std::string::npos);
  CHECK(ok.output.find("every scale exact") != std::string::npos);
  const peft::io::PeftAdapter<double> adapter(s / "adapter");
  check_export(read_gguf(s / "a.gguf"), model, factors, adapter.config(), true, true);

  const RunResult usage = run(common);
  CHECK(usage.status == 2);
  CHECK(usage.output.find("--out") != std::string::npos);
  CHECK(run(common + " --out x --outtype q4").status == 2);
  CHECK(run(common + " --out x --rank 4").status == 2);  // --rank without --dora svd
  write_file(s / "b.gguf", "kept");
  const RunResult bad = run("--adapter " + (s / "nowhere") + " --config " + (s / "config.json") + " --out " + (s / "b.gguf"));
  CHECK(bad.status == 1);
  CHECK(bad.output.find("peft-export-gguf: ") == 0);
  std::ifstream in(s / "b.gguf");
  std::string text;
  std::getline(in, text);
  CHECK(text == "kept");
}

// ---------------------------------------------------------------------------------------------------
// llama.cpp itself: a tiny Llama model converted to GGUF here, the exported adapter applied by llama.cpp
// (the prebuilt CPU build of the npm package node-llama-cpp), and its logits compared with Hugging Face's
// Llama forward pass computed here in double over the weights merged as PEFT merges them.

namespace {

/// A tiny Llama in Hugging Face's layout (every weight d_out x d_in), in double.
struct TinyLlama {
  Model shape;
  double eps = 1e-5, theta = 10000;
  MatrixXd embed, lm_head;
  VectorXd norm;
  struct Layer {
    VectorXd attn_norm, ffn_norm;
    std::map<std::string, MatrixXd> w;  // by projection ("self_attn.q_proj", ...)
  };
  std::vector<Layer> layers;

  explicit TinyLlama(const Model& m) : shape(m) {
    unsigned seed = 900;
    embed = uniform_matrix(m.vocab, m.hidden, ++seed).cast<float>().cast<double>();
    lm_head = uniform_matrix(m.vocab, m.hidden, ++seed, 0.3).cast<float>().cast<double>();
    norm = (uniform_matrix(m.hidden, 1, ++seed, 0.2).array() + 1.0).matrix().cast<float>().cast<double>();
    for (Index l = 0; l < m.layers; ++l) {
      Layer layer;
      layer.attn_norm = (uniform_matrix(m.hidden, 1, ++seed, 0.2).array() + 1.0).matrix().cast<float>().cast<double>();
      layer.ffn_norm = (uniform_matrix(m.hidden, 1, ++seed, 0.2).array() + 1.0).matrix().cast<float>().cast<double>();
      for (const auto& p : projections) {
        const auto [d_out, d_in] = m.shape(p);
        layer.w[p] = uniform_matrix(d_out, d_in, ++seed, 1.0 / std::sqrt(double(d_in))).cast<float>().cast<double>();
      }
      layers.push_back(layer);
    }
  }

  VectorXd rms_norm(const VectorXd& x, const VectorXd& w) const {
    return (x / std::sqrt(x.squaredNorm() / double(x.size()) + eps)).cwiseProduct(w);
  }
  /// Hugging Face's rotary embedding (rotate_half: dimension i pairs with i + h/2) at position p.
  void rope(Eigen::Ref<VectorXd> x, Index p) const {
    const Index h = x.size() / 2;
    for (Index i = 0; i < h; ++i) {
      const double angle = double(p) * std::pow(theta, -2.0 * double(i) / double(x.size()));
      const double a = x(i), b = x(i + h);
      x(i) = a * std::cos(angle) - b * std::sin(angle);
      x(i + h) = b * std::cos(angle) + a * std::sin(angle);
    }
  }
  /// The logits after the last token.
  VectorXd logits(const std::vector<int>& tokens) const {
    const Index T = Index(tokens.size()), hd = shape.head_dim, group = shape.heads / shape.kv_heads;
    std::vector<VectorXd> x;
    for (int t : tokens) x.push_back(embed.row(t).transpose());
    for (const Layer& L : layers) {
      std::vector<VectorXd> q(T), k(T), v(T);
      for (Index t = 0; t < T; ++t) {
        const VectorXd n = rms_norm(x[t], L.attn_norm);
        q[t] = L.w.at("self_attn.q_proj") * n;
        k[t] = L.w.at("self_attn.k_proj") * n;
        v[t] = L.w.at("self_attn.v_proj") * n;
        for (Index h = 0; h < shape.heads; ++h) rope(q[t].segment(h * hd, hd), t);
        for (Index h = 0; h < shape.kv_heads; ++h) rope(k[t].segment(h * hd, hd), t);
      }
      for (Index t = 0; t < T; ++t) {
        VectorXd attended(shape.heads * hd);
        for (Index h = 0; h < shape.heads; ++h) {
          const Index kv = h / group;
          VectorXd score(t + 1);
          for (Index u = 0; u <= t; ++u)
            score(u) = q[t].segment(h * hd, hd).dot(k[u].segment(kv * hd, hd)) / std::sqrt(double(hd));
          score = (score.array() - score.maxCoeff()).exp();
          score /= score.sum();
          VectorXd o = VectorXd::Zero(hd);
          for (Index u = 0; u <= t; ++u) o += score(u) * v[u].segment(kv * hd, hd);
          attended.segment(h * hd, hd) = o;
        }
        x[t] += L.w.at("self_attn.o_proj") * attended;
        const VectorXd n = rms_norm(x[t], L.ffn_norm);
        const VectorXd gate = L.w.at("mlp.gate_proj") * n, up = L.w.at("mlp.up_proj") * n;
        const VectorXd act = (gate.array() / (1.0 + (-gate.array()).exp())).matrix().cwiseProduct(up);
        x[t] += L.w.at("mlp.down_proj") * act;
      }
    }
    return lm_head * rms_norm(x[T - 1], norm);
  }

  /// The weights merged with a PEFT adapter's modules as PEFT merges them: W + s B A.
  TinyLlama merged(const std::map<std::string, ModuleFactors>& factors, const peft::io::PeftConfig& c) const {
    TinyLlama out = *this;
    for (const auto& [path, f] : factors) {
      MatrixXd& W = path == "lm_head" ? out.lm_head
                                      : out.layers[std::size_t(std::stoi(path.substr(13)))].w.at(path.substr(path.find('.', 13) + 1));
      W += c.scale_for(path) * f.B * f.A;
    }
    return out;
  }

  /// Writes the model as llama.cpp's converter would: llama.cpp's names, q and k rows in its rotary order,
  /// float32, and a tokenizer of <unk>, <s>, </s>, the 256 byte tokens and a few more.
  void write_gguf(const std::string& path) const {
    peft::io::GgufWriter w(path);
    const auto u32 = [](Index v) { return std::uint32_t(v); };
    w.set_string("general.architecture", "llama");
    w.set_string("general.name", "tiny-llama");
    w.set_u32("general.file_type", 0);
    w.set_u32("llama.context_length", 64);
    w.set_u32("llama.embedding_length", u32(shape.hidden));
    w.set_u32("llama.block_count", u32(shape.layers));
    w.set_u32("llama.feed_forward_length", u32(shape.intermediate));
    w.set_u32("llama.attention.head_count", u32(shape.heads));
    w.set_u32("llama.attention.head_count_kv", u32(shape.kv_heads));
    w.set_u32("llama.rope.dimension_count", u32(shape.head_dim));
    w.set_f32("llama.rope.freq_base", float(theta));
    w.set_f32("llama.attention.layer_norm_rms_epsilon", float(eps));
    std::vector<std::string> tokens = {"<unk>", "<s>", "</s>"};
    std::vector<std::int32_t> types = {2, 3, 3};
    for (int b = 0; b < 256; ++b) {
      char name[8];
      std::snprintf(name, sizeof name, "<0x%02X>", b);
      tokens.push_back(name);
      types.push_back(6);
    }
    while (Index(tokens.size()) < shape.vocab) {
      tokens.push_back("t" + std::to_string(tokens.size()));
      types.push_back(1);
    }
    w.set_string("tokenizer.ggml.model", "llama");
    w.set_strings("tokenizer.ggml.tokens", tokens);
    w.set_f32s("tokenizer.ggml.scores", std::vector<float>(tokens.size(), 0.0f));
    w.set_i32s("tokenizer.ggml.token_type", types);
    w.set_u32("tokenizer.ggml.bos_token_id", 1);
    w.set_u32("tokenizer.ggml.eos_token_id", 2);
    std::vector<std::pair<std::string, MatrixXf>> tensors;
    const auto add = [&](const std::string& name, const MatrixXd& m) {
      tensors.emplace_back(name, m.cast<float>());
      if (m.cols() == 1)
        w.add_tensor(name, peft::io::GgufType::F32, {std::uint64_t(m.rows())});
      else
        w.add_tensor(name, peft::io::GgufType::F32, {std::uint64_t(m.cols()), std::uint64_t(m.rows())});
    };
    add("token_embd.weight", embed);
    add("output_norm.weight", norm);
    add("output.weight", lm_head);
    const std::map<std::string, std::string> names = {
        {"self_attn.q_proj", "attn_q"}, {"self_attn.k_proj", "attn_k"}, {"self_attn.v_proj", "attn_v"},
        {"self_attn.o_proj", "attn_output"}, {"mlp.gate_proj", "ffn_gate"}, {"mlp.up_proj", "ffn_up"},
        {"mlp.down_proj", "ffn_down"}};
    for (std::size_t l = 0; l < layers.size(); ++l) {
      const std::string blk = "blk." + std::to_string(l) + ".";
      add(blk + "attn_norm.weight", layers[l].attn_norm);
      add(blk + "ffn_norm.weight", layers[l].ffn_norm);
      for (const auto& p : projections) {
        MatrixXd W = layers[l].w.at(p);
        if (p == "self_attn.q_proj") W = llama_permute(W, shape.heads);
        if (p == "self_attn.k_proj") W = llama_permute(W, shape.kv_heads);
        add(blk + names.at(p) + ".weight", W);
      }
    }
    for (const auto& [name, m] : tensors) {
      if (m.cols() == 1)
        w.write(name, m.transpose());
      else
        w.write(name, m);
    }
    w.commit();
  }
};

/// Where node-llama-cpp was installed (scripts/deps.sh; PEFT_NODE_LLAMA_CPP overrides it).
std::string node_llama_cpp_dir() {
  const char* env = std::getenv("PEFT_NODE_LLAMA_CPP");
  return env && *env ? env : PEFT_NODE_LLAMA_CPP_DIR;
}

/// Whether node-llama-cpp is there and Node.js 20 or newer runs it.
bool have_llama_cpp() {
  if (!fs::exists(fs::path(node_llama_cpp_dir()) / "node_modules" / "node-llama-cpp" / "dist" / "index.js")) return false;
  return std::system("node -e 'process.exit(Number(process.versions.node.split(\".\")[0]) >= 20 ? 0 : 1)' 2>/dev/null") == 0;
}

VectorXd llama_cpp_logits(const std::string& modules, const std::string& model, const std::string& lora,
                          const std::vector<int>& tokens) {
  std::string list;
  for (int t : tokens) list += (list.empty() ? "" : ",") + std::to_string(t);
  const RunResult r = run_command("node '" + std::string(PEFT_RUN_LLAMA_SCRIPT) + "' '" + modules + "' '" + model +
                                  "' '" + lora + "' " + list);
  INFO(r.output);
  REQUIRE(r.status == 0);
  const auto at = r.output.rfind("{\"llama_cpp\"");
  REQUIRE(at != std::string::npos);
  const auto j = nlohmann::json::parse(r.output.substr(at));
  const auto& values = j.at("logits");
  VectorXd logits(Index(values.size()));
  for (std::size_t i = 0; i < values.size(); ++i) logits(Index(i)) = values[i].get<double>();
  return logits;
}

}  // namespace

TEST_CASE("llama.cpp itself applies the exported adapter as PEFT's merged model computes (node-llama-cpp)") {
  const std::string modules = node_llama_cpp_dir();
  if (modules.empty()) {
    WARN("llama.cpp not run in the sanitizer build: the Release build runs it");
    SUCCEED("skipped");
    return;
  }
  if (!have_llama_cpp()) {
    WARN("llama.cpp not run: node-llama-cpp is not installed in " << modules
         << " (PEFT_NODE_LLAMA_CPP names another place), or Node.js 20 is missing; scripts/test.sh installs it from npm");
    SUCCEED("skipped");
    return;
  }
  Scratch s("llama_cpp");
  Model shape;
  shape.hidden = 32;
  shape.heads = 4;
  shape.kv_heads = 2;
  shape.head_dim = 8;
  shape.intermediate = 48;
  shape.vocab = 272;
  write_file(s / "config.json", shape.json());
  const TinyLlama model(shape);
  model.write_gguf(s / "model.gguf");
  const std::vector<int> tokens = {1, 70, 7, 200, 265, 3};
  const VectorXd base_expected = model.logits(tokens);
  // The harness first: llama.cpp on the converted base alone against the forward pass here.
  const VectorXd base = llama_cpp_logits(modules, s / "model.gguf", "-", tokens);
  REQUIRE(base.size() == shape.vocab);
  const double scale = base_expected.cwiseAbs().maxCoeff();
  CHECK((base - base_expected).cwiseAbs().maxCoeff() < 1e-4 * scale);

  // rsLoRA with rank and alpha patterns on every projection and lm_head.
  std::map<std::string, Index> ranks;
  const auto paths = all_modules(shape, true);
  for (const auto& p : paths)
    if (p.find("k_proj") != std::string::npos) ranks[p] = 16;
  const auto factors = write_adapter(s / "adapter", shape, paths, 4, 4,
                                     R"(, "use_rslora": true, "rank_pattern": {"k_proj": 16}, "alpha_pattern": {"q_proj": 8, "lm_head": 1})",
                                     ranks);
  auto o = options(s);
  const auto summary = export_quiet(o);
  CHECK(summary.inexact == 0);
  const peft::io::PeftAdapter<double> adapter(o.adapter);
  const VectorXd expected = model.merged(factors, adapter.config()).logits(tokens);
  const VectorXd got = llama_cpp_logits(modules, s / "model.gguf", o.out, tokens);
  REQUIRE(got.size() == shape.vocab);
  const double change = (expected - base_expected).cwiseAbs().maxCoeff();
  const double diff = (got - expected).cwiseAbs().maxCoeff();
  INFO("the adapter moves the logits by up to " << change << "; llama.cpp differs from PEFT's merged model by " << diff);
  CHECK(change > 0.1 * scale);  // an adapter misapplied (rows, scale) would show
  CHECK(diff < 1e-4 * scale);
}
