// A complete training loop over two wrapped layers with a nonlinearity between them:
// docs/getting-started.md's first example. A frozen MLP  y = W2 relu(W1 x + b1) + b2  gets LoRA on
// its first layer and DoRA on
// its second; AdamW with a warm-up and cosine schedule fits them to a target network (the same MLP
// with a rank-2 change in each layer), and both are merged for deployment.
#include <peft/peft.hpp>

#include <cstdio>

int main() {
  const Eigen::Index d_in = 32, hidden = 64, d_out = 16, batch = 128;
  peft::Rng rng(7);
  Eigen::MatrixXf W1(hidden, d_in), W2(d_out, hidden), X(d_in, batch);
  Eigen::VectorXf b1(hidden), b2(d_out);
  for (auto* m : {&W1, &W2}) rng.fill_normal(*m, 0.0, 0.2);
  rng.fill_normal(b1, 0.0, 0.1);
  rng.fill_normal(b2, 0.0, 0.1);
  // The target: the same network with a low-rank change in each layer.
  Eigen::MatrixXf U1(hidden, 2), V1(2, d_in), U2(d_out, 2), V2(2, hidden);
  for (auto* m : {&U1, &V1, &U2, &V2}) rng.fill_normal(*m, 0.0, 0.2);
  const Eigen::MatrixXf T1 = W1 + U1 * V1, T2 = W2 + U2 * V2;

  peft::LoRAConfig c1;                         // wrap the frozen layers, by reference
  c1.rank = 4; c1.alpha = 8; c1.seed = 1;
  peft::DoRAConfig c2;
  c2.rank = 4; c2.alpha = 8; c2.seed = 2;
  peft::LoRA<Eigen::MatrixXf> layer1(W1, b1, c1);
  peft::DoRA<Eigen::MatrixXf> layer2(W2, b2, c2);

  peft::AdamWConfig ac;                        // one optimizer for both
  ac.lr = 1e-2; ac.weight_decay = 0.0;    // no decay: it would pull DoRA's magnitude to 0
  peft::AdamW<float> opt(ac);
  opt.add(layer1, peft::lora_plus());
  opt.add(layer2);
  const peft::WarmupCosine schedule(ac.lr, /*warmup*/ 100, /*total*/ 1000);

  peft::LoRA<Eigen::MatrixXf>::Cache cache1;   // caller-owned, reused every step
  peft::DoRA<Eigen::MatrixXf>::Cache cache2;
  Eigen::MatrixXf H, A, Y, dY, dA, dH;
  float first = 0, last = 0;
  for (int step = 0; step < 1000; ++step) {
    rng.fill_normal(X, 0.0, 1.0);
    const Eigen::MatrixXf target = T2 * ((T1 * X).colwise() + b1).cwiseMax(0.0f) + b2.replicate(1, batch);
    layer1.forward_into(X, H, cache1);         // forward: H = W1 X + b1 + s B A X
    A = H.cwiseMax(0.0f);                      // relu
    layer2.forward_into(A, Y, cache2);
    dY = (Y - target) / float(batch);          // d/dY of 0.5 |Y - target|² / batch
    (step == 0 ? first : last) = 0.5f * (Y - target).squaredNorm() / float(batch);
    opt.zero_grad();
    layer2.backward_into(dY, cache2, dA);      // backward: accumulates gradients, returns dL/dA
    dH = dA.cwiseProduct((H.array() > 0.0f).cast<float>().matrix());
    layer1.backward_params(dH, cache1);        // the first layer: gradients only, no dL/dX (skips W1ᵀ dH)
    opt.set_lr(schedule(opt.step_count()));    // warm-up, then cosine decay
    opt.step();
  }
  std::printf("loss %.3e -> %.3e\n", first, last);

  rng.fill_normal(X, 0.0, 1.0);                // deploy: merge, and the plain forward runs the adapted net
  const Eigen::MatrixXf before = layer2.forward(layer1.forward(X).cwiseMax(0.0f));
  layer1.merge();
  layer2.merge();
  const Eigen::MatrixXf merged = (W2 * ((W1 * X).colwise() + b1).cwiseMax(0.0f)).colwise() + b2;
  const float diff = (merged - before).cwiseAbs().maxCoeff();
  std::printf("merged: max |difference| %.1e\n", diff);
  const bool ok = last < 1e-6f * first && diff < 1e-4f;
  std::printf("%s\n", ok ? "two_layers: ok" : "two_layers: FAILED");
  return ok ? 0 : 1;
}
