// A whole model's adapters (include/peft/model/): target selection as Hugging Face PEFT selects modules
// (target_modules, exclude_modules, rank_pattern, alpha_pattern), per-layer seeds, the type-erased
// peft::AnyAdapter, parameters named by path for an optimizer, all-or-nothing merge and unmerge with
// rollback, optimizer state by name (state_dict / load_state_dict), and the random streams' states.
#include "support/catch.hpp"
#include "support/errors.hpp"
#include "support/matrices.hpp"

#include <peft/core/random.hpp>
#include <peft/model/adapter_set.hpp>
#include <peft/model/any_adapter.hpp>
#include <peft/model/targets.hpp>
#include <peft/optim/adamw.hpp>
#include <peft/optim/sgd.hpp>
#include <peft/testing/grad_check.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <deque>
#include <limits>
#include <map>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <typeinfo>
#include <utility>
#include <vector>

using peft::test::eps;
using peft::test::has_substring;
using peft::test::MatrixXd;
using peft::test::MatrixXf;
using peft::test::message_of;
using peft::test::random_matrix;
using peft::test::RowMajorXd;
using peft::test::same_bits;

namespace {

using Strings = std::vector<std::string>;

// ---------------------------------------------------------------------------------------------------
// A small model: nine modules with PyTorch-style paths, some with a bias.

struct ModuleSpec {
  const char* path;
  Eigen::Index rows, cols;
  bool bias;
};

constexpr ModuleSpec kModules[] = {
    {"layers.0.attn.q_proj", 6, 5, true},   //
    {"layers.0.attn.k_proj", 6, 5, false},  //
    {"layers.0.attn.xq_proj", 6, 5, false},  // "q_proj" must not select it: no dot before "q_proj"
    {"layers.0.mlp.up_proj", 8, 6, true},   //
    {"layers.1.attn.q_proj", 6, 5, true},   //
    {"layers.1.attn.k_proj", 6, 5, false},  //
    {"layers.1.mlp.up_proj", 8, 6, true},   //
    {"q_proj", 6, 5, false},                // top level: the whole path is the name
    {"head", 3, 6, true},                   //
};
constexpr std::size_t kNumModules = sizeof(kModules) / sizeof(kModules[0]);

/// The user's weights (kept here at stable addresses) and the ModelWeights that refers to them. Two
/// models built with the same seed hold the same values.
template <class M>
class Model {
 public:
  using Scalar = typename M::Scalar;
  using Vec = peft::VectorX<Scalar>;

  explicit Model(std::uint64_t seed = 100) {
    std::uint64_t k = seed;
    for (const ModuleSpec& s : kModules) {
      slots_.emplace_back();
      Slot& slot = slots_.back();
      slot.W = random_matrix<M>(s.rows, s.cols, k++);
      if (s.bias) {
        slot.b = random_matrix<peft::MatrixX<Scalar>>(s.rows, 1, k++);
        weights.add(s.path, slot.W, slot.b);
      } else {
        weights.add(s.path, slot.W);
      }
    }
  }
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;

  M& W(const std::string& path) { return *weights.at(path).weight; }
  Vec* b(const std::string& path) { return weights.at(path).bias; }

  /// Copies of every W, in module order.
  std::vector<M> weight_copies() const {
    std::vector<M> out;
    for (const auto& m : weights.modules()) out.push_back(*m.weight);
    return out;
  }
  /// Copies of every bias (empty for a module without one), in module order.
  std::vector<Vec> bias_copies() const {
    std::vector<Vec> out;
    for (const auto& m : weights.modules()) out.push_back(m.bias ? *m.bias : Vec());
    return out;
  }

  peft::ModelWeights<M> weights;

 private:
  struct Slot {
    M W;
    Vec b;
  };
  std::deque<Slot> slots_;
};

/// The index of a module in kModules.
std::size_t module_index(const std::string& path) {
  for (std::size_t i = 0; i < kNumModules; ++i)
    if (path == kModules[i].path) return i;
  FAIL("no module " << path);
  return 0;
}

peft::AdapterSetConfig targeting(peft::ModuleSelector targets, peft::ModuleSelector exclude = peft::ModuleSelector()) {
  peft::AdapterSetConfig cfg;
  cfg.target_modules = std::move(targets);
  cfg.exclude_modules = std::move(exclude);
  return cfg;
}

template <class M>
Strings paths_of(const peft::AdapterSet<M>& set) {
  Strings out;
  for (const auto& l : set.layers()) out.push_back(l.path);
  return out;
}

/// The modules a set built from `cfg` over the model adapts, in order.
Strings selected(const peft::AdapterSetConfig& cfg) {
  Model<MatrixXf> m;
  const peft::AdapterSet<MatrixXf> set(m.weights, cfg);
  REQUIRE(set.selected_by_config());
  return paths_of(set);
}

template <class D>
Eigen::MatrixXd to_double(const Eigen::DenseBase<D>& m) {
  return m.template cast<double>();
}

/// max over the elements of |a - b| / bound (> 1: out of bound).
template <class A, class B>
double worst_ratio(const A& a, const B& b, const Eigen::MatrixXd& bound) {
  return ((to_double(a) - to_double(b)).cwiseAbs().array() / bound.array()).maxCoeff();
}

/// max |a - b| / max |b|.
template <class A, class B>
double relative_diff(const A& a, const B& b) {
  return (to_double(a) - to_double(b)).cwiseAbs().maxCoeff() / to_double(b).cwiseAbs().maxCoeff();
}

std::string quoted(const std::string& path) { return "module \"" + path + "\""; }

/// \returns the message of the E that fn throws (one call); fails the test if it throws none.
template <class E, class Fn>
std::string error_of(Fn fn) {
  try {
    fn();
  } catch (const E& e) {
    return e.what();
  }
  FAIL("the expected exception was not thrown");
  return "";
}

}  // namespace

// ===================================================================================================
// 1. Which modules: target_modules, exclude_modules, rank_pattern, alpha_pattern

TEST_CASE("ModuleSelector lists match the whole path or a suffix at a dot boundary and regexes the whole path",
          "[model][targets]") {
  const peft::ModuleSelector list{"q_proj", "mlp.up_proj"};
  REQUIRE(!list.is_regex());
  REQUIRE(!list.empty());
  REQUIRE(list.names() == Strings{"q_proj", "mlp.up_proj"});
  REQUIRE(list.matches("q_proj"));
  REQUIRE(list.matches("layers.0.attn.q_proj"));
  REQUIRE(!list.matches("layers.0.attn.xq_proj"));
  REQUIRE(!list.matches("q_proj.lora"));
  REQUIRE(!list.matches("proj"));
  REQUIRE(list.matches("layers.1.mlp.up_proj"));
  REQUIRE(!list.matches("layers.1.xmlp.up_proj"));
  REQUIRE(!list.matches("up_proj"));

  const peft::ModuleSelector rx = peft::ModuleSelector::regex("layers\\.1\\..*");
  REQUIRE(rx.is_regex());
  REQUIRE(!rx.empty());
  REQUIRE(rx.expression() == "layers\\.1\\..*");
  REQUIRE(rx.matches("layers.1.attn.q_proj"));
  REQUIRE(!rx.matches("layers.0.attn.q_proj"));
  REQUIRE(!rx.matches("model.layers.1.attn.q_proj"));  // a search would find it: a full match does not
  REQUIRE(!peft::ModuleSelector::regex("q_proj").matches("layers.0.attn.q_proj"));
  REQUIRE(peft::ModuleSelector::regex("q_proj").matches("q_proj"));

  REQUIRE(peft::ModuleSelector().empty());
  REQUIRE(!peft::ModuleSelector().matches("q_proj"));
}

TEST_CASE("pattern_key_matches is a full match of the key, alone or after a dot, as PEFT's rank_pattern", "[model][targets]") {
  struct Case {
    const char* key;
    const char* path;
    bool want;
  };
  const Case cases[] = {
      {"q_proj", "q_proj", true},
      {"q_proj", "layers.0.attn.q_proj", true},
      {"q_proj", "layers.0.attn.xq_proj", false},  // no dot boundary
      {"q_pro", "layers.0.attn.q_proj", false},    // the key must reach the end
      {"attn\\.q_proj", "layers.0.attn.q_proj", true},
      {"attn\\.q_proj", "q_proj", false},
      {"layers\\.1\\.attn\\.q_proj", "layers.1.attn.q_proj", true},
      {"layers\\.1\\.attn\\.q_proj", "layers.0.attn.q_proj", false},
      {"layers\\.1\\.attn\\.q_proj", "model.layers.1.attn.q_proj", true},
      {"s\\.1\\.attn\\.q_proj", "layers.1.attn.q_proj", false},  // "layer" does not end at a dot
      {"1\\.attn\\.q_proj", "layers.1.attn.q_proj", true},
      {"k_proj|up_proj", "layers.1.mlp.up_proj", true},  // the key is one group: (.*\.)?(k_proj|up_proj)
      {"k_proj|up_proj", "layers.1.attn.k_proj", true},
      {"k_proj|up_proj", "layers.1.attn.q_proj", false},
      {"layers\\.0\\..*", "layers.0.mlp.up_proj", true},
  };
  for (const Case& c : cases) {
    INFO("key " << c.key << " path " << c.path);
    REQUIRE((peft::pattern_key_matches(c.key, c.path) == c.want));
  }
}

TEST_CASE("target_modules as a list selects by whole path or dot-boundary suffix", "[model][targets]") {
  REQUIRE(selected(targeting({"q_proj"})) == Strings{"layers.0.attn.q_proj", "layers.1.attn.q_proj", "q_proj"});
  REQUIRE(selected(targeting({"xq_proj"})) == Strings{"layers.0.attn.xq_proj"});
  REQUIRE(selected(targeting({"attn.k_proj", "head"})) ==
          Strings{"layers.0.attn.k_proj", "layers.1.attn.k_proj", "head"});
  REQUIRE(selected(targeting({"layers.1.mlp.up_proj"})) == Strings{"layers.1.mlp.up_proj"});
  REQUIRE(selected(targeting({"0.attn.q_proj"})) == Strings{"layers.0.attn.q_proj"});
  // Model order, whatever the order of the names.
  REQUIRE(selected(targeting({"head", "up_proj"})) == Strings{"layers.0.mlp.up_proj", "layers.1.mlp.up_proj", "head"});
}

