//! What `--model <ref>` can name, resolved to files on disk.
//!
//! In order: an existing `.gguf` file; an existing folder (with `config.json`, or holding
//! exactly one `.gguf`); a hub id `org/name` (optionally `@revision`) looked up in the
//! Hugging Face cache (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`,
//! the layout `models--org--name/{refs,snapshots}` that Python and `hf-hub` share).
//! Only when the model is not cached and network use is allowed is it downloaded
//! (config, tokenizer files and the safetensors weights, sharded or not).

use std::path::{Path, PathBuf};

use hf_hub::{Repo, RepoType};

use crate::{Result, Tokenizer, TokenizerError};

/// Where the model's files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A Hugging Face model folder (config.json, safetensors, tokenizer files).
    Folder(PathBuf),
    /// A single GGUF file (weights, config and tokenizer in its metadata).
    Gguf(PathBuf),
}

/// A resolved model reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelRef {
    /// What the user wrote.
    pub spec: String,
    pub source: ModelSource,
}

/// The hub cache folder the Python stack uses.
pub fn default_hub_cache() -> PathBuf {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    hf_hub::Cache::from_env().path().clone()
}

fn is_gguf_file(p: &Path) -> bool {
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

fn ggufs_in(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        })
        .collect();
    v.sort();
    v
}

/// `org/name` or `org/name@rev` with hub-legal characters.
fn parse_hub_id(s: &str) -> Option<(String, Option<String>)> {
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
    /// Resolve with the default hub cache (see the module docs).
    pub fn resolve(spec: &str, allow_network: bool) -> Result<ModelRef> {
        Self::resolve_in(spec, allow_network, &default_hub_cache())
    }

    /// Resolve with an explicit hub cache folder (tests, or `--cache-dir`).
    pub fn resolve_in(spec: &str, allow_network: bool, hub_cache: &Path) -> Result<ModelRef> {
        let err = |msg: String| TokenizerError::ModelRef {
            spec: spec.to_string(),
            msg,
        };
        let p = Path::new(spec);
        if p.is_file() {
            if is_gguf_file(p) {
                return Ok(Self::gguf(spec, p.to_path_buf()));
            }
            return Err(err(
                "is a file but not a GGUF file; give a model folder, a .gguf file or a hub id"
                    .into(),
            ));
        }
        if p.is_dir() {
            return Self::from_dir(spec, p).map_err(err);
        }
        let Some((id, rev)) = parse_hub_id(spec) else {
            return Err(err(
                "no such file or folder, and not a hub id of the form org/name".into(),
            ));
        };
        if spec.starts_with("./") || spec.starts_with('/') {
            return Err(err("no such file or folder".into()));
        }
        let repo = match &rev {
            Some(r) => Repo::with_revision(id.clone(), RepoType::Model, r.clone()),
            None => Repo::model(id.clone()),
        };
        if let Some(dir) = cached_snapshot(hub_cache, &repo) {
            if let Ok(r) = Self::from_dir(spec, &dir) {
                return Ok(r);
            }
        }
        if !allow_network {
            return Err(err(format!(
                "not a local path, and `{id}` is not in the Hugging Face cache at {}; \
                 download it (e.g. `huggingface-cli download {id}`) or allow network access",
                hub_cache.display()
            )));
        }
        let dir = download(hub_cache, repo).map_err(err)?;
        Self::from_dir(spec, &dir).map_err(err)
    }

    fn gguf(spec: &str, p: PathBuf) -> ModelRef {
        ModelRef {
            spec: spec.to_string(),
            source: ModelSource::Gguf(p),
        }
    }

    fn from_dir(spec: &str, dir: &Path) -> std::result::Result<ModelRef, String> {
        if dir.join("config.json").is_file() {
            return Ok(ModelRef {
                spec: spec.to_string(),
                source: ModelSource::Folder(dir.to_path_buf()),
            });
        }
        let g = ggufs_in(dir);
        match g.len() {
            1 => Ok(Self::gguf(spec, g.into_iter().next().expect("one"))),
            0 => Err(format!(
                "folder {} has neither config.json nor a .gguf file",
                dir.display()
            )),
            n => Err(format!(
                "folder {} has no config.json and {n} .gguf files; name one of them",
                dir.display()
            )),
        }
    }

    /// The folder or the .gguf file.
    pub fn path(&self) -> &Path {
        match &self.source {
            ModelSource::Folder(p) | ModelSource::Gguf(p) => p,
        }
    }

    pub fn is_gguf(&self) -> bool {
        matches!(self.source, ModelSource::Gguf(_))
    }

    /// The model's tokenizer: the folder's tokenizer files, or the one embedded in the GGUF.
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        match &self.source {
            ModelSource::Folder(d) => Tokenizer::from_folder(d),
            ModelSource::Gguf(f) => Tokenizer::from_gguf(f),
        }
    }
}

/// The snapshot folder of a cached repo revision, if the cache has it.
fn cached_snapshot(cache: &Path, repo: &Repo) -> Option<PathBuf> {
    let base = cache.join(repo.folder_name());
    let rev = repo.revision();
    let is_commit = rev.len() == 40 && rev.chars().all(|c| c.is_ascii_hexdigit());
    let commit = if is_commit {
        rev.to_string()
    } else {
        std::fs::read_to_string(base.join("refs").join(rev))
            .ok()?
            .trim()
            .to_string()
    };
    let dir = base.join("snapshots").join(commit);
    dir.is_dir().then_some(dir)
}

/// Fetch the files a folder model needs into the cache; returns the snapshot folder.
fn download(cache: &Path, repo: Repo) -> std::result::Result<PathBuf, String> {
    let api = hf_hub::api::sync::ApiBuilder::from_cache(hf_hub::Cache::new(cache.to_path_buf()))
        .with_progress(true)
        .build()
        .map_err(|e| format!("hub client: {e}"))?;
    let r = api.repo(repo);
    let config = r
        .get("config.json")
        .map_err(|e| format!("downloading config.json: {e}"))?;
    for optional in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "chat_template.jinja",
        "special_tokens_map.json",
    ] {
        let _ = r.get(optional);
    }
    match r.get("model.safetensors.index.json") {
        Ok(index) => {
            let text = std::fs::read_to_string(&index).map_err(|e| e.to_string())?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| format!("{}: {e}", index.display()))?;
            let mut shards: Vec<&str> = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .map(|m| m.values().filter_map(|x| x.as_str()).collect())
                .unwrap_or_default();
            shards.sort();
            shards.dedup();
            for s in shards {
                r.get(s).map_err(|e| format!("downloading {s}: {e}"))?;
            }
        }
        Err(_) => {
            r.get("model.safetensors")
                .map_err(|e| format!("downloading model.safetensors: {e}"))?;
        }
    }
    config
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| "cache layout without a snapshot folder".into())
}
