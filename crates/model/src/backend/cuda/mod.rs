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

use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, ensure, Context, Result};
use cudarc::cublas::{result as blas, sys as blas_sys, CudaBlas};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg,
};

use super::{AdamWStep, Backend, CeOut, LoraOp};
use crate::ops::attention::AttnShape;
use crate::ops::linear::{FrozenLinear, FrozenWeight};

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

/// Threads per block of the row kernels and the attention kernels.
const ROW_THREADS: u32 = 256;
const ATTN_THREADS: u32 = 128;
/// Largest head dimension the attention kernels take.
pub const MAX_HEAD_DIM: usize = 256;
/// Bytes of f32 logits one cross-entropy chunk may hold.
const CE_CHUNK_BYTES: usize = 256 << 20;

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

/// A frozen weight on the device.
#[allow(clippy::large_enum_variant)] // a handful per layer; boxing buys nothing
enum DevWeight {
    Bf16(CudaSlice<u16>),
    Q4 {
        packed: CudaSlice<u8>,
        /// Plain f32 absmax, or the double-quant parts.
        absmax: Option<CudaSlice<f32>>,
        codes: Option<CudaSlice<u8>>,
        nested_absmax: Option<CudaSlice<f32>>,
        nested_map: Option<CudaSlice<f32>>,
        offset: f32,
        nested_bs: i32,
        table: CudaSlice<f32>,
        blocksize: i32,
        /// 0 f32, 1 f16, 2 bf16 (the recorded dtype rounding).
        dtype: i32,
    },
}

struct LinearInner {
    out_features: usize,
    in_features: usize,
    weight: DevWeight,
    bias: Option<CudaSlice<f32>>,
}

/// A frozen linear on the device (shared, cheap to clone).
#[derive(Clone)]
pub struct CudaLinear(Arc<LinearInner>);

impl std::fmt::Debug for CudaLinear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CudaLinear[{}x{}]",
            self.0.out_features, self.0.in_features
        )
    }
}

/// The token embedding on the device.
pub enum CudaEmbed {
    F32(CudaSlice<f32>),
    Bf16(CudaSlice<u16>),
}

/// Reusable bf16 scratch buffers (weights tile, GEMM operand).
#[derive(Default)]
struct Scratch {
    weight: Option<CudaSlice<u16>>,
    act: Option<CudaSlice<u16>>,
}

/// One CUDA device: context, stream, cuBLAS handle, the compiled kernels.
pub struct CudaBackend {
    ordinal: usize,
    name: String,
    cc: (i32, i32),
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    funcs: std::collections::HashMap<&'static str, CudaFunction>,
    scratch: Mutex<Scratch>,
}

// SAFETY: the cuBLAS handle is only used through `&self` methods that hold the
// scratch mutex or issue work on the one stream; cudarc's handle wrapper is
// not marked Sync only because raw handles are pointers.
unsafe impl Sync for CudaBackend {}
unsafe impl Send for CudaBackend {}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaBackend({})", self.describe())
    }
}

