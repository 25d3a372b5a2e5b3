// The GGUF writer (io/gguf.hpp) and the llama.cpp LoRA exporter (io/gguf_export.hpp): the writer's layout
// and errors; the Hugging Face config, the module names and the rotary row order, the scale encoding;
// and exports of adapter directories written here as Hugging Face PEFT writes them (LoRA on every
// projection and lm_head, rsLoRA and the patterns, Mistral and Qwen2, F16 and BF16, DoRA through the
// SVD) with every refused input. Every GGUF file is read back by the tests' own reader
// (support/gguf_reader.hpp: the bytes, not our writer's code), and every merge computed from the
// exported tensors with llama.cpp's formula, W + (α / r') · b a in float, is compared with PEFT's merge
// of the original adapter, W + fl(s) · B A in float, element by element
// (support/gguf_export_fixture.hpp). The program and llama.cpp itself have their own test
// (gguf_end_to_end_test.cpp).
#include "support/catch.hpp"
#include "support/files.hpp"
#include "support/gguf_export_fixture.hpp"
#include "support/gguf_reader.hpp"
#include "support/scratch.hpp"

#include <peft/io/gguf.hpp>
#include <peft/io/gguf_export.hpp>
#include <peft/io/merge.hpp>
#include <peft/io/safetensors.hpp>

#include <peft/detail/kernels.hpp>
#include <peft/linalg/svd.hpp>

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <sstream>
#include <string>
#include <vector>

namespace fs = std::filesystem;
using peft::test::GgufRead;
using peft::test::has_substring;
using peft::test::read_gguf;
using peft::test::Scratch;
using peft::test::uniform_matrix;
using peft::test::write_file;
using namespace peft::test::gguf_fixture;

// ---------------------------------------------------------------------------------------------------

TEST_CASE("GgufWriter: the header, metadata, tensor infos, alignment and values as the format lays them out") {
  Scratch s("writer");
  const MatrixXf m1 = uniform_matrix(3, 5, 1).cast<float>();
  const MatrixXf m2 = uniform_matrix(7, 2, 2).cast<float>();
  for (std::uint32_t alignment : {32u, 64u, 8u}) {
    INFO("alignment " << alignment);
    peft::io::GgufWriter w(s / "a.gguf", alignment);
    w.set_string("general.architecture", "llama");
    w.set_u32("x.u32", 4000000000u);
    w.set_i32("x.i32", -7);
    w.set_f32("x.f32", 0.1f);
    w.set_bool("x.bool", true);
    w.set_strings("x.strings", {"a", "", "ccc"});
    w.set_f32s("x.f32s", {1.5f, -2.0f});
    w.set_i32s("x.i32s", {3, -4, 5});
    w.add_tensor("t1", peft::io::GgufType::F32, {5, 3});
    w.add_tensor("t2", peft::io::GgufType::F16, {2, 7});
    w.add_tensor("t3", peft::io::GgufType::BF16, {2, 7});
    w.write("t1", m1);
    w.write("t2", m2);
    w.write("t3", m2);
    const std::uint64_t expected_size = w.file_size();
    w.commit();
    const GgufRead g = read_gguf(s / "a.gguf");
    CHECK(g.version == 3);
    CHECK(g.file_size == expected_size);
    CHECK(g.alignment == alignment);
    CHECK(g.kv.count("general.alignment") == (alignment == 32 ? 0u : 1u));
    CHECK(g.kv.at("general.architecture").text == "llama");
    CHECK(g.kv.at("general.architecture").type == 8);
    CHECK(g.kv.at("x.u32").number == 4000000000.0);
    CHECK(g.kv.at("x.u32").type == 4);
    CHECK(g.kv.at("x.i32").number == -7.0);
    CHECK(g.kv.at("x.f32").number == double(0.1f));
    CHECK(g.kv.at("x.f32").type == 6);
    CHECK(g.kv.at("x.bool").number == 1.0);
    CHECK(g.kv.at("x.bool").type == 7);
    CHECK(g.kv.at("x.strings").texts == std::vector<std::string>{"a", "", "ccc"});
    CHECK(g.kv.at("x.f32s").numbers == std::vector<double>{1.5, -2.0});
    CHECK(g.kv.at("x.i32s").numbers == std::vector<double>{3, -4, 5});
    CHECK(g.tensor_order == std::vector<std::string>{"t1", "t2", "t3"});
    CHECK(g.tensors.at("t1").ne == std::vector<std::uint64_t>{5, 3});
    CHECK(g.tensors.at("t1").type == 0);
    CHECK(g.tensors.at("t2").type == 1);
    CHECK(g.tensors.at("t3").type == 30);
    CHECK(g.tensors.at("t1").values == m1);
    for (Index i = 0; i < m2.rows(); ++i)
      for (Index j = 0; j < m2.cols(); ++j) {
        CHECK(g.tensors.at("t2").values(i, j) == peft::io::f16_to_float(peft::io::float_to_f16(m2(i, j))));
        CHECK(g.tensors.at("t3").values(i, j) == peft::io::bf16_to_float(peft::io::float_to_bf16(m2(i, j))));
      }
    CHECK(std::abs(g.tensors.at("t2").values(0, 0) - m2(0, 0)) <= 1e-3);
  }
}

