//! Crate-internal entries for callers that pack their own operands (the
//! attention's products): one bounds-checked block product and the B layout
//! whose K dimension runs along a matrix's rows.

use super::{available, kernel, to_bf16_padded, TileBuf, TILE_U16};

/// `C[0..m, 0..nn] (+)= A · B` for one 32-column block of B, bounds-checked:
/// A packed by [`pack_a`] (`mp` rows, `kp` columns; read from its `ks0`-th
/// k-step for `ksteps` k-steps), B two tile streams of at least `ksteps`
/// tiles, `bstride` tiles apart; C row-major with row stride `ldc`.
///
/// # Panics
/// If AMX is not [`available`] or an operand is too short.
#[allow(clippy::too_many_arguments)]
pub(crate) fn product(
    a: &[u16],
    kp: usize,
    mp: usize,
    m: usize,
    ks0: usize,
    b: &[u16],
    ksteps: usize,
    bstride: usize,
    c: &mut [f32],
    ldc: usize,
    nn: usize,
    acc: bool,
) {
    assert!(available(), "AMX bf16 path called without AMX");
    assert!(m <= mp && mp.is_multiple_of(32) && kp.is_multiple_of(32) && nn <= 32 && nn <= ldc);
    assert!((ks0 + ksteps) * 32 <= kp, "amx product: k-steps past A");
    assert!(a.len() >= mp * kp, "amx product: A too short");
    assert!(
        bstride >= ksteps && b.len() >= (bstride + ksteps) * TILE_U16,
        "amx product: B too short"
    );
    if m == 0 || nn == 0 || ksteps == 0 {
        assert!(
            ksteps > 0 || acc || m == 0 || nn == 0,
            "amx product: empty K overwriting C"
        );
        return;
    }
    assert!((m - 1) * ldc + nn <= c.len(), "amx product: C too short");
    // SAFETY: the tile products are available (AMX permitted, or
    // AVX512-BF16); the asserts keep every tile load inside `a` and `b` and
    // every C row segment inside `c`.
    unsafe {
        kernel::run_blocks(
            a.as_ptr().add(ks0 * TILE_U16),
            kp,
            mp,
            m,
            b.as_ptr(),
            ksteps,
            bstride,
            c.as_mut_ptr(),
            ldc,
            nn,
            acc,
        )
    }
}

/// Rows `0..nr` of `src` (`n` columns, row stride `ld`) as B operands whose
/// K dimension runs along the rows (`C = A · src`): for each 32-column block
/// `[2 streams][ksteps][16 × 32]`, tile `(s, ks)` element `(q, 2j + e)`
/// holding `src[32ks + 2q + e][32nb + 16s + j]` as bf16, zero past `nr` rows
/// or `n` columns. `ksteps = kp_rows / 32`; returns the tiles per stream.
pub(crate) fn pack_b_pairs(
    src: &[f32],
    nr: usize,
    n: usize,
    ld: usize,
    kp_rows: usize,
    b: &mut TileBuf,
) -> usize {
    let ksteps = kp_rows / 32;
    let nblocks = n.div_ceil(32);
    let stream = ksteps * TILE_U16;
    let np = nblocks * 32;
    b.resize(nblocks * 2 * stream);
    b.fill(0);
    // Two rows at a time as bf16 (vectorized), then interleaved as u32 pairs:
    // the 16 pairs of one tile row are 64 consecutive bytes.
    let mut even = vec![0u16; np];
    let mut odd = vec![0u16; np];
    let rows = nr.min(kp_rows);
    for pr in 0..rows.div_ceil(2) {
        let (r0, r1) = (2 * pr, 2 * pr + 1);
        let ahead = r0 + super::super::fastmath::PREFETCH_ROWS;
        if ahead + 1 < rows {
            super::super::fastmath::prefetch(src[ahead * ld..].as_ptr(), n);
            super::super::fastmath::prefetch(src[(ahead + 1) * ld..].as_ptr(), n);
        }
        to_bf16_padded(&src[r0 * ld..r0 * ld + n], &mut even);
        if r1 < rows {
            to_bf16_padded(&src[r1 * ld..r1 * ld + n], &mut odd);
        } else {
            odd.fill(0);
        }
        let (ks, q) = (r0 / 32, (r0 % 32) / 2);
        for g in 0..np / 16 {
            let (nb, s) = (g / 2, g % 2);
            let at = (nb * 2 + s) * stream + ks * TILE_U16 + q * 32;
            let dst = &mut b[at..at + 32];
            let (e, o) = (&even[g * 16..g * 16 + 16], &odd[g * 16..g * 16 + 16]);
            for j in 0..16 {
                dst[2 * j] = e[j];
                dst[2 * j + 1] = o[j];
            }
        }
    }
    ksteps
}
