// The compile-time benchmark's program (scripts/compile_bench.sh): what a new user writes first. A frozen
// two-layer MLP with LoRA on one layer and DoRA on the other, trained with peft::AdamW, merged and
// unmerged; once in float, once with a row-major first weight, once in double. It compiles every
// adapter code path a real program uses, in three matrix types, and runs in a fraction of a second.
#include <peft/peft.hpp>

#include <cstdio>

namespace {

template <class Scalar, class FirstWeight>
double run(std::uint64_t seed) {
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
  using Vector = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;
  const Eigen::Index d_in = 24, hidden = 32, d_out = 8, batch = 16;
  peft::Rng rng(seed);

  FirstWeight W1(hidden, d_in);
  Matrix W2(d_out, hidden), X(d_in, batch), target(d_out, batch);
  Vector b1(hidden), b2(d_out);
  rng.fill_normal(W1, 0.0, 0.3);
  rng.fill_normal(W2, 0.0, 0.3);
  rng.fill_normal(b1, 0.0, 0.1);
  rng.fill_normal(b2, 0.0, 0.1);
  const FirstWeight W1_frozen = W1;

  peft::LoRAConfig lora_cfg;
  lora_cfg.rank = 4;
  lora_cfg.alpha = 8;
  lora_cfg.seed = seed;
  peft::DoRAConfig dora_cfg;
  dora_cfg.rank = 4;
  dora_cfg.alpha = 8;
  dora_cfg.seed = seed + 1;
  peft::LoRA<FirstWeight> layer1(W1, b1, lora_cfg);
  peft::DoRA<Matrix> layer2(W2, b2, dora_cfg);

  peft::AdamWConfig adam_cfg;
  adam_cfg.lr = 1e-2;
  adam_cfg.weight_decay = 0.0;
  peft::AdamW<Scalar> opt(adam_cfg);
  opt.add(layer1, peft::lora_plus());
  opt.add(layer2);

  typename peft::LoRA<FirstWeight>::Cache cache1;
  typename peft::DoRA<Matrix>::Cache cache2;
  Matrix H, A, Y, dY, dA, dH, dX;
  double loss = 0.0;
  for (int step = 0; step < 50; ++step) {
    rng.fill_normal(X, 0.0, 1.0);
    rng.fill_normal(target, 0.0, 1.0);
    layer1.forward_into(X, H, cache1);
    A = H.cwiseMax(Scalar(0));
    layer2.forward_into(A, Y, cache2);
    dY = (Y - target) / Scalar(batch);
    loss = 0.5 * double((Y - target).squaredNorm()) / double(batch);
    opt.zero_grad();
    layer2.backward_into(dY, cache2, dA);
    dH = dA.cwiseProduct((H.array() > Scalar(0)).template cast<Scalar>().matrix());
    layer1.backward_into(dH, cache1, dX);
    opt.clip_grad_norm(Scalar(1));
    opt.step();
  }

  const Matrix before = layer2.forward(layer1.forward(X).cwiseMax(Scalar(0)));
  layer1.merge();
  layer2.merge();
  Matrix merged = W2 * ((W1 * X).colwise() + b1).cwiseMax(Scalar(0));
  merged.colwise() += b2;
  const double merge_error = double((merged - before).cwiseAbs().maxCoeff());
  layer2.unmerge();
  layer1.unmerge();
  const double unmerge_error = double((W1 - W1_frozen).cwiseAbs().maxCoeff());
  std::printf("loss %.3e, merged %.1e, unmerged %.1e\n", loss, merge_error, unmerge_error);
  return merge_error + unmerge_error;
}

}  // namespace

int main() {
  using RowMajorXf = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const double e = run<float, Eigen::MatrixXf>(1) + run<float, RowMajorXf>(2) + run<double, Eigen::MatrixXd>(3);
  return e < 1e-3 ? 0 : 1;
}
