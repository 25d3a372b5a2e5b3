// The adapter contract, written once and run for every adapter in every matrix type (float and double,
// column- and row-major): the start, the formula, gradients against central differences, float
// against double, accumulation, parameter names and buffers, merge and unmerge, the strong guarantee,
// the state machine and its caches, copies and moves, aliasing outputs, concurrent forward, and every
// documented error. Each translation unit defines the fixture family and the adapter's name, then
// includes this file (lora_contract_test.cpp and its siblings); what is specific to one adapter lives
// in tests/adapters/.
//
//   #define PEFT_CONTRACT_FIXTURE peft::test::LoRAFixture   // a template over the weight's type
//   #define PEFT_CONTRACT_NAME "LoRA"                        // prefixes every test name
#include "support/catch.hpp"
#include "support/errors.hpp"
#include "support/matrices.hpp"
#include "support/numeric.hpp"

#include <peft/core/traits.hpp>
#include <peft/testing/grad_check.hpp>

#include <optional>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#if !defined(PEFT_CONTRACT_FIXTURE) || !defined(PEFT_CONTRACT_NAME)
#error "define PEFT_CONTRACT_FIXTURE and PEFT_CONTRACT_NAME before including contract.hpp"
#endif

#define PEFT_CT(name) PEFT_CONTRACT_NAME " " name

namespace peft::test::contract {

constexpr Eigen::Index kOut = 9, kIn = 7, kTokens = 4;

/// A small layer: W (d_out x d_in), b, an input X and an upstream gradient G.
template <class M>
struct Layer {
  using Scalar = typename M::Scalar;
  M W = random_matrix<M>(kOut, kIn, 11);
  VectorX<Scalar> b = random_matrix<MatrixX<Scalar>>(kOut, 1, 12);
  MatrixX<Scalar> X = random_matrix<MatrixX<Scalar>>(kIn, kTokens, 13);
  MatrixX<Scalar> G = random_matrix<MatrixX<Scalar>>(kOut, kTokens, 14);
};

/// max |reference| + 1, the scale tolerances are relative to.
inline double scale_of(const Eigen::MatrixXd& m) { return m.cwiseAbs().maxCoeff() + 1.0; }

template <class A>
double max_diff(const A& a, const Eigen::MatrixXd& b) {
  return (a.template cast<double>() - b).cwiseAbs().maxCoeff();
}

/// The fixture's adapter, built with its config and moved as training would.
template <class F, class M>
typename F::Adapter trained(M& W, VectorX<typename M::Scalar>& b) {
  auto a = F::make(W, b, F::config());
  F::perturb(a);
  return a;
}

}  // namespace peft::test::contract

using namespace peft::test::contract;  // NOLINT: a test file's own helpers
using peft::test::abs_mul;
using peft::test::eps;
using peft::test::has_substring;
using peft::test::message_of;
using peft::test::MatrixXd;
using peft::test::MatrixXf;
using peft::test::random_matrix;
using peft::test::RowMajorXd;
using peft::test::RowMajorXf;
using peft::test::same_bits;
using peft::test::to_double;

// ---------------------------------------------------------------------------------------------------
// What it computes

TEMPLATE_TEST_CASE(PEFT_CT("satisfies the adapter traits and starts as the base layer"), "[contract]", PEFT_TEST_EVERY_MATRIX) {
  using F = PEFT_CONTRACT_FIXTURE<TestType>;
  using Scalar = typename TestType::Scalar;
  static_assert(peft::is_adapter_v<typename F::Adapter>, "the whole adapter contract");
  static_assert(std::is_same<typename F::Adapter::MatrixType, TestType>::value, "MatrixType is the weight's type");
  Layer<TestType> l;
  const TestType W0 = l.W;
  auto a = F::make(l.W, l.b, F::identity_config());
  peft::MatrixX<Scalar> base = W0 * l.X;
  base.colwise() += l.b;
  typename F::Adapter::Cache cache;
  const auto Y = a.forward(l.X);
  const auto Y_train = a.forward(l.X, cache);
  if (F::exact_identity) {
    REQUIRE(Y == base);
    REQUIRE(Y_train == base);
  }
  const double scale = abs_mul(to_double(W0), to_double(l.X)).maxCoeff() + l.b.cwiseAbs().maxCoeff();
  const double tol = 4.0 * double(kIn + 2) * eps<Scalar>() * scale;
  REQUIRE(max_diff(Y, base.template cast<double>()) <= tol);
  REQUIRE(max_diff(Y_train, base.template cast<double>()) <= tol);
  // The bound weight plus the adapter's change is the base weight (PiSSA: the residual plus s B A).
  const TestType sum = l.W + a.delta_weight();
  REQUIRE(max_diff(sum, W0.template cast<double>()) <= 4.0 * eps<Scalar>() * scale_of(W0.template cast<double>()));
}

