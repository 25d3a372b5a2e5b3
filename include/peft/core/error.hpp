#pragma once
/// \file error.hpp
/// \brief The exception hierarchy: every error the library throws is a peft::Error.
///
/// `Error` is a mix-in, so each concrete error is also the standard exception that fits it:
/// catch `peft::Error` for all of them, `peft::ShapeError` for one kind, or `std::invalid_argument` /
/// `std::runtime_error` from generic code.
///
///   | class            | also a                  | thrown for                                            |
///   |------------------|-------------------------|-------------------------------------------------------|
///   | `ShapeError`     | `std::invalid_argument` | W, b, X, dY of the wrong shape                         |
///   | `ConfigError`    | `std::invalid_argument` | rank 0, alpha <= 0 or not finite, dropout not in [0,1) |
///   | `StateError`     | `std::runtime_error`    | merge twice, unmerge unmerged, backward while merged, a foreign or stale cache |
///   | `NumericalError` | `std::runtime_error`    | a merge or unmerge that would write a non-finite value |
///   | `FormatError`    | `std::runtime_error`    | a malformed, hostile or unsupported file (io/): names the file and the entry |
///   | `FileError`      | `std::runtime_error`    | a file that cannot be opened, mapped, written or renamed (io/) |
///   | `CommError`      | `std::runtime_error`    | an MPI call that failed (distributed/): names the call and MPI's reason |
///
/// Every check is always on (never `assert`), and an operation that throws leaves the user's weights
/// untouched (strong guarantee).

#include "peft/core/config.hpp"

#include <ostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace peft {

/// \brief Base of every exception this library throws.
class Error {
 public:
  /// \returns the message: "peft::<Class>::<operation>: <what is wrong>".
  virtual const char* what() const noexcept = 0;

 protected:
  Error() = default;
  Error(const Error&) = default;
  Error& operator=(const Error&) = default;
  virtual ~Error() = default;
};

/// \brief A matrix of the wrong shape: W, b, X, dY, or a parameter.
class ShapeError : public std::invalid_argument, public Error {
 public:
  explicit ShapeError(const std::string& msg) : std::invalid_argument(msg) {}
  const char* what() const noexcept override { return std::invalid_argument::what(); }
};

/// \brief An invalid configuration value.
class ConfigError : public std::invalid_argument, public Error {
 public:
  explicit ConfigError(const std::string& msg) : std::invalid_argument(msg) {}
  const char* what() const noexcept override { return std::invalid_argument::what(); }
};

/// \brief An operation not allowed in the adapter's current state (merged or not), or a cache that
/// does not belong to this adapter's current state.
class StateError : public std::runtime_error, public Error {
 public:
  explicit StateError(const std::string& msg) : std::runtime_error(msg) {}
  const char* what() const noexcept override { return std::runtime_error::what(); }
};

/// \brief An operation that would produce a non-finite value, or divide by a value too small.
class NumericalError : public std::runtime_error, public Error {
 public:
  explicit NumericalError(const std::string& msg) : std::runtime_error(msg) {}
  const char* what() const noexcept override { return std::runtime_error::what(); }
};

/// \brief A file whose contents are malformed, inconsistent, or use a feature the library does not
/// implement. The message names the file and the tensor or field.
class FormatError : public std::runtime_error, public Error {
 public:
  explicit FormatError(const std::string& msg) : std::runtime_error(msg) {}
  const char* what() const noexcept override { return std::runtime_error::what(); }
};

/// \brief A file the operating system will not open, map, write or rename (the message carries its
/// reason).
class FileError : public std::runtime_error, public Error {
 public:
  explicit FileError(const std::string& msg) : std::runtime_error(msg) {}
  const char* what() const noexcept override { return std::runtime_error::what(); }
};

/// \brief A communication call (MPI, peft/distributed/mpi.hpp) that failed: the message names the call
/// and carries MPI's own error string.
class CommError : public std::runtime_error, public Error {
 public:
  explicit CommError(const std::string& msg) : std::runtime_error(msg) {}
  const char* what() const noexcept override { return std::runtime_error::what(); }
};

namespace detail {

/// \brief Where an error happened: "peft::LoRA" and "backward" print as "peft::LoRA::backward".
/// Two pointers to string literals, so checks on hot paths build no string unless they throw.
struct Where {
  const char* cls;
  const char* op;
};

inline std::ostream& operator<<(std::ostream& os, const Where& w) { return os << w.cls << "::" << w.op; }

/// Builds "<where>: <parts...>" with operator<<.
template <class... Parts>
std::string message(const Where& where, const Parts&... parts) {
  std::ostringstream os;
  os << where << ": ";
  (os << ... << parts);
  return os.str();
}

/// Throws E with the message built from the parts. Cold and out of the hot path's way.
template <class E, class... Parts>
[[noreturn]] PEFT_COLD void raise(const Where& where, const Parts&... parts) {
  throw E(message(where, parts...));
}

/// Throws ShapeError ("<where>: <what> is RxC, expected R'xC'") unless the shapes agree.
template <class I>
void check_shape(const Where& where, const char* what, I rows, I cols, I want_rows, I want_cols) {
  if (rows != want_rows || cols != want_cols)
    raise<ShapeError>(where, what, " is ", rows, "x", cols, ", expected ", want_rows, "x", want_cols);
}

}  // namespace detail
}  // namespace peft
