//! The seam between the decoder and the hardware it runs on.
//!
//! [`Backend`] lists exactly the operations the model's forward and backward
//! use (frozen linear forward / input gradient, LoRA forward / backward,
//! RMSNorm, RoPE, causal GQA attention, SwiGLU, chunked cross-entropy, AdamW,
//! gradient norm) over buffers that live on the backend's device
//! ([`Backend::Buf`]). The model's layer forward/backward and the KV-cache step
//! are written once, generic over it (`model.rs`, `backward.rs`, `cache.rs`).
//!
//! * [`cpu::CpuBackend`]: the kernels of [`crate::ops`], buffers are `Vec<f32>`.
//! * `cuda::CudaBackend` (feature `cuda`): cuBLAS + NVRTC-compiled kernels.
//!
//! Frozen weights are reached per layer through [`Backend::fetch_layer`], so a
//! sharded backend can gather a layer's weights right before it is used.
//!
//! The trainer, checkpointing, data and PEFT I/O only see host `f32` values:
//! [`crate::Model::to_device`] chooses where the model computes; adapters go up
//! and gradients come back inside `forward_backward`.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(feature = "cuda")]
pub(crate) mod cuda_model;

use std::ops::Deref;

use anyhow::{bail, Result};

use crate::ops::attention::AttnShape;
use crate::ops::linear::{FrozenLinear, FrozenWeight};

/// Where the model computes: `cpu` or `cuda[:N]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    #[default]
    Cpu,
    /// CUDA device ordinal.
    Cuda(usize),
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl std::str::FromStr for Device {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim().to_ascii_lowercase();
        match t.as_str() {
            "cpu" => Ok(Device::Cpu),
            "cuda" | "gpu" => Ok(Device::Cuda(0)),
            _ => match t.strip_prefix("cuda:") {
                Some(n) => match n.parse::<usize>() {
                    Ok(n) => Ok(Device::Cuda(n)),
                    Err(_) => {
                        bail!("device `{s}`: expected cuda:N with N a device number (e.g. cuda:0)")
                    }
                },
                None => bail!("unknown device `{s}` (expected cpu, cuda or cuda:N)"),
            },
        }
    }
}

/// True when this build can drive CUDA devices (the `cuda` cargo feature).
pub const CUDA_COMPILED: bool = cfg!(feature = "cuda");

/// What `--device cuda` needs, for `--help` texts and error messages.
pub const CUDA_HELP: &str = "cuda needs a qlora built with `--features cuda`, the NVIDIA driver \
(libcuda.so.1) and the CUDA 13 libraries libcublas.so.13, libcublasLt.so.13 and libnvrtc.so.13 on \
the loader path (e.g. the nvidia/cu13/lib folder of the PyPI wheels nvidia-cublas and \
nvidia-cuda-nvrtc in LD_LIBRARY_PATH); no CUDA toolkit is needed";

/// One decoder layer's frozen weights on backend `B`. With [`cpu::CpuBackend`]
/// this is [`crate::Layer`]: the norm weights as `Vec<f32>`, the projections as
/// [`FrozenLinear`].
pub struct LayerW<B: Backend> {
    pub input_layernorm: B::Buf,
    pub post_attention_layernorm: B::Buf,
    /// Qwen3's per-head RMSNorm weights `(q_norm, k_norm)`, `[head_dim]` each, applied to
    /// every head of the projected queries / keys before RoPE.
    pub qk_norm: Option<(B::Buf, B::Buf)>,
    /// Indexed like [`crate::LINEAR_NAMES`].
    pub linears: [B::Linear; 7],
}

impl<B: Backend> Clone for LayerW<B>
where
    B::Buf: Clone,
{
    fn clone(&self) -> Self {
        LayerW {
            input_layernorm: self.input_layernorm.clone(),
            post_attention_layernorm: self.post_attention_layernorm.clone(),
            qk_norm: self.qk_norm.clone(),
            linears: self.linears.clone(),
        }
    }
}

