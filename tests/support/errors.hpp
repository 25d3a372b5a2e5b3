#pragma once
// Helpers for error tests: the message an operation throws, and bitwise equality (NaN-safe), for
// "W is untouched" checks.
#include <peft/core/error.hpp>

#include <cstring>
#include <string>

namespace peft::test {

/// \returns what() of the peft::Error that fn throws, or "" if it throws none.
template <class Fn>
std::string message_of(Fn fn) {
  try {
    fn();
  } catch (const peft::Error& e) {
    return e.what();
  }
  return "";
}

/// \returns whether two dense matrices have the same shape and the same bytes (NaN equals NaN).
template <class A, class B>
bool same_bits(const A& a, const B& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         (a.size() == 0 ||  // an empty matrix's data() may be null, which memcmp must not be given
          std::memcmp(a.data(), b.data(), sizeof(typename A::Scalar) * static_cast<std::size_t>(a.size())) == 0);
}

}  // namespace peft::test
