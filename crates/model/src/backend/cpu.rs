//! The CPU backend: the kernels of [`crate::ops`] on host `Vec<f32>` buffers.
//! Every method is a direct call (no copies beyond what the ops return), so
//! the generic model code runs exactly today's CPU path.

use anyhow::Result;

use super::{
    AdamWStep, Backend, CeOut, DoraOp, DoraSaved, InputGradOut, LinearLoraOut, LoraOp, LoraSlot,
    SwigluPairOut,
};
use crate::ops::attention::{self, AttnShape};
use crate::ops::dora::DoraRef;
use crate::ops::linear::{FrozenLinear, FrozenWeight};
use crate::ops::lora::LoraRef;
use crate::ops::profile::{self, Op};
use crate::ops::{cross_entropy, rmsnorm, rope, swiglu};

/// The host CPU (rayon threads, the `gemm` crate, the hand-written kernels).
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuBackend;

/// A LoRA module's backward on the AMX path (no dropout, `r > 0`): the
/// base input gradient with the module's `dy` products on the tile unit
/// (`dxa = s·dy·B`, `dB = s·dyᵀ·xa`, and `dxa·A` as extra k-steps of the
/// input gradient; bf16 operands, f32 sums, as the base), into `dx` or
/// (`None`) a fresh buffer, returned; then `dA = dxaᵀ·x` in f32. Returns
/// `(fresh dx, dA, dB)`.
fn fused_linear_lora_backward(
    w: &FrozenLinear,
    l: &LoraRef,
    x: &[f32],
    xa: &[f32],
    dy: &[f32],
    t: usize,
    dx: Option<&mut Vec<f32>>,
) -> (Option<Vec<f32>>, Vec<f32>, Vec<f32>) {
    let a = a_bf16(l);
    let lora = low_rank(l, xa, &a);
    let (fresh, g) = {
        let _t = profile::time(Op::LinearBackward);
        w.backward_input_lora(dy, t, dx.map(|d| &mut d[..]), lora)
    };
    let _t = profile::time(Op::LoraBackward);
    let da = l.a_grad(x, &g.dxa, t);
    (fresh, da, g.db)
}

/// LoRA's A as bf16, the operand of its input-gradient term on the tiles.
fn a_bf16(l: &LoraRef) -> Vec<u16> {
    let mut a = vec![0u16; l.r * l.in_features];
    crate::ops::fastmath::to_bf16(&l.a[..a.len()], &mut a);
    a
}

/// A module's `dy` side on the tiles: its B, scale and rank, the forward's
/// `xa`, and A as bf16 ([`a_bf16`]).
fn low_rank<'a>(
    l: &LoraRef<'a>,
    xa: &'a [f32],
    a: &'a [u16],
) -> crate::ops::amx::LowRankBackward<'a> {
    crate::ops::amx::LowRankBackward {
        b: l.b,
        scale: l.scale,
        xa,
        a,
        r: l.r,
    }
}

fn lora_ref<'a>(op: &LoraOp<'a, CpuBackend>) -> LoraRef<'a> {
    LoraRef {
        a: op.a,
        b: op.b,
        r: op.r,
        in_features: op.in_features,
        out_features: op.out_features,
        scale: op.scale,
        dropout: op.dropout,
        dropout_key: op.dropout_key,
        mask_rows: op.mask_rows,
    }
}

fn dora_ref<'a>(op: &LoraOp<'a, CpuBackend>, d: &DoraOp<'a, CpuBackend>) -> DoraRef<'a> {
    DoraRef {
        lora: lora_ref(op),
        magnitude: d.magnitude,
        norm: d.norm,
    }
}

/// torch's `lerp` for a scalar weight (two branches for accuracy near 1).
#[inline]
fn lerp(a: f32, b: f32, w: f32) -> f32 {
    if w.abs() < 0.5 {
        a + w * (b - a)
    } else {
        b - (b - a) * (1.0 - w)
    }
}

/// One AdamW update on host slices (`torch.optim.AdamW`, single tensor).
pub fn adamw_update(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], st: &AdamWStep) {
    assert!(p.len() == g.len() && p.len() == m.len() && p.len() == v.len());
    if st.decay != 1.0 {
        p.iter_mut().for_each(|x| *x *= st.decay);
    }
    for i in 0..p.len() {
        let gi = g[i];
        let mi = lerp(m[i], gi, st.w1);
        let vi = v[i] * st.beta2 + st.w2 * gi * gi;
        m[i] = mi;
        v[i] = vi;
        let denom = vi.sqrt() / st.bc2_sqrt + st.eps;
        p[i] += st.step_size * mi / denom;
    }
}

