#pragma once
// The Fashion-MNIST demo's data and network, shared by examples/fashion_mnist.cpp (which trains) and
// examples/deploy.cpp (which loads what it saved, in another process): the two 5-class tasks (or the
// synthetic task of the same shape), and the user's hand-written MLP in plain Eigen, which knows nothing
// about the library.

#include <peft/core/random.hpp>

#include "mnist_data.hpp"

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

namespace demo {

using Eigen::Index;
using Eigen::MatrixXf;
using Eigen::VectorXf;

constexpr Index kInput = 784, kHidden = 256, kClasses = 5;

// ------------------------------------------------------------------------------------------------
// Data: Fashion-MNIST, or a synthetic task of the same shape, split into the two 5-class tasks

struct Split {
  MatrixXf X;          // 784 x N, one column per image
  std::vector<int> y;  // N labels in [0, kClasses)
};

struct Task {
  Split train, test;
};

struct Data {
  std::string source;
  Task upstream, downstream;
};

// The first `limit` examples whose label is in [first, first + kClasses), relabelled from 0.
inline Split select_classes(const LabeledImages& all, int first, Index limit) {
  std::vector<Index> keep;
  for (Index j = 0; j < Index(all.labels.size()) && Index(keep.size()) < limit; ++j)
    if (all.labels[j] >= first && all.labels[j] < first + kClasses) keep.push_back(j);
  Split s;
  s.X.resize(all.X.rows(), Index(keep.size()));
  s.y.resize(keep.size());
  for (Index k = 0; k < Index(keep.size()); ++k) {
    s.X.col(k) = all.X.col(keep[k]);
    s.y[k] = all.labels[keep[k]] - first;
  }
  return s;
}

// A 10-class task of 28 x 28 "images" drawn from 24 smooth strokes. Each class is a mix of 5 strokes:
// the upstream classes (0-4) take theirs from strokes 0-15, the downstream classes (5-9) from strokes
// 8-23. The two tasks share strokes 8-15, but strokes 16-23 matter only downstream: the pretrained
// features barely see them, so training the body pays, as on the real data. Every stroke appears in
// every image at a random strength, and the pixels are noisy: a linear probe on the pretrained features
// gets about 80 %, full fine-tuning about 90 %.
struct SyntheticTask {
  static constexpr int kStrokes = 24, kPerClass = 5;
  MatrixXf strokes;  // 784 x kStrokes
  MatrixXf mix;      // kStrokes x 10: each class's stroke weights

  explicit SyntheticTask(std::uint64_t seed) : strokes(kInput, kStrokes), mix(MatrixXf::Zero(kStrokes, 10)) {
    peft::Rng rng(seed);
    for (int k = 0; k < kStrokes; ++k) {
      const double cy = rng.uniform(5, 23), cx = rng.uniform(5, 23), dy = rng.uniform(-6, 6), dx = rng.uniform(-6, 6);
      const double width = rng.uniform(1.5, 3.0);
      for (int y = 0; y < 28; ++y)
        for (int x = 0; x < 28; ++x) {  // a stroke: two Gaussian bumps up to 6 pixels apart
          const auto bump = [&](double py, double px) {
            return std::exp(-((y - py) * (y - py) + (x - px) * (x - px)) / (2 * width * width));
          };
          strokes(y * 28 + x, k) = float(std::max(bump(cy, cx), bump(cy + dy, cx + dx)));
        }
    }
    for (int c = 0; c < 10; ++c) {
      const int first = c < 5 ? 0 : 8;
      for (int picked = 0; picked < kPerClass;) {
        const int k = first + int(rng.uniform(0, 16));
        if (mix(k, c) != 0.0f) continue;
        mix(k, c) = float(rng.uniform(0.6, 1.0));
        ++picked;
      }
    }
  }

