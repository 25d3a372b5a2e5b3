#pragma once
/// \file staged_file.hpp
/// \brief What the safetensors and GGUF writers share: a file written in full beside its destination
/// and renamed over it only when complete, so that an error never leaves a half-written file where a
/// good one was; and the little-endian encoding of a matrix's values. Needs a POSIX system; no JSON.

#include "peft/detail/internal_header_check.hpp"

#include "peft/core/error.hpp"
#include "peft/core/types.hpp"
#include "peft/core/half.hpp"

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>

#include <sys/stat.h>
#include <unistd.h>

namespace peft {
namespace io {
namespace detail {

/// \brief `<path>.tmp-` plus six characters mkstemp picks (so two writers never share one), buffered, mode 0644. commit()
/// flushes, syncs and renames it over `path`; destroyed before that (an error, an exception), it removes
/// the temporary and any file at `path` is untouched.
class StagedFile {
 public:
  /// \throws FileError if the temporary cannot be created.
  explicit StagedFile(std::string path) : path_(std::move(path)) {
    std::string pattern = path_ + ".tmp-" + std::string(6, 'X');  // mkstemp fills in the six
    const int fd = ::mkstemp(pattern.data());
    if (fd < 0) throw FileError("peft::io: cannot create a temporary beside " + path_ + ": " + std::strerror(errno));
    ::fchmod(fd, 0644);
    tmp_ = pattern;
    file_ = ::fdopen(fd, "wb");
    if (!file_) {
      const int err = errno;
      ::close(fd);
      std::remove(tmp_.c_str());
      throw FileError("peft::io: cannot open " + tmp_ + ": " + std::strerror(err));
    }
    std::setvbuf(file_, nullptr, _IOFBF, 1 << 20);
  }
  StagedFile(const StagedFile&) = delete;
  StagedFile& operator=(const StagedFile&) = delete;
  ~StagedFile() {
    if (file_) {
      std::fclose(file_);
      std::remove(tmp_.c_str());
    }
  }

  const std::string& path() const { return path_; }
  const std::string& temporary() const { return tmp_; }
  /// \returns whether commit() has not run yet.
  bool open() const { return file_ != nullptr; }
  /// \returns the stream (for fflush and fileno, as copy_file_range needs).
  std::FILE* stream() const { return file_; }
  /// \returns the bytes put so far.
  std::uint64_t size() const { return size_; }

  /// \brief Appends `n` bytes. \throws StateError after commit(), FileError if the disk refuses.
  void put(const void* p, std::size_t n) {
    if (!file_) throw StateError("peft::io: " + path_ + ": written after commit()");
    if (n > 0 && std::fwrite(p, 1, n, file_) != n) fail("cannot write");
    size_ += n;
  }
  /// \brief Counts `n` bytes written to the descriptor directly (copy_file_range), after a flush.
  void count(std::uint64_t n) { size_ += n; }

  /// \brief Flushes, syncs, closes and renames the temporary over the destination.
  /// \throws StateError after a commit(), FileError if the disk refuses (the temporary is then removed).
  void commit() {
    if (!file_) throw StateError("peft::io: " + path_ + ": commit() after commit() or a failed commit()");
    if (std::fflush(file_) != 0 || ::fsync(::fileno(file_)) != 0) fail("cannot write");
    const int closed = std::fclose(file_);
    file_ = nullptr;
    if (closed != 0) {
      const int err = errno;
      std::remove(tmp_.c_str());
      throw FileError("peft::io: cannot write " + tmp_ + ": " + std::strerror(err));
    }
    if (std::rename(tmp_.c_str(), path_.c_str()) != 0) {
      const int err = errno;
      std::remove(tmp_.c_str());
      throw FileError("peft::io: cannot rename " + tmp_ + " to " + path_ + ": " + std::strerror(err));
    }
  }

  /// \throws FileError naming the temporary and errno's reason.
  [[noreturn]] void fail(const char* what) const {
    const int err = errno;
    throw FileError("peft::io: " + std::string(what) + " " + tmp_ + ": " + std::strerror(err));
  }

 private:
  std::string path_, tmp_;
  std::FILE* file_ = nullptr;
  std::uint64_t size_ = 0;
};

/// \brief A floating value encoding of the file formats (little-endian; F16 and BF16 round to nearest
/// even, as PyTorch does).
enum class Encoding { F32, F64, F16, BF16 };

/// \brief Encodes the values of `m` in row-major order and hands them to `write(bytes, n)` in chunks.
template <class Derived, class Write>
void encode_row_major(Encoding e, const Eigen::MatrixBase<Derived>& m, Write&& write) {
  using S = typename Derived::Scalar;
  const std::size_t size = e == Encoding::F64 ? 8 : e == Encoding::F32 ? 4 : 2;
  if constexpr (bool(Eigen::internal::traits<Derived>::Flags & Eigen::DirectAccessBit) && Derived::IsRowMajor &&
                (std::is_same<S, float>::value || std::is_same<S, double>::value)) {
    // A contiguous row-major matrix of the encoding's own type is written as it is stored.
    if (size == sizeof(S) && m.size() > 0 && m.innerStride() == 1 && m.outerStride() == m.cols()) {
      write(reinterpret_cast<const unsigned char*>(m.derived().data()), std::size_t(m.size()) * sizeof(S));
      return;
    }
  }
  if (m.size() == 0) return;
  unsigned char chunk[1 << 14];
  std::size_t used = 0;
  for (Index i = 0; i < m.rows(); ++i)
    for (Index j = 0; j < m.cols(); ++j) {
      const double v = double(m(i, j));
      unsigned char* o = chunk + used;
      if (e == Encoding::F64) {
        std::memcpy(o, &v, 8);
      } else if (e == Encoding::F32) {
        const std::uint32_t u = bits_from_float(float(v));
        std::memcpy(o, &u, 4);
      } else {
        const std::uint16_t h = e == Encoding::F16 ? float_to_f16(float(v)) : float_to_bf16(float(v));
        o[0] = static_cast<unsigned char>(h & 0xff);
        o[1] = static_cast<unsigned char>(h >> 8);
      }
      used += size;
      if (used + 8 > sizeof chunk) {
        write(chunk, used);
        used = 0;
      }
    }
  write(chunk, used);
}

}  // namespace detail
}  // namespace io
}  // namespace peft