TEST_CASE("target_modules as a regex selects the paths it matches whole", "[model][targets]") {
  using peft::ModuleSelector;
  REQUIRE(selected(targeting(ModuleSelector::regex("layers\\.1\\..*"))) ==
          Strings{"layers.1.attn.q_proj", "layers.1.attn.k_proj", "layers.1.mlp.up_proj"});
  REQUIRE(selected(targeting(ModuleSelector::regex("q_proj"))) == Strings{"q_proj"});
  REQUIRE(selected(targeting(ModuleSelector::regex(".*\\.(q|k)_proj"))) ==
          Strings{"layers.0.attn.q_proj", "layers.0.attn.k_proj", "layers.1.attn.q_proj", "layers.1.attn.k_proj"});
  REQUIRE(selected(targeting(ModuleSelector::regex(".*attn.*"))) ==
          Strings{"layers.0.attn.q_proj", "layers.0.attn.k_proj", "layers.0.attn.xq_proj", "layers.1.attn.q_proj",
                  "layers.1.attn.k_proj"});
  // A regex that matches only a part of every path selects nothing.
  Model<MatrixXf> m;
  REQUIRE_THROWS_AS(peft::AdapterSet<MatrixXf>(m.weights, targeting(ModuleSelector::regex("layers\\.1"))),
                    peft::ConfigError);
  REQUIRE_THROWS_AS(peft::AdapterSet<MatrixXf>(m.weights, targeting(ModuleSelector::regex("attn"))),
                    peft::ConfigError);
}

TEST_CASE("exclude_modules removes modules as a list or a regex", "[model][targets]") {
  using peft::ModuleSelector;
  REQUIRE(selected(targeting({"q_proj", "k_proj"}, {"layers.1.attn.q_proj"})) ==
          Strings{"layers.0.attn.q_proj", "layers.0.attn.k_proj", "layers.1.attn.k_proj", "q_proj"});
  REQUIRE(selected(targeting({"q_proj", "k_proj"}, {"k_proj"})) ==
          Strings{"layers.0.attn.q_proj", "layers.1.attn.q_proj", "q_proj"});
  // A name in the exclude list is a dot-boundary suffix too: "q_proj" excludes no xq_proj.
  REQUIRE(selected(targeting({"q_proj", "xq_proj"}, {"q_proj"})) == Strings{"layers.0.attn.xq_proj"});
  REQUIRE(selected(targeting({"q_proj", "k_proj"}, ModuleSelector::regex("layers\\.0\\..*"))) ==
          Strings{"layers.1.attn.q_proj", "layers.1.attn.k_proj", "q_proj"});
  // A partial match of the exclude regex excludes nothing.
  REQUIRE(selected(targeting({"q_proj"}, ModuleSelector::regex("layers"))) ==
          Strings{"layers.0.attn.q_proj", "layers.1.attn.q_proj", "q_proj"});
  REQUIRE(selected(targeting(ModuleSelector::regex(".*_proj"), ModuleSelector::regex(".*\\.attn\\..*"))) ==
          Strings{"layers.0.mlp.up_proj", "layers.1.mlp.up_proj", "q_proj"});
  // Everything excluded: nothing matched.
  Model<MatrixXf> m;
  REQUIRE_THAT(message_of([&] { peft::AdapterSet<MatrixXf>(m.weights, targeting({"q_proj"}, {"q_proj"})); }),
               has_substring("no module of the model matches target_modules"));
}

TEST_CASE("rank_pattern and alpha_pattern set each module's rank and alpha and the first matching key wins",
          "[model][targets]") {
  Model<MatrixXf> m;
  auto cfg = targeting({"q_proj", "k_proj", "up_proj", "xq_proj"});
  cfg.r = 8;
  cfg.lora_alpha = 16;
  cfg.rank_pattern = {{"layers\\.1\\.attn\\.q_proj", 2}, {"q_proj", 4}, {"k_proj|up_proj", 3}, {"layers\\.0\\.attn\\.k_proj", 6}};
  cfg.alpha_pattern = {{"layers\\.0\\..*", 32}, {"q_proj", 4}, {"attn\\.k_proj", 12}};
  const peft::AdapterSet<MatrixXf> set(m.weights, cfg);

  // Worked out by hand from the keys in order.
  struct Want {
    const char* path;
    Eigen::Index rank;
    double alpha;
  };
  const Want want[] = {
      {"layers.0.attn.q_proj", 4, 32},   // "q_proj" (the layers.1 key does not match); alpha: layers.0 first
      {"layers.0.attn.k_proj", 3, 32},   // "k_proj|up_proj" before the exact key; alpha: layers.0 first
      {"layers.0.attn.xq_proj", 8, 32},  // no rank key matches at a dot boundary: r
      {"layers.0.mlp.up_proj", 3, 32},   //
      {"layers.1.attn.q_proj", 2, 4},    // the exact key comes first
      {"layers.1.attn.k_proj", 3, 12},   //
      {"layers.1.mlp.up_proj", 3, 16},   // no alpha key: lora_alpha
      {"q_proj", 4, 4},                  //
  };
  REQUIRE((set.size() == sizeof(want) / sizeof(want[0])));
  std::size_t k = 0;
  for (const Want& w : want) {
    INFO(w.path);
    REQUIRE((set.layers()[k++].path == w.path));
    const peft::LoRAShape shape = set.at(w.path).lora_shape();
    REQUIRE((shape.rank == w.rank));
    REQUIRE((shape.alpha == w.alpha));
    REQUIRE(!shape.use_rslora);
    REQUIRE((cfg.rank_for(w.path) == w.rank));
    REQUIRE((cfg.alpha_for(w.path) == w.alpha));
    const auto* lora = set.at(w.path).get<peft::LoRA<MatrixXf>>();
    REQUIRE((lora != nullptr));
    REQUIRE((lora->A().rows() == w.rank));
    REQUIRE((lora->scaling() == static_cast<float>(w.alpha / double(w.rank))));
  }

  // The same keys in the other order: the first that matches still wins.
  auto swapped = cfg;
  swapped.rank_pattern = {{"q_proj", 4}, {"layers\\.1\\.attn\\.q_proj", 2}};
  swapped.alpha_pattern = {{"q_proj", 4}, {"layers\\.0\\..*", 32}};
  REQUIRE(swapped.rank_for("layers.1.attn.q_proj") == 4);
  REQUIRE(swapped.alpha_for("layers.0.attn.q_proj") == 4);
  REQUIRE(swapped.alpha_for("layers.0.attn.k_proj") == 32);
  Model<MatrixXf> m2;
  const peft::AdapterSet<MatrixXf> set2(m2.weights, swapped);
  REQUIRE(set2.at("layers.1.attn.q_proj").lora_shape().rank == 4);
  REQUIRE(set2.at("layers.0.attn.q_proj").lora_shape().alpha == 4);
  REQUIRE(set2.at("layers.0.attn.xq_proj").lora_shape().rank == 8);

  // rsLoRA reaches every adapter.
  auto rs = cfg;
  rs.use_rslora = true;
  Model<MatrixXf> m3;
  const peft::AdapterSet<MatrixXf> set3(m3.weights, rs);
  REQUIRE(set3.at("q_proj").lora_shape().use_rslora);
  REQUIRE(set3.at("q_proj").get<peft::LoRA<MatrixXf>>()->scaling() == static_cast<float>(4.0 / std::sqrt(4.0)));
}

TEST_CASE("AdapterSet refuses a config that selects nothing or holds an invalid expression", "[model][targets][errors]") {
  Model<MatrixXf> m;
  const std::vector<MatrixXf> W0 = m.weight_copies();
  const auto build = [&](const peft::AdapterSetConfig& cfg) { return [&m, cfg] { peft::AdapterSet<MatrixXf>(m.weights, cfg); }; };

  SECTION("empty target_modules") {
    REQUIRE_THROWS_AS(build(peft::AdapterSetConfig())(), peft::ConfigError);
    REQUIRE_THAT(message_of(build(peft::AdapterSetConfig())),
                 has_substring("peft::AdapterSet::constructor: target_modules is empty"));
  }
  SECTION("nothing matched") {
    // "proj" is no dot-boundary suffix of any path ("q_proj" ends in "_proj").
    REQUIRE_THROWS_AS(build(targeting({"proj"}))(), peft::ConfigError);
    REQUIRE_THAT(message_of(build(targeting({"proj"}))),
                 has_substring("no module of the model matches target_modules (9 modules)"));
  }
  SECTION("an empty name in a list") {
    REQUIRE_THROWS_AS(peft::ModuleSelector({"q_proj", ""}), peft::ConfigError);
    REQUIRE_THAT(message_of([] { peft::ModuleSelector({""}); }), has_substring("an empty module name"));
  }
  SECTION("an invalid target or exclude regex") {
    REQUIRE_THROWS_AS(peft::ModuleSelector::regex("layers\\.("), peft::ConfigError);
    REQUIRE_THAT(message_of([] { peft::ModuleSelector::regex("layers\\.("); }),
                 has_substring("\"layers\\.(\" is not a valid regular expression"));
    REQUIRE_THROWS_AS(peft::ModuleSelector::regex("[q_proj"), peft::ConfigError);
  }
  SECTION("an invalid rank_pattern or alpha_pattern key") {
    auto cfg = targeting({"q_proj"});
    cfg.rank_pattern = {{"q_proj(", 2}};
    REQUIRE_THROWS_AS(build(cfg)(), peft::ConfigError);
    REQUIRE_THAT(message_of(build(cfg)), has_substring("pattern key \"q_proj(\" is not a valid regular expression"));
    cfg.rank_pattern.clear();
    cfg.alpha_pattern = {{"*q_proj", 2.0}};
    REQUIRE_THROWS_AS(build(cfg)(), peft::ConfigError);
    REQUIRE_THAT(message_of(build(cfg)), has_substring("pattern key \"*q_proj\" is not a valid regular expression"));
  }
  SECTION("a key or an expression longer than max_pattern_length") {
    REQUIRE((peft::max_pattern_length == 256));
    const std::string at_limit = "q_proj|" + std::string(249, 'z');  // 256 characters: accepted
    REQUIRE((at_limit.size() == 256));
    REQUIRE(peft::pattern_key_matches(at_limit, "layers.0.attn.q_proj"));
    REQUIRE(peft::ModuleSelector::regex(".*q_proj|" + std::string(247, 'z')).matches("layers.0.attn.q_proj"));
    const std::string too_long = at_limit + "z";
    REQUIRE_THROWS_AS(peft::pattern_key_matches(too_long, "q_proj"), peft::ConfigError);
    REQUIRE_THAT(message_of([&] { peft::pattern_key_matches(too_long, "q_proj"); }),
                 has_substring("is longer than 256 characters"));
    REQUIRE_THROWS_AS(peft::ModuleSelector::regex(".*" + std::string(255, 'z')), peft::ConfigError);
    auto cfg = targeting({"q_proj"});
    cfg.rank_pattern = {{too_long, 2}};
    REQUIRE_THAT(message_of(build(cfg)), has_substring("is longer than 256 characters"));
    cfg.rank_pattern.clear();
    cfg.alpha_pattern = {{too_long, 2.0}};
    REQUIRE_THROWS_AS(build(cfg)(), peft::ConfigError);
  }
  SECTION("a rank or alpha the patterns make invalid names the module") {
    auto cfg = targeting({"q_proj"});
    cfg.rank_pattern = {{"layers\\.1\\.attn\\.q_proj", 0}};
    REQUIRE_THROWS_AS(build(cfg)(), peft::ConfigError);
    REQUIRE_THAT(message_of(build(cfg)), has_substring(quoted("layers.1.attn.q_proj") + ": rank is 0, expected >= 1"));
    cfg.rank_pattern.clear();
    cfg.alpha_pattern = {{"q_proj", -1.0}};
    REQUIRE_THAT(message_of(build(cfg)), has_substring(quoted("layers.0.attn.q_proj") + ": alpha is -1, expected > 0"));
  }
  SECTION("a PiSSA set is refused before any weight is rewritten") {
    auto cfg = targeting({"q_proj", "up_proj"});
    cfg.kind = peft::AdapterKind::pissa;
    cfg.r = 2;
    cfg.rank_pattern = {{"layers\\.1\\.mlp\\.up_proj", 7}};  // up_proj is 8x6
    REQUIRE_THROWS_AS(build(cfg)(), peft::ConfigError);
    const std::vector<MatrixXf> W = m.weight_copies();
    for (std::size_t i = 0; i < kNumModules; ++i) REQUIRE(same_bits(W[i], W0[i]));  // layers.0's came first
    REQUIRE_THAT(message_of(build(cfg)),
                 has_substring(quoted("layers.1.mlp.up_proj") + ": rank is 7, expected <= min(d_out, d_in) = 6"));
  }
  // Nothing above wrote a weight (a PiSSA set rewrites W into its residual as it builds).
  const std::vector<MatrixXf> after = m.weight_copies();
  for (std::size_t i = 0; i < kNumModules; ++i) REQUIRE(same_bits(after[i], W0[i]));
}

