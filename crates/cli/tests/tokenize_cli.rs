//! `qlora tokenize` on the SentencePiece GGUF fixture of qlora-tokenizer, whose expected ids
//! come from transformers 5.24's LlamaTokenizerFast (crates/tokenizer/tests/fixtures/spm/gen.py).

mod common;

use std::path::PathBuf;

use common::qlora_run;
use serde_json::Value;

fn spm_dir() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tokenizer/tests/fixtures/spm"
    ))
}

fn expected() -> Value {
    let s = std::fs::read_to_string(spm_dir().join("expected.json")).unwrap();
    serde_json::from_str(&s).unwrap()
}

fn json_ids(stdout: &str) -> Value {
    let v: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v.as_object().unwrap().len(), 1, "{stdout}");
    v["ids"].clone()
}

#[test]
fn tokenize_text_file_and_chat_match_transformers() {
    let gguf = spm_dir().join("spm.gguf");
    let g = gguf.to_str().unwrap();
    let exp = &expected()["spm.gguf"];
    let dir = tempfile::tempdir().unwrap();
    for c in exp["cases"].as_array().unwrap() {
        let text = c["text"].as_str().unwrap();
        if text.is_empty() {
            continue;
        }
        let (ok, out, err) = qlora_run(&["tokenize", "--model", g, "--text", text, "--json"]);
        assert!(ok, "{err}");
        assert_eq!(json_ids(&out), c["ids"], "{text:?}");
        // --file: the text as it is (newlines included); plain output is space-separated ids.
        let f = dir.path().join("t.txt");
        std::fs::write(&f, text).unwrap();
        let (ok, out, err) = qlora_run(&["tokenize", "--model", g, "--file", f.to_str().unwrap()]);
        assert!(ok, "{err}");
        let want: Vec<String> = c["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.to_string())
            .collect();
        assert_eq!(out.trim_end(), want.join(" "), "{text:?}");
    }
    for c in exp["chats"].as_array().unwrap() {
        let msgs = c["messages"].to_string();
        let (ok, out, err) = qlora_run(&[
            "tokenize", "--model", g, "--text", &msgs, "--chat", "--json",
        ]);
        assert!(ok, "{err}");
        assert_eq!(json_ids(&out), c["ids"], "{msgs}");
    }
    // A plain string under --chat is one user message.
    let one = serde_json::json!([{"role": "user", "content": "What is 2+2?"}]).to_string();
    let (_, a, _) = qlora_run(&["tokenize", "--model", g, "--text", &one, "--chat", "--json"]);
    let (ok, b, err) = qlora_run(&[
        "tokenize",
        "--model",
        g,
        "--text",
        "What is 2+2?",
        "--chat",
        "--json",
    ]);
    assert!(ok, "{err}");
    assert_eq!(a, b);
}

#[test]
fn tokenize_reports_bad_input() {
    let gguf = spm_dir().join("spm.gguf");
    let g = gguf.to_str().unwrap();
    let (ok, _, err) = qlora_run(&["tokenize", "--model", g]);
    assert!(!ok && err.contains("--text"), "{err}");
    let (ok, _, err) = qlora_run(&["tokenize", "--model", g, "--file", "/nonexistent/x.txt"]);
    assert!(!ok && err.contains("/nonexistent/x.txt"), "{err}");
    let (ok, _, err) = qlora_run(&["tokenize", "--model", "/nonexistent/model", "--text", "x"]);
    assert!(!ok && err.contains("/nonexistent/model"), "{err}");
}
