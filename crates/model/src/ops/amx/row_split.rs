//! Products split by A's rows: each thread takes a slice of A's 32-row
//! blocks through every output panel (K in passes that keep its rows in
//! L2), used where A is too big for one core's L2 and the output has too
//! few panels for the column groups ([`super::groups`]).

use rayon::prelude::*;

use super::*;

/// Below this many bytes of packed A, the products split the output's
/// columns among the threads (every thread streams all of A once per 32
/// columns, from its L2); above it, where the output has too few panels
/// for [`groups`], they split A's rows, so that each core re-reads only
/// its share. At TinyLlama's 512 x 2048 (2 MiB of bf16, a
/// whole L2 here) the column split streams A from L3: a micro-benchmark of
/// the two (B panels packed beforehand, both cores) 1.73-2.14 vs 2.52-2.66
/// TFLOP/s.
const ROW_SPLIT_MIN_A_BYTES: usize = 1 << 20;
/// Bytes of a thread's rows of A kept in its L2 while it runs through a
/// round's panels: longer K is done in passes of this many bytes, the
/// output accumulated between them (TinyLlama's down projection, K 5632:
/// a micro-benchmark 1.59 TFLOP/s in one pass, 2.03-2.07 in passes).
const ROW_SPLIT_A_PASS_BYTES: usize = 1 << 20;

/// The 32-row block ranges of A, one per thread, when A is big enough for
/// the row split ([`ROW_SPLIT_MIN_A_BYTES`]) and has at least four blocks
/// per thread (fewer would leave the threads unevenly loaded).
pub(super) fn row_slices(mp: usize, kp: usize) -> Option<Vec<std::ops::Range<usize>>> {
    let threads = rayon::current_num_threads();
    let blocks = mp / 32;
    if threads < 2 || mp * kp * 2 < ROW_SPLIT_MIN_A_BYTES || blocks < 4 * threads {
        return None;
    }
    Some(
        (0..threads)
            .map(|j| j * blocks / threads..(j + 1) * blocks / threads)
            .collect(),
    )
}

/// One output panel of a row-split product: 32 (or `nn`) columns of C at
/// `c` (row stride `ldc`), its B tiles at `b` (two streams `bstride` tiles
/// apart).
#[derive(Clone, Copy)]
pub(super) struct PanelOut {
    pub(super) b: *const u16,
    pub(super) bstride: usize,
    pub(super) c: SendPtr<f32>,
    pub(super) ldc: usize,
    pub(super) nn: usize,
}
unsafe impl Send for PanelOut {}
unsafe impl Sync for PanelOut {}

/// `C_p (+)= A · B_p` for every panel p, by rows: each thread takes one of
/// `slices` (32-row blocks of A) through all the panels, in K passes of
/// [`ROW_SPLIT_A_PASS_BYTES`] of its A rows. `ready(p)` is called before
/// panel p's first use on each thread (the forward packs panels on demand).
///
/// # Safety
/// The tile products are available ([`available`]); `a` is packed by
/// [`pack_a`] (`kp` padded columns, at least `slices`' rows; `m` real rows), read from k-step `ks0` for
/// `ksteps`; every panel's B holds `ksteps` tiles per stream once `ready`
/// returned, and its C is `m` rows × `nn` writable floats not aliased by
/// another panel's.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn products_by_rows(
    a: &[u16],
    kp: usize,
    m: usize,
    ks0: usize,
    ksteps: usize,
    slices: &[std::ops::Range<usize>],
    panels: &[PanelOut],
    acc: bool,
    ready: &(dyn Fn(usize) + Sync),
    is_ready: &(dyn Fn(usize) -> bool + Sync),
) {
    slices.par_iter().for_each(|rows| {
        let r0 = rows.start * 32;
        if r0 >= m {
            return;
        }
        let mr = (rows.end * 32).min(m) - r0;
        let pass = (ROW_SPLIT_A_PASS_BYTES / (rows.len() * 32 * 64)).max(8);
        let mut k0 = 0;
        while k0 < ksteps {
            let kk = pass.min(ksteps - k0);
            for (j, p) in panels.iter().enumerate() {
                if k0 == 0 {
                    ready(j);
                }
                let next = panels
                    .get(j + 1)
                    .filter(|_| is_ready(j + 1))
                    .map(|q| unsafe {
                        let b = q.b.add(k0 * TILE_U16);
                        (b, b.add(q.bstride * TILE_U16))
                    });
                // SAFETY: the caller's contract; rows r0.. of A and C are
                // this slice's own, k-steps k0..k0+kk inside every operand.
                unsafe {
                    kernel::run_blocks_pf(
                        a.as_ptr().add(r0 * kp + (ks0 + k0) * TILE_U16),
                        kp,
                        rows.len() * 32,
                        mr,
                        p.b.add(k0 * TILE_U16),
                        kk,
                        p.bstride,
                        p.c.get().add(r0 * p.ldc),
                        p.ldc,
                        p.nn,
                        acc || k0 > 0,
                        next,
                    );
                }
            }
            k0 += kk;
        }
    });
}
