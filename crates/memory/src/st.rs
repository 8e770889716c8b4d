//! safetensors headers: reading them without the data, and predicting the
//! exact header a writer produces (FORMATS.md §4.4).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use serde_json::Value;

use crate::MemoryError;

/// Rank of a safetensors dtype in the reference writer's enum; the writer lays
/// tensors out by descending rank, then by name (`safetensors::tensor::prepare`).
pub fn dtype_rank(dtype: &str) -> Option<u32> {
    const ORDER: [&str; 22] = [
        "BOOL",
        "F4",
        "F6_E2M3",
        "F6_E3M2",
        "U8",
        "I8",
        "F8_E5M2",
        "F8_E4M3",
        "F8_E8M0",
        "F8_E4M3FNUZ",
        "F8_E5M2FNUZ",
        "I16",
        "U16",
        "F16",
        "BF16",
        "I32",
        "U32",
        "F32",
        "C64",
        "F64",
        "I64",
        "U64",
    ];
    ORDER.iter().position(|d| *d == dtype).map(|p| p as u32)
}

/// Bytes per element of a safetensors dtype (sub-byte types excluded).
pub fn dtype_size(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" | "F8_E8M0" | "F8_E4M3FNUZ"
        | "F8_E5M2FNUZ" => 1,
        "I16" | "U16" | "F16" | "BF16" => 2,
        "I32" | "U32" | "F32" => 4,
        "C64" | "F64" | "I64" | "U64" => 8,
        _ => return None,
    })
}

/// One tensor as a writer would lay it out.
#[derive(Debug, Clone)]
pub struct Entry {
    pub name: String,
    pub dtype: &'static str,
    pub shape: Vec<u64>,
    pub nbytes: u64,
}

/// Length of the header JSON (padded to 8 with spaces, without the 8-byte
/// length prefix) that the safetensors writer produces for these tensors with
/// metadata `{"format":"pt"}` (what transformers, PEFT and our writers use).
pub fn header_json_len(entries: &[Entry]) -> u64 {
    let mut sorted: Vec<&Entry> = entries.iter().collect();
    sorted.sort_by(|a, b| {
        let (ra, rb) = (dtype_rank(a.dtype), dtype_rank(b.dtype));
        rb.cmp(&ra).then(a.name.as_bytes().cmp(b.name.as_bytes()))
    });
    let mut s = String::from("{\"__metadata__\":{\"format\":\"pt\"}");
    let mut off = 0u64;
    for e in sorted {
        let shape: Vec<String> = e.shape.iter().map(u64::to_string).collect();
        s.push(',');
        s.push_str(&serde_json::to_string(&e.name).expect("string"));
        s.push_str(&format!(
            ":{{\"dtype\":\"{}\",\"shape\":[{}],\"data_offsets\":[{},{}]}}",
            e.dtype,
            shape.join(","),
            off,
            off + e.nbytes
        ));
        off += e.nbytes;
    }
    s.push('}');
    (s.len() as u64).next_multiple_of(8)
}

/// One tensor entry read from a file header.
#[derive(Debug, Clone)]
pub struct HeaderTensor {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<u64>,
    pub begin: u64,
    pub end: u64,
}

/// A parsed safetensors header (the data is never read).
#[derive(Debug, Clone)]
pub struct Header {
    pub path: String,
    pub header_len: u64,
    pub file_len: u64,
    pub tensors: Vec<HeaderTensor>,
}

impl Header {
    /// Absolute file offset of a tensor's first data byte.
    pub fn data_start(&self, t: &HeaderTensor) -> u64 {
        8 + self.header_len + t.begin
    }
}

/// Headers above this size are refused (the format's own limit is 100 MB).
const MAX_HEADER: u64 = 100_000_000;

