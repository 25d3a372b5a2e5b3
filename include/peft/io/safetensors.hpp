#pragma once
/// \file safetensors.hpp
/// \brief Reading and writing safetensors files: memory-mapped and validated on read, streamed to a
/// temporary and renamed on write. Needs nlohmann-json (CMake target `peft::io`) and a POSIX system.
///
/// The format: 8 bytes, a little-endian u64 N; N bytes of JSON, an object mapping each tensor name to
/// `{"dtype", "shape", "data_offsets": [begin, end]}` (offsets into the byte buffer that follows) plus an
/// optional `"__metadata__"` object of string to string; then the byte buffer. Tensors are stored in
/// row-major (C) order, little-endian.
///
/// Reading validates as strictly as the reference implementation (huggingface/safetensors): the header
/// at most 100 MB and inside the file; a JSON object (no duplicate keys at any level, at most three
/// levels deep); known dtypes; shape products without overflow; each tensor's byte count equal to its
/// element count × dtype size; offsets inside the buffer, in order without overlap and covering it
/// exactly. Every failure is a peft::FormatError naming the file and the tensor; no allocation is sized
/// by a field before it is checked against the file's size.
///
/// Values: `read<S>` converts F32, F64, F16 and BF16 into float or double (F16 and BF16 widen exactly;
/// F64 into float rounds to nearest). `view<S>` maps a tensor of S's own dtype without a copy, valid
/// while the file is open. The writer converts to F32, F64, F16 or BF16 (half.hpp: rounding to nearest
/// even, as PyTorch does).

#include "peft/core/config.hpp"  // first: the detail headers check for it
#include "peft/core/error.hpp"
#include "peft/core/types.hpp"
#include "peft/detail/staged_file.hpp"
#include "peft/core/half.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

