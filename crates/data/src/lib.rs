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

/// Refuse rows longer than the model's context (`max_position_embeddings`):
/// positions past it were never trained, and attention memory grows with the
/// square of the row length. The error names the row (1-based, the line of a
/// JSONL file without blank lines).
pub fn check_context_length(
    examples: &[Example],
    context: usize,
    name: &str,
) -> anyhow::Result<()> {
    if let Some((i, e)) = examples.iter().enumerate().find(|(_, e)| e.len() > context) {
        anyhow::bail!(
            "{name}: row {} has {} tokens, more than the model's context of {context} tokens \
             (max_position_embeddings); split or truncate it",
            i + 1,
            e.len()
        );
    }
    Ok(())
}

#[cfg(test)]
mod context_tests {
    use super::*;

    #[test]
    fn rows_longer_than_the_context_are_refused_by_row() {
        let rows = vec![Example::unmasked(vec![1; 4]), Example::unmasked(vec![1; 9])];
        check_context_length(&rows, 9, "d.jsonl").unwrap();
        let e = check_context_length(&rows, 8, "d.jsonl")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("d.jsonl: row 2 has 9 tokens") && e.contains("context of 8"),
            "{e}"
        );
    }
}