// ===================================================================================================
// 2. Per-layer seeds

TEST_CASE("Each layer gets its own seed from the base seed and its path", "[model][seeds]") {
  // SplitMix64 of seed xor FNV-1a(path): FNV-1a("") is the offset basis, and SplitMix64 from state 0
  // first gives 0xe220a8397b1dcdaf (the published first output of splitmix64 seeded with 0).
  REQUIRE(peft::layer_seed(14695981039346656037ull, "") == 0xe220a8397b1dcdafull);
  // FNV-1a("a") = 0xaf63dc4c8601ec8c (the published test vector): the same SplitMix64 output from seed 0xaf63...
  REQUIRE(peft::layer_seed(0xaf63dc4c8601ec8cull, "a") == 0xe220a8397b1dcdafull);
  REQUIRE(peft::layer_seed(0, "a") != peft::layer_seed(1, "a"));
  REQUIRE(peft::layer_seed(0, "layers.0.attn.q_proj") != peft::layer_seed(0, "layers.1.attn.q_proj"));
  REQUIRE(peft::layer_seed(7, "q_proj") == peft::layer_seed(7, "q_proj"));

  auto cfg = targeting({"q_proj", "k_proj"});
  cfg.r = 3;
  cfg.seed = 7;
  Model<MatrixXf> m1, m2, m3, m4;
  const peft::AdapterSet<MatrixXf> a(m1.weights, cfg), b(m2.weights, cfg);
  const auto A = [](const peft::AdapterSet<MatrixXf>& set, const std::string& path) {
    return MatrixXf(set.at(path).get<peft::LoRA<MatrixXf>>()->A());
  };
  // Two layers of the same shape start differently.
  REQUIRE(A(a, "layers.0.attn.q_proj").rows() == A(a, "layers.1.attn.q_proj").rows());
  REQUIRE(A(a, "layers.0.attn.q_proj") != A(a, "layers.1.attn.q_proj"));
  REQUIRE(A(a, "layers.0.attn.q_proj") != A(a, "q_proj"));
  REQUIRE(A(a, "layers.0.attn.q_proj") != A(a, "layers.0.attn.k_proj"));
  for (const auto& l : a.layers()) {
    INFO(l.path);
    // Reproducible: the same config and paths start the same.
    REQUIRE((A(a, l.path) == A(b, l.path)));
    // The adapter is the LoRA seeded with layer_seed(seed, path).
    MatrixXf W = m1.W(l.path);
    peft::LoRAConfig c;
    c.rank = 3;
    c.alpha = 8;
    c.seed = peft::layer_seed(7, l.path);
    REQUIRE((A(a, l.path) == MatrixXf(peft::LoRA<MatrixXf>(W, c).A())));
  }
  // A module's start does not depend on the other modules selected.
  const peft::AdapterSet<MatrixXf> only(m3.weights, [&] {
    auto c = cfg;
    c.target_modules = {"layers.1.attn.q_proj"};
    return c;
  }());
  REQUIRE(A(only, "layers.1.attn.q_proj") == A(a, "layers.1.attn.q_proj"));
  // Another base seed, another start.
  auto other = cfg;
  other.seed = 8;
  const peft::AdapterSet<MatrixXf> c(m4.weights, other);
  REQUIRE(A(c, "layers.0.attn.q_proj") != A(a, "layers.0.attn.q_proj"));
}

// ===================================================================================================
// 3. AnyAdapter forwards faithfully

namespace {

bool cfg_has_dropout(const peft::LoRAConfig& c) { return c.dropout > 0; }
bool cfg_has_dropout(const peft::SSFConfig&) { return false; }

/// Builds one adapter of type A over W (and b) and an identical one inside an AnyAdapter over copies,
/// and checks that every call through the handle gives the adapter's own results, bit for bit.
template <class A, class M, class Config>
void check_forwarding(const Config& cfg, bool with_bias) {
  using Scalar = typename M::Scalar;
  using Mat = peft::MatrixX<Scalar>;
  using Vec = peft::VectorX<Scalar>;
  INFO(A::class_name << (with_bias ? " with a bias" : " without a bias"));
  const M W0 = random_matrix<M>(7, 5, 31);
  M W_direct = W0, W_any = W0;
  Vec b_direct = random_matrix<Mat>(7, 1, 32), b_any = b_direct;
  A direct = with_bias ? A(W_direct, b_direct, cfg) : A(W_direct, cfg);
  peft::AnyAdapter<Scalar> any(with_bias ? A(W_any, b_any, cfg) : A(W_any, cfg));
  static_assert(peft::is_adapter_v<peft::AnyAdapter<Scalar>>, "an AnyAdapter is an adapter");
  const Mat X = random_matrix<Mat>(5, 4, 33), G = random_matrix<Mat>(7, 4, 34);
  // Move the parameters off their start, the same way in both, through their flat buffers.
  const Vec shift = random_matrix<Mat>(direct.num_parameters(), 1, 35, 0.05);
  direct.flat_values() += shift;
  any.flat_values() += shift;

  REQUIRE(any.holds());
  REQUIRE((any.type() == typeid(A)));
  REQUIRE((std::string(any.class_name()) == A::class_name));
  REQUIRE((any.input_size() == 5));
  REQUIRE((any.output_size() == 7));
  REQUIRE((any.d_in() == 5));
  REQUIRE((any.d_out() == 7));
  REQUIRE((any.num_parameters() == direct.num_parameters()));
  REQUIRE((any.flat_values() == direct.flat_values()));
  REQUIRE(same_bits(W_any, W_direct));  // PiSSA: the same residual
  const auto pd = direct.parameters();
  const auto pa = any.parameters();
  REQUIRE((pa.size() == pd.size()));
  for (std::size_t k = 0; k < pa.size(); ++k) {
    REQUIRE((std::string(pa[k].name) == pd[k].name));
    REQUIRE((Mat(pa[k].value) == Mat(pd[k].value)));
  }

  REQUIRE((any.forward(X) == Mat(direct.forward(X))));
  typename A::Cache cd;
  typename peft::AnyAdapter<Scalar>::Cache ca;
  Mat Y_first;
  for (int round = 0; round < 2; ++round) {
    INFO("training round " << round);
    const Mat Yd = direct.forward(X, cd);
    Mat Ya;
    any.forward_into(X, Ya, ca);
    REQUIRE((Ya == Yd));
    const Mat dXd = direct.backward(G, cd);
    REQUIRE((any.backward(G, ca) == dXd));
    REQUIRE((any.flat_grads() == direct.flat_grads()));  // accumulated over the rounds alike
    if (round == 0) Y_first = Ya;
  }
  if (cfg_has_dropout(cfg)) REQUIRE(any.forward(X, ca) != Y_first);  // the masks came from a live stream
  if (cfg_has_dropout(cfg)) direct.forward(X, cd);

  // delta_weight: column-major whatever the weight's storage order.
  const auto dWa = any.delta_weight();
  static_assert(std::is_same<std::decay_t<decltype(dWa)>, Mat>::value, "delta_weight is column-major");
  REQUIRE((dWa == Mat(direct.delta_weight())));
  REQUIRE(!dWa.isZero(0));

  any.zero_grad();
  REQUIRE(any.flat_grads().isZero(0));
  REQUIRE(!direct.flat_grads().isZero(0));

  if constexpr (std::is_same<A, peft::SSF<M>>::value) {
    REQUIRE(!any.has_random_state());
    REQUIRE(any.random_state().empty());
    REQUIRE((any.lora_shape().rank == 0));
  } else {
    REQUIRE(any.has_random_state());
    REQUIRE((any.random_state() == direct.random_state()));
    REQUIRE((any.lora_shape().rank == cfg.rank));
    REQUIRE((any.lora_shape().alpha == cfg.alpha));
    REQUIRE((any.lora_shape().use_rslora == cfg.use_rslora));
  }

  const peft::SavedForm<Scalar> saved = any.saved_form();
  if constexpr (std::is_same<A, peft::PiSSA<M>>::value) {
    const auto lora = direct.to_lora();
    REQUIRE(saved.converted);
    REQUIRE((saved.tensors.size() == 2));
    REQUIRE(saved.tensors[0].first == "lora_A");
    REQUIRE((saved.tensors[0].second == lora.A));
    REQUIRE(saved.tensors[1].first == "lora_B");
    REQUIRE((saved.tensors[1].second == lora.B));
    REQUIRE((saved.lora.rank == 2 * cfg.rank));
  } else {
    REQUIRE(!saved.converted);
    REQUIRE((saved.tensors.size() == pd.size()));
    for (std::size_t k = 0; k < pd.size(); ++k) {
      REQUIRE((saved.tensors[k].first == pd[k].name));
      REQUIRE((saved.tensors[k].second == Mat(pd[k].value)));
    }
  }

  // merge and unmerge write the same weights.
  if (std::is_same<A, peft::SSF<M>>::value && !with_bias) {
    REQUIRE_THROWS_AS(direct.merge(), peft::ShapeError);
    REQUIRE_THROWS_AS(any.merge(), peft::ShapeError);  // the adapter's own error, unchanged
    REQUIRE(!any.is_merged());
  } else {
    direct.merge();
    any.merge();
    REQUIRE(any.is_merged());
    REQUIRE(!same_bits(W_any, W0));
    REQUIRE(same_bits(W_any, W_direct));
    REQUIRE(same_bits(b_any, b_direct));
    REQUIRE((any.forward(X) == Mat(direct.forward(X))));
    direct.unmerge();
    any.unmerge();
    REQUIRE(!any.is_merged());
    REQUIRE(same_bits(W_any, W_direct));
    REQUIRE(same_bits(b_any, b_direct));
  }
}

struct AnyConfigs {
  peft::LoRAConfig lora;
  peft::DoRAConfig dora;
  peft::PiSSAConfig pissa;
  peft::SSFConfig ssf;
};

AnyConfigs any_configs(bool exact_dora_gradient) {
  AnyConfigs c;
  c.lora.rank = 3;
  c.lora.alpha = 6;
  c.lora.dropout = 0.3;
  c.lora.init = peft::LoRAInit::random;
  c.lora.seed = 5;
  static_cast<peft::LoRAConfig&>(c.dora) = c.lora;
  c.dora.seed = 6;
  c.dora.detach_norm = !exact_dora_gradient;
  c.pissa.rank = 2;
  c.pissa.alpha = 4;
  c.pissa.use_rslora = true;
  c.pissa.dropout = 0.3;
  c.pissa.seed = 9;
  c.ssf.seed = 3;
  return c;
}

}  // namespace

