// peft::SSF and peft::StandaloneSSF against MATH.md's SSF section: init, forward, gradients, merge and
// the folds, round trips, errors.
#include "support/catch.hpp"
#include "support/errors.hpp"
#include "support/grad_check.hpp"
#include "support/matrices.hpp"

#include <peft/adapters/ssf.hpp>

#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <utility>

using peft::test::eps;
using peft::test::message_of;
using peft::test::same_bits;
using peft::test::has_substring;
using peft::test::MatrixXd;
using peft::test::MatrixXf;
using peft::test::random_matrix;
using peft::test::RowMajorXd;
using peft::test::RowMajorXf;

namespace {

constexpr Eigen::Index kOut = 6, kIn = 5, kTokens = 4;

template <class M>
struct Layer {
  using Scalar = typename M::Scalar;
  M W = random_matrix<M>(kOut, kIn, 31);
  peft::VectorX<Scalar> b = random_matrix<peft::MatrixX<Scalar>>(kOut, 1, 32);
  peft::MatrixX<Scalar> X = random_matrix<peft::MatrixX<Scalar>>(kIn, kTokens, 33);
};

// A visibly non-identity SSF: γ ~ N(1, 0.3²), β ~ N(0, 0.3²).
peft::SSFConfig strong_config(std::uint64_t seed = 5) {
  peft::SSFConfig cfg;
  cfg.init_std = 0.3;
  cfg.seed = seed;
  return cfg;
}

}  // namespace

TEMPLATE_TEST_CASE("SSF with the identity init starts equal to the base layer", "[ssf]", MatrixXf, MatrixXd,
                   RowMajorXf, RowMajorXd) {
  using Scalar = typename TestType::Scalar;
  Layer<TestType> l;
  peft::SSFConfig cfg;
  cfg.init = peft::SSFInit::identity;
  const peft::SSF<TestType> ssf(l.W, l.b, cfg);
  peft::MatrixX<Scalar> base = l.W * l.X;
  base.colwise() += l.b;
  REQUIRE(ssf.forward(l.X) == base);
  REQUIRE(ssf.delta_weight().isZero(0));
  REQUIRE(ssf.delta_bias().isZero(0));
}

TEST_CASE("SSF official init draws scale around one and shift around zero") {
  Eigen::MatrixXd W = Eigen::MatrixXd::Ones(4000, 2);
  peft::SSFConfig cfg;
  cfg.seed = 3;
  const peft::SSF<Eigen::MatrixXd> ssf(W, cfg);
  const Eigen::VectorXd g = ssf.scale(), beta = ssf.shift();
  REQUIRE_THAT(g.mean(), WithinAbs(1.0, 0.002));
  REQUIRE_THAT(std::sqrt((g.array() - g.mean()).square().mean()), WithinRel(0.02, 0.05));
  REQUIRE_THAT(beta.mean(), WithinAbs(0.0, 0.002));
  REQUIRE_THAT(std::sqrt(beta.array().square().mean()), WithinRel(0.02, 0.05));
  const peft::SSF<Eigen::MatrixXd> same(W, cfg);
  REQUIRE(same.flat_values() == ssf.flat_values());
  auto names = ssf.parameters();
  REQUIRE(std::string(names[0].name) == "ssf_scale");
  REQUIRE(std::string(names[1].name) == "ssf_shift");
  REQUIRE(names[0].value.rows() == 4000);
  REQUIRE(names[1].value.cols() == 1);
}

TEMPLATE_TEST_CASE("SSF forward equals the formula", "[ssf]", MatrixXf, MatrixXd, RowMajorXf, RowMajorXd) {
  using Scalar = typename TestType::Scalar;
  Layer<TestType> l;
  peft::SSF<TestType> ssf(l.W, l.b, strong_config());
  const Eigen::VectorXd g = ssf.scale().template cast<double>(), beta = ssf.shift().template cast<double>();
  Eigen::MatrixXd Z = l.W.template cast<double>() * l.X.template cast<double>();
  Z.colwise() += l.b.template cast<double>();
  Eigen::MatrixXd ref = g.asDiagonal() * Z;
  ref.colwise() += beta;
  const double tol = 16 * eps<Scalar>() * (1 + Z.cwiseAbs().maxCoeff()) * (1 + g.cwiseAbs().maxCoeff());
  REQUIRE((ssf.forward(l.X).template cast<double>() - ref).cwiseAbs().maxCoeff() <= tol);
  // The training forward computes diag(γ)(W X + b) + β; inference fuses the bias into the shift,
  // diag(γ) W X + (γ ⊙ b + β): equal up to rounding.
  typename peft::SSF<TestType>::Cache cache;
  REQUIRE((ssf.forward(l.X, cache) - ssf.forward(l.X)).cwiseAbs().maxCoeff() <= 4 * eps<Scalar>() * (1 + Z.cwiseAbs().maxCoeff()) * (1 + g.cwiseAbs().maxCoeff()));
}

