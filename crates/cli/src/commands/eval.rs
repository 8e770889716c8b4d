//! `qlora eval --model <ref> [--adapter <dir>] --data <file> [--data-format F] [--train-on-inputs]
//! [--max-seq-len N] [--quant ...] [--batch-size N] [--json]`: mean shifted cross-entropy over
//! every unmasked target of a data file in any format `qlora train` reads (text, chat, alpaca,
//! prompt/completion, pre-tokenized), tokenized and masked by the same loader
//! (`qlora_data::formats`) and truncated to the same `--max-seq-len` as training, so the loss
//! equals train's evaluation of the same rows; as transformers computes it: sum over all
//! targets of the file / their count.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use qlora_data::formats::{DatasetOptions, Format, OnBadLine};
use qlora_data::rows::truncate;
use qlora_model::{Batch, LoadOptions, Model, QuantMode};
use qlora_tokenizer::{ModelRef, ModelSource};

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
    #[arg(long, default_value_t = 1024)]
    pub max_seq_len: usize,
    /// skip or error on a malformed record.
    #[arg(long, default_value = "error")]
    pub on_bad_line: String,
    /// How full-precision base weights are held: none (f32), bf16, nf4, fp4.
    #[arg(long, default_value = "nf4")]
    pub quant: QuantMode,
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

pub fn run(a: Args) -> Result<()> {
    if a.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    if a.max_seq_len < 2 {
        bail!("--max-seq-len must be at least 2");
    }
    let opts = LoadOptions { quant: a.quant };
    let r = ModelRef::resolve(&a.model, false)?;
    let mut model = match &r.source {
        ModelSource::Folder(dir) => Model::from_folder(dir, &opts)
            .with_context(|| format!("loading model {}", dir.display()))?,
        ModelSource::Gguf(path) => super::generate::load_gguf(path, &opts)?,
    };
    // The tokenizer only matters for text formats; pre-tokenized data needs none.
    let tok = r.tokenizer();
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
    let mut examples = super::train::load_examples(&a.data, &dopts, tok.as_ref().ok())
        .map_err(|e| match &tok {
            Err(te) if format!("{e:#}").contains("needs a tokenizer") => {
                e.context(format!("the model's tokenizer did not load: {te}"))
            }
            _ => e,
        })?
        .examples;
    truncate(&mut examples, a.max_seq_len);
    if examples.is_empty() {
        bail!("{}: no rows", a.data.display());
    }
    qlora_data::check_context_length(
        &examples,
        model.config.max_position_embeddings,
        &a.data.display().to_string(),
    )?;
    let start = std::time::Instant::now();
    let (mut sum, mut count, mut seen) = (0f64, 0usize, 0usize);
    for chunk in examples.chunks(a.batch_size) {
        let len = chunk.iter().map(|e| e.input_ids.len()).max().unwrap_or(0);
        if len == 0 {
            continue;
        }
        let mut batch = Batch::default();
        for e in chunk {
            let pad = len - e.input_ids.len();
            let mut ids = e.input_ids.clone();
            ids.extend(std::iter::repeat_n(0, pad));
            let mut lab = e.labels.clone();
            lab.extend(std::iter::repeat_n(-100, pad));
            batch.input_ids.push(ids);
            batch.labels.push(lab);
            seen += e.input_ids.len();
        }
        let (s, c) = model
            .loss(&batch, adapter.as_ref())
            .with_context(|| format!("evaluating {}", a.data.display()))?;
        sum += s;
        count += c;
    }
    if count == 0 {
        bail!(
            "{}: no unmasked target tokens (every label is -100 or rows have one token)",
            a.data.display()
        );
    }
    let loss = sum / count as f64;
    if !loss.is_finite() {
        bail!(
            "the loss is not finite ({loss}): the model{} holds inf/NaN weights",
            if adapter.is_some() {
                " or the adapter"
            } else {
                ""
            }
        );
    }
    let secs = start.elapsed().as_secs_f64();
    if a.json {
        let v = serde_json::json!({
            "loss": loss,
            "perplexity": loss.exp(),
            "tokens": count,
            "input_tokens": seen,
            "rows": examples.len(),
            "seconds": secs,
        });
        println!("{v}");
    } else {
        println!(
            "loss {loss:.6}  perplexity {:.4}  ({count} target tokens, {} rows, {secs:.2}s)",
            loss.exp(),
            examples.len()
        );
    }
    Ok(())
}