TEMPLATE_TEST_CASE(PEFT_CT("forward equals the formula with and without a bias"), "[contract]", PEFT_TEST_EVERY_MATRIX) {
  using F = PEFT_CONTRACT_FIXTURE<TestType>;
  using Scalar = typename TestType::Scalar;
  Layer<TestType> l;
  const auto a = trained<F>(l.W, l.b);
  const Eigen::MatrixXd ref = F::reference(a, l.W, &l.b, l.X);
  const double tol = 64 * eps<Scalar>() * scale_of(ref);
  REQUIRE(max_diff(a.forward(l.X), ref) <= tol);
  // The training forward (no dropout in this config) gives the same output.
  auto training = a;
  typename F::Adapter::Cache cache;
  REQUIRE(max_diff(training.forward(l.X, cache), ref) <= tol);
  // A batch large enough for other code paths (DoRA: two products instead of one joint one).
  const peft::MatrixX<Scalar> X_large = random_matrix<peft::MatrixX<Scalar>>(kIn, 40, 8);
  const Eigen::MatrixXd ref_large = F::reference(a, l.W, &l.b, X_large);
  REQUIRE(max_diff(a.forward(X_large), ref_large) <= 64 * eps<Scalar>() * scale_of(ref_large));
  REQUIRE(max_diff(training.forward(X_large, cache), ref_large) <= 64 * eps<Scalar>() * scale_of(ref_large));

  TestType W = random_matrix<TestType>(kOut, kIn, 11);
  auto no_bias = F::make(W, F::config());
  no_bias.flat_values() = a.flat_values();
  const Eigen::MatrixXd ref0 = F::reference(no_bias, W, nullptr, l.X);
  REQUIRE(max_diff(no_bias.forward(l.X), ref0) <= 64 * eps<Scalar>() * scale_of(ref0));
  REQUIRE(!no_bias.has_bias());
}

TEST_CASE(PEFT_CT("gives the same results for column-major and row-major weights"), "[contract]") {
  using FC = PEFT_CONTRACT_FIXTURE<MatrixXd>;
  using FR = PEFT_CONTRACT_FIXTURE<RowMajorXd>;
  Layer<MatrixXd> c;
  Layer<RowMajorXd> r;
  REQUIRE(MatrixXd(r.W) == c.W);
  auto ac = trained<FC>(c.W, c.b);
  auto ar = trained<FR>(r.W, r.b);
  REQUIRE(MatrixXd(r.W) == c.W);  // the same residual, for PiSSA
  REQUIRE((ac.flat_values() - ar.flat_values()).cwiseAbs().maxCoeff() <= 1e-14);
  const Eigen::MatrixXd Yc = ac.forward(c.X);
  REQUIRE((Yc - ar.forward(r.X)).cwiseAbs().maxCoeff() <= 1e-13 * scale_of(Yc));
  typename FC::Adapter::Cache cc;
  typename FR::Adapter::Cache cr;
  ac.forward(c.X, cc);
  ar.forward(r.X, cr);
  const Eigen::MatrixXd dXc = ac.backward(c.G, cc);
  REQUIRE((dXc - ar.backward(r.G, cr)).cwiseAbs().maxCoeff() <= 1e-13 * scale_of(dXc));
  REQUIRE((ac.flat_grads() - ar.flat_grads()).cwiseAbs().maxCoeff() <= 1e-13 * (ac.flat_grads().cwiseAbs().maxCoeff() + 1));
}

TEMPLATE_TEST_CASE(PEFT_CT("gradients match central differences in double"), "[contract][gradients]", MatrixXd,
                   RowMajorXd) {
  using F = PEFT_CONTRACT_FIXTURE<TestType>;
  for (const auto& c : F::gradient_cases()) {
    Layer<TestType> l;
    auto a = c.bias ? F::make(l.W, l.b, c.config) : F::make(l.W, c.config);
    F::perturb(a);
    const auto errors = peft::testing::check_gradients(a, l.X, l.G);
    REQUIRE(errors.size() == 1 + a.parameters().size());
    for (const auto& e : errors) {
      INFO(c.name << ": d" << e.name << " relative error " << e.relative);
      REQUIRE(e.relative < 1e-6);
    }
  }
}

TEMPLATE_TEST_CASE(PEFT_CT("float and double gradients agree"), "[contract][gradients]", MatrixXf, RowMajorXf) {
  using F = PEFT_CONTRACT_FIXTURE<TestType>;
  using Twin = peft::test::rebind_t<TestType, double>;
  using FD = PEFT_CONTRACT_FIXTURE<Twin>;
  Layer<TestType> l;
  Twin Wd = l.W.template cast<double>();  // the original weight: PiSSA replaces it as the float one
  Eigen::VectorXd bd = l.b.template cast<double>();
  auto a = F::make(l.W, l.b, F::dropout_config());
  F::perturb(a);
  auto twin = FD::make(Wd, bd, FD::dropout_config());  // the same seed: the same dropout masks
  Wd = l.W.template cast<double>();                     // the weight as the float adapter holds it
  twin.flat_values() = a.flat_values().template cast<double>();

  typename F::Adapter::Cache cache;
  typename FD::Adapter::Cache cache_d;
  const auto Y = a.forward(l.X, cache);
  const Eigen::MatrixXd Yd = twin.forward(l.X.template cast<double>(), cache_d);
  const auto dX = a.backward(l.G, cache);
  const Eigen::MatrixXd dXd = twin.backward(l.G.template cast<double>(), cache_d);
  const auto close = [](const auto& f, const Eigen::MatrixXd& d) {
    return (f.template cast<double>() - d).norm() <= 1e-5 * d.norm();
  };
  REQUIRE(close(Y, Yd));
  REQUIRE(close(dX, dXd));
  for (std::size_t k = 0; k < a.parameters().size(); ++k) {
    INFO("d" << a.parameters()[k].name);
    REQUIRE(close(a.parameters()[k].grad, twin.parameters()[k].grad));
  }
}

