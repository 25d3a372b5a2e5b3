// What is LoRA's own (docs/math.md, LoRA): the init distributions, the scaling, the dropout mask and its
// replay, ranks above min(d_out, d_in), the values a merge refuses. The contract every adapter shares is
// in tests/contract/.
#include "support/catch.hpp"
#include "support/errors.hpp"
#include "support/matrices.hpp"

#include <peft/adapters/lora.hpp>

#include <cmath>
#include <limits>
#include <type_traits>

using peft::test::eps;
using peft::test::message_of;
using peft::test::random_matrix;
using peft::test::same_bits;
using peft::test::MatrixXd;
using peft::test::MatrixXf;
using peft::test::RowMajorXd;

namespace {

constexpr Eigen::Index kOut = 7, kIn = 5;

peft::LoRAConfig random_config(Eigen::Index rank = 3, double alpha = 6.0) {
  peft::LoRAConfig cfg;
  cfg.rank = rank;
  cfg.alpha = alpha;
  cfg.init = peft::LoRAInit::random;
  cfg.seed = 42;
  return cfg;
}

/// Mean, variance and largest magnitude of a matrix's entries.
struct Moments {
  double mean, variance, largest;
};
Moments moments(const Eigen::MatrixXd& m) {
  const double mean = m.mean();
  return {mean, (m.array() - mean).square().mean(), m.cwiseAbs().maxCoeff()};
}

}  // namespace

TEST_CASE("LoRA init draws A and B from the documented distributions") {
  const Eigen::Index d_out = 300, d_in = 400, r = 50;
  Eigen::MatrixXd W = Eigen::MatrixXd::Zero(d_out, d_in);
  peft::LoRAConfig cfg;
  cfg.rank = r;
  cfg.seed = 7;

  // kaiming_uniform (default): A ~ U(-c, c), c = 1/sqrt(d_in), variance c^2 / 3; B = 0.
  const peft::LoRA<Eigen::MatrixXd> kaiming(W, cfg);
  const double bound_a = 1.0 / std::sqrt(double(d_in));
  const Moments a = moments(kaiming.A());
  REQUIRE(a.largest <= bound_a);
  REQUIRE(a.largest > 0.99 * bound_a);
  REQUIRE_THAT(a.variance, WithinRel(bound_a * bound_a / 3.0, 0.03));
  REQUIRE_THAT(a.mean, WithinAbs(0.0, 0.02 * bound_a));
  REQUIRE(kaiming.B().isZero(0));

  // gaussian: A ~ N(0, (1/r)^2), standard deviation 1/r (not 1/sqrt(r)); B = 0.
  cfg.init = peft::LoRAInit::gaussian;
  const peft::LoRA<Eigen::MatrixXd> gaussian(W, cfg);
  REQUIRE_THAT(std::sqrt(moments(gaussian.A()).variance), WithinRel(1.0 / double(r), 0.03));
  REQUIRE(gaussian.B().isZero(0));

  // random: A as kaiming_uniform, then B ~ U(-1/sqrt(r), 1/sqrt(r)) (nn.Linear's init of lora_B).
  cfg.init = peft::LoRAInit::random;
  const peft::LoRA<Eigen::MatrixXd> random(W, cfg);
  REQUIRE((random.A() == kaiming.A()));  // A is drawn first, from the same stream
  const double bound_b = 1.0 / std::sqrt(double(r));
  const Moments b = moments(random.B());
  REQUIRE(b.largest <= bound_b);
  REQUIRE(b.largest > 0.99 * bound_b);
  REQUIRE_THAT(b.variance, WithinRel(bound_b * bound_b / 3.0, 0.03));
  REQUIRE_THAT(b.mean, WithinAbs(0.0, 0.02 * bound_b));

  // The seed alone decides.
  cfg.init = peft::LoRAInit::kaiming_uniform;
  REQUIRE((peft::LoRA<Eigen::MatrixXd>(W, cfg).A() == kaiming.A()));
  cfg.seed = 8;
  REQUIRE((peft::LoRA<Eigen::MatrixXd>(W, cfg).A() != kaiming.A()));
}

TEST_CASE("LoRA scaling is alpha over r or alpha over sqrt r with rsLoRA") {
  Eigen::MatrixXd W = Eigen::MatrixXd::Zero(4, 4);
  for (Eigen::Index r : {1, 3, 4, 16}) {
    peft::LoRAConfig cfg;
    cfg.rank = r;
    cfg.alpha = 8;
    REQUIRE((peft::LoRA<Eigen::MatrixXd>(W, cfg).scaling() == 8.0 / double(r)));
    cfg.use_rslora = true;
    REQUIRE((peft::LoRA<Eigen::MatrixXd>(W, cfg).scaling() == 8.0 / std::sqrt(double(r))));
  }
}

