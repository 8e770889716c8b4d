//! A LoRA module's `dy` products on the tile unit, from `dy` as the input
//! gradient packs it ([`super::pack_a`], bf16): `dxa = s·dy·B` (`[t, r]`)
//! and `dB = s·dyᵀ·xa` (`[out, r]`). The f32 skinny kernels these replace
//! read `dy` (f32) twice and ran at ~90 GFLOP/s a core (~7% of a TinyLlama
//! step); here both read the packed tiles of each chunk of rows right after
//! the pack wrote them. Measured (2-core Sapphire Rapids, 6-layer TinyLlama
//! step): LoRA backward 42-46 -> 16-20 ms, the input gradient +10-15 ms (its
//! pack now meets `dy` cold), step +2.7%; SmolLM2 step +2%.
//!
//! `dB` contracts over `t`, which runs down the packed tiles' rows, not
//! along them as a tile product contracts. A packed tile of `dy` (16 rows
//! of `t` × 32 columns of `out`) read as a B operand pairs column `2n + e`
//! of row `q` with output column `n`: `TDPBF16PS` sums over `(q, e)`. With
//! an A operand that holds `xa`'s row `q` at positions `2q + e` of one
//! parity `e` and zeros at the other, the product is `Σ_q xa[q]·dy[q][2n+e]`:
//! `dBᵀ` for the columns of parity `e`. Half the multiplications are by
//! zero, and no transposed copy of `dy` is made.

use rayon::prelude::*;

use super::backward::{LowRankBackward, LowRankGrads};
use super::{pack_b_pairs, product, round_up, TileBuf, TILE_U16};
use crate::ops::fastmath::to_bf16;

/// Rows of `dy` per chunk of [`pack_dy_with_lora`]: a chunk's packed
/// rows stay in the core's L2 (TinyLlama's widest `dy`, 5632 columns: 128
/// rows are 1.4 MiB) while its `dxa` and `dB` products read them again;
/// a multiple of 32, and a function of nothing but the shapes, so the
/// chunks' `dB` parts are summed in one order on any number of threads.
fn chunk_rows(kp: usize) -> usize {
    ((3 << 19) / (2 * kp.max(1)) / 32 * 32).clamp(32, 256)
}

/// `dy` (`[t, o]` f32) packed as [`super::pack_a`] packs it with `kp`
/// columns (the LoRA term's k-steps after `dy`'s are written too: the
/// bf16 of `dxa`), and the module's `dxa = s·dy·B` and `dB = s·dyᵀ·xa` from
/// the packed tiles, each chunk of rows while it is in cache.
pub(super) fn pack_dy_with_lora(
    dy: &[f32],
    t: usize,
    o: usize,
    kp: usize,
    a: &mut TileBuf,
    l: &LowRankBackward,
) -> LowRankGrads {
    let r = l.r;
    let ko = round_up(o, 32);
    let mp = round_up(t, 32);
    assert!(r > 0 && ko + 32 * r.div_ceil(32) <= kp && dy.len() >= t * o);
    assert!(l.b.len() >= o * r && l.xa.len() >= t * r);
    let prep = LoraPrep::new(l, o);
    let ch = chunk_rows(kp);
    a.resize(mp * kp);
    let mut dxa = vec![0f32; t * r];
    let parts: Vec<Vec<f32>> = a[..mp * kp]
        .par_chunks_mut(ch * kp)
        .zip(dxa.par_chunks_mut(ch * r))
        .enumerate()
        .map(|(c, (dst, dxa))| {
            let r0 = c * ch;
            for (gi, gdst) in dst.chunks_mut(16 * kp).enumerate() {
                super::pack_a_group(dy, t, o, o, 0, kp, r0 / 16 + gi, gdst, None);
            }
            prep.chunk(dst, kp, o, r0, dxa)
        })
        .collect();
    prep.finish(parts, dxa)
}

/// A module's B as the `dxa` products' operand, prepared once per call.
struct LoraPrep<'a> {
    l: &'a LowRankBackward<'a>,
    /// `bf16(s·B)` as B pairs, `ksteps` tiles a stream
    bt: TileBuf,
    ksteps: usize,
}

impl<'a> LoraPrep<'a> {
    fn new(l: &'a LowRankBackward<'a>, o: usize) -> Self {
        let r = l.r;
        assert!(r > 0 && l.b.len() >= o * r);
        let sb: Vec<f32> = l.b[..o * r].iter().map(|v| v * l.scale).collect();
        let mut bt = TileBuf::new();
        let ksteps = pack_b_pairs(&sb, o, r, r, round_up(o, 32), &mut bt);
        LoraPrep { l, bt, ksteps }
    }