TEST_CASE("GgufWriter: every documented error, and no file left behind") {
  Scratch s("writer_errors");
  write_file(s / "keep.gguf", "previous contents");
  REQUIRE_THROWS_AS(peft::io::GgufWriter(s / "x.gguf", 24), peft::ConfigError);
  {
    peft::io::GgufWriter w(s / "keep.gguf");
    w.set_string("k", "v");
    REQUIRE_THROWS_WITH(w.set_u32("k", 1), has_substring("repeated"));
    REQUIRE_THROWS_WITH(w.set_u32("", 1), has_substring("empty"));
    REQUIRE_THROWS_WITH(w.add_tensor(std::string(64, 'n'), peft::io::GgufType::F32, {1}), has_substring("longer than 63"));
    w.add_tensor(std::string(63, 'n'), peft::io::GgufType::F32, {1});
    w.add_tensor("t", peft::io::GgufType::F32, {2, 2});
    REQUIRE_THROWS_WITH(w.add_tensor("t", peft::io::GgufType::F32, {1}), has_substring("repeated"));
    REQUIRE_THROWS_WITH(w.add_tensor("u", peft::io::GgufType::F32, {}), has_substring("not 1 to 4"));
    REQUIRE_THROWS_WITH(w.add_tensor("u", peft::io::GgufType::F32, {1, 1, 1, 1, 1}), has_substring("not 1 to 4"));
    REQUIRE_THROWS_WITH(w.add_tensor("u", peft::io::GgufType::F32, {2, 0}), has_substring("zero extent"));
    REQUIRE_THROWS_WITH(w.add_tensor("u", peft::io::GgufType::F32, {1ull << 40, 1ull << 40}), has_substring("overflows"));
    REQUIRE_THROWS_WITH(w.write("t", MatrixXf::Zero(2, 2)), has_substring("out of order"));
    w.write(std::string(63, 'n'), MatrixXf::Zero(1, 1));
    REQUIRE_THROWS_WITH(w.write("t", MatrixXf::Zero(1, 4)), has_substring("extents [2, 2]"));
    REQUIRE_THROWS_WITH(w.set_u32("late", 1), has_substring("after the first tensor"));
    REQUIRE_THROWS_WITH(w.add_tensor("late", peft::io::GgufType::F32, {1}), has_substring("after the first tensor"));
    REQUIRE_THROWS_WITH(w.commit(), has_substring("\"t\" not written"));
  }  // destroyed without a commit: the temporary is removed, the old file kept
  CHECK(s.entries() == std::vector<std::string>{"keep.gguf"});
  std::ifstream in(s / "keep.gguf");
  std::string text;
  std::getline(in, text);
  CHECK(text == "previous contents");
}

