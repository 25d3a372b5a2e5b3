#pragma once
/// \file lora_config.hpp
/// \brief The settings shared by the LoRA family (LoRA, DoRA, PiSSA): rank, alpha, dropout, rsLoRA,
/// the initial factors and the seed; their validation, the scaling s, and the init (docs/math.md, LoRA).

#include "peft/core/config.hpp"  // first: the detail headers check for it
#include "peft/core/error.hpp"
#include "peft/core/random.hpp"
#include "peft/core/types.hpp"
#include "peft/detail/checks.hpp"

#include <cmath>
#include <cstdint>

namespace peft {

/// \brief How LoRA's factors start (docs/math.md, LoRA).
enum class LoRAInit {
  kaiming_uniform,  ///< A ~ U(-1/sqrt(d_in), 1/sqrt(d_in)) (PyTorch's kaiming-uniform, a = sqrt(5)), B = 0
  gaussian,         ///< A ~ N(0, (1/r)^2), B = 0 (PEFT's init_lora_weights="gaussian")
  random,           ///< A as kaiming_uniform and B ~ U(-1/sqrt(r), 1/sqrt(r)) (PEFT's init_lora_weights=False):
                    ///< not the identity; for tests
};

/// \brief LoRA's settings. Field names follow PEFT's LoraConfig.
struct LoRAConfig {
  Index rank = 8;                            ///< r >= 1 (above min(d_out, d_in) is accepted, as PEFT does)
  double alpha = 8.0;                        ///< lora_alpha, finite and > 0; the scaling is alpha / r
  double dropout = 0.0;                      ///< dropout on the adapter branch's input, in [0, 1)
  bool use_rslora = false;                   ///< scaling alpha / sqrt(r) instead of alpha / r
  LoRAInit init = LoRAInit::kaiming_uniform; ///< initial factors
  std::uint64_t seed = 0;                    ///< seeds the init and then the dropout masks
};

namespace detail {

/// Validates the LoRA fields shared by LoRA, DoRA and PiSSA. \throws ConfigError
inline const LoRAConfig& check_lora_config(const Where& where, const LoRAConfig& cfg) {
  check_at_least<Index>(where, "rank", cfg.rank, 1);
  check_positive(where, "alpha", cfg.alpha);
  check_fraction(where, "dropout", cfg.dropout);
  return cfg;
}

/// \returns s = alpha / r, or alpha / sqrt(r) with rsLoRA.
inline double lora_scaling(const LoRAConfig& cfg) {
  const double r = static_cast<double>(cfg.rank);
  return cfg.use_rslora ? cfg.alpha / std::sqrt(r) : cfg.alpha / r;
}

/// Fills A (r x d_in) and B (d_out x r) as cfg.init says, drawing A first, then B.
template <class AType, class BType>
void init_lora_factors(const LoRAConfig& cfg, Rng& rng, AType&& A, BType&& B) {
  const double bound_a = 1.0 / std::sqrt(static_cast<double>(A.cols()));
  switch (cfg.init) {
    case LoRAInit::gaussian:
      rng.fill_normal(A, 0.0, 1.0 / static_cast<double>(cfg.rank));
      B.setZero();
      break;
    case LoRAInit::random: {
      rng.fill_uniform(A, -bound_a, bound_a);
      const double bound_b = 1.0 / std::sqrt(static_cast<double>(cfg.rank));
      rng.fill_uniform(B, -bound_b, bound_b);
      break;
    }
    case LoRAInit::kaiming_uniform:
    default:
      rng.fill_uniform(A, -bound_a, bound_a);
      B.setZero();
      break;
  }
}

}  // namespace detail
}  // namespace peft
