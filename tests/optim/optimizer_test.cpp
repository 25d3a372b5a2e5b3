// What every optimizer shares (peft::OptimizerBase): registering adapters and plain matrices, LoRA+,
// zero_grad, clipping by global norm, the step count, and the errors, with the adapters' real buffers;
// and the optimizer's state by name (state_dict / load_state_dict), on a whole model's adapters
// (support/small_model.hpp): round-tripped into a fresh optimizer registered in another order, training
// continues bit for bit, and a state that does not fit is refused naming what differs, nothing changed.
#include "support/catch.hpp"
#include "support/errors.hpp"
#include "support/matrices.hpp"
#include "support/small_model.hpp"

#include <peft/adapters/dora.hpp>
#include <peft/adapters/lora.hpp>
#include <peft/adapters/ssf.hpp>
#include <peft/adapters/standalone_ssf.hpp>
#include <peft/model/adapter_set.hpp>
#include <peft/optim/adamw.hpp>
#include <peft/optim/sgd.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <utility>
#include <vector>

using peft::test::has_substring;
using peft::test::MatrixXf;
using peft::test::message_of;
using peft::test::random_matrix;
using peft::test::same_bits;
using peft::test::small_model::Model;
using peft::test::small_model::Strings;
using peft::test::small_model::targeting;

namespace {

// All gradients of an adapter set to one value.
template <class A>
void fill_grads(A& adapter, float value) {
  adapter.flat_grads().setConstant(value);
}

}  // namespace

TEST_CASE("Optimizers register every parameter of an adapter, named as PEFT names them", "[optim]") {
  Eigen::MatrixXf W = random_matrix<Eigen::MatrixXf>(6, 5, 1);
  peft::DoRAConfig cfg;
  cfg.rank = 2;
  peft::DoRA<Eigen::MatrixXf> dora(W, cfg);
  Eigen::MatrixXf head = Eigen::MatrixXf::Zero(3, 6), dhead = Eigen::MatrixXf::Zero(3, 6);

  peft::SGD<float> opt;
  peft::ParamOptions named;
  named.prefix = "layer1";
  opt.add(dora, named);
  opt.add("head.weight", head, dhead);
  const auto slots = opt.slots();
  REQUIRE(slots.size() == 4);
  REQUIRE(slots[0].name == "layer1.lora_A");
  REQUIRE(slots[1].name == "layer1.lora_B");
  REQUIRE(slots[2].name == "layer1.lora_magnitude_vector");
  REQUIRE(slots[3].name == "head.weight");
  REQUIRE(slots[0].rows == 2);
  REQUIRE(slots[0].cols == 5);
  REQUIRE(slots[3].offset == dora.num_parameters());  // state laid out slot after slot
  REQUIRE(opt.num_parameters() == dora.num_parameters() + 18);
}

TEST_CASE("Stepping moves the adapter's own parameters: its forward changes", "[optim]") {
  Eigen::MatrixXd W = random_matrix<Eigen::MatrixXd>(6, 5, 2);
  peft::LoRA<Eigen::MatrixXd> lora(W);
  const Eigen::MatrixXd X = random_matrix<Eigen::MatrixXd>(5, 3, 3);
  const Eigen::MatrixXd Y0 = lora.forward(X);
  peft::SGD<double> opt;
  opt.add(lora);
  lora.flat_grads().setConstant(1.0);
  const Eigen::VectorXd before = lora.flat_values();
  opt.step();
  REQUIRE((lora.flat_values() - (before.array() - 0.01).matrix()).cwiseAbs().maxCoeff() < 1e-15);
  REQUIRE((lora.forward(X) - Y0).norm() > 1e-3);
}

TEST_CASE("LoRA+ scales the learning rate of lora_B only", "[optim][lora_plus]") {
  Eigen::MatrixXf W = random_matrix<Eigen::MatrixXf>(6, 5, 4);
  peft::DoRAConfig lcfg;
  lcfg.rank = 2;
  peft::DoRA<Eigen::MatrixXf> dora(W, lcfg);
  Eigen::VectorXf extra = Eigen::VectorXf::Zero(4), dextra = Eigen::VectorXf::Ones(4);

  peft::SGDConfig cfg;
  cfg.lr = 0.01;
  peft::SGD<float> opt(cfg);
  opt.add(dora, peft::lora_plus());  // ratio 16 by default, as in the LoRA+ paper
  opt.add("extra", extra, dextra, peft::lora_plus());
  REQUIRE(opt.slots()[0].lr_scale == 1.0);
  REQUIRE(opt.slots()[1].lr_scale == 16.0);
  REQUIRE(opt.slots()[2].lr_scale == 1.0);  // the magnitude is not lora_B
  REQUIRE(opt.slots()[3].lr_scale == 1.0);  // nor is a plain matrix

  const Eigen::VectorXf before = dora.flat_values();
  fill_grads(dora, 1.0f);
  opt.step();
  const Eigen::VectorXf moved = before - dora.flat_values();
  for (const peft::ParameterInfo& info : dora.parameter_layout()) {
    const float want = std::string(info.name) == "lora_B" ? 0.16f : 0.01f;
    REQUIRE(moved.segment(info.offset, info.size()).isConstant(want, 1e-4f));
  }
  REQUIRE(extra.isConstant(-0.01f));

  peft::ParamOptions custom = peft::lora_plus(4.0);
  custom.lr_scale = 0.5;
  peft::LoRA<Eigen::MatrixXf> lora(W, lcfg);
  opt.add(lora, custom);
  REQUIRE(opt.slots()[4].lr_scale == 0.5);
  REQUIRE(opt.slots()[5].lr_scale == 2.0);
}

