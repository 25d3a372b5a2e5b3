#pragma once
/// \file any_adapter.hpp
/// \brief `peft::AnyAdapter<Scalar>`: one move-only handle for an adapter of any kind (LoRA, DoRA, SSF,
/// PiSSA, or one of your own), chosen at run time, e.g. from a file's `use_dora`. It forwards every
/// call to the adapter it owns through one virtual call, and erases the adapter's Cache type too.

#include "peft/core/error.hpp"
#include "peft/core/parameter.hpp"
#include "peft/core/traits.hpp"
#include "peft/core/types.hpp"

#include <memory>
#include <string>
#include <type_traits>
#include <typeinfo>
#include <utility>
#include <vector>

namespace peft {

/// \brief The LoRA arithmetic of an adapter that has one: rank, alpha and rsLoRA, from which PEFT's
/// scaling s = alpha / rank (or alpha / √rank) follows. rank 0 for adapters without factors (SSF).
struct LoRAShape {
  Index rank = 0;
  double alpha = 0;
  bool use_rslora = false;
};

/// \brief What an adapter is saved as in a Hugging Face PEFT directory: its tensors under PEFT's names
/// ("lora_A", "lora_B", "lora_magnitude_vector", "ssf_scale", ...) and the LoRA arithmetic they need.
/// For every adapter but PiSSA these are its parameters; PiSSA is saved as its rank-2r LoRA on the
/// original weight (PiSSA::to_lora()), which loads onto the unmodified base.
template <class Scalar>
struct SavedForm {
  std::vector<std::pair<std::string, MatrixX<Scalar>>> tensors;
  LoRAShape lora;
  bool converted = false;  ///< true when the tensors are a conversion (PiSSA's), not the parameters
};

namespace detail {

template <class A, class = void>
struct has_exact_restore : std::false_type {};
template <class A>
struct has_exact_restore<A, void_t<decltype(std::declval<A&>().set_exact_restore(true)),
                                   decltype(bool(std::declval<const A&>().last_restore_exact()))>> : std::true_type {};

template <class A, class = void>
struct has_random_stream : std::false_type {};
template <class A>
struct has_random_stream<A, void_t<decltype(std::declval<const A&>().random_state()),
                                  decltype(std::declval<A&>().set_random_state(std::string()))>> : std::true_type {};

template <class A, class = void>
struct has_lora_config : std::false_type {};
template <class A>
struct has_lora_config<A, void_t<decltype(std::declval<const A&>().config().rank),
                                 decltype(std::declval<const A&>().config().alpha),
                                 decltype(std::declval<const A&>().config().use_rslora)>> : std::true_type {};

template <class A, class = void>
struct has_to_lora : std::false_type {};
template <class A>
struct has_to_lora<A, void_t<decltype(std::declval<const A&>().to_lora().A)>> : std::true_type {};

template <class A, class = void>
struct has_static_class_name : std::false_type {};
template <class A>
struct has_static_class_name<A, void_t<decltype(A::class_name)>> : std::true_type {};

template <class Scalar>
struct AnyCacheBase {
  virtual ~AnyCacheBase() = default;
  virtual const std::type_info& adapter_type() const = 0;
};

template <class A>
struct AnyCacheModel final : AnyCacheBase<typename A::Scalar> {
  typename A::Cache cache;
  const std::type_info& adapter_type() const override { return typeid(A); }
};

template <class Scalar>
struct AnyAdapterBase {
  using Matrix = MatrixX<Scalar>;
  using ConstMatrixRef = Eigen::Ref<const Matrix>;
  virtual ~AnyAdapterBase() = default;
  virtual const std::type_info& type() const = 0;
  virtual const char* class_name() const = 0;
  virtual Index input_size() const = 0;
  virtual Index output_size() const = 0;
  virtual void forward_into(const ConstMatrixRef& X, Matrix& Y) const = 0;
  virtual std::unique_ptr<AnyCacheBase<Scalar>> make_cache() const = 0;
  virtual void forward_train(const ConstMatrixRef& X, Matrix& Y, AnyCacheBase<Scalar>& cache) = 0;
  virtual void backward(const ConstMatrixRef& dY, AnyCacheBase<Scalar>& cache, Matrix& dX) = 0;
  virtual void backward_params(const ConstMatrixRef& dY, AnyCacheBase<Scalar>& cache) = 0;
  virtual void merge() = 0;
  virtual void unmerge() = 0;
  virtual bool is_merged() const = 0;
  virtual void set_exact_restore(bool on) = 0;
  virtual bool last_restore_exact() const = 0;
  virtual Matrix delta_weight() const = 0;
  virtual std::vector<Parameter<Scalar>> parameters() = 0;
  virtual std::vector<ConstParameter<Scalar>> parameters() const = 0;
  virtual void zero_grad() = 0;
  virtual Index num_parameters() const = 0;
  virtual Eigen::Map<VectorX<Scalar>> flat_values() = 0;
  virtual Eigen::Map<VectorX<Scalar>> flat_grads() = 0;
  virtual bool has_random_state() const = 0;
  virtual std::string random_state() const = 0;
  virtual void set_random_state(const std::string& state) = 0;
  virtual LoRAShape lora_shape() const = 0;
  virtual SavedForm<Scalar> saved_form() const = 0;
  virtual void* get() = 0;
};

template <class A>
class AnyAdapterModel final : public AnyAdapterBase<typename A::Scalar> {
  using Scalar = typename A::Scalar;
  using Base = AnyAdapterBase<Scalar>;
  using typename Base::ConstMatrixRef;
  using typename Base::Matrix;

