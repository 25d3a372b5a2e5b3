#pragma once
/// \file merge.hpp
/// \brief Merging a LoRA or DoRA adapter's factors into a weight, exactly as Hugging Face PEFT's
/// `merge_and_unload()` does, as free functions over Eigen matrices. Needs Eigen alone (no training code,
/// no JSON): what a deployment program that only loads and merges includes. `peft-merge` uses it.
///
/// With W the weight as stored (d_out x d_in; d_in x d_out when `fan_in_fan_out`, GPT-2's Conv1D),
/// A the r x d_in factor, B the d_out x r factor and s the scale:
/// - LoRA: W += transpose(B A, fan_in_fan_out) · s, computed as PEFT does: the product D = B A, then
///   D · s, then the sum, each rounded in W's scalar type.
/// - DoRA: V = W + transpose(B A · s); each output unit's row of V (a column when fan_in_fan_out) is
///   scaled by m_i / ‖V_i‖. The norms are accumulated in double and rounded once (PyTorch accumulates
///   in the weight's type, in an order of its own), then the factor m_i / ‖V_i‖ and the product are
///   rounded in W's type, as PEFT computes them.
/// The products run over blocks of 256 output units (no temporary of W's size), serially on the calling
/// thread: each is a thin product (depth r) that memory bandwidth bounds, where OpenMP threads waiting
/// at the next one would only take a core from the kernel's file writes.

#include "peft/core/config.hpp"  // first: the detail headers check for it
#include "peft/core/error.hpp"
#include "peft/core/types.hpp"
#include "peft/detail/kernels.hpp"

#include <algorithm>
#include <cmath>
#include <string>

namespace peft {
namespace merge {

/// \returns PEFT's scale: alpha / r, or alpha / √r with rsLoRA.
inline double lora_scale(double alpha, Index rank, bool use_rslora) {
  return use_rslora ? alpha / std::sqrt(double(rank)) : alpha / double(rank);
}

namespace detail {

constexpr Index block_rows = 256;

template <class WV, class DA, class DB>
void check_factors(const char* op, const WV& Wl, const DA& A, const DB& B) {
  if (A.rows() != B.cols() || A.cols() != Wl.cols() || B.rows() != Wl.rows())
    peft::detail::raise<ShapeError>({"peft::merge", op}, "A is ", A.rows(), "x", A.cols(), " and B is ", B.rows(),
                                    "x", B.cols(), " for a weight of ", Wl.rows(), " output and ", Wl.cols(),
                                    " input units (expected A r x ", Wl.cols(), ", B ", Wl.rows(), " x r)");
}

/// W_logical (d_out x d_in, a matrix or the transpose of one) += (B A) s, block by block.
template <class WV, class DA, class DB>
void add_delta(WV&& Wl, const DA& A, const DB& B, typename std::decay_t<WV>::Scalar s, double* largest_update) {
  using S = typename std::decay_t<WV>::Scalar;
  MatrixX<S> D;
  for (Index i0 = 0; i0 < Wl.rows(); i0 += block_rows) {
    const Index n = std::min(block_rows, Wl.rows() - i0);
    D.resize(n, Wl.cols());
    peft::detail::stack_product(D, B.middleRows(i0, n), A, S(1), false);
    D *= s;
    if (largest_update && D.size() > 0) *largest_update = std::max(*largest_update, double(D.cwiseAbs().maxCoeff()));
    Wl.middleRows(i0, n) += D;
  }
}

template <class WV, class DA, class DB, class DM>
void dora(WV&& Wl, const DA& A, const DB& B, const DM& m, typename std::decay_t<WV>::Scalar s) {
  using S = typename std::decay_t<WV>::Scalar;
  MatrixX<S> V;
  for (Index i0 = 0; i0 < Wl.rows(); i0 += block_rows) {
    const Index n = std::min(block_rows, Wl.rows() - i0);
    V.resize(n, Wl.cols());
    peft::detail::stack_product(V, B.middleRows(i0, n), A, S(1), false);
    V *= s;
    V += Wl.middleRows(i0, n);
    for (Index i = 0; i < n; ++i) {
      const double norm = V.row(i).template cast<double>().norm();
      const S factor = S(m(i0 + i)) / S(norm);
      Wl.row(i0 + i) = factor * V.row(i);
    }
  }
}

}  // namespace detail

/// \brief LoRA: W += transpose(B A, fan_in_fan_out) · scale, in W's scalar type (see the file comment).
/// \param largest_update if given, raised to the largest |element| of the update s B A.
/// \throws ShapeError if A (r x d_in) and B (d_out x r) do not fit W; W is then untouched.
template <class DW, class DA, class DB>
void lora(Eigen::MatrixBase<DW>& W, const Eigen::MatrixBase<DA>& A, const Eigen::MatrixBase<DB>& B, double scale,
          bool fan_in_fan_out = false, double* largest_update = nullptr) {
  using S = typename DW::Scalar;
  const auto As = A.template cast<S>().eval();
  const auto Bs = B.template cast<S>().eval();
  if (fan_in_fan_out) {
    auto Wl = W.derived().transpose();
    detail::check_factors("lora", Wl, As, Bs);
    detail::add_delta(Wl, As, Bs, S(scale), largest_update);
  } else {
    detail::check_factors("lora", W, As, Bs);
    detail::add_delta(W.derived(), As, Bs, S(scale), largest_update);
  }
}

/// \brief DoRA: W ← diag(m / ‖W + ΔW‖_row) (W + ΔW), ΔW = transpose(B A, fan_in_fan_out) · scale, per output
/// unit (see the file comment). \throws ShapeError for factors or a magnitude (d_out) that do not fit W,
/// NumericalError for a zero norm; W is then untouched.
template <class DW, class DA, class DB, class DM>
void dora(Eigen::MatrixBase<DW>& W, const Eigen::MatrixBase<DA>& A, const Eigen::MatrixBase<DB>& B,
          const Eigen::MatrixBase<DM>& magnitude, double scale, bool fan_in_fan_out = false) {
  using S = typename DW::Scalar;
  const auto As = A.template cast<S>().eval();
  const auto Bs = B.template cast<S>().eval();
  const VectorX<S> m = magnitude.template cast<S>().reshaped();
  const Index d_out = fan_in_fan_out ? W.cols() : W.rows();
  if (m.size() != d_out)
    peft::detail::raise<ShapeError>({"peft::merge", "dora"}, "the magnitude has ", m.size(), " entries for ", d_out,
                                    " output units");
  const auto run = [&](auto&& Wl) {
    detail::check_factors("dora", Wl, As, Bs);
    // A zero row norm would divide by zero: checked before anything is written.
    for (Index i0 = 0; i0 < Wl.rows(); i0 += detail::block_rows) {
      const Index n = std::min(detail::block_rows, Wl.rows() - i0);
      MatrixX<S> V(n, Wl.cols());
      peft::detail::stack_product(V, Bs.middleRows(i0, n), As, S(1), false);
      V *= S(scale);
      V += Wl.middleRows(i0, n);
      for (Index i = 0; i < n; ++i)
        if (!(V.row(i).template cast<double>().norm() > 0.0))
          peft::detail::raise<NumericalError>({"peft::merge", "dora"}, "output unit ", i0 + i,
                                              " has a zero (or non-finite) norm after the update");
    }
    detail::dora(Wl, As, Bs, m, S(scale));
  };
  if (fan_in_fan_out)
    run(W.derived().transpose());
  else
    run(W.derived());
}

}  // namespace merge
}  // namespace peft
