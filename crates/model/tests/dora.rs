//! DoRA in the model against PEFT 0.21.2 (`crates/lora/tests/fixtures/dora`,
//! written by its gen.py): eval losses on the f32 and the NF4 base, the
//! magnitude init, and the step-0 gradients of A, B and m.

use qlora_lora::{load_adapter, Adapter, PeftConfig, TargetModules};
use qlora_model::{Batch, LoadOptions, Model, QuantMode, StepOptions};
use qlora_testutil::{dora_fixtures, fixtures};
use safetensors::SafeTensors;

fn read(p: std::path::PathBuf) -> Vec<u8> {
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn f32s(st: &SafeTensors, k: &str) -> Vec<f32> {
    st.tensor(k)
        .unwrap_or_else(|_| panic!("missing {k}"))
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn i64_rows(st: &SafeTensors, k: &str) -> Vec<Vec<i64>> {
    let t = st.tensor(k).unwrap();
    let v: Vec<i64> = t
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    v.chunks(t.shape()[1]).map(<[i64]>::to_vec).collect()
}

fn batch(ids: &[Vec<i64>], labels: &[Vec<i64>]) -> Batch {
    Batch {
        input_ids: ids
            .iter()
            .map(|r| r.iter().map(|&t| t as u32).collect())
            .collect(),
        labels: labels.to_vec(),
        position_ids: None,
        segment_ids: None,
    }
}

fn model(dir: &str) -> Model {
    Model::from_folder(
        fixtures().join(dir),
        &LoadOptions {
            quant: QuantMode::None,
        },
    )
    .unwrap()
}

fn adapter(m: &Model) -> Adapter {
    load_adapter(dora_fixtures().join("adapter"), Some(&m.config))
        .unwrap()
        .1
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs()
}

fn check_eval(dir: &str, tag: &str) {
    let bytes = read(dora_fixtures().join("reference.safetensors"));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let m = model(dir);
    let ad = adapter(&m);
    let ids = i64_rows(&st, "input_ids");
    let masked = i64_rows(&st, "labels_masked");
    let (s, n) = m.loss(&batch(&ids, &ids), Some(&ad)).unwrap();
    let want = f32s(&st, &format!("loss_{tag}"))[0] as f64;
    let r = rel(s / n as f64, want);
    eprintln!("{tag}: loss {} vs PEFT {want} (rel {r:e})", s / n as f64);
    assert!(r < 1e-5, "{tag}: loss {} vs {want}", s / n as f64);
    let (s, n) = m.loss(&batch(&ids, &masked), Some(&ad)).unwrap();
    let want_m = f32s(&st, &format!("loss_masked_{tag}"))[0] as f64;
    assert!(rel(s / n as f64, want_m) < 1e-5, "{tag}: masked loss");
    let lg = m.forward_logits(&batch(&ids, &ids), Some(&ad)).unwrap();
    let want = f32s(&st, &format!("logits_{tag}_b0t5"));
    let d = lg
        .at(0, 5)
        .iter()
        .zip(&want)
        .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
    eprintln!("{tag}: logits max abs diff {d:e}");
    assert!(d < 1e-5, "{tag}: logits differ by {d}");
    // the DoRA terms matter: the same A, B without m give another loss
    let mut plain = ad.clone();
    plain.config.use_dora = false;
    plain.layers.values_mut().for_each(|w| w.magnitude = None);
    let (s2, n2) = m.loss(&batch(&ids, &ids), Some(&plain)).unwrap();
    let dora_loss = f32s(&st, &format!("loss_{tag}"))[0] as f64;
    let r = rel(s2 / n2 as f64, dora_loss);
    assert!(r > 1e-4, "{tag}: plain LoRA loss is within {r} of DoRA's");
}

#[test]
fn dora_eval_loss_matches_peft_on_f32_base() {
    check_eval("tiny_llama/model", "f32");
}

#[test]
fn dora_eval_loss_matches_peft_on_nf4_base() {
    check_eval("tiny_llama_bnb4/model", "nf4");
}

/// A fresh DoRA adapter (B = 0) gets m = ‖W‖ per output row, of the
/// dequantized weight on the 4-bit base, as PEFT's `update_layer`.
#[test]
fn dora_init_magnitude_matches_peft() {
    let bytes = read(dora_fixtures().join("reference.safetensors"));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    for (dir, tag) in [
        ("tiny_llama/model", "f32"),
        ("tiny_llama_bnb4/model", "nf4"),
    ] {
        let m = model(dir);
        let mut p = PeftConfig::new(4, 8.0, TargetModules::AllLinear);
        p.use_dora = true;
        let mut ad = qlora_lora::init_adapter(&p, &m.config, 5).unwrap();
        m.init_dora(&mut ad).unwrap();
        let mut worst = 0f32;
        for (path, w) in &ad.layers {
            let want = f32s(&st, &format!("init_magnitude_{tag}.{path}"));
            for (a, b) in w.magnitude.as_ref().unwrap().iter().zip(&want) {
                worst = worst.max((a - b).abs() / b);
            }
        }
        eprintln!("{tag}: init magnitude max rel diff {worst:e}");
        assert!(worst < 1e-6, "{tag}: {worst}");
        // and a fresh DoRA adapter is a no-op: the loss is the base's
        let ids = vec![vec![1i64, 5, 9, 40, 77, 3, 8, 200]];
        let b = batch(&ids, &ids);
        let (s0, _) = m.loss(&b, None).unwrap();
        let (s1, _) = m.loss(&b, Some(&ad)).unwrap();
        assert!(rel(s1, s0) < 1e-6, "{tag}: {s1} vs {s0}");
    }
}

/// The raw gradients of step 0 of PEFT's DoRA trajectory (before clipping).
fn check_grads(dir: &str, traj: &str) {
    let tb = read(dora_fixtures().join(traj).join("trajectory.safetensors"));
    let tst = SafeTensors::deserialize(&tb).unwrap();
    let sb = read(fixtures().join("train_trajectory/trajectory.safetensors"));
    let sst = SafeTensors::deserialize(&sb).unwrap();
    let m = model(dir);
    let ad = adapter(&m);
    let b = batch(
        &i64_rows(&sst, "batch0_input_ids"),
        &i64_rows(&sst, "batch0_labels"),
    );
    let (s, n, g) = m
        .forward_backward(
            &b,
            &ad,
            &StepOptions {
                loss_denominator: 24.0,
                ..Default::default()
            },
        )
        .unwrap();
    let loss0 = f32s(&tst, "loss")[0] as f64;
    assert_eq!(n, 24);
    assert!(
        rel(s / 24.0, loss0) < 1e-5,
        "{traj}: loss {} vs {loss0}",
        s / 24.0
    );
    let mut worst = 0f32;
    for (path, w) in &g {
        let pre = format!("grad_step0.base_model.model.{path}");
        for (got, key) in [
            (w.a.data(), format!("{pre}.lora_A.weight")),
            (w.b.data(), format!("{pre}.lora_B.weight")),
            (
                &w.magnitude.as_ref().expect("DoRA gradient of m")[..],
                format!("{pre}.lora_magnitude_vector.weight"),
            ),
        ] {
            let want = f32s(&tst, &key);
            let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
            let d = got
                .iter()
                .zip(&want)
                .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
            worst = worst.max(d / scale);
        }
    }
    eprintln!("{traj}: step-0 gradients max rel diff {worst:e}");
    assert!(worst < 1e-4, "{traj}: {worst}");
    // gradient checkpointing recomputes the DoRA forward: same gradients
    let (_, _, g2) = m
        .forward_backward(
            &b,
            &ad,
            &StepOptions {
                loss_denominator: 24.0,
                checkpointing: true,
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(g, g2);
}

#[test]
fn dora_step0_gradients_match_peft_on_f32_base() {
    check_grads("tiny_llama/model", "trajectory_f32");
}

#[test]
fn dora_step0_gradients_match_peft_on_nf4_base() {
    check_grads("tiny_llama_bnb4/model", "trajectory_nf4");
}

/// Generation (KV cache, one token at a time) with a DoRA adapter gives the
/// logits of the full forward at every position.
#[test]
fn dora_kv_cache_steps_match_full_forward() {
    let m = model("tiny_llama_bnb4/model");
    let ad = adapter(&m);
    let toks: Vec<u32> = vec![3, 17, 250, 9, 44, 101, 7, 300];
    let ids = vec![toks.iter().map(|&t| t as i64).collect::<Vec<_>>()];
    let full = m.forward_logits(&batch(&ids, &ids), Some(&ad)).unwrap();
    let mut cache = m.new_cache();
    let mut last = m.forward_step(&mut cache, &toks[..3], Some(&ad)).unwrap();
    for p in 3..toks.len() {
        let d = full
            .at(0, p - 1)
            .iter()
            .zip(&last)
            .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
        assert!(d < 1e-4, "position {}: {d}", p - 1);
        last = m
            .forward_step(&mut cache, &toks[p..p + 1], Some(&ad))
            .unwrap();
    }
}
