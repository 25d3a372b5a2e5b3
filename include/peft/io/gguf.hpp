#pragma once
/// \file gguf.hpp
/// \brief Writing GGUF files (version 3), the format llama.cpp reads models and LoRA adapters from:
/// metadata key-value pairs and F32, F16 or BF16 tensors, streamed to a temporary and renamed into place
/// when complete. Needs Eigen and a POSIX system; no JSON (CMake target `peft::peft` is enough).
///
/// The format, little-endian throughout:
/// - header: the magic "GGUF", u32 version (3), u64 tensor count, u64 key-value count;
/// - each key-value pair: the key as a string (u64 length, then its bytes, no terminator), u32 value
///   type, then the value (strings as keys; an array as u32 element type, u64 count, the elements);
/// - each tensor's information: its name (a string of at most 63 bytes), u32 dimension count (1 to 4),
///   u64 extents ne[0..n) with ne[0] the contiguous one (a d_out x d_in row-major weight is
///   ne = [d_in, d_out]), u32 ggml type, u64 offset of its data from the start of the data section;
/// - padding to a multiple of the alignment (the u32 `general.alignment`, else 32), then the data section:
///   each tensor at its offset, a multiple of the alignment, zero padding in between and after the last.

#include "peft/core/config.hpp"  // first: the detail headers check for it
#include "peft/core/error.hpp"
#include "peft/core/types.hpp"
#include "peft/detail/staged_file.hpp"

#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <set>
#include <string>
#include <utility>
#include <vector>

namespace peft {
namespace io {

/// \brief The ggml tensor types this writer produces (their numbers in ggml's enum).
enum class GgufType : std::uint32_t { F32 = 0, F16 = 1, BF16 = 30 };

/// \returns "F32", "F16" or "BF16".
inline const char* gguf_type_name(GgufType t) {
  return t == GgufType::F32 ? "F32" : t == GgufType::F16 ? "F16" : "BF16";
}

/// \brief The metadata value types of GGUF (their numbers in the format).
enum class GgufValueType : std::uint32_t {
  UINT8 = 0, INT8 = 1, UINT16 = 2, INT16 = 3, UINT32 = 4, INT32 = 5, FLOAT32 = 6, BOOL = 7,
  STRING = 8, ARRAY = 9, UINT64 = 10, INT64 = 11, FLOAT64 = 12
};

/// \brief The longest tensor name ggml holds (GGML_MAX_NAME is 64, with the terminator).
constexpr std::size_t gguf_max_name = 63;

/// \brief Writes a GGUF v3 file: declare the metadata and every tensor (name, type, extents) first, then
/// write the tensors' values in the order declared, then commit(). The file is written to
/// `<path>.tmp-` plus six random characters and renamed over `path` by commit(); a writer destroyed before (an error, an
/// exception) removes it, and any file at `path` is untouched.
class GgufWriter {
 public:
  /// \param alignment of the data section and of each tensor: a power of two; written as
  /// `general.alignment` unless it is the default 32. \throws ConfigError for another alignment.
  explicit GgufWriter(std::string path, std::uint32_t alignment = 32) : path_(std::move(path)), alignment_(alignment) {
    if (alignment == 0 || (alignment & (alignment - 1)) != 0)
      throw ConfigError("peft::io::GgufWriter: the alignment " + std::to_string(alignment) + " is not a power of two");
    if (alignment != 32) set_u32("general.alignment", alignment);
  }

