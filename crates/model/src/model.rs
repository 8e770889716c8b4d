//! The decoder: weights, the per-layer forward (optionally keeping what the
//! backward needs), logits and loss.

use anyhow::{bail, ensure, Result};
use qlora_config::ModelConfig;
use qlora_lora::Adapter;

use crate::backend::cpu::CpuBackend;
use crate::backend::{Backend, Device, DoraOp, LayerW, LoraOp, Weights};
use crate::ops::attention::AttnShape;
use crate::ops::linear::{FrozenLinear, FrozenWeight};
use crate::ops::lora::splitmix64;
use crate::ops::{cross_entropy, rope};

/// The seven projection linears of a layer, in this index order everywhere
/// (the order `qlora-lora` and PEFT use; the indices below follow it).
pub use qlora_config::LINEAR_NAMES;
pub(crate) const Q: usize = 0;
pub(crate) const K: usize = 1;
pub(crate) const V: usize = 2;
pub(crate) const O: usize = 3;
pub(crate) const GATE: usize = 4;
pub(crate) const UP: usize = 5;
pub(crate) const DOWN: usize = 6;

/// One decoder layer's frozen weights on the host (the CPU backend's layer:
/// norm weights `Vec<f32>`, projections [`FrozenLinear`]).
pub type Layer = LayerW<CpuBackend>;

/// A Llama-family causal LM with frozen (usually 4-bit) weights.
#[derive(Debug, Clone)]
pub struct Model {
    pub config: ModelConfig,
    /// `[vocab, hidden]`, dense (f32 or bf16).
    pub embed_tokens: FrozenWeight,
    pub layers: Vec<Layer>,
    pub norm: Vec<f32>,
    /// `[vocab, hidden]`; shares the embedding's storage when tied.
    pub lm_head: FrozenLinear,
    pub(crate) inv_freq: Vec<f32>,
    /// Where forward/backward run (default: these host weights on the CPU).
    pub(crate) exec: Exec,
}

/// A batch of equal-length rows (pad shorter examples; pad labels −100).
///
/// Padding must be on the right, or the pad tokens must get their own segment
/// id, so that real tokens never attend to them.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    pub input_ids: Vec<Vec<u32>>,
    /// Same shape as `input_ids`; −100 = not a target. Position `t` predicts `labels[t+1]`.
    pub labels: Vec<Vec<i64>>,
    /// Default `0..len` per row; packed rows restart at each example.
    pub position_ids: Option<Vec<Vec<u32>>>,
    /// Packed sequences: attention stays within equal ids (contiguous runs).
    pub segment_ids: Option<Vec<Vec<u32>>>,
}

impl Batch {
    /// Rows with `labels = input_ids` (every next token counts).
    pub fn from_ids(input_ids: Vec<Vec<u32>>) -> Self {
        let labels = input_ids
            .iter()
            .map(|r| r.iter().map(|&t| t as i64).collect())
            .collect();
        Batch {
            input_ids,
            labels,
            position_ids: None,
            segment_ids: None,
        }
    }

    /// `(rows, row length)` after checking shapes and ids.
    pub fn dims(&self, vocab: usize) -> Result<(usize, usize)> {
        let b = self.input_ids.len();
        ensure!(b > 0, "empty batch");
        let s = self.input_ids[0].len();
        ensure!(s > 0, "batch rows are empty");
        ensure!(
            self.labels.len() == b,
            "batch has {b} rows of input_ids but {} of labels",
            self.labels.len()
        );
        for (i, (ids, lab)) in self.input_ids.iter().zip(&self.labels).enumerate() {
            ensure!(
                ids.len() == s && lab.len() == s,
                "batch row {i}: {} ids and {} labels; every row must have {s} (pad them)",
                ids.len(),
                lab.len()
            );
            if let Some(&bad) = ids.iter().find(|&&t| t as usize >= vocab) {
                bail!("batch row {i}: token id {bad} is outside the vocabulary (size {vocab})");
            }
        }
        for (name, opt) in [
            ("position_ids", &self.position_ids),
            ("segment_ids", &self.segment_ids),
        ] {
            if let Some(rows) = opt {
                ensure!(
                    rows.len() == b && rows.iter().all(|r| r.len() == s),
                    "batch {name} must be {b} rows of {s}"
                );
            }
        }
        Ok((b, s))
    }

