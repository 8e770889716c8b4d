//! Causal attention's products on AMX bf16 tiles (bf16 compute mode): the
//! same blocked algorithm as [`super::attention`] — scores of one block of
//! queries, masked softmax and its log-sum-exp in f32, probabilities
//! recomputed in the backward — with the five products (`Q Kᵀ`, `P V`,
//! `dO Vᵀ`, `Pᵀ dO`, `dS K`, `dSᵀ Q`) taking bf16 operands and accumulating
//! in f32, as torch's bf16 attention does.
//!
//! Work is split per (batch row, kv head): its `n_rep` query heads are
//! stacked into one block of rows (`n_rep × 64` queries), so that K and V are
//! packed into tiles once per group and every product has at least 64 rows.
//! Used for the training shape only (no KV cache offset, no sliding window);
//! [`usable`] says when.

use std::ops::Range;

use rayon::prelude::*;

use super::amx::{
    self, pack_a, pack_b_forward, pack_b_pairs, product, put_a_row, round_up, to_bf16_padded,
    TileBuf, TILE_U16,
};
use super::attention::{part_rows, query_parts, run_parts, softmax_row, AttnShape, Q_BLOCK};
use super::fastmath;

/// A slice of `n` floats from `v`, grown (zero-filled) only when `v` is too
/// short: the callers overwrite every element they use, so the buffers are
/// reused from block to block and call to call without clearing them (a
/// zeroed allocation per block was ~9% of the attention's time).
fn grow(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if v.len() < n {
        v.resize(n, 0.0);
    }
    &mut v[..n]
}

/// Per-thread buffers of a group's blocks, kept between calls: f32 ones,
/// and the packed bf16 operands (every user rewrites what it reads; fresh
/// zeroed ones per group and block were ~10% of the attention's samples).
#[derive(Default)]
struct Bufs {
    q: Vec<f32>,
    d: Vec<f32>,
    s: Vec<f32>,
    t: Vec<f32>,
    o: Vec<f32>,
    /// dO / Q as row-pair B operands.
    pairs: TileBuf,
    /// The backward's B panels of the stacked queries and output gradients.
    bq: TileBuf,
    bdo: TileBuf,
    /// Packed A operands.
    a1: TileBuf,
    a2: TileBuf,
    a4: TileBuf,
    a5: TileBuf,
    /// dSᵀ as the B operand along keys.
    bds: TileBuf,
}

thread_local! {
    static BUFS: std::cell::RefCell<Bufs> = std::cell::RefCell::new(Bufs::default());
}

/// Runs `f` with this thread's [`Bufs`] (taken out while in use, so a
/// nested call just starts with empty ones).
fn with_bufs<R>(f: impl FnOnce(&mut Bufs) -> R) -> R {
    super::with_thread_local(&BUFS, f)
}

/// A group's K and V packed once for all its parts ([`query_parts`]), which
/// read prefixes of them (the keys each part sees): for the forward K as B
/// panels and V as row pairs, for the backward K, V and Kᵀ as A operands.
/// Per thread and kept between calls, apart from [`Bufs`] so that parts
/// running on the packing thread keep their own scratch.
#[derive(Default)]
struct GroupPacks {
    kpan: TileBuf,
    vpair: TileBuf,
    /// k-steps of `vpair`.
    vks: usize,
    ak: TileBuf,
    av: TileBuf,
    akt: TileBuf,
}

thread_local! {
    static GROUP_PACKS: std::cell::RefCell<GroupPacks> =
        std::cell::RefCell::new(GroupPacks::default());
}

impl GroupPacks {
    /// The forward's packs of group (`bi`, `kvh`).
    fn forward(&mut self, sh: &AttnShape, k: &[f32], v: &[f32], bi: usize, kvh: usize) {
        let (d, s) = (sh.d, sh.q_len);
        let kvd = sh.kv_heads * d;
        let base = bi * s * kvd;
        pack_rows_forward(&k[base..], s, d, kvd, kvh * d, &mut self.kpan);
        self.vks = pack_b_pairs(
            &v[base + kvh * d..],
            s,
            d,
            kvd,
            round_up(s, 32),
            &mut self.vpair,
        );
    }

    /// The backward's packs of group (`bi`, `kvh`).
    fn backward(&mut self, sh: &AttnShape, k: &[f32], v: &[f32], bi: usize, kvh: usize) {
        let (d, s) = (sh.d, sh.q_len);
        let kvd = sh.kv_heads * d;
        let base = bi * s * kvd;
        let kpd = round_up(d, 32);
        let kt = transpose(&k[base..], s, d, kvd, kvh * d);
        pack_a(&k[base..], s, d, kvd, kvh * d, kpd, &mut self.ak);
        pack_a(&v[base..], s, d, kvd, kvh * d, kpd, &mut self.av);
        pack_a(&kt, d, s, s, 0, round_up(s, 32), &mut self.akt);
    }
}

/// Runs `f` with this thread's [`GroupPacks`] (taken out while in use).
fn with_group_packs<R>(f: impl FnOnce(&mut GroupPacks) -> R) -> R {
    super::with_thread_local(&GROUP_PACKS, f)
}

/// Whether [`forward`] / [`backward`] handle `sh` (else the f32 path).
pub fn usable(sh: &AttnShape) -> bool {
    sh.bf16
        // a sliding window no shorter than the keys masks nothing (Mistral
        // v0.1's 4096 at every length we train), so causal is all there is
        && sh.window.is_none_or(|w| w >= sh.k_len)
        && sh.q_offset == 0
        && sh.q_len == sh.k_len
        && sh.d > 0
        && sh.kv_heads > 0
        && amx::available()
}

/// Rows `0..nr` of a strided f32 matrix (`d` columns from `col0`, row stride
/// `ld`) as B panels for `X · rowsᵀ` (the forward layout): per 32 rows,
/// `[2 streams][ceil(d/32)][512]`.
fn pack_rows_forward(src: &[f32], nr: usize, d: usize, ld: usize, col0: usize, out: &mut TileBuf) {
    let ksd = d.div_ceil(32);
    let per = 2 * ksd * TILE_U16;
    out.resize(nr.div_ceil(32) * per);
    let mut rows = vec![0u16; 32 * d];
    for (p, panel) in out.chunks_mut(per).enumerate() {
        let nn = 32.min(nr - p * 32);
        for r in 0..nn {
            let at = (p * 32 + r) * ld + col0;
            if p * 32 + r + fastmath::PREFETCH_ROWS < nr {
                fastmath::prefetch(src[at + fastmath::PREFETCH_ROWS * ld..].as_ptr(), d);
            }
            fastmath::to_bf16(&src[at..at + d], &mut rows[r * d..(r + 1) * d]);
        }
        pack_b_forward(&rows[..nn * d], nn, d, ksd, panel);
    }
}

