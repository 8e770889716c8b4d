//! `mpirun -n 2 qlora train … --batch-size 1` against one process at
//! `--batch-size 2` on the tiny fixture model: same loss trajectory (1e-5
//! relative), same final adapter (1e-5 absolute), only rank 0 writes, resume
//! needs the same process count. Built only with `--features mpi`; each test
//! prints SKIPPED and passes when `mpirun` is not on the PATH.
#![cfg(feature = "mpi")]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::fixtures;
use safetensors::SafeTensors;

/// 10 rows of unequal length, pre-tokenized JSONL (ids < 320, the tiny vocab).
fn write_rows(out: &Path) {
    let mut text = String::new();
    for i in 0..10usize {
        let len = 6 + (i * 5) % 11;
        let ids: Vec<u32> = (0..len).map(|j| ((i * 37 + j * 11) % 320) as u32).collect();
        let labels: Vec<i64> = ids
            .iter()
            .enumerate()
            .map(|(j, &t)| if j < i % 3 { -100 } else { t as i64 })
            .collect();
        text += &format!(
            "{}\n",
            serde_json::json!({"input_ids": ids, "labels": labels})
        );
    }
    std::fs::write(out, text).unwrap();
}

fn train_args(model: &str, data: &Path, out: &Path, batch: usize, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = vec![
        "train".into(),
        "--model".into(),
        fixtures().join(model).display().to_string(),
        "--data".into(),
        data.display().to_string(),
        "--out".into(),
        out.display().to_string(),
        "--batch-size".into(),
        batch.to_string(),
        "--rank".into(),
        "4".into(),
        "--lr".into(),
        "2e-3".into(),
        "--warmup-steps".into(),
        "1".into(),
        "--max-steps".into(),
        "5".into(),
        "--seed".into(),
        "7".into(),
        "--no-progress".into(),
        "--init".into(),
        "gaussian".into(),
    ];
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn mpirun(n: usize) -> Option<Command> {
    let c = qlora_dist::mpirun(n);
    if c.is_none() {
        eprintln!("SKIPPED: no `mpirun` on the PATH (install openmpi-bin)");
    }
    c
}

fn run(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "{cmd:?} failed:\n{text}");
    text
}

fn losses(dir: &Path) -> Vec<f64> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect()
}

fn adapter(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let bytes = std::fs::read(dir.join("adapter/adapter_model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(k, t)| {
            let d = t
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            (k, d)
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn compare(single: &Path, par: &Path, what: &str) {
    let (a, b) = (losses(single), losses(par));
    assert_eq!(a.len(), 5, "{what}");
    assert_eq!(a.len(), b.len(), "{what}");
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        let rel = (x - y).abs() / x.abs();
        assert!(
            rel < 1e-5,
            "{what} step {}: loss {x} vs {y} (rel {rel})",
            i + 1
        );
    }
    assert!(a[0] != a[4], "{what}: the run did not move");
    let mut max = 0f32;
    for ((ka, va), (kb, vb)) in adapter(single).iter().zip(&adapter(par)) {
        assert_eq!(ka, kb);
        for (x, y) in va.iter().zip(vb) {
            max = max.max((x - y).abs());
        }
    }
    assert!(max < 1e-5, "{what}: final adapter max abs diff {max}");
}

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_qlora"))
}

#[test]
fn two_processes_reproduce_one_process_at_twice_the_batch() {
    let Some(_) = mpirun(2) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("rows.jsonl");
    write_rows(&data);
    for (model, quant, extra) in [
        ("tiny_llama/model", "none", &[][..]),
        (
            "tiny_llama/model",
            "nf4",
            &[
                "--gradient-checkpointing",
                "true",
                "--grad-accum",
                "2",
                "--lora-dropout",
                "0.1",
            ][..],
        ),
    ] {
        let what = format!("{model} --quant {quant} {extra:?}");
        let one = tmp.path().join(format!("one-{quant}"));
        let two = tmp.path().join(format!("two-{quant}"));
        let mut args = extra.to_vec();
        args.extend(["--quant", quant]);
        run(Command::new(bin()).args(train_args(model, &data, &one, 2, &args)));
        let text = run(mpirun(2)
            .unwrap()
            .arg(bin())
            .args(train_args(model, &data, &two, 1, &args)));
        assert!(text.contains("parallel   2 processes (mpi)"), "{text}");
        // one summary, one line per step: rank 1 prints nothing of its own
        assert_eq!(text.matches("schedule   ").count(), 1, "{text}");
        compare(&one, &two, &what);
        assert!(two.join("checkpoint-5/trainer_state.json").exists());
    }
}

#[test]
fn resume_with_the_same_process_count_only() {
    let Some(_) = mpirun(2) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("rows.jsonl");
    write_rows(&data);
    let full = tmp.path().join("full");
    let part = tmp.path().join("part");
    let args = ["--quant", "none", "--save-every", "2"];
    run(mpirun(2)
        .unwrap()
        .arg(bin())
        .args(train_args("tiny_llama/model", &data, &full, 1, &args)));
    let mut a2 = args.to_vec();
    a2.extend(["--stop-at-step", "2"]);
    run(mpirun(2)
        .unwrap()
        .arg(bin())
        .args(train_args("tiny_llama/model", &data, &part, 1, &a2)));
    let ck = part.join("checkpoint-2");
    let ck_s = ck.display().to_string();
    // one process refuses the 2-process checkpoint
    let o = Command::new(bin())
        .args(train_args("tiny_llama/model", &data, &part, 1, &args))
        .args(["--resume", &ck_s])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("2 data-parallel processes") && err.contains("mpirun -n 2"),
        "{err}"
    );
    // two processes continue onto the uninterrupted run
    run(mpirun(2)
        .unwrap()
        .arg(bin())
        .args(train_args("tiny_llama/model", &data, &part, 1, &args))
        .args(["--resume", &ck_s]));
    assert_eq!(losses(&part), losses(&full));
    assert_eq!(adapter(&part), adapter(&full));
}

#[test]
fn unimplemented_full_sharding_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("rows.jsonl");
    write_rows(&data);
    let o = Command::new(bin())
        .args(train_args(
            "tiny_llama/model",
            &data,
            &tmp.path().join("o"),
            1,
            &["--shard", "full"],
        ))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--shard full"));
}
