#pragma once
/// \file optimizer.hpp
/// \brief What every optimizer shares (CRTP): registering adapters and plain Eigen matrices, per-parameter
/// options (learning-rate scale, weight decay, LoRA+), zeroing gradients, clipping by global norm, the
/// learning rate and the step count, and the optimizer state kept in the parameters' layout.
///
/// The optimizers themselves (`peft::SGD`, `peft::AdamW`) only say how one parameter block is updated.

#include "peft/core/config.hpp"  // first: the detail headers check for it
#include "peft/core/error.hpp"
#include "peft/core/parameter.hpp"
#include "peft/core/traits.hpp"
#include "peft/core/types.hpp"
#include "peft/detail/checks.hpp"

#include <cmath>
#include <cstdint>
#include <functional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace peft {

namespace detail {

template <class T, class = void>
struct has_class_name : std::false_type {};
template <class T>
struct has_class_name<T, void_t<decltype(T::class_name)>> : std::true_type {};

/// \returns T::class_name ("peft::LoRA"), or "trainable" for a type without one.
template <class T>
const char* class_name_of() {
  if constexpr (has_class_name<T>::value)
    return T::class_name;
  else
    return "trainable";
}

}  // namespace detail

/// \brief How one registered parameter (or every parameter of one adapter) is optimized.
struct ParamOptions {
  /// This parameter's learning rate is the optimizer's times lr_scale.
  double lr_scale = 1.0;
  /// Whether the optimizer's weight decay applies (usually off for biases and norms' gains).
  bool weight_decay = true;
  /// LoRA+ (Hayou et al., 2024): a parameter named "lora_B" gets lr_scale * lora_B_ratio; every other
  /// parameter gets lr_scale. 1 turns it off. (Hugging Face PEFT's create_loraplus_optimizer also puts
  /// every 1-D parameter, e.g. DoRA's magnitude, in the B group; here only lora_B is scaled.)
  double lora_B_ratio = 1.0;
  /// Names of the registered parameters become "<prefix>.<name>" (just "<name>" when empty).
  std::string prefix;
};

/// \returns options for LoRA+: lora_B learns `ratio` times faster than lora_A (16 in the LoRA+ paper).
inline ParamOptions lora_plus(double ratio = 16.0) {
  ParamOptions options;
  options.lora_B_ratio = ratio;
  return options;
}

/// \brief One registered parameter block, as the optimizer sees it.
struct OptimizerSlot {
  std::string name;     ///< "<prefix>.<name>", e.g. "layer1.lora_B" or "head.weight"
  Index rows;           ///< shape of the block
  Index cols;
  Index offset;         ///< where its state starts in the optimizer's flat state buffers
  double lr_scale;      ///< its learning rate is lr() * lr_scale
  bool weight_decay;    ///< whether weight decay applies to it
  std::int64_t steps;   ///< updates it has received (bias correction counts from its registration)

  /// \returns rows * cols.
  Index size() const { return rows * cols; }
};

/// \brief One registered parameter block as flat storage (OptimizerBase::flat_parameters()): its value
/// and its gradient, slot->size() scalars each, in the registered object's own storage order. What
/// distributed training broadcasts and reduces (peft/distributed/mpi.hpp), without a copy.
template <class Scalar>
struct FlatParameter {
  const OptimizerSlot* slot;          ///< name, shape, options; valid until the optimizer's next add()
  Eigen::Map<VectorX<Scalar>> value;  ///< the parameter's storage; writing it changes the parameter
  Eigen::Map<VectorX<Scalar>> grad;   ///< its gradient's storage
};

/// \brief The saved state of one registered parameter block (OptimizerBase::state_dict()).
template <class Scalar>
struct OptimizerSlotState {
  std::string name;                     ///< the slot's name, e.g. "layers.0.q_proj.lora_A"
  Index rows = 0;                       ///< its shape
  Index cols = 0;
  std::int64_t steps = 0;               ///< updates it has received
  std::vector<VectorX<Scalar>> buffers; ///< one per state buffer, in state_names() order (rows * cols each)
};

