//! From examples to model rows: optional packing of several short examples
//! into one row (positions restart and attention stays inside each example),
//! truncation, and the deterministic epoch order used by the trainer.

use rand::{RngCore, SeedableRng};

use crate::{Example, IGNORE_INDEX};

/// One row of a batch: one example, or several packed back to back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub parts: Vec<Example>,
}

impl Row {
    pub fn single(e: Example) -> Self {
        Row { parts: vec![e] }
    }

    pub fn len(&self) -> usize {
        self.parts.iter().map(Example::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Flattened `(input_ids, labels, position_ids, segment_ids)`. The first
    /// label of every part is masked so no example predicts its neighbour's
    /// first token (HF's `DataCollatorWithFlattening` does the same).
    pub fn flatten(&self) -> (Vec<u32>, Vec<i64>, Vec<u32>, Vec<u32>) {
        let n = self.len();
        let (mut ids, mut labels, mut pos, mut seg) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for (s, p) in self.parts.iter().enumerate() {
            ids.extend_from_slice(&p.input_ids);
            labels.extend_from_slice(&p.labels);
            let start = labels.len() - p.len();
            if let Some(first) = labels.get_mut(start) {
                *first = IGNORE_INDEX;
            }
            pos.extend(0..p.len() as u32);
            seg.extend(std::iter::repeat_n(s as u32, p.len()));
        }
        (ids, labels, pos, seg)
    }

    /// Loss targets after the one-token shift.
    pub fn num_targets(&self) -> usize {
        self.parts.iter().map(Example::num_targets).sum()
    }
}

/// Truncate every example to `max_len` tokens (labels alike); drops none.
pub fn truncate(examples: &mut [Example], max_len: usize) -> usize {
    let mut n = 0;
    for e in examples.iter_mut() {
        if e.input_ids.len() > max_len {
            e.input_ids.truncate(max_len);
            e.labels.truncate(max_len);
            n += 1;
        }
    }
    n
}

/// Greedy first-fit packing in input order into rows of at most `max_len` tokens.
/// Examples longer than `max_len` must have been truncated first.
pub fn pack(examples: Vec<Example>, max_len: usize) -> Vec<Row> {
    let mut rows: Vec<Row> = Vec::new();
    let mut cur = Row { parts: Vec::new() };
    for e in examples {
        if !cur.parts.is_empty() && cur.len() + e.len() > max_len {
            rows.push(std::mem::replace(&mut cur, Row { parts: Vec::new() }));
        }
        cur.parts.push(e);
    }
    if !cur.parts.is_empty() {
        rows.push(cur);
    }
    rows
}

/// The order rows are visited in during `epoch`: identity without shuffling,
/// else a permutation that depends only on `(seed, epoch)` (so a resumed run
/// can rebuild it from the two numbers).
pub fn epoch_order(n: usize, seed: u64, epoch: u64, shuffle: bool) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    if shuffle {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(
            seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        shuffle_like_rand_0_8(&mut v, &mut rng);
    }
    v
}

/// Fisher–Yates exactly as rand 0.8's `SliceRandom::shuffle` (indices drawn by its
/// widening-multiply rejection sampler). Written out so that a `(seed, epoch)` gives
/// the same data order whatever rand version the workspace uses (rand 0.9 shuffles
/// differently): a checkpoint resumes onto the order it was trained with.
fn shuffle_like_rand_0_8(v: &mut [usize], rng: &mut impl RngCore) {
    for i in (1..v.len()).rev() {
        v.swap(i, index_below(rng, i + 1));
    }
}

/// A uniform index in `0..n`, as rand 0.8's `gen_range(0..n as u32)` (n ≤ u32::MAX) or
/// `gen_range(0..n)` (u64) draws it.
fn index_below(rng: &mut impl RngCore, n: usize) -> usize {
    if n <= u32::MAX as usize {
        let range = n as u32;
        let zone = (range << range.leading_zeros()).wrapping_sub(1);
        loop {
            let m = rng.next_u32() as u64 * range as u64;
            if (m as u32) <= zone {
                return (m >> 32) as usize;
            }
        }
    } else {
        let range = n as u64;
        let zone = (range << range.leading_zeros()).wrapping_sub(1);
        loop {
            let m = rng.next_u64() as u128 * range as u128;
            if (m as u64) <= zone {
                return (m >> 64) as usize;
            }
        }
    }
}

/// Split off a held-out fraction (`frac` in (0,1)), chosen by `seed`; at least
/// one example goes to each side when there are two or more.
pub fn split_eval<T>(items: Vec<T>, frac: f64, seed: u64) -> (Vec<T>, Vec<T>) {
    let n = items.len();
    if n < 2 || frac <= 0.0 {
        return (items, Vec::new());
    }
    let k = ((n as f64 * frac).round() as usize).clamp(1, n - 1);
    let order = epoch_order(n, seed ^ 0xE7A1, u64::MAX, true);
    let mut is_eval = vec![false; n];
    for &i in &order[..k] {
        is_eval[i] = true;
    }
    let (mut train, mut eval) = (Vec::new(), Vec::new());
    for (i, it) in items.into_iter().enumerate() {
        if is_eval[i] {
            eval.push(it)
        } else {
            train.push(it)
        }
    }
    (train, eval)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_restarts_positions_and_masks_boundaries() {
        let ex = vec![
            Example::unmasked(vec![1, 2, 3]),
            Example {
                input_ids: vec![4, 5],
                labels: vec![-100, 5],
            },
            Example::unmasked(vec![6, 7, 8, 9]),
        ];
        let rows = pack(ex, 6);
        assert_eq!(rows.len(), 2);
        let (ids, labels, pos, seg) = rows[0].flatten();
        assert_eq!(ids, [1, 2, 3, 4, 5]);
        assert_eq!(labels, [-100, 2, 3, -100, 5]);
        assert_eq!(pos, [0, 1, 2, 0, 1]);
        assert_eq!(seg, [0, 0, 0, 1, 1]);
        assert_eq!(rows[0].num_targets(), 3);
        assert_eq!(rows[1].flatten().0, [6, 7, 8, 9]);
    }

    #[test]
    fn truncation_and_orders() {
        let mut ex = vec![
            Example::unmasked(vec![1, 2, 3, 4]),
            Example::unmasked(vec![1]),
        ];
        assert_eq!(truncate(&mut ex, 3), 1);
        assert_eq!(ex[0].labels, [1, 2, 3]);
        assert_eq!(epoch_order(5, 1, 0, false), [0, 1, 2, 3, 4]);
        let a = epoch_order(50, 1, 0, true);
        assert_eq!(a, epoch_order(50, 1, 0, true));
        assert_ne!(a, epoch_order(50, 1, 1, true));
        assert_ne!(a, epoch_order(50, 2, 0, true));
        let mut s = a.clone();
        s.sort();
        assert_eq!(s, (0..50).collect::<Vec<_>>());
        let (t, e) = split_eval((0..100).collect(), 0.1, 3);
        assert_eq!((t.len(), e.len()), (90, 10));
        let (t2, e2) = split_eval((0..100).collect::<Vec<i32>>(), 0.1, 3);
        assert_eq!((t, e), (t2, e2));
        let (t, e) = split_eval(vec![1, 2], 0.01, 0);
        assert_eq!((t.len(), e.len()), (1, 1));
    }

    /// The data order of a seed is part of a checkpoint's contract: these are the orders
    /// rand 0.8's shuffle gave (before the workspace moved to rand 0.9), pinned.
    #[test]
    fn epoch_order_is_pinned_to_the_rand_0_8_orders() {
        assert_eq!(
            epoch_order(50, 1, 0, true),
            [
                41, 23, 15, 2, 4, 13, 24, 43, 45, 7, 42, 16, 18, 17, 14, 40, 25, 22, 49, 5, 0, 20,
                32, 11, 8, 31, 38, 46, 26, 36, 35, 44, 9, 33, 3, 30, 21, 1, 34, 6, 29, 48, 39, 12,
                37, 10, 28, 47, 19, 27
            ]
        );
        assert_eq!(
            epoch_order(1000, 7, 3, true)[..30],
            [
                74, 522, 191, 935, 576, 31, 948, 681, 84, 170, 365, 653, 753, 805, 951, 107, 414,
                412, 163, 679, 70, 475, 977, 292, 46, 721, 996, 150, 758, 851
            ]
        );
    }
}