/// Rows `jp`, `jp + 1` (`jp` even) of a [`pack_b_pairs`] layout with
/// `ksteps` k-steps from two bf16 rows (`lo`, `hi`: every column of the
/// padded layout): each group of 16 columns is one 64-byte tile row of
/// interleaved pairs.
fn put_b_pair(b: &mut [u16], jp: usize, ksteps: usize, lo: &[u16], hi: &[u16]) {
    let stream = ksteps * TILE_U16;
    let (ks, q) = (jp / 32, (jp % 32) / 2);
    for (g, (l, h)) in lo.chunks_exact(16).zip(hi.chunks_exact(16)).enumerate() {
        let (nb, s) = (g / 2, g % 2);
        let dst = &mut b[(nb * 2 + s) * stream + ks * TILE_U16 + q * 32..][..32];
        for jj in 0..16 {
            dst[2 * jj] = l[jj];
            dst[2 * jj + 1] = h[jj];
        }
    }
}

/// One group's stacked queries into `g` (`[n_rep·rows, d]`, every element
/// written): row `r·rows + ii` = `scale · q` of head `kvh·n_rep + r`, query
/// `i0 + ii`.
#[allow(clippy::too_many_arguments)]
fn gather(
    sh: &AttnShape,
    x: &[f32],
    bi: usize,
    kvh: usize,
    i0: usize,
    rows: usize,
    scale: f32,
    g: &mut [f32],
) {
    let (d, hd, n_rep) = (sh.d, sh.heads * sh.d, sh.heads / sh.kv_heads);
    assert_eq!(g.len(), n_rep * rows * d);
    for r in 0..n_rep {
        let hi = kvh * n_rep + r;
        for ii in 0..rows {
            let at = (bi * sh.q_len + i0 + ii) * hd + hi * d;
            if ii + fastmath::PREFETCH_ROWS < rows {
                fastmath::prefetch(x[at + fastmath::PREFETCH_ROWS * hd..].as_ptr(), d);
            }
            let dst = &mut g[(r * rows + ii) * d..][..d];
            dst.iter_mut()
                .zip(&x[at..at + d])
                .for_each(|(o, v)| *o = v * scale);
        }
    }
}

/// `C[m, n] = A · Rᵀ` into `c` (`m·n`, overwritten): A packed ([`pack_a`],
/// its first `m` rows, `kp` columns), R's `n` rows as [`pack_rows_forward`]
/// panels.
fn times_rows(a: &[u16], kp: usize, m: usize, panels: &[u16], n: usize, c: &mut [f32]) {
    assert_eq!(c.len(), m * n);
    // a forward-layout panel is a 32-column block of two streams of kp/32 tiles
    mul(a, kp, m, panels, kp / 32, kp / 32, c, n, false);
}

/// `C[m, n] = A · B` with A packed (`mp`, `kp`, its first `ks` k-steps) and
/// B in blocks of 32 columns, each two streams of `bstride` tiles.
#[allow(clippy::too_many_arguments)]
fn mul(
    a: &[u16],
    kp: usize,
    m: usize,
    b: &[u16],
    ks: usize,
    bstride: usize,
    c: &mut [f32],
    n: usize,
    acc: bool,
) {
    mul_from(a, kp, m, 0, b, ks, bstride, c, n, acc)
}

/// [`mul`] over A's k-steps `ks0..ks0 + ks`.
#[allow(clippy::too_many_arguments)]
fn mul_from(
    a: &[u16],
    kp: usize,
    m: usize,
    ks0: usize,
    b: &[u16],
    ks: usize,
    bstride: usize,
    c: &mut [f32],
    n: usize,
    acc: bool,
) {
    let mp = round_up(m, 32);
    for nb in 0..n.div_ceil(32) {
        let nn = 32.min(n - nb * 32);
        product(
            a,
            kp,
            mp,
            m,
            ks0,
            &b[nb * 2 * bstride * TILE_U16..],
            ks,
            bstride,
            &mut c[nb * 32..],
            n,
            nn,
            acc,
        );
    }
}

/// The scores of a group's stacked queries against keys `k0..kl` into `s`
/// (`[m, kl - k0]`, scale folded into `qg`; `kpan`: the panels from key
/// `k0`), masked, soft-maxed to probabilities, which also go into `ap` as
/// bf16 (the A operand of `P V`, [`pack_a`]'s layout with `round_up(kl -
/// k0, 32)` columns) while each row is in L1; returns their log-sum-exp per
/// row.
#[allow(clippy::too_many_arguments)]
fn probabilities(
    sh: &AttnShape,
    seg: Option<&[u32]>,
    bi: usize,
    i0: usize,
    rows: usize,
    aq: &[u16],
    kpan: &[u16],
    k0: usize,
    kl: usize,
    s: &mut [f32],
    ap: &mut TileBuf,
) -> Vec<f32> {
    let mq = (sh.heads / sh.kv_heads) * rows;
    let nk = kl - k0;
    times_rows(aq, round_up(sh.d, 32), mq, kpan, nk, s);
    let kpk = round_up(nk, 32);
    ap.resize(round_up(mq, 32) * kpk);
    let mut bf = vec![0u16; kpk];
    let mut l_out = vec![0f32; mq];
    let starts = sh.run_starts(seg, bi, i0..i0 + rows);
    for (row_i, row) in s.chunks_mut(nk).enumerate() {
        let qi = i0 + row_i % rows;
        sh.mask_row(starts[row_i % rows], qi, k0, row);
        l_out[row_i] = softmax_row(row);
        to_bf16_padded(row, &mut bf);
        put_a_row(ap, row_i, kpk, &bf);
    }
    bf.fill(0);
    for r in mq..round_up(mq, 32) {
        put_a_row(ap, r, kpk, &bf);
    }
    l_out
}

/// Forward of one whole (batch row, kv head) group, or of its query blocks
/// `blocks` alone: `(o [n_rep][rows][d], lse [n_rep][rows])` for their
/// [`part_rows`]. (The reference the parts are tested against.)
#[cfg(test)]
#[allow(clippy::too_many_arguments)]
fn forward_group(
    sh: &AttnShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    seg: Option<&[u32]>,
    bi: usize,
    kvh: usize,
    blocks: Range<usize>,
) -> (Vec<f32>, Vec<f32>) {
    with_group_packs(|gp| {
        gp.forward(sh, k, v, bi, kvh);
        forward_part(sh, q, seg, bi, kvh, blocks, gp)
    })
}

