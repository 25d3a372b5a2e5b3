// Teacher-student learning tests: each adapter, trained with the library's AdamW from a user-style loop,
// must recover a known change to a frozen layer that it can express. The target layer is W0 + Δ (and a
// bias change where the adapter has one); the loss must fall by four orders of magnitude and the learned
// change must match Δ to 1e-2 relative. These fail if a gradient, the optimizer, or an adapter's
// parameterisation is wrong in a way the finite-difference checks could miss (e.g. a wrong init scale).
#include "support/catch.hpp"
#include "support/matrices.hpp"

#include <peft/adapters/dora.hpp>
#include <peft/adapters/lora.hpp>
#include <peft/adapters/pissa.hpp>
#include <peft/adapters/ssf.hpp>
#include <peft/optim/adamw.hpp>
#include <peft/optim/schedule.hpp>

#include <Eigen/SVD>

#include <cmath>

using peft::test::random_matrix;
using Eigen::MatrixXd;
using Eigen::VectorXd;

namespace {

constexpr Eigen::Index kOut = 12, kIn = 10, kTokens = 64;

struct Result {
  double first_loss;
  double last_loss;
};

// Fits `adapter` (wrapping the frozen layer) to targets T = W_t X + b_t over a fixed batch, by full-batch
// AdamW on 0.5 ||Y - T||² / N with warm-up and cosine decay.
template <class Adapter>
Result fit(Adapter& adapter, const MatrixXd& X, const MatrixXd& T, double peak_lr, int steps) {
  peft::AdamWConfig cfg;
  cfg.lr = peak_lr;
  cfg.weight_decay = 0.0;  // decay would pull the solution away from the true change
  peft::AdamW<double> opt(cfg);
  opt.add(adapter);
  const peft::WarmupCosine schedule(peak_lr, steps / 20, steps);
  typename Adapter::Cache cache;
  Result r{0.0, 0.0};
  for (int step = 0; step <= steps; ++step) {
    const MatrixXd Y = adapter.forward(X, cache);
    const double loss = 0.5 * (Y - T).squaredNorm() / double(kTokens);
    if (step == 0) r.first_loss = loss;
    r.last_loss = loss;
    if (step == steps) break;
    adapter.zero_grad();
    adapter.backward((Y - T) / double(kTokens), cache);
    opt.set_lr(schedule(opt.step_count()));
    opt.step();
  }
  return r;
}

double relative(const MatrixXd& got, const MatrixXd& want) { return (got - want).norm() / want.norm(); }

// A rank-k change with entries of the size of W0's.
MatrixXd low_rank_change(Eigen::Index k, std::uint64_t seed) {
  return random_matrix<MatrixXd>(kOut, k, seed, 0.6) * random_matrix<MatrixXd>(k, kIn, seed + 1, 0.6);
}

}  // namespace

TEST_CASE("LoRA learns a rank-2 change with rank 4", "[learning][lora]") {
  MatrixXd W = random_matrix<MatrixXd>(kOut, kIn, 1, 0.5);
  VectorXd b = random_matrix<MatrixXd>(kOut, 1, 2, 0.5);
  const MatrixXd W0 = W, delta = low_rank_change(2, 3), X = random_matrix<MatrixXd>(kIn, kTokens, 5);
  const MatrixXd T = ((W0 + delta) * X).colwise() + b;

  peft::LoRAConfig cfg;
  cfg.rank = 4;
  cfg.alpha = 8;
  cfg.seed = 7;
  peft::LoRA<MatrixXd> lora(W, b, cfg);
  const Result r = fit(lora, X, T, 2e-2, 3000);
  INFO("loss " << r.first_loss << " -> " << r.last_loss);
  REQUIRE(r.last_loss <= 1e-4 * r.first_loss);
  REQUIRE(relative(lora.delta_weight(), delta) < 1e-2);
  REQUIRE(W == W0);  // training never writes the frozen weight
}

