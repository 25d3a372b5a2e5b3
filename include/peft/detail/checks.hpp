#pragma once
/// \file checks.hpp
/// \brief The range checks of configuration values, written once: each throws ConfigError with the
/// message "<where>: <name> is <value>, expected <range>" and otherwise returns the value, so that it
/// can be used in a constructor's initialiser list.

#include "peft/detail/internal_header_check.hpp"

#include "peft/core/error.hpp"

#include <cmath>

namespace peft {
namespace detail {

/// \returns v. \throws ConfigError unless v is finite and > 0.
inline double check_positive(const Where& where, const char* name, double v) {
  if (!(std::isfinite(v) && v > 0.0)) raise<ConfigError>(where, name, " is ", v, ", expected a finite value > 0");
  return v;
}

/// \returns v. \throws ConfigError unless v is finite and >= 0.
inline double check_non_negative(const Where& where, const char* name, double v) {
  if (!(std::isfinite(v) && v >= 0.0)) raise<ConfigError>(where, name, " is ", v, ", expected a finite value >= 0");
  return v;
}

/// \returns v. \throws ConfigError unless 0 <= v < 1 (a probability of dropping, a decay rate).
inline double check_fraction(const Where& where, const char* name, double v) {
  if (!(v >= 0.0 && v < 1.0)) raise<ConfigError>(where, name, " is ", v, ", expected a value in [0, 1)");
  return v;
}

/// \returns v. \throws ConfigError unless 0 <= v <= 1.
inline double check_unit_interval(const Where& where, const char* name, double v) {
  if (!(v >= 0.0 && v <= 1.0)) raise<ConfigError>(where, name, " is ", v, ", expected a value in [0, 1]");
  return v;
}

/// \returns v. \throws ConfigError unless v >= least (integers: ranks, counts, steps).
template <class I>
I check_at_least(const Where& where, const char* name, I v, I least) {
  if (v < least) raise<ConfigError>(where, name, " is ", v, ", expected >= ", least);
  return v;
}

}  // namespace detail
}  // namespace peft
