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
        .args(["--quant", quant, "--json"])
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
