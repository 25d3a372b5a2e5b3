#pragma once
/// \file pissa.hpp
/// \brief PiSSA: LoRA started from the principal singular triplets of the weight, with the residual
/// frozen in its place (Meng et al., NeurIPS 2024).

#include "peft/core/config.hpp"  // first: the detail headers check for it
#include "peft/adapters/lora_config.hpp"
#include "peft/adapters/lora_family.hpp"
#include "peft/core/error.hpp"
#include "peft/core/types.hpp"
#include "peft/detail/checks.hpp"
#include "peft/detail/exact_restore.hpp"
#include "peft/detail/kernels.hpp"
#include "peft/detail/low_rank.hpp"
#include "peft/linalg/svd.hpp"

#include <algorithm>
#include <cmath>
#include <utility>

namespace peft {

/// \brief PiSSA's settings: LoRA's (its `init` field is ignored: the SVD is the init; `seed` seeds the
/// randomized SVD's sketch and, through another stream, the dropout masks) plus the SVD's.
struct PiSSAConfig : LoRAConfig {
  int svd_iterations = 0;  ///< 0: exact SVD (Eigen's BDCSVD); q > 0: randomized SVD with q power
                           ///< iterations (PEFT's init_lora_weights="pissa_niter_q")
  Index oversampling = 8;  ///< extra sketch columns of the randomized SVD (p >= 0)
  /// true: the constructor keeps what release_to_lora() needs to give the original weight back bit for
  /// bit (docs/math.md, Exact restore): one byte per element of W for the adapter's life (25 % of a float
  /// W, 12.5 % of a double one). false: release_to_lora() restores it to rounding.
  bool exact_release = true;
};

/// \brief A trained PiSSA adapter expressed as a plain LoRA on the *original* weight W0 (docs/math.md,
/// PiSSA, export): `s (B A − B₀ A₀) = s [B | B₀] [A ; −A₀]`, rank 2r, same scaling s.
template <class Scalar>
struct LoRAExport {
  LoRAConfig config;  ///< rank 2r, alpha chosen so that the scaling is PiSSA's s
  MatrixX<Scalar> A;  ///< lora_A: [A ; −A₀], 2r x d_in
  MatrixX<Scalar> B;  ///< lora_B: [B | B₀], d_out x 2r
};

/// \brief PiSSA adapter: LoRA whose factors start as the top-r singular triplets of W, scaled so that
/// `s B A` is the best rank-r approximation of W, while W itself is replaced **in place** by the
/// residual `W_res = W − s B A` (as PEFT does). The layer's output is unchanged at init; training then
/// moves the principal directions first (docs/math.md, PiSSA).
///
///     W ≈ U_r S_r V_rᵀ;   A = diag(sqrt(S_r / s)) V_rᵀ,   B = U_r diag(sqrt(S_r / s)),   W <- W − s B A
///
/// Forward, backward, merge and unmerge are LoRA's (LoRAFamily), on the residual. The initial factors
/// A₀, B₀ are kept (r(d_in + d_out) scalars) for export: to_lora() gives the rank-2r LoRA that reproduces
/// the trained layer on the original weight, and release_to_lora() also restores that weight in place.
///
/// **Cost of the init.** Exact SVD: O(d_out d_in min(d_out, d_in)) flops. Randomized (`svd_iterations`
/// = q > 0): O(d_out d_in (r + p)(2q + 2)), 2q + 2 GEMMs with W over r + p columns; measured times are
/// in docs/concepts.md, PiSSA, and docs/benchmarks.md. Training and merging cost what LoRA's do.
/// \throws ConfigError as LoRA, and for rank > min(d_out, d_in), svd_iterations < 0, oversampling < 0;
///         NumericalError for a non-finite entry in W; nothing is written to W then
template <class MatrixType_>
class PiSSA : public LoRAFamily<PiSSA<MatrixType_>, MatrixType_, PiSSAConfig> {
  using Family = LoRAFamily<PiSSA<MatrixType_>, MatrixType_, PiSSAConfig>;

 public:
  using typename Family::Index;
  using typename Family::Matrix;
  using typename Family::MatrixType;
  using typename Family::Scalar;
  using typename Family::Vector;

  static constexpr const char* class_name = "peft::PiSSA";

  /// \brief Initialises from W's SVD and replaces W by the residual.
  explicit PiSSA(Eigen::Ref<MatrixType> W, const PiSSAConfig& cfg = {}) : PiSSA(W, nullptr, 0, false, cfg) {}
  /// \brief The same, with the layer's bias b (untouched by PiSSA; used in forward).
  PiSSA(Eigen::Ref<MatrixType> W, Eigen::Ref<Vector> b, const PiSSAConfig& cfg = {})
      : PiSSA(W, b.data(), b.size(), true, cfg) {}

