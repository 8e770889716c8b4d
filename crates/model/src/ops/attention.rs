//! Causal grouped-query attention (eager semantics of transformers, FORMATS
//! §4.3): `softmax(q kᵀ · d^-½ + mask) v` in f32, kv head `j` serving query
//! heads `j·n_rep .. (j+1)·n_rep`. Optional segment ids keep packed examples
//! apart: key `j` is visible to query `i` iff `j <= i` and both share a segment.
//!
//! Layouts: `q [b·q_len, heads·d]`, `k, v [b·k_len, kv_heads·d]` (the linear
//! outputs as they come, no transposes); queries sit at key positions
//! `q_offset .. q_offset + q_len` (non-zero when a KV cache holds the past).

use rayon::prelude::*;

use super::{gemm_view, View};

#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    pub b: usize,
    pub q_len: usize,
    pub k_len: usize,
    pub q_offset: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub d: usize,
    /// Mistral sliding window: query `i` sees key `j` only if `i - j < window`.
    pub window: Option<usize>,
}

impl AttnShape {
    fn scale(&self) -> f32 {
        (self.d as f32).powf(-0.5)
    }
    fn n_rep(&self) -> usize {
        self.heads / self.kv_heads
    }
    fn q_view<'a>(&self, q: &'a [f32], bi: usize, hi: usize) -> View<'a> {
        View {
            data: q,
            off: bi * self.q_len * self.heads * self.d + hi * self.d,
            rs: self.heads * self.d,
            cs: 1,
        }
    }
    /// `[k_len, d]` view of one kv head (transpose with `t`).
    fn kv_view<'a>(&self, k: &'a [f32], bi: usize, kvh: usize, t: bool) -> View<'a> {
        let kvd = self.kv_heads * self.d;
        let off = bi * self.k_len * kvd + kvh * self.d;
        if t {
            View {
                data: k,
                off,
                rs: 1,
                cs: kvd,
            }
        } else {
            View {
                data: k,
                off,
                rs: kvd,
                cs: 1,
            }
        }
    }
}

/// Forward. Returns `(out [b·q_len, heads·d], probs [b, heads, q_len, k_len])`.
/// `seg`, if given, is `[b·k_len]`.
pub fn forward(
    sh: &AttnShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    seg: Option<&[u32]>,
) -> (Vec<f32>, Vec<f32>) {
    let AttnShape {
        b,
        q_len,
        k_len,
        q_offset,
        heads,
        d,
        ..
    } = *sh;
    assert_eq!(q.len(), b * q_len * heads * d);
    assert_eq!(k.len(), b * k_len * sh.kv_heads * d);
    assert!(q_offset + q_len <= k_len);
    let scale = sh.scale();
    let mut probs = vec![0f32; b * heads * q_len * k_len];
    let mut heads_out = vec![0f32; b * heads * q_len * d];
    probs
        .par_chunks_mut(q_len * k_len)
        .zip(heads_out.par_chunks_mut(q_len * d))
        .enumerate()
        .for_each(|(idx, (p, o))| {
            let (bi, hi) = (idx / heads, idx % heads);
            let kvh = hi / sh.n_rep();
            gemm_view(
                q_len,
                k_len,
                d,
                sh.q_view(q, bi, hi),
                sh.kv_view(k, bi, kvh, true),
                p,
                0,
                k_len,
                false,
                scale,
            );
            for i in 0..q_len {
                let row = &mut p[i * k_len..(i + 1) * k_len];
                let qi = q_offset + i;
                let visible = |j: usize| -> bool {
                    j <= qi
                        && sh.window.is_none_or(|w| qi - j < w)
                        && seg.is_none_or(|s| s[bi * k_len + j] == s[bi * k_len + qi])
                };
                let mut mx = f32::NEG_INFINITY;
                for (j, v) in row.iter().enumerate() {
                    if visible(j) && *v > mx {
                        mx = *v;
                    }
                }
                let mut sum = 0f32;
                for (j, v) in row.iter_mut().enumerate() {
                    if visible(j) {
                        *v = (*v - mx).exp();
                        sum += *v;
                    } else {
                        *v = 0.0;
                    }
                }
                let inv = 1.0 / sum;
                row.iter_mut().for_each(|v| *v *= inv);
            }
            gemm_view(
                q_len,
                d,
                k_len,
                View::mat(p, q_len, k_len, false),
                sh.kv_view(v, bi, kvh, false),
                o,
                0,
                d,
                false,
                1.0,
            );
        });
    let mut out = vec![0f32; b * q_len * heads * d];
    for bi in 0..b {
        for hi in 0..heads {
            let src = &heads_out[(bi * heads + hi) * q_len * d..][..q_len * d];
            for i in 0..q_len {
                out[(bi * q_len + i) * heads * d + hi * d..][..d]
                    .copy_from_slice(&src[i * d..(i + 1) * d]);
            }
        }
    }
    (out, probs)
}

