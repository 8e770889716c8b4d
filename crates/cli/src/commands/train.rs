//! `qlora train`: LoRA / QLoRA fine-tuning on the frozen (4-bit) base.
//!
//! Every flag is also a key of `--config train.toml` (same name, `-` or `_`);
//! flags given on the command line win over the file. With `--init-adapter`,
//! rank, alpha, targets and rsLoRA come from that adapter's config and
//! `--lora-dropout` defaults to 0 (PEFT's parity runs train without dropout).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use clap::ArgAction;
use qlora_data::formats::{
    self, Dataset, DatasetOptions, Format, Message, OnBadLine, TextTokenizer,
};
use qlora_data::rows::{pack, split_eval, truncate, Row};
use qlora_data::Example;
use qlora_lora::{init_adapter, load_adapter, InitKind, PeftConfig, TargetModules};
use qlora_model::{LoadOptions, Model, QuantMode};
use qlora_tokenizer::{ChatMessage, Tokenizer};
use qlora_train::{
    checkpoint_dir, fnv_hex, rows_hash, AdamW, Identity, ScheduleKind, StepMetrics, TrainConfig,
    Trainer,
};
use serde::Deserialize;

#[derive(clap::Args, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Args {
    /// Base model: an HF folder (config.json + safetensors, or a bnb-4bit checkpoint).
    #[arg(long)]
    #[serde(alias = "model")]
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
    #[serde(alias = "data_format")]
    pub data_format: Option<String>,
    /// Held-out evaluation data (same formats as --data).
    #[arg(long)]
    #[serde(alias = "eval_data")]
    pub eval_data: Option<PathBuf>,
    /// Fraction of --data held out for evaluation when --eval-data is not given [default: 0].
    #[arg(long)]
    #[serde(alias = "eval_split")]
    pub eval_split: Option<f64>,
    /// Evaluate every N optimizer steps (and at the end) [default: 0 = only at the end].
    #[arg(long)]
    #[serde(alias = "eval_every")]
    pub eval_every: Option<u64>,
    /// Start from this PEFT adapter (its r, alpha, targets, rsLoRA are used).
    #[arg(long)]
    #[serde(alias = "init_adapter")]
    pub init_adapter: Option<PathBuf>,
    /// Continue from a checkpoint folder written by an earlier run.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Base weights: none (f32), bf16, nf4, fp4 [default: nf4].
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
    #[serde(alias = "compute_dtype")]
    pub compute_dtype: Option<String>,
    /// LoRA rank [default: 16].
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
    #[serde(alias = "lora_dropout")]
    pub lora_dropout: Option<f64>,
    /// rsLoRA scaling alpha/sqrt(r).
    #[arg(long, action = ArgAction::SetTrue)]
    pub rslora: bool,
    /// LoRA A init: default (kaiming-uniform) or gaussian.
    #[arg(long)]
    pub init: Option<String>,
    /// Rows per micro-batch [default: 4].
    #[arg(long)]
    #[serde(alias = "batch_size")]
    pub batch_size: Option<usize>,
    /// Micro-batches per optimizer step [default: 1].
    #[arg(long)]
    #[serde(alias = "grad_accum")]
    pub grad_accum: Option<usize>,
    /// Optimizer steps [default: one epoch, or from --epochs].
    #[arg(long)]
    #[serde(alias = "max_steps")]
    pub max_steps: Option<u64>,
    /// Epochs, used when --max-steps is not given [default: 1].
    #[arg(long)]
    pub epochs: Option<f64>,
    /// Stop after this step (the schedule still spans --max-steps); for interrupting and resuming.
    #[arg(long, hide = true)]
    #[serde(alias = "stop_at_step")]
    pub stop_at_step: Option<u64>,
    /// Peak learning rate [default: 2e-4].
    #[arg(long)]
    pub lr: Option<f64>,
    /// constant, linear or cosine [default: cosine].
    #[arg(long)]
    pub schedule: Option<String>,
    /// Linear warmup steps [default: 0].
    #[arg(long)]
    #[serde(alias = "warmup_steps")]
    pub warmup_steps: Option<u64>,
    /// AdamW decoupled weight decay [default: 0].
    #[arg(long)]
    #[serde(alias = "weight_decay")]
    pub weight_decay: Option<f64>,
    /// Global gradient-norm clipping, 0 = off [default: 1.0].
    #[arg(long)]
    #[serde(alias = "max_grad_norm")]
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
    #[serde(alias = "no_shuffle")]
    pub no_shuffle: bool,
    /// Truncate examples to this many tokens [default: 1024].
    #[arg(long)]
    #[serde(alias = "max_seq_len")]
    pub max_seq_len: Option<usize>,
    /// Pack several short examples into one row of --max-seq-len.
    #[arg(long, action = ArgAction::SetTrue)]
    pub packing: bool,
    /// Also compute the loss on prompt tokens.
    #[arg(long, action = ArgAction::SetTrue)]
    #[serde(alias = "train_on_inputs")]
    pub train_on_inputs: bool,
    /// A malformed data line: skip (reported and counted) or error [default: error].
    #[arg(long)]
    #[serde(alias = "on_bad_line")]
    pub on_bad_line: Option<String>,
    /// Save a checkpoint every N steps (always one at the end) [default: 0 = end only].
    #[arg(long)]
    #[serde(alias = "save_every")]
    pub save_every: Option<u64>,
    /// Gradient checkpointing: recompute each layer in the backward [default: on for > 4 layers].
    #[arg(long)]
    #[serde(alias = "gradient_checkpointing")]
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
    #[serde(alias = "no_progress")]
    pub no_progress: bool,
}

