//! Rebuild a `tokenizers::Tokenizer` from GGUF `tokenizer.ggml.*` metadata.
//!
//! llama.cpp stores the vocabulary (`tokens`), per-token types (`token_type`: 1 normal,
//! 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte), BPE `merges`, special ids and
//! a pre-tokenizer name (`pre`). For `model = "gpt2"` (byte-level BPE: SmolLM, Llama 3,
//! Qwen2, …) we write the tokenizer.json that transformers' own GGUF converter would
//! produce and let the `tokenizers` crate parse it, so encoding matches HF exactly.
//!
//! For `model = "llama"` (SentencePiece BPE: Llama 2, Mistral v0.1-v0.3, TinyLlama,
//! CodeLlama) we write what transformers' `LlamaTokenizerFast` is built as (see
//! [`spm_tokenizer_json`]): a BPE with byte fallback whose merges are recovered from the
//! per-token `scores` (transformers' `generate_merges`: every split of a token into two
//! vocabulary pieces, best score first; that is llama.cpp's "merge the adjacent pair whose
//! result scores highest" as a merge list), the "▁" space handling as a `Metaspace`
//! pre-tokenizer (prefix "▁" on the first section only when `add_space_prefix`, the
//! non-legacy behaviour), BOS/EOS from `add_bos_token` (default true for SentencePiece, as
//! llama.cpp and transformers assume) and `add_eos_token`.

use serde_json::{json, Map, Value};

use crate::{ChatTemplate, Result, Tokenizer, TokenizerError};
use qlora_gguf::llama::{LLAMA3_PRE_REGEX, QWEN2_PRE_REGEX};
use qlora_gguf::GgufHeader;

