//! The tile products on AVX512-BF16 (`VDPBF16PS`) for CPUs without AMX (AMD
//! Zen 4 and later, Intel Cooper Lake): the same operands, in the same
//! layouts, as the AMX kernels read, so every packing routine, chunking and
//! fusion of this module runs unchanged; only the innermost block differs.
//!
//! `TDPBF16PS C, A, B` on 16 × 16 tiles is, for each row `m` of A and each
//! pair `p` of its 32 bf16 columns, `C[m][0..16] += A[m][2p]·B[p][·][0] +
//! A[m][2p+1]·B[p][·][1]`: row `p` of a B tile (16 columns × a pair, 64
//! bytes) is exactly one `VDPBF16PS` operand, and A's pair a broadcast
//! dword. A 32 × 32 block (2 × 2 tiles) of f32 sums would need 64 vector
//! registers, so it runs as three passes of 12, 12 and 8 rows × 32 columns,
//! each holding its 24 (16) accumulators in registers over all k-steps (two
//! B loads and one broadcast per two `VDPBF16PS`; the B operand, re-read by
//! each pass, comes from L1/L2). Three passes instead of four 8-row ones:
//! 2048^3 392-408 vs 383-399 GFLOP/s, the step's shapes +1-2% (Zen 4).
//!
//! Each f32 sum is accumulated pair by pair in k order, like the tiles, so a
//! product split over several calls (C stored and reloaded in f32) gives the
//! same bits as one call: the fusions that rely on that on AMX stay bit for
//! bit here. The instruction treats bf16 subnormals as zero and flushes f32
//! subnormal results, as `TDPBF16PS` does.

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

/// A 32 × 32 block of tile products: the four f32 tiles `c[0]` = A0·B0,
/// `c[1]` = A0·B1, `c[2]` = A1·B0, `c[3]` = A1·B1 (16 rows each, row stride
/// `ldc` bytes) (+)= the sums over `ksteps` k-steps; A0/A1 (16 rows of 64
/// bytes each) advance `a_step` and B0/B1 (16 pairs of 16 columns) `b_step`
/// u16 per k-step.
pub(super) struct Block {
    pub a0: *const u16,
    pub a1: *const u16,
    pub a_step: usize,
    pub b0: *const u16,
    pub b1: *const u16,
    pub b_step: usize,
    pub ksteps: usize,
    pub c: [*mut f32; 4],
    pub ldc: usize,
    /// Add to C's values (else overwrite them).
    pub acc: bool,
    /// The next block's C (same `ldc`; null: none): its 64 lines are
    /// prefetched for writing over the first pass's k-steps, as the AMX
    /// kernel does, so that the next block's loads and stores of C do not
    /// wait on memory line by line.
    pub next_c: *const f32,
    /// Lines of the next B panel to bring into L2 meanwhile.
    pub pf: super::kernel::PfLines,
}

/// Runs `blk` on the emulating instruction set in use ([`super::isa`]):
/// AVX512-BF16, or its plain definition ([`block_ref`]) when asked for.
///
/// # Safety
/// As [`block`] (AVX512-BF16 is available unless the reference runs).
#[inline(always)]
pub(super) unsafe fn run(blk: &Block) {
    if super::isa() == Some(super::TileIsa::Reference) {
        block_ref(blk)
    } else {
        block(blk)
    }
}

/// Runs `blk` on AVX512-BF16.
///
/// # Safety
/// AVX-512 F and AVX512-BF16 are available; every tile read and every C row
/// written is inside its allocation.
#[target_feature(enable = "avx512f,avx512bf16")]
pub(super) unsafe fn block(blk: &Block) {
    // rows 0..12, 12..24, 24..32: three passes over B instead of four
    let (a0, a1) = (blk.a0, blk.a1);
    let (c00, c01) = (blk.c[0], blk.c[1]);
    let (c10, c11) = (blk.c[2], blk.c[3]);
    let row = |c: *mut f32, r: usize| c.byte_add(r * blk.ldc);
    pass::<12, 0, true>(blk, a0, row(c00, 0), row(c01, 0), a1, c10, c11);
    pass::<4, 8, false>(
        blk,
        a0.add(12 * 32),
        row(c00, 12),
        row(c01, 12),
        a1,
        c10,
        c11,
    );
    pass::<0, 8, false>(blk, a0, c00, c01, a1.add(8 * 32), row(c10, 8), row(c11, 8));
}

