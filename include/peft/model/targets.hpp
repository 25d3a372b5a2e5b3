#pragma once
/// \file targets.hpp
/// \brief Which modules of a model get an adapter, matched as Hugging Face PEFT matches them:
/// `target_modules` and `exclude_modules` as a list of names or one regular expression, and the
/// per-module `rank_pattern` and `alpha_pattern` keys (README, "Whole models").

#include "peft/core/error.hpp"
#include "peft/core/types.hpp"

#include <initializer_list>
#include <regex>
#include <string>
#include <utility>
#include <vector>

namespace peft {

/// \brief The longest regular expression accepted as a pattern key or a target expression: std::regex
/// matches recursively, so a hostile expression of thousands of characters could exhaust the stack.
constexpr std::size_t max_pattern_length = 256;

namespace detail {

/// \returns `text` compiled as an ECMAScript regular expression. \throws ConfigError if it is longer than
/// max_pattern_length or invalid, naming `what` ("target_modules", "rank_pattern key") and the text.
inline std::regex compile_pattern(const std::string& text, const char* what,
                                  std::size_t limit = max_pattern_length) {
  if (text.size() > limit)
    throw ConfigError(std::string("peft: ") + what + " \"" + text.substr(0, 40) + "...\" is longer than " +
                      std::to_string(limit) + " characters");
  try {
    return std::regex(text, std::regex::ECMAScript);
  } catch (const std::regex_error& e) {
    throw ConfigError(std::string("peft: ") + what + " \"" + text + "\" is not a valid regular expression: " + e.what());
  }
}

/// \returns whether `path` is `name` or ends with "." + name.
inline bool is_dot_suffix(const std::string& path, const std::string& name) {
  if (name.empty() || name.size() > path.size()) return false;
  if (path.compare(path.size() - name.size(), name.size(), name) != 0) return false;
  return path.size() == name.size() || path[path.size() - name.size() - 1] == '.';
}

}  // namespace detail

/// \returns whether the `rank_pattern` / `alpha_pattern` key `key` (a regular expression) names the
/// module at `path`, as PEFT matches them: `(.*\.)?(key)` against the whole path, so "q_proj" names
/// "layers.0.q_proj" and "layers\.0\.q_proj" only that one. \throws ConfigError for an invalid key.
inline bool pattern_key_matches(const std::string& key, const std::string& path) {
  detail::compile_pattern(key, "pattern key");  // its length and syntax, reported with the key as written
  return std::regex_match(path, detail::compile_pattern("(.*\\.)?(" + key + ")", "pattern key", max_pattern_length + 16));
}

/// \brief A set of module paths as PEFT's `target_modules` and `exclude_modules` give them: either a
/// list of names, each matching the path equal to it or ending with "." + it ("q_proj" matches
/// "layers.0.attn.q_proj", not "layers.0.attn.xq_proj"), or one regular expression that must match the
/// whole path (Python's `re.fullmatch`).
class ModuleSelector {
 public:
  /// Selects nothing.
  ModuleSelector() = default;
  /// \brief A list of names (matched as the whole path or a suffix at a dot boundary).
  /// \throws ConfigError for an empty name.
  ModuleSelector(std::vector<std::string> names) : names_(std::move(names)) {  // NOLINT: implicit, as PEFT's list
    for (const std::string& n : names_)
      if (n.empty()) throw ConfigError("peft::ModuleSelector: an empty module name");
  }
  ModuleSelector(std::initializer_list<std::string> names) : ModuleSelector(std::vector<std::string>(names)) {}
  /// \brief One regular expression matched against the whole path. \throws ConfigError if invalid.
  static ModuleSelector regex(std::string expression) {
    ModuleSelector s;
    s.compiled_ = detail::compile_pattern(expression, "module regular expression");
    s.regex_ = std::move(expression);
    s.is_regex_ = true;
    return s;
  }

  /// \returns whether it selects nothing (an empty list).
  bool empty() const { return !is_regex_ && names_.empty(); }
  /// \returns whether it is a regular expression (else a list of names).
  bool is_regex() const { return is_regex_; }
  /// \returns the names of a list selector.
  const std::vector<std::string>& names() const { return names_; }
  /// \returns the expression of a regex selector.
  const std::string& expression() const { return regex_; }

  /// \returns whether the module at `path` is selected.
  bool matches(const std::string& path) const {
    if (is_regex_) return std::regex_match(path, compiled_);
    for (const std::string& n : names_)
      if (detail::is_dot_suffix(path, n)) return true;
    return false;
  }

 private:
  std::vector<std::string> names_;
  std::string regex_;
  std::regex compiled_;
  bool is_regex_ = false;
};

}  // namespace peft
