//! Training and evaluation data for `qlora`.
//!
//! * [`pretokenized`]: rows that already hold token ids (`input_ids`, optional
//!   `labels`), used by `qlora eval` and the acceptance checks of `qlora train`.
//! * [`Example`] is the unit every other module produces: token ids plus labels
//!   where `-100` masks a position out of the loss (HF's convention).

pub mod chatterbot;
pub mod formats;
pub mod pretokenized;
pub mod rows;

/// Label value that excludes a position from the loss (HF / PyTorch `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// One tokenized training example. `labels[t]` is the target *at* position `t`
/// in HF's convention (the model shifts: logits at `t` predict `labels[t+1]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i64>,
}

impl Example {
    /// An example whose labels equal its input ids (loss on every token).
    pub fn unmasked(input_ids: Vec<u32>) -> Self {
        let labels = input_ids.iter().map(|&t| t as i64).collect();
        Example { input_ids, labels }
    }

    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// Number of loss targets after HF's shift: positions `t >= 1` whose label is not `-100`.
    pub fn num_targets(&self) -> usize {
        self.labels
            .iter()
            .skip(1)
            .filter(|&&l| l != IGNORE_INDEX)
            .count()
    }
}
