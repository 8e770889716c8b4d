//! The input gradient `dx += dy · W` on AMX tiles: the weight dequantized
//! in chunks of rows, two consecutive rows interleaved per tile row.

use rayon::prelude::*;

use super::{
    available, groups, kernel, pack_a_hooked, products_by_rows, round_up, row_slices, with_scratch,
    PanelOut, SendPtr, WeightBf16, CHUNK_ELEMS, SCRATCH_A, SCRATCH_A2, SCRATCH_B, SCRATCH_C,
    TILE_U16,
};

/// A LoRA module's input-gradient term `dxa · A` as extra k-steps of the
/// input gradient: `bf16(dxa)` (`[t, r]`) in A's columns past `dy`'s, the
/// module's `A` (`a`: bf16 `[r, i]`) as extra weight rows in the last
/// chunk's B, so the tiles add the term with the base product (bf16
/// operands, f32 sums, like the base; `dxa` itself, which `dA` uses, stays
/// f32).
#[derive(Clone, Copy)]
pub struct InputUpTerm<'a> {
    pub dxa: &'a [f32],
    pub a: &'a [u16],
    pub r: usize,
}

/// A LoRA module's backward beside its base input gradient: from `dy` as
/// the input gradient packs it (bf16), `dxa = s·dy·B` and `dB = s·dyᵀ·xa`
/// on the tile unit ([`super::low_rank`]), then `dxa·A` as the extra
/// k-steps of [`InputUpTerm`]. The bf16 operands are those the module's
/// products already use (`dy` as the input gradient takes it, `B` and `xa`
/// as the forward's up-projection does); the sums are f32.
#[derive(Clone, Copy)]
pub struct LowRankBackward<'a> {
    /// LoRA's B `[o, r]` and its scale `s`.
    pub b: &'a [f32],
    pub scale: f32,
    /// The forward's `x·Aᵀ` `[t, r]`.
    pub xa: &'a [f32],
    /// LoRA's A as bf16 `[r, i]`.
    pub a: &'a [u16],
    pub r: usize,
}

/// What [`linear_backward_lora`] computes besides `dx`: `dxa = s·dy·B`
/// `[t, r]` (for `dA = dxaᵀ·x`) and `dB` `[o, r]`.
#[derive(Debug)]
pub struct LowRankGrads {
    pub dxa: Vec<f32>,
    pub db: Vec<f32>,
}

/// `dx (+)= dy · W + s·dy·B·A` with the module's `dxa` and `dB`
/// ([`LowRankBackward`]): into `dx` (added), or without one into a fresh
/// vector, returned first.
///
/// # Panics
/// If AMX is not [`available`] or the sizes do not match.
#[allow(clippy::too_many_arguments)]
pub fn linear_backward_lora(
    o: usize,
    i: usize,
    t: usize,
    dy: &[f32],
    dx: Option<&mut [f32]>,
    w: &WeightBf16,
    lora: LowRankBackward,
) -> (Option<Vec<f32>>, LowRankGrads) {
    let r = lora.r;
    assert!(
        lora.b.len() >= o * r && lora.xa.len() >= t * r && lora.a.len() >= r * i && r > 0,
        "amx backward: LoRA sizes"
    );
    match dx {
        Some(dx) => {
            assert_eq!(dx.len(), t * i, "amx backward: dx size");
            // SAFETY: dx is t·i floats, exclusively borrowed.
            let g =
                unsafe { backward_raw(o, i, t, dy, dx.as_mut_ptr(), w, None, Some(lora), false) };
            (None, g.expect("LoRA gradients"))
        }
        None => {
            let mut dx: Vec<f32> = Vec::with_capacity(t * i);
            // SAFETY: as in `linear_backward_new`.
            let g = unsafe {
                let g = backward_raw(o, i, t, dy, dx.as_mut_ptr(), w, None, Some(lora), true);
                dx.set_len(t * i);
                g
            };
            (Some(dx), g.expect("LoRA gradients"))
        }
    }
}

