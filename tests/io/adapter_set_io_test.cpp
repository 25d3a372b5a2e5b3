// A whole model's adapters saved as PEFT directories (io/adapter_set_io.hpp: save_peft, load_peft) and
// loaded back: the same parameters and outputs for every kind (a PiSSA as its rank-2r LoRA), the files
// read from their bytes (PEFT's keys, shapes and config fields), modules_to_save, per-module ranks and
// alphas; and the saves' atomicity and errors (a failing save leaves the old directory byte for byte, a
// model that does not fit is refused before a weight is written). What was written is read by the
// tests' own safetensors reader (support/safetensors_reader.hpp: the bytes, not our loader) and the JSON
// text of the config; what was loaded is compared with the set that was saved, parameter by parameter
// and output by output. Training checkpoints have their own test (adapter_set_checkpoint_test.cpp).
#include "support/catch.hpp"
#include "support/errors.hpp"
#include "support/files.hpp"
#include "support/matrices.hpp"
#include "support/safetensors_reader.hpp"
#include "support/scratch.hpp"
#include "support/training_run.hpp"

#include <peft/io/adapter_set_io.hpp>
#include <peft/optim/adamw.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <set>
#include <string>
#include <utility>
#include <vector>

namespace io = peft::io;
using Eigen::Index;
using Eigen::MatrixXd;
using Eigen::MatrixXf;
using peft::AdapterKind;
using peft::test::decode;
using peft::test::has_substring;
using peft::test::message_of;
using peft::test::random_matrix;
using peft::test::RawSafetensors;
using peft::test::RawTensor;
using peft::test::read_safetensors;
using peft::test::same_bits;
using peft::test::directory_bytes;
using peft::test::leftovers;
using peft::test::read_file;
using peft::test::Scratch;
using peft::test::write_file;
using namespace peft::test::training_run;

namespace {

/// The JSON config of a saved directory, in the file's key order.
nlohmann::ordered_json read_config(const std::string& dir) {
  return nlohmann::ordered_json::parse(read_file(dir + "/adapter_config.json"));
}

std::vector<std::string> keys_of(const nlohmann::ordered_json& j) {
  std::vector<std::string> out;
  for (auto it = j.begin(); it != j.end(); ++it) out.push_back(it.key());
  return out;
}

/// The file key of a parameter, as PEFT names it: ".weight" after the LoRA factors, none after the
/// magnitude and SSF's vectors; whole modules' "<path>.weight" / "<path>.bias" as they are.
std::string peft_key_of(const std::string& param) {
  const auto ends = [&](const std::string& tail) {
    return param.size() > tail.size() && param.compare(param.size() - tail.size(), tail.size(), tail) == 0;
  };
  return "base_model.model." + param + (ends(".lora_A") || ends(".lora_B") ? ".weight" : "");
}

/// The shape PEFT gives a parameter: the factors and whole weights 2-D, the vectors 1-D.
std::vector<std::uint64_t> peft_shape_of(const std::string& param, Index rows, Index cols) {
  const auto ends = [&](const std::string& tail) {
    return param.size() > tail.size() && param.compare(param.size() - tail.size(), tail.size(), tail) == 0;
  };
  if (ends(".lora_A") || ends(".lora_B") || ends(".weight")) return {std::uint64_t(rows), std::uint64_t(cols)};
  REQUIRE((cols == 1));
  return {std::uint64_t(rows)};
}

template <class M>
Index rank_of(const peft::AdapterSet<M>& set, const std::string& path) {
  return set.at(path).lora_shape().rank;
}

double max_abs(const MatrixXd& m) { return m.size() == 0 ? 0.0 : m.cwiseAbs().maxCoeff(); }

}  // namespace

// ---------------------------------------------------------------------------------------------------
// 1. Save then load: the same parameters and outputs

