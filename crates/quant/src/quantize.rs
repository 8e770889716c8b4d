//! Fast `quantize_4bit`: rayon across chunks of blocks, a SIMD block kernel where the CPU
//! has one (see [`crate::simd`]), and the scalar kernel elsewhere. Results are
//! bit-identical to [`crate::reference::quantize_4bit`] (tested on random inputs); the
//! reference shares no code with this file, so it can judge it.

use rayon::prelude::*;

use crate::simd::Backend;
use crate::tables::{order, thresholds, zero_code};
use crate::{
    check_blocksize, dynamic_map, num_blocks, Absmax, DoubleQuant, Input, QuantError, QuantOptions,
    QuantType, Quantized4, ABSMAX_EPS, NESTED_BLOCKSIZE,
};

/// How a block's elements are scaled into [-1, 1].
#[derive(Debug, Clone, Copy)]
pub(crate) enum Scale {
    /// Full block: `x * r` with `r = 1.0f / max(absmax, 1e-38f)`.
    Mul(f32),
    /// Partial last block: `x / am` with `am = max(absmax, 1e-38f)`.
    Div(f32),
}

/// The stored absmax and the scaling of a block whose max |x| (over finite values) is
/// `absmax`.
#[inline]
pub(crate) fn block_scale(absmax: f32, partial: bool) -> (f32, Scale) {
    let am = absmax.max(ABSMAX_EPS);
    if partial {
        (am, Scale::Div(am))
    } else {
        (absmax, Scale::Mul(1.0f32 / am))
    }
}

/// Scaled and clamped value of one element (NaN → 0.0, ±inf → ±1; only reachable with
/// `allow_nonfinite`).
#[inline]
pub(crate) fn scaled(x: f32, scale: Scale) -> f32 {
    if x.is_nan() {
        return 0.0;
    }
    let s = match scale {
        Scale::Mul(r) => x * r,
        Scale::Div(am) => x / am,
    };
    s.clamp(-1.0, 1.0)
}

/// First non-finite element, if any.
pub(crate) fn first_nonfinite(input: &Input<'_>) -> Option<(usize, f32)> {
    (0..input.len())
        .map(|i| (i, input.get_f32(i)))
        .find(|(_, v)| !v.is_finite())
}

/// Checks blocksize and shape; returns n.
pub(crate) fn check_input(
    input: &Input<'_>,
    shape: &[usize],
    opts: &QuantOptions,
) -> Result<usize, QuantError> {
    check_blocksize(opts.blocksize)?;
    let numel = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    match numel {
        Some(n) if n == input.len() => Ok(n),
        _ => Err(QuantError::ShapeMismatch {
            shape: shape.to_vec(),
            numel: numel.unwrap_or(usize::MAX),
            len: input.len(),
        }),
    }
}

/// `mean(absmax)` exactly as torch computes it on CPU (see [`crate::torch_mean`]).
/// 0.0 for no blocks.
fn mean_offset(absmax: &[f32]) -> f32 {
    if absmax.is_empty() {
        return 0.0;
    }
    crate::torch_mean::torch_cpu_mean_f32(absmax)
}

/// Elements per rayon task (a multiple of every blocksize, 256 KiB of f32 input).
pub(crate) const CHUNK_ELEMS: usize = 1 << 16;

/// Per quant-type constants the block kernels need.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EncodeTables {
    /// Sorted-table midpoints.
    pub th: [f32; 15],
    /// Sorted index → code.
    pub ord: [u8; 16],
    /// Code of 0.0 (odd-n padding).
    pub pad: u8,
    /// Thresholds of binary-search levels 2, 3, 4 laid out for 8-lane table lookups:
    /// `th[3], th[11]`; `th[1], th[5], th[9], th[13]`; `th[0], th[2], .., th[14]`.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub levels: [[f32; 8]; 3],
}