TEST_CASE("SSF gradients match central differences in double") {
  for (bool bias : {true, false}) {
    Layer<MatrixXd> cl;
    Layer<RowMajorXd> rl;
    const Eigen::MatrixXd R = random_matrix<Eigen::MatrixXd>(kOut, kTokens, 41);
    const auto col = bias ? peft::SSF<MatrixXd>(cl.W, cl.b, strong_config()) : peft::SSF<MatrixXd>(cl.W, strong_config());
    const auto row =
        bias ? peft::SSF<RowMajorXd>(rl.W, rl.b, strong_config()) : peft::SSF<RowMajorXd>(rl.W, strong_config());
    for (const auto& errors : {peft::test::check_gradients(col, cl.X, R), peft::test::check_gradients(row, rl.X, R)}) {
      REQUIRE(errors.size() == 3);
      for (const auto& e : errors) {
        INFO("bias " << bias << ": d" << e.name << " relative error " << e.relative);
        REQUIRE(e.relative < 1e-6);
      }
    }
  }
}

TEMPLATE_TEST_CASE("SSF float and double gradients agree", "[ssf]", MatrixXf, RowMajorXf) {
  using Twin = peft::test::rebind_t<TestType, double>;
  Layer<TestType> l;
  peft::SSF<TestType> ssf(l.W, l.b, strong_config());
  Twin Wd = l.W.template cast<double>();
  Eigen::VectorXd bd = l.b.template cast<double>();
  peft::SSF<Twin> twin(Wd, bd, strong_config());
  twin.flat_values() = ssf.flat_values().template cast<double>();
  const Eigen::MatrixXf G = random_matrix<Eigen::MatrixXf>(kOut, kTokens, 42);
  typename peft::SSF<TestType>::Cache cache;
  typename peft::SSF<Twin>::Cache cache_d;
  ssf.forward(l.X, cache);
  twin.forward(l.X.template cast<double>(), cache_d);
  const Eigen::MatrixXf dX = ssf.backward(G, cache);
  const Eigen::MatrixXd dXd = twin.backward(G.cast<double>(), cache_d);
  REQUIRE((dX.cast<double>() - dXd).norm() <= 1e-5 * dXd.norm());
  REQUIRE((ssf.flat_grads().template cast<double>() - twin.flat_grads()).norm() <= 1e-5 * twin.flat_grads().norm());
}

TEMPLATE_TEST_CASE("SSF merged output equals unmerged output", "[ssf]", MatrixXf, MatrixXd, RowMajorXf, RowMajorXd) {
  using Scalar = typename TestType::Scalar;
  Layer<TestType> l;
  peft::SSF<TestType> ssf(l.W, l.b, strong_config());
  const auto Y = ssf.forward(l.X);
  const TestType W0 = l.W;
  const peft::VectorX<Scalar> b0 = l.b;
  const TestType expected_W = l.W + ssf.delta_weight();
  const peft::VectorX<Scalar> expected_b = l.b + ssf.delta_bias();
  ssf.merge();
  REQUIRE(ssf.is_merged());
  REQUIRE((l.W - expected_W).cwiseAbs().maxCoeff() <= 4 * eps<Scalar>() * expected_W.cwiseAbs().maxCoeff());
  REQUIRE((l.b - expected_b).cwiseAbs().maxCoeff() <= 4 * eps<Scalar>() * (expected_b.cwiseAbs().maxCoeff() + 1));
  peft::MatrixX<Scalar> base = l.W * l.X;
  base.colwise() += l.b;
  REQUIRE(ssf.forward(l.X) == base);  // merged: exactly the base product of the merged layer
  REQUIRE((Y - base).cwiseAbs().maxCoeff() <= 32 * eps<Scalar>() * (1 + Y.cwiseAbs().maxCoeff()));
  // delta_weight and delta_bias mean the same while merged (they recover W0 and b0 from the merged layer).
  const TestType dW_merged = ssf.delta_weight();
  const peft::VectorX<Scalar> db_merged = ssf.delta_bias();
  REQUIRE((dW_merged - (expected_W - W0)).cwiseAbs().maxCoeff() <= 8 * eps<Scalar>() * (1 + expected_W.cwiseAbs().maxCoeff()));
  REQUIRE((db_merged - (expected_b - b0)).cwiseAbs().maxCoeff() <= 8 * eps<Scalar>() * (1 + expected_b.cwiseAbs().maxCoeff()));
}

