//! `merge_model` against the PEFT `merge_and_unload()` fixture and the bnb-4bit checkpoint.

use std::collections::BTreeSet;

use qlora_merge::{merge_model, MergeFrom, MergeOptions};
use qlora_quant::DType;
use qlora_testutil::fixtures;
use safetensors::SafeTensors;

fn f32s(st: &SafeTensors, name: &str) -> Vec<f32> {
    let t = st.tensor(name).unwrap_or_else(|_| panic!("missing {name}"));
    assert_eq!(t.dtype(), safetensors::Dtype::F32, "{name}");
    t.data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn opts(from: Option<MergeFrom>) -> MergeOptions {
    MergeOptions {
        dtype: Some(DType::F32),
        from,
        ..Default::default()
    }
}

/// `W + s·(B@A)` in f64 from the adapter file, for an independent check.
fn reference_merge(w: &[f32], adapter: &SafeTensors, module: &str, scaling: f64) -> Vec<f64> {
    let a = f32s(adapter, &format!("base_model.model.{module}.lora_A.weight"));
    let b = f32s(adapter, &format!("base_model.model.{module}.lora_B.weight"));
    let r = 4;
    let inf = a.len() / r;
    let outf = b.len() / r;
    assert_eq!(w.len(), inf * outf);
    (0..outf * inf)
        .map(|idx| {
            let (o, i) = (idx / inf, idx % inf);
            let d: f64 = (0..r)
                .map(|k| b[o * r + k] as f64 * a[k * inf + i] as f64)
                .sum();
            w[idx] as f64 + scaling * d
        })
        .collect()
}

#[test]
fn original_merge_matches_peft_merge_and_unload() {
    let fx = fixtures();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let rep = merge_model(
        &fx.join("tiny_llama/model"),
        &fx.join("tiny_lora_adapter/adapter"),
        &out,
        &opts(None),
    )
    .unwrap();
    assert_eq!(
        rep.from,
        MergeFrom::Original,
        "an f32 source merges into the original weights by default"
    );
    assert_eq!(rep.merged_modules, 14);
    assert!(
        rep.max_abs_delta > 1e-3,
        "the fixture adapter has a visible effect"
    );

    let want_bytes = std::fs::read(fx.join("tiny_lora_adapter/merged/model.safetensors")).unwrap();
    let want = SafeTensors::deserialize(&want_bytes).unwrap();
    let got_bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let got = SafeTensors::deserialize(&got_bytes).unwrap();
    let names = |st: &SafeTensors| {
        st.names()
            .into_iter()
            .map(|s| s.to_string())
            .collect::<BTreeSet<String>>()
    };
    assert_eq!(names(&got), names(&want));
    let mut worst = 0f32;
    for name in names(&want) {
        let (g, w) = (f32s(&got, &name), f32s(&want, &name));
        assert_eq!(
            got.tensor(&name).unwrap().shape(),
            want.tensor(&name).unwrap().shape()
        );
        for (x, y) in g.iter().zip(&w) {
            worst = worst.max((x - y).abs());
        }
    }
    assert!(worst <= 1e-5, "max |ours - PEFT merged| = {worst}");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert!(cfg.get("quantization_config").is_none());
    assert!(
        out.join("generation_config.json").is_file(),
        "side files are copied"
    );
}

#[test]
fn bnb4_source_merges_into_its_dequantized_weights() {
    let fx = fixtures();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let model = fx.join("tiny_llama_bnb4/model");
    let adapter_dir = fx.join("tiny_lora_adapter/adapter");
    let e = merge_model(&model, &adapter_dir, &out, &opts(Some(MergeFrom::Original))).unwrap_err();
    assert!(format!("{e:#}").contains("--from dequantized"), "{e:#}");
    assert!(!out.exists(), "nothing written on error");

    let rep = merge_model(&model, &adapter_dir, &out, &opts(None)).unwrap();
    assert_eq!(rep.from, MergeFrom::Dequantized);
    assert!(rep.reason.contains("bitsandbytes"), "{}", rep.reason);

    let refs_bytes = std::fs::read(fx.join("tiny_llama_bnb4/reference.safetensors")).unwrap();
    let refs = SafeTensors::deserialize(&refs_bytes).unwrap();
    let ad_bytes = std::fs::read(adapter_dir.join("adapter_model.safetensors")).unwrap();
    let ad = SafeTensors::deserialize(&ad_bytes).unwrap();
    let got_bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let got = SafeTensors::deserialize(&got_bytes).unwrap();
    for module in [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.mlp.down_proj",
    ] {
        let deq = f32s(&refs, &format!("dequantized.{module}.weight"));
        let want = reference_merge(&deq, &ad, module, 2.0);
        let g = f32s(&got, &format!("{module}.weight"));
        let worst = g
            .iter()
            .zip(&want)
            .map(|(x, y)| (*x as f64 - y).abs())
            .fold(0.0, f64::max);
        assert!(worst < 1e-6, "{module}: {worst}");
    }
    // No bnb auxiliary tensors survive.
    assert!(got
        .names()
        .iter()
        .all(|n| !n.contains("absmax") && !n.contains("quant_")));
}

#[test]
fn dequantized_merge_of_f32_source_equals_merge_of_its_bnb4_checkpoint() {
    let fx = fixtures();
    let tmp = tempfile::tempdir().unwrap();
    let adapter_dir = fx.join("tiny_lora_adapter/adapter");
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    merge_model(
        &fx.join("tiny_llama/model"),
        &adapter_dir,
        &a,
        &opts(Some(MergeFrom::Dequantized)),
    )
    .unwrap();
    merge_model(
        &fx.join("tiny_llama_bnb4/model"),
        &adapter_dir,
        &b,
        &opts(None),
    )
    .unwrap();
    let (ab, bb) = (
        std::fs::read(a.join("model.safetensors")).unwrap(),
        std::fs::read(b.join("model.safetensors")).unwrap(),
    );
    let (sa, sb) = (
        SafeTensors::deserialize(&ab).unwrap(),
        SafeTensors::deserialize(&bb).unwrap(),
    );
    for name in sa.names() {
        assert_eq!(f32s(&sa, name), f32s(&sb, name), "{name}");
    }
}

#[test]
fn bf16_output_and_refusals() {
    let fx = fixtures();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m");
    let model = fx.join("tiny_llama/model");
    let adapter_dir = fx.join("tiny_lora_adapter/adapter");
    let o = MergeOptions {
        dtype: Some(DType::BF16),
        ..Default::default()
    };
    merge_model(&model, &adapter_dir, &out, &o).unwrap();
    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    assert!(st
        .tensors()
        .iter()
        .all(|(_, t)| t.dtype() == safetensors::Dtype::BF16));
    let cfg = std::fs::read_to_string(out.join("config.json")).unwrap();
    assert!(cfg.contains("bfloat16"), "{cfg}");

    // An existing output is not replaced without --force, and stays intact.
    let e = merge_model(&model, &adapter_dir, &out, &o).unwrap_err();
    assert!(format!("{e:#}").contains("--force"), "{e:#}");
    assert_eq!(std::fs::read(out.join("model.safetensors")).unwrap(), bytes);

    // An adapter for another base: shapes do not match.
    let bad = tmp.path().join("bad_adapter");
    std::fs::create_dir(&bad).unwrap();
    std::fs::copy(
        adapter_dir.join("adapter_config.json"),
        bad.join("adapter_config.json"),
    )
    .unwrap();
    let ad_bytes = std::fs::read(adapter_dir.join("adapter_model.safetensors")).unwrap();
    let ad = SafeTensors::deserialize(&ad_bytes).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, t) in ad.tensors() {
        let mut shape = t.shape().to_vec();
        let mut data = t.data().to_vec();
        if name.contains("lora_A") {
            shape[1] *= 2; // an adapter for a model twice as wide
            data.extend_from_slice(t.data());
        }
        tensors.push((name, shape, data));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, s, d)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &bad.join("adapter_model.safetensors")).unwrap();
    let out2 = tmp.path().join("m2");
    let e = merge_model(&model, &bad, &out2, &o).unwrap_err();
    let msg = format!("{e:#}");
    assert!(
        msg.contains("bad_adapter") && msg.contains("different model"),
        "{msg}"
    );
    assert!(!out2.exists());
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.contains("tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