impl EncodeTables {
    pub fn new(t: QuantType) -> Self {
        let th = thresholds(t);
        let mut levels = [[0f32; 8]; 3];
        for (k, l) in levels[0].iter_mut().take(2).enumerate() {
            *l = th[3 + 8 * k];
        }
        for (k, l) in levels[1].iter_mut().take(4).enumerate() {
            *l = th[1 + 4 * k];
        }
        for (k, l) in levels[2].iter_mut().enumerate() {
            *l = th[2 * k];
        }
        EncodeTables {
            th,
            ord: *order(t),
            pad: zero_code(t),
            levels,
        }
    }

    /// `order[#{k : th[k] < s}]` by a branchless binary search over the 15 sorted
    /// thresholds (4 compares instead of 15).
    #[inline]
    pub fn code(&self, s: f32) -> u8 {
        let th = &self.th;
        let mut idx = 0usize;
        for step in [8usize, 4, 2, 1] {
            // Arithmetic, not a branch: random data would mispredict every step.
            idx += step * usize::from(th[idx + step - 1] < s);
        }
        self.ord[idx]
    }
}

/// An input element type: f32, or bf16/f16 upcast exactly to f32.
pub(crate) trait Elem: Copy + Send + Sync + 'static {
    /// Which type (lets the SIMD loaders branch at compile time).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    const KIND: ElemKind;
    fn f32(self) -> f32;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) enum ElemKind {
    F32,
    BF16,
    F16,
}

impl Elem for f32 {
    const KIND: ElemKind = ElemKind::F32;
    #[inline]
    fn f32(self) -> f32 {
        self
    }
}

impl Elem for half::bf16 {
    const KIND: ElemKind = ElemKind::BF16;
    #[inline]
    fn f32(self) -> f32 {
        self.to_f32()
    }
}

impl Elem for half::f16 {
    const KIND: ElemKind = ElemKind::F16;
    #[inline]
    fn f32(self) -> f32 {
        self.to_f32()
    }
}

/// Encodes `x` (starting at an even element index) into `out` (`ceil(len/2)` bytes) with
/// the given scale; an odd length pads the last low nibble.
#[inline]
pub(crate) fn encode_scalar<T: Elem>(x: &[T], scale: Scale, t: &EncodeTables, out: &mut [u8]) {
    let mut pairs = x.chunks_exact(2);
    for (o, p) in out.iter_mut().zip(pairs.by_ref()) {
        *o = (t.code(scaled(p[0].f32(), scale)) << 4) | t.code(scaled(p[1].f32(), scale));
    }
    if let [last] = pairs.remainder() {
        out[x.len() / 2] = (t.code(scaled(last.f32(), scale)) << 4) | t.pad;
    }
}

/// Max |x| over finite elements, and whether all elements are finite.
#[inline]
pub(crate) fn absmax_scalar<T: Elem>(x: &[T]) -> (f32, bool) {
    let mut am = 0f32;
    let mut finite = true;
    for v in x {
        let v = v.f32();
        if v.is_finite() {
            am = am.max(v.abs());
        } else {
            finite = false;
        }
    }
    (am, finite)
}

/// Encoder for blocks without NaN/inf, written so the compiler can vectorize it on any
/// target (SSE2, NEON): 16 elements at a time, the sorted index as a branch-free count of
/// the thresholds below each value. Same results as [`encode_scalar`].
#[inline]
fn encode_finite_portable<T: Elem>(x: &[T], scale: Scale, t: &EncodeTables, out: &mut [u8]) {
    let mut chunks = x.chunks_exact(16);
    for (c, o) in chunks.by_ref().zip(out.chunks_exact_mut(8)) {
        let mut s = [0f32; 16];
        match scale {
            Scale::Mul(r) => {
                for (si, v) in s.iter_mut().zip(c) {
                    *si = (v.f32() * r).clamp(-1.0, 1.0);
                }
            }
            Scale::Div(a) => {
                for (si, v) in s.iter_mut().zip(c) {
                    *si = (v.f32() / a).clamp(-1.0, 1.0);
                }
            }
        }
        let mut idx = [0u8; 16];
        for &th in &t.th {
            for (ix, &si) in idx.iter_mut().zip(&s) {
                *ix += u8::from(th < si);
            }
        }
        for (j, o) in o.iter_mut().enumerate() {
            *o = (t.ord[idx[2 * j] as usize] << 4) | t.ord[idx[2 * j + 1] as usize];
        }
    }
    let done = (x.len() - chunks.remainder().len()) / 2;
    encode_scalar(chunks.remainder(), scale, t, &mut out[done..]);
}

