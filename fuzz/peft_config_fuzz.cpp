// libFuzzer target for the PEFT adapter config parser (include/peft/io/peft_adapter.hpp):
// parse_peft_config() over the input as the text of an adapter_config.json. On success, the ranks,
// alphas and scales of a few module paths are asked for (which runs the rank and alpha pattern
// regular expressions). The same bytes are also read as a random stream's saved state (Rng::set_state,
// which load_checkpoint runs on a checkpoint's metadata: only std::invalid_argument may come out) and as
// a module selector's regular expression, and as a base model's config.json for the GGUF export
// (parse_model_config, then the llama.cpp tensor of a few module paths). The contract under test: every failure is a peft::Error (or,
// for the stream, std::invalid_argument); any other exception,
// sanitizer report, timeout or huge allocation is a finding. Seed corpus: fuzz/corpus/peft_config/.
// Build and run as safetensors_fuzz.cpp says.

#include "peft/core/random.hpp"
#include "peft/io/gguf_export.hpp"
#include "peft/io/peft_adapter.hpp"
#include "peft/model/targets.hpp"

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  try {
    const peft::io::PeftConfig c = peft::io::parse_peft_config(text, "fuzz/adapter_config.json");
    if (c.r <= 0) std::abort();  // the parser promises a positive rank
    for (const char* path : {"model.layers.0.self_attn.q_proj", "q_proj", "lm_head", ""}) {
      const auto rank = c.rank_for(path);
      if (rank <= 0) std::abort();
      (void)c.alpha_for(path);
      (void)c.scale_for(path);
    }
  } catch (const peft::Error&) {
    // a refused or malformed config: expected
  }
  try {
    peft::Rng rng;
    rng.set_state(text);
    const double u = rng.uniform();
    if (!(u >= 0.0 && u < 1.0)) std::abort();
  } catch (const std::invalid_argument&) {
    // not a saved state: expected
  }
  try {
    const peft::ModuleSelector s = peft::ModuleSelector::regex(text);
    (void)s.matches("model.layers.0.self_attn.q_proj");
  } catch (const peft::Error&) {
    // too long or not a regular expression: expected
  }
  try {
    const peft::io::LlamaFamilyConfig c = peft::io::parse_model_config(text, "fuzz/config.json");
    if (c.head_dim <= 0 || c.num_key_value_heads <= 0 || c.num_attention_heads % c.num_key_value_heads != 0) std::abort();
    for (const char* path : {"model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "lm_head"}) {
      try {
        const peft::io::GgufTarget t = peft::io::gguf_target(path, c);
        if (t.d_out <= 0 || t.d_in <= 0) std::abort();
      } catch (const peft::Error&) {
        // a layer the model does not have, or a tied lm_head: expected
      }
    }
  } catch (const peft::Error&) {
    // not a Llama-family config: expected
  }
  return 0;
}
