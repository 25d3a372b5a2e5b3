#pragma once
/// \file standalone_ssf.hpp
/// \brief SSF on features that have no linear layer of their own (after a LayerNorm without affine
/// parameters, a residual sum, an activation), foldable into a neighbouring layer for deployment.

#include "peft/core/config.hpp"  // first: the detail headers check for it
#include "peft/adapters/ssf_config.hpp"
#include "peft/core/error.hpp"
#include "peft/core/parameter.hpp"
#include "peft/core/trainable_base.hpp"
#include "peft/core/types.hpp"
#include "peft/detail/exact_restore.hpp"
#include "peft/detail/kernels.hpp"
#include "peft/detail/row_scaling.hpp"

#include <array>
#include <type_traits>
#include <utility>

namespace peft {

/// \brief SSF on features with no linear layer of their own: `Y = diag(γ) X + β 1ᵀ` (docs/math.md,
/// SSF, standalone), with folding into the next linear layer or a preceding LayerNorm for deployment.
///
/// Parameters `ssf_scale` γ and `ssf_shift` β (d x 1), in one flat buffer. Backward:
/// dγ += rowsum(G ⊙ X), dβ += rowsum(G), dX = diag(γ) G. The training contract (forward, forward_into,
/// backward, backward_into, the cache checks) is TrainableBase's, as for the adapters.
///
/// Folding moves the scale and shift into neighbouring weights so inference skips this op entirely;
/// valid only when nothing non-linear lies between (see docs/concepts.md, SSF):
/// - fold_into_next(W1, b1): the next linear layer Y1 = W1 Y + b1 becomes W1 diag(γ), b1 + W1 β;
/// - fold_into_layer_norm(w, b): a preceding LayerNorm's affine w ⊙ x̂ + b becomes γ ⊙ w, γ ⊙ b + β.
/// While folded, forward(X) returns X unchanged (the op now lives in the neighbour), training is
/// refused, and unfold_*() must be given the same matrices. Each fold checks before it writes.
///
/// **Performance.** Forward and backward are one pass over d x N each (plus the copy of X the training
/// forward keeps). A fold into the next layer reads W1 a few times for the check, scales it once and
/// computes W1 β (one matrix x vector product); a fold into a LayerNorm costs O(d).
template <class Scalar_>
class StandaloneSSF : public TrainableBase<StandaloneSSF<Scalar_>, Scalar_> {
  static_assert(std::is_same<Scalar_, float>::value || std::is_same<Scalar_, double>::value,
                "peft: StandaloneSSF's Scalar must be float or double");
  using Base = TrainableBase<StandaloneSSF<Scalar_>, Scalar_>;
  friend AdapterAccess;

 public:
  using typename Base::ConstMatrixRef;
  using typename Base::Index;
  using typename Base::Matrix;
  using typename Base::Scalar;
  using typename Base::Vector;

  /// \brief What backward needs: a copy of X.
  struct Cache : CacheStamp {
    Matrix X;
  };

  static constexpr const char* class_name = "peft::StandaloneSSF";
  static constexpr const char* applied_state = "folded";
  static constexpr const char* undo_call = "unfold_from_next() or unfold_from_layer_norm()";

  /// \brief d features. \throws ShapeError for d < 1; ConfigError for a bad init_std
  explicit StandaloneSSF(Index features, const SSFConfig& cfg = {})
      : Base(checked_features(features) * 2),
        cfg_(detail::check_ssf_config(Base::where("constructor"), cfg)),
        layout_{{{"ssf_scale", features, 1, 0}, {"ssf_shift", features, 1, features}}} {
    detail::init_ssf(cfg_, scale(), shift());
  }

  /// \returns d, the number of features.
  Index features() const { return layout_[0].rows; }
  /// \returns d: the rows of X and of Y (TrainableBase's contract).
  Index input_size() const { return features(); }
  Index output_size() const { return features(); }
  /// \returns the configuration.
  const SSFConfig& config() const { return cfg_; }
  /// \returns ssf_scale γ (d x 1), a view into the flat buffer.
  Eigen::Map<Matrix> scale() { return this->value(layout_[0]); }
  Eigen::Map<const Matrix> scale() const { return this->value(layout_[0]); }
  /// \returns ssf_shift β (d x 1).
  Eigen::Map<Matrix> shift() { return this->value(layout_[1]); }
  Eigen::Map<const Matrix> shift() const { return this->value(layout_[1]); }
  /// \returns where ssf_scale and ssf_shift live in the flat buffers.
  const std::array<ParameterInfo, 2>& parameter_layout() const { return layout_; }

  /// \returns whether the scale and shift currently live in a neighbouring layer.
  bool is_folded() const { return this->applied(); }