/// \brief Everything an optimizer carries from step to step, by parameter name: what a training
/// checkpoint saves so that a resumed run continues bit for bit (OptimizerBase::state_dict()).
template <class Scalar>
struct OptimizerState {
  std::string optimizer;                  ///< class_name of the optimizer that saved it ("peft::AdamW")
  std::vector<std::string> buffer_names;  ///< its state buffers ("exp_avg", "exp_avg_sq")
  std::int64_t step_count = 0;            ///< step() calls
  double lr = 0;                          ///< the learning rate the next step() uses
  std::vector<OptimizerSlotState<Scalar>> slots;  ///< in registration order
};

/// \brief The shared part of every optimizer (CRTP). `Derived` provides `class_name`, the names of its
/// state buffers (`state_names`, an array of const char*, as PyTorch names them), and `update_slot(slot, value, grad, lr)` (lr in double, as
/// PyTorch keeps hyper-parameters).
///
/// The optimizer keeps pointers to the storage it was given, like a PyTorch optimizer keeps tensors:
/// the adapters and matrices must outlive it and must not be resized or reassigned (an adapter's
/// parameters live in one heap buffer that a move keeps, but a copy-assignment into it replaces).
/// State (momentum, moments) lives in flat buffers laid out slot after slot, in registration order.
template <class Derived, class Scalar_>
class OptimizerBase {
 public:
  using Scalar = Scalar_;
  using Vector = VectorX<Scalar>;
  static_assert(std::is_floating_point<Scalar>::value, "peft: optimizers step float or double parameters");

  /// \brief Registers every trainable parameter of `trainable` (an adapter, StandaloneSSF, or anything
  /// with `parameters()` giving named value and gradient views).
  /// \throws ConfigError for invalid options or parameters already registered; nothing is added then.
  template <class T>
  void add(T& trainable, const ParamOptions& options = ParamOptions()) {
    static_assert(is_trainable_v<T>, "peft: optimizer.add(x) needs an adapter (peft::is_trainable_v<T>)");
    static_assert(std::is_same<typename T::Scalar, Scalar>::value,
                  "peft: the optimizer's Scalar must be the adapter's Scalar");
    check_options("add", options);
    const std::string origin = std::string("the ") + detail::class_name_of<std::decay_t<T>>() + " of add() call " +
                               std::to_string(add_calls_ + 1);
    std::vector<Pending> pending;
    for (auto& p : trainable.parameters()) {
      const bool is_b = std::string(p.name) == "lora_B";
      pending.push_back({qualified(options.prefix, p.name), origin, p.value.rows(), p.value.cols(), p.value.data(),
                         p.grad.data(), options.lr_scale * (is_b ? options.lora_B_ratio : 1.0),
                         options.weight_decay});
    }
    commit(pending);
  }

  /// \brief Registers a plain Eigen matrix or vector trained alongside the adapters (a new head, a
  /// bias) with its gradient, which the user's backward fills. Both must have the same type and shape.
  /// \throws ShapeError if the shapes differ; ConfigError for invalid options or storage already
  /// registered. Nothing is added then.
  template <class D>
  void add(const std::string& name, Eigen::PlainObjectBase<D>& value, Eigen::PlainObjectBase<D>& grad,
           const ParamOptions& options = ParamOptions()) {
    static_assert(std::is_same<typename D::Scalar, Scalar>::value,
                  "peft: the optimizer's Scalar must be the parameter's Scalar");
    detail::check_shape(where("add"), "the gradient", grad.rows(), grad.cols(), value.rows(), value.cols());
    check_options("add", options);
    commit({{qualified(options.prefix, name.c_str()), "the matrix of add() call " + std::to_string(add_calls_ + 1),
             value.rows(), value.cols(), value.data(), grad.data(), options.lr_scale, options.weight_decay}});
  }

