// safetensors (io/safetensors.hpp), against files built and parsed byte by byte here, independently of
// the library: reading F32 / F64 / F16 / BF16 into float and double (matrices, vectors, scalars, empty
// tensors), metadata, zero-copy views, the other dtypes listed but not converted; the streaming writer
// (every dtype round-trips, the file it writes is a valid safetensors file by this test's own parser, a
// failed or abandoned write leaves no file, no temporary and any previous file untouched); and every
// kind of malformed file refused with a FormatError naming the file and, where one is at fault, the
// tensor, in memory and through the memory-mapped file.

#include "support/catch.hpp"
#include "support/errors.hpp"

#include <peft/core/half.hpp>
#include <peft/io/safetensors.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <initializer_list>
#include <iterator>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <unistd.h>

namespace fs = std::filesystem;
using peft::io::Dtype;
using peft::io::SafetensorsFile;
using peft::io::SafetensorsView;
using peft::io::SafetensorsWriter;
using peft::io::TensorSpec;
using peft::test::has_substring;
using peft::test::message_of;

static_assert(std::is_base_of<peft::Error, peft::FormatError>::value, "");
static_assert(std::is_base_of<peft::Error, peft::FileError>::value, "");

namespace {

using Bytes = std::vector<unsigned char>;

// ---------------------------------------------------------------------------------------------------
// Bytes, built and decoded here (little-endian by construction, whatever the host).

void put_le(Bytes& out, std::uint64_t v, int n) {
  for (int i = 0; i < n; ++i) out.push_back(static_cast<unsigned char>((v >> (8 * i)) & 0xffu));
}

std::uint64_t get_le(const unsigned char* p, int n) {
  std::uint64_t v = 0;
  for (int i = n - 1; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

std::uint32_t bits_of(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

std::uint64_t bits_of(double d) {
  std::uint64_t u;
  std::memcpy(&u, &d, sizeof u);
  return u;
}

float float_of(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

double double_of(std::uint64_t u) {
  double d;
  std::memcpy(&d, &u, sizeof d);
  return d;
}

Bytes f32_bytes(const std::vector<float>& v) {
  Bytes b;
  for (float x : v) put_le(b, bits_of(x), 4);
  return b;
}

Bytes f64_bytes(const std::vector<double>& v) {
  Bytes b;
  for (double x : v) put_le(b, bits_of(x), 8);
  return b;
}

Bytes u16_bytes(const std::vector<std::uint16_t>& v) {
  Bytes b;
  for (auto x : v) put_le(b, x, 2);
  return b;
}

/// The value of F16 bits, computed from sign, exponent and mantissa (not with the library's code).
float f16_value(std::uint16_t h) {
  const int e = (h >> 10) & 0x1f, m = h & 0x3ff;
  double v;
  if (e == 0x1f)
    v = m ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
  else if (e == 0)
    v = std::ldexp(double(m), -24);
  else
    v = std::ldexp(double(1024 + m), e - 25);
  return float((h & 0x8000) ? -v : v);
}

/// Equal values, bit for bit but any NaN equal to any NaN.
bool same(double a, double b) { return (std::isnan(a) && std::isnan(b)) || bits_of(a) == bits_of(b); }

std::vector<float> random_floats(std::size_t n, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.0f, 3.0f);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

std::vector<double> random_doubles(std::size_t n, std::uint32_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> d(0.0, 3.0);
  std::vector<double> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

// ---------------------------------------------------------------------------------------------------
// Files, built by hand: the 8-byte length, the JSON text as written here, the buffer.

/// A whole file from its header text (unpadded, as given) and its byte buffer.
Bytes file_of(const std::string& header, const Bytes& buffer = {}) {
  Bytes b;
  put_le(b, header.size(), 8);
  b.insert(b.end(), header.begin(), header.end());
  b.insert(b.end(), buffer.begin(), buffer.end());
  return b;
}

/// A header member for one tensor, formatted by hand: "name":{"dtype":..,"shape":..,"data_offsets":[b,e]}.
std::string entry(const std::string& name, const std::string& dtype, const std::string& shape, std::uint64_t begin,
                  std::uint64_t end) {
  return "\"" + name + "\":{\"dtype\":\"" + dtype + "\",\"shape\":" + shape + ",\"data_offsets\":[" +
         std::to_string(begin) + "," + std::to_string(end) + "]}";
}

/// Builds a file tensor by tensor, the offsets contiguous in the order added.
struct Builder {
  std::vector<std::string> members;
  Bytes buffer;
  std::size_t align = 8;  // the header is padded with spaces so that 8 + N is a multiple of this
  std::size_t extra = 0;  // ... plus this many more spaces

  Builder& tensor(const std::string& name, const std::string& dtype, const std::string& shape, const Bytes& data) {
    members.push_back(entry(name, dtype, shape, buffer.size(), buffer.size() + data.size()));
    buffer.insert(buffer.end(), data.begin(), data.end());
    return *this;
  }
  Builder& member(const std::string& text) {
    members.push_back(text);
    return *this;
  }
  std::string header() const {
    std::string h = "{";
    for (std::size_t i = 0; i < members.size(); ++i) h += (i ? "," : "") + members[i];
    h += "}";
    while ((8 + h.size()) % align != 0) h += ' ';
    h.append(extra, ' ');
    return h;
  }
  Bytes bytes() const { return file_of(header(), buffer); }
};

/// Bytes in a heap block of exactly their size, so that the sanitizers see any read past the end.
struct Memory {
  std::unique_ptr<unsigned char[]> data;
  std::size_t size;
  explicit Memory(const Bytes& b) : data(new unsigned char[b.size()]), size(b.size()) {
    if (!b.empty()) std::memcpy(data.get(), b.data(), b.size());
  }
};

// ---------------------------------------------------------------------------------------------------
// Scratch directories: one per process under the system's temporary directory, one per test within it.

const fs::path& scratch_root() {
  struct Root {
    fs::path path = fs::temp_directory_path() / ("peft_io_test_" + std::to_string(::getpid()));
    Root() {
      fs::remove_all(path);
      fs::create_directories(path);
    }
    ~Root() {
      std::error_code ec;
      fs::remove_all(path, ec);
    }
  };
  static const Root root;
  return root.path;
}

struct TempDir {
  fs::path path;
  TempDir() {
    static int count = 0;
    path = scratch_root() / ("dir" + std::to_string(++count));
    fs::create_directories(path);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  /// The names of the entries of the directory, sorted.
  std::vector<std::string> entries() const {
    std::vector<std::string> names;
    for (const auto& e : fs::directory_iterator(path)) names.push_back(e.path().filename().string());
    std::sort(names.begin(), names.end());
    return names;
  }
  std::string file(const std::string& name) const { return (path / name).string(); }
};

void write_file(const std::string& path, const Bytes& b) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(b.data()), std::streamsize(b.size()));
  REQUIRE(out.good());
}

Bytes read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  REQUIRE(in.good());
  return Bytes(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// ---------------------------------------------------------------------------------------------------
// Malformed files.

/// Requires parsing `file` to throw a FormatError whose message names the file (its label in memory,
/// its path on disk) and contains each of `parts`: in memory (SafetensorsView) and mapped from a file
/// (SafetensorsFile).
void require_format_error(const Bytes& file, std::initializer_list<std::string> parts) {
  static int count = 0;
  ++count;
  const std::string label = "memory-case-" + std::to_string(count) + ".safetensors";
  const Memory m(file);
  REQUIRE_THROWS_AS(SafetensorsView(m.data.get(), m.size, label), peft::FormatError);
  const std::string in_memory = message_of([&] { SafetensorsView(m.data.get(), m.size, label); });
  INFO("message: " << in_memory);
  REQUIRE_THAT(in_memory, has_substring(label));
  for (const auto& part : parts) REQUIRE_THAT(in_memory, has_substring(part));

  const std::string path = (scratch_root() / ("file-case-" + std::to_string(count) + ".safetensors")).string();
  write_file(path, file);
  REQUIRE_THROWS_AS(SafetensorsFile(path), peft::FormatError);
  const std::string on_disk = message_of([&] { SafetensorsFile f(path); });
  INFO("message: " << on_disk);
  REQUIRE_THAT(on_disk, has_substring(path));
  for (const auto& part : parts) REQUIRE_THAT(on_disk, has_substring(part));
  fs::remove(path);
}

/// The tensor name the malformed-file cases use, distinct from every word of the messages.
const std::string NAME = "lora_B.weight";
const std::string QNAME = "\"" + NAME + "\"";  // as messages quote it

/// A file whose header is the one member `member` (formatted by the caller), then `buffer_bytes` zeros.
Bytes one_tensor(const std::string& member, std::size_t buffer_bytes = 8) {
  return file_of("{" + member + "}", Bytes(buffer_bytes, 0));
}

// ---------------------------------------------------------------------------------------------------
// The writer's output, parsed here: length, JSON (by nlohmann::json directly), padding, offsets.

struct Parsed {
  nlohmann::json header;
  std::uint64_t header_length = 0;
  Bytes buffer;
};

Parsed parse_independently(const Bytes& file) {
  Parsed p;
  REQUIRE(file.size() >= 8);
  p.header_length = get_le(file.data(), 8);
  REQUIRE(p.header_length <= file.size() - 8);
  const std::string text(reinterpret_cast<const char*>(file.data()) + 8, std::size_t(p.header_length));
  REQUIRE(text.front() == '{');
  // Padding: spaces after the closing brace only, so that the buffer starts at a multiple of 8.
  const std::size_t close = text.find_last_of('}');
  REQUIRE(close != std::string::npos);
  REQUIRE(text.find_first_not_of(' ', close + 1) == std::string::npos);
  REQUIRE((8 + p.header_length) % 8 == 0);
  REQUIRE(text.size() - close - 1 < 8);  // no more padding than needed
  p.header = nlohmann::json::parse(text);
  REQUIRE(p.header.is_object());
  p.buffer.assign(file.begin() + std::ptrdiff_t(8 + p.header_length), file.end());
  return p;
}

/// Checks the tensors of `p` are exactly `names`, with offsets contiguous in that order from 0 to the end
/// of the buffer, each of the byte count its dtype and shape need.
void require_contiguous(const Parsed& p, const std::vector<std::string>& names) {
  std::uint64_t at = 0;
  std::size_t tensors = 0;
  for (auto it = p.header.begin(); it != p.header.end(); ++it)
    if (it.key() != "__metadata__") ++tensors;
  REQUIRE(tensors == names.size());
  const std::vector<std::pair<std::string, std::uint64_t>> sizes = {
      {"F32", 4}, {"F64", 8}, {"F16", 2}, {"BF16", 2}, {"U8", 1}, {"I32", 4}, {"I64", 8}, {"BOOL", 1}};
  for (const auto& name : names) {
    INFO("tensor " << name);
    REQUIRE(p.header.contains(name));
    const auto& t = p.header[name];
    REQUIRE(t.size() == 3);
    REQUIRE(t["data_offsets"].size() == 2);
    const auto begin = t["data_offsets"][0].get<std::uint64_t>(), end = t["data_offsets"][1].get<std::uint64_t>();
    REQUIRE(begin == at);
    std::uint64_t elements = 1;
    for (const auto& d : t["shape"]) elements *= d.get<std::uint64_t>();
    const auto dtype = t["dtype"].get<std::string>();
    const auto size = std::find_if(sizes.begin(), sizes.end(), [&](const auto& s) { return s.first == dtype; });
    REQUIRE(size != sizes.end());
    REQUIRE(end - begin == elements * size->second);
    at = end;
  }
  REQUIRE(at == p.buffer.size());
}

/// The element (i, j) of tensor `name` of `p` (row-major), decoded here from its dtype's bytes.
double element(const Parsed& p, const std::string& name, std::uint64_t i, std::uint64_t j) {
  const auto& t = p.header[name];
  const auto dtype = t["dtype"].get<std::string>();
  const auto& shape = t["shape"];
  const std::uint64_t cols = shape.size() < 2 ? 1 : shape[1].get<std::uint64_t>();
  const std::uint64_t size = dtype == "F64" ? 8 : dtype == "F32" ? 4 : 2;
  const unsigned char* q = p.buffer.data() + t["data_offsets"][0].get<std::uint64_t>() + (i * cols + j) * size;
  if (dtype == "F64") return double_of(get_le(q, 8));
  if (dtype == "F32") return double(float_of(std::uint32_t(get_le(q, 4))));
  if (dtype == "F16") return double(f16_value(std::uint16_t(get_le(q, 2))));
  REQUIRE(dtype == "BF16");
  return double(float_of(std::uint32_t(get_le(q, 2)) << 16));
}

std::uint16_t element_bits16(const Parsed& p, const std::string& name, std::uint64_t i, std::uint64_t j) {
  const auto& t = p.header[name];
  const std::uint64_t cols = t["shape"].size() < 2 ? 1 : t["shape"][1].get<std::uint64_t>();
  return std::uint16_t(get_le(p.buffer.data() + t["data_offsets"][0].get<std::uint64_t>() + (i * cols + j) * 2, 2));
}

/// A valid file for the "untouched" checks.
Bytes good_file() {
  return Builder().tensor("old", "F32", "[3]", f32_bytes({1.0f, 2.0f, 3.0f})).bytes();
}

}  // namespace

// =====================================================================================================
// Reading

TEST_CASE("reading F32, F64, F16 and BF16 into float and double", "[safetensors][read]") {
  auto w32 = random_floats(12, 1);          // [3, 4]
  auto w64 = random_doubles(10, 2);         // [2, 5]
  // Values whose bits must survive: -0, infinity, a NaN with a payload, the smallest subnormal; and
  // doubles that float rounds (up, to infinity, to zero).
  w32[1] = -0.0f;
  w32[2] = std::numeric_limits<float>::infinity();
  w32[5] = float_of(0x7fc12345u);
  w32[6] = std::numeric_limits<float>::denorm_min();
  w64[1] = 1.0 + std::ldexp(1.0, -24) + std::ldexp(1.0, -40);
  w64[2] = -1e300;
  w64[3] = std::numeric_limits<double>::denorm_min();
  w64[4] = -0.0;
  const auto vec = random_floats(5, 3);     // [5]
  std::vector<std::uint16_t> every(65536);  // [256, 256]: every F16 / BF16 bit pattern
  for (std::uint32_t k = 0; k < 65536; ++k) every[k] = std::uint16_t(k);
  std::vector<std::uint16_t> every_reversed(every.rbegin(), every.rend());
  Builder b;
  b.member("\"__metadata__\":{\"format\":\"pt\",\"note\":\"a \\\"quoted\\\" caf\\u00e9\"}")
      .tensor("w32", "F32", "[3,4]", f32_bytes(w32))
      .tensor("w64", "F64", "[2,5]", f64_bytes(w64))
      .tensor("h", "F16", "[256,256]", u16_bytes(every))
      .tensor("bf", "BF16", "[256, 256]", u16_bytes(every_reversed))
      .tensor("vec", "F32", "[5]", f32_bytes(vec))
      .tensor("scalar", "F64", "[]", f64_bytes({-2.5}))
      .tensor("empty", "F32", "[0]", {})
      .tensor("no_rows", "F16", "[0,3]", {})
      .tensor("no_cols", "BF16", "[4,0]", {});
  b.extra = 5;  // padding beyond alignment: spaces after the JSON are allowed
  const Bytes file = b.bytes();

  const auto check = [&](const SafetensorsView& v) {
    // The listing, in the header's order, with shapes and offsets as written.
    const std::vector<std::string> names = {"w32", "w64", "h", "bf", "vec", "scalar", "empty", "no_rows", "no_cols"};
    REQUIRE(v.tensors().size() == names.size());
    for (std::size_t k = 0; k < names.size(); ++k) REQUIRE(v.tensors()[k].name == names[k]);
    REQUIRE(v.at("w32").dtype == Dtype::F32);
    REQUIRE(v.at("h").dtype == Dtype::F16);
    REQUIRE(v.at("bf").dtype == Dtype::BF16);
    REQUIRE(v.at("w64").shape == std::vector<std::uint64_t>{2, 5});
    REQUIRE(v.at("w64").begin == 48);
    REQUIRE(v.at("w64").end == 128);
    REQUIRE(v.at("scalar").shape.empty());
    REQUIRE(v.at("scalar").elements() == 1);
    REQUIRE(v.at("no_rows").elements() == 0);
    REQUIRE(v.find("missing") == nullptr);
    REQUIRE(v.metadata() == peft::io::Metadata{{"format", "pt"}, {"note", "a \"quoted\" caf\xc3\xa9"}});

    // F32: rows x cols, element (i, j) at (i cols + j) in the buffer.
    const auto f = v.read<float>("w32");
    const auto d = v.read<double>("w32");
    REQUIRE(f.rows() == 3);
    REQUIRE(f.cols() == 4);
    for (int i = 0; i < 3; ++i)
      for (int j = 0; j < 4; ++j) {
        REQUIRE(bits_of(f(i, j)) == bits_of(w32[std::size_t(i * 4 + j)]));
        REQUIRE(bits_of(d(i, j)) == bits_of(double(w32[std::size_t(i * 4 + j)])));
      }
    // F64: exact into double, rounded to nearest into float.
    const auto f64d = v.read<double>("w64");
    const auto f64f = v.read<float>("w64");
    REQUIRE(f64d.rows() == 2);
    REQUIRE(f64d.cols() == 5);
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 5; ++j) {
        REQUIRE(bits_of(f64d(i, j)) == bits_of(w64[std::size_t(i * 5 + j)]));
        REQUIRE(bits_of(f64f(i, j)) == bits_of(static_cast<float>(w64[std::size_t(i * 5 + j)])));
      }
    REQUIRE(f64f(0, 1) == 1.0f + std::ldexp(1.0f, -23));
    REQUIRE(f64f(0, 2) == -std::numeric_limits<float>::infinity());
    REQUIRE(bits_of(f64f(0, 3)) == 0u);
    REQUIRE(bits_of(f(0, 1)) == 0x80000000u);
    REQUIRE(bits_of(f(1, 1)) == 0x7fc12345u);
    // F16 and BF16: every bit pattern widens exactly (NaNs to NaNs), into float and double.
    const auto hf = v.read<float>("h");
    const auto hd = v.read<double>("h");
    const auto bff = v.read<float>("bf");
    const auto bfd = v.read<double>("bf");
    REQUIRE(hf.rows() == 256);
    REQUIRE(hf.cols() == 256);
    REQUIRE(bfd.rows() == 256);
    int wrong = 0;
    for (int i = 0; i < 256; ++i)
      for (int j = 0; j < 256; ++j) {
        const auto h = std::uint16_t(i * 256 + j);
        const auto r = std::uint16_t(65535 - (i * 256 + j));
        const float want_h = f16_value(h);
        const float want_b = float_of(std::uint32_t(r) << 16);
        if (!same(hf(i, j), want_h) || !same(hd(i, j), double(want_h))) ++wrong;
        if (!same(bff(i, j), want_b) || !same(bfd(i, j), double(want_b))) ++wrong;
      }
    REQUIRE(wrong == 0);
    // A vector is a column, a scalar 1 x 1, empty tensors empty.
    const auto col = v.read<float>("vec");
    REQUIRE(col.rows() == 5);
    REQUIRE(col.cols() == 1);
    for (int i = 0; i < 5; ++i) REQUIRE(col(i, 0) == vec[std::size_t(i)]);
    const auto s = v.read<double>("scalar");
    REQUIRE(s.rows() == 1);
    REQUIRE(s.cols() == 1);
    REQUIRE(s(0, 0) == -2.5);
    const auto e = v.read<float>("empty");
    REQUIRE(e.rows() == 0);
    REQUIRE(e.cols() == 1);
    const auto nr = v.read<double>("no_rows");
    REQUIRE(nr.rows() == 0);
    REQUIRE(nr.cols() == 3);
    const auto nc = v.read<float>("no_cols");
    REQUIRE(nc.rows() == 4);
    REQUIRE(nc.cols() == 0);
    // Rows by range, and a range past the end refused.
    std::vector<float> rows12;
    v.convert_rows<float>(v.at("w32"), 1, 2, [&](peft::Index i, peft::Index j, float x) {
      REQUIRE(bits_of(x) == bits_of(w32[std::size_t((i + 1) * 4 + j)]));
      rows12.push_back(x);
    });
    REQUIRE(rows12.size() == 8);
    // In every dtype, rows read from an offset are those rows of the whole tensor: the offset counts the
    // dtype's own element size (2 bytes for F16 and BF16, 8 for F64).
    for (const char* name : {"w32", "w64", "h", "bf"}) {
      INFO(name);
      const auto whole = v.read<double>(name);
      const peft::Index n = whole.rows() - 1;
      Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> tail;
      v.read_rows<double>(v.at(name), 1, n, tail);
      REQUIRE(tail.rows() == n);
      int differ = 0;
      for (peft::Index i = 0; i < n; ++i)
        for (peft::Index j = 0; j < whole.cols(); ++j) differ += !same(tail(i, j), whole(i + 1, j));
      REQUIRE(differ == 0);
    }
    REQUIRE_THROWS_AS(v.convert_rows<float>(v.at("w32"), 2, 2, [](peft::Index, peft::Index, float) {}),
                      peft::FormatError);
    // A name that is not there.
    REQUIRE_THROWS_AS(v.read<float>("missing"), peft::FormatError);
    REQUIRE_THAT(message_of([&] { v.read<float>("missing"); }), has_substring("\"missing\""));
    REQUIRE_THAT(message_of([&] { v.read<float>("missing"); }), has_substring(v.label()));
  };

  SECTION("from memory") {
    const Memory m(file);
    const SafetensorsView v(m.data.get(), m.size, "in-memory");
    REQUIRE(v.label() == "in-memory");
    check(v);
  }
  SECTION("from a mapped file") {
    TempDir dir;
    write_file(dir.file("model.safetensors"), file);
    SafetensorsFile f(dir.file("model.safetensors"));
    REQUIRE(f->label() == dir.file("model.safetensors"));
    check(f.view());
    // Moved, the file keeps its mapping and its view valid.
    SafetensorsFile moved(std::move(f));
    check(moved.view());
  }
}

TEST_CASE("view gives zero-copy access to F32 and F64 tensors and refuses other dtypes", "[safetensors][read]") {
  const auto w = random_floats(6, 4);
  const auto d = random_doubles(4, 5);
  const Bytes file = Builder()
                         .tensor("w", "F32", "[2,3]", f32_bytes(w))
                         .tensor("d", "F64", "[4]", f64_bytes(d))
                         .tensor("h", "F16", "[2]", u16_bytes({0x3c00, 0x4000}))
                         .bytes();
  const Memory m(file);
  const SafetensorsView v(m.data.get(), m.size, "views.safetensors");
  const std::uint64_t buffer = 8 + get_le(file.data(), 8);

  const auto vw = v.view<float>("w");
  REQUIRE(vw.data() == reinterpret_cast<const float*>(m.data.get() + buffer + 0));  // into the bytes given
  REQUIRE(vw.rows() == 2);
  REQUIRE(vw.cols() == 3);
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 3; ++j) REQUIRE(vw(i, j) == w[std::size_t(i * 3 + j)]);  // row-major
  const auto vd = v.view<double>("d");
  REQUIRE(vd.data() == reinterpret_cast<const double*>(m.data.get() + buffer + 24));
  REQUIRE(vd.rows() == 4);
  REQUIRE(vd.cols() == 1);
  for (int i = 0; i < 4; ++i) REQUIRE(vd(i, 0) == d[std::size_t(i)]);
  REQUIRE(static_cast<const void*>(vw.data()) == v.bytes(v.at("w")));

  // Another dtype: a view would reinterpret the bytes, so it is refused (read converts).
  for (const auto& [name, call] :
       std::vector<std::pair<std::string, std::function<void()>>>{{"w", [&] { v.view<double>("w"); }},
                                                                    {"d", [&] { v.view<float>("d"); }},
                                                                    {"h", [&] { v.view<float>("h"); }}}) {
    REQUIRE_THROWS_AS(call(), peft::FormatError);
    REQUIRE_THAT(message_of(call), has_substring("\"" + name + "\""));
    REQUIRE_THAT(message_of(call), has_substring("views.safetensors"));
  }
  REQUIRE(v.read<float>("h")(1, 0) == 2.0f);

  SECTION("from a mapped file: a pointer into the mapping, the bytes read() converts") {
    TempDir dir;
    write_file(dir.file("v.safetensors"), file);
    const SafetensorsFile f(dir.file("v.safetensors"));
    const auto fw = f->view<float>("w");
    REQUIRE(static_cast<const void*>(fw.data()) == f->bytes(f->at("w")));
    REQUIRE(fw == f->read<float>("w"));
    REQUIRE(std::memcmp(fw.data(), file.data() + buffer, 24) == 0);
  }
  SECTION("data not aligned for the scalar: view refuses, read copies") {
    Builder odd;
    odd.align = 2;  // 8 + N even but not a multiple of 4
    odd.tensor("w", "F32", "[2,3]", f32_bytes(w));
    if ((8 + odd.header().size()) % 4 == 0) odd.extra = 2;
    REQUIRE((8 + odd.header().size()) % 4 == 2);
    const Memory mo(odd.bytes());
    const SafetensorsView vo(mo.data.get(), mo.size, "odd.safetensors");
    REQUIRE_THROWS_AS(vo.view<float>("w"), peft::FormatError);
    REQUIRE_THAT(message_of([&] { vo.view<float>("w"); }), has_substring("\"w\""));
    const auto r = vo.read<float>("w");
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 3; ++j) REQUIRE(r(i, j) == w[std::size_t(i * 3 + j)]);
  }
}

TEST_CASE("every dtype is listed with its shape and bytes, and read converts only the floating ones",
          "[safetensors][read]") {
  // Each dtype of the format, with its element size as the format defines it.
  const std::vector<std::pair<std::string, std::size_t>> dtypes = {
      {"BOOL", 1}, {"U8", 1},  {"I8", 1},  {"F8_E5M2", 1}, {"F8_E4M3", 1}, {"F8_E8M0", 1},
      {"I16", 2},  {"U16", 2}, {"F16", 2}, {"BF16", 2},    {"I32", 4},     {"U32", 4},
      {"F32", 4},  {"I64", 8}, {"U64", 8}, {"F64", 8},     {"C64", 8}};
  Builder b;
  std::vector<Bytes> contents;
  for (std::size_t k = 0; k < dtypes.size(); ++k) {
    Bytes data(2 * 3 * dtypes[k].second);
    for (std::size_t i = 0; i < data.size(); ++i) data[i] = static_cast<unsigned char>(17 * k + i);
    b.tensor("t_" + dtypes[k].first, dtypes[k].first, "[2,3]", data);
    contents.push_back(data);
  }
  b.tensor("cube", "F32", "[2,2,2]", Bytes(32, 0));
  const Bytes file = b.bytes();
  const Memory m(file);
  const SafetensorsView v(m.data.get(), m.size, "dtypes.safetensors");
  REQUIRE(v.tensors().size() == dtypes.size() + 1);
  for (std::size_t k = 0; k < dtypes.size(); ++k) {
    const std::string name = dtypes[k].first;
    const std::size_t size = dtypes[k].second;
    INFO("dtype " << name);
    const auto& t = v.at("t_" + name);
    REQUIRE(std::string(peft::io::dtype_name(t.dtype)) == name);
    REQUIRE(peft::io::dtype_size(t.dtype) == size);
    REQUIRE(t.shape == std::vector<std::uint64_t>{2, 3});
    REQUIRE(t.end - t.begin == 6 * size);
    REQUIRE(std::memcmp(v.bytes(t), contents[k].data(), contents[k].size()) == 0);
    const bool floating = name == "F32" || name == "F64" || name == "F16" || name == "BF16";
    if (floating) {
      REQUIRE_NOTHROW(v.read<float>("t_" + name));
    } else {
      REQUIRE_THROWS_AS(v.read<float>("t_" + name), peft::FormatError);
      REQUIRE_THROWS_AS(v.read<double>("t_" + name), peft::FormatError);
      const auto msg = message_of([&] { v.read<float>("t_" + name); });
      REQUIRE_THAT(msg, has_substring("\"t_" + name + "\""));
      REQUIRE_THAT(msg, has_substring(name));
      REQUIRE_THAT(msg, has_substring("dtypes.safetensors"));
    }
  }
  // More than two dimensions: listed, but not a matrix.
  REQUIRE(v.at("cube").shape == std::vector<std::uint64_t>{2, 2, 2});
  REQUIRE_THROWS_AS(v.read<float>("cube"), peft::FormatError);
  REQUIRE_THAT(message_of([&] { v.read<float>("cube"); }), has_substring("\"cube\""));

  SECTION("each dtype with one byte too many or too few is refused") {
    for (const auto& [name, size] : dtypes) {
      INFO("dtype " << name);
      require_format_error(one_tensor(entry(NAME, name, "[2]", 0, 2 * size + 1), 2 * size + 1), {QNAME, name});
      require_format_error(one_tensor(entry(NAME, name, "[2]", 0, 2 * size - 1), 2 * size - 1), {QNAME, name});
    }
  }
}

TEST_CASE("valid headers: empty, padded, null metadata, tensors out of offset order", "[safetensors][read]") {
  SECTION("no tensors") {
    const Memory m(file_of("{}"));
    const SafetensorsView v(m.data.get(), m.size, "empty");
    REQUIRE(v.tensors().empty());
    REQUIRE(v.metadata().empty());
  }
  SECTION("whitespace inside and after the JSON, null metadata") {
    const std::string header = "{ \"__metadata__\" : null ,\n \"a\" : { \"dtype\" : \"F32\" , \"shape\" : [ 1 ] , "
                               "\"data_offsets\" : [ 0 , 4 ] } }\n\t   ";
    const Memory m2(file_of(header, f32_bytes({7.0f})));
    const SafetensorsView v(m2.data.get(), m2.size, "spaced");
    REQUIRE(v.metadata().empty());
    REQUIRE(v.read<float>("a")(0, 0) == 7.0f);
  }
  SECTION("the header's order is kept; the offsets may be in another order") {
    const std::string header = "{" + entry("second", "F32", "[2]", 8, 16) + "," + entry("first", "F64", "[1]", 0, 8) +
                               "," + entry("void", "F32", "[0,5]", 8, 8) + "," + entry("tail", "F16", "[0]", 16, 16) +
                               "}";
    Bytes buffer = f64_bytes({1.5});
    const Bytes second = f32_bytes({2.0f, -3.0f});
    buffer.insert(buffer.end(), second.begin(), second.end());
    const Memory m(file_of(header, buffer));
    const SafetensorsView v(m.data.get(), m.size, "order");
    REQUIRE(v.tensors().size() == 4);
    REQUIRE(v.tensors()[0].name == "second");
    REQUIRE(v.tensors()[1].name == "first");
    REQUIRE(v.tensors()[2].name == "void");
    REQUIRE(v.tensors()[3].name == "tail");
    REQUIRE(v.read<double>("first")(0, 0) == 1.5);
    REQUIRE(v.read<float>("second")(1, 0) == -3.0f);
    REQUIRE(v.read<float>("void").rows() == 0);
  }
  SECTION("a zero-size tensor may have huge other dimensions: its product is 0, not an overflow") {
    const Memory m(file_of("{" + entry("z", "F64", "[0,4294967296,4294967296]", 0, 0) + "}"));
    const SafetensorsView v(m.data.get(), m.size, "zero");
    REQUIRE(v.at("z").elements() == 0);
  }
  SECTION("a [2^62, 0] tensor reads at once, without a loop over its rows (found by the fuzzer's review)") {
    const Memory m(file_of("{" + entry("a", "F32", "[4611686018427387904,0]", 0, 0) + "}"));
    const SafetensorsView v(m.data.get(), m.size, "huge rows");
    const auto a = v.read<float>("a");
    REQUIRE(a.rows() == (Eigen::Index(1) << 62));
    REQUIRE(a.cols() == 0);
  }
}

// =====================================================================================================
// Malformed files

TEST_CASE("malformed files: the length and the start of the header", "[safetensors][malformed]") {
  SECTION("shorter than 8 bytes") {
    require_format_error({}, {"8-byte"});
    require_format_error(Bytes(7, 0), {"8-byte"});
    require_format_error({2, 0, 0, 0, 0, 0, 0}, {"8-byte"});
  }
  SECTION("header length past the end of the file") {
    Bytes b;
    put_le(b, 100, 8);
    b.insert(b.end(), {'{', '}'});
    require_format_error(b, {"100", "past the end"});
    Bytes c;
    put_le(c, 3, 8);
    c.insert(c.end(), {'{', '}'});
    require_format_error(c, {"past the end"});
  }
  SECTION("a 16-byte file claiming a header over 100 MB: refused before anything is read or allocated") {
    // The header length is checked against the limit (and the file's size) first: a parser that
    // allocated or read N bytes would read far past the 16 bytes held here (the sanitizers' build sees it).
    for (const std::uint64_t n : {std::uint64_t(200'000'000), std::uint64_t(100'000'001),
                                  std::numeric_limits<std::uint64_t>::max()}) {
      Bytes b;
      put_le(b, n, 8);
      b.insert(b.end(), {'{', '}', ' ', ' ', ' ', ' ', ' ', ' '});
      REQUIRE(b.size() == 16);
      require_format_error(b, {std::to_string(n), "100 MB"});
    }
    // The limit itself is allowed: this one is refused for running past the end instead.
    Bytes b;
    put_le(b, 100'000'000, 8);
    b.insert(b.end(), {'{', '}', ' ', ' ', ' ', ' ', ' ', ' '});
    require_format_error(b, {"past the end"});
  }
  SECTION("a header that does not start with '{'") {
    require_format_error(file_of(""), {"'{'"});
    require_format_error(file_of(" {}"), {"'{'"});
    require_format_error(file_of("[]"), {"'{'"});
    require_format_error(file_of("[{\"a\":1}]"), {"'{'"});
    require_format_error(file_of("\"text\""), {"'{'"});
    require_format_error(file_of("17"), {"'{'"});
  }
  SECTION("a header that is not valid JSON") {
    require_format_error(file_of("{"), {"not valid JSON"});
    require_format_error(file_of("{\"a\":"), {"not valid JSON"});
    require_format_error(file_of("{}x"), {"not valid JSON"});
    require_format_error(file_of("{} {}"), {"not valid JSON"});
    require_format_error(file_of("{'a':1}"), {"not valid JSON"});
    require_format_error(file_of("{\"a\":1,}"), {"not valid JSON"});
    require_format_error(file_of("{" + entry(NAME, "F32", "[2]", 0, 8)), {"not valid JSON"});
  }
}

TEST_CASE("malformed files: duplicate keys and nesting", "[safetensors][malformed]") {
  SECTION("two tensors of the same name") {
    // Two valid entries of the same name (nlohmann would keep the last one silently).
    require_format_error(
        file_of("{" + entry(NAME, "F32", "[2]", 0, 8) + "," + entry(NAME, "F32", "[2]", 8, 16) + "}", Bytes(16, 0)),
        {"duplicate", QNAME});
    require_format_error(file_of("{" + entry(NAME, "F32", "[2]", 0, 8) + "," + entry(NAME, "F32", "[2]", 0, 8) + "}",
                                 Bytes(8, 0)),
                         {"duplicate", QNAME});
  }
  SECTION("duplicate keys inside a tensor's entry or the metadata") {
    require_format_error(
        one_tensor("\"" + NAME + "\":{\"dtype\":\"F32\",\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}"),
        {"duplicate", "\"dtype\""});
    require_format_error(
        one_tensor("\"" + NAME + "\":{\"dtype\":\"F32\",\"shape\":[4],\"shape\":[2],\"data_offsets\":[0,8]}"),
        {"duplicate", "\"shape\""});
    require_format_error(
        one_tensor("\"" + NAME + "\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,4],\"data_offsets\":[0,8]}"),
        {"duplicate", "\"data_offsets\""});
    require_format_error(file_of("{\"__metadata__\":{\"key_one\":\"1\",\"key_one\":\"2\"}}"), {"duplicate", "\"key_one\""});
    require_format_error(file_of("{\"__metadata__\":{},\"__metadata__\":{}}"), {"duplicate", "__metadata__"});
  }
  SECTION("nesting deeper than the format's") {
    require_format_error(one_tensor("\"" + NAME + "\":{\"dtype\":\"F32\",\"shape\":[[2]],\"data_offsets\":[0,8]}"),
                         {"deeper"});
    require_format_error(one_tensor("\"" + NAME + "\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8],\"x\":{\"y\":{}}}"),
                         {"deeper"});
    require_format_error(file_of("{\"__metadata__\":{\"k\":{\"x\":[]}}}"), {"deeper"});
    // Far deeper than any stack: refused at the fourth level, before it is parsed further.
    const std::string deep = "{\"a\":" + std::string(200000, '[') + std::string(200000, ']') + "}";
    require_format_error(file_of(deep), {"deeper"});
    const std::string unclosed = "{\"a\":" + std::string(200000, '{');
    require_format_error(file_of(unclosed), {});
  }
}

TEST_CASE("malformed files: a tensor's dtype, shape and offsets", "[safetensors][malformed]") {
  const auto with = [](const std::string& fields, std::size_t buffer = 8) {
    return one_tensor("\"" + NAME + "\":{" + fields + "}", buffer);
  };
  SECTION("a tensor entry that is not an object") {
    require_format_error(one_tensor("\"" + NAME + "\":5"), {QNAME, "not an object"});
    require_format_error(one_tensor("\"" + NAME + "\":[\"F32\",[2],[0,8]]"), {QNAME, "not an object"});
    require_format_error(one_tensor("\"" + NAME + "\":null"), {QNAME, "not an object"});
  }
  SECTION("an unknown or missing dtype") {
    require_format_error(with("\"dtype\":\"F48\",\"shape\":[2],\"data_offsets\":[0,8]"), {QNAME, "\"F48\""});
    require_format_error(with("\"dtype\":\"f32\",\"shape\":[2],\"data_offsets\":[0,8]"), {QNAME, "\"f32\""});
    require_format_error(with("\"dtype\":\"\",\"shape\":[2],\"data_offsets\":[0,8]"), {QNAME, "unknown dtype"});
    require_format_error(with("\"dtype\":4,\"shape\":[2],\"data_offsets\":[0,8]"), {QNAME, "dtype"});
    require_format_error(with("\"shape\":[2],\"data_offsets\":[0,8]"), {QNAME, "dtype"});
  }
  SECTION("a missing or malformed shape") {
    require_format_error(with("\"dtype\":\"F32\",\"data_offsets\":[0,8]"), {QNAME, "shape"});
    require_format_error(with("\"dtype\":\"F32\",\"shape\":2,\"data_offsets\":[0,8]"), {QNAME, "shape"});
    require_format_error(with("\"dtype\":\"F32\",\"shape\":{\"0\":2},\"data_offsets\":[0,8]"), {QNAME, "shape"});
    require_format_error(with("\"dtype\":\"F32\",\"shape\":[-2],\"data_offsets\":[0,8]"), {QNAME, "shape entry"});
    require_format_error(with("\"dtype\":\"F32\",\"shape\":[2,-1],\"data_offsets\":[0,8]"), {QNAME, "shape entry"});
    require_format_error(with("\"dtype\":\"F32\",\"shape\":[1.5],\"data_offsets\":[0,8]"), {QNAME, "shape entry"});
    require_format_error(with("\"dtype\":\"F32\",\"shape\":[2.0],\"data_offsets\":[0,8]"), {QNAME, "shape entry"});
    require_format_error(with("\"dtype\":\"F32\",\"shape\":[\"2\"],\"data_offsets\":[0,8]"), {QNAME, "shape entry"});
    require_format_error(with("\"dtype\":\"F32\",\"shape\":[true],\"data_offsets\":[0,8]"), {QNAME, "shape entry"});
  }
  SECTION("missing or malformed data_offsets") {
    require_format_error(with("\"dtype\":\"F32\",\"shape\":[2]"), {QNAME, "data_offsets"});
    require_format_error(with("\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8]"), {QNAME, "data_offsets"});
    require_format_error(with("\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8,8]"), {QNAME, "data_offsets"});
    require_format_error(with("\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[]"), {QNAME, "data_offsets"});
    require_format_error(with("\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":{\"begin\":0,\"end\":8}"),
                         {QNAME, "data_offsets"});
    require_format_error(with("\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[\"0\",\"8\"]"), {QNAME, "begin offset"});
    require_format_error(with("\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[-8,0]"), {QNAME, "begin offset"});
    require_format_error(with("\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8.0]"), {QNAME, "end offset"});
    require_format_error(with("\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,1e1]"), {QNAME, "end offset"});
  }
  SECTION("a shape whose product overflows, though it wraps to a size that would fit") {
    // 2^32 2^32 16 wraps to 0 in 64 bits, and so does 2^31 2^31 16 (only at the third factor): a
    // parser multiplying without a check would accept these with data_offsets [0, 0].
    require_format_error(with("\"dtype\":\"F32\",\"shape\":[4294967296,4294967296,16],\"data_offsets\":[0,0]", 0),
                         {QNAME, "overflow"});
    require_format_error(with("\"dtype\":\"F32\",\"shape\":[2147483648,2147483648,16],\"data_offsets\":[0,0]", 0),
                         {QNAME, "overflow"});
    // The element count fits, its byte count (x 4) wraps to 0.
    require_format_error(with("\"dtype\":\"F32\",\"shape\":[4611686018427387904],\"data_offsets\":[0,0]", 0),
                         {QNAME, "overflow"});
    require_format_error(with("\"dtype\":\"U8\",\"shape\":[18446744073709551615,2],\"data_offsets\":[0,0]", 0),
                         {QNAME, "overflow"});
  }
  SECTION("a byte count other than elements x dtype size") {
    require_format_error(with("\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,4]", 4), {QNAME, "4 bytes", "8"});
    require_format_error(with("\"dtype\":\"F16\",\"shape\":[2,2],\"data_offsets\":[0,16]", 16), {QNAME, "16 bytes", "8"});
    require_format_error(with("\"dtype\":\"F64\",\"shape\":[],\"data_offsets\":[0,0]", 0), {QNAME, "0 bytes", "8"});
    require_format_error(with("\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[0,4]", 4), {QNAME, "4 bytes"});
  }
  SECTION("an end before the beginning") {
    require_format_error(with("\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,4]"), {QNAME, "ends before it begins"});
  }
}

TEST_CASE("malformed files: the tensors must tile the buffer", "[safetensors][malformed]") {
  const std::string A = "lora_A.weight", QA = "\"" + A + "\"";
  SECTION("overlapping tensors") {
    require_format_error(
        file_of("{" + entry(A, "F32", "[2]", 0, 8) + "," + entry(NAME, "F32", "[2]", 4, 12) + "}", Bytes(12, 0)),
        {QNAME, "overlaps"});
    // The same bytes twice, and listed in the other order.
    require_format_error(
        file_of("{" + entry(NAME, "F32", "[2]", 4, 12) + "," + entry(A, "F32", "[2]", 0, 8) + "}", Bytes(12, 0)),
        {QNAME, "overlaps"});
    require_format_error(
        file_of("{" + entry(A, "F32", "[2]", 0, 8) + "," + entry(NAME, "U8", "[8]", 0, 8) + "}", Bytes(8, 0)),
        {"overlaps"});
    // An empty tensor inside another.
    require_format_error(
        file_of("{" + entry(A, "F32", "[2]", 0, 8) + "," + entry(NAME, "F32", "[0]", 4, 4) + "}", Bytes(8, 0)),
        {QNAME, "overlaps"});
  }
  SECTION("a gap between tensors or before the first") {
    require_format_error(
        file_of("{" + entry(A, "F32", "[2]", 0, 8) + "," + entry(NAME, "F32", "[2]", 12, 20) + "}", Bytes(20, 0)),
        {QNAME, "gap"});
    require_format_error(file_of("{" + entry(NAME, "F32", "[2]", 4, 12) + "}", Bytes(12, 0)), {QNAME, "gap"});
    require_format_error(file_of("{" + entry(NAME, "F32", "[0]", 4, 4) + "}", Bytes(4, 0)), {QNAME, "gap"});
  }
  SECTION("tensors not covering the buffer: trailing bytes, or data past the end of the file") {
    require_format_error(one_tensor(entry(NAME, "F32", "[2]", 0, 8), 12), {"8 bytes of a 12-byte buffer"});
    require_format_error(one_tensor(entry(NAME, "F32", "[2]", 0, 8), 1), {"8 bytes of a 1-byte buffer"});
    require_format_error(one_tensor(entry(NAME, "F32", "[2]", 0, 8), 0), {"8 bytes of a 0-byte buffer"});
    require_format_error(file_of("{}", Bytes(3, 0)), {"0 bytes of a 3-byte buffer"});
    // Offsets far past the end, with a matching shape.
    require_format_error(one_tensor(entry(NAME, "U8", "[8]", 0, 8), 0), {"8 bytes of a 0-byte buffer"});
    require_format_error(
        file_of("{" + entry(A, "F32", "[2]", 0, 8) + "," + entry(NAME, "U8", "[1000000000]", 8, 1000000008) + "}",
                Bytes(8, 0)),
        {"1000000008 bytes of a 8-byte buffer"});
  }
}

TEST_CASE("malformed files: the metadata", "[safetensors][malformed]") {
  require_format_error(file_of("{\"__metadata__\":\"pt\"}"), {"__metadata__", "not an object"});
  require_format_error(file_of("{\"__metadata__\":[\"format\",\"pt\"]}"), {"__metadata__", "not an object"});
  require_format_error(file_of("{\"__metadata__\":17}"), {"__metadata__", "not an object"});
  require_format_error(file_of("{\"__metadata__\":{\"format\":\"pt\",\"epochs\":3}}"), {"__metadata__", "\"epochs\""});
  require_format_error(file_of("{\"__metadata__\":{\"flag\":true}}"), {"\"flag\""});
  require_format_error(file_of("{\"__metadata__\":{\"none\":null}}"), {"\"none\""});
  require_format_error(file_of("{\"__metadata__\":{\"obj\":{}}}"), {"\"obj\""});
  // Valid metadata beside a malformed tensor: the tensor is still refused.
  require_format_error(file_of("{\"__metadata__\":{\"format\":\"pt\"}," + entry(NAME, "F32", "[2]", 0, 4) + "}", Bytes(4, 0)),
                       {QNAME});
}

TEST_CASE("a file that cannot be opened is a FileError", "[safetensors][read]") {
  TempDir dir;
  const std::string missing = dir.file("does-not-exist.safetensors");
  REQUIRE_THROWS_AS(SafetensorsFile(missing), peft::FileError);
  REQUIRE_THAT(message_of([&] { SafetensorsFile f(missing); }), has_substring(missing));
  // A directory is not a regular file.
  REQUIRE_THROWS_AS(SafetensorsFile(dir.path.string()), peft::FileError);
  REQUIRE_THAT(message_of([&] { SafetensorsFile f(dir.path.string()); }), has_substring(dir.path.string()));
}

// =====================================================================================================
// Writing

TEST_CASE("the writer round-trips every dtype, and writes a file this test parses on its own",
          "[safetensors][write]") {
  TempDir dir;
  const std::string path = dir.file("model.safetensors");
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();

  Eigen::MatrixXf A(3, 4);  // column-major in memory: the file is row-major
  const auto a = random_floats(12, 7);
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 4; ++j) A(i, j) = a[std::size_t(i * 4 + j)];
  // Values at F16's and BF16's edges: overflow, subnormal, underflow, ties, a NaN, -0.
  A(0, 0) = 65520.0f;
  A(0, 1) = std::ldexp(3.0f, -24);
  A(0, 2) = std::ldexp(1.0f, -25);
  A(0, 3) = 1.0f + std::ldexp(1.0f, -11);
  A(1, 0) = nan;
  A(1, 1) = -0.0f;
  A(1, 2) = -inf;
  A(1, 3) = std::numeric_limits<float>::max();
  Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> B(5, 3);
  const auto bvals = random_doubles(15, 8);
  for (int i = 0; i < 5; ++i)
    for (int j = 0; j < 3; ++j) B(i, j) = bvals[std::size_t(i * 3 + j)];
  // A double narrowed to 16 bits goes through float (as PyTorch does): 1 + 2^-11 + 2^-40 becomes the
  // float 1 + 2^-11, a tie that rounds to 1.0 in F16 (directly it would round up to 0x3C01).
  B(4, 2) = 1.0 + std::ldexp(1.0, -11) + std::ldexp(1.0, -40);
  const Eigen::MatrixXd big = Eigen::MatrixXd::Random(100, 70);  // 56 000 bytes: several chunks
  const Eigen::VectorXf vec = Eigen::VectorXf::LinSpaced(7, -1.0f, 2.0f);
  Eigen::MatrixXf scalar(1, 1);
  scalar(0, 0) = 0.1f;
  const peft::io::Metadata metadata = {{"format", "pt"}, {"base_model", "x/y"}};

  const std::vector<TensorSpec> specs = {
      {"a_f32", Dtype::F32, {3, 4}},  {"a_f64", Dtype::F64, {3, 4}},   {"a_f16", Dtype::F16, {3, 4}},
      {"a_bf16", Dtype::BF16, {3, 4}}, {"b_f64", Dtype::F64, {5, 3}},   {"b_f32", Dtype::F32, {5, 3}},
      {"b_f16", Dtype::F16, {5, 3}},   {"b_bf16", Dtype::BF16, {5, 3}}, {"big", Dtype::F64, {100, 70}},
      {"vec", Dtype::F32, {7}},        {"scalar", Dtype::F16, {}},      {"none", Dtype::BF16, {0, 3}}};
  {
    SafetensorsWriter w(path, specs, metadata);
    REQUIRE(w.next() == "a_f32");
    w.write("a_f32", A);
    REQUIRE(w.next() == "a_f64");
    w.write("a_f64", A);
    w.write("a_f16", A);
    w.write("a_bf16", A);
    w.write("b_f64", B);
    w.write("b_f32", B);
    w.write("b_f16", B);
    w.write("b_bf16", B.transpose().transpose());  // any expression
    w.write("big", big);
    w.write("vec", vec);
    w.write("scalar", scalar);
    w.write("none", Eigen::MatrixXf(0, 3));
    REQUIRE(w.next().empty());
    REQUIRE(fs::exists(path) == false);  // nothing at the destination before commit()
    w.commit();
  }
  REQUIRE(dir.entries() == std::vector<std::string>{"model.safetensors"});  // and no temporary left

  SECTION("read back with the library") {
    const SafetensorsFile f(path);
    REQUIRE(f->metadata() == metadata);
    REQUIRE(f->tensors().size() == specs.size());
    for (std::size_t k = 0; k < specs.size(); ++k) {
      REQUIRE(f->tensors()[k].name == specs[k].name);
      REQUIRE(f->tensors()[k].dtype == specs[k].dtype);
      REQUIRE(f->tensors()[k].shape == specs[k].shape);
    }
    int wrong = 0;
    const auto a32 = f->read<float>("a_f32"), a16 = f->read<float>("a_f16"), ab16 = f->read<float>("a_bf16");
    const auto a64 = f->read<double>("a_f64");
    for (int i = 0; i < 3; ++i)
      for (int j = 0; j < 4; ++j) {
        if (!same(a32(i, j), A(i, j))) ++wrong;                                       // F32: exact
        if (!same(a64(i, j), double(A(i, j)))) ++wrong;                               // F64: exact
        if (!same(a16(i, j), peft::io::f16_to_float(peft::io::float_to_f16(A(i, j))))) ++wrong;
        if (!same(ab16(i, j), peft::io::bf16_to_float(peft::io::float_to_bf16(A(i, j))))) ++wrong;
      }
    const auto b64 = f->read<double>("b_f64"), b32 = f->read<double>("b_f32");
    const auto b16 = f->read<float>("b_f16"), bb16 = f->read<float>("b_bf16");
    for (int i = 0; i < 5; ++i)
      for (int j = 0; j < 3; ++j) {
        if (!same(b64(i, j), B(i, j))) ++wrong;
        if (!same(b32(i, j), double(float(B(i, j))))) ++wrong;
        if (!same(b16(i, j), peft::io::f16_to_float(peft::io::float_to_f16(float(B(i, j)))))) ++wrong;
        if (!same(bb16(i, j), peft::io::bf16_to_float(peft::io::float_to_bf16(float(B(i, j)))))) ++wrong;
      }
    REQUIRE(wrong == 0);
    REQUIRE(f->read<double>("big") == big);
    REQUIRE(f->read<float>("vec") == vec);
    REQUIRE(f->read<float>("scalar")(0, 0) == peft::io::f16_to_float(peft::io::float_to_f16(0.1f)));
    REQUIRE(f->read<float>("none").rows() == 0);
    // The landmarks, spelled out.
    REQUIRE(a16(0, 0) == inf);                       // 65520 overflows F16
    REQUIRE(a16(0, 1) == std::ldexp(3.0f, -24));     // a subnormal
    REQUIRE(a16(0, 2) == 0.0f);                      // 2^-25 ties to 0
    REQUIRE(a16(0, 3) == 1.0f);                      // a tie to even
    REQUIRE(std::isnan(a16(1, 0)));
    REQUIRE(std::isnan(ab16(1, 0)));
    REQUIRE(bits_of(a16(1, 1)) == 0x80000000u);      // -0 stays -0
    REQUIRE(ab16(1, 3) == inf);                      // the largest float overflows BF16
    REQUIRE(b16(4, 2) == 1.0f);                      // through float, not directly
  }

  SECTION("parsed here: length, JSON, padding, contiguous offsets, the bytes of each value") {
    const Parsed p = parse_independently(read_file(path));
    REQUIRE(p.header["__metadata__"] == nlohmann::json({{"format", "pt"}, {"base_model", "x/y"}}));
    std::vector<std::string> names;
    for (const auto& s : specs) names.push_back(s.name);
    require_contiguous(p, names);
    for (const auto& s : specs) {
      INFO("tensor " << s.name);
      REQUIRE(p.header[s.name]["dtype"] == peft::io::dtype_name(s.dtype));
      REQUIRE(p.header[s.name]["shape"].get<std::vector<std::uint64_t>>() == s.shape);
    }
    const std::vector<std::string> dtypes = {"F32", "F64", "F16", "BF16"};
    REQUIRE(p.header["a_f32"]["dtype"] == "F32");
    int wrong = 0;
    for (int i = 0; i < 3; ++i)
      for (int j = 0; j < 4; ++j) {
        const float x = A(i, j);
        if (!same(element(p, "a_f32", i, j), double(x))) ++wrong;
        if (!same(element(p, "a_f64", i, j), double(x))) ++wrong;
        if (element_bits16(p, "a_f16", i, j) != peft::io::float_to_f16(x)) ++wrong;
        if (element_bits16(p, "a_bf16", i, j) != peft::io::float_to_bf16(x)) ++wrong;
      }
    for (int i = 0; i < 5; ++i)
      for (int j = 0; j < 3; ++j) {
        if (!same(element(p, "b_f64", i, j), B(i, j))) ++wrong;
        if (!same(element(p, "b_f32", i, j), double(float(B(i, j))))) ++wrong;
        if (element_bits16(p, "b_f16", i, j) != peft::io::float_to_f16(float(B(i, j)))) ++wrong;
        if (element_bits16(p, "b_bf16", i, j) != peft::io::float_to_bf16(float(B(i, j)))) ++wrong;
      }
    for (int i = 0; i < 100; ++i)
      for (int j = 0; j < 70; ++j)
        if (!same(element(p, "big", i, j), big(i, j))) ++wrong;
    for (int i = 0; i < 7; ++i)
      if (!same(element(p, "vec", i, 0), double(vec(i)))) ++wrong;
    REQUIRE(wrong == 0);
    REQUIRE(element_bits16(p, "a_f16", 0, 0) == 0x7c00);
    REQUIRE(element_bits16(p, "a_f16", 1, 0) == 0x7e00);
    REQUIRE(element_bits16(p, "a_bf16", 1, 0) == 0x7fc0);
    REQUIRE(element_bits16(p, "b_f16", 4, 2) == 0x3c00);
  }
}

TEST_CASE("the writer pads the header so that the buffer starts at a multiple of 8", "[safetensors][write]") {
  TempDir dir;
  for (std::size_t length = 1; length <= 16; ++length) {
    const std::string name(length, 'n');
    const std::string path = dir.file("pad.safetensors");
    Eigen::MatrixXd m(1, 1);
    m(0, 0) = double(length);
    peft::io::save_safetensors<double>(path, {{name, m}}, Dtype::F64, {}, false);
    const Bytes bytes = read_file(path);
    const Parsed p = parse_independently(bytes);  // (8 + N) % 8 == 0, spaces only, under 8 of them
    require_contiguous(p, {name});
    REQUIRE(p.header[name]["shape"] == nlohmann::json::array({1, 1}));
    REQUIRE(element(p, name, 0, 0) == double(length));
    // And the library's own reader views it in place: the F64 data is aligned in the mapping.
    const SafetensorsFile f(path);
    REQUIRE(f->view<double>(name)(0, 0) == double(length));
  }
  REQUIRE(dir.entries() == std::vector<std::string>{"pad.safetensors"});
}

TEST_CASE("save_safetensors writes columns as 1-D unless told otherwise", "[safetensors][write]") {
  TempDir dir;
  const Eigen::MatrixXf col = Eigen::MatrixXf::Constant(4, 1, 1.5f);
  const Eigen::MatrixXf mat = Eigen::MatrixXf::Constant(2, 3, -0.5f);
  peft::io::save_safetensors<float>(dir.file("a.safetensors"), {{"col", col}, {"mat", mat}}, Dtype::BF16, {{"k", "v"}});
  const Parsed p = parse_independently(read_file(dir.file("a.safetensors")));
  REQUIRE(p.header["col"]["shape"] == nlohmann::json::array({4}));
  REQUIRE(p.header["mat"]["shape"] == nlohmann::json::array({2, 3}));
  REQUIRE(p.header["col"]["dtype"] == "BF16");
  REQUIRE(p.header["__metadata__"]["k"] == "v");
  require_contiguous(p, {"col", "mat"});
  REQUIRE(element(p, "col", 3, 0) == 1.5);
  REQUIRE(element(p, "mat", 1, 2) == -0.5);
  peft::io::save_safetensors<float>(dir.file("b.safetensors"), {{"col", col}}, Dtype::F32, {}, false);
  const Parsed q = parse_independently(read_file(dir.file("b.safetensors")));
  REQUIRE(q.header["col"]["shape"] == nlohmann::json::array({4, 1}));
  REQUIRE(q.header.size() == 1);  // no __metadata__ when there is none
}

TEST_CASE("write_bytes streams raw bytes across tensor boundaries", "[safetensors][write]") {
  TempDir dir;
  const std::string path = dir.file("raw.safetensors");
  // u: U8 [3], i: I32 [2, 2], z: I64 [0] (nothing), f: F32 [2], l: I64 [1], flags: BOOL [4]
  const std::vector<TensorSpec> specs = {{"u", Dtype::U8, {3}},  {"i", Dtype::I32, {2, 2}}, {"z", Dtype::I64, {0}},
                                         {"f", Dtype::F32, {2}}, {"l", Dtype::I64, {1}},    {"flags", Dtype::BOOL, {4}}};
  Bytes payload;
  for (int k = 0; k < 3 + 16; ++k) payload.push_back(static_cast<unsigned char>(200 + k));
  const Bytes f = f32_bytes({0.25f, -8.0f});
  payload.insert(payload.end(), f.begin(), f.end());
  put_le(payload, 0x0102030405060708ull, 8);
  payload.insert(payload.end(), {1, 0, 0, 1});
  REQUIRE(payload.size() == 39);
  {
    SafetensorsWriter w(path, specs);
    std::vector<std::string> next;
    for (std::size_t at = 0; at < payload.size(); at += 5) {  // 5-byte pieces, across every boundary
      next.push_back(w.next());
      w.write_bytes(payload.data() + at, std::min<std::size_t>(5, payload.size() - at));
    }
    // Before each piece: the tensor its first byte goes to ("z" has no bytes: never next).
    REQUIRE(next == std::vector<std::string>{"u", "i", "i", "i", "f", "f", "l", "flags"});
    REQUIRE(w.next().empty());
    // One byte more than the tensors declare.
    const unsigned char extra = 0;
    REQUIRE_THROWS_AS(w.write_bytes(&extra, 1), peft::FormatError);
    REQUIRE_THAT(message_of([&] { w.write_bytes(&extra, 1); }), has_substring(path));
    w.commit();
  }
  const SafetensorsFile file(path);
  std::uint64_t at = 0;
  for (const auto& t : file->tensors()) {
    INFO("tensor " << t.name);
    REQUIRE(t.begin == at);
    REQUIRE(std::memcmp(file->bytes(t), payload.data() + at, std::size_t(t.end - t.begin)) == 0);
    at = t.end;
  }
  REQUIRE(at == payload.size());
  REQUIRE(file->read<float>("f")(1, 0) == -8.0f);
  REQUIRE(get_le(file->bytes(file->at("l")), 8) == 0x0102030405060708ull);
  const Parsed p = parse_independently(read_file(path));
  require_contiguous(p, {"u", "i", "z", "f", "l", "flags"});

  SECTION("raw bytes and matrices mixed; write() refuses a dtype it cannot convert") {
    const std::string mixed = dir.file("mixed.safetensors");
    {
      SafetensorsWriter w(mixed, {{"u", Dtype::U8, {3}}, {"f", Dtype::F64, {2}}, {"l", Dtype::I64, {1}}});
      const Eigen::MatrixXf zeros = Eigen::MatrixXf::Zero(3, 1);
      REQUIRE_THROWS_AS(w.write("u", zeros), peft::FormatError);
      REQUIRE_THAT(message_of([&] { w.write("u", zeros); }), has_substring("\"u\""));
      w.write_bytes(payload.data(), 3);
      w.write("f", Eigen::Vector2d(1.0, -2.0));
      w.write_bytes(payload.data(), 8);
      w.commit();
    }
    const SafetensorsFile m(mixed);
    REQUIRE(m->read<double>("f") == Eigen::Vector2d(1.0, -2.0));
    REQUIRE(std::memcmp(m->bytes(m->at("u")), payload.data(), 3) == 0);
    REQUIRE(std::memcmp(m->bytes(m->at("l")), payload.data(), 8) == 0);
  }
}

TEST_CASE("a failed or abandoned write leaves no file, no temporary, and a previous file untouched",
          "[safetensors][write]") {
  TempDir dir;
  const std::string path = dir.file("adapter.safetensors");
  const Eigen::MatrixXf a = Eigen::MatrixXf::Constant(3, 2, 1.0f);
  const Eigen::MatrixXf b = Eigen::MatrixXf::Constant(2, 2, 2.0f);
  const std::vector<TensorSpec> specs = {{"a", Dtype::F32, {3, 2}}, {"b", Dtype::F16, {2, 2}}};
  const bool previous = GENERATE(false, true);  // with no file at the destination, and with a good one
  const Bytes old = good_file();
  if (previous) write_file(path, old);
  const std::vector<std::string> before = dir.entries();

  // Runs `fail` on a fresh writer: it must throw a FormatError naming the destination and `part`.
  const auto require_failure = [&](const std::string& part, const auto& fail) {
    {
      SafetensorsWriter w(path, specs);
      REQUIRE(dir.entries().size() == before.size() + 1);  // the temporary, beside the destination
      REQUIRE_THROWS_AS(fail(w), peft::FormatError);
    }
    {
      SafetensorsWriter w(path, specs);
      const std::string msg = message_of([&] { fail(w); });
      REQUIRE_THAT(msg, has_substring(path));
      REQUIRE_THAT(msg, has_substring(part));
    }
    REQUIRE(dir.entries() == before);
    if (previous) REQUIRE(read_file(path) == old);
  };

  SECTION("a tensor written out of order") {
    require_failure("\"b\"", [&](SafetensorsWriter& w) { w.write("b", b); });
  }
  SECTION("a tensor written twice") {
    require_failure("\"a\"", [&](SafetensorsWriter& w) {
      w.write("a", a);
      w.write("a", a);
    });
  }
  SECTION("a tensor not in the specs") {
    require_failure("\"c\"", [&](SafetensorsWriter& w) { w.write("c", a); });
  }
  SECTION("a tensor after part of it was written as bytes") {
    require_failure("\"a\"", [&](SafetensorsWriter& w) {
      const float x = 1.0f;
      w.write_bytes(&x, 4);
      w.write("a", a);
    });
  }
  SECTION("a matrix of the wrong shape") {
    require_failure("\"a\"", [&](SafetensorsWriter& w) { w.write("a", Eigen::MatrixXf(2, 3)); });
    require_failure("\"a\"", [&](SafetensorsWriter& w) { w.write("a", Eigen::MatrixXf(3, 1)); });
    require_failure("\"b\"", [&](SafetensorsWriter& w) {
      w.write("a", a);
      w.write("b", Eigen::MatrixXf(4, 1));
    });
  }
  SECTION("commit with a tensor missing") {
    require_failure("\"a\"", [&](SafetensorsWriter& w) { w.commit(); });
    require_failure("\"b\"", [&](SafetensorsWriter& w) {
      w.write("a", a);
      w.commit();
    });
    require_failure("\"b\"", [&](SafetensorsWriter& w) {
      w.write("a", a);
      const unsigned char half_of_b[4] = {0, 0, 0, 0};
      w.write_bytes(half_of_b, 4);
      w.commit();
    });
  }
  SECTION("more bytes than the tensors declare") {
    require_failure("more bytes", [&](SafetensorsWriter& w) {
      const Bytes too_many(3 * 2 * 4 + 2 * 2 * 2 + 1, 0);
      w.write_bytes(too_many.data(), too_many.size());
    });
  }
  SECTION("a complete writer destroyed without commit()") {
    {
      SafetensorsWriter w(path, specs);
      w.write("a", a);
      w.write("b", b);
    }
    REQUIRE(dir.entries() == before);
    if (previous) REQUIRE(read_file(path) == old);
  }
  SECTION("bad specs: refused before any file is created") {
    for (const auto& bad : std::vector<std::vector<TensorSpec>>{
             {{"a", Dtype::F32, {1}}, {"a", Dtype::F32, {1}}},
             {{"a", Dtype::F32, {1}}, {"", Dtype::F32, {1}}},
             {{"__metadata__", Dtype::F32, {1}}},
             {{"a", Dtype::F32, {4294967296ull, 4294967296ull}}}}) {
      REQUIRE_THROWS_AS(SafetensorsWriter(path, bad), peft::FormatError);
      REQUIRE_THAT(message_of([&] { SafetensorsWriter w(path, bad); }), has_substring(path));
      REQUIRE(dir.entries() == before);
    }
    REQUIRE_THAT(message_of([&] { SafetensorsWriter w(path, {{"a", Dtype::F32, {1}}, {"a", Dtype::F32, {1}}}); }),
                 has_substring("\"a\""));
    if (previous) REQUIRE(read_file(path) == old);
  }
  SECTION("a successful commit replaces the previous file") {
    {
      SafetensorsWriter w(path, specs);
      w.write("a", a);
      w.write("b", b);
      if (previous) REQUIRE(read_file(path) == old);  // untouched until commit()
      w.commit();
    }
    REQUIRE(dir.entries() == std::vector<std::string>{"adapter.safetensors"});
    const SafetensorsFile f(path);
    REQUIRE(f->read<float>("a") == a);
    REQUIRE(f->read<float>("b") == b);
  }
}

TEST_CASE("a writer into a directory that does not exist is a FileError", "[safetensors][write]") {
  TempDir dir;
  const std::string path = dir.file("no/such/dir/x.safetensors");
  REQUIRE_THROWS_AS(SafetensorsWriter(path, {{"a", Dtype::F32, {1}}}), peft::FileError);
  REQUIRE(dir.entries().empty());
}

TEST_CASE("the writer takes matrices of either storage order, blocks and maps, row-major on disk",
          "[safetensors][write]") {
  TempDir dir;
  const std::string path = dir.file("layouts.safetensors");
  using RowF = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using RowD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  RowF big(4, 6);
  RowD bigd(4, 6);
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 6; ++j) {
      big(i, j) = float(10 * i + j) + 0.5f;
      bigd(i, j) = double(10 * i + j) + 0.25;
    }
  const Eigen::MatrixXf col_major = big;                       // same values, column-major storage
  const std::vector<float> raw(big.data(), big.data() + 24);  // row-major bytes of big
  const Eigen::Map<const RowF> mapped(raw.data(), 4, 6);
  const Eigen::Map<const RowF, 0, Eigen::OuterStride<>> strided(raw.data() + 1, 3, 2, Eigen::OuterStride<>(6));
  {
    SafetensorsWriter w(path, {{"row_f32", Dtype::F32, {4, 6}},
                               {"row_f64", Dtype::F64, {4, 6}},
                               {"col_f32", Dtype::F32, {4, 6}},
                               {"block_f32", Dtype::F32, {2, 3}},   // rows 1..2, cols 2..4 of big
                               {"blockd_f64", Dtype::F64, {3, 2}},  // rows 0..2, cols 4..5 of bigd
                               {"map_f32", Dtype::F32, {4, 6}},
                               {"strided_f32", Dtype::F32, {3, 2}},
                               {"row_as_f64", Dtype::F64, {4, 6}},   // float into F64
                               {"rowd_as_f32", Dtype::F32, {4, 6}},  // double into F32
                               {"row_f16", Dtype::F16, {4, 6}},
                               {"transposed_f32", Dtype::F32, {6, 4}},  // col_major transposed
                               {"rows_f32", Dtype::F32, {2, 6}},        // rows 1..2 of big, whole
                               {"row_f32_1x6", Dtype::F32, {1, 6}}});   // row 3 of big
    w.write("row_f32", big);
    w.write("row_f64", bigd);
    w.write("col_f32", col_major);
    w.write("block_f32", big.block(1, 2, 2, 3));
    w.write("blockd_f64", bigd.block(0, 4, 3, 2));
    w.write("map_f32", mapped);
    w.write("strided_f32", strided);
    w.write("row_as_f64", big);
    w.write("rowd_as_f32", bigd);
    w.write("row_f16", big);
    w.write("transposed_f32", col_major.transpose());
    w.write("rows_f32", big.block(1, 0, 2, 6));
    w.write("row_f32_1x6", big.row(3));
    w.commit();
  }
  const Parsed p = parse_independently(read_file(path));
  require_contiguous(p, {"row_f32", "row_f64", "col_f32", "block_f32", "blockd_f64", "map_f32", "strided_f32",
                         "row_as_f64", "rowd_as_f32", "row_f16", "transposed_f32", "rows_f32", "row_f32_1x6"});
  int wrong = 0;
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 6; ++j) {
      for (const char* name : {"row_f32", "col_f32", "map_f32", "row_as_f64", "row_f16"})
        if (element(p, name, i, j) != double(big(i, j))) ++wrong;
      if (element(p, "row_f64", i, j) != bigd(i, j)) ++wrong;
      if (element(p, "rowd_as_f32", i, j) != double(float(bigd(i, j)))) ++wrong;
      if (element(p, "transposed_f32", j, i) != double(big(i, j))) ++wrong;
      if (i >= 1 && i <= 2 && element(p, "rows_f32", i - 1, j) != double(big(i, j))) ++wrong;
      if (i == 3 && element(p, "row_f32_1x6", 0, j) != double(big(i, j))) ++wrong;
    }
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 3; ++j)
      if (element(p, "block_f32", i, j) != double(big(1 + i, 2 + j))) ++wrong;
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 2; ++j) {
      if (element(p, "blockd_f64", i, j) != bigd(i, 4 + j)) ++wrong;
      if (element(p, "strided_f32", i, j) != double(raw[std::size_t(6 * i + 1 + j)])) ++wrong;
    }
  REQUIRE(wrong == 0);
}

