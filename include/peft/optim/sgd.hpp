#pragma once
/// \file sgd.hpp
/// \brief `peft::SGD`: stochastic gradient descent with momentum, dampening, Nesterov momentum and
/// (coupled) weight decay, step for step as `torch.optim.SGD`.

#include "peft/core/config.hpp"  // first: the detail headers check for it
#include "peft/detail/checks.hpp"
#include "peft/optim/optimizer.hpp"

#include <array>
#include <cmath>

namespace peft {

/// \brief SGD's hyper-parameters; the defaults are torch.optim.SGD's (with lr 1e-2).
struct SGDConfig {
  double lr = 1e-2;            ///< learning rate, finite and >= 0
  double momentum = 0.0;       ///< mu in [0, 1)
  double dampening = 0.0;      ///< tau in [0, 1]
  double weight_decay = 0.0;   ///< lambda >= 0, added to the gradient (L2, not decoupled)
  bool nesterov = false;       ///< Nesterov momentum; needs momentum > 0 and dampening = 0
};

/// \brief Stochastic gradient descent, as torch.optim.SGD. For each registered parameter p with
/// gradient g, learning rate lr (times the slot's lr_scale) and t its step number:
///
///     g ← g + λ p                         (if weight decay applies to the slot)
///     b ← g                   at t = 1,   b ← μ b + (1 − τ) g   after      (if μ > 0)
///     g ← g + μ b  (Nesterov)   or   g ← b
///     p ← p − lr g
///
/// \tparam Scalar_ float or double, the parameters' scalar type.
/// One flat state buffer (the momentum b), laid out as the registered slots. Not thread-safe: one
/// optimizer per training loop. Gradients are read, never modified by step().
template <class Scalar_>
class SGD : public OptimizerBase<SGD<Scalar_>, Scalar_> {
  using Base = OptimizerBase<SGD<Scalar_>, Scalar_>;
  friend Base;

 public:
  using Scalar = Scalar_;
  using Vector = typename Base::Vector;
  static constexpr const char* class_name = "peft::SGD";
  /// The state buffers, named as PyTorch names them in its state_dict.
  static constexpr std::array<const char*, 1> state_names{{"momentum_buffer"}};

  /// \throws ConfigError for lr < 0 or not finite, momentum outside [0, 1), dampening outside [0, 1],
  /// weight_decay < 0 or not finite, or nesterov without momentum or with dampening.
  explicit SGD(const SGDConfig& cfg = SGDConfig()) : Base(check(cfg).lr, 1), cfg_(cfg) {}

  /// \returns the configuration (its lr is the initial one; see lr() for the current).
  const SGDConfig& config() const { return cfg_; }

  /// \returns the momentum buffer of the i-th registered slot (zero before its first step).
  Eigen::Map<const Vector> momentum_buffer(std::size_t i) const { return this->state(0, i); }

 private:
  static const SGDConfig& check(const SGDConfig& c) {
    const detail::Where w{class_name, "constructor"};
    Base::check_lr(w, c.lr);
    detail::check_fraction(w, "momentum", c.momentum);
    detail::check_unit_interval(w, "dampening", c.dampening);
    detail::check_non_negative(w, "weight_decay", c.weight_decay);
    if (c.nesterov && !(c.momentum > 0.0 && c.dampening == 0.0))
      detail::raise<ConfigError>(w, "nesterov needs momentum > 0 and dampening = 0 (momentum is ", c.momentum,
                                 ", dampening ", c.dampening, ")");
    return c;
  }

  void update_slot(const OptimizerSlot& slot, Eigen::Map<Vector> p, Eigen::Map<const Vector> grad, double lr_d);

  SGDConfig cfg_;
};

// -------------------------------------------------------------------------------------------------
// SGD's update, out of line (the compiled part instantiates it once)

template <class Scalar_>
void SGD<Scalar_>::update_slot(const OptimizerSlot& slot, Eigen::Map<Vector> p, Eigen::Map<const Vector> grad, double lr_d) {
  const Scalar lr = static_cast<Scalar>(lr_d);
  const Scalar decay = slot.weight_decay ? static_cast<Scalar>(cfg_.weight_decay) : Scalar(0);
  const Scalar mu = static_cast<Scalar>(cfg_.momentum);
  auto g = (grad.array() + decay * p.array());
  if (cfg_.momentum == 0.0) {
    p.array() -= lr * g;
    return;
  }
  Eigen::Map<Vector> b = this->state(0, slot);
  if (slot.steps == 1)
    b.array() = g;
  else
    b.array() = mu * b.array() + static_cast<Scalar>(1.0 - cfg_.dampening) * g;
  if (cfg_.nesterov)
    p.array() -= lr * (g + mu * b.array());
  else
    p.array() -= lr * b.array();
}

#ifdef PEFT_COMPILED
// Instantiated once in the compiled part (peft::compiled): see detail/kernels.hpp.
extern template class OptimizerBase<SGD<float>, float>;
extern template class SGD<float>;
extern template class OptimizerBase<SGD<double>, double>;
extern template class SGD<double>;
#endif

}  // namespace peft
