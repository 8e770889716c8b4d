//! DoRA on a frozen linear, PEFT 0.21.2's `DoraLinearVariant` (see
//! [`qlora_lora::dora`] for the math and where PEFT's semantics are subtle).
//!
//! With `g = m / ‖W + s·B·A‖` per output row (the norm detached: a constant of
//! the step, computed by the caller from the current A, B and the dequantized W)
//! and `x' = dropout(x)`:
//!
//! * no dropout (p = 0 or evaluation): PEFT reuses the base output, so
//!   `y = g ⊙ (x Wᵀ + s·B A x) + bias`;
//! * dropout in training: PEFT feeds `x'` to the whole DoRA term and recomputes
//!   its base product without bias: `y = x Wᵀ + bias + (g − 1) ⊙ (x' Wᵀ) + g ⊙ s·B A x'`.
//!
//! Both are `y = base(x) + g ⊙ u − x' Wᵀ` with `u = x' Wᵀ + s·B A x'` (`x' = x`
//! without dropout), and the backward, with the norm constant, is
//!
//! * `dL/dm[o] = Σ_t dy[t, o] · u[t, o] / norm[o]`,
//! * `dA`, `dB`: LoRA's backward of `g ⊙ dy`,
//! * `dL/dx = dy W + mask ⊙ (((g − 1) ⊙ dy) W) + dx_lora(g ⊙ dy)` (the LoRA
//!   path's input gradient of `g ⊙ dy`, masked by the same dropout), which
//!   without dropout (mask = 1) is `(g ⊙ dy) W + dx_lora(g ⊙ dy)`.

use rayon::prelude::*;

use super::linear::FrozenLinear;
use super::lora::LoraRef;

/// `‖W + s·B·A‖₂` per output row of a frozen linear (f32 rows of `W`,
/// dequantized a tile at a time for a 4-bit base, PEFT's
/// `dequantize_module_weight`), [`qlora_lora::dora::weight_norm_rows`] per tile.
pub fn weight_norm(w: &FrozenLinear, lw: &qlora_lora::LoraWeights, scaling: f32) -> Vec<f32> {
    let (o, i) = (w.out_features, w.in_features);
    let rows = ((1usize << 16) / i.max(1)).clamp(1, o.max(1));
    let starts: Vec<usize> = (0..o).step_by(rows).collect();
    starts
        .par_iter()
        .flat_map_iter(|&r0| {
            let r1 = (r0 + rows).min(o);
            let mut buf = vec![0f32; (r1 - r0) * i];
            w.weight.rows_f32(r0, r1, i, &mut buf);
            qlora_lora::dora::weight_norm_rows(&buf, r0, lw, scaling)
        })
        .collect()
}

/// One DoRA module: its LoRA and the magnitude / detached norm `[out]`.
#[derive(Debug, Clone, Copy)]
pub struct DoraRef<'a> {
    pub lora: LoraRef<'a>,
    /// `m` (`lora_magnitude_vector`), `[out]`.
    pub magnitude: &'a [f32],
    /// `‖W + s·B·A‖` per output row, `[out]` (detached).
    pub norm: &'a [f32],
}