  /// \brief Registers named parameter views (value and gradient), e.g. every parameter of a
  /// peft::AdapterSet, in one call: all or nothing. A name ending in "lora_B" (at a dot boundary) gets
  /// LoRA+'s ratio. \param origin what they belong to, for messages ("the peft::AdapterSet")
  /// \throws ConfigError for invalid options or parameters already registered; nothing is added then.
  template <bool Const>
  void add_parameters(std::vector<BasicParameter<Scalar, Const>> parameters,
                      const ParamOptions& options = ParamOptions(), const std::string& origin = "a parameter list") {
    static_assert(!Const, "peft: an optimizer updates parameters: pass writable views");
    check_options("add_parameters", options);
    const std::string from = origin + " of add() call " + std::to_string(add_calls_ + 1);
    std::vector<Pending> pending;
    for (auto& p : parameters) {
      const std::string name(p.name);
      const bool is_b = name == "lora_B" || (name.size() > 7 && name.compare(name.size() - 7, 7, ".lora_B") == 0);
      pending.push_back({qualified(options.prefix, p.name), from, p.value.rows(), p.value.cols(), p.value.data(),
                         p.grad.data(), options.lr_scale * (is_b ? options.lora_B_ratio : 1.0),
                         options.weight_decay});
    }
    commit(pending);
  }

  /// \brief Sets every registered gradient to zero (adapters' and plain matrices' alike).
  void zero_grad();

  /// \returns the global L2 norm of every registered gradient, accumulated in double.
  double grad_norm() const;

  /// \brief Clips by global norm, as torch.nn.utils.clip_grad_norm_: when the norm of all registered
  /// gradients exceeds `max_norm`, every gradient is scaled by max_norm / (norm + 1e-6).
  /// \returns the norm before clipping.
  /// \throws ConfigError unless max_norm is finite and > 0; NumericalError if the norm is not finite
  /// (a NaN or Inf gradient). The gradients are untouched then.
  Scalar clip_grad_norm(Scalar max_norm);

  /// \brief One update of every registered parameter from its gradient, at the current learning rate.
  /// Advances step_count() by one.
  void step();

  /// \returns the learning rate the next step() uses (before each slot's lr_scale).
  double lr() const { return lr_; }
  /// \brief Sets the learning rate, e.g. from a schedule: `opt.set_lr(schedule(opt.step_count()))`.
  /// \throws ConfigError unless lr is finite and >= 0.
  void set_lr(double lr) { lr_ = check_lr(where("set_lr"), lr); }

  /// \returns the number of step() calls so far.
  std::int64_t step_count() const { return step_count_; }

  /// \returns the registered parameter blocks, in registration order.
  std::vector<OptimizerSlot> slots() const;

  /// \returns every registered block's value and gradient storage as flat views, in registration order
  /// (for code that treats all trainable scalars alike: broadcasting, reducing, hashing them).
  std::vector<FlatParameter<Scalar>> flat_parameters() {
    std::vector<FlatParameter<Scalar>> out;
    out.reserve(entries_.size());
    for (Entry& e : entries_)
      out.push_back({&e.slot, Eigen::Map<Vector>(e.value, e.slot.size()), grad_of(e)});
    return out;
  }

  /// \returns the number of registered trainable scalars.
  Index num_parameters() const { return state_size_; }

  /// \returns the optimizer's state by parameter name: step count, learning rate, and each slot's steps
  /// and state buffers (copies). With the parameters themselves, what resuming needs.
  OptimizerState<Scalar> state_dict() const;