TEST_CASE("export: the Hugging Face config is read, and other architectures refused naming them") {
  Model m;
  const auto c = peft::io::parse_model_config(m.json(), "config.json");
  CHECK(c.gguf_architecture == "llama");
  CHECK(c.rotary_permutation);
  CHECK(c.head_dim == 4);
  CHECK(c.num_key_value_heads == 2);
  m.architecture = "MistralForCausalLM";
  CHECK(peft::io::parse_model_config(m.json(), "c").gguf_architecture == "llama");
  m.architecture = "Qwen2ForCausalLM";
  const auto q = peft::io::parse_model_config(m.json(), "c");
  CHECK(q.gguf_architecture == "qwen2");
  CHECK_FALSE(q.rotary_permutation);
  m.architecture = "GPT2LMHeadModel";
  REQUIRE_THROWS_AS(peft::io::parse_model_config(m.json(), "c"), peft::ConfigError);
  REQUIRE_THROWS_WITH(peft::io::parse_model_config(m.json(), "c"), has_substring("GPT2LMHeadModel"));
  REQUIRE_THROWS_WITH(peft::io::parse_model_config("{", "c"), has_substring("not valid JSON"));
  REQUIRE_THROWS_WITH(peft::io::parse_model_config("[]", "c"), has_substring("not a JSON object"));
  REQUIRE_THROWS_WITH(peft::io::parse_model_config(R"({"hidden_size": 4})", "c"), has_substring("architectures"));
  REQUIRE_THROWS_WITH(peft::io::parse_model_config(R"({"architectures": ["LlamaForCausalLM"], "hidden_size": 16})", "c"),
                      has_substring("no \"intermediate_size\""));
  std::string bad = Model().json();
  bad.replace(bad.find("\"num_key_value_heads\": 2"), 24, "\"num_key_value_heads\": 3");
  REQUIRE_THROWS_WITH(peft::io::parse_model_config(bad, "c"), has_substring("not a multiple of num_key_value_heads"));
  bad = Model().json();
  bad.replace(bad.find("\"hidden_size\": 16"), 17, "\"hidden_size\": -16");
  REQUIRE_THROWS_WITH(peft::io::parse_model_config(bad, "c"), has_substring("not a positive integer"));
  bad = Model().json();
  bad.replace(bad.find("\"tie_word_embeddings\": false"), 28, "\"tie_word_embeddings\": 1");
  REQUIRE_THROWS_WITH(peft::io::parse_model_config(bad, "c"), has_substring("tie_word_embeddings"));
}

TEST_CASE("export: module names, and the rotary row order as llama.cpp's converter writes it") {
  const auto c = peft::io::parse_model_config(Model().json(), "c");
  CHECK(peft::io::gguf_target("model.layers.0.self_attn.q_proj", c).name == "blk.0.attn_q.weight");
  CHECK(peft::io::gguf_target("model.layers.1.self_attn.k_proj", c).name == "blk.1.attn_k.weight");
  CHECK(peft::io::gguf_target("model.layers.1.self_attn.v_proj", c).name == "blk.1.attn_v.weight");
  CHECK(peft::io::gguf_target("model.layers.1.self_attn.o_proj", c).name == "blk.1.attn_output.weight");
  CHECK(peft::io::gguf_target("model.layers.0.mlp.gate_proj", c).name == "blk.0.ffn_gate.weight");
  CHECK(peft::io::gguf_target("model.layers.0.mlp.up_proj", c).name == "blk.0.ffn_up.weight");
  CHECK(peft::io::gguf_target("model.layers.0.mlp.down_proj", c).name == "blk.0.ffn_down.weight");
  CHECK(peft::io::gguf_target("lm_head", c).name == "output.weight");
  CHECK(peft::io::gguf_target("model.layers.0.self_attn.q_proj", c).rotary_heads == 4);
  CHECK(peft::io::gguf_target("model.layers.0.self_attn.k_proj", c).rotary_heads == 2);
  CHECK(peft::io::gguf_target("model.layers.0.self_attn.v_proj", c).rotary_heads == 0);
  REQUIRE_THROWS_WITH(peft::io::gguf_target("model.layers.2.self_attn.q_proj", c), has_substring("num_hidden_layers"));
  REQUIRE_THROWS_WITH(peft::io::gguf_target("model.layers.0.mlp.extra_proj", c), has_substring("no llama.cpp LoRA counterpart"));
  REQUIRE_THROWS_WITH(peft::io::gguf_target("model.layers.00.self_attn.q_proj", c), has_substring("no llama.cpp"));
  Model tied;
  tied.tied = true;
  REQUIRE_THROWS_WITH(peft::io::gguf_target("lm_head", peft::io::parse_model_config(tied.json(), "c")),
                      has_substring("tie_word_embeddings"));
  // The library's reordering against the converter's, written independently above.
  const MatrixXf W = uniform_matrix(16, 3, 5).cast<float>();
  for (Index heads : {1, 2, 4, 8}) {
    MatrixXf P = W;
    peft::io::permute_rotary_rows(P, heads);
    CHECK(P == llama_permute(W, heads));
  }
  MatrixXf odd = uniform_matrix(12, 2, 1).cast<float>();
  REQUIRE_THROWS_AS(peft::io::permute_rotary_rows(odd, 4), peft::ShapeError);  // heads of 3 rows
}

