// DoRA's merge and unmerge (docs/math.md, DoRA): the merged weight is diag(m / n)(W0 + s B A) with the
// norms of that moment, one round trip stays within eps |W0| + 5 eps |W0 + s B A| (and LoRA's bound does
// not hold), rows with a zero magnitude or a zero norm, and the values merge and unmerge refuse.
#include "adapters/dora_support.hpp"
#include "support/catch.hpp"
#include "support/errors.hpp"
#include "support/matrices.hpp"

#include <peft/adapters/dora.hpp>

#include <cmath>
#include <limits>

using namespace peft::test::dora;  // NOLINT: this test's own helpers
using peft::test::eps;
using peft::test::message_of;
using peft::test::MatrixXd;
using peft::test::MatrixXf;
using peft::test::random_matrix;
using peft::test::RowMajorXd;
using peft::test::RowMajorXf;
using peft::test::same_bits;

TEMPLATE_TEST_CASE("DoRA merge writes the gain times W0 plus s B A with the norms of that moment", "[dora]",
                   PEFT_TEST_EVERY_MATRIX) {
  using Scalar = typename TestType::Scalar;
  Layer<TestType> l;
  peft::DoRA<TestType> dora(l.W, l.b, random_config());
  spread_magnitude(dora, 5);
  const TestType W0 = l.W;
  const auto b0 = l.b;
  const Reference ref = reference(dora, W0);
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
  REQUIRE(l.b == b0);  // the bias is not rescaled
}

// One round trip, per element, to first order in eps (V = W0 + s B A, g = m / n, rho = n / m):
//   merge    W1 = fl(g fl(W0 + D))              D = s (B A) as the GEMM rounds it, the same in both
//   unmerge  W2 = fl(fl(rho W1) - D)
// so W2 - W0 = mu W0 + (alpha + tau + kappa + pi) V with |mu|, |alpha|, |tau|, |kappa| <= eps (the two
// additions and the two row scalings) and |pi| = |fl(rho) fl(g) - 1| <= 2 eps. Hence
//   |W2 - W0| <= eps |W0| + 5 eps |V|,
// LoRA's bound (docs/math.md) 2 eps (|W0| + |dW|) (= eps |W0| + eps |W0 + D| there) plus 4 eps |V| for the
// row scalings. V here is the computed W0 + D: |V| is taken in double plus (r + 2) eps |s| |B| |A|.
template <class M>
M round_trip_bound(const M& W0, const Reference& ref, Eigen::Index r) {
  using Scalar = typename M::Scalar;
  const double e = eps<Scalar>();
  const Eigen::MatrixXd Lt = std::abs(ref.s) * ref.B.cwiseAbs() * ref.A.cwiseAbs();
  const Eigen::MatrixXd V = ref.V.cwiseAbs() + double(r + 2) * e * Lt;
  return (e * W0.template cast<double>().cwiseAbs() + 5 * e * V).template cast<Scalar>();
}

TEMPLATE_TEST_CASE("DoRA unmerge with the exact restore off restores W within the derived bound", "[dora]",
                   PEFT_TEST_EVERY_MATRIX) {
  using Scalar = typename TestType::Scalar;
  // Larger magnitudes in s B A than in W and gains away from 1, so rounding is visible.
  TestType W = random_matrix<TestType>(33, 21, 5);
  const TestType W0 = W;
  peft::DoRA<TestType> dora(W, random_config(4, 40.0));
  dora.set_exact_restore(false);
  spread_magnitude(dora, 6);
  const Reference ref = reference(dora, W0);
  const TestType dW = dora.delta_weight();
  dora.merge();
  dora.unmerge();
  REQUIRE(!dora.is_merged());
  REQUIRE(!dora.last_restore_exact());
  const TestType bound = round_trip_bound(W0, ref, 4);
  const TestType err = (W - W0).cwiseAbs();
  REQUIRE((err.array() <= bound.array()).all());
  // Not vacuous: within a factor 4 of the worst element; and LoRA's form 2 eps (|W0| + |dW|),
  // dW = delta_weight(), does not hold for DoRA (the row scalings add rounding it does not count).
  REQUIRE((err.array() > Scalar(0.25) * bound.array()).any());
  const TestType lora_form = 2 * Scalar(eps<Scalar>()) * (W0.cwiseAbs() + dW.cwiseAbs());
  REQUIRE((err.array() > lora_form.array()).any());
  // The adapter trains on from the restored W0.
  typename peft::DoRA<TestType>::Cache cache;
  REQUIRE(dora.forward(random_matrix<peft::MatrixX<Scalar>>(21, 2, 1), cache).allFinite());
}

TEMPLATE_TEST_CASE("DoRA with the exact restore gives back a row whose magnitude was zero at merge", "[dora]",
                   MatrixXf, RowMajorXd) {
  using Scalar = typename TestType::Scalar;
  TestType W = random_matrix<TestType>(6, 5, 3);
  const TestType W0 = W;
  peft::DoRA<TestType> dora(W, random_config(2, 2.0));
  dora.magnitude()(2) = Scalar(0);
  dora.merge();
  REQUIRE(W.row(2).isZero(0));  // nothing of W0_2 is left in W: the record holds it
  REQUIRE((dora.delta_weight().row(2) + W0.row(2)).isZero(0));  // W0 rebuilt bit for bit while merged
  dora.unmerge();
  REQUIRE(dora.last_restore_exact());
  REQUIRE(same_bits(W, W0));
}

TEMPLATE_TEST_CASE("DoRA unmerge with the exact restore off refuses a row whose magnitude was zero at merge and "
                   "leaves W untouched", "[dora]", MatrixXf, RowMajorXd) {
  using Scalar = typename TestType::Scalar;
  TestType W = random_matrix<TestType>(6, 5, 3);
  const TestType W0 = W;
  peft::DoRA<TestType> dora(W, random_config(2, 2.0));
  dora.set_exact_restore(false);
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
