#!/usr/bin/env bash
# Build here (no GPU, no CUDA toolkit needed) everything scripts/gpu_check.sh runs on the GPU
# machine (which has the NVIDIA driver, PyTorch/transformers/PEFT with the CUDA 13 libraries in
# its Python packages, but no Rust and no network), into ONE folder to carry:
#
#   target/gpu/qlora                       release binary with --features cuda (stripped)
#   target/gpu/tests/<name>                CUDA test executables (model kernels + whole model,
#                                          train trajectory on CUDA)
#   target/gpu/fixtures/...                the ../shared/fixtures they read (QLORA_FIXTURES)
#   target/gpu/pylib/bitsandbytes          bitsandbytes 0.50.2 (pure Python + the CUDA 13 .so
#                                          files only) for the peer benchmark (PYTHONPATH)
#
# Then, from the session with a GPU:  run(command="scripts/gpu_check.sh smoke tests",
# carry=["target/gpu"]) and later "scripts/gpu_check.sh bench". Keep target/gpu under the
# carry limit (64 MiB): this script prints its size.
#
# Env: BNB_WHEEL_DIR  where to find/download the bitsandbytes wheel (default target/gpu-cache)
#      PY             python with pip (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
OUTD=target/gpu
CACHE=${BNB_WHEEL_DIR:-target/gpu-cache}
PY=${PY:-python3}
rm -rf "$OUTD"
mkdir -p "$OUTD/tests" "$OUTD/fixtures" "$OUTD/pylib" "$CACHE"

export CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_TEST_DEBUG=0
cargo build --release -p qlora-cli --features cuda
cp target/release/qlora "$OUTD/qlora"
strip "$OUTD/qlora"

# Test executables: `cargo test --no-run --message-format=json` names them.
build_test() { # crate test-name
  local exe
  exe=$(cargo test -p "$1" --features cuda --test "$2" --no-run --message-format=json 2>/dev/null |
    "$PY" -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "test" in m["target"]["kind"]:
        print(m["executable"])' | tail -n 1)
  [ -n "$exe" ] || { echo "no test executable for $1 --test $2" >&2; exit 1; }
  cp "$exe" "$OUTD/tests/$2"
  strip "$OUTD/tests/$2"
}
build_test qlora-model cuda
build_test qlora-train trajectory_cuda

for f in tiny_llama tiny_llama_bnb4 tiny_lora_adapter train_trajectory train_trajectory_qlora; do
  cp -r "../shared/fixtures/$f" "$OUTD/fixtures/"
done

# bitsandbytes 0.50.2 for the peer (the GPU machine may lack it): the wheel's Python files
# and its CUDA 13 libraries only (the whole wheel is ~125 MB of other CUDA/ROCm builds).
if ! ls "$CACHE"/bitsandbytes-0.50.2-*.whl >/dev/null 2>&1; then
  "$PY" -m pip download --no-deps --only-binary=:all: --platform manylinux_2_24_x86_64 \
    --python-version 3.11 -d "$CACHE" bitsandbytes==0.50.2 >/dev/null
fi
"$PY" - "$CACHE" "$OUTD/pylib" <<'EOF'
import glob, sys, zipfile
whl = sorted(glob.glob(sys.argv[1] + "/bitsandbytes-0.50.2-*.whl"))[-1]
with zipfile.ZipFile(whl) as z:
    for n in z.namelist():
        if n.endswith(".so") and "cuda13" not in n:
            continue
        if n.startswith("bitsandbytes/"):
            z.extract(n, sys.argv[2])
EOF
du -sh "$OUTD"
echo "carry target/gpu, then on the GPU machine: scripts/gpu_check.sh smoke tests | bench"