TEMPLATE_TEST_CASE("AnyAdapter forwards every call to the adapter it holds bit for bit", "[model][any]", MatrixXf,
                   RowMajorXd) {
  using M = TestType;
  const AnyConfigs c = any_configs(false);
  for (const bool bias : {true, false}) {
    check_forwarding<peft::LoRA<M>, M>(c.lora, bias);
    check_forwarding<peft::DoRA<M>, M>(c.dora, bias);
    check_forwarding<peft::PiSSA<M>, M>(c.pissa, bias);
    check_forwarding<peft::SSF<M>, M>(c.ssf, bias);
  }
}

namespace {

/// dL/dX and dL/dθ of L = <R, any.forward(X, cache)> through the handle against central differences,
/// each evaluation replaying the dropout masks from the saved random state.
template <class A, class Config>
void check_any_gradients(const Config& cfg, bool with_bias) {
  using M = RowMajorXd;
  INFO(A::class_name << (with_bias ? " with a bias" : " without a bias"));
  M W = random_matrix<M>(6, 4, 41);
  Eigen::VectorXd b = random_matrix<MatrixXd>(6, 1, 42);
  peft::AnyAdapter<double> any(with_bias ? A(W, b, cfg) : A(W, cfg));
  any.flat_values() += random_matrix<MatrixXd>(any.num_parameters(), 1, 43, 0.1);
  const MatrixXd X = random_matrix<MatrixXd>(4, 3, 44), R = random_matrix<MatrixXd>(6, 3, 45);
  const std::string start = any.random_state();
  const auto loss = [&](const MatrixXd& input) {
    if (any.has_random_state()) any.set_random_state(start);
    peft::AnyAdapter<double>::Cache cache;
    return R.cwiseProduct(any.forward(input, cache)).sum();
  };

  any.zero_grad();
  peft::AnyAdapter<double>::Cache cache;
  any.forward(X, cache);
  const MatrixXd dX = any.backward(R, cache);
  const Eigen::VectorXd grads = any.flat_grads();
  REQUIRE(grads.norm() > 0);
  {  // backward_params through the handle: the same parameter gradients (the same masks), no dX
    if (any.has_random_state()) any.set_random_state(start);
    any.zero_grad();
    peft::AnyAdapter<double>::Cache params_cache;
    any.forward(X, params_cache);
    any.backward_params(R, params_cache);
    REQUIRE((any.flat_grads() - grads).cwiseAbs().maxCoeff() <= 1e-12 * (grads.cwiseAbs().maxCoeff() + 1));
  }

  const double h = 1e-6;
  Eigen::VectorXd fd_x(X.size());
  for (Eigen::Index k = 0; k < X.size(); ++k) {
    MatrixXd Xp = X, Xm = X;
    Xp(k) += h;
    Xm(k) -= h;
    fd_x(k) = (loss(Xp) - loss(Xm)) / (2 * h);
  }
  INFO("dX");
  REQUIRE(peft::testing::relative_error(Eigen::Map<const Eigen::VectorXd>(dX.data(), dX.size()), fd_x) < 1e-6);
  for (const auto& p : any.parameters()) {
    INFO("d" << p.name);
    const Eigen::Index offset = p.value.data() - any.flat_values().data();
    Eigen::VectorXd fd(p.value.size());
    for (Eigen::Index k = 0; k < p.value.size(); ++k) {
      const double v = any.flat_values()(offset + k);
      any.flat_values()(offset + k) = v + h;
      const double lp = loss(X);
      any.flat_values()(offset + k) = v - h;
      const double lm = loss(X);
      any.flat_values()(offset + k) = v;
      fd(k) = (lp - lm) / (2 * h);
    }
    REQUIRE(peft::testing::relative_error(grads.segment(offset, p.value.size()), fd) < 1e-6);
  }
}

}  // namespace

TEST_CASE("Gradients through an AnyAdapter match central differences in double", "[model][any][gradients]") {
  const AnyConfigs c = any_configs(true);  // DoRA's exact gradient: what finite differences measure
  for (const bool bias : {true, false}) {
    check_any_gradients<peft::LoRA<RowMajorXd>>(c.lora, bias);
    check_any_gradients<peft::DoRA<RowMajorXd>>(c.dora, bias);
    check_any_gradients<peft::PiSSA<RowMajorXd>>(c.pissa, bias);
    check_any_gradients<peft::SSF<RowMajorXd>>(c.ssf, bias);
  }
}

TEST_CASE("AnyAdapter refuses a foreign cache and an empty handle and get returns only the held type",
          "[model][any][errors]") {
  MatrixXf W1 = random_matrix<MatrixXf>(6, 5, 51), W2 = W1;
  peft::LoRAConfig cfg;
  cfg.rank = 2;
  cfg.init = peft::LoRAInit::random;
  cfg.dropout = 0.2;
  peft::AnyAdapter<float> lora(peft::LoRA<MatrixXf>(W1, cfg));
  peft::AnyAdapter<float> ssf{peft::SSF<MatrixXf>(W2)};
  const MatrixXf X = random_matrix<MatrixXf>(5, 3, 52), G = random_matrix<MatrixXf>(6, 3, 53);
  peft::AnyAdapter<float>::Cache cache;

  SECTION("a cache no training forward filled") {
    REQUIRE_THROWS_AS(lora.backward(G, cache), peft::StateError);
    REQUIRE_THAT(message_of([&] { lora.backward(G, cache); }),
                 has_substring("peft::LoRA::backward: the cache was not filled by a training forward"));
    REQUIRE_THAT(message_of([&] { lora.backward_params(G, cache); }),
                 has_substring("peft::LoRA::backward_params: the cache was not filled by a training forward"));
  }
  SECTION("a cache another adapter type filled") {
    lora.forward(X, cache);
    REQUIRE_THROWS_AS(ssf.backward(G, cache), peft::StateError);
    REQUIRE_THAT(message_of([&] { ssf.backward(G, cache); }),
                 has_substring("peft::SSF::backward: the cache was filled by another adapter"));
    REQUIRE_THAT(message_of([&] { ssf.backward_params(G, cache); }),
                 has_substring("peft::SSF::backward_params: the cache was filled by another adapter"));
    REQUIRE(ssf.flat_grads().isZero(0));
    REQUIRE_NOTHROW(lora.backward(G, cache));  // it still serves the adapter that filled it
    // A training forward of the other adapter takes the cache over.
    ssf.forward(X, cache);
    REQUIRE_NOTHROW(ssf.backward(G, cache));
    REQUIRE(!ssf.flat_grads().isZero(0));
    REQUIRE_THROWS_AS(lora.backward(G, cache), peft::StateError);
  }
  SECTION("get returns the held adapter for its type and nullptr for any other") {
    auto* held = lora.get<peft::LoRA<MatrixXf>>();
    REQUIRE((held != nullptr));
    REQUIRE((held->flat_values().data() == lora.flat_values().data()));
    REQUIRE((lora.get<peft::DoRA<MatrixXf>>() == nullptr));
    REQUIRE((lora.get<peft::PiSSA<MatrixXf>>() == nullptr));
    REQUIRE((lora.get<peft::SSF<MatrixXf>>() == nullptr));
    REQUIRE((ssf.get<peft::LoRA<MatrixXf>>() == nullptr));
    REQUIRE((ssf.get<peft::SSF<MatrixXf>>() != nullptr));
    const peft::AnyAdapter<float>& cref = lora;
    REQUIRE((cref.get<peft::LoRA<MatrixXf>>() == held));
    REQUIRE((cref.get<peft::SSF<MatrixXf>>() == nullptr));
    held->B().setConstant(0.5f);  // writing through it changes the handle's adapter
    REQUIRE(MatrixXf(lora.parameters()[1].value).isConstant(0.5f, 0));
    REQUIRE((peft::AnyAdapter<float>().get<peft::LoRA<MatrixXf>>() == nullptr));
  }
  SECTION("a moved-from or default handle throws StateError on every call") {
    const MatrixXf Y = lora.forward(X);
    peft::AnyAdapter<float> moved(std::move(lora));
    REQUIRE(moved.holds());
    REQUIRE((moved.forward(X) == Y));
    for (peft::AnyAdapter<float>* empty : {&lora, static_cast<peft::AnyAdapter<float>*>(nullptr)}) {
      peft::AnyAdapter<float> fresh;
      peft::AnyAdapter<float>& h = empty ? *empty : fresh;
      REQUIRE(!h.holds());
      REQUIRE((h.get<peft::LoRA<MatrixXf>>() == nullptr));
      REQUIRE_THROWS_AS(h.forward(X), peft::StateError);
      REQUIRE_THAT(message_of([&] { h.forward(X); }),
                   has_substring("peft::AnyAdapter::forward: the handle is empty (moved from)"));
      REQUIRE_THROWS_AS(h.forward(X, cache), peft::StateError);
      REQUIRE_THROWS_AS(h.backward(G, cache), peft::StateError);
      REQUIRE_THROWS_AS(h.merge(), peft::StateError);
      REQUIRE_THROWS_AS(h.unmerge(), peft::StateError);
      REQUIRE_THROWS_AS(h.is_merged(), peft::StateError);
      REQUIRE_THROWS_AS(h.parameters(), peft::StateError);
      REQUIRE_THROWS_AS(h.flat_values(), peft::StateError);
      REQUIRE_THROWS_AS(h.num_parameters(), peft::StateError);
      REQUIRE_THROWS_AS(h.delta_weight(), peft::StateError);
      REQUIRE_THROWS_AS(h.lora_shape(), peft::StateError);
      REQUIRE_THROWS_AS(h.random_state(), peft::StateError);
      REQUIRE_THROWS_AS(h.type(), peft::StateError);
    }
    // Assigned to, it works again.
    lora = std::move(moved);
    REQUIRE((lora.forward(X) == Y));
  }
  SECTION("random states forward and are checked") {
    REQUIRE(!ssf.has_random_state());
    REQUIRE_NOTHROW(ssf.set_random_state(""));
    REQUIRE_THROWS_AS(ssf.set_random_state("1 2 3"), peft::ConfigError);
    REQUIRE_THAT(message_of([&] { ssf.set_random_state("1 2 3"); }), has_substring("has no random stream"));
    const std::string before = lora.random_state();
    REQUIRE_THROWS_AS(lora.set_random_state("not a state"), peft::ConfigError);
    REQUIRE((lora.random_state() == before));
    const MatrixXf Y1 = lora.forward(X, cache);
    lora.set_random_state(before);
    REQUIRE((lora.forward(X, cache) == Y1));
  }
}

