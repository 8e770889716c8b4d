#!/usr/bin/env bash
# The one prepared script for a machine with an NVIDIA GPU (see scripts/gpu_build.sh, which
# builds what it runs into target/gpu on a machine without one). Stages, in the order to run them:
#
#   smoke   nvidia-smi, the loader setup, `qlora train --device cuda` for 2 steps on the tiny
#           fixture model (seconds)
#   tests   the CUDA test executables with QLORA_REQUIRE_GPU=1 (every kernel vs the CPU
#           reference, whole-model loss + one step vs CPU f32, the torch trajectory fixtures)
#   bench   qlora --device cuda vs PyTorch + transformers + PEFT + bitsandbytes 0.50.2 QLoRA on
#           random-init SmolLM2-135M / TinyLlama-1.1B / Llama-3.1-8B shapes, batch x seq 4 x 2048
#           (8B also 1 x 4096): tokens/s (median after warm-up), peak GPU memory, fraction of the
#           GPU's bf16 peak. SIZES="smollm2-135m tinyllama-1.1b llama-3.1-8b" picks models.
#
#   scripts/gpu_check.sh smoke tests        # first call: a few minutes at most
#   scripts/gpu_check.sh bench              # second call
#
# Results go under $OUT (default ./gpu-results): one log per stage, tests.log, bench.jsonl
# (one JSON object per run) and summary.md (the BENCHMARKS.md table rows).
#
# Loader setup (what `--device cuda` needs at run time; nothing at build time):
#   * libcuda.so.1: the NVIDIA driver, from the system (ldconfig).
#   * libcublas.so.13, libcublasLt.so.13, libnvrtc.so.13 (+ libnvrtc-builtins): from the Python
#     packages that PyTorch's CUDA 13 wheels install: <site-packages>/nvidia/cu13/lib (CUDA 13
#     wheels put every library there; older layouts use nvidia/<lib>/lib, also added). This
#     script finds site-packages with `$PY -c 'import site; ...'` and prepends every such folder
#     to LD_LIBRARY_PATH. Override with QLORA_CUDA_LIBS=/dir1:/dir2.
#   * bitsandbytes 0.50.2 for the peer: target/gpu/pylib (PYTHONPATH), unless BNB_FROM_ENV=1.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
G="$ROOT/target/gpu"
OUT=${OUT:-$ROOT/gpu-results}
PY=${PY:-python3}
# Big things (model folders, adapters) stay off $OUT, which is copied back.
WORK=${WORK:-/tmp/qlora-gpu-work}
mkdir -p "$OUT" "$WORK"
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$OUT/gpu_check.log"; }

[ -x "$G/qlora" ] || { log "missing $G/qlora: run scripts/gpu_build.sh here and carry target/gpu"; exit 2; }

# ---- loader path: the Python packages' CUDA 13 libraries
if [ -z "${QLORA_CUDA_LIBS:-}" ]; then
  QLORA_CUDA_LIBS=$("$PY" - <<'EOF'
import glob, os, site
dirs = []
for sp in site.getsitepackages() + [site.getusersitepackages()]:
    for d in sorted(glob.glob(os.path.join(sp, "nvidia", "cu13", "lib")) + glob.glob(os.path.join(sp, "nvidia", "*", "lib"))):
        if d not in dirs and glob.glob(os.path.join(d, "*.so*")):
            dirs.append(d)
print(":".join(dirs))
EOF
)
fi
export LD_LIBRARY_PATH="${QLORA_CUDA_LIBS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export QLORA_FIXTURES="$G/fixtures"
if [ "${BNB_FROM_ENV:-0}" != 1 ] && [ -d "$G/pylib/bitsandbytes" ]; then
  export PYTHONPATH="$G/pylib${PYTHONPATH:+:$PYTHONPATH}"
fi
log "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
for lib in libcuda.so.1 libcublas.so.13 libcublasLt.so.13 libnvrtc.so.13; do
  found=$( (ldconfig -p 2>/dev/null | grep -o "/[^ ]*/$lib" | head -n 1) || true)
  for d in ${LD_LIBRARY_PATH//:/ }; do [ -e "$d/$lib" ] && found="$d/$lib" && break; done
  log "  $lib: ${found:-NOT FOUND}"
done

# Peak GPU memory of a command: nvidia-smi sampled every 100 ms (MiB used on GPU 0, minus the
# idle baseline measured just before).
peak_mem() { # logfile cmd...
  local f=$1; shift
  local base
  base=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 | head -n 1)
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 -lms 100 > "$f.mem" &
  local smi=$!
  "$@" > "$f" 2>&1
  local rc=$?
  kill "$smi" 2>/dev/null; wait "$smi" 2>/dev/null
  local peak
  peak=$(sort -n "$f.mem" | tail -n 1)
  echo "$(( ${peak:-0} - ${base:-0} ))" > "$f.peak_mib"
  return $rc
}