const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

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
            "pretokenizers": [split_regex(LLAMA3_PRE_REGEX), byte_level(false)]}),
        "qwen2" => json!({"type": "Sequence",
            "pretokenizers": [split_regex(QWEN2_PRE_REGEX), byte_level(false)]}),
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
    if model != "gpt2" && model != "llama" {
        return Err(TokenizerError::Unsupported {
            origin,
            msg: format!(
                "tokenizer.ggml.model `{model}` (rebuilt from GGUF: byte-level BPE `gpt2` and \
                 SentencePiece `llama`; use the model's tokenizer.json instead)"
            ),
        });
    }
    let spm = model == "llama";
    let tokens = md
        .opt_str_array(path, "tokenizer.ggml.tokens")?
        .ok_or_else(|| missing(path, "tokenizer.ggml.tokens"))?;
    let file_merges = md.opt_str_array(path, "tokenizer.ggml.merges")?;
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
    let meta_err = |key: &str, msg: String| -> TokenizerError {
        qlora_gguf::GgufError::Metadata {
            path: path.to_path_buf(),
            key: key.into(),
            msg,
        }
        .into()
    };
    let id = |k: &str| -> Result<Option<usize>> {
        match md.opt_usize(path, k)? {
            Some(i) if i >= tokens.len() => Err(meta_err(
                k,
                format!(
                    "id {i} is outside the vocabulary of {} tokens",
                    tokens.len()
                ),
            )),
            x => Ok(x),
        }
    };
    let name_of = |i: Option<usize>| i.map(|i| tokens[i].to_string());
    let bos_id = id("tokenizer.ggml.bos_token_id")?;
    let eos_id = id("tokenizer.ggml.eos_token_id")?;
    let eot_id = id("tokenizer.ggml.eot_token_id")?;
    let unk_id = id("tokenizer.ggml.unknown_token_id")?;
    let pad_id = id("tokenizer.ggml.padding_token_id")?;
    // llama.cpp (and transformers' GGUF loader) add BOS to a SentencePiece vocabulary
    // that does not say otherwise; byte-level BPE files say it when they want it.
    let add_bos = md
        .opt_bool(path, "tokenizer.ggml.add_bos_token")?
        .unwrap_or(spm);
    let add_eos = md
        .opt_bool(path, "tokenizer.ggml.add_eos_token")?
        .unwrap_or(false);
    let bos_token = name_of(bos_id);
    let eos_token = name_of(eos_id);

    let mut vocab = Map::with_capacity(tokens.len());
    let mut index = std::collections::HashMap::with_capacity(tokens.len());
    let mut added = Vec::new();
    for (id, (tok, ty)) in tokens.iter().zip(&types).enumerate() {
        if index.insert(*tok, id).is_some() {
            return Err(meta_err(
                "tokenizer.ggml.tokens",
                format!("duplicate token {tok:?} at id {id}"),
            ));
        }
        vocab.insert(tok.to_string(), json!(id));
        // SentencePiece: the unknown / bos / eos / pad tokens are special tokens too (as
        // transformers registers them), and every added token matches on the raw text.
        let special = *ty == TOKEN_TYPE_CONTROL
            || (spm && [unk_id, bos_id, eos_id, pad_id].contains(&Some(id)));
        if special || *ty == TOKEN_TYPE_USER_DEFINED {
            added.push(json!({
                "id": id, "content": tok, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": !spm && !special,
                "special": special,
            }));
        }
    }
    let merges: Vec<Value> = match file_merges {
        Some(merges) => merges
            .iter()
            .enumerate()
            .map(|(i, m)| match m.split(' ').collect::<Vec<_>>()[..] {
                [a, b] => Ok(json!([a, b])),
                _ => Err(meta_err(
                    "tokenizer.ggml.merges",
                    format!("merge #{i} {m:?} is not two space-separated tokens"),
                )),
            })
            .collect::<Result<_>>()?,
        None if spm => {
            let scores = md
                .opt_f32_array(path, "tokenizer.ggml.scores")?
                .ok_or_else(|| missing(path, "tokenizer.ggml.scores"))?;
            if scores.len() != tokens.len() {
                return Err(meta_err(
                    "tokenizer.ggml.scores",
                    format!("{} entries for {} tokens", scores.len(), tokens.len()),
                ));
            }
            merges_from_scores(&tokens, &scores, &index)
                .into_iter()
                .map(|(a, b)| json!([a, b]))
                .collect()
        }
        None => return Err(missing(path, "tokenizer.ggml.merges")),
    };
    let mut single = Vec::new();
    let mut pair = Vec::new();
    let mut specials = Map::new();
    for (ty, seq) in [(0, "A"), (1, "B")] {
        let mut part = Vec::new();
        for (on, tok, tid) in [(add_bos, &bos_token, bos_id)] {
            if let (true, Some(t), Some(i)) = (on, tok, tid) {
                part.push(json!({"SpecialToken": {"id": t, "type_id": ty}}));
                specials.insert(t.clone(), json!({"id": t, "ids": [i], "tokens": [t]}));
            }
        }
        part.push(json!({"Sequence": {"id": seq, "type_id": ty}}));
        if let (true, Some(t), Some(i)) = (add_eos && spm, &eos_token, eos_id) {
            part.push(json!({"SpecialToken": {"id": t, "type_id": ty}}));
            specials.insert(t.clone(), json!({"id": t, "ids": [i], "tokens": [t]}));
        }
        if ty == 0 {
            single = part.clone();
        }
        pair.extend(part);
    }
    let post = if specials.is_empty() {
        Value::Null
    } else {
        json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials})
    };
    let (pre_tok, decoder, model_extra) = if spm {
        // `add_space_prefix` (SentencePiece's add_dummy_prefix), true unless the file says not.
        let prefix = md
            .opt_bool(path, "tokenizer.ggml.add_space_prefix")?
            .unwrap_or(true);
        let mut dec = vec![
            json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
            json!({"type": "ByteFallback"}),
            json!({"type": "Fuse"}),
        ];
        if prefix {
            dec.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
        }
        (
            json!({"type": "Metaspace", "replacement": "\u{2581}",
                   "prepend_scheme": if prefix { "first" } else { "never" }, "split": false}),
            json!({"type": "Sequence", "decoders": dec}),
            (true, true),
        )
    } else {
        let pre = md.opt_str(path, "tokenizer.ggml.pre")?.unwrap_or("default");
        (
            pre_tokenizer(&origin, pre)?,
            json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true}),
            (false, false),
        )
    };
    let (fuse_unk, byte_fallback) = model_extra;
    // Byte-level BPE covers every byte and SentencePiece falls back to `<0xXX>` tokens, so
    // (as in transformers' conversion) the BPE model has no unk token of its own.
    let tj = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tok,
        "post_processor": post,
        "decoder": decoder,
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": fuse_unk, "byte_fallback": byte_fallback,
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
    t.eos_token = eos_token;
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

/// The merges a SentencePiece BPE vocabulary implies, as transformers' `generate_merges`
/// recovers them: for every token (in id order) each split into two vocabulary pieces,
/// ordered by the pieces' ids; then all of them by (score of the merged token, length of
/// the left piece, length of the right piece in characters), highest first, ties keeping
/// that order.
fn merges_from_scores<'a>(
    tokens: &[&'a str],
    scores: &[f32],
    index: &std::collections::HashMap<&str, usize>,
) -> Vec<(&'a str, &'a str)> {
    struct M<'a> {
        l: &'a str,
        r: &'a str,
        score: f32,
        len_l: usize,
        len_r: usize,
    }
    let mut all: Vec<M<'a>> = Vec::new();
    for (tok, &score) in tokens.iter().zip(scores) {
        let start = all.len();
        for (at, _) in tok.char_indices().skip(1) {
            let (l, r) = tok.split_at(at);
            if index.contains_key(l) && index.contains_key(r) {
                all.push(M {
                    l,
                    r,
                    score,
                    len_l: l.chars().count(),
                    len_r: r.chars().count(),
                });
            }
        }
        all[start..].sort_by_key(|m| (index[m.l], index[m.r]));
    }
    // stable: equal keys keep their order (as Python's sorted(..., reverse=True) does)
    all.sort_by(|a, b| {
        b.score
            .total_cmp(&a.score)
            .then(b.len_l.cmp(&a.len_l))
            .then(b.len_r.cmp(&a.len_r))
    });
    all.into_iter().map(|m| (m.l, m.r)).collect()
}
