//! `qlora quantize` / `qlora dequantize` (`qlora_formats::convert`) against the
//! tiny_llama_bnb4 and quant fixtures: byte-identical to bitsandbytes, sharded and bare
//! files, refusals that leave nothing behind, and the double-quant offset's torch mean.

use std::path::PathBuf;

use qlora_formats::bnb::bnb4_weight_keys;
use qlora_formats::convert::{self, DequantizeOptions, QuantizeOptions};
use qlora_formats::{read_bnb4, write_safetensors, ModelFiles, SafetensorsFile, TensorData};
use qlora_quant::{QuantOptions, QuantType};
use qlora_testutil::fixtures;

fn bnb4_dir() -> PathBuf {
    fixtures().join("tiny_llama_bnb4/model")
}

fn opts(qt: QuantType, dq: bool) -> QuantizeOptions {
    QuantizeOptions {
        quant: QuantOptions {
            quant_type: qt,
            blocksize: 64,
            double_quant: dq,
            allow_nonfinite: false,
        },
        compute_dtype: "float32".into(),
        ..Default::default()
    }
}

/// Acceptance: quantizing the fp32 tiny Llama reproduces transformers+bnb's checkpoint.
#[test]
fn quantize_model_reproduces_bnb4_fixture() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("q");
    let rep = convert::quantize_model(
        &fixtures().join("tiny_llama/model"),
        &out,
        &opts(QuantType::Nf4, true),
    )
    .unwrap();
    assert_eq!(rep.converted, 14);
    assert_eq!(rep.copied, 7);
    let got = SafetensorsFile::open(out.join("model.safetensors")).unwrap();
    let want = SafetensorsFile::open(bnb4_dir().join("model.safetensors")).unwrap();
    let mut gn = got.names();
    let mut wn = want.names();
    gn.sort_unstable();
    wn.sort_unstable();
    assert_eq!(gn, wn);
    let mut offset_diffs = Vec::new();
    for n in wn {
        let (g, w) = (got.tensor(n).unwrap(), want.tensor(n).unwrap());
        assert_eq!((g.dtype, g.shape), (w.dtype, w.shape), "{n}");
        if n.contains(".quant_state.") {
            let gj: serde_json::Value = serde_json::from_slice(g.data).unwrap();
            let wj: serde_json::Value = serde_json::from_slice(w.data).unwrap();
            if gj != wj {
                offset_diffs.push((
                    n.to_string(),
                    gj["nested_offset"].clone(),
                    wj["nested_offset"].clone(),
                ));
            }
        } else {
            assert!(g.data == w.data, "{n} differs");
        }
    }
    // With torch's summation order emulated, every nested_offset is exact
    // (an f64 mean would differ by 1-2 ulp on 10 of the 14 modules).
    assert!(
        offset_diffs.is_empty(),
        "nested_offset differs: {offset_diffs:?}"
    );
    // The whole file is byte-identical (same layout as the reference writer).
    assert!(
        std::fs::read(out.join("model.safetensors")).unwrap()
            == std::fs::read(bnb4_dir().join("model.safetensors")).unwrap()
    );
    // config: quantization_config added, everything else preserved
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    let want_cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(bnb4_dir().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg, want_cfg);
    assert_eq!(
        std::fs::read(out.join("generation_config.json")).unwrap(),
        std::fs::read(fixtures().join("tiny_llama/model/generation_config.json")).unwrap()
    );
    // the error statistics are those of NF4 on Gaussian weights (~10% relative RMS)
    let e = rep.error.rel_rms();
    assert!(e > 0.05 && e < 0.15, "relative RMS {e}");
    assert_eq!(rep.error.elements, 86_016);
    // sizes: fixtures README §7
    assert_eq!(rep.output_total(), 227_099);
    assert_eq!(rep.input_total(), 509_184);
    // nothing else was left beside the output
    assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
}

