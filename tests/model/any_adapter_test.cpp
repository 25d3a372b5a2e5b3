// The type-erased adapter handle peft::AnyAdapter (include/peft/model/any_adapter.hpp): every call
// forwarded bit for bit to the LoRA, DoRA, PiSSA or SSF it holds, with and without a bias, in two matrix
// types (outputs, gradients, flat buffers, delta_weight, the saved form, merge and unmerge, the random
// stream); gradients through the handle against central differences in double; and what it refuses (a
// foreign cache, an empty or moved-from handle, a random state that is not one), get<> returning only
// the held type.
#include "support/catch.hpp"
#include "support/errors.hpp"
#include "support/matrices.hpp"

#include <peft/adapters/dora.hpp>
#include <peft/adapters/lora.hpp>
#include <peft/adapters/pissa.hpp>
#include <peft/adapters/ssf.hpp>
#include <peft/model/any_adapter.hpp>
#include <peft/testing/grad_check.hpp>

#include <cstddef>
#include <string>
#include <type_traits>
#include <typeinfo>
#include <utility>

using peft::test::has_substring;
using peft::test::MatrixXd;
using peft::test::MatrixXf;
using peft::test::message_of;
using peft::test::random_matrix;
using peft::test::RowMajorXd;
using peft::test::same_bits;

// ===================================================================================================
// AnyAdapter forwards faithfully

