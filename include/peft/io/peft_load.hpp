#pragma once
/// \file peft_load.hpp
/// \brief The library's adapters built from a PEFT adapter directory (peft_adapter.hpp) over the user's
/// weights, to run, train further, or merge: `LoRA` or `DoRA`, as the directory's config says, with the
/// file's factors (and magnitude), rank and scale. Needs nlohmann-json (CMake target `peft::io`).

#include "peft/adapters/dora.hpp"
#include "peft/adapters/lora.hpp"
#include "peft/io/peft_adapter.hpp"

#include <string>

namespace peft {
namespace io {

namespace detail {

template <class Config, class S>
Config config_for(const PeftConfig& c, const PeftModule<S>& m, const char* what) {
  if (c.fan_in_fan_out)
    throw ConfigError(std::string("peft::io::") + what + ": module \"" + m.path +
                      "\" is fan_in_fan_out (its weight is d_in x d_out): pass the transposed weight as a "
                      "d_out x d_in matrix, or merge with peft::merge, which takes the stored layout");
  Config cfg;
  cfg.rank = m.A.rows();
  cfg.alpha = c.alpha_for(m.path);
  cfg.use_rslora = c.use_rslora;
  return cfg;
}

}  // namespace detail

/// \brief A LoRA over the user's W (d_out x d_in) and b with the module's factors and scale.
/// \throws ConfigError for a DoRA module or fan_in_fan_out, ShapeError if W does not fit the factors.
template <class MatrixType>
LoRA<MatrixType> make_lora(const PeftConfig& c, const PeftModule<typename MatrixType::Scalar>& m,
                           Eigen::Ref<MatrixType> W, Eigen::Ref<VectorX<typename MatrixType::Scalar>> b) {
  if (m.magnitude.size() != 0)
    throw ConfigError("peft::io::make_lora: module \"" + m.path + "\" is a DoRA module (use make_dora)");
  LoRA<MatrixType> lora(W, b, detail::config_for<LoRAConfig>(c, m, "make_lora"));
  peft::detail::check_shape(peft::detail::Where{"peft::io", "make_lora"}, "lora_B", m.B.rows(), m.B.cols(), W.rows(), m.A.rows());
  peft::detail::check_shape(peft::detail::Where{"peft::io", "make_lora"}, "lora_A", m.A.rows(), m.A.cols(), m.A.rows(), W.cols());
  lora.A() = m.A;
  lora.B() = m.B;
  return lora;
}

/// \brief A DoRA over the user's W (d_out x d_in) and b with the module's factors, magnitude and scale.
/// \throws ConfigError for a LoRA module or fan_in_fan_out, ShapeError if W does not fit the factors.
template <class MatrixType>
DoRA<MatrixType> make_dora(const PeftConfig& c, const PeftModule<typename MatrixType::Scalar>& m,
                           Eigen::Ref<MatrixType> W, Eigen::Ref<VectorX<typename MatrixType::Scalar>> b) {
  if (m.magnitude.size() == 0)
    throw ConfigError("peft::io::make_dora: module \"" + m.path + "\" has no magnitude (use make_lora)");
  peft::detail::check_shape(peft::detail::Where{"peft::io", "make_dora"}, "lora_B", m.B.rows(), m.B.cols(), W.rows(), m.A.rows());
  peft::detail::check_shape(peft::detail::Where{"peft::io", "make_dora"}, "lora_A", m.A.rows(), m.A.cols(), m.A.rows(), W.cols());
  DoRA<MatrixType> dora(W, b, detail::config_for<DoRAConfig>(c, m, "make_dora"));
  dora.A() = m.A;
  dora.B() = m.B;
  dora.magnitude() = m.magnitude;
  return dora;
}

}  // namespace io
}  // namespace peft