TEST_CASE("export: the scale encoding is exact in llama.cpp's float arithmetic, or says it is not") {
  using peft::io::ScaleNeed;
  const auto exact_under = [](const peft::io::ScalePlan& p, const std::vector<ScaleNeed>& needs) {
    for (std::size_t i = 0; i < needs.size(); ++i) {
      const auto& c = p.modules[i];
      const float sigma = p.alpha / float(c.stored_rank);  // llama.cpp's, at user scale 1
      if (!(float(double(sigma) * c.fold) == needs[i].scale && c.exact)) return false;
      int e = 0;
      if (c.fold != 0 && std::frexp(std::fabs(c.fold), &e) != 0.5) return false;  // a power of two
    }
    return true;
  };
  SECTION("one scale: alpha / r itself") {
    const std::vector<ScaleNeed> n = {{2.0f, 8, 10}, {2.0f, 8, 20}};
    const auto p = peft::io::plan_scales(n, true);
    CHECK(p.alpha == 16.0f);
    CHECK(exact_under(p, n));
    CHECK(p.padded_parameters == 0);
  }
  SECTION("rank_pattern: one alpha serves every rank") {
    const std::vector<ScaleNeed> n = {{16.0f / 8, 8, 10}, {16.0f / 4, 4, 10}, {16.0f / 16, 16, 10}};
    const auto p = peft::io::plan_scales(n, true);
    CHECK(exact_under(p, n));
    CHECK(p.padded_parameters == 0);
  }
  SECTION("rsLoRA at one rank: alpha sqrt(r), found to the last bit") {
    for (int r : {3, 5, 7, 8, 12, 24, 48, 100}) {
      const std::vector<ScaleNeed> n = {{float(16.0 / std::sqrt(double(r))), r, 10}};
      const auto p = peft::io::plan_scales(n, false);
      INFO("r = " << r);
      CHECK(exact_under(p, n));
      CHECK(p.inexact == 0);
    }
  }
  SECTION("alpha_pattern by powers of two: folded exactly") {
    const std::vector<ScaleNeed> n = {{2.0f, 8, 10}, {4.0f, 8, 10}, {0.5f, 8, 10}};
    const auto p = peft::io::plan_scales(n, false);
    CHECK(exact_under(p, n));
    CHECK(p.padded_parameters == 0);
  }
  SECTION("alpha_pattern 16 and 24 at r = 8: exact by padding to 12, inexact without") {
    const std::vector<ScaleNeed> n = {{2.0f, 8, 10}, {2.0f, 8, 10}, {3.0f, 8, 10}};
    const auto p = peft::io::plan_scales(n, true);
    CHECK(exact_under(p, n));
    // Padding every module of scale 2 to 12 would do (α 24); the plan finds less: α 18, rank 9 for scale 2,
    // and 12 with lora_b doubled for scale 3.
    CHECK(p.padded_parameters <= 2 * 4 * 10);
    CHECK(p.padded_parameters > 0);
    const auto q = peft::io::plan_scales(n, false);
    CHECK(q.inexact == 1);  // the minority
    CHECK_FALSE(q.modules[2].exact);
    CHECK(q.modules[0].exact);
    CHECK(std::abs(q.alpha / 8.0f * q.modules[2].fold - 3.0) < 1e-6);
  }
  SECTION("the direct search for the smallest exact stored rank finds what a scan of every rank finds") {
    std::mt19937 gen(7);
    std::size_t found = 0;
    for (int trial = 0; trial < 4000; ++trial) {
      const Index r = Index(1 + gen() % 300);
      const double a_m = double(1 + gen() % 64);
      const float scale = float(trial % 2 ? a_m / std::sqrt(double(r)) : a_m / double(r)) * (trial % 7 == 0 ? -1.0f : 1.0f);
      // α near fl(scale · r'') for some r'' (where exact choices exist), or anything.
      const Index r2 = Index(1 + gen() % 600);
      float alpha = trial % 3 ? float(double(scale) * double(r2)) * float(1 << (gen() % 3)) : float(1 + gen() % 1000) / 7.0f;
      for (int u = int(gen() % 5) - 2; u != 0; u += u > 0 ? -1 : 1) alpha = std::nextafter(alpha, u > 0 ? INFINITY : -INFINITY);
      const Index hi = trial % 4 ? 2 * r : r;
      double fold_direct = 0, fold_scan = 0;
      const Index direct = peft::io::gguf_detail::smallest_exact_rank(alpha, scale, r, hi, fold_direct);
      Index scan = 0;
      for (Index k = r; k <= hi && scan == 0; ++k)
        if (peft::io::gguf_detail::exact_fold(alpha, k, scale, fold_scan)) scan = k;
      INFO("alpha " << alpha << " scale " << scale << " ranks [" << r << ", " << hi << "]");
      REQUIRE(direct == scan);
      if (scan) REQUIRE(fold_direct == fold_scan);
      found += scan != 0;
    }
    CHECK(found > 100);  // many cases have an answer (284 of 4000 here), so both paths are exercised
  }
  SECTION("a zero scale is exported as zeros, exactly") {
    const std::vector<ScaleNeed> n = {{0.0f, 4, 10}, {1.0f, 4, 10}};
    const auto p = peft::io::plan_scales(n, false);
    CHECK(p.modules[0].fold == 0.0);
    CHECK(p.modules[0].exact);
    CHECK(p.inexact == 0);
  }
}

