#pragma once
// The Fashion-MNIST demo's training code, shared by examples/fashion_mnist.cpp (one process) and
// examples/fashion_mnist_mpi.cpp (data-parallel over MPI ranks): the loss, the user's own dense layer and
// its hand-written backward, the same layer with an adapter, one batch's forward and backward through the
// network, and the user's training loop (which pretrains the base).
//
// What to copy into your own loop is marked `// --- adapter: <step>` (see fashion_mnist.cpp).

#include <peft/optim/adamw.hpp>
#include <peft/optim/schedule.hpp>

#include "fashion_mnist_model.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <utility>
#include <vector>

namespace demo {

constexpr Index kBatch = 128;

// Mean softmax cross-entropy of the batch; G = its gradient with respect to the logits.
inline float softmax_cross_entropy(const MatrixXf& logits, const std::vector<int>& y, MatrixXf& G) {
  G.resize(logits.rows(), logits.cols());
  double loss = 0.0;
  const float inv_n = 1.0f / float(logits.cols());
  for (Index j = 0; j < logits.cols(); ++j) {
    const float top = logits.col(j).maxCoeff();
    G.col(j) = (logits.col(j).array() - top).exp().matrix();
    const float sum = G.col(j).sum();
    loss += std::log(sum) - (logits(y[std::size_t(j)], j) - top);
    G.col(j) *= inv_n / sum;
    G(y[std::size_t(j)], j) -= inv_n;
  }
  return float(loss / double(logits.cols()));
}

// The user's own fully connected layer Y = W X + b and its hand-written backward (pretraining and full
// fine-tuning train it; the linear probe keeps it frozen).
struct Dense {
  MatrixXf& W;
  VectorXf& b;
  MatrixXf dW;
  VectorXf db;
  const MatrixXf* X = nullptr;  // the input of the last forward, for backward

  Dense(MatrixXf& W_, VectorXf& b_)
      : W(W_), b(b_), dW(MatrixXf::Zero(W_.rows(), W_.cols())), db(VectorXf::Zero(b_.size())) {}
  void forward(const MatrixXf& in, MatrixXf& out) {
    X = &in;
    out.noalias() = W * in;
    out.colwise() += b;
  }
  void backward(const MatrixXf& dY, MatrixXf* dX) {  // dX = nullptr: not needed (first layer)
    dW.noalias() += dY * X->transpose();
    db += dY.rowwise().sum();
    if (dX) dX->noalias() = W.transpose() * dY;
  }
  void infer(const MatrixXf& in, MatrixXf& out) const { plain_layer(W, b)(in, out); }
};

// The same layer with an adapter: its two calls replace the layer's own forward and backward.
template <class Adapter>
struct Adapted {
  Adapter& adapter;
  typename Adapter::Cache cache;  // what backward needs; yours, reused from step to step

