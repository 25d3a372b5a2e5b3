#pragma once
/// \file dora.hpp
/// \brief DoRA: weight-decomposed low-rank adaptation (Liu et al., ICML 2024).

#include "peft/adapters/lora.hpp"
#include "peft/core/adapter_base.hpp"
#include "peft/core/error.hpp"
#include "peft/core/random.hpp"
#include "peft/core/types.hpp"
#include "peft/linalg/low_rank.hpp"
#include "peft/linalg/stack_product.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>

namespace peft {

/// \brief DoRA's settings: LoRA's (rank, alpha, dropout, use_rslora, init, seed), plus how backward
/// treats the row norms. Field names follow PEFT's LoraConfig(use_dora=True).
struct DoRAConfig : LoRAConfig {
  /// true: the norms n are constants in backward (DoRA paper §4.3, and PEFT's behaviour); false: the
  /// exact gradient, through the norms as well (MATH.md, DoRA, "exact mode").
  bool detach_norm = true;
};

/// \brief DoRA adapter over a frozen weight: `Y = diag(m / n) (W0 X + s B A D(X)) + b 1^T`, with
/// `n_i = ||(W0 + s B A)_i,:||` (MATH.md, DoRA).
///
/// Wraps the user's weight W (d_out x d_in) and optional bias b (d_out) by reference, as LoRA; W is
/// written only by merge() and unmerge(). Trainable parameters, in one flat buffer, named as in PEFT:
/// `lora_A` (r x d_in), `lora_B` (d_out x r) and `lora_magnitude_vector` m (d_out x 1). The magnitude
/// starts at the row norms of W0 + s B A, that is of W0 for the default inits (B = 0, as PEFT), so
/// the layer starts equal to the base (equal to the LoRA of the same A, B with LoRAInit::random).
/// W must hold its final values when the adapter is built: m and ||W0_i,:||^2 are taken from it then.
///
/// \tparam MatrixType_ the weight's type: `Eigen::MatrixXf`, `Eigen::MatrixXd`, or their row-major
///         counterparts. Activations X, Y (d_in x N, d_out x N) are column-major `Matrix`.
///
/// **Row norms.** Never from a materialised W0 + s B A: with `P = W0 A^T` and `K = A A^T`,
/// `n_i^2 = ||W0_i||^2 + 2 s <P_i, B_i> + s^2 B_i K B_i^T`, `||W0_i||^2` cached at construction.
/// Where `s B A` nearly cancels a row of W0 that difference of large terms loses the small result
/// (its error is about eps (||W0_i|| + |s| sum_j |B_ij| ||A_j||)^2, so n_i would have a relative
/// error up to 100 %, and a negative n_i^2 is possible): rows whose factored n_i^2 falls below 1/16 of
/// that scale (or is not finite) are recomputed from the row itself, `||W0_i + s B_i A||` (d_in
/// scratch, O(r d_in) flops per such row; none in ordinary training). Every n_i is then accurate to
/// about (d_in + r) eps of that scale, as a materialised norm would be. Where n_i = 0 (the row of
/// W0 + s B A is zero, e.g. a zero row of W0 at init) the gain m_i / n_i is taken as 0: the branch
/// output of that row is zero too, and no NaN appears; its gradients are zero.
///
/// **Dropout** (p > 0) acts on the adapter branch only: `Z = W0 X + s B A D(X)`. PEFT also feeds the
/// dropped-out input to its `(m/n - 1) W0 X` correction; the two agree whenever p = 0 (always at
/// inference).
///
/// **Backward.** Default (`detach_norm`): `q = rowsum(G ⊙ Z)`, `dm += q / n`, then LoRA's backward
/// with `G' = diag(m/n) G` (so dX = W0^T G' + branch). Exact mode adds, with `c = -(m/n) q / n^2`:
/// `dB += s diag(c) (P + s B K)` and `dA += s (B^T diag(c) W0 + s (B^T diag(c) B) A)`.
///
/// **Performance.** Training forward reads W0 once: one product of W0 with `[X | A^T]` (d_in x (N + r))
/// gives both W0 X and P (twice only where Eigen runs the base product serially and N + r > 96, see
/// below); the norms then cost O(d_out r^2). Backward reads W0 once more (W0^T G'; in
/// exact mode one product of W0^T with `[G' | diag(c) B]`, under the same rule). No d_out x d_in temporary anywhere in
/// forward or backward; the Cache holds Z and two scratch buffers of d x (N + r), reused from call to
/// call.
///
/// **Memory of a training step.** A warm step (the Cache reused) allocates no more than the base step
/// (W0 X + b and W0^T G into fresh outputs) does, at every N and thread count. Where Eigen runs the
/// base product on several threads (N >= 8 and d_out d_in N >= 100000 on two), its packing buffer is
/// shared by the threads and does not grow with the columns, so the step's products with W0 are single
/// Eigen GEMMs of the base product's own size. Where Eigen runs it serially (N = 1, a GEMV that
/// allocates nothing; a few tokens; small layers; one thread), a GEMM over N + r columns could pack
/// more than the base (twice as much at 300 x 300, N = 2 to 7), so those products run through
/// detail::stack_product() (serially, packed on the stack, no heap at all), or, beyond 96 columns, as
/// the base product itself plus stack_product() over the r other columns (see product_with_base()).
/// The small products (A A^T, B K, B^T diag(c) B) always go through stack_product(). The price is at
/// N = 1, where a serial product replaces a parallel one: at d = 4096, r = 16 a step costs 2.1-2.6 x
/// LoRA's (1.84 x with Eigen's parallel GEMM and its 5 MiB buffer, timed alternately). At N = 4
/// (serial base) it costs 1.01-1.03 x LoRA's, at N = 64 1.09 x and at N = 512 1.01-1.07 x, on two
/// threads; on one thread at N = 64, 1.18 x (1.10 x with one GEMM). The const forward(X) allocates
/// its d x (N + r) scratch on every call and uses Eigen's GEMM on all threads: the joint product for
/// small batches (N <= 8 r, where reading W0 twice would cost most), two products otherwise (as fast
/// there, and no N-sized scratch). Merged, forward is exactly the base product.
///
/// **Merge** writes `W <- diag(m / n) (W0 + s B A)` with the norms n of that moment, which are kept;
/// unmerge() computes `W0 = diag(n / m) W - s B A` from them and from the parameters of merge time
/// (so changing parameters while merged is harmless). Both have the strong guarantee (every value is
/// checked before anything is written, no d_out x d_in temporary). One round trip restores W0 to
/// within `eps |W0| + 5 eps |W0 + s B A|` per element (MATH.md's LoRA bound plus 4 eps |V| for the
/// two row scalings and the rounding of m/n and n/m). A row whose magnitude was 0 at merge time (and
/// whose norm was not) keeps nothing of W0: unmerge() refuses it (NumericalError), so do not merge
/// with a zero magnitude unless for good.
///
/// **Threads.** forward(X) is const and re-entrant. Training forward, backward, merge and the
/// parameter views mutate the adapter: one thread at a time.
///
/// A copy shares the user's W (it is a reference) and duplicates the parameters, gradients and the
/// dropout stream. Example: examples/quickstart.cpp shows the LoRA loop; DoRA is used the same way
/// (`peft::DoRA<Eigen::MatrixXf> dora(W, b, dora_cfg)`).
template <class MatrixType_>
class DoRA : public AdapterBase<DoRA<MatrixType_>, MatrixType_> {
  using Base = AdapterBase<DoRA<MatrixType_>, MatrixType_>;
  friend Base;