namespace peft {
namespace io {

/// \brief A safetensors dtype. Every dtype of the reference implementation whose elements are whole
/// bytes can be read, copied and written as bytes; F32, F64, F16 and BF16 also convert to values.
enum class Dtype { BOOL, U8, I8, F8_E5M2, F8_E4M3, F8_E8M0, I16, U16, F16, BF16, I32, U32, F32, I64, U64, F64, C64 };

/// \returns the dtype's name as the format spells it ("F32").
inline const char* dtype_name(Dtype d) {
  static constexpr const char* names[] = {"BOOL", "U8",  "I8",  "F8_E5M2", "F8_E4M3", "F8_E8M0",
                                          "I16",  "U16", "F16", "BF16",    "I32",     "U32",
                                          "F32",  "I64", "U64", "F64",     "C64"};
  return names[int(d)];
}

/// \returns the size of one element of the dtype, in bytes.
inline std::size_t dtype_size(Dtype d) {
  switch (d) {
    case Dtype::BOOL: case Dtype::U8: case Dtype::I8: case Dtype::F8_E5M2: case Dtype::F8_E4M3:
    case Dtype::F8_E8M0:
      return 1;
    case Dtype::I16: case Dtype::U16: case Dtype::F16: case Dtype::BF16:
      return 2;
    case Dtype::I32: case Dtype::U32: case Dtype::F32:
      return 4;
    case Dtype::I64: case Dtype::U64: case Dtype::F64: case Dtype::C64:
      return 8;
  }
  return 0;
}

/// \returns the dtype named `name`, or nothing.
inline std::optional<Dtype> dtype_from_name(std::string_view name) {
  for (int i = 0; i <= int(Dtype::C64); ++i)
    if (name == dtype_name(Dtype(i))) return Dtype(i);
  return std::nullopt;
}

/// \returns whether read<S>() converts the dtype to values.
inline bool is_float_dtype(Dtype d) { return d == Dtype::F32 || d == Dtype::F64 || d == Dtype::F16 || d == Dtype::BF16; }

/// \brief The dtype that holds S exactly (F32 for float, F64 for double).
template <class S>
constexpr Dtype dtype_of() {
  static_assert(std::is_same<S, float>::value || std::is_same<S, double>::value, "float or double");
  return std::is_same<S, float>::value ? Dtype::F32 : Dtype::F64;
}

/// \brief One tensor of a file: its name, dtype, shape and place in the byte buffer.
struct TensorInfo {
  std::string name;
  Dtype dtype = Dtype::F32;
  std::vector<std::uint64_t> shape;
  std::uint64_t begin = 0, end = 0;  ///< offsets into the byte buffer
  /// \returns the number of elements (the product of the shape; 1 for a scalar).
  std::uint64_t elements() const {
    std::uint64_t n = 1;
    for (auto d : shape) n *= d;  // checked against overflow when the header was parsed
    return n;
  }
};

/// \brief Metadata: the `__metadata__` object, string to string.
using Metadata = std::map<std::string, std::string>;

/// \brief The largest header the reference implementation reads (100 MB).
constexpr std::uint64_t max_header_bytes = 100'000'000;

namespace detail {

[[noreturn]] inline void format_error(const std::string& file, const std::string& what) {
  throw FormatError("peft::io: " + file + ": " + what);
}

inline std::uint64_t read_u64_le(const unsigned char* p) {
  std::uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

inline std::uint64_t checked_u64(const nlohmann::ordered_json& j, const std::string& file, const std::string& what) {
  if (!j.is_number_unsigned() && !(j.is_number_integer() && j.get<std::int64_t>() >= 0))
    format_error(file, what + " is not a non-negative integer");
  return j.get<std::uint64_t>();
}

}  // namespace detail

/// \brief A parsed and validated header: the tensors in the file's order, the metadata, and where the
/// byte buffer starts and how long it is.
struct Header {
  std::vector<TensorInfo> tensors;
  Metadata metadata;
  std::uint64_t buffer_offset = 0;  ///< 8 + N
  std::uint64_t buffer_size = 0;
};

/// \brief Parses and validates the header of a safetensors file held in `bytes` (the whole file, or at
/// least its first 8 + N bytes when `file_size` gives the whole file's size).
/// \param label the file's name, for messages.
/// \throws FormatError naming the file and, where one is at fault, the tensor.
inline Header parse_header(const unsigned char* bytes, std::size_t available, std::uint64_t file_size,
                           const std::string& label) {
  using Json = nlohmann::ordered_json;
  if (file_size < 8 || available < 8) detail::format_error(label, "shorter than the 8-byte header length");
  const std::uint64_t n = detail::read_u64_le(bytes);
  if (n > max_header_bytes)
    detail::format_error(label, "header length " + std::to_string(n) + " exceeds the format's limit of 100 MB");
  if (n > file_size - 8)
    detail::format_error(label, "header length " + std::to_string(n) + " runs past the end of the file (" +
                                    std::to_string(file_size) + " bytes)");
  if (n > available - 8) detail::format_error(label, "header not in the bytes given");
  const char* text = reinterpret_cast<const char*>(bytes + 8);
  if (n == 0 || text[0] != '{') detail::format_error(label, "header does not start with '{' (not a JSON object)");
  if (std::memchr(text, 0, std::size_t(n)) != nullptr)
    detail::format_error(label, "header contains a NUL byte (JSON has none; the JSON parser would stop there)");

  // Duplicate keys at any level and nesting deeper than the format's (object > entry > shape) are
  // refused while parsing: nlohmann would keep the last of two equal keys silently.
  std::vector<std::vector<std::string>> keys;
  std::string entry;  // the top-level key being parsed, for messages
  const auto in_entry = [&] { return entry.empty() ? std::string() : " (in the entry of \"" + entry + "\")"; };
  const auto callback = [&](int depth, Json::parse_event_t event, Json& parsed) {
    switch (event) {
      case Json::parse_event_t::object_start:
      case Json::parse_event_t::array_start:
        if (depth > 2) detail::format_error(label, "header nests deeper than the format allows" + in_entry());
        if (event == Json::parse_event_t::object_start) keys.emplace_back();
        break;
      case Json::parse_event_t::key: {
        auto& seen = keys.back();
        const auto& key = parsed.get_ref<const std::string&>();
        if (std::find(seen.begin(), seen.end(), key) != seen.end())
          detail::format_error(label, "duplicate key \"" + key + "\" in the header" + (depth == 1 ? std::string() : in_entry()));
        if (depth == 1) entry = key;
        seen.push_back(key);
        break;
      }
      case Json::parse_event_t::object_end:
        keys.pop_back();
        break;
      default:
        break;
    }
    return true;
  };
  Json j;
  try {
    j = Json::parse(text, text + n, callback);
  } catch (const nlohmann::json::exception& e) {
    detail::format_error(label, std::string("header is not valid JSON: ") + e.what());
  }
  if (!j.is_object()) detail::format_error(label, "header is not a JSON object");

  Header h;
  h.buffer_offset = 8 + n;
  h.buffer_size = file_size - h.buffer_offset;
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& name = it.key();
    const Json& v = it.value();
    if (name == "__metadata__") {
      if (v.is_null()) continue;
      if (!v.is_object()) detail::format_error(label, "__metadata__ is not an object");
      for (auto m = v.begin(); m != v.end(); ++m) {
        if (!m.value().is_string())
          detail::format_error(label, "__metadata__ value of \"" + m.key() + "\" is not a string");
        h.metadata.emplace(m.key(), m.value().get<std::string>());
      }
      continue;
    }
    const std::string where = "tensor \"" + name + "\"";
    if (!v.is_object()) detail::format_error(label, where + " is not an object");
    TensorInfo t;
    t.name = name;
    const auto dtype = v.find("dtype");
    if (dtype == v.end() || !dtype->is_string()) detail::format_error(label, where + " has no dtype string");
    const auto d = dtype_from_name(dtype->get_ref<const std::string&>());
    if (!d) detail::format_error(label, where + " has an unknown dtype \"" + dtype->get<std::string>() + "\"");
    t.dtype = *d;
    const auto shape = v.find("shape");
    if (shape == v.end() || !shape->is_array()) detail::format_error(label, where + " has no shape array");
    std::uint64_t elements = 1;
    for (const auto& dim : *shape) {
      const std::uint64_t x = detail::checked_u64(dim, label, where + "'s shape entry");
      if (x != 0 && elements > std::numeric_limits<std::uint64_t>::max() / x)
        detail::format_error(label, where + "'s shape product overflows");
      elements *= x;
      t.shape.push_back(x);
    }
    const auto offsets = v.find("data_offsets");
    if (offsets == v.end() || !offsets->is_array() || offsets->size() != 2)
      detail::format_error(label, where + " has no data_offsets [begin, end]");
    t.begin = detail::checked_u64((*offsets)[0], label, where + "'s begin offset");
    t.end = detail::checked_u64((*offsets)[1], label, where + "'s end offset");
    if (t.end < t.begin) detail::format_error(label, where + " ends before it begins");
    const std::uint64_t size = dtype_size(t.dtype);
    if (elements > std::numeric_limits<std::uint64_t>::max() / size)
      detail::format_error(label, where + "'s byte count overflows");
    if (t.end - t.begin != elements * size)
      detail::format_error(label, where + " has " + std::to_string(t.end - t.begin) + " bytes, but its shape and " +
                                      dtype_name(t.dtype) + " need " + std::to_string(elements * size));
    h.tensors.push_back(std::move(t));
  }

