#pragma once
/// \file adapter_set.hpp
/// \brief A whole model's adapters (docs/whole-models.md): the user's weights by module path
/// (`peft::ModelWeights`), the modules chosen as Hugging Face PEFT chooses them (target_modules,
/// exclude_modules, rank_pattern, alpha_pattern), one adapter per module behind `peft::AnyAdapter`,
/// whole tensors trained beside them (PEFT's modules_to_save), every parameter named by path for an
/// optimizer, and merge() / unmerge() of the whole set, all or nothing. Needs Eigen only; saving and
/// loading (PEFT directories, checkpoints) are in peft/io/adapter_set_io.hpp.

#include "peft/core/config.hpp"  // first: the detail headers check for it
#include "peft/adapters/dora.hpp"
#include "peft/adapters/lora.hpp"
#include "peft/adapters/pissa.hpp"
#include "peft/adapters/ssf.hpp"
#include "peft/core/error.hpp"
#include "peft/core/types.hpp"
#include "peft/detail/hash.hpp"
#include "peft/model/any_adapter.hpp"
#include "peft/model/targets.hpp"
#include "peft/optim/optimizer.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <deque>
#include <string>
#include <utility>
#include <vector>

namespace peft {

/// \brief The adapter kinds an AdapterSet builds from a config. (Any other adapter type can be
/// inserted by hand: AdapterSet::insert.)
enum class AdapterKind { lora, dora, pissa, ssf };

/// \returns "lora", "dora", "pissa" or "ssf".
inline const char* kind_name(AdapterKind k) {
  switch (k) {
    case AdapterKind::dora: return "dora";
    case AdapterKind::pissa: return "pissa";
    case AdapterKind::ssf: return "ssf";
    case AdapterKind::lora:
    default: return "lora";
  }
}

/// \brief How an AdapterSet chooses its modules and builds their adapters. Field names follow PEFT's
/// LoraConfig where PEFT has the field.
struct AdapterSetConfig {
  AdapterKind kind = AdapterKind::lora;  ///< one kind for the whole set
  ModuleSelector target_modules;         ///< the modules that get an adapter (required)
  ModuleSelector exclude_modules;        ///< never these, even if targeted
  Index r = 8;                           ///< rank of the LoRA family, unless rank_pattern says otherwise
  double lora_alpha = 8;                 ///< alpha, unless alpha_pattern says otherwise
  bool use_rslora = false;               ///< s = alpha / √r instead of alpha / r
  double dropout = 0;                    ///< lora_dropout
  LoRAInit init = LoRAInit::kaiming_uniform;  ///< LoRA's and DoRA's initial factors
  /// Per-module rank and alpha: the first key (a regular expression) that matches the end of a module's
  /// path at a dot boundary wins, as in PEFT (peft::pattern_key_matches).
  std::vector<std::pair<std::string, Index>> rank_pattern;
  std::vector<std::pair<std::string, double>> alpha_pattern;
  bool detach_norm = true;   ///< DoRA: the norms are constants in backward (PEFT's choice)
  int svd_iterations = 0;    ///< PiSSA: 0 for the exact SVD, q > 0 for the randomized one
  Index oversampling = 8;    ///< PiSSA: the randomized SVD's extra columns
  SSFInit ssf_init = SSFInit::official;  ///< SSF's initial scale and shift
  double ssf_init_std = 0.02;            ///< SSF: σ of the official init
  /// The base seed: a module's adapter is seeded with layer_seed(seed, path), so no two start alike and
  /// each start depends only on the seed and the module's path (not on the other modules).
  std::uint64_t seed = 0;

  /// \returns the rank of the module at `path`.
  Index rank_for(const std::string& path) const {
    for (const auto& [key, value] : rank_pattern)
      if (pattern_key_matches(key, path)) return value;
    return r;
  }
  /// \returns the alpha of the module at `path`.
  double alpha_for(const std::string& path) const {
    for (const auto& [key, value] : alpha_pattern)
      if (pattern_key_matches(key, path)) return value;
    return lora_alpha;
  }
  /// \returns whether the module at `path` gets an adapter.
  bool targets(const std::string& path) const { return target_modules.matches(path) && !exclude_modules.matches(path); }
};

/// \returns the seed of the adapter on the module at `path`: SplitMix64 of the base seed xor the
/// 64-bit FNV-1a hash of the path (docs/whole-models.md, Choosing modules).
inline std::uint64_t layer_seed(std::uint64_t seed, const std::string& path) {
  return detail::splitmix64(seed ^ detail::fnv1a(path.data(), path.size()));
}

/// \brief The user's weights by module path: each entry refers to a weight W (d_out x d_in) and
/// optionally a bias b, which the user keeps (they must outlive everything built on them and keep
/// their storage: no resize). Paths are PyTorch's module names, e.g. "layers.0.attn.q_proj".
template <class MatrixType_>
class ModelWeights {
 public:
  using MatrixType = MatrixType_;
  using Scalar = typename MatrixType::Scalar;
  using Vector = VectorX<Scalar>;

