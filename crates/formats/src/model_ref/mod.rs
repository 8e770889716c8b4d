//! The one model-reference resolver: what `--model <ref>` (or a positional model
//! argument) names, resolved to files on disk. Every command goes through it.
//!
//! In order:
//! 1. an existing file: a GGUF file (by extension or magic), a `.safetensors` file or
//!    its `model.safetensors.index.json`, or a `config.json` (any other `.json`);
//! 2. an existing folder: with `config.json` a Hugging Face model folder; without one,
//!    the single `.gguf` file in it, else its safetensors weights;
//! 3. a hub id `org/name` (optionally `@revision`, a branch, tag or commit) looked up in
//!    the Hugging Face cache (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
//!    `~/.cache/huggingface/hub`: the layout `models--org--name/{refs,snapshots}` that
//!    Python and `hf-hub` share). Only when it is not cached and network use is
//!    allowed is it downloaded ([`Fetch`] says what).
//!
//! A path that exists always wins over a hub id of the same spelling. What is *done*
//! with the files (a tokenizer, a model, a memory plan) is the caller's; callers
//! that need a loadable model use [`ModelRef::resolve`], which also refuses what
//! cannot be loaded as one (a bare safetensors file, a folder without config.json)
//! with the same messages as always. Preset names are a memory-planner concept and
//! are layered on top by `qlora-memory`.

mod hub;

use std::path::{Path, PathBuf};

pub use hub::default_hub_cache;

/// Where the model's files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A Hugging Face model folder: `config.json` beside its weights and tokenizer files.
    Folder(PathBuf),
    /// A single GGUF file (weights, config and tokenizer in its metadata).
    Gguf(PathBuf),
    /// A folder of safetensors weights without `config.json`.
    Weights(PathBuf),
    /// A bare `.safetensors` file, or a folder's `model.safetensors.index.json`.
    Safetensors(PathBuf),
    /// A `config.json` alone (a local file, or a hub repo fetched with [`Fetch::Config`]).
    Config(PathBuf),
}

/// What a resolved reference holds, for callers that branch on it (see [`ModelRef::kind`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceKind {
    /// A GGUF file.
    Gguf,
    /// A model folder with plain safetensors weights (f32/f16/bf16).
    HfFolder { sharded: bool },
    /// A model folder saved by bitsandbytes in 4 bits (`quantization_config` in config.json).
    Bnb4Folder { sharded: bool },
    /// Safetensors weights without a config: a bare file, an index, or a folder of files.
    BareSafetensors,
    /// A config.json and no weights.
    ConfigOnly,
}

/// How a folder's safetensors weights are laid out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Weights {
    /// `model.safetensors.index.json` naming the shards.
    Sharded { index: PathBuf },
    /// `*.safetensors` files (sorted; adapter files excluded), usually one.
    Files(Vec<PathBuf>),
}

/// What a hub id downloads when it is not cached (and network use is allowed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fetch {
    /// config.json, the tokenizer files and the safetensors weights (sharded or not).
    Model,
    /// config.json only (what the memory planner reads); a cached snapshot resolves to
    /// its config.json as [`ModelSource::Config`].
    Config,
}

/// How to resolve (see the module docs).
#[derive(Debug, Clone)]
pub struct Resolve {
    pub allow_network: bool,
    pub hub_cache: PathBuf,
    pub fetch: Fetch,
}

impl Resolve {
    /// The default hub cache, the whole model downloaded when network use is allowed.
    pub fn new(allow_network: bool) -> Resolve {
        Resolve {
            allow_network,
            hub_cache: default_hub_cache(),
            fetch: Fetch::Model,
        }
    }
}

/// Why a reference did not resolve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefErrorKind {
    /// Not an existing path, and not spelled like a hub id.
    NotFound,
    /// A hub id that is neither cached nor (allowed to be) downloaded.
    Hub,
    /// An existing path (or a hub snapshot) that holds nothing usable.
    Unusable,
}

/// A reference that did not resolve; the message names the file or id and what is wrong.
#[derive(Debug, Clone, thiserror::Error)]
#[error("model reference `{spec}`: {msg}")]
pub struct RefError {
    pub spec: String,
    pub msg: String,
    pub kind: RefErrorKind,
}

/// A resolved model reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelRef {
    /// What the user wrote.
    pub spec: String,
    pub source: ModelSource,
    /// The hub id (without `@revision`) when it was resolved through the hub cache.
    pub hub_id: Option<String>,
}

