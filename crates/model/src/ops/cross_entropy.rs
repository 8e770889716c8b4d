//! Causal-LM cross-entropy as transformers' `ForCausalLMLoss` computes it
//! (FORMATS §4.3): position `t` of a row predicts that row's label at `t+1`;
//! label −100 is ignored. Returns the SUM over counted targets and their
//! count, so a trainer can divide by the total over all micro-batches.

use rayon::prelude::*;

use super::fastmath;
use super::linear::FrozenLinear;

pub const IGNORE_INDEX: i64 = -100;

/// Target of flattened position `p` (row length `s`), if counted.
#[inline]
fn target(labels: &[i64], s: usize, p: usize) -> i64 {
    if (p + 1).is_multiple_of(s) {
        IGNORE_INDEX
    } else {
        labels[p + 1]
    }
}

/// Checks labels are `-100` or in `0..vocab`.
pub fn check_labels(labels: &[i64], vocab: usize) -> anyhow::Result<()> {
    for (i, &l) in labels.iter().enumerate() {
        anyhow::ensure!(
            l == IGNORE_INDEX || (l >= 0 && (l as usize) < vocab),
            "label {l} at flat position {i} is neither -100 nor a token id below the vocabulary size {vocab}"
        );
    }
    Ok(())
}

/// `(sum of −log softmax(logits[p])[target], count)`; `logits [b·s, V]`,
/// `labels [b·s]` (rows of length `s`). The sum is taken in position order
/// (bit-identical whatever the thread count).
pub fn forward(logits: &[f32], labels: &[i64], s: usize, vocab: usize) -> (f64, usize) {
    let per: Vec<Option<f64>> = logits
        .par_chunks(vocab)
        .enumerate()
        .map(|(p, row)| {
            let t = target(labels, s, p);
            (t != IGNORE_INDEX).then(|| lse(row) - row[t as usize] as f64)
        })
        .collect();
    sum_in_order(&per)
}

fn sum_in_order(per: &[Option<f64>]) -> (f64, usize) {
    per.iter()
        .flatten()
        .fold((0.0, 0), |(s, c), l| (s + l, c + 1))
}

/// `log Σ exp(row)` (f32 exponentials summed in a fixed order in f64).
fn lse(row: &[f32]) -> f64 {
    let mx = fastmath::max(row);
    let mut tmp = row.to_vec();
    mx as f64 + fastmath::exp_shift_sum(&mut tmp, mx).ln()
}

/// One counted row: the loss, and `row` overwritten with
/// `(softmax(row) − onehot(t)) · inv`.
fn row_forward_backward(row: &mut [f32], t: usize, inv: f32) -> f64 {
    let mx = fastmath::max(row);
    let target_logit = row[t];
    let z = fastmath::exp_shift_sum(row, mx);
    let loss = mx as f64 + z.ln() - target_logit as f64;
    fastmath::scale(row, (inv as f64 / z) as f32);
    row[t] -= inv;
    loss
}

/// Forward and backward in one pass: returns `(sum, count)` and overwrites
/// `logits` with `d(sum / denominator)/d logits`.
pub fn forward_backward_inplace(
    logits: &mut [f32],
    labels: &[i64],
    s: usize,
    vocab: usize,
    denominator: f32,
) -> (f64, usize) {
    let per = rows_forward_backward(logits, labels, s, vocab, 0, 1.0 / denominator);
    sum_in_order(&per)
}

/// [`forward_backward_inplace`] on the rows of flat positions `p0..`; per-row losses.
fn rows_forward_backward(
    logits: &mut [f32],
    labels: &[i64],
    s: usize,
    vocab: usize,
    p0: usize,
    inv: f32,
) -> Vec<Option<f64>> {
    logits
        .par_chunks_mut(vocab)
        .enumerate()
        .map(|(p, row)| {
            let t = target(labels, s, p0 + p);
            if t == IGNORE_INDEX {
                row.fill(0.0);
                return None;
            }
            Some(row_forward_backward(row, t as usize, inv))
        })
        .collect()
}

/// [`rows_forward_backward`] that also writes each row's gradient as bf16
/// into `a`, laid out as [`super::amx::pack_a`] would pack the whole chunk
/// (`kp` columns; the padding rows zero), while the row is in cache: the
/// AMX head's input gradient then reads it as it is, instead of a pack pass
/// reading the chunk's f32 gradient back from memory (SmolLM2: 25 MiB per
/// 128-position chunk). The same bits as packing afterwards.
#[allow(clippy::too_many_arguments)]
fn rows_forward_backward_packed(
    logits: &mut [f32],
    labels: &[i64],
    s: usize,
    vocab: usize,
    p0: usize,
    inv: f32,
    a: &mut super::amx::TileBuf,
    kp: usize,
) -> Vec<Option<f64>> {
    #[derive(Clone, Copy)]
    struct Dst(*mut u16);
    // SAFETY: each task writes the rows of A it owns (see below).
    unsafe impl Send for Dst {}
    unsafe impl Sync for Dst {}
    impl Dst {
        fn get(self) -> *mut u16 {
            self.0
        }
    }
    let rows = logits.len() / vocab.max(1);
    let mp = rows.div_ceil(32) * 32;
    a.resize(mp * kp);
    let dst = Dst(a.as_mut_ptr());
    for r in rows..mp {
        // SAFETY: `a` is [mp, kp] in pack_a's layout; padding row r is written here only.
        unsafe { super::amx::pack_a_row(&[], r, kp, dst.get()) };
    }
    logits
        .par_chunks_mut(vocab)
        .enumerate()
        .map(|(p, row)| {
            let t = target(labels, s, p0 + p);
            let loss = if t == IGNORE_INDEX {
                row.fill(0.0);
                None
            } else {
                Some(row_forward_backward(row, t as usize, inv))
            };
            // SAFETY: row p of the [mp, kp] layout, written by this task only.
            unsafe { super::amx::pack_a_row(row, p, kp, dst.get()) };
            loss
        })
        .collect()
}

