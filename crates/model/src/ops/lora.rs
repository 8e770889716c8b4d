//! LoRA on top of a frozen linear: `y += s · (dropout(x) Aᵀ) Bᵀ` (PEFT's
//! vanilla LoRA, FORMATS §3.4), with A `[r, in]`, B `[out, r]`.
//!
//! Dropout uses a counter-based hash of `(key, element index)`, so the mask is
//! a pure function of the seed: the recomputation under gradient checkpointing
//! and any thread count give the same mask without storing it.

use super::matmul;

/// One adapted module's trainable matrices and hyper-parameters.
#[derive(Debug, Clone, Copy)]
pub struct LoraRef<'a> {
    pub a: &'a [f32],
    pub b: &'a [f32],
    pub r: usize,
    pub in_features: usize,
    pub out_features: usize,
    pub scale: f32,
    /// Dropout probability on the LoRA input path (0 = identity).
    pub dropout: f32,
    /// Mask key (unique per step, layer and module).
    pub dropout_key: u64,
    /// Mask position of each of the `t` input rows (`None` = its own index):
    /// a data-parallel rank passes the rows' places in the global batch so
    /// that its masks are those of the one-process run.
    pub mask_rows: Option<&'a [usize]>,
}

#[inline]
pub fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Inverted-dropout multiplier of element `i`: 0 with probability `p`, else `1/(1-p)`.
#[inline]
pub fn dropout_factor(key: u64, i: usize, p: f32) -> f32 {
    let u = (splitmix64(key ^ (i as u64).wrapping_mul(0xD1B5_4A32_D192_ED03)) >> 40) as f32
        / (1u64 << 24) as f32;
    if u < p {
        0.0
    } else {
        1.0 / (1.0 - p)
    }
}

