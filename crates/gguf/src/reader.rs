//! Parsing and validating a GGUF file (versions 2 and 3, little-endian).
//!
//! Layout: magic `GGUF`, u32 version, u64 tensor count, u64 metadata count,
//! the metadata key/values, the tensor infos (name, n_dims, dims innermost
//! first, type id, offset relative to the data section), padding to
//! `general.alignment` (default 32), then the tensor data.
//!
//! Everything is bounds-checked against the file length before anything is
//! allocated, so a corrupt or truncated file gives an error naming the file
//! (and the tensor), never a panic or a huge allocation.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use crate::error::{GgufError, Result};
use crate::metadata::{value_type, MetaValue, Metadata};
use crate::GgmlType;

/// Alignment of the data section and of every tensor when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml's maximum tensor rank.
pub const MAX_DIMS: usize = 4;
const MAX_ARRAY_DEPTH: usize = 4;
/// Metadata is held as [`MetaValue`]s (32 bytes each however small in the
/// file): what the parser may allocate for it is bounded by this fixed
/// allowance plus [`META_ALLOC_PER_FILE_BYTE`] bytes per byte of the file, so
/// memory stays proportional to the file whatever its arrays claim. Real
/// files use a small fraction (a 150k-token vocabulary takes ~15 MB).
pub const META_ALLOC_BASE: u64 = 64 << 20;
/// See [`META_ALLOC_BASE`].
pub const META_ALLOC_PER_FILE_BYTE: u64 = 4;

/// The fewest bytes one value of GGUF type `ty` takes in a file.
fn min_value_bytes(ty: u32) -> u64 {
    use value_type as t;
    match ty {
        t::U8 | t::I8 | t::BOOL => 1,
        t::U16 | t::I16 => 2,
        t::U32 | t::I32 | t::F32 => 4,
        t::U64 | t::I64 | t::F64 | t::STRING => 8,
        // element type + count
        t::ARRAY => 12,
        // unknown types are refused when the first element is read
        _ => 1,
    }
}

/// One tensor's description from the header.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the innermost (contiguous) dimension.
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Offset of the data relative to the start of the data section.
    pub offset: u64,
    /// Exact byte length of the data.
    pub n_bytes: u64,
}

impl TensorInfo {
    /// Row-major shape as PyTorch / safetensors write it (ggml dims reversed):
    /// a GGUF `[in, out]` linear weight is `[out, in]` here.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// Everything before the tensor data: what `qlora size` needs, without touching the weights.
#[derive(Debug, Clone)]
pub struct GgufHeader {
    pub path: PathBuf,
    /// GGUF format version (2 or 3).
    pub version: u32,
    pub metadata: Metadata,
    /// Tensor infos in file order.
    pub tensors: Vec<TensorInfo>,
    /// `general.alignment` or 32.
    pub alignment: u64,
    /// Absolute file offset of the data section.
    pub data_offset: u64,
    /// File length in bytes.
    pub file_size: u64,
}

impl GgufHeader {
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// `general.architecture`, e.g. "llama".
    pub fn architecture(&self) -> Result<&str> {
        self.metadata.req_str(&self.path, "general.architecture")
    }

    /// Sum of all tensor data bytes.
    pub fn tensor_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.n_bytes).sum()
    }

    /// Parse a header from the whole file contents (`bytes` must be the full file so that
    /// tensor ranges can be validated against its length).
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<GgufHeader> {
        Parser {
            path,
            bytes,
            pos: 0,
            alloc_left: META_ALLOC_BASE
                .saturating_add(META_ALLOC_PER_FILE_BYTE.saturating_mul(bytes.len() as u64)),
        }
        .header()
    }
}

struct Parser<'a> {
    path: &'a Path,
    bytes: &'a [u8],
    pos: usize,
    /// Bytes the metadata may still allocate (see [`META_ALLOC_BASE`]).
    alloc_left: u64,
}

impl<'a> Parser<'a> {
    fn malformed(&self, msg: impl Into<String>) -> GgufError {
        GgufError::Malformed {
            path: self.path.to_path_buf(),
            msg: msg.into(),
        }
    }

