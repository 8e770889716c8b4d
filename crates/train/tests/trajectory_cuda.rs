//! The torch + PEFT training trajectories (../shared/fixtures/train_trajectory*)
//! with the model on a CUDA GPU. Skips with a printed reason where there is no
//! GPU (QLORA_REQUIRE_GPU=1 makes that a failure). QLORA_FIXTURES overrides the
//! fixtures folder (the GPU machine gets a copy next to the test executable).
//!
//! Tolerances (bf16): the CUDA path feeds every frozen GEMM bf16 operands
//! (unit round-off 2^-9 ≈ 2e-3; ~4e-3 relative per GEMM output, see
//! crates/model/tests/cuda.rs), through two layers and the head: the loss of
//! each step within 2e-2 relative and the global gradient norm within 5e-2.
//! AdamW normalises each update (|Δ| ≈ lr), so the final adapter is compared by
//! its change from the start: relative L2 of (ours - start) vs (torch - start)
//! below 0.1 (a wrong gradient gives O(1)).
#![cfg(feature = "cuda")]

mod common;
use common::{batch_rows, reference_cfg, st_f32};

use qlora_lora::{load_adapter, Adapter, PeftConfig};
use qlora_model::{Device, LoadOptions, Model, QuantMode};
use qlora_testutil::fixtures;
use qlora_train::params::params_of;
use qlora_train::{Identity, Trainer};
use safetensors::SafeTensors;

fn check(model_dir: &str, fixture: &str) {
    if let Some(why) = qlora_model::backend::cuda::cuda_unavailable() {
        if std::env::var("QLORA_REQUIRE_GPU").as_deref() == Ok("1") {
            panic!("QLORA_REQUIRE_GPU=1 but {why}");
        }
        eprintln!("SKIP (no GPU): {why}");
        return;
    }
    let mut model = Model::from_folder(
        fixtures().join(model_dir),
        &LoadOptions {
            quant: QuantMode::None,
        },
    )
    .unwrap();
    model.to_device(Device::Cuda(0)).unwrap();
    let bytes = std::fs::read(fixtures().join(fixture).join("trajectory.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (peft, ad): (PeftConfig, Adapter) = load_adapter(
        fixtures().join("tiny_lora_adapter/adapter"),
        Some(&model.config),
    )
    .unwrap();
    let start = params_of(&ad).unwrap();
    let ident = Identity {
        model_ref: "tiny".into(),
        model_config_hash: "h".into(),
        quant: "none".into(),
        data_hash: "d".into(),
    };
    let mut t = Trainer::new(
        &model,
        reference_cfg(6),
        ident,
        peft,
        ad,
        batch_rows(&st),
        vec![],
    )
    .unwrap();
    let mut m = Vec::new();
    while !t.done() {
        m.push(t.train_step().unwrap());
    }
    let loss = st_f32(&st, "loss");
    let norm = st_f32(&st, "grad_norm");
    for i in 0..6 {
        let rl = (m[i].loss - loss[i] as f64).abs() / loss[i] as f64;
        let rn = (m[i].grad_norm - norm[i] as f64).abs() / norm[i] as f64;
        assert!(
            rl < 2e-2,
            "{fixture} step {i}: loss {} vs {} (rel {rl})",
            m[i].loss,
            loss[i]
        );
        assert!(
            rn < 5e-2,
            "{fixture} step {i}: grad norm {} vs {} (rel {rn})",
            m[i].grad_norm,
            norm[i]
        );
        assert_eq!(m[i].target_tokens, 24);
    }
    let (_, want) = load_adapter(fixtures().join(fixture).join("final_adapter"), None).unwrap();
    let (got, want) = (params_of(&t.adapter).unwrap(), params_of(&want).unwrap());
    let (mut num, mut den) = (0f64, 0f64);
    for ((g, w), s0) in got.iter().zip(&want).zip(&start) {
        assert_eq!(g.key(), w.key());
        for ((a, b), s) in g.data.iter().zip(&w.data).zip(&s0.data) {
            num += ((a - s) as f64 - (b - s) as f64).powi(2);
            den += ((b - s) as f64).powi(2);
        }
    }
    let e = (num / den).sqrt();
    assert!(e < 0.1, "{fixture}: adapter update rel L2 {e}");
}

#[test]
fn lora_trajectory_matches_torch_on_cuda() {
    check("tiny_llama/model", "train_trajectory");
}

#[test]
fn qlora_trajectory_matches_torch_on_cuda() {
    check("tiny_llama_bnb4/model", "train_trajectory_qlora");
}
