//! `Model::forward_backward`: one training micro-step, written out per layer
//! (llm.c style). Only LoRA matrices get gradients; every frozen op passes
//! back just the input gradient. With checkpointing only each layer's input
//! is kept and the layer's forward is recomputed right before its backward
//! (the dropout mask is a hash of the seed, so the recomputation is identical).

use anyhow::{ensure, Result};
use candle_core::{Device, Tensor};
use qlora_config::ModelConfig;
use qlora_lora::{Adapter, AdapterGrads, LoraWeights};

use crate::model::{AdapterView, Ctx, LayerActs, Model, DOWN, GATE, K, LINEAR_NAMES, O, Q, UP, V};
use crate::ops::attention::{self, AttnShape};
use crate::ops::{cross_entropy, rmsnorm, rope, swiglu};

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
    /// Where this batch's rows sit in a larger batch whose dropout masks they
    /// must reproduce (a data-parallel rank's share of the global batch);
    /// `None` = the batch is the whole batch.
    pub dropout_rows: Option<DropoutRows>,
}

/// Row `j` of the batch is row `rows[j]` of a batch of rows `row_len` tokens long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DropoutRows {
    pub rows: Vec<usize>,
    pub row_len: usize,
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

/// Gradient accumulators of one layer: `(dA, dB)` per linear.
type LayerGrads = [Option<(Vec<f32>, Vec<f32>)>; 7];

impl Model {
    /// Forward + backward of `sum_CE / opts.loss_denominator`. Returns the
    /// summed cross-entropy, the number of counted targets, and the gradient of
    /// every LoRA `A` and `B` of `adapter` (same keys and shapes).
    pub fn forward_backward(
        &self,
        batch: &Batch,
        adapter: &Adapter,
        opts: &StepOptions,
    ) -> Result<(f64, usize, AdapterGrads)> {
        ensure!(
            opts.loss_denominator > 0.0 && opts.loss_denominator.is_finite(),
            "loss_denominator must be positive, got {}",
            opts.loss_denominator
        );
        let labels = batch.flat_labels();
        cross_entropy::check_labels(&labels, self.vocab_size())?;
        let ad = self.adapter_view(adapter)?;
        let mut ctx = self.ctx(batch, Some(opts.lora_dropout_seed))?;
        if let Some(dr) = &opts.dropout_rows {
            ensure!(
                dr.rows.len() == ctx.b && ctx.s <= dr.row_len,
                "dropout_rows: {} rows of {} for a batch of {} rows of {}",
                dr.rows.len(),
                dr.row_len,
                ctx.b,
                ctx.s
            );
            ctx.mask_rows = Some(
                dr.rows
                    .iter()
                    .flat_map(|&g| (0..ctx.s).map(move |p| g * dr.row_len + p))
                    .collect(),
            );
        }
        let t = ctx.t();
        let nl = self.layers.len();
        let lowest = ad.lowest_layer();

        // Forward, keeping layer inputs (+ activations unless checkpointing).
        let mut inputs: Vec<Vec<f32>> = Vec::with_capacity(nl);
        let mut acts: Vec<Option<LayerActs>> = Vec::with_capacity(nl);
        let mut x = self.embed(batch.input_ids.iter().flatten().copied());
        for l in 0..nl {
            let keep = l >= lowest && !opts.checkpointing;
            let (y, a) = self.layer_forward(l, &x, &ctx, Some(&ad), keep, None);
            inputs.push(std::mem::replace(&mut x, y));
            acts.push(a);
        }

        // Head + loss.
        let (mut logits, _nf, rstd) = self.head(&x, t);
        let (sum, count) = cross_entropy::forward_backward_inplace(
            &mut logits,
            &labels,
            ctx.s,
            self.vocab_size(),
            opts.loss_denominator,
        );
        let mut dnf = vec![0f32; t * self.hidden_size()];
        self.lm_head.backward_input(&logits, t, &mut dnf);
        drop(logits);
        let mut dx = vec![0f32; t * self.hidden_size()];
        rmsnorm::backward_add(&dnf, &x, &self.norm, &rstd, &mut dx);
        drop(dnf);

        // Layers, top down.
        let mut grads: Vec<LayerGrads> = (0..nl).map(|_| Default::default()).collect();
        for l in (lowest..nl).rev() {
            let a = match acts[l].take() {
                Some(a) => a,
                None => self
                    .layer_forward(l, &inputs[l], &ctx, Some(&ad), true, None)
                    .1
                    .expect("keep=true returns activations"),
            };
            dx = self.layer_backward(l, &inputs[l], &a, dx, &ctx, &ad, &mut grads[l], l > lowest);
        }

        let mut out = AdapterGrads::new();
        for (l, lg) in grads.into_iter().enumerate() {
            for (m, g) in lg.into_iter().enumerate() {
                if let Some((da, db)) = g {
                    let (_, _, r) = ad.layers[l][m].as_ref().expect("grad of an adapted module");
                    let lin = &self.layers[l].linears[m];
                    out.insert(
                        ModelConfig::linear_path(l, LINEAR_NAMES[m]),
                        LoraWeights {
                            a: Tensor::from_vec(da, (*r, lin.in_features), &Device::Cpu)?,
                            b: Tensor::from_vec(db, (lin.out_features, *r), &Device::Cpu)?,
                        },
                    );
                }
            }
        }
        Ok((sum, count, out))
    }