    /// A chunk of packed `dy` (`dst`, rows `r0..`, `kp` columns): its
    /// `dxa` rows into `dxa` and, as bf16, into the term's k-steps; returns
    /// its part of `dBᵀ·(1/s)` (`[o, r]`).
    fn chunk(&self, dst: &mut [u16], kp: usize, o: usize, r0: usize, dxa: &mut [f32]) -> Vec<f32> {
        let (r, ko) = (self.l.r, round_up(o, 32));
        let rows = dxa.len() / r;
        let groups = dst.len() / (16 * kp);
        dy_times_b(dst, kp, rows, &self.bt, self.ksteps, r, dxa);
        // the term's k-steps: bf16(dxa), as `dxa·A` multiplies it
        let mut dxa_bf = vec![0u16; r];
        for (row, v) in dxa.chunks_exact(r).enumerate() {
            to_bf16(v, &mut dxa_bf);
            for (k, b) in dxa_bf.iter().enumerate() {
                dst[super::a_index(row, ko + k, kp)] = *b;
            }
        }
        let mut part = vec![0f32; o * r];
        let xa = &self.l.xa[r0 * r..(r0 + rows) * r];
        dyt_times_xa(dst, kp, groups, rows, o, xa, r, &mut part);
        part
    }

    /// The chunks' parts summed in chunk order, scaled: `dB`.
    fn finish(&self, parts: Vec<Vec<f32>>, dxa: Vec<f32>) -> LowRankGrads {
        let mut parts = parts.into_iter();
        let mut db = parts.next().unwrap_or_default();
        for part in parts {
            for (d, v) in db.iter_mut().zip(&part) {
                *d += v;
            }
        }
        db.iter_mut().for_each(|v| *v *= self.l.scale);
        LowRankGrads { dxa, db }
    }
}

/// The MLP's `dg`, `du` (SwiGLU's backward from `dm`, `g`, `u`, all `[t,
/// o]`) packed as [`pack_dy_with_lora`] packs a `dy` (`kp` columns each,
/// into `ag` and `au`) without ever being in memory as f32: each 16-row
/// group is made in a small buffer and packed while in cache, and each
/// chunk's LoRA products (`lg`, `lu`) run as in [`pack_dy_with_lora`] (the
/// same chunks, so the same bits). Returns each module's `dxa` and `dB`.
#[allow(clippy::too_many_arguments)]
pub(super) fn pack_swiglu_grads(
    dm: &[f32],
    g: &[f32],
    u: &[f32],
    t: usize,
    o: usize,
    kp: usize,
    ag: &mut TileBuf,
    au: &mut TileBuf,
    lg: Option<&LowRankBackward>,
    lu: Option<&LowRankBackward>,
) -> (Option<LowRankGrads>, Option<LowRankGrads>) {
    let mp = round_up(t, 32);
    assert!(dm.len() >= t * o && g.len() >= t * o && u.len() >= t * o);
    assert!(round_up(o, 32) <= kp);
    let prep_g = lg.map(|l| LoraPrep::new(l, o));
    let prep_u = lu.map(|l| LoraPrep::new(l, o));
    let (rg, ru) = (lg.map_or(0, |l| l.r), lu.map_or(0, |l| l.r));
    let ch = chunk_rows(kp);
    ag.resize(mp * kp);
    au.resize(mp * kp);
    let mut dxa_g = vec![0f32; t * rg];
    let mut dxa_u = vec![0f32; t * ru];
    // one slice per chunk of rows (empty ones for a module without LoRA)
    let sg = crate::ops::lora::split_rows(&mut dxa_g, t, rg, ch);
    let su = crate::ops::lora::split_rows(&mut dxa_u, t, ru, ch);
    // each chunk's dB parts of gate and up (None: no LoRA)
    type Parts = Vec<Option<Vec<f32>>>;
    let (pg, pu): (Parts, Parts) = ag[..mp * kp]
        .par_chunks_mut(ch * kp)
        .zip(au[..mp * kp].par_chunks_mut(ch * kp))
        .zip(sg.into_par_iter().zip(su.into_par_iter()))
        .enumerate()
        .map(|(c, ((dg_dst, du_dst), (dxg, dxu)))| {
            let r0 = c * ch;
            let mut sdg = vec![0f32; 16 * o];
            let mut sdu = vec![0f32; 16 * o];
            for (gi, (gg, gu)) in dg_dst
                .chunks_mut(16 * kp)
                .zip(du_dst.chunks_mut(16 * kp))
                .enumerate()
            {
                let row0 = r0 + 16 * gi;
                // rows past t (padding groups): nothing to make, zeros packed
                let n = 16.min(t.saturating_sub(row0));
                let e = if n == 0 {
                    0..0
                } else {
                    row0 * o..(row0 + n) * o
                };
                crate::ops::fastmath::swiglu_backward(
                    &dm[e.clone()],
                    &g[e.clone()],
                    &u[e],
                    &mut sdg[..n * o],
                    &mut sdu[..n * o],
                );
                super::pack_a_group(&sdg, n, o, o, 0, kp, 0, gg, None);
                super::pack_a_group(&sdu, n, o, o, 0, kp, 0, gu, None);
            }
            let pg = prep_g.as_ref().map(|p| p.chunk(dg_dst, kp, o, r0, dxg));
            let pu = prep_u.as_ref().map(|p| p.chunk(du_dst, kp, o, r0, dxu));
            (pg, pu)
        })
        .unzip();
    let grads_g = prep_g.map(|p| p.finish(pg.into_iter().flatten().collect(), dxa_g));
    let grads_u = prep_u.map(|p| p.finish(pu.into_iter().flatten().collect(), dxa_u));
    (grads_g, grads_u)
}