macro_rules! merge_opt {
    ($cli:ident, $file:ident, $($f:ident),*) => { $( if $cli.$f.is_none() { $cli.$f = $file.$f.take(); } )* };
}
macro_rules! merge_flag {
    ($cli:ident, $file:ident, $($f:ident),*) => { $( $cli.$f |= $file.$f; )* };
}

/// Apply `--config`: keys from the file fill what the command line left unset.
fn with_config_file(mut a: Args) -> Result<Args> {
    let Some(path) = a.config.clone() else {
        return Ok(a);
    };
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    // accept kebab-case keys too
    let table: toml::Table = text
        .parse()
        .with_context(|| format!("{}: invalid TOML", path.display()))?;
    let table: toml::Table = table
        .into_iter()
        .map(|(k, v)| (k.replace('-', "_"), v))
        .collect();
    let mut f: Args = toml::Value::Table(table)
        .try_into()
        .with_context(|| format!("{}: invalid option", path.display()))?;
    merge_opt!(
        a,
        f,
        model,
        data,
        out,
        data_format,
        eval_data,
        eval_split,
        eval_every,
        init_adapter,
        resume,
        quant,
        device,
        compute_dtype,
        rank,
        alpha,
        target,
        lora_dropout,
        init,
        batch_size,
        grad_accum,
        max_steps,
        epochs,
        stop_at_step,
        lr,
        schedule,
        warmup_steps,
        weight_decay,
        max_grad_norm,
        beta1,
        beta2,
        eps,
        seed,
        max_seq_len,
        on_bad_line,
        save_every,
        gradient_checkpointing,
        shard
    );
    merge_flag!(
        a,
        f,
        rslora,
        no_shuffle,
        packing,
        train_on_inputs,
        force,
        no_progress,
        cpu_offload
    );
    Ok(a)
}

/// `qlora_tokenizer::Tokenizer` seen through the data pipeline's trait.
struct Tok<'a>(&'a Tokenizer);

impl TextTokenizer for Tok<'_> {
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.0.encode(text, false)?)
    }
    fn bos_id(&self) -> Option<u32> {
        // the BOS the tokenizer's post-processor would add (Llama's <s>; none for SmolLM2)
        let with = self.0.encode("x", true).ok()?;
        let without = self.0.encode("x", false).ok()?;
        (with.len() > without.len() && with.ends_with(&without)).then(|| with[0])
    }
    fn eos_id(&self) -> Option<u32> {
        self.0.eos_token().and_then(|t| self.0.token_to_id(t))
    }
    fn render_chat(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let m: Vec<ChatMessage> = messages
            .iter()
            .map(|x| ChatMessage::new(x.role.clone(), x.content.clone()))
            .collect();
        Ok(self.0.apply_chat_template(&m, add_generation_prompt)?)
    }
}

