// safetensors writing (io/safetensors.hpp): the streaming writer and save_safetensors. Every dtype
// round-trips through the library's reader, and the file written is a valid safetensors file by the
// tests' own independent parser (support/safetensors_reader.hpp: the length, the JSON, the padding, the
// offsets and each value's bytes); storage orders, blocks and maps are written row-major; raw bytes
// stream across tensors; a failed or abandoned write leaves no file, no temporary and any previous file
// untouched; and specs whose sizes overflow are refused. The reader has its own test
// (safetensors_read_test.cpp).

#include "support/catch.hpp"
#include "support/errors.hpp"
#include "support/files.hpp"
#include "support/safetensors_builder.hpp"
#include "support/safetensors_reader.hpp"
#include "support/scratch.hpp"

#include <peft/core/half.hpp>
#include <peft/io/safetensors.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <limits>
#include <string>
#include <vector>

namespace fs = std::filesystem;
using peft::io::Dtype;
using peft::io::SafetensorsFile;
using peft::io::SafetensorsWriter;
using peft::io::TensorSpec;
using peft::test::bits_of;
using peft::test::Builder;
using peft::test::Bytes;
using peft::test::element;
using peft::test::element_bits16;
using peft::test::f32_bytes;
using peft::test::get_le;
using peft::test::has_substring;
using peft::test::message_of;
using peft::test::put_le;
using peft::test::random_doubles;
using peft::test::random_floats;
using peft::test::RawSafetensors;
using peft::test::read_file;
using peft::test::same;
using peft::test::Scratch;
using peft::test::write_file;

namespace {

// ---------------------------------------------------------------------------------------------------
// The writer's output, parsed here: length, JSON (by nlohmann::json directly), padding, offsets.

/// The file parsed by the tests' own reader, and the header's padding checked: spaces after the closing
/// brace only, fewer than 8 of them, so that the buffer starts at a multiple of 8.
RawSafetensors parse_independently(const Bytes& file) {
  const RawSafetensors p = peft::test::parse_safetensors(file);
  const std::string& text = p.header_text;
  REQUIRE(text.front() == '{');
  const std::size_t close = text.find_last_of('}');
  REQUIRE(close != std::string::npos);
  REQUIRE(text.find_first_not_of(' ', close + 1) == std::string::npos);
  REQUIRE((8 + p.header_length) % 8 == 0);
  REQUIRE(text.size() - close - 1 < 8);  // no more padding than needed
  return p;
}

/// Checks the tensors of `p` are exactly `names`, with offsets contiguous in that order from 0 to the end
/// of the buffer, each of the byte count its dtype and shape need.
void require_contiguous(const RawSafetensors& p, const std::vector<std::string>& names) {
  std::uint64_t at = 0;
  std::size_t tensors = 0;
  for (auto it = p.header.begin(); it != p.header.end(); ++it)
    if (it.key() != "__metadata__") ++tensors;
  REQUIRE(tensors == names.size());
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
    REQUIRE(end - begin == elements * peft::test::raw_dtype_size(t["dtype"].get<std::string>()));
    at = end;
  }
  REQUIRE(at == p.buffer_size);
}

/// A valid file for the "untouched" checks.
Bytes good_file() {
  return Builder().tensor("old", "F32", "[3]", f32_bytes({1.0f, 2.0f, 3.0f})).bytes();
}

}  // namespace

// =====================================================================================================
// Writing