 public:
  explicit AnyAdapterModel(A&& a) : a_(std::move(a)) {}

  const std::type_info& type() const override { return typeid(A); }
  const char* class_name() const override {
    if constexpr (has_static_class_name<A>::value)
      return A::class_name;
    else
      return "adapter";
  }
  Index input_size() const override { return a_.input_size(); }
  Index output_size() const override { return a_.output_size(); }
  void forward_into(const ConstMatrixRef& X, Matrix& Y) const override { a_.forward_into(X, Y); }
  std::unique_ptr<AnyCacheBase<Scalar>> make_cache() const override { return std::make_unique<AnyCacheModel<A>>(); }
  void forward_train(const ConstMatrixRef& X, Matrix& Y, AnyCacheBase<Scalar>& cache) override {
    a_.forward_into(X, Y, static_cast<AnyCacheModel<A>&>(cache).cache);
  }
  void backward(const ConstMatrixRef& dY, AnyCacheBase<Scalar>& cache, Matrix& dX) override {
    a_.backward_into(dY, static_cast<AnyCacheModel<A>&>(cache).cache, dX);
  }
  void backward_params(const ConstMatrixRef& dY, AnyCacheBase<Scalar>& cache) override {
    a_.backward_params(dY, static_cast<AnyCacheModel<A>&>(cache).cache);
  }
  void merge() override { a_.merge(); }
  void unmerge() override { a_.unmerge(); }
  bool is_merged() const override { return a_.is_merged(); }
  void set_exact_restore(bool on) override {
    if constexpr (has_exact_restore<A>::value) a_.set_exact_restore(on);
    else if (on)
      throw ConfigError(std::string("peft::AnyAdapter::set_exact_restore: a ") + class_name() +
                        " has no exact restore");
  }
  bool last_restore_exact() const override {
    if constexpr (has_exact_restore<A>::value)
      return a_.last_restore_exact();
    else
      return false;
  }
  Matrix delta_weight() const override { return Matrix(a_.delta_weight()); }
  std::vector<Parameter<Scalar>> parameters() override { return a_.parameters(); }
  std::vector<ConstParameter<Scalar>> parameters() const override { return a_.parameters(); }
  void zero_grad() override { a_.zero_grad(); }
  Index num_parameters() const override { return a_.num_parameters(); }
  Eigen::Map<VectorX<Scalar>> flat_values() override { return a_.flat_values(); }
  Eigen::Map<VectorX<Scalar>> flat_grads() override { return a_.flat_grads(); }
  bool has_random_state() const override { return has_random_stream<A>::value; }
  std::string random_state() const override {
    if constexpr (has_random_stream<A>::value)
      return a_.random_state();
    else
      return {};
  }
  void set_random_state(const std::string& state) override {
    if constexpr (has_random_stream<A>::value) a_.set_random_state(state);
    else if (!state.empty())
      throw ConfigError(std::string("peft::AnyAdapter::set_random_state: a ") + class_name() +
                        " has no random stream to restore");
  }
  LoRAShape lora_shape() const override {
    if constexpr (has_lora_config<A>::value)
      return {Index(a_.config().rank), double(a_.config().alpha), bool(a_.config().use_rslora)};
    else
      return {};
  }
  SavedForm<Scalar> saved_form() const override {
    SavedForm<Scalar> out;
    if constexpr (has_to_lora<A>::value) {
      auto e = a_.to_lora();
      out.tensors.emplace_back("lora_A", std::move(e.A));
      out.tensors.emplace_back("lora_B", std::move(e.B));
      out.lora = {Index(e.config.rank), double(e.config.alpha), bool(e.config.use_rslora)};
      out.converted = true;
    } else {
      for (const auto& p : a_.parameters()) out.tensors.emplace_back(p.name, MatrixX<Scalar>(p.value));
      out.lora = lora_shape();
    }
    return out;
  }
  void* get() override { return &a_; }

