//! bf16 products of the frozen base linears on Intel AMX (`TDPBF16PS`), f32
//! accumulation.
//!
//! The weight is dequantized (or converted) straight into bf16 tiles in the
//! pair-interleaved ("VNNI") layout the instruction wants, 32 rows at a time,
//! never as a whole; the activations are rounded to bf16 once per call; the
//! products accumulate in f32 tiles that are loaded from / stored to the f32
//! output directly. Both directions use the same 32×32 micro-kernel:
//!
//! - forward `y[t, o] = x[t, i] · Wᵀ`: A = x, B = Wᵀ (pairs of consecutive
//!   elements of one weight row, transposed into the tile's columns);
//! - input gradient `dx[t, i] += dy[t, o] · W`: A = dy, B = W (two consecutive
//!   weight rows interleaved).
//!
//! On CPUs with AVX512-BF16 but no AMX (AMD Zen 4, Intel Cooper Lake) the
//! same operands, in the same layouts, go through `VDPBF16PS` instead
//! ([`emulated`]): only the innermost 32 × 32 block differs, so every
//! packing, chunking and fusion here serves both ([`TileIsa`]).
//!
//! Availability is decided at run time (CPUID AMX-TILE + AMX-BF16, then the
//! Linux `arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA)` permission request;
//! else AVX-512 F + AVX512-BF16); callers fall back to the f32 GEMM when
//! neither is there. `QLORA_NO_AMX=1` turns the bf16 tile path off
//! (benchmarks, tests of the fallback); `QLORA_TILE_ISA=amx|avx512bf16`
//! picks one of the two where the CPU has both (tests of the second), and
//! `QLORA_TILE_ISA=reference` runs the instruction's plain definition on
//! any x86_64 CPU (tests on CPUs with neither).

use std::cell::RefCell;

use rayon::prelude::*;

/// One tile: 16 rows of 64 bytes = 512 bf16.
pub(crate) const TILE_U16: usize = 512;
/// Rows of the weight dequantized per backward chunk (a multiple of 32):
/// about this many elements at a time (8 MiB of bf16; the planner mirrors it
/// as `AMX_CHUNK_ELEMS`). Every chunk reloads and stores the output tiles,
/// so fewer chunks save passes over `dx`: 2^20 was 14% slower than 2^21 at
/// TinyLlama's input gradients (in a step, 3 rounds); 2^22 was no better
/// while the chunk went through a row-major copy, and 7-10% faster than 2^21
/// once 4-bit rows were written into it directly (the input gradients
/// 452-472 -> 382-428 ms per 8-layer step, alternating, 3 rounds); 2^23 no
/// better than 2^22.
const CHUNK_ELEMS: usize = 1 << 22;

pub use super::fastmath::bf16_bits;

/// The instructions the bf16 tile products run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TileIsa {
    /// Intel AMX (`TDPBF16PS` on 16 × 16 tiles): Sapphire Rapids and later.
    Amx,
    /// AVX512-BF16 (`VDPBF16PS`, [`emulated`]) on the same operand layouts.
    Avx512Bf16,
    /// The plain definition of the instruction ([`emulated::block_ref`]),
    /// bit for bit [`Self::Avx512Bf16`]: never chosen by itself, only by
    /// `QLORA_TILE_ISA=reference`, so that the tests run every packing and
    /// fusion of this module on a CPU with neither (slowly).
    Reference,
}

impl TileIsa {
    /// Whether this CPU (and, for AMX, the OS) can run it.
    pub fn supported(self) -> bool {
        match self {
            TileIsa::Amx => {
                static AMX: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
                *AMX.get_or_init(imp::detect)
            }
            TileIsa::Avx512Bf16 => super::fastmath::has_avx512_bf16(),
            // the blocks' driver (`imp`) is x86_64 code
            TileIsa::Reference => cfg!(target_arch = "x86_64"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            TileIsa::Amx => "amx",
            TileIsa::Avx512Bf16 => "avx512bf16",
            TileIsa::Reference => "reference",
        }
    }
}

/// The tile ISA of this process (decided once): AMX where it runs, else
/// AVX512-BF16, else none; `QLORA_NO_AMX=1` gives none, `QLORA_TILE_ISA`
/// (`amx`, `avx512bf16`, `reference`, `none`) asks for one (none if the CPU
/// lacks it).
pub fn isa() -> Option<TileIsa> {
    static ISA: std::sync::OnceLock<Option<TileIsa>> = std::sync::OnceLock::new();
    *ISA.get_or_init(|| {
        if std::env::var_os("QLORA_NO_AMX").is_some_and(|v| v != "0") {
            return None;
        }
        let wanted = std::env::var("QLORA_TILE_ISA").ok();
        let candidates: &[TileIsa] = match wanted.as_deref() {
            None | Some("") | Some("auto") => &[TileIsa::Amx, TileIsa::Avx512Bf16],
            Some("amx") => &[TileIsa::Amx],
            Some("avx512bf16") => &[TileIsa::Avx512Bf16],
            Some("reference") => &[TileIsa::Reference],
            Some("none") => &[],
            Some(other) => {
                eprintln!(
                    "warning: QLORA_TILE_ISA={other} is not one of amx, avx512bf16, reference, none, auto; using auto"
                );
                &[TileIsa::Amx, TileIsa::Avx512Bf16]
            }
        };
        let found = candidates.iter().copied().find(|i| i.supported());
        // only where one instruction set was named (not auto, none or unknown)
        if let ([named], None) = (candidates, found) {
            eprintln!(
                "warning: QLORA_TILE_ISA={}: this CPU (or OS) cannot run it; \
                 bf16 compute falls back to the f32 products",
                named.name()
            );
        }
        found
    })
}

/// Whether the bf16 tile products can run in this process ([`isa`]).
pub fn available() -> bool {
    isa().is_some()
}

/// Whether the tile products run on AMX itself (not [`emulated`]).
#[inline]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn on_amx() -> bool {
    isa() == Some(TileIsa::Amx)
}