  // The tensors, in offset order, must tile the buffer exactly.
  std::vector<const TensorInfo*> order;
  order.reserve(h.tensors.size());
  for (const auto& t : h.tensors) order.push_back(&t);
  std::stable_sort(order.begin(), order.end(), [](const TensorInfo* a, const TensorInfo* b) {
    return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
  });
  std::uint64_t at = 0;
  for (const TensorInfo* t : order) {
    if (t->begin != at)
      detail::format_error(label, "tensor \"" + t->name + "\" " +
                                      (t->begin < at ? "overlaps the tensor before it" : "leaves a gap before it") +
                                      " (data_offsets [" + std::to_string(t->begin) + ", " + std::to_string(t->end) +
                                      "])");
    at = t->end;
  }
  if (at != h.buffer_size)
    detail::format_error(label, "the tensors cover " + std::to_string(at) + " bytes of a " +
                                    std::to_string(h.buffer_size) + "-byte buffer");
  return h;
}

/// \brief Read access to a safetensors file held in memory (a mapping, or bytes the caller keeps alive).
class SafetensorsView {
 public:
  /// Parses and validates `size` bytes at `data` (which must outlive the view).
  SafetensorsView(const unsigned char* data, std::size_t size, std::string label)
      : data_(data), label_(std::move(label)), header_(parse_header(data, size, size, label_)) {
    for (std::size_t i = 0; i < header_.tensors.size(); ++i) index_.emplace(header_.tensors[i].name, i);
  }