namespace {

bool cfg_has_dropout(const peft::LoRAConfig& c) { return c.dropout > 0; }
bool cfg_has_dropout(const peft::SSFConfig&) { return false; }

/// Builds one adapter of type A over W (and b) and an identical one inside an AnyAdapter over copies,
/// and checks that every call through the handle gives the adapter's own results, bit for bit.
template <class A, class M, class Config>
void check_forwarding(const Config& cfg, bool with_bias) {
  using Scalar = typename M::Scalar;
  using Mat = peft::MatrixX<Scalar>;
  using Vec = peft::VectorX<Scalar>;
  INFO(A::class_name << (with_bias ? " with a bias" : " without a bias"));
  const M W0 = random_matrix<M>(7, 5, 31);
  M W_direct = W0, W_any = W0;
  Vec b_direct = random_matrix<Mat>(7, 1, 32), b_any = b_direct;
  A direct = with_bias ? A(W_direct, b_direct, cfg) : A(W_direct, cfg);
  peft::AnyAdapter<Scalar> any(with_bias ? A(W_any, b_any, cfg) : A(W_any, cfg));
  static_assert(peft::is_adapter_v<peft::AnyAdapter<Scalar>>, "an AnyAdapter is an adapter");
  const Mat X = random_matrix<Mat>(5, 4, 33), G = random_matrix<Mat>(7, 4, 34);
  // Move the parameters off their start, the same way in both, through their flat buffers.
  const Vec shift = random_matrix<Mat>(direct.num_parameters(), 1, 35, 0.05);
  direct.flat_values() += shift;
  any.flat_values() += shift;

  REQUIRE(any.holds());
  REQUIRE((any.type() == typeid(A)));
  REQUIRE((std::string(any.class_name()) == A::class_name));
  REQUIRE((any.input_size() == 5));
  REQUIRE((any.output_size() == 7));
  REQUIRE((any.d_in() == 5));
  REQUIRE((any.d_out() == 7));
  REQUIRE((any.num_parameters() == direct.num_parameters()));
  REQUIRE((any.flat_values() == direct.flat_values()));
  REQUIRE(same_bits(W_any, W_direct));  // PiSSA: the same residual
  const auto pd = direct.parameters();
  const auto pa = any.parameters();
  REQUIRE((pa.size() == pd.size()));
  for (std::size_t k = 0; k < pa.size(); ++k) {
    REQUIRE((std::string(pa[k].name) == pd[k].name));
    REQUIRE((Mat(pa[k].value) == Mat(pd[k].value)));
  }

  REQUIRE((any.forward(X) == Mat(direct.forward(X))));
  typename A::Cache cd;
  typename peft::AnyAdapter<Scalar>::Cache ca;
  Mat Y_first;
  for (int round = 0; round < 2; ++round) {
    INFO("training round " << round);
    const Mat Yd = direct.forward(X, cd);
    Mat Ya;
    any.forward_into(X, Ya, ca);
    REQUIRE((Ya == Yd));
    const Mat dXd = direct.backward(G, cd);
    REQUIRE((any.backward(G, ca) == dXd));
    REQUIRE((any.flat_grads() == direct.flat_grads()));  // accumulated over the rounds alike
    if (round == 0) Y_first = Ya;
  }
  if (cfg_has_dropout(cfg)) REQUIRE(any.forward(X, ca) != Y_first);  // the masks came from a live stream
  if (cfg_has_dropout(cfg)) direct.forward(X, cd);

  // delta_weight: column-major whatever the weight's storage order.
  const auto dWa = any.delta_weight();
  static_assert(std::is_same<std::decay_t<decltype(dWa)>, Mat>::value, "delta_weight is column-major");
  REQUIRE((dWa == Mat(direct.delta_weight())));
  REQUIRE(!dWa.isZero(0));

  any.zero_grad();
  REQUIRE(any.flat_grads().isZero(0));
  REQUIRE(!direct.flat_grads().isZero(0));

  if constexpr (std::is_same<A, peft::SSF<M>>::value) {
    REQUIRE(!any.has_random_state());
    REQUIRE(any.random_state().empty());
    REQUIRE((any.lora_shape().rank == 0));
  } else {
    REQUIRE(any.has_random_state());
    REQUIRE((any.random_state() == direct.random_state()));
    REQUIRE((any.lora_shape().rank == cfg.rank));
    REQUIRE((any.lora_shape().alpha == cfg.alpha));
    REQUIRE((any.lora_shape().use_rslora == cfg.use_rslora));
  }

  const peft::SavedForm<Scalar> saved = any.saved_form();
  if constexpr (std::is_same<A, peft::PiSSA<M>>::value) {
    const auto lora = direct.to_lora();
    REQUIRE(saved.converted);
    REQUIRE((saved.tensors.size() == 2));
    REQUIRE(saved.tensors[0].first == "lora_A");
    REQUIRE((saved.tensors[0].second == lora.A));
    REQUIRE(saved.tensors[1].first == "lora_B");
    REQUIRE((saved.tensors[1].second == lora.B));
    REQUIRE((saved.lora.rank == 2 * cfg.rank));
  } else {
    REQUIRE(!saved.converted);
    REQUIRE((saved.tensors.size() == pd.size()));
    for (std::size_t k = 0; k < pd.size(); ++k) {
      REQUIRE((saved.tensors[k].first == pd[k].name));
      REQUIRE((saved.tensors[k].second == Mat(pd[k].value)));
    }
  }

  // merge and unmerge write the same weights.
  if (std::is_same<A, peft::SSF<M>>::value && !with_bias) {
    REQUIRE_THROWS_AS(direct.merge(), peft::ShapeError);
    REQUIRE_THROWS_AS(any.merge(), peft::ShapeError);  // the adapter's own error, unchanged
    REQUIRE(!any.is_merged());
  } else {
    direct.merge();
    any.merge();
    REQUIRE(any.is_merged());
    REQUIRE(!same_bits(W_any, W0));
    REQUIRE(same_bits(W_any, W_direct));
    REQUIRE(same_bits(b_any, b_direct));
    REQUIRE((any.forward(X) == Mat(direct.forward(X))));
    direct.unmerge();
    any.unmerge();
    REQUIRE(!any.is_merged());
    REQUIRE(same_bits(W_any, W_direct));
    REQUIRE(same_bits(b_any, b_direct));
  }
}

struct AnyConfigs {
  peft::LoRAConfig lora;
  peft::DoRAConfig dora;
  peft::PiSSAConfig pissa;
  peft::SSFConfig ssf;
};

AnyConfigs any_configs(bool exact_dora_gradient) {
  AnyConfigs c;
  c.lora.rank = 3;
  c.lora.alpha = 6;
  c.lora.dropout = 0.3;
  c.lora.init = peft::LoRAInit::random;
  c.lora.seed = 5;
  static_cast<peft::LoRAConfig&>(c.dora) = c.lora;
  c.dora.seed = 6;
  c.dora.detach_norm = !exact_dora_gradient;
  c.pissa.rank = 2;
  c.pissa.alpha = 4;
  c.pissa.use_rslora = true;
  c.pissa.dropout = 0.3;
  c.pissa.seed = 9;
  c.ssf.seed = 3;
  return c;
}

}  // namespace

