// What is PiSSA's own (docs/math.md, PiSSA): the start from the exact or randomized SVD, s B A as the
// best rank-r approximation, the rank-2r export, restoring the original weight once, and what it refuses.
// The contract every adapter shares is in tests/contract/.
#include "support/catch.hpp"
#include "support/errors.hpp"
#include "support/matrices.hpp"

#include <peft/adapters/lora.hpp>
#include <peft/adapters/pissa.hpp>


#include <cmath>
#include <limits>
#include <utility>

using peft::test::eps;
using peft::test::MatrixXd;
using peft::test::MatrixXf;
using peft::test::random_matrix;
using peft::test::RowMajorXd;
using peft::test::RowMajorXf;

namespace {

constexpr Eigen::Index kOut = 9, kIn = 7, kTokens = 4;

peft::PiSSAConfig config(int iterations = 0, Eigen::Index rank = 3) {
  peft::PiSSAConfig cfg;
  cfg.rank = rank;
  cfg.alpha = 6.0;
  cfg.svd_iterations = iterations;
  cfg.seed = 4;
  return cfg;
}


}  // namespace

TEMPLATE_TEST_CASE("PiSSA leaves the layer output unchanged at init", "[pissa]", PEFT_TEST_EVERY_MATRIX) {
  using Scalar = typename TestType::Scalar;
  for (int iterations : {0, 2}) {
    TestType W = random_matrix<TestType>(kOut, kIn, 1);
    peft::VectorX<Scalar> b = random_matrix<peft::MatrixX<Scalar>>(kOut, 1, 2);
    const TestType W0 = W;
    const peft::MatrixX<Scalar> X = random_matrix<peft::MatrixX<Scalar>>(kIn, kTokens, 3);
    peft::MatrixX<Scalar> before = W0 * X;
    before.colwise() += b;
    peft::PiSSA<TestType> pissa(W, b, config(iterations));
    REQUIRE(W != W0);  // the weight now holds the residual
    const double scale = (W0.cwiseAbs().template cast<double>() * X.cwiseAbs().template cast<double>()).maxCoeff() + 1;
    INFO("svd_iterations " << iterations);
    REQUIRE((pissa.forward(X) - before).cwiseAbs().template cast<double>().maxCoeff() <= 4 * kIn * eps<Scalar>() * scale);
    // W_res + s B A = W0 up to one rounding of each, and of s B A (the residual's kernel is not
    // delta_weight()'s), bounded by |s| |B| |A|.
    const TestType product = pissa.scaling() * (pissa.initial_B().cwiseAbs() * pissa.initial_A().cwiseAbs());
    REQUIRE(((W + pissa.delta_weight() - W0).cwiseAbs().array() <=
             2 * Scalar(eps<Scalar>()) *
                     (W0.cwiseAbs() + pissa.delta_weight().cwiseAbs() + Scalar(pissa.rank() + 1) * product).array() +
                 Scalar(1e-30))
                .all());
    REQUIRE(pissa.original_weight().isApprox(W0, Scalar(8 * eps<Scalar>())));
  }
}

TEMPLATE_TEST_CASE("PiSSA s B A is the best rank-r approximation of the weight", "[pissa]", MatrixXd, RowMajorXd) {
  // Tall and wide, with a decaying spectrum, and large enough that the randomized sketch (r + p = 5
  // columns) does not cover the whole range: its accuracy comes from the power iterations.
  for (auto shape : {std::make_pair(40, 30), std::make_pair(30, 40)}) {
    const peft::test::KnownSVD known = peft::test::known_svd(shape.first, shape.second, 0.5, 17);
    const TestType W0 = known.best_rank(known.s.size());  // W0 exactly: double, and its SVD is known
    const Eigen::MatrixXd best = known.best_rank(3);
    for (int iterations : {0, 1, 4}) {
      TestType W = W0;
      peft::PiSSAConfig cfg = config(iterations);
      cfg.oversampling = 2;
      peft::PiSSA<TestType> pissa(W, cfg);
      INFO(shape.first << "x" << shape.second << ", svd_iterations " << iterations);
      // Compare products, not factors: singular vectors may flip sign. The randomized SVD with q power
      // iterations is accurate to about (σ_{r+p+1} / σ_r)^(2q+1) = 2^-(2 (2q+1)).
      const double tol = iterations == 0 ? 1e-12 : std::pow(0.25, 2 * iterations + 1);
      REQUIRE((Eigen::MatrixXd(pissa.delta_weight()) - best).norm() <= tol * best.norm());
      REQUIRE((Eigen::MatrixXd(W) - (Eigen::MatrixXd(W0) - best)).norm() <= tol * best.norm());
      // The factors split the singular values evenly: A Aᵀ = Bᵀ B = diag(S / s).
      const Eigen::MatrixXd AAt = pissa.A() * pissa.A().transpose(), BtB = pissa.B().transpose() * pissa.B();
      REQUIRE((AAt - BtB).norm() <= 1e-9 * AAt.norm());
      REQUIRE(AAt.isDiagonal(1e-9 * AAt.norm()));
    }
  }
}

