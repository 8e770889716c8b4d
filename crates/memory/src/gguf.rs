//! GGUF: ggml tensor types (block sizes) and a header-only reader.
//!
//! The reader parses magic, version, the metadata key/values (keeping scalars
//! and strings, skipping arrays) and the tensor infos, then stops: tensor data
//! is never read. It is deliberately minimal (the full reader/dequantizer is
//! `qlora-gguf`); this crate must not depend on candle.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use serde::Serialize;

use crate::MemoryError;

/// A ggml tensor type: id, name, elements per block, bytes per block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct GgmlType {
    pub id: u32,
    pub name: &'static str,
    pub block: u64,
    pub block_bytes: u64,
}

/// ggml types with their block layouts (ggml-common.h block structs).
pub const GGML_TYPES: &[GgmlType] = &[
    t(0, "f32", 1, 4),
    t(1, "f16", 1, 2),
    t(2, "q4_0", 32, 18),
    t(3, "q4_1", 32, 20),
    t(6, "q5_0", 32, 22),
    t(7, "q5_1", 32, 24),
    t(8, "q8_0", 32, 34),
    t(9, "q8_1", 32, 36),
    t(10, "q2_k", 256, 84),
    t(11, "q3_k", 256, 110),
    t(12, "q4_k", 256, 144),
    t(13, "q5_k", 256, 176),
    t(14, "q6_k", 256, 210),
    t(15, "q8_k", 256, 292),
    t(16, "iq2_xxs", 256, 66),
    t(17, "iq2_xs", 256, 74),
    t(18, "iq3_xxs", 256, 98),
    t(19, "iq1_s", 256, 50),
    t(20, "iq4_nl", 32, 18),
    t(21, "iq3_s", 256, 110),
    t(22, "iq2_s", 256, 82),
    t(23, "iq4_xs", 256, 136),
    t(24, "i8", 1, 1),
    t(25, "i16", 1, 2),
    t(26, "i32", 1, 4),
    t(27, "i64", 1, 8),
    t(28, "f64", 1, 8),
    t(29, "iq1_m", 256, 56),
    t(30, "bf16", 1, 2),
    t(34, "tq1_0", 256, 54),
    t(35, "tq2_0", 256, 66),
    t(39, "mxfp4", 32, 17),
];

const fn t(id: u32, name: &'static str, block: u64, block_bytes: u64) -> GgmlType {
    GgmlType {
        id,
        name,
        block,
        block_bytes,
    }
}

/// The GGUF types `qlora size` reports for every model ("pure" files).
pub const REPORTED: &[&str] = &[
    "f16", "q8_0", "q6_k", "q5_k", "q5_0", "q4_k", "q4_0", "iq4_xs", "q3_k", "q2_k",
];

pub fn by_id(id: u32) -> Option<GgmlType> {
    GGML_TYPES.iter().copied().find(|t| t.id == id)
}

pub fn by_name(name: &str) -> Option<GgmlType> {
    let n = name.to_ascii_lowercase();
    GGML_TYPES.iter().copied().find(|t| t.name == n)
}

impl GgmlType {
    /// Bytes of a tensor of `numel` elements (rows are whole blocks in valid files).
    pub fn bytes(&self, numel: u64) -> u64 {
        numel.div_ceil(self.block) * self.block_bytes
    }

    /// llama.cpp's fallback when a row (`ne0`) is not a multiple of the block:
    /// k-quants and i-quants → a 32-block type, and then `f16` if even that
    /// does not divide (`llama_tensor_get_type` in llama-quant.cpp).
    pub fn for_row(self, row: u64) -> GgmlType {
        if row.is_multiple_of(self.block) {
            return self;
        }
        let fb = match self.name {
            "q4_k" => "q5_0",
            "q5_k" => "q5_1",
            "q6_k" => "q8_0",
            "q2_k" | "q3_k" | "iq4_xs" | "iq2_xxs" | "iq2_xs" | "iq2_s" | "iq3_xxs" | "iq3_s"
            | "iq1_s" | "iq1_m" | "tq1_0" | "tq2_0" => "iq4_nl",
            _ => "f16",
        };
        let fb = by_name(fb).expect("fallback type listed");
        if row.is_multiple_of(fb.block) {
            fb
        } else {
            by_name("f16").expect("f16 listed")
        }
    }
}

