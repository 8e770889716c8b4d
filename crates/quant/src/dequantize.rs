//! Fast dequantization: per block a 16-entry table `map[k] * absmax` (in the output
//! dtype) is built once and the packed nibbles are looked up in it; on x86-64 with AVX2 the
//! lookup is done with in-register permutes/shuffles (see [`crate::simd`]). rayon splits
//! large ranges into chunks. Output is bit-identical to [`crate::reference`].

use half::{bf16, f16};
use rayon::prelude::*;

use crate::quantize::CHUNK_ELEMS;
use crate::simd::Backend;
use crate::{Absmax, DType, Quantized4};

/// An output element type of dequantization: f32, bf16 or f16. The value of element `i`
/// is `from_f32(map[nibble(i)] * absmax[i / blocksize])` (round-to-nearest-even).
pub trait DequantElem: Copy + Send + Sync + Default + 'static {
    fn from_f32(x: f32) -> Self;

    /// Expands whole bytes of one block: `out.len() == 2 * bytes.len()`. Each value is
    /// `from_f32(round_through(cx.round, map[code] * absmax))`.
    #[doc(hidden)]
    fn expand(cx: Expand, bytes: &[u8], map: &[f32; 16], absmax: f32, out: &mut [Self]) {
        expand_scalar(bytes, map, absmax, cx.round, out)
    }

    /// Whether [`Self::expand_blocks`] has a kernel for `cx` and blocks of `bs`.
    #[doc(hidden)]
    fn has_expand_blocks(_cx: Expand, _bs: usize) -> bool {
        false
    }

    /// Expands `absmax.len()` whole blocks of `bs` elements at once (`bytes` and `out`
    /// hold exactly them); only called where [`Self::has_expand_blocks`] says so.
    #[doc(hidden)]
    fn expand_blocks(
        cx: Expand,
        bytes: &[u8],
        absmax: &[f32],
        bs: usize,
        map: &[f32; 16],
        out: &mut [Self],
    ) {
        for (k, &a) in absmax.iter().enumerate() {
            Self::expand(
                cx,
                &bytes[k * bs / 2..(k + 1) * bs / 2],
                map,
                a,
                &mut out[k * bs..(k + 1) * bs],
            );
        }
    }
}

/// How a dequantization call expands its blocks.
#[doc(hidden)]
#[derive(Debug, Clone, Copy)]
pub struct Expand {
    pub backend: Backend,
    /// Round each value through this dtype (F32: no rounding; f32 outputs only).
    pub round: DType,
    /// Use non-temporal stores (outputs much larger than the caches).
    pub stream: bool,
}

/// Outputs at least this large are written with non-temporal stores: they cannot stay in
/// cache anyway, and skipping the read-for-ownership saves a third of the memory traffic.
/// (The model's 4 MiB matmul tiles stay below it, so they remain cache-hot.)
const STREAM_BYTES: usize = 16 << 20;

/// Rounds `v` to `dtype` and back to f32 (identity for f32): what a bnb dequantize to
/// the recorded dtype followed by a cast to f32 produces.
#[inline(always)]
pub(crate) fn round_through(dtype: DType, v: f32) -> f32 {
    match dtype {
        DType::F32 => v,
        DType::BF16 => bf16::from_f32(v).to_f32(),
        DType::F16 => f16::from_f32(v).to_f32(),
    }
}

/// Portable kernel: 16-entry table, then one lookup per nibble.
#[inline]
pub(crate) fn expand_scalar<T: DequantElem>(
    bytes: &[u8],
    map: &[f32; 16],
    absmax: f32,
    round: DType,
    out: &mut [T],
) {
    if bytes.is_empty() {
        return;
    }
    // A plain loop: `std::array::from_fn` leaves a closure call per entry here.
    let mut lut = [T::default(); 16];
    for (l, &m) in lut.iter_mut().zip(map) {
        *l = T::from_f32(round_through(round, m * absmax));
    }
    for (pair, &b) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = lut[(b >> 4) as usize];
        pair[1] = lut[(b & 0x0f) as usize];
    }
}

impl DequantElem for f32 {
    #[inline]
    fn from_f32(x: f32) -> Self {
        x
    }

