//! Writing a few rows of a row-major matrix as columns: `dst[c·ld + j] =
//! src[j·cols + c]` for `j < rows <= 16`, `c < cols`. The f32 forward writes
//! its weight tile transposed ([`super::linear::FrozenWeight::rows_f32_t`])
//! a group of 16 expanded rows at a time; element by element that pass cost
//! about as much as the row-major product saved at the demo's batch sizes,
//! so whole 16x16 (AVX-512) or 8x8 (AVX2) blocks are transposed in
//! registers, each column leaving as one 64-byte (or two 32-byte) store.

use super::fastmath::Isa;

/// Rows of a group: one full AVX-512 block.
pub const GROUP_ROWS: usize = 16;

/// Plain reference: element by element.
///
/// # Safety
/// `dst.add(c * ld + j)` must be valid for writes for every `c < cols`,
/// `j < rows`, and written by no one else meanwhile.
pub unsafe fn write_transposed_ref(
    src: &[f32],
    rows: usize,
    cols: usize,
    dst: *mut f32,
    ld: usize,
) {
    assert!(src.len() >= rows * cols, "transpose: source too short");
    tail(src, rows, cols, 0, dst, ld)
}

/// [`write_transposed_ref`] on `isa`'s registers where a whole group of 16
/// rows (AVX-512) or 8 (AVX2) fills a block, the reference for the rest.
/// The same values either way (only moves).
///
/// # Safety
/// As [`write_transposed_ref`].
pub unsafe fn write_transposed(
    isa: Isa,
    src: &[f32],
    rows: usize,
    cols: usize,
    dst: *mut f32,
    ld: usize,
) {
    assert!(src.len() >= rows * cols, "transpose: source too short");
    #[cfg(target_arch = "x86_64")]
    {
        if rows == GROUP_ROWS && isa == Isa::V4 && isa.available() {
            let full = cols / 16 * 16;
            x86::block16_v4(src.as_ptr(), cols, full, dst, ld);
            tail(src, rows, cols, full, dst, ld);
            return;
        }
        if rows.is_multiple_of(8) && rows > 0 && isa != Isa::Generic && Isa::V3.available() {
            let full = cols / 8 * 8;
            for r0 in (0..rows).step_by(8) {
                x86::block8_v3(src.as_ptr().add(r0 * cols), cols, full, dst.add(r0), ld);
            }
            tail(src, rows, cols, full, dst, ld);
            return;
        }
    }
    let _ = isa;
    write_transposed_ref(src, rows, cols, dst, ld)
}

