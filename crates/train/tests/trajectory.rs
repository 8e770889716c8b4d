//! End-to-end checks of the training loop on the tiny fixture model against
//! the torch + PEFT trajectories, plus accumulation and resume invariants.

mod common;
use common::{batch_rows, ident, reference_cfg, run, st_f32, uneven_rows};
use qlora_lora::{load_adapter, Adapter, PeftConfig};
use qlora_model::{LoadOptions, Model, QuantMode};
use qlora_testutil::fixtures as fx;
use qlora_train::params::params_of;
use qlora_train::{ScheduleKind, StepMetrics, Trainer};
use safetensors::SafeTensors;

fn load_model(dir: &str, quant: QuantMode) -> Model {
    Model::from_folder(fx().join(dir), &LoadOptions { quant }).unwrap()
}

fn start_adapter(model: &Model) -> (PeftConfig, Adapter) {
    load_adapter(fx().join("tiny_lora_adapter/adapter"), Some(&model.config)).unwrap()
}

fn check_trajectory(model_dir: &str, fixture: &str, adapter_atol: f32) {
    let model = load_model(model_dir, QuantMode::None);
    let bytes = std::fs::read(fx().join(fixture).join("trajectory.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (peft, ad) = start_adapter(&model);
    let mut t = Trainer::new(
        &model,
        reference_cfg(6),
        ident(),
        peft,
        ad,
        batch_rows(&st),
        vec![],
    )
    .unwrap();
    let m = run(&mut t);
    let (loss, norm) = (st_f32(&st, "loss"), st_f32(&st, "grad_norm"));
    for i in 0..6 {
        let rl = (m[i].loss - loss[i] as f64).abs() / loss[i] as f64;
        let rn = (m[i].grad_norm - norm[i] as f64).abs() / norm[i] as f64;
        assert!(
            rl < 1e-5,
            "{fixture} step {i}: loss {} vs {} (rel {rl})",
            m[i].loss,
            loss[i]
        );
        assert!(
            rn < 1e-5,
            "{fixture} step {i}: grad norm {} vs {} (rel {rn})",
            m[i].grad_norm,
            norm[i]
        );
        assert!(m[i].clip_coef < 1.0);
        assert_eq!(m[i].target_tokens, 24);
    }
    let (_, want) = load_adapter(fx().join(fixture).join("final_adapter"), None).unwrap();
    let (got, want) = (params_of(&t.adapter).unwrap(), params_of(&want).unwrap());
    let mut max = 0f32;
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g.key(), w.key());
        for (a, b) in g.data.iter().zip(&w.data) {
            max = max.max((a - b).abs());
        }
    }
    assert!(
        max < adapter_atol,
        "{fixture}: final adapter max abs diff {max}"
    );
}

#[test]
fn lora_trajectory_matches_torch() {
    check_trajectory("tiny_llama/model", "train_trajectory", 1e-6);
}

#[test]
fn qlora_trajectory_matches_torch() {
    check_trajectory("tiny_llama_bnb4/model", "train_trajectory_qlora", 1e-5);
}

/// k micro-batches of one row each must give the same step as one batch of k
/// rows (padded), because the loss is normalised by the step's total target count.
/// (Padded as collated: rows placed together are `dist.rs`'s test, to 1e-5.)
#[test]
fn grad_accumulation_equals_big_batch() {
    let model = load_model("tiny_llama/model", QuantMode::None);
    let rows = uneven_rows(12);
    let mut results = Vec::new();
    for (bs, ga) in [(4, 1), (1, 4), (2, 2)] {
        let (peft, ad) = start_adapter(&model);
        let mut c = reference_cfg(3);
        c.batch_size = bs;
        c.grad_accum = ga;
        let mut t = Trainer::new(&model, c, ident(), peft, ad, rows.clone(), vec![])
            .unwrap()
            .with_binning(qlora_train::Binning::default());
        let m = run(&mut t);
        results.push((m, params_of(&t.adapter).unwrap()));
    }
    let (m0, p0) = &results[0];
    for (m, p) in &results[1..] {
        for (a, b) in m0.iter().zip(m) {
            assert_eq!(a.target_tokens, b.target_tokens);
            assert!(
                (a.loss - b.loss).abs() < 1e-5 * a.loss,
                "{} vs {}",
                a.loss,
                b.loss
            );
            assert!(
                (a.grad_norm - b.grad_norm).abs() < 1e-5 * a.grad_norm,
                "{} vs {}",
                a.grad_norm,
                b.grad_norm
            );
        }
        for (x, y) in p0.iter().zip(p) {
            for (u, v) in x.data.iter().zip(&y.data) {
                assert!((u - v).abs() < 1e-6, "{}: {u} vs {v}", x.key());
            }
        }
    }
    // the naive per-micro-batch mean would differ: make sure the data exercises that
    let counts: Vec<usize> = rows[..4].iter().map(|r| r.num_targets()).collect();
    assert!(counts.windows(2).any(|w| w[0] != w[1]), "{counts:?}");
}