/// A frozen weight as the AMX products read it: its bf16 elements and,
/// where its storage has one, a writer straight into the input gradient's
/// operand layout (a 4-bit weight then skips a row-major bf16 copy in
/// between). [`Self::has_rows_interleaved`] says whether that writer is
/// fast; the default goes through [`Self::elems`] and gives the same values.
pub trait WeightSource: Sync {
    /// Writes elements `start .. start + out.len()` of the row-major
    /// `[rows, cols]` weight as bf16 bits into `out`.
    fn elems(&self, start: usize, out: &mut [u16]);

    /// Whether [`Self::rows_interleaved`] has a writer of its own.
    fn has_rows_interleaved(&self) -> bool {
        false
    }

    /// Rows `rows` (at most 32 of them; `width` per row, a multiple of 16),
    /// columns `cols` (on the 16-column grid), in the input gradient's B
    /// layout: for each group g of 16 columns of the range and pair p, the
    /// 32 words `W[r0 + 2p][c0 + 16g + j], W[r0 + 2p + 1][c0 + 16g + j]` at
    /// `out[g·stride + 32p ..]` (a row past the range as zeros; `r0`, `c0`
    /// the ranges' starts).
    fn rows_interleaved(
        &self,
        width: usize,
        rows: std::ops::Range<usize>,
        cols: std::ops::Range<usize>,
        out: &mut [u16],
        stride: usize,
    ) {
        backward::rows_interleaved_via_elems(self, width, rows, cols, out, stride)
    }

    /// Rows `r0..r0 + nr` (at most 32; `cols` per row) as the forward's B
    /// panel ([`pack_b_forward`]'s layout, `ksteps` tiles per stream, zeros
    /// past the rows and columns). The default goes through
    /// [`Self::elems`] and a transpose; a 4-bit weight writes the tiles
    /// straight from its codes.
    fn forward_panel(&self, cols: usize, r0: usize, nr: usize, ksteps: usize, out: &mut [u16]) {
        forward_panel_via_elems(self, cols, r0, nr, ksteps, out)
    }
}

/// [`WeightSource::forward_panel`] through the weight's elements: the rows
/// as bf16 in a scratch, then [`pack_b_forward`].
pub fn forward_panel_via_elems<W: WeightSource + ?Sized>(
    w: &W,
    cols: usize,
    r0: usize,
    nr: usize,
    ksteps: usize,
    out: &mut [u16],
) {
    with_scratch(&SCRATCH_B, |sc| {
        sc.resize(nr * cols);
        w.elems(r0 * cols, &mut sc[..nr * cols]);
        pack_b_forward(&sc[..nr * cols], nr, cols, ksteps, out);
    });
}

impl<F: Fn(usize, &mut [u16]) + Sync> WeightSource for F {
    fn elems(&self, start: usize, out: &mut [u16]) {
        self(start, out)
    }
}

/// A weight source as the products take it (a closure writing bf16
/// elements is one).
pub type WeightBf16<'a> = dyn WeightSource + 'a;

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
/// [`super::skinny::pack_transposed`] lays it out (`[r, ldp]`).
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

/// A raw pointer tasks may share, each writing its own disjoint part.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr<T>(pub(crate) *mut T);
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}
impl<T> SendPtr<T> {
    pub(crate) fn get(self) -> *mut T {
        self.0
    }
}

mod tile_buf;
pub(crate) use tile_buf::TileBuf;

#[cfg(target_arch = "x86_64")]
pub(crate) mod emulated;

mod backward;
mod groups;
pub(crate) use backward::rows_interleaved_via_elems;
pub use backward::{linear_backward, linear_backward_new};