TEMPLATE_TEST_CASE("SSF unmerge restores W and b within the round-trip bound", "[ssf]", MatrixXf, MatrixXd,
                   RowMajorXf, RowMajorXd) {
  using Scalar = typename TestType::Scalar;
  TestType W = random_matrix<TestType>(40, 30, 7);
  peft::VectorX<Scalar> b = random_matrix<peft::MatrixX<Scalar>>(40, 1, 8);
  const TestType W0 = W;
  const peft::VectorX<Scalar> b0 = b;
  peft::SSF<TestType> ssf(W, b, strong_config());
  const peft::VectorX<Scalar> g = ssf.scale(), beta = ssf.shift();
  ssf.merge();
  for (auto& p : ssf.parameters()) p.value.setConstant(Scalar(7));  // changed while merged: irrelevant
  ssf.unmerge();
  const Scalar e = Scalar(eps<Scalar>());
  // W: one multiplication and one division by γ_i: |W - W0| <= 2 eps |W0| (MATH.md's bound, ΔW aside).
  REQUIRE(((W - W0).cwiseAbs().array() <= 2 * e * W0.cwiseAbs().array()).all());
  // b: b' = fl(fl(γ b) + β), then fl(fl(b' - β) / γ): |b - b0| <= 4 eps |b0| + 2 eps |β / γ|.
  const peft::VectorX<Scalar> bound = 4 * e * b0.cwiseAbs() + 2 * e * beta.cwiseQuotient(g).cwiseAbs();
  REQUIRE(((b - b0).cwiseAbs().array() <= bound.array()).all());
}

TEST_CASE("SSF refuses to merge without a bias and shows how to give it one") {
  Layer<MatrixXf> l;
  const MatrixXf W0 = l.W;
  peft::SSF<MatrixXf> no_bias(l.W, strong_config());
  REQUIRE_THROWS_AS(no_bias.merge(), peft::ShapeError);
  REQUIRE_THAT(message_of([&] { no_bias.merge(); }), has_substring("peft::SSF::merge: the layer has no bias"));
  REQUIRE(!no_bias.is_merged());
  REQUIRE(l.W == W0);
  // The documented way: a zero bias to merge into.
  Eigen::VectorXf zero_bias = Eigen::VectorXf::Zero(kOut);
  peft::SSF<MatrixXf> with_bias(l.W, zero_bias, strong_config());
  const Eigen::MatrixXf Y = with_bias.forward(l.X);
  with_bias.merge();
  REQUIRE((with_bias.forward(l.X) - Y).cwiseAbs().maxCoeff() < 1e-5f);
  REQUIRE(zero_bias == Eigen::VectorXf(with_bias.shift()));
}

TEMPLATE_TEST_CASE("SSF refuses merges that could not be undone and names the feature", "[ssf]", MatrixXf,
                   RowMajorXd) {
  using Scalar = typename TestType::Scalar;
  Layer<TestType> l;
  l.W(2, 0) = Scalar(3);  // so that γ_2 = max overflows
  const TestType W0 = l.W;
  const peft::VectorX<Scalar> b0 = l.b;
  peft::SSF<TestType> ssf(l.W, l.b, strong_config());
  const auto refused = [&](const char* text) {
    REQUIRE_THROWS_AS(ssf.merge(), peft::NumericalError);
    REQUIRE_THAT(message_of([&] { ssf.merge(); }), has_substring(text));
    REQUIRE(!ssf.is_merged());
    REQUIRE(l.W == W0);
    REQUIRE(l.b == b0);
  };
  ssf.scale()(2, 0) = Scalar(0);
  refused("peft::SSF::merge: feature 2 has scale 0: too small to divide by");
  ssf.scale()(2, 0) = std::numeric_limits<Scalar>::quiet_NaN();
  refused("feature 2 has scale nan");
  ssf.scale()(2, 0) = std::numeric_limits<Scalar>::denorm_min();  // γ W underflows: unmerge could not recover W
  refused("would underflow");
  ssf.scale()(2, 0) = std::numeric_limits<Scalar>::max();  // γ W overflows
  refused("would overflow");
  ssf.scale()(2, 0) = Scalar(1);
  ssf.shift()(4, 0) = std::numeric_limits<Scalar>::infinity();
  REQUIRE_THROWS_AS(ssf.merge(), peft::NumericalError);
  REQUIRE(l.W == W0);
  REQUIRE(l.b == b0);
}

