//! `qlora plan <model-ref> [training flags]`: per-device training memory,
//! and with `--budget` whether it fits, the largest batch / sequence that fit
//! and the fewest devices needed (`qlora-memory::plan`).

use anyhow::{anyhow, bail, Context, Result};
use qlora_memory::bnb::{Bnb4, QuantType};
use qlora_memory::plan::{self, DType, Method, Optimizer, PlanInput, Sharding};
use serde_json::json;

use super::size::group;

#[derive(clap::Args)]
pub struct Args {
    /// config.json, model folder, .safetensors, .gguf, preset or hub id.
    pub model: String,
    /// full | lora | qlora
    #[arg(long, default_value = "qlora")]
    pub method: String,
    /// LoRA rank.
    #[arg(long, short = 'r', default_value_t = 8)]
    pub rank: u64,
    /// Comma-separated LoRA targets, or `all` (q,k,v,o,gate,up,down).
    #[arg(long, default_value = "all")]
    pub targets: String,
    /// adamw (f32 states) | adamw8bit | sgd
    #[arg(long, default_value = "adamw")]
    pub optimizer: String,
    /// Micro-batch per device.
    #[arg(long, short = 'b', default_value_t = 1)]
    pub batch: u64,
    /// Sequence length.
    #[arg(long, short = 's', default_value_t = 512)]
    pub seq: u64,
    /// Gradient accumulation steps (no extra memory: gradients persist anyway).
    #[arg(long, default_value_t = 1)]
    pub grad_accum: u64,
    /// Gradient checkpointing (keep only each layer's input).
    #[arg(long, alias = "gradient-checkpointing")]
    pub checkpointing: bool,
    /// Compute/activation dtype: f32 (default on CPU) | bf16 | f16 (default with --gpu).
    #[arg(long)]
    pub compute: Option<String>,
    /// Number of devices.
    #[arg(long, default_value_t = 1)]
    pub devices: u64,
    /// none (DDP) | full (FSDP FULL_SHARD) | grad-op (SHARD_GRAD_OP)
    #[arg(long, default_value = "full")]
    pub sharding: String,
    /// Offload (sharded) parameters, gradients and optimizer states to host RAM.
    #[arg(long)]
    pub cpu_offload: bool,
    /// Plan for a GPU (bf16 compute, CUDA context, FSDP buffers) instead of
    /// this project's CPU trainer.
    #[arg(long)]
    pub gpu: bool,
    /// 4-bit code of the frozen base: nf4 | fp4.
    #[arg(long, default_value = "nf4")]
    pub quant: String,
    /// bnb block size.
    #[arg(long, default_value_t = 64)]
    pub blocksize: u64,
    /// Disable double quantization of the absmax statistics.
    #[arg(long)]
    pub no_double_quant: bool,
    /// Fixed runtime overhead per device (default: measured process baseline on
    /// CPU, 512 MiB CUDA context with --gpu), e.g. 600MiB.
    #[arg(long)]
    pub overhead: Option<String>,
    /// Worker threads of the CPU trainer (default: this machine's CPUs).
    #[arg(long)]
    pub threads: Option<u64>,
    /// Memory per device, e.g. 24GB (binary units: 24GB = 24 GiB).
    #[arg(long)]
    pub budget: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

fn input(a: &Args) -> Result<PlanInput> {
    let method = match a.method.to_ascii_lowercase().as_str() {
        "full" => Method::Full,
        "lora" => Method::Lora,
        "qlora" => Method::Qlora,
        m => bail!("--method {m:?}: expected full, lora or qlora"),
    };
    let optimizer = match a
        .optimizer
        .to_ascii_lowercase()
        .replace(['-', '_'], "")
        .as_str()
    {
        "adamw" | "adam" | "adamw32" => Optimizer::AdamW,
        "adamw8bit" | "adam8bit" | "pagedadamw8bit" => Optimizer::AdamW8bit,
        "sgd" => Optimizer::Sgd,
        o => bail!("--optimizer {o:?}: expected adamw, adamw8bit or sgd"),
    };
    let sharding = match a.sharding.to_ascii_lowercase().replace('_', "-").as_str() {
        "none" | "ddp" | "no-shard" => Sharding::None,
        "full" | "full-shard" | "fsdp" => Sharding::Full,
        "grad-op" | "shard-grad-op" => Sharding::GradOp,
        s => bail!("--sharding {s:?}: expected none, full or grad-op"),
    };
    let compute = match &a.compute {
        Some(c) => {
            DType::parse(c).ok_or_else(|| anyhow!("--compute {c:?}: expected f32, bf16 or f16"))?
        }
        None if a.gpu => DType::BF16,
        None => DType::F32,
    };
    let quant_type = match a.quant.to_ascii_lowercase().as_str() {
        "nf4" => QuantType::Nf4,
        "fp4" => QuantType::Fp4,
        q => bail!("--quant {q:?}: expected nf4 or fp4"),
    };
    if a.blocksize < 16 || !a.blocksize.is_power_of_two() {
        bail!(
            "--blocksize {}: expected a power of two such as 64",
            a.blocksize
        );
    }
    let targets: Vec<String> = if a.targets == "all" || a.targets == "all-linear" {
        plan::ALL_TARGETS.iter().map(|s| s.to_string()).collect()
    } else {
        a.targets
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect()
    };
    if method != Method::Full && (targets.is_empty() || a.rank == 0) {
        bail!("LoRA needs --rank ≥ 1 and at least one target");
    }
    let overhead = match &a.overhead {
        Some(s) => plan::parse_bytes(s)?,
        None if a.gpu => plan::GPU_OVERHEAD,
        None => plan::CPU_OVERHEAD,
    };
    if a.grad_accum == 0 {
        bail!("--grad-accum must be at least 1");
    }
    Ok(PlanInput {
        method,
        rank: a.rank,
        targets,
        optimizer,
        batch: a.batch,
        seq: a.seq,
        grad_accum: a.grad_accum,
        checkpointing: a.checkpointing,
        compute,
        quant: Bnb4::new(quant_type, a.blocksize, !a.no_double_quant),
        devices: a.devices,
        sharding,
        cpu_offload: a.cpu_offload,
        overhead,
        gpu: a.gpu,
        load_file_bytes: 0,
        tokenizer_bytes: 0,
        threads: if a.gpu {
            1
        } else {
            a.threads.unwrap_or_else(|| {
                std::thread::available_parallelism().map_or(1, |n| n.get() as u64)
            })
        },
    })
}

/// Bytes of the checkpoint `qlora train` keeps memory-mapped and resident at
/// the end of loading: a GGUF file stays mapped, every page touched, until the
/// model is built; safetensors pages are released tensor by tensor, so about
/// the largest tensor (estimated at the file's average bytes per element).
fn resident_while_loading(l: &qlora_memory::Loaded) -> u64 {
    let Some(st) = &l.stored else { return 0 };
    if l.kind == "gguf" {
        return st.file_bytes;
    }
    let params = l.inventory.total_params().max(1);
    let largest = l
        .inventory
        .tensors
        .iter()
        .map(|t| t.numel())
        .max()
        .unwrap_or(0);
    (largest as u128 * st.tensor_bytes as u128 / params as u128) as u64
}

/// Whether `qlora train` would load a tokenizer with this model.
fn has_tokenizer(reference: &str, l: &qlora_memory::Loaded) -> bool {
    if l.kind == "gguf" {
        return true;
    }
    let p = std::path::Path::new(reference);
    let dir = if p.is_dir() { Some(p) } else { p.parent() };
    dir.is_some_and(|d| d.join("tokenizer.json").is_file())
}

pub fn run(a: Args) -> Result<()> {
    let mut p = input(&a)?;
    let l = qlora_memory::resolve(&a.model)?;
    p.load_file_bytes = resident_while_loading(&l);
    let cfg_for_tok = l.config.as_ref();
    // `qlora train` keeps the tokenizer of a GGUF (always rebuilt from its
    // metadata) or of a folder holding tokenizer.json.
    if let (Some(c), true) = (cfg_for_tok, has_tokenizer(&a.model, &l)) {
        p.tokenizer_bytes = plan::tokenizer_bytes(c.vocab_size as u64);
    }
    let cfg = l.config.clone().with_context(|| {
        format!(
            "{}: planning needs the architecture (heads, layers); put config.json next to the weights ({})",
            l.label,
            l.notes.join("; ")
        )
    })?;
    let inv = &l.inventory;
    let result = plan::plan(inv, &cfg, &p)?;
    let budget = a.budget.as_deref().map(plan::parse_bytes).transpose()?;
    let answers = match budget {
        None => None,
        Some(budget) => {
            let fits_with = |q: &PlanInput| -> Result<bool, qlora_memory::MemoryError> {
                Ok(plan::plan(inv, &cfg, q)?.per_device.total_bytes <= budget)
            };
            let max_batch = plan::largest_fitting(1 << 16, |b| {
                fits_with(&PlanInput {
                    batch: b,
                    ..p.clone()
                })
            })?;
            let max_seq = plan::largest_fitting(1 << 22, |s| {
                fits_with(&PlanInput {
                    seq: s,
                    ..p.clone()
                })
            })?;
            // Fewest devices: memory per device never grows with devices.
            let mut min_devices = None;
            if p.sharding != Sharding::None || p.cpu_offload {
                let mut n = 1;
                while n <= 4096 {
                    if fits_with(&PlanInput {
                        devices: n,
                        ..p.clone()
                    })? {
                        min_devices = Some(n);
                        break;
                    }
                    n += 1;
                }
            } else if fits_with(&PlanInput {
                devices: 1,
                ..p.clone()
            })? {
                min_devices = Some(1);
            }
            let total = result.per_device.total_bytes;
            Some(json!({
                "budget_bytes": budget,
                "fits": total <= budget,
                // i64 (JSON's integer range), saturating: a u64 budget minus a u64 total
                "margin_bytes": (budget as i128 - total as i128)
                    .clamp(i64::MIN as i128, i64::MAX as i128) as i64,
                "max_batch": max_batch,
                "max_seq": max_seq,
                "min_devices": min_devices,
            }))
        }
    };
    if a.json {
        let mut v = serde_json::to_value(&result)?;
        v["model"] = json!(l.label);
        v["vocab_size"] = json!(cfg.vocab_size);
        v["total_bytes"] = json!(result.per_device.total_bytes);
        v["saved_per_layer"] = serde_json::to_value(plan::saved_per_layer(&cfg, &p))?;
        if let Some(ans) = answers {
            v["budget"] = ans;
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let b = &result.per_device;
    println!("model:      {} ({})", l.label, l.kind);
    println!(
        "setup:      {:?}, r={}, targets {}, {:?}, batch {} × seq {}, grad-accum {}, checkpointing {}, compute {:?}, {} device(s), sharding {:?}{}{}",
        p.method,
        p.rank,
        p.targets.join(","),
        p.optimizer,
        p.batch,
        p.seq,
        p.grad_accum,
        if p.checkpointing { "on" } else { "off" },
        p.compute,
        p.devices,
        p.sharding,
        if p.cpu_offload { ", CPU offload" } else { "" },
        if p.gpu { ", GPU" } else { ", CPU trainer" },
    );
    println!("trainable:  {} parameters", group(result.trainable_count));
    println!();
    println!("{:<28}{:>18}{:>12}", "per device", "bytes", "GiB");
    let rows = [
        ("frozen weights", b.frozen_weights),
        ("  of which quant stats", b.quant_stats),
        ("trainable parameters", b.trainable_params),
        ("gradients", b.gradients),
        ("optimizer states", b.optimizer_states),
        ("activations", b.activations),
        (
            if b.layer_workspace >= b.logits_and_loss + b.heap_retention {
                "layer backward workspace *"
            } else {
                "layer backward workspace"
            },
            b.layer_workspace,
        ),
        (
            if b.layer_workspace < b.logits_and_loss + b.heap_retention {
                "logits and loss *"
            } else {
                "logits and loss"
            },
            b.logits_and_loss,
        ),
        ("  + heap retention", b.heap_retention),
        ("dequantization workspace", b.dequant_workspace),
        ("tokenizer", b.tokenizer),
        ("worker-thread arenas", b.worker_arenas),
        ("communication buffers", b.communication),
        ("runtime overhead", b.overhead),
        ("training peak", b.train_peak),
        ("loading peak", b.load_peak),
        ("total (max of the two peaks)", b.total_bytes),
    ];
    for (k, v) in rows {
        println!(
            "{:<28}{:>18}{:>12.3}",
            k,
            group(v),
            v as f64 / (1u64 << 30) as f64
        );
    }
    println!("(* the larger of the two transient phases; only it counts in the total)");
    if b.host_offloaded > 0 {
        println!(
            "{:<28}{:>18}{:>12.3}",
            "(host RAM, offloaded)",
            group(b.host_offloaded),
            b.host_offloaded as f64 / (1u64 << 30) as f64
        );
    }
    if let Some(ans) = answers {
        println!();
        let budget = ans["budget_bytes"].as_u64().unwrap_or(0);
        let margin = ans["margin_bytes"].as_i64().unwrap_or(0);
        println!(
            "budget {:.2} GiB: {} (margin {:+.2} GiB)",
            budget as f64 / (1u64 << 30) as f64,
            if ans["fits"].as_bool() == Some(true) {
                "fits"
            } else {
                "does NOT fit"
            },
            margin as f64 / (1u64 << 30) as f64
        );
        println!(
            "largest batch that fits (seq {}): {}",
            p.seq, ans["max_batch"]
        );
        println!(
            "longest sequence that fits (batch {}): {}",
            p.batch, ans["max_seq"]
        );
        match ans["min_devices"].as_u64() {
            Some(n) => println!("fewest devices ({:?} sharding): {n}", p.sharding),
            None => println!(
                "fewest devices: none up to 4096 fit (use --sharding full or --cpu-offload)"
            ),
        }
    }
    Ok(())
}
