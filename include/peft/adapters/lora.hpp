#pragma once
/// \file lora.hpp
/// \brief LoRA: a low-rank update of a frozen linear layer (Hu et al., ICLR 2022).

#include "peft/core/adapter_base.hpp"
#include "peft/core/error.hpp"
#include "peft/core/random.hpp"
#include "peft/core/types.hpp"
#include "peft/linalg/low_rank.hpp"

#include <array>
#include <cmath>
#include <cstdint>

namespace peft {

/// \brief How LoRA's factors start.
enum class LoRAInit {
  kaiming_uniform,  ///< A ~ U(-1/sqrt(d_in), 1/sqrt(d_in)) (PyTorch's kaiming-uniform, a = sqrt(5)), B = 0
  gaussian,         ///< A ~ N(0, (1/r)^2), B = 0 (PEFT's init_lora_weights="gaussian")
  random,           ///< A as kaiming_uniform and B ~ U(-1/sqrt(r), 1/sqrt(r)): not the identity, for tests
};

/// \brief LoRA's settings. Field names follow PEFT's LoraConfig.
struct LoRAConfig {
  Index rank = 8;                            ///< r >= 1
  double alpha = 8.0;                        ///< lora_alpha > 0; the scaling is alpha / r
  double dropout = 0.0;                      ///< dropout on the adapter branch's input, in [0, 1)
  bool use_rslora = false;                   ///< scaling alpha / sqrt(r) instead of alpha / r
  LoRAInit init = LoRAInit::kaiming_uniform; ///< initial factors
  std::uint64_t seed = 0;                    ///< seeds the init and then the dropout masks
};

namespace detail {

/// Validates the LoRA fields shared by LoRA, DoRA and PiSSA. \throws ConfigError
inline const LoRAConfig& check_lora_config(const Where& where, const LoRAConfig& cfg) {
  if (cfg.rank < 1) raise<ConfigError>(where, "rank is ", cfg.rank, ", expected >= 1");
  if (!(std::isfinite(cfg.alpha) && cfg.alpha > 0.0))
    raise<ConfigError>(where, "alpha is ", cfg.alpha, ", expected a finite value > 0");
  if (!(cfg.dropout >= 0.0 && cfg.dropout < 1.0))
    raise<ConfigError>(where, "dropout is ", cfg.dropout, ", expected a value in [0, 1)");
  return cfg;
}

/// \returns s = alpha / r, or alpha / sqrt(r) with rsLoRA.
inline double lora_scaling(const LoRAConfig& cfg) {
  const double r = static_cast<double>(cfg.rank);
  return cfg.use_rslora ? cfg.alpha / std::sqrt(r) : cfg.alpha / r;
}

/// Fills A (r x d_in) and B (d_out x r) as cfg.init says.
template <class AType, class BType>
void init_lora_factors(const LoRAConfig& cfg, Rng& rng, AType&& A, BType&& B) {
  const double bound_a = 1.0 / std::sqrt(static_cast<double>(A.cols()));
  switch (cfg.init) {
    case LoRAInit::gaussian:
      rng.fill_normal(A, 0.0, 1.0 / static_cast<double>(cfg.rank));
      B.setZero();
      break;
    case LoRAInit::random: {
      rng.fill_uniform(A, -bound_a, bound_a);
      const double bound_b = 1.0 / std::sqrt(static_cast<double>(cfg.rank));
      rng.fill_uniform(B, -bound_b, bound_b);
      break;
    }
    case LoRAInit::kaiming_uniform:
    default:
      rng.fill_uniform(A, -bound_a, bound_a);
      B.setZero();
      break;
  }
}

}  // namespace detail

/// \brief The LoRA family's shared implementation: everything of LoRA but the name and the init.
/// LoRA and PiSSA derive from it (CRTP); it is not used directly.
///
/// `Y = W X + b 1ᵀ + s B A D(X)` where W is the bound weight: the frozen base for LoRA, the residual
/// for PiSSA. See LoRA for the contract, performance and threading notes.
template <class Derived, class MatrixType_>
class LoRAFamily : public AdapterBase<Derived, MatrixType_> {
  using Base = AdapterBase<Derived, MatrixType_>;
  friend Base;

 public:
  using typename Base::ConstMatrixRef;
  using typename Base::Index;
  using typename Base::Matrix;
  using typename Base::MatrixType;
  using typename Base::Scalar;
  using typename Base::Vector;

  /// \brief What backward needs, filled by forward(X, cache); owned by the caller, reusable.
  struct Cache : detail::CacheStamp {
    detail::LowRankCache<Scalar> branch;
  };

  /// \returns the configuration.
  const LoRAConfig& config() const { return cfg_; }
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

  /// \returns where lora_A and lora_B live in the flat buffers.
  const std::array<ParameterInfo, 2>& parameter_layout() const { return layout_; }

 protected:
  /// Binds W (and b when has_bias) and validates cfg; A and B start at zero: the derived class
  /// initialises them.
  LoRAFamily(Eigen::Ref<MatrixType> W, Scalar* b, Index b_size, bool has_bias, const LoRAConfig& cfg)
      : Base(W, b, b_size, has_bias, detail::check_lora_config(Base::where("constructor"), cfg).rank * (W.rows() + W.cols())),
        cfg_(cfg),
        s_(static_cast<Scalar>(detail::lora_scaling(cfg))),
        rng_(cfg.seed),
        layout_{{{"lora_A", cfg.rank, W.cols(), 0}, {"lora_B", W.rows(), cfg.rank, cfg.rank * W.cols()}}} {}

