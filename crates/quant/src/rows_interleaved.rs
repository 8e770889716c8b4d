//! Rows of a 4-bit matrix dequantized to bf16 with consecutive rows
//! interleaved element by element, 16 columns at a time: the B operand of an
//! AMX product along the weight's rows (the input gradient `dy · W` pairs
//! rows `2p` and `2p + 1` in each 32-bit lane), written tile by tile straight
//! from the 4-bit codes instead of through a row-major copy.

use crate::simd::Backend;
use crate::{DType, Quantized4};

/// Block columns handled at a time (their tables on the stack).
const SEG_BLOCKS: usize = 16;
/// Row pairs per call of the AVX-512 kernel (one AMX tile's 16 rows).
const MAX_PAIRS: usize = 16;

impl Quantized4 {
    /// Rows `r0..r0 + nr` of a 2-D `[rows, cols]` tensor as bf16 bits, two
    /// consecutive rows interleaved element by element, 16 columns at a time,
    /// for the columns `c0 .. c0 + ncols` (both multiples of 16): for each
    /// group `g < ncols / 16` and pair `p < ceil(nr / 2)`, the 32 words at
    /// `out[g·stride + 32p ..]` are `W[r0 + 2p][c0 + 16g + j]`,
    /// `W[r0 + 2p + 1][c0 + 16g + j]` for `j = 0..16` (`+0.0` for a row past
    /// `nr`). That is an AMX B tile along the weight's rows (the input
    /// gradient `dy · W`): each group's tile rows are written one after the
    /// other, straight from the 4-bit codes. Each value is bit for bit what
    /// [`Self::dequantize_range`] gives as bf16; words past a group's pairs
    /// are not written.
    ///
    /// # Panics
    /// If the tensor is not 2-D, `cols` is not a multiple of 16, the rows or
    /// columns are outside it or off the 16-column grid, `stride <
    /// 32·ceil(nr / 2)`, or `out` is too short.
    pub fn dequantize_rows_interleaved_bf16_cols(
        &self,
        r0: usize,
        nr: usize,
        c0: usize,
        ncols: usize,
        out: &mut [u16],
        stride: usize,
    ) {
        self.rows_interleaved_with(Backend::detect(), r0, nr, c0, ncols, out, stride)
    }

    /// Whether [`Self::dequantize_rows_interleaved_bf16_cols`] has a vectorized
    /// kernel for this tensor on this CPU (2-D, rows a whole number of
    /// blocks, AVX-512); otherwise it runs a plain loop, slower than
    /// dequantizing the rows and interleaving them.
    pub fn rows_interleaved_fast(&self) -> bool {
        matches!(self.shape.as_slice(), &[_, cols] if cols % 16 == 0 && cols % self.blocksize == 0)
            && Backend::detect().has_avx512()
    }

    /// [`Self::dequantize_rows_interleaved_bf16_cols`] with an explicit backend (tests).
    #[doc(hidden)]
    #[allow(clippy::too_many_arguments)]
    pub fn rows_interleaved_with(
        &self,
        backend: Backend,
        r0: usize,
        nr: usize,
        c0: usize,
        ncols: usize,
        out: &mut [u16],
        stride: usize,
    ) {
        let &[rows, cols] = self.shape.as_slice() else {
            panic!(
                "dequantize_rows_interleaved_bf16_cols needs a 2-D tensor, shape is {:?}",
                self.shape
            )
        };
        assert!(
            cols.is_multiple_of(16),
            "dequantize_rows_interleaved_bf16_cols: {cols} columns, not a multiple of 16"
        );
        assert!(
            c0.is_multiple_of(16) && ncols.is_multiple_of(16) && c0 <= cols && ncols <= cols - c0,
            "dequantize_rows_interleaved_bf16_cols: columns {c0}..{} of {cols}",
            c0 + ncols
        );
        assert!(
            r0 <= rows && nr <= rows - r0,
            "rows {r0}..{} outside the tensor's {rows}",
            r0 + nr
        );
        let (groups, npairs) = (ncols / 16, nr.div_ceil(2));
        if groups == 0 || npairs == 0 {
            return;
        }
        assert!(
            stride >= 32 * npairs,
            "dequantize_rows_interleaved_bf16_cols: stride {stride} < {}",
            32 * npairs
        );
        assert!(
            out.len() >= (groups - 1) * stride + 32 * npairs,
            "dequantize_rows_interleaved_bf16_cols: output of {} words, {} needed",
            out.len(),
            (groups - 1) * stride + 32 * npairs
        );
        let map = self.quant_map();
        let bs = self.blocksize;
        #[cfg(target_arch = "x86_64")]
        if backend.has_avx512() && cols.is_multiple_of(bs) {
            for p0 in (0..npairs).step_by(MAX_PAIRS) {
                let rows_here = (nr - 2 * p0).min(2 * MAX_PAIRS);
                // SAFETY: `has_avx512` holds only after run-time detection of
                // AVX-512 F and BW; the sizes were checked above.
                unsafe {
                    rows_avx512(
                        self,
                        &map,
                        r0 + 2 * p0,
                        rows_here,
                        c0 / 16,
                        groups,
                        &mut out[32 * p0..],
                        stride,
                    )
                }
            }
            return;
        }
        let _ = backend;
        for g in 0..groups {
            for p in 0..npairs {
                let (re, odd) = (r0 + 2 * p, 2 * p + 1 < nr);
                let col = c0 + 16 * g;
                let (ee, eo) = (re * cols + col, (re + usize::from(odd)) * cols + col);
                let a_e = self.absmax.at(ee / bs);
                let a_o = if odd { self.absmax.at(eo / bs) } else { 0.0 };
                let d = &mut out[g * stride + 32 * p..g * stride + 32 * p + 32];
                group_scalar(&self.packed, &map, ee / 2, eo / 2, a_e, a_o, odd, d);
            }
        }
    }
}

