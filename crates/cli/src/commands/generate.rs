//! `qlora generate --model <ref> [--adapter <dir>] --prompt "..." [--chat] [--max-new-tokens N]
//! [--temperature T] [--top-p P] [--seed S]`: KV-cached decoding with streamed output.
//!
//! The prompt is fed in one prefill step, then one token per step. Greedy when the
//! temperature is 0; otherwise temperature + nucleus (top-p) sampling from a seeded RNG,
//! so a run is reproducible. Generation stops at an EOS / end-of-turn token or after
//! `--max-new-tokens`. Text goes to stdout as it is produced (never half a UTF-8
//! character); prefill and decode speeds go to stderr at the end.
//!
//! STATUS: written against qlora-model's `forward_step`/`WeightSource` API but NOT yet
//! compiled or wired (the shared build machine did not get through the CLI build before
//! the deadline). To wire it: `pub mod generate;` in commands/mod.rs, a
//! `Generate(commands::generate::Args)` variant + match arm in main.rs, and
//! `qlora-gguf`, `qlora-tokenizer`, `rand`, `safetensors` in crates/cli/Cargo.toml;
//! then move crates/cli/tests-pending/demo_e2e.rs to crates/cli/tests/.
//!
//! [`load_model`] is the shared way to turn a model reference (folder, .gguf file or
//! hub id) into a [`Model`] and its [`Tokenizer`]; other commands can use it too.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use qlora_config::ModelConfig;
use qlora_gguf::llama::GgufModel;
use qlora_model::{Adapter, LoadOptions, Model, QuantMode, WeightSource};
use qlora_tokenizer::{ChatMessage, ModelRef, ModelSource, StreamDecoder, Tokenizer};
use rand::{Rng, SeedableRng};

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
    /// How full-precision base weights are held: none (f32), bf16, nf4, fp4.
    #[arg(long, default_value = "nf4")]
    pub quant: QuantMode,
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

/// When generation stops.
#[derive(Debug, Clone, Copy)]
pub struct GenLimits {
    pub max_new_tokens: usize,
    /// Do not stop at EOS / end-of-turn tokens.
    pub ignore_eos: bool,
}

/// A GGUF llama model as a [`WeightSource`] (HF names and layout, decoded on demand).
struct GgufSource {
    model: GgufModel,
    names: Vec<String>,
}

impl WeightSource for GgufSource {
    fn names(&self) -> Vec<String> {
        self.names.clone()
    }
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        let gguf_name = self.model.gguf_name(name)?;
        self.model
            .file()
            .tensor_info(gguf_name)
            .ok()
            .map(|t| t.shape())
    }
    fn f32(&self, name: &str) -> Result<Vec<f32>> {
        Ok(self.model.get(name)?.1)
    }
    fn origin(&self, _name: &str) -> String {
        self.model.file().path().display().to_string()
    }
}

/// Load a model reference: the model (weights held as `quant` says) and its tokenizer.
pub fn load_model(
    spec: &str,
    quant: QuantMode,
    allow_network: bool,
) -> Result<(Model, Tokenizer, ModelRef)> {
    let r = ModelRef::resolve(spec, allow_network)?;
    let opts = LoadOptions { quant };
    let (model, tok) = match &r.source {
        ModelSource::Folder(dir) => {
            let m = Model::from_folder(dir, &opts)
                .with_context(|| format!("loading model {}", dir.display()))?;
            let t = Tokenizer::from_folder(dir)?;
            (m, t)
        }
        ModelSource::Gguf(path) => {
            let t = Tokenizer::from_gguf(path)?;
            let m = load_gguf(path, &opts)?;
            (m, t)
        }
    };
    let mut tok = tok;
    tok.add_stop_ids(&model.config.eos_token_ids);
    Ok((model, tok, r))
}

/// A llama-family GGUF file as a [`Model`] (dequantized to f32, then held as `opts.quant`).
pub fn load_gguf(path: &Path, opts: &LoadOptions) -> Result<Model> {
    let g = GgufModel::open(path)?;
    let config: ModelConfig = g.config().clone();
    let names = g.hf_names().map(str::to_string).collect();
    let src = GgufSource { model: g, names };
    Model::from_source(config, &src, opts).with_context(|| format!("loading {}", path.display()))
}

