#pragma once
/// \file trainable_base.hpp
/// \brief What every trainable piece shares, written once: inference and training forward, backward,
/// the caller-owned cache (stamped by the training forward, checked by backward), outputs that may
/// share memory with inputs, and the applied state (merged into W, or folded into a neighbour) in
/// which training is refused. `AdapterBase` (the adapters) and `StandaloneSSF` derive from it.
///
/// This is the public extension contract: an adapter of your own derives from `peft::AdapterBase`
/// (docs/extending.md shows a complete one, examples/custom_adapter.cpp compiles it) and implements the
/// hooks listed at TrainableBase and AdapterBase, declaring `friend peft::AdapterAccess;` so that the
/// bases can call them while they stay private.

#include "peft/core/config.hpp"  // first: the detail headers check for it
#include "peft/core/error.hpp"
#include "peft/core/types.hpp"
#include "peft/detail/merge_state.hpp"
#include "peft/detail/parameter_store.hpp"
#include "peft/detail/restore_record.hpp"

#include <cstdint>
#include <functional>
#include <type_traits>
#include <utility>

namespace peft {

/// \brief What every Cache records of the training forward that filled it, so that backward can refuse
/// a cache that is empty, from another adapter, from another state (merged or unmerged since, or the
/// adapter assigned to), or of another input shape. An adapter's Cache derives from it and adds its
/// own buffers; TrainableBase fills and checks these fields, the adapter never writes them.
struct CacheStamp {
  const void* owner = nullptr;  ///< the object whose training forward filled it; null: never filled
  std::uint64_t state = 0;      ///< the owner's state counter at that time
  Index d_in = 0;               ///< rows of X
  Index tokens = 0;             ///< columns of X (N)
};

/// \brief The one friend an adapter declares (`friend peft::AdapterAccess;`): the bases call the
/// adapter's private hooks through it, and nothing else does.
struct AdapterAccess {
  template <class D, class... Args>
  static void forward(const D& d, Args&&... args) { d.forward_impl(std::forward<Args>(args)...); }
  template <class D, class... Args>
  static void forward_train(D& d, Args&&... args) { d.forward_train_impl(std::forward<Args>(args)...); }
  /// backward_impl takes dX as `Matrix&`, or as `Matrix*`, which backward_params() passes null: an
  /// adapter that takes the pointer skips the input gradient then; for one that takes the reference,
  /// backward_params() computes dX into a scratch and drops it.
  template <class D, class Dy, class Cache>
  static void backward(D& d, const Dy& dY, Cache& cache, typename D::Matrix& dX) {
    if constexpr (takes_optional_dx<D, Dy, Cache>(0))
      d.backward_impl(dY, cache, &dX);
    else
      d.backward_impl(dY, cache, dX);
  }
  template <class D, class Dy, class Cache>
  static void backward_params(D& d, const Dy& dY, Cache& cache) {
    if constexpr (takes_optional_dx<D, Dy, Cache>(0)) {
      d.backward_impl(dY, cache, static_cast<typename D::Matrix*>(nullptr));
    } else {
      typename D::Matrix dX(d.input_size(), cache.tokens);
      d.backward_impl(dY, cache, dX);
    }
  }
  template <class D, class Cache>
  static void check_cache(const D& d, const Cache& cache) { d.check_cache_impl(cache); }
  template <class D>
  static void merge(D& d) { d.merge_impl(); }
  template <class D>
  static void unmerge(D& d) { d.unmerge_impl(); }
  template <class D>
  static auto delta_weight(const D& d) { return d.delta_weight_impl(); }

