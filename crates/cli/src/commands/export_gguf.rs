//! `qlora export-gguf --model <ref> [--adapter <dir>] --out model.gguf
//! --type f16|q8_0|q4_0|q4_k|q4_k_m|q5_k_m [--force] [--no-check]`: a llama.cpp GGUF file, with the adapter
//! merged in f32, then a read-back check: the written file loaded by our own GGUF loader
//! vs the source model running the adapter unmerged (max / mean |Δlogit|).
//!
//! The tensor-type rules and fallbacks are documented in `qlora_merge::gguf_export`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use qlora_formats::ModelRef;
use qlora_infer::check::{check_export, pseudo_random_ids};
use qlora_merge::prompts::text_sequences;
use qlora_merge::{export_gguf, ExportOptions, ExportReport, ExportType};
use qlora_tokenizer::Tokenizer;

#[derive(clap::Args)]
pub struct Args {
    /// Base model: HF folder (f32/f16/bf16, or bnb-4bit: dequantized), .gguf file, or hub id.
    #[arg(long)]
    pub model: String,
    /// PEFT LoRA adapter folder to merge (W + scaling·B·A in f32) before encoding.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Output .gguf file.
    #[arg(long)]
    pub out: PathBuf,
    /// Tensor type of the matrices (norms stay f32; q4_k_m / q5_k_m: llama.cpp's mixes with Q6_K
    /// for some attn_v / ffn_down layers and the output; see the crate docs for fallbacks).
    #[arg(long = "type", value_parser = ["f16", "q8_0", "q4_0", "q4_k", "q4_k_m", "q5_k_m"])]
    pub ty: String,
    /// general.name (default: the source's name, else its file / folder name).
    #[arg(long)]
    pub name: Option<String>,
    /// Replace an existing output file.
    #[arg(long)]
    pub force: bool,
    /// Skip the read-back check (it loads the source and then the export in f32).
    #[arg(long)]
    pub no_check: bool,
    /// Allow downloading a hub model that is not in the local cache.
    #[arg(long)]
    pub allow_network: bool,
}

/// Text the read-back check runs through both models (tokenized by the source's tokenizer).
const CHECK_TEXTS: [&str; 3] = [
    "The capital of France is Paris. The capital of Germany is Berlin, and the capital of Italy is Rome.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "Once upon a time, a small robot learned to paint the sky in colours nobody had seen before.",
];
const CHECK_LEN: usize = 24;

fn print_report(rep: &ExportReport, secs: f64) {
    let counts: Vec<String> = rep
        .type_counts()
        .iter()
        .map(|(t, n)| format!("{n} {t}"))
        .collect();
    println!(
        "wrote {} ({:.1} MiB, {} tensors: {}) in {secs:.2} s",
        rep.out.display(),
        rep.file_bytes as f64 / (1024.0 * 1024.0),
        rep.tensors.len(),
        counts.join(", ")
    );
    let mut reasons: Vec<(String, usize)> = Vec::new();
    for t in &rep.tensors {
        if let Some(w) = &t.fallback {
            let key = format!("{} ({w})", t.ggml_type);
            match reasons.iter_mut().find(|(k, _)| *k == key) {
                Some((_, n)) => *n += 1,
                None => reasons.push((key, 1)),
            }
        }
    }
    for (k, n) in reasons {
        println!("  fallback: {n} tensors as {k}");
    }
    if rep.merged_modules > 0 {
        println!(
            "  merged the adapter into {} modules (max |scaling·B·A| = {:.3e})",
            rep.merged_modules, rep.max_abs_delta
        );
    }
    println!(
        "  largest per-tensor relative RMS encoding error: {:.3e}; tokenizer {}",
        rep.max_rel_rms_error(),
        rep.tokenizer_source
    );
}

pub fn run(a: Args) -> Result<()> {
    let ty: ExportType = a.ty.parse()?;
    let r = ModelRef::resolve(&a.model, a.allow_network)?;
    let model = r.path().to_path_buf();
    let opts = ExportOptions {
        ty,
        force: a.force,
        name: a.name.clone(),
        skip_qk_permutation: false,
    };
    let t0 = Instant::now();
    let rep = export_gguf(&model, a.adapter.as_deref(), &a.out, &opts)
        .with_context(|| format!("exporting {} to {}", model.display(), a.out.display()))?;
    print_report(&rep, t0.elapsed().as_secs_f64());
    if a.no_check {
        return Ok(());
    }
    let t1 = Instant::now();
    let vocab = qlora_merge::SourceModel::from_ref(&r)?.config().vocab_size;
    let tok = Tokenizer::for_model(&r).ok();
    let seqs = text_sequences(tok.as_ref(), &CHECK_TEXTS, CHECK_LEN, vocab)
        .unwrap_or_else(|| pseudo_random_ids(vocab, 3, CHECK_LEN, 0));
    let check = check_export(&model, a.adapter.as_deref(), &a.out, &seqs)
        .with_context(|| format!("read-back check of {}", a.out.display()))?;
    println!(
        "read-back check (our GGUF loader vs the source{} in f32): {check} [{:.1} s]",
        if a.adapter.is_some() {
            " + adapter, unmerged"
        } else {
            ""
        },
        t1.elapsed().as_secs_f64()
    );
    if !check.max_abs_diff.is_finite() {
        bail!(
            "{}: the exported model produces non-finite logits",
            a.out.display()
        );
    }
    Ok(())
}
