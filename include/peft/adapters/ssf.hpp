#pragma once
/// \file ssf.hpp
/// \brief SSF: scale and shift of features (Lian et al., NeurIPS 2022). Two classes:
///
/// - `peft::SSF<MatrixType>` wraps a frozen linear layer (W, b): `Y = diag(γ)(W X + b 1ᵀ) + β 1ᵀ`, and
///   merges into it (W <- diag(γ) W, b <- γ ⊙ b + β).
/// - `peft::StandaloneSSF<Scalar>` scales and shifts features that have no linear layer of their own
///   (after a LayerNorm without affine, a residual sum, an activation): `Y = diag(γ) X + β 1ᵀ`, and folds
///   into the next linear layer (W1 <- W1 diag(γ), b1 <- b1 + W1 β) or into a preceding LayerNorm's affine
///   parameters (w <- γ ⊙ w, b <- γ ⊙ b + β).
///
/// Both refuse, up front, a merge or fold that could not be undone: a scale that is zero or not finite,
/// or one that would push a weight out of the normal floating-point range (overflow, or underflow where
/// the division on unmerge would lose precision). The message names the feature and its scale.

#include "peft/core/adapter_base.hpp"
#include "peft/core/error.hpp"
#include "peft/core/merge_state.hpp"
#include "peft/core/parameter_store.hpp"
#include "peft/core/random.hpp"
#include "peft/core/types.hpp"

#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>

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

inline const SSFConfig& check_ssf_config(const Where& where, const SSFConfig& cfg) {
  if (!(std::isfinite(cfg.init_std) && cfg.init_std >= 0.0))
    raise<ConfigError>(where, "init_std is ", cfg.init_std, ", expected a finite value >= 0");
  return cfg;
}

/// Fills γ and β as cfg.init says.
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

/// \brief Checks, before anything is written, that scaling row i of M by `scale(i)` (or dividing it,
/// with Divide) gives finite values and can be undone: every scale is finite and non-zero; no entry
/// overflows; and, when multiplying (a merge or fold), no normal entry is pushed below the normal range,
/// where the division that undoes it would lose precision. Dividing back (unmerge, unfold) only checks
/// for overflow: an entry that was subnormal before the merge may be subnormal again. M may be any dense
/// expression (pass a transpose to check a column scaling); it is read in two or three vectorised passes,
/// and entry by entry only to name the offender when a check fails.
/// \throws NumericalError naming the row ("feature"), its scale and the offending entry
template <bool Divide = false, class MType, class SType>
void check_reversible_row_scaling(const Where& where, const char* what, const MType& M, const SType& scale) {
  using Scalar = typename MType::Scalar;
  const Index rows = M.rows(), cols = M.cols();
  for (Index i = 0; i < rows; ++i) {
    const Scalar g = scale(i);
    if (!std::isfinite(g) || g == Scalar(0))
      raise<NumericalError>(where, "feature ", i, " has scale ", g, ": too small to divide by (or not finite); ",
                            what, " is left untouched");
  }
  const Scalar lo = std::numeric_limits<Scalar>::min();
  if (cols == 0) return;
  // Vectorised pass: per row, the largest |entry| and (multiplying) the smallest normal |entry|.
  // |m g| and |m / g| round monotonically in |m|, so the largest entry overflows iff any does and the
  // smallest normal entry underflows iff any does. Only if a check fails is M walked entry by entry
  // below, to name the first offender.
  {
    // Finiteness is checked along the storage order too: M.allFinite() on a transposed matrix walks it
    // with a stride, ten times slower than the whole check.
    const Scalar inf = std::numeric_limits<Scalar>::infinity();
    VectorX<Scalar> hi(rows), low(rows);
    bool finite = true;
    if (MType::IsRowMajor) {
      for (Index i = 0; i < rows && finite; ++i) {
        const auto a = M.row(i).cwiseAbs().array();
        finite = M.row(i).allFinite();
        hi(i) = a.maxCoeff();
        low(i) = (a < lo).select(inf, a).minCoeff();
      }
    } else {  // columns are contiguous: accumulate them, so every pass is a vectorised sweep
      hi.setZero();
      low.setConstant(inf);
      for (Index j = 0; j < cols && finite; ++j) {
        const auto a = M.col(j).cwiseAbs().array();
        finite = M.col(j).allFinite();
        hi.array() = hi.array().max(a);
        low.array() = low.array().min((a < lo).select(inf, a));
      }
    }
    bool ok = finite;
    for (Index i = 0; i < rows && ok; ++i) {
      const Scalar g = std::abs(scale(i));
      ok = std::isfinite(Divide ? hi(i) / g : hi(i) * g) && (Divide || low(i) == inf || !(low(i) * g < lo));
    }
    if (ok) return;
  }
  const auto check = [&](Index i, Index j) {
    const Scalar m = M.coeff(i, j);
    if (m == Scalar(0)) return;
    if (!std::isfinite(m))
      raise<NumericalError>(where, what, "(", i, ",", j, ") is ", m, "; ", what, " is left untouched");
    const Scalar v = Divide ? m / scale(i) : m * scale(i);
    if (!std::isfinite(v))
      raise<NumericalError>(where, "feature ", i, " has scale ", scale(i), ": scaling ", what, "(", i, ",", j,
                            ") = ", m, " would overflow; ", what, " is left untouched");
    if (!Divide && std::abs(m) >= lo && std::abs(v) < lo)
      raise<NumericalError>(where, "feature ", i, " has scale ", scale(i), ": scaling ", what, "(", i, ",", j,
                            ") = ", m, " would underflow and could not be undone; ", what, " is left untouched");
  };
  if (MType::IsRowMajor) {
    for (Index i = 0; i < rows; ++i)
      for (Index j = 0; j < cols; ++j) check(i, j);
  } else {
    for (Index j = 0; j < cols; ++j)
      for (Index i = 0; i < rows; ++i) check(i, j);
  }
}

