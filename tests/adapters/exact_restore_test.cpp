// The exact restore (detail/exact_restore.hpp, docs/math.md, Exact restore): after any number of
// merges and unmerges (folds and unfolds), W and b are W0 and b0 bit for bit, for every adapter, in
// float and double, both storage orders, whatever the thread count at the merge and at the unmerge, with
// parameters changed while merged and the adapter moved. What happens when W is written while merged,
// the failure paths, and the memory kept.
#include "support/catch.hpp"
#include "support/errors.hpp"
#include "support/matrices.hpp"

#include <peft/adapters/dora.hpp>
#include <peft/adapters/lora.hpp>
#include <peft/adapters/pissa.hpp>
#include <peft/adapters/ssf.hpp>
#include <peft/adapters/standalone_ssf.hpp>
#include <peft/core/threads.hpp>

#include <cmath>
#include <limits>
#include <utility>

using peft::test::MatrixXd;
using peft::test::MatrixXf;
using peft::test::message_of;
using peft::test::random_matrix;
using peft::test::RowMajorXd;
using peft::test::RowMajorXf;
using peft::test::same_bits;

namespace {

// 1 000 cycles, as the issue measured; fewer under the sanitizers, where each costs ten times more.
#if defined(PEFT_TEST_SANITIZER_TYPES)
constexpr int kCycles = 100;
#else
constexpr int kCycles = 1000;
#endif

// A weight whose view (its storage order's columns) spans two tiles each way: 530 x 40 (column-major)
// or 40 x 530 (row-major), tiles of 512 rows of the view and 32 of its columns.
template <class M>
M weight(std::uint64_t seed) {
  return M::IsRowMajor ? random_matrix<M>(40, 530, seed) : random_matrix<M>(530, 40, seed);
}

// Sets the thread count of the products (and of the restore's tiles), 1 or 2, cycle by cycle: the
// merge and the unmerge of one cycle see every combination in turn.
void threads_for(int cycle, bool merging) {
  const int k = merging ? cycle % 2 : (cycle / 2) % 2;
  peft::set_num_threads(k == 0 ? 1 : 2);
}

struct ThreadsGuard {
  int saved = peft::num_threads();
  ~ThreadsGuard() { peft::set_num_threads(saved); }
};

// Merges and unmerges `cycles` times: W (and b) must be W0 (and b0) bit for bit after every unmerge, and
// (with `same_merges`) every merge must write the same bits as the first. DoRA's merges need not: its
// norms come from a product with W0 on Eigen's threads (or the BLAS's), whose rounding may follow the
// thread count; its record follows its merge, so its restore is exact all the same.
template <class Adapter, class M, class V>
void cycle(Adapter& a, M& W, V* b, int cycles = kCycles, bool same_merges = true) {
  ThreadsGuard guard;
  const M W0 = W;
  const V b0 = b ? *b : V();
  M merged;
  V merged_b;
  int bad_restores = 0, bad_merges = 0, inexact = 0;
  for (int k = 0; k < cycles; ++k) {
    threads_for(k, true);
    a.merge();
    if (k == 0) {
      merged = W;
      if (b) merged_b = *b;
    } else {
      bad_merges += same_merges && (!same_bits(W, merged) || (b && !same_bits(*b, merged_b)));
    }
    threads_for(k, false);
    a.unmerge();
    inexact += !a.last_restore_exact();
    bad_restores += !same_bits(W, W0) || (b && !same_bits(*b, b0));
  }
  INFO(cycles << " cycles");
  REQUIRE(!same_bits(merged, W0));  // the merge did change W
  REQUIRE(bad_merges == 0);
  REQUIRE(inexact == 0);
  REQUIRE(bad_restores == 0);
}

peft::LoRAConfig lora_config(Eigen::Index rank = 8, double alpha = 16) {
  peft::LoRAConfig cfg;
  cfg.rank = rank;
  cfg.alpha = alpha;
  cfg.init = peft::LoRAInit::random;
  cfg.seed = 7;
  return cfg;
}

template <class Adapter>
void train_a_little(Adapter& a, std::uint64_t seed) {  // parameters away from their init, as after training
  for (auto& p : a.parameters()) {
    const auto noise = random_matrix<peft::MatrixX<typename Adapter::Scalar>>(p.value.rows(), p.value.cols(), seed++);
    p.value.array() += typename Adapter::Scalar(0.3) * noise.array();
  }
}

}  // namespace

