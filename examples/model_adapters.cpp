// A whole model's adapters: a small transformer-shaped stack of linear layers, LoRA chosen by module
// path as Hugging Face PEFT chooses it, trained with one optimizer, checkpointed, resumed (bit for bit),
// saved as a PEFT adapter directory, loaded onto a fresh copy of the base in the same program, as
// another process would, and merged for deployment.
//
// Build: the `model_adapters` target (needs peft::io: nlohmann-json). Run: model_adapters [DIR]
// (default: a directory under /tmp). CTest runs it; it exits with 1 if a check fails.
#include <peft/io/adapter_set_io.hpp>
#include <peft/model/adapter_set.hpp>
#include <peft/optim/adamw.hpp>

#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include <unistd.h>

using Eigen::MatrixXf;
using Eigen::VectorXf;

namespace {

constexpr int kLayers = 2, kDim = 32, kTokens = 16;

// The user's model: plain Eigen matrices, named as the PyTorch module would name them.
struct Model {
  std::vector<MatrixXf> W;
  std::vector<VectorXf> b;
  std::vector<std::string> path;

  explicit Model(std::uint64_t seed) {
    peft::Rng rng(seed);
    for (int l = 0; l < kLayers; ++l)
      for (const char* name : {"attn.q_proj", "attn.v_proj", "mlp.up_proj"}) {
        path.push_back("layers." + std::to_string(l) + "." + name);
        W.emplace_back(kDim, kDim);
        b.emplace_back(kDim);
        rng.fill_uniform(W.back(), -0.2, 0.2);
        rng.fill_uniform(b.back(), -0.1, 0.1);
      }
  }
  peft::ModelWeights<MatrixXf> weights() {
    peft::ModelWeights<MatrixXf> m;
    for (std::size_t i = 0; i < W.size(); ++i) m.add(path[i], W[i], b[i]);
    return m;
  }
};

// The user's loop: the layers in order with a tanh between them; loss = ½‖Y − T‖². Adapted modules run
// through their adapter, the others through the plain weights.
float step(peft::AdapterSet<MatrixXf>& set, Model& model, const MatrixXf& X, const MatrixXf& T,
           peft::AdamW<float>& opt) {
  const std::size_t n = model.W.size();
  std::vector<MatrixXf> in(n), out(n);
  std::vector<peft::AnyAdapter<float>::Cache> caches(n);
  MatrixXf H = X;
  for (std::size_t i = 0; i < n; ++i) {
    in[i] = H;
    if (auto* a = set.find(model.path[i]))
      a->forward_into(H, out[i], caches[i]);
    else
      out[i] = (model.W[i] * H).colwise() + model.b[i];
    H = out[i].array().tanh();
  }
  MatrixXf G = H - T;
  const float loss = 0.5f * G.squaredNorm();
  opt.zero_grad();
  for (std::size_t i = n; i-- > 0;) {
    G.array() *= 1 - out[i].array().tanh().square();
    if (auto* a = set.find(model.path[i]))
      G = a->backward(G, caches[i]);
    else
      G = model.W[i].transpose() * G;
  }
  opt.step();
  return loss;
}

MatrixXf run(peft::AdapterSet<MatrixXf>& set, Model& model) {
  MatrixXf Y = MatrixXf::Identity(kDim, kTokens);
  for (std::size_t i = 0; i < model.W.size(); ++i) {
    const auto* a = set.find(model.path[i]);
    Y = (a ? a->forward(Y) : MatrixXf((model.W[i] * Y).colwise() + model.b[i])).array().tanh();
  }
  return Y;
}

int failures = 0;
void check(bool ok, const char* what) {
  std::printf("%s: %s\n", ok ? "ok    " : "FAILED", what);
  failures += ok ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string dir = argc > 1 ? argv[1] : "/tmp/peft-model-adapters-" + std::to_string(::getpid());
  peft::Rng rng(7);
  MatrixXf X(kDim, kTokens), T(kDim, kTokens);
  rng.fill_uniform(X, -1, 1);
  rng.fill_uniform(T, -0.5, 0.5);

  // --- 1. Choose the modules as PEFT does: q_proj and v_proj everywhere but layer 0's v_proj, rank 8
  // (rank 4 on v_proj), alpha 16, dropout 0.1.
  peft::AdapterSetConfig cfg;
  cfg.kind = peft::AdapterKind::lora;
  cfg.target_modules = {"q_proj", "v_proj"};
  cfg.exclude_modules = {"layers.0.attn.v_proj"};
  cfg.r = 8;
  cfg.lora_alpha = 16;
  cfg.rank_pattern = {{"v_proj", 4}};
  cfg.dropout = 0.1;
  cfg.seed = 42;

  // --- 2. Train 20 steps uninterrupted, as a reference.
  Model ref_model(1);
  auto ref_weights = ref_model.weights();
  peft::AdapterSet<MatrixXf> ref(ref_weights, cfg);
  peft::AdamW<float> ref_opt;
  ref.add_to(ref_opt);
  for (int s = 0; s < 20; ++s) step(ref, ref_model, X, T, ref_opt);
  std::printf("%zu adapted modules, %ld trainable parameters\n", ref.size(), long(ref.num_parameters()));

  // --- 3. The same run, interrupted after 10 steps: a checkpoint, and a new process would rebuild the
  // set and the optimizer as above, load the checkpoint and go on.
  {
    Model model(1);
    auto weights = model.weights();
    peft::AdapterSet<MatrixXf> set(weights, cfg);
    peft::AdamW<float> opt;
    set.add_to(opt);
    for (int s = 0; s < 10; ++s) step(set, model, X, T, opt);
    peft::io::save_checkpoint(set, opt, dir + "/checkpoint", {{"step", "10"}});
  }
  Model model(1);
  auto weights = model.weights();
  peft::AdapterSet<MatrixXf> set(weights, cfg);
  peft::AdamW<float> opt;
  set.add_to(opt);
  const peft::io::Metadata meta = peft::io::load_checkpoint(set, opt, dir + "/checkpoint");
  for (int s = std::stoi(meta.at("step")); s < 20; ++s) step(set, model, X, T, opt);
  bool same = true;
  auto p = set.parameters(), q = ref.parameters();
  for (std::size_t i = 0; i < p.size(); ++i) same = same && p[i].value == q[i].value;
  check(same, "resumed from the checkpoint at step 10, every parameter equals the uninterrupted run's bit for bit");

  // --- 4. Save as a PEFT adapter directory (what Hugging Face PEFT's from_pretrained loads), load it onto a
  // fresh copy of the base, and merge for deployment: the merged model computes what the adapters did.
  peft::io::SaveOptions save;
  save.base_model_name_or_path = "example/tiny-model";
  peft::io::save_peft(set, dir + "/adapter", save);
  Model deployed(1);
  auto deployed_weights = deployed.weights();
  peft::AdapterSet<MatrixXf> loaded = peft::io::load_peft(dir + "/adapter", deployed_weights);
  const MatrixXf expected = run(set, model);
  check((run(loaded, deployed) - expected).cwiseAbs().maxCoeff() == 0.0f,
        "the loaded directory computes exactly what the trained set does");
  loaded.merge();
  peft::AdapterSet<MatrixXf> none(deployed_weights);  // no adapters: the plain weights
  const float merged_error = (run(none, deployed) - expected).cwiseAbs().maxCoeff();
  std::printf("merged: max |Y_merged - Y_adapters| = %.2e\n", double(merged_error));
  check(merged_error <= 1e-5f, "merged weights compute the adapted model (within float rounding)");

  std::error_code ec;
  if (argc <= 1) std::filesystem::remove_all(dir, ec);
  return failures == 0 ? 0 : 1;
}
