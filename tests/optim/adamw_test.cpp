// peft::AdamW against a textbook AdamW written out here in long double, the first-step identity, decoupled
// weight decay, per-slot bias correction, float against double; config errors.
#include "support/catch.hpp"
#include "support/errors.hpp"
#include "support/matrices.hpp"

#include <peft/adapters/lora.hpp>
#include <peft/optim/adamw.hpp>

#include <cmath>
#include <vector>

using peft::test::has_substring;
using peft::test::message_of;
using peft::test::random_matrix;

namespace {

// Loshchilov & Hutter's AdamW with PyTorch's conventions, one coordinate at a time, in long double.
struct ReferenceAdamW {
  long double lr, b1, b2, eps, wd;
  std::vector<long double> m, v;
  long t = 0;

  void step(std::vector<long double>& p, const std::vector<long double>& g) {
    ++t;
    m.resize(p.size(), 0.0L);
    v.resize(p.size(), 0.0L);
    for (std::size_t i = 0; i < p.size(); ++i) {
      p[i] *= 1.0L - lr * wd;
      m[i] = b1 * m[i] + (1.0L - b1) * g[i];
      v[i] = b2 * v[i] + (1.0L - b2) * g[i] * g[i];
      const long double m_hat = m[i] / (1.0L - std::pow(b1, static_cast<long double>(t)));
      const long double v_hat = v[i] / (1.0L - std::pow(b2, static_cast<long double>(t)));
      p[i] -= lr * m_hat / (std::sqrt(v_hat) + eps);
    }
  }
};

}  // namespace

TEMPLATE_TEST_CASE("AdamW follows the textbook update over several steps", "[adamw]", float, double) {
  using Scalar = TestType;
  peft::AdamWConfig cfg;
  cfg.lr = 0.01;
  cfg.beta1 = 0.8;
  cfg.beta2 = 0.95;
  cfg.eps = 1e-6;
  cfg.weight_decay = 0.1;
  peft::AdamW<Scalar> opt(cfg);

  Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic> w = random_matrix<Eigen::MatrixXd>(3, 4, 1).cast<Scalar>();
  Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic> dw(3, 4);
  opt.add("w", w, dw);

  ReferenceAdamW ref{0.01L, 0.8L, 0.95L, 1e-6L, 0.1L, {}, {}};
  std::vector<long double> p(w.data(), w.data() + w.size());
  const double tol = std::is_same<Scalar, double>::value ? 1e-14 : 2e-6;
  for (int step = 0; step < 5; ++step) {
    dw = random_matrix<Eigen::MatrixXd>(3, 4, 10 + step).cast<Scalar>();
    std::vector<long double> g(dw.data(), dw.data() + dw.size());
    ref.step(p, g);
    opt.step();
    for (Eigen::Index i = 0; i < w.size(); ++i)
      REQUIRE_THAT(static_cast<double>(w.data()[i]), WithinAbs(static_cast<double>(p[i]), tol));
  }
  REQUIRE(opt.step_count() == 5);
}

TEST_CASE("AdamW's first step moves each coordinate by lr g / (|g| + eps)", "[adamw]") {
  peft::AdamWConfig cfg;
  cfg.lr = 0.05;
  cfg.weight_decay = 0.0;
  peft::AdamW<double> opt(cfg);
  Eigen::VectorXd p = Eigen::VectorXd::Zero(3), g(3);
  g << 2.0, -1e-3, 0.0;
  opt.add("p", p, g);
  opt.step();
  REQUIRE_THAT(p(0), WithinAbs(-0.05 * 2.0 / (2.0 + 1e-8), 1e-15));
  REQUIRE_THAT(p(1), WithinAbs(0.05 * 1e-3 / (1e-3 + 1e-8), 1e-15));
  REQUIRE(p(2) == 0.0);
  REQUIRE_THAT(opt.exp_avg(0)(0), WithinAbs(0.1 * 2.0, 1e-15));
  REQUIRE_THAT(opt.exp_avg_sq(0)(0), WithinAbs(0.001 * 4.0, 1e-15));
}

TEST_CASE("AdamW's weight decay is decoupled and skipped for exempt slots", "[adamw]") {
  peft::AdamWConfig cfg;
  cfg.lr = 0.1;
  cfg.weight_decay = 0.5;
  peft::AdamW<double> opt(cfg);
  Eigen::VectorXd a = Eigen::VectorXd::Constant(2, 3.0), da = Eigen::VectorXd::Zero(2);
  Eigen::VectorXd b = Eigen::VectorXd::Constant(2, 3.0), db = Eigen::VectorXd::Zero(2);
  opt.add("a", a, da);
  peft::ParamOptions exempt;
  exempt.weight_decay = false;
  opt.add("b", b, db, exempt);
  opt.step();  // zero gradient: only the decay moves a, and not through the moments
  REQUIRE_THAT(a(0), WithinAbs(3.0 * (1.0 - 0.1 * 0.5), 1e-15));
  REQUIRE(b(0) == 3.0);
}

