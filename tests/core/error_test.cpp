// The exception hierarchy: each error is a peft::Error and the standard exception that fits it.
#include "support/catch.hpp"

#include <peft/core/error.hpp>

#include <stdexcept>
#include <string>
#include <type_traits>

TEST_CASE("each error is a peft::Error and the fitting standard exception") {
  static_assert(std::is_base_of<peft::Error, peft::ShapeError>::value, "");
  static_assert(std::is_base_of<std::invalid_argument, peft::ShapeError>::value, "");
  static_assert(std::is_base_of<std::invalid_argument, peft::ConfigError>::value, "");
  static_assert(std::is_base_of<std::runtime_error, peft::StateError>::value, "");
  static_assert(std::is_base_of<std::runtime_error, peft::NumericalError>::value, "");
  static_assert(std::is_base_of<peft::Error, peft::CommError>::value, "");
  static_assert(std::is_base_of<std::runtime_error, peft::CommError>::value, "");

  REQUIRE_THROWS_AS(peft::detail::raise<peft::ShapeError>(peft::detail::Where{"peft::X", "f"}, "bad"), peft::Error);
  REQUIRE_THROWS_AS(peft::detail::raise<peft::ConfigError>(peft::detail::Where{"peft::X", "f"}, "bad"), std::invalid_argument);
  REQUIRE_THROWS_AS(peft::detail::raise<peft::StateError>(peft::detail::Where{"peft::X", "f"}, "bad"), std::runtime_error);
  REQUIRE_THROWS_AS(peft::detail::raise<peft::NumericalError>(peft::detail::Where{"peft::X", "f"}, "bad"), peft::NumericalError);
  REQUIRE_THROWS_AS(peft::detail::raise<peft::CommError>(peft::detail::Where{"peft::X", "f"}, "bad"), peft::Error);
}

TEST_CASE("error messages name the place and the values") {
  try {
    peft::detail::check_shape(peft::detail::Where{"peft::LoRA", "backward"}, "dY", 64L, 31L, 64L, 32L);
    FAIL("check_shape did not throw");
  } catch (const peft::Error& e) {
    REQUIRE(std::string(e.what()) == "peft::LoRA::backward: dY is 64x31, expected 64x32");
  }
  REQUIRE_NOTHROW(peft::detail::check_shape(peft::detail::Where{"peft::X", "f"}, "X", 3L, 4L, 3L, 4L));
}