 public:
  using typename Base::ConstMatrixRef;
  using typename Base::Index;
  using typename Base::Matrix;
  using typename Base::MatrixType;
  using typename Base::Scalar;
  using typename Base::Vector;

  /// \brief What backward needs, filled by forward(X, cache); owned by the caller, reusable (no
  /// allocation once the shapes are stable).
  struct Cache : detail::CacheStamp {
    detail::LowRankCache<Scalar> branch;  ///< LoRA's branch: D(X), the dropout mask, H = A D(X), scratch
    Matrix Z;         ///< W0 X + s B A D(X), d_out x N: the output before the gain
    Vector n;         ///< row norms of W0 + s B A, d_out
    Vector g;         ///< the gain m / n (0 where n = 0), d_out
    Vector inv_n;     ///< 1 / n (0 where n = 0), d_out
    Matrix VAt;       ///< (W0 + s B A) A^T = P + s B K, d_out x r
    Matrix K;         ///< A A^T, r x r
    Matrix wide_in;   ///< scratch, d_in x (N + r): [X | A^T]; exact backward: W0^T [G' | diag(c) B]
    Matrix wide_out;  ///< scratch, d_out x (N + r): W0 [X | A^T] = [W0 X | P]; backward: [G' | diag(c) B]
    Vector q;         ///< backward scratch: rowsum(G ⊙ Z), then c in exact mode, d_out
    Matrix BtCB;      ///< exact backward scratch: B^T diag(c) B, r x r
  };