  /// The random stream: the init draws from it first, then the dropout masks.
  Rng& rng() { return rng_; }

 private:
  void base_forward(const ConstMatrixRef& X, Matrix& Y) const {
    Y.noalias() = this->weight() * X;
    if (this->has_bias()) Y.colwise() += this->bias();
  }

  void forward_impl(const ConstMatrixRef& X, Matrix& Y) const {
    base_forward(X, Y);
    if (!this->is_merged()) detail::low_rank_forward(A(), B(), s_, X, Y);
  }

  void forward_train_impl(const ConstMatrixRef& X, Matrix& Y, Cache& cache) {
    base_forward(X, Y);
    detail::low_rank_forward_train(A(), B(), s_, cfg_.dropout, rng_, X, cache.branch, Y);
  }

  void check_cache_impl(const Cache& cache) const {
    detail::check_low_rank_cache(this->where("backward"), cache.branch, cfg_.rank, cache.d_in, cache.tokens);
  }

  void backward_impl(const ConstMatrixRef& dY, Cache& cache, Matrix& dX) {
    dX.noalias() = this->weight().transpose() * dY;
    auto dA = this->grad(layout_[0]);
    auto dB = this->grad(layout_[1]);
    detail::low_rank_backward(A(), B(), s_, dY, cache.branch, dA, dB, dX);
  }

  void merge_impl() { detail::add_low_rank_checked(this->where("merge"), this->weight_mut(), s_, B(), A()); }
  void unmerge_impl() {
    detail::add_low_rank_checked(this->where("unmerge"), this->weight_mut(), Scalar(-s_),
                                 this->merged_value(layout_[1]), this->merged_value(layout_[0]));
  }

  MatrixType delta_weight_impl() const {
    MatrixType dW(this->d_out(), this->d_in());
    dW.noalias() = s_ * B() * A();
    return dW;
  }

  LoRAConfig cfg_;
  Scalar s_;
  Rng rng_;
  std::array<ParameterInfo, 2> layout_;
};

/// \brief LoRA adapter over a frozen weight: `Y = W0 X + b 1^T + s B A D(X)` (MATH.md, LoRA).
///
/// Wraps the user's weight W (d_out x d_in) and optional bias b (d_out) by reference: no copy; W is
/// written only by merge() and unmerge(). Trainable parameters, in one flat buffer:
/// `lora_A` (r x d_in) and `lora_B` (d_out x r), named as in PEFT. At the default init B = 0, so the
/// layer starts equal to the base.
///
/// \tparam MatrixType_ the weight's type: `Eigen::MatrixXf`, `Eigen::MatrixXd`, or their row-major
///         counterparts. Activations X, Y (d_in x N, d_out x N) are column-major `Matrix`.
///
/// **Performance.** Forward is the base product `W X` plus `s B (A X)`: 2r(d_in + d_out) flops per
/// token against 2 d_in d_out for the base; backward adds `W^T G` and three more rank-r products. Every
/// product is an Eigen GEMM with the scalar folded in; the only temporaries are r x N (and d_in x N with
/// dropout, plus the cache's copy of X): no d_out x d_in temporary anywhere. Merged, forward is exactly
/// the base product. merge()/unmerge() read W once for a finiteness bound, then update it in one GEMM.
///
/// **Seeds.** The init and the dropout masks come from `cfg.seed` alone: give each wrapped layer its
/// own seed (e.g. the layer's index), or every layer of one shape starts from the same A.
///
/// **Threads.** forward(X) is const and re-entrant. Training forward, backward, merge and the
/// parameter views mutate the adapter: one thread at a time.
///
/// A copy shares the user's W (it is a reference) and duplicates the parameters, gradients and the
/// dropout stream. Example: examples/quickstart.cpp.
template <class MatrixType_>
class LoRA : public LoRAFamily<LoRA<MatrixType_>, MatrixType_> {
  using Family = LoRAFamily<LoRA<MatrixType_>, MatrixType_>;

 public:
  using typename Family::MatrixType;
  using typename Family::Scalar;
  using typename Family::Vector;
  using typename Family::Index;

  static constexpr const char* class_name = "peft::LoRA";

  /// \brief Wraps W (no bias).
  /// \throws ConfigError for an invalid config; ShapeError for an empty W
  explicit LoRA(Eigen::Ref<MatrixType> W, const LoRAConfig& cfg = {}) : LoRA(W, nullptr, 0, false, cfg) {}

  /// \brief Wraps W and its bias b (d_out).
  /// \throws ConfigError for an invalid config; ShapeError for an empty W or a bias of the wrong size
  LoRA(Eigen::Ref<MatrixType> W, Eigen::Ref<Vector> b, const LoRAConfig& cfg = {})
      : LoRA(W, b.data(), b.size(), true, cfg) {}

 private:
  LoRA(Eigen::Ref<MatrixType> W, Scalar* b, Index b_size, bool has_bias, const LoRAConfig& cfg)
      : Family(W, b, b_size, has_bias, cfg) {
    detail::init_lora_factors(this->config(), this->rng(), this->A(), this->B());
  }
};

}  // namespace peft