  // n examples with balanced labels: the class's strokes at jittered strengths, every stroke at a random
  // strength N(0, 0.5^2), pixel noise N(0, 0.5^2), clipped to [0, 1].
  LabeledImages sample(Index n, std::uint64_t seed) const {
    peft::Rng rng(seed);
    LabeledImages out;
    MatrixXf amount(kStrokes, n), noise(kInput, n);
    out.labels.resize(std::size_t(n));
    for (Index j = 0; j < n; ++j) {
      const int c = int(j % 10);
      out.labels[std::size_t(j)] = c;
      for (int k = 0; k < kStrokes; ++k) amount(k, j) = float(mix(k, c) * rng.uniform(0.5, 1.5) + 0.5 * rng.normal());
    }
    rng.fill_normal(noise, 0.0, 0.5);
    out.X.resize(kInput, n);
    out.X.noalias() = strokes * amount;
    out.X = (out.X + noise).cwiseMax(0.0f).cwiseMin(1.0f);
    return out;
  }
};

inline Data load_data(const std::string& data_dir, bool quick, bool synthetic, std::uint64_t seed) {
  // Quick mode: 3000 training and 500 test images per task, from the files' first 8000 and 2000.
  const Index train_limit = quick ? 3000 : 1 << 30, test_limit = quick ? 500 : 1 << 30;
  const Index train_read = quick ? 8000 : 1 << 30, test_read = quick ? 2000 : 1 << 30;
  LabeledImages train, test;
  std::string error;
  Data d;
  if (synthetic) {
    d.source = "synthetic task (--synthetic)";
  } else if (demo::read_idx(data_dir + "/train-images-idx3-ubyte.gz", data_dir + "/train-labels-idx1-ubyte.gz",
                            train, error, train_read) &&
             demo::read_idx(data_dir + "/t10k-images-idx3-ubyte.gz", data_dir + "/t10k-labels-idx1-ubyte.gz", test,
                            error, test_read)) {
    d.source = "Fashion-MNIST from " + data_dir;
  } else {
    std::printf("Fashion-MNIST not available: %s\n", error.c_str());
    std::printf("  (Debian: apt-get install dataset-fashion-mnist zlib1g-dev; or --data DIR)\n");
    d.source = "synthetic task (Fashion-MNIST not available)";
    train = test = LabeledImages{};
  }
  if (train.labels.empty()) {
    const SyntheticTask task(seed + 1000);
    train = task.sample(quick ? 6000 : 60000, seed + 1);
    test = task.sample(quick ? 1000 : 10000, seed + 2);
  }
  // Standardise with the training set's pixel mean and deviation.
  const float mean = train.X.mean();
  const float stddev = std::sqrt((train.X.array() - mean).square().mean());
  train.X = (train.X.array() - mean) / stddev;
  test.X = (test.X.array() - mean) / stddev;
  d.upstream = {select_classes(train, 0, train_limit), select_classes(test, 0, test_limit)};
  d.downstream = {select_classes(train, 5, train_limit), select_classes(test, 5, test_limit)};
  return d;
}

// ------------------------------------------------------------------------------------------------
// The user's network, written by hand in plain Eigen: nothing here knows about the library.

struct Body {  // the two hidden layers: 784 -> 256 -> 256
  MatrixXf W1;
  VectorXf b1;
  MatrixXf W2;
  VectorXf b2;
};

struct Head {  // the classifier: 256 -> kClasses, and its gradients
  MatrixXf W, dW;
  VectorXf b, db;
};

// PyTorch's default nn.Linear init: U(+-1/sqrt(fan_in)) for weight and bias.
inline void init_linear(peft::Rng& rng, MatrixXf& W, VectorXf& b, Index out, Index in) {
  const double bound = 1.0 / std::sqrt(double(in));
  W.resize(out, in);
  b.resize(out);
  rng.fill_uniform(W, -bound, bound);
  rng.fill_uniform(b, -bound, bound);
}

inline Head new_head(std::uint64_t seed) {
  peft::Rng rng(seed);
  Head h;
  init_linear(rng, h.W, h.b, kClasses, kHidden);
  h.dW = MatrixXf::Zero(kClasses, kHidden);
  h.db = VectorXf::Zero(kClasses);
  return h;
}

// Inference: logits = Wh relu(layer2(relu(layer1(X)))) + bh, where a layer writes Y = f(X): the plain
// W X + b below, or an adapter's forward.
template <class Layer1, class Layer2>
MatrixXf predict(const Layer1& layer1, const Layer2& layer2, const Head& head, const MatrixXf& X) {
  MatrixXf H1, H2, logits(kClasses, X.cols());
  layer1(X, H1);
  H1 = H1.cwiseMax(0.0f);
  layer2(H1, H2);
  H2 = H2.cwiseMax(0.0f);
  logits.noalias() = head.W * H2;
  logits.colwise() += head.b;
  return logits;
}

inline auto plain_layer(const MatrixXf& W, const VectorXf& b) {
  return [&W, &b](const MatrixXf& X, MatrixXf& Y) {
    Y.noalias() = W * X;
    Y.colwise() += b;
  };
}

inline MatrixXf predict(const Body& body, const Head& head, const MatrixXf& X) {
  return predict(plain_layer(body.W1, body.b1), plain_layer(body.W2, body.b2), head, X);
}

inline std::vector<int> argmax(const MatrixXf& logits) {
  std::vector<int> out(std::size_t(logits.cols()));
  for (Index j = 0; j < logits.cols(); ++j) logits.col(j).maxCoeff(&out[std::size_t(j)]);
  return out;
}

inline double accuracy(const MatrixXf& logits, const std::vector<int>& y) {
  const std::vector<int> pred = argmax(logits);
  Index right = 0;
  for (std::size_t j = 0; j < y.size(); ++j) right += pred[j] == y[j];
  return double(right) / double(y.size());
}


}  // namespace demo