  static constexpr const char* class_name = "peft::DoRA";

  /// \brief Wraps W (no bias).
  /// \throws ConfigError for an invalid config; ShapeError for an empty W
  explicit DoRA(Eigen::Ref<MatrixType> W, const DoRAConfig& cfg = {}) : DoRA(W, nullptr, 0, false, cfg) {}

  /// \brief Wraps W and its bias b (d_out). The bias is not rescaled by the magnitude.
  /// \throws ConfigError for an invalid config; ShapeError for an empty W or a bias of the wrong size
  DoRA(Eigen::Ref<MatrixType> W, Eigen::Ref<Vector> b, const DoRAConfig& cfg = {})
      : DoRA(W, b.data(), b.size(), true, cfg) {}

  /// \returns the configuration.
  const DoRAConfig& config() const { return cfg_; }
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
  /// \returns lora_magnitude_vector m (d_out), a view into the flat buffer.
  Eigen::Map<Vector> magnitude() { return Eigen::Map<Vector>(this->value(layout_[2]).data(), this->d_out()); }
  Eigen::Map<const Vector> magnitude() const {
    return Eigen::Map<const Vector>(this->value(layout_[2]).data(), this->d_out());
  }

  /// \returns n (d_out), the row norms of W0 + s B A for the current parameters, computed as forward
  /// does (factored, see the class comment). Allocates; reads W0 once. While merged, W0 is first
  /// reconstructed from W as unmerge() would (a d_out x d_in temporary).
  /// \throws NumericalError while merged if W0 cannot be reconstructed (see unmerge())
  Vector norms() const {
    Vector n;
    Matrix K, VAt;
    if (this->is_merged())
      row_norms(base_weight("norms"), K, VAt, n);
    else
      row_norms(this->weight(), K, VAt, n);
    return n;
  }

  /// \returns where lora_A, lora_B and lora_magnitude_vector live in the flat buffers.
  const std::array<ParameterInfo, 3>& parameter_layout() const { return layout_; }

 private:
  DoRA(Eigen::Ref<MatrixType> W, Scalar* b, Index b_size, bool has_bias, const DoRAConfig& cfg)
      : Base(W, b, b_size, has_bias,
             detail::check_lora_config(Base::where("constructor"), cfg).rank * (W.rows() + W.cols()) + W.rows()),
        cfg_(cfg),
        s_(static_cast<Scalar>(detail::lora_scaling(cfg))),
        rng_(cfg.seed),
        layout_{{{"lora_A", cfg.rank, W.cols(), 0},
                 {"lora_B", W.rows(), cfg.rank, cfg.rank * W.cols()},
                 {"lora_magnitude_vector", W.rows(), 1, cfg.rank * (W.cols() + W.rows())}}},
        w2_(W.rowwise().squaredNorm()) {
    detail::init_lora_factors(cfg_, rng_, A(), B());
    magnitude() = norms();  // m = n: the gain starts at exactly 1
  }

