// A whole model's adapters at work (include/peft/model/adapter_set.hpp): parameters registered with an
// optimizer in one call, named by path, and stepped as each adapter alone would be (a module trained
// whole too, in either storage order); merge and unmerge all or nothing, rolling back the layers done
// when a later one refuses, and restoring every weight within the LoRA round-trip bound; ModelWeights,
// insert() and train_whole() refusing what does not fit. On a small model (support/small_model.hpp).
// Which modules are adapted: targets_test.cpp; the handle: any_adapter_test.cpp; an optimizer's
// state_dict: optim/optimizer_test.cpp.
#include "support/catch.hpp"
#include "support/errors.hpp"
#include "support/matrices.hpp"
#include "support/small_model.hpp"

#include <peft/model/adapter_set.hpp>
#include <peft/model/any_adapter.hpp>
#include <peft/optim/adamw.hpp>
#include <peft/optim/sgd.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

using peft::test::eps;
using peft::test::has_substring;
using peft::test::MatrixXd;
using peft::test::MatrixXf;
using peft::test::message_of;
using peft::test::random_matrix;
using peft::test::RowMajorXd;
using peft::test::same_bits;
using peft::test::to_double;
using namespace peft::test::small_model;

namespace {

/// max over the elements of |a - b| / bound (> 1: out of bound).
template <class A, class B>
double worst_ratio(const A& a, const B& b, const Eigen::MatrixXd& bound) {
  return ((to_double(a) - to_double(b)).cwiseAbs().array() / bound.array()).maxCoeff();
}

/// max |a - b| / max |b|.
template <class A, class B>
double relative_diff(const A& a, const B& b) {
  return (to_double(a) - to_double(b)).cwiseAbs().maxCoeff() / to_double(b).cwiseAbs().maxCoeff();
}

/// \returns the message of the E that fn throws (one call); fails the test if it throws none.
template <class E, class Fn>
std::string error_of(Fn fn) {
  try {
    fn();
  } catch (const E& e) {
    return e.what();
  }
  FAIL("the expected exception was not thrown");
  return "";
}

}  // namespace

// ===================================================================================================
// 1. Parameters by name for an optimizer

