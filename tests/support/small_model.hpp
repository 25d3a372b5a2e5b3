#pragma once
// A small model for the tests of a whole model's adapters (include/peft/model/): nine modules with
// PyTorch-style paths, some with a bias, among them names that end others' names ("xq_proj", a top-level
// "q_proj") so that target selection by suffix is put to the test; the user's weights held at stable
// addresses behind a ModelWeights; and an AdapterSetConfig targeting a selection of its modules.
#include "support/catch.hpp"
#include "support/matrices.hpp"

#include <peft/model/adapter_set.hpp>

#include <Eigen/Core>

#include <cstddef>
#include <cstdint>
#include <deque>
#include <string>
#include <utility>
#include <vector>

namespace peft::test::small_model {

using Strings = std::vector<std::string>;

/// A module of the model: its path, its weight's shape, whether it has a bias.
struct ModuleSpec {
  const char* path;
  Eigen::Index rows, cols;
  bool bias;
};

inline constexpr ModuleSpec kModules[] = {
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
inline constexpr std::size_t kNumModules = sizeof(kModules) / sizeof(kModules[0]);

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
inline std::size_t module_index(const std::string& path) {
  for (std::size_t i = 0; i < kNumModules; ++i)
    if (path == kModules[i].path) return i;
  FAIL("no module " << path);
  return 0;
}

/// A config (LoRA, the defaults) adapting the modules `targets` selects, less those `exclude` selects.
inline peft::AdapterSetConfig targeting(peft::ModuleSelector targets,
                                        peft::ModuleSelector exclude = peft::ModuleSelector()) {
  peft::AdapterSetConfig cfg;
  cfg.target_modules = std::move(targets);
  cfg.exclude_modules = std::move(exclude);
  return cfg;
}

/// The paths of the modules a set adapts, in its order.
template <class M>
Strings paths_of(const peft::AdapterSet<M>& set) {
  Strings out;
  for (const auto& l : set.layers()) out.push_back(l.path);
  return out;
}

/// How messages name a module: module "<path>".
inline std::string quoted(const std::string& path) { return "module \"" + path + "\""; }

}  // namespace peft::test::small_model
