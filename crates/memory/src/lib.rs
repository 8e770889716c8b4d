//! Memory calculator for Llama-family models: exact weight sizes in every
//! storage format (`qlora size`) and per-device training-memory plans that model
//! this project's own trainer (`qlora plan`).
//!
//! No candle, no weight data: sizes come from a config.json, a built-in preset,
//! safetensors headers or a GGUF header, so answers are instant.
//!
//! * [`inventory`]: the weight tensors of a model and their roles.
//! * [`bnb`]: exact bitsandbytes 4-bit byte counts (FORMATS.md §2.1, §2.4).
//! * [`st`]: exact safetensors header-length prediction (files are read by `qlora-formats`).
//! * [`gguf`]: "pure" GGUF size estimates from `qlora-gguf`'s ggml type table.
//! * [`size`]: the size report.
//! * [`presets`]: config numbers of well-known models (offline).
//! * [`source`]: a model reference's inventory: presets layered on
//!   `qlora_formats::ModelRef` (path, hub id), then safetensors / GGUF headers.
//! * [`plan`]: training memory per device.
//! * [`planner`]: `qlora plan` as one call: typed report, budget answers (largest batch /
//!   sequence, fewest devices), what the trainer keeps resident while loading.
//! * [`request`]: `qlora plan`'s flags turned into a [`PlanInput`] (train's defaults).
//! * [`rss`]: resident-memory probes of the running process (plan validation).

pub mod bnb;
pub mod gguf;
pub mod inventory;
pub mod plan;
pub mod planner;
pub mod presets;
pub mod request;
pub mod rss;
pub mod size;
pub mod source;
pub mod st;

pub use inventory::{Inventory, Role, TensorSpec};
pub use plan::{Method, Optimizer, Plan, PlanInput, Sharding};
pub use planner::{plan_model, BudgetAnswer, PlanReport};
pub use request::PlanRequest;
pub use size::{size_report, SizeOptions, SizeReport};
pub use source::{is_gguf, resolve, Loaded};

/// Errors of the calculator; each names the file or reference at fault.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {msg}")]
    BadFile { path: String, msg: String },
    #[error(transparent)]
    Config(#[from] qlora_config::ConfigError),
    #[error("unknown model reference {reference:?}: not a file or folder, not a preset{hint}")]
    UnknownReference { reference: String, hint: String },
    #[error("hub id {id:?}: {msg}")]
    Hub { id: String, msg: String },
    #[error("{0}")]
    Invalid(String),
    /// The sizes are too large to count in 64 bits (see [`plan::check_magnitude`]).
    #[error("{0}")]
    TooLarge(String),
}