/// The MLP's gate and up projections' input gradient from SwiGLU's
/// backward: `dx = dg·Wg + du·Wu` (fresh) with each module's LoRA term
/// and products ([`linear_backward_lora`]), where `(dg, du)` is SwiGLU's
/// backward of `dm` at `g`, `u` (`[t, o]` each), made and packed one
/// 16-row group at a time ([`super::low_rank::pack_swiglu_grads`]): never
/// an f32 array in memory, nor zeroed, nor read back by a pack. Bit for
/// bit `swiglu::backward` then [`linear_backward_lora`] (or the plain
/// input gradient) for gate into a fresh `dx` and up into it. Returns `dx`
/// and each module's [`LowRankGrads`].
///
/// # Panics
/// If AMX is not [`available`], the sizes do not match, or the two
/// modules' LoRA terms take different numbers of k-steps (ranks in
/// different multiples of 32; callers check [`swiglu_pair_fits`]).
#[allow(clippy::too_many_arguments)]
pub fn linear_backward_swiglu_pair(
    o: usize,
    i: usize,
    t: usize,
    dm: &[f32],
    g: &[f32],
    u: &[f32],
    wg: &WeightBf16,
    wu: &WeightBf16,
    lg: Option<LowRankBackward>,
    lu: Option<LowRankBackward>,
) -> (Vec<f32>, Option<LowRankGrads>, Option<LowRankGrads>) {
    assert!(available(), "AMX bf16 path called without AMX");
    assert!(
        swiglu_pair_fits(lg.map(|l| l.r), lu.map(|l| l.r)),
        "amx backward: LoRA ranks of gate and up"
    );
    assert!(
        dm.len() == t * o && g.len() == t * o && u.len() == t * o,
        "amx backward: SwiGLU sizes"
    );
    for l in [&lg, &lu].into_iter().flatten() {
        assert!(
            l.r > 0 && l.b.len() >= o * l.r && l.xa.len() >= t * l.r && l.a.len() >= l.r * i,
            "amx backward: LoRA sizes"
        );
    }
    if t == 0 || i == 0 || o == 0 {
        let (dg, du) = crate::ops::swiglu::backward(dm, g, u);
        let plain = |l: Option<LowRankBackward>, dy: &[f32]| l.map(|l| low_rank_plain(o, t, dy, l));
        return (vec![0f32; t * i], plain(lg, &dg), plain(lu, &du));
    }
    let ko = round_up(o, 32);
    let ext = lg.or(lu).map_or(0, |l| l.r.div_ceil(32));
    let kp = ko + 32 * ext;
    let mut dx: Vec<f32> = Vec::with_capacity(t * i);
    let grads = with_scratch(&SCRATCH_A, |ag| {
        with_scratch(&SCRATCH_A2, |au| {
            let (gg, gu) = super::low_rank::pack_swiglu_grads(
                dm,
                g,
                u,
                t,
                o,
                kp,
                ag,
                au,
                lg.as_ref(),
                lu.as_ref(),
            );
            fn term<'a>(
                gr: &'a Option<LowRankGrads>,
                l: Option<LowRankBackward<'a>>,
            ) -> Option<InputUpTerm<'a>> {
                let (gr, l) = (gr.as_ref()?, l?);
                Some(InputUpTerm {
                    dxa: &gr.dxa,
                    a: l.a,
                    r: l.r,
                })
            }
            // SAFETY: dx has capacity t·i; the gate's products write every
            // element (overwrite) before the up's add to them; both A's are
            // their dy packed with the term's columns (kp).
            unsafe {
                backward_packed(
                    &ag[..],
                    kp,
                    o,
                    i,
                    t,
                    wg,
                    term(&gg, lg),
                    dx.as_mut_ptr(),
                    true,
                );
                backward_packed(
                    &au[..],
                    kp,
                    o,
                    i,
                    t,
                    wu,
                    term(&gu, lu),
                    dx.as_mut_ptr(),
                    false,
                );
            }
            (gg, gu)
        })
    });
    // SAFETY: written whole by the gate's products (see above).
    unsafe { dx.set_len(t * i) };
    (dx, grads.0, grads.1)
}

/// Whether gate and up modules of these ranks (`None`: no LoRA) can go
/// through [`linear_backward_swiglu_pair`]: their terms take the same
/// number of k-steps, so both packs have the same columns.
pub fn swiglu_pair_fits(rg: Option<usize>, ru: Option<usize>) -> bool {
    let ext = |r: Option<usize>| r.map_or(0, |r| r.div_ceil(32));
    rg != Some(0) && ru != Some(0) && ext(rg) == ext(ru)
}

