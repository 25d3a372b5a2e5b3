// An adapter of your own, on the library's public extension contract (docs/extending.md): (IA)³ for a
// feed-forward layer (Liu et al., 2022), which learns one scale per input feature:
//
//     Y = W0 diag(l) X + b 1ᵀ,    l starts at 1 (PEFT's ia3_l)
//     dl += rowsum(X ⊙ (W0ᵀ G)),  dX = diag(l) W0ᵀ G
//     merge: W <- W0 diag(l)      unmerge: W <- W diag(1 / l)
//
// The program checks the new adapter the way the library checks its own: gradients against central
// finite differences (peft::testing::check_gradients), then trains it with peft::AdamW to recover a
// known input scaling, merges it (the output is the same, the forward is the base product) and unmerges
// it (W0 comes back within 2 eps |W0|). It exits non-zero if any check fails.
#include <peft/peft.hpp>
#include <peft/testing/grad_check.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <limits>
#include <string>

namespace example {

template <class MatrixType_>
class IA3 : public peft::AdapterBase<IA3<MatrixType_>, MatrixType_> {
  using Base = peft::AdapterBase<IA3<MatrixType_>, MatrixType_>;
  friend peft::AdapterAccess;  // the bases call the private hooks below through it

 public:
  using typename Base::ConstMatrixRef;
  using typename Base::Index;
  using typename Base::Matrix;
  using typename Base::MatrixType;
  using typename Base::Scalar;
  using typename Base::Vector;

  /// What backward needs, filled by forward(X, cache). It derives from peft::CacheStamp, which the
  /// bases fill and check (owner, state, shapes); the adapter adds its own buffers.
  struct Cache : peft::CacheStamp {
    Matrix X;  // the input
    Matrix T;  // backward scratch: W0ᵀ G
  };

  static constexpr const char* class_name = "example::IA3";  // prefixes every error message

  IA3(Eigen::Ref<MatrixType> W, Eigen::Ref<Vector> b)
      : Base(W, b.data(), b.size(), /*has_bias=*/true, /*num_values=*/W.cols()),
        layout_{{{"ia3_l", W.cols(), 1, 0}}} {
    scale().setOnes();  // the identity: the layer starts equal to the base
  }

  /// ia3_l (d_in x 1), a view into the flat parameter buffer.
  Eigen::Map<Matrix> scale() { return this->value(layout_[0]); }
  Eigen::Map<const Matrix> scale() const { return this->value(layout_[0]); }
  /// Where each parameter lives in the flat buffers (name, shape, offset).
  const std::array<peft::ParameterInfo, 1>& parameter_layout() const { return layout_; }

 private:
  // TrainableBase's hooks. X's rows, dY's shape, the merged state and the cache's stamp are checked
  // before they run; Y and dX are already sized, and never alias an input.
  void forward_impl(const ConstMatrixRef& X, Matrix& Y) const {
    if (this->is_merged()) {
      this->base_product(X, Y);  // W holds W0 diag(l)
    } else {
      const Matrix scaled = scale().col(0).asDiagonal() * X;
      this->base_product(scaled, Y);
    }
  }

  void forward_train_impl(const ConstMatrixRef& X, Matrix& Y, Cache& cache) {
    cache.X = X;
    const Matrix scaled = scale().col(0).asDiagonal() * X;
    this->base_product(scaled, Y);
  }

  void check_cache_impl(const Cache& cache) const {
    if (cache.X.rows() != this->d_in() || cache.X.cols() != cache.tokens)
      throw peft::StateError(std::string(class_name) + "::backward: the cache does not fit this adapter");
  }

  void backward_impl(const ConstMatrixRef& dY, Cache& cache, Matrix& dX) {
    this->base_input_grad(dY, cache.T);  // W0ᵀ G
    this->grad(layout_[0]).col(0) += cache.X.cwiseProduct(cache.T).rowwise().sum();
    dX = scale().col(0).asDiagonal() * cache.T;
  }

  // AdapterBase's hooks: compute and check everything first, then write (the strong guarantee). The
  // new weight is formed aside, a temporary of W's size: simple, and fine for an example (the
  // library's own merges check in blocks instead).
  void merge_impl() {
    const auto l = scale().col(0);
    if (!l.allFinite() || (l.array() == Scalar(0)).any())
      throw peft::NumericalError(std::string(class_name) + "::merge: a scale is 0 or not finite; W is left untouched");
    const MatrixType merged = (this->weight().array().rowwise() * l.transpose().array()).matrix();
    if (!merged.allFinite())
      throw peft::NumericalError(std::string(class_name) + "::merge: W diag(l) would overflow; W is left untouched");
    this->weight_mut() = merged;
  }

  void unmerge_impl() {
    const auto l = this->applied_value(layout_[0]).col(0);  // the scale of merge time
    const MatrixType restored = (this->weight().array().rowwise() / l.transpose().array()).matrix();
    if (!restored.allFinite())
      throw peft::NumericalError(std::string(class_name) + "::unmerge: W diag(1/l) would overflow; W is left untouched");
    this->weight_mut() = restored;
  }