TEMPLATE_TEST_CASE("PiSSA exports a rank 2r LoRA that reproduces the trained layer on the original weight",
                   "[pissa]", MatrixXd, RowMajorXf) {
  using Scalar = typename TestType::Scalar;
  for (bool rslora : {false, true}) {
    TestType W = random_matrix<TestType>(kOut, kIn, 12);
    const TestType W0 = W;
    peft::PiSSAConfig cfg = config(2);
    cfg.use_rslora = rslora;
    peft::PiSSA<TestType> pissa(W, cfg);
    // "Train": move both factors.
    pissa.A() += random_matrix<peft::MatrixX<Scalar>>(3, kIn, 13, 0.1);
    pissa.B() += random_matrix<peft::MatrixX<Scalar>>(kOut, 3, 14, 0.1);
    const peft::MatrixX<Scalar> X = random_matrix<peft::MatrixX<Scalar>>(kIn, kTokens, 15);
    const peft::MatrixX<Scalar> Y = pissa.forward(X);

    const peft::LoRAExport<Scalar> copied_export = pissa.to_lora();
    const peft::LoRAExport<Scalar> exported = std::move(pissa).release_to_lora();
    REQUIRE(exported.A == copied_export.A);
    REQUIRE(exported.config.rank == 6);
    // The scaling of the rank-2r LoRA is PiSSA's: alpha doubles (times sqrt 2 with rsLoRA), exactly.
    REQUIRE(exported.config.alpha == (rslora ? std::sqrt(2.0) * cfg.alpha : 2.0 * cfg.alpha));
    REQUIRE_THROWS_AS(std::move(pissa).release_to_lora(), peft::StateError);  // NOLINT: released once only
    REQUIRE(exported.A.rows() == 6);
    REQUIRE(exported.B.cols() == 6);
    // W is the original weight again.
    REQUIRE((W - W0).cwiseAbs().maxCoeff() <= 16 * eps<Scalar>() * (1 + W0.cwiseAbs().maxCoeff()));
    peft::LoRA<TestType> lora(W, exported.config);
    lora.A() = exported.A;
    lora.B() = exported.B;
    const peft::MatrixX<Scalar> Y_lora = lora.forward(X);
    INFO("rsLoRA " << rslora);
    REQUIRE((Y_lora - Y).cwiseAbs().maxCoeff() <= 256 * eps<Scalar>() * (1 + Y.cwiseAbs().maxCoeff()));
  }
}

TEST_CASE("PiSSA rejects bad configurations and leaves W untouched") {
  MatrixXd W = random_matrix<MatrixXd>(kOut, kIn, 16);
  const MatrixXd W0 = W;
  const auto make = [&](auto edit) {
    peft::PiSSAConfig cfg = config();
    edit(cfg);
    return peft::PiSSA<MatrixXd>(W, cfg);
  };
  REQUIRE_THROWS_AS(make([](auto& c) { c.rank = kIn + 1; }), peft::ConfigError);
  REQUIRE_THAT(peft::test::message_of([&] { make([](auto& c) { c.rank = kIn + 1; }); }),
               peft::test::has_substring("peft::PiSSA::constructor: rank is 8, expected <= min(d_out, d_in) = 7"));
  REQUIRE_THROWS_AS(make([](auto& c) { c.rank = 0; }), peft::ConfigError);
  REQUIRE_THROWS_AS(make([](auto& c) { c.alpha = -1; }), peft::ConfigError);
  REQUIRE_THROWS_AS(make([](auto& c) { c.dropout = 1; }), peft::ConfigError);
  REQUIRE_THROWS_AS(make([](auto& c) { c.svd_iterations = -1; }), peft::ConfigError);
  REQUIRE_THROWS_AS(make([](auto& c) { c.oversampling = -1; }), peft::ConfigError);
  REQUIRE(W == W0);
  for (double bad : {std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::infinity()}) {
    W(2, 3) = bad;  // the SVD of a non-finite weight: refused, not garbage
    const MatrixXd with_bad = W;
    REQUIRE_THROWS_AS(make([](auto&) {}), peft::NumericalError);
    REQUIRE(peft::test::same_bits(W, with_bad));
  }
}

TEST_CASE("PiSSA restores the original weight only once and only from the adapter that made the residual") {
  MatrixXd W = random_matrix<MatrixXd>(kOut, kIn, 18);
  const MatrixXd W0 = W;
  peft::PiSSA<MatrixXd> pissa(W, config(2));
  const MatrixXd W_res = W;
  peft::PiSSA<MatrixXd> copy = pissa;
  REQUIRE(!copy.owns_residual());
  REQUIRE_THROWS_AS(std::move(copy).release_to_lora(), peft::StateError);  // NOLINT(bugprone-use-after-move)
  REQUIRE(W == W_res);
  pissa.merge();
  REQUIRE_THROWS_AS(std::move(pissa).release_to_lora(), peft::StateError);  // NOLINT(bugprone-use-after-move)
  REQUIRE_THROWS_AS(pissa.original_weight(), peft::StateError);  // W holds W_res + s B A while merged
  pissa.unmerge();
  peft::PiSSA<MatrixXd> owner = std::move(pissa);  // moving hands the residual over
  REQUIRE(owner.owns_residual());
  REQUIRE(!pissa.owns_residual());  // NOLINT(bugprone-use-after-move): the moved-from state is specified
  std::move(owner).release_to_lora();
  REQUIRE((W - W0).cwiseAbs().maxCoeff() < 1e-14);
  REQUIRE_THROWS_AS(owner.to_lora(), peft::StateError);  // NOLINT(bugprone-use-after-move)
  REQUIRE_THROWS_AS(owner.original_weight(), peft::StateError);  // NOLINT(bugprone-use-after-move)
}
