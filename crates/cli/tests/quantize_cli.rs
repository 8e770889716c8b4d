//! `qlora quantize` / `qlora dequantize` end to end, running the built binary.

mod common;
use common::{fixtures, qlora_run as qlora};

/// Acceptance: the CLI output equals the transformers + bitsandbytes checkpoint byte for byte.
#[test]
fn quantize_tiny_llama_equals_bnb4_fixture() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("q");
    let model = fixtures().join("tiny_llama/model");
    let (ok, stdout, stderr) = qlora(&[
        "quantize",
        model.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--quant",
        "nf4",
        "--double-quant",
        "--compute-dtype",
        "f32",
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("quantized 14 tensors"), "{stdout}");
    assert!(stdout.contains("relative RMS"), "{stdout}");
    assert!(stdout.contains("227,099 B"), "{stdout}");
    let want = fixtures().join("tiny_llama_bnb4/model");
    assert!(
        std::fs::read(out.join("model.safetensors")).unwrap()
            == std::fs::read(want.join("model.safetensors")).unwrap()
    );
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    let want_cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(want.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg, want_cfg);

    // Defaults: compute dtype bf16, nf4, double quant on.
    let out2 = d.path().join("q2");
    let (ok, _, stderr) = qlora(&[
        "quantize",
        model.to_str().unwrap(),
        "--out",
        out2.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    let cfg2: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out2.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        cfg2["quantization_config"]["bnb_4bit_compute_dtype"],
        "bfloat16"
    );
    assert_eq!(
        cfg2["quantization_config"]["bnb_4bit_use_double_quant"],
        true
    );
    assert!(
        std::fs::read(out2.join("model.safetensors")).unwrap()
            == std::fs::read(want.join("model.safetensors")).unwrap()
    );

    // Dequantize back to a plain folder.
    let back = d.path().join("back");
    let (ok, stdout, stderr) = qlora(&[
        "dequantize",
        out.to_str().unwrap(),
        "--out",
        back.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("dequantized 14 tensors"), "{stdout}");
    let cfg3: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(back.join("config.json")).unwrap()).unwrap();
    assert!(cfg3.get("quantization_config").is_none());
}

#[test]
fn no_double_quant_and_fp4_flags() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("q");
    let model = fixtures().join("tiny_llama/model");
    let (ok, _, stderr) = qlora(&[
        "quantize",
        model.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--quant",
        "fp4",
        "--no-double-quant",
        "--blocksize",
        "128",
    ]);
    assert!(ok, "{stderr}");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["quantization_config"]["bnb_4bit_quant_type"], "fp4");
    assert_eq!(
        cfg["quantization_config"]["bnb_4bit_use_double_quant"],
        false
    );
    let f = qlora_formats::SafetensorsFile::open(out.join("model.safetensors")).unwrap();
    let js = f
        .tensor("model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__fp4")
        .unwrap();
    assert_eq!(
        std::str::from_utf8(js.data).unwrap(),
        r#"{"quant_type": "fp4", "blocksize": 128, "dtype": "float32", "shape": [160, 64]}"#
    );
    let a = f
        .tensor("model.layers.0.mlp.up_proj.weight.absmax")
        .unwrap();
    assert_eq!(
        (a.dtype, a.shape),
        (qlora_formats::Dtype::F32, &[80usize][..])
    );
    assert!(f
        .get("model.layers.0.mlp.up_proj.weight.nested_absmax")
        .is_none());
}