  /// \returns the PiSSA settings (the same as config()).
  const PiSSAConfig& pissa_config() const { return this->config(); }
  /// \returns A₀, the initial lora_A (r x d_in).
  const Matrix& initial_A() const { return A0_; }
  /// \returns B₀, the initial lora_B (d_out x r).
  const Matrix& initial_B() const { return B0_; }

  /// A copy trains and merges like the original but does not own the residual in W: it cannot
  /// release_to_lora() (and so does not copy what the release needs).
  PiSSA(const PiSSA& other)
      : Family(other),
        A0_(other.A0_),
        B0_(other.B0_),
        owns_residual_(false),
        released_(other.released_) {}
  PiSSA(PiSSA&& other) noexcept
      : Family(std::move(other)),
        A0_(std::move(other.A0_)),
        B0_(std::move(other.B0_)),
        release_record_(std::move(other.release_record_)),
        owns_residual_(other.owns_residual_),
        released_(other.released_) {
    other.owns_residual_ = false;
  }
  PiSSA& operator=(const PiSSA& other) {
    if (this != &other) *this = PiSSA(other);
    return *this;
  }
  PiSSA& operator=(PiSSA&& other) {
    if (this == &other) return *this;
    Family::operator=(std::move(other));  // refuses first if either is merged
    A0_ = std::move(other.A0_);
    B0_ = std::move(other.B0_);
    release_record_ = std::move(other.release_record_);
    owns_residual_ = other.owns_residual_;
    released_ = other.released_;
    other.owns_residual_ = false;
    return *this;
  }
  ~PiSSA() = default;

  /// \returns the original weight W0 = W_res + s B₀ A₀ (d_out x d_in, allocated), whatever the training
  /// (bit for bit with PiSSAConfig::exact_release).
  /// \throws StateError while merged (W then holds W_res + s B A), or after release_to_lora()
  MatrixType original_weight() const;

  /// \returns the trained adapter as a rank-2r LoRA on the original weight: a LoRA over W0 with
  /// these factors computes exactly this layer.
  LoRAExport<Scalar> to_lora() const;

  /// \brief Restores the original weight in place (W <- W_res + s B₀ A₀, without the trained delta)
  /// and returns the trained adapter as a rank-2r LoRA on it. Consumes the adapter (hence `&&`:
  /// `std::move(pissa).release_to_lora()`): afterwards, as a moved-from object, it may only be destroyed
  /// or assigned to, and its PiSSA operations throw. Only the adapter that made the residual may restore
  /// it: a copy's release throws, so the delta can never be added back twice. With
  /// PiSSAConfig::exact_release (the default), W is the original weight bit for bit, whatever merges and
  /// unmerges happened in between (unless W was written other than by them: its written parts then get
  /// the formula above).
  /// \throws StateError while merged, on a copy, or a second time; NumericalError if W would not be
  ///         finite (W untouched)
  LoRAExport<Scalar> release_to_lora() &&;

  /// \returns whether this adapter made the residual now in W (false for copies): only then may it
  /// release_to_lora().
  bool owns_residual() const { return owns_residual_; }

 private:
  PiSSA(Eigen::Ref<MatrixType> W, Scalar* b, Index b_size, bool has_bias, const PiSSAConfig& cfg);

  static const PiSSAConfig& checked(const Eigen::Ref<MatrixType>& W, const PiSSAConfig& cfg) {
    const detail::Where where{class_name, "constructor"};
    detail::check_lora_config(where, cfg);
    // Unlike LoRA and DoRA: the factors are singular triplets, and there are min(d_out, d_in) of them.
    if (W.size() != 0 && cfg.rank > std::min(W.rows(), W.cols()))  // an empty W: AdapterBase's ShapeError
      detail::raise<ConfigError>(where, "rank is ", cfg.rank, ", expected <= min(d_out, d_in) = ",
                                 std::min(W.rows(), W.cols()), " (a PiSSA adapter's factors are singular triplets)");
    detail::check_at_least(where, "svd_iterations", cfg.svd_iterations, 0);
    detail::check_at_least<Index>(where, "oversampling", cfg.oversampling, 0);
    if (!W.allFinite())  // an SVD of NaN or inf is garbage (or does not converge): refuse it up front
      for (Index j = 0; j < W.cols(); ++j)
        for (Index i = 0; i < W.rows(); ++i)
          if (!std::isfinite(W(i, j)))
            detail::raise<NumericalError>(where, "W(", i, ",", j, ") is ", W(i, j), "; W is left untouched");
    return cfg;
  }

  void require_not_released(const char* op) const {
    if (released_) detail::raise<StateError>(this->where(op), "the adapter was released: W holds the original weight");
  }

