#pragma once
/// \file gguf_export.hpp
/// \brief A PEFT adapter directory exported as a llama.cpp GGUF LoRA adapter (what `peft-export-gguf`
/// runs), so that llama.cpp applies it exactly as PEFT would. Needs nlohmann-json (CMake target
/// `peft::io`).
///
/// What llama.cpp does with a LoRA adapter file (src/llama-adapter.cpp, llama-graph.cpp): for each
/// model weight W named N (ne = [d_in, d_out]) with tensors `N.lora_a` (ne = [d_in, r]) and `N.lora_b`
/// (ne = [r, d_out]) it computes y = W x + σ · (b (a x)), with the float σ = u · α / r, u the user's
/// scale (1 by default, `--lora`; `--lora-scaled` and the server set it), α the file's one
/// `adapter.lora.alpha` and r = ne[0] of lora_b (σ = u when α is 0).
///
/// PEFT's scale is per module: s = α_m / r_m, or α_m / √r_m with rsLoRA, with α_m and r_m from
/// `alpha_pattern` and `rank_pattern`; PyTorch applies it as the float fl(s). One file-wide α cannot give
/// every module its own s, so the exporter chooses, for every module, a stored rank r' ≥ r (the factors
/// padded with zero rows of a and zero columns of b, which add exact zeros) and a power of two c folded
/// into b (exact: it moves the exponent only), such that fl(fl(α / r') · c) = fl(s) bit for bit, with
/// the one α that makes this possible for the most modules at the least padding (at most 2r, none with
/// `rank_padding = false`). A module no such choice fits (rsLoRA with rank_pattern: the ratio of two
/// scales is then irrational) is folded inexactly: b · (fl(s) / fl(α / r)), one rounding of each element
/// of b; the report says which modules those are. At u = 1 every exact module's update is then the very
/// float product PEFT computes; at another u it is u · s to float rounding, as llama.cpp rounds u α / r.
///
/// Other conversions:
/// - names: `model.layers.N.self_attn.{q,k,v,o}_proj` → `blk.N.attn_{q,k,v,output}.weight`,
///   `model.layers.N.mlp.{gate,up,down}_proj` → `blk.N.ffn_{gate,up,down}.weight`, `lm_head` →
///   `output.weight`; the architectures LlamaForCausalLM and MistralForCausalLM (llama.cpp's "llama") and
///   Qwen2ForCausalLM ("qwen2");
/// - rotary layout: llama.cpp's converter reorders the rows of Llama's and Mistral's q_proj (per head of
///   num_attention_heads) and k_proj (per head of num_key_value_heads) from Hugging Face's half-split
///   rotary layout to interleaved pairs; lora_b's rows are reordered the same way (Qwen2 keeps
///   Hugging Face's layout: llama.cpp runs its rotary embedding in that layout, "NEOX");
/// - DoRA is not a low-rank update of W0: refused by default; with `dora = "svd"` its full change
///   ΔW = diag(m / ‖W0 + s B A‖) (W0 + s B A) − W0 is replaced by a rank-K approximation U S Vᵀ
///   (lora_b = U S, lora_a = Vᵀ, scale 1), computed in double from the base weight streamed in blocks of
///   rows: by Eigen's BDCSVD of ΔW held for one layer at a time (the best rank-K approximation), or,
///   without any d_out x d_in temporary, by a randomized subspace iteration on the operator x ↦ ΔW x.
///   Each layer's relative error ‖ΔW − U S Vᵀ‖_F / ‖ΔW‖_F is measured (block by block) and reported.
///
/// Refused, with the reason: other architectures, modules other than the seven projections and
/// lm_head (lm_head too when the model ties it to the embeddings: llama.cpp then has no output.weight),
/// shapes that do not fit the config, SSF adapters, modules_to_save, fan_in_fan_out. Everything is
/// checked before the file is written; the file goes to a temporary renamed into place when complete.