  /// \brief Restores a state_dict() into this optimizer, whose registered parameters must be the saved
  /// ones: the same names and shapes, in any order (a name registered several times matches in order). Parameter values are not touched (they are the
  /// adapters'); the learning rate, step count, each slot's steps and state buffers are.
  /// \throws ConfigError naming what differs (another optimizer type or buffer set, a slot missing on
  /// either side, a shape, a buffer of the wrong size, a negative step count); nothing is changed then.
  void load_state_dict(const OptimizerState<Scalar>& state);

 protected:
  OptimizerBase(double lr, int state_buffers) : lr_(lr), state_(static_cast<std::size_t>(state_buffers)) {}
  OptimizerBase(const OptimizerBase&) = default;
  OptimizerBase(OptimizerBase&&) noexcept = default;
  OptimizerBase& operator=(const OptimizerBase&) = default;
  OptimizerBase& operator=(OptimizerBase&&) noexcept = default;
  ~OptimizerBase() = default;

  /// \returns state buffer k of a slot (zero when the slot was registered).
  Eigen::Map<Vector> state(int k, const OptimizerSlot& slot) {
    return Eigen::Map<Vector>(state_[static_cast<std::size_t>(k)].data() + slot.offset, slot.size());
  }
  /// \returns state buffer k of the slot with index i, read-only.
  Eigen::Map<const Vector> state(int k, std::size_t i) const {
    const OptimizerSlot& slot = entries_.at(i).slot;
    return Eigen::Map<const Vector>(state_[static_cast<std::size_t>(k)].data() + slot.offset, slot.size());
  }

  static detail::Where where(const char* op) { return {Derived::class_name, op}; }

  /// Checks a learning rate (finite, >= 0) and returns it.
  static double check_lr(const detail::Where& w, double lr) {
    return detail::check_non_negative(w, "lr", lr);
  }

 private:
  struct Entry {
    OptimizerSlot slot;
    std::string origin;  // "the peft::LoRA of add() call 2", for messages
    Scalar* value;
    Scalar* grad;
  };
  struct Pending {
    std::string name;
    std::string origin;
    Index rows, cols;
    Scalar* value;
    Scalar* grad;
    double lr_scale;
    bool weight_decay;
  };

  Derived& derived() { return static_cast<Derived&>(*this); }

  static Eigen::Map<Vector> grad_of(Entry& e) { return Eigen::Map<Vector>(e.grad, e.slot.size()); }

  static std::string qualified(const std::string& prefix, const char* name) {
    return prefix.empty() ? std::string(name) : prefix + "." + name;
  }

  void check_options(const char* op, const ParamOptions& o) const;

  /// [p, p + n) and [q, q + m) share an element.
  static bool overlap(const Scalar* p, Index n, const Scalar* q, Index m) {
    const std::less<const Scalar*> less;
    return n > 0 && m > 0 && less(p, q + m) && less(q, p + n);
  }

  /// Validates the new blocks against each other and the registered ones, then appends them all.
  void commit(const std::vector<Pending>& pending);

  double lr_;
  std::vector<Vector> state_;
  std::vector<Entry> entries_;
  Index state_size_ = 0;
  int add_calls_ = 0;  // successful add() calls, to name where a parameter came from
  std::int64_t step_count_ = 0;
};

// -------------------------------------------------------------------------------------------------
// OptimizerBase's members, out of line (the compiled part instantiates them once; kernels.hpp)

template <class Derived, class Scalar_>
void OptimizerBase<Derived, Scalar_>::zero_grad() {
  for (Entry& e : entries_) grad_of(e).setZero();
}

template <class Derived, class Scalar_>
auto OptimizerBase<Derived, Scalar_>::grad_norm() const -> double {
  double sum = 0.0;
  for (const Entry& e : entries_)
    sum += Eigen::Map<const Vector>(e.grad, e.slot.size()).template cast<double>().squaredNorm();
  return std::sqrt(sum);
}