TEMPLATE_TEST_CASE("LoRA: a thousand merges and unmerges give W back bit for bit", "[exact]", MatrixXf, MatrixXd,
                   RowMajorXf, RowMajorXd) {
  using V = peft::VectorX<typename TestType::Scalar>;
  TestType W = weight<TestType>(1);
  peft::LoRA<TestType> lora(W, lora_config());
  train_a_little(lora, 10);
  REQUIRE(lora.exact_restore());  // the default
  cycle(lora, W, static_cast<V*>(nullptr));
}

TEMPLATE_TEST_CASE("DoRA: a thousand merges and unmerges give W back bit for bit, in both modes", "[exact]", MatrixXf,
                   MatrixXd, RowMajorXf, RowMajorXd) {
  using V = peft::VectorX<typename TestType::Scalar>;
  for (bool detach : {true, false}) {
    INFO("detach_norm " << detach);
    TestType W = weight<TestType>(2);
    V b = random_matrix<peft::MatrixX<typename TestType::Scalar>>(W.rows(), 1, 3);
    peft::DoRAConfig cfg;
    static_cast<peft::LoRAConfig&>(cfg) = lora_config();
    cfg.detach_norm = detach;
    peft::DoRA<TestType> dora(W, b, cfg);
    train_a_little(dora, 20);  // the magnitude too: gains away from 1
    cycle(dora, W, &b, kCycles, false);
  }
}

TEMPLATE_TEST_CASE("SSF: a thousand merges and unmerges give W and b back bit for bit", "[exact]", MatrixXf, MatrixXd,
                   RowMajorXf, RowMajorXd) {
  using Scalar = typename TestType::Scalar;
  using V = peft::VectorX<Scalar>;
  TestType W = weight<TestType>(4);
  V b = random_matrix<peft::MatrixX<Scalar>>(W.rows(), 1, 5);
  peft::SSF<TestType> ssf(W, b);
  ssf.scale().array() += Scalar(0.3) * random_matrix<peft::MatrixX<Scalar>>(W.rows(), 1, 6).array();
  ssf.shift() = random_matrix<peft::MatrixX<Scalar>>(W.rows(), 1, 7);
  cycle(ssf, W, &b);
}

TEMPLATE_TEST_CASE("PiSSA: a thousand merges and unmerges, then the release gives the original weight bit for bit",
                   "[exact]", MatrixXf, MatrixXd, RowMajorXf, RowMajorXd) {
  using V = peft::VectorX<typename TestType::Scalar>;
  TestType W = weight<TestType>(8);
  const TestType original = W;
  peft::PiSSAConfig cfg;
  cfg.rank = 8;
  cfg.alpha = 16;
  cfg.svd_iterations = 2;
  peft::PiSSA<TestType> pissa(W, cfg);
  REQUIRE(!same_bits(W, original));  // W holds the residual
  REQUIRE(same_bits(pissa.original_weight(), original));
  train_a_little(pissa, 30);
  cycle(pissa, W, static_cast<V*>(nullptr));
  const auto lora = std::move(pissa).release_to_lora();
  REQUIRE(same_bits(W, original));
  REQUIRE(lora.A.rows() == 16);
}

TEMPLATE_TEST_CASE("PiSSA with exact_release off gives the original weight back to rounding only", "[exact]",
                   MatrixXf) {
  TestType W = weight<TestType>(8);
  const TestType original = W;
  peft::PiSSAConfig cfg;
  cfg.rank = 8;
  cfg.alpha = 16;
  cfg.exact_release = false;
  peft::PiSSA<TestType> pissa(W, cfg);
  std::move(pissa).release_to_lora();
  REQUIRE(!same_bits(W, original));  // so the test above sees what the record does
  REQUIRE((W - original).cwiseAbs().maxCoeff() < 1e-5f);
}

