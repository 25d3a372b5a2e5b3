#pragma once
// One fixture per adapter kind, over the weight's matrix type M: how to build the adapter over W and b,
// its reference forward in double (docs/math.md), what it names its parameters, which configurations it
// refuses, its merge round-trip bound, its gradient cases and the ways to damage its cache. The adapter
// contract (contract.hpp) is written once against these.
#include "support/matrices.hpp"
#include "support/numeric.hpp"

#include <peft/adapters/dora.hpp>
#include <peft/adapters/lora.hpp>
#include <peft/adapters/pissa.hpp>
#include <peft/adapters/ssf.hpp>

#include <cmath>
#include <functional>
#include <limits>
#include <string>
#include <vector>

namespace peft::test {

/// A parameter the adapter must expose: PEFT's name and shape.
struct ParamSpec {
  std::string name;
  Eigen::Index rows, cols;
};

/// A configuration whose gradients are checked against finite differences.
template <class Config>
struct GradCase {
  std::string name;
  Config config;
  bool bias;
};

/// What the LoRA family's fixtures share: A, B, s, and the branch's cache.
template <class M, class AdapterT, class ConfigT>
struct LowRankFixture {
  using Matrix = M;
  using Scalar = typename M::Scalar;
  using Adapter = AdapterT;
  using Config = ConfigT;
  using Cache = typename Adapter::Cache;
  using Act = peft::MatrixX<Scalar>;
  using Vec = peft::VectorX<Scalar>;

  static constexpr bool merge_needs_bias = false;

  static Adapter make(Eigen::Ref<M> W, Eigen::Ref<Vec> b, const Config& cfg) { return Adapter(W, b, cfg); }
  static Adapter make(Eigen::Ref<M> W, const Config& cfg) { return Adapter(W, cfg); }

  /// Y = (W + s B A) X + b 1ᵀ in double, W the bound weight (the residual for PiSSA).
  static Eigen::MatrixXd low_rank_reference(const Adapter& a, const M& W, const Vec* b, const Act& X) {
    const Eigen::MatrixXd V = to_double(W) + static_cast<double>(a.scaling()) * mul(to_double(a.B()), to_double(a.A()));
    Eigen::MatrixXd Y = mul(V, to_double(X));
    if (b) Y.colwise() += b->template cast<double>();
    return Y;
  }

  static std::vector<ParamSpec> low_rank_parameters(Eigen::Index d_out, Eigen::Index d_in, Eigen::Index r) {
    return {{"lora_A", r, d_in}, {"lora_B", d_out, r}};
  }

  static std::vector<std::function<void(Config&)>> low_rank_invalid_configs() {
    const double nan = std::numeric_limits<double>::quiet_NaN(), inf = std::numeric_limits<double>::infinity();
    return {[](Config& c) { c.rank = 0; },       [](Config& c) { c.rank = -2; },
            [](Config& c) { c.alpha = 0; },      [](Config& c) { c.alpha = -1; },
            [=](Config& c) { c.alpha = nan; },   [=](Config& c) { c.alpha = inf; },
            [](Config& c) { c.dropout = -0.1; }, [](Config& c) { c.dropout = 1.0; },
            [=](Config& c) { c.dropout = nan; }};
  }

  /// 2 eps (|W0| + |dW|): one round trip of W <- W + s B A, W <- W - s B A (docs/math.md, LoRA).
  /// |s| |B| |A|: what bounds the rounding of s B A, whichever kernel computes it.
  static Eigen::MatrixXd product_magnitude(const Adapter& a) {
    return std::abs(double(a.scaling())) * abs_mul(to_double(a.B()), to_double(a.A()));
  }

  static Eigen::MatrixXd low_rank_round_trip_bound(const Adapter& a, const M& W0) {
    const double e = eps<Scalar>();
    return 2 * e * (W0.template cast<double>().cwiseAbs() + a.delta_weight().template cast<double>().cwiseAbs());
  }