/// [`forward_group`] of the query blocks `blocks` on the group's packs.
fn forward_part(
    sh: &AttnShape,
    q: &[f32],
    seg: Option<&[u32]>,
    bi: usize,
    kvh: usize,
    blocks: Range<usize>,
    gp: &GroupPacks,
) -> (Vec<f32>, Vec<f32>) {
    let (d, s, n_rep) = (sh.d, sh.q_len, sh.heads / sh.kv_heads);
    let kpd = round_up(d, 32);
    let part = part_rows(&blocks, s);
    let np = part.len();
    let mut o = vec![0f32; n_rep * np * d];
    let mut lse = vec![0f32; n_rep * np];
    with_bufs(|b| {
        let (kpan, vpair, vks) = (&gp.kpan, &gp.vpair, gp.vks);
        let (aq, ap) = (&mut b.a1, &mut b.a2);
        // a forward-layout panel: 32 keys, two streams of kpd/32 tiles
        let per = 2 * (kpd / 32) * TILE_U16;
        for i0 in part.clone().step_by(Q_BLOCK) {
            let rows = Q_BLOCK.min(s - i0);
            let kl = i0 + rows;
            // no key before the block's first segment run (whole panels)
            let k0 = sh.run_start(seg, bi, i0) / 32 * 32;
            let mq = n_rep * rows;
            let qg = grow(&mut b.q, mq * d);
            gather(sh, q, bi, kvh, i0, rows, sh.scale(), qg);
            pack_a(qg, mq, d, d, 0, kpd, aq);
            let p = grow(&mut b.s, mq * (kl - k0));
            let kp = &kpan[k0 / 32 * per..];
            let l = probabilities(sh, seg, bi, i0, rows, aq, kp, k0, kl, p, ap);
            let kpk = round_up(kl - k0, 32);
            let og = grow(&mut b.o, mq * d);
            let vp = &vpair[k0 / 32 * TILE_U16..];
            mul(ap, kpk, mq, vp, kpk / 32, vks, og, d, false);
            for r in 0..n_rep {
                for ii in 0..rows {
                    let at = r * np + i0 - part.start + ii;
                    o[at * d..][..d].copy_from_slice(&og[(r * rows + ii) * d..][..d]);
                    lse[at] = l[r * rows + ii];
                }
            }
        }
    });
    (o, lse)
}

/// Same contract as [`super::attention::forward`], for shapes [`usable`] accepts.
pub fn forward(
    sh: &AttnShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    seg: Option<&[u32]>,
) -> (Vec<f32>, Vec<f32>) {
    assert!(usable(sh), "attention on AMX: shape not supported");
    let (b, s, heads, kvh, d) = (sh.b, sh.q_len, sh.heads, sh.kv_heads, sh.d);
    assert_eq!(q.len(), b * s * heads * d);
    assert_eq!(k.len(), b * s * kvh * d);
    assert_eq!(v.len(), k.len());
    let n_rep = heads / kvh;
    let parts = query_parts(s.div_ceil(Q_BLOCK));
    let np = parts.len();
    // Each part of a group writes its heads' columns of `out` and rows of
    // `lse` in its own task (every element once): no zeroed outputs, no
    // serial scatter. (A part's rows are computed as in the whole group:
    // the same bits however the queries are split.)
    let mut out = Vec::<f32>::with_capacity(q.len());
    let mut lse = Vec::<f32>::with_capacity(b * heads * s);
    let (po, pl) = (
        amx::SendPtr(out.as_mut_ptr()),
        amx::SendPtr(lse.as_mut_ptr()),
    );
    (0..b * kvh).into_par_iter().for_each(|g| {
        let (bi, kv) = (g / kvh, g % kvh);
        with_group_packs(|gp| {
            gp.forward(sh, k, v, bi, kv);
            let gp = &*gp;
            let task = |p: usize| {
                let rows = part_rows(&parts[p], s);
                let (og, lg) =
                    super::in_task(|| forward_part(sh, q, seg, bi, kv, parts[p].clone(), gp));
                // SAFETY: rows `rows` of heads kv·n_rep.. of batch row bi are
                // this part's alone, inside the capacities.
                unsafe {
                    super::attention::write_head_rows(
                        po.get(),
                        &og,
                        bi,
                        s,
                        rows.clone(),
                        heads,
                        kv * n_rep,
                        n_rep,
                        d,
                    );
                    // lse is [b][heads][s]
                    for r in 0..n_rep {
                        std::ptr::copy_nonoverlapping(
                            lg[r * rows.len()..].as_ptr(),
                            pl.get().add((bi * heads + kv * n_rep + r) * s + rows.start),
                            rows.len(),
                        );
                    }
                }
            };
            run_parts(np, task);
        })
    });
    // SAFETY: the b·kvh groups wrote every head of every row, and every lse.
    unsafe {
        out.set_len(q.len());
        lse.set_len(b * heads * s);
    }
    (out, lse)
}

/// Rows `0..rows` of a strided matrix (`cols` values from `col0`, row stride
/// `ld`) transposed into `[cols, rows]`, in 16×16 blocks.
fn transpose(src: &[f32], rows: usize, cols: usize, ld: usize, col0: usize) -> Vec<f32> {
    const B: usize = 16;
    let mut t = vec![0f32; rows * cols];
    for r0 in (0..rows).step_by(B) {
        for r in r0 + B..(r0 + 2 * B).min(rows) {
            fastmath::prefetch(src[r * ld + col0..].as_ptr(), cols);
        }
        for c0 in (0..cols).step_by(B) {
            for r in r0..(r0 + B).min(rows) {
                for c in c0..(c0 + B).min(cols) {
                    t[c * rows + r] = src[r * ld + col0 + c];
                }
            }
        }
    }
    t
}

