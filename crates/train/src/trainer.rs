//! The optimizer-step loop: gradient accumulation normalised by the total
//! number of target tokens of the step, global-norm clipping, AdamW, the LR
//! schedule, deterministic data order, evaluation, and NaN/inf guards.

use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use qlora_data::rows::{epoch_order, Row};
use qlora_dist::{Collectives, Communicator, SingleProcess};
use qlora_lora::{Adapter, PeftConfig};
use qlora_model::ops::lora::splitmix64;
use qlora_model::{Batch, DropoutRows, Model, StepOptions};
use serde::{Deserialize, Serialize};

use crate::optim::{clip_coef, global_grad_norm, AdamW, Moments};
use crate::params::{grads_in_order, params_of, store_params, Param};
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

/// What the run trains on; a checkpoint only resumes onto the same identity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Identity {
    /// How the user named the base model (informational).
    pub model_ref: String,
    /// Hash of the parsed model configuration (architecture and every shape).
    pub model_config_hash: String,
    /// Base weight format (`none`, `nf4`, …).
    pub quant: String,
    /// Hash of the tokenized training rows.
    pub data_hash: String,
}

impl Identity {
    pub fn check(&self, ck: &Identity) -> Result<()> {
        if self.model_config_hash != ck.model_config_hash {
            bail!(
                "the checkpoint was trained on a different base model ({} , config hash {}) than {} (config hash {})",
                ck.model_ref, ck.model_config_hash, self.model_ref, self.model_config_hash
            );
        }
        if self.quant != ck.quant {
            bail!(
                "the checkpoint was trained on a {} base but this run uses {}",
                ck.quant,
                self.quant
            );
        }
        if self.data_hash != ck.data_hash {
            bail!("the checkpoint was trained on different data (after tokenization); resume with the same data and settings");
        }
        Ok(())
    }
}

/// 64-bit FNV-1a, hex: stable across runs and platforms (unlike `DefaultHasher`).
pub fn fnv_hex(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}")
}

fn fnv_u64(bytes: &[u8]) -> u64 {
    u64::from_str_radix(&fnv_hex(bytes), 16).expect("hex")
}

/// Hash of tokenized rows (ids and labels).
pub fn rows_hash(rows: &[Row]) -> String {
    let mut buf = Vec::new();
    for r in rows {
        for p in &r.parts {
            for &t in &p.input_ids {
                buf.extend_from_slice(&t.to_le_bytes());
            }
            for &l in &p.labels {
                buf.extend_from_slice(&l.to_le_bytes());
            }
            buf.push(0xFE);
        }
        buf.push(0xFF);
    }
    fnv_hex(&buf)
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepMetrics {
    pub step: u64,
    pub epoch: u64,
    /// Mean loss of the batch this step used, before the update.
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub clip_coef: f64,
    pub lr: f64,
    /// Non-pad input tokens processed by this step.
    pub tokens: usize,
    pub target_tokens: usize,
    pub tokens_per_s: f64,
    pub elapsed_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_ppl: Option<f64>,
}

/// Where the data iterator stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataPosition {
    pub epoch: u64,
    /// Index into the epoch's order of the next row.
    pub pos: usize,
}

/// Build a model batch from rows: right padding with labels −100; packed rows
/// (several parts) get position ids restarting per part and segment ids
/// (padding gets its own segment).
pub fn collate(rows: &[&Row], pad_id: u32) -> Batch {
    let s = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let packed = rows.iter().any(|r| r.parts.len() > 1);
    let mut b = Batch::default();
    let (mut pos_rows, mut seg_rows) = (Vec::new(), Vec::new());
    for r in rows {
        let (mut ids, mut labels, mut pos, mut seg) = r.flatten();
        let n = ids.len();
        let pad_seg = r.parts.len() as u32;
        ids.resize(s, pad_id);
        labels.resize(s, qlora_data::IGNORE_INDEX);
        pos.extend(0..(s - n) as u32);
        seg.resize(s, pad_seg);
        b.input_ids.push(ids);
        b.labels.push(labels);
        pos_rows.push(pos);
        seg_rows.push(seg);
    }
    if packed {
        b.position_ids = Some(pos_rows);
        b.segment_ids = Some(seg_rows);
    }
    b
}

/// Loss targets of one row after the shift (label ≠ −100 at t ≥ 1).
pub fn row_targets(r: &Row) -> usize {
    let (_, labels, _, _) = r.flatten();
    labels
        .iter()
        .skip(1)
        .filter(|&&l| l != qlora_data::IGNORE_INDEX)
        .count()
}

