//! One error type for everything this crate reads or writes.
//!
//! Every variant carries the file it is about, so a message printed by the
//! CLI always tells the user *which* file is broken and *what* is wrong with it.

use std::path::Path;

/// Errors from reading, validating or writing safetensors / bnb-4bit files.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// An operating-system error on a file or folder.
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The file (or folder) exists but its content is not acceptable.
    #[error("{path}: {msg}")]
    Invalid { path: String, msg: String },
    /// One tensor (or bnb key) of a file is not acceptable.
    #[error("{path}: tensor `{name}`: {msg}")]
    Tensor {
        path: String,
        name: String,
        msg: String,
    },
    /// A tensor that was asked for is not in the file / model.
    #[error("{path}: no tensor named `{name}`")]
    NotFound { path: String, name: String },
}

impl FormatError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        FormatError::Io {
            path: path.display().to_string(),
            source,
        }
    }
    pub(crate) fn invalid(path: &Path, msg: impl Into<String>) -> Self {
        FormatError::Invalid {
            path: path.display().to_string(),
            msg: msg.into(),
        }
    }
    pub(crate) fn tensor(path: &Path, name: &str, msg: impl Into<String>) -> Self {
        FormatError::Tensor {
            path: path.display().to_string(),
            name: name.to_string(),
            msg: msg.into(),
        }
    }
    pub(crate) fn not_found(path: &Path, name: &str) -> Self {
        FormatError::NotFound {
            path: path.display().to_string(),
            name: name.to_string(),
        }
    }
}

/// Result alias for this crate.
pub type Result<T, E = FormatError> = std::result::Result<T, E>;