    pub(crate) fn flat_labels(&self) -> Vec<i64> {
        self.labels.iter().flatten().copied().collect()
    }
}

/// Per-call context shared by every layer, on backend `B`.
pub(crate) struct Ctx<B: Backend> {
    pub b: usize,
    pub s: usize,
    pub cos: B::Buf,
    pub sin: B::Buf,
    pub seg: Option<B::Ids>,
    /// Dropout mask seed; `None` = no dropout (evaluation).
    pub dropout_seed: Option<u64>,
    /// Mask position of each token (see `StepOptions::dropout_rows`), on the
    /// host and on the device.
    pub mask_rows: Option<Vec<usize>>,
    pub mask_ids: Option<B::Ids>,
}

impl<B: Backend> Ctx<B> {
    pub fn t(&self) -> usize {
        self.b * self.s
    }
}

/// Logits of a batch: `[batch, seq, vocab]` f32, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Logits {
    pub data: Vec<f32>,
    pub batch: usize,
    pub seq: usize,
    pub vocab: usize,
}

impl Logits {
    /// `[batch, seq, vocab]`.
    pub fn dims(&self) -> [usize; 3] {
        [self.batch, self.seq, self.vocab]
    }
    /// The `vocab` logits of sequence `b`, position `s`.
    pub fn at(&self, b: usize, s: usize) -> &[f32] {
        let o = (b * self.seq + s) * self.vocab;
        &self.data[o..o + self.vocab]
    }
    pub fn into_vec(self) -> Vec<f32> {
        self.data
    }
}

/// `(A [r, in], B [out, r], r)` of one adapted linear, on backend `B`.
pub(crate) type LoraMats<B> = (<B as Backend>::Buf, <B as Backend>::Buf, usize);

/// DoRA state of one adapted linear on backend `B`: `(m, ‖W + s·B·A‖)`, `[out]` each.
pub(crate) type DoraMats<B> = (<B as Backend>::Buf, <B as Backend>::Buf);

/// An adapter checked against the model: per layer, per linear, `(A, B, r)` as
/// f32 buffers of backend `B`, and for DoRA modules the magnitude and the
/// detached weight norm.
pub(crate) struct AdapterView<B: Backend> {
    pub scale: f32,
    pub dropout: f32,
    pub layers: Vec<[Option<LoraMats<B>>; 7]>,
    pub dora: Vec<[Option<DoraMats<B>>; 7]>,
}

/// What an adapted linear's forward keeps for its backward: `dropout(x) Aᵀ`,
/// and for DoRA `u = dropout(x) Wᵀ + s·B A dropout(x)` (see [`crate::ops::dora`]).
pub(crate) struct LinSaved<B: Backend> {
    pub xa: B::Buf,
    pub u: Option<B::Buf>,
}

impl<B: Backend> AdapterView<B> {
    /// Lowest layer holding any LoRA module (backward stops there).
    pub fn lowest_layer(&self) -> usize {
        self.layers
            .iter()
            .position(|l| l.iter().any(Option::is_some))
            .unwrap_or(self.layers.len())
    }
}

/// What a layer's backward needs from its forward (besides the layer input).
pub(crate) struct LayerActs<B: Backend> {
    pub n1: B::Buf,
    pub rstd1: B::Buf,
    pub q: B::Buf,
    pub k: B::Buf,
    /// Qwen3: q and k before their per-head RMSNorm, with the norms' 1/rms per head.
    pub qk_pre: Option<QkPre<B>>,
    pub v: B::Buf,
    /// What the attention backward needs besides q, k, v, att (CPU: the
    /// probabilities; CUDA: the row log-sum-exp).
    pub attn_saved: B::Buf,
    pub att: B::Buf,
    pub xa: [Option<LinSaved<B>>; 7],
    pub x_mid: B::Buf,
    pub n2: B::Buf,
    pub rstd2: B::Buf,
    pub g: B::Buf,
    pub u: B::Buf,
    pub m: B::Buf,
}

