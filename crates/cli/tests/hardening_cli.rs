//! Hardening of `qlora train` / `eval` on the tiny fixtures: bad settings are
//! refused before training, non-finite updates stop the run without writing
//! a bad checkpoint, resume guards, row checks at load time, `--force`, and a
//! crash test (kill -9 at random moments during `train --save-every 1` and
//! `quantize`): no partial output is ever visible, resuming gives the same
//! adapter bit for bit, and the next run removes the temporary files.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{fixtures as fx, qlora_cmd as qlora};

/// 12 pre-tokenized rows of 16 tokens (ids < 320, the tiny vocabulary).
fn write_rows(out: &Path) {
    let mut text = String::new();
    for r in 0..12u32 {
        let ids: Vec<u32> = (0..16).map(|i| (r * 37 + i * 11) % 300 + 3).collect();
        text += &format!("{}\n", serde_json::json!({ "input_ids": ids }));
    }
    std::fs::write(out, text).unwrap();
}

fn train(data: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut c = qlora();
    c.args(["train", "--model"])
        .arg(fx().join("tiny_llama/model"))
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

fn run(mut c: Command) -> (bool, String) {
    let o = c.output().unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stderr).into_owned() + &String::from_utf8_lossy(&o.stdout),
    )
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn bad_settings_are_refused_with_a_clear_message() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("rows.jsonl");
    write_rows(&data);
    let out = tmp.path().join("run");
    for (flags, want) in [
        (&["--eps", "0"][..], "eps"),
        (&["--beta1", "1"], "beta1"),
        (&["--beta2=-0.1"], "beta2"),
        (&["--weight-decay", "nan"], "weight decay"),
        (&["--max-grad-norm", "inf"], "max-grad-norm"),
        (&["--lora-dropout", "1"], "dropout"),
        (&["--epochs", "0"], "epochs"),
        (&["--eval-split", "1"], "eval-split"),
        (&["--max-seq-len", "1"], "max-seq-len"),
        (&["--lr", "nan"], "learning rate"),
        (&["--rank", "100000"], "rank"),
    ] {
        let (ok, err) = run(train(&data, &out, flags));
        assert!(!ok, "{flags:?} accepted");
        assert!(err.contains(want), "{flags:?}: {err}");
        assert!(!out.join("adapter").exists());
    }
}

#[test]
fn a_non_finite_update_stops_the_run_without_a_bad_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("rows.jsonl");
    write_rows(&data);
    let out = tmp.path().join("run");
    let (ok, _) = run(train(
        &data,
        &out,
        &["--save-every", "1", "--stop-at-step", "2"],
    ));
    assert!(ok);
    // an update that makes the parameters non-finite stops the run at that
    // step, naming it, and writes no checkpoint or adapter
    // (1 - lr·wd overflows f32: every parameter becomes inf or NaN in step 1)
    let out2 = tmp.path().join("run2");
    let (ok, err) = run(train(
        &data,
        &out2,
        &["--save-every", "1", "--lr", "1e38", "--weight-decay", "10"],
    ));
    assert!(!ok);
    assert!(err.contains("non-finite update at step 1"), "{err}");
    assert!(err.contains("last good checkpoint: none"), "{err}");
    assert!(!out2.join("checkpoint-1").exists() && !out2.join("adapter").exists());
    // NaN moments in a checkpoint are refused on resume, naming the file
    let ck = out.join("checkpoint-2");
    let op = ck.join("optimizer.safetensors");
    let mut b = std::fs::read(&op).unwrap();
    let n = b.len();
    b[n - 4..].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(&op, b).unwrap();
    let (ok, err) = run(train(&data, &out, &["--resume", ck.to_str().unwrap()]));
    assert!(!ok);
    assert!(
        err.contains("optimizer.safetensors") && err.contains("non-finite"),
        "{err}"
    );
}

#[test]
fn resume_guards_and_force() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("rows.jsonl");
    write_rows(&data);
    let a = tmp.path().join("a");
    let (ok, err) = run(train(&data, &a, &["--save-every", "2"]));
    assert!(ok, "{err}");
    let ck = a.join("checkpoint-4");
    // resuming into another run's non-empty folder is refused
    let b = tmp.path().join("b");
    std::fs::create_dir_all(&b).unwrap();
    std::fs::write(b.join("metrics.jsonl"), "{}\n").unwrap();
    let (ok, err) = run(train(&data, &b, &["--resume", ck.to_str().unwrap()]));
    assert!(!ok);
    assert!(err.contains("not empty"), "{err}");
    assert_eq!(
        std::fs::read_to_string(b.join("metrics.jsonl")).unwrap(),
        "{}\n"
    );
    // a changed rank / alpha / target is refused like other settings
    for flags in [
        &["--rank", "2"][..],
        &["--alpha", "8"],
        &["--target", "q_proj,v_proj"],
    ] {
        let mut f = vec!["--resume", ck.to_str().unwrap()];
        f.extend_from_slice(flags);
        let (ok, err) = run(train(&data, &a, &f));
        assert!(!ok, "{flags:?}");
        assert!(err.contains("different adapter"), "{flags:?}: {err}");
    }
    // --force: the earlier run's checkpoints do not survive beside the new ones
    let (ok, err) = run(train(&data, &a, &["--force", "--max-steps", "3"]));
    assert!(ok, "{err}");
    assert_eq!(
        names(&a),
        ["adapter", "checkpoint-3", "loss.svg", "metrics.jsonl"]
    );
}