#include "peft/core/config.hpp"  // first: the detail headers check for it
#include "peft/core/error.hpp"
#include "peft/core/random.hpp"
#include "peft/core/types.hpp"
#include "peft/detail/kernels.hpp"
#include "peft/io/gguf.hpp"
#include "peft/io/peft_adapter.hpp"
#include "peft/io/safetensors.hpp"
#include "peft/linalg/svd.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <limits>
#include <map>
#include <memory>
#include <ostream>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace peft {
namespace io {

/// \brief What the exporter needs of a Hugging Face `config.json` of the Llama family.
struct LlamaFamilyConfig {
  std::string hf_architecture;    ///< "LlamaForCausalLM", "MistralForCausalLM" or "Qwen2ForCausalLM"
  std::string gguf_architecture;  ///< llama.cpp's name: "llama" or "qwen2"
  bool rotary_permutation = true; ///< whether llama.cpp's converter reorders q_proj and k_proj rows
  Index hidden_size = 0, intermediate_size = 0, num_hidden_layers = 0, vocab_size = 0;
  Index num_attention_heads = 0, num_key_value_heads = 0, head_dim = 0;
  bool tie_word_embeddings = false;
};

/// \brief Parses a Hugging Face `config.json`. \param label the file's name, for messages.
/// \throws FormatError for malformed JSON or a missing or invalid field, ConfigError for an architecture
/// other than LlamaForCausalLM, MistralForCausalLM or Qwen2ForCausalLM.
inline LlamaFamilyConfig parse_model_config(const std::string& text, const std::string& label) {
  const auto fail = [&](const std::string& what) { throw FormatError("peft::io: " + label + ": " + what); };
  detail::Json j = detail::parse_json_object(text, label);
  LlamaFamilyConfig c;
  const auto arch = j.find("architectures");
  if (arch == j.end() || !arch->is_array() || arch->empty() || !(*arch)[0].is_string())
    fail("no \"architectures\" list naming the model class");
  c.hf_architecture = (*arch)[0].get<std::string>();
  if (c.hf_architecture == "LlamaForCausalLM" || c.hf_architecture == "MistralForCausalLM") {
    c.gguf_architecture = "llama";
    c.rotary_permutation = true;
  } else if (c.hf_architecture == "Qwen2ForCausalLM") {
    c.gguf_architecture = "qwen2";
    c.rotary_permutation = false;
  } else {
    throw ConfigError("peft::io: " + label + ": the architecture is " + c.hf_architecture +
                      "; the GGUF exporter handles LlamaForCausalLM, MistralForCausalLM and Qwen2ForCausalLM");
  }
  const auto positive = [&](const char* field, bool required, Index fallback) -> Index {
    const auto it = j.find(field);
    if (it == j.end() || it->is_null()) {
      if (required) fail(std::string("no \"") + field + "\"");
      return fallback;
    }
    const Index v = detail::rank_value(*it);  // a positive integer of at most 2^30, else 0
    if (v <= 0) fail(std::string("\"") + field + "\" is " + it->dump() + ", not a positive integer");
    return v;
  };
  c.hidden_size = positive("hidden_size", true, 0);
  c.intermediate_size = positive("intermediate_size", true, 0);
  c.num_hidden_layers = positive("num_hidden_layers", true, 0);
  c.vocab_size = positive("vocab_size", true, 0);
  c.num_attention_heads = positive("num_attention_heads", true, 0);
  c.num_key_value_heads = positive("num_key_value_heads", false, c.num_attention_heads);
  if (c.num_attention_heads % c.num_key_value_heads != 0)
    fail("num_attention_heads (" + std::to_string(c.num_attention_heads) + ") is not a multiple of num_key_value_heads (" +
         std::to_string(c.num_key_value_heads) + ")");
  if (!j.contains("head_dim") || j["head_dim"].is_null()) {
    if (c.hidden_size % c.num_attention_heads != 0)
      fail("hidden_size is not a multiple of num_attention_heads, and there is no head_dim");
    c.head_dim = c.hidden_size / c.num_attention_heads;
  } else {
    c.head_dim = positive("head_dim", true, 0);
  }
  if (c.rotary_permutation && c.head_dim % 2 != 0) fail("head_dim " + std::to_string(c.head_dim) + " is odd");
  const auto tie = j.find("tie_word_embeddings");
  if (tie != j.end() && !tie->is_null()) {
    if (!tie->is_boolean()) fail("\"tie_word_embeddings\" is not a boolean");
    c.tie_word_embeddings = tie->get<bool>();
  }
  return c;
}

/// \brief Where one adapted module goes in llama.cpp's model.
struct GgufTarget {
  std::string name;         ///< the model tensor, e.g. "blk.0.attn_q.weight"
  Index layer = -1;         ///< the block, -1 for output.weight
  int order = 0;            ///< its place within the block (q, k, v, output, gate, up, down)
  Index d_out = 0, d_in = 0;
  Index rotary_heads = 0;   ///< heads whose rows llama.cpp's converter reorders (0: none)
};

/// \brief The llama.cpp tensor of the module at `path` (e.g. "model.layers.3.self_attn.q_proj"), with the
/// shape the config gives it. \throws ConfigError for a module llama.cpp's LoRA cannot reach.
inline GgufTarget gguf_target(const std::string& path, const LlamaFamilyConfig& c) {
  GgufTarget t;
  const Index q_rows = c.num_attention_heads * c.head_dim, kv_rows = c.num_key_value_heads * c.head_dim;
  if (path == "lm_head") {
    if (c.tie_word_embeddings)
      throw ConfigError("peft::io: module \"lm_head\" is adapted, but the model ties it to the embeddings "
                        "(tie_word_embeddings), so llama.cpp has no output.weight to apply it to");
    t.name = "output.weight";
    t.d_out = c.vocab_size;
    t.d_in = c.hidden_size;
    t.order = 0;
    return t;
  }
  // model.layers.<N>.<module>, N in decimal without leading zeros, at most 9 digits.
  static const std::string prefix = "model.layers.";
  const std::size_t digits_end = path.find('.', prefix.size());
  const std::string digits =
      path.compare(0, prefix.size(), prefix) == 0 && digits_end != std::string::npos
          ? path.substr(prefix.size(), digits_end - prefix.size())
          : std::string();
  const std::string module = digits.empty() ? std::string() : path.substr(digits_end + 1);
  static const char* const modules[] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                        "mlp.gate_proj",    "mlp.up_proj",      "mlp.down_proj"};
  const auto known = std::find(std::begin(modules), std::end(modules), module);
  const bool number = !digits.empty() && digits.size() <= 9 && (digits == "0" || digits[0] != '0') &&
                      digits.find_first_not_of("0123456789") == std::string::npos;
  if (!number || known == std::end(modules))
    throw ConfigError("peft::io: module \"" + path +
                      "\" has no llama.cpp LoRA counterpart; exported are model.layers.N.self_attn.{q,k,v,o}_proj, "
                      "model.layers.N.mlp.{gate,up,down}_proj and lm_head");
  t.layer = Index(std::stol(digits));
  if (t.layer >= c.num_hidden_layers)
    throw ConfigError("peft::io: module \"" + path + "\" is in layer " + std::to_string(t.layer) + ", but the model has " +
                      std::to_string(c.num_hidden_layers) + " (num_hidden_layers)");
  const std::string block = "blk." + std::to_string(t.layer) + ".";
  switch (known - std::begin(modules)) {
    case 0: t = {block + "attn_q.weight", t.layer, 0, q_rows, c.hidden_size, c.rotary_permutation ? c.num_attention_heads : 0}; break;
    case 1: t = {block + "attn_k.weight", t.layer, 1, kv_rows, c.hidden_size, c.rotary_permutation ? c.num_key_value_heads : 0}; break;
    case 2: t = {block + "attn_v.weight", t.layer, 2, kv_rows, c.hidden_size, 0}; break;
    case 3: t = {block + "attn_output.weight", t.layer, 3, c.hidden_size, q_rows, 0}; break;
    case 4: t = {block + "ffn_gate.weight", t.layer, 4, c.intermediate_size, c.hidden_size, 0}; break;
    case 5: t = {block + "ffn_up.weight", t.layer, 5, c.intermediate_size, c.hidden_size, 0}; break;
    default: t = {block + "ffn_down.weight", t.layer, 6, c.hidden_size, c.intermediate_size, 0}; break;
  }
  return t;
}