/// Per stacked query `c` of a block (`n_rep` heads × `rows` queries from
/// `i0`): its lse, `+∞` where it sees nothing so that its probabilities
/// come out 0, and `Σ dO ⊙ O`.
#[allow(clippy::too_many_arguments)]
fn block_stats(
    sh: &AttnShape,
    out: &[f32],
    lse: &[f32],
    dout: &[f32],
    bi: usize,
    kvh: usize,
    i0: usize,
    rows: usize,
) -> (Vec<f32>, Vec<f32>) {
    let (d, s, heads, n_rep) = (sh.d, sh.q_len, sh.heads, sh.heads / sh.kv_heads);
    let hd = heads * d;
    let mq = n_rep * rows;
    let mut shift = vec![0f32; mq];
    let mut dsum = vec![0f32; mq];
    for c in 0..mq {
        let (r, ii) = (c / rows, c % rows);
        let hi = kvh * n_rep + r;
        let l = lse[(bi * heads + hi) * s + i0 + ii];
        shift[c] = if l == f32::NEG_INFINITY {
            f32::INFINITY
        } else {
            l
        };
        let at = (bi * s + i0 + ii) * hd + hi * d;
        if ii + fastmath::PREFETCH_ROWS < rows {
            fastmath::prefetch(dout[at + fastmath::PREFETCH_ROWS * hd..].as_ptr(), d);
            fastmath::prefetch(out[at + fastmath::PREFETCH_ROWS * hd..].as_ptr(), d);
        }
        dsum[c] = fastmath::dot(&dout[at..at + d], &out[at..at + d]);
    }
    (shift, dsum)
}

/// Key `j`'s key-major row of a block's scores (`n_rep` heads × `rows`
/// queries from `i0`): −∞ where a query does not see the key. Key `j` is
/// seen by the queries from `j` to `run_end`, the end of its segment run
/// ([`KeyRunEnd`]), and of its window: two slice fills per head.
fn mask_key_row(sh: &AttnShape, run_end: usize, i0: usize, rows: usize, j: usize, row: &mut [f32]) {
    let end = run_end.min(sh.window.map_or(usize::MAX, |w| j.saturating_add(w)));
    let lo = j.saturating_sub(i0).min(rows);
    let hi = end.saturating_sub(i0).clamp(lo, rows);
    for blk in row.chunks_mut(rows) {
        blk[..lo].fill(f32::NEG_INFINITY);
        blk[hi..].fill(f32::NEG_INFINITY);
    }
}

/// The end of the segment run of keys taken in increasing order: found
/// once per run (a key before the last one's end is in its run), not by a
/// scan per key row of every block.
struct KeyRunEnd<'a> {
    sh: &'a AttnShape,
    seg: Option<&'a [u32]>,
    bi: usize,
    end: usize,
}

impl<'a> KeyRunEnd<'a> {
    fn new(sh: &'a AttnShape, seg: Option<&'a [u32]>, bi: usize) -> Self {
        KeyRunEnd {
            sh,
            seg,
            bi,
            end: 0,
        }
    }

    /// The run end of key `j` (keys asked in increasing order).
    fn of(&mut self, j: usize) -> usize {
        if j >= self.end {
            self.end = self.sh.run_end(self.seg, self.bi, j);
        }
        self.end
    }
}

/// A block's rows of the group's `dq` (`[n_rep][s][d]`): `scale · dQ` from
/// `dQᵀ` (`[d, n_rep·rows]`).
fn write_dq(dq: &mut [f32], dqt: &[f32], s: usize, i0: usize, rows: usize, d: usize, scale: f32) {
    const B: usize = 16;
    let mq = dqt.len() / d.max(1);
    // in 16 x 16 tiles: each reads 16 lines of dQᵀ and writes 16 of dq
    // (column by column, every read was a line of its own: ~5% of the
    // attention's time)
    let mut tile = [[0f32; B]; B];
    for c0 in (0..mq).step_by(B) {
        let nc = B.min(mq - c0);
        for d0 in (0..d).step_by(B) {
            let nd = B.min(d - d0);
            // tile[c][k] = dQᵀ[d0 + k][c0 + c]
            for k in 0..nd {
                for (c, &v) in dqt[(d0 + k) * mq + c0..][..nc].iter().enumerate() {
                    tile[c][k] = v;
                }
            }
            for (c, trow) in tile.iter().enumerate().take(nc) {
                let (r, ii) = ((c0 + c) / rows, (c0 + c) % rows);
                let dst = &mut dq[(r * s + i0 + ii) * d + d0..][..nd];
                for (o, v) in dst.iter_mut().zip(trow) {
                    *o = scale * v;
                }
            }
        }
    }
}

/// Backward of one (batch row, kv head) group, or of its query blocks
/// `blocks` alone: `(dq [n_rep][rows][d]` for their [`part_rows`], `dk
/// [keys][d], dv [keys][d])` for the keys they see (`0..rows.end`).
///
/// Everything is computed key-major (`Sᵀ = K Qᵀ`, `Pᵀ`, `dPᵀ = V dOᵀ`,
/// `dSᵀ`): then `Pᵀ` and `dSᵀ` are the A operands of `dV = Pᵀ dO` and
/// `dK = dSᵀ Q` as they are, K and V are A operands packed once per group,
/// and only `dQᵀ = Kᵀ dSᵀ` needs K transposed (once per group). (The
/// reference the parts are tested against.)
#[cfg(test)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward_group(
    sh: &AttnShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    dout: &[f32],
    seg: Option<&[u32]>,
    bi: usize,
    kvh: usize,
    blocks: Range<usize>,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    with_group_packs(|gp| {
        gp.backward(sh, k, v, bi, kvh);
        backward_part(sh, q, out, lse, dout, seg, bi, kvh, blocks, gp)
    })
}

