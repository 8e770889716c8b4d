//! Parsing and validating a safetensors header (FORMATS.md §4.4).
//!
//! We parse the header ourselves instead of only calling the `safetensors`
//! crate because its errors do not say which tensor is wrong and its map
//! deserialisation silently drops duplicate names. The crate's own validator
//! is still run afterwards as a second opinion, so anything we accept is also
//! accepted by the reference implementation.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use safetensors::Dtype;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::Value;

/// Largest header the reference implementation accepts (100 MB).
pub const MAX_HEADER_SIZE: usize = 100_000_000;

/// One tensor entry of a header, offsets relative to the data buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// `[begin, end)` relative to the start of the data buffer.
    pub data_offsets: (usize, usize),
}

impl TensorInfo {
    /// Number of elements (1 for a 0-rank tensor).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// Number of data bytes.
    pub fn nbytes(&self) -> usize {
        self.data_offsets.1 - self.data_offsets.0
    }
}

/// A validated header.
#[derive(Debug, Clone)]
pub struct Header {
    /// Length of the JSON header in bytes (the `N` of the file).
    pub header_len: usize,
    /// `__metadata__`, if present.
    pub metadata: Option<BTreeMap<String, String>>,
    /// Tensors ordered by data offset.
    pub tensors: Vec<TensorInfo>,
    /// name → index into `tensors`.
    pub index: HashMap<String, usize>,
    /// Size of the data buffer (= end of the last tensor).
    pub data_len: usize,
}

impl Header {
    /// Offset of the data buffer from the start of the file.
    pub fn data_start(&self) -> usize {
        8 + self.header_len
    }
}

/// A JSON object read as an ordered list of entries, keeping duplicates.
struct Entries(Vec<(String, Value)>);

impl<'de> serde::Deserialize<'de> for Entries {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Entries;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Entries, A::Error> {
                let mut v = Vec::new();
                while let Some((k, val)) = m.next_entry::<String, Value>()? {
                    v.push((k, val));
                }
                Ok(Entries(v))
            }
        }
        d.deserialize_map(V)
    }
}

/// Parse a dtype string as the safetensors format spells it.
pub fn parse_dtype(s: &str) -> Option<Dtype> {
    serde_json::from_value::<Dtype>(Value::String(s.to_string())).ok()
}

/// Parse and fully validate the header of a complete safetensors file image.
///
/// `bytes` must be the whole file. Errors are plain messages; the caller adds
/// the file name.
pub fn parse(bytes: &[u8]) -> Result<Header, String> {
    let file_len = bytes.len();
    if file_len < 8 {
        return Err(format!(
            "file is {file_len} bytes, too short for the 8-byte header length (truncated or not a safetensors file)"
        ));
    }
    let n64 = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    if n64 > MAX_HEADER_SIZE as u64 {
        return Err(format!(
            "header length {n64} exceeds the {MAX_HEADER_SIZE}-byte limit (not a safetensors file?)"
        ));
    }
    let n = n64 as usize;
    if 8 + n > file_len {
        return Err(format!(
            "header length {n} runs past the end of the file ({file_len} bytes): truncated file or not a safetensors file"
        ));
    }
    let text = std::str::from_utf8(&bytes[8..8 + n])
        .map_err(|e| format!("header is not valid UTF-8: {e}"))?;
    if !text.starts_with('{') {
        return Err("header does not start with `{` (not a safetensors file?)".into());
    }
    let Entries(entries) =
        serde_json::from_str(text).map_err(|e| format!("header is not valid JSON: {e}"))?;

    let mut metadata = None;
    let mut tensors: Vec<TensorInfo> = Vec::with_capacity(entries.len());
    let mut seen: HashMap<String, ()> = HashMap::with_capacity(entries.len());
    let avail = file_len - 8 - n;
    for (name, val) in entries {
        if seen.insert(name.clone(), ()).is_some() {
            return Err(format!("duplicate entry `{name}` in the header"));
        }
        if name == "__metadata__" {
            metadata = Some(parse_metadata(&val)?);
            continue;
        }
        let info = parse_tensor(&name, &val)?;
        let (b, e) = info.data_offsets;
        if e > avail {
            return Err(format!(
                "tensor `{name}`: data_offsets [{b}, {e}] out of range: the data buffer has only {avail} bytes (truncated file?)"
            ));
        }
        tensors.push(info);
    }

    tensors.sort_by(|a, b| {
        a.data_offsets
            .cmp(&b.data_offsets)
            .then_with(|| a.name.cmp(&b.name))
    });
    let mut expected = 0usize;
    let mut prev: Option<&TensorInfo> = None;
    for t in &tensors {
        let (b, e) = t.data_offsets;
        if b < expected {
            let p = prev.expect("expected > 0 implies a previous tensor");
            return Err(format!(
                "tensors `{}` [{}, {}] and `{}` [{b}, {e}] overlap",
                p.name, p.data_offsets.0, p.data_offsets.1, t.name
            ));
        }
        if b > expected {
            return Err(format!(
                "hole in the data buffer: bytes [{expected}, {b}) before tensor `{}` belong to no tensor",
                t.name
            ));
        }
        expected = e;
        prev = Some(t);
    }
    if expected != avail {
        return Err(format!(
            "the tensors cover {expected} data bytes but the file has {avail} bytes after the header ({} unexplained trailing bytes)",
            avail - expected
        ));
    }

    // Second opinion from the reference implementation.
    if let Err(e) = safetensors::SafeTensors::read_metadata(bytes) {
        return Err(format!("rejected by the safetensors reference reader: {e}"));
    }

    let index = tensors
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.clone(), i))
        .collect();
    Ok(Header {
        header_len: n,
        metadata,
        tensors,
        index,
        data_len: expected,
    })
}

