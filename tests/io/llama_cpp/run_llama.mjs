// Runs llama.cpp itself (the prebuilt CPU build of the npm package node-llama-cpp) on a GGUF model, with
// or without a GGUF LoRA adapter, and prints the raw logits after the last of the given tokens as JSON.
// gguf_end_to_end_test.cpp runs it; scripts/deps.sh (peft_install_llama_cpp) installs the package.
//
//   node run_llama.mjs NODE_MODULES_PARENT MODEL.gguf LORA.gguf|- TOKEN,TOKEN,...
//
// One thread, no flash attention and a float32 KV cache: llama.cpp's CPU flash attention and its default
// KV cache compute in float16, which would blur a comparison at 1e-3.
import path from "node:path";
import {pathToFileURL} from "node:url";

const [modules, model, lora, tokenList] = process.argv.slice(2);
if (!tokenList) {
  console.error("usage: node run_llama.mjs NODE_MODULES_PARENT MODEL.gguf LORA.gguf|- TOKEN,TOKEN,...");
  process.exit(2);
}
const entry = path.join(modules, "node_modules", "node-llama-cpp", "dist", "index.js");
const {getLlama, LlamaLogLevel} = await import(pathToFileURL(entry).href);
const tokens = tokenList.split(",").map(Number);

const llama = await getLlama({gpu: false, build: "never", logLevel: LlamaLogLevel.error});
const loaded = await llama.loadModel({modelPath: model});
const context = await loaded.createContext({
  contextSize: 64, batchSize: 64, sequences: 1, threads: 1, flashAttention: false,
  experimentalKvCacheKeyType: "F32", experimentalKvCacheValueType: "F32",
  ...(lora !== "-" ? {lora: {adapters: [{filePath: lora, scale: 1}]}} : {})
});
const sequence = context.getSequence();
const input = tokens.map((t, i) => (i === tokens.length - 1 ? [t, {generateNext: {logits: true}}] : t));
const out = await sequence.controlledEvaluate(input);
const next = out[tokens.length - 1].next.logits;
const values = [];
for (const [token, value] of next) values[token] = value;
console.log(JSON.stringify({llama_cpp: llama.llamaCppRelease, logits: values}));
await context.dispose();
await loaded.dispose();
await llama.dispose();