// ===================================================================================================
// 4. Parameters by name for an optimizer

TEST_CASE("add_to registers every parameter in one call named by path", "[model][optim]") {
  Model<MatrixXf> m;
  auto cfg = targeting({"q_proj"});
  cfg.kind = peft::AdapterKind::dora;
  cfg.r = 2;
  peft::AdapterSet<MatrixXf> set(m.weights, cfg);
  set.train_whole("head");
  peft::AdamW<float> opt;
  set.add_to(opt, peft::lora_plus(4.0));

  Strings want;
  for (const std::string path : {"layers.0.attn.q_proj", "layers.1.attn.q_proj", "q_proj"})
    for (const char* name : {"lora_A", "lora_B", "lora_magnitude_vector"}) want.push_back(path + "." + name);
  want.push_back("head.weight");
  want.push_back("head.bias");

  const auto slots = opt.slots();
  const auto params = set.parameters();
  REQUIRE((slots.size() == want.size()));
  REQUIRE((params.size() == want.size()));
  for (std::size_t k = 0; k < want.size(); ++k) {
    INFO(want[k]);
    REQUIRE((slots[k].name == want[k]));
    REQUIRE((std::string(params[k].name) == want[k]));
    REQUIRE((slots[k].rows == params[k].value.rows()));
    REQUIRE((slots[k].cols == params[k].value.cols()));
    const bool is_b = want[k].size() > 7 && want[k].compare(want[k].size() - 7, 7, ".lora_B") == 0;
    REQUIRE((slots[k].lr_scale == (is_b ? 4.0 : 1.0)));
  }
  REQUIRE((slots[0].rows == 2));  // lora_A: r x d_in
  REQUIRE((slots[0].cols == 5));
  REQUIRE((slots[2].rows == 6));  // magnitude: d_out x 1
  REQUIRE((slots[2].cols == 1));
  REQUIRE((slots[9].rows == 3));  // head.weight as W
  REQUIRE((slots[9].cols == 6));
  REQUIRE((slots[10].rows == 3));
  REQUIRE((slots[10].cols == 1));
  // The views are the adapters' own buffers and the user's head.
  REQUIRE(params[3].value.data() == set.at("layers.1.attn.q_proj").parameters()[0].value.data());
  REQUIRE(params[9].value.data() == m.W("head").data());
  REQUIRE(params[9].grad.data() == set.weight_grad("head").data());
  REQUIRE(params[10].value.data() == m.b("head")->data());
  REQUIRE(params[10].grad.data() == set.bias_grad("head").data());
  REQUIRE((opt.num_parameters() == set.num_parameters()));
  REQUIRE((set.num_parameters() == 3 * (2 * 5 + 6 * 2 + 6) + 18 + 3));

  SECTION("registering twice is refused and adds nothing") {
    REQUIRE_THROWS_AS(set.add_to(opt), peft::ConfigError);
    REQUIRE_THAT(message_of([&] { set.add_to(opt); }),
                 has_substring("'layers.0.attn.q_proj.lora_A' of the peft::AdapterSet of add() call 2 shares storage "
                               "with 'layers.0.attn.q_proj.lora_A' of the peft::AdapterSet of add() call 1, which is "
                               "already registered"));
    REQUIRE((opt.slots().size() == want.size()));
    REQUIRE((opt.num_parameters() == set.num_parameters()));
  }
  SECTION("a clash at the last adapter adds none of the others") {
    peft::SGD<float> sgd;
    sgd.add(set.at("q_proj"));
    REQUIRE_THROWS_AS(set.add_to(sgd), peft::ConfigError);
    REQUIRE((sgd.slots().size() == 3));
    REQUIRE(sgd.num_parameters() == set.at("q_proj").num_parameters());
  }
  SECTION("a prefix in the options qualifies every name") {
    peft::SGD<float> sgd;
    peft::ParamOptions o;
    o.prefix = "model";
    set.add_to(sgd, o);
    REQUIRE(sgd.slots().front().name == "model.layers.0.attn.q_proj.lora_A");
    REQUIRE(sgd.slots().back().name == "model.head.bias");
  }
  SECTION("an SSF set names its scale and shift") {
    Model<MatrixXf> m2;
    auto c2 = targeting({"up_proj"});
    c2.kind = peft::AdapterKind::ssf;
    peft::AdapterSet<MatrixXf> ssf(m2.weights, c2);
    peft::SGD<float> sgd;
    ssf.add_to(sgd, peft::lora_plus(4.0));
    Strings names;
    for (const auto& s : sgd.slots()) {
      names.push_back(s.name);
      REQUIRE((s.lr_scale == 1.0));
    }
    REQUIRE(names == Strings{"layers.0.mlp.up_proj.ssf_scale", "layers.0.mlp.up_proj.ssf_shift",
                             "layers.1.mlp.up_proj.ssf_scale", "layers.1.mlp.up_proj.ssf_shift"});
  }
}

TEST_CASE("AdamW steps on a whole set equal AdamW steps on each adapter alone", "[model][optim]") {
  const std::uint64_t seed = 77;
  auto cfg = targeting({"q_proj", "up_proj"});
  cfg.r = 3;
  cfg.lora_alpha = 6;
  cfg.init = peft::LoRAInit::random;
  cfg.seed = seed;
  cfg.rank_pattern = {{"up_proj", 2}};
  cfg.alpha_pattern = {{"layers\\.1\\..*", 5}};
  peft::AdamWConfig adam;
  adam.lr = 1e-2;
  adam.weight_decay = 0.1;

  Model<MatrixXf> m1, m2;
  peft::AdapterSet<MatrixXf> set(m1.weights, cfg);
  set.train_whole("head");
  peft::AdamW<float> opt(adam);
  set.add_to(opt, peft::lora_plus(4.0));

  // The same adapters built by hand, each with its own AdamW, and the head as plain matrices.
  std::deque<peft::LoRA<MatrixXf>> direct;
  std::deque<peft::AdamW<float>> opts;
  for (auto& l : set.layers()) {
    peft::LoRAConfig c;
    c.rank = l.path.find("up_proj") != std::string::npos ? 2 : 3;
    c.alpha = l.path.rfind("layers.1.", 0) == 0 ? 5 : 6;
    c.init = peft::LoRAInit::random;
    c.seed = peft::layer_seed(seed, l.path);
    direct.emplace_back(m2.W(l.path), c);
    opts.emplace_back(adam);
    opts.back().add(direct.back(), peft::lora_plus(4.0));
    REQUIRE((direct.back().flat_values() == l.adapter.flat_values()));  // what make_adapter built
  }
  REQUIRE((direct.size() == 5));
  MatrixXf head_grad(3, 6);
  Eigen::VectorXf bias_grad(3);
  peft::AdamW<float> head_opt(adam);
  head_opt.add("head.weight", m2.W("head"), head_grad, peft::lora_plus(4.0));
  head_opt.add("head.bias", *m2.b("head"), bias_grad, peft::lora_plus(4.0));
  const MatrixXf head0 = m1.W("head");

  for (int step = 0; step < 3; ++step) {
    std::size_t k = 0;
    for (auto& l : set.layers()) {
      const Eigen::VectorXf g = random_matrix<MatrixXf>(l.adapter.num_parameters(), 1, 1000 + 10 * step + k);
      l.adapter.flat_grads() = g;
      direct[k++].flat_grads() = g;
    }
    // Copied into the registered gradients (a move assignment would swap their storage away).
    const MatrixXf gW = random_matrix<MatrixXf>(3, 6, 2000 + step);
    const Eigen::VectorXf gb = random_matrix<MatrixXf>(3, 1, 3000 + step);
    head_grad = gW;
    bias_grad = gb;
    set.weight_grad("head") = head_grad;
    set.bias_grad("head") = bias_grad;
    opt.step();
    for (auto& o : opts) o.step();
    head_opt.step();
  }
  std::size_t k = 0;
  for (auto& l : set.layers()) {
    INFO(l.path);
    REQUIRE((l.adapter.flat_values() == direct[k++].flat_values()));
  }
  REQUIRE(same_bits(m1.W("head"), m2.W("head")));
  REQUIRE(same_bits(*m1.b("head"), *m2.b("head")));
  REQUIRE(m1.W("head") != head0);
  // The adapted weights are frozen.
  REQUIRE(same_bits(m1.W("q_proj"), m2.W("q_proj")));
  REQUIRE(same_bits(m1.W("q_proj"), Model<MatrixXf>().W("q_proj")));
}

TEST_CASE("A row-major module trained whole is registered in storage order and steps as the plain matrix",
          "[model][optim]") {
  Model<RowMajorXd> m1, m2;
  peft::AdapterSet<RowMajorXd> set(m1.weights, targeting({"q_proj"}));
  set.train_whole("head");
  REQUIRE((set.whole_modules().size() == 1));
  REQUIRE(set.whole_modules()[0].path == "head");
  const auto params = set.parameters();
  const auto& p = params[params.size() - 2];
  REQUIRE(std::string(p.name) == "head.weight");
  REQUIRE((p.value.rows() == 6));  // the transpose: the same elements in storage order
  REQUIRE((p.value.cols() == 3));
  REQUIRE(p.value(4, 1) == m1.W("head")(1, 4));

  peft::SGDConfig sc;
  sc.momentum = 0.9;
  sc.lr = 0.1;
  peft::SGD<double> opt(sc), plain(sc);
  set.add_to(opt);
  RowMajorXd gW(3, 6);
  Eigen::VectorXd gb(3);
  plain.add("head.weight", m2.W("head"), gW);
  plain.add("head.bias", *m2.b("head"), gb);
  const RowMajorXd head0 = m1.W("head");
  for (int step = 0; step < 2; ++step) {
    const RowMajorXd g = random_matrix<RowMajorXd>(3, 6, 60 + step);
    const Eigen::VectorXd h = random_matrix<MatrixXd>(3, 1, 70 + step);
    gW = g;  // copied into the registered storage
    gb = h;
    set.zero_grad();
    REQUIRE(set.weight_grad("head").isZero(0));
    set.weight_grad("head") += gW;
    set.bias_grad("head") += gb;
    opt.step();
    plain.step();
  }
  REQUIRE(same_bits(m1.W("head"), m2.W("head")));
  REQUIRE(same_bits(*m1.b("head"), *m2.b("head")));
  REQUIRE(m1.W("head") != head0);
}

