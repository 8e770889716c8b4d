#!/usr/bin/env bash
# Validate `qlora plan` against the measured peak memory of `qlora train`.
#
#   scripts/validate_memory_plan.sh [model-folder ...]
#
# For every model folder (default: the fixtures' tiny Llama) and every
# configuration of the matrix (LoRA vs QLoRA, batch 1/4, seq 128/512,
# checkpointing off/on) it runs a few optimizer steps of `qlora train` on
# synthetic pre-tokenized rows of exactly `seq` tokens, reads the process'
# peak resident set (VmHWM, via GNU time's %M = ru_maxrss of the child), asks
# `qlora plan ... --json` for the same setup, and prints a table with the
# relative error. Exit status 1 if any row is off by more than TOL (10%).
#
# Environment: QLORA (binary, default target/release/qlora, built if missing),
# TOL (default 0.10), STEPS (default 2), OUT (table file, default stdout only).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
TOL="${TOL:-0.10}"
STEPS="${STEPS:-2}"
QLORA="${QLORA:-${CARGO_TARGET_DIR:-$ROOT/target}/release/qlora}"
if [ ! -x "$QLORA" ]; then
    cargo build --release -p qlora-cli >&2
fi
TIME=/usr/bin/time
[ -x "$TIME" ] || { echo "validate: GNU time (/usr/bin/time) is required" >&2; exit 2; }
"$QLORA" train --help >/dev/null 2>&1 || { echo "validate: $QLORA has no 'train' command yet" >&2; exit 2; }

MODELS=("$@")
[ ${#MODELS[@]} -gt 0 ] || MODELS=("$ROOT/../shared/fixtures/tiny_llama/model")
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# rows <vocab> <seq> <n>: n JSONL rows of exactly seq token ids in [0, vocab).
rows() {
    python3 - "$1" "$2" "$3" <<'EOF'
import json, random, sys
v, s, n = map(int, sys.argv[1:])
r = random.Random(1234)
for _ in range(n):
    print(json.dumps({"input_ids": [r.randrange(v) for _ in range(s)]}))
EOF
}

printf '| model | method | batch | seq | ckpt | measured VmHWM MiB | plan MiB | error |\n'
printf '|---|---|---|---|---|---|---|---|\n'
fail=0
for model in "${MODELS[@]}"; do
    vocab=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['vocab_size'])" "$model/config.json")
    name=$(basename "$(dirname "$model")")/$(basename "$model")
    for method in lora qlora; do
        quant=none; [ "$method" = qlora ] && quant=nf4
        for batch in 1 4; do
            for seq in 128 512; do
                for ckpt in false true; do
                    data="$WORK/d_${seq}.jsonl"
                    [ -f "$data" ] || rows "$vocab" "$seq" 64 > "$data"
                    out="$WORK/run"
                    rm -rf "$out"
                    "$TIME" -f '%M' -o "$WORK/maxrss" "$QLORA" train --model "$model" --data "$data" \
                        --out "$out" --quant "$quant" --rank 8 --target all-linear --lora-dropout 0 --batch-size "$batch" \
                        --max-seq-len "$seq" --max-steps "$STEPS" --gradient-checkpointing "$ckpt" \
                        --no-progress --force >"$WORK/log" 2>&1 \
                        || { echo "validate: train failed:" >&2; cat "$WORK/log" >&2; exit 2; }
                    measured_kib=$(tail -n1 "$WORK/maxrss")
                    ck=(); [ "$ckpt" = true ] && ck=(--checkpointing)
                    plan=$("$QLORA" plan "$model" --method "$method" --rank 8 --batch "$batch" \
                        --seq "$seq" "${ck[@]}" --json | python3 -c "import json,sys; print(json.load(sys.stdin)['total_bytes'])")
                    python3 - "$name" "$method" "$batch" "$seq" "$ckpt" "$measured_kib" "$plan" "$TOL" <<'EOF' || fail=1
import sys
name, method, b, s, ck, kib, plan, tol = sys.argv[1:]
m = int(kib) * 1024
p = int(plan)
err = (p - m) / m
print(f"| {name} | {method} | {b} | {s} | {ck} | {m/2**20:.1f} | {p/2**20:.1f} | {err:+.1%} |")
sys.exit(0 if abs(err) <= float(tol) else 1)
EOF
                done
            done
        done
    done
done
exit $fail
