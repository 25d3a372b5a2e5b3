// peft::StandaloneSSF (docs/math.md, SSF, standalone): forward and gradients through the training
// contract every trainable type shares (forward_into and backward_into included), the folds into the
// next linear layer and into a LayerNorm, and what they refuse.
#include "support/catch.hpp"
#include "support/errors.hpp"
#include "support/matrices.hpp"

#include <peft/adapters/standalone_ssf.hpp>
#include <peft/testing/grad_check.hpp>

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

constexpr Eigen::Index kIn = 5, kTokens = 4;

// A visibly non-identity SSF: γ ~ N(1, 0.3²), β ~ N(0, 0.3²).
peft::SSFConfig strong_config(std::uint64_t seed = 5) {
  peft::SSFConfig cfg;
  cfg.init_std = 0.3;
  cfg.seed = seed;
  return cfg;
}

}  // namespace

TEST_CASE("StandaloneSSF forward and gradients") {
  peft::StandaloneSSF<double> ssf(kIn, strong_config());
  const Eigen::MatrixXd X = random_matrix<Eigen::MatrixXd>(kIn, kTokens, 51);
  Eigen::MatrixXd ref = Eigen::VectorXd(ssf.scale()).asDiagonal() * X;
  ref.colwise() += Eigen::VectorXd(ssf.shift());
  REQUIRE((ssf.forward(X) - ref).cwiseAbs().maxCoeff() < 1e-15);
  const Eigen::MatrixXd R = random_matrix<Eigen::MatrixXd>(kIn, kTokens, 52);
  const auto errors = peft::testing::check_gradients(ssf, X, R);
  REQUIRE(errors.size() == 3);
  for (const auto& e : errors) {
    INFO("d" << e.name << " relative error " << e.relative);
    REQUIRE(e.relative < 1e-6);
  }
  REQUIRE_THROWS_AS(peft::StandaloneSSF<double>(0), peft::ShapeError);
  REQUIRE_THROWS_AS(ssf.forward(Eigen::MatrixXd::Ones(kIn + 1, 1)), peft::ShapeError);
}

TEMPLATE_TEST_CASE("StandaloneSSF folded into the next linear layer equals the unfolded computation", "[ssf]",
                   PEFT_TEST_EVERY_MATRIX) {
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

TEST_CASE("StandaloneSSF trains through the shared contract: into caller-owned outputs that may alias inputs") {
  peft::StandaloneSSF<double> ssf(kIn, strong_config());
  static_assert(peft::is_trainable_v<peft::StandaloneSSF<double>>, "trainable");
  static_assert(!peft::is_adapter_v<peft::StandaloneSSF<double>>, "nothing to merge into: not an adapter");
  const Eigen::MatrixXd X = random_matrix<Eigen::MatrixXd>(kIn, kTokens, 53);
  const Eigen::MatrixXd G = random_matrix<Eigen::MatrixXd>(kIn, kTokens, 54);
  peft::StandaloneSSF<double>::Cache cache;
  const Eigen::MatrixXd Y = ssf.forward(X, cache);
  const Eigen::MatrixXd dX = ssf.backward(G, cache);
  const Eigen::VectorXd grads = ssf.flat_grads();
  REQUIRE((dX - Eigen::VectorXd(ssf.scale()).asDiagonal() * G).cwiseAbs().maxCoeff() < 1e-15);

  ssf.zero_grad();
  Eigen::MatrixXd inout = X;
  ssf.forward_into(inout, inout, cache);  // Y written over X, X read intact
  REQUIRE(inout == Y);
  Eigen::MatrixXd g_inout = G;
  ssf.backward_into(g_inout, cache, g_inout);
  REQUIRE(g_inout == dX);
  REQUIRE(ssf.flat_grads() == grads);
  Eigen::MatrixXd Yi;
  ssf.forward_into(X, Yi);
  REQUIRE(Yi == ssf.forward(X));

  // An empty batch: empty outputs, and the gradients unchanged.
  const Eigen::MatrixXd X0(kIn, 0), G0(kIn, 0);
  REQUIRE(ssf.forward(X0, cache).cols() == 0);
  REQUIRE(ssf.backward(G0, cache).cols() == 0);
  REQUIRE(ssf.flat_grads() == grads);

  // The cache's copy of X is checked before backward reads it.
  ssf.forward(X, cache);
  cache.X.resize(kIn, kTokens + 1);
  REQUIRE_THROWS_AS(ssf.backward(G, cache), peft::StateError);
  REQUIRE_THAT(message_of([&] { ssf.backward(G, cache); }), has_substring("does not fit"));

  // While folded, training says how to leave that state.
  Eigen::VectorXd w = Eigen::VectorXd::Ones(kIn), b = Eigen::VectorXd::Zero(kIn);
  ssf.fold_into_layer_norm(w, b);
  REQUIRE_THAT(message_of([&] { ssf.forward(X, cache); }),
               has_substring("peft::StandaloneSSF::forward: training forward (with a cache) while folded; call "
                             "unfold_from_next() or unfold_from_layer_norm() first"));
  REQUIRE_THAT(message_of([&] { ssf.fold_into_layer_norm(w, b); }), has_substring("already folded"));
  ssf.unfold_from_layer_norm(w, b);
}