TEMPLATE_TEST_CASE(PEFT_CT("gradients accumulate until zero_grad and dX is fresh"), "[contract]", MatrixXf, RowMajorXd) {
  using F = PEFT_CONTRACT_FIXTURE<TestType>;
  Layer<TestType> l;
  auto a = trained<F>(l.W, l.b);
  typename F::Adapter::Cache cache;
  a.forward(l.X, cache);
  REQUIRE(a.flat_grads().isZero(0));
  const auto dX1 = a.backward(l.G, cache);
  const auto g1 = a.flat_grads().eval();
  REQUIRE(!g1.isZero(0));
  const auto dX2 = a.backward(l.G, cache);  // the cache serves a second backward
  REQUIRE(dX1 == dX2);
  REQUIRE((a.flat_grads() - 2 * g1).cwiseAbs().maxCoeff() <= 4 * eps<typename TestType::Scalar>() * g1.cwiseAbs().maxCoeff());
  a.zero_grad();
  REQUIRE(a.flat_grads().isZero(0));
  for (const auto& p : a.parameters()) REQUIRE(p.grad.isZero(0));
}

TEMPLATE_TEST_CASE(PEFT_CT("parameters are named as in PEFT and live in the flat buffers"), "[contract]", MatrixXf,
                   RowMajorXd) {
  using F = PEFT_CONTRACT_FIXTURE<TestType>;
  using Scalar = typename TestType::Scalar;
  Layer<TestType> l;
  auto a = trained<F>(l.W, l.b);
  const auto specs = F::parameters(kOut, kIn);
  auto params = a.parameters();
  REQUIRE(params.size() == specs.size());
  REQUIRE(a.parameter_layout().size() == specs.size());
  Eigen::Index offset = 0;
  for (std::size_t k = 0; k < specs.size(); ++k) {
    INFO(specs[k].name);
    REQUIRE(std::string(params[k].name) == specs[k].name);
    REQUIRE(params[k].value.rows() == specs[k].rows);
    REQUIRE(params[k].value.cols() == specs[k].cols);
    REQUIRE(params[k].value.data() == a.flat_values().data() + offset);  // laid out one after another
    REQUIRE(params[k].grad.data() == a.flat_grads().data() + offset);
    REQUIRE(a.parameter_layout()[k].offset == offset);
    offset += specs[k].rows * specs[k].cols;
  }
  REQUIRE(a.num_parameters() == offset);
  // Writing through a view changes the adapter (an optimizer step), and what forward computes.
  const auto Y = a.forward(l.X);
  for (auto& p : a.parameters()) p.value.setConstant(Scalar(0.5));
  REQUIRE((a.flat_values().array() == Scalar(0.5)).all());
  const auto& const_a = a;
  REQUIRE(const_a.parameters()[0].value(0, 0) == Scalar(0.5));
  REQUIRE(a.forward(l.X) != Y);
}

// ---------------------------------------------------------------------------------------------------
// Merge and unmerge

TEMPLATE_TEST_CASE(PEFT_CT("merged output equals unmerged output and merged forward is the base product"),
                   "[contract][merge]", PEFT_TEST_EVERY_MATRIX) {
  using F = PEFT_CONTRACT_FIXTURE<TestType>;
  using Scalar = typename TestType::Scalar;
  Layer<TestType> l;
  auto a = trained<F>(l.W, l.b);
  const TestType W0 = l.W;
  const Eigen::MatrixXd dW = a.delta_weight().template cast<double>();
  const auto Y = a.forward(l.X);
  a.merge();
  REQUIRE(a.is_merged());
  // W = W0 + dW.
  const Eigen::MatrixXd magnitude = W0.template cast<double>().cwiseAbs() + dW.cwiseAbs();
  REQUIRE(max_diff(l.W, W0.template cast<double>() + dW) <= 16 * double(kIn + 3) * eps<Scalar>() * magnitude.maxCoeff());
  // delta_weight() means the same while merged (reconstructing W0 where it needs it).
  REQUIRE(max_diff(a.delta_weight(), dW) <= 32 * double(kIn + 3) * eps<Scalar>() * magnitude.maxCoeff());
  // Merged forward is exactly the base product of the merged layer.
  const auto Ym = a.forward(l.X);
  peft::MatrixX<Scalar> base = l.W * l.X;
  base.colwise() += l.b;
  REQUIRE(Ym == base);
  const double scale = abs_mul(magnitude, to_double(l.X)).maxCoeff() + l.b.cwiseAbs().maxCoeff() +
                       a.flat_values().cwiseAbs().maxCoeff();
  REQUIRE(max_diff(Ym, Y.template cast<double>()) <= 16 * double(kIn + 3) * eps<Scalar>() * scale);
}