#[test]
fn rows_are_checked_against_the_model_before_training() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("rows.jsonl");
    write_rows(&data);
    let mut text = std::fs::read_to_string(&data).unwrap();
    text += "{\"input_ids\": [1, 2, 5000]}\n";
    text += "{\"input_ids\": [1, 2, 3], \"labels\": [-100, -100, -100]}\n";
    std::fs::write(&data, text).unwrap();
    let out = tmp.path().join("run");
    let (ok, err) = run(train(&data, &out, &[]));
    assert!(!ok);
    assert!(
        err.contains("rows.jsonl:13") && err.contains("5000"),
        "{err}"
    );
    assert!(
        !out.join("metrics.jsonl").exists(),
        "failed before training"
    );
    let (ok, err) = run(train(&data, &out, &["--on-bad-line", "skip"]));
    assert!(ok, "{err}");
    assert!(
        err.contains("skipped") && err.contains("rows.jsonl:14"),
        "{err}"
    );
}

#[test]
fn eval_refuses_rows_longer_than_the_context() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("long.jsonl");
    let ids: Vec<u32> = (0..129).map(|i| i % 300 + 3).collect();
    std::fs::write(
        &data,
        format!("{}\n", serde_json::json!({ "input_ids": ids })),
    )
    .unwrap();
    let (ok, err) = run({
        let mut c = qlora();
        c.args(["eval", "--model"])
            .arg(fx().join("tiny_llama/model"))
            .arg("--data")
            .arg(&data)
            .args(["--quant", "none"]);
        c
    });
    assert!(!ok);
    assert!(
        err.contains("long.jsonl: row 1 has 129 tokens") && err.contains("context of 128"),
        "{err}"
    );
}

fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Deterministic pseudo-random kill delays (no clock in the seed).
struct Lcg(u64);
impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n.max(1)
    }
}

/// Everything visible under `dir` is complete: no temporary names, every
/// checkpoint loadable (state, optimizer, adapter), the adapter complete.
fn assert_no_partial_output(dir: &Path) {
    for n in names(dir) {
        let p = dir.join(&n);
        if let Some(step) = n.strip_prefix("checkpoint-") {
            assert_eq!(
                names(&p),
                ["adapter", "optimizer.safetensors", "trainer_state.json"],
                "{n}"
            );
            let st: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(p.join("trainer_state.json")).unwrap(),
            )
            .unwrap();
            assert_eq!(st["step"].as_u64().unwrap().to_string(), step);
            safetensors::SafeTensors::deserialize(
                &std::fs::read(p.join("optimizer.safetensors")).unwrap(),
            )
            .unwrap();
            assert_adapter_complete(&p.join("adapter"));
        } else if n == "adapter" {
            assert_adapter_complete(&p);
        }
    }
}