mod packed;
pub use packed::PackedWeight;

thread_local! {
    /// Reused per-thread scratch buffers (taken out while in use, so a nested
    /// call on the same thread just starts with an empty one).
    static SCRATCH_A: RefCell<TileBuf> = const { RefCell::new(TileBuf::new()) };
    // the second packed dy of the MLP's gate/up pair
    static SCRATCH_A2: RefCell<TileBuf> = const { RefCell::new(TileBuf::new()) };
    static SCRATCH_B: RefCell<TileBuf> = const { RefCell::new(TileBuf::new()) };
    static SCRATCH_C: RefCell<TileBuf> = const { RefCell::new(TileBuf::new()) };
    static SCRATCH_ROW: RefCell<TileBuf> = const { RefCell::new(TileBuf::new()) };
    static SCRATCH_GROUP: RefCell<TileBuf> = const { RefCell::new(TileBuf::new()) };
    static SCRATCH_PANEL: RefCell<TileBuf> = const { RefCell::new(TileBuf::new()) };
}

fn with_scratch<R>(
    key: &'static std::thread::LocalKey<RefCell<TileBuf>>,
    f: impl FnOnce(&mut TileBuf) -> R,
) -> R {
    let mut v = key.with_borrow_mut(std::mem::take);
    let r = f(&mut v);
    key.with_borrow_mut(|s| {
        if s.raw.capacity() < v.raw.capacity() {
            *s = v;
        }
    });
    r
}

#[inline]
pub(crate) fn round_up(x: usize, m: usize) -> usize {
    x.div_ceil(m) * m
}

/// Rows `0..rows` of `src` (row stride `ld`, starting at column `col0`,
/// `cols` wide) as bf16 into `a`, zero-padded to `[round_up(rows,32), kp]`
/// and laid out tile by tile: `[rows/16][kp/32][16 × 32]`, so that every A
/// tile the kernel loads is 1 KiB of consecutive memory (one stream for the
/// prefetchers) instead of 16 lines a row stride apart (5-25% faster products
/// from L2 in a micro-benchmark here). Element `(r, c)` is at
/// [`a_index`]`(r, c, kp)`.
pub(crate) fn pack_a(
    src: &[f32],
    rows: usize,
    cols: usize,
    ld: usize,
    col0: usize,
    kp: usize,
    a: &mut TileBuf,
) {
    pack_a_hooked(src, rows, cols, ld, col0, kp, a, None, None)
}

/// Writes a packed row's columns past the source's (`(row, the row's kp
/// bf16 values)`), after the source's values and their zero padding.
pub type RowExtra<'a> = dyn Fn(usize, &mut [u16]) + Sync + 'a;

/// Work on a group of rows of A's source while the group is in cache:
/// `hook(rows)`, which [`pack_a_hooked`] calls right before packing them.
pub type RowsHook<'a> = dyn Fn(std::ops::Range<usize>) + Sync + 'a;

/// [`pack_a`], calling `hook` on each group of real rows (16 at a time,
/// every row in exactly one call, in parallel) right before packing it,
/// and `extra` on each real row's values before they go into the tiles.
#[allow(clippy::too_many_arguments)]
pub(crate) fn pack_a_hooked(
    src: &[f32],
    rows: usize,
    cols: usize,
    ld: usize,
    col0: usize,
    kp: usize,
    a: &mut TileBuf,
    hook: Option<&RowsHook>,
    extra: Option<&RowExtra>,
) {
    let mp = round_up(rows, 32);
    a.resize(mp * kp);
    a[..mp * kp]
        .par_chunks_mut(kp * 16)
        .enumerate()
        .for_each(|(g, dst)| {
            if let Some(hook) = hook {
                if g * 16 < rows {
                    // before the pack: the rows come into cache for both
                    hook(g * 16..rows.min(g * 16 + 16));
                }
            }
            pack_a_group(src, rows, cols, ld, col0, kp, g, dst, extra);
        });
}

/// Row group `g` (rows `16g..16g + 16`) of [`pack_a_hooked`]'s layout into
/// `dst` (that group's `16·kp` elements).
#[allow(clippy::too_many_arguments)]
pub(crate) fn pack_a_group(
    src: &[f32],
    rows: usize,
    cols: usize,
    ld: usize,
    col0: usize,
    kp: usize,
    g: usize,
    dst: &mut [u16],
    extra: Option<&RowExtra>,
) {
    with_scratch(&SCRATCH_ROW, |row_buf| {
        row_buf.resize(kp);
        for r in 0..16 {
            let row = g * 16 + r;
            // a strided source (a head's columns): rows a stride
            // apart, which the hardware prefetchers do not follow
            if ld > cols && row + super::fastmath::PREFETCH_ROWS < rows {
                super::fastmath::prefetch(
                    src[(row + super::fastmath::PREFETCH_ROWS) * ld + col0..].as_ptr(),
                    cols,
                );
            }
            if row >= rows {
                row_buf.fill(0);
            } else {
                to_bf16_padded(&src[row * ld + col0..][..cols], row_buf);
                if let Some(extra) = extra {
                    extra(row, &mut row_buf[..kp]);
                }
            }
            // this group's 16 rows: rows 0..16 of its own slice
            put_a_row(dst, r, kp, row_buf);
        }
    })
}