// =====================================================================================================
// Found by review of io/safetensors.hpp, and fixed there.

TEST_CASE("a NUL byte does not end the header: what follows it must be JSON whitespace", "[safetensors]") {
  // nlohmann's lexer takes '\0' for the end of the input, so "{}\0<anything>" parses as "{}"; the
  // reference implementation (serde_json::from_str) refuses the trailing characters.
  require_format_error(file_of(std::string("{}\0", 3)), {});
  require_format_error(file_of(std::string("{}\0garbage", 10)), {});
  require_format_error(file_of(std::string("{\"__metadata__\":{\"a\":\"b\"}}\0{\"x\":1}", 34)), {});
}

TEST_CASE("the writer refuses specs whose byte count or offsets overflow", "[safetensors]") {
  // 2^62 U64 elements are 2^65 bytes: wrapped to 0, the writer declares data_offsets [0, 0] and commits a
  // file its own reader refuses ("byte count overflows").
  TempDir dir;
  const std::string path = dir.file("overflow.safetensors");
  REQUIRE_THROWS_AS(SafetensorsWriter(path, {{"x", Dtype::U64, {std::uint64_t(1) << 62}}}), peft::FormatError);
  // Two tensors of 2^63 bytes: the second one's end offset wraps to 0.
  REQUIRE_THROWS_AS(SafetensorsWriter(path, {{"a", Dtype::U8, {std::uint64_t(1) << 63}},
                                             {"b", Dtype::U8, {std::uint64_t(1) << 63}}}),
                    peft::FormatError);
  REQUIRE(dir.entries().empty());
}

TEST_CASE("two writers to the same destination do not share a temporary", "[safetensors]") {
  // Both write `<path>.tmp-<pid>`: the second truncates the first's temporary, and when it is abandoned
  // its buffered header lands in the file the first has renamed to the destination.
  TempDir dir;
  const std::string path = dir.file("shared.safetensors");
  const Eigen::MatrixXf a = Eigen::MatrixXf::Constant(4, 1, 3.0f);
  {
    SafetensorsWriter first(path, {{"a", Dtype::F32, {4}}});
    {
      SafetensorsWriter second(path, {{"a_much_longer_name", Dtype::F64, {4}}});
      first.write("a", a);
      first.commit();
    }  // abandoned
  }
  REQUIRE(dir.entries() == std::vector<std::string>{"shared.safetensors"});
  const SafetensorsFile f(path);
  REQUIRE(f->read<float>("a") == a);
}