impl<B: Backend> std::fmt::Debug for LayerW<B>
where
    B::Buf: std::fmt::Debug,
    B::Linear: std::fmt::Debug,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayerW")
            .field("input_layernorm", &self.input_layernorm)
            .field("post_attention_layernorm", &self.post_attention_layernorm)
            .field("qk_norm", &self.qk_norm)
            .field("linears", &self.linears)
            .finish()
    }
}

/// A layer's weights as handed out by [`Backend::fetch_layer`]: the resident
/// copy, or one gathered for this use (sharded backends).
pub enum LayerRef<'a, B: Backend> {
    Borrowed(&'a LayerW<B>),
    Owned(Box<LayerW<B>>),
}

impl<B: Backend> Deref for LayerRef<'_, B> {
    type Target = LayerW<B>;
    fn deref(&self) -> &LayerW<B> {
        match self {
            LayerRef::Borrowed(w) => w,
            LayerRef::Owned(w) => w,
        }
    }
}

/// Every frozen weight of the model, by reference, on backend `B`.
pub struct Weights<'a, B: Backend> {
    /// `[vocab, hidden]` token embedding.
    pub embed: &'a B::Embed,
    pub layers: &'a [LayerW<B>],
    pub norm: &'a B::Buf,
    pub lm_head: &'a B::Linear,
}

/// One adapted linear's LoRA on the device: `y += scale · (dropout(x) Aᵀ) Bᵀ`.
pub struct LoraOp<'a, B: Backend> {
    /// `[r, in]`.
    pub a: &'a B::Buf,
    /// `[out, r]`.
    pub b: &'a B::Buf,
    pub r: usize,
    pub in_features: usize,
    pub out_features: usize,
    pub scale: f32,
    /// Dropout probability on the LoRA input (0 = none).
    pub dropout: f32,
    /// Mask key ([`crate::ops::lora::dropout_factor`]); unique per step, layer, module.
    pub dropout_key: u64,
    /// Mask position of each of the `t` input rows (`None` = its own index;
    /// see [`crate::StepOptions::dropout_rows`]), on the host ...
    pub mask_rows: Option<&'a [usize]>,
    /// ... and the same positions on the device.
    pub mask_ids: Option<&'a B::Ids>,
}

/// A DoRA module's state on the device besides its LoRA ([`qlora_lora::dora`]).
pub struct DoraOp<'a, B: Backend> {
    /// `m` (`lora_magnitude_vector`), `[out]`.
    pub magnitude: &'a B::Buf,
    /// `‖W + s·B·A‖` per output row, `[out]`: computed from the current A, B and
    /// the (dequantized) base weight, detached (a constant for the backward).
    pub norm: &'a B::Buf,
}

/// What a DoRA forward keeps for its backward.
pub struct DoraSaved<B: Backend> {
    /// `dropout(x) Aᵀ` `[t, r]`.
    pub xa: B::Buf,
    /// `u = dropout(x) Wᵀ + s·B A dropout(x)` `[t, out]` (no bias).
    pub u: B::Buf,
}

/// The scalars of one AdamW update of one tensor (torch's single-tensor
/// AdamW; see `qlora_train::optim`), derived on the host in f64.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    /// `1 - lr·weight_decay` (1 when no decay).
    pub decay: f32,
    /// `1 - β1`.
    pub w1: f32,
    pub beta2: f32,
    /// `1 - β2`.
    pub w2: f32,
    /// `-lr / (1 - β1^t)`.
    pub step_size: f32,
    /// `sqrt(1 - β2^t)`.
    pub bc2_sqrt: f32,
    pub eps: f32,
}