/// One tensor info of a GGUF file (`dims` in ggml order: `ne0` = row length first).
#[derive(Debug, Clone, Serialize)]
pub struct GgufTensor {
    pub name: String,
    pub dims: Vec<u64>,
    pub ggml_type: u32,
    pub offset: u64,
}

impl GgufTensor {
    pub fn numel(&self) -> u64 {
        self.dims.iter().product()
    }
    /// Shape in PyTorch order (`[rows, ne0]`).
    pub fn torch_shape(&self) -> Vec<u64> {
        self.dims.iter().rev().copied().collect()
    }
}

/// Metadata values kept by the header reader.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum MetaValue {
    Int(i128),
    Float(f64),
    Bool(bool),
    Str(String),
    /// Arrays are skipped; only their length is kept.
    Array(u64),
}

/// A parsed GGUF header.
#[derive(Debug, Clone)]
pub struct GgufHeader {
    pub path: String,
    pub version: u32,
    pub metadata: BTreeMap<String, MetaValue>,
    pub tensors: Vec<GgufTensor>,
    pub file_len: u64,
}

impl GgufHeader {
    pub fn meta_u64(&self, key: &str) -> Option<u64> {
        match self.metadata.get(key)? {
            MetaValue::Int(i) => u64::try_from(*i).ok(),
            _ => None,
        }
    }
    pub fn meta_str(&self, key: &str) -> Option<&str> {
        match self.metadata.get(key)? {
            MetaValue::Str(s) => Some(s),
            _ => None,
        }
    }
}

struct R<'a> {
    r: BufReader<File>,
    path: &'a str,
}

impl R<'_> {
    fn bad(&self, msg: impl Into<String>) -> MemoryError {
        MemoryError::BadFile {
            path: self.path.to_string(),
            msg: msg.into(),
        }
    }
    fn bytes<const N: usize>(&mut self) -> Result<[u8; N], MemoryError> {
        let mut b = [0u8; N];
        self.r
            .read_exact(&mut b)
            .map_err(|_| self.bad("truncated GGUF header"))?;
        Ok(b)
    }
    fn u32(&mut self) -> Result<u32, MemoryError> {
        Ok(u32::from_le_bytes(self.bytes()?))
    }
    fn u64(&mut self) -> Result<u64, MemoryError> {
        Ok(u64::from_le_bytes(self.bytes()?))
    }
    fn string(&mut self) -> Result<String, MemoryError> {
        let n = self.u64()?;
        if n > 1 << 24 {
            return Err(self.bad(format!("string of {n} bytes in the header")));
        }
        let mut b = vec![0u8; n as usize];
        self.r
            .read_exact(&mut b)
            .map_err(|_| self.bad("truncated GGUF header"))?;
        String::from_utf8(b).map_err(|_| self.bad("non-UTF-8 string in the header"))
    }
    fn value(&mut self, ty: u32) -> Result<MetaValue, MemoryError> {
        Ok(match ty {
            0 => MetaValue::Int(self.bytes::<1>()?[0] as i128),
            1 => MetaValue::Int(self.bytes::<1>()?[0] as i8 as i128),
            2 => MetaValue::Int(u16::from_le_bytes(self.bytes()?) as i128),
            3 => MetaValue::Int(i16::from_le_bytes(self.bytes()?) as i128),
            4 => MetaValue::Int(self.u32()? as i128),
            5 => MetaValue::Int(i32::from_le_bytes(self.bytes()?) as i128),
            6 => MetaValue::Float(f32::from_le_bytes(self.bytes()?) as f64),
            7 => MetaValue::Bool(self.bytes::<1>()?[0] != 0),
            8 => MetaValue::Str(self.string()?),
            9 => {
                let ety = self.u32()?;
                let n = self.u64()?;
                for _ in 0..n {
                    if ety == 9 {
                        return Err(self.bad("nested arrays are not supported"));
                    }
                    self.value(ety)?;
                }
                MetaValue::Array(n)
            }
            10 => MetaValue::Int(self.u64()? as i128),
            11 => MetaValue::Int(i64::from_le_bytes(self.bytes()?) as i128),
            12 => MetaValue::Float(f64::from_le_bytes(self.bytes()?)),
            other => return Err(self.bad(format!("unknown metadata value type {other}"))),
        })
    }
}

