//! What the training tests share: reading the Python generators' safetensors, the
//! fixtures' batches as rows, and the setup every torch + PEFT trajectory fixture was
//! generated with (batch 2, constant lr 1e-3, AdamW defaults, clip 1.0, no dropout,
//! no shuffling, seed 0). Each test file uses a part of it.
#![allow(dead_code)]

use qlora_data::rows::Row;
use qlora_data::Example;
use qlora_lora::{load_adapter, Adapter, PeftConfig};
use qlora_model::Model;
use qlora_testutil::fixtures as fx;
use qlora_train::{AdamW, Identity, ScheduleKind, StepMetrics, TrainConfig, Trainer};

use safetensors::SafeTensors;

/// A tensor's little-endian elements, `N` bytes each.
fn elems<const N: usize, T>(st: &SafeTensors, k: &str, f: fn([u8; N]) -> T) -> Vec<T> {
    st.tensor(k)
        .unwrap_or_else(|e| panic!("fixture tensor {k}: {e}"))
        .data()
        .chunks_exact(N)
        .map(|c| f(c.try_into().unwrap()))
        .collect()
}

pub fn st_f32(st: &SafeTensors, k: &str) -> Vec<f32> {
    elems(st, k, f32::from_le_bytes)
}

pub fn st_i64(st: &SafeTensors, k: &str) -> Vec<i64> {
    elems(st, k, i64::from_le_bytes)
}

/// The rows of a trajectory fixture's batches `batch{i}_input_ids` / `batch{i}_labels`
/// (i = 0, 1, ... while present), in order; each batch is `[rows, seq]`.
pub fn batch_rows(st: &SafeTensors) -> Vec<Row> {
    let mut rows = Vec::new();
    for i in 0.. {
        let key = format!("batch{i}_input_ids");
        let Ok(view) = st.tensor(&key) else { break };
        let seq = *view.shape().last().expect("a batch is [rows, seq]");
        let ids = st_i64(st, &key);
        let labels = st_i64(st, &format!("batch{i}_labels"));
        assert_eq!(
            ids.len(),
            labels.len(),
            "batch {i}: ids and labels differ in size"
        );
        for (ids, labels) in ids.chunks_exact(seq).zip(labels.chunks_exact(seq)) {
            rows.push(Row::single(Example {
                input_ids: ids.iter().map(|&x| x as u32).collect(),
                labels: labels.to_vec(),
            }));
        }
    }
    rows
}

/// The run identity a checkpoint records; its values only have to stay the same
/// between a run and its resume.
pub fn ident() -> Identity {
    Identity {
        model_ref: "tiny".into(),
        model_config_hash: "h".into(),
        quant: "none".into(),
        data_hash: "d".into(),
    }
}

/// The fixtures' training setup, for `steps` optimizer steps.
pub fn reference_cfg(steps: u64) -> TrainConfig {
    TrainConfig {
        batch_size: 2,
        grad_accum: 1,
        max_steps: steps,
        lr: 1e-3,
        schedule: ScheduleKind::Constant,
        warmup_steps: 0,
        adamw: AdamW::default(),
        max_grad_norm: Some(1.0),
        seed: 0,
        shuffle: false,
        lora_dropout: 0.0,
        checkpointing: false,
        pad_id: 0,
    }
}

/// Every remaining step's metrics.
pub fn run(t: &mut Trainer<'_>) -> Vec<StepMetrics> {
    let mut v = Vec::new();
    while !t.done() {
        v.push(t.train_step().unwrap());
    }
    v
}

/// Asserts that every step's loss and gradient norm are within `rtol` (relative) of
/// the fixture's `loss` / `grad_norm`; returns the worst relative differences
/// (loss, grad norm) for the report.
pub fn assert_steps_match(
    m: &[StepMetrics],
    st: &SafeTensors,
    label: &str,
    rtol: f64,
) -> (f64, f64) {
    let (loss, norm) = (st_f32(st, "loss"), st_f32(st, "grad_norm"));
    assert_eq!(m.len(), loss.len(), "{label}: step count");
    let (mut wl, mut wn) = (0f64, 0f64);
    for i in 0..m.len() {
        let rl = (m[i].loss - loss[i] as f64).abs() / loss[i] as f64;
        let rn = (m[i].grad_norm - norm[i] as f64).abs() / norm[i] as f64;
        (wl, wn) = (wl.max(rl), wn.max(rn));
        assert!(
            rl < rtol,
            "{label} step {i}: loss {} vs {}",
            m[i].loss,
            loss[i]
        );
        assert!(
            rn < rtol,
            "{label} step {i}: grad norm {} vs {}",
            m[i].grad_norm,
            norm[i]
        );
    }
    (wl, wn)
}

/// Rows of unequal lengths with masked prefixes.
pub fn uneven_rows(n: usize) -> Vec<Row> {
    (0..n)
        .map(|i| {
            let len = 5 + (i * 7) % 13;
            let ids: Vec<u32> = (0..len).map(|j| ((i * 31 + j * 17) % 320) as u32).collect();
            let mut labels: Vec<i64> = ids.iter().map(|&x| x as i64).collect();
            for l in labels.iter_mut().take(i % 4) {
                *l = -100;
            }
            Row::single(Example {
                input_ids: ids,
                labels,
            })
        })
        .collect()
}