  /// \brief One module: its path, weight and bias (nullptr without one).
  struct Module {
    std::string path;
    MatrixType* weight;
    Vector* bias;
  };

  /// \brief Adds a module without a bias. \throws ConfigError for an empty or repeated path,
  /// ShapeError for an empty W.
  void add(const std::string& path, MatrixType& W) { push(path, W, nullptr); }
  /// \brief Adds a module with a bias. \throws as add(path, W), and ShapeError if b has not d_out entries.
  void add(const std::string& path, MatrixType& W, Vector& b) { push(path, W, &b); }

  /// \returns the modules in the order added.
  const std::vector<Module>& modules() const { return modules_; }
  /// \returns the module at `path`, or nullptr.
  const Module* find(const std::string& path) const {
    for (const Module& m : modules_)
      if (m.path == path) return &m;
    return nullptr;
  }
  /// \returns the module at `path`. \throws ConfigError if there is none.
  const Module& at(const std::string& path) const {
    if (const Module* m = find(path)) return *m;
    throw ConfigError("peft::ModelWeights: the model has no module \"" + path + "\"");
  }

 private:
  void push(const std::string& path, MatrixType& W, Vector* b) {
    const detail::Where w{"peft::ModelWeights", "add"};
    if (path.empty()) detail::raise<ConfigError>(w, "an empty module path");
    if (find(path)) detail::raise<ConfigError>(w, "module \"", path, "\" is already there");
    if (W.size() == 0) detail::raise<ShapeError>(w, "module \"", path, "\": W is ", W.rows(), "x", W.cols());
    if (b && b->size() != W.rows())
      detail::raise<ShapeError>(w, "module \"", path, "\": b has ", b->size(), " entries, expected d_out = ", W.rows());
    modules_.push_back({path, &W, b});
  }

  std::vector<Module> modules_;
};

namespace detail {
template <class T>
struct type_tag {
  using type = T;
};
}  // namespace detail

/// \brief Builds the adapter `cfg` gives the module at `path` (its kind, rank, alpha and seed) over W and b.
/// \throws as the adapter's constructor
template <class MatrixType>
AnyAdapter<typename MatrixType::Scalar> make_adapter(const AdapterSetConfig& cfg, const std::string& path,
                                                     MatrixType& W, VectorX<typename MatrixType::Scalar>* b) {
  using Scalar = typename MatrixType::Scalar;
  const auto build = [&](auto&& config, auto tag) -> AnyAdapter<Scalar> {
    using A = typename decltype(tag)::type;
    if (b) return AnyAdapter<Scalar>(A(W, *b, config));
    return AnyAdapter<Scalar>(A(W, config));
  };
  const auto lora_fields = [&](auto& c) {
    c.rank = cfg.rank_for(path);
    c.alpha = cfg.alpha_for(path);
    c.use_rslora = cfg.use_rslora;
    c.dropout = cfg.dropout;
    c.init = cfg.init;
    c.seed = layer_seed(cfg.seed, path);
  };
  switch (cfg.kind) {
    case AdapterKind::dora: {
      DoRAConfig c;
      lora_fields(c);
      c.detach_norm = cfg.detach_norm;
      return build(c, detail::type_tag<DoRA<MatrixType>>{});
    }
    case AdapterKind::pissa: {
      PiSSAConfig c;
      lora_fields(c);
      c.svd_iterations = cfg.svd_iterations;
      c.oversampling = cfg.oversampling;
      return build(c, detail::type_tag<PiSSA<MatrixType>>{});
    }
    case AdapterKind::ssf: {
      SSFConfig c;
      c.init = cfg.ssf_init;
      c.init_std = cfg.ssf_init_std;
      c.seed = layer_seed(cfg.seed, path);
      return build(c, detail::type_tag<SSF<MatrixType>>{});
    }
    case AdapterKind::lora:
    default: {
      LoRAConfig c;
      lora_fields(c);
      return build(c, detail::type_tag<LoRA<MatrixType>>{});
    }
  }
}

/// \brief A model's adapters, one per targeted module, and the whole tensors trained beside them.
///
/// Built from the user's ModelWeights and an AdapterSetConfig (or empty, then filled by insert() or
/// by peft::io::load_peft). The set refers to the ModelWeights, which must outlive it. Move-only.
///
/// **Parameters** are named "<module path>.<PEFT's name>" ("layers.0.q_proj.lora_A"; a whole module's
/// "head.weight" and "head.bias"): add_to(optimizer) registers them all in one call, under those
/// names, so that optimizer state is saved and restored by name.
///
/// **merge() and unmerge()** act on every adapter, all or nothing: a set in which some adapter is in
/// the wrong state is refused before any weight is written (StateError naming it); if an adapter
/// refuses while the set is being merged (NumericalError: a value that would not be finite), the
/// adapters already merged are unmerged again, which restores their weights to within the round-trip
/// bound of docs/math.md, and the error names the module. unmerge() rolls back the same way.
template <class MatrixType_>
class AdapterSet {
 public:
  using MatrixType = MatrixType_;
  using Scalar = typename MatrixType::Scalar;
  using Vector = VectorX<Scalar>;
  using Matrix = MatrixX<Scalar>;
  using Adapter = AnyAdapter<Scalar>;

