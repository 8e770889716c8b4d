//! Writing GGUF (version 3): metadata plus already-encoded tensor data.
//!
//! Used by tests to build files, and for exporting. Tensors are laid out in the
//! order given, each padded to the alignment, as llama.cpp writes them.

use std::io::BufWriter;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{GgufError, Result};
use crate::metadata::MetaValue;
use crate::reader::DEFAULT_ALIGNMENT;
use crate::GgmlType;

/// A tensor to write: ggml dims (innermost first), type and the encoded bytes.
#[derive(Debug, Clone)]
pub struct WriteTensor {
    pub name: String,
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    pub data: Vec<u8>,
}

/// Accumulates metadata and tensors, then serializes them.
#[derive(Debug, Clone, Default)]
pub struct GgufWriter {
    pub metadata: Vec<(String, MetaValue)>,
    pub tensors: Vec<WriteTensor>,
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &MetaValue) {
    match v {
        MetaValue::U8(x) => out.push(*x),
        MetaValue::I8(x) => out.push(*x as u8),
        MetaValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::Bool(x) => out.push(*x as u8),
        MetaValue::String(s) => put_str(out, s),
        MetaValue::Array(a) => {
            // An empty `Array` has no element to take the type from; `MetaValue::array`
            // makes those `EmptyArray(type)` instead. Kept as u8 for a hand-built one.
            let elem = a.first().map(|x| x.type_id()).unwrap_or(0);
            out.extend_from_slice(&elem.to_le_bytes());
            out.extend_from_slice(&(a.len() as u64).to_le_bytes());
            for x in a {
                put_value(out, x);
            }
        }
        MetaValue::EmptyArray(elem) => {
            out.extend_from_slice(&elem.to_le_bytes());
            out.extend_from_slice(&0u64.to_le_bytes());
        }
        MetaValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
    }
}

/// The header (magic, counts, metadata, tensor infos) padded to `align`: everything
/// before the first tensor's data. Tensor offsets assume each tensor's data is padded to
/// `align`, as llama.cpp's writer does.
fn header_bytes(
    metadata: &[(String, MetaValue)],
    tensors: &[(&str, &[u64], GgmlType, u64)],
    align: u64,
) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(b"GGUF");
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (k, v) in metadata {
        put_str(&mut out, k);
        out.extend_from_slice(&v.type_id().to_le_bytes());
        put_value(&mut out, v);
    }
    let mut offset = 0u64;
    for (name, dims, ty, len) in tensors {
        put_str(&mut out, name);
        out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
        for d in *dims {
            out.extend_from_slice(&d.to_le_bytes());
        }
        out.extend_from_slice(&ty.id().to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
        offset = (offset + len).div_ceil(align) * align;
    }
    pad_to(&mut out, align);
    out
}

fn pad_to(out: &mut Vec<u8>, align: u64) {
    let n = (out.len() as u64).div_ceil(align) * align;
    out.resize(n as usize, 0);
}

fn alignment_of(metadata: &[(String, MetaValue)]) -> u64 {
    metadata
        .iter()
        .find(|(k, _)| k == "general.alignment")
        .and_then(|(_, v)| match v {
            MetaValue::U32(a) => Some(*a as u64),
            _ => None,
        })
        .unwrap_or(DEFAULT_ALIGNMENT)
        .max(1)
}

/// The temporary sibling a file is written to before the rename.
fn temp_path(path: &Path) -> PathBuf {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
    let dir = dir.unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    // `<name>.tmp-<pid>`: the spelling qlora_formats::durable recognizes, so a
    // killed export's partial file is removed by the next run
    dir.join(format!(
        ".{}.tmp-{}",
        name.unwrap_or_else(|| "gguf".into()),
        std::process::id()
    ))
}

impl GgufWriter {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn meta(&mut self, key: &str, v: MetaValue) -> &mut Self {
        self.metadata.push((key.to_string(), v));
        self
    }

    pub fn tensor(&mut self, name: &str, dims: &[u64], ty: GgmlType, data: Vec<u8>) -> &mut Self {
        self.tensors.push(WriteTensor {
            name: name.to_string(),
            dims: dims.to_vec(),
            ggml_type: ty,
            data,
        });
        self
    }

    fn alignment(&self) -> u64 {
        alignment_of(&self.metadata)
    }