TEST_CASE("the writer round-trips every dtype, and writes a file this test parses on its own",
          "[safetensors][write]") {
  const Scratch dir;
  const std::string path = dir / "model.safetensors";
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
    const RawSafetensors p = parse_independently(read_file<Bytes>(path));
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
  const Scratch dir;
  for (std::size_t length = 1; length <= 16; ++length) {
    const std::string name(length, 'n');
    const std::string path = dir / "pad.safetensors";
    Eigen::MatrixXd m(1, 1);
    m(0, 0) = double(length);
    peft::io::save_safetensors<double>(path, {{name, m}}, Dtype::F64, {}, false);
    const Bytes bytes = read_file<Bytes>(path);
    const RawSafetensors p = parse_independently(bytes);  // (8 + N) % 8 == 0, spaces only, under 8 of them
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
  const Scratch dir;
  const Eigen::MatrixXf col = Eigen::MatrixXf::Constant(4, 1, 1.5f);
  const Eigen::MatrixXf mat = Eigen::MatrixXf::Constant(2, 3, -0.5f);
  peft::io::save_safetensors<float>(dir / "a.safetensors", {{"col", col}, {"mat", mat}}, Dtype::BF16, {{"k", "v"}});
  const RawSafetensors p = parse_independently(read_file<Bytes>(dir / "a.safetensors"));
  REQUIRE(p.header["col"]["shape"] == nlohmann::json::array({4}));
  REQUIRE(p.header["mat"]["shape"] == nlohmann::json::array({2, 3}));
  REQUIRE(p.header["col"]["dtype"] == "BF16");
  REQUIRE(p.header["__metadata__"]["k"] == "v");
  require_contiguous(p, {"col", "mat"});
  REQUIRE(element(p, "col", 3, 0) == 1.5);
  REQUIRE(element(p, "mat", 1, 2) == -0.5);
  peft::io::save_safetensors<float>(dir / "b.safetensors", {{"col", col}}, Dtype::F32, {}, false);
  const RawSafetensors q = parse_independently(read_file<Bytes>(dir / "b.safetensors"));
  REQUIRE(q.header["col"]["shape"] == nlohmann::json::array({4, 1}));
  REQUIRE(q.header.size() == 1);  // no __metadata__ when there is none
}

TEST_CASE("write_bytes streams raw bytes across tensor boundaries", "[safetensors][write]") {
  const Scratch dir;
  const std::string path = dir / "raw.safetensors";
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
  const RawSafetensors p = parse_independently(read_file<Bytes>(path));
  require_contiguous(p, {"u", "i", "z", "f", "l", "flags"});

  SECTION("raw bytes and matrices mixed; write() refuses a dtype it cannot convert") {
    const std::string mixed = dir / "mixed.safetensors";
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
  const Scratch dir;
  const std::string path = dir / "adapter.safetensors";
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
    if (previous) REQUIRE(read_file<Bytes>(path) == old);
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
    if (previous) REQUIRE(read_file<Bytes>(path) == old);
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
    if (previous) REQUIRE(read_file<Bytes>(path) == old);
  }
  SECTION("a successful commit replaces the previous file") {
    {
      SafetensorsWriter w(path, specs);
      w.write("a", a);
      w.write("b", b);
      if (previous) REQUIRE(read_file<Bytes>(path) == old);  // untouched until commit()
      w.commit();
    }
    REQUIRE(dir.entries() == std::vector<std::string>{"adapter.safetensors"});
    const SafetensorsFile f(path);
    REQUIRE(f->read<float>("a") == a);
    REQUIRE(f->read<float>("b") == b);
  }
}

TEST_CASE("a writer into a directory that does not exist is a FileError", "[safetensors][write]") {
  const Scratch dir;
  const std::string path = dir / "no/such/dir/x.safetensors";
  REQUIRE_THROWS_AS(SafetensorsWriter(path, {{"a", Dtype::F32, {1}}}), peft::FileError);
  REQUIRE(dir.entries().empty());
}

TEST_CASE("the writer takes matrices of either storage order, blocks and maps, row-major on disk",
          "[safetensors][write]") {
  const Scratch dir;
  const std::string path = dir / "layouts.safetensors";
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
  const RawSafetensors p = parse_independently(read_file<Bytes>(path));
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

TEST_CASE("the writer refuses specs whose byte count or offsets overflow", "[safetensors]") {
  // 2^62 U64 elements are 2^65 bytes: wrapped to 0, the writer declares data_offsets [0, 0] and commits a
  // file its own reader refuses ("byte count overflows").
  const Scratch dir;
  const std::string path = dir / "overflow.safetensors";
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
  const Scratch dir;
  const std::string path = dir / "shared.safetensors";
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
