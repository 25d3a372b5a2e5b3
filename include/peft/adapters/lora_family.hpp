#pragma once
/// \file lora_family.hpp
/// \brief `peft::LoRAFamily`: what LoRA, PiSSA and DoRA share, written once: the configuration and its
/// checks, the scaling s, the factors A and B in the flat parameter buffer (plus any further parameters
/// of the derived adapter), the random stream, and LoRA's own forward, backward and merge.

#include "peft/core/config.hpp"  // first: the detail headers check for it
#include "peft/adapters/lora_config.hpp"
#include "peft/core/adapter_base.hpp"
#include "peft/core/parameter.hpp"
#include "peft/core/random.hpp"
#include "peft/core/types.hpp"
#include "peft/detail/exact_restore.hpp"
#include "peft/detail/kernels.hpp"
#include "peft/detail/low_rank.hpp"
#include "peft/detail/low_rank_branch.hpp"

#include <array>
#include <cstddef>
#include <stdexcept>
#include <string>

namespace peft {

/// \brief A parameter of a derived adapter beyond lora_A and lora_B: its name and shape.
struct ParameterShape {
  const char* name;
  Index rows;
  Index cols;
};

/// \brief The LoRA family's shared implementation (CRTP); not used directly.
///
/// `Y = W X + b 1ᵀ + s B A D(X)`, where W is the bound weight: the frozen base for LoRA, the residual for
/// PiSSA (docs/math.md, LoRA). DoRA derives from it for its configuration, factors and accessors, and
/// replaces the hooks it computes differently.
/// \tparam Config_ LoRAConfig or a struct derived from it (DoRAConfig, PiSSAConfig)
/// \tparam NumParams 2 (lora_A, lora_B), or more: the derived adapter's further parameters follow them
///         in the flat buffers, in the order given to the constructor
template <class Derived, class MatrixType_, class Config_ = LoRAConfig, std::size_t NumParams = 2>
class LoRAFamily : public AdapterBase<Derived, MatrixType_> {
  static_assert(NumParams >= 2, "lora_A and lora_B come first");
  using Base = AdapterBase<Derived, MatrixType_>;
  friend AdapterAccess;

 public:
  using Config = Config_;
  using typename Base::ConstMatrixRef;
  using typename Base::Index;
  using typename Base::Matrix;
  using typename Base::MatrixType;
  using typename Base::Scalar;
  using typename Base::Vector;

  /// \brief What backward needs, filled by forward(X, cache); owned by the caller, reusable (no
  /// allocation once the shapes are stable).
  struct Cache : CacheStamp {
    detail::LowRankCache<Scalar> branch;  ///< D(X), the dropout mask, H = A D(X), scratch
  };

  /// \returns the configuration.
  const Config& config() const { return cfg_; }
  /// \returns r.
  Index rank() const { return cfg_.rank; }
  /// \returns s, the scaling of B A.
  Scalar scaling() const { return s_; }

  /// \returns lora_A (r x d_in), a view into the flat buffer.
  Eigen::Map<Matrix> A() { return this->value(layout_[0]); }
  Eigen::Map<const Matrix> A() const { return this->value(layout_[0]); }
  /// \returns lora_B (d_out x r), a view into the flat buffer.
  Eigen::Map<Matrix> B() { return this->value(layout_[1]); }
  Eigen::Map<const Matrix> B() const { return this->value(layout_[1]); }

  /// \returns the state of the adapter's random stream (the dropout masks still to come), as text: saved
  /// in a training checkpoint so that a resumed run draws the masks the uninterrupted run would.
  std::string random_state() const { return rng_.state(); }
  /// \brief Restores a state from random_state(). \throws ConfigError if `state` is not one (unchanged then).
  void set_random_state(const std::string& state) {
    try {
      rng_.set_state(state);
    } catch (const std::invalid_argument&) {
      detail::raise<ConfigError>(Base::where("set_random_state"), "not a state written by random_state()");
    }
  }

  /// \returns where each parameter lives in the flat buffers: lora_A, lora_B, then the derived
  /// adapter's.
  const std::array<ParameterInfo, NumParams>& parameter_layout() const { return layout_; }

 protected:
  /// Binds W (and b when has_bias) and validates cfg; every parameter starts at zero: the derived
  /// class initialises them. \throws ConfigError, ShapeError
  LoRAFamily(Eigen::Ref<MatrixType> W, Scalar* b, Index b_size, bool has_bias, const Config& cfg,
             const std::array<ParameterShape, NumParams - 2>& extra = {})
      : Base(W, b, b_size, has_bias, total_size(cfg, W.rows(), W.cols(), extra)),
        cfg_(cfg),
        s_(static_cast<Scalar>(detail::lora_scaling(cfg))),
        rng_(cfg.seed),
        layout_(make_layout(cfg.rank, W.rows(), W.cols(), extra)) {}

  /// The random stream: the init draws from it first, then the dropout masks.
  Rng& rng() { return rng_; }

  /// The merge-time lora_A and lora_B (while merged).
  Eigen::Map<const Matrix> merged_A() const { return this->applied_value(layout_[0]); }
  Eigen::Map<const Matrix> merged_B() const { return this->applied_value(layout_[1]); }

