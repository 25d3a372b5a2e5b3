// peft::SGD against hand-computed steps: plain, momentum, dampening, Nesterov, weight decay; config errors.
#include "support/catch.hpp"
#include "support/errors.hpp"

#include <peft/optim/sgd.hpp>

#include <vector>

using peft::test::has_substring;
using peft::test::message_of;

namespace {

// One scalar parameter p = 1 with a constant gradient 0.5, stepped `steps` times; returns p after each.
std::vector<double> run(const peft::SGDConfig& cfg, int steps) {
  Eigen::VectorXd p(1), g(1);
  p << 1.0;
  g << 0.5;
  peft::SGD<double> opt(cfg);
  opt.add("p", p, g);
  std::vector<double> out;
  for (int i = 0; i < steps; ++i) {
    opt.step();
    out.push_back(p(0));
  }
  return out;
}

}  // namespace

TEST_CASE("SGD steps match hand-computed values", "[sgd]") {
  peft::SGDConfig cfg;
  cfg.lr = 0.1;
  SECTION("plain: p -= lr g") {
    const auto p = run(cfg, 2);
    REQUIRE_THAT(p[0], WithinAbs(0.95, 1e-15));
    REQUIRE_THAT(p[1], WithinAbs(0.90, 1e-15));
  }
  SECTION("momentum 0.9: b1 = g, b2 = 0.9 b1 + g") {
    cfg.momentum = 0.9;
    const auto p = run(cfg, 2);
    REQUIRE_THAT(p[0], WithinAbs(0.95, 1e-15));
    REQUIRE_THAT(p[1], WithinAbs(0.95 - 0.1 * 0.95, 1e-15));
  }
  SECTION("dampening 0.1 applies from the second step on (PyTorch)") {
    cfg.momentum = 0.9;
    cfg.dampening = 0.1;
    const auto p = run(cfg, 2);
    REQUIRE_THAT(p[0], WithinAbs(0.95, 1e-15));
    REQUIRE_THAT(p[1], WithinAbs(0.95 - 0.1 * (0.45 + 0.9 * 0.5), 1e-15));
  }
  SECTION("Nesterov: p -= lr (g + mu b)") {
    cfg.momentum = 0.9;
    cfg.nesterov = true;
    const auto p = run(cfg, 2);
    REQUIRE_THAT(p[0], WithinAbs(1.0 - 0.1 * (0.5 + 0.45), 1e-15));
    REQUIRE_THAT(p[1], WithinAbs(0.905 - 0.1 * (0.5 + 0.9 * 0.95), 1e-15));
  }
  SECTION("weight decay is added to the gradient (coupled, L2)") {
    cfg.weight_decay = 0.1;
    const auto p = run(cfg, 2);
    REQUIRE_THAT(p[0], WithinAbs(1.0 - 0.1 * (0.5 + 0.1), 1e-15));
    REQUIRE_THAT(p[1], WithinAbs(0.94 - 0.1 * (0.5 + 0.094), 1e-15));
  }
}

TEST_CASE("SGD: weight decay only where the slot allows it, and the momentum buffer is exposed", "[sgd]") {
  peft::SGDConfig cfg;
  cfg.lr = 0.1;
  cfg.momentum = 0.5;
  cfg.weight_decay = 0.5;
  peft::SGD<float> opt(cfg);
  Eigen::MatrixXf w = Eigen::MatrixXf::Constant(2, 3, 2.0f), dw = Eigen::MatrixXf::Constant(2, 3, 1.0f);
  Eigen::VectorXf b = Eigen::VectorXf::Constant(2, 2.0f), db = Eigen::VectorXf::Constant(2, 1.0f);
  opt.add("w", w, dw);
  peft::ParamOptions no_decay;
  no_decay.weight_decay = false;
  opt.add("b", b, db, no_decay);
  opt.step();
  REQUIRE_THAT(w(1, 2), WithinAbs(2.0 - 0.1 * (1.0 + 0.5 * 2.0), 1e-6));
  REQUIRE_THAT(b(1), WithinAbs(2.0 - 0.1 * 1.0, 1e-6));
  REQUIRE_THAT(opt.momentum_buffer(0)(5), WithinAbs(2.0, 1e-6));
  REQUIRE_THAT(opt.momentum_buffer(1)(0), WithinAbs(1.0, 1e-6));
  REQUIRE(dw(0, 0) == 1.0f);  // step() never writes gradients
}

TEST_CASE("SGD: invalid configurations are refused with a clear message", "[sgd][errors]") {
  auto bad = [](auto edit) {
    peft::SGDConfig cfg;
    edit(cfg);
    return message_of([&] { peft::SGD<double> opt(cfg); });
  };
  REQUIRE_THROWS_AS(peft::SGD<double>([] { peft::SGDConfig c; c.lr = -1; return c; }()), peft::ConfigError);
  REQUIRE_THAT(bad([](auto& c) { c.lr = -1; }), has_substring("peft::SGD::constructor: lr is -1"));
  REQUIRE_THAT(bad([](auto& c) { c.momentum = 1.0; }), has_substring("momentum is 1"));
  REQUIRE_THAT(bad([](auto& c) { c.dampening = 1.5; }), has_substring("dampening is 1.5"));
  REQUIRE_THAT(bad([](auto& c) { c.weight_decay = -0.1; }), has_substring("weight_decay is -0.1"));
  REQUIRE_THAT(bad([](auto& c) { c.nesterov = true; }), has_substring("nesterov needs momentum > 0"));
  REQUIRE_THAT(bad([](auto& c) {
                 c.nesterov = true;
                 c.momentum = 0.9;
                 c.dampening = 0.1;
               }),
               has_substring("dampening = 0"));
}
