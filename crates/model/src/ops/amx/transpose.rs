use std::arch::x86_64::*;

use super::TILE_U16;

/// Transposes the 16 × 16 u32 block at `src` (row stride `ld` u32) into
/// the 16 contiguous rows of 16 u32 at `dst` (the register transpose is
/// `qlora-quant`'s, which its 4-bit tile writer uses too).
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn t16x16(src: *const u32, ld: usize, dst: *mut u32) {
    let mut r = [_mm512_setzero_si512(); 16];
    for (k, v) in r.iter_mut().enumerate() {
        *v = _mm512_loadu_si512(src.add(k * ld) as *const _);
    }
    qlora_quant::transpose16x16_u32(&r, dst);
}

/// [`super::pack_b_forward`] with AVX-512: whole 16-row streams and
/// 32-column k-steps by register transposes, the rest by the plain loop.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn pack_b_forward_avx512(
    wrows: &[u16],
    nn: usize,
    i: usize,
    ksteps: usize,
    b: &mut [u16],
) {
    assert!(nn <= 32 && wrows.len() >= nn * i && b.len() >= 2 * ksteps * TILE_U16);
    let full_k = i / 32;
    let full_streams = if i.is_multiple_of(2) { nn / 16 } else { 0 };
    if full_streams == 2 && full_k == ksteps {
        // The common case: every tile is a full transpose.
    } else if full_streams == 2 && i == 32 * full_k {
        // Whole tiles, and k-steps past the row: those are zeros.
        for s in 0..2 {
            b[(s * ksteps + full_k) * TILE_U16..(s + 1) * ksteps * TILE_U16].fill(0);
        }
    } else {
        super::pack_b_forward_ref(wrows, nn, i, ksteps, b);
        if full_streams == 0 {
            return;
        }
    }
    let src = wrows.as_ptr();
    let dst = b.as_mut_ptr();
    for s in 0..full_streams {
        for ks in 0..full_k {
            // SAFETY: rows 16s..16s+16 of `wrows` are complete (nn >= 16(s+1))
            // and i is even, so u32 column 16ks+15 < i/2 is in the row; the
            // tile (s, ks) lies inside `b` (asserted above).
            unsafe {
                t16x16(
                    src.add(16 * s * i + 32 * ks) as *const u32,
                    i / 2,
                    dst.add((s * ksteps + ks) * TILE_U16) as *mut u32,
                );
            }
        }
    }
}

/// [`super::backward::interleave_rows`] with AVX-512 BW: 16 columns of
/// each row per step, interleaved by one word permute.
#[target_feature(enable = "avx512f,avx512bw")]
pub(super) unsafe fn interleave_rows_avx512(
    even: &[u16],
    odd: &[u16],
    dst: &mut [u16],
    stride: usize,
) {
    let groups = even.len() / 16;
    assert!(odd.len() >= groups * 16);
    assert!(groups == 0 || dst.len() >= (groups - 1) * stride + 32);
    // word k of the result: even[k / 2] (k even) or odd[k / 2] (k odd), the
    // odd row sitting in the upper half of the source register
    let idx = _mm512_set_epi16(
        31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4,
        19, 3, 18, 2, 17, 1, 16, 0,
    );
    for g in 0..groups {
        // SAFETY: 16 words of each row at g·16 (asserted), 32 words at
        // g·stride of `dst` (asserted).
        unsafe {
            let e = _mm256_loadu_si256(even.as_ptr().add(g * 16) as *const __m256i);
            let o = _mm256_loadu_si256(odd.as_ptr().add(g * 16) as *const __m256i);
            let both = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(e), o);
            let r = _mm512_permutexvar_epi16(idx, both);
            _mm512_storeu_si512(dst.as_mut_ptr().add(g * stride) as *mut _, r);
        }
    }
}