/// [`backward_group`] of the query blocks `blocks` on the group's packs.
#[allow(clippy::too_many_arguments)]
fn backward_part(
    sh: &AttnShape,
    q: &[f32],
    out: &[f32],
    lse: &[f32],
    dout: &[f32],
    seg: Option<&[u32]>,
    bi: usize,
    kvh: usize,
    blocks: Range<usize>,
    gp: &GroupPacks,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (d, s, n_rep) = (sh.d, sh.q_len, sh.heads / sh.kv_heads);
    let scale = sh.scale();
    let kpd = round_up(d, 32);
    let kps = round_up(s, 32);
    let part = part_rows(&blocks, s);
    // the part's queries see keys 0..part.end
    let keys = part.end;
    let mut dq = vec![0f32; n_rep * part.len() * d];
    let mut dk = vec![0f32; keys * d];
    let mut dv = vec![0f32; keys * d];
    with_bufs(|b| {
        let (ak, av, akt) = (&gp.ak, &gp.av, &gp.akt);
        let b_rows = &mut b.pairs;
        for i0 in part.clone().step_by(Q_BLOCK) {
            let rows = Q_BLOCK.min(s - i0);
            let kl = i0 + rows;
            // keys k0..kl: none before the block's first segment run (whole
            // 32-key steps, so that the group's packs are read from k0)
            let k0 = sh.run_start(seg, bi, i0) / 32 * 32;
            let nk = kl - k0;
            let mq = n_rep * rows;
            let (kpk, kpm) = (round_up(nk, 32), round_up(mq, 32));
            let qg = grow(&mut b.q, mq * d);
            gather(sh, q, bi, kvh, i0, rows, scale, qg);
            let dog = grow(&mut b.d, mq * d);
            gather(sh, dout, bi, kvh, i0, rows, 1.0, dog);
            let (shift, dsum) = block_stats(sh, out, lse, dout, bi, kvh, i0, rows);
            pack_rows_forward(qg, mq, d, d, 0, &mut b.bq);
            pack_rows_forward(dog, mq, d, d, 0, &mut b.bdo);
            let (bq, bdo) = (&b.bq, &b.bdo);
            // Sᵀ = K Qᵀ and dPᵀ = V dOᵀ, then one pass per pair of key rows:
            // Pᵀ = exp(Sᵀ − lse) (zero where the key is not visible), dSᵀ =
            // Pᵀ ⊙ (dPᵀ − Σ dO ⊙ O), written as bf16 straight into the three
            // operands that use them (Pᵀ and dSᵀ as A, dSᵀ as B along keys)
            // while the rows are in L1, instead of passes over the f32 blocks
            // for the softmax, the gradient and three packs.
            // K and V as A operands from row k0 (rows of 16, kpd wide)
            let pt = grow(&mut b.s, nk * mq);
            times_rows(&ak[k0 * kpd..], kpd, nk, bq, mq, pt);
            let dst = grow(&mut b.t, nk * mq);
            times_rows(&av[k0 * kpd..], kpd, nk, bdo, mq, dst);
            let (a_p, a_ds, b_ds) = (&mut b.a4, &mut b.a5, &mut b.bds);
            a_p.resize(kpk * kpm);
            a_ds.resize(kpk * kpm);
            b_ds.resize(kpm * kpk);
            let mut bf = [vec![0u16; kpm], vec![0u16; kpm], vec![0u16; kpm]];
            let mut ends = KeyRunEnd::new(sh, seg, bi);
            for jp in (0..kpk).step_by(2) {
                for e in 0..2 {
                    // key k0 + j
                    let j = jp + e;
                    let [p_bf, ds_lo, ds_hi] = &mut bf;
                    let ds_bf = if e == 0 { ds_lo } else { ds_hi };
                    if j >= nk {
                        p_bf.fill(0);
                        ds_bf.fill(0);
                    } else {
                        let row = &mut pt[j * mq..(j + 1) * mq];
                        mask_key_row(sh, ends.of(k0 + j), i0, rows, k0 + j, row);
                        let drow = &mut dst[j * mq..(j + 1) * mq];
                        fastmath::exp_sub_grad(row, &shift, drow, &dsum);
                        to_bf16_padded(row, p_bf);
                        to_bf16_padded(drow, ds_bf);
                    }
                    put_a_row(a_p, j, kpm, p_bf);
                    put_a_row(a_ds, j, kpm, ds_bf);
                }
                put_b_pair(b_ds, jp, kpk / 32, &bf[1], &bf[2]);
            }
            // dV[k0..kl] += Pᵀ dO ; dK[k0..kl] += dSᵀ (scale·Q)
            let ks = pack_b_pairs(dog, mq, d, d, kpm, b_rows);
            mul(
                a_p,
                kpm,
                nk,
                b_rows,
                ks,
                ks,
                &mut dv[k0 * d..kl * d],
                d,
                true,
            );
            let ks = pack_b_pairs(qg, mq, d, d, kpm, b_rows);
            mul(
                a_ds,
                kpm,
                nk,
                b_rows,
                ks,
                ks,
                &mut dk[k0 * d..kl * d],
                d,
                true,
            );
            // dQᵀ = Kᵀ dSᵀ (keys k0..kl of Kᵀ), dq = scale · dQ
            let ks = kpk / 32;
            let dqt = grow(&mut b.o, d * mq);
            mul_from(akt, kps, d, k0 / 32, b_ds, ks, ks, dqt, mq, false);
            write_dq(&mut dq, dqt, part.len(), i0 - part.start, rows, d, scale);
        }
    });
    (dq, dk, dv)
}

/// Backward of the whole attention on the tiles: per (batch row, kv head)
/// group and part of its query blocks ([`query_parts`]) a task; each part's
/// `dq` rows are its own, a group's `dK`, `dV` are the sum of its parts'
/// (the first part's, then each later one added, in part order). Returns
/// `(dq, dk, dv)` laid out as `q`, `k`, `v`.
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
    assert!(usable(sh), "attention on AMX: shape not supported");
    let (b, s, heads, kvh, d) = (sh.b, sh.q_len, sh.heads, sh.kv_heads, sh.d);
    assert_eq!(q.len(), b * s * heads * d);
    assert_eq!(k.len(), b * s * kvh * d);
    assert_eq!(v.len(), k.len());
    assert_eq!(out.len(), dout.len());
    assert_eq!(lse.len(), b * heads * s);
    let parts = query_parts(s.div_ceil(Q_BLOCK));
    // the parts of a group share its K, V, Kᵀ packs
    super::attention::backward_in_parts(sh, &parts, |bi, kv, run| {
        with_group_packs(|gp| {
            gp.backward(sh, k, v, bi, kv);
            let gp = &*gp;
            run(&|blocks| {
                super::in_task(|| backward_part(sh, q, out, lse, dout, seg, bi, kv, blocks, gp))
            })
        })
    })
}

