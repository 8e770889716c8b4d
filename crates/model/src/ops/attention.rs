//! Causal grouped-query attention (eager semantics of transformers, FORMATS
//! §4.3): `softmax(q kᵀ · d^-½ + mask) v` in f32, kv head `j` serving query
//! heads `j·n_rep .. (j+1)·n_rep`. Optional segment ids keep packed examples
//! apart: key `j` is visible to query `i` iff `j <= i` and both share a segment.
//!
//! Layouts: `q [b·q_len, heads·d]`, `k, v [b·k_len, kv_heads·d]` (the linear
//! outputs as they come, no transposes); queries sit at key positions
//! `q_offset .. q_offset + q_len` (non-zero when a KV cache holds the past).

use std::ops::Range;

use rayon::prelude::*;

use super::{fastmath, gemm_view, View};

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
    /// bf16 compute: the products on AMX bf16 tiles where
    /// [`super::attention_amx::usable`] (softmax and accumulation stay f32).
    pub bf16: bool,
}

impl AttnShape {
    pub(crate) fn scale(&self) -> f32 {
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

/// Queries per block: the scores of one block (`Q_BLOCK × keys`) are the only
/// `s × s`-like buffer, per thread, never kept.
pub(crate) const Q_BLOCK: usize = 64;

impl AttnShape {
    /// Whether query `qi` (absolute position) sees key `j` of row `bi`
    /// (the definition the masks' fills are tested against).
    #[cfg(test)]
    pub(crate) fn visible(&self, seg: Option<&[u32]>, bi: usize, qi: usize, j: usize) -> bool {
        j <= qi
            && self.window.is_none_or(|w| qi - j < w)
            && seg.is_none_or(|s| s[bi * self.k_len + j] == s[bi * self.k_len + qi])
    }
    /// The first position of the segment run position `i` of row `bi` is
    /// in (0 without segment ids). Segment ids come in contiguous runs
    /// (`Batch::dims` checks it), so a query sees no key before it.
    pub(crate) fn run_start(&self, seg: Option<&[u32]>, bi: usize, i: usize) -> usize {
        let Some(seg) = seg else { return 0 };
        let row = &seg[bi * self.k_len..(bi + 1) * self.k_len];
        let id = row[i];
        row[..i].iter().rposition(|&x| x != id).map_or(0, |j| j + 1)
    }
    /// One past the last position of the segment run position `i` of row
    /// `bi` is in (the row's end without segment ids).
    pub(crate) fn run_end(&self, seg: Option<&[u32]>, bi: usize, i: usize) -> usize {
        let Some(seg) = seg else { return self.k_len };
        let row = &seg[bi * self.k_len..(bi + 1) * self.k_len];
        let id = row[i];
        row[i..]
            .iter()
            .position(|&x| x != id)
            .map_or(self.k_len, |j| i + j)
    }
    /// [`Self::run_start`] of each position of `rows` (row `bi`): one scan
    /// back from the first, then a comparison per position, instead of a
    /// scan per query row of every block.
    pub(crate) fn run_starts(
        &self,
        seg: Option<&[u32]>,
        bi: usize,
        rows: Range<usize>,
    ) -> Vec<usize> {
        let Some(ids) = seg else {
            return vec![0; rows.len()];
        };
        let row = &ids[bi * self.k_len..(bi + 1) * self.k_len];
        let mut start = if rows.is_empty() {
            0
        } else {
            self.run_start(seg, bi, rows.start)
        };
        rows.clone()
            .map(|i| {
                if i > rows.start && row[i] != row[i - 1] {
                    start = i;
                }
                start
            })
            .collect()
    }
    /// Sets the scores of the keys query `qi` (absolute position) does not
    /// see to −∞ in `row` (keys `ks ..`): two slice fills, the causal mask
    /// with the sliding window's and the start of the query's segment run
    /// (`run_start`, [`Self::run_starts`]; 0 without segment ids).
    pub(crate) fn mask_row(&self, run_start: usize, qi: usize, ks: usize, row: &mut [f32]) {
        // Visible: keys lo..=qi, lo = qi + 1 - window (or 0), and not
        // before the query's segment run.
        let lo = self
            .window
            .map_or(0, |w| (qi + 1).saturating_sub(w))
            .max(run_start);
        let n = row.len();
        let first = lo.saturating_sub(ks).min(n);
        let end = (qi + 1).saturating_sub(ks).clamp(first, n);
        row[..first].fill(f32::NEG_INFINITY);
        row[end..].fill(f32::NEG_INFINITY);
    }
    /// Keys `kstart..kend` that queries `i0..i1` can see at most: none
    /// before the window of query `i0` or its segment run (the later
    /// queries' start no earlier).
    fn key_range(&self, seg: Option<&[u32]>, bi: usize, i0: usize, i1: usize) -> (usize, usize) {
        let kend = (self.q_offset + i1).min(self.k_len);
        let kstart = match self.window {
            Some(w) => (self.q_offset + i0 + 1).saturating_sub(w),
            None => 0,
        }
        .max(self.run_start(seg, bi, self.q_offset + i0));
        (kstart.min(kend), kend)
    }
}

/// The query rows of a part of a group's query blocks (`blocks` of
/// [`Q_BLOCK`], a sequence of `s`): also the keys the part sees, `0..end`.
pub(crate) fn part_rows(blocks: &Range<usize>, s: usize) -> Range<usize> {
    (blocks.start * Q_BLOCK).min(s)..(blocks.end * Q_BLOCK).min(s)
}

/// Causal block pairs a part of a group aims at (query block `j` sees `j + 1`
/// key blocks): a group of up to 8 blocks (512 queries) stays whole.
pub(crate) const PART_PAIRS: usize = 40;
/// Parts of a group at most: each part of the backward keeps its own `dK`,
/// `dV` over the keys it sees until the group sums them.
pub(crate) const MAX_PARTS: usize = 4;

/// A group's `nb` query blocks in parts of about equal causal cost, so that
/// long sequences give the threads more than `b · kv_heads` tasks (with
/// batch 1 and 3 kv heads, 2 threads were a third idle in the attention; 16
/// threads have 4-8 kv heads to share). A function of the shape alone:
/// the backward's sums over parts (below) come out the same on any number
/// of threads. Each part ends where the running cost comes nearest its
/// share of the total.
pub(crate) fn query_parts(nb: usize) -> Vec<Range<usize>> {
    let total = nb * (nb + 1) / 2;
    let n = total
        .div_ceil(PART_PAIRS)
        .clamp(1, MAX_PARTS.min(nb.max(1)));
    let mut parts = Vec::with_capacity(n);
    let (mut start, mut cost) = (0, 0);
    for j in 0..nb {
        cost += j + 1;
        if parts.len() + 1 == n {
            break;
        }
        let target = total * (parts.len() + 1) / n;
        let next = cost + j + 2;
        if cost >= target || next.abs_diff(target) > cost.abs_diff(target) {
            parts.push(start..j + 1);
            start = j + 1;
        }
    }
    parts.push(start..nb);
    parts
}

/// Runs `run` on each of a group's `n` parts, in parallel when there are
/// several, and returns their results in part order.
pub(crate) fn run_parts<T: Send>(n: usize, run: impl Fn(usize) -> T + Sync + Send) -> Vec<T> {
    if n == 1 {
        vec![run(0)]
    } else {
        (0..n).into_par_iter().map(run).collect()
    }
}

/// A group's `dK`, `dV` (`len` values each) from its parts' (each over a
/// leading run of the keys): the first part's, grown with zeros to `len`,
/// then every later one added in part order (the same bits on any number
/// of threads).
pub(crate) fn sum_parts(parts: Vec<(Vec<f32>, Vec<f32>)>, len: usize) -> (Vec<f32>, Vec<f32>) {
    let mut parts = parts.into_iter();
    let (mut gk, mut gv) = parts.next().expect("a group has a part");
    gk.resize(len, 0.0);
    gv.resize(len, 0.0);
    for (part_k, part_v) in parts {
        fastmath::add_assign(&mut gk[..part_k.len()], &part_k);
        fastmath::add_assign(&mut gv[..part_v.len()], &part_v);
    }
    (gk, gv)
}

/// Masked softmax of one score row in place (keys `kstart + j`); returns its
/// log-sum-exp (−∞ for a row that sees nothing; the row is then all zero).
pub(crate) fn softmax_row(row: &mut [f32]) -> f32 {
    let mx = fastmath::max(row);
    if mx == f32::NEG_INFINITY {
        row.fill(0.0);
        return f32::NEG_INFINITY;
    }
    let z = fastmath::exp_shift_sum(row, mx);
    fastmath::scale(row, (1.0 / z) as f32);
    mx + (z as f32).ln()
}

/// Forward, flash-style: per (row, head, block of queries) the scores are
/// computed only for the keys the block can see, soft-maxed and multiplied
/// into `V`, then dropped. Returns `(out [b·q_len, heads·d], lse [b, heads,
/// q_len])`: the log-sum-exp of each query's scaled scores, which is all the
/// backward needs (besides `out`) to recompute the probabilities.
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
    if super::attention_amx::usable(sh) {
        return super::attention_amx::forward(sh, q, k, v, seg);
    }
    let scale = sh.scale();
    let nqb = q_len.div_ceil(Q_BLOCK);
    let mut lse = vec![0f32; b * heads * q_len];
    // Per (bi, hi, query block): its output rows [rows, d] and lse.
    let blocks: Vec<(Vec<f32>, Vec<f32>)> = (0..b * heads * nqb)
        .into_par_iter()
        .map(|task| {
            super::in_task(|| {
                let (bh, qb) = (task / nqb, task % nqb);
                let (bi, hi) = (bh / heads, bh % heads);
                let kvh = hi / sh.n_rep();
                let (i0, i1) = (qb * Q_BLOCK, ((qb + 1) * Q_BLOCK).min(q_len));
                let rows = i1 - i0;
                let (ks, ke) = sh.key_range(seg, bi, i0, i1);
                let kl = ke - ks;
                let mut o = vec![0f32; rows * d];
                let mut l = vec![f32::NEG_INFINITY; rows];
                if kl == 0 {
                    return (o, l);
                }
                let mut p = vec![0f32; rows * kl];
                let mut qv = sh.q_view(q, bi, hi);
                qv.off += i0 * qv.rs;
                let mut kv = sh.kv_view(k, bi, kvh, true);
                kv.off += ks * kv.cs;
                gemm_view(rows, kl, d, qv, kv, &mut p, 0, kl, false, scale);
                let starts = sh.run_starts(seg, bi, q_offset + i0..q_offset + i1);
                for (r, row) in p.chunks_mut(kl).enumerate() {
                    let qi = q_offset + i0 + r;
                    sh.mask_row(starts[r], qi, ks, row);
                    l[r] = softmax_row(row);
                }
                let mut vv = sh.kv_view(v, bi, kvh, false);
                vv.off += ks * vv.rs;
                gemm_view(
                    rows,
                    d,
                    kl,
                    View::mat(&p, rows, kl, false),
                    vv,
                    &mut o,
                    0,
                    d,
                    false,
                    1.0,
                );
                (o, l)
            })
        })
        .collect();
    let mut out = vec![0f32; b * q_len * heads * d];
    for (task, (o, l)) in blocks.iter().enumerate() {
        let (bh, qb) = (task / nqb, task % nqb);
        let (bi, hi) = (bh / heads, bh % heads);
        let i0 = qb * Q_BLOCK;
        for (r, orow) in o.chunks(d).enumerate() {
            out[(bi * q_len + i0 + r) * heads * d + hi * d..][..d].copy_from_slice(orow);
        }
        lse[bh * q_len + i0..][..l.len()].copy_from_slice(l);
    }
    (out, lse)
}

/// Heads `h0..h0 + nh` of batch row `bi` into a `[b·len, heads·d]` matrix
/// at `dst`, from `src` laid out `[nh][len][d]` (one group's result).
///
/// # Safety
/// `dst` is valid for writes of those rows' head columns, which nobody else
/// writes meanwhile.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn write_heads(
    dst: *mut f32,
    src: &[f32],
    bi: usize,
    len: usize,
    heads: usize,
    h0: usize,
    nh: usize,
    d: usize,
) {
    // SAFETY: the caller's contract, for all `len` rows.
    unsafe { write_head_rows(dst, src, bi, len, 0..len, heads, h0, nh, d) }
}