  /// \brief Folds into the next linear layer: W1 <- W1 diag(γ), b1 <- b1 + W1 β (with the old W1).
  /// \param W1 d_next x d: a writable dense Eigen matrix, map or block (either storage order); a const
  ///        matrix is a compile error
  /// \param b1 d_next; the layer needs a bias to hold W1 β (pass a zero one if it has none)
  /// \throws StateError if folded; ShapeError for shapes; NumericalError if the fold could not be
  ///         undone or would write a non-finite value (nothing is written then)
  template <class W1Type>
  void fold_into_next(W1Type&& W1, Eigen::Ref<Vector> b1) {
    static_assert_writable<W1Type>();
    const auto w = Base::where("fold_into_next");
    this->require_applied(false, "fold_into_next");
    check_target(w, "W1", W1.cols(), W1.rows(), b1.size());
    const auto g = scale().col(0);
    detail::check_reversible_row_scaling(w, "W1ᵀ", W1.transpose(), g);  // W1's columns are the features
    Vector new_b1 = b1;
    detail::product(new_b1, W1, shift().col(0), Scalar(1), true);
    detail::check_finite_vector<Scalar>(w, "b1", new_b1);
    Vector snapshot = this->flat_values();
    if (this->exact_restore()) {
      detail::VectorRecord<Scalar> bias{b1, new_b1};
      const auto [view, u] = detail::scaling_tiles(W1, g.data(), true);
      detail::exact_merge<Scalar>(w, view, u, this->restore_record());
      this->vector_record(0) = std::move(bias);
    } else {
      detail::scale_columns(W1, g, false);
    }
    b1 = new_b1;
    finish_fold(Target::next_linear, W1.data(), W1.rows(), W1.cols(), b1.data(), std::move(snapshot));
  }

  /// \brief Undoes fold_into_next on the same W1 and b1: W1 <- W1 diag(1/γ), b1 <- b1 − W1 β, with the
  /// γ and β of the fold.
  template <class W1Type>
  void unfold_from_next(W1Type&& W1, Eigen::Ref<Vector> b1) {
    static_assert_writable<W1Type>();
    const auto w = Base::where("unfold_from_next");
    check_unfold(w, Target::next_linear, W1.data(), W1.rows(), W1.cols(), b1.data(), b1.size());
    const auto g = this->applied_values().head(features());
    const auto beta = this->applied_values().tail(features());
    const bool bias_exact = !this->restore_record().empty() && this->vector_record(0).unchanged(b1);
    Vector new_b1 = bias_exact ? this->vector_record(0).before : Vector(b1);
    if (!bias_exact) {  // b1 − W1_old β = b1 − W1 (β / γ): no copy of W1 needed
      const Vector ratio = beta.cwiseQuotient(g);
      detail::product(new_b1, W1, ratio, Scalar(-1), true);
      detail::check_finite_vector<Scalar>(w, "b1", new_b1);
    }
    if (this->restore_record().empty()) {
      detail::check_reversible_row_scaling<true>(w, "W1ᵀ", W1.transpose(), g);
      detail::scale_columns(W1, g, true);
    } else {
      const auto [view, u] = detail::scaling_tiles(W1, g.data(), true);
      this->note_restore(detail::exact_unmerge<Scalar>(w, view, u, this->restore_record()) && bias_exact);
    }
    b1 = new_b1;
    finish_unfold();
  }

  /// \brief Folds into a preceding LayerNorm's affine parameters: w <- γ ⊙ w, b <- γ ⊙ b + β.
  /// \throws as fold_into_next
  void fold_into_layer_norm(Eigen::Ref<Vector> w_ln, Eigen::Ref<Vector> b_ln) {
    const auto w = Base::where("fold_into_layer_norm");
    this->require_applied(false, "fold_into_layer_norm");
    check_target(w, "w", w_ln.size(), features(), b_ln.size());
    Vector snapshot = this->flat_values();
    detail::VectorRecord<Scalar> weight, bias;
    if (this->exact_restore()) {  // the vectors are kept whole (O(d)), allocated before the fold
      weight.before = w_ln;
      bias.before = b_ln;
      weight.after.resize(w_ln.size());
      bias.after.resize(b_ln.size());
    }
    Eigen::Map<Matrix> w_col(w_ln.data(), w_ln.size(), 1);
    detail::scale_shift_fold(w, w_col, b_ln, scale().col(0), shift().col(0));
    if (this->exact_restore()) {
      weight.after = w_ln;
      bias.after = b_ln;
      this->vector_record(0) = std::move(weight);
      this->vector_record(1) = std::move(bias);
    }
    finish_fold(Target::layer_norm, w_ln.data(), w_ln.size(), 1, b_ln.data(), std::move(snapshot));
  }

  /// \brief Undoes fold_into_layer_norm on the same w and b.
  void unfold_from_layer_norm(Eigen::Ref<Vector> w_ln, Eigen::Ref<Vector> b_ln) {
    const auto w = Base::where("unfold_from_layer_norm");
    check_unfold(w, Target::layer_norm, w_ln.data(), w_ln.size(), 1, b_ln.data(), b_ln.size());
    const detail::VectorRecord<Scalar>& weight = this->vector_record(0);
    const detail::VectorRecord<Scalar>& bias = this->vector_record(1);
    if (weight.unchanged(w_ln) && bias.unchanged(b_ln)) {  // both bit for bit, from the records
      w_ln = weight.before;
      b_ln = bias.before;
      this->note_restore(true);
    } else {
      Eigen::Map<Matrix> w_col(w_ln.data(), w_ln.size(), 1);
      detail::scale_shift_unfold(w, w_col, b_ln, this->applied_values().head(features()),
                                 this->applied_values().tail(features()));
    }
    finish_unfold();
  }