/// [`backward_group`] as it was before its elementwise passes were fused
/// (softmax, gradient and the three packs each a pass of their own over
/// the f32 blocks), kept as the reference it must equal bit for bit.
#[cfg(test)]
#[allow(clippy::too_many_arguments)]
fn backward_group_unfused(
    sh: &AttnShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    dout: &[f32],
    seg: Option<&[u32]>,
    bi: usize,
    kvh: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (d, s, n_rep) = (sh.d, sh.q_len, sh.heads / sh.kv_heads);
    let kvd = sh.kv_heads * d;
    let scale = sh.scale();
    let base = bi * s * kvd;
    let kpd = round_up(d, 32);
    let kps = round_up(s, 32);
    let kt = transpose(&k[base..], s, d, kvd, kvh * d);
    let mut dq = vec![0f32; n_rep * s * d];
    let mut dk = vec![0f32; s * d];
    let mut dv = vec![0f32; s * d];
    with_bufs(|b| {
        let (mut ak, mut av, mut akt) = (TileBuf::new(), TileBuf::new(), TileBuf::new());
        let (ak, av, akt, a_t) = (&mut ak, &mut av, &mut akt, &mut b.a4);
        pack_a(&k[base..], s, d, kvd, kvh * d, kpd, ak);
        pack_a(&v[base..], s, d, kvd, kvh * d, kpd, av);
        pack_a(&kt, d, s, s, 0, kps, akt);
        let (ak, av, akt) = (&*ak, &*av, &*akt);
        let b_rows = &mut b.pairs;
        for i0 in (0..s).step_by(Q_BLOCK) {
            let rows = Q_BLOCK.min(s - i0);
            let kl = i0 + rows;
            let mq = n_rep * rows;
            let (kpk, kpm) = (round_up(kl, 32), round_up(mq, 32));
            let qg = grow(&mut b.q, mq * d);
            gather(sh, q, bi, kvh, i0, rows, scale, qg);
            let dog = grow(&mut b.d, mq * d);
            gather(sh, dout, bi, kvh, i0, rows, 1.0, dog);
            let (shift, dsum) = block_stats(sh, out, lse, dout, bi, kvh, i0, rows);
            pack_rows_forward(qg, mq, d, d, 0, &mut b.bq);
            pack_rows_forward(dog, mq, d, d, 0, &mut b.bdo);
            let (bq, bdo) = (&b.bq, &b.bdo);
            // Pᵀ = exp(K Qᵀ − lse), zero where the key is not visible.
            let pt = grow(&mut b.s, kl * mq);
            times_rows(ak, kpd, kl, bq, mq, pt);
            let mut ends = KeyRunEnd::new(sh, seg, bi);
            for (j, row) in pt.chunks_mut(mq).enumerate() {
                row.iter_mut().zip(&shift).for_each(|(x, l)| *x -= l);
                mask_key_row(sh, ends.of(j), i0, rows, j, row);
                fastmath::exp_shift_sum(row, 0.0);
            }
            // dSᵀ = Pᵀ ⊙ (V dOᵀ − Σ dO ⊙ O)
            let dst = grow(&mut b.t, kl * mq);
            times_rows(av, kpd, kl, bdo, mq, dst);
            for (drow, prow) in dst.chunks_mut(mq).zip(pt.chunks(mq)) {
                drow.iter_mut()
                    .zip(prow)
                    .zip(&dsum)
                    .for_each(|((x, p), ds)| *x = p * (*x - ds));
            }
            // dV[0..kl] += Pᵀ dO ; dK[0..kl] += dSᵀ (scale·Q)
            pack_a(pt, kl, mq, mq, 0, kpm, a_t);
            let ks = pack_b_pairs(dog, mq, d, d, kpm, b_rows);
            mul(a_t, kpm, kl, b_rows, ks, ks, &mut dv[..kl * d], d, true);
            pack_a(dst, kl, mq, mq, 0, kpm, a_t);
            let ks = pack_b_pairs(qg, mq, d, d, kpm, b_rows);
            mul(a_t, kpm, kl, b_rows, ks, ks, &mut dk[..kl * d], d, true);
            // dQᵀ = Kᵀ dSᵀ (keys 0..kl of Kᵀ), dq = scale · dQ
            let ks = pack_b_pairs(dst, kl, mq, mq, kpk, b_rows);
            let dqt = grow(&mut b.o, d * mq);
            mul(akt, kps, d, b_rows, ks, ks, dqt, mq, false);
            write_dq(&mut dq, dqt, s, i0, rows, d, scale);
        }
    });
    (dq, dk, dv)
}

#[cfg(test)]
mod tests {
    use super::super::attention;
    use super::super::testutil::*;
    use super::*;

    /// A causal bf16 training shape (`b` rows of `s`, `heads` / `kvh` heads of `d`).
    fn causal(b: usize, s: usize, heads: usize, kvh: usize, d: usize) -> AttnShape {
        AttnShape {
            b,
            q_len: s,
            k_len: s,
            q_offset: 0,
            heads,
            kv_heads: kvh,
            d,
            window: None,
            bf16: true,
        }
    }

    /// The AMX path against the f32 path: outputs, lse and the three
    /// gradients within bf16 precision of the operands, on GQA / MHA shapes
    /// with partial tiles (lengths and head sizes off the 32 and 64 grids)
    /// and packed segments.
    #[test]
    fn amx_attention_follows_the_f32_path_within_bf16_precision() {
        if amx::skip_without_tiles("the tile attention was") {
            return;
        }
        for &(b, s, heads, kvh, d, with_seg) in &[
            (2usize, 256usize, 9usize, 3usize, 64usize, false),
            (1, 70, 4, 2, 48, false),
            (2, 33, 2, 1, 16, true),
            (1, 130, 3, 3, 80, true),
            (1, 5, 1, 1, 8, false),
            // long enough for several parts per group (query_parts)
            (1, 600, 3, 3, 32, false),
            (2, 1030, 2, 1, 16, true),
        ] {
            let sh = causal(b, s, heads, kvh, d);
            let f32_sh = AttnShape { bf16: false, ..sh };
            let q = rand_vec(b * s * heads * d, 1, 1.5);
            let k = rand_vec(b * s * kvh * d, 2, 1.5);
            let v = rand_vec(b * s * kvh * d, 3, 1.0);
            let dout = rand_vec(b * s * heads * d, 4, 1.0);
            let seg: Option<Vec<u32>> =
                with_seg.then(|| (0..b * s).map(|i| ((i % s) / 10) as u32).collect());
            let seg = seg.as_deref();
            let (o, l) = forward(&sh, &q, &k, &v, seg);
            let (o32, l32) = attention::forward(&f32_sh, &q, &k, &v, seg);
            let rel = |a: &[f32], b: &[f32]| {
                let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
                let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
                (num / den.max(1e-30)).sqrt()
            };
            let shape = format!("b {b} s {s} heads {heads}/{kvh} d {d} seg {with_seg}");
            assert!(rel(&o, &o32) < 1e-2, "out {shape}: {}", rel(&o, &o32));
            for (x, y) in l.iter().zip(&l32) {
                assert!(
                    (x - y).abs() < 0.05 * (1.0 + y.abs()),
                    "lse {shape}: {x} vs {y}"
                );
            }
            let (dq, dk, dv) = attention::backward(&sh, &q, &k, &v, &o32, &l32, &dout, seg);
            let (dq32, dk32, dv32) =
                attention::backward(&f32_sh, &q, &k, &v, &o32, &l32, &dout, seg);
            assert!(rel(&dq, &dq32) < 2e-2, "dq {shape}: {}", rel(&dq, &dq32));
            assert!(rel(&dk, &dk32) < 2e-2, "dk {shape}: {}", rel(&dk, &dk32));
            assert!(rel(&dv, &dv32) < 2e-2, "dv {shape}: {}", rel(&dv, &dv32));
        }
    }

