#pragma once
/// \file peft_adapter.hpp
/// \brief Reading a Hugging Face PEFT adapter directory (`adapter_config.json` and
/// `adapter_model.safetensors`) as PEFT writes it for LoRA and DoRA, and building the library's adapters
/// from it. Needs nlohmann-json (CMake target `peft::io`).
///
/// What is read:
/// - the config fields that change the arithmetic: `peft_type` ("LORA"), `r`, `lora_alpha`,
///   `use_rslora`, `use_dora`, `rank_pattern` and `alpha_pattern` (a key, as a regular expression, must
///   match the end of the module path at a dot boundary, as PEFT's `get_pattern_key` matches; the first
///   matching key in the file's order wins), `fan_in_fan_out`, `bias`, `modules_to_save`;
/// - per module path P (the key without PEFT's `base_model.model.` prefix): `P.lora_A.weight` (r x d_in),
///   `P.lora_B.weight` (d_out x r) and, for DoRA, `P.lora_magnitude_vector` (d_out; older files add
///   `.weight`); keys that still carry an adapter name (`P.lora_A.default.weight`) are read too;
/// - for this library's own `peft_type` "SSF" (peft/io/adapter_set_io.hpp writes it; PEFT has no SSF):
///   `P.ssf_scale` and `P.ssf_shift` (d_out each);
/// - every other tensor under a module named in `modules_to_save` (`P.weight`, `P.bias`; older files
///   `P.modules_to_save.<name>.weight`): whole tensors that replace the base's.
/// Refused, with a FormatError naming the field and why: another `peft_type`; `bias` other than "none"
/// (the file would carry base biases we do not apply); `lora_bias`; `layer_replication`;
/// `target_parameters`; `trainable_token_indices`; `megatron_config`; an `init_lora_weights` that
/// changes the base (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA, MiCA) saved without PEFT's conversion, whose
/// adapter belongs to a residual base rather than the file's; LoRA on embeddings or convolutions; a
/// tensor the reader does not recognise. Unknown fields that do not change the arithmetic are ignored.

#include "peft/core/error.hpp"
#include "peft/core/types.hpp"
#include "peft/io/safetensors.hpp"
#include "peft/model/targets.hpp"

#include <nlohmann/json.hpp>

#include <cmath>
#include <fstream>
#include <map>
#include <regex>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace peft {
namespace io {

/// \brief The arithmetic of a PEFT LoRA config (`adapter_config.json`).
struct PeftConfig {
  std::string peft_type = "LORA";  ///< "LORA", or "SSF" (this library's own, save_peft's)
  Index r = 8;
  double lora_alpha = 8;
  bool use_rslora = false;
  bool use_dora = false;
  bool fan_in_fan_out = false;
  std::vector<std::pair<std::string, Index>> rank_pattern;    ///< in the file's order
  std::vector<std::pair<std::string, double>> alpha_pattern;  ///< in the file's order
  std::vector<std::string> modules_to_save;
  std::string base_model_name_or_path;