TEMPLATE_TEST_CASE("StandaloneSSF: a thousand folds into the next layer and into a LayerNorm come back bit for bit",
                   "[exact]", MatrixXf, MatrixXd, RowMajorXf, RowMajorXd) {
  using Scalar = typename TestType::Scalar;
  using V = peft::VectorX<Scalar>;
  ThreadsGuard guard;
  const Eigen::Index d = TestType::IsRowMajor ? 530 : 40;  // W1 is d_next x d: both views span two tiles
  const Eigen::Index d_next = TestType::IsRowMajor ? 40 : 530;
  peft::StandaloneSSF<Scalar> ssf(d);
  ssf.scale().array() += Scalar(0.3) * random_matrix<peft::MatrixX<Scalar>>(d, 1, 1).array();
  ssf.shift() = random_matrix<peft::MatrixX<Scalar>>(d, 1, 2);

  TestType W1 = random_matrix<TestType>(d_next, d, 3);
  V b1 = random_matrix<peft::MatrixX<Scalar>>(d_next, 1, 4);
  const TestType W1_0 = W1;
  const V b1_0 = b1;
  V w_ln = random_matrix<peft::MatrixX<Scalar>>(d, 1, 5), b_ln = random_matrix<peft::MatrixX<Scalar>>(d, 1, 6);
  const V w_ln0 = w_ln, b_ln0 = b_ln;
  int bad = 0, inexact = 0;
  for (int k = 0; k < kCycles; ++k) {
    threads_for(k, true);
    ssf.fold_into_next(W1, b1);
    threads_for(k, false);
    ssf.unfold_from_next(W1, b1);
    inexact += !ssf.last_restore_exact();
    ssf.fold_into_layer_norm(w_ln, b_ln);
    ssf.unfold_from_layer_norm(w_ln, b_ln);
    inexact += !ssf.last_restore_exact();
    bad += !same_bits(W1, W1_0) || !same_bits(b1, b1_0) || !same_bits(w_ln, w_ln0) || !same_bits(b_ln, b_ln0);
  }
  REQUIRE(inexact == 0);
  REQUIRE(bad == 0);
}

TEMPLATE_TEST_CASE("the restore does not follow the thread count where a threaded GEMM's blocking would", "[exact]",
                   MatrixXf, RowMajorXd) {
  // One tile (64 x 64) and a rank above any GEMM's depth block: Eigen's threaded GEMM splits the sum
  // over r = 600 where its blocking for that thread count says, so its rounding follows the thread
  // count. The restore's own serial GEMM must not.
  using V = peft::VectorX<typename TestType::Scalar>;
  TestType W = random_matrix<TestType>(64, 64, 17);
  peft::LoRA<TestType> lora(W, lora_config(600, 600));
  train_a_little(lora, 60);
  cycle(lora, W, static_cast<V*>(nullptr), 40);
}

TEMPLATE_TEST_CASE("the exact restore holds with parameters changed while merged and the adapter moved", "[exact]",
                   MatrixXf, RowMajorXd) {
  using Scalar = typename TestType::Scalar;
  using V = peft::VectorX<Scalar>;
  TestType W = weight<TestType>(9);
  V b = random_matrix<peft::MatrixX<Scalar>>(W.rows(), 1, 10);
  const TestType W0 = W;
  const V b0 = b;
  peft::DoRAConfig cfg;
  static_cast<peft::LoRAConfig&>(cfg) = lora_config(4, 8);
  peft::DoRA<TestType> dora(W, b, cfg);
  for (int k = 0; k < 20; ++k) {
    train_a_little(dora, 100 + std::uint64_t(k));
    dora.merge();
    train_a_little(dora, 200 + std::uint64_t(k));  // an optimizer step while merged
    peft::DoRA<TestType> moved(std::move(dora));    // and the adapter moved
    moved.unmerge();
    REQUIRE(moved.last_restore_exact());
    REQUIRE(same_bits(W, W0));
    dora = std::move(moved);
  }
  REQUIRE(same_bits(b, b0));  // DoRA does not touch the bias
}

TEMPLATE_TEST_CASE("a weight written while merged: its tile gets the ordinary unmerge, the others come back exactly",
                   "[exact]", MatrixXf, RowMajorXd) {
  using Scalar = typename TestType::Scalar;
  TestType W = weight<TestType>(11);
  const TestType W0 = W;
  peft::LoRA<TestType> lora(W, lora_config());
  train_a_little(lora, 40);
  const TestType dW = lora.delta_weight();
  lora.merge();
  const TestType merged = W;
  // Element (0, 0) lies in the first tile of either view, element (last, last) in the last one.
  W(0, 0) = Scalar(0.25);
  lora.unmerge();
  REQUIRE(!lora.last_restore_exact());
  // The written element: the ordinary unmerge of what was written.
  REQUIRE(std::abs(double(W(0, 0)) - (0.25 - double(dW(0, 0)))) <= 4 * peft::test::eps<Scalar>() * (0.25 + std::abs(double(dW(0, 0)))));
  const Eigen::Index r = W.rows() - 1, c = W.cols() - 1;
  REQUIRE(W(r, c) == W0(r, c));  // the last tile, untouched by the write, is exact
  REQUIRE(same_bits(TestType(W.bottomRightCorner(8, 8)), TestType(W0.bottomRightCorner(8, 8))));
  // Every element of the written tile is within the ordinary round trip's bound.
  const TestType bound = 2 * Scalar(peft::test::eps<Scalar>()) * (W0.cwiseAbs() + dW.cwiseAbs() + merged.cwiseAbs());
  TestType err = (W - W0).cwiseAbs();
  err(0, 0) = 0;
  REQUIRE((err.array() <= bound.array()).all());
  // And the next cycle is exact again.
  lora.merge();
  lora.unmerge();
  REQUIRE(lora.last_restore_exact());
}

