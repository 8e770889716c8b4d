//! The decoder: weights, the per-layer forward (optionally keeping what the
//! backward needs), logits and loss.

use anyhow::{bail, ensure, Context, Result};
use candle_core::{Device, Tensor};
use qlora_config::ModelConfig;
use qlora_lora::Adapter;

use crate::ops::attention::{self, AttnShape};
use crate::ops::linear::{FrozenLinear, FrozenWeight};
use crate::ops::lora::{splitmix64, LoraRef};
use crate::ops::{cross_entropy, rmsnorm, rope, swiglu};

/// The seven projection linears of a layer, in this index order everywhere
/// (the order `qlora-lora` and PEFT use; the indices below follow it).
pub use qlora_lora::LINEAR_NAMES;
pub(crate) const Q: usize = 0;
pub(crate) const K: usize = 1;
pub(crate) const V: usize = 2;
pub(crate) const O: usize = 3;
pub(crate) const GATE: usize = 4;
pub(crate) const UP: usize = 5;
pub(crate) const DOWN: usize = 6;

/// One decoder layer's frozen weights.
#[derive(Debug, Clone)]
pub struct Layer {
    pub input_layernorm: Vec<f32>,
    pub post_attention_layernorm: Vec<f32>,
    /// Indexed like [`LINEAR_NAMES`].
    pub linears: [FrozenLinear; 7],
}

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

/// Per-call context shared by every layer.
pub(crate) struct Ctx {
    pub b: usize,
    pub s: usize,
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    pub seg: Option<Vec<u32>>,
    /// Dropout mask seed; `None` = no dropout (evaluation).
    pub dropout_seed: Option<u64>,
    /// Mask position of each token (see `StepOptions::dropout_rows`).
    pub mask_rows: Option<Vec<usize>>,
}

impl Ctx {
    pub fn t(&self) -> usize {
        self.b * self.s
    }
}

/// `(A [r, in], B [out, r], r)` of one adapted linear, as f32.
pub(crate) type LoraMats = (Vec<f32>, Vec<f32>, usize);

/// An adapter checked against the model: per layer, per linear, `(A, B, r)` as f32.
#[derive(Debug, Clone)]
pub(crate) struct AdapterView {
    pub scale: f32,
    pub dropout: f32,
    pub layers: Vec<[Option<LoraMats>; 7]>,
}

impl AdapterView {
    /// Lowest layer holding any LoRA module (backward stops there).
    pub fn lowest_layer(&self) -> usize {
        self.layers
            .iter()
            .position(|l| l.iter().any(Option::is_some))
            .unwrap_or(self.layers.len())
    }
}

/// What a layer's backward needs from its forward (besides the layer input).
pub(crate) struct LayerActs {
    pub n1: Vec<f32>,
    pub rstd1: Vec<f32>,
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    pub probs: Vec<f32>,
    pub att: Vec<f32>,
    pub xa: [Option<Vec<f32>>; 7],
    pub x_mid: Vec<f32>,
    pub n2: Vec<f32>,
    pub rstd2: Vec<f32>,
    pub g: Vec<f32>,
    pub u: Vec<f32>,
    pub m: Vec<f32>,
}