TEST_CASE("SSF merges what it can undo and refuses a shift that would swamp the bias") {
  // A subnormal weight scaled up into the normal range: accepted, and unmerge brings it back.
  Eigen::MatrixXf W = Eigen::MatrixXf::Ones(2, 2);
  W(0, 0) = 1e-39f;
  Eigen::VectorXf b = Eigen::VectorXf::Ones(2);
  peft::SSF<Eigen::MatrixXf> up(W, b, strong_config());
  up.scale().setConstant(100.0f);
  up.shift().setZero();
  up.merge();
  up.unmerge();
  REQUIRE(std::abs(W(0, 0) - 1e-39f) <= std::numeric_limits<float>::denorm_min() * 2);

  // γ = 1e-8, β = 1, b = 1: γ b + β rounds to β and b would come back as 0, all digits lost: refused.
  W.setOnes();
  peft::SSF<Eigen::MatrixXf> swamp(W, b, strong_config());
  swamp.scale().setConstant(1e-8f);
  swamp.shift().setOnes();
  REQUIRE_THROWS_AS(swamp.merge(), peft::NumericalError);
  REQUIRE_THAT(message_of([&] { swamp.merge(); }), has_substring("b(0) = 1 could not be recovered on unmerge"));
  REQUIRE(W == Eigen::MatrixXf::Ones(2, 2));
  REQUIRE(b == Eigen::VectorXf::Ones(2));

  // A feature the training nearly switched off (γ = 0.036, β = 0.49 on b = 0.0175, from the demo): the
  // round trip misses b by more than 8 ε (|b| + |Δb|) but keeps most of its digits: accepted, and
  // unmerge restores b within 4 ε |b| + 2 ε |β / γ|.
  Eigen::VectorXf small_b = Eigen::VectorXf::Constant(2, 0.0174701f);
  peft::SSF<Eigen::MatrixXf> off(W, small_b, strong_config());
  off.scale().setConstant(0.036f);
  off.shift().setConstant(0.49f);
  bool missed_tight_bound = false;
  for (int k = 0; k < 64 && !missed_tight_bound; ++k) {  // find a b whose round trip is inexact
    const float bk = 0.0174701f + float(k) * 1e-7f;
    const float rt = (0.036f * bk + 0.49f - 0.49f) / 0.036f;
    missed_tight_bound = std::abs(rt - bk) > 8 * float(eps<float>()) * (bk + std::abs(0.036f * bk + 0.49f - bk));
    small_b.setConstant(bk);
  }
  REQUIRE(missed_tight_bound);  // the case that used to be refused
  const Eigen::VectorXf small_b0 = small_b;
  off.merge();
  off.unmerge();
  REQUIRE((small_b - small_b0).cwiseAbs().maxCoeff() <=
          float(4 * eps<float>() * small_b0(0) + 2 * eps<float>() * 0.49 / 0.036));
  REQUIRE(W == Eigen::MatrixXf::Ones(2, 2));

  // The same scale and shift on a zero bias (the documented room for β) round-trip exactly: accepted.
  Eigen::VectorXf zero = Eigen::VectorXf::Zero(2);
  peft::SSF<Eigen::MatrixXf> roomy(W, zero, strong_config());
  roomy.scale().setConstant(0.1f);
  roomy.shift().setOnes();
  roomy.merge();
  roomy.unmerge();
  REQUIRE(zero.isZero(0));
}

TEST_CASE("SSF unmerge refuses to write non-finite values and stays merged") {
  Layer<MatrixXd> l;
  peft::SSF<MatrixXd> ssf(l.W, l.b, strong_config());
  ssf.scale().setConstant(0.5);
  ssf.merge();
  l.W(1, 1) = std::numeric_limits<double>::max();  // W / 0.5 overflows
  const MatrixXd merged = l.W;
  REQUIRE_THROWS_AS(ssf.unmerge(), peft::NumericalError);
  REQUIRE(ssf.is_merged());
  REQUIRE(l.W == merged);
}