fn grid_for(n: usize, threads: u32) -> LaunchConfig {
    let blocks = n.div_ceil(threads as usize).clamp(1, 65535 * 16) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl CudaBackend {
    /// Open device `ordinal`: clear errors when the driver, the device or the
    /// CUDA libraries are missing (never a panic).
    pub fn new(ordinal: usize) -> Result<Self> {
        if let Some(why) = cuda_unavailable() {
            bail!("{why} ({})", super::CUDA_HELP);
        }
        let count = CudaContext::device_count().map_err(|e| anyhow!("{e:?}"))? as usize;
        ensure!(
            ordinal < count,
            "cuda:{ordinal} does not exist: the driver reports {count} CUDA device(s) (cuda:0..cuda:{})",
            count - 1
        );
        // SAFETY: only tries to open the shared libraries.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            bail!(
                "libcublas.so.13 (cuBLAS) was not found on the loader path: put the nvidia/cu13/lib \
                 folder of the PyPI wheel nvidia-cublas in LD_LIBRARY_PATH"
            );
        }
        if let Some(why) = nvrtc_missing() {
            bail!("{why}");
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| anyhow!("cuda:{ordinal}: {e:?}"))?;
        // One stream: no cross-stream events needed.
        // SAFETY: nothing was allocated on this context yet.
        unsafe { ctx.disable_event_tracking() };
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        let cc = ctx
            .compute_capability()
            .map_err(|e| anyhow!("cuda:{ordinal}: {e:?}"))?;
        let stream = ctx.default_stream();
        let blas = CudaBlas::new(stream.clone()).map_err(|e| anyhow!("cuBLAS: {e:?}"))?;
        let arch = format!("compute_{}{}", cc.0, cc.1);
        let mut funcs = std::collections::HashMap::new();
        for (file, ptx) in compile_kernels(&arch)? {
            let module = ctx
                .load_module(ptx)
                .map_err(|e| anyhow!("loading kernels of {file} on cuda:{ordinal}: {e:?}"))?;
            let names = KERNELS
                .iter()
                .find(|(f, _)| *f == file)
                .map(|(_, n)| *n)
                .unwrap_or(&[]);
            for n in names {
                let f = module
                    .load_function(n)
                    .map_err(|e| anyhow!("kernel {n} of {file}: {e:?}"))?;
                funcs.insert(*n, f);
            }
        }
        Ok(CudaBackend {
            ordinal,
            name,
            cc,
            stream,
            blas,
            funcs,
            scratch: Mutex::new(Scratch::default()),
        })
    }

    /// Bytes (free, total) on the device.
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        self.stream
            .context()
            .mem_get_info()
            .map_err(|e| anyhow!("{e:?}"))
    }

    /// Wait for all queued work.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| anyhow!("{e:?}"))
    }

    fn f(&self, name: &str) -> &CudaFunction {
        self.funcs
            .get(name)
            .unwrap_or_else(|| panic!("kernel {name} not loaded"))
    }

    fn ptr<T>(&self, s: &CudaSlice<T>) -> u64 {
        let (p, _sync) = s.device_ptr(&self.stream);
        p
    }

    fn opt_ptr<T>(&self, s: &Option<CudaSlice<T>>) -> u64 {
        s.as_ref().map_or(0, |s| self.ptr(s))
    }

    fn alloc<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        n: usize,
    ) -> Result<CudaSlice<T>> {
        if n == 0 {
            return self.alloc_raw::<T>(0);
        }
        self.stream
            .alloc_zeros::<T>(n)
            .map_err(|e| anyhow!("cuda:{}: allocating {n} elements: {e:?}", self.ordinal))
    }

    fn up<T: cudarc::driver::DeviceRepr>(&self, x: &[T]) -> Result<CudaSlice<T>> {
        if x.is_empty() {
            return self.alloc_raw::<T>(0);
        }
        self.stream
            .clone_htod(x)
            .map_err(|e| anyhow!("cuda:{}: upload: {e:?}", self.ordinal))
    }

    fn alloc_raw<T: cudarc::driver::DeviceRepr>(&self, n: usize) -> Result<CudaSlice<T>> {
        if n == 0 {
            return self.stream.null::<T>().map_err(|e| anyhow!("{e:?}"));
        }
        // SAFETY: every caller writes the buffer before reading it.
        unsafe { self.stream.alloc::<T>(n) }
            .map_err(|e| anyhow!("cuda:{}: allocating {n} elements: {e:?}", self.ordinal))
    }

    /// Launch `name` with `cfg`; `args` are pushed in order.
    fn launch(&self, name: &str, cfg: LaunchConfig, args: &[&dyn KArg]) -> Result<()> {
        let f = self.f(name);
        let mut b = self.stream.launch_builder(f);
        for a in args {
            a.push(&mut b);
        }
        // SAFETY: the argument lists below match the kernel signatures in
        // kernels/*.cu (checked by the GPU tests against the CPU path).
        unsafe { b.launch(cfg) }
            .map(|_| ())
            .map_err(|e| anyhow!("kernel {name}: {e:?}"))
    }

    /// Row-major `C[m,n] = alpha·op(A)·op(B) + beta·C` in f32 (cuBLAS SGEMM);
    /// `a` stored `[m,k]` (`[k,m]` if `a_t`), `b` stored `[k,n]` (`[n,k]` if `b_t`).
    #[allow(clippy::too_many_arguments)]
    fn sgemm(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: u64,
        a_t: bool,
        b: u64,
        b_t: bool,
        c: u64,
        beta: f32,
        alpha: f32,
    ) -> Result<()> {
        if m == 0 || n == 0 {
            return Ok(());
        }
        // cuBLAS uses the calling thread's current context.
        self.stream
            .context()
            .bind_to_thread()
            .map_err(|e| anyhow!("{e:?}"))?;
        let op = |t: bool| {
            if t {
                blas_sys::cublasOperation_t::CUBLAS_OP_T
            } else {
                blas_sys::cublasOperation_t::CUBLAS_OP_N
            }
        };
        // Column-major view: C^T[n,m] = op(B)^T op(A)^T.
        // SAFETY: the pointers come from live device buffers of at least the
        // sizes the row-major shapes describe.
        unsafe {
            blas::sgemm(
                *self.blas.handle(),
                op(b_t),
                op(a_t),
                n as i32,
                m as i32,
                k as i32,
                &alpha,
                b as *const f32,
                if b_t { k } else { n } as i32,
                a as *const f32,
                if a_t { m } else { k } as i32,
                &beta,
                c as *mut f32,
                n as i32,
            )
        }
        .map_err(|e| anyhow!("cuBLAS sgemm {m}x{n}x{k}: {e:?}"))
    }

    /// Like [`Self::sgemm`] with bf16 `A`, `B` and f32 `C`, f32 accumulation (tensor cores).
    #[allow(clippy::too_many_arguments)]
    fn gemm_bf16(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: u64,
        a_t: bool,
        b: u64,
        b_t: bool,
        c: u64,
        beta: f32,
    ) -> Result<()> {
        if m == 0 || n == 0 {
            return Ok(());
        }
        // cuBLAS uses the calling thread's current context.
        self.stream
            .context()
            .bind_to_thread()
            .map_err(|e| anyhow!("{e:?}"))?;
        let op = |t: bool| {
            if t {
                blas_sys::cublasOperation_t::CUBLAS_OP_T
            } else {
                blas_sys::cublasOperation_t::CUBLAS_OP_N
            }
        };
        let alpha = 1.0f32;
        // SAFETY: as in sgemm; A/B hold bf16 bits, C f32.
        unsafe {
            blas::gemm_ex(
                *self.blas.handle(),
                op(b_t),
                op(a_t),
                n as i32,
                m as i32,
                k as i32,
                &alpha as *const f32 as *const c_void,
                b as *const c_void,
                blas_sys::cudaDataType::CUDA_R_16BF,
                if b_t { k } else { n } as i32,
                a as *const c_void,
                blas_sys::cudaDataType::CUDA_R_16BF,
                if a_t { m } else { k } as i32,
                &beta as *const f32 as *const c_void,
                c as *mut c_void,
                blas_sys::cudaDataType::CUDA_R_32F,
                n as i32,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| anyhow!("cuBLAS bf16 GEMM {m}x{n}x{k}: {e:?}"))
    }

    /// Ensure a scratch slot holds at least `n` bf16 values; returns its pointer.
    fn scratch_ptr(slot: &mut Option<CudaSlice<u16>>, n: usize, be: &CudaBackend) -> Result<u64> {
        if slot.as_ref().is_none_or(|s| s.len() < n) {
            *slot = None;
            *slot = Some(be.alloc_raw::<u16>(n)?);
        }
        Ok(be.ptr(slot.as_ref().expect("just set")))
    }

    /// The weight of `w` as bf16 `[out, in]` (a pointer valid while `sc` is held).
    fn weight_bf16(&self, w: &LinearInner, sc: &mut Scratch) -> Result<u64> {
        match &w.weight {
            DevWeight::Bf16(s) => Ok(self.ptr(s)),
            DevWeight::Q4 {
                packed,
                absmax,
                codes,
                nested_absmax,
                nested_map,
                offset,
                nested_bs,
                table,
                blocksize,
                dtype,
            } => {
                let n = w.out_features * w.in_features;
                let dst = Self::scratch_ptr(&mut sc.weight, n, self)?;
                let (p_packed, p_abs, p_codes, p_nabs, p_nmap, p_table) = (
                    self.ptr(packed),
                    self.opt_ptr(absmax),
                    self.opt_ptr(codes),
                    self.opt_ptr(nested_absmax),
                    self.opt_ptr(nested_map),
                    self.ptr(table),
                );
                let (start, nn) = (0i64, n as i64);
                self.launch(
                    "dequant4_bf16",
                    grid_for(n, 256),
                    &[
                        &p_packed, &p_abs, &p_codes, &p_nabs, &p_nmap, offset, nested_bs, &p_table,
                        blocksize, dtype, &start, &nn, &dst,
                    ],
                )?;
                Ok(dst)
            }
        }
    }

    /// `dst (bf16) = src (f32)`, `n` values, into the activation scratch.
    fn act_bf16(&self, src: u64, n: usize, sc: &mut Scratch) -> Result<u64> {
        let dst = Self::scratch_ptr(&mut sc.act, n, self)?;
        let nn = n as i64;
        self.launch("f32_to_bf16", grid_for(n, 256), &[&src, &dst, &nn])?;
        Ok(dst)
    }

    /// `y[t, out] = x[t, in] Wᵀ (+ bias)` on raw pointers.
    fn linear_fwd_ptr(&self, w: &LinearInner, x: u64, t: usize, y: u64) -> Result<()> {
        let mut sc = self.scratch.lock().expect("scratch lock");
        let wp = self.weight_bf16(w, &mut sc)?;
        let xp = self.act_bf16(x, t * w.in_features, &mut sc)?;
        self.gemm_bf16(
            t,
            w.out_features,
            w.in_features,
            xp,
            false,
            wp,
            true,
            y,
            0.0,
        )?;
        if let Some(b) = &w.bias {
            let bp = self.ptr(b);
            let (rows, cols) = (t as i64, w.out_features as i32);
            self.launch(
                "add_bias",
                grid_for(t * w.out_features, 256),
                &[&y, &bp, &rows, &cols],
            )?;
        }
        Ok(())
    }

    /// `dx[t, in] += dy[t, out] W` on raw pointers.
    fn linear_bwd_ptr(&self, w: &LinearInner, dy: u64, t: usize, dx: u64) -> Result<()> {
        let mut sc = self.scratch.lock().expect("scratch lock");
        let wp = self.weight_bf16(w, &mut sc)?;
        let dyp = self.act_bf16(dy, t * w.out_features, &mut sc)?;
        self.gemm_bf16(
            t,
            w.in_features,
            w.out_features,
            dyp,
            false,
            wp,
            false,
            dx,
            1.0,
        )
    }

    fn dropped(&self, op: &LoraOp<Self>, x: &CudaSlice<f32>) -> Result<Option<CudaSlice<f32>>> {
        if op.dropout <= 0.0 {
            return Ok(None);
        }
        let n = x.len();
        let y = self.alloc_raw::<f32>(n)?;
        let (xp, yp, nn, acc) = (self.ptr(x), self.ptr(&y), n as i64, 0i32);
        let (mp, inf) = (
            op.mask_ids.map_or(0, |m| self.ptr(m)),
            op.in_features as i32,
        );
        self.launch(
            "dropout",
            grid_for(n, 256),
            &[&xp, &yp, &op.dropout_key, &op.dropout, &mp, &inf, &acc, &nn],
        )?;
        Ok(Some(y))
    }
}

