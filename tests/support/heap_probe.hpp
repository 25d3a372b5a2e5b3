#pragma once
// The largest single heap allocation made while a piece of code runs. malloc, calloc and realloc are
// interposed (glibc exports its own as __libc_*); Eigen allocates through std::malloc, and operator new
// ends in malloc too. Include this header in exactly one translation unit of an executable: it defines
// those functions. Under a sanitizer (which interposes them itself) or without glibc, nothing is
// tracked and heap_probe_available is false.
#include <atomic>
#include <cstddef>

#if defined(__has_feature)  // clang says so here (GCC defines __SANITIZE_ADDRESS__ / __SANITIZE_THREAD__)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer) || __has_feature(memory_sanitizer)
#define PEFT_HEAP_PROBE_OFF 1
#endif
#endif
#if defined(__GLIBC__) && !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__) && \
    !defined(PEFT_HEAP_PROBE_OFF)
#define PEFT_HEAP_PROBE 1
extern "C" void* __libc_malloc(std::size_t size);
extern "C" void* __libc_calloc(std::size_t count, std::size_t size);
extern "C" void* __libc_realloc(void* ptr, std::size_t size);

namespace peft::test::heap_detail {
inline std::atomic<bool> tracking{false};
inline std::atomic<std::size_t> largest{0};

inline void note(std::size_t size) {
  if (!tracking.load(std::memory_order_relaxed)) return;
  std::size_t seen = largest.load(std::memory_order_relaxed);
  while (size > seen && !largest.compare_exchange_weak(seen, size, std::memory_order_relaxed)) {
  }
}
}  // namespace peft::test::heap_detail

extern "C" void* malloc(std::size_t size) noexcept {
  peft::test::heap_detail::note(size);
  return __libc_malloc(size);
}
extern "C" void* calloc(std::size_t count, std::size_t size) noexcept {
  peft::test::heap_detail::note(count * size);
  return __libc_calloc(count, size);
}
extern "C" void* realloc(void* ptr, std::size_t size) noexcept {
  peft::test::heap_detail::note(size);
  return __libc_realloc(ptr, size);
}
#endif

namespace peft::test {

#ifdef PEFT_HEAP_PROBE
inline constexpr bool heap_probe_available = true;
#else
inline constexpr bool heap_probe_available = false;
#endif

/// \returns the largest single heap allocation (bytes) made while `fn` runs (0 if none), or -1 where
/// allocations are not tracked (heap_probe_available is false).
template <class Fn>
double largest_allocation(Fn&& fn) {
#ifdef PEFT_HEAP_PROBE
  heap_detail::largest.store(0);
  heap_detail::tracking.store(true);
  fn();
  heap_detail::tracking.store(false);
  return static_cast<double>(heap_detail::largest.load());
#else
  fn();
  return -1.0;
#endif
}

}  // namespace peft::test