/// Loss targets of a batch after the shift (label ≠ −100 at t ≥ 1).
pub fn batch_targets(b: &Batch) -> usize {
    b.labels
        .iter()
        .map(|r| {
            r.iter()
                .skip(1)
                .filter(|&&l| l != qlora_data::IGNORE_INDEX)
                .count()
        })
        .sum()
}

/// A few module names of a list, for messages.
fn summarize(v: &[String]) -> String {
    let mut s: Vec<&str> = v.iter().take(3).map(String::as_str).collect();
    if v.len() > 3 {
        s.push("…");
    }
    s.join(", ")
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

/// The training state and loop.
pub struct Trainer<'m> {
    pub model: &'m Model,
    pub cfg: TrainConfig,
    pub identity: Identity,
    pub peft: PeftConfig,
    pub adapter: Adapter,
    pub(crate) params: Vec<Param>,
    pub(crate) moments: Vec<Moments>,
    /// Optimizer steps done.
    pub step: u64,
    pub(crate) rows: Vec<Row>,
    pub eval_rows: Vec<Row>,
    pub(crate) data: DataPosition,
    order: Vec<usize>,
    /// Seconds of training before this process (from a checkpoint).
    pub(crate) elapsed_before: f64,
    started: Instant,
    pub tokens_seen: u64,
    /// The data-parallel group (one rank unless [`Trainer::with_communicator`]).
    pub(crate) comm: &'m dyn Communicator,
    /// Data-parallel ranks of the run this one resumes (its data order depends on it).
    pub(crate) resumed_world: Option<usize>,
}

/// The communicator of a one-process run.
static SINGLE: SingleProcess = SingleProcess;

/// One rank's share of a micro-batch of the global batch.
struct Micro {
    /// `None` when the global batch is too short to give this rank a row.
    batch: Option<Batch>,
    /// Where this rank's rows sit in the global batch (for the dropout masks).
    dropout_rows: DropoutRows,
    /// Loss targets of the whole global micro-batch.
    global_targets: usize,
    /// Non-pad tokens of the whole global micro-batch.
    global_tokens: usize,
}

impl<'m> Trainer<'m> {
    /// Start a run from `adapter` (fresh or loaded). Its dropout is set from the config.
    pub fn new(
        model: &'m Model,
        cfg: TrainConfig,
        identity: Identity,
        peft: PeftConfig,
        mut adapter: Adapter,
        rows: Vec<Row>,
        eval_rows: Vec<Row>,
    ) -> Result<Self> {
        ensure!(!rows.is_empty(), "no training rows");
        cfg.validate()?;
        adapter.config.lora_dropout = cfg.lora_dropout;
        let mut peft = peft;
        peft.lora_dropout = cfg.lora_dropout;
        let params = params_of(&adapter)?;
        let moments = params
            .iter()
            .map(|p| Moments::zeros(p.data.len()))
            .collect();
        let order = epoch_order(rows.len(), cfg.seed, 0, cfg.shuffle);
        Ok(Trainer {
            model,
            cfg,
            identity,
            peft,
            adapter,
            params,
            moments,
            step: 0,
            rows,
            eval_rows,
            data: DataPosition { epoch: 0, pos: 0 },
            order,
            elapsed_before: 0.0,
            started: Instant::now(),
            tokens_seen: 0,
            comm: &SINGLE,
            resumed_world: None,
        })
    }

    /// Train as one rank of a data-parallel group: `cfg.batch_size` is per
    /// rank; each optimizer step consumes `size · batch_size · grad_accum` rows,
    /// rank r taking rows r, r+size, … of every global micro-batch, and the
    /// loss, gradient norm, clipping and update are those of the global batch
    /// (gradients summed over ranks, token-normalized by the global target
    /// count), identical on every rank. Every rank must call this with the same
    /// settings, data and starting state (checked here).
    pub fn with_communicator(mut self, comm: &'m dyn Communicator) -> Result<Self> {
        let state = serde_json::to_vec(&(&self.cfg, &self.identity, self.step, self.data))?;
        comm.check_same("the training settings, identity and step", fnv_u64(&state))?;
        comm.check_same(
            "the training data",
            fnv_u64(rows_hash(&self.rows).as_bytes()),
        )?;
        let mut ps = Vec::new();
        for p in &self.params {
            ps.extend(p.data.iter().flat_map(|x| x.to_le_bytes()));
        }
        comm.check_same("the initial adapter weights", fnv_u64(&ps))?;
        self.comm = comm;
        self.check_world()?;
        Ok(self)
    }

