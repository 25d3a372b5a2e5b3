#pragma once
// What peft/detail/internal_header_check.hpp looks for: a public peft header came first.
#define PEFT_CORE_CONFIG_INCLUDED
/// \file config.hpp
/// \brief Compiler portability macros. Every macro of the library is prefixed `PEFT_`.

#if defined(__GNUC__) || defined(__clang__)
/// Marks a function as rarely called (error paths) and keeps it out of line.
#define PEFT_COLD __attribute__((cold, noinline))
/// Keeps a large function (a kernel) out of line: inlined into each caller, its code would be compiled
/// again at every call site.
#define PEFT_NOINLINE __attribute__((noinline))
/// The loops of the exact restore (detail/exact_restore.hpp): vectorised (GCC's -O2 would not, its cost
/// model needing known trip counts) and never contracted into fused multiply-adds, so that a merge and
/// its unmerge round every element alike. Clang contracts only within a statement (its default), which
/// those loops never offer.
#if defined(__GNUC__) && !defined(__clang__)
#define PEFT_EXACT_LOOPS __attribute__((optimize("fp-contract=off", "vect-cost-model=dynamic")))
#else
#define PEFT_EXACT_LOOPS
#endif
#elif defined(_MSC_VER)
#define PEFT_COLD __declspec(noinline)
#define PEFT_NOINLINE __declspec(noinline)
#else
#define PEFT_COLD
#define PEFT_NOINLINE
#endif
#ifndef PEFT_EXACT_LOOPS
#define PEFT_EXACT_LOOPS
#endif
