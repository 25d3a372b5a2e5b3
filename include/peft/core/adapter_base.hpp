#pragma once
/// \file adapter_base.hpp
/// \brief The CRTP base every adapter derives from: weight binding, shape checks, the merge/unmerge
/// state machine, flat parameter and gradient buffers, cache validation.
///
/// The base owns everything adapters share, once (the flat parameter buffers through ParameterStore);
/// a derived adapter provides small private hooks
/// (the base is a friend of it):
///
///     static constexpr const char* class_name;          // "peft::LoRA", for messages
///     void forward_impl(const ConstMatrixRef& X, Matrix& Y) const;   // Y allocated d_out x N
///     void forward_train_impl(const ConstMatrixRef& X, Matrix& Y, Cache& cache);
///     void backward_impl(const ConstMatrixRef& dY, Cache& cache, Matrix& dX);  // dX allocated
///     void check_cache_impl(const Cache& cache) const;   // StateError if it does not fit
///     void merge_impl();                                 // strong guarantee: throw before writing
///     void unmerge_impl();                               // uses merged_value(): the merge-time values
///     MatrixType delta_weight_impl() const;
///     const std::array<ParameterInfo, K>& parameter_layout() const;
///
/// No virtual function is called on any path: forward and backward are resolved at compile time.

#include "peft/core/error.hpp"
#include "peft/core/merge_state.hpp"
#include "peft/core/parameter.hpp"
#include "peft/core/parameter_store.hpp"
#include "peft/core/types.hpp"

#include <algorithm>
#include <cstdint>
#include <functional>
#include <utility>
#include <string>
#include <type_traits>
#include <vector>

