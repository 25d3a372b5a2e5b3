#pragma once
/// \file parameter.hpp
/// \brief Named views of an adapter's trainable parameters and their gradients.
///
/// An adapter keeps all its parameters in one flat value buffer and all gradients in one flat gradient
/// buffer of the same layout. `parameters()` returns views built on demand: an `Eigen::Map` of the
/// value block and one of the gradient block, both column-major. Views are never stored inside the
/// adapter, so copying or moving an adapter is safe; a view itself is valid until the adapter it came
/// from is destroyed, moved from or assigned to.

#include "peft/core/types.hpp"

#include <type_traits>

namespace peft {

/// \brief Where one named parameter lives in an adapter's flat buffers.
struct ParameterInfo {
  const char* name;  ///< PEFT's name: "lora_A", "lora_B", "lora_magnitude_vector", "ssf_scale", ...
  Index rows;        ///< rows of the parameter matrix (a vector is rows x 1)
  Index cols;        ///< columns
  Index offset;      ///< first element in the flat buffers; the block is column-major

  /// \returns rows * cols.
  Index size() const { return rows * cols; }
};

/// \brief A named parameter: its value and its gradient, as column-major maps into the adapter's
/// flat buffers. `Const` selects read-only maps (from a const adapter).
template <class Scalar_, bool Const = false>
struct BasicParameter {
  using Scalar = Scalar_;
  using Map = Eigen::Map<std::conditional_t<Const, const MatrixX<Scalar>, MatrixX<Scalar>>>;

  const char* name;  ///< as ParameterInfo::name
  Map value;         ///< the parameter; writing through it changes the adapter
  Map grad;          ///< its accumulated gradient, same shape

  /// Copies are fine; assignment is not: assigning Maps copies the values they view rather than
  /// rebinding them, so sorting or reordering a vector of parameters would silently mix their values.
  BasicParameter(const BasicParameter&) = default;
  BasicParameter& operator=(const BasicParameter&) = delete;
};

/// \brief A writable parameter view: `p.value -= lr * p.grad` updates the adapter.
template <class Scalar>
using Parameter = BasicParameter<Scalar, false>;

/// \brief A read-only parameter view.
template <class Scalar>
using ConstParameter = BasicParameter<Scalar, true>;

}  // namespace peft
