#pragma once
/// \file dora.hpp
/// \brief DoRA: weight-decomposed low-rank adaptation (Liu et al., ICML 2024).

#include "peft/core/config.hpp"  // first: the detail headers check for it
#include "peft/adapters/lora_config.hpp"
#include "peft/adapters/lora_family.hpp"
#include "peft/core/error.hpp"
#include "peft/core/types.hpp"
#include "peft/detail/exact_restore.hpp"
#include "peft/detail/kernels.hpp"
#include "peft/detail/low_rank.hpp"
#include "peft/detail/low_rank_branch.hpp"
#include "peft/detail/product_plan.hpp"
#include "peft/detail/row_norms.hpp"

#include <array>

namespace peft {

/// \brief DoRA's settings: LoRA's (rank, alpha, dropout, use_rslora, init, seed), plus how backward
/// treats the row norms. Field names follow PEFT's LoraConfig(use_dora=True).
struct DoRAConfig : LoRAConfig {
  /// true: the norms n are constants in backward (DoRA paper §4.3, and PEFT's behaviour); false: the
  /// exact gradient, through the norms as well (docs/math.md, DoRA, exact mode).
  bool detach_norm = true;
};

/// \brief DoRA adapter over a frozen weight: `Y = diag(m / n) (W0 X + s B A D(X)) + b 1ᵀ`, with
/// `n_i = ||(W0 + s B A)_i,:||` (docs/math.md, DoRA).
///
/// Wraps the user's weight W (d_out x d_in) and optional bias b (d_out) by reference, as LoRA; W is
/// written only by merge() and unmerge(). Trainable parameters, in one flat buffer, named as in PEFT:
/// `lora_A` (r x d_in), `lora_B` (d_out x r) and `lora_magnitude_vector` m (d_out x 1). m starts at the
/// row norms of W0 + s B A, so the layer starts equal to the LoRA with the same A and B (to the base,
/// with the default inits). W must hold its final values when the adapter is built: ||W0_i||² is cached.
/// The bias is not rescaled. Where a row of W0 + s B A is zero, its gain m_i / n_i is taken as 0.
///
/// \tparam MatrixType_ the weight's type: `Eigen::MatrixXf`, `Eigen::MatrixXd`, or their row-major
///         counterparts. Activations X, Y (d_in x N, d_out x N) are column-major `Matrix`.
///
/// **Dropout** (p > 0) acts on the adapter branch only; PEFT also feeds the dropped-out input to its
/// `(m/n − 1) W0` correction. The two agree whenever p = 0 (always at inference); docs/math.md says more.
///
/// **Performance.** The norms never need the d_out x d_in matrix W0 + s B A: they come from W0 Aᵀ and
/// A Aᵀ (O(d_out r²) flops beyond them), and a row is recomputed from W0 only where the factored form
/// has lost its digits to cancellation (none in ordinary training). A training step reads W0 once in
/// forward (one product with `[X | Aᵀ]`, d_in x (N + r)) and once in backward (Wᵀ G', or in exact mode
/// one product with `[G' | diag(c) B]`), plus the branch's rank-r products and O(d_out N) passes: about
/// the flops of the base step plus LoRA's branch plus 2 d_out d_in r. A warm step (the Cache reused)
/// takes no more from the heap than the base step does, at every batch size and thread count; the
/// Cache holds Z (d_out x N) and two scratch buffers of d x (N + r). The const forward(X) allocates its
/// scratch on every call. Merged, forward is exactly the base product. How the products are planned,
/// and why, is in docs/implementation.md; measured ratios are in docs/benchmarks.md.
///
/// **Merge** writes `W <- diag(m / n) (W0 + s B A)` with the norms of that moment, which are kept;
/// unmerge() computes `W0 = diag(n / m) W - s B A` from them and the merge-time parameters. Both check
/// every value before writing, and each costs about two reads and a write of W. One round trip
/// restores W0 to within `eps |W0| + 5 eps |W0 + s B A|` per element. A row whose magnitude was 0 at
/// merge time (and whose norm was not) keeps nothing of W0, so unmerge() refuses it (NumericalError):
/// do not merge with a zero magnitude unless for good.
///
/// **Threads.** forward(X) is const and re-entrant. Training forward, backward, merge and the
/// parameter views mutate the adapter: one thread at a time.
///
/// A copy shares the user's W (it is a reference) and duplicates the parameters, gradients and the
/// dropout stream. Example: examples/quickstart.cpp shows the LoRA loop; DoRA is used the same way
/// (`peft::DoRA<Eigen::MatrixXf> dora(W, b, dora_cfg)`).
template <class MatrixType_>
class DoRA : public LoRAFamily<DoRA<MatrixType_>, MatrixType_, DoRAConfig, 3> {
  using Family = LoRAFamily<DoRA<MatrixType_>, MatrixType_, DoRAConfig, 3>;
  friend AdapterAccess;

