//! RMSNorm as transformers computes it (FORMATS §4.3): `var = mean(x²)` in
//! f32, `x̂ = x · rsqrt(var + eps)`, then `weight · x̂` (input already f32, so
//! the "cast back before multiplying" step is the identity here).

use rayon::prelude::*;

/// `Σ a·b(·c)` in f64 over eight independent partial sums: one running sum
/// was a chain of dependent f64 adds, the whole cost of the norm.
#[inline(always)]
pub(crate) fn dot_f64(a: &[f32], b: &[f32], c: Option<&[f32]>) -> f64 {
    const L: usize = 8;
    let mut acc = [0f64; L];
    let n = a.len() / L * L;
    match c {
        None => {
            for (ca, cb) in a[..n].chunks_exact(L).zip(b[..n].chunks_exact(L)) {
                for j in 0..L {
                    acc[j] += ca[j] as f64 * cb[j] as f64;
                }
            }
        }
        Some(c) => {
            for ((ca, cb), cc) in a[..n]
                .chunks_exact(L)
                .zip(b[..n].chunks_exact(L))
                .zip(c[..n].chunks_exact(L))
            {
                for j in 0..L {
                    acc[j] += ca[j] as f64 * cc[j] as f64 * cb[j] as f64;
                }
            }
        }
    }
    let mut tail = 0f64;
    for k in n..a.len() {
        tail += a[k] as f64 * b[k] as f64 * c.map_or(1.0, |c| c[k] as f64);
    }
    acc.iter().sum::<f64>() + tail
}

/// Returns `(y [t,h], rstd [t])`.
pub fn forward(x: &[f32], w: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let h = w.len();
    let t = x.len() / h;
    assert_eq!(x.len(), t * h, "rmsnorm: x is not whole rows");
    // every element written once by its rows' task: no zeroing pass first
    let mut y: Vec<f32> = Vec::with_capacity(x.len());
    let mut rstd = vec![0f32; t];
    y.spare_capacity_mut()[..x.len()]
        .par_chunks_mut(h * ROWS)
        .zip(rstd.par_chunks_mut(ROWS))
        .zip(x.par_chunks(h * ROWS))
        .for_each(|((yr, rs), xr)| super::fastmath::rmsnorm_forward_rows(xr, w, eps, yr, rs));
    // SAFETY: the chunks cover all t·h elements, each written above.
    unsafe { y.set_len(x.len()) };
    (y, rstd)
}

/// Rows per parallel task (a task of one 576-float row was mostly overhead).
const ROWS: usize = 8;

/// `dx = rstd · (g − x̂ · mean(g ⊙ x̂))` with `g = dy ⊙ w`, `x̂ = x · rstd`;
/// added into `dx` (the residual stream's gradient).
pub fn backward_add(dy: &[f32], x: &[f32], w: &[f32], rstd: &[f32], dx: &mut [f32]) {
    let h = w.len();
    dx.par_chunks_mut(h * ROWS)
        .zip(dy.par_chunks(h * ROWS))
        .zip(x.par_chunks(h * ROWS))
        .zip(rstd.par_chunks(ROWS))
        .for_each(|(((dxr, dyr), xr), r)| {
            super::fastmath::rmsnorm_backward_rows(dyr, xr, w, r, dxr)
        });
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    fn loss_ref(x: &[f64], w: &[f32], g: &[f32], eps: f64) -> f64 {
        let h = w.len();
        let mut s = 0.0;
        for (r, xr) in x.chunks(h).enumerate() {
            let var = xr.iter().map(|v| v * v).sum::<f64>() / h as f64;
            let rs = 1.0 / (var + eps).sqrt();
            for k in 0..h {
                s += w[k] as f64 * xr[k] * rs * g[r * h + k] as f64;
            }
        }
        s
    }

    #[test]
    fn rmsnorm_forward_and_backward_match_f64_reference() {
        let (t, h) = (6, 20);
        let x = rand_vec(t * h, 1, 2.0);
        let w = rand_vec(h, 2, 1.0);
        let g = rand_vec(t * h, 3, 1.0);
        let (y, rstd) = forward(&x, &w, 1e-5);
        let x64: Vec<f64> = x.iter().map(|v| *v as f64).collect();
        assert!((dot(&y, &g) - loss_ref(&x64, &w, &g, 1e-5)).abs() < 1e-4);
        let mut dx = vec![0f32; t * h];
        backward_add(&g, &x, &w, &rstd, &mut dx);
        let dir = rand_vec(t * h, 4, 1.0);
        let fd = directional_fd(&x, &dir, 1e-4, |xx| loss_ref(xx, &w, &g, 1e-5));
        assert!(
            (fd - dot(&dx, &dir)).abs() < 1e-4,
            "{fd} {}",
            dot(&dx, &dir)
        );
    }

    #[test]
    fn partial_sums_equal_the_plain_f64_sum() {
        for n in 0..40 {
            let (a, b, c) = (
                rand_vec(n, 7, 2.0),
                rand_vec(n, 8, 2.0),
                rand_vec(n, 9, 2.0),
            );
            let plain: f64 = (0..n).map(|k| a[k] as f64 * b[k] as f64).sum();
            let plain3: f64 = (0..n)
                .map(|k| a[k] as f64 * c[k] as f64 * b[k] as f64)
                .sum();
            assert!(
                (dot_f64(&a, &b, None) - plain).abs() <= 1e-12 * (1.0 + plain.abs()),
                "n {n}"
            );
            assert!(
                (dot_f64(&a, &b, Some(&c)) - plain3).abs() <= 1e-12 * (1.0 + plain3.abs()),
                "n {n}"
            );
        }
    }

    #[test]
    fn rmsnorm_matches_candle_ops() {
        use candle_core::{Device, Tensor, D};
        let (t, h) = (4, 16);
        let x = rand_vec(t * h, 5, 3.0);
        let w = rand_vec(h, 6, 1.0);
        let (y, _) = forward(&x, &w, 1e-6);
        let tx = Tensor::from_slice(&x, (t, h), &Device::Cpu).unwrap();
        let tw = Tensor::from_slice(&w, h, &Device::Cpu).unwrap();
        let var = tx.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let ty = tx
            .broadcast_div(&(var + 1e-6).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(&tw)
            .unwrap();
        let ty: Vec<f32> = ty.flatten_all().unwrap().to_vec1().unwrap();
        assert!(max_abs_diff(&y, &ty) < 1e-5);
    }
}
