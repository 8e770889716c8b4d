#!/usr/bin/env bash
# NVRTC for CI without a GPU or a CUDA toolkit: the PyPI wheel nvidia-cuda-nvrtc==13.2.86
# (hash-checked), unpacked into ${QLORA_CACHE:-$HOME/.cache/qlora}/nvrtc. Prints the folder
# holding libnvrtc.so.13 (the wheel's nvidia/cu13/lib): put it on LD_LIBRARY_PATH, and the
# CUDA backend's test `kernels_compile_to_ptx_for_sm90` compiles every kernel for compute_90.
set -euo pipefail
CACHE="${QLORA_CACHE:-$HOME/.cache/qlora}/nvrtc"
PY="${PYTHON:-python3}"
WANT=8111c5130e967b78222ea2124145f8efe9ce201b752b2579a2513100a53be1c5
LIB="$CACHE/unpacked/nvidia/cu13/lib"
if [ ! -e "$LIB/libnvrtc.so.13" ]; then
  mkdir -p "$CACHE"
  whl=$(ls "$CACHE"/nvidia_cuda_nvrtc-13.2.86-*.whl 2>/dev/null | head -n 1 || true)
  if [ -z "$whl" ]; then
    "$PY" -m pip download --no-deps --only-binary=:all: "nvidia-cuda-nvrtc==13.2.86" -d "$CACHE" >&2
    whl=$(ls "$CACHE"/nvidia_cuda_nvrtc-13.2.86-*.whl | head -n 1)
  fi
  got=$(sha256sum "$whl" | cut -d' ' -f1)
  [ "$got" = "$WANT" ] || { echo "fetch-nvrtc: sha256 mismatch for $whl: $got (expected $WANT)" >&2; exit 1; }
  rm -rf "$CACHE/unpacked.tmp"
  "$PY" - "$whl" "$CACHE/unpacked.tmp" <<'PYEOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    for n in z.namelist():
        if n.startswith("nvidia/cu13/lib/"):
            z.extract(n, sys.argv[2])
PYEOF
  rm -rf "$CACHE/unpacked" && mv "$CACHE/unpacked.tmp" "$CACHE/unpacked"
fi
echo "$LIB"
