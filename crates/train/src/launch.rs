//! A whole `qlora train` run from its settings: [`TrainRequest`] holds what the
//! user asked for as plain values (the CLI fills it from flags and `--config`),
//! [`check`] refuses bad settings before anything is loaded, [`load_base`] loads
//! the model, and [`start`] prepares data, adapter and output folder and builds
//! the [`Trainer`]. The caller then runs it with its own [`crate::Callbacks`].
//!
//! Three calls instead of one so that the caller can observe the phases between
//! them (the CLI's resident-memory trace that validates `qlora plan`).

use std::mem::take;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use qlora_data::formats::{DatasetOptions, Format, OnBadLine, TextTokenizer};
use qlora_dist::Communicator;
use qlora_infer::{LoadedModel, NeedTokenizer};
use qlora_model::{Adapter, BaseCompute, Device, QuantMode, ShardSpec};
use qlora_tokenizer::Tokenizer;

use crate::prepare::{
    adapter_for, identity, prepare_data, DataOptions, LoraOptions, PreparedData, TrainOptions,
    DEFAULT_MAX_SEQ_LEN,
};
use crate::run::RunOptions;
use crate::{RunSettings, Trainer};

/// Greedy tokens generated per held-out prompt for the before/after samples.
pub const SAMPLE_TOKENS: usize = 48;

/// What a `qlora train` run is asked to do; `None` takes the default noted on each.
#[derive(Debug, Clone, Default)]
pub struct TrainRequest {
    /// Base model reference (folder, `.gguf`, hub id).
    pub model: String,
    pub data: PathBuf,
    pub out: PathBuf,
    /// Data format name [auto].
    pub data_format: Option<String>,
    pub eval_data: Option<PathBuf>,
    /// Fraction of `data` held out when `eval_data` is not given [0].
    pub eval_split: Option<f64>,
    /// Evaluate every N steps [0 = only at the end].
    pub eval_every: Option<u64>,
    /// Start from this PEFT adapter (its shape wins over `lora`).
    pub init_adapter: Option<PathBuf>,
    /// Continue from this checkpoint folder.
    pub resume: Option<PathBuf>,
    /// Base weights storage: native, none, bf16, nf4, fp4 [native for a .gguf, else nf4].
    pub quant: Option<String>,
    /// cpu or cuda[:N] [cpu].
    pub device: Option<String>,
    /// f32 or bf16 products of the frozen base [f32].
    pub compute_dtype: Option<String>,
    pub lora: LoraOptions,
    pub train: TrainOptions,
    /// Examples are truncated to this many tokens [`DEFAULT_MAX_SEQ_LEN`].
    pub max_seq_len: Option<usize>,
    pub packing: bool,
    pub train_on_inputs: bool,
    /// skip or error [error].
    pub on_bad_line: Option<String>,
    /// Checkpoint every N steps [0 = only at the end].
    pub save_every: Option<u64>,
    /// Stop after this step (the schedule still spans `max_steps`).
    pub stop_at_step: Option<u64>,
    /// none or full [full under `mpirun -n N` with N > 1, except for GGUF
    /// blocks held as stored (`--quant native`), which are not sharded].
    pub shard: Option<String>,
    pub cpu_offload: bool,
    /// Overwrite a non-empty `out`.
    pub force: bool,
}

impl TrainRequest {
    /// The base storage asked for; `None`: the model source's default
    /// (`qlora_infer::default_quant`).
    pub fn quant_mode(&self) -> Result<Option<QuantMode>> {
        self.quant.as_deref().map(str::parse).transpose()
    }

    pub fn max_seq_len(&self) -> usize {
        self.max_seq_len.unwrap_or(DEFAULT_MAX_SEQ_LEN)
    }
}

