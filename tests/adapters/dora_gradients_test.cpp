// DoRA's gradients (docs/math.md, DoRA): the detached mode against the function with the norms held
// fixed, the exact mode against central differences, dropout on the branch only, one token (products on
// the stack over several blocks), and each of the three plans a training step chooses for its products
// with W0. The exact mode's general check is the contract's (tests/contract/).
#include "adapters/dora_support.hpp"
#include "support/catch.hpp"
#include "support/matrices.hpp"
#include "support/threads.hpp"

#include <peft/adapters/dora.hpp>
#include <peft/detail/product_plan.hpp>
#include <peft/testing/grad_check.hpp>

#include <vector>

using namespace peft::test::dora;  // NOLINT: this test's own helpers
using peft::test::EigenThreads;
using peft::test::eps;
using peft::test::MatrixXd;
using peft::test::random_matrix;
using peft::test::RowMajorXd;

TEST_CASE("DoRA dropout masks the branch input only and backward replays the mask") {
  Layer<MatrixXd> l;
  peft::DoRAConfig cfg = random_config();
  cfg.dropout = 0.5;
  peft::DoRA<MatrixXd> dora(l.W, l.b, cfg);
  spread_magnitude(dora, 3);
  const Reference ref = reference(dora, l.W);
  const Eigen::MatrixXd X = random_matrix<Eigen::MatrixXd>(kIn, 400, 5);
  peft::DoRA<MatrixXd>::Cache cache;
  const Eigen::MatrixXd Y = dora.forward(X, cache);

  const Eigen::MatrixXd& mask = cache.branch.mask;
  REQUIRE(mask.rows() == kIn);
  REQUIRE(mask.cols() == 400);
  REQUIRE((mask.array() == 0.0 || mask.array() == 2.0).all());
  REQUIRE_THAT((mask.array() == 2.0).cast<double>().mean(), WithinAbs(0.5, 0.05));

  // Y = diag(g) (W0 X + s B A (X ⊙ mask)) + b: the base term sees the whole X.
  const double s = ref.s;
  const Eigen::MatrixXd Z = l.W * X + s * ref.B * (ref.A * X.cwiseProduct(mask));
  Eigen::MatrixXd expected = ref.g.asDiagonal() * Z;
  expected.colwise() += l.b;
  REQUIRE((Y - expected).cwiseAbs().maxCoeff() < 1e-12);
  REQUIRE((cache.Z - Z).cwiseAbs().maxCoeff() < 1e-12);

  // Inference never drops.
  REQUIRE((dora.forward(X) - reference_forward(ref, l.b, X)).cwiseAbs().maxCoeff() < 1e-12);

  // Detached backward: dm = rowsum(G ⊙ Z) / n, then LoRA's backward with G' = diag(g) G and the mask.
  const Eigen::MatrixXd G = random_matrix<Eigen::MatrixXd>(kOut, 400, 6);
  const Eigen::MatrixXd dX = dora.backward(G, cache);
  const Eigen::MatrixXd Gp = ref.g.asDiagonal() * G;
  const Eigen::MatrixXd U = ref.B.transpose() * Gp;
  const Eigen::MatrixXd dX_ref = l.W.transpose() * Gp + s * (ref.A.transpose() * U).cwiseProduct(mask);
  const Eigen::MatrixXd dA_ref = s * U * X.cwiseProduct(mask).transpose();
  const Eigen::MatrixXd dB_ref = s * Gp * (ref.A * X.cwiseProduct(mask)).transpose();
  const Eigen::VectorXd dm_ref = G.cwiseProduct(Z).rowwise().sum().cwiseQuotient(ref.n);
  auto params = dora.parameters();
  REQUIRE((dX - dX_ref).cwiseAbs().maxCoeff() < 1e-11);
  REQUIRE((params[0].grad - dA_ref).cwiseAbs().maxCoeff() < 1e-10);
  REQUIRE((params[1].grad - dB_ref).cwiseAbs().maxCoeff() < 1e-10);
  REQUIRE((params[2].grad - dm_ref).cwiseAbs().maxCoeff() < 1e-10);

  // A second training forward draws a new mask.
  peft::DoRA<MatrixXd>::Cache cache2;
  dora.forward(X, cache2);
  REQUIRE(cache2.branch.mask != mask);
}