#[test]
fn sharded_quantize_then_dequantize_round_trip() {
    let d = tempfile::tempdir().unwrap();
    let q = d.path().join("q");
    let mut o = opts(QuantType::Nf4, true);
    o.max_shard_size = 60_000;
    let rep = convert::quantize_model(&fixtures().join("tiny_llama/model"), &q, &o).unwrap();
    assert!(rep.files.len() >= 3, "{:?}", rep.files);
    assert!(q.join("model.safetensors.index.json").is_file());
    // The sharded output holds the same tensors as the fixture.
    let got = ModelFiles::open(&q).unwrap();
    let want = ModelFiles::open(bnb4_dir()).unwrap();
    assert_eq!(got.names(), want.names());
    for n in want.names() {
        assert!(
            got.tensor(n).unwrap().data == want.tensor(n).unwrap().data,
            "{n}"
        );
        // a module's keys stay in one shard
        if let Some(w) = qlora_formats::bnb::weight_of_quant_state(n) {
            assert_eq!(got.file_of(n), got.file_of(w));
        }
    }
    // Dequantize back: a plain fp32 folder whose Linear weights equal bnb's dequantization.
    let dq = d.path().join("dq");
    let rep = convert::dequantize_model(&q, &dq, &DequantizeOptions::default()).unwrap();
    assert_eq!(rep.converted, 14);
    let plain = ModelFiles::open(&dq).unwrap();
    assert_eq!(plain.len(), 21);
    let r =
        SafetensorsFile::open(fixtures().join("tiny_llama_bnb4/reference.safetensors")).unwrap();
    let k = "model.layers.0.mlp.down_proj.weight";
    assert_eq!(
        plain.tensor(k).unwrap().data,
        r.tensor(&format!("dequantized.{k}")).unwrap().data
    );
    let orig = ModelFiles::open(fixtures().join("tiny_llama/model")).unwrap();
    assert_eq!(
        plain.tensor("lm_head.weight").unwrap().data,
        orig.tensor("lm_head.weight").unwrap().data
    );
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dq.join("config.json")).unwrap()).unwrap();
    let orig_cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("tiny_llama/model/config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg, orig_cfg);
}

/// Bare files: every quant fixture's `input`, quantized and dequantized,
/// reproduces bnb's packed codes, statistics and `dequantized` tensor.
#[test]
fn bare_file_quantize_dequantize_matches_quant_fixtures() {
    let idx: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("quant/index.json")).unwrap(),
    )
    .unwrap();
    let d = tempfile::tempdir().unwrap();
    let mut checked = 0;
    for case in idx["cases"].as_array().unwrap() {
        let fx = SafetensorsFile::open(fixtures().join(case["file"].as_str().unwrap())).unwrap();
        let qt: QuantType = case["quant_type"].as_str().unwrap().parse().unwrap();
        let dq = case["compress_statistics"].as_bool().unwrap();
        let input = fx.tensor("input").unwrap();
        let inp = d.path().join(format!("in{checked}.safetensors"));
        write_safetensors(
            &inp,
            &[TensorData::new(
                "w",
                input.dtype,
                input.shape.to_vec(),
                input.data,
            )],
        )
        .unwrap();
        let q = d.path().join(format!("q{checked}.safetensors"));
        convert::quantize_file(&inp, &q, &opts(qt, dq)).unwrap();
        let qf = SafetensorsFile::open(&q).unwrap();
        let name = case["file"].as_str().unwrap();
        let js: serde_json::Value = serde_json::from_slice(
            qf.tensor(&format!("w.quant_state.bitsandbytes__{qt}"))
                .unwrap()
                .data,
        )
        .unwrap();
        let want_js: serde_json::Value =
            serde_json::from_str(case["quant_state_json"].as_str().unwrap()).unwrap();
        assert_eq!(
            qf.tensor("w").unwrap().data,
            fx.tensor("packed").unwrap().data,
            "{name}: packed"
        );
        // The quant state (incl. torch's mean as nested_offset) is exact.
        assert_eq!(js, want_js, "{name}: quant state");
        assert_eq!(
            qf.tensor(&format!("w.quant_state.bitsandbytes__{qt}"))
                .unwrap()
                .data,
            fx.tensor("quant_state_json").unwrap().data,
            "{name}: quant state bytes"
        );
        assert_eq!(
            qf.tensor("w.absmax").unwrap().data,
            fx.tensor("absmax").unwrap().data,
            "{name}: absmax"
        );
        if dq {
            assert_eq!(
                qf.tensor("w.nested_absmax").unwrap().data,
                fx.tensor("nested_absmax").unwrap().data
            );
            assert_eq!(
                qf.tensor("w.nested_quant_map").unwrap().data,
                fx.tensor("nested_quant_map").unwrap().data
            );
        }
        assert_eq!(
            qf.tensor("w.quant_map").unwrap().data,
            fx.tensor("quant_map").unwrap().data
        );

        let back = d.path().join(format!("dq{checked}.safetensors"));
        convert::dequantize_file(&q, &back, &DequantizeOptions::default()).unwrap();
        let bf = SafetensorsFile::open(&back).unwrap();
        assert_eq!(bf.names(), vec!["w"]);
        let (g, w) = (bf.tensor("w").unwrap(), fx.tensor("dequantized").unwrap());
        assert_eq!((g.dtype, g.shape), (w.dtype, w.shape), "{name}");
        let (g, w) = (g.to_f32().unwrap(), w.to_f32().unwrap());
        for (i, (a, b)) in g.iter().zip(&w).enumerate() {
            // FP4 may give -0.0 where bnb gives +0.0 (README §8): compare values.
            assert!(a == b, "{name}: dequantized[{i}] {a} vs {b}");
        }
        checked += 1;
    }
    assert_eq!(checked, 24);
}

