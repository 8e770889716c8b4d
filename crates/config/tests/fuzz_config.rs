//! config.json from the internet: byte mutations, and every size field set
//! to 0, 1 or huge values, give a config or an error naming the file — never
//! a panic, and never an accepted config whose sizes overflow when multiplied.

use proptest::prelude::*;
use qlora_config::{ModelConfig, MAX_LAYERS, MAX_PARAMS};

const BASE: &str = r#"{
  "model_type": "llama", "vocab_size": 320, "hidden_size": 64, "intermediate_size": 160,
  "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
  "rms_norm_eps": 1e-5, "max_position_embeddings": 128, "tie_word_embeddings": false,
  "bos_token_id": 1, "eos_token_id": [2, 3],
  "rope_scaling": {"rope_type": "linear", "factor": 2.0}
}"#;

const FIELDS: [&str; 10] = [
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "bos_token_id",
    "eos_token_id",
];

fn check(c: &ModelConfig) {
    assert!(c.num_hidden_layers <= MAX_LAYERS);
    assert!(c.param_count_u128() <= MAX_PARAMS);
    // every product the loaders and the planner form fits in u64
    for (_, [o, i]) in c.linear_shapes() {
        assert!((o as u128) * (i as u128) <= MAX_PARAMS);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn mutated_config_json_never_panics(
        edits in prop::collection::vec((any::<usize>(), any::<u8>()), 1..6)
    ) {
        let mut b = BASE.as_bytes().to_vec();
        for (i, x) in edits {
            let n = b.len();
            b[i % n] = x;
        }
        let text = String::from_utf8_lossy(&b);
        match ModelConfig::from_json_str(&text, "config.json") {
            Ok(c) => check(&c),
            Err(e) => prop_assert!(e.to_string().contains("config.json"), "{e}"),
        }
    }

    #[test]
    fn zero_and_huge_sizes_are_refused_or_safe(
        vals in prop::collection::vec(
            prop::sample::select(vec![
                0u64, 1, 2, 3, 1 << 20, 1 << 31, (1 << 32) + 2, 1 << 40, 1 << 53, u64::MAX / 2, u64::MAX,
            ]),
            FIELDS.len(),
        ),
        mask in any::<u16>(),
        factor in prop::sample::select(vec![-1.0f64, 0.0, 1e-300, 0.5, 4.0, 1e300]),
    ) {
        let mut j: serde_json::Value = serde_json::from_str(BASE).unwrap();
        for (k, (f, v)) in FIELDS.iter().zip(vals).enumerate() {
            if mask & (1 << k) != 0 {
                j[*f] = serde_json::json!(v);
            }
        }
        j["rope_scaling"]["factor"] = serde_json::json!(factor);
        match ModelConfig::from_json(&j, "config.json") {
            Ok(c) => {
                check(&c);
                prop_assert!(factor > 0.0 && factor < 1e38 && factor > 1e-38);
                let want: Vec<u64> = match &j["eos_token_id"] {
                    serde_json::Value::Array(a) => a.iter().map(|x| x.as_u64().unwrap()).collect(),
                    v => vec![v.as_u64().unwrap()],
                };
                let got: Vec<u64> = c.eos_token_ids.iter().map(|&x| x as u64).collect();
                prop_assert_eq!(got, want);
                if let Some(b) = c.bos_token_id {
                    prop_assert_eq!(Some(b as u64), j["bos_token_id"].as_u64());
                }
            }
            Err(e) => prop_assert!(e.to_string().contains("config.json"), "{e}"),
        }
    }
}

#[test]
fn rope_factor_and_token_ids_are_checked() {
    let mut j: serde_json::Value = serde_json::from_str(BASE).unwrap();
    for f in [0.0, -2.0] {
        j["rope_scaling"]["factor"] = serde_json::json!(f);
        let e = ModelConfig::from_json(&j, "config.json")
            .unwrap_err()
            .to_string();
        assert!(e.contains("factor") && e.contains("positive"), "{e}");
    }
    j["rope_scaling"]["factor"] = serde_json::json!(2.0);
    j["eos_token_id"] = serde_json::json!(1u64 << 32);
    let e = ModelConfig::from_json(&j, "config.json")
        .unwrap_err()
        .to_string();
    assert!(e.contains("eos_token_id"), "{e}");
    j["eos_token_id"] = serde_json::json!(2);
    j["bos_token_id"] = serde_json::json!((1u64 << 32) + 1);
    let e = ModelConfig::from_json(&j, "config.json")
        .unwrap_err()
        .to_string();
    assert!(e.contains("bos_token_id"), "{e}");
    j["bos_token_id"] = serde_json::json!(1);
    j["num_hidden_layers"] = serde_json::json!(100_000_000u64);
    let e = ModelConfig::from_json(&j, "config.json")
        .unwrap_err()
        .to_string();
    assert!(e.contains("num_hidden_layers"), "{e}");
}
