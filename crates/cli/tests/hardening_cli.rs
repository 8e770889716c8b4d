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
        (&["--max-seq-len", "0"], "max-seq-len"),
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

/// The moment a kill aims at, by the progress visible in the output folder
/// (never by wall-clock time, so the test aims the same on a loaded machine).
#[derive(Debug, Clone, Copy)]
enum Aim {
    /// As soon as the process exists.
    Start,
    /// Once `checkpoint-N` is visible (between optimizer steps).
    Checkpoint(u64),
    /// Once a temporary entry of this process (`….tmp-PID`) is visible:
    /// mid-write (stale ones of killed runs do not count).
    Writing,
}

impl Aim {
    fn reached(self, dir: &Path, pid: u32) -> bool {
        match self {
            Aim::Start => true,
            Aim::Checkpoint(n) => dir.join(format!("checkpoint-{n}")).exists(),
            Aim::Writing => {
                let mine = format!(".tmp-{pid}");
                temp_names(dir).iter().any(|n| n.ends_with(&mine))
            }
        }
    }
}

/// A process making no visible progress for this long is hung: the test
/// fails rather than waiting forever. Progress is any change of the output
/// folder's listing, so a slow (loaded) machine only makes the test slower.
const NO_PROGRESS_LIMIT: Duration = Duration::from_secs(300);

/// Start `c`, watch `dir` and SIGKILL the process `jitter_us` microseconds
/// after `aim` is reached; whether it was still running when killed.
fn kill_at(mut c: Command, dir: &Path, aim: Aim, jitter_us: u64) -> bool {
    let mut child = c
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut seen = names(dir);
    let mut changed = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return false; // finished before the aim: nothing to kill
        }
        if aim.reached(dir, child.id()) {
            break;
        }
        let now = names(dir);
        if now != seen {
            seen = now;
            changed = Instant::now();
        }
        assert!(
            changed.elapsed() < NO_PROGRESS_LIMIT,
            "{aim:?}: no progress in {} for {NO_PROGRESS_LIMIT:?}",
            dir.display()
        );
        std::thread::sleep(Duration::from_micros(200));
    }
    std::thread::sleep(Duration::from_micros(jitter_us));
    let running = child.try_wait().unwrap().is_none();
    let _ = child.kill(); // SIGKILL on unix
    let _ = child.wait();
    running
}

/// Runs of the crash test: at most this many, until enough kills landed.
const MAX_RUNS: usize = 8;
/// Kills that must land in a running process after it made progress.
const WANTED_KILLS: usize = 3;

#[test]
fn kill_9_during_training_and_quantize_leaves_no_partial_output() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("rows.jsonl");
    write_rows(&data);
    let flags = ["--save-every", "1"];
    // the uninterrupted reference
    let reference = tmp.path().join("ref");
    let (ok, err) = run(train(&data, &reference, &flags));
    assert!(ok, "{err}");
    let want = std::fs::read(reference.join("adapter/adapter_model.safetensors")).unwrap();
    let mut rng = Lcg(13);
    // kills that hit a running training after it had made progress
    // (a checkpoint or a temporary entry visible), and of those mid-write
    let (mut landed, mut mid_write) = (0, 0);
    let mut runs = 0;
    while runs < MAX_RUNS && landed < WANTED_KILLS {
        let i = runs;
        runs += 1;
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
            // 6 steps, a checkpoint after each: aim at a later checkpoint
            // than the one resumed from, at a write, or at the start.
            let from = resume
                .as_ref()
                .and_then(|p| {
                    p.file_name()?
                        .to_str()?
                        .strip_prefix("checkpoint-")?
                        .parse()
                        .ok()
                })
                .unwrap_or(0u64);
            let aim = match rng.below(4) {
                0 => Aim::Start,
                1 => Aim::Writing,
                _ if from >= 5 => Aim::Writing,
                _ => Aim::Checkpoint((from + 1 + rng.below(3)).min(5)),
            };
            let hit = kill_at(train(&data, &out, &extra), &out, aim, rng.below(3000));
            if hit && !matches!(aim, Aim::Start) {
                landed += 1;
                mid_write += usize::from(matches!(aim, Aim::Writing));
            }
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
    assert!(
        landed > 0,
        "no kill hit a running training after progress in {runs} runs"
    );
    eprintln!("{landed} kills landed in running trainings ({mid_write} mid-write) in {runs} runs");

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
    let (ok, err) = run(q(&qref, false));
    assert!(ok, "{err}");
    let qwant = std::fs::read(qref.join("model.safetensors")).unwrap();
    let qroot = tmp.path().join("q");
    std::fs::create_dir_all(&qroot).unwrap();
    let qout = qroot.join("out");
    let mut landed = 0;
    for attempt in 0..4 * MAX_RUNS {
        if attempt >= 4 && landed >= WANTED_KILLS {
            break;
        }
        // the temporary output folder appears in `qroot` while quantize writes
        let aim = if rng.below(4) == 0 {
            Aim::Start
        } else {
            Aim::Writing
        };
        let hit = kill_at(q(&qout, true), &qroot, aim, rng.below(2000));
        landed += usize::from(hit && matches!(aim, Aim::Writing));
        if qout.exists() {
            assert_eq!(names(&qout), names(&qref));
            assert_eq!(
                std::fs::read(qout.join("model.safetensors")).unwrap(),
                qwant
            );
        }
    }
    assert!(landed > 0, "no kill hit a quantize while it was writing");
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

/// The random tiny Qwen3 (crates/model/tests/fixtures/qwen3) with a 64-token
/// byte-level tokenizer and `template` as its chat template.
fn qwen3_with_template(dir: &Path, template: &str) -> PathBuf {
    let src = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../model/tests/fixtures/qwen3/gqa_tied"
    ));
    std::fs::create_dir_all(dir).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let vocab: serde_json::Map<String, serde_json::Value> = (0..64u8)
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
    let cfg = serde_json::json!({ "eos_token": "@", "chat_template": template });
    std::fs::write(dir.join("tokenizer_config.json"), cfg.to_string()).unwrap();
    dir.to_path_buf()
}