    /// The backward with its elementwise passes fused into one per pair of
    /// key rows gives the same bits as the passes one after the other:
    /// GQA / MHA, lengths and head sizes off the 32 and 64 grids (odd key
    /// counts: a last pair half padding), packed segments.
    #[test]
    fn fused_backward_equals_the_unfused_one_bit_for_bit() {
        if amx::skip_without_tiles("the tile attention was") {
            return;
        }
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for &(b, s, heads, kvh, d, with_seg) in &[
            (2usize, 256usize, 9usize, 3usize, 64usize, false),
            (1, 70, 4, 2, 48, false),
            (2, 33, 2, 1, 16, true),
            (1, 130, 3, 3, 80, true),
            (1, 5, 1, 1, 8, false),
            (1, 97, 8, 1, 64, false),
        ] {
            let sh = causal(b, s, heads, kvh, d);
            let q = rand_vec(b * s * heads * d, 11, 1.5);
            let k = rand_vec(b * s * kvh * d, 12, 1.5);
            let v = rand_vec(b * s * kvh * d, 13, 1.0);
            let dout = rand_vec(b * s * heads * d, 14, 1.0);
            let seg: Option<Vec<u32>> =
                with_seg.then(|| (0..b * s).map(|i| ((i % s) / 10) as u32).collect());
            let seg = seg.as_deref();
            let (o, l) = forward(&sh, &q, &k, &v, seg);
            for bi in 0..b {
                for g in 0..kvh {
                    let all = 0..s.div_ceil(Q_BLOCK);
                    let got = backward_group(&sh, &q, &k, &v, &o, &l, &dout, seg, bi, g, all);
                    let want = backward_group_unfused(&sh, &q, &k, &v, &o, &l, &dout, seg, bi, g);
                    let shape = format!(
                        "b {b} s {s} heads {heads}/{kvh} d {d} seg {with_seg}, group {bi}/{g}"
                    );
                    assert_eq!(bits(&got.0), bits(&want.0), "dq {shape}");
                    assert_eq!(bits(&got.1), bits(&want.1), "dk {shape}");
                    assert_eq!(bits(&got.2), bits(&want.2), "dv {shape}");
                    assert!(got.0.iter().chain(&got.1).chain(&got.2).any(|x| *x != 0.0));
                }
            }
        }
    }

    /// A sliding window at least as long as the keys masks nothing: such
    /// shapes take the tile path and give the window-free bits; a shorter
    /// window leaves them to the f32 path.
    #[test]
    fn a_window_no_shorter_than_the_keys_takes_the_tiles() {
        if amx::skip_without_tiles("the tile attention was") {
            return;
        }
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let (b, s, heads, kvh, d) = (2usize, 200usize, 4usize, 2usize, 32usize);
        let none = causal(b, s, heads, kvh, d);
        let q = rand_vec(b * s * heads * d, 31, 1.5);
        let k = rand_vec(b * s * kvh * d, 32, 1.5);
        let v = rand_vec(b * s * kvh * d, 33, 1.0);
        let dout = rand_vec(b * s * heads * d, 34, 1.0);
        let (o, l) = attention::forward(&none, &q, &k, &v, None);
        let grads = attention::backward(&none, &q, &k, &v, &o, &l, &dout, None);
        for w in [s, s + 1, 4096] {
            let sh = AttnShape {
                window: Some(w),
                ..none
            };
            assert!(usable(&sh), "window {w}");
            let (ow, lw) = attention::forward(&sh, &q, &k, &v, None);
            assert_eq!(bits(&ow), bits(&o), "out, window {w}");
            assert_eq!(bits(&lw), bits(&l), "lse, window {w}");
            let gw = attention::backward(&sh, &q, &k, &v, &o, &l, &dout, None);
            assert_eq!(bits(&gw.0), bits(&grads.0), "dq, window {w}");
            assert_eq!(bits(&gw.1), bits(&grads.1), "dk, window {w}");
            assert_eq!(bits(&gw.2), bits(&grads.2), "dv, window {w}");
        }
        assert!(!usable(&AttnShape {
            window: Some(s - 1),
            ..none
        }));
    }

    /// A group's query blocks in parts: contiguous, covering every block,
    /// whole up to 8 blocks, at most [`MAX_PARTS`], of near-equal causal cost.
    #[test]
    fn query_parts_cover_the_blocks_in_balanced_parts() {
        for nb in 0..80usize {
            let parts = query_parts(nb);
            assert_eq!(parts.first().unwrap().start, 0, "nb {nb}");
            assert_eq!(parts.last().unwrap().end, nb, "nb {nb}");
            for w in parts.windows(2) {
                assert_eq!(w[0].end, w[1].start, "nb {nb}: {parts:?}");
                assert!(!w[0].is_empty(), "nb {nb}: {parts:?}");
            }
            assert!(parts.len() <= super::super::attention::MAX_PARTS);
            if nb <= 8 {
                assert_eq!(parts.len(), 1, "nb {nb}");
            } else {
                assert!(parts.len() >= 2, "nb {nb}");
                // each part's cost within one block's worth (its last
                // block's keys) of an equal share
                let cost = |r: &Range<usize>| r.clone().map(|j| j + 1).sum::<usize>();
                let share = nb * (nb + 1) / 2 / parts.len();
                for r in &parts {
                    assert!(cost(r).abs_diff(share) <= nb + 1, "nb {nb}: {parts:?}");
                }
            }
        }
        assert_eq!(query_parts(16), vec![0..8, 8..11, 11..14, 14..16]);
    }

