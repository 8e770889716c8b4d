//! The lm_head, the loss and the loss's input gradient in one pass over the
//! vocabulary, for a head packed for AMX ([`PackedWeight`]).
//!
//! The chunked path ([`super::head_forward_backward`]'s other branch) takes
//! 128 positions at a time, so every chunk streams the whole head from
//! memory twice (SmolLM2: 2 x 54 MiB per chunk, ~430 MB a step) and keeps a
//! chunk of f32 logits (25 MiB) plus its bf16 gradient. Here each thread
//! takes a slice of the counted positions and walks the vocabulary in
//! blocks of [`vocab_block`] columns, everything of a block in its L2: the
//! logits of the block, a softmax with a running maximum and sum per
//! position (flash-attention's online softmax), and the input gradient's
//! product with the block's probabilities, `dx += exp(L − m)·W_block`, the
//! accumulated rows rescaled when a position's running maximum moves. After
//! the last block `dx = dx·inv/z − inv·W[target]`. The head is read once per
//! slice and no logits chunk exists.
//!
//! The loss is `m + ln z − L[target]` with `z` summed block by block in f64:
//! equal to the chunked path's within f32 rounding. The gradient rounds
//! `exp(L − m)` to bf16 (the chunked path rounds `(softmax − onehot)·inv`),
//! and subtracts the target's row in f32: the same bf16 precision class.
//! Ignored positions are never computed (their gradient is zero). Every
//! position's numbers depend on its own row only (the vocabulary blocks and
//! their order are fixed), so they are bit-identical whatever the thread
//! count and however the positions are sliced.

use rayon::prelude::*;

use super::super::amx::{put_a_row, round_up, to_bf16_padded, PackedWeight, TileBuf, WeightBf16};
use super::super::fastmath;
use super::{target, IGNORE_INDEX};

/// Vocabulary columns per block for hidden size `h`. At SmolLM2's 576, 256:
/// a slice of 256 positions keeps its inputs (288 KiB bf16), the block's
/// logits (256 KiB), their bf16 probabilities (128 KiB), both directions'
/// weight blocks (2 x 288 KiB) and its gradient accumulator (576 KiB) in a
/// 2 MiB L2 (256, 512 and 1024 measured alike there). Above h = 1024 the
/// accumulator leaves L2 and every block loads and stores it from L3, so the
/// blocks get 4x wider: TinyLlama's head (h 2048) 100-103 ms a step at 256,
/// 92-95 at 512, 86-92 at 1024, 85-88 at 2048 (the planner mirrors this).
pub(crate) fn vocab_block(h: usize) -> usize {
    if h > 1024 {
        1024
    } else {
        256
    }
}

/// Positions per slice at most: a longer slice's inputs and gradient
/// accumulator leave L2 and every vocabulary block streams them from L3,
/// which costs more than reading the head once more per extra slice. At
/// 4096 positions (2 threads): SmolLM2's head 515 ms a pass with one slice
/// per thread, 395 / 407 / 393 ms at 256 / 512 / 1024 positions a slice;
/// TinyLlama's 1209 ms, 747 / 820 / 989. At 512 positions (256 a thread)
/// it does not bind. The planner mirrors it.
pub(crate) const MAX_SLICE_ROWS: usize = 256;

/// The head's weight as the pass reads it.
pub(crate) enum HeadWeight<'a> {
    /// Packed once in both layouts and kept from step to step.
    Kept(&'a PackedWeight),
    /// `[vocab, h]` read through its source: each slice packs a vocabulary
    /// block at a time into a buffer of its own (both layouts, in L2 while
    /// the block's products use them), so no copy of the whole head exists
    /// (a bf16 checkpoint's head, a 7B-8B model's): every slice reads the
    /// head once, as it reads the kept copy. The same products and bits as
    /// [`HeadWeight::Kept`] of that weight.
    PerBlock {
        w: &'a WeightBf16<'a>,
        vocab: usize,
        h: usize,
    },
}

impl HeadWeight<'_> {
    fn dims(&self) -> (usize, usize) {
        match self {
            HeadWeight::Kept(pw) => pw.dims(),
            HeadWeight::PerBlock { vocab, h, .. } => (*vocab, *h),
        }
    }

    /// Row `n` (its bf16 values, as f32) into `out`.
    fn row_into(&self, n: usize, out: &mut [f32]) {
        match self {
            HeadWeight::Kept(pw) => pw.row_into(n, out),
            HeadWeight::PerBlock { w, h, .. } => {
                let mut bits = vec![0u16; *h];
                w.elems(n * h, &mut bits);
                for (o, b) in out.iter_mut().zip(&bits) {
                    *o = f32::from_bits((*b as u32) << 16);
                }
            }
        }
    }
}