    /// Serialize. Panics never; sizes are not validated here (the reader does that),
    /// so tests can build deliberately broken files.
    pub fn to_bytes(&self) -> Vec<u8> {
        let align = self.alignment().max(1);
        let infos: Vec<(&str, &[u64], GgmlType, u64)> = self
            .tensors
            .iter()
            .map(|t| {
                (
                    t.name.as_str(),
                    t.dims.as_slice(),
                    t.ggml_type,
                    t.data.len() as u64,
                )
            })
            .collect();
        let mut out = header_bytes(&self.metadata, &infos, align);
        for t in &self.tensors {
            out.extend_from_slice(&t.data);
            pad_to(&mut out, align);
        }
        out
    }

    /// Write to `path` through a temporary file in the same folder, then rename.
    pub fn write(&self, path: &Path) -> Result<()> {
        let io = |source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        };
        let tmp = temp_path(path);
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(&self.to_bytes()).map_err(io)?;
        f.sync_all().map_err(io)?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(io)
    }
}

/// One tensor of a [`StreamWriter`]: its header entry, data supplied later.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorPlan {
    pub name: String,
    /// ggml dims, innermost first.
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
}

impl TensorPlan {
    /// Exact byte size of the encoded data (`None`: not a whole number of blocks).
    pub fn n_bytes(&self) -> Option<u64> {
        self.ggml_type.bytes_for(self.dims.iter().product())
    }
}

/// Writes a GGUF file tensor by tensor, so an exporter holds one tensor at a time.
///
/// The header is written first (every tensor's type and shape, hence its size, is
/// known up front); tensors must then arrive in plan order with exactly their size.
/// Everything goes to a temporary sibling file that [`StreamWriter::finish`] renames
/// onto the target; if the writer is dropped unfinished (an error midway), the
/// temporary file is removed, so nothing partial is ever left at the target path.
#[derive(Debug)]
pub struct StreamWriter {
    path: PathBuf,
    tmp: PathBuf,
    file: Option<BufWriter<std::fs::File>>,
    plans: Vec<TensorPlan>,
    sizes: Vec<u64>,
    next: usize,
    align: u64,
}

impl StreamWriter {
    /// Validate the plan and write the header to the temporary file.
    pub fn create(
        path: &Path,
        metadata: &[(String, MetaValue)],
        plans: Vec<TensorPlan>,
    ) -> Result<StreamWriter> {
        let malformed = |msg: String| GgufError::Malformed {
            path: path.to_path_buf(),
            msg,
        };
        let mut seen = std::collections::HashSet::new();
        let mut sizes = Vec::with_capacity(plans.len());
        for p in &plans {
            if !seen.insert(p.name.as_str()) {
                return Err(malformed(format!("duplicate tensor name `{}`", p.name)));
            }
            let n = p.n_bytes().ok_or_else(|| GgufError::Tensor {
                path: path.to_path_buf(),
                tensor: p.name.clone(),
                msg: format!(
                    "dims {:?} are not a whole number of {} blocks",
                    p.dims, p.ggml_type
                ),
            })?;
            sizes.push(n);
        }
        let align = alignment_of(metadata);
        let infos: Vec<(&str, &[u64], GgmlType, u64)> = plans
            .iter()
            .zip(&sizes)
            .map(|(p, &n)| (p.name.as_str(), p.dims.as_slice(), p.ggml_type, n))
            .collect();
        let header = header_bytes(metadata, &infos, align);
        let tmp = temp_path(path);
        let io = |source| GgufError::Io {
            path: tmp.clone(),
            source,
        };
        let file = std::fs::File::create(&tmp).map_err(io)?;
        let mut w = StreamWriter {
            path: path.to_path_buf(),
            tmp: tmp.clone(),
            file: Some(BufWriter::with_capacity(1 << 20, file)),
            plans,
            sizes,
            next: 0,
            align,
        };
        w.put(&header)?;
        Ok(w)
    }

    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        let f = self.file.as_mut().expect("file is open until finish");
        f.write_all(bytes).map_err(|source| GgufError::Io {
            path: self.tmp.clone(),
            source,
        })
    }

    /// The plan entry the next [`StreamWriter::write_tensor`] call must supply.
    pub fn next_plan(&self) -> Option<&TensorPlan> {
        self.plans.get(self.next)
    }

    /// Append the next tensor's encoded bytes (name and exact size are checked).
    pub fn write_tensor(&mut self, name: &str, data: &[u8]) -> Result<()> {
        let tensor_err = |msg: String| GgufError::Tensor {
            path: self.path.clone(),
            tensor: name.to_string(),
            msg,
        };
        let Some(plan) = self.plans.get(self.next) else {
            return Err(tensor_err("more tensors than planned".into()));
        };
        if plan.name != name {
            return Err(tensor_err(format!(
                "written out of order: expected `{}` next",
                plan.name
            )));
        }
        let want = self.sizes[self.next];
        if data.len() as u64 != want {
            return Err(tensor_err(format!(
                "{} bytes of data, {} {:?} needs {want}",
                data.len(),
                plan.ggml_type,
                plan.dims
            )));
        }
        self.put(data)?;
        let pad = (want.div_ceil(self.align) * self.align - want) as usize;
        self.put(&vec![0u8; pad])?;
        self.next += 1;
        Ok(())
    }

    /// Check every tensor was written, sync, and rename onto the target path.
    pub fn finish(mut self) -> Result<()> {
        if self.next != self.plans.len() {
            return Err(GgufError::Tensor {
                path: self.path.clone(),
                tensor: self.plans[self.next].name.clone(),
                msg: format!(
                    "never written ({} of {} tensors written)",
                    self.next,
                    self.plans.len()
                ),
            });
        }
        let io = |p: &Path| {
            let p = p.to_path_buf();
            move |source| GgufError::Io { path: p, source }
        };
        let f = self.file.take().expect("file is open until finish");
        let f = f.into_inner().map_err(|e| io(&self.tmp)(e.into_error()))?;
        f.sync_all().map_err(io(&self.tmp))?;
        drop(f);
        std::fs::rename(&self.tmp, &self.path).map_err(io(&self.path))?;
        // Renamed: nothing left for Drop to clean up.
        self.tmp = PathBuf::new();
        Ok(())
    }
}