TEST_CASE("export: LoRA on every projection and lm_head, merged by llama.cpp's formula, equals PEFT's merge bit for bit") {
  Scratch s("lora");
  Model model;
  write_file(s / "config.json", model.json());
  const auto factors = write_adapter(s / "adapter", model, all_modules(model, true), 4, 8, "");
  const auto o = options(s);
  const auto summary = export_quiet(o);
  CHECK(summary.inexact == 0);
  CHECK(summary.modules.size() == factors.size());
  const GgufRead g = read_gguf(o.out);
  CHECK(g.version == 3);
  CHECK(g.kv.at("general.architecture").text == "llama");
  CHECK(g.kv.at("general.type").text == "adapter");
  CHECK(g.kv.at("adapter.type").text == "lora");
  CHECK(g.kv.at("adapter.lora.alpha").type == 6);  // float32, as llama.cpp reads it
  CHECK(g.kv.at("adapter.lora.alpha").number == 8.0);
  CHECK(g.tensors.size() == 2 * factors.size());
  // Block by block, q k v output gate up down, lora_a before lora_b; output.weight last.
  CHECK(g.tensor_order.front() == "blk.0.attn_q.weight.lora_a");
  CHECK(g.tensor_order[1] == "blk.0.attn_q.weight.lora_b");
  CHECK(g.tensor_order[13] == "blk.0.ffn_down.weight.lora_b");
  CHECK(g.tensor_order[14] == "blk.1.attn_q.weight.lora_a");
  CHECK(g.tensor_order.back() == "output.weight.lora_b");
  const peft::io::PeftAdapter<double> adapter(o.adapter);
  check_export(g, model, factors, adapter.config(), true, true);
}

TEST_CASE("export: without the rotary reordering, q and k would be applied to the wrong rows") {
  Scratch s("rotary");
  Model model;
  write_file(s / "config.json", model.json());
  const auto factors = write_adapter(s / "adapter", model, {"model.layers.0.self_attn.q_proj"}, 4, 8, "");
  const auto o = options(s);
  export_quiet(o);
  const GgufRead g = read_gguf(o.out);
  const peft::io::PeftAdapter<double> adapter(o.adapter);
  CHECK(check_export(g, model, factors, adapter.config(), true, true) == 0.0);
  // The same file taken as if no reordering were needed is far off: the test sees the difference.
  CHECK(check_export(g, model, factors, adapter.config(), false, false) > 0.1);
}