impl AdamWStep {
    /// The scalars of step `step` (1-based) as `torch.optim.AdamW` derives them.
    pub fn new(lr: f64, beta1: f64, beta2: f64, eps: f64, weight_decay: f64, step: u64) -> Self {
        let bc1 = 1.0 - beta1.powi(step as i32);
        let bc2 = 1.0 - beta2.powi(step as i32);
        AdamWStep {
            decay: if weight_decay != 0.0 {
                (1.0 - lr * weight_decay) as f32
            } else {
                1.0
            },
            w1: (1.0 - beta1) as f32,
            beta2: beta2 as f32,
            w2: (1.0 - beta2) as f32,
            step_size: (-(lr / bc1)) as f32,
            bc2_sqrt: bc2.sqrt() as f32,
            eps: eps as f32,
        }
    }
}

/// Cross-entropy result of [`Backend::cross_entropy`].
pub struct CeOut<B: Backend> {
    /// Sum of `-log p(target)` over counted positions (f64).
    pub sum: f64,
    pub count: usize,
    /// `d(sum / denominator) / d x` `[t, hidden]` when a gradient was asked for.
    pub dx: Option<B::Buf>,
}

/// A linear's LoRA module in [`Backend::linear_lora_forward_many`]: its op
/// and the `x·Aᵀ` a checkpointed forward kept, if any (`None`: no LoRA).
pub type LoraSlot<'a, B> = Option<(LoraOp<'a, B>, Option<<B as Backend>::Buf>)>;
/// An output of [`Backend::linear_lora_forward_many`]: `y` and its LoRA
/// module's `x·Aᵀ`.
pub type LinearLoraOut<B> = (<B as Backend>::Buf, Option<<B as Backend>::Buf>);

/// [`Backend::swiglu_gate_up_backward`] op by op (its default).
#[allow(clippy::too_many_arguments)]
pub(crate) fn swiglu_gate_up_backward_unfused<B: Backend>(
    be: &B,
    wg: &B::Linear,
    wu: &B::Linear,
    lg: Option<(&LoraOp<B>, &B::Buf)>,
    lu: Option<(&LoraOp<B>, &B::Buf)>,
    x: &B::Buf,
    dm: B::Buf,
    g: &B::Buf,
    u: &B::Buf,
    t: usize,
    n: usize,
) -> Result<SwigluPairOut<B>> {
    let (dg, du) = be.swiglu_backward(&dm, g, u)?;
    // freed before the products, as the op-by-op backward did
    drop(dm);
    let (mut dx, grads_g) =
        be.linear_lora_backward_new(wg, lg.map(|(op, xa)| (op, x, xa)), &dg, t, n)?;
    drop(dg);
    let grads_u = match lu {
        Some((op, xa)) => Some(be.linear_lora_backward(wu, op, x, xa, &du, t, &mut dx, true)?),
        None => {
            be.linear_backward_input(wu, &du, t, &mut dx)?;
            None
        }
    };
    Ok((dx, grads_g, grads_u))
}

/// What [`Backend::swiglu_gate_up_backward`] returns: the input gradient
/// and the gate's and the up's `(dA, dB)`, for modules with LoRA.
pub type SwigluPairOut<B> = (
    <B as Backend>::Buf,
    Option<(<B as Backend>::Buf, <B as Backend>::Buf)>,
    Option<(<B as Backend>::Buf, <B as Backend>::Buf)>,
);

/// What [`Backend::linear_lora_backward_new`] returns: the input gradient
/// and the LoRA module's `(dA, dB)`, if it has one.
pub type InputGradOut<B> = (
    <B as Backend>::Buf,
    Option<(<B as Backend>::Buf, <B as Backend>::Buf)>,
);