  // -----------------------------------------------------------------------------------------------
  // Norms and gains

  /// n (d_out) for the base weight W0 (W, or a reconstruction of it): P = W0 A^T, then factored_norms.
  template <class W0Type>
  void row_norms(const W0Type& W0, Matrix& K, Matrix& VAt, Vector& n) const {
    Matrix P(this->d_out(), rank());
    P.noalias() = W0 * A().transpose();
    factored_norms(W0, P, K, VAt, n);
  }

  /// n_i = ||W0_i + s B_i A|| from P = W0 A^T (MATH.md, DoRA): fills K = A A^T and VAt = P + s B K, and
  /// n_i^2 = ||W0_i||^2 + s <B_i, P_i + VAt_i> (= ||W0_i||^2 + 2 s <P_i, B_i> + s^2 B_i K B_i^T).
  /// Rows where that loses its accuracy to cancellation are recomputed from the row (class comment).
  template <class W0Type, class PType>
  void factored_norms(const W0Type& W0, const Eigen::MatrixBase<PType>& P, Matrix& K, Matrix& VAt, Vector& n) const {
    const auto A = this->A();
    const auto B = this->B();
    const Index r = rank();
    // The two small products run serially on the stack (stack_product): a parallel GEMM would only add
    // heap packing buffers (d_out r elements for B K) to products of O(d_out r^2) flops.
    K.resize(r, r);
    detail::stack_product(K, A, A.transpose(), Scalar(1), false);
    VAt = P;
    detail::stack_product(VAt, B, K, s_, true);
    n.resize(this->d_out());
    n.noalias() = B.cwiseProduct(P + VAt).rowwise().sum();
    // ||A_j,:||, as an expression (r square roots per row, no allocation in a training step)
    const auto a = K.diagonal().cwiseMax(Scalar(0)).cwiseSqrt();
    const Scalar abs_s = std::abs(s_);
    const Scalar largest = std::numeric_limits<Scalar>::max();
    for (Index i = 0; i < n.size(); ++i) {
      const Scalar n2 = w2_(i) + s_ * n(i);
      // The scale of the terms: ||W0_i|| + |s| sum_j |B_ij| ||A_j|| bounds both ||W0_i|| and ||s B_i A||.
      const Scalar scale = std::sqrt(w2_(i)) + abs_s * B.row(i).cwiseAbs().dot(a.transpose());
      if (n2 > scale * scale / Scalar(16) && n2 <= largest)
        n(i) = std::sqrt(n2);
      else  // cancellation (n2 may even be negative), or overflow: the row itself
        n(i) = row_norm(W0, i);
    }
  }

  /// ||W0_i + s B_i A||, the row formed in chunks of at most 256 entries on the stack (no allocation),
  /// each chunk's norm taken with stableNorm() and combined with hypot (no overflow or underflow).
  template <class W0Type>
  Scalar row_norm(const W0Type& W0, Index i) const {
    constexpr int chunk_max = 256;
    const auto A = this->A();
    const auto B = this->B();
    Eigen::Matrix<Scalar, 1, Eigen::Dynamic, Eigen::RowMajor, 1, chunk_max> chunk;
    Scalar norm(0);
    for (Index k0 = 0; k0 < A.cols(); k0 += chunk_max) {
      const Index kb = std::min<Index>(chunk_max, A.cols() - k0);
      chunk.resize(kb);
      chunk.noalias() = s_ * B.row(i) * A.middleCols(k0, kb);
      chunk += W0.row(i).segment(k0, kb);
      norm = std::hypot(norm, chunk.stableNorm());
    }
    return norm;
  }