/// Past keys/values of one layer for incremental decoding (batch 1).
#[derive(Debug, Clone, Default)]
pub(crate) struct LayerKv {
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

impl Model {
    pub fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }
    pub fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }

    /// Bytes held by the frozen weights.
    pub fn weight_bytes(&self) -> usize {
        let mut n = self.embed_tokens.bytes() + self.norm.len() * 4;
        let tied = matches!((&self.embed_tokens, &self.lm_head.weight),
            (FrozenWeight::F32(a), FrozenWeight::F32(b)) if std::sync::Arc::ptr_eq(a, b))
            || matches!((&self.embed_tokens, &self.lm_head.weight),
            (FrozenWeight::BF16(a), FrozenWeight::BF16(b)) if std::sync::Arc::ptr_eq(a, b));
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

    /// Check an adapter against this model and copy its matrices out as f32.
    pub(crate) fn adapter_view(&self, adapter: &Adapter) -> Result<AdapterView> {
        let nl = self.layers.len();
        let mut layers: Vec<[Option<LoraMats>; 7]> = (0..nl).map(|_| Default::default()).collect();
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
            let a_dims = w.a.dims().to_vec();
            let b_dims = w.b.dims().to_vec();
            ensure!(
                a_dims.len() == 2 && b_dims.len() == 2 && a_dims[0] == b_dims[1],
                "adapter module `{path}`: lora_A {a_dims:?} and lora_B {b_dims:?} are not [r, in] and [out, r]"
            );
            let r = a_dims[0];
            ensure!(
                a_dims[1] == lin.in_features && b_dims[0] == lin.out_features,
                "adapter module `{path}`: lora_A {a_dims:?} / lora_B {b_dims:?} do not fit the base linear [out {}, in {}]",
                lin.out_features,
                lin.in_features
            );
            let to_vec = |t: &Tensor| -> Result<Vec<f32>> {
                t.to_dtype(candle_core::DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()
                    .with_context(|| format!("adapter module `{path}`"))
            };
            layers[l][m] = Some((to_vec(&w.a)?, to_vec(&w.b)?, r));
        }
        Ok(AdapterView {
            scale: adapter.scaling() as f32,
            dropout: adapter.config.lora_dropout as f32,
            layers,
        })
    }

    pub(crate) fn ctx(&self, batch: &Batch, dropout_seed: Option<u64>) -> Result<Ctx> {
        let (b, s) = batch.dims(self.vocab_size())?;
        let positions: Vec<u32> = match &batch.position_ids {
            Some(p) => p.iter().flatten().copied().collect(),
            None => (0..b).flat_map(|_| 0..s as u32).collect(),
        };
        let (cos, sin) = rope::tables(&self.inv_freq, &positions);
        Ok(Ctx {
            b,
            s,
            cos,
            sin,
            seg: batch
                .segment_ids
                .as_ref()
                .map(|r| r.iter().flatten().copied().collect()),
            dropout_seed,
            mask_rows: None,
        })
    }

    pub(crate) fn embed(&self, ids: impl Iterator<Item = u32>) -> Vec<f32> {
        let h = self.hidden_size();
        let ids: Vec<u32> = ids.collect();
        let mut x = vec![0f32; ids.len() * h];
        for (row, &id) in x.chunks_mut(h).zip(&ids) {
            self.embed_tokens
                .rows_f32(id as usize, id as usize + 1, h, row);
        }
        x
    }

    /// LoRA handle of module `m` of layer `l`, if adapted.
    pub(crate) fn lora_ref<'a>(
        &self,
        ad: Option<&'a AdapterView>,
        ctx_seed: Option<u64>,
        mask_rows: Option<&'a [usize]>,
        l: usize,
        m: usize,
    ) -> Option<LoraRef<'a>> {
        let ad = ad?;
        let (a, b, r) = ad.layers[l][m].as_ref()?;
        let lin = &self.layers[l].linears[m];
        let (dropout, key) = match ctx_seed {
            Some(seed) if ad.dropout > 0.0 => (
                ad.dropout,
                splitmix64(seed ^ splitmix64((l * 7 + m) as u64 + 1)),
            ),
            _ => (0.0, 0),
        };
        Some(LoraRef {
            a,
            b,
            r: *r,
            in_features: lin.in_features,
            out_features: lin.out_features,
            scale: ad.scale,
            dropout,
            dropout_key: key,
            mask_rows,
        })
    }

    /// Base linear plus LoRA: returns `y` and the LoRA's saved `x Aᵀ`.
    fn linear(
        &self,
        l: usize,
        m: usize,
        x: &[f32],
        t: usize,
        ad: Option<&AdapterView>,
        seed: (Option<u64>, Option<&[usize]>),
    ) -> (Vec<f32>, Option<Vec<f32>>) {
        let mut y = self.layers[l].linears[m].forward(x, t);
        let xa = self
            .lora_ref(ad, seed.0, seed.1, l, m)
            .map(|lr| lr.forward(x, t, &mut y));
        (y, xa)
    }

    /// One decoder layer. With `kv` (batch 1), the new keys/values are appended
    /// to the cache and the queries attend to everything cached.
    pub(crate) fn layer_forward(
        &self,
        l: usize,
        x: &[f32],
        ctx: &Ctx,
        ad: Option<&AdapterView>,
        keep: bool,
        kv: Option<&mut LayerKv>,
    ) -> (Vec<f32>, Option<LayerActs>) {
        let cfg = &self.config;
        let t = ctx.t();
        let (nh, nkv, d) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let layer = &self.layers[l];
        let seed = (ctx.dropout_seed, ctx.mask_rows.as_deref());
        let (n1, rstd1) = rmsnorm::forward(x, &layer.input_layernorm, self.eps());
        let (mut q, xa_q) = self.linear(l, Q, &n1, t, ad, seed);
        let (mut k, xa_k) = self.linear(l, K, &n1, t, ad, seed);
        let (v, xa_v) = self.linear(l, V, &n1, t, ad, seed);
        rope::apply(&mut q, nh, d, &ctx.cos, &ctx.sin, false);
        rope::apply(&mut k, nkv, d, &ctx.cos, &ctx.sin, false);
        let (att, probs) = match kv {
            None => {
                let sh = AttnShape {
                    b: ctx.b,
                    q_len: ctx.s,
                    k_len: ctx.s,
                    q_offset: 0,
                    heads: nh,
                    kv_heads: nkv,
                    d,
                    window: self.sliding_window(),
                };
                attention::forward(&sh, &q, &k, &v, ctx.seg.as_deref())
            }
            Some(cache) => {
                let past = cache.k.len() / (nkv * d);
                cache.k.extend_from_slice(&k);
                cache.v.extend_from_slice(&v);
                let sh = AttnShape {
                    b: 1,
                    q_len: ctx.s,
                    k_len: past + ctx.s,
                    q_offset: past,
                    heads: nh,
                    kv_heads: nkv,
                    d,
                    window: self.sliding_window(),
                };
                attention::forward(&sh, &q, &cache.k, &cache.v, None)
            }
        };
        let (o, xa_o) = self.linear(l, O, &att, t, ad, seed);
        let mut x_mid = o;
        x_mid.iter_mut().zip(x).for_each(|(a, b)| *a += b);
        let (n2, rstd2) = rmsnorm::forward(&x_mid, &layer.post_attention_layernorm, self.eps());
        let (g, xa_g) = self.linear(l, GATE, &n2, t, ad, seed);
        let (u, xa_u) = self.linear(l, UP, &n2, t, ad, seed);
        let m = swiglu::forward(&g, &u);
        let (dn, xa_d) = self.linear(l, DOWN, &m, t, ad, seed);
        let mut out = dn;
        out.iter_mut().zip(&x_mid).for_each(|(a, b)| *a += b);
        let acts = keep.then_some(LayerActs {
            n1,
            rstd1,
            q,
            k,
            v,
            probs,
            att,
            xa: [xa_q, xa_k, xa_v, xa_o, xa_g, xa_u, xa_d],
            x_mid,
            n2,
            rstd2,
            g,
            u,
            m,
        });
        (out, acts)
    }

    /// Final norm + lm_head: `[t, vocab]` logits.
    pub(crate) fn head(&self, x: &[f32], t: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let (nf, rstd) = rmsnorm::forward(x, &self.norm, self.eps());
        let logits = self.lm_head.forward(&nf, t);
        (logits, nf, rstd)
    }

    fn forward_flat(&self, batch: &Batch, adapter: Option<&Adapter>) -> Result<(Vec<f32>, Ctx)> {
        let ad = adapter.map(|a| self.adapter_view(a)).transpose()?;
        let ctx = self.ctx(batch, None)?;
        let mut x = self.embed(batch.input_ids.iter().flatten().copied());
        for l in 0..self.layers.len() {
            x = self.layer_forward(l, &x, &ctx, ad.as_ref(), false, None).0;
        }
        let (logits, _, _) = self.head(&x, ctx.t());
        Ok((logits, ctx))
    }

    /// Logits `[b, s, vocab]` (f32), no dropout.
    pub fn forward_logits(&self, batch: &Batch, adapter: Option<&Adapter>) -> Result<Tensor> {
        let (logits, ctx) = self.forward_flat(batch, adapter)?;
        Ok(Tensor::from_vec(
            logits,
            (ctx.b, ctx.s, self.vocab_size()),
            &Device::Cpu,
        )?)
    }

    /// Shifted cross-entropy: `(sum over counted targets, count)`; mean = sum / count.
    pub fn loss(&self, batch: &Batch, adapter: Option<&Adapter>) -> Result<(f64, usize)> {
        let labels = batch.flat_labels();
        cross_entropy::check_labels(&labels, self.vocab_size())?;
        let (logits, ctx) = self.forward_flat(batch, adapter)?;
        Ok(cross_entropy::forward(
            &logits,
            &labels,
            ctx.s,
            self.vocab_size(),
        ))
    }
}
