#pragma once
/// \file adapter_set_io.hpp
/// \brief A peft::AdapterSet saved as a Hugging Face PEFT adapter directory and loaded from one (ours
/// or PEFT's), and training checkpoints that resume bit for bit. Needs nlohmann-json (CMake target
/// `peft::io`). docs/whole-models.md describes the files, docs/training.md the checkpoints.
///
/// - save_peft(): `adapter_config.json` and `adapter_model.safetensors` as PEFT writes them for LoRA and
///   DoRA (keys `base_model.model.<path>.lora_A.weight`, ...; F32 by default); PiSSA as its rank-2r LoRA
///   on the original weight, as PEFT converts it; whole modules as `modules_to_save`; SSF, which PEFT
///   does not have, under `peft_type` "SSF" with keys `<path>.ssf_scale` and `<path>.ssf_shift`.
/// - load_peft(): such a directory onto a model's weights, as LoRA, DoRA or SSF adapters (a saved
///   PiSSA comes back as the LoRA it was saved as), with the whole modules' tensors copied into the
///   model's weights.
/// - save_checkpoint() / load_checkpoint(): the same directory plus `training_state.safetensors`: every
///   parameter in its own precision, the optimizer's state by parameter name, each adapter's random
///   stream, and the caller's own metadata.
/// Every directory is written into a temporary directory beside it and swapped into place only when
/// complete: a crash or an error never leaves a half-written directory where a good one was.

#include "peft/core/error.hpp"
#include "peft/io/peft_adapter.hpp"
#include "peft/io/peft_load.hpp"
#include "peft/io/safetensors.hpp"
#include "peft/model/adapter_set.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

namespace peft {
namespace io {

/// \brief How save_peft() and save_checkpoint() write the adapter files.
struct SaveOptions {
  Dtype dtype = Dtype::F32;             ///< of adapter_model.safetensors: F32 (PEFT's default), F64, F16, BF16
  std::string base_model_name_or_path;  ///< written when given
  std::string task_type;                ///< PEFT's task_type ("CAUSAL_LM", "SEQ_CLS", ...), null when empty
};

/// The files a saved directory holds; a directory holding anything else is not replaced.
inline const std::vector<std::string>& saved_file_names() {
  static const std::vector<std::string> names{"adapter_config.json", "adapter_model.safetensors",
                                              "training_state.safetensors"};
  return names;
}

namespace detail {

namespace fs = std::filesystem;
using Json = nlohmann::ordered_json;

/// \brief A directory written whole: files go into a fresh temporary directory beside `dir`, which
/// commit() swaps into place (atomically, with renameat2's RENAME_EXCHANGE, where the file system
/// allows; else by renaming the old one aside first). Destroyed without commit(), it removes the
/// temporary and `dir` is untouched.
class DirectoryWriter {
 public:
  explicit DirectoryWriter(std::string dir) : dir_(std::move(dir)) {
    while (dir_.size() > 1 && dir_.back() == '/') dir_.pop_back();
    if (dir_.empty()) throw FileError("peft::io: an empty directory name");
    std::error_code ec;
    if (fs::exists(dir_, ec)) {
      if (!fs::is_directory(dir_, ec)) throw FileError("peft::io: " + dir_ + " exists and is not a directory");
      for (const auto& e : fs::directory_iterator(dir_, ec)) {
        const std::string name = e.path().filename().string();
        const auto& ok = saved_file_names();
        if (std::find(ok.begin(), ok.end(), name) == ok.end())
          throw FileError("peft::io: " + dir_ + " holds " + name +
                          ", which peft does not write: it is not replaced (save elsewhere, or remove it)");
      }
      if (ec) throw FileError("peft::io: cannot list " + dir_ + ": " + ec.message());
    }
    const fs::path parent = fs::path(dir_).parent_path();
    if (!parent.empty() && !fs::is_directory(parent, ec) && !fs::create_directories(parent, ec) && ec)
      throw FileError("peft::io: cannot create " + parent.string() + ": " + ec.message());
    std::string pattern = dir_ + ".tmp-" + std::string(6, 'X');  // mkdtemp fills in the six
    if (!::mkdtemp(pattern.data()))
      throw FileError("peft::io: cannot create a temporary directory beside " + dir_ + ": " + std::strerror(errno));
    tmp_ = pattern;
  }
  DirectoryWriter(const DirectoryWriter&) = delete;
  DirectoryWriter& operator=(const DirectoryWriter&) = delete;
  ~DirectoryWriter() {
    if (!tmp_.empty()) {
      std::error_code ec;
      fs::remove_all(tmp_, ec);
    }
  }

