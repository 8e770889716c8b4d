//! Tests against PEFT's own files in the shared fixtures.

use qlora_config::ModelConfig;
use safetensors::SafeTensors;

use crate::*;
use qlora_testutil::fixtures;

fn tiny_model() -> ModelConfig {
    ModelConfig::from_file(fixtures().join("tiny_llama/model/config.json")).unwrap()
}

fn read_st(path: &std::path::Path) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(k, t)| {
            let d: Vec<f32> = t
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (k, t.shape().to_vec(), d)
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn flat(t: &Matrix) -> Vec<f32> {
    t.data().to_vec()
}

#[test]
fn loads_peft_fixture_adapter() {
    let m = tiny_model();
    let dir = fixtures().join("tiny_lora_adapter/adapter");
    let (peft, ad) = load_adapter(&dir, Some(&m)).unwrap();
    assert_eq!(peft.r, 4);
    assert_eq!(peft.lora_alpha, 8.0);
    assert_eq!(peft.lora_dropout, 0.0);
    assert!(!peft.use_rslora);
    assert_eq!(
        peft.base_model_name_or_path.as_deref(),
        Some("tiny_llama/model")
    );
    assert_eq!(ad.scaling(), 2.0);
    assert_eq!(ad.num_params(), 8960);
    assert_eq!(ad.layers.len(), 14);
    let order = ad.ordered_modules();
    assert_eq!(order[0], "model.layers.0.self_attn.q_proj");
    assert_eq!(order[6], "model.layers.0.mlp.down_proj");
    assert_eq!(order[13], "model.layers.1.mlp.down_proj");
    assert_eq!(ad.config.target_modules, order);
    let q = ad.get("model.layers.1.self_attn.k_proj").unwrap();
    assert_eq!(q.a.dims(), [4, 64]);
    assert_eq!(q.b.dims(), [32, 4]);
    let d = ad.get("model.layers.0.mlp.down_proj").unwrap();
    assert_eq!(d.a.dims(), [4, 160]);
    assert_eq!(d.b.dims(), [64, 4]);
    // values equal the raw file, and A lies in PEFT's kaiming bound U(±1/√in)
    for (k, shape, data) in read_st(&dir.join(io::WEIGHTS_FILE)) {
        let (module, which) = io::parse_peft_key(&k).unwrap();
        let w = ad.get(&module).unwrap();
        let t = if which == Which::A { &w.a } else { &w.b };
        assert_eq!(&t.dims()[..], &shape[..]);
        assert_eq!(flat(t), data, "{k}");
        if which == Which::A {
            let bound = 1.0 / (shape[1] as f32).sqrt();
            assert!(data.iter().all(|x| x.abs() <= bound), "{k}");
        }
    }
}

/// The merged fixture model is `W + 2·(B @ A)`: recompute it from our loaded adapter.
#[test]
fn merge_matches_peft_merged_model() {
    let (_, ad) = load_adapter(fixtures().join("tiny_lora_adapter/adapter"), None).unwrap();
    let base = read_st(&fixtures().join("tiny_llama/model/model.safetensors"));
    let merged = read_st(&fixtures().join("tiny_lora_adapter/merged/model.safetensors"));
    let mut checked = 0;
    for ((k, shape, w), (k2, _, wm)) in base.iter().zip(&merged) {
        assert_eq!(k, k2);
        let module = k.trim_end_matches(".weight");
        let Some(l) = ad.get(module) else {
            assert_eq!(w, wm, "{k} must be unchanged");
            continue;
        };
        // W + s·(B @ A), f32 as torch computes it
        let ([o, r], [_, i]) = (l.b.dims(), l.a.dims());
        assert_eq!((o, i), (shape[0], shape[1]));
        let s = ad.scaling() as f32;
        let ours: Vec<f32> = (0..o * i)
            .map(|idx| {
                let (row, col) = (idx / i, idx % i);
                let d: f32 = (0..r)
                    .map(|k| l.b.data()[row * r + k] * l.a.data()[k * i + col])
                    .sum();
                w[idx] + d * s
            })
            .collect();
        let max = ours
            .iter()
            .zip(wm)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(max <= 1e-6, "{k}: max diff {max}");
        checked += 1;
    }
    assert_eq!(checked, 14);
}

#[test]
fn save_reload_is_identical() {
    let m = tiny_model();
    let src = fixtures().join("tiny_lora_adapter/adapter");
    let (peft, ad) = load_adapter(&src, Some(&m)).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("a");
    save_adapter(&out, &ad, &peft).unwrap();
    let (peft2, ad2) = load_adapter(&out, Some(&m)).unwrap();
    assert_eq!(peft2, {
        let mut p = peft.clone();
        p.raw = peft2.raw.clone();
        p
    });
    assert_eq!(ad2.config, ad.config);
    for (k, w) in &ad.layers {
        let w2 = &ad2.layers[k];
        assert_eq!(flat(&w.a), flat(&w2.a));
        assert_eq!(flat(&w.b), flat(&w2.b));
    }
    // tensors are bit-identical to PEFT's file; unknown config keys survive
    assert_eq!(
        read_st(&src.join(io::WEIGHTS_FILE)),
        read_st(&out.join(io::WEIGHTS_FILE))
    );
    // the streamed file is byte for byte what `safetensors::serialize` makes
    assert_eq!(
        std::fs::read(out.join(io::WEIGHTS_FILE)).unwrap(),
        io::adapter_safetensors_bytes(&ad).unwrap()
    );
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join(io::CONFIG_FILE)).unwrap()).unwrap();
    assert_eq!(j["peft_version"], "0.21.2");
    assert_eq!(j["r"], 4);
    assert_eq!(j["lora_alpha"], 8);
    assert_eq!(j["task_type"], "CAUSAL_LM");
    let st = std::fs::read(out.join(io::WEIGHTS_FILE)).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&st).unwrap();
    assert_eq!(
        meta.metadata()
            .as_ref()
            .unwrap()
            .get("format")
            .map(String::as_str),
        Some("pt")
    );
    // no temporary files left behind
    let names: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
}

