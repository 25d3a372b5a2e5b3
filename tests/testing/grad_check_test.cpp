// The gradient checker must be able to fail: a layer whose backward is wrong by a little is caught,
// the same layer with the right backward passes.
#include "support/catch.hpp"
#include "support/matrices.hpp"

#include <peft/core/parameter.hpp>
#include <peft/testing/grad_check.hpp>

#include <vector>

namespace {

// A minimal adapter-shaped layer: Y = diag(g) W X with trainable g; `bug` scales dg by (1 + bug).
struct ScaledLayer {
  using MatrixType = Eigen::MatrixXd;
  using Scalar = double;
  using Matrix = Eigen::MatrixXd;
  struct Cache {
    Matrix Z;
  };
  Eigen::MatrixXd W;
  Eigen::VectorXd g, dg;
  double bug = 0.0;

  Matrix forward(const Matrix& X) const { return g.asDiagonal() * (W * X); }
  Matrix forward(const Matrix& X, Cache& c) {
    c.Z = W * X;
    return g.asDiagonal() * c.Z;
  }
  Matrix backward(const Matrix& G, Cache& c) {
    dg += (1.0 + bug) * G.cwiseProduct(c.Z).rowwise().sum();
    return W.transpose() * (g.asDiagonal() * G);
  }
  std::vector<peft::Parameter<double>> parameters() {
    return {{"g", Eigen::Map<Matrix>(g.data(), g.size(), 1), Eigen::Map<Matrix>(dg.data(), dg.size(), 1)}};
  }
  void zero_grad() { dg.setZero(); }
  void merge() {}
  void unmerge() {}
  bool is_merged() const { return false; }
  Matrix delta_weight() const { return Matrix(); }
  Eigen::VectorXd& flat_values() { return g; }
  Eigen::VectorXd& flat_grads() { return dg; }
};

ScaledLayer make_layer(double bug) {
  ScaledLayer layer;
  layer.W = peft::test::random_matrix<Eigen::MatrixXd>(4, 3, 1);
  layer.g = peft::test::random_matrix<Eigen::MatrixXd>(4, 1, 2);
  layer.dg = Eigen::VectorXd::Zero(4);
  layer.bug = bug;
  return layer;
}

}  // namespace

TEST_CASE("gradient checker passes a correct backward and catches a wrong one") {
  static_assert(peft::is_adapter_v<ScaledLayer>, "the mock must satisfy the adapter contract");
  const Eigen::MatrixXd X = peft::test::random_matrix<Eigen::MatrixXd>(3, 2, 3);
  const Eigen::MatrixXd R = peft::test::random_matrix<Eigen::MatrixXd>(4, 2, 4);

  for (const auto& e : peft::testing::check_gradients(make_layer(0.0), X, R)) REQUIRE(e.relative < 1e-9);

  const auto wrong = peft::testing::check_gradients(make_layer(1e-4), X, R);
  REQUIRE(wrong.size() == 2);
  REQUIRE(wrong[0].name == "X");
  REQUIRE(wrong[0].relative < 1e-9);
  REQUIRE(wrong[1].name == "g");
  REQUIRE(wrong[1].relative > 1e-6);  // a 1e-4 error in dg is visible above the 1e-6 threshold
}