/// \brief Throws NumericalError naming the first non-finite entry of v (a vector about to be written).
template <class VType>
void check_finite_vector(const Where& where, const char* what, const VType& v) {
  for (Index i = 0; i < v.size(); ++i)
    if (!std::isfinite(v(i)))
      raise<NumericalError>(where, what, "(", i, ") would become ", v(i), "; nothing is written");
}

/// \brief W <- diag(γ) W and b <- γ ⊙ b + β, with the strong guarantee (SSF merge, LayerNorm fold).
/// Also refuses a shift that would swamp the bias. The unfold (b' − β) / γ is computed aside; its error
/// is at most about 4 ε |b| + 2 ε |β / γ|, so with a small γ (a feature the training nearly switched off)
/// b comes back with an absolute error that follows |β / γ|, not |b|. A round trip is accepted when it
/// misses b by at most 8 ε (|b| + |b' − b|) (MATH.md's merge bound, with room) or keeps at least half of
/// b's digits (error <= sqrt(ε) |b|), and refused otherwise, as when |β / γ| is many orders of
/// magnitude above |b| and b would come back as noise.
template <class WType, class BType, class GType, class SType>
void scale_shift_fold(const Where& where, WType&& W, BType&& b, const GType& gamma, const SType& beta) {
  using Scalar = typename std::decay_t<WType>::Scalar;
  using Vec = VectorX<Scalar>;
  check_reversible_row_scaling(where, "W", W, gamma);
  Vec new_b = gamma.cwiseProduct(b) + beta;
  check_finite_vector(where, "b", new_b);
  const Vec round_trip = (new_b - beta).cwiseQuotient(gamma);
  const Scalar e = std::numeric_limits<Scalar>::epsilon() / 2;
  const Scalar half_digits = std::sqrt(e);
  for (Index i = 0; i < b.size(); ++i) {
    const Scalar err = std::abs(round_trip(i) - b(i));
    if (err > 8 * e * (std::abs(b(i)) + std::abs(new_b(i) - b(i))) && err > half_digits * std::abs(b(i)))
      raise<NumericalError>(where, "feature ", i, " has scale ", gamma(i), " and shift ", beta(i), ": b(", i, ") = ", b(i),
                            " could not be recovered on unmerge (it would come back as ", round_trip(i),
                            "); nothing is written");
  }
  W.array().colwise() *= gamma.array();
  b = new_b;
}

