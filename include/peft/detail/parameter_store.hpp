#pragma once
/// \file parameter_store.hpp
/// \brief The flat parameter and gradient buffers every trainable piece of the library keeps, and the
/// named views over them (CRTP: the derived class provides `parameter_layout()`).

#include "peft/detail/internal_header_check.hpp"

#include "peft/core/parameter.hpp"
#include "peft/core/types.hpp"

#include <vector>

namespace peft {

/// \brief One flat value buffer and one flat gradient buffer of the same layout, with named views.
///
/// `Derived` provides `parameter_layout()`: a range of ParameterInfo (name, shape, offset). Views are
/// built on demand and never stored, so copies and moves of the owner stay valid. Gradients
/// accumulate until zero_grad().
template <class Derived, class Scalar_>
class ParameterStore {
 public:
  using Scalar = Scalar_;
  using Matrix = MatrixX<Scalar>;
  using Vector = VectorX<Scalar>;

  /// \brief Resets every gradient to zero.
  void zero_grad() { grads_.setZero(); }

  /// \returns named views (value and gradient) of every trainable parameter, in layout order.
  std::vector<Parameter<Scalar>> parameters() {
    std::vector<Parameter<Scalar>> out;
    for (const ParameterInfo& info : self().parameter_layout())
      out.push_back(Parameter<Scalar>{info.name, block(values_, info), block(grads_, info)});
    return out;
  }

  /// \returns read-only named views of every trainable parameter.
  std::vector<ConstParameter<Scalar>> parameters() const {
    std::vector<ConstParameter<Scalar>> out;
    for (const ParameterInfo& info : self().parameter_layout())
      out.push_back(ConstParameter<Scalar>{info.name, block(values_, info), block(grads_, info)});
    return out;
  }

  /// \returns the number of trainable scalars.
  Index num_parameters() const { return values_.size(); }

  /// \returns all parameter values as one flat vector (layout: parameter_layout()), for an optimizer
  /// that updates a whole adapter in one vectorised loop. A map: its size cannot change.
  Eigen::Map<Vector> flat_values() { return Eigen::Map<Vector>(values_.data(), values_.size()); }
  Eigen::Map<const Vector> flat_values() const { return Eigen::Map<const Vector>(values_.data(), values_.size()); }
  /// \returns all gradients as one flat vector, same layout as flat_values().
  Eigen::Map<Vector> flat_grads() { return Eigen::Map<Vector>(grads_.data(), grads_.size()); }
  Eigen::Map<const Vector> flat_grads() const { return Eigen::Map<const Vector>(grads_.data(), grads_.size()); }

 protected:
  /// Allocates `num_values` parameters and as many gradients, all zero.
  explicit ParameterStore(Index num_values) : values_(Vector::Zero(num_values)), grads_(Vector::Zero(num_values)) {}
  ParameterStore(const ParameterStore&) = default;
  ParameterStore(ParameterStore&&) noexcept = default;
  ParameterStore& operator=(const ParameterStore&) = default;
  ParameterStore& operator=(ParameterStore&&) noexcept = default;
  ~ParameterStore() = default;

  /// \returns the value block of a parameter.
  Eigen::Map<Matrix> value(const ParameterInfo& info) { return block(values_, info); }
  Eigen::Map<const Matrix> value(const ParameterInfo& info) const { return block(values_, info); }
  /// \returns the gradient block of a parameter.
  Eigen::Map<Matrix> grad(const ParameterInfo& info) { return block(grads_, info); }

  /// \returns the block of `info` in another buffer of the same layout (e.g. a snapshot of the values).
  static Eigen::Map<Matrix> block(Vector& v, const ParameterInfo& info) {
    return Eigen::Map<Matrix>(v.data() + info.offset, info.rows, info.cols);
  }
  static Eigen::Map<const Matrix> block(const Vector& v, const ParameterInfo& info) {
    return Eigen::Map<const Matrix>(v.data() + info.offset, info.rows, info.cols);
  }

 private:
  const Derived& self() const { return static_cast<const Derived&>(*this); }

  Vector values_;
  Vector grads_;
};

}  // namespace peft
