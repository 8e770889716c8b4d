//! `Model::forward_backward`: one training micro-step, written out per layer
//! (llm.c style). Only LoRA matrices get gradients; every frozen op passes
//! back just the input gradient. With checkpointing only each layer's input
//! is kept and the layer's forward is recomputed right before its backward
//! (the dropout mask is a hash of the seed, so the recomputation is identical).

use anyhow::{ensure, Result};
use qlora_config::ModelConfig;
use qlora_lora::{Adapter, AdapterGrads, LoraWeights, Matrix};

use crate::backend::{Backend, LayerW};
use crate::batch::Batch;
use crate::model::{
    with_net_on, AdapterView, CkptKept, Ctx, LayerActs, LinSaved, Model, Net, DOWN, GATE, K,
    LINEAR_NAMES, O, Q, UP, V,
};
use crate::ops::attention::AttnShape;
use crate::ops::cross_entropy;

/// Options of one forward+backward call.
#[derive(Debug, Clone)]
pub struct StepOptions {
    /// The loss differentiated is `sum_CE / loss_denominator` (the trainer passes
    /// the number of counted targets over all micro-batches of the step).
    pub loss_denominator: f32,
    /// Keep only layer inputs; recompute each layer in the backward.
    pub checkpointing: bool,
    /// Seed of the LoRA dropout masks (vary it per micro-step).
    pub lora_dropout_seed: u64,
    /// Where this batch's tokens sit in the batch whose dropout masks they
    /// must reproduce (a data-parallel rank's share of the global batch, or
    /// rows the trainer placed together); `None` = the batch is that batch.
    pub dropout_rows: Option<DropoutRows>,
}

/// The mask position of each token of the batch (row-major): `row ·
/// row_len + position` in the batch whose masks it reproduces, whose rows
/// are `row_len` tokens long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DropoutRows {
    pub positions: Vec<usize>,
}

impl Default for StepOptions {
    fn default() -> Self {
        StepOptions {
            loss_denominator: 1.0,
            checkpointing: false,
            lora_dropout_seed: 0,
            dropout_rows: None,
        }
    }
}

/// Gradients of one layer: `(dA, dB, dm)` per linear (`dm` for DoRA modules).
type LayerGrads<B> = [Option<(
    <B as Backend>::Buf,
    <B as Backend>::Buf,
    Option<<B as Backend>::Buf>,
)>; 7];

impl Model {
    /// Forward + backward of `sum_CE / opts.loss_denominator`. Returns the
    /// summed cross-entropy, the number of counted targets, and the gradient of
    /// every LoRA `A` and `B` of `adapter` (same keys and shapes), on the host
    /// whatever device computed them.
    pub fn forward_backward(
        &self,
        batch: &Batch,
        adapter: &Adapter,
        opts: &StepOptions,
    ) -> Result<(f64, usize, AdapterGrads)> {
        self.forward_backward_on(batch, adapter, opts, None)
    }

    /// [`Self::forward_backward`]; a sharded model gathers its layers through
    /// `comm` (collective: every rank of `comm` makes the same calls).
    pub fn forward_backward_on(
        &self,
        batch: &Batch,
        adapter: &Adapter,
        opts: &StepOptions,
        comm: Option<&dyn qlora_dist::Communicator>,
    ) -> Result<(f64, usize, AdapterGrads)> {
        ensure!(
            opts.loss_denominator > 0.0 && opts.loss_denominator.is_finite(),
            "loss_denominator must be positive, got {}",
            opts.loss_denominator
        );
        let labels = batch.flat_labels();
        cross_entropy::check_labels(&labels, self.vocab_size())?;
        with_net_on!(self, comm, |net| net
            .forward_backward(batch, &labels, adapter, opts))
    }
}

