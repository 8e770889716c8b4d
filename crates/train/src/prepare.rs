//! What a training run is made of before its first step: the rows (loaded, tokenized,
//! truncated, split, packed), the prompts for before/after samples, and the adapter
//! (fresh, or from an earlier PEFT adapter).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use qlora_config::ModelConfig;
use qlora_data::formats::{self, DatasetOptions, TextTokenizer};
use qlora_data::rows::{pack, split_eval, truncate, Row};
use qlora_data::Example;
use qlora_lora::{init_adapter, load_adapter, Adapter, InitKind, PeftConfig, TargetModules};

/// `qlora train`'s LoRA rank when none is given (`qlora plan` uses the same).
pub const DEFAULT_RANK: usize = 16;
/// LoRA dropout of a new adapter (PEFT's usual value; 0 when continuing one).
pub const DEFAULT_LORA_DROPOUT: f64 = 0.05;
/// Rows per micro-batch when none is given.
pub const DEFAULT_BATCH_SIZE: usize = 4;
/// Examples are truncated to this many tokens when no limit is given.
pub const DEFAULT_MAX_SEQ_LEN: usize = 1024;
/// LoRA alpha when none is given.
pub const DEFAULT_ALPHA: f64 = 32.0;
/// Target modules when none are given.
pub const DEFAULT_TARGET: &str = "all-linear";
/// How many held-out prompts get before/after sample generations.
pub const SAMPLE_PROMPTS: usize = 3;

/// How the data files become rows.
#[derive(Debug, Clone)]
pub struct DataOptions {
    pub load: DatasetOptions,
    /// Examples are truncated to this many tokens.
    pub max_seq_len: usize,
    /// Pack several short training examples into one row of `max_seq_len`.
    pub packing: bool,
    /// Held-out data file; without one, `eval_split` of the training file is held out.
    pub eval_data: Option<PathBuf>,
    pub eval_split: f64,
    /// Seed of the held-out split.
    pub seed: u64,
}

/// The rows of a run.
#[derive(Debug, Clone, Default)]
pub struct PreparedData {
    pub rows: Vec<Row>,
    pub eval_rows: Vec<Row>,
    /// Prompt parts of the first held-out examples (for sample generations).
    pub sample_prompts: Vec<Vec<u32>>,
    /// Training examples before packing.
    pub train_examples: usize,
    /// Training-file examples cut to `max_seq_len`.
    pub truncated: usize,
    /// `file:line: problem` of every skipped record of the training file, then of the eval file.
    pub skipped: Vec<String>,
    /// How many of `skipped` are in the training file.
    pub skipped_train: usize,
}

/// Load, tokenize (`tok` is needed for text formats), truncate, split and pack.
pub fn prepare_data(
    path: &Path,
    opts: &DataOptions,
    tok: Option<&dyn TextTokenizer>,
) -> Result<PreparedData> {
    let loaded = formats::load(path, &opts.load, tok)?;
    let mut skipped = loaded.skipped;
    let skipped_train = skipped.len();
    let mut examples = loaded.examples;
    let truncated = truncate(&mut examples, opts.max_seq_len);
    let (train_ex, eval_ex) = match &opts.eval_data {
        Some(p) => {
            let l = formats::load(p, &opts.load, tok)?;
            skipped.extend(l.skipped);
            let mut e = l.examples;
            truncate(&mut e, opts.max_seq_len);
            (examples, e)
        }
        None => split_eval(examples, opts.eval_split, opts.seed),
    };
    let train_examples = train_ex.len();
    let rows = if opts.packing {
        pack(train_ex, opts.max_seq_len)
    } else {
        train_ex.into_iter().map(Row::single).collect()
    };
    if rows.is_empty() {
        bail!("{}: no training examples", path.display());
    }
    let sample_prompts = eval_ex
        .iter()
        .take(SAMPLE_PROMPTS)
        .filter_map(prompt_of)
        .collect();
    Ok(PreparedData {
        rows,
        eval_rows: eval_ex.into_iter().map(Row::single).collect(),
        sample_prompts,
        train_examples,
        truncated,
        skipped,
        skipped_train,
    })
}

/// The prompt part of an example: the tokens before its first trained label.
pub fn prompt_of(e: &Example) -> Option<Vec<u32>> {
    let first = e
        .labels
        .iter()
        .position(|&l| l != qlora_data::IGNORE_INDEX)?;
    (first > 0).then(|| e.input_ids[..first].to_vec())
}

/// Gradient checkpointing when not asked for: on for models deeper than 4 layers.
pub fn default_checkpointing(config: &ModelConfig) -> bool {
    config.num_hidden_layers > 4
}

/// A new adapter's shape; `None` fields take the defaults above.
#[derive(Debug, Clone, Default)]
pub struct LoraOptions {
    pub rank: Option<usize>,
    pub alpha: Option<f64>,
    /// all-linear, a comma list (q_proj,v_proj), or re:<regex>.
    pub target: Option<String>,
    pub rslora: bool,
    /// DoRA (`use_dora`); a fresh adapter's magnitudes are then set by
    /// `qlora_model::Model::init_dora`.
    pub dora: bool,
    /// LoRA A init: default (kaiming-uniform) or gaussian.
    pub init: Option<String>,
}

impl LoraOptions {
    /// Whether any shape option was given (they are ignored with an initial adapter).
    pub fn any_shape_given(&self) -> bool {
        self.rank.is_some()
            || self.alpha.is_some()
            || self.target.is_some()
            || self.rslora
            || self.dora
    }
}