#[test]
fn bf16_adapter_is_accepted() {
    let src = fixtures().join("tiny_lora_adapter/adapter");
    let (peft, ad) = load_adapter(&src, None).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mut bufs = Vec::new();
    for (k, w) in &ad.layers {
        for (which, t) in [(Which::A, &w.a), (Which::B, &w.b)] {
            let bytes: Vec<u8> = t
                .data()
                .iter()
                .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
                .collect();
            bufs.push((peft_key(k, which), t.dims().to_vec(), bytes));
        }
    }
    let views: Vec<_> = bufs
        .iter()
        .map(|(k, s, b)| {
            let v = safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, s.clone(), b);
            (k.clone(), v.unwrap())
        })
        .collect();
    let bytes = safetensors::serialize(views, None).unwrap();
    std::fs::write(tmp.path().join(io::WEIGHTS_FILE), bytes).unwrap();
    std::fs::copy(src.join(io::CONFIG_FILE), tmp.path().join(io::CONFIG_FILE)).unwrap();
    let (_, ad2) = load_adapter(tmp.path(), Some(&tiny_model())).unwrap();
    for (k, w) in &ad.layers {
        let a = flat(&w.a);
        let a2 = flat(&ad2.layers[k].a);
        for (x, y) in a.iter().zip(&a2) {
            assert_eq!(half::bf16::from_f32(*x).to_f32(), *y);
        }
    }
    assert_eq!(peft.r, 4);
}

#[test]
fn bad_adapters_are_refused_with_reasons() {
    let m = tiny_model();
    let src = fixtures().join("tiny_lora_adapter/adapter");
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(
        src.join(io::WEIGHTS_FILE),
        tmp.path().join(io::WEIGHTS_FILE),
    )
    .unwrap();
    let cfg = std::fs::read_to_string(src.join(io::CONFIG_FILE)).unwrap();
    let check = |json: String, needle: &str| {
        std::fs::write(tmp.path().join(io::CONFIG_FILE), json).unwrap();
        let e = load_adapter(tmp.path(), Some(&m)).unwrap_err();
        let s = format!("{e:#}");
        assert!(s.contains(needle), "{s}");
    };
    check(cfg.replace("\"r\": 4", "\"r\": 8"), "r = 8");
    check(
        cfg.replace("\"use_dora\": false", "\"use_dora\": true"),
        "use_dora",
    );
    check(
        cfg.replace("\"peft_type\": \"LORA\"", "\"peft_type\": \"IA3\""),
        "IA3",
    );
    check("{not json".into(), "adapter_config.json");
    // a model with a different hidden size
    let mut other = m.clone();
    other.hidden_size = 128;
    std::fs::write(tmp.path().join(io::CONFIG_FILE), &cfg).unwrap();
    let e = load_adapter(tmp.path(), Some(&other)).unwrap_err();
    assert!(format!("{e:#}").contains("different model"), "{e:#}");
    // missing keys tolerated: a minimal old-style config
    std::fs::write(
        tmp.path().join(io::CONFIG_FILE),
        r#"{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj","k_proj","v_proj","o_proj","gate_proj","up_proj","down_proj"], "extra_future_key": [1,2]}"#,
    )
    .unwrap();
    let (p, _) = load_adapter(tmp.path(), Some(&m)).unwrap();
    assert_eq!(p.scaling(), 2.0);
}

