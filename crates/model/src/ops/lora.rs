//! LoRA on top of a frozen linear: `y += s · (dropout(x) Aᵀ) Bᵀ` (PEFT's
//! vanilla LoRA, FORMATS §3.4), with A `[r, in]`, B `[out, r]`.
//!
//! Dropout uses a counter-based hash of `(key, element index)`, so the mask is
//! a pure function of the seed: the recomputation under gradient checkpointing
//! and any thread count give the same mask without storing it.

use super::fastmath::{self, Isa};
use super::{matmul, may_parallelize, skinny};
use rayon::prelude::*;

/// One adapted module's trainable matrices and hyper-parameters.
#[derive(Debug, Clone, Copy)]
pub struct LoraRef<'a> {
    pub a: &'a [f32],
    pub b: &'a [f32],
    pub r: usize,
    pub in_features: usize,
    pub out_features: usize,
    pub scale: f32,
    /// Dropout probability on the LoRA input path (0 = identity).
    pub dropout: f32,
    /// Mask key (unique per step, layer and module).
    pub dropout_key: u64,
    /// Mask position of each of the `t` input rows (`None` = its own index):
    /// a data-parallel rank passes the rows' places in the global batch so
    /// that its masks are those of the one-process run.
    pub mask_rows: Option<&'a [usize]>,
}

#[inline(always)]
pub fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The odd constant an element's mask index is multiplied by before the hash.
pub(crate) const MASK_INDEX_MUL: u64 = 0xD1B5_4A32_D192_ED03;

/// Inverted-dropout multiplier of element `i`: 0 with probability `p`, else `1/(1-p)`.
#[inline]
pub fn dropout_factor(key: u64, i: usize, p: f32) -> f32 {
    let u = (splitmix64(key ^ (i as u64).wrapping_mul(MASK_INDEX_MUL)) >> 40) as f32
        / (1u64 << 24) as f32;
    if u < p {
        0.0
    } else {
        1.0 / (1.0 - p)
    }
}

