// PEFT adapter directories (io/peft_adapter.hpp), the merge arithmetic (io/merge.hpp), the adapters built
// from a directory (io/peft_load.hpp) and peft-merge end to end. Directories are written here as PEFT
// writes them (its key names, its config fields); merged files are read back by the tests' own
// safetensors reader (support/safetensors_reader.hpp: the bytes, not our reader), and every merge is
// compared with W + s B A (or DoRA's formula) computed here in double.
#include "support/catch.hpp"
#include "support/files.hpp"
#include "support/safetensors_reader.hpp"
#include "support/scratch.hpp"

#include <peft/io/merge.hpp>
#include <peft/io/peft_adapter.hpp>
#include <peft/io/peft_load.hpp>
#include <peft/io/safetensors.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include <unistd.h>

namespace fs = std::filesystem;
using peft::test::decode;
using peft::test::element;
using peft::test::has_substring;
using peft::test::RawSafetensors;
using peft::test::RawTensor;
using peft::test::read_file;
using peft::test::read_safetensors;
using peft::test::Scratch;
using peft::test::uniform_matrix;
using peft::test::write_file;
using Eigen::Index;
using Eigen::MatrixXd;
using Eigen::MatrixXf;
using Eigen::VectorXd;
using Eigen::VectorXf;
using RowMajorXf = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

namespace {

/// An F32 tensor as a matrix, its dtype checked.
MatrixXd f32_matrix(const RawTensor& r) {
  REQUIRE(r.dtype == "F32");
  return decode(r);
}

/// A 2-D tensor of any floating dtype as a matrix (row-major on disk).
MatrixXd decoded(const RawTensor& r) {
  REQUIRE(r.shape.size() == 2);
  const MatrixXd m = decode(r);
  if (r.dtype == "F16") REQUIRE(m.allFinite());  // no infinity or NaN in these tests
  return m;
}

/// The unit in the last place of x in a dtype (F16's subnormals included).
double ulp_of(const std::string& dtype, double x) {
  const int e = x == 0 ? -1000 : std::ilogb(x);
  if (dtype == "BF16") return std::ldexp(1.0, e - 7);
  if (dtype == "F16") return std::ldexp(1.0, std::max(e, -14) - 10);
  if (dtype == "F32") return std::ldexp(1.0, std::max(e, -126) - 23);
  return std::ldexp(1.0, std::max(e, -1022) - 52);
}

/// The elementwise bound of a merged float weight against the exact W + s B A: the product's k-term
/// rounding plus the sum's and the scaling's.
MatrixXd lora_bound(const MatrixXd& W, const MatrixXd& A, const MatrixXd& B, double s) {
  const double eps = std::ldexp(1.0, -24);
  return (double(A.rows()) + 3) * eps * (W.cwiseAbs() + std::abs(s) * B.cwiseAbs() * A.cwiseAbs());
}

/// A PEFT adapter directory: config text and tensors (float, as PEFT saves them by default).
struct AdapterDir {
  std::string config;
  std::vector<std::pair<std::string, MatrixXf>> tensors;
  void write(const std::string& dir) const {
    fs::create_directories(dir);
    write_file(dir + "/adapter_config.json", config);
    peft::io::save_safetensors<float>(dir + "/adapter_model.safetensors", tensors, peft::io::Dtype::F32,
                                      {{"format", "pt"}});
  }
};

std::string config_json(const std::string& extra) {
  return R"({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "task_type": "CAUSAL_LM", "bias": "none",
             "target_modules": ["q_proj", "v_proj"], "init_lora_weights": true, "lora_dropout": 0.0)" +
         extra + "}";
}

int run_merge(const std::string& args, const std::string& log) {
  const std::string cmd = std::string(PEFT_MERGE_BINARY) + " " + args + " > " + log + " 2>&1";
  const int status = std::system(cmd.c_str());
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

}  // namespace