/// Refuse settings that cannot work, before anything is loaded (a typo fails in a
/// second). Returns notes for the user (settings that are accepted but do nothing).
pub fn check(req: &TrainRequest, comm: &dyn Communicator) -> Result<Vec<String>> {
    let mut notes = Vec::new();
    match req.shard.as_deref() {
        None | Some("none") => {}
        Some("full") => {
            if comm.size() == 1 {
                notes.push(
                    "--shard full with one process: nothing to shard (run under `mpirun -n N`)"
                        .to_string(),
                );
            }
            if req.quant_mode()? == Some(QuantMode::Native) {
                bail!(qlora_model::shard::SHARD_NATIVE);
            }
            let device: Device = req.device.as_deref().unwrap_or("cpu").parse()?;
            if device != Device::Cpu && comm.size() > 1 {
                bail!(
                    "--shard full with --device {device} is not implemented (the sharded base is \
                     gathered in host memory by the CPU trainer); use --shard none or --device cpu"
                );
            }
        }
        Some(o) => bail!("unknown --shard `{o}` (none or full)"),
    }
    req.quant_mode()?;
    let _: OnBadLine = req.on_bad_line.as_deref().unwrap_or("error").parse()?;
    RunSettings {
        epochs: req.train.epochs,
        eval_split: req.eval_split,
        max_seq_len: req.max_seq_len,
        max_grad_norm: req.train.max_grad_norm,
        lora_dropout: req.train.lora_dropout,
        rank: req.lora.rank,
        alpha: req.lora.alpha,
    }
    .validate()?;
    if comm.rank() == 0 {
        crate::outdir::check_output_dir(&req.out, req.resume.as_deref(), req.force)?;
    }
    if req.cpu_offload {
        notes.push(
            "--cpu-offload is a no-op for the CPU trainer (everything is in host memory already)"
                .to_string(),
        );
    }
    if req.init_adapter.is_some() && req.lora.any_shape_given() {
        notes.push(
            "--rank/--alpha/--target/--rslora/--use-dora are taken from the --init-adapter config"
                .into(),
        );
    }
    Ok(notes)
}

/// The loaded base and how long loading took.
pub struct Base {
    pub loaded: LoadedModel,
    pub load_s: f64,
}

/// How this process holds the base: `Some` = its share of a sharded base
/// (`--shard full`, the default when `comm` has several ranks), `None` = all of it.
/// The second value is a note for the user when the default was not applied.
pub fn shard_spec(
    req: &TrainRequest,
    comm: &dyn Communicator,
) -> Result<(Option<ShardSpec>, Option<String>)> {
    if comm.size() == 1 {
        return Ok((None, None));
    }
    let spec = Some(ShardSpec::new(comm.rank(), comm.size())?);
    match req.shard.as_deref() {
        Some("full") => Ok((spec, None)),
        Some(_) => Ok((None, None)),
        None => {
            // the default: full, unless the base is a GGUF file's own blocks
            // or lives on a GPU (neither is sharded)
            let quant = match req.quant_mode()? {
                Some(q) => q,
                None => qlora_infer::default_quant(
                    &qlora_formats::ModelRef::resolve(&req.model, false)?.source,
                ),
            };
            let device: Device = req.device.as_deref().unwrap_or("cpu").parse()?;
            if quant == QuantMode::Native {
                Ok((
                    None,
                    Some(
                        "the base is held as the GGUF file's own blocks (--quant native), \
                     which are not sharded: every process holds all of it (--shard none); \
                     --quant nf4 --shard full splits it"
                            .into(),
                    ),
                ))
            } else if device != Device::Cpu {
                Ok((
                    None,
                    Some(format!(
                        "--device {device}: --shard none (sharding is CPU-only)"
                    )),
                ))
            } else {
                Ok((spec, None))
            }
        }
    }
}

/// Load the base model (its tokenizer when it has one: text data needs it) on the
/// requested device and with the requested base arithmetic; under several ranks
/// with `shard` (see [`shard_spec`]) only this rank's share of it.
pub fn load_base(req: &TrainRequest, shard: Option<ShardSpec>) -> Result<Base> {
    let t = Instant::now();
    let quant = req.quant_mode()?;
    let device: Device = req.device.as_deref().unwrap_or("cpu").parse()?;
    let compute: BaseCompute = req
        .compute_dtype
        .as_deref()
        .unwrap_or("f32")
        .parse()
        .context("--compute-dtype")?;
    let mut loaded =
        qlora_infer::load_sharded(&req.model, quant, false, NeedTokenizer::IfPresent, shard)?;
    loaded.model.set_base_compute(compute);
    loaded.model.to_device(device)?;
    Ok(Base {
        loaded,
        load_s: t.elapsed().as_secs_f64(),
    })
}

/// A run ready to train: the trainer (fresh or resumed), how to drive it, and the
/// data report (its rows are in the trainer).
pub struct Started<'m> {
    pub trainer: Trainer<'m>,
    pub run: RunOptions,
    pub data: PreparedData,
}

