//! PEFT DoRA adapters (`use_dora: true`, `…lora_magnitude_vector` keys): load,
//! save, the init of the magnitude, and what is refused.

use std::path::Path;

use qlora_config::ModelConfig;
use qlora_lora::io::{parse_peft_key, CONFIG_FILE, WEIGHTS_FILE};
use qlora_lora::{
    init_adapter, init_dora_magnitudes, load_adapter, peft_key, save_adapter, PeftConfig,
    TargetModules, Which,
};
use qlora_testutil::{dora_fixtures, fixtures};
use safetensors::SafeTensors;

fn tiny_model() -> ModelConfig {
    ModelConfig::from_file(fixtures().join("tiny_llama/model/config.json")).unwrap()
}

fn st_f32(st: &SafeTensors, k: &str) -> (Vec<usize>, Vec<f32>) {
    let t = st.tensor(k).unwrap_or_else(|_| panic!("missing {k}"));
    let d = t
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (t.shape().to_vec(), d)
}

#[test]
fn loads_peft_dora_adapter() {
    let dir = dora_fixtures().join("adapter");
    let (peft, ad) = load_adapter(&dir, Some(&tiny_model())).unwrap();
    assert!(peft.use_dora && ad.config.use_dora);
    assert_eq!((peft.r, peft.lora_alpha, ad.scaling()), (4, 8.0, 2.0));
    assert_eq!(ad.layers.len(), 14);
    // PEFT's count: Σ r·(in + out) + Σ out (the magnitudes) = 8960 + 1152
    assert_eq!(ad.num_params(), 10112);
    let bytes = std::fs::read(dir.join(WEIGHTS_FILE)).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    for (module, w) in &ad.layers {
        let m = w.magnitude.as_ref().expect("DoRA module has a magnitude");
        let (shape, data) = st_f32(&st, &peft_key(module, Which::Magnitude));
        assert_eq!(shape, vec![w.b.rows()]);
        assert_eq!(m, &data, "{module}");
        assert!(m.iter().all(|v| *v > 0.0));
    }
    assert!(peft_key("model.layers.0.mlp.down_proj", Which::Magnitude)
        .ends_with("layers.0.mlp.down_proj.lora_magnitude_vector"));
}

#[test]
fn magnitude_key_spellings_parse() {
    let m = "model.layers.1.self_attn.k_proj".to_string();
    for k in [
        "base_model.model.model.layers.1.self_attn.k_proj.lora_magnitude_vector",
        "base_model.model.model.layers.1.self_attn.k_proj.lora_magnitude_vector.default.weight",
    ] {
        assert_eq!(
            parse_peft_key(k),
            Some((m.clone(), Which::Magnitude)),
            "{k}"
        );
    }
    assert_eq!(
        parse_peft_key(
            "base_model.model.model.layers.1.self_attn.k_proj.lora_magnitude_vector.x.y.weight"
        ),
        None
    );
    assert_eq!(
        parse_peft_key("base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight"),
        Some((m, Which::A))
    );
}

#[test]
fn dora_save_reload_is_bit_identical_to_peft_file() {
    let m = tiny_model();
    let src = dora_fixtures().join("adapter");
    let (peft, ad) = load_adapter(&src, Some(&m)).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("a");
    save_adapter(&out, &ad, &peft).unwrap();
    let (peft2, ad2) = load_adapter(&out, Some(&m)).unwrap();
    assert!(peft2.use_dora);
    for (k, w) in &ad.layers {
        assert_eq!(w, &ad2.layers[k]);
    }
    let (a, b) = (
        std::fs::read(src.join(WEIGHTS_FILE)).unwrap(),
        std::fs::read(out.join(WEIGHTS_FILE)).unwrap(),
    );
    // the streamed file (magnitudes included) is byte for byte what
    // `safetensors::serialize` makes
    assert_eq!(b, qlora_lora::io::adapter_safetensors_bytes(&ad).unwrap());
    let (sa, sb) = (
        SafeTensors::deserialize(&a).unwrap(),
        SafeTensors::deserialize(&b).unwrap(),
    );
    let mut na = sa.names();
    let mut nb = sb.names();
    na.sort();
    nb.sort();
    assert_eq!(na, nb);
    assert_eq!(na.len(), 42);
    for n in na {
        assert_eq!(st_f32(&sa, n), st_f32(&sb, n), "{n}");
    }
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join(CONFIG_FILE)).unwrap()).unwrap();
    assert_eq!(j["use_dora"], true);
}