TEST_CASE("add_to registers every parameter in one call named by path", "[model][optim]") {
  Model<MatrixXf> m;
  auto cfg = targeting({"q_proj"});
  cfg.kind = peft::AdapterKind::dora;
  cfg.r = 2;
  peft::AdapterSet<MatrixXf> set(m.weights, cfg);
  set.train_whole("head");
  peft::AdamW<float> opt;
  set.add_to(opt, peft::lora_plus(4.0));

  Strings want;
  for (const std::string path : {"layers.0.attn.q_proj", "layers.1.attn.q_proj", "q_proj"})
    for (const char* name : {"lora_A", "lora_B", "lora_magnitude_vector"}) want.push_back(path + "." + name);
  want.push_back("head.weight");
  want.push_back("head.bias");

  const auto slots = opt.slots();
  const auto params = set.parameters();
  REQUIRE((slots.size() == want.size()));
  REQUIRE((params.size() == want.size()));
  for (std::size_t k = 0; k < want.size(); ++k) {
    INFO(want[k]);
    REQUIRE((slots[k].name == want[k]));
    REQUIRE((std::string(params[k].name) == want[k]));
    REQUIRE((slots[k].rows == params[k].value.rows()));
    REQUIRE((slots[k].cols == params[k].value.cols()));
    const bool is_b = want[k].size() > 7 && want[k].compare(want[k].size() - 7, 7, ".lora_B") == 0;
    REQUIRE((slots[k].lr_scale == (is_b ? 4.0 : 1.0)));
  }
  REQUIRE((slots[0].rows == 2));  // lora_A: r x d_in
  REQUIRE((slots[0].cols == 5));
  REQUIRE((slots[2].rows == 6));  // magnitude: d_out x 1
  REQUIRE((slots[2].cols == 1));
  REQUIRE((slots[9].rows == 3));  // head.weight as W
  REQUIRE((slots[9].cols == 6));
  REQUIRE((slots[10].rows == 3));
  REQUIRE((slots[10].cols == 1));
  // The views are the adapters' own buffers and the user's head.
  REQUIRE(params[3].value.data() == set.at("layers.1.attn.q_proj").parameters()[0].value.data());
  REQUIRE(params[9].value.data() == m.W("head").data());
  REQUIRE(params[9].grad.data() == set.weight_grad("head").data());
  REQUIRE(params[10].value.data() == m.b("head")->data());
  REQUIRE(params[10].grad.data() == set.bias_grad("head").data());
  REQUIRE((opt.num_parameters() == set.num_parameters()));
  REQUIRE((set.num_parameters() == 3 * (2 * 5 + 6 * 2 + 6) + 18 + 3));

  SECTION("registering twice is refused and adds nothing") {
    REQUIRE_THROWS_AS(set.add_to(opt), peft::ConfigError);
    REQUIRE_THAT(message_of([&] { set.add_to(opt); }),
                 has_substring("'layers.0.attn.q_proj.lora_A' of the peft::AdapterSet of add() call 2 shares storage "
                               "with 'layers.0.attn.q_proj.lora_A' of the peft::AdapterSet of add() call 1, which is "
                               "already registered"));
    REQUIRE((opt.slots().size() == want.size()));
    REQUIRE((opt.num_parameters() == set.num_parameters()));
  }
  SECTION("a clash at the last adapter adds none of the others") {
    peft::SGD<float> sgd;
    sgd.add(set.at("q_proj"));
    REQUIRE_THROWS_AS(set.add_to(sgd), peft::ConfigError);
    REQUIRE((sgd.slots().size() == 3));
    REQUIRE(sgd.num_parameters() == set.at("q_proj").num_parameters());
  }
  SECTION("a prefix in the options qualifies every name") {
    peft::SGD<float> sgd;
    peft::ParamOptions o;
    o.prefix = "model";
    set.add_to(sgd, o);
    REQUIRE(sgd.slots().front().name == "model.layers.0.attn.q_proj.lora_A");
    REQUIRE(sgd.slots().back().name == "model.head.bias");
  }
  SECTION("an SSF set names its scale and shift") {
    Model<MatrixXf> m2;
    auto c2 = targeting({"up_proj"});
    c2.kind = peft::AdapterKind::ssf;
    peft::AdapterSet<MatrixXf> ssf(m2.weights, c2);
    peft::SGD<float> sgd;
    ssf.add_to(sgd, peft::lora_plus(4.0));
    Strings names;
    for (const auto& s : sgd.slots()) {
      names.push_back(s.name);
      REQUIRE((s.lr_scale == 1.0));
    }
    REQUIRE(names == Strings{"layers.0.mlp.up_proj.ssf_scale", "layers.0.mlp.up_proj.ssf_shift",
                             "layers.1.mlp.up_proj.ssf_scale", "layers.1.mlp.up_proj.ssf_shift"});
  }
}

