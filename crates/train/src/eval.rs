//! Evaluation: token-weighted mean loss and perplexity over rows, as
//! transformers computes it (sum over every target / count).

use anyhow::{ensure, Result};
use qlora_data::rows::Row;
use qlora_lora::Adapter;
use qlora_model::Model;

use crate::batch::{batch_targets, collate_binned, Binning};

/// Token-weighted mean loss of `rows` in batches, and its perplexity.
pub fn evaluate_rows(
    model: &Model,
    adapter: Option<&Adapter>,
    rows: &[Row],
    batch_size: usize,
    pad_id: u32,
) -> Result<Option<(f64, f64)>> {
    Ok(eval_stats(model, adapter, rows, batch_size, pad_id)?.map(|e| (e.loss, e.perplexity)))
}

/// The result of [`eval_stats`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalStats {
    /// Mean shifted cross-entropy over every unmasked target (sum over all targets / count,
    /// as transformers computes it).
    pub loss: f64,
    pub perplexity: f64,
    /// Unmasked targets after the one-token shift.
    pub target_tokens: usize,
}

/// [`evaluate_rows`] with the target count; `None` when no row has an unmasked target.
/// Rows are right-padded (labels [`qlora_data::IGNORE_INDEX`]) to the longest of the batch,
/// shorter ones placed together ([`collate_binned`]).
pub fn eval_stats(
    model: &Model,
    adapter: Option<&Adapter>,
    rows: &[Row],
    batch_size: usize,
    pad_id: u32,
) -> Result<Option<EvalStats>> {
    let (mut sum, mut count) = (0f64, 0usize);
    let longest = rows.iter().map(Row::len).max().unwrap_or(0);
    let binning = Binning::for_model(&model.config, longest);
    for chunk in rows.chunks(batch_size.max(1)) {
        let refs: Vec<&Row> = chunk.iter().collect();
        let b = collate_binned(&refs, pad_id, binning).batch;
        if batch_targets(&b) == 0 {
            continue;
        }
        let (s, c) = model.loss(&b, adapter)?;
        sum += s;
        count += c;
    }
    if count == 0 {
        return Ok(None);
    }
    let loss = sum / count as f64;
    ensure!(
        loss.is_finite(),
        "the evaluation loss is not finite ({loss}): the model or adapter holds inf/NaN weights"
    );
    Ok(Some(EvalStats {
        loss,
        perplexity: loss.exp(),
        target_tokens: count,
    }))
}