  /// g = m / n and 1 / n, both 0 where n = 0 (a zero row of W0 + s B A; NaN still propagates).
  template <class MType>
  static void gains(const Eigen::MatrixBase<MType>& m, const Vector& n, Vector& g, Vector& inv_n) {
    g.resize(n.size());
    inv_n.resize(n.size());
    for (Index i = 0; i < n.size(); ++i) {
      inv_n(i) = n(i) == Scalar(0) ? Scalar(0) : Scalar(1) / n(i);
      g(i) = n(i) == Scalar(0) ? Scalar(0) : m(i) / n(i);
    }
  }

  // -----------------------------------------------------------------------------------------------
  // Forward and backward

  /// Inference: whether one product over [X | A^T] (W0 read once) beats W0 X and W0 A^T apart (W0 read
  /// twice, but no d x (N + r) scratch). Measured at d = 4096, r = 16 (one thread): the joint product
  /// is 10-30 % faster up to N = 8 r, and level beyond.
  bool joint_product_pays(Index tokens) const { return tokens <= 8 * rank(); }

  /// The widest product with W0 that a serial training step runs in one piece through stack_product().
  /// Measured against Eigen's serial GEMM of the same product (d = 512 to 4096, one thread, float):
  /// stack_product() takes 0.6-0.75 x its time at 17 to 24 columns and 0.85-1.2 x at 48 to 96, about
  /// as much as the split below (1.1-1.4 x); beyond 96 columns the split is faster with a row-major W0.
  static constexpr Index stack_product_max_cols = 96;

  /// out = lhs in, where lhs is W0 or W0^T and `in` holds N tokens, then r more columns (A^T, or
  /// diag(c) B), so that a training step takes no more from the heap than the base product lhs X does:
  /// - where Eigen runs that base product on several threads (N >= 8 at d = 4096, two threads), its
  ///   packing buffer is shared by the threads and sized by rows and depth, not N: one GEMM over all
  ///   N + r columns takes the same (W0 read once);
  /// - where it runs serially (N = 1, a GEMV; small N or small layers; one thread), a wider serial GEMM
  ///   would pack more than the base, so the product goes through stack_product() (no heap, W0 read
  ///   once) while it has at most stack_product_max_cols columns, else as the base product itself over
  ///   the N tokens plus stack_product() over the r other columns (W0 read twice).
  template <class LhsType>
  static void product_with_base(Matrix& out, const LhsType& lhs, const Matrix& in, Index tokens) {
    const Index extra = in.cols() - tokens;
    if (detail::eigen_gemm_runs_parallel(lhs.rows(), tokens, lhs.cols())) {
      gemm(out, lhs, in);
    } else if (in.cols() <= stack_product_max_cols) {
      gemm_on_stack(out, lhs, in);
    } else {
      gemm(out.leftCols(tokens), lhs, in.leftCols(tokens));
      gemm_on_stack(out.rightCols(extra), lhs, in.rightCols(extra));
    }
  }

  /// dst = lhs rhs through Eigen's GEMM, and through stack_product(). Blocks and matrices are passed
  /// as Refs, so that each lhs type instantiates one of each: they are the templates that cost most
  /// to compile.
  template <class LhsType>
  static void gemm(Eigen::Ref<Matrix> dst, const LhsType& lhs, Eigen::Ref<const Matrix> rhs) {
    dst.noalias() = lhs * rhs;
  }
  template <class LhsType>
  static void gemm_on_stack(Eigen::Ref<Matrix> dst, const LhsType& lhs, Eigen::Ref<const Matrix> rhs) {
    detail::stack_product(dst, lhs, rhs, Scalar(1), false);
  }

