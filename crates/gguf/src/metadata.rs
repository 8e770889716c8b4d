//! GGUF metadata values and typed lookups.

use std::fmt;
use std::path::Path;

use crate::error::{GgufError, Result};

/// One metadata value, with the GGUF value type preserved.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    /// Elements of one type (GGUF arrays are homogeneous; arrays of arrays are allowed).
    /// Never empty when written: an empty array is [`MetaValue::EmptyArray`].
    Array(Vec<MetaValue>),
    /// An array with no elements, which still declares its element type (a
    /// [`value_type`] id): llama.cpp checks it, e.g. `tokenizer.ggml.merges` must be a
    /// string array even when the tokenizer has no merges. Build arrays with
    /// [`MetaValue::array`] to get this right.
    EmptyArray(u32),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// GGUF value-type ids.
pub mod value_type {
    pub const U8: u32 = 0;
    pub const I8: u32 = 1;
    pub const U16: u32 = 2;
    pub const I16: u32 = 3;
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;
    pub const U64: u32 = 10;
    pub const I64: u32 = 11;
    pub const F64: u32 = 12;
}

impl MetaValue {
    /// The GGUF value-type id.
    pub fn type_id(&self) -> u32 {
        use value_type as t;
        match self {
            MetaValue::U8(_) => t::U8,
            MetaValue::I8(_) => t::I8,
            MetaValue::U16(_) => t::U16,
            MetaValue::I16(_) => t::I16,
            MetaValue::U32(_) => t::U32,
            MetaValue::I32(_) => t::I32,
            MetaValue::F32(_) => t::F32,
            MetaValue::Bool(_) => t::BOOL,
            MetaValue::String(_) => t::STRING,
            MetaValue::Array(_) | MetaValue::EmptyArray(_) => t::ARRAY,
            MetaValue::U64(_) => t::U64,
            MetaValue::I64(_) => t::I64,
            MetaValue::F64(_) => t::F64,
        }
    }

    /// Any integer type as i128 (so every GGUF integer fits); `None` otherwise.
    pub fn as_int(&self) -> Option<i128> {
        Some(match *self {
            MetaValue::U8(x) => x as i128,
            MetaValue::I8(x) => x as i128,
            MetaValue::U16(x) => x as i128,
            MetaValue::I16(x) => x as i128,
            MetaValue::U32(x) => x as i128,
            MetaValue::I32(x) => x as i128,
            MetaValue::U64(x) => x as i128,
            MetaValue::I64(x) => x as i128,
            _ => return None,
        })
    }

    /// F32/F64 (or an integer) as f64.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(x) => Some(x as f64),
            MetaValue::F64(x) => Some(x),
            _ => self.as_int().map(|x| x as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// An array of `elem_type` (a [`value_type`] id) holding `items`, all of that type.
    pub fn array(elem_type: u32, items: Vec<MetaValue>) -> MetaValue {
        debug_assert!(items.iter().all(|x| x.type_id() == elem_type));
        if items.is_empty() {
            MetaValue::EmptyArray(elem_type)
        } else {
            MetaValue::Array(items)
        }
    }

    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(a) => Some(a),
            MetaValue::EmptyArray(_) => Some(&[]),
            _ => None,
        }
    }
}

impl fmt::Display for MetaValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MetaValue::String(s) => write!(f, "{s:?}"),
            MetaValue::Array(a) => {
                write!(f, "[")?;
                for (i, v) in a.iter().take(8).enumerate() {
                    if i > 0 {
                        write!(f, ", ")?;
                    }
                    write!(f, "{v}")?;
                }
                if a.len() > 8 {
                    write!(f, ", … ({} items)", a.len())?;
                }
                write!(f, "]")
            }
            MetaValue::EmptyArray(_) => write!(f, "[]"),
            MetaValue::Bool(b) => write!(f, "{b}"),
            MetaValue::F32(x) => write!(f, "{x}"),
            MetaValue::F64(x) => write!(f, "{x}"),
            other => write!(f, "{}", other.as_int().unwrap_or_default()),
        }
    }
}

