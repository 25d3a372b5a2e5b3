// peft::DoRA against MATH.md's DoRA section: init, the factored norm, forward, gradients in both modes,
// merge and unmerge, errors, copies, threads.
#include "support/catch.hpp"
#include "support/errors.hpp"
#include "support/grad_check.hpp"
#include "support/heap_probe.hpp"  // defines malloc & co. for this executable
#include "support/matrices.hpp"

#include <peft/adapters/dora.hpp>
#include <peft/adapters/lora.hpp>

#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

using peft::test::eps;
using peft::test::largest_allocation;
using peft::test::MatrixXd;
using peft::test::MatrixXf;
using peft::test::random_matrix;
using peft::test::RowMajorXd;
using peft::test::RowMajorXf;

using peft::test::message_of;
using peft::test::same_bits;

namespace {

constexpr Eigen::Index kOut = 7, kIn = 5, kTokens = 4;

template <class M>
struct Layer {
  using Scalar = typename M::Scalar;
  M W = random_matrix<M>(kOut, kIn, 11);
  peft::VectorX<Scalar> b = random_matrix<peft::MatrixX<Scalar>>(kOut, 1, 12);
  peft::MatrixX<Scalar> X = random_matrix<peft::MatrixX<Scalar>>(kIn, kTokens, 13);
};

peft::DoRAConfig random_config(Eigen::Index rank = 3, double alpha = 6.0, bool detach_norm = true) {
  peft::DoRAConfig cfg;
  cfg.rank = rank;
  cfg.alpha = alpha;
  cfg.init = peft::LoRAInit::random;  // B != 0: the branch and the norms' dependence on B are real
  cfg.seed = 42;
  cfg.detach_norm = detach_norm;
  return cfg;
}

// Moves the magnitude away from the norms (gain g = m / n in [0.75, 1.75]), as training would.
template <class Adapter>
void spread_magnitude(Adapter& dora, std::uint64_t seed) {
  using Scalar = typename Adapter::Scalar;
  const peft::VectorX<Scalar> f = random_matrix<peft::MatrixX<Scalar>>(dora.d_out(), 1, seed);
  dora.magnitude().array() *= Scalar(1.25) + Scalar(0.5) * f.array();
}

// The materialised quantities, in double: V = W0 + s B A, n = row norms of V, g = m / n.
struct Reference {
  Eigen::MatrixXd V, A, B;
  Eigen::VectorXd n, g, m;
  double s;
};

template <class Adapter, class M>
Reference reference(const Adapter& dora, const M& W0) {
  Reference ref;
  ref.s = static_cast<double>(dora.scaling());
  ref.A = dora.A().template cast<double>();
  ref.B = dora.B().template cast<double>();
  ref.m = dora.magnitude().template cast<double>();
  ref.V = W0.template cast<double>() + ref.s * ref.B * ref.A;
  ref.n = ref.V.rowwise().norm();
  ref.g = ref.m.cwiseQuotient(ref.n);
  return ref;
}

// Y = diag(g) V X + b 1^T (no dropout), in double.
template <class V, class X_t>
Eigen::MatrixXd reference_forward(const Reference& ref, const V& b, const X_t& X) {
  Eigen::MatrixXd Y = ref.g.asDiagonal() * (ref.V * X.template cast<double>());
  return Y.colwise() + b.template cast<double>();
}



}  // namespace

// ---------------------------------------------------------------------------------------------------
// Init

TEMPLATE_TEST_CASE("DoRA starts as the identity of the base layer", "[dora]", MatrixXf, MatrixXd, RowMajorXf,
                   RowMajorXd) {
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

    // Y = W0 X + b up to the summation order of the joint product.
    peft::MatrixX<Scalar> base = l.W * l.X;
    base.colwise() += l.b;
    const double scale = (l.W.cwiseAbs() * l.X.cwiseAbs()).maxCoeff() + l.b.cwiseAbs().maxCoeff();
    REQUIRE((dora.forward(l.X) - base).cwiseAbs().maxCoeff() <= 4 * (kIn + 2) * eps<Scalar>() * scale);
    typename peft::DoRA<TestType>::Cache cache;
    REQUIRE((dora.forward(l.X, cache) - base).cwiseAbs().maxCoeff() <= 4 * (kIn + 2) * eps<Scalar>() * scale);
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
}

// ---------------------------------------------------------------------------------------------------
// The factored norm and forward

TEMPLATE_TEST_CASE("DoRA factored norms match a materialised reference even where s B A cancels W0", "[dora]",
                   MatrixXf, MatrixXd, RowMajorXf, RowMajorXd) {
  using Scalar = typename TestType::Scalar;
  const Eigen::Index d_out = 12, d_in = 600, r = 3;  // a recomputed row is formed in 3 chunks of <= 256
  const peft::DoRAConfig cfg = random_config(r, 6.0);
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
  const Eigen::VectorXd scale =
      W.template cast<double>().rowwise().norm() + std::abs(ref.s) * ref.B.cwiseAbs() * a;
  const double tol = 16.0 * double(d_in + r + 2) * eps<Scalar>();
  for (Eigen::Index i = 0; i < d_out; ++i) {
    INFO("row " << i << ": n " << n(i) << ", materialised " << ref.n(i) << ", scale " << scale(i));
    REQUIRE(std::abs(n(i) - ref.n(i)) <= tol * scale(i));
  }
  REQUIRE(std::abs(n(1) - ref.n(1)) <= 1e-2 * ref.n(1));  // a cancelling row, still accurate relatively

  // Forward stays finite; the zero row outputs exactly 0 (no bias here).
  const peft::MatrixX<Scalar> X = random_matrix<peft::MatrixX<Scalar>>(d_in, 3, 6);
  const peft::MatrixX<Scalar> Y = dora.forward(X);
  REQUIRE(Y.allFinite());
  REQUIRE(Y.row(4).isZero(0));
}

