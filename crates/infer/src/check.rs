//! Logit checks of a written model against its source: [`check_export`], the read-back
//! check of an exported GGUF (load it with our own GGUF loader, the path `qlora generate
//! --model x.gguf` takes: dequantize, un-permute q/k, HF names, and compare its logits
//! with the *source* model running the adapter unmerged, both in f32), and the pieces
//! `qlora merge --requantize` measures with ([`load_f32`], [`logits`], [`compare`]).
//!
//! What it catches: a wrong q/k permutation, a wrong tensor name or orientation, a
//! broken encoder, a merge that does not equal the adapter's forward, lost
//! hyper-parameters (RoPE base, eps, heads). What it cannot catch: llama.cpp-specific
//! metadata it never reads (see `scripts/check_gguf_llamacpp.mjs` for that).

use std::path::Path;

use anyhow::{ensure, Context, Result};
use qlora_formats::model_ref::{ModelRef, Resolve};
use qlora_model::{Batch, LoadOptions, Model, QuantMode};

/// Logit differences between the exported file and the source (+ adapter).
#[derive(Debug, Clone, PartialEq)]
pub struct CheckReport {
    pub sequences: usize,
    pub positions: usize,
    pub max_abs_diff: f32,
    pub mean_abs_diff: f32,
    /// RMS of the source logits, the scale the differences compare to.
    pub ref_rms: f32,
    /// RMS of the differences.
    pub rms_diff: f32,
    /// Fraction of positions where both pick the same next token (argmax).
    pub argmax_agreement: f64,
}

impl std::fmt::Display for CheckReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} positions in {} sequences: max |Δlogit| {:.4e}, mean {:.4e}, RMS {:.4e} \
             (source logits RMS {:.3}, relative {:.3e}); same argmax at {:.1}% of positions",
            self.positions,
            self.sequences,
            self.max_abs_diff,
            self.mean_abs_diff,
            self.rms_diff,
            self.ref_rms,
            self.rms_diff / self.ref_rms.max(f32::MIN_POSITIVE),
            100.0 * self.argmax_agreement
        )
    }
}

/// Load any model we export from or to (folder, bnb-4bit folder, .gguf; resolved by
/// [`ModelRef`], never from the hub) in f32.
pub fn load_f32(path: &Path) -> Result<Model> {
    let opts = LoadOptions {
        quant: QuantMode::None,
    };
    let r = ModelRef::resolve_with(&path.to_string_lossy(), &Resolve::new(false))?;
    r.require_model()?;
    if r.is_gguf() {
        let path = r.path();
        let (config, tensors) = qlora_gguf::llama::load_hf_tensors(path)?;
        let tensors = tensors.collect::<std::result::Result<Vec<_>, _>>()?;
        Model::from_tensors(config, tensors, &path.display().to_string(), &opts)
            .with_context(|| format!("loading {}", path.display()))
    } else {
        let dir = r.path();
        Model::from_folder(dir, &opts).with_context(|| format!("loading {}", dir.display()))
    }
}

/// f32 logits `[sequences · len · vocab]` of `model` (+ adapter, unmerged) on `seqs`.
pub fn logits(
    model: &Model,
    adapter: Option<&qlora_lora::Adapter>,
    seqs: &[Vec<u32>],
) -> Result<Vec<f32>> {
    let t = model.forward_logits(&Batch::from_ids(seqs.to_vec()), adapter)?;
    Ok(t.into_vec())
}

/// Compare two logit arrays with `vocab` entries per position.
pub fn compare(reference: &[f32], other: &[f32], vocab: usize, sequences: usize) -> CheckReport {
    assert_eq!(
        reference.len(),
        other.len(),
        "logit arrays differ in length"
    );
    let positions = reference.len() / vocab.max(1);
    let (mut max, mut sum, mut sq, mut ref_sq) = (0f32, 0f64, 0f64, 0f64);
    for (a, b) in reference.iter().zip(other) {
        let d = (a - b).abs();
        // NaN must not hide: it makes the max NaN, which fails every bound.
        max = if d.is_nan() { f32::NAN } else { max.max(d) };
        sum += d as f64;
        sq += (d as f64).powi(2);
        ref_sq += (*a as f64).powi(2);
    }
    let n = reference.len().max(1) as f64;
    let argmax = |v: &[f32]| {
        v.iter()
            .enumerate()
            .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &x)| {
                if x > bv {
                    (i, x)
                } else {
                    (bi, bv)
                }
            })
            .0
    };
    let agree = reference
        .chunks(vocab)
        .zip(other.chunks(vocab))
        .filter(|(a, b)| argmax(a) == argmax(b))
        .count();
    CheckReport {
        sequences,
        positions,
        max_abs_diff: max,
        mean_abs_diff: (sum / n) as f32,
        ref_rms: (ref_sq / n).sqrt() as f32,
        rms_diff: (sq / n).sqrt() as f32,
        argmax_agreement: agree as f64 / positions.max(1) as f64,
    }
}

/// Deterministic pseudo-random token sequences (a fixed LCG, so every run and every
/// machine checks the same ids) for when no tokenizer text is at hand.
pub fn pseudo_random_ids(vocab: usize, sequences: usize, len: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..sequences)
        .map(|_| {
            (0..len)
                .map(|_| {
                    s = s
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((s >> 33) % vocab as u64) as u32
                })
                .collect()
        })
        .collect()
}

/// The read-back check: source (+ adapter, unmerged, f32) vs the exported GGUF (f32).
/// Sequences must all have the same length. The source is dropped before the export is
/// loaded, so at most one f32 model is in memory.
pub fn check_export(
    model: &Path,
    adapter: Option<&Path>,
    gguf: &Path,
    seqs: &[Vec<u32>],
) -> Result<CheckReport> {
    ensure!(!seqs.is_empty(), "no check sequences");
    let (reference, vocab) = {
        let m = load_f32(model)?;
        let a = match adapter {
            Some(dir) => Some(qlora_lora::load_adapter(dir, Some(&m.config))?.1),
            None => None,
        };
        (logits(&m, a.as_ref(), seqs)?, m.config.vocab_size)
    };
    let exported = load_f32(gguf).with_context(|| format!("reading back {}", gguf.display()))?;
    ensure!(
        exported.config.vocab_size == vocab,
        "{}: vocabulary {} but the source has {vocab}",
        gguf.display(),
        exported.config.vocab_size
    );
    let got = logits(&exported, None, seqs)?;
    Ok(compare(&reference, &got, vocab, seqs.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_measures_differences_and_argmax() {
        let a = [1.0f32, 2.0, 0.0, 3.0, 0.5, 0.0];
        let b = [1.0f32, 1.5, 0.0, 0.0, 0.5, 1.0];
        let r = compare(&a, &b, 3, 1);
        assert_eq!(r.positions, 2);
        assert_eq!(r.max_abs_diff, 3.0);
        assert!((r.mean_abs_diff - 4.5 / 6.0).abs() < 1e-6);
        assert_eq!(r.argmax_agreement, 0.5);
        let nan = compare(&a, &[f32::NAN; 6], 3, 1);
        assert!(nan.max_abs_diff.is_nan());
    }

    #[test]
    fn pseudo_random_ids_are_reproducible_and_in_range() {
        let a = pseudo_random_ids(320, 3, 17, 5);
        assert_eq!(a, pseudo_random_ids(320, 3, 17, 5));
        assert_ne!(a, pseudo_random_ids(320, 3, 17, 6));
        assert!(a.iter().flatten().all(|&i| i < 320));
        assert_eq!(a.len(), 3);
        assert!(a.iter().all(|s| s.len() == 17));
    }
}