 public:
  using typename Family::ConstMatrixRef;
  using typename Family::Index;
  using typename Family::Matrix;
  using typename Family::MatrixType;
  using typename Family::Scalar;
  using typename Family::Vector;

  /// \brief What backward needs, filled by forward(X, cache); owned by the caller, reusable (no
  /// allocation once the shapes are stable).
  struct Cache : CacheStamp {
    detail::LowRankCache<Scalar> branch;  ///< LoRA's branch: D(X), the dropout mask, H = A D(X), scratch
    Matrix Z;         ///< W0 X + s B A D(X), d_out x N: the output before the gain
    Vector n;         ///< row norms of W0 + s B A, d_out
    Vector g;         ///< the gain m / n (0 where n = 0), d_out
    Vector inv_n;     ///< 1 / n (0 where n = 0), d_out
    Matrix VAt;       ///< (W0 + s B A) Aᵀ = P + s B K, d_out x r
    Matrix K;         ///< A Aᵀ, r x r
    Matrix wide_in;   ///< scratch, d_in x (N + r): [X | Aᵀ]; exact backward: W0ᵀ [G' | diag(c) B]
    Matrix wide_out;  ///< scratch, d_out x (N + r): W0 [X | Aᵀ] = [W0 X | P]; backward: [G' | diag(c) B]
    Vector q;         ///< backward scratch: rowsum(G ⊙ Z), then c in exact mode, d_out
    Matrix BtCB;      ///< exact backward scratch: Bᵀ diag(c) B, r x r
  };

  static constexpr const char* class_name = "peft::DoRA";

  /// \brief Wraps W (no bias).
  /// \throws ConfigError for an invalid config; ShapeError for an empty W
  explicit DoRA(Eigen::Ref<MatrixType> W, const DoRAConfig& cfg = {}) : DoRA(W, nullptr, 0, false, cfg) {}

  /// \brief Wraps W and its bias b (d_out). The bias is not rescaled by the magnitude.
  /// \throws ConfigError for an invalid config; ShapeError for an empty W or a bias of the wrong size
  DoRA(Eigen::Ref<MatrixType> W, Eigen::Ref<Vector> b, const DoRAConfig& cfg = {})
      : DoRA(W, b.data(), b.size(), true, cfg) {}

  /// \returns lora_magnitude_vector m (d_out), a view into the flat buffer.
  Eigen::Map<Vector> magnitude() { return Eigen::Map<Vector>(this->value(layout(2)).data(), this->d_out()); }
  Eigen::Map<const Vector> magnitude() const {
    return Eigen::Map<const Vector>(this->value(layout(2)).data(), this->d_out());
  }

  /// \returns n (d_out), the row norms of W0 + s B A for the current parameters, computed as forward
  /// does. Allocates; reads W0 once. While merged, W0 is first reconstructed from W as unmerge()
  /// would (a d_out x d_in temporary).
  /// \throws NumericalError while merged if W0 cannot be reconstructed (see unmerge())
  Vector norms() const;


 private:
  DoRA(Eigen::Ref<MatrixType> W, Scalar* b, Index b_size, bool has_bias, const DoRAConfig& cfg);

