//! DoRA training against torch + PEFT 0.21.2 (`crates/lora/tests/fixtures/dora`,
//! gen.py there): 6 AdamW steps with trainable magnitudes on the f32 and the NF4
//! base, and an exact resume with the magnitudes and their moments in the checkpoint.

mod common;
use common::{assert_steps_match, batch_rows, ident, max_rel_param_diff, reference_cfg, run};
use qlora_data::rows::Row;
use qlora_lora::{load_adapter, Adapter, PeftConfig, Which};
use qlora_model::{LoadOptions, Model, QuantMode};
use qlora_testutil::{dora_fixtures, fixtures as fx};
use qlora_train::params::params_of;
use qlora_train::{StepMetrics, Trainer};
use safetensors::SafeTensors;

fn load_model(dir: &str) -> Model {
    Model::from_folder(
        fx().join(dir),
        &LoadOptions {
            quant: QuantMode::None,
        },
    )
    .unwrap()
}

/// The 12 rows of the shared trajectory's 6 batches (the DoRA fixtures use the same).
fn fixture_rows() -> Vec<Row> {
    let bytes = std::fs::read(fx().join("train_trajectory/trajectory.safetensors")).unwrap();
    batch_rows(&SafeTensors::deserialize(&bytes).unwrap())
}

fn start(model: &Model) -> (PeftConfig, Adapter) {
    load_adapter(dora_fixtures().join("adapter"), Some(&model.config)).unwrap()
}

fn check(model_dir: &str, traj: &str) {
    let model = load_model(model_dir);
    let bytes = std::fs::read(dora_fixtures().join(traj).join("trajectory.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (peft, ad) = start(&model);
    let mut t = Trainer::new(
        &model,
        reference_cfg(6),
        ident(),
        peft,
        ad,
        fixture_rows(),
        vec![],
    )
    .unwrap();
    let m = run(&mut t);
    let (wl, wn) = assert_steps_match(&m, &st, traj, 1e-4);
    let (_, want) = load_adapter(dora_fixtures().join(traj).join("final_adapter"), None).unwrap();
    let (got, want) = (params_of(&t.adapter).unwrap(), params_of(&want).unwrap());
    assert_eq!(got.len(), 42, "A, B and m of 14 modules");
    let worst = max_rel_param_diff(&got, &want);
    eprintln!(
        "{traj}: losses rel {wl:e}, grad norms rel {wn:e}, final adapter max rel diff {worst:e}"
    );
    assert!(worst < 1e-4, "{traj}: final adapter max rel diff {worst}");
    // the magnitudes were trained
    let (_, start_ad) = start(&model);
    let moved = got
        .iter()
        .zip(params_of(&start_ad).unwrap())
        .filter(|(g, s)| g.which == Which::Magnitude && g.data != s.data)
        .count();
    assert_eq!(moved, 14);
}

#[test]
fn dora_trajectory_matches_torch_peft() {
    check("tiny_llama/model", "trajectory_f32");
}

#[test]
fn dora_qlora_trajectory_matches_torch_peft() {
    check("tiny_llama_bnb4/model", "trajectory_nf4");
}

/// 4 steps straight == 2 steps, checkpoint, resume for 2 more, bitwise, with
/// DoRA dropout (PEFT's dropped input on the DoRA base term) on.
#[test]
fn dora_resume_is_exact() {
    let model = load_model("tiny_llama/model");
    let rows = fixture_rows();
    let mut c = reference_cfg(4);
    c.lora_dropout = 0.1;
    c.shuffle = true;
    c.seed = 3;
    let (peft, ad) = start(&model);
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
    let ck = tmp.path().join("checkpoint-2");
    let mut first =
        Trainer::new(&model, c.clone(), ident(), peft, ad, rows.clone(), vec![]).unwrap();
    let mut b: Vec<StepMetrics> = (0..2).map(|_| first.train_step().unwrap()).collect();
    first.save_checkpoint(&ck).unwrap();
    drop(first);
    let mut second = Trainer::resume(&model, c, ident(), rows, vec![], &ck).unwrap();
    b.extend(run(&mut second));
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.loss.to_bits(), y.loss.to_bits(), "step {}", x.step);
        assert_eq!(x.grad_norm.to_bits(), y.grad_norm.to_bits());
    }
    let (p, q) = (
        params_of(&full.adapter).unwrap(),
        params_of(&second.adapter).unwrap(),
    );
    assert_eq!(p.len(), 42);
    for (x, y) in p.iter().zip(&q) {
        assert_eq!(x.data, y.data, "{}", x.key());
    }
}