TEST_CASE("zero_grad clears the gradients of adapters and plain matrices alike", "[optim]") {
  Eigen::MatrixXf W = random_matrix<Eigen::MatrixXf>(6, 5, 5);
  peft::LoRA<Eigen::MatrixXf> lora(W);
  peft::StandaloneSSF<float> ssf(6);
  Eigen::MatrixXf head(2, 6), dhead = Eigen::MatrixXf::Ones(2, 6);
  peft::AdamW<float> opt;
  opt.add(lora);
  opt.add(ssf);
  opt.add("head", head, dhead);
  fill_grads(lora, 2.0f);
  fill_grads(ssf, 3.0f);
  opt.zero_grad();
  REQUIRE(lora.flat_grads().isZero(0.0f));
  REQUIRE(ssf.flat_grads().isZero(0.0f));
  REQUIRE(dhead.isZero(0.0f));
}

TEST_CASE("clip_grad_norm scales every gradient by max_norm / (norm + 1e-6) over all slots", "[optim][clip]") {
  Eigen::MatrixXd W = random_matrix<Eigen::MatrixXd>(4, 3, 6);
  peft::LoRAConfig cfg;
  cfg.rank = 1;
  peft::LoRA<Eigen::MatrixXd> lora(W, cfg);  // 7 parameters
  Eigen::VectorXd v = Eigen::VectorXd::Zero(2), dv(2);
  peft::SGD<double> opt;
  opt.add(lora);
  opt.add("v", v, dv);

  lora.flat_grads().setConstant(1.0);  // squared norm 7
  dv << 3.0, 0.0;                      // + 9: the global norm is 4
  REQUIRE(opt.grad_norm() == 4.0);
  SECTION("above max_norm: clipped to max_norm") {
    const double norm = opt.clip_grad_norm(2.0);
    REQUIRE(norm == 4.0);
    const double coef = 2.0 / (4.0 + 1e-6);
    REQUIRE(lora.flat_grads().isConstant(coef, 1e-15));
    REQUIRE_THAT(dv(0), WithinAbs(3.0 * coef, 1e-15));
    REQUIRE_THAT(opt.grad_norm(), WithinAbs(2.0, 1e-6));
  }
  SECTION("below max_norm: untouched") {
    REQUIRE(opt.clip_grad_norm(10.0) == 4.0);
    REQUIRE(lora.flat_grads().isConstant(1.0, 0.0));
    REQUIRE(dv(0) == 3.0);
  }
  SECTION("a NaN gradient: NumericalError, nothing scaled") {
    dv(1) = std::numeric_limits<double>::quiet_NaN();
    REQUIRE_THROWS_AS(opt.clip_grad_norm(1.0), peft::NumericalError);
    REQUIRE_THAT(message_of([&] { opt.clip_grad_norm(1.0); }),
                 has_substring("peft::SGD::clip_grad_norm: the gradient norm is nan"));
    REQUIRE(lora.flat_grads().isConstant(1.0, 0.0));
    REQUIRE(dv(0) == 3.0);
  }
  SECTION("max_norm must be finite and positive") {
    REQUIRE_THROWS_AS(opt.clip_grad_norm(0.0), peft::ConfigError);
    REQUIRE_THROWS_AS(opt.clip_grad_norm(std::numeric_limits<double>::infinity()), peft::ConfigError);
  }
}

TEST_CASE("step() advances the step count once, however many slots are registered", "[optim]") {
  Eigen::MatrixXf W = random_matrix<Eigen::MatrixXf>(6, 5, 7);
  peft::LoRA<Eigen::MatrixXf> a(W), b(W);
  peft::AdamW<float> opt;
  opt.add(a);
  opt.add(b);
  REQUIRE(opt.step_count() == 0);
  opt.step();
  opt.step();
  REQUIRE(opt.step_count() == 2);
  for (const auto& slot : opt.slots()) REQUIRE(slot.steps == 2);
}