/// `dx (+)= dy · W + dxa · A` ([`InputUpTerm`]): into `dx` (added), or
/// without one into a fresh vector, returned.
///
/// # Panics
/// If AMX is not [`available`] or the sizes do not match.
#[allow(clippy::too_many_arguments)]
pub fn linear_backward_up(
    o: usize,
    i: usize,
    t: usize,
    dy: &[f32],
    dx: Option<&mut [f32]>,
    w: &WeightBf16,
    up: InputUpTerm,
) -> Option<Vec<f32>> {
    assert!(
        up.dxa.len() >= t * up.r && up.a.len() >= up.r * i,
        "amx backward: LoRA term sizes"
    );
    match dx {
        Some(dx) => {
            assert_eq!(dx.len(), t * i, "amx backward: dx size");
            // SAFETY: dx is t·i floats, exclusively borrowed.
            unsafe { backward_raw(o, i, t, dy, dx.as_mut_ptr(), w, Some(up), None, false) };
            None
        }
        None => {
            let mut dx: Vec<f32> = Vec::with_capacity(t * i);
            // SAFETY: as in `linear_backward_new`.
            unsafe {
                backward_raw(o, i, t, dy, dx.as_mut_ptr(), w, Some(up), None, true);
                dx.set_len(t * i);
            }
            Some(dx)
        }
    }
}

/// For each 16-column group g of a pair of weight rows, the 32 words
/// `even[16g + j], odd[16g + j]` (j = 0..16, pairs in order) at
/// `dst[g·stride ..]`: one tile row of the input gradient's B operand.
pub(super) fn interleave_rows(even: &[u16], odd: &[u16], dst: &mut [u16], stride: usize) {
    #[cfg(target_arch = "x86_64")]
    if crate::ops::fastmath::Isa::V4.available() {
        // SAFETY: AVX-512 F and BW were detected at run time (V4).
        unsafe { super::transpose::interleave_rows_avx512(even, odd, dst, stride) };
        return;
    }
    interleave_rows_ref(even, odd, dst, stride);
}

/// Plain reference of [`interleave_rows`].
pub(super) fn interleave_rows_ref(even: &[u16], odd: &[u16], dst: &mut [u16], stride: usize) {
    for g in 0..even.len() / 16 {
        let d = &mut dst[g * stride..g * stride + 32];
        for j in 0..16 {
            d[2 * j] = even[g * 16 + j];
            d[2 * j + 1] = odd[g * 16 + j];
        }
    }
}

/// Rows `0..nr` (at most 32) of a weight, `i` bf16 each, as k-step `ks` of
/// the input gradient's B layout: row pair p is tile row p of every stream,
/// 16 columns per stream, stream g at `dst + g·stream` (`[nblocks][2][..]`,
/// a missing odd row as zeros). Columns past `i` are not written.
///
/// # Safety
/// `dst` is valid for writes of `len` u16 and every written element,
/// below `g·stream + ks·TILE + p·32 + 32` for the last column's group g and
/// the last pair p, is below `len` (asserted); no other thread writes tile
/// `ks` meanwhile.
pub(super) unsafe fn interleave_chunk(
    rows: &[u16],
    nr: usize,
    i: usize,
    ks: usize,
    stream: usize,
    dst: *mut u16,
    len: usize,
) {
    assert!(nr <= 32 && rows.len() >= nr * i);
    // the last column's group ends its last pair's 32 words there
    assert!(
        i == 0 || nr == 0 || (i - 1) / 16 * stream + ks * TILE_U16 + 32 * nr.div_ceil(2) <= len
    );
    let zeros = vec![0u16; if nr % 2 == 1 { i } else { 0 }];
    for p in 0..nr.div_ceil(2) {
        let r_even = &rows[2 * p * i..(2 * p + 1) * i];
        let r_odd = if 2 * p + 1 < nr {
            &rows[(2 * p + 1) * i..(2 * p + 2) * i]
        } else {
            &zeros[..]
        };
        // Column group g (16 columns) of this row pair is tile row p of
        // stream (g/2, g%2): 32 words at g·stream + ks·TILE + p·32.
        let base = ks * TILE_U16 + p * 32;
        let groups = i / 16;
        if groups > 0 {
            // SAFETY: the last group ends at (groups-1)·stream + base + 32
            // <= len (asserted above).
            let d = unsafe {
                std::slice::from_raw_parts_mut(dst.add(base), (groups - 1) * stream + 32)
            };
            interleave_rows(&r_even[..groups * 16], &r_odd[..groups * 16], d, stream);
        }
        for c in groups * 16..i {
            let (nb, s, j) = (c / 32, (c % 32) / 16, c % 16);
            let at = (nb * 2 + s) * stream + base + j * 2;
            // SAFETY: as above (column c's stream is at most the last one).
            unsafe {
                *dst.add(at) = r_even[c];
                *dst.add(at + 1) = r_odd[c];
            }
        }
    }
}