 private:
  A a_;
};

}  // namespace detail

/// \brief A move-only handle that owns one adapter of any type with the given Scalar (any storage order
/// of its weight) and forwards the adapter interface to it: forward, training forward and backward
/// with a type-erased `Cache`, merge and unmerge, `delta_weight()` (always column-major), the named
/// parameters and the flat buffers. It is itself an adapter (`peft::is_adapter_v`), so an optimizer
/// registers it like any other.
///
/// Any type `A` with `peft::is_adapter_v<A>` and `A::Scalar == Scalar` is accepted, including your own
/// (docs/extending.md): a new adapter kind needs no change here. Optional members are used when present:
/// `random_state()` / `set_random_state()` (the dropout stream, saved in checkpoints), `config()` with
/// `rank`, `alpha`, `use_rslora` (the LoRA arithmetic written to PEFT's config), and `to_lora()` (an
/// adapter saved in PEFT's files as a LoRA on the original weight, as PiSSA is).
///
/// Each call costs one virtual call on top of the adapter's own. A moved-from handle holds nothing:
/// every call but assignment and destruction then throws StateError.
template <class Scalar_>
class AnyAdapter {
 public:
  using Scalar = Scalar_;
  using Index = peft::Index;
  using Matrix = MatrixX<Scalar>;
  using Vector = VectorX<Scalar>;
  using MatrixType = Matrix;  ///< the type of delta_weight()
  using ConstMatrixRef = Eigen::Ref<const Matrix>;

  /// \brief The cache of a training forward, of whichever adapter type the handle holds; created by the
  /// first training forward and reused (as the adapter's own Cache) while it fits.
  class Cache {
   public:
    Cache() = default;
    Cache(Cache&&) noexcept = default;
    Cache& operator=(Cache&&) noexcept = default;

   private:
    friend class AnyAdapter;
    std::unique_ptr<detail::AnyCacheBase<Scalar>> impl_;
  };

  /// An empty handle (holds() == false).
  AnyAdapter() = default;

  /// \brief Takes ownership of `adapter` (moved in).
  template <class A, class D = std::decay_t<A>,
            class = std::enable_if_t<!std::is_same<D, AnyAdapter>::value && !std::is_lvalue_reference<A>::value>>
  explicit AnyAdapter(A&& adapter) : impl_(std::make_unique<detail::AnyAdapterModel<D>>(std::move(adapter))) {
    static_assert(is_adapter_v<D>, "peft::AnyAdapter holds adapters (peft::is_adapter_v)");
    static_assert(std::is_same<typename D::Scalar, Scalar>::value, "peft::AnyAdapter: the adapter's Scalar differs");
  }

  AnyAdapter(AnyAdapter&&) noexcept = default;
  AnyAdapter& operator=(AnyAdapter&&) noexcept = default;
  AnyAdapter(const AnyAdapter&) = delete;
  AnyAdapter& operator=(const AnyAdapter&) = delete;
  ~AnyAdapter() = default;

  /// \returns whether the handle holds an adapter.
  bool holds() const { return impl_ != nullptr; }
  /// \returns the held adapter's type.
  const std::type_info& type() const { return self("type").type(); }
  /// \returns the held adapter's class_name ("peft::LoRA"), or "adapter" for a type without one.
  const char* class_name() const { return self("class_name").class_name(); }
  /// \returns the held adapter, or nullptr if it is not an `A`.
  template <class A>
  A* get() {
    return impl_ && impl_->type() == typeid(A) ? static_cast<A*>(impl_->get()) : nullptr;
  }
  template <class A>
  const A* get() const {
    return impl_ && impl_->type() == typeid(A) ? static_cast<const A*>(impl_->get()) : nullptr;
  }

  Index input_size() const { return self("input_size").input_size(); }
  Index output_size() const { return self("output_size").output_size(); }
  Index d_in() const { return input_size(); }
  Index d_out() const { return output_size(); }

  /// Inference forward (the adapter's forward(X)).
  Matrix forward(const ConstMatrixRef& X) const {
    Matrix Y;
    forward_into(X, Y);
    return Y;
  }
  void forward_into(const ConstMatrixRef& X, Matrix& Y) const { self("forward").forward_into(X, Y); }