TEMPLATE_TEST_CASE("DoRA detached gradients match central differences with the norm held fixed", "[dora]",
                   MatrixXd, RowMajorXd) {
  struct Case {
    const char* name;
    double dropout;
    bool rslora;
    bool bias;
  };
  const Case cases[] = {{"plain", 0.0, false, true},
                        {"no bias", 0.0, false, false},
                        {"rsLoRA", 0.0, true, true},
                        {"dropout", 0.3, false, true}};
  for (const Case& c : cases) {
    INFO(c.name);
    peft::DoRAConfig cfg = random_config(3, 5.0, /*detach_norm=*/true);
    cfg.dropout = c.dropout;
    cfg.use_rslora = c.rslora;
    Layer<TestType> l;
    const Eigen::MatrixXd R = random_matrix<Eigen::MatrixXd>(kOut, kTokens, 99);
    auto dora = c.bias ? peft::DoRA<TestType>(l.W, l.b, cfg) : peft::DoRA<TestType>(l.W, cfg);
    spread_magnitude(dora, 17);
    const auto errors = detached_gradient_errors(dora, l.W, c.bias ? Eigen::VectorXd(l.b) : Eigen::VectorXd(), l.X, R);
    REQUIRE(errors.size() == 4);
    for (const auto& e : errors) {
      INFO("d" << e.name << " relative error " << e.relative);
      REQUIRE(e.relative < 1e-6);
    }
  }
}

// The two longest finite-difference tests run in both storage orders; under the sanitizers (clang -O0,
// where they took 25 and 18 s per type) each runs in one, the one token test row-major and the product
// plans column-major (stack_product_test covers both orders' blocks there too).
#if defined(PEFT_TEST_SANITIZER_TYPES)
#define PEFT_ONE_TOKEN_TYPES RowMajorXd
#define PEFT_PLAN_TYPES MatrixXd
#else
#define PEFT_ONE_TOKEN_TYPES MatrixXd, RowMajorXd
#define PEFT_PLAN_TYPES MatrixXd, RowMajorXd
#endif

// At N = 1 a training step runs its products with W0 (and A A^T, B K, B^T diag(c) B) through
// stack_product, block by block; with 70 rows and 300 columns the products with W0 and W0^T span
// several blocks in both storage orders (in double: 70 x 234 column-major, 64 x 256 row-major).
TEMPLATE_TEST_CASE("DoRA gradients at one token (stack products over several blocks) match central differences",
                   "[dora]", PEFT_ONE_TOKEN_TYPES) {
  const Eigen::Index d_out = 70, d_in = 300;
  TestType W = random_matrix<TestType>(d_out, d_in, 21, 0.1);
  Eigen::VectorXd b = random_matrix<Eigen::MatrixXd>(d_out, 1, 22);
  const Eigen::MatrixXd X = random_matrix<Eigen::MatrixXd>(d_in, 1, 23);
  const Eigen::MatrixXd R = random_matrix<Eigen::MatrixXd>(d_out, 1, 24);
  for (bool detach : {true, false}) {
    INFO("detach_norm " << detach);
    peft::DoRA<TestType> dora(W, b, random_config(4, 8.0, detach));
    spread_magnitude(dora, 25);
    const auto errors = detach ? detached_gradient_errors(dora, W, b, X, R) : peft::testing::check_gradients(dora, X, R);
    REQUIRE(errors.size() == 4);
    for (const auto& e : errors) {
      INFO("d" << e.name << " relative error " << e.relative);
      REQUIRE(e.relative < 1e-6);
    }
  }
  // And the one-token step equals the same token inside a batch (Eigen's GEMM path), row by row.
  peft::DoRA<TestType> dora(W, b, random_config(4, 8.0, false));
  Eigen::MatrixXd X3(d_in, 3);
  X3 << random_matrix<Eigen::MatrixXd>(d_in, 1, 26), X, random_matrix<Eigen::MatrixXd>(d_in, 1, 27);
  typename peft::DoRA<TestType>::Cache c1, c3;
  const Eigen::MatrixXd Y1 = dora.forward(X, c1);
  const Eigen::MatrixXd Y3 = dora.forward(X3, c3);
  REQUIRE((Y1 - Y3.col(1)).cwiseAbs().maxCoeff() <= 64 * d_in * eps<double>() * Y1.cwiseAbs().maxCoeff());
  REQUIRE((c1.n - c3.n).cwiseAbs().maxCoeff() <= 64 * d_in * eps<double>() * c1.n.maxCoeff());
}