/// `src` as bf16 into the front of `dst`, zeros after it (a row padded to
/// an operand's width).
pub(crate) fn to_bf16_padded(src: &[f32], dst: &mut [u16]) {
    super::fastmath::to_bf16(src, &mut dst[..src.len()]);
    dst[src.len()..].fill(0);
}

/// Row `r` of a [`pack_a`] layout with `kp` columns from `row` (bf16, its
/// first `kp` values): a producer that has the row in cache writes it into
/// the tiles itself instead of a pack pass reading it back.
pub(crate) fn put_a_row(a: &mut [u16], r: usize, kp: usize, row: &[u16]) {
    for (ks, chunk) in row[..kp].chunks_exact(32).enumerate() {
        a[a_index(r, ks * 32, kp)..][..32].copy_from_slice(chunk);
    }
}

/// Where [`pack_a`] puts element `(r, c)` of A (`kp` padded columns).
pub(crate) fn a_index(r: usize, c: usize, kp: usize) -> usize {
    ((r / 16) * (kp / 32) + c / 32) * TILE_U16 + (r % 16) * 32 + c % 32
}

/// The forward's B panel of 32 weight rows (`wrows`, `nn <= 32` rows of `i`
/// bf16): `b` is `[2 streams][ksteps][16 × 32]`, element `(q, j)` of tile
/// `(s, ks)` holding the pair `wrows[16s + j][2(16ks + q) ..][..2]`, zero
/// where past the rows or columns. As u32 pairs this is a 16 × 16 transpose
/// per tile, done in registers with AVX-512 (the plain loop otherwise).
pub(crate) fn pack_b_forward(wrows: &[u16], nn: usize, i: usize, ksteps: usize, b: &mut [u16]) {
    #[cfg(target_arch = "x86_64")]
    if super::fastmath::Isa::V4.available() {
        // SAFETY: AVX-512 F was detected at run time.
        unsafe { transpose::pack_b_forward_avx512(wrows, nn, i, ksteps, b) };
        return;
    }
    pack_b_forward_ref(wrows, nn, i, ksteps, b);
}

