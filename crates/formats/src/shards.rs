//! Splitting a checkpoint into shards and writing `model.safetensors.index.json`
//! the way transformers does (FORMATS.md §4.5).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{FormatError, Result};
use crate::writer::{temp_path, TensorSpec};

/// transformers' default `max_shard_size` ("5GB" = 5·10⁹ bytes).
pub const DEFAULT_MAX_SHARD_SIZE: u64 = 5_000_000_000;

/// Parse a byte size the one way every `qlora` flag reads sizes (shard sizes, memory
/// budgets, overheads): a plain byte count, or a number with a unit, case-insensitive:
/// KB/MB/GB/TB are powers of 10 (`5GB` = 5·10⁹, as transformers' `convert_file_size_to_int`)
/// and KiB/MiB/GiB/TiB powers of 2 (`24GiB` = 24·2³⁰); `K`, `M`, `G`, `T` alone are the
/// decimal units. Zero is allowed here; see [`parse_size`].
pub fn parse_bytes(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let x: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size (examples: 5GB, 500MB, 2GiB, 1000000)"))?;
    let mult: f64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "K" | "KB" => 1e3,
        "M" | "MB" => 1e6,
        "G" | "GB" => 1e9,
        "T" | "TB" => 1e12,
        "KIB" => 1024.0,
        "MIB" => 1024.0 * 1024.0,
        "GIB" => 1024.0 * 1024.0 * 1024.0,
        "TIB" => 1024.0f64.powi(4),
        u => {
            return Err(format!(
                "`{s}`: unknown size unit `{u}` (use KB, MB, GB, TB = powers of 10, KiB, MiB, GiB, TiB = powers of 2)"
            ))
        }
    };
    Ok((x * mult).round() as u64)
}

/// [`parse_bytes`] for sizes that must be at least one byte (shard sizes).
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let v = parse_bytes(s)?;
    if v < 1 {
        return Err(format!("`{s}`: size must be at least one byte"));
    }
    Ok(v)
}

/// Group `units` (each a set of tensors that must stay together, e.g. the six
/// keys of one quantized Linear) into shards of at most `max_bytes` data bytes,
/// greedily in the given order like transformers: a new shard starts when the
/// next unit would not fit; a unit larger than the limit gets a shard of its own.
pub fn plan_shards(units: Vec<Vec<TensorSpec>>, max_bytes: u64) -> Vec<Vec<TensorSpec>> {
    let mut shards: Vec<Vec<TensorSpec>> = Vec::new();
    let mut cur: Vec<TensorSpec> = Vec::new();
    let mut cur_bytes = 0u64;
    for unit in units {
        let b: u64 = unit.iter().map(|t| t.nbytes() as u64).sum();
        if !cur.is_empty() && cur_bytes + b > max_bytes {
            shards.push(std::mem::take(&mut cur));
            cur_bytes = 0;
        }
        cur.extend(unit);
        cur_bytes += b;
    }
    if !cur.is_empty() || shards.is_empty() {
        shards.push(cur);
    }
    shards
}

/// `model-0000k-of-0000n.safetensors` (1-based), or `model.safetensors` when n = 1.
pub fn shard_file_name(k: usize, n: usize) -> String {
    if n == 1 {
        crate::model_files::SINGLE_FILE.to_string()
    } else {
        format!("model-{:05}-of-{:05}.safetensors", k + 1, n)
    }
}

/// Write `model.safetensors.index.json` into `dir` (atomically): `metadata`
/// has `total_size` (sum of tensor data bytes) and `total_parameters` (sum of
/// stored element counts), `weight_map` maps each tensor to its shard file.
/// Formatted like transformers (`indent=2`, sorted keys, trailing newline).
pub fn write_index(dir: &Path, shards: &[(String, Vec<TensorSpec>)]) -> Result<PathBuf> {
    let mut weight_map = BTreeMap::new();
    let mut total_size = 0u64;
    let mut total_params = 0u64;
    for (file, specs) in shards {
        for s in specs {
            weight_map.insert(s.name.clone(), serde_json::Value::String(file.clone()));
            total_size += s.nbytes() as u64;
            total_params += s.numel() as u64;
        }
    }
    let mut metadata = serde_json::Map::new();
    metadata.insert("total_parameters".into(), total_params.into());
    metadata.insert("total_size".into(), total_size.into());
    let mut root = serde_json::Map::new();
    root.insert("metadata".into(), serde_json::Value::Object(metadata));
    root.insert(
        "weight_map".into(),
        serde_json::Value::Object(weight_map.into_iter().collect()),
    );
    let mut text = serde_json::to_string_pretty(&serde_json::Value::Object(root))
        .expect("JSON value serialises");
    text.push('\n');
    let path = dir.join(crate::model_files::INDEX_FILE);
    write_atomic(&path, text.as_bytes())?;
    Ok(path)
}

/// Write a small file atomically: `<path>.tmp-<pid>` in the same folder, fsynced,
/// renamed over `path`, then the folder fsynced so the rename itself is durable.
/// A reader never sees a half-written file; on error the temporary is removed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let tmp = temp_path(path);
    let written = std::fs::File::create(&tmp)
        .and_then(|mut f| {
            f.write_all(bytes)?;
            f.sync_all()
        })
        .map_err(|e| FormatError::io(&tmp, e))
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| FormatError::io(path, e)));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(path)
}

/// fsync the folder holding `path` (makes a rename into it durable). A no-op
/// where folders cannot be opened for syncing (not Unix).
pub fn sync_dir(path: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
        let dir = dir.unwrap_or_else(|| Path::new("."));
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| FormatError::io(dir, e))?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}
