//! `qlora plan` as one call: a model reference and a [`PlanInput`] in, a typed
//! [`PlanReport`] out (serialized as the `--json` output), with the answers for a
//! memory budget: does it fit, the largest batch and sequence that fit, the fewest
//! devices. Also what `qlora train` keeps resident while it loads a checkpoint.

use std::str::FromStr;

use qlora_config::ModelConfig;
use serde::Serialize;

use crate::inventory::Inventory;
use crate::plan::{self, Method, Optimizer, Plan, PlanInput, Saved, Sharding};
use crate::{Loaded, MemoryError};

impl FromStr for Method {
    type Err = MemoryError;
    fn from_str(s: &str) -> Result<Self, MemoryError> {
        match s.to_ascii_lowercase().as_str() {
            "full" => Ok(Method::Full),
            "lora" => Ok(Method::Lora),
            "qlora" => Ok(Method::Qlora),
            m => Err(MemoryError::Invalid(format!(
                "--method {m:?}: expected full, lora or qlora"
            ))),
        }
    }
}

impl FromStr for Optimizer {
    type Err = MemoryError;
    fn from_str(s: &str) -> Result<Self, MemoryError> {
        match s.to_ascii_lowercase().replace(['-', '_'], "").as_str() {
            "adamw" | "adam" | "adamw32" => Ok(Optimizer::AdamW),
            "adamw8bit" | "adam8bit" | "pagedadamw8bit" => Ok(Optimizer::AdamW8bit),
            "sgd" => Ok(Optimizer::Sgd),
            o => Err(MemoryError::Invalid(format!(
                "--optimizer {o:?}: expected adamw, adamw8bit or sgd"
            ))),
        }
    }
}

impl FromStr for Sharding {
    type Err = MemoryError;
    fn from_str(s: &str) -> Result<Self, MemoryError> {
        match s.to_ascii_lowercase().replace('_', "-").as_str() {
            "none" | "ddp" | "no-shard" => Ok(Sharding::None),
            "full" | "full-shard" | "fsdp" => Ok(Sharding::Full),
            "grad-op" | "shard-grad-op" => Ok(Sharding::GradOp),
            s => Err(MemoryError::Invalid(format!(
                "--sharding {s:?}: expected none, full or grad-op"
            ))),
        }
    }
}

