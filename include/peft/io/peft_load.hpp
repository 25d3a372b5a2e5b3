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

namespace detail {

/// The adapter `Adapter` over W (and *b, when b is not null) with the module's factors, rank and scale.
template <class Adapter, class Config, class MatrixType>
Adapter build_adapter(const PeftConfig& c, const PeftModule<typename MatrixType::Scalar>& m, Eigen::Ref<MatrixType> W,
                      Eigen::Ref<VectorX<typename MatrixType::Scalar>>* b, const char* what) {
  const peft::detail::Where where{"peft::io", what};
  const std::string module = "module \"" + m.path + "\" ";
  peft::detail::check_shape(where, (module + "lora_B").c_str(), m.B.rows(), m.B.cols(), W.rows(), m.A.rows());
  peft::detail::check_shape(where, (module + "lora_A").c_str(), m.A.rows(), m.A.cols(), m.A.rows(), W.cols());
  const Config cfg = config_for<Config>(c, m, what);
  Adapter a = b ? Adapter(W, *b, cfg) : Adapter(W, cfg);
  a.A() = m.A;
  a.B() = m.B;
  return a;
}

template <class MatrixType>
DoRA<MatrixType> dora_with(const PeftConfig& c, const PeftModule<typename MatrixType::Scalar>& m,
                           Eigen::Ref<MatrixType> W, Eigen::Ref<VectorX<typename MatrixType::Scalar>>* b) {
  if (m.magnitude.size() == 0)
    throw ConfigError("peft::io::make_dora: module \"" + m.path + "\" has no magnitude (use make_lora)");
  DoRA<MatrixType> a = build_adapter<DoRA<MatrixType>, DoRAConfig, MatrixType>(c, m, W, b, "make_dora");
  a.magnitude() = m.magnitude;
  return a;
}

}  // namespace detail

/// \brief A LoRA over the user's W (d_out x d_in) and b with the module's factors and scale (the second
/// overload: a layer without a bias).
/// \throws ConfigError for a DoRA module or fan_in_fan_out, ShapeError if W does not fit the factors.
template <class MatrixType>
LoRA<MatrixType> make_lora(const PeftConfig& c, const PeftModule<typename MatrixType::Scalar>& m,
                           Eigen::Ref<MatrixType> W, Eigen::Ref<VectorX<typename MatrixType::Scalar>> b) {
  if (m.magnitude.size() != 0)
    throw ConfigError("peft::io::make_lora: module \"" + m.path + "\" is a DoRA module (use make_dora)");
  return detail::build_adapter<LoRA<MatrixType>, LoRAConfig, MatrixType>(c, m, W, &b, "make_lora");
}
template <class MatrixType>
LoRA<MatrixType> make_lora(const PeftConfig& c, const PeftModule<typename MatrixType::Scalar>& m,
                           Eigen::Ref<MatrixType> W) {
  if (m.magnitude.size() != 0)
    throw ConfigError("peft::io::make_lora: module \"" + m.path + "\" is a DoRA module (use make_dora)");
  return detail::build_adapter<LoRA<MatrixType>, LoRAConfig, MatrixType>(c, m, W, nullptr, "make_lora");
}

/// \brief A DoRA over the user's W (d_out x d_in) and b with the module's factors, magnitude and scale
/// (the second overload: a layer without a bias).
/// \throws ConfigError for a LoRA module or fan_in_fan_out, ShapeError if W does not fit the factors.
template <class MatrixType>
DoRA<MatrixType> make_dora(const PeftConfig& c, const PeftModule<typename MatrixType::Scalar>& m,
                           Eigen::Ref<MatrixType> W, Eigen::Ref<VectorX<typename MatrixType::Scalar>> b) {
  return detail::dora_with<MatrixType>(c, m, W, &b);
}
template <class MatrixType>
DoRA<MatrixType> make_dora(const PeftConfig& c, const PeftModule<typename MatrixType::Scalar>& m,
                           Eigen::Ref<MatrixType> W) {
  return detail::dora_with<MatrixType>(c, m, W, nullptr);
}

}  // namespace io
}  // namespace peft