TEST_CASE("SSF enforces the state machine shapes and configuration") {
  Layer<MatrixXd> l;
  const MatrixXd W0 = l.W;
  peft::SSFConfig bad;
  bad.init_std = -1;
  REQUIRE_THROWS_AS(peft::SSF<MatrixXd>(l.W, l.b, bad), peft::ConfigError);
  bad.init_std = std::numeric_limits<double>::infinity();
  REQUIRE_THROWS_AS(peft::SSF<MatrixXd>(l.W, l.b, bad), peft::ConfigError);
  Eigen::VectorXd short_bias = Eigen::VectorXd::Zero(kOut - 1);
  REQUIRE_THROWS_AS(peft::SSF<MatrixXd>(l.W, short_bias), peft::ShapeError);

  peft::SSF<MatrixXd> ssf(l.W, l.b, strong_config());
  peft::SSF<MatrixXd>::Cache cache;
  REQUIRE_THROWS_AS(ssf.forward(Eigen::MatrixXd::Ones(kIn + 1, 2)), peft::ShapeError);
  ssf.forward(l.X, cache);
  REQUIRE_THROWS_AS(ssf.backward(Eigen::MatrixXd::Ones(kOut, kTokens + 1), cache), peft::ShapeError);
  REQUIRE_THROWS_AS(ssf.unmerge(), peft::StateError);
  ssf.merge();
  REQUIRE_THROWS_AS(ssf.merge(), peft::StateError);
  REQUIRE_THROWS_AS(ssf.backward(Eigen::MatrixXd::Ones(kOut, kTokens), cache), peft::StateError);
  REQUIRE_THROWS_AS(ssf.forward(l.X, cache), peft::StateError);
  REQUIRE_THROWS_AS(peft::SSF<MatrixXd>(ssf), peft::StateError);
  ssf.unmerge();
  REQUIRE_THROWS_AS(ssf.backward(Eigen::MatrixXd::Ones(kOut, kTokens), cache), peft::StateError);  // stale
  REQUIRE(ssf.flat_grads().isZero(0));
  REQUIRE((l.W - W0).cwiseAbs().maxCoeff() < 1e-15);
}

// ----------------------------------------------------------------------------------------------------
// StandaloneSSF

TEST_CASE("StandaloneSSF forward and gradients") {
  peft::StandaloneSSF<double> ssf(kIn, strong_config());
  const Eigen::MatrixXd X = random_matrix<Eigen::MatrixXd>(kIn, kTokens, 51);
  Eigen::MatrixXd ref = Eigen::VectorXd(ssf.scale()).asDiagonal() * X;
  ref.colwise() += Eigen::VectorXd(ssf.shift());
  REQUIRE((ssf.forward(X) - ref).cwiseAbs().maxCoeff() < 1e-15);
  const Eigen::MatrixXd R = random_matrix<Eigen::MatrixXd>(kIn, kTokens, 52);
  const auto errors = peft::test::check_gradients(ssf, X, R);
  REQUIRE(errors.size() == 3);
  for (const auto& e : errors) {
    INFO("d" << e.name << " relative error " << e.relative);
    REQUIRE(e.relative < 1e-6);
  }
  REQUIRE_THROWS_AS(peft::StandaloneSSF<double>(0), peft::ShapeError);
  REQUIRE_THROWS_AS(ssf.forward(Eigen::MatrixXd::Ones(kIn + 1, 1)), peft::ShapeError);
}