/// 6 steps straight == 3 steps, checkpoint, resume for 3 more (bitwise), with
/// shuffling, dropout, accumulation, warmup and cosine decay all on.
#[test]
fn resume_reproduces_uninterrupted_run_bitwise() {
    let model = load_model("tiny_llama/model", QuantMode::None);
    let rows = uneven_rows(10);
    let mut c = reference_cfg(6);
    c.batch_size = 2;
    c.grad_accum = 2;
    c.shuffle = true;
    c.seed = 7;
    c.lora_dropout = 0.1;
    c.schedule = ScheduleKind::Cosine;
    c.warmup_steps = 2;
    c.adamw.weight_decay = 0.01;
    let (peft, ad) = start_adapter(&model);
    let mut full = Trainer::new(
        &model,
        c.clone(),
        ident(),
        peft.clone(),
        ad.clone(),
        rows.clone(),
        vec![],
    )
    .unwrap();
    let a = run(&mut full);

    let tmp = tempfile::tempdir().unwrap();
    let ck = tmp.path().join("checkpoint-3");
    let mut first =
        Trainer::new(&model, c.clone(), ident(), peft, ad, rows.clone(), vec![]).unwrap();
    let mut b: Vec<StepMetrics> = (0..3).map(|_| first.train_step().unwrap()).collect();
    first.save_checkpoint(&ck).unwrap();
    drop(first);
    let mut second =
        Trainer::resume(&model, c.clone(), ident(), rows.clone(), vec![], &ck).unwrap();
    assert_eq!(second.step, 3);
    b.extend(run(&mut second));
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.loss.to_bits(), y.loss.to_bits(), "step {}", x.step);
        assert_eq!(x.grad_norm.to_bits(), y.grad_norm.to_bits());
        assert_eq!(x.lr.to_bits(), y.lr.to_bits());
    }
    let (p, q) = (
        params_of(&full.adapter).unwrap(),
        params_of(&second.adapter).unwrap(),
    );
    for (x, y) in p.iter().zip(&q) {
        assert_eq!(x.data, y.data);
    }
    // refusals: other base model, other data, other settings
    let mut other = ident();
    other.model_config_hash = "other".into();
    let e = Trainer::resume(&model, c.clone(), other, rows.clone(), vec![], &ck)
        .err()
        .unwrap();
    assert!(format!("{e:#}").contains("different base model"), "{e:#}");
    let mut other = ident();
    other.data_hash = "x".into();
    let e = Trainer::resume(&model, c.clone(), other, rows.clone(), vec![], &ck)
        .err()
        .unwrap();
    assert!(format!("{e:#}").contains("different data"), "{e:#}");
    let mut c2 = c.clone();
    c2.lr = 5e-4;
    let e = Trainer::resume(&model, c2, ident(), rows.clone(), vec![], &ck)
        .err()
        .unwrap();
    assert!(format!("{e:#}").contains("lr"), "{e:#}");
    let e = Trainer::resume(&model, c, ident(), rows, vec![], tmp.path())
        .err()
        .unwrap();
    assert!(format!("{e:#}").contains("not a qlora checkpoint"), "{e:#}");
}

#[test]
fn non_finite_loss_stops_with_step() {
    let model = load_model("tiny_llama/model", QuantMode::None);
    let (peft, mut ad) = start_adapter(&model);
    let w = ad.layers.get_mut("model.layers.1.mlp.down_proj").unwrap();
    w.b.data_mut().iter_mut().for_each(|x| *x *= f32::NAN);
    let mut t = Trainer::new(
        &model,
        reference_cfg(3),
        ident(),
        peft,
        ad,
        uneven_rows(4),
        vec![],
    )
    .unwrap();
    let e = t.train_step().unwrap_err();
    assert!(format!("{e:#}").contains("step 1"), "{e:#}");
}