template <class Derived, class Scalar_>
auto OptimizerBase<Derived, Scalar_>::clip_grad_norm(Scalar max_norm) -> Scalar {
  detail::check_positive(where("clip_grad_norm"), "max_norm", static_cast<double>(max_norm));
  const double norm = grad_norm();
  if (!std::isfinite(norm))
    detail::raise<NumericalError>(where("clip_grad_norm"), "the gradient norm is ", norm,
                                  " (a gradient holds NaN or Inf); gradients left untouched");
  const double coef = static_cast<double>(max_norm) / (norm + 1e-6);
  if (coef < 1.0)
    for (Entry& e : entries_) grad_of(e) *= static_cast<Scalar>(coef);
  return static_cast<Scalar>(norm);
}

template <class Derived, class Scalar_>
void OptimizerBase<Derived, Scalar_>::step() {
  for (Entry& e : entries_) {
    ++e.slot.steps;
    derived().update_slot(e.slot, Eigen::Map<Vector>(e.value, e.slot.size()),
                          Eigen::Map<const Vector>(e.grad, e.slot.size()),
                          lr_ * e.slot.lr_scale);
  }
  ++step_count_;
}

template <class Derived, class Scalar_>
auto OptimizerBase<Derived, Scalar_>::slots() const -> std::vector<OptimizerSlot> {
  std::vector<OptimizerSlot> out;
  for (const Entry& e : entries_) out.push_back(e.slot);
  return out;
}

template <class Derived, class Scalar_>
auto OptimizerBase<Derived, Scalar_>::state_dict() const -> OptimizerState<Scalar> {
  OptimizerState<Scalar> out;
  out.optimizer = Derived::class_name;
  for (const char* name : Derived::state_names) out.buffer_names.emplace_back(name);
  out.step_count = step_count_;
  out.lr = lr_;
  for (std::size_t i = 0; i < entries_.size(); ++i) {
    const OptimizerSlot& slot = entries_[i].slot;
    OptimizerSlotState<Scalar> s{slot.name, slot.rows, slot.cols, slot.steps, {}};
    for (std::size_t k = 0; k < state_.size(); ++k) s.buffers.push_back(state(int(k), i));
    out.slots.push_back(std::move(s));
  }
  return out;
}

template <class Derived, class Scalar_>
void OptimizerBase<Derived, Scalar_>::load_state_dict(const OptimizerState<Scalar>& in) {
  const detail::Where w = where("load_state_dict");
  if (in.optimizer != Derived::class_name)
    detail::raise<ConfigError>(w, "the state is of ", in.optimizer.empty() ? "no optimizer" : in.optimizer, ", not of ",
                               Derived::class_name);
  std::vector<std::string> names;
  for (const char* name : Derived::state_names) names.emplace_back(name);
  if (in.buffer_names != names || state_.size() != names.size())
    detail::raise<ConfigError>(w, "the state's buffers are not ", Derived::class_name, "'s");
  if (in.step_count < 0) detail::raise<ConfigError>(w, "step_count is ", in.step_count, ", expected >= 0");
  check_lr(w, in.lr);
  // Every registered slot must be in the state, and every saved slot registered: match by name first.
  std::vector<const OptimizerSlotState<Scalar>*> match(entries_.size(), nullptr);
  // A name registered more than once (adapters added without a prefix: "lora_A", "lora_A") matches its
  // occurrences in order: the k-th in the state is the k-th registered.
  for (const OptimizerSlotState<Scalar>& s : in.slots) {
    std::size_t i = 0;
    bool registered = false;
    for (; i < entries_.size(); ++i)
      if (entries_[i].slot.name == s.name) {
        registered = true;
        if (match[i] == nullptr) break;
      }
    if (!registered)
      detail::raise<ConfigError>(w, "the state has a parameter '", s.name, "' that is not registered");
    if (i == entries_.size())
      detail::raise<ConfigError>(w, "the state has parameter '", s.name, "' more often than it is registered");
    const OptimizerSlot& slot = entries_[i].slot;
    if (s.rows != slot.rows || s.cols != slot.cols)
      detail::raise<ConfigError>(w, "'", s.name, "' is ", s.rows, "x", s.cols, " in the state but ", slot.rows, "x",
                                 slot.cols, " registered");
    if (s.steps < 0) detail::raise<ConfigError>(w, "'", s.name, "' has ", s.steps, " steps, expected >= 0");
    if (s.buffers.size() != state_.size())
      detail::raise<ConfigError>(w, "'", s.name, "' has ", s.buffers.size(), " state buffers, expected ", state_.size());
    for (const VectorX<Scalar>& b : s.buffers)
      if (b.size() != slot.size())
        detail::raise<ConfigError>(w, "a state buffer of '", s.name, "' has ", b.size(), " entries, expected ",
                                   slot.size());
    match[i] = &s;
  }
  for (std::size_t i = 0; i < entries_.size(); ++i)
    if (match[i] == nullptr)
      detail::raise<ConfigError>(w, "the state has no entry for the registered parameter '", entries_[i].slot.name, "'");
  // Validated: from here on nothing throws.
  for (std::size_t i = 0; i < entries_.size(); ++i) {
    entries_[i].slot.steps = match[i]->steps;
    for (std::size_t k = 0; k < state_.size(); ++k) state(int(k), entries_[i].slot) = match[i]->buffers[k];
  }
  step_count_ = in.step_count;
  lr_ = in.lr;
}