impl LoraRef<'_> {
    /// Mask index of element `k` of the flattened `[t, in]` input.
    #[inline]
    fn mask_index(&self, k: usize) -> usize {
        match self.mask_rows {
            None => k,
            Some(m) => {
                let i = self.in_features;
                m[k / i] * i + k % i
            }
        }
    }

    /// `dropout(x)` (`x`: whole rows), or `None` when dropout is off (use
    /// `x` itself).
    pub fn dropped_input(&self, x: &[f32]) -> Option<Vec<f32>> {
        if self.dropout <= 0.0 {
            return None;
        }
        let mut out = vec![0f32; x.len()];
        self.mask_rows_into(0, x, &mut out);
        Some(out)
    }

    /// [`Self::dropped_input`] element by element through
    /// [`dropout_factor`]: the definition the references and tests use.
    pub fn dropped_input_ref(&self, x: &[f32]) -> Option<Vec<f32>> {
        if self.dropout <= 0.0 {
            return None;
        }
        Some(
            x.iter()
                .enumerate()
                .map(|(i, v)| {
                    v * dropout_factor(self.dropout_key, self.mask_index(i), self.dropout)
                })
                .collect(),
        )
    }

    /// Row `k` of the input (`src`, `in_features` long) times its dropout
    /// mask into `dst`: the row [`Self::dropped_input`] has there, bit for
    /// bit (for a caller that masks rows as they come, the AMX forward's
    /// pack, [`super::amx::LoraTerm::mask`]).
    pub fn mask_row(&self, k: usize, src: &[f32], dst: &mut [f32]) {
        let i = self.in_features;
        fastmath::dropout_mul(
            self.dropout_key,
            self.mask_index(k * i),
            self.dropout,
            src,
            dst,
            false,
        );
    }

    /// Rows `k0..` of the input (`src`, whole rows of `in_features`) times
    /// their dropout masks into `dst`, a row of consecutive mask indices at
    /// a time on [`fastmath::dropout_mul`]: bit for bit
    /// `v·dropout_factor(..)` element by element.
    fn mask_rows_into(&self, k0: usize, src: &[f32], dst: &mut [f32]) {
        let i = self.in_features;
        if i == 0 {
            return;
        }
        for (r, (s, d)) in src.chunks_exact(i).zip(dst.chunks_exact_mut(i)).enumerate() {
            let base = self.mask_index((k0 + r) * i);
            fastmath::dropout_mul(self.dropout_key, base, self.dropout, s, d, false);
        }
    }

    /// Adds the LoRA term into `y[t, out]`; returns `xa = dropout(x) Aᵀ` `[t, r]`
    /// (kept for the backward). Row blocks in parallel, on [`skinny`] kernels.
    pub fn forward(&self, x: &[f32], t: usize, y: &mut [f32]) -> Vec<f32> {
        self.forward_isa(Isa::best(), x, t, y)
    }

    /// [`Self::forward`] on the kernels compiled for `isa`.
    pub fn forward_isa(&self, isa: Isa, x: &[f32], t: usize, y: &mut [f32]) -> Vec<f32> {
        let (r, i, o) = (self.r, self.in_features, self.out_features);
        assert!(
            x.len() >= t * i && y.len() >= t * o,
            "lora: x or y too short"
        );
        let mut xa = vec![0f32; t * r];
        if t == 0 || r == 0 {
            return xa;
        }
        let at = self.down_operand(); // [in, r]
        let sbt = self.up_operand(); // [r, out]
        let ch = chunk_rows(t);
        let run = |(c, (xa, y)): (usize, (&mut [f32], &mut [f32]))| {
            let (k0, rows) = (c * ch, xa.len() / r);
            let mut buf = vec![];
            let xin = self.input_rows(x, k0, rows, &mut buf);
            skinny::nn(isa, rows, r, i, xin, i, &at, xa, r, false);
            skinny::nn(isa, rows, o, r, xa, r, &sbt, y, o, true);
        };
        let pieces = xa.chunks_mut(ch * r).zip(split_rows(y, t, o, ch));
        if may_fork(t, r * (i + o)) {
            pieces
                .enumerate()
                .collect::<Vec<_>>()
                .into_par_iter()
                .for_each(run);
        } else {
            pieces.enumerate().for_each(run);
        }
        xa
    }

    /// `y += s·xa·Bᵀ` from a kept `xa` (`[t, r]`): bit for bit what
    /// [`Self::forward`] adds into `y` (same kernel, same row chunks).
    pub fn up(&self, xa: &[f32], t: usize, y: &mut [f32]) {
        let isa = Isa::best();
        let (r, o) = (self.r, self.out_features);
        assert!(
            xa.len() >= t * r && y.len() >= t * o,
            "lora: xa or y too short"
        );
        if t == 0 || r == 0 {
            return;
        }
        let sbt = self.up_operand(); // [r, out]
        let ch = chunk_rows(t);
        let run = |(c, y): (usize, &mut [f32])| {
            let rows = y.len() / o;
            let xa = &xa[c * ch * r..(c * ch + rows) * r];
            skinny::nn(isa, rows, o, r, xa, r, &sbt, y, o, true);
        };
        let pieces = split_rows(y, t, o, ch);
        if may_fork(t, r * o) {
            pieces
                .into_iter()
                .enumerate()
                .collect::<Vec<_>>()
                .into_par_iter()
                .for_each(run);
        } else {
            pieces.into_iter().enumerate().for_each(run);
        }
    }

    /// `s·Bᵀ` packed as [`Self::up`] multiplies it (`[r, padded(out)]`),
    /// for a caller that adds the up-projection itself (the AMX forward,
    /// as extra k-steps of its products: `super::amx::linear_forward_lora`).
    pub fn up_operand(&self) -> Vec<f32> {
        skinny::pack_transposed(self.b, self.out_features, self.r, self.scale)
    }

    /// `Aᵀ` packed as [`Self::down`] multiplies it (`[in, padded(r)]`), for
    /// a caller that makes `x·Aᵀ` itself ([`super::amx::LoraTerm`]: the same
    /// kernel, so the same bits; without dropout).
    pub fn down_operand(&self) -> Vec<f32> {
        skinny::pack_transposed(self.a, self.r, self.in_features, 1.0)
    }

    /// `xa = dropout(x) Aᵀ` `[t, r]` alone: bit for bit the `xa`
    /// [`Self::forward`] returns (same kernels, same row chunks), without the
    /// up-projection into `y`.
    pub fn down(&self, x: &[f32], t: usize) -> Vec<f32> {
        let isa = Isa::best();
        let (r, i) = (self.r, self.in_features);
        assert!(x.len() >= t * i, "lora: x too short");
        let mut xa = vec![0f32; t * r];
        if t == 0 || r == 0 {
            return xa;
        }
        let at = self.down_operand(); // [in, r]
        let ch = chunk_rows(t);
        let run = |(c, xa): (usize, &mut [f32])| {
            let (k0, rows) = (c * ch, xa.len() / r);
            let mut buf = vec![];
            let xin = self.input_rows(x, k0, rows, &mut buf);
            skinny::nn(isa, rows, r, i, xin, i, &at, xa, r, false);
        };
        if may_fork(t, r * i) {
            xa.chunks_mut(ch * r)
                .enumerate()
                .collect::<Vec<_>>()
                .into_par_iter()
                .for_each(run);
        } else {
            xa.chunks_mut(ch * r).enumerate().for_each(run);
        }
        xa
    }

    /// Rows `k0..k0+rows` of `dropout(x)` (`x`'s own rows without dropout),
    /// built in `buf` when needed.
    fn input_rows<'x>(
        &self,
        x: &'x [f32],
        k0: usize,
        rows: usize,
        buf: &'x mut Vec<f32>,
    ) -> &'x [f32] {
        let i = self.in_features;
        let src = &x[k0 * i..(k0 + rows) * i];
        if self.dropout <= 0.0 {
            return src;
        }
        buf.clear();
        buf.resize(src.len(), 0.0);
        self.mask_rows_into(k0, src, buf);
        buf
    }

    /// Given `dy[t, out]`, returns `(dA [r,in], dB [out,r])` and adds the LoRA
    /// path's input gradient into `dx[t, in]`. One pass over fixed row blocks
    /// (in parallel): `dxa = s·dy B` and `dBᵀ = xaᵀ dy` while the block of `dy`
    /// is in cache, then `dx += dxa A` and `dA = dxaᵀ dropout(x)`; the
    /// blocks' `dA`, `dB` parts are summed in block order (the same result on
    /// any number of threads).
    pub fn backward(
        &self,
        x: &[f32],
        xa: &[f32],
        dy: &[f32],
        t: usize,
        dx: &mut [f32],
    ) -> (Vec<f32>, Vec<f32>) {
        self.backward_isa(Isa::best(), x, xa, dy, t, dx)
    }

    /// [`Self::backward`] on the kernels compiled for `isa`.
    pub fn backward_isa(
        &self,
        isa: Isa,
        x: &[f32],
        xa: &[f32],
        dy: &[f32],
        t: usize,
        dx: &mut [f32],
    ) -> (Vec<f32>, Vec<f32>) {
        let (da, db, _) = self.backward_impl(isa, x, xa, dy, t, Some(dx));
        (da, db)
    }

    /// `dA = dxaᵀ·x` `[r, in]` alone from a given `dxa` `[t, r]`, for a
    /// caller that computed `dxa` and `dB` itself (the AMX input gradient,
    /// [`super::amx::linear_backward_lora`]): the row blocks and their
    /// summation order of [`Self::backward`]. Without dropout only.
    pub fn a_grad(&self, x: &[f32], dxa: &[f32], t: usize) -> Vec<f32> {
        assert!(
            self.dropout <= 0.0,
            "lora: a_grad takes the input without dropout"
        );
        let (r, i) = (self.r, self.in_features);
        assert!(
            x.len() >= t * i && dxa.len() >= t * r,
            "lora: x or dxa too short"
        );
        if t == 0 || r == 0 {
            return vec![0f32; r * i];
        }
        let isa = Isa::best();
        let ch = chunk_rows(t);
        let run = |c: usize| {
            let (k0, rows) = (c * ch, ch.min(t - c * ch));
            let mut part = vec![0f32; r * i];
            let (dxa, x) = (&dxa[k0 * r..(k0 + rows) * r], &x[k0 * i..(k0 + rows) * i]);
            skinny::tn(isa, r, i, rows, dxa, r, x, i, &mut part, i, false);
            part
        };
        let blocks = t.div_ceil(ch);
        let parts: Vec<Vec<f32>> = if may_fork(t, r * i) {
            (0..blocks).into_par_iter().map(run).collect()
        } else {
            (0..blocks).map(run).collect()
        };
        let mut parts = parts.into_iter();
        let mut sum = parts.next().unwrap_or_default();
        for part in parts {
            for (d, v) in sum.iter_mut().zip(&part) {
                *d += v;
            }
        }
        sum
    }

    /// `A` packed as [`Self::backward`] multiplies it into `dx`
    /// (`[r, padded(in)]`).
    pub fn input_grad_operand(&self) -> Vec<f32> {
        skinny::pack_rows(self.a, self.r, self.in_features, 1.0)
    }

    /// The backward's row blocks; adds into `dx` when given. Returns `dA`,
    /// `dB` and `dxa`.
    fn backward_impl(
        &self,
        isa: Isa,
        x: &[f32],
        xa: &[f32],
        dy: &[f32],
        t: usize,
        dx: Option<&mut [f32]>,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let (r, i, o) = (self.r, self.in_features, self.out_features);
        assert!(x.len() >= t * i, "lora: x too short");
        if let Some(dx) = &dx {
            assert!(dx.len() >= t * i, "lora: dx too short");
        }
        assert!(
            xa.len() >= t * r && dy.len() >= t * o,
            "lora: xa or dy too short"
        );
        let (mut da, mut db) = (vec![0f32; r * i], vec![0f32; o * r]);
        let mut dxa_all = vec![0f32; t * r];
        if t == 0 || r == 0 {
            return (da, db, dxa_all);
        }
        let sb = skinny::pack_rows(self.b, o, r, self.scale); // [out, r]
        let ap = dx.as_ref().map(|_| self.input_grad_operand()); // [r, in]
        let ch = chunk_rows(t);
        let run = |(c, (dxa, dx)): (usize, (&mut [f32], Option<&mut [f32]>))| {
            let (k0, rows) = (c * ch, ch.min(t - c * ch));
            let (dy, xa) = (&dy[k0 * o..(k0 + rows) * o], &xa[k0 * r..(k0 + rows) * r]);
            skinny::nn(isa, rows, r, o, dy, o, &sb, dxa, r, false);
            // [dA | dBᵀ] of this block: [r, in + out]
            let mut part = vec![0f32; r * (i + o)];
            skinny::tn(isa, r, o, rows, xa, r, dy, o, &mut part[i..], i + o, false);
            let xs = &x[k0 * i..(k0 + rows) * i];
            if self.dropout <= 0.0 {
                skinny::tn(isa, r, i, rows, dxa, r, xs, i, &mut part, i + o, false);
                if let (Some(dx), Some(ap)) = (dx, &ap) {
                    skinny::nn(isa, rows, i, r, dxa, r, ap, dx, i, true);
                }
                return part;
            }
            // under dropout the block's mask is drawn once, for both `dA`'s
            // input and the input gradient (`v·f` either way, as drawn
            // apart), into per-thread buffers kept from call to call (fresh
            // zeroed ones per block were ~14% of this backward's samples)
            super::with_thread_local(&DROPOUT_SCRATCH, |sc| {
                let n = rows * i;
                for b in [&mut sc.fac, &mut sc.xd, &mut sc.tmp] {
                    if b.len() < n {
                        b.resize(n, 0.0);
                    }
                }
                if sc.ones.len() < i {
                    sc.ones.resize(i, 1.0);
                }
                let (fac, xd, tmp) = (&mut sc.fac[..n], &mut sc.xd[..n], &mut sc.tmp[..n]);
                for (rr, f) in fac.chunks_exact_mut(i.max(1)).enumerate() {
                    let base = self.mask_index((k0 + rr) * i);
                    fastmath::dropout_mul(
                        self.dropout_key,
                        base,
                        self.dropout,
                        &sc.ones[..i],
                        f,
                        false,
                    );
                }
                for ((d, v), f) in xd.iter_mut().zip(xs).zip(&*fac) {
                    *d = v * f;
                }
                skinny::tn(isa, r, i, rows, dxa, r, xd, i, &mut part, i + o, false);
                if let (Some(dx), Some(ap)) = (dx, &ap) {
                    skinny::nn(isa, rows, i, r, dxa, r, ap, tmp, i, false);
                    for ((d, v), f) in dx.iter_mut().zip(&*tmp).zip(&*fac) {
                        *d += v * f;
                    }
                }
            });
            part
        };
        let dx_blocks: Vec<Option<&mut [f32]>> = match dx {
            Some(dx) => split_rows(dx, t, i, ch).into_iter().map(Some).collect(),
            None => (0..t.div_ceil(ch)).map(|_| None).collect(),
        };
        let pieces = dxa_all.chunks_mut(ch * r).zip(dx_blocks).enumerate();
        let parts: Vec<Vec<f32>> = if may_fork(t, r * (i + o)) {
            pieces
                .collect::<Vec<_>>()
                .into_par_iter()
                .map(run)
                .collect()
        } else {
            pieces.map(run).collect()
        };
        // parts summed in block order into the first; then dA, and dB = s·(dBᵀ)ᵀ
        let mut parts = parts.into_iter();
        let mut sum = parts.next().unwrap_or_default();
        for part in parts {
            for (d, v) in sum.iter_mut().zip(&part) {
                *d += v;
            }
        }
        for (j, row) in sum.chunks_exact((i + o).max(1)).enumerate() {
            da[j * i..(j + 1) * i].copy_from_slice(&row[..i]);
            for (q, v) in row[i..].iter().enumerate() {
                db[q * r + j] = v * self.scale;
            }
        }
        (da, db, dxa_all)
    }

    /// Plain reference of [`Self::forward`] (general `ops::matmul`), for tests.
    pub fn forward_ref(&self, x: &[f32], t: usize, y: &mut [f32]) -> Vec<f32> {
        let (r, i, o) = (self.r, self.in_features, self.out_features);
        let xd = self.dropped_input_ref(x);
        let xin = xd.as_deref().unwrap_or(x);
        let mut xa = vec![0f32; t * r];
        matmul(t, r, i, xin, false, self.a, true, &mut xa, false, 1.0);
        matmul(t, o, r, &xa, false, self.b, true, y, true, self.scale);
        xa
    }

    /// Plain reference of [`Self::backward`] (general `ops::matmul`), for tests.
    pub fn backward_ref(
        &self,
        x: &[f32],
        xa: &[f32],
        dy: &[f32],
        t: usize,
        dx: &mut [f32],
    ) -> (Vec<f32>, Vec<f32>) {
        let (r, i, o) = (self.r, self.in_features, self.out_features);
        let mut db = vec![0f32; o * r];
        matmul(o, r, t, dy, true, xa, false, &mut db, false, self.scale);
        let mut dxa = vec![0f32; t * r];
        matmul(
            t, r, o, dy, false, self.b, false, &mut dxa, false, self.scale,
        );
        let xd = self.dropped_input_ref(x);
        let xin = xd.as_deref().unwrap_or(x);
        let mut da = vec![0f32; r * i];
        matmul(r, i, t, &dxa, true, xin, false, &mut da, false, 1.0);
        if self.dropout <= 0.0 {
            matmul(t, i, r, &dxa, false, self.a, false, dx, true, 1.0);
        } else {
            let mut tmp = vec![0f32; t * i];
            matmul(t, i, r, &dxa, false, self.a, false, &mut tmp, false, 1.0);
            for (k, (d, v)) in dx.iter_mut().zip(&tmp).enumerate() {
                *d += v * dropout_factor(self.dropout_key, self.mask_index(k), self.dropout);
            }
        }
        (da, db)
    }
}

