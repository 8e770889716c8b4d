//! `qlora dequantize`: a bitsandbytes 4-bit model folder (or bare file) back
//! to plain floating-point weights.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use qlora_formats::convert::{self, DequantizeOptions};

use crate::flags::torch_dtype_name;
use crate::report::{print_files, print_sizes};

#[derive(clap::Args)]
pub struct Args {
    /// A bnb-4bit model folder, or a bare .safetensors file with bnb 4-bit keys.
    pub input: PathBuf,
    /// Output folder (model) or .safetensors file (bare file).
    #[arg(long)]
    pub out: PathBuf,
    /// Output dtype (default: the dtype each weight had before quantization).
    #[arg(long, value_parser = ["f32", "f16", "bf16"])]
    pub dtype: Option<String>,
    /// Largest shard (data bytes) of a model folder.
    #[arg(long, default_value = "5GB")]
    pub max_shard_size: String,
    /// Replace an existing, non-empty output.
    #[arg(long)]
    pub force: bool,
}

pub fn run(a: Args) -> Result<()> {
    let dtype = match &a.dtype {
        Some(d) => Some(torch_dtype_name(d).parse::<qlora_quant::DType>()?),
        None => None,
    };
    let opts = DequantizeOptions {
        dtype,
        max_shard_size: qlora_formats::parse_size(&a.max_shard_size).map_err(anyhow::Error::msg)?,
        force: a.force,
    };
    let t0 = Instant::now();
    let report = if a.input.is_dir() {
        convert::dequantize_model(&a.input, &a.out, &opts)
    } else if a.input.is_file() {
        convert::dequantize_file(&a.input, &a.out, &opts)
    } else {
        bail!("{}: no such file or folder", a.input.display());
    }
    .with_context(|| format!("dequantizing {}", a.input.display()))?;
    println!(
        "dequantized {} tensors, kept {} in {:.2} s",
        report.converted,
        report.copied,
        t0.elapsed().as_secs_f64()
    );
    print_sizes(&report);
    print_files(&report);
    Ok(())
}
