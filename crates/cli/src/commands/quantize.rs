//! `qlora quantize`: a Hugging Face model folder (or a bare safetensors file)
//! to the bitsandbytes 4-bit format transformers loads directly.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use qlora_formats::convert::{self, QuantizeOptions};
use qlora_quant::{QuantOptions, QuantType};

use crate::flags::{torch_dtype_name, DoubleQuant};
use crate::report::{print_files, print_sizes};

#[derive(clap::Args)]
pub struct Args {
    /// A Hugging Face model folder (config.json + model.safetensors or shards), or a bare .safetensors file.
    pub input: PathBuf,
    /// Output folder (for a model folder) or output .safetensors file (for a bare file).
    #[arg(long)]
    pub out: PathBuf,
    /// 4-bit data type.
    #[arg(long, default_value = "nf4", value_parser = ["nf4", "fp4"])]
    pub quant: String,
    /// Elements per absmax block (power of two, 32..=4096).
    #[arg(long, default_value_t = 64)]
    pub blocksize: usize,
    #[command(flatten)]
    pub double_quant: DoubleQuant,
    /// Compute dtype recorded in config.json (bnb_4bit_compute_dtype).
    #[arg(long, default_value = "bf16", value_parser = ["bf16", "f16", "f32"])]
    pub compute_dtype: String,
    /// Largest shard (data bytes), like transformers: 5GB, 500MB, 2GiB, or a byte count.
    #[arg(long, default_value = "5GB")]
    pub max_shard_size: String,
    /// Replace an existing, non-empty output.
    #[arg(long)]
    pub force: bool,
}

pub fn run(a: Args) -> Result<()> {
    let quant_type: QuantType = a.quant.parse()?;
    qlora_quant::check_blocksize(a.blocksize)?;
    let opts = QuantizeOptions {
        quant: QuantOptions {
            quant_type,
            blocksize: a.blocksize,
            double_quant: a.double_quant.enabled(),
            allow_nonfinite: false,
        },
        compute_dtype: torch_dtype_name(&a.compute_dtype).to_string(),
        max_shard_size: qlora_formats::parse_size(&a.max_shard_size).map_err(anyhow::Error::msg)?,
        force: a.force,
    };
    let t0 = Instant::now();
    let report = if a.input.is_dir() {
        convert::quantize_model(&a.input, &a.out, &opts)
    } else if a.input.is_file() {
        convert::quantize_file(&a.input, &a.out, &opts)
    } else {
        bail!("{}: no such file or folder", a.input.display());
    }
    .with_context(|| format!("quantizing {}", a.input.display()))?;
    println!(
        "quantized {} tensors to {} (blocksize {}, double quant {}), kept {} unchanged, in {:.2} s",
        report.converted,
        quant_type,
        a.blocksize,
        if opts.quant.double_quant { "on" } else { "off" },
        report.copied,
        t0.elapsed().as_secs_f64()
    );
    print_sizes(&report);
    let e = &report.error;
    println!(
        "quantization error: relative RMS {:.4} over {} weights, max |w - deq(w)| {:.4e}",
        e.rel_rms(),
        e.elements,
        e.max_abs_err
    );
    if let Some((name, rel)) = &e.worst {
        println!("  worst tensor: {name} (relative RMS {rel:.4})");
    }
    print_files(&report);
    Ok(())
}