pub(crate) fn is_gguf_file(p: &Path) -> bool {
    if p.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        return true;
    }
    let mut magic = [0u8; 4];
    std::fs::File::open(p)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok()
        && &magic == b"GGUF"
}

fn files_with_ext(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e.eq_ignore_ascii_case(ext)))
        .collect();
    v.sort();
    v
}

/// A folder's safetensors weights: the shard index if there is one, else its
/// `*.safetensors` files (adapter files excluded); `None` when it has neither.
pub fn folder_weights(dir: &Path) -> Option<Weights> {
    let index = dir.join(crate::model_files::INDEX_FILE);
    if index.is_file() {
        return Some(Weights::Sharded { index });
    }
    let files: Vec<PathBuf> = files_with_ext(dir, "safetensors")
        .into_iter()
        .filter(|p| {
            !p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("adapter"))
        })
        .collect();
    (!files.is_empty()).then_some(Weights::Files(files))
}

/// `org/name` or `org/name@rev` with hub-legal characters: `(id, revision)`.
pub fn parse_hub_id(s: &str) -> Option<(String, Option<String>)> {
    let (id, rev) = match s.split_once('@') {
        Some((a, b)) if !b.is_empty() => (a, Some(b.to_string())),
        Some(_) => return None,
        None => (s, None),
    };
    let (org, name) = id.split_once('/')?;
    let ok = |p: &str| {
        !p.is_empty()
            && !p.starts_with('.')
            && !p.starts_with('-')
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
    };
    (ok(org) && ok(name)).then(|| (id.to_string(), rev))
}

impl ModelRef {
    /// A loadable model (a model folder or a GGUF file) with the default hub cache;
    /// the hub only with `allow_network`.
    pub fn resolve(spec: &str, allow_network: bool) -> Result<ModelRef, RefError> {
        Self::resolve_in(spec, allow_network, &default_hub_cache())
    }

    /// [`ModelRef::resolve`] with an explicit hub cache folder (tests, or `--cache-dir`).
    pub fn resolve_in(
        spec: &str,
        allow_network: bool,
        hub_cache: &Path,
    ) -> Result<ModelRef, RefError> {
        let how = Resolve {
            allow_network,
            hub_cache: hub_cache.to_path_buf(),
            fetch: Fetch::Model,
        };
        let r = Self::resolve_with(spec, &how)?;
        r.require_model()?;
        Ok(r)
    }

    /// Any reference: whatever the path or hub snapshot holds (see [`ModelSource`]).
    pub fn resolve_with(spec: &str, how: &Resolve) -> Result<ModelRef, RefError> {
        let err = |kind, msg: String| RefError {
            spec: spec.to_string(),
            msg,
            kind,
        };
        let p = Path::new(spec);
        if p.is_file() {
            return Ok(Self::local(spec, Self::from_file(p)));
        }
        if p.is_dir() {
            let source = Self::from_dir(p).map_err(|m| err(RefErrorKind::Unusable, m))?;
            return Ok(Self::local(spec, source));
        }
        let Some((id, rev)) = parse_hub_id(spec) else {
            return Err(err(
                RefErrorKind::NotFound,
                "no such file or folder, and not a hub id of the form org/name".into(),
            ));
        };
        if spec.starts_with("./") || spec.starts_with('/') {
            return Err(err(RefErrorKind::NotFound, "no such file or folder".into()));
        }
        let source = hub::resolve(&id, rev.as_deref(), how).map_err(|(k, m)| err(k, m))?;
        Ok(ModelRef {
            spec: spec.to_string(),
            source,
            hub_id: Some(id),
        })
    }

    fn local(spec: &str, source: ModelSource) -> ModelRef {
        ModelRef {
            spec: spec.to_string(),
            source,
            hub_id: None,
        }
    }

    fn from_file(p: &Path) -> ModelSource {
        let name = p
            .file_name()
            .map(|s| s.to_string_lossy().to_lowercase())
            .unwrap_or_default();
        if is_gguf_file(p) {
            ModelSource::Gguf(p.to_path_buf())
        } else if name.ends_with(".json") && !name.ends_with(".safetensors.index.json") {
            ModelSource::Config(p.to_path_buf())
        } else {
            // `.safetensors`, an index, or unknown: the safetensors reader names what is wrong.
            ModelSource::Safetensors(p.to_path_buf())
        }
    }