/// \returns the Hugging Face row that llama.cpp's converter puts at row `row` of a q_proj or k_proj
/// weight of `heads` heads and `rows` rows: within each head of size h = rows / heads, the halves
/// [0, h/2) and [h/2, h) are interleaved, row 2i + j taking row j h/2 + i.
inline Index rotary_source_row(Index row, Index rows, Index heads) {
  const Index h = rows / heads;
  const Index head = row / h, n = row % h;
  return head * h + (n % 2) * (h / 2) + n / 2;
}

/// \brief Reorders the rows of M (a q_proj or k_proj weight, or its lora_b) as llama.cpp's converter
/// reorders the weight's. \throws ShapeError unless the rows split into `heads` heads of even size.
template <class Derived>
void permute_rotary_rows(Eigen::MatrixBase<Derived>& M, Index heads) {
  const Index rows = M.rows();
  if (heads <= 0 || rows % heads != 0 || (rows / heads) % 2 != 0)
    throw ShapeError("peft::io: " + std::to_string(rows) + " rows do not split into " + std::to_string(heads) +
                     " rotary heads of even size");
  const MatrixX<typename Derived::Scalar> source = M;
  for (Index r = 0; r < rows; ++r) M.row(r) = source.row(rotary_source_row(r, rows, heads));
}

/// \returns llama.cpp's scale of a LoRA tensor pair, in its float arithmetic: u α / r, or u when α is 0.
inline float llama_cpp_scale(float alpha, Index stored_rank, float user_scale = 1.0f) {
  return alpha != 0.0f ? user_scale * alpha / float(stored_rank) : user_scale;
}

/// \brief What one module needs of the scale encoding.
struct ScaleNeed {
  float scale = 1;   ///< fl(s), the float PEFT multiplies by
  Index rank = 1;    ///< the factors' rank
  Index width = 0;   ///< d_in + d_out: the parameters one more stored rank costs
};

/// \brief How one module is encoded: its stored rank and the factor folded into lora_b.
struct ScaleChoice {
  Index stored_rank = 1;  ///< r' >= rank: lora_a gets r' - rank zero rows, lora_b zero columns
  double fold = 1;        ///< multiplies lora_b: a power of two (or 0) when exact
  bool exact = true;      ///< whether fl(fl(α / r') · fold) == fl(s) with fold moving the exponent only
};

/// \brief The file's α and every module's encoding.
struct ScalePlan {
  float alpha = 0;
  std::vector<ScaleChoice> modules;
  std::size_t inexact = 0;          ///< modules folded with a rounding
  std::uint64_t padded_parameters = 0;  ///< the zeros the padding adds
};

