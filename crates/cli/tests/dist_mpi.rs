//! `mpirun -n 2 qlora train … --batch-size 1` against one process at
//! `--batch-size 2` on the tiny fixture model: same loss trajectory (1e-5
//! relative), same final adapter (1e-5 absolute), only rank 0 writes, resume
//! needs the same process count; with the frozen base sharded (`--shard full`,
//! the default under mpirun) and whole on every process (`--shard none`). Built only with `--features mpi`; each test
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
    let ckpt_accum = &[
        "--gradient-checkpointing",
        "true",
        "--grad-accum",
        "2",
        "--lora-dropout",
        "0.1",
    ][..];
    for (model, quant, shard, extra) in [
        ("tiny_llama/model", "none", "none", &[][..]),
        ("tiny_llama/model", "nf4", "none", ckpt_accum),
        // sharded (the default): f32 and NF4 bases, with and without
        // checkpointing and accumulation, and a pre-quantized bnb-4bit folder
        ("tiny_llama/model", "none", "full", &[][..]),
        ("tiny_llama/model", "none", "full", ckpt_accum),
        ("tiny_llama/model", "nf4", "full", &[][..]),
        ("tiny_llama/model", "nf4", "default", ckpt_accum),
        ("tiny_llama_bnb4/model", "none", "full", ckpt_accum),
    ] {
        let what = format!("{model} --quant {quant} --shard {shard} {extra:?}");
        let tag = format!("{}-{quant}-{shard}-{}", model.len(), extra.len());
        let one = tmp.path().join(format!("one-{tag}"));
        let two = tmp.path().join(format!("two-{tag}"));
        let mut args = extra.to_vec();
        args.extend(["--quant", quant]);
        run(Command::new(bin()).args(train_args(model, &data, &one, 2, &args)));
        if shard != "default" {
            args.extend(["--shard", shard]);
        }
        let text = run(mpirun(2)
            .unwrap()
            .arg(bin())
            .args(train_args(model, &data, &two, 1, &args)));
        assert!(text.contains("parallel   2 processes (mpi)"), "{text}");
        let want = match shard {
            "none" => "; shard none",
            _ => "; shard full (this process holds ",
        };
        assert!(text.contains(want), "{what}: {text}");
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
    let args = ["--quant", "nf4", "--shard", "full", "--save-every", "2"];
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

/// What `--shard full` does not do is refused with a message naming the flags.
#[test]
fn full_sharding_refuses_what_it_cannot_split() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("rows.jsonl");
    write_rows(&data);
    let fail = |extra: &[&str]| {
        let o = Command::new(bin())
            .args(train_args(
                "tiny_llama/model",
                &data,
                &tmp.path().join("o"),
                1,
                extra,
            ))
            .output()
            .unwrap();
        assert!(!o.status.success(), "{extra:?} succeeded");
        String::from_utf8_lossy(&o.stderr).to_string()
    };
    let e = fail(&["--shard", "full", "--quant", "native"]);
    assert!(
        e.contains("--shard full") && e.contains("--quant native"),
        "{e}"
    );
    let e = fail(&["--shard", "half"]);
    assert!(e.contains("unknown --shard `half`"), "{e}");
    // one process: nothing to shard, a note, and the run proceeds
    let o = Command::new(bin())
        .args(train_args(
            "tiny_llama/model",
            &data,
            &tmp.path().join("o1"),
            1,
            &["--shard", "full"],
        ))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("nothing to shard"), "{err}");
}

/// Sharded ranks each hold about half of the layers' weights; only rank 0 writes.
#[test]
fn sharded_ranks_hold_half_the_layers_each() {
    let Some(_) = mpirun(2) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("rows.jsonl");
    write_rows(&data);
    let out = tmp.path().join("o");
    let text = run(mpirun(2)
        .unwrap()
        .arg("--output-filename")
        .arg(tmp.path().join("logs"))
        .arg(bin())
        .args(train_args(
            "tiny_llama/model",
            &data,
            &out,
            1,
            &["--quant", "none"],
        )));
    let _ = text;
    // tiny_llama: 2 layers of q,k,v,o (64x64, 32x64 x2, 64x64) + gate, up, down (160x64) in f32
    let layers = 2 * 4 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 160 * 64);
    for r in 0..2 {
        let log = std::fs::read_to_string(tmp.path().join(format!("logs/1/rank.{r}/stdout")))
            .unwrap_or_default();
        if r == 0 {
            let held = format!(
                "shard full (this process holds {:.1} MiB",
                (layers / 2) as f64 / (1 << 20) as f64
            );
            assert!(log.contains(&held), "rank 0 log: {log}");
        } else {
            assert!(!log.contains("parallel"), "rank {r} printed: {log}");
        }
    }
    let files: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(
        out.join("adapter/adapter_model.safetensors").exists(),
        "{files:?}"
    );
}
