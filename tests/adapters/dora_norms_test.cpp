// DoRA's start and its row norms (docs/math.md, DoRA): the magnitude starts at the norms, so the layer
// starts as the base (or as the LoRA of the same factors); zero rows; the factored norms against a
// materialised reference, including rows that s B A cancels to far below their scale.
#include "adapters/dora_support.hpp"
#include "support/catch.hpp"
#include "support/matrices.hpp"

#include <peft/adapters/dora.hpp>
#include <peft/adapters/lora.hpp>

#include <cmath>
#include <type_traits>

using namespace peft::test::dora;  // NOLINT: this test's own helpers
using peft::test::eps;
using peft::test::MatrixXd;
using peft::test::MatrixXf;
using peft::test::random_matrix;
using peft::test::RowMajorXd;
using peft::test::RowMajorXf;

TEMPLATE_TEST_CASE("DoRA magnitude starts at the row norms of W0 so the gain is exactly one", "[dora]", PEFT_TEST_EVERY_MATRIX) {
  using Scalar = typename TestType::Scalar;
  Layer<TestType> l;
  for (auto init : {peft::LoRAInit::kaiming_uniform, peft::LoRAInit::gaussian}) {
    peft::DoRAConfig cfg;
    cfg.rank = 4;
    cfg.alpha = 16;
    cfg.init = init;
    peft::DoRA<TestType> dora(l.W, l.b, cfg);
    REQUIRE(dora.B().isZero(0));
    REQUIRE(!dora.A().isZero(0));
    // m = n exactly, so the gain is exactly 1; and m is the row norms of W0.
    REQUIRE(dora.magnitude() == dora.norms());
    const Eigen::VectorXd w0_norms = l.W.template cast<double>().rowwise().norm();
    REQUIRE(((dora.magnitude().template cast<double>() - w0_norms).array().abs() <=
             4 * kIn * eps<Scalar>() * w0_norms.array()).all());
    REQUIRE(dora.delta_weight().isZero(0));
    typename peft::DoRA<TestType>::Cache cache;
    dora.forward(l.X, cache);
    REQUIRE((cache.g.array() == Scalar(1)).all());
  }
}

TEST_CASE("DoRA keeps a zero row of W0 finite: its gain is 0 and its output the bias") {
  Layer<MatrixXd> l;
  l.W.row(3).setZero();  // a pruned unit
  peft::DoRA<MatrixXd> dora(l.W, l.b, peft::DoRAConfig{});
  REQUIRE(dora.magnitude()(3) == 0.0);
  REQUIRE(dora.norms()(3) == 0.0);
  const Eigen::MatrixXd Y = dora.forward(l.X);
  REQUIRE(Y.allFinite());
  REQUIRE((Y.row(3).array() == l.b(3)).all());
  peft::DoRA<MatrixXd>::Cache cache;
  dora.forward(l.X, cache);
  const Eigen::MatrixXd dX = dora.backward(random_matrix<Eigen::MatrixXd>(kOut, kTokens, 5), cache);
  REQUIRE(dX.allFinite());
  REQUIRE(dora.flat_grads().allFinite());
  REQUIRE(dora.parameters()[2].grad(3) == 0.0);
}

TEST_CASE("DoRA magnitude starts at the row norms of W0 plus s B A as PEFT so DoRA starts as LoRA") {
  Layer<MatrixXd> l;
  const peft::DoRA<MatrixXd> dora(l.W, l.b, random_config());
  const peft::LoRA<MatrixXd> lora(l.W, l.b, random_config());  // the same seed: the same A and B
  REQUIRE(dora.A() == lora.A());
  REQUIRE(dora.B() == lora.B());
  const Reference ref = reference(dora, l.W);
  REQUIRE((ref.m - ref.n).cwiseAbs().maxCoeff() <= 1e-14 * ref.n.maxCoeff());
  REQUIRE((dora.forward(l.X) - lora.forward(l.X)).cwiseAbs().maxCoeff() < 1e-13);
}

TEST_CASE("DoRA scaling follows the LoRA config and detach_norm defaults to true") {
  Eigen::MatrixXd W = random_matrix<Eigen::MatrixXd>(4, 4, 1);
  peft::DoRAConfig cfg;
  REQUIRE(cfg.detach_norm);
  cfg.rank = 4;
  cfg.alpha = 8;
  REQUIRE(peft::DoRA<Eigen::MatrixXd>(W, cfg).scaling() == 2.0);
  cfg.use_rslora = true;
  REQUIRE(peft::DoRA<Eigen::MatrixXd>(W, cfg).scaling() == 4.0);
  REQUIRE(peft::DoRA<Eigen::MatrixXd>(W, cfg).config().use_rslora);
  REQUIRE(peft::DoRA<Eigen::MatrixXd>(W, cfg).rank() == 4);
  // A rank above min(d_out, d_in) is accepted, as LoRA's (docs/math.md, LoRA, rank).
  cfg.rank = 6;
  REQUIRE(peft::DoRA<Eigen::MatrixXd>(W, cfg).A().rows() == 6);
}

