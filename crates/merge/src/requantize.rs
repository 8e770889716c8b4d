//! `qlora merge --requantize`: merge into a full-precision staging folder, quantize that
//! to a bitsandbytes 4-bit folder, and measure what the requantization costs in logits.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use qlora_formats::convert::{self, QuantizeOptions};
use qlora_model::{LoadOptions, Model};
use qlora_quant::{DType, QuantType};

use crate::{merge_model, MergeOptions, MergeReport};
use qlora_infer::check::{self, CheckReport};

/// Fixed prompts for the logit comparison (tokenized when the base has a tokenizer).
pub const CHECK_PROMPTS: [&str; 4] = [
    "The capital of France is Paris. The capital of Germany is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Q: What is the boiling point of water at sea level?\nA: It boils at",
    "Once upon a time, in a small village by the sea, there lived an old",
];

/// What [`merge_requantized`] did.
#[derive(Debug, Clone)]
pub struct RequantizeReport {
    /// The full-precision (f32) merge into the staging folder (removed afterwards).
    pub merge: MergeReport,
    pub merge_secs: f64,
    pub quant_type: QuantType,
    /// Weights quantized to 4 bits.
    pub converted: usize,
    /// Relative RMS error of the 4-bit weights vs the merged ones.
    pub rel_rms: f64,
    pub out: PathBuf,
    pub check: RequantizationError,
}

/// Logits on a few prompts against the reference: the unmerged full-precision base + adapter.
#[derive(Debug, Clone)]
pub struct RequantizationError {
    /// The 4-bit merged model (the output).
    pub requantized: CheckReport,
    /// The merged model before requantizing.
    pub merged: CheckReport,
    /// For scale, the model as trained: the 4-bit base + adapter, unmerged (when the base
    /// loads under `trained_quant`).
    pub as_trained: Option<CheckReport>,
}

/// Merge `adapter` into `model` and write the merged model as a bitsandbytes 4-bit folder
/// of `quant_type` at `out` (same block size and double quant as `opts.quant`); then compare
/// logits (see [`RequantizationError`]).
pub fn merge_requantized(
    model: &Path,
    adapter: &Path,
    out: &Path,
    opts: &MergeOptions,
    quant_type: QuantType,
) -> Result<RequantizeReport> {
    if !opts.force
        && out.exists()
        && out
            .read_dir()
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        bail!(
            "{}: output exists and is not empty (use --force to replace it)",
            out.display()
        );
    }
    let staging = out.with_file_name(format!(
        ".{}.merge-staging-{}",
        out.file_name()
            .map(|s| s.to_string_lossy())
            .unwrap_or_default(),
        std::process::id()
    ));
    let staged = MergeOptions {
        dtype: Some(DType::F32),
        force: true,
        ..opts.clone()
    };
    let result = (|| -> Result<RequantizeReport> {
        let t0 = Instant::now();
        let merge = merge_model(model, adapter, &staging, &staged)?;
        let merge_secs = t0.elapsed().as_secs_f64();
        let qopts = QuantizeOptions {
            quant: qlora_quant::QuantOptions {
                quant_type,
                ..opts.quant
            },
            compute_dtype: "bfloat16".into(),
            max_shard_size: opts.max_shard_size,
            force: opts.force,
        };
        let q = convert::quantize_model(&staging, out, &qopts)?;
        let check = requantization_error(model, adapter, out, &staging, opts.quant.quant_type)?;
        Ok(RequantizeReport {
            merge,
            merge_secs,
            quant_type,
            converted: q.converted,
            rel_rms: q.error.rel_rms(),
            out: out.to_path_buf(),
            check,
        })
    })();
    let _ = std::fs::remove_dir_all(&staging);
    result.with_context(|| format!("merging {} into {}", adapter.display(), model.display()))
}

/// See [`RequantizationError`]; `trained_quant` is the 4-bit type the adapter was trained on.
fn requantization_error(
    model: &Path,
    adapter: &Path,
    requantized: &Path,
    merged_f32: &Path,
    trained_quant: QuantType,
) -> Result<RequantizationError> {
    let base = check::load_f32(model)?;
    let vocab = base.config.vocab_size;
    let tok = qlora_tokenizer::Tokenizer::from_folder(model).ok();
    let seqs = crate::prompts::text_sequences(tok.as_ref(), &CHECK_PROMPTS, usize::MAX, vocab)
        .unwrap_or_else(|| check::pseudo_random_ids(vocab, 4, 32, 0));
    let (_, ad) = qlora_lora::load_adapter(adapter, Some(&base.config))?;
    let reference = check::logits(&base, Some(&ad), &seqs)?;
    drop(base);
    let cmp = |m: &Model, a: Option<&qlora_lora::Adapter>| -> Result<CheckReport> {
        let got = check::logits(m, a, &seqs)?;
        Ok(check::compare(&reference, &got, vocab, seqs.len()))
    };
    let r = cmp(&check::load_f32(requantized)?, None)?;
    let m = cmp(&check::load_f32(merged_f32)?, None)?;
    let quant = LoadOptions {
        quant: trained_quant.to_string().parse()?,
    };
    let as_trained = match Model::from_folder(model, &quant) {
        Ok(trained) => Some(cmp(&trained, Some(&ad))?),
        Err(_) => None,
    };
    Ok(RequantizationError {
        requantized: r,
        merged: m,
        as_trained,
    })
}