  /// \returns the path of `name` inside the temporary directory.
  std::string path(const std::string& name) const { return tmp_ + "/" + name; }

  /// \brief Writes a text file into the temporary directory, synced.
  void write_text(const std::string& name, const std::string& text) const {
    const std::string p = path(name);
    std::FILE* f = std::fopen(p.c_str(), "wb");
    if (!f) throw FileError("peft::io: cannot create " + p + ": " + std::strerror(errno));
    const bool ok = std::fwrite(text.data(), 1, text.size(), f) == text.size() && std::fflush(f) == 0 &&
                    ::fsync(::fileno(f)) == 0;
    const int err = errno;
    if (std::fclose(f) != 0 || !ok) throw FileError("peft::io: cannot write " + p + ": " + std::strerror(err));
  }

  /// \brief Puts the temporary directory in `dir`'s place; the old directory, if any, is removed.
  void commit() {
    sync_directory(tmp_);
    std::error_code ec;
    if (!fs::exists(dir_, ec)) {
      if (std::rename(tmp_.c_str(), dir_.c_str()) != 0) fail_rename();
      tmp_.clear();
    } else {
#if defined(__linux__) && defined(RENAME_EXCHANGE)
      if (::renameat2(AT_FDCWD, tmp_.c_str(), AT_FDCWD, dir_.c_str(), RENAME_EXCHANGE) == 0) {
        fs::remove_all(tmp_, ec);  // now the old directory
        tmp_.clear();
        sync_parent();
        return;
      }
#endif
      // No atomic exchange here: the old directory is moved aside, the new one renamed in, the old removed.
      const std::string old = dir_ + ".old-" + std::to_string(::getpid());
      fs::remove_all(old, ec);
      if (std::rename(dir_.c_str(), old.c_str()) != 0) fail_rename();
      if (std::rename(tmp_.c_str(), dir_.c_str()) != 0) {
        const int err = errno;
        std::rename(old.c_str(), dir_.c_str());
        errno = err;
        fail_rename();
      }
      tmp_.clear();
      fs::remove_all(old, ec);
    }
    sync_parent();
  }

 private:
  [[noreturn]] void fail_rename() const {
    throw FileError("peft::io: cannot move " + tmp_ + " to " + dir_ + ": " + std::strerror(errno));
  }
  static void sync_directory(const std::string& d) {
    const int fd = ::open(d.c_str(), O_RDONLY | O_DIRECTORY);
    if (fd >= 0) {
      ::fsync(fd);
      ::close(fd);
    }
  }
  void sync_parent() const {
    const fs::path parent = fs::path(dir_).parent_path();
    sync_directory(parent.empty() ? std::string(".") : parent.string());
  }