 private:
  template <class D, class Dy, class Cache>
  static constexpr auto takes_optional_dx(int)
      -> decltype(std::declval<D&>().backward_impl(std::declval<const Dy&>(), std::declval<Cache&>(),
                                                   std::declval<typename D::Matrix*>()),
                  bool()) {
    return true;
  }
  template <class D, class Dy, class Cache>
  static constexpr bool takes_optional_dx(long) {
    return false;
  }
};

namespace detail {

/// \returns whether the storage of two dense matrices (plain, map, block or Ref) overlaps.
template <class A, class B>
bool overlaps(const A& a, const B& b) {
  if (a.size() == 0 || b.size() == 0) return false;
  const auto span = [](const auto& m) {
    const auto* first = reinterpret_cast<const char*>(m.data());
    const auto* last = reinterpret_cast<const char*>(m.data() + (m.outerSize() - 1) * m.outerStride() + m.innerSize());
    return std::make_pair(first, last);
  };
  const auto sa = span(a);
  const auto sb = span(b);
  return std::less<const char*>()(sa.first, sb.second) && std::less<const char*>()(sb.first, sa.second);
}

}  // namespace detail

/// \brief CRTP base of everything that trains from a user's loop (see the file comment).
///
/// The derived class provides, for the bases only (private, with `friend peft::AdapterAccess;`):
///
///     static constexpr const char* class_name;       // "peft::LoRA", prefixes every message
///     static constexpr const char* applied_state;    // "merged" (or "folded"): the state refusing training
///     static constexpr const char* undo_call;        // "unmerge()": how to leave it, for messages
///     struct Cache : peft::CacheStamp { ... };        // public: what backward needs
///     Index input_size() const;  Index output_size() const;   // d_in and d_out of X and Y
///     const std::array<ParameterInfo, K>& parameter_layout() const;   // public (ParameterStore)
///     void forward_impl(const ConstMatrixRef& X, Matrix& Y) const;          // Y sized d_out x N already
///     void forward_train_impl(const ConstMatrixRef& X, Matrix& Y, Cache&);  // fills its Cache buffers
///     void check_cache_impl(const Cache&) const;     // StateError if its buffers do not fit
///     void backward_impl(const ConstMatrixRef& dY, Cache&, Matrix& dX);     // dX sized d_in x N already;
///                                                    // accumulates parameter gradients with +=
///                                                    // (or Matrix* dX: null from backward_params(),
///                                                    // to skip the input gradient)
///
/// When the hooks run, the base has already checked X's rows, dY's shape, the applied state, and the
/// cache's stamp (owner, state, d_in, N); outputs never alias inputs (the base computes aside first).
template <class Derived, class Scalar_>
class TrainableBase : private detail::MergeState<Derived, Scalar_>, public ParameterStore<Derived, Scalar_> {
  using State = detail::MergeState<Derived, Scalar_>;
  using Store = ParameterStore<Derived, Scalar_>;

 public:
  using Scalar = Scalar_;                               ///< float or double
  using Index = peft::Index;                            ///< Eigen's index type
  using Matrix = MatrixX<Scalar>;                       ///< activations and parameters (column-major)
  using Vector = VectorX<Scalar>;                       ///< biases and flat buffers
  using ConstMatrixRef = Eigen::Ref<const Matrix>;      ///< how inputs are taken: no copy of a
                                                        ///< column-major matrix, map or block

  /// \brief Inference forward, Y = f(X), without dropout. Const and re-entrant: several threads may
  /// call it on one object at once (as long as none merges, folds or changes parameters meanwhile).
  /// \param X input_size() x N, one column per token. A column-major matrix, map or block is read in
  ///        place; any other expression (a row-major matrix, a product) is first evaluated.
  /// \returns Y, output_size() x N
  /// \throws ShapeError if X does not have input_size() rows
  Matrix forward(const ConstMatrixRef& X) const {
    Matrix Y;
    forward_into(X, Y);
    return Y;
  }

  /// \brief Inference forward into a caller-owned Y, resized to output_size() x N (no reallocation
  /// when it has that shape already). Y may share memory with X.
  void forward_into(const ConstMatrixRef& X, Matrix& Y) const {
    check_input("forward", X);
    write_output(Y, derived().output_size(), X.cols(), detail::overlaps(Y, X),
                 [&](Matrix& out) { AdapterAccess::forward(derived(), X, out); });
  }