  /// out = W0 [X | A^T] = [W0 X | P], in one product (W0 read once). A training step goes through
  /// product_with_base(); the const forward(X), which allocates its scratch on every call anyway, through
  /// Eigen's GEMM on all its threads.
  void joint_base_product(const ConstMatrixRef& X, Matrix& in, Matrix& out, bool training) const {
    const Index N = X.cols();
    in.resize(this->d_in(), N + rank());
    in.leftCols(N) = X;
    in.rightCols(rank()) = A().transpose();
    out.resize(this->d_out(), N + rank());
    if (training)
      product_with_base(out, this->weight(), in, N);
    else
      gemm(out, this->weight(), in);
  }

  /// Y <- diag(g) Z + b 1^T, one pass (Z may be Y itself).
  void apply_gain(const Vector& g, const Matrix& Z, Matrix& Y) const {
    if (this->has_bias()) {
      const auto b = this->bias();
      for (Index t = 0; t < Y.cols(); ++t) Y.col(t) = g.cwiseProduct(Z.col(t)) + b;
    } else {
      for (Index t = 0; t < Y.cols(); ++t) Y.col(t) = g.cwiseProduct(Z.col(t));
    }
  }

  void forward_impl(const ConstMatrixRef& X, Matrix& Y) const {
    if (this->is_merged()) {  // W holds diag(g) (W0 + s B A): exactly the base product
      Y.noalias() = this->weight() * X;
      if (this->has_bias()) Y.colwise() += this->bias();
      return;
    }
    const Index N = X.cols();
    Matrix K, VAt;
    Vector n, g, inv_n;
    if (joint_product_pays(N)) {
      Matrix in, out;
      joint_base_product(X, in, out, false);
      Y = out.leftCols(N);
      factored_norms(this->weight(), out.rightCols(rank()), K, VAt, n);
    } else {
      Y.noalias() = this->weight() * X;
      row_norms(this->weight(), K, VAt, n);
    }
    gains(magnitude(), n, g, inv_n);
    detail::low_rank_forward(A(), B(), s_, X, Y);
    apply_gain(g, Y, Y);
  }

  void forward_train_impl(const ConstMatrixRef& X, Matrix& Y, Cache& cache) {
    const Index N = X.cols();
    joint_base_product(X, cache.wide_in, cache.wide_out, true);
    factored_norms(this->weight(), cache.wide_out.rightCols(rank()), cache.K, cache.VAt, cache.n);
    gains(magnitude(), cache.n, cache.g, cache.inv_n);
    cache.Z = cache.wide_out.leftCols(N);
    detail::low_rank_forward_train(A(), B(), s_, cfg_.dropout, rng_, X, cache.branch, cache.Z);
    apply_gain(cache.g, cache.Z, Y);
  }

  void backward_impl(const ConstMatrixRef& dY, Cache& cache, Matrix& dX) {
    const Index N = cache.tokens, r = rank();
    auto dA = this->grad(layout_[0]);
    auto dB = this->grad(layout_[1]);
    auto dm = this->grad(layout_[2]);
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

    if (cfg_.detach_norm) {
      dX.noalias() = this->weight().transpose() * Gp;
    } else {
      // Through the norms: dL/dV = diag(c) V with c = -g q / n^2, V = W0 + s B A.
      Vector& c = cache.q;
      c.array() = -cache.g.array() * cache.q.array() * cache.inv_n.array() * cache.inv_n.array();
      auto CB = cache.wide_out.rightCols(r);
      CB.array() = B.array().colwise() * c.array();
      // One GEMM of W0^T over [G' | diag(c) B]: dX's base part and (B^T diag(c) W0)^T.
      cache.wide_in.resize(this->d_in(), N + r);
      product_with_base(cache.wide_in, this->weight().transpose(), cache.wide_out, N);
      dX = cache.wide_in.leftCols(N);
      dA += s_ * cache.wide_in.rightCols(r).transpose();                // s B^T diag(c) W0
      cache.BtCB.resize(r, r);
      detail::stack_product(cache.BtCB, B.transpose(), CB, Scalar(1), false);  // B^T diag(c) B
      detail::stack_product(dA, cache.BtCB, A, Scalar(s_ * s_), true);          // s^2 (B^T diag(c) B) A
      dB.array() += s_ * (cache.VAt.array().colwise() * c.array());  // s diag(c) (P + s B K)
    }
    detail::low_rank_backward(A, B, s_, Gp, cache.branch, dA, dB, dX);
  }

