//! `qlora train`: LoRA / QLoRA fine-tuning on the frozen (4-bit) base.
//!
//! Every flag is also a key of `--config train.toml` (same name, `-` or `_`);
//! flags given on the command line win over the file. With `--init-adapter`,
//! rank, alpha, targets and rsLoRA come from that adapter's config and
//! `--lora-dropout` defaults to 0 (PEFT's parity runs train without dropout).
//! The work is `qlora_train::session::run` (launch's phases, `Trainer::run`, samples);
//! this module reads flags, and `crate::train_view` prints.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::ArgAction;
use qlora_train::launch::TrainRequest;
use qlora_train::{LoraOptions, TrainOptions};
use serde::{Deserialize, Serialize};

use crate::train_view::TerminalView;

#[derive(clap::Args, Debug, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Args {
    /// Base model: an HF folder (config.json + safetensors, or a bnb-4bit checkpoint).
    #[arg(long)]
    pub model: Option<String>,
    /// Training data: JSONL or a JSON array (pre-tokenized rows, alpaca, chat, prompt/completion or text).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Output folder (metrics.jsonl, adapter/, checkpoints, loss curve).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// A TOML file with any of these options (command-line flags override it).
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Data format: auto, pretokenized (more formats need the tokenizer crate).
    #[arg(long)]
    pub data_format: Option<String>,
    /// Held-out evaluation data (same formats as --data).
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    /// Fraction of --data held out for evaluation when --eval-data is not given [default: 0].
    #[arg(long)]
    pub eval_split: Option<f64>,
    /// Evaluate every N optimizer steps (and at the end) [default: 0 = only at the end].
    #[arg(long)]
    pub eval_every: Option<u64>,
    /// Start from this PEFT adapter (its r, alpha, targets, rsLoRA are used).
    #[arg(long)]
    pub init_adapter: Option<PathBuf>,
    /// Continue from a checkpoint folder written by an earlier run.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Base weights: native (a GGUF file's own blocks, as stored: no second rounding),
    /// none (f32), bf16, nf4, fp4 [default: native for a .gguf model, else nf4].
    #[arg(long)]
    pub quant: Option<String>,
    /// Where to compute: cpu or cuda[:N] [default: cpu]. cuda needs a qlora built with
    /// `--features cuda`, the NVIDIA driver and the CUDA 13 cuBLAS + NVRTC libraries on the
    /// loader path (LD_LIBRARY_PATH; the PyPI wheels' nvidia/cu13/lib works); see the README.
    #[arg(long)]
    pub device: Option<String>,
    /// Arithmetic of the frozen base products: f32, or bf16 (weights and activations rounded
    /// to bf16, f32 accumulation; on AMX tiles or AVX512-BF16 where the CPU has them, where
    /// LoRA's products with the output gradient take bf16 operands too; else the f32 products)
    /// [default: f32].
    #[arg(long)]
    pub compute_dtype: Option<String>,
    /// LoRA rank [default: 16 (qlora_train::DEFAULT_RANK)].
    #[arg(long, short = 'r')]
    pub rank: Option<usize>,
    /// LoRA alpha [default: 32].
    #[arg(long)]
    pub alpha: Option<f64>,
    /// Target modules: all-linear, a comma list (q_proj,v_proj), or re:<regex> [default: all-linear].
    #[arg(long)]
    pub target: Option<String>,
    /// Dropout on the LoRA input path [default: 0.05; 0 with --init-adapter].
    #[arg(long)]
    pub lora_dropout: Option<f64>,
    /// rsLoRA scaling alpha/sqrt(r).
    #[arg(long, action = ArgAction::SetTrue)]
    pub rslora: bool,
    /// DoRA (PEFT's use_dora): also train a magnitude vector per adapted linear, initialised
    /// to the row norms of its base weight; saved as PEFT's `lora_magnitude_vector` (CPU only).
    #[arg(long, action = ArgAction::SetTrue)]
    pub use_dora: bool,
    /// LoRA A init: default (kaiming-uniform) or gaussian.
    #[arg(long)]
    pub init: Option<String>,
    /// Rows per micro-batch [default: 4].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Micro-batches per optimizer step [default: 1].
    #[arg(long)]
    pub grad_accum: Option<usize>,
    /// Optimizer steps [default: one epoch, or from --epochs].
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// Epochs, used when --max-steps is not given [default: 1].
    #[arg(long)]
    pub epochs: Option<f64>,
    /// Stop after this step (the schedule still spans --max-steps); for interrupting and resuming.
    #[arg(long, hide = true)]
    pub stop_at_step: Option<u64>,
    /// Peak learning rate [default: 2e-4].
    #[arg(long)]
    pub lr: Option<f64>,
    /// constant, linear or cosine [default: cosine].
    #[arg(long)]
    pub schedule: Option<String>,
    /// Linear warmup steps [default: 0].
    #[arg(long)]
    pub warmup_steps: Option<u64>,
    /// AdamW decoupled weight decay [default: 0].
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Global gradient-norm clipping, 0 = off [default: 1.0].
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    /// AdamW betas and epsilon [defaults: 0.9, 0.999, 1e-8].
    #[arg(long)]
    pub beta1: Option<f64>,
    #[arg(long)]
    pub beta2: Option<f64>,
    #[arg(long)]
    pub eps: Option<f64>,
    /// Seed for init, shuffling, dropout and the eval split [default: 0].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Keep the data order.
    #[arg(long, action = ArgAction::SetTrue)]
    pub no_shuffle: bool,
    /// Truncate examples to this many tokens [default: 1024].
    #[arg(long)]
    pub max_seq_len: Option<usize>,
    /// Pack several short examples into one row of --max-seq-len.
    #[arg(long, action = ArgAction::SetTrue)]
    pub packing: bool,
    /// Also compute the loss on prompt tokens.
    #[arg(long, action = ArgAction::SetTrue)]
    pub train_on_inputs: bool,
    /// A malformed data line: skip (reported and counted) or error [default: error].
    #[arg(long)]
    pub on_bad_line: Option<String>,
    /// Save a checkpoint every N steps (always one at the end) [default: 0 = end only].
    #[arg(long)]
    pub save_every: Option<u64>,
    /// Gradient checkpointing: keep each layer's input and attention tensors, recompute its MLP
    /// in the backward [default: on for > 4 layers].
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub gradient_checkpointing: Option<bool>,
    /// Under `mpirun -n N` (N > 1): how the frozen base is split across the
    /// processes: `full` (FSDP-style: each process holds 1/N of every layer's
    /// projection weights and their quantization statistics and gathers a layer
    /// right before each use) or `none` (every process holds the whole base)
    /// [default: full, none for GGUF blocks held as stored (--quant native)].
    #[arg(long, value_name = "none|full")]
    pub shard: Option<String>,
    /// Keep shards, gradients and optimizer state in host memory between uses
    /// (GPUs; a no-op for this CPU trainer, accepted for the plan's spelling).
    #[arg(long, action = ArgAction::SetTrue)]
    #[serde(alias = "cpu_offload")]
    pub cpu_offload: bool,
    /// Overwrite a non-empty --out folder.
    #[arg(long, action = ArgAction::SetTrue)]
    pub force: bool,
    /// No progress bar (also off when stderr is not a terminal).
    #[arg(long, action = ArgAction::SetTrue)]
    pub no_progress: bool,
}