/// Scalar block kernel: returns (stored absmax, all finite).
pub(crate) fn quantize_block_scalar<T: Elem>(
    x: &[T],
    partial: bool,
    t: &EncodeTables,
    out: &mut [u8],
) -> (f32, bool) {
    let (am, finite) = absmax_scalar(x);
    let (stored, scale) = block_scale(am, partial);
    if finite {
        encode_finite_portable(x, scale, t, out);
    } else {
        encode_scalar(x, scale, t, out);
    }
    (stored, finite)
}

/// Quantizes one block with `backend`.
#[inline]
fn quantize_block<T: Elem>(
    backend: Backend,
    x: &[T],
    partial: bool,
    t: &EncodeTables,
    out: &mut [u8],
) -> (f32, bool) {
    match backend {
        #[cfg(target_arch = "x86_64")]
        Backend::Avx2 | Backend::Avx512 => {
            // SAFETY: `Backend::Avx2` / `Avx512` are only constructed after run-time
            // detection of AVX2 and F16C.
            unsafe { crate::simd::x86::quantize_block_avx2(x, partial, t, out) }
        }
        _ => quantize_block_scalar(x, partial, t, out),
    }
}

/// What every chunk of one `quantize_4bit` call shares.
struct Job {
    backend: Backend,
    n: usize,
    bs: usize,
    tables: EncodeTables,
}

impl Job {
    /// Quantizes the blocks of one chunk (`first_elem` = global index of its first
    /// element). Returns whether every element was finite.
    fn chunk<T: Elem>(
        &self,
        x: &[T],
        first_elem: usize,
        packed: &mut [u8],
        absmax: &mut [f32],
    ) -> bool {
        let bs = self.bs;
        let mut all_finite = true;
        for (b, am) in absmax.iter_mut().enumerate() {
            let start = first_elem + b * bs;
            let end = (start + bs).min(self.n);
            let len = end - start;
            let out = &mut packed[b * bs / 2..(b * bs + len).div_ceil(2)];
            let (stored, finite) =
                quantize_block(self.backend, &x[start..end], len < bs, &self.tables, out);
            *am = stored;
            all_finite &= finite;
        }
        all_finite
    }

    /// Quantizes all of `x` into `packed` / `absmax` in parallel; returns all-finite.
    fn run<T: Elem>(&self, x: &[T], packed: &mut [u8], absmax: &mut [f32]) -> bool {
        let blocks_per_chunk = (CHUNK_ELEMS / self.bs).max(1);
        let bytes_per_chunk = blocks_per_chunk * self.bs / 2;
        packed
            .par_chunks_mut(bytes_per_chunk)
            .zip(absmax.par_chunks_mut(blocks_per_chunk))
            .enumerate()
            .map(|(c, (pk, am))| self.chunk(x, c * blocks_per_chunk * self.bs, pk, am))
            .reduce(|| true, |a, b| a && b)
    }
}

/// Quantizes `input` (with row-major `shape`) to 4 bits, bnb 0.50.2 CPU semantics (see
/// the crate docs). Errors: blocksize not a power of two in 32..=4096, shape/length
/// mismatch, or a non-finite element without `allow_nonfinite`.
pub fn quantize_4bit(
    input: Input<'_>,
    shape: &[usize],
    opts: &QuantOptions,
) -> Result<Quantized4, QuantError> {
    quantize_4bit_with(Backend::detect(), input, shape, opts)
}

