#pragma once
/// \file targets.hpp
/// \brief Which modules of a model get an adapter, matched as Hugging Face PEFT matches them:
/// `target_modules` and `exclude_modules` as a list of names or one regular expression, and the
/// per-module `rank_pattern` and `alpha_pattern` keys (docs/whole-models.md, Choosing modules).

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

/// \brief The most unbounded repetitions (`*`, `+`, `{n,}`) one expression may hold: std::regex matches by
/// backtracking, in time that grows as the path's length to the power of their number.
constexpr int max_pattern_repeats = 3;

namespace detail {

/// \brief Refuses what makes a backtracking matcher take exponential time, or polynomial time of a high
/// degree, on a module path: a repetition of a repetition (`a**`, `a+*`: "multiple repeat", which
/// Python's `re`, and so PEFT, refuses too; a lazy `*?` is fine), a repeated group that repeats inside
/// (`(a*)*`, `(a|b+)+`; an optional one, `(a*)?`, is fine), and more than `max_repeats` unbounded
/// repetitions. Module keys and
/// target expressions in real configs need none of these.
/// \throws ConfigError naming `what`, the text and the reason.
inline void check_pattern_cost(const std::string& text, const char* what, int max_repeats = max_pattern_repeats) {
  const auto refuse = [&](const std::string& why) {
    throw ConfigError(std::string("peft: ") + what + " \"" + text.substr(0, 60) + "\" " + why +
                      " (matching it could take exponential time)");
  };
  // The length of a quantifier at i (0 if none): *, +, ?, {n}, {n,}, {n,m}; `unbounded` tells *, +, {n,}.
  const auto quantifier = [&](std::size_t i, bool& unbounded) -> std::size_t {
    unbounded = false;
    if (i >= text.size()) return 0;
    if (text[i] == '*' || text[i] == '+') {
      unbounded = true;
      return 1;
    }
    if (text[i] == '?') return 1;
    if (text[i] != '{') return 0;
    std::size_t j = i + 1;
    const std::size_t digits = j;
    while (j < text.size() && text[j] >= '0' && text[j] <= '9') ++j;
    // libstdc++ reads a count into a long without checking it (undefined behaviour past 2^63).
    if (j - digits > 4) refuse("has a repetition count of more than four digits");
    if (j == digits) return 0;
    if (j < text.size() && text[j] == ',') {
      ++j;
      const std::size_t upper = j;
      while (j < text.size() && text[j] >= '0' && text[j] <= '9') ++j;
      if (j - upper > 4) refuse("has a repetition count of more than four digits");
      unbounded = j == upper;
    }
    return (j < text.size() && text[j] == '}') ? j + 1 - i : 0;
  };
  // A back-reference's number is read the same way: `\` and at most four digits.
  const auto escaped_digits = [&](std::size_t j) {
    const std::size_t from = j;
    while (j < text.size() && text[j] >= '0' && text[j] <= '9') ++j;
    if (j - from > 4) refuse("has a back-reference number of more than four digits");
  };
  std::vector<bool> group_repeats;  // per open group: whether a repetition occurs inside it
  int unbounded_count = 0;
  bool atom_repeats = false;        // whether the atom just closed (a group) repeats inside
  std::size_t i = 0;
  while (i < text.size()) {
    const char c = text[i];
    bool unbounded = false;
    if (const std::size_t q = quantifier(i, unbounded)) {
      if (atom_repeats && text[i] != '?') refuse("repeats a group that itself repeats");
      unbounded_count += unbounded;
      if (unbounded_count > max_repeats)
        refuse("has more than " + std::to_string(max_repeats) + " unbounded repetitions (*, +, {n,})");
      for (std::size_t k = 0; k < group_repeats.size(); ++k) group_repeats[k] = true;
      i += q;
      if (i < text.size() && text[i] == '?') ++i;  // lazy
      bool again = false;
      if (quantifier(i, again)) refuse("repeats a repetition (multiple repeat)");
      atom_repeats = false;
      continue;
    }
    atom_repeats = false;
    if (c == '\\') {
      escaped_digits(i + 1);
      i += 2;
    } else if (c == '[') {  // a character class, to its closing bracket
      ++i;
      if (i < text.size() && text[i] == '^') ++i;
      if (i < text.size() && text[i] == ']') ++i;
      while (i < text.size() && text[i] != ']') {
        if (text[i] == '\\') escaped_digits(i + 1);
        i += text[i] == '\\' ? 2 : 1;
      }
      ++i;
    } else if (c == '(') {
      group_repeats.push_back(false);
      ++i;
    } else if (c == ')') {
      if (!group_repeats.empty()) {
        atom_repeats = group_repeats.back();
        group_repeats.pop_back();
        if (atom_repeats && !group_repeats.empty()) group_repeats.back() = true;
      }
      ++i;
    } else {
      ++i;
    }
  }
}

/// \returns `text` compiled as an ECMAScript regular expression. \throws ConfigError if it is longer than
/// max_pattern_length, too costly to match (check_pattern_cost) or invalid, naming `what`
/// ("target_modules", "rank_pattern key") and the text.
inline std::regex compile_pattern(const std::string& text, const char* what,
                                  std::size_t limit = max_pattern_length, int max_repeats = max_pattern_repeats) {
  if (text.size() > limit)
    throw ConfigError(std::string("peft: ") + what + " \"" + text.substr(0, 40) + "...\" is longer than " +
                      std::to_string(limit) + " characters");
  check_pattern_cost(text, what, max_repeats);
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
  return std::regex_match(path, detail::compile_pattern("(.*\\.)?(" + key + ")", "pattern key", max_pattern_length + 16,
                                                        max_pattern_repeats + 1));
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