 private:
  static Index total_size(const Config& cfg, Index d_out, Index d_in,
                          const std::array<ParameterShape, NumParams - 2>& extra) {
    Index n = detail::check_lora_config(Base::where("constructor"), cfg).rank * (d_out + d_in);
    for (const ParameterShape& p : extra) n += p.rows * p.cols;
    return n;
  }

  static std::array<ParameterInfo, NumParams> make_layout(Index r, Index d_out, Index d_in,
                                                         const std::array<ParameterShape, NumParams - 2>& extra) {
    std::array<ParameterInfo, NumParams> layout{};
    layout[0] = {"lora_A", r, d_in, 0};
    layout[1] = {"lora_B", d_out, r, r * d_in};
    Index offset = r * (d_in + d_out);
    for (std::size_t k = 0; k < extra.size(); ++k) {
      layout[k + 2] = {extra[k].name, extra[k].rows, extra[k].cols, offset};
      offset += extra[k].rows * extra[k].cols;
    }
    return layout;
  }

  // LoRA's hooks (docs/math.md, LoRA), defined below the class (out of line, so that the compiled
  // part's explicit instantiations spare a translation unit their instantiation). DoRA defines its own.
  void forward_impl(const ConstMatrixRef& X, Matrix& Y) const;
  void forward_train_impl(const ConstMatrixRef& X, Matrix& Y, Cache& cache);
  void check_cache_impl(const Cache& cache) const;
  void backward_impl(const ConstMatrixRef& dY, Cache& cache, Matrix* dX);  // dX null: parameters only
  void merge_impl();
  void unmerge_impl();
  MatrixType delta_weight_impl() const;

  Config cfg_;
  Scalar s_;
  Rng rng_;
  std::array<ParameterInfo, NumParams> layout_;
};


// -------------------------------------------------------------------------------------------------
// LoRAFamily's hooks

template <class Derived, class MatrixType_, class Config_, std::size_t NumParams>
void LoRAFamily<Derived, MatrixType_, Config_, NumParams>::forward_impl(const ConstMatrixRef& X, Matrix& Y) const {
  this->base_product(X, Y);
  if (!this->is_merged()) detail::low_rank_forward<Scalar>(A(), B(), s_, X, Y);
}

template <class Derived, class MatrixType_, class Config_, std::size_t NumParams>
void LoRAFamily<Derived, MatrixType_, Config_, NumParams>::forward_train_impl(const ConstMatrixRef& X, Matrix& Y,
                                                                             Cache& cache) {
  this->base_product(X, Y);
  detail::low_rank_forward_train<Scalar>(A(), B(), s_, cfg_.dropout, rng_, X, cache.branch, Y);
}

template <class Derived, class MatrixType_, class Config_, std::size_t NumParams>
void LoRAFamily<Derived, MatrixType_, Config_, NumParams>::check_cache_impl(const Cache& cache) const {
  detail::check_low_rank_cache(this->where("backward"), cache.branch, rank(), cache.d_in, cache.tokens);
}

template <class Derived, class MatrixType_, class Config_, std::size_t NumParams>
void LoRAFamily<Derived, MatrixType_, Config_, NumParams>::backward_impl(const ConstMatrixRef& dY, Cache& cache,
                                                                        Matrix* dX) {
  if (dX != nullptr) this->base_input_grad(dY, *dX);
  auto dA = this->grad(layout_[0]);
  auto dB = this->grad(layout_[1]);
  detail::low_rank_backward<Scalar>(A(), B(), s_, dY, cache.branch, dA, dB, dX);
}

template <class Derived, class MatrixType_, class Config_, std::size_t NumParams>
void LoRAFamily<Derived, MatrixType_, Config_, NumParams>::merge_impl() {
  if (!this->exact_restore()) {
    detail::add_low_rank_checked(this->where("merge"), this->weight_mut(), s_, B(), A());
    return;
  }
  const auto [view, u] = detail::low_rank_tiles(this->weight_mut(), s_, B(), A(), detail::TileOp::add, detail::TileOp::sub);
  detail::exact_merge<Scalar>(this->where("merge"), view, u, this->restore_record());
}

template <class Derived, class MatrixType_, class Config_, std::size_t NumParams>
void LoRAFamily<Derived, MatrixType_, Config_, NumParams>::unmerge_impl() {
  if (this->restore_record().empty()) {
    detail::add_low_rank_checked(this->where("unmerge"), this->weight_mut(), Scalar(-s_), merged_B(), merged_A());
    return;
  }
  const auto [view, u] =
      detail::low_rank_tiles(this->weight_mut(), s_, merged_B(), merged_A(), detail::TileOp::add, detail::TileOp::sub);
  this->note_restore(detail::exact_unmerge<Scalar>(this->where("unmerge"), view, u, this->restore_record()));
}

template <class Derived, class MatrixType_, class Config_, std::size_t NumParams>
auto LoRAFamily<Derived, MatrixType_, Config_, NumParams>::delta_weight_impl() const -> MatrixType {
  MatrixType dW(this->d_out(), this->d_in());
  detail::product(dW, B(), A(), s_, false);
  return dW;
}

}  // namespace peft