/// At most this many f32 logits exist at once in [`head_forward_backward`].
const HEAD_CHUNK_LOGITS: usize = 1 << 23;

/// Positions per chunk of [`head_forward_backward`]: at most
/// [`HEAD_CHUNK_LOGITS`] logits, a multiple of 32 (whole AMX row blocks)
/// where that allows, and the chunks as even as that allows: SmolLM2's 512
/// positions go in 4 x 128, not 3 x 160 + 32 (a 32-row chunk reads the whole
/// head for a fifth of a big chunk's work; the head 96 -> 91 ms per step,
/// medians of 3).
/// The memory planner counts the maximum (`qlora-memory` `head_chunk_rows`).
fn head_chunk_rows(vocab: usize, t: usize) -> usize {
    let max = (HEAD_CHUNK_LOGITS / vocab.max(1)).clamp(1, t.max(1));
    if max < 32 {
        return max;
    }
    let max = max / 32 * 32;
    let even = t.div_ceil(t.div_ceil(max));
    (even.div_ceil(32) * 32).min(max)
}

/// The largest head [`head_forward_backward`] copies to bf16 once per call
/// (128 MiB, 4x the logits chunk's bytes).
const HEAD_BF16_COPY_MAX_BYTES: usize = 4 * 4 * HEAD_CHUNK_LOGITS;

