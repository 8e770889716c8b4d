//! SwiGLU gate: `m = silu(g) ⊙ u`, `silu(z) = z / (1 + e^{-z})` (torch's formula).

use super::fastmath;

const CHUNK: usize = 4096;

/// `m = silu(g) ⊙ u` (the vectorized [`fastmath::swiglu_forward`]).
pub fn forward(g: &[f32], u: &[f32]) -> Vec<f32> {
    assert_eq!(g.len(), u.len(), "swiglu: sizes");
    super::par_new(g.len(), CHUNK, |c, mo| {
        let at = c * CHUNK;
        fastmath::swiglu_forward(&g[at..at + mo.len()], &u[at..at + mo.len()], mo)
    })
}

/// Returns `(dg, du)`.
pub fn backward(dm: &[f32], g: &[f32], u: &[f32]) -> (Vec<f32>, Vec<f32>) {
    assert!(dm.len() == g.len() && u.len() == g.len(), "swiglu: sizes");
    super::par_new2(g.len(), CHUNK, |c, dgc, duc| {
        let r = c * CHUNK..c * CHUNK + dgc.len();
        fastmath::swiglu_backward(&dm[r.clone()], &g[r.clone()], &u[r], dgc, duc)
    })
}

/// Plain reference of σ (libm `exp`, one element at a time), for the tests.
#[cfg(test)]
fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + (-z).exp())
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

    /// The vectorized kernels, at every instruction-set level this CPU has,
    /// against the scalar libm formulas (and bit-identical across levels).
    #[test]
    fn swiglu_kernels_match_the_scalar_reference_on_every_isa() {
        use super::super::fastmath::{swiglu_backward_isa, swiglu_forward_isa, Isa};
        let n = 10_007;
        let mut g = rand_vec(n, 11, 12.0);
        g.extend([0.0, -0.0, 100.0, -100.0, 88.5, -88.5, 1e-30, -1e-30]);
        let n = g.len();
        let u = rand_vec(n, 12, 3.0);
        let dm = rand_vec(n, 13, 2.0);
        let mut first: Option<(Vec<f32>, Vec<f32>, Vec<f32>)> = None;
        for isa in [Isa::V4, Isa::V3, Isa::Generic] {
            if !isa.available() {
                eprintln!("SKIPPED: {isa:?} is not available on this CPU");
                continue;
            }
            let mut m = vec![f32::NAN; n];
            swiglu_forward_isa(isa, &g, &u, &mut m);
            let (mut dg, mut du) = (vec![f32::NAN; n], vec![f32::NAN; n]);
            swiglu_backward_isa(isa, &dm, &g, &u, &mut dg, &mut du);
            for i in 0..n {
                // f64 truth; the tolerance scales with the terms' magnitudes
                // (dg's `1 + g(1 − σ)` cancels near g ≈ −1.28).
                let (gd, ud, dmd) = (g[i] as f64, u[i] as f64, dm[i] as f64);
                let s = 1.0 / (1.0 + (-gd).exp());
                let close = |got: f32, want: f64, scale: f64, what: &str| {
                    // (+1e-35: below g ≈ −88 `exp` clamps, silu(g) ≈ g·e^g is then
                    // a few 1e-37 instead of a denormal or 0)
                    let tol = 8.0 * f32::EPSILON as f64 * scale + 1e-35;
                    assert!(
                        (got as f64 - want).abs() <= tol,
                        "{isa:?} {what}[{i}] g={}: {got} vs {want}",
                        g[i]
                    );
                };
                close(m[i], gd * s * ud, (gd * s * ud).abs(), "m");
                close(du[i], dmd * gd * s, (dmd * gd * s).abs(), "du");
                let dg_scale = (dmd * ud * s).abs() * (1.0 + (gd * (1.0 - s)).abs());
                close(dg[i], dmd * ud * s * (1.0 + gd * (1.0 - s)), dg_scale, "dg");
                // and the scalar libm formulas agree within the same bounds
                let sr = sigmoid(g[i]) as f64;
                close(
                    sigmoid(g[i]) * g[i] * u[i],
                    gd * s * ud,
                    (gd * s * ud).abs(),
                    "m (libm)",
                );
                assert!((sr - s).abs() <= 4.0 * f32::EPSILON as f64 * s + 1e-37);
            }
            match &first {
                None => first = Some((m, dg, du)),
                Some(f) => assert!(
                    f.0 == m && f.1 == dg && f.2 == du,
                    "{isa:?} differs from the first level"
                ),
            }
        }
    }
}