TEMPLATE_TEST_CASE("DoRA forward equals the formula", "[dora]", MatrixXf, MatrixXd, RowMajorXf, RowMajorXd) {
  using Scalar = typename TestType::Scalar;
  Layer<TestType> l;
  peft::DoRA<TestType> dora(l.W, l.b, random_config());
  spread_magnitude(dora, 7);
  const Reference ref = reference(dora, l.W);
  const auto close = [&](const peft::MatrixX<Scalar>& Y, const Eigen::MatrixXd& expected) {
    return (Y.template cast<double>() - expected).cwiseAbs().maxCoeff() <=
           64 * eps<Scalar>() * (expected.cwiseAbs().maxCoeff() + 1);
  };
  const Eigen::MatrixXd expected = reference_forward(ref, l.b, l.X);
  REQUIRE(close(dora.forward(l.X), expected));

  // The training forward (no dropout) gives the same output, in either mode.
  for (bool detach : {true, false}) {
    peft::DoRA<TestType> training(l.W, l.b, random_config(3, 6.0, detach));
    training.flat_values() = dora.flat_values();
    typename peft::DoRA<TestType>::Cache cache;
    REQUIRE(training.forward(l.X, cache) == dora.forward(l.X));
    REQUIRE(close(cache.n, ref.n));
  }

  // A large batch takes the inference path with two products; the same values.
  const peft::MatrixX<Scalar> X_large = random_matrix<peft::MatrixX<Scalar>>(kIn, 40, 8);
  REQUIRE(close(dora.forward(X_large), reference_forward(ref, l.b, X_large)));
  typename peft::DoRA<TestType>::Cache cache;
  REQUIRE(close(dora.forward(X_large, cache), reference_forward(ref, l.b, X_large)));

  // Without a bias: the bias is not rescaled, so it is simply absent.
  peft::DoRA<TestType> no_bias(l.W, random_config());
  no_bias.flat_values() = dora.flat_values();
  REQUIRE(close(no_bias.forward(l.X), reference_forward(ref, Eigen::VectorXd::Zero(kOut), l.X)));
}

TEST_CASE("DoRA gives the same results for column-major and row-major weights") {
  Layer<MatrixXd> c;
  Layer<RowMajorXd> r;
  REQUIRE(MatrixXd(r.W) == c.W);
  const peft::DoRA<MatrixXd> dc(c.W, c.b, random_config());
  const peft::DoRA<RowMajorXd> dr(r.W, r.b, random_config());
  REQUIRE((dc.flat_values() - dr.flat_values()).cwiseAbs().maxCoeff() < 1e-15);
  REQUIRE((dc.forward(c.X) - dr.forward(r.X)).cwiseAbs().maxCoeff() < 1e-14);
}

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

// ---------------------------------------------------------------------------------------------------
// Gradients

TEST_CASE("DoRA exact gradients match central differences in double") {
  struct Case {
    const char* name;
    double dropout;
    bool rslora;
    bool bias;
  };
  const Case cases[] = {{"plain", 0.0, false, true},
                        {"no bias", 0.0, false, false},
                        {"rsLoRA", 0.0, true, true},
                        {"dropout", 0.3, false, true},
                        {"dropout and rsLoRA", 0.5, true, false}};
  for (const Case& c : cases) {
    peft::DoRAConfig cfg = random_config(3, 5.0, /*detach_norm=*/false);
    cfg.dropout = c.dropout;
    cfg.use_rslora = c.rslora;
    Layer<MatrixXd> cl;
    Layer<RowMajorXd> rl;
    const Eigen::MatrixXd R = random_matrix<Eigen::MatrixXd>(kOut, kTokens, 99);
    auto col = c.bias ? peft::DoRA<MatrixXd>(cl.W, cl.b, cfg) : peft::DoRA<MatrixXd>(cl.W, cfg);
    auto row = c.bias ? peft::DoRA<RowMajorXd>(rl.W, rl.b, cfg) : peft::DoRA<RowMajorXd>(rl.W, cfg);
    spread_magnitude(col, 17);
    spread_magnitude(row, 17);
    const auto errors_col = peft::test::check_gradients(col, cl.X, R);
    const auto errors_row = peft::test::check_gradients(row, rl.X, R);
    REQUIRE(errors_col.size() == 4);
    for (const auto* errors : {&errors_col, &errors_row})
      for (const auto& e : *errors) {
        INFO(c.name << ": d" << e.name << " relative error " << e.relative);
        REQUIRE(e.relative < 1e-6);
      }
  }
}

namespace {

// L = <R, diag(m / n0) (W0 X + s B A (X ⊙ mask)) + b 1^T> with the norms n0 held fixed: the function
// whose gradient the detached backward computes (DoRA paper §4.3). theta is the adapter's flat layout.
struct DetachedLoss {
  Eigen::MatrixXd W0, R, mask;
  Eigen::VectorXd b, n0;
  double s;
  Eigen::Index r;

  double operator()(const Eigen::VectorXd& theta, const Eigen::MatrixXd& X) const {
    const Eigen::Index d_out = W0.rows(), d_in = W0.cols();
    const Eigen::Map<const Eigen::MatrixXd> A(theta.data(), r, d_in);
    const Eigen::Map<const Eigen::MatrixXd> B(theta.data() + r * d_in, d_out, r);
    const Eigen::Map<const Eigen::VectorXd> m(theta.data() + r * (d_in + d_out), d_out);
    const Eigen::MatrixXd Z = W0 * X + s * B * (A * X.cwiseProduct(mask));
    Eigen::MatrixXd Y = m.cwiseQuotient(n0).asDiagonal() * Z;
    if (b.size() != 0) Y.colwise() += b;
    return R.cwiseProduct(Y).sum();
  }
};

// Relative errors of a detached DoRA's dX and parameter gradients (from one forward(X, cache) and
// backward(R, cache)) against central differences of DetachedLoss, with the norms of that forward.
template <class Adapter, class M>
std::vector<peft::test::GradientError> detached_gradient_errors(Adapter& dora, const M& W, const Eigen::VectorXd& b,
                                                                const Eigen::MatrixXd& X, const Eigen::MatrixXd& R) {
  typename Adapter::Cache cache;
  dora.forward(X, cache);
  const Eigen::MatrixXd dX = dora.backward(R, cache);
  const bool dropout = cache.branch.mask.size() != 0;
  const DetachedLoss loss{Eigen::MatrixXd(W), R,
                          dropout ? Eigen::MatrixXd(cache.branch.mask) : Eigen::MatrixXd(Eigen::MatrixXd::Ones(X.rows(), X.cols())), b,
                          cache.n, double(dora.scaling()), dora.rank()};
  const Eigen::VectorXd theta = dora.flat_values();
  const double h = 1e-6;
  Eigen::VectorXd fd_theta(theta.size());
  for (Eigen::Index k = 0; k < theta.size(); ++k) {
    Eigen::VectorXd tp = theta, tm = theta;
    tp(k) += h;
    tm(k) -= h;
    fd_theta(k) = (loss(tp, X) - loss(tm, X)) / (2 * h);
  }
  Eigen::VectorXd fd_x(X.size());
  for (Eigen::Index k = 0; k < X.size(); ++k) {
    Eigen::MatrixXd xp = X, xm = X;
    xp(k) += h;
    xm(k) -= h;
    fd_x(k) = (loss(theta, xp) - loss(theta, xm)) / (2 * h);
  }
  std::vector<peft::test::GradientError> out;
  out.push_back({"X", peft::test::relative_error(Eigen::Map<const Eigen::VectorXd>(dX.data(), dX.size()), fd_x)});
  for (const auto& p : dora.parameters()) {
    const Eigen::Index offset = p.value.data() - dora.flat_values().data();
    out.push_back({p.name, peft::test::relative_error(Eigen::Map<const Eigen::VectorXd>(p.grad.data(), p.grad.size()),
                                                      fd_theta.segment(offset, p.grad.size()))});
  }
  return out;
}

}  // namespace

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

