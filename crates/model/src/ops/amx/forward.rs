//! The forward products `y[t, o] = x[t, i] · Wᵀ` on bf16 tiles: `x` packed
//! once per call (with the LoRA modules' down-projections made on its rows
//! while they are in cache, and their up-projections riding as extra
//! k-steps), the weight's B panels dequantized per call; the panels split
//! among the threads in column groups ([`super::groups`]), by A's rows
//! ([`super::row_split`]) or one task per panel, by A's size.

use rayon::prelude::*;

use super::*;

/// Panel `nb` (output rows `32nb..`, `nn` of them) of the forward's B
/// operand into `b` ([`WeightSource::forward_panel`]).
fn forward_panel(w: &WeightBf16, nb: usize, nn: usize, i: usize, ksteps: usize, b: &mut [u16]) {
    w.forward_panel(i, nb * 32, nn, ksteps, b);
}

/// A LoRA module's up-projection `xa · (s·Bᵀ)` as extra k-steps of a
/// forward product: A carries `bf16(xa)` in its columns `kx + off ..
/// kx + off + r` (`kx` = the input's padded width), the output's B panels
/// `bf16(s·B)` in the same K positions, so the tiles add the term with the
/// base product (bf16 operands, f32 sums, like the base; the module's `xa`
/// itself, which its gradients use, stays f32). `p` is `s·Bᵀ` as
/// [`super::super::skinny::pack_transposed`] lays it out (`[r, ldp]`).
#[derive(Clone, Copy)]
pub(crate) struct UpTerm<'a> {
    pub(crate) p: &'a [f32],
    pub(crate) ldp: usize,
    pub(crate) r: usize,
    /// This module's first column in the extra K range.
    pub(crate) off: usize,
}

impl UpTerm<'_> {
    /// Writes the term's B values for the panel of output rows `n0 ..
    /// n0 + nn` into `b` (forward layout, `ksteps` per stream), the extra K
    /// range starting at k-step `ks0`; every other extra position is left as
    /// it is (zero).
    fn write_panel(&self, n0: usize, nn: usize, ks0: usize, ksteps: usize, b: &mut [u16]) {
        for jj in 0..nn {
            let (s, j) = (jj / 16, jj % 16);
            for c in 0..self.r {
                let kx = self.off + c;
                let (ks, q, h) = (ks0 + kx / 32, (kx % 32) / 2, kx % 2);
                b[(s * ksteps + ks) * TILE_U16 + q * 32 + j * 2 + h] =
                    bf16_bits(self.p[c * self.ldp + n0 + jj]);
            }
        }
    }
}

/// [`forward_panel`] with the up-projection's extra k-steps (`ks0` on).
#[allow(clippy::too_many_arguments)]
fn forward_panel_up(
    w: &WeightBf16,
    nb: usize,
    nn: usize,
    i: usize,
    ksteps: usize,
    ks0: usize,
    up: Option<&UpTerm>,
    b: &mut [u16],
) {
    forward_panel(w, nb, nn, i, ksteps, b);
    if let Some(up) = up {
        up.write_panel(nb * 32, nn, ks0, ksteps, b);
    }
}

/// One output of a forward product: its width, where it goes, its weight.
type ForwardOut<'a> = (usize, SendPtr<f32>, &'a WeightBf16<'a>);

/// `y[t, o] = x[t, i] · Wᵀ` (y overwritten), W `[o, i]` given by `w`.
///
/// # Panics
/// If AMX is not [`available`] or the sizes do not match.
pub fn linear_forward(o: usize, i: usize, t: usize, x: &[f32], y: &mut [f32], w: &WeightBf16) {
    assert_eq!(y.len(), t * o, "amx forward: y size");
    // SAFETY: `y` is t·o writable floats.
    unsafe { linear_forward_raw(o, i, t, x, y.as_mut_ptr(), w) }
}

/// [`linear_forward`] into a fresh vector: no zeroing of memory the product
/// overwrites anyway (a `vec![0; n]` per call was ~2.5% of a training step).
pub fn linear_forward_new(o: usize, i: usize, t: usize, x: &[f32], w: &WeightBf16) -> Vec<f32> {
    let mut y: Vec<f32> = Vec::with_capacity(t * o);
    // SAFETY: the capacity is t·o floats; `linear_forward_raw` writes every
    // one of them (whole 32×32 tiles, partial blocks row by row through the
    // scratch, zeros when i = 0) before `set_len` exposes them.
    unsafe {
        linear_forward_raw(o, i, t, x, y.as_mut_ptr(), w);
        y.set_len(t * o);
    }
    y
}

