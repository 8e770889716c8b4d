//! The device side of the CUDA backend: [`CudaBackend`] (context, stream,
//! cuBLAS, kernels, scratch), frozen weights as the device holds them, and the
//! helpers the operations are built from (allocation, launches, GEMMs,
//! on-the-fly 4-bit -> bf16 dequantization, LoRA dropout).

use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, ensure, Result};
use cudarc::cublas::{result as blas, sys as blas_sys, CudaBlas};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg,
};

use super::nvrtc::{compile_kernels, cuda_unavailable, nvrtc_missing, KERNELS};
use crate::backend::{Backend, LoraOp, CUDA_HELP};

/// A frozen weight on the device.
#[allow(clippy::large_enum_variant)] // a handful per layer; boxing buys nothing
pub(super) enum DevWeight {
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

pub(super) struct LinearInner {
    pub(super) out_features: usize,
    pub(super) in_features: usize,
    pub(super) weight: DevWeight,
    pub(super) bias: Option<CudaSlice<f32>>,
}

/// A frozen linear on the device (shared, cheap to clone).
#[derive(Clone)]
pub struct CudaLinear(pub(super) Arc<LinearInner>);

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
pub(super) struct Scratch {
    pub(super) weight: Option<CudaSlice<u16>>,
    pub(super) act: Option<CudaSlice<u16>>,
}

/// One CUDA device: context, stream, cuBLAS handle, the compiled kernels.
pub struct CudaBackend {
    pub(super) ordinal: usize,
    pub(super) name: String,
    pub(super) cc: (i32, i32),
    pub(super) stream: Arc<CudaStream>,
    pub(super) blas: CudaBlas,
    pub(super) funcs: std::collections::HashMap<&'static str, CudaFunction>,
    pub(super) scratch: Mutex<Scratch>,
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

pub(super) fn grid_for(n: usize, threads: u32) -> LaunchConfig {
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
            bail!("{why} ({})", CUDA_HELP);
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

    pub(super) fn f(&self, name: &str) -> &CudaFunction {
        self.funcs
            .get(name)
            .unwrap_or_else(|| panic!("kernel {name} not loaded"))
    }

    pub(super) fn ptr<T>(&self, s: &CudaSlice<T>) -> u64 {
        let (p, _sync) = s.device_ptr(&self.stream);
        p
    }

    pub(super) fn opt_ptr<T>(&self, s: &Option<CudaSlice<T>>) -> u64 {
        s.as_ref().map_or(0, |s| self.ptr(s))
    }

    pub(super) fn alloc<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
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

    pub(super) fn up<T: cudarc::driver::DeviceRepr>(&self, x: &[T]) -> Result<CudaSlice<T>> {
        if x.is_empty() {
            return self.alloc_raw::<T>(0);
        }
        self.stream
            .clone_htod(x)
            .map_err(|e| anyhow!("cuda:{}: upload: {e:?}", self.ordinal))
    }

    pub(super) fn alloc_raw<T: cudarc::driver::DeviceRepr>(
        &self,
        n: usize,
    ) -> Result<CudaSlice<T>> {
        if n == 0 {
            return self.stream.null::<T>().map_err(|e| anyhow!("{e:?}"));
        }
        // SAFETY: every caller writes the buffer before reading it.
        unsafe { self.stream.alloc::<T>(n) }
            .map_err(|e| anyhow!("cuda:{}: allocating {n} elements: {e:?}", self.ordinal))
    }

    /// Launch `name` with `cfg`; `args` are pushed in order.
    pub(super) fn launch(&self, name: &str, cfg: LaunchConfig, args: &[&dyn KArg]) -> Result<()> {
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
    pub(super) fn sgemm(
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
    pub(super) fn gemm_bf16(
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
    pub(super) fn scratch_ptr(
        slot: &mut Option<CudaSlice<u16>>,
        n: usize,
        be: &CudaBackend,
    ) -> Result<u64> {
        if slot.as_ref().is_none_or(|s| s.len() < n) {
            *slot = None;
            *slot = Some(be.alloc_raw::<u16>(n)?);
        }
        Ok(be.ptr(slot.as_ref().expect("just set")))
    }

    /// The weight of `w` as bf16 `[out, in]` (a pointer valid while `sc` is held).
    pub(super) fn weight_bf16(&self, w: &LinearInner, sc: &mut Scratch) -> Result<u64> {
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
    pub(super) fn act_bf16(&self, src: u64, n: usize, sc: &mut Scratch) -> Result<u64> {
        let dst = Self::scratch_ptr(&mut sc.act, n, self)?;
        let nn = n as i64;
        self.launch("f32_to_bf16", grid_for(n, 256), &[&src, &dst, &nn])?;
        Ok(dst)
    }

    /// `y[t, out] = x[t, in] Wᵀ (+ bias)` on raw pointers.
    pub(super) fn linear_fwd_ptr(&self, w: &LinearInner, x: u64, t: usize, y: u64) -> Result<()> {
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
    pub(super) fn linear_bwd_ptr(&self, w: &LinearInner, dy: u64, t: usize, dx: u64) -> Result<()> {
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

    pub(super) fn dropped(
        &self,
        op: &LoraOp<Self>,
        x: &CudaSlice<f32>,
    ) -> Result<Option<CudaSlice<f32>>> {
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
pub(super) trait KArg {
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

pub(super) fn orig_dtype_code(d: qlora_quant::DType) -> i32 {
    match d {
        qlora_quant::DType::F32 => 0,
        qlora_quant::DType::F16 => 1,
        qlora_quant::DType::BF16 => 2,
    }
}

pub(super) fn bf16_bits(v: &[half::bf16]) -> Vec<u16> {
    v.iter().map(|x| x.to_bits()).collect()
}

pub(super) fn f32_to_bf16_bits(v: &[f32]) -> Vec<u16> {
    v.iter()
        .map(|x| half::bf16::from_f32(*x).to_bits())
        .collect()
}