TEST_CASE("Registration errors leave the optimizer as it was", "[optim][errors]") {
  Eigen::MatrixXf W = random_matrix<Eigen::MatrixXf>(6, 5, 8);
  peft::LoRA<Eigen::MatrixXf> lora(W);
  peft::AdamW<float> opt;
  opt.add(lora);
  const Eigen::Index n = opt.num_parameters();

  SECTION("the same adapter twice") {
    REQUIRE_THAT(message_of([&] { opt.add(lora); }),
                 has_substring("peft::AdamW::add: 'lora_A' of the peft::LoRA of add() call 2 shares storage with "
                               "'lora_A' of the peft::LoRA of add() call 1, which is already registered"));
  }
  SECTION("a plain matrix whose gradient has another shape") {
    Eigen::MatrixXf h(2, 3), dh(3, 2);
    REQUIRE_THROWS_AS(opt.add("h", h, dh), peft::ShapeError);
    REQUIRE_THAT(message_of([&] { opt.add("h", h, dh); }), has_substring("the gradient is 3x2, expected 2x3"));
  }
  SECTION("a value that is its own gradient") {
    Eigen::MatrixXf h(2, 3);
    REQUIRE_THAT(message_of([&] { opt.add("h", h, h); }),
                 has_substring("'h' of the matrix of add() call 2: its value and gradient share storage"));
  }
  SECTION("bad options") {
    peft::ParamOptions o;
    o.lr_scale = -1.0;
    REQUIRE_THROWS_AS(opt.add(lora, o), peft::ConfigError);
    REQUIRE_THAT(message_of([&] { opt.add(lora, peft::lora_plus(0.0)); }), has_substring("lora_B_ratio is 0"));
  }
  REQUIRE(opt.num_parameters() == n);
  REQUIRE(opt.slots().size() == 2);

  // A failed add leaves the registered slots working.
  lora.flat_grads().setOnes();
  const Eigen::VectorXf before = lora.flat_values();
  opt.step();
  REQUIRE(!same_bits(before, lora.flat_values()));
}

TEST_CASE("Row-major plain matrices are stepped element by element with their gradients", "[optim]") {
  using RowMajor = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  RowMajor w = RowMajor::Zero(2, 3), dw(2, 3);
  dw << 1, 2, 3, 4, 5, 6;
  peft::SGDConfig cfg;
  cfg.lr = 1.0;
  peft::SGD<double> opt(cfg);
  opt.add("w", w, dw);
  opt.step();
  REQUIRE(w == -dw);
}

TEST_CASE("flat_parameters views every registered block's storage, and a name registered twice resumes in order",
          "[optim]") {
  Eigen::MatrixXf W1 = random_matrix<Eigen::MatrixXf>(6, 5, 1), W2 = random_matrix<Eigen::MatrixXf>(4, 6, 2);
  peft::LoRAConfig cfg;
  cfg.rank = 2;
  cfg.init = peft::LoRAInit::random;
  peft::LoRA<Eigen::MatrixXf> fc1(W1, cfg), fc2(W2, cfg);
  peft::AdamW<float> opt;
  opt.add(fc1);  // no prefixes: "lora_A", "lora_B" twice
  opt.add(fc2);
  const auto flat = opt.flat_parameters();
  REQUIRE(flat.size() == 4);
  REQUIRE(flat[2].slot->name == "lora_A");
  REQUIRE(flat[2].value.data() == fc2.A().data());  // views, not copies
  REQUIRE(flat[3].grad.data() == fc2.flat_grads().data() + fc2.A().size());
  REQUIRE(flat[3].value.size() == 4 * 2);

  for (int t = 0; t < 3; ++t) {
    fc1.flat_grads().setConstant(0.1f * float(t + 1));
    fc2.flat_grads().setConstant(-0.3f);
    opt.step();
  }
  const auto saved = opt.state_dict();
  peft::LoRA<Eigen::MatrixXf> fc1b(W1, cfg), fc2b(W2, cfg);
  peft::AdamW<float> resumed;
  resumed.add(fc1b);
  resumed.add(fc2b);
  resumed.load_state_dict(saved);
  const auto back = resumed.state_dict();
  for (std::size_t i = 0; i < saved.slots.size(); ++i)
    for (std::size_t k = 0; k < 2; ++k) REQUIRE(same_bits(back.slots[i].buffers[k], saved.slots[i].buffers[k]));
  // fc1's and fc2's moments differ, so a swapped match would show.
  REQUIRE_FALSE(same_bits(saved.slots[0].buffers[0], saved.slots[2].buffers[0].head(10)));
}

// ===================================================================================================
// Optimizer state by name

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
