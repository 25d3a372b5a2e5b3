// Which modules of a whole model get adapters, and how (include/peft/model/targets.hpp, AdapterSet's
// constructor): target selection as Hugging Face PEFT selects modules (ModuleSelector lists and regexes,
// target_modules, exclude_modules, rank_pattern, alpha_pattern, the first matching key winning), worked
// out by hand on a small model (support/small_model.hpp) whose paths end one another; the configs
// refused, with no weight written; and each layer's seed, from the base seed and its path.
#include "support/catch.hpp"
#include "support/errors.hpp"
#include "support/matrices.hpp"
#include "support/small_model.hpp"

#include <peft/model/adapter_set.hpp>
#include <peft/model/targets.hpp>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

using peft::test::has_substring;
using peft::test::MatrixXf;
using peft::test::message_of;
using peft::test::same_bits;
using namespace peft::test::small_model;

namespace {

/// The modules a set built from `cfg` over the model adapts, in order.
Strings selected(const peft::AdapterSetConfig& cfg) {
  Model<MatrixXf> m;
  const peft::AdapterSet<MatrixXf> set(m.weights, cfg);
  REQUIRE(set.selected_by_config());
  return paths_of(set);
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