namespace {

/// Trains a set of `kind` (with the head and the pooler trained whole) two steps, saves it with
/// `options`, loads it onto a fresh copy of the base and compares: the parameters and the whole modules'
/// weights bit for bit (or to float rounding when a double set is saved as F32), the adapters' kinds,
/// ranks and alphas, and every layer's output.
template <class M>
void check_round_trip(AdapterKind kind, const io::SaveOptions& options, const std::string& dir) {
  using S = typename M::Scalar;
  const bool exact = options.dtype == io::dtype_of<S>();
  Model<M> base;
  peft::AdapterSet<M> set(base.weights, make_config(kind));
  set.train_whole("head");
  set.train_whole("pooler");
  auto opt = make_adamw<S>();
  set.add_to(opt);
  train(set, opt, 0, 2);
  if (kind != AdapterKind::ssf) REQUIRE(set.at("layers.0.v_proj").parameters()[1].value.cwiseAbs().maxCoeff() > 0);

  io::save_peft(set, dir, options);

  Model<M> fresh;
  peft::AdapterSet<M> loaded = io::load_peft(dir, fresh.weights);
  REQUIRE((loaded.size() == 3));
  REQUIRE((loaded.whole_modules().size() == 2));

  // The parameters: the same names, the same values.
  const auto want = snapshot(set);
  const auto got = snapshot(loaded);
  REQUIRE((got.size() == want.size()));
  for (const auto& [name, v] : want) {
    INFO(name);
    REQUIRE((got.count(name) == 1));
    const peft::MatrixX<S> expected = exact ? v : peft::MatrixX<S>(v.template cast<float>().template cast<S>());
    REQUIRE(same_bits(got.at(name), expected));
  }
  // The whole modules were copied into the fresh model, the adapted modules' weights untouched.
  for (const std::string path : {"head", "pooler"}) {
    const M expected = exact ? base.weight(path) : M(base.weight(path).template cast<float>().template cast<S>());
    REQUIRE(same_bits(fresh.weight(path), expected));
    REQUIRE_FALSE(same_bits(fresh.weight(path), Model<M>().weight(path)));  // trained, so it was copied
  }
  for (const std::string path : {"layers.0.q_proj", "layers.0.v_proj", "layers.1.q_proj"})
    REQUIRE(same_bits(fresh.weight(path), base.weight(path)));

  // The same kind of adapter with the same arithmetic, computing the same outputs.
  for (const auto& l : set.layers()) {
    INFO(l.path);
    const auto& a = loaded.at(l.path);
    switch (kind) {
      case AdapterKind::lora: REQUIRE(a.template get<peft::LoRA<M>>() != nullptr); break;
      case AdapterKind::dora: REQUIRE(a.template get<peft::DoRA<M>>() != nullptr); break;
      case AdapterKind::ssf: REQUIRE(a.template get<peft::SSF<M>>() != nullptr); break;
      case AdapterKind::pissa: FAIL("PiSSA has its own test"); break;
    }
    REQUIRE((a.lora_shape().rank == l.adapter.lora_shape().rank));
    REQUIRE((a.lora_shape().alpha == l.adapter.lora_shape().alpha));
    REQUIRE((a.lora_shape().use_rslora == l.adapter.lora_shape().use_rslora));
    const auto X = random_matrix<peft::MatrixX<S>>(l.adapter.d_in(), 4, 5);
    const peft::MatrixX<S> y0 = l.adapter.forward(X), y1 = a.forward(X);
    if (exact) {
      REQUIRE(same_bits(y0, y1));
    } else {
      const MatrixXd d = (y0 - y1).template cast<double>();
      REQUIRE(max_abs(d) <= 1e-5 * (1 + max_abs(y0.template cast<double>())));
    }
  }
  // The dtype on disk is the one asked for.
  const RawSafetensors file = read_safetensors(dir + "/adapter_model.safetensors");
  for (const auto& [key, raw] : file.tensors) {
    INFO(key);
    REQUIRE((raw.dtype == io::dtype_name(options.dtype)));
  }
}

}  // namespace

TEST_CASE("a float set saved and loaded has the same parameters and outputs for lora dora and ssf",
          "[io][adapter_set]") {
  Scratch scratch("round_trip_f");
  for (AdapterKind kind : {AdapterKind::lora, AdapterKind::dora, AdapterKind::ssf}) {
    DYNAMIC_SECTION(peft::kind_name(kind)) {
      check_round_trip<MatrixXf>(kind, io::SaveOptions(), scratch / peft::kind_name(kind));
    }
  }
}

TEST_CASE("a double set saved as F64 comes back bit for bit and as F32 to float rounding", "[io][adapter_set]") {
  Scratch scratch("round_trip_d");
  for (AdapterKind kind : {AdapterKind::lora, AdapterKind::dora, AdapterKind::ssf}) {
    DYNAMIC_SECTION(peft::kind_name(kind) << " F64") {
      io::SaveOptions o;
      o.dtype = io::Dtype::F64;
      check_round_trip<MatrixXd>(kind, o, scratch / (std::string(peft::kind_name(kind)) + "_f64"));
    }
    DYNAMIC_SECTION(peft::kind_name(kind) << " F32") {
      check_round_trip<MatrixXd>(kind, io::SaveOptions(), scratch / (std::string(peft::kind_name(kind)) + "_f32"));
    }
  }
}