/// [`super::WeightSource::rows_interleaved`] through the weight's bf16
/// elements: the rows copied out, then [`interleave_chunk`] (the default
/// for storages without a writer of their own).
pub(crate) fn rows_interleaved_via_elems<W: super::WeightSource + ?Sized>(
    w: &W,
    width: usize,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
    out: &mut [u16],
    stride: usize,
) {
    let (nr, nc) = (rows.len(), cols.len());
    let mut whole = vec![0u16; nr * width];
    w.elems(rows.start * width, &mut whole);
    let part: Vec<u16> = if nc == width {
        whole
    } else {
        whole
            .chunks_exact(width.max(1))
            .flat_map(|r| r[cols.clone()].iter().copied())
            .collect()
    };
    // SAFETY: `out` is a valid slice; `interleave_chunk` asserts that every
    // element it writes (k-step 0 of `stride`-apart groups) is inside it.
    unsafe { interleave_chunk(&part, nr, nc, 0, stride, out.as_mut_ptr(), out.len()) }
}

/// Weight rows `r0..r0 + nr` as k-step `ks` of the input gradient's B
/// layout through [`super::WeightSource::rows_interleaved`] (what
/// [`interleave_chunk`] makes of the rows, each tile written in order).
///
/// # Safety
/// As [`interleave_chunk`]; `i` is a multiple of 16.
#[allow(clippy::too_many_arguments)]
unsafe fn rows_chunk(
    w: &WeightBf16,
    r0: usize,
    nr: usize,
    i: usize,
    ks: usize,
    stream: usize,
    dst: *mut u16,
    len: usize,
) {
    assert!(nr <= 32 && i.is_multiple_of(16) && stream >= TILE_U16);
    let groups = i / 16;
    if groups == 0 || nr == 0 {
        return;
    }
    let n = (groups - 1) * stream + 32 * nr.div_ceil(2);
    assert!(ks * TILE_U16 + n <= len);
    // SAFETY: inside the buffer (asserted); tile `ks` of every stream is
    // this caller's alone, and the writer only touches tile rows of it.
    let d = unsafe { std::slice::from_raw_parts_mut(dst.add(ks * TILE_U16), n) };
    w.rows_interleaved(i, r0..r0 + nr, 0..i, d, stream);
}

/// Rows of W per pass of [`backward_by_groups`]: the output is reloaded
/// once per pass, and a panel holds 64 bytes per row, so a group of
/// [`groups::GROUP_PANEL_BYTES`] has at least 8 panels.
const GROUP_PASS_ROWS: usize = 2048;

