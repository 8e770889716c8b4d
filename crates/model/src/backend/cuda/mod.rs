//! The CUDA backend (feature `cuda`): `cudarc` with dynamic loading, so that
//! building needs no CUDA toolkit and a binary built with the feature still
//! runs (on the CPU) where there is no GPU.
//!
//! * Kernels: CUDA C sources in `kernels/` (`common.cuh` prepended to each),
//!   compiled at run time by NVRTC for the device's architecture. Run-time
//!   compilation instead of PTX built ahead: the PTX then always matches the
//!   device and the driver, the repository holds no generated files, and CI
//!   still checks every kernel compiles (NVRTC from the PyPI wheel, no GPU).
//! * Frozen linears: 4-bit (NF4/FP4, plain or double-quantized absmax) stay
//!   4-bit on the device and are dequantized (bnb-exact: same table, same
//!   double-quant decoding, same rounding as the CPU path) into a bf16 scratch
//!   right before a cuBLAS bf16 GEMM with f32 accumulation; bf16 weights are
//!   used as they are; f32 weights are stored as bf16 (tensor cores).
//!   Activations go into the GEMMs as bf16; they are held in f32 buffers
//!   between ops (bf16 storage of the saved activations is a planned
//!   memory optimisation). LoRA matrices, gradients and AdamW state are f32
//!   (f32 cuBLAS GEMMs).
//! * Attention is flash-style (no `[s, s]` matrix; the backward recomputes
//!   the probabilities from the per-row log-sum-exp); cross-entropy runs over
//!   chunks of rows, so the whole `[t, vocab]` logits never exist.

mod device;
mod nvrtc;
mod ops;

use anyhow::{Context, Result};

pub use device::{CudaBackend, CudaEmbed, CudaLinear};
pub use nvrtc::{
    compile_kernels, cuda_unavailable, kernel_source, nvrtc_missing, KERNELS, KERNEL_SOURCES,
};

/// Threads per block of the row kernels and the attention kernels.
const ROW_THREADS: u32 = 256;
const ATTN_THREADS: u32 = 128;
/// Largest head dimension the attention kernels take.
pub const MAX_HEAD_DIM: usize = 256;
/// Bytes of f32 logits one cross-entropy chunk may hold.
const CE_CHUNK_BYTES: usize = 256 << 20;

/// Context for errors: which device.
pub fn open(ordinal: usize) -> Result<CudaBackend> {
    CudaBackend::new(ordinal).with_context(|| format!("opening cuda:{ordinal}"))
}