// ===================================================================================================
// 5. merge() and unmerge(): all or nothing

namespace {

/// The LoRA round-trip bound 2 eps (|W0| + |dW|), per element (docs/math.md).
template <class M>
Eigen::MatrixXd lora_bound(const M& W0, const peft::MatrixX<typename M::Scalar>& dW, double factor = 2.0) {
  const double e = eps<typename M::Scalar>();
  return factor * e * (to_double(W0).cwiseAbs() + to_double(dW).cwiseAbs()) +
         Eigen::MatrixXd::Constant(W0.rows(), W0.cols(), std::numeric_limits<double>::denorm_min());
}

}  // namespace

TEST_CASE("AdapterSet merge refuses a set with a merged adapter before writing anything", "[model][merge]") {
  Model<MatrixXf> m;
  auto cfg = targeting({"q_proj", "k_proj"});
  cfg.r = 2;
  cfg.init = peft::LoRAInit::random;
  peft::AdapterSet<MatrixXf> set(m.weights, cfg);
  REQUIRE((set.size() == 5));
  set.at("layers.1.attn.q_proj").merge();
  const std::vector<MatrixXf> W = m.weight_copies();
  const auto b = m.bias_copies();

  REQUIRE_THROWS_AS(set.merge(), peft::StateError);
  REQUIRE_THAT(message_of([&] { set.merge(); }),
               has_substring("peft::AdapterSet::merge: " + quoted("layers.1.attn.q_proj") +
                             " is merged already; no weight was written"));
  REQUIRE(!set.is_merged());
  for (const auto& l : set.layers()) REQUIRE(l.adapter.is_merged() == (l.path == "layers.1.attn.q_proj"));
  REQUIRE_THROWS_AS(set.unmerge(), peft::StateError);
  REQUIRE_THAT(message_of([&] { set.unmerge(); }),
               has_substring("peft::AdapterSet::unmerge: " + quoted("layers.0.attn.q_proj") + " is not merged"));
  const std::vector<MatrixXf> W_after = m.weight_copies();
  const auto b_after = m.bias_copies();
  for (std::size_t i = 0; i < kNumModules; ++i) {
    INFO(kModules[i].path);
    REQUIRE(same_bits(W_after[i], W[i]));
    REQUIRE(same_bits(b_after[i], b[i]));
  }
  for (const auto& l : set.layers()) REQUIRE(l.adapter.is_merged() == (l.path == "layers.1.attn.q_proj"));

  // Merged whole, one adapter unmerged alone: unmerge() names it and writes nothing.
  set.at("layers.1.attn.q_proj").unmerge();
  set.merge();
  REQUIRE(set.is_merged());
  set.at("layers.1.attn.k_proj").unmerge();
  const std::vector<MatrixXf> W_merged = m.weight_copies();
  REQUIRE_THAT(message_of([&] { set.unmerge(); }),
               has_substring("peft::AdapterSet::unmerge: " + quoted("layers.1.attn.k_proj") + " is not merged"));
  const std::vector<MatrixXf> W_merged_after = m.weight_copies();
  for (std::size_t i = 0; i < kNumModules; ++i) REQUIRE(same_bits(W_merged_after[i], W_merged[i]));
  REQUIRE(!set.layers()[3].adapter.is_merged());
  REQUIRE(set.layers()[4].adapter.is_merged());
}

TEST_CASE("AdapterSet merge rolls back the merged layers when a later one refuses", "[model][merge]") {
  const std::string bad = "layers.1.attn.q_proj";  // the third of five adapted modules
  SECTION("a LoRA whose merge would overflow: NumericalError") {
    Model<MatrixXf> m;
    auto cfg = targeting({"q_proj", "k_proj"});
    cfg.r = 2;
    cfg.init = peft::LoRAInit::random;
    peft::AdapterSet<MatrixXf> set(m.weights, cfg);
    const std::vector<MatrixXf> W0 = m.weight_copies();
    auto& a = set.at(bad);
    const Eigen::VectorXf good = a.flat_values();
    auto p = a.parameters();
    p[0].value.setConstant(1.0f);
    p[1].value.setConstant(1e38f);  // s B A = 4 * 2 * 1e38 > FLT_MAX
    const Eigen::VectorXf huge = a.flat_values();
    std::vector<MatrixXf> dW;
    for (const auto& l : set.layers()) dW.push_back(l.adapter.delta_weight());

    REQUIRE_THAT(error_of<peft::NumericalError>([&] { set.merge(); }),
                 has_substring("peft::AdapterSet::merge: " + quoted(bad) + ": peft::LoRA::merge: W("));
    REQUIRE(!set.is_merged());
    for (const auto& l : set.layers()) REQUIRE(!l.adapter.is_merged());
    const std::vector<MatrixXf> W = m.weight_copies();
    for (std::size_t k = 0; k < set.size(); ++k) {
      const std::string& path = set.layers()[k].path;
      INFO(path);
      const std::size_t i = module_index(path);
      // Merged, then unmerged again (the exact restore: bit for bit); or the refusing layer and those
      // after it, never written.
      REQUIRE(same_bits(W[i], W0[i]));
    }
    REQUIRE((a.flat_values() == huge));
    // Fixed, the set merges whole.
    a.flat_values() = good;
    set.merge();
    REQUIRE(set.is_merged());
  }
  SECTION("an SSF on a module without a bias: ShapeError") {
    Model<MatrixXf> m;
    auto cfg = targeting({"q_proj"});  // layers.0 and layers.1 have a bias, the top-level q_proj none
    cfg.kind = peft::AdapterKind::ssf;
    cfg.ssf_init_std = 0.2;
    peft::AdapterSet<MatrixXf> set(m.weights, cfg);
    const std::vector<MatrixXf> W0 = m.weight_copies();
    const auto b0 = m.bias_copies();
    REQUIRE_THAT(error_of<peft::ShapeError>([&] { set.merge(); }),
                 has_substring("peft::AdapterSet::merge: " + quoted("q_proj") + ": peft::SSF::merge: the layer has no bias"));
    for (const auto& l : set.layers()) REQUIRE(!l.adapter.is_merged());
    const std::vector<MatrixXf> W = m.weight_copies();
    const auto b = m.bias_copies();
    for (const std::string path : {"layers.0.attn.q_proj", "layers.1.attn.q_proj"}) {
      INFO(path);
      const std::size_t i = module_index(path);
      const auto* ssf = set.at(path).get<peft::SSF<MatrixXf>>();
      const Eigen::VectorXd shift = ssf->shift().cast<double>();
      REQUIRE(worst_ratio(W[i], W0[i], lora_bound(W0[i], MatrixXf::Zero(6, 5))) <= 1.0);
      const Eigen::VectorXd b_bound = 8 * eps<float>() * (to_double(b0[i]).cwiseAbs() + shift.cwiseAbs());
      REQUIRE((to_double(b[i]) - to_double(b0[i])).cwiseAbs().cwiseQuotient(b_bound).maxCoeff() <= 1.0);
      REQUIRE(relative_diff(b[i], b0[i]) <= 1e-5);
    }
    REQUIRE(same_bits(W[module_index("q_proj")], W0[module_index("q_proj")]));
  }
}

TEST_CASE("AdapterSet unmerge merges back the unmerged layers when a later one refuses", "[model][merge]") {
  const std::string bad = "layers.1.attn.q_proj";
  Model<MatrixXf> m;
  auto cfg = targeting({"q_proj", "k_proj"});
  cfg.kind = peft::AdapterKind::dora;
  cfg.r = 2;
  cfg.init = peft::LoRAInit::random;
  peft::AdapterSet<MatrixXf> set(m.weights, cfg);
  set.merge();
  REQUIRE(set.is_merged());
  // A non-finite value written into one merged weight: that DoRA cannot unmerge it.
  m.W(bad)(1, 2) = std::numeric_limits<float>::infinity();
  const std::vector<MatrixXf> Wm = m.weight_copies();

  REQUIRE_THAT(error_of<peft::NumericalError>([&] { set.unmerge(); }),
               has_substring("peft::AdapterSet::unmerge: " + quoted(bad) + ": peft::DoRA::unmerge: W(1,2) would become inf"));
  REQUIRE(set.is_merged());
  for (const auto& l : set.layers()) REQUIRE(l.adapter.is_merged());
  const std::vector<MatrixXf> W = m.weight_copies();
  for (std::size_t k = 0; k < set.size(); ++k) {
    const std::string& path = set.layers()[k].path;
    INFO(path);
    const std::size_t i = module_index(path);
    // Unmerged, then merged again: the same bits (the exact restore, and a merge that depends on W0
    // and the parameters alone); or never written.
    REQUIRE(same_bits(W[i], Wm[i]));
  }
}