/// What one pass returns: per flat position its loss (None where ignored)
/// and, with the backward, `d(sum / denominator)/d x` (`[t, h]`, zero rows
/// where ignored).
pub(crate) struct HeadPass {
    pub per: Vec<Option<f64>>,
    pub dx: Option<Vec<f32>>,
}

/// The pass over `x` (`[t, h]`, the final norm's output) with labels in rows
/// of `s`; the input gradient of `sum / denominator` (`inv` = 1 /
/// denominator) when `inv` is given.
pub(crate) fn head_pass(
    pw: &HeadWeight,
    x: &[f32],
    labels: &[i64],
    s: usize,
    inv: Option<f32>,
) -> HeadPass {
    let (_, h) = pw.dims();
    let t = labels.len();
    assert_eq!(x.len(), t * h, "head: input size");
    let counted: Vec<(usize, usize)> = (0..t)
        .filter_map(|p| {
            let tg = target(labels, s, p);
            (tg != IGNORE_INDEX).then_some((p, tg as usize))
        })
        .collect();
    let mut per = vec![None; t];
    let mut dx = inv.map(|_| vec![0f32; t * h]);
    if counted.is_empty() {
        return HeadPass { per, dx };
    }
    // one slice per thread, whole 32-row blocks (each slice reads the head
    // once), at most MAX_SLICE_ROWS positions
    let threads = if super::super::may_parallelize() {
        rayon::current_num_threads().max(1)
    } else {
        1
    };
    let rows = round_up(counted.len().div_ceil(threads), 32).min(MAX_SLICE_ROWS);
    let slices: Vec<(Vec<f64>, Vec<f32>)> = counted
        .par_chunks(rows)
        .map(|slice| super::super::in_task(|| slice_pass(pw, x, slice, inv)))
        .collect();
    for (slice, (losses, g)) in counted.chunks(rows).zip(slices) {
        for (r, &(p, _)) in slice.iter().enumerate() {
            per[p] = Some(losses[r]);
            if let Some(dx) = &mut dx {
                dx[p * h..(p + 1) * h].copy_from_slice(&g[r * h..(r + 1) * h]);
            }
        }
    }
    HeadPass { per, dx }
}

/// One slice of counted positions `(flat position, target)`: their losses
/// and (with `inv`) their input gradients, `[len, h]`.
fn slice_pass(
    pw: &HeadWeight,
    x: &[f32],
    slice: &[(usize, usize)],
    inv: Option<f32>,
) -> (Vec<f64>, Vec<f32>) {
    let (vocab, h) = pw.dims();
    let m = slice.len();
    let vb = vocab_block(h);
    let (mp, kp) = (round_up(m, 32), round_up(h, 32));
    let mut bf = vec![0u16; kp.max(vb)];
    // the slice's inputs as bf16 A (padding rows zero)
    let mut a = TileBuf::new();
    a.resize(mp * kp);
    for r in 0..mp {
        let row = slice
            .get(r)
            .map_or(&[][..], |&(p, _)| &x[p * h..(p + 1) * h]);
        put_row(&mut a, r, kp, row, &mut bf);
    }
    // the block's probabilities as bf16 A; padding rows zero, written once
    let mut pa = TileBuf::new();
    if inv.is_some() {
        pa.resize(mp * vb);
        for r in m..mp {
            put_row(&mut pa, r, vb, &[], &mut bf);
        }
    }
    let mut logits = vec![0f32; m * vb];
    let mut acc = vec![0f32; if inv.is_some() { m * h } else { 0 }];
    let mut run_max = vec![f32::NEG_INFINITY; m];
    let mut z = vec![0f64; m];
    let mut target_logit = vec![0f32; m];
    let mut local = PackedWeight::empty();
    for v0 in (0..vocab).step_by(vb) {
        let w = vb.min(vocab - v0);
        // the block's weight: the kept copy's rows v0.., or this block packed
        let (blk, c0) = match pw {
            HeadWeight::Kept(p) => (*p, v0),
            HeadWeight::PerBlock { w: src, .. } => {
                local.pack_rows(*src, v0, w, h);
                (&local, 0)
            }
        };
        blk.forward_block(&a, mp, m, c0, w, &mut logits, vb);
        for (r, &(_, tg)) in slice.iter().enumerate() {
            let row = &mut logits[r * vb..r * vb + w];
            if (v0..v0 + w).contains(&tg) {
                target_logit[r] = row[tg - v0];
            }
            let block_max = fastmath::max(row);
            if block_max > run_max[r] {
                // what was summed so far was relative to the old maximum
                if z[r] > 0.0 {
                    let k = (run_max[r] as f64 - block_max as f64).exp();
                    z[r] *= k;
                    if inv.is_some() {
                        fastmath::scale(&mut acc[r * h..(r + 1) * h], k as f32);
                    }
                }
                run_max[r] = block_max;
            }
            z[r] += fastmath::exp_shift_sum(row, run_max[r]);
            if inv.is_some() {
                put_row(&mut pa, r, vb, row, &mut bf);
            }
        }
        if inv.is_some() {
            blk.backward_block(&pa, vb, mp, m, c0, w.div_ceil(32), &mut acc);
        }
    }
    let losses: Vec<f64> = (0..m)
        .map(|r| run_max[r] as f64 + z[r].ln() - target_logit[r] as f64)
        .collect();
    if let Some(inv) = inv {
        let mut wt = vec![0f32; h];
        for (r, &(_, tg)) in slice.iter().enumerate() {
            pw.row_into(tg, &mut wt);
            let k = (inv as f64 / z[r]) as f32;
            for (g, w) in acc[r * h..(r + 1) * h].iter_mut().zip(&wt) {
                *g = *g * k - inv * w;
            }
        }
    }
    (losses, acc)
}