/// Backward. Returns `(dq, dk, dv)` in the layouts of `q, k, v`.
pub fn backward(
    sh: &AttnShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    probs: &[f32],
    dout: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let AttnShape {
        b,
        q_len,
        k_len,
        heads,
        kv_heads,
        d,
        ..
    } = *sh;
    let n_rep = sh.n_rep();
    let scale = sh.scale();
    // Per (batch, kv head) group: dq of its n_rep query heads, dk, dv.
    let groups: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..b * kv_heads)
        .into_par_iter()
        .map(|g| {
            let (bi, kvh) = (g / kv_heads, g % kv_heads);
            let mut dq = vec![0f32; n_rep * q_len * d];
            let mut dk = vec![0f32; k_len * d];
            let mut dv = vec![0f32; k_len * d];
            let mut dp = vec![0f32; q_len * k_len];
            for r in 0..n_rep {
                let hi = kvh * n_rep + r;
                let p = &probs[(bi * heads + hi) * q_len * k_len..][..q_len * k_len];
                let dov = sh.q_view(dout, bi, hi);
                // dP = dO Vᵀ
                gemm_view(
                    q_len,
                    k_len,
                    d,
                    dov,
                    sh.kv_view(v, bi, kvh, true),
                    &mut dp,
                    0,
                    k_len,
                    false,
                    1.0,
                );
                // dV += Pᵀ dO
                gemm_view(
                    k_len,
                    d,
                    q_len,
                    View::mat(p, k_len, q_len, true),
                    dov,
                    &mut dv,
                    0,
                    d,
                    true,
                    1.0,
                );
                // dS = P ⊙ (dP − rowsum(dP ⊙ P))
                for i in 0..q_len {
                    let pr = &p[i * k_len..(i + 1) * k_len];
                    let dr = &mut dp[i * k_len..(i + 1) * k_len];
                    let s: f32 = pr.iter().zip(dr.iter()).map(|(a, b)| a * b).sum();
                    dr.iter_mut().zip(pr).for_each(|(x, pv)| *x = pv * (*x - s));
                }
                // dQ = scale · dS K ; dK += scale · dSᵀ Q
                gemm_view(
                    q_len,
                    d,
                    k_len,
                    View::mat(&dp, q_len, k_len, false),
                    sh.kv_view(k, bi, kvh, false),
                    &mut dq[r * q_len * d..(r + 1) * q_len * d],
                    0,
                    d,
                    false,
                    scale,
                );
                gemm_view(
                    k_len,
                    d,
                    q_len,
                    View::mat(&dp, k_len, q_len, true),
                    sh.q_view(q, bi, hi),
                    &mut dk,
                    0,
                    d,
                    true,
                    scale,
                );
            }
            (dq, dk, dv)
        })
        .collect();
    let mut dq = vec![0f32; q.len()];
    let mut dk = vec![0f32; k.len()];
    let mut dv = vec![0f32; v.len()];
    let kvd = kv_heads * d;
    for (g, (gq, gk, gv)) in groups.iter().enumerate() {
        let (bi, kvh) = (g / kv_heads, g % kv_heads);
        for r in 0..n_rep {
            let hi = kvh * n_rep + r;
            for i in 0..q_len {
                dq[(bi * q_len + i) * heads * d + hi * d..][..d]
                    .copy_from_slice(&gq[(r * q_len + i) * d..][..d]);
            }
        }
        for j in 0..k_len {
            dk[(bi * k_len + j) * kvd + kvh * d..][..d].copy_from_slice(&gk[j * d..][..d]);
            dv[(bi * k_len + j) * kvd + kvh * d..][..d].copy_from_slice(&gv[j * d..][..d]);
        }
    }
    (dq, dk, dv)
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    /// f64 reference of <g, attention(q, k, v)>.
    fn loss_ref(
        sh: &AttnShape,
        q: &[f64],
        k: &[f64],
        v: &[f64],
        seg: Option<&[u32]>,
        g: &[f32],
    ) -> f64 {
        let AttnShape {
            b,
            q_len,
            k_len,
            q_offset,
            heads,
            kv_heads,
            d,
            window,
        } = *sh;
        let scale = (d as f64).powf(-0.5);
        let mut total = 0.0;
        for bi in 0..b {
            for hi in 0..heads {
                let kvh = hi / (heads / kv_heads);
                for i in 0..q_len {
                    let qi = q_offset + i;
                    let qrow = &q[(bi * q_len + i) * heads * d + hi * d..][..d];
                    let mut sc = vec![f64::NEG_INFINITY; k_len];
                    for j in 0..k_len {
                        let ok = j <= qi
                            && window.is_none_or(|w| qi - j < w)
                            && seg.is_none_or(|s| s[bi * k_len + j] == s[bi * k_len + qi]);
                        if ok {
                            let krow = &k[(bi * k_len + j) * kv_heads * d + kvh * d..][..d];
                            sc[j] = qrow.iter().zip(krow).map(|(a, b)| a * b).sum::<f64>() * scale;
                        }
                    }
                    let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = sc.iter().map(|s| (s - mx).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for l in 0..d {
                        let o: f64 = (0..k_len)
                            .map(|j| e[j] / z * v[(bi * k_len + j) * kv_heads * d + kvh * d + l])
                            .sum();
                        total += o * g[(bi * q_len + i) * heads * d + hi * d + l] as f64;
                    }
                }
            }
        }
        total
    }

    fn check(sh: AttnShape, seg: Option<Vec<u32>>) {
        let q = rand_vec(sh.b * sh.q_len * sh.heads * sh.d, 1, 1.0);
        let k = rand_vec(sh.b * sh.k_len * sh.kv_heads * sh.d, 2, 1.0);
        let v = rand_vec(sh.b * sh.k_len * sh.kv_heads * sh.d, 3, 1.0);
        let g = rand_vec(q.len(), 4, 1.0);
        let seg = seg.as_deref();
        let (out, probs) = forward(&sh, &q, &k, &v, seg);
        let f64v = |x: &[f32]| x.iter().map(|v| *v as f64).collect::<Vec<_>>();
        let (q64, k64, v64) = (f64v(&q), f64v(&k), f64v(&v));
        assert!((dot(&out, &g) - loss_ref(&sh, &q64, &k64, &v64, seg, &g)).abs() < 1e-4);
        let (dq, dk, dv) = backward(&sh, &q, &k, &v, &probs, &g);
        let dir = rand_vec(q.len(), 5, 1.0);
        let fd = directional_fd(&q, &dir, 1e-4, |x| loss_ref(&sh, x, &k64, &v64, seg, &g));
        assert!(
            (fd - dot(&dq, &dir)).abs() < 1e-4,
            "dq {fd} {}",
            dot(&dq, &dir)
        );
        let dir = rand_vec(k.len(), 6, 1.0);
        let fd = directional_fd(&k, &dir, 1e-4, |x| loss_ref(&sh, &q64, x, &v64, seg, &g));
        assert!((fd - dot(&dk, &dir)).abs() < 1e-4, "dk");
        let fd = directional_fd(&v, &dir, 1e-4, |x| loss_ref(&sh, &q64, &k64, x, seg, &g));
        assert!((fd - dot(&dv, &dir)).abs() < 1e-4, "dv");
    }

    #[test]
    fn gqa_attention_gradients_match_finite_differences() {
        let sh = AttnShape {
            b: 2,
            q_len: 7,
            k_len: 7,
            q_offset: 0,
            heads: 4,
            kv_heads: 2,
            d: 8,
            window: None,
        };
        check(sh, None);
        check(sh, Some(vec![0, 0, 0, 1, 1, 2, 2, 5, 5, 5, 5, 5, 6, 6]));
        let mha = AttnShape {
            heads: 3,
            kv_heads: 3,
            ..sh
        };
        check(mha, None);
        let windowed = AttnShape {
            window: Some(3),
            ..sh
        };
        check(windowed, None);
        // The window really masks: far keys no longer contribute.
        let q = rand_vec(2 * 7 * 32, 1, 1.0);
        let k = rand_vec(2 * 7 * 16, 2, 1.0);
        let (o1, _) = forward(&sh, &q, &k, &k, None);
        let (o2, p2) = forward(&windowed, &q, &k, &k, None);
        assert!(max_abs_diff(&o1, &o2) > 1e-3);
        assert_eq!(p2[6 * 7 + 3], 0.0); // query 6 cannot see key 3 with window 3
        assert!(p2[6 * 7 + 4] > 0.0);
    }

    #[test]
    fn offset_queries_equal_the_tail_of_the_full_attention() {
        let full = AttnShape {
            b: 1,
            q_len: 6,
            k_len: 6,
            q_offset: 0,
            heads: 4,
            kv_heads: 1,
            d: 4,
            window: None,
        };
        let q = rand_vec(6 * 16, 1, 1.0);
        let k = rand_vec(6 * 4, 2, 1.0);
        let v = rand_vec(6 * 4, 3, 1.0);
        let (out, _) = forward(&full, &q, &k, &v, None);
        let tail = AttnShape {
            q_len: 2,
            q_offset: 4,
            ..full
        };
        let (o2, _) = forward(&tail, &q[4 * 16..], &k, &v, None);
        assert!(max_abs_diff(&o2, &out[4 * 16..]) < 1e-6);
    }
}
