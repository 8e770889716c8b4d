//! The settings of a run: [`TrainConfig`] (everything that shapes the trajectory,
//! recorded in a checkpoint) and [`RunSettings`] (checked before anything loads).

use anyhow::{bail, ensure, Result};
use serde::{Deserialize, Serialize};

use crate::optim::AdamW;
use crate::schedule::{Schedule, ScheduleKind};

/// Everything that shapes the trajectory (plus a few run-control knobs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub batch_size: usize,
    pub grad_accum: usize,
    /// Total optimizer steps (the schedule's horizon).
    pub max_steps: u64,
    pub lr: f64,
    pub schedule: ScheduleKind,
    pub warmup_steps: u64,
    pub adamw: AdamW,
    /// Global-norm clipping threshold; `None` = no clipping.
    pub max_grad_norm: Option<f64>,
    pub seed: u64,
    pub shuffle: bool,
    pub lora_dropout: f64,
    /// Recompute each decoder layer in the backward (less memory, same numbers).
    pub checkpointing: bool,
    /// Token id used to right-pad rows (masked out of the loss).
    pub pad_id: u32,
}

impl TrainConfig {
    pub fn schedule(&self) -> Schedule {
        Schedule {
            kind: self.schedule,
            lr: self.lr,
            warmup_steps: self.warmup_steps,
            total_steps: self.max_steps,
        }
    }

    /// Refuse settings that would train on NaN/inf or nothing at all: every
    /// number finite, betas in [0, 1), eps > 0, dropout in [0, 1), at least one step.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.batch_size > 0 && self.grad_accum > 0,
            "batch size and gradient accumulation must be at least 1"
        );
        ensure!(self.max_steps > 0, "the number of steps must be at least 1");
        ensure!(
            self.lr.is_finite() && self.lr >= 0.0 && (self.lr as f32).is_finite(),
            "invalid learning rate {} (a finite number >= 0 is needed)",
            self.lr
        );
        self.adamw.validate()?;
        if let Some(m) = self.max_grad_norm {
            ensure!(
                m.is_finite() && m > 0.0,
                "max grad norm must be a positive finite number (or off), got {m}"
            );
        }
        check_lora_dropout(self.lora_dropout)?;
        Ok(())
    }

    /// The fields a resumed run must share with the checkpoint for the
    /// trajectory to continue unchanged (`max_steps` and `checkpointing` may differ).
    pub fn check_resumable(&self, ck: &TrainConfig) -> Result<()> {
        let mut a = self.clone();
        a.max_steps = ck.max_steps;
        a.checkpointing = ck.checkpointing;
        if &a != ck {
            let ours = serde_json::to_value(&a)?;
            let theirs = serde_json::to_value(ck)?;
            let diffs: Vec<String> = ours
                .as_object()
                .unwrap()
                .iter()
                .filter(|(k, v)| theirs.get(k.as_str()) != Some(v))
                .map(|(k, v)| format!("{k}: checkpoint {} vs now {v}", theirs[k.as_str()]))
                .collect();
            bail!(
                "the checkpoint was made with different training settings ({}); \
                 resume with the same settings or start a new run",
                diffs.join(", ")
            );
        }
        Ok(())
    }
}

/// LoRA dropout must be in [0, 1): at 1 every LoRA input is zeroed and nothing trains.
pub fn check_lora_dropout(p: f64) -> Result<()> {
    ensure!(
        (0.0..1.0).contains(&p),
        "LoRA dropout must be in [0, 1), got {p} (at 1 nothing would train)"
    );
    Ok(())
}

/// Settings of `qlora train` outside [`TrainConfig`], checked before anything
/// is loaded so that a typo fails in a second with a clear message.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunSettings {
    pub epochs: Option<f64>,
    pub eval_split: Option<f64>,
    pub max_seq_len: Option<usize>,
    pub max_grad_norm: Option<f64>,
    pub lora_dropout: Option<f64>,
    pub rank: Option<usize>,
    pub alpha: Option<f64>,
}

impl RunSettings {
    pub fn validate(&self) -> Result<()> {
        if let Some(e) = self.epochs {
            ensure!(
                e.is_finite() && e > 0.0,
                "--epochs must be a positive number, got {e}"
            );
        }
        if let Some(f) = self.eval_split {
            ensure!(
                (0.0..1.0).contains(&f),
                "--eval-split must be in [0, 1), got {f}"
            );
        }
        if let Some(n) = self.max_seq_len {
            ensure!(
                n >= 2,
                "--max-seq-len must be at least 2 (a row needs an input and a next-token target), got {n}"
            );
        }
        if let Some(m) = self.max_grad_norm {
            ensure!(
                m.is_finite() && m >= 0.0,
                "--max-grad-norm must be a finite number >= 0 (0 = off), got {m}"
            );
        }
        if let Some(p) = self.lora_dropout {
            check_lora_dropout(p)?;
        }
        if let Some(r) = self.rank {
            ensure!(r >= 1, "--rank must be at least 1");
        }
        if let Some(a) = self.alpha {
            ensure!(a.is_finite(), "--alpha must be a finite number, got {a}");
        }
        Ok(())
    }
}