/// One group: 16 elements from byte `pe` on (absmax `a_e`) and, with `odd`,
/// from byte `po` on (`a_o`), interleaved into `d`'s 32 words.
#[allow(clippy::too_many_arguments)]
fn group_scalar(
    packed: &[u8],
    map: &[f32; 16],
    pe: usize,
    po: usize,
    a_e: f32,
    a_o: f32,
    odd: bool,
    d: &mut [u16],
) {
    let mut e = [half::bf16::ZERO; 16];
    let mut o = [half::bf16::ZERO; 16];
    crate::dequantize::expand_scalar(&packed[pe..pe + 8], map, a_e, DType::F32, &mut e);
    if odd {
        crate::dequantize::expand_scalar(&packed[po..po + 8], map, a_o, DType::F32, &mut o);
    }
    for j in 0..16 {
        d[2 * j] = e[j].to_bits();
        d[2 * j + 1] = o[j].to_bits();
    }
}

/// The AVX-512 kernel of [`Quantized4::dequantize_rows_interleaved_bf16_cols`]
/// for `nr <= 32` rows whose length is a whole number of blocks: per block
/// column and pair a 32-entry table (the even row's 16 products in words
/// 0..16, the odd row's in 16..32), then per group and pair one word
/// permute by indices made from the two rows' 8 code bytes, so each group's
/// tile rows are stored one after the other. A block pair with a non-finite
/// absmax goes through the scalar kernel (as `expand_blocks_bf16` does).
///
/// # Safety
/// AVX-512 F and BW are available; the caller checked the sizes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
#[allow(clippy::too_many_arguments)]
unsafe fn rows_avx512(
    q: &Quantized4,
    map: &[f32; 16],
    r0: usize,
    nr: usize,
    g0: usize,
    groups: usize,
    out: &mut [u16],
    stride: usize,
) {
    use std::arch::x86_64::*;
    let cols = q.shape[1];
    let bs = q.blocksize;
    let npairs = nr.div_ceil(2);
    let packed = &q.packed;
    assert!(npairs <= MAX_PAIRS && cols.is_multiple_of(bs));
    assert!(groups > 0 && 16 * (g0 + groups) <= cols);
    assert!(out.len() >= (groups - 1) * stride + 32 * npairs);
    assert!((r0 + nr) * cols / 2 <= packed.len());
    let m = _mm512_loadu_ps(map.as_ptr());
    let table = |a: f32| crate::simd::x86_512::bf16_table(m, a);
    let low = _mm_set1_epi8(0x0f);
    // +16 on the odd row's words: they index the table's upper half
    let upper = _mm512_set1_epi32(16 << 16);
    let nblocks = cols / bs;
    let gpb = bs / 16;
    let mut absmax = [[0f32; SEG_BLOCKS]; 2 * MAX_PAIRS];
    // 16 KiB of tables: left uninitialized (each is written for its pair
    // and block before it is read); zeroing them was a memset per call, a
    // tenth of a 32-row strip's time
    let mut luts = [[std::mem::MaybeUninit::<__m512i>::uninit(); SEG_BLOCKS]; MAX_PAIRS];
    let mut finite = [[true; SEG_BLOCKS]; MAX_PAIRS];
    // the blocks of the column range
    let (first, last) = (16 * g0 / bs, (16 * (g0 + groups) - 1) / bs + 1);
    // The next call's rows (the caller walks the weight 32 rows at a time,
    // a strip of columns of each): their code lines asked for now. Strips a
    // row apart are a stride no hardware prefetcher follows, and the codes
    // come from memory (the writer ran 2-3x slower in a step than hot).
    let rows = q.shape[0];
    for r in r0 + 32..(r0 + 64).min(rows) {
        let (lo, hi) = (
            (r * cols + 16 * g0) / 2,
            (r * cols + 16 * (g0 + groups)) / 2,
        );
        let mut at = lo & !63;
        while at < hi {
            _mm_prefetch::<_MM_HINT_T0>(packed.as_ptr().wrapping_add(at) as *const i8);
            at += 64;
        }
        if let crate::Absmax::Double(d) = &q.absmax {
            let c = d.codes.as_ptr().wrapping_add(r * nblocks + first);
            _mm_prefetch::<_MM_HINT_T0>(c as *const i8);
        }
    }
    let mut b0 = first;
    while b0 < last {
        let nb = SEG_BLOCKS.min(last - b0);
        for (k, am) in absmax.iter_mut().enumerate().take(nr) {
            q.absmax.range_f32((r0 + k) * nblocks + b0, &mut am[..nb]);
        }
        for p in 0..npairs {
            let odd = 2 * p + 1 < nr;
            for b in 0..nb {
                let a_e = absmax[2 * p][b];
                let a_o = if odd { absmax[2 * p + 1][b] } else { 0.0 };
                finite[p][b] = a_e.is_finite() && a_o.is_finite();
                let hi = if odd {
                    table(a_o)
                } else {
                    _mm256_setzero_si256()
                };
                luts[p][b].write(_mm512_inserti64x4::<1>(
                    _mm512_castsi256_si512(table(a_e)),
                    hi,
                ));
            }
        }
        for g in (b0 * gpb).max(g0)..((b0 + nb) * gpb).min(g0 + groups) {
            let b = g / gpb - b0;
            let dst = out.as_mut_ptr().add((g - g0) * stride);
            for p in 0..npairs {
                let (re, odd) = (r0 + 2 * p, 2 * p + 1 < nr);
                let ee = re * cols + 16 * g;
                let eo = if odd { ee + cols } else { ee };
                if !finite[p][b] {
                    let d = std::slice::from_raw_parts_mut(dst.add(32 * p), 32);
                    let (a_e, a_o) = (
                        absmax[2 * p][b],
                        if odd { absmax[2 * p + 1][b] } else { 0.0 },
                    );
                    group_scalar(packed, map, ee / 2, eo / 2, a_e, a_o, odd, d);
                    continue;
                }
                let e8 = _mm_loadl_epi64(packed.as_ptr().add(ee / 2) as *const __m128i);
                let o8 = _mm_loadl_epi64(packed.as_ptr().add(eo / 2) as *const __m128i);
                // bytes e0 o0 e1 o1 ...; byte m holds elements 2m (high nibble), 2m+1
                let x = _mm_unpacklo_epi8(e8, o8);
                let hi = _mm_and_si128(_mm_srli_epi16::<4>(x), low);
                let lo = _mm_and_si128(x, low);
                // hi(e_m) hi(o_m) lo(e_m) lo(o_m): elements 2m, 2m+1 of both rows
                let w0 = _mm_unpacklo_epi16(hi, lo);
                let w1 = _mm_unpackhi_epi16(hi, lo);
                let idx = _mm512_or_si512(_mm512_cvtepu8_epi16(_mm256_set_m128i(w1, w0)), upper);
                // SAFETY: written above for this segment's pairs and blocks.
                let v = _mm512_permutexvar_epi16(idx, luts[p][b].assume_init());
                _mm512_storeu_si512(dst.add(32 * p) as *mut _, v);
            }
        }
        b0 += nb;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{quantize_4bit, test_matrix as matrix, Input, QuantOptions, QuantType};

    /// The rows through `dequantize_range` to bf16, interleaved by hand.
    fn expected(q: &Quantized4, r0: usize, nr: usize, stride: usize) -> Vec<u16> {
        let cols = q.shape[1];
        let mut rows = vec![half::bf16::ZERO; nr * cols];
        q.dequantize_range(r0 * cols, &mut rows);
        let groups = cols / 16;
        let mut out = vec![0xdeadu16; groups.max(1) * stride];
        for g in 0..groups {
            for p in 0..nr.div_ceil(2) {
                for j in 0..16 {
                    let at = g * stride + 32 * p + 2 * j;
                    out[at] = rows[2 * p * cols + 16 * g + j].to_bits();
                    out[at + 1] = if 2 * p + 1 < nr {
                        rows[(2 * p + 1) * cols + 16 * g + j].to_bits()
                    } else {
                        0
                    };
                }
            }
        }
        out
    }

    /// Column ranges on the 16 grid: whole, from the second group, a middle
    /// stretch across block boundaries, the last group.
    fn column_ranges(cols: usize) -> Vec<(usize, usize)> {
        let mut v = vec![(0, cols)];
        if cols >= 32 {
            v.push((16, cols - 16));
            v.push((cols / 32 * 16, 16 * (cols / 64).max(1)));
            v.push((cols - 16, 16));
        }
        v.retain(|&(c0, n)| n > 0 && c0 + n <= cols);
        v
    }

    /// [`expected`] for the columns `c0 .. c0 + ncols`: the whole rows'
    /// groups from `c0 / 16` on, moved to the front.
    fn expected_cols(
        q: &Quantized4,
        r0: usize,
        nr: usize,
        c0: usize,
        ncols: usize,
        stride: usize,
    ) -> Vec<u16> {
        let cols = q.shape[1];
        let whole = expected(q, r0, nr, stride);
        let mut out = vec![0xdeadu16; (ncols / 16).max(1) * stride];
        for g in 0..ncols / 16 {
            let src = (c0 / 16 + g) * stride;
            out[g * stride..(g + 1) * stride].copy_from_slice(&whole[src..src + stride]);
        }
        assert!(c0 + ncols <= cols);
        out
    }

    fn check_cols(q: &Quantized4, what: &str) {
        let (rows, cols) = (q.shape[0], q.shape[1]);
        for backend in Backend::available() {
            for (c0, ncols) in column_ranges(cols) {
                for (r0, nr) in [(0, rows.min(32)), (rows - 3, 3), (1, 1)] {
                    let stride = 32 * nr.div_ceil(2) + 32;
                    let want = expected_cols(q, r0, nr, c0, ncols, stride);
                    let mut got = vec![0xdeadu16; want.len()];
                    q.rows_interleaved_with(backend, r0, nr, c0, ncols, &mut got, stride);
                    // words past each group's pairs are not written
                    for g in 0..ncols / 16 {
                        let n = 32 * nr.div_ceil(2);
                        assert_eq!(
                            got[g * stride..g * stride + n],
                            want[g * stride..g * stride + n],
                            "{what} {backend:?} rows {r0}+{nr} columns {c0}+{ncols}, group {g}"
                        );
                    }
                }
            }
        }
    }

    fn check(q: &Quantized4, what: &str) {
        check_cols(q, what);
        let rows = q.shape[0];
        for backend in Backend::available() {
            for (r0, nr) in [
                (0, rows),
                (0, 1),
                (1, rows - 1),
                (rows - 3, 3),
                (2, 2),
                (0, 0),
            ] {
                if nr > 40 || r0 + nr > rows {
                    continue;
                }
                for extra in [0, 32, 96] {
                    let stride = 32 * nr.div_ceil(2) + extra;
                    let want = expected(q, r0, nr, stride.max(32));
                    let mut got = vec![0xdeadu16; want.len()];
                    q.rows_interleaved_with(
                        backend,
                        r0,
                        nr,
                        0,
                        q.shape[1],
                        &mut got,
                        stride.max(32),
                    );
                    assert_eq!(
                        got, want,
                        "{what} {backend:?} rows {r0}+{nr} stride {stride}"
                    );
                }
            }
        }
    }

    #[test]
    fn interleaved_rows_equal_the_rows_dequantized_then_interleaved() {
        for (rows, cols, bs) in [
            (5, 64, 64),
            (33, 48, 32),
            (7, 576, 64),
            (3, 80, 128),
            (32, 2048, 64),
            (4, 208, 4096),
            (3, 16 * 67 * 64, 64),
            (36, 1536, 128),
        ] {
            for qt in [QuantType::Nf4, QuantType::Fp4] {
                for dq in [false, true] {
                    let w = matrix(rows, cols, (rows * cols + bs) as u64);
                    let opts = QuantOptions {
                        quant_type: qt,
                        blocksize: bs,
                        double_quant: dq,
                        ..Default::default()
                    };
                    let q = quantize_4bit(Input::F32(&w), &[rows, cols], &opts).unwrap();
                    check(&q, &format!("{qt:?} dq {dq} bs {bs} {rows}x{cols}"));
                }
            }
        }
        println!("checked on {:?}", Backend::available());
    }

    #[test]
    fn interleaved_rows_with_non_finite_blocks_match_the_plain_dequantization() {
        let (rows, cols) = (6, 256);
        let w = matrix(rows, cols, 3);
        let opts = QuantOptions {
            double_quant: false,
            ..Default::default()
        };
        let mut q = quantize_4bit(Input::F32(&w), &[rows, cols], &opts).unwrap();
        if let crate::Absmax::Plain(v) = &mut q.absmax {
            v[1] = f32::INFINITY;
            v[6] = f32::NAN;
            v[9] = f32::NEG_INFINITY;
            v[23] = f32::NAN;
        }
        check(&q, "non-finite");
    }
}