  /// \brief Whether a merge (or fold) keeps what its reverse needs to give the weights back bit for bit,
  /// however many merges and unmerges follow (docs/math.md, Exact restore). On by default. The cost:
  /// one byte per element of the weight while merged (25 % of a float weight's memory, 12.5 % of a
  /// double one's), and the times in docs/concepts.md, Merge and unmerge, bit for bit.
  bool exact_restore() const { return exact_restore_; }
  /// \brief Switches the exact restore on or off for the next merge (or fold).
  /// \throws StateError while merged (or folded)
  void set_exact_restore(bool on) {
    require_applied(false, "set_exact_restore");
    exact_restore_ = on;
  }
  /// \returns whether the last unmerge (or unfold) gave the weights back bit for bit: false when the
  /// exact restore was off, or when a weight was written while merged (its written parts then got the
  /// ordinary reverse, as with the exact restore off). True before any unmerge.
  bool last_restore_exact() const { return last_restore_exact_; }
  /// \returns the bytes kept for the exact restore: while merged (or folded), else 0.
  std::size_t restore_bytes() const { return record_.bytes() + vectors_[0].bytes() + vectors_[1].bytes(); }

  /// \brief Training forward: applies dropout (if the adapter has it) and records in `cache` what
  /// backward needs, including a copy of what it needs of X (so X may change or go away afterwards).
  /// \param cache caller-owned, of this type's own `Cache`; its buffers are reused from call to call
  /// \throws ShapeError for X's rows; StateError while applied (merged or folded); the cache is then
  ///         left unusable
  template <class Cache>
  Matrix forward(const ConstMatrixRef& X, Cache& cache) {
    Matrix Y;
    forward_into(X, Y, cache);
    return Y;
  }

  /// \brief Training forward into a caller-owned Y (see forward(X, cache)); Y may share memory with X.
  template <class Cache>
  void forward_into(const ConstMatrixRef& X, Matrix& Y, Cache& cache) {
    static_assert(std::is_same<Cache, typename Derived::Cache>::value,
                  "peft: pass this adapter's own Cache type (Adapter::Cache)");
    check_input("forward", X);
    if (State::merged())
      detail::raise<StateError>(where("forward"), "training forward (with a cache) while ", Derived::applied_state,
                                "; call ", Derived::undo_call, " first");
    cache.owner = nullptr;  // unusable until the forward completes
    write_output(Y, derived().output_size(), X.cols(), detail::overlaps(Y, X),
                 [&](Matrix& out) { AdapterAccess::forward_train(derived(), X, out, cache); });
    cache.owner = this;
    cache.state = State::state();
    cache.d_in = X.rows();
    cache.tokens = X.cols();
  }

  /// \brief Backward: accumulates parameter gradients (`+=`, until zero_grad()) and returns dL/dX.
  /// \param dY the upstream gradient dL/dY, output_size() x N (N as in the forward that filled cache)
  /// \param cache filled by this object's forward(X, cache), with no merge, unmerge, fold or assignment
  ///        since
  /// \returns dX, input_size() x N, freshly computed (never accumulated)
  /// \throws ShapeError if dY's shape does not match; StateError while applied, or for a cache that is
  ///         empty, from another object, stale, or whose buffers do not fit. Nothing is accumulated then.
  template <class Cache>
  Matrix backward(const ConstMatrixRef& dY, Cache& cache) {
    Matrix dX;
    backward_into(dY, cache, dX);
    return dX;
  }

  /// \brief Backward into a caller-owned dX (see backward(dY, cache)); dX may share memory with dY.
  template <class Cache>
  void backward_into(const ConstMatrixRef& dY, Cache& cache, Matrix& dX) {
    check_backward("backward", dY, cache);
    write_output(dX, derived().input_size(), cache.tokens, detail::overlaps(dX, dY),
                 [&](Matrix& out) { AdapterAccess::backward(derived(), dY, cache, out); });
  }

  /// \brief Backward for a layer whose input needs no gradient (the first layer of a network, fed the
  /// data): accumulates the parameter gradients as backward() does, and computes no dL/dX. That skips
  /// the base's `Wᵀ dY`, one of a training step's two large products with the weight (PyTorch skips it
  /// when the input does not require grad). Same arguments, checks and errors as backward().
  template <class Cache>
  void backward_params(const ConstMatrixRef& dY, Cache& cache) {
    check_backward("backward_params", dY, cache);
    AdapterAccess::backward_params(derived(), dY, cache);
  }