TEMPLATE_TEST_CASE("a vector written while merged, at any element, gets the ordinary unmerge and is reported",
                   "[exact]", MatrixXf, RowMajorXd) {
  // The merges that change vectors keep them whole (SSF's bias; StandaloneSSF's next bias, LayerNorm weight
  // and bias) and give them back exactly only if they hold the merged values still, every byte of them:
  // a write to any element, the last included, is the user's, kept as its ordinary unmerge.
  using Scalar = typename TestType::Scalar;
  using V = peft::VectorX<Scalar>;
  const TestType W0 = weight<TestType>(21);
  const Eigen::Index d = W0.rows();
  const V g = V::Ones(d) + Scalar(0.3) * random_matrix<peft::MatrixX<Scalar>>(d, 1, 22).col(0);
  const V beta = random_matrix<peft::MatrixX<Scalar>>(d, 1, 23).col(0);
  const V b0 = random_matrix<peft::MatrixX<Scalar>>(d, 1, 24).col(0);
  const Scalar written = Scalar(0.625);
  for (const Eigen::Index k : {Eigen::Index(0), d / 4, d / 2, d - 2, d - 1}) {
    INFO("element " << k << " of " << d);
    {  // SSF: b' = g b + beta; the ordinary unmerge is (b' - beta) / g
      TestType W = W0;
      V b = b0;
      peft::SSF<TestType> ssf(W, b);
      ssf.scale() = g;
      ssf.shift() = beta;
      ssf.merge();
      b(k) = written;
      ssf.unmerge();
      REQUIRE(!ssf.last_restore_exact());
      REQUIRE(b(k) == (written - beta(k)) / g(k));
      REQUIRE(same_bits(W, W0));
      ssf.merge();
      ssf.unmerge();
      REQUIRE(ssf.last_restore_exact());
    }
    {  // StandaloneSSF into a LayerNorm: w' = g w, b' = g b + beta
      peft::StandaloneSSF<Scalar> ssf(d);
      ssf.scale() = g;
      ssf.shift() = beta;
      V w_ln = b0.reverse(), b_ln = b0;
      ssf.fold_into_layer_norm(w_ln, b_ln);
      w_ln(k) = written;
      ssf.unfold_from_layer_norm(w_ln, b_ln);
      REQUIRE(!ssf.last_restore_exact());
      REQUIRE(std::abs(double(w_ln(k)) - double(written) / double(g(k))) <= 2 * peft::test::eps<Scalar>() * std::abs(double(w_ln(k))));
      ssf.fold_into_layer_norm(w_ln, b_ln);
      b_ln(k) = written;
      ssf.unfold_from_layer_norm(w_ln, b_ln);
      REQUIRE(!ssf.last_restore_exact());
      REQUIRE(b_ln(k) == (written - beta(k)) / g(k));
    }
    {  // StandaloneSSF into the next layer: b1' = b1 + W1 beta; the ordinary unfold is b1' - W1' (beta / g)
      peft::StandaloneSSF<Scalar> ssf(d);
      ssf.scale() = g;
      ssf.shift() = beta;
      TestType W1 = random_matrix<TestType>(7, d, 25);
      V b1 = random_matrix<peft::MatrixX<Scalar>>(7, 1, 26).col(0);
      const V b1_0 = b1;
      const Eigen::Index k1 = std::min<Eigen::Index>(k, 6);
      ssf.fold_into_next(W1, b1);
      const TestType W1_folded = W1;
      b1(k1) = written;
      ssf.unfold_from_next(W1, b1);
      REQUIRE(!ssf.last_restore_exact());
      const double want = double(written) - (W1_folded.row(k1).template cast<double>() *
                                             beta.cwiseQuotient(g).template cast<double>())(0);
      REQUIRE(std::abs(double(b1(k1)) - want) <= 64 * peft::test::eps<Scalar>() * (1 + std::abs(want)));
      REQUIRE(std::abs(double(b1(k1)) - double(b1_0(k1))) > 0.01);  // not the value before the merge
    }
  }
}