impl Backend for CpuBackend {
    type Buf = Vec<f32>;
    type Ids = Vec<u32>;
    type Linear = FrozenLinear;
    type Embed = FrozenWeight;

    fn describe(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn upload(&self, x: &[f32]) -> Result<Vec<f32>> {
        Ok(x.to_vec())
    }
    fn upload_owned(&self, x: Vec<f32>) -> Result<Vec<f32>> {
        Ok(x)
    }
    fn upload_ids(&self, ids: &[u32]) -> Result<Vec<u32>> {
        Ok(ids.to_vec())
    }
    fn download(&self, x: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(x.clone())
    }
    fn zeros(&self, n: usize) -> Result<Vec<f32>> {
        Ok(crate::ops::par_zeros(n))
    }
    fn len(&self, x: &Vec<f32>) -> usize {
        x.len()
    }
    fn add_assign(&self, acc: &mut Vec<f32>, x: &Vec<f32>) -> Result<()> {
        let _t = profile::time(Op::Elementwise);
        assert_eq!(acc.len(), x.len(), "add_assign: sizes");
        // in parallel: one thread alone streams at about half the machine's
        // memory bandwidth here
        use rayon::prelude::*;
        acc.par_chunks_mut(1 << 14)
            .zip(x.par_chunks(1 << 14))
            .for_each(|(a, b)| crate::ops::fastmath::add_assign(a, b));
        Ok(())
    }
    fn scale(&self, x: &mut Vec<f32>, s: f32) -> Result<()> {
        let _t = profile::time(Op::Elementwise);
        x.iter_mut().for_each(|v| *v *= s);
        Ok(())
    }
    fn rows(&self, x: &Vec<f32>, cols: usize, r0: usize, r1: usize) -> Result<Vec<f32>> {
        let _t = profile::time(Op::Elementwise);
        Ok(x[r0 * cols..r1 * cols].to_vec())
    }
    fn append(&self, cache: &mut Vec<f32>, x: &Vec<f32>) -> Result<()> {
        let _t = profile::time(Op::Elementwise);
        cache.extend_from_slice(x);
        Ok(())
    }

    fn prepare_linear(&self, w: &FrozenLinear) -> Result<FrozenLinear> {
        Ok(w.clone())
    }
    fn prepare_embed(&self, w: &FrozenWeight, _rows: usize, _cols: usize) -> Result<FrozenWeight> {
        Ok(w.clone())
    }

    fn embed(&self, e: &FrozenWeight, ids: &[u32], h: usize) -> Result<Vec<f32>> {
        let _t = profile::time(Op::Elementwise);
        let mut x = vec![0f32; ids.len() * h];
        for (row, &id) in x.chunks_mut(h).zip(ids) {
            e.rows_f32(id as usize, id as usize + 1, h, row);
        }
        Ok(x)
    }
    fn linear_forward(&self, w: &FrozenLinear, x: &Vec<f32>, t: usize) -> Result<Vec<f32>> {
        let _t = profile::time(Op::LinearForward);
        Ok(w.forward(x, t))
    }
    fn linear_forward_many(
        &self,
        ws: &[&FrozenLinear],
        x: &Vec<f32>,
        t: usize,
    ) -> Result<Vec<Vec<f32>>> {
        let _t = profile::time(Op::LinearForward);
        Ok(FrozenLinear::forward_many(ws, x, t))
    }
    fn linear_backward_input(
        &self,
        w: &FrozenLinear,
        dy: &Vec<f32>,
        t: usize,
        dx: &mut Vec<f32>,
    ) -> Result<()> {
        let _t = profile::time(Op::LinearBackward);
        w.backward_input(dy, t, dx);
        Ok(())
    }
    fn lora_forward(
        &self,
        op: &LoraOp<Self>,
        x: &Vec<f32>,
        t: usize,
        y: &mut Vec<f32>,
    ) -> Result<Vec<f32>> {
        let _t = profile::time(Op::LoraForward);
        Ok(lora_ref(op).forward(x, t, y))
    }
    fn lora_up(
        &self,
        op: &LoraOp<Self>,
        _x: &Vec<f32>,
        xa: &Vec<f32>,
        t: usize,
        y: &mut Vec<f32>,
    ) -> Result<()> {
        let _t = profile::time(Op::LoraForward);
        lora_ref(op).up(xa, t, y);
        Ok(())
    }
    fn lora_down(&self, op: &LoraOp<Self>, x: &Vec<f32>, t: usize) -> Result<Vec<f32>> {
        let _t = profile::time(Op::LoraForward);
        Ok(lora_ref(op).down(x, t))
    }
    /// On the AMX path the down-projections run on each group of input
    /// rows while the pack has it in cache, and the up-projections as extra
    /// k-steps of the products ([`crate::ops::amx::linear_forward_lora`]):
    /// no pass of their own over the input or the outputs. (The op timers
    /// count both in the base forward then.)
    fn linear_lora_forward_many(
        &self,
        ws: &[&FrozenLinear],
        x: &Vec<f32>,
        t: usize,
        loras: Vec<LoraSlot<Self>>,
    ) -> Result<Vec<LinearLoraOut<Self>>> {
        if !FrozenLinear::can_add_low_rank(ws, t) || loras.iter().all(Option::is_none) {
            return super::linear_lora_forward_many_unfused(self, ws, x, t, loras);
        }
        // each module's kept x·Aᵀ, Aᵀ and s·Bᵀ; the down-projections run
        // inside the pack, under dropout on each row group masked there
        // (the whole input masked in a pass of its own first, with a copy
        // per module, was a LoRA forward of ~85 ms a SmolLM2 step)
        let ops: Vec<Option<(LoraRef, Option<Vec<f32>>)>> = loras
            .into_iter()
            .map(|lora| lora.map(|(op, kept)| (lora_ref(&op), kept)))
            .collect();
        let masks: Vec<Option<Box<crate::ops::amx::RowMask>>> = ops
            .iter()
            .map(|o| {
                let (l, kept) = o.as_ref()?;
                let l = *l;
                (l.dropout > 0.0 && kept.is_none()).then(|| {
                    Box::new(move |k: usize, s: &[f32], d: &mut [f32]| l.mask_row(k, s, d))
                        as Box<crate::ops::amx::RowMask>
                })
            })
            .collect();
        let operands: Vec<Option<(Vec<f32>, Vec<f32>)>> = ops
            .iter()
            .map(|o| o.as_ref().map(|(l, _)| (l.down_operand(), l.up_operand())))
            .collect();
        let terms: Vec<Option<crate::ops::amx::LoraTerm>> = ops
            .into_iter()
            .zip(&operands)
            .zip(&masks)
            .map(|((o, ops), mask)| {
                let ((l, kept), (at, p)) = (o?, ops.as_ref()?);
                let r = l.r;
                Some(crate::ops::amx::LoraTerm {
                    kept,
                    at,
                    ldat: crate::ops::skinny::padded(r),
                    r,
                    p,
                    ldp: crate::ops::skinny::padded(l.out_features),
                    mask: mask.as_deref(),
                })
            })
            .collect();
        let _t = profile::time(Op::LinearForward);
        let (ys, xas) = FrozenLinear::forward_many_lora(ws, x, t, terms);
        Ok(ys.into_iter().zip(xas).collect())
    }
    /// On the AMX path (no dropout) the LoRA input gradient `dxa·A` rides
    /// in the base input-gradient products as extra k-steps: no pass of its
    /// own over `dx`.
    #[allow(clippy::too_many_arguments)]
    fn linear_lora_backward(
        &self,
        w: &FrozenLinear,
        op: &LoraOp<Self>,
        x: &Vec<f32>,
        xa: &Vec<f32>,
        dy: &Vec<f32>,
        t: usize,
        dx: &mut Vec<f32>,
        need_dx: bool,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let l = lora_ref(op);
        if !need_dx || l.dropout > 0.0 || l.r == 0 || !FrozenLinear::can_add_low_rank(&[w], t) {
            if need_dx {
                self.linear_backward_input(w, dy, t, dx)?;
            }
            return self.lora_backward(op, x, xa, dy, t, dx);
        }
        let (_, da, db) = fused_linear_lora_backward(w, &l, x, xa, dy, t, Some(dx));
        Ok((da, db))
    }
    /// On the AMX path the products write the fresh gradient whole (zero
    /// tiles to start from, not a zeroed buffer to load).
    fn linear_lora_backward_new(
        &self,
        w: &FrozenLinear,
        lora: Option<(&LoraOp<Self>, &Vec<f32>, &Vec<f32>)>,
        dy: &Vec<f32>,
        t: usize,
        n: usize,
    ) -> Result<InputGradOut<Self>> {
        let fused = FrozenLinear::can_add_low_rank(&[w], t)
            && n == t * w.in_features
            && lora.is_none_or(|(op, _, _)| op.dropout <= 0.0 && op.r > 0);
        if !fused {
            return super::linear_lora_backward_new_unfused(self, w, lora, dy, t, n);
        }
        let Some((op, x, xa)) = lora else {
            let _t = profile::time(Op::LinearBackward);
            return Ok((w.backward_input_new(dy, t), None));
        };
        let (dx, da, db) = fused_linear_lora_backward(w, &lora_ref(op), x, xa, dy, t, None);
        Ok((dx.expect("a fresh input gradient"), Some((da, db))))
    }
    /// On the AMX path (no dropout, gate and up ranks in the same k-steps)
    /// SwiGLU's backward is made and packed one row group at a time inside
    /// the input gradient: `dg`, `du` never exist as f32 arrays (profiled as
    /// the input gradient's time).
    #[allow(clippy::too_many_arguments)]
    fn swiglu_gate_up_backward(
        &self,
        wg: &FrozenLinear,
        wu: &FrozenLinear,
        lg: Option<(&LoraOp<Self>, &Vec<f32>)>,
        lu: Option<(&LoraOp<Self>, &Vec<f32>)>,
        x: &Vec<f32>,
        dm: Vec<f32>,
        g: &Vec<f32>,
        u: &Vec<f32>,
        t: usize,
        n: usize,
    ) -> Result<SwigluPairOut<Self>> {
        let (lgr, lur) = (
            lg.map(|(op, _)| lora_ref(op)),
            lu.map(|(op, _)| lora_ref(op)),
        );
        let fused = FrozenLinear::can_add_low_rank(&[wg, wu], t)
            && wg.out_features == wu.out_features
            && n == t * wg.in_features
            && [&lgr, &lur].into_iter().flatten().all(|l| l.dropout <= 0.0)
            && crate::ops::amx::swiglu_pair_fits(lgr.map(|l| l.r), lur.map(|l| l.r));
        if !fused {
            return super::swiglu_gate_up_backward_unfused(self, wg, wu, lg, lu, x, dm, g, u, t, n);
        }
        let (ag, au) = (lgr.as_ref().map(a_bf16), lur.as_ref().map(a_bf16));
        let lowg = lgr.as_ref().zip(lg).zip(ag.as_ref());
        let lowu = lur.as_ref().zip(lu).zip(au.as_ref());
        let (dx, gg, gu) = {
            let _t = profile::time(Op::LinearBackward);
            FrozenLinear::backward_swiglu_pair(
                wg,
                wu,
                &dm,
                g,
                u,
                t,
                lowg.map(|((l, (_, xa)), a)| low_rank(l, xa, a)),
                lowu.map(|((l, (_, xa)), a)| low_rank(l, xa, a)),
            )
        };
        drop(dm);
        let _t = profile::time(Op::LoraBackward);
        let grads = |l: &Option<LoraRef>, gr: Option<crate::ops::amx::LowRankGrads>| {
            let (l, gr) = (l.as_ref()?, gr?);
            Some((l.a_grad(x, &gr.dxa, t), gr.db))
        };
        Ok((dx, grads(&lgr, gg), grads(&lur, gu)))
    }
    fn lora_backward(
        &self,
        op: &LoraOp<Self>,
        x: &Vec<f32>,
        xa: &Vec<f32>,
        dy: &Vec<f32>,
        t: usize,
        dx: &mut Vec<f32>,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let _t = profile::time(Op::LoraBackward);
        Ok(lora_ref(op).backward(x, xa, dy, t, dx))
    }
    fn dora_forward(
        &self,
        w: &FrozenLinear,
        op: &LoraOp<Self>,
        d: &DoraOp<Self>,
        x: &Vec<f32>,
        t: usize,
    ) -> Result<(Vec<f32>, DoraSaved<Self>)> {
        let _t = profile::time(Op::LoraForward);
        let (y, xa, u) = dora_ref(op, d).forward(w, x, t);
        Ok((y, DoraSaved { xa, u }))
    }
    fn dora_backward(
        &self,
        w: &FrozenLinear,
        op: &LoraOp<Self>,
        d: &DoraOp<Self>,
        x: &Vec<f32>,
        xa: &Vec<f32>,
        u: &Vec<f32>,
        dy: &Vec<f32>,
        t: usize,
        dx: &mut Vec<f32>,
        need_dx: bool,
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let _t = profile::time(Op::LoraBackward);
        Ok(dora_ref(op, d).backward(w, x, xa, u, dy, t, dx, need_dx))
    }
    fn rmsnorm_forward(
        &self,
        x: &Vec<f32>,
        w: &Vec<f32>,
        eps: f32,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let _t = profile::time(Op::Norm);
        Ok(rmsnorm::forward(x, w, eps))
    }
    fn rmsnorm_backward_add(
        &self,
        dy: &Vec<f32>,
        x: &Vec<f32>,
        w: &Vec<f32>,
        rstd: &Vec<f32>,
        dx: &mut Vec<f32>,
    ) -> Result<()> {
        let _t = profile::time(Op::Norm);
        rmsnorm::backward_add(dy, x, w, rstd, dx);
        Ok(())
    }
    fn rope(
        &self,
        x: &mut Vec<f32>,
        heads: usize,
        d: usize,
        cos: &Vec<f32>,
        sin: &Vec<f32>,
        inverse: bool,
    ) -> Result<()> {
        let _t = profile::time(Op::Rope);
        rope::apply(x, heads, d, cos, sin, inverse);
        Ok(())
    }
    fn attention_forward(
        &self,
        sh: &AttnShape,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        seg: Option<&Vec<u32>>,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let _t = profile::time(Op::AttentionForward);
        Ok(attention::forward(sh, q, k, v, seg.map(|s| &s[..])))
    }
    fn attention_backward(
        &self,
        sh: &AttnShape,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        out: &Vec<f32>,
        saved: &Vec<f32>,
        seg: Option<&Vec<u32>>,
        dout: &Vec<f32>,
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let _t = profile::time(Op::AttentionBackward);
        Ok(attention::backward(
            sh,
            q,
            k,
            v,
            out,
            saved,
            dout,
            seg.map(|s| &s[..]),
        ))
    }
    fn swiglu_forward(&self, g: &Vec<f32>, u: &Vec<f32>) -> Result<Vec<f32>> {
        let _t = profile::time(Op::Swiglu);
        Ok(swiglu::forward(g, u))
    }
    fn swiglu_backward(
        &self,
        dm: &Vec<f32>,
        g: &Vec<f32>,
        u: &Vec<f32>,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let _t = profile::time(Op::Swiglu);
        Ok(swiglu::backward(dm, g, u))
    }
    fn cross_entropy(
        &self,
        lm_head: &FrozenLinear,
        x: &Vec<f32>,
        labels: &[i64],
        s: usize,
        grad_denominator: Option<f32>,
    ) -> Result<CeOut<Self>> {
        let _t = profile::time(Op::Head);
        Ok(match grad_denominator {
            None => {
                let (sum, count) = cross_entropy::head_loss(lm_head, x, labels, s);
                CeOut {
                    sum,
                    count,
                    dx: None,
                }
            }
            Some(den) => {
                // A chunk of positions at a time: never all [t, vocab] logits.
                let (sum, count, dx) =
                    cross_entropy::head_forward_backward(lm_head, x, labels, s, den);
                CeOut {
                    sum,
                    count,
                    dx: Some(dx),
                }
            }
        })
    }

    fn adamw(
        &self,
        p: &mut Vec<f32>,
        g: &Vec<f32>,
        m: &mut Vec<f32>,
        v: &mut Vec<f32>,
        st: &AdamWStep,
    ) -> Result<()> {
        let _t = profile::time(Op::Optimizer);
        adamw_update(p, g, m, v, st);
        Ok(())
    }
    fn sq_norm(&self, x: &Vec<f32>) -> Result<f64> {
        let _t = profile::time(Op::Optimizer);
        Ok(x.iter().map(|&v| v as f64 * v as f64).sum())
    }
}