/// [`write_heads`] for rows `rows` of the sequences (length `len`) only,
/// from `src` laid out `[nh][rows.len()][d]` (a part of a group's queries).
///
/// # Safety
/// As [`write_heads`], for those rows.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn write_head_rows(
    dst: *mut f32,
    src: &[f32],
    bi: usize,
    len: usize,
    rows: std::ops::Range<usize>,
    heads: usize,
    h0: usize,
    nh: usize,
    d: usize,
) {
    let n = rows.len();
    assert!(
        src.len() >= nh * n * d && h0 + nh <= heads && rows.end <= len,
        "attention: group outside the heads"
    );
    let pf = super::fastmath::PREFETCH_ROWS;
    for r in 0..nh {
        for (i, row) in rows.clone().enumerate() {
            if i + pf < n {
                // the rows a stride apart in fresh memory: ask for them early
                let ahead = ((bi * len + row + pf) * heads + h0 + r) * d;
                super::fastmath::prefetch_w(dst.wrapping_add(ahead), d);
            }
            // SAFETY: the caller's contract; the source row is inside `src`.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    src[(r * n + i) * d..].as_ptr(),
                    dst.add((bi * len + row) * heads * d + (h0 + r) * d),
                    d,
                )
            };
        }
    }
}

/// Backward from the forward's `out` and `lse`: the probabilities of each
/// block of queries are recomputed (`exp(scale·q·k − lse)`), never kept.
/// Returns `(dq, dk, dv)` in the layouts of `q, k, v`.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    sh: &AttnShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    dout: &[f32],
    seg: Option<&[u32]>,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let AttnShape {
        b,
        q_len,
        k_len,
        q_offset,
        heads,
        d,
        ..
    } = *sh;
    assert_eq!(out.len(), dout.len());
    assert_eq!(lse.len(), b * heads * q_len);
    if super::attention_amx::usable(sh) {
        return super::attention_amx::backward(sh, q, k, v, out, lse, dout, seg);
    }
    let n_rep = sh.n_rep();
    let scale = sh.scale();
    let hd = heads * d;
    // Per (batch, kv head) group and part of its query blocks (as the tile
    // path splits them, `query_parts`): dq of the part's rows of its n_rep
    // query heads, and the part's dk, dv (every key row; a group sums its
    // parts' in part order).
    let parts = query_parts(q_len.div_ceil(Q_BLOCK));
    let part_grads = |bi: usize, kvh: usize, blocks: Range<usize>| -> PartGrads {
        super::in_task(|| {
            let part = part_rows(&blocks, q_len);
            let np = part.len();
            let mut dq = vec![0f32; n_rep * np * d];
            let mut dk = vec![0f32; k_len * d];
            let mut dv = vec![0f32; k_len * d];
            let mut p: Vec<f32> = Vec::new();
            let mut dp: Vec<f32> = Vec::new();
            for r in 0..n_rep {
                let hi = kvh * n_rep + r;
                for i0 in part.clone().step_by(Q_BLOCK) {
                    let i1 = (i0 + Q_BLOCK).min(q_len);
                    let rows = i1 - i0;
                    let (ks, ke) = sh.key_range(seg, bi, i0, i1);
                    let kl = ke - ks;
                    if kl == 0 {
                        continue;
                    }
                    p.resize(rows * kl, 0.0);
                    dp.resize(rows * kl, 0.0);
                    let mut qv = sh.q_view(q, bi, hi);
                    qv.off += i0 * qv.rs;
                    let mut dov = sh.q_view(dout, bi, hi);
                    dov.off += i0 * dov.rs;
                    let mut kt = sh.kv_view(k, bi, kvh, true);
                    kt.off += ks * kt.cs;
                    let mut vt = sh.kv_view(v, bi, kvh, true);
                    vt.off += ks * vt.cs;
                    // P = exp(scale · Q Kᵀ − lse) on visible keys.
                    gemm_view(rows, kl, d, qv, kt, &mut p, 0, kl, false, scale);
                    let starts = sh.run_starts(seg, bi, q_offset + i0..q_offset + i1);
                    for (rr, row) in p.chunks_mut(kl).enumerate() {
                        let qi = q_offset + i0 + rr;
                        let l = lse[(bi * heads + hi) * q_len + i0 + rr];
                        if l == f32::NEG_INFINITY {
                            row.fill(0.0);
                            continue;
                        }
                        sh.mask_row(starts[rr], qi, ks, row);
                        fastmath::exp_shift_sum(row, l);
                    }
                    // dP = dO Vᵀ
                    gemm_view(rows, kl, d, dov, vt, &mut dp, 0, kl, false, 1.0);
                    // dV += Pᵀ dO
                    gemm_view(
                        kl,
                        d,
                        rows,
                        View::mat(&p, kl, rows, true),
                        dov,
                        &mut dv,
                        ks * d,
                        d,
                        true,
                        1.0,
                    );
                    // dS = P ⊙ (dP − rowsum(dO ⊙ O))
                    for rr in 0..rows {
                        let at = (bi * q_len + i0 + rr) * hd + hi * d;
                        let dsum: f32 = dout[at..at + d]
                            .iter()
                            .zip(&out[at..at + d])
                            .map(|(a, b)| a * b)
                            .sum();
                        let pr = &p[rr * kl..(rr + 1) * kl];
                        let dr = &mut dp[rr * kl..(rr + 1) * kl];
                        dr.iter_mut()
                            .zip(pr)
                            .for_each(|(x, pv)| *x = pv * (*x - dsum));
                    }
                    // dQ = scale · dS K ; dK += scale · dSᵀ Q
                    let mut kn = sh.kv_view(k, bi, kvh, false);
                    kn.off += ks * kn.rs;
                    gemm_view(
                        rows,
                        d,
                        kl,
                        View::mat(&dp, rows, kl, false),
                        kn,
                        &mut dq,
                        (r * np + i0 - part.start) * d,
                        d,
                        false,
                        scale,
                    );
                    gemm_view(
                        kl,
                        d,
                        rows,
                        View::mat(&dp, kl, rows, true),
                        qv,
                        &mut dk,
                        ks * d,
                        d,
                        true,
                        scale,
                    );
                }
            }
            (dq, dk, dv)
        })
    };
    backward_in_parts(sh, &parts, |bi, kvh, run| {
        run(&|blocks| part_grads(bi, kvh, blocks))
    })
}