namespace gguf_detail {

/// The exact encoding of `scale` under α at stored rank r', if any: fold = scale / fl(α / r') when that
/// is ± a power of two (0 for a zero scale).
inline bool exact_fold(float alpha, Index stored, float scale, double& fold) {
  const float q = llama_cpp_scale(alpha, stored);
  if (scale == 0.0f) {
    fold = 0;
    return true;
  }
  if (!(q != 0.0f) || !std::isfinite(q) || !std::isnormal(scale) || !std::isnormal(q)) return false;
  int eq = 0, es = 0;
  std::frexp(q, &eq);
  std::frexp(scale, &es);
  fold = std::ldexp(1.0, es - eq) * ((scale < 0) != (q < 0) ? -1.0 : 1.0);
  // Exact when the product is the scale bit for bit: then q and the scale share their significand, and
  // fold, a power of two, moves the exponent only (as it does to lora_b's elements).
  return float(double(q) * fold) == scale;
}

/// The smallest stored rank r' in [lo, hi] whose llama.cpp scale fl(α / r'), times a power of two `fold`,
/// is `scale` exactly; 0 if there is none. Such an r' is within one of α 2^k / scale for some k: only
/// the k that put that in [lo, hi] (at most three) are tried, so the cost does not grow with the rank.
inline Index smallest_exact_rank(float alpha, float scale, Index lo, Index hi, double& fold) {
  if (scale == 0.0f) return exact_fold(alpha, lo, scale, fold) ? lo : 0;
  if (alpha == 0.0f || !std::isfinite(alpha) || !std::isfinite(scale)) return 0;
  const double ratio = std::fabs(double(alpha) / double(scale));  // r' ≈ ratio · 2^k
  std::vector<Index> tried;
  const int k_lo = int(std::floor(std::log2(double(lo) / ratio))) - 1;
  const int k_hi = int(std::ceil(std::log2(double(hi) / ratio))) + 1;
  for (int k = k_lo; k <= k_hi; ++k) {
    const double centre = std::round(std::ldexp(ratio, k));
    for (double r = centre - 1; r <= centre + 1; ++r)
      if (r >= double(lo) && r <= double(hi)) tried.push_back(Index(r));
  }
  std::sort(tried.begin(), tried.end());
  for (Index r : tried)
    if (exact_fold(alpha, r, scale, fold)) return r;
  return 0;
}

}  // namespace gguf_detail

/// \brief Chooses the file's α and each module's stored rank and fold (see the file comment): the most
/// modules exact, then the fewest padded parameters, then the α of the largest group unpadded.
inline ScalePlan plan_scales(const std::vector<ScaleNeed>& needs, bool rank_padding) {
  struct Group {
    float scale;
    Index rank;
    std::uint64_t width = 0, count = 0;
  };
  std::vector<Group> groups;
  for (const auto& n : needs) {
    auto it = std::find_if(groups.begin(), groups.end(),
                           [&](const Group& g) { return g.scale == n.scale && g.rank == n.rank; });
    if (it == groups.end()) {
      groups.push_back({n.scale, n.rank});
      it = groups.end() - 1;
    }
    it->width += std::uint64_t(n.width);
    it->count += 1;
  }
  std::stable_sort(groups.begin(), groups.end(), [](const Group& a, const Group& b) { return a.count > b.count; });
  const auto max_rank = [&](const Group& g) { return rank_padding ? 2 * g.rank : g.rank; };

  // Candidate α: fl(scale · r') and its neighbours, for every group and stored rank it may take.
  std::vector<float> candidates;
  for (const Group& g : groups) {
    if (g.scale == 0.0f) continue;
    for (Index r = g.rank; r <= max_rank(g); ++r) {
      float a = float(double(g.scale) * double(r));
      if (!std::isfinite(a)) continue;
      a = std::nextafter(std::nextafter(a, -INFINITY), -INFINITY);
      for (int k = 0; k < 5; ++k, a = std::nextafter(a, INFINITY))
        if (a != 0.0f && std::isfinite(a)) candidates.push_back(a);
    }
  }
  if (candidates.empty()) candidates.push_back(1.0f);  // every scale is 0

  struct Score {
    std::uint64_t inexact = ~std::uint64_t(0), padding = ~std::uint64_t(0);
  };
  Score best;
  float best_alpha = candidates.front();
  for (float a : candidates) {
    Score s{0, 0};
    for (const Group& g : groups) {
      double fold;
      const Index r = gguf_detail::smallest_exact_rank(a, g.scale, g.rank, max_rank(g), fold);
      if (r > 0)
        s.padding += std::uint64_t(r - g.rank) * g.width;
      else
        s.inexact += g.count;
    }
    if (s.inexact < best.inexact || (s.inexact == best.inexact && s.padding < best.padding)) {
      best = s;
      best_alpha = a;
    }
  }

  ScalePlan plan;
  plan.alpha = best_alpha;
  for (const auto& n : needs) {
    ScaleChoice c;
    double fold = 1;
    const Index r = gguf_detail::smallest_exact_rank(best_alpha, n.scale, n.rank, rank_padding ? 2 * n.rank : n.rank, fold);
    c.exact = r > 0;
    if (c.exact) {
      c.stored_rank = r;
      c.fold = fold;
    } else {
      c.stored_rank = n.rank;
      c.fold = double(n.scale) / double(llama_cpp_scale(best_alpha, n.rank));
      ++plan.inexact;
    }
    plan.padded_parameters += std::uint64_t(c.stored_rank - n.rank) * std::uint64_t(n.width);
    plan.modules.push_back(c);
  }
  return plan;
}

/// \brief A rank-K approximation of a DoRA module's change, and how good it is.
struct DoraLowRank {
  MatrixX<double> US;      ///< d_out x K: U diag(S), lora_b
  MatrixX<double> Vt;      ///< K x d_in: Vᵀ, lora_a
  double relative_error = 0;  ///< ‖ΔW − US Vt‖_F / ‖ΔW‖_F
  double norm = 0;            ///< ‖ΔW‖_F
  bool exact_svd = true;      ///< BDCSVD of ΔW (the best rank K), else randomized
};

/// \brief How dora_low_rank() computes the SVD.
enum class SvdMethod { Auto, Exact, Randomized };

