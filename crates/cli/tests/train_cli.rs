//! `qlora train` end to end on the tiny fixtures: the acceptance interface
//! reproduces the torch + PEFT trajectories; TOML config; resume.

use std::path::Path;

mod common;
use common::{adapter_tensors, metrics, qlora_cmd as qlora};
use qlora_testutil::fixtures as fx;
use safetensors::SafeTensors;

/// The fixture's 6 batches of 2 rows as pre-tokenized JSONL, in order.
fn write_rows(traj: &Path, out: &Path) {
    let bytes = std::fs::read(traj.join("trajectory.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let i64s = |k: &str| -> Vec<i64> {
        st.tensor(k)
            .unwrap()
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect()
    };
    let mut text = String::new();
    for b in 0..6 {
        let (ids, labels) = (
            i64s(&format!("batch{b}_input_ids")),
            i64s(&format!("batch{b}_labels")),
        );
        for r in 0..2 {
            let row = serde_json::json!({
                "input_ids": &ids[r * 16..(r + 1) * 16],
                "labels": &labels[r * 16..(r + 1) * 16],
            });
            text += &format!("{row}\n");
        }
    }
    std::fs::write(out, text).unwrap();
}

fn acceptance_run(model: &str, traj: &str, quant: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("rows.jsonl");
    write_rows(&fx().join(traj), &data);
    let out = tmp.path().join("run");
    let o = qlora()
        .args(["train", "--model"])
        .arg(fx().join(model))
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&out)
        .arg("--init-adapter")
        .arg(fx().join("tiny_lora_adapter/adapter"))
        .args([
            "--quant",
            quant,
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
            "--grad-accum",
            "1",
            "--seed",
            "0",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let want: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fx().join(traj).join("trajectory.json")).unwrap(),
    )
    .unwrap();
    let m = metrics(&out);
    assert_eq!(m.len(), 6);
    for (i, line) in m.iter().enumerate() {
        assert_eq!(line["step"], i as u64 + 1);
        assert_eq!(line["lr"], 1e-3);
        for k in ["loss", "grad_norm"] {
            let (got, exp) = (line[k].as_f64().unwrap(), want[k][i].as_f64().unwrap());
            assert!(
                (got - exp).abs() <= 1e-4 * exp,
                "{traj} step {i} {k}: {got} vs {exp}"
            );
        }
        assert!(line["tokens"].as_u64().unwrap() == 32 && line["elapsed_s"].as_f64().is_some());
    }
    let (got, exp) = (
        adapter_tensors(&out.join("adapter")),
        adapter_tensors(&fx().join(traj).join("final_adapter")),
    );
    assert_eq!(got.len(), 28);
    for ((k, _, a), (k2, _, b)) in got.iter().zip(&exp) {
        assert_eq!(k, k2);
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= 1e-4, "{traj} {k}: {x} vs {y}");
        }
    }
    assert!(out.join("checkpoint-6/trainer_state.json").exists());
    assert!(out.join("loss.svg").exists());
}

#[test]
fn acceptance_interface_reproduces_lora_trajectory() {
    acceptance_run("tiny_llama/model", "train_trajectory", "none");
}

#[test]
fn acceptance_interface_reproduces_qlora_trajectory() {
    acceptance_run("tiny_llama_bnb4/model", "train_trajectory_qlora", "nf4");
}

/// TOML config with CLI overrides; stop at step 3 and resume to 6 gives the
/// same metrics as an uninterrupted run; a non-empty --out is refused.
#[test]
fn toml_config_and_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("rows.jsonl");
    write_rows(&fx().join("train_trajectory"), &data);
    let cfg = tmp.path().join("train.toml");
    std::fs::write(
        &cfg,
        format!(
            "model = {:?}\ndata = {:?}\ninit-adapter = {:?}\nquant = \"none\"\nbatch_size = 2\nmax-steps = 6\nlr = 5e-3\nschedule = \"cosine\"\nwarmup-steps = 2\nseed = 3\n",
            fx().join("tiny_llama/model"),
            data,
            fx().join("tiny_lora_adapter/adapter")
        ),
    )
    .unwrap();
    let run = |out: &Path, extra: &[&str]| {
        let o = qlora()
            .args(["train", "--config"])
            .arg(&cfg)
            .arg("--out")
            .arg(out)
            .args(["--lr", "1e-3"])
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    let full = tmp.path().join("full");
    run(&full, &[]);
    let part = tmp.path().join("part");
    run(&part, &["--stop-at-step", "3"]);
    assert_eq!(metrics(&part).len(), 3);
    let ck = part.join("checkpoint-3");
    run(&part, &["--resume", ck.to_str().unwrap()]);
    let (a, b) = (metrics(&full), metrics(&part));
    assert_eq!(a.len(), 6);
    assert_eq!(b.len(), 6);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x["loss"], y["loss"]);
        assert_eq!(x["grad_norm"], y["grad_norm"]);
        assert_eq!(x["lr"], y["lr"]);
    }
    assert_eq!(a[0]["lr"], 0.0); // warmup from the TOML file
    assert_eq!(
        adapter_tensors(&full.join("adapter")),
        adapter_tensors(&part.join("adapter"))
    );
    // refuse a non-empty output folder; refuse resuming with other settings
    let o = qlora()
        .args(["train", "--config"])
        .arg(&cfg)
        .arg("--out")
        .arg(&full)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--force"));
    let o = qlora()
        .args(["train", "--config"])
        .arg(&cfg)
        .arg("--out")
        .arg(&part)
        .args(["--lr", "2e-3", "--resume", ck.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("different training settings"));
}

/// Without a terminal (logs, CI) the eval results are printed as plain lines,
/// before training and every --eval-every steps, and land in metrics.jsonl.
#[test]
fn eval_split_is_reported_without_a_terminal() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("rows.jsonl");
    write_rows(&fx().join("train_trajectory"), &data);
    let out = tmp.path().join("run");
    let o = qlora()
        .args(["train", "--model"])
        .arg(fx().join("tiny_llama/model"))
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&out)
        .args(["--quant", "none", "--batch-size", "2", "--max-steps", "4"])
        .args(["--eval-split", "0.25", "--eval-every", "2", "--lr", "5e-3"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    let eval_line = |prefix: &str| -> f64 {
        let l = stderr
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no `{prefix}` line in:\n{stderr}"));
        l[prefix.len()..]
            .trim_start_matches(|c: char| !c.is_ascii_digit())
            .split(',')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let before = eval_line("eval before training: loss");
    let at4 = eval_line("step 4: eval loss");
    let m = metrics(&out);
    assert_eq!(m.len(), 4);
    assert!(m[0]["eval_loss"].is_null());
    assert!((m[1]["eval_loss"].as_f64().unwrap() - eval_line("step 2: eval loss")).abs() < 1e-4);
    assert!((m[3]["eval_loss"].as_f64().unwrap() - at4).abs() < 1e-4);
    assert!(before.is_finite() && at4.is_finite() && before > 0.0);
}