  /// \brief One adapted module.
  struct Layer {
    std::string path;
    Adapter adapter;
  };

  /// \brief A module trained whole beside the adapters (PEFT's modules_to_save): its weight and bias are
  /// the user's (in ModelWeights), its gradients live here.
  struct WholeModule {
    std::string path;
    MatrixType grad_weight;  ///< same shape and storage order as the module's W
    Vector grad_bias;        ///< empty without a bias
  };

  /// \brief An empty set over `model` (fill it with insert(), or load one: peft::io::load_peft).
  explicit AdapterSet(ModelWeights<MatrixType>& model) : model_(&model) {}

  /// \brief One adapter of cfg.kind on every module cfg targets, each with its rank, alpha and seed.
  /// \throws ConfigError if nothing is targeted, for an invalid pattern or expression, or as the adapters'
  ///         constructors (naming the module); ShapeError as their constructors. Every module's config is
  ///         checked before any adapter is built, so a PiSSA set (which rewrites W) fails before writing.
  AdapterSet(ModelWeights<MatrixType>& model, const AdapterSetConfig& cfg) : model_(&model), config_(cfg) {
    const detail::Where w{"peft::AdapterSet", "constructor"};
    if (cfg.target_modules.empty()) detail::raise<ConfigError>(w, "target_modules is empty");
    // Every pattern key is checked, not only those tried before the first match.
    for (const auto& p : cfg.rank_pattern) detail::compile_pattern(p.first, "rank_pattern key");
    for (const auto& p : cfg.alpha_pattern) detail::compile_pattern(p.first, "alpha_pattern key");
    std::vector<const typename ModelWeights<MatrixType>::Module*> targets;
    for (const auto& m : model.modules())
      if (cfg.targets(m.path)) targets.push_back(&m);
    if (targets.empty())
      detail::raise<ConfigError>(w, "no module of the model matches target_modules (", model.modules().size(),
                                 " modules)");
    for (const auto* m : targets) precheck(*m);
    for (const auto* m : targets) {
      try {
        add_layer(m->path, make_adapter(cfg, m->path, *m->weight, m->bias));
      } catch (...) {
        // PiSSA replaced the weights of the modules built so far by residuals: give them back (to within
        // rounding: W_res + s B0 A0). Only a failure the checks above cannot foresee (std::bad_alloc, say)
        // gets here.
        std::string restore;
        if (cfg.kind == AdapterKind::pissa)
          for (Layer& l : layers_)
            if (auto* p = l.adapter.template get<PiSSA<MatrixType>>()) {
              try {
                std::move(*p).release_to_lora();
              } catch (const std::exception& e) {
                restore += "; restoring module \"" + l.path + "\" failed too: " + e.what();
              }
            }
        rethrow_named("constructor", m->path, restore);
      }
    }
    selected_by_config_ = true;
  }