/// Per-thread buffers of the backward's dropout branch (a block's mask,
/// its masked input, the unmasked input-gradient term; a row of ones).
#[derive(Default)]
struct DropoutScratch {
    fac: Vec<f32>,
    xd: Vec<f32>,
    tmp: Vec<f32>,
    ones: Vec<f32>,
}

thread_local! {
    static DROPOUT_SCRATCH: std::cell::RefCell<DropoutScratch> =
        std::cell::RefCell::new(DropoutScratch::default());
}

/// Rows per block of the LoRA products: at most 8 blocks (the backward keeps
/// one `[r, in + out]` partial gradient per block), of 128 rows or more. A
/// function of `t` alone, so the summation order never depends on threads.
fn chunk_rows(t: usize) -> usize {
    t.div_ceil(t.div_ceil(128).clamp(1, 8)).max(1)
}

/// `buf` `[t, width]` cut into blocks of `ch` rows (empty blocks when `width == 0`).
pub(crate) fn split_rows(buf: &mut [f32], t: usize, width: usize, ch: usize) -> Vec<&mut [f32]> {
    let mut rest = &mut buf[..t * width];
    let mut out = vec![];
    for k0 in (0..t).step_by(ch) {
        let (head, tail) = rest.split_at_mut(ch.min(t - k0) * width);
        out.push(head);
        rest = tail;
    }
    out
}