  /// \returns the file's name as given.
  const std::string& label() const { return label_; }
  /// \returns the tensors in the file's order.
  const std::vector<TensorInfo>& tensors() const { return header_.tensors; }
  /// \returns the metadata.
  const Metadata& metadata() const { return header_.metadata; }
  /// \returns the tensor named `name`, or nullptr.
  const TensorInfo* find(const std::string& name) const {
    const auto it = index_.find(name);
    return it == index_.end() ? nullptr : &header_.tensors[it->second];
  }
  /// \returns the tensor named `name`. \throws FormatError if the file has none.
  const TensorInfo& at(const std::string& name) const {
    const TensorInfo* t = find(name);
    if (!t) detail::format_error(label_, "no tensor \"" + name + "\"");
    return *t;
  }
  /// \returns a pointer to the tensor's bytes (t.end - t.begin of them).
  const unsigned char* bytes(const TensorInfo& t) const { return data_ + header_.buffer_offset + t.begin; }

  /// \returns the tensor as a rows x cols matrix of S (shape [rows, cols]; [n] is n x 1, [] is 1 x 1),
  /// converted from F32, F64, F16 or BF16.
  /// \throws FormatError for another dtype or more than two dimensions.
  template <class S>
  MatrixX<S> read(const std::string& name) const {
    const TensorInfo& t = at(name);
    const auto [rows, cols] = matrix_shape(t);
    MatrixX<S> m(rows, cols);
    convert_rows<S>(t, 0, rows, [&](Index i, Index j, S v) { m(i, j) = v; });
    return m;
  }

  /// \brief Converts rows [row0, row0 + n) of a 2-D (or 1-D) floating tensor to S, calling
  /// `put(i, j, value)` for each element in storage order (i counted from row0).
  template <class S, class Put>
  void convert_rows(const TensorInfo& t, Index row0, Index n, Put&& put) const {
    const auto shape = matrix_shape(t);
    const Index rows = shape.first, cols = shape.second;
    if (!is_float_dtype(t.dtype))
      detail::format_error(label_, "tensor \"" + t.name + "\" has dtype " + dtype_name(t.dtype) +
                                       ", not F32, F64, F16 or BF16");
    if (row0 < 0 || n < 0 || row0 + n > rows) detail::format_error(label_, "rows out of range of \"" + t.name + "\"");
    if (n == 0 || cols == 0) return;  // nothing to convert (a [2^62, 0] tensor must not loop over its rows)
    const unsigned char* p = bytes(t) + std::size_t(row0) * std::size_t(cols) * dtype_size(t.dtype);
    const auto each = [&](auto decode, std::size_t size) {
      for (Index i = 0; i < n; ++i)
        for (Index j = 0; j < cols; ++j, p += size) put(i, j, S(decode(p)));
    };
    switch (t.dtype) {
      case Dtype::F32:
        each([](const unsigned char* q) { float v; std::memcpy(&v, q, 4); return v; }, 4);
        break;
      case Dtype::F64:
        each([](const unsigned char* q) { double v; std::memcpy(&v, q, 8); return v; }, 8);
        break;
      case Dtype::F16:
        each([](const unsigned char* q) { return f16_to_float(std::uint16_t(q[0] | (q[1] << 8))); }, 2);
        break;
      default:
        each([](const unsigned char* q) { return bf16_to_float(std::uint16_t(q[0] | (q[1] << 8))); }, 2);
        break;
    }
  }

  /// \brief Reads rows [row0, row0 + n) of the tensor (at most 2-D) into a row-major matrix of S, as
  /// stored, reusing m's memory when it has the size already: one copy when the dtype is S's own, else
  /// converted as read() converts.
  template <class S>
  void read_rows(const TensorInfo& t, Index row0, Index n,
                 Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>& m) const {
    const auto shape = matrix_shape(t);
    if (!is_float_dtype(t.dtype))
      detail::format_error(label_, "tensor \"" + t.name + "\" has dtype " + dtype_name(t.dtype) +
                                       ", not F32, F64, F16 or BF16");
    if (row0 < 0 || n < 0 || row0 + n > shape.first)
      detail::format_error(label_, "rows out of range of \"" + t.name + "\"");
    m.resize(n, shape.second);
    if (m.size() == 0) return;
    if (t.dtype == dtype_of<S>()) {
      std::memcpy(m.data(), bytes(t) + std::size_t(row0) * std::size_t(shape.second) * sizeof(S),
                  std::size_t(m.size()) * sizeof(S));
    } else {
      S* out = m.data();
      convert_rows<S>(t, row0, n, [&](Index, Index, S v) { *out++ = v; });
    }
  }

  /// \brief The whole tensor, as read_rows() reads it.
  template <class S>
  void read_row_major(const TensorInfo& t, Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>& m) const {
    read_rows<S>(t, 0, matrix_shape(t).first, m);
  }