namespace gguf_detail {

using RowMajorXd = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// DoRA's change ΔW = diag(g) (W0 + s B A) − W0, g = m / ‖W0 + s B A‖ per row, as an operator over the
/// base weight read in blocks of rows (never a d_out x d_in temporary). The products run through
/// peft's GEMM kernel (compiled once with peft::compiled).
class DoraDelta {
 public:
  static constexpr Index block = 256;

  DoraDelta(const SafetensorsView& base, const TensorInfo& weight, const PeftModule<double>& m, double s)
      : base_(base), w_(weight), A_(m.A), B_(m.B), s_(s), g_(m.B.rows()) {
    for (Index i0 = 0; i0 < rows(); i0 += block) {
      const Index n = std::min(block, rows() - i0);
      base_.read_rows<double>(w_, i0, n, W0_);
      V_ = W0_;
      peft::detail::product(V_, B_.middleRows(i0, n), A_, s_, true);  // V = W0 + s B A
      for (Index i = 0; i < n; ++i) {
        const double norm = V_.row(i).norm();
        if (!(norm > 0.0) || !std::isfinite(norm))
          throw NumericalError("peft::io: DoRA module \"" + m.path + "\": output unit " + std::to_string(i0 + i) +
                               " has a zero or non-finite norm ‖W0 + sBA‖");
        g_(i0 + i) = m.magnitude(i0 + i) / norm;
      }
    }
  }

  Index rows() const { return B_.rows(); }
  Index cols() const { return A_.cols(); }

  /// The rows [i0, i0 + n) of ΔW, into D: (g − 1) W0 + s g B A, row by row.
  void block_of(Index i0, Index n, RowMajorXd& D) {
    base_.read_rows<double>(w_, i0, n, D);
    BA_.resize(n, cols());
    peft::detail::product(BA_, B_.middleRows(i0, n), A_, s_, false);
    for (Index i = 0; i < n; ++i) D.row(i) = (g_(i0 + i) - 1.0) * D.row(i) + g_(i0 + i) * BA_.row(i);
  }
  /// Y = ΔW X = (g − 1) ⊙ (W0 X) + s g ⊙ (B (A X)).
  void apply(const MatrixX<double>& X, MatrixX<double>& Y) {
    Y.resize(rows(), X.cols());
    AX_.resize(A_.rows(), X.cols());
    peft::detail::product(AX_, A_, X, 1.0, false);
    for (Index i0 = 0; i0 < rows(); i0 += block) {
      const Index n = std::min(block, rows() - i0);
      base_.read_rows<double>(w_, i0, n, W0_);
      auto Yb = Y.middleRows(i0, n);
      peft::detail::product(Yb, W0_, X, 1.0, false);
      Yb = (g_.segment(i0, n).array() - 1.0).matrix().asDiagonal() * Yb;
      BAX_.resize(n, X.cols());
      peft::detail::product(BAX_, B_.middleRows(i0, n), AX_, s_, false);
      Yb += g_.segment(i0, n).asDiagonal() * BAX_;
    }
  }
  /// Z = ΔWᵀ Y = W0ᵀ ((g − 1) ⊙ Y) + s Aᵀ (Bᵀ (g ⊙ Y)).
  void apply_transposed(const MatrixX<double>& Y, MatrixX<double>& Z) {
    const MatrixX<double> gY = g_.asDiagonal() * Y;
    BtgY_.resize(B_.cols(), Y.cols());
    peft::detail::product(BtgY_, B_.transpose(), gY, 1.0, false);
    Z.resize(cols(), Y.cols());
    peft::detail::product(Z, A_.transpose(), BtgY_, s_, false);
    for (Index i0 = 0; i0 < rows(); i0 += block) {
      const Index n = std::min(block, rows() - i0);
      base_.read_rows<double>(w_, i0, n, W0_);
      Yb_ = (g_.segment(i0, n).array() - 1.0).matrix().asDiagonal() * Y.middleRows(i0, n);
      peft::detail::product(Z, W0_.transpose(), Yb_, 1.0, true);
    }
  }

 private:
  const SafetensorsView& base_;
  const TensorInfo& w_;
  const MatrixX<double>& A_;
  const MatrixX<double>& B_;
  double s_;
  VectorX<double> g_;
  RowMajorXd W0_, V_, BA_;
  MatrixX<double> AX_, BAX_, BtgY_, Yb_;
};

/// An orthonormal basis of the columns' span: the left singular vectors (peft's compiled SVD).
inline void orthonormalize_columns(MatrixX<double>& M) { M = kernels::exact_svd<double>(peft::detail::operand(M), M.cols()).U; }

}  // namespace gguf_detail

