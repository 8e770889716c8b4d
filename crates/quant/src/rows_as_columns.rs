//! Rows of a 4-bit matrix dequantized to bf16 as the columns of AMX tiles:
//! the B operand of a product with the weight transposed (the forward
//! `x · Wᵀ` pairs consecutive elements of one weight row in each 32-bit
//! lane, one weight row per lane). Written tile by tile straight from the
//! 4-bit codes: 16 rows' 32-element chunks looked up in registers, then one
//! 16 × 16 transpose of their 32-bit pairs, instead of a row-major bf16 copy
//! that a second pass reads back and transposes (the copy's round trip
//! through L2 was a third of the forward product's time at TinyLlama's
//! shapes).

use crate::simd::Backend;
use crate::Quantized4;

/// Words in one tile: 16 rows of 32 bf16.
const TILE: usize = 512;
/// Block columns whose absmax values are gathered at a time.
const SEG_BLOCKS: usize = 16;

impl Quantized4 {
    /// Rows `r0..r0 + nr` (`nr <= 32`) of a 2-D `[rows, cols]` tensor as bf16
    /// bits in the layout of a forward B panel: two streams of `ksteps`
    /// tiles (stream `s` holds rows `r0 + 16s ..`), and word `32q + 2j + h`
    /// of tile `(s, ks)` (at `out[(s·ksteps + ks)·512 ..]`) is
    /// `W[r0 + 16s + j][32ks + 2q + h]`, `+0.0` for a row past `nr` or a
    /// column past `cols`. Each value is bit for bit what
    /// [`Self::dequantize_range`] gives as bf16.
    ///
    /// # Panics
    /// If the tensor is not 2-D, `nr > 32`, the rows are outside it,
    /// `32·ksteps < cols`, or `out` is shorter than `2·ksteps·512`.
    pub fn dequantize_rows_as_tile_columns_bf16(
        &self,
        r0: usize,
        nr: usize,
        ksteps: usize,
        out: &mut [u16],
    ) {
        self.dequantize_rows_as_tile_columns_bf16_with(Backend::detect(), r0, nr, ksteps, out)
    }

    /// Whether [`Self::dequantize_rows_as_tile_columns_bf16`] has a
    /// vectorized kernel for this tensor on this CPU (2-D, rows a whole
    /// number of blocks and of 32 columns, blocks of at least 32, AVX-512);
    /// otherwise it runs a plain loop.
    pub fn rows_as_tile_columns_fast(&self) -> bool {
        matches!(self.shape.as_slice(), &[_, cols] if fast_shape(cols, self.blocksize))
            && Backend::detect().has_avx512()
    }

    /// [`Self::dequantize_rows_as_tile_columns_bf16`] with an explicit backend (tests).
    #[doc(hidden)]
    pub fn dequantize_rows_as_tile_columns_bf16_with(
        &self,
        backend: Backend,
        r0: usize,
        nr: usize,
        ksteps: usize,
        out: &mut [u16],
    ) {
        let &[rows, cols] = self.shape.as_slice() else {
            panic!(
                "dequantize_rows_as_tile_columns_bf16 needs a 2-D tensor, shape is {:?}",
                self.shape
            )
        };
        assert!(
            nr <= 32,
            "dequantize_rows_as_tile_columns_bf16: {nr} rows > 32"
        );
        assert!(
            r0 <= rows && nr <= rows - r0,
            "rows {r0}..{} outside the tensor's {rows}",
            r0 + nr
        );
        assert!(
            32 * ksteps >= cols,
            "dequantize_rows_as_tile_columns_bf16: {ksteps} k-steps for {cols} columns"
        );
        assert!(
            out.len() >= 2 * ksteps * TILE,
            "dequantize_rows_as_tile_columns_bf16: output of {} words, {} needed",
            out.len(),
            2 * ksteps * TILE
        );
        let out = &mut out[..2 * ksteps * TILE];
        #[cfg(target_arch = "x86_64")]
        if backend.has_avx512() && fast_shape(cols, self.blocksize) {
            for s in 0..2 {
                let rs = nr.saturating_sub(16 * s).min(16);
                let dst = &mut out[s * ksteps * TILE..(s + 1) * ksteps * TILE];
                // SAFETY: `has_avx512` holds only after run-time detection of
                // AVX-512 F and BW; the sizes were checked above.
                unsafe { stream_avx512(self, r0 + 16 * s, rs, ksteps, dst) };
            }
            return;
        }
        let _ = backend;
        out.fill(0);
        let mut row = vec![half::bf16::ZERO; cols];
        for jj in 0..nr {
            self.dequantize_range((r0 + jj) * cols, &mut row);
            let (s, j) = (jj / 16, jj % 16);
            for (c, v) in row.iter().enumerate() {
                let (ks, q, h) = (c / 32, (c % 32) / 2, c % 2);
                out[(s * ksteps + ks) * TILE + 32 * q + 2 * j + h] = v.to_bits();
            }
        }
    }
}

