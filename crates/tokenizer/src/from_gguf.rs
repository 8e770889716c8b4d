//! Rebuild a `tokenizers::Tokenizer` from GGUF `tokenizer.ggml.*` metadata.
//!
//! llama.cpp stores the vocabulary (`tokens`), per-token types (`token_type`: 1 normal,
//! 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte), BPE `merges`, special ids and
//! a pre-tokenizer name (`pre`). For `model = "gpt2"` (byte-level BPE: SmolLM, Llama 3,
//! Qwen2, …) we write the tokenizer.json that transformers' own GGUF converter would
//! produce and let the `tokenizers` crate parse it, so encoding matches HF exactly.

use serde_json::{json, Map, Value};

use crate::{ChatTemplate, Result, Tokenizer, TokenizerError};
use qlora_gguf::GgufHeader;

const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// llama.cpp's LLAMA3 / QWEN2 pre-tokenizer regexes (the same as in the models' tokenizer.json).
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn byte_level(use_regex: bool) -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

fn split_regex(re: &str) -> Value {
    json!({"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false})
}

/// The pre-tokenizer for llama.cpp's `tokenizer.ggml.pre` names (see llama-vocab.cpp).
fn pre_tokenizer(origin: &str, pre: &str) -> Result<Value> {
    Ok(match pre {
        "default" | "gpt2" | "gpt-2" => byte_level(true),
        // SmolLM: every digit is its own pre-token, then the GPT-2 split.
        "smollm" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        "llama-bpe" | "llama3" | "llama-v3" | "smaug-bpe" => json!({"type": "Sequence",
            "pretokenizers": [split_regex(LLAMA3_REGEX), byte_level(false)]}),
        "qwen2" => json!({"type": "Sequence",
            "pretokenizers": [split_regex(QWEN2_REGEX), byte_level(false)]}),
        other => {
            return Err(TokenizerError::Unsupported {
                origin: origin.into(),
                msg: format!(
                "tokenizer.ggml.pre `{other}` (supported: default, gpt2, smollm, llama-bpe, qwen2)"
            ),
            })
        }
    })
}

pub(crate) fn build(h: &GgufHeader) -> Result<Tokenizer> {
    let path = h.path.as_path();
    let origin = path.display().to_string();
    let md = &h.metadata;
    let model = md.req_str(path, "tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(TokenizerError::Unsupported {
            origin,
            msg: format!(
                "tokenizer.ggml.model `{model}` (only byte-level BPE `gpt2` is rebuilt from GGUF; \
                 use the model's tokenizer.json instead)"
            ),
        });
    }
    let tokens = md
        .opt_str_array(path, "tokenizer.ggml.tokens")?
        .ok_or_else(|| missing(path, "tokenizer.ggml.tokens"))?;
    let merges = md
        .opt_str_array(path, "tokenizer.ggml.merges")?
        .ok_or_else(|| missing(path, "tokenizer.ggml.merges"))?;
    let types = md
        .opt_int_array(path, "tokenizer.ggml.token_type")?
        .unwrap_or_else(|| vec![1; tokens.len()]);
    if types.len() != tokens.len() {
        return Err(qlora_gguf::GgufError::Metadata {
            path: path.to_path_buf(),
            key: "tokenizer.ggml.token_type".into(),
            msg: format!("{} entries for {} tokens", types.len(), tokens.len()),
        }
        .into());
    }
    let pre = md.opt_str(path, "tokenizer.ggml.pre")?.unwrap_or("default");
    let pre_tok = pre_tokenizer(&origin, pre)?;

    let mut vocab = Map::with_capacity(tokens.len());
    let mut added = Vec::new();
    for (id, (tok, ty)) in tokens.iter().zip(&types).enumerate() {
        if vocab.insert(tok.to_string(), json!(id)).is_some() {
            return Err(qlora_gguf::GgufError::Metadata {
                path: path.to_path_buf(),
                key: "tokenizer.ggml.tokens".into(),
                msg: format!("duplicate token {tok:?} at id {id}"),
            }
            .into());
        }
        if *ty == TOKEN_TYPE_CONTROL || *ty == TOKEN_TYPE_USER_DEFINED {
            added.push(json!({
                "id": id, "content": tok, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": *ty != TOKEN_TYPE_CONTROL,
                "special": *ty == TOKEN_TYPE_CONTROL,
            }));
        }
    }
    for (i, m) in merges.iter().enumerate() {
        if m.split(' ').count() != 2 {
            return Err(qlora_gguf::GgufError::Metadata {
                path: path.to_path_buf(),
                key: "tokenizer.ggml.merges".into(),
                msg: format!("merge #{i} {m:?} is not two space-separated tokens"),
            }
            .into());
        }
    }
    let id = |k: &str| md.opt_usize(path, k);
    let name_of = |i: Option<usize>| i.and_then(|i| tokens.get(i)).map(|s| s.to_string());
    let bos_id = id("tokenizer.ggml.bos_token_id")?;
    let eos_id = id("tokenizer.ggml.eos_token_id")?;
    let eot_id = id("tokenizer.ggml.eot_token_id")?;
    let unk = name_of(id("tokenizer.ggml.unknown_token_id")?);
    let add_bos = md
        .opt_bool(path, "tokenizer.ggml.add_bos_token")?
        .unwrap_or(false);
    let bos_token = name_of(bos_id);
    let post = match (&bos_token, add_bos) {
        (Some(b), true) => json!({
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": b, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {b.as_str(): {"id": b, "ids": [bos_id], "tokens": [b]}}
        }),
        _ => Value::Null,
    };
    let _ = unk; // byte-level BPE covers every byte; an unk token is never produced.
    let tj = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tok,
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false, "vocab": vocab, "merges": merges,
        }
    });
    let text = tj.to_string();
    let inner: tokenizers::Tokenizer =
        text.parse()
            .map_err(|e: tokenizers::Error| TokenizerError::Tokenizer {
                origin: origin.clone(),
                msg: format!("rebuilding from GGUF metadata: {e}"),
            })?;
    let mut t = Tokenizer::new(inner, origin.clone());
    t.bos_token = bos_token;
    t.eos_token = name_of(eos_id);
    t.eos_ids = eos_id.into_iter().chain(eot_id).map(|x| x as u32).collect();
    t.eos_ids.dedup();
    if let Some(tpl) = md.opt_str(path, "tokenizer.chat_template")? {
        t.chat_template = Some(ChatTemplate::new(
            tpl.to_string(),
            format!("{origin} (tokenizer.chat_template)"),
        ));
    }
    Ok(t)
}

fn missing(path: &std::path::Path, key: &str) -> TokenizerError {
    qlora_gguf::GgufError::Metadata {
        path: path.to_path_buf(),
        key: key.into(),
        msg: "missing".into(),
    }
    .into()
}