namespace {

// One training step's gradients at a batch of N tokens: every parameter against central differences
// (of DetachedLoss with the step's norms in detached mode, of the adapter's own loss otherwise), and
// dX along three random directions V: <dX, V> against the central difference of L along V (a full
// check of dX would take 2 N d_in evaluations).
template <class M>
std::vector<peft::testing::GradientError> batch_gradient_errors(const peft::DoRA<M>& dora, const M& W,
                                                             const Eigen::VectorXd& b, const Eigen::MatrixXd& X,
                                                             const Eigen::MatrixXd& R) {
  peft::DoRA<M> analytic = dora;
  typename peft::DoRA<M>::Cache cache;
  analytic.forward(X, cache);
  const Eigen::MatrixXd dX = analytic.backward(R, cache);
  const DetachedLoss detached{Eigen::MatrixXd(W), R, Eigen::MatrixXd::Ones(X.rows(), X.cols()), b,
                              cache.n, double(dora.scaling()), dora.rank()};
  const auto loss = [&](const Eigen::VectorXd& theta, const Eigen::MatrixXd& Xv) {
    if (dora.config().detach_norm) return detached(theta, Xv);
    return peft::testing::loss_on_copy(dora, Xv, R, [&](peft::DoRA<M>& copy) { copy.flat_values() = theta; });
  };
  const Eigen::VectorXd theta = dora.flat_values();
  const double h = 1e-6;
  Eigen::VectorXd along(3), fd_along(3);
  for (int j = 0; j < 3; ++j) {
    const Eigen::MatrixXd V = random_matrix<Eigen::MatrixXd>(X.rows(), X.cols(), 300 + j);
    along(j) = dX.cwiseProduct(V).sum();
    fd_along(j) = (loss(theta, X + h * V) - loss(theta, X - h * V)) / (2 * h);
  }
  std::vector<peft::testing::GradientError> out;
  out.push_back({"X along 3 directions", peft::testing::relative_error(along, fd_along)});
  parameter_errors(analytic, fd_theta(loss, theta, X, h), out);
  return out;
}

}  // namespace