#[test]
fn target_resolution_follows_peft_rules() {
    let m = tiny_model();
    let n = |t: TargetModules| PeftConfig::new(8, 16.0, t).resolve_targets(&m);
    let all = n(TargetModules::AllLinear).unwrap();
    assert_eq!(all.len(), 14);
    assert!(all.iter().all(|p| !p.contains("lm_head")));
    assert_eq!(all[1], "model.layers.0.self_attn.k_proj");
    let qv = n(TargetModules::parse_cli("q_proj,v_proj").unwrap()).unwrap();
    assert_eq!(
        qv,
        [
            "model.layers.0.self_attn.q_proj",
            "model.layers.0.self_attn.v_proj",
            "model.layers.1.self_attn.q_proj",
            "model.layers.1.self_attn.v_proj"
        ]
    );
    // full path and suffix entries
    let one = n(TargetModules::List(vec![
        "model.layers.1.mlp.up_proj".into(),
        "0.self_attn.o_proj".into(),
    ]))
    .unwrap();
    assert_eq!(
        one,
        [
            "model.layers.0.self_attn.o_proj",
            "model.layers.1.mlp.up_proj"
        ]
    );
    // "proj" alone is not a dotted suffix of anything
    assert!(n(TargetModules::List(vec!["proj".into()])).is_err());
    // regex is a full match
    let re = n(TargetModules::parse_cli(r"re:.*\.1\.mlp\..*").unwrap()).unwrap();
    assert_eq!(re.len(), 3);
    assert!(n(TargetModules::Regex("mlp".into())).is_err());
    assert!(n(TargetModules::List(vec!["lm_head".into(), "q_proj".into()])).is_err());
    let mut ex = PeftConfig::new(8, 16.0, TargetModules::AllLinear);
    ex.exclude_modules = Some(TargetModules::List(vec!["down_proj".into()]));
    assert_eq!(ex.resolve_targets(&m).unwrap().len(), 12);
    // JSON spellings: string regex, "all-linear", list
    let p = PeftConfig::from_json_str(r#"{"target_modules": "all-linear"}"#).unwrap();
    assert_eq!(p.target_modules, TargetModules::AllLinear);
    assert_eq!((p.r, p.lora_alpha), (8, 8.0));
    let p = PeftConfig::from_json_str(r#"{"target_modules": ".*q_proj"}"#).unwrap();
    assert_eq!(p.resolve_targets(&m).unwrap().len(), 2);
}

#[test]
fn init_matches_peft_distribution_and_is_seeded() {
    let m = tiny_model();
    let mut p = PeftConfig::new(8, 16.0, TargetModules::AllLinear);
    let a1 = init_adapter(&p, &m, 7).unwrap();
    let a2 = init_adapter(&p, &m, 7).unwrap();
    let a3 = init_adapter(&p, &m, 8).unwrap();
    // Σ r·(in+out): the fixture's 8,960 at r = 4, doubled at r = 8
    assert_eq!(a1.num_params(), 2 * 8960);
    let k = "model.layers.0.mlp.down_proj";
    assert_eq!(flat(&a1.layers[k].a), flat(&a2.layers[k].a));
    assert_ne!(flat(&a1.layers[k].a), flat(&a3.layers[k].a));
    let a = flat(&a1.layers[k].a);
    let bound = 1.0 / 160f32.sqrt();
    assert!(a.iter().all(|x| x.abs() <= bound));
    // U(-b, b): mean 0, variance b²/3 (1280 samples)
    let mean = a.iter().sum::<f32>() / a.len() as f32;
    let var = a.iter().map(|x| x * x).sum::<f32>() / a.len() as f32;
    assert!(mean.abs() < 0.1 * bound, "{mean}");
    assert!((var / (bound * bound / 3.0) - 1.0).abs() < 0.1, "{var}");
    assert!(flat(&a1.layers[k].b).iter().all(|&x| x == 0.0));
    assert_eq!(a1.scaling(), 2.0);
    p.use_rslora = true;
    assert!((init_adapter(&p, &m, 0).unwrap().scaling() - 16.0 / 8f64.sqrt()).abs() < 1e-12);
    p.init_lora_weights = InitKind::Gaussian;
    let g = flat(&init_adapter(&p, &m, 1).unwrap().layers[k].a);
    let std = (g.iter().map(|x| x * x).sum::<f32>() / g.len() as f32).sqrt();
    assert!((std / (1.0 / 8.0) - 1.0).abs() < 0.1, "{std}");
}