/// [`linear_forward`] through a raw output pointer (`t·o` floats, possibly
/// uninitialized: every one is written, none read).
///
/// # Safety
/// `y` must be valid for writes of `t·o` floats and not aliased.
unsafe fn linear_forward_raw(o: usize, i: usize, t: usize, x: &[f32], y: *mut f32, w: &WeightBf16) {
    linear_forward_raw_multi(i, t, x, &[(o, SendPtr(y), w)]);
}

/// `y_k[t, o_k] = x[t, i] · W_kᵀ` for several weights sharing the input: `x`
/// is packed once and all outputs' weight panels run in one parallel region
/// (q/k/v and gate/up of a layer).
///
/// # Safety
/// Every `y_k` must be valid for writes of `t·o_k` floats, none aliasing another.
unsafe fn linear_forward_raw_multi(i: usize, t: usize, x: &[f32], outs: &[ForwardOut]) {
    assert!(available(), "AMX bf16 path called without AMX");
    assert_eq!(x.len(), t * i, "amx forward: x size");
    if t == 0 {
        return;
    }
    if i == 0 {
        for &(o, y, _) in outs {
            std::ptr::write_bytes(y.get(), 0, t * o);
        }
        return;
    }
    let kp = round_up(i, 32);
    with_scratch(&SCRATCH_A, |a| {
        pack_a(x, t, i, i, 0, kp, a);
        forward_packed(&a[..], i, kp, t, outs, &[]);
    });
}

/// The products of [`linear_forward_raw_multi`] from `x` already packed
/// ([`pack_a`], `t` rows, `i` columns, `kp` padded ones; `t`, `i` > 0): `kp`
/// past `round_up(i, 32)` holds the up-projections' `xa` for the outputs
/// whose `ups[k]` has a term (`ups` empty: none).
///
/// # Safety
/// As [`linear_forward_raw_multi`].
unsafe fn forward_packed(
    a: &[u16],
    i: usize,
    kp: usize,
    t: usize,
    outs: &[ForwardOut],
    ups: &[Option<UpTerm>],
) {
    let ksteps = kp / 32;
    let ks0 = round_up(i, 32) / 32;
    let up = |k: usize| ups.get(k).and_then(|u| u.as_ref());
    let mp = round_up(t, 32);
    // panel index -> (output, panel within it)
    let panels: Vec<(usize, usize)> = outs
        .iter()
        .enumerate()
        .flat_map(|(k, &(o, _, _))| (0..o.div_ceil(32)).map(move |nb| (k, nb)))
        .collect();
    let panel = 2 * ksteps * TILE_U16;
    if let Some(g) = groups::group_size(mp * kp * 2, panels.len(), panel * 2) {
        let pack = |js: std::ops::Range<usize>, b: &mut [u16]| {
            for (j, b) in js.zip(b.chunks_exact_mut(panel)) {
                let (k, nb) = panels[j];
                let (o, _, w) = outs[k];
                forward_panel_up(w, nb, 32.min(o - nb * 32), i, ksteps, ks0, up(k), b);
            }
        };
        let out = |j: usize| {
            let (k, nb) = panels[j];
            let (o, yp, _) = outs[k];
            groups::GroupOut {
                c: SendPtr(yp.get().wrapping_add(nb * 32)),
                ldc: o,
                nn: 32.min(o - nb * 32),
            }
        };
        // SAFETY: the tile products are available (checked by the callers); A is x packed
        // (t rows, ksteps); every panel's C is columns nb·32.. of its own
        // output, t rows of o.
        return unsafe {
            groups::run_groups(a, kp, 0, t, ksteps, panels.len(), g, false, &pack, &out)
        };
    }
    if let Some(slices) = row_slices(mp, kp) {
        return forward_by_rows(a, i, t, ksteps, &slices, &panels, outs, ups);
    }
    panels.into_par_iter().for_each(|(k, nb)| {
        let (o, yp, w) = outs[k];
        with_scratch(&SCRATCH_PANEL, |b| {
            let n0 = nb * 32;
            let nn = 32.min(o - n0);
            // [2 streams][ksteps][512] B panel
            b.resize(2 * ksteps * TILE_U16);
            forward_panel_up(w, nb, nn, i, ksteps, ks0, up(k), b);
            // SAFETY: the tile products are available (checked above); every
            // tile load stays inside `a` ([mp, kp]) and `b` (2·ksteps tiles);
            // C blocks are disjoint per task (columns n0..n0+nn of y_k).
            unsafe {
                kernel::run_blocks(
                    a.as_ptr(),
                    kp,
                    mp,
                    t,
                    b.as_ptr(),
                    ksteps,
                    ksteps,
                    yp.get().add(n0),
                    o,
                    nn,
                    false,
                );
            }
        });
    });
}

