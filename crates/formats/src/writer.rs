//! Streaming, atomic safetensors writing.
//!
//! The header (every tensor's dtype, shape and offsets) is fixed up front from
//! a list of [`TensorSpec`]s; the data of each tensor is then supplied one at
//! a time, in any order, and written at its final position. A quantizer can
//! therefore produce a multi-gigabyte file while holding only one tensor in
//! memory. The file is written to `<final>.tmp-<pid>` in the same folder and
//! renamed into place by [`SafetensorsWriter::finish`]; if the writer is
//! dropped before that (an error, a panic) the temporary file is removed.
//!
//! Layout matches the reference writer (`safetensors` `prepare()`): tensors
//! ordered by dtype (descending, the crate's `Dtype` order) then name, compact
//! JSON with `__metadata__` first, header padded with spaces to a multiple of 8.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use safetensors::Dtype;

use crate::error::{FormatError, Result};

/// Name, dtype and shape of a tensor to be written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

impl TensorSpec {
    pub fn new(name: impl Into<String>, dtype: Dtype, shape: Vec<usize>) -> Self {
        TensorSpec {
            name: name.into(),
            dtype,
            shape,
        }
    }
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// Number of data bytes.
    pub fn nbytes(&self) -> usize {
        self.numel() * self.dtype.bitsize() / 8
    }
}

/// A complete tensor (spec + bytes) for one-shot writes of small files.
#[derive(Debug, Clone)]
pub struct TensorData<'a> {
    pub spec: TensorSpec,
    pub data: Cow<'a, [u8]>,
}

impl<'a> TensorData<'a> {
    pub fn new(
        name: impl Into<String>,
        dtype: Dtype,
        shape: Vec<usize>,
        data: impl Into<Cow<'a, [u8]>>,
    ) -> Self {
        TensorData {
            spec: TensorSpec::new(name, dtype, shape),
            data: data.into(),
        }
    }
    pub fn from_f32(name: impl Into<String>, shape: Vec<usize>, v: &[f32]) -> Self {
        Self::new(name, Dtype::F32, shape, f32_bytes(v))
    }
    pub fn from_bf16(name: impl Into<String>, shape: Vec<usize>, v: &[bf16]) -> Self {
        Self::new(
            name,
            Dtype::BF16,
            shape,
            v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>(),
        )
    }
    pub fn from_f16(name: impl Into<String>, shape: Vec<usize>, v: &[f16]) -> Self {
        Self::new(
            name,
            Dtype::F16,
            shape,
            v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>(),
        )
    }
    pub fn from_u8(name: impl Into<String>, shape: Vec<usize>, v: &'a [u8]) -> Self {
        Self::new(name, Dtype::U8, shape, v)
    }
}

/// Little-endian bytes of an f32 slice.
pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Little-endian bytes of plain numbers. On little-endian hosts this is the
/// values' own memory (no copy of what may be the largest tensor of a model);
/// elsewhere each element's bytes are reversed into a new buffer.
fn le_bytes<T: bytemuck::Pod>(v: &[T]) -> std::borrow::Cow<'_, [u8]> {
    let b: &[u8] = bytemuck::cast_slice(v);
    if cfg!(target_endian = "little") {
        std::borrow::Cow::Borrowed(b)
    } else {
        let n = std::mem::size_of::<T>();
        std::borrow::Cow::Owned(
            b.chunks_exact(n)
                .flat_map(|c| c.iter().rev().copied())
                .collect(),
        )
    }
}

/// The metadata transformers and PEFT write: `{"format": "pt"}`.
pub fn pt_metadata() -> BTreeMap<String, String> {
    BTreeMap::from([("format".to_string(), "pt".to_string())])
}

/// Where each tensor goes, plus the encoded header.
#[derive(Debug, Clone)]
pub struct Layout {
    /// 8-byte length + padded JSON.
    pub header: Vec<u8>,
    /// name → [begin, end) relative to the data buffer.
    pub offsets: HashMap<String, (usize, usize)>,
    /// Total size of the data buffer.
    pub data_len: usize,
}