TEMPLATE_TEST_CASE(PEFT_CT("unmerge restores W within its round-trip bound"), "[contract][merge]", PEFT_TEST_EVERY_MATRIX) {
  using F = PEFT_CONTRACT_FIXTURE<TestType>;
  // Larger magnitudes in the change than in W, so that rounding is visible.
  TestType W = random_matrix<TestType>(33, 21, 5);
  peft::VectorX<typename TestType::Scalar> b = random_matrix<peft::MatrixX<typename TestType::Scalar>>(33, 1, 6);
  auto a = F::make(W, b, F::config());
  F::perturb(a);
  a.parameters()[1].value *= typename TestType::Scalar(4);
  const TestType W0 = W;
  const Eigen::MatrixXd bound = F::round_trip_bound(a, W0);
  a.merge();
  a.unmerge();
  REQUIRE(!a.is_merged());
  const Eigen::MatrixXd err = (W - W0).template cast<double>().cwiseAbs();
  REQUIRE((err.array() <= bound.array()).all());
  // It trains on from the restored weight.
  typename F::Adapter::Cache cache;
  REQUIRE(a.forward(random_matrix<peft::MatrixX<typename TestType::Scalar>>(21, 2, 1), cache).allFinite());
}

TEMPLATE_TEST_CASE(PEFT_CT("unmerge takes out what merge put in even if parameters changed meanwhile"),
                   "[contract][merge]", MatrixXd, RowMajorXf) {
  using F = PEFT_CONTRACT_FIXTURE<TestType>;
  using Scalar = typename TestType::Scalar;
  Layer<TestType> l;
  auto a = trained<F>(l.W, l.b);
  const TestType W0 = l.W;
  const Eigen::MatrixXd bound = F::round_trip_bound(a, W0);
  a.merge();
  for (auto& p : a.parameters()) p.value.setConstant(Scalar(3));  // an optimizer step while merged
  a.unmerge();
  REQUIRE(((W0 - l.W).template cast<double>().cwiseAbs().array() <= bound.array()).all());
  REQUIRE((a.flat_values().array() == Scalar(3)).all());  // the parameters themselves are the new ones
}

TEMPLATE_TEST_CASE(PEFT_CT("merge and unmerge a layer over several scratch blocks"), "[contract][merge]", MatrixXf,
                   RowMajorXf) {
  using F = PEFT_CONTRACT_FIXTURE<TestType>;
  // 2000 outer slices of 300 (columns of a column-major W, rows of a row-major one): the 2^19-element
  // scratch of the blocked updates holds 1747 of them, so two blocks.
  const bool row_major = TestType::IsRowMajor;
  TestType W = random_matrix<TestType>(row_major ? 2000 : 300, row_major ? 300 : 2000, 1);
  peft::VectorX<float> b = random_matrix<peft::MatrixX<float>>(W.rows(), 1, 2);
  auto a = F::make(W, b, F::config());
  F::perturb(a);
  const TestType W0 = W;
  const Eigen::MatrixXd dW = a.delta_weight().template cast<double>();
  const Eigen::MatrixXd bound = F::round_trip_bound(a, W0);
  a.merge();
  // W0 + dW to rounding: of the sum, and of s B A, whose kernel (merge's tiles, delta_weight's GEMM) may
  // differ, so the product's own magnitude counts.
  const Eigen::MatrixXd magnitude =
      W0.template cast<double>().cwiseAbs() + dW.cwiseAbs() + F::product_magnitude(a);
  REQUIRE(((W.template cast<double>() - W0.template cast<double>() - dW).cwiseAbs().array() <=
           64 * eps<float>() * magnitude.array() + 1e-30)
              .all());
  a.unmerge();
  REQUIRE(((W - W0).template cast<double>().cwiseAbs().array() <= bound.array()).all());
}

