//! `qlora generate --model <ref> [--adapter <dir>] --prompt "..." [--chat] [--max-new-tokens N]
//! [--temperature T] [--top-p P] [--seed S]`: KV-cached decoding (`qlora_infer`) with the
//! text streamed to stdout as it is produced; prefill and decode speeds go to stderr at the end.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use qlora_infer::{generate, prompt_ids, GenLimits, NeedTokenizer, Sampler};
use qlora_model::QuantMode;

#[derive(clap::Args)]
pub struct Args {
    /// Model: HF folder, bnb-4bit folder, .gguf file, or hub id `org/name` (from the HF cache).
    #[arg(long)]
    pub model: String,
    /// PEFT LoRA adapter folder.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// The prompt text.
    #[arg(long)]
    pub prompt: String,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// System message (with --chat).
    #[arg(long)]
    pub system: Option<String>,
    /// Maximum number of generated tokens.
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 means greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches P.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// How the base weights are held: native (a GGUF file's own blocks, as stored),
    /// none (f32), bf16, nf4, fp4 [default: native for a .gguf model, else nf4].
    #[arg(long)]
    pub quant: Option<QuantMode>,
    /// Where to compute: cpu or cuda[:N] [default: cpu]. cuda needs a qlora built with
    /// `--features cuda`, the NVIDIA driver and the CUDA 13 cuBLAS + NVRTC libraries on the
    /// loader path (LD_LIBRARY_PATH; the PyPI wheels' nvidia/cu13/lib works); see the README.
    #[arg(long, default_value = "cpu")]
    pub device: qlora_model::Device,
    /// Allow downloading a hub model that is not in the local cache.
    #[arg(long)]
    pub allow_network: bool,
    /// Print the timing summary as one JSON object on stderr.
    #[arg(long)]
    pub json_stats: bool,
    /// Keep generating past EOS / end-of-turn tokens until --max-new-tokens
    /// (for benchmarks: a fixed number of decode steps).
    #[arg(long)]
    pub ignore_eos: bool,
}

pub fn run(a: Args) -> Result<()> {
    let mut sampler = Sampler::new(a.temperature, a.top_p, a.seed)?;
    let t_load = Instant::now();
    let mut loaded = qlora_infer::load(&a.model, a.quant, a.allow_network, NeedTokenizer::Yes)?;
    loaded.model.to_device(a.device)?;
    let (model, r) = (&loaded.model, &loaded.model_ref);
    let tok = loaded
        .tokenizer
        .as_ref()
        .context("the model has no tokenizer")?;
    let adapter = match &a.adapter {
        Some(dir) => Some(
            qlora_lora::io::load_adapter(dir, Some(&model.config))
                .with_context(|| format!("loading adapter {}", dir.display()))?
                .1,
        ),
        None => None,
    };
    let load_secs = t_load.elapsed().as_secs_f64();
    let ids = prompt_ids(tok, &a.prompt, a.chat, a.system.as_deref())?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let (_, stats) = generate(
        model,
        tok,
        adapter.as_ref(),
        &ids,
        GenLimits {
            max_new_tokens: a.max_new_tokens,
            ignore_eos: a.ignore_eos,
        },
        &mut sampler,
        |piece| {
            out.write_all(piece.as_bytes())?;
            out.flush()?;
            Ok(())
        },
    )?;
    writeln!(out)?;
    drop(out);
    if a.json_stats {
        eprintln!(
            "{}",
            serde_json::json!({
                "model": r.path().display().to_string(),
                "load_seconds": load_secs,
                "prompt_tokens": stats.prompt_tokens,
                "prefill_seconds": stats.prefill_secs,
                "prefill_tokens_per_second": stats.prefill_tps(),
                "new_tokens": stats.new_tokens,
                "decode_seconds": stats.decode_secs,
                "decode_tokens_per_second": stats.decode_tps(),
                "stopped_by_eos": stats.stopped_by_eos,
            })
        );
    } else {
        eprintln!(
            "prefill: {} tokens in {:.3}s ({:.1} tok/s); decode: {} tokens in {:.3}s ({:.1} tok/s){}; load {:.2}s",
            stats.prompt_tokens,
            stats.prefill_secs,
            stats.prefill_tps(),
            stats.new_tokens,
            stats.decode_secs,
            stats.decode_tps(),
            if stats.stopped_by_eos { ", stopped at EOS" } else { "" },
            load_secs
        );
    }
    Ok(())
}
