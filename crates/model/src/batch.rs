//! What the model takes and gives: a [`Batch`] of token rows (labels, packed
//! position/segment ids) and the [`Logits`] of a forward.

use anyhow::{bail, ensure, Result};

/// A batch of equal-length rows (pad shorter examples; pad labels −100).
///
/// Padding must be on the right, or the pad tokens must get their own segment
/// id, so that real tokens never attend to them.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    pub input_ids: Vec<Vec<u32>>,
    /// Same shape as `input_ids`; −100 = not a target. Position `t` predicts `labels[t+1]`.
    pub labels: Vec<Vec<i64>>,
    /// Default `0..len` per row; packed rows restart at each example.
    pub position_ids: Option<Vec<Vec<u32>>>,
    /// Packed sequences: attention stays within equal ids (contiguous runs).
    pub segment_ids: Option<Vec<Vec<u32>>>,
}

impl Batch {
    /// Rows with `labels = input_ids` (every next token counts).
    pub fn from_ids(input_ids: Vec<Vec<u32>>) -> Self {
        let labels = input_ids
            .iter()
            .map(|r| r.iter().map(|&t| t as i64).collect())
            .collect();
        Batch {
            input_ids,
            labels,
            position_ids: None,
            segment_ids: None,
        }
    }

    /// `(rows, row length)` after checking shapes and ids.
    pub fn dims(&self, vocab: usize) -> Result<(usize, usize)> {
        let b = self.input_ids.len();
        ensure!(b > 0, "empty batch");
        let s = self.input_ids[0].len();
        ensure!(s > 0, "batch rows are empty");
        ensure!(
            self.labels.len() == b,
            "batch has {b} rows of input_ids but {} of labels",
            self.labels.len()
        );
        for (i, (ids, lab)) in self.input_ids.iter().zip(&self.labels).enumerate() {
            ensure!(
                ids.len() == s && lab.len() == s,
                "batch row {i}: {} ids and {} labels; every row must have {s} (pad them)",
                ids.len(),
                lab.len()
            );
            if let Some(&bad) = ids.iter().find(|&&t| t as usize >= vocab) {
                bail!("batch row {i}: token id {bad} is outside the vocabulary (size {vocab})");
            }
        }
        for (name, opt) in [
            ("position_ids", &self.position_ids),
            ("segment_ids", &self.segment_ids),
        ] {
            if let Some(rows) = opt {
                ensure!(
                    rows.len() == b && rows.iter().all(|r| r.len() == s),
                    "batch {name} must be {b} rows of {s}"
                );
            }
        }
        // attention takes a segment's keys as one run (it skips the keys
        // before a query's run): an id may not come back after another one
        if let Some(rows) = &self.segment_ids {
            for (i, r) in rows.iter().enumerate() {
                let mut seen = std::collections::HashSet::new();
                for (p, w) in r.windows(2).enumerate() {
                    if w[0] != w[1] {
                        seen.insert(w[0]);
                        ensure!(
                            !seen.contains(&w[1]),
                            "batch row {i}: segment id {} comes back at position {} after other ids; \
                             a segment must be one contiguous run of positions",
                            w[1],
                            p + 1
                        );
                    }
                }
            }
        }
        Ok((b, s))
    }

    pub(crate) fn flat_labels(&self) -> Vec<i64> {
        self.labels.iter().flatten().copied().collect()
    }
}

/// Logits of a batch: `[batch, seq, vocab]` f32, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Logits {
    pub data: Vec<f32>,
    pub batch: usize,
    pub seq: usize,
    pub vocab: usize,
}

impl Logits {
    /// `[batch, seq, vocab]`.
    pub fn dims(&self) -> [usize; 3] {
        [self.batch, self.seq, self.vocab]
    }
    /// The `vocab` logits of sequence `b`, position `s`.
    pub fn at(&self, b: usize, s: usize) -> &[f32] {
        let o = (b * self.seq + s) * self.vocab;
        &self.data[o..o + self.vocab]
    }
    pub fn into_vec(self) -> Vec<f32> {
        self.data
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_segment_must_be_one_contiguous_run() {
        let mut b = Batch::from_ids(vec![vec![1, 2, 3, 4, 5]]);
        b.segment_ids = Some(vec![vec![0, 0, 1, 1, 2]]);
        assert_eq!(b.dims(10).unwrap(), (1, 5));
        b.segment_ids = Some(vec![vec![0, 1, 0, 0, 2]]);
        let e = b.dims(10).unwrap_err().to_string();
        assert!(e.contains("segment id 0 comes back at position 2"), "{e}");
    }
}