impl<B: Backend> Net<'_, B> {
    fn forward_backward(
        &self,
        batch: &Batch,
        labels: &[i64],
        adapter: &Adapter,
        opts: &StepOptions,
    ) -> Result<(f64, usize, AdapterGrads)> {
        let be = self.be;
        let ad = self.m.adapter_view(be, adapter)?;
        let mut ctx = self.ctx(batch, Some(opts.lora_dropout_seed))?;
        if let Some(dr) = &opts.dropout_rows {
            ensure!(
                dr.positions.len() == ctx.t(),
                "dropout_rows: {} positions for a batch of {} rows of {}",
                dr.positions.len(),
                ctx.b,
                ctx.s
            );
            let rows = dr.positions.clone();
            let ids: Vec<u32> = rows
                .iter()
                .map(|&r| u32::try_from(r))
                .collect::<Result<_, _>>()
                .map_err(|_| anyhow::anyhow!("dropout_rows: a row position above 2^32"))?;
            ctx.mask_ids = Some(be.upload_ids(&ids)?);
            ctx.mask_rows = Some(rows);
        }
        let t = ctx.t();
        let nl = self.m.layers.len();
        let lowest = ad.lowest_layer();

        // Forward, keeping layer inputs (+ activations unless checkpointing).
        let mut inputs: Vec<B::Buf> = Vec::with_capacity(nl);
        let mut acts: Vec<Option<LayerActs<B>>> = Vec::with_capacity(nl);
        let mut kept: Vec<Option<CkptKept<B>>> = Vec::with_capacity(nl);
        let ids: Vec<u32> = batch.input_ids.iter().flatten().copied().collect();
        let mut x = self.embed(&ids)?;
        for l in 0..nl {
            let (y, a, k) = if l >= lowest && opts.checkpointing {
                let (y, k) = self.layer_forward_checkpointed(l, &x, &ctx, Some(&ad))?;
                (y, None, Some(k))
            } else {
                let (y, a) = self.layer_forward(l, &x, &ctx, Some(&ad), l >= lowest, None)?;
                (y, a, None)
            };
            inputs.push(std::mem::replace(&mut x, y));
            acts.push(a);
            kept.push(k);
        }

        // Head + loss (chunked over rows where the backend can).
        let (nf, rstd) = self.final_norm(&x)?;
        let ce = be.cross_entropy(
            self.w.lm_head,
            &nf,
            labels,
            ctx.s,
            Some(opts.loss_denominator),
        )?;
        drop(nf);
        let dnf = ce.dx.expect("gradient requested");
        let mut dx = be.zeros(t * self.m.hidden_size())?;
        be.rmsnorm_backward_add(&dnf, &x, self.w.norm, &rstd, &mut dx)?;
        drop(dnf);

        // Layers, top down.
        let mut grads: Vec<LayerGrads<B>> = (0..nl).map(|_| Default::default()).collect();
        for l in (lowest..nl).rev() {
            let a = match acts[l].take() {
                Some(a) => a,
                None => {
                    let k = kept[l].take().expect("a checkpointed layer kept its parts");
                    self.layer_recompute(l, &inputs[l], &ctx, Some(&ad), k)?
                }
            };
            dx =
                self.layer_backward(l, &inputs[l], &a, dx, &ctx, &ad, &mut grads[l], l > lowest)?;
        }

        let mut out = AdapterGrads::new();
        for (l, lg) in grads.into_iter().enumerate() {
            for (m, g) in lg.into_iter().enumerate() {
                if let Some((da, db, dm)) = g {
                    let (_, _, r) = ad.layers[l][m].as_ref().expect("grad of an adapted module");
                    let lin = &self.m.layers[l].linears[m];
                    out.insert(
                        ModelConfig::linear_path(l, LINEAR_NAMES[m]),
                        LoraWeights {
                            a: Matrix::new(*r, lin.in_features, be.download(&da)?)?,
                            b: Matrix::new(lin.out_features, *r, be.download(&db)?)?,
                            magnitude: dm.map(|d| be.download(&d)).transpose()?,
                        },
                    );
                }
            }
        }
        Ok((ce.sum, ce.count, out))
    }

    /// Input gradient of the frozen linear `m` plus its LoRA's (recording dA, dB;
    /// for DoRA also dm, the whole input gradient coming from the DoRA op).
    #[allow(clippy::too_many_arguments)]
    fn linear_backward(
        &self,
        w: &LayerW<B>,
        l: usize,
        m: usize,
        x: &B::Buf,
        saved: &Option<LinSaved<B>>,
        dy: &B::Buf,
        dx: &mut B::Buf,
        ctx: &Ctx<B>,
        ad: &AdapterView<B>,
        grads: &mut LayerGrads<B>,
        need_dx: bool,
    ) -> Result<()> {
        let t = ctx.t();
        let lora = self.lora_op(Some(ad), ctx, l, m);
        let dora = self.dora_op(Some(ad), l, m);
        if let (Some(op), Some(d)) = (&lora, &dora) {
            let s = saved.as_ref().expect("DoRA forward saved x·Aᵀ and u");
            let u = s.u.as_ref().expect("DoRA forward saved u");
            let (da, db, dm) =
                self.be
                    .dora_backward(&w.linears[m], op, d, x, &s.xa, u, dy, t, dx, need_dx)?;
            grads[m] = Some((da, db, Some(dm)));
            return Ok(());
        }
        let Some(op) = lora else {
            if need_dx {
                self.be.linear_backward_input(&w.linears[m], dy, t, dx)?;
            }
            return Ok(());
        };
        let xa = &saved.as_ref().expect("LoRA forward saved x·Aᵀ").xa;
        let (da, db) =
            self.be
                .linear_lora_backward(&w.linears[m], &op, x, xa, dy, t, dx, need_dx)?;
        grads[m] = Some((da, db, None));
        Ok(())
    }

    /// [`Self::linear_backward`] into a fresh input gradient of `n` values
    /// (the first module writing a block's input gradient): the backend may
    /// write it without zeroing it first.
    #[allow(clippy::too_many_arguments)]
    fn linear_backward_new(
        &self,
        w: &LayerW<B>,
        l: usize,
        m: usize,
        x: &B::Buf,
        saved: &Option<LinSaved<B>>,
        dy: &B::Buf,
        n: usize,
        ctx: &Ctx<B>,
        ad: &AdapterView<B>,
        grads: &mut LayerGrads<B>,
    ) -> Result<B::Buf> {
        let t = ctx.t();
        if self.dora_op(Some(ad), l, m).is_some() {
            let mut dx = self.be.zeros(n)?;
            self.linear_backward(w, l, m, x, saved, dy, &mut dx, ctx, ad, grads, true)?;
            return Ok(dx);
        }
        let op = self.lora_op(Some(ad), ctx, l, m);
        let lora = op.as_ref().map(|op| {
            let xa = &saved.as_ref().expect("LoRA forward saved x·Aᵀ").xa;
            (op, x, xa)
        });
        let (dx, g) = self
            .be
            .linear_lora_backward_new(&w.linears[m], lora, dy, t, n)?;
        if let Some((da, db)) = g {
            grads[m] = Some((da, db, None));
        }
        Ok(dx)
    }

    /// Backward of layer `l`: given `d loss / d output`, returns `d loss / d input`.
    #[allow(clippy::too_many_arguments)]
    fn layer_backward(
        &self,
        l: usize,
        x_in: &B::Buf,
        a: &LayerActs<B>,
        dout: B::Buf,
        ctx: &Ctx<B>,
        ad: &AdapterView<B>,
        grads: &mut LayerGrads<B>,
        need_dx: bool,
    ) -> Result<B::Buf> {
        let be = self.be;
        let cfg = &self.m.config;
        let t = ctx.t();
        let (h, inter) = (cfg.hidden_size, cfg.intermediate_size);
        let (nh, nkv, d) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let layer = self.fetch_layer(l)?;
        let w = &*layer;

        // MLP block: out = x_mid + down(silu(gate(n2)) ⊙ up(n2)).
        let dm = self.linear_backward_new(
            w,
            l,
            DOWN,
            &a.m,
            &a.xa[DOWN],
            &dout,
            t * inter,
            ctx,
            ad,
            grads,
        )?;
        let dora =
            self.dora_op(Some(ad), l, GATE).is_some() || self.dora_op(Some(ad), l, UP).is_some();
        let dn2 = if dora {
            let (dg, du) = be.swiglu_backward(&dm, &a.g, &a.u)?;
            drop(dm);
            let mut dn2 = self.linear_backward_new(
                w,
                l,
                GATE,
                &a.n2,
                &a.xa[GATE],
                &dg,
                t * h,
                ctx,
                ad,
                grads,
            )?;
            self.linear_backward(
                w, l, UP, &a.n2, &a.xa[UP], &du, &mut dn2, ctx, ad, grads, true,
            )?;
            dn2
        } else {
            // SwiGLU's backward with both input gradients: a backend may
            // make dg, du inside them
            let (og, ou) = (
                self.lora_op(Some(ad), ctx, l, GATE),
                self.lora_op(Some(ad), ctx, l, UP),
            );
            let xa = |m: usize| &a.xa[m].as_ref().expect("LoRA forward saved x·Aᵀ").xa;
            let (dn2, gg, gu) = be.swiglu_gate_up_backward(
                &w.linears[GATE],
                &w.linears[UP],
                og.as_ref().map(|op| (op, xa(GATE))),
                ou.as_ref().map(|op| (op, xa(UP))),
                &a.n2,
                dm,
                &a.g,
                &a.u,
                t,
                t * h,
            )?;
            for (m, gr) in [(GATE, gg), (UP, gu)] {
                if let Some((da, db)) = gr {
                    grads[m] = Some((da, db, None));
                }
            }
            dn2
        };
        let mut dx_mid = dout;
        be.rmsnorm_backward_add(
            &dn2,
            &a.x_mid,
            &w.post_attention_layernorm,
            &a.rstd2,
            &mut dx_mid,
        )?;
        drop(dn2);

        // Attention block: x_mid = x_in + o(attn(rope(q(n1)), rope(k(n1)), v(n1))).
        let datt = self.linear_backward_new(
            w,
            l,
            O,
            &a.att,
            &a.xa[O],
            &dx_mid,
            t * nh * d,
            ctx,
            ad,
            grads,
        )?;
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
        let (mut dq, mut dk, dv) = be.attention_backward(
            &sh,
            &a.q,
            &a.k,
            &a.v,
            &a.att,
            &a.attn_saved,
            ctx.seg.as_ref(),
            &datt,
        )?;
        drop(datt);
        be.rope(&mut dq, nh, d, &ctx.cos, &ctx.sin, true)?;
        be.rope(&mut dk, nkv, d, &ctx.cos, &ctx.sin, true)?;
        // Qwen3: back through the per-head RMSNorm of q and k (weights frozen).
        if let Some((wq, wk)) = &w.qk_norm {
            let p = a
                .qk_pre
                .as_ref()
                .expect("q/k norm inputs kept for backward");
            let mut dq_pre = be.zeros(be.len(&dq))?;
            be.rmsnorm_backward_add(&dq, &p.q, wq, &p.rstd_q, &mut dq_pre)?;
            let mut dk_pre = be.zeros(be.len(&dk))?;
            be.rmsnorm_backward_add(&dk, &p.k, wk, &p.rstd_k, &mut dk_pre)?;
            dq = dq_pre;
            dk = dk_pre;
        }
        let mut dn1 = if need_dx {
            self.linear_backward_new(w, l, Q, &a.n1, &a.xa[Q], &dq, t * h, ctx, ad, grads)?
        } else {
            let mut dn1 = be.zeros(t * h)?;
            self.linear_backward(
                w, l, Q, &a.n1, &a.xa[Q], &dq, &mut dn1, ctx, ad, grads, false,
            )?;
            dn1
        };
        self.linear_backward(
            w, l, K, &a.n1, &a.xa[K], &dk, &mut dn1, ctx, ad, grads, need_dx,
        )?;
        self.linear_backward(
            w, l, V, &a.n1, &a.xa[V], &dv, &mut dn1, ctx, ad, grads, need_dx,
        )?;
        let mut dx = dx_mid;
        if need_dx {
            be.rmsnorm_backward_add(&dn1, x_in, &w.input_layernorm, &a.rstd1, &mut dx)?;
        }
        Ok(dx)
    }
}