  /// \returns a view of the tensor's bytes as a row-major matrix of S, without a copy: the dtype must be
  /// S's own (F32 for float, F64 for double) and the data aligned for S.
  template <class S>
  Eigen::Map<const Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>> view(const std::string& name) const {
    const TensorInfo& t = at(name);
    const auto [rows, cols] = matrix_shape(t);
    if (t.dtype != dtype_of<S>())
      detail::format_error(label_, "tensor \"" + t.name + "\" has dtype " + dtype_name(t.dtype) + ", not " +
                                       dtype_name(dtype_of<S>()) + ": read() converts it, view() cannot");
    const void* p = bytes(t);
    if (reinterpret_cast<std::uintptr_t>(p) % alignof(S) != 0)
      detail::format_error(label_, "tensor \"" + t.name + "\" is not aligned for a view: read() copies it");
    return {static_cast<const S*>(p), rows, cols};
  }

  /// \returns (rows, cols) of a tensor of at most two dimensions. \throws FormatError otherwise.
  std::pair<Index, Index> matrix_shape(const TensorInfo& t) const {
    if (t.shape.size() > 2)
      detail::format_error(label_, "tensor \"" + t.name + "\" has " + std::to_string(t.shape.size()) +
                                       " dimensions, not a matrix or vector");
    const std::uint64_t limit = std::uint64_t(std::numeric_limits<Index>::max());
    const std::uint64_t r = t.shape.empty() ? 1 : t.shape[0];
    const std::uint64_t c = t.shape.size() < 2 ? 1 : t.shape[1];
    if (r > limit || c > limit) detail::format_error(label_, "tensor \"" + t.name + "\" is too large");
    return {Index(r), Index(c)};
  }

 private:
  const unsigned char* data_;
  std::string label_;
  Header header_;
  std::map<std::string, std::size_t> index_;
};

/// \brief A read-only memory mapping of a whole file (POSIX). Move-only.
class MappedFile {
 public:
  /// \throws FileError if the file cannot be opened or mapped.
  explicit MappedFile(const std::string& path) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) throw FileError("peft::io: cannot open " + path + ": " + std::strerror(errno));
    struct stat st {};
    if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
      ::close(fd);
      throw FileError("peft::io: " + path + " is not a regular file");
    }
    size_ = std::size_t(st.st_size);
    if (size_ > 0) {
      void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
      if (p == MAP_FAILED) {
        const int err = errno;
        ::close(fd);
        throw FileError("peft::io: cannot map " + path + ": " + std::strerror(err));
      }
      data_ = static_cast<const unsigned char*>(p);
    }
    fd_ = fd;  // kept open, for copies that stay in the kernel (SafetensorsWriter::copy_from)
  }
  MappedFile(MappedFile&& o) noexcept
      : data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)), fd_(std::exchange(o.fd_, -1)) {}
  MappedFile& operator=(MappedFile&& o) noexcept {
    if (this != &o) {
      release();
      data_ = std::exchange(o.data_, nullptr);
      size_ = std::exchange(o.size_, 0);
      fd_ = std::exchange(o.fd_, -1);
    }
    return *this;
  }
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  ~MappedFile() { release(); }

  const unsigned char* data() const { return data_; }
  std::size_t size() const { return size_; }
  /// \returns the open file descriptor of the mapped file.
  int fd() const { return fd_; }

  /// \brief Asks the kernel to map the pages of bytes [begin, end) now, in one call, rather than one
  /// page fault at a time as they are touched (Linux 5.14's MADV_POPULATE_READ; elsewhere a read-ahead
  /// hint). Only a hint: nothing changes if the kernel declines.
  void populate(std::size_t begin, std::size_t end) const {
    if (!data_ || begin >= end || end > size_) return;
    const std::size_t page = std::size_t(::sysconf(_SC_PAGESIZE));
    const std::size_t first = begin / page * page;
#ifdef MADV_POPULATE_READ
    if (::madvise(const_cast<unsigned char*>(data_) + first, end - first, MADV_POPULATE_READ) == 0) return;
#endif
    ::madvise(const_cast<unsigned char*>(data_) + first, end - first, MADV_WILLNEED);
  }

 private:
  void release() {
    if (data_) ::munmap(const_cast<unsigned char*>(data_), size_);
    if (fd_ >= 0) ::close(fd_);
    data_ = nullptr;
    fd_ = -1;
  }
  const unsigned char* data_ = nullptr;
  std::size_t size_ = 0;
  int fd_ = -1;
};

