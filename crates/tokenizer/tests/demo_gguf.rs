//! The tokenizer rebuilt from the demo GGUF (SmolLM2-135M-Instruct, fetched by
//! scripts/fetch-demo.sh) against ids produced by transformers 5.24
//! (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`, `encode(s)`,
//! `apply_chat_template(..., add_generation_prompt=True)`).
//! Skipped with a SKIP line when the file is absent, unless QLORA_REQUIRE_DEMO=1.

use qlora_testutil::demo_gguf;
use qlora_tokenizer::{ChatMessage, StreamDecoder, Tokenizer};

const CASES: [(&str, &[u32]); 4] = [
    (
        "The capital of France is Paris.",
        &[504, 3575, 282, 4649, 314, 7042, 30],
    ),
    (
        "In 2024, 12345 apples cost $3.99!",
        &[
            788, 216, 34, 32, 34, 36, 28, 216, 33, 34, 35, 36, 37, 13855, 1708, 1885, 35, 30, 41,
            41, 17,
        ],
    ),
    (
        "héllo wörld 🤗 <|im_start|>user\nhi<|im_end|>",
        &[
            88, 2756, 31394, 267, 29989, 400, 15107, 114, 241, 216, 1, 4093, 198, 6004, 2,
        ],
    ),
    (
        "The capital of France is Paris. The capital of Germany is Berlin.",
        &[
            504, 3575, 282, 4649, 314, 7042, 30, 378, 3575, 282, 4521, 314, 11452, 30,
        ],
    ),
];

#[test]
fn gguf_tokenizer_matches_transformers() {
    let Some(p) = demo_gguf() else { return };
    let t = Tokenizer::from_gguf(&p).unwrap();
    assert_eq!(t.vocab_size(), 49152);
    for (text, ids) in CASES {
        let got = t.encode(text, true).unwrap();
        assert_eq!(got, ids, "{text:?}");
        assert_eq!(t.decode(&got, false).unwrap(), text, "round trip {text:?}");
    }
    // Digits one by one: "12345" is five tokens "1".."5".
    let ids = t.encode("12345", false).unwrap();
    let toks: Vec<String> = ids.iter().map(|&i| t.id_to_token(i).unwrap()).collect();
    assert_eq!(toks, ["1", "2", "3", "4", "5"]);
    assert_eq!(t.bos_token(), Some("<|im_start|>"));
    assert_eq!(t.eos_token(), Some("<|im_end|>"));
    let stops = t.stop_ids();
    assert!(stops.contains(&2) && stops.contains(&0), "{stops:?}");
}

#[test]
fn gguf_chat_template_matches_transformers() {
    let Some(p) = demo_gguf() else { return };
    let t = Tokenizer::from_gguf(&p).unwrap();
    let msgs = [ChatMessage::user("What is the capital of France?")];
    let text = t.apply_chat_template(&msgs, true).unwrap();
    assert_eq!(
        text,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    );
    let ids = t.encode(&text, false).unwrap();
    assert_eq!(
        ids,
        [
            1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411,
            407, 19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1,
            520, 9531, 198
        ]
    );
    // Without the generation prompt the assistant header is absent.
    let text = t.apply_chat_template(&msgs, false).unwrap();
    assert!(text.ends_with("France?<|im_end|>\n"), "{text:?}");
}

#[test]
fn streaming_never_splits_characters() {
    let Some(p) = demo_gguf() else { return };
    let t = Tokenizer::from_gguf(&p).unwrap();
    let text = "héllo wörld 🤗 — 東京 ok";
    let ids = t.encode(text, false).unwrap();
    let mut s = StreamDecoder::new();
    let mut out = String::new();
    let mut pieces = 0;
    for &id in &ids {
        if let Some(piece) = s.push(&t, id).unwrap() {
            assert!(!piece.contains('\u{FFFD}'), "{piece:?}");
            out.push_str(&piece);
            pieces += 1;
        }
    }
    if let Some(rest) = s.finish(&t).unwrap() {
        out.push_str(&rest);
    }
    assert_eq!(out, text);
    // The emoji spans several byte tokens, so fewer pieces than tokens were emitted.
    assert!(
        pieces < ids.len(),
        "{pieces} pieces for {} tokens",
        ids.len()
    );
}