// At N = 1 a training step runs its products with W0 (and A A^T, B K, B^T diag(c) B) through
// stack_product, tile by tile; with 70 rows and 300 columns the products with W0 and W0^T span
// several tiles in both storage orders (in double: 70 x 234 column-major, 64 x 256 row-major).
TEMPLATE_TEST_CASE("DoRA gradients at one token (stack products over several tiles) match central differences",
                   "[dora]", MatrixXd, RowMajorXd) {
  const Eigen::Index d_out = 70, d_in = 300;
  TestType W = random_matrix<TestType>(d_out, d_in, 21, 0.1);
  Eigen::VectorXd b = random_matrix<Eigen::MatrixXd>(d_out, 1, 22);
  const Eigen::MatrixXd X = random_matrix<Eigen::MatrixXd>(d_in, 1, 23);
  const Eigen::MatrixXd R = random_matrix<Eigen::MatrixXd>(d_out, 1, 24);
  for (bool detach : {true, false}) {
    INFO("detach_norm " << detach);
    peft::DoRA<TestType> dora(W, b, random_config(4, 8.0, detach));
    spread_magnitude(dora, 25);
    const auto errors = detach ? detached_gradient_errors(dora, W, b, X, R) : peft::test::check_gradients(dora, X, R);
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

// Sets Eigen's thread count for a scope (Eigen::setNbThreads), and restores it.
class EigenThreads {
 public:
  explicit EigenThreads(int n) : saved_(Eigen::nbThreads()) { Eigen::setNbThreads(n); }
  ~EigenThreads() { Eigen::setNbThreads(saved_); }
  EigenThreads(const EigenThreads&) = delete;
  EigenThreads& operator=(const EigenThreads&) = delete;

 private:
  int saved_;
};

// One training step's gradients at a batch of N tokens: every parameter against central differences
// (of DetachedLoss with the step's norms in detached mode, of the adapter's own loss otherwise), and
// dX along three random directions V: <dX, V> against the central difference of L along V (a full
// check of dX would take 2 N d_in evaluations).
template <class M>
std::vector<peft::test::GradientError> batch_gradient_errors(const peft::DoRA<M>& dora, const M& W,
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
    return peft::test::loss_on_copy(dora, Xv, R, [&](peft::DoRA<M>& copy) { copy.flat_values() = theta; });
  };
  const Eigen::VectorXd theta = dora.flat_values();
  const double h = 1e-6;
  Eigen::VectorXd fd_theta(theta.size());
  for (Eigen::Index k = 0; k < theta.size(); ++k) {
    Eigen::VectorXd tp = theta, tm = theta;
    tp(k) += h;
    tm(k) -= h;
    fd_theta(k) = (loss(tp, X) - loss(tm, X)) / (2 * h);
  }
  Eigen::VectorXd along(3), fd_along(3);
  for (int j = 0; j < 3; ++j) {
    const Eigen::MatrixXd V = random_matrix<Eigen::MatrixXd>(X.rows(), X.cols(), 300 + j);
    along(j) = dX.cwiseProduct(V).sum();
    fd_along(j) = (loss(theta, X + h * V) - loss(theta, X - h * V)) / (2 * h);
  }
  std::vector<peft::test::GradientError> out;
  out.push_back({"X along 3 directions", peft::test::relative_error(along, fd_along)});
  for (const auto& p : analytic.parameters()) {
    const Eigen::Index offset = p.value.data() - analytic.flat_values().data();
    out.push_back({p.name, peft::test::relative_error(Eigen::Map<const Eigen::VectorXd>(p.grad.data(), p.grad.size()),
                                                      fd_theta.segment(offset, p.grad.size()))});
  }
  return out;
}

}  // namespace