/// A kernel argument (device pointers travel as `u64`).
trait KArg {
    fn push<'a>(&'a self, b: &mut cudarc::driver::LaunchArgs<'a>);
}
macro_rules! karg {
    ($($t:ty),*) => {$(
        impl KArg for $t {
            fn push<'a>(&'a self, b: &mut cudarc::driver::LaunchArgs<'a>) {
                b.arg(self);
            }
        }
    )*};
}
karg!(u64, i64, i32, u32, f32);

fn orig_dtype_code(d: qlora_quant::DType) -> i32 {
    match d {
        qlora_quant::DType::F32 => 0,
        qlora_quant::DType::F16 => 1,
        qlora_quant::DType::BF16 => 2,
    }
}

fn bf16_bits(v: &[half::bf16]) -> Vec<u16> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn f32_to_bf16_bits(v: &[f32]) -> Vec<u16> {
    v.iter()
        .map(|x| half::bf16::from_f32(*x).to_bits())
        .collect()
}

impl Backend for CudaBackend {
    type Buf = CudaSlice<f32>;
    type Ids = CudaSlice<u32>;
    type Linear = CudaLinear;
    type Embed = CudaEmbed;

    fn describe(&self) -> String {
        format!(
            "cuda:{} ({}, sm_{}{})",
            self.ordinal, self.name, self.cc.0, self.cc.1
        )
    }

