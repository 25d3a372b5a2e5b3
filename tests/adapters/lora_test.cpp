// peft::LoRA against MATH.md's LoRA section: init, forward, gradients, merge, errors, copies, threads.
#include "support/catch.hpp"
#include "support/errors.hpp"
#include "support/grad_check.hpp"
#include "support/matrices.hpp"

#include <peft/adapters/lora.hpp>

#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

using peft::test::eps;
using peft::test::message_of;
using peft::test::same_bits;
using peft::test::MatrixXd;
using peft::test::MatrixXf;
using peft::test::random_matrix;
using peft::test::RowMajorXd;
using peft::test::RowMajorXf;

namespace {

constexpr Eigen::Index kOut = 7, kIn = 5, kTokens = 4;

template <class M>
struct Layer {
  using Scalar = typename M::Scalar;
  M W = random_matrix<M>(kOut, kIn, 11);
  peft::VectorX<Scalar> b = random_matrix<peft::MatrixX<Scalar>>(kOut, 1, 12);
  peft::MatrixX<Scalar> X = random_matrix<peft::MatrixX<Scalar>>(kIn, kTokens, 13);
};

peft::LoRAConfig random_config(Eigen::Index rank = 3, double alpha = 6.0) {
  peft::LoRAConfig cfg;
  cfg.rank = rank;
  cfg.alpha = alpha;
  cfg.init = peft::LoRAInit::random;
  cfg.seed = 42;
  return cfg;
}

// Y = (W + s B A) X + b 1^T, computed naively in double.
template <class Adapter, class M, class V, class X_t>
Eigen::MatrixXd reference_forward(const Adapter& lora, const M& W, const V& b, const X_t& X) {
  const Eigen::MatrixXd Wd = W.template cast<double>();
  const Eigen::MatrixXd A = lora.A().template cast<double>(), B = lora.B().template cast<double>();
  Eigen::MatrixXd Y = (Wd + static_cast<double>(lora.scaling()) * B * A) * X.template cast<double>();
  return Y.colwise() + b.template cast<double>();
}

}  // namespace

TEMPLATE_TEST_CASE("LoRA starts as the identity of the base layer", "[lora]", MatrixXf, MatrixXd, RowMajorXf,
                   RowMajorXd) {
  using Scalar = typename TestType::Scalar;
  Layer<TestType> l;
  for (auto init : {peft::LoRAInit::kaiming_uniform, peft::LoRAInit::gaussian}) {
    peft::LoRAConfig cfg;
    cfg.rank = 4;
    cfg.alpha = 16;
    cfg.init = init;
    peft::LoRA<TestType> lora(l.W, l.b, cfg);
    peft::MatrixX<Scalar> base = l.W * l.X;
    base.colwise() += l.b;
    REQUIRE(lora.forward(l.X) == base);  // B = 0: the branch adds exact zeros
    REQUIRE(lora.delta_weight().isZero(0));
    REQUIRE(lora.B().isZero(0));
    REQUIRE(!lora.A().isZero(0));
  }
}

TEST_CASE("LoRA init draws A from the documented distributions") {
  const Eigen::Index d_in = 400, r = 50;
  Eigen::MatrixXd W = Eigen::MatrixXd::Zero(3, d_in);
  peft::LoRAConfig cfg;
  cfg.rank = r;
  cfg.seed = 7;
  const peft::LoRA<Eigen::MatrixXd> kaiming(W, cfg);
  const double bound = 1.0 / std::sqrt(double(d_in));
  REQUIRE(kaiming.A().cwiseAbs().maxCoeff() <= bound);
  REQUIRE(kaiming.A().cwiseAbs().maxCoeff() > 0.99 * bound);
  const double var = kaiming.A().squaredNorm() / double(r * d_in);  // U(-c, c): variance c^2 / 3
  REQUIRE_THAT(var, WithinRel(bound * bound / 3.0, 0.03));
  REQUIRE_THAT(kaiming.A().mean(), WithinAbs(0.0, 0.02 * bound));

  cfg.init = peft::LoRAInit::gaussian;
  const peft::LoRA<Eigen::MatrixXd> gaussian(W, cfg);
  const double sd = std::sqrt(gaussian.A().squaredNorm() / double(r * d_in));
  REQUIRE_THAT(sd, WithinRel(1.0 / double(r), 0.03));

  cfg.init = peft::LoRAInit::kaiming_uniform;
  const peft::LoRA<Eigen::MatrixXd> same_seed(W, cfg);
  REQUIRE(same_seed.A() == kaiming.A());
  cfg.seed = 8;
  const peft::LoRA<Eigen::MatrixXd> other_seed(W, cfg);
  REQUIRE(other_seed.A() != kaiming.A());
}