/// \brief A safetensors file on disk, memory-mapped (pages are read as tensors are touched) and
/// validated when opened. Move-only; views and tensor bytes are valid while it lives.
class SafetensorsFile {
 public:
  /// \throws FileError if the file cannot be opened, FormatError if it is not a valid safetensors file.
  explicit SafetensorsFile(const std::string& path)
      : map_(std::make_unique<MappedFile>(path)), view_(map_->data(), map_->size(), path) {}

  const SafetensorsView& view() const { return view_; }
  const SafetensorsView* operator->() const { return &view_; }

  /// \returns the open file descriptor, and the offset of a tensor's bytes in the file.
  int fd() const { return map_->fd(); }
  std::uint64_t offset(const TensorInfo& t) const { return std::uint64_t(view_.bytes(t) - map_->data()); }

  /// \brief Maps a tensor's pages in one call before it is read whole (MappedFile::populate).
  void populate(const TensorInfo& t) const {
    const std::size_t at = std::size_t(view_.bytes(t) - map_->data());
    map_->populate(at, at + std::size_t(t.end - t.begin));
  }

 private:
  std::unique_ptr<MappedFile> map_;  // on the heap, so that moving the file keeps view_'s pointer valid
  SafetensorsView view_;
};

/// \brief What a writer is told of each tensor before any data: name, dtype and shape.
struct TensorSpec {
  std::string name;
  Dtype dtype = Dtype::F32;
  std::vector<std::uint64_t> shape;
};

/// \brief Writes a safetensors file by streaming: the header is written from the specs first, then the
/// tensors' bytes in the specs' order, into `<path>.tmp-<pid>` beside the destination; commit() renames
/// it over `path` once complete. A writer destroyed before commit() (an error, an exception) removes its
/// temporary and leaves any existing file at `path` untouched.
class SafetensorsWriter {
 public:
  /// \throws FormatError for a duplicate or empty name or a name of "__metadata__", FileError if the
  /// temporary cannot be created.
  SafetensorsWriter(std::string path, std::vector<TensorSpec> specs, const Metadata& metadata = {})
      : path_(std::move(path)), specs_(std::move(specs)) {
    nlohmann::ordered_json j = nlohmann::ordered_json::object();
    if (!metadata.empty()) {
      nlohmann::ordered_json m = nlohmann::ordered_json::object();
      for (const auto& [k, v] : metadata) m[k] = v;
      j["__metadata__"] = std::move(m);
    }
    std::uint64_t offset = 0;
    for (const auto& s : specs_) {
      if (s.name.empty() || s.name == "__metadata__" || j.contains(s.name))
        detail::format_error(path_, "cannot write a tensor named \"" + s.name + "\" (empty, reserved or repeated)");
      std::uint64_t elements = 1;
      for (auto d : s.shape) {
        if (d != 0 && elements > std::numeric_limits<std::uint64_t>::max() / d)
          detail::format_error(path_, "tensor \"" + s.name + "\"'s shape product overflows");
        elements *= d;
      }
      if (elements > std::numeric_limits<std::uint64_t>::max() / dtype_size(s.dtype))
        detail::format_error(path_, "tensor \"" + s.name + "\"'s byte count overflows");
      const std::uint64_t bytes = elements * dtype_size(s.dtype);
      if (bytes > std::numeric_limits<std::uint64_t>::max() - offset)
        detail::format_error(path_, "tensor \"" + s.name + "\" ends past the largest offset the format can hold");
      j[s.name] = {{"dtype", dtype_name(s.dtype)}, {"shape", s.shape}, {"data_offsets", {offset, offset + bytes}}};
      sizes_.push_back(bytes);
      offset += bytes;
    }
    std::string header = j.dump();
    header.append((8 - header.size() % 8) % 8, ' ');  // the byte buffer starts 8-aligned
    file_ = std::make_unique<detail::StagedFile>(path_);
    unsigned char len[8];
    for (int i = 0; i < 8; ++i) len[i] = static_cast<unsigned char>(std::uint64_t(header.size()) >> (8 * i));
    file_->put(len, 8);
    file_->put(header.data(), header.size());
  }
  SafetensorsWriter(const SafetensorsWriter&) = delete;
  SafetensorsWriter& operator=(const SafetensorsWriter&) = delete;
  /// \returns the name of the tensor whose bytes come next, or "" once all are written.
  const std::string& next() {
    static const std::string none;
    skip_complete();
    return current_ < specs_.size() ? specs_[current_].name : none;
  }