  /// Ways to damage the branch's cache after a training forward with dropout: each must be refused.
  static std::vector<std::function<void(Cache&)>> low_rank_tampers() {
    return {[](Cache& c) { c.branch.H.resize(c.branch.H.rows() + 1, c.branch.H.cols()); },
            [](Cache& c) { c.branch.X.resize(c.branch.X.rows(), c.branch.X.cols() + 1); },
            [](Cache& c) { c.branch.mask.resize(c.branch.mask.rows(), c.branch.mask.cols() - 1); },
            [](Cache& c) { c.branch.mask.resize(c.branch.mask.rows() - 1, c.branch.mask.cols()); }};
  }
};

template <class M>
struct LoRAFixture : LowRankFixture<M, peft::LoRA<M>, peft::LoRAConfig> {
  using F = LowRankFixture<M, peft::LoRA<M>, peft::LoRAConfig>;
  using typename F::Act;
  using typename F::Adapter;
  using typename F::Config;
  using typename F::Vec;
  static constexpr bool exact_identity = true;  // B = 0 adds exact zeros

  /// Not the identity: B random too.
  static Config config(Eigen::Index rank = 3, double dropout = 0.0) {
    Config cfg;
    cfg.rank = rank;
    cfg.alpha = 6.0;
    cfg.dropout = dropout;
    cfg.init = peft::LoRAInit::random;
    cfg.seed = 42;
    return cfg;
  }
  static Config identity_config() {
    Config cfg;
    cfg.rank = 4;
    cfg.alpha = 16;
    return cfg;
  }
  static Config other_config() { return config(1); }
  static Config dropout_config() { return config(3, 0.3); }
  static void perturb(Adapter&) {}
  static Eigen::MatrixXd reference(const Adapter& a, const M& W, const Vec* b, const Act& X) {
    return F::low_rank_reference(a, W, b, X);
  }
  static std::vector<ParamSpec> parameters(Eigen::Index d_out, Eigen::Index d_in) {
    return F::low_rank_parameters(d_out, d_in, 3);
  }
  static auto invalid_configs() { return F::low_rank_invalid_configs(); }
  static Eigen::MatrixXd round_trip_bound(const Adapter& a, const M& W0) { return F::low_rank_round_trip_bound(a, W0); }
  static auto tampers() { return F::low_rank_tampers(); }
  static std::vector<GradCase<Config>> gradient_cases() {
    Config rs = config(3), drop = config(3, 0.3), both = config(3, 0.5);
    rs.use_rslora = true;
    both.use_rslora = true;
    return {{"plain", config(), true}, {"no bias", config(), false}, {"rsLoRA", rs, true},
            {"dropout", drop, true},   {"dropout and rsLoRA", both, false}};
  }
};

template <class M>
struct PiSSAFixture : LowRankFixture<M, peft::PiSSA<M>, peft::PiSSAConfig> {
  using F = LowRankFixture<M, peft::PiSSA<M>, peft::PiSSAConfig>;
  using typename F::Act;
  using typename F::Adapter;
  using typename F::Config;
  using typename F::Scalar;
  using typename F::Vec;
  static constexpr bool exact_identity = false;  // W_res + s B A = W0 up to rounding

  /// The randomized SVD (q = 2), so that large layers start fast.
  static Config config(Eigen::Index rank = 3, double dropout = 0.0) {
    Config cfg;
    cfg.rank = rank;
    cfg.alpha = 6.0;
    cfg.dropout = dropout;
    cfg.svd_iterations = 2;
    cfg.seed = 4;
    return cfg;
  }
  static Config identity_config() {
    Config cfg = config();
    cfg.svd_iterations = 0;  // the exact SVD
    return cfg;
  }
  static Config other_config() { return config(1); }
  static Config dropout_config() { return config(3, 0.3); }
  /// As if trained: B moves away from B₀.
  static void perturb(Adapter& a) { a.B().array() += Scalar(0.1); }
  static Eigen::MatrixXd reference(const Adapter& a, const M& W, const Vec* b, const Act& X) {
    return F::low_rank_reference(a, W, b, X);
  }
  static std::vector<ParamSpec> parameters(Eigen::Index d_out, Eigen::Index d_in) {
    return F::low_rank_parameters(d_out, d_in, 3);
  }
  static std::vector<std::function<void(Config&)>> invalid_configs() {
    auto edits = F::low_rank_invalid_configs();
    edits.push_back([](Config& c) { c.rank = 1000; });  // above min(d_out, d_in)
    edits.push_back([](Config& c) { c.svd_iterations = -1; });
    edits.push_back([](Config& c) { c.oversampling = -1; });
    return edits;
  }
  static Eigen::MatrixXd round_trip_bound(const Adapter& a, const M& W0) { return F::low_rank_round_trip_bound(a, W0); }
  static auto tampers() { return F::low_rank_tampers(); }
  static std::vector<GradCase<Config>> gradient_cases() {
    Config both = config(3, 0.3);
    both.use_rslora = true;
    return {{"plain", config(), true}, {"rsLoRA and dropout", both, false}};
  }
};

template <class M>
struct DoRAFixture : LowRankFixture<M, peft::DoRA<M>, peft::DoRAConfig> {
  using F = LowRankFixture<M, peft::DoRA<M>, peft::DoRAConfig>;
  using typename F::Act;
  using typename F::Adapter;
  using typename F::Cache;
  using typename F::Config;
  using typename F::Scalar;
  using typename F::Vec;
  static constexpr bool exact_identity = false;  // the joint product sums in another order

