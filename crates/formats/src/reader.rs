//! Memory-mapped, validated safetensors files.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use rayon::prelude::*;
use safetensors::Dtype;

use crate::error::{FormatError, Result};
use crate::header::{self, Header, TensorInfo};

/// Bytes backing a file: a read-only mapping, or an owned buffer (tests, tiny files).
enum Backing {
    Mmap(Mmap),
    Owned(Vec<u8>),
}

impl Backing {
    fn bytes(&self) -> &[u8] {
        match self {
            Backing::Mmap(m) => m,
            Backing::Owned(v) => v,
        }
    }
}

/// One safetensors file, memory-mapped with its header fully validated at open.
///
/// After [`SafetensorsFile::open`] succeeds every tensor's bytes are known to
/// lie inside the file, so [`SafetensorsFile::tensor`] cannot fail except for
/// an unknown name.
pub struct SafetensorsFile {
    path: PathBuf,
    backing: Backing,
    header: Header,
}

impl std::fmt::Debug for SafetensorsFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafetensorsFile")
            .field("path", &self.path)
            .field("tensors", &self.header.tensors.len())
            .finish()
    }
}

impl SafetensorsFile {
    /// Map and validate `path`. Any problem (truncation, bad JSON, offsets out
    /// of range / overlapping / with holes, unknown dtype, shape·dtype not
    /// matching the byte count, duplicate names) is an error naming the file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|e| FormatError::io(&path, e))?;
        let len = file
            .metadata()
            .map_err(|e| FormatError::io(&path, e))?
            .len();
        let backing = if len < 4096 {
            // Tiny (or empty: mmap of length 0 fails) files are simply read.
            Backing::Owned(std::fs::read(&path).map_err(|e| FormatError::io(&path, e))?)
        } else {
            // SAFETY: the mapping is read-only. Like every mmap-based reader
            // (safetensors, candle, transformers) we rely on the file not being
            // truncated or rewritten while it is open.
            let m = unsafe { Mmap::map(&file) }.map_err(|e| FormatError::io(&path, e))?;
            Backing::Mmap(m)
        };
        Self::from_backing(path, backing)
    }

    /// Validate an in-memory file image; `origin` names it in errors.
    pub fn from_bytes(bytes: Vec<u8>, origin: impl Into<PathBuf>) -> Result<Self> {
        Self::from_backing(origin.into(), Backing::Owned(bytes))
    }

    fn from_backing(path: PathBuf, backing: Backing) -> Result<Self> {
        let header =
            header::parse(backing.bytes()).map_err(|msg| FormatError::invalid(&path, msg))?;
        Ok(SafetensorsFile {
            path,
            backing,
            header,
        })
    }

    /// The file this was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor names in data-offset order.
    pub fn names(&self) -> Vec<&str> {
        self.header
            .tensors
            .iter()
            .map(|t| t.name.as_str())
            .collect()
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.header.tensors.len()
    }

    /// True if the file holds no tensor.
    pub fn is_empty(&self) -> bool {
        self.header.tensors.is_empty()
    }

    /// Whether a tensor of that name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.header.index.contains_key(name)
    }

    /// `__metadata__` of the header, if any.
    pub fn metadata(&self) -> Option<&BTreeMap<String, String>> {
        self.header.metadata.as_ref()
    }

    /// Header entry (dtype, shape, offsets) of a tensor.
    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.header
            .index
            .get(name)
            .map(|&i| &self.header.tensors[i])
    }

    /// All header entries in data-offset order.
    pub fn infos(&self) -> &[TensorInfo] {
        &self.header.tensors
    }

    /// Size of the data buffer (sum of all tensor byte counts).
    pub fn data_len(&self) -> usize {
        self.header.data_len
    }

    /// Length of the JSON header in bytes.
    pub fn header_len(&self) -> usize {
        self.header.header_len
    }

    /// The tensor called `name`, or `None`.
    pub fn get(&self, name: &str) -> Option<TensorView<'_>> {
        self.info(name).map(|t| self.view(t))
    }

    /// The tensor called `name`; an error naming the file if absent.
    pub fn tensor(&self, name: &str) -> Result<TensorView<'_>> {
        self.get(name)
            .ok_or_else(|| FormatError::not_found(&self.path, name))
    }

    /// Every tensor, in data-offset order.
    pub fn tensors(&self) -> impl Iterator<Item = TensorView<'_>> {
        self.header.tensors.iter().map(|t| self.view(t))
    }

    fn view<'a>(&'a self, t: &'a TensorInfo) -> TensorView<'a> {
        let start = self.header.data_start();
        let (b, e) = t.data_offsets;
        TensorView {
            file: &self.path,
            name: &t.name,
            dtype: t.dtype,
            shape: &t.shape,
            data: &self.backing.bytes()[start + b..start + e],
        }
    }

    /// Tell the kernel we no longer need the pages of this tensor, so that a
    /// streaming pass over a large model keeps its resident memory near one
    /// tensor instead of growing to the whole mapped file. Purely advisory:
    /// the data is re-read from the file if touched again. No-op for
    /// in-memory files and on non-Unix systems.
    pub fn release(&self, name: &str) {
        #[cfg(unix)]
        if let (Backing::Mmap(m), Some(t)) = (&self.backing, self.info(name)) {
            const PAGE: usize = 4096;
            let begin = self.header.data_start() + t.data_offsets.0;
            let end = self.header.data_start() + t.data_offsets.1;
            // Only whole pages inside the tensor: neighbours stay untouched.
            let b = begin.div_ceil(PAGE) * PAGE;
            let e = end / PAGE * PAGE;
            if e > b {
                // SAFETY: the mapping is a read-only, file-backed mapping; after
                // MADV_DONTNEED its pages are transparently re-read from the
                // file, so no reference into it can observe different data.
                let _ = unsafe {
                    m.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, b, e - b)
                };
            }
        }
    }
}