// PiSSA trains the principal part: W0 + Δ = W_res + s B A needs rank(s B0 A0 + Δ) <= r, so an arbitrary
// rank-k Δ needs r >= r + k. What rank r expresses is a change within the principal column space,
// Δ = U_k R with U_k the top k left singular vectors of W0 (k <= r): that is the change used here.
TEST_CASE("PiSSA learns a rank-2 change of its principal components with rank 4", "[learning][pissa]") {
  MatrixXd W = random_matrix<MatrixXd>(kOut, kIn, 11, 0.5);
  VectorXd b = random_matrix<MatrixXd>(kOut, 1, 12, 0.5);
  const Eigen::JacobiSVD<MatrixXd> svd(W, Eigen::ComputeThinU);
  const MatrixXd W0 = W, X = random_matrix<MatrixXd>(kIn, kTokens, 15);
  const MatrixXd delta = svd.matrixU().leftCols(2) * random_matrix<MatrixXd>(2, kIn, 13, 0.6);
  const MatrixXd T = ((W0 + delta) * X).colwise() + b;

  peft::PiSSAConfig cfg;
  cfg.rank = 4;
  cfg.alpha = 4;
  peft::PiSSA<MatrixXd> pissa(W, b, cfg);
  const Result r = fit(pissa, X, T, 1e-2, 3000);
  INFO("loss " << r.first_loss << " -> " << r.last_loss);
  REQUIRE(r.last_loss <= 1e-4 * r.first_loss);
  // W holds the residual; the learned change is measured against the original weight.
  const MatrixXd learned = W + pissa.delta_weight() - W0;
  REQUIRE(relative(learned, delta) < 1e-2);
  REQUIRE(relative(pissa.original_weight(), W0) < 1e-12);
}

TEST_CASE("DoRA learns a rank-2 change of direction and a change of magnitude", "[learning][dora]") {
  MatrixXd W = random_matrix<MatrixXd>(kOut, kIn, 21, 0.5);
  VectorXd b = random_matrix<MatrixXd>(kOut, 1, 22, 0.5);
  const MatrixXd W0 = W, X = random_matrix<MatrixXd>(kIn, kTokens, 25);
  // Rows rescaled by g in [0.7, 1.3] after a rank-2 change: W_t = diag(g) (W0 + U V).
  const VectorXd g = (random_matrix<MatrixXd>(kOut, 1, 26, 0.3).array() + 1.0).matrix();
  const MatrixXd W_t = g.asDiagonal() * (W0 + low_rank_change(2, 23));
  const MatrixXd delta = W_t - W0;
  const MatrixXd T = (W_t * X).colwise() + b;

  for (bool detach : {true, false}) {
    DYNAMIC_SECTION("detach_norm = " << detach) {
      peft::DoRAConfig cfg;
      cfg.rank = 4;
      cfg.alpha = 8;
      cfg.seed = 27;
      cfg.detach_norm = detach;
      peft::DoRA<MatrixXd> dora(W, b, cfg);
      const Result r = fit(dora, X, T, 1e-2, 4000);
      INFO("loss " << r.first_loss << " -> " << r.last_loss);
      REQUIRE(r.last_loss <= 1e-4 * r.first_loss);
      REQUIRE(relative(dora.delta_weight(), delta) < 1e-2);
      REQUIRE(W == W0);
    }
  }
}

TEST_CASE("SSF learns a per-row scale and a bias change", "[learning][ssf]") {
  MatrixXd W = random_matrix<MatrixXd>(kOut, kIn, 31, 0.5);
  VectorXd b = random_matrix<MatrixXd>(kOut, 1, 32, 0.5);
  const MatrixXd W0 = W, X = random_matrix<MatrixXd>(kIn, kTokens, 35);
  const VectorXd b0 = b;
  const VectorXd gamma = (random_matrix<MatrixXd>(kOut, 1, 36, 0.4).array() + 1.0).matrix();
  const VectorXd beta = random_matrix<MatrixXd>(kOut, 1, 37, 0.3);
  // SSF on a linear layer: Y = γ ⊙ (W0 X + b) + β, so the change is diag(γ − 1) W0 and γ ⊙ b + β − b.
  const MatrixXd delta = (gamma.array() - 1.0).matrix().asDiagonal() * W0;
  const VectorXd delta_b = gamma.cwiseProduct(b0) + beta - b0;
  const MatrixXd T = ((W0 + delta) * X).colwise() + (b0 + delta_b);

  peft::SSFConfig cfg;
  cfg.seed = 38;
  peft::SSF<MatrixXd> ssf(W, b, cfg);
  const Result r = fit(ssf, X, T, 2e-2, 3000);
  INFO("loss " << r.first_loss << " -> " << r.last_loss);
  REQUIRE(r.last_loss <= 1e-4 * r.first_loss);
  REQUIRE(relative(ssf.delta_weight(), delta) < 1e-2);
  REQUIRE(relative(ssf.delta_bias(), delta_b) < 1e-2);
  REQUIRE(W == W0);
}
