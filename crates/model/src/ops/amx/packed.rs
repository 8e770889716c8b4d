//! A frozen weight packed once, in both directions' B layouts, for a linear
//! the step runs many times over (the lm_head: the loss's one pass takes
//! its vocabulary a block of rows at a time, forward and input gradient,
//! in every slice of positions). The per-call path packs every panel again
//! each time; at SmolLM2's 49152 × 576 head in chunks of 160 positions that
//! packing cost about as much as the products.
//!
//! The products ([`PackedWeight::forward_block`],
//! [`PackedWeight::backward_block`]) are the per-call path's, k-step for
//! k-step, so the results are bit-identical to [`super::linear_forward`] /
//! [`super::linear_backward`].

use rayon::prelude::*;

use super::backward::interleave_chunk;
use super::{
    pack_b_forward, product, round_up, with_scratch, SendPtr, TileBuf, WeightBf16, SCRATCH_B,
    TILE_U16,
};

/// W `[o, i]` as bf16 in the forward's panels (`[o/32][2][i/32][512]`) and
/// the input gradient's (`[i/32][2][o/32][512]`), both zero-padded to
/// multiples of 32.
pub struct PackedWeight {
    o: usize,
    i: usize,
    fwd: TileBuf,
    bwd: TileBuf,
}

impl std::fmt::Debug for PackedWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PackedWeight({} x {}, {} bytes)",
            self.o,
            self.i,
            self.bytes()
        )
    }
}

impl PackedWeight {
    /// Packs W (`[o, i]`, read through `w`) into both layouts, in parallel.
    pub fn new(o: usize, i: usize, w: &WeightBf16) -> PackedWeight {
        let mut pw = PackedWeight::empty();
        pw.pack(w, 0, o, i, true);
        pw
    }

    /// An empty weight for [`Self::pack_rows`] to fill, and refill.
    pub fn empty() -> PackedWeight {
        PackedWeight {
            o: 0,
            i: 0,
            fwd: TileBuf::new(),
            bwd: TileBuf::new(),
        }
    }

    /// Rows `r0..r0 + o` of a weight with `i` columns (read through `w`,
    /// whose element offsets are the whole weight's) packed into both
    /// layouts on the calling thread, into this value's buffers: what
    /// [`Self::new`] makes of those rows alone. The one-pass head's
    /// vocabulary block where no packed copy of the whole head is kept.
    pub fn pack_rows(&mut self, w: &WeightBf16, r0: usize, o: usize, i: usize) {
        self.pack(w, r0, o, i, false);
    }

    /// Rows `r0..r0 + o` into both layouts, 32 rows at a time (read once:
    /// they are a forward panel and a k-step of the input gradient's
    /// layout), on the pool or on this thread.
    fn pack(&mut self, w: &WeightBf16, r0: usize, o: usize, i: usize, parallel: bool) {
        let (kpi, kpo) = (round_up(i, 32), round_up(o, 32));
        let (ksi, kso) = (kpi / 32, kpo / 32);
        (self.o, self.i) = (o, i);
        self.fwd.resize(kpo * kpi);
        self.bwd.resize(kpi * kpo);
        if !(o.is_multiple_of(32) && i.is_multiple_of(32)) {
            // padding rows and columns must read as zeros; whole tiles are
            // every element written
            self.bwd.fill(0);
        }
        let (len, dst) = (self.bwd.len(), SendPtr(self.bwd.as_mut_ptr()));
        let panel_of = |(p, b): (usize, &mut [u16])| {
            let (n0, nn) = (p * 32, 32.min(o - p * 32));
            with_scratch(&SCRATCH_B, |sc| {
                sc.resize(nn * i);
                w.elems((r0 + n0) * i, &mut sc[..nn * i]);
                pack_b_forward(&sc[..nn * i], nn, i, ksi, b);
                // SAFETY: k-step p of the [i/32][2][o/32][512] buffer of
                // `len` elements; each panel writes its own k-step.
                unsafe {
                    interleave_chunk(&sc[..nn * i], nn, i, p, kso * TILE_U16, dst.get(), len)
                };
            });
        };
        let panel = 2 * ksi * TILE_U16;
        if parallel {
            self.fwd
                .par_chunks_mut(panel)
                .enumerate()
                .for_each(panel_of);
        } else {
            self.fwd.chunks_mut(panel).enumerate().for_each(panel_of);
        }
    }

    /// Bytes held (both layouts).
    pub fn bytes(&self) -> usize {
        2 * (self.fwd.len() + self.bwd.len())
    }

    /// `(o, i)`: W's rows and columns.
    pub fn dims(&self) -> (usize, usize) {
        (self.o, self.i)
    }

    /// Row `n` of W (its bf16 values, as f32) into `out` (`i` values), read
    /// back from the forward's panels.
    ///
    /// # Panics
    /// If `n >= o` or `out` is not `i` long.
    pub fn row_into(&self, n: usize, out: &mut [f32]) {
        assert!(n < self.o, "packed weight: row {n} of {}", self.o);
        assert_eq!(out.len(), self.i, "packed weight: row size");
        let ksteps = round_up(self.i, 32) / 32;
        let (p, s, j) = (n / 32, (n % 32) / 16, n % 16);
        let panel = &self.fwd[(p * 2 + s) * ksteps * TILE_U16..][..ksteps * TILE_U16];
        // element k of the row: pair q = k / 2 of its tile row, column j
        for (k, o) in out.iter_mut().enumerate() {
            let (ks, q, e) = (k / 32, (k % 32) / 2, k % 2);
            *o = f32::from_bits((panel[ks * TILE_U16 + q * 32 + j * 2 + e] as u32) << 16);
        }
    }