TEST_CASE("LoRA scaling is alpha over r or alpha over sqrt r with rsLoRA") {
  Eigen::MatrixXd W = Eigen::MatrixXd::Zero(4, 4);
  for (Eigen::Index r : {1, 3, 4, 16}) {
    peft::LoRAConfig cfg;
    cfg.rank = r;
    cfg.alpha = 8;
    REQUIRE(peft::LoRA<Eigen::MatrixXd>(W, cfg).scaling() == 8.0 / double(r));
    cfg.use_rslora = true;
    REQUIRE(peft::LoRA<Eigen::MatrixXd>(W, cfg).scaling() == 8.0 / std::sqrt(double(r)));
  }
}

TEMPLATE_TEST_CASE("LoRA forward equals the formula", "[lora]", MatrixXf, MatrixXd, RowMajorXf, RowMajorXd) {
  using Scalar = typename TestType::Scalar;
  Layer<TestType> l;
  const peft::LoRA<TestType> lora(l.W, l.b, random_config());
  const Eigen::MatrixXd ref = reference_forward(lora, l.W, l.b, l.X);
  const Eigen::MatrixXd Y = lora.forward(l.X).template cast<double>();
  REQUIRE((Y - ref).cwiseAbs().maxCoeff() <= 64 * eps<Scalar>() * (ref.cwiseAbs().maxCoeff() + 1));

  // The training forward without dropout gives the same output.
  peft::LoRA<TestType> training(l.W, l.b, random_config());
  typename peft::LoRA<TestType>::Cache cache;
  REQUIRE(training.forward(l.X, cache) == lora.forward(l.X));

  // Without a bias.
  const peft::LoRA<TestType> no_bias(l.W, random_config());
  const Eigen::MatrixXd ref0 = reference_forward(no_bias, l.W, Eigen::VectorXd::Zero(kOut), l.X);
  REQUIRE((no_bias.forward(l.X).template cast<double>() - ref0).cwiseAbs().maxCoeff() <=
          64 * eps<Scalar>() * (ref0.cwiseAbs().maxCoeff() + 1));
}

TEST_CASE("LoRA gives the same results for column-major and row-major weights") {
  Layer<MatrixXd> c;
  Layer<RowMajorXd> r;
  REQUIRE(MatrixXd(r.W) == c.W);
  const peft::LoRA<MatrixXd> lc(c.W, c.b, random_config());
  const peft::LoRA<RowMajorXd> lr(r.W, r.b, random_config());
  REQUIRE(lc.flat_values() == lr.flat_values());
  REQUIRE((lc.forward(c.X) - lr.forward(r.X)).cwiseAbs().maxCoeff() < 1e-14);
}

TEST_CASE("LoRA gradients match central differences in double") {
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
    peft::LoRAConfig cfg = random_config(3, 5.0);
    cfg.dropout = c.dropout;
    cfg.use_rslora = c.rslora;
    Layer<MatrixXd> cl;
    Layer<RowMajorXd> rl;
    const Eigen::MatrixXd R = random_matrix<Eigen::MatrixXd>(kOut, kTokens, 99);
    const auto col = c.bias ? peft::LoRA<MatrixXd>(cl.W, cl.b, cfg) : peft::LoRA<MatrixXd>(cl.W, cfg);
    const auto row = c.bias ? peft::LoRA<RowMajorXd>(rl.W, rl.b, cfg) : peft::LoRA<RowMajorXd>(rl.W, cfg);
    const auto errors_col = peft::test::check_gradients(col, cl.X, R);
    const auto errors_row = peft::test::check_gradients(row, rl.X, R);
    REQUIRE(errors_col.size() == 3);
    for (const auto* errors : {&errors_col, &errors_row})
      for (const auto& e : *errors) {
        INFO(c.name << ": d" << e.name << " relative error " << e.relative);
        REQUIRE(e.relative < 1e-6);
      }
  }
}

