#pragma once
/// \file grad_check.hpp
/// \brief The gradient checker the library's own tests use, for adapters you write yourself
/// (docs/extending.md): every analytic gradient of a trainable type against central finite
/// differences, in double.
///
/// The loss is `L = <R, forward(X, cache)>` for a fixed R, so dL/dY = R. The analytic gradients come
/// from one `backward(R, cache)`; the numerical ones from central differences of L for every entry of X
/// and of every parameter. Each evaluation runs on a fresh copy of the adapter, so a dropout stream
/// (part of the copy) replays the same mask. Cost: 2 (size(X) + num_parameters()) training forwards:
/// keep the shapes small (tens of rows and columns).
///
/// \code
/// #include <peft/testing/grad_check.hpp>
/// for (const auto& e : peft::testing::check_gradients(adapter, X, R))
///   if (e.relative > 1e-6) std::printf("d%s is wrong: relative error %g\n", e.name.c_str(), e.relative);
/// \endcode

#include "peft/core/traits.hpp"

#include <Eigen/Core>

#include <string>
#include <type_traits>
#include <vector>

namespace peft {
namespace testing {

/// \brief How far one analytic gradient is from its finite-difference estimate.
struct GradientError {
  std::string name;  ///< "X" or a parameter's name ("lora_A", ...)
  double relative;   ///< ||g - g_fd|| / (||g|| + ||g_fd||); 0 when both vanish
};

/// \returns ||g - g_fd|| / (||g|| + ||g_fd||), 0 when both vanish: below 1e-6 for a correct gradient
/// of a smooth function in double with the default step, near 1 for a wrong one.
inline double relative_error(const Eigen::VectorXd& g, const Eigen::VectorXd& g_fd) {
  const double denom = g.norm() + g_fd.norm();
  return denom == 0.0 ? 0.0 : (g - g_fd).norm() / denom;
}

/// \returns L = <R, copy.forward(X, cache)> on a copy of `adapter` (so the copy's dropout stream starts
/// where the original's does), after `edit(copy)` has changed the copy.
template <class Adapter, class Edit>
double loss_on_copy(const Adapter& adapter, const typename Adapter::Matrix& X, const typename Adapter::Matrix& R,
                    Edit edit) {
  Adapter copy = adapter;
  edit(copy);
  typename Adapter::Cache cache;
  return R.cwiseProduct(copy.forward(X, cache)).sum();
}

/// \brief Checks dL/dX and dL/dθ of a double-precision trainable object against central differences
/// with step h.
/// \param adapter left unchanged (the checks run on copies)
/// \param X the input, input_size() x N
/// \param R the upstream gradient dL/dY, output_size() x N
/// \returns one entry for X, then one per parameter in parameters() order
template <class Adapter>
std::vector<GradientError> check_gradients(const Adapter& adapter, const typename Adapter::Matrix& X,
                                           const typename Adapter::Matrix& R, double h = 1e-6) {
  static_assert(is_trainable_v<Adapter>, "check_gradients needs a trainable type (peft::is_trainable_v)");
  static_assert(std::is_same<typename Adapter::Scalar, double>::value, "finite differences run in double");
  using Matrix = typename Adapter::Matrix;

  Adapter analytic = adapter;
  typename Adapter::Cache cache;
  analytic.forward(X, cache);
  analytic.zero_grad();
  const Matrix dX = analytic.backward(R, cache);

  std::vector<GradientError> out;
  Eigen::VectorXd fd_x(X.size());
  const auto nothing = [](Adapter&) {};
  for (Eigen::Index k = 0; k < X.size(); ++k) {
    Matrix Xp = X, Xm = X;
    Xp(k) += h;
    Xm(k) -= h;
    fd_x(k) = (loss_on_copy(adapter, Xp, R, nothing) - loss_on_copy(adapter, Xm, R, nothing)) / (2 * h);
  }
  out.push_back({"X", relative_error(Eigen::Map<const Eigen::VectorXd>(dX.data(), dX.size()), fd_x)});

  for (const auto& p : analytic.parameters()) {
    const Eigen::Index offset = p.value.data() - analytic.flat_values().data();
    Eigen::VectorXd fd(p.value.size());
    for (Eigen::Index k = 0; k < p.value.size(); ++k) {
      const auto shift = [&](double delta) { return [=](Adapter& a) { a.flat_values()(offset + k) += delta; }; };
      fd(k) = (loss_on_copy(adapter, X, R, shift(h)) - loss_on_copy(adapter, X, R, shift(-h))) / (2 * h);
    }
    out.push_back({p.name, relative_error(Eigen::Map<const Eigen::VectorXd>(p.grad.data(), p.grad.size()), fd)});
  }
  return out;
}

}  // namespace testing
}  // namespace peft
