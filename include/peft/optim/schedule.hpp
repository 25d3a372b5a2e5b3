#pragma once
/// \file schedule.hpp
/// \brief `peft::WarmupCosine`: linear warm-up, then cosine decay, as Hugging Face's
/// get_cosine_schedule_with_warmup (with its optional floor, get_cosine_with_min_lr_schedule_with_warmup).

#include "peft/core/config.hpp"  // first: the detail headers check for it
#include "peft/core/error.hpp"
#include "peft/detail/checks.hpp"

#include <cmath>
#include <cstdint>

namespace peft {

/// \brief The learning rate at step t (the number of optimizer steps taken so far):
///
///     lr(t) = peak · t / warmup                                        for t < warmup
///     lr(t) = min + (peak − min) · ½ (1 + cos(π · (t − warmup) / (total − warmup)))   up to t = total
///     lr(t) = min                                                      after total
///
/// As in Hugging Face's schedule, the first warm-up step (t = 0) has lr 0. Use it from a loop as
/// `opt.set_lr(schedule(opt.step_count())); opt.step();`.
class WarmupCosine {
 public:
  /// \throws ConfigError unless peak_lr is finite and >= 0, 0 <= min_lr <= peak_lr, warmup_steps >= 0
  /// and total_steps > warmup_steps.
  WarmupCosine(double peak_lr, std::int64_t warmup_steps, std::int64_t total_steps, double min_lr = 0.0)
      : peak_(peak_lr), min_(min_lr), warmup_(warmup_steps), total_(total_steps) {
    const detail::Where w{"peft::WarmupCosine", "constructor"};
    detail::check_non_negative(w, "peak_lr", peak_lr);
    if (!(min_lr >= 0.0 && min_lr <= peak_lr))
      detail::raise<ConfigError>(w, "min_lr is ", min_lr, ", expected a value in [0, peak_lr = ", peak_lr, "]");
    detail::check_at_least<std::int64_t>(w, "warmup_steps", warmup_steps, 0);
    if (total_steps <= warmup_steps)
      detail::raise<ConfigError>(w, "total_steps is ", total_steps, ", expected more than warmup_steps = ", warmup_steps);
  }

  /// \returns the learning rate for step t (t < 0 is treated as 0).
  double operator()(std::int64_t t) const {
    if (t < warmup_) return peak_ * static_cast<double>(t < 0 ? 0 : t) / static_cast<double>(warmup_);
    if (t >= total_) return min_;
    const double progress = static_cast<double>(t - warmup_) / static_cast<double>(total_ - warmup_);
    const double pi = 3.14159265358979323846;
    return min_ + (peak_ - min_) * 0.5 * (1.0 + std::cos(pi * progress));
  }

  double peak_lr() const { return peak_; }
  double min_lr() const { return min_; }
  std::int64_t warmup_steps() const { return warmup_; }
  std::int64_t total_steps() const { return total_; }

 private:
  double peak_, min_;
  std::int64_t warmup_, total_;
};

}  // namespace peft