TEST_CASE("a trained PiSSA is saved as its rank-2r LoRA on the original weight and loads as one",
          "[io][adapter_set][pissa]") {
  Scratch scratch("pissa");
  for (bool rslora : {false, true}) {
    DYNAMIC_SECTION("use_rslora " << rslora) {
      const std::string dir = scratch / (rslora ? "rslora" : "plain");
      Model<MatrixXf> original;  // never adapted: the weights PEFT's base model has
      Model<MatrixXf> base;      // PiSSA puts its residual here
      auto cfg = make_config(AdapterKind::pissa);
      cfg.use_rslora = rslora;
      cfg.rank_pattern = {{"v_proj", 2}};
      cfg.alpha_pattern = {{"layers\\.1\\.q_proj", 5}};
      peft::AdapterSet<MatrixXf> set(base.weights, cfg);
      REQUIRE_FALSE(same_bits(base.weight("layers.0.q_proj"), original.weight("layers.0.q_proj")));
      auto opt = make_adamw<float>();
      set.add_to(opt);
      train(set, opt, 0, 2);
      io::save_peft(set, dir);

      // The config: r, alpha and the patterns as PEFT converts a PiSSA (2r; 2α, or α√2 with rsLoRA).
      const auto j = read_config(dir);
      const double f = rslora ? std::sqrt(2.0) : 2.0;
      REQUIRE(j.at("peft_type") == "LORA");
      REQUIRE(j.at("r") == 6);
      REQUIRE(j.at("lora_alpha").get<double>() == 6 * f);
      REQUIRE(j.at("use_rslora") == rslora);
      REQUIRE(j.at("use_dora") == false);
      REQUIRE(j.at("init_lora_weights") == true);
      REQUIRE(j.at("rank_pattern") == nlohmann::ordered_json::object({{"v_proj", 4}}));
      REQUIRE(j.at("alpha_pattern").size() == 1);
      REQUIRE(j.at("alpha_pattern").at("layers\\.1\\.q_proj").get<double>() == 5 * f);

      // The tensors: lora_A = [A; −A0], lora_B = [B | B0], the PiSSA's to_lora().
      const RawSafetensors file = read_safetensors(dir + "/adapter_model.safetensors");
      REQUIRE((file.tensors.size() == 6));
      for (const auto& l : set.layers()) {
        INFO(l.path);
        const auto* p = l.adapter.get<peft::PiSSA<MatrixXf>>();
        REQUIRE((p != nullptr));
        const Index r = p->rank();
        MatrixXf A(2 * r, p->d_in()), B(p->d_out(), 2 * r);
        A << p->A(), -p->initial_A();
        B << p->B(), p->initial_B();
        REQUIRE_FALSE(same_bits(p->B(), p->initial_B()));  // trained
        const RawTensor& ra = file.tensors.at("base_model.model." + l.path + ".lora_A.weight");
        const RawTensor& rb = file.tensors.at("base_model.model." + l.path + ".lora_B.weight");
        REQUIRE((ra.shape == std::vector<std::uint64_t>{std::uint64_t(2 * r), std::uint64_t(p->d_in())}));
        REQUIRE((rb.shape == std::vector<std::uint64_t>{std::uint64_t(p->d_out()), std::uint64_t(2 * r)}));
        REQUIRE((decode(ra) == A.cast<double>()));
        REQUIRE((decode(rb) == B.cast<double>()));
        const auto e = p->to_lora();
        REQUIRE(same_bits(e.A, A));
        REQUIRE(same_bits(e.B, B));
      }

      // Loaded onto the original weights: a LoRA of rank 2r whose output is the trained PiSSA's.
      Model<MatrixXf> fresh;
      auto loaded = io::load_peft(dir, fresh.weights);
      REQUIRE(same_weights(fresh, original));
      REQUIRE((loaded.size() == 3));
      for (const auto& l : set.layers()) {
        INFO(l.path);
        const auto* p = l.adapter.get<peft::PiSSA<MatrixXf>>();
        const auto* q = loaded.at(l.path).get<peft::LoRA<MatrixXf>>();
        REQUIRE((q != nullptr));
        REQUIRE((q->rank() == 2 * p->rank()));
        REQUIRE(std::abs(q->scaling() - p->scaling()) <= 1e-12 * p->scaling());
        const MatrixXf X = random_matrix<MatrixXf>(p->d_in(), 4, 21);
        const MatrixXd y0 = p->forward(X).cast<double>(), y1 = q->forward(X).cast<double>();
        const MatrixXd W0 = original.weight(l.path).cast<double>();
        const double bound = 1e-5 * (1 + max_abs((W0.cwiseAbs() * X.cast<double>().cwiseAbs()).eval()) +
                                     p->scaling() * max_abs((p->B().cast<double>().cwiseAbs() *
                                                             p->A().cast<double>().cwiseAbs() *
                                                             X.cast<double>().cwiseAbs()).eval()));
        REQUIRE(max_abs(y0 - y1) <= bound);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// 2. The files, read from their bytes

namespace {

/// Reads the directory `dir` a float set was saved in and checks the tensors against the set: exactly
/// one key per parameter (PEFT's names and shapes), F32, the values bit for bit, metadata format "pt".
void check_tensors(peft::AdapterSet<MatrixXf>& set, const std::string& dir) {
  const RawSafetensors file = read_safetensors(dir + "/adapter_model.safetensors");
  REQUIRE(file.metadata == nlohmann::json::object({{"format", "pt"}}));
  std::set<std::string> expected;
  for (const auto& p : set.parameters()) {
    const std::string key = peft_key_of(p.name);
    INFO(key);
    expected.insert(key);
    REQUIRE((file.tensors.count(key) == 1));
    const RawTensor& raw = file.tensors.at(key);
    REQUIRE(raw.dtype == "F32");
    REQUIRE((raw.shape == peft_shape_of(p.name, p.value.rows(), p.value.cols())));
    REQUIRE((decode(raw) == MatrixXf(p.value).cast<double>()));
  }
  std::set<std::string> keys;
  for (const auto& [key, raw] : file.tensors) keys.insert(key);
  REQUIRE((keys == expected));
}

}  // namespace

TEST_CASE("the saved files hold PEFT's keys shapes and config fields for each kind", "[io][adapter_set]") {
  Scratch scratch("files");
  const auto config_keys_sorted = [](const nlohmann::ordered_json& j) {
    const auto k = keys_of(j);
    return std::is_sorted(k.begin(), k.end());
  };

  SECTION("lora with a list of targets a name and a task type") {
    Model<MatrixXf> model;
    peft::AdapterSet<MatrixXf> set(model.weights, make_config(AdapterKind::lora));
    set.train_whole("head");
    auto opt = make_adamw<float>();
    set.add_to(opt);
    train(set, opt, 0, 2);
    io::SaveOptions o;
    o.base_model_name_or_path = "tiny/model";
    o.task_type = "CAUSAL_LM";
    const std::string dir = scratch / "lora";
    io::save_peft(set, dir, o);
    REQUIRE((directory_bytes(dir).size() == 2));

    check_tensors(set, dir);
    const RawSafetensors file = read_safetensors(dir + "/adapter_model.safetensors");
    REQUIRE((file.tensors.size() == 8));  // 3 x (A, B) + head weight and bias
    using Shape = std::vector<std::uint64_t>;
    REQUIRE(file.tensors.at("base_model.model.layers.0.v_proj.lora_A.weight").shape == Shape{3, 8});
    REQUIRE(file.tensors.at("base_model.model.layers.0.v_proj.lora_B.weight").shape == Shape{10, 3});
    REQUIRE(file.tensors.at("base_model.model.head.weight").shape == std::vector<std::uint64_t>{6, 8});
    REQUIRE(file.tensors.at("base_model.model.head.bias").shape == std::vector<std::uint64_t>{6});
    REQUIRE(decode(file.tensors.at("base_model.model.head.weight")) == model.weight("head").cast<double>());

    const auto j = read_config(dir);
    REQUIRE(config_keys_sorted(j));
    REQUIRE(j.at("peft_type") == "LORA");
    REQUIRE(j.at("r") == 3);
    REQUIRE(j.at("lora_alpha").get<double>() == 6.0);
    REQUIRE(j.at("use_dora") == false);
    REQUIRE(j.at("use_rslora") == false);
    REQUIRE(j.at("target_modules") == nlohmann::ordered_json::array({"q_proj", "v_proj"}));
    REQUIRE(j.at("rank_pattern") == nlohmann::ordered_json::object());
    REQUIRE(j.at("alpha_pattern") == nlohmann::ordered_json::object());
    REQUIRE(j.at("modules_to_save") == nlohmann::ordered_json::array({"head"}));
    REQUIRE(j.at("bias") == "none");
    REQUIRE(j.at("init_lora_weights") == true);
    REQUIRE(j.at("base_model_name_or_path") == "tiny/model");
    REQUIRE(j.at("task_type") == "CAUSAL_LM");
  }

  SECTION("dora with a regular expression for targets rsLoRA and no name") {
    Model<MatrixXf> model;
    auto cfg = make_config(AdapterKind::dora);
    cfg.target_modules = peft::ModuleSelector::regex("layers\\.\\d+\\.(q|v)_proj");
    cfg.use_rslora = true;
    peft::AdapterSet<MatrixXf> set(model.weights, cfg);
    auto opt = make_adamw<float>();
    set.add_to(opt);
    train(set, opt, 0, 2);
    const std::string dir = scratch / "dora";
    io::save_peft(set, dir);

    check_tensors(set, dir);
    const RawSafetensors file = read_safetensors(dir + "/adapter_model.safetensors");
    REQUIRE((file.tensors.size() == 9));
    REQUIRE(file.tensors.at("base_model.model.layers.0.v_proj.lora_magnitude_vector").shape ==
            std::vector<std::uint64_t>{10});
    REQUIRE(file.tensors.count("base_model.model.layers.0.v_proj.lora_magnitude_vector.weight") == 0);

    const auto j = read_config(dir);
    REQUIRE(config_keys_sorted(j));
    REQUIRE(j.at("peft_type") == "LORA");
    REQUIRE(j.at("use_dora") == true);
    REQUIRE(j.at("use_rslora") == true);
    REQUIRE(j.at("r") == 3);
    REQUIRE(j.at("target_modules") == "layers\\.\\d+\\.(q|v)_proj");
    REQUIRE(j.at("modules_to_save").is_null());
    REQUIRE(j.at("bias") == "none");
    REQUIRE(j.at("base_model_name_or_path").is_null());
    REQUIRE(j.at("task_type").is_null());
  }

  SECTION("ssf under its own peft_type") {
    Model<MatrixXf> model;
    peft::AdapterSet<MatrixXf> set(model.weights, make_config(AdapterKind::ssf));
    set.train_whole("pooler");
    auto opt = make_adamw<float>();
    set.add_to(opt);
    train(set, opt, 0, 2);
    const std::string dir = scratch / "ssf";
    io::save_peft(set, dir);

    check_tensors(set, dir);
    const RawSafetensors file = read_safetensors(dir + "/adapter_model.safetensors");
    REQUIRE((file.tensors.size() == 7));  // 3 x (scale, shift) + the pooler's weight (it has no bias)
    REQUIRE(file.tensors.at("base_model.model.layers.1.q_proj.ssf_scale").shape == std::vector<std::uint64_t>{8});
    REQUIRE(file.tensors.at("base_model.model.layers.0.v_proj.ssf_shift").shape == std::vector<std::uint64_t>{10});
    REQUIRE(file.tensors.count("base_model.model.pooler.bias") == 0);

    const auto j = read_config(dir);
    REQUIRE(config_keys_sorted(j));
    REQUIRE(j.at("peft_type") == "SSF");
    REQUIRE(j.at("target_modules") == nlohmann::ordered_json::array({"q_proj", "v_proj"}));
    REQUIRE(j.at("modules_to_save") == nlohmann::ordered_json::array({"pooler"}));
    REQUIRE(j.at("bias") == "none");
  }
}

// ---------------------------------------------------------------------------------------------------
// 3. modules_to_save

TEST_CASE("modules trained whole are saved as modules_to_save and trained whole again after loading",
          "[io][adapter_set]") {
  Scratch scratch("whole");
  Model<MatrixXf> model;
  peft::AdapterSet<MatrixXf> set(model.weights, make_config(AdapterKind::lora));
  set.train_whole("head");
  auto opt = make_adamw<float>();
  set.add_to(opt);
  train(set, opt, 0, 2);
  const std::string dir = scratch / "adapter";
  io::save_peft(set, dir);

  const RawSafetensors file = read_safetensors(dir + "/adapter_model.safetensors");
  REQUIRE(decode(file.tensors.at("base_model.model.head.weight")) == model.weight("head").cast<double>());
  REQUIRE(decode(file.tensors.at("base_model.model.head.bias")) == MatrixXf(model.bias("head")).cast<double>());
  REQUIRE(file.tensors.count("base_model.model.pooler.weight") == 0);

  Model<MatrixXf> fresh;
  const MatrixXf head_before = fresh.weight("head");
  auto loaded = io::load_peft(dir, fresh.weights);
  REQUIRE(same_bits(fresh.weight("head"), model.weight("head")));
  REQUIRE(same_bits(fresh.bias("head"), model.bias("head")));
  REQUIRE(same_bits(fresh.weight("pooler"), Model<MatrixXf>().weight("pooler")));
  REQUIRE((loaded.whole_modules().size() == 1));
  REQUIRE(loaded.whole_modules()[0].path == "head");
  const auto names = snapshot(loaded);
  REQUIRE(names.count("head.weight") == 1);
  REQUIRE(names.count("head.bias") == 1);

  // Trained whole: a step moves the model's head.
  auto opt2 = make_adamw<float>();
  loaded.add_to(opt2);
  const MatrixXf head_loaded = fresh.weight("head");
  train(loaded, opt2, 2, 3);
  REQUIRE_FALSE(same_bits(fresh.weight("head"), head_loaded));
  REQUIRE_FALSE(same_bits(head_loaded, head_before));
}

// ---------------------------------------------------------------------------------------------------
// 4. Per-module ranks and alphas

TEST_CASE("rank_pattern and alpha_pattern survive save and load", "[io][adapter_set]") {
  Scratch scratch("patterns");
  Model<MatrixXf> model;
  auto cfg = make_config(AdapterKind::lora);
  cfg.rank_pattern = {{"v_proj", 2}};
  cfg.alpha_pattern = {{"layers\\.1\\.q_proj", 5}};
  peft::AdapterSet<MatrixXf> set(model.weights, cfg);
  auto opt = make_adamw<float>();
  set.add_to(opt);
  train(set, opt, 0, 2);
  const std::string dir = scratch / "adapter";
  io::save_peft(set, dir);

  const auto j = read_config(dir);
  REQUIRE(j.at("r") == 3);
  REQUIRE(j.at("lora_alpha").get<double>() == 6.0);
  REQUIRE(j.at("rank_pattern") == nlohmann::ordered_json::object({{"v_proj", 2}}));
  REQUIRE(j.at("alpha_pattern").size() == 1);
  REQUIRE(j.at("alpha_pattern").at("layers\\.1\\.q_proj").get<double>() == 5.0);
  check_tensors(set, dir);

  Model<MatrixXf> fresh;
  auto loaded = io::load_peft(dir, fresh.weights);
  REQUIRE(rank_of(loaded, "layers.0.q_proj") == 3);
  REQUIRE(rank_of(loaded, "layers.0.v_proj") == 2);
  REQUIRE(rank_of(loaded, "layers.1.q_proj") == 3);
  REQUIRE(loaded.at("layers.0.q_proj").lora_shape().alpha == 6.0);
  REQUIRE(loaded.at("layers.0.v_proj").lora_shape().alpha == 6.0);
  REQUIRE(loaded.at("layers.1.q_proj").lora_shape().alpha == 5.0);
  REQUIRE(same_params(snapshot(loaded), snapshot(set)));
}

namespace {

peft::AnyAdapter<float> lora_on(Model<MatrixXf>& model, const std::string& path, Index rank, double alpha) {
  peft::LoRAConfig c;
  c.rank = rank;
  c.alpha = alpha;
  c.init = peft::LoRAInit::random;  // B != 0: the file's values matter
  c.seed = peft::layer_seed(5, path);
  const auto& m = model.weights.at(path);
  if (m.bias) return peft::AnyAdapter<float>(peft::LoRA<MatrixXf>(*m.weight, *m.bias, c));
  return peft::AnyAdapter<float>(peft::LoRA<MatrixXf>(*m.weight, c));
}

/// Saves a set of LoRAs inserted with the given ranks and alphas, loads it, and checks that every module
/// has its own rank, alpha and values back.
void check_inserted(const std::vector<ModuleSpec>& specs, const std::vector<std::pair<Index, double>>& shapes,
                    const std::string& dir, nlohmann::ordered_json* config = nullptr) {
  Model<MatrixXf> model(specs);
  peft::AdapterSet<MatrixXf> set(model.weights);
  for (std::size_t i = 0; i < shapes.size(); ++i)
    set.insert(specs[i].path, lora_on(model, specs[i].path, shapes[i].first, shapes[i].second));
  REQUIRE_FALSE(set.selected_by_config());
  io::save_peft(set, dir);
  check_tensors(set, dir);
  if (config) *config = read_config(dir);

  Model<MatrixXf> fresh(specs);
  auto loaded = io::load_peft(dir, fresh.weights);
  REQUIRE((loaded.size() == shapes.size()));
  for (std::size_t i = 0; i < shapes.size(); ++i) {
    INFO(specs[i].path);
    REQUIRE((rank_of(loaded, specs[i].path) == shapes[i].first));
    REQUIRE((loaded.at(specs[i].path).lora_shape().alpha == shapes[i].second));
  }
  REQUIRE(same_params(snapshot(loaded), snapshot(set)));
}

}  // namespace

TEST_CASE("a set of inserted adapters with differing ranks saves each module's own rank", "[io][adapter_set]") {
  Scratch scratch("inserted");
  nlohmann::ordered_json j;
  check_inserted(default_specs(), {{2, 4.0}, {4, 8.0}, {4, 8.0}}, scratch / "adapter", &j);
  REQUIRE(j.at("r") == 4);
  REQUIRE(j.at("lora_alpha").get<double>() == 8.0);
  // The patterns cannot give every module its rank: every module gets an entry of its own, in order.
  REQUIRE(j.at("rank_pattern") == nlohmann::ordered_json::object({{"layers\\.0\\.q_proj", 2},
                                                                   {"layers\\.0\\.v_proj", 4},
                                                                   {"layers\\.1\\.q_proj", 4}}));
  REQUIRE(j.at("alpha_pattern").size() == 3);
  REQUIRE(j.at("alpha_pattern").at("layers\\.0\\.q_proj").get<double>() == 4.0);
  REQUIRE(j.at("alpha_pattern").at("layers\\.1\\.q_proj").get<double>() == 8.0);
  REQUIRE(j.at("target_modules") ==
          nlohmann::ordered_json::array({"layers.0.q_proj", "layers.0.v_proj", "layers.1.q_proj"}));
}

TEST_CASE("a module whose path ends another module's path keeps its own rank after loading", "[io][adapter_set]") {
  // "proj"'s own key ("proj", escaped) also names "block.proj": a pattern key matches any path ending with
  // it at a dot. So "block.proj", whose rank and alpha are the common ones, still needs an entry of its
  // own in front, or it loads with "proj"'s rank.
  Scratch scratch("suffix");
  check_inserted({{"proj", 6, 6, false}, {"block.proj", 6, 6, true}, {"other", 6, 6, false}},
                 {{2, 4.0}, {4, 8.0}, {4, 8.0}}, scratch / "adapter");
}

TEST_CASE("rank-1 factors are saved 2-D, [d_out, 1] and [1, d_in] as PEFT saves them, and load back",
          "[io][adapter_set]") {
  // A d_out x 1 lora_B is a column: written as a vector ([d_out]) it would be refused by PEFT and by our
  // own loader, which read the factors as matrices.
  Scratch scratch("rank1");
  check_inserted(default_specs(), {{1, 2.0}, {1, 2.0}, {1, 3.0}}, scratch / "inserted");
  const RawSafetensors file = read_safetensors(scratch / "inserted/adapter_model.safetensors");
  REQUIRE((file.tensors.at("base_model.model.layers.0.v_proj.lora_B.weight").shape ==
           std::vector<std::uint64_t>{10, 1}));
  REQUIRE((file.tensors.at("base_model.model.layers.0.v_proj.lora_A.weight").shape ==
           std::vector<std::uint64_t>{1, 8}));

  // Built by a config of r = 1, DoRA (its magnitude stays a vector, [d_out]), and in a checkpoint.
  Model<MatrixXf> model;
  auto cfg = make_config(AdapterKind::dora);
  cfg.r = 1;
  peft::AdapterSet<MatrixXf> set(model.weights, cfg);
  auto opt = make_adamw<float>();
  set.add_to(opt);
  train(set, opt, 0, 2);
  io::save_checkpoint(set, opt, scratch / "dora");
  check_tensors(set, scratch / "dora");
  const RawSafetensors state = read_safetensors(scratch / "dora/training_state.safetensors");
  REQUIRE((state.tensors.at("layers.0.q_proj.lora_B").shape == std::vector<std::uint64_t>{8, 1}));
  Model<MatrixXf> fresh;
  auto loaded = io::load_peft(scratch / "dora", fresh.weights);
  REQUIRE(rank_of(loaded, "layers.0.q_proj") == 1);
  REQUIRE(same_params(snapshot(loaded), snapshot(set)));
}

// ---------------------------------------------------------------------------------------------------
// 5. Atomicity and errors

TEST_CASE("a directory holding a file peft does not write is not replaced", "[io][adapter_set][errors]") {
  Scratch scratch("foreign");
  Model<MatrixXf> model;
  peft::AdapterSet<MatrixXf> set(model.weights, make_config(AdapterKind::lora));
  const std::string dir = scratch / "adapter";
  io::save_peft(set, dir);
  write_file(dir + "/notes.txt", "my notes");
  const auto before = directory_bytes(dir);
  REQUIRE((before.size() == 3));

  auto opt = make_adamw<float>();
  set.add_to(opt);
  train(set, opt, 0, 1);
  REQUIRE_THROWS_AS(io::save_peft(set, dir), peft::FileError);
  REQUIRE_THAT(message_of([&] { io::save_peft(set, dir); }), has_substring("notes.txt"));
  REQUIRE_THROWS_AS(io::save_checkpoint(set, opt, dir), peft::FileError);
  REQUIRE((directory_bytes(dir) == before));
  REQUIRE(leftovers(scratch.dir).empty());
}

TEST_CASE("a failing save leaves the existing directory byte for byte and no temporary", "[io][adapter_set][errors]") {
  Scratch scratch("failing_save");
  Model<MatrixXf> model;
  peft::AdapterSet<MatrixXf> set(model.weights, make_config(AdapterKind::lora));
  set.train_whole("head");
  auto opt = make_adamw<float>();
  set.add_to(opt);
  train(set, opt, 0, 1);
  const std::string dir = scratch / "adapter";
  io::save_checkpoint(set, opt, dir, {{"step", "1"}});
  const auto before = directory_bytes(dir);
  REQUIRE((before.size() == 3));
  train(set, opt, 1, 2);

  SECTION("an integer dtype") {
    io::SaveOptions o;
    o.dtype = io::Dtype::I32;
    REQUIRE_THROWS_AS(io::save_peft(set, dir, o), peft::ConfigError);
    REQUIRE_THAT(message_of([&] { io::save_peft(set, dir, o); }), has_substring("I32"));
    REQUIRE_THROWS_AS(io::save_checkpoint(set, opt, dir, {}, o), peft::ConfigError);
  }
  SECTION("SSF mixed with a LoRA") {
    Model<MatrixXf> other;
    auto cfg = make_config(AdapterKind::ssf);
    cfg.target_modules = {"q_proj"};
    peft::AdapterSet<MatrixXf> mixed(other.weights, cfg);
    mixed.insert("layers.0.v_proj", lora_on(other, "layers.0.v_proj", 2, 4));
    REQUIRE_THROWS_AS(io::save_peft(mixed, dir), peft::ConfigError);
    REQUIRE_THAT(message_of([&] { io::save_peft(mixed, dir); }), has_substring("mixes"));
  }
  SECTION("modules that differ in use_rslora, which PEFT's config holds once") {
    // Saved with one value, one of the two would reload with the other's scale (alpha / r against
    // alpha / sqrt(r)).
    Model<MatrixXf> other;
    peft::AdapterSet<MatrixXf> mixed(other.weights);
    mixed.insert("layers.0.q_proj", lora_on(other, "layers.0.q_proj", 4, 8));
    peft::LoRAConfig rs;
    rs.rank = 4;
    rs.alpha = 8;
    rs.use_rslora = true;
    mixed.insert("layers.0.v_proj", peft::AnyAdapter<float>(peft::LoRA<MatrixXf>(other.weight("layers.0.v_proj"), rs)));
    REQUIRE_THROWS_AS(io::save_peft(mixed, dir), peft::ConfigError);
    REQUIRE_THAT(message_of([&] { io::save_peft(mixed, dir); }),
                 has_substring("layers.0.v_proj") && has_substring("use_rslora"));
    auto mixed_opt = make_adamw<float>();
    mixed.add_to(mixed_opt);
    REQUIRE_THROWS_AS(io::save_checkpoint(mixed, mixed_opt, dir), peft::ConfigError);
  }
  SECTION("a set with nothing to save") {
    Model<MatrixXf> other;
    peft::AdapterSet<MatrixXf> empty(other.weights);
    REQUIRE_THROWS_AS(io::save_peft(empty, dir), peft::ConfigError);
  }
  REQUIRE((directory_bytes(dir) == before));
  REQUIRE(leftovers(scratch.dir).empty());
}

TEST_CASE("saving over a directory peft wrote replaces it whole", "[io][adapter_set]") {
  Scratch scratch("replace");
  const std::string dir = scratch / "adapter";
  Model<MatrixXf> model;
  peft::AdapterSet<MatrixXf> set(model.weights, make_config(AdapterKind::dora));
  auto opt = make_adamw<float>();
  set.add_to(opt);
  train(set, opt, 0, 1);
  io::save_checkpoint(set, opt, dir);
  REQUIRE((directory_bytes(dir).size() == 3));

  // Another set, another kind, over it: the training state of the old one goes with it.
  Model<MatrixXf> model2;
  peft::AdapterSet<MatrixXf> set2(model2.weights, make_config(AdapterKind::lora));
  auto opt2 = make_adamw<float>();
  set2.add_to(opt2);
  train(set2, opt2, 0, 2);
  io::save_peft(set2, dir);
  const auto files = directory_bytes(dir);
  REQUIRE((files.size() == 2));
  REQUIRE(files.count("adapter_config.json") == 1);
  REQUIRE(files.count("adapter_model.safetensors") == 1);
  REQUIRE(leftovers(scratch.dir).empty());
  Model<MatrixXf> fresh;
  auto loaded = io::load_peft(dir, fresh.weights);
  REQUIRE(same_params(snapshot(loaded), snapshot(set2)));
  REQUIRE(read_config(dir)["use_dora"] == false);

  // A trailing slash names the same directory.
  train(set2, opt2, 2, 3);
  io::save_peft(set2, dir + "/");
  REQUIRE(leftovers(scratch.dir).empty());
  Model<MatrixXf> fresh2;
  auto loaded2 = io::load_peft(dir, fresh2.weights);
  REQUIRE(same_params(snapshot(loaded2), snapshot(set2)));
}

TEST_CASE("load_peft refuses a model that does not fit and writes none of its weights", "[io][adapter_set][errors]") {
  Scratch scratch("load_errors");
  Model<MatrixXf> model;
  peft::AdapterSet<MatrixXf> set(model.weights, make_config(AdapterKind::lora));
  set.train_whole("head");
  set.train_whole("pooler");
  auto opt = make_adamw<float>();
  set.add_to(opt);
  train(set, opt, 0, 2);
  const std::string dir = scratch / "adapter";
  io::save_peft(set, dir);

  auto specs = default_specs();
  const auto refused = [&](const std::vector<ModuleSpec>& s, auto error, const std::string& what) {
    using Error = decltype(error);
    Model<MatrixXf> target(s), untouched(s);
    REQUIRE_THROWS_AS(io::load_peft(dir, target.weights), Error);
    REQUIRE_THAT(message_of([&] { io::load_peft(dir, target.weights); }), has_substring(what));
    REQUIRE(same_weights(target, untouched));
  };
  SECTION("a module the model lacks") {
    specs.erase(specs.begin() + 2);  // layers.1.q_proj
    refused(specs, peft::ConfigError(""), "layers.1.q_proj");
  }
  SECTION("a base weight of another shape") {
    specs[1].d_in = 9;  // layers.0.v_proj
    refused(specs, peft::ShapeError(""), "layers.0.v_proj");
  }
  SECTION("a whole module of another shape after one that fits") {
    specs[4].d_in = 9;  // pooler; head (before it in the file) fits
    refused(specs, peft::ShapeError(""), "pooler");
  }
  SECTION("a whole module the model lacks") {
    specs.erase(specs.begin() + 4);  // pooler
    refused(specs, peft::ConfigError(""), "pooler");
  }
  SECTION("a bias the model does not have") {
    specs[3].bias = false;  // head
    refused(specs, peft::ConfigError(""), "head");
  }
  SECTION("an adapter of weights stored transposed (fan_in_fan_out)") {
    // Its factors fit the model's d_out x d_in weights just as well: applied to them, B A would be added to
    // the transpose of what it was trained on. Nothing in the shapes tells, so the config must.
    auto config = read_config(dir);
    config["fan_in_fan_out"] = true;
    write_file(dir + "/adapter_config.json", config.dump(2));
    refused(specs, peft::ConfigError(""), "fan_in_fan_out");
  }
}