TEST_CASE("pattern keys match the end of a module path at a dot boundary, as PEFT's get_pattern_key",
          "[io][peft]") {
  using peft::io::pattern_matches;
  REQUIRE(pattern_matches("q_proj", "model.layers.0.self_attn.q_proj"));
  REQUIRE(pattern_matches("q_proj", "q_proj"));
  REQUIRE_FALSE(pattern_matches("q_proj", "model.layers.0.self_attn.xq_proj"));
  REQUIRE_FALSE(pattern_matches("q_proj", "model.layers.0.q_proj.lora"));
  REQUIRE(pattern_matches("layers.1.self_attn.q_proj", "model.layers.1.self_attn.q_proj"));
  REQUIRE_FALSE(pattern_matches("layers.1.self_attn.q_proj", "model.layers.11.self_attn.q_proj"));
  REQUIRE(pattern_matches("layers\\.[0-2]\\.self_attn\\.v_proj", "model.layers.2.self_attn.v_proj"));
  REQUIRE_FALSE(pattern_matches("layers\\.[0-2]\\.self_attn\\.v_proj", "model.layers.3.self_attn.v_proj"));
  REQUIRE_THROWS_AS(pattern_matches("q_proj(", "q_proj"), peft::FormatError);
  REQUIRE_THROWS_WITH(pattern_matches(std::string(300, '('), "q_proj"), has_substring("longer than 256"));
  // What a backtracking matcher would take exponential (or high-degree polynomial) time on is refused
  // before matching: the fuzzer's find, "t" and a hundred '*', took more than 10 s on one path.
  REQUIRE_THROWS_WITH(pattern_matches("t" + std::string(100, '*'), "q_proj"), has_substring("multiple repeat"));
  REQUIRE_THROWS_WITH(pattern_matches("q_proj+*", "q_proj"), has_substring("multiple repeat"));
  REQUIRE_THROWS_WITH(pattern_matches("q{1,}{2}", "q_proj"), has_substring("multiple repeat"));
  REQUIRE_THROWS_WITH(pattern_matches("(a*)*b", "q_proj"), has_substring("repeats a group that itself repeats"));
  REQUIRE_THROWS_WITH(pattern_matches("((a|b+)c)+", "q_proj"), has_substring("repeats a group that itself repeats"));
  REQUIRE_THROWS_WITH(pattern_matches(".*a.*b.*c.*d", "q_proj"), has_substring("more than 3 unbounded repetitions"));
  REQUIRE_THROWS_WITH(peft::ModuleSelector::regex("(x+x+)+y"), has_substring("repeats a group"));
  // The fuzzer's second find: libstdc++ overflows a long reading this count (undefined behaviour).
  REQUIRE_THROWS_WITH(pattern_matches("rankf{88888888888888888888, \"in", "q_proj"), has_substring("four digits"));
  REQUIRE_THROWS_WITH(pattern_matches("q{1,123456}", "q_proj"), has_substring("four digits"));
  REQUIRE_THROWS_WITH(pattern_matches("E\\88888888888888888888", "q_proj"), has_substring("four digits"));
  REQUIRE_THROWS_WITH(pattern_matches("[\\88888888888888888888]", "q_proj"), has_substring("four digits"));
  // ... while what real configs hold, lazy and optional repetitions, escapes and classes, still match.
  REQUIRE(pattern_matches("layers\\.\\d+\\.self_attn\\.(q|v)_proj", "model.layers.12.self_attn.v_proj"));
  REQUIRE(pattern_matches(".*?q_proj", "model.layers.0.self_attn.q_proj"));
  REQUIRE(pattern_matches("(self_attn\\.)?q_pro[j*+]", "model.layers.0.self_attn.q_proj"));
  REQUIRE(pattern_matches("(a*)?q_proj", "model.q_proj"));
  REQUIRE(peft::ModuleSelector::regex(".*decoder.*(SelfAttention|EncDecAttention).*(q|v)$")
              .matches("decoder.block.0.layer.0.SelfAttention.q"));
  REQUIRE(peft::ModuleSelector::regex("\\*+x").matches("**x"));  // an escaped '*' is no repetition

  const auto c = peft::io::parse_peft_config(
      config_json(R"(, "rank_pattern": {"layers.1.self_attn.q_proj": 4, "v_proj": 2},
                      "alpha_pattern": {"q_proj": 3}, "use_rslora": true)"),
      "cfg");
  REQUIRE(c.rank_for("model.layers.1.self_attn.q_proj") == 4);
  REQUIRE(c.rank_for("model.layers.0.self_attn.q_proj") == 8);
  REQUIRE(c.rank_for("model.layers.0.self_attn.v_proj") == 2);
  REQUIRE(c.alpha_for("model.layers.0.self_attn.q_proj") == 3);
  REQUIRE(c.alpha_for("model.layers.0.self_attn.v_proj") == 16);
  REQUIRE(c.scale_for("model.layers.1.self_attn.q_proj") == 3 / std::sqrt(4.0));  // rsLoRA: α/√r
}