/// The input gradient's products by [`groups`]: panel j is columns
/// `32j..32j + 32` of W, over W's rows in passes of [`GROUP_PASS_ROWS`]
/// (dy's k-steps; the last pass then the LoRA term's rows of `A`), written
/// by the weight's interleaved-rows writer for the group's columns.
///
/// # Safety
/// The tile products are available ([`super::available`]); `a` is dy
/// packed with the term's columns (`t` rows, `kp = round_up(o, 32) +
/// 32·ceil(r / 32)` columns); `dx` is `t·i` writable floats; `i` is a
/// multiple of 32.
#[allow(clippy::too_many_arguments)]
unsafe fn backward_by_groups(
    a: &[u16],
    kp: usize,
    o: usize,
    i: usize,
    t: usize,
    w: &WeightBf16,
    up: Option<InputUpTerm>,
    dx: *mut f32,
    acc: bool,
) {
    let ext = up.map_or(0, |u| u.r.div_ceil(32));
    let dx = SendPtr(dx);
    let out = |j: usize| groups::GroupOut {
        c: SendPtr(dx.get().wrapping_add(j * 32)),
        ldc: i,
        nn: 32,
    };
    let mut k0 = 0;
    while k0 < o {
        let k1 = (k0 + GROUP_PASS_ROWS).min(o);
        let last = k1 == o;
        let ksw = (k1 - k0).div_ceil(32);
        let ksc = ksw + if last { ext } else { 0 };
        let stream = ksc * TILE_U16;
        let pack = |js: std::ops::Range<usize>, b: &mut [u16]| {
            let cols = js.start * 32..js.end * 32;
            // tile rows no writer reaches: pairs past a partial last k-step
            // of W's rows, the term's k-steps past its rows
            let zero_from = if (k1 - k0).is_multiple_of(32) {
                ksw * TILE_U16
            } else {
                (ksw - 1) * TILE_U16 + 32 * ((k1 - k0) % 32).div_ceil(2)
            };
            for gg in 0..2 * js.len() {
                b[gg * stream + zero_from..(gg + 1) * stream].fill(0);
            }
            for ks in 0..ksw {
                let r0 = k0 + ks * 32;
                let nr = 32.min(k1 - r0);
                let n = (2 * js.len() - 1) * stream + 32 * nr.div_ceil(2);
                w.rows_interleaved(
                    i,
                    r0..r0 + nr,
                    cols.clone(),
                    &mut b[ks * TILE_U16..][..n],
                    stream,
                );
            }
            if let (Some(u), true) = (&up, last) {
                let width = cols.len();
                let part: Vec<u16> = u.a[..u.r * i]
                    .chunks_exact(i)
                    .flat_map(|row| row[cols.clone()].iter().copied())
                    .collect();
                for (e, rows) in part.chunks(32 * width).enumerate() {
                    // SAFETY: k-step ksw + e of the group's streams (inside
                    // `b`, asserted by `interleave_chunk`).
                    unsafe {
                        interleave_chunk(
                            rows,
                            rows.len() / width,
                            width,
                            ksw + e,
                            stream,
                            b.as_mut_ptr(),
                            b.len(),
                        )
                    };
                }
            }
        };
        let g = groups::panels_per_group(i / 32, 2 * stream * 2);
        // SAFETY: the caller's contract; A's k-steps k0/32 .. k0/32 + ksc
        // are this pass's rows of W (and, last, the term's); panel j's C
        // is dx's columns 32j.. .
        unsafe {
            groups::run_groups(
                a,
                kp,
                k0 / 32,
                t,
                ksc,
                i / 32,
                g,
                acc || k0 > 0,
                &pack,
                &out,
            )
        };
        k0 = k1;
    }
}

/// `dx[t, i] += dy[t, o] · W`, W `[o, i]` given by `w`.
///
/// # Panics
/// If AMX is not [`available`] or the sizes do not match.
pub fn linear_backward(o: usize, i: usize, t: usize, dy: &[f32], dx: &mut [f32], w: &WeightBf16) {
    assert_eq!(dx.len(), t * i, "amx backward: dx size");
    // SAFETY: dx is t·i floats, exclusively borrowed.
    unsafe { backward_raw(o, i, t, dy, dx.as_mut_ptr(), w, None, None, false) };
}

/// `dx = dy · W` into a fresh vector: the first weight chunk's products
/// start from zero tiles instead of loading a zeroed `dx` (no zeroing pass,
/// no read of it). Bit for bit [`linear_backward`] into zeros (both start
/// the sums at +0).
///
/// # Panics
/// If AMX is not [`available`] or the sizes do not match.
pub fn linear_backward_new(o: usize, i: usize, t: usize, dy: &[f32], w: &WeightBf16) -> Vec<f32> {
    let mut dx: Vec<f32> = Vec::with_capacity(t * i);
    // SAFETY: capacity t·i; `backward_raw` in overwrite mode writes every
    // element (the products whole, zeros when o = 0) before `set_len`.
    unsafe {
        backward_raw(o, i, t, dy, dx.as_mut_ptr(), w, None, None, true);
        dx.set_len(t * i);
    }
    dx
}

