#pragma once
/// \file ssf_config.hpp
/// \brief SSF's settings and initial scale and shift, shared by `peft::SSF` (on a linear layer) and
/// `peft::StandaloneSSF` (docs/math.md, SSF).

#include "peft/core/config.hpp"  // first: the detail headers check for it
#include "peft/core/error.hpp"
#include "peft/core/random.hpp"
#include "peft/detail/checks.hpp"

#include <cstdint>

namespace peft {

/// \brief How SSF's scale and shift start.
enum class SSFInit {
  official,  ///< γ ~ N(1, σ²), β ~ N(0, σ²) with σ = `init_std` (0.02), as the official code
  identity,  ///< γ = 1, β = 0: the layer starts exactly equal to the base
};

/// \brief SSF's settings.
struct SSFConfig {
  SSFInit init = SSFInit::official;  ///< initial scale and shift
  double init_std = 0.02;            ///< σ of the official init, >= 0 and finite
  std::uint64_t seed = 0;            ///< seeds the official init
};

namespace detail {

/// Validates an SSFConfig. \throws ConfigError
inline const SSFConfig& check_ssf_config(const Where& where, const SSFConfig& cfg) {
  check_non_negative(where, "init_std", cfg.init_std);
  return cfg;
}

/// Fills γ and β as cfg.init says (γ drawn first, then β).
template <class G, class B>
void init_ssf(const SSFConfig& cfg, G&& gamma, B&& beta) {
  if (cfg.init == SSFInit::identity) {
    gamma.setOnes();
    beta.setZero();
    return;
  }
  Rng rng(cfg.seed);
  rng.fill_normal(gamma, 1.0, cfg.init_std);
  rng.fill_normal(beta, 0.0, cfg.init_std);
}

}  // namespace detail
}  // namespace peft
