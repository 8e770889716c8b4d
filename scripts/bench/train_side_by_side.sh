#!/usr/bin/env bash
# Training tokens/s and peak RSS: qlora next to PyTorch+PEFT (../shared/bench/peft_baseline),
# alternating, on the same random SmolLM2-135M-shape model, batch 2 x 256, LoRA r 16 on all 7
# linears, dropout 0, AdamW lr 1e-4, 2 threads. qlora: median of steps 3..10 of metrics.jsonl;
# peer: its own median of 8 timed steps. Peak RSS: /usr/bin/time's maximum resident set.
#   PY=/path/to/peft-venv/bin/python QLORA=target/release/qlora scripts/bench/train_side_by_side.sh
# VARIANTS: pairs "peer-variant:qlora-quant" (default: fp32:none nf4:nf4). The peer's nf4 (bitsandbytes
# on CPU) and bf16/autocast (without AMX) are very slow on CPUs without AVX-512: minutes per step.
set -euo pipefail
cd "$(dirname "$0")/../.."
QLORA=$(realpath "${QLORA:-target/release/qlora}")
PY=${PY:-/work/.peftenv/bin/python}
PEER=$(realpath "${PEER:-../shared/bench/peft_baseline}")
WORK=${WORK:-/tmp/qlora-side-by-side}
ROUNDS=${ROUNDS:-1}
VARIANTS=${VARIANTS:-"fp32:none nf4:nf4"}
mkdir -p "$WORK" && cd "$WORK"
[ -f bench-models/smollm2-135m/model.safetensors ] || "$PY" "$PEER/make_model.py" --size smollm2-135m
python3 -c "
import json, random
r = random.Random(0)
with open('rows_2x256.jsonl', 'w') as f:
    for _ in range(24):
        f.write(json.dumps({'input_ids': [r.randrange(49152) for _ in range(256)]}) + '\n')"
rss() { awk '/Maximum resident/ {printf "%.2f GiB", $6 / 1048576}' "$1"; }
for r in $(seq "$ROUNDS"); do
  for pair in $VARIANTS; do
    peer=${pair%%:*} quant=${pair##*:}
    /usr/bin/time -v "$PY" "$PEER/bench_lora.py" --variant "$peer" --json-out "peer-$peer.json" > "peer-$peer.log" 2>&1
    echo "round $r  peer  $peer: $(python3 -c "import json; print(round(json.load(open('peer-$peer.json'))['tokens_per_s_median'], 1))") tok/s, peak $(rss "peer-$peer.log")"
    /usr/bin/time -v "$QLORA" train --model bench-models/smollm2-135m --data rows_2x256.jsonl --out "qlora-$quant" --force \
      --quant "$quant" --batch-size 2 --max-steps 10 --no-shuffle --gradient-checkpointing false --lora-dropout 0 \
      --lr 1e-4 --schedule constant --max-seq-len 256 > "qlora-$quant.log" 2>&1
    echo "round $r  qlora $quant: $(python3 -c "
import json, statistics
m = [json.loads(l) for l in open('qlora-$quant/metrics.jsonl')]
print(round(statistics.median(x['tokens_per_s'] for x in m[2:]), 1))") tok/s, peak $(rss "qlora-$quant.log")  (load $(cut -d' ' -f1 /proc/loadavg))"
  done
done
