#pragma once
#include <string>
// Catch2 2.x / 3.x shim: the tests use only what both provide (TEST_CASE, SECTION, TEMPLATE_TEST_CASE,
// REQUIRE, REQUIRE_THROWS_AS, REQUIRE_THAT with WithinAbs / WithinRel / Contains).
#if defined(PEFT_CATCH2_MAJOR) && PEFT_CATCH2_MAJOR >= 3
#include <catch2/catch_all.hpp>
#else
#include <catch2/catch.hpp>
#endif

using Catch::Matchers::WithinAbs;
using Catch::Matchers::WithinRel;

namespace peft::test {
/// Matches a string containing `s` (Catch2 2's Contains, Catch2 3's ContainsSubstring).
inline auto has_substring(const std::string& s) {
#if defined(PEFT_CATCH2_MAJOR) && PEFT_CATCH2_MAJOR >= 3
  return Catch::Matchers::ContainsSubstring(s);
#else
  return Catch::Matchers::Contains(s);
#endif
}
}  // namespace peft::test