 private:
  enum class Target { none, next_linear, layer_norm };

  static Index checked_features(Index d) {
    if (d < 1) detail::raise<ShapeError>(Base::where("constructor"), "features is ", d, ", expected >= 1");
    return d;
  }

  // TrainableBase's hooks.
  void forward_impl(const ConstMatrixRef& X, Matrix& Y) const;
  void forward_train_impl(const ConstMatrixRef& X, Matrix& Y, Cache& cache);
  void check_cache_impl(const Cache& cache) const;
  void backward_impl(const ConstMatrixRef& dY, Cache& cache, Matrix* dX);  // dX null: parameters only

  template <class W1Type>
  static constexpr void static_assert_writable() {
    using T = std::remove_reference_t<W1Type>;
    static_assert(!std::is_const<T>::value && (std::decay_t<W1Type>::Flags & Eigen::LvalueBit),
                  "peft: fold_into_next/unfold_from_next write W1: pass a non-const matrix, map or block");
  }

  // The weight's feature count must be d; the bias must have `bias_want` entries.
  void check_target(const detail::Where& w, const char* what, Index features_there, Index bias_want,
                    Index bias_size) const {
    if (features_there != features())
      detail::raise<ShapeError>(w, what, " has ", features_there, " features, expected ", features());
    if (bias_size != bias_want) detail::raise<ShapeError>(w, "the bias has ", bias_size, " entries, expected ", bias_want);
  }

  void check_unfold(const detail::Where& w, Target kind, const Scalar* data, Index rows, Index cols,
                    const Scalar* bias, Index bias_size) const {
    this->require_applied(true, w.op);
    if (kind != target_) detail::raise<StateError>(w, "folded into the other kind of layer");
    if (data != target_data_ || rows != target_rows_ || cols != target_cols_ || bias != target_bias_)
      detail::raise<StateError>(w, "these are not the parameters it was folded into");
    if (bias_size != (kind == Target::next_linear ? rows : features()))
      detail::raise<ShapeError>(w, "the bias has ", bias_size, " entries");
  }

  void finish_fold(Target kind, const Scalar* data, Index rows, Index cols, const Scalar* bias, Vector&& snapshot) {
    target_ = kind;
    target_data_ = data;
    target_bias_ = bias;
    target_rows_ = rows;
    target_cols_ = cols;
    this->set_applied(std::move(snapshot));
  }

  void finish_unfold() {
    target_ = Target::none;
    target_data_ = nullptr;
    target_bias_ = nullptr;
    this->set_unapplied();
  }

  SSFConfig cfg_;
  std::array<ParameterInfo, 2> layout_;
  Target target_ = Target::none;
  const Scalar* target_data_ = nullptr;
  const Scalar* target_bias_ = nullptr;
  Index target_rows_ = 0, target_cols_ = 0;
};

// -------------------------------------------------------------------------------------------------
// StandaloneSSF's hooks, out of line (see lora_family.hpp)

template <class Scalar_>
void StandaloneSSF<Scalar_>::forward_impl(const ConstMatrixRef& X, Matrix& Y) const {
  if (is_folded())
    Y = X;  // the op lives in the neighbour now
  else
    Y = (X.array().colwise() * scale().col(0).array()).colwise() + shift().col(0).array();
}

template <class Scalar_>
void StandaloneSSF<Scalar_>::forward_train_impl(const ConstMatrixRef& X, Matrix& Y, Cache& cache) {
  cache.X = X;
  Y = (cache.X.array().colwise() * scale().col(0).array()).colwise() + shift().col(0).array();
}

template <class Scalar_>
void StandaloneSSF<Scalar_>::check_cache_impl(const Cache& cache) const {
  if (cache.X.rows() != features() || cache.X.cols() != cache.tokens)
    detail::raise<StateError>(Base::where("backward"), "the cache does not fit this adapter (", features(),
                              " features, N ", cache.tokens, "); fill it with this adapter's forward(X, cache)");
}

template <class Scalar_>
void StandaloneSSF<Scalar_>::backward_impl(const ConstMatrixRef& dY, Cache& cache, Matrix* dX) {
  if (dY.cols() > 0) {  // an empty batch adds nothing (and Eigen's row sums would offset a null pointer)
    this->grad(layout_[0]).col(0) += (dY.array() * cache.X.array()).rowwise().sum().matrix();
    this->grad(layout_[1]).col(0) += dY.rowwise().sum();
  }
  if (dX != nullptr) *dX = scale().col(0).asDiagonal() * dY;
}

#ifdef PEFT_COMPILED
// Instantiated once in the compiled part (peft::compiled): see kernels.hpp.
extern template class StandaloneSSF<float>;
extern template class StandaloneSSF<double>;
#endif

}  // namespace peft
