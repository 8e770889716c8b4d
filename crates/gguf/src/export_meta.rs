//! GGUF metadata for a llama-architecture export: hyper-parameters from the
//! [`ModelConfig`], and the tokenizer (copied from a GGUF source, or converted from an
//! HF folder's `tokenizer.json` the way llama.cpp's `convert_hf_to_gguf.py` does for
//! byte-level BPE vocabularies).

use std::collections::HashMap;
use std::path::Path;

use crate::llama::{LLAMA3_PRE_REGEX, QWEN2_PRE_REGEX};
use crate::metadata::value_type;
use crate::{GgufHeader, MetaValue};
use anyhow::{bail, Context, Result};
use qlora_config::{Architecture, ModelConfig, RopeScaling};
use serde_json::Value;

/// llama.cpp's `llama_token_type` values.
const TOKEN_NORMAL: i32 = 1;
const TOKEN_CONTROL: i32 = 3;
const TOKEN_USER_DEFINED: i32 = 4;
const TOKEN_UNUSED: i32 = 5;

type Meta = Vec<(String, MetaValue)>;

fn u32v(x: usize) -> MetaValue {
    MetaValue::U32(x as u32)
}

/// `general.architecture` of an export: llama.cpp's `qwen2` / `qwen3` for those families
/// (HF q/k row order, q/k/v biases, q/k norms), `llama` for Llama and Mistral.
pub fn gguf_arch(c: &ModelConfig) -> &'static str {
    match c.architecture {
        Architecture::Qwen2 | Architecture::Qwen3 => c.architecture.as_str(),
        Architecture::Llama | Architecture::Mistral => "llama",
    }
}

/// `{arch}.*` hyper-parameters. Llama-3.1 scaling is not a key: llama.cpp reads it from a
/// `rope_freqs` tensor, see [`rope_freqs`].
pub fn hyper_params(c: &ModelConfig) -> Meta {
    let a = gguf_arch(c);
    let k = |s: &str| format!("{a}.{s}");
    let mut m: Meta = vec![
        (k("block_count"), u32v(c.num_hidden_layers)),
        (k("context_length"), u32v(c.max_position_embeddings)),
        (k("embedding_length"), u32v(c.hidden_size)),
        (k("feed_forward_length"), u32v(c.intermediate_size)),
        (k("attention.head_count"), u32v(c.num_attention_heads)),
        (k("attention.head_count_kv"), u32v(c.num_key_value_heads)),
        (k("rope.freq_base"), MetaValue::F32(c.rope_theta as f32)),
        (
            k("attention.layer_norm_rms_epsilon"),
            MetaValue::F32(c.rms_norm_eps as f32),
        ),
    ];
    if c.head_dim * c.num_attention_heads != c.hidden_size {
        // llama.cpp derives head_dim = embedding_length / head_count unless told.
        m.push((k("attention.key_length"), u32v(c.head_dim)));
        m.push((k("attention.value_length"), u32v(c.head_dim)));
    }
    m.push((k("vocab_size"), u32v(c.vocab_size)));
    m.push((k("rope.dimension_count"), u32v(c.head_dim)));
    if let RopeScaling::Linear { factor } = c.rope_scaling {
        m.push((k("rope.scaling.type"), MetaValue::String("linear".into())));
        m.push((k("rope.scaling.factor"), MetaValue::F32(factor as f32)));
    }
    m
}

/// Llama-3.1 RoPE scaling as llama.cpp stores it: per-frequency divisors
/// `inv_freq_plain / inv_freq_scaled` (`head_dim / 2` values), `None` otherwise.
pub fn rope_freqs(c: &ModelConfig) -> Option<Vec<f32>> {
    match c.rope_scaling {
        RopeScaling::Llama3 { .. } => {
            let plain = RopeScaling::Default.inv_freq(c.rope_theta, c.head_dim);
            let scaled = c.rope_scaling.inv_freq(c.rope_theta, c.head_dim);
            Some(plain.iter().zip(&scaled).map(|(p, s)| p / s).collect())
        }
        _ => None,
    }
}

