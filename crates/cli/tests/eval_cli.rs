//! `qlora eval` against the tiny_llama fixture (transformers' losses).

use qlora_testutil::fixtures;
use std::path::Path;
use std::process::Command;

/// An I64 [rows, cols] tensor of a safetensors file, read by hand.
fn i64_rows(file: &Path, name: &str) -> Vec<Vec<i64>> {
    let bytes = std::fs::read(file).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let info = &header[name];
    assert_eq!(info["dtype"], "I64");
    let cols = info["shape"][1].as_u64().unwrap() as usize;
    let (b, e) = (
        info["data_offsets"][0].as_u64().unwrap() as usize,
        info["data_offsets"][1].as_u64().unwrap() as usize,
    );
    let v: Vec<i64> = bytes[8 + n + b..8 + n + e]
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    v.chunks(cols).map(|r| r.to_vec()).collect()
}

fn eval_json(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_qlora"))
        .arg("eval")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn eval_matches_transformers_loss_on_tiny_llama() {
    let reference = fixtures().join("tiny_llama/reference.safetensors");
    let ids = i64_rows(&reference, "input_ids");
    let masked = i64_rows(&reference, "labels_masked");
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("plain.jsonl");
    let with_labels = dir.path().join("masked.jsonl");
    let line = |i: &Vec<i64>| serde_json::json!({ "input_ids": i }).to_string();
    std::fs::write(&plain, ids.iter().map(line).collect::<Vec<_>>().join("\n")).unwrap();
    let rows: Vec<String> = ids
        .iter()
        .zip(&masked)
        .map(|(i, l)| serde_json::json!({ "input_ids": i, "labels": l }).to_string())
        .collect();
    std::fs::write(&with_labels, rows.join("\n")).unwrap();
    let model = fixtures().join("tiny_llama/model");
    let model = model.to_str().unwrap();
    let refj: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("tiny_llama/reference.json")).unwrap(),
    )
    .unwrap();
    for (file, key, tokens, bs) in [
        (&plain, "loss", 46, "2"),
        (&with_labels, "loss_masked", 32, "1"),
    ] {
        let v = eval_json(&[
            "--model",
            model,
            "--data",
            file.to_str().unwrap(),
            "--quant",
            "none",
            "--batch-size",
            bs,
            "--json",
        ]);
        let want = refj[key].as_f64().unwrap();
        let got = v["loss"].as_f64().unwrap();
        assert!((got - want).abs() < 1e-5, "{key}: {got} vs {want}");
        assert_eq!(v["tokens"], tokens);
        assert!((v["perplexity"].as_f64().unwrap() - want.exp()).abs() < 1e-3);
    }
    // Bad input: an id outside the vocabulary is an error naming it.
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"input_ids\": [1, 2, 5000]}\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_qlora"))
        .args([
            "eval",
            "--model",
            model,
            "--data",
            bad.to_str().unwrap(),
            "--quant",
            "none",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("5000"));
}

/// `--device`: an unknown device is a usage error; `cuda` says what is missing (this build
/// lacks the `cuda` feature, or with it: no GPU here) instead of panicking.
#[test]
fn device_cuda_without_support_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d.jsonl");
    std::fs::write(&data, "{\"input_ids\": [1, 2, 3]}\n").unwrap();
    let model = fixtures().join("tiny_llama/model");
    let run = |device: &str| {
        Command::new(env!("CARGO_BIN_EXE_qlora"))
            .args(["eval", "--model", model.to_str().unwrap(), "--data"])
            .arg(&data)
            .args(["--quant", "none", "--device", device])
            .output()
            .unwrap()
    };
    let out = run("tpu");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown device `tpu`"));
    let out = run("cuda:0");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    if cfg!(feature = "cuda") {
        // A machine with a GPU succeeds; without one the error says so.
        assert!(
            out.status.success() || err.contains("no CUDA GPU found"),
            "{err}"
        );
    } else {
        assert!(!out.status.success());
        assert!(err.contains("built without the `cuda` feature"), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    assert!(run("cpu").status.success());
}
