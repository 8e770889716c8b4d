#!/usr/bin/env node
// Load a GGUF file with llama.cpp (the prebuilt CPU binary shipped by the npm package
// node-llama-cpp), tokenize a prompt and greedily generate N tokens; print one JSON line
// with the prompt ids, the generated ids and text, and what llama.cpp reported about the
// file (architecture, vocabulary type, tensor types). Not part of CI.
//
// Set up once, outside the repository (no compiler needed: npm's install scripts are
// not run, and the prebuilt @node-llama-cpp/linux-x64 binary is used; `build: "never"`
// below refuses to fall back to compiling llama.cpp from source):
//
//   mkdir -p /work/llamacpp-check && cd /work/llamacpp-check
//   NODE_LLAMA_CPP_SKIP_DOWNLOAD=true npm install node-llama-cpp@3.22.1
//
// Run (NODE_PATH lets this script, which lives in the repo, find that install):
//
//   NODE_PATH=/work/llamacpp-check/node_modules node scripts/check_gguf_llamacpp.mjs \
//       model.gguf "The capital of France is" 24
//
// and compare with our side (f32 weights, greedy; --quant none so qlora does not
// re-quantize the decoded GGUF weights to NF4):
//
//   qlora generate --model model.gguf --prompt "The capital of France is" \
//       --max-new-tokens 24 --temperature 0 --quant none
//
// Greedy decoding is compared token by token: the sequences agree up to the first
// position where the two runtimes' top-2 logits are closer than their numeric
// difference (llama.cpp computes in f32/f16 with its own kernels and quantizes the
// activations for q8_0/q4 matmuls, qlora dequantizes the weights to f32).

import { createRequire } from "node:module";
import path from "node:path";

const require = createRequire(import.meta.url);

async function loadNodeLlamaCpp() {
    const roots = (process.env.NODE_PATH || "").split(path.delimiter).filter(Boolean);
    for (const root of roots) {
        try {
            const entry = require.resolve("node-llama-cpp", { paths: [root] });
            return await import(entry);
        } catch {
            // try the next root
        }
    }
    return await import("node-llama-cpp");
}

const [modelPath, prompt = "The capital of France is", nArg = "24"] = process.argv.slice(2);
if (!modelPath) {
    console.error("usage: check_gguf_llamacpp.mjs <model.gguf> [prompt] [max_new_tokens]");
    process.exit(2);
}
const maxNew = Number.parseInt(nArg, 10);

const { getLlama, LlamaLogLevel } = await loadNodeLlamaCpp();
const logs = [];
const llama = await getLlama({
    gpu: false,
    build: "never",
    logLevel: LlamaLogLevel.info,
    logger: (level, message) => logs.push(String(message).trimEnd()),
});
const model = await llama.loadModel({ modelPath: path.resolve(modelPath) });
const context = await model.createContext({ contextSize: 512, threads: 2 });
const sequence = context.getSequence();

let promptIds = model.tokenize(prompt, false);
if (model.tokens.shouldPrependBosToken && model.tokens.bos != null) {
    promptIds = [model.tokens.bos, ...promptIds];
}
const generated = [];
const t0 = performance.now();
for await (const token of sequence.evaluate(promptIds, { temperature: 0 })) {
    if (model.isEogToken(token)) break;
    generated.push(token);
    if (generated.length >= maxNew) break;
}
const secs = (performance.now() - t0) / 1000;

// What llama.cpp's loader said about the file: the type summary and metadata lines.
const interesting = logs.filter((l) =>
    /llama_model_loader: - type|file type|arch|n_embd|n_head|n_rot|n_vocab|vocab type|rope|n_ctx_train|general.name/.test(l),
);
console.log(
    JSON.stringify({
        model: modelPath,
        prompt,
        prompt_ids: promptIds,
        generated_ids: generated,
        text: model.detokenize(generated),
        seconds: Number(secs.toFixed(3)),
        llama_cpp: interesting.slice(0, 40),
    }),
);
await context.dispose();
await model.dispose();
await llama.dispose();
