#pragma once
/// \file adamw.hpp
/// \brief `peft::AdamW`: Adam with decoupled weight decay and bias correction, step for step as
/// `torch.optim.AdamW`.

#include "peft/core/config.hpp"  // first: the detail headers check for it
#include "peft/detail/checks.hpp"
#include "peft/optim/optimizer.hpp"

#include <array>
#include <cmath>

namespace peft {

/// \brief AdamW's hyper-parameters; the defaults are torch.optim.AdamW's.
struct AdamWConfig {
  double lr = 1e-3;            ///< learning rate, finite and >= 0
  double beta1 = 0.9;          ///< first-moment decay in [0, 1)
  double beta2 = 0.999;        ///< second-moment decay in [0, 1)
  double eps = 1e-8;           ///< added to the denominator, finite and > 0
  double weight_decay = 1e-2;  ///< decoupled decay lambda >= 0 (slots registered without it are exempt)
};

/// \brief AdamW (Loshchilov & Hutter, 2019), as torch.optim.AdamW. For each registered parameter p with
/// gradient g, learning rate lr (times the slot's lr_scale) and t its step number:
///
///     p ← p (1 − lr λ)                         (if weight decay applies to the slot)
///     m ← β1 m + (1 − β1) g,    v ← β2 v + (1 − β2) g²
///     p ← p − lr / (1 − β1ᵗ) · m / (√v / √(1 − β2ᵗ) + ε)
///
/// \tparam Scalar_ float or double, the parameters' scalar type.
/// Two flat state buffers (m and v, PyTorch's exp_avg and exp_avg_sq), laid out as the registered
/// slots. Not thread-safe: one optimizer per training loop. Gradients are read, never modified.
template <class Scalar_>
class AdamW : public OptimizerBase<AdamW<Scalar_>, Scalar_> {
  using Base = OptimizerBase<AdamW<Scalar_>, Scalar_>;
  friend Base;

 public:
  using Scalar = Scalar_;
  using Vector = typename Base::Vector;
  static constexpr const char* class_name = "peft::AdamW";
  /// The state buffers, named as PyTorch names them in its state_dict.
  static constexpr std::array<const char*, 2> state_names{{"exp_avg", "exp_avg_sq"}};

  /// \throws ConfigError for lr < 0 or not finite, a beta outside [0, 1), eps <= 0 or not finite,
  /// weight_decay < 0 or not finite.
  explicit AdamW(const AdamWConfig& cfg = AdamWConfig()) : Base(check(cfg).lr, 2), cfg_(cfg) {}

  /// \returns the configuration (its lr is the initial one; see lr() for the current).
  const AdamWConfig& config() const { return cfg_; }

  /// \returns the first moment m of the i-th registered slot.
  Eigen::Map<const Vector> exp_avg(std::size_t i) const { return this->state(0, i); }
  /// \returns the second moment v of the i-th registered slot.
  Eigen::Map<const Vector> exp_avg_sq(std::size_t i) const { return this->state(1, i); }

 private:
  static const AdamWConfig& check(const AdamWConfig& c) {
    const detail::Where w{class_name, "constructor"};
    Base::check_lr(w, c.lr);
    detail::check_fraction(w, "beta1", c.beta1);
    detail::check_fraction(w, "beta2", c.beta2);
    detail::check_positive(w, "eps", c.eps);
    detail::check_non_negative(w, "weight_decay", c.weight_decay);
    return c;
  }

  void update_slot(const OptimizerSlot& slot, Eigen::Map<Vector> p, Eigen::Map<const Vector> g, double lr);

  AdamWConfig cfg_;
};

// -------------------------------------------------------------------------------------------------
// AdamW's update, out of line (the compiled part instantiates it once)

template <class Scalar_>
void AdamW<Scalar_>::update_slot(const OptimizerSlot& slot, Eigen::Map<Vector> p, Eigen::Map<const Vector> g, double lr) {
  if (slot.weight_decay && cfg_.weight_decay != 0.0)
    p *= static_cast<Scalar>(1.0 - lr * cfg_.weight_decay);
  Eigen::Map<Vector> m = this->state(0, slot);
  Eigen::Map<Vector> v = this->state(1, slot);
  const Scalar b1 = static_cast<Scalar>(cfg_.beta1), b2 = static_cast<Scalar>(cfg_.beta2);
  // The operations and their order are PyTorch's (exp_avg.lerp_, exp_avg_sq.mul_.addcmul_, sqrt / sqrt(bc2)
  // + eps, addcdiv_), so a float run rounds as torch.optim.AdamW's single-tensor path does.
  m.array() += (Scalar(1) - b1) * (g.array() - m.array());
  v.array() = v.array() * b2 + (Scalar(1) - b2) * g.array().square();
  const double t = static_cast<double>(slot.steps);
  const double bias1 = 1.0 - std::pow(cfg_.beta1, t);
  const double bias2 = 1.0 - std::pow(cfg_.beta2, t);
  const Scalar step_size = static_cast<Scalar>(lr / bias1);
  const Scalar sqrt_bias2 = static_cast<Scalar>(std::sqrt(bias2));
  const Scalar eps = static_cast<Scalar>(cfg_.eps);
  p.array() -= step_size * (m.array() / (v.array().sqrt() / sqrt_bias2 + eps));
}

#ifdef PEFT_COMPILED
// Instantiated once in the compiled part (peft::compiled): see detail/kernels.hpp.
extern template class OptimizerBase<AdamW<float>, float>;
extern template class AdamW<float>;
extern template class OptimizerBase<AdamW<double>, double>;
extern template class AdamW<double>;
#endif

}  // namespace peft