/// Weight elements per round of the forward's row split (2 MiB of bf16
/// panels; the planner mirrors it as `AMX_ROUND_ELEMS`): the round's panels
/// stay in one buffer until every thread has used them, one parallel region
/// per round. Measured at TinyLlama's shapes: 2^19..2^21 alike, 2^23 (every
/// panel of a projection in memory) 5-20% slower at gate/up, a round per
/// 8 panels with its own pack region slower still (the other thread woken
/// twice per round).
const ROW_SPLIT_ROUND_ELEMS: usize = 1 << 20;

/// Panels a thread packs ahead of the one it multiplies next.
const PACK_AHEAD: usize = 2;

/// The forward by row slices, in one parallel region per round: the
/// threads claim the round's B panels in order and pack them a few ahead of
/// their products (a packed panel is used while it is still in a cache; a
/// pack phase of its own wrote and re-read the whole round from memory:
/// 0.65-1.1 ms of TinyLlama's q projection against 1.9-2.5 ms of products).
/// A thread that needs a panel another one is packing waits for it; no
/// thread waits for one nobody packs, so a pool with one free thread just
/// runs the slices one after the other.
///
/// # Safety
/// As [`linear_forward_raw_multi`]; `a` is x packed (`t` rows, `ksteps`).
#[allow(clippy::too_many_arguments)]
unsafe fn forward_by_rows(
    a: &[u16],
    i: usize,
    t: usize,
    ksteps: usize,
    slices: &[std::ops::Range<usize>],
    panels: &[(usize, usize)],
    outs: &[ForwardOut],
    ups: &[Option<UpTerm>],
) {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let kp = ksteps * 32;
    let ks0 = round_up(i, 32) / 32;
    let panel = 2 * ksteps * TILE_U16;
    let round = (ROW_SPLIT_ROUND_ELEMS / (32 * kp)).clamp(1, panels.len());
    with_scratch(&SCRATCH_GROUP, |g| {
        g.resize(round * panel);
        let gp = SendPtr(g.as_mut_ptr());
        for chunk in panels.chunks(round) {
            let done: Vec<AtomicBool> = chunk.iter().map(|_| AtomicBool::new(false)).collect();
            let next = AtomicUsize::new(0);
            let pack = |j: usize| {
                let (k, nb) = chunk[j];
                let (o, _, w) = outs[k];
                let nn = 32.min(o - nb * 32);
                // SAFETY: panel j's slot of the round buffer; j was claimed
                // by this thread alone (`next`), and nobody reads it before
                // `done[j]` is set.
                let b = unsafe { std::slice::from_raw_parts_mut(gp.get().add(j * panel), panel) };
                let up = ups.get(k).and_then(|u| u.as_ref());
                forward_panel_up(w, nb, nn, i, ksteps, ks0, up, b);
                done[j].store(true, Ordering::Release);
            };
            let ready = |j: usize| {
                while next.load(Ordering::Relaxed) <= (j + PACK_AHEAD).min(chunk.len() - 1) {
                    let c = next.fetch_add(1, Ordering::Relaxed);
                    if c >= chunk.len() {
                        break;
                    }
                    pack(c);
                }
                while !done[j].load(Ordering::Acquire) {
                    std::hint::spin_loop();
                }
            };
            let outs_p: Vec<PanelOut> = chunk
                .iter()
                .enumerate()
                .map(|(j, &(k, nb))| {
                    let (o, yp, _) = outs[k];
                    PanelOut {
                        b: gp.get().add(j * panel),
                        bstride: ksteps,
                        c: SendPtr(yp.get().add(nb * 32)),
                        ldc: o,
                        nn: 32.min(o - nb * 32),
                    }
                })
                .collect();
            let is_ready = |j: usize| done[j].load(Ordering::Acquire);
            products_by_rows(
                a, kp, t, 0, ksteps, slices, &outs_p, false, &ready, &is_ready,
            );
        }
    });
}

/// [`linear_forward_new`] for several weights with the same input: one pack
/// of `x`, one parallel region over every output's panels. `outs[k] = (o_k,
/// W_k)`; returns the `y_k`.
///
/// # Panics
/// If AMX is not [`available`] or the sizes do not match.
pub fn linear_forward_multi(
    i: usize,
    t: usize,
    x: &[f32],
    outs: &[(usize, &WeightBf16)],
) -> Vec<Vec<f32>> {
    let mut ys: Vec<Vec<f32>> = outs
        .iter()
        .map(|&(o, _)| Vec::with_capacity(t * o))
        .collect();
    let raw: Vec<ForwardOut> = ys
        .iter_mut()
        .zip(outs)
        .map(|(y, &(o, w))| (o, SendPtr(y.as_mut_ptr()), w))
        .collect();
    // SAFETY: each y_k has capacity t·o_k, distinct allocations; every element
    // is written (see `linear_forward_new`) before `set_len`.
    unsafe {
        linear_forward_raw_multi(i, t, x, &raw);
        for (y, &(o, _)) in ys.iter_mut().zip(outs) {
            y.set_len(t * o);
        }
    }
    ys
}

