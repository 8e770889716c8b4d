//! SentencePiece (`tokenizer.ggml.model = "llama"`) tokenizers rebuilt from GGUF metadata,
//! against transformers 5.24's `LlamaTokenizerFast` built from the same SentencePiece model.
//! Fixtures: tests/fixtures/spm (a small BPE SentencePiece model with byte fallback, a
//! user-defined piece and a Llama-2 chat template, written as GGUF metadata the way
//! llama.cpp's converter does; generator `gen.py` beside them).

use std::path::PathBuf;

use qlora_tokenizer::{ChatMessage, StreamDecoder, Tokenizer};
use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/spm")
}

fn expected() -> Value {
    let s = std::fs::read_to_string(fixtures().join("expected.json")).unwrap();
    serde_json::from_str(&s).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn check(file: &str) {
    let exp = &expected()[file];
    let t = Tokenizer::from_gguf(fixtures().join(file)).unwrap();
    assert_eq!(t.vocab_size() as u64, exp["vocab_size"].as_u64().unwrap());
    assert_eq!(t.bos_token(), Some("<s>"));
    assert_eq!(t.eos_token(), Some("</s>"));
    assert!(t.stop_ids().contains(&2));
    let cases = exp["cases"].as_array().unwrap();
    assert!(cases.len() >= 20);
    let mut bad = Vec::new();
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let want = ids(&c["ids"]);
        let got = t.encode(text, true).unwrap();
        if got != want {
            bad.push(format!("{text:?}: got {got:?}, transformers {want:?}"));
            continue;
        }
        assert_eq!(
            t.decode(&got, false).unwrap(),
            c["decoded"].as_str().unwrap(),
            "decode {text:?}"
        );
        assert_eq!(
            t.decode(&got, true).unwrap(),
            c["decoded_skip"].as_str().unwrap(),
            "decode (skip special) {text:?}"
        );
    }
    assert!(bad.is_empty(), "{file}:\n{}", bad.join("\n"));
    for c in exp["chats"].as_array().unwrap() {
        let msgs: Vec<ChatMessage> = c["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| ChatMessage::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
            .collect();
        let text = t.apply_chat_template(&msgs, false).unwrap();
        assert_eq!(text, c["text"].as_str().unwrap());
        assert_eq!(t.encode(&text, false).unwrap(), ids(&c["ids"]), "{text:?}");
    }
}

#[test]
fn spm_gguf_matches_llama_tokenizer_fast() {
    check("spm.gguf");
}

#[test]
fn spm_gguf_without_space_prefix_and_with_eos_matches() {
    check("spm_noprefix.gguf");
}

#[test]
fn spm_gguf_byte_fallback_and_streaming() {
    let t = Tokenizer::from_gguf(fixtures().join("spm.gguf")).unwrap();
    // A character outside the vocabulary falls back to its UTF-8 bytes as <0xXX> tokens.
    let ids = t.encode("🦀", false).unwrap();
    let toks: Vec<String> = ids.iter().map(|&i| t.id_to_token(i).unwrap()).collect();
    assert_eq!(toks, ["▁", "<0xF0>", "<0x9F>", "<0xA6>", "<0x80>"]);
    let text = "héllo 🦀 wörld\n  日本 ok";
    let ids = t.encode(text, false).unwrap();
    let mut s = StreamDecoder::new();
    let mut out = String::new();
    for &id in &ids {
        if let Some(p) = s.push(&t, id).unwrap() {
            assert!(!p.contains('\u{FFFD}'), "{p:?}");
            out.push_str(&p);
        }
    }
    if let Some(rest) = s.finish(&t).unwrap() {
        out.push_str(&rest);
    }
    assert_eq!(out, text);
}