  static Config config(Eigen::Index rank = 3, double dropout = 0.0, bool detach_norm = true) {
    Config cfg;
    cfg.rank = rank;
    cfg.alpha = 6.0;
    cfg.dropout = dropout;
    cfg.init = peft::LoRAInit::random;  // B != 0: the branch and the norms' dependence on B are real
    cfg.seed = 42;
    cfg.detach_norm = detach_norm;
    return cfg;
  }
  static Config identity_config() {
    Config cfg;
    cfg.rank = 4;
    cfg.alpha = 16;
    return cfg;
  }
  static Config other_config() { return config(1); }
  static Config dropout_config() { return config(3, 0.3); }
  /// Moves the magnitude away from the norms (gain in [0.75, 1.75]), as training would.
  static void perturb(Adapter& a) {
    const Vec f = random_matrix<Act>(a.d_out(), 1, 17);
    a.magnitude().array() *= Scalar(1.25) + Scalar(0.5) * f.array();
  }
  /// diag(m / n) (W + s B A) X + b 1ᵀ, n the row norms of the materialised W + s B A.
  static Eigen::MatrixXd reference(const Adapter& a, const M& W, const Vec* b, const Act& X) {
    const Eigen::MatrixXd V = direction(a, W);
    const Eigen::VectorXd g = a.magnitude().template cast<double>().cwiseQuotient(V.rowwise().norm());
    Eigen::MatrixXd Y = g.asDiagonal() * mul(V, to_double(X));
    if (b) Y.colwise() += b->template cast<double>();
    return Y;
  }
  static Eigen::MatrixXd direction(const Adapter& a, const M& W) {
    return to_double(W) + static_cast<double>(a.scaling()) * mul(to_double(a.B()), to_double(a.A()));
  }
  static std::vector<ParamSpec> parameters(Eigen::Index d_out, Eigen::Index d_in) {
    auto specs = F::low_rank_parameters(d_out, d_in, 3);
    specs.push_back({"lora_magnitude_vector", d_out, 1});
    return specs;
  }
  static auto invalid_configs() { return F::low_rank_invalid_configs(); }
  /// eps |W0| + 5 eps |V| (docs/math.md, DoRA), |V| taken in double plus (r + 2) eps |s| |B| |A| for the
  /// rounding of the computed s B A.
  static Eigen::MatrixXd round_trip_bound(const Adapter& a, const M& W0) {
    const double e = eps<Scalar>();
    const Eigen::MatrixXd L = std::abs(double(a.scaling())) * abs_mul(to_double(a.B()), to_double(a.A()));
    const Eigen::MatrixXd V = direction(a, W0).cwiseAbs() + double(a.rank() + 2) * e * L;
    return e * W0.template cast<double>().cwiseAbs() + 5 * e * V;
  }
  static std::vector<std::function<void(Cache&)>> tampers() {
    auto edits = F::low_rank_tampers();
    edits.push_back([](Cache& c) { c.Z.resize(c.Z.rows(), c.Z.cols() + 1); });
    edits.push_back([](Cache& c) { c.g.resize(c.g.size() - 1); });
    edits.push_back([](Cache& c) { c.inv_n.resize(c.inv_n.size() + 1); });
    edits.push_back([](Cache& c) { c.VAt.resize(c.VAt.rows(), c.VAt.cols() + 1); });
    return edits;
  }
  /// The exact gradient (detach_norm = false): what finite differences of the forward measure. The
  /// detached mode is checked against its own loss in dora_gradients_test.cpp.
  static std::vector<GradCase<Config>> gradient_cases() {
    Config rs = config(3, 0.0, false), drop = config(3, 0.3, false), both = config(3, 0.5, false);
    rs.use_rslora = true;
    both.use_rslora = true;
    return {{"plain", config(3, 0.0, false), true}, {"no bias", config(3, 0.0, false), false},
            {"rsLoRA", rs, true}, {"dropout", drop, true}, {"dropout and rsLoRA", both, false}};
  }
};

template <class M>
struct SSFFixture {
  using Matrix = M;
  using Scalar = typename M::Scalar;
  using Adapter = peft::SSF<M>;
  using Config = peft::SSFConfig;
  using Cache = typename Adapter::Cache;
  using Act = peft::MatrixX<Scalar>;
  using Vec = peft::VectorX<Scalar>;
  static constexpr bool exact_identity = true;      // γ = 1, β = 0 multiply and add exactly
  static constexpr bool merge_needs_bias = true;    // β lives in the bias