/// Next-token choice: greedy, or temperature + top-p sampling.
pub struct Sampler {
    temperature: f32,
    top_p: f32,
    rng: rand::rngs::StdRng,
}

impl Sampler {
    pub fn new(temperature: f32, top_p: f32, seed: u64) -> Result<Self> {
        if temperature.is_nan() || temperature < 0.0 || temperature.is_infinite() {
            bail!("--temperature must be a finite number >= 0, got {temperature}");
        }
        if top_p.is_nan() || top_p <= 0.0 || top_p > 1.0 {
            bail!("--top-p must be in (0, 1], got {top_p}");
        }
        Ok(Sampler {
            temperature,
            top_p,
            rng: rand::rngs::StdRng::seed_from_u64(seed),
        })
    }

    /// Pick a token id from last-position logits.
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32> {
        if logits.is_empty() {
            bail!("empty logits");
        }
        if logits.iter().any(|x| x.is_nan()) {
            bail!("the model produced NaN logits");
        }
        if self.temperature == 0.0 {
            return Ok(argmax(logits));
        }
        let probs = softmax(logits, self.temperature);
        let mut order: Vec<usize> = (0..probs.len()).collect();
        order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
        let mut kept = 0;
        let mut mass = 0f64;
        for &i in &order {
            mass += probs[i];
            kept += 1;
            if mass >= self.top_p as f64 {
                break;
            }
        }
        let r = self.rng.gen::<f64>() * mass;
        let mut acc = 0f64;
        for &i in &order[..kept] {
            acc += probs[i];
            if r < acc {
                return Ok(i as u32);
            }
        }
        Ok(order[kept - 1] as u32)
    }
}

/// Index of the largest value (the first one on ties).
pub fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in x.iter().enumerate() {
        if *v > x[best] {
            best = i;
        }
    }
    best as u32
}

/// softmax(x / t) in f64.
fn softmax(x: &[f32], t: f32) -> Vec<f64> {
    let t = t as f64;
    let m = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let e: Vec<f64> = x.iter().map(|&v| ((v as f64 - m) / t).exp()).collect();
    let s: f64 = e.iter().sum();
    e.into_iter().map(|v| v / s).collect()
}

/// Timing of one generation.
#[derive(Debug, Clone, Default)]
pub struct GenStats {
    pub prompt_tokens: usize,
    pub prefill_secs: f64,
    pub new_tokens: usize,
    /// Time of the decode steps (every generated token after the first).
    pub decode_secs: f64,
    pub stopped_by_eos: bool,
}

impl GenStats {
    pub fn prefill_tps(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_secs.max(1e-9)
    }
    pub fn decode_tps(&self) -> f64 {
        self.new_tokens.saturating_sub(1) as f64 / self.decode_secs.max(1e-9)
    }
}

/// Generate from `prompt_ids`, calling `on_text` with each completed piece of text.
/// Returns the generated ids (without the stop token) and timings.
pub fn generate(
    model: &Model,
    tok: &Tokenizer,
    adapter: Option<&Adapter>,
    prompt_ids: &[u32],
    limits: GenLimits,
    sampler: &mut Sampler,
    mut on_text: impl FnMut(&str) -> Result<()>,
) -> Result<(Vec<u32>, GenStats)> {
    if prompt_ids.is_empty() {
        bail!("the prompt encodes to no tokens");
    }
    let vocab = model.config.vocab_size;
    if let Some(&bad) = prompt_ids.iter().find(|&&i| i as usize >= vocab) {
        bail!("prompt token id {bad} is outside the model's vocabulary ({vocab})");
    }
    let max_new_tokens = limits.max_new_tokens;
    let stops = if limits.ignore_eos {
        Vec::new()
    } else {
        tok.stop_ids()
    };
    let mut stats = GenStats {
        prompt_tokens: prompt_ids.len(),
        ..Default::default()
    };
    let mut cache = model.new_cache();
    let mut out = Vec::new();
    let mut stream = StreamDecoder::new();
    if max_new_tokens == 0 {
        return Ok((out, stats));
    }
    let t0 = Instant::now();
    let mut logits = model.forward_step(&mut cache, prompt_ids, adapter)?;
    stats.prefill_secs = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    loop {
        let next = sampler.sample(&logits)?;
        if stops.contains(&next) {
            stats.stopped_by_eos = true;
            break;
        }
        out.push(next);
        stats.new_tokens += 1;
        if let Some(piece) = stream.push(tok, next)? {
            on_text(&piece)?;
        }
        if out.len() >= max_new_tokens {
            break;
        }
        logits = model.forward_step(&mut cache, &[next], adapter)?;
    }
    stats.decode_secs = t1.elapsed().as_secs_f64();
    if let Some(rest) = stream.finish(tok)? {
        on_text(&rest)?;
    }
    Ok((out, stats))
}

