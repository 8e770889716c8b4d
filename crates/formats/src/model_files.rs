//! A Hugging Face model folder's weights: one `model.safetensors`, or shards
//! listed by `model.safetensors.index.json` (FORMATS.md §4.5).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use crate::error::{FormatError, Result};
use crate::reader::{SafetensorsFile, TensorView};

/// Name of the single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// Name of the shard index.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// All weight files of a model folder behind one name → tensor lookup.
#[derive(Debug)]
pub struct ModelFiles {
    dir: PathBuf,
    files: Vec<SafetensorsFile>,
    /// tensor name → index into `files`; sorted so `names()` is deterministic.
    map: BTreeMap<String, usize>,
    /// The index file if the model is sharded.
    index_path: Option<PathBuf>,
}

impl ModelFiles {
    /// Open `path`: a folder holding `model.safetensors` or
    /// `model.safetensors.index.json` + shards, or a single `.safetensors`
    /// file. With an index, every listed tensor must exist in the shard the
    /// index names (a missing shard or entry is an error naming both).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if path.is_file() {
            let f = SafetensorsFile::open(path)?;
            let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
            return Ok(Self::from_single(dir, f));
        }
        if !path.is_dir() {
            return Err(FormatError::invalid(path, "no such file or folder"));
        }
        let index = path.join(INDEX_FILE);
        if index.is_file() {
            return Self::open_index(path, &index);
        }
        let single = path.join(SINGLE_FILE);
        if single.is_file() {
            let f = SafetensorsFile::open(&single)?;
            return Ok(Self::from_single(path.to_path_buf(), f));
        }
        let hint = if path.join("pytorch_model.bin").exists()
            || path.join("pytorch_model.bin.index.json").exists()
        {
            " (only pickle `pytorch_model.bin` weights found; convert them to safetensors first)"
        } else {
            ""
        };
        Err(FormatError::invalid(
            path,
            format!("no {SINGLE_FILE} or {INDEX_FILE} in this folder{hint}"),
        ))
    }

    fn from_single(dir: PathBuf, f: SafetensorsFile) -> Self {
        let map = f.names().into_iter().map(|n| (n.to_string(), 0)).collect();
        ModelFiles {
            dir,
            files: vec![f],
            map,
            index_path: None,
        }
    }

    fn open_index(dir: &Path, index: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(index).map_err(|e| FormatError::io(index, e))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| FormatError::invalid(index, format!("not valid JSON: {e}")))?;
        let wm = v
            .get("weight_map")
            .and_then(|w| w.as_object())
            .ok_or_else(|| FormatError::invalid(index, "missing `weight_map` object"))?;
        let mut shard_ids: HashMap<String, usize> = HashMap::new();
        let mut files: Vec<SafetensorsFile> = Vec::new();
        let mut map = BTreeMap::new();
        for (name, shard) in wm {
            let shard = shard.as_str().ok_or_else(|| {
                FormatError::invalid(index, format!("weight_map entry `{name}` is not a string"))
            })?;
            if shard.contains('/') || shard.contains('\\') || shard.starts_with('.') {
                return Err(FormatError::invalid(
                    index,
                    format!("weight_map entry `{name}` names `{shard}`, which is not a plain file name in this folder"),
                ));
            }
            let id = match shard_ids.get(shard) {
                Some(&i) => i,
                None => {
                    let p = dir.join(shard);
                    if !p.is_file() {
                        return Err(FormatError::invalid(
                            index,
                            format!("tensor `{name}` is mapped to shard `{shard}`, which does not exist ({})", p.display()),
                        ));
                    }
                    files.push(SafetensorsFile::open(&p)?);
                    shard_ids.insert(shard.to_string(), files.len() - 1);
                    files.len() - 1
                }
            };
            if !files[id].contains(name) {
                return Err(FormatError::invalid(
                    index,
                    format!(
                        "tensor `{name}` is mapped to shard `{shard}`, but {} has no such tensor",
                        files[id].path().display()
                    ),
                ));
            }
            map.insert(name.clone(), id);
        }
        Ok(ModelFiles {
            dir: dir.to_path_buf(),
            files,
            map,
            index_path: Some(index.to_path_buf()),
        })
    }

    /// The opened files (one, or every shard in first-listed order).
    pub fn into_files(self) -> Vec<SafetensorsFile> {
        self.files
    }

    /// The model folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The shard index, if the model is sharded.
    pub fn index_path(&self) -> Option<&Path> {
        self.index_path.as_deref()
    }

    /// The opened weight files (one, or the shards in first-use order).
    pub fn files(&self) -> &[SafetensorsFile] {
        &self.files
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> Vec<&str> {
        self.map.keys().map(String::as_str).collect()
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True if there are no tensors.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Whether the model has a tensor of that name.
    pub fn contains(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }

    /// The tensor, or `None`.
    pub fn get(&self, name: &str) -> Option<TensorView<'_>> {
        self.map.get(name).and_then(|&i| self.files[i].get(name))
    }

    /// The tensor; an error naming the folder if absent.
    pub fn tensor(&self, name: &str) -> Result<TensorView<'_>> {
        self.get(name).ok_or_else(|| {
            let origin = match (&self.index_path, self.files.first()) {
                (Some(p), _) => p.as_path(),
                (None, Some(f)) => f.path(),
                (None, None) => self.dir.as_path(),
            };
            FormatError::not_found(origin, name)
        })
    }

    /// The file that holds `name`.
    pub fn file_of(&self, name: &str) -> Option<&Path> {
        self.map.get(name).map(|&i| self.files[i].path())
    }

    /// The opened file that holds `name`.
    pub fn safetensors_of(&self, name: &str) -> Option<&SafetensorsFile> {
        self.map.get(name).map(|&i| &self.files[i])
    }

    /// Drop the resident pages of a tensor (see [`SafetensorsFile::release`]).
    pub fn release(&self, name: &str) {
        if let Some(f) = self.safetensors_of(name) {
            f.release(name);
        }
    }

    /// Sum of the data bytes of all tensors.
    pub fn total_data_bytes(&self) -> usize {
        self.map
            .iter()
            .filter_map(|(n, &i)| self.files[i].info(n))
            .map(|t| t.nbytes())
            .sum()
    }
}