impl DoraRef<'_> {
    /// `g = m / norm`.
    pub fn gain(&self) -> Vec<f32> {
        qlora_lora::dora::magnitude_scale(self.magnitude, self.norm)
    }

    fn check(&self, w: &FrozenLinear) {
        let o = self.lora.out_features;
        assert_eq!(w.out_features, o, "dora: base out_features");
        assert_eq!(
            w.in_features, self.lora.in_features,
            "dora: base in_features"
        );
        assert_eq!(self.magnitude.len(), o, "dora: magnitude size");
        assert_eq!(self.norm.len(), o, "dora: norm size");
    }

    /// `(y [t, out], xa = x' Aᵀ [t, r], u = x' Wᵀ + s·B A x' [t, out])`: the
    /// adapted linear's output and what the backward needs.
    pub fn forward(&self, w: &FrozenLinear, x: &[f32], t: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        self.check(w);
        let o = self.lora.out_features;
        let g = self.gain();
        let mut y = w.forward(x, t);
        match self.lora.dropped_input(x) {
            None => {
                // u = y − bias (PEFT: `base_result - bias`), then + s·B A x.
                let mut u = y.clone();
                if let Some(b) = &w.bias {
                    u.par_chunks_mut(o)
                        .for_each(|row| row.iter_mut().zip(b).for_each(|(v, b)| *v -= b));
                }
                let xa = self.lora.forward(x, t, &mut u);
                // y = g ⊙ u + bias
                let bias = w.bias.as_deref();
                y.par_chunks_mut(o)
                    .zip(u.par_chunks(o))
                    .for_each(|(yr, ur)| {
                        for (j, (yv, uv)) in yr.iter_mut().zip(ur).enumerate() {
                            *yv = g[j] * uv + bias.map_or(0.0, |b| b[j]);
                        }
                    });
                (y, xa, u)
            }
            Some(xd) => {
                // F.linear(dropout(x), W): no bias.
                let mut bd = vec![0f32; t * o];
                w.forward_into(&xd, t, &mut bd);
                if let Some(b) = &w.bias {
                    bd.par_chunks_mut(o)
                        .for_each(|row| row.iter_mut().zip(b).for_each(|(v, b)| *v -= b));
                }
                let mut u = bd.clone();
                // The LoRA forward applies the same mask again (a pure function of
                // the key), so `xa = x' Aᵀ`.
                let xa = self.lora.forward(x, t, &mut u);
                // y = base(x) + (g − 1) ⊙ bd + g ⊙ (u − bd)
                y.par_chunks_mut(o)
                    .zip(u.par_chunks(o).zip(bd.par_chunks(o)))
                    .for_each(|(yr, (ur, br))| {
                        for j in 0..o {
                            yr[j] += (g[j] - 1.0) * br[j] + g[j] * (ur[j] - br[j]);
                        }
                    });
                (y, xa, u)
            }
        }
    }

    /// Given `dy [t, out]`: returns `(dA [r, in], dB [out, r], dm [out])` and adds
    /// the input gradient into `dx [t, in]` (the base-weight parts only when
    /// `need_dx`; the LoRA part always, like [`LoraRef::backward`]).
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        w: &FrozenLinear,
        x: &[f32],
        xa: &[f32],
        u: &[f32],
        dy: &[f32],
        t: usize,
        dx: &mut [f32],
        need_dx: bool,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        self.check(w);
        let (o, i) = (self.lora.out_features, self.lora.in_features);
        assert_eq!(dy.len(), t * o, "dora backward: dy size");
        assert_eq!(u.len(), t * o, "dora backward: saved u size");
        let g = self.gain();
        // dm[o] = Σ_t dy·u / norm (f64 sums over the rows).
        let dm: Vec<f32> = (0..o)
            .into_par_iter()
            .map(|j| {
                let s: f64 = (0..t)
                    .map(|r| dy[r * o + j] as f64 * u[r * o + j] as f64)
                    .sum();
                (s / self.norm[j] as f64) as f32
            })
            .collect();
        let mut dyg = dy.to_vec();
        dyg.par_chunks_mut(o)
            .for_each(|row| row.iter_mut().zip(&g).for_each(|(v, g)| *v *= g));
        let (da, db) = self.lora.backward(x, xa, &dyg, t, dx);
        if need_dx {
            if self.lora.dropout <= 0.0 {
                w.backward_input(&dyg, t, dx);
            } else {
                w.backward_input(dy, t, dx);
                let mut dyg1 = dy.to_vec();
                dyg1.par_chunks_mut(o)
                    .for_each(|row| row.iter_mut().zip(&g).for_each(|(v, g)| *v *= g - 1.0));
                let mut tmp = vec![0f32; t * i];
                w.backward_input(&dyg1, t, &mut tmp);
                let l = &self.lora;
                dx.par_chunks_mut(i)
                    .zip(tmp.par_chunks(i))
                    .enumerate()
                    .for_each(|(r, (dr, tr))| {
                        let base = match l.mask_rows {
                            None => r * i,
                            Some(m) => m[r] * i,
                        };
                        super::fastmath::dropout_mul(l.dropout_key, base, l.dropout, tr, dr, true);
                    });
            }
        }
        (da, db, dm)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::linear::{BaseCompute, FrozenWeight};
    use super::super::lora::dropout_factor;
    use super::super::testutil::*;
    use super::*;

    struct Case {
        w: Vec<f32>,
        bias: Option<Vec<f32>>,
        a: Vec<f32>,
        b: Vec<f32>,
        m: Vec<f32>,
        norm: Vec<f32>,
        t: usize,
        i: usize,
        o: usize,
        r: usize,
        s: f32,
    }

    fn lora<'a>(c: &'a Case, a: &'a [f32], b: &'a [f32], p: f32) -> LoraRef<'a> {
        LoraRef {
            a,
            b,
            r: c.r,
            in_features: c.i,
            out_features: c.o,
            scale: c.s,
            dropout: p,
            dropout_key: 99,
            mask_rows: None,
        }
    }

    /// f64 reference of `<gy, y(x, A, B, m)>` with the norm held constant
    /// (detached), PEFT's formula written out term by term.
    #[allow(clippy::too_many_arguments)]
    fn loss_ref(c: &Case, x: &[f64], a: &[f64], b: &[f64], m: &[f64], gy: &[f32], p: f32) -> f64 {
        let (t, i, o, r) = (c.t, c.i, c.o, c.r);
        let mut s = 0.0;
        for tt in 0..t {
            let mask = |k: usize| {
                if p > 0.0 {
                    dropout_factor(99, tt * i + k, p) as f64
                } else {
                    1.0
                }
            };
            let xd: Vec<f64> = (0..i).map(|k| x[tt * i + k] * mask(k)).collect();
            let xa: Vec<f64> = (0..r)
                .map(|rr| (0..i).map(|k| xd[k] * a[rr * i + k]).sum())
                .collect();
            for oo in 0..o {
                let bias = c.bias.as_ref().map_or(0.0, |b| b[oo] as f64);
                let base: f64 = (0..i).map(|k| x[tt * i + k] * c.w[oo * i + k] as f64).sum();
                let based: f64 = (0..i).map(|k| xd[k] * c.w[oo * i + k] as f64).sum();
                let lo: f64 = (0..r).map(|rr| xa[rr] * b[oo * r + rr]).sum::<f64>() * c.s as f64;
                let g = m[oo] / c.norm[oo] as f64;
                let y = base + bias + (g - 1.0) * based + g * lo;
                s += y * gy[tt * o + oo] as f64;
            }
        }
        s
    }

    fn case(bias: bool) -> Case {
        let (t, i, o, r) = (5, 12, 7, 3);
        let w = rand_vec(o * i, 11, 0.4);
        let a = rand_vec(r * i, 12, 0.5);
        let b = rand_vec(o * r, 13, 0.5);
        let s = 2.0;
        // the norm as the model computes it (from W, A, B), then a magnitude away from it
        let lw = qlora_lora::LoraWeights::new(
            qlora_lora::Matrix::new(r, i, a.clone()).unwrap(),
            qlora_lora::Matrix::new(o, r, b.clone()).unwrap(),
        );
        let norm = qlora_lora::dora::weight_norm_rows(&w, 0, &lw, s);
        let m: Vec<f32> = norm
            .iter()
            .zip(rand_vec(o, 14, 0.3))
            .map(|(n, e)| n * (1.0 + e))
            .collect();
        Case {
            w,
            bias: bias.then(|| rand_vec(o, 15, 0.2)),
            a,
            b,
            m,
            norm,
            t,
            i,
            o,
            r,
            s,
        }
    }

    fn frozen(c: &Case) -> FrozenLinear {
        FrozenLinear {
            out_features: c.o,
            in_features: c.i,
            weight: FrozenWeight::F32(Arc::new(c.w.clone())),
            bias: c.bias.clone(),
            compute: BaseCompute::F32,
            bf16_copy: Default::default(),
        }
    }

    #[test]
    fn dora_forward_and_gradients_match_f64_reference_and_finite_differences() {
        for (bias, p) in [(false, 0.0f32), (true, 0.0), (false, 0.3), (true, 0.3)] {
            let c = case(bias);
            let w = frozen(&c);
            let d = DoraRef {
                lora: lora(&c, &c.a, &c.b, p),
                magnitude: &c.m,
                norm: &c.norm,
            };
            let x = rand_vec(c.t * c.i, 16, 1.0);
            let gy = rand_vec(c.t * c.o, 17, 1.0);
            let (y, xa, u) = d.forward(&w, &x, c.t);
            let f64v = |v: &[f32]| v.iter().map(|&z| z as f64).collect::<Vec<f64>>();
            let (x64, a64, b64, m64) = (f64v(&x), f64v(&c.a), f64v(&c.b), f64v(&c.m));
            let want = loss_ref(&c, &x64, &a64, &b64, &m64, &gy, p);
            assert!(
                (dot(&y, &gy) - want).abs() < 1e-4,
                "forward bias={bias} p={p}"
            );

            let mut dx = vec![0f32; c.t * c.i];
            let (da, db, dm) = d.backward(&w, &x, &xa, &u, &gy, c.t, &mut dx, true);
            let tol = 2e-4;
            let dir = rand_vec(c.t * c.i, 18, 1.0);
            let fd = directional_fd(&x, &dir, 1e-4, |xx| {
                loss_ref(&c, xx, &a64, &b64, &m64, &gy, p)
            });
            assert!(
                (fd - dot(&dx, &dir)).abs() < tol,
                "dx bias={bias} p={p}: {fd} vs {}",
                dot(&dx, &dir)
            );
            let dir = rand_vec(c.r * c.i, 19, 1.0);
            let fd = directional_fd(&c.a, &dir, 1e-4, |aa| {
                loss_ref(&c, &x64, aa, &b64, &m64, &gy, p)
            });
            assert!((fd - dot(&da, &dir)).abs() < tol, "dA bias={bias} p={p}");
            let dir = rand_vec(c.o * c.r, 20, 1.0);
            let fd = directional_fd(&c.b, &dir, 1e-4, |bb| {
                loss_ref(&c, &x64, &a64, bb, &m64, &gy, p)
            });
            assert!((fd - dot(&db, &dir)).abs() < tol, "dB bias={bias} p={p}");
            let dir = rand_vec(c.o, 21, 1.0);
            let fd = directional_fd(&c.m, &dir, 1e-4, |mm| {
                loss_ref(&c, &x64, &a64, &b64, mm, &gy, p)
            });
            assert!((fd - dot(&dm, &dir)).abs() < tol, "dm bias={bias} p={p}");

            // need_dx = false leaves only the LoRA part of dx
            let mut dx_l = vec![0f32; c.t * c.i];
            d.backward(&w, &x, &xa, &u, &gy, c.t, &mut dx_l, false);
            let mut dx_lora = vec![0f32; c.t * c.i];
            let gdy: Vec<f32> = gy
                .chunks(c.o)
                .flat_map(|r| {
                    r.iter()
                        .zip(d.gain())
                        .map(|(v, g)| v * g)
                        .collect::<Vec<_>>()
                })
                .collect();
            d.lora.backward(&x, &xa, &gdy, c.t, &mut dx_lora);
            assert!(max_abs_diff(&dx_l, &dx_lora) < 1e-6);
        }
    }

    /// With `m = norm` and B = 0 a fresh DoRA module is the base linear itself.
    #[test]
    fn fresh_dora_is_the_identity_on_the_base() {
        let mut c = case(true);
        c.b.iter_mut().for_each(|v| *v = 0.0);
        let lw = qlora_lora::LoraWeights::new(
            qlora_lora::Matrix::new(c.r, c.i, c.a.clone()).unwrap(),
            qlora_lora::Matrix::new(c.o, c.r, c.b.clone()).unwrap(),
        );
        c.norm = qlora_lora::dora::weight_norm_rows(&c.w, 0, &lw, c.s);
        c.m = c.norm.clone();
        let w = frozen(&c);
        let d = DoraRef {
            lora: lora(&c, &c.a, &c.b, 0.0),
            magnitude: &c.m,
            norm: &c.norm,
        };
        let x = rand_vec(c.t * c.i, 22, 1.0);
        let (y, _, _) = d.forward(&w, &x, c.t);
        assert!(max_abs_diff(&y, &w.forward(&x, c.t)) < 1e-6);
    }
}