/// The prompt as token ids: chat-templated (special tokens come from the template) or plain
/// (the tokenizer's own special-token rules, e.g. a BOS for Llama).
pub fn prompt_ids(
    tok: &Tokenizer,
    prompt: &str,
    chat: bool,
    system: Option<&str>,
) -> Result<Vec<u32>> {
    if chat {
        let mut msgs = Vec::new();
        if let Some(s) = system {
            msgs.push(ChatMessage::system(s));
        }
        msgs.push(ChatMessage::user(prompt));
        let text = tok.apply_chat_template(&msgs, true)?;
        Ok(tok.encode(&text, false)?)
    } else {
        if system.is_some() {
            bail!("--system needs --chat");
        }
        Ok(tok.encode(prompt, true)?)
    }
}

pub fn run(a: Args) -> Result<()> {
    let mut sampler = Sampler::new(a.temperature, a.top_p, a.seed)?;
    let t_load = Instant::now();
    let (mut model, tok, r) = load_model(&a.model, a.quant, a.allow_network)?;
    model.to_device(a.device)?;
    let adapter = match &a.adapter {
        Some(dir) => Some(
            qlora_lora::io::load_adapter(dir, Some(&model.config))
                .with_context(|| format!("loading adapter {}", dir.display()))?
                .1,
        ),
        None => None,
    };
    let load_secs = t_load.elapsed().as_secs_f64();
    let ids = prompt_ids(&tok, &a.prompt, a.chat, a.system.as_deref())?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let (_, stats) = generate(
        &model,
        &tok,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_argmax_with_first_tie() {
        let mut s = Sampler::new(0.0, 1.0, 0).unwrap();
        assert_eq!(s.sample(&[0.1, 3.0, -1.0, 3.0]).unwrap(), 1);
        assert!(s.sample(&[0.0, f32::NAN]).is_err());
    }

    #[test]
    fn top_p_restricts_to_the_nucleus_and_seed_reproduces() {
        // probs ~ [0.64, 0.24, 0.09, 0.03]: top_p 0.7 keeps the first two only.
        let logits = [3.0f32, 2.0, 1.0, 0.0];
        let mut s = Sampler::new(1.0, 0.7, 7).unwrap();
        let draws: Vec<u32> = (0..400).map(|_| s.sample(&logits).unwrap()).collect();
        assert!(draws.iter().all(|&d| d < 2));
        let ones = draws.iter().filter(|&&d| d == 1).count() as f64 / 400.0;
        // Renormalized: 0.245 / (0.644 + 0.237) ≈ 0.27.
        assert!((ones - 0.27).abs() < 0.07, "{ones}");
        let mut a = Sampler::new(0.8, 0.95, 123).unwrap();
        let mut b = Sampler::new(0.8, 0.95, 123).unwrap();
        for _ in 0..50 {
            assert_eq!(a.sample(&logits).unwrap(), b.sample(&logits).unwrap());
        }
        // Full distribution at top_p 1: all four appear.
        let mut s = Sampler::new(1.0, 1.0, 1).unwrap();
        let mut seen = [false; 4];
        for _ in 0..2000 {
            seen[s.sample(&logits).unwrap() as usize] = true;
        }
        assert_eq!(seen, [true; 4]);
    }

    #[test]
    fn bad_sampling_options_are_errors() {
        assert!(Sampler::new(-1.0, 1.0, 0).is_err());
        assert!(Sampler::new(1.0, 0.0, 0).is_err());
        assert!(Sampler::new(1.0, 1.5, 0).is_err());
    }
}
