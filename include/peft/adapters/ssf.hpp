#pragma once
/// \file ssf.hpp
/// \brief SSF on a frozen linear layer: scale and shift of its output features (Lian et al., NeurIPS
/// 2022). For features with no linear layer of their own, StandaloneSSF (standalone_ssf.hpp, included
/// here as well, so that code which found it here before still compiles).

#include "peft/core/config.hpp"  // first: the detail headers check for it
#include "peft/adapters/ssf_config.hpp"
#include "peft/adapters/standalone_ssf.hpp"
#include "peft/core/adapter_base.hpp"
#include "peft/core/error.hpp"
#include "peft/core/parameter.hpp"
#include "peft/core/types.hpp"
#include "peft/detail/exact_restore.hpp"
#include "peft/detail/row_scaling.hpp"

#include <array>

namespace peft {

/// \brief SSF over a frozen linear layer: `Y = diag(γ)(W X + b 1ᵀ) + β 1ᵀ` (docs/math.md, SSF).
///
/// Wraps the user's weight W (d_out x d_in) and optional bias b by reference. Trainable parameters:
/// `ssf_scale` γ and `ssf_shift` β (d_out x 1 each). Gradients: dγ += rowsum(G ⊙ Z), dβ += rowsum(G),
/// dX = Wᵀ diag(γ) G, where Z = W X + b 1ᵀ is kept in the cache.
///
/// merge() re-parameterises the layer: W <- diag(γ) W, b <- γ ⊙ b + β. The layer needs a bias vector to
/// hold β: a layer built without one cannot merge (ShapeError); pass a zero bias
/// (`Eigen::VectorXf b = Eigen::VectorXf::Zero(d_out)`) to the constructor to make room for it. A merge
/// that could not be undone (a scale that is zero or not finite, overflow, a weight pushed out of the
/// normal range, a bias the shift would swamp) is refused before anything is written, naming the feature.
///
/// **Performance.** Forward is the base product plus one pass over Y (the scale, shift and bias are
/// fused); the training forward also keeps Z (d_out x N); backward is the base's input gradient plus two
/// passes over d_out x N. No d_out x d_in temporary. merge() and unmerge() read W a few times for the
/// reversibility check (vectorised row reductions) and scale it in place once.
///
/// **Threads.** forward(X) is const and re-entrant; everything else, one thread at a time.
template <class MatrixType_>
class SSF : public AdapterBase<SSF<MatrixType_>, MatrixType_> {
  using Base = AdapterBase<SSF<MatrixType_>, MatrixType_>;
  friend AdapterAccess;

 public:
  using typename Base::ConstMatrixRef;
  using typename Base::Index;
  using typename Base::Matrix;
  using typename Base::MatrixType;
  using typename Base::Scalar;
  using typename Base::Vector;

  /// \brief What backward needs: Z = W X + b 1ᵀ, and a scratch for diag(γ) G.
  struct Cache : CacheStamp {
    Matrix Z;
    Matrix scaled_grad;
  };

  static constexpr const char* class_name = "peft::SSF";

  /// \brief Wraps W (no bias: the adapter trains, but cannot merge β into the layer).
  /// \throws ConfigError for an invalid config; ShapeError for an empty W
  explicit SSF(Eigen::Ref<MatrixType> W, const SSFConfig& cfg = {}) : SSF(W, nullptr, 0, false, cfg) {}
  /// \brief Wraps W and its bias b (d_out).
  /// \throws ConfigError for an invalid config; ShapeError for an empty W or a bias of the wrong size
  SSF(Eigen::Ref<MatrixType> W, Eigen::Ref<Vector> b, const SSFConfig& cfg = {}) : SSF(W, b.data(), b.size(), true, cfg) {}

  /// \returns the configuration.
  const SSFConfig& config() const { return cfg_; }
  /// \returns ssf_scale γ (d_out x 1), a view into the flat buffer.
  Eigen::Map<Matrix> scale() { return this->value(layout_[0]); }
  Eigen::Map<const Matrix> scale() const { return this->value(layout_[0]); }
  /// \returns ssf_shift β (d_out x 1).
  Eigen::Map<Matrix> shift() { return this->value(layout_[1]); }
  Eigen::Map<const Matrix> shift() const { return this->value(layout_[1]); }