/// Compute the canonical layout and header for `specs`.
pub fn layout(
    specs: &[TensorSpec],
    metadata: Option<&BTreeMap<String, String>>,
) -> std::result::Result<Layout, String> {
    let mut order: Vec<&TensorSpec> = specs.iter().collect();
    order.sort_by(|a, b| b.dtype.cmp(&a.dtype).then_with(|| a.name.cmp(&b.name)));
    let mut json = String::from("{");
    let mut first = true;
    if let Some(m) = metadata {
        json.push_str("\"__metadata__\":");
        json.push_str(&serde_json::to_string(m).expect("string map serialises"));
        first = false;
    }
    let mut offsets = HashMap::with_capacity(specs.len());
    let mut pos = 0usize;
    for s in order {
        if s.name == "__metadata__" {
            return Err("a tensor cannot be called `__metadata__`".into());
        }
        if s.numel() * s.dtype.bitsize() % 8 != 0 {
            return Err(format!(
                "tensor `{}`: shape {:?} of {} is not a whole number of bytes",
                s.name, s.shape, s.dtype
            ));
        }
        let end = pos + s.nbytes();
        if offsets.insert(s.name.clone(), (pos, end)).is_some() {
            return Err(format!("tensor `{}` given twice", s.name));
        }
        if !first {
            json.push(',');
        }
        first = false;
        json.push_str(&serde_json::to_string(&s.name).expect("string serialises"));
        json.push_str(&format!(
            ":{{\"dtype\":\"{}\",\"shape\":{},\"data_offsets\":[{},{}]}}",
            s.dtype,
            serde_json::to_string(&s.shape).expect("ints serialise"),
            pos,
            end
        ));
        pos = end;
    }
    json.push('}');
    let pad = (8 - json.len() % 8) % 8;
    json.extend(std::iter::repeat_n(' ', pad));
    let mut header = Vec::with_capacity(8 + json.len());
    header.extend_from_slice(&(json.len() as u64).to_le_bytes());
    header.extend_from_slice(json.as_bytes());
    Ok(Layout {
        header,
        offsets,
        data_len: pos,
    })
}

/// The temporary name used while `path` is being written.
pub fn temp_path(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(format!(".tmp-{}", std::process::id()));
    path.with_file_name(name)
}

struct Slot {
    begin: usize,
    end: usize,
    dtype: Dtype,
    written: bool,
}

/// A safetensors file being written; see the module docs.
pub struct SafetensorsWriter {
    final_path: PathBuf,
    tmp_path: PathBuf,
    file: Option<File>,
    data_start: u64,
    slots: HashMap<String, Slot>,
    remaining: usize,
    data_len: usize,
    committed: bool,
}

impl SafetensorsWriter {
    /// Start writing `path` with `{"format":"pt"}` metadata.
    pub fn create(path: impl AsRef<Path>, specs: &[TensorSpec]) -> Result<Self> {
        Self::create_with_metadata(path, specs, Some(&pt_metadata()))
    }

    /// Start writing `path` with the given `__metadata__` (or none).
    pub fn create_with_metadata(
        path: impl AsRef<Path>,
        specs: &[TensorSpec],
        metadata: Option<&BTreeMap<String, String>>,
    ) -> Result<Self> {
        let final_path = path.as_ref().to_path_buf();
        let lay = layout(specs, metadata).map_err(|m| FormatError::invalid(&final_path, m))?;
        let tmp_path = temp_path(&final_path);
        let file = File::create(&tmp_path).map_err(|e| FormatError::io(&tmp_path, e))?;
        let mut w = SafetensorsWriter {
            final_path,
            tmp_path,
            file: Some(file),
            data_start: lay.header.len() as u64,
            slots: HashMap::with_capacity(specs.len()),
            remaining: 0,
            data_len: lay.data_len,
            committed: false,
        };
        for s in specs {
            let (begin, end) = lay.offsets[&s.name];
            let written = begin == end;
            if !written {
                w.remaining += 1;
            }
            w.slots.insert(
                s.name.clone(),
                Slot {
                    begin,
                    end,
                    dtype: s.dtype,
                    written,
                },
            );
        }
        let total = w.data_start + lay.data_len as u64;
        let f = w.file.as_ref().expect("open");
        f.set_len(total)
            .map_err(|e| FormatError::io(&w.tmp_path, e))?;
        w.write_at(0, &lay.header)?;
        Ok(w)
    }

    /// The final path.
    pub fn path(&self) -> &Path {
        &self.final_path
    }

    /// Size of the data buffer.
    pub fn data_len(&self) -> usize {
        self.data_len
    }