/// Load and tokenize a data file; skipped records are reported on stderr.
pub(crate) fn load_examples(
    path: &Path,
    opts: &DatasetOptions,
    tok: Option<&Tokenizer>,
) -> Result<Dataset> {
    let t = tok.map(Tok);
    let l = formats::load(path, opts, t.as_ref().map(|t| t as &dyn TextTokenizer))?;
    for s in &l.skipped {
        eprintln!("skipped {s}");
    }
    Ok(l)
}

/// The base model and, where it has one, its tokenizer. HF folders load
/// without a tokenizer (pre-tokenized data needs none); GGUF files and hub ids
/// go through `qlora generate`'s loader.
fn load_model(model_ref: &str, quant: QuantMode) -> Result<(Model, Option<Tokenizer>)> {
    let p = Path::new(model_ref);
    if p.is_dir() && p.join("config.json").exists() {
        let m = Model::from_folder(p, &LoadOptions { quant })
            .with_context(|| format!("loading model {model_ref}"))?;
        let tok = Tokenizer::from_folder(p).ok().map(|mut t| {
            t.add_stop_ids(&m.config.eos_token_ids);
            t
        });
        return Ok((m, tok));
    }
    let (m, t, _) = crate::commands::generate::load_model(model_ref, quant, false)?;
    Ok((m, Some(t)))
}

fn model_identity(model_ref: &str, model: &Model, quant: &str, rows: &[Row]) -> Identity {
    Identity {
        model_ref: model_ref.to_string(),
        model_config_hash: fnv_hex(format!("{:?}", model.config).as_bytes()),
        quant: quant.to_string(),
        data_hash: rows_hash(rows),
    }
}