/// Plain reference of [`pack_b_forward`].
fn pack_b_forward_ref(wrows: &[u16], nn: usize, i: usize, ksteps: usize, b: &mut [u16]) {
    assert!(nn <= 32 && wrows.len() >= nn * i && b.len() >= 2 * ksteps * TILE_U16);
    if nn < 32 || !i.is_multiple_of(32) || 32 * ksteps > i {
        b[..2 * ksteps * TILE_U16].fill(0);
    }
    // Column jj of the panel: the pairs of weight row jj.
    for jj in 0..nn {
        let (s, j) = (jj / 16, jj % 16);
        let row = &wrows[jj * i..(jj + 1) * i];
        let dst = &mut b[s * ksteps * TILE_U16..(s + 1) * ksteps * TILE_U16];
        let mut pairs = row.chunks_exact(2);
        for (q, pr) in (&mut pairs).enumerate() {
            dst[q * 32 + j * 2] = pr[0];
            dst[q * 32 + j * 2 + 1] = pr[1];
        }
        if let [last] = pairs.remainder() {
            dst[(i / 2) * 32 + j * 2] = *last;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod transpose;

mod low_rank;
mod operands;
pub use backward::{
    linear_backward_lora, linear_backward_swiglu_pair, linear_backward_up, swiglu_pair_fits,
    InputUpTerm, LowRankBackward, LowRankGrads,
};
pub(crate) use operands::{pack_b_pairs, product};

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
                imp::run_blocks(
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

/// Below this many bytes of packed A, the products split the output's
/// columns among the threads (every thread streams all of A once per 32
/// columns, from its L2); above it, where the output has too few panels
/// for [`groups`], they split A's rows, so that each core re-reads only
/// its share. At TinyLlama's 512 x 2048 (2 MiB of bf16, a
/// whole L2 here) the column split streams A from L3: a micro-benchmark of
/// the two (B panels packed beforehand, both cores) 1.73-2.14 vs 2.52-2.66
/// TFLOP/s.
const ROW_SPLIT_MIN_A_BYTES: usize = 1 << 20;
/// Weight elements per round of the forward's row split (2 MiB of bf16
/// panels; the planner mirrors it as `AMX_ROUND_ELEMS`): the round's panels
/// stay in one buffer until every thread has used them, one parallel region
/// per round. Measured at TinyLlama's shapes: 2^19..2^21 alike, 2^23 (every
/// panel of a projection in memory) 5-20% slower at gate/up, a round per
/// 8 panels with its own pack region slower still (the other thread woken
/// twice per round).
const ROW_SPLIT_ROUND_ELEMS: usize = 1 << 20;
/// Bytes of a thread's rows of A kept in its L2 while it runs through a
/// round's panels: longer K is done in passes of this many bytes, the
/// output accumulated between them (TinyLlama's down projection, K 5632:
/// a micro-benchmark 1.59 TFLOP/s in one pass, 2.03-2.07 in passes).
const ROW_SPLIT_A_PASS_BYTES: usize = 1 << 20;

/// The 32-row block ranges of A, one per thread, when A is big enough for
/// the row split ([`ROW_SPLIT_MIN_A_BYTES`]) and has at least four blocks
/// per thread (fewer would leave the threads unevenly loaded).
fn row_slices(mp: usize, kp: usize) -> Option<Vec<std::ops::Range<usize>>> {
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
struct PanelOut {
    b: *const u16,
    bstride: usize,
    c: SendPtr<f32>,
    ldc: usize,
    nn: usize,
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
unsafe fn products_by_rows(
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
                    imp::run_blocks_pf(
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
/// kept from an earlier forward, or else made from `x` with `at` (`Aᵀ`,
/// `[i, ldat]` as [`super::skinny::pack_transposed`] lays it out); and its
/// up-projection operand `p = s·Bᵀ` (`[r, ldp]`).
pub struct LoraTerm<'a> {
    pub kept: Option<Vec<f32>>,
    pub at: &'a [f32],
    pub ldat: usize,
    pub r: usize,
    pub p: &'a [f32],
    pub ldp: usize,
}

/// The products of several weights sharing `x` with their LoRA modules:
/// each module's down-projection `x·Aᵀ` (f32, bit for bit
/// [`super::skinny::nn`] over `x`) is made on each group of rows of `x`
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
            tm.ldp >= super::skinny::padded(o) && tm.p.len() >= tm.r * tm.ldp,
            "amx forward: LoRA up operand"
        );
        match &tm.kept {
            Some(xa) => assert!(xa.len() >= t * tm.r, "amx forward: kept x·Aᵀ size"),
            None => assert!(
                tm.ldat >= super::skinny::padded(tm.r) && tm.at.len() >= i * tm.ldat,
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
    let downs: Vec<(SendPtr<f32>, &[f32], usize, usize)> = terms
        .iter()
        .zip(&mut xas)
        .filter_map(|(tm, xa)| {
            let (tm, xa) = (tm.as_ref()?, xa.as_mut()?);
            (xa.is_empty() && tm.r > 0).then_some((SendPtr(xa.as_mut_ptr()), tm.at, tm.ldat, tm.r))
        })
        .collect();
    let isa = super::fastmath::Isa::best();
    let hook = |rows: std::ops::Range<usize>| {
        for (xa, at, ldat, r) in &downs {
            let (r, xin) = (*r, &x[rows.start * i..rows.end * i]);
            // SAFETY: rows `rows` of this x·Aᵀ ([t, r], capacity t·r) are
            // this group's alone.
            unsafe {
                super::skinny::nn_strided(
                    isa,
                    rows.len(),
                    r,
                    i,
                    xin,
                    i,
                    at,
                    *ldat,
                    xa.get().add(rows.start * r),
                    r,
                    false,
                )
            };
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
            super::fastmath::to_bf16(v, &mut buf[kx + off..kx + off + r]);
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

#[cfg(target_arch = "x86_64")]
mod imp {
    use std::arch::asm;

    pub fn detect() -> bool {
        #[allow(unused_unsafe)]
        // SAFETY: CPUID is always available on x86_64.
        let (max, l7) = unsafe {
            (
                core::arch::x86_64::__cpuid_count(0, 0).eax,
                core::arch::x86_64::__cpuid_count(7, 0),
            )
        };
        if max < 7 {
            return false;
        }
        let amx_bf16 = (l7.edx >> 22) & 1 == 1;
        let amx_tile = (l7.edx >> 24) & 1 == 1;
        if !(amx_bf16 && amx_tile) {
            return false;
        }
        request_permission()
    }

    #[cfg(target_os = "linux")]
    fn request_permission() -> bool {
        const SYS_ARCH_PRCTL: isize = 158;
        const ARCH_REQ_XCOMP_PERM: usize = 0x1023;
        const XFEATURE_XTILEDATA: usize = 18;
        let ret: isize;
        // SAFETY: a plain syscall; it only changes this process's permitted
        // xstate components (or fails with an error code).
        unsafe {
            asm!(
                "syscall",
                inlateout("rax") SYS_ARCH_PRCTL => ret,
                in("rdi") ARCH_REQ_XCOMP_PERM,
                in("rsi") XFEATURE_XTILEDATA,
                lateout("rcx") _,
                lateout("r11") _,
                options(nostack),
            );
        }
        ret == 0
    }

    #[cfg(not(target_os = "linux"))]
    fn request_permission() -> bool {
        false
    }

    #[repr(C, align(64))]
    struct TileCfg([u8; 64]);

    /// Palette 1; tmm0-7 all 16 rows × 64 bytes.
    const CFG: TileCfg = {
        let mut c = [0u8; 64];
        c[0] = 1;
        let mut t = 0;
        while t < 8 {
            c[16 + 2 * t] = 64;
            c[48 + t] = 16;
            t += 1;
        }
        TileCfg(c)
    };

    /// Lines `from..to` of a region of two tile streams (`s0`, `s1`, `half`
    /// lines each) to prefetch into L2 over a kernel's k-steps.
    #[derive(Clone, Copy)]
    pub struct PfLines {
        s0: *const u8,
        s1: *const u8,
        half: usize,
        pub(in crate::ops::amx) from: usize,
        pub(in crate::ops::amx) to: usize,
    }

    impl PfLines {
        pub const NONE: PfLines = PfLines {
            s0: std::ptr::null(),
            s1: std::ptr::null(),
            half: 0,
            from: 0,
            to: 0,
        };

        pub(in crate::ops::amx) fn at(&self, l: usize) -> *const u8 {
            if l < self.half {
                self.s0.wrapping_add(l * 64)
            } else {
                self.s1.wrapping_add((l - self.half) * 64)
            }
        }
    }

    /// C (32×32 f32 at `c`, row stride `ldc` bytes) (+)= A (two tile streams:
    /// rows 0..16 from `a`, rows 16..32 from `a + group` bf16, one 1024-byte
    /// tile per k-step each, as [`super::pack_a`] lays them out) · B (two tile
    /// streams `b0`, `b1`, likewise). Tile config must be loaded. `next_c`
    /// (or null): the next block's C (same `ldc`), whose 64 lines are
    /// prefetched for writing over the k-steps: a block's tile stores (and
    /// loads) otherwise wait on memory line by line, 16 lines a row stride
    /// apart, which no hardware prefetcher follows. Measured here: the
    /// products over 30 layers' inputs and fresh outputs 626 -> 786 GFLOP/s
    /// (q/o), 782 -> 1171-1216 (gate/up); a SmolLM2 step +3.7%. Off AMX
    /// the [`super::emulated`] block makes the same prefetches in its first
    /// pass (Zen 4, the products over 30 layers' inputs +3-7.5%).
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn kernel(
        a: *const u16,
        group: usize,
        b0: *const u16,
        b1: *const u16,
        ksteps: usize,
        c: *mut f32,
        ldc: usize,
        acc: bool,
        next_c: *const f32,
        pf: PfLines,
    ) {
        if super::on_amx() {
            kernel_amx(a, group, b0, b1, ksteps, c, ldc, acc, next_c, pf)
        } else {
            let c10 = c.byte_add(16 * ldc);
            super::emulated::run(&super::emulated::Block {
                a0: a,
                a1: a.add(group),
                a_step: super::TILE_U16,
                b0,
                b1,
                b_step: super::TILE_U16,
                ksteps,
                c: [c, c.add(16), c10, c10.add(16)],
                ldc,
                acc,
                next_c,
                pf,
            })
        }
    }

    /// [`kernel`] on the AMX tiles.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn kernel_amx(
        a: *const u16,
        group: usize,
        b0: *const u16,
        b1: *const u16,
        ksteps: usize,
        c: *mut f32,
        ldc: usize,
        acc: bool,
        next_c: *const f32,
        pf: PfLines,
    ) {
        const TILE: usize = super::TILE_U16;
        let a1 = a.add(group);
        let c01 = c.add(16);
        let c10 = c.byte_add(16 * ldc);
        let c11 = c10.add(16);
        if acc {
            asm!(
                "tileloadd tmm0, [{c00} + {ldc}*1]",
                "tileloadd tmm1, [{c01} + {ldc}*1]",
                "tileloadd tmm2, [{c10} + {ldc}*1]",
                "tileloadd tmm3, [{c11} + {ldc}*1]",
                c00 = in(reg) c, c01 = in(reg) c01, c10 = in(reg) c10, c11 = in(reg) c11,
                ldc = in(reg) ldc,
                options(nostack, readonly),
            );
        } else {
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack, nomem),
            );
        }
        // Spread over the k-steps: prefetch-for-write the next block's C
        // lines (32 rows x 2 lines), so its stores (and loads) do not wait
        // on memory one line at a time.
        let per_step = if next_c.is_null() {
            0
        } else {
            64usize.div_ceil(ksteps)
        };
        let pf_step = (pf.to - pf.from).div_ceil(ksteps);
        let mut pf_line = pf.from;
        let (mut a0, mut a1, mut b0, mut b1) = (a, a1, b0, b1);
        let mut line = 0usize;
        for _ in 0..ksteps {
            asm!(
                "tileloadd tmm4, [{a0} + {s64}*1]",
                "tileloadd tmm6, [{b0} + {s64}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm7, [{b1} + {s64}*1]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tileloadd tmm5, [{a1} + {s64}*1]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a0 = in(reg) a0,
                a1 = in(reg) a1,
                b0 = in(reg) b0,
                b1 = in(reg) b1,
                s64 = in(reg) 64usize,
                options(nostack, readonly),
            );
            a0 = a0.add(TILE);
            a1 = a1.add(TILE);
            b0 = b0.add(TILE);
            b1 = b1.add(TILE);
            let pf_end = (pf_line + pf_step).min(pf.to);
            while pf_line < pf_end {
                asm!("prefetcht1 [{}]", in(reg) pf.at(pf_line), options(nostack, readonly, preserves_flags));
                pf_line += 1;
            }
            let end = (line + per_step).min(64);
            while line < end {
                let p = next_c.byte_add((line / 2) * ldc + (line % 2) * 64);
                asm!("prefetchw [{}]", in(reg) p, options(nostack, readonly, preserves_flags));
                line += 1;
            }
        }
        asm!(
            "tilestored [{c00} + {ldc}*1], tmm0",
            "tilestored [{c01} + {ldc}*1], tmm1",
            "tilestored [{c10} + {ldc}*1], tmm2",
            "tilestored [{c11} + {ldc}*1], tmm3",
            c00 = in(reg) c, c01 = in(reg) c01, c10 = in(reg) c10, c11 = in(reg) c11,
            ldc = in(reg) ldc,
            options(nostack),
        );
    }

    /// For every 32-row block of A (`mp` padded rows, `m` real ones, packed
    /// by [`super::pack_a`] with `kp` padded columns; `a` may point at a later
    /// k-step's tile of the first row group): C[rows, 0..nn] (+)= A · B, C at
    /// `c` with row stride `ldc` floats; B's second tile stream starts
    /// `bstride` tiles after its first. Partial blocks go through a 32×32
    /// scratch.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn run_blocks(
        a: *const u16,
        kp: usize,
        mp: usize,
        m: usize,
        b: *const u16,
        ksteps: usize,
        bstride: usize,
        c: *mut f32,
        ldc: usize,
        nn: usize,
        acc: bool,
    ) {
        run_blocks_pf(a, kp, mp, m, b, ksteps, bstride, c, ldc, nn, acc, None)
    }

    /// [`run_blocks`], prefetching into L2 over its k-steps the `ksteps`
    /// tiles of each stream of another B (`next`: its two streams' first
    /// tiles): the next panel a row-split product multiplies, which the
    /// other core may have packed (its lines then come from that core's
    /// cache, one tile load at a time, when the kernel first reads them).
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn run_blocks_pf(
        a: *const u16,
        kp: usize,
        mp: usize,
        m: usize,
        b: *const u16,
        ksteps: usize,
        bstride: usize,
        c: *mut f32,
        ldc: usize,
        nn: usize,
        acc: bool,
        next: Option<(*const u16, *const u16)>,
    ) {
        let _tiles = Tiles::configure();
        let b1 = b.add(bstride * super::TILE_U16);
        // C tiles straight from / to the output only when its rows are
        // 64-byte aligned (see `TileBuf`); else every block goes through the
        // aligned scratch below (a 4 KiB copy per block against the
        // ~2·ksteps KiB of operand tiles it loads).
        let c_aligned = (c as usize).is_multiple_of(64) && (ldc * 4).is_multiple_of(64);
        let full = if nn == 32 && c_aligned { m / 32 } else { 0 };
        let half = ksteps * super::TILE_U16 * 2 / 64;
        let per_block = if full > 0 {
            (2 * half).div_ceil(full)
        } else {
            0
        };
        for mb in 0..full {
            let r0 = mb * 32;
            let pf = match next {
                Some((s0, s1)) => PfLines {
                    s0: s0 as *const u8,
                    s1: s1 as *const u8,
                    half,
                    from: (mb * per_block).min(2 * half),
                    to: ((mb + 1) * per_block).min(2 * half),
                },
                None => PfLines::NONE,
            };
            kernel(
                a.add(r0 * kp),
                16 * kp,
                b,
                b1,
                ksteps,
                c.add(r0 * ldc),
                ldc * 4,
                acc,
                if mb + 1 < full {
                    c.add((r0 + 32) * ldc)
                } else {
                    std::ptr::null()
                },
                pf,
            );
        }
        if full < mp / 32 {
            partial_blocks(a, kp, mp, m, b, b1, ksteps, c, ldc, nn, acc, full);
        }
    }

    /// The tile configuration loaded on this thread for as long as it
    /// lives (released when dropped): blocks run one after another under
    /// one `ldtilecfg` / `tilerelease` pair instead of one per block. Off
    /// AMX (the [`super::emulated`] blocks) there is nothing to configure.
    pub struct Tiles(bool);

    impl Tiles {
        /// Loads the configuration (on AMX).
        ///
        /// # Safety
        /// The tile products are available ([`super::available`]); nothing
        /// else on this thread uses the tiles while the value lives.
        pub unsafe fn configure() -> Tiles {
            let amx = super::on_amx();
            if amx {
                asm!("ldtilecfg [{}]", in(reg) CFG.0.as_ptr(), options(nostack, readonly));
            }
            Tiles(amx)
        }
    }

    impl Drop for Tiles {
        fn drop(&mut self) {
            if self.0 {
                // SAFETY: the configuration was loaded by `configure`.
                unsafe { asm!("tilerelease", options(nostack, nomem)) };
            }
        }
    }

    /// One 32-row block of [`run_blocks`] (`m <= 32` real rows at `a`),
    /// prefetching `next_c` (a 32 x 32 f32 block, row stride `ldc`, or
    /// null) for writing over its k-steps, under `_tiles`' configuration.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn run_block(
        _tiles: &Tiles,
        a: *const u16,
        kp: usize,
        m: usize,
        b: *const u16,
        ksteps: usize,
        bstride: usize,
        c: *mut f32,
        ldc: usize,
        nn: usize,
        acc: bool,
        next_c: *const f32,
    ) {
        let b1 = b.add(bstride * super::TILE_U16);
        let c_aligned = (c as usize).is_multiple_of(64) && (ldc * 4).is_multiple_of(64);
        if nn == 32 && m == 32 && c_aligned {
            kernel(
                a,
                16 * kp,
                b,
                b1,
                ksteps,
                c,
                ldc * 4,
                acc,
                next_c,
                PfLines::NONE,
            );
        } else {
            partial_blocks(a, kp, 32, m, b, b1, ksteps, c, ldc, nn, acc, 0);
        }
    }

    /// The blocks of [`run_blocks`] from `first` on, through an aligned
    /// scratch (partial rows or columns, or a C not on cache lines): kept
    /// out of `run_blocks` so that its 4 KiB scratch is not zeroed on every
    /// call that has no such block (most of them; they are ~20k a step).
    #[allow(clippy::too_many_arguments)]
    #[inline(never)]
    unsafe fn partial_blocks(
        a: *const u16,
        kp: usize,
        mp: usize,
        m: usize,
        b: *const u16,
        b1: *const u16,
        ksteps: usize,
        c: *mut f32,
        ldc: usize,
        nn: usize,
        acc: bool,
        first: usize,
    ) {
        #[repr(C, align(64))]
        struct Scratch([f32; 32 * 32]);
        let mut scratch = Scratch([0f32; 32 * 32]);
        let scratch = &mut scratch.0;
        for mb in first..mp / 32 {
            let r0 = mb * 32;
            let ab = a.add(r0 * kp);
            let cb = c.add(r0 * ldc);
            let rows = 32.min(m - r0);
            if acc {
                if rows < 32 || nn < 32 {
                    scratch.fill(0.0);
                }
                for r in 0..rows {
                    std::ptr::copy_nonoverlapping(
                        cb.add(r * ldc),
                        scratch.as_mut_ptr().add(r * 32),
                        nn,
                    );
                }
            }
            kernel(
                ab,
                16 * kp,
                b,
                b1,
                ksteps,
                scratch.as_mut_ptr(),
                128,
                acc,
                std::ptr::null(),
                PfLines::NONE,
            );
            for r in 0..rows {
                std::ptr::copy_nonoverlapping(scratch.as_ptr().add(r * 32), cb.add(r * ldc), nn);
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod imp {
    pub fn detect() -> bool {
        false
    }
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn run_blocks(
        _a: *const u16,
        _kp: usize,
        _mp: usize,
        _m: usize,
        _b: *const u16,
        _ksteps: usize,
        _bstride: usize,
        _c: *mut f32,
        _ldc: usize,
        _nn: usize,
        _acc: bool,
    ) {
        unreachable!("AMX is x86_64 only")
    }
}

/// In tests: whether the tile products cannot run here, saying so (and what
/// was not run) when they cannot.
#[cfg(test)]
pub(crate) fn skip_without_tiles(what: &str) -> bool {
    let skip = !available();
    if skip {
        eprintln!(
            "SKIPPED: no bf16 tile ISA here (AMX, AVX512-BF16; or QLORA_NO_AMX / QLORA_TILE_ISA): {what} not run"
        );
    }
    skip
}

#[cfg(test)]
mod tests;