/// The lm_head, the loss and their backward, a chunk of positions at a time:
/// never all `[b·s, vocab]` logits at once. `nf [b·s, hidden]` is the final
/// norm's output. Returns `(sum, count, d(sum / denominator)/d nf)`; chunks
/// without a counted target are skipped. The sum is taken in position order.
pub fn head_forward_backward(
    head: &FrozenLinear,
    nf: &[f32],
    labels: &[i64],
    s: usize,
    denominator: f32,
) -> (f64, usize, Vec<f32>) {
    super::keep_freed_memory();
    let (vocab, h) = (head.out_features, head.in_features);
    let t = labels.len();
    assert_eq!(nf.len(), t * h, "head: input size");
    let rows = head_chunk_rows(vocab, t);
    // bf16 compute: the weight rounded to bf16 and packed for both
    // directions once (kept from step to step: +4 bytes per weight element),
    // not per chunk and direction, when its bf16 is at most 4x the logits
    // chunk's bytes: SmolLM2's 49152 x 576 head (2 x 54 MiB), TinyLlama's
    // 32000 x 2048 (2 x 125 MiB), never the 250 MiB to 1 GiB of a 7B-8B
    // model's head.
    let packed = (vocab * h * 2 <= HEAD_BF16_COPY_MAX_BYTES)
        .then(|| head.packed_for_amx(t))
        .flatten();
    let mut dnf = vec![0f32; t * h];
    let mut per: Vec<Option<f64>> = vec![None; t];
    let mut logits: Vec<f32> = Vec::new();
    let inv = 1.0 / denominator;
    let mut r0 = 0;
    while r0 < t {
        let r1 = (r0 + rows).min(t);
        if (r0..r1).all(|p| target(labels, s, p) == IGNORE_INDEX) {
            r0 = r1;
            continue;
        }
        logits.resize((r1 - r0) * vocab, 0.0);
        let (x, dx) = (&nf[r0 * h..r1 * h], &mut dnf[r0 * h..r1 * h]);
        match &packed {
            Some(pw) => {
                pw.forward(x, r1 - r0, &mut logits);
                // the loss's gradient goes straight into the product's A
                pw.backward_packed(r1 - r0, dx, &mut |a, kp| {
                    let p =
                        rows_forward_backward_packed(&mut logits, labels, s, vocab, r0, inv, a, kp);
                    per[r0..r1].copy_from_slice(&p);
                });
            }
            None => {
                head.forward_into(x, r1 - r0, &mut logits);
                let p = rows_forward_backward(&mut logits, labels, s, vocab, r0, inv);
                per[r0..r1].copy_from_slice(&p);
                head.backward_input(&logits, r1 - r0, dx);
            }
        }
        r0 = r1;
    }
    let (sum, count) = sum_in_order(&per);
    (sum, count, dnf)
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    #[test]
    fn loss_sum_is_bit_identical_whatever_the_thread_count() {
        let (rows, v) = (257, 33);
        let logits = rand_vec(rows * v, 7, 4.0);
        let labels: Vec<i64> = (0..rows as i64).map(|i| (i * 7) % v as i64).collect();
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let f = forward(&logits, &labels, rows, v);
                let mut g = logits.clone();
                let fb = forward_backward_inplace(&mut g, &labels, rows, v, 100.0);
                (f.0.to_bits(), f.1, fb.0.to_bits(), fb.1)
            })
        };
        let one = run(1);
        for t in [2, 3, 8] {
            assert_eq!(run(t), one, "{t} threads");
        }
        // and the order is the plain row order
        let mut seq = 0f64;
        for p in 0..rows - 1 {
            let row = &logits[p * v..(p + 1) * v];
            seq += lse(row) - row[labels[p + 1] as usize] as f64;
        }
        assert_eq!(seq.to_bits(), one.0);
    }

    #[test]
    fn cross_entropy_matches_candle_and_finite_differences() {
        use candle_core::{Device, Tensor};
        let (b, s, v) = (2, 5, 11);
        let logits = rand_vec(b * s * v, 1, 3.0);
        let labels: Vec<i64> = vec![3, -100, 4, 10, 0, 1, 2, -100, -100, 7];
        let (sum, count) = forward(&logits, &labels, s, v);
        // targets: row0 positions 0..3 -> labels[1..5] = -100,4,10,0 (3 counted);
        // row1 -> 2,-100,-100,7 (2 counted)
        assert_eq!(count, 5);
        // candle reference: log_softmax then gather.
        let t = Tensor::from_slice(&logits, (b * s, v), &Device::Cpu).unwrap();
        let ls = candle_core::Tensor::log_sum_exp(&t, 1).unwrap();
        let ls: Vec<f32> = ls.to_vec1().unwrap();
        let mut want = 0.0f64;
        for p in 0..b * s {
            let tg = if (p + 1).is_multiple_of(s) {
                -100
            } else {
                labels[p + 1]
            };
            if tg >= 0 {
                want += (ls[p] - logits[p * v + tg as usize]) as f64;
            }
        }
        assert!((sum - want).abs() < 1e-4);
        let mut g = logits.clone();
        let (s2, c2) = forward_backward_inplace(&mut g, &labels, s, v, 4.0);
        assert_eq!((s2, c2), (sum, count));
        let dir = rand_vec(logits.len(), 2, 1.0);
        let fd = directional_fd(&logits, &dir, 1e-4, |x| {
            let mut tot = 0.0;
            for p in 0..b * s {
                let tg = if (p + 1).is_multiple_of(s) {
                    -100
                } else {
                    labels[p + 1]
                };
                if tg >= 0 {
                    let row = &x[p * v..(p + 1) * v];
                    let mx = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = row.iter().map(|r| (r - mx).exp()).sum();
                    tot += mx + z.ln() - row[tg as usize];
                }
            }
            tot / 4.0
        });
        assert!((fd - dot(&g, &dir)).abs() < 1e-5);
        assert!(check_labels(&labels, v).is_ok());
        assert!(check_labels(&[11], v).is_err());
    }

    /// The loss's gradient written straight into the AMX A layout equals
    /// the f32 gradient packed afterwards, bit for bit, with the same
    /// losses: ignored rows, rows not a multiple of 32, a vocabulary that is
    /// not a multiple of 32 (padding columns), one row.
    #[test]
    fn gradient_written_packed_equals_packing_it_afterwards() {
        use super::super::amx::{pack_a, TileBuf};
        for (n, &(rows, vocab)) in [(45usize, 1000usize), (128, 4096), (1, 33), (64, 32)]
            .iter()
            .enumerate()
        {
            let seed = 500 + n as u64;
            let logits = rand_vec(rows * vocab, seed, 4.0);
            let labels: Vec<i64> = (0..rows + 1)
                .map(|p| {
                    if p % 7 == 3 {
                        IGNORE_INDEX
                    } else {
                        ((p * 31 + 5) % vocab) as i64
                    }
                })
                .collect();
            let kp = vocab.div_ceil(32) * 32;
            let (p0, s) = (0, rows + 1); // one sequence: position p's target is labels[p + 1]
            let mut want_l = logits.clone();
            let want = rows_forward_backward(&mut want_l, &labels, s, vocab, p0, 0.25);
            let mut want_a = TileBuf::new();
            pack_a(&want_l, rows, vocab, vocab, 0, kp, &mut want_a);
            let mut got_l = logits.clone();
            let mut got_a = TileBuf::new();
            let got = rows_forward_backward_packed(
                &mut got_l, &labels, s, vocab, p0, 0.25, &mut got_a, kp,
            );
            assert_eq!(got, want, "losses, {rows} x {vocab}");
            assert_eq!(&got_a[..], &want_a[..], "packed gradient, {rows} x {vocab}");
            assert!(got.iter().flatten().count() > 0);
        }
    }
}