TEST_CASE("LoRA dropout masks the branch input and the mask is replayed in backward") {
  Layer<MatrixXd> l;
  peft::LoRAConfig cfg = random_config();
  cfg.dropout = 0.5;
  peft::LoRA<MatrixXd> lora(l.W, l.b, cfg);
  const Eigen::MatrixXd X = random_matrix<Eigen::MatrixXd>(kIn, 400, 5);
  peft::LoRA<MatrixXd>::Cache cache;
  const Eigen::MatrixXd Y = lora.forward(X, cache);

  // The mask: entries 0 or 1/(1-p), about half kept.
  const Eigen::MatrixXd& mask = cache.branch.mask;
  REQUIRE(mask.rows() == kIn);
  REQUIRE(mask.cols() == 400);
  REQUIRE((mask.array() == 0.0 || mask.array() == 2.0).all());
  REQUIRE_THAT((mask.array() == 2.0).cast<double>().mean(), WithinAbs(0.5, 0.05));

  // Y = W X + b + s B A (X ⊙ mask).
  Eigen::MatrixXd ref = l.W * X + lora.scaling() * lora.B() * (lora.A() * X.cwiseProduct(mask));
  ref.colwise() += l.b;
  REQUIRE((Y - ref).cwiseAbs().maxCoeff() < 1e-13);

  // Inference never drops: forward(X) is the no-dropout output.
  const Eigen::MatrixXd Yi = lora.forward(X);
  Eigen::MatrixXd ref_i = (l.W + lora.delta_weight()) * X;
  ref_i.colwise() += l.b;
  REQUIRE((Yi - ref_i).cwiseAbs().maxCoeff() < 1e-13);

  // Backward replays the mask: dA = s (B^T G)(X ⊙ mask)^T, dX = W^T G + s (A^T B^T G) ⊙ mask.
  const Eigen::MatrixXd G = random_matrix<Eigen::MatrixXd>(kOut, 400, 6);
  const Eigen::MatrixXd dX = lora.backward(G, cache);
  const double s = lora.scaling();
  const Eigen::MatrixXd U = lora.B().transpose() * G;
  const Eigen::MatrixXd dX_ref = l.W.transpose() * G + s * (lora.A().transpose() * U).cwiseProduct(mask);
  const Eigen::MatrixXd dA_ref = s * U * X.cwiseProduct(mask).transpose();
  const Eigen::MatrixXd dB_ref = s * G * (lora.A() * X.cwiseProduct(mask)).transpose();
  REQUIRE((dX - dX_ref).cwiseAbs().maxCoeff() < 1e-12);
  REQUIRE((lora.parameters()[0].grad - dA_ref).cwiseAbs().maxCoeff() < 1e-11);
  REQUIRE((lora.parameters()[1].grad - dB_ref).cwiseAbs().maxCoeff() < 1e-11);

  // A second training forward draws a new mask.
  peft::LoRA<MatrixXd>::Cache cache2;
  lora.forward(X, cache2);
  REQUIRE(cache2.branch.mask != mask);
}

TEMPLATE_TEST_CASE("LoRA float and double gradients agree", "[lora]", MatrixXf, RowMajorXf) {
  using Twin = peft::test::rebind_t<TestType, double>;
  Layer<TestType> l;
  peft::LoRAConfig cfg = random_config();
  cfg.dropout = 0.25;
  peft::LoRA<TestType> lora(l.W, l.b, cfg);
  Twin Wd = l.W.template cast<double>();
  Eigen::VectorXd bd = l.b.template cast<double>();
  peft::LoRA<Twin> twin(Wd, bd, cfg);  // same seed: same dropout masks
  twin.flat_values() = lora.flat_values().template cast<double>();

  const Eigen::MatrixXf G = random_matrix<Eigen::MatrixXf>(kOut, kTokens, 21);
  typename peft::LoRA<TestType>::Cache cache;
  typename peft::LoRA<Twin>::Cache cache_d;
  const Eigen::MatrixXf Y = lora.forward(l.X, cache);
  const Eigen::MatrixXd Yd = twin.forward(l.X.template cast<double>(), cache_d);
  const Eigen::MatrixXf dX = lora.backward(G, cache);
  const Eigen::MatrixXd dXd = twin.backward(G.cast<double>(), cache_d);

  const auto close = [](const auto& f, const Eigen::MatrixXd& d) {
    return (f.template cast<double>() - d).norm() <= 1e-5 * d.norm();
  };
  REQUIRE(close(Y, Yd));
  REQUIRE(close(dX, dXd));
  REQUIRE(close(lora.flat_grads(), twin.flat_grads()));
}

TEST_CASE("LoRA gradients accumulate until zero_grad and dX is fresh") {
  Layer<MatrixXd> l;
  peft::LoRA<MatrixXd> lora(l.W, l.b, random_config());
  const Eigen::MatrixXd G = random_matrix<Eigen::MatrixXd>(kOut, kTokens, 3);
  peft::LoRA<MatrixXd>::Cache cache;
  lora.forward(l.X, cache);
  const Eigen::MatrixXd dX1 = lora.backward(G, cache);
  const Eigen::VectorXd g1 = lora.flat_grads();
  REQUIRE(!g1.isZero(0));
  const Eigen::MatrixXd dX2 = lora.backward(G, cache);
  REQUIRE(dX1 == dX2);
  REQUIRE((lora.flat_grads() - 2 * g1).cwiseAbs().maxCoeff() < 1e-14);
  lora.zero_grad();
  REQUIRE(lora.flat_grads().isZero(0));
  for (const auto& p : lora.parameters()) REQUIRE(p.grad.isZero(0));
}

