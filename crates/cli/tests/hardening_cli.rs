//! Hardening of `qlora train` / `eval` on the tiny fixtures: bad settings are
//! refused before training, non-finite updates stop the run without writing
//! a bad checkpoint, resume guards, row checks at load time, `--force`, broken
//! tokenizers, exploding chat templates. The kill -9 crash test is in crash_cli.rs.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

mod common;
use common::{
    dir_names as names, fixtures as fx, qlora_cmd as qlora, run_combined as run,
    tiny_train as train, write_tiny_rows as write_rows,
};

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
    let src = common::qwen3_fixture("gqa_tied");
    std::fs::create_dir_all(dir).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    common::write_byte_tokenizer(dir);
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