/// [`linear_backward`] (with a LoRA term) through a raw `dx`; with `overwrite`, `dx` is
/// not read before the products write it (it may be uninitialized).
///
/// # Safety
/// `dx` is valid for reads and writes of `t·i` floats (writes only, until
/// written, with `overwrite`) and not aliased.
#[allow(clippy::too_many_arguments)]
unsafe fn backward_raw(
    o: usize,
    i: usize,
    t: usize,
    dy: &[f32],
    dx: *mut f32,
    w: &WeightBf16,
    up: Option<InputUpTerm>,
    lora: Option<LowRankBackward>,
    overwrite: bool,
) -> Option<LowRankGrads> {
    assert!(available(), "AMX bf16 path called without AMX");
    assert_eq!(dy.len(), t * o, "amx backward: dy size");
    assert!(up.is_none() || lora.is_none());
    if t == 0 || i == 0 || o == 0 {
        // nothing for the tiles: a LoRA module's dxa and dB as plain sums
        let grads = lora.map(|l| low_rank_plain(o, t, dy, l));
        if i > 0 && t > 0 && overwrite {
            // SAFETY: dx is t·i floats (the caller's contract).
            unsafe { std::ptr::write_bytes(dx, 0, t * i) };
        }
        assert!(
            up.is_none() || o > 0 || i == 0 || t == 0,
            "amx backward: a LoRA term on an empty weight"
        );
        return grads;
    }
    let ko = round_up(o, 32);
    // the LoRA term's k-steps, after dy's (in the last chunk)
    let ext = up
        .map(|u| u.r)
        .or(lora.map(|l| l.r))
        .map_or(0, |r| r.div_ceil(32));
    let kp = ko + 32 * ext;
    let extra = |row: usize, buf: &mut [u16]| {
        if let Some(u) = &up {
            let v = &u.dxa[row * u.r..(row + 1) * u.r];
            crate::ops::fastmath::to_bf16(v, &mut buf[ko..ko + u.r]);
        }
    };
    with_scratch(&SCRATCH_A, |a| {
        let extra: Option<&super::RowExtra> = up.is_some().then_some(&extra);
        // a LoRA module's dy products come from the packed dy, its dxa
        // then goes into the term's k-steps (as `extra` writes a given one)
        let grads = match &lora {
            Some(l) => Some(super::low_rank::pack_dy_with_lora(dy, t, o, kp, a, l)),
            None => {
                pack_a_hooked(dy, t, o, o, 0, kp, a, None, extra);
                None
            }
        };
        let up = up.or_else(|| {
            let (g, l) = (grads.as_ref()?, lora?);
            Some(InputUpTerm {
                dxa: &g.dxa,
                a: l.a,
                r: l.r,
            })
        });
        // SAFETY: the caller's contract; `a` is dy packed with the term's
        // columns (kp of them).
        unsafe { backward_packed(&a[..], kp, o, i, t, w, up, dx, overwrite) };
        grads
    })
}

