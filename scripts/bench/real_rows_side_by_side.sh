#!/usr/bin/env bash
# Side by side on rows of varied length with masked prompts (chat-like), where padding and the
# head's masked positions count: qlora (`qlora train`, NF4 + DQ base) against PyTorch + PEFT
# (`real_rows_peer.py`: bf16 base + bf16 LoRA, eager, batches padded to their longest row), the
# same pre-tokenized rows for both (`chat_rows.py`: lengths and masks of the demo's chatterbot
# conversations after a 20-token system prompt, random ids), batch 4, in file order, r 16 on all 7 linears, no dropout, AdamW at
# a constant lr, alternating runs; without and with gradient checkpointing.
#
#   WORK=/tmp/rr PY=/path/to/venv/bin/python [SHAPE=tinyllama] scripts/bench/real_rows_side_by_side.sh [chat.jsonl]
#
# Needs $WORK/bench-models/{smollm2-135m,smollm2-bf16} (or {tinyllama-1.1b,tinyllama-bf16}:
# `make_model.py` of the peer baseline, the bf16 copies saved with dtype bfloat16, as for
# `amx_side_by_side.sh`) and a release build.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
WORK="${WORK:?set WORK}"
PY="${PY:-python3}"
QLORA="${QLORA:-$ROOT/target/release/qlora}"
CHAT="${1:-$ROOT/runs/chatterbot.jsonl}"
STEPS="${STEPS:-14}"
case "${SHAPE:-smollm2}" in
  smollm2) M4=smollm2-135m; MB=smollm2-bf16; VOCAB=49152 ;;
  tinyllama) M4=tinyllama-1.1b; MB=tinyllama-bf16; VOCAB=32000 ;;
  *) echo "SHAPE: smollm2 or tinyllama" >&2; exit 2 ;;
esac
cd "$WORK"
"$PY" "$ROOT/scripts/bench/chat_rows.py" "$CHAT" --out rows.jsonl --system 20 --vocab "$VOCAB" --rows $((4 * (STEPS + 2)))
ours() { # name, checkpointing, compute
  /usr/bin/time -f "%M" -o "ours-$1.rss" "$QLORA" train --model "bench-models/$M4" \
    --data rows.jsonl --out "run-$1" --force --quant nf4 --compute-dtype "$3" --batch-size 4 \
    --max-seq-len 128 --no-shuffle --lora-dropout 0 --lr 1e-4 --schedule constant --no-progress \
    --max-steps "$STEPS" --gradient-checkpointing "$2" > "ours-$1.log" 2>&1
  "$PY" - "$1" <<'PYEOF'
import json, statistics, sys
n = sys.argv[1]
st = [json.loads(l) for l in open(f"run-{n}/metrics.jsonl") if '"tokens_per_s"' in l]
tps = [r["tokens_per_s"] for r in st[2:]]
print(f"ours {n}: median {statistics.median(tps):.1f} tok/s, peak {int(open(f'ours-{n}.rss').read()) / 1024:.0f} MiB")
PYEOF
}
peer() { # name, extra flags
  local n="$1"; shift
  "$PY" "$ROOT/scripts/bench/real_rows_peer.py" --model-dir "bench-models/$MB" --data rows.jsonl \
    --batch 4 --steps $((STEPS - 2)) "$@" 2> "peer-$n.err" | tail -n 1 > "peer-$n.json"
  "$PY" -c "import json; r = json.load(open('peer-$n.json')); print(f\"peer $n: median {r['median_tok_s']:.1f} tok/s, peak {r['peak_rss_mib']:.0f} MiB\")"
}
for r in 1 2; do
  ours "n$r" false bf16; peer "n$r"; ours "f$r" false f32
done
for r in 1 2; do
  ours "c$r" true bf16; peer "c$r" --grad-ckpt
done