/// The metadata key/value pairs in file order, with typed getters whose errors
/// name the file and the key.
#[derive(Debug, Clone, Default)]
pub struct Metadata {
    pub(crate) entries: Vec<(String, MetaValue)>,
    pub(crate) index: std::collections::HashMap<String, usize>,
}

impl Metadata {
    /// Build from pairs; duplicate keys are rejected by the reader before this.
    pub fn from_entries(entries: Vec<(String, MetaValue)>) -> Self {
        let index = entries
            .iter()
            .enumerate()
            .map(|(i, (k, _))| (k.clone(), i))
            .collect();
        Metadata { entries, index }
    }

    pub fn entries(&self) -> &[(String, MetaValue)] {
        &self.entries
    }

    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.index.get(key).map(|&i| &self.entries[i].1)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn err(path: &Path, key: &str, msg: String) -> GgufError {
        GgufError::Metadata {
            path: path.to_path_buf(),
            key: key.to_string(),
            msg,
        }
    }

    /// A string value; `Ok(None)` when absent, an error when of another type.
    pub fn opt_str(&self, path: &Path, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| Self::err(path, key, format!("expected a string, got {v}"))),
        }
    }

    pub fn req_str(&self, path: &Path, key: &str) -> Result<&str> {
        self.opt_str(path, key)?
            .ok_or_else(|| Self::err(path, key, "missing".into()))
    }

    /// A non-negative integer of any integer type.
    pub fn opt_usize(&self, path: &Path, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_int() {
                Some(x) if x >= 0 && x <= usize::MAX as i128 => Ok(Some(x as usize)),
                _ => Err(Self::err(
                    path,
                    key,
                    format!("expected a non-negative integer, got {v}"),
                )),
            },
        }
    }

    pub fn req_usize(&self, path: &Path, key: &str) -> Result<usize> {
        self.opt_usize(path, key)?
            .ok_or_else(|| Self::err(path, key, "missing".into()))
    }

    /// A float (F32/F64, integers accepted).
    pub fn opt_f64(&self, path: &Path, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| Self::err(path, key, format!("expected a number, got {v}"))),
        }
    }

    pub fn opt_bool(&self, path: &Path, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| Self::err(path, key, format!("expected a bool, got {v}"))),
        }
    }

    /// An array of strings.
    pub fn opt_str_array(&self, path: &Path, key: &str) -> Result<Option<Vec<&str>>> {
        match self.get(key) {
            None => Ok(None),
            Some(MetaValue::Array(a)) => a
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    v.as_str().ok_or_else(|| {
                        Self::err(
                            path,
                            key,
                            format!("element {i}: expected a string, got {v}"),
                        )
                    })
                })
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(v) => Err(Self::err(path, key, format!("expected an array, got {v}"))),
        }
    }

    /// An array of integers (any integer element type).
    pub fn opt_int_array(&self, path: &Path, key: &str) -> Result<Option<Vec<i64>>> {
        match self.get(key) {
            None => Ok(None),
            Some(MetaValue::Array(a)) => a
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    v.as_int()
                        .filter(|x| *x >= i64::MIN as i128 && *x <= i64::MAX as i128)
                        .map(|x| x as i64)
                        .ok_or_else(|| {
                            Self::err(
                                path,
                                key,
                                format!("element {i}: expected an integer, got {v}"),
                            )
                        })
                })
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(v) => Err(Self::err(path, key, format!("expected an array, got {v}"))),
        }
    }

    /// An array of floats.
    pub fn opt_f32_array(&self, path: &Path, key: &str) -> Result<Option<Vec<f32>>> {
        match self.get(key) {
            None => Ok(None),
            Some(MetaValue::Array(a)) => a
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    v.as_f64().map(|x| x as f32).ok_or_else(|| {
                        Self::err(
                            path,
                            key,
                            format!("element {i}: expected a number, got {v}"),
                        )
                    })
                })
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(v) => Err(Self::err(path, key, format!("expected an array, got {v}"))),
        }
    }
}