/// A LoRA module on one output of [`linear_forward_lora`]: its `x·Aᵀ`
/// kept from an earlier forward, or else made from `x` (through `mask`,
/// when the module drops its input) with `at` (`Aᵀ`, `[i, ldat]` as
/// [`super::super::skinny::pack_transposed`] lays it out); and its
/// up-projection operand `p = s·Bᵀ` (`[r, ldp]`).
pub struct LoraTerm<'a> {
    pub kept: Option<Vec<f32>>,
    pub at: &'a [f32],
    pub ldat: usize,
    pub r: usize,
    pub p: &'a [f32],
    pub ldp: usize,
    /// The module's input dropout: `mask(k, row, out)` writes row `k` of
    /// `x` (`row`) times its mask into `out`; the down-projection reads
    /// that instead of `x` (`None`: `x` itself).
    pub mask: Option<&'a RowMask<'a>>,
}

/// Row `k` of an input times its dropout mask: `(k, row, out)`.
pub type RowMask<'a> = dyn Fn(usize, &[f32], &mut [f32]) + Sync + 'a;

thread_local! {
    /// The masked rows of a group for a dropout module's down-projection.
    static MASKED_ROWS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The products of several weights sharing `x` with their LoRA modules:
/// each module's down-projection `x·Aᵀ` (f32, bit for bit
/// [`super::super::skinny::nn`] over `x`) is made on each group of rows of `x`
/// while the pack has it in cache, and its up-projection rides in the
/// products as extra k-steps ([`UpTerm`]: `bf16(xa)` in A, `bf16(s·B)` in
/// the output's panels; a pass of f32 FMAs over every output block cost
/// SmolLM2's forward ~15 ms a step, the k-steps ~5). Returns the outputs
/// and each module's `x·Aᵀ`.
///
/// # Panics
/// If AMX is not [`available`], `t` or `i` is 0, or the sizes do not match.
pub fn linear_forward_lora(
    i: usize,
    t: usize,
    x: &[f32],
    outs: &[(usize, &WeightBf16)],
    mut terms: Vec<Option<LoraTerm>>,
) -> (Vec<Vec<f32>>, Vec<Option<Vec<f32>>>) {
    assert!(available(), "AMX bf16 path called without AMX");
    assert!(t > 0 && i > 0, "amx forward with LoRA: empty product");
    assert_eq!(x.len(), t * i, "amx forward: x size");
    assert_eq!(
        terms.len(),
        outs.len(),
        "amx forward: one LoRA slot per output"
    );
    for (tm, &(o, _)) in terms
        .iter()
        .zip(outs)
        .filter_map(|(tm, o)| Some((tm.as_ref()?, o)))
    {
        assert!(
            tm.ldp >= super::super::skinny::padded(o) && tm.p.len() >= tm.r * tm.ldp,
            "amx forward: LoRA up operand"
        );
        match &tm.kept {
            Some(xa) => assert!(xa.len() >= t * tm.r, "amx forward: kept x·Aᵀ size"),
            None => assert!(
                tm.ldat >= super::super::skinny::padded(tm.r) && tm.at.len() >= i * tm.ldat,
                "amx forward: LoRA down operand"
            ),
        }
    }
    // each module's x·Aᵀ: kept, or a buffer the pack's hook fills
    let mut xas: Vec<Option<Vec<f32>>> = terms
        .iter_mut()
        .map(|tm| {
            let tm = tm.as_mut()?;
            Some(
                tm.kept
                    .take()
                    .unwrap_or_else(|| Vec::with_capacity(t * tm.r)),
            )
        })
        .collect();
    type Down<'a> = (
        SendPtr<f32>,
        &'a [f32],
        usize,
        usize,
        Option<&'a RowMask<'a>>,
    );
    let downs: Vec<Down> = terms
        .iter()
        .zip(&mut xas)
        .filter_map(|(tm, xa)| {
            let (tm, xa) = (tm.as_ref()?, xa.as_mut()?);
            (xa.is_empty() && tm.r > 0).then_some((
                SendPtr(xa.as_mut_ptr()),
                tm.at,
                tm.ldat,
                tm.r,
                tm.mask,
            ))
        })
        .collect();
    let isa = super::super::fastmath::Isa::best();
    let hook = |rows: std::ops::Range<usize>| {
        let xrows = &x[rows.start * i..rows.end * i];
        let down = |xin: &[f32], xa: SendPtr<f32>, at: &[f32], ldat: usize, r: usize| {
            // SAFETY: rows `rows` of this x·Aᵀ ([t, r], capacity t·r) are
            // this group's alone.
            unsafe {
                super::super::skinny::nn_strided(
                    isa,
                    rows.len(),
                    r,
                    i,
                    xin,
                    i,
                    at,
                    ldat,
                    xa.get().add(rows.start * r),
                    r,
                    false,
                )
            };
        };
        for &(xa, at, ldat, r, mask) in &downs {
            match mask {
                None => down(xrows, xa, at, ldat, r),
                // the group's rows masked while they are in cache (the same
                // rows, so the same bits, as masking the whole input first)
                Some(mask) => super::super::with_thread_local(&MASKED_ROWS, |buf| {
                    buf.resize(xrows.len(), 0.0);
                    for (k, (src, dst)) in xrows
                        .chunks_exact(i)
                        .zip(buf.chunks_exact_mut(i))
                        .enumerate()
                    {
                        mask(rows.start + k, src, dst);
                    }
                    down(buf, xa, at, ldat, r);
                }),
            }
        }
    };
    // The up-projections ride in the products as extra k-steps: each
    // module's `xa` (bf16) in A's columns past the input's, its `s·B` in
    // its output's panels at the same K; one k-step holds 32 columns, so
    // q/k/v's three rank-16 modules take two, gate/up's two take one.
    let mut offs = Vec::with_capacity(terms.len());
    let mut r_tot = 0;
    for tm in &terms {
        offs.push(r_tot);
        r_tot += tm.as_ref().map_or(0, |tm| tm.r);
    }
    let kx = round_up(i, 32);
    let kp = kx + round_up(r_tot, 32);
    let ups: Vec<Option<UpTerm>> = terms
        .iter()
        .zip(&offs)
        .map(|(tm, &off)| {
            let tm = tm.as_ref()?;
            (tm.r > 0).then_some(UpTerm {
                p: tm.p,
                ldp: tm.ldp,
                r: tm.r,
                off,
            })
        })
        .collect();
    // each module's xa rows, as the products' A reads them (bf16)
    let xa_ptrs: Vec<Option<(SendPtr<f32>, usize, usize)>> = xas
        .iter_mut()
        .zip(&terms)
        .zip(&offs)
        .map(|((xa, tm), &off)| {
            let (xa, tm) = (xa.as_mut()?, tm.as_ref()?);
            (tm.r > 0).then_some((SendPtr(xa.as_mut_ptr()), tm.r, off))
        })
        .collect();
    let extra = |row: usize, buf: &mut [u16]| {
        for &(xa, r, off) in xa_ptrs.iter().flatten() {
            // SAFETY: row `row` of this x·Aᵀ (`t·r` values) was written (kept,
            // or by the hook on this row's group, which ran first in this task).
            let v = unsafe { std::slice::from_raw_parts(xa.get().add(row * r), r) };
            super::super::fastmath::to_bf16(v, &mut buf[kx + off..kx + off + r]);
        }
    };
    let mut ys: Vec<Vec<f32>> = outs
        .iter()
        .map(|&(o, _)| Vec::with_capacity(t * o))
        .collect();
    with_scratch(&SCRATCH_A, |a| {
        pack_a_hooked(x, t, i, i, 0, kp, a, Some(&hook), Some(&extra));
        for (tm, xa) in terms.iter().zip(&mut xas) {
            if let (Some(tm), Some(xa)) = (tm, xa) {
                if xa.is_empty() {
                    // SAFETY: the hook wrote all t·r values (every row once).
                    unsafe { xa.set_len(t * tm.r) };
                }
            }
        }
        let raw: Vec<ForwardOut> = ys
            .iter_mut()
            .zip(outs)
            .map(|(y, &(o, w))| (o, SendPtr(y.as_mut_ptr()), w))
            .collect();
        // SAFETY: each y_k has capacity t·o_k, distinct allocations; the
        // products write every element before `set_len`.
        unsafe { forward_packed(&a[..], i, kp, t, &raw, &ups) };
    });
    for (y, &(o, _)) in ys.iter_mut().zip(outs) {
        // SAFETY: see above.
        unsafe { y.set_len(t * o) };
    }
    (ys, xas)
}