/// \brief The rank-K approximation of a DoRA module's change ΔW (see the file comment), from the base
/// weight `weight` in `base` (d_out x d_in, any floating dtype). Exact: the SVD of ΔW, built for this
/// layer alone. Randomized: subspace iteration (Halko, Martinsson & Tropp 2011, Alg. 4.4) with 10 extra
/// columns and `power_iterations` passes, on the operator, with O((d_out + d_in)(K + 10)) memory besides
/// blocks of 256 rows. Auto: exact when min(d_out, d_in) <= 1024 or K > min / 8, else randomized.
/// \throws ConfigError unless 1 <= K <= min(d_out, d_in), NumericalError for a zero norm.
inline DoraLowRank dora_low_rank(const SafetensorsView& base, const TensorInfo& weight, const PeftModule<double>& m,
                                 double s, Index K, SvdMethod method = SvdMethod::Auto, int power_iterations = 6) {
  using gguf_detail::DoraDelta;
  DoraDelta delta(base, weight, m, s);
  const Index rows = delta.rows(), cols = delta.cols(), small = std::min(rows, cols);
  if (K < 1 || K > small)
    throw ConfigError("peft::io: DoRA module \"" + m.path + "\": the rank " + std::to_string(K) + " is not in [1, " +
                      std::to_string(small) + "] (min(d_out, d_in))");
  DoraLowRank out;
  out.exact_svd = method == SvdMethod::Exact || (method == SvdMethod::Auto && (small <= 1024 || K * 8 > small));
  gguf_detail::RowMajorXd D;
  if (out.exact_svd) {
    MatrixX<double> dense(rows, cols);
    for (Index i0 = 0; i0 < rows; i0 += DoraDelta::block) {
      const Index n = std::min(DoraDelta::block, rows - i0);
      delta.block_of(i0, n, D);
      dense.middleRows(i0, n) = D;
    }
    const TruncatedSVD<double> svd = kernels::exact_svd<double>(peft::detail::operand(dense), K);
    out.US = svd.U * svd.S.asDiagonal();
    out.Vt = svd.V.transpose();
  } else {
    const Index l = std::min(K + 10, small);
    MatrixX<double> omega(cols, l), Q, Z;
    Rng(0x5eed).fill_normal(omega, 0.0, 1.0);
    delta.apply(omega, Q);
    gguf_detail::orthonormalize_columns(Q);
    for (int it = 0; it < power_iterations; ++it) {
      delta.apply_transposed(Q, Z);
      gguf_detail::orthonormalize_columns(Z);
      delta.apply(Z, Q);
      gguf_detail::orthonormalize_columns(Q);
    }
    MatrixX<double> Ct;  // (Qᵀ ΔW)ᵀ = ΔWᵀ Q, d_in x l
    delta.apply_transposed(Q, Ct);
    // Qᵀ ΔW = Ctᵀ = V_c S U_cᵀ: ΔW ≈ (Q V_c) S U_cᵀ.
    const TruncatedSVD<double> svd = kernels::exact_svd<double>(peft::detail::operand(Ct), K);
    out.US.resize(rows, K);
    peft::detail::product(out.US, Q, svd.V, 1.0, false);
    out.US = out.US * svd.S.asDiagonal();
    out.Vt = svd.U.transpose();
  }
  // The error, block by block.
  double total = 0, residual = 0;
  MatrixX<double> approx;
  for (Index i0 = 0; i0 < rows; i0 += DoraDelta::block) {
    const Index n = std::min(DoraDelta::block, rows - i0);
    delta.block_of(i0, n, D);
    total += D.squaredNorm();
    approx.resize(n, cols);
    peft::detail::product(approx, out.US.middleRows(i0, n), out.Vt, 1.0, false);
    residual += (D - approx).squaredNorm();
  }
  out.norm = std::sqrt(total);
  out.relative_error = total > 0 ? std::sqrt(residual / total) : 0.0;
  return out;
}

/// \brief What export_gguf() reads, writes and decides.
struct GgufExportOptions {
  std::string adapter;  ///< the PEFT adapter directory
  std::string config;   ///< the base model's config.json
  std::string out;      ///< the GGUF file to write
  std::string base;     ///< model.safetensors or model.safetensors.index.json (DoRA with "svd" only)
  std::string dora = "refuse";  ///< "refuse" or "svd"
  Index rank = 0;               ///< K for "svd" (0: each module's own rank)
  SvdMethod svd = SvdMethod::Auto;
  bool rank_padding = true;     ///< whether a stored rank may grow (to 2r) to make a scale exact
  GgufType type = GgufType::F32;
};

/// \brief One exported module.
struct GgufExportedModule {
  std::string path, tensor;
  bool dora = false;
  Index rank = 0;             ///< the adapter's rank (K for DoRA)
  ScaleChoice encoding;
  double scale = 0;           ///< PEFT's s (1 for DoRA through the SVD)
  double relative_error = 0;  ///< DoRA: the approximation's
};

/// \brief What export_gguf() wrote.
struct GgufExportSummary {
  float alpha = 0;
  std::vector<GgufExportedModule> modules;
  std::size_t inexact = 0;
  std::uint64_t parameters = 0, padded_parameters = 0, bytes = 0;
};