    /// A checkpoint resumes only with the number of ranks it was made with
    /// (the rows of a step, and so the trajectory, depend on it).
    fn check_world(&self) -> Result<()> {
        if let Some(w) = self.resumed_world {
            let n = self.comm.size();
            ensure!(
                w == n,
                "the checkpoint was written by a run of {w} data-parallel process{} but this run has {n}; \
                 resume with `mpirun -n {w}` (the rows of each step depend on the number of processes){}",
                if w == 1 { "" } else { "es" },
                if w == 1 { " or without mpirun" } else { "" }
            );
        }
        Ok(())
    }

    /// This process's rank and the number of data-parallel ranks.
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }
    pub fn world_size(&self) -> usize {
        self.comm.size()
    }
    /// Whether this process writes files (metrics, checkpoints, the adapter).
    pub fn is_main(&self) -> bool {
        self.comm.rank() == 0
    }

    pub(crate) fn set_position(&mut self, data: DataPosition) -> Result<()> {
        ensure!(
            data.pos <= self.rows.len(),
            "checkpoint data position {} is past the {} rows",
            data.pos,
            self.rows.len()
        );
        self.data = data;
        self.order = epoch_order(self.rows.len(), self.cfg.seed, data.epoch, self.cfg.shuffle);
        Ok(())
    }

    pub fn data_position(&self) -> DataPosition {
        self.data
    }

    pub fn num_rows(&self) -> usize {
        self.rows.len()
    }

    pub fn done(&self) -> bool {
        self.step >= self.cfg.max_steps
    }

    pub fn elapsed_s(&self) -> f64 {
        self.elapsed_before + self.started.elapsed().as_secs_f64()
    }

    /// The next micro-batch: `world · batch_size` rows in epoch order (an
    /// epoch's last batch may be short, PyTorch's `drop_last=False`), of which
    /// this rank takes rows `rank, rank + world, …`.
    fn next_micro(&mut self) -> Micro {
        if self.data.pos >= self.rows.len() {
            self.data = DataPosition {
                epoch: self.data.epoch + 1,
                pos: 0,
            };
            self.order = epoch_order(
                self.rows.len(),
                self.cfg.seed,
                self.data.epoch,
                self.cfg.shuffle,
            );
        }
        let (rank, world) = (self.comm.rank(), self.comm.size());
        let end = (self.data.pos + self.cfg.batch_size * world).min(self.rows.len());
        let global: Vec<&Row> = self.order[self.data.pos..end]
            .iter()
            .map(|&i| &self.rows[i])
            .collect();
        self.data.pos = end;
        let local_idx: Vec<usize> = (rank..global.len()).step_by(world).collect();
        let local: Vec<&Row> = local_idx.iter().map(|&j| global[j]).collect();
        Micro {
            batch: (!local.is_empty()).then(|| collate(&local, self.cfg.pad_id)),
            dropout_rows: DropoutRows {
                rows: local_idx,
                row_len: global.iter().map(|r| r.len()).max().unwrap_or(0),
            },
            global_targets: global.iter().map(|r| row_targets(r)).sum(),
            global_tokens: global.iter().map(|r| r.len()).sum(),
        }
    }

    /// One optimizer step over `grad_accum` micro-batches.
    pub fn train_step(&mut self) -> Result<StepMetrics> {
        let t0 = Instant::now();
        self.check_world()?;
        let micro: Vec<Micro> = (0..self.cfg.grad_accum)
            .map(|_| self.next_micro())
            .collect();
        let world = self.comm.size();
        let step1 = self.step + 1;
        // The step's target count, summed over ranks first: every rank's loss
        // is normalized by the global batch's count.
        let local_targets: usize = micro
            .iter()
            .filter_map(|m| m.batch.as_ref())
            .map(batch_targets)
            .sum();
        let mut counts = [local_targets as u64];
        self.comm.all_reduce_sum(&mut counts)?;
        let total = counts[0] as usize;
        let expected: usize = micro.iter().map(|m| m.global_targets).sum();
        ensure!(
            total == expected,
            "step {step1}: the ranks counted {total} target tokens, the global batch has {expected}"
        );
        ensure!(
            total > 0,
            "step {step1}: the batch has no target tokens (all labels masked)"
        );
        let tokens: usize = micro.iter().map(|m| m.global_tokens).sum();
        let mut sum_ce = 0f64;
        let mut acc: Option<Vec<Vec<f32>>> = None;
        for (i, m) in micro.iter().enumerate() {
            let Some(b) = &m.batch else { continue };
            let opts = StepOptions {
                loss_denominator: total as f32,
                checkpointing: self.cfg.checkpointing,
                lora_dropout_seed: splitmix64(self.cfg.seed ^ splitmix64(step1 * 1024 + i as u64)),
                dropout_rows: (world > 1).then(|| m.dropout_rows.clone()),
            };
            let (s, c, g) = self
                .model
                .forward_backward(b, &self.adapter, &opts)
                .with_context(|| format!("step {step1}, micro-batch {i}"))?;
            ensure!(
                c == batch_targets(b),
                "model counted {c} targets, trainer {}",
                batch_targets(b)
            );
            sum_ce += s;
            let g = grads_in_order(g, &self.params)?;
            match &mut acc {
                None => acc = Some(g),
                Some(a) => {
                    for (x, y) in a.iter_mut().zip(&g) {
                        x.iter_mut().zip(y).for_each(|(p, q)| *p += q);
                    }
                }
            }
        }
        let mut grads = match acc {
            Some(g) => g,
            // a rank without rows this step (short last batch) adds zeros
            None => self
                .params
                .iter()
                .map(|p| vec![0f32; p.data.len()])
                .collect(),
        };
        if world > 1 {
            let mut ce = [sum_ce];
            self.comm.all_reduce_sum(&mut ce)?;
            sum_ce = ce[0];
            // one flat buffer: one deterministic all-reduce per step
            let mut flat: Vec<f32> = Vec::with_capacity(grads.iter().map(Vec::len).sum());
            grads.iter().for_each(|g| flat.extend_from_slice(g));
            self.comm.all_reduce_sum(&mut flat)?;
            let mut off = 0;
            for g in grads.iter_mut() {
                let n = g.len();
                g.copy_from_slice(&flat[off..off + n]);
                off += n;
            }
        }
        let loss = sum_ce / total as f64;
        if !loss.is_finite() {
            bail!("non-finite loss ({loss}) at step {step1}");
        }
        let norm = global_grad_norm(grads.iter().map(|g| &g[..]));
        if !norm.is_finite() {
            bail!("non-finite gradient (global norm {norm}) at step {step1}");
        }
        let coef = match self.cfg.max_grad_norm {
            Some(m) if m > 0.0 => {
                let c = clip_coef(norm, m);
                grads
                    .iter_mut()
                    .for_each(|g| g.iter_mut().for_each(|x| *x *= c));
                c
            }
            _ => 1.0,
        };
        let lr = self.cfg.schedule().lr_at(self.step);
        for ((p, g), m) in self.params.iter_mut().zip(&grads).zip(&mut self.moments) {
            self.cfg.adamw.update(&mut p.data, g, m, lr, step1);
        }
        // A finite loss and gradient can still give an inf/NaN update (a huge
        // learning rate): stop here, before the adapter or any checkpoint sees it.
        self.check_finite()
            .with_context(|| format!("non-finite update at step {step1} (lr {lr:e})"))?;
        store_params(&mut self.adapter, &self.params)?;
        self.step = step1;
        self.tokens_seen += tokens as u64;
        let dt = t0.elapsed().as_secs_f64();
        Ok(StepMetrics {
            step: step1,
            epoch: self.data.epoch,
            loss,
            grad_norm: norm as f64,
            clip_coef: coef as f64,
            lr,
            tokens,
            target_tokens: total,
            tokens_per_s: tokens as f64 / dt.max(1e-9),
            elapsed_s: self.elapsed_s(),
            eval_loss: None,
            eval_ppl: None,
        })
    }

    /// Every parameter and AdamW moment is finite; the error names the first
    /// tensor that is not. Checked after every update and before any write.
    pub fn check_finite(&self) -> Result<()> {
        for (p, m) in self.params.iter().zip(&self.moments) {
            for (what, v) in [("", &p.data), (" exp_avg", &m.m), (" exp_avg_sq", &m.v)] {
                if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                    bail!("{}{what}[{i}] is {}", p.key(), v[i]);
                }
            }
        }
        Ok(())
    }

    /// A resumed run must train the adapter the checkpoint holds: the same
    /// rank, alpha, rsLoRA and adapted modules as `requested` (what the
    /// command line or `--init-adapter` asks for), like every other setting.
    pub fn check_same_adapter(&self, requested: &PeftConfig) -> Result<()> {
        let ck = &self.peft;
        let mut diffs = Vec::new();
        if ck.r != requested.r {
            diffs.push(format!("rank: checkpoint {} vs now {}", ck.r, requested.r));
        }
        if ck.lora_alpha != requested.lora_alpha {
            diffs.push(format!(
                "alpha: checkpoint {} vs now {}",
                ck.lora_alpha, requested.lora_alpha
            ));
        }
        if ck.use_rslora != requested.use_rslora {
            diffs.push(format!(
                "rslora: checkpoint {} vs now {}",
                ck.use_rslora, requested.use_rslora
            ));
        }
        if ck.use_dora != requested.use_dora {
            diffs.push(format!(
                "dora: checkpoint {} vs now {}",
                ck.use_dora, requested.use_dora
            ));
        }
        let want = requested.resolve_targets(&self.model.config)?;
        let have = self.adapter.ordered_modules();
        if want != have {
            diffs.push(format!(
                "target modules: checkpoint {} modules ({}) vs now {} ({})",
                have.len(),
                summarize(&have),
                want.len(),
                summarize(&want)
            ));
        }
        ensure!(
            diffs.is_empty(),
            "the checkpoint was made with a different adapter ({}); \
             resume with the same settings or start a new run",
            diffs.join(", ")
        );
        Ok(())
    }

    /// Mean loss over the held-out rows (no dropout): `(loss, perplexity)`.
    /// Under data parallelism the eval batches are dealt round-robin to the
    /// ranks and the sums added up (every rank gets the same answer).
    pub fn evaluate(&self) -> Result<Option<(f64, f64)>> {
        if self.comm.size() == 1 {
            return evaluate_rows(
                self.model,
                Some(&self.adapter),
                &self.eval_rows,
                self.cfg.batch_size,
                self.cfg.pad_id,
            );
        }
        if self.eval_rows.is_empty() {
            return Ok(None);
        }
        let (rank, world) = (self.comm.rank(), self.comm.size());
        let mut sums = [0f64, 0f64];
        for (k, chunk) in self
            .eval_rows
            .chunks(self.cfg.batch_size.max(1))
            .enumerate()
        {
            if k % world != rank {
                continue;
            }
            let refs: Vec<&Row> = chunk.iter().collect();
            let b = collate(&refs, self.cfg.pad_id);
            if batch_targets(&b) == 0 {
                continue;
            }
            let (s, c) = self.model.loss(&b, Some(&self.adapter))?;
            sums[0] += s;
            sums[1] += c as f64;
        }
        self.comm.all_reduce_sum(&mut sums)?;
        if sums[1] == 0.0 {
            return Ok(None);
        }
        let l = sums[0] / sums[1];
        ensure!(
            l.is_finite(),
            "the evaluation loss is not finite ({l}): the model or adapter holds inf/NaN weights"
        );
        Ok(Some((l, l.exp())))
    }
}