  static Adapter make(Eigen::Ref<M> W, Eigen::Ref<Vec> b, const Config& cfg) { return Adapter(W, b, cfg); }
  static Adapter make(Eigen::Ref<M> W, const Config& cfg) { return Adapter(W, cfg); }

  /// A visibly non-identity SSF: γ ~ N(1, 0.3²), β ~ N(0, 0.3²).
  static Config config(std::uint64_t seed = 5) {
    Config cfg;
    cfg.init_std = 0.3;
    cfg.seed = seed;
    return cfg;
  }
  static Config identity_config() {
    Config cfg;
    cfg.init = peft::SSFInit::identity;
    return cfg;
  }
  static Config other_config() { return config(6); }
  static Config dropout_config() { return config(); }  // SSF has no dropout
  static void perturb(Adapter&) {}
  /// diag(γ) (W X + b 1ᵀ) + β 1ᵀ.
  static Eigen::MatrixXd reference(const Adapter& a, const M& W, const Vec* b, const Act& X) {
    Eigen::MatrixXd Z = mul(to_double(W), to_double(X));
    if (b) Z.colwise() += b->template cast<double>();
    Eigen::MatrixXd Y = a.scale().template cast<double>().asDiagonal() * Z;
    Y.colwise() += Eigen::VectorXd(a.shift().template cast<double>());
    return Y;
  }
  static std::vector<ParamSpec> parameters(Eigen::Index d_out, Eigen::Index) {
    return {{"ssf_scale", d_out, 1}, {"ssf_shift", d_out, 1}};
  }
  static std::vector<std::function<void(Config&)>> invalid_configs() {
    return {[](Config& c) { c.init_std = -1; }, [](Config& c) { c.init_std = std::numeric_limits<double>::infinity(); },
            [](Config& c) { c.init_std = std::numeric_limits<double>::quiet_NaN(); }};
  }
  /// 2 eps |W0|: one multiplication and one division by γ_i (docs/math.md, SSF).
  static Eigen::MatrixXd round_trip_bound(const Adapter&, const M& W0) {
    return 2 * eps<Scalar>() * W0.template cast<double>().cwiseAbs();
  }
  static Eigen::MatrixXd product_magnitude(const Adapter& a) { return Eigen::MatrixXd::Zero(a.d_out(), a.d_in()); }
  static std::vector<std::function<void(Cache&)>> tampers() {
    return {[](Cache& c) { c.Z.resize(c.Z.rows() + 1, c.Z.cols()); },
            [](Cache& c) { c.Z.resize(c.Z.rows(), c.Z.cols() - 1); }};
  }
  static std::vector<GradCase<Config>> gradient_cases() { return {{"bias", config(), true}, {"no bias", config(), false}}; }
};

}  // namespace peft::test