/// A borrowed view of one tensor's bytes.
#[derive(Debug, Clone, Copy)]
pub struct TensorView<'a> {
    /// File the tensor lives in (for error messages).
    pub file: &'a Path,
    pub name: &'a str,
    pub dtype: Dtype,
    pub shape: &'a [usize],
    /// Raw little-endian bytes, row-major. Not necessarily aligned.
    pub data: &'a [u8],
}

/// Below this many elements a conversion runs on the calling thread.
const PAR_MIN: usize = 1 << 16;

impl<'a> TensorView<'a> {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// True for F32, F16, BF16 and F64.
    pub fn is_float(&self) -> bool {
        matches!(
            self.dtype,
            Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64
        )
    }

    fn wrong_dtype(&self, want: &str) -> FormatError {
        FormatError::tensor(
            self.file,
            self.name,
            format!("dtype {} cannot be converted to {want}", self.dtype),
        )
    }

    /// Decode F32 / F16 / BF16 / F64 to f32 (F64 is rounded to nearest).
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        Ok(match self.dtype {
            Dtype::F32 => convert(self.data, |c: [u8; 4]| f32::from_le_bytes(c)),
            Dtype::F16 => convert(self.data, |c: [u8; 2]| f16::from_le_bytes(c).to_f32()),
            Dtype::BF16 => convert(self.data, |c: [u8; 2]| bf16::from_le_bytes(c).to_f32()),
            Dtype::F64 => convert(self.data, |c: [u8; 8]| f64::from_le_bytes(c) as f32),
            _ => return Err(self.wrong_dtype("f32")),
        })
    }

    /// Decode to bf16; wider types are rounded to nearest even.
    pub fn to_bf16(&self) -> Result<Vec<bf16>> {
        Ok(match self.dtype {
            Dtype::BF16 => convert(self.data, bf16::from_le_bytes),
            Dtype::F32 => convert(self.data, |c: [u8; 4]| {
                bf16::from_f32(f32::from_le_bytes(c))
            }),
            Dtype::F16 => convert(self.data, |c: [u8; 2]| {
                bf16::from_f32(f16::from_le_bytes(c).to_f32())
            }),
            Dtype::F64 => convert(self.data, |c: [u8; 8]| {
                bf16::from_f64(f64::from_le_bytes(c))
            }),
            _ => return Err(self.wrong_dtype("bf16")),
        })
    }

    /// Decode to f16; wider types are rounded to nearest even.
    pub fn to_f16(&self) -> Result<Vec<f16>> {
        Ok(match self.dtype {
            Dtype::F16 => convert(self.data, f16::from_le_bytes),
            Dtype::F32 => convert(self.data, |c: [u8; 4]| f16::from_f32(f32::from_le_bytes(c))),
            Dtype::BF16 => convert(self.data, |c: [u8; 2]| {
                f16::from_f32(bf16::from_le_bytes(c).to_f32())
            }),
            Dtype::F64 => convert(self.data, |c: [u8; 8]| f16::from_f64(f64::from_le_bytes(c))),
            _ => return Err(self.wrong_dtype("f16")),
        })
    }

    /// The bytes of a U8 tensor.
    pub fn as_u8(&self) -> Result<&'a [u8]> {
        match self.dtype {
            Dtype::U8 => Ok(self.data),
            _ => Err(self.wrong_dtype("u8")),
        }
    }

    /// Decode I64 (token ids in reference files) to i64.
    pub fn to_i64(&self) -> Result<Vec<i64>> {
        match self.dtype {
            Dtype::I64 => Ok(convert(self.data, i64::from_le_bytes)),
            _ => Err(self.wrong_dtype("i64")),
        }
    }
}

/// Decode little-endian `N`-byte elements, in parallel for large tensors.
fn convert<const N: usize, T: Send>(data: &[u8], f: impl Fn([u8; N]) -> T + Sync) -> Vec<T> {
    let one = |c: &[u8]| f(c.try_into().expect("chunk of N bytes"));
    if data.len() / N < PAR_MIN {
        data.chunks_exact(N).map(one).collect()
    } else {
        let mut out = Vec::with_capacity(data.len() / N);
        data.par_chunks_exact(N).map(one).collect_into_vec(&mut out);
        out
    }
}
