//! Qwen3 LoRA training against torch + PEFT 0.21.2 (crates/model/tests/fixtures/qwen3/trajectory,
//! gen.py there): 6 AdamW steps with LoRA on all 7 projections of a random tiny Qwen3 (GQA 4:1,
//! head_dim 12 != hidden/heads, untied, per-head q/k RMSNorm), on the f32 folder and on its
//! bnb-4bit (NF4 + double quant) checkpoint.

mod common;
use common::{assert_steps_match, batch_rows, max_rel_param_diff, reference_cfg, run};
use std::path::PathBuf;

use qlora_lora::load_adapter;
use qlora_model::{LoadOptions, Model, QuantMode};
use qlora_train::params::params_of;
use qlora_train::{Identity, Trainer};
use safetensors::SafeTensors;

fn q3() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../model/tests/fixtures/qwen3"
    ))
}

fn check(model_dir: &str, traj: &str) {
    let model = Model::from_folder(
        q3().join(model_dir),
        &LoadOptions {
            quant: QuantMode::None,
        },
    )
    .unwrap();
    assert_eq!(model.config.architecture.as_str(), "qwen3");
    let dir = q3().join("trajectory").join(traj);
    let bytes = std::fs::read(dir.join("trajectory.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let rows = batch_rows(&st);
    let (peft, ad) =
        load_adapter(q3().join("trajectory/start_adapter"), Some(&model.config)).unwrap();
    let ident = Identity {
        model_ref: model_dir.into(),
        model_config_hash: "h".into(),
        quant: "none".into(),
        data_hash: "d".into(),
    };
    let mut t = Trainer::new(&model, reference_cfg(6), ident, peft, ad, rows, vec![]).unwrap();
    let m = run(&mut t);
    assert_eq!(m.len(), 6);
    let (wl, wn) = assert_steps_match(&m, &st, traj, 1e-4);
    for step in &m {
        assert_eq!(step.target_tokens, 24);
    }
    let (_, want) = load_adapter(dir.join("final_adapter"), None).unwrap();
    let (got, want) = (params_of(&t.adapter).unwrap(), params_of(&want).unwrap());
    assert_eq!(got.len(), 28, "A and B of 14 modules");
    let worst = max_rel_param_diff(&got, &want);
    eprintln!(
        "qwen3 {traj}: losses rel {wl:e}, grad norms rel {wn:e}, final adapter max rel diff {worst:e}"
    );
    assert!(worst < 1e-4, "{traj}: final adapter max rel diff {worst}");
}

#[test]
fn qwen3_lora_trajectory_matches_torch_peft() {
    check("gqa_wide_head", "f32");
}

#[test]
fn qwen3_qlora_trajectory_matches_torch_peft() {
    check("gqa_wide_head_bnb4", "nf4");
}