/// Row `r` of a [`super::super::amx::pack_a`] layout with `kp` columns:
/// `row` as bf16, zeros after it (`buf` at least `kp` long, scratch).
fn put_row(a: &mut [u16], r: usize, kp: usize, row: &[f32], buf: &mut [u16]) {
    to_bf16_padded(row, &mut buf[..kp]);
    put_a_row(a, r, kp, buf);
}

#[cfg(test)]
mod tests {
    use super::super::super::amx::{available, bf16_bits};
    use super::super::super::testutil::*;
    use super::*;

    /// `(losses per position, dx)` in f64 from the bf16-rounded operands:
    /// `lse(L) − L[target]` and `inv·(Σ softmax·W − W[target])`.
    fn reference(
        wv: &[f32],
        (vocab, h): (usize, usize),
        x: &[f32],
        labels: &[i64],
        s: usize,
        inv: f64,
    ) -> (Vec<Option<f64>>, Vec<f64>) {
        let r = |v: f32| f32::from_bits((bf16_bits(v) as u32) << 16) as f64;
        let t = labels.len();
        let mut per = vec![None; t];
        let mut dx = vec![0f64; t * h];
        for p in 0..t {
            let tg = target(labels, s, p);
            if tg == IGNORE_INDEX {
                continue;
            }
            let xr: Vec<f64> = x[p * h..(p + 1) * h].iter().map(|&v| r(v)).collect();
            let l: Vec<f64> = (0..vocab)
                .map(|v| (0..h).map(|k| xr[k] * wv[v * h + k] as f64).sum())
                .collect();
            let mx = l.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = l.iter().map(|v| (v - mx).exp()).sum();
            per[p] = Some(mx + z.ln() - l[tg as usize]);
            for v in 0..vocab {
                let g = ((l[v] - mx).exp() / z - if v == tg as usize { 1.0 } else { 0.0 }) * inv;
                for k in 0..h {
                    dx[p * h + k] += g * wv[v * h + k] as f64;
                }
            }
        }
        (per, dx)
    }