  MatrixType delta_weight_impl() const {
    MatrixType W0 = this->weight();
    if (this->is_merged()) W0.array().rowwise() /= this->applied_value(layout_[0]).col(0).transpose().array();
    MatrixType dW = W0 * scale().col(0).asDiagonal();
    dW -= W0;
    return dW;
  }

  std::array<peft::ParameterInfo, 1> layout_;
};

}  // namespace example

int main() {
  static_assert(peft::is_adapter_v<example::IA3<Eigen::MatrixXd>>, "the whole adapter contract");
  bool ok = true;
  const auto check = [&](bool passed, const char* what) {
    std::printf("%-58s %s\n", what, passed ? "ok" : "FAILED");
    ok = ok && passed;
  };

  // 1. Gradients against central differences, in double, on a small layer and a moved scale.
  {
    peft::Rng rng(1);
    Eigen::MatrixXd W(6, 5), X(5, 4), R(6, 4);
    Eigen::VectorXd b(6);
    rng.fill_normal(W, 0.0, 1.0);
    rng.fill_normal(b, 0.0, 1.0);
    rng.fill_normal(X, 0.0, 1.0);
    rng.fill_normal(R, 0.0, 1.0);
    example::IA3<Eigen::MatrixXd> ia3(W, b);
    rng.fill_uniform(ia3.scale(), 0.5, 1.5);
    double worst = 0.0;
    for (const auto& e : peft::testing::check_gradients(ia3, X, R)) worst = std::max(worst, e.relative);
    std::printf("largest relative gradient error: %.1e\n", worst);
    check(worst < 1e-6, "gradients match central differences");
    // backward_params (no dL/dX, for a network's first layer): this backward_impl takes dX by reference,
    // so the base computes dX aside and drops it; taking `Matrix* dX` (null then) would let it skip dX.
    example::IA3<Eigen::MatrixXd>::Cache first, second;
    ia3.zero_grad();
    ia3.forward(X, first);
    ia3.backward(R, first);
    const Eigen::VectorXd grads = ia3.flat_grads();
    ia3.zero_grad();
    ia3.forward(X, second);
    ia3.backward_params(R, second);
    check(ia3.flat_grads() == grads, "backward_params accumulates backward's gradients");
  }

  // 2. Train it to recover a known scaling of the inputs, with the library's optimizer.
  const Eigen::Index d_in = 32, d_out = 24, batch = 64;
  peft::Rng rng(2026);
  Eigen::MatrixXf W(d_out, d_in), X(d_in, batch);
  Eigen::VectorXf b(d_out), target_scale(d_in);
  rng.fill_normal(W, 0.0, 0.3);
  rng.fill_normal(b, 0.0, 0.1);
  rng.fill_uniform(target_scale, 0.5, 1.5);
  const Eigen::MatrixXf W0 = W;
  example::IA3<Eigen::MatrixXf> ia3(W, b);
  peft::AdamWConfig acfg;
  acfg.lr = 0.05;
  acfg.weight_decay = 0.0;  // decay would pull the scales towards 0, away from the identity
  peft::AdamW<float> opt(acfg);
  opt.add(ia3);
  example::IA3<Eigen::MatrixXf>::Cache cache;
  Eigen::MatrixXf Y, dX;
  for (int step = 0; step <= 600; ++step) {
    rng.fill_normal(X, 0.0, 1.0);
    Eigen::MatrixXf target = W0 * target_scale.asDiagonal() * X;
    target.colwise() += b;
    ia3.forward_into(X, Y, cache);
    const Eigen::MatrixXf dY = (Y - target) / float(batch);
    opt.zero_grad();
    ia3.backward_into(dY, cache, dX);
    opt.step();
    if (step % 150 == 0) std::printf("step %3d  loss %.3e\n", step, 0.5 * (Y - target).squaredNorm() / batch);
  }
  const float scale_error = (Eigen::VectorXf(ia3.scale()) - target_scale).cwiseAbs().maxCoeff();
  std::printf("largest error of the learned scale: %.1e\n", scale_error);
  check(scale_error < 1e-3f, "training recovers the input scaling");

  // 3. Merge for deployment: the same output, and forward is exactly the base product.
  rng.fill_normal(X, 0.0, 1.0);
  const Eigen::MatrixXf Y_adapter = ia3.forward(X);
  ia3.merge();
  Eigen::MatrixXf base = W * X;
  base.colwise() += b;
  check(ia3.forward(X) == base, "merged forward is the base product");
  check((base - Y_adapter).cwiseAbs().maxCoeff() < 1e-4f, "merged output equals the adapter's");
  bool refused = false;
  try {
    ia3.merge();
  } catch (const peft::StateError&) {
    refused = true;  // the base's state machine: "example::IA3::merge: already merged; call unmerge() first"
  }
  check(refused, "a second merge is refused (StateError)");

  // 4. Unmerge: W0 back within one multiplication and one division per element.
  ia3.unmerge();
  const float eps = std::numeric_limits<float>::epsilon() / 2;
  check(((W - W0).cwiseAbs().array() <= 2 * eps * W0.cwiseAbs().array()).all(), "unmerge restores W0 within 2 eps |W0|");
  std::printf("%s\n", ok ? "custom_adapter: ok" : "custom_adapter: FAILED");
  return ok ? 0 : 1;
}