/// Whether the AVX-512 kernel takes a row of `cols` in blocks of `bs`:
/// every 32-column chunk of a row lies inside one block.
fn fast_shape(cols: usize, bs: usize) -> bool {
    cols.is_multiple_of(32) && bs.is_multiple_of(32) && cols.is_multiple_of(bs)
}

/// One stream (rows `r0..r0 + rs`, `rs <= 16`) of the panel: per block
/// column the rows' 16-entry tables, then per 32-column chunk one word
/// permute per row and a transpose of the 16 rows' pairs into the tile. A
/// block with a non-finite absmax goes through the scalar kernel (as
/// `expand_blocks_bf16` does); rows past `rs` and k-steps past the row are
/// zeros.
///
/// # Safety
/// AVX-512 F and BW are available; `fast_shape` holds, the rows are inside
/// the tensor, `32·ksteps >= cols` and `dst` is `ksteps` tiles.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
#[allow(clippy::needless_range_loop)] // `b` indexes the inner arrays of `absmax`
unsafe fn stream_avx512(q: &Quantized4, r0: usize, rs: usize, ksteps: usize, dst: &mut [u16]) {
    use std::arch::x86_64::*;
    let cols = q.shape[1];
    let bs = q.blocksize;
    let full_k = cols / 32;
    assert!(rs <= 16 && dst.len() == ksteps * TILE && full_k <= ksteps);
    dst[full_k * TILE..].fill(0);
    if rs == 0 {
        dst[..full_k * TILE].fill(0);
        return;
    }
    assert!((r0 + rs) * cols / 2 <= q.packed.len());
    let map = q.quant_map();
    let m = _mm512_loadu_ps(map.as_ptr());
    let low = _mm512_set1_epi32(0x0f);
    let packed = q.packed.as_ptr();
    let nblocks = cols / bs;
    let chunks = bs / 32;
    let mut absmax = [[0f32; SEG_BLOCKS]; 16];
    let mut b0 = 0;
    while b0 < nblocks {
        let nb = SEG_BLOCKS.min(nblocks - b0);
        for (j, am) in absmax.iter_mut().enumerate().take(rs) {
            q.absmax.range_f32((r0 + j) * nblocks + b0, &mut am[..nb]);
        }
        for b in 0..nb {
            let mut luts = [_mm512_setzero_si512(); 16];
            let mut all_finite = true;
            for j in 0..rs {
                let a = absmax[j][b];
                all_finite &= a.is_finite();
                luts[j] = _mm512_castsi256_si512(crate::simd::x86_512::bf16_table(m, a));
            }
            for c in 0..chunks {
                let ks = (b0 + b) * chunks + c;
                let mut r = [_mm512_setzero_si512(); 16];
                for j in 0..rs {
                    let e = (r0 + j) * cols + 32 * ks;
                    if ks.is_multiple_of(4) {
                        // this row's codes two lines ahead, into L1
                        _mm_prefetch::<_MM_HINT_T0>(packed.wrapping_add(e / 2 + 128) as *const i8);
                    }
                    let codes = _mm_loadu_si128(packed.add(e / 2) as *const __m128i);
                    // dword k = high nibble | low nibble << 16: elements 2k, 2k+1
                    let d = _mm512_cvtepu8_epi32(codes);
                    let idx = _mm512_or_si512(
                        _mm512_srli_epi32::<4>(d),
                        _mm512_slli_epi32::<16>(_mm512_and_si512(d, low)),
                    );
                    r[j] = _mm512_permutexvar_epi16(idx, luts[j]);
                }
                if !all_finite {
                    for (j, rj) in r.iter_mut().enumerate().take(rs) {
                        let a = absmax[j][b];
                        if a.is_finite() {
                            continue;
                        }
                        let e = (r0 + j) * cols + 32 * ks;
                        let mut v = [half::bf16::ZERO; 32];
                        crate::dequantize::expand_scalar(
                            &q.packed[e / 2..e / 2 + 16],
                            &map,
                            a,
                            crate::DType::F32,
                            &mut v,
                        );
                        *rj = _mm512_loadu_si512(v.as_ptr() as *const _);
                    }
                }
                crate::simd::x86_512::transpose16x16_u32(
                    &r,
                    dst.as_mut_ptr().add(ks * TILE) as *mut u32,
                );
            }
        }
        b0 += nb;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{quantize_4bit, test_matrix as matrix, Input, QuantOptions, QuantType};

    /// The rows through `dequantize_range` to bf16, placed by the layout's
    /// definition (element by element).
    fn expected(q: &Quantized4, r0: usize, nr: usize, ksteps: usize) -> Vec<u16> {
        let cols = q.shape[1];
        let mut rows = vec![half::bf16::ZERO; nr * cols];
        q.dequantize_range(r0 * cols, &mut rows);
        let mut out = vec![0u16; 2 * ksteps * TILE];
        for s in 0..2 {
            for ks in 0..ksteps {
                for qq in 0..16 {
                    for j in 0..16 {
                        for h in 0..2 {
                            let (row, col) = (16 * s + j, 32 * ks + 2 * qq + h);
                            if row < nr && col < cols {
                                out[(s * ksteps + ks) * TILE + 32 * qq + 2 * j + h] =
                                    rows[row * cols + col].to_bits();
                            }
                        }
                    }
                }
            }
        }
        out
    }

    fn check(q: &Quantized4, what: &str) {
        let (rows, cols) = (q.shape[0], q.shape[1]);
        for backend in Backend::available() {
            for (r0, nr) in [
                (0, rows.min(32)),
                (0, 1),
                (1, (rows - 1).min(32)),
                (rows - 3, 3),
                (2, 17.min(rows - 2)),
                (0, 16.min(rows)),
                (0, 0),
            ] {
                if r0 + nr > rows {
                    continue;
                }
                for extra in [0, 2] {
                    let ksteps = cols.div_ceil(32) + extra;
                    let want = expected(q, r0, nr, ksteps);
                    let mut got = vec![0xdeadu16; want.len()];
                    q.dequantize_rows_as_tile_columns_bf16_with(backend, r0, nr, ksteps, &mut got);
                    assert_eq!(
                        got, want,
                        "{what} {backend:?} rows {r0}+{nr} ksteps {ksteps}"
                    );
                }
            }
        }
    }

    #[test]
    fn rows_as_tile_columns_equal_the_rows_dequantized_then_placed() {
        for (rows, cols, bs) in [
            (5, 64, 64),
            (33, 48, 32),
            (7, 576, 64),
            (3, 80, 128),
            (40, 2048, 64),
            (4, 208, 4096),
            (3, 16 * 67 * 64, 64),
            (36, 1536, 128),
            (18, 4096, 4096),
            (9, 96, 32),
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
    fn rows_as_tile_columns_with_non_finite_blocks_match_the_plain_dequantization() {
        let (rows, cols) = (20, 256);
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
            v[70] = f32::INFINITY;
        }
        check(&q, "non-finite");
    }
}