  void check_cache_impl(const Cache& cache) const {
    const auto where = this->where("backward");
    detail::check_low_rank_cache(where, cache.branch, rank(), cache.d_in, cache.tokens);
    const Index d_out = this->d_out();
    if (cache.Z.rows() != d_out || cache.Z.cols() != cache.tokens || cache.g.size() != d_out ||
        cache.inv_n.size() != d_out || cache.VAt.rows() != d_out || cache.VAt.cols() != rank())
      detail::raise<StateError>(where, "the cache does not fit this adapter (d_out ", d_out, ", rank ", rank(), ", N ",
                                cache.tokens, "); fill it with this adapter's forward(X, cache)");
  }

  // -----------------------------------------------------------------------------------------------
  // Merge

  void merge_impl() {
    Vector n, g, inv_n;
    Matrix K, VAt;
    row_norms(this->weight(), K, VAt, n);
    gains(magnitude(), n, g, inv_n);
    detail::scale_rows_add_low_rank_checked<false>(this->where("merge"), this->weight_mut(), g, s_, B(), A());
    merge_norms_.swap(n);  // no allocation after W is written
  }

  void unmerge_impl() {
    const Vector rho = unmerge_scales(this->where("unmerge"));
    detail::scale_rows_add_low_rank_checked<true>(this->where("unmerge"), this->weight_mut(), rho, Scalar(-s_),
                                                   this->merged_value(layout_[1]), this->merged_value(layout_[0]));
    merge_norms_.resize(0);
  }

  /// n / m of merge time, the row scaling of unmerge (0 where n was 0: that merged row is 0 and
  /// W0_i = -s B_i A). \throws NumericalError where m_i was 0 but n_i was not
  Vector unmerge_scales(const detail::Where& where) const {
    const auto m = this->merged_value(layout_[2]);
    Vector rho(this->d_out());
    for (Index i = 0; i < rho.size(); ++i) {
      if (merge_norms_(i) == Scalar(0)) {
        rho(i) = Scalar(0);
      } else if (m(i) == Scalar(0)) {
        detail::raise<NumericalError>(where, "lora_magnitude_vector(", i, ") was 0 at merge(), so row ", i,
                                      " of W holds nothing of W0 and cannot be restored; W is left untouched");
      } else {
        rho(i) = merge_norms_(i) / m(i);
      }
    }
    return rho;
  }

  /// W0: W itself while unmerged; while merged, diag(n / m) W - s B A with the merge-time values.
  MatrixType base_weight(const char* op) const {
    MatrixType W0 = this->weight();
    if (!this->is_merged()) return W0;
    const Vector rho = unmerge_scales(this->where(op));
    W0.array().colwise() *= rho.array();
    W0.noalias() -= s_ * this->merged_value(layout_[1]) * this->merged_value(layout_[0]);
    return W0;
  }

  MatrixType delta_weight_impl() const {
    const MatrixType W0 = base_weight("delta_weight");
    Vector n, g, inv_n;
    Matrix K, VAt;
    row_norms(W0, K, VAt, n);
    gains(magnitude(), n, g, inv_n);
    MatrixType dW = W0;
    dW.noalias() += s_ * B() * A();
    dW.array().colwise() *= g.array();
    dW -= W0;
    return dW;
  }

  DoRAConfig cfg_;
  Scalar s_;
  Rng rng_;
  std::array<ParameterInfo, 3> layout_;
  Vector w2_;           // ||W0_i,:||^2, d_out: W0 is frozen (and restored by unmerge)
  Vector merge_norms_;  // n at merge(), while merged
};

}  // namespace peft
