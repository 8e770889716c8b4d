//! Products whose A operand does not fit a core's L2 (TinyLlama's 512
//! tokens x 2048 in bf16 is 2 MiB, a whole L2 here) and whose output has
//! enough panels: the output's columns split among the threads in groups
//! of panels. A thread packs a group's B panels into its own buffer (about
//! [`GROUP_PANEL_BYTES`], kept in its L2), then runs A's 32-row blocks
//! through all of them, so A (read-only, shared by the threads) streams
//! from L3 once per group rather than once per panel, and no panel one
//! core packed is read by the other. Products with fewer panels keep the
//! row split (`products_by_rows`: A's rows shared out, each panel packed
//! by one thread and read by all).
//!
//! Measured here (2-core Xeon, AMX; TinyLlama's shapes, NF4, products over
//! 30 weights and inputs with fresh outputs, `NF4=1 COLD=1 bench_compute
//! shapes tinyllama`), groups against the row split, GFLOP/s: forward q/o
//! 1500-1566 -> 1553-1760, gate/up 1334-1430 -> 1620-1694, down 1294-1344
//! -> 1418-1433; input gradients q/o 1223-1532 -> 1575-1638, down
//! 1361-1398 -> 1584-1645, gate/up 1353-1380 -> 1332-1504. The row split
//! paid for each panel twice: packing it and the other core reading the
//! packed lines out of the packer's L2 (measured apart: a pack into a
//! private buffer cost almost nothing over no pack at all, into the shared
//! buffer 15-20% of the product).

use rayon::prelude::*;

use super::{kernel, with_scratch, SendPtr, TileBuf, SCRATCH_GROUP, TILE_U16};

/// Below this many bytes of packed A (it fits a core's L2 beside a
/// group's panels) no groups: one task per panel (the planner mirrors it,
/// `AMX_GROUP_MIN_A_BYTES`). Measured (bench steps, medians of 5): 1 MiB
/// -> 512 KiB SmolLM2 1031 -> 1048 tok/s (its gate/up forward and down
/// input gradient, A 576-608 KiB, join the groups), TinyLlama equal;
/// 256 KiB SmolLM2 alike, TinyLlama 1% slower (its k/v input gradients,
/// A 288 KiB, in groups).
pub(super) const GROUP_MIN_A_BYTES: usize = 1 << 19;
/// Bytes of B panels a thread packs per group (the planner counts them in
/// `AMX_ROUND_ELEMS`, for two threads). Measured at TinyLlama's shapes
/// (cold): 512 KiB -> 1 MiB gate/up forward +3-7%, down +26-29%; 1.5 MiB
/// 5-10% slower than 1 MiB (the panels and A's blocks no longer both fit
/// the 2 MiB L2).
pub(super) const GROUP_PANEL_BYTES: usize = 1 << 20;

/// Fewest output panels for groups: with fewer, streaming A once per
/// group costs more than the row split's sharing of B. Measured here:
/// SmolLM2's down projection and gate/up input gradient (18 panels of K
/// 1536, groups of 3) 3-10% slower in groups; TinyLlama's down projection
/// (64 panels of K 5632, groups of 2) 15% faster, its step +2-4%. (The
/// planner mirrors it, `AMX_GROUP_MIN_PANELS`.)
const MIN_PANELS: usize = 32;

/// Panels per group for `npanels` panels of `panel_bytes` each: about
/// [`GROUP_PANEL_BYTES`] of them, and at least four groups per thread so
/// that the threads end together (at least one panel).
pub(super) fn panels_per_group(npanels: usize, panel_bytes: usize) -> usize {
    let threads = rayon::current_num_threads();
    (GROUP_PANEL_BYTES / panel_bytes.max(1))
        .min(npanels.div_ceil(4 * threads))
        .max(1)
}

/// [`panels_per_group`] when A (`a_bytes` packed) calls for groups: too
/// big for a core's L2, and at least [`MIN_PANELS`] panels; `None`
/// otherwise.
pub(super) fn group_size(a_bytes: usize, npanels: usize, panel_bytes: usize) -> Option<usize> {
    #[cfg(test)]
    if GROUPS_OFF.load(std::sync::atomic::Ordering::SeqCst) {
        return None;
    }
    let g = panels_per_group(npanels, panel_bytes);
    (a_bytes >= GROUP_MIN_A_BYTES && npanels >= MIN_PANELS).then_some(g)
}