TEST_CASE("LoRA accepts a rank above min(d_out, d_in) as PEFT does") {
  // A two-output head targeted at r = 8: such adapter files exist. More parameters, no more rank.
  Eigen::MatrixXd W = random_matrix<Eigen::MatrixXd>(2, 5, 1);
  const Eigen::MatrixXd W0 = W;
  peft::LoRA<Eigen::MatrixXd> lora(W, random_config(8, 16.0));
  REQUIRE((lora.A().rows() == 8));
  REQUIRE((lora.B().cols() == 8));
  const Eigen::MatrixXd X = random_matrix<Eigen::MatrixXd>(5, 3, 2);
  const Eigen::MatrixXd Y = lora.forward(X);
  REQUIRE((Y - (W0 + lora.delta_weight()) * X).cwiseAbs().maxCoeff() < 1e-13);
  lora.merge();
  lora.unmerge();
  REQUIRE((W - W0).cwiseAbs().maxCoeff() < 1e-14);
}

TEST_CASE("LoRA dropout masks the branch input and the mask is replayed in backward") {
  Eigen::MatrixXd W = random_matrix<Eigen::MatrixXd>(kOut, kIn, 11);
  Eigen::VectorXd b = random_matrix<Eigen::MatrixXd>(kOut, 1, 12);
  peft::LoRAConfig cfg = random_config();
  cfg.dropout = 0.5;
  peft::LoRA<MatrixXd> lora(W, b, cfg);
  const Eigen::MatrixXd X = random_matrix<Eigen::MatrixXd>(kIn, 400, 5);
  peft::LoRA<MatrixXd>::Cache cache;
  const Eigen::MatrixXd Y = lora.forward(X, cache);

  // The mask: entries 0 or 1/(1-p), about half kept.
  const Eigen::MatrixXd& mask = cache.branch.mask;
  REQUIRE((mask.rows() == kIn));
  REQUIRE((mask.cols() == 400));
  REQUIRE((mask.array() == 0.0 || mask.array() == 2.0).all());
  REQUIRE_THAT((mask.array() == 2.0).cast<double>().mean(), WithinAbs(0.5, 0.05));

  // Y = W X + b + s B A (X ⊙ mask).
  Eigen::MatrixXd ref = W * X + lora.scaling() * lora.B() * (lora.A() * X.cwiseProduct(mask));
  ref.colwise() += b;
  REQUIRE((Y - ref).cwiseAbs().maxCoeff() < 1e-13);

  // Inference never drops: forward(X) is the no-dropout output.
  Eigen::MatrixXd ref_i = (W + lora.delta_weight()) * X;
  ref_i.colwise() += b;
  REQUIRE((lora.forward(X) - ref_i).cwiseAbs().maxCoeff() < 1e-13);

  // Backward replays the mask: dA = s (B^T G)(X ⊙ mask)^T, dX = W^T G + s (A^T B^T G) ⊙ mask.
  const Eigen::MatrixXd G = random_matrix<Eigen::MatrixXd>(kOut, 400, 6);
  const Eigen::MatrixXd dX = lora.backward(G, cache);
  const double s = lora.scaling();
  const Eigen::MatrixXd U = lora.B().transpose() * G;
  const Eigen::MatrixXd dX_ref = W.transpose() * G + s * (lora.A().transpose() * U).cwiseProduct(mask);
  const Eigen::MatrixXd dA_ref = s * U * X.cwiseProduct(mask).transpose();
  const Eigen::MatrixXd dB_ref = s * G * (lora.A() * X.cwiseProduct(mask)).transpose();
  REQUIRE((dX - dX_ref).cwiseAbs().maxCoeff() < 1e-12);
  REQUIRE((lora.parameters()[0].grad - dA_ref).cwiseAbs().maxCoeff() < 1e-11);
  REQUIRE((lora.parameters()[1].grad - dB_ref).cwiseAbs().maxCoeff() < 1e-11);

  // A second training forward draws a new mask.
  peft::LoRA<MatrixXd>::Cache cache2;
  lora.forward(X, cache2);
  REQUIRE((cache2.branch.mask != mask));
}

TEMPLATE_TEST_CASE("LoRA merge round trip with the exact restore off is not bit-exact in float, so its bound is not "
                   "vacuous", "[lora]", MatrixXf) {
  TestType W = random_matrix<TestType>(33, 21, 5);
  const TestType W0 = W;
  peft::LoRA<TestType> lora(W, random_config(4, 40.0));
  lora.set_exact_restore(false);
  const TestType dW = lora.delta_weight();
  lora.merge();
  lora.unmerge();
  REQUIRE(!lora.last_restore_exact());
  REQUIRE((W != W0));
  REQUIRE(((W - W0).cwiseAbs().array() <= 2 * float(eps<float>()) * (W0.cwiseAbs() + dW.cwiseAbs()).array()).all());
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
  REQUIRE((W == W0));
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
  REQUIRE((W == merged));

  // NaN in W itself is refused as well, W untouched to the bit.
  W(0, 0) = Scalar(0);
  lora.unmerge();
  W(1, 1) = std::numeric_limits<Scalar>::quiet_NaN();
  const TestType with_nan = W;
  REQUIRE_THROWS_AS(lora.merge(), peft::NumericalError);
  REQUIRE(same_bits(W, with_nan));
}
