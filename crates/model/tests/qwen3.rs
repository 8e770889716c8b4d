//! Qwen3ForCausalLM (per-head q/k RMSNorm before RoPE, explicit head_dim, tied/untied
//! embeddings) against transformers 5.24 on random tiny models (tests/fixtures/qwen3,
//! generator `gen.py` beside them), and the q/k-norm backward against finite differences.

use std::collections::BTreeMap;
use std::path::PathBuf;

use qlora_lora::{Adapter, LoraConfig, LoraWeights, Matrix};
use qlora_model::{Batch, LoadOptions, Model, QuantMode, StepOptions};
use serde_json::Value;

const SHAPES: [&str; 3] = ["gqa_tied", "gqa_wide_head", "mha_untied"];

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen3")
}

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir().join("expected.json")).unwrap()).unwrap()
}

fn rows(v: &Value) -> Vec<Vec<u32>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        })
        .collect()
}

fn batch(ids: &[Vec<u32>], mask_prefix: usize) -> Batch {
    let labels = ids
        .iter()
        .map(|r| {
            r.iter()
                .enumerate()
                .map(|(i, &t)| if i < mask_prefix { -100 } else { t as i64 })
                .collect()
        })
        .collect();
    Batch {
        input_ids: ids.to_vec(),
        labels,
        position_ids: None,
        segment_ids: None,
    }
}

