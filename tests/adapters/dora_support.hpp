#pragma once
// What the DoRA test files share: a small layer, a configuration with B != 0, magnitudes moved away
// from the norms, the materialised reference (V = W0 + s B A, its row norms, the gain), and the loss
// whose gradient the detached backward computes.
#include "support/matrices.hpp"
#include "support/numeric.hpp"

#include <peft/adapters/dora.hpp>
#include <peft/testing/grad_check.hpp>

#include <vector>

namespace peft::test::dora {

constexpr Eigen::Index kOut = 7, kIn = 5, kTokens = 4;

template <class M>
struct Layer {
  using Scalar = typename M::Scalar;
  M W = random_matrix<M>(kOut, kIn, 11);
  peft::VectorX<Scalar> b = random_matrix<peft::MatrixX<Scalar>>(kOut, 1, 12);
  peft::MatrixX<Scalar> X = random_matrix<peft::MatrixX<Scalar>>(kIn, kTokens, 13);
};

inline peft::DoRAConfig random_config(Eigen::Index rank = 3, double alpha = 6.0, bool detach_norm = true) {
  peft::DoRAConfig cfg;
  cfg.rank = rank;
  cfg.alpha = alpha;
  cfg.init = peft::LoRAInit::random;  // B != 0: the branch and the norms' dependence on B are real
  cfg.seed = 42;
  cfg.detach_norm = detach_norm;
  return cfg;
}

/// Moves the magnitude away from the norms (gain g = m / n in [0.75, 1.75]), as training would.
template <class Adapter>
void spread_magnitude(Adapter& dora, std::uint64_t seed) {
  using Scalar = typename Adapter::Scalar;
  const peft::VectorX<Scalar> f = random_matrix<peft::MatrixX<Scalar>>(dora.d_out(), 1, seed);
  dora.magnitude().array() *= Scalar(1.25) + Scalar(0.5) * f.array();
}

/// The materialised quantities, in double: V = W0 + s B A, n = row norms of V, g = m / n.
struct Reference {
  Eigen::MatrixXd V, A, B;
  Eigen::VectorXd n, g, m;
  double s;
};

template <class Adapter, class M>
Reference reference(const Adapter& dora, const M& W0) {
  Reference ref;
  ref.s = static_cast<double>(dora.scaling());
  ref.A = dora.A().template cast<double>();
  ref.B = dora.B().template cast<double>();
  ref.m = dora.magnitude().template cast<double>();
  ref.V = to_double(W0) + ref.s * mul(ref.B, ref.A);
  ref.n = ref.V.rowwise().norm();
  ref.g = ref.m.cwiseQuotient(ref.n);
  return ref;
}

/// Y = diag(g) V X + b 1ᵀ (no dropout), in double.
template <class V, class X_t>
Eigen::MatrixXd reference_forward(const Reference& ref, const V& b, const X_t& X) {
  Eigen::MatrixXd Y = ref.g.asDiagonal() * mul(ref.V, to_double(X));
  return Y.colwise() + b.template cast<double>();
}

/// L = <R, diag(m / n0) (W0 X + s B A (X ⊙ mask)) + b 1ᵀ> with the norms n0 held fixed: the function
/// whose gradient the detached backward computes (DoRA paper §4.3). theta is the adapter's flat layout.
struct DetachedLoss {
  Eigen::MatrixXd W0, R, mask;
  Eigen::VectorXd b, n0;
  double s;
  Eigen::Index r;

  double operator()(const Eigen::VectorXd& theta, const Eigen::MatrixXd& X) const {
    const Eigen::Index d_out = W0.rows(), d_in = W0.cols();
    const Eigen::Map<const Eigen::MatrixXd> A(theta.data(), r, d_in);
    const Eigen::Map<const Eigen::MatrixXd> B(theta.data() + r * d_in, d_out, r);
    const Eigen::Map<const Eigen::VectorXd> m(theta.data() + r * (d_in + d_out), d_out);
    const Eigen::MatrixXd Z = W0 * X + s * B * (A * X.cwiseProduct(mask));
    Eigen::MatrixXd Y = m.cwiseQuotient(n0).asDiagonal() * Z;
    if (b.size() != 0) Y.colwise() += b;
    return R.cwiseProduct(Y).sum();
  }
};

/// Central differences of `loss` with respect to every entry of theta.
template <class Loss>
Eigen::VectorXd fd_theta(const Loss& loss, const Eigen::VectorXd& theta, const Eigen::MatrixXd& X, double h = 1e-6) {
  Eigen::VectorXd fd(theta.size());
  for (Eigen::Index k = 0; k < theta.size(); ++k) {
    Eigen::VectorXd tp = theta, tm = theta;
    tp(k) += h;
    tm(k) -= h;
    fd(k) = (loss(tp, X) - loss(tm, X)) / (2 * h);
  }
  return fd;
}

/// Relative errors of each parameter's gradient in `adapter` against `fd` (in flat layout).
template <class Adapter>
void parameter_errors(Adapter& adapter, const Eigen::VectorXd& fd, std::vector<peft::testing::GradientError>& out) {
  for (const auto& p : adapter.parameters()) {
    const Eigen::Index offset = p.value.data() - adapter.flat_values().data();
    out.push_back({p.name, peft::testing::relative_error(
                               Eigen::Map<const Eigen::VectorXd>(p.grad.data(), p.grad.size()),
                               fd.segment(offset, p.grad.size()))});
  }
}

/// Relative errors of a detached DoRA's dX and parameter gradients (from one forward(X, cache) and
/// backward(R, cache)) against central differences of DetachedLoss, with the norms of that forward.
template <class Adapter, class M>
std::vector<peft::testing::GradientError> detached_gradient_errors(Adapter& dora, const M& W, const Eigen::VectorXd& b,
                                                                  const Eigen::MatrixXd& X, const Eigen::MatrixXd& R) {
  typename Adapter::Cache cache;
  dora.forward(X, cache);
  const Eigen::MatrixXd dX = dora.backward(R, cache);
  const bool dropout = cache.branch.mask.size() != 0;
  const DetachedLoss loss{Eigen::MatrixXd(W), R,
                          dropout ? Eigen::MatrixXd(cache.branch.mask) : Eigen::MatrixXd::Ones(X.rows(), X.cols()), b,
                          cache.n, double(dora.scaling()), dora.rank()};
  const Eigen::VectorXd theta = dora.flat_values();
  const double h = 1e-6;
  Eigen::VectorXd fd_x(X.size());
  for (Eigen::Index k = 0; k < X.size(); ++k) {
    Eigen::MatrixXd xp = X, xm = X;
    xp(k) += h;
    xm(k) -= h;
    fd_x(k) = (loss(theta, xp) - loss(theta, xm)) / (2 * h);
  }
  std::vector<peft::testing::GradientError> out;
  out.push_back({"X", peft::testing::relative_error(Eigen::Map<const Eigen::VectorXd>(dX.data(), dX.size()), fd_x)});
  parameter_errors(dora, fd_theta(loss, theta, X, h), out);
  return out;
}

}  // namespace peft::test::dora