/// Whether to spread the row blocks over the pool: more than one block, enough
/// work, and not inside another op's parallel tasks.
fn may_fork(t: usize, per_row: usize) -> bool {
    t > chunk_rows(t) && t * per_row >= 1 << 16 && may_parallelize()
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    /// f64 reference: loss = <g, s·(drop(x)Aᵀ)Bᵀ>.
    fn loss_ref(l: &LoraRef, x: &[f64], a: &[f64], b: &[f64], g: &[f32], t: usize) -> f64 {
        let (r, i, o) = (l.r, l.in_features, l.out_features);
        let mut s = 0.0;
        for tt in 0..t {
            let xa: Vec<f64> = (0..r)
                .map(|rr| {
                    (0..i)
                        .map(|k| {
                            let f = dropout_factor(l.dropout_key, tt * i + k, l.dropout) as f64;
                            let f = if l.dropout > 0.0 { f } else { 1.0 };
                            x[tt * i + k] * f * a[rr * i + k]
                        })
                        .sum()
                })
                .collect();
            for oo in 0..o {
                let y: f64 = (0..r).map(|rr| xa[rr] * b[oo * r + rr]).sum();
                s += l.scale as f64 * y * g[tt * o + oo] as f64;
            }
        }
        s
    }

    #[test]
    fn lora_gradients_match_finite_differences() {
        let (t, i, o, r) = (5, 12, 7, 3);
        for p in [0.0f32, 0.3] {
            let a = rand_vec(r * i, 1, 0.5);
            let b = rand_vec(o * r, 2, 0.5);
            let l = LoraRef {
                a: &a,
                b: &b,
                r,
                in_features: i,
                out_features: o,
                scale: 2.0,
                dropout: p,
                dropout_key: 77,
                mask_rows: None,
            };
            let x = rand_vec(t * i, 3, 1.0);
            let g = rand_vec(t * o, 4, 1.0);
            let mut y = vec![0f32; t * o];
            let xa = l.forward(&x, t, &mut y);
            let x64: Vec<f64> = x.iter().map(|v| *v as f64).collect();
            let a64: Vec<f64> = a.iter().map(|v| *v as f64).collect();
            let b64: Vec<f64> = b.iter().map(|v| *v as f64).collect();
            // forward value
            let lv = dot(&y, &g);
            assert!((lv - loss_ref(&l, &x64, &a64, &b64, &g, t)).abs() < 1e-4);
            let mut dx = vec![0f32; t * i];
            let (da, db) = l.backward(&x, &xa, &g, t, &mut dx);
            let dir_x = rand_vec(t * i, 5, 1.0);
            let fd = directional_fd(&x, &dir_x, 1e-4, |xx| loss_ref(&l, xx, &a64, &b64, &g, t));
            assert!((fd - dot(&dx, &dir_x)).abs() < 1e-4, "dx p={p}");
            let dir_a = rand_vec(r * i, 6, 1.0);
            let fd = directional_fd(&a, &dir_a, 1e-4, |aa| loss_ref(&l, &x64, aa, &b64, &g, t));
            assert!((fd - dot(&da, &dir_a)).abs() < 1e-4, "dA p={p}");
            let dir_b = rand_vec(o * r, 7, 1.0);
            let fd = directional_fd(&b, &dir_b, 1e-4, |bb| loss_ref(&l, &x64, &a64, bb, &g, t));
            assert!((fd - dot(&db, &dir_b)).abs() < 1e-4, "dB p={p}");
        }
    }

    /// The row-block kernels against the `ops::matmul` reference: random
    /// shapes with tails, tiny and zero sizes, dropout, mask rows; every ISA.
    #[test]
    fn fast_lora_matches_matmul_reference_on_every_isa() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        // zero sizes; several row blocks (t > 128)
        let mut cases = vec![
            (0, 5, 4, 3),
            (3, 0, 4, 2),
            (3, 5, 0, 2),
            (200, 70, 45, 16),
            (300, 40, 120, 17),
        ];
        for r in [1, 3, 8, 16, 17, 33, 64] {
            for _ in 0..3 {
                let t = rng.random_range(1..160);
                cases.push((t, rng.random_range(1..100), rng.random_range(1..100), r));
            }
        }
        for isa in [Isa::V4, Isa::V3, Isa::Generic] {
            if !isa.available() {
                eprintln!("SKIPPED: {isa:?} is not available on this CPU");
                continue;
            }
            for (n, &(t, i, o, r)) in cases.iter().enumerate() {
                let seed = 10 * n as u64;
                let (a, b) = (rand_vec(r * i, seed, 0.3), rand_vec(o * r, seed + 1, 0.3));
                let rows: Vec<usize> = (0..t).map(|k| 3 * k + 1).collect();
                for (p, mask_rows) in [(0.0, None), (0.25, None), (0.25, Some(&rows[..]))] {
                    let l = LoraRef {
                        a: &a,
                        b: &b,
                        r,
                        in_features: i,
                        out_features: o,
                        scale: 1.5,
                        dropout: p,
                        dropout_key: seed + 7,
                        mask_rows,
                    };
                    let x = rand_vec(t * i, seed + 2, 1.0);
                    let y0 = rand_vec(t * o, seed + 3, 1.0);
                    let (mut y, mut y_ref) = (y0.clone(), y0);
                    let xa = l.forward_isa(isa, &x, t, &mut y);
                    let xa_ref = l.forward_ref(&x, t, &mut y_ref);
                    let what = format!(
                        "{isa:?} t{t} in{i} out{o} r{r} p{p} rows {}",
                        mask_rows.is_some()
                    );
                    assert!(max_abs_diff(&xa, &xa_ref) < 1e-4, "xa {what}");
                    assert!(max_abs_diff(&y, &y_ref) < 1e-4, "y {what}");
                    let dy = rand_vec(t * o, seed + 4, 1.0);
                    let dx0 = rand_vec(t * i, seed + 5, 1.0);
                    let (mut dx, mut dx_ref) = (dx0.clone(), dx0);
                    let (da, db) = l.backward_isa(isa, &x, &xa, &dy, t, &mut dx);
                    let (da_ref, db_ref) = l.backward_ref(&x, &xa, &dy, t, &mut dx_ref);
                    assert!(max_abs_diff(&dx, &dx_ref) < 1e-4, "dx {what}");
                    assert!(max_abs_diff(&da, &da_ref) < 1e-3, "dA {what}");
                    assert!(max_abs_diff(&db, &db_ref) < 1e-3, "dB {what}");
                }
            }
        }
    }

    /// The backward without `dx` (`dA`, `dB`, `dxa`; the caller adds
    /// `dxa·A`), and `dA` from a given `dxa` alone ([`LoraRef::a_grad`]),
    /// give bit for bit the whole one's `dA`, `dB` and `dx`.
    #[test]
    fn split_backward_equals_the_whole_one_bit_for_bit() {
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for (n, &(t, i, o, r)) in [
            (512usize, 576usize, 192usize, 16usize),
            (37, 20, 50, 3),
            (300, 40, 120, 17),
        ]
        .iter()
        .enumerate()
        {
            let seed = 40 + 10 * n as u64;
            let (a, b) = (rand_vec(r * i, seed, 0.3), rand_vec(o * r, seed + 1, 0.3));
            let l = LoraRef {
                a: &a,
                b: &b,
                r,
                in_features: i,
                out_features: o,
                scale: 2.0,
                dropout: 0.0,
                dropout_key: 3,
                mask_rows: None,
            };
            let x = rand_vec(t * i, seed + 2, 1.0);
            let xa = rand_vec(t * r, seed + 3, 1.0);
            let dy = rand_vec(t * o, seed + 4, 1.0);
            let init = rand_vec(t * i, seed + 5, 1.0);
            let mut dx = init.clone();
            let (da, db) = l.backward(&x, &xa, &dy, t, &mut dx);
            let (da2, db2, dxa) = l.backward_impl(Isa::best(), &x, &xa, &dy, t, None);
            assert_eq!(bits(&da2), bits(&da), "dA t{t} i{i} o{o} r{r}");
            let da3 = l.a_grad(&x, &dxa, t);
            assert_eq!(bits(&da3), bits(&da), "dA from dxa t{t} i{i} o{o} r{r}");
            assert_eq!(bits(&db2), bits(&db), "dB t{t} i{i} o{o} r{r}");
            let mut dx2 = init;
            let p = l.input_grad_operand();
            skinny::nn(Isa::best(), t, i, r, &dxa, r, &p, &mut dx2, i, true);
            assert_eq!(bits(&dx2), bits(&dx), "dx t{t} i{i} o{o} r{r}");
        }
    }

    #[test]
    fn dropout_mask_is_deterministic_and_has_the_right_rate() {
        let n = 100_000;
        let zeros = (0..n).filter(|&i| dropout_factor(5, i, 0.1) == 0.0).count();
        assert!((zeros as f64 / n as f64 - 0.1).abs() < 0.005, "{zeros}");
        assert_eq!(dropout_factor(5, 123, 0.5), dropout_factor(5, 123, 0.5));
        let differ = (0..1000)
            .filter(|&i| dropout_factor(5, i, 0.5) != dropout_factor(6, i, 0.5))
            .count();
        assert!(differ > 300);
    }
}
