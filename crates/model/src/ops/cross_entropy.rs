//! Causal-LM cross-entropy as transformers' `ForCausalLMLoss` computes it
//! (FORMATS §4.3): position `t` of a row predicts that row's label at `t+1`;
//! label −100 is ignored. Returns the SUM over counted targets and their
//! count, so a trainer can divide by the total over all micro-batches.

use rayon::prelude::*;

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
/// `labels [b·s]` (rows of length `s`).
pub fn forward(logits: &[f32], labels: &[i64], s: usize, vocab: usize) -> (f64, usize) {
    let per_row = logits
        .par_chunks(vocab)
        .enumerate()
        .map(|(p, row)| {
            let t = target(labels, s, p);
            if t == IGNORE_INDEX {
                return (0.0, 0);
            }
            (lse(row) - row[t as usize] as f64, 1)
        })
        .collect::<Vec<_>>();
    ordered_sum(&per_row)
}

/// Sum of per-row `(loss, count)` in row order: a rayon `reduce` would add
/// in an order that depends on thread scheduling, and the reported loss
/// would differ in the last bit between identical runs.
fn ordered_sum(per_row: &[(f64, usize)]) -> (f64, usize) {
    per_row.iter().fold((0.0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
}

fn lse(row: &[f32]) -> f64 {
    let mx = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let s: f64 = row.iter().map(|v| (*v as f64 - mx).exp()).sum();
    mx + s.ln()
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
    let inv = 1.0 / denominator as f64;
    let per_row = logits
        .par_chunks_mut(vocab)
        .enumerate()
        .map(|(p, row)| {
            let t = target(labels, s, p);
            if t == IGNORE_INDEX {
                row.fill(0.0);
                return (0.0, 0);
            }
            let l = lse(row);
            let loss = l - row[t as usize] as f64;
            for v in row.iter_mut() {
                *v = ((*v as f64 - l).exp() * inv) as f32;
            }
            row[t as usize] -= inv as f32;
            (loss, 1)
        })
        .collect::<Vec<_>>();
    ordered_sum(&per_row)
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
}