  /// \returns the rank of the module at `path` (rank_pattern, else r).
  Index rank_for(const std::string& path) const;
  /// \returns the alpha of the module at `path` (alpha_pattern, else lora_alpha).
  double alpha_for(const std::string& path) const;
  /// \returns the scale s of the module at `path`: alpha / rank, or alpha / √rank with rsLoRA.
  double scale_for(const std::string& path) const {
    const double a = alpha_for(path);
    const double r = double(rank_for(path));
    return use_rslora ? a / std::sqrt(r) : a / r;
  }
};

/// \returns whether `key` (a regular expression) names the module at `path` as PEFT matches pattern keys:
/// `(.*\.)?(key)$` from the start of the path (peft::pattern_key_matches). \throws FormatError for an
/// invalid expression or one longer than peft::max_pattern_length.
inline bool pattern_matches(const std::string& key, const std::string& path) {
  try {
    return pattern_key_matches(key, path);
  } catch (const ConfigError& e) {
    const std::string what = e.what();  // "peft: pattern key ..."
    throw FormatError("peft::io: " + (what.compare(0, 6, "peft: ") == 0 ? what.substr(6) : what));
  }
}

inline Index PeftConfig::rank_for(const std::string& path) const {
  for (const auto& [key, value] : rank_pattern)
    if (pattern_matches(key, path)) return value;
  return r;
}

inline double PeftConfig::alpha_for(const std::string& path) const {
  for (const auto& [key, value] : alpha_pattern)
    if (pattern_matches(key, path)) return value;
  return lora_alpha;
}

namespace detail {

using Json = nlohmann::ordered_json;

/// \returns a rank read from JSON: a positive integer (possibly written as 4.0) of at most 2^30, or 0 when
/// the value is none of that (no conversion of an out-of-range number, which would be undefined).
inline Index rank_value(const Json& v) {
  constexpr double limit = double(Index(1) << 30);
  if (v.is_number_unsigned()) return v.get<std::uint64_t>() <= std::uint64_t(limit) ? Index(v.get<std::uint64_t>()) : 0;
  if (v.is_number_integer()) return 0;  // negative
  if (v.is_number_float()) {
    const double x = v.get<double>();
    return (x >= 1 && x <= limit && x == std::floor(x)) ? Index(x) : 0;
  }
  return 0;
}

/// \returns `text` parsed as a JSON object. \throws FormatError naming `label` (the file) otherwise.
inline Json parse_json_object(const std::string& text, const std::string& label) {
  Json j;
  try {
    j = Json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    throw FormatError("peft::io: " + label + ": not valid JSON: " + e.what());
  }
  if (!j.is_object()) throw FormatError("peft::io: " + label + ": not a JSON object");
  return j;
}

inline bool is_set(const Json& j, const char* field) {
  const auto it = j.find(field);
  if (it == j.end() || it->is_null()) return false;
  if (it->is_boolean()) return it->get<bool>();
  if (it->is_array() || it->is_object() || it->is_string()) return !it->empty();
  return true;
}

}  // namespace detail

/// \brief Parses the text of an `adapter_config.json`. \param label the file's name, for messages.
/// \throws FormatError for malformed JSON, a missing or invalid field, or a refused one (see the file
/// comment).
inline PeftConfig parse_peft_config(const std::string& text, const std::string& label) {
  using detail::Json;
  const auto fail = [&](const std::string& what) -> void { throw FormatError("peft::io: " + label + ": " + what); };
  Json j = detail::parse_json_object(text, label);
  PeftConfig c;
  try {
    const std::string type = j.value("peft_type", std::string());
    if (type != "LORA" && type != "SSF")
      fail("peft_type is \"" + type + "\": only LORA adapters (with use_dora for DoRA) and this library's SSF are read");
    c.peft_type = type;
    if (j.contains("r")) {
      c.r = detail::rank_value(j["r"]);
      if (c.r <= 0) fail("r is " + j["r"].dump() + ", not a positive integer of at most 2^30");
    }
    c.lora_alpha = j.value("lora_alpha", 8.0);
    if (!std::isfinite(c.lora_alpha)) fail("lora_alpha is not finite");
    c.use_rslora = j.value("use_rslora", false);
    c.use_dora = j.value("use_dora", false);
    c.fan_in_fan_out = j.value("fan_in_fan_out", false);
    c.base_model_name_or_path = j.contains("base_model_name_or_path") && j["base_model_name_or_path"].is_string()
                                    ? j["base_model_name_or_path"].get<std::string>()
                                    : std::string();
    for (const char* field : {"rank_pattern", "alpha_pattern"}) {
      const auto it = j.find(field);
      if (it == j.end() || it->is_null()) continue;
      if (!it->is_object()) fail(std::string(field) + " is not an object");
      for (auto p = it->begin(); p != it->end(); ++p) {
        if (!p.value().is_number()) fail(std::string(field) + "[\"" + p.key() + "\"] is not a number");
        pattern_matches(p.key(), "");  // a bad expression is reported now, naming it
        if (field[0] == 'r') {
          const Index rank = detail::rank_value(p.value());
          if (rank <= 0) fail("rank_pattern[\"" + p.key() + "\"] is not a positive integer of at most 2^30");
          c.rank_pattern.emplace_back(p.key(), rank);
        } else {
          c.alpha_pattern.emplace_back(p.key(), p.value().get<double>());
        }
      }
    }
    if (j.contains("modules_to_save") && !j["modules_to_save"].is_null())
      for (const auto& m : j["modules_to_save"]) c.modules_to_save.push_back(m.get<std::string>());

    // What we do not implement is refused, naming the field.
    const std::string bias = j.value("bias", std::string("none"));
    if (bias != "none")
      fail("bias is \"" + bias + "\": the adapter then carries trained base biases, which this reader does not apply");
    if (detail::is_set(j, "lora_bias")) fail("lora_bias is set: a bias on lora_B is not implemented");
    if (detail::is_set(j, "layer_replication"))
      fail("layer_replication is set: the adapted model has layers the base does not; not implemented");
    if (detail::is_set(j, "target_parameters"))
      fail("target_parameters is set: LoRA on bare parameters (not linear modules) is not implemented");
    if (detail::is_set(j, "trainable_token_indices"))
      fail("trainable_token_indices is set: trained embedding rows are not implemented");
    if (detail::is_set(j, "megatron_config")) fail("megatron_config is set: Megatron layers are not implemented");
    if (j.contains("init_lora_weights") && j["init_lora_weights"].is_string()) {
      const std::string init = j["init_lora_weights"].get<std::string>();
      if (init != "gaussian" && init != "eva" && init != "orthogonal")
        fail("init_lora_weights is \"" + init +
             "\": this initialisation changes the base weight, so the adapter belongs to that residual base, not "
             "to the model it names; convert it with PEFT (save_pretrained with "
             "path_initial_model_for_weight_conversion) to a plain LoRA first");
    }
  } catch (const nlohmann::json::exception& e) {
    fail(std::string("a field has the wrong type: ") + e.what());
  }
  return c;
}

/// \brief One adapted module: its path, factors, and (DoRA) magnitude, as in the file.
template <class S>
struct PeftModule {
  std::string path;  ///< e.g. "model.layers.0.self_attn.q_proj"
  MatrixX<S> A;      ///< r x d_in
  MatrixX<S> B;      ///< d_out x r
  VectorX<S> magnitude;  ///< d_out for DoRA, empty for LoRA
  double scale = 1;      ///< alpha / r or alpha / √r for this module
  VectorX<S> ssf_scale;  ///< SSF (peft_type "SSF"): γ, d_out; A and B are empty then
  VectorX<S> ssf_shift;  ///< SSF: β, d_out
};

/// \brief A whole tensor the adapter carries in place of the base's (`modules_to_save`).
struct SavedTensor {
  std::string base_name;  ///< the base model's tensor it replaces, e.g. "score.weight"
  std::string file_key;   ///< its key in adapter_model.safetensors
};

/// \brief A PEFT adapter directory, read and validated. The factors are converted to S; the
/// `modules_to_save` tensors stay in the (memory-mapped) file, to be copied bit for bit.
template <class S>
class PeftAdapter {
 public:
  /// \throws FileError if a file is missing, FormatError for anything malformed or refused.
  explicit PeftAdapter(const std::string& dir)
      : config_(read_config(dir + "/adapter_config.json")), file_(dir + "/adapter_model.safetensors") {
    classify();
  }

