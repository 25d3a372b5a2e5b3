#pragma once
/// \file row_scaling.hpp
/// \brief Reversible row scalings, checked before anything is written: the arithmetic of SSF's merge
/// and of StandaloneSSF's folds (docs/math.md, SSF). `W <- diag(γ) W` with `b <- γ ⊙ b + β`, and its
/// inverse, refused up front when a scale is zero or not finite, when a value would overflow, or when
/// the round trip could not give the weights (or the bias) back.
///
/// The work is done by functions of the scalar type alone, on column-major views of the weights (a
/// row-major weight is the transpose of a column-major one, kernels.hpp), so both storage orders and
/// every expression of the callers share one instantiation per scalar.

#include "peft/detail/internal_header_check.hpp"

#include "peft/core/config.hpp"
#include "peft/core/error.hpp"
#include "peft/core/types.hpp"
#include "peft/detail/kernels.hpp"

#include <cmath>
#include <limits>
#include <type_traits>

namespace peft {
namespace detail {

template <class S>
using ConstVectorRef = Eigen::Ref<const VectorX<S>>;

/// \brief Checks, before anything is written, that scaling row i of M = op(view) by `scale(i)` (or
/// dividing it, with `divide`) gives finite values and can be undone: every scale is finite and
/// non-zero; no entry overflows; and, when multiplying (a merge or fold), no normal entry is pushed
/// below the normal range, where the division that undoes it would lose precision. Dividing back
/// (unmerge, unfold) only checks for overflow: an entry that was subnormal before the merge may be
/// subnormal again. M is read in two or three vectorised passes along its storage order, and entry by
/// entry only to name the offender when a check fails.
/// \throws NumericalError naming the row ("feature"), its scale and the offending entry
template <class S>
PEFT_NOINLINE void check_row_scaling(const Where& where, const char* what, const kernels::Operand<S>& M,
                       const ConstVectorRef<S>& scale, bool divide) {
  const Index rows = M.rows(), cols = M.cols();
  for (Index i = 0; i < rows; ++i) {
    const S g = scale(i);
    if (!std::isfinite(g) || g == S(0))
      raise<NumericalError>(where, "feature ", i, " has scale ", g, ": too small to divide by (or not finite); ",
                            what, " is left untouched");
  }
  const S lo = std::numeric_limits<S>::min();
  if (cols == 0) return;
  // Vectorised pass: per row, the largest |entry| and (multiplying) the smallest normal |entry|.
  // |m g| and |m / g| round monotonically in |m|, so the largest entry overflows iff any does and the
  // smallest normal entry underflows iff any does. Only if a check fails is M walked entry by entry
  // below, to name the first offender.
  {
    const S inf = std::numeric_limits<S>::infinity();
    VectorX<S> hi(rows), low(rows);
    bool finite = true;
    if (M.transposed) {  // the rows of M are the view's contiguous columns
      for (Index i = 0; i < rows && finite; ++i) {
        const auto a = M.view.col(i).cwiseAbs().array();
        finite = M.view.col(i).allFinite();
        hi(i) = a.maxCoeff();
        low(i) = (a < lo).select(inf, a).minCoeff();
      }
    } else {  // columns are contiguous: accumulate them, so every pass is a vectorised sweep
      hi.setZero();
      low.setConstant(inf);
      for (Index j = 0; j < cols && finite; ++j) {
        const auto a = M.view.col(j).cwiseAbs().array();
        finite = M.view.col(j).allFinite();
        hi.array() = hi.array().max(a);
        low.array() = low.array().min((a < lo).select(inf, a));
      }
    }
    bool ok = finite;
    for (Index i = 0; i < rows && ok; ++i) {
      const S g = std::abs(scale(i));
      ok = std::isfinite(divide ? hi(i) / g : hi(i) * g) && (divide || low(i) == inf || !(low(i) * g < lo));
    }
    if (ok) return;
  }
  const auto check = [&](Index i, Index j) {
    const S m = M.transposed ? M.view(j, i) : M.view(i, j);
    if (m == S(0)) return;
    if (!std::isfinite(m))
      raise<NumericalError>(where, what, "(", i, ",", j, ") is ", m, "; ", what, " is left untouched");
    const S v = divide ? m / scale(i) : m * scale(i);
    if (!std::isfinite(v))
      raise<NumericalError>(where, "feature ", i, " has scale ", scale(i), ": scaling ", what, "(", i, ",", j,
                            ") = ", m, " would overflow; ", what, " is left untouched");
    if (!divide && std::abs(m) >= lo && std::abs(v) < lo)
      raise<NumericalError>(where, "feature ", i, " has scale ", scale(i), ": scaling ", what, "(", i, ",", j,
                            ") = ", m, " would underflow and could not be undone; ", what, " is left untouched");
  };
  for (Index outer = 0; outer < (M.transposed ? rows : cols); ++outer)
    for (Index inner = 0; inner < (M.transposed ? cols : rows); ++inner)
      M.transposed ? check(outer, inner) : check(inner, outer);
}

/// \brief check_row_scaling for any dense expression M with direct access (a transpose checks a
/// column scaling) and any vector expression of scales.
template <bool Divide = false, class MType, class SType>
void check_reversible_row_scaling(const Where& where, const char* what, const Eigen::MatrixBase<MType>& M,
                                  const Eigen::MatrixBase<SType>& scale) {
  using S = typename MType::Scalar;
  check_row_scaling<S>(where, what, operand(M), ConstVectorRef<S>(scale), Divide);
}

/// \brief Throws NumericalError naming the first non-finite entry of v (a vector about to be written).
template <class S>
void check_finite_vector(const Where& where, const char* what, const ConstVectorRef<S>& v) {
  for (Index i = 0; i < v.size(); ++i)
    if (!std::isfinite(v(i)))
      raise<NumericalError>(where, what, "(", i, ") would become ", v(i), "; nothing is written");
}

/// \brief Multiplies (or divides, with `divide`) row i of op(view) by d(i), in place.
template <class S>
void scale_rows(kernels::View<S> view, bool transposed, const ConstVectorRef<S>& d, bool divide) {
  if (transposed && divide)  // the rows are the view's columns
    view.array().rowwise() /= d.transpose().array();
  else if (transposed)
    view.array().rowwise() *= d.transpose().array();
  else if (divide)
    view.array().colwise() /= d.array();
  else
    view.array().colwise() *= d.array();
}

/// \brief The checks of W <- diag(γ) W and b <- γ ⊙ b + β (SSF merge, LayerNorm fold), on W = op(view),
/// before anything is written: check_row_scaling, and the new b, which it returns. Also refuses a shift that would swamp the bias. The unfold (b' − β) / γ is computed
/// aside; its error is at most about 4 ε |b| + 2 ε |β / γ|, so with a small γ (a feature the training
/// nearly switched off) b comes back with an absolute error that follows |β / γ|, not |b|. A round trip
/// is accepted when it misses b by at most 8 ε (|b| + |b' − b|) (the bound of docs/math.md, SSF, with
/// room) or keeps at least half of b's digits (error <= sqrt(ε) |b|), and refused otherwise, as when
/// |β / γ| is many orders of magnitude above |b| and b would come back as noise.
template <class S>
PEFT_NOINLINE VectorX<S> scale_shift_fold_check(const Where& where, kernels::ConstView<S> W, bool transposed,
                                                const ConstVectorRef<S>& b, const ConstVectorRef<S>& gamma,
                                                const ConstVectorRef<S>& beta) {
  check_row_scaling<S>(where, "W", {W, transposed}, gamma, false);
  const VectorX<S> new_b = gamma.cwiseProduct(b) + beta;
  check_finite_vector<S>(where, "b", new_b);
  const VectorX<S> round_trip = (new_b - beta).cwiseQuotient(gamma);
  const S e = std::numeric_limits<S>::epsilon() / 2;
  const S half_digits = std::sqrt(e);
  for (Index i = 0; i < b.size(); ++i) {
    const S err = std::abs(round_trip(i) - b(i));
    if (err > 8 * e * (std::abs(b(i)) + std::abs(new_b(i) - b(i))) && err > half_digits * std::abs(b(i)))
      raise<NumericalError>(where, "feature ", i, " has scale ", gamma(i), " and shift ", beta(i), ": b(", i, ") = ", b(i),
                            " could not be recovered on unmerge (it would come back as ", round_trip(i),
                            "); nothing is written");
  }
  return new_b;
}

/// \brief scale_shift_fold_check, then the fold: W <- diag(γ) W and b <- γ ⊙ b + β.
template <class S>
void scale_shift_fold_kernel(const Where& where, kernels::View<S> W, bool transposed, Eigen::Ref<VectorX<S>> b,
                             const ConstVectorRef<S>& gamma, const ConstVectorRef<S>& beta) {
  const VectorX<S> new_b = scale_shift_fold_check<S>(where, kernels::as_const(W), transposed, b, gamma, beta);
  scale_rows<S>(W, transposed, gamma, false);
  b = new_b;
}

/// \brief The inverse of scale_shift_fold_kernel: W <- diag(1/γ) W, b <- (b − β) / γ, with the strong
/// guarantee. γ and β are those of the fold.
template <class S>
PEFT_NOINLINE void scale_shift_unfold_kernel(const Where& where, kernels::View<S> W, bool transposed, Eigen::Ref<VectorX<S>> b,
                               const ConstVectorRef<S>& gamma, const ConstVectorRef<S>& beta) {
  check_row_scaling<S>(where, "W", {kernels::as_const(W), transposed}, gamma, true);
  const VectorX<S> new_b = (b - beta).cwiseQuotient(gamma);
  check_finite_vector<S>(where, "b", new_b);
  scale_rows<S>(W, transposed, gamma, true);
  b = new_b;
}

/// \brief Multiplies (or divides) column j of a writable dense M (either storage order) by d(j).
template <class MType, class DType>
void scale_columns(MType&& M, const DType& d, bool divide) {
  using S = typename std::decay_t<MType>::Scalar;
  const auto [view, transposed] = destination(M);
  scale_rows<S>(view, !transposed, d, divide);  // the columns of M are the rows of Mᵀ
}

/// \brief scale_shift_fold_kernel for a writable dense W (either storage order) and vector expressions.
template <class WType, class BType, class GType, class SType>
void scale_shift_fold(const Where& where, WType&& W, BType&& b, const GType& gamma, const SType& beta) {
  using S = typename std::decay_t<WType>::Scalar;
  const auto [view, transposed] = destination(W);
  scale_shift_fold_kernel<S>(where, view, transposed, b, gamma, beta);
}

/// \brief scale_shift_unfold_kernel for a writable dense W and vector expressions.
template <class WType, class BType, class GType, class SType>
void scale_shift_unfold(const Where& where, WType&& W, BType&& b, const GType& gamma, const SType& beta) {
  using S = typename std::decay_t<WType>::Scalar;
  const auto [view, transposed] = destination(W);
  scale_shift_unfold_kernel<S>(where, view, transposed, b, gamma, beta);
}

}  // namespace detail
}  // namespace peft