/// What the backward of Qwen3's q/k RMSNorm needs.
pub(crate) struct QkPre<B: Backend> {
    pub q: B::Buf,
    pub rstd_q: B::Buf,
    pub k: B::Buf,
    pub rstd_k: B::Buf,
}

/// Past keys/values of one layer for incremental decoding (batch 1).
pub(crate) struct LayerKv<B: Backend> {
    pub k: Option<B::Buf>,
    pub v: Option<B::Buf>,
}

impl<B: Backend> Default for LayerKv<B> {
    fn default() -> Self {
        LayerKv { k: None, v: None }
    }
}

/// Where a [`Model`] computes: the host weights themselves (CPU), or copies of
/// them on a CUDA device.
#[derive(Clone, Default)]
pub(crate) enum Exec {
    #[default]
    Cpu,
    #[cfg(feature = "cuda")]
    Cuda(std::sync::Arc<crate::backend::cuda_model::CudaModel>),
}

impl std::fmt::Debug for Exec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exec::Cpu => write!(f, "cpu"),
            #[cfg(feature = "cuda")]
            Exec::Cuda(c) => write!(f, "{}", c.be.describe()),
        }
    }
}

/// The model's computation on one backend: the config and host parts of
/// [`Model`], the backend, and the weights as that backend holds them.
pub(crate) struct Net<'a, B: Backend> {
    pub m: &'a Model,
    pub be: &'a B,
    pub w: Weights<'a, B>,
}

/// Run `$body` with `$net` bound to the model's [`Net`] on its device.
macro_rules! with_net {
    ($model:expr, |$net:ident| $body:expr) => {{
        let model: &Model = $model;
        match &model.exec {
            crate::model::Exec::Cpu => {
                let $net = model.cpu_net();
                $body
            }
            #[cfg(feature = "cuda")]
            crate::model::Exec::Cuda(c) => {
                let $net = c.net(model);
                $body
            }
        }
    }};
}
pub(crate) use with_net;