TEST_CASE("a config field whose meaning is not implemented is refused, naming it", "[io][peft]") {
  const auto refused = [](const std::string& extra, const std::string& field) {
    REQUIRE_THROWS_WITH(peft::io::parse_peft_config(config_json(extra), "dir/adapter_config.json"),
                        has_substring(field) && has_substring("dir/adapter_config.json"));
  };
  refused(R"(, "bias": "all")", "bias");
  refused(R"(, "bias": "lora_only")", "bias");
  refused(R"(, "lora_bias": true)", "lora_bias");
  refused(R"(, "layer_replication": [[0, 2], [1, 3]])", "layer_replication");
  refused(R"(, "init_lora_weights": "pissa")", "init_lora_weights");
  refused(R"(, "init_lora_weights": "olora")", "init_lora_weights");
  refused(R"(, "init_lora_weights": "pissa_niter_4")", "init_lora_weights");
  refused(R"(, "target_parameters": ["experts.gate_up_proj"])", "target_parameters");
  REQUIRE_THROWS_WITH(peft::io::parse_peft_config(R"({"peft_type": "IA3", "r": 8})", "c"), has_substring("IA3"));
  REQUIRE_THROWS_AS(peft::io::parse_peft_config("{\"peft_type\": \"LORA\", \"r\": 0}", "c"), peft::FormatError);
  // A rank beyond any integer type (found by fuzz/peft_config_fuzz: its conversion was undefined).
  REQUIRE_THROWS_WITH(peft::io::parse_peft_config(R"({"peft_type": "LORA", "r": 88888888888888888888888888888888})", "c"),
                      has_substring("not a positive integer"));
  REQUIRE_THROWS_AS(peft::io::parse_peft_config(config_json(R"(, "rank_pattern": {"q": 1e300})"), "c"), peft::FormatError);
  REQUIRE(peft::io::parse_peft_config(R"({"peft_type": "LORA", "r": 4.0})", "c").r == 4);
  REQUIRE_THROWS_AS(peft::io::parse_peft_config("[1]", "c"), peft::FormatError);
  REQUIRE_THROWS_AS(peft::io::parse_peft_config("{", "c"), peft::FormatError);
  REQUIRE_THROWS_AS(peft::io::parse_peft_config(config_json(R"(, "rank_pattern": {"q(": 2})"), "c"), peft::FormatError);
  // Fields that do not change the arithmetic are fine, and so are initialisations that keep the base.
  REQUIRE_NOTHROW(peft::io::parse_peft_config(
      config_json(R"(, "init_lora_weights": "gaussian", "revision": null, "layers_to_transform": null,
                    "lora_bias": false, "layer_replication": null, "some_future_field": {"x": 1})"),
      "c"));
}

TEST_CASE("the merge free functions compute W + s B A and DoRA's rows as PEFT, in both layouts", "[io][merge]") {
  const Index d_out = 300, d_in = 200, r = 6;
  const MatrixXd W0 = uniform_matrix(d_out, d_in, 1), A = uniform_matrix(r, d_in, 2), B = uniform_matrix(d_out, r, 3);
  const double s = 0.75;
  const MatrixXd exact = W0 + s * B * A;
  SECTION("LoRA, float, and stored transposed (fan_in_fan_out)") {
    MatrixXf W = W0.cast<float>();
    peft::merge::lora(W, A.cast<float>(), B.cast<float>(), s);
    const MatrixXd bound = lora_bound(W0, A, B, s);
    REQUIRE(((W.cast<double>() - exact).cwiseAbs().array() <= bound.array()).all());
    RowMajorXf Wt = W0.transpose().cast<float>();  // d_in x d_out
    peft::merge::lora(Wt, A.cast<float>(), B.cast<float>(), s, true);
    REQUIRE(((Wt.transpose().cast<double>() - exact).cwiseAbs().array() <= bound.array()).all());
  }
  SECTION("DoRA: rows scaled to m / ||W + s B A||") {
    const VectorXd m = uniform_matrix(d_out, 1, 4).cwiseAbs().array() + 0.5;
    MatrixXd want = exact;
    for (Index i = 0; i < d_out; ++i) want.row(i) *= m(i) / exact.row(i).norm();
    MatrixXd W = W0;
    peft::merge::dora(W, A, B, m, s);
    REQUIRE((W - want).cwiseAbs().maxCoeff() < 1e-13);
    MatrixXd Wt = W0.transpose();
    peft::merge::dora(Wt, A, B, m, s, true);
    REQUIRE((Wt.transpose() - want).cwiseAbs().maxCoeff() < 1e-13);
  }
  SECTION("errors leave W untouched") {
    MatrixXd W = W0;
    REQUIRE_THROWS_AS(peft::merge::lora(W, A, B.topRows(10), s), peft::ShapeError);
    REQUIRE_THROWS_AS(peft::merge::dora(W, A, B, VectorXd::Ones(d_out - 1), s), peft::ShapeError);
    MatrixXd Z = W0;
    Z.row(7).setZero();
    REQUIRE_THROWS_AS(peft::merge::dora(Z, A, MatrixXd::Zero(d_out, r), VectorXd::Ones(d_out), s), peft::NumericalError);
    REQUIRE(W == W0);
    REQUIRE(Z.row(8) == W0.row(8));
  }
}

TEST_CASE("a PEFT directory is read into modules with their ranks and scales, and builds LoRA and DoRA", "[io][peft]") {
  Scratch tmp("read");
  const Index d = 24, r = 4;
  const std::string q = "model.layers.0.self_attn.q_proj", v = "model.layers.0.self_attn.v_proj";
  const MatrixXd Aq = uniform_matrix(r, d, 11), Bq = uniform_matrix(d, r, 12), Av = uniform_matrix(2, d, 13), Bv = uniform_matrix(d, 2, 14);
  AdapterDir lora{config_json(R"(, "r": 4, "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"v_proj": 5},
                                 "use_rslora": true)"),
                  {{"base_model.model." + q + ".lora_A.weight", Aq.cast<float>()},
                   {"base_model.model." + q + ".lora_B.weight", Bq.cast<float>()},
                   {"base_model.model." + v + ".lora_A.weight", Av.cast<float>()},
                   {"base_model.model." + v + ".lora_B.weight", Bv.cast<float>()}}};
  lora.write(tmp / "lora");
  const peft::io::PeftAdapter<float> a(tmp / "lora");
  REQUIRE(a.modules().size() == 2);
  REQUIRE(a.find(q)->A == Aq.cast<float>());
  REQUIRE(a.find(q)->scale == 16 / std::sqrt(4.0));
  REQUIRE(a.find(v)->scale == 5 / std::sqrt(2.0));

  // The LoRA built over a weight gives the merged weight's forward.
  MatrixXf W = uniform_matrix(d, d, 15).cast<float>();
  VectorXf b = uniform_matrix(d, 1, 16).cast<float>();
  const MatrixXf X = uniform_matrix(d, 3, 17).cast<float>();
  auto layer = peft::io::make_lora<MatrixXf>(a.config(), *a.find(q), W, b);
  const MatrixXf Y = layer.forward(X);
  MatrixXf Wm = W;
  peft::merge::lora(Wm, a.find(q)->A, a.find(q)->B, a.find(q)->scale);
  REQUIRE((Y - ((Wm * X).colwise() + b)).cwiseAbs().maxCoeff() < 1e-4f);
  REQUIRE_THROWS_AS(peft::io::make_dora<MatrixXf>(a.config(), *a.find(q), W, b), peft::ConfigError);

  // DoRA, with the magnitude as current PEFT names it and as older files do (".weight").
  const VectorXd mq = uniform_matrix(d, 1, 18).cwiseAbs().array() + 1.0;
  AdapterDir dora{config_json(R"(, "r": 4, "use_dora": true)"),
                  {{"base_model.model." + q + ".lora_A.weight", Aq.cast<float>()},
                   {"base_model.model." + q + ".lora_B.weight", Bq.cast<float>()},
                   {"base_model.model." + q + ".lora_magnitude_vector", mq.cast<float>()},
                   {"base_model.model." + v + ".lora_A.weight", Aq.cast<float>()},
                   {"base_model.model." + v + ".lora_B.weight", Bq.cast<float>()},
                   {"base_model.model." + v + ".lora_magnitude_vector.weight", mq.cast<float>()}}};
  dora.write(tmp / "dora");
  const peft::io::PeftAdapter<double> dd(tmp / "dora");
  REQUIRE(dd.find(v)->magnitude == mq.cast<float>().cast<double>());
  MatrixXd Wd = uniform_matrix(d, d, 19);
  VectorXd bd = uniform_matrix(d, 1, 20);
  auto dl = peft::io::make_dora<MatrixXd>(dd.config(), *dd.find(q), Wd, bd);
  const MatrixXd Xd = uniform_matrix(d, 3, 21);
  MatrixXd Wdm = Wd;
  peft::merge::dora(Wdm, dd.find(q)->A, dd.find(q)->B, dd.find(q)->magnitude, dd.find(q)->scale);
  REQUIRE((dl.forward(Xd) - ((Wdm * Xd).colwise() + bd)).cwiseAbs().maxCoeff() < 1e-12);

  SECTION("inconsistent directories are refused, naming the module or tensor") {
    const auto refused = [&](AdapterDir bad, const std::string& what) {
      bad.write(tmp / "bad");
      REQUIRE_THROWS_WITH(peft::io::PeftAdapter<float>(tmp / "bad"), has_substring(what));
      fs::remove_all(tmp / "bad");
    };
    refused({config_json(R"(, "r": 4)"), {{"base_model.model." + q + ".lora_A.weight", Aq.cast<float>()}}}, "no lora_B");
    refused({config_json(R"(, "r": 8)"), {lora.tensors[0], lora.tensors[1]}}, "rank 4");  // r says 8
    refused({config_json(R"(, "r": 4, "use_dora": true)"), {lora.tensors[0], lora.tensors[1]}}, "use_dora");
    refused({config_json(R"(, "r": 4)"), {dora.tensors[0], dora.tensors[1], dora.tensors[2]}}, "use_dora");
    refused({config_json(R"(, "r": 4)"), {lora.tensors[0], lora.tensors[1], {"base_model.model.lm_head.weight", Aq.cast<float>()}}},
            "lm_head");
    refused({config_json(R"(, "r": 4)"),
             {{"base_model.model.embed_tokens.lora_embedding_A", Aq.cast<float>()}, lora.tensors[0], lora.tensors[1]}},
            "embedding");
    refused({config_json(R"(, "r": 4)"), {{"base_model.model." + q + ".lora_A.weight", Aq.cast<float>()},
                                          {"base_model.model." + q + ".lora_B.weight", Bv.cast<float>()}}},
            "lora_B is");
    REQUIRE_THROWS_AS(peft::io::PeftAdapter<float>(tmp / "missing"), peft::FileError);
  }
}