TEST_CASE("LoRA parameters are named as in PEFT and live in the flat buffers") {
  Layer<MatrixXf> l;
  peft::LoRA<MatrixXf> lora(l.W, l.b, random_config(3));
  auto params = lora.parameters();
  REQUIRE(params.size() == 2);
  REQUIRE(std::string(params[0].name) == "lora_A");
  REQUIRE(params[0].value.rows() == 3);
  REQUIRE(params[0].value.cols() == kIn);
  REQUIRE(std::string(params[1].name) == "lora_B");
  REQUIRE(params[1].value.rows() == kOut);
  REQUIRE(params[1].value.cols() == 3);
  REQUIRE(lora.num_parameters() == 3 * (kIn + kOut));
  REQUIRE(params[0].value.data() == lora.flat_values().data());
  REQUIRE(params[1].value.data() == lora.flat_values().data() + 3 * kIn);
  REQUIRE(params[1].grad.data() == lora.flat_grads().data() + 3 * kIn);

  // Writing through a view changes the adapter (an optimizer step).
  for (auto& p : lora.parameters()) p.value.setConstant(0.5f);
  REQUIRE((lora.A().array() == 0.5f).all());
  REQUIRE((lora.B().array() == 0.5f).all());
  const auto& const_lora = lora;
  REQUIRE(const_lora.parameters()[1].value(0, 0) == 0.5f);
}

TEMPLATE_TEST_CASE("LoRA merged output equals unmerged output", "[lora]", MatrixXf, MatrixXd, RowMajorXf,
                   RowMajorXd) {
  using Scalar = typename TestType::Scalar;
  Layer<TestType> l;
  peft::LoRA<TestType> lora(l.W, l.b, random_config());
  const auto Y = lora.forward(l.X);
  const TestType W0 = l.W;
  lora.merge();
  REQUIRE(lora.is_merged());
  const TestType expected = W0 + lora.delta_weight().template cast<Scalar>();
  REQUIRE((l.W - expected).cwiseAbs().maxCoeff() <= 4 * eps<Scalar>() * (expected.cwiseAbs().maxCoeff()));
  const auto Ym = lora.forward(l.X);
  // Merged forward is exactly the base product of the merged W.
  peft::MatrixX<Scalar> base = l.W * l.X;
  base.colwise() += l.b;
  REQUIRE(Ym == base);
  const double scale = (W0.cwiseAbs() + lora.delta_weight().cwiseAbs()).maxCoeff() *
                           l.X.cwiseAbs().colwise().sum().maxCoeff() + l.b.cwiseAbs().maxCoeff();
  REQUIRE((Y - Ym).cwiseAbs().maxCoeff() <= 2 * (kIn + 2) * eps<Scalar>() * scale);
}

TEMPLATE_TEST_CASE("LoRA unmerge restores W within the MATH.md bound", "[lora]", MatrixXf, MatrixXd, RowMajorXf,
                   RowMajorXd) {
  using Scalar = typename TestType::Scalar;
  // Larger magnitudes in the delta than in W, so rounding is visible and the bound is exercised.
  TestType W = random_matrix<TestType>(33, 21, 5);
  const TestType W0 = W;
  peft::LoRA<TestType> lora(W, random_config(4, 40.0));
  const auto dW = lora.delta_weight();
  lora.merge();
  lora.unmerge();
  REQUIRE(!lora.is_merged());
  // One round trip: |W - W0| <= 2 eps (|W0| + |dW|) per element.
  const auto bound = (2 * Scalar(eps<Scalar>()) * (W0.cwiseAbs() + dW.cwiseAbs().template cast<Scalar>())).eval();
  REQUIRE(((W - W0).cwiseAbs().array() <= bound.array()).all());
  // The bound is not vacuous: the round trip is not bit-exact in float for this data.
  if (std::is_same<Scalar, float>::value) REQUIRE(W != W0);
}

