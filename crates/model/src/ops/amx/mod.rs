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
                *AMX.get_or_init(kernel::detect)
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

/// The forward products (`y = x · Wᵀ`, with LoRA's terms riding in them).
mod forward;
pub use forward::{
    linear_forward, linear_forward_lora, linear_forward_multi, linear_forward_new, LoraTerm,
    RowMask,
};
/// Products split by A's rows among the threads (both directions).
mod row_split;
use row_split::{products_by_rows, row_slices, PanelOut};

/// The AMX kernel (tile configuration, the 2 × 2 `TDPBF16PS` block, the
/// block drivers and their prefetches) and the detection of AMX.
#[cfg(target_arch = "x86_64")]
mod kernel;

#[cfg(not(target_arch = "x86_64"))]
mod kernel {
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
