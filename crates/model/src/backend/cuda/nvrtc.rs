//! The kernels: their CUDA C sources, the names each defines, and NVRTC
//! compilation (also used by CI to check they compile without a GPU), plus the
//! probe that says why no device can be used.

use anyhow::{anyhow, bail, Result};
use cudarc::driver::CudaContext;

/// The kernel sources: `(file name, source)`; `common.cuh` is prepended to each.
pub const KERNEL_SOURCES: &[(&str, &str)] = &[
    ("elementwise.cu", include_str!("kernels/elementwise.cu")),
    ("rows.cu", include_str!("kernels/rows.cu")),
    ("attention.cu", include_str!("kernels/attention.cu")),
];
const COMMON: &str = include_str!("kernels/common.cuh");

/// Names of the kernels every source defines (looked up after loading).
pub const KERNELS: &[(&str, &[&str])] = &[
    (
        "elementwise.cu",
        &[
            "dequant4_bf16",
            "f32_to_bf16",
            "bf16_to_f32",
            "add_inplace",
            "scale_inplace",
            "add_bias",
            "swiglu_fwd",
            "swiglu_bwd",
            "rope",
            "embed_f32",
            "embed_bf16",
            "dropout",
            "adamw",
            "sq_sum",
        ],
    ),
    (
        "rows.cu",
        &["rmsnorm_fwd", "rmsnorm_bwd_add", "cross_entropy_rows"],
    ),
    ("attention.cu", &["attn_fwd", "attn_bwd_delta", "attn_bwd"]),
];

/// The full source NVRTC compiles for kernel file `name`.
pub fn kernel_source(name: &str, body: &str) -> String {
    format!("{COMMON}\n#line 1 \"{name}\"\n{body}")
}

/// Why the NVRTC library cannot be used, if it cannot.
pub fn nvrtc_missing() -> Option<String> {
    // SAFETY: only tries to open the shared library.
    if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        None
    } else {
        Some(
            "libnvrtc.so.13 (NVRTC) was not found on the loader path: put the nvidia/cu13/lib \
             folder of the PyPI wheel nvidia-cuda-nvrtc in LD_LIBRARY_PATH"
                .into(),
        )
    }
}

/// Compile every kernel source to PTX for `arch` (e.g. `compute_90`). Needs
/// only libnvrtc, no GPU: CI runs it to check the kernels compile.
pub fn compile_kernels(arch: &str) -> Result<Vec<(&'static str, cudarc::nvrtc::Ptx)>> {
    if let Some(why) = nvrtc_missing() {
        bail!("{why}");
    }
    KERNEL_SOURCES
        .iter()
        .map(|(name, body)| {
            let opts = cudarc::nvrtc::CompileOptions {
                options: vec![
                    format!("--gpu-architecture={arch}"),
                    "--std=c++17".into(),
                    "-default-device".into(),
                ],
                name: Some((*name).to_string()),
                ..Default::default()
            };
            let ptx = cudarc::nvrtc::compile_ptx_with_opts(kernel_source(name, body), opts)
                .map_err(|e| match e {
                    cudarc::nvrtc::CompileError::CompileError { log, .. } => anyhow!(
                        "NVRTC could not compile kernel file {name} for {arch}:\n{}",
                        log.to_string_lossy()
                    ),
                    other => anyhow!("NVRTC failed on kernel file {name} for {arch}: {other:?}"),
                })?;
            Ok((*name, ptx))
        })
        .collect()
}

/// Why no CUDA device can be used, or `None` when at least one is there.
pub fn cuda_unavailable() -> Option<String> {
    // SAFETY: only tries to open the shared library.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Some(
            "no CUDA GPU found: the NVIDIA driver library (libcuda.so.1) could not be loaded"
                .into(),
        );
    }
    match CudaContext::device_count() {
        Ok(0) => Some("no CUDA GPU found: the NVIDIA driver reports no device".into()),
        Ok(_) => None,
        Err(e) => Some(format!(
            "no CUDA GPU found: the NVIDIA driver failed ({e:?})"
        )),
    }
}