namespace peft {

namespace detail {

/// \brief What every adapter's Cache records of the call that filled it, so that backward can refuse
/// a cache from another adapter, from another state (merged or unmerged since), or of another shape.
struct CacheStamp {
  const void* owner = nullptr;  ///< the adapter whose training forward filled it; null: never filled
  std::uint64_t state = 0;      ///< the adapter's state counter at that time
  Index d_in = 0;               ///< rows of X
  Index tokens = 0;             ///< columns of X (N)
};

/// \returns whether the storage of two dense matrices (plain, map, block or Ref) overlaps.
template <class A, class B>
bool overlaps(const A& a, const B& b) {
  if (a.size() == 0 || b.size() == 0) return false;
  const auto span = [](const auto& m) {
    const auto* first = m.data();
    return std::make_pair(first, first + (m.outerSize() - 1) * m.outerStride() + m.innerSize());
  };
  const auto sa = span(a);
  const auto sb = span(b);
  const auto* a0 = reinterpret_cast<const char*>(sa.first);
  const auto* a1 = reinterpret_cast<const char*>(sa.second);
  const auto* b0 = reinterpret_cast<const char*>(sb.first);
  const auto* b1 = reinterpret_cast<const char*>(sb.second);
  return std::less<const char*>()(a0, b1) && std::less<const char*>()(b0, a1);
}

}  // namespace detail

/// \brief CRTP base of the adapters. Not used directly: see LoRA, DoRA, SSF, PiSSA.
/// \tparam Derived the adapter class
/// \tparam MatrixType_ the frozen weight's type: a dynamic-size `Eigen::Matrix` of float or double,
///         column- or row-major
///
/// **Copies and moves.** A copy shares the user's W and b (they are references) and duplicates the
/// parameters, gradients and random stream. Copying or assigning a *merged* adapter throws StateError:
/// two adapters would then both believe they can unmerge the one delta in W. A moved-from adapter may
/// only be assigned to or destroyed; it no longer counts as merged.
template <class Derived, class MatrixType_>
class AdapterBase : private detail::MergeState<Derived, typename MatrixType_::Scalar>,
                    public ParameterStore<Derived, typename MatrixType_::Scalar> {
  static_assert(detail::check_weight_type<MatrixType_>::value, "");
  using State = detail::MergeState<Derived, typename MatrixType_::Scalar>;
  using Store = ParameterStore<Derived, typename MatrixType_::Scalar>;

 public:
  using MatrixType = MatrixType_;                       ///< the frozen weight's type
  using Scalar = typename MatrixType::Scalar;           ///< float or double
  using Index = peft::Index;                            ///< Eigen's index type
  using Matrix = MatrixX<Scalar>;                       ///< activations and parameters (column-major)
  using Vector = VectorX<Scalar>;                       ///< biases and flat buffers
  using ConstMatrixRef = Eigen::Ref<const Matrix>;      ///< how inputs are taken: no copy of a
                                                        ///< column-major matrix, map or block
  using WeightMap = Eigen::Map<MatrixType, 0, Eigen::OuterStride<>>;
  using ConstWeightMap = Eigen::Map<const MatrixType, 0, Eigen::OuterStride<>>;
  using BiasMap = Eigen::Map<Vector>;
  using ConstBiasMap = Eigen::Map<const Vector>;

  /// \returns d_out, the rows of W.
  Index d_out() const { return w_rows_; }
  /// \returns d_in, the columns of W.
  Index d_in() const { return w_cols_; }
  /// \returns whether a bias vector is bound.
  bool has_bias() const { return b_data_ != nullptr; }
  /// \returns whether the adapter is merged into W (forward then costs exactly the base product).
  bool is_merged() const { return State::merged(); }

  /// \returns the bound weight (read-only view of the user's matrix).
  ConstWeightMap weight() const { return ConstWeightMap(w_data_, w_rows_, w_cols_, Eigen::OuterStride<>(w_stride_)); }
  /// \returns the bound bias (read-only view; empty if none is bound).
  ConstBiasMap bias() const { return ConstBiasMap(b_data_, b_data_ ? w_rows_ : 0); }

  // ---------------------------------------------------------------------------------------------
  // Forward and backward

  /// \brief Inference forward, Y = f(X). No dropout. Const and re-entrant: several threads may call
  /// it on one adapter at once (as long as none merges, unmerges or changes parameters meanwhile).
  /// \param X d_in x N, one column per token. A column-major matrix, map or block is read in place;
  ///        any other expression (a row-major matrix, a product) is first evaluated into a temporary.
  /// \returns Y, d_out x N
  /// \throws ShapeError if X does not have d_in rows
  Matrix forward(const ConstMatrixRef& X) const {
    Matrix Y;
    forward_into(X, Y);
    return Y;
  }

  /// \brief Inference forward into a caller-owned Y, resized to d_out x N (no reallocation when it
  /// has that shape already; the adapter's own scratch is only r x N). If Y shares memory with X, the
  /// result is computed aside first, so it is still right.
  void forward_into(const ConstMatrixRef& X, Matrix& Y) const {
    check_input("forward", X);
    write_output(Y, w_rows_, X.cols(), detail::overlaps(Y, X), [&](Matrix& out) { derived().forward_impl(X, out); });
  }

  /// \brief Training forward: applies dropout (if configured) and records in `cache` what backward
  /// needs, including the dropout mask and a copy of X (so X may change or go away afterwards).
  /// \param X d_in x N
  /// \param cache caller-owned; its buffers are reused from call to call
  /// \returns Y, d_out x N
  /// \throws ShapeError if X does not have d_in rows; StateError while merged (cache left as it was)
  template <class Cache>
  Matrix forward(const ConstMatrixRef& X, Cache& cache) {
    Matrix Y;
    forward_into(X, Y, cache);
    return Y;
  }

  /// \brief Training forward into a caller-owned Y (see forward(X, cache) and forward_into(X, Y)).
  template <class Cache>
  void forward_into(const ConstMatrixRef& X, Matrix& Y, Cache& cache) {
    static_assert(std::is_same<Cache, typename Derived::Cache>::value,
                  "peft: pass this adapter's own Cache type (Adapter::Cache)");
    check_input("forward", X);
    if (is_merged())
      detail::raise<StateError>(where("forward"), "training forward (with a cache) while merged; call unmerge() first");
    cache.owner = nullptr;  // invalid until the forward completes
    write_output(Y, w_rows_, X.cols(), detail::overlaps(Y, X),
                 [&](Matrix& out) { derived().forward_train_impl(X, out, cache); });
    cache.owner = this;
    cache.state = State::state();
    cache.d_in = X.rows();
    cache.tokens = X.cols();
  }

  /// \brief Backward: accumulates parameter gradients (`+=`, until zero_grad()) and returns dL/dX.
  /// \param dY the upstream gradient dL/dY, d_out x N (N as in the forward that filled the cache)
  /// \param cache filled by this adapter's forward(X, cache), with no merge, unmerge or assignment of
  ///        the adapter since
  /// \returns dX, d_in x N, freshly computed (never accumulated)
  /// \throws ShapeError if dY's shape does not match; StateError while merged, or for a cache that is
  ///         empty, from another adapter, or stale. Nothing is accumulated when it throws.
  template <class Cache>
  Matrix backward(const ConstMatrixRef& dY, Cache& cache) {
    Matrix dX;
    backward_into(dY, cache, dX);
    return dX;
  }

  /// \brief Backward into a caller-owned dX (see backward(dY, cache)); dX may share memory with dY.
  template <class Cache>
  void backward_into(const ConstMatrixRef& dY, Cache& cache, Matrix& dX) {
    static_assert(std::is_same<Cache, typename Derived::Cache>::value,
                  "peft: pass this adapter's own Cache type (Adapter::Cache)");
    if (is_merged()) detail::raise<StateError>(where("backward"), "backward while merged; call unmerge() first");
    if (cache.owner == nullptr)
      detail::raise<StateError>(where("backward"), "the cache was not filled by a training forward(X, cache)");
    if (cache.owner != this)
      detail::raise<StateError>(where("backward"), "the cache was filled by another adapter");
    if (cache.state != State::state() || cache.d_in != w_cols_)
      detail::raise<StateError>(where("backward"),
                                "the cache is stale: the adapter was merged, unmerged or assigned to since its forward");
    detail::check_shape(where("backward"), "dY", dY.rows(), dY.cols(), w_rows_, cache.tokens);
    derived().check_cache_impl(cache);
    write_output(dX, w_cols_, cache.tokens, detail::overlaps(dX, dY),
                 [&](Matrix& out) { derived().backward_impl(dY, cache, out); });
  }

  // ---------------------------------------------------------------------------------------------
  // Merge for deployment

  /// \brief Writes the adapter into the weights (W <- W0 + dW); forward then costs exactly the base.
  /// The parameters of this moment are kept, so unmerge() takes out exactly what went in, even if the
  /// parameters are changed while merged.
  /// \throws StateError if already merged; NumericalError if a merged value would not be finite
  ///         (checked before anything is written: W and b stay untouched)
  void merge() {
    State::require(false, "merge");
    Vector snapshot = this->flat_values();  // allocated before W is touched: a bad_alloc leaves W as it was
    derived().merge_impl();
    State::set_merged(std::move(snapshot));
  }

  /// \brief Takes the merged delta back out of the weights (W <- W - dW), to within MATH.md's bound
  /// of W0.
  /// \throws StateError if not merged; NumericalError as merge (W and b untouched, still merged)
  void unmerge() {
    State::require(true, "unmerge");
    derived().unmerge_impl();
    State::set_unmerged();
  }

  /// \returns the change the adapter's current parameters make to W (d_out x d_in, allocated: not
  /// for hot paths).
  MatrixType delta_weight() const { return derived().delta_weight_impl(); }

  // Parameters: zero_grad(), parameters(), num_parameters(), flat_values(), flat_grads() come from
  // ParameterStore.

 protected:
  /// Binds W (and b when has_bias: it must have d_out entries) and allocates `num_values` parameters.
  /// \throws ShapeError for an empty W or a bias of the wrong size
  AdapterBase(Eigen::Ref<MatrixType> W, Scalar* b_data, Index b_size, bool has_bias, Index num_values)
      : Store(num_values),
        w_data_(W.data()),
        w_rows_(W.rows()),
        w_cols_(W.cols()),
        w_stride_(W.outerStride()),
        b_data_(has_bias ? b_data : nullptr) {
    if (w_rows_ == 0 || w_cols_ == 0)
      detail::raise<ShapeError>(where("constructor"), "W is ", w_rows_, "x", w_cols_, ", expected a non-empty matrix");
    if (has_bias && b_size != w_rows_)
      detail::raise<ShapeError>(where("constructor"), "b has ", b_size, " entries, expected d_out = ", w_rows_);
  }

  // Copy and move: MergeState (the first base) refuses copies of and assignments over a merged adapter
  // before anything else is touched, and makes this adapter's old caches stale on assignment.
  AdapterBase(const AdapterBase&) = default;
  AdapterBase(AdapterBase&&) noexcept = default;
  AdapterBase& operator=(const AdapterBase&) = default;
  AdapterBase& operator=(AdapterBase&&) = default;
  ~AdapterBase() = default;

  /// \returns the writable weight (the user's matrix).
  WeightMap weight_mut() { return WeightMap(w_data_, w_rows_, w_cols_, Eigen::OuterStride<>(w_stride_)); }
  /// \returns the writable bias (empty if none).
  BiasMap bias_mut() { return BiasMap(b_data_, b_data_ ? w_rows_ : 0); }

  /// \returns the value block of a parameter as it was at merge() (only while merged).
  Eigen::Map<const Matrix> merged_value(const ParameterInfo& info) const { return Store::block(State::snapshot(), info); }

  /// Throws StateError while merged (for a derived operation that needs the unmerged weight).
  void require_unmerged(const char* op) const { State::require(false, op); }

  /// \returns {"peft::LoRA", op}, printed "peft::LoRA::op" in messages.
  static constexpr detail::Where where(const char* op) { return {Derived::class_name, op}; }

  const Derived& derived() const { return static_cast<const Derived&>(*this); }
  Derived& derived() { return static_cast<Derived&>(*this); }

 private:
  /// Resizes `out` and lets `fill` write it; when `out` shares memory with an input (`alias`), fill
  /// writes a fresh matrix that then takes out's place, so the input is read intact.
  template <class Fill>
  static void write_output(Matrix& out, Index rows, Index cols, bool alias, Fill&& fill) {
    if (alias) {
      Matrix fresh(rows, cols);
      fill(fresh);
      out.swap(fresh);
    } else {
      out.resize(rows, cols);
      fill(out);
    }
  }

  void check_input(const char* op, const ConstMatrixRef& X) const {
    if (X.rows() != w_cols_)
      detail::raise<ShapeError>(where(op), "X is ", X.rows(), "x", X.cols(), ", expected ", w_cols_, " rows (d_in)");
  }

  Scalar* w_data_;
  Index w_rows_;
  Index w_cols_;
  Index w_stride_;
  Scalar* b_data_;
};

}  // namespace peft
