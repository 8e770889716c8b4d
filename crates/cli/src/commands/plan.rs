//! `qlora plan <model-ref> [training flags]`: per-device training memory,
//! and with `--budget` whether it fits, the largest batch / sequence that fit
//! and the fewest devices needed (`qlora_memory::planner`).
//!
//! The training flags are `qlora train`'s spellings and defaults (`--batch-size`,
//! `--max-seq-len`, `--target`, `--gradient-checkpointing`, `--rank`), so a train
//! command's flags can be pasted here; the older `--batch`, `--seq`, `--targets`,
//! `--checkpointing` still work.

use anyhow::Result;
use qlora_memory::PlanRequest;

use crate::flags::DoubleQuant;
use crate::text::group;

#[derive(clap::Args)]
pub struct Args {
    /// config.json, model folder, .safetensors, .gguf, preset or hub id.
    #[arg(required_unless_present = "model_flag")]
    pub model: Option<String>,
    /// The model, as `qlora train --model` takes it (instead of the positional).
    #[arg(long = "model", conflicts_with = "model")]
    pub model_flag: Option<String>,
    /// full | lora | qlora
    #[arg(long, default_value = "qlora")]
    pub method: String,
    /// LoRA rank (train's default).
    #[arg(long, short = 'r', default_value_t = qlora_train::DEFAULT_RANK as u64)]
    pub rank: u64,
    /// DoRA (`qlora train --use-dora`): count the magnitude vectors (one value per output
    /// feature of every target), their gradients and optimizer states, and DoRA's activations.
    #[arg(long)]
    pub use_dora: bool,
    /// LoRA dropout (train's default for a new adapter): on CPU its per-thread mask buffers.
    #[arg(long, default_value_t = qlora_train::DEFAULT_LORA_DROPOUT)]
    pub lora_dropout: f64,
    /// LoRA targets: all-linear (q,k,v,o,gate,up,down) or a comma list of short names.
    #[arg(long, alias = "targets", default_value = qlora_train::DEFAULT_TARGET)]
    pub target: String,
    /// adamw (f32 states) | adamw8bit | sgd
    #[arg(long, default_value = "adamw")]
    pub optimizer: String,
    /// Micro-batch per device (the plan's default stays 1; `qlora train`'s is 4).
    #[arg(long = "batch-size", alias = "batch", short = 'b', default_value_t = 1)]
    pub batch_size: u64,
    /// Sequence length (train's default).
    #[arg(long = "max-seq-len", alias = "seq", short = 's', default_value_t = qlora_train::DEFAULT_MAX_SEQ_LEN as u64)]
    pub max_seq_len: u64,
    /// Gradient accumulation steps (no extra memory: gradients persist anyway).
    #[arg(long, default_value_t = 1)]
    pub grad_accum: u64,
    /// Gradient checkpointing (the CPU trainer keeps each layer's input and attention tensors
    /// and recomputes its MLP; --gpu plans keep the input only): `--gradient-checkpointing`,
    /// `--gradient-checkpointing true|false` [default: as `qlora train`, on for > 4 layers].
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub gradient_checkpointing: Option<bool>,
    /// Old spelling of `--gradient-checkpointing`.
    #[arg(long, hide = true)]
    pub checkpointing: bool,
    /// Compute/activation dtype: f32 (default on CPU) | bf16 | f16 (default with --gpu).
    #[arg(long)]
    pub compute: Option<String>,
    /// Number of devices.
    #[arg(long, default_value_t = 1)]
    pub devices: u64,
    /// none (DDP) | full (FSDP FULL_SHARD; the CPU trainer: `qlora train --shard full`,
    /// 1/N of every layer's frozen projections per process) | grad-op (SHARD_GRAD_OP, GPU plans).
    /// `--shard` is `qlora train`'s spelling.
    #[arg(long, alias = "shard", default_value = "full")]
    pub sharding: String,
    /// Offload (sharded) parameters, gradients and optimizer states to host RAM.
    #[arg(long)]
    pub cpu_offload: bool,
    /// Plan for a GPU (bf16 compute, CUDA context, FSDP buffers) instead of
    /// this project's CPU trainer.
    #[arg(long)]
    pub gpu: bool,
    /// The frozen base with --method qlora: nf4 | fp4, or native (a .gguf model's own
    /// blocks at their stored size) [default: native for a .gguf model, else nf4].
    /// (`qlora train --quant` names the base's storage: none/bf16 there is `--method lora`.)
    #[arg(long)]
    pub quant: Option<String>,
    /// bnb block size.
    #[arg(long, default_value_t = 64)]
    pub blocksize: u64,
    #[command(flatten)]
    pub double_quant: DoubleQuant,
    /// Fixed runtime overhead per device (default: measured process baseline on
    /// CPU, 512 MiB CUDA context with --gpu), e.g. 600MiB.
    #[arg(long)]
    pub overhead: Option<String>,
    /// Worker threads of the CPU trainer (default: this machine's CPUs).
    #[arg(long)]
    pub threads: Option<u64>,
    /// Memory per device, e.g. 24GiB or 24GB (GB = 10^9 bytes, GiB = 2^30; a GPU sold as
    /// "24 GB" has 24 GiB).
    #[arg(long)]
    pub budget: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

fn size(s: &str) -> Result<u64> {
    qlora_formats::parse_bytes(s).map_err(anyhow::Error::msg)
}

fn request(a: &Args) -> Result<PlanRequest> {
    Ok(PlanRequest {
        method: a.method.clone(),
        rank: a.rank,
        target: a.target.clone(),
        dora: a.use_dora,
        lora_dropout: a.lora_dropout,
        optimizer: a.optimizer.clone(),
        batch: a.batch_size,
        seq: a.max_seq_len,
        grad_accum: a.grad_accum,
        checkpointing: a.gradient_checkpointing.or(a.checkpointing.then_some(true)),
        compute: a.compute.clone(),
        devices: a.devices,
        sharding: a.sharding.clone(),
        cpu_offload: a.cpu_offload,
        gpu: a.gpu,
        quant: a.quant.clone(),
        blocksize: a.blocksize,
        double_quant: a.double_quant.enabled(),
        overhead: a.overhead.as_deref().map(size).transpose()?,
        threads: a.threads,
    })
}

pub fn run(a: Args) -> Result<()> {
    let model = a
        .model
        .as_deref()
        .or(a.model_flag.as_deref())
        .unwrap_or_default();
    let req = request(&a)?;
    let p = req.input(model)?;
    let checkpointing =
        |c: &_| (req.checkpointing).unwrap_or_else(|| qlora_train::default_checkpointing(c));
    let budget = a.budget.as_deref().map(size).transpose()?;
    let r = qlora_memory::plan_model(model, &p, checkpointing, budget)?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::to_value(&r)?)?
        );
        return Ok(());
    }
    let (result, p) = (&r.plan, &r.plan.input);
    let b = &result.per_device;
    println!("model:      {} ({})", r.model, r.kind);
    println!(
        "setup:      {:?}, r={}, targets {}, dropout {}, {:?}, batch {} × seq {}, grad-accum {}, checkpointing {}, compute {:?}, {} device(s), sharding {:?}{}{}",
        p.method,
        p.rank,
        p.targets.join(","),
        p.lora_dropout,
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
    if p.native {
        println!("base:       the GGUF file's own blocks (--quant native), at their stored size");
    }
    println!("trainable:  {} parameters", group(result.trainable_count));
    println!();
    let rows = b.rows();
    // the label column as wide as the longest label, so every row lines up
    let w = rows
        .iter()
        .map(|(k, _)| k.chars().count())
        .max()
        .unwrap_or(0)
        .max(28);
    println!("{:<w$}{:>18}{:>12}", "per device", "bytes", "GiB");
    for (k, v) in rows {
        println!(
            "{:<w$}{:>18}{:>12.3}",
            k,
            group(v),
            v as f64 / (1u64 << 30) as f64
        );
    }
    println!("(* the larger of the two transient phases; only it counts in the total)");
    if b.host_offloaded > 0 {
        println!(
            "{:<w$}{:>18}{:>12.3}",
            "(host RAM, offloaded)",
            group(b.host_offloaded),
            b.host_offloaded as f64 / (1u64 << 30) as f64
        );
    }
    if let Some(ans) = &r.budget {
        println!();
        println!(
            "budget {:.2} GiB: {} (margin {:+.2} GiB)",
            ans.budget_bytes as f64 / (1u64 << 30) as f64,
            if ans.fits { "fits" } else { "does NOT fit" },
            ans.margin_bytes as f64 / (1u64 << 30) as f64
        );
        println!("largest batch that fits (seq {}): {}", p.seq, ans.max_batch);
        println!(
            "longest sequence that fits (batch {}): {}",
            p.batch, ans.max_seq
        );
        match ans.min_devices {
            Some(n) => println!("fewest devices ({:?} sharding): {n}", p.sharding),
            None => println!(
                "fewest devices: none up to 4096 fit (use --sharding full or --cpu-offload)"
            ),
        }
    }
    Ok(())
}