/// `R0` rows from `a0` (into the C rows at `c00`/`c01`, columns 0..16 /
/// 16..32) and `R1` rows from `a1` (into `c10`/`c11`) times both B streams,
/// `2·(R0 + R1)` accumulators in registers over all k-steps; `PF`: this
/// pass issues the block's prefetches ([`Block::next_c`], [`Block::pf`]).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn pass<const R0: usize, const R1: usize, const PF: bool>(
    blk: &Block,
    a0: *const u16,
    c00: *mut f32,
    c01: *mut f32,
    a1: *const u16,
    c10: *mut f32,
    c11: *mut f32,
) {
    let ldc = blk.ldc;
    let mut s00 = [_mm512_setzero_ps(); R0];
    let mut s01 = [_mm512_setzero_ps(); R0];
    let mut s10 = [_mm512_setzero_ps(); R1];
    let mut s11 = [_mm512_setzero_ps(); R1];
    if blk.acc {
        for r in 0..R0 {
            s00[r] = _mm512_loadu_ps(c00.byte_add(r * ldc));
            s01[r] = _mm512_loadu_ps(c01.byte_add(r * ldc));
        }
        for r in 0..R1 {
            s10[r] = _mm512_loadu_ps(c10.byte_add(r * ldc));
            s11[r] = _mm512_loadu_ps(c11.byte_add(r * ldc));
        }
    }
    let (mut a0, mut a1, mut b0, mut b1) = (a0, a1, blk.b0, blk.b1);
    // lines per k-step: the next C's 64, and the B lines asked for
    let c_step = if PF && !blk.next_c.is_null() {
        64usize.div_ceil(blk.ksteps.max(1))
    } else {
        0
    };
    let pf_step = if PF {
        (blk.pf.to - blk.pf.from).div_ceil(blk.ksteps.max(1))
    } else {
        0
    };
    let (mut c_line, mut pf_line) = (0usize, blk.pf.from);
    for _ in 0..blk.ksteps {
        for p in 0..16 {
            let x0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b0.add(32 * p).cast()));
            let x1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b1.add(32 * p).cast()));
            for r in 0..R0 {
                let pair = (a0.add(32 * r + 2 * p) as *const i32).read_unaligned();
                let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
                s00[r] = _mm512_dpbf16_ps(s00[r], av, x0);
                s01[r] = _mm512_dpbf16_ps(s01[r], av, x1);
            }
            for r in 0..R1 {
                let pair = (a1.add(32 * r + 2 * p) as *const i32).read_unaligned();
                let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
                s10[r] = _mm512_dpbf16_ps(s10[r], av, x0);
                s11[r] = _mm512_dpbf16_ps(s11[r], av, x1);
            }
        }
        a0 = a0.add(blk.a_step);
        a1 = a1.add(blk.a_step);
        b0 = b0.add(blk.b_step);
        b1 = b1.add(blk.b_step);
        if PF {
            let end = (pf_line + pf_step).min(blk.pf.to);
            while pf_line < end {
                _mm_prefetch::<_MM_HINT_T1>(blk.pf.at(pf_line).cast());
                pf_line += 1;
            }
            let end = (c_line + c_step).min(64);
            while c_line < end {
                let p = blk.next_c.byte_add((c_line / 2) * ldc + (c_line % 2) * 64);
                // prefetch for writing (PREFETCHW: every CPU with AVX512-BF16 has it)
                std::arch::asm!("prefetchw [{}]", in(reg) p, options(nostack, readonly, preserves_flags));
                c_line += 1;
            }
        }
    }
    for r in 0..R0 {
        _mm512_storeu_ps(c00.byte_add(r * ldc), s00[r]);
        _mm512_storeu_ps(c01.byte_add(r * ldc), s01[r]);
    }
    for r in 0..R1 {
        _mm512_storeu_ps(c10.byte_add(r * ldc), s10[r]);
        _mm512_storeu_ps(c11.byte_add(r * ldc), s11[r]);
    }
}