TEST_CASE("modules_to_save claims the tensors of a module whose path ends with the name at a dot, no others",
          "[io][peft]") {
  // PEFT matches a modules_to_save name against a module's path as the whole path or a suffix after a
  // '.': "score" names "score" and "model.score", never "myscore" or "scores". A tensor claimed by
  // mistake would replace the base's tensor of that name in peft-merge and load_peft.
  Scratch tmp("saved");
  const Index d = 8;
  const MatrixXf A = uniform_matrix(2, d, 51).cast<float>(), B = uniform_matrix(d, 2, 52).cast<float>(), H = uniform_matrix(3, d, 53).cast<float>();
  const std::string q = "model.layers.0.self_attn.q_proj";
  const auto adapter = [&](std::vector<std::string> extra) {
    AdapterDir dir{config_json(R"(, "r": 2, "modules_to_save": ["score"])"),
                   {{"base_model.model." + q + ".lora_A.weight", A}, {"base_model.model." + q + ".lora_B.weight", B}}};
    for (const auto& key : extra) dir.tensors.emplace_back("base_model.model." + key, H);
    fs::remove_all(tmp / "a");
    dir.write(tmp / "a");
    return tmp / "a";
  };
  // Claimed: the name as the whole path, after a dot, and inside PEFT's older wrapper.
  const peft::io::PeftAdapter<float> ok(
      adapter({"score.weight", "model.score.bias", "cls.score.modules_to_save.default.weight"}));
  std::map<std::string, std::string> claimed;
  for (const auto& t : ok.saved_tensors()) claimed[t.file_key] = t.base_name;
  REQUIRE(claimed == std::map<std::string, std::string>{
                         {"base_model.model.score.weight", "score.weight"},
                         {"base_model.model.model.score.bias", "model.score.bias"},
                         {"base_model.model.cls.score.modules_to_save.default.weight", "cls.score.weight"}});
  REQUIRE(ok.modules().size() == 1);
  // Not claimed: the name inside a longer component, at either end. Such a tensor belongs to nothing the
  // config names, so the directory is refused, naming it.
  for (const std::string key : {"myscore.weight", "model.myscore.weight", "scores.weight", "score_head.bias"}) {
    INFO(key);
    const std::string dir = adapter({"score.weight", key});
    REQUIRE_THROWS_AS(peft::io::PeftAdapter<float>(dir), peft::FormatError);
    REQUIRE_THROWS_WITH(peft::io::PeftAdapter<float>(dir), has_substring(key) && has_substring("modules_to_save"));
  }
}

