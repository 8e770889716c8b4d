//! Writing a whole Hugging Face model folder safely: built under a temporary
//! name beside its final place and renamed there only when complete, never
//! replacing a non-empty folder without `force`, with the weights streamed
//! unit by unit into one `model.safetensors` or size-limited shards plus
//! `model.safetensors.index.json`.
//!
//! Used by every command that writes a model folder (`qlora merge`, …), so
//! that they share one notion of "complete output".

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{FormatError, Result};
use crate::model_files::INDEX_FILE;
use crate::shards::{plan_shards, shard_file_name, write_atomic, write_index};
use crate::writer::{SafetensorsWriter, TensorSpec};

/// Refuse to replace a non-empty `out` unless `force`; refuse `out == input`.
pub fn check_output(input: &Path, out: &Path, force: bool) -> Result<()> {
    if let (Ok(a), Ok(b)) = (input.canonicalize(), out.canonicalize()) {
        if a == b {
            return Err(FormatError::invalid(
                out,
                "the output is the input; choose another --out",
            ));
        }
    }
    if out.is_dir() {
        let non_empty = std::fs::read_dir(out)
            .map_err(|e| FormatError::io(out, e))?
            .next()
            .is_some();
        if non_empty && !force {
            return Err(FormatError::invalid(
                out,
                "output folder exists and is not empty (use --force to replace it)",
            ));
        }
    } else if out.exists() && !force {
        return Err(FormatError::invalid(
            out,
            "output exists (use --force to replace it)",
        ));
    }
    Ok(())
}

/// A folder built beside its final place and renamed there by
/// [`OutputFolder::commit`]; removed if dropped before that.
pub struct OutputFolder {
    tmp: PathBuf,
    done: bool,
}

impl OutputFolder {
    /// Start building the folder that will become `out`.
    pub fn new(out: &Path) -> Result<Self> {
        if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
            // what killed runs left beside the output
            crate::durable::remove_stale_temps(parent);
        }
        let tmp = crate::writer::temp_path(out);
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| FormatError::io(&tmp, e))?;
        }
        std::fs::create_dir_all(&tmp).map_err(|e| FormatError::io(&tmp, e))?;
        Ok(OutputFolder { tmp, done: false })
    }

    /// Where the files go until the commit.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Replace `out` (if any) with the finished folder, in one step where the
    /// platform allows ([`crate::durable::replace_dir`]).
    pub fn commit(mut self, out: &Path) -> Result<()> {
        crate::durable::fsync_dir(&self.tmp).map_err(|e| FormatError::io(&self.tmp, e))?;
        crate::durable::replace_dir(&self.tmp, out).map_err(|e| FormatError::io(out, e))?;
        self.done = true;
        Ok(())
    }
}

impl Drop for OutputFolder {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

/// `config.json` of a model folder as a JSON object.
pub fn read_config_map(dir: &Path) -> Result<serde_json::Map<String, Value>> {
    let p = dir.join("config.json");
    let text = std::fs::read_to_string(&p).map_err(|e| FormatError::io(&p, e))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| FormatError::invalid(&p, format!("not valid JSON: {e}")))?;
    match v {
        Value::Object(m) => Ok(m),
        _ => Err(FormatError::invalid(&p, "not a JSON object")),
    }
}

/// Write JSON as transformers' `to_json_file` does: 2-space indent, sorted
/// keys, trailing newline; atomically.
pub fn write_config_json(path: &Path, v: &serde_json::Map<String, Value>) -> Result<()> {
    let sorted: BTreeMap<&String, &Value> = v.iter().collect();
    let mut text = serde_json::to_string_pretty(&sorted).expect("JSON serialises");
    text.push('\n');
    write_atomic(path, text.as_bytes())
}