TEMPLATE_TEST_CASE("AnyAdapter forwards every call to the adapter it holds bit for bit", "[model][any]", MatrixXf,
                   RowMajorXd) {
  using M = TestType;
  const AnyConfigs c = any_configs(false);
  for (const bool bias : {true, false}) {
    check_forwarding<peft::LoRA<M>, M>(c.lora, bias);
    check_forwarding<peft::DoRA<M>, M>(c.dora, bias);
    check_forwarding<peft::PiSSA<M>, M>(c.pissa, bias);
    check_forwarding<peft::SSF<M>, M>(c.ssf, bias);
  }
}

namespace {

/// dL/dX and dL/dθ of L = <R, any.forward(X, cache)> through the handle against central differences,
/// each evaluation replaying the dropout masks from the saved random state.
template <class A, class Config>
void check_any_gradients(const Config& cfg, bool with_bias) {
  using M = RowMajorXd;
  INFO(A::class_name << (with_bias ? " with a bias" : " without a bias"));
  M W = random_matrix<M>(6, 4, 41);
  Eigen::VectorXd b = random_matrix<MatrixXd>(6, 1, 42);
  peft::AnyAdapter<double> any(with_bias ? A(W, b, cfg) : A(W, cfg));
  any.flat_values() += random_matrix<MatrixXd>(any.num_parameters(), 1, 43, 0.1);
  const MatrixXd X = random_matrix<MatrixXd>(4, 3, 44), R = random_matrix<MatrixXd>(6, 3, 45);
  const std::string start = any.random_state();
  const auto loss = [&](const MatrixXd& input) {
    if (any.has_random_state()) any.set_random_state(start);
    peft::AnyAdapter<double>::Cache cache;
    return R.cwiseProduct(any.forward(input, cache)).sum();
  };

  any.zero_grad();
  peft::AnyAdapter<double>::Cache cache;
  any.forward(X, cache);
  const MatrixXd dX = any.backward(R, cache);
  const Eigen::VectorXd grads = any.flat_grads();
  REQUIRE(grads.norm() > 0);
  {  // backward_params through the handle: the same parameter gradients (the same masks), no dX
    if (any.has_random_state()) any.set_random_state(start);
    any.zero_grad();
    peft::AnyAdapter<double>::Cache params_cache;
    any.forward(X, params_cache);
    any.backward_params(R, params_cache);
    REQUIRE((any.flat_grads() - grads).cwiseAbs().maxCoeff() <= 1e-12 * (grads.cwiseAbs().maxCoeff() + 1));
  }

  const double h = 1e-6;
  Eigen::VectorXd fd_x(X.size());
  for (Eigen::Index k = 0; k < X.size(); ++k) {
    MatrixXd Xp = X, Xm = X;
    Xp(k) += h;
    Xm(k) -= h;
    fd_x(k) = (loss(Xp) - loss(Xm)) / (2 * h);
  }
  INFO("dX");
  REQUIRE(peft::testing::relative_error(Eigen::Map<const Eigen::VectorXd>(dX.data(), dX.size()), fd_x) < 1e-6);
  for (const auto& p : any.parameters()) {
    INFO("d" << p.name);
    const Eigen::Index offset = p.value.data() - any.flat_values().data();
    Eigen::VectorXd fd(p.value.size());
    for (Eigen::Index k = 0; k < p.value.size(); ++k) {
      const double v = any.flat_values()(offset + k);
      any.flat_values()(offset + k) = v + h;
      const double lp = loss(X);
      any.flat_values()(offset + k) = v - h;
      const double lm = loss(X);
      any.flat_values()(offset + k) = v;
      fd(k) = (lp - lm) / (2 * h);
    }
    REQUIRE(peft::testing::relative_error(grads.segment(offset, p.value.size()), fd) < 1e-6);
  }
}

}  // namespace