TEST_CASE("export: rsLoRA, rank_pattern and alpha_pattern, every module's scale exact") {
  Scratch s("patterns");
  Model model;
  write_file(s / "config.json", model.json());
  const auto modules = all_modules(model, false);
  std::map<std::string, Index> ranks;
  for (const auto& m : modules)
    if (m.find("q_proj") != std::string::npos) ranks[m] = 8;
    else if (m.find("down_proj") != std::string::npos) ranks[m] = 2;
  SECTION("rank_pattern and alpha_pattern (alpha 8, 32 on v_proj, 12 on down_proj)") {
    const auto factors = write_adapter(s / "adapter", model, modules, 4, 8,
                                       R"(, "rank_pattern": {"q_proj": 8, "down_proj": 2}, "alpha_pattern": {"v_proj": 32, "down_proj": 12})",
                                       ranks);
    const auto o = options(s);
    const auto summary = export_quiet(o);
    CHECK(summary.inexact == 0);
    const peft::io::PeftAdapter<double> adapter(o.adapter);
    CHECK(adapter.config().scale_for("model.layers.0.mlp.down_proj") == 6.0);
    check_export(read_gguf(o.out), model, factors, adapter.config(), true, true);
  }
  SECTION("rsLoRA at one rank") {
    const auto factors = write_adapter(s / "adapter", model, modules, 12, 16, R"(, "use_rslora": true)", {});
    const auto o = options(s);
    const auto summary = export_quiet(o);
    CHECK(summary.inexact == 0);
    CHECK(summary.padded_parameters == 0);
    const peft::io::PeftAdapter<double> adapter(o.adapter);
    check_export(read_gguf(o.out), model, factors, adapter.config(), true, true);
  }
  SECTION("rsLoRA with rank_pattern: exact where one alpha allows, within one rounding elsewhere, as reported") {
    const auto factors = write_adapter(s / "adapter", model, modules, 4, 16,
                                       R"(, "use_rslora": true, "rank_pattern": {"q_proj": 8, "down_proj": 2})", ranks);
    auto o = options(s);
    o.rank_padding = false;
    std::ostringstream report, progress;
    const auto summary = peft::io::export_gguf(o, report, progress);
    CHECK(summary.inexact > 0);
    CHECK(report.str().find("INEXACT") != std::string::npos);
    const peft::io::PeftAdapter<double> adapter(o.adapter);
    const double worst = check_export(read_gguf(o.out), model, factors, adapter.config(), true, false);
    CHECK(worst < 4e-7);  // a rounding of lora_b's elements and one of the scale
    std::size_t exact = 0;
    for (const auto& m : summary.modules) exact += m.encoding.exact;
    CHECK(exact + summary.inexact == summary.modules.size());
  }
  SECTION("alpha_pattern 16 and 24 at r = 8: exact by zero padding, the stored rank reported") {
    const auto factors = write_adapter(s / "adapter", model, modules, 8, 16, R"(, "alpha_pattern": {"k_proj": 24})", {});
    const auto o = options(s);
    std::ostringstream report, progress;
    const auto summary = peft::io::export_gguf(o, report, progress);
    CHECK(summary.inexact == 0);
    CHECK(summary.padded_parameters > 0);
    CHECK(report.str().find("stored as ") != std::string::npos);
    const peft::io::PeftAdapter<double> adapter(o.adapter);
    check_export(read_gguf(o.out), model, factors, adapter.config(), true, true);
  }
}

TEST_CASE("export: Mistral and Qwen2 (Qwen2 without the rotary reordering)") {
  Scratch s("families");
  for (const char* arch : {"MistralForCausalLM", "Qwen2ForCausalLM"}) {
    INFO(arch);
    Model model;
    model.architecture = arch;
    write_file(s / "config.json", model.json());
    fs::remove_all(s / "adapter");
    const auto factors = write_adapter(s / "adapter", model, all_modules(model, false), 4, 8, "");
    const auto o = options(s);
    export_quiet(o);
    const GgufRead g = read_gguf(o.out);
    const bool qwen = std::string(arch) == "Qwen2ForCausalLM";
    CHECK(g.kv.at("general.architecture").text == (qwen ? "qwen2" : "llama"));
    const peft::io::PeftAdapter<double> adapter(o.adapter);
    check_export(g, model, factors, adapter.config(), !qwen, true);
  }
}

TEST_CASE("export: F16 and BF16 tensors are the F32 ones rounded") {
  Scratch s("half");
  Model model;
  write_file(s / "config.json", model.json());
  const auto factors = write_adapter(s / "adapter", model, {"model.layers.0.self_attn.v_proj"}, 4, 8, "");
  auto o = options(s);
  export_quiet(o);
  const GgufRead full = read_gguf(o.out);
  for (auto type : {peft::io::GgufType::F16, peft::io::GgufType::BF16}) {
    o.type = type;
    o.out = s / "half.gguf";
    export_quiet(o);
    const GgufRead g = read_gguf(o.out);
    for (const char* part : {".lora_a", ".lora_b"}) {
      const auto& t = g.tensors.at(std::string("blk.0.attn_v.weight") + part);
      const auto& f = full.tensors.at(std::string("blk.0.attn_v.weight") + part);
      CHECK(t.type == std::uint32_t(type));
      for (Index i = 0; i < t.values.rows(); ++i)
        for (Index j = 0; j < t.values.cols(); ++j)
          CHECK(t.values(i, j) == (type == peft::io::GgufType::F16
                                       ? peft::io::f16_to_float(peft::io::float_to_f16(f.values(i, j)))
                                       : peft::io::bf16_to_float(peft::io::float_to_bf16(f.values(i, j)))));
    }
  }
}

