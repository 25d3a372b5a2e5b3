// peft-export-gguf: a Hugging Face PEFT adapter (LoRA, rsLoRA, rank and alpha patterns; DoRA through an
// SVD) exported as a llama.cpp GGUF LoRA adapter that llama.cpp applies exactly as PEFT would:
//
//   peft-export-gguf --adapter ADAPTER_DIR --config config.json --out adapter.gguf
//                    [--dora refuse|svd] [--rank K] [--base model.safetensors|model.safetensors.index.json]
//                    [--svd auto|exact|randomized] [--no-rank-padding] [--outtype f32|f16|bf16]
//
// config.json is the base model's (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM). Each module's
// scale is encoded exactly where one file-wide alpha allows (peft/io/gguf_export.hpp says how); q_proj and
// k_proj are put in llama.cpp's rotary row order. Everything is checked before the file is written, to a
// temporary renamed into place: an error leaves no output file behind.
#include <peft/io/gguf_export.hpp>

#include <cstdlib>
#include <iostream>
#include <string>

namespace {

[[noreturn]] void usage(const std::string& why) {
  std::cerr << "peft-export-gguf: " << why << "\n"
            << "usage: peft-export-gguf --adapter ADAPTER_DIR --config config.json --out adapter.gguf\n"
            << "                        [--dora refuse|svd] [--rank K] [--base model.safetensors|INDEX.json]\n"
            << "                        [--svd auto|exact|randomized] [--no-rank-padding] [--outtype f32|f16|bf16]\n";
  std::exit(2);
}

peft::io::GgufExportOptions parse(int argc, char** argv) {
  peft::io::GgufExportOptions o;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") usage("exports a PEFT adapter as a llama.cpp GGUF LoRA adapter");
    if (arg == "--no-rank-padding") {
      o.rank_padding = false;
      continue;
    }
    if (i + 1 >= argc) usage("missing value after " + arg);
    const std::string value = argv[++i];
    if (arg == "--adapter") {
      o.adapter = value;
    } else if (arg == "--config") {
      o.config = value;
    } else if (arg == "--out") {
      o.out = value;
    } else if (arg == "--base") {
      o.base = value;
    } else if (arg == "--dora") {
      if (value != "refuse" && value != "svd") usage("--dora takes refuse or svd, not " + value);
      o.dora = value;
    } else if (arg == "--rank") {
      char* end = nullptr;
      const long k = std::strtol(value.c_str(), &end, 10);
      if (end == value.c_str() || *end != '\0' || k < 1 || k > (1L << 30)) usage("--rank takes a positive integer: " + value);
      o.rank = peft::Index(k);
    } else if (arg == "--svd") {
      if (value == "auto") o.svd = peft::io::SvdMethod::Auto;
      else if (value == "exact") o.svd = peft::io::SvdMethod::Exact;
      else if (value == "randomized") o.svd = peft::io::SvdMethod::Randomized;
      else usage("--svd takes auto, exact or randomized, not " + value);
    } else if (arg == "--outtype") {
      if (value == "f32") o.type = peft::io::GgufType::F32;
      else if (value == "f16") o.type = peft::io::GgufType::F16;
      else if (value == "bf16") o.type = peft::io::GgufType::BF16;
      else usage("--outtype takes f32, f16 or bf16, not " + value);
    } else {
      usage("unknown argument " + arg);
    }
  }
  if (o.adapter.empty() || o.config.empty() || o.out.empty()) usage("--adapter, --config and --out are required");
  if (o.rank > 0 && o.dora != "svd") usage("--rank applies to --dora svd only");
  return o;
}

}  // namespace

int main(int argc, char** argv) {
  const peft::io::GgufExportOptions o = parse(argc, argv);
  try {
    peft::io::export_gguf(o, std::cout, std::cerr);
    return 0;
  } catch (const peft::Error& e) {
    std::cerr << "peft-export-gguf: " << e.what() << "\n";
  } catch (const std::exception& e) {  // the filesystem's own errors
    std::cerr << "peft-export-gguf: " << e.what() << "\n";
  }
  return 1;
}