  /// Training forward (the adapter's forward(X, cache)).
  Matrix forward(const ConstMatrixRef& X, Cache& cache) {
    Matrix Y;
    forward_into(X, Y, cache);
    return Y;
  }
  void forward_into(const ConstMatrixRef& X, Matrix& Y, Cache& cache) {
    auto& a = self("forward");
    if (!cache.impl_ || cache.impl_->adapter_type() != a.type()) cache.impl_ = a.make_cache();
    a.forward_train(X, Y, *cache.impl_);
  }

  /// Backward (the adapter's backward(dY, cache)).
  /// \throws StateError for a cache no training forward of an adapter of this type filled, and as the
  ///         adapter's backward
  Matrix backward(const ConstMatrixRef& dY, Cache& cache) {
    Matrix dX;
    backward_into(dY, cache, dX);
    return dX;
  }
  void backward_into(const ConstMatrixRef& dY, Cache& cache, Matrix& dX) {
    auto& a = checked_cache("backward", cache);
    a.backward(dY, *cache.impl_, dX);
  }
  /// Backward without the input gradient (the adapter's backward_params(dY, cache)).
  /// \throws as backward_into
  void backward_params(const ConstMatrixRef& dY, Cache& cache) {
    auto& a = checked_cache("backward_params", cache);
    a.backward_params(dY, *cache.impl_);
  }

  void merge() { self("merge").merge(); }
  void unmerge() { self("unmerge").unmerge(); }
  bool is_merged() const { return self("is_merged").is_merged(); }
  /// \brief The adapter's set_exact_restore() (the library's adapters have it; on, for one without it,
  /// ConfigError). \throws StateError while merged
  void set_exact_restore(bool on) { self("set_exact_restore").set_exact_restore(on); }
  /// \returns the adapter's last_restore_exact() (false for one without the exact restore).
  bool last_restore_exact() const { return self("last_restore_exact").last_restore_exact(); }
  /// \returns the change the adapter's parameters make to W, column-major (allocated).
  Matrix delta_weight() const { return self("delta_weight").delta_weight(); }

  std::vector<Parameter<Scalar>> parameters() { return self("parameters").parameters(); }
  std::vector<ConstParameter<Scalar>> parameters() const { return self("parameters").parameters(); }
  void zero_grad() { self("zero_grad").zero_grad(); }
  Index num_parameters() const { return self("num_parameters").num_parameters(); }
  Eigen::Map<Vector> flat_values() { return self("flat_values").flat_values(); }
  Eigen::Map<Vector> flat_grads() { return self("flat_grads").flat_grads(); }

  /// \returns whether the adapter has a random stream (dropout masks) to save in a checkpoint.
  bool has_random_state() const { return self("has_random_state").has_random_state(); }
  /// \returns its state ("" when it has none).
  std::string random_state() const { return self("random_state").random_state(); }
  /// \brief Restores it. \throws ConfigError for a state that is not one, or a non-empty one for an
  /// adapter without a stream.
  void set_random_state(const std::string& state) { self("set_random_state").set_random_state(state); }
  /// \returns rank, alpha and rsLoRA (rank 0 without LoRA factors).
  LoRAShape lora_shape() const { return self("lora_shape").lora_shape(); }
  /// \returns the tensors the adapter is saved as in PEFT's files (allocated).
  SavedForm<Scalar> saved_form() const { return self("saved_form").saved_form(); }

 private:
  detail::AnyAdapterBase<Scalar>& self(const char* op) {
    if (!impl_) empty(op);
    return *impl_;
  }
  const detail::AnyAdapterBase<Scalar>& self(const char* op) const {
    if (!impl_) empty(op);
    return *impl_;
  }
  detail::AnyAdapterBase<Scalar>& checked_cache(const char* op, const Cache& cache) {
    auto& a = self(op);
    if (!cache.impl_)
      throw StateError(std::string(a.class_name()) + "::" + op +
                       ": the cache was not filled by a training forward(X, cache)");
    if (cache.impl_->adapter_type() != a.type())
      throw StateError(std::string(a.class_name()) + "::" + op + ": the cache was filled by another adapter");
    return a;
  }
  [[noreturn]] static void empty(const char* op) {
    throw StateError(std::string("peft::AnyAdapter::") + op + ": the handle is empty (moved from)");
  }

  std::unique_ptr<detail::AnyAdapterBase<Scalar>> impl_;
};

}  // namespace peft