/// Chat templates that grow a value exponentially within their step budget
/// (doubling by `~`, `+`, `*`, `join`, `replace`, captured output, nested
/// lists) fail fast, in bounded memory, with an error naming the template's
/// file, in `train`, `generate` and `tokenize --chat`; an ordinary template
/// still works in all three.
#[test]
fn exploding_chat_templates_fail_fast_in_train_generate_and_tokenize() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("chat.jsonl");
    std::fs::write(
        &data,
        r#"{"messages":[{"role":"user","content":"HI"},{"role":"assistant","content":"HELLO!"}]}"#
            .to_string()
            + "\n",
    )
    .unwrap();
    let ordinary = "{% for m in messages %}<{{ m['role'] | upper }}>{{ m['content'] }}@{% endfor %}{% if add_generation_prompt %}<ASSISTANT>{% endif %}";
    // (`set` inside a loop is local to one iteration: a namespace carries
    // the value over, as the issue's `{% set s = s ~ s %}` loop intends)
    let hostile = [
        "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
        "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s|length }}",
        "{% set ns = namespace(s='xy') %}{% for i in range(60) %}{% set ns.s = ns.s * 2 %}{% endfor %}{{ ns.s|length }}",
        "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = [ns.s, ns.s]|join %}{% endfor %}{{ ns.s|length }}",
        "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s|replace('x', 'xx') %}{% endfor %}{{ ns.s|length }}",
        "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set s %}{{ ns.s }}{{ ns.s }}{% endset %}{% set ns.s = s %}{% endfor %}{{ ns.s|length }}",
        "{% set ns = namespace(l=[1]) %}{% for i in range(60) %}{% set ns.l = [ns.l, ns.l] %}{% endfor %}{{ ns.l }}",
        "{% set ns = namespace(l=[1]) %}{% for i in range(60) %}{% set ns.l = ns.l + ns.l %}{% endfor %}{{ ns.l|join }}",
        "{{ range(100000)|join('x' * 100000) }}",
        "{{ ('x' * 100000000) ~ ('x' * 100000000) }}",
    ];
    for (i, template) in std::iter::once(ordinary).chain(hostile).enumerate() {
        let model = qwen3_with_template(&tmp.path().join(format!("m{i}")), template);
        let cfg = model.join("tokenizer_config.json").display().to_string();
        let started = Instant::now();
        let m = model.display().to_string();
        let tokenize = run({
            let mut c = qlora();
            c.args(["tokenize", "--model", &m, "--text", "HI", "--chat"]);
            c
        });
        let generate = run({
            let mut c = qlora();
            c.args([
                "generate",
                "--model",
                &m,
                "--prompt",
                "HI",
                "--chat",
                "--max-new-tokens",
                "2",
                "--quant",
                "none",
            ]);
            c
        });
        let trained = run({
            let mut c = qlora();
            c.args(["train", "--model", &m, "--data"])
                .arg(&data)
                .arg("--out")
                .arg(tmp.path().join(format!("run{i}")))
                .args(["--quant", "none", "--max-steps", "1", "--rank", "2"]);
            c
        });
        for (cmd, (ok, err)) in [
            ("tokenize", tokenize),
            ("generate", generate),
            ("train", trained),
        ] {
            if i == 0 {
                assert!(ok, "{cmd} with an ordinary template: {err}");
                continue;
            }
            assert!(!ok, "{cmd} accepted template {i}: {template}");
            assert!(
                err.contains(&cfg) && !err.contains("panicked"),
                "{cmd}, template {i}: {err}"
            );
        }
        // three commands, each failing within seconds (not growing to GBs)
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "template {i} took {:?}",
            started.elapsed()
        );
    }
}

/// `qlora eval` of a model holding a NaN weight reports the non-finite loss
/// and fails instead of printing NaN with exit status 0.
#[test]
fn eval_refuses_a_non_finite_loss() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("model");
    std::fs::create_dir_all(&m).unwrap();
    let src = fx().join("tiny_llama/model");
    std::fs::copy(src.join("config.json"), m.join("config.json")).unwrap();
    let mut bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let at = 8
        + n
        + header["model.norm.weight"]["data_offsets"][0]
            .as_u64()
            .unwrap() as usize;
    bytes[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(m.join("model.safetensors"), bytes).unwrap();
    let data = tmp.path().join("rows.jsonl");
    write_rows(&data);
    let (ok, err) = run({
        let mut c = qlora();
        c.args(["eval", "--model"])
            .arg(&m)
            .arg("--data")
            .arg(&data)
            .args(["--quant", "none"]);
        c
    });
    assert!(!ok, "eval accepted a NaN loss: {err}");
    assert!(err.contains("not finite") && err.contains("NaN"), "{err}");
}