TEMPLATE_TEST_CASE("a non-finite value written while merged: unmerge refuses and W is untouched", "[exact]", MatrixXf,
                   RowMajorXd) {
  using Scalar = typename TestType::Scalar;
  TestType W = weight<TestType>(12);
  peft::LoRA<TestType> lora(W, lora_config());
  lora.merge();
  W(3, 5) = std::numeric_limits<Scalar>::infinity();
  const TestType written = W;
  REQUIRE_THROWS_AS(lora.unmerge(), peft::NumericalError);
  REQUIRE_THAT(message_of([&] { lora.unmerge(); }),
               peft::test::has_substring("peft::LoRA::unmerge: W(3,5) would become inf; W (written since the merge) "
                                         "is left untouched"));
  REQUIRE(lora.is_merged());
  REQUIRE(same_bits(W, written));
}

TEMPLATE_TEST_CASE("a merge that would overflow in a late tile leaves W untouched, bit for bit, on any thread count",
                   "[exact]", MatrixXf, RowMajorXd) {
  using Scalar = typename TestType::Scalar;
  ThreadsGuard guard;
  for (int threads : {1, 2}) {
    peft::set_num_threads(threads);
    TestType W = weight<TestType>(13);
    const Eigen::Index r = W.rows() - 2, c = W.cols() - 3;
    W(r, c) = std::numeric_limits<Scalar>::max();  // + s B A overflows there (max/4 more), in the last tile
    peft::LoRA<TestType> lora(W, lora_config());  // s = 2, r = 8
    lora.B().setZero();
    lora.B().row(r).setConstant(std::numeric_limits<Scalar>::max() / 64);
    lora.A().setZero();
    lora.A().col(c).setConstant(Scalar(1));
    const TestType W0 = W;
    REQUIRE_THROWS_AS(lora.merge(), peft::NumericalError);
    REQUIRE(!lora.is_merged());
    REQUIRE(same_bits(W, W0));  // every tile written before the failure was rolled back exactly
    REQUIRE(lora.restore_bytes() == 0);
    REQUIRE_THAT(message_of([&] { lora.merge(); }), peft::test::has_substring("would become inf"));
  }
}

TEST_CASE("the record costs a byte per element while merged, nothing after", "[exact]") {
  Eigen::MatrixXf W = random_matrix<Eigen::MatrixXf>(1024, 1024, 14);
  peft::LoRA<Eigen::MatrixXf> lora(W, lora_config(16, 32));
  train_a_little(lora, 50);
  REQUIRE(lora.restore_bytes() == 0);
  lora.merge();
  const double share = double(lora.restore_bytes()) / double(sizeof(float) * std::size_t(W.size()));
  INFO("the record is " << share * 100 << " % of W");
  REQUIRE(share >= 0.25);
  REQUIRE(share <= 0.30);  // the budget for float weights
  lora.unmerge();
  REQUIRE(lora.restore_bytes() == 0);
  Eigen::MatrixXd Wd = random_matrix<Eigen::MatrixXd>(512, 512, 15);
  peft::LoRA<Eigen::MatrixXd> lora_d(Wd, lora_config(16, 32));
  lora_d.merge();
  REQUIRE(double(lora_d.restore_bytes()) / double(sizeof(double) * std::size_t(Wd.size())) <= 0.15);
}

TEST_CASE("set_exact_restore is refused while merged, and off the merge keeps nothing", "[exact]") {
  Eigen::MatrixXf W = random_matrix<Eigen::MatrixXf>(30, 20, 16);
  peft::LoRA<Eigen::MatrixXf> lora(W, lora_config(4, 8));
  lora.merge();
  REQUIRE_THROWS_AS(lora.set_exact_restore(false), peft::StateError);
  REQUIRE(lora.exact_restore());
  lora.unmerge();
  lora.set_exact_restore(false);
  lora.merge();
  REQUIRE(lora.restore_bytes() == 0);
  lora.unmerge();
  REQUIRE(!lora.last_restore_exact());
}
