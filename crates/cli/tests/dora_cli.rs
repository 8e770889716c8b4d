//! DoRA from the command line: `qlora eval --adapter` of a PEFT DoRA adapter (f32 and
//! NF4 bases) equals PEFT's loss; `qlora train --init-adapter` reproduces torch + PEFT's
//! DoRA trajectory; `qlora train --use-dora` trains a fresh DoRA adapter and resumes it
//! exactly; `qlora merge` writes PEFT's merged weights.

use std::path::Path;
use std::process::Command;

mod common;
use common::{adapter_tensors, metrics, qlora_cmd as qlora};
use qlora_testutil::{dora_fixtures, fixtures as fx};
use safetensors::SafeTensors;

fn ok(c: &mut Command) -> String {
    let o = c.output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn f32s(st: &SafeTensors, k: &str) -> Vec<f32> {
    st.tensor(k)
        .unwrap_or_else(|_| panic!("missing {k}"))
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn i64s(st: &SafeTensors, k: &str) -> (Vec<i64>, usize) {
    let t = st.tensor(k).unwrap();
    let v = t
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (v, t.shape()[1])
}

fn reference() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dora_fixtures().join("reference.json")).unwrap())
        .unwrap()
}

/// The shared trajectory's 6 batches of 2 rows as pre-tokenized JSONL, in order.
fn write_rows(out: &Path) {
    let bytes = std::fs::read(fx().join("train_trajectory/trajectory.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut text = String::new();
    for b in 0..6 {
        let (ids, n) = i64s(&st, &format!("batch{b}_input_ids"));
        let (labels, _) = i64s(&st, &format!("batch{b}_labels"));
        for r in 0..2 {
            let row = serde_json::json!({
                "input_ids": &ids[r * n..(r + 1) * n],
                "labels": &labels[r * n..(r + 1) * n],
            });
            text += &format!("{row}\n");
        }
    }
    std::fs::write(out, text).unwrap();
}

#[test]
fn dora_eval_cli_matches_peft_loss_on_f32_and_nf4_bases() {
    let bytes = std::fs::read(dora_fixtures().join("reference.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (ids, n) = i64s(&st, "input_ids");
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("ids.jsonl");
    let rows: Vec<String> = ids
        .chunks(n)
        .map(|r| serde_json::json!({ "input_ids": r }).to_string())
        .collect();
    std::fs::write(&data, rows.join("\n")).unwrap();
    let refj = reference();
    for (model, key) in [
        ("tiny_llama/model", "loss_f32"),
        ("tiny_llama_bnb4/model", "loss_nf4"),
    ] {
        let out = ok(qlora()
            .args(["eval", "--model"])
            .arg(fx().join(model))
            .arg("--adapter")
            .arg(dora_fixtures().join("adapter"))
            .arg("--data")
            .arg(&data)
            .args(["--quant", "none", "--batch-size", "2", "--json"]));
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let (got, want) = (v["loss"].as_f64().unwrap(), refj[key].as_f64().unwrap());
        assert!(
            (got - want).abs() <= 1e-5 * want,
            "{model}: {got} vs PEFT {want}"
        );
        assert_eq!(v["tokens"], 46);
    }
}

#[test]
fn dora_train_cli_reproduces_torch_peft_trajectory() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("rows.jsonl");
    write_rows(&data);
    let out = tmp.path().join("run");
    ok(qlora()
        .args(["train", "--model"])
        .arg(fx().join("tiny_llama/model"))
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&out)
        .arg("--init-adapter")
        .arg(dora_fixtures().join("adapter"))
        .args([
            "--quant",
            "none",
            "--batch-size",
            "2",
            "--no-shuffle",
            "--max-steps",
            "6",
        ])
        .args([
            "--lr",
            "1e-3",
            "--weight-decay",
            "0",
            "--schedule",
            "constant",
        ])
        .args([
            "--warmup-steps",
            "0",
            "--max-grad-norm",
            "1.0",
            "--seed",
            "0",
        ]));
    let want = &reference()["trajectory_f32"];
    let m = metrics(&out);
    assert_eq!(m.len(), 6);
    for (i, line) in m.iter().enumerate() {
        for k in ["loss", "grad_norm"] {
            let (got, exp) = (line[k].as_f64().unwrap(), want[k][i].as_f64().unwrap());
            assert!(
                (got - exp).abs() <= 1e-4 * exp,
                "step {i} {k}: {got} vs {exp}"
            );
        }
    }
    let got = adapter_tensors(&out.join("adapter"));
    let exp = adapter_tensors(&dora_fixtures().join("trajectory_f32/final_adapter"));
    assert_eq!(got.len(), 42);
    for ((k, s, a), (k2, s2, b)) in got.iter().zip(&exp) {
        assert_eq!((k, s), (k2, s2));
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= 1e-4 * scale, "{k}: {x} vs {y}");
        }
    }
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["use_dora"], true);
}