/// [`quantize_4bit`] with an explicit backend (tests compare every available backend).
#[doc(hidden)]
pub fn quantize_4bit_with(
    backend: Backend,
    input: Input<'_>,
    shape: &[usize],
    opts: &QuantOptions,
) -> Result<Quantized4, QuantError> {
    let n = check_input(&input, shape, opts)?;
    let bs = opts.blocksize;
    let job = Job {
        backend,
        n,
        bs,
        tables: EncodeTables::new(opts.quant_type),
    };
    let mut packed = vec![0u8; n.div_ceil(2)];
    let mut absmax = vec![0f32; num_blocks(n, bs)];
    let all_finite = match input {
        Input::F32(x) => job.run(x, &mut packed, &mut absmax),
        Input::BF16(x) => job.run(x, &mut packed, &mut absmax),
        Input::F16(x) => job.run(x, &mut packed, &mut absmax),
    };
    if !all_finite && !opts.allow_nonfinite {
        let (index, value) = first_nonfinite(&input).expect("a chunk reported a non-finite value");
        return Err(QuantError::NonFinite { index, value });
    }
    let absmax = if opts.double_quant {
        Absmax::Double(double_quant(&absmax))
    } else {
        Absmax::Plain(absmax)
    };
    Ok(Quantized4 {
        quant_type: opts.quant_type,
        blocksize: bs,
        shape: shape.to_vec(),
        dtype: input.dtype(),
        packed,
        absmax,
    })
}

/// The per-block absmax [`quantize_4bit`] stores for `input` (before double
/// quantization), without encoding anything: what every rank of a sharded load
/// needs to agree on the tensor's double-quant offset ([`dq_offset`]) while it
/// quantizes only its own range of blocks. Non-finite elements are skipped, as
/// the quantizer skips them.
pub fn block_absmax(input: &Input<'_>, blocksize: usize) -> Result<Vec<f32>, QuantError> {
    check_blocksize(blocksize)?;
    let n = input.len();
    let mut out = vec![0f32; num_blocks(n, blocksize)];
    fn run<T: Elem>(x: &[T], bs: usize, out: &mut [f32]) {
        let n = x.len();
        let per = (CHUNK_ELEMS / bs).max(1);
        out.par_chunks_mut(per).enumerate().for_each(|(c, am)| {
            for (k, a) in am.iter_mut().enumerate() {
                let start = (c * per + k) * bs;
                let end = (start + bs).min(n);
                let (m, _) = absmax_scalar(&x[start..end]);
                *a = block_scale(m, end - start < bs).0;
            }
        });
    }
    match input {
        Input::F32(x) => run(x, blocksize, &mut out),
        Input::BF16(x) => run(x, blocksize, &mut out),
        Input::F16(x) => run(x, blocksize, &mut out),
    }
    Ok(out)
}

/// The double-quant offset of a tensor: `mean(absmax)` over **all** its blocks,
/// exactly as torch's CPU f32 `mean()` computes it (0.0 for no blocks). With it,
/// [`double_quant_with_offset`] over any 256-block-aligned range of the absmax
/// gives exactly that range of the whole tensor's double quantization.
pub fn dq_offset(absmax: &[f32]) -> f32 {
    mean_offset(absmax)
}

/// Double quantization of a per-block absmax vector (crate docs, "Double quantization"):
/// `offset` = `mean(absmax)` exactly as torch's CPU f32 `mean()` computes it (its cascade
/// sum, see [`crate::torch_mean`]), then [`double_quant_with_offset`].
pub fn double_quant(absmax: &[f32]) -> DoubleQuant {
    double_quant_with_offset(absmax, mean_offset(absmax))
}

/// Double quantization with a caller-chosen `offset` (e.g. an exact emulation of torch's
/// f32 `mean()`, with which the codes equal bnb's): `c = absmax - offset` (f32), then
/// [`crate::quantize_blockwise8`] with the dynamic map and nested blocksize 256 (bnb CPU
/// LUT semantics, cached LUT). Same result as
/// [`crate::reference::double_quant_with_offset`], much faster.
pub fn double_quant_with_offset(absmax: &[f32], offset: f32) -> DoubleQuant {
    let centred: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
    let map = dynamic_map();
    let (codes, nested_absmax) =
        crate::blockwise8::quantize_blockwise8(&centred, &map, NESTED_BLOCKSIZE);
    DoubleQuant {
        codes,
        nested_absmax,
        nested_map: map.to_vec(),
        offset,
        nested_blocksize: NESTED_BLOCKSIZE,
    }
}
