// safetensors reading (io/safetensors.hpp), against files built byte by byte here, independently of the
// library (support/safetensors_builder.hpp): F32 / F64 / F16 / BF16 read into float and double
// (matrices, vectors, scalars, empty tensors, rows from an offset), metadata, zero-copy views, the other
// dtypes listed but not converted, the valid headers; and every kind of malformed file refused with a
// FormatError naming the file and, where one is at fault, the tensor, in memory and through the
// memory-mapped file. The writer has its own test (safetensors_write_test.cpp).

#include "support/catch.hpp"
#include "support/errors.hpp"
#include "support/files.hpp"
#include "support/safetensors_builder.hpp"
#include "support/scratch.hpp"

#include <peft/io/safetensors.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <limits>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

using peft::io::Dtype;
using peft::io::SafetensorsFile;
using peft::io::SafetensorsView;
using peft::test::bits_of;
using peft::test::Builder;
using peft::test::Bytes;
using peft::test::entry;
using peft::test::f16_value;
using peft::test::f32_bytes;
using peft::test::f64_bytes;
using peft::test::file_of;
using peft::test::float_of;
using peft::test::get_le;
using peft::test::has_substring;
using peft::test::message_of;
using peft::test::put_le;
using peft::test::random_doubles;
using peft::test::random_floats;
using peft::test::same;
using peft::test::Scratch;
using peft::test::u16_bytes;
using peft::test::write_file;

static_assert(std::is_base_of<peft::Error, peft::FormatError>::value, "");
static_assert(std::is_base_of<peft::Error, peft::FileError>::value, "");

namespace {

/// Bytes in a heap block of exactly their size, so that the sanitizers see any read past the end.
struct Memory {
  std::unique_ptr<unsigned char[]> data;
  std::size_t size;
  explicit Memory(const Bytes& b) : data(new unsigned char[b.size()]), size(b.size()) {
    if (!b.empty()) std::memcpy(data.get(), b.data(), b.size());
  }
};

// ---------------------------------------------------------------------------------------------------
// Malformed files.

/// Requires parsing `file` to throw a FormatError whose message names the file (its label in memory,
/// its path on disk) and contains each of `parts`: in memory (SafetensorsView) and mapped from a file
/// (SafetensorsFile).
void require_format_error(const Bytes& file, std::initializer_list<std::string> parts) {
  static int count = 0;
  static const Scratch cases("malformed_cases");
  ++count;
  const std::string label = "memory-case-" + std::to_string(count) + ".safetensors";
  const Memory m(file);
  REQUIRE_THROWS_AS(SafetensorsView(m.data.get(), m.size, label), peft::FormatError);
  const std::string in_memory = message_of([&] { SafetensorsView(m.data.get(), m.size, label); });
  INFO("message: " << in_memory);
  REQUIRE_THAT(in_memory, has_substring(label));
  for (const auto& part : parts) REQUIRE_THAT(in_memory, has_substring(part));

  const std::string path = cases / ("file-case-" + std::to_string(count) + ".safetensors");
  write_file(path, file);
  REQUIRE_THROWS_AS(SafetensorsFile(path), peft::FormatError);
  const std::string on_disk = message_of([&] { SafetensorsFile f(path); });
  INFO("message: " << on_disk);
  REQUIRE_THAT(on_disk, has_substring(path));
  for (const auto& part : parts) REQUIRE_THAT(on_disk, has_substring(part));
  std::filesystem::remove(path);
}

/// The tensor name the malformed-file cases use, distinct from every word of the messages.
const std::string NAME = "lora_B.weight";
const std::string QNAME = "\"" + NAME + "\"";  // as messages quote it

/// A file whose header is the one member `member` (formatted by the caller), then `buffer_bytes` zeros.
Bytes one_tensor(const std::string& member, std::size_t buffer_bytes = 8) {
  return file_of("{" + member + "}", Bytes(buffer_bytes, 0));
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
    const Scratch dir;
    write_file(dir / "model.safetensors", file);
    SafetensorsFile f(dir / "model.safetensors");
    REQUIRE(f->label() == dir / "model.safetensors");
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
    const Scratch dir;
    write_file(dir / "v.safetensors", file);
    const SafetensorsFile f(dir / "v.safetensors");
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
  const Scratch dir;
  const std::string missing = dir / "does-not-exist.safetensors";
  REQUIRE_THROWS_AS(SafetensorsFile(missing), peft::FileError);
  REQUIRE_THAT(message_of([&] { SafetensorsFile f(missing); }), has_substring(missing));
  // A directory is not a regular file.
  REQUIRE_THROWS_AS(SafetensorsFile(dir.dir.string()), peft::FileError);
  REQUIRE_THAT(message_of([&] { SafetensorsFile f(dir.dir.string()); }), has_substring(dir.dir.string()));
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
