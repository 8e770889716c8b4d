//! `qlora-train`: the training loop behind `qlora train`.
//!
//! * [`optim`]: AdamW (torch semantics), global-norm clipping.
//! * [`schedule`]: constant / linear / cosine LR with warmup (transformers' formulas).
//! * [`config`]: [`TrainConfig`] (what shapes the trajectory) and [`RunSettings`].
//! * [`identity`]: what a run trains on, hashed so a checkpoint resumes only onto it.
//! * [`batch`]: rows -> padded/packed model batches, loss-target counts.
//! * [`trainer`]: the optimizer step: gradient accumulation normalised by the step's
//!   target-token count, data order, NaN/inf guards.
//! * [`eval`]: token-weighted evaluation loss and perplexity.
//! * [`checkpoint`]: atomic checkpoint folders and exact resume.
//! * [`launch`]: a whole `qlora train` run from its settings ([`launch::TrainRequest`]):
//!   checks, loading the base, preparing data/adapter/output, building the trainer.
//! * [`prepare`]: the rows (load, tokenize, truncate, split, pack) and the adapter of a run.
//! * [`session`]: the whole `qlora train` flow (launch's phases, [`Trainer::run`], greedy
//!   samples before and after) shown through a [`session::RunView`].
//! * [`run`]: [`Trainer::run`], the whole run: eval / checkpoint cadence, `metrics.jsonl`
//!   (kept up to the checkpoint on resume), the final adapter, progress [`Callbacks`].

pub mod batch;
pub mod checkpoint;
pub mod config;
pub mod eval;
pub mod identity;
pub mod launch;
pub mod optim;
pub mod outdir;
pub mod params;
pub mod prepare;
pub mod run;
pub mod schedule;
pub mod session;
pub mod trainer;

pub use batch::{collate, collate_binned, Binning, Collated};
pub use checkpoint::{checkpoint_dir, TrainerState};
pub use config::{check_lora_dropout, RunSettings, TrainConfig};
pub use eval::{eval_stats, evaluate_rows, EvalStats};
pub use identity::{fnv_hex, rows_hash, Identity};
pub use optim::AdamW;
pub use outdir::prepare_output_dir;
pub use prepare::{
    adapter_for, default_checkpointing, identity, prepare_data, steps_for_epochs, DataOptions,
    LoraOptions, PreparedData, TrainOptions, DEFAULT_ALPHA, DEFAULT_BATCH_SIZE,
    DEFAULT_LORA_DROPOUT, DEFAULT_MAX_SEQ_LEN, DEFAULT_RANK, DEFAULT_TARGET,
};
pub use run::{Callbacks, RunOptions, RunReport, Silent};
pub use schedule::{Schedule, ScheduleKind};
pub use trainer::{StepMetrics, Trainer};