/// Columns `c0..cols` element by element.
unsafe fn tail(src: &[f32], rows: usize, cols: usize, c0: usize, dst: *mut f32, ld: usize) {
    for c in c0..cols {
        for j in 0..rows {
            *dst.add(c * ld + j) = src[j * cols + c];
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Columns `0..full` (a multiple of 16) of 16 rows, 16x16 blocks:
    /// pairs of rows interleaved (ps), then pairs of pairs (pd), then
    /// 128-bit lanes gathered twice (`shuffle_f32x4`).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn block16_v4(
        src: *const f32,
        cols: usize,
        full: usize,
        dst: *mut f32,
        ld: usize,
    ) {
        let mut c0 = 0;
        while c0 < full {
            let r: [__m512; 16] = std::array::from_fn(|j| _mm512_loadu_ps(src.add(j * cols + c0)));
            // t[2i], t[2i+1]: rows 2i, 2i+1 interleaved per 128-bit lane
            let mut t = [_mm512_setzero_ps(); 16];
            for i in 0..8 {
                t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
                t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
            }
            // u[4i + c], lane L: column 4L + c of rows 4i..4i+4
            let mut u = [_mm512_setzero_ps(); 16];
            for i in 0..4 {
                let pd = |v: __m512| _mm512_castps_pd(v);
                let (a, b, c, d) = (
                    pd(t[4 * i]),
                    pd(t[4 * i + 1]),
                    pd(t[4 * i + 2]),
                    pd(t[4 * i + 3]),
                );
                u[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
                u[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
                u[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
                u[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
            }
            for c in 0..4 {
                // lanes 0, 2 (columns c, 8+c) and 1, 3 (4+c, 12+c) of rows 0-7, 8-15
                let v0 = _mm512_shuffle_f32x4::<0x88>(u[c], u[4 + c]);
                let w0 = _mm512_shuffle_f32x4::<0x88>(u[8 + c], u[12 + c]);
                let v1 = _mm512_shuffle_f32x4::<0xdd>(u[c], u[4 + c]);
                let w1 = _mm512_shuffle_f32x4::<0xdd>(u[8 + c], u[12 + c]);
                let col = |k: usize| dst.add((c0 + k) * ld);
                _mm512_storeu_ps(col(c), _mm512_shuffle_f32x4::<0x88>(v0, w0));
                _mm512_storeu_ps(col(8 + c), _mm512_shuffle_f32x4::<0xdd>(v0, w0));
                _mm512_storeu_ps(col(4 + c), _mm512_shuffle_f32x4::<0x88>(v1, w1));
                _mm512_storeu_ps(col(12 + c), _mm512_shuffle_f32x4::<0xdd>(v1, w1));
            }
            c0 += 16;
        }
    }

    /// Columns `0..full` (a multiple of 8) of 8 rows, 8x8 blocks.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn block8_v3(
        src: *const f32,
        cols: usize,
        full: usize,
        dst: *mut f32,
        ld: usize,
    ) {
        let mut c0 = 0;
        while c0 < full {
            let r: [__m256; 8] = std::array::from_fn(|j| _mm256_loadu_ps(src.add(j * cols + c0)));
            let mut t = [_mm256_setzero_ps(); 8];
            for i in 0..4 {
                t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
                t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
            }
            // per 128-bit half: columns 4h + c of rows 4i..4i+4
            let mut u = [_mm256_setzero_ps(); 8];
            for i in 0..2 {
                let (a, b, c, d) = (t[4 * i], t[4 * i + 1], t[4 * i + 2], t[4 * i + 3]);
                u[4 * i] = _mm256_shuffle_ps::<0x44>(a, c);
                u[4 * i + 1] = _mm256_shuffle_ps::<0xee>(a, c);
                u[4 * i + 2] = _mm256_shuffle_ps::<0x44>(b, d);
                u[4 * i + 3] = _mm256_shuffle_ps::<0xee>(b, d);
            }
            for c in 0..4 {
                let col = |k: usize| dst.add((c0 + k) * ld);
                _mm256_storeu_ps(col(c), _mm256_permute2f128_ps::<0x20>(u[c], u[4 + c]));
                _mm256_storeu_ps(col(4 + c), _mm256_permute2f128_ps::<0x31>(u[c], u[4 + c]));
            }
            c0 += 8;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_instruction_set_writes_the_reference_columns() {
        let mut skipped = vec![];
        for isa in [Isa::V4, Isa::V3, Isa::Generic] {
            if !isa.available() {
                skipped.push(format!("{isa:?}"));
                continue;
            }
            for rows in [16, 8, 5, 1] {
                for cols in [1, 7, 8, 16, 40, 576] {
                    for ld in [rows, rows + 3] {
                        let src: Vec<f32> =
                            (0..rows * cols).map(|k| k as f32 * 0.5 - 3.0).collect();
                        let n = (cols - 1) * ld + rows;
                        let (mut want, mut got) = (vec![f32::NAN; n], vec![f32::NAN; n]);
                        // SAFETY: both buffers hold (cols - 1)·ld + rows elements.
                        unsafe {
                            write_transposed_ref(&src, rows, cols, want.as_mut_ptr(), ld);
                            write_transposed(isa, &src, rows, cols, got.as_mut_ptr(), ld);
                        }
                        for c in 0..cols {
                            for j in 0..rows {
                                assert_eq!(want[c * ld + j], src[j * cols + c]);
                            }
                        }
                        let same = want
                            .iter()
                            .zip(&got)
                            .all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(same, "{isa:?}: {rows} rows x {cols}, ld {ld}");
                    }
                }
            }
        }
        if !skipped.is_empty() {
            eprintln!(
                "transpose: not run here (CPU lacks them): {}",
                skipped.join(", ")
            );
        }
    }
}
