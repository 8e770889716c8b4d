//! [`GgufModel`]: a llama-family GGUF file viewed as an HF checkpoint, tensors decoded
//! (and q/k rows un-permuted) on demand; [`load_hf_tensors`] iterates them in HF order.

use super::config::{arch_of, config_with_rope_freqs};
use super::*;

/// A GGUF llama-family model viewed as an HF checkpoint, tensors decoded on demand.
#[derive(Debug)]
pub struct GgufModel {
    file: GgufFile,
    config: ModelConfig,
    /// (gguf name, hf name, permutation) in HF loading order.
    order: Vec<(String, String, Perm)>,
    by_hf: HashMap<String, usize>,
}

impl GgufModel {
    /// Open, map and validate: config from metadata, every tensor name known, every
    /// expected tensor present with the shape the config implies.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufModel> {
        let file = GgufFile::open(path)?;
        let path: PathBuf = file.path().to_path_buf();
        let h = file.header();
        let (_, permute) = arch_of(&path, h.architecture()?)?;
        let rope_freqs = match h.tensor("rope_freqs.weight") {
            Some(_) => Some(file.dequantize("rope_freqs.weight")?),
            None => None,
        };
        let config = config_with_rope_freqs(h, rope_freqs.as_deref())?;
        let c = &config;
        let mut expected: Vec<(String, Vec<usize>, Perm)> = Vec::new();
        expected.push((
            "token_embd.weight".into(),
            vec![c.vocab_size, c.hidden_size],
            None,
        ));
        let (a, kv, d, hs, i) = (
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
            c.hidden_size,
            c.intermediate_size,
        );
        let qp = permute.then_some((a, d));
        let kp = permute.then_some((kv, d));
        for l in 0..c.num_hidden_layers {
            let b = |s: &str| format!("blk.{l}.{s}");
            expected.push((b("attn_norm.weight"), vec![hs], None));
            expected.push((b("attn_q.weight"), vec![a * d, hs], qp));
            if c.qkv_bias {
                expected.push((b("attn_q.bias"), vec![a * d], qp));
            }
            expected.push((b("attn_k.weight"), vec![kv * d, hs], kp));
            if c.qkv_bias {
                expected.push((b("attn_k.bias"), vec![kv * d], kp));
            }
            expected.push((b("attn_v.weight"), vec![kv * d, hs], None));
            if c.qkv_bias {
                expected.push((b("attn_v.bias"), vec![kv * d], None));
            }
            if c.architecture.qk_norm() {
                expected.push((b("attn_q_norm.weight"), vec![d], None));
                expected.push((b("attn_k_norm.weight"), vec![d], None));
            }
            expected.push((b("attn_output.weight"), vec![hs, a * d], None));
            if c.o_bias {
                expected.push((b("attn_output.bias"), vec![hs], None));
            }
            expected.push((b("ffn_norm.weight"), vec![hs], None));
            expected.push((b("ffn_gate.weight"), vec![i, hs], None));
            expected.push((b("ffn_up.weight"), vec![i, hs], None));
            expected.push((b("ffn_down.weight"), vec![hs, i], None));
        }
        expected.push(("output_norm.weight".into(), vec![hs], None));
        if !c.tie_word_embeddings {
            expected.push(("output.weight".into(), vec![c.vocab_size, hs], None));
        }
        let mut order = Vec::with_capacity(expected.len());
        let mut by_hf = HashMap::new();
        for (name, shape, perm) in expected {
            let info = file.tensor_info(&name)?;
            if info.shape() != shape {
                return Err(GgufError::Tensor {
                    path: path.clone(),
                    tensor: name,
                    msg: format!(
                        "shape {:?} does not match the metadata, which implies {shape:?}",
                        info.shape()
                    ),
                });
            }
            if !info.ggml_type.can_dequantize() {
                return Err(GgufError::UnsupportedType {
                    path: path.clone(),
                    tensor: name,
                    ty: info.ggml_type,
                });
            }
            let hf = hf_name(&name).expect("expected names are mapped");
            by_hf.insert(hf.clone(), order.len());
            order.push((name, hf, perm));
        }
        // Anything else in the file is either known-ignorable or a sign of a different model.
        for t in file.tensors() {
            let known = order.iter().any(|(g, _, _)| *g == t.name);
            let ignorable = t.name == "rope_freqs.weight" || t.name.ends_with(".attn_rot_embd");
            if !known && !ignorable {
                let msg = match hf_name(&t.name) {
                    Some(_) => format!(
                        "unexpected tensor for a {}-layer model as described by the metadata",
                        c.num_hidden_layers
                    ),
                    None => "tensor not part of the llama architecture (unsupported)".into(),
                };
                return Err(GgufError::Tensor {
                    path: path.clone(),
                    tensor: t.name.clone(),
                    msg,
                });
            }
        }
        Ok(GgufModel {
            file,
            config,
            order,
            by_hf,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    /// HF tensor names in loading order (embedding, layer by layer, norm, lm_head).
    pub fn hf_names(&self) -> impl Iterator<Item = &str> {
        self.order.iter().map(|(_, hf, _)| hf.as_str())
    }

    /// The GGUF tensor name behind an HF name.
    pub fn gguf_name(&self, hf: &str) -> Option<&str> {
        self.by_hf.get(hf).map(|&i| self.order[i].0.as_str())
    }

    /// One tensor by HF name: row-major shape and f32 values in HF layout.
    pub fn get(&self, hf: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let &i = self.by_hf.get(hf).ok_or_else(|| GgufError::MissingTensor {
            path: self.file.path().to_path_buf(),
            tensor: hf.to_string(),
        })?;
        self.load(i)
    }

    fn load(&self, i: usize) -> Result<(Vec<usize>, Vec<f32>)> {
        let (gguf, _, perm) = &self.order[i];
        let shape = self.file.tensor_info(gguf)?.shape();
        let data = self.file.dequantize(gguf)?;
        let data = match perm {
            Some((heads, d)) => {
                let cols = if shape.len() == 2 { shape[1] } else { 1 };
                unpermute_rows(&data, *heads, *d, cols)
            }
            None => data,
        };
        Ok((shape, data))
    }

    /// One tensor by HF name as the file stores it: its ggml type, HF shape, the
    /// stored bytes (sharing the file's memory map) and, for llama q/k weights, the
    /// `(n_heads, head_dim)` of llama.cpp's row permutation that [`unpermute_rows`]
    /// undoes (rows are whole blocks, so a reader can take HF row `r` from stored row
    /// [`gguf_row`]`(r, head_dim)` without decoding anything else).
    pub fn raw(&self, hf: &str) -> Result<RawTensor> {
        let &i = self.by_hf.get(hf).ok_or_else(|| GgufError::MissingTensor {
            path: self.file.path().to_path_buf(),
            tensor: hf.to_string(),
        })?;
        let (gguf, _, perm) = &self.order[i];
        let info = self.file.tensor_info(gguf)?;
        Ok(RawTensor {
            ggml_type: info.ggml_type,
            shape: info.shape(),
            bytes: self.file.tensor_bytes_shared(gguf)?,
            permuted: *perm,
        })
    }

    /// Iterate `(hf_name, shape, values)` one tensor at a time, so a loader can quantize
    /// layer by layer without holding the whole model in f32.
    pub fn into_tensors(self) -> HfTensors {
        HfTensors {
            model: self,
            next: 0,
        }
    }
}

/// A tensor as stored in the file (see [`GgufModel::raw`]).
#[derive(Debug, Clone)]
pub struct RawTensor {
    pub ggml_type: crate::GgmlType,
    /// Row-major (HF) shape: `[rows, cols]` for a matrix.
    pub shape: Vec<usize>,
    pub bytes: crate::MappedBytes,
    /// `Some((n_heads, head_dim))`: stored rows are in llama.cpp's q/k order.
    pub permuted: Option<(usize, usize)>,
}

/// The stored (GGUF) row of HF row `hf_row` of a q/k weight permuted by llama.cpp's
/// converter with heads of `head_dim` rows (the row map [`unpermute_rows`] applies).
pub fn gguf_row(hf_row: usize, head_dim: usize) -> usize {
    let (h, r) = (hf_row / head_dim, hf_row % head_dim);
    let half = head_dim / 2;
    let (j, i) = (r / half, r % half);
    h * head_dim + 2 * i + j
}

/// One decoded tensor: HF name, row-major shape, f32 values.
pub type HfTensor = (String, Vec<usize>, Vec<f32>);

/// Iterator over a GGUF model's tensors in HF names and layout (see [`GgufModel::into_tensors`]).
#[derive(Debug)]
pub struct HfTensors {
    model: GgufModel,
    next: usize,
}

impl HfTensors {
    pub fn config(&self) -> &ModelConfig {
        &self.model.config
    }
}

impl Iterator for HfTensors {
    type Item = Result<HfTensor>;

    fn next(&mut self) -> Option<Self::Item> {
        let i = self.next;
        if i >= self.model.order.len() {
            return None;
        }
        self.next += 1;
        let hf = self.model.order[i].1.clone();
        Some(self.model.load(i).map(|(s, d)| (hf, s, d)))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.model.order.len() - self.next;
        (n, Some(n))
    }
}

impl ExactSizeIterator for HfTensors {}

/// Open a llama-family GGUF: its [`ModelConfig`] and an iterator of HF-named, HF-layout
/// f32 tensors, decoded one at a time.
pub fn load_hf_tensors(path: impl AsRef<Path>) -> Result<(ModelConfig, HfTensors)> {
    let m = GgufModel::open(path)?;
    let cfg = m.config.clone();
    Ok((cfg, m.into_tensors()))
}