TEST_CASE("AdamW steps on a whole set equal AdamW steps on each adapter alone", "[model][optim]") {
  const std::uint64_t seed = 77;
  auto cfg = targeting({"q_proj", "up_proj"});
  cfg.r = 3;
  cfg.lora_alpha = 6;
  cfg.init = peft::LoRAInit::random;
  cfg.seed = seed;
  cfg.rank_pattern = {{"up_proj", 2}};
  cfg.alpha_pattern = {{"layers\\.1\\..*", 5}};
  peft::AdamWConfig adam;
  adam.lr = 1e-2;
  adam.weight_decay = 0.1;

  Model<MatrixXf> m1, m2;
  peft::AdapterSet<MatrixXf> set(m1.weights, cfg);
  set.train_whole("head");
  peft::AdamW<float> opt(adam);
  set.add_to(opt, peft::lora_plus(4.0));

  // The same adapters built by hand, each with its own AdamW, and the head as plain matrices.
  std::deque<peft::LoRA<MatrixXf>> direct;
  std::deque<peft::AdamW<float>> opts;
  for (auto& l : set.layers()) {
    peft::LoRAConfig c;
    c.rank = l.path.find("up_proj") != std::string::npos ? 2 : 3;
    c.alpha = l.path.rfind("layers.1.", 0) == 0 ? 5 : 6;
    c.init = peft::LoRAInit::random;
    c.seed = peft::layer_seed(seed, l.path);
    direct.emplace_back(m2.W(l.path), c);
    opts.emplace_back(adam);
    opts.back().add(direct.back(), peft::lora_plus(4.0));
    REQUIRE((direct.back().flat_values() == l.adapter.flat_values()));  // what make_adapter built
  }
  REQUIRE((direct.size() == 5));
  MatrixXf head_grad(3, 6);
  Eigen::VectorXf bias_grad(3);
  peft::AdamW<float> head_opt(adam);
  head_opt.add("head.weight", m2.W("head"), head_grad, peft::lora_plus(4.0));
  head_opt.add("head.bias", *m2.b("head"), bias_grad, peft::lora_plus(4.0));
  const MatrixXf head0 = m1.W("head");

  for (int step = 0; step < 3; ++step) {
    std::size_t k = 0;
    for (auto& l : set.layers()) {
      const Eigen::VectorXf g = random_matrix<MatrixXf>(l.adapter.num_parameters(), 1, 1000 + 10 * step + k);
      l.adapter.flat_grads() = g;
      direct[k++].flat_grads() = g;
    }
    // Copied into the registered gradients (a move assignment would swap their storage away).
    const MatrixXf gW = random_matrix<MatrixXf>(3, 6, 2000 + step);
    const Eigen::VectorXf gb = random_matrix<MatrixXf>(3, 1, 3000 + step);
    head_grad = gW;
    bias_grad = gb;
    set.weight_grad("head") = head_grad;
    set.bias_grad("head") = bias_grad;
    opt.step();
    for (auto& o : opts) o.step();
    head_opt.step();
  }
  std::size_t k = 0;
  for (auto& l : set.layers()) {
    INFO(l.path);
    REQUIRE((l.adapter.flat_values() == direct[k++].flat_values()));
  }
  REQUIRE(same_bits(m1.W("head"), m2.W("head")));
  REQUIRE(same_bits(*m1.b("head"), *m2.b("head")));
  REQUIRE(m1.W("head") != head0);
  // The adapted weights are frozen.
  REQUIRE(same_bits(m1.W("q_proj"), m2.W("q_proj")));
  REQUIRE(same_bits(m1.W("q_proj"), Model<MatrixXf>().W("q_proj")));
}

TEST_CASE("A row-major module trained whole is registered in storage order and steps as the plain matrix",
          "[model][optim]") {
  Model<RowMajorXd> m1, m2;
  peft::AdapterSet<RowMajorXd> set(m1.weights, targeting({"q_proj"}));
  set.train_whole("head");
  REQUIRE((set.whole_modules().size() == 1));
  REQUIRE(set.whole_modules()[0].path == "head");
  const auto params = set.parameters();
  const auto& p = params[params.size() - 2];
  REQUIRE(std::string(p.name) == "head.weight");
  REQUIRE((p.value.rows() == 6));  // the transpose: the same elements in storage order
  REQUIRE((p.value.cols() == 3));
  REQUIRE(p.value(4, 1) == m1.W("head")(1, 4));

  peft::SGDConfig sc;
  sc.momentum = 0.9;
  sc.lr = 0.1;
  peft::SGD<double> opt(sc), plain(sc);
  set.add_to(opt);
  RowMajorXd gW(3, 6);
  Eigen::VectorXd gb(3);
  plain.add("head.weight", m2.W("head"), gW);
  plain.add("head.bias", *m2.b("head"), gb);
  const RowMajorXd head0 = m1.W("head");
  for (int step = 0; step < 2; ++step) {
    const RowMajorXd g = random_matrix<RowMajorXd>(3, 6, 60 + step);
    const Eigen::VectorXd h = random_matrix<MatrixXd>(3, 1, 70 + step);
    gW = g;  // copied into the registered storage
    gb = h;
    set.zero_grad();
    REQUIRE(set.weight_grad("head").isZero(0));
    set.weight_grad("head") += gW;
    set.bias_grad("head") += gb;
    opt.step();
    plain.step();
  }
  REQUIRE(same_bits(m1.W("head"), m2.W("head")));
  REQUIRE(same_bits(*m1.b("head"), *m2.b("head")));
  REQUIRE(m1.W("head") != head0);
}

// ===================================================================================================
// 2. merge() and unmerge(): all or nothing

namespace {

/// The LoRA round-trip bound 2 eps (|W0| + |dW|), per element (docs/math.md).
template <class M>
Eigen::MatrixXd lora_bound(const M& W0, const peft::MatrixX<typename M::Scalar>& dW, double factor = 2.0) {
  const double e = eps<typename M::Scalar>();
  return factor * e * (to_double(W0).cwiseAbs() + to_double(dW).cwiseAbs()) +
         Eigen::MatrixXd::Constant(W0.rows(), W0.cols(), std::numeric_limits<double>::denorm_min());
}

}  // namespace

