//! The model against the golden outputs of transformers / bitsandbytes / PEFT
//! (`shared/fixtures`, README §3-6).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use qlora_lora::{Adapter, LoraConfig, LoraWeights, Matrix};
use qlora_model::{Batch, LoadOptions, Model, QuantMode, StepOptions};
use qlora_testutil::fixtures;
use safetensors::{Dtype, SafeTensors};

struct St(Vec<u8>);

impl St {
    fn open(p: PathBuf) -> St {
        St(std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
    }
    fn get(&self, name: &str) -> (Vec<usize>, Dtype, Vec<u8>) {
        let st = SafeTensors::deserialize(&self.0).unwrap();
        let v = st.tensor(name).unwrap_or_else(|_| panic!("no {name}"));
        (v.shape().to_vec(), v.dtype(), v.data().to_vec())
    }
    fn names(&self) -> Vec<String> {
        SafeTensors::deserialize(&self.0)
            .unwrap()
            .names()
            .into_iter()
            .map(str::to_string)
            .collect()
    }
    fn f32(&self, name: &str) -> Vec<f32> {
        let (_, dt, b) = self.get(name);
        assert_eq!(dt, Dtype::F32, "{name}");
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }
    fn i64_rows(&self, name: &str) -> Vec<Vec<i64>> {
        let (shape, dt, b) = self.get(name);
        assert_eq!(dt, Dtype::I64);
        let v: Vec<i64> = b
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        v.chunks(shape[1]).map(|r| r.to_vec()).collect()
    }
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

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn logits_vec(t: &Matrix) -> Vec<f32> {
    t.data().to_vec()
}

/// Read a PEFT adapter folder (test-local reader; the trainer owns the real one).
fn read_adapter(dir: &Path) -> Adapter {
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
            .unwrap();
    let st = St::open(dir.join("adapter_model.safetensors"));
    adapter_from(&st, "", &cfg)
}

fn adapter_from(st: &St, prefix: &str, cfg: &serde_json::Value) -> Adapter {
    let mut layers = BTreeMap::new();
    for name in st.names() {
        let Some(rest) = name.strip_prefix(prefix) else {
            continue;
        };
        let Some(path) = rest.strip_prefix("base_model.model.") else {
            continue;
        };
        let Some(module) = path.strip_suffix(".lora_A.weight") else {
            continue;
        };
        let t = |n: &str| {
            let (shape, _, _) = st.get(n);
            Matrix::new(shape[0], shape[1], st.f32(n)).unwrap()
        };
        let b_name = name.replace(".lora_A.weight", ".lora_B.weight");
        layers.insert(
            module.to_string(),
            LoraWeights {
                a: t(&name),
                b: t(&b_name),
                magnitude: None,
            },
        );
    }
    Adapter {
        config: LoraConfig {
            r: cfg["r"].as_u64().unwrap() as usize,
            lora_alpha: cfg["lora_alpha"].as_f64().unwrap(),
            lora_dropout: 0.0,
            target_modules: vec![],
            use_rslora: cfg["use_rslora"].as_bool().unwrap_or(false),
            use_dora: false,
        },
        layers,
    }
}

fn load(dir: &str, quant: QuantMode) -> Model {
    Model::from_folder(fixtures().join(dir), &LoadOptions { quant }).unwrap()
}

fn check_reference(model: &Model, reference: &St, adapter: Option<&Adapter>, logit_tol: f32) {
    let ids = reference.i64_rows("input_ids");
    let masked = reference.i64_rows("labels_masked");
    let logits = model.forward_logits(&batch(&ids, &ids), adapter).unwrap();
    assert_eq!(logits.dims(), [2, 24, 320]);
    let diff = max_abs(&logits.data, &reference.f32("logits"));
    eprintln!("max |logits - reference| = {diff:e}");
    assert!(diff < logit_tol, "logits differ by {diff}");
    let (sum, n) = model.loss(&batch(&ids, &ids), adapter).unwrap();
    assert_eq!(n, 46);
    let want = reference.f32("loss")[0] as f64;
    eprintln!("loss {} vs {want}", sum / n as f64);
    assert!((sum / n as f64 - want).abs() < 1e-5);
    let (sum, n) = model.loss(&batch(&ids, &masked), adapter).unwrap();
    assert_eq!(n, 32);
    let want = reference.f32("loss_masked")[0] as f64;
    assert!((sum / n as f64 - want).abs() < 1e-5);
}

#[test]
fn tiny_llama_f32_matches_transformers() {
    let model = load("tiny_llama/model", QuantMode::None);
    let reference = St::open(fixtures().join("tiny_llama/reference.safetensors"));
    check_reference(&model, &reference, None, 1e-5);
}

#[test]
fn tiny_llama_bnb4_prequantized_matches_transformers() {
    // Pre-quantized weights are used as stored whatever the requested mode.
    let model = load("tiny_llama_bnb4/model", QuantMode::Nf4);
    let reference = St::open(fixtures().join("tiny_llama_bnb4/reference.safetensors"));
    // The dequantized debugging weights must be reproduced exactly.
    for (l, m, name) in [
        (0, 0, "model.layers.0.self_attn.q_proj.weight"),
        (0, 6, "model.layers.0.mlp.down_proj.weight"),
    ] {
        let w = model.layers[l].linears[m].dense_f32();
        assert_eq!(w, reference.f32(&format!("dequantized.{name}")), "{name}");
    }
    check_reference(&model, &reference, None, 1e-5);
}

#[test]
fn tiny_lora_adapter_logits_match_peft() {
    let model = load("tiny_llama/model", QuantMode::None);
    let adapter = read_adapter(&fixtures().join("tiny_lora_adapter/adapter"));
    assert_eq!(adapter.scaling(), 2.0);
    let reference = St::open(fixtures().join("tiny_lora_adapter/reference.safetensors"));
    check_reference(&model, &reference, Some(&adapter), 1e-5);
}

fn check_trajectory(dir: &str, base: &str, checkpointing: bool) {
    let model = load(base, QuantMode::None);
    let adapter = read_adapter(&fixtures().join("tiny_lora_adapter/adapter"));
    let traj = St::open(fixtures().join(dir).join("trajectory.safetensors"));
    let ids = traj.i64_rows("batch0_input_ids");
    let labels = traj.i64_rows("batch0_labels");
    let b = batch(&ids, &labels);
    let (_, n) = model.loss(&b, Some(&adapter)).unwrap();
    assert_eq!(n, 24);
    let opts = StepOptions {
        loss_denominator: n as f32,
        checkpointing,
        lora_dropout_seed: 0,
        ..Default::default()
    };
    let (sum, count, grads) = model.forward_backward(&b, &adapter, &opts).unwrap();
    assert_eq!(count, 24);
    let want = traj.f32("loss")[0] as f64;
    let got = sum / count as f64;
    eprintln!("{dir}: loss {got} vs {want}");
    assert!(((got - want) / want).abs() < 1e-5);
    assert_eq!(grads.len(), 14);
    let mut worst = 0f32;
    for (path, g) in &grads {
        for (which, t) in [("lora_A", &g.a), ("lora_B", &g.b)] {
            let key = format!("grad_step0.base_model.model.{path}.{which}.weight");
            let want = traj.f32(&key);
            let got = logits_vec(t);
            for (x, y) in got.iter().zip(&want) {
                let err = (x - y).abs();
                worst = worst.max(err);
                assert!(err < 1e-6 + 1e-4 * y.abs(), "{key}: {x} vs {y}");
            }
        }
    }
    eprintln!("{dir}: worst grad abs err {worst:e}");
}

#[test]
fn lora_gradients_match_torch_on_f32_base() {
    check_trajectory("train_trajectory", "tiny_llama/model", false);
}

#[test]
fn lora_gradients_match_torch_on_bnb4_base() {
    check_trajectory("train_trajectory_qlora", "tiny_llama_bnb4/model", false);
}

#[test]
fn checkpointing_gives_identical_gradients() {
    check_trajectory("train_trajectory_qlora", "tiny_llama_bnb4/model", true);
    let model = load("tiny_llama/model", QuantMode::None);
    let mut adapter = read_adapter(&fixtures().join("tiny_lora_adapter/adapter"));
    adapter.config.lora_dropout = 0.25;
    let traj = St::open(fixtures().join("train_trajectory/trajectory.safetensors"));
    let ids = traj.i64_rows("batch1_input_ids");
    let b = batch(&ids, &traj.i64_rows("batch1_labels"));
    let run = |ck: bool| {
        let opts = StepOptions {
            loss_denominator: 24.0,
            checkpointing: ck,
            lora_dropout_seed: 9,
            ..Default::default()
        };
        model.forward_backward(&b, &adapter, &opts).unwrap()
    };
    let (s1, _, g1) = run(false);
    let (s2, _, g2) = run(true);
    assert_eq!(s1, s2);
    for (k, a) in &g1 {
        assert_eq!(logits_vec(&a.a), logits_vec(&g2[k].a), "{k}");
        assert_eq!(logits_vec(&a.b), logits_vec(&g2[k].b), "{k}");
    }
    // Dropout is active: the loss differs from the dropout-free one.
    let (s0, _) = model.loss(&b, Some(&adapter)).unwrap();
    assert!((s0 - s1).abs() > 1e-6);
}
