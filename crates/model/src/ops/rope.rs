//! Rotary position embedding, HF "rotate_half" layout (FORMATS §4.3): dim
//! `j` pairs with `j + d/2`; `cos/sin(pos · inv_freq_j)` with the product in
//! f32 as transformers does; `inv_freq` from `qlora_config::RopeScaling`.

use rayon::prelude::*;

/// `cos` and `sin` tables `[t, d/2]` for the given positions.
pub fn tables(inv_freq: &[f32], positions: &[u32]) -> (Vec<f32>, Vec<f32>) {
    let half = inv_freq.len();
    let mut cos = vec![0f32; positions.len() * half];
    let mut sin = vec![0f32; positions.len() * half];
    for (p, (c, s)) in positions
        .iter()
        .zip(cos.chunks_mut(half).zip(sin.chunks_mut(half)))
    {
        for j in 0..half {
            let f = (*p as f32) * inv_freq[j];
            c[j] = (f as f64).cos() as f32;
            s[j] = (f as f64).sin() as f32;
        }
    }
    (cos, sin)
}

/// Rotate `x [t, heads·d]` in place by the tables (`inverse` rotates back, which
/// is the backward: the rotation is orthogonal).
pub fn apply(x: &mut [f32], heads: usize, d: usize, cos: &[f32], sin: &[f32], inverse: bool) {
    let half = d / 2;
    if x.is_empty() || half == 0 {
        return;
    }
    x.par_chunks_mut(heads * d * ROWS)
        .zip(cos.par_chunks(half * ROWS).zip(sin.par_chunks(half * ROWS)))
        .for_each(|(rows, (c, s))| super::fastmath::rope_rows(rows, heads, d, c, s, inverse));
}

/// Rows per parallel task.
const ROWS: usize = 8;

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    #[test]
    fn rope_matches_candle_rotate_half_and_inverse_is_backward() {
        use candle_core::{Device, Tensor};
        let (t, heads, d) = (5, 3, 8);
        let inv: Vec<f32> = (0..d / 2)
            .map(|j| 1.0 / 10000f32.powf(2.0 * j as f32 / d as f32))
            .collect();
        let pos: Vec<u32> = vec![0, 1, 2, 7, 100];
        let x = rand_vec(t * heads * d, 1, 1.0);
        let (c, s) = tables(&inv, &pos);
        let mut y = x.clone();
        apply(&mut y, heads, d, &c, &s, false);
        // candle reference: x*cos + rotate_half(x)*sin with cat(freqs, freqs).
        let dev = Device::Cpu;
        let tx = Tensor::from_slice(&x, (t, heads, d), &dev).unwrap();
        let tc = Tensor::from_slice(&c, (t, 1, d / 2), &dev).unwrap();
        let ts = Tensor::from_slice(&s, (t, 1, d / 2), &dev).unwrap();
        let tc = Tensor::cat(&[&tc, &tc], 2).unwrap();
        let ts = Tensor::cat(&[&ts, &ts], 2).unwrap();
        let x1 = tx.narrow(2, 0, d / 2).unwrap();
        let x2 = tx.narrow(2, d / 2, d / 2).unwrap();
        let rot = Tensor::cat(&[&x2.neg().unwrap(), &x1], 2).unwrap();
        let ty = (tx.broadcast_mul(&tc).unwrap() + rot.broadcast_mul(&ts).unwrap()).unwrap();
        let ty: Vec<f32> = ty.flatten_all().unwrap().to_vec1().unwrap();
        assert!(max_abs_diff(&y, &ty) < 1e-6);
        // Backward = transpose: <R x, g> == <x, Rᵀ g>.
        let g = rand_vec(t * heads * d, 2, 1.0);
        let mut gt = g.clone();
        apply(&mut gt, heads, d, &c, &s, true);
        assert!((dot(&y, &g) - dot(&x, &gt)).abs() < 1e-5);
        let mut back = y.clone();
        apply(&mut back, heads, d, &c, &s, true);
        assert!(max_abs_diff(&back, &x) < 1e-6);
    }
}