TEST_CASE("AdapterSet merge refuses a set with a merged adapter before writing anything", "[model][merge]") {
  Model<MatrixXf> m;
  auto cfg = targeting({"q_proj", "k_proj"});
  cfg.r = 2;
  cfg.init = peft::LoRAInit::random;
  peft::AdapterSet<MatrixXf> set(m.weights, cfg);
  REQUIRE((set.size() == 5));
  set.at("layers.1.attn.q_proj").merge();
  const std::vector<MatrixXf> W = m.weight_copies();
  const auto b = m.bias_copies();

  REQUIRE_THROWS_AS(set.merge(), peft::StateError);
  REQUIRE_THAT(message_of([&] { set.merge(); }),
               has_substring("peft::AdapterSet::merge: " + quoted("layers.1.attn.q_proj") +
                             " is merged already; no weight was written"));
  REQUIRE(!set.is_merged());
  for (const auto& l : set.layers()) REQUIRE(l.adapter.is_merged() == (l.path == "layers.1.attn.q_proj"));
  REQUIRE_THROWS_AS(set.unmerge(), peft::StateError);
  REQUIRE_THAT(message_of([&] { set.unmerge(); }),
               has_substring("peft::AdapterSet::unmerge: " + quoted("layers.0.attn.q_proj") + " is not merged"));
  const std::vector<MatrixXf> W_after = m.weight_copies();
  const auto b_after = m.bias_copies();
  for (std::size_t i = 0; i < kNumModules; ++i) {
    INFO(kModules[i].path);
    REQUIRE(same_bits(W_after[i], W[i]));
    REQUIRE(same_bits(b_after[i], b[i]));
  }
  for (const auto& l : set.layers()) REQUIRE(l.adapter.is_merged() == (l.path == "layers.1.attn.q_proj"));

  // Merged whole, one adapter unmerged alone: unmerge() names it and writes nothing.
  set.at("layers.1.attn.q_proj").unmerge();
  set.merge();
  REQUIRE(set.is_merged());
  set.at("layers.1.attn.k_proj").unmerge();
  const std::vector<MatrixXf> W_merged = m.weight_copies();
  REQUIRE_THAT(message_of([&] { set.unmerge(); }),
               has_substring("peft::AdapterSet::unmerge: " + quoted("layers.1.attn.k_proj") + " is not merged"));
  const std::vector<MatrixXf> W_merged_after = m.weight_copies();
  for (std::size_t i = 0; i < kNumModules; ++i) REQUIRE(same_bits(W_merged_after[i], W_merged[i]));
  REQUIRE(!set.layers()[3].adapter.is_merged());
  REQUIRE(set.layers()[4].adapter.is_merged());
}