pub fn run(args: Args) -> Result<()> {
    qlora_dist::run_on_env(|comm| run_on(args, comm))
}

/// The flags (over the `--config` file) as the library's request.
fn request(a: Args) -> Result<TrainRequest> {
    Ok(TrainRequest {
        model: a.model.context("--model is required")?,
        data: a.data.context("--data is required")?,
        out: a.out.context("--out is required")?,
        data_format: a.data_format,
        eval_data: a.eval_data,
        eval_split: a.eval_split,
        eval_every: a.eval_every,
        init_adapter: a.init_adapter,
        resume: a.resume,
        quant: a.quant,
        device: a.device,
        compute_dtype: a.compute_dtype,
        lora: LoraOptions {
            rank: a.rank,
            alpha: a.alpha,
            target: a.target,
            rslora: a.rslora,
            dora: a.use_dora,
            init: a.init,
        },
        train: TrainOptions {
            batch_size: a.batch_size,
            grad_accum: a.grad_accum,
            max_steps: a.max_steps,
            epochs: a.epochs,
            lr: a.lr,
            schedule: a.schedule,
            warmup_steps: a.warmup_steps,
            weight_decay: a.weight_decay,
            beta1: a.beta1,
            beta2: a.beta2,
            eps: a.eps,
            max_grad_norm: a.max_grad_norm,
            seed: a.seed,
            no_shuffle: a.no_shuffle,
            lora_dropout: a.lora_dropout,
            gradient_checkpointing: a.gradient_checkpointing,
        },
        max_seq_len: a.max_seq_len,
        packing: a.packing,
        train_on_inputs: a.train_on_inputs,
        on_bad_line: a.on_bad_line,
        save_every: a.save_every,
        stop_at_step: a.stop_at_step,
        shard: a.shard,
        cpu_offload: a.cpu_offload,
        force: a.force,
    })
}

fn run_on(args: Args, comm: &dyn qlora_dist::Communicator) -> Result<()> {
    let no_progress = args.no_progress;
    let req = request(with_config_file(args)?)?;
    qlora_train::session::run(&req, comm, &mut TerminalView::new(!no_progress))
}

/// `--config`: the file's options under the command line's (see [`crate::config_file`]).
fn with_config_file(a: Args) -> Result<Args> {
    crate::config_file::overlay(a.config.clone(), a)
}

#[cfg(test)]
#[path = "train_toml_fuzz.rs"]
mod toml_fuzz;