  explicit Adapted(Adapter& a) : adapter(a) {}
  void forward(const MatrixXf& in, MatrixXf& out) {
    adapter.forward_into(in, out, cache);  // --- adapter: forward (out = adapter.forward(in, cache), no allocation)
  }
  void backward(const MatrixXf& dY, MatrixXf* dX) {
    if (dX != nullptr)
      adapter.backward_into(dY, cache, *dX);  // --- adapter: backward (accumulates the adapter's gradients,
                                              // returns dL/dX)
    else
      adapter.backward_params(dY, cache);  // --- the first layer: the gradients alone, no dL/dX (the base's
                                           // Wᵀ dY skipped)
  }
  void infer(const MatrixXf& in, MatrixXf& out) const { adapter.forward_into(in, out); }
};

// One step's activations and gradients, reused from batch to batch.
struct Workspace {
  MatrixXf X, Z1, H1, Z2, H2, logits, G, dH2, dH1;
  std::vector<int> y;
};

// Forward and backward of one batch (w.X, w.y) through layer1, layer2 and the head; gradients
// accumulate. With train_body false (linear probe) backward stops at the head.
template <class Layer1, class Layer2>
float forward_backward(Layer1& layer1, Layer2& layer2, Head& head, bool train_body, Workspace& w) {
  layer1.forward(w.X, w.Z1);
  w.H1 = w.Z1.cwiseMax(0.0f);
  layer2.forward(w.H1, w.Z2);
  w.H2 = w.Z2.cwiseMax(0.0f);
  w.logits.noalias() = head.W * w.H2;
  w.logits.colwise() += head.b;
  const float loss = softmax_cross_entropy(w.logits, w.y, w.G);
  head.dW.noalias() += w.G * w.H2.transpose();
  head.db += w.G.rowwise().sum();
  if (!train_body) return loss;
  w.dH2.noalias() = head.W.transpose() * w.G;
  w.dH2 = (w.Z2.array() > 0.0f).select(w.dH2, 0.0f);  // ReLU'
  layer2.backward(w.dH2, &w.dH1);
  w.dH1 = (w.Z1.array() > 0.0f).select(w.dH1, 0.0f);
  layer1.backward(w.dH1, nullptr);
  return loss;
}

// The epoch's order: a Fisher-Yates shuffle seeded by (seed, epoch), the same for every method.
inline std::vector<Index> epoch_order(Index n, std::uint64_t seed, int epoch) {
  std::vector<Index> order(static_cast<std::size_t>(n));
  for (Index i = 0; i < n; ++i) order[std::size_t(i)] = i;
  peft::Rng rng(seed * 7919u + std::uint64_t(epoch));
  for (Index i = n - 1; i > 0; --i)
    std::swap(order[std::size_t(i)], order[std::size_t(Index(rng.uniform() * double(i + 1)))]);
  return order;
}

// Options for what weight decay must not pull towards zero (biases, and see the adapters below).
inline peft::ParamOptions no_decay() {
  peft::ParamOptions o;
  o.weight_decay = false;
  return o;
}

inline double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

inline Index steps_per_epoch(const Split& s) { return (s.X.cols() + kBatch - 1) / kBatch; }

struct TrainResult {
  double test_accuracy = 0.0;
  double seconds_per_epoch = 0.0;
};

// The user's training loop: minibatches in a seeded order, AdamW with warm-up and cosine decay,
// gradient clipping; test accuracy after every epoch.
template <class Layer1, class Layer2>
TrainResult train(const char* label, Layer1& layer1, Layer2& layer2, Head& head, bool train_body,
                  peft::AdamW<float>& opt, double peak_lr, const Task& task, int epochs, std::uint64_t seed) {
  const Split& data = task.train;
  const Index total_steps = steps_per_epoch(data) * epochs;
  const peft::WarmupCosine schedule(peak_lr, total_steps / 10, total_steps);
  Workspace w;
  TrainResult r;
  double train_seconds = 0.0;
  for (int epoch = 1; epoch <= epochs; ++epoch) {
    const std::vector<Index> order = epoch_order(data.X.cols(), seed, epoch);
    const auto t0 = std::chrono::steady_clock::now();
    double loss_sum = 0.0;
    for (Index start = 0; start < data.X.cols(); start += kBatch) {
      const Index n = std::min(kBatch, data.X.cols() - start);
      w.X.resize(kInput, n);
      w.y.resize(std::size_t(n));
      for (Index j = 0; j < n; ++j) {
        const Index src = order[std::size_t(start + j)];
        w.X.col(j) = data.X.col(src);
        w.y[std::size_t(j)] = data.y[std::size_t(src)];
      }
      opt.zero_grad();
      loss_sum += double(forward_backward(layer1, layer2, head, train_body, w)) * double(n);
      opt.clip_grad_norm(1.0f);
      opt.set_lr(schedule(opt.step_count()));
      opt.step();
    }
    const double seconds = seconds_since(t0);
    train_seconds += seconds;
    const MatrixXf logits = predict([&](const MatrixXf& X, MatrixXf& Y) { layer1.infer(X, Y); },
                                    [&](const MatrixXf& X, MatrixXf& Y) { layer2.infer(X, Y); }, head, task.test.X);
    r.test_accuracy = accuracy(logits, task.test.y);
    std::printf("  %-10s epoch %d/%d  loss %.4f  test accuracy %6.2f %%  %5.2f s\n", label, epoch, epochs,
                loss_sum / double(data.X.cols()), 100.0 * r.test_accuracy, seconds);
    std::fflush(stdout);
  }
  r.seconds_per_epoch = train_seconds / epochs;
  return r;
}

// Registers the user's own layers (pretraining, full fine-tuning) and the head with an optimizer.
inline void add_body(peft::AdamW<float>& opt, Body& net, Dense& layer1, Dense& layer2) {
  opt.add("fc1.weight", net.W1, layer1.dW);
  opt.add("fc1.bias", net.b1, layer1.db, no_decay());
  opt.add("fc2.weight", net.W2, layer2.dW);
  opt.add("fc2.bias", net.b2, layer2.db, no_decay());
}
inline void add_head(peft::AdamW<float>& opt, Head& head) {
  opt.add("head.weight", head.W, head.dW);
  opt.add("head.bias", head.b, head.db, no_decay());
}

struct Pretrained {
  Body body;
  Head head;
  double accuracy = 0.0;  // upstream test accuracy
};

// Pretraining on the upstream task: every layer and the head, with the user's own Dense layers and loop.
inline Pretrained pretrain(const Task& upstream, int epochs, std::uint64_t seed) {
  peft::Rng rng(seed);
  Pretrained p;
  Body& net = p.body;
  init_linear(rng, net.W1, net.b1, kHidden, kInput);
  init_linear(rng, net.W2, net.b2, kHidden, kHidden);
  p.head = new_head(seed + 7);
  Head& head = p.head;
  Dense layer1(net.W1, net.b1), layer2(net.W2, net.b2);
  const double lr = 2e-3;
  peft::AdamWConfig cfg;
  cfg.lr = lr;
  peft::AdamW<float> opt(cfg);
  add_body(opt, net, layer1, layer2);
  add_head(opt, head);
  std::printf("pretraining on the upstream task (classes 0-4): every layer, AdamW peak lr %.0e\n", lr);
  const TrainResult t = train("pretrain", layer1, layer2, head, true, opt, lr, upstream, epochs, seed + 100);
  p.accuracy = t.test_accuracy;
  return p;
}

}  // namespace demo