fn parse_metadata(val: &Value) -> Result<BTreeMap<String, String>, String> {
    let obj = val
        .as_object()
        .ok_or("`__metadata__` is not a JSON object")?;
    let mut out = BTreeMap::new();
    for (k, v) in obj {
        let s = v
            .as_str()
            .ok_or_else(|| format!("`__metadata__` value for `{k}` is not a string"))?;
        out.insert(k.clone(), s.to_string());
    }
    Ok(out)
}

fn parse_tensor(name: &str, val: &Value) -> Result<TensorInfo, String> {
    let bad = |msg: String| format!("tensor `{name}`: {msg}");
    let obj = val
        .as_object()
        .ok_or_else(|| bad("entry is not a JSON object".into()))?;
    let dtype_s = obj
        .get("dtype")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("missing or non-string `dtype`".into()))?;
    let dtype = parse_dtype(dtype_s).ok_or_else(|| bad(format!("unknown dtype `{dtype_s}`")))?;
    let shape_v = obj
        .get("shape")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("missing or non-array `shape`".into()))?;
    let mut shape = Vec::with_capacity(shape_v.len());
    for d in shape_v {
        let d = d
            .as_u64()
            .ok_or_else(|| bad(format!("shape entry {d} is not a non-negative integer")))?;
        shape.push(usize::try_from(d).map_err(|_| bad(format!("shape entry {d} too large")))?);
    }
    let offs = obj
        .get("data_offsets")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("missing or non-array `data_offsets`".into()))?;
    if offs.len() != 2 {
        return Err(bad(format!(
            "`data_offsets` has {} entries, expected 2",
            offs.len()
        )));
    }
    let off = |v: &Value| -> Result<usize, String> {
        v.as_u64()
            .and_then(|x| usize::try_from(x).ok())
            .ok_or_else(|| bad(format!("data offset {v} is not a non-negative integer")))
    };
    let (b, e) = (off(&offs[0])?, off(&offs[1])?);
    if e < b {
        return Err(bad(format!(
            "data_offsets [{b}, {e}] end before they begin"
        )));
    }
    let numel = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| bad(format!("shape {shape:?} overflows")))?;
    let nbits = numel
        .checked_mul(dtype.bitsize())
        .ok_or_else(|| bad(format!("shape {shape:?} overflows")))?;
    if nbits % 8 != 0 {
        return Err(bad(format!(
            "shape {shape:?} of {dtype} is not a whole number of bytes"
        )));
    }
    if nbits / 8 != e - b {
        return Err(bad(format!(
            "shape {shape:?} with dtype {dtype} needs {} bytes but data_offsets [{b}, {e}] span {}",
            nbits / 8,
            e - b
        )));
    }
    Ok(TensorInfo {
        name: name.to_string(),
        dtype,
        shape,
        data_offsets: (b, e),
    })
}