TEMPLATE_TEST_CASE(PEFT_CT("merge writes only the wrapped block of a larger matrix"), "[contract][merge]", MatrixXd) {
  using F = PEFT_CONTRACT_FIXTURE<TestType>;
  Eigen::MatrixXd big = random_matrix<Eigen::MatrixXd>(20, 12, 8);
  Eigen::VectorXd b = random_matrix<Eigen::MatrixXd>(kOut, 1, 9);
  auto block = big.block(2, 3, kOut, kIn);
  auto a = F::make(block, b, F::config());
  F::perturb(a);
  const Eigen::MatrixXd before = big;  // after the construction (PiSSA writes its residual)
  const Eigen::MatrixXd X = random_matrix<Eigen::MatrixXd>(kIn, 2, 9);
  const Eigen::MatrixXd ref = F::reference(a, Eigen::MatrixXd(before.block(2, 3, kOut, kIn)), &b, X);
  REQUIRE((a.forward(X) - ref).cwiseAbs().maxCoeff() <= 1e-13 * scale_of(ref));
  a.merge();
  Eigen::MatrixXd outside = big;
  outside.block(2, 3, kOut, kIn) = before.block(2, 3, kOut, kIn);
  REQUIRE(outside == before);  // nothing outside the block moved
  REQUIRE(big.block(2, 3, kOut, kIn) != before.block(2, 3, kOut, kIn));
  a.unmerge();
  REQUIRE((big - before).cwiseAbs().maxCoeff() <= 1e-13);
}

// ---------------------------------------------------------------------------------------------------
// Errors, and what they leave untouched

TEMPLATE_TEST_CASE(PEFT_CT("rejects invalid configurations and leaves W untouched"), "[contract][errors]", MatrixXf,
                   RowMajorXd) {
  using F = PEFT_CONTRACT_FIXTURE<TestType>;
  Layer<TestType> l;
  const TestType W0 = l.W;
  const auto b0 = l.b;
  const auto edits = F::invalid_configs();
  REQUIRE(!edits.empty());
  for (std::size_t k = 0; k < edits.size(); ++k) {
    INFO("invalid config " << k);
    auto cfg = F::config();
    edits[k](cfg);
    REQUIRE_THROWS_AS(F::make(l.W, l.b, cfg), peft::ConfigError);
    REQUIRE_THROWS_AS(F::make(l.W, cfg), std::invalid_argument);
    REQUIRE_THROWS_AS(F::make(l.W, cfg), peft::Error);
    const std::string msg = message_of([&] { F::make(l.W, l.b, cfg); });
    REQUIRE_THAT(msg, has_substring(std::string(F::Adapter::class_name) + "::constructor: "));
    REQUIRE_THAT(msg, has_substring(" is "));
    REQUIRE_THAT(msg, has_substring("expected"));
    REQUIRE(same_bits(l.W, W0));
    REQUIRE(same_bits(l.b, b0));
  }
}

TEMPLATE_TEST_CASE(PEFT_CT("rejects shape mismatches naming them and leaves W and b untouched"), "[contract][errors]",
                   MatrixXf, RowMajorXd) {
  using F = PEFT_CONTRACT_FIXTURE<TestType>;
  using Scalar = typename TestType::Scalar;
  using Act = peft::MatrixX<Scalar>;
  const std::string cls = F::Adapter::class_name;
  Layer<TestType> l;
  peft::VectorX<Scalar> short_bias = peft::VectorX<Scalar>::Zero(kOut - 1);
  REQUIRE_THROWS_AS(F::make(l.W, short_bias, F::config()), peft::ShapeError);
  REQUIRE_THAT(message_of([&] { F::make(l.W, short_bias, F::config()); }),
               has_substring(cls + "::constructor: b has 8 entries, expected d_out = 9"));
  peft::VectorX<Scalar> empty_bias;  // size 0 is a wrong size, not "no bias"
  REQUIRE_THROWS_AS(F::make(l.W, empty_bias, F::config()), peft::ShapeError);
  TestType empty(0, 3);
  REQUIRE_THROWS_AS(F::make(empty, F::config()), peft::ShapeError);

  auto a = trained<F>(l.W, l.b);
  const TestType W0 = l.W;
  const auto b0 = l.b;
  typename F::Adapter::Cache cache;
  const Act bad_X = Act::Ones(kIn + 1, kTokens);
  REQUIRE_THROWS_AS(a.forward(bad_X), peft::ShapeError);
  REQUIRE_THROWS_AS(a.forward(bad_X, cache), peft::ShapeError);
  REQUIRE_THAT(message_of([&] { a.forward(bad_X); }), has_substring(cls + "::forward: X is 8x4, expected 7 rows"));
  a.forward(l.X, cache);
  const Act bad_rows = Act::Ones(kOut + 1, kTokens), bad_cols = Act::Ones(kOut, kTokens - 1);
  REQUIRE_THROWS_AS(a.backward(bad_rows, cache), peft::ShapeError);
  REQUIRE_THROWS_AS(a.backward(bad_cols, cache), peft::ShapeError);
  REQUIRE_THAT(message_of([&] { a.backward(bad_cols, cache); }), has_substring(cls + "::backward: dY is 9x3, expected 9x4"));
  REQUIRE(a.flat_grads().isZero(0));  // a refused backward accumulates nothing
  REQUIRE(same_bits(l.W, W0));
  REQUIRE(same_bits(l.b, b0));
}

