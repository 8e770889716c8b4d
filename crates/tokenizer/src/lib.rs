//! Tokenizers and chat templates.
//!
//! - [`Tokenizer`]: a `tokenizers::Tokenizer` plus what generation needs around it (BOS/EOS,
//!   stop tokens, the chat template). Built from a Hugging Face folder (`tokenizer.json`,
//!   `tokenizer_config.json`, `chat_template.jinja`, `generation_config.json`) or rebuilt
//!   from GGUF metadata ([`Tokenizer::from_gguf`]) as the equivalent byte-level BPE.
//! - [`chat::ChatTemplate`]: HF's Jinja chat templates rendered with minijinja.
//! - [`StreamDecoder`]: token-by-token text output that never splits a UTF-8 character.
//! - `impl qlora_data::formats::TextTokenizer for Tokenizer`: the data pipeline's view.
//! - [`Tokenizer::for_model`]: the tokenizer of a model reference resolved by
//!   `qlora_formats::ModelRef` (re-exported here).

use std::path::{Path, PathBuf};

pub mod chat;
mod data;
mod from_gguf;
mod stream;

pub use chat::{ChatMessage, ChatTemplate};
/// The one model-reference resolver (it lives in `qlora-formats`).
pub use qlora_formats::model_ref::{ModelRef, ModelSource};
pub use stream::StreamDecoder;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{origin}: tokenizer: {msg}")]
    Tokenizer { origin: String, msg: String },
    #[error(transparent)]
    Gguf(#[from] qlora_gguf::GgufError),
    #[error("{origin}: unsupported: {msg}")]
    Unsupported { origin: String, msg: String },
    #[error("{origin}: chat template: {msg}")]
    Template { origin: String, msg: String },
    #[error("model reference `{spec}`: {msg}")]
    ModelRef { spec: String, msg: String },
}

impl From<qlora_formats::RefError> for TokenizerError {
    fn from(e: qlora_formats::RefError) -> Self {
        TokenizerError::ModelRef {
            spec: e.spec,
            msg: e.msg,
        }
    }
}

pub type Result<T, E = TokenizerError> = std::result::Result<T, E>;

/// Special-token names commonly used to end an assistant turn; any of them present in the
/// vocabulary as a special token also stops generation.
const END_OF_TURN: [&str; 5] = [
    "<|im_end|>",
    "<|eot_id|>",
    "<|endoftext|>",
    "<|end|>",
    "</s>",
];

/// A tokenizer with the metadata generation and chat formatting need.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    origin: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
    eos_ids: Vec<u32>,
    chat_template: Option<ChatTemplate>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("origin", &self.origin)
            .field("vocab_size", &self.vocab_size())
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish()
    }
}