  const ParameterInfo& layout(std::size_t k) const { return this->parameter_layout()[k]; }

  /// n for the base weight W0 (W, or a reconstruction of it): P = W0 Aᵀ, then the factored norms.
  template <class W0Type>
  void row_norms(const W0Type& W0, Matrix& K, Matrix& VAt, Vector& n) const;

  /// g = m / n and 1 / n, both 0 where n = 0 (a zero row of W0 + s B A; NaN still propagates).
  void gains(const Vector& n, Vector& g, Vector& inv_n) const;

  /// Inference: one product over [X | Aᵀ] (W0 read once) up to N = 8 r tokens, where reading W0 twice
  /// would cost most; W0 X and W0 Aᵀ apart beyond (no d x (N + r) scratch).
  bool joint_product_pays(Index tokens) const { return tokens <= 8 * this->rank(); }

  /// out = W0 [X | Aᵀ] = [W0 X | P], in one product (W0 read once). A training step plans it with
  /// product_with_base(); the const forward(X) uses Eigen's GEMM on all its threads.
  void joint_base_product(const ConstMatrixRef& X, Matrix& in, Matrix& out, bool training) const;

  /// Y <- diag(g) Z + b 1ᵀ, one pass (Z may be Y itself).
  void apply_gain(const Vector& g, const Matrix& Z, Matrix& Y) const;

  /// n / m of merge time, the row scaling of unmerge (0 where n was 0: that merged row is 0 and
  /// W0_i = -s B_i A). \throws NumericalError where m_i was 0 but n_i was not
  Vector unmerge_scales(const detail::Where& where) const;
  /// n / m, 0 where n or m is 0 (with the exact restore, a row whose magnitude was 0 comes back from
  /// the record). \throws NumericalError naming the row, with `refuse_zero`, where m_i is 0 but n_i not
  static Vector restore_scales(const detail::Where& where, const Vector& n, const Eigen::Ref<const Vector>& m,
                               bool refuse_zero);
  /// The exact restore's description of merge and unmerge (rho: the unmerge's row scales).
  template <class WType, class BType, class AType>
  auto restore_tiles(WType&& W, const BType& B, const AType& A, const Vector& g, const Vector& rho) const {
    return detail::low_rank_tiles(W, this->scaling(), B, A, detail::TileOp::add_scale, detail::TileOp::scale_sub,
                                  g.data(), rho.data());
  }

  /// W0: W itself while unmerged; while merged, diag(n / m) W - s B A with the merge-time values.
  MatrixType base_weight(const char* op) const;

  // The hooks (docs/extending.md), defined below the class: out of line, so that the compiled part's
  // explicit instantiations spare a translation unit their instantiation.
  void forward_impl(const ConstMatrixRef& X, Matrix& Y) const;
  void forward_train_impl(const ConstMatrixRef& X, Matrix& Y, Cache& cache);
  void backward_impl(const ConstMatrixRef& dY, Cache& cache, Matrix* dX);  // dX null: parameters only
  void check_cache_impl(const Cache& cache) const;
  void merge_impl();
  void unmerge_impl();
  MatrixType delta_weight_impl() const;