    fn write_at(&self, pos: u64, bytes: &[u8]) -> Result<()> {
        let f = self.file.as_ref().expect("file is open until finish");
        #[cfg(unix)]
        {
            use std::os::unix::fs::FileExt;
            f.write_all_at(bytes, pos)
                .map_err(|e| FormatError::io(&self.tmp_path, e))
        }
        #[cfg(not(unix))]
        {
            use std::io::{Seek, SeekFrom, Write};
            let mut f = f;
            f.seek(SeekFrom::Start(pos))
                .and_then(|_| f.write_all(bytes))
                .map_err(|e| FormatError::io(&self.tmp_path, e))
        }
    }

    /// Write the data of tensor `name` (exactly its byte count, once).
    pub fn write(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        let slot = self.slots.get(name).ok_or_else(|| {
            FormatError::tensor(&self.final_path, name, "not in the planned header")
        })?;
        if slot.end - slot.begin != bytes.len() {
            return Err(FormatError::tensor(
                &self.final_path,
                name,
                format!(
                    "planned {} bytes but {} were supplied",
                    slot.end - slot.begin,
                    bytes.len()
                ),
            ));
        }
        if slot.written {
            if bytes.is_empty() {
                return Ok(());
            }
            return Err(FormatError::tensor(&self.final_path, name, "written twice"));
        }
        let pos = self.data_start + slot.begin as u64;
        self.write_at(pos, bytes)?;
        let slot = self.slots.get_mut(name).expect("checked above");
        slot.written = true;
        self.remaining -= 1;
        Ok(())
    }

    /// Write an F32 tensor from f32 values.
    pub fn write_f32(&mut self, name: &str, v: &[f32]) -> Result<()> {
        self.check_dtype(name, Dtype::F32)?;
        self.write(name, &le_bytes(v))
    }

    /// Write a BF16 tensor.
    pub fn write_bf16(&mut self, name: &str, v: &[bf16]) -> Result<()> {
        self.check_dtype(name, Dtype::BF16)?;
        self.write(name, &le_bytes(v))
    }

    /// Write an F16 tensor.
    pub fn write_f16(&mut self, name: &str, v: &[f16]) -> Result<()> {
        self.check_dtype(name, Dtype::F16)?;
        self.write(name, &le_bytes(v))
    }

    fn check_dtype(&self, name: &str, want: Dtype) -> Result<()> {
        match self.slots.get(name) {
            Some(s) if s.dtype != want => Err(FormatError::tensor(
                &self.final_path,
                name,
                format!("planned as {} but written as {want}", s.dtype),
            )),
            _ => Ok(()),
        }
    }

    /// Check every tensor was written, flush to disk and rename into place.
    pub fn finish(mut self) -> Result<PathBuf> {
        if self.remaining > 0 {
            let mut missing: Vec<&str> = self
                .slots
                .iter()
                .filter(|(_, s)| !s.written)
                .map(|(n, _)| n.as_str())
                .collect();
            missing.sort_unstable();
            return Err(FormatError::invalid(
                &self.final_path,
                format!(
                    "{} tensors were never written (first: `{}`)",
                    missing.len(),
                    missing[0]
                ),
            ));
        }
        let f = self.file.take().expect("open until finish");
        f.sync_all()
            .map_err(|e| FormatError::io(&self.tmp_path, e))?;
        drop(f);
        std::fs::rename(&self.tmp_path, &self.final_path)
            .map_err(|e| FormatError::io(&self.final_path, e))?;
        self.committed = true;
        crate::shards::sync_dir(&self.final_path)?;
        Ok(self.final_path.clone())
    }
}

impl Drop for SafetensorsWriter {
    fn drop(&mut self) {
        if !self.committed {
            drop(self.file.take());
            let _ = std::fs::remove_file(&self.tmp_path);
        }
    }
}

/// Write a whole (small) file in one call, atomically.
pub fn write_safetensors(path: impl AsRef<Path>, tensors: &[TensorData<'_>]) -> Result<PathBuf> {
    let specs: Vec<TensorSpec> = tensors.iter().map(|t| t.spec.clone()).collect();
    let mut w = SafetensorsWriter::create(path, &specs)?;
    for t in tensors {
        w.write(&t.spec.name, &t.data)?;
    }
    w.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn le_bytes_equal_each_elements_to_le_bytes() {
        let f = [1.5f32, -0.0, f32::MIN_POSITIVE, 3.0e38];
        assert_eq!(&*le_bytes(&f), &f32_bytes(&f)[..]);
        let b = f.map(bf16::from_f32);
        let want: Vec<u8> = b.iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(&*le_bytes(&b), &want[..]);
        let h = f.map(f16::from_f32);
        let want: Vec<u8> = h.iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(&*le_bytes(&h), &want[..]);
    }
}