TEST_CASE("AdamW decays each slot with its effective learning rate after set_lr, lr_scale and LoRA+", "[adamw]") {
  peft::AdamWConfig cfg;
  cfg.lr = 0.1;
  cfg.weight_decay = 0.5;
  peft::AdamW<double> opt(cfg);
  Eigen::VectorXd a = Eigen::VectorXd::Constant(2, 3.0), da = Eigen::VectorXd::Zero(2);
  Eigen::VectorXd h = Eigen::VectorXd::Constant(2, 3.0), dh = Eigen::VectorXd::Zero(2);
  opt.add("a", a, da);
  peft::ParamOptions half;
  half.lr_scale = 0.5;
  opt.add("h", h, dh, half);
  Eigen::MatrixXd W = Eigen::MatrixXd::Ones(4, 3);
  peft::LoRAConfig lcfg;
  lcfg.rank = 2;
  lcfg.init = peft::LoRAInit::random;
  peft::LoRA<Eigen::MatrixXd> lora(W, lcfg);
  const Eigen::VectorXd lora_before = lora.flat_values();
  opt.add(lora, peft::lora_plus(4.0));
  opt.set_lr(0.02);  // the learning rate of this step, not the configured one
  opt.step();        // zero gradients: only the decoupled decay moves the parameters
  REQUIRE_THAT(a(0), WithinAbs(3.0 * (1.0 - 0.02 * 0.5), 1e-15));
  REQUIRE_THAT(h(0), WithinAbs(3.0 * (1.0 - 0.02 * 0.5 * 0.5), 1e-15));
  const Eigen::Index n_a = lcfg.rank * 3;
  REQUIRE((lora.flat_values().head(n_a) - lora_before.head(n_a) * (1.0 - 0.02 * 0.5)).cwiseAbs().maxCoeff() < 1e-15);
  REQUIRE((lora.flat_values().tail(8) - lora_before.tail(8) * (1.0 - 0.02 * 4.0 * 0.5)).cwiseAbs().maxCoeff() < 1e-15);
}

TEST_CASE("AdamW: a slot registered later starts its own bias correction", "[adamw]") {
  peft::AdamWConfig cfg;
  cfg.lr = 0.01;
  cfg.weight_decay = 0.0;
  peft::AdamW<double> opt(cfg);
  Eigen::VectorXd a = Eigen::VectorXd::Zero(1), da = Eigen::VectorXd::Ones(1);
  Eigen::VectorXd b = Eigen::VectorXd::Zero(1), db = Eigen::VectorXd::Ones(1);
  opt.add("a", a, da);
  for (int i = 0; i < 3; ++i) opt.step();
  opt.add("b", b, db);
  opt.step();
  REQUIRE(opt.step_count() == 4);
  REQUIRE(opt.slots()[0].steps == 4);
  REQUIRE(opt.slots()[1].steps == 1);
  REQUIRE_THAT(b(0), WithinAbs(-0.01 / (1.0 + 1e-8), 1e-15));  // a full first step, not a damped one
  REQUIRE(opt.slots()[1].offset == 1);
  REQUIRE(opt.num_parameters() == 2);
}

TEST_CASE("AdamW: invalid configurations are refused with a clear message", "[adamw][errors]") {
  auto bad = [](auto edit) {
    peft::AdamWConfig cfg;
    edit(cfg);
    return message_of([&] { peft::AdamW<float> opt(cfg); });
  };
  REQUIRE_THAT(bad([](auto& c) { c.lr = std::nan(""); }), has_substring("peft::AdamW::constructor: lr is nan"));
  REQUIRE_THAT(bad([](auto& c) { c.beta1 = 1.0; }), has_substring("beta1 is 1"));
  REQUIRE_THAT(bad([](auto& c) { c.beta2 = -0.1; }), has_substring("beta2 is -0.1"));
  REQUIRE_THAT(bad([](auto& c) { c.eps = 0.0; }), has_substring("eps is 0"));
  REQUIRE_THAT(bad([](auto& c) { c.weight_decay = -1; }), has_substring("weight_decay is -1"));
  peft::AdamW<float> opt;
  REQUIRE_THROWS_AS(opt.set_lr(-0.5), peft::ConfigError);
  REQUIRE(opt.lr() == 1e-3);
  opt.set_lr(0.25);
  REQUIRE(opt.lr() == 0.25);
}