  const PeftConfig& config() const { return config_; }
  const std::vector<PeftModule<S>>& modules() const { return modules_; }
  const std::vector<SavedTensor>& saved_tensors() const { return saved_; }
  const SafetensorsView& file() const { return file_.view(); }

  /// \returns the module at `path`, or nullptr.
  const PeftModule<S>* find(const std::string& path) const {
    for (const auto& m : modules_)
      if (m.path == path) return &m;
    return nullptr;
  }

 private:
  static PeftConfig read_config(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw FileError("peft::io: cannot open " + path);
    std::ostringstream text;
    text << in.rdbuf();
    return parse_peft_config(text.str(), path);
  }

  [[noreturn]] void fail(const std::string& what) const {
    throw FormatError("peft::io: " + file_.view().label() + ": " + what);
  }

  void classify() {
    static const std::string prefix = "base_model.model.";
    struct Parts {
      std::string A, B, magnitude, scale, shift;
    };
    const bool ssf = config_.peft_type == "SSF";
    std::map<std::string, Parts> found;  // by module path, in path order
    for (const TensorInfo& t : file_.view().tensors()) {
      std::string key = t.name;
      if (key.compare(0, prefix.size(), prefix) == 0) key = key.substr(prefix.size());
      // A saved module: under a path named in modules_to_save (PEFT matches the name as a suffix at a
      // dot boundary).
      if (const std::string base = saved_base_name(key); !base.empty()) {
        saved_.push_back({base, t.name});
        continue;
      }
      const auto part = [&](const std::string& marker) -> std::string {  // the module path, or ""
        const auto at = key.find(marker);
        if (at == std::string::npos || at == 0) return {};
        const std::string tail = key.substr(at + marker.size());
        // ".weight", "" (magnitude), or ".<adapter name>.weight" / ".<adapter name>"
        if (tail.empty() || tail == ".weight") return key.substr(0, at);
        if (tail[0] == '.' && tail.find('.', 1) == std::string::npos) return key.substr(0, at);
        if (tail[0] == '.' && tail.size() > 7 && tail.compare(tail.size() - 7, 7, ".weight") == 0 &&
            tail.find('.', 1) == tail.size() - 7)
          return key.substr(0, at);
        return {};
      };
      if (key.find(".lora_embedding_") != std::string::npos)
        fail("tensor \"" + t.name + "\": LoRA on an embedding is not implemented");
      if (key.find(".lora_B.") != std::string::npos && key.size() > 5 && key.compare(key.size() - 5, 5, ".bias") == 0)
        fail("tensor \"" + t.name + "\": a bias on lora_B (lora_bias) is not implemented");
      if (std::string p = part(".lora_A"); !p.empty() && key.compare(key.size() - 7, 7, ".weight") == 0) {
        found[p].A = t.name;
      } else if (std::string q = part(".lora_B"); !q.empty() && key.compare(key.size() - 7, 7, ".weight") == 0) {
        found[q].B = t.name;
      } else if (std::string m = part(".lora_magnitude_vector"); !m.empty()) {
        found[m].magnitude = t.name;
      } else if (ssf && key.size() > 10 && key.compare(key.size() - 10, 10, ".ssf_scale") == 0) {
        found[key.substr(0, key.size() - 10)].scale = t.name;
      } else if (ssf && key.size() > 10 && key.compare(key.size() - 10, 10, ".ssf_shift") == 0) {
        found[key.substr(0, key.size() - 10)].shift = t.name;
      } else {
        fail("tensor \"" + t.name + "\" is neither a LoRA factor, a DoRA magnitude, nor under modules_to_save");
      }
    }
    const SafetensorsView& f = file_.view();
    for (const auto& [path, parts] : found) {
      if (ssf) {
        if (!parts.A.empty() || !parts.B.empty() || !parts.magnitude.empty())
          fail("module \"" + path + "\" has LoRA tensors in an SSF adapter");
        if (parts.scale.empty() || parts.shift.empty())
          fail("module \"" + path + "\" has " + (parts.scale.empty() ? "no ssf_scale" : "no ssf_shift"));
        PeftModule<S> m;
        m.path = path;
        for (const std::string* name : {&parts.scale, &parts.shift})
          if (f.at(*name).shape.size() != 1)
            fail("tensor \"" + *name + "\" is not a vector");
        m.ssf_scale = f.read<S>(parts.scale).reshaped();
        m.ssf_shift = f.read<S>(parts.shift).reshaped();
        if (m.ssf_scale.size() != m.ssf_shift.size())
          fail("module \"" + path + "\": ssf_scale and ssf_shift differ in length");
        modules_.push_back(std::move(m));
        continue;
      }
      if (!parts.scale.empty() || !parts.shift.empty())
        fail("module \"" + path + "\" has SSF tensors in a LORA adapter");
      if (parts.A.empty() || parts.B.empty())
        fail("module \"" + path + "\" has " + (parts.A.empty() ? "no lora_A" : "no lora_B"));
      if (config_.use_dora != !parts.magnitude.empty())
        fail("module \"" + path + "\" " +
             (config_.use_dora ? "has no lora_magnitude_vector, but use_dora is set"
                               : "has a lora_magnitude_vector, but use_dora is not set"));
      for (const std::string* name : {&parts.A, &parts.B})
        if (f.at(*name).shape.size() != 2)
          fail("tensor \"" + *name + "\" has " + std::to_string(f.at(*name).shape.size()) +
               " dimensions: LoRA on a convolution is not implemented");
      PeftModule<S> m;
      m.path = path;
      m.A = f.read<S>(parts.A);
      m.B = f.read<S>(parts.B);
      if (m.A.rows() != m.B.cols())
        fail("module \"" + path + "\": lora_A is " + std::to_string(m.A.rows()) + "x" + std::to_string(m.A.cols()) +
             " but lora_B is " + std::to_string(m.B.rows()) + "x" + std::to_string(m.B.cols()));
      const Index rank = config_.rank_for(path);
      if (m.A.rows() != rank)
        fail("module \"" + path + "\" has rank " + std::to_string(m.A.rows()) + " in the file, but the config gives " +
             std::to_string(rank) + " (r, rank_pattern)");
      if (!parts.magnitude.empty()) {
        const TensorInfo& mt = f.at(parts.magnitude);
        if (mt.elements() != std::uint64_t(m.B.rows()))
          fail("module \"" + path + "\": lora_magnitude_vector has " + std::to_string(mt.elements()) +
               " entries for " + std::to_string(m.B.rows()) + " output units");
        m.magnitude = f.read<S>(parts.magnitude).reshaped();
      }
      m.scale = config_.scale_for(path);
      modules_.push_back(std::move(m));
    }
    if (modules_.empty()) fail(ssf ? "no SSF tensors (ssf_scale, ssf_shift) in the file" : "no LoRA factors (lora_A, lora_B) in the file");
  }