TEST_CASE("Gradients through an AnyAdapter match central differences in double", "[model][any][gradients]") {
  const AnyConfigs c = any_configs(true);  // DoRA's exact gradient: what finite differences measure
  for (const bool bias : {true, false}) {
    check_any_gradients<peft::LoRA<RowMajorXd>>(c.lora, bias);
    check_any_gradients<peft::DoRA<RowMajorXd>>(c.dora, bias);
    check_any_gradients<peft::PiSSA<RowMajorXd>>(c.pissa, bias);
    check_any_gradients<peft::SSF<RowMajorXd>>(c.ssf, bias);
  }
}

TEST_CASE("AnyAdapter refuses a foreign cache and an empty handle and get returns only the held type",
          "[model][any][errors]") {
  MatrixXf W1 = random_matrix<MatrixXf>(6, 5, 51), W2 = W1;
  peft::LoRAConfig cfg;
  cfg.rank = 2;
  cfg.init = peft::LoRAInit::random;
  cfg.dropout = 0.2;
  peft::AnyAdapter<float> lora(peft::LoRA<MatrixXf>(W1, cfg));
  peft::AnyAdapter<float> ssf{peft::SSF<MatrixXf>(W2)};
  const MatrixXf X = random_matrix<MatrixXf>(5, 3, 52), G = random_matrix<MatrixXf>(6, 3, 53);
  peft::AnyAdapter<float>::Cache cache;

  SECTION("a cache no training forward filled") {
    REQUIRE_THROWS_AS(lora.backward(G, cache), peft::StateError);
    REQUIRE_THAT(message_of([&] { lora.backward(G, cache); }),
                 has_substring("peft::LoRA::backward: the cache was not filled by a training forward"));
    REQUIRE_THAT(message_of([&] { lora.backward_params(G, cache); }),
                 has_substring("peft::LoRA::backward_params: the cache was not filled by a training forward"));
  }
  SECTION("a cache another adapter type filled") {
    lora.forward(X, cache);
    REQUIRE_THROWS_AS(ssf.backward(G, cache), peft::StateError);
    REQUIRE_THAT(message_of([&] { ssf.backward(G, cache); }),
                 has_substring("peft::SSF::backward: the cache was filled by another adapter"));
    REQUIRE_THAT(message_of([&] { ssf.backward_params(G, cache); }),
                 has_substring("peft::SSF::backward_params: the cache was filled by another adapter"));
    REQUIRE(ssf.flat_grads().isZero(0));
    REQUIRE_NOTHROW(lora.backward(G, cache));  // it still serves the adapter that filled it
    // A training forward of the other adapter takes the cache over.
    ssf.forward(X, cache);
    REQUIRE_NOTHROW(ssf.backward(G, cache));
    REQUIRE(!ssf.flat_grads().isZero(0));
    REQUIRE_THROWS_AS(lora.backward(G, cache), peft::StateError);
  }
  SECTION("get returns the held adapter for its type and nullptr for any other") {
    auto* held = lora.get<peft::LoRA<MatrixXf>>();
    REQUIRE((held != nullptr));
    REQUIRE((held->flat_values().data() == lora.flat_values().data()));
    REQUIRE((lora.get<peft::DoRA<MatrixXf>>() == nullptr));
    REQUIRE((lora.get<peft::PiSSA<MatrixXf>>() == nullptr));
    REQUIRE((lora.get<peft::SSF<MatrixXf>>() == nullptr));
    REQUIRE((ssf.get<peft::LoRA<MatrixXf>>() == nullptr));
    REQUIRE((ssf.get<peft::SSF<MatrixXf>>() != nullptr));
    const peft::AnyAdapter<float>& cref = lora;
    REQUIRE((cref.get<peft::LoRA<MatrixXf>>() == held));
    REQUIRE((cref.get<peft::SSF<MatrixXf>>() == nullptr));
    held->B().setConstant(0.5f);  // writing through it changes the handle's adapter
    REQUIRE(MatrixXf(lora.parameters()[1].value).isConstant(0.5f, 0));
    REQUIRE((peft::AnyAdapter<float>().get<peft::LoRA<MatrixXf>>() == nullptr));
  }
  SECTION("a moved-from or default handle throws StateError on every call") {
    const MatrixXf Y = lora.forward(X);
    peft::AnyAdapter<float> moved(std::move(lora));
    REQUIRE(moved.holds());
    REQUIRE((moved.forward(X) == Y));
    for (peft::AnyAdapter<float>* empty : {&lora, static_cast<peft::AnyAdapter<float>*>(nullptr)}) {
      peft::AnyAdapter<float> fresh;
      peft::AnyAdapter<float>& h = empty ? *empty : fresh;
      REQUIRE(!h.holds());
      REQUIRE((h.get<peft::LoRA<MatrixXf>>() == nullptr));
      REQUIRE_THROWS_AS(h.forward(X), peft::StateError);
      REQUIRE_THAT(message_of([&] { h.forward(X); }),
                   has_substring("peft::AnyAdapter::forward: the handle is empty (moved from)"));
      REQUIRE_THROWS_AS(h.forward(X, cache), peft::StateError);
      REQUIRE_THROWS_AS(h.backward(G, cache), peft::StateError);
      REQUIRE_THROWS_AS(h.merge(), peft::StateError);
      REQUIRE_THROWS_AS(h.unmerge(), peft::StateError);
      REQUIRE_THROWS_AS(h.is_merged(), peft::StateError);
      REQUIRE_THROWS_AS(h.parameters(), peft::StateError);
      REQUIRE_THROWS_AS(h.flat_values(), peft::StateError);
      REQUIRE_THROWS_AS(h.num_parameters(), peft::StateError);
      REQUIRE_THROWS_AS(h.delta_weight(), peft::StateError);
      REQUIRE_THROWS_AS(h.lora_shape(), peft::StateError);
      REQUIRE_THROWS_AS(h.random_state(), peft::StateError);
      REQUIRE_THROWS_AS(h.type(), peft::StateError);
    }
    // Assigned to, it works again.
    lora = std::move(moved);
    REQUIRE((lora.forward(X) == Y));
  }
  SECTION("random states forward and are checked") {
    REQUIRE(!ssf.has_random_state());
    REQUIRE_NOTHROW(ssf.set_random_state(""));
    REQUIRE_THROWS_AS(ssf.set_random_state("1 2 3"), peft::ConfigError);
    REQUIRE_THAT(message_of([&] { ssf.set_random_state("1 2 3"); }), has_substring("has no random stream"));
    const std::string before = lora.random_state();
    REQUIRE_THROWS_AS(lora.set_random_state("not a state"), peft::ConfigError);
    REQUIRE((lora.random_state() == before));
    const MatrixXf Y1 = lora.forward(X, cache);
    lora.set_random_state(before);
    REQUIRE((lora.forward(X, cache) == Y1));
  }
}