#[test]
fn bare_file_round_trip_reproduces_fixture_dequantized() {
    let d = tempfile::tempdir().unwrap();
    let fx = qlora_formats::SafetensorsFile::open(
        fixtures().join("quant/bf16_randn_64x192.nf4.bs64.dq1.safetensors"),
    )
    .unwrap();
    let input = fx.tensor("input").unwrap();
    let inp = d.path().join("w.safetensors");
    qlora_formats::write_safetensors(
        &inp,
        &[qlora_formats::TensorData::new(
            "x",
            input.dtype,
            input.shape.to_vec(),
            input.data,
        )],
    )
    .unwrap();
    let q = d.path().join("q.safetensors");
    let (ok, _, stderr) = qlora(&[
        "quantize",
        inp.to_str().unwrap(),
        "--out",
        q.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    let qf = qlora_formats::SafetensorsFile::open(&q).unwrap();
    let mut names = qf.names();
    names.sort_unstable();
    assert_eq!(
        names,
        vec![
            "x",
            "x.absmax",
            "x.nested_absmax",
            "x.nested_quant_map",
            "x.quant_map",
            "x.quant_state.bitsandbytes__nf4"
        ]
    );
    assert_eq!(
        qf.tensor("x").unwrap().data,
        fx.tensor("packed").unwrap().data
    );
    let back = d.path().join("back.safetensors");
    let (ok, _, stderr) = qlora(&[
        "dequantize",
        q.to_str().unwrap(),
        "--out",
        back.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    let bf = qlora_formats::SafetensorsFile::open(&back).unwrap();
    let (g, w) = (bf.tensor("x").unwrap(), fx.tensor("dequantized").unwrap());
    assert_eq!((g.dtype, g.shape), (qlora_formats::Dtype::BF16, w.shape));
    assert_eq!(g.data, w.data);
    // --dtype f32 widens
    let back32 = d.path().join("back32.safetensors");
    let (ok, _, stderr) = qlora(&[
        "dequantize",
        q.to_str().unwrap(),
        "--out",
        back32.to_str().unwrap(),
        "--dtype",
        "f32",
    ]);
    assert!(ok, "{stderr}");
    let b32 = qlora_formats::SafetensorsFile::open(&back32).unwrap();
    let wide = b32.tensor("x").unwrap();
    assert_eq!(wide.dtype, qlora_formats::Dtype::F32);
    // the f32 values round (to nearest even) to exactly bnb's bf16 output
    let rne = |x: f32| {
        let b = x.to_bits();
        ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
    };
    let got: Vec<u16> = wide.to_f32().unwrap().into_iter().map(rne).collect();
    let want: Vec<u16> = w
        .data
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    assert_eq!(got, want);
}

#[test]
fn non_empty_out_needs_force_and_nothing_partial_is_left() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("q");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("precious.txt"), b"keep me").unwrap();
    let model = fixtures().join("tiny_llama/model");
    let (ok, _, stderr) = qlora(&[
        "quantize",
        model.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("not empty")
            && stderr.contains("--force")
            && stderr.contains(out.to_str().unwrap()),
        "{stderr}"
    );
    assert_eq!(std::fs::read(out.join("precious.txt")).unwrap(), b"keep me");
    let entries: Vec<_> = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
    let (ok, _, stderr) = qlora(&[
        "quantize",
        model.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--force",
    ]);
    assert!(ok, "{stderr}");
    assert!(out.join("model.safetensors").is_file() && !out.join("precious.txt").exists());
    // a bare output file is not overwritten either
    let f = d.path().join("exists.safetensors");
    std::fs::write(&f, b"x").unwrap();
    let src = fixtures().join("quant/odd_3x100.nf4.bs64.dq0.safetensors");
    let (ok, _, stderr) = qlora(&[
        "quantize",
        src.to_str().unwrap(),
        "--out",
        f.to_str().unwrap(),
    ]);
    assert!(!ok && stderr.contains("--force"), "{stderr}");
    assert_eq!(std::fs::read(&f).unwrap(), b"x");
}

#[test]
fn bad_input_errors_name_the_file() {
    let d = tempfile::tempdir().unwrap();
    let bad = d.path().join("broken.safetensors");
    std::fs::write(&bad, [0xffu8; 40]).unwrap();
    let (ok, _, stderr) = qlora(&[
        "quantize",
        bad.to_str().unwrap(),
        "--out",
        d.path().join("o.safetensors").to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("broken.safetensors") && stderr.contains("header"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    let (ok, _, stderr) = qlora(&[
        "quantize",
        "/nonexistent/model",
        "--out",
        d.path().join("x").to_str().unwrap(),
    ]);
    assert!(!ok && stderr.contains("/nonexistent/model"), "{stderr}");
    // dequantizing something that is not quantized
    let plain = fixtures().join("tiny_llama/model");
    let (ok, _, stderr) = qlora(&[
        "dequantize",
        plain.to_str().unwrap(),
        "--out",
        d.path().join("y").to_str().unwrap(),
    ]);
    assert!(
        !ok && stderr.contains("no bitsandbytes 4-bit tensors"),
        "{stderr}"
    );
    let (ok, _, stderr) = qlora(&[
        "quantize",
        plain.to_str().unwrap(),
        "--out",
        d.path().join("z").to_str().unwrap(),
        "--blocksize",
        "48",
    ]);
    assert!(!ok && stderr.contains("blocksize 48"), "{stderr}");
    assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
}

/// `--double-quant` right before the input folder leaves it as the input (clap alone
/// would take it as the flag's value); `--double-quant false IN` still means off.
#[test]
fn double_quant_flag_before_the_positional() {
    let d = tempfile::tempdir().unwrap();
    let model = fixtures().join("tiny_llama/model");
    let model = model.to_str().unwrap();
    let cfg = |out: &std::path::Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap()
    };
    let on = d.path().join("on");
    let (ok, _, stderr) = qlora(&[
        "quantize",
        "--double-quant",
        model,
        "--out",
        on.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert_eq!(
        cfg(&on)["quantization_config"]["bnb_4bit_use_double_quant"],
        true
    );
    let off = d.path().join("off");
    let (ok, _, stderr) = qlora(&[
        "quantize",
        "--double-quant",
        "false",
        model,
        "--out",
        off.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert_eq!(
        cfg(&off)["quantization_config"]["bnb_4bit_use_double_quant"],
        false
    );
}
