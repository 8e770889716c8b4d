#!/usr/bin/env bash
# The #15 side by side on a CPU with AMX: qlora (NF4 + DQ base, --compute-dtype bf16) next to
# PyTorch + PEFT's best configuration there (bf16 base + bf16 LoRA, oneDNN AMX;
# ../shared/bench/peft_baseline), alternating, SmolLM2-135M and TinyLlama-1.1B shapes (random
# weights), batch 2 x 256, r 16 on all 7 linears, with and without gradient checkpointing.
# Ours twice: bench_compute (forward+backward only) and `qlora train` end to end (median of the
# steps after the first two). Peak RSS: /usr/bin/time's maximum resident set (bench_compute's
# includes building its random f32 model, so memory comes from `qlora train`).
# The peer also runs under torch.compile (scripts/bench/peft_compiled.py, "peer-compiled", once per
# configuration; its first step compiles for minutes): on a Zen 4 it was the peer's best, 1.09-1.19x
# its eager speed. COMPILED=0 leaves it out.
#   PY=/path/to/peft-venv/bin/python scripts/bench/amx_side_by_side.sh
# Ends with the goal's table (scripts/bench/side_by_side_summary.py, which can be rerun on WORK).
# (build first: cargo build --release -p qlora-cli && cargo build --release -p qlora-model --example bench_compute)
set -uo pipefail
cd "$(dirname "$0")/../.."
Q=$(realpath "${QLORA:-target/release/qlora}")
B=$(realpath "${BENCH:-target/release/examples/bench_compute}")
PEERC=$(realpath scripts/bench/peft_compiled.py)
SUMMARY=$(realpath scripts/bench/side_by_side_summary.py)
PY=${PY:-/work/pyenv/bin/python}
PEER=$(realpath "${PEER:-../shared/bench/peft_baseline}")
WORK=${WORK:-/tmp/qlora-amx-side-by-side}
mkdir -p "$WORK" && cd "$WORK"
for size in smollm2-135m tinyllama-1.1b; do
  [ -f bench-models/$size/config.json ] || "$PY" "$PEER/make_model.py" --size $size
done
python3 -c "
import json, random
for name, vocab, seed in (('rows_smol.jsonl', 49152, 0), ('rows_tiny.jsonl', 32000, 1)):
    r = random.Random(seed)
    with open(name, 'w') as f:
        for _ in range(24):
            f.write(json.dumps({'input_ids': [r.randrange(vocab) for _ in range(256)]}) + '\n')"
rss() { awk '/Maximum resident/ {printf "%.0f MiB", $6 / 1024}' "$1"; }
load() { cut -d' ' -f1 /proc/loadavg; }
peer() { local n=$1; shift
  /usr/bin/time -v "$PY" "$PEER/bench_lora.py" "$@" --json-out peer-$n.json > peer-$n.log 2>&1
  echo "peer $n: $(python3 -c "import json; print(round(json.load(open('peer-$n.json'))['tokens_per_s_median'], 1))") tok/s, peak $(rss peer-$n.log) (load $(load))"; }
COMPILED=${COMPILED:-1}
peerc() { local n=$1; shift
  [ "$COMPILED" = 1 ] || return 0
  PEER="$PEER" /usr/bin/time -v "$PY" "$PEERC" "$@" --json-out peerc-$n.json > peerc-$n.log 2>&1
  echo "peer-compiled $n: $(python3 -c "import json; print(round(json.load(open('peerc-$n.json'))['tokens_per_s_median'], 1))") tok/s, peak $(rss peerc-$n.log) (load $(load))"; }
ours() { local n=$1; shift
  "$B" "$@" > ours-$n.log 2>&1
  echo "ours $n: $(grep -oE 'forward\+backward [0-9]+ tok/s \([0-9.]+ CPU s per step\)' ours-$n.log) (load $(load))"; }
train() { local n=$1 model=$2 data=$3; shift 3
  /usr/bin/time -v "$Q" train --model "$model" --data "$data" --out tr-$n --force --quant nf4 \
      --compute-dtype bf16 --batch-size 2 --no-shuffle --lora-dropout 0 --lr 1e-4 --schedule constant \
      --max-seq-len 256 --no-progress "$@" > tr-$n.log 2>&1
  echo "train $n: $(python3 -c "
import json, statistics
m = [json.loads(l) for l in open('tr-$n/metrics.jsonl')]
print(round(statistics.median(x['tokens_per_s'] for x in m[2:]), 1), 'tok/s')") peak $(rss tr-$n.log) (load $(load))"; }
date -u; lscpu | grep 'Model name'
echo "== matmul peak"; "$B" peak 2048 2>&1 | tail -2 | tee peak.log
echo "== SmolLM2 shape, no checkpointing"
for r in 1 2 3; do ours s$r nf4 nockpt 30 3 bf16; peer s$r --variant bf16 --adapter-dtype bf16; done
peerc s --variant bf16 --adapter-dtype bf16; ours s4 nf4 nockpt 30 3 bf16
echo "== SmolLM2 shape, checkpointing"
for r in 1 2; do ours c$r nf4 ckpt 30 3 bf16; peer c$r --variant bf16 --adapter-dtype bf16 --grad-ckpt; done
peerc c --variant bf16 --adapter-dtype bf16 --grad-ckpt; ours c3 nf4 ckpt 30 3 bf16
train smol bench-models/smollm2-135m rows_smol.jsonl --max-steps 10 --gradient-checkpointing false
train smolck bench-models/smollm2-135m rows_smol.jsonl --max-steps 10 --gradient-checkpointing true
echo "== TinyLlama-1.1B shape"
ours t1 nf4 nockpt 22 2 bf16 tinyllama; peer t1 --variant bf16 --adapter-dtype bf16 --model-dir bench-models/tinyllama-1.1b
peerc t --variant bf16 --adapter-dtype bf16 --model-dir bench-models/tinyllama-1.1b
train tiny bench-models/tinyllama-1.1b rows_tiny.jsonl --max-steps 5 --gradient-checkpointing false
peer tck --variant bf16 --adapter-dtype bf16 --model-dir bench-models/tinyllama-1.1b --grad-ckpt
peerc tck --variant bf16 --adapter-dtype bf16 --model-dir bench-models/tinyllama-1.1b --grad-ckpt
train tinyck bench-models/tinyllama-1.1b rows_tiny.jsonl --max-steps 5 --gradient-checkpointing true
date -u
echo "== #15's goal: >= 2x the peer's best tok/s at <= 0.5x its peak RSS"
python3 "$SUMMARY" .