/// LoRA targets from `all` / `all-linear` or a comma list of short names.
pub fn parse_targets(s: &str) -> Vec<String> {
    if s == "all" || s == "all-linear" {
        return plan::ALL_TARGETS.iter().map(|s| s.to_string()).collect();
    }
    s.split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

/// Bytes of the checkpoint `qlora train` keeps memory-mapped and resident at
/// the end of loading: a GGUF file stays mapped, every page touched, until the
/// model is built; safetensors pages are released tensor by tensor, so about
/// the largest tensor (estimated at the file's average bytes per element).
pub fn resident_while_loading(l: &Loaded) -> u64 {
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

/// Whether `qlora train` loads a tokenizer with this model: always from a GGUF (rebuilt
/// from its metadata), from a folder only when it holds tokenizer.json.
pub fn trainer_has_tokenizer(reference: &str, l: &Loaded) -> bool {
    if l.kind == "gguf" {
        return true;
    }
    use qlora_formats::model_ref::{Fetch, ModelRef, ModelSource, Resolve};
    let how = Resolve {
        fetch: Fetch::Config,
        ..Resolve::new(false)
    };
    let Ok(r) = ModelRef::resolve_with(reference, &how) else {
        return false; // a preset: no files
    };
    let dir = match &r.source {
        ModelSource::Folder(d) | ModelSource::Weights(d) => Some(d.as_path()),
        _ => r.path().parent(),
    };
    dir.is_some_and(|d| d.join("tokenizer.json").is_file())
}

/// The answers for a memory budget per device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BudgetAnswer {
    pub budget_bytes: u64,
    pub fits: bool,
    /// Budget minus the plan's total (negative when it does not fit).
    pub margin_bytes: i64,
    /// Largest micro-batch that fits at the plan's sequence length (0: none).
    pub max_batch: u64,
    /// Longest sequence that fits at the plan's micro-batch (0: none).
    pub max_seq: u64,
    /// Fewest devices that fit (up to 4096; only 1 is tried without sharding or offload).
    pub min_devices: Option<u64>,
}

/// Largest value in `1..=hi` for which `fits` holds (monotone: true then
/// false), or 0 if even 1 does not fit. A value whose plan is too large to
/// count ([`MemoryError::TooLarge`]) does not fit.
pub fn largest_fitting(
    hi: u64,
    mut fits_or_err: impl FnMut(u64) -> Result<bool, MemoryError>,
) -> Result<u64, MemoryError> {
    let mut fits = |x: u64| match fits_or_err(x) {
        Err(MemoryError::TooLarge(_)) => Ok(false),
        r => r,
    };
    if !fits(1)? {
        return Ok(0);
    }
    let (mut lo, mut hi) = (1u64, hi);
    if fits(hi)? {
        return Ok(hi);
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if fits(mid)? {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(lo)
}

/// Search the boundaries of `p` under `budget` bytes per device.
pub fn budget_answer(
    inv: &Inventory,
    cfg: &ModelConfig,
    p: &PlanInput,
    budget: u64,
) -> Result<BudgetAnswer, MemoryError> {
    let fits_with = |q: &PlanInput| -> Result<bool, MemoryError> {
        Ok(plan::plan(inv, cfg, q)?.per_device.total_bytes <= budget)
    };
    let with = |f: &dyn Fn(&mut PlanInput)| {
        let mut q = p.clone();
        f(&mut q);
        q
    };
    let max_batch = largest_fitting(1 << 16, |b| fits_with(&with(&|q| q.batch = b)))?;
    let max_seq = largest_fitting(1 << 22, |s| fits_with(&with(&|q| q.seq = s)))?;
    // Fewest devices: memory per device never grows with devices.
    let mut min_devices = None;
    if p.sharding != Sharding::None || p.cpu_offload {
        for n in 1..=4096 {
            if fits_with(&with(&|q| q.devices = n))? {
                min_devices = Some(n);
                break;
            }
        }
    } else if fits_with(&with(&|q| q.devices = 1))? {
        min_devices = Some(1);
    }
    let total = plan::plan(inv, cfg, p)?.per_device.total_bytes;
    Ok(BudgetAnswer {
        budget_bytes: budget,
        fits: total <= budget,
        margin_bytes: (budget as i128 - total as i128).clamp(i64::MIN as i128, i64::MAX as i128)
            as i64,
        max_batch,
        max_seq,
        min_devices,
    })
}

/// Everything `qlora plan` reports (its `--json` output).
#[derive(Debug, Clone, Serialize)]
pub struct PlanReport {
    #[serde(flatten)]
    pub plan: Plan,
    /// The model's label (what was given, or the preset's name).
    pub model: String,
    /// config | preset | hub | safetensors | gguf
    #[serde(skip)]
    pub kind: &'static str,
    pub vocab_size: usize,
    /// `plan.per_device.total_bytes`.
    pub total_bytes: u64,
    /// What the trainer keeps per decoder layer for the backward.
    pub saved_per_layer: Vec<Saved>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget: Option<BudgetAnswer>,
}

/// Plan `p` for the model `reference` names (see [`crate::resolve`]): its inventory and
/// config, and what `qlora train` keeps while loading it (`p.load_file_bytes` and
/// `p.tokenizer_bytes` are filled in here); `checkpointing` decides
/// `p.checkpointing` from the model's config (the trainer's default needs the layer
/// count); with `budget`, the budget answers.
pub fn plan_model(
    reference: &str,
    p: &PlanInput,
    checkpointing: impl FnOnce(&ModelConfig) -> bool,
    budget: Option<u64>,
) -> Result<PlanReport, MemoryError> {
    let l = crate::resolve(reference)?;
    let mut p = p.clone();
    if p.native && l.kind != "gguf" {
        return Err(MemoryError::Invalid(format!(
            "{}: --quant native keeps a GGUF file's own blocks, and this model is not a .gguf file; \
             use --quant nf4 or fp4 (or --method lora for a full-precision base)",
            l.label
        )));
    }
    // Under --quant native the file stays mapped for the whole run and its pages are
    // the frozen weights (counted there); nothing else is resident while loading.
    p.load_file_bytes = if p.native {
        0
    } else {
        resident_while_loading(&l)
    };
    let cfg = l.config.clone().ok_or_else(|| {
        MemoryError::Invalid(format!(
            "{}: planning needs the architecture (heads, layers); put config.json next to the weights ({})",
            l.label,
            l.notes.join("; ")
        ))
    })?;
    p.checkpointing = checkpointing(&cfg);
    if trainer_has_tokenizer(reference, &l) {
        p.tokenizer_bytes = plan::tokenizer_bytes(cfg.vocab_size as u64);
    }
    let result = plan::plan(&l.inventory, &cfg, &p)?;
    let budget = budget
        .map(|b| budget_answer(&l.inventory, &cfg, &p, b))
        .transpose()?;
    Ok(PlanReport {
        model: l.label.clone(),
        kind: l.kind,
        vocab_size: cfg.vocab_size,
        total_bytes: result.per_device.total_bytes,
        saved_per_layer: plan::saved_per_layer(&cfg, &p),
        plan: result,
        budget,
    })
}

impl crate::plan::Breakdown {
    /// The per-device table `qlora plan` prints, in order: (label, bytes). The larger of
    /// the two transient phases (layer backward workspace, logits and loss), the only
    /// one the total counts, is marked `*`; heap retention counts on top of it.
    pub fn rows(&self) -> Vec<(&'static str, u64)> {
        let layer_wins = self.layer_workspace >= self.logits_and_loss;
        vec![
            ("frozen weights", self.frozen_weights),
            ("  of which quant stats", self.quant_stats),
            ("trainable parameters", self.trainable_params),
            ("gradients", self.gradients),
            ("optimizer states", self.optimizer_states),
            ("activations", self.activations),
            (
                if layer_wins {
                    "layer backward workspace *"
                } else {
                    "layer backward workspace"
                },
                self.layer_workspace,
            ),
            (
                if layer_wins {
                    "logits and loss"
                } else {
                    "logits and loss *"
                },
                self.logits_and_loss,
            ),
            ("heap retention (checkpointing)", self.heap_retention),
            ("dequantization workspace", self.dequant_workspace),
            ("tokenizer", self.tokenizer),
            ("worker-thread arenas", self.worker_arenas),
            ("gemm packing slabs", self.gemm_packing),
            ("LoRA dropout buffers", self.lora_dropout_buffers),
            ("communication buffers", self.communication),
            ("runtime overhead", self.overhead),
            ("training peak", self.train_peak),
            ("loading peak", self.load_peak),
            ("total (max of the two peaks)", self.total_bytes),
        ]
    }
}