impl Model {
    pub fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }
    pub fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }

    /// Where this model computes.
    pub fn device(&self) -> Device {
        match &self.exec {
            Exec::Cpu => Device::Cpu,
            #[cfg(feature = "cuda")]
            Exec::Cuda(c) => Device::Cuda(c.ordinal()),
        }
    }

    /// A description of the compute device (`cpu (4 threads)`, `cuda:0 (NVIDIA H200, sm_90)`).
    pub fn device_description(&self) -> String {
        with_net!(self, |net| net.be.describe())
    }

    /// Compute on `device` from now on: `cuda[:N]` copies the frozen weights to
    /// that GPU (kept in their storage format); `cpu` drops any GPU copy. The
    /// host weights stay, so the trainer, checkpoints and PEFT I/O are unchanged.
    ///
    /// Errors (never panics) when this build lacks the `cuda` feature, when
    /// there is no GPU or driver, or when the CUDA libraries are missing.
    pub fn to_device(&mut self, device: Device) -> Result<()> {
        match device {
            Device::Cpu => {
                self.exec = Exec::Cpu;
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(n) => {
                let c = crate::backend::cuda_model::CudaModel::new(self, n)?;
                self.exec = Exec::Cuda(std::sync::Arc::new(c));
                Ok(())
            }
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => bail!(
                "--device {device}: this qlora binary was built without the `cuda` feature; \
                 rebuild it with `cargo build --release --features cuda` ({})",
                crate::backend::CUDA_HELP
            ),
        }
    }

    /// The CPU computation over the host weights.
    pub(crate) fn cpu_net(&self) -> Net<'_, CpuBackend> {
        static CPU: CpuBackend = CpuBackend;
        Net {
            m: self,
            be: &CPU,
            w: Weights {
                embed: &self.embed_tokens,
                layers: &self.layers,
                norm: &self.norm,
                lm_head: &self.lm_head,
            },
        }
    }

    /// Bytes held by the frozen weights.
    pub fn weight_bytes(&self) -> usize {
        let mut n = self.embed_tokens.bytes() + self.norm.len() * 4;
        let tied = self.embed_tokens.same_storage(&self.lm_head.weight);
        if !tied {
            n += self.lm_head.weight.bytes();
        }
        for l in &self.layers {
            n += (l.input_layernorm.len() + l.post_attention_layernorm.len()) * 4;
            for lin in &l.linears {
                n += lin.weight.bytes() + lin.bias.as_ref().map_or(0, |b| b.len() * 4);
            }
        }
        n
    }

    /// Mistral's sliding attention window (transformers applies it only there).
    pub(crate) fn sliding_window(&self) -> Option<usize> {
        match self.config.architecture {
            qlora_config::Architecture::Mistral => self.config.sliding_window,
            _ => None,
        }
    }

    pub(crate) fn eps(&self) -> f32 {
        self.config.rms_norm_eps as f32
    }

    /// Check an adapter against this model and put its matrices on backend `be` as f32.
    pub(crate) fn adapter_view<B: Backend>(
        &self,
        be: &B,
        adapter: &Adapter,
    ) -> Result<AdapterView<B>> {
        let nl = self.layers.len();
        let mut layers: Vec<[Option<LoraMats<B>>; 7]> =
            (0..nl).map(|_| Default::default()).collect();
        let mut dora: Vec<[Option<DoraMats<B>>; 7]> = (0..nl).map(|_| Default::default()).collect();
        let scale = adapter.scaling() as f32;
        for (path, w) in &adapter.layers {
            let found = (0..nl).find_map(|l| {
                LINEAR_NAMES
                    .iter()
                    .position(|n| ModelConfig::linear_path(l, n) == *path)
                    .map(|m| (l, m))
            });
            let Some((l, m)) = found else {
                bail!(
                    "adapter module `{path}` is not one of this model's projection linears \
                     (model.layers.<0..{nl}>.self_attn.{{q,k,v,o}}_proj / mlp.{{gate,up,down}}_proj)"
                );
            };
            let lin = &self.layers[l].linears[m];
            let a_dims = w.a.dims();
            let b_dims = w.b.dims();
            ensure!(
                a_dims[0] == b_dims[1],
                "adapter module `{path}`: lora_A {a_dims:?} and lora_B {b_dims:?} are not [r, in] and [out, r]"
            );
            let r = a_dims[0];
            ensure!(
                a_dims[1] == lin.in_features && b_dims[0] == lin.out_features,
                "adapter module `{path}`: lora_A {a_dims:?} / lora_B {b_dims:?} do not fit the base linear [out {}, in {}]",
                lin.out_features,
                lin.in_features
            );
            layers[l][m] = Some((be.upload(w.a.data())?, be.upload(w.b.data())?, r));
            match &w.magnitude {
                Some(mag) => {
                    ensure!(
                        mag.len() == lin.out_features,
                        "adapter module `{path}`: lora_magnitude_vector has {} values, the base linear has {} outputs",
                        mag.len(),
                        lin.out_features
                    );
                    // PEFT recomputes ‖W + s·B·A‖ from the current A, B on every
                    // forward (on the dequantized weight for a 4-bit base) and
                    // detaches it; A and B are fixed within one call, so once here.
                    let norm = crate::ops::dora::weight_norm(lin, w, scale);
                    dora[l][m] = Some((be.upload(mag)?, be.upload_owned(norm)?));
                }
                None => ensure!(
                    !adapter.config.use_dora,
                    "DoRA adapter module `{path}` has no magnitude vector"
                ),
            }
        }
        Ok(AdapterView {
            scale,
            dropout: adapter.config.lora_dropout as f32,
            layers,
            dora,
        })
    }

    /// Set every module's DoRA magnitude to PEFT's init `m = ‖W + s·B·A‖` per
    /// output row (`‖W‖` for a fresh adapter, whose B is 0), `W` dequantized
    /// for a 4-bit base, and mark the adapter as DoRA.
    pub fn init_dora(&self, adapter: &mut Adapter) -> Result<()> {
        let nl = self.layers.len();
        let scale = adapter.scaling() as f32;
        for (path, w) in adapter.layers.iter_mut() {
            let lin = (0..nl)
                .find_map(|l| {
                    LINEAR_NAMES
                        .iter()
                        .position(|n| ModelConfig::linear_path(l, n) == *path)
                        .map(|m| &self.layers[l].linears[m])
                })
                .ok_or_else(|| {
                    anyhow::anyhow!("adapter module `{path}` is not a projection of this model")
                })?;
            ensure!(
                w.a.cols() == lin.in_features && w.b.rows() == lin.out_features,
                "adapter module `{path}` does not fit the base linear [{}, {}]",
                lin.out_features,
                lin.in_features
            );
            w.magnitude = Some(crate::ops::dora::weight_norm(lin, w, scale));
        }
        adapter.config.use_dora = true;
        Ok(())
    }

    /// Logits `[b, s, vocab]` (f32), no dropout.
    pub fn forward_logits(&self, batch: &Batch, adapter: Option<&Adapter>) -> Result<Logits> {
        let (b, s) = batch.dims(self.vocab_size())?;
        let logits = with_net!(self, |net| net.forward_logits(batch, adapter))?;
        Ok(Logits {
            data: logits,
            batch: b,
            seq: s,
            vocab: self.vocab_size(),
        })
    }

    /// Shifted cross-entropy: `(sum over counted targets, count)`; mean = sum / count.
    pub fn loss(&self, batch: &Batch, adapter: Option<&Adapter>) -> Result<(f64, usize)> {
        let labels = batch.flat_labels();
        cross_entropy::check_labels(&labels, self.vocab_size())?;
        with_net!(self, |net| net.loss(batch, &labels, adapter))
    }
}

