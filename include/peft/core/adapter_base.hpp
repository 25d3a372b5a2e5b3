#pragma once
/// \file adapter_base.hpp
/// \brief The CRTP base every adapter derives from: it binds the user's frozen weight (and bias) by
/// reference, checks shapes, runs the merge/unmerge state machine, and computes the base product.
/// Training, caches and parameter buffers come from TrainableBase.
///
/// Besides TrainableBase's hooks, an adapter provides (private, with `friend peft::AdapterAccess;`):
///
///     void merge_impl();               // write the adapter into W (and b); throw before writing anything
///     void unmerge_impl();             // take it out again, from applied_value(): the merge-time values
///     MatrixType delta_weight_impl() const;   // the change merge makes to W
///
/// merge_impl and unmerge_impl must have the strong guarantee: validate and check every value they
/// would write (finite, reversible) first, then write. No virtual function is called on any path.

#include "peft/core/config.hpp"  // first: the detail headers check for it
#include "peft/core/error.hpp"
#include "peft/core/trainable_base.hpp"
#include "peft/core/types.hpp"
#include "peft/detail/kernels.hpp"

#include <utility>

namespace peft {

/// \brief CRTP base of the adapters. Not used directly: see LoRA, DoRA, SSF, PiSSA, and
/// docs/extending.md for an adapter of your own.
/// \tparam Derived the adapter class
/// \tparam MatrixType_ the frozen weight's type: a dynamic-size `Eigen::Matrix` of float or double,
///         column- or row-major
///
/// **Copies and moves.** A copy shares the user's W and b (they are references) and duplicates the
/// parameters, gradients and random stream. Copying or assigning a *merged* adapter throws StateError:
/// two adapters would then both believe they can unmerge the one delta in W. A moved-from adapter may
/// only be assigned to or destroyed; it no longer counts as merged.
template <class Derived, class MatrixType_>
class AdapterBase : public TrainableBase<Derived, typename MatrixType_::Scalar> {
  static_assert(detail::check_weight_type<MatrixType_>::value, "");
  using Trainable = TrainableBase<Derived, typename MatrixType_::Scalar>;

 public:
  using MatrixType = MatrixType_;  ///< the frozen weight's type
  using typename Trainable::ConstMatrixRef;
  using typename Trainable::Index;
  using typename Trainable::Matrix;
  using typename Trainable::Scalar;
  using typename Trainable::Vector;
  using WeightMap = Eigen::Map<MatrixType, 0, Eigen::OuterStride<>>;
  using ConstWeightMap = Eigen::Map<const MatrixType, 0, Eigen::OuterStride<>>;
  using BiasMap = Eigen::Map<Vector>;
  using ConstBiasMap = Eigen::Map<const Vector>;

  /// The state in which training is refused, and how to leave it (for messages).
  static constexpr const char* applied_state = "merged";
  static constexpr const char* undo_call = "unmerge()";

  /// \returns d_out, the rows of W.
  Index d_out() const { return w_rows_; }
  /// \returns d_in, the columns of W.
  Index d_in() const { return w_cols_; }
  /// \returns d_in: the rows of X (TrainableBase's contract).
  Index input_size() const { return w_cols_; }
  /// \returns d_out: the rows of Y.
  Index output_size() const { return w_rows_; }
  /// \returns whether a bias vector is bound.
  bool has_bias() const { return b_data_ != nullptr; }
  /// \returns whether the adapter is merged into W (forward then costs exactly the base product).
  bool is_merged() const { return this->applied(); }

  /// \returns the bound weight (read-only view of the user's matrix).
  ConstWeightMap weight() const { return ConstWeightMap(w_data_, w_rows_, w_cols_, Eigen::OuterStride<>(w_stride_)); }
  /// \returns the bound bias (read-only view; empty if none is bound).
  ConstBiasMap bias() const { return ConstBiasMap(b_data_, b_data_ ? w_rows_ : 0); }