TEST_CASE("a fan_in_fan_out adapter is not built onto a d_out x d_in weight, square or not", "[io][peft]") {
  // GPT-2's Conv1D stores W as d_in x d_out: the factors of its adapter fit a square d_out x d_in weight
  // as well, where a LoRA would add B A to the transpose of the weight it was trained for.
  Scratch tmp("fan_in_fan_out");
  const Index d = 12, r = 2;
  const std::string c = "h.0.attn.c_attn";
  const MatrixXd A = uniform_matrix(r, d, 41), B = uniform_matrix(d, r, 42);
  const VectorXd m = uniform_matrix(d, 1, 43).cwiseAbs().array() + 1.0;
  AdapterDir lora{config_json(R"(, "r": 2, "fan_in_fan_out": true)"),
                  {{"base_model.model." + c + ".lora_A.weight", A.cast<float>()},
                   {"base_model.model." + c + ".lora_B.weight", B.cast<float>()}}};
  lora.write(tmp / "lora");
  AdapterDir dora{config_json(R"(, "r": 2, "fan_in_fan_out": true, "use_dora": true)"),
                  {lora.tensors[0], lora.tensors[1], {"base_model.model." + c + ".lora_magnitude_vector", m.cast<float>()}}};
  dora.write(tmp / "dora");
  const peft::io::PeftAdapter<float> l(tmp / "lora"), dl(tmp / "dora");
  REQUIRE(l.config().fan_in_fan_out);
  MatrixXf W = uniform_matrix(d, d, 44).cast<float>();
  VectorXf b = uniform_matrix(d, 1, 45).cast<float>();
  const MatrixXf W0 = W;
  const auto refused = [&](auto&& build) {
    REQUIRE_THROWS_AS(build(), peft::ConfigError);
    REQUIRE_THROWS_WITH(build(), has_substring(c) && has_substring("fan_in_fan_out"));
    REQUIRE(W == W0);
  };
  refused([&] { return peft::io::make_lora<MatrixXf>(l.config(), *l.find(c), W, b); });
  refused([&] { return peft::io::make_lora<MatrixXf>(l.config(), *l.find(c), W); });
  refused([&] { return peft::io::make_dora<MatrixXf>(dl.config(), *dl.find(c), W, b); });
  refused([&] { return peft::io::make_dora<MatrixXf>(dl.config(), *dl.find(c), W); });
  // What is right for it: the merge in the stored layout, W + (s B A)^T.
  MatrixXf Wm = W;
  peft::merge::lora(Wm, l.find(c)->A, l.find(c)->B, l.find(c)->scale, true);
  const MatrixXd exact = W0.cast<double>() + (l.find(c)->scale * B.cast<float>().cast<double>() *
                                              A.cast<float>().cast<double>()).transpose();
  REQUIRE((Wm.cast<double>() - exact).cwiseAbs().maxCoeff() < 1e-5);
}

TEST_CASE("peft-merge merges weights of several row blocks in every dtype, LoRA, DoRA and fan_in_fan_out",
          "[io][peft-merge]") {
  // peft-merge streams a weight in blocks of 256 stored rows: 600 rows are two whole blocks and a short
  // one, so each block must take its own rows of B (LoRA, DoRA) and of the magnitude, or its own
  // columns of A (fan_in_fan_out, where stored rows are input units). Every element of every dtype is
  // compared with W0 + s B A (DoRA: its rows scaled to m / norm) computed here in double from the bytes.
  Scratch tmp("blocks");
  const Index n = 600, k = 24, r = 3;
  const double s = 2.0;  // lora_alpha 6 / r 3
  const std::vector<std::pair<std::string, peft::io::Dtype>> dtypes = {
      {"F32", peft::io::Dtype::F32}, {"F64", peft::io::Dtype::F64}, {"F16", peft::io::Dtype::F16}, {"BF16", peft::io::Dtype::BF16}};
  std::vector<peft::io::TensorSpec> specs;
  for (const auto& [name, dt] : dtypes) specs.push_back({"w" + name + ".weight", dt, {std::uint64_t(n), std::uint64_t(k)}});
  {
    peft::io::SafetensorsWriter w(tmp / "base.safetensors", specs);
    for (std::size_t i = 0; i < dtypes.size(); ++i) w.write(specs[i].name, uniform_matrix(n, k, 60 + unsigned(i)));
    w.commit();
  }
  const auto base = read_safetensors(tmp / "base.safetensors").tensors;
  const double eps = std::ldexp(1.0, -24);

  // Merges `config` with factors shaped for (d_out, d_in) into every weight; checks each element against
  // `want` (double) within half an ulp of the dtype plus the float computation's rounding.
  const auto check = [&](const std::string& config, Index d_out, Index d_in, bool dora, bool transposed) {
    AdapterDir a{config_json(config), {}};
    std::map<std::string, MatrixXd> As, Bs, ms;
    for (std::size_t i = 0; i < dtypes.size(); ++i) {
      const std::string path = "w" + dtypes[i].first;
      As[path] = uniform_matrix(r, d_in, 70 + unsigned(i), 0.3).cast<float>().cast<double>();
      Bs[path] = uniform_matrix(d_out, r, 80 + unsigned(i), 0.3).cast<float>().cast<double>();
      a.tensors.emplace_back("base_model.model." + path + ".lora_A.weight", As[path].cast<float>());
      a.tensors.emplace_back("base_model.model." + path + ".lora_B.weight", Bs[path].cast<float>());
      if (dora) {
        ms[path] = (uniform_matrix(d_out, 1, 90 + unsigned(i)).cwiseAbs().array() + 1.0).matrix().cast<float>().cast<double>();
        a.tensors.emplace_back("base_model.model." + path + ".lora_magnitude_vector", ms[path].cast<float>());
      }
    }
    fs::remove_all(tmp / "adapter");
    a.write(tmp / "adapter");
    REQUIRE(run_merge("--base " + (tmp / "base.safetensors") + " --adapter " + (tmp / "adapter") + " --out " +
                          (tmp / "merged.safetensors"),
                      tmp / "log") == 0);
    const auto out = read_safetensors(tmp / "merged.safetensors").tensors;
    for (const auto& [dtype, dt] : dtypes) {
      const std::string path = "w" + dtype;
      INFO(path << (dora ? " DoRA" : " LoRA") << (transposed ? " fan_in_fan_out" : ""));
      const RawTensor& got_raw = out.at(path + ".weight");
      REQUIRE(got_raw.dtype == dtype);
      const MatrixXd W0 = transposed ? MatrixXd(decoded(base.at(path + ".weight")).transpose())
                                     : decoded(base.at(path + ".weight"));  // d_out x d_in
      const MatrixXd got = transposed ? MatrixXd(decoded(got_raw).transpose()) : decoded(got_raw);
      const MatrixXd update = s * Bs[path] * As[path];
      MatrixXd want = W0 + update;
      if (dora)
        for (Index i = 0; i < d_out; ++i) want.row(i) *= ms[path](i) / want.row(i).norm();
      // The float computation's rounding: the product's and the sum's (DoRA: and the norm's and the
      // factor's, relative to the row).
      const double unit = dtype == "F64" ? std::ldexp(1.0, -53) : eps;
      const MatrixXd slack = (double(r) + 8) * unit * (W0.cwiseAbs() + s * Bs[path].cwiseAbs() * As[path].cwiseAbs());
      Index bad = 0;
      for (Index i = 0; i < d_out; ++i)
        for (Index j = 0; j < d_in; ++j) {
          const double bound = (dtype == "F32" || dtype == "F64" ? 0.0 : 0.5 * ulp_of(dtype, want(i, j)) * (1 + 1e-5)) +
                               (dora ? (double(d_in) + 8) * unit * std::abs(want(i, j)) * 4 : 0.0) + slack(i, j);
          bad += !(std::abs(got(i, j) - want(i, j)) <= bound);
        }
      REQUIRE(bad == 0);
      REQUIRE((got - W0).cwiseAbs().maxCoeff() > 0.1);  // it did change
    }
  };
  SECTION("LoRA") { check(R"(, "r": 3, "lora_alpha": 6)", n, k, false, false); }
  SECTION("DoRA") { check(R"(, "r": 3, "lora_alpha": 6, "use_dora": true)", n, k, true, false); }
  SECTION("LoRA on weights stored transposed: the blocks are input units") {
    check(R"(, "r": 3, "lora_alpha": 6, "fan_in_fan_out": true)", k, n, false, true);
  }
}