/// The adapter to train: loaded from `init_from` (its r, alpha, targets, rsLoRA and DoRA
/// win), or fresh from `lora` with `seed`, recording `model_ref` as the base. A fresh
/// DoRA adapter comes without magnitudes: set them with `Model::init_dora`.
pub fn adapter_for(
    init_from: Option<&Path>,
    lora: &LoraOptions,
    config: &ModelConfig,
    seed: u64,
    model_ref: &str,
) -> Result<(PeftConfig, Adapter)> {
    if let Some(dir) = init_from {
        return load_adapter(dir, Some(config))
            .with_context(|| format!("loading --init-adapter {}", dir.display()));
    }
    let targets = TargetModules::parse_cli(lora.target.as_deref().unwrap_or(DEFAULT_TARGET))?;
    let mut p = PeftConfig::new(
        lora.rank.unwrap_or(DEFAULT_RANK),
        lora.alpha.unwrap_or(DEFAULT_ALPHA),
        targets,
    );
    p.use_rslora = lora.rslora;
    p.use_dora = lora.dora;
    p.init_lora_weights = match lora.init.as_deref().unwrap_or("default") {
        "default" | "true" | "kaiming" => InitKind::Default,
        "gaussian" => InitKind::Gaussian,
        o => bail!("unknown --init `{o}` (default or gaussian)"),
    };
    p.base_model_name_or_path = Some(model_ref.to_string());
    let ad = init_adapter(&p, config, seed)?;
    Ok((p, ad))
}

/// Optimizer steps for `epochs` passes over `rows` rows at `rows_per_step` (at least 1).
pub fn steps_for_epochs(rows: usize, epochs: f64, rows_per_step: usize) -> u64 {
    ((rows as f64 * epochs) / rows_per_step.max(1) as f64)
        .ceil()
        .max(1.0) as u64
}

/// What a checkpoint must match to be resumed: the model reference, its config, the base
/// weights' storage and the training rows.
pub fn identity(
    model_ref: &str,
    config: &ModelConfig,
    quant: &str,
    rows: &[Row],
) -> crate::Identity {
    crate::Identity {
        model_ref: model_ref.to_string(),
        model_config_hash: crate::fnv_hex(format!("{config:?}").as_bytes()),
        quant: quant.to_string(),
        data_hash: crate::rows_hash(rows),
    }
}

/// The trajectory knobs as a user gives them: `None` takes the default noted on each.
#[derive(Debug, Clone, Default)]
pub struct TrainOptions {
    /// Rows per micro-batch [`DEFAULT_BATCH_SIZE`].
    pub batch_size: Option<usize>,
    /// Micro-batches per optimizer step [1].
    pub grad_accum: Option<usize>,
    /// Optimizer steps [from `epochs`].
    pub max_steps: Option<u64>,
    /// Passes over the rows when `max_steps` is not given [1].
    pub epochs: Option<f64>,
    /// Peak learning rate [2e-4].
    pub lr: Option<f64>,
    /// constant | linear | cosine [cosine].
    pub schedule: Option<String>,
    /// Linear warmup steps [0].
    pub warmup_steps: Option<u64>,
    /// AdamW [`crate::AdamW::default`] for each `None`.
    pub weight_decay: Option<f64>,
    pub beta1: Option<f64>,
    pub beta2: Option<f64>,
    pub eps: Option<f64>,
    /// Global gradient-norm clipping, 0 = off [1.0].
    pub max_grad_norm: Option<f64>,
    /// Seed of init, shuffling, dropout and the eval split [0].
    pub seed: Option<u64>,
    /// Keep the data order [shuffle].
    pub no_shuffle: bool,
    /// LoRA dropout [0.05; 0 when starting from an existing adapter].
    pub lora_dropout: Option<f64>,
    /// [`default_checkpointing`].
    pub gradient_checkpointing: Option<bool>,
}

impl TrainOptions {
    /// The [`crate::TrainConfig`] for `rows` training rows of `model`; `from_adapter`: the
    /// run starts from an existing adapter (dropout then defaults to 0, as PEFT's parity runs).
    pub fn train_config(
        &self,
        rows: usize,
        model: &ModelConfig,
        from_adapter: bool,
    ) -> Result<crate::TrainConfig> {
        let batch_size = self.batch_size.unwrap_or(DEFAULT_BATCH_SIZE);
        let grad_accum = self.grad_accum.unwrap_or(1);
        let max_steps = self.max_steps.unwrap_or_else(|| {
            steps_for_epochs(rows, self.epochs.unwrap_or(1.0), batch_size * grad_accum)
        });
        let d = crate::AdamW::default();
        Ok(crate::TrainConfig {
            batch_size,
            grad_accum,
            max_steps,
            lr: self.lr.unwrap_or(2e-4),
            schedule: self.schedule.as_deref().unwrap_or("cosine").parse()?,
            warmup_steps: self.warmup_steps.unwrap_or(0),
            adamw: crate::AdamW {
                beta1: self.beta1.unwrap_or(d.beta1),
                beta2: self.beta2.unwrap_or(d.beta2),
                eps: self.eps.unwrap_or(d.eps),
                weight_decay: self.weight_decay.unwrap_or(d.weight_decay),
            },
            max_grad_norm: Some(self.max_grad_norm.unwrap_or(1.0)).filter(|&m| m > 0.0),
            seed: self.seed.unwrap_or(0),
            shuffle: !self.no_shuffle,
            lora_dropout: self.lora_dropout.unwrap_or(if from_adapter {
                0.0
            } else {
                DEFAULT_LORA_DROPOUT
            }),
            checkpointing: self
                .gradient_checkpointing
                .unwrap_or_else(|| default_checkpointing(model)),
            pad_id: 0,
        })
    }
}