  std::string dir_, tmp_;
};

/// \returns `text` with every regular-expression metacharacter escaped (a module path as a pattern key).
inline std::string regex_escape(const std::string& text) {
  std::string out;
  for (char c : text) {
    if (std::strchr("\\^$.|?*+()[]{}", c)) out += '\\';
    out += c;
  }
  return out;
}

/// \returns the key of a tensor under PEFT's prefix: "base_model.model.<path>.<name>", with ".weight" after
/// the LoRA factors as PEFT writes them.
inline std::string peft_key(const std::string& path, const std::string& name) {
  const bool factor = name == "lora_A" || name == "lora_B";
  return "base_model.model." + path + "." + name + (factor ? ".weight" : "");
}

/// The per-module LoRA arithmetic a set is saved with, and the config fields that reproduce it.
struct LoRAFields {
  bool any = false;
  Index r = 0;
  double alpha = 0;
  bool use_rslora = false;
  std::vector<std::pair<std::string, Index>> rank_pattern;
  std::vector<std::pair<std::string, double>> alpha_pattern;
};

template <class Value>
Value pattern_value(const std::vector<std::pair<std::string, Value>>& pattern, const std::string& path, Value dflt) {
  for (const auto& [key, value] : pattern)
    if (pattern_key_matches(key, path)) return value;
  return dflt;
}

template <class MatrixType>
LoRAFields lora_fields(const AdapterSet<MatrixType>& set,
                       const std::vector<std::pair<std::string, LoRAShape>>& shapes) {
  LoRAFields f;
  std::map<Index, int> ranks;
  std::map<double, int> alphas;
  for (const auto& [path, s] : shapes) {
    if (s.rank == 0) continue;
    if (f.any && s.use_rslora != f.use_rslora)
      throw ConfigError("peft::io::save_peft: module \"" + path +
                        "\" differs from the others in use_rslora, which PEFT's config holds once");
    f.any = true;
    f.use_rslora = s.use_rslora;
    ++ranks[s.rank];
    ++alphas[s.alpha];
  }
  if (!f.any) return f;
  // r and lora_alpha: the set's config when it built the modules, else the most common value.
  const AdapterSetConfig& cfg = set.config();
  const bool pissa = set.selected_by_config() && cfg.kind == AdapterKind::pissa;
  if (set.selected_by_config()) {
    // PiSSA is saved at rank 2r with alpha 2α (α√2 with rsLoRA), patterns likewise, as PEFT converts it.
    const double a_factor = pissa ? (cfg.use_rslora ? std::sqrt(2.0) : 2.0) : 1.0;
    const Index r_factor = pissa ? 2 : 1;
    f.r = cfg.r * r_factor;
    f.alpha = cfg.lora_alpha * a_factor;
    for (const auto& [k, v] : cfg.rank_pattern) f.rank_pattern.emplace_back(k, v * r_factor);
    for (const auto& [k, v] : cfg.alpha_pattern) f.alpha_pattern.emplace_back(k, v * a_factor);
  } else {
    f.r = std::max_element(ranks.begin(), ranks.end(), [](auto& a, auto& b) { return a.second < b.second; })->first;
    f.alpha = std::max_element(alphas.begin(), alphas.end(), [](auto& a, auto& b) { return a.second < b.second; })->first;
  }
  // If the patterns do not give every module its rank (alpha), every module gets an entry of its own,
  // its path escaped, in front, longest path first: a key matches any path that ends with it at a dot
  // boundary, but never a shorter path, so each module's first matching key is then its own.
  std::vector<std::pair<std::string, LoRAShape>> sorted;
  for (const auto& p : shapes)
    if (p.second.rank != 0) sorted.push_back(p);
  std::stable_sort(sorted.begin(), sorted.end(), [](auto& a, auto& b) { return a.first.size() > b.first.size(); });
  bool ranks_given = true, alphas_given = true;
  for (const auto& [path, s] : sorted) {
    ranks_given = ranks_given && pattern_value<Index>(f.rank_pattern, path, f.r) == s.rank;
    alphas_given = alphas_given && pattern_value<double>(f.alpha_pattern, path, f.alpha) == s.alpha;
  }
  std::vector<std::pair<std::string, Index>> own_ranks;
  std::vector<std::pair<std::string, double>> own_alphas;
  for (const auto& [path, s] : sorted) {
    if (!ranks_given) own_ranks.emplace_back(regex_escape(path), s.rank);
    if (!alphas_given) own_alphas.emplace_back(regex_escape(path), s.alpha);
  }
  f.rank_pattern.insert(f.rank_pattern.begin(), own_ranks.begin(), own_ranks.end());
  f.alpha_pattern.insert(f.alpha_pattern.begin(), own_alphas.begin(), own_alphas.end());
  return f;
}

inline Json selector_json(const ModuleSelector& s) {
  if (s.is_regex()) return s.expression();
  if (s.empty()) return nullptr;
  return s.names();
}

/// Writes adapter_config.json and adapter_model.safetensors into `out`.
template <class MatrixType>
void write_peft_files(const AdapterSet<MatrixType>& set, const DirectoryWriter& out, const SaveOptions& options) {
  using Scalar = typename MatrixType::Scalar;
  if (set.size() == 0 && set.whole_modules().empty())
    throw ConfigError("peft::io::save_peft: the set has no adapter and no whole module");
  if (!is_float_dtype(options.dtype))
    throw ConfigError(std::string("peft::io::save_peft: dtype ") + dtype_name(options.dtype) +
                      " is not a floating type (F32, F64, F16, BF16)");
  // What each module is saved as; one kind of file for the set.
  std::vector<std::pair<std::string, SavedForm<Scalar>>> forms;
  std::vector<std::pair<std::string, LoRAShape>> shapes;
  bool ssf = false, lora = false, dora = false;
  for (const auto& l : set.layers()) {
    SavedForm<Scalar> f = l.adapter.saved_form();
    bool has_factors = false, has_magnitude = false, has_ssf = false;
    for (const auto& [name, m] : f.tensors) {
      has_factors |= name == "lora_A" || name == "lora_B";
      has_magnitude |= name == "lora_magnitude_vector";
      has_ssf |= name == "ssf_scale" || name == "ssf_shift";
    }
    (has_factors ? (has_magnitude ? dora : lora) : ssf) = true;
    if (!has_factors && !has_ssf)
      throw ConfigError("peft::io::save_peft: module \"" + l.path + "\" (" + l.adapter.class_name() +
                        ") has neither LoRA factors nor SSF's scale and shift: PEFT's format has no place for it");
    shapes.emplace_back(l.path, f.lora);
    forms.emplace_back(l.path, std::move(f));
  }
  if (int(ssf) + int(lora) + int(dora) > 1)
    throw ConfigError("peft::io::save_peft: the set mixes LoRA, DoRA and SSF modules; a PEFT directory holds one kind");

  // The fields, sorted by name as PEFT writes them (json.dumps(sort_keys=True)).
  std::map<std::string, Json> c;
  std::vector<std::string> paths, wholes;
  for (const auto& l : set.layers()) paths.push_back(l.path);
  for (const auto& w : set.whole_modules()) wholes.push_back(w.path);
  c["target_modules"] = set.selected_by_config() ? selector_json(set.config().target_modules)
                                                 : (paths.empty() ? Json() : Json(paths));
  c["exclude_modules"] = set.selected_by_config() ? selector_json(set.config().exclude_modules) : Json();
  c["base_model_name_or_path"] = options.base_model_name_or_path.empty() ? Json() : Json(options.base_model_name_or_path);
  c["bias"] = "none";
  c["inference_mode"] = true;
  c["modules_to_save"] = wholes.empty() ? Json() : Json(wholes);
  c["task_type"] = options.task_type.empty() ? Json() : Json(options.task_type);
  if (ssf) {
    c["peft_type"] = "SSF";
  } else {
    const LoRAFields f = lora_fields(set, shapes);
    Json rp = Json::object(), ap = Json::object();  // in the order matched: the first key that matches wins
    for (const auto& [k, v] : f.rank_pattern) rp[k] = v;
    for (const auto& [k, v] : f.alpha_pattern) ap[k] = v;
    c["alpha_pattern"] = ap;
    c["fan_in_fan_out"] = false;
    c["init_lora_weights"] = true;
    c["lora_alpha"] = f.alpha;
    c["lora_bias"] = false;
    c["lora_dropout"] = set.selected_by_config() ? set.config().dropout : 0.0;
    c["peft_type"] = "LORA";
    c["r"] = f.r;
    c["rank_pattern"] = rp;
    c["use_dora"] = dora;
    c["use_rslora"] = f.use_rslora;
  }
  Json config = Json::object();
  for (auto& [k, v] : c) config[k] = std::move(v);

  // The tensors, in path order as PEFT's state dicts are.
  std::vector<TensorSpec> specs;
  std::vector<const MatrixX<Scalar>*> data;
  for (const auto& [path, f] : forms)
    for (const auto& [name, m] : f.tensors) {
      const bool factor = name == "lora_A" || name == "lora_B";
      TensorSpec s{peft_key(path, name), options.dtype, {std::uint64_t(m.rows())}};
      if (factor || m.cols() != 1) s.shape.push_back(std::uint64_t(m.cols()));
      specs.push_back(std::move(s));
      data.push_back(&m);
    }
  std::vector<MatrixX<Scalar>> whole_data;  // whole modules, as d_out x d_in
  for (const auto& w : set.whole_modules()) {
    const auto& m = set.model().at(w.path);
    whole_data.emplace_back(*m.weight);
    if (m.bias) whole_data.emplace_back(*m.bias);
  }
  std::size_t k = 0;
  for (const auto& w : set.whole_modules()) {
    const auto& m = set.model().at(w.path);
    specs.push_back({"base_model.model." + w.path + ".weight", options.dtype,
                     {std::uint64_t(m.weight->rows()), std::uint64_t(m.weight->cols())}});
    data.push_back(&whole_data[k++]);
    if (m.bias) {
      specs.push_back({"base_model.model." + w.path + ".bias", options.dtype, {std::uint64_t(m.bias->size())}});
      data.push_back(&whole_data[k++]);
    }
  }
  std::vector<std::size_t> order(specs.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return specs[a].name < specs[b].name; });
  std::vector<TensorSpec> sorted_specs;
  for (std::size_t i : order) sorted_specs.push_back(specs[i]);
  SafetensorsWriter w(out.path("adapter_model.safetensors"), sorted_specs, Metadata{{"format", "pt"}});
  for (std::size_t i : order) w.write(specs[i].name, *data[i]);
  w.commit();
  out.write_text("adapter_config.json", config.dump(2) + "\n");
}

}  // namespace detail

/// \brief Saves `set` as a PEFT adapter directory `dir` (created with its parents, or replaced whole if
/// it holds only files peft writes): adapter_config.json and adapter_model.safetensors.
/// \throws ConfigError for a set PEFT's format cannot hold (mixed kinds, adapters without PEFT's
///         parameters, use_rslora differing between modules), FileError if the disk refuses. `dir` is
///         untouched then.
template <class MatrixType>
void save_peft(const AdapterSet<MatrixType>& set, const std::string& dir, const SaveOptions& options = SaveOptions()) {
  detail::DirectoryWriter out(dir);
  detail::write_peft_files(set, out, options);
  out.commit();
}

namespace detail {

/// The whole modules' tensors of a loaded directory, checked against the model before anything is written.
template <class MatrixType>
struct WholeLoad {
  std::string path;
  MatrixType weight;
  VectorX<typename MatrixType::Scalar> bias;
  bool has_bias = false;
};

template <class MatrixType>
std::vector<WholeLoad<MatrixType>> read_wholes(const SafetensorsView& file, const std::vector<SavedTensor>& saved,
                                               const ModelWeights<MatrixType>& model) {
  using Scalar = typename MatrixType::Scalar;
  std::vector<WholeLoad<MatrixType>> out;
  const auto fail = [&](const std::string& what) { throw FormatError("peft::io::load_peft: " + file.label() + ": " + what); };
  for (const SavedTensor& t : saved) {
    const bool weight = t.base_name.size() > 7 && t.base_name.compare(t.base_name.size() - 7, 7, ".weight") == 0;
    const bool bias = t.base_name.size() > 5 && t.base_name.compare(t.base_name.size() - 5, 5, ".bias") == 0;
    if (!weight && !bias) fail("modules_to_save tensor \"" + t.file_key + "\" is neither a weight nor a bias");
    const std::string path = t.base_name.substr(0, t.base_name.size() - (weight ? 7 : 5));
    const auto* m = model.find(path);
    if (!m) throw ConfigError("peft::io::load_peft: the adapter trains module \"" + path + "\" whole, but the model has no such module");
    auto it = std::find_if(out.begin(), out.end(), [&](const auto& w) { return w.path == path; });
    if (it == out.end()) {
      out.push_back({path, MatrixType(), VectorX<Scalar>(), false});
      it = out.end() - 1;
    }
    const MatrixX<Scalar> v = file.read<Scalar>(t.file_key);
    if (weight) {
      if (v.rows() != m->weight->rows() || v.cols() != m->weight->cols())
        throw ShapeError("peft::io::load_peft: \"" + t.file_key + "\" is " + std::to_string(v.rows()) + "x" +
                         std::to_string(v.cols()) + " but the model's \"" + path + "\" weight is " +
                         std::to_string(m->weight->rows()) + "x" + std::to_string(m->weight->cols()));
      it->weight = v;
    } else {
      if (!m->bias) throw ConfigError("peft::io::load_peft: \"" + t.file_key + "\" is a bias, but the model's \"" + path + "\" has none");
      if (v.size() != m->bias->size())
        throw ShapeError("peft::io::load_peft: \"" + t.file_key + "\" has " + std::to_string(v.size()) +
                         " entries but the model's \"" + path + "\" bias has " + std::to_string(m->bias->size()));
      it->bias = v.reshaped();
      it->has_bias = true;
    }
  }
  for (const auto& w : out)
    if (w.weight.size() == 0)
      fail("modules_to_save module \"" + w.path + "\" has no weight in the file");
  return out;
}

}  // namespace detail

/// \brief Loads a PEFT adapter directory `dir` (save_peft's, or Hugging Face PEFT's LoRA or DoRA; see
/// peft_adapter.hpp for what is read and refused) onto `model`: one LoRA, DoRA or SSF per module in the
/// file, with the file's values, rank and scale; the whole modules' tensors (modules_to_save) are copied
/// into the model's weights and those modules are trained whole in the returned set.
/// \throws FileError, FormatError for the files; ConfigError if a module of the file is not in the
///         model; ShapeError if a tensor does not fit its module. Everything is checked before any
///         weight of the model is written.
template <class MatrixType>
AdapterSet<MatrixType> load_peft(const std::string& dir, ModelWeights<MatrixType>& model) {
  using Scalar = typename MatrixType::Scalar;
  AdapterSet<MatrixType> set(model);
  const PeftAdapter<Scalar> adapter(dir);
  const PeftConfig& c = adapter.config();
  const auto at = [&](const std::string& path) -> const typename ModelWeights<MatrixType>::Module& {
    if (const auto* m = model.find(path)) return *m;
    throw ConfigError("peft::io::load_peft: the adapter has module \"" + path + "\", which the model does not have");
  };
  const peft::detail::Where where{"peft::io", "load_peft"};
  for (const PeftModule<Scalar>& m : adapter.modules()) {
    const auto& w = at(m.path);
    const std::string module = "module \"" + m.path + "\" ";
    if (c.peft_type == "SSF") {
      for (const auto* v : {&m.ssf_scale, &m.ssf_shift})
        if (v->size() != w.weight->rows())
          peft::detail::raise<ShapeError>(where, module, (v == &m.ssf_scale ? "ssf_scale" : "ssf_shift"), " has ",
                                          v->size(), " entries, expected d_out = ", w.weight->rows());
      SSFConfig cfg;
      cfg.init = SSFInit::identity;
      SSF<MatrixType> a = w.bias ? SSF<MatrixType>(*w.weight, *w.bias, cfg) : SSF<MatrixType>(*w.weight, cfg);
      a.scale().col(0) = m.ssf_scale;
      a.shift().col(0) = m.ssf_shift;
      set.insert(m.path, AnyAdapter<Scalar>(std::move(a)));
      continue;
    }
    // LoRA or DoRA as the module says (peft_load.hpp checks the shapes and refuses fan_in_fan_out).
    if (m.magnitude.size() != 0)
      set.insert(m.path, AnyAdapter<Scalar>(w.bias ? make_dora<MatrixType>(c, m, *w.weight, *w.bias)
                                                   : make_dora<MatrixType>(c, m, *w.weight)));
    else
      set.insert(m.path, AnyAdapter<Scalar>(w.bias ? make_lora<MatrixType>(c, m, *w.weight, *w.bias)
                                                   : make_lora<MatrixType>(c, m, *w.weight)));
  }
  std::vector<detail::WholeLoad<MatrixType>> wholes = detail::read_wholes(adapter.file(), adapter.saved_tensors(), model);
  for (const auto& w : wholes)
    if (set.find(w.path))
      throw ConfigError("peft::io::load_peft: module \"" + w.path + "\" is both adapted and in modules_to_save");
  // Checked: now the model's whole modules are written, and trained whole in the set.
  for (auto& w : wholes) {
    const auto& m = model.at(w.path);
    *m.weight = w.weight;
    if (w.has_bias) *m.bias = w.bias;
    set.train_whole(w.path);
  }
  return set;
}

namespace detail {

inline std::string exact_double(double v) {
  char buf[40];
  std::snprintf(buf, sizeof buf, "%.17g", v);
  return buf;
}

inline const std::string& meta_at(const Metadata& m, const std::string& key, const std::string& label) {
  const auto it = m.find(key);
  if (it == m.end()) throw FormatError("peft::io::load_checkpoint: " + label + ": no \"" + key + "\" in the metadata");
  return it->second;
}

inline std::int64_t meta_int(const Metadata& m, const std::string& key, const std::string& label) {
  const std::string& v = meta_at(m, key, label);
  char* end = nullptr;
  errno = 0;
  const long long x = std::strtoll(v.c_str(), &end, 10);
  if (v.empty() || *end != '\0' || errno != 0)
    throw FormatError("peft::io::load_checkpoint: " + label + ": \"" + key + "\" is \"" + v + "\", not an integer");
  return x;
}

}  // namespace detail

/// \brief Saves a training checkpoint in `dir`: the PEFT files of save_peft() (deployable as they are)
/// and `training_state.safetensors`, holding every parameter of the set in its own precision (tensor
/// "<parameter name>"), the optimizer's state buffers ("optimizer.<buffer>.<parameter name>"), and in
/// its metadata the optimizer's type, step count and learning rate, each parameter's step count,
/// each adapter's random stream ("rng.<path>"), and `user` (the caller's own entries, "user.<key>":
/// the epoch, the position in the data, ...). The directory is replaced whole, or not at all.
/// \throws as save_peft()
template <class MatrixType, class Optimizer>
void save_checkpoint(AdapterSet<MatrixType>& set, const Optimizer& optimizer, const std::string& dir,
                     const Metadata& user = {}, const SaveOptions& options = SaveOptions()) {
  using Scalar = typename MatrixType::Scalar;
  static_assert(std::is_same<typename Optimizer::Scalar, Scalar>::value, "the optimizer's Scalar must be the set's");
  detail::DirectoryWriter out(dir);
  detail::write_peft_files(set, out, options);
  const OptimizerState<Scalar> state = optimizer.state_dict();
  Metadata meta{{"format", "peft-training-state"},
                {"optimizer", state.optimizer},
                {"step_count", std::to_string(state.step_count)},
                {"lr", detail::exact_double(state.lr)}};
  for (const auto& s : state.slots) meta["steps." + s.name] = std::to_string(s.steps);
  for (const auto& l : set.layers())
    if (l.adapter.has_random_state()) meta["rng." + l.path] = l.adapter.random_state();
  for (const auto& [k, v] : user) meta["user." + k] = v;
  std::vector<std::pair<std::string, MatrixX<Scalar>>> tensors;
  for (const auto& p : set.parameters()) tensors.emplace_back(p.name, MatrixX<Scalar>(p.value));
  for (const auto& s : state.slots)
    for (std::size_t k = 0; k < s.buffers.size(); ++k)
      tensors.emplace_back("optimizer." + state.buffer_names[k] + "." + s.name,
                           Eigen::Map<const MatrixX<Scalar>>(s.buffers[k].data(), s.rows, s.cols));
  save_safetensors<Scalar>(out.path("training_state.safetensors"), tensors, dtype_of<Scalar>(), meta, false);
  out.commit();
}

/// \brief Restores a checkpoint of save_checkpoint() into `set` and `optimizer`, built as they were when
/// it was saved (the same config and base weights: the same modules, and the same parameters
/// registered in the optimizer): the parameters bit for bit, the optimizer's state and learning rate,
/// the adapters' random streams. A run continued from here is the uninterrupted run, bit for bit.
/// \returns the caller's metadata saved with it (the "user." entries, without the prefix)
/// \throws FileError, FormatError for the file (a parameter missing, of another shape or precision);
///         ConfigError if the optimizer's parameters are not the saved ones. Nothing is changed then.
template <class MatrixType, class Optimizer>
Metadata load_checkpoint(AdapterSet<MatrixType>& set, Optimizer& optimizer, const std::string& dir) {
  using Scalar = typename MatrixType::Scalar;
  const SafetensorsFile file(dir + "/training_state.safetensors");
  const SafetensorsView& f = file.view();
  const std::string& label = f.label();
  const auto fail = [&](const std::string& what) {
    throw FormatError("peft::io::load_checkpoint: " + label + ": " + what);
  };
  const Metadata& meta = f.metadata();
  if (detail::meta_at(meta, "format", label) != "peft-training-state") fail("not a peft training state");
  const auto read_exact = [&](const std::string& name, Index rows, Index cols) {
    const TensorInfo* t = f.find(name);
    if (!t) fail("no tensor \"" + name + "\"");
    if (t->dtype != dtype_of<Scalar>())
      fail("tensor \"" + name + "\" is " + dtype_name(t->dtype) + ", not the set's " + dtype_name(dtype_of<Scalar>()) +
           " (a checkpoint resumes in the precision it was saved in)");
    if (t->shape.size() != 2 || t->shape[0] != std::uint64_t(rows) || t->shape[1] != std::uint64_t(cols))
      fail("tensor \"" + name + "\" does not have the parameter's shape " + std::to_string(rows) + "x" + std::to_string(cols));
    return f.read<Scalar>(name);
  };
  // Everything is read and checked first.
  std::vector<MatrixX<Scalar>> values;
  auto params = set.parameters();
  for (const auto& p : params) values.push_back(read_exact(p.name, p.value.rows(), p.value.cols()));
  OptimizerState<Scalar> state = optimizer.state_dict();  // the registered layout, then the saved values
  if (detail::meta_at(meta, "optimizer", label) != state.optimizer)
    fail("saved by " + meta.at("optimizer") + ", not by " + state.optimizer);
  state.step_count = detail::meta_int(meta, "step_count", label);
  const std::string& lr = detail::meta_at(meta, "lr", label);
  char* end = nullptr;
  state.lr = std::strtod(lr.c_str(), &end);
  if (lr.empty() || *end != '\0') fail("\"lr\" is \"" + lr + "\", not a number");
  const auto saved_slots = std::count_if(meta.begin(), meta.end(), [](const auto& kv) { return kv.first.compare(0, 6, "steps.") == 0; });
  if (std::size_t(saved_slots) != state.slots.size())
    fail("it holds the optimizer state of " + std::to_string(saved_slots) + " parameters, but " +
         std::to_string(state.slots.size()) + " are registered");
  for (auto& s : state.slots) {
    s.steps = detail::meta_int(meta, "steps." + s.name, label);
    for (std::size_t k = 0; k < s.buffers.size(); ++k)
      s.buffers[k] = read_exact("optimizer." + state.buffer_names[k] + "." + s.name, s.rows, s.cols).reshaped();
  }
  std::vector<std::string> streams;
  for (const auto& l : set.layers()) {
    if (!l.adapter.has_random_state()) {
      streams.emplace_back();
      continue;
    }
    const std::string& s = detail::meta_at(meta, "rng." + l.path, label);
    try {
      Rng probe;
      probe.set_state(s);
    } catch (const std::invalid_argument&) {
      fail("\"rng." + l.path + "\" is not a random stream's state");
    }
    streams.push_back(s);
  }
  optimizer.load_state_dict(state);  // checks the names and shapes, then writes; nothing throws after it
  for (std::size_t i = 0; i < params.size(); ++i) params[i].value = values[i];
  for (std::size_t i = 0; i < set.layers().size(); ++i)
    if (!streams[i].empty()) set.layers()[i].adapter.set_random_state(streams[i]);
  Metadata out;
  for (const auto& [k, v] : meta)
    if (k.compare(0, 5, "user.") == 0) out[k.substr(5)] = v;
  return out;
}

}  // namespace io
}  // namespace peft