TEMPLATE_TEST_CASE("DoRA factored norms match a materialised reference even where s B A cancels W0", "[dora]",
                   PEFT_TEST_EVERY_MATRIX) {
  using Scalar = typename TestType::Scalar;
  const Eigen::Index d_out = 12, d_in = 600, r = 3;  // a recomputed row is formed in 3 chunks of <= 256
  const peft::DoRAConfig cfg = random_config(r, 6.0);
  // A row cancelled to 1e-7 of its scale in double (1e-3 in float, whose rounding is 6e-8): its
  // factored n² is positive but has lost most of its digits, so it must be recomputed although it is
  // not negative.
  const double extreme = std::is_same<Scalar, double>::value ? 1e-7 : 1e-3;
  TestType W = random_matrix<TestType>(d_out, d_in, 3);
  {
    // Read the factors this config draws, then build rows of W0 that s B A (nearly) cancels.
    const peft::DoRA<TestType> probe(W, cfg);
    const Eigen::MatrixXd sBA = probe.scaling() * probe.B().template cast<double>() * probe.A().template cast<double>();
    const Eigen::MatrixXd u = random_matrix<Eigen::MatrixXd>(d_out, d_in, 4);
    W.row(0) = (-sBA.row(0)).template cast<Scalar>();                        // V_0 = rounding only
    W.row(1) = (-sBA.row(1) + 1e-3 * u.row(1)).template cast<Scalar>();      // |V_1| ~ 1e-3 |W0_1|
    W.row(2) = (-1.01 * sBA.row(2)).template cast<Scalar>();                 // |V_2| ~ 1e-2 |W0_2|
    W.row(3) = (-sBA.row(3) + 1e-5 * u.row(3)).template cast<Scalar>();
    W.row(4).setZero();                                                       // B_4 = 0 below: V_4 = 0
    W.row(5) = (-sBA.row(5) + extreme * sBA.row(5).norm() / u.row(5).norm() * u.row(5)).template cast<Scalar>();
  }
  peft::DoRA<TestType> dora(W, cfg);
  dora.B().row(4).setZero();
  const Eigen::VectorXd n = dora.norms().template cast<double>();
  const Reference ref = reference(dora, W);

  REQUIRE(n.allFinite());
  REQUIRE((n.array() >= 0).all());
  REQUIRE(n(4) == 0.0);
  // Accurate to a few (d_in + r) eps of the scale of the terms, ||W0_i|| + |s| sum_j |B_ij| ||A_j||,
  // in every row: what a materialised norm achieves. The factored formula alone (clamped) is off by
  // about sqrt(eps) of that scale where the terms cancel, which this bound rejects.
  const Eigen::VectorXd a = ref.A.rowwise().norm();
  const Eigen::VectorXd scale = W.template cast<double>().rowwise().norm() + std::abs(ref.s) * ref.B.cwiseAbs() * a;
  const double tol = 16.0 * double(d_in + r + 2) * eps<Scalar>();
  for (Eigen::Index i = 0; i < d_out; ++i) {
    INFO("row " << i << ": n " << n(i) << ", materialised " << ref.n(i) << ", scale " << scale(i));
    REQUIRE(std::abs(n(i) - ref.n(i)) <= tol * scale(i));
  }
  REQUIRE(std::abs(n(1) - ref.n(1)) <= 1e-2 * ref.n(1));  // a cancelling row, still accurate relatively
  REQUIRE(ref.n(5) <= 2 * extreme * scale(5));             // the extreme row is as extreme as intended
  REQUIRE(std::abs(n(5) - ref.n(5)) <= 1e-2 * ref.n(5));

  // Forward stays finite; the zero row outputs exactly 0 (no bias here).
  const peft::MatrixX<Scalar> X = random_matrix<peft::MatrixX<Scalar>>(d_in, 3, 6);
  const peft::MatrixX<Scalar> Y = dora.forward(X);
  REQUIRE(Y.allFinite());
  REQUIRE(Y.row(4).isZero(0));
}

TEMPLATE_TEST_CASE("DoRA training forward equals inference forward in both gradient modes", "[dora]", MatrixXf,
                   RowMajorXd) {
  using Scalar = typename TestType::Scalar;
  Layer<TestType> l;
  peft::DoRA<TestType> dora(l.W, l.b, random_config());
  spread_magnitude(dora, 7);
  const Reference ref = reference(dora, l.W);
  for (bool detach : {true, false}) {
    peft::DoRA<TestType> training(l.W, l.b, random_config(3, 6.0, detach));
    training.flat_values() = dora.flat_values();
    typename peft::DoRA<TestType>::Cache cache;
    REQUIRE(training.forward(l.X, cache) == dora.forward(l.X));
    REQUIRE((cache.n.template cast<double>() - ref.n).cwiseAbs().maxCoeff() <= 64 * eps<Scalar>() * ref.n.maxCoeff());
  }
}