TEST_CASE("AdapterSet merge rolls back the merged layers when a later one refuses", "[model][merge]") {
  const std::string bad = "layers.1.attn.q_proj";  // the third of five adapted modules
  SECTION("a LoRA whose merge would overflow: NumericalError") {
    Model<MatrixXf> m;
    auto cfg = targeting({"q_proj", "k_proj"});
    cfg.r = 2;
    cfg.init = peft::LoRAInit::random;
    peft::AdapterSet<MatrixXf> set(m.weights, cfg);
    const std::vector<MatrixXf> W0 = m.weight_copies();
    auto& a = set.at(bad);
    const Eigen::VectorXf good = a.flat_values();
    auto p = a.parameters();
    p[0].value.setConstant(1.0f);
    p[1].value.setConstant(1e38f);  // s B A = 4 * 2 * 1e38 > FLT_MAX
    const Eigen::VectorXf huge = a.flat_values();
    std::vector<MatrixXf> dW;
    for (const auto& l : set.layers()) dW.push_back(l.adapter.delta_weight());

    REQUIRE_THAT(error_of<peft::NumericalError>([&] { set.merge(); }),
                 has_substring("peft::AdapterSet::merge: " + quoted(bad) + ": peft::LoRA::merge: W("));
    REQUIRE(!set.is_merged());
    for (const auto& l : set.layers()) REQUIRE(!l.adapter.is_merged());
    const std::vector<MatrixXf> W = m.weight_copies();
    for (std::size_t k = 0; k < set.size(); ++k) {
      const std::string& path = set.layers()[k].path;
      INFO(path);
      const std::size_t i = module_index(path);
      // Merged, then unmerged again (the exact restore: bit for bit); or the refusing layer and those
      // after it, never written.
      REQUIRE(same_bits(W[i], W0[i]));
    }
    REQUIRE((a.flat_values() == huge));
    // Fixed, the set merges whole.
    a.flat_values() = good;
    set.merge();
    REQUIRE(set.is_merged());
  }
  SECTION("an SSF on a module without a bias: ShapeError") {
    Model<MatrixXf> m;
    auto cfg = targeting({"q_proj"});  // layers.0 and layers.1 have a bias, the top-level q_proj none
    cfg.kind = peft::AdapterKind::ssf;
    cfg.ssf_init_std = 0.2;
    peft::AdapterSet<MatrixXf> set(m.weights, cfg);
    const std::vector<MatrixXf> W0 = m.weight_copies();
    const auto b0 = m.bias_copies();
    REQUIRE_THAT(error_of<peft::ShapeError>([&] { set.merge(); }),
                 has_substring("peft::AdapterSet::merge: " + quoted("q_proj") + ": peft::SSF::merge: the layer has no bias"));
    for (const auto& l : set.layers()) REQUIRE(!l.adapter.is_merged());
    const std::vector<MatrixXf> W = m.weight_copies();
    const auto b = m.bias_copies();
    for (const std::string path : {"layers.0.attn.q_proj", "layers.1.attn.q_proj"}) {
      INFO(path);
      const std::size_t i = module_index(path);
      const auto* ssf = set.at(path).get<peft::SSF<MatrixXf>>();
      const Eigen::VectorXd shift = ssf->shift().cast<double>();
      REQUIRE(worst_ratio(W[i], W0[i], lora_bound(W0[i], MatrixXf::Zero(6, 5))) <= 1.0);
      const Eigen::VectorXd b_bound = 8 * eps<float>() * (to_double(b0[i]).cwiseAbs() + shift.cwiseAbs());
      REQUIRE((to_double(b[i]) - to_double(b0[i])).cwiseAbs().cwiseQuotient(b_bound).maxCoeff() <= 1.0);
      REQUIRE(relative_diff(b[i], b0[i]) <= 1e-5);
    }
    REQUIRE(same_bits(W[module_index("q_proj")], W0[module_index("q_proj")]));
  }
}

TEST_CASE("AdapterSet unmerge merges back the unmerged layers when a later one refuses", "[model][merge]") {
  const std::string bad = "layers.1.attn.q_proj";
  Model<MatrixXf> m;
  auto cfg = targeting({"q_proj", "k_proj"});
  cfg.kind = peft::AdapterKind::dora;
  cfg.r = 2;
  cfg.init = peft::LoRAInit::random;
  peft::AdapterSet<MatrixXf> set(m.weights, cfg);
  set.merge();
  REQUIRE(set.is_merged());
  // A non-finite value written into one merged weight: that DoRA cannot unmerge it.
  m.W(bad)(1, 2) = std::numeric_limits<float>::infinity();
  const std::vector<MatrixXf> Wm = m.weight_copies();

  REQUIRE_THAT(error_of<peft::NumericalError>([&] { set.unmerge(); }),
               has_substring("peft::AdapterSet::unmerge: " + quoted(bad) + ": peft::DoRA::unmerge: W(1,2) would become inf"));
  REQUIRE(set.is_merged());
  for (const auto& l : set.layers()) REQUIRE(l.adapter.is_merged());
  const std::vector<MatrixXf> W = m.weight_copies();
  for (std::size_t k = 0; k < set.size(); ++k) {
    const std::string& path = set.layers()[k].path;
    INFO(path);
    const std::size_t i = module_index(path);
    // Unmerged, then merged again: the same bits (the exact restore, and a merge that depends on W0
    // and the parameters alone); or never written.
    REQUIRE(same_bits(W[i], Wm[i]));
  }
}