    /// Input gradient of the frozen linear `m` plus its LoRA's (recording dA, dB).
    #[allow(clippy::too_many_arguments)]
    fn linear_backward(
        &self,
        l: usize,
        m: usize,
        x: &[f32],
        xa: &Option<Vec<f32>>,
        dy: &[f32],
        dx: &mut [f32],
        ctx: &Ctx,
        ad: &AdapterView,
        grads: &mut LayerGrads,
        need_dx: bool,
    ) {
        let t = ctx.t();
        if need_dx {
            self.layers[l].linears[m].backward_input(dy, t, dx);
        }
        if let Some(lr) = self.lora_ref(Some(ad), ctx.dropout_seed, ctx.mask_rows.as_deref(), l, m)
        {
            let xa = xa.as_ref().expect("LoRA forward saved x·Aᵀ");
            // The LoRA input gradient is cheap; always add it (dx is discarded when unused).
            let (da, db) = lr.backward(x, xa, dy, t, dx);
            grads[m] = Some((da, db));
        }
    }

    /// Backward of layer `l`: given `d loss / d output`, returns `d loss / d input`.
    #[allow(clippy::too_many_arguments)]
    fn layer_backward(
        &self,
        l: usize,
        x_in: &[f32],
        a: &LayerActs,
        dout: Vec<f32>,
        ctx: &Ctx,
        ad: &AdapterView,
        grads: &mut LayerGrads,
        need_dx: bool,
    ) -> Vec<f32> {
        let cfg = &self.config;
        let t = ctx.t();
        let (h, inter) = (cfg.hidden_size, cfg.intermediate_size);
        let (nh, nkv, d) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let layer = &self.layers[l];

        // MLP block: out = x_mid + down(silu(gate(n2)) ⊙ up(n2)).
        let mut dm = vec![0f32; t * inter];
        self.linear_backward(
            l,
            DOWN,
            &a.m,
            &a.xa[DOWN],
            &dout,
            &mut dm,
            ctx,
            ad,
            grads,
            true,
        );
        let (dg, du) = swiglu::backward(&dm, &a.g, &a.u);
        drop(dm);
        let mut dn2 = vec![0f32; t * h];
        self.linear_backward(
            l,
            GATE,
            &a.n2,
            &a.xa[GATE],
            &dg,
            &mut dn2,
            ctx,
            ad,
            grads,
            true,
        );
        self.linear_backward(l, UP, &a.n2, &a.xa[UP], &du, &mut dn2, ctx, ad, grads, true);
        drop((dg, du));
        let mut dx_mid = dout;
        rmsnorm::backward_add(
            &dn2,
            &a.x_mid,
            &layer.post_attention_layernorm,
            &a.rstd2,
            &mut dx_mid,
        );
        drop(dn2);

        // Attention block: x_mid = x_in + o(attn(rope(q(n1)), rope(k(n1)), v(n1))).
        let mut datt = vec![0f32; t * nh * d];
        self.linear_backward(
            l, O, &a.att, &a.xa[O], &dx_mid, &mut datt, ctx, ad, grads, true,
        );
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
        let (mut dq, mut dk, dv) = attention::backward(&sh, &a.q, &a.k, &a.v, &a.probs, &datt);
        drop(datt);
        rope::apply(&mut dq, nh, d, &ctx.cos, &ctx.sin, true);
        rope::apply(&mut dk, nkv, d, &ctx.cos, &ctx.sin, true);
        let mut dn1 = vec![0f32; t * h];
        self.linear_backward(
            l, Q, &a.n1, &a.xa[Q], &dq, &mut dn1, ctx, ad, grads, need_dx,
        );
        self.linear_backward(
            l, K, &a.n1, &a.xa[K], &dk, &mut dn1, ctx, ad, grads, need_dx,
        );
        self.linear_backward(
            l, V, &a.n1, &a.xa[V], &dv, &mut dn1, ctx, ad, grads, need_dx,
        );
        let mut dx = dx_mid;
        if need_dx {
            rmsnorm::backward_add(&dn1, x_in, &layer.input_layernorm, &a.rstd1, &mut dx);
        }
        dx
    }
}

use crate::model::Batch;