#[test]
fn refuses_to_overwrite_without_force() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("q");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), b"x").unwrap();
    let e = convert::quantize_model(
        &fixtures().join("tiny_llama/model"),
        &out,
        &opts(QuantType::Nf4, true),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("not empty") && e.contains("--force"), "{e}");
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1);
    assert_eq!(
        std::fs::read_dir(d.path()).unwrap().count(),
        1,
        "nothing partial beside it"
    );
    let mut o = opts(QuantType::Nf4, true);
    o.force = true;
    convert::quantize_model(&fixtures().join("tiny_llama/model"), &out, &o).unwrap();
    assert!(!out.join("keep.txt").exists());
    assert!(out.join("model.safetensors").is_file());
}

#[test]
fn failed_quantize_leaves_nothing_behind() {
    // A model whose weights file is corrupt: error names the file, no output appears.
    let d = tempfile::tempdir().unwrap();
    let m = d.path().join("m");
    std::fs::create_dir(&m).unwrap();
    std::fs::copy(
        fixtures().join("tiny_llama/model/config.json"),
        m.join("config.json"),
    )
    .unwrap();
    let bytes = std::fs::read(fixtures().join("tiny_llama/model/model.safetensors")).unwrap();
    std::fs::write(m.join("model.safetensors"), &bytes[..bytes.len() - 10]).unwrap();
    let out = d.path().join("q");
    let e = convert::quantize_model(&m, &out, &opts(QuantType::Nf4, true))
        .unwrap_err()
        .to_string();
    assert!(e.contains("model.safetensors"), "{e}");
    assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
}

/// torch's CPU mean order reproduces every stored offset of the fixtures,
/// where an f64 mean does not.
#[test]
fn torch_mean_matches_every_fixture_offset() {
    use qlora_formats::torch_mean::torch_cpu_mean_f32;
    use qlora_quant::{quantize_4bit, Absmax, Input};
    let mean_offset =
        |a: &[f32]| (a.iter().map(|&x| x as f64).sum::<f64>() / a.len() as f64) as f32;
    let plain_absmax = |x: &[f32], shape: &[usize], qt: QuantType| -> Vec<f32> {
        let o = QuantOptions {
            quant_type: qt,
            blocksize: 64,
            double_quant: false,
            allow_nonfinite: false,
        };
        match quantize_4bit(Input::F32(x), shape, &o).unwrap().absmax {
            Absmax::Plain(v) => v,
            Absmax::Double(_) => unreachable!(),
        }
    };
    let mut cases: Vec<(String, Vec<f32>, f32)> = Vec::new();
    let fp32 = ModelFiles::open(fixtures().join("tiny_llama/model")).unwrap();
    let b = ModelFiles::open(bnb4_dir()).unwrap();
    for k in bnb4_weight_keys(&b) {
        let q = read_bnb4(&b, &k).unwrap().unwrap();
        let Absmax::Double(d) = &q.absmax else {
            panic!("{k} is double-quantized")
        };
        let w = fp32.tensor(&k).unwrap().to_f32().unwrap();
        cases.push((
            k.clone(),
            plain_absmax(&w, &q.shape, QuantType::Nf4),
            d.offset,
        ));
    }
    let idx: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("quant/index.json")).unwrap(),
    )
    .unwrap();
    for c in idx["cases"].as_array().unwrap() {
        if !c["compress_statistics"].as_bool().unwrap() {
            continue;
        }
        let f = SafetensorsFile::open(fixtures().join(c["file"].as_str().unwrap())).unwrap();
        let t = f.tensor("input").unwrap();
        let qt: QuantType = c["quant_type"].as_str().unwrap().parse().unwrap();
        let am = plain_absmax(&t.to_f32().unwrap(), t.shape, qt);
        cases.push((
            c["file"].as_str().unwrap().into(),
            am,
            f.tensor("offset").unwrap().to_f32().unwrap()[0],
        ));
    }
    assert_eq!(cases.len(), 26);
    let mut f64_mismatch = 0;
    for (name, am, want) in &cases {
        assert_eq!(torch_cpu_mean_f32(am).to_bits(), want.to_bits(), "{name}");
        f64_mismatch += (mean_offset(am) != *want) as usize;
    }
    // A plain f64 mean really is different here (this test is not vacuous).
    assert_eq!(f64_mismatch, 12);
}