/// [`Backend::linear_lora_backward_new`] as separate steps: a zeroed
/// buffer, then the base input gradient and the LoRA backward into it.
pub(crate) fn linear_lora_backward_new_unfused<B: Backend>(
    be: &B,
    w: &B::Linear,
    lora: Option<(&LoraOp<B>, &B::Buf, &B::Buf)>,
    dy: &B::Buf,
    t: usize,
    n: usize,
) -> Result<InputGradOut<B>> {
    let mut dx = be.zeros(n)?;
    let grads = match lora {
        None => {
            be.linear_backward_input(w, dy, t, &mut dx)?;
            None
        }
        Some((op, x, xa)) => Some(be.linear_lora_backward(w, op, x, xa, dy, t, &mut dx, true)?),
    };
    Ok((dx, grads))
}

/// [`Backend::linear_lora_forward_many`] as separate steps: the products,
/// then each module's LoRA forward (or up-projection from a kept `xa`).
pub(crate) fn linear_lora_forward_many_unfused<B: Backend>(
    be: &B,
    ws: &[&B::Linear],
    x: &B::Buf,
    t: usize,
    loras: Vec<LoraSlot<B>>,
) -> Result<Vec<LinearLoraOut<B>>> {
    assert_eq!(ws.len(), loras.len(), "one LoRA slot per linear");
    let ys = be.linear_forward_many(ws, x, t)?;
    ys.into_iter()
        .zip(loras)
        .map(|(mut y, lora)| {
            let xa = match lora {
                None => None,
                Some((op, Some(xa))) => {
                    be.lora_up(&op, x, &xa, t, &mut y)?;
                    Some(xa)
                }
                Some((op, None)) => Some(be.lora_forward(&op, x, t, &mut y)?),
            };
            Ok((y, xa))
        })
        .collect()
}

/// The operations the decoder needs, on buffers that live on one device.
///
/// Shapes are row-major and the same as [`crate::ops`] documents; `t` is the
/// number of token rows. Every op may fail (device errors) and says so through
/// `Result`; shape mistakes are programming errors and may panic.
pub trait Backend: Sized + Send + Sync {
    /// An f32 tensor on the device (activations, gradients, LoRA matrices,
    /// optimizer state, norm weights).
    type Buf: Send + Sync;
    /// Token / segment ids on the device.
    type Ids: Send + Sync;
    /// A frozen linear `[out, in]` (4-bit, bf16 or f32, optional bias) on the device.
    type Linear: Send + Sync + Clone;
    /// The frozen token embedding on the device.
    type Embed: Send + Sync;

    /// A short description (`cpu`, `cuda:0 (NVIDIA H200, sm_90)`).
    fn describe(&self) -> String;

    // ---- buffers ----
    fn upload(&self, x: &[f32]) -> Result<Self::Buf>;
    /// [`Self::upload`] taking ownership (the CPU backend keeps the vector as is).
    fn upload_owned(&self, x: Vec<f32>) -> Result<Self::Buf> {
        self.upload(&x)
    }
    fn upload_ids(&self, ids: &[u32]) -> Result<Self::Ids>;
    fn download(&self, x: &Self::Buf) -> Result<Vec<f32>>;
    fn zeros(&self, n: usize) -> Result<Self::Buf>;
    /// Number of f32 elements.
    fn len(&self, x: &Self::Buf) -> usize;
    /// `acc += x`.
    fn add_assign(&self, acc: &mut Self::Buf, x: &Self::Buf) -> Result<()>;
    /// `x *= s`.
    fn scale(&self, x: &mut Self::Buf, s: f32) -> Result<()>;
    /// Rows `r0..r1` of a `[rows, cols]` buffer, as a new buffer.
    fn rows(&self, x: &Self::Buf, cols: usize, r0: usize, r1: usize) -> Result<Self::Buf>;
    /// `cache = [cache; x]` (KV cache append).
    fn append(&self, cache: &mut Self::Buf, x: &Self::Buf) -> Result<()>;

