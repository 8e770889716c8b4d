//! The input gradient `dx += dy · W` on AMX tiles: the weight dequantized
//! in chunks of rows, two consecutive rows interleaved per tile row.

use rayon::prelude::*;

use super::{
    available, imp, pack_a, round_up, with_scratch, SendPtr, WeightBf16, CHUNK_ELEMS, SCRATCH_A,
    SCRATCH_B, SCRATCH_C, TILE_U16,
};

/// `dx[t, i] += dy[t, o] · W`, W `[o, i]` given by `w`.
///
/// # Panics
/// If AMX is not [`available`] or the sizes do not match.
pub fn linear_backward(o: usize, i: usize, t: usize, dy: &[f32], dx: &mut [f32], w: &WeightBf16) {
    assert!(available(), "AMX bf16 path called without AMX");
    assert_eq!(dy.len(), t * o, "amx backward: dy size");
    assert_eq!(dx.len(), t * i, "amx backward: dx size");
    if t == 0 || o == 0 || i == 0 {
        return;
    }
    let kp = round_up(o, 32);
    let mp = round_up(t, 32);
    let nblocks = i.div_ceil(32);
    // Weight rows per chunk: a multiple of 32.
    let kc = ((CHUNK_ELEMS / i) / 32 * 32).clamp(32, kp);
    with_scratch(&SCRATCH_A, |a| {
        pack_a(dy, t, o, o, 0, kp, a);
        let a = &a[..];
        with_scratch(&SCRATCH_C, |chunk| {
            let dxp = SendPtr(dx.as_mut_ptr());
            let mut k0 = 0;
            while k0 < o {
                let k1 = (k0 + kc).min(o);
                let ksc = (k1 - k0).div_ceil(32);
                // [nblocks][2 streams][ksc][512]
                let stream = ksc * TILE_U16;
                let need = nblocks * 2 * stream;
                chunk.resize(need);
                if !i.is_multiple_of(32) || !(k1 - k0).is_multiple_of(32) {
                    chunk[..need].fill(0);
                }
                let cp = SendPtr(chunk.as_mut_ptr());
                (0..ksc).into_par_iter().for_each(|ks| {
                    with_scratch(&SCRATCH_B, |sc| {
                        let r0 = k0 + ks * 32;
                        let nr = 32.min(k1 - r0);
                        sc.resize(nr * i);
                        let sc = &mut sc[..nr * i];
                        w(r0 * i, sc);
                        for p in 0..nr.div_ceil(2) {
                            let r_even = &sc[2 * p * i..(2 * p + 1) * i];
                            let r_odd =
                                (2 * p + 1 < nr).then(|| &sc[(2 * p + 1) * i..(2 * p + 2) * i]);
                            for g in 0..i / 16 {
                                let (nb, s) = (g / 2, g % 2);
                                let at = (nb * 2 + s) * stream + ks * TILE_U16 + p * 32;
                                // SAFETY: at + 32 <= nblocks·2·stream; tasks write disjoint `ks` tiles.
                                let d =
                                    unsafe { std::slice::from_raw_parts_mut(cp.get().add(at), 32) };
                                let e = &r_even[g * 16..g * 16 + 16];
                                match r_odd {
                                    Some(od) => {
                                        let od = &od[g * 16..g * 16 + 16];
                                        for j in 0..16 {
                                            d[2 * j] = e[j];
                                            d[2 * j + 1] = od[j];
                                        }
                                    }
                                    None => {
                                        for j in 0..16 {
                                            d[2 * j] = e[j];
                                        }
                                    }
                                }
                            }
                            for c in (i / 16) * 16..i {
                                let (nb, s, j) = (c / 32, (c % 32) / 16, c % 16);
                                let at = (nb * 2 + s) * stream + ks * TILE_U16 + p * 32 + j * 2;
                                // SAFETY: as above.
                                unsafe {
                                    *cp.get().add(at) = r_even[c];
                                    if let Some(od) = r_odd {
                                        *cp.get().add(at + 1) = od[c];
                                    }
                                }
                            }
                        }
                    });
                });
                let chunk_ref = &chunk[..need];
                (0..nblocks).into_par_iter().for_each(|nb| {
                    let n0 = nb * 32;
                    let nn = 32.min(i - n0);
                    // SAFETY: as in the forward; A is read from column k0 on, i.e.
                    // from its k0/32-th tile of each row group (its padding columns
                    // are zero, as are the chunk's padding rows).
                    unsafe {
                        imp::run_blocks(
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
                            true,
                        );
                    }
                });
                k0 = k1;
            }
        });
    });
}