  AdapterSet(AdapterSet&&) noexcept = default;
  AdapterSet& operator=(AdapterSet&&) noexcept = default;
  AdapterSet(const AdapterSet&) = delete;
  AdapterSet& operator=(const AdapterSet&) = delete;
  ~AdapterSet() = default;

  /// \returns the config the set was built from (the default one for a set built empty).
  const AdapterSetConfig& config() const { return config_; }
  /// \returns whether the adapted modules are exactly those config() selects (false after insert()).
  bool selected_by_config() const { return selected_by_config_; }
  /// \returns the model the set is over.
  ModelWeights<MatrixType>& model() const { return *model_; }

  /// \returns the number of adapted modules.
  std::size_t size() const { return layers_.size(); }
  /// \returns the adapted modules, in the order built (the model's) or inserted.
  const std::vector<Layer>& layers() const { return layers_; }
  std::vector<Layer>& layers() { return layers_; }
  /// \returns the adapter on the module at `path`, or nullptr.
  Adapter* find(const std::string& path) {
    for (Layer& l : layers_)
      if (l.path == path) return &l.adapter;
    return nullptr;
  }
  const Adapter* find(const std::string& path) const { return const_cast<AdapterSet&>(*this).find(path); }
  /// \returns the adapter on the module at `path`. \throws ConfigError if it has none.
  Adapter& at(const std::string& path) {
    if (Adapter* a = find(path)) return *a;
    throw ConfigError("peft::AdapterSet::at: no adapter on module \"" + path + "\"");
  }
  const Adapter& at(const std::string& path) const { return const_cast<AdapterSet&>(*this).at(path); }

  /// \brief Adds an adapter (of any type: your own too) on the module at `path`, which it must wrap.
  /// \throws ConfigError if the model has no such module or it already has an adapter; ShapeError if the
  ///         adapter's shape is not the module's.
  void insert(const std::string& path, Adapter adapter) {
    add_layer(path, std::move(adapter));
    selected_by_config_ = false;
  }

  /// \brief Trains the module at `path` whole (PEFT's modules_to_save: a new head, say): its W (and b)
  /// join the parameters, as "<path>.weight" and "<path>.bias", with gradients kept here.
  /// \throws ConfigError if the model has no such module, or it is adapted or already trained whole
  void train_whole(const std::string& path) {
    const detail::Where w{"peft::AdapterSet", "train_whole"};
    const auto& m = model_->at(path);
    if (find(path)) detail::raise<ConfigError>(w, "module \"", path, "\" has an adapter");
    if (find_whole(path)) detail::raise<ConfigError>(w, "module \"", path, "\" is already trained whole");
    WholeModule whole{path, MatrixType::Zero(m.weight->rows(), m.weight->cols()),
                      m.bias ? Vector::Zero(m.bias->size()) : Vector()};
    wholes_.push_back(std::move(whole));
    whole_names_.push_back(path + ".weight");
    if (m.bias) whole_names_.push_back(path + ".bias");
  }
  /// \returns the modules trained whole.
  const std::vector<WholeModule>& whole_modules() const { return wholes_; }
  /// \returns the gradient of a whole module's W, for the user's backward to fill (`+=`).
  /// \throws ConfigError if `path` is not trained whole
  MatrixType& weight_grad(const std::string& path) { return whole_at(path).grad_weight; }
  /// \returns the gradient of a whole module's b (empty without a bias).
  Vector& bias_grad(const std::string& path) { return whole_at(path).grad_bias; }

  /// \returns every trainable parameter, named by path: the adapters' in layer order, then the whole
  /// modules' (a row-major W is viewed as its transpose: the same elements in storage order). The views
  /// are valid until the set changes (insert, train_whole, move).
  std::vector<Parameter<Scalar>> parameters() {
    std::vector<Parameter<Scalar>> out;
    auto name = layer_names_.begin();
    for (Layer& l : layers_)
      for (auto& p : l.adapter.parameters()) out.push_back(Parameter<Scalar>{(name++)->c_str(), p.value, p.grad});
    name = whole_names_.begin();
    for (WholeModule& wm : wholes_) {
      const auto& m = model_->at(wm.path);
      out.push_back(Parameter<Scalar>{(name++)->c_str(), storage_map(*m.weight), storage_map(wm.grad_weight)});
      if (m.bias)
        out.push_back(Parameter<Scalar>{(name++)->c_str(), Eigen::Map<Matrix>(m.bias->data(), m.bias->size(), 1),
                                        Eigen::Map<Matrix>(wm.grad_bias.data(), wm.grad_bias.size(), 1)});
    }
    return out;
  }