TEST_CASE("LoRA merge writes only the wrapped block of a larger matrix") {
  Eigen::MatrixXd big = random_matrix<Eigen::MatrixXd>(10, 12, 8);
  const Eigen::MatrixXd before = big;
  peft::LoRA<Eigen::MatrixXd> lora(big.block(2, 3, 6, 5), random_config());
  const Eigen::MatrixXd X = random_matrix<Eigen::MatrixXd>(5, 2, 9);
  const Eigen::MatrixXd Y = lora.forward(X);
  REQUIRE((Y - (before.block(2, 3, 6, 5) + lora.delta_weight()) * X).cwiseAbs().maxCoeff() < 1e-13);
  lora.merge();
  Eigen::MatrixXd expected = before;
  expected.block(2, 3, 6, 5) += lora.delta_weight();
  REQUIRE((big - expected).cwiseAbs().maxCoeff() < 1e-14);
  big.block(2, 3, 6, 5) = before.block(2, 3, 6, 5);
  REQUIRE(big == before);  // nothing outside the block moved
}

TEMPLATE_TEST_CASE("LoRA merge and unmerge run over several scratch blocks", "[lora]", MatrixXf, RowMajorXf) {
  // 2000 outer slices of 300 (columns of a column-major W, rows of a row-major one): the scratch
  // holds 2^19 / 300 = 1747 of them, so two blocks.
  const bool row_major = TestType::IsRowMajor;
  TestType W = random_matrix<TestType>(row_major ? 2000 : 300, row_major ? 300 : 2000, 1);
  const TestType W0 = W;
  peft::LoRA<TestType> lora(W, random_config(8, 16.0));
  const TestType dW = lora.delta_weight();
  lora.merge();
  REQUIRE((W - (W0 + dW)).cwiseAbs().maxCoeff() <= 4 * eps<float>() * (W0.cwiseAbs() + dW.cwiseAbs()).maxCoeff());
  lora.unmerge();
  REQUIRE(((W - W0).cwiseAbs().array() <= 2 * float(eps<float>()) * (W0.cwiseAbs() + dW.cwiseAbs()).array()).all());
}

TEST_CASE("LoRA rejects invalid configurations") {
  Eigen::MatrixXf W = random_matrix<Eigen::MatrixXf>(4, 3, 1);
  const Eigen::MatrixXf W0 = W;
  const auto make = [&](auto edit) {
    peft::LoRAConfig cfg;
    edit(cfg);
    return peft::LoRA<Eigen::MatrixXf>(W, cfg);
  };
  REQUIRE_THROWS_AS(make([](auto& c) { c.rank = 0; }), peft::ConfigError);
  REQUIRE_THROWS_AS(make([](auto& c) { c.rank = -2; }), peft::ConfigError);
  REQUIRE_THROWS_AS(make([](auto& c) { c.alpha = 0; }), peft::ConfigError);
  REQUIRE_THROWS_AS(make([](auto& c) { c.alpha = -1; }), peft::ConfigError);
  REQUIRE_THROWS_AS(make([](auto& c) { c.alpha = std::numeric_limits<double>::quiet_NaN(); }), peft::ConfigError);
  REQUIRE_THROWS_AS(make([](auto& c) { c.alpha = std::numeric_limits<double>::infinity(); }), peft::ConfigError);
  REQUIRE_THROWS_AS(make([](auto& c) { c.dropout = -0.1; }), peft::ConfigError);
  REQUIRE_THROWS_AS(make([](auto& c) { c.dropout = 1.0; }), peft::ConfigError);
  REQUIRE_THROWS_AS(make([](auto& c) { c.dropout = std::numeric_limits<double>::quiet_NaN(); }), peft::ConfigError);
  // Also catchable as the standard exception and as peft::Error.
  REQUIRE_THROWS_AS(make([](auto& c) { c.rank = 0; }), std::invalid_argument);
  REQUIRE_THROWS_AS(make([](auto& c) { c.rank = 0; }), peft::Error);
  const std::string msg = message_of([&] { make([](auto& c) { c.alpha = -3; }); });
  REQUIRE_THAT(msg, peft::test::has_substring("peft::LoRA::constructor: alpha is -3"));
  REQUIRE(W == W0);
}