    fn upload(&self, x: &[f32]) -> Result<CudaSlice<f32>> {
        self.up(x)
    }
    fn upload_ids(&self, ids: &[u32]) -> Result<CudaSlice<u32>> {
        self.up(ids)
    }
    fn download(&self, x: &CudaSlice<f32>) -> Result<Vec<f32>> {
        self.stream
            .clone_dtoh(x)
            .map_err(|e| anyhow!("cuda:{}: download: {e:?}", self.ordinal))
    }
    fn zeros(&self, n: usize) -> Result<CudaSlice<f32>> {
        self.alloc::<f32>(n)
    }
    fn len(&self, x: &CudaSlice<f32>) -> usize {
        x.len()
    }
    fn add_assign(&self, acc: &mut CudaSlice<f32>, x: &CudaSlice<f32>) -> Result<()> {
        assert_eq!(acc.len(), x.len(), "add_assign: sizes");
        let (a, b, n) = (self.ptr(acc), self.ptr(x), x.len() as i64);
        self.launch("add_inplace", grid_for(x.len(), 256), &[&a, &b, &n])
    }
    fn scale(&self, x: &mut CudaSlice<f32>, s: f32) -> Result<()> {
        let (a, n) = (self.ptr(x), x.len() as i64);
        self.launch("scale_inplace", grid_for(x.len(), 256), &[&a, &s, &n])
    }
    fn rows(
        &self,
        x: &CudaSlice<f32>,
        cols: usize,
        r0: usize,
        r1: usize,
    ) -> Result<CudaSlice<f32>> {
        let mut out = self.alloc_raw::<f32>((r1 - r0) * cols)?;
        self.stream
            .memcpy_dtod(&x.slice(r0 * cols..r1 * cols), &mut out)
            .map_err(|e| anyhow!("{e:?}"))?;
        Ok(out)
    }
    fn append(&self, cache: &mut CudaSlice<f32>, x: &CudaSlice<f32>) -> Result<()> {
        let old = cache.len();
        let mut out = self.alloc_raw::<f32>(old + x.len())?;
        if old > 0 {
            self.stream
                .memcpy_dtod(&*cache, &mut out.slice_mut(0..old))
                .map_err(|e| anyhow!("{e:?}"))?;
        }
        self.stream
            .memcpy_dtod(x, &mut out.slice_mut(old..old + x.len()))
            .map_err(|e| anyhow!("{e:?}"))?;
        *cache = out;
        Ok(())
    }

