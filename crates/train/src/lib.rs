//! `qlora-train`: the training loop behind `qlora train`.
//!
//! * [`optim`]: AdamW (torch semantics), global-norm clipping.
//! * [`schedule`]: constant / linear / cosine LR with warmup (transformers' formulas).
//! * [`trainer`]: gradient accumulation normalised by the step's target-token
//!   count, data order, evaluation, NaN/inf guards.
//! * [`checkpoint`]: atomic checkpoint folders and exact resume.

pub mod checkpoint;
pub mod optim;
pub mod outdir;
pub mod params;
pub mod schedule;
pub mod trainer;

pub use checkpoint::{checkpoint_dir, TrainerState};
pub use optim::AdamW;
pub use outdir::prepare_output_dir;
pub use schedule::{Schedule, ScheduleKind};
pub use trainer::{
    check_lora_dropout, collate, evaluate_rows, fnv_hex, rows_hash, Identity, RunSettings,
    StepMetrics, TrainConfig, Trainer,
};