TEST_CASE("LoRA rejects shape mismatches and leaves W and b untouched") {
  Layer<MatrixXf> l;
  const MatrixXf W0 = l.W;
  const Eigen::VectorXf b0 = l.b;
  Eigen::VectorXf short_bias = Eigen::VectorXf::Zero(kOut - 1);
  REQUIRE_THROWS_AS(peft::LoRA<MatrixXf>(l.W, short_bias, random_config()), peft::ShapeError);
  Eigen::VectorXf empty_bias;  // size 0 is a wrong size, not "no bias"
  REQUIRE_THROWS_AS(peft::LoRA<MatrixXf>(l.W, empty_bias, random_config()), peft::ShapeError);
  MatrixXf empty(0, 3);
  REQUIRE_THROWS_AS(peft::LoRA<MatrixXf>(empty, random_config()), peft::ShapeError);

  peft::LoRA<MatrixXf> lora(l.W, l.b, random_config());
  peft::LoRA<MatrixXf>::Cache cache;
  const Eigen::MatrixXf bad_X = Eigen::MatrixXf::Ones(kIn + 1, kTokens);
  REQUIRE_THROWS_AS(lora.forward(bad_X), peft::ShapeError);
  REQUIRE_THROWS_AS(lora.forward(bad_X, cache), peft::ShapeError);
  lora.forward(l.X, cache);
  const Eigen::MatrixXf bad_rows = Eigen::MatrixXf::Ones(kOut + 1, kTokens);
  const Eigen::MatrixXf bad_cols = Eigen::MatrixXf::Ones(kOut, kTokens - 1);
  REQUIRE_THROWS_AS(lora.backward(bad_rows, cache), peft::ShapeError);
  REQUIRE_THROWS_AS(lora.backward(bad_cols, cache), peft::ShapeError);
  REQUIRE(lora.flat_grads().isZero(0));  // a refused backward accumulates nothing
  REQUIRE_THAT(message_of([&] { lora.backward(bad_cols, cache); }),
               peft::test::has_substring("peft::LoRA::backward: dY is 7x3, expected 7x4"));
  REQUIRE_THAT(message_of([&] { lora.forward(bad_X); }),
               peft::test::has_substring("peft::LoRA::forward: X is 6x4, expected 5 rows"));
  REQUIRE(l.W == W0);
  REQUIRE(l.b == b0);
}

TEST_CASE("LoRA enforces the merge state machine and refuses foreign or stale caches") {
  Layer<MatrixXd> l;
  const MatrixXd W0 = l.W;
  peft::LoRA<MatrixXd> lora(l.W, l.b, random_config());
  peft::LoRA<MatrixXd> other(l.W, l.b, random_config());
  const Eigen::MatrixXd G = random_matrix<Eigen::MatrixXd>(kOut, kTokens, 4);
  peft::LoRA<MatrixXd>::Cache cache, empty_cache, other_cache;

  REQUIRE_THROWS_AS(lora.unmerge(), peft::StateError);
  REQUIRE(l.W == W0);
  REQUIRE_THROWS_AS(lora.backward(G, empty_cache), peft::StateError);
  other.forward(l.X, other_cache);
  REQUIRE_THROWS_AS(lora.backward(G, other_cache), peft::StateError);

  lora.forward(l.X, cache);
  lora.merge();
  const MatrixXd merged = l.W;
  REQUIRE_THROWS_AS(lora.merge(), peft::StateError);
  REQUIRE_THROWS_AS(lora.backward(G, cache), peft::StateError);
  REQUIRE_THROWS_AS(lora.forward(l.X, cache), peft::StateError);
  REQUIRE(l.W == merged);
  lora.unmerge();
  // The cache came from before the merge: stale now.
  REQUIRE_THROWS_AS(lora.backward(G, cache), peft::StateError);
  REQUIRE(lora.flat_grads().isZero(0));
  REQUIRE_THAT(message_of([&] { lora.backward(G, cache); }), peft::test::has_substring("stale"));
  // A fresh forward makes it usable again.
  lora.forward(l.X, cache);
  REQUIRE_NOTHROW(lora.backward(G, cache));
}

TEMPLATE_TEST_CASE("LoRA merge and unmerge refuse to write non-finite values", "[lora]", MatrixXf, RowMajorXd) {
  using Scalar = typename TestType::Scalar;
  const Scalar big = std::numeric_limits<Scalar>::max() / 2;
  TestType W = random_matrix<TestType>(6, 5, 3);
  W(4, 2) = big;
  const TestType W0 = W;
  peft::LoRA<TestType> lora(W, random_config(2, 2.0));
  lora.A().setConstant(Scalar(1));
  lora.B().setConstant(big);  // s B A = 2 * big in every entry: W(4,2) + 2 big overflows
  REQUIRE_THROWS_AS(lora.merge(), peft::NumericalError);
  REQUIRE(!lora.is_merged());
  REQUIRE(W == W0);
  REQUIRE_THAT(message_of([&] { lora.merge(); }), peft::test::has_substring("peft::LoRA::merge: W(4,2) would become inf"));

  // Unmerge: merge a finite delta of about big / 2, then a user writes -max into W: W - s B A would
  // overflow to -inf.
  lora.A().setConstant(Scalar(1));
  lora.B().setConstant(big / 4);
  W(4, 2) = Scalar(1);
  lora.merge();
  W(0, 0) = std::numeric_limits<Scalar>::lowest();
  const TestType merged = W;
  REQUIRE_THROWS_AS(lora.unmerge(), peft::NumericalError);
  REQUIRE(lora.is_merged());
  REQUIRE(W == merged);

  // NaN in W itself is refused as well, W untouched to the bit.
  W(0, 0) = Scalar(0);
  lora.unmerge();
  W(1, 1) = std::numeric_limits<Scalar>::quiet_NaN();
  const TestType with_nan = W;
  REQUIRE_THROWS_AS(lora.merge(), peft::NumericalError);
  REQUIRE(same_bits(W, with_nan));
}