// A training step computes its products with W0 (W0 [X | A^T]; exact backward: W0^T [G' | diag(c) B])
// by one of three plans, chosen by whether Eigen runs the base product W0 X on several threads and by
// the width N + r (dora.hpp, product_with_base). At 32 x 32, r = 4: N = 100 on two threads is one
// parallel GEMM; N = 100 on one thread (N + r > 96) the base product plus stack_product; N = 10 on one
// thread stack_product alone.
TEMPLATE_TEST_CASE("DoRA gradients match central differences through each product plan", "[dora]", MatrixXd,
                   RowMajorXd) {
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

TEMPLATE_TEST_CASE("DoRA float and double gradients agree", "[dora]", MatrixXf, RowMajorXf) {
  using Twin = peft::test::rebind_t<TestType, double>;
  for (bool detach : {true, false}) {
    INFO("detach_norm " << detach);
    Layer<TestType> l;
    peft::DoRAConfig cfg = random_config(3, 6.0, detach);
    cfg.dropout = 0.25;
    peft::DoRA<TestType> dora(l.W, l.b, cfg);
    spread_magnitude(dora, 4);
    Twin Wd = l.W.template cast<double>();
    Eigen::VectorXd bd = l.b.template cast<double>();
    peft::DoRA<Twin> twin(Wd, bd, cfg);  // same seed: same dropout masks
    twin.flat_values() = dora.flat_values().template cast<double>();

    const Eigen::MatrixXf G = random_matrix<Eigen::MatrixXf>(kOut, kTokens, 21);
    typename peft::DoRA<TestType>::Cache cache;
    typename peft::DoRA<Twin>::Cache cache_d;
    const Eigen::MatrixXf Y = dora.forward(l.X, cache);
    const Eigen::MatrixXd Yd = twin.forward(l.X.template cast<double>(), cache_d);
    const Eigen::MatrixXf dX = dora.backward(G, cache);
    const Eigen::MatrixXd dXd = twin.backward(G.cast<double>(), cache_d);

    const auto close = [](const auto& f, const Eigen::MatrixXd& d) {
      return (f.template cast<double>() - d).norm() <= 1e-5 * d.norm();
    };
    REQUIRE(close(Y, Yd));
    REQUIRE(close(dX, dXd));
    for (std::size_t k = 0; k < 3; ++k) {
      INFO("d" << dora.parameters()[k].name);
      REQUIRE(close(dora.parameters()[k].grad, twin.parameters()[k].grad));
    }
  }
}

TEST_CASE("DoRA gradients accumulate until zero_grad and dX is fresh") {
  for (bool detach : {true, false}) {
    Layer<MatrixXd> l;
    peft::DoRA<MatrixXd> dora(l.W, l.b, random_config(3, 6.0, detach));
    const Eigen::MatrixXd G = random_matrix<Eigen::MatrixXd>(kOut, kTokens, 3);
    peft::DoRA<MatrixXd>::Cache cache;
    dora.forward(l.X, cache);
    const Eigen::MatrixXd dX1 = dora.backward(G, cache);
    const Eigen::VectorXd g1 = dora.flat_grads();
    REQUIRE(!g1.isZero(0));
    const Eigen::MatrixXd dX2 = dora.backward(G, cache);  // the cache serves a second backward
    REQUIRE(dX1 == dX2);
    REQUIRE((dora.flat_grads() - 2 * g1).cwiseAbs().maxCoeff() < 1e-14);
    dora.zero_grad();
    REQUIRE(dora.flat_grads().isZero(0));
  }
}

TEST_CASE("DoRA parameters are named as in PEFT and live in the flat buffers") {
  Layer<MatrixXf> l;
  peft::DoRA<MatrixXf> dora(l.W, l.b, random_config(3));
  auto params = dora.parameters();
  REQUIRE(params.size() == 3);
  REQUIRE(std::string(params[0].name) == "lora_A");
  REQUIRE(std::string(params[1].name) == "lora_B");
  REQUIRE(std::string(params[2].name) == "lora_magnitude_vector");
  REQUIRE(params[0].value.rows() == 3);
  REQUIRE(params[0].value.cols() == kIn);
  REQUIRE(params[1].value.rows() == kOut);
  REQUIRE(params[1].value.cols() == 3);
  REQUIRE(params[2].value.rows() == kOut);
  REQUIRE(params[2].value.cols() == 1);
  REQUIRE(dora.num_parameters() == 3 * (kIn + kOut) + kOut);
  REQUIRE(params[0].value.data() == dora.flat_values().data());
  REQUIRE(params[1].value.data() == dora.flat_values().data() + 3 * kIn);
  REQUIRE(params[2].value.data() == dora.flat_values().data() + 3 * (kIn + kOut));
  REQUIRE(params[2].grad.data() == dora.flat_grads().data() + 3 * (kIn + kOut));
  REQUIRE(dora.magnitude().data() == params[2].value.data());

  for (auto& p : dora.parameters()) p.value.setConstant(0.5f);  // an optimizer step
  REQUIRE((dora.magnitude().array() == 0.5f).all());
  REQUIRE((dora.B().array() == 0.5f).all());
}

// ---------------------------------------------------------------------------------------------------
// Merge and unmerge

TEMPLATE_TEST_CASE("DoRA merged output equals unmerged output", "[dora]", MatrixXf, MatrixXd, RowMajorXf,
                   RowMajorXd) {
  using Scalar = typename TestType::Scalar;
  Layer<TestType> l;
  peft::DoRA<TestType> dora(l.W, l.b, random_config());
  spread_magnitude(dora, 5);
  const TestType W0 = l.W;
  const Reference ref = reference(dora, W0);
  const auto Y = dora.forward(l.X);
  const auto dW = dora.delta_weight();
  dora.merge();
  REQUIRE(dora.is_merged());

  // W = diag(m / n) (W0 + s B A), with the norms of this moment.
  const Eigen::MatrixXd expected = ref.g.asDiagonal() * ref.V;
  const double w_scale = (ref.g.cwiseAbs().asDiagonal() *
                          (W0.template cast<double>().cwiseAbs() + std::abs(ref.s) * ref.B.cwiseAbs() * ref.A.cwiseAbs()))
                             .maxCoeff();
  REQUIRE((l.W.template cast<double>() - expected).cwiseAbs().maxCoeff() <= 8 * (kIn + 3) * eps<Scalar>() * w_scale);
  // delta_weight() is that change, before the merge and (reconstructing W0) while merged.
  REQUIRE((W0.template cast<double>() + dW.template cast<double>() - expected).cwiseAbs().maxCoeff() <=
          8 * (kIn + 3) * eps<Scalar>() * w_scale);
  REQUIRE((dora.delta_weight() - dW).cwiseAbs().maxCoeff() <= 16 * (kIn + 3) * eps<Scalar>() * w_scale);
  REQUIRE((dora.norms() - ref.n.template cast<Scalar>()).cwiseAbs().maxCoeff() <= 16 * (kIn + 3) * eps<Scalar>() * w_scale);

  // Merged forward is exactly the base product of the merged W, bias not rescaled.
  const auto Ym = dora.forward(l.X);
  peft::MatrixX<Scalar> base = l.W * l.X;
  base.colwise() += l.b;
  REQUIRE(Ym == base);
  const double scale = w_scale * l.X.cwiseAbs().colwise().sum().maxCoeff() + l.b.cwiseAbs().maxCoeff();
  REQUIRE((Y - Ym).cwiseAbs().maxCoeff() <= 8 * (kIn + 3) * eps<Scalar>() * scale);
}

// One round trip, per element, to first order in eps (V = W0 + s B A, g = m / n, rho = n / m):
//   merge    W1 = fl(g fl(W0 + D))              D = s (B A) as the GEMM rounds it, the same in both
//   unmerge  W2 = fl(fl(rho W1) - D)
// so W2 - W0 = mu W0 + (alpha + tau + kappa + pi) V with |mu|, |alpha|, |tau|, |kappa| <= eps (the two
// additions and the two row scalings) and |pi| = |fl(rho) fl(g) - 1| <= 2 eps. Hence
//   |W2 - W0| <= eps |W0| + 5 eps |V|,
// MATH.md's LoRA bound 2 eps (|W0| + |dW|) (= eps |W0| + eps |W0 + D| there) plus 4 eps |V| for the
// row scalings. V here is the computed W0 + D: |V| is taken in double plus (r + 2) eps |s| |B| |A|.
template <class M>
M round_trip_bound(const M& W0, const Reference& ref, Eigen::Index r) {
  using Scalar = typename M::Scalar;
  const double e = eps<Scalar>();
  const Eigen::MatrixXd Lt = std::abs(ref.s) * ref.B.cwiseAbs() * ref.A.cwiseAbs();
  const Eigen::MatrixXd V = ref.V.cwiseAbs() + double(r + 2) * e * Lt;
  return (e * W0.template cast<double>().cwiseAbs() + 5 * e * V).template cast<Scalar>();
}

TEMPLATE_TEST_CASE("DoRA unmerge restores W within the derived bound", "[dora]", MatrixXf, MatrixXd, RowMajorXf,
                   RowMajorXd) {
  using Scalar = typename TestType::Scalar;
  // Larger magnitudes in s B A than in W and gains away from 1, so rounding is visible.
  TestType W = random_matrix<TestType>(33, 21, 5);
  const TestType W0 = W;
  peft::DoRA<TestType> dora(W, random_config(4, 40.0));
  spread_magnitude(dora, 6);
  const Reference ref = reference(dora, W0);
  const TestType dW = dora.delta_weight();
  dora.merge();
  dora.unmerge();
  REQUIRE(!dora.is_merged());
  const TestType bound = round_trip_bound(W0, ref, 4);
  const TestType err = (W - W0).cwiseAbs();
  REQUIRE((err.array() <= bound.array()).all());
  // Not vacuous: within a factor 4 of the worst element; and MATH.md's LoRA form 2 eps (|W0| + |dW|),
  // dW = delta_weight(), does not hold for DoRA (the row scalings add rounding it does not count).
  REQUIRE((err.array() > Scalar(0.25) * bound.array()).any());
  const TestType lora_form = 2 * Scalar(eps<Scalar>()) * (W0.cwiseAbs() + dW.cwiseAbs());
  REQUIRE((err.array() > lora_form.array()).any());
  // The adapter trains on from the restored W0.
  typename peft::DoRA<TestType>::Cache cache;
  REQUIRE(dora.forward(random_matrix<peft::MatrixX<Scalar>>(21, 2, 1), cache).allFinite());
}

TEMPLATE_TEST_CASE("DoRA unmerge takes out what merge put in even if parameters changed meanwhile", "[dora]",
                   MatrixXd, RowMajorXf) {
  using Scalar = typename TestType::Scalar;
  TestType W = random_matrix<TestType>(9, 6, 1);
  const TestType W0 = W;
  peft::DoRA<TestType> dora(W, random_config());
  spread_magnitude(dora, 2);
  const Reference ref = reference(dora, W0);
  dora.merge();
  for (auto& p : dora.parameters()) p.value.setConstant(Scalar(3));  // an optimizer step while merged
  dora.unmerge();
  REQUIRE(((W - W0).cwiseAbs().array() <= round_trip_bound(W0, ref, 3).array()).all());
  REQUIRE((dora.magnitude().array() == Scalar(3)).all());  // the parameters themselves are the new ones
}

TEMPLATE_TEST_CASE("DoRA merge and unmerge run over several scratch blocks", "[dora]", MatrixXf, RowMajorXf) {
  // 2000 outer slices of 300: two blocks of the 2^19-element scratch.
  const bool row_major = TestType::IsRowMajor;
  TestType W = random_matrix<TestType>(row_major ? 2000 : 300, row_major ? 300 : 2000, 1);
  const TestType W0 = W;
  peft::DoRA<TestType> dora(W, random_config(8, 16.0));
  spread_magnitude(dora, 3);
  const Reference ref = reference(dora, W0);
  dora.merge();
  const Eigen::MatrixXd expected = ref.g.asDiagonal() * ref.V;
  REQUIRE((W.template cast<double>() - expected).cwiseAbs().maxCoeff() <= 1e-5 * expected.cwiseAbs().maxCoeff());
  dora.unmerge();
  REQUIRE(((W - W0).cwiseAbs().array() <= round_trip_bound(W0, ref, 8).array()).all());
}

TEMPLATE_TEST_CASE("DoRA unmerge refuses a row whose magnitude was zero at merge and leaves W untouched", "[dora]",
                   MatrixXf, RowMajorXd) {
  using Scalar = typename TestType::Scalar;
  TestType W = random_matrix<TestType>(6, 5, 3);
  const TestType W0 = W;
  peft::DoRA<TestType> dora(W, random_config(2, 2.0));
  dora.magnitude()(2) = Scalar(0);
  dora.merge();  // allowed (deployment), but row 2 of W is now 0: nothing of W0_2 is left
  REQUIRE(W.row(2).isZero(0));
  dora.magnitude()(2) = Scalar(1);  // today's magnitude does not matter: merge time's does
  const TestType merged = W;
  REQUIRE_THROWS_AS(dora.unmerge(), peft::NumericalError);
  REQUIRE(dora.is_merged());
  REQUIRE(same_bits(W, merged));
  REQUIRE_THAT(message_of([&] { dora.unmerge(); }),
               peft::test::has_substring("peft::DoRA::unmerge: lora_magnitude_vector(2) was 0 at merge()"));
  // What needs W0 while merged cannot reconstruct it either.
  REQUIRE_THROWS_AS(dora.delta_weight(), peft::NumericalError);
  REQUIRE_THROWS_AS(dora.norms(), peft::NumericalError);
  REQUIRE(same_bits(W, merged));
}

TEST_CASE("DoRA merges and unmerges a zero row of W0 whose magnitude is zero") {
  Eigen::MatrixXd W = random_matrix<Eigen::MatrixXd>(6, 5, 3);
  W.row(1).setZero();
  const Eigen::MatrixXd W0 = W;
  peft::DoRA<Eigen::MatrixXd> dora(W, peft::DoRAConfig{});  // B = 0: row 1 of W0 + s B A stays 0
  dora.B().setConstant(0.25);
  dora.B().row(1).setZero();
  REQUIRE(dora.magnitude()(1) == 0.0);
  dora.merge();
  REQUIRE(W.row(1).isZero(0));
  dora.unmerge();  // m_1 = 0 but n_1 = 0 too: row 1 of W0 is -s B_1 A = 0, restored
  REQUIRE(W.row(1).isZero(0));
  REQUIRE((W - W0).cwiseAbs().maxCoeff() < 1e-14);
}

TEMPLATE_TEST_CASE("DoRA merge and unmerge refuse to write non-finite values", "[dora]", MatrixXf, RowMajorXd) {
  using Scalar = typename TestType::Scalar;
  TestType W = random_matrix<TestType>(6, 5, 3);
  const TestType W0 = W;
  peft::DoRA<TestType> dora(W, random_config(2, 2.0));
  // |g_i V_ij| <= m_i always, so only a non-finite magnitude (or gain) makes a merged value non-finite.
  dora.magnitude()(4) = std::numeric_limits<Scalar>::infinity();
  REQUIRE_THROWS_AS(dora.merge(), peft::NumericalError);
  REQUIRE(!dora.is_merged());
  REQUIRE(same_bits(W, W0));
  REQUIRE_THAT(message_of([&] { dora.merge(); }), peft::test::has_substring("peft::DoRA::merge: W(4,"));

  // Unmerge: a user writes the lowest value into W while merged; with n / m = 2 in that row,
  // diag(n / m) W overflows to -inf.
  const peft::VectorX<Scalar> n = dora.norms();
  dora.magnitude() = n;
  dora.magnitude()(0) = n(0) / 2;
  dora.merge();
  const Scalar w00 = W(0, 0);
  W(0, 0) = std::numeric_limits<Scalar>::lowest();
  const TestType merged = W;
  REQUIRE_THROWS_AS(dora.unmerge(), peft::NumericalError);
  REQUIRE(dora.is_merged());
  REQUIRE(same_bits(W, merged));
  REQUIRE_THAT(message_of([&] { dora.unmerge(); }),
               peft::test::has_substring("peft::DoRA::unmerge: W(0,0) would become -inf"));

  // NaN in W is refused as well, W untouched to the bit.
  W(0, 0) = w00;
  dora.unmerge();
  W(1, 1) = std::numeric_limits<Scalar>::quiet_NaN();
  const TestType with_nan = W;
  REQUIRE_THROWS_AS(dora.merge(), peft::NumericalError);
  REQUIRE(same_bits(W, with_nan));
}

TEMPLATE_TEST_CASE("DoRA row-scaled low-rank update checks every block before writing", "[dora]", MatrixXf,
                   RowMajorXd) {
  using Scalar = typename TestType::Scalar;
  const peft::detail::Where where{"test", "update"};
  const TestType W0 = random_matrix<TestType>(13, 17, 1);
  const peft::MatrixX<Scalar> B = random_matrix<peft::MatrixX<Scalar>>(13, 3, 2);
  const peft::MatrixX<Scalar> A = random_matrix<peft::MatrixX<Scalar>>(3, 17, 3);
  const peft::VectorX<Scalar> d = random_matrix<peft::MatrixX<Scalar>>(13, 1, 4).array() + Scalar(2);
  const Scalar s = Scalar(1.5);
  const TestType after = d.asDiagonal() * (W0 + s * B * A);    // merge: scale after the add
  const TestType before = d.asDiagonal() * W0 + s * B * A;     // unmerge: scale before the add
  const double tol = 16 * eps<Scalar>() * after.cwiseAbs().maxCoeff();
  for (Eigen::Index block_elems : {Eigen::Index(1), Eigen::Index(40), Eigen::Index(1) << 19})
    for (bool check : {true, false}) {
      TestType W = W0;
      peft::detail::scale_rows_add_low_rank_blocked<false>(where, W, d, s, B, A, check, block_elems);
      REQUIRE((W - after).cwiseAbs().maxCoeff() <= tol);
      W = W0;
      peft::detail::scale_rows_add_low_rank_blocked<true>(where, W, d, s, B, A, check, block_elems);
      REQUIRE((W - before).cwiseAbs().maxCoeff() <= tol);
    }
  TestType W = W0;
  peft::detail::scale_rows_add_low_rank_checked<false>(where, W, d, s, B, A);
  REQUIRE((W - after).cwiseAbs().maxCoeff() <= tol);

  // A NaN in the last block: found after earlier blocks were computed, and nothing is written.
  W = W0;
  W(12, 16) = std::numeric_limits<Scalar>::quiet_NaN();
  const TestType with_nan = W;
  for (Eigen::Index block_elems : {Eigen::Index(13), Eigen::Index(1) << 19}) {
    REQUIRE_THROWS_AS(peft::detail::scale_rows_add_low_rank_blocked<false>(where, W, d, s, B, A, true, block_elems),
                      peft::NumericalError);
    REQUIRE(same_bits(W, with_nan));
  }
  REQUIRE_THROWS_AS(peft::detail::scale_rows_add_low_rank_checked<true>(where, W, d, s, B, A), peft::NumericalError);
  REQUIRE(same_bits(W, with_nan));

  // Near overflow but finite: beyond the fast bound (max / 2), accepted by the exact check.
  const Scalar quarter = std::numeric_limits<Scalar>::max() / 4;
  TestType Wbig = TestType::Constant(5, 4, Scalar(1.5) * quarter);
  const peft::MatrixX<Scalar> ones_B = peft::MatrixX<Scalar>::Constant(5, 1, Scalar(1));
  const peft::MatrixX<Scalar> ones_A = peft::MatrixX<Scalar>::Constant(1, 4, quarter);
  const peft::VectorX<Scalar> half = peft::VectorX<Scalar>::Constant(5, Scalar(0.5));
  const TestType expected_big = (Wbig + ones_B * ones_A) * Scalar(0.5);  // 1.25 quarter
  REQUIRE(expected_big.allFinite());
  peft::detail::scale_rows_add_low_rank_checked<false>(where, Wbig, half, Scalar(1), ones_B, ones_A);
  REQUIRE(((Wbig - expected_big).array().abs() <= 4 * eps<Scalar>() * expected_big.array()).all());
}

// ---------------------------------------------------------------------------------------------------
// Errors and state

TEST_CASE("DoRA rejects invalid configurations") {
  Eigen::MatrixXf W = random_matrix<Eigen::MatrixXf>(4, 3, 1);
  const Eigen::MatrixXf W0 = W;
  const auto make = [&](auto edit) {
    peft::DoRAConfig cfg;
    edit(cfg);
    return peft::DoRA<Eigen::MatrixXf>(W, cfg);
  };
  REQUIRE_THROWS_AS(make([](auto& c) { c.rank = 0; }), peft::ConfigError);
  REQUIRE_THROWS_AS(make([](auto& c) { c.alpha = 0; }), peft::ConfigError);
  REQUIRE_THROWS_AS(make([](auto& c) { c.alpha = std::numeric_limits<double>::quiet_NaN(); }), peft::ConfigError);
  REQUIRE_THROWS_AS(make([](auto& c) { c.dropout = 1.0; }), peft::ConfigError);
  REQUIRE_THROWS_AS(make([](auto& c) { c.dropout = -0.1; }), peft::ConfigError);
  REQUIRE_THAT(message_of([&] { make([](auto& c) { c.alpha = -3; }); }),
               peft::test::has_substring("peft::DoRA::constructor: alpha is -3"));
  REQUIRE(W == W0);
}

TEST_CASE("DoRA rejects shape mismatches and leaves W and b untouched") {
  Layer<MatrixXf> l;
  const MatrixXf W0 = l.W;
  const Eigen::VectorXf b0 = l.b;
  Eigen::VectorXf short_bias = Eigen::VectorXf::Zero(kOut - 1);
  REQUIRE_THROWS_AS(peft::DoRA<MatrixXf>(l.W, short_bias, random_config()), peft::ShapeError);
  MatrixXf empty(0, 3);
  REQUIRE_THROWS_AS(peft::DoRA<MatrixXf>(empty, random_config()), peft::ShapeError);

  peft::DoRA<MatrixXf> dora(l.W, l.b, random_config());
  peft::DoRA<MatrixXf>::Cache cache;
  const Eigen::MatrixXf bad_X = Eigen::MatrixXf::Ones(kIn + 1, kTokens);
  REQUIRE_THROWS_AS(dora.forward(bad_X), peft::ShapeError);
  REQUIRE_THROWS_AS(dora.forward(bad_X, cache), peft::ShapeError);
  dora.forward(l.X, cache);
  const Eigen::MatrixXf bad_rows = Eigen::MatrixXf::Ones(kOut + 1, kTokens);
  const Eigen::MatrixXf bad_cols = Eigen::MatrixXf::Ones(kOut, kTokens - 1);
  REQUIRE_THROWS_AS(dora.backward(bad_rows, cache), peft::ShapeError);
  REQUIRE_THROWS_AS(dora.backward(bad_cols, cache), peft::ShapeError);
  REQUIRE(dora.flat_grads().isZero(0));
  REQUIRE_THAT(message_of([&] { dora.backward(bad_cols, cache); }),
               peft::test::has_substring("peft::DoRA::backward: dY is 7x3, expected 7x4"));
  REQUIRE_THAT(message_of([&] { dora.forward(bad_X); }),
               peft::test::has_substring("peft::DoRA::forward: X is 6x4, expected 5 rows"));
  REQUIRE(l.W == W0);
  REQUIRE(l.b == b0);
}

TEST_CASE("DoRA enforces the merge state machine and refuses foreign or stale caches") {
  Layer<MatrixXd> l;
  const MatrixXd W0 = l.W;
  const Eigen::VectorXd b0 = l.b;
  peft::DoRA<MatrixXd> dora(l.W, l.b, random_config());
  peft::DoRA<MatrixXd> other(l.W, l.b, random_config());
  const Eigen::MatrixXd G = random_matrix<Eigen::MatrixXd>(kOut, kTokens, 4);
  peft::DoRA<MatrixXd>::Cache cache, empty_cache, other_cache;

  REQUIRE_THROWS_AS(dora.unmerge(), peft::StateError);
  REQUIRE(l.W == W0);
  REQUIRE_THROWS_AS(dora.backward(G, empty_cache), peft::StateError);
  other.forward(l.X, other_cache);
  REQUIRE_THROWS_AS(dora.backward(G, other_cache), peft::StateError);

  dora.forward(l.X, cache);
  dora.merge();
  const MatrixXd merged = l.W;
  REQUIRE_THROWS_AS(dora.merge(), peft::StateError);
  REQUIRE_THROWS_AS(dora.backward(G, cache), peft::StateError);
  REQUIRE_THROWS_AS(dora.forward(l.X, cache), peft::StateError);
  REQUIRE(l.W == merged);
  REQUIRE(l.b == b0);  // merge never touches the bias
  dora.unmerge();
  REQUIRE_THROWS_AS(dora.backward(G, cache), peft::StateError);  // stale
  REQUIRE(dora.flat_grads().isZero(0));

  // A cache whose DoRA buffers were tampered with is refused, nothing accumulated.
  dora.forward(l.X, cache);
  cache.Z.resize(kOut, kTokens + 1);
  REQUIRE_THROWS_AS(dora.backward(G, cache), peft::StateError);
  REQUIRE(dora.flat_grads().isZero(0));
  dora.forward(l.X, cache);
  REQUIRE_NOTHROW(dora.backward(G, cache));
}

TEST_CASE("DoRA copies and moves keep their parameters valid and independent") {
  Layer<MatrixXd> l;
  peft::DoRA<MatrixXd> original(l.W, l.b, random_config());
  spread_magnitude(original, 1);
  const Eigen::VectorXd values = original.flat_values();
  const Eigen::MatrixXd Y = original.forward(l.X);

  peft::DoRA<MatrixXd> copy = original;
  REQUIRE(copy.flat_values() == values);
  REQUIRE(copy.magnitude().data() != original.magnitude().data());
  copy.magnitude().setZero();
  REQUIRE(original.flat_values() == values);
  REQUIRE(original.forward(l.X) == Y);

  peft::DoRA<MatrixXd> moved = std::move(copy);
  REQUIRE(moved.magnitude().isZero(0));

  peft::DoRA<MatrixXd> assigned(l.W, random_config(1));
  assigned = original;
  REQUIRE(assigned.rank() == 3);
  REQUIRE(assigned.forward(l.X) == Y);
  std::vector<peft::DoRA<MatrixXd>> many;  // reallocation moves them
  for (int i = 0; i < 5; ++i) many.push_back(assigned);
  for (const auto& a : many) REQUIRE(a.forward(l.X) == Y);

  // A merged adapter moves its merge along; copies of it are refused.
  original.merge();
  REQUIRE_THROWS_AS(peft::DoRA<MatrixXd>(original), peft::StateError);
  peft::DoRA<MatrixXd> carrier = std::move(original);
  REQUIRE(carrier.is_merged());
  carrier.unmerge();
  REQUIRE((l.W - Layer<MatrixXd>().W).cwiseAbs().maxCoeff() < 1e-14);
}

TEST_CASE("DoRA takes empty batches and outputs that share memory with inputs") {
  MatrixXd W = random_matrix<MatrixXd>(kIn, kIn, 1);  // square: Y and X have one shape
  peft::DoRA<MatrixXd> dora(W, random_config());
  spread_magnitude(dora, 2);
  REQUIRE(dora.forward(Eigen::MatrixXd(kIn, 0)).cols() == 0);
  peft::DoRA<MatrixXd>::Cache cache;
  REQUIRE(dora.forward(Eigen::MatrixXd(kIn, 0), cache).cols() == 0);
  REQUIRE(dora.backward(Eigen::MatrixXd(kIn, 0), cache).cols() == 0);
  REQUIRE(dora.flat_grads().isZero(0));

  const Eigen::MatrixXd X = random_matrix<Eigen::MatrixXd>(kIn, kTokens, 2);
  const Eigen::MatrixXd Y = dora.forward(X);
  Eigen::MatrixXd inout = X;
  dora.forward_into(inout, inout, cache);
  REQUIRE(inout == Y);
  const Eigen::MatrixXd G = random_matrix<Eigen::MatrixXd>(kIn, kTokens, 3);
  const Eigen::MatrixXd dX = dora.backward(G, cache);
  Eigen::MatrixXd g_inout = G;
  dora.backward_into(g_inout, cache, g_inout);
  REQUIRE(g_inout == dX);
}

TEST_CASE("DoRA concurrent forward from several threads equals one thread") {
  MatrixXf W = random_matrix<MatrixXf>(96, 80, 1);
  peft::DoRA<MatrixXf> dora(W, random_config(8, 16.0));
  spread_magnitude(dora, 3);
  const auto& shared = dora;
  std::vector<Eigen::MatrixXf> inputs, expected;
  for (int t = 0; t < 4; ++t) {
    inputs.push_back(random_matrix<Eigen::MatrixXf>(80, 16 + 24 * t, 100 + t));  // both inference paths
    expected.push_back(shared.forward(inputs.back()));
  }
  std::vector<int> mismatches(4, 0);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&, t] {
      for (int rep = 0; rep < 30; ++rep)
        if (shared.forward(inputs[t]) != expected[t]) ++mismatches[t];
    });
  for (auto& th : threads) th.join();
  for (int m : mismatches) REQUIRE(m == 0);
}