/// Copy every plain file of a model folder that is not weights or
/// config.json (tokenizer files, generation_config.json, chat templates, …).
/// Returns the copied file names, sorted.
pub fn copy_side_files(from: &Path, to: &Path) -> Result<Vec<String>> {
    const WEIGHTS: [&str; 9] = [
        ".safetensors",
        ".bin",
        ".pt",
        ".pth",
        ".ckpt",
        ".gguf",
        ".h5",
        ".msgpack",
        ".onnx",
    ];
    let mut copied = Vec::new();
    let rd = std::fs::read_dir(from).map_err(|e| FormatError::io(from, e))?;
    for e in rd {
        let e = e.map_err(|e| FormatError::io(from, e))?;
        let p = e.path();
        if !p.is_file() {
            continue;
        }
        let name = e.file_name().to_string_lossy().to_string();
        if name == "config.json"
            || name == INDEX_FILE
            || name.ends_with(".index.json")
            || name.starts_with('.')
            || name.contains(".tmp-")
            || WEIGHTS.iter().any(|s| name.ends_with(s))
        {
            continue;
        }
        std::fs::copy(&p, to.join(&name)).map_err(|e| FormatError::io(&p, e))?;
        copied.push(name);
    }
    copied.sort();
    Ok(copied)
}

/// Stream units of tensors into `dir`: one `model.safetensors`, or
/// `model-0000k-of-0000n.safetensors` + index when the total exceeds
/// `max_shard` bytes. `units[i]` lists the tensors that `produce(i, writer)`
/// writes; a unit never straddles two shards. Units are produced in order,
/// one at a time, so memory stays near the largest unit.
pub fn write_model_shards(
    dir: &Path,
    units: &[Vec<TensorSpec>],
    max_shard: u64,
    mut produce: impl FnMut(usize, &mut SafetensorsWriter) -> Result<()>,
) -> Result<Vec<PathBuf>> {
    let sizes: Vec<usize> = units.iter().map(Vec::len).collect();
    let shards = plan_shards(units.to_vec(), max_shard);
    let n = shards.len();
    let mut files = Vec::with_capacity(n);
    let mut index = Vec::with_capacity(n);
    let mut next_unit = 0usize;
    for (k, specs) in shards.into_iter().enumerate() {
        let name = shard_file_name(k, n);
        let mut w = SafetensorsWriter::create(dir.join(&name), &specs)?;
        let mut covered = 0usize;
        while covered < specs.len() {
            produce(next_unit, &mut w)?;
            covered += sizes[next_unit];
            next_unit += 1;
        }
        files.push(w.finish()?);
        index.push((name, specs));
    }
    if n > 1 {
        write_index(dir, &index)?;
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::Dtype;

    #[test]
    fn output_folder_is_removed_unless_committed() {
        let root = tempfile::tempdir().unwrap();
        let out = root.path().join("out");
        {
            let f = OutputFolder::new(&out).unwrap();
            std::fs::write(f.path().join("x"), b"1").unwrap();
        }
        assert!(!out.exists());
        assert_eq!(
            std::fs::read_dir(root.path()).unwrap().count(),
            0,
            "temp folder left behind"
        );
        let f = OutputFolder::new(&out).unwrap();
        std::fs::write(f.path().join("x"), b"1").unwrap();
        f.commit(&out).unwrap();
        assert_eq!(std::fs::read(out.join("x")).unwrap(), b"1");
        // Non-empty now: refused without force.
        let e = check_output(root.path(), &out, false).unwrap_err();
        assert!(e.to_string().contains("--force"), "{e}");
        check_output(root.path(), &out, true).unwrap();
    }

    #[test]
    fn shards_split_by_size_and_keep_units_whole() {
        let root = tempfile::tempdir().unwrap();
        let units: Vec<Vec<TensorSpec>> = (0..4)
            .map(|i| vec![TensorSpec::new(format!("t{i}"), Dtype::F32, vec![10])])
            .collect();
        let mut seen = Vec::new();
        let files = write_model_shards(root.path(), &units, 80, |i, w| {
            seen.push(i);
            w.write_f32(&format!("t{i}"), &[i as f32; 10])
        })
        .unwrap();
        assert_eq!(seen, vec![0, 1, 2, 3]);
        assert_eq!(files.len(), 2, "{files:?}");
        assert!(root.path().join(INDEX_FILE).is_file());
        let one = tempfile::tempdir().unwrap();
        let files = write_model_shards(one.path(), &units, u64::MAX, |i, w| {
            w.write_f32(&format!("t{i}"), &[0.0; 10])
        })
        .unwrap();
        assert_eq!(files.len(), 1);
        assert!(files[0].ends_with("model.safetensors"));
    }
}