/// `qlora train`, alone or as one rank of `mpirun -n N qlora train …`
/// (data parallel: `--batch-size` per process; rank 0 writes every file).
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
    let quant_s = a.quant.clone().unwrap_or_else(|| "nf4".into());
    let quant: QuantMode = quant_s.parse()?;
    let format = a.data_format.clone().unwrap_or_else(|| "auto".into());
    let on_bad = a.on_bad_line.clone().unwrap_or_else(|| "error".into());
    ensure!(
        on_bad == "error" || on_bad == "skip",
        "--on-bad-line must be skip or error"
    );

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
    let (mut model, tok) = load_model(&model_ref, quant)?;
    model.set_base_compute(compute);
    model.to_device(device)?;
    qlora_memory::rss::trace("model-loaded");
    let load_s = t_load.elapsed().as_secs_f64();

    // ---- data
    let max_len = a.max_seq_len.unwrap_or(1024);
    let dopts = DatasetOptions {
        format: format.parse::<Format>()?,
        train_on_inputs: a.train_on_inputs,
        on_bad_line: on_bad.parse::<OnBadLine>()?,
        // every row checked against the model now, not when its batch comes
        vocab_size: Some(model.config.vocab_size),
        max_len: Some(max_len),
    };
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
    let loaded = load_examples(&data_path, &dopts, tok.as_ref()).map_err(tok_error)?;
    let n_skipped = loaded.skipped.len();
    let mut examples = loaded.examples;
    let n_trunc = truncate(&mut examples, max_len);
    let seed = a.seed.unwrap_or(0);
    let (train_ex, eval_ex) = match &a.eval_data {
        Some(p) => {
            let mut e = load_examples(p, &dopts, tok.as_ref())
                .map_err(tok_error)?
                .examples;
            truncate(&mut e, max_len);
            (examples, e)
        }
        None => split_eval(examples, a.eval_split.unwrap_or(0.0), seed),
    };
    let to_rows = |ex: Vec<Example>| -> Vec<Row> {
        if a.packing {
            pack(ex, max_len)
        } else {
            ex.into_iter().map(Row::single).collect()
        }
    };
    let n_train_ex = train_ex.len();
    let rows = to_rows(train_ex);
    let sample_prompts: Vec<Vec<u32>> = eval_ex.iter().take(3).filter_map(prompt_of).collect();
    let eval_rows: Vec<Row> = eval_ex.into_iter().map(Row::single).collect();
    ensure!(
        !rows.is_empty(),
        "{}: no training examples",
        data_path.display()
    );

    // ---- adapter
    let from_adapter = a.init_adapter.is_some();
    let (peft, adapter) = match &a.init_adapter {
        Some(dir) => {
            let (p, ad) = load_adapter(dir, Some(&model.config))
                .with_context(|| format!("loading --init-adapter {}", dir.display()))?;
            if a.rank.is_some() || a.alpha.is_some() || a.target.is_some() || a.rslora {
                eprintln!("note: --rank/--alpha/--target/--rslora are taken from the --init-adapter config");
            }
            (p, ad)
        }
        None => {
            let targets = TargetModules::parse_cli(a.target.as_deref().unwrap_or("all-linear"))?;
            let mut p = PeftConfig::new(a.rank.unwrap_or(16), a.alpha.unwrap_or(32.0), targets);
            p.use_rslora = a.rslora;
            p.init_lora_weights = match a.init.as_deref().unwrap_or("default") {
                "default" | "true" | "kaiming" => InitKind::Default,
                "gaussian" => InitKind::Gaussian,
                o => bail!("unknown --init `{o}` (default or gaussian)"),
            };
            p.base_model_name_or_path = Some(model_ref.clone());
            let ad = init_adapter(&p, &model.config, seed)?;
            (p, ad)
        }
    };

    let batch_size = a.batch_size.unwrap_or(4);
    let grad_accum = a.grad_accum.unwrap_or(1);
    let rows_per_step = batch_size * grad_accum;
    let max_steps = match a.max_steps {
        Some(s) => s,
        None => {
            let epochs = a.epochs.unwrap_or(1.0);
            ((rows.len() as f64 * epochs) / rows_per_step as f64)
                .ceil()
                .max(1.0) as u64
        }
    };
    let cfg = TrainConfig {
        batch_size,
        grad_accum,
        max_steps,
        lr: a.lr.unwrap_or(2e-4),
        schedule: a
            .schedule
            .as_deref()
            .unwrap_or("cosine")
            .parse::<ScheduleKind>()?,
        warmup_steps: a.warmup_steps.unwrap_or(0),
        adamw: AdamW {
            beta1: a.beta1.unwrap_or(0.9),
            beta2: a.beta2.unwrap_or(0.999),
            eps: a.eps.unwrap_or(1e-8),
            weight_decay: a.weight_decay.unwrap_or(0.0),
        },
        max_grad_norm: Some(a.max_grad_norm.unwrap_or(1.0)).filter(|&m| m > 0.0),
        seed,
        shuffle: !a.no_shuffle,
        lora_dropout: a
            .lora_dropout
            .unwrap_or(if from_adapter { 0.0 } else { 0.05 }),
        checkpointing: a
            .gradient_checkpointing
            .unwrap_or(model.config.num_hidden_layers > 4),
        pad_id: 0,
    };
    let identity = model_identity(&model_ref, &model, &quant_s, &rows);
    cfg.validate()?;
    if main {
        qlora_train::prepare_output_dir(&out, a.resume.as_deref(), a.force)?;
    }

    let trainer = match &a.resume {
        Some(ck) => {
            let t = Trainer::resume(&model, cfg, identity, rows, eval_rows, ck)?;
            t.check_same_adapter(&peft)
                .with_context(|| format!("refusing checkpoint {}", ck.display()))?;
            t
        }
        None => Trainer::new(&model, cfg, identity, peft, adapter, rows, eval_rows)?,
    };
    let mut trainer = trainer.with_communicator(comm)?;

    qlora_memory::rss::trace("trainer-ready");

    if !main {
        // ranks > 0 train in step with rank 0 and write nothing
        train_loop(&mut trainer, &a, &out, false)?;
        return Ok(());
    }
    if world > 1 {
        println!(
            "parallel   {world} processes ({}), data parallel: {} rows per process per micro-batch, {} per step; shard none",
            comm.backend(),
            batch_size,
            batch_size * grad_accum * world
        );
    }

    // ---- summary
    let trainable = trainer.adapter.num_params();
    let base_params: usize = base_param_count(&model);
    println!("model      {model_ref} (loaded in {load_s:.1}s, base weights {quant_s}, {:.1} MiB in memory)", model.weight_bytes() as f64 / (1 << 20) as f64);
    println!("device     {}", model.device_description());
    println!(
        "adapter    r={} alpha={} scaling={} dropout={} on {} modules: {} trainable params ({:.3}% of {})",
        trainer.adapter.config.r,
        trainer.adapter.config.lora_alpha,
        trainer.adapter.scaling(),
        trainer.cfg.lora_dropout,
        trainer.adapter.layers.len(),
        trainable,
        100.0 * trainable as f64 / (base_params + trainable) as f64,
        base_params
    );
    println!(
        "data       {} training examples in {} rows{}, {} eval examples; {} truncated to {max_len} tokens; {} bad records skipped",
        n_train_ex,
        trainer.num_rows(),
        if a.packing { " (packed)" } else { "" },
        trainer.eval_rows.len(),
        n_trunc,
        n_skipped
    );
    println!(
        "schedule   {} steps x {} rows ({}x{} accum), lr {} {:?} warmup {}, clip {:?}, checkpointing {}",
        trainer.cfg.max_steps,
        rows_per_step,
        batch_size,
        grad_accum,
        trainer.cfg.lr,
        trainer.cfg.schedule,
        trainer.cfg.warmup_steps,
        trainer.cfg.max_grad_norm,
        trainer.cfg.checkpointing
    );
    if trainer.step > 0 {
        println!("resuming   at step {}", trainer.step);
    }

    let before = match &tok {
        Some(t) if !sample_prompts.is_empty() && trainer.step == 0 => {
            Some(samples(&model, t, Some(&trainer.adapter), &sample_prompts)?)
        }
        _ => None,
    };
    train_loop(&mut trainer, &a, &out, true)?;
    if let (Some(t), Some(before)) = (&tok, before) {
        let after = samples(&model, t, Some(&trainer.adapter), &sample_prompts)?;
        let mut md =
            String::from("# Sample generations on held-out prompts (greedy, 48 tokens)\n\n");
        for ((p, b), a2) in sample_prompts.iter().zip(&before).zip(&after) {
            let prompt = t.decode(p, false).unwrap_or_default();
            md += &format!("## Prompt\n```\n{prompt}\n```\n**before:** {b}\n\n**after:** {a2}\n\n");
            println!(
                "prompt: {}\n  before: {b}\n  after:  {a2}",
                prompt.trim_end()
            );
        }
        qlora_formats::write_atomic(&out.join("samples.md"), md.as_bytes())?;
    } else if tok.is_none() {
        println!("(no tokenizer with this model: sample generations skipped)");
    }
    Ok(())
}