TEMPLATE_TEST_CASE(PEFT_CT("backward_params accumulates what backward does and refuses what backward refuses"),
                   "[contract][gradients]", MatrixXf, RowMajorXd) {
  using F = PEFT_CONTRACT_FIXTURE<TestType>;
  using Scalar = typename TestType::Scalar;
  auto cases = F::gradient_cases();
  cases.push_back({"default", F::config(), true});
  for (const auto& c : cases) {
    INFO(c.name);
    Layer<TestType> l, twin_layer;
    auto a = c.bias ? F::make(l.W, l.b, c.config) : F::make(l.W, c.config);
    auto twin = c.bias ? F::make(twin_layer.W, twin_layer.b, c.config) : F::make(twin_layer.W, c.config);
    F::perturb(a);
    F::perturb(twin);  // the same values and the same random stream: the same dropout masks
    REQUIRE((a.flat_values() == twin.flat_values()));
    typename F::Adapter::Cache cache, twin_cache;
    REQUIRE((a.forward(l.X, cache) == twin.forward(l.X, twin_cache)));
    a.backward(l.G, cache);
    twin.backward_params(l.G, twin_cache);
    // The same arithmetic, except DoRA's exact norms, whose product with W0ᵀ runs over r columns
    // instead of N + r (another blocking, so another order of summation).
    const auto g = a.flat_grads();
    REQUIRE(!g.isZero(0));
    REQUIRE((twin.flat_grads() - g).cwiseAbs().maxCoeff() <= 16 * eps<Scalar>() * (g.cwiseAbs().maxCoeff() + 1));
    // A second one accumulates.
    twin.backward_params(l.G, twin_cache);
    REQUIRE((twin.flat_grads() - 2 * g).cwiseAbs().maxCoeff() <= 32 * eps<Scalar>() * (g.cwiseAbs().maxCoeff() + 1));
  }

  Layer<TestType> l, o;
  auto a = trained<F>(l.W, l.b);
  auto other = trained<F>(o.W, o.b);
  typename F::Adapter::Cache cache, empty_cache, other_cache;
  REQUIRE_THAT(message_of([&] { a.backward_params(l.G, empty_cache); }), has_substring("backward_params: the cache was not filled"));
  other.forward(l.X, other_cache);
  REQUIRE_THAT(message_of([&] { a.backward_params(l.G, other_cache); }), has_substring("filled by another adapter"));
  a.forward(l.X, cache);
  const peft::MatrixX<Scalar> wide = peft::MatrixX<Scalar>::Zero(kOut, kTokens + 1);
  REQUIRE_THROWS_AS(a.backward_params(wide, cache), peft::ShapeError);
  REQUIRE_THAT(message_of([&] { a.backward_params(wide, cache); }), has_substring("backward_params: dY is 9x5, expected 9x4"));
  a.merge();
  REQUIRE_THROWS_AS(a.backward_params(l.G, cache), peft::StateError);
  REQUIRE_THAT(message_of([&] { a.backward_params(l.G, cache); }), has_substring("backward_params while merged"));
  a.unmerge();
  REQUIRE_THAT(message_of([&] { a.backward_params(l.G, cache); }), has_substring("stale"));
  auto d = F::make(l.W, l.b, F::dropout_config());
  const auto tampers = F::tampers();
  for (std::size_t k = 0; k < tampers.size(); ++k) {
    typename F::Adapter::Cache damaged;
    d.forward(l.X, damaged);
    tampers[k](damaged);
    REQUIRE_THAT(message_of([&] { d.backward_params(l.G, damaged); }), has_substring("does not fit"));
  }
  REQUIRE(a.flat_grads().isZero(0));
  REQUIRE(d.flat_grads().isZero(0));
}