TEMPLATE_TEST_CASE("StandaloneSSF folded into the next linear layer equals the unfolded computation", "[ssf]",
                   MatrixXf, MatrixXd, RowMajorXf, RowMajorXd) {
  using Scalar = typename TestType::Scalar;
  const Eigen::Index d = 7, d_next = 5;
  TestType W1 = random_matrix<TestType>(d_next, d, 61);
  peft::VectorX<Scalar> b1 = random_matrix<peft::MatrixX<Scalar>>(d_next, 1, 62);
  const TestType W10 = W1;
  const peft::VectorX<Scalar> b10 = b1;
  const peft::MatrixX<Scalar> X = random_matrix<peft::MatrixX<Scalar>>(d, 9, 63);
  peft::StandaloneSSF<Scalar> ssf(d, strong_config());

  peft::MatrixX<Scalar> unfolded = W1 * ssf.forward(X);
  unfolded.colwise() += b1;
  ssf.fold_into_next(W1, b1);
  REQUIRE(ssf.is_folded());
  REQUIRE(ssf.forward(X) == X);  // the op now lives in W1, b1
  peft::MatrixX<Scalar> folded = W1 * X;
  folded.colwise() += b1;
  REQUIRE((folded - unfolded).cwiseAbs().maxCoeff() <= 64 * eps<Scalar>() * (1 + unfolded.cwiseAbs().maxCoeff()));

  ssf.unfold_from_next(W1, b1);
  REQUIRE(!ssf.is_folded());
  const Scalar e = Scalar(eps<Scalar>());
  REQUIRE(((W1 - W10).cwiseAbs().array() <= 2 * e * W10.cwiseAbs().array()).all());
  // b1 + W1 β − W1' (β / γ): two matrix-vector products of d terms each.
  const peft::VectorX<Scalar> beta = ssf.shift();
  const peft::VectorX<Scalar> scale_b = b10.cwiseAbs() + W10.cwiseAbs() * beta.cwiseAbs();
  REQUIRE(((b1 - b10).cwiseAbs().array() <= Scalar(2 * (d + 2)) * e * scale_b.array()).all());
}

TEST_CASE("StandaloneSSF folds into a block of a larger weight") {
  Eigen::MatrixXd big = random_matrix<Eigen::MatrixXd>(8, 10, 64);
  const Eigen::MatrixXd before = big;
  Eigen::VectorXd b1 = Eigen::VectorXd::Zero(8);
  peft::StandaloneSSF<double> ssf(4, strong_config());
  ssf.fold_into_next(big.middleCols(3, 4), b1);
  REQUIRE(big.leftCols(3) == before.leftCols(3));
  REQUIRE(big.rightCols(3) == before.rightCols(3));
  REQUIRE(big.middleCols(3, 4) != before.middleCols(3, 4));
  ssf.unfold_from_next(big.middleCols(3, 4), b1);
  REQUIRE((big - before).cwiseAbs().maxCoeff() < 1e-15);
}

TEMPLATE_TEST_CASE("StandaloneSSF folded into a LayerNorm equals the unfolded computation", "[ssf]", float, double) {
  using Scalar = TestType;
  using Vector = peft::VectorX<Scalar>;
  const Eigen::Index d = 9;
  Vector w = random_matrix<peft::MatrixX<Scalar>>(d, 1, 71), b = random_matrix<peft::MatrixX<Scalar>>(d, 1, 72);
  const Vector w0 = w, b0 = b;
  const peft::MatrixX<Scalar> xhat = random_matrix<peft::MatrixX<Scalar>>(d, 6, 73);  // normalised input
  peft::StandaloneSSF<Scalar> ssf(d, strong_config());
  peft::MatrixX<Scalar> ln = xhat.array().colwise() * w.array();
  ln.colwise() += b;
  const peft::MatrixX<Scalar> unfolded = ssf.forward(ln);
  ssf.fold_into_layer_norm(w, b);
  peft::MatrixX<Scalar> folded = xhat.array().colwise() * w.array();
  folded.colwise() += b;
  REQUIRE((folded - unfolded).cwiseAbs().maxCoeff() <= 8 * eps<Scalar>() * (1 + unfolded.cwiseAbs().maxCoeff()));
  ssf.unfold_from_layer_norm(w, b);
  const Scalar e = Scalar(eps<Scalar>());
  const Vector g = ssf.scale(), beta = ssf.shift();
  REQUIRE(((w - w0).cwiseAbs().array() <= 2 * e * w0.cwiseAbs().array()).all());
  REQUIRE(((b - b0).cwiseAbs().array() <= (4 * e * b0.cwiseAbs() + 2 * e * beta.cwiseQuotient(g).cwiseAbs()).array()).all());
}