/// `dxa = dy·(s·B)` for a chunk's `rows` (`a`: their packed tiles, `kp`
/// columns) into `out` (`[rows, r]`); `bt`: `bf16(s·B)` as B pairs,
/// `ksteps` tiles a stream.
fn dy_times_b(
    a: &[u16],
    kp: usize,
    rows: usize,
    bt: &[u16],
    ksteps: usize,
    r: usize,
    out: &mut [f32],
) {
    let stream = ksteps * TILE_U16;
    for (mb, rows_out) in out.chunks_mut(32 * r).enumerate() {
        let m = rows_out.len() / r;
        debug_assert!(mb * 32 + m <= rows);
        let ab = &a[mb * 32 * kp..(mb + 1) * 32 * kp];
        for nb in 0..r.div_ceil(32) {
            let nn = 32.min(r - nb * 32);
            product(
                ab,
                kp,
                32,
                m,
                0,
                &bt[nb * 2 * stream..],
                ksteps,
                ksteps,
                &mut rows_out[nb * 32..],
                r,
                nn,
                false,
            );
        }
    }
}

/// `xa`'s columns `16·mt ..` as the A operands of [`dyt_times_xa`]: for
/// each 16-row group `g` of `t` and parity `e`, a tile whose row `m`
/// holds `bf16(xa[16g + q][16·mt + m])` at position `2q + e` and zero at
/// `2q + 1 - e` (zero past `t` rows or `r` columns). `[ng][2][16 × 32]`.
fn parity_operands(xa: &[f32], t: usize, r: usize, mt: usize, ng: usize, p: &mut TileBuf) {
    p.resize(ng * 2 * TILE_U16);
    p.fill(0);
    for row in 0..t {
        let (g, q) = (row / 16, row % 16);
        for m in 0..16.min(r - 16 * mt) {
            let v = super::bf16_bits(xa[row * r + 16 * mt + m]);
            for e in 0..2 {
                p[(2 * g + e) * TILE_U16 + m * 32 + 2 * q + e] = v;
            }
        }
    }
}

/// `part = dyᵀ·xa` `[o, r]` over a chunk's `rows` (`a`: their `groups`
/// packed 16-row groups, `kp` columns; `xa`: the chunk's rows of it), by
/// the parity products of the module docs.
#[allow(clippy::too_many_arguments)]
fn dyt_times_xa(
    a: &[u16],
    kp: usize,
    groups: usize,
    rows: usize,
    o: usize,
    xa: &[f32],
    r: usize,
    part: &mut [f32],
) {
    let nob = round_up(o, 32) / 32;
    let row_tiles = kp / 32;
    let mut p = TileBuf::new();
    for mt in 0..r.div_ceil(16) {
        parity_operands(xa, rows, r, mt, groups, &mut p);
        for (pi, out) in part.chunks_mut(64 * r).enumerate() {
            let ob = 2 * pi;
            let second = ob + 1 < nob;
            let mut c = Tiles4([0f32; 4 * 256]);
            // SAFETY: the tile products are available (the caller packed for
            // them); the parity
            // tiles are `groups` pairs; dy's tiles (g, ob) and (g, ob + 1)
            // for g < groups are inside `a` (ob + 1 < nob, else the first
            // block is read twice); `c` holds four 16 x 16 tiles.
            unsafe {
                let d0 = a.as_ptr().add(ob * TILE_U16);
                let d1 = if second { d0.add(TILE_U16) } else { d0 };
                parity_kernel(
                    p.as_ptr(),
                    d0,
                    d1,
                    row_tiles * TILE_U16 * 2,
                    groups,
                    c.0.as_mut_ptr(),
                )
            };
            for blk in 0..1 + second as usize {
                for e in 0..2 {
                    let tile = &c.0[(2 * blk + e) * 256..][..256];
                    for n in 0..16 {
                        let col = 32 * blk + 2 * n + e;
                        if 64 * pi + col >= o {
                            continue;
                        }
                        for m in 0..16.min(r - 16 * mt) {
                            out[col * r + 16 * mt + m] = tile[m * 16 + n];
                        }
                    }
                }
            }
        }
    }
}