    fn expand(cx: Expand, bytes: &[u8], map: &[f32; 16], absmax: f32, out: &mut [Self]) {
        match cx.backend {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Backend::Avx2` / `Avx512` are only constructed after run-time
            // feature detection (AVX2 and F16C for both).
            Backend::Avx2 | Backend::Avx512 => unsafe {
                crate::simd::x86::expand_f32_avx2(bytes, map, absmax, cx.round, cx.stream, out)
            },
            _ => expand_scalar(bytes, map, absmax, cx.round, out),
        }
    }
}

impl DequantElem for bf16 {
    #[inline]
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }

    fn expand(cx: Expand, bytes: &[u8], map: &[f32; 16], absmax: f32, out: &mut [Self]) {
        match cx.backend {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Backend::Avx2 | Backend::Avx512 if cx.round == DType::F32 => unsafe {
                crate::simd::x86::expand_u16_avx2(
                    bytes,
                    crate::simd::x86::lut_bf16_avx2(map, absmax),
                    cx.stream,
                    out,
                )
            },
            _ => expand_scalar(bytes, map, absmax, cx.round, out),
        }
    }

    fn has_expand_blocks(cx: Expand, bs: usize) -> bool {
        match cx.backend {
            #[cfg(target_arch = "x86_64")]
            Backend::Avx512 => cx.round == DType::F32 && !cx.stream && bs.is_multiple_of(32),
            _ => false,
        }
    }

    fn expand_blocks(
        cx: Expand,
        bytes: &[u8],
        absmax: &[f32],
        bs: usize,
        map: &[f32; 16],
        out: &mut [Self],
    ) {
        debug_assert!(Self::has_expand_blocks(cx, bs));
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `has_expand_blocks` held, so the backend is `Avx512`, only constructed
        // after run-time detection of AVX-512 F and BW.
        unsafe {
            crate::simd::x86_512::expand_blocks_bf16(bytes, absmax, bs, map, out)
        };
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!(
            "no block kernel off x86-64 ({cx:?}, {bytes:?}, {absmax:?}, {bs}, {map:?}, {})",
            out.len()
        );
    }
}

impl DequantElem for f16 {
    #[inline]
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }

    fn expand(cx: Expand, bytes: &[u8], map: &[f32; 16], absmax: f32, out: &mut [Self]) {
        match cx.backend {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above (the AVX2 backend also requires F16C).
            Backend::Avx2 | Backend::Avx512 if cx.round == DType::F32 => unsafe {
                crate::simd::x86::expand_u16_avx2(
                    bytes,
                    crate::simd::x86::lut_f16_avx2(map, absmax),
                    cx.stream,
                    out,
                )
            },
            _ => expand_scalar(bytes, map, absmax, cx.round, out),
        }
    }
}

impl Absmax {
    /// Absmax of block `b` as f32 (reconstructed if double-quantized).
    #[inline]
    pub fn at(&self, b: usize) -> f32 {
        match self {
            Absmax::Plain(v) => v[b],
            Absmax::Double(d) => d.absmax_at(b),
        }
    }
}

/// Dequantizes elements `start..start + out.len()` on the calling thread.
fn range_serial<T: DequantElem>(
    q: &Quantized4,
    cx: Expand,
    map: &[f32; 16],
    start: usize,
    out: &mut [T],
) {
    let round = cx.round;
    let one = |code: u8, a: f32| T::from_f32(round_through(round, map[code as usize] * a));
    let bs = q.blocksize;
    let packed = &q.packed;
    let end = start + out.len();
    let mut i = start;
    let mut rest = out;
    // Whole blocks go to `expand_blocks` where there is such a kernel, up to this
    // many (their absmax gathered first) at a time.
    const RUN: usize = 64;
    let whole_blocks = T::has_expand_blocks(cx, bs);
    let mut run_absmax = [0f32; RUN];
    while i < end {
        let b = i / bs;
        if whole_blocks && i.is_multiple_of(bs) && end - i >= bs {
            let nb = ((end - i) / bs).min(RUN);
            let am = &mut run_absmax[..nb];
            match &q.absmax {
                Absmax::Plain(v) => am.copy_from_slice(&v[b..b + nb]),
                Absmax::Double(d) => d.absmax_range(b, am),
            }
            let (seg, tail) = std::mem::take(&mut rest).split_at_mut(nb * bs);
            T::expand_blocks(cx, &packed[i / 2..(i + nb * bs) / 2], am, bs, map, seg);
            rest = tail;
            i += nb * bs;
            continue;
        }
        let block_end = ((b + 1) * bs).min(end);
        let a = q.absmax.at(b);
        let (seg, tail) = std::mem::take(&mut rest).split_at_mut(block_end - i);
        rest = tail;
        let mut j = i;
        let mut k = 0;
        if j % 2 == 1 {
            seg[0] = one(packed[j / 2] & 0x0f, a);
            j += 1;
            k = 1;
        }
        let pairs = (block_end - j) / 2;
        T::expand(
            cx,
            &packed[j / 2..j / 2 + pairs],
            map,
            a,
            &mut seg[k..k + 2 * pairs],
        );
        j += 2 * pairs;
        k += 2 * pairs;
        if j < block_end {
            seg[k] = one(packed[j / 2] >> 4, a);
        }
        i = block_end;
    }
    #[cfg(target_arch = "x86_64")]
    if cx.stream {
        crate::simd::x86::store_fence();
    }
}

/// Dequantizes elements `start..start + out.len()`, in parallel for large ranges.
fn range_parallel<T: DequantElem>(
    q: &Quantized4,
    backend: Backend,
    round: DType,
    start: usize,
    out: &mut [T],
) {
    let cx = Expand {
        backend,
        round,
        stream: std::mem::size_of_val(out) >= STREAM_BYTES,
    };
    range_parallel_cx(q, cx, start, out)
}

/// [`range_parallel`] with explicit expansion options.
fn range_parallel_cx<T: DequantElem>(q: &Quantized4, cx: Expand, start: usize, out: &mut [T]) {
    let n = q.numel();
    assert!(
        start <= n && out.len() <= n - start,
        "dequantize range {}..{} is outside the tensor's {} elements",
        start,
        start.saturating_add(out.len()),
        n
    );
    let map = q.quant_map();
    if out.len() <= 2 * CHUNK_ELEMS {
        range_serial(q, cx, &map, start, out);
        return;
    }
    // Cut at global multiples of CHUNK_ELEMS so every piece but the first starts a block.
    let head = (start / CHUNK_ELEMS + 1) * CHUNK_ELEMS - start;
    let (first, rest) = out.split_at_mut(head.min(out.len()));
    let mut pieces: Vec<(usize, &mut [T])> = vec![(start, first)];
    pieces.extend(
        rest.chunks_mut(CHUNK_ELEMS)
            .enumerate()
            .map(|(k, c)| (start + head + k * CHUNK_ELEMS, c)),
    );
    pieces
        .into_par_iter()
        .for_each(|(s, o)| range_serial(q, cx, &map, s, o));
}

impl Quantized4 {
    /// Dequantizes elements `start..start + out.len()` into `out` (any `start`; blocks span
    /// rows). Generic over the output dtype (f32, bf16, f16).
    ///
    /// # Panics
    /// If the range exceeds the tensor, or the struct is inconsistent (see [`Self::validate`]).
    pub fn dequantize_range<T: DequantElem>(&self, start: usize, out: &mut [T]) {
        range_parallel(self, Backend::detect(), DType::F32, start, out)
    }

    /// [`Self::dequantize_range`] with an explicit backend (for tests and benchmarks).
    #[doc(hidden)]
    pub fn dequantize_range_with<T: DequantElem>(
        &self,
        backend: Backend,
        start: usize,
        out: &mut [T],
    ) {
        range_parallel(self, backend, DType::F32, start, out)
    }

    /// Elements `start..start + out.len()` as f32 (used by tiled matmuls).
    ///
    /// # Panics
    /// If the range exceeds the tensor, or the struct is inconsistent (see [`Self::validate`]).
    pub fn dequantize_range_f32(&self, start: usize, out: &mut [f32]) {
        self.dequantize_range(start, out)
    }

    /// Elements `start..start + out.len()` rounded to the recorded [`Self::dtype`] and
    /// widened back to f32 — exactly what bnb feeds a matmul after `dequantize_4bit` (which
    /// returns the recorded dtype) and a cast to f32. Equals [`Self::dequantize_range_f32`]
    /// for f32 tensors.
    ///
    /// # Panics
    /// If the range exceeds the tensor, or the struct is inconsistent (see [`Self::validate`]).
    pub fn dequantize_range_f32_rounded(&self, start: usize, out: &mut [f32]) {
        range_parallel(self, Backend::detect(), self.dtype, start, out)
    }

    /// Rows `r0..r1` of a 2-D `[rows, cols]` tensor as f32, rounded through the recorded
    /// dtype like [`Self::dequantize_range_f32_rounded`]: the tile a tiled matmul expands
    /// right before its product. `out.len()` must be `(r1 - r0) * cols`.
    ///
    /// # Panics
    /// If the tensor is not 2-D, `r0 > r1`, `r1 > rows`, `out` has the wrong length, or the
    /// struct is inconsistent (see [`Self::validate`]).
    pub fn dequantize_rows_f32(&self, r0: usize, r1: usize, out: &mut [f32]) {
        let &[rows, cols] = self.shape.as_slice() else {
            panic!(
                "dequantize_rows_f32 needs a 2-D tensor, shape is {:?}",
                self.shape
            )
        };
        assert!(
            r0 <= r1 && r1 <= rows,
            "rows {r0}..{r1} outside the tensor's {rows}"
        );
        assert_eq!(
            out.len(),
            (r1 - r0) * cols,
            "dequantize_rows_f32: output length"
        );
        self.dequantize_range_f32_rounded(r0 * cols, out)
    }

    /// Dequantization with explicit kernel options (tests force non-temporal stores).
    #[doc(hidden)]
    pub fn dequantize_range_expand<T: DequantElem>(&self, cx: Expand, start: usize, out: &mut [T]) {
        range_parallel_cx(self, cx, start, out)
    }

    /// [`Self::dequantize_range_f32_rounded`] with an explicit backend.
    #[doc(hidden)]
    pub fn dequantize_range_f32_rounded_with(
        &self,
        backend: Backend,
        start: usize,
        out: &mut [f32],
    ) {
        range_parallel(self, backend, self.dtype, start, out)
    }

    /// The whole tensor as f32 into `out`.
    ///
    /// # Panics
    /// If `out.len() != self.numel()`.
    pub fn dequantize_into_f32(&self, out: &mut [f32]) {
        assert_eq!(
            out.len(),
            self.numel(),
            "dequantize_into_f32: output length"
        );
        self.dequantize_range(0, out)
    }

    /// The whole tensor as bf16 into `out`.
    ///
    /// # Panics
    /// If `out.len() != self.numel()`.
    pub fn dequantize_into_bf16(&self, out: &mut [bf16]) {
        assert_eq!(
            out.len(),
            self.numel(),
            "dequantize_into_bf16: output length"
        );
        self.dequantize_range(0, out)
    }

    /// The whole tensor as f16 into `out`.
    ///
    /// # Panics
    /// If `out.len() != self.numel()`.
    pub fn dequantize_into_f16(&self, out: &mut [f16]) {
        assert_eq!(
            out.len(),
            self.numel(),
            "dequantize_into_f16: output length"
        );
        self.dequantize_range(0, out)
    }

    /// The whole tensor as f32.
    pub fn dequantize_f32(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.numel()];
        self.dequantize_range(0, &mut out);
        out
    }

    /// The whole tensor as bf16 (f32 product rounded to nearest even).
    pub fn dequantize_bf16(&self) -> Vec<bf16> {
        let mut out = vec![bf16::ZERO; self.numel()];
        self.dequantize_range(0, &mut out);
        out
    }

    /// The whole tensor as f16 (f32 product rounded to nearest even).
    pub fn dequantize_f16(&self) -> Vec<f16> {
        let mut out = vec![f16::ZERO; self.numel()];
        self.dequantize_range(0, &mut out);
        out
    }
}
