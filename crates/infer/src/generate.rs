//! Text generation: the sampler, the KV-cached decode loop with streamed text and its
//! tokens-per-second statistics.
//!
//! The prompt is fed in one prefill step, then one token per step. Greedy when the
//! temperature is 0; otherwise temperature + nucleus (top-p) sampling from a seeded RNG,
//! so a run is reproducible. Generation stops at an EOS / end-of-turn token or after
//! `max_new_tokens`; text is handed out as it is produced (never half a UTF-8 character).

use std::time::Instant;

use anyhow::{bail, Result};
use qlora_model::{Adapter, Model};
use qlora_tokenizer::{ChatMessage, StreamDecoder, Tokenizer};
use rand::{Rng, SeedableRng};

/// When generation stops.
#[derive(Debug, Clone, Copy)]
pub struct GenLimits {
    pub max_new_tokens: usize,
    /// Do not stop at EOS / end-of-turn tokens.
    pub ignore_eos: bool,
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
        let r = self.rng.random::<f64>() * mass;
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

/// Greedy continuations (up to `max_new_tokens`, stopping at EOS) of each prompt, decoded
/// without special tokens, trimmed, newlines as spaces: `qlora train`'s before/after samples.
pub fn greedy_samples(
    model: &Model,
    tok: &Tokenizer,
    adapter: Option<&Adapter>,
    prompts: &[Vec<u32>],
    max_new_tokens: usize,
) -> Result<Vec<String>> {
    prompts
        .iter()
        .map(|p| {
            let mut s = Sampler::new(0.0, 1.0, 0)?;
            let limits = GenLimits {
                max_new_tokens,
                ignore_eos: false,
            };
            let (ids, _) = generate(model, tok, adapter, p, limits, &mut s, |_| Ok(()))?;
            Ok(tok.decode(&ids, true)?.trim().replace('\n', " "))
        })
        .collect()
}

/// The `samples.md` report: each prompt with its generation before and after training.
pub fn samples_markdown(
    tok: &Tokenizer,
    prompts: &[Vec<u32>],
    before: &[String],
    after: &[String],
    max_new_tokens: usize,
) -> String {
    let mut md =
        format!("# Sample generations on held-out prompts (greedy, {max_new_tokens} tokens)\n\n");
    for ((p, b), a) in prompts.iter().zip(before).zip(after) {
        let prompt = tok.decode(p, false).unwrap_or_default();
        md += &format!("## Prompt\n```\n{prompt}\n```\n**before:** {b}\n\n**after:** {a}\n\n");
    }
    md
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