impl Drop for StreamWriter {
    fn drop(&mut self) {
        self.file.take();
        if !self.tmp.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::GgufFile;

    fn plan(name: &str, dims: &[u64], ty: GgmlType) -> TensorPlan {
        TensorPlan {
            name: name.into(),
            dims: dims.to_vec(),
            ggml_type: ty,
        }
    }

    #[test]
    fn streamed_file_equals_the_in_memory_writer_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let md = vec![
            (
                "general.architecture".to_string(),
                MetaValue::String("llama".into()),
            ),
            ("general.alignment".to_string(), MetaValue::U32(64)),
        ];
        let a: Vec<u8> = (0..3 * 4).map(|i| i as u8).collect();
        let b: Vec<u8> = (0..34).map(|i| 100 + i as u8).collect();
        let mut mem = GgufWriter::new();
        mem.metadata = md.clone();
        mem.tensor("a", &[3], GgmlType::F32, a.clone());
        mem.tensor("b", &[32], GgmlType::Q8_0, b.clone());
        let path = dir.path().join("x.gguf");
        let mut w = StreamWriter::create(
            &path,
            &md,
            vec![
                plan("a", &[3], GgmlType::F32),
                plan("b", &[32], GgmlType::Q8_0),
            ],
        )
        .unwrap();
        assert!(!path.exists(), "nothing at the target before finish");
        w.write_tensor("a", &a).unwrap();
        w.write_tensor("b", &b).unwrap();
        w.finish().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), mem.to_bytes());
        let f = GgufFile::open(&path).unwrap();
        assert_eq!(f.tensor_data("b").unwrap(), b.as_slice());
        // No temporary file left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn wrong_order_size_or_missing_tensor_is_an_error_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("y.gguf");
        let plans = vec![
            plan("a", &[3], GgmlType::F32),
            plan("b", &[4], GgmlType::F16),
        ];
        let mut w = StreamWriter::create(&path, &[], plans.clone()).unwrap();
        let e = w.write_tensor("b", &[0; 8]).unwrap_err().to_string();
        assert!(e.contains("out of order"), "{e}");
        let e = w.write_tensor("a", &[0; 11]).unwrap_err().to_string();
        assert!(e.contains("needs 12"), "{e}");
        w.write_tensor("a", &[0; 12]).unwrap();
        let e = w.finish().unwrap_err().to_string();
        assert!(e.contains("`b`") && e.contains("never written"), "{e}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        // Dropped midway: the temporary file is removed too.
        let w = StreamWriter::create(&path, &[], plans).unwrap();
        drop(w);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        // A plan that is not a whole number of blocks is refused up front.
        let e = StreamWriter::create(&path, &[], vec![plan("q", &[33], GgmlType::Q8_0)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("whole number of Q8_0 blocks"), "{e}");
    }
}
