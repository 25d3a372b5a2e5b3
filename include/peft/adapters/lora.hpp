#pragma once
/// \file lora.hpp
/// \brief LoRA: a low-rank update of a frozen linear layer (Hu et al., ICLR 2022).

#include "peft/adapters/lora_config.hpp"
#include "peft/adapters/lora_family.hpp"
#include "peft/core/types.hpp"

namespace peft {

/// \brief LoRA adapter over a frozen weight: `Y = W0 X + b 1ᵀ + s B A D(X)` (docs/math.md, LoRA).
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
/// token against 2 d_in d_out for the base. A training step adds the base's input gradient `Wᵀ G` and
/// three rank-r products, about 2r(2 d_in + 3 d_out) flops per token, and copies X into the cache.
/// Every product is one Eigen GEMM with the scalar folded in; the only temporaries are r x N (and
/// d_in x N with dropout): no d_out x d_in temporary. Merged, forward is exactly the base product.
/// merge() and unmerge() read W once for a finiteness bound, then update it in one GEMM (one read and
/// one write of W, plus 2 d_out d_in r flops).
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
  using typename Family::Index;
  using typename Family::MatrixType;
  using typename Family::Scalar;
  using typename Family::Vector;

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

#ifdef PEFT_COMPILED
// The compiled part (peft::compiled) instantiates these once, for the four weight types; a translation
// unit built with it instantiates none of their out-of-line members (kernels.hpp says more).
#define PEFT_EXTERN_LORA(M) extern template class LoRAFamily<LoRA<M>, M>; extern template class LoRA<M>;
PEFT_EXTERN_LORA(Eigen::MatrixXf)
PEFT_EXTERN_LORA(Eigen::MatrixXd)
PEFT_EXTERN_LORA(RowMajorMatrixXf)
PEFT_EXTERN_LORA(RowMajorMatrixXd)
#undef PEFT_EXTERN_LORA
#endif

}  // namespace peft
