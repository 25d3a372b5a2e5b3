#pragma once
/// \file version.hpp
/// \brief The library's version: the single source of truth, parsed by CMake.

#define PEFT_VERSION_MAJOR 0
#define PEFT_VERSION_MINOR 1
#define PEFT_VERSION_PATCH 0

/// \brief The version as one integer: major * 10000 + minor * 100 + patch.
#define PEFT_VERSION (PEFT_VERSION_MAJOR * 10000 + PEFT_VERSION_MINOR * 100 + PEFT_VERSION_PATCH)

namespace peft {
/// \brief The version as a string, "major.minor.patch".
inline constexpr const char* version_string = "0.1.0";
}  // namespace peft
