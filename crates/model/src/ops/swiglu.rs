//! SwiGLU gate: `m = silu(g) ⊙ u`, `silu(z) = z / (1 + e^{-z})` (torch's formula).

use rayon::prelude::*;

const CHUNK: usize = 4096;

#[inline]
fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + (-z).exp())
}

pub fn forward(g: &[f32], u: &[f32]) -> Vec<f32> {
    let mut m = vec![0f32; g.len()];
    m.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
        .for_each(|(mo, (gc, uc))| {
            for ((o, gv), uv) in mo.iter_mut().zip(gc).zip(uc) {
                *o = gv / (1.0 + (-gv).exp()) * uv;
            }
        });
    m
}

/// Returns `(dg, du)`.
pub fn backward(dm: &[f32], g: &[f32], u: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let mut dg = vec![0f32; g.len()];
    let mut du = vec![0f32; g.len()];
    dg.par_chunks_mut(CHUNK)
        .zip(du.par_chunks_mut(CHUNK))
        .zip(
            dm.par_chunks(CHUNK)
                .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK))),
        )
        .for_each(|((dgc, duc), (dmc, (gc, uc)))| {
            for i in 0..dgc.len() {
                let s = sigmoid(gc[i]);
                let silu = gc[i] * s;
                duc[i] = dmc[i] * silu;
                dgc[i] = dmc[i] * uc[i] * s * (1.0 + gc[i] * (1.0 - s));
            }
        });
    (dg, du)
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    #[test]
    fn swiglu_gradients_match_finite_differences() {
        let n = 50;
        let g = rand_vec(n, 1, 4.0);
        let u = rand_vec(n, 2, 2.0);
        let w = rand_vec(n, 3, 1.0);
        let m = forward(&g, &u);
        let f = |gg: &[f64], uu: &[f64]| -> f64 {
            (0..n)
                .map(|i| gg[i] / (1.0 + (-gg[i]).exp()) * uu[i] * w[i] as f64)
                .sum()
        };
        let g64: Vec<f64> = g.iter().map(|v| *v as f64).collect();
        let u64_: Vec<f64> = u.iter().map(|v| *v as f64).collect();
        assert!((dot(&m, &w) - f(&g64, &u64_)).abs() < 1e-5);
        let (dg, du) = backward(&w, &g, &u);
        let dir = rand_vec(n, 4, 1.0);
        let fd = directional_fd(&g, &dir, 1e-5, |gg| f(gg, &u64_));
        assert!((fd - dot(&dg, &dir)).abs() < 1e-4);
        let fd = directional_fd(&u, &dir, 1e-5, |uu| f(&g64, uu));
        assert!((fd - dot(&du, &dir)).abs() < 1e-4);
    }
}