// ---------------------------------------------------------------------------------------------------
// Memory

TEMPLATE_TEST_CASE("a warm DoRA step at one token allocates no more than the base step", "[dora][heap]", MatrixXf,
                   MatrixXd, RowMajorXf, RowMajorXd) {
  using Scalar = typename TestType::Scalar;
  using Matrix = peft::MatrixX<Scalar>;
  using Vector = peft::VectorX<Scalar>;
  // Where the heap is not tracked (sanitizers), the steps still run and their outputs are checked.
  const bool tracked = peft::test::heap_probe_available;
  if (!tracked) WARN("heap allocations are not tracked in this build (sanitizer or not glibc)");
  const Eigen::Index d_out = 600, d_in = 700;
  TestType W = random_matrix<TestType>(d_out, d_in, 1, 0.05);
  Vector b = random_matrix<Vector>(d_out, 1, 2);
  const Matrix X = random_matrix<Matrix>(d_in, 1, 3), G = random_matrix<Matrix>(d_out, 1, 4);
  // The base step written the ordinary way: fresh outputs, y = W x + b and dx = W^T g (two GEMVs).
  Matrix Yb, dXb;  // empty: the base step allocates its outputs
  const double base_own = largest_allocation([&] {
    Yb = W * X;
    Yb.colwise() += b;
    dXb = W.transpose() * G;
  });
  REQUIRE(Yb.allFinite());
  REQUIRE(dXb.allFinite());
  if (tracked) REQUIRE(base_own >= double(d_in * sizeof(Scalar)));  // the probe saw at least the outputs
  for (bool detach : {true, false}) {
    CAPTURE(detach);
    peft::DoRAConfig cfg;
    cfg.rank = 16;
    cfg.init = peft::LoRAInit::random;  // B != 0
    cfg.detach_norm = detach;
    peft::DoRA<TestType> dora(W, b, cfg);
    typename peft::DoRA<TestType>::Cache cache;
    Matrix Y, dX;
    const auto step = [&] {
      dora.forward_into(X, Y, cache);
      dora.backward_into(G, cache, dX);
    };
    step();  // the first step sizes the cache
    const Matrix Y_cold = Y, dX_cold = dX;
    const double warm = largest_allocation(step);
    if (tracked) {
      CHECK(warm <= base_own);  // the target
      CHECK(warm == 0.0);       // and what the design gives: no heap allocation at all
    }
    REQUIRE(Y == Y_cold);  // the same step again: the same outputs
    REQUIRE(dX == dX_cold);
    // The same step through Eigen's product where the base is a GEMM too (N = 64) still runs.
    const Matrix X64 = random_matrix<Matrix>(d_in, 64, 5), G64 = random_matrix<Matrix>(d_out, 64, 6);
    dora.forward_into(X64, Y, cache);
    dora.backward_into(G64, cache, dX);
    REQUIRE(dX.allFinite());
  }
}