/// Read a GGUF file's header (metadata and tensor infos), never its data.
pub fn read_header(path: &Path) -> Result<GgufHeader, MemoryError> {
    let p = path.display().to_string();
    let f = File::open(path).map_err(|e| MemoryError::Io {
        path: p.clone(),
        source: e,
    })?;
    let file_len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let mut r = R {
        r: BufReader::new(f),
        path: &p,
    };
    let magic: [u8; 4] = r.bytes()?;
    if &magic != b"GGUF" {
        return Err(r.bad("not a GGUF file (magic is not \"GGUF\")"));
    }
    let version = r.u32()?;
    if !(2..=3).contains(&version) {
        return Err(r.bad(format!("GGUF version {version} (supported: 2, 3)")));
    }
    let n_tensors = r.u64()?;
    let n_kv = r.u64()?;
    if n_tensors > 1 << 24 || n_kv > 1 << 24 {
        return Err(r.bad("implausible tensor or metadata count"));
    }
    let mut metadata = BTreeMap::new();
    for _ in 0..n_kv {
        let k = r.string()?;
        let ty = r.u32()?;
        let v = r.value(ty)?;
        metadata.insert(k, v);
    }
    let mut tensors = Vec::with_capacity(n_tensors as usize);
    for _ in 0..n_tensors {
        let name = r.string()?;
        let nd = r.u32()?;
        if nd > 4 {
            return Err(r.bad(format!("tensor {name}: {nd} dimensions")));
        }
        let dims = (0..nd).map(|_| r.u64()).collect::<Result<Vec<_>, _>>()?;
        let ggml_type = r.u32()?;
        if by_id(ggml_type).is_none() {
            return Err(r.bad(format!("tensor {name}: unknown ggml type {ggml_type}")));
        }
        let offset = r.u64()?;
        tensors.push(GgufTensor {
            name,
            dims,
            ggml_type,
            offset,
        });
    }
    Ok(GgufHeader {
        path: p,
        version,
        metadata,
        tensors,
        file_len,
    })
}

/// Write a minimal GGUF header + zero data (for tests): metadata strings and u32s only.
#[doc(hidden)]
pub fn write_test_file(
    path: &Path,
    meta: &[(&str, MetaValue)],
    tensors: &[(&str, Vec<u64>, u32)],
) -> std::io::Result<()> {
    let mut b: Vec<u8> = Vec::new();
    let s = |b: &mut Vec<u8>, x: &str| {
        b.extend((x.len() as u64).to_le_bytes());
        b.extend(x.as_bytes());
    };
    b.extend(b"GGUF");
    b.extend(3u32.to_le_bytes());
    b.extend((tensors.len() as u64).to_le_bytes());
    b.extend((meta.len() as u64).to_le_bytes());
    for (k, v) in meta {
        s(&mut b, k);
        match v {
            MetaValue::Str(x) => {
                b.extend(8u32.to_le_bytes());
                s(&mut b, x);
            }
            MetaValue::Int(i) => {
                b.extend(4u32.to_le_bytes());
                b.extend((*i as u32).to_le_bytes());
            }
            _ => unimplemented!("test writer supports strings and u32"),
        }
    }
    let mut off = 0u64;
    let mut sizes = Vec::new();
    for (name, dims, ty) in tensors {
        s(&mut b, name);
        b.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            b.extend(d.to_le_bytes());
        }
        b.extend(ty.to_le_bytes());
        b.extend(off.to_le_bytes());
        let n = by_id(*ty).expect("known type").bytes(dims.iter().product());
        sizes.push(n);
        off += n.next_multiple_of(32);
    }
    b.resize(b.len().next_multiple_of(32), 0);
    b.resize(b.len() + off as usize, 0);
    std::fs::write(path, b)
}
