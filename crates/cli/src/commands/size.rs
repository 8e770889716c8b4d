//! `qlora size <model-ref>`: parameter count and exact weight bytes in every
//! storage format (no weights are read; see `qlora-memory`).

use anyhow::{bail, Result};
use qlora_memory::size::SizeOptions;
use qlora_quant::DType;

use crate::text::group;

#[derive(clap::Args)]
pub struct Args {
    /// config.json, model folder, .safetensors file/folder/index, .gguf file,
    /// preset name (see --list-presets) or hub id (config.json only, cache first).
    pub model: Option<String>,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Extra bnb 4-bit block sizes to report (64 is always reported).
    #[arg(long = "blocksize", value_name = "N")]
    pub blocksizes: Vec<u64>,
    /// dtype of the tensors 4-bit formats leave unquantized (bf16, f16, f32).
    #[arg(long, default_value = "bf16")]
    pub keep: String,
    /// List the built-in presets and exit.
    #[arg(long)]
    pub list_presets: bool,
    /// Also count a PEFT adapter folder (LoRA A/B and, for DoRA, the magnitude vectors),
    /// checked against the model's shapes when its config is known.
    #[arg(long)]
    pub adapter: Option<std::path::PathBuf>,
}

/// The trainable parameters of an adapter folder, as `size --adapter` reports them.
#[derive(serde::Serialize)]
struct AdapterSize {
    path: String,
    r: usize,
    dora: bool,
    modules: usize,
    /// Σ r·(in + out) over the modules.
    lora_params: usize,
    /// DoRA: Σ out over the modules (one magnitude per output feature); 0 for LoRA.
    dora_params: usize,
    total_params: usize,
    /// As `qlora train` writes them (f32).
    f32_bytes: usize,
}

fn adapter_size(
    dir: &std::path::Path,
    config: Option<&qlora_config::ModelConfig>,
) -> Result<AdapterSize> {
    let (peft, ad) = qlora_lora::load_adapter(dir, config)?;
    let lora: usize = ad.layers.values().map(|w| w.a.len() + w.b.len()).sum();
    let total = ad.num_params();
    Ok(AdapterSize {
        path: dir.display().to_string(),
        r: peft.r,
        dora: peft.use_dora,
        modules: ad.layers.len(),
        lora_params: lora,
        dora_params: total - lora,
        total_params: total,
        f32_bytes: 4 * total,
    })
}

pub fn run(a: Args) -> Result<()> {
    if a.list_presets {
        for p in qlora_memory::presets::PRESETS {
            println!("{:<16} {}", p.name, p.hub_id);
        }
        return Ok(());
    }
    let Some(model) = a.model else {
        bail!(
            "missing <MODEL>: a config.json, model folder, .safetensors, .gguf, preset or hub id"
        );
    };
    let keep = DType::parse(&a.keep)
        .ok_or_else(|| anyhow::anyhow!("--keep {:?}: expected bf16, f16 or f32", a.keep))?;
    for bs in &a.blocksizes {
        if *bs < 16 || !bs.is_power_of_two() {
            bail!("--blocksize {bs}: bitsandbytes block sizes are powers of two from 64 (e.g. 64, 128, 256)");
        }
    }
    let opts = SizeOptions {
        keep,
        blocksizes: a.blocksizes.clone(),
    };
    let l = qlora_memory::resolve(&model)?;
    let mut r = qlora_memory::size_report(&l.inventory, &l.label, l.kind, &opts, l.stored.clone());
    let mut notes = l.notes.clone();
    notes.append(&mut r.notes);
    r.notes = notes;
    let adapter = a
        .adapter
        .as_deref()
        .map(|d| adapter_size(d, l.config.as_ref()))
        .transpose()?;
    if a.json {
        let mut v = serde_json::to_value(&r)?;
        if let (Some(ad), Some(o)) = (&adapter, v.as_object_mut()) {
            o.insert("adapter".into(), serde_json::to_value(ad)?);
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("model:       {} ({})", r.model, r.source);
    println!("parameters:  {}", group(r.total_params));
    for (role, n) in &r.params {
        println!("  {:<11}{:>18}", role, group(*n));
    }
    println!(
        "  tied embeddings: {}; quantizable linears: {} ({} params)",
        if r.tied_embeddings { "yes" } else { "no" },
        r.quantizable_modules,
        group(r.quantizable_params)
    );
    println!();
    println!(
        "{:<14}{:>20}{:>11}{:>11}{:>22}",
        "format", "bytes", "GiB", "bits/param", "single-file size"
    );
    let order = |k: &str| -> (u8, String) {
        let rank = match k {
            "f32" => 0,
            "bf16" => 1,
            "f16" => 2,
            "int8" => 3,
            k if k.starts_with("gguf_") => 5,
            _ => 4,
        };
        (rank, k.to_string())
    };
    let mut keys: Vec<&String> = r.formats.keys().collect();
    keys.sort_by_key(|k| order(k));
    for k in keys {
        let f = &r.formats[k];
        let mark = if f.exact { "" } else { "~" };
        println!(
            "{:<14}{:>20}{:>11.3}{:>11.3}{:>22}",
            k,
            format!("{mark}{}", group(f.bytes)),
            f.bytes as f64 / (1u64 << 30) as f64,
            f.bytes as f64 * 8.0 / r.total_params.max(1) as f64,
            f.file_bytes
                .map(|b| format!("{mark}{}", group(b)))
                .unwrap_or_else(|| "-".into())
        );
    }
    if let Some(s) = &r.stored {
        println!();
        println!(
            "on disk:     {} in {} file(s): {} tensor bytes, {} file bytes",
            s.format,
            s.files,
            group(s.tensor_bytes),
            group(s.file_bytes)
        );
    }
    if let Some(ad) = &adapter {
        println!();
        println!(
            "adapter:     {} ({}r={}, {} modules): {} trainable params = {} LoRA A/B{}, {} bytes in f32",
            ad.path,
            if ad.dora { "DoRA, " } else { "" },
            ad.r,
            ad.modules,
            group(ad.total_params as u64),
            group(ad.lora_params as u64),
            if ad.dora {
                format!(" + {} DoRA magnitudes", group(ad.dora_params as u64))
            } else {
                String::new()
            },
            group(ad.f32_bytes as u64)
        );
    }
    println!();
    for n in &r.notes {
        println!("note: {n}");
    }
    Ok(())
}