  /// \brief Appends raw bytes to the tensors in order (in any number of calls, across tensors).
  /// \throws FormatError if there are more bytes than the specs declare.
  void write_bytes(const void* data, std::size_t n) {
    if (!file_->open()) throw StateError("peft::io: " + path_ + ": written after commit()");
    const auto* p = static_cast<const unsigned char*>(data);
    while (n > 0) {
      const std::size_t take = room(n);
      file_->put(p, take);
      p += take;
      n -= take;
      written_ += take;
    }
  }

  /// \brief As write_bytes() for the `n` bytes at `offset` in the file open as `fd`, which are also
  /// mapped at `mapped`: copied by the kernel (copy_file_range, Linux) where it can, without passing
  /// through this process, else written from the mapping.
  void copy_from(int fd, std::uint64_t offset, const void* mapped, std::size_t n) {
    if (!file_->open()) throw StateError("peft::io: " + path_ + ": written after commit()");
    const auto* p = static_cast<const unsigned char*>(mapped);
#ifdef __linux__
    if (n > 0 && std::fflush(file_->stream()) != 0) file_->fail("cannot write");
    const int out = ::fileno(file_->stream());
    while (n > 0) {
      const std::size_t take = room(n);
      loff_t from = loff_t(offset);
      const ssize_t k = ::copy_file_range(fd, &from, out, nullptr, take, 0);
      if (k <= 0) break;  // not supported here (another file system, an old kernel): write it instead
      p += k;
      offset += std::uint64_t(k);
      n -= std::size_t(k);
      written_ += std::uint64_t(k);
      file_->count(std::uint64_t(k));
    }
#else
    (void)fd;
    (void)offset;
#endif
    write_bytes(p, n);
  }

  /// \brief Writes the next tensor from a matrix (rows x cols for shape [rows, cols]; a column for
  /// [n]; 1 x 1 for []), converted to its declared dtype (F32, F64, F16 or BF16), streamed in row-major
  /// order. \throws FormatError if `name` is not the next tensor or the shape or dtype does not fit.
  template <class Derived>
  void write(const std::string& name, const Eigen::MatrixBase<Derived>& m) {
    while (current_ < specs_.size() && written_ == sizes_[current_] && specs_[current_].name != name) {
      ++current_;
      written_ = 0;
    }
    if (current_ >= specs_.size() || specs_[current_].name != name || written_ != 0)
      detail::format_error(path_, "tensor \"" + name + "\" written out of order (next is \"" + next() + "\")");
    const TensorSpec& s = specs_[current_];
    if (!is_float_dtype(s.dtype))
      detail::format_error(path_, "tensor \"" + name + "\" is declared " + dtype_name(s.dtype) +
                                      ": write its bytes with write_bytes()");
    const std::uint64_t rows = s.shape.empty() ? 1 : s.shape[0];
    const std::uint64_t cols = s.shape.size() < 2 ? 1 : s.shape[1];
    if (s.shape.size() > 2 || std::uint64_t(m.rows()) != rows || std::uint64_t(m.cols()) != cols)
      detail::format_error(path_, "tensor \"" + name + "\" is " + std::to_string(m.rows()) + "x" +
                                      std::to_string(m.cols()) + ", not its declared shape");
    encode(s.dtype, m);
  }

  /// \brief Appends the values of `m`, in row-major order, to the current tensor (F32, F64, F16 or BF16),
  /// converted to its dtype: a tensor written in blocks of rows. \throws FormatError past its end.
  template <class Derived>
  void append(const Eigen::MatrixBase<Derived>& m) {
    skip_complete();
    if (current_ >= specs_.size() || !is_float_dtype(specs_[current_].dtype))
      detail::format_error(path_, "append() with no floating tensor to write");
    if (written_ + std::uint64_t(m.size()) * dtype_size(specs_[current_].dtype) > sizes_[current_])
      detail::format_error(path_, "append() past the end of tensor \"" + specs_[current_].name + "\"");
    encode(specs_[current_].dtype, m);
  }

  /// \brief Checks that every tensor is complete, flushes, syncs and renames the temporary over `path`.
  /// \throws FormatError if tensors are missing, FileError if the disk refuses.
  void commit() {
    if (!file_->open()) throw StateError("peft::io: " + path_ + ": commit() after commit() or a failed commit()");
    skip_complete();
    if (current_ < specs_.size())
      detail::format_error(path_, "tensor \"" + specs_[current_].name + "\" not written before commit()");
    file_->commit();
  }

