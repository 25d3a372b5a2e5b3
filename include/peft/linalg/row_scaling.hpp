#pragma once
/// \file row_scaling.hpp
/// \brief Reversible row scalings, checked before anything is written: the arithmetic of SSF's merge
/// and of StandaloneSSF's folds (docs/math.md, SSF). `W <- diag(γ) W` with `b <- γ ⊙ b + β`, and its
/// inverse, refused up front when a scale is zero or not finite, when a value would overflow, or when
/// the round trip could not give the weights (or the bias) back.

#include "peft/core/error.hpp"
#include "peft/core/types.hpp"

#include <cmath>
#include <limits>
#include <type_traits>

namespace peft {
namespace detail {

/// \brief Checks, before anything is written, that scaling row i of M by `scale(i)` (or dividing it,
/// with Divide) gives finite values and can be undone: every scale is finite and non-zero; no entry
/// overflows; and, when multiplying (a merge or fold), no normal entry is pushed below the normal range,
/// where the division that undoes it would lose precision. Dividing back (unmerge, unfold) only checks
/// for overflow: an entry that was subnormal before the merge may be subnormal again. M may be any dense
/// expression (pass a transpose to check a column scaling); it is read in two or three vectorised passes,
/// and entry by entry only to name the offender when a check fails.
/// \throws NumericalError naming the row ("feature"), its scale and the offending entry
template <bool Divide = false, class MType, class SType>
void check_reversible_row_scaling(const Where& where, const char* what, const MType& M, const SType& scale) {
  using Scalar = typename MType::Scalar;
  const Index rows = M.rows(), cols = M.cols();
  for (Index i = 0; i < rows; ++i) {
    const Scalar g = scale(i);
    if (!std::isfinite(g) || g == Scalar(0))
      raise<NumericalError>(where, "feature ", i, " has scale ", g, ": too small to divide by (or not finite); ",
                            what, " is left untouched");
  }
  const Scalar lo = std::numeric_limits<Scalar>::min();
  if (cols == 0) return;
  // Vectorised pass: per row, the largest |entry| and (multiplying) the smallest normal |entry|.
  // |m g| and |m / g| round monotonically in |m|, so the largest entry overflows iff any does and the
  // smallest normal entry underflows iff any does. Only if a check fails is M walked entry by entry
  // below, to name the first offender.
  {
    // Finiteness is checked along the storage order too: M.allFinite() on a transposed matrix walks it
    // with a stride, ten times slower than the whole check.
    const Scalar inf = std::numeric_limits<Scalar>::infinity();
    VectorX<Scalar> hi(rows), low(rows);
    bool finite = true;
    if (MType::IsRowMajor) {
      for (Index i = 0; i < rows && finite; ++i) {
        const auto a = M.row(i).cwiseAbs().array();
        finite = M.row(i).allFinite();
        hi(i) = a.maxCoeff();
        low(i) = (a < lo).select(inf, a).minCoeff();
      }
    } else {  // columns are contiguous: accumulate them, so every pass is a vectorised sweep
      hi.setZero();
      low.setConstant(inf);
      for (Index j = 0; j < cols && finite; ++j) {
        const auto a = M.col(j).cwiseAbs().array();
        finite = M.col(j).allFinite();
        hi.array() = hi.array().max(a);
        low.array() = low.array().min((a < lo).select(inf, a));
      }
    }
    bool ok = finite;
    for (Index i = 0; i < rows && ok; ++i) {
      const Scalar g = std::abs(scale(i));
      ok = std::isfinite(Divide ? hi(i) / g : hi(i) * g) && (Divide || low(i) == inf || !(low(i) * g < lo));
    }
    if (ok) return;
  }
  const auto check = [&](Index i, Index j) {
    const Scalar m = M.coeff(i, j);
    if (m == Scalar(0)) return;
    if (!std::isfinite(m))
      raise<NumericalError>(where, what, "(", i, ",", j, ") is ", m, "; ", what, " is left untouched");
    const Scalar v = Divide ? m / scale(i) : m * scale(i);
    if (!std::isfinite(v))
      raise<NumericalError>(where, "feature ", i, " has scale ", scale(i), ": scaling ", what, "(", i, ",", j,
                            ") = ", m, " would overflow; ", what, " is left untouched");
    if (!Divide && std::abs(m) >= lo && std::abs(v) < lo)
      raise<NumericalError>(where, "feature ", i, " has scale ", scale(i), ": scaling ", what, "(", i, ",", j,
                            ") = ", m, " would underflow and could not be undone; ", what, " is left untouched");
  };
  if (MType::IsRowMajor) {
    for (Index i = 0; i < rows; ++i)
      for (Index j = 0; j < cols; ++j) check(i, j);
  } else {
    for (Index j = 0; j < cols; ++j)
      for (Index i = 0; i < rows; ++i) check(i, j);
  }
}

/// \brief Throws NumericalError naming the first non-finite entry of v (a vector about to be written).
template <class VType>
void check_finite_vector(const Where& where, const char* what, const VType& v) {
  for (Index i = 0; i < v.size(); ++i)
    if (!std::isfinite(v(i)))
      raise<NumericalError>(where, what, "(", i, ") would become ", v(i), "; nothing is written");
}

/// \brief W <- diag(γ) W and b <- γ ⊙ b + β, with the strong guarantee (SSF merge, LayerNorm fold).
/// Also refuses a shift that would swamp the bias. The unfold (b' − β) / γ is computed aside; its error
/// is at most about 4 ε |b| + 2 ε |β / γ|, so with a small γ (a feature the training nearly switched off)
/// b comes back with an absolute error that follows |β / γ|, not |b|. A round trip is accepted when it
/// misses b by at most 8 ε (|b| + |b' − b|) (the bound of docs/math.md, SSF, with room) or keeps at least half of
/// b's digits (error <= sqrt(ε) |b|), and refused otherwise, as when |β / γ| is many orders of
/// magnitude above |b| and b would come back as noise.
template <class WType, class BType, class GType, class SType>
void scale_shift_fold(const Where& where, WType&& W, BType&& b, const GType& gamma, const SType& beta) {
  using Scalar = typename std::decay_t<WType>::Scalar;
  using Vec = VectorX<Scalar>;
  check_reversible_row_scaling(where, "W", W, gamma);
  Vec new_b = gamma.cwiseProduct(b) + beta;
  check_finite_vector(where, "b", new_b);
  const Vec round_trip = (new_b - beta).cwiseQuotient(gamma);
  const Scalar e = std::numeric_limits<Scalar>::epsilon() / 2;
  const Scalar half_digits = std::sqrt(e);
  for (Index i = 0; i < b.size(); ++i) {
    const Scalar err = std::abs(round_trip(i) - b(i));
    if (err > 8 * e * (std::abs(b(i)) + std::abs(new_b(i) - b(i))) && err > half_digits * std::abs(b(i)))
      raise<NumericalError>(where, "feature ", i, " has scale ", gamma(i), " and shift ", beta(i), ": b(", i, ") = ", b(i),
                            " could not be recovered on unmerge (it would come back as ", round_trip(i),
                            "); nothing is written");
  }
  W.array().colwise() *= gamma.array();
  b = new_b;
}

/// \brief The inverse of scale_shift_fold: W <- diag(1/γ) W, b <- (b − β) / γ, with the strong
/// guarantee. γ and β are those of the fold.
template <class WType, class BType, class GType, class SType>
void scale_shift_unfold(const Where& where, WType&& W, BType&& b, const GType& gamma, const SType& beta) {
  using Vec = VectorX<typename std::decay_t<WType>::Scalar>;
  check_reversible_row_scaling<true>(where, "W", W, gamma);
  Vec new_b = (b - beta).cwiseQuotient(gamma);
  check_finite_vector(where, "b", new_b);
  W.array().colwise() /= gamma.array();
  b = new_b;
}

}  // namespace detail
}  // namespace peft