TEMPLATE_TEST_CASE("LoRA unmerge takes out what merge put in even if parameters changed meanwhile", "[lora]",
                   MatrixXd, RowMajorXf) {
  using Scalar = typename TestType::Scalar;
  TestType W = random_matrix<TestType>(9, 6, 1);
  const TestType W0 = W;
  peft::LoRA<TestType> lora(W, random_config());
  const TestType dW = lora.delta_weight();
  lora.merge();
  for (auto& p : lora.parameters()) p.value.setConstant(Scalar(3));  // an optimizer step while merged
  lora.unmerge();
  REQUIRE(((W - W0).cwiseAbs().array() <= 2 * Scalar(eps<Scalar>()) * (W0.cwiseAbs() + dW.cwiseAbs()).array()).all());
  REQUIRE((lora.A().array() == Scalar(3)).all());  // the parameters themselves are the new ones
}

TEST_CASE("LoRA copies and moves keep their parameters valid and independent") {
  Layer<MatrixXd> l;
  peft::LoRA<MatrixXd> original(l.W, l.b, random_config());
  const Eigen::VectorXd values = original.flat_values();
  const Eigen::MatrixXd Y = original.forward(l.X);

  peft::LoRA<MatrixXd> copy = original;
  REQUIRE(copy.flat_values() == values);
  REQUIRE(copy.parameters()[0].value.data() != original.parameters()[0].value.data());
  copy.A().setZero();
  REQUIRE(original.flat_values() == values);  // independent buffers
  REQUIRE(original.forward(l.X) == Y);

  peft::LoRA<MatrixXd> moved = std::move(copy);
  REQUIRE(moved.A().isZero(0));
  REQUIRE(moved.parameters()[1].value == original.B());

  peft::LoRA<MatrixXd> assigned(l.W, random_config(1));
  assigned = original;
  REQUIRE(assigned.flat_values() == values);
  REQUIRE(assigned.rank() == 3);
  REQUIRE(assigned.forward(l.X) == Y);
  peft::LoRA<MatrixXd> move_assigned(l.W, random_config(1));
  move_assigned = std::move(assigned);
  REQUIRE(move_assigned.forward(l.X) == Y);

  // A copy trains on its own: its gradients do not reach the original.
  peft::LoRA<MatrixXd>::Cache cache;
  move_assigned.forward(l.X, cache);
  move_assigned.backward(random_matrix<Eigen::MatrixXd>(kOut, kTokens, 2), cache);
  REQUIRE(!move_assigned.flat_grads().isZero(0));
  REQUIRE(original.flat_grads().isZero(0));

  // Copies inside a container (reallocation moves them) still forward correctly.
  std::vector<peft::LoRA<MatrixXd>> many;
  for (int i = 0; i < 9; ++i) many.push_back(original);
  for (const auto& a : many) REQUIRE(a.forward(l.X) == Y);
}

TEST_CASE("LoRA refuses to copy or assign over a merged adapter and moves the merge along") {
  Layer<MatrixXd> l;
  const MatrixXd W0 = l.W;
  peft::LoRA<MatrixXd> lora(l.W, l.b, random_config());
  lora.merge();
  const MatrixXd merged = l.W;
  REQUIRE_THROWS_AS(peft::LoRA<MatrixXd>(lora), peft::StateError);
  peft::LoRA<MatrixXd> other(l.W, random_config(2));
  REQUIRE_THROWS_AS(other = lora, peft::StateError);
  REQUIRE_THROWS_AS(lora = other, peft::StateError);
  REQUIRE(other.rank() == 2);
  REQUIRE(l.W == merged);

  peft::LoRA<MatrixXd> moved = std::move(lora);
  REQUIRE(moved.is_merged());
  REQUIRE(!lora.is_merged());  // NOLINT(bugprone-use-after-move): the moved-from state is specified
  REQUIRE_THROWS_AS(lora.unmerge(), peft::StateError);
  moved.unmerge();
  REQUIRE((l.W - W0).cwiseAbs().maxCoeff() < 1e-14);
}

