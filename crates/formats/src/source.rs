//! Anything tensors can be looked up in: one file or a whole model folder.

use std::path::Path;

use crate::model_files::ModelFiles;
use crate::reader::{SafetensorsFile, TensorView};

/// A name → tensor lookup (a [`SafetensorsFile`] or a [`ModelFiles`]).
pub trait TensorSource {
    /// The tensor, or `None`.
    fn get(&self, name: &str) -> Option<TensorView<'_>>;
    /// All tensor names (deterministic order).
    fn names(&self) -> Vec<&str>;
    /// The file or folder to name in errors about `name` (its file if present).
    fn origin_of(&self, name: &str) -> &Path;
}

impl TensorSource for SafetensorsFile {
    fn get(&self, name: &str) -> Option<TensorView<'_>> {
        SafetensorsFile::get(self, name)
    }
    fn names(&self) -> Vec<&str> {
        SafetensorsFile::names(self)
    }
    fn origin_of(&self, _name: &str) -> &Path {
        self.path()
    }
}

impl TensorSource for ModelFiles {
    fn get(&self, name: &str) -> Option<TensorView<'_>> {
        ModelFiles::get(self, name)
    }
    fn names(&self) -> Vec<&str> {
        ModelFiles::names(self)
    }
    fn origin_of(&self, name: &str) -> &Path {
        self.file_of(name)
            .or(self.index_path())
            .unwrap_or(self.dir())
    }
}
