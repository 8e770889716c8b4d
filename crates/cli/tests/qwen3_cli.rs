//! Qwen3 end to end through the CLI: `qlora eval` of the random tiny Qwen3 models of
//! crates/model/tests/fixtures/qwen3 (HF folders and the GGUF files written from the same
//! weights) against transformers 5.24's loss (generator `gen.py` there), and a short
//! `qlora train` run on a Qwen3 folder.

mod common;

use std::path::PathBuf;

use common::qlora_run;
use serde_json::Value;

fn q3() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../model/tests/fixtures/qwen3"
    ))
}

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(q3().join("expected.json")).unwrap()).unwrap()
}

/// Pre-tokenized rows of a fixture, with the first `mask` labels masked.
fn write_rows(path: &std::path::Path, e: &Value, mask: usize) {
    let mut s = String::new();
    for r in e["input_ids"].as_array().unwrap() {
        let ids: Vec<i64> = r
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_i64().unwrap())
            .collect();
        let labels: Vec<i64> = ids
            .iter()
            .enumerate()
            .map(|(i, &t)| if i < mask { -100 } else { t })
            .collect();
        s += &serde_json::json!({"input_ids": ids, "labels": labels}).to_string();
        s.push('\n');
    }
    std::fs::write(path, s).unwrap();
}

#[test]
fn qwen3_eval_folder_and_gguf_match_transformers() {
    let exp = expected();
    let tmp = tempfile::tempdir().unwrap();
    for (name, gguf) in [
        ("gqa_tied", true),
        ("gqa_wide_head", false),
        ("qwen2_bias", false),
        ("mha_untied", true),
    ] {
        let e = &exp[name];
        for (mask, key) in [
            (0, "loss"),
            (e["mask_prefix"].as_u64().unwrap() as usize, "loss_masked"),
        ] {
            let data = tmp.path().join(format!("{name}-{key}.jsonl"));
            write_rows(&data, e, mask);
            let mut models = vec![q3().join(name)];
            if gguf {
                models.push(q3().join(format!("{name}.gguf")));
            }
            for m in models {
                let (ok, out, err) = qlora_run(&[
                    "eval",
                    "--model",
                    m.to_str().unwrap(),
                    "--data",
                    data.to_str().unwrap(),
                    "--quant",
                    "none",
                    "--json",
                ]);
                assert!(ok, "{}: {err}", m.display());
                let v: Value = serde_json::from_str(out.trim()).unwrap();
                let (got, want) = (v["loss"].as_f64().unwrap(), e[key].as_f64().unwrap());
                let rel = ((got - want) / want).abs();
                eprintln!(
                    "{} {key}: {got} vs transformers {want} (rel {rel:e})",
                    m.display()
                );
                assert!(rel < 1e-5, "{} {key}: {got} vs {want}", m.display());
            }
        }
    }
}

#[test]
fn qwen3_trains() {
    let e = &expected()["gqa_tied"];
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("rows.jsonl");
    write_rows(&data, e, 0);
    let out = tmp.path().join("run");
    let (ok, _, err) = qlora_run(&[
        "train",
        "--model",
        q3().join("gqa_tied").to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--max-steps",
        "4",
        "--batch-size",
        "2",
        "--lr",
        "1e-2",
        "--schedule",
        "constant",
        "--quant",
        "none",
    ]);
    assert!(ok, "{err}");
    let m = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let losses: Vec<f64> = m
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok()?["loss"].as_f64())
        .collect();
    assert_eq!(losses.len(), 4, "{m}");
    // step 1 is the base model's loss (LoRA B starts at zero); training lowers it
    let want = e["loss"].as_f64().unwrap();
    assert!(
        (losses[0] - want).abs() / want < 1e-4,
        "{losses:?} vs {want}"
    );
    assert!(losses[3] < losses[0], "{losses:?}");
    assert!(out.join("adapter/adapter_model.safetensors").exists());
}

/// A byte-level BPE tokenizer.json of the fixtures' 64-token vocabulary (bytes '!'..'`',
/// which GPT-2's byte alphabet spells as themselves), for export-gguf's tokenizer metadata.
fn write_tokenizer(dir: &std::path::Path) {
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

#[test]
fn export_gguf_of_qwen2_and_qwen3_reads_back_with_the_same_loss() {
    let exp = expected();
    let tmp = tempfile::tempdir().unwrap();
    for (name, arch) in [
        ("gqa_tied", "qwen3"),
        ("mha_untied", "qwen3"),
        ("qwen2_bias", "qwen2"),
    ] {
        let src = tmp.path().join(name);
        std::fs::create_dir(&src).unwrap();
        for f in ["config.json", "model.safetensors"] {
            std::fs::copy(q3().join(name).join(f), src.join(f)).unwrap();
        }
        write_tokenizer(&src);
        let out = tmp.path().join(format!("{name}.gguf"));
        let (ok, stdout, err) = qlora_run(&[
            "export-gguf",
            "--model",
            src.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--type",
            "f16",
        ]);
        assert!(ok, "{name}: {err}\n{stdout}");
        let bytes = std::fs::read(&out).unwrap();
        let has = |s: &str| bytes.windows(s.len()).any(|w| w == s.as_bytes());
        assert!(
            has(&format!("{arch}.block_count")),
            "{name}: no {arch} metadata"
        );
        if arch == "qwen3" {
            assert!(has("blk.0.attn_q_norm.weight") && has("blk.0.attn_k_norm.weight"));
        } else {
            assert!(has("blk.0.attn_q.bias") && has("blk.1.attn_v.bias"));
        }
        // The export (f16 matrices) evaluates to transformers' loss up to f16 rounding.
        let e = &exp[name];
        let data = tmp.path().join(format!("{name}.jsonl"));
        write_rows(&data, e, 0);
        let (ok, out_s, err) = qlora_run(&[
            "eval",
            "--model",
            out.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--quant",
            "none",
            "--json",
        ]);
        assert!(ok, "{name}: {err}");
        let v: Value = serde_json::from_str(out_s.trim()).unwrap();
        let (got, want) = (v["loss"].as_f64().unwrap(), e["loss"].as_f64().unwrap());
        eprintln!("{name} export: {got} vs transformers {want}");
        assert!(
            ((got - want) / want).abs() < 5e-3,
            "{name}: {got} vs {want}"
        );
    }
}
