//! Randomized tests of the skinny kernels against an f64 reference, on
//! every instruction-set level this CPU has.

use super::super::testutil::*;
use super::*;
use rand::{Rng, SeedableRng};

/// Element `(k, j)` of a reference operand.
type Elem<'a> = dyn Fn(usize, usize) -> f32 + 'a;

const ISAS: [Isa; 3] = [Isa::V4, Isa::V3, Isa::Generic];

fn isas() -> Vec<Isa> {
    ISAS.into_iter()
        .filter(|i| {
            let ok = i.available();
            if !ok {
                eprintln!("SKIPPED: {i:?} is not available on this CPU");
            }
            ok
        })
        .collect()
}

/// f64 reference of both kernels: `c (+)= Σ_k lhs(i,k) · rhs(k,j)`.
#[allow(clippy::too_many_arguments)]
fn reference(
    m: usize,
    n: usize,
    kk: usize,
    lhs: impl Fn(usize, usize) -> f32,
    rhs: impl Fn(usize, usize) -> f32,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    for i in 0..m {
        for j in 0..n {
            let s: f64 = (0..kk).map(|k| lhs(i, k) as f64 * rhs(k, j) as f64).sum();
            let d = &mut c[i * ldc + j];
            *d = if accumulate {
                (*d as f64 + s) as f32
            } else {
                s as f32
            };
        }
    }
}

fn shapes(seed: u64) -> Vec<(usize, usize, usize)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![(0, 5, 3), (4, 0, 3), (3, 5, 0), (1, 1, 1)];
    for &r in &[1, 3, 8, 16, 17, 33, 64] {
        for _ in 0..3 {
            let (m, n, k) = (
                rng.random_range(1..40),
                rng.random_range(1..150),
                rng.random_range(1..90),
            );
            v.extend([(m, r, k), (r, n, k), (m, n, r)]);
        }
    }
    v
}

/// Tolerance of an f32 sum of `kk` products of magnitude <= 1.
fn tol(kk: usize) -> f32 {
    2e-6 * (kk as f32 + 4.0)
}

#[test]
fn nn_matches_reference_on_every_isa() {
    for isa in isas() {
        for (case, &(m, n, kk)) in shapes(1).iter().enumerate() {
            let (lda, ldc) = (kk + case % 3, n + case % 2);
            let a = rand_vec((m * lda).max(1), case as u64, 1.0);
            let b = rand_vec(kk * n, 100 + case as u64, 1.0); // [kk, n]
            let bt = rand_vec(kk * n, 200 + case as u64, 1.0); // [n, kk]
            let rows_rhs = |k: usize, j: usize| b[k * n + j] * 0.5;
            let tr_rhs = |k: usize, j: usize| bt[j * kk + k];
            let packs: [(Vec<f32>, &Elem); 2] = [
                (pack_rows(&b, kk, n, 0.5), &rows_rhs),
                (pack_transposed(&bt, n, kk, 1.0), &tr_rhs),
            ];
            for (p, rhs) in packs {
                for accumulate in [false, true] {
                    let c0 = rand_vec((m * ldc).max(1), 300 + case as u64, 1.0);
                    let (mut got, mut want) = (c0.clone(), c0.clone());
                    nn(isa, m, n, kk, &a, lda, &p, &mut got, ldc, accumulate);
                    reference(
                        m,
                        n,
                        kk,
                        |i, k| a[i * lda + k],
                        rhs,
                        &mut want,
                        ldc,
                        accumulate,
                    );
                    let d = max_abs_diff(&got, &want);
                    assert!(
                        d <= tol(kk),
                        "{isa:?} nn m{m} n{n} k{kk} acc {accumulate}: {d}"
                    );
                }
            }
        }
    }
}

#[test]
fn tn_matches_reference_on_every_isa() {
    for isa in isas() {
        for (case, &(m, n, kk)) in shapes(2).iter().enumerate() {
            let (ldl, ldr, ldc) = (m + case % 2, n + case % 3, n + case % 2);
            let l = rand_vec(kk * ldl, case as u64, 1.0);
            let r = rand_vec(kk * ldr, 100 + case as u64, 1.0);
            for accumulate in [false, true] {
                let c0 = rand_vec((m * ldc).max(1), 300 + case as u64, 1.0);
                let (mut got, mut want) = (c0.clone(), c0.clone());
                tn(isa, m, n, kk, &l, ldl, &r, ldr, &mut got, ldc, accumulate);
                let (lf, rf) = (|i, k| l[k * ldl + i], |k, j| r[k * ldr + j]);
                reference(m, n, kk, lf, rf, &mut want, ldc, accumulate);
                let d = max_abs_diff(&got, &want);
                assert!(
                    d <= tol(kk),
                    "{isa:?} tn m{m} n{n} k{kk} acc {accumulate}: {d}"
                );
            }
        }
    }
}

/// The blocked transpose equals the element-by-element one bit for bit
/// (sizes off and on the 16 x 16 blocks, scaled).
#[test]
fn blocked_transpose_equals_the_plain_one() {
    for &(n, rows) in &[
        (16usize, 2048usize),
        (5632, 16),
        (7, 33),
        (40, 3),
        (1, 1),
        (0, 5),
        (33, 48),
    ] {
        let src = rand_vec(n * rows, (n * 31 + rows) as u64, 1.0);
        let got = pack_transposed(&src, n, rows, 1.75);
        let want = pack_transposed_ref(&src, n, rows, 1.75);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got), bits(&want), "n {n} rows {rows}");
    }
}