/// One part's gradients: `dq` of its query rows (`[n_rep][rows][d]`), and
/// `dK`, `dV` over (at least) the keys it sees.
pub(crate) type PartGrads = (Vec<f32>, Vec<f32>, Vec<f32>);

/// A part's gradients from its query blocks.
pub(crate) type PartFn<'a> = dyn Fn(Range<usize>) -> PartGrads + Sync + 'a;

/// The frame of both backwards (this f32 one and the tiles'): per (batch
/// row, kv head) group in parallel, `group(bi, kvh, run)` prepares what the
/// group's parts share and calls `run` once with its part function; every
/// part writes its `dq` rows in its own task, the group its kv head's `dK`,
/// `dV`, the parts' summed in part order ([`sum_parts`]): no zeroed
/// outputs, no serial scatter after the parallel region. Returns `(dq, dk,
/// dv)` laid out as `q`, `k`, `v`.
pub(crate) fn backward_in_parts(
    sh: &AttnShape,
    parts: &[Range<usize>],
    group: impl Fn(usize, usize, &mut dyn FnMut(&PartFn)) + Sync,
) -> PartGrads {
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
    let (mut dq, mut dk, mut dv) = (
        Vec::<f32>::with_capacity(b * q_len * heads * d),
        Vec::<f32>::with_capacity(b * k_len * kv_heads * d),
        Vec::<f32>::with_capacity(b * k_len * kv_heads * d),
    );
    let (pq, pk, pv) = (
        super::amx::SendPtr(dq.as_mut_ptr()),
        super::amx::SendPtr(dk.as_mut_ptr()),
        super::amx::SendPtr(dv.as_mut_ptr()),
    );
    let written = std::sync::atomic::AtomicUsize::new(0);
    (0..b * kv_heads).into_par_iter().for_each(|g| {
        let (bi, kvh) = (g / kv_heads, g % kv_heads);
        let mut done = false;
        group(bi, kvh, &mut |part: &PartFn| {
            assert!(!done, "backward_in_parts: a group ran its parts twice");
            let run = |p: usize| {
                let (gq, gk, gv) = part(parts[p].clone());
                // SAFETY: these rows of heads kvh·n_rep.. of batch row bi
                // are this part's alone, inside the capacity.
                unsafe {
                    write_head_rows(
                        pq.get(),
                        &gq,
                        bi,
                        q_len,
                        part_rows(&parts[p], q_len),
                        heads,
                        kvh * n_rep,
                        n_rep,
                        d,
                    )
                };
                (gk, gv)
            };
            let (gk, gv) = sum_parts(run_parts(parts.len(), run), k_len * d);
            // SAFETY: kv head kvh of batch row bi is this group's alone,
            // inside the capacities.
            unsafe {
                write_heads(pk.get(), &gk, bi, k_len, kv_heads, kvh, 1, d);
                write_heads(pv.get(), &gv, bi, k_len, kv_heads, kvh, 1, d);
            }
            done = true;
        });
        assert!(done, "backward_in_parts: a group did not run its parts");
        written.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    });
    assert_eq!(written.into_inner(), b * kv_heads);
    // SAFETY: every group ran its parts once (asserted): each its n_rep
    // heads of every query row (the parts cover the rows) and its kv head
    // of every key row.
    unsafe {
        dq.set_len(b * q_len * heads * d);
        dk.set_len(b * k_len * kv_heads * d);
        dv.set_len(b * k_len * kv_heads * d);
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
            ..
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
        let (out, lse) = forward(&sh, &q, &k, &v, seg);
        let f64v = |x: &[f32]| x.iter().map(|v| *v as f64).collect::<Vec<_>>();
        let (q64, k64, v64) = (f64v(&q), f64v(&k), f64v(&v));
        assert!((dot(&out, &g) - loss_ref(&sh, &q64, &k64, &v64, seg, &g)).abs() < 1e-4);
        let (dq, dk, dv) = backward(&sh, &q, &k, &v, &out, &lse, &g, seg);
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
    fn slice_masks_equal_the_element_by_element_rule_with_windows_and_segments() {
        for window in [None, Some(1), Some(3), Some(40)] {
            let sh = AttnShape {
                b: 1,
                q_len: 64,
                k_len: 64,
                q_offset: 0,
                heads: 1,
                kv_heads: 1,
                d: 1,
                window,
                bf16: false,
            };
            // segment runs: none, one, uneven runs of a packed row
            let runs: Vec<u32> = [1usize, 12, 3, 20, 28]
                .iter()
                .enumerate()
                .flat_map(|(id, &n)| std::iter::repeat_n(id as u32, n))
                .collect();
            let halves: Vec<u32> = (0..64).map(|i| (i / 32) as u32).collect();
            for seg in [None, Some(&halves[..]), Some(&runs[..])] {
                for qi in 0..64 {
                    for ks in [0, 1, 5, 30, 63] {
                        for n in [0, 1, 7, 64 - ks] {
                            let mut row = vec![1f32; n];
                            sh.mask_row(sh.run_start(seg, 0, qi), qi, ks, &mut row);
                            for (j, v) in row.iter().enumerate() {
                                let want = if sh.visible(seg, 0, qi, ks + j) {
                                    1.0
                                } else {
                                    f32::NEG_INFINITY
                                };
                                assert_eq!(
                                    *v,
                                    want,
                                    "window {window:?} seg {} qi {qi} ks {ks} j {j}",
                                    seg.is_some()
                                );
                            }
                        }
                    }
                }
                // a run's bounds, and the starts of a range as one scan
                for r0 in [0, 1, 13, 40] {
                    let starts = sh.run_starts(seg, 0, r0..64);
                    for (i, &a) in (r0..64).zip(&starts) {
                        assert_eq!(a, sh.run_start(seg, 0, i), "start of {i} from {r0}");
                    }
                }
                for i in 0..64 {
                    let (a, e) = (sh.run_start(seg, 0, i), sh.run_end(seg, 0, i));
                    assert!(a <= i && i < e, "run of {i}: {a}..{e}");
                    let id = seg.map(|s| s[i]);
                    assert!((a..e).all(|j| seg.map(|s| s[j]) == id));
                    assert!(a == 0 || seg.unwrap()[a - 1] != id.unwrap());
                    assert!(e == 64 || seg.unwrap()[e] != id.unwrap());
                }
            }
        }
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
            bf16: false,
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
        let (o2, _) = forward(&windowed, &q, &k, &k, None);
        assert!(max_abs_diff(&o1, &o2) > 1e-3);
        // Query 6 cannot see key 3 with window 3: changing key 3 changes
        // nothing at query 6 (but does at query 5).
        let mut k2 = k.clone();
        k2[(3 * 2) * 8..(3 * 2 + 2) * 8]
            .iter_mut()
            .for_each(|x| *x += 1.0);
        let (o3, _) = forward(&windowed, &q, &k2, &k2, None);
        assert_eq!(&o3[6 * 32..7 * 32], &o2[6 * 32..7 * 32]);
        assert!(max_abs_diff(&o3[5 * 32..6 * 32], &o2[5 * 32..6 * 32]) > 1e-4);
    }

    #[test]
    fn blocked_attention_with_many_queries_matches_reference_and_gradients() {
        // More queries than one block, GQA, a window that cuts inside blocks, segments.
        let sh = AttnShape {
            b: 1,
            q_len: 150,
            k_len: 150,
            q_offset: 0,
            heads: 2,
            kv_heads: 1,
            d: 4,
            window: None,
            bf16: false,
        };
        check(sh, None);
        check(
            AttnShape {
                window: Some(70),
                ..sh
            },
            None,
        );
        check(sh, Some((0..150).map(|i| (i / 40) as u32).collect()));
        // long enough for several parts of a group's queries (query_parts)
        let long = AttnShape {
            q_len: 600,
            k_len: 600,
            heads: 3,
            ..sh
        };
        assert!(query_parts(600usize.div_ceil(Q_BLOCK)).len() > 1);
        check(long, None);
        check(
            AttnShape {
                window: Some(130),
                ..long
            },
            Some((0..600).map(|i| (i / 250) as u32).collect()),
        );
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
            bf16: false,
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