  /// \returns where ssf_scale and ssf_shift live in the flat buffers.
  const std::array<ParameterInfo, 2>& parameter_layout() const { return layout_; }

  /// \returns the change merge makes to b: γ ⊙ b + β − b (β alone without a bias).
  Vector delta_bias() const {
    const auto g = scale().col(0);
    const auto beta = shift().col(0);
    if (!this->has_bias()) return beta;
    const Vector b0 = base_bias();
    return g.cwiseProduct(b0) + beta - b0;
  }

 private:
  SSF(Eigen::Ref<MatrixType> W, Scalar* b, Index b_size, bool has_bias, const SSFConfig& cfg)
      : Base(W, b, b_size, has_bias, 2 * W.rows()),
        cfg_(detail::check_ssf_config(Base::where("constructor"), cfg)),
        layout_{{{"ssf_scale", W.rows(), 1, 0}, {"ssf_shift", W.rows(), 1, W.rows()}}} {
    detail::init_ssf(cfg_, scale(), shift());
  }

  // Y = diag(γ) (W X) + (γ ⊙ b + β) 1ᵀ: one pass over Y after the product.
  void forward_impl(const ConstMatrixRef& X, Matrix& Y) const;
  void forward_train_impl(const ConstMatrixRef& X, Matrix& Y, Cache& cache);
  void check_cache_impl(const Cache& cache) const;
  void backward_impl(const ConstMatrixRef& dY, Cache& cache, Matrix* dX);  // dX null: parameters only

  void require_bias(const char* op) const {
    if (!this->has_bias())
      detail::raise<ShapeError>(this->where(op), "the layer has no bias to hold the shift; construct the SSF with a "
                                                 "bias vector (a zero one, Vector::Zero(d_out), if the layer has none)");
  }

  void merge_impl();
  void unmerge_impl();

  // The base weight: W itself, or W / γ (merge-time γ) while merged.
  MatrixType base_weight() const;
  Vector base_bias() const;

  // dW = diag(γ − 1) W0.
  MatrixType delta_weight_impl() const;

