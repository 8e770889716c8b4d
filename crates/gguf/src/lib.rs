//! GGUF files: reading, validating and dequantizing, without candle.
//!
//! Entry points:
//! - [`GgufFile::read_header`]: metadata and tensor infos (names, ggml types,
//!   shapes, byte sizes) without reading the tensor data. This is what a size
//!   calculator needs; [`GgmlType::block_size`] / [`GgmlType::type_size`] /
//!   [`GgmlType::bytes_for`] give the byte tables for every ggml type.
//! - [`GgufFile::open`]: the same plus a read-only memory map of the file, with
//!   [`GgufFile::tensor_data`] (raw bytes) and [`GgufFile::dequantize`] (f32).
//! - [`llama`]: the llama-architecture mapping to a `qlora_config::ModelConfig`
//!   and Hugging Face tensor names/layout (including the inverse of llama.cpp's
//!   Q/K row permutation), one tensor at a time.
//!
//! - [`export_meta`]: the metadata of a llama-family export: hyper-parameters from a
//!   `ModelConfig`, and the tokenizer (copied from a GGUF, or converted from an HF folder).
//! - [`recipe`]: the ggml type of each tensor of an export (llama.cpp's `llama-quantize`
//!   recipes: q4_0, q4_k, q4_k_m, q5_k_m, ...) and a tensor's encoding error.
//! - [`writer`]: GGUF output, in memory ([`writer::GgufWriter`]) or streamed tensor by
//!   tensor to a temporary file renamed at the end ([`writer::StreamWriter`]).
//! - `quantize` (feature `quantize`): f32 → ggml block types through candle's ports of
//!   llama.cpp's reference quantizers.
//!
//! All errors name the file, and the tensor or metadata key involved.

use std::path::Path;
use std::sync::Arc;

pub mod dequant;
mod error;
pub mod export_meta;
pub mod llama;
mod metadata;
#[cfg(feature = "quantize")]
pub mod quantize;
mod reader;
pub mod recipe;
mod types;
pub mod writer;

pub use error::{GgufError, Result};
pub use metadata::{value_type, MetaValue, Metadata};
pub use reader::{
    GgufHeader, TensorInfo, DEFAULT_ALIGNMENT, MAX_DIMS, META_ALLOC_BASE, META_ALLOC_PER_FILE_BYTE,
};
pub use types::{GgmlType, ALL_TYPES};

/// An opened GGUF file: the parsed header and a memory map of the whole file.
pub struct GgufFile {
    header: GgufHeader,
    mmap: Arc<memmap2::Mmap>,
}

/// A tensor's stored bytes that keep the file's memory map alive on their own
/// ([`GgufFile::tensor_bytes_shared`]): what a model holding a GGUF's blocks as
/// they are (`--quant native`) keeps instead of a copy, so the weights stay in
/// the page cache's pages of the file.
#[derive(Clone)]
pub struct MappedBytes {
    map: Arc<memmap2::Mmap>,
    start: usize,
    len: usize,
}

impl MappedBytes {
    pub fn as_slice(&self) -> &[u8] {
        &self.map[self.start..self.start + self.len]
    }
}

impl std::ops::Deref for MappedBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl std::fmt::Debug for MappedBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MappedBytes({} bytes at {})", self.len, self.start)
    }
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.header.path)
            .field("version", &self.header.version)
            .field("tensors", &self.header.tensors.len())
            .field("metadata", &self.header.metadata.len())
            .finish()
    }
}

fn map(path: &Path) -> Result<memmap2::Mmap> {
    let io = |source| GgufError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    // SAFETY: the map is read-only and private to this process; like every mmap-based
    // model loader we rely on the file not being truncated while it is open.
    unsafe { memmap2::Mmap::map(&file) }.map_err(io)
}

impl GgufFile {
    /// Parse and validate the header of `path` (metadata + tensor infos) without reading
    /// any tensor data. Tensor ranges are still checked against the file length, so a
    /// truncated file is reported here.
    pub fn read_header(path: impl AsRef<Path>) -> Result<GgufHeader> {
        let path = path.as_ref();
        // The map only pages in what the parser touches: the header, not the weights.
        let mmap = map(path)?;
        GgufHeader::parse(path, &mmap)
    }

    /// Open, validate and memory-map a GGUF file.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile> {
        let path = path.as_ref();
        let mmap = map(path)?;
        let header = GgufHeader::parse(path, &mmap)?;
        Ok(GgufFile {
            header,
            mmap: Arc::new(mmap),
        })
    }

    pub fn header(&self) -> &GgufHeader {
        &self.header
    }

    pub fn path(&self) -> &Path {
        &self.header.path
    }

    pub fn metadata(&self) -> &Metadata {
        &self.header.metadata
    }

    pub fn tensors(&self) -> &[TensorInfo] {
        &self.header.tensors
    }

    pub fn tensor_info(&self, name: &str) -> Result<&TensorInfo> {
        self.header
            .tensor(name)
            .ok_or_else(|| GgufError::MissingTensor {
                path: self.header.path.clone(),
                tensor: name.to_string(),
            })
    }

    /// The raw stored bytes of a tensor (ranges were validated when opening).
    pub fn tensor_data(&self, name: &str) -> Result<&[u8]> {
        let t = self.tensor_info(name)?;
        let start = (self.header.data_offset + t.offset) as usize;
        Ok(&self.mmap[start..start + t.n_bytes as usize])
    }

    /// [`Self::tensor_data`] as a handle that shares (and keeps alive) the memory map.
    pub fn tensor_bytes_shared(&self, name: &str) -> Result<MappedBytes> {
        let t = self.tensor_info(name)?;
        Ok(MappedBytes {
            map: self.mmap.clone(),
            start: (self.header.data_offset + t.offset) as usize,
            len: t.n_bytes as usize,
        })
    }

    /// The tensor as f32 in row-major order ([`TensorInfo::shape`]), exactly as the stored
    /// type decodes (no layout changes; see [`llama`] for the HF mapping).
    pub fn dequantize(&self, name: &str) -> Result<Vec<f32>> {
        let t = self.tensor_info(name)?;
        let data = self.tensor_data(name)?;
        dequant::dequantize(t.ggml_type, data, t.n_elements() as usize).map_err(|e| match e {
            dequant::DequantError::Unsupported(ty) => GgufError::UnsupportedType {
                path: self.header.path.clone(),
                tensor: name.to_string(),
                ty,
            },
            dequant::DequantError::Size { .. } => GgufError::Tensor {
                path: self.header.path.clone(),
                tensor: name.to_string(),
                msg: e.to_string(),
            },
        })
    }
}