  Matrix A0_;
  Matrix B0_;
  detail::RestoreRecord<Scalar> release_record_;  // the exact restore of the original weight (exact_release)
  bool owns_residual_ = true;
  bool released_ = false;
};

// -------------------------------------------------------------------------------------------------
// PiSSA's members, out of line (see lora_family.hpp)

template <class MatrixType_>
PiSSA<MatrixType_>::PiSSA(Eigen::Ref<MatrixType> W, Scalar* b, Index b_size, bool has_bias, const PiSSAConfig& cfg)
    : Family(W, b, b_size, has_bias, checked(W, cfg)) {
  TruncatedSVD<Scalar> svd;
  if (cfg.svd_iterations == 0) {
    svd = exact_svd(this->weight(), cfg.rank);
  } else {
    RandomizedSVDConfig rs;
    rs.oversampling = cfg.oversampling;
    rs.power_iterations = cfg.svd_iterations;
    rs.seed = cfg.seed ^ 0x9E3779B97F4A7C15ull;  // a stream of its own, apart from the dropout masks
    svd = randomized_svd(this->weight(), cfg.rank, rs);
  }
  const Vector root = (svd.S / this->scaling()).cwiseSqrt();
  this->A() = root.asDiagonal() * svd.V.transpose();
  this->B() = svd.U * root.asDiagonal();
  A0_ = this->A();
  B0_ = this->B();
  if (cfg.exact_release) {  // W <- W − s B₀ A₀, recording what gives W back bit for bit
    const auto [view, u] = detail::low_rank_tiles(this->weight_mut(), this->scaling(), B0_, A0_, detail::TileOp::sub,
                                                  detail::TileOp::add);
    detail::exact_merge<Scalar>(this->where("constructor"), view, u, release_record_);
  } else {
    detail::add_low_rank_checked(this->where("constructor"), this->weight_mut(), Scalar(-this->scaling()), this->B(),
                                 this->A());
  }
}

template <class MatrixType_>
auto PiSSA<MatrixType_>::original_weight() const -> MatrixType {
  require_not_released("original_weight");
  this->require_unmerged("original_weight");
  MatrixType W0 = this->weight();
  if (release_record_.empty()) {
    detail::product(W0, B0_, A0_, this->scaling(), true);
  } else {  // bit for bit, from the record
    const auto [view, u] =
        detail::low_rank_tiles(W0, this->scaling(), B0_, A0_, detail::TileOp::sub, detail::TileOp::add);
    detail::exact_unmerge<Scalar>(this->where("original_weight"), view, u, release_record_);
  }
  return W0;
}

template <class MatrixType_>
auto PiSSA<MatrixType_>::to_lora() const -> LoRAExport<Scalar> {
  require_not_released("to_lora");
  LoRAExport<Scalar> out;
  const Index r = this->rank();
  out.config = this->config();  // the LoRA fields
  out.config.rank = 2 * r;
  // Same s at rank 2r: alpha / r = alpha' / 2r, or alpha / sqrt(r) = alpha' / sqrt(2r) with rsLoRA.
  out.config.alpha = this->config().use_rslora ? std::sqrt(2.0) * this->config().alpha : 2.0 * this->config().alpha;
  out.A.resize(2 * r, this->d_in());
  out.A << this->A(), -A0_;
  out.B.resize(this->d_out(), 2 * r);
  out.B << this->B(), B0_;
  return out;
}

template <class MatrixType_>
auto PiSSA<MatrixType_>::release_to_lora() && -> LoRAExport<Scalar> {
  require_not_released("release_to_lora");
  this->require_unmerged("release_to_lora");
  if (!owns_residual_)
    detail::raise<StateError>(this->where("release_to_lora"),
                              "this adapter is a copy (or was moved from): only the adapter that replaced W by the "
                              "residual may restore it");
  LoRAExport<Scalar> out = to_lora();
  if (release_record_.empty()) {
    detail::add_low_rank_checked(this->where("release_to_lora"), this->weight_mut(), this->scaling(), B0_, A0_);
  } else {
    const auto [view, u] = detail::low_rank_tiles(this->weight_mut(), this->scaling(), B0_, A0_, detail::TileOp::sub,
                                                  detail::TileOp::add);
    detail::exact_unmerge<Scalar>(this->where("release_to_lora"), view, u, release_record_);
    release_record_.clear();
  }
  owns_residual_ = false;
  released_ = true;
  return out;
}

#ifdef PEFT_COMPILED
// The compiled part (peft::compiled) instantiates these once, for the four weight types; a translation
// unit built with it instantiates none of their out-of-line members (kernels.hpp says more).
#define PEFT_EXTERN_PISSA(M) extern template class LoRAFamily<PiSSA<M>, M, PiSSAConfig>; extern template class PiSSA<M>;
PEFT_EXTERN_PISSA(Eigen::MatrixXf)
PEFT_EXTERN_PISSA(Eigen::MatrixXd)
PEFT_EXTERN_PISSA(RowMajorMatrixXf)
PEFT_EXTERN_PISSA(RowMajorMatrixXd)
#undef PEFT_EXTERN_PISSA
#endif

}  // namespace peft
