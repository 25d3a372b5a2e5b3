// A whole model's adapters saved as PEFT directories and training checkpoints (io/adapter_set_io.hpp),
// loaded back, and resumed bit for bit. What was written is read by the small independent parser below
// (the bytes of the safetensors files, the JSON text of the config), not by our loader; what was loaded
// is compared with the set that was saved, parameter by parameter and output by output.
#include "support/catch.hpp"
#include "support/scratch.hpp"
#include "support/errors.hpp"
#include "support/matrices.hpp"

#include <peft/io/adapter_set_io.hpp>
#include <peft/optim/adamw.hpp>
#include <peft/optim/sgd.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <deque>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include <unistd.h>

namespace fs = std::filesystem;
namespace io = peft::io;
using Eigen::Index;
using Eigen::MatrixXd;
using Eigen::MatrixXf;
using peft::AdapterKind;
using peft::test::has_substring;
using peft::test::message_of;
using peft::test::random_matrix;
using peft::test::same_bits;

namespace {

// ---------------------------------------------------------------------------------------------------
// Scratch directories, files

/// A scratch directory, unique to the process and the test, removed at the end.
struct Scratch : peft::test::Scratch {
  explicit Scratch(const std::string& name) : peft::test::Scratch("adapter_set_io_test", name) {}
};

std::string read_all(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  REQUIRE(in.good());
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

void write_all(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << bytes;
  REQUIRE(out.good());
}

/// Every regular file of a directory, by name, with its bytes.
std::map<std::string, std::string> directory_bytes(const std::string& dir) {
  std::map<std::string, std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) out[e.path().filename().string()] = read_all(e.path().string());
  return out;
}

/// The names in a directory that look like a save's leftovers (a temporary or a moved-aside old one).
std::vector<std::string> leftovers(const fs::path& parent) {
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator(parent)) {
    const std::string name = e.path().filename().string();
    if (name.find(".tmp-") != std::string::npos || name.find(".old-") != std::string::npos) out.push_back(name);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------
// The independent safetensors reader (and a writer of hand-corrupted files)

struct Raw {
  std::string dtype;
  std::vector<std::uint64_t> shape;
  std::string bytes;
};

struct RawFile {
  std::map<std::string, Raw> tensors;
  nlohmann::json metadata;  // null when the file has none
};

RawFile parse_file(const std::string& path) {
  const std::string all = read_all(path);
  REQUIRE(all.size() >= 8);
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>(all[std::size_t(i)]);
  REQUIRE(8 + n <= all.size());
  const auto header = nlohmann::json::parse(all.substr(8, std::size_t(n)));
  REQUIRE(header.is_object());
  RawFile out;
  std::uint64_t covered = 0;
  for (const auto& [name, v] : header.items()) {
    if (name == "__metadata__") {
      out.metadata = v;
      continue;
    }
    const std::uint64_t b = v.at("data_offsets").at(0), e = v.at("data_offsets").at(1);
    REQUIRE(b <= e);
    REQUIRE(8 + n + e <= all.size());
    const Raw r{v.at("dtype").get<std::string>(), v.at("shape").get<std::vector<std::uint64_t>>(),
                all.substr(std::size_t(8 + n + b), std::size_t(e - b))};
    std::uint64_t elements = 1;
    for (std::uint64_t d : r.shape) elements *= d;
    const std::uint64_t width = r.dtype == "F64" ? 8 : r.dtype == "F32" ? 4 : 2;
    REQUIRE((elements * width == e - b));
    out.tensors[name] = r;
    covered += e - b;
  }
  REQUIRE((covered == all.size() - 8 - n));
  return out;
}

/// Writes a safetensors file from raw tensors (laid out in name order) and metadata.
void write_file(const std::string& path, const RawFile& f) {
  nlohmann::json h = nlohmann::json::object();
  if (!f.metadata.is_null()) h["__metadata__"] = f.metadata;
  std::string data;
  for (const auto& [name, r] : f.tensors) {
    h[name] = {{"dtype", r.dtype}, {"shape", r.shape}, {"data_offsets", {data.size(), data.size() + r.bytes.size()}}};
    data += r.bytes;
  }
  std::string text = h.dump();
  while (text.size() % 8 != 0) text += ' ';
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[std::size_t(i)] = char((std::uint64_t(text.size()) >> (8 * i)) & 0xff);
  write_all(path, out + text + data);
}

/// A little-endian F32 or F64 tensor decoded from its bytes: [r, c] as r x c, [n] as n x 1.
MatrixXd decode(const Raw& r) {
  REQUIRE((r.dtype == "F32" || r.dtype == "F64"));
  REQUIRE((r.shape.size() == 1 || r.shape.size() == 2));
  const Index rows = Index(r.shape[0]), cols = r.shape.size() == 2 ? Index(r.shape[1]) : 1;
  const std::size_t width = r.dtype == "F64" ? 8 : 4;
  MatrixXd m(rows, cols);
  for (Index i = 0; i < rows; ++i)
    for (Index j = 0; j < cols; ++j) {
      const auto* p = reinterpret_cast<const unsigned char*>(r.bytes.data()) + width * std::size_t(i * cols + j);
      std::uint64_t u = 0;
      for (std::size_t k = width; k-- > 0;) u = (u << 8) | p[k];
      if (width == 4) {
        const std::uint32_t u32 = std::uint32_t(u);
        float f;
        std::memcpy(&f, &u32, 4);
        m(i, j) = f;
      } else {
        double d;
        std::memcpy(&d, &u, 8);
        m(i, j) = d;
      }
    }
  return m;
}

/// The JSON config of a saved directory, in the file's key order.
nlohmann::ordered_json read_config(const std::string& dir) {
  return nlohmann::ordered_json::parse(read_all(dir + "/adapter_config.json"));
}

std::vector<std::string> keys_of(const nlohmann::ordered_json& j) {
  std::vector<std::string> out;
  for (auto it = j.begin(); it != j.end(); ++it) out.push_back(it.key());
  return out;
}

// ---------------------------------------------------------------------------------------------------
// A small model, its adapters, and a training loop

struct ModuleSpec {
  std::string path;
  Index d_out, d_in;
  bool bias;
};

/// Three adapted projections (two with a bias, one without), a head (with a bias) and a pooler (without)
/// to train whole.
std::vector<ModuleSpec> default_specs() {
  return {{"layers.0.q_proj", 8, 12, true},
          {"layers.0.v_proj", 10, 8, false},
          {"layers.1.q_proj", 8, 12, true},
          {"head", 6, 8, true},
          {"pooler", 8, 8, false}};
}

/// The user's weights: each module's W and b seeded by its path, so that two models built from the same
/// specs are equal, and a model with another spec list has the same weights for the modules it shares.
template <class M>
struct Model {
  using S = typename M::Scalar;
  std::deque<M> W;
  std::deque<peft::VectorX<S>> b;
  peft::ModelWeights<M> weights;

  explicit Model(const std::vector<ModuleSpec>& specs = default_specs()) {
    for (const ModuleSpec& s : specs) {
      const std::uint64_t seed = peft::layer_seed(99, s.path);
      W.push_back(random_matrix<M>(s.d_out, s.d_in, seed, 0.5));
      if (s.bias) {
        b.push_back(random_matrix<peft::MatrixX<S>>(s.d_out, 1, seed + 1, 0.5).col(0));
        weights.add(s.path, W.back(), b.back());
      } else {
        weights.add(s.path, W.back());
      }
    }
  }
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;

  M& weight(const std::string& path) { return *weights.at(path).weight; }
  peft::VectorX<S>& bias(const std::string& path) { return *weights.at(path).bias; }
};

/// Whether every weight and bias of two models has the same bits.
template <class M>
bool same_weights(Model<M>& a, Model<M>& b) {
  if (a.weights.modules().size() != b.weights.modules().size()) return false;
  for (const auto& m : a.weights.modules()) {
    const auto& n = b.weights.at(m.path);
    if (!same_bits(*m.weight, *n.weight)) return false;
    if ((m.bias == nullptr) != (n.bias == nullptr)) return false;
    if (m.bias && !same_bits(*m.bias, *n.bias)) return false;
  }
  return true;
}

peft::AdapterSetConfig make_config(AdapterKind kind, double dropout = 0.0) {
  peft::AdapterSetConfig c;
  c.kind = kind;
  c.target_modules = {"q_proj", "v_proj"};
  c.r = 3;
  c.lora_alpha = 6;
  c.dropout = dropout;
  c.seed = 11;
  return c;
}

template <class S>
using Params = std::map<std::string, peft::MatrixX<S>>;

/// Every parameter of the set, by name (copies).
template <class M>
Params<typename M::Scalar> snapshot(peft::AdapterSet<M>& set) {
  Params<typename M::Scalar> out;
  for (const auto& p : set.parameters()) out[p.name] = p.value;
  return out;
}

template <class S>
bool same_params(const Params<S>& a, const Params<S>& b) {
  if (a.size() != b.size()) return false;
  for (const auto& [name, v] : a) {
    const auto it = b.find(name);
    if (it == b.end() || !same_bits(v, it->second)) return false;
  }
  return true;
}

/// A step's inputs and targets for one module: a function of the step and the path only, so that a
/// resumed run sees what the uninterrupted one saw.
template <class S>
std::pair<peft::MatrixX<S>, peft::MatrixX<S>> batch(int step, const std::string& path, Index d_in, Index d_out) {
  const std::uint64_t seed = peft::layer_seed(std::uint64_t(1000 + step), path);
  return {random_matrix<peft::MatrixX<S>>(d_in, 5, seed), random_matrix<peft::MatrixX<S>>(d_out, 5, seed + 7, 0.3)};
}

/// One training step of the squared loss ½‖Y − T‖² / N on every module (each fed its own batch):
/// the adapters' forward and backward, the whole modules' gradients, then the optimizer.
template <class M, class Optimizer>
void train_step(peft::AdapterSet<M>& set, Optimizer& opt, int step) {
  using S = typename M::Scalar;
  set.zero_grad();
  for (auto& l : set.layers()) {
    const auto [X, T] = batch<S>(step, l.path, l.adapter.d_in(), l.adapter.d_out());
    typename peft::AnyAdapter<S>::Cache cache;
    const peft::MatrixX<S> Y = l.adapter.forward(X, cache);
    const peft::MatrixX<S> dY = (Y - T) / S(X.cols());
    l.adapter.backward(dY, cache);
  }
  for (const auto& w : set.whole_modules()) {
    const auto& m = set.model().at(w.path);
    const auto [X, T] = batch<S>(step, w.path, m.weight->cols(), m.weight->rows());
    peft::MatrixX<S> Y = *m.weight * X;
    if (m.bias) Y.colwise() += *m.bias;
    const peft::MatrixX<S> dY = (Y - T) / S(X.cols());
    set.weight_grad(w.path) += dY * X.transpose();
    if (m.bias) set.bias_grad(w.path) += dY.rowwise().sum();
  }
  opt.step();
}

/// The learning rate of the step after `step_count` steps.
double schedule(std::int64_t step_count) { return 0.03 * std::pow(0.7, double(step_count)); }

template <class S>
peft::AdamW<S> make_adamw() {
  peft::AdamWConfig c;
  c.lr = schedule(0);
  c.weight_decay = 0.1;
  return peft::AdamW<S>(c);
}

/// Steps [from, to) with the learning-rate schedule set after each step (so the rate of the next step
/// is the optimizer's own state, which a checkpoint must restore).
template <class M, class Optimizer>
void train(peft::AdapterSet<M>& set, Optimizer& opt, int from, int to) {
  for (int s = from; s < to; ++s) {
    train_step(set, opt, s);
    opt.set_lr(schedule(opt.step_count()));
  }
}

template <class S>
bool same_state(const peft::OptimizerState<S>& a, const peft::OptimizerState<S>& b) {
  if (a.optimizer != b.optimizer || a.buffer_names != b.buffer_names || a.step_count != b.step_count ||
      std::memcmp(&a.lr, &b.lr, sizeof a.lr) != 0 || a.slots.size() != b.slots.size())
    return false;
  for (std::size_t i = 0; i < a.slots.size(); ++i) {
    const auto &x = a.slots[i], &y = b.slots[i];
    if (x.name != y.name || x.rows != y.rows || x.cols != y.cols || x.steps != y.steps ||
        x.buffers.size() != y.buffers.size())
      return false;
    for (std::size_t k = 0; k < x.buffers.size(); ++k)
      if (!same_bits(x.buffers[k], y.buffers[k])) return false;
  }
  return true;
}

template <class M>
std::vector<std::string> random_states(const peft::AdapterSet<M>& set) {
  std::vector<std::string> out;
  for (const auto& l : set.layers()) out.push_back(l.adapter.random_state());
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
  const RawFile file = parse_file(dir + "/adapter_model.safetensors");
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
      const RawFile file = parse_file(dir + "/adapter_model.safetensors");
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
        const Raw& ra = file.tensors.at("base_model.model." + l.path + ".lora_A.weight");
        const Raw& rb = file.tensors.at("base_model.model." + l.path + ".lora_B.weight");
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
  const RawFile file = parse_file(dir + "/adapter_model.safetensors");
  REQUIRE(file.metadata == nlohmann::json::object({{"format", "pt"}}));
  std::set<std::string> expected;
  for (const auto& p : set.parameters()) {
    const std::string key = peft_key_of(p.name);
    INFO(key);
    expected.insert(key);
    REQUIRE((file.tensors.count(key) == 1));
    const Raw& raw = file.tensors.at(key);
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
    const RawFile file = parse_file(dir + "/adapter_model.safetensors");
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
    const RawFile file = parse_file(dir + "/adapter_model.safetensors");
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
    const RawFile file = parse_file(dir + "/adapter_model.safetensors");
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

  const RawFile file = parse_file(dir + "/adapter_model.safetensors");
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
  const RawFile file = parse_file(scratch / "inserted/adapter_model.safetensors");
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
  const RawFile state = parse_file(scratch / "dora/training_state.safetensors");
  REQUIRE((state.tensors.at("layers.0.q_proj.lora_B").shape == std::vector<std::uint64_t>{8, 1}));
  Model<MatrixXf> fresh;
  auto loaded = io::load_peft(scratch / "dora", fresh.weights);
  REQUIRE(rank_of(loaded, "layers.0.q_proj") == 1);
  REQUIRE(same_params(snapshot(loaded), snapshot(set)));
}

// ---------------------------------------------------------------------------------------------------
// 5. Checkpoints resume bit for bit

namespace {

template <class M>
struct Run {
  Model<M> model;
  peft::AdapterSet<M> set;
  peft::AdamW<typename M::Scalar> opt;
  explicit Run(AdapterKind kind)
      : set(model.weights, make_config(kind, 0.25)), opt(make_adamw<typename M::Scalar>()) {
    set.train_whole("head");
    set.add_to(opt);
  }
};

/// N = 6 steps uninterrupted, against 3 steps, a checkpoint, a new run built the same way restored from
/// it and 3 more steps: every parameter the same bits. The checkpoint's files are checked from their
/// bytes; without the random streams restored, the result differs.
template <class M>
void check_resume(AdapterKind kind, const std::string& dir) {
  using S = typename M::Scalar;
  Run<M> whole(kind);
  train(whole.set, whole.opt, 0, 6);
  const auto want = snapshot(whole.set);

  Params<S> at3;
  peft::OptimizerState<S> state3;
  std::vector<std::string> streams3;
  {
    Run<M> first(kind);
    train(first.set, first.opt, 0, 3);
    io::save_checkpoint(first.set, first.opt, dir, {{"step", "3"}, {"epoch", "0"}});
    at3 = snapshot(first.set);
    state3 = first.opt.state_dict();
    streams3 = random_states(first.set);
  }

  // The training state, from its bytes.
  const RawFile ts = parse_file(dir + "/training_state.safetensors");
  const std::string dt = io::dtype_name(io::dtype_of<S>());
  REQUIRE(ts.metadata.at("format") == "peft-training-state");
  REQUIRE(ts.metadata.at("optimizer") == "peft::AdamW");
  REQUIRE(ts.metadata.at("step_count") == "3");
  REQUIRE(std::strtod(ts.metadata.at("lr").get<std::string>().c_str(), nullptr) == schedule(3));
  REQUIRE(ts.metadata.at("user.step") == "3");
  REQUIRE(ts.metadata.at("user.epoch") == "0");
  std::set<std::string> expected_keys;
  for (const auto& [name, v] : at3) {
    INFO(name);
    REQUIRE(ts.metadata.at("steps." + name) == "3");
    for (const std::string& key : {name, "optimizer.exp_avg." + name, "optimizer.exp_avg_sq." + name}) {
      expected_keys.insert(key);
      REQUIRE((ts.tensors.count(key) == 1));
      REQUIRE((ts.tensors.at(key).dtype == dt));
      REQUIRE((ts.tensors.at(key).shape == std::vector<std::uint64_t>{std::uint64_t(v.rows()), std::uint64_t(v.cols())}));
    }
    REQUIRE((decode(ts.tensors.at(name)) == v.template cast<double>()));
  }
  std::set<std::string> keys;
  for (const auto& [key, raw] : ts.tensors) keys.insert(key);
  REQUIRE((keys == expected_keys));
  for (const auto& slot : state3.slots)
    REQUIRE(decode(ts.tensors.at("optimizer.exp_avg_sq." + slot.name)).reshaped() ==
            slot.buffers[1].template cast<double>());
  for (const std::string path : {"layers.0.q_proj", "layers.0.v_proj", "layers.1.q_proj"})
    REQUIRE(ts.metadata.contains("rng." + path));
  // The PEFT files beside it are a deployable adapter.
  {
    Model<M> fresh;
    auto deployed = io::load_peft(dir, fresh.weights);
    REQUIRE((deployed.size() == 3));
  }

  // Resumed: a new run, built the same way, restored, continued.
  Run<M> resumed(kind);
  REQUIRE_FALSE(same_params(snapshot(resumed.set), at3));
  const io::Metadata user = io::load_checkpoint(resumed.set, resumed.opt, dir);
  REQUIRE(user == io::Metadata{{"epoch", "0"}, {"step", "3"}});
  // What was restored (CHECK: the end-to-end comparison below runs whatever these say).
  CHECK(same_params(snapshot(resumed.set), at3));
  CHECK(same_state(resumed.opt.state_dict(), state3));
  CHECK((random_states(resumed.set) == streams3));
  train(resumed.set, resumed.opt, 3, 6);
  const auto got = snapshot(resumed.set);
  REQUIRE((got.size() == want.size()));
  for (const auto& [name, v] : want) {
    INFO(name);
    REQUIRE(same_bits(got.at(name), v));
  }
  REQUIRE(same_state(resumed.opt.state_dict(), whole.opt.state_dict()));

  // The control: restored but with the new run's own random streams, the dropout masks differ.
  Run<M> control(kind);
  const auto fresh_streams = random_states(control.set);
  io::load_checkpoint(control.set, control.opt, dir);
  for (std::size_t i = 0; i < control.set.size(); ++i)
    control.set.layers()[i].adapter.set_random_state(fresh_streams[i]);
  train(control.set, control.opt, 3, 6);
  REQUIRE_FALSE(same_params(snapshot(control.set), want));
}

}  // namespace

TEST_CASE("a float lora run resumed from a checkpoint is the uninterrupted run bit for bit", "[io][checkpoint]") {
  Scratch scratch("resume_lora");
  check_resume<MatrixXf>(AdapterKind::lora, scratch / "ckpt");
}

TEST_CASE("a float dora run resumed from a checkpoint is the uninterrupted run bit for bit", "[io][checkpoint]") {
  Scratch scratch("resume_dora");
  check_resume<MatrixXf>(AdapterKind::dora, scratch / "ckpt");
}

TEST_CASE("a double lora run resumed from a checkpoint is the uninterrupted run bit for bit", "[io][checkpoint]") {
  Scratch scratch("resume_double");
  check_resume<MatrixXd>(AdapterKind::lora, scratch / "ckpt");
}

namespace {

/// A run whose head is trained whole from step `head_from` on, registered in the optimizer only then:
/// the head's parameters have received fewer updates than the adapters' when the run is checkpointed.
struct LateHeadRun {
  Model<MatrixXf> model;
  peft::AdapterSet<MatrixXf> set{model.weights, make_config(AdapterKind::lora)};
  peft::AdamW<float> opt = make_adamw<float>();
  LateHeadRun() { set.add_to(opt); }
  void add_head() {
    set.train_whole("head");
    std::vector<peft::Parameter<float>> head;
    for (const auto& p : set.parameters())
      if (std::string(p.name).rfind("head.", 0) == 0) head.push_back(p);
    REQUIRE((head.size() == 2));
    opt.add_parameters(head, peft::ParamOptions(), "the head");
  }
};

}  // namespace

TEST_CASE("a parameter registered later resumes with its own step count, not the optimizer's", "[io][checkpoint]") {
  // AdamW's bias correction divides by 1 - beta^t with t the parameter's own update count: the head,
  // registered after 2 of the 3 steps, has t = 1 at the checkpoint while the adapters have t = 3.
  Scratch scratch("late_head");
  LateHeadRun whole;
  train(whole.set, whole.opt, 0, 2);
  whole.add_head();
  train(whole.set, whole.opt, 2, 6);
  const auto want = snapshot(whole.set);

  {
    LateHeadRun first;
    train(first.set, first.opt, 0, 2);
    first.add_head();
    train(first.set, first.opt, 2, 3);
    io::save_checkpoint(first.set, first.opt, scratch / "ckpt");
  }
  const RawFile ts = parse_file(scratch / "ckpt/training_state.safetensors");
  REQUIRE(ts.metadata.at("step_count") == "3");
  REQUIRE(ts.metadata.at("steps.layers.0.q_proj.lora_A") == "3");
  REQUIRE(ts.metadata.at("steps.head.weight") == "1");
  REQUIRE(ts.metadata.at("steps.head.bias") == "1");

  LateHeadRun resumed;
  resumed.add_head();
  io::load_checkpoint(resumed.set, resumed.opt, scratch / "ckpt");
  for (const auto& slot : resumed.opt.state_dict().slots) {
    INFO(slot.name);
    REQUIRE(slot.steps == (slot.name.rfind("head.", 0) == 0 ? 1 : 3));
  }
  train(resumed.set, resumed.opt, 3, 6);
  const auto got = snapshot(resumed.set);
  for (const auto& [name, v] : want) {
    INFO(name);
    REQUIRE(same_bits(got.at(name), v));
  }
}

// ---------------------------------------------------------------------------------------------------
// 6. Atomicity and errors

TEST_CASE("a directory holding a file peft does not write is not replaced", "[io][adapter_set][errors]") {
  Scratch scratch("foreign");
  Model<MatrixXf> model;
  peft::AdapterSet<MatrixXf> set(model.weights, make_config(AdapterKind::lora));
  const std::string dir = scratch / "adapter";
  io::save_peft(set, dir);
  write_all(dir + "/notes.txt", "my notes");
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
    write_all(dir + "/adapter_config.json", config.dump(2));
    refused(specs, peft::ConfigError(""), "fan_in_fan_out");
  }
}

namespace {

/// A copy of the checkpoint `from` in `to`, with its training state changed by `edit`.
void corrupt(const std::string& from, const std::string& to, const std::function<void(RawFile&)>& edit) {
  fs::remove_all(to);
  fs::create_directories(to);
  for (const char* name : {"adapter_config.json", "adapter_model.safetensors"})
    fs::copy_file(from + "/" + name, to + "/" + name);
  RawFile f = parse_file(from + "/training_state.safetensors");
  edit(f);
  write_file(to + "/training_state.safetensors", f);
}

}  // namespace

TEST_CASE("load_checkpoint refuses a damaged or foreign training state and changes nothing",
          "[io][checkpoint][errors]") {
  Scratch scratch("bad_checkpoint");
  Run<MatrixXf> run(AdapterKind::lora);
  train(run.set, run.opt, 0, 2);
  const std::string good = scratch / "good";
  io::save_checkpoint(run.set, run.opt, good);
  train(run.set, run.opt, 2, 3);  // now the set differs from the checkpoint: a partial restore would show

  const auto params = snapshot(run.set);
  const auto state = run.opt.state_dict();
  const auto streams = random_states(run.set);
  const auto unchanged = [&] {
    REQUIRE(same_params(snapshot(run.set), params));
    REQUIRE(same_state(run.opt.state_dict(), state));
    REQUIRE((random_states(run.set) == streams));
  };
  const std::string bad = scratch / "bad";
  const auto refused = [&](const std::function<void(RawFile&)>& edit, auto error, const std::string& what) {
    using Error = decltype(error);
    corrupt(good, bad, edit);
    REQUIRE_THROWS_AS(io::load_checkpoint(run.set, run.opt, bad), Error);
    REQUIRE_THAT(message_of([&] { io::load_checkpoint(run.set, run.opt, bad); }), has_substring(what));
    unchanged();
  };

  SECTION("the good one restores") {
    corrupt(good, bad, [](RawFile&) {});
    io::load_checkpoint(run.set, run.opt, bad);
    REQUIRE_FALSE(same_params(snapshot(run.set), params));
    REQUIRE((run.opt.step_count() == 2));
  }
  SECTION("a parameter missing") {
    refused([](RawFile& f) { f.tensors.erase("layers.1.q_proj.lora_B"); }, peft::FormatError(""),
            "layers.1.q_proj.lora_B");
  }
  SECTION("an optimizer buffer missing") {
    refused([](RawFile& f) { f.tensors.erase("optimizer.exp_avg_sq.head.bias"); }, peft::FormatError(""),
            "optimizer.exp_avg_sq.head.bias");
  }
  SECTION("a parameter of another shape") {
    refused(
        [](RawFile& f) {
          auto& shape = f.tensors.at("layers.0.q_proj.lora_A").shape;
          std::swap(shape[0], shape[1]);
        },
        peft::FormatError(""), "layers.0.q_proj.lora_A");
  }
  SECTION("another optimizer") {
    refused([](RawFile& f) { f.metadata["optimizer"] = "peft::SGD"; }, peft::FormatError(""), "peft::SGD");
  }
  SECTION("not a training state") {
    refused([](RawFile& f) { f.metadata["format"] = "pt"; }, peft::FormatError(""), "training state");
  }
  SECTION("a slot's step count that is not a number") {
    refused([](RawFile& f) { f.metadata["steps.head.bias"] = "two"; }, peft::FormatError(""), "steps.head.bias");
  }
  SECTION("a random stream that is not one") {
    refused([](RawFile& f) { f.metadata["rng.layers.1.q_proj"] = "garbage"; }, peft::FormatError(""),
            "rng.layers.1.q_proj");
  }
  SECTION("a random stream missing") {
    refused([](RawFile& f) { f.metadata.erase("rng.layers.1.q_proj"); }, peft::FormatError(""), "rng.layers.1.q_proj");
  }
  SECTION("a negative step count the optimizer refuses") {
    refused([](RawFile& f) { f.metadata["step_count"] = "-1"; }, peft::ConfigError(""), "step_count");
  }
  SECTION("a negative learning rate the optimizer refuses") {
    refused([](RawFile& f) { f.metadata["lr"] = "-0.5"; }, peft::ConfigError(""), "lr");
  }
  SECTION("no training state at all") {
    REQUIRE_THROWS_AS(io::load_checkpoint(run.set, run.opt, scratch.dir.string()), peft::FileError);
    unchanged();
  }
  SECTION("a checkpoint of SGD") {
    peft::SGD<float> sgd;
    Model<MatrixXf> m2;
    peft::AdapterSet<MatrixXf> set2(m2.weights, make_config(AdapterKind::lora, 0.25));
    set2.train_whole("head");
    set2.add_to(sgd);
    train(set2, sgd, 0, 1);
    io::save_checkpoint(set2, sgd, bad);
    REQUIRE_THROWS_AS(io::load_checkpoint(run.set, run.opt, bad), peft::FormatError);
    unchanged();
  }
}

TEST_CASE("a float checkpoint does not load into a double set", "[io][checkpoint][errors]") {
  Scratch scratch("precision");
  Run<MatrixXf> f(AdapterKind::lora);
  train(f.set, f.opt, 0, 2);
  const std::string dir = scratch / "ckpt";
  io::save_checkpoint(f.set, f.opt, dir);

  Run<MatrixXd> d(AdapterKind::lora);
  train(d.set, d.opt, 0, 1);
  const auto params = snapshot(d.set);
  const auto state = d.opt.state_dict();
  REQUIRE_THROWS_AS(io::load_checkpoint(d.set, d.opt, dir), peft::FormatError);
  REQUIRE_THAT(message_of([&] { io::load_checkpoint(d.set, d.opt, dir); }), has_substring("F32"));
  REQUIRE(same_params(snapshot(d.set), params));
  REQUIRE(same_state(d.opt.state_dict(), state));
}