    fn prepare_linear(&self, w: &FrozenLinear) -> Result<CudaLinear> {
        let weight = match &w.weight {
            FrozenWeight::F32(v) => DevWeight::Bf16(self.up(&f32_to_bf16_bits(v))?),
            FrozenWeight::BF16(v) => DevWeight::Bf16(self.up(&bf16_bits(v))?),
            FrozenWeight::Ggml(g) => bail!(
                "native GGUF weights ({}) are CPU-only for now; use --quant nf4 (or none/bf16) \
                 with --device cuda",
                g.ggml_type()
            ),
            FrozenWeight::Quant(q) => {
                let (absmax, codes, nabs, nmap, offset, nbs) = match &q.absmax {
                    qlora_quant::Absmax::Plain(a) => (Some(self.up(a)?), None, None, None, 0.0, 1),
                    qlora_quant::Absmax::Double(d) => (
                        None,
                        Some(self.up(&d.codes)?),
                        Some(self.up(&d.nested_absmax)?),
                        Some(self.up(&d.nested_map)?),
                        d.offset,
                        d.nested_blocksize as i32,
                    ),
                };
                DevWeight::Q4 {
                    packed: self.up(&q.packed)?,
                    absmax,
                    codes,
                    nested_absmax: nabs,
                    nested_map: nmap,
                    offset,
                    nested_bs: nbs,
                    table: self.up(&qlora_quant::code_table(q.quant_type))?,
                    blocksize: q.blocksize as i32,
                    // rounded through the recorded dtype, as the CPU path does
                    dtype: orig_dtype_code(q.dtype),
                }
            }
        };
        let bias = w.bias.as_deref().map(|b| self.up(b)).transpose()?;
        Ok(CudaLinear(Arc::new(LinearInner {
            out_features: w.out_features,
            in_features: w.in_features,
            weight,
            bias,
        })))
    }

    fn prepare_embed(&self, w: &FrozenWeight, rows: usize, cols: usize) -> Result<CudaEmbed> {
        Ok(match w {
            FrozenWeight::F32(v) => CudaEmbed::F32(self.up(v)?),
            FrozenWeight::BF16(v) => CudaEmbed::Bf16(self.up(&bf16_bits(v))?),
            other => {
                let mut buf = vec![0f32; rows * cols];
                other.rows_f32(0, rows, cols, &mut buf);
                CudaEmbed::F32(self.up(&buf)?)
            }
        })
    }

    fn embed(&self, e: &CudaEmbed, ids: &[u32], h: usize) -> Result<CudaSlice<f32>> {
        let t = ids.len();
        let out = self.alloc_raw::<f32>(t * h)?;
        let idp = self.up(ids)?;
        let (ip, op, hh, tt) = (self.ptr(&idp), self.ptr(&out), h as i32, t as i64);
        let (name, tp) = match e {
            CudaEmbed::F32(s) => ("embed_f32", self.ptr(s)),
            CudaEmbed::Bf16(s) => ("embed_bf16", self.ptr(s)),
        };
        self.launch(name, grid_for(t * h, 256), &[&tp, &ip, &hh, &op, &tt])?;
        Ok(out)
    }

    fn linear_forward(
        &self,
        w: &CudaLinear,
        x: &CudaSlice<f32>,
        t: usize,
    ) -> Result<CudaSlice<f32>> {
        let w = &*w.0;
        assert_eq!(x.len(), t * w.in_features, "linear forward: input size");
        let y = self.alloc_raw::<f32>(t * w.out_features)?;
        self.linear_fwd_ptr(w, self.ptr(x), t, self.ptr(&y))?;
        Ok(y)
    }

    fn linear_backward_input(
        &self,
        w: &CudaLinear,
        dy: &CudaSlice<f32>,
        t: usize,
        dx: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let w = &*w.0;
        assert_eq!(dy.len(), t * w.out_features, "linear backward: dy size");
        assert_eq!(dx.len(), t * w.in_features, "linear backward: dx size");
        self.linear_bwd_ptr(w, self.ptr(dy), t, self.ptr(dx))
    }

