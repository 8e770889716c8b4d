//! Errors: every variant names the file, and the tensor or key when one is involved.

use std::path::PathBuf;

use crate::GgmlType;

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a GGUF file (magic bytes {found:02x?}, expected \"GGUF\")")]
    BadMagic { path: PathBuf, found: [u8; 4] },
    #[error("{path}: unsupported GGUF version {version} (supported: 2, 3)")]
    Version { path: PathBuf, version: u32 },
    #[error("{path}: truncated GGUF: needed {needed} bytes at offset {offset} for {what}, file has {len}")]
    Truncated {
        path: PathBuf,
        what: String,
        offset: u64,
        needed: u64,
        len: u64,
    },
    #[error("{path}: malformed GGUF header: {msg}")]
    Malformed { path: PathBuf, msg: String },
    #[error("{path}: tensor `{tensor}`: unknown ggml tensor type id {id}")]
    UnknownTensorType {
        path: PathBuf,
        tensor: String,
        id: u32,
    },
    #[error("{path}: tensor `{tensor}`: {msg}")]
    Tensor {
        path: PathBuf,
        tensor: String,
        msg: String,
    },
    #[error("{path}: tensor `{tensor}`: cannot dequantize ggml type {ty} (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K)")]
    UnsupportedType {
        path: PathBuf,
        tensor: String,
        ty: GgmlType,
    },
    #[error("{path}: tensor `{tensor}` not found")]
    MissingTensor { path: PathBuf, tensor: String },
    #[error("{path}: metadata key `{key}`: {msg}")]
    Metadata {
        path: PathBuf,
        key: String,
        msg: String,
    },
    #[error("{path}: {msg}")]
    Unsupported { path: PathBuf, msg: String },
    #[error("{path}: {source}")]
    Config {
        path: PathBuf,
        #[source]
        source: qlora_config::ConfigError,
    },
}

pub type Result<T, E = GgufError> = std::result::Result<T, E>;