/// Rewrite the fixture adapter into `dir` with `edit` applied to the config
/// and `keep` choosing tensors (optionally replacing their data).
fn rewrite(
    dir: &Path,
    edit: impl Fn(&mut serde_json::Value),
    keep: impl Fn(&str, Vec<f32>, Vec<usize>) -> Option<(Vec<f32>, Vec<usize>)>,
) {
    let src = dora_fixtures().join("adapter");
    let mut j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join(CONFIG_FILE)).unwrap()).unwrap();
    edit(&mut j);
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(CONFIG_FILE), j.to_string()).unwrap();
    let bytes = std::fs::read(src.join(WEIGHTS_FILE)).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut bufs = Vec::new();
    for n in st.names() {
        let (shape, data) = st_f32(&st, n);
        if let Some((d, s)) = keep(n, data, shape) {
            let b: Vec<u8> = d.iter().flat_map(|x| x.to_le_bytes()).collect();
            bufs.push((n.to_string(), s, b));
        }
    }
    let views: Vec<_> = bufs
        .iter()
        .map(|(k, s, b)| {
            let v = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b);
            (k.clone(), v.unwrap())
        })
        .collect();
    std::fs::write(
        dir.join(WEIGHTS_FILE),
        safetensors::serialize(views, None).unwrap(),
    )
    .unwrap();
}

#[test]
fn inconsistent_dora_adapters_are_refused_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tiny_model();
    let err = |d: &Path| format!("{:#}", load_adapter(d, Some(&m)).unwrap_err());

    // magnitude vectors but use_dora: false
    let d = tmp.path().join("no_flag");
    rewrite(&d, |j| j["use_dora"] = false.into(), |_, v, s| Some((v, s)));
    let e = err(&d);
    assert!(
        e.contains("use_dora: false") && e.contains("lora_magnitude_vector"),
        "{e}"
    );

    // use_dora: true but one module lacks its magnitude
    let d = tmp.path().join("missing");
    rewrite(
        &d,
        |_| {},
        |n, v, s| (!n.ends_with("layers.1.mlp.up_proj.lora_magnitude_vector")).then_some((v, s)),
    );
    let e = err(&d);
    assert!(
        e.contains("model.layers.1.mlp.up_proj") && e.contains("no lora_magnitude_vector"),
        "{e}"
    );

    // wrong length
    let d = tmp.path().join("short");
    rewrite(
        &d,
        |_| {},
        |n, mut v, s| {
            if n.ends_with("layers.0.self_attn.k_proj.lora_magnitude_vector") {
                v.pop();
                return Some((v.clone(), vec![v.len()]));
            }
            Some((v, s))
        },
    );
    let e = err(&d);
    assert!(e.contains("31 values") && e.contains("32 rows"), "{e}");

    // two-dimensional magnitude
    let d = tmp.path().join("2d");
    rewrite(
        &d,
        |_| {},
        |n, v, s| {
            if n.ends_with("layers.0.self_attn.k_proj.lora_magnitude_vector") {
                return Some((v, vec![s[0], 1]));
            }
            Some((v, s))
        },
    );
    let e = err(&d);
    assert!(e.contains("expected [out_features]"), "{e}");

    // DoRA features PEFT pairs with it that we do not implement stay refused
    let d = tmp.path().join("fan");
    rewrite(
        &d,
        |j| j["fan_in_fan_out"] = true.into(),
        |_, v, s| Some((v, s)),
    );
    assert!(err(&d).contains("fan_in_fan_out"));
}

#[test]
fn fresh_dora_adapter_needs_its_magnitudes_before_saving() {
    let m = tiny_model();
    let mut p = PeftConfig::new(
        2,
        4.0,
        TargetModules::parse_cli("q_proj,down_proj").unwrap(),
    );
    p.use_dora = true;
    let mut ad = init_adapter(&p, &m, 3).unwrap();
    assert!(ad.config.use_dora);
    let tmp = tempfile::tempdir().unwrap();
    let e = format!(
        "{:#}",
        save_adapter(tmp.path().join("a"), &ad, &p).unwrap_err()
    );
    assert!(e.contains("no magnitude vector"), "{e}");
    // B = 0 at init, so m = ‖W‖ per row; with a constant W of 0.5 that is 0.5·√in.
    init_dora_magnitudes(&mut ad, |path| {
        let [o, i] = qlora_lora::peft::module_shape(&m, path).unwrap();
        Ok(vec![0.5; o * i])
    })
    .unwrap();
    for (path, w) in &ad.layers {
        let i = w.a.cols() as f32;
        let mag = w.magnitude.as_ref().unwrap();
        assert_eq!(mag.len(), w.b.rows(), "{path}");
        assert!(
            mag.iter().all(|v| (v - 0.5 * i.sqrt()).abs() < 1e-5),
            "{path}"
        );
    }
    save_adapter(tmp.path().join("a"), &ad, &p).unwrap();
    let (p2, ad2) = load_adapter(tmp.path().join("a"), Some(&m)).unwrap();
    assert!(p2.use_dora);
    assert_eq!(ad2.num_params(), ad.num_params());
}