    pub(crate) fn from_dir(dir: &Path) -> Result<ModelSource, String> {
        if dir.join("config.json").is_file() {
            return Ok(ModelSource::Folder(dir.to_path_buf()));
        }
        let g = files_with_ext(dir, "gguf");
        match g.len() {
            1 => Ok(ModelSource::Gguf(g.into_iter().next().expect("one"))),
            0 if folder_weights(dir).is_some() => Ok(ModelSource::Weights(dir.to_path_buf())),
            0 => Err(format!(
                "folder {} has neither config.json nor a .gguf file (nor *.safetensors)",
                dir.display()
            )),
            n => Err(format!(
                "folder {} has no config.json and {n} .gguf files; name one of them",
                dir.display()
            )),
        }
    }

    /// Refuse what is not a loadable model (a model folder or a GGUF file), with the
    /// messages the model-loading commands have always given.
    pub fn require_model(&self) -> Result<(), RefError> {
        let err = |msg: String| RefError {
            spec: self.spec.clone(),
            msg,
            kind: RefErrorKind::Unusable,
        };
        match &self.source {
            ModelSource::Folder(_) | ModelSource::Gguf(_) => Ok(()),
            ModelSource::Weights(d) => Err(err(format!(
                "folder {} has neither config.json nor a .gguf file",
                d.display()
            ))),
            ModelSource::Safetensors(_) | ModelSource::Config(_) => Err(err(
                "is a file but not a GGUF file; give a model folder, a .gguf file or a hub id"
                    .into(),
            )),
        }
    }

    /// The folder or the file.
    pub fn path(&self) -> &Path {
        match &self.source {
            ModelSource::Folder(p)
            | ModelSource::Gguf(p)
            | ModelSource::Weights(p)
            | ModelSource::Safetensors(p)
            | ModelSource::Config(p) => p,
        }
    }

    pub fn is_gguf(&self) -> bool {
        matches!(self.source, ModelSource::Gguf(_))
    }

    /// The config.json this reference has, if any (a GGUF's config is in its metadata).
    pub fn config_path(&self) -> Option<PathBuf> {
        match &self.source {
            ModelSource::Folder(d) => Some(d.join("config.json")),
            ModelSource::Config(f) => Some(f.clone()),
            _ => None,
        }
    }

    /// The safetensors weights, if the reference has any.
    pub fn weights(&self) -> Option<Weights> {
        match &self.source {
            ModelSource::Folder(d) | ModelSource::Weights(d) => folder_weights(d),
            ModelSource::Safetensors(f) => {
                let is_index = f
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().ends_with(".safetensors.index.json"));
                Some(if is_index {
                    Weights::Sharded { index: f.clone() }
                } else {
                    Weights::Files(vec![f.clone()])
                })
            }
            ModelSource::Gguf(_) | ModelSource::Config(_) => None,
        }
    }

    /// What the reference holds. A folder is bitsandbytes 4-bit when its config.json
    /// has a `quantization_config` with `load_in_4bit` (or `quant_method`
    /// `bitsandbytes` and a 4-bit `bnb_4bit_quant_type`), as transformers writes it.
    pub fn kind(&self) -> SourceKind {
        match &self.source {
            ModelSource::Gguf(_) => SourceKind::Gguf,
            ModelSource::Config(_) => SourceKind::ConfigOnly,
            ModelSource::Weights(_) | ModelSource::Safetensors(_) => SourceKind::BareSafetensors,
            ModelSource::Folder(d) => {
                let sharded = match folder_weights(d) {
                    None => return SourceKind::ConfigOnly,
                    Some(w) => matches!(w, Weights::Sharded { .. }),
                };
                if is_bnb4_config(&d.join("config.json")) {
                    SourceKind::Bnb4Folder { sharded }
                } else {
                    SourceKind::HfFolder { sharded }
                }
            }
        }
    }
}

fn is_bnb4_config(path: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(path) else {
        return false;
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
        return false;
    };
    let Some(q) = v.get("quantization_config") else {
        return false;
    };
    q.get("load_in_4bit").and_then(|b| b.as_bool()) == Some(true)
        || (q.get("quant_method").and_then(|m| m.as_str()) == Some("bitsandbytes")
            && q.get("bnb_4bit_quant_type").is_some()
            && q.get("load_in_8bit").and_then(|b| b.as_bool()) != Some(true))
}