  /// \returns the number of trainable scalars.
  Index num_parameters() const {
    Index n = 0;
    for (const Layer& l : layers_) n += l.adapter.num_parameters();
    for (const WholeModule& wm : wholes_) n += wm.grad_weight.size() + wm.grad_bias.size();
    return n;
  }

  /// \brief Resets every gradient (adapters' and whole modules') to zero.
  void zero_grad() {
    for (Layer& l : layers_) l.adapter.zero_grad();
    for (WholeModule& wm : wholes_) {
      wm.grad_weight.setZero();
      wm.grad_bias.setZero();
    }
  }

  /// \brief Registers every parameter with `optimizer` in one call (all or nothing), named by path.
  template <class Optimizer>
  void add_to(Optimizer& optimizer, const ParamOptions& options = ParamOptions()) {
    optimizer.add_parameters(parameters(), options, "the peft::AdapterSet");
  }

  /// \returns whether every adapter is merged (false for an empty set).
  bool is_merged() const {
    if (layers_.empty()) return false;
    for (const Layer& l : layers_)
      if (!l.adapter.is_merged()) return false;
    return true;
  }

  /// \brief Switches every adapter's exact restore on or off (on by default: unmerge() gives every W and
  /// b back bit for bit; docs/math.md, Exact restore). \throws StateError if some adapter is merged
  /// (nothing changed)
  void set_exact_restore(bool on) {
    for (const Layer& l : layers_)
      if (l.adapter.is_merged())
        detail::raise<StateError>(detail::Where{"peft::AdapterSet", "set_exact_restore"}, "module \"", l.path,
                                  "\" is merged; unmerge() first");
    for (Layer& l : layers_) l.adapter.set_exact_restore(on);
  }
  /// \returns whether the last unmerge() gave every adapter's weights back bit for bit (false for an
  /// empty set).
  bool last_restore_exact() const {
    if (layers_.empty()) return false;
    for (const Layer& l : layers_)
      if (!l.adapter.last_restore_exact()) return false;
    return true;
  }

  /// \brief Merges every adapter into its module's W (and b), all or nothing (see the class comment).
  /// \throws StateError if some adapter is merged already (nothing written); NumericalError (or another
  ///         adapter's refusal) naming the module, after the merged ones are unmerged again
  void merge() { apply(true); }
  /// \brief Unmerges every adapter, all or nothing.
  /// \throws StateError if some adapter is not merged (nothing written); as merge() otherwise
  void unmerge() { apply(false); }

 private:
  static Eigen::Map<Matrix> storage_map(MatrixType& m) {
    return MatrixType::IsRowMajor ? Eigen::Map<Matrix>(m.data(), m.cols(), m.rows())
                                  : Eigen::Map<Matrix>(m.data(), m.rows(), m.cols());
  }

  WholeModule* find_whole(const std::string& path) {
    for (WholeModule& wm : wholes_)
      if (wm.path == path) return &wm;
    return nullptr;
  }
  WholeModule& whole_at(const std::string& path) {
    if (WholeModule* wm = find_whole(path)) return *wm;
    throw ConfigError("peft::AdapterSet: module \"" + path + "\" is not trained whole (train_whole)");
  }

  /// Checks the module's adapter config (rank, alpha, PiSSA's rank bound) before anything is built.
  void precheck(const typename ModelWeights<MatrixType>::Module& m) const {
    const detail::Where w{"peft::AdapterSet", "constructor"};
    const std::string where = "module \"" + m.path + "\": ";
    if (config_.kind == AdapterKind::ssf) return;
    const Index r = config_.rank_for(m.path);
    const double alpha = config_.alpha_for(m.path);
    if (r < 1) detail::raise<ConfigError>(w, where, "rank is ", r, ", expected >= 1");
    if (!(alpha > 0) || !std::isfinite(alpha)) detail::raise<ConfigError>(w, where, "alpha is ", alpha, ", expected > 0");
    if (config_.kind == AdapterKind::pissa) {
      const Index bound = std::min(m.weight->rows(), m.weight->cols());
      if (r > bound) detail::raise<ConfigError>(w, where, "rank is ", r, ", expected <= min(d_out, d_in) = ", bound);
      if (!m.weight->allFinite()) detail::raise<NumericalError>(w, where, "W has a value that is not finite");
    }
  }