/// Tests: one task per panel whatever A's size (the products' bits must
/// not depend on it; tests running meanwhile only take the other path).
#[cfg(test)]
pub(super) static GROUPS_OFF: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Where one panel of a group writes: 32 (or `nn`) columns of C at `c`,
/// row stride `ldc` floats.
#[derive(Clone, Copy)]
pub(super) struct GroupOut {
    pub(super) c: SendPtr<f32>,
    pub(super) ldc: usize,
    pub(super) nn: usize,
}

/// Packs the panels `js` of a group into a buffer: panel `js.start + n`
/// at `n·panel` (two streams of the k-steps' tiles each).
pub(super) type PackGroup<'a> = dyn Fn(std::ops::Range<usize>, &mut [u16]) + Sync + 'a;

/// Runs groups of `g` panels (of `npanels`) in parallel: for each,
/// `pack` writes the group's B panels (two streams of `ksteps` tiles
/// each) into the thread's buffer, then every 32-row block of A goes
/// through the group's panels, `C_j (+)= A · B_j` (`acc`: add to C). A
/// is read from its k-step `ks0` for `ksteps`.
///
/// # Safety
/// The tile products are available ([`super::available`]); `a` is packed
/// by [`super::pack_a`] (`kp` padded columns, `t` real rows, k-steps `ks0..ks0 + ksteps` inside); `out(j)`
/// is `t` rows × `nn` writable floats, aliasing no other panel's.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn run_groups(
    a: &[u16],
    kp: usize,
    ks0: usize,
    t: usize,
    ksteps: usize,
    npanels: usize,
    g: usize,
    acc: bool,
    pack: &PackGroup,
    out: &(dyn Fn(usize) -> GroupOut + Sync),
) {
    let mp = super::round_up(t, 32);
    let panel = 2 * ksteps * TILE_U16;
    let ngroups = npanels.div_ceil(g);
    assert!(ks0 + ksteps <= kp / 32 && a.len() >= mp * kp);
    (0..ngroups).into_par_iter().for_each(|gi| {
        let js = gi * g..((gi + 1) * g).min(npanels);
        with_scratch(&SCRATCH_GROUP, |buf: &mut TileBuf| {
            buf.resize(js.len() * panel);
            pack(js.clone(), &mut buf[..js.len() * panel]);
            let c_at = |mb: usize, j: usize| {
                let o = out(j);
                // SAFETY: row mb·32 of panel j's C (inside it, mb·32 < t)
                unsafe { o.c.get().add(mb * 32 * o.ldc) }
            };
            // SAFETY: the tile products are available (the caller's contract); only the
            // blocks below use the tiles while `tiles` lives.
            let tiles = unsafe { kernel::Tiles::configure() };
            for mb in 0..mp / 32 {
                let rows = 32.min(t - mb * 32);
                for (n, j) in js.clone().enumerate() {
                    let o = out(j);
                    // the block after this one: its C lines are prefetched
                    // for writing over this one's k-steps
                    let next = if j + 1 < js.end {
                        c_at(mb, j + 1)
                    } else if t >= (mb + 2) * 32 {
                        c_at(mb + 1, js.start)
                    } else {
                        std::ptr::null_mut()
                    };
                    // SAFETY: the caller's contract; A's block mb and the
                    // panel's B (all `ksteps`) are inside `a` and `buf`.
                    unsafe {
                        kernel::run_block(
                            &tiles,
                            a.as_ptr().add(mb * 32 * kp + ks0 * TILE_U16),
                            kp,
                            rows,
                            buf[n * panel..].as_ptr(),
                            ksteps,
                            ksteps,
                            c_at(mb, j),
                            o.ldc,
                            o.nn,
                            acc,
                            if rows == 32 {
                                next
                            } else {
                                std::ptr::null_mut()
                            },
                        );
                    }
                }
            }
        });
    });
}
