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
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::batch::{batch_targets, collate_binned, row_targets, Binning};
use crate::config::TrainConfig;
use crate::eval::evaluate_rows;
use crate::identity::{fnv_u64, rows_hash, Identity};
use crate::optim::{clip_coef, global_grad_norm, Moments};
use crate::params::{grads_in_order, params_of, store_params, Param};

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

/// A few module names of a list, for messages.
fn summarize(v: &[String]) -> String {
    let mut s: Vec<&str> = v.iter().take(3).map(String::as_str).collect();
    if v.len() > 3 {
        s.push("…");
    }
    s.join(", ")
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
    /// How micro-batches place short rows together ([`collate_binned`]).
    binning: Binning,
}

/// One pad token with its label masked: a batch that computes nothing but
/// makes a sharded model's forward (and its gathers) happen.
fn idle_batch(pad_id: u32) -> Batch {
    Batch {
        input_ids: vec![vec![pad_id]],
        labels: vec![vec![-100]],
        position_ids: None,
        segment_ids: None,
    }
}

/// The communicator of a one-process run.
static SINGLE: SingleProcess = SingleProcess;

/// One rank's share of a micro-batch of the global batch.
struct Micro {
    /// `None` when the global batch is too short to give this rank a row.
    batch: Option<Batch>,
    /// Where this rank's tokens sit in the global batch (for the dropout
    /// masks); `None` where they sit where they are (one process, no rows
    /// placed together).
    dropout_rows: Option<DropoutRows>,
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
        let longest = rows.iter().chain(&eval_rows).map(Row::len).max();
        let binning = Binning::for_model(&model.config, longest.unwrap_or(0));
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
            binning,
        })
    }

    /// How micro-batches place short rows together ([`collate_binned`]);
    /// `Binning::default()` never does (the padded batches as collated).
    pub fn with_binning(mut self, binning: Binning) -> Self {
        self.binning = binning;
        self
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
        if let Some(s) = self.model.shard_spec() {
            ensure!(
                (s.rank, s.size) == (comm.rank(), comm.size()),
                "the model was loaded as shard {} of {} but this process is rank {} of {}",
                s.rank,
                s.size,
                comm.rank(),
                comm.size()
            );
        }
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
        // the masks of the global batch's padded layout, wherever this rank's
        // tokens run: the same run with one process or several, binned or not
        let row_len = global.iter().map(|r| r.len()).max().unwrap_or(0);
        let (batch, dropout_rows) = if local.is_empty() {
            (None, None)
        } else {
            let c = collate_binned(&local, self.cfg.pad_id, self.binning);
            let positions = (world > 1 || c.binned).then(|| DropoutRows {
                positions: c
                    .sources
                    .iter()
                    .map(|src| src.map_or(0, |(r, p)| local_idx[r] * row_len + p))
                    .collect(),
            });
            (Some(c.batch), positions)
        };
        Micro {
            batch,
            dropout_rows,
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
        let sharded = self.model.shard_spec().is_some();
        for (i, m) in micro.iter().enumerate() {
            let seed = splitmix64(self.cfg.seed ^ splitmix64(step1 * 1024 + i as u64));
            let Some(b) = &m.batch else {
                if sharded {
                    // a sharded model's layers are gathered by all ranks together:
                    // a rank without rows runs a masked one-token batch (no loss, no gradient)
                    self.idle_micro_step(total, seed)
                        .with_context(|| format!("step {step1}, micro-batch {i} (no rows here)"))?;
                }
                continue;
            };
            let opts = StepOptions {
                loss_denominator: total as f32,
                checkpointing: self.cfg.checkpointing,
                lora_dropout_seed: seed,
                dropout_rows: m.dropout_rows.clone(),
            };
            let (s, c, g) = self
                .model
                .forward_backward_on(b, &self.adapter, &opts, Some(self.comm))
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
            Some(m) if m > 0.0 => Some(clip_coef(norm, m)),
            _ => None,
        };
        let lr = self.cfg.schedule().lr_at(self.step);
        // Clip and update tensor by tensor, in parallel (each tensor's
        // elements in order, as one thread would): the same bits.
        let adamw = &self.cfg.adamw;
        let finite = self
            .params
            .par_iter_mut()
            .zip(grads.par_iter_mut())
            .zip(self.moments.par_iter_mut())
            .map(|((p, g), m)| {
                if let Some(c) = coef {
                    g.iter_mut().for_each(|x| *x *= c);
                }
                adamw.update(&mut p.data, g, m, lr, step1)
            })
            .reduce(|| true, |a, b| a & b);
        let coef = coef.unwrap_or(1.0);
        // A finite loss and gradient can still give an inf/NaN update (a huge
        // learning rate): stop here, before the adapter or any checkpoint sees
        // it (`check_finite` names the first tensor that is not finite).
        if !finite {
            self.check_finite()
                .with_context(|| format!("non-finite update at step {step1} (lr {lr:e})"))?;
            bail!("non-finite update at step {step1} (lr {lr:e})");
        }
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

    /// The forward/backward of a rank that has no rows in a micro-batch of a
    /// sharded run: one pad token, label masked, results discarded (it only
    /// takes part in the layer gathers of the other ranks).
    fn idle_micro_step(&self, total: usize, seed: u64) -> Result<()> {
        let b = idle_batch(self.cfg.pad_id);
        let opts = StepOptions {
            loss_denominator: total.max(1) as f32,
            checkpointing: self.cfg.checkpointing,
            lora_dropout_seed: seed,
            dropout_rows: None,
        };
        let (_, c, _) =
            self.model
                .forward_backward_on(&b, &self.adapter, &opts, Some(self.comm))?;
        ensure!(c == 0, "the idle batch counted {c} targets");
        Ok(())
    }

    /// Every parameter and AdamW moment is finite; the error names the first
    /// tensor that is not. Checked after every update and before any write.
    pub fn check_finite(&self) -> Result<()> {
        let finite = |v: &[f32]| v.iter().all(|x| x.is_finite());
        let all_finite = self
            .params
            .par_iter()
            .zip(self.moments.par_iter())
            .all(|(p, m)| finite(&p.data) && finite(&m.m) && finite(&m.v));
        if all_finite {
            return Ok(());
        }
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
        let sharded = self.model.shard_spec().is_some();
        let mut sums = [0f64, 0f64];
        let chunks: Vec<&[Row]> = self.eval_rows.chunks(self.cfg.batch_size.max(1)).collect();
        // a sharded model: every rank runs one batch per round (a masked one
        // where it has none left), so the layer gathers line up
        let rounds = chunks.len().div_ceil(world);
        for k in (0..rounds * world).filter(|k| k % world == rank) {
            let b = match chunks.get(k) {
                Some(chunk) => {
                    let refs: Vec<&Row> = chunk.iter().collect();
                    collate_binned(&refs, self.cfg.pad_id, self.binning).batch
                }
                None if sharded => idle_batch(self.cfg.pad_id),
                None => continue,
            };
            if batch_targets(&b) == 0 && !sharded {
                continue;
            }
            let (s, c) = self
                .model
                .loss_on(&b, Some(&self.adapter), Some(self.comm))?;
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
