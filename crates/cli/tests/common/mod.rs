//! Helpers shared by the CLI integration tests (each test file is its own crate
//! and uses a subset, hence the `dead_code` allowance).
#![allow(dead_code, unused_imports)]

pub use qlora_testutil::demo_gguf;
pub use qlora_testutil::fixtures;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The built `qlora` binary.
pub fn qlora_cmd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_qlora"))
}

/// Run `qlora args...`: (success, stdout, stderr).
pub fn qlora_run(args: &[&str]) -> (bool, String, String) {
    let out = qlora_cmd().args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `qlora eval --model model --data data --quant none --json extra...`: its JSON
/// report (the run must succeed).
pub fn eval_json(model: &Path, data: &Path, extra: &[&str]) -> Value {
    let mut args = vec![
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--quant",
        "none",
        "--json",
    ];
    args.extend_from_slice(extra);
    let (ok, out, err) = qlora_run(&args);
    assert!(ok, "{}: {err}", model.display());
    serde_json::from_str(out.trim()).unwrap()
}

/// `dir/metrics.jsonl` (what `qlora train` writes), one JSON value per step.
pub fn metrics(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap_or_else(|e| panic!("{}/metrics.jsonl: {e}", dir.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The f32 tensors of `dir/adapter_model.safetensors` sorted by name: (name, shape, values).
pub fn adapter_tensors(dir: &Path) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let path = dir.join("adapter_model.safetensors");
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(k, t)| {
            assert_eq!(t.dtype(), safetensors::Dtype::F32, "{k}");
            let d = t
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            (k, t.shape().to_vec(), d)
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// The random tiny Qwen3 model `crates/model/tests/fixtures/qwen3/<name>`.
pub fn qwen3_fixture(name: &str) -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../model/tests/fixtures/qwen3"
    ))
    .join(name)
}

/// Writes `dir/tokenizer.json`: byte-level BPE over the fixtures' 64-token vocabulary
/// (bytes '!'..'`', which GPT-2's byte alphabet spells as themselves), no merges.
pub fn write_byte_tokenizer(dir: &Path) {
    let vocab: serde_json::Map<String, Value> = (0..64u8)
        .map(|i| (((b'!' + i) as char).to_string(), serde_json::json!(i)))
        .collect();
    let tj = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": []}
    });
    std::fs::write(dir.join("tokenizer.json"), tj.to_string()).unwrap();
}

/// 12 pre-tokenized rows of 16 tokens (ids < 320, the tiny vocabulary).
pub fn write_tiny_rows(out: &Path) {
    let mut text = String::new();
    for r in 0..12u32 {
        let ids: Vec<u32> = (0..16).map(|i| (r * 37 + i * 11) % 300 + 3).collect();
        text += &format!("{}\n", serde_json::json!({ "input_ids": ids }));
    }
    std::fs::write(out, text).unwrap();
}

/// `qlora train` of the tiny Llama fixture (f32 base, batch 2) with defaults that
/// `extra` may override: 6 steps, rank 4, lr 5e-3, no dropout.
pub fn tiny_train(data: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut c = qlora_cmd();
    c.args(["train", "--model"])
        .arg(fixtures().join("tiny_llama/model"))
        .arg("--data")
        .arg(data)
        .arg("--out")
        .arg(out)
        .args(["--quant", "none", "--batch-size", "2"]);
    // defaults unless `extra` sets them
    for (k, v) in [
        ("--max-steps", "6"),
        ("--rank", "4"),
        ("--lr", "5e-3"),
        ("--lora-dropout", "0"),
    ] {
        if !extra
            .iter()
            .any(|e| *e == k || e.starts_with(&format!("{k}=")))
        {
            c.args([k, v]);
        }
    }
    c.args(extra);
    c
}

/// Run `c`: (success, stderr followed by stdout).
pub fn run_combined(mut c: Command) -> (bool, String) {
    let o = c.output().unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stderr).into_owned() + &String::from_utf8_lossy(&o.stdout),
    )
}

/// The names in `dir`, sorted (empty when it does not exist).
pub fn dir_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}