TEMPLATE_TEST_CASE(PEFT_CT("enforces the merge state machine and refuses empty foreign stale or damaged caches"),
                   "[contract][errors]", MatrixXf, RowMajorXd) {
  using F = PEFT_CONTRACT_FIXTURE<TestType>;
  Layer<TestType> l;
  Layer<TestType> o;  // the other adapter wraps a weight of its own (PiSSA writes its residual into it)
  auto a = trained<F>(l.W, l.b);
  auto other = trained<F>(o.W, o.b);
  const TestType W0 = l.W;
  typename F::Adapter::Cache cache, empty_cache, other_cache;

  REQUIRE_THROWS_AS(a.unmerge(), peft::StateError);
  REQUIRE_THAT(message_of([&] { a.unmerge(); }), has_substring("unmerge: not merged"));
  REQUIRE(same_bits(l.W, W0));
  REQUIRE_THROWS_AS(a.backward(l.G, empty_cache), peft::StateError);
  other.forward(l.X, other_cache);
  REQUIRE_THROWS_AS(a.backward(l.G, other_cache), peft::StateError);
  REQUIRE_THAT(message_of([&] { a.backward(l.G, other_cache); }), has_substring("filled by another adapter"));

  a.forward(l.X, cache);
  a.merge();
  const TestType merged = l.W;
  REQUIRE_THROWS_AS(a.merge(), peft::StateError);
  REQUIRE_THAT(message_of([&] { a.merge(); }), has_substring("merge: already merged; call unmerge() first"));
  REQUIRE_THROWS_AS(a.backward(l.G, cache), peft::StateError);
  REQUIRE_THROWS_AS(a.forward(l.X, cache), peft::StateError);
  REQUIRE(same_bits(l.W, merged));
  a.unmerge();
  // The cache came from before the merge: stale now.
  REQUIRE_THROWS_AS(a.backward(l.G, cache), peft::StateError);
  REQUIRE_THAT(message_of([&] { a.backward(l.G, cache); }), has_substring("stale"));
  REQUIRE(a.flat_grads().isZero(0));
  // A fresh forward makes it usable again.
  a.forward(l.X, cache);
  REQUIRE_NOTHROW(a.backward(l.G, cache));

  // A cache whose buffers were damaged by hand is refused before anything is read (backward would read
  // out of bounds otherwise), and nothing is accumulated.
  auto d = F::make(l.W, l.b, F::dropout_config());
  const auto tampers = F::tampers();
  REQUIRE(!tampers.empty());
  for (std::size_t k = 0; k < tampers.size(); ++k) {
    INFO("damaged cache " << k);
    typename F::Adapter::Cache damaged;
    d.forward(l.X, damaged);
    tampers[k](damaged);
    REQUIRE_THROWS_AS(d.backward(l.G, damaged), peft::StateError);
    REQUIRE_THAT(message_of([&] { d.backward(l.G, damaged); }), has_substring("does not fit"));
    REQUIRE(d.flat_grads().isZero(0));
  }
}

TEMPLATE_TEST_CASE(PEFT_CT("refuses a cache made stale by assignment or by another adapter at the same address"),
                   "[contract][errors]", MatrixXf, RowMajorXd) {
  using F = PEFT_CONTRACT_FIXTURE<TestType>;
  Layer<TestType> l;
  typename F::Adapter::Cache cache;
  Layer<TestType> o;  // other adapters wrap a weight of their own (PiSSA writes its residual into it)
  auto a = trained<F>(l.W, l.b);
  const auto same = trained<F>(o.W, o.b);  // the same configuration: every buffer of the cache still fits

  a.forward(l.X, cache);
  a = same;  // copy assignment
  REQUIRE_THROWS_AS(a.backward(l.G, cache), peft::StateError);
  a.forward(l.X, cache);
  a = trained<F>(o.W, o.b);  // move assignment
  REQUIRE_THROWS_AS(a.backward(l.G, cache), peft::StateError);
  a.forward(l.X, cache);
  a = F::make(o.W, o.b, F::other_config());  // another configuration
  REQUIRE_THROWS_AS(a.backward(l.G, cache), peft::StateError);
  REQUIRE(a.flat_grads().isZero(0));

  // An adapter destroyed and another built in its place, same configuration: the cache is refused.
  std::optional<typename F::Adapter> slot;
  slot.emplace(F::make(l.W, l.b, F::config()));
  typename F::Adapter::Cache old_cache;
  slot->forward(l.X, old_cache);
  const void* address = &*slot;
  slot.emplace(F::make(l.W, l.b, F::config()));
  REQUIRE(static_cast<const void*>(&*slot) == address);
  REQUIRE_THROWS_AS(slot->backward(l.G, old_cache), peft::StateError);
}

// ---------------------------------------------------------------------------------------------------
// Copies, moves, threads, aliasing

TEMPLATE_TEST_CASE(PEFT_CT("copies and moves keep their parameters valid and independent"), "[contract]", MatrixXd,
                   RowMajorXf) {
  using F = PEFT_CONTRACT_FIXTURE<TestType>;
  using Adapter = typename F::Adapter;
  Layer<TestType> l;
  Adapter original = trained<F>(l.W, l.b);
  const auto values = original.flat_values().eval();
  const auto Y = original.forward(l.X);

  Adapter copy = original;
  REQUIRE(copy.flat_values() == values);
  REQUIRE(copy.flat_values().data() != original.flat_values().data());
  copy.flat_values().setZero();
  REQUIRE(original.flat_values() == values);  // independent buffers
  REQUIRE(original.forward(l.X) == Y);

  Adapter moved = std::move(copy);
  REQUIRE(moved.flat_values().isZero(0));

  Layer<TestType> o;  // other adapters wrap a weight of their own (PiSSA writes its residual into it)
  Adapter assigned = F::make(o.W, o.b, F::other_config());
  assigned = original;
  REQUIRE(assigned.flat_values() == values);
  REQUIRE(assigned.forward(l.X) == Y);
  Adapter move_assigned = F::make(o.W, o.b, F::other_config());
  move_assigned = std::move(assigned);
  REQUIRE(move_assigned.forward(l.X) == Y);

  // A copy trains on its own: its gradients do not reach the original.
  typename Adapter::Cache cache;
  move_assigned.forward(l.X, cache);
  move_assigned.backward(l.G, cache);
  REQUIRE(!move_assigned.flat_grads().isZero(0));
  REQUIRE(original.flat_grads().isZero(0));

  // Copies inside a container (reallocation moves them) still forward correctly.
  std::vector<Adapter> many;
  for (int i = 0; i < 9; ++i) many.push_back(original);
  for (const auto& x : many) REQUIRE(x.forward(l.X) == Y);
}

