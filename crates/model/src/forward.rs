//! The forward on one backend: the per-call context, LoRA handles, one decoder
//! layer (optionally keeping what the backward needs), final norm, logits and loss.

use anyhow::Result;
use qlora_lora::Adapter;

use crate::backend::{Backend, DoraOp, LayerW, LoraOp};
use crate::batch::Batch;
use crate::model::{
    AdapterView, CkptKept, Ctx, LayerActs, LayerKv, LinSaved, Net, QkPre, DOWN, GATE, K, O, Q, UP,
    V,
};
use crate::ops::attention::AttnShape;
use crate::ops::lora::splitmix64;
use crate::ops::rope;

/// A linear's output and what its backward needs.
/// A layer's output (if asked for), its activations (if kept) and what
/// checkpointing keeps (if asked for).
pub(crate) struct LayerParts<B: Backend> {
    pub out: Option<B::Buf>,
    pub acts: Option<LayerActs<B>>,
    pub kept: Option<CkptKept<B>>,
}

/// What [`Net::layer_forward_parts`] makes: everything (`keep`: the
/// activations too), the output and [`CkptKept`] (a checkpointed first
/// forward), or the activations from kept parts (the recompute).
pub(crate) enum Pass<B: Backend> {
    Out { keep: bool },
    Checkpointed,
    Recompute(CkptKept<B>),
}
type LinearOut<B> = (<B as Backend>::Buf, Option<LinSaved<B>>);

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
        let (y, xa) = self
            .be
            .linear_lora_forward_many(&[&w.linears[m]], x, t, vec![Some((op, None))])?
            .pop()
            .expect("one linear, one output");
        Ok((y, xa.map(|xa| LinSaved { xa, u: None })))
    }

    /// [`Self::linear`] for several modules reading the same input (q/k/v,
    /// gate/up): their base products in one backend call (one pack of the
    /// input, one parallel region on the CPU), then each module's LoRA term.
    /// DoRA modules compute their own base product, so then one by one.
    /// `kept`: the modules' `x·Aᵀ` a checkpointed forward kept (taken from
    /// it), so only the LoRA up-projections run.
    #[allow(clippy::too_many_arguments)]
    fn linears(
        &self,
        w: &LayerW<B>,
        l: usize,
        ms: &[usize],
        x: &B::Buf,
        t: usize,
        ad: Option<&AdapterView<B>>,
        ctx: &Ctx<B>,
        mut kept: Option<&mut [Option<B::Buf>; 7]>,
    ) -> Result<Vec<LinearOut<B>>> {
        if ms.iter().any(|&m| self.dora_op(ad, l, m).is_some()) {
            return ms
                .iter()
                .map(|&m| self.linear(w, l, m, x, t, ad, ctx))
                .collect();
        }
        let lins: Vec<&B::Linear> = ms.iter().map(|&m| &w.linears[m]).collect();
        let loras = ms
            .iter()
            .map(|&m| {
                let op = self.lora_op(ad, ctx, l, m)?;
                Some((op, kept.as_mut().and_then(|k| k[m].take())))
            })
            .collect();
        Ok(self
            .be
            .linear_lora_forward_many(&lins, x, t, loras)?
            .into_iter()
            .map(|(y, xa)| (y, xa.map(|xa| LinSaved { xa, u: None })))
            .collect())
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
        let p = self.layer_forward_parts(l, x, ctx, ad, kv, Pass::Out { keep })?;
        Ok((p.out.expect("the output was asked for"), p.acts))
    }

    /// A checkpointed layer's forward: its output and what it keeps
    /// ([`CkptKept`]) for the recompute.
    pub(crate) fn layer_forward_checkpointed(
        &self,
        l: usize,
        x: &B::Buf,
        ctx: &Ctx<B>,
        ad: Option<&AdapterView<B>>,
    ) -> Result<(B::Buf, CkptKept<B>)> {
        let p = self.layer_forward_parts(l, x, ctx, ad, None, Pass::Checkpointed)?;
        Ok((
            p.out.expect("the output was asked for"),
            p.kept.expect("checkpointing keeps its parts"),
        ))
    }

    /// A checkpointed layer's recompute before its backward: the activations
    /// only, from its input and what its forward kept. Neither the q/k/v
    /// products, RoPE, the attention nor the o-projection runs again
    /// ([`CkptKept`]), nor the layer's output
    /// (the next layer's input, kept): no base down projection, no LoRA
    /// up-projection of it, no residual add (SmolLM2: ~4% of a checkpointed
    /// step); the o and down projections' `x·Aᵀ` are, as the backward needs
    /// them.
    pub(crate) fn layer_recompute(
        &self,
        l: usize,
        x: &B::Buf,
        ctx: &Ctx<B>,
        ad: Option<&AdapterView<B>>,
        kept: CkptKept<B>,
    ) -> Result<LayerActs<B>> {
        let p = self.layer_forward_parts(l, x, ctx, ad, None, Pass::Recompute(kept))?;
        Ok(p.acts.expect("the recompute returns activations"))
    }

    /// The down projection's saved state alone (what [`Self::linear`] returns
    /// beside `y`): the LoRA `x·Aᵀ`; a DoRA module runs its whole forward.
    /// `kept`: a checkpointed forward's `x·Aᵀ` of the module, used as it is.
    #[allow(clippy::too_many_arguments)]
    fn linear_saved(
        &self,
        w: &LayerW<B>,
        l: usize,
        m: usize,
        x: &B::Buf,
        t: usize,
        ad: Option<&AdapterView<B>>,
        ctx: &Ctx<B>,
        kept: Option<B::Buf>,
    ) -> Result<Option<LinSaved<B>>> {
        let Some(op) = self.lora_op(ad, ctx, l, m) else {
            return Ok(None);
        };
        if self.dora_op(ad, l, m).is_some() {
            return Ok(self.linear(w, l, m, x, t, ad, ctx)?.1);
        }
        let xa = match kept {
            Some(xa) => xa,
            None => self.be.lora_down(&op, x, t)?,
        };
        Ok(Some(LinSaved { xa, u: None }))
    }

    /// One decoder layer, as much of it as `pass` asks for.
    fn layer_forward_parts(
        &self,
        l: usize,
        x: &B::Buf,
        ctx: &Ctx<B>,
        ad: Option<&AdapterView<B>>,
        kv: Option<&mut LayerKv<B>>,
        pass: Pass<B>,
    ) -> Result<LayerParts<B>> {
        let (keep, want_out) = match &pass {
            Pass::Out { keep } => (*keep, true),
            Pass::Checkpointed => (false, true),
            Pass::Recompute(_) => (true, false),
        };
        let keep_parts = matches!(pass, Pass::Checkpointed);
        let (reuse_qkv, reuse_attn, reuse_x_mid, mut reuse_xa) = match pass {
            Pass::Recompute(k) => (
                Some((k.q, k.k, k.v, k.qk_pre)),
                Some((k.att, k.attn_saved)),
                Some(k.x_mid),
                Some(k.xa),
            ),
            _ => (None, None, None, None),
        };
        let be = self.be;
        let cfg = &self.m.config;
        let t = ctx.t();
        let (nh, nkv, d) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let layer = self.fetch_layer(l)?;
        let w = &*layer;
        let eps = self.m.eps();
        let (n1, rstd1) = be.rmsnorm_forward(x, &w.input_layernorm, eps)?;
        let (q, k, v, qk_pre, xa_q, xa_k, xa_v) = match reuse_qkv {
            Some((q, k, v, qk_pre)) => {
                // kept by the checkpointed forward: only what the backward
                // needs of the modules (`x·Aᵀ`, kept too; DoRA's own state)
                let mut saved = |m: usize| {
                    let kept = reuse_xa.as_mut().and_then(|k| k[m].take());
                    self.linear_saved(w, l, m, &n1, t, ad, ctx, kept)
                };
                let (xa_q, xa_k, xa_v) = (saved(Q)?, saved(K)?, saved(V)?);
                (q, k, v, qk_pre, xa_q, xa_k, xa_v)
            }
            None => {
                let mut qkv = self
                    .linears(w, l, &[Q, K, V], &n1, t, ad, ctx, reuse_xa.as_mut())?
                    .into_iter();
                let (Some((mut q, xa_q)), Some((mut k, xa_k)), Some((v, xa_v))) =
                    (qkv.next(), qkv.next(), qkv.next())
                else {
                    unreachable!("three modules in, three outputs out")
                };
                // Qwen3: RMSNorm over each head's `head_dim` values (rows of
                // `d`) before RoPE.
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
                        (keep || keep_parts).then_some(pre)
                    }
                    None => None,
                };
                be.rope(&mut q, nh, d, &ctx.cos, &ctx.sin, false)?;
                be.rope(&mut k, nkv, d, &ctx.cos, &ctx.sin, false)?;
                (q, k, v, qk_pre, xa_q, xa_k, xa_v)
            }
        };
        let (att, attn_saved) = match (reuse_attn, kv) {
            (Some(kept), _) => kept,
            (None, None) => {
                let sh = AttnShape {
                    b: ctx.b,
                    q_len: ctx.s,
                    k_len: ctx.s,
                    q_offset: 0,
                    heads: nh,
                    kv_heads: nkv,
                    d,
                    window: self.m.sliding_window(),
                    bf16: self.m.base_compute() == crate::BaseCompute::Bf16,
                };
                be.attention_forward(&sh, &q, &k, &v, ctx.seg.as_ref())?
            }
            (None, Some(cache)) => {
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
                    bf16: self.m.base_compute() == crate::BaseCompute::Bf16,
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
        let (x_mid, xa_o) = match reuse_x_mid {
            Some(x_mid) => {
                let kept = reuse_xa.as_mut().and_then(|k| k[O].take());
                let xa_o = self.linear_saved(w, l, O, &att, t, ad, ctx, kept)?;
                (x_mid, xa_o)
            }
            None => {
                let (mut x_mid, xa_o) = self.linear(w, l, O, &att, t, ad, ctx)?;
                be.add_assign(&mut x_mid, x)?;
                (x_mid, xa_o)
            }
        };
        let (n2, rstd2) = be.rmsnorm_forward(&x_mid, &w.post_attention_layernorm, eps)?;
        let mut gu = self
            .linears(w, l, &[GATE, UP], &n2, t, ad, ctx, reuse_xa.as_mut())?
            .into_iter();
        let (Some((g, xa_g)), Some((u, xa_u))) = (gu.next(), gu.next()) else {
            unreachable!("two modules in, two outputs out")
        };
        let m = be.swiglu_forward(&g, &u)?;
        let (out, xa_d) = if want_out {
            let (mut out, xa_d) = self.linear(w, l, DOWN, &m, t, ad, ctx)?;
            be.add_assign(&mut out, &x_mid)?;
            (Some(out), xa_d)
        } else {
            let kept = reuse_xa.as_mut().and_then(|k| k[DOWN].take());
            (None, self.linear_saved(w, l, DOWN, &m, t, ad, ctx, kept)?)
        };
        if keep_parts {
            let kept = CkptKept {
                q,
                k,
                v,
                qk_pre,
                att,
                attn_saved,
                x_mid,
                xa: [xa_q, xa_k, xa_v, xa_o, xa_g, xa_u, xa_d].map(|s| s.map(|s| s.xa)),
            };
            return Ok(LayerParts {
                out,
                acts: None,
                kept: Some(kept),
            });
        }
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
        Ok(LayerParts {
            out,
            acts,
            kept: None,
        })
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

    pub(crate) fn forward_logits(
        &self,
        batch: &Batch,
        adapter: Option<&Adapter>,
    ) -> Result<Vec<f32>> {
        let ad = adapter
            .map(|a| self.m.adapter_view(self.be, a))
            .transpose()?;
        let (x, ctx) = self.forward_hidden(batch, ad.as_ref())?;
        let (nf, _) = self.final_norm(&x)?;
        let logits = self.be.linear_forward(self.w.lm_head, &nf, ctx.t())?;
        self.be.download(&logits)
    }

    pub(crate) fn loss(
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
