//! `qlora merge`: fold a LoRA adapter into its base, W' = W + scaling·(B@A),
//! written as a plain Hugging Face folder (or, with `--requantize`, a
//! bitsandbytes 4-bit folder of the merged model).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use qlora_formats::convert::{self, QuantizeOptions};
use qlora_merge::{merge_model, MergeFrom, MergeOptions};
use qlora_quant::QuantType;

use super::quantize::torch_dtype_name;

#[derive(clap::Args)]
pub struct Args {
    /// Base model folder (full precision or bitsandbytes 4-bit).
    #[arg(long)]
    pub model: PathBuf,
    /// PEFT adapter folder (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    pub adapter: PathBuf,
    /// Output folder.
    #[arg(long)]
    pub out: PathBuf,
    /// Output dtype (default: the base model's dtype, bf16 for a 4-bit base).
    #[arg(long, value_parser = ["f32", "f16", "bf16"])]
    pub dtype: Option<String>,
    /// Merge into the original full-precision weights (best quality) or into
    /// dequant(W4), the weights the adapter was trained against. Default:
    /// original when the base has them.
    #[arg(long, value_parser = ["original", "dequantized"])]
    pub from: Option<String>,
    /// The 4-bit type the adapter was trained on (for --from dequantized on a full-precision base).
    #[arg(long, default_value = "nf4", value_parser = ["nf4", "fp4"])]
    pub quant: String,
    /// Block size of that quantization.
    #[arg(long, default_value_t = 64)]
    pub blocksize: usize,
    /// Whether that quantization used double quantization (qlora train's default).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub double_quant: bool,
    /// Write a bitsandbytes 4-bit folder of the merged model instead.
    #[arg(long, value_parser = ["nf4", "fp4"])]
    pub requantize: Option<String>,
    /// Largest shard (data bytes).
    #[arg(long, default_value = "5GB")]
    pub max_shard_size: String,
    /// Replace an existing, non-empty output.
    #[arg(long)]
    pub force: bool,
}

pub fn run(a: Args) -> Result<()> {
    let quant = qlora_quant::QuantOptions {
        quant_type: a.quant.parse::<QuantType>()?,
        blocksize: a.blocksize,
        double_quant: a.double_quant,
        ..Default::default()
    };
    let dtype = match &a.dtype {
        Some(d) => Some(torch_dtype_name(d).parse::<qlora_quant::DType>()?),
        None => None,
    };
    let max_shard_size =
        qlora_formats::parse_size(&a.max_shard_size).map_err(anyhow::Error::msg)?;
    let opts = MergeOptions {
        dtype,
        from: match a.from.as_deref() {
            None => None,
            Some("original") => Some(MergeFrom::Original),
            Some("dequantized") => Some(MergeFrom::Dequantized),
            Some(other) => bail!("--from {other}: expected original or dequantized"),
        },
        quant,
        max_shard_size,
        force: a.force,
    };
    if !a.model.is_dir() {
        bail!(
            "{}: --model must be a Hugging Face model folder (config.json + safetensors)",
            a.model.display()
        );
    }
    let t0 = Instant::now();
    let Some(rq) = &a.requantize else {
        let rep = merge_model(&a.model, &a.adapter, &a.out, &opts).with_context(|| {
            format!("merging {} into {}", a.adapter.display(), a.model.display())
        })?;
        print_report(&rep, t0, true);
        return Ok(());
    };
    // Requantize: merge into a sibling temporary folder, quantize it into --out.
    let staging = a.out.with_file_name(format!(
        ".{}.merge-staging-{}",
        a.out
            .file_name()
            .map(|s| s.to_string_lossy())
            .unwrap_or_default(),
        std::process::id()
    ));
    let staged = MergeOptions {
        dtype: Some(qlora_quant::DType::F32),
        force: true,
        ..opts
    };
    if !a.force
        && a.out.exists()
        && a.out
            .read_dir()
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        bail!(
            "{}: output exists and is not empty (use --force to replace it)",
            a.out.display()
        );
    }
    let result = (|| -> Result<()> {
        let rep = merge_model(&a.model, &a.adapter, &staging, &staged)?;
        // The staging folder is removed below: its files are not the output.
        print_report(&rep, t0, false);
        let qopts = QuantizeOptions {
            quant: qlora_quant::QuantOptions {
                quant_type: rq.parse::<QuantType>()?,
                ..opts.quant
            },
            compute_dtype: "bfloat16".into(),
            max_shard_size,
            force: a.force,
        };
        let qrep = convert::quantize_model(&staging, &a.out, &qopts)?;
        println!(
            "requantized the merged model to {rq}: {} weights, relative RMS error of the 4-bit weights vs the merged ones {:.4}%",
            qrep.converted,
            100.0 * qrep.error.rel_rms()
        );
        println!("  wrote {}", a.out.display());
        report_requantization_error(&a, &staging)?;
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&staging);
    result.with_context(|| format!("merging {} into {}", a.adapter.display(), a.model.display()))
}

