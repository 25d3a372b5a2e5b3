#pragma once
// Catch2 2.x / 3.x shim: the tests use only what both provide (TEST_CASE, SECTION, TEMPLATE_TEST_CASE,
// REQUIRE, REQUIRE_THROWS_AS, REQUIRE_THAT with WithinAbs / WithinRel / Contains).
#if defined(PEFT_CATCH2_MAJOR) && PEFT_CATCH2_MAJOR >= 3
#include <catch2/catch_all.hpp>
#else
#include <catch2/catch.hpp>
#endif

using Catch::Matchers::WithinAbs;
using Catch::Matchers::WithinRel;