    fn take(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        let remaining = (self.bytes.len() - self.pos) as u64;
        if n > remaining {
            return Err(GgufError::Truncated {
                path: self.path.to_path_buf(),
                what: what(),
                offset: self.pos as u64,
                needed: n,
                len: self.bytes.len() as u64,
            });
        }
        let s = &self.bytes[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn arr<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N]> {
        Ok(self
            .take(N as u64, what)?
            .try_into()
            .expect("length checked"))
    }
    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        Ok(u32::from_le_bytes(self.arr(what)?))
    }
    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        Ok(u64::from_le_bytes(self.arr(what)?))
    }

    /// Account for `n` bytes of metadata held in memory.
    fn charge(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<()> {
        if n > self.alloc_left {
            return Err(self.malformed(format!(
                "{}: the metadata would take more than {} MiB of memory for a {}-byte file \
                 (arrays too large for the file)",
                what(),
                (META_ALLOC_BASE + META_ALLOC_PER_FILE_BYTE * self.bytes.len() as u64) >> 20,
                self.bytes.len()
            )));
        }
        self.alloc_left -= n;
        Ok(())
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String> {
        let len = self.u64(what)?;
        let raw = self.take(len, what)?;
        self.charge(len, what)?;
        String::from_utf8(raw.to_vec())
            .map_err(|_| self.malformed(format!("{}: string is not valid UTF-8", what())))
    }

    fn value(&mut self, ty: u32, what: &dyn Fn() -> String, depth: usize) -> Result<MetaValue> {
        use value_type as t;
        Ok(match ty {
            t::U8 => MetaValue::U8(self.arr::<1>(what)?[0]),
            t::I8 => MetaValue::I8(self.arr::<1>(what)?[0] as i8),
            t::U16 => MetaValue::U16(u16::from_le_bytes(self.arr(what)?)),
            t::I16 => MetaValue::I16(i16::from_le_bytes(self.arr(what)?)),
            t::U32 => MetaValue::U32(self.u32(what)?),
            t::I32 => MetaValue::I32(i32::from_le_bytes(self.arr(what)?)),
            t::F32 => MetaValue::F32(f32::from_le_bytes(self.arr(what)?)),
            t::BOOL => match self.arr::<1>(what)?[0] {
                0 => MetaValue::Bool(false),
                1 => MetaValue::Bool(true),
                b => return Err(self.malformed(format!("{}: bool byte {b}", what()))),
            },
            t::STRING => MetaValue::String(self.string(what)?),
            t::U64 => MetaValue::U64(self.u64(what)?),
            t::I64 => MetaValue::I64(i64::from_le_bytes(self.arr(what)?)),
            t::F64 => MetaValue::F64(f64::from_le_bytes(self.arr(what)?)),
            t::ARRAY => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.malformed(format!("{}: arrays nested too deeply", what())));
                }
                let elem = self.u32(what)?;
                let n = self.u64(what)?;
                // Refuse counts the rest of the file cannot hold (each element
                // takes at least `min_value_bytes`), and counts whose values would
                // exceed the allocation allowance, before allocating anything.
                let remaining = (self.bytes.len() - self.pos) as u64;
                let needed = n.saturating_mul(min_value_bytes(elem));
                if needed > remaining {
                    return Err(GgufError::Truncated {
                        path: self.path.to_path_buf(),
                        what: format!("{} ({n} array elements)", what()),
                        offset: self.pos as u64,
                        needed,
                        len: self.bytes.len() as u64,
                    });
                }
                self.charge(
                    n.saturating_mul(std::mem::size_of::<MetaValue>() as u64),
                    what,
                )?;
                let mut out = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    out.push(self.value(elem, what, depth + 1)?);
                }
                if out.is_empty() {
                    MetaValue::EmptyArray(elem)
                } else {
                    MetaValue::Array(out)
                }
            }
            other => return Err(self.malformed(format!("{}: unknown value type {other}", what()))),
        })
    }

    fn header(mut self) -> Result<GgufHeader> {
        let path = self.path.to_path_buf();
        let magic: [u8; 4] = self.arr(&|| "the magic bytes".into())?;
        if &magic != b"GGUF" {
            return Err(GgufError::BadMagic { path, found: magic });
        }
        let version = self.u32(&|| "the version".into())?;
        if version != 2 && version != 3 {
            if version.swap_bytes() == 2 || version.swap_bytes() == 3 {
                return Err(GgufError::Unsupported {
                    path,
                    msg: "big-endian GGUF files are not supported".into(),
                });
            }
            return Err(GgufError::Version { path, version });
        }
        let n_tensors = self.u64(&|| "the tensor count".into())?;
        let n_kv = self.u64(&|| "the metadata count".into())?;
        let remaining = (self.bytes.len() - self.pos) as u64;
        // A KV takes >= 12 bytes (key length + type), a tensor info >= 24.
        if n_kv.saturating_mul(12) > remaining || n_tensors.saturating_mul(24) > remaining {
            return Err(GgufError::Truncated {
                path,
                what: format!("{n_kv} metadata entries and {n_tensors} tensor infos"),
                offset: self.pos as u64,
                needed: n_kv
                    .saturating_mul(12)
                    .saturating_add(n_tensors.saturating_mul(24)),
                len: self.bytes.len() as u64,
            });
        }

        self.charge(
            n_kv.saturating_mul(std::mem::size_of::<(String, MetaValue)>() as u64),
            &|| "the metadata entries".into(),
        )?;
        let mut entries = Vec::with_capacity(n_kv as usize);
        let mut keys = HashSet::new();
        for i in 0..n_kv {
            let key = self.string(&|| format!("metadata key #{i}"))?;
            let what = || format!("metadata value `{key}`");
            let ty = self.u32(&what)?;
            let v = self.value(ty, &what, 0)?;
            if !keys.insert(key.clone()) {
                return Err(self.malformed(format!("duplicate metadata key `{key}`")));
            }
            entries.push((key, v));
        }
        let metadata = Metadata::from_entries(entries);

        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(MetaValue::U32(a)) if *a > 0 && a.is_power_of_two() => *a as u64,
            Some(v) => {
                return Err(GgufError::Metadata {
                    path,
                    key: "general.alignment".into(),
                    msg: format!("must be a power-of-two u32, got {v}"),
                })
            }
        };

        self.charge(
            n_tensors.saturating_mul(std::mem::size_of::<TensorInfo>() as u64),
            &|| "the tensor infos".into(),
        )?;
        let mut tensors = Vec::with_capacity(n_tensors as usize);
        let mut names = HashSet::new();
        for i in 0..n_tensors {
            let name = self.string(&|| format!("tensor info #{i} name"))?;
            let what = || format!("tensor info `{name}`");
            let terr = |msg: String| GgufError::Tensor {
                path: path.clone(),
                tensor: name.clone(),
                msg,
            };
            let n_dims = self.u32(&what)? as usize;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(terr(format!(
                    "{n_dims} dimensions (allowed 1..={MAX_DIMS})"
                )));
            }
            let mut dims = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                dims.push(self.u64(&what)?);
            }
            let type_id = self.u32(&what)?;
            let offset = self.u64(&what)?;
            let ggml_type = GgmlType::from_id(type_id).ok_or(GgufError::UnknownTensorType {
                path: path.clone(),
                tensor: name.clone(),
                id: type_id,
            })?;
            if dims.iter().any(|&d| d > i64::MAX as u64) {
                return Err(terr(format!("dimension out of range in {dims:?}")));
            }
            let n_elements = dims
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .ok_or_else(|| terr(format!("element count of {dims:?} overflows")))?;
            if dims[0] % ggml_type.block_size() as u64 != 0 {
                return Err(terr(format!(
                    "innermost dimension {} is not a multiple of the {} block size {}",
                    dims[0],
                    ggml_type,
                    ggml_type.block_size()
                )));
            }
            let n_bytes = ggml_type
                .bytes_for(n_elements)
                .ok_or_else(|| terr(format!("byte size of {dims:?} overflows")))?;
            if offset % alignment != 0 {
                return Err(terr(format!(
                    "data offset {offset} is not a multiple of the alignment {alignment}"
                )));
            }
            if !names.insert(name.clone()) {
                return Err(terr("duplicate tensor name".into()));
            }
            tensors.push(TensorInfo {
                name,
                dims,
                ggml_type,
                offset,
                n_bytes,
            });
        }

        let data_offset = (self.pos as u64).div_ceil(alignment) * alignment;
        let file_size = self.bytes.len() as u64;
        // An empty model may end right after the header without padding.
        let data_len = file_size.saturating_sub(data_offset);
        for t in &tensors {
            let end = t.offset.checked_add(t.n_bytes);
            if end.is_none_or(|e| e > data_len) {
                return Err(GgufError::Tensor {
                    path: path.clone(),
                    tensor: t.name.clone(),
                    msg: format!(
                        "data [{}, +{}) runs past the end of the file (data section is {} bytes from offset {}): file truncated?",
                        t.offset, t.n_bytes, data_len, data_offset
                    ),
                });
            }
        }
        let mut by_offset: Vec<&TensorInfo> = tensors.iter().collect();
        by_offset.sort_by_key(|t| t.offset);
        for w in by_offset.windows(2) {
            if w[0].n_bytes > 0 && w[0].offset + w[0].n_bytes > w[1].offset {
                return Err(GgufError::Tensor {
                    path: path.clone(),
                    tensor: w[1].name.clone(),
                    msg: format!("data overlaps tensor `{}`", w[0].name),
                });
            }
        }
        Ok(GgufHeader {
            path,
            version,
            metadata,
            tensors,
            alignment,
            data_offset,
            file_size,
        })
    }
}