  /// \name Metadata, before the first tensor's values. \throws FormatError for an empty or repeated key.
  ///@{
  void set_string(const std::string& key, const std::string& value) {
    begin_value(key, GgufValueType::STRING);
    put_string(kv_, value);
  }
  void set_u32(const std::string& key, std::uint32_t value) {
    begin_value(key, GgufValueType::UINT32);
    put_le(kv_, value, 4);
  }
  void set_i32(const std::string& key, std::int32_t value) {
    begin_value(key, GgufValueType::INT32);
    put_le(kv_, std::uint32_t(value), 4);
  }
  void set_f32(const std::string& key, float value) {
    begin_value(key, GgufValueType::FLOAT32);
    std::uint32_t u;
    std::memcpy(&u, &value, 4);
    put_le(kv_, u, 4);
  }
  void set_bool(const std::string& key, bool value) {
    begin_value(key, GgufValueType::BOOL);
    kv_.push_back(char(value ? 1 : 0));
  }
  void set_strings(const std::string& key, const std::vector<std::string>& values) {
    begin_value(key, GgufValueType::ARRAY);
    put_le(kv_, std::uint32_t(GgufValueType::STRING), 4);
    put_le(kv_, values.size(), 8);
    for (const auto& v : values) put_string(kv_, v);
  }
  void set_f32s(const std::string& key, const std::vector<float>& values) {
    begin_value(key, GgufValueType::ARRAY);
    put_le(kv_, std::uint32_t(GgufValueType::FLOAT32), 4);
    put_le(kv_, values.size(), 8);
    for (float v : values) {
      std::uint32_t u;
      std::memcpy(&u, &v, 4);
      put_le(kv_, u, 4);
    }
  }
  void set_i32s(const std::string& key, const std::vector<std::int32_t>& values) {
    begin_value(key, GgufValueType::ARRAY);
    put_le(kv_, std::uint32_t(GgufValueType::INT32), 4);
    put_le(kv_, values.size(), 8);
    for (std::int32_t v : values) put_le(kv_, std::uint32_t(v), 4);
  }
  ///@}

  /// \brief Declares the next tensor: `ne` as ggml counts it (ne[0] contiguous; 1 to 4 extents).
  /// \throws FormatError for an empty, repeated or too long name, a bad extent count, or a size that
  /// overflows.
  void add_tensor(const std::string& name, GgufType type, std::vector<std::uint64_t> ne) {
    if (header_written_) fail("tensor \"" + name + "\" declared after the first tensor's values");
    if (name.empty() || name.size() > gguf_max_name || names_.count(name) != 0)
      fail("cannot write a tensor named \"" + name + "\" (empty, repeated, or longer than " +
           std::to_string(gguf_max_name) + " bytes)");
    if (ne.empty() || ne.size() > 4) fail("tensor \"" + name + "\" has " + std::to_string(ne.size()) + " extents, not 1 to 4");
    const std::uint64_t size = type == GgufType::F32 ? 4 : 2;
    std::uint64_t bytes = size;
    for (auto d : ne) {
      if (d == 0 || bytes > std::numeric_limits<std::uint64_t>::max() / 2 / d)
        fail("tensor \"" + name + "\" has a zero extent or a byte count that overflows");
      bytes *= d;
    }
    names_.insert(name);
    Tensor t{name, type, std::move(ne), next_offset_, bytes};
    next_offset_ = padded(next_offset_ + bytes);
    tensors_.push_back(std::move(t));
  }

  /// \brief Writes the values of the next declared tensor, `name`, from `m`: m.cols() must be ne[0] and
  /// m.rows() the product of the other extents (a d_out x d_in weight for ne = [d_in, d_out]), converted
  /// to the tensor's type (F16 and BF16 round to nearest even).
  /// \throws FormatError if `name` is not the next tensor or the shape does not fit.
  template <class Derived>
  void write(const std::string& name, const Eigen::MatrixBase<Derived>& m) {
    if (!header_written_) write_header();
    if (current_ >= tensors_.size() || tensors_[current_].name != name)
      fail("tensor \"" + name + "\" written out of order (next is \"" +
           (current_ < tensors_.size() ? tensors_[current_].name : std::string("none")) + "\")");
    const Tensor& t = tensors_[current_];
    std::uint64_t rows = 1;
    for (std::size_t i = 1; i < t.ne.size(); ++i) rows *= t.ne[i];
    if (std::uint64_t(m.cols()) != t.ne[0] || std::uint64_t(m.rows()) != rows)
      fail("tensor \"" + name + "\" is given " + std::to_string(m.rows()) + "x" + std::to_string(m.cols()) +
           " values for extents " + extents(t));
    pad_to(t.offset);
    const detail::Encoding e = t.type == GgufType::F32   ? detail::Encoding::F32
                               : t.type == GgufType::F16 ? detail::Encoding::F16
                                                         : detail::Encoding::BF16;
    detail::encode_row_major(e, m, [this](const unsigned char* p, std::size_t n) { file_->put(p, n); });
    ++current_;
  }