  /// \brief Writes the adapter into the weights (W <- W0 + dW); forward then costs exactly the base.
  /// The parameters of this moment are kept, so unmerge() takes out exactly what went in, even if the
  /// parameters are changed while merged.
  /// \throws StateError if already merged; NumericalError if a merged value would not be finite, or
  ///         could not be restored (checked before anything is written: W and b stay untouched)
  void merge() {
    this->require_applied(false, "merge");
    Vector snapshot = this->flat_values();  // allocated before W is touched: a bad_alloc leaves W as it was
    AdapterAccess::merge(this->derived());
    this->set_applied(std::move(snapshot));
  }

  /// \brief Takes the merged delta back out of the weights, to within the round-trip bound of
  /// docs/math.md (per adapter).
  /// \throws StateError if not merged; NumericalError as merge (W and b untouched, still merged)
  void unmerge() {
    this->require_applied(true, "unmerge");
    AdapterAccess::unmerge(this->derived());
    this->set_unapplied();
  }

  /// \returns the change the adapter's current parameters make to W (d_out x d_in, allocated: not
  /// for hot paths).
  MatrixType delta_weight() const { return AdapterAccess::delta_weight(this->derived()); }

 protected:
  /// Binds W (and b when has_bias: it must have d_out entries) and allocates `num_values` parameters.
  /// \throws ShapeError for an empty W or a bias of the wrong size
  AdapterBase(Eigen::Ref<MatrixType> W, Scalar* b_data, Index b_size, bool has_bias, Index num_values)
      : Trainable(num_values),
        w_data_(W.data()),
        w_rows_(W.rows()),
        w_cols_(W.cols()),
        w_stride_(W.outerStride()),
        b_data_(has_bias ? b_data : nullptr) {
    if (w_rows_ == 0 || w_cols_ == 0)
      detail::raise<ShapeError>(this->where("constructor"), "W is ", w_rows_, "x", w_cols_,
                                ", expected a non-empty matrix");
    if (has_bias && b_size != w_rows_)
      detail::raise<ShapeError>(this->where("constructor"), "b has ", b_size, " entries, expected d_out = ", w_rows_);
  }

  AdapterBase(const AdapterBase&) = default;
  AdapterBase(AdapterBase&&) noexcept = default;
  AdapterBase& operator=(const AdapterBase&) = default;
  AdapterBase& operator=(AdapterBase&&) = default;
  ~AdapterBase() = default;

  /// \returns the writable weight (the user's matrix).
  WeightMap weight_mut() { return WeightMap(w_data_, w_rows_, w_cols_, Eigen::OuterStride<>(w_stride_)); }
  /// \returns the writable bias (empty if none).
  BiasMap bias_mut() { return BiasMap(b_data_, b_data_ ? w_rows_ : 0); }

  /// \brief The base layer's output: `Y = W X + b 1ᵀ` (the bias only if bound and `with_bias`), one
  /// GEMM (kernels.hpp) and one pass over Y. Y is resized to d_out x N.
  void base_product(const ConstMatrixRef& X, Matrix& Y, bool with_bias = true) const {
    Y.resize(w_rows_, X.cols());
    detail::product(Y, weight(), X, Scalar(1), false);
    if (with_bias && has_bias()) Y.colwise() += bias();
  }

  /// \brief The base layer's input gradient: `dX = Wᵀ G`, one GEMM. dX is resized to d_in x N.
  template <class GType>
  void base_input_grad(const Eigen::MatrixBase<GType>& G, Matrix& dX) const {
    dX.resize(w_cols_, G.cols());
    detail::product(dX, weight().transpose(), G, Scalar(1), false);
  }

  /// Throws StateError while merged (for a derived operation that needs the unmerged weight).
  void require_unmerged(const char* op) const { this->require_applied(false, op); }

 private:
  Scalar* w_data_;
  Index w_rows_;
  Index w_cols_;
  Index w_stride_;
  Scalar* b_data_;
};

}  // namespace peft