namespace {

/// Writes the base weights of `modules` (float32, row-major d_out x d_in) as a safetensors model.
std::map<std::string, MatrixXd> write_base(const std::string& path, const Model& model, const std::vector<std::string>& modules) {
  std::vector<std::pair<std::string, MatrixXd>> tensors;
  std::map<std::string, MatrixXd> out;
  unsigned seed = 500;
  for (const auto& m : modules) {
    const auto [d_out, d_in] = model.shape(m);
    MatrixXd W = uniform_matrix(d_out, d_in, ++seed).cast<float>().cast<double>();
    tensors.emplace_back(m + ".weight", W);
    out[m] = W;
  }
  tensors.emplace_back("model.norm.weight", MatrixXd::Ones(model.hidden, 1));
  peft::io::save_safetensors<double>(path, tensors, peft::io::Dtype::F32);
  return out;
}

/// DoRA's change in double, and its best rank-K error.
MatrixXd dora_change(const MatrixXd& W, const ModuleFactors& f, double s) {
  MatrixXd merged = W;
  peft::merge::dora(merged, f.A, f.B, f.magnitude, s);
  return merged - W;
}

}  // namespace

TEST_CASE("export: DoRA refused by default, and through the SVD exact at full rank and the reported error below it") {
  Scratch s("dora");
  Model model;
  write_file(s / "config.json", model.json());
  const std::vector<std::string> modules = {"model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"};
  const auto factors = write_adapter(s / "adapter", model, modules, 4, 8, "", {}, true);
  const auto base = write_base(s / "model.safetensors", model, modules);
  const peft::io::PeftAdapter<double> adapter(s / "adapter");

  SECTION("refused by default, naming the module and the way out; nothing written") {
    auto o = options(s);
    REQUIRE_THROWS_AS(export_quiet(o), peft::ConfigError);
    REQUIRE_THROWS_WITH(export_quiet(o), has_substring("\"model.layers.0.self_attn.q_proj\" is DoRA") &&
                                             has_substring("--dora svd --rank K"));
    o.dora = "svd";
    REQUIRE_THROWS_WITH(export_quiet(o), has_substring("--base"));
    o.base = s / "model.safetensors";
    o.rank = 17;
    REQUIRE_THROWS_WITH(export_quiet(o), has_substring("larger than min(d_out, d_in) = 16"));
    o.base = s / "missing.safetensors";
    o.rank = 4;
    REQUIRE_THROWS_AS(export_quiet(o), peft::FileError);
    CHECK_FALSE(fs::exists(s / "adapter.gguf"));
  }
  for (auto method : {peft::io::SvdMethod::Exact, peft::io::SvdMethod::Randomized}) {
    INFO((method == peft::io::SvdMethod::Exact ? "exact SVD" : "randomized SVD"));
    for (Index K : {Index(16), Index(3)}) {
      INFO("rank " << K);
      auto o = options(s);
      o.dora = "svd";
      o.base = s / "model.safetensors";
      o.rank = K;
      o.svd = method;
      const auto summary = export_quiet(o);
      const GgufRead g = read_gguf(o.out);
      for (const auto& m : summary.modules) {
        INFO(m.path);
        const auto& f = factors.at(m.path);
        const MatrixXd W = base.at(m.path);
        MatrixXd delta = dora_change(W, f, adapter.config().scale_for(m.path));
        const bool q = m.path.find("q_proj") != std::string::npos;
        if (q) delta = llama_permute(delta, model.heads);
        const auto& a = g.tensors.at(m.tensor + ".lora_a");
        const auto& b = g.tensors.at(m.tensor + ".lora_b");
        const double sigma = double(float(g.kv.at("adapter.lora.alpha").number) / float(b.ne[0]));
        MatrixXd exported(b.values.rows(), a.values.cols());
        peft::detail::product(exported, MatrixXd(b.values.cast<double>()), MatrixXd(a.values.cast<double>()), sigma, false);
        const double error = (delta - exported).norm() / delta.norm();
        // The best rank-K error, from the singular values of ΔW.
        const VectorXd sv = peft::exact_svd(delta, std::min(delta.rows(), delta.cols())).S;
        const double best = std::sqrt(sv.tail(sv.size() - std::min<Index>(K, sv.size())).squaredNorm()) / delta.norm();
        CHECK(std::abs(error - m.relative_error) <= 1e-6 + 1e-4 * m.relative_error);  // the report is what the file holds
        if (K >= sv.size()) {
          CHECK(error < 1e-6);  // full rank: ΔW itself, to float rounding
        } else {
          CHECK(error >= best * (1 - 1e-9) - 1e-7);
          CHECK(error <= best * (method == peft::io::SvdMethod::Exact ? 1 + 1e-6 : 1.02) + 1e-7);
        }
      }
    }
  }
}

