//! `qlora eval --model <ref> [--adapter <dir>] --data <file> [--data-format F] [--train-on-inputs]
//! [--max-seq-len N] [--quant ...] [--batch-size N] [--json]`: mean shifted cross-entropy over
//! every unmasked target of a data file in any format `qlora train` reads (text, chat, alpaca,
//! prompt/completion, pre-tokenized), tokenized and masked by the same loader
//! (`qlora_data::formats`) and truncated to the same `--max-seq-len` as training, so the loss
//! equals train's evaluation of the same rows; as transformers computes it: sum over all
//! targets of the file / their count.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use qlora_data::formats::{DatasetOptions, Format, OnBadLine, TextTokenizer};
use qlora_data::rows::{truncate, Row};
use qlora_infer::NeedTokenizer;
use qlora_model::QuantMode;

#[derive(clap::Args)]
pub struct Args {
    /// Model: an HF folder (safetensors, or a pre-quantized bnb-4bit folder), a .gguf file,
    /// or a hub id already in the local Hugging Face cache.
    #[arg(long)]
    pub model: String,
    /// PEFT LoRA adapter folder.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Data file (JSONL or a JSON array) in any format `qlora train` reads.
    #[arg(long)]
    pub data: PathBuf,
    /// auto, pretokenized, alpaca, chat, prompt-completion, text (as `qlora train`).
    #[arg(long, default_value = "auto")]
    pub data_format: String,
    /// Count the prompt / user tokens too (as `qlora train --train-on-inputs`).
    #[arg(long)]
    pub train_on_inputs: bool,
    /// Rows longer than this are truncated (as `qlora train`, default 1024).
    #[arg(long, default_value_t = qlora_train::DEFAULT_MAX_SEQ_LEN)]
    pub max_seq_len: usize,
    /// skip or error on a malformed record.
    #[arg(long, default_value = "error")]
    pub on_bad_line: String,
    /// How the base weights are held: native (a GGUF file's own blocks, as stored),
    /// none (f32), bf16, nf4, fp4 [default: native for a .gguf model, else nf4].
    #[arg(long)]
    pub quant: Option<QuantMode>,
    /// Where to compute: cpu or cuda[:N] [default: cpu]. cuda needs a qlora built with
    /// `--features cuda`, the NVIDIA driver and the CUDA 13 cuBLAS + NVRTC libraries on the
    /// loader path (LD_LIBRARY_PATH; the PyPI wheels' nvidia/cu13/lib works); see the README.
    #[arg(long, default_value = "cpu")]
    pub device: qlora_model::Device,
    /// Rows per forward pass (rows are right-padded to the longest of the batch).
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Padding id of the right-padded batches (masked out of the loss).
const PAD_ID: u32 = 0;

pub fn run(a: Args) -> Result<()> {
    if a.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    if a.max_seq_len < 2 {
        bail!("--max-seq-len must be at least 2");
    }
    let loaded = qlora_infer::load(&a.model, a.quant, false, NeedTokenizer::No)?;
    let (mut model, r) = (loaded.model, loaded.model_ref);
    // The tokenizer only matters for text formats; pre-tokenized data needs none.
    let tok = qlora_tokenizer::Tokenizer::for_model(&r);
    let dopts = DatasetOptions {
        format: a.data_format.parse::<Format>()?,
        train_on_inputs: a.train_on_inputs,
        on_bad_line: a.on_bad_line.parse::<OnBadLine>()?,
        // as train checks them: ids against the model, a target left after truncation
        vocab_size: Some(model.config.vocab_size),
        max_len: Some(a.max_seq_len),
    };
    model.to_device(a.device)?;
    let adapter = match &a.adapter {
        Some(dir) => Some(qlora_lora::load_adapter(dir, Some(&model.config))?.1),
        None => None,
    };
    let text_tok = tok.as_ref().ok().map(|t| t as &dyn TextTokenizer);
    let loaded = qlora_data::formats::load(&a.data, &dopts, text_tok).map_err(|e| match &tok {
        Err(te) if format!("{e:#}").contains("needs a tokenizer") => {
            e.context(format!("the model's tokenizer did not load: {te}"))
        }
        _ => e,
    })?;
    for s in &loaded.skipped {
        eprintln!("skipped {s}");
    }
    let mut examples = loaded.examples;
    truncate(&mut examples, a.max_seq_len);
    if examples.is_empty() {
        bail!("{}: no rows", a.data.display());
    }
    qlora_data::check_context_length(
        &examples,
        model.config.max_position_embeddings,
        &a.data.display().to_string(),
    )?;
    let n_rows = examples.len();
    let seen: usize = examples.iter().map(|e| e.input_ids.len()).sum();
    let rows: Vec<Row> = examples.into_iter().map(Row::single).collect();
    let start = std::time::Instant::now();
    let Some(stats) =
        qlora_train::eval_stats(&model, adapter.as_ref(), &rows, a.batch_size, PAD_ID)
            .with_context(|| format!("evaluating {}", a.data.display()))?
    else {
        bail!(
            "{}: no unmasked target tokens (every label is {} or rows have one token)",
            a.data.display(),
            qlora_data::IGNORE_INDEX
        );
    };
    let (loss, count) = (stats.loss, stats.target_tokens);
    let secs = start.elapsed().as_secs_f64();
    if a.json {
        let v = serde_json::json!({
            "loss": loss,
            "perplexity": loss.exp(),
            "tokens": count,
            "input_tokens": seen,
            "rows": n_rows,
            "seconds": secs,
        });
        println!("{v}");
    } else {
        println!(
            "loss {loss:.6}  perplexity {:.4}  ({count} target tokens, {} rows, {secs:.2}s)",
            loss.exp(),
            n_rows
        );
    }
    Ok(())
}
