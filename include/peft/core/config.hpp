#pragma once
/// \file config.hpp
/// \brief Compiler portability macros. Every macro of the library is prefixed `PEFT_`.

#if defined(__GNUC__) || defined(__clang__)
/// Marks a function as rarely called (error paths) and keeps it out of line.
#define PEFT_COLD __attribute__((cold, noinline))
/// Keeps a large function (a kernel) out of line: inlined into each caller, its code would be compiled
/// again at every call site.
#define PEFT_NOINLINE __attribute__((noinline))
#elif defined(_MSC_VER)
#define PEFT_COLD __declspec(noinline)
#define PEFT_NOINLINE __declspec(noinline)
#else
#define PEFT_COLD
#define PEFT_NOINLINE
#endif