    /// `c[0..m, 0..n] = A · W[n0..n0 + n]ᵀ` on the calling thread: A packed
    /// by [`pack_a`] (`mp` rows, `round_up(i, 32)` columns, its first `m`
    /// real), `n0` a multiple of 32, `c` with row stride `ldc`.
    ///
    /// # Panics
    /// If AMX is not [`available`] or an operand is out of range.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn forward_block(
        &self,
        a: &[u16],
        mp: usize,
        m: usize,
        n0: usize,
        n: usize,
        c: &mut [f32],
        ldc: usize,
    ) {
        assert!(
            n0.is_multiple_of(32) && n0 + n <= self.o,
            "packed forward block: columns"
        );
        let kp = round_up(self.i, 32);
        let ksteps = kp / 32;
        let panel = 2 * ksteps * TILE_U16;
        for p in n0 / 32..(n0 + n).div_ceil(32) {
            let nn = 32.min(n0 + n - p * 32);
            let b = &self.fwd[p * panel..(p + 1) * panel];
            product(
                a,
                kp,
                mp,
                m,
                0,
                b,
                ksteps,
                ksteps,
                &mut c[p * 32 - n0..],
                ldc,
                nn,
                false,
            );
        }
    }

    /// `dx[0..m, 0..i] += A · W[k0..k0 + 32·ks, ..]` on the calling thread: A
    /// packed by [`pack_a`] (`mp` rows, `kpa` columns, its first `ks`
    /// k-steps: W's rows `k0..`), `k0` a multiple of 32, `dx` `[m, i]`.
    ///
    /// # Panics
    /// If AMX is not [`available`] or an operand is out of range.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn backward_block(
        &self,
        a: &[u16],
        kpa: usize,
        mp: usize,
        m: usize,
        k0: usize,
        ks: usize,
        dx: &mut [f32],
    ) {
        let i = self.i;
        let kst = round_up(self.o, 32) / 32;
        assert!(
            k0.is_multiple_of(32) && k0 / 32 + ks <= kst,
            "packed backward block: rows of W"
        );
        let stream = kst * TILE_U16;
        for nb in 0..i.div_ceil(32) {
            let nn = 32.min(i - nb * 32);
            let b = &self.bwd[nb * 2 * stream + (k0 / 32) * TILE_U16..];
            product(
                a,
                kpa,
                mp,
                m,
                0,
                b,
                ks,
                kst,
                &mut dx[nb * 32..],
                i,
                nn,
                true,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::super::testutil::*;
    use super::super::{available, bf16_bits, linear_backward, linear_forward, pack_a};
    use super::*;

    /// Bit for bit the per-call products, through the blocks the loss's one
    /// pass runs (all of W's rows at once, and in blocks of 256 with a
    /// partial last one), on shapes with partial row and column blocks, odd
    /// row counts and i not a multiple of 16; `row_into` reads W's rows back.
    #[test]
    fn packed_products_equal_the_per_call_ones_bit_for_bit() {
        if !available() {
            eprintln!(
                "SKIPPED: AMX-BF16 is not available on this CPU; the packed products were not run"
            );
            return;
        }
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for &(o, i, t) in &[
            (70usize, 96usize, 40usize),
            (33, 45, 7),
            (1000, 576, 160),
            (5000, 64, 300),
            (64, 1, 32),
        ] {
            let wv = rand_vec(o * i, 71, 1.0);
            let w = |start: usize, out: &mut [u16]| {
                for (d, v) in out.iter_mut().zip(&wv[start..]) {
                    *d = bf16_bits(*v);
                }
            };
            let p = PackedWeight::new(o, i, &w);
            assert_eq!(p.bytes(), 4 * round_up(o, 32) * round_up(i, 32));
            assert_eq!(p.dims(), (o, i));
            let mut row = vec![0f32; i];
            for n in [0, o / 2, o - 1] {
                p.row_into(n, &mut row);
                let want: Vec<f32> = wv[n * i..(n + 1) * i]
                    .iter()
                    .map(|v| f32::from_bits((bf16_bits(*v) as u32) << 16))
                    .collect();
                assert_eq!(bits(&row), bits(&want), "row {n} of {o}x{i}");
            }
            let (kpi, kpo, mp) = (round_up(i, 32), round_up(o, 32), round_up(t, 32));
            let x = rand_vec(t * i, 72, 1.0);
            let mut want = vec![f32::NAN; t * o];
            linear_forward(o, i, t, &x, &mut want, &w);
            let mut a = TileBuf::new();
            pack_a(&x, t, i, i, 0, kpi, &mut a);
            for block in [o, 256] {
                let mut got = vec![f32::NAN; t * o];
                for n0 in (0..o).step_by(block) {
                    let n = block.min(o - n0);
                    p.forward_block(&a, mp, t, n0, n, &mut got[n0..], o);
                }
                assert_eq!(
                    bits(&got),
                    bits(&want),
                    "forward {o}x{i}x{t}, blocks of {block}"
                );
            }
            let dy = rand_vec(t * o, 73, 1.0);
            let init = rand_vec(t * i, 74, 1.0);
            let mut want = init.clone();
            linear_backward(o, i, t, &dy, &mut want, &w);
            let mut a = TileBuf::new();
            pack_a(&dy, t, o, o, 0, kpo, &mut a);
            let mut got = init.clone();
            p.backward_block(&a, kpo, mp, t, 0, kpo / 32, &mut got);
            assert_eq!(bits(&got), bits(&want), "input gradient {o}x{i}x{t}");
        }
    }
}