TEMPLATE_TEST_CASE("AdapterSet merge keeps every layer's output and unmerge restores every weight", "[model][merge]",
                   MatrixXf, RowMajorXd) {
  using M = TestType;
  using Scalar = typename M::Scalar;
  using Mat = peft::MatrixX<Scalar>;
  const double tol = std::is_same<Scalar, float>::value ? 1e-5 : 1e-13;
  for (const bool exact : {true, false})
  for (const auto kind : {peft::AdapterKind::lora, peft::AdapterKind::dora}) {
    INFO(peft::kind_name(kind) << ", exact restore " << exact);
    Model<M> m;
    auto cfg = targeting({"q_proj", "k_proj", "up_proj"});
    cfg.kind = kind;
    cfg.r = 2;
    cfg.init = peft::LoRAInit::random;
    peft::AdapterSet<M> set(m.weights, cfg);
    set.set_exact_restore(exact);
    REQUIRE((set.size() == 7));
    const std::vector<M> W0 = m.weight_copies();
    const auto b0 = m.bias_copies();
    std::vector<Mat> X, Y, dW;
    for (const auto& l : set.layers()) {
      X.push_back(random_matrix<Mat>(l.adapter.input_size(), 4, 80 + X.size()));
      Y.push_back(l.adapter.forward(X.back()));
      dW.push_back(l.adapter.delta_weight());
    }
    set.merge();
    REQUIRE(set.is_merged());
    for (std::size_t k = 0; k < set.size(); ++k) {
      const auto& l = set.layers()[k];
      INFO(l.path);
      const std::size_t i = module_index(l.path);
      REQUIRE(l.adapter.is_merged());
      REQUIRE(relative_diff(l.adapter.forward(X[k]), Y[k]) <= tol);
      REQUIRE(relative_diff(m.W(l.path), to_double(W0[i]) + to_double(dW[k])) <= tol);
      REQUIRE(!same_bits(m.W(l.path), W0[i]));
    }
    REQUIRE(same_bits(m.W("head"), W0[module_index("head")]));  // not adapted
    REQUIRE(same_bits(m.W("layers.0.attn.xq_proj"), W0[module_index("layers.0.attn.xq_proj")]));
    REQUIRE_THROWS_AS(set.set_exact_restore(!exact), peft::StateError);
    set.unmerge();
    REQUIRE(!set.is_merged());
    REQUIRE(set.last_restore_exact() == exact);
    for (std::size_t k = 0; k < set.size(); ++k) {
      const auto& l = set.layers()[k];
      INFO(l.path);
      const std::size_t i = module_index(l.path);
      REQUIRE(!l.adapter.is_merged());
      if (exact) {
        REQUIRE(same_bits(m.W(l.path), W0[i]));
      } else if (kind == peft::AdapterKind::lora) {
        REQUIRE(worst_ratio(m.W(l.path), W0[i], lora_bound(W0[i], dW[k])) <= 1.0);
      } else {
        // DoRA: eps |W0| + 5 eps |W0 + s B A| per element (docs/math.md), with the rounding of s B A.
        const auto* d = l.adapter.template get<peft::DoRA<M>>();
        const double e = eps<Scalar>();
        const Eigen::MatrixXd L = std::abs(double(d->scaling())) * to_double(d->B()).cwiseAbs() * to_double(d->A()).cwiseAbs();
        const Eigen::MatrixXd V = (to_double(W0[i]) + double(d->scaling()) * to_double(d->B()) * to_double(d->A())).cwiseAbs() +
                                  double(d->rank() + 2) * e * L;
        REQUIRE(worst_ratio(m.W(l.path), W0[i], e * to_double(W0[i]).cwiseAbs() + 5 * e * V) <= 1.0);
      }
      if (b0[i].size() > 0) REQUIRE(same_bits(*m.b(l.path), b0[i]));
    }
  }
}

// ===================================================================================================
// 3. ModelWeights, insert() and train_whole() errors

