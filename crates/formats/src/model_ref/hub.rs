//! The Hugging Face hub cache (read first) and, when allowed, downloading.

use std::path::{Path, PathBuf};

use hf_hub::{Repo, RepoType};

use super::{Fetch, ModelRef, ModelSource, RefErrorKind, Resolve};

/// The hub cache folder the Python stack uses: `$HF_HUB_CACHE`, else `$HF_HOME/hub`,
/// else `~/.cache/huggingface/hub`.
pub fn default_hub_cache() -> PathBuf {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    hf_hub::Cache::from_env().path().clone()
}

/// A hub id resolved cache-first; `Err((kind, message))`.
pub(super) fn resolve(
    id: &str,
    rev: Option<&str>,
    how: &Resolve,
) -> Result<ModelSource, (RefErrorKind, String)> {
    let repo = match rev {
        Some(r) => Repo::with_revision(id.to_string(), RepoType::Model, r.to_string()),
        None => Repo::model(id.to_string()),
    };
    let unusable = |m: String| (RefErrorKind::Unusable, m);
    if let Some(dir) = cached_snapshot(&how.hub_cache, &repo) {
        let config = dir.join("config.json");
        match how.fetch {
            Fetch::Config if config.is_file() => return Ok(ModelSource::Config(config)),
            Fetch::Config => {}
            Fetch::Model => {
                if let Ok(s) = ModelRef::from_dir(&dir) {
                    return Ok(s);
                }
            }
        }
    }
    if !how.allow_network {
        return Err((
            RefErrorKind::Hub,
            format!(
                "not a local path, and `{id}` is not in the Hugging Face cache at {}; \
                 download it (e.g. `huggingface-cli download {id}`) or allow network access",
                how.hub_cache.display()
            ),
        ));
    }
    match how.fetch {
        Fetch::Model => {
            let dir = download(&how.hub_cache, repo).map_err(|m| (RefErrorKind::Hub, m))?;
            ModelRef::from_dir(&dir).map_err(unusable)
        }
        Fetch::Config => {
            let api = api(&how.hub_cache, false).map_err(|m| (RefErrorKind::Hub, m))?;
            let p = api.repo(repo).get("config.json").map_err(|e| {
                (
                    RefErrorKind::Hub,
                    format!("`{id}` is not in the local cache, and fetching failed: {e}"),
                )
            })?;
            Ok(ModelSource::Config(p))
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

fn api(cache: &Path, progress: bool) -> Result<hf_hub::api::sync::Api, String> {
    hf_hub::api::sync::ApiBuilder::from_cache(hf_hub::Cache::new(cache.to_path_buf()))
        .with_progress(progress)
        .build()
        .map_err(|e| format!("hub client: {e}"))
}

/// Fetch the files a folder model needs into the cache; returns the snapshot folder.
fn download(cache: &Path, repo: Repo) -> Result<PathBuf, String> {
    let r = api(cache, true)?.repo(repo);
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
    match r.get(crate::model_files::INDEX_FILE) {
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
