//! [`Trainer::run`]: the whole training run around [`Trainer::train_step`]: the
//! evaluation and checkpoint cadence, `metrics.jsonl` (kept up to the checkpoint on
//! resume), the final adapter, and callbacks for whoever shows the progress.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::checkpoint::checkpoint_dir;
use crate::trainer::{StepMetrics, Trainer};

/// How a run is driven (the trajectory itself is the [`crate::TrainConfig`]'s).
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Output folder: `metrics.jsonl`, `checkpoint-N/`, `adapter/`.
    pub out: PathBuf,
    /// Stop after this step (the schedule still spans `max_steps`): for interrupting and resuming.
    pub stop_at_step: Option<u64>,
    /// Evaluate every N optimizer steps (and always at the last step); 0 = only at the last.
    pub eval_every: u64,
    /// Save a checkpoint every N steps (always one at the last step); 0 = only at the last.
    pub save_every: u64,
    /// The checkpoint this run resumed from (named in the error if a step fails).
    pub resumed_from: Option<PathBuf>,
    /// A data-parallel rank other than 0: trains and evaluates in step with rank 0 (the
    /// collectives need every rank) but writes nothing and reports nothing.
    pub follower: bool,
}

/// What [`Trainer::run`] reports as it goes; every method defaults to doing nothing.
pub trait Callbacks {
    /// A held-out evaluation: before training (`step` 0, fresh runs only) and at the cadence.
    fn on_eval(&mut self, _step: u64, _loss: f64, _perplexity: f64) {}
    /// Right after an optimizer step, before its evaluation (memory probes).
    fn on_optimizer_step(&mut self, _step: u64) {}
    /// After each optimizer step, once its line (with any evaluation) is in `metrics.jsonl`.
    fn on_step(&mut self, _metrics: &StepMetrics, _max_steps: u64) {}
    /// After a checkpoint folder is written.
    fn on_checkpoint(&mut self, _step: u64, _dir: &Path) {}
}

/// Callbacks that report nothing.
pub struct Silent;
impl Callbacks for Silent {}

/// What a finished [`Trainer::run`] wrote.
#[derive(Debug, Clone)]
pub struct RunReport {
    /// Every step's metrics, including those before a resume.
    pub history: Vec<StepMetrics>,
    pub metrics_path: PathBuf,
    pub adapter_dir: PathBuf,
    pub last_checkpoint: Option<PathBuf>,
}

/// Lines of an earlier run's `metrics.jsonl` up to `step` (later ones are dropped).
fn metrics_up_to(path: &Path, step: u64) -> Vec<StepMetrics> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| serde_json::from_str::<StepMetrics>(l).ok())
        .filter(|m| m.step <= step)
        .collect()
}

impl Trainer<'_> {
    /// Train until `max_steps` (or `opts.stop_at_step`), then save the adapter to
    /// `out/adapter`. A failing step is an error naming the last good checkpoint.
    pub fn run(&mut self, opts: &RunOptions, cb: &mut dyn Callbacks) -> Result<RunReport> {
        let out = &opts.out;
        let metrics_path = out.join("metrics.jsonl");
        if opts.follower {
            return self.follow(opts).map(|()| RunReport {
                history: Vec::new(),
                metrics_path,
                adapter_dir: out.join("adapter"),
                last_checkpoint: None,
            });
        }
        let mut history = if self.step > 0 {
            metrics_up_to(&metrics_path, self.step)
        } else {
            Vec::new()
        };
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
        let stop = opts
            .stop_at_step
            .unwrap_or(u64::MAX)
            .min(self.cfg.max_steps);
        if self.step == 0 {
            if let Some((l, p)) = self.evaluate()? {
                cb.on_eval(0, l, p);
            }
        }
        let mut last_ck = opts.resumed_from.clone();
        let due = |every: u64, step: u64| every > 0 && step.is_multiple_of(every);
        while self.step < stop {
            let mut m = self.train_step().map_err(|e| {
                let ck = last_ck
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "none (no checkpoint was written yet)".into());
                e.context(format!("training stopped; last good checkpoint: {ck}"))
            })?;
            let step = m.step;
            cb.on_optimizer_step(step);
            let is_last = step == stop;
            if due(opts.eval_every, step) || is_last {
                if let Some((l, p)) = self.evaluate()? {
                    m.eval_loss = Some(l);
                    m.eval_ppl = Some(p);
                    cb.on_eval(step, l, p);
                }
            }
            writeln!(mf, "{}", serde_json::to_string(&m)?)?;
            mf.flush()?;
            cb.on_step(&m, self.cfg.max_steps);
            history.push(m);
            if due(opts.save_every, step) || is_last {
                let ck = checkpoint_dir(out, step);
                self.save_checkpoint(&ck)?;
                cb.on_checkpoint(step, &ck);
                last_ck = Some(ck);
            }
        }
        let adapter_dir = out.join("adapter");
        qlora_lora::save_adapter(&adapter_dir, &self.adapter, &self.peft)?;
        Ok(RunReport {
            history,
            metrics_path,
            adapter_dir,
            last_checkpoint: last_ck,
        })
    }

    /// [`Trainer::run`] of a follower rank: the same steps and evaluations, no files.
    fn follow(&mut self, opts: &RunOptions) -> Result<()> {
        let stop = opts
            .stop_at_step
            .unwrap_or(u64::MAX)
            .min(self.cfg.max_steps);
        if self.step == 0 {
            self.evaluate()?;
        }
        while self.step < stop {
            let step = self.train_step()?.step;
            if (opts.eval_every > 0 && step.is_multiple_of(opts.eval_every)) || step == stop {
                self.evaluate()?;
            }
        }
        Ok(())
    }
}