/// \brief The inverse of scale_shift_fold: W <- diag(1/γ) W, b <- (b − β) / γ, with the strong
/// guarantee. γ and β are those of the fold.
template <class WType, class BType, class GType, class SType>
void scale_shift_unfold(const Where& where, WType&& W, BType&& b, const GType& gamma, const SType& beta) {
  using Vec = VectorX<typename std::decay_t<WType>::Scalar>;
  check_reversible_row_scaling<true>(where, "W", W, gamma);
  Vec new_b = (b - beta).cwiseQuotient(gamma);
  check_finite_vector(where, "b", new_b);
  W.array().colwise() /= gamma.array();
  b = new_b;
}

}  // namespace detail

/// \brief SSF over a frozen linear layer: `Y = diag(γ)(W X + b 1ᵀ) + β 1ᵀ` (MATH.md, SSF).
///
/// Wraps the user's weight W (d_out x d_in) and optional bias b by reference. Trainable parameters:
/// `ssf_scale` γ and `ssf_shift` β (d_out x 1 each). Gradients: dγ += rowsum(G ⊙ Z), dβ += rowsum(G),
/// dX = Wᵀ diag(γ) G, where Z = W X + b 1ᵀ is kept in the cache.
///
/// merge() re-parameterises the layer: W <- diag(γ) W, b <- γ ⊙ b + β. The layer needs a bias vector to
/// hold β: a layer built without one cannot merge (ShapeError); pass a zero bias
/// (`Eigen::VectorXf b = Eigen::VectorXf::Zero(d_out)`) to the constructor to make room for it.
///
/// **Performance.** Forward is the base product plus one pass over Y (the scale, shift and bias are
/// fused); training forward also keeps Z (d_out x N); backward is the base's input gradient plus two
/// passes over d_out x N. No d_out x d_in temporary. merge/unmerge read W once (the reversibility
/// check) and scale it in place once.
///
/// **Threads.** forward(X) is const and re-entrant; everything else, one thread at a time.
template <class MatrixType_>
class SSF : public AdapterBase<SSF<MatrixType_>, MatrixType_> {
  using Base = AdapterBase<SSF<MatrixType_>, MatrixType_>;
  friend Base;

 public:
  using typename Base::ConstMatrixRef;
  using typename Base::Index;
  using typename Base::Matrix;
  using typename Base::MatrixType;
  using typename Base::Scalar;
  using typename Base::Vector;

  /// \brief What backward needs: Z = W X + b 1ᵀ, and a scratch for diag(γ) G.
  struct Cache : detail::CacheStamp {
    Matrix Z;
    Matrix scaled_grad;
  };

  static constexpr const char* class_name = "peft::SSF";

  /// \brief Wraps W (no bias: the adapter trains, but cannot merge β into the layer).
  explicit SSF(Eigen::Ref<MatrixType> W, const SSFConfig& cfg = {}) : SSF(W, nullptr, 0, false, cfg) {}
  /// \brief Wraps W and its bias b (d_out).
  SSF(Eigen::Ref<MatrixType> W, Eigen::Ref<Vector> b, const SSFConfig& cfg = {}) : SSF(W, b.data(), b.size(), true, cfg) {}

  const SSFConfig& config() const { return cfg_; }
  /// \returns ssf_scale γ (d_out x 1), a view into the flat buffer.
  Eigen::Map<Matrix> scale() { return this->value(layout_[0]); }
  Eigen::Map<const Matrix> scale() const { return this->value(layout_[0]); }
  /// \returns ssf_shift β (d_out x 1).
  Eigen::Map<Matrix> shift() { return this->value(layout_[1]); }
  Eigen::Map<const Matrix> shift() const { return this->value(layout_[1]); }

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
  void forward_impl(const ConstMatrixRef& X, Matrix& Y) const {
    Y.noalias() = this->weight() * X;
    if (this->is_merged()) {
      if (this->has_bias()) Y.colwise() += this->bias();
      return;
    }
    const auto g = scale().col(0);
    Vector offset = shift().col(0);
    if (this->has_bias()) offset += g.cwiseProduct(this->bias());
    Y = (Y.array().colwise() * g.array()).colwise() + offset.array();
  }

  void forward_train_impl(const ConstMatrixRef& X, Matrix& Y, Cache& cache) {
    cache.Z.resize(this->d_out(), X.cols());
    cache.Z.noalias() = this->weight() * X;
    if (this->has_bias()) cache.Z.colwise() += this->bias();
    Y = (cache.Z.array().colwise() * scale().col(0).array()).colwise() + shift().col(0).array();
  }