    fn lora_forward(
        &self,
        op: &LoraOp<Self>,
        x: &CudaSlice<f32>,
        t: usize,
        y: &mut CudaSlice<f32>,
    ) -> Result<CudaSlice<f32>> {
        let (r, i, o) = (op.r, op.in_features, op.out_features);
        let xd = self.dropped(op, x)?;
        let xin = self.ptr(xd.as_ref().unwrap_or(x));
        let xa = self.alloc_raw::<f32>(t * r)?;
        let (ap, bp, xap, yp) = (self.ptr(op.a), self.ptr(op.b), self.ptr(&xa), self.ptr(y));
        self.sgemm(t, r, i, xin, false, ap, true, xap, 0.0, 1.0)?;
        self.sgemm(t, o, r, xap, false, bp, true, yp, 1.0, op.scale)?;
        Ok(xa)
    }

    fn lora_backward(
        &self,
        op: &LoraOp<Self>,
        x: &CudaSlice<f32>,
        xa: &CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        t: usize,
        dx: &mut CudaSlice<f32>,
    ) -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
        let (r, i, o) = (op.r, op.in_features, op.out_features);
        let db = self.alloc_raw::<f32>(o * r)?;
        let dxa = self.alloc_raw::<f32>(t * r)?;
        let da = self.alloc_raw::<f32>(r * i)?;
        let (dyp, xap, bp, ap) = (self.ptr(dy), self.ptr(xa), self.ptr(op.b), self.ptr(op.a));
        let (dbp, dxap, dap, dxp) = (self.ptr(&db), self.ptr(&dxa), self.ptr(&da), self.ptr(dx));
        self.sgemm(o, r, t, dyp, true, xap, false, dbp, 0.0, op.scale)?;
        self.sgemm(t, r, o, dyp, false, bp, false, dxap, 0.0, op.scale)?;
        let xd = self.dropped(op, x)?;
        let xin = self.ptr(xd.as_ref().unwrap_or(x));
        self.sgemm(r, i, t, dxap, true, xin, false, dap, 0.0, 1.0)?;
        if op.dropout <= 0.0 {
            self.sgemm(t, i, r, dxap, false, ap, false, dxp, 1.0, 1.0)?;
        } else {
            let tmp = self.alloc_raw::<f32>(t * i)?;
            let tp = self.ptr(&tmp);
            self.sgemm(t, i, r, dxap, false, ap, false, tp, 0.0, 1.0)?;
            let (n, acc) = ((t * i) as i64, 1i32);
            let (mp, inf) = (op.mask_ids.map_or(0, |m| self.ptr(m)), i as i32);
            self.launch(
                "dropout",
                grid_for(t * i, 256),
                &[&tp, &dxp, &op.dropout_key, &op.dropout, &mp, &inf, &acc, &n],
            )?;
        }
        Ok((da, db))
    }

    fn rmsnorm_forward(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        eps: f32,
    ) -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
        let h = w.len();
        let t = x.len() / h;
        let y = self.alloc_raw::<f32>(x.len())?;
        let rstd = self.alloc_raw::<f32>(t)?;
        let (xp, wp, yp, rp, hh) = (
            self.ptr(x),
            self.ptr(w),
            self.ptr(&y),
            self.ptr(&rstd),
            h as i32,
        );
        let cfg = LaunchConfig {
            grid_dim: (t as u32, 1, 1),
            block_dim: (ROW_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        self.launch("rmsnorm_fwd", cfg, &[&xp, &wp, &eps, &hh, &yp, &rp])?;
        Ok((y, rstd))
    }

    fn rmsnorm_backward_add(
        &self,
        dy: &CudaSlice<f32>,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        rstd: &CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let h = w.len();
        let t = x.len() / h;
        let (dyp, xp, wp, rp, dxp, hh) = (
            self.ptr(dy),
            self.ptr(x),
            self.ptr(w),
            self.ptr(rstd),
            self.ptr(dx),
            h as i32,
        );
        let cfg = LaunchConfig {
            grid_dim: (t as u32, 1, 1),
            block_dim: (ROW_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        self.launch("rmsnorm_bwd_add", cfg, &[&dyp, &xp, &wp, &rp, &hh, &dxp])
    }

    fn rope(
        &self,
        x: &mut CudaSlice<f32>,
        heads: usize,
        d: usize,
        cos: &CudaSlice<f32>,
        sin: &CudaSlice<f32>,
        inverse: bool,
    ) -> Result<()> {
        let rows = x.len() / (heads * d);
        let (xp, cp, sp) = (self.ptr(x), self.ptr(cos), self.ptr(sin));
        let (hh, dd, inv, rr) = (heads as i32, d as i32, inverse as i32, rows as i64);
        self.launch(
            "rope",
            grid_for(rows * heads * d / 2, 256),
            &[&xp, &hh, &dd, &cp, &sp, &inv, &rr],
        )
    }

    fn attention_forward(
        &self,
        sh: &AttnShape,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        seg: Option<&CudaSlice<u32>>,
    ) -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
        ensure!(
            sh.d <= MAX_HEAD_DIM,
            "head_dim {} is above the CUDA attention kernel's limit {MAX_HEAD_DIM}",
            sh.d
        );
        let out = self.alloc_raw::<f32>(sh.b * sh.q_len * sh.heads * sh.d)?;
        let lse = self.alloc_raw::<f32>(sh.b * sh.heads * sh.q_len)?;
        let segp = seg.map_or(0, |s| self.ptr(s));
        let (qp, kp, vp, op, lp) = (
            self.ptr(q),
            self.ptr(k),
            self.ptr(v),
            self.ptr(&out),
            self.ptr(&lse),
        );
        let ints = [
            sh.q_len as i32,
            sh.k_len as i32,
            sh.q_offset as i32,
            sh.heads as i32,
            sh.kv_heads as i32,
            sh.d as i32,
            sh.window.map_or(0, |w| w as i32),
        ];
        let scale = (sh.d as f32).powf(-0.5);
        let cfg = LaunchConfig {
            grid_dim: (sh.q_len as u32, sh.heads as u32, sh.b as u32),
            block_dim: (ATTN_THREADS, 1, 1),
            shared_mem_bytes: ATTN_THREADS * 4,
        };
        self.launch(
            "attn_fwd",
            cfg,
            &[
                &qp, &kp, &vp, &segp, &ints[0], &ints[1], &ints[2], &ints[3], &ints[4], &ints[5],
                &ints[6], &scale, &op, &lp,
            ],
        )?;
        Ok((out, lse))
    }

    fn attention_backward(
        &self,
        sh: &AttnShape,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        out: &CudaSlice<f32>,
        saved: &CudaSlice<f32>,
        seg: Option<&CudaSlice<u32>>,
        dout: &CudaSlice<f32>,
    ) -> Result<(CudaSlice<f32>, CudaSlice<f32>, CudaSlice<f32>)> {
        let delta = self.alloc_raw::<f32>(sh.b * sh.heads * sh.q_len)?;
        let dq = self.alloc_raw::<f32>(q.len())?;
        let dk = self.alloc::<f32>(k.len())?;
        let dv = self.alloc::<f32>(v.len())?;
        let (op, dop, deltap) = (self.ptr(out), self.ptr(dout), self.ptr(&delta));
        let (ql, hh, dd) = (sh.q_len as i32, sh.heads as i32, sh.d as i32);
        let grid = (sh.q_len as u32, sh.heads as u32, sh.b as u32);
        self.launch(
            "attn_bwd_delta",
            LaunchConfig {
                grid_dim: grid,
                block_dim: (32 * (sh.d.div_ceil(32).min(8)) as u32, 1, 1),
                shared_mem_bytes: 0,
            },
            &[&op, &dop, &ql, &hh, &dd, &deltap],
        )?;
        let segp = seg.map_or(0, |s| self.ptr(s));
        let (qp, kp, vp, lp) = (self.ptr(q), self.ptr(k), self.ptr(v), self.ptr(saved));
        let (dqp, dkp, dvp) = (self.ptr(&dq), self.ptr(&dk), self.ptr(&dv));
        let ints = [
            sh.q_len as i32,
            sh.k_len as i32,
            sh.q_offset as i32,
            sh.heads as i32,
            sh.kv_heads as i32,
            sh.d as i32,
            sh.window.map_or(0, |w| w as i32),
        ];
        let scale = (sh.d as f32).powf(-0.5);
        self.launch(
            "attn_bwd",
            LaunchConfig {
                grid_dim: grid,
                block_dim: (ATTN_THREADS, 1, 1),
                shared_mem_bytes: 2 * ATTN_THREADS * 4,
            },
            &[
                &qp, &kp, &vp, &segp, &dop, &lp, &deltap, &ints[0], &ints[1], &ints[2], &ints[3],
                &ints[4], &ints[5], &ints[6], &scale, &dqp, &dkp, &dvp,
            ],
        )?;
        Ok((dq, dk, dv))
    }

    fn swiglu_forward(&self, g: &CudaSlice<f32>, u: &CudaSlice<f32>) -> Result<CudaSlice<f32>> {
        let m = self.alloc_raw::<f32>(g.len())?;
        let (gp, up, mp, n) = (self.ptr(g), self.ptr(u), self.ptr(&m), g.len() as i64);
        self.launch("swiglu_fwd", grid_for(g.len(), 256), &[&gp, &up, &mp, &n])?;
        Ok(m)
    }

    fn swiglu_backward(
        &self,
        dm: &CudaSlice<f32>,
        g: &CudaSlice<f32>,
        u: &CudaSlice<f32>,
    ) -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
        let dg = self.alloc_raw::<f32>(g.len())?;
        let du = self.alloc_raw::<f32>(g.len())?;
        let (dmp, gp, up, dgp, dup, n) = (
            self.ptr(dm),
            self.ptr(g),
            self.ptr(u),
            self.ptr(&dg),
            self.ptr(&du),
            g.len() as i64,
        );
        self.launch(
            "swiglu_bwd",
            grid_for(g.len(), 256),
            &[&dmp, &gp, &up, &dgp, &dup, &n],
        )?;
        Ok((dg, du))
    }

    fn cross_entropy(
        &self,
        lm_head: &CudaLinear,
        x: &CudaSlice<f32>,
        labels: &[i64],
        s: usize,
        grad_denominator: Option<f32>,
    ) -> Result<CeOut<Self>> {
        let w = &*lm_head.0;
        let (t, vocab, h) = (labels.len(), w.out_features, w.in_features);
        assert_eq!(x.len(), t * h, "cross_entropy: x size");
        // Shifted targets (position p predicts labels[p+1] within its row).
        let targets: Vec<i32> = (0..t)
            .map(|p| {
                if (p + 1) % s == 0 {
                    -1
                } else {
                    let l = labels[p + 1];
                    if l < 0 {
                        -1
                    } else {
                        l as i32
                    }
                }
            })
            .collect();
        let count = targets.iter().filter(|&&v| v >= 0).count();
        let tgt = self.up(&targets)?;
        let losses = self.alloc::<f64>(t)?;
        let dx = match grad_denominator {
            Some(_) => Some(self.alloc::<f32>(t * h)?),
            None => None,
        };
        let chunk = (CE_CHUNK_BYTES / 4 / vocab.max(1)).clamp(1, t.max(1));
        let logits = self.alloc_raw::<f32>(chunk * vocab)?;
        let lp = self.ptr(&logits);
        let (xp, tp, lossp) = (self.ptr(x), self.ptr(&tgt), self.ptr(&losses));
        let inv = grad_denominator.map_or(0.0, |d| 1.0 / d);
        let want = grad_denominator.is_some() as i32;
        let vv = vocab as i32;
        let mut r0 = 0;
        while r0 < t {
            let rows = chunk.min(t - r0);
            self.linear_fwd_ptr(w, xp + (r0 * h * 4) as u64, rows, lp)?;
            let (tpr, lossr) = (tp + (r0 * 4) as u64, lossp + (r0 * 8) as u64);
            self.launch(
                "cross_entropy_rows",
                LaunchConfig {
                    grid_dim: (rows as u32, 1, 1),
                    block_dim: (ROW_THREADS, 1, 1),
                    shared_mem_bytes: 0,
                },
                &[&lp, &tpr, &vv, &inv, &want, &lossr],
            )?;
            if let Some(dx) = &dx {
                self.linear_bwd_ptr(w, lp, rows, self.ptr(dx) + (r0 * h * 4) as u64)?;
            }
            r0 += rows;
        }
        let per_row = self
            .stream
            .clone_dtoh(&losses)
            .map_err(|e| anyhow!("{e:?}"))?;
        let sum: f64 = per_row[..t].iter().sum();
        Ok(CeOut { sum, count, dx })
    }

    fn adamw(
        &self,
        p: &mut CudaSlice<f32>,
        g: &CudaSlice<f32>,
        m: &mut CudaSlice<f32>,
        v: &mut CudaSlice<f32>,
        st: &AdamWStep,
    ) -> Result<()> {
        let n = p.len();
        let (pp, gp, mp, vp, nn) = (self.ptr(p), self.ptr(g), self.ptr(m), self.ptr(v), n as i64);
        self.launch(
            "adamw",
            grid_for(n, 256),
            &[
                &pp,
                &gp,
                &mp,
                &vp,
                &st.decay,
                &st.w1,
                &st.beta2,
                &st.w2,
                &st.step_size,
                &st.bc2_sqrt,
                &st.eps,
                &nn,
            ],
        )
    }

    fn sq_norm(&self, x: &CudaSlice<f32>) -> Result<f64> {
        let out = self.alloc::<f64>(1)?;
        let (xp, op, n) = (self.ptr(x), self.ptr(&out), x.len() as i64);
        let blocks = x.len().div_ceil(256).clamp(1, 1024) as u32;
        self.launch(
            "sq_sum",
            LaunchConfig {
                grid_dim: (blocks, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            },
            &[&xp, &n, &op],
        )?;
        let v = self.stream.clone_dtoh(&out).map_err(|e| anyhow!("{e:?}"))?;
        Ok(v[0])
    }
}

/// Context for errors: which device.
pub fn open(ordinal: usize) -> Result<CudaBackend> {
    CudaBackend::new(ordinal).with_context(|| format!("opening cuda:{ordinal}"))
}
