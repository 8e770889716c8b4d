//! `qlora train`: LoRA / QLoRA fine-tuning on the frozen (4-bit) base.
//!
//! Every flag is also a key of `--config train.toml` (same name, `-` or `_`);
//! flags given on the command line win over the file. With `--init-adapter`,
//! rank, alpha, targets and rsLoRA come from that adapter's config and
//! `--lora-dropout` defaults to 0 (PEFT's parity runs train without dropout).
//! The work is `qlora_infer::load`, `qlora_train::prepare_data` / `adapter_for` and
//! `Trainer::run`; this module reads flags and prints.

use std::mem::take;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::ArgAction;
use qlora_data::formats::{DatasetOptions, Format, OnBadLine, TextTokenizer};
use qlora_infer::NeedTokenizer;
use qlora_model::{Adapter, QuantMode};
use qlora_tokenizer::Tokenizer;
use qlora_train::{DataOptions, LoraOptions, RunOptions, TrainOptions, Trainer};
use serde::{Deserialize, Serialize};

use crate::train_view;

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
    /// to bf16, f32 accumulation; AMX tiles where the CPU has them) [default: f32].
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
    /// Gradient checkpointing: recompute each layer in the backward [default: on for > 4 layers].
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub gradient_checkpointing: Option<bool>,
    /// Under `mpirun -n N` (N > 1): how the frozen base is split across the
    /// processes. Only `none` (every process holds the whole base; data
    /// parallelism) is implemented; `full` (FSDP-style sharding) is not yet.
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
    let comm = qlora_dist::from_env()?;
    let res = run_on(args, &*comm);
    if let Err(e) = &res {
        if comm.size() > 1 {
            // the other ranks may be waiting in a collective: stop them all
            eprintln!("error (rank {} of {}): {e:#}", comm.rank(), comm.size());
            comm.abort(1);
        }
    }
    res
}