    // ---- frozen weights ----
    /// Put a host linear on the device (kept in its storage format).
    fn prepare_linear(&self, w: &FrozenLinear) -> Result<Self::Linear>;
    /// Put a host embedding `[rows, cols]` on the device.
    fn prepare_embed(&self, w: &FrozenWeight, rows: usize, cols: usize) -> Result<Self::Embed>;
    /// Layer `l`'s weights for one use. The default hands out the resident
    /// copy; a sharded backend gathers the shards here.
    fn fetch_layer<'a>(&self, _l: usize, w: &'a LayerW<Self>) -> Result<LayerRef<'a, Self>> {
        Ok(LayerRef::Borrowed(w))
    }

    // ---- ops ----
    /// `x[t, h]` = embedding rows of `ids`.
    fn embed(&self, e: &Self::Embed, ids: &[u32], h: usize) -> Result<Self::Buf>;
    /// `y[t, out] = x[t, in] Wᵀ + bias`.
    fn linear_forward(&self, w: &Self::Linear, x: &Self::Buf, t: usize) -> Result<Self::Buf>;
    /// [`Self::linear_forward`] of several linears on the same input (a
    /// layer's q/k/v, gate/up); a backend may share work between them.
    fn linear_forward_many(
        &self,
        ws: &[&Self::Linear],
        x: &Self::Buf,
        t: usize,
    ) -> Result<Vec<Self::Buf>> {
        ws.iter().map(|w| self.linear_forward(w, x, t)).collect()
    }
    /// `dx[t, in] += dy[t, out] W` (the base is frozen: no weight gradient).
    fn linear_backward_input(
        &self,
        w: &Self::Linear,
        dy: &Self::Buf,
        t: usize,
        dx: &mut Self::Buf,
    ) -> Result<()>;
    /// Adds the LoRA term into `y`; returns `xa = dropout(x) Aᵀ` `[t, r]`.
    fn lora_forward(
        &self,
        op: &LoraOp<Self>,
        x: &Self::Buf,
        t: usize,
        y: &mut Self::Buf,
    ) -> Result<Self::Buf>;
    /// `xa = dropout(x) Aᵀ` `[t, r]` alone, exactly as [`Self::lora_forward`]
    /// returns it (a checkpointed layer's recompute needs the down
    /// projection's `xa` but not its output). The default runs the whole
    /// LoRA forward into a scratch output.
    fn lora_down(&self, op: &LoraOp<Self>, x: &Self::Buf, t: usize) -> Result<Self::Buf> {
        let mut y = self.zeros(t * op.out_features)?;
        self.lora_forward(op, x, t, &mut y)
    }
    /// Adds the LoRA term `s·xa·Bᵀ` into `y` from a kept `xa` (as
    /// [`Self::lora_forward`] returned it for this `x`): bit for bit what
    /// `lora_forward` adds. The default runs the whole LoRA forward again.
    fn lora_up(
        &self,
        op: &LoraOp<Self>,
        x: &Self::Buf,
        xa: &Self::Buf,
        t: usize,
        y: &mut Self::Buf,
    ) -> Result<()> {
        let _ = xa;
        self.lora_forward(op, x, t, y).map(|_| ())
    }
    /// The base products of several linears reading `x` (as
    /// [`Self::linear_forward_many`]), each with its module's LoRA term where
    /// `loras[k]` has one: `(op, kept)`, `kept` the `x·Aᵀ` a checkpointed
    /// forward kept. Returns each output and its module's `xa`. Bit for bit
    /// the products, then [`Self::lora_forward`] (or [`Self::lora_up`] from
    /// the kept `xa`) per module; a backend may add the up-projections inside
    /// the products instead of in passes of their own.
    fn linear_lora_forward_many(
        &self,
        ws: &[&Self::Linear],
        x: &Self::Buf,
        t: usize,
        loras: Vec<LoraSlot<Self>>,
    ) -> Result<Vec<LinearLoraOut<Self>>> {
        linear_lora_forward_many_unfused(self, ws, x, t, loras)
    }
    /// A frozen linear's input gradient (when `need_dx`) and its LoRA
    /// module's backward: returns `(dA, dB)`. Bit for bit
    /// [`Self::linear_backward_input`] then [`Self::lora_backward`]; a backend
    /// may add the LoRA input gradient inside the base product.
    #[allow(clippy::too_many_arguments)]
    fn linear_lora_backward(
        &self,
        w: &Self::Linear,
        op: &LoraOp<Self>,
        x: &Self::Buf,
        xa: &Self::Buf,
        dy: &Self::Buf,
        t: usize,
        dx: &mut Self::Buf,
        need_dx: bool,
    ) -> Result<(Self::Buf, Self::Buf)> {
        if need_dx {
            self.linear_backward_input(w, dy, t, dx)?;
        }
        self.lora_backward(op, x, xa, dy, t, dx)
    }
    /// A frozen linear's input gradient into a fresh buffer of `n` values
    /// (`t·in`), with its LoRA module's backward when `lora` has one
    /// (`(op, x, xa)`; returns `(dA, dB)`). Bit for bit zeros then
    /// [`Self::linear_backward_input`] / [`Self::linear_lora_backward`]; a
    /// backend may write the gradient without zeroing the buffer first.
    fn linear_lora_backward_new(
        &self,
        w: &Self::Linear,
        lora: Option<(&LoraOp<Self>, &Self::Buf, &Self::Buf)>,
        dy: &Self::Buf,
        t: usize,
        n: usize,
    ) -> Result<InputGradOut<Self>> {
        linear_lora_backward_new_unfused(self, w, lora, dy, t, n)
    }
    /// The MLP's SwiGLU backward (`dm` at `g`, `u`; `dm` is consumed, so
    /// that it can be freed as soon as it is used) and its gate and up
    /// projections' input gradient into a fresh `[t, in]` buffer of `n`
    /// values, with their LoRA modules (`(op, xa)` each, input `x`):
    /// returns the gradient and each module's `(dA, dB)`. Bit for bit
    /// [`Self::swiglu_backward`], [`Self::linear_lora_backward_new`] for
    /// gate, then [`Self::linear_backward_input`] /
    /// [`Self::linear_lora_backward`] for up (this default); a backend may
    /// never hold `dg` and `du` in memory.
    #[allow(clippy::too_many_arguments)]
    fn swiglu_gate_up_backward(
        &self,
        wg: &Self::Linear,
        wu: &Self::Linear,
        lg: Option<(&LoraOp<Self>, &Self::Buf)>,
        lu: Option<(&LoraOp<Self>, &Self::Buf)>,
        x: &Self::Buf,
        dm: Self::Buf,
        g: &Self::Buf,
        u: &Self::Buf,
        t: usize,
        n: usize,
    ) -> Result<SwigluPairOut<Self>> {
        swiglu_gate_up_backward_unfused(self, wg, wu, lg, lu, x, dm, g, u, t, n)
    }
    /// Returns `(dA [r, in], dB [out, r])`; adds the LoRA input gradient into `dx`.
    fn lora_backward(
        &self,
        op: &LoraOp<Self>,
        x: &Self::Buf,
        xa: &Self::Buf,
        dy: &Self::Buf,
        t: usize,
        dx: &mut Self::Buf,
    ) -> Result<(Self::Buf, Self::Buf)>;
    /// A DoRA linear (PEFT's `DoraLinearVariant`, see [`crate::ops::dora`]):
    /// `y` of base + DoRA and what the backward needs. Backends without DoRA
    /// kernels (CUDA so far) keep this default, a clear error.
    fn dora_forward(
        &self,
        _w: &Self::Linear,
        _op: &LoraOp<Self>,
        _dora: &DoraOp<Self>,
        _x: &Self::Buf,
        _t: usize,
    ) -> Result<(Self::Buf, DoraSaved<Self>)> {
        bail!(
            "DoRA adapters are not supported on {} yet; use --device cpu",
            self.describe()
        )
    }
    /// Backward of [`Self::dora_forward`] given its saved `xa` and `u`:
    /// `(dA, dB, dm)`; adds the input gradient into `dx` (its base-weight parts
    /// only when `need_dx`).
    #[allow(clippy::too_many_arguments)]
    fn dora_backward(
        &self,
        _w: &Self::Linear,
        _op: &LoraOp<Self>,
        _dora: &DoraOp<Self>,
        _x: &Self::Buf,
        _xa: &Self::Buf,
        _u: &Self::Buf,
        _dy: &Self::Buf,
        _t: usize,
        _dx: &mut Self::Buf,
        _need_dx: bool,
    ) -> Result<(Self::Buf, Self::Buf, Self::Buf)> {
        bail!(
            "DoRA adapters are not supported on {} yet; use --device cpu",
            self.describe()
        )
    }
    /// `(y, rstd [t])`.
    fn rmsnorm_forward(
        &self,
        x: &Self::Buf,
        w: &Self::Buf,
        eps: f32,
    ) -> Result<(Self::Buf, Self::Buf)>;
    /// `dx += d rmsnorm(x) given dy`.
    fn rmsnorm_backward_add(
        &self,
        dy: &Self::Buf,
        x: &Self::Buf,
        w: &Self::Buf,
        rstd: &Self::Buf,
        dx: &mut Self::Buf,
    ) -> Result<()>;
    /// Rotate `x [t, heads·d]` in place by the `[t, d/2]` tables (`inverse` = backward).
    fn rope(
        &self,
        x: &mut Self::Buf,
        heads: usize,
        d: usize,
        cos: &Self::Buf,
        sin: &Self::Buf,
        inverse: bool,
    ) -> Result<()>;
    /// `(out like q, saved)`: `saved` is whatever the backward needs besides
    /// q, k, v and out (the row log-sum-exp `[b, heads, q_len]`, CPU and CUDA).
    fn attention_forward(
        &self,
        sh: &AttnShape,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        seg: Option<&Self::Ids>,
    ) -> Result<(Self::Buf, Self::Buf)>;
    /// `(dq, dk, dv)`.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        sh: &AttnShape,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        out: &Self::Buf,
        saved: &Self::Buf,
        seg: Option<&Self::Ids>,
        dout: &Self::Buf,
    ) -> Result<(Self::Buf, Self::Buf, Self::Buf)>;
    /// `silu(g) ⊙ u`.
    fn swiglu_forward(&self, g: &Self::Buf, u: &Self::Buf) -> Result<Self::Buf>;
    /// `(dg, du)`.
    fn swiglu_backward(
        &self,
        dm: &Self::Buf,
        g: &Self::Buf,
        u: &Self::Buf,
    ) -> Result<(Self::Buf, Self::Buf)>;
    /// Shifted causal-LM cross-entropy of `lm_head(x)` (`x [t, hidden]`, rows
    /// of length `s`, `labels [t]`, −100 ignored), computed over chunks of rows
    /// so the whole `[t, vocab]` logits never exist at once where the backend
    /// can avoid it. `grad_denominator`: also return `d(sum/denominator)/dx`.
    fn cross_entropy(
        &self,
        lm_head: &Self::Linear,
        x: &Self::Buf,
        labels: &[i64],
        s: usize,
        grad_denominator: Option<f32>,
    ) -> Result<CeOut<Self>>;

    // ---- optimizer ----
    /// One AdamW update of `p` with gradient `g` and moments `m`, `v`.
    fn adamw(
        &self,
        p: &mut Self::Buf,
        g: &Self::Buf,
        m: &mut Self::Buf,
        v: &mut Self::Buf,
        st: &AdamWStep,
    ) -> Result<()>;
    /// `Σ x²` in f64 (global gradient norm = sqrt of the sum over tensors).
    fn sq_norm(&self, x: &Self::Buf) -> Result<f64>;
}
