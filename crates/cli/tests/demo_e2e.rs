//! End-to-end checks on the demo model (SmolLM2-135M-Instruct, Q4_1 GGUF with a Q8_0
//! embedding, fetched by `scripts/fetch-demo.sh`). Without the file these tests print a
//! SKIP line and pass, unless QLORA_REQUIRE_DEMO=1 (CI), where they fail.
//!
//! Reference numbers: transformers 5.24 loading the same GGUF (dequantized to f32)
//! gives a mean next-token loss of 1.7131 nats on the sentence below (the issue's
//! "~1.32" does not reproduce); NF4 requantization adds about 0.2; a wrong RoPE
//! layout gives about 2.4.

mod common;
use common::{demo_gguf, qlora_cmd as qlora};

/// "The capital of France is Paris. The capital of Germany is Berlin." as the demo
/// tokenizer (and transformers) encodes it, without BOS.
const SENTENCE_IDS: [u32; 14] = [
    504, 3575, 282, 4649, 314, 7042, 30, 378, 3575, 282, 4521, 314, 11452, 30,
];

fn eval_loss(gguf: &std::path::Path, quant: &str) -> f64 {
    eval_loss_with(gguf, &["--quant", quant])
}

fn eval_loss_with(gguf: &std::path::Path, extra: &[&str]) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("s.jsonl");
    std::fs::write(
        &data,
        format!("{}\n", serde_json::json!({ "input_ids": SENTENCE_IDS })),
    )
    .unwrap();
    let out = qlora()
        .args(["eval", "--model"])
        .arg(gguf)
        .arg("--data")
        .arg(&data)
        .args(extra)
        .arg("--json")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qlora eval failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["tokens"], 13);
    v["loss"].as_f64().unwrap()
}

/// transformers 5.24 on the same GGUF (`from_pretrained(gguf_file=…, dtype=float32)`,
/// `labels=input_ids`) gives 1.7131374 for these 14 ids. (The issue quotes ~1.32 for "a
/// reference forward pass"; transformers itself does not reproduce that for this token
/// sequence, so the test pins transformers' number.) A wrong RoPE layout gives ~2.4.
const TRANSFORMERS_F32_LOSS: f64 = 1.7131374;

#[test]
fn demo_loss_f32_matches_transformers_and_nf4_is_close() {
    let Some(g) = demo_gguf() else { return };
    let f32_loss = eval_loss(&g, "none");
    assert!(
        (f32_loss - TRANSFORMERS_F32_LOSS).abs() < 1e-3,
        "f32 loss {f32_loss} vs transformers {TRANSFORMERS_F32_LOSS} (~2.4 means a wrong RoPE layout)"
    );
    // NF4 requantization of the Q4_1 weights costs about a quarter of a nat here (the
    // issue: +0.25); measured +0.20.
    let nf4_loss = eval_loss(&g, "nf4");
    assert!(
        nf4_loss > f32_loss + 0.05 && nf4_loss < f32_loss + 0.45,
        "nf4 loss {nf4_loss} vs f32 {f32_loss}"
    );
}

#[test]
fn demo_greedy_chat_answers_paris() {
    let Some(g) = demo_gguf() else { return };
    let out = qlora()
        .args(["generate", "--model"])
        .arg(&g)
        .args([
            "--prompt",
            "What is the capital of France?",
            "--chat",
            "--max-new-tokens",
            "20",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "qlora generate failed: {stderr}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("Paris"), "answer: {text:?}");
    assert!(!text.contains("<|im_end|>"), "{text:?}");
    assert!(
        stderr.contains("prefill:") && stderr.contains("tok/s"),
        "{stderr}"
    );
}

#[test]
fn generate_rejects_bad_input_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.gguf");
    std::fs::write(&bad, b"GGUF\x03\0\0\0").unwrap();
    let out = qlora()
        .args(["generate", "--model"])
        .arg(&bad)
        .args(["--prompt", "hi"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.gguf") && err.contains("truncated"),
        "{err}"
    );
    let out = qlora()
        .args([
            "generate",
            "--model",
            "no/such-model-here",
            "--prompt",
            "hi",
        ])
        .env("HF_HUB_CACHE", dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no/such-model-here"), "{err}");
}

/// `--quant native`, the default for a .gguf, runs the file's own Q4_1 / Q8_0 blocks: the
/// weights are bit-identical to `--quant none`'s, so the loss equals it up to f32
/// summation order (tiled products; allowed 1e-5 relative, measured < 1e-6) and
/// transformers' within the same 1e-3 as f32, without NF4's second rounding.
#[test]
fn demo_native_is_the_default_and_equals_f32() {
    let Some(g) = demo_gguf() else { return };
    let native = eval_loss(&g, "native");
    let f32_loss = eval_loss(&g, "none");
    assert!(
        (native - f32_loss).abs() <= 1e-5 * f32_loss,
        "native {native} vs none {f32_loss}"
    );
    assert!(
        (native - TRANSFORMERS_F32_LOSS).abs() < 1e-3,
        "native {native} vs transformers {TRANSFORMERS_F32_LOSS}"
    );
    assert_eq!(
        eval_loss_with(&g, &[]),
        native,
        "the .gguf default is native"
    );
    let nf4 = eval_loss(&g, "nf4");
    assert!(nf4 > native + 0.05, "nf4 {nf4} vs native {native}");
}

fn train_losses(dir: &std::path::Path) -> Vec<f64> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("eval_loss").is_none())
        .filter_map(|v| v["loss"].as_f64())
        .collect()
}

/// A short training run on the native (Q4_1) base: the loss falls, and stopping at step
/// 2 and resuming from its checkpoint gives the same trajectory as one run.
#[test]
fn demo_trains_and_resumes_on_a_native_base() {
    let Some(g) = demo_gguf() else { return };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("rows.jsonl");
    let mut rows = String::new();
    for k in 0..4 {
        let ids = &SENTENCE_IDS[k..];
        rows += &format!("{}\n", serde_json::json!({ "input_ids": ids }));
    }
    std::fs::write(&data, rows).unwrap();
    let run = |out: &std::path::Path, extra: &[&str]| -> String {
        let o = qlora()
            .args(["train", "--model"])
            .arg(&g)
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(out)
            .args(["--max-steps", "4", "--batch-size", "2", "--rank", "4"])
            .args(["--lr", "5e-3", "--seed", "1", "--lora-dropout", "0"])
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let full = dir.path().join("full");
    let stdout = run(&full, &[]);
    assert!(stdout.contains("base weights native"), "{stdout}");
    let a = train_losses(&full);
    assert_eq!(a.len(), 4);
    assert!(a[3] < a[1], "loss did not fall: {a:?}");
    let part = dir.path().join("part");
    run(&part, &["--stop-at-step", "2"]);
    let ck = part.join("checkpoint-2");
    run(&part, &["--resume", ck.to_str().unwrap()]);
    assert_eq!(train_losses(&part), a);
    // a checkpoint of a native run is not resumed with another base
    let o = qlora()
        .args(["train", "--model"])
        .arg(&g)
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(dir.path().join("other"))
        .args(["--max-steps", "4", "--batch-size", "2", "--rank", "4"])
        .args(["--lr", "5e-3", "--seed", "1", "--lora-dropout", "0"])
        .args(["--quant", "nf4", "--resume", ck.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("native") && err.contains("nf4"), "{err}");
}
