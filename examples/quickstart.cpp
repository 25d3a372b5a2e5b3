// Quick start: wrap a frozen linear layer with LoRA, train the adapter from your own loop, then merge
// it into the weight for deployment and unmerge it again.
//
// The task: the frozen layer W0 should have been W0 + Δ, with Δ of rank 2, and we only have samples of
// the target layer's outputs. LoRA with r = 4 can express Δ exactly; we fit it with plain SGD on the
// mean squared error, written by hand as a user's loop would.
#include <peft/peft.hpp>

#include <cstdio>

int main() {
  const Eigen::Index d_in = 64, d_out = 48, batch = 128;
  peft::Rng rng(2026);

  // The user's frozen layer (weight and bias), and the target layer it should become.
  Eigen::MatrixXf W(d_out, d_in), U(d_out, 2), V(2, d_in);
  Eigen::VectorXf b(d_out);
  rng.fill_normal(W, 0.0, 0.1);
  rng.fill_normal(b, 0.0, 0.1);
  rng.fill_normal(U, 0.0, 0.3);
  rng.fill_normal(V, 0.0, 0.3);
  const Eigen::MatrixXf W_target = W + U * V;
  const Eigen::MatrixXf W_frozen = W;  // kept only to show that unmerge restores it

  // 1. Wrap the frozen weight: by reference, no copy. B starts at zero, so the layer is unchanged.
  peft::LoRAConfig cfg;
  cfg.rank = 4;
  cfg.alpha = 8;
  cfg.seed = 1;
  peft::LoRA<Eigen::MatrixXf> lora(W, b, cfg);

  // 2. Train from our own loop: forward with a cache, backward, step every parameter.
  peft::LoRA<Eigen::MatrixXf>::Cache cache;
  Eigen::MatrixXf X(d_in, batch), dY;
  const float lr = 0.05f;
  for (int step = 0; step <= 2000; ++step) {
    rng.fill_normal(X, 0.0, 1.0);
    Eigen::MatrixXf target = W_target * X;
    target.colwise() += b;
    const Eigen::MatrixXf Y = lora.forward(X, cache);
    dY = (Y - target) / float(batch);  // d/dY of 0.5 * ||Y - target||^2 / batch
    lora.zero_grad();
    lora.backward(dY, cache);  // returns dL/dX for the layers below; unused here
    for (auto& p : lora.parameters()) p.value -= lr * p.grad;
    if (step % 400 == 0)
      std::printf("step %4d  loss %.3e\n", step, 0.5 * (Y - target).squaredNorm() / double(batch));
  }
  const float delta_error = (lora.delta_weight() - U * V).norm() / (U * V).norm();
  std::printf("relative error of the learned delta: %.2e\n", delta_error);

  // 3. Merge for deployment: forward now costs exactly the base product.
  rng.fill_normal(X, 0.0, 1.0);
  const Eigen::MatrixXf Y_adapter = lora.forward(X);
  lora.merge();
  const Eigen::MatrixXf Y_merged = lora.forward(X);
  std::printf("merged: max |Y_merged - Y_adapter| = %.2e\n", (Y_merged - Y_adapter).cwiseAbs().maxCoeff());

  // 4. Unmerge to switch adapters: W is back to the frozen weight (within rounding).
  lora.unmerge();
  std::printf("unmerged: max |W - W0| = %.2e\n", (W - W_frozen).cwiseAbs().maxCoeff());

  const bool ok = delta_error < 1e-2f && (Y_merged - Y_adapter).cwiseAbs().maxCoeff() < 1e-4f &&
                  (W - W_frozen).cwiseAbs().maxCoeff() < 1e-5f;
  std::printf("%s\n", ok ? "quickstart: ok" : "quickstart: FAILED");
  return ok ? 0 : 1;
}