fn run_on(args: Args, comm: &dyn qlora_dist::Communicator) -> Result<()> {
    let a = with_config_file(args)?;
    let world = comm.size();
    let main = comm.rank() == 0;
    match a.shard.as_deref() {
        None | Some("none") => {}
        Some("full") => bail!(
            "--shard full (FSDP-style sharding of the frozen base) is not implemented yet; \
             use --shard none (every process holds the whole base)"
        ),
        Some(o) => bail!("unknown --shard `{o}` (none or full)"),
    }
    if a.cpu_offload && main {
        eprintln!("note: --cpu-offload is a no-op for the CPU trainer (everything is in host memory already)");
    }
    let model_ref = a.model.clone().context("--model is required")?;
    let data_path = a.data.clone().context("--data is required")?;
    let out = a.out.clone().context("--out is required")?;
    let quant: Option<QuantMode> = a.quant.as_deref().map(str::parse).transpose()?;
    let on_bad: OnBadLine = a.on_bad_line.as_deref().unwrap_or("error").parse()?;
    qlora_train::RunSettings {
        epochs: a.epochs,
        eval_split: a.eval_split,
        max_seq_len: a.max_seq_len,
        max_grad_norm: a.max_grad_norm,
        lora_dropout: a.lora_dropout,
        rank: a.rank,
        alpha: a.alpha,
    }
    .validate()?;
    if main {
        qlora_train::outdir::check_output_dir(&out, a.resume.as_deref(), a.force)?;
    }

    // ---- model (the tokenizer is needed to read text data)
    let t_load = std::time::Instant::now();
    // QLORA_MEM_TRACE=1|reset: resident memory at phase boundaries (plan validation).
    qlora_memory::rss::trace("start");
    let device: qlora_model::Device = a.device.as_deref().unwrap_or("cpu").parse()?;
    let compute: qlora_model::BaseCompute = a
        .compute_dtype
        .as_deref()
        .unwrap_or("f32")
        .parse()
        .context("--compute-dtype")?;
    let mut loaded = qlora_infer::load(&model_ref, quant, false, NeedTokenizer::IfPresent)?;
    loaded.model.set_base_compute(compute);
    loaded.model.to_device(device)?;
    let (model, tok) = (&loaded.model, loaded.tokenizer.as_ref());
    let quant_s = loaded.quant.to_string();
    qlora_memory::rss::trace("model-loaded");
    let load_s = t_load.elapsed().as_secs_f64();

    // ---- data
    let max_len = a.max_seq_len.unwrap_or(qlora_train::DEFAULT_MAX_SEQ_LEN);
    let seed = a.seed.unwrap_or(0);
    let dopts = DataOptions {
        load: DatasetOptions {
            format: a
                .data_format
                .as_deref()
                .unwrap_or("auto")
                .parse::<Format>()?,
            train_on_inputs: a.train_on_inputs,
            on_bad_line: on_bad,
            // every row checked against the model now, not when its batch comes
            vocab_size: Some(model.config.vocab_size),
            max_len: Some(max_len),
        },
        max_seq_len: max_len,
        packing: a.packing,
        eval_data: a.eval_data.clone(),
        eval_split: a.eval_split.unwrap_or(0.0),
        seed,
    };
    let text_tok = tok.map(|t| t as &dyn TextTokenizer);
    // Pre-tokenized data needs no tokenizer; for text data a tokenizer that
    // failed to load is the real cause, so say why.
    let tok_error = |e: anyhow::Error| -> anyhow::Error {
        let dir = Path::new(&model_ref);
        if tok.is_none() && dir.join("tokenizer.json").exists() {
            if let Err(te) = Tokenizer::from_folder(dir) {
                return e.context(format!(
                    "the tokenizer of {model_ref} could not be loaded: {te}"
                ));
            }
        }
        e
    };
    let mut data = qlora_train::prepare_data(&data_path, &dopts, text_tok).map_err(tok_error)?;
    for s in &data.skipped {
        eprintln!("skipped {s}");
    }

    // ---- adapter
    let lora = LoraOptions {
        rank: a.rank,
        alpha: a.alpha,
        target: a.target.clone(),
        rslora: a.rslora,
        dora: a.use_dora,
        init: a.init.clone(),
    };
    if a.init_adapter.is_some() && lora.any_shape_given() {
        eprintln!(
            "note: --rank/--alpha/--target/--rslora/--use-dora are taken from the --init-adapter config"
        );
    }
    let init_from = a.init_adapter.as_deref();
    let (peft, mut adapter) =
        qlora_train::adapter_for(init_from, &lora, &model.config, seed, &model_ref)?;
    if peft.use_dora && init_from.is_none() {
        // DoRA's magnitude starts at ‖W‖ per output row (PEFT's init; B = 0).
        model.init_dora(&mut adapter)?;
    }

    let knobs = TrainOptions {
        batch_size: a.batch_size,
        grad_accum: a.grad_accum,
        max_steps: a.max_steps,
        epochs: a.epochs,
        lr: a.lr,
        schedule: a.schedule.clone(),
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
    };
    let cfg = knobs.train_config(data.rows.len(), &model.config, init_from.is_some())?;
    let identity = qlora_train::identity(&model_ref, &model.config, &quant_s, &data.rows);
    cfg.validate()?;
    if main {
        qlora_train::prepare_output_dir(&out, a.resume.as_deref(), a.force)?;
    }
    let (rows, eval_rows) = (take(&mut data.rows), take(&mut data.eval_rows));
    let trainer = match &a.resume {
        Some(ck) => {
            let t = Trainer::resume(model, cfg, identity, rows, eval_rows, ck)?;
            t.check_same_adapter(&peft)
                .with_context(|| format!("refusing checkpoint {}", ck.display()))?;
            t
        }
        None => Trainer::new(model, cfg, identity, peft, adapter, rows, eval_rows)?,
    };
    let mut trainer = trainer.with_communicator(comm)?;
    qlora_memory::rss::trace("trainer-ready");
    let opts = RunOptions {
        out: out.clone(),
        stop_at_step: a.stop_at_step,
        eval_every: a.eval_every.unwrap_or(0),
        save_every: a.save_every.unwrap_or(0),
        resumed_from: a.resume.clone(),
        follower: !main,
    };
    if !main {
        // ranks > 0 train in step with rank 0 and write nothing
        trainer.run(&opts, &mut qlora_train::Silent)?;
        return Ok(());
    }
    if world > 1 {
        let (b, acc) = (trainer.cfg.batch_size, trainer.cfg.grad_accum);
        println!(
            "parallel   {world} processes ({}), data parallel: {b} rows per process per micro-batch, {} per step; shard none",
            comm.backend(),
            b * acc * world
        );
    }

    let base = format!("{model_ref} (loaded in {load_s:.1}s, base weights {quant_s}");
    train_view::print_summary(&trainer, &base, &data, a.packing, max_len);

    // ---- train, with greedy samples of held-out prompts before and after
    const SAMPLE_TOKENS: usize = 48;
    let prompts = &data.sample_prompts;
    let sample = |t: &Tokenizer, ad: &Adapter| {
        qlora_infer::greedy_samples(model, t, Some(ad), prompts, SAMPLE_TOKENS)
    };
    let before = match tok {
        Some(t) if !prompts.is_empty() && trainer.step == 0 => Some(sample(t, &trainer.adapter)?),
        _ => None,
    };
    let mut progress = train_view::Progress::new(&trainer, !a.no_progress);
    let report = trainer.run(&opts, &mut progress)?;
    progress.bar.finish_and_clear();
    qlora_memory::rss::trace("trained");
    let plot = out.join("loss.svg");
    if let Err(e) = crate::plot::loss_curve(&report.history, &plot) {
        eprintln!("warning: could not draw the loss curve: {e:#}");
    }
    println!(
        "done       {} steps; final train loss {}; adapter in {}; metrics in {}; loss curve {}",
        trainer.step,
        report
            .history
            .last()
            .map(|m| format!("{:.4}", m.loss))
            .unwrap_or_default(),
        report.adapter_dir.display(),
        report.metrics_path.display(),
        plot.display()
    );
    if let (Some(t), Some(before)) = (tok, before) {
        let after = sample(t, &trainer.adapter)?;
        train_view::print_samples(t, prompts, &before, &after);
        let md = qlora_infer::samples_markdown(t, prompts, &before, &after, SAMPLE_TOKENS);
        qlora_formats::write_atomic(&out.join("samples.md"), md.as_bytes())?;
    } else if tok.is_none() {
        println!("(no tokenizer with this model: sample generations skipped)");
    }
    Ok(())
}

/// `--config`: the file's options under the command line's (see [`crate::config_file`]).
fn with_config_file(a: Args) -> Result<Args> {
    crate::config_file::overlay(a.config.clone(), a)
}

#[cfg(test)]
#[path = "train_toml_fuzz.rs"]
mod toml_fuzz;