TEST_CASE("LoRA refuses a cache made stale by assignment or by another adapter at the same address") {
  Layer<MatrixXd> l;
  const Eigen::MatrixXd G = random_matrix<Eigen::MatrixXd>(kOut, kTokens, 4);
  peft::LoRA<MatrixXd> lora(l.W, l.b, random_config(2));
  peft::LoRA<MatrixXd>::Cache cache;
  lora.forward(l.X, cache);
  lora = peft::LoRA<MatrixXd>(l.W, l.b, random_config(5));  // same address, another rank
  REQUIRE_THROWS_AS(lora.backward(G, cache), peft::StateError);
  REQUIRE(lora.flat_grads().isZero(0));

  // An adapter destroyed and another built in its place: the cache's shapes do not fit the new rank.
  std::optional<peft::LoRA<MatrixXd>> slot;
  slot.emplace(l.W, l.b, random_config(2));
  peft::LoRA<MatrixXd>::Cache old_cache;
  slot->forward(l.X, old_cache);
  const void* address = &*slot;
  slot.emplace(l.W, l.b, random_config(6));
  REQUIRE(static_cast<const void*>(&*slot) == address);
  REQUIRE_THROWS_AS(slot->backward(G, old_cache), peft::StateError);
}

TEST_CASE("LoRA outputs may share memory with inputs and stay correct") {
  // Square layer: Y and X have the same shape, so a user may pass one matrix as both.
  MatrixXd W = random_matrix<MatrixXd>(kIn, kIn, 1);
  peft::LoRA<MatrixXd> lora(W, random_config());
  const Eigen::MatrixXd X = random_matrix<Eigen::MatrixXd>(kIn, kTokens, 2);
  const Eigen::MatrixXd Y = lora.forward(X);
  Eigen::MatrixXd inout = X;
  lora.forward_into(inout, inout);
  REQUIRE(inout == Y);

  peft::LoRA<MatrixXd>::Cache cache;
  inout = X;
  lora.forward_into(inout, inout, cache);
  REQUIRE(inout == Y);
  const Eigen::MatrixXd G = random_matrix<Eigen::MatrixXd>(kIn, kTokens, 3);
  const Eigen::MatrixXd dX = lora.backward(G, cache);
  const Eigen::VectorXd grads = lora.flat_grads();
  lora.zero_grad();
  Eigen::MatrixXd g_inout = G;
  lora.backward_into(g_inout, cache, g_inout);
  REQUIRE(g_inout == dX);
  REQUIRE(lora.flat_grads() == grads);
}

TEMPLATE_TEST_CASE("LoRA concurrent forward from several threads equals one thread", "[lora]", MatrixXf,
                   RowMajorXd) {
  using Scalar = typename TestType::Scalar;
  TestType W = random_matrix<TestType>(96, 80, 1);
  const peft::LoRA<TestType> lora(W, random_config(8, 16.0));
  std::vector<peft::MatrixX<Scalar>> inputs, expected;
  for (int t = 0; t < 4; ++t) {
    inputs.push_back(random_matrix<peft::MatrixX<Scalar>>(80, 16 + t, 100 + t));
    expected.push_back(lora.forward(inputs.back()));
  }
  std::vector<int> mismatches(4, 0);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&, t] {
      for (int rep = 0; rep < 50; ++rep)
        if (lora.forward(inputs[t]) != expected[t]) ++mismatches[t];
    });
  for (auto& th : threads) th.join();
  for (int m : mismatches) REQUIRE(m == 0);
}

TEST_CASE("LoRA takes blocks maps and empty batches as inputs") {
  Layer<MatrixXd> l;
  const peft::LoRA<MatrixXd> lora(l.W, l.b, random_config());
  Eigen::MatrixXd wide = random_matrix<Eigen::MatrixXd>(kIn, 10, 4);
  const Eigen::MatrixXd Y_block = lora.forward(wide.middleCols(3, 4));
  const Eigen::MatrixXd X_copy = wide.middleCols(3, 4);
  REQUIRE(Y_block == lora.forward(X_copy));
  Eigen::Map<const Eigen::MatrixXd> mapped(wide.data(), kIn, 10);
  REQUIRE(lora.forward(mapped).rows() == kOut);
  // An empty batch is valid.
  REQUIRE(lora.forward(Eigen::MatrixXd(kIn, 0)).cols() == 0);
}
