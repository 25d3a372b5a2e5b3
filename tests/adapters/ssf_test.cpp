// What is SSF's own on a linear layer (docs/math.md, SSF): the official init, the merged bias and its
// round trip, merges refused because they could not be undone (naming the feature), and a shift that
// would swamp the bias. The contract every adapter shares is in tests/contract/.
#include "support/catch.hpp"
#include "support/errors.hpp"
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

TEMPLATE_TEST_CASE("SSF merge writes the scaled weight and the scaled and shifted bias", "[ssf]", PEFT_TEST_EVERY_MATRIX) {
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
  // Merged, forward is the base product of the merged layer (bit for bit at the contract's shapes, where
  // Eigen's own W * X also runs its GEMM; this one is small enough for Eigen to sum coefficient-wise).
  REQUIRE((ssf.forward(l.X) - base).cwiseAbs().maxCoeff() <= 8 * eps<Scalar>() * (1 + base.cwiseAbs().maxCoeff()));
  REQUIRE((Y - base).cwiseAbs().maxCoeff() <= 32 * eps<Scalar>() * (1 + Y.cwiseAbs().maxCoeff()));
  // delta_weight and delta_bias mean the same while merged (they recover W0 and b0 from the merged layer).
  const TestType dW_merged = ssf.delta_weight();
  const peft::VectorX<Scalar> db_merged = ssf.delta_bias();
  REQUIRE((dW_merged - (expected_W - W0)).cwiseAbs().maxCoeff() <= 8 * eps<Scalar>() * (1 + expected_W.cwiseAbs().maxCoeff()));
  REQUIRE((db_merged - (expected_b - b0)).cwiseAbs().maxCoeff() <= 8 * eps<Scalar>() * (1 + expected_b.cwiseAbs().maxCoeff()));
}

TEMPLATE_TEST_CASE("SSF unmerge restores W and b within the round-trip bound", "[ssf]", PEFT_TEST_EVERY_MATRIX) {
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
  // W: one multiplication and one division by γ_i: |W - W0| <= 2 eps |W0| (docs/math.md, SSF).
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