TEST_CASE("ModelWeights refuses an empty or repeated path and a bias of the wrong size", "[model][errors]") {
  MatrixXf W = random_matrix<MatrixXf>(4, 3, 90), W2 = W, empty;
  Eigen::VectorXf b = Eigen::VectorXf::Zero(4), short_b = Eigen::VectorXf::Zero(3);
  peft::ModelWeights<MatrixXf> mw;
  mw.add("a", W, b);
  REQUIRE_THROWS_AS(mw.add("", W2), peft::ConfigError);
  REQUIRE_THAT(message_of([&] { mw.add("", W2); }), has_substring("peft::ModelWeights::add: an empty module path"));
  REQUIRE_THROWS_AS(mw.add("a", W2), peft::ConfigError);
  REQUIRE_THAT(message_of([&] { mw.add("a", W2); }), has_substring("module \"a\" is already there"));
  REQUIRE_THROWS_AS(mw.add("c", W2, short_b), peft::ShapeError);
  REQUIRE_THAT(message_of([&] { mw.add("c", W2, short_b); }),
               has_substring("module \"c\": b has 3 entries, expected d_out = 4"));
  REQUIRE_THROWS_AS(mw.add("d", empty), peft::ShapeError);
  REQUIRE((mw.modules().size() == 1));
  REQUIRE(mw.find("c") == nullptr);
  REQUIRE((mw.modules()[0].weight == &W));
  REQUIRE((mw.modules()[0].bias == &b));
  REQUIRE_THROWS_AS(mw.at("zzz"), peft::ConfigError);
  mw.add("e", W2);
  REQUIRE(mw.at("e").bias == nullptr);
}

TEST_CASE("AdapterSet insert and train_whole refuse what does not fit", "[model][errors]") {
  Model<MatrixXf> m;
  peft::LoRAConfig cfg;
  cfg.rank = 2;
  peft::AdapterSet<MatrixXf> set(m.weights);
  REQUIRE((set.size() == 0));
  REQUIRE(!set.is_merged());
  set.insert("head", peft::AnyAdapter<float>(peft::LoRA<MatrixXf>(m.W("head"), cfg)));
  REQUIRE((set.size() == 1));
  REQUIRE(!set.selected_by_config());
  REQUIRE(std::string(set.parameters()[0].name) == "head.lora_A");

  MatrixXf other = random_matrix<MatrixXf>(5, 5, 91);
  REQUIRE_THROWS_AS(set.insert("q_proj", peft::AnyAdapter<float>(peft::LoRA<MatrixXf>(other, cfg))), peft::ShapeError);
  REQUIRE_THAT(message_of([&] { set.insert("q_proj", peft::AnyAdapter<float>(peft::LoRA<MatrixXf>(other, cfg))); }),
               has_substring(quoted("q_proj") + " is 6x5 but the adapter is 5x5"));
  REQUIRE_THROWS_AS(set.insert("nope", peft::AnyAdapter<float>(peft::LoRA<MatrixXf>(other, cfg))), peft::ConfigError);
  REQUIRE_THAT(message_of([&] { set.insert("head", peft::AnyAdapter<float>(peft::LoRA<MatrixXf>(m.W("head"), cfg))); }),
               has_substring(quoted("head") + " has an adapter already"));
  REQUIRE_THAT(message_of([&] { set.insert("q_proj", peft::AnyAdapter<float>()); }),
               has_substring("the adapter handle is empty"));
  REQUIRE((set.size() == 1));
  REQUIRE(set.find("q_proj") == nullptr);
  REQUIRE_THROWS_AS(set.at("q_proj"), peft::ConfigError);

  REQUIRE_THROWS_AS(set.train_whole("head"), peft::ConfigError);
  REQUIRE_THAT(message_of([&] { set.train_whole("head"); }),
               has_substring("peft::AdapterSet::train_whole: " + quoted("head") + " has an adapter"));
  set.train_whole("layers.1.mlp.up_proj");
  REQUIRE_THAT(message_of([&] { set.train_whole("layers.1.mlp.up_proj"); }), has_substring("is already trained whole"));
  MatrixXf& up = m.W("layers.1.mlp.up_proj");
  REQUIRE_THAT(message_of([&] { set.insert("layers.1.mlp.up_proj", peft::AnyAdapter<float>(peft::LoRA<MatrixXf>(up, cfg))); }),
               has_substring(quoted("layers.1.mlp.up_proj") + " is trained whole"));
  REQUIRE_THROWS_AS(set.train_whole("nope"), peft::ConfigError);
  REQUIRE_THROWS_AS(set.weight_grad("q_proj"), peft::ConfigError);
  REQUIRE((set.whole_modules().size() == 1));
  REQUIRE((set.parameters().size() == 4));  // head's lora_A, lora_B, then up_proj's weight and bias

  // A set built from a config: its adapted modules cannot be trained whole.
  Model<MatrixXf> m2;
  peft::AdapterSet<MatrixXf> built(m2.weights, targeting({"q_proj"}));
  REQUIRE_THROWS_AS(built.train_whole("layers.0.attn.q_proj"), peft::ConfigError);
  REQUIRE(built.whole_modules().empty());
}