/// Prepare data and adapter, create (or reuse, on resume) the output folder on rank 0,
/// and build the trainer on `comm`.
pub fn start<'m>(
    req: &TrainRequest,
    base: &'m Base,
    comm: &'m dyn Communicator,
) -> Result<Started<'m>> {
    let (model, tok) = (&base.loaded.model, base.loaded.tokenizer.as_ref());
    let main = comm.rank() == 0;
    let max_len = req.max_seq_len();
    let seed = req.train.seed.unwrap_or(0);
    let dopts = DataOptions {
        load: DatasetOptions {
            format: req
                .data_format
                .as_deref()
                .unwrap_or("auto")
                .parse::<Format>()?,
            train_on_inputs: req.train_on_inputs,
            on_bad_line: req.on_bad_line.as_deref().unwrap_or("error").parse()?,
            // every row checked against the model now, not when its batch comes
            vocab_size: Some(model.config.vocab_size),
            max_len: Some(max_len),
        },
        max_seq_len: max_len,
        packing: req.packing,
        eval_data: req.eval_data.clone(),
        eval_split: req.eval_split.unwrap_or(0.0),
        seed,
    };
    let text_tok = tok.map(|t| t as &dyn TextTokenizer);
    let mut data = prepare_data(&req.data, &dopts, text_tok)
        .map_err(|e| tokenizer_cause(e, &req.model, base.loaded.model_ref.path(), tok.is_some()))?;

    let init_from = req.init_adapter.as_deref();
    let (peft, mut adapter) = adapter_for(init_from, &req.lora, &model.config, seed, &req.model)?;
    if peft.use_dora && init_from.is_none() {
        // DoRA's magnitude starts at ‖W‖ per output row (PEFT's init; B = 0).
        model.init_dora(&mut adapter)?;
    }
    let cfg = req
        .train
        .train_config(data.rows.len(), &model.config, init_from.is_some())?;
    let quant = base.loaded.quant.to_string();
    let identity = identity(&req.model, &model.config, &quant, &data.rows);
    cfg.validate()?;
    if main {
        crate::prepare_output_dir(&req.out, req.resume.as_deref(), req.force)?;
    }
    let (rows, eval_rows) = (take(&mut data.rows), take(&mut data.eval_rows));
    let trainer = match &req.resume {
        Some(ck) => {
            let t = Trainer::resume(model, cfg, identity, rows, eval_rows, ck)?;
            t.check_same_adapter(&peft)
                .with_context(|| format!("refusing checkpoint {}", ck.display()))?;
            t
        }
        None => Trainer::new(model, cfg, identity, peft, adapter, rows, eval_rows)?,
    };
    let trainer = trainer.with_communicator(comm)?;
    let run = RunOptions {
        out: req.out.clone(),
        stop_at_step: req.stop_at_step,
        eval_every: req.eval_every.unwrap_or(0),
        save_every: req.save_every.unwrap_or(0),
        resumed_from: req.resume.clone(),
        follower: !main,
    };
    Ok(Started { trainer, run, data })
}

/// Pre-tokenized data needs no tokenizer; for text data a tokenizer that failed to
/// load is the real cause of the failure, so say why it failed.
fn tokenizer_cause(e: anyhow::Error, model_ref: &str, dir: &Path, have_tok: bool) -> anyhow::Error {
    if !have_tok && dir.join("tokenizer.json").exists() {
        if let Err(te) = Tokenizer::from_folder(dir) {
            return e.context(format!(
                "the tokenizer of {model_ref} could not be loaded: {te}"
            ));
        }
    }
    e
}

/// Greedy continuations ([`SAMPLE_TOKENS`] each) of the held-out `prompts` with `adapter`.
pub fn samples(
    base: &Base,
    tok: &Tokenizer,
    adapter: &Adapter,
    prompts: &[Vec<u32>],
) -> Result<Vec<String>> {
    qlora_infer::greedy_samples(
        &base.loaded.model,
        tok,
        Some(adapter),
        prompts,
        SAMPLE_TOKENS,
    )
}

/// Write `samples.md` (each held-out prompt with its continuation before and after
/// training) into `out`.
pub fn save_samples(
    out: &Path,
    tok: &Tokenizer,
    prompts: &[Vec<u32>],
    before: &[String],
    after: &[String],
) -> Result<()> {
    let md = qlora_infer::samples_markdown(tok, prompts, before, after, SAMPLE_TOKENS);
    qlora_formats::write_atomic(&out.join("samples.md"), md.as_bytes())?;
    Ok(())
}