/// Fixed prompts for the logit comparison (tokenized when the base has a tokenizer).
const CHECK_PROMPTS: [&str; 4] = [
    "The capital of France is Paris. The capital of Germany is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Q: What is the boiling point of water at sea level?\nA: It boils at",
    "Once upon a time, in a small village by the sea, there lived an old",
];

/// What requantizing the merged model costs, in logits: the 4-bit merged model vs
/// the unmerged full-precision base + adapter (the reference), on a few prompts;
/// and, for scale, the model as it was trained (4-bit base + adapter, unmerged)
/// vs the same reference.
fn report_requantization_error(a: &Args, merged_f32: &std::path::Path) -> Result<()> {
    let base = qlora_merge::gguf_check::load_f32(&a.model)?;
    let vocab = base.config.vocab_size;
    let seqs = match qlora_tokenizer::Tokenizer::from_folder(&a.model) {
        Ok(tok) => {
            let ids = CHECK_PROMPTS
                .iter()
                .map(|p| tok.encode(p, false))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            let len = ids.iter().map(Vec::len).min().unwrap_or(0);
            ids.into_iter()
                .map(|mut v| {
                    v.truncate(len);
                    v
                })
                .collect::<Vec<_>>()
        }
        Err(_) => Vec::new(),
    };
    let seqs = if seqs.first().is_some_and(|s| s.len() >= 4) {
        seqs
    } else {
        qlora_merge::gguf_check::pseudo_random_ids(vocab, 4, 32, 0)
    };
    let (_, adapter) = qlora_lora::load_adapter(&a.adapter, Some(&base.config))?;
    let reference = qlora_merge::gguf_check::logits(&base, Some(&adapter), &seqs)?;
    drop(base);
    let cmp = |m: &qlora_model::Model, ad: Option<&qlora_lora::Adapter>| -> Result<_> {
        let got = qlora_merge::gguf_check::logits(m, ad, &seqs)?;
        Ok(qlora_merge::gguf_check::compare(
            &reference,
            &got,
            vocab,
            seqs.len(),
        ))
    };
    let requantized = qlora_merge::gguf_check::load_f32(&a.out)?;
    let r = cmp(&requantized, None)?;
    drop(requantized);
    println!(
        "logits of the requantized merged model vs base + adapter (unmerged, full precision): {r}"
    );
    let merged = qlora_merge::gguf_check::load_f32(merged_f32)?;
    let m = cmp(&merged, None)?;
    drop(merged);
    println!(
        "  merged before requantizing, same comparison: max |Δlogit| {:.3e}",
        m.max_abs_diff
    );
    let quant = qlora_model::LoadOptions {
        quant: a.quant.parse()?,
    };
    if let Ok(trained) = qlora_model::Model::from_folder(&a.model, &quant) {
        let t = cmp(&trained, Some(&adapter))?;
        println!(
            "  for scale, the 4-bit base + adapter (as trained) vs the same: mean |Δlogit| {:.4e}, max {:.4e}",
            t.mean_abs_diff, t.max_abs_diff
        );
    }
    Ok(())
}

fn print_report(rep: &qlora_merge::MergeReport, t0: Instant, list_files: bool) {
    println!("merge source: {} — {}", rep.from.as_str(), rep.reason);
    println!(
        "merged {} adapted modules (max |scaling·B·A| = {:.3e}), copied {} other tensors, output dtype {} in {:.2} s",
        rep.merged_modules,
        rep.max_abs_delta,
        rep.copied_tensors,
        rep.dtype.torch_name(),
        t0.elapsed().as_secs_f64()
    );
    if list_files {
        for f in &rep.files {
            println!("  wrote {}", f.display());
        }
    }
}