impl LoraRef<'_> {
    /// Mask index of element `k` of the flattened `[t, in]` input.
    #[inline]
    fn mask_index(&self, k: usize) -> usize {
        match self.mask_rows {
            None => k,
            Some(m) => {
                let i = self.in_features;
                m[k / i] * i + k % i
            }
        }
    }

    /// `dropout(x)`, or `None` when dropout is off (use `x` itself).
    pub fn dropped_input(&self, x: &[f32]) -> Option<Vec<f32>> {
        if self.dropout <= 0.0 {
            return None;
        }
        Some(
            x.iter()
                .enumerate()
                .map(|(i, v)| {
                    v * dropout_factor(self.dropout_key, self.mask_index(i), self.dropout)
                })
                .collect(),
        )
    }

    /// Adds the LoRA term into `y[t, out]`; returns `xa = dropout(x) Aᵀ` `[t, r]`
    /// (kept for the backward).
    pub fn forward(&self, x: &[f32], t: usize, y: &mut [f32]) -> Vec<f32> {
        let (r, i, o) = (self.r, self.in_features, self.out_features);
        let xd = self.dropped_input(x);
        let xin = xd.as_deref().unwrap_or(x);
        let mut xa = vec![0f32; t * r];
        matmul(t, r, i, xin, false, self.a, true, &mut xa, false, 1.0);
        matmul(t, o, r, &xa, false, self.b, true, y, true, self.scale);
        xa
    }

    /// Given `dy[t, out]`, returns `(dA [r,in], dB [out,r])` and adds the LoRA
    /// path's input gradient into `dx[t, in]`.
    pub fn backward(
        &self,
        x: &[f32],
        xa: &[f32],
        dy: &[f32],
        t: usize,
        dx: &mut [f32],
    ) -> (Vec<f32>, Vec<f32>) {
        let (r, i, o) = (self.r, self.in_features, self.out_features);
        let mut db = vec![0f32; o * r];
        matmul(o, r, t, dy, true, xa, false, &mut db, false, self.scale);
        let mut dxa = vec![0f32; t * r];
        matmul(
            t, r, o, dy, false, self.b, false, &mut dxa, false, self.scale,
        );
        let xd = self.dropped_input(x);
        let xin = xd.as_deref().unwrap_or(x);
        let mut da = vec![0f32; r * i];
        matmul(r, i, t, &dxa, true, xin, false, &mut da, false, 1.0);
        if self.dropout <= 0.0 {
            matmul(t, i, r, &dxa, false, self.a, false, dx, true, 1.0);
        } else {
            let mut tmp = vec![0f32; t * i];
            matmul(t, i, r, &dxa, false, self.a, false, &mut tmp, false, 1.0);
            for (k, (d, v)) in dx.iter_mut().zip(&tmp).enumerate() {
                *d += v * dropout_factor(self.dropout_key, self.mask_index(k), self.dropout);
            }
        }
        (da, db)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    /// f64 reference: loss = <g, s·(drop(x)Aᵀ)Bᵀ>.
    fn loss_ref(l: &LoraRef, x: &[f64], a: &[f64], b: &[f64], g: &[f32], t: usize) -> f64 {
        let (r, i, o) = (l.r, l.in_features, l.out_features);
        let mut s = 0.0;
        for tt in 0..t {
            let xa: Vec<f64> = (0..r)
                .map(|rr| {
                    (0..i)
                        .map(|k| {
                            let f = dropout_factor(l.dropout_key, tt * i + k, l.dropout) as f64;
                            let f = if l.dropout > 0.0 { f } else { 1.0 };
                            x[tt * i + k] * f * a[rr * i + k]
                        })
                        .sum()
                })
                .collect();
            for oo in 0..o {
                let y: f64 = (0..r).map(|rr| xa[rr] * b[oo * r + rr]).sum();
                s += l.scale as f64 * y * g[tt * o + oo] as f64;
            }
        }
        s
    }

    #[test]
    fn lora_gradients_match_finite_differences() {
        let (t, i, o, r) = (5, 12, 7, 3);
        for p in [0.0f32, 0.3] {
            let a = rand_vec(r * i, 1, 0.5);
            let b = rand_vec(o * r, 2, 0.5);
            let l = LoraRef {
                a: &a,
                b: &b,
                r,
                in_features: i,
                out_features: o,
                scale: 2.0,
                dropout: p,
                dropout_key: 77,
                mask_rows: None,
            };
            let x = rand_vec(t * i, 3, 1.0);
            let g = rand_vec(t * o, 4, 1.0);
            let mut y = vec![0f32; t * o];
            let xa = l.forward(&x, t, &mut y);
            let x64: Vec<f64> = x.iter().map(|v| *v as f64).collect();
            let a64: Vec<f64> = a.iter().map(|v| *v as f64).collect();
            let b64: Vec<f64> = b.iter().map(|v| *v as f64).collect();
            // forward value
            let lv = dot(&y, &g);
            assert!((lv - loss_ref(&l, &x64, &a64, &b64, &g, t)).abs() < 1e-4);
            let mut dx = vec![0f32; t * i];
            let (da, db) = l.backward(&x, &xa, &g, t, &mut dx);
            let dir_x = rand_vec(t * i, 5, 1.0);
            let fd = directional_fd(&x, &dir_x, 1e-4, |xx| loss_ref(&l, xx, &a64, &b64, &g, t));
            assert!((fd - dot(&dx, &dir_x)).abs() < 1e-4, "dx p={p}");
            let dir_a = rand_vec(r * i, 6, 1.0);
            let fd = directional_fd(&a, &dir_a, 1e-4, |aa| loss_ref(&l, &x64, aa, &b64, &g, t));
            assert!((fd - dot(&da, &dir_a)).abs() < 1e-4, "dA p={p}");
            let dir_b = rand_vec(o * r, 7, 1.0);
            let fd = directional_fd(&b, &dir_b, 1e-4, |bb| loss_ref(&l, &x64, &a64, bb, &g, t));
            assert!((fd - dot(&db, &dir_b)).abs() < 1e-4, "dB p={p}");
        }
    }

    #[test]
    fn dropout_mask_is_deterministic_and_has_the_right_rate() {
        let n = 100_000;
        let zeros = (0..n).filter(|&i| dropout_factor(5, i, 0.1) == 0.0).count();
        assert!((zeros as f64 / n as f64 - 0.1).abs() < 0.005, "{zeros}");
        assert_eq!(dropout_factor(5, 123, 0.5), dropout_factor(5, 123, 0.5));
        let differ = (0..1000)
            .filter(|&i| dropout_factor(5, i, 0.5) != dropout_factor(6, i, 0.5))
            .count();
        assert!(differ > 300);
    }
}
