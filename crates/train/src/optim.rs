//! AdamW with `torch.optim.AdamW`'s single-tensor semantics (foreach=False,
//! fused=False), f32 state, scalars derived in f64 as Python does:
//!
//! ```text
//! p *= 1 - lr·wd                      (decoupled decay, first)
//! m  = lerp(m, g, 1-β1)               (= m + (1-β1)(g-m))
//! v  = v·β2 + (1-β2)·g·g
//! bc1 = 1-β1^t, bc2 = 1-β2^t          (f64)
//! p += -(lr/bc1) · m / (sqrt(v)/sqrt(bc2) + eps)
//! ```

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Hyper-parameters (the learning rate is passed per step by the schedule).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamW {
    /// torch's defaults except weight decay, which defaults to 0 here (PEFT/HF trainers' default).
    fn default() -> Self {
        AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// First and second moments of one parameter tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Moments {
    pub m: Vec<f32>,
    pub v: Vec<f32>,
}

impl Moments {
    pub fn zeros(n: usize) -> Self {
        Moments {
            m: vec![0.0; n],
            v: vec![0.0; n],
        }
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

impl AdamW {
    /// Refuse settings that make every update NaN or inf (`eps = 0` with a zero
    /// gradient, `beta1 = 1` zeroes the bias correction) or silently wrong.
    pub fn validate(&self) -> anyhow::Result<()> {
        let AdamW {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = *self;
        anyhow::ensure!(
            (0.0..1.0).contains(&beta1),
            "AdamW beta1 must be in [0, 1), got {beta1}"
        );
        anyhow::ensure!(
            (0.0..1.0).contains(&beta2),
            "AdamW beta2 must be in [0, 1), got {beta2}"
        );
        anyhow::ensure!(
            eps.is_finite() && eps > 0.0 && (eps as f32) > 0.0,
            "AdamW eps must be a positive finite number (at least ~1e-45 in f32), got {eps}"
        );
        anyhow::ensure!(
            weight_decay.is_finite() && weight_decay >= 0.0,
            "weight decay must be a finite number >= 0, got {weight_decay}"
        );
        Ok(())
    }

    /// One update of `p` with gradient `g`; `step` is the 1-based step count
    /// after this update (torch increments it before using it).
    ///
    /// Returns whether every updated value (parameter and both moments) is
    /// finite, found while they are in registers: the step's check for a
    /// diverged update without another pass over them.
    pub fn update(&self, p: &mut [f32], g: &[f32], st: &mut Moments, lr: f64, step: u64) -> bool {
        assert_eq!(p.len(), g.len());
        assert_eq!(p.len(), st.m.len());
        if self.weight_decay != 0.0 {
            let f = (1.0 - lr * self.weight_decay) as f32;
            p.iter_mut().for_each(|x| *x *= f);
        }
        let w1 = (1.0 - self.beta1) as f32;
        let b2 = self.beta2 as f32;
        let w2 = (1.0 - self.beta2) as f32;
        let bc1 = 1.0 - self.beta1.powi(step as i32);
        let bc2 = 1.0 - self.beta2.powi(step as i32);
        let step_size = (-(lr / bc1)) as f32;
        let bc2_sqrt = bc2.sqrt() as f32;
        let eps = self.eps as f32;
        let mut finite = true;
        for i in 0..p.len() {
            let gi = g[i];
            let m = lerp(st.m[i], gi, w1);
            let v = st.v[i] * b2 + w2 * gi * gi;
            st.m[i] = m;
            st.v[i] = v;
            let denom = v.sqrt() / bc2_sqrt + eps;
            p[i] += step_size * m / denom;
            finite &= p[i].is_finite() & m.is_finite() & v.is_finite();
        }
        finite
    }
}

/// Global L2 norm over several gradient tensors, torch's way: the norm of the
/// per-tensor norms (each rounded to f32). Accumulates in f64. The tensors'
/// norms are taken in parallel, each over eight interleaved partial sums
/// ([`qlora_model::ops::fastmath::sum_squares_f64`]; one running f64 sum was
/// a chain of dependent adds, ~4 ms a step at SmolLM2's 4.9M LoRA values),
/// so the result is the same whatever the thread count.
pub fn global_grad_norm<'a>(grads: impl IntoIterator<Item = &'a [f32]>) -> f32 {
    let grads: Vec<&[f32]> = grads.into_iter().collect();
    let norms: Vec<f32> = grads
        .par_iter()
        .map(|g| qlora_model::ops::fastmath::sum_squares_f64(g).sqrt() as f32)
        .collect();
    norms
        .iter()
        .map(|&n| n as f64 * n as f64)
        .sum::<f64>()
        .sqrt() as f32
}

/// `clip_grad_norm_`'s factor: `min(max_norm / (total + 1e-6), 1)` in f32. It
/// is applied to every gradient even when it is 1 (a no-op then).
pub fn clip_coef(total_norm: f32, max_norm: f64) -> f32 {
    let c = max_norm as f32 / (total_norm + 1e-6);
    c.min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A plain f64 reference of the same formulas.
    fn reference(
        p: &mut [f64],
        g: &[f64],
        m: &mut [f64],
        v: &mut [f64],
        o: &AdamW,
        lr: f64,
        t: u64,
    ) {
        for i in 0..p.len() {
            p[i] *= 1.0 - lr * o.weight_decay;
            m[i] = o.beta1 * m[i] + (1.0 - o.beta1) * g[i];
            v[i] = o.beta2 * v[i] + (1.0 - o.beta2) * g[i] * g[i];
            let mh = m[i] / (1.0 - o.beta1.powi(t as i32));
            let vh = v[i] / (1.0 - o.beta2.powi(t as i32));
            p[i] -= lr * mh / (vh.sqrt() + o.eps);
        }
    }

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    #[test]
    fn adamw_matches_f64_reference_on_random_inputs() {
        let mut s = 42u64;
        let o = AdamW {
            weight_decay: 0.01,
            ..Default::default()
        };
        let n = 257;
        let mut p: Vec<f32> = (0..n).map(|_| lcg(&mut s)).collect();
        let mut pr: Vec<f64> = p.iter().map(|&x| x as f64).collect();
        let mut st = Moments::zeros(n);
        let (mut m, mut v) = (vec![0f64; n], vec![0f64; n]);
        for t in 1..=20u64 {
            let g: Vec<f32> = (0..n).map(|_| lcg(&mut s) * 0.1).collect();
            let gr: Vec<f64> = g.iter().map(|&x| x as f64).collect();
            let lr = 1e-3 * (1.0 + t as f64 / 10.0);
            assert!(o.update(&mut p, &g, &mut st, lr, t), "finite step {t}");
            reference(&mut pr, &gr, &mut m, &mut v, &o, lr, t);
        }
        let max = p
            .iter()
            .zip(&pr)
            .map(|(a, b)| (*a as f64 - b).abs())
            .fold(0.0, f64::max);
        assert!(max < 1e-6, "max diff {max}");
        // and it moved: 20 steps of ~1e-3
        assert!(p.iter().zip(&pr).all(|(a, _)| a.is_finite()));
    }

    /// The update reports a non-finite parameter or moment wherever it
    /// appears: an infinite gradient (v overflows), a NaN gradient, a
    /// learning rate that overflows the parameter.
    #[test]
    fn update_reports_non_finite_values() {
        let o = AdamW::default();
        for (g, lr, at) in [
            (f32::INFINITY, 0.1, 3usize),
            (f32::NAN, 0.1, 0),
            (1.0, 1e39, 40),
            (1e22, 0.1, 17),
        ] {
            let mut p: Vec<f32> = (0..41).map(|i| i as f32 * 0.1).collect();
            let mut gs = vec![0.5f32; 41];
            gs[at] = g;
            let mut st = Moments::zeros(41);
            assert!(
                !o.update(&mut p, &gs, &mut st, lr, 1),
                "g {g} lr {lr} at {at}"
            );
            let mut p2: Vec<f32> = (0..41).map(|i| i as f32 * 0.1).collect();
            let mut st2 = Moments::zeros(41);
            assert!(o.update(&mut p2, &[0.5; 41], &mut st2, 0.1, 1));
        }
    }

    #[test]
    fn first_step_is_sign_times_lr() {
        // At t=1, m̂ = g and v̂ = g², so the update is -lr·g/(|g|+eps) ≈ -lr·sign(g).
        let o = AdamW::default();
        let mut p = vec![1.0f32, -2.0, 0.5];
        let g = vec![0.3f32, -4.0, 1e-3];
        let mut st = Moments::zeros(3);
        o.update(&mut p, &g, &mut st, 0.1, 1);
        for (x, want) in p.iter().zip([0.9f32, -1.9, 0.4]) {
            assert!((x - want).abs() < 1e-5, "{x} vs {want}");
        }
        assert!((st.m[0] - 0.03).abs() < 1e-8);
        assert!((st.v[1] - 0.016).abs() < 1e-7);
    }

    #[test]
    fn decoupled_weight_decay_with_zero_grad() {
        let o = AdamW {
            weight_decay: 0.5,
            ..Default::default()
        };
        let mut p = vec![2.0f32];
        let mut st = Moments::zeros(1);
        o.update(&mut p, &[0.0], &mut st, 0.1, 1);
        assert_eq!(p[0], 2.0 * 0.95);
    }

    #[test]
    fn global_norm_and_clip() {
        let a = [3.0f32, 4.0];
        let b = [12.0f32];
        let n = global_grad_norm([&a[..], &b[..]]);
        assert_eq!(n, 13.0);
        assert_eq!(clip_coef(n, 1.0), 1.0 / (13.0 + 1e-6));
        assert_eq!(clip_coef(0.5, 1.0), 1.0);
    }
}