/// The prompt part of an example: the tokens before its first trained label.
fn prompt_of(e: &Example) -> Option<Vec<u32>> {
    let first = e
        .labels
        .iter()
        .position(|&l| l != qlora_data::IGNORE_INDEX)?;
    (first > 0).then(|| e.input_ids[..first].to_vec())
}

fn samples(
    model: &Model,
    tok: &Tokenizer,
    adapter: Option<&qlora_lora::Adapter>,
    prompts: &[Vec<u32>],
) -> Result<Vec<String>> {
    use crate::commands::generate::{generate, GenLimits, Sampler};
    prompts
        .iter()
        .map(|p| {
            let mut s = Sampler::new(0.0, 1.0, 0)?;
            let (ids, _) = generate(
                model,
                tok,
                adapter,
                p,
                GenLimits {
                    max_new_tokens: 48,
                    ignore_eos: false,
                },
                &mut s,
                |_| Ok(()),
            )?;
            Ok(tok.decode(&ids, true)?.trim().replace('\n', " "))
        })
        .collect()
}

fn base_param_count(model: &Model) -> usize {
    let c = &model.config;
    let per_layer: usize = c
        .linear_shapes()
        .iter()
        .map(|(_, [o, i])| o * i)
        .sum::<usize>()
        + 2 * c.hidden_size;
    let emb = c.vocab_size * c.hidden_size;
    emb * if c.tie_word_embeddings { 1 } else { 2 }
        + per_layer * c.num_hidden_layers
        + c.hidden_size
}