  void check_cache_impl(const Cache& cache) const {
    if (cache.Z.rows() != this->d_out() || cache.Z.cols() != cache.tokens)
      detail::raise<StateError>(this->where("backward"), "the cache does not fit this adapter; fill it with this "
                                                         "adapter's forward(X, cache)");
  }

  void backward_impl(const ConstMatrixRef& dY, Cache& cache, Matrix& dX) {
    const auto g = scale().col(0);
    this->grad(layout_[0]).col(0) += (dY.array() * cache.Z.array()).rowwise().sum().matrix();
    this->grad(layout_[1]).col(0) += dY.rowwise().sum();
    cache.scaled_grad.resize(dY.rows(), dY.cols());
    cache.scaled_grad = g.asDiagonal() * dY;
    dX.noalias() = this->weight().transpose() * cache.scaled_grad;
  }

  void require_bias(const char* op) const {
    if (!this->has_bias())
      detail::raise<ShapeError>(this->where(op), "the layer has no bias to hold the shift; construct the SSF with a "
                                                 "bias vector (a zero one, Vector::Zero(d_out), if the layer has none)");
  }

  void merge_impl() {
    require_bias("merge");
    auto b = this->bias_mut();
    detail::scale_shift_fold(this->where("merge"), this->weight_mut(), b, scale().col(0), shift().col(0));
  }

  void unmerge_impl() {
    auto b = this->bias_mut();
    detail::scale_shift_unfold(this->where("unmerge"), this->weight_mut(), b, this->merged_value(layout_[0]).col(0),
                               this->merged_value(layout_[1]).col(0));
  }

  // The base weight: W itself, or W / γ (merge-time γ) while merged.
  MatrixType base_weight() const {
    MatrixType W0 = this->weight();
    if (this->is_merged()) W0.array().colwise() /= this->merged_value(layout_[0]).col(0).array();
    return W0;
  }
  Vector base_bias() const {
    Vector b0 = this->bias();
    if (this->is_merged())
      b0 = (b0 - this->merged_value(layout_[1]).col(0)).cwiseQuotient(this->merged_value(layout_[0]).col(0));
    return b0;
  }

  // dW = diag(γ − 1) W0.
  MatrixType delta_weight_impl() const {
    MatrixType dW = base_weight();
    dW.array().colwise() *= (scale().col(0).array() - Scalar(1));
    return dW;
  }

  SSFConfig cfg_;
  std::array<ParameterInfo, 2> layout_;
};

