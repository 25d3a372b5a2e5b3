// peft-merge: a Hugging Face PEFT adapter (LoRA, rsLoRA, DoRA; rank and alpha patterns; fan_in_fan_out;
// modules_to_save) merged into a safetensors model for deployment, exactly as PEFT's merge_and_unload():
//
//   peft-merge --base model.safetensors --adapter ADAPTER_DIR --out merged.safetensors [--scale S]
//   peft-merge --base model.safetensors.index.json --adapter ADAPTER_DIR --out OUTDIR/model.safetensors.index.json
//
// F32 and F64 weights are merged in their own precision; F16 and BF16 weights in float32, rounded back
// to their dtype once. Every other tensor is copied bit for bit, metadata kept. A sharded base gives
// sharded output with the same shard names; one shard is read (memory-mapped) at a time. Everything is
// checked before anything is written; output goes to temporaries renamed into place when complete, so
// an error leaves no output file behind and the inputs are never written.
#include <peft/io/merge_model.hpp>

#include <cmath>
#include <cstdlib>
#include <iostream>
#include <string>

namespace {

using Options = peft::io::MergeOptions;

[[noreturn]] void usage(const std::string& why) {
  std::cerr << "peft-merge: " << why << "\n"
            << "usage: peft-merge --base model.safetensors|model.safetensors.index.json --adapter ADAPTER_DIR\n"
            << "                  --out merged.safetensors|OUTDIR/model.safetensors.index.json [--scale S]\n";
  std::exit(2);
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") usage("merges a PEFT adapter into a safetensors model");
    if (i + 1 >= argc) usage("missing value after " + arg);
    const std::string value = argv[++i];
    if (arg == "--base") {
      o.base = value;
    } else if (arg == "--adapter") {
      o.adapter = value;
    } else if (arg == "--out") {
      o.out = value;
    } else if (arg == "--scale") {
      char* end = nullptr;
      o.scale = std::strtod(value.c_str(), &end);
      if (end == value.c_str() || *end != '\0' || !std::isfinite(o.scale)) usage("--scale takes a number: " + value);
    } else {
      usage("unknown argument " + arg);
    }
  }
  if (o.base.empty() || o.adapter.empty() || o.out.empty()) usage("--base, --adapter and --out are required");
  return o;
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse(argc, argv);
  try {
    peft::io::merge_model(o, std::cout, std::cerr);
    return 0;
  } catch (const peft::Error& e) {
    std::cerr << "peft-merge: " << e.what() << "\n";
  } catch (const std::exception& e) {  // the filesystem's own errors (a full disk, a rename refused)
    std::cerr << "peft-merge: " << e.what() << "\n";
  }
  return 1;
}