  SSFConfig cfg_;
  std::array<ParameterInfo, 2> layout_;
};

// -------------------------------------------------------------------------------------------------
// SSF's members, out of line (see lora_family.hpp)

template <class MatrixType_>
void SSF<MatrixType_>::forward_impl(const ConstMatrixRef& X, Matrix& Y) const {
  if (this->is_merged()) {
    this->base_product(X, Y);
    return;
  }
  this->base_product(X, Y, false);
  const auto g = scale().col(0);
  Vector offset = shift().col(0);
  if (this->has_bias()) offset += g.cwiseProduct(this->bias());
  Y = (Y.array().colwise() * g.array()).colwise() + offset.array();
}

template <class MatrixType_>
void SSF<MatrixType_>::forward_train_impl(const ConstMatrixRef& X, Matrix& Y, Cache& cache) {
  cache.Z.resize(this->d_out(), X.cols());
  this->base_product(X, cache.Z);
  Y = (cache.Z.array().colwise() * scale().col(0).array()).colwise() + shift().col(0).array();
}

template <class MatrixType_>
void SSF<MatrixType_>::check_cache_impl(const Cache& cache) const {
  if (cache.Z.rows() != this->d_out() || cache.Z.cols() != cache.tokens)
    detail::raise<StateError>(this->where("backward"), "the cache does not fit this adapter (d_out ", this->d_out(),
                              ", N ", cache.tokens, "); fill it with this adapter's forward(X, cache)");
}

template <class MatrixType_>
void SSF<MatrixType_>::backward_impl(const ConstMatrixRef& dY, Cache& cache, Matrix* dX) {
  const auto g = scale().col(0);
  if (dY.cols() > 0) {  // an empty batch adds nothing (and Eigen's row sums would offset a null pointer)
    this->grad(layout_[0]).col(0) += (dY.array() * cache.Z.array()).rowwise().sum().matrix();
    this->grad(layout_[1]).col(0) += dY.rowwise().sum();
  }
  if (dX == nullptr) return;
  cache.scaled_grad.resize(dY.rows(), dY.cols());
  cache.scaled_grad = g.asDiagonal() * dY;
  this->base_input_grad(cache.scaled_grad, *dX);
}

template <class MatrixType_>
void SSF<MatrixType_>::merge_impl() {
  require_bias("merge");
  auto b = this->bias_mut();
  if (!this->exact_restore()) {
    detail::scale_shift_fold(this->where("merge"), this->weight_mut(), b, scale().col(0), shift().col(0));
    return;
  }
  const auto g = scale().col(0);
  const auto [view, u] = detail::scaling_tiles(this->weight_mut(), g.data(), false);
  detail::VectorRecord<Scalar> bias{b, detail::scale_shift_fold_check<Scalar>(this->where("merge"), kernels::as_const(view),
                                                                             u.transposed, b, g, shift().col(0))};
  detail::exact_merge<Scalar>(this->where("merge"), view, u, this->restore_record());
  b = bias.after;
  this->vector_record(0) = std::move(bias);
}

template <class MatrixType_>
void SSF<MatrixType_>::unmerge_impl() {
  auto b = this->bias_mut();
  const auto g = this->applied_value(layout_[0]).col(0);
  const auto beta = this->applied_value(layout_[1]).col(0);
  if (this->restore_record().empty()) {
    detail::scale_shift_unfold(this->where("unmerge"), this->weight_mut(), b, g, beta);
    return;
  }
  const detail::VectorRecord<Scalar>& bias = this->vector_record(0);
  const bool bias_exact = bias.unchanged(b);
  Vector new_b = bias_exact ? bias.before : Vector((b - beta).cwiseQuotient(g));
  detail::check_finite_vector<Scalar>(this->where("unmerge"), "b", new_b);
  const auto [view, u] = detail::scaling_tiles(this->weight_mut(), g.data(), false);
  const bool exact = detail::exact_unmerge<Scalar>(this->where("unmerge"), view, u, this->restore_record());
  b = new_b;
  this->note_restore(exact && bias_exact);
}

template <class MatrixType_>
auto SSF<MatrixType_>::base_weight() const -> MatrixType {
  MatrixType W0 = this->weight();
  if (!this->is_merged()) return W0;
  const auto g = this->applied_value(layout_[0]).col(0);
  if (this->restore_record().empty()) {
    W0.array().colwise() /= g.array();
  } else {  // W0 bit for bit, from the record
    const auto [view, u] = detail::scaling_tiles(W0, g.data(), false);
    detail::exact_unmerge<Scalar>(this->where("base_weight"), view, u, this->restore_record());
  }
  return W0;
}

template <class MatrixType_>
auto SSF<MatrixType_>::base_bias() const -> Vector {
  Vector b0 = this->bias();
  if (!this->is_merged()) return b0;
  if (!this->restore_record().empty() && this->vector_record(0).unchanged(b0)) return this->vector_record(0).before;
  return (b0 - this->applied_value(layout_[1]).col(0)).cwiseQuotient(this->applied_value(layout_[0]).col(0));
}

template <class MatrixType_>
auto SSF<MatrixType_>::delta_weight_impl() const -> MatrixType {
  MatrixType dW = base_weight();
  dW.array().colwise() *= (scale().col(0).array() - Scalar(1));
  return dW;
}

#ifdef PEFT_COMPILED
// The compiled part (peft::compiled) instantiates these once, for the four weight types; a translation
// unit built with it instantiates none of their out-of-line members (kernels.hpp says more).
#define PEFT_EXTERN_SSF(M) extern template class SSF<M>;
PEFT_EXTERN_SSF(Eigen::MatrixXf)
PEFT_EXTERN_SSF(Eigen::MatrixXd)
PEFT_EXTERN_SSF(RowMajorMatrixXf)
PEFT_EXTERN_SSF(RowMajorMatrixXd)
#undef PEFT_EXTERN_SSF
#endif

}  // namespace peft