/// Four 16 x 16 f32 tiles, on cache lines (tile stores).
#[repr(C, align(64))]
struct Tiles4([f32; 4 * 256]);

/// Four 16 x 16 f32 tiles at `c` (`[block][parity]`, rows of 64 bytes) =
/// `Σ_g P[g][e] · D_block[g]` over `ng` row groups: `p` the parity
/// operands (`[ng][2]` tiles), `d0`, `d1` the first tiles of two columns
/// of packed `dy`, `dstride` bytes from one row group's tile to the next.
///
/// # Safety
/// The tile products are available ([`super::available`]); every tile read
/// is inside its operand; `c` is valid for 4 KiB of writes.
#[cfg(target_arch = "x86_64")]
unsafe fn parity_kernel(
    p: *const u16,
    d0: *const u16,
    d1: *const u16,
    dstride: usize,
    ng: usize,
    c: *mut f32,
) {
    if super::on_amx() {
        parity_kernel_amx(p, d0, d1, dstride, ng, c)
    } else {
        super::emulated::run(&super::emulated::Block {
            // the AMX kernel's offsets below are in bytes
            a0: p,
            a1: p.add(TILE_U16),
            a_step: 2 * TILE_U16,
            b0: d0,
            b1: d1,
            b_step: dstride / 2,
            ksteps: ng,
            c: [c, c.byte_add(2048), c.byte_add(1024), c.byte_add(3072)],
            ldc: 64,
            acc: false,
            next_c: std::ptr::null(),
            pf: super::kernel::PfLines::NONE,
        })
    }
}

/// [`parity_kernel`] on the AMX tiles.
#[cfg(target_arch = "x86_64")]
unsafe fn parity_kernel_amx(
    p: *const u16,
    d0: *const u16,
    d1: *const u16,
    dstride: usize,
    ng: usize,
    c: *mut f32,
) {
    use std::arch::asm;
    let _tiles = super::kernel::Tiles::configure();
    asm!(
        "tilezero tmm0",
        "tilezero tmm1",
        "tilezero tmm2",
        "tilezero tmm3",
        options(nostack, nomem)
    );
    let (mut p, mut d0, mut d1) = (p as *const u8, d0 as *const u8, d1 as *const u8);
    for _ in 0..ng {
        asm!(
            "tileloadd tmm4, [{p} + {s64}*1]",
            "tileloadd tmm5, [{p1} + {s64}*1]",
            "tileloadd tmm6, [{d0} + {s64}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm5, tmm6",
            "tileloadd tmm7, [{d1} + {s64}*1]",
            "tdpbf16ps tmm2, tmm4, tmm7",
            "tdpbf16ps tmm3, tmm5, tmm7",
            p = in(reg) p,
            p1 = in(reg) p.add(2 * TILE_U16),
            d0 = in(reg) d0,
            d1 = in(reg) d1,
            s64 = in(reg) 64usize,
            options(nostack, readonly),
        );
        p = p.add(4 * TILE_U16);
        d0 = d0.add(dstride);
        d1 = d1.add(dstride);
    }
    let c = c as *mut u8;
    asm!(
        "tilestored [{c0} + {s64}*1], tmm0",
        "tilestored [{c1} + {s64}*1], tmm1",
        "tilestored [{c2} + {s64}*1], tmm2",
        "tilestored [{c3} + {s64}*1], tmm3",
        c0 = in(reg) c,
        c1 = in(reg) c.add(1024),
        c2 = in(reg) c.add(2048),
        c3 = in(reg) c.add(3072),
        s64 = in(reg) 64usize,
        options(nostack),
    );
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn parity_kernel(
    _p: *const u16,
    _d0: *const u16,
    _d1: *const u16,
    _dstride: usize,
    _ng: usize,
    _c: *mut f32,
) {
    unreachable!("AMX is x86_64 only")
}