/// The products of [`backward_raw`] from `dy` already packed (`a`, `kp`
/// columns: dy's, then the LoRA term's `bf16(dxa)` when `up` is given).
///
/// # Safety
/// The tile products are available ([`super::available`]); `dx` as in
/// [`backward_raw`]; `t`, `i`, `o` > 0.
#[allow(clippy::too_many_arguments)]
unsafe fn backward_packed(
    a: &[u16],
    kp: usize,
    o: usize,
    i: usize,
    t: usize,
    w: &WeightBf16,
    up: Option<InputUpTerm>,
    dx: *mut f32,
    overwrite: bool,
) {
    let ko = round_up(o, 32);
    let ext = up.map_or(0, |u| u.r.div_ceil(32));
    assert!(kp == ko + 32 * ext && a.len() >= round_up(t, 32) * kp);
    let mp = round_up(t, 32);
    let nblocks = i.div_ceil(32);
    // Weight rows per chunk: a multiple of 32 (see `backward_chunk_elems`).
    let kc = ((CHUNK_ELEMS / i) / 32 * 32).clamp(32, ko);
    // A too big for a core's L2: groups of whole-K panels (see `groups`)
    // a pass's panel: 32 columns of W over GROUP_PASS_ROWS of its rows
    // (and the term's)
    let pass_panel = 2 * (o.min(GROUP_PASS_ROWS).div_ceil(32) + ext) * TILE_U16 * 2;
    let grouped = groups::group_size(mp * kp * 2, nblocks, pass_panel).is_some();
    if grouped && i.is_multiple_of(32) && w.has_rows_interleaved() {
        // SAFETY: as below; every panel is 32 whole columns of dx.
        unsafe { backward_by_groups(a, kp, o, i, t, w, up, dx, !overwrite) };
        return;
    }
    with_scratch(&SCRATCH_C, |chunk| {
        let dxp = SendPtr(dx);
        let mut k0 = 0;
        while k0 < o {
            // the first chunk's products start from zero tiles when
            // overwriting, the others add to what the earlier ones wrote
            let acc = !(overwrite && k0 == 0);
            let k1 = (k0 + kc).min(o);
            let ksw = (k1 - k0).div_ceil(32);
            // the last chunk also carries the LoRA term's rows
            let ksc = ksw + if k1 == o { ext } else { 0 };
            // [nblocks][2 streams][ksc][512]
            let stream = ksc * TILE_U16;
            let need = nblocks * 2 * stream;
            chunk.resize(need);
            if !i.is_multiple_of(32) || !(k1 - k0).is_multiple_of(32) {
                chunk[..need].fill(0);
            } else if ksc > ksw {
                // only the term's tiles: its rows fill part of them
                for g in 0..nblocks * 2 {
                    chunk[g * stream + ksw * TILE_U16..(g + 1) * stream].fill(0);
                }
            }
            let cp = SendPtr(chunk.as_mut_ptr());
            if let (Some(u), true) = (&up, ksc > ksw) {
                for (e, rows) in u.a[..u.r * i].chunks(32 * i).enumerate() {
                    // SAFETY: k-step ksw + e of the chunk (inside `need`,
                    // asserted by `interleave_chunk`); no task writes it.
                    unsafe {
                        interleave_chunk(rows, rows.len() / i, i, ksw + e, stream, cp.get(), need)
                    };
                }
            }
            let by_rows = w.has_rows_interleaved() && i.is_multiple_of(16);
            (0..ksw).into_par_iter().for_each(|ks| {
                if by_rows {
                    let r0 = k0 + ks * 32;
                    let nr = 32.min(k1 - r0);
                    // SAFETY: as below.
                    unsafe { rows_chunk(w, r0, nr, i, ks, stream, cp.get(), need) };
                    return;
                }
                with_scratch(&SCRATCH_B, |sc| {
                    let r0 = k0 + ks * 32;
                    let nr = 32.min(k1 - r0);
                    sc.resize(nr * i);
                    let sc = &mut sc[..nr * i];
                    w.elems(r0 * i, sc);
                    // SAFETY: k-step ks of a [nblocks][2][ksc][512]
                    // buffer of `need` elements; tasks write disjoint `ks` tiles.
                    unsafe { interleave_chunk(sc, nr, i, ks, stream, cp.get(), need) };
                });
            });
            let chunk_ref = &chunk[..need];
            if let Some(slices) = row_slices(mp, ksc * 32) {
                let panels: Vec<PanelOut> = (0..nblocks)
                    .map(|nb| PanelOut {
                        b: chunk_ref[nb * 2 * stream..].as_ptr(),
                        bstride: ksc,
                        c: SendPtr(dxp.get().wrapping_add(nb * 32)),
                        ldc: i,
                        nn: 32.min(i - nb * 32),
                    })
                    .collect();
                // SAFETY: A (dy packed, t rows) is read from its k0/32-th
                // k-step for ksc; every panel's B is ksc tiles per stream
                // of the packed chunk; the panels' C columns are disjoint.
                unsafe {
                    products_by_rows(
                        a,
                        kp,
                        t,
                        k0 / 32,
                        ksc,
                        &slices,
                        &panels,
                        acc,
                        &|_| {},
                        &|_| true,
                    )
                };
                k0 = k1;
                continue;
            }
            (0..nblocks).into_par_iter().for_each(|nb| {
                let n0 = nb * 32;
                let nn = 32.min(i - n0);
                // SAFETY: as in the forward; A is read from column k0 on, i.e.
                // from its k0/32-th tile of each row group (its padding columns
                // are zero, as are the chunk's padding rows).
                unsafe {
                    kernel::run_blocks(
                        a.as_ptr().add(k0 / 32 * TILE_U16),
                        kp,
                        mp,
                        t,
                        chunk_ref.as_ptr().add(nb * 2 * stream),
                        ksc,
                        ksc,
                        dxp.get().add(n0),
                        i,
                        nn,
                        acc,
                    );
                }
            });
            k0 = k1;
        }
    });
}

/// [`LowRankGrads`] as plain f32 sums, for shapes with nothing for the
/// tiles (an empty `t`, `o` or input).
fn low_rank_plain(o: usize, t: usize, dy: &[f32], l: LowRankBackward) -> LowRankGrads {
    let r = l.r;
    let mut dxa = vec![0f32; t * r];
    let mut db = vec![0f32; o * r];
    for row in 0..t {
        for q in 0..o {
            let g = dy[row * o + q] * l.scale;
            for j in 0..r {
                dxa[row * r + j] += g * l.b[q * r + j];
                db[q * r + j] += g * l.xa[row * r + j];
            }
        }
    }
    LowRankGrads { dxa, db }
}