stage_smoke() {
  log "== smoke"
  nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1; head -n 15 "$OUT/nvidia-smi.txt" | tee -a "$OUT/gpu_check.log"
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))' 2>&1 | tee -a "$OUT/gpu_check.log"
  "$G/qlora" --version 2>&1 | tee -a "$OUT/gpu_check.log"
  "$PY" -c "
import json
rows = [{'input_ids': [(i * 37 + r * 11) % 320 for i in range(16)]} for r in range(8)]
open('$OUT/tiny_rows.jsonl', 'w').write(''.join(json.dumps(r) + '\n' for r in rows))"
  if "$G/qlora" train --model "$G/fixtures/tiny_llama/model" --data "$OUT/tiny_rows.jsonl" \
      --out "$WORK/smoke-train" --force --device cuda --quant nf4 --batch-size 2 --max-steps 2 \
      --max-seq-len 16 > "$OUT/smoke.log" 2>&1; then
    log "smoke: OK ($(grep -m1 '^device' "$OUT/smoke.log"))"
  else
    log "smoke: FAILED (tail of smoke.log:)"; tail -n 20 "$OUT/smoke.log" | tee -a "$OUT/gpu_check.log"
    return 1
  fi
  "$G/qlora" train --model "$G/fixtures/tiny_llama/model" --data "$OUT/tiny_rows.jsonl" \
    --out "$WORK/smoke-cpu" --force --device cpu --quant nf4 --batch-size 2 --max-steps 2 \
    --max-seq-len 16 > "$OUT/smoke-cpu.log" 2>&1 || true
  log "smoke losses cuda vs cpu: $(grep -h -o '"loss":[0-9.e-]*' "$WORK/smoke-train/metrics.jsonl" | tr '\n' ' ') | $(grep -h -o '"loss":[0-9.e-]*' "$WORK/smoke-cpu/metrics.jsonl" 2>/dev/null | tr '\n' ' ')"
}