/// The step loop; only the `main` process (rank 0) writes files and reports.
fn train_loop(trainer: &mut Trainer<'_>, a: &Args, out: &Path, main: bool) -> Result<()> {
    if !main {
        let stop = a
            .stop_at_step
            .unwrap_or(u64::MAX)
            .min(trainer.cfg.max_steps);
        let eval_every = a.eval_every.unwrap_or(0);
        if trainer.step == 0 {
            trainer.evaluate()?;
        }
        while trainer.step < stop {
            let step = trainer.train_step()?.step;
            if (eval_every > 0 && step % eval_every == 0) || step == stop {
                trainer.evaluate()?;
            }
        }
        return Ok(());
    }
    let metrics_path = out.join("metrics.jsonl");
    let mut history: Vec<StepMetrics> = Vec::new();
    if trainer.step > 0 {
        // keep the lines of steps up to the checkpoint, drop later ones
        if let Ok(text) = std::fs::read_to_string(&metrics_path) {
            for line in text.lines() {
                if let Ok(m) = serde_json::from_str::<StepMetrics>(line) {
                    if m.step <= trainer.step {
                        history.push(m);
                    }
                }
            }
        }
    }
    // The kept lines replace the file in one step (a crash here keeps the old file).
    let mut kept = String::new();
    for m in &history {
        kept += &serde_json::to_string(m)?;
        kept.push('\n');
    }
    qlora_formats::write_atomic(&metrics_path, kept.as_bytes())?;
    let mut mf = std::fs::OpenOptions::new()
        .append(true)
        .open(&metrics_path)
        .with_context(|| format!("opening {}", metrics_path.display()))?;
    let stop = a
        .stop_at_step
        .unwrap_or(u64::MAX)
        .min(trainer.cfg.max_steps);
    let eval_every = a.eval_every.unwrap_or(0);
    let save_every = a.save_every.unwrap_or(0);
    let show = !a.no_progress && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let pb = indicatif::ProgressBar::new(trainer.cfg.max_steps);
    if show {
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
            )
            .unwrap(),
        );
        pb.set_position(trainer.step);
    } else {
        pb.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    // Above the bar on a terminal; plain lines on stderr otherwise (a hidden
    // bar would swallow them, and the eval loss is what a log reader wants).
    let say = |msg: String| {
        if show {
            pb.println(msg);
        } else {
            eprintln!("{msg}");
        }
    };
    if trainer.step == 0 {
        if let Some((l, p)) = trainer.evaluate()? {
            say(format!(
                "eval before training: loss {l:.4}, perplexity {p:.2}"
            ));
        }
    }
    let mut last_ck: Option<PathBuf> = a.resume.clone();
    while trainer.step < stop {
        let mut m = match trainer.train_step() {
            Ok(m) => m,
            Err(e) => {
                let ck = last_ck
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "none (no checkpoint was written yet)".into());
                return Err(e.context(format!("training stopped; last good checkpoint: {ck}")));
            }
        };
        let step = m.step;
        qlora_memory::rss::trace(&format!("step-{step}"));
        let is_last = step == stop;
        if (eval_every > 0 && step % eval_every == 0) || is_last {
            if let Some((l, p)) = trainer.evaluate()? {
                m.eval_loss = Some(l);
                m.eval_ppl = Some(p);
                say(format!("step {step}: eval loss {l:.4}, perplexity {p:.2}"));
            }
        }
        writeln!(mf, "{}", serde_json::to_string(&m)?)?;
        mf.flush()?;
        pb.set_position(step);
        pb.set_message(format!(
            "loss {:.4} lr {:.2e} {:.0} tok/s",
            m.loss, m.lr, m.tokens_per_s
        ));
        if !show {
            eprintln!(
                "step {step}/{}: loss {:.4} grad_norm {:.4} lr {:.3e} {:.0} tok/s",
                trainer.cfg.max_steps, m.loss, m.grad_norm, m.lr, m.tokens_per_s
            );
        }
        history.push(m);
        if (save_every > 0 && step % save_every == 0) || is_last {
            let ck = checkpoint_dir(out, step);
            trainer.save_checkpoint(&ck)?;
            last_ck = Some(ck);
        }
    }
    pb.finish_and_clear();
    qlora_memory::rss::trace("trained");
    qlora_lora::save_adapter(out.join("adapter"), &trainer.adapter, &trainer.peft)?;
    let plot = out.join("loss.svg");
    if let Err(e) = crate::commands::train_plot::loss_curve(&history, &plot) {
        eprintln!("warning: could not draw the loss curve: {e:#}");
    }
    let last = history.last();
    println!(
        "done       {} steps; final train loss {}; adapter in {}; metrics in {}; loss curve {}",
        trainer.step,
        last.map(|m| format!("{:.4}", m.loss)).unwrap_or_default(),
        out.join("adapter").display(),
        metrics_path.display(),
        plot.display()
    );
    Ok(())
}

#[cfg(test)]
#[path = "train_toml_fuzz.rs"]
mod toml_fuzz;