TEMPLATE_TEST_CASE("AdapterSet merge keeps every layer's output and unmerge restores every weight", "[model][merge]",
                   MatrixXf, RowMajorXd) {
  using M = TestType;
  using Scalar = typename M::Scalar;
  using Mat = peft::MatrixX<Scalar>;
  const double tol = std::is_same<Scalar, float>::value ? 1e-5 : 1e-13;
  for (const bool exact : {true, false})
  for (const auto kind : {peft::AdapterKind::lora, peft::AdapterKind::dora}) {
    INFO(peft::kind_name(kind) << ", exact restore " << exact);
    Model<M> m;
    auto cfg = targeting({"q_proj", "k_proj", "up_proj"});
    cfg.kind = kind;
    cfg.r = 2;
    cfg.init = peft::LoRAInit::random;
    peft::AdapterSet<M> set(m.weights, cfg);
    set.set_exact_restore(exact);
    REQUIRE((set.size() == 7));
    const std::vector<M> W0 = m.weight_copies();
    const auto b0 = m.bias_copies();
    std::vector<Mat> X, Y, dW;
    for (const auto& l : set.layers()) {
      X.push_back(random_matrix<Mat>(l.adapter.input_size(), 4, 80 + X.size()));
      Y.push_back(l.adapter.forward(X.back()));
      dW.push_back(l.adapter.delta_weight());
    }
    set.merge();
    REQUIRE(set.is_merged());
    for (std::size_t k = 0; k < set.size(); ++k) {
      const auto& l = set.layers()[k];
      INFO(l.path);
      const std::size_t i = module_index(l.path);
      REQUIRE(l.adapter.is_merged());
      REQUIRE(relative_diff(l.adapter.forward(X[k]), Y[k]) <= tol);
      REQUIRE(relative_diff(m.W(l.path), to_double(W0[i]) + to_double(dW[k])) <= tol);
      REQUIRE(!same_bits(m.W(l.path), W0[i]));
    }
    REQUIRE(same_bits(m.W("head"), W0[module_index("head")]));  // not adapted
    REQUIRE(same_bits(m.W("layers.0.attn.xq_proj"), W0[module_index("layers.0.attn.xq_proj")]));
    REQUIRE_THROWS_AS(set.set_exact_restore(!exact), peft::StateError);
    set.unmerge();
    REQUIRE(!set.is_merged());
    REQUIRE(set.last_restore_exact() == exact);
    for (std::size_t k = 0; k < set.size(); ++k) {
      const auto& l = set.layers()[k];
      INFO(l.path);
      const std::size_t i = module_index(l.path);
      REQUIRE(!l.adapter.is_merged());
      if (exact) {
        REQUIRE(same_bits(m.W(l.path), W0[i]));
      } else if (kind == peft::AdapterKind::lora) {
        REQUIRE(worst_ratio(m.W(l.path), W0[i], lora_bound(W0[i], dW[k])) <= 1.0);
      } else {
        // DoRA: eps |W0| + 5 eps |W0 + s B A| per element (docs/math.md), with the rounding of s B A.
        const auto* d = l.adapter.template get<peft::DoRA<M>>();
        const double e = eps<Scalar>();
        const Eigen::MatrixXd L = std::abs(double(d->scaling())) * to_double(d->B()).cwiseAbs() * to_double(d->A()).cwiseAbs();
        const Eigen::MatrixXd V = (to_double(W0[i]) + double(d->scaling()) * to_double(d->B()) * to_double(d->A())).cwiseAbs() +
                                  double(d->rank() + 2) * e * L;
        REQUIRE(worst_ratio(m.W(l.path), W0[i], e * to_double(W0[i]).cwiseAbs() + 5 * e * V) <= 1.0);
      }
      if (b0[i].size() > 0) REQUIRE(same_bits(*m.b(l.path), b0[i]));
    }
  }
}

// ===================================================================================================
// 6. Optimizer state by name

namespace {

peft::AdamWConfig rig_adamw() {
  peft::AdamWConfig c;
  c.lr = 3e-3;
  c.weight_decay = 0.05;
  return c;
}

/// A model with a DoRA set on its q_proj modules and its head trained whole, registered with an AdamW.
struct Rig {
  Model<MatrixXf> model;
  peft::AdapterSet<MatrixXf> set;
  peft::AdamW<float> opt;

  Rig() : set(model.weights, config()), opt(rig_adamw()) {
    set.train_whole("head");
    set.add_to(opt);
  }
  static peft::AdapterSetConfig config() {
    auto cfg = targeting({"q_proj"});
    cfg.kind = peft::AdapterKind::dora;
    cfg.r = 2;
    cfg.init = peft::LoRAInit::random;
    return cfg;
  }
  void train(int steps, std::uint64_t grad_seed) {
    for (int t = 0; t < steps; ++t) {
      fill_grads(set, grad_seed + 100 * std::uint64_t(t));
      opt.step();
    }
  }
  static void fill_grads(peft::AdapterSet<MatrixXf>& set, std::uint64_t seed) {
    std::uint64_t k = 0;
    for (auto& p : set.parameters()) p.grad = random_matrix<MatrixXf>(p.grad.rows(), p.grad.cols(), seed + k++);
  }
};

bool same_parameters(peft::AdapterSet<MatrixXf>& a, peft::AdapterSet<MatrixXf>& b) {
  const auto pa = a.parameters(), pb = b.parameters();
  if (pa.size() != pb.size()) return false;
  for (std::size_t k = 0; k < pa.size(); ++k)
    if (std::string(pa[k].name) != pb[k].name || !same_bits(pa[k].value, pb[k].value)) return false;
  return true;
}

/// Whether two states hold the same values, slots matched by name.
bool same_state(const peft::OptimizerState<float>& a, const peft::OptimizerState<float>& b) {
  if (a.optimizer != b.optimizer || a.buffer_names != b.buffer_names || a.step_count != b.step_count ||
      a.lr != b.lr || a.slots.size() != b.slots.size())
    return false;
  for (const auto& s : a.slots) {
    const auto t = std::find_if(b.slots.begin(), b.slots.end(), [&](const auto& x) { return x.name == s.name; });
    if (t == b.slots.end() || t->rows != s.rows || t->cols != s.cols || t->steps != s.steps ||
        t->buffers.size() != s.buffers.size())
      return false;
    for (std::size_t k = 0; k < s.buffers.size(); ++k)
      if (!same_bits(t->buffers[k], s.buffers[k])) return false;
  }
  return true;
}

}  // namespace

TEST_CASE("Optimizer state_dict round trips into a fresh optimizer and training continues bit for bit",
          "[model][optim][state]") {
  Rig a, b, control;
  a.train(3, 500);
  a.opt.set_lr(4e-4);
  const peft::OptimizerState<float> saved = a.opt.state_dict();
  REQUIRE(saved.optimizer == "peft::AdamW");
  REQUIRE(saved.buffer_names == Strings{"exp_avg", "exp_avg_sq"});
  REQUIRE((saved.step_count == 3));
  REQUIRE((saved.lr == 4e-4));
  const auto params = a.set.parameters();
  REQUIRE((saved.slots.size() == params.size()));
  for (std::size_t i = 0; i < params.size(); ++i) {
    INFO(params[i].name);
    REQUIRE((saved.slots[i].name == params[i].name));
    REQUIRE((saved.slots[i].rows == params[i].value.rows()));
    REQUIRE((saved.slots[i].cols == params[i].value.cols()));
    REQUIRE((saved.slots[i].steps == 3));
    REQUIRE((saved.slots[i].buffers.size() == 2));
    REQUIRE((saved.slots[i].buffers[0] == a.opt.exp_avg(i)));
    REQUIRE((saved.slots[i].buffers[1] == a.opt.exp_avg_sq(i)));
    REQUIRE(!saved.slots[i].buffers[1].isZero(0));
  }

  // b and control take a's parameters; b a fresh optimizer registered in another order, given a's state.
  for (Rig* r : {&b, &control}) {
    auto pr = r->set.parameters();
    for (std::size_t k = 0; k < params.size(); ++k) pr[k].value = params[k].value;
  }
  // (Built by copies: assigning a Parameter, as std::reverse would, copies the values its maps view.)
  const auto forward_order = b.set.parameters();
  std::vector<peft::Parameter<float>> reversed(forward_order.rbegin(), forward_order.rend());
  peft::AdamW<float> resumed(rig_adamw());
  resumed.add_parameters(reversed);
  REQUIRE(resumed.slots().front().name == "head.bias");
  resumed.load_state_dict(saved);
  REQUIRE((resumed.step_count() == 3));
  REQUIRE((resumed.lr() == 4e-4));
  for (const auto& s : resumed.slots()) REQUIRE(s.steps == 3);
  REQUIRE(same_state(resumed.state_dict(), saved));

  control.opt.set_lr(4e-4);  // same parameters and lr, but no state
  for (int t = 0; t < 2; ++t) {
    const std::uint64_t seed = 900 + 100 * std::uint64_t(t);
    Rig::fill_grads(a.set, seed);
    Rig::fill_grads(b.set, seed);
    Rig::fill_grads(control.set, seed);
    a.opt.step();
    resumed.step();
    control.opt.step();
  }
  REQUIRE(same_parameters(a.set, b.set));
  REQUIRE(same_state(a.opt.state_dict(), resumed.state_dict()));
  REQUIRE(!same_parameters(a.set, control.set));  // the state matters: without it the steps differ
}

TEST_CASE("load_state_dict refuses a state that does not fit naming what differs and changes nothing",
          "[model][optim][state][errors]") {
  Rig a, reference, other;
  a.train(2, 500);
  reference.train(2, 500);
  other.train(4, 700);  // other moments, steps and step count
  REQUIRE(same_state(a.opt.state_dict(), reference.opt.state_dict()));
  peft::OptimizerState<float> bad = other.opt.state_dict();
  REQUIRE(!same_state(bad, a.opt.state_dict()));
  REQUIRE(bad.slots.back().name == "head.bias");
  // Refused with a ConfigError naming what differs; nothing changed: the same state as the reference,
  // and the next steps are the reference's.
  const auto refused = [&](const std::string& want) {
    REQUIRE_THROWS_AS(a.opt.load_state_dict(bad), peft::ConfigError);
    const std::string message = message_of([&] { a.opt.load_state_dict(bad); });
    REQUIRE_THAT(message, has_substring("peft::AdamW::load_state_dict: "));
    REQUIRE_THAT(message, has_substring(want));
    REQUIRE(same_state(a.opt.state_dict(), reference.opt.state_dict()));
    for (int t = 0; t < 2; ++t) {
      Rig::fill_grads(a.set, 1300 + std::uint64_t(t));
      Rig::fill_grads(reference.set, 1300 + std::uint64_t(t));
      a.opt.step();
      reference.opt.step();
    }
    REQUIRE(same_parameters(a.set, reference.set));
    REQUIRE(same_state(a.opt.state_dict(), reference.opt.state_dict()));
  };

  SECTION("the state of another optimizer type") {
    peft::SGDConfig sc;
    sc.momentum = 0.9;
    peft::SGD<float> sgd(sc);
    other.set.add_to(sgd);
    sgd.step();
    bad = sgd.state_dict();
    refused("the state is of peft::SGD, not of peft::AdamW");
  }
  SECTION("another set of buffers") {
    bad.buffer_names = {"exp_avg", "momentum_buffer"};
    refused("the state's buffers are not peft::AdamW's");
  }
  SECTION("a missing slot") {
    bad.slots.pop_back();
    refused("the state has no entry for the registered parameter 'head.bias'");
  }
  SECTION("an extra slot") {
    bad.slots.push_back({"layers.7.attn.v_proj.lora_A", 2, 5, 4, {Eigen::VectorXf::Zero(10), Eigen::VectorXf::Zero(10)}});
    refused("the state has a parameter 'layers.7.attn.v_proj.lora_A' that is not registered");
  }
  SECTION("a slot twice") {
    bad.slots.push_back(bad.slots.front());
    refused("the state has parameter 'layers.0.attn.q_proj.lora_A' more often than it is registered");
  }
  SECTION("a wrong shape of the same size") {
    auto& s = bad.slots[6];
    REQUIRE(s.name == "q_proj.lora_A");
    std::swap(s.rows, s.cols);
    bad.slots.push_back(bad.slots[6]);  // checked last
    bad.slots.erase(bad.slots.begin() + 6);
    refused("'q_proj.lora_A' is 5x2 in the state but 2x5 registered");
  }
  SECTION("a state buffer of the wrong size") {
    bad.slots.back().buffers[1].conservativeResize(2);
    refused("a state buffer of 'head.bias' has 2 entries, expected 3");
  }
  SECTION("a missing state buffer") {
    bad.slots.back().buffers.pop_back();
    refused("'head.bias' has 1 state buffers, expected 2");
  }
  SECTION("a negative step count") {
    bad.step_count = -1;
    refused("step_count is -1, expected >= 0");
  }
  SECTION("a slot with negative steps") {
    bad.slots.back().steps = -3;
    refused("'head.bias' has -3 steps, expected >= 0");
  }
  SECTION("a negative learning rate") {
    bad.lr = -0.5;
    refused("lr is -0.5, expected a finite value >= 0");
  }
}

