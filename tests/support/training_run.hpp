#pragma once
// A small model trained reproducibly, for the tests that save a whole model's adapters and load them back
// (PEFT directories, training checkpoints): five modules seeded by their paths (three to adapt, two to
// train whole), the AdapterSet config the tests start from, snapshots of the parameters by name, and a
// training loop whose every batch is a function of the step and the module only, with a learning-rate
// schedule that lives in the optimizer's state, so that a resumed run can be compared bit for bit with
// an uninterrupted one.
#include "support/errors.hpp"
#include "support/matrices.hpp"

#include <peft/model/adapter_set.hpp>
#include <peft/optim/adamw.hpp>

#include <Eigen/Core>

#include <cmath>
#include <cstdint>
#include <deque>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace peft::test::training_run {

using Eigen::Index;

struct ModuleSpec {
  std::string path;
  Index d_out, d_in;
  bool bias;
};

/// Three adapted projections (two with a bias, one without), a head (with a bias) and a pooler (without)
/// to train whole.
inline std::vector<ModuleSpec> default_specs() {
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

inline peft::AdapterSetConfig make_config(peft::AdapterKind kind, double dropout = 0.0) {
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
inline double schedule(std::int64_t step_count) { return 0.03 * std::pow(0.7, double(step_count)); }

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

}  // namespace peft::test::training_run