// The same bound at every batch size, on one thread and on two, for square, wide and tall layers.
// Where Eigen runs the base product serially (one token, a few tokens, small layers, one thread), one
// GEMM over [X | A^T] would pack up to twice what the base product does (300 x 300 at N = 2 to 7, two
// threads): DoRA then uses stack_product, or the base product plus stack_product (dora.hpp).
TEMPLATE_TEST_CASE("a warm DoRA step allocates no more than the base step at every batch size and thread count",
                   "[dora][heap]", MatrixXf, RowMajorXf, MatrixXd) {
  using Scalar = typename TestType::Scalar;
  using Matrix = peft::MatrixX<Scalar>;
  using Vector = peft::VectorX<Scalar>;
  const bool tracked = peft::test::heap_probe_available;
  if (!tracked) WARN("heap allocations are not tracked in this build: only the steps' outputs are checked");
  const std::pair<Eigen::Index, Eigen::Index> shapes[] = {{64, 64}, {300, 300}, {40, 600}, {600, 40}};
  const std::vector<Eigen::Index> batches =
      tracked ? std::vector<Eigen::Index>{1, 2, 7, 8, 12, 80, 81, 200} : std::vector<Eigen::Index>{2, 81};
  for (int threads : {2, 1}) {
    const EigenThreads eigen_threads(threads);
    for (const auto& [d_out, d_in] : shapes) {
      for (const Eigen::Index N : batches) {
        TestType W = random_matrix<TestType>(d_out, d_in, 1, 0.05);
        Vector b = random_matrix<Vector>(d_out, 1, 2);
        const Matrix X = random_matrix<Matrix>(d_in, N, 3), G = random_matrix<Matrix>(d_out, N, 4);
        Matrix Yb, dXb;  // the base step, written the ordinary way: fresh outputs
        const double base_own = largest_allocation([&] {
          Yb = W * X;
          Yb.colwise() += b;
          dXb = W.transpose() * G;
        });
        for (bool detach : {true, false}) {
          CAPTURE(threads, d_out, d_in, N, detach);
          peft::DoRAConfig cfg;
          cfg.rank = 16;
          cfg.init = peft::LoRAInit::random;  // B != 0
          cfg.detach_norm = detach;
          peft::DoRA<TestType> dora(W, b, cfg);
          typename peft::DoRA<TestType>::Cache cache;
          Matrix Y, dX;
          const auto step = [&] {
            dora.forward_into(X, Y, cache);
            dora.backward_into(G, cache, dX);
          };
          step();  // sizes the cache
          const double warm = largest_allocation(step);
          CAPTURE(warm, base_own);
          if (tracked) CHECK(warm <= base_own);
          // The step's output equals the const forward's (Eigen's GEMM on all threads) within rounding.
          const Matrix reference = dora.forward(X);
          const Scalar scale = (W.cwiseAbs() * X.cwiseAbs()).maxCoeff() * std::max(Scalar(1), cache.g.maxCoeff());
          REQUIRE((Y - reference).cwiseAbs().maxCoeff() <= Scalar(16 * (d_in + 16)) * eps<Scalar>() * scale);
          REQUIRE(dX.allFinite());
        }
      }
    }
  }
}
