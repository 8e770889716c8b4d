//! Reading and writing the bnb-4bit checkpoint format against the tiny_llama_bnb4 fixture
//! (the quantize / dequantize pipelines: bnb_convert.rs).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use qlora_formats::bnb::{
    bnb4_weight_keys, is_quantized_linear, python_float_repr, DEFAULT_SKIP_MODULES,
};
use qlora_formats::{
    bnb4_tensors, quantization_config, read_bnb4, write_safetensors, Dtype, ModelFiles,
    SafetensorsFile, TensorData,
};
use qlora_quant::QuantType;
use qlora_testutil::fixtures;

fn bnb4_dir() -> PathBuf {
    fixtures().join("tiny_llama_bnb4/model")
}

#[test]
fn python_repr_of_floats() {
    let cases: [(f64, &str); 15] = [
        (1e-05, "1e-05"),
        (2.5e-07, "2.5e-07"),
        (1234.5, "1234.5"),
        (1e16, "1e+16"),
        (1.5e16, "1.5e+16"),
        (1e15, "1000000000000000.0"),
        (0.0001, "0.0001"),
        (0.00012345, "0.00012345"),
        (2.0, "2.0"),
        (-3.25, "-3.25"),
        (0.0, "0.0"),
        (1e-300, "1e-300"),
        (123456789012345680.0, "1.2345678901234568e+17"),
        (0.2071342021226883, "0.2071342021226883"),
        (5000.4755859375, "5000.4755859375"),
    ];
    for (x, want) in cases {
        assert_eq!(python_float_repr(x), want, "repr of {x:e}");
    }
    // Every nested_offset bnb wrote into the fixtures prints back identically.
    let r: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("tiny_llama_bnb4/reference.json")).unwrap(),
    )
    .unwrap();
    for js in r["quant_state_json"].as_object().unwrap().values() {
        let text = js.as_str().unwrap();
        let raw = text
            .split("\"nested_offset\": ")
            .nth(1)
            .unwrap()
            .trim_end_matches('}');
        let x: f64 = raw.parse().unwrap();
        assert_eq!(python_float_repr(x as f32 as f64), raw);
    }
    // Round trip: the printed text parses back to the same f64.
    for bits in [
        0x3e54_3210u32,
        0x3a83_126f,
        0x4b18_9680,
        0x0080_0000,
        0x3f80_0001,
    ] {
        let x = f32::from_bits(bits) as f64;
        assert_eq!(python_float_repr(x).parse::<f64>().unwrap(), x);
    }
}

#[test]
fn detects_exactly_the_fixture_quantized_modules() {
    let m = ModelFiles::open(fixtures().join("tiny_llama/model")).unwrap();
    let skip: Vec<String> = DEFAULT_SKIP_MODULES.iter().map(|s| s.to_string()).collect();
    let chosen: Vec<String> = m
        .names()
        .into_iter()
        .filter(|n| {
            let t = m.tensor(n).unwrap();
            is_quantized_linear(n, t.dtype, t.shape, &skip)
        })
        .map(|n| n.trim_end_matches(".weight").to_string())
        .collect();
    let r: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("tiny_llama_bnb4/reference.json")).unwrap(),
    )
    .unwrap();
    let mut want: Vec<String> = r["quantized_modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    want.sort();
    assert_eq!(chosen, want);
    assert_eq!(chosen.len(), 14);
    // and the bnb4 file advertises the same set
    let b = ModelFiles::open(bnb4_dir()).unwrap();
    let keys: Vec<String> = bnb4_weight_keys(&b)
        .into_iter()
        .map(|k| k.trim_end_matches(".weight").to_string())
        .collect();
    assert_eq!(keys, want);
    // skip patterns: prefix at a dot boundary and suffix
    let t = m.tensor("model.layers.1.self_attn.q_proj.weight").unwrap();
    assert!(!is_quantized_linear(
        t.name,
        t.dtype,
        t.shape,
        &["model.layers.1".into()]
    ));
    assert!(!is_quantized_linear(
        t.name,
        t.dtype,
        t.shape,
        &["self_attn.q_proj".into()]
    ));
    assert!(is_quantized_linear(
        t.name,
        t.dtype,
        t.shape,
        &["model.layers.10".into()]
    ));
}