/// The plain reference of [`block`]: the same pairs in the same order, each
/// pair's two products (exact in f32: 8-bit significands) added one at a
/// time, odd element first, as the instruction's definition does; bf16
/// subnormal inputs read as zero. Results differ from [`block`] only where
/// an intermediate sum is subnormal (the instruction flushes it).
///
/// # Safety
/// As [`block`], without the CPU requirement.
pub(super) unsafe fn block_ref(blk: &Block) {
    let bf = |v: u16| {
        let f = f32::from_bits((v as u32) << 16);
        if f.is_subnormal() {
            0.0
        } else {
            f
        }
    };
    // each tile's operands as f32 once per k-step; every sum still takes
    // its pairs in k order, odd product first
    let (mut at, mut bt) = ([[0f32; 32]; 16], [[0f32; 32]; 16]);
    for (ci, &c) in blk.c.iter().enumerate() {
        let a = if ci < 2 { blk.a0 } else { blk.a1 };
        let b = if ci % 2 == 0 { blk.b0 } else { blk.b1 };
        let mut sums = [[0f32; 16]; 16];
        if blk.acc {
            for (m, row) in sums.iter_mut().enumerate() {
                for (n, v) in row.iter_mut().enumerate() {
                    *v = *c.byte_add(m * blk.ldc).add(n);
                }
            }
        }
        for ks in 0..blk.ksteps {
            let (ak, bk) = (a.add(ks * blk.a_step), b.add(ks * blk.b_step));
            for r in 0..16 {
                for j in 0..32 {
                    // A: row r, column j; B: pair row r, column j / 2, element j % 2
                    at[r][j] = bf(*ak.add(32 * r + j));
                    bt[r][j] = bf(*bk.add(32 * r + j));
                }
            }
            for (m, row) in sums.iter_mut().enumerate() {
                for (n, s) in row.iter_mut().enumerate() {
                    for p in 0..16 {
                        *s += at[m][2 * p + 1] * bt[p][2 * n + 1];
                        *s += at[m][2 * p] * bt[p][2 * n];
                    }
                }
            }
        }
        for (m, row) in sums.iter().enumerate() {
            for (n, v) in row.iter().enumerate() {
                *c.byte_add(m * blk.ldc).add(n) = *v;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::super::testutil::rand_vec;
    use super::super::{bf16_bits, TILE_U16};
    use super::*;

    /// Random bf16 operands over six decades (and some exact zeros), so
    /// that sums cancel and round in every way.
    fn operand(n: usize, seed: u64) -> Vec<u16> {
        let u = rand_vec(2 * n, seed, 1.0);
        (0..n)
            .map(|j| {
                let mag = 10f32.powf(3.0 * u[2 * n - 1 - j]);
                if j % 29 == 0 {
                    0
                } else {
                    bf16_bits(u[j] * mag)
                }
            })
            .collect()
    }

    #[test]
    fn vdpbf16ps_block_equals_its_plain_definition_bit_for_bit() {
        if !super::super::TileIsa::Avx512Bf16.supported() {
            eprintln!("SKIPPED: AVX512-BF16 is not available on this CPU; the emulated tile kernel was not run");
            return;
        }
        for (case, &(ksteps, a_tiles, b_tiles, ldc, acc)) in [
            (1, 1, 1, 128, false),
            (3, 1, 1, 128, true),
            (5, 4, 2, 200, true),
            (2, 2, 3, 64, false),
            (17, 1, 1, 160, true),
        ]
        .iter()
        .enumerate()
        {
            let seed = 100 * case as u64;
            // A: two streams `a_tiles` tiles apart per k-step; B likewise
            let a = operand(2 * ksteps * a_tiles * TILE_U16, seed);
            let b = operand(2 * ksteps * b_tiles * TILE_U16, seed + 1);
            let c0 = rand_vec(32 * ldc, seed + 2, 1.0);
            let (mut got, mut want) = (c0.clone(), c0.clone());
            let run = |c: &mut [f32], f: unsafe fn(&Block)| {
                let blk = Block {
                    a0: a.as_ptr(),
                    a1: a[ksteps * a_tiles * TILE_U16..].as_ptr(),
                    a_step: a_tiles * TILE_U16,
                    b0: b.as_ptr(),
                    b1: b[ksteps * b_tiles * TILE_U16..].as_ptr(),
                    b_step: b_tiles * TILE_U16,
                    ksteps,
                    // the four tiles of a 32 x 32 block in rows of `ldc` floats
                    c: [0, 16, 16 * ldc, 16 * ldc + 16].map(|o| c[o..].as_mut_ptr()),
                    ldc: 4 * ldc,
                    acc,
                    // prefetches change no value: a next C inside a vector
                    next_c: c0.as_ptr(),
                    pf: super::super::kernel::PfLines::NONE,
                };
                // SAFETY: every pointer above is inside its vector
                unsafe { f(&blk) }
            };
            run(&mut got, block);
            run(&mut want, block_ref);
            let differ = got
                .iter()
                .zip(&want)
                .filter(|(g, w)| g.to_bits() != w.to_bits())
                .count();
            assert_eq!(differ, 0, "case {case}: {differ} of {} differ", got.len());
            // columns past the block untouched
            for r in 0..32 {
                assert_eq!(
                    got[r * ldc + 32..(r + 1) * ldc],
                    c0[r * ldc + 32..(r + 1) * ldc]
                );
            }
        }
    }
}