fn assert_adapter_complete(p: &Path) {
    assert_eq!(
        names(p),
        ["adapter_config.json", "adapter_model.safetensors"],
        "{}",
        p.display()
    );
    serde_json::from_str::<serde_json::Value>(
        &std::fs::read_to_string(p.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    safetensors::SafeTensors::deserialize(
        &std::fs::read(p.join("adapter_model.safetensors")).unwrap(),
    )
    .unwrap();
}

fn last_checkpoint(dir: &Path) -> Option<PathBuf> {
    names(dir)
        .iter()
        .filter_map(|n| n.strip_prefix("checkpoint-")?.parse::<u64>().ok())
        .max()
        .map(|s| dir.join(format!("checkpoint-{s}")))
}

fn temp_names(dir: &Path) -> Vec<String> {
    names(dir)
        .into_iter()
        .filter(|n| n.contains(".tmp-"))
        .collect()
}

/// Start `c`, SIGKILL it after `after`; whether it was still running then.
fn kill_at(mut c: Command, after: Duration) -> bool {
    let mut child = c
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(after);
    let running = child.try_wait().unwrap().is_none();
    let _ = child.kill(); // SIGKILL on unix
    let _ = child.wait();
    running
}

#[test]
fn kill_9_during_training_and_quantize_leaves_no_partial_output() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("rows.jsonl");
    write_rows(&data);
    let flags = ["--save-every", "1"];
    // the uninterrupted reference, timed to aim the kills
    let reference = tmp.path().join("ref");
    let t = Instant::now();
    let (ok, err) = run(train(&data, &reference, &flags));
    assert!(ok, "{err}");
    let dur = t.elapsed().as_millis() as u64;
    let want = std::fs::read(reference.join("adapter/adapter_model.safetensors")).unwrap();
    let mut rng = Lcg(13);
    let mut interrupted = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    for i in 0..3 {
        if Instant::now() > deadline {
            break;
        }
        let out = tmp.path().join(format!("run{i}"));
        // up to two kills per run, then finish by resuming
        for _ in 0..2 {
            let resume = last_checkpoint(&out);
            let mut extra: Vec<String> = flags.iter().map(|s| s.to_string()).collect();
            match &resume {
                Some(ck) => extra.extend(["--resume".into(), ck.display().to_string()]),
                None if out.exists() => extra.push("--force".into()),
                None => {}
            }
            let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
            interrupted += usize::from(kill_at(
                train(&data, &out, &extra),
                Duration::from_millis(rng.below(dur + 50)),
            ));
            if out.exists() {
                assert_no_partial_output(&out);
            }
        }
        // the adapter is written last: without it the run is not finished
        if !out.join("adapter").exists() {
            let mut extra: Vec<String> = flags.iter().map(|s| s.to_string()).collect();
            match last_checkpoint(&out) {
                Some(ck) => extra.extend(["--resume".into(), ck.display().to_string()]),
                None if out.exists() => extra.push("--force".into()),
                None => {}
            }
            let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
            let (ok, err) = run(train(&data, &out, &extra));
            assert!(ok, "{err}");
        }
        assert_eq!(
            std::fs::read(out.join("adapter/adapter_model.safetensors")).unwrap(),
            want,
            "run {i}: the resumed adapter differs from the uninterrupted one"
        );
        assert_no_partial_output(&out);
        assert!(temp_names(&out).is_empty(), "{:?}", temp_names(&out));
        // identical runs report identical numbers, to the last bit
        let (a, b) = (metrics(&reference), metrics(&out));
        assert_eq!(a.len(), 6);
        assert_eq!(b.len(), 6, "run {i}");
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x["loss"], y["loss"], "run {i}");
            assert_eq!(x["grad_norm"], y["grad_norm"], "run {i}");
        }
    }

    assert!(interrupted > 0, "no kill hit a running training");
    eprintln!("{interrupted} training runs killed while running ({dur} ms per run)");

    // quantize: the output folder is absent or complete, never partial
    let model = fx().join("tiny_llama/model");
    let q = |out: &Path, force: bool| {
        let mut c = qlora();
        c.arg("quantize").arg(&model).arg("--out").arg(out);
        if force {
            c.arg("--force");
        }
        c
    };
    let qref = tmp.path().join("qref");
    let t = Instant::now();
    let (ok, err) = run(q(&qref, false));
    assert!(ok, "{err}");
    let qdur = t.elapsed().as_millis() as u64;
    let qwant = std::fs::read(qref.join("model.safetensors")).unwrap();
    let qroot = tmp.path().join("q");
    std::fs::create_dir_all(&qroot).unwrap();
    let qout = qroot.join("out");
    let mut interrupted = 0;
    for _ in 0..4 {
        interrupted += usize::from(kill_at(
            q(&qout, true),
            Duration::from_millis(rng.below(qdur + 20)),
        ));
        if qout.exists() {
            assert_eq!(names(&qout), names(&qref));
            assert_eq!(
                std::fs::read(qout.join("model.safetensors")).unwrap(),
                qwant
            );
        }
    }
    assert!(interrupted > 0, "no kill hit a running quantize");
    let (ok, err) = run(q(&qout, true));
    assert!(ok, "{err}");
    assert_eq!(
        std::fs::read(qout.join("model.safetensors")).unwrap(),
        qwant
    );
    assert_eq!(names(&qroot), ["out"], "temporary files left");
}

#[test]
fn a_broken_tokenizer_is_reported_and_huge_sizes_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("model");
    std::fs::create_dir_all(&m).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fx().join("tiny_llama/model").join(f), m.join(f)).unwrap();
    }
    std::fs::write(m.join("tokenizer.json"), "{ not a tokenizer").unwrap();
    let data = tmp.path().join("t.jsonl");
    std::fs::write(&data, "{\"text\": \"hello\"}\n").unwrap();
    let (ok, err) = run({
        let mut c = qlora();
        c.args(["train", "--model"])
            .arg(&m)
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(tmp.path().join("run"))
            .args(["--quant", "none"]);
        c
    });
    assert!(!ok);
    assert!(
        err.contains("tokenizer") && err.contains("could not be loaded"),
        "{err}"
    );
    // config.json sizes far beyond any model: a clear error, no abort
    let big = tmp.path().join("big");
    std::fs::create_dir_all(&big).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(m.join("config.json")).unwrap()).unwrap();
    cfg["num_hidden_layers"] = serde_json::json!(100_000_000u64);
    std::fs::write(big.join("config.json"), cfg.to_string()).unwrap();
    for cmd in ["size", "plan"] {
        let (ok, err) = run({
            let mut c = qlora();
            c.arg(cmd).arg(big.join("config.json"));
            c
        });
        assert!(!ok && err.contains("num_hidden_layers"), "{cmd}: {err}");
    }
    // a budget beyond 2^64 bytes: an answer, not a panic
    let (ok, err) = run({
        let mut c = qlora();
        c.arg("plan")
            .arg(m.join("config.json"))
            .args(["--budget", "99999999999999T", "--json"]);
        c
    });
    assert!(ok, "{err}");
}