/// Every `tokenizer.*` key of a GGUF source, verbatim, and its `general.*` descriptive
/// keys (name, license, …) except those this export rewrites.
pub fn copied_from_gguf(h: &GgufHeader, vocab_size: usize) -> Result<(Meta, Meta)> {
    let path = h.path.as_path();
    let mut general = Meta::new();
    let mut tok = Meta::new();
    for (k, v) in h.metadata.entries() {
        if k.starts_with("tokenizer.") {
            tok.push((k.clone(), v.clone()));
        } else if k.starts_with("general.")
            && !matches!(
                k.as_str(),
                "general.architecture"
                    | "general.file_type"
                    | "general.quantization_version"
                    | "general.alignment"
            )
        {
            general.push((k.clone(), v.clone()));
        }
    }
    let n = h
        .metadata
        .opt_str_array(path, "tokenizer.ggml.tokens")?
        .map(|t| t.len());
    match n {
        None => bail!(
            "{}: no tokenizer.ggml.tokens: the source GGUF has no tokenizer to copy",
            path.display()
        ),
        Some(n) if n != vocab_size => bail!(
            "{}: tokenizer.ggml.tokens has {n} entries but the model's vocabulary is {vocab_size}",
            path.display()
        ),
        Some(_) => {}
    }
    Ok((general, tok))
}

fn read_json(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))
}

/// `"<s>"` or `{"content": "<s>", …}` (tokenizer_config.json spells special tokens both ways).
fn token_text(v: &Value) -> Option<&str> {
    match v {
        Value::String(s) => Some(s),
        Value::Object(o) => o.get("content").and_then(Value::as_str),
        _ => None,
    }
}

/// llama.cpp's `tokenizer.ggml.pre` name for a tokenizer.json pre-tokenizer.
fn pre_name(pre: &Value) -> Option<&'static str> {
    let ty = pre.get("type").and_then(Value::as_str)?;
    let is_byte_level = |v: &Value, regex: bool| {
        v.get("type").and_then(Value::as_str) == Some("ByteLevel")
            && v.get("use_regex").and_then(Value::as_bool).unwrap_or(true) == regex
    };
    let split_regex = |v: &Value| -> Option<String> {
        (v.get("type").and_then(Value::as_str) == Some("Split"))
            .then(|| v.pointer("/pattern/Regex").and_then(Value::as_str))
            .flatten()
            .map(str::to_string)
    };
    match ty {
        // llama.cpp's name is "gpt-2" (llama-vocab.cpp); it refuses "gpt2" ("unknown
        // pre-tokenizer type").
        "ByteLevel" if is_byte_level(pre, true) => Some("gpt-2"),
        "Sequence" => {
            let parts = pre.get("pretokenizers")?.as_array()?;
            match parts.as_slice() {
                [d, b]
                    if d.get("type").and_then(Value::as_str) == Some("Digits")
                        && d.get("individual_digits").and_then(Value::as_bool) == Some(true)
                        && is_byte_level(b, true) =>
                {
                    Some("smollm")
                }
                [s, b] if is_byte_level(b, false) => match split_regex(s).as_deref() {
                    Some(LLAMA3_PRE_REGEX) => Some("llama-bpe"),
                    Some(QWEN2_PRE_REGEX) => Some("qwen2"),
                    _ => None,
                },
                _ => None,
            }
        }
        _ => None,
    }
}