  void add_layer(const std::string& path, Adapter adapter) {
    const detail::Where w{"peft::AdapterSet", "insert"};
    const auto& m = model_->at(path);
    if (!adapter.holds()) detail::raise<ConfigError>(w, "module \"", path, "\": the adapter handle is empty");
    if (find(path)) detail::raise<ConfigError>(w, "module \"", path, "\" has an adapter already");
    if (find_whole(path)) detail::raise<ConfigError>(w, "module \"", path, "\" is trained whole");
    if (adapter.d_out() != m.weight->rows() || adapter.d_in() != m.weight->cols())
      detail::raise<ShapeError>(w, "module \"", path, "\" is ", m.weight->rows(), "x", m.weight->cols(),
                                " but the adapter is ", adapter.d_out(), "x", adapter.d_in());
    std::vector<std::string> names;
    for (const auto& p : adapter.parameters()) names.push_back(path + "." + p.name);
    layers_.push_back({path, std::move(adapter)});
    for (auto& n : names) layer_names_.push_back(std::move(n));
  }

  void apply(bool merging) {
    const char* op = merging ? "merge" : "unmerge";
    const detail::Where w{"peft::AdapterSet", op};
    for (const Layer& l : layers_)
      if (l.adapter.is_merged() == merging)
        detail::raise<StateError>(w, "module \"", l.path, "\" is ", merging ? "merged already" : "not merged",
                                  "; no weight was written");
    std::size_t done = 0;
    try {
      for (; done < layers_.size(); ++done) merging ? layers_[done].adapter.merge() : layers_[done].adapter.unmerge();
    } catch (...) {
      std::string rollback;
      for (std::size_t j = done; j-- > 0;) {
        try {
          merging ? layers_[j].adapter.unmerge() : layers_[j].adapter.merge();
        } catch (const std::exception& e) {
          rollback += std::string("; rolling back module \"") + layers_[j].path + "\" failed too: " + e.what();
        }
      }
      rethrow_named(op, layers_[done].path, rollback);
    }
  }

  /// Rethrows the exception in flight with "peft::AdapterSet::<op>: module "<path>": " in front (peft's
  /// own types; anything else, such as std::bad_alloc, unchanged).
  [[noreturn]] static void rethrow_named(const char* op, const std::string& path, const std::string& tail = {}) {
    const std::string prefix = std::string("peft::AdapterSet::") + op + ": module \"" + path + "\": ";
    try {
      throw;
    } catch (const StateError& e) {
      throw StateError(prefix + e.what() + tail);
    } catch (const NumericalError& e) {
      throw NumericalError(prefix + e.what() + tail);
    } catch (const ShapeError& e) {
      throw ShapeError(prefix + e.what() + tail);
    } catch (const ConfigError& e) {
      throw ConfigError(prefix + e.what() + tail);
    }
  }

  ModelWeights<MatrixType>* model_;
  AdapterSetConfig config_;
  bool selected_by_config_ = false;
  std::vector<Layer> layers_;
  std::vector<WholeModule> wholes_;
  // Parameter names in parameters() order (deques: their c_str() stay valid as they grow).
  std::deque<std::string> layer_names_;
  std::deque<std::string> whole_names_;
};

#ifdef PEFT_COMPILED
// The compiled part (peft::compiled) instantiates the set and the handle's model of each adapter kind
// once, for the four weight types (kernels.hpp says more).
#define PEFT_EXTERN_MODEL(M)                                \
  extern template class detail::AnyAdapterModel<LoRA<M>>;  \
  extern template class detail::AnyAdapterModel<DoRA<M>>;  \
  extern template class detail::AnyAdapterModel<PiSSA<M>>; \
  extern template class detail::AnyAdapterModel<SSF<M>>;   \
  extern template class AdapterSet<M>;
PEFT_EXTERN_MODEL(Eigen::MatrixXf)
PEFT_EXTERN_MODEL(Eigen::MatrixXd)
PEFT_EXTERN_MODEL(RowMajorMatrixXf)
PEFT_EXTERN_MODEL(RowMajorMatrixXd)
#undef PEFT_EXTERN_MODEL
#endif

}  // namespace peft