/// \brief Exports the PEFT adapter directory `o.adapter` for the model `o.config` as the GGUF LoRA
/// adapter `o.out` (see the file comment). Reports each module on `report`, progress on `progress`.
/// \throws FileError, FormatError, ShapeError, ConfigError or NumericalError; nothing is then written.
inline GgufExportSummary export_gguf(const GgufExportOptions& o, std::ostream& report, std::ostream& progress) {
  namespace fs = std::filesystem;
  const LlamaFamilyConfig model = parse_model_config(read_text_file(o.config), o.config);
  const PeftAdapter<double> adapter(o.adapter);
  const PeftConfig& cfg = adapter.config();
  const std::string where = "peft::io::export_gguf: " + o.adapter + ": ";
  if (cfg.peft_type != "LORA")
    throw ConfigError(where + "a " + cfg.peft_type + " adapter: llama.cpp's adapters are LoRA (merge SSF instead)");
  if (!adapter.saved_tensors().empty())
    throw ConfigError(where + "the adapter replaces whole tensors (modules_to_save, e.g. \"" +
                      adapter.saved_tensors().front().base_name +
                      "\"), which a GGUF LoRA cannot carry; merge it with peft-merge instead");
  if (cfg.fan_in_fan_out) throw ConfigError(where + "fan_in_fan_out is set, which no Llama-family model uses");
  if (o.dora != "refuse" && o.dora != "svd") throw ConfigError(where + "--dora is \"" + o.dora + "\", not refuse or svd");
  if (o.rank < 0) throw ConfigError(where + "the rank " + std::to_string(o.rank) + " is negative");

  struct Item {
    const PeftModule<double>* module;
    GgufTarget target;
    Index rank;
    double scale;
  };
  std::vector<Item> items;
  for (const auto& m : adapter.modules()) {
    GgufTarget t = gguf_target(m.path, model);
    if (m.B.rows() != t.d_out || m.A.cols() != t.d_in)
      throw ShapeError(where + "module \"" + m.path + "\" is " + std::to_string(m.B.rows()) + " x " +
                       std::to_string(m.A.cols()) + " (d_out x d_in), but " + o.config + " makes " + t.name + " " +
                       std::to_string(t.d_out) + " x " + std::to_string(t.d_in));
    const bool dora = m.magnitude.size() != 0;
    if (dora && o.dora == "refuse")
      throw ConfigError(where + "module \"" + m.path +
                        "\" is DoRA: its change diag(m/‖W0 + sBA‖)(W0 + sBA) − W0 is not a low-rank update of W0, so it "
                        "cannot be a GGUF LoRA as it is. Export its best rank-K approximation with --dora svd --rank K "
                        "--base model.safetensors (each layer's error is reported), or merge it with peft-merge");
    const Index rank = dora ? (o.rank > 0 ? o.rank : m.A.rows()) : m.A.rows();
    if (dora && rank > std::min(t.d_out, t.d_in))
      throw ConfigError(where + "--rank " + std::to_string(rank) + " is larger than min(d_out, d_in) = " +
                        std::to_string(std::min(t.d_out, t.d_in)) + " of module \"" + m.path + "\"");
    items.push_back({&m, t, rank, dora ? 1.0 : m.scale});
  }
  if (items.empty()) throw FormatError(where + "the adapter has no LoRA modules");
  // In llama.cpp's order: block by block (q, k, v, output, gate, up, down), output.weight last.
  const auto key = [](const Item& i) {
    return std::make_pair(i.target.layer < 0 ? std::numeric_limits<Index>::max() : i.target.layer, i.target.order);
  };
  std::sort(items.begin(), items.end(), [&](const Item& a, const Item& b) { return key(a) < key(b); });
  for (std::size_t i = 1; i < items.size(); ++i)
    if (items[i].target.name == items[i - 1].target.name)
      throw FormatError(where + "modules \"" + items[i - 1].module->path + "\" and \"" + items[i].module->path +
                        "\" both adapt " + items[i].target.name);

  // The base weights, for DoRA only: every one found, of the right shape, before anything is written.
  const bool any_dora = std::any_of(items.begin(), items.end(), [](const Item& i) { return i.module->magnitude.size() != 0; });
  std::map<std::string, std::string> file_of;  // base tensor -> safetensors file
  std::map<std::string, std::unique_ptr<SafetensorsFile>> open_files;
  if (any_dora) {
    if (o.base.empty()) throw ConfigError(where + "--dora svd needs the base weights: --base model.safetensors (or its index)");
    const bool sharded = o.base.size() > 11 && o.base.compare(o.base.size() - 11, 11, ".index.json") == 0;
    if (sharded) {
      const ShardIndex index = read_shard_index(o.base);
      const fs::path dir = fs::path(o.base).parent_path();
      for (const auto& [name, shard] : index.shard_of) file_of[name] = (dir / shard).string();
    }
    for (const Item& i : items) {
      if (i.module->magnitude.size() == 0) continue;
      const std::string name = i.module->path + ".weight";
      const std::string file = sharded ? (file_of.count(name) ? file_of[name] : std::string()) : o.base;
      if (file.empty()) throw FormatError(where + o.base + " lists no tensor \"" + name + "\"");
      auto& f = open_files[file];
      if (!f) f = std::make_unique<SafetensorsFile>(file);
      const TensorInfo* t = f->view().find(name);
      if (!t) throw FormatError(where + file + " has no tensor \"" + name + "\"");
      if (!is_float_dtype(t->dtype) || t->shape.size() != 2 || t->shape[0] != std::uint64_t(i.target.d_out) ||
          t->shape[1] != std::uint64_t(i.target.d_in))
        throw ShapeError(where + "base tensor \"" + name + "\" is not a floating " + std::to_string(i.target.d_out) +
                         " x " + std::to_string(i.target.d_in) + " weight");
      file_of[name] = file;
    }
  }

  // The output must not be one of the inputs, which the rename would replace.
  std::vector<std::string> inputs = {o.config, o.adapter + "/adapter_config.json", o.adapter + "/adapter_model.safetensors"};
  if (!o.base.empty()) inputs.push_back(o.base);
  for (const auto& [name, file] : file_of) inputs.push_back(file);
  for (const auto& in : inputs) {
    std::error_code ec;
    if (fs::exists(o.out, ec) && fs::equivalent(o.out, in, ec))
      throw ConfigError(where + "the output " + o.out + " is the input " + in + "; write elsewhere");
  }

  // The scale encoding, then the file's layout: everything is decided before a byte is written.
  std::vector<ScaleNeed> needs;
  for (const Item& i : items) needs.push_back({float(i.scale), i.rank, i.target.d_in + i.target.d_out});
  const ScalePlan plan = plan_scales(needs, o.rank_padding);
  GgufWriter w(o.out);
  w.set_string("general.architecture", model.gguf_architecture);
  w.set_string("general.type", "adapter");
  const fs::path dir = fs::path(o.adapter).lexically_normal();
  const std::string name = dir.has_filename() ? dir.filename().string() : dir.parent_path().filename().string();
  if (!name.empty()) w.set_string("general.name", name);
  w.set_string("adapter.type", "lora");
  w.set_f32("adapter.lora.alpha", plan.alpha);
  GgufExportSummary summary;
  summary.alpha = plan.alpha;
  summary.inexact = plan.inexact;
  summary.padded_parameters = plan.padded_parameters;
  for (std::size_t k = 0; k < items.size(); ++k) {
    const Item& i = items[k];
    const auto r = std::uint64_t(plan.modules[k].stored_rank);
    w.add_tensor(i.target.name + ".lora_a", o.type, {std::uint64_t(i.target.d_in), r});
    w.add_tensor(i.target.name + ".lora_b", o.type, {r, std::uint64_t(i.target.d_out)});
    summary.parameters += r * std::uint64_t(i.target.d_in + i.target.d_out);
  }
  summary.bytes = w.file_size();

  MatrixX<double> a, b;
  for (std::size_t k = 0; k < items.size(); ++k) {
    const Item& i = items[k];
    const PeftModule<double>& m = *i.module;
    const ScaleChoice& enc = plan.modules[k];
    GgufExportedModule e{m.path, i.target.name, m.magnitude.size() != 0, i.rank, enc, i.scale, 0};
    a.setZero(enc.stored_rank, i.target.d_in);
    b.setZero(i.target.d_out, enc.stored_rank);
    if (e.dora) {
      const std::string name = m.path + ".weight";
      const SafetensorsView& view = open_files.at(file_of.at(name))->view();
      const DoraLowRank low = dora_low_rank(view, view.at(name), m, m.scale, i.rank, o.svd);
      a.topRows(i.rank) = low.Vt;
      b.leftCols(i.rank) = low.US;
      e.relative_error = low.relative_error;
      progress << "peft-export-gguf: " << m.path << ": rank-" << i.rank << " "
               << (low.exact_svd ? "SVD" : "randomized SVD") << " of DoRA's change, relative error "
               << low.relative_error << "\n";
    } else {
      a.topRows(i.rank) = m.A;
      b.leftCols(i.rank) = m.B;
    }
    if (i.target.rotary_heads > 0) permute_rotary_rows(b, i.target.rotary_heads);
    if (enc.fold != 1.0) {
      const MatrixX<double> before = b;
      b *= enc.fold;
      // A power of two moves the exponent only, unless an element leaves float's normal range.
      if (enc.exact && enc.fold != 0.0 &&
          ((b.cast<float>().cast<double>() / enc.fold).array() != before.cast<float>().cast<double>().array()).any()) {
        e.encoding.exact = false;
        ++summary.inexact;
      }
    }
    if (!b.allFinite() || b.cwiseAbs().maxCoeff() > double(std::numeric_limits<float>::max()))
      throw NumericalError(where + "module \"" + m.path + "\": lora_b is not finite in float after folding its scale");
    w.write(i.target.name + ".lora_a", a);
    w.write(i.target.name + ".lora_b", b);
    report << i.target.name << " <- " << m.path << ": " << (e.dora ? "DoRA via SVD" : "LoRA") << ", rank " << i.rank;
    if (enc.stored_rank != i.rank) report << " stored as " << enc.stored_rank;
    report << ", scale " << float(i.scale);
    if (e.encoding.exact)
      report << " exact (alpha " << plan.alpha << " / " << enc.stored_rank
             << (enc.fold != 1.0 ? ", lora_b x " + std::to_string(enc.fold) : std::string()) << ")";
    else
      report << " INEXACT: lora_b x " << enc.fold << " (one rounding per element)";
    if (i.target.rotary_heads > 0) report << ", rows in llama.cpp's rotary order";
    if (e.dora) report << ", relative error " << e.relative_error;
    report << "\n";
    summary.modules.push_back(std::move(e));
  }
  w.commit();
  report << summary.modules.size() << " modules written to " << o.out << " (" << model.gguf_architecture
         << ", adapter.lora.alpha " << plan.alpha << ", " << gguf_type_name(o.type) << ", " << summary.bytes
         << " bytes); " << (summary.inexact ? std::to_string(summary.inexact) + " inexact scales" : "every scale exact")
         << "\n";
  return summary;
}

}  // namespace io
}  // namespace peft