/// The tiny fixture's PEFT adapter (`tiny_lora_adapter`), checked against `model`.
pub fn start_adapter(model: &Model) -> (PeftConfig, Adapter) {
    load_adapter(fx().join("tiny_lora_adapter/adapter"), Some(&model.config)).unwrap()
}

/// The data-parallel and sharding tests' training setup: cosine with one warm-up step,
/// weight decay 0.01, clipping at 0.5, shuffled rows (seed 3).
pub fn dp_cfg(
    batch: usize,
    accum: usize,
    steps: u64,
    dropout: f64,
    checkpointing: bool,
) -> TrainConfig {
    TrainConfig {
        batch_size: batch,
        grad_accum: accum,
        max_steps: steps,
        lr: 1e-3,
        schedule: ScheduleKind::Cosine,
        warmup_steps: 1,
        adamw: AdamW {
            weight_decay: 0.01,
            ..AdamW::default()
        },
        max_grad_norm: Some(0.5),
        seed: 3,
        shuffle: true,
        lora_dropout: dropout,
        checkpointing,
        pad_id: 0,
    }
}

/// A run's per-step metrics and its final adapter tensors.
pub type Run = (Vec<StepMetrics>, Vec<Vec<f32>>);

/// Steps `t` to its end.
pub fn run_to_end(t: &mut Trainer<'_>) -> Run {
    let mut v = Vec::new();
    while !t.done() {
        v.push(t.train_step().unwrap());
    }
    let p = qlora_train::params::params_of(&t.adapter).unwrap();
    (v, p.into_iter().map(|p| p.data).collect())
}

/// N ranks against one process at N times the batch: every rank ends bit-identical to
/// rank 0 (losses and adapter); rank 0's per-step token counts and epochs equal the single
/// process's, its loss and grad norm are within 1e-5 relative, its final adapter within
/// 1e-5 absolute; and the run moved (the comparison is not vacuous).
pub fn assert_ranks_reproduce(what: &dyn std::fmt::Debug, single: &Run, ranks: &[Run]) {
    let (m1, p1) = single;
    for (r, (m, p)) in ranks.iter().enumerate().skip(1) {
        assert_eq!(
            p, &ranks[0].1,
            "{what:?}: rank {r} adapter differs from rank 0"
        );
        for (a, b) in m.iter().zip(&ranks[0].0) {
            assert_eq!(
                a.loss.to_bits(),
                b.loss.to_bits(),
                "{what:?}: rank {r} loss"
            );
        }
    }
    let (mn, pn) = &ranks[0];
    assert_eq!(m1.len(), mn.len());
    for (a, b) in m1.iter().zip(mn) {
        assert_eq!(a.target_tokens, b.target_tokens, "{what:?} step {}", a.step);
        assert_eq!(a.tokens, b.tokens, "{what:?} step {}", a.step);
        assert_eq!(a.epoch, b.epoch, "{what:?} step {}", a.step);
        let rl = (a.loss - b.loss).abs() / a.loss.abs();
        assert!(
            rl < 1e-5,
            "{what:?} step {}: loss {} vs {} (rel {rl})",
            a.step,
            a.loss,
            b.loss
        );
        let rn = (a.grad_norm - b.grad_norm).abs() / a.grad_norm.abs();
        assert!(
            rn < 1e-5,
            "{what:?} step {}: grad norm {} vs {}",
            a.step,
            a.grad_norm,
            b.grad_norm
        );
    }
    let mut max = 0f32;
    for (x, y) in p1.iter().zip(pn) {
        for (a, b) in x.iter().zip(y) {
            max = max.max((a - b).abs());
        }
    }
    assert!(max < 1e-5, "{what:?}: final adapter max abs diff {max}");
    assert!(
        m1[0].loss != m1.last().unwrap().loss,
        "{what:?}: the run did not move"
    );
}

/// A trainer of `model` from the fixture adapter (`start_adapter`), with the tests' identity.
pub fn fixture_trainer<'m>(
    model: &'m Model,
    cfg: TrainConfig,
    rows: Vec<Row>,
    eval_rows: Vec<Row>,
) -> Trainer<'m> {
    let (peft, ad) = start_adapter(model);
    Trainer::new(model, cfg, ident(), peft, ad, rows, eval_rows).unwrap()
}

/// The largest difference between two adapters' tensors (same keys, same order), each
/// relative to the largest magnitude of that tensor in `want`.
pub fn max_rel_param_diff(
    got: &[qlora_train::params::Param],
    want: &[qlora_train::params::Param],
) -> f32 {
    assert_eq!(got.len(), want.len());
    let mut worst = 0f32;
    for (g, w) in got.iter().zip(want) {
        assert_eq!(g.key(), w.key());
        let scale = w.data.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = g
            .data
            .iter()
            .zip(&w.data)
            .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
        worst = worst.max(d / scale);
    }
    worst
}