impl<B: Backend> Net<'_, B> {
    pub(crate) fn ctx(&self, batch: &Batch, dropout_seed: Option<u64>) -> Result<Ctx<B>> {
        let (b, s) = batch.dims(self.m.vocab_size())?;
        let positions: Vec<u32> = match &batch.position_ids {
            Some(p) => p.iter().flatten().copied().collect(),
            None => (0..b).flat_map(|_| 0..s as u32).collect(),
        };
        let (cos, sin) = rope::tables(&self.m.inv_freq, &positions);
        let seg = match &batch.segment_ids {
            Some(r) => {
                let flat: Vec<u32> = r.iter().flatten().copied().collect();
                Some(self.be.upload_ids(&flat)?)
            }
            None => None,
        };
        Ok(Ctx {
            b,
            s,
            cos: self.be.upload_owned(cos)?,
            sin: self.be.upload_owned(sin)?,
            seg,
            dropout_seed,
            mask_rows: None,
            mask_ids: None,
        })
    }

    pub(crate) fn embed(&self, ids: &[u32]) -> Result<B::Buf> {
        self.be.embed(self.w.embed, ids, self.m.hidden_size())
    }

    /// LoRA handle of module `m` of layer `l`, if adapted.
    pub(crate) fn lora_op<'v>(
        &self,
        ad: Option<&'v AdapterView<B>>,
        ctx: &'v Ctx<B>,
        l: usize,
        m: usize,
    ) -> Option<LoraOp<'v, B>> {
        let ctx_seed = ctx.dropout_seed;
        let ad = ad?;
        let (a, b, r) = ad.layers[l][m].as_ref()?;
        let lin = &self.m.layers[l].linears[m];
        let (dropout, key) = match ctx_seed {
            Some(seed) if ad.dropout > 0.0 => (
                ad.dropout,
                splitmix64(seed ^ splitmix64((l * 7 + m) as u64 + 1)),
            ),
            _ => (0.0, 0),
        };
        Some(LoraOp {
            a,
            b,
            r: *r,
            in_features: lin.in_features,
            out_features: lin.out_features,
            scale: ad.scale,
            dropout,
            dropout_key: key,
            mask_rows: ctx.mask_rows.as_deref(),
            mask_ids: ctx.mask_ids.as_ref(),
        })
    }

    /// DoRA state of module `m` of layer `l`, if it is a DoRA module.
    pub(crate) fn dora_op<'v>(
        &self,
        ad: Option<&'v AdapterView<B>>,
        l: usize,
        m: usize,
    ) -> Option<DoraOp<'v, B>> {
        let (magnitude, norm) = ad?.dora[l][m].as_ref()?;
        Some(DoraOp { magnitude, norm })
    }

    /// Base linear plus LoRA (or DoRA): returns `y` and what the backward needs.
    #[allow(clippy::too_many_arguments)]
    fn linear(
        &self,
        w: &LayerW<B>,
        l: usize,
        m: usize,
        x: &B::Buf,
        t: usize,
        ad: Option<&AdapterView<B>>,
        ctx: &Ctx<B>,
    ) -> Result<(B::Buf, Option<LinSaved<B>>)> {
        let Some(op) = self.lora_op(ad, ctx, l, m) else {
            return Ok((self.be.linear_forward(&w.linears[m], x, t)?, None));
        };
        if let Some(d) = self.dora_op(ad, l, m) {
            let (y, s) = self.be.dora_forward(&w.linears[m], &op, &d, x, t)?;
            return Ok((
                y,
                Some(LinSaved {
                    xa: s.xa,
                    u: Some(s.u),
                }),
            ));
        }
        let mut y = self.be.linear_forward(&w.linears[m], x, t)?;
        let xa = self.be.lora_forward(&op, x, t, &mut y)?;
        Ok((y, Some(LinSaved { xa, u: None })))
    }

    /// One decoder layer. With `kv` (batch 1), the new keys/values are appended
    /// to the cache and the queries attend to everything cached.
    pub(crate) fn layer_forward(
        &self,
        l: usize,
        x: &B::Buf,
        ctx: &Ctx<B>,
        ad: Option<&AdapterView<B>>,
        keep: bool,
        kv: Option<&mut LayerKv<B>>,
    ) -> Result<(B::Buf, Option<LayerActs<B>>)> {
        let be = self.be;
        let cfg = &self.m.config;
        let t = ctx.t();
        let (nh, nkv, d) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let layer = be.fetch_layer(l, &self.w.layers[l])?;
        let w = &*layer;
        let eps = self.m.eps();
        let (n1, rstd1) = be.rmsnorm_forward(x, &w.input_layernorm, eps)?;
        let (mut q, xa_q) = self.linear(w, l, Q, &n1, t, ad, ctx)?;
        let (mut k, xa_k) = self.linear(w, l, K, &n1, t, ad, ctx)?;
        let (v, xa_v) = self.linear(w, l, V, &n1, t, ad, ctx)?;
        // Qwen3: RMSNorm over each head's `head_dim` values (rows of `d`) before RoPE.
        let qk_pre = match &w.qk_norm {
            Some((wq, wk)) => {
                let (qn, rstd_q) = be.rmsnorm_forward(&q, wq, eps)?;
                let (kn, rstd_k) = be.rmsnorm_forward(&k, wk, eps)?;
                let pre = QkPre {
                    q: std::mem::replace(&mut q, qn),
                    rstd_q,
                    k: std::mem::replace(&mut k, kn),
                    rstd_k,
                };
                keep.then_some(pre)
            }
            None => None,
        };
        be.rope(&mut q, nh, d, &ctx.cos, &ctx.sin, false)?;
        be.rope(&mut k, nkv, d, &ctx.cos, &ctx.sin, false)?;
        let (att, attn_saved) = match kv {
            None => {
                let sh = AttnShape {
                    b: ctx.b,
                    q_len: ctx.s,
                    k_len: ctx.s,
                    q_offset: 0,
                    heads: nh,
                    kv_heads: nkv,
                    d,
                    window: self.m.sliding_window(),
                };
                be.attention_forward(&sh, &q, &k, &v, ctx.seg.as_ref())?
            }
            Some(cache) => {
                let past = cache.k.as_ref().map_or(0, |c| be.len(c) / (nkv * d));
                match (&mut cache.k, &mut cache.v) {
                    (Some(ck), Some(cv)) => {
                        be.append(ck, &k)?;
                        be.append(cv, &v)?;
                    }
                    _ => {
                        cache.k = Some(be.rows(&k, nkv * d, 0, ctx.s)?);
                        cache.v = Some(be.rows(&v, nkv * d, 0, ctx.s)?);
                    }
                }
                let sh = AttnShape {
                    b: 1,
                    q_len: ctx.s,
                    k_len: past + ctx.s,
                    q_offset: past,
                    heads: nh,
                    kv_heads: nkv,
                    d,
                    window: self.m.sliding_window(),
                };
                let (ck, cv) = (cache.k.as_ref(), cache.v.as_ref());
                be.attention_forward(
                    &sh,
                    &q,
                    ck.expect("set above"),
                    cv.expect("set above"),
                    None,
                )?
            }
        };
        let (o, xa_o) = self.linear(w, l, O, &att, t, ad, ctx)?;
        let mut x_mid = o;
        be.add_assign(&mut x_mid, x)?;
        let (n2, rstd2) = be.rmsnorm_forward(&x_mid, &w.post_attention_layernorm, eps)?;
        let (g, xa_g) = self.linear(w, l, GATE, &n2, t, ad, ctx)?;
        let (u, xa_u) = self.linear(w, l, UP, &n2, t, ad, ctx)?;
        let m = be.swiglu_forward(&g, &u)?;
        let (dn, xa_d) = self.linear(w, l, DOWN, &m, t, ad, ctx)?;
        let mut out = dn;
        be.add_assign(&mut out, &x_mid)?;
        let acts = keep.then_some(LayerActs {
            n1,
            rstd1,
            q,
            k,
            qk_pre,
            v,
            attn_saved,
            att,
            xa: [xa_q, xa_k, xa_v, xa_o, xa_g, xa_u, xa_d],
            x_mid,
            n2,
            rstd2,
            g,
            u,
            m,
        });
        Ok((out, acts))
    }

    /// Final norm: `(normed, rstd)`.
    pub(crate) fn final_norm(&self, x: &B::Buf) -> Result<(B::Buf, B::Buf)> {
        self.be.rmsnorm_forward(x, self.w.norm, self.m.eps())
    }

    fn forward_hidden(
        &self,
        batch: &Batch,
        ad: Option<&AdapterView<B>>,
    ) -> Result<(B::Buf, Ctx<B>)> {
        let ctx = self.ctx(batch, None)?;
        let ids: Vec<u32> = batch.input_ids.iter().flatten().copied().collect();
        let mut x = self.embed(&ids)?;
        for l in 0..self.m.layers.len() {
            x = self.layer_forward(l, &x, &ctx, ad, false, None)?.0;
        }
        Ok((x, ctx))
    }

    fn forward_logits(&self, batch: &Batch, adapter: Option<&Adapter>) -> Result<Vec<f32>> {
        let ad = adapter
            .map(|a| self.m.adapter_view(self.be, a))
            .transpose()?;
        let (x, ctx) = self.forward_hidden(batch, ad.as_ref())?;
        let (nf, _) = self.final_norm(&x)?;
        let logits = self.be.linear_forward(self.w.lm_head, &nf, ctx.t())?;
        self.be.download(&logits)
    }

    fn loss(
        &self,
        batch: &Batch,
        labels: &[i64],
        adapter: Option<&Adapter>,
    ) -> Result<(f64, usize)> {
        let ad = adapter
            .map(|a| self.m.adapter_view(self.be, a))
            .transpose()?;
        let (x, ctx) = self.forward_hidden(batch, ad.as_ref())?;
        let (nf, _) = self.final_norm(&x)?;
        let ce = self
            .be
            .cross_entropy(self.w.lm_head, &nf, labels, ctx.s, None)?;
        Ok((ce.sum, ce.count))
    }
}