/// Read only the 8-byte length and the JSON header of a safetensors file.
pub fn read_header(path: &Path) -> Result<Header, MemoryError> {
    let p = path.display().to_string();
    let bad = |msg: String| MemoryError::BadFile {
        path: p.clone(),
        msg,
    };
    let io = |e: std::io::Error| MemoryError::Io {
        path: p.clone(),
        source: e,
    };
    let mut f = File::open(path).map_err(io)?;
    let file_len = f.metadata().map_err(io)?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n)
        .map_err(|_| bad("shorter than the 8-byte header length".into()))?;
    let header_len = u64::from_le_bytes(n);
    if header_len > MAX_HEADER || 8 + header_len > file_len {
        return Err(bad(format!(
            "header length {header_len} does not fit the file ({file_len} bytes); not a safetensors file?"
        )));
    }
    let mut buf = vec![0u8; header_len as usize];
    f.read_exact(&mut buf).map_err(io)?;
    let v: Value =
        serde_json::from_slice(&buf).map_err(|e| bad(format!("header is not valid JSON: {e}")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| bad("header is not a JSON object".into()))?;
    let mut tensors = Vec::with_capacity(obj.len());
    for (name, info) in obj {
        if name == "__metadata__" {
            continue;
        }
        let dtype = info
            .get("dtype")
            .and_then(Value::as_str)
            .ok_or_else(|| bad(format!("tensor {name}: missing dtype")))?;
        let shape = info
            .get("shape")
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(Value::as_u64).collect::<Option<Vec<u64>>>())
            .ok_or_else(|| bad(format!("tensor {name}: missing or bad shape")))?;
        let offs = info
            .get("data_offsets")
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(Value::as_u64).collect::<Option<Vec<u64>>>())
            .filter(|o| o.len() == 2 && o[0] <= o[1])
            .ok_or_else(|| bad(format!("tensor {name}: missing or bad data_offsets")))?;
        if 8 + header_len + offs[1] > file_len {
            return Err(bad(format!(
                "tensor {name}: data_offsets end {} is past the end of the file",
                offs[1]
            )));
        }
        tensors.push(HeaderTensor {
            name: name.clone(),
            dtype: dtype.to_string(),
            shape,
            begin: offs[0],
            end: offs[1],
        });
    }
    Ok(Header {
        path: p,
        header_len,
        file_len,
        tensors,
    })
}

/// Read a small tensor's raw bytes (used only for bnb quant-state JSON blobs of
/// ~170 bytes, which carry the original shape; never for weights).
pub fn read_small_tensor(h: &Header, t: &HeaderTensor) -> Result<Vec<u8>, MemoryError> {
    let io = |e: std::io::Error| MemoryError::Io {
        path: h.path.clone(),
        source: e,
    };
    let len = t.end - t.begin;
    if len > 1 << 16 {
        return Err(MemoryError::BadFile {
            path: h.path.clone(),
            msg: format!(
                "{}: {len} bytes is too large for a quant-state blob",
                t.name
            ),
        });
    }
    let mut f = File::open(&h.path).map_err(io)?;
    f.seek(SeekFrom::Start(h.data_start(t))).map_err(io)?;
    let mut buf = vec![0u8; len as usize];
    f.read_exact(&mut buf).map_err(io)?;
    Ok(buf)
}

/// Shard files named by a `model.safetensors.index.json`, in first-seen order.
pub fn index_shards(path: &Path) -> Result<Vec<std::path::PathBuf>, MemoryError> {
    let p = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| MemoryError::Io {
        path: p.clone(),
        source: e,
    })?;
    let v: Value = serde_json::from_str(&text).map_err(|e| MemoryError::BadFile {
        path: p.clone(),
        msg: format!("not valid JSON: {e}"),
    })?;
    let map = v
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| MemoryError::BadFile {
            path: p.clone(),
            msg: "no `weight_map` object".into(),
        })?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut seen = BTreeMap::new();
    let mut out = Vec::new();
    for file in map.values() {
        let f = file.as_str().ok_or_else(|| MemoryError::BadFile {
            path: p.clone(),
            msg: "weight_map values must be file names".into(),
        })?;
        if seen.insert(f.to_string(), ()).is_none() {
            out.push(dir.join(f));
        }
    }
    Ok(out)
}
