#pragma once
/// \file config.hpp
/// \brief Compiler portability macros. Every macro of the library is prefixed `PEFT_`.

#if defined(__GNUC__) || defined(__clang__)
/// Marks a function as rarely called (error paths) and keeps it out of line.
#define PEFT_COLD __attribute__((cold, noinline))
#elif defined(_MSC_VER)
#define PEFT_COLD __declspec(noinline)
#else
#define PEFT_COLD
#endif