/// The `tokenizer.*` keys for an HF folder's byte-level BPE `tokenizer.json`
/// (`tokenizer.ggml.model = "gpt2"`), padded to `vocab_size` with `[PAD{id}]` tokens
/// of type unused, as llama.cpp's converter does. SentencePiece-style vocabularies
/// (Llama 2, TinyLlama, Mistral v0.1) are refused: llama.cpp needs scores for them,
/// which tokenizer.json does not carry in a form we convert.
pub fn tokenizer_from_folder(dir: &Path, c: &ModelConfig) -> Result<Meta> {
    let tj_path = dir.join("tokenizer.json");
    if !tj_path.is_file() {
        bail!(
            "{}: no tokenizer.json: llama.cpp needs the tokenizer inside the GGUF (export from a folder that has one, or from a .gguf)",
            dir.display()
        );
    }
    let tj = read_json(&tj_path)?;
    let origin = tj_path.display().to_string();
    let model = tj.get("model").context(format!("{origin}: no `model`"))?;
    let mtype = model.get("type").and_then(Value::as_str).unwrap_or("?");
    let byte_fallback = model
        .get("byte_fallback")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let decoder_byte_level =
        tj.pointer("/decoder/type").and_then(Value::as_str) == Some("ByteLevel");
    if mtype != "BPE" || byte_fallback || !decoder_byte_level {
        bail!(
            "{origin}: tokenizer model `{mtype}`{} is not byte-level BPE; only byte-level BPE \
             (GPT-2 style: SmolLM, Llama 3, Qwen2) is converted (SentencePiece tokenizers are not supported; \
             convert from a GGUF of the base model instead)",
            if byte_fallback { " with byte_fallback" } else { "" }
        );
    }
    let pre = tj
        .get("pre_tokenizer")
        .and_then(pre_name)
        .with_context(|| {
            format!(
                "{origin}: unrecognized pre_tokenizer (supported: GPT-2 ByteLevel, SmolLM digits + ByteLevel, \
                 the Llama 3 and Qwen2 split regexes)"
            )
        })?;

    let vocab = model
        .get("vocab")
        .and_then(Value::as_object)
        .with_context(|| format!("{origin}: model.vocab is not an object"))?;
    let mut by_id: HashMap<usize, (String, i32)> = HashMap::new();
    for (tok, id) in vocab {
        let id = id
            .as_u64()
            .with_context(|| format!("{origin}: vocab id of {tok:?} is not an integer"))?
            as usize;
        by_id.insert(id, (tok.clone(), TOKEN_NORMAL));
    }
    let mut added_ids = HashMap::new();
    for a in tj
        .get("added_tokens")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let (Some(id), Some(content)) = (
            a.get("id").and_then(Value::as_u64),
            a.get("content").and_then(Value::as_str),
        ) else {
            bail!("{origin}: added_tokens entry without id/content: {a}");
        };
        let special = a.get("special").and_then(Value::as_bool).unwrap_or(false);
        let ty = if special {
            TOKEN_CONTROL
        } else {
            TOKEN_USER_DEFINED
        };
        by_id.insert(id as usize, (content.to_string(), ty));
        added_ids.insert(content.to_string(), id as usize);
    }
    let max_id = by_id.keys().max().copied().unwrap_or(0);
    if max_id >= c.vocab_size {
        bail!(
            "{origin}: token id {max_id} does not fit the model's vocab_size {} (tokenizer of another model?)",
            c.vocab_size
        );
    }
    let mut tokens = Vec::with_capacity(c.vocab_size);
    let mut types = Vec::with_capacity(c.vocab_size);
    let mut index: HashMap<String, usize> = HashMap::new();
    for id in 0..c.vocab_size {
        let (t, ty) = by_id
            .remove(&id)
            .unwrap_or_else(|| (format!("[PAD{id}]"), TOKEN_UNUSED));
        index.insert(t.clone(), id);
        tokens.push(MetaValue::String(t));
        types.push(MetaValue::I32(ty));
    }
    let merges: Vec<MetaValue> = model
        .get("merges")
        .and_then(Value::as_array)
        .with_context(|| format!("{origin}: model.merges is not an array"))?
        .iter()
        .enumerate()
        .map(|(i, m)| match m {
            Value::String(s) if s.split(' ').count() == 2 => Ok(MetaValue::String(s.clone())),
            Value::Array(p) if p.len() == 2 && p.iter().all(Value::is_string) => {
                Ok(MetaValue::String(format!(
                    "{} {}",
                    p[0].as_str().unwrap_or_default(),
                    p[1].as_str().unwrap_or_default()
                )))
            }
            other => bail!("{origin}: merge #{i} is not a pair: {other}"),
        })
        .collect::<Result<_>>()?;

    let tc_path = dir.join("tokenizer_config.json");
    let tc = if tc_path.is_file() {
        read_json(&tc_path)?
    } else {
        Value::Null
    };
    let id_of = |key: &str| -> Option<u32> {
        let t = token_text(tc.get(key)?)?;
        index.get(t).map(|&i| i as u32)
    };
    let mut m: Meta = vec![
        (
            "tokenizer.ggml.model".into(),
            MetaValue::String("gpt2".into()),
        ),
        ("tokenizer.ggml.pre".into(), MetaValue::String(pre.into())),
        (
            "tokenizer.ggml.tokens".into(),
            MetaValue::array(value_type::STRING, tokens),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            MetaValue::array(value_type::I32, types),
        ),
        (
            "tokenizer.ggml.merges".into(),
            MetaValue::array(value_type::STRING, merges),
        ),
    ];
    let bos = id_of("bos_token").or(c.bos_token_id);
    let eos = id_of("eos_token").or(c.eos_token_ids.first().copied());
    for (key, id) in [
        ("tokenizer.ggml.bos_token_id", bos),
        ("tokenizer.ggml.eos_token_id", eos),
        ("tokenizer.ggml.unknown_token_id", id_of("unk_token")),
        ("tokenizer.ggml.padding_token_id", id_of("pad_token")),
    ] {
        if let Some(id) = id {
            m.push((key.into(), MetaValue::U32(id)));
        }
    }
    // add_bos: tokenizer_config's flag, else whether the post-processor prepends a token.
    let add_bos = tc
        .get("add_bos_token")
        .and_then(Value::as_bool)
        .unwrap_or_else(|| {
            tj.pointer("/post_processor/single/0/SpecialToken")
                .is_some()
                || tj
                    .pointer("/post_processor/processors")
                    .and_then(Value::as_array)
                    .is_some_and(|ps| {
                        ps.iter()
                            .any(|p| p.pointer("/single/0/SpecialToken").is_some())
                    })
        });
    m.push((
        "tokenizer.ggml.add_bos_token".into(),
        MetaValue::Bool(add_bos),
    ));
    m.push((
        "tokenizer.ggml.add_space_prefix".into(),
        MetaValue::Bool(false),
    ));
    // chat_template.jinja (transformers >= 4.43) takes precedence, as transformers reads it.
    let jinja = dir.join("chat_template.jinja");
    let template = if jinja.is_file() {
        Some(
            std::fs::read_to_string(&jinja)
                .with_context(|| format!("reading {}", jinja.display()))?,
        )
    } else {
        match tc.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template").and_then(Value::as_str))
                .map(str::to_string),
            _ => None,
        }
    };
    if let Some(t) = template {
        m.push(("tokenizer.chat_template".into(), MetaValue::String(t)));
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn pre_tokenizer_names_follow_llama_cpp() {
        let bl = |r: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "use_regex": r});
        assert_eq!(pre_name(&bl(true)), Some("gpt-2"));
        assert_eq!(pre_name(&bl(false)), None);
        let smollm = json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, bl(true)]});
        assert_eq!(pre_name(&smollm), Some("smollm"));
        let split = |re: &str| {
            json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false},
            bl(false)]})
        };
        assert_eq!(pre_name(&split(LLAMA3_PRE_REGEX)), Some("llama-bpe"));
        assert_eq!(pre_name(&split(QWEN2_PRE_REGEX)), Some("qwen2"));
        assert_eq!(pre_name(&split(r"\s+")), None);
        assert_eq!(pre_name(&json!({"type": "Metaspace"})), None);
    }

    #[test]
    fn llama3_scaling_becomes_rope_freqs_divisors() {
        let mut c = qlora_config::ModelConfig::from_json_str(
            r#"{"model_type": "llama", "vocab_size": 32, "hidden_size": 256, "intermediate_size": 64,
                "num_hidden_layers": 1, "num_attention_heads": 2, "rms_norm_eps": 1e-5,
                "rope_theta": 500000.0, "max_position_embeddings": 131072,
                "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}"#,
            "test",
        )
        .unwrap();
        let f = rope_freqs(&c).unwrap();
        assert_eq!(f.len(), 64);
        // Highest frequencies untouched, lowest divided by the factor.
        assert!((f[0] - 1.0).abs() < 1e-6, "{}", f[0]);
        assert!((f[63] - 8.0).abs() < 1e-4, "{}", f[63]);
        assert!(f.windows(2).all(|w| w[1] >= w[0] - 1e-6));
        c.rope_scaling = RopeScaling::Default;
        assert_eq!(rope_freqs(&c), None);
    }

    #[test]
    fn a_tokenizer_without_merges_still_declares_a_string_array() {
        // llama.cpp refuses `tokenizer.ggml.merges` unless its element type is string, even
        // when empty (a byte-level BPE vocabulary of single bytes has no merges).
        let dir = tempfile::tempdir().unwrap();
        let tj = json!({
            "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "c": 2, "d": 3}, "merges": []},
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "use_regex": true},
            "decoder": {"type": "ByteLevel"},
            "added_tokens": [],
        });
        std::fs::write(dir.path().join("tokenizer.json"), tj.to_string()).unwrap();
        let c = qlora_config::ModelConfig::from_json_str(
            r#"{"model_type": "llama", "vocab_size": 4, "hidden_size": 8, "intermediate_size": 16,
                "num_hidden_layers": 1, "num_attention_heads": 2, "rms_norm_eps": 1e-5}"#,
            "test",
        )
        .unwrap();
        let meta = tokenizer_from_folder(dir.path(), &c).unwrap();
        let get = |k: &str| &meta.iter().find(|(n, _)| n == k).unwrap().1;
        assert_eq!(
            get("tokenizer.ggml.merges"),
            &MetaValue::EmptyArray(value_type::STRING)
        );
        assert_eq!(get("tokenizer.ggml.tokens").as_array().unwrap().len(), 4);
        // Written and read back: the element type survives.
        let mut w = crate::writer::GgufWriter::new();
        w.metadata = meta.clone();
        let path = dir.path().join("t.gguf");
        std::fs::write(&path, w.to_bytes()).unwrap();
        let h = crate::GgufFile::read_header(&path).unwrap();
        assert_eq!(
            h.metadata.get("tokenizer.ggml.merges"),
            Some(&MetaValue::EmptyArray(value_type::STRING))
        );
    }
}
