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
                let (got, want) = (eval_loss(&m, &data), e[key].as_f64().unwrap());
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
        common::write_byte_tokenizer(&src);
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
        let (got, want) = (eval_loss(&out, &data), e["loss"].as_f64().unwrap());
        eprintln!("{name} export: {got} vs transformers {want}");
        assert!(
            ((got - want) / want).abs() < 5e-3,
            "{name}: {got} vs {want}"
        );
    }
}

/// The three models whose exports transformers' GGUF loader reads (gen.py, `EXPORT_QWEN3`:
/// Qwen3 with head_dim 128, tied and untied, because transformers 5.24 builds every qwen3 GGUF
/// with head_dim 128; and Qwen2 with q/k/v biases), with their f32 source folders.
fn export_models() -> [(&'static str, &'static str, PathBuf); 3] {
    let fx = q3().join("export_gguf");
    [
        ("qwen3_hd128_tied", "qwen3", fx.join("qwen3_hd128_tied")),
        ("qwen3_hd128_untied", "qwen3", fx.join("qwen3_hd128_untied")),
        ("qwen2_bias", "qwen2", q3().join("qwen2_bias")),
    ]
}

fn export_expected() -> Value {
    let p = q3().join("export_gguf/expected.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

/// The f16 exports of Qwen3 (tied and untied) and Qwen2 (q/k/v biases) are the files in
/// fixtures/qwen3/export_gguf byte for byte (regenerate them with QLORA_WRITE_FIXTURES=1,
/// then gen.py), and transformers' GGUF loader (`from_pretrained(dir, gguf_file=...)`, run
/// by gen.py on those files) reads them as the architecture they declare and computes the
/// same loss on them as qlora does. The logits are compared in the next test.
#[test]
fn export_gguf_of_qwen2_and_qwen3_loads_in_transformers() {
    let tf = export_expected();
    let write = std::env::var("QLORA_WRITE_FIXTURES").is_ok_and(|v| v == "1");
    let tmp = tempfile::tempdir().unwrap();
    for (name, arch, folder) in export_models() {
        let src = tmp.path().join(name);
        std::fs::create_dir(&src).unwrap();
        for f in ["config.json", "model.safetensors"] {
            std::fs::copy(folder.join(f), src.join(f)).unwrap();
        }
        common::write_byte_tokenizer(&src);
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
        assert!(stdout.contains("read-back check"), "{stdout}");
        let fixture = q3().join(format!("export_gguf/{name}.gguf"));
        if write {
            std::fs::copy(&out, &fixture).unwrap();
            continue;
        }
        assert!(
            std::fs::read(&out).unwrap() == std::fs::read(&fixture).unwrap(),
            "{name}: the export differs from {} (QLORA_WRITE_FIXTURES=1 and gen.py regenerate it)",
            fixture.display()
        );
        let t = &tf[name];
        assert_eq!(t["architecture"].as_str(), Some(arch), "{name}");
        let data = tmp.path().join(format!("{name}.jsonl"));
        write_rows(&data, t, 0);
        let (got, want) = (eval_loss(&out, &data), t["loss"].as_f64().unwrap());
        let rel = ((got - want) / want).abs();
        eprintln!("{name}.gguf: qlora {got} vs transformers' GGUF loader {want} (rel {rel:e})");
        assert!(rel < 1e-5, "{name}: {got} vs {want}");
    }
}

/// Logits of the exports (fixtures/qwen3/export_gguf, pinned byte for byte by the test
/// above) read by transformers' GGUF loader (gen.py) vs qlora: (a) qlora's GGUF loader on
/// the same file: the same f16-rounded weights, so equal to f32 rounding; (b) qlora on the
/// f32 folder the export was written from (itself equal to transformers on that folder,
/// loss within 1e-5): the difference is the f16 rounding of the weights (measured max
/// |Δlogit| 2.0e-3 to 2.8e-3 on these models; bound 1e-2).
#[test]
fn exported_gguf_logits_in_transformers_match_ours() {
    use qlora_model::{Batch, LoadOptions, Model, QuantMode};
    let tf = export_expected();
    let none = LoadOptions {
        quant: QuantMode::None,
    };
    for (name, _, folder) in export_models() {
        let t = &tf[name];
        let rows: Vec<Vec<u32>> = t["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                r.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap() as u32)
                    .collect()
            })
            .collect();
        let want: Vec<Vec<f64>> = t["logits_row0"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                r.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap())
                    .collect()
            })
            .collect();
        assert_eq!(want.len(), rows[0].len());
        let max_diff = |m: &Model| {
            let l = m
                .forward_logits(&Batch::from_ids(vec![rows[0].clone()]), None)
                .unwrap();
            let mut d = 0f64;
            for (s, w) in want.iter().enumerate() {
                let got = l.at(0, s);
                assert_eq!(got.len(), w.len());
                for (a, b) in got.iter().zip(w) {
                    d = d.max((*a as f64 - b).abs());
                }
            }
            d
        };
        let gguf =
            qlora_infer::load_gguf(&q3().join(format!("export_gguf/{name}.gguf")), &none).unwrap();
        let same_file = max_diff(&gguf);
        let src = Model::from_folder(&folder, &none).unwrap();
        let from_f32 = max_diff(&src);
        let (sum, n) = src.loss(&Batch::from_ids(rows.clone()), None).unwrap();
        let want_loss = t["loss_f32_folder"].as_f64().unwrap();
        let rel = (sum / n as f64 - want_loss).abs() / want_loss;
        eprintln!(
            "{name}: max |Δlogit| vs transformers' GGUF loader: qlora on the same GGUF {same_file:.2e}, \
             qlora on the f32 source {from_f32:.2e}; f32 folder loss rel {rel:.1e}"
        );
        assert!(rel < 1e-5, "{name}: folder loss rel {rel}");
        assert!(same_file < 1e-4, "{name}: {same_file}");
        assert!(from_f32 < 1e-2, "{name}: {from_f32}");
        assert!(from_f32 > same_file, "{name}: the f16 rounding is visible");
    }
}

/// `qlora eval --quant none --json` of `model` on `data`: the mean loss.
fn eval_loss(model: &std::path::Path, data: &std::path::Path) -> f64 {
    common::eval_json(model, data, &[])["loss"]
        .as_f64()
        .unwrap()
}