    /// Splitting a group's queries into parts leaves the forward's bits and
    /// `dq`'s as they are; `dK`, `dV` become a sum over the parts (another
    /// order of the same f32 additions): equal within f32 rounding.
    #[test]
    fn query_parts_give_the_whole_groups_results() {
        if amx::skip_without_tiles("the tile attention was") {
            return;
        }
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for &(b, s, heads, kvh, d, with_seg) in &[
            (1usize, 600usize, 3usize, 3usize, 64usize, false),
            (2, 1030, 4, 2, 32, true),
        ] {
            let sh = causal(b, s, heads, kvh, d);
            let nb = s.div_ceil(Q_BLOCK);
            assert!(query_parts(nb).len() > 1);
            let q = rand_vec(b * s * heads * d, 21, 1.5);
            let k = rand_vec(b * s * kvh * d, 22, 1.5);
            let v = rand_vec(b * s * kvh * d, 23, 1.0);
            let dout = rand_vec(b * s * heads * d, 24, 1.0);
            let seg: Option<Vec<u32>> =
                with_seg.then(|| (0..b * s).map(|i| ((i % s) / 100) as u32).collect());
            let seg = seg.as_deref();
            let (o, l) = forward(&sh, &q, &k, &v, seg);
            let (dq, dk, dv) = backward(&sh, &q, &k, &v, &o, &l, &dout, seg);
            let n_rep = heads / kvh;
            let shape = format!("b {b} s {s} heads {heads}/{kvh} d {d}");
            for bi in 0..b {
                for g in 0..kvh {
                    let (og, lg) = forward_group(&sh, &q, &k, &v, seg, bi, g, 0..nb);
                    let (gq, gk, gv) =
                        backward_group(&sh, &q, &k, &v, &o, &l, &dout, seg, bi, g, 0..nb);
                    // the group's heads out of the whole results
                    let head = |x: &[f32], nh: usize, h0: usize, n: usize| {
                        let mut r = vec![];
                        for h in h0..h0 + n {
                            for i in 0..s {
                                r.extend_from_slice(&x[((bi * s + i) * nh + h) * d..][..d]);
                            }
                        }
                        r
                    };
                    assert_eq!(
                        bits(&head(&o, heads, g * n_rep, n_rep)),
                        bits(&og),
                        "out {shape}"
                    );
                    let lse_g = &l[(bi * heads + g * n_rep) * s..][..n_rep * s];
                    assert_eq!(bits(lse_g), bits(&lg), "lse {shape}");
                    assert_eq!(
                        bits(&head(&dq, heads, g * n_rep, n_rep)),
                        bits(&gq),
                        "dq {shape}"
                    );
                    for (name, got, want) in [
                        ("dk", head(&dk, kvh, g, 1), gk),
                        ("dv", head(&dv, kvh, g, 1), gv),
                    ] {
                        let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
                        for (x, y) in got.iter().zip(&want) {
                            assert!((x - y).abs() <= 1e-5 * scale, "{name} {shape}: {x} vs {y}");
                        }
                    }
                }
            }
        }
    }

    /// The probabilities written as bf16 inside the softmax's loop are
    /// what packing the f32 probabilities afterwards gives, padding included.
    #[test]
    fn probabilities_written_packed_equal_packing_them_afterwards() {
        if amx::skip_without_tiles("the tile attention was") {
            return;
        }
        for &(s, heads, kvh, d, i0, rows, with_seg) in &[
            (256usize, 9usize, 3usize, 64usize, 192usize, 64usize, false),
            (70, 4, 2, 48, 64, 6, true),
            (5, 1, 1, 8, 0, 5, false),
        ] {
            let sh = causal(1, s, heads, kvh, d);
            let q = rand_vec(s * heads * d, 21, 1.5);
            let k = rand_vec(s * kvh * d, 22, 1.5);
            let seg: Option<Vec<u32>> = with_seg.then(|| (0..s).map(|i| (i / 10) as u32).collect());
            let seg = seg.as_deref();
            let (n_rep, kl, kpd) = (heads / kvh, i0 + rows, round_up(d, 32));
            let mq = n_rep * rows;
            let mut kpan = TileBuf::new();
            pack_rows_forward(&k, s, d, kvh * d, 0, &mut kpan);
            let mut qg = vec![0f32; mq * d];
            gather(&sh, &q, 0, 0, i0, rows, sh.scale(), &mut qg);
            let mut aq = TileBuf::new();
            pack_a(&qg, mq, d, d, 0, kpd, &mut aq);
            let mut p = vec![0f32; mq * kl];
            let mut ap = TileBuf::new();
            ap.resize(7);
            ap.fill(9);
            probabilities(&sh, seg, 0, i0, rows, &aq, &kpan, 0, kl, &mut p, &mut ap);
            let mut want = TileBuf::new();
            pack_a(&p, mq, kl, kl, 0, round_up(kl, 32), &mut want);
            assert_eq!(&ap[..], &want[..], "s {s} heads {heads}/{kvh} i0 {i0}");
            assert!(p.iter().any(|x| *x > 0.0));
        }
    }

    /// A key's row of a block's scores is masked exactly where the
    /// element-by-element rule says, segment runs included.
    #[test]
    fn key_rows_mask_as_the_element_by_element_rule() {
        let (s, rows, n_rep) = (150usize, 64usize, 3usize);
        let sh = causal(1, s, 3, 1, 8);
        let runs: Vec<u32> = [5usize, 40, 2, 70, 33]
            .iter()
            .enumerate()
            .flat_map(|(id, &n)| std::iter::repeat_n(id as u32, n))
            .collect();
        for seg in [None, Some(&runs[..])] {
            for i0 in [0, 64, 128] {
                let rows = rows.min(s - i0);
                for j in 0..(i0 + rows) {
                    let mut row = vec![1f32; n_rep * rows];
                    mask_key_row(&sh, sh.run_end(seg, 0, j), i0, rows, j, &mut row);
                    for (c, v) in row.iter().enumerate() {
                        let qi = i0 + c % rows;
                        let want = if sh.visible(seg, 0, qi, j) {
                            1.0
                        } else {
                            f32::NEG_INFINITY
                        };
                        assert_eq!(*v, want, "seg {} i0 {i0} key {j} query {qi}", seg.is_some());
                    }
                }
            }
        }
    }

    #[test]
    fn row_pairs_are_packed_as_documented() {
        for &(nr, n, ld, kp_rows) in &[
            (64usize, 64usize, 64usize, 64usize),
            (5, 40, 48, 32),
            (70, 16, 20, 96),
        ] {
            let src = rand_vec(nr * ld, 9, 1.0);
            let mut b = TileBuf::new();
            b.resize(3);
            b.fill(7);
            let ks = pack_b_pairs(&src, nr, n, ld, kp_rows, &mut b);
            assert!((b.as_ptr() as usize).is_multiple_of(64));
            assert_eq!(ks, kp_rows / 32);
            let stream = ks * TILE_U16;
            assert_eq!(b.len(), n.div_ceil(32) * 2 * stream);
            for row in 0..kp_rows {
                for col in 0..n.div_ceil(32) * 32 {
                    let at = (col / 32 * 2 + (col % 32) / 16) * stream
                        + row / 32 * TILE_U16
                        + (row % 32) / 2 * 32
                        + (col % 16) * 2
                        + row % 2;
                    let want = if row < nr && col < n {
                        amx::bf16_bits(src[row * ld + col])
                    } else {
                        0
                    };
                    assert_eq!(b[at], want, "row {row} col {col}");
                }
            }
        }
    }
}