// A training step computes its products with W0 (W0 [X | A^T]; exact backward: W0^T [G' | diag(c) B])
// by one of three plans, chosen by whether Eigen runs the base product W0 X on several threads and by
// the width N + r (detail/product_plan.hpp, product_with_base). At 32 x 32, r = 4: N = 100 on two threads is one
// parallel GEMM; N = 100 on one thread (N + r > 96) the base product plus stack_product; N = 10 on one
// thread stack_product alone.
TEMPLATE_TEST_CASE("DoRA gradients match central differences through each product plan", "[dora]",
                   PEFT_PLAN_TYPES) {
  struct Plan {
    const char* name;
    int threads;
    Eigen::Index tokens;
  };
  const Eigen::Index d = 32;
  TestType W = random_matrix<TestType>(d, d, 31, 0.2);
  Eigen::VectorXd b = random_matrix<Eigen::MatrixXd>(d, 1, 32);
  for (const Plan& plan : {Plan{"one parallel GEMM", 2, 100}, Plan{"base product + stack_product", 1, 100},
                           Plan{"stack_product", 1, 10}}) {
    INFO(plan.name);
    const EigenThreads threads(plan.threads);
#ifdef EIGEN_HAS_OPENMP
    REQUIRE(peft::detail::eigen_gemm_runs_parallel(d, plan.tokens, d) == (plan.threads > 1));
#endif
    const Eigen::MatrixXd X = random_matrix<Eigen::MatrixXd>(d, plan.tokens, 33);
    const Eigen::MatrixXd R = random_matrix<Eigen::MatrixXd>(d, plan.tokens, 34);
    for (bool detach : {true, false}) {
      INFO("detach_norm " << detach);
      peft::DoRA<TestType> dora(W, b, random_config(4, 8.0, detach));
      spread_magnitude(dora, 35);
      // The step's values first (finite differences of the step's own forward could not see a wrong P).
      const Reference ref = reference(dora, W);
      const Eigen::MatrixXd expected = reference_forward(ref, b, X);
      typename peft::DoRA<TestType>::Cache cache;
      REQUIRE((dora.forward(X, cache) - expected).cwiseAbs().maxCoeff() <=
              64 * d * eps<double>() * expected.cwiseAbs().maxCoeff());
      REQUIRE((cache.n - ref.n).cwiseAbs().maxCoeff() <= 64 * d * eps<double>() * ref.n.maxCoeff());
      const auto errors = batch_gradient_errors(dora, W, b, X, R);
      REQUIRE(errors.size() == 4);
      for (const auto& e : errors) {
        INFO("d" << e.name << " relative error " << e.relative);
        REQUIRE(e.relative < 1e-6);
      }
    }
  }
}

TEST_CASE("DoRA exact gradients are the detached ones plus the terms through the norm") {
  Layer<MatrixXd> l;
  peft::DoRA<MatrixXd> detached(l.W, l.b, random_config(3, 5.0, true));
  peft::DoRA<MatrixXd> exact(l.W, l.b, random_config(3, 5.0, false));
  spread_magnitude(detached, 9);
  exact.flat_values() = detached.flat_values();
  const Eigen::MatrixXd G = random_matrix<Eigen::MatrixXd>(kOut, kTokens, 10);
  peft::DoRA<MatrixXd>::Cache cd, ce;
  REQUIRE(detached.forward(l.X, cd) == exact.forward(l.X, ce));  // one forward for both modes
  const Eigen::MatrixXd dX_d = detached.backward(G, cd);
  const Eigen::MatrixXd dX_e = exact.backward(G, ce);
  REQUIRE(dX_d == dX_e);  // X does not enter the norms

  // dL/dV = diag(c) V with c = -g q / n^2 (materialised here): dB gains s diag(c) V A^T, dA gains
  // s B^T diag(c) V, dm is unchanged.
  const Reference ref = reference(detached, l.W);
  const Eigen::VectorXd q = G.cwiseProduct(cd.Z).rowwise().sum();
  const Eigen::VectorXd c = -ref.g.cwiseProduct(q).cwiseQuotient(ref.n.cwiseProduct(ref.n));
  const Eigen::MatrixXd dV = c.asDiagonal() * ref.V;
  auto pd = detached.parameters();
  auto pe = exact.parameters();
  const Eigen::MatrixXd dA_norm = ref.s * ref.B.transpose() * dV;
  const Eigen::MatrixXd dB_norm = ref.s * dV * ref.A.transpose();
  REQUIRE(dB_norm.norm() > 1e-2 * pd[1].grad.norm());  // the terms are not negligible here
  REQUIRE((pe[0].grad - pd[0].grad - dA_norm).cwiseAbs().maxCoeff() < 1e-12);
  REQUIRE((pe[1].grad - pd[1].grad - dB_norm).cwiseAbs().maxCoeff() < 1e-12);
  REQUIRE(pe[2].grad == pd[2].grad);
}