  /// \brief Pads after the last tensor, flushes, syncs and renames the temporary over `path`.
  /// \throws FormatError if tensors are missing, FileError if the disk refuses.
  void commit() {
    if (!header_written_) write_header();
    if (current_ < tensors_.size()) fail("tensor \"" + tensors_[current_].name + "\" not written before commit()");
    pad_to(next_offset_);
    file_->commit();
  }

  /// \returns the bytes the file will have.
  std::uint64_t file_size() const { return padded(header_size()) + next_offset_; }

 private:
  struct Tensor {
    std::string name;
    GgufType type;
    std::vector<std::uint64_t> ne;
    std::uint64_t offset, bytes;
  };

  static std::string extents(const Tensor& t) {
    std::string s = "[";
    for (std::size_t i = 0; i < t.ne.size(); ++i) s += (i ? ", " : "") + std::to_string(t.ne[i]);
    return s + "]";
  }

  [[noreturn]] void fail(const std::string& what) const { throw FormatError("peft::io: " + path_ + ": " + what); }

  static void put_le(std::string& out, std::uint64_t v, int bytes) {
    for (int i = 0; i < bytes; ++i) out.push_back(char((v >> (8 * i)) & 0xff));
  }
  static void put_string(std::string& out, const std::string& s) {
    put_le(out, s.size(), 8);
    out += s;
  }

  void begin_value(const std::string& key, GgufValueType type) {
    if (header_written_) fail("metadata \"" + key + "\" set after the first tensor's values");
    if (key.empty() || !keys_.insert(key).second) fail("cannot write a metadata key \"" + key + "\" (empty or repeated)");
    put_string(kv_, key);
    put_le(kv_, std::uint32_t(type), 4);
    ++kv_count_;
  }

  std::uint64_t padded(std::uint64_t n) const { return (n + alignment_ - 1) / alignment_ * alignment_; }

  std::string tensor_infos() const {
    std::string out;
    for (const Tensor& t : tensors_) {
      put_string(out, t.name);
      put_le(out, t.ne.size(), 4);
      for (auto d : t.ne) put_le(out, d, 8);
      put_le(out, std::uint32_t(t.type), 4);
      put_le(out, t.offset, 8);
    }
    return out;
  }

  std::uint64_t header_size() const { return 4 + 4 + 8 + 8 + kv_.size() + tensor_infos().size(); }

  void write_header() {
    std::string head = "GGUF";
    put_le(head, 3, 4);
    put_le(head, tensors_.size(), 8);
    put_le(head, kv_count_, 8);
    head += kv_;
    head += tensor_infos();
    head.append(std::size_t(padded(head.size()) - head.size()), '\0');
    file_ = std::make_unique<detail::StagedFile>(path_);
    file_->put(head.data(), head.size());
    data_start_ = head.size();
    header_written_ = true;
  }

  /// Zero bytes up to `offset` in the data section.
  void pad_to(std::uint64_t offset) {
    static const char zeros[64] = {};
    std::uint64_t at = file_->size() - data_start_;
    while (at < offset) {
      const std::size_t n = std::size_t(std::min<std::uint64_t>(sizeof zeros, offset - at));
      file_->put(zeros, n);
      at += n;
    }
  }

  std::string path_;
  std::uint32_t alignment_;
  std::string kv_;
  std::uint64_t kv_count_ = 0;
  std::set<std::string> keys_, names_;
  std::vector<Tensor> tensors_;
  std::uint64_t next_offset_ = 0, data_start_ = 0;
  std::size_t current_ = 0;
  bool header_written_ = false;
  std::unique_ptr<detail::StagedFile> file_;
};

}  // namespace io
}  // namespace peft