TEMPLATE_TEST_CASE(PEFT_CT("refuses to copy or assign over a merged adapter and moves the merge along"),
                   "[contract][errors]", MatrixXd, RowMajorXf) {
  using F = PEFT_CONTRACT_FIXTURE<TestType>;
  using Adapter = typename F::Adapter;
  Layer<TestType> l;
  Adapter a = trained<F>(l.W, l.b);
  const TestType W0 = l.W;
  const Eigen::MatrixXd bound = F::round_trip_bound(a, W0);
  a.merge();
  const TestType merged = l.W;
  REQUIRE_THROWS_AS(Adapter(a), peft::StateError);
  REQUIRE_THAT(message_of([&] { Adapter c(a); }), has_substring("copy: copying a merged adapter"));
  Layer<TestType> o;  // a weight of its own (PiSSA writes its residual into it)
  Adapter other = F::make(o.W, o.b, F::other_config());
  const auto other_values = other.flat_values().eval();
  REQUIRE_THROWS_AS(other = a, peft::StateError);
  REQUIRE_THROWS_AS(a = other, peft::StateError);
  REQUIRE(other.flat_values() == other_values);
  REQUIRE(same_bits(l.W, merged));

  Adapter moved = std::move(a);
  REQUIRE(moved.is_merged());
  REQUIRE(!a.is_merged());  // NOLINT(bugprone-use-after-move): the moved-from state is specified
  REQUIRE_THROWS_AS(a.unmerge(), peft::StateError);
  moved.unmerge();
  REQUIRE(((W0 - l.W).template cast<double>().cwiseAbs().array() <= bound.array()).all());
}

TEMPLATE_TEST_CASE(PEFT_CT("outputs may share memory with inputs and empty batches maps and blocks work"),
                   "[contract]", MatrixXd, RowMajorXf) {
  using F = PEFT_CONTRACT_FIXTURE<TestType>;
  using Scalar = typename TestType::Scalar;
  using Act = peft::MatrixX<Scalar>;
  // A square layer: Y and X have the same shape, so a user may pass one matrix as both.
  TestType W = random_matrix<TestType>(kIn, kIn, 1);
  peft::VectorX<Scalar> b = random_matrix<Act>(kIn, 1, 2);
  auto a = F::make(W, b, F::config());
  F::perturb(a);
  const Act X = random_matrix<Act>(kIn, kTokens, 2);
  const Act Y = a.forward(X);
  Act inout = X;
  a.forward_into(inout, inout);
  REQUIRE(inout == Y);

  typename F::Adapter::Cache cache;
  const Act Y_train = a.forward(X, cache);  // SSF's training forward rounds differently from inference
  inout = X;
  a.forward_into(inout, inout, cache);
  REQUIRE(inout == Y_train);
  const Act G = random_matrix<Act>(kIn, kTokens, 3);
  const Act dX = a.backward(G, cache);
  const auto grads = a.flat_grads().eval();
  a.zero_grad();
  Act g_inout = G;
  a.backward_into(g_inout, cache, g_inout);
  REQUIRE(g_inout == dX);
  REQUIRE(a.flat_grads() == grads);

  // Blocks and maps are read in place; an empty batch is valid in every call.
  Act wide = random_matrix<Act>(kIn, 10, 4);
  REQUIRE(a.forward(wide.middleCols(3, 4)) == a.forward(Act(wide.middleCols(3, 4))));
  const Eigen::Map<const Act> mapped(wide.data(), kIn, 10);
  REQUIRE(a.forward(mapped) == a.forward(wide));
  a.zero_grad();
  REQUIRE(a.forward(Act(kIn, 0)).cols() == 0);
  REQUIRE(a.forward(Act(kIn, 0), cache).cols() == 0);
  REQUIRE(a.backward(Act(kIn, 0), cache).cols() == 0);
  REQUIRE(a.flat_grads().isZero(0));
}

TEMPLATE_TEST_CASE(PEFT_CT("concurrent forward from several threads equals one thread"), "[contract][threads]",
                   MatrixXf, RowMajorXd) {
  using F = PEFT_CONTRACT_FIXTURE<TestType>;
  using Scalar = typename TestType::Scalar;
  TestType W = random_matrix<TestType>(96, 80, 1);
  peft::VectorX<Scalar> b = random_matrix<peft::MatrixX<Scalar>>(96, 1, 2);
  auto a = F::make(W, b, F::config());
  F::perturb(a);
  const auto& shared = a;
  std::vector<peft::MatrixX<Scalar>> inputs, expected;
  for (int t = 0; t < 4; ++t) {
    inputs.push_back(random_matrix<peft::MatrixX<Scalar>>(80, 16 + 24 * t, 100 + t));  // several code paths
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
