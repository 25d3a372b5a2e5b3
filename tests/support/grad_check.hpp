#pragma once
// The gradient checker, written once against the training contract (peft::is_trainable_v): the loss is
// L = <R, adapter.forward(X, cache)> for a fixed random R, so dL/dY = R. The analytic gradients come
// from backward(R, cache); the numerical ones from central differences of L, in double, for every
// entry of X and of every parameter. Each evaluation runs on a fresh copy of the adapter, so the
// dropout stream (part of the copy) replays the same mask.
#include <peft/core/traits.hpp>

#include <Eigen/Core>

#include <cmath>
#include <string>
#include <type_traits>
#include <vector>

namespace peft::test {

struct GradientError {
  std::string name;  // "X" or a parameter's name
  double relative;   // ||g - g_fd|| / (||g|| + ||g_fd||), 0 when both vanish
};

inline double relative_error(const Eigen::VectorXd& g, const Eigen::VectorXd& g_fd) {
  const double denom = g.norm() + g_fd.norm();
  return denom == 0.0 ? 0.0 : (g - g_fd).norm() / denom;
}

/// L = <R, adapter.forward(X, cache)> evaluated on a copy of `adapter` (so the copy's dropout stream
/// starts where the original's does). `edit` may change the copy first.
template <class Adapter, class Edit>
double loss_on_copy(const Adapter& adapter, const typename Adapter::Matrix& X, const typename Adapter::Matrix& R,
                    Edit edit) {
  Adapter copy = adapter;
  edit(copy);
  typename Adapter::Cache cache;
  return R.cwiseProduct(copy.forward(X, cache)).sum();
}

/// Checks dL/dX and dL/dθ of a double adapter against central differences with step h.
/// \returns one entry for X and one per parameter
template <class Adapter>
std::vector<GradientError> check_gradients(const Adapter& adapter, const typename Adapter::Matrix& X,
                                           const typename Adapter::Matrix& R, double h = 1e-6) {
  static_assert(peft::is_trainable_v<Adapter>, "check_gradients needs a trainable type (peft::is_trainable_v)");
  static_assert(std::is_same<typename Adapter::Scalar, double>::value, "finite differences run in double");
  using Matrix = typename Adapter::Matrix;

  Adapter analytic = adapter;
  typename Adapter::Cache cache;
  analytic.forward(X, cache);
  analytic.zero_grad();
  const Matrix dX = analytic.backward(R, cache);

  std::vector<GradientError> out;
  Eigen::VectorXd fd_x(X.size());
  for (Eigen::Index k = 0; k < X.size(); ++k) {
    Matrix Xp = X, Xm = X;
    Xp(k) += h;
    Xm(k) -= h;
    const auto nothing = [](Adapter&) {};
    fd_x(k) = (loss_on_copy(adapter, Xp, R, nothing) - loss_on_copy(adapter, Xm, R, nothing)) / (2 * h);
  }
  out.push_back({"X", relative_error(Eigen::Map<const Eigen::VectorXd>(dX.data(), dX.size()), fd_x)});

  for (const auto& p : analytic.parameters()) {
    const Eigen::Index offset = p.value.data() - analytic.flat_values().data();
    Eigen::VectorXd fd(p.value.size());
    for (Eigen::Index k = 0; k < p.value.size(); ++k) {
      const auto shift = [&](double delta) {
        return [=](Adapter& a) { a.flat_values()(offset + k) += delta; };
      };
      fd(k) = (loss_on_copy(adapter, X, R, shift(h)) - loss_on_copy(adapter, X, R, shift(-h))) / (2 * h);
    }
    out.push_back({p.name, relative_error(Eigen::Map<const Eigen::VectorXd>(p.grad.data(), p.grad.size()), fd)});
  }
  return out;
}

}  // namespace peft::test