// ===================================================================================================
// 7. Random streams: Rng and the LoRA family's dropout stream

TEST_CASE("Rng state and set_state continue the stream exactly including the cached normal", "[random]") {
  const auto draw = [](peft::Rng& r) {
    std::vector<double> out;
    out.push_back(r.normal());  // the spare of the pair drawn before the state was saved
    out.push_back(r.normal());
    out.push_back(r.uniform());
    out.push_back(r.normal());
    out.push_back(static_cast<double>(r.engine()()));
    return out;
  };
  peft::Rng rng(2024);
  rng.uniform();
  rng.normal();  // a normal pair: its second value is now cached
  const std::string saved = rng.state();
  const std::vector<double> first = draw(rng);
  REQUIRE((rng.state() != saved));
  rng.set_state(saved);
  REQUIRE((rng.state() == saved));
  REQUIRE((draw(rng) == first));
  // Another Rng restored from the text continues the same stream, the cached normal included.
  peft::Rng other(7);
  other.set_state(saved);
  REQUIRE((draw(other) == first));
  // A state without a cached normal drops the one the receiver holds.
  peft::Rng fresh(3);
  const std::string no_spare = fresh.state();
  const double next = fresh.normal();
  peft::Rng holder(4);
  holder.normal();
  holder.set_state(no_spare);
  REQUIRE((holder.normal() == next));
}

TEST_CASE("Rng set_state refuses text that is not a state and keeps its stream", "[random][errors]") {
  peft::Rng rng(11);
  rng.normal();
  const std::string saved = rng.state();
  const std::size_t last = saved.rfind(' ');
  const std::size_t flag = saved.rfind(' ', last - 1);
  const std::string bad_flag = saved.substr(0, flag + 1) + "2" + saved.substr(last);
  const std::vector<std::string> invalid = {"", "hello", saved.substr(0, saved.size() / 2), saved + " 9", bad_flag,
                                            saved.substr(0, flag)};
  for (const std::string& text : invalid) {
    INFO("state text of " << text.size() << " characters");
    peft::Rng copy = rng;
    REQUIRE_THROWS_AS(rng.set_state(text), std::invalid_argument);
    REQUIRE((rng.state() == saved));
    REQUIRE((rng.normal() == copy.normal()));
    rng.set_state(saved);
  }
}

TEST_CASE("LoRA random_state and set_random_state replay the dropout masks", "[random][lora]") {
  MatrixXf W = random_matrix<MatrixXf>(6, 5, 61), W2 = W;
  peft::LoRAConfig cfg;
  cfg.rank = 2;
  cfg.dropout = 0.5;
  cfg.init = peft::LoRAInit::random;
  cfg.seed = 17;
  peft::LoRA<MatrixXf> lora(W, cfg);
  const MatrixXf X = random_matrix<MatrixXf>(5, 8, 62);
  const std::string start = lora.random_state();
  peft::LoRA<MatrixXf>::Cache cache;
  const MatrixXf Y1 = lora.forward(X, cache);
  const MatrixXf mask1 = cache.branch.mask;
  const MatrixXf Y2 = lora.forward(X, cache);
  REQUIRE((Y1 != Y2));  // two different masks
  lora.set_random_state(start);
  REQUIRE((lora.forward(X, cache) == Y1));
  REQUIRE((cache.branch.mask == mask1));
  REQUIRE((lora.forward(X, cache) == Y2));

  // Another adapter with the same parameters but another seed draws the same masks from the state.
  cfg.seed = 99;
  peft::LoRA<MatrixXf> other(W2, cfg);
  other.flat_values() = lora.flat_values();
  peft::LoRA<MatrixXf>::Cache other_cache;
  other.set_random_state(start);
  REQUIRE((other.forward(X, other_cache) == Y1));
  REQUIRE((other.forward(X, other_cache) == Y2));
  REQUIRE((other.random_state() == lora.random_state()));

  // Not a state: ConfigError, the stream unchanged.
  const std::string before = lora.random_state();
  REQUIRE_THROWS_AS(lora.set_random_state("0 1"), peft::ConfigError);
  REQUIRE_THAT(message_of([&] { lora.set_random_state("0 1"); }),
               has_substring("peft::LoRA::set_random_state: not a state written by random_state()"));
  REQUIRE((lora.random_state() == before));
  REQUIRE((lora.forward(X, cache) == other.forward(X, other_cache)));
}

// ===================================================================================================
// 8. ModelWeights, insert() and train_whole() errors

TEST_CASE("ModelWeights refuses an empty or repeated path and a bias of the wrong size", "[model][errors]") {
  MatrixXf W = random_matrix<MatrixXf>(4, 3, 90), W2 = W, empty;
  Eigen::VectorXf b = Eigen::VectorXf::Zero(4), short_b = Eigen::VectorXf::Zero(3);
  peft::ModelWeights<MatrixXf> mw;
  mw.add("a", W, b);
  REQUIRE_THROWS_AS(mw.add("", W2), peft::ConfigError);
  REQUIRE_THAT(message_of([&] { mw.add("", W2); }), has_substring("peft::ModelWeights::add: an empty module path"));
  REQUIRE_THROWS_AS(mw.add("a", W2), peft::ConfigError);
  REQUIRE_THAT(message_of([&] { mw.add("a", W2); }), has_substring("module \"a\" is already there"));
  REQUIRE_THROWS_AS(mw.add("c", W2, short_b), peft::ShapeError);
  REQUIRE_THAT(message_of([&] { mw.add("c", W2, short_b); }),
               has_substring("module \"c\": b has 3 entries, expected d_out = 4"));
  REQUIRE_THROWS_AS(mw.add("d", empty), peft::ShapeError);
  REQUIRE((mw.modules().size() == 1));
  REQUIRE(mw.find("c") == nullptr);
  REQUIRE((mw.modules()[0].weight == &W));
  REQUIRE((mw.modules()[0].bias == &b));
  REQUIRE_THROWS_AS(mw.at("zzz"), peft::ConfigError);
  mw.add("e", W2);
  REQUIRE(mw.at("e").bias == nullptr);
}

TEST_CASE("AdapterSet insert and train_whole refuse what does not fit", "[model][errors]") {
  Model<MatrixXf> m;
  peft::LoRAConfig cfg;
  cfg.rank = 2;
  peft::AdapterSet<MatrixXf> set(m.weights);
  REQUIRE((set.size() == 0));
  REQUIRE(!set.is_merged());
  set.insert("head", peft::AnyAdapter<float>(peft::LoRA<MatrixXf>(m.W("head"), cfg)));
  REQUIRE((set.size() == 1));
  REQUIRE(!set.selected_by_config());
  REQUIRE(std::string(set.parameters()[0].name) == "head.lora_A");

  MatrixXf other = random_matrix<MatrixXf>(5, 5, 91);
  REQUIRE_THROWS_AS(set.insert("q_proj", peft::AnyAdapter<float>(peft::LoRA<MatrixXf>(other, cfg))), peft::ShapeError);
  REQUIRE_THAT(message_of([&] { set.insert("q_proj", peft::AnyAdapter<float>(peft::LoRA<MatrixXf>(other, cfg))); }),
               has_substring(quoted("q_proj") + " is 6x5 but the adapter is 5x5"));
  REQUIRE_THROWS_AS(set.insert("nope", peft::AnyAdapter<float>(peft::LoRA<MatrixXf>(other, cfg))), peft::ConfigError);
  REQUIRE_THAT(message_of([&] { set.insert("head", peft::AnyAdapter<float>(peft::LoRA<MatrixXf>(m.W("head"), cfg))); }),
               has_substring(quoted("head") + " has an adapter already"));
  REQUIRE_THAT(message_of([&] { set.insert("q_proj", peft::AnyAdapter<float>()); }),
               has_substring("the adapter handle is empty"));
  REQUIRE((set.size() == 1));
  REQUIRE(set.find("q_proj") == nullptr);
  REQUIRE_THROWS_AS(set.at("q_proj"), peft::ConfigError);

  REQUIRE_THROWS_AS(set.train_whole("head"), peft::ConfigError);
  REQUIRE_THAT(message_of([&] { set.train_whole("head"); }),
               has_substring("peft::AdapterSet::train_whole: " + quoted("head") + " has an adapter"));
  set.train_whole("layers.1.mlp.up_proj");
  REQUIRE_THAT(message_of([&] { set.train_whole("layers.1.mlp.up_proj"); }), has_substring("is already trained whole"));
  MatrixXf& up = m.W("layers.1.mlp.up_proj");
  REQUIRE_THAT(message_of([&] { set.insert("layers.1.mlp.up_proj", peft::AnyAdapter<float>(peft::LoRA<MatrixXf>(up, cfg))); }),
               has_substring(quoted("layers.1.mlp.up_proj") + " is trained whole"));
  REQUIRE_THROWS_AS(set.train_whole("nope"), peft::ConfigError);
  REQUIRE_THROWS_AS(set.weight_grad("q_proj"), peft::ConfigError);
  REQUIRE((set.whole_modules().size() == 1));
  REQUIRE((set.parameters().size() == 4));  // head's lora_A, lora_B, then up_proj's weight and bias

  // A set built from a config: its adapted modules cannot be trained whole.
  Model<MatrixXf> m2;
  peft::AdapterSet<MatrixXf> built(m2.weights, targeting({"q_proj"}));
  REQUIRE_THROWS_AS(built.train_whole("layers.0.attn.q_proj"), peft::ConfigError);
  REQUIRE(built.whole_modules().empty());
}