TEST_CASE("StandaloneSSF folds check state shapes and values before writing") {
  const Eigen::Index d = 4;
  Eigen::MatrixXf W1 = random_matrix<Eigen::MatrixXf>(3, d, 81), other = W1;
  Eigen::VectorXf b1 = Eigen::VectorXf::Zero(3), w_ln = Eigen::VectorXf::Ones(d), b_ln = Eigen::VectorXf::Zero(d);
  const Eigen::MatrixXf W10 = W1;
  peft::StandaloneSSF<float> ssf(d, strong_config());

  Eigen::MatrixXf wrong_features = Eigen::MatrixXf::Ones(3, d + 1);
  REQUIRE_THROWS_AS(ssf.fold_into_next(wrong_features, b1), peft::ShapeError);
  Eigen::VectorXf short_b1 = Eigen::VectorXf::Zero(2);
  REQUIRE_THROWS_AS(ssf.fold_into_next(W1, short_b1), peft::ShapeError);
  REQUIRE_THROWS_AS(ssf.unfold_from_next(W1, b1), peft::StateError);

  ssf.scale()(1, 0) = 0.0f;
  REQUIRE_THROWS_AS(ssf.fold_into_next(W1, b1), peft::NumericalError);
  REQUIRE_THAT(message_of([&] { ssf.fold_into_next(W1, b1); }), has_substring("feature 1 has scale 0"));
  REQUIRE(W1 == W10);
  REQUIRE(b1.isZero(0));
  REQUIRE(!ssf.is_folded());
  ssf.scale()(1, 0) = 1.5f;

  ssf.fold_into_next(W1, b1);
  REQUIRE_THROWS_AS(ssf.fold_into_next(W1, b1), peft::StateError);
  REQUIRE_THROWS_AS(ssf.fold_into_layer_norm(w_ln, b_ln), peft::StateError);
  REQUIRE_THROWS_AS(ssf.unfold_from_next(other, b1), peft::StateError);  // not the matrix it was folded into
  REQUIRE_THROWS_AS(ssf.unfold_from_layer_norm(w_ln, b_ln), peft::StateError);
  peft::StandaloneSSF<float>::Cache cache;
  REQUIRE_THROWS_AS(ssf.forward(Eigen::MatrixXf::Ones(d, 2), cache), peft::StateError);
  REQUIRE_THROWS_AS(peft::StandaloneSSF<float>(ssf), peft::StateError);  // a folded copy could unfold twice
  Eigen::VectorXf other_b1 = b1;
  REQUIRE_THROWS_AS(ssf.unfold_from_next(W1, other_b1), peft::StateError);  // not the bias it was folded into
  peft::StandaloneSSF<float> moved = std::move(ssf);
  REQUIRE(moved.is_folded());
  moved.unfold_from_next(W1, b1);
  REQUIRE((W1 - W10).cwiseAbs().maxCoeff() <= 2 * float(eps<float>()) * W10.cwiseAbs().maxCoeff());
}

TEST_CASE("StandaloneSSF refuses foreign or stale caches and bad shapes in backward") {
  peft::StandaloneSSF<double> ssf(3, strong_config()), other(3, strong_config());
  const Eigen::MatrixXd X = random_matrix<Eigen::MatrixXd>(3, 2, 91);
  const Eigen::MatrixXd G = random_matrix<Eigen::MatrixXd>(3, 2, 92);
  peft::StandaloneSSF<double>::Cache cache, empty, foreign;
  REQUIRE_THROWS_AS(ssf.backward(G, empty), peft::StateError);
  other.forward(X, foreign);
  REQUIRE_THROWS_AS(ssf.backward(G, foreign), peft::StateError);
  ssf.forward(X, cache);
  REQUIRE_THROWS_AS(ssf.backward(Eigen::MatrixXd::Ones(3, 3), cache), peft::ShapeError);
  Eigen::MatrixXd W1 = random_matrix<Eigen::MatrixXd>(2, 3, 93);
  Eigen::VectorXd b1 = Eigen::VectorXd::Zero(2);
  ssf.fold_into_next(W1, b1);
  REQUIRE_THROWS_AS(ssf.backward(G, cache), peft::StateError);
  ssf.unfold_from_next(W1, b1);
  REQUIRE_THROWS_AS(ssf.backward(G, cache), peft::StateError);  // stale: folded and unfolded since
  REQUIRE(ssf.flat_grads().isZero(0));
  // A fold that would overflow is refused before writing.
  W1(1, 2) = std::numeric_limits<double>::max();
  ssf.scale()(2, 0) = 4.0;
  const Eigen::MatrixXd W1_before = W1;
  const Eigen::VectorXd b1_before = b1;
  REQUIRE_THROWS_AS(ssf.fold_into_next(W1, b1), peft::NumericalError);
  REQUIRE(W1 == W1_before);
  REQUIRE(b1 == b1_before);
}