/// `--use-dora` on a fresh adapter: magnitudes start at ‖W‖ (PEFT's init) and are
/// saved as `lora_magnitude_vector`; stop at step 2 + resume == 4 steps straight;
/// resuming without --use-dora is refused.
#[test]
fn dora_train_cli_use_dora_fresh_adapter_and_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("rows.jsonl");
    write_rows(&data);
    let run = |out: &Path, extra: &[&str]| {
        qlora()
            .args(["train", "--model"])
            .arg(fx().join("tiny_llama_bnb4/model"))
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(out)
            .args(["--batch-size", "2", "--max-steps", "4", "--rank", "2"])
            .args([
                "--target",
                "q_proj,down_proj",
                "--lr",
                "1e-2",
                "--lora-dropout",
                "0.1",
            ])
            .args(extra)
            .output()
            .unwrap()
    };
    let full = tmp.path().join("full");
    let o = run(&full, &["--use-dora"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let vals = adapter_tensors(&full.join("adapter"));
    let mags: Vec<_> = vals
        .iter()
        .filter(|(k, _, _)| k.ends_with(".lora_magnitude_vector"))
        .collect();
    assert_eq!(mags.len(), 4, "q_proj and down_proj of 2 layers");
    assert!(mags.iter().all(|(_, s, _)| s == &vec![64]));
    // trained away from the init ‖W‖ (the NF4 reference's fresh magnitudes)
    let rb = std::fs::read(dora_fixtures().join("reference.safetensors")).unwrap();
    let reference = SafeTensors::deserialize(&rb).unwrap();
    for (k, _, m) in &mags {
        let module = k
            .trim_start_matches("base_model.model.")
            .trim_end_matches(".lora_magnitude_vector");
        let init = f32s(&reference, &format!("init_magnitude_nf4.{module}"));
        let moved = m
            .iter()
            .zip(&init)
            .fold(0f32, |a, (x, y)| a.max((x - y).abs() / y));
        assert!(moved > 1e-4 && moved < 0.2, "{k}: moved {moved}");
    }
    let part = tmp.path().join("part");
    let o = run(&part, &["--use-dora", "--stop-at-step", "2"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ck = part.join("checkpoint-2");
    let o = run(&part, &["--resume", ck.to_str().unwrap()]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("dora: checkpoint true vs now false"), "{e}");
    let o = run(&part, &["--use-dora", "--resume", ck.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (a, b) = (metrics(&full), metrics(&part));
    assert_eq!((a.len(), b.len()), (4, 4));
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x["loss"], y["loss"]);
        assert_eq!(x["grad_norm"], y["grad_norm"]);
    }
    assert_eq!(vals, adapter_tensors(&part.join("adapter")));
}

#[test]
fn dora_merge_cli_matches_peft_merge_and_unload() {
    let tmp = tempfile::tempdir().unwrap();
    let rb = std::fs::read(dora_fixtures().join("reference.safetensors")).unwrap();
    let reference = SafeTensors::deserialize(&rb).unwrap();
    for (model, from, prefix) in [
        ("tiny_llama/model", "original", "merged_f32"),
        ("tiny_llama/model", "dequantized", "merged_nf4"),
    ] {
        let out = tmp.path().join(from);
        ok(qlora()
            .args(["merge", "--model"])
            .arg(fx().join(model))
            .arg("--adapter")
            .arg(dora_fixtures().join("adapter"))
            .arg("--out")
            .arg(&out)
            .args(["--from", from, "--dtype", "f32"]));
        let gb = std::fs::read(out.join("model.safetensors")).unwrap();
        let got = SafeTensors::deserialize(&gb).unwrap();
        for module in [
            "model.layers.0.self_attn.k_proj",
            "model.layers.1.mlp.down_proj",
        ] {
            let g = f32s(&got, &format!("{module}.weight"));
            let w = f32s(&reference, &format!("{prefix}.{module}"));
            let scale = w.iter().fold(0f32, |a, v| a.max(v.abs()));
            let d = g
                .iter()
                .zip(&w)
                .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
            assert!(d <= 1e-6 * scale, "--from {from} {module}: {d}");
        }
    }
}

/// `qlora plan --use-dora` counts the magnitude vectors: TinyLlama-1.1B, r 8 on all 7
/// targets is 6,307,840 LoRA parameters (FORMATS.md §3.5) plus Σ out = 2048 + 256 + 256 +
/// 2048 + 5632 + 5632 + 2048 = 17,920 per layer × 22 layers = 394,240 magnitudes, and
/// the plan grows by their states and DoRA's activations.
#[test]
fn dora_plan_counts_magnitudes_and_activations() {
    let plan = |extra: &[&str]| -> serde_json::Value {
        let out = ok(qlora()
            .args([
                "plan",
                "tinyllama-1.1b",
                "--rank",
                "8",
                "--target",
                "all-linear",
            ])
            .args(["--batch-size", "1", "--max-seq-len", "512", "--json"])
            .args(extra));
        serde_json::from_str(&out).unwrap()
    };
    let (lora, dora) = (plan(&[]), plan(&["--use-dora"]));
    assert_eq!(lora["trainable_count"], 6_307_840);
    assert_eq!(dora["trainable_count"], 6_307_840 + 394_240);
    let b = |v: &serde_json::Value, k: &str| v["per_device"][k].as_u64().unwrap();
    assert_eq!(
        b(&dora, "optimizer_states") - b(&lora, "optimizer_states"),
        8 * 394_240
    );
    // (checkpointing is on by default for 22 layers: DoRA's saved tensors are recomputed
    // inside the layer backward)
    assert!(b(&dora, "layer_workspace") > b(&lora, "layer_workspace"));
    assert!(b(&dora, "total_bytes") > b(&lora, "total_bytes"));
}

/// `qlora size MODEL --adapter DIR` counts an adapter's parameters: PEFT's DoRA fixture
/// has 8,960 LoRA A/B values plus 1,152 magnitudes (= PEFT's 10,112 trainable); a plain
/// LoRA adapter has none of the latter.
#[test]
fn dora_size_counts_adapter_magnitudes() {
    let size = |adapter: &Path, json: bool| {
        let mut c = qlora();
        c.arg("size")
            .arg(fx().join("tiny_llama/model"))
            .arg("--adapter")
            .arg(adapter);
        if json {
            c.arg("--json");
        }
        ok(&mut c)
    };
    let v: serde_json::Value =
        serde_json::from_str(&size(&dora_fixtures().join("adapter"), true)).unwrap();
    let a = &v["adapter"];
    assert_eq!(a["dora"], true);
    assert_eq!(a["modules"], 14);
    assert_eq!(a["lora_params"], 8960);
    assert_eq!(a["dora_params"], 1152);
    assert_eq!(a["total_params"], 10112);
    assert_eq!(a["f32_bytes"], 4 * 10112);
    assert_eq!(v["total_params"], 127_296, "the base is reported as before");
    let text = size(&dora_fixtures().join("adapter"), false);
    assert!(
        text.contains("10,112 trainable params") && text.contains("1,152 DoRA magnitudes"),
        "{text}"
    );
    let v: serde_json::Value =
        serde_json::from_str(&size(&fx().join("tiny_lora_adapter/adapter"), true)).unwrap();
    assert_eq!(v["adapter"]["dora"], false);
    assert_eq!(v["adapter"]["dora_params"], 0);
    assert_eq!(v["adapter"]["total_params"], 8960);
}