TEST_CASE("peft-merge merges LoRA, rsLoRA patterns, DoRA and fan_in_fan_out as PEFT, copies the rest bit for bit",
          "[io][peft-merge]") {
  Scratch tmp("merge");
  const Index d = 40, d_ff = 56, vocab = 30, r = 4;
  const std::string q = "model.layers.0.self_attn.q_proj", up = "model.layers.0.mlp.up_proj";
  // The base: F32 weights, a BF16 weight, an I64 buffer, a head; metadata.
  const MatrixXd Wq = uniform_matrix(d, d, 1), Wup = uniform_matrix(d_ff, d, 2), head = uniform_matrix(vocab, d, 3);
  const MatrixXd Wup_bf16 = Wup;  // the same values, stored as BF16 in the second base
  std::vector<peft::io::TensorSpec> specs = {{"model.embed_tokens.weight", peft::io::Dtype::F32, {std::uint64_t(vocab), std::uint64_t(d)}},
                                            {q + ".weight", peft::io::Dtype::F32, {std::uint64_t(d), std::uint64_t(d)}},
                                            {q + ".bias", peft::io::Dtype::F32, {std::uint64_t(d)}},
                                            {"model.position_ids", peft::io::Dtype::I64, {4}},
                                            {up + ".weight", peft::io::Dtype::BF16, {std::uint64_t(d_ff), std::uint64_t(d)}},
                                            {"score.weight", peft::io::Dtype::F32, {std::uint64_t(vocab), std::uint64_t(d)}}};
  {
    peft::io::SafetensorsWriter w(tmp / "model.safetensors", specs, {{"format", "pt"}});
    w.write("model.embed_tokens.weight", uniform_matrix(vocab, d, 4));
    w.write(q + ".weight", Wq);
    w.write(q + ".bias", uniform_matrix(d, 1, 5));
    const std::int64_t ids[4] = {0, 1, 2, -3};
    w.write_bytes(ids, sizeof ids);
    w.write(up + ".weight", Wup_bf16);
    w.write("score.weight", head);
    w.commit();
  }
  const auto base = read_safetensors(tmp / "model.safetensors").tensors;
  const MatrixXd Aq = uniform_matrix(r, d, 6, 0.3), Bq = uniform_matrix(d, r, 7, 0.3), Aup = uniform_matrix(2, d, 8, 0.3), Bup = uniform_matrix(d_ff, 2, 9, 0.3);
  const MatrixXd new_head = uniform_matrix(3, d, 10);  // modules_to_save: a head of another shape
  AdapterDir adapter{config_json(R"(, "r": 4, "lora_alpha": 8, "use_rslora": true, "rank_pattern": {"up_proj": 2},
                                   "alpha_pattern": {"up_proj": 3}, "modules_to_save": ["score"])"),
                     {{"base_model.model." + q + ".lora_A.weight", Aq.cast<float>()},
                      {"base_model.model." + q + ".lora_B.weight", Bq.cast<float>()},
                      {"base_model.model." + up + ".lora_A.weight", Aup.cast<float>()},
                      {"base_model.model." + up + ".lora_B.weight", Bup.cast<float>()},
                      {"base_model.model.score.weight", new_head.cast<float>()}}};
  adapter.write(tmp / "adapter");
  // What peft-merge must produce (float values of the adapter, as the file holds them).
  const MatrixXd Aqf = Aq.cast<float>().cast<double>(), Bqf = Bq.cast<float>().cast<double>();
  const MatrixXd Aupf = Aup.cast<float>().cast<double>(), Bupf = Bup.cast<float>().cast<double>();
  const double sq = 8 / std::sqrt(4.0), sup = 3 / std::sqrt(2.0);

  SECTION("one file") {
    REQUIRE(run_merge("--base " + (tmp / "model.safetensors") + " --adapter " + (tmp / "adapter") + " --out " +
                          (tmp / "merged.safetensors"),
                      tmp / "log") == 0);
    const RawSafetensors merged = read_safetensors(tmp / "merged.safetensors");
    nlohmann::json meta = merged.metadata;
    const auto& out = merged.tensors;
    REQUIRE(meta["format"] == "pt");
    REQUIRE(out.size() == base.size());
    // Untouched tensors: the same bytes.
    for (const char* name : {"model.embed_tokens.weight", "model.position_ids"})
      REQUIRE(out.at(name).bytes == base.at(name).bytes);
    REQUIRE(out.at(q + ".bias").bytes == base.at(q + ".bias").bytes);
    // F32: W + s B A within the product's rounding.
    const MatrixXd Wq_f = f32_matrix(base.at(q + ".weight"));
    const MatrixXd exact_q = Wq_f + sq * Bqf * Aqf;
    const MatrixXd got_q = f32_matrix(out.at(q + ".weight"));
    REQUIRE(((got_q - exact_q).cwiseAbs().array() <= lora_bound(Wq_f, Aqf, Bqf, sq).array()).all());
    REQUIRE((got_q - Wq_f).cwiseAbs().maxCoeff() > 1e-3);  // it did change
    // BF16: computed in float32 and rounded once: within half a BF16 ulp (plus the float sum's rounding)
    // of the exact value, i.e. one of the two BF16 neighbours of it.
    const RawTensor& up_out = out.at(up + ".weight");
    REQUIRE(up_out.dtype == "BF16");
    for (Index i = 0; i < d_ff; ++i)
      for (Index j = 0; j < d; ++j) {
        const std::size_t k = std::size_t(i * d + j);
        const double w0 = element(base.at(up + ".weight"), k);
        const double exact = w0 + sup * (Bupf.row(i) * Aupf.col(j))(0);
        const double got = element(up_out, k);
        const double ulp = std::ldexp(1.0, std::ilogb(std::abs(exact)) - 7);
        REQUIRE(std::abs(got - exact) <= 0.5 * ulp * (1 + 1e-5) + 1e-7);
      }
    // modules_to_save: the adapter's head, its own shape, in place of the base's.
    REQUIRE(out.at("score.weight").shape == std::vector<std::uint64_t>{3, std::uint64_t(d)});
    REQUIRE(f32_matrix(out.at("score.weight")) == new_head.cast<float>().cast<double>());
    const std::string log = read_file(tmp / "log");
    REQUIRE_THAT(log, has_substring("2 tensors merged, 1 replaced"));
    REQUIRE_THAT(log, has_substring("largest update |s B A|"));

    // --scale multiplies s.
    REQUIRE(run_merge("--base " + (tmp / "model.safetensors") + " --adapter " + (tmp / "adapter") + " --out " +
                          (tmp / "half.safetensors") + " --scale 0.5",
                      tmp / "log") == 0);
    const MatrixXd got_half = f32_matrix(read_safetensors(tmp / "half.safetensors").tensors.at(q + ".weight"));
    REQUIRE(((got_half - (Wq_f + 0.5 * sq * Bqf * Aqf)).cwiseAbs().array() <=
             lora_bound(Wq_f, Aqf, Bqf, sq).array()).all());
  }

  SECTION("DoRA and fan_in_fan_out") {
    // GPT-2 style: the weight stored d_in x d_out; a DoRA adapter over it.
    const MatrixXd Wc = uniform_matrix(d, d_ff, 30);  // stored (in, out) = (d, d_ff)
    peft::io::save_safetensors<float>(tmp / "gpt2.safetensors", {{"h.0.mlp.c_fc.weight", Wc.cast<float>()}});
    const MatrixXd A = uniform_matrix(r, d, 31, 0.3), B = uniform_matrix(d_ff, r, 32, 0.3);
    const VectorXd m = uniform_matrix(d_ff, 1, 33).cwiseAbs().array() + 1.0;
    AdapterDir dora{config_json(R"(, "r": 4, "use_dora": true, "fan_in_fan_out": true)"),
                    {{"base_model.model.h.0.mlp.c_fc.lora_A.weight", A.cast<float>()},
                     {"base_model.model.h.0.mlp.c_fc.lora_B.weight", B.cast<float>()},
                     {"base_model.model.h.0.mlp.c_fc.lora_magnitude_vector", m.cast<float>()}}};
    dora.write(tmp / "dora");
    REQUIRE(run_merge("--base " + (tmp / "gpt2.safetensors") + " --adapter " + (tmp / "dora") + " --out " +
                          (tmp / "gpt2_merged.safetensors"),
                      tmp / "log") == 0);
    const MatrixXd got = f32_matrix(read_safetensors(tmp / "gpt2_merged.safetensors").tensors.at("h.0.mlp.c_fc.weight"));
    const MatrixXd V = Wc.cast<float>().cast<double>().transpose() +
                       4.0 * B.cast<float>().cast<double>() * A.cast<float>().cast<double>();  // s = 16 / 4
    MatrixXd want = V;
    for (Index i = 0; i < d_ff; ++i) want.row(i) *= double(float(m(i))) / V.row(i).norm();
    REQUIRE((got.transpose() - want).cwiseAbs().maxCoeff() < 1e-5);
  }

  SECTION("a sharded base gives sharded output with the same shard names and an updated index") {
    fs::create_directories(tmp / "sharded");
    fs::create_directories(tmp / "out");
    peft::io::save_safetensors<float>(tmp / "sharded/model-00001-of-00002.safetensors",
                                      {{q + ".weight", Wq.cast<float>()}, {"model.embed_tokens.weight", uniform_matrix(vocab, d, 4).cast<float>()}});
    peft::io::save_safetensors<float>(tmp / "sharded/model-00002-of-00002.safetensors",
                                      {{up + ".weight", Wup.cast<float>()}, {"score.weight", head.cast<float>()}});
    write_file(tmp / "sharded/model.safetensors.index.json",
               R"({"metadata": {"total_size": 1}, "weight_map": {")" + q +
                   R"(.weight": "model-00001-of-00002.safetensors", "model.embed_tokens.weight": "model-00001-of-00002.safetensors", ")" +
                   up + R"(.weight": "model-00002-of-00002.safetensors", "score.weight": "model-00002-of-00002.safetensors"}})");
    REQUIRE(run_merge("--base " + (tmp / "sharded/model.safetensors.index.json") + " --adapter " + (tmp / "adapter") +
                          " --out " + (tmp / "out/model.safetensors.index.json"),
                      tmp / "log") == 0);
    const auto index = nlohmann::json::parse(read_file(tmp / "out/model.safetensors.index.json"));
    REQUIRE(index["weight_map"][q + ".weight"] == "model-00001-of-00002.safetensors");
    const auto s1 = read_safetensors(tmp / "out/model-00001-of-00002.safetensors").tensors;
    const auto s2 = read_safetensors(tmp / "out/model-00002-of-00002.safetensors").tensors;
    REQUIRE(index["metadata"]["total_size"] == 4 * (2 * d * d + vocab * d) + 4 * (d_ff * d + 3 * d) - 4 * d * d);
    const MatrixXd Wq_f = Wq.cast<float>().cast<double>();
    REQUIRE(((f32_matrix(s1.at(q + ".weight")) - (Wq_f + sq * Bqf * Aqf)).cwiseAbs().array() <=
             lora_bound(Wq_f, Aqf, Bqf, sq).array()).all());
    REQUIRE(s2.at("score.weight").shape[0] == 3);
    REQUIRE(std::distance(fs::directory_iterator(tmp.dir / "out"), fs::directory_iterator()) == 3);  // nothing else left
  }

  SECTION("errors: one line, exit 1, inputs untouched, no output left, an existing output kept") {
    const std::string before = read_file(tmp / "model.safetensors");
    write_file(tmp / "existing.safetensors", "keep me");
    const auto fails = [&](const std::string& adapter_dir, const std::string& base, const std::string& what) {
      REQUIRE(run_merge("--base " + base + " --adapter " + adapter_dir + " --out " + (tmp / "existing.safetensors"),
                        tmp / "log") == 1);
      REQUIRE_THAT(read_file(tmp / "log"), has_substring(what));
      REQUIRE(read_file(tmp / "existing.safetensors") == "keep me");
      REQUIRE(read_file(tmp / "model.safetensors") == before);
      for (const auto& e : fs::directory_iterator(tmp.dir))  // no temporary or staging directory left
        REQUIRE(e.path().filename().string().rfind(".peft-merge", 0) != 0);
    };
    AdapterDir missing{config_json(R"(, "r": 4)"), {{"base_model.model.model.layers.9.q_proj.lora_A.weight", Aq.cast<float>()},
                                                    {"base_model.model.model.layers.9.q_proj.lora_B.weight", Bq.cast<float>()}}};
    missing.write(tmp / "missing");
    fails(tmp / "missing", tmp / "model.safetensors", "model.layers.9.q_proj.weight");
    AdapterDir wrong{config_json(R"(, "r": 4)"), {{"base_model.model." + up + ".lora_A.weight", Aq.cast<float>()},
                                                  {"base_model.model." + up + ".lora_B.weight", Bq.cast<float>()}}};
    wrong.write(tmp / "wrong");
    fails(tmp / "wrong", tmp / "model.safetensors", "need 40x40");
    AdapterDir pissa{config_json(R"(, "r": 4, "init_lora_weights": "pissa")"), {adapter.tensors[0], adapter.tensors[1]}};
    pissa.write(tmp / "pissa");
    fails(tmp / "pissa", tmp / "model.safetensors", "init_lora_weights");
    write_file(tmp / "truncated.safetensors", before.substr(0, before.size() - 3));
    fails(tmp / "adapter", tmp / "truncated.safetensors", "truncated.safetensors");
    fails(tmp / "nowhere", tmp / "model.safetensors", "adapter_config.json");
    REQUIRE(run_merge("--base " + (tmp / "model.safetensors"), tmp / "log") == 2);  // usage
    REQUIRE(run_merge("--base " + (tmp / "model.safetensors") + " --adapter " + (tmp / "adapter") + " --out " +
                          (tmp / "model.safetensors"),
                      tmp / "log") == 1);  // never over its own input
    REQUIRE(read_file(tmp / "model.safetensors") == before);
  }
}
