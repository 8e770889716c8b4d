#!/usr/bin/env bash
# Per-process peak memory of data-parallel `mpirun -n N qlora train --shard S` against
# `qlora plan --devices N --sharding S` (S = none: every process holds the whole base;
# S = full: each holds 1/N of every layer's frozen projections).
#
#   scripts/bench/dist_memory.sh [model-ref]      (default: the tiny fixture model)
#
# Environment: QLORA (a binary built with `--features mpi`, default
# target/release/qlora), NS (process counts, default "1 2"), SHARDS (default "none full"),
# BATCH (per process, default 1), SEQ (default 128), STEPS (default 2), METHOD (qlora|lora).
# Each rank runs with QLORA_MEM_TRACE=reset and Open MPI's --output-filename,
# so every rank's mem-trace lines (VmHWM per phase) land in their own file;
# the table shows each rank's process peak next to the plan's total.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
QLORA="${QLORA:-$ROOT/target/release/qlora}"
NS="${NS:-1 2}"; SHARDS="${SHARDS:-none full}"; BATCH="${BATCH:-1}"; SEQ="${SEQ:-128}"; STEPS="${STEPS:-2}"; METHOD="${METHOD:-qlora}"
MODEL="${1:-$ROOT/../shared/fixtures/tiny_llama/model}"
quant=none; [ "$METHOD" = qlora ] && quant=nf4
planq=(); [ "$METHOD" = qlora ] && planq=(--quant nf4)
WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT
vocab=$("$QLORA" plan "$MODEL" --json | python3 -c "import json,sys; print(json.load(sys.stdin)['vocab_size'])")
python3 - "$vocab" "$SEQ" 64 >"$WORK/rows.jsonl" <<'PY'
import json, random, sys
v, s, n = map(int, sys.argv[1:])
r = random.Random(1234)
for _ in range(n):
    print(json.dumps({"input_ids": [r.randrange(v) for _ in range(s)]}))
PY
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
echo "| model | method | shard | processes | batch/process | seq | rank | peak MiB measured | plan MiB | error | frozen MiB (plan) | load peak MiB measured | load peak MiB (plan) |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
for shard in $SHARDS; do
for n in $NS; do
    rm -rf "$WORK/out" "$WORK/logs"
    QLORA_MEM_TRACE=reset mpirun -n "$n" --output-filename "$WORK/logs" "$QLORA" train --model "$MODEL" \
        --data "$WORK/rows.jsonl" --out "$WORK/out" --quant "$quant" --rank 8 --target all-linear \
        --lora-dropout 0 --batch-size "$BATCH" --max-seq-len "$SEQ" --max-steps "$STEPS" \
        --shard "$shard" --gradient-checkpointing false --no-progress --force >/dev/null
    "$QLORA" plan "$MODEL" --method "$METHOD" "${planq[@]}" --rank 8 --lora-dropout 0 --batch "$BATCH" --seq "$SEQ" \
        --gradient-checkpointing false --devices "$n" --sharding "$shard" --json >"$WORK/plan.json"
    python3 - "$MODEL" "$METHOD" "$n" "$BATCH" "$SEQ" "$WORK/logs" "$WORK/plan.json" "$shard" <<'PY'
import glob, json, os, re, sys
model, method, n, b, s, logs, plan, shard = sys.argv[1:]
d = json.load(open(plan))["per_device"]
total = d["total_bytes"]
M = 2**20
for r in range(int(n)):
    f = glob.glob(os.path.join(logs, "1", f"rank.{r}", "stderr"))[0]
    text = open(f).read()
    peak = max(int(m.group(1)) * 1024 for m in re.finditer(r"mem-trace \S+ hwm_kib=(\d+)", text))
    load = max(int(m.group(1)) * 1024 for m in re.finditer(r"mem-trace model-loaded hwm_kib=(\d+)", text))
    print(f"| {os.path.basename(model.rstrip('/'))} | {method} | {shard} | {n} | {b} | {s} | {r} | {peak/M:.1f} | {total/M:.1f} | {(total-peak)/peak:+.1%} | {d['frozen_weights']/M:.1f} | {load/M:.1f} | {d['load_peak']/M:.1f} |")
PY
done
done