  // Parameters: zero_grad(), parameters(), num_parameters(), flat_values(), flat_grads() come from
  // ParameterStore.

 protected:
  /// Allocates `num_values` parameters and as many gradients, all zero.
  explicit TrainableBase(Index num_values) : Store(num_values) {}

  // Copy and move: MergeState (the first base) refuses copies of and assignments over an applied
  // object before anything else is touched, and makes this object's old caches stale on assignment.
  TrainableBase(const TrainableBase&) = default;
  TrainableBase(TrainableBase&&) noexcept = default;
  TrainableBase& operator=(const TrainableBase&) = default;
  TrainableBase& operator=(TrainableBase&&) = default;
  ~TrainableBase() = default;

  /// \returns whether applied (merged into W, or folded into a neighbour).
  bool applied() const { return State::merged(); }
  /// Throws StateError unless the applied state is `want_applied` (for the operation `op`).
  void require_applied(bool want_applied, const char* op) const { State::require(want_applied, op); }
  /// Records a completed merge or fold with the parameters it used (moved in; allocated before the
  /// weights were written, so nothing can fail after them).
  void set_applied(Vector&& parameters) noexcept { State::set_merged(std::move(parameters)); }
  /// Records a completed unmerge or unfold, bit for bit if note_restore(true) was called since the
  /// last one; the restore records are freed.
  void set_unapplied() noexcept {
    State::set_unmerged();
    record_.clear();
    vectors_[0].clear();
    vectors_[1].clear();
    last_restore_exact_ = noted_exact_;
    noted_exact_ = false;
  }
  /// Notes, during an unmerge or unfold, whether it gives the weights back bit for bit.
  void note_restore(bool exact) noexcept { noted_exact_ = exact; }
  /// The exact restore's record of a weight, filled by a merge (or fold) when exact_restore() is on.
  detail::RestoreRecord<Scalar>& restore_record() { return record_; }
  const detail::RestoreRecord<Scalar>& restore_record() const { return record_; }
  /// The exact restore's records of up to two vectors (a bias; a LayerNorm's weight and bias).
  detail::VectorRecord<Scalar>& vector_record(std::size_t k) { return vectors_[k]; }
  const detail::VectorRecord<Scalar>& vector_record(std::size_t k) const { return vectors_[k]; }
  /// \returns the parameter values as they were when applied (only while applied).
  const Vector& applied_values() const { return State::snapshot(); }
  /// \returns the value block of a parameter as it was when applied (only while applied).
  Eigen::Map<const Matrix> applied_value(const ParameterInfo& info) const { return Store::block(State::snapshot(), info); }

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

  template <class Cache>
  void check_backward(const char* op, const ConstMatrixRef& dY, const Cache& cache) const {
    static_assert(std::is_same<Cache, typename Derived::Cache>::value,
                  "peft: pass this adapter's own Cache type (Adapter::Cache)");
    const detail::Where w = where(op);
    if (State::merged())
      detail::raise<StateError>(w, op, " while ", Derived::applied_state, "; call ", Derived::undo_call, " first");
    if (cache.owner == nullptr) detail::raise<StateError>(w, "the cache was not filled by a training forward(X, cache)");
    if (cache.owner != this) detail::raise<StateError>(w, "the cache was filled by another adapter");
    if (cache.state != State::state() || cache.d_in != derived().input_size())
      detail::raise<StateError>(w, "the cache is stale: the adapter was ", Derived::applied_state,
                                ", restored or assigned to since its forward");
    detail::check_shape(w, "dY", dY.rows(), dY.cols(), derived().output_size(), cache.tokens);
    AdapterAccess::check_cache(derived(), cache);
  }

  void check_input(const char* op, const ConstMatrixRef& X) const {
    if (X.rows() != derived().input_size())
      detail::raise<ShapeError>(where(op), "X is ", X.rows(), "x", X.cols(), ", expected ", derived().input_size(),
                                " rows");
  }

  detail::RestoreRecord<Scalar> record_;
  detail::VectorRecord<Scalar> vectors_[2];
  bool exact_restore_ = true;
  bool last_restore_exact_ = true;
  bool noted_exact_ = false;
};

}  // namespace peft