#[test]
fn eval_loss_is_token_weighted_mean() {
    let model = load_model("tiny_llama/model", QuantMode::None);
    let (peft, ad) = start_adapter(&model);
    let rows = uneven_rows(5);
    let t = Trainer::new(
        &model,
        reference_cfg(1),
        ident(),
        peft,
        ad.clone(),
        rows.clone(),
        rows.clone(),
    )
    .unwrap();
    let (l, ppl) = t.evaluate().unwrap().unwrap();
    let (mut s, mut n) = (0.0, 0);
    for r in &rows {
        let b = qlora_train::collate(&[r], 0);
        let (a, c) = model.loss(&b, Some(&ad)).unwrap();
        s += a;
        n += c;
    }
    assert!(
        (l - s / n as f64).abs() < 1e-6 * l,
        "{l} vs {}",
        s / n as f64
    );
    assert!((ppl - l.exp()).abs() < 1e-9 * ppl);
}

/// Mixed precision on CPU: the base weights held in bf16 (half the memory of
/// f32; compute still accumulates in f32, adapters and AdamW state stay f32)
/// follow the f32 torch trajectory to within bf16's precision. Each weight is
/// rounded by at most 2⁻⁹ relative; the bound allows twice that (2⁻⁸ ≈ 3.9e-3)
/// on the loss and on the gradient norm. The adapter is compared by its
/// update (final − initial): AdamW moves entries whose gradient is at noise
/// level by up to ±lr per step whatever the noise, so single entries can differ
/// by up to lr·steps; the update as a whole must agree to 5% (relative norm).
#[test]
fn bf16_base_follows_the_f32_trajectory_within_bf16_precision() {
    follows_within_bf16_precision(load_model("tiny_llama/model", QuantMode::Bf16));
}

/// bf16 compute (weights and activations of every frozen linear rounded to
/// bf16, f32 accumulation; AMX tiles or AVX512-BF16 where the CPU has them,
/// `QLORA_TILE_ISA` picks) follows the f32
/// trajectory within the same bf16 bounds.
#[test]
fn bf16_compute_follows_the_f32_trajectory_within_bf16_precision() {
    let mut model = load_model("tiny_llama/model", QuantMode::None);
    model.set_base_compute(qlora_model::BaseCompute::Bf16);
    match qlora_model::ops::amx::isa() {
        Some(isa) => eprintln!("bf16 compute on the {} tile products", isa.name()),
        None => eprintln!(
            "NOTE: no bf16 tile ISA (AMX, AVX512-BF16) here: bf16 compute ran the f32 fallback"
        ),
    }
    follows_within_bf16_precision(model);
}

fn follows_within_bf16_precision(model: Model) {
    let bytes = std::fs::read(fx().join("train_trajectory/trajectory.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (peft, ad) = start_adapter(&model);
    let start = params_of(&ad).unwrap();
    let mut t = Trainer::new(
        &model,
        reference_cfg(6),
        ident(),
        peft,
        ad,
        batch_rows(&st),
        vec![],
    )
    .unwrap();
    let m = run(&mut t);
    let (loss, norm) = (st_f32(&st, "loss"), st_f32(&st, "grad_norm"));
    let tol = 2f64.powi(-8);
    let mut worst = (0f64, 0f64);
    for i in 0..6 {
        let rl = (m[i].loss - loss[i] as f64).abs() / loss[i] as f64;
        let rn = (m[i].grad_norm - norm[i] as f64).abs() / norm[i] as f64;
        worst = (worst.0.max(rl), worst.1.max(rn));
        assert!(
            rl < tol,
            "step {i}: bf16 loss {} vs f32 {} (rel {rl})",
            m[i].loss,
            loss[i]
        );
        assert!(
            rn < tol,
            "step {i}: bf16 grad norm {} vs {} (rel {rn})",
            m[i].grad_norm,
            norm[i]
        );
    }
    let (_, want) = load_adapter(fx().join("train_trajectory/final_adapter"), None).unwrap();
    let (got, want) = (params_of(&t.adapter).unwrap(), params_of(&want).unwrap());
    let (mut diff2, mut upd2) = (0f64, 0f64);
    for ((g, w), s0) in got.iter().zip(&want).zip(&start) {
        assert_eq!(g.key(), w.key());
        for ((a, b), s) in g.data.iter().zip(&w.data).zip(&s0.data) {
            diff2 += ((a - b) as f64).powi(2);
            upd2 += ((b - s) as f64).powi(2);
        }
    }
    let rel = (diff2 / upd2).sqrt();
    eprintln!(
        "bf16 vs f32: worst rel loss {:.2e}, worst rel grad norm {:.2e}, adapter update rel diff {rel:.2e}",
        worst.0, worst.1
    );
    assert!(
        rel < 0.05,
        "adapter update differs by {rel} (relative norm)"
    );
    // And it is not the f32 run: bf16 rounding is visible.
    assert!(worst.0 > 0.0);
}