  Vector w2_;           // ||W0_i,:||², d_out: W0 is frozen (and restored by unmerge)
  Vector merge_norms_;  // n at merge(), while merged
};

// -------------------------------------------------------------------------------------------------
// DoRA's members

template <class MatrixType_>
DoRA<MatrixType_>::DoRA(Eigen::Ref<MatrixType> W, Scalar* b, Index b_size, bool has_bias, const DoRAConfig& cfg)
    : Family(W, b, b_size, has_bias, cfg, {{{"lora_magnitude_vector", W.rows(), 1}}}),
      w2_(W.rowwise().squaredNorm()) {
  detail::init_lora_factors(this->config(), this->rng(), this->A(), this->B());
  magnitude() = norms();  // m = n: the gain starts at exactly 1
}

template <class MatrixType_>
auto DoRA<MatrixType_>::norms() const -> Vector {
  Vector n;
  Matrix K, VAt;
  if (this->is_merged())
    row_norms(base_weight("norms"), K, VAt, n);
  else
    row_norms(this->weight(), K, VAt, n);
  return n;
}

template <class MatrixType_>
template <class W0Type>
void DoRA<MatrixType_>::row_norms(const W0Type& W0, Matrix& K, Matrix& VAt, Vector& n) const {
  Matrix P(this->d_out(), this->rank());
  detail::product(P, W0, this->A().transpose(), Scalar(1), false);
  detail::factored_row_norms(W0, w2_, this->A(), this->B(), this->scaling(), P, K, VAt, n);
}

template <class MatrixType_>
void DoRA<MatrixType_>::gains(const Vector& n, Vector& g, Vector& inv_n) const {
  const auto m = magnitude();
  g.resize(n.size());
  inv_n.resize(n.size());
  for (Index i = 0; i < n.size(); ++i) {
    inv_n(i) = n(i) == Scalar(0) ? Scalar(0) : Scalar(1) / n(i);
    g(i) = n(i) == Scalar(0) ? Scalar(0) : m(i) / n(i);
  }
}

template <class MatrixType_>
void DoRA<MatrixType_>::joint_base_product(const ConstMatrixRef& X, Matrix& in, Matrix& out, bool training) const {
  const Index N = X.cols(), r = this->rank();
  in.resize(this->d_in(), N + r);
  in.leftCols(N) = X;
  in.rightCols(r) = this->A().transpose();
  out.resize(this->d_out(), N + r);
  if (training)
    detail::product_with_base(out, this->weight(), in, N);
  else
    detail::product(out, this->weight(), in, Scalar(1), false);
}

template <class MatrixType_>
void DoRA<MatrixType_>::apply_gain(const Vector& g, const Matrix& Z, Matrix& Y) const {
  if (this->has_bias()) {
    const auto b = this->bias();
    for (Index t = 0; t < Y.cols(); ++t) Y.col(t) = g.cwiseProduct(Z.col(t)) + b;
  } else {
    for (Index t = 0; t < Y.cols(); ++t) Y.col(t) = g.cwiseProduct(Z.col(t));
  }
}

template <class MatrixType_>
void DoRA<MatrixType_>::forward_impl(const ConstMatrixRef& X, Matrix& Y) const {
  if (this->is_merged()) {  // W holds diag(g) (W0 + s B A): exactly the base product
    this->base_product(X, Y);
    return;
  }
  const Index N = X.cols();
  Matrix K, VAt;
  Vector n, g, inv_n;
  if (joint_product_pays(N)) {
    Matrix in, out;
    joint_base_product(X, in, out, false);
    Y = out.leftCols(N);
    detail::factored_row_norms(this->weight(), w2_, this->A(), this->B(), this->scaling(),
                               out.rightCols(this->rank()), K, VAt, n);
  } else {
    this->base_product(X, Y, false);
    row_norms(this->weight(), K, VAt, n);
  }
  gains(n, g, inv_n);
  detail::low_rank_forward<Scalar>(this->A(), this->B(), this->scaling(), X, Y);
  apply_gain(g, Y, Y);
}

template <class MatrixType_>
void DoRA<MatrixType_>::forward_train_impl(const ConstMatrixRef& X, Matrix& Y, Cache& cache) {
  const Index N = X.cols();
  joint_base_product(X, cache.wide_in, cache.wide_out, true);
  detail::factored_row_norms(this->weight(), w2_, this->A(), this->B(), this->scaling(),
                             cache.wide_out.rightCols(this->rank()), cache.K, cache.VAt, cache.n);
  gains(cache.n, cache.g, cache.inv_n);
  cache.Z = cache.wide_out.leftCols(N);
  detail::low_rank_forward_train<Scalar>(this->A(), this->B(), this->scaling(), this->config().dropout, this->rng(), X,
                                 cache.branch, cache.Z);
  apply_gain(cache.g, cache.Z, Y);
}

template <class MatrixType_>
void DoRA<MatrixType_>::backward_impl(const ConstMatrixRef& dY, Cache& cache, Matrix* dX) {
  const Index N = cache.tokens, r = this->rank();
  const Scalar s = this->scaling();
  auto dA = this->grad(layout(0));
  auto dB = this->grad(layout(1));
  auto dm = this->grad(layout(2));
  const auto A = this->A();
  const auto B = this->B();

  // One pass over G: q = rowsum(G ⊙ Z) and G' = diag(g) G (in the scratch's first N columns).
  cache.wide_out.resize(this->d_out(), N + r);
  auto Gp = cache.wide_out.leftCols(N);
  cache.q.setZero(this->d_out());
  for (Index t = 0; t < N; ++t) {
    cache.q += dY.col(t).cwiseProduct(cache.Z.col(t));
    Gp.col(t) = cache.g.cwiseProduct(dY.col(t));
  }
  dm += cache.q.cwiseProduct(cache.inv_n);  // dm += q / n

  if (this->config().detach_norm) {
    if (dX != nullptr) this->base_input_grad(Gp, *dX);
  } else {
    // Through the norms: dL/dV = diag(c) V with c = -g q / n², V = W0 + s B A.
    Vector& c = cache.q;
    c.array() = -cache.g.array() * cache.q.array() * cache.inv_n.array() * cache.inv_n.array();
    auto CB = cache.wide_out.rightCols(r);
    CB.array() = B.array().colwise() * c.array();
    // One product of W0ᵀ with [G' | diag(c) B]: dX's base part and (Bᵀ diag(c) W0)ᵀ; without dX, the
    // r columns alone (serial, on the stack: no heap), into the same scratch (no reallocation).
    cache.wide_in.resize(this->d_in(), N + r);
    if (dX != nullptr) {
      detail::product_with_base(cache.wide_in, this->weight().transpose(), cache.wide_out, N);
      *dX = cache.wide_in.leftCols(N);
    } else {
      detail::stack_product(cache.wide_in.rightCols(r), this->weight().transpose(), CB, Scalar(1), false);
    }
    dA += s * cache.wide_in.rightCols(r).transpose();                       // s Bᵀ diag(c) W0
    cache.BtCB.resize(r, r);
    detail::stack_product(cache.BtCB, B.transpose(), CB, Scalar(1), false);  // Bᵀ diag(c) B
    detail::stack_product(dA, cache.BtCB, A, Scalar(s * s), true);           // s² (Bᵀ diag(c) B) A
    dB.array() += s * (cache.VAt.array().colwise() * c.array());           // s diag(c) (P + s B K)
  }
  detail::low_rank_backward<Scalar>(A, B, s, Gp, cache.branch, dA, dB, dX);
}

template <class MatrixType_>
void DoRA<MatrixType_>::check_cache_impl(const Cache& cache) const {
  const auto where = this->where("backward");
  detail::check_low_rank_cache(where, cache.branch, this->rank(), cache.d_in, cache.tokens);
  const Index d_out = this->d_out();
  if (cache.Z.rows() != d_out || cache.Z.cols() != cache.tokens || cache.g.size() != d_out ||
      cache.inv_n.size() != d_out || cache.VAt.rows() != d_out || cache.VAt.cols() != this->rank())
    detail::raise<StateError>(where, "the cache does not fit this adapter (d_out ", d_out, ", rank ", this->rank(),
                              ", N ", cache.tokens, "); fill it with this adapter's forward(X, cache)");
}

template <class MatrixType_>
void DoRA<MatrixType_>::merge_impl() {
  Vector n, g, inv_n;
  Matrix K, VAt;
  row_norms(this->weight(), K, VAt, n);
  gains(n, g, inv_n);
  if (this->exact_restore()) {
    const Vector rho = restore_scales(this->where("merge"), n, magnitude(), false);
    const auto [view, u] = restore_tiles(this->weight_mut(), this->B(), this->A(), g, rho);
    detail::exact_merge<Scalar>(this->where("merge"), view, u, this->restore_record());
  } else {
    detail::scale_rows_add_low_rank_checked<false>(this->where("merge"), this->weight_mut(), g, this->scaling(),
                                                   this->B(), this->A());
  }
  merge_norms_.swap(n);  // no allocation after W is written
}

template <class MatrixType_>
void DoRA<MatrixType_>::unmerge_impl() {
  if (this->restore_record().empty()) {
    const Vector rho = unmerge_scales(this->where("unmerge"));
    detail::scale_rows_add_low_rank_checked<true>(this->where("unmerge"), this->weight_mut(), rho,
                                                  Scalar(-this->scaling()), this->merged_B(), this->merged_A());
  } else {
    const Vector rho = restore_scales(this->where("unmerge"), merge_norms_, this->applied_value(layout(2)).col(0), false);
    const auto [view, u] = restore_tiles(this->weight_mut(), this->merged_B(), this->merged_A(), rho, rho);
    this->note_restore(detail::exact_unmerge<Scalar>(this->where("unmerge"), view, u, this->restore_record()));
  }
  merge_norms_.resize(0);
}

template <class MatrixType_>
auto DoRA<MatrixType_>::restore_scales(const detail::Where& where, const Vector& n, const Eigen::Ref<const Vector>& m,
                                       bool refuse_zero) -> Vector {
  Vector rho(n.size());
  for (Index i = 0; i < rho.size(); ++i) {
    if (n(i) == Scalar(0) || (m(i) == Scalar(0) && !refuse_zero)) {
      rho(i) = Scalar(0);
    } else if (m(i) == Scalar(0)) {
      detail::raise<NumericalError>(where, "lora_magnitude_vector(", i, ") was 0 at merge(), so row ", i,
                                    " of W holds nothing of W0 and cannot be restored (the exact restore was off); W "
                                    "is left untouched");
    } else {
      rho(i) = n(i) / m(i);
    }
  }
  return rho;
}

template <class MatrixType_>
auto DoRA<MatrixType_>::unmerge_scales(const detail::Where& where) const -> Vector {
  return restore_scales(where, merge_norms_, this->applied_value(layout(2)).col(0), true);
}

template <class MatrixType_>
auto DoRA<MatrixType_>::base_weight(const char* op) const -> MatrixType {
  MatrixType W0 = this->weight();
  if (!this->is_merged()) return W0;
  if (!this->restore_record().empty()) {  // W0 bit for bit, from the record
    const Vector rho = restore_scales(this->where(op), merge_norms_, this->applied_value(layout(2)).col(0), false);
    const auto [view, u] = restore_tiles(W0, this->merged_B(), this->merged_A(), rho, rho);
    detail::exact_unmerge<Scalar>(this->where(op), view, u, this->restore_record());
    return W0;
  }
  const Vector rho = unmerge_scales(this->where(op));
  W0.array().colwise() *= rho.array();
  detail::product(W0, this->merged_B(), this->merged_A(), Scalar(-this->scaling()), true);
  return W0;
}

template <class MatrixType_>
auto DoRA<MatrixType_>::delta_weight_impl() const -> MatrixType {
  const MatrixType W0 = base_weight("delta_weight");
  Vector n, g, inv_n;
  Matrix K, VAt;
  row_norms(W0, K, VAt, n);
  gains(n, g, inv_n);
  MatrixType dW = W0;
  detail::product(dW, this->B(), this->A(), this->scaling(), true);
  dW.array().colwise() *= g.array();
  dW -= W0;
  return dW;
}

#ifdef PEFT_COMPILED
// The compiled part (peft::compiled) instantiates these once, for the four weight types; a translation
// unit built with it instantiates none of their out-of-line members (kernels.hpp says more).
#define PEFT_EXTERN_DORA(M) extern template class DoRA<M>;
PEFT_EXTERN_DORA(Eigen::MatrixXf)
PEFT_EXTERN_DORA(Eigen::MatrixXd)
PEFT_EXTERN_DORA(RowMajorMatrixXf)
PEFT_EXTERN_DORA(RowMajorMatrixXd)
#undef PEFT_EXTERN_DORA
#endif

}  // namespace peft