fn read_json(path: &Path) -> Result<Option<serde_json::Value>> {
    match std::fs::read_to_string(path) {
        Ok(s) => serde_json::from_str(&s)
            .map(Some)
            .map_err(|source| TokenizerError::Json {
                path: path.to_path_buf(),
                source,
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(TokenizerError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// `"<s>"` or `{"content": "<s>", …}` (both spellings occur in tokenizer_config.json).
fn token_string(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

fn id_list(v: Option<&serde_json::Value>) -> Vec<u32> {
    match v {
        // ids beyond u32 name no token: dropped, never truncated onto another token
        Some(serde_json::Value::Number(n)) => n
            .as_u64()
            .and_then(|x| u32::try_from(x).ok())
            .into_iter()
            .collect(),
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64().and_then(|x| u32::try_from(x).ok()))
            .collect(),
        _ => Vec::new(),
    }
}

impl Tokenizer {
    /// Wrap a `tokenizers::Tokenizer` built elsewhere.
    pub fn new(inner: tokenizers::Tokenizer, origin: impl Into<String>) -> Self {
        Tokenizer {
            inner,
            origin: origin.into(),
            bos_token: None,
            eos_token: None,
            eos_ids: Vec::new(),
            chat_template: None,
        }
    }

    /// Load `tokenizer.json` (and only that).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let inner =
            tokenizers::Tokenizer::from_file(path).map_err(|e| TokenizerError::Tokenizer {
                origin: path.display().to_string(),
                msg: e.to_string(),
            })?;
        Ok(Self::new(inner, path.display().to_string()))
    }

    /// A model's tokenizer: its folder's tokenizer files, or the one embedded in its
    /// GGUF file; other references (no model folder, no GGUF) are refused.
    pub fn for_model(r: &ModelRef) -> Result<Self> {
        r.require_model()?;
        match &r.source {
            ModelSource::Gguf(f) => Tokenizer::from_gguf(f),
            _ => Tokenizer::from_folder(r.path()),
        }
    }

    /// Load from a Hugging Face model folder: `tokenizer.json` plus, when present,
    /// `tokenizer_config.json` (bos/eos tokens, `chat_template`), `chat_template.jinja`
    /// (takes precedence, as transformers ≥ 4.43 saves it), `generation_config.json` and
    /// `config.json` (`eos_token_id`, possibly a list).
    pub fn from_folder(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let mut t = Self::from_file(dir.join("tokenizer.json"))?;
        let cfg_path = dir.join("tokenizer_config.json");
        if let Some(cfg) = read_json(&cfg_path)? {
            t.bos_token = token_string(cfg.get("bos_token"));
            t.eos_token = token_string(cfg.get("eos_token"));
            let origin = cfg_path.display().to_string();
            match cfg.get("chat_template") {
                Some(serde_json::Value::String(s)) => {
                    t.chat_template = Some(ChatTemplate::new(s.clone(), origin))
                }
                // A list of named templates: use "default".
                Some(serde_json::Value::Array(list)) => {
                    let default = list
                        .iter()
                        .find(|x| x.get("name").and_then(|n| n.as_str()) == Some("default"));
                    if let Some(s) = default
                        .and_then(|d| d.get("template"))
                        .and_then(|s| s.as_str())
                    {
                        t.chat_template = Some(ChatTemplate::new(s.to_string(), origin));
                    }
                }
                _ => {}
            }
        }
        let jinja = dir.join("chat_template.jinja");
        match std::fs::read_to_string(&jinja) {
            Ok(s) => t.chat_template = Some(ChatTemplate::new(s, jinja.display().to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(TokenizerError::Io {
                    path: jinja,
                    source,
                })
            }
        }
        for f in ["generation_config.json", "config.json"] {
            if let Some(v) = read_json(&dir.join(f))? {
                for id in id_list(v.get("eos_token_id")) {
                    if !t.eos_ids.contains(&id) {
                        t.eos_ids.push(id);
                    }
                }
            }
        }
        if let Some(eos) = t.eos_token.clone() {
            if let Some(id) = t.inner.token_to_id(&eos) {
                if !t.eos_ids.contains(&id) {
                    t.eos_ids.insert(0, id);
                }
            }
        }
        Ok(t)
    }

    /// Rebuild the tokenizer a GGUF file embeds (`tokenizer.ggml.*`, `tokenizer.chat_template`).
    pub fn from_gguf(path: impl AsRef<Path>) -> Result<Self> {
        let header = qlora_gguf::GgufFile::read_header(path)?;
        Self::from_gguf_header(&header)
    }

    /// Like [`Tokenizer::from_gguf`] from an already parsed header.
    pub fn from_gguf_header(header: &qlora_gguf::GgufHeader) -> Result<Self> {
        from_gguf::build(header)
    }

    /// The underlying `tokenizers::Tokenizer`.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Where this tokenizer came from (for messages).
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    /// Replace the chat template (e.g. from a user-given file).
    pub fn set_chat_template(&mut self, t: Option<ChatTemplate>) {
        self.chat_template = t;
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Encode text. `add_special_tokens` applies the tokenizer's post-processor (e.g. BOS);
    /// chat-templated text already carries its special tokens, so pass `false` for it.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        self.inner
            .encode(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| TokenizerError::Tokenizer {
                origin: self.origin.clone(),
                msg: e.to_string(),
            })
    }

    /// Decode ids to text.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| TokenizerError::Tokenizer {
                origin: self.origin.clone(),
                msg: e.to_string(),
            })
    }

    /// Ids that end generation: the configured EOS ids plus any end-of-turn special token
    /// (`<|im_end|>`, `<|eot_id|>`, `<|endoftext|>`, `<|end|>`, `</s>`) the vocabulary has.
    pub fn stop_ids(&self) -> Vec<u32> {
        let mut ids = self.eos_ids.clone();
        for name in END_OF_TURN {
            if let Some(id) = self.inner.token_to_id(name) {
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
        }
        ids
    }

    /// Add stop ids (e.g. `eos_token_id` from a model config).
    pub fn add_stop_ids(&mut self, ids: &[u32]) {
        for &id in ids {
            if !self.eos_ids.contains(&id) {
                self.eos_ids.push(id);
            }
        }
    }

    /// Render the chat template (with `bos_token`/`eos_token` set) for `messages`.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let t = self
            .chat_template
            .as_ref()
            .ok_or_else(|| TokenizerError::Template {
                origin: self.origin.clone(),
                msg: "this model has no chat template".into(),
            })?;
        t.render(
            messages,
            add_generation_prompt,
            self.bos_token.as_deref().unwrap_or(""),
            self.eos_token.as_deref().unwrap_or(""),
        )
    }
}