#[test]
fn quantization_config_matches_fixture() {
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(bnb4_dir().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(
        cfg["quantization_config"],
        quantization_config(QuantType::Nf4, true, "float32")
    );
}

/// Reading every quantized module and writing its keys back gives the stored
/// tensors byte for byte, including the JSON blobs.
#[test]
fn read_then_write_back_is_identical() {
    let m = ModelFiles::open(bnb4_dir()).unwrap();
    let keys = bnb4_weight_keys(&m);
    assert_eq!(keys.len(), 14);
    let mut covered = HashSet::new();
    for k in &keys {
        let q = read_bnb4(&m, k).unwrap().expect("quantized");
        assert!(q.is_double_quant());
        for t in bnb4_tensors(k, &q) {
            let stored = m.tensor(&t.spec.name).unwrap();
            assert_eq!(stored.dtype, t.spec.dtype, "{}", t.spec.name);
            assert_eq!(stored.shape, t.spec.shape.as_slice(), "{}", t.spec.name);
            assert!(stored.data == &t.data[..], "{} differs", t.spec.name);
            covered.insert(t.spec.name.clone());
        }
    }
    assert_eq!(covered.len(), 14 * 6);
    // Plain tensors are not quantized.
    assert!(read_bnb4(&m, "lm_head.weight").unwrap().is_none());
    assert!(read_bnb4(&m, "model.norm.weight").unwrap().is_none());

    // The whole file, re-assembled from the parsed structures, is byte-identical.
    let mut tensors: Vec<TensorData> = Vec::new();
    let qs: Vec<_> = keys
        .iter()
        .map(|k| read_bnb4(&m, k).unwrap().unwrap())
        .collect();
    for (k, q) in keys.iter().zip(&qs) {
        tensors.extend(bnb4_tensors(k, q));
    }
    for n in m.names() {
        if !covered.contains(n) {
            let t = m.tensor(n).unwrap();
            tensors.push(TensorData::new(n, t.dtype, t.shape.to_vec(), t.data));
        }
    }
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("model.safetensors");
    write_safetensors(&out, &tensors).unwrap();
    assert!(
        std::fs::read(&out).unwrap()
            == std::fs::read(bnb4_dir().join("model.safetensors")).unwrap()
    );
}

#[test]
fn dequantized_weights_match_reference() {
    let m = ModelFiles::open(bnb4_dir()).unwrap();
    let r =
        SafetensorsFile::open(fixtures().join("tiny_llama_bnb4/reference.safetensors")).unwrap();
    for k in [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
    ] {
        let q = read_bnb4(&m, k).unwrap().unwrap();
        let want = r.tensor(&format!("dequantized.{k}")).unwrap();
        assert_eq!(q.shape, want.shape);
        let got = q.dequantize_f32();
        let want = want.to_f32().unwrap();
        assert!(
            got.iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{k}"
        );
    }
}

/// Copy the tiny bnb4 model into `dir` with `edit` applied to the tensor list.
fn edited_copy(dir: &Path, edit: impl Fn(&mut Vec<TensorData<'static>>)) -> PathBuf {
    let f = SafetensorsFile::open(bnb4_dir().join("model.safetensors")).unwrap();
    let mut tensors: Vec<TensorData<'static>> = f
        .tensors()
        .map(|t| TensorData::new(t.name, t.dtype, t.shape.to_vec(), t.data.to_vec()))
        .collect();
    edit(&mut tensors);
    let p = dir.join("model.safetensors");
    write_safetensors(&p, &tensors).unwrap();
    p
}

const K: &str = "model.layers.0.self_attn.q_proj.weight";

#[test]
fn missing_or_bad_aux_tensors_are_errors_naming_file_and_key() {
    let d = tempfile::tempdir().unwrap();
    let p = edited_copy(d.path(), |t| {
        t.retain(|x| x.spec.name != format!("{K}.nested_absmax"))
    });
    let f = SafetensorsFile::open(&p).unwrap();
    let e = read_bnb4(&f, K).unwrap_err().to_string();
    assert!(
        e.contains(&p.display().to_string())
            && e.contains(&format!("{K}.nested_absmax"))
            && e.contains("missing"),
        "{e}"
    );

    let p = edited_copy(d.path(), |t| {
        let a = t
            .iter_mut()
            .find(|x| x.spec.name == format!("{K}.absmax"))
            .unwrap();
        a.spec.shape = vec![63];
        a.data = a.data[..63].to_vec().into();
    });
    let f = SafetensorsFile::open(&p).unwrap();
    let e = read_bnb4(&f, K).unwrap_err().to_string();
    assert!(
        e.contains(&format!("{K}.absmax")) && e.contains("U8 [64]"),
        "{e}"
    );

    let p = edited_copy(d.path(), |t| {
        let a = t.iter_mut().find(|x| x.spec.name == K).unwrap();
        a.spec.shape = vec![2047, 1];
        a.data = a.data[..2047].to_vec().into();
    });
    let f = SafetensorsFile::open(&p).unwrap();
    let e = read_bnb4(&f, K).unwrap_err().to_string();
    assert!(
        e.contains("packed weight has 2047 bytes") && e.contains("needs 2048"),
        "{e}"
    );

    let p = edited_copy(d.path(), |t| {
        let a = t
            .iter_mut()
            .find(|x| x.spec.name.starts_with(&format!("{K}.quant_state")))
            .unwrap();
        let s = String::from_utf8(a.data.to_vec())
            .unwrap()
            .replace("\"blocksize\": 64", "\"blocksize\": 48");
        a.spec.shape = vec![s.len()];
        a.data = s.into_bytes().into();
    });
    let f = SafetensorsFile::open(&p).unwrap();
    let e = read_bnb4(&f, K).unwrap_err().to_string();
    assert!(
        e.contains("quant_state.bitsandbytes__nf4") && e.contains("blocksize 48"),
        "{e}"
    );
}

/// FSDP-style checkpoints store the packed bytes as BF16 `[n/4, 1]`: the same
/// bytes, reinterpreted.
#[test]
fn non_uint8_quant_storage_is_reinterpreted() {
    let d = tempfile::tempdir().unwrap();
    let p = edited_copy(d.path(), |t| {
        let a = t.iter_mut().find(|x| x.spec.name == K).unwrap();
        a.spec.dtype = Dtype::BF16;
        a.spec.shape = vec![1024, 1];
    });
    let f = SafetensorsFile::open(&p).unwrap();
    let m = ModelFiles::open(bnb4_dir()).unwrap();
    assert_eq!(read_bnb4(&f, K).unwrap(), read_bnb4(&m, K).unwrap());
}
