//! Folder tokenizers, chat templates from tokenizer_config.json / chat_template.jinja,
//! and model-reference resolution against a fake hub cache (local files only).

use std::fs;
use std::path::Path;

use qlora_tokenizer::{ChatMessage, ModelRef, ModelSource, Tokenizer};

/// A tiny byte-level BPE tokenizer.json with two special tokens.
fn write_tokenizer_json(dir: &Path) {
    let mut vocab = serde_json::Map::new();
    // The 256 byte-level symbols (in byte order), then a few merges.
    vocab.insert("<s>".into(), 0.into());
    vocab.insert("<|im_end|>".into(), 1.into());
    for (i, c) in qlora_testutil::gpt2_byte_chars().iter().enumerate() {
        vocab.insert(c.to_string(), (i + 2).into());
    }
    vocab.insert("hi".into(), 258.into());
    vocab.insert("Ġhi".into(), 259.into());
    let tj = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [
            {"id": 0, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 1, "content": "<|im_end|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
        ],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": ["h i", "Ġ hi"]}
    });
    fs::write(dir.join("tokenizer.json"), tj.to_string()).unwrap();
}

const TEMPLATE: &str = "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}\n<{{ m['role'] }}>{{ m['content'].strip() }}{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}";

#[test]
fn folder_tokenizer_and_config_template() {
    let dir = tempfile::tempdir().unwrap();
    write_tokenizer_json(dir.path());
    fs::write(
        dir.path().join("tokenizer_config.json"),
        serde_json::json!({"bos_token": {"content": "<s>"}, "eos_token": "<|im_end|>", "chat_template": TEMPLATE}).to_string(),
    )
    .unwrap();
    fs::write(
        dir.path().join("generation_config.json"),
        r#"{"eos_token_id": [1, 7]}"#,
    )
    .unwrap();
    let t = Tokenizer::from_folder(dir.path()).unwrap();
    assert_eq!(t.encode("hi hi", false).unwrap(), vec![258, 259]);
    assert_eq!(t.stop_ids(), vec![1, 7]);
    let s = t
        .apply_chat_template(&[ChatMessage::user("  hi  ")], true)
        .unwrap();
    // trim_blocks removes the newline after the for tag; .strip() comes from pycompat.
    assert_eq!(s, "<s><user>hi<|im_end|>\n<assistant>");
    let e = t
        .apply_chat_template(&[ChatMessage::system("x")], false)
        .unwrap_err();
    assert!(e.to_string().contains("no system"), "{e}");

    // chat_template.jinja takes precedence.
    fs::write(
        dir.path().join("chat_template.jinja"),
        "J{{ messages|length }}",
    )
    .unwrap();
    let t = Tokenizer::from_folder(dir.path()).unwrap();
    assert_eq!(
        t.apply_chat_template(&[ChatMessage::user("a")], true)
            .unwrap(),
        "J1"
    );
}

#[test]
fn missing_tokenizer_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let e = Tokenizer::from_folder(dir.path()).unwrap_err();
    assert!(e.to_string().contains("tokenizer.json"), "{e}");
}

fn fake_hub(cache: &Path, id: &str, commit: &str, files: &[(&str, &str)]) -> std::path::PathBuf {
    let base = cache.join(format!("models--{}", id.replace('/', "--")));
    fs::create_dir_all(base.join("refs")).unwrap();
    fs::write(base.join("refs/main"), commit).unwrap();
    let snap = base.join("snapshots").join(commit);
    fs::create_dir_all(&snap).unwrap();
    for (name, body) in files {
        fs::write(snap.join(name), body).unwrap();
    }
    snap
}

#[test]
fn model_refs_resolve_offline() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let snap = fake_hub(&cache, "org/tiny", commit, &[("config.json", "{}")]);
    let r = ModelRef::resolve_in("org/tiny", false, &cache).unwrap();
    assert_eq!(r.source, ModelSource::Folder(snap.clone()));
    let r = ModelRef::resolve_in(&format!("org/tiny@{commit}"), false, &cache).unwrap();
    assert_eq!(r.path(), snap);

    // GGUF-only repo.
    let gsnap = fake_hub(&cache, "org/ggufs", commit, &[("m.Q4_0.gguf", "GGUF")]);
    let r = ModelRef::resolve_in("org/ggufs", false, &cache).unwrap();
    assert_eq!(r.source, ModelSource::Gguf(gsnap.join("m.Q4_0.gguf")));

    // Local folder and file.
    let r = ModelRef::resolve_in(snap.to_str().unwrap(), false, &cache).unwrap();
    assert!(!r.is_gguf());
    let f = gsnap.join("m.Q4_0.gguf");
    let r = ModelRef::resolve_in(f.to_str().unwrap(), false, &cache).unwrap();
    assert!(r.is_gguf());

    // Not cached, network off: a clear error naming the id and the cache.
    let e = ModelRef::resolve_in("org/absent", false, &cache).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("org/absent") && msg.contains("hub"), "{msg}");
    // Not a path, not an id.
    let e = ModelRef::resolve_in("nothing-here", false, &cache).unwrap_err();
    assert!(e.to_string().contains("no such file"), "{e}");
    // A folder with nothing usable.
    let empty = tmp.path().join("empty");
    fs::create_dir_all(&empty).unwrap();
    let e = ModelRef::resolve_in(empty.to_str().unwrap(), false, &cache).unwrap_err();
    assert!(e.to_string().contains("neither config.json"), "{e}");
}