/// Token-weighted mean loss of `rows` in batches, and its perplexity.
pub fn evaluate_rows(
    model: &Model,
    adapter: Option<&Adapter>,
    rows: &[Row],
    batch_size: usize,
    pad_id: u32,
) -> Result<Option<(f64, f64)>> {
    Ok(eval_stats(model, adapter, rows, batch_size, pad_id)?.map(|e| (e.loss, e.perplexity)))
}

/// The result of [`eval_stats`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalStats {
    /// Mean shifted cross-entropy over every unmasked target (sum over all targets / count,
    /// as transformers computes it).
    pub loss: f64,
    pub perplexity: f64,
    /// Unmasked targets after the one-token shift.
    pub target_tokens: usize,
}

/// [`evaluate_rows`] with the target count; `None` when no row has an unmasked target.
/// Rows are right-padded (labels [`qlora_data::IGNORE_INDEX`]) to the longest of the batch.
pub fn eval_stats(
    model: &Model,
    adapter: Option<&Adapter>,
    rows: &[Row],
    batch_size: usize,
    pad_id: u32,
) -> Result<Option<EvalStats>> {
    let (mut sum, mut count) = (0f64, 0usize);
    for chunk in rows.chunks(batch_size.max(1)) {
        let refs: Vec<&Row> = chunk.iter().collect();
        let b = collate(&refs, pad_id);
        if batch_targets(&b) == 0 {
            continue;
        }
        let (s, c) = model.loss(&b, adapter)?;
        sum += s;
        count += c;
    }
    if count == 0 {
        return Ok(None);
    }
    let loss = sum / count as f64;
    ensure!(
        loss.is_finite(),
        "the evaluation loss is not finite ({loss}): the model or adapter holds inf/NaN weights"
    );
    Ok(Some(EvalStats {
        loss,
        perplexity: loss.exp(),
        target_tokens: count,
    }))
}