#[test]
fn qwen3_eval_loss_matches_transformers() {
    let exp = expected();
    for name in SHAPES {
        let e = &exp[name];
        let m = Model::from_folder(
            dir().join(name),
            &LoadOptions {
                quant: QuantMode::None,
            },
        )
        .unwrap();
        assert_eq!(m.config.architecture.as_str(), "qwen3");
        let ids = rows(&e["input_ids"]);
        for (prefix, key) in [
            (0, "loss"),
            (e["mask_prefix"].as_u64().unwrap() as usize, "loss_masked"),
        ] {
            let (sum, n) = m.loss(&batch(&ids, prefix), None).unwrap();
            let got = sum / n as f64;
            let want = e[key].as_f64().unwrap();
            let rel = ((got - want) / want).abs();
            eprintln!("{name} {key}: {got} vs transformers {want} (rel {rel:e})");
            assert!(rel < 1e-5, "{name} {key}: {got} vs {want}");
        }
        let logits = m.forward_logits(&batch(&ids, 0), None).unwrap();
        let l: Vec<f32> = logits.at(0, 3).to_vec();
        let want: Vec<f32> = e["logits_row0_pos3"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        let d = l
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(d < 1e-4, "{name}: logits differ by {d}");
        // NF4-held weights load and stay close (a smoke check of the quantized path).
        let q = Model::from_folder(dir().join(name), &LoadOptions::default()).unwrap();
        let (s, n) = q.loss(&batch(&ids, 0), None).unwrap();
        assert!(((s / n as f64) - e["loss"].as_f64().unwrap()).abs() < 0.5);
    }
}

/// splitmix-style deterministic values in [-1, 1).
fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

#[test]
fn qwen3_qk_norm_backward_matches_finite_differences() {
    let name = "gqa_wide_head";
    let m = Model::from_folder(
        dir().join(name),
        &LoadOptions {
            quant: QuantMode::None,
        },
    )
    .unwrap();
    let c = &m.config;
    let r = 4;
    let mut shapes = BTreeMap::new();
    for l in 0..c.num_hidden_layers {
        for (p, out) in [
            ("q_proj", c.num_attention_heads * c.head_dim),
            ("k_proj", c.num_key_value_heads * c.head_dim),
        ] {
            shapes.insert(
                format!("model.layers.{l}.self_attn.{p}"),
                (out, c.hidden_size),
            );
        }
    }
    let make = |vals: &BTreeMap<String, (Vec<f32>, Vec<f32>)>| Adapter {
        config: LoraConfig {
            r,
            lora_alpha: 8.0,
            lora_dropout: 0.0,
            target_modules: vec!["q_proj".into(), "k_proj".into()],
            use_rslora: false,
            use_dora: false,
        },
        layers: vals
            .iter()
            .map(|(k, (a, b))| {
                let (out, inp) = shapes[k];
                (
                    k.clone(),
                    LoraWeights {
                        a: Matrix::new(r, inp, a.clone()).unwrap(),
                        b: Matrix::new(out, r, b.clone()).unwrap(),
                        magnitude: None,
                    },
                )
            })
            .collect(),
    };
    let mut vals = BTreeMap::new();
    for (i, (k, (out, inp))) in shapes.iter().enumerate() {
        let a: Vec<f32> = rand_vec(r * inp, 10 + i as u64)
            .iter()
            .map(|x| 0.3 * x)
            .collect();
        let b: Vec<f32> = rand_vec(out * r, 50 + i as u64)
            .iter()
            .map(|x| 0.3 * x)
            .collect();
        vals.insert(k.clone(), (a, b));
    }
    let ids = rows(&expected()[name]["input_ids"]);
    let b = batch(&ids, 3);
    let (loss, _, grads) = m
        .forward_backward(&b, &make(&vals), &StepOptions::default())
        .unwrap();
    // checkpointing (q/k before their norms kept with q, k, v, no recompute
    // of the attention block) gives the same bits
    let ckpt = StepOptions {
        checkpointing: true,
        ..Default::default()
    };
    let (loss_ck, _, grads_ck) = m.forward_backward(&b, &make(&vals), &ckpt).unwrap();
    assert_eq!(loss.to_bits(), loss_ck.to_bits());
    for (k, g) in &grads {
        assert_eq!(g.a.data(), grads_ck[k].a.data(), "{k} A, checkpointed");
        assert_eq!(g.b.data(), grads_ck[k].b.data(), "{k} B, checkpointed");
    }
    // <grad, dir> against the central difference of the summed loss along dir.
    let mut dir_vals = BTreeMap::new();
    let mut predicted = 0f64;
    for (i, (k, (a, bb))) in vals.iter().enumerate() {
        let da = rand_vec(a.len(), 100 + i as u64);
        let db = rand_vec(bb.len(), 200 + i as u64);
        let g = &grads[k];
        let ga: Vec<f32> = g.a.data().to_vec();
        let gb: Vec<f32> = g.b.data().to_vec();
        predicted += ga
            .iter()
            .zip(&da)
            .map(|(x, y)| *x as f64 * *y as f64)
            .sum::<f64>();
        predicted += gb
            .iter()
            .zip(&db)
            .map(|(x, y)| *x as f64 * *y as f64)
            .sum::<f64>();
        dir_vals.insert(k.clone(), (da, db));
    }
    let eps = 1e-3f32;
    let shifted = |sign: f32| {
        let v: BTreeMap<String, (Vec<f32>, Vec<f32>)> = vals
            .iter()
            .map(|(k, (a, bb))| {
                let (da, db) = &dir_vals[k];
                let a2 = a.iter().zip(da).map(|(x, d)| x + sign * eps * d).collect();
                let b2 = bb.iter().zip(db).map(|(x, d)| x + sign * eps * d).collect();
                (k.clone(), (a2, b2))
            })
            .collect();
        m.loss(&b, Some(&make(&v))).unwrap().0
    };
    let fd = (shifted(1.0) - shifted(-1.0)) / (2.0 * eps as f64);
    eprintln!("directional derivative: analytic {predicted}, finite difference {fd}");
    assert!(predicted.abs() > 1e-2, "degenerate direction: {predicted}");
    assert!(
        ((predicted - fd) / predicted).abs() < 2e-3,
        "analytic {predicted} vs finite difference {fd}"
    );
}

/// bnb-4bit checkpoints of the random Qwen3 models (transformers + bitsandbytes 0.50.2
/// `save_pretrained`, NF4 + double quant, gen.py `bnb_checkpoints`): qlora uses the stored
/// blocks as they are and its loss equals transformers' on the same pre-quantized model.
#[test]
fn qwen3_bnb4_checkpoint_eval_loss_matches_transformers() {
    let exp = expected();
    let bnb: Value =
        serde_json::from_str(&std::fs::read_to_string(dir().join("bnb.json")).unwrap()).unwrap();
    for name in ["gqa_tied", "gqa_wide_head"] {
        let (e, want) = (&exp[name], &bnb[name]);
        // Pre-quantized weights are used as stored whatever the requested mode.
        for quant in [QuantMode::None, QuantMode::Nf4] {
            let m = Model::from_folder(dir().join(format!("{name}_bnb4")), &LoadOptions { quant })
                .unwrap();
            assert_eq!(m.config.architecture.as_str(), "qwen3");
            let ids = rows(&e["input_ids"]);
            for (prefix, key) in [
                (0, "loss"),
                (e["mask_prefix"].as_u64().unwrap() as usize, "loss_masked"),
            ] {
                let (sum, n) = m.loss(&batch(&ids, prefix), None).unwrap();
                let got = sum / n as f64;
                let w = want[key].as_f64().unwrap();
                let rel = ((got - w) / w).abs();
                eprintln!("{name}_bnb4 {key}: {got} vs transformers+bnb {w} (rel {rel:e})");
                assert!(rel < 1e-5, "{name}_bnb4 {key}: {got} vs {w}");
                // and it is not the f32 model's loss (the checkpoint really is 4-bit)
                assert!((got - e[key].as_f64().unwrap()).abs() > 1e-3);
            }
            let logits = m.forward_logits(&batch(&ids, 0), None).unwrap();
            let d = logits
                .at(0, 3)
                .iter()
                .zip(want["logits_row0_pos3"].as_array().unwrap())
                .map(|(a, b)| (a - b.as_f64().unwrap() as f32).abs())
                .fold(0f32, f32::max);
            eprintln!("{name}_bnb4 logits max abs diff {d:e}");
            assert!(d < 1e-4, "{name}_bnb4: logits differ by {d}");
        }
    }
}
