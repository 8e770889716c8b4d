//! Hostile adapters: byte-mutated config and weights never panic; non-finite
//! weights are refused on load and on save; weights of modules outside
//! `target_modules` are ignored as PEFT ignores them; ranks beyond the layers'
//! dimensions are refused before allocating.

use std::path::Path;

use proptest::prelude::*;
use qlora_config::ModelConfig;
use qlora_lora::{init_adapter, load_adapter, save_adapter, InitKind, PeftConfig, TargetModules};

fn model() -> ModelConfig {
    let j = serde_json::json!({
        "vocab_size": 64, "hidden_size": 16, "intermediate_size": 24,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
    });
    ModelConfig::from_json(&j, "tiny").unwrap()
}

fn saved(dir: &Path, targets: TargetModules) -> PeftConfig {
    let mut p = PeftConfig::new(2, 4.0, targets);
    p.init_lora_weights = InitKind::NoOpFalse; // non-zero B too
    let ad = init_adapter(&p, &model(), 1).unwrap();
    save_adapter(dir, &ad, &p).unwrap();
    p
}

#[test]
fn non_finite_weights_are_refused_on_load_and_save() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("a");
    let p = saved(&dir, TargetModules::AllLinear);
    let (_, mut ad) = load_adapter(&dir, Some(&model())).unwrap();
    let w = ad.layers.get_mut("model.layers.1.mlp.up_proj").unwrap();
    w.b.data_mut().iter_mut().for_each(|x| *x *= f32::INFINITY);
    let e = format!("{:#}", save_adapter(&dir, &ad, &p).unwrap_err());
    assert!(
        e.contains("non-finite") && e.contains("model.layers.1.mlp.up_proj.lora_B"),
        "{e}"
    );
    // the earlier adapter is intact, nothing temporary left beside it
    load_adapter(&dir, Some(&model())).unwrap();
    assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 1);
    // a file holding NaN is refused on load, naming file and tensor
    let wp = dir.join("adapter_model.safetensors");
    let mut bytes = std::fs::read(&wp).unwrap();
    let n = bytes.len();
    bytes[n - 4..].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(&wp, &bytes).unwrap();
    let e = format!("{:#}", load_adapter(&dir, Some(&model())).unwrap_err());
    assert!(
        e.contains("adapter_model.safetensors") && e.contains("NaN"),
        "{e}"
    );
}

#[test]
fn modules_outside_target_modules_are_ignored_like_peft() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("a");
    saved(&dir, TargetModules::AllLinear);
    // Same weights, config narrowed to q_proj only: PEFT would apply q_proj only.
    let cfg = dir.join("adapter_config.json");
    let mut j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    j["target_modules"] = serde_json::json!(["q_proj"]);
    std::fs::write(&cfg, j.to_string()).unwrap();
    let (_, ad) = load_adapter(&dir, Some(&model())).unwrap();
    assert_eq!(
        ad.ordered_modules(),
        [
            "model.layers.0.self_attn.q_proj",
            "model.layers.1.self_attn.q_proj"
        ]
    );
    // Without target_modules PEFT's llama default is q_proj and v_proj.
    j.as_object_mut().unwrap().remove("target_modules");
    std::fs::write(&cfg, j.to_string()).unwrap();
    let (_, ad) = load_adapter(&dir, None).unwrap();
    assert_eq!(ad.layers.len(), 4);
    assert!(ad
        .ordered_modules()
        .iter()
        .all(|m| m.ends_with("q_proj") || m.ends_with("v_proj")));
    // exclude_modules is honoured the same way
    j["target_modules"] = serde_json::json!("all-linear");
    j["exclude_modules"] = serde_json::json!(["down_proj"]);
    std::fs::write(&cfg, j.to_string()).unwrap();
    let (_, ad) = load_adapter(&dir, Some(&model())).unwrap();
    assert_eq!(ad.layers.len(), 12);
}

#[test]
fn huge_rank_is_refused_before_allocating() {
    let p = PeftConfig::new(1_000_000_000, 16.0, TargetModules::AllLinear);
    let e = init_adapter(&p, &model(), 0).unwrap_err().to_string();
    assert!(e.contains("rank 1000000000"), "{e}");
    let p = PeftConfig::new(16, 16.0, TargetModules::AllLinear);
    init_adapter(&p, &model(), 0).unwrap();
}

fn mutate(mut b: Vec<u8>, edits: &[(usize, u8)], cut: Option<usize>) -> Vec<u8> {
    for &(i, x) in edits {
        if !b.is_empty() {
            let n = b.len();
            b[i % n] ^= x | 1;
        }
    }
    if let Some(c) = cut {
        let n = b.len().max(1);
        b.truncate(c % n);
    }
    b
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 100, failure_persistence: None, ..ProptestConfig::default() })]

    /// Mutated adapter_config.json / adapter_model.safetensors: an adapter or
    /// an error, never a panic; errors name the folder or file.
    #[test]
    fn mutated_adapters_never_panic(
        which in 0usize..2,
        edits in prop::collection::vec((any::<usize>(), any::<u8>()), 1..5),
        cut in prop::option::of(any::<usize>()),
    ) {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("a");
        saved(&dir, TargetModules::AllLinear);
        let f = dir.join(["adapter_config.json", "adapter_model.safetensors"][which]);
        let b = mutate(std::fs::read(&f).unwrap(), &edits, cut);
        std::fs::write(&f, b).unwrap();
        if let Err(e) = load_adapter(&dir, Some(&model())) {
            let e = format!("{e:#}");
            prop_assert!(e.contains(dir.to_str().unwrap()), "{e}");
        }
    }
}