/// \brief SSF on features with no linear layer of their own: `Y = diag(γ) X + β 1ᵀ` (MATH.md, SSF,
/// standalone), with folding into the next linear layer or a preceding LayerNorm for deployment.
///
/// Parameters `ssf_scale` γ and `ssf_shift` β (d x 1), in one flat buffer (ParameterStore). Backward:
/// dγ += rowsum(G ⊙ X), dβ += rowsum(G), dX = diag(γ) G.
///
/// Folding moves the scale and shift into neighbouring weights so inference skips this op entirely;
/// valid only when nothing non-linear lies between (see the README's SSF section):
/// - fold_into_next(W1, b1): the next linear layer Y1 = W1 Y + b1 becomes W1 diag(γ), b1 + W1 β;
/// - fold_into_layer_norm(w, b): a preceding LayerNorm's affine w ⊙ x̂ + b becomes γ ⊙ w, γ ⊙ b + β.
/// While folded, forward(X) returns X unchanged (the op now lives in the neighbour), training is
/// refused, and unfold_*() must be given the same matrices. Each fold checks before it writes.
template <class Scalar_>
class StandaloneSSF : private detail::MergeState<StandaloneSSF<Scalar_>, Scalar_>,
                      public ParameterStore<StandaloneSSF<Scalar_>, Scalar_> {
  static_assert(std::is_same<Scalar_, float>::value || std::is_same<Scalar_, double>::value,
                "peft: StandaloneSSF's Scalar must be float or double");
  using State = detail::MergeState<StandaloneSSF<Scalar_>, Scalar_>;
  using Store = ParameterStore<StandaloneSSF<Scalar_>, Scalar_>;

 public:
  using Scalar = Scalar_;
  using Index = peft::Index;
  using Matrix = MatrixX<Scalar>;
  using Vector = VectorX<Scalar>;
  using ConstMatrixRef = Eigen::Ref<const Matrix>;

  /// \brief What backward needs: a copy of X.
  struct Cache : detail::CacheStamp {
    Matrix X;
  };

  static constexpr const char* class_name = "peft::StandaloneSSF";

  /// \brief d features. \throws ShapeError for d < 1; ConfigError for a bad init_std
  explicit StandaloneSSF(Index features, const SSFConfig& cfg = {})
      : Store(checked_features(features) * 2),
        cfg_(detail::check_ssf_config(where("constructor"), cfg)),
        layout_{{{"ssf_scale", features, 1, 0}, {"ssf_shift", features, 1, features}}} {
    detail::init_ssf(cfg_, scale(), shift());
  }

  Index features() const { return layout_[0].rows; }
  const SSFConfig& config() const { return cfg_; }
  Eigen::Map<Matrix> scale() { return this->value(layout_[0]); }
  Eigen::Map<const Matrix> scale() const { return this->value(layout_[0]); }
  Eigen::Map<Matrix> shift() { return this->value(layout_[1]); }
  Eigen::Map<const Matrix> shift() const { return this->value(layout_[1]); }
  const std::array<ParameterInfo, 2>& parameter_layout() const { return layout_; }

  /// \returns whether the scale and shift currently live in a neighbouring layer.
  bool is_folded() const { return State::merged(); }

  /// \brief Y = diag(γ) X + β 1ᵀ; X itself while folded (the op then lives in the neighbour). Const
  /// and re-entrant.
  Matrix forward(const ConstMatrixRef& X) const {
    check_input("forward", X);
    if (is_folded()) return X;
    return (X.array().colwise() * scale().col(0).array()).colwise() + shift().col(0).array();
  }

  /// \brief Training forward; keeps a copy of X in the cache. \throws StateError while folded
  Matrix forward(const ConstMatrixRef& X, Cache& cache) {
    check_input("forward", X);
    if (is_folded()) detail::raise<StateError>(where("forward"), "training forward while folded; unfold first");
    cache.owner = nullptr;  // invalid until the forward completes
    cache.X = X;
    cache.owner = this;
    cache.state = State::state();
    cache.d_in = X.rows();
    cache.tokens = X.cols();
    return (cache.X.array().colwise() * scale().col(0).array()).colwise() + shift().col(0).array();
  }

  /// \brief Accumulates dγ += rowsum(dY ⊙ X), dβ += rowsum(dY) and returns dX = diag(γ) dY.
  /// \throws StateError while folded or for a foreign or stale cache; ShapeError for dY's shape
  Matrix backward(const ConstMatrixRef& dY, Cache& cache) {
    if (is_folded()) detail::raise<StateError>(where("backward"), "backward while folded; unfold first");
    if (cache.owner != this || cache.state != State::state() || cache.X.rows() != features() ||
        cache.X.cols() != cache.tokens)
      detail::raise<StateError>(where("backward"),
                                "the cache was not filled by this adapter's forward(X, cache) in its current state");
    detail::check_shape(where("backward"), "dY", dY.rows(), dY.cols(), features(), cache.tokens);
    this->grad(layout_[0]).col(0) += (dY.array() * cache.X.array()).rowwise().sum().matrix();
    this->grad(layout_[1]).col(0) += dY.rowwise().sum();
    return scale().col(0).asDiagonal() * dY;
  }

  /// \brief Folds into the next linear layer: W1 <- W1 diag(γ), b1 <- b1 + W1 β (with the old W1).
  /// \param W1 d_next x d: a writable dense Eigen matrix, map or block (either storage order); a const
  ///        matrix is a compile error
  /// \param b1 d_next; the layer needs a bias to hold W1 β (pass a zero one if it has none)
  /// \throws StateError if folded; ShapeError for shapes; NumericalError if the fold could not be
  ///         undone or would write a non-finite value (nothing is written then)
  template <class W1Type>
  void fold_into_next(W1Type&& W1, Eigen::Ref<Vector> b1) {
    static_assert_writable<W1Type>();
    const auto w = where("fold_into_next");
    State::require(false, "fold_into_next");
    check_target(w, "W1", W1.cols(), W1.rows(), b1.size());
    const auto g = scale().col(0);
    detail::check_reversible_row_scaling(w, "W1ᵀ", W1.transpose(), g);  // W1's columns are the features
    Vector new_b1 = b1;
    new_b1.noalias() += W1 * shift().col(0);
    detail::check_finite_vector(w, "b1", new_b1);
    Vector snapshot = this->flat_values();
    W1.array().rowwise() *= g.transpose().array();
    b1 = new_b1;
    finish_fold(Target::next_linear, W1.data(), W1.rows(), W1.cols(), b1.data(), std::move(snapshot));
  }

  /// \brief Undoes fold_into_next on the same W1 and b1: W1 <- W1 diag(1/γ), b1 <- b1 − W1 β, with the
  /// γ and β of the fold.
  template <class W1Type>
  void unfold_from_next(W1Type&& W1, Eigen::Ref<Vector> b1) {
    static_assert_writable<W1Type>();
    const auto w = where("unfold_from_next");
    check_unfold(w, Target::next_linear, W1.data(), W1.rows(), W1.cols(), b1.data(), b1.size());
    const auto g = State::snapshot().head(features());
    const auto beta = State::snapshot().tail(features());
    detail::check_reversible_row_scaling<true>(w, "W1ᵀ", W1.transpose(), g);
    // b1 − W1_old β = b1 − W1 (β / γ): no copy of W1 needed.
    Vector new_b1 = b1;
    new_b1.noalias() -= W1 * beta.cwiseQuotient(g);
    detail::check_finite_vector(w, "b1", new_b1);
    W1.array().rowwise() /= g.transpose().array();
    b1 = new_b1;
    finish_unfold();
  }

  /// \brief Folds into a preceding LayerNorm's affine parameters: w <- γ ⊙ w, b <- γ ⊙ b + β.
  /// \throws as fold_into_next
  void fold_into_layer_norm(Eigen::Ref<Vector> w_ln, Eigen::Ref<Vector> b_ln) {
    const auto w = where("fold_into_layer_norm");
    State::require(false, "fold_into_layer_norm");
    check_target(w, "w", w_ln.size(), features(), b_ln.size());
    Vector snapshot = this->flat_values();
    Eigen::Map<Matrix> w_col(w_ln.data(), w_ln.size(), 1);
    detail::scale_shift_fold(w, w_col, b_ln, scale().col(0), shift().col(0));
    finish_fold(Target::layer_norm, w_ln.data(), w_ln.size(), 1, b_ln.data(), std::move(snapshot));
  }

  /// \brief Undoes fold_into_layer_norm on the same w and b.
  void unfold_from_layer_norm(Eigen::Ref<Vector> w_ln, Eigen::Ref<Vector> b_ln) {
    const auto w = where("unfold_from_layer_norm");
    check_unfold(w, Target::layer_norm, w_ln.data(), w_ln.size(), 1, b_ln.data(), b_ln.size());
    Eigen::Map<Matrix> w_col(w_ln.data(), w_ln.size(), 1);
    detail::scale_shift_unfold(w, w_col, b_ln, State::snapshot().head(features()), State::snapshot().tail(features()));
    finish_unfold();
  }

 private:
  enum class Target { none, next_linear, layer_norm };

  static constexpr detail::Where where(const char* op) { return {class_name, op}; }

  static Index checked_features(Index d) {
    if (d < 1) detail::raise<ShapeError>(where("constructor"), "features is ", d, ", expected >= 1");
    return d;
  }

  void check_input(const char* op, const ConstMatrixRef& X) const {
    if (X.rows() != features())
      detail::raise<ShapeError>(where(op), "X is ", X.rows(), "x", X.cols(), ", expected ", features(), " rows");
  }

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
    State::require(true, w.op);
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
    State::set_merged(std::move(snapshot));
  }

  void finish_unfold() {
    target_ = Target::none;
    target_data_ = nullptr;
    target_bias_ = nullptr;
    State::set_unmerged();
  }

  SSFConfig cfg_;
  std::array<ParameterInfo, 2> layout_;
  Target target_ = Target::none;
  const Scalar* target_data_ = nullptr;
  const Scalar* target_bias_ = nullptr;
  Index target_rows_ = 0, target_cols_ = 0;
};

}  // namespace peft