  /// \returns the base tensor name a key under modules_to_save replaces, or "" when it is not under one.
  std::string saved_base_name(const std::string& key) const {
    for (const std::string& name : config_.modules_to_save) {
      // The module path ends with the name at a dot boundary: "score" matches "score.weight" and
      // "model.score.weight", not "myscore.weight".
      std::size_t at = 0;
      while ((at = key.find(name, at)) != std::string::npos) {
        const std::size_t end = at + name.size();
        const bool starts = at == 0 || key[at - 1] == '.';
        if (starts && end < key.size() && key[end] == '.') {
          std::string rest = key.substr(end + 1);  // "weight", or "modules_to_save.<adapter>.weight"
          static const std::string wrapper = "modules_to_save.";
          if (rest.compare(0, wrapper.size(), wrapper) == 0) {
            rest = rest.substr(wrapper.size());
            const auto dot = rest.find('.');
            if (dot == std::string::npos) return {};
            rest = rest.substr(dot + 1);
          }
          if (rest.find(".lora_") != std::string::npos || rest.compare(0, 5, "lora_") == 0) return {};
          return key.substr(0, end + 1) + rest;
        }
        at = end;
      }
    }
    return {};
  }

  PeftConfig config_;
  SafetensorsFile file_;
  std::vector<PeftModule<S>> modules_;
  std::vector<SavedTensor> saved_;
};

}  // namespace io
}  // namespace peft