template <class Derived, class Scalar_>
void OptimizerBase<Derived, Scalar_>::check_options(const char* op, const ParamOptions& o) const {
  detail::check_non_negative(where(op), "lr_scale", o.lr_scale);
  detail::check_positive(where(op), "lora_B_ratio", o.lora_B_ratio);
}

template <class Derived, class Scalar_>
void OptimizerBase<Derived, Scalar_>::commit(const std::vector<Pending>& pending) {
  for (std::size_t i = 0; i < pending.size(); ++i) {
    const Pending& p = pending[i];
    const Index n = p.rows * p.cols;
    if (overlap(p.value, n, p.grad, n))
      detail::raise<ConfigError>(where("add"), "'", p.name, "' of ", p.origin, ": its value and gradient share storage");
    auto clash = [&](const Scalar* value, const Scalar* grad, Index m, const std::string& other,
                     const std::string& other_origin, const char* status) {
      if (overlap(p.value, n, value, m) || overlap(p.value, n, grad, m) || overlap(p.grad, n, value, m) ||
          overlap(p.grad, n, grad, m))
        detail::raise<ConfigError>(where("add"), "'", p.name, "' of ", p.origin, " shares storage with '", other,
                                   "' of ", other_origin, status);
    };
    for (const Entry& e : entries_)
      clash(e.value, e.grad, e.slot.size(), e.slot.name, e.origin, ", which is already registered");
    for (std::size_t j = 0; j < i; ++j)
      clash(pending[j].value, pending[j].grad, pending[j].rows * pending[j].cols, pending[j].name, pending[j].origin,
            "");
  }
  Index added = 0;
  for (const Pending& p : pending) added += p.rows * p.cols;
  std::vector<Vector> grown(state_.size());
  for (std::size_t k = 0; k < state_.size(); ++k) {
    grown[k] = Vector::Zero(state_size_ + added);
    grown[k].head(state_size_) = state_[k];
  }
  std::vector<Entry> entries = entries_;
  Index offset = state_size_;
  for (const Pending& p : pending) {
    entries.push_back(
        {OptimizerSlot{p.name, p.rows, p.cols, offset, p.lr_scale, p.weight_decay, 0}, p.origin, p.value, p.grad});
    offset += p.rows * p.cols;
  }
  // Nothing above changed the optimizer; from here on nothing throws.
  state_.swap(grown);
  entries_.swap(entries);
  state_size_ = offset;
  ++add_calls_;
}

}  // namespace peft