    /// Losses and input gradients against the f64 reference on vocabularies
    /// with partial blocks and panels, hidden sizes off the 32 grid, slices
    /// with padding rows, ignored positions (a whole sequence of them), and
    /// logits spread wide enough that running maxima move late; the same
    /// bits whatever the thread count, and the forward-only pass's losses
    /// equal to the full pass's; the head packed block by block
    /// ([`HeadWeight::PerBlock`]) gives the kept copy's bits.
    #[test]
    fn one_pass_head_matches_the_f64_reference() {
        if !available() {
            eprintln!(
                "SKIPPED: AMX-BF16 is not available on this CPU; the one-pass head was not run"
            );
            return;
        }
        for (n, &(vocab, h, t, s, xscale)) in [
            (1000usize, 96usize, 45usize, 9usize, 1.0f32),
            (4096, 64, 128, 64, 4.0),
            (33, 40, 7, 7, 1.0),
            (600, 576, 300, 150, 0.5),
            (257, 32, 70, 35, 8.0),
            // wide hidden size: 1024-column blocks, a partial last one
            (2500, 1100, 40, 20, 0.5),
            // more positions than MAX_SLICE_ROWS per thread: several slices each
            (300, 64, 1100, 550, 2.0),
        ]
        .iter()
        .enumerate()
        {
            let seed = 900 + 10 * n as u64;
            // bf16 weights, so the reference sees what the packed copy holds
            let wv: Vec<f32> = rand_vec(vocab * h, seed, 1.0)
                .iter()
                .map(|&v| f32::from_bits((bf16_bits(v) as u32) << 16))
                .collect();
            let wsrc = |start: usize, out: &mut [u16]| {
                for (d, v) in out.iter_mut().zip(&wv[start..]) {
                    *d = bf16_bits(*v);
                }
            };
            let pw = PackedWeight::new(vocab, h, &wsrc);
            let x = rand_vec(t * h, seed + 1, xscale);
            let labels: Vec<i64> = (0..t)
                .map(|p| {
                    // every 5th position ignored, and the whole second sequence
                    if p % 5 == 2 || (p >= s && p < 2 * s) {
                        IGNORE_INDEX
                    } else {
                        ((p * 37 + 11) % vocab) as i64
                    }
                })
                .collect();
            let inv = 1.0 / 7.0f32;
            let shape = format!("vocab {vocab} h {h} t {t} s {s}");
            let run = |threads: usize, inv: Option<f32>| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap()
                    .install(|| head_pass(&HeadWeight::Kept(&pw), &x, &labels, s, inv))
            };
            let got = run(2, Some(inv));
            let (want_per, want_dx) = reference(&wv, (vocab, h), &x, &labels, s, inv as f64);
            let dx = got.dx.as_ref().unwrap();
            for p in 0..t {
                match (got.per[p], want_per[p]) {
                    (None, None) => {
                        assert!(dx[p * h..(p + 1) * h].iter().all(|&g| g == 0.0), "{shape}")
                    }
                    (Some(a), Some(b)) => {
                        assert!(
                            (a - b).abs() < 2e-5 * (1.0 + b.abs()),
                            "{shape} loss {p}: {a} vs {b}"
                        )
                    }
                    (a, b) => panic!("{shape} position {p}: counted {a:?} vs {b:?}"),
                }
            }
            assert!(want_per.iter().flatten().count() > 0);
            let num: f64 = dx
                .iter()
                .zip(&want_dx)
                .map(|(a, b)| (*a as f64 - b).powi(2))
                .sum();
            let den: f64 = want_dx.iter().map(|b| b * b).sum();
            let rel = (num / den).sqrt();
            assert!(rel < 1e-3, "{shape}: dx relative error {rel}");
            let bits = |p: &HeadPass| {
                (
                    p.per
                        .iter()
                        .map(|l| l.map(f64::to_bits))
                        .collect::<Vec<_>>(),
                    p.dx.as_ref()
                        .map(|d| d.iter().map(|v| v.to_bits()).collect::<Vec<_>>()),
                )
            };
            for threads in [1, 3, 8] {
                assert_eq!(
                    bits(&run(threads, Some(inv))),
                    bits(&got),
                    "{shape}, {threads} threads"
                );
            }
            let fwd = run(2, None);
            assert!(fwd.dx.is_none());
            assert_eq!(bits(&fwd).0, bits(&got).0, "{shape}: forward-only losses");
            // no kept copy: each slice packs its vocabulary blocks itself,
            // the same products, so the same bits
            let per_block = HeadWeight::PerBlock { w: &wsrc, vocab, h };
            for threads in [1, 2, 3] {
                let pb = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap()
                    .install(|| head_pass(&per_block, &x, &labels, s, Some(inv)));
                assert_eq!(
                    bits(&pb),
                    bits(&got),
                    "{shape}, per block, {threads} threads"
                );
            }
            let pb = head_pass(&per_block, &x, &labels, s, None);
            assert_eq!(
                bits(&pb).0,
                bits(&got).0,
                "{shape}: per block, forward only"
            );
        }
    }
}