stage_tests() {
  log "== tests"
  local rc=0
  for t in "$G"/tests/*; do
    if QLORA_REQUIRE_GPU=1 "$t" --test-threads 1 >> "$OUT/tests.log" 2>&1; then
      log "tests $(basename "$t"): PASS"
    else
      log "tests $(basename "$t"): FAIL (see tests.log)"; rc=1
    fi
  done
  grep -E "^test |panicked|rel L2|vs" "$OUT/tests.log" | tail -n 60 >> "$OUT/gpu_check.log"
  return $rc
}

# Useful FLOPs per token of a LoRA step (no weight gradients of the frozen base):
# linears incl. lm_head 2N forward + 2N input-gradient; attention 2·s·H·d (causal QKᵀ and PV)
# forward, twice that backward. Recomputation under checkpointing is not counted.
flops_per_token() { # model_dir seq
  "$PY" - "$1" "$2" <<'EOF'
import json, sys
c = json.load(open(sys.argv[1] + "/config.json")); s = int(sys.argv[2])
h, i, L, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
nh, kv = c["num_attention_heads"], c["num_key_value_heads"]; d = h // nh
n = L * (h * nh * d + 2 * h * kv * d + nh * d * h + 3 * h * i) + v * h
print(4 * n + L * 3 * 2 * s * nh * d)
EOF
}

bench_one() { # size batch seq
  local size=$1 b=$2 s=$3 dir="$WORK/models/$1" tag="$1-$2x$3"
  [ -f "$dir/config.json" ] || "$PY" scripts/bench/gpu/make_model.py --size "$size" --out "$dir" >> "$OUT/bench.log" 2>&1
  local fpt; fpt=$(flops_per_token "$dir" "$s")
  # peer
  peak_mem "$OUT/peer-$tag.log" "$PY" scripts/bench/gpu/peft_qlora.py --model-dir "$dir" --batch "$b" --seq "$s" \
    --json-out "$OUT/peer-$tag.json" || log "peer $tag FAILED: $(tail -n 3 "$OUT/peer-$tag.log")"
  # qlora: same rows, NF4 (double quant), LoRA r16 on all 7 linears, checkpointing, AdamW
  "$PY" -c "
import random, json
r = random.Random(0); v = json.load(open('$dir/config.json'))['vocab_size']
open('$WORK/rows-$tag.jsonl', 'w').write(''.join(json.dumps({'input_ids': [r.randrange(v) for _ in range($s)]}) + '\n' for _ in range(8 * $b)))"
  peak_mem "$OUT/qlora-$tag.log" "$G/qlora" train --model "$dir" --data "$WORK/rows-$tag.jsonl" --out "$WORK/qlora-$tag" \
    --force --device cuda --quant nf4 --batch-size "$b" --max-steps 7 --no-shuffle --lora-dropout 0 \
    --lr 1e-4 --schedule constant --max-seq-len "$s" --gradient-checkpointing true \
    || log "qlora $tag FAILED: $(tail -n 3 "$OUT/qlora-$tag.log")"
  cp "$WORK/qlora-$tag/metrics.jsonl" "$OUT/qlora-$tag.metrics.jsonl" 2>/dev/null
  "$PY" - "$OUT" "$tag" "$fpt" "$b" "$s" <<'EOF' | tee -a "$OUT/bench.jsonl"
import json, os, statistics, sys
out, tag, fpt, b, s = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
peak_bf16 = float(os.environ.get("GPU_BF16_PEAK_TFLOPS", "989")) * 1e12  # H100/H200 SXM dense bf16
r = {"run": tag, "batch": b, "seq": s, "flops_per_token": fpt}
try:
    p = json.load(open(f"{out}/peer-{tag}.json"))
    r["peer_tok_s"] = round(p["tokens_per_s_median"], 1)
    r["peer_peak_alloc_gib"] = round(p["peak_alloc_gib"], 2)
    r["peer_versions"] = p["versions"]
except Exception as e:
    r["peer_error"] = str(e)
try:
    r["peer_peak_smi_gib"] = round(int(open(f"{out}/peer-{tag}.log.peak_mib").read()) / 1024, 2)
except Exception:
    pass
try:
    m = [json.loads(l) for l in open(f"{out}/qlora-{tag}.metrics.jsonl") if '"tokens_per_s"' in l]
    tps = statistics.median(x["tokens_per_s"] for x in m[2:])
    r["qlora_tok_s"] = round(tps, 1)
    r["qlora_mfu"] = round(tps * fpt / peak_bf16, 4)
    r["qlora_losses"] = [round(x["loss"], 4) for x in m]
    r["qlora_peak_smi_gib"] = round(int(open(f"{out}/qlora-{tag}.log.peak_mib").read()) / 1024, 2)
except Exception as e:
    r["qlora_error"] = str(e)
if "peer_tok_s" in r:
    r["peer_mfu"] = round(r["peer_tok_s"] * fpt / peak_bf16, 4)
if "peer_tok_s" in r and "qlora_tok_s" in r:
    r["speedup"] = round(r["qlora_tok_s"] / r["peer_tok_s"], 2)
if "peer_peak_smi_gib" in r and "qlora_peak_smi_gib" in r:
    r["mem_ratio"] = round(r["qlora_peak_smi_gib"] / r["peer_peak_smi_gib"], 2)
print(json.dumps(r))
EOF
}

stage_bench() {
  log "== bench"
  for size in ${SIZES:-smollm2-135m tinyllama-1.1b llama-3.1-8b}; do
    bench_one "$size" 4 2048
    [ "$size" = llama-3.1-8b ] && bench_one "$size" 1 4096
  done
  "$PY" - "$OUT" <<'EOF' > "$OUT/summary.md"
import json, sys
print("| run | qlora tok/s | peer tok/s | speedup | qlora peak GiB | peer peak GiB | mem ratio | qlora MFU | peer MFU |")
print("|---|---|---|---|---|---|---|---|---|")
for l in open(sys.argv[1] + "/bench.jsonl"):
    r = json.loads(l)
    g = lambda k: r.get(k, "-")
    print(f"| {r['run']} | {g('qlora_tok_s')} | {g('peer_tok_s')} | {g('speedup')} | {g('qlora_peak_smi_gib')} | {g('peer_peak_smi_gib')} | {g('mem_ratio')} | {g('qlora_mfu')} | {g('peer_mfu')} |")
EOF
  cat "$OUT/summary.md" | tee -a "$OUT/gpu_check.log"
}

rc=0
for st in "${@:-smoke tests}"; do
  for one in $st; do
    case "$one" in
      smoke) stage_smoke || rc=1 ;;
      tests) stage_tests || rc=1 ;;
      bench) stage_bench || rc=1 ;;
      *) log "unknown stage $one (smoke, tests, bench)"; rc=2 ;;
    esac
  done
done
log "done rc=$rc"
exit $rc
