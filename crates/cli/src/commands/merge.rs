//! `qlora merge`: fold a LoRA adapter into its base, W' = W + scaling·(B@A),
//! written as a plain Hugging Face folder (or, with `--requantize`, a
//! bitsandbytes 4-bit folder of the merged model).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use qlora_formats::ModelSource;
use qlora_merge::{merge_model, merge_requantized, MergeFrom, MergeOptions};
use qlora_quant::QuantType;

use crate::flags::{torch_dtype_name, DoubleQuant};

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
    /// Whether that quantization used double quantization (qlora train's default: yes).
    #[command(flatten)]
    pub double_quant: DoubleQuant,
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
        double_quant: a.double_quant.enabled(),
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
    let how = qlora_formats::model_ref::Resolve::new(false);
    let source =
        qlora_formats::ModelRef::resolve_with(&a.model.to_string_lossy(), &how).map(|r| r.source);
    if let Ok(ModelSource::Gguf(_)) = source {
        bail!(
            "{}: a .gguf base is merged by `qlora export-gguf --model {} --adapter {} --out merged.gguf`: \
             it adds the adapter to the file's own dequantized weights, which are exactly the weights \
             `--quant native` (the default for .gguf) trained against",
            a.model.display(),
            a.model.display(),
            a.adapter.display()
        );
    }
    let Ok(ModelSource::Folder(model)) = source else {
        bail!(
            "{}: --model must be a Hugging Face model folder (config.json + safetensors)",
            a.model.display()
        );
    };
    let t0 = Instant::now();
    let Some(rq) = &a.requantize else {
        let rep = merge_model(&model, &a.adapter, &a.out, &opts).with_context(|| {
            format!("merging {} into {}", a.adapter.display(), a.model.display())
        })?;
        print_report(&rep, t0.elapsed().as_secs_f64(), true);
        return Ok(());
    };
    let r = merge_requantized(&model, &a.adapter, &a.out, &opts, rq.parse::<QuantType>()?)?;
    // The staging folder of the f32 merge is removed: its files are not the output.
    print_report(&r.merge, r.merge_secs, false);
    println!(
        "requantized the merged model to {rq}: {} weights, relative RMS error of the 4-bit weights vs the merged ones {:.4}%",
        r.converted,
        100.0 * r.rel_rms
    );
    println!("  wrote {}", r.out.display());
    let c = &r.check;
    println!(
        "logits of the requantized merged model vs base + adapter (unmerged, full precision): {}",
        c.requantized
    );
    println!(
        "  merged before requantizing, same comparison: max |Δlogit| {:.3e}",
        c.merged.max_abs_diff
    );
    if let Some(t) = &c.as_trained {
        println!(
            "  for scale, the 4-bit base + adapter (as trained) vs the same: mean |Δlogit| {:.4e}, max {:.4e}",
            t.mean_abs_diff, t.max_abs_diff
        );
    }
    Ok(())
}

fn print_report(rep: &qlora_merge::MergeReport, secs: f64, list_files: bool) {
    println!("merge source: {} — {}", rep.from.as_str(), rep.reason);
    println!(
        "merged {} adapted modules (max |scaling·B·A| = {:.3e}), copied {} other tensors, output dtype {} in {:.2} s",
        rep.merged_modules,
        rep.max_abs_delta,
        rep.copied_tensors,
        rep.dtype.torch_name(),
        secs
    );
    if list_files {
        for f in &rep.files {
            println!("  wrote {}", f.display());
        }
    }
}