 private:
  template <class Derived>
  void encode(Dtype dtype, const Eigen::MatrixBase<Derived>& m) {
    const detail::Encoding e = dtype == Dtype::F32   ? detail::Encoding::F32
                               : dtype == Dtype::F64 ? detail::Encoding::F64
                               : dtype == Dtype::F16 ? detail::Encoding::F16
                                                     : detail::Encoding::BF16;
    detail::encode_row_major(e, m, [this](const unsigned char* p, std::size_t n) { write_bytes(p, n); });
  }

  /// \returns how many of `n` bytes the current tensor (the next incomplete one) takes. \throws FormatError
  /// when all are complete.
  std::size_t room(std::size_t n) {
    skip_complete();
    if (current_ >= specs_.size()) detail::format_error(path_, "more bytes written than the tensors declare");
    return std::size_t(std::min<std::uint64_t>(sizes_[current_] - written_, n));
  }

  void skip_complete() {
    while (current_ < specs_.size() && written_ == sizes_[current_]) {
      ++current_;
      written_ = 0;
    }
  }

  std::string path_;
  std::vector<TensorSpec> specs_;
  std::vector<std::uint64_t> sizes_;
  std::unique_ptr<detail::StagedFile> file_;
  std::size_t current_ = 0;
  std::uint64_t written_ = 0;
};

/// \returns the whole contents of the file at `path`. \throws FileError if it cannot be read.
inline std::string read_text_file(const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) throw FileError("peft::io: cannot open " + path + ": " + std::strerror(errno));
  std::string text;
  char chunk[1 << 14];
  std::size_t n;
  while ((n = std::fread(chunk, 1, sizeof chunk, f)) > 0) text.append(chunk, n);
  const bool failed = std::ferror(f) != 0;
  std::fclose(f);
  if (failed) throw FileError("peft::io: cannot read " + path);
  return text;
}

/// \brief A sharded model's index (`model.safetensors.index.json`): the JSON, and its shard files' names
/// in the order they first appear in `weight_map`.
struct ShardIndex {
  nlohmann::ordered_json index;
  std::vector<std::string> shards;
  std::map<std::string, std::string> shard_of;  ///< tensor name -> shard file name
};

/// \brief Reads a sharded model's index. \throws FileError if it cannot be read, FormatError unless it is
/// a JSON object whose `weight_map` maps each tensor to a file name (no directory part) in its directory.
inline ShardIndex read_shard_index(const std::string& path) {
  ShardIndex s;
  try {
    s.index = nlohmann::ordered_json::parse(read_text_file(path));
  } catch (const nlohmann::json::exception& e) {
    throw FormatError("peft::io: " + path + ": not valid JSON: " + e.what());
  }
  if (!s.index.is_object() || !s.index.contains("weight_map") || !s.index["weight_map"].is_object())
    throw FormatError("peft::io: " + path + ": no weight_map object");
  for (const auto& [name, file] : s.index["weight_map"].items()) {
    if (!file.is_string() || file.get<std::string>().empty() || file.get<std::string>().find('/') != std::string::npos)
      throw FormatError("peft::io: " + path + ": weight_map[\"" + name + "\"] is not a shard file name");
    const std::string shard = file.get<std::string>();
    if (std::find(s.shards.begin(), s.shards.end(), shard) == s.shards.end()) s.shards.push_back(shard);
    s.shard_of[name] = shard;
  }
  return s;
}

/// \brief Writes `tensors` (name, matrix) as one safetensors file, each in `dtype`; a matrix of one
/// column is written with shape [rows] when `vectors_1d`, else [rows, cols].
template <class S>
void save_safetensors(const std::string& path, const std::vector<std::pair<std::string, MatrixX<S>>>& tensors,
                      Dtype dtype = dtype_of<S>(), const Metadata& metadata = {}, bool vectors_1d = true) {
  std::vector<TensorSpec> specs;
  for (const auto& [name, m] : tensors) {
    TensorSpec s{name, dtype, {}};
    s.shape.push_back(std::uint64_t(m.rows()));
    if (!vectors_1d || m.cols() != 1) s.shape.push_back(std::uint64_t(m.cols()));
    specs.push_back(std::move(s));
  }
  SafetensorsWriter w(path, std::move(specs), metadata);
  for (const auto& [name, m] : tensors) w.write(name, m);
  w.commit();
}

}  // namespace io
}  // namespace peft
