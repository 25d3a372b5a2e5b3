// What every optimizer shares (peft::OptimizerBase): registering adapters and plain matrices, LoRA+,
// zero_grad, clipping by global norm, the step count, and the errors, with the adapters' real buffers.
#include "support/catch.hpp"
#include "support/errors.hpp"
#include "support/matrices.hpp"

#include <peft/adapters/dora.hpp>
#include <peft/adapters/lora.hpp>
#include <peft/adapters/ssf.hpp>
#include <peft/adapters/standalone_ssf.hpp>
#include <peft/optim/adamw.hpp>
#include <peft/optim/sgd.hpp>

#include <cmath>
#include <limits>
#include <string>

using peft::test::has_substring;
using peft::test::message_of;
using peft::test::random_matrix;
using peft::test::same_bits;

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