TEST_CASE("export: every refused input is a clear error, and an existing output file is kept") {
  Scratch s("errors");
  Model model;
  write_file(s / "config.json", model.json());
  write_file(s / "adapter.gguf", "the previous export");
  const auto expect_kept = [&] {
    for (const auto& e : s.entries()) CHECK(e.find(".tmp-") == std::string::npos);
    std::ifstream in(s / "adapter.gguf");
    std::string text;
    std::getline(in, text);
    CHECK(text == "the previous export");
  };
  SECTION("a module llama.cpp cannot reach") {
    write_adapter(s / "adapter", model, {"model.layers.0.self_attn.q_proj"}, 4, 8, "");
    write_adapter(s / "other", model, {}, 4, 8, "");
    Model wide = model;
    wide.hidden = 20;
    fs::remove_all(s / "adapter");
    write_adapter(s / "adapter", wide, {"model.layers.0.self_attn.q_proj"}, 4, 8, "");
    REQUIRE_THROWS_AS(export_quiet(options(s)), peft::ShapeError);
    REQUIRE_THROWS_WITH(export_quiet(options(s)), has_substring("blk.0.attn_q.weight 16 x 16"));
  }
  SECTION("the wrong layer count") {
    Model deep = model;
    deep.layers = 3;
    write_adapter(s / "adapter", deep, {"model.layers.2.mlp.up_proj"}, 4, 8, "");
    REQUIRE_THROWS_WITH(export_quiet(options(s)), has_substring("layer 2") && has_substring("num_hidden_layers"));
  }
  SECTION("lm_head of a model that ties it to the embeddings") {
    Model tied = model;
    tied.tied = true;
    write_file(s / "config.json", tied.json());
    write_adapter(s / "adapter", tied, {"lm_head"}, 4, 8, "");
    REQUIRE_THROWS_WITH(export_quiet(options(s)), has_substring("tie_word_embeddings"));
  }
  SECTION("modules_to_save") {
    write_adapter(s / "adapter", model, {"model.layers.0.self_attn.q_proj"}, 4, 8, R"(, "modules_to_save": ["score"])");
    std::vector<std::pair<std::string, MatrixXd>> t = {
        {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", uniform_matrix(4, 16, 1)},
        {"base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight", uniform_matrix(16, 4, 2)},
        {"base_model.model.score.modules_to_save.default.weight", uniform_matrix(2, 16, 3)}};
    peft::io::save_safetensors<double>(s / "adapter/adapter_model.safetensors", t, peft::io::Dtype::F32);
    REQUIRE_THROWS_WITH(export_quiet(options(s)), has_substring("modules_to_save") && has_substring("score"));
  }
  SECTION("an output that is an input") {
    write_adapter(s / "adapter", model, {"model.layers.0.self_attn.q_proj"}, 4, 8, "");
    for (const std::string& input : {s / "config.json", s / "adapter/adapter_model.safetensors", s / "adapter/adapter_config.json"}) {
      auto o = options(s);
      o.out = input;
      const auto before = fs::file_size(input);
      REQUIRE_THROWS_AS(export_quiet(o), peft::ConfigError);
      REQUIRE_THROWS_WITH(export_quiet(o), has_substring("is the input"));
      CHECK(fs::file_size(input) == before);
    }
    auto o = options(s);
    o.adapter = s / "adapter/";  // a trailing separator still names the adapter
    export_quiet(o);
    CHECK(read_gguf(s / "adapter.gguf").kv.at("general.name").text == "adapter");
    write_file(s / "adapter.gguf", "the previous export");
  }
  SECTION("fan_in_fan_out, another architecture, a missing config") {
    write_adapter(s / "adapter", model, {"model.layers.0.self_attn.q_proj"}, 4, 8, R"(, "fan_in_fan_out": true)");
    REQUIRE_THROWS_WITH(export_quiet(options(s)), has_substring("fan_in_fan_out"));
    Model gpt = model;
    gpt.architecture = "GPT2LMHeadModel";
    write_file(s / "config.json", gpt.json());
    REQUIRE_THROWS_WITH(export_quiet(options(s)), has_substring("GPT2LMHeadModel"));
    auto o = options(s);
    o.config = s / "nothing.json";
    REQUIRE_THROWS_AS(export_quiet(o), peft::FileError);
  }
  expect_kept();
}
