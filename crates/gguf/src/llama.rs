//! llama-architecture GGUF files seen as a Hugging Face checkpoint.
//!
//! - Metadata (`{arch}.embedding_length`, `.block_count`, …) → [`ModelConfig`].
//! - Tensor names (`blk.N.attn_q.weight`, …) → HF names (`model.layers.N.self_attn.q_proj.weight`, …).
//! - Layout: ggml dims are innermost-first, so reversing them gives the HF `[out, in]`
//!   shape with the same bytes. The one real difference is RoPE: llama.cpp's converter
//!   permutes the rows of q/k (weights and biases) inside each head so that RoPE rotates
//!   adjacent pairs `(2i, 2i+1)` (Meta's layout), while HF rotates `(i, i + d/2)`
//!   (`rotate_half`). [`unpermute_rows`] undoes it; [`permute_rows`] is the converter's
//!   direction. Only the `llama` architecture is permuted (qwen2 GGUFs keep HF order).
//! - Tied output: no `output.weight` means `tie_word_embeddings`.
//! - Llama-3.1-style scaling is stored by llama.cpp as a `rope_freqs.weight` tensor of
//!   per-frequency divisors; it is mapped back to `RopeScaling::Llama3` when it matches
//!   the llama3 formula, else rejected.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use qlora_config::{Architecture, ModelConfig, RopeScaling};

use crate::error::{GgufError, Result};
use crate::{GgufFile, GgufHeader};

/// Which rows of a tensor get the Q/K un-permutation: (number of heads, head_dim).
type Perm = Option<(usize, usize)>;

fn unsupported(path: &Path, msg: String) -> GgufError {
    GgufError::Unsupported {
        path: path.to_path_buf(),
        msg,
    }
}

fn meta_err(path: &Path, key: &str, msg: String) -> GgufError {
    GgufError::Metadata {
        path: path.to_path_buf(),
        key: key.to_string(),
        msg,
    }
}

/// The split regex of llama.cpp's `llama-bpe` (Llama 3) pre-tokenizer, exactly as
/// it appears in the models' tokenizer.json (read and written by the tokenizer
/// rebuild and the GGUF export).
pub const LLAMA3_PRE_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// The split regex of llama.cpp's `qwen2` pre-tokenizer (see [`LLAMA3_PRE_REGEX`]).
pub const QWEN2_PRE_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The HF name of a GGUF tensor name of the llama family, `None` for names outside it.
pub fn hf_name(gguf: &str) -> Option<String> {
    let direct = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(d) = direct {
        return Some(d.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, suffix) = rest.rsplit_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    let hf = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{suffix}"))
}

/// The llama.cpp GGUF name of an HF llama-family tensor name (inverse of [`hf_name`]),
/// `None` for names outside the architecture.
pub fn gguf_name(hf: &str) -> Option<String> {
    let direct = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(d) = direct {
        return Some(d.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, suffix) = rest.rsplit_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    let g = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{g}.{suffix}"))
}

/// GGUF (interleaved-pair RoPE) → HF (rotate_half) row order of a q/k weight or bias with
/// `n_heads` heads of `head_dim` rows, each row `cols` long: GGUF row `h·d + 2i + j`
/// becomes HF row `h·d + j·d/2 + i`.
pub fn unpermute_rows(data: &[f32], n_heads: usize, head_dim: usize, cols: usize) -> Vec<f32> {
    reorder(data, n_heads, head_dim, cols, true)
}

/// HF → GGUF, what llama.cpp's `convert_hf_to_gguf.py` applies (`LlamaModel.permute`).
pub fn permute_rows(data: &[f32], n_heads: usize, head_dim: usize, cols: usize) -> Vec<f32> {
    reorder(data, n_heads, head_dim, cols, false)
}

fn reorder(data: &[f32], n_heads: usize, d: usize, cols: usize, to_hf: bool) -> Vec<f32> {
    assert_eq!(
        data.len(),
        n_heads * d * cols,
        "q/k permutation: size mismatch"
    );
    assert!(d.is_multiple_of(2), "q/k permutation: odd head_dim");
    let mut out = vec![0f32; data.len()];
    let half = d / 2;
    for h in 0..n_heads {
        for i in 0..half {
            for j in 0..2 {
                let gguf = h * d + 2 * i + j;
                let hf = h * d + j * half + i;
                let (src, dst) = if to_hf { (gguf, hf) } else { (hf, gguf) };
                out[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&data[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// Architectures we map, and whether their q/k rows were permuted by the converter.
fn arch_of(path: &Path, arch: &str) -> Result<(Architecture, bool)> {
    match arch {
        "llama" => Ok((Architecture::Llama, true)),
        "qwen2" => Ok((Architecture::Qwen2, false)),
        // llama.cpp's Qwen3 converter keeps HF's q/k row order (like qwen2) and writes the
        // per-head norms as blk.N.attn_q_norm / attn_k_norm.
        "qwen3" => Ok((Architecture::Qwen3, false)),
        other => Err(unsupported(
            path,
            format!("GGUF architecture `{other}` (supported: llama, qwen2, qwen3)"),
        )),
    }
}

/// Build the [`ModelConfig`] from a GGUF header's metadata and tensor shapes.
pub fn config_from_header(h: &GgufHeader) -> Result<ModelConfig> {
    config_with_rope_freqs(h, None)
}

fn config_with_rope_freqs(h: &GgufHeader, rope_freqs: Option<&[f32]>) -> Result<ModelConfig> {
    let path = h.path.as_path();
    let md = &h.metadata;
    let arch_name = h.architecture()?;
    let (architecture, _) = arch_of(path, arch_name)?;
    let k = |s: &str| format!("{arch_name}.{s}");
    let req = |s: &str| md.req_usize(path, &k(s));
    let hidden_size = req("embedding_length")?;
    let num_hidden_layers = req("block_count")?;
    // Every block has tensors of its own: a count the file cannot hold is
    // refused before anything is sized from it (the per-tensor checks then
    // name the first missing one).
    if num_hidden_layers > h.tensors.len() {
        return Err(meta_err(
            path,
            &k("block_count"),
            format!(
                "{num_hidden_layers} blocks, but the file has only {} tensors",
                h.tensors.len()
            ),
        ));
    }
    let intermediate_size = req("feed_forward_length")?;
    let num_attention_heads = req("attention.head_count")?;
    let num_key_value_heads = md
        .opt_usize(path, &k("attention.head_count_kv"))?
        .unwrap_or(num_attention_heads);
    if num_attention_heads == 0 {
        return Err(meta_err(path, &k("attention.head_count"), "is 0".into()));
    }
    let head_dim = match md.opt_usize(path, &k("attention.key_length"))? {
        Some(d) => d,
        None => hidden_size / num_attention_heads,
    };
    if let Some(vl) = md.opt_usize(path, &k("attention.value_length"))? {
        if vl != head_dim {
            return Err(unsupported(
                path,
                format!("attention.value_length {vl} differs from key_length {head_dim}"),
            ));
        }
    }
    if let Some(rd) = md.opt_usize(path, &k("rope.dimension_count"))? {
        if rd != head_dim {
            return Err(unsupported(
                path,
                format!("partial RoPE: rope.dimension_count {rd} != head_dim {head_dim}"),
            ));
        }
    }
    let rms_norm_eps = md
        .opt_f64(path, &k("attention.layer_norm_rms_epsilon"))?
        .ok_or_else(|| {
            meta_err(
                path,
                &k("attention.layer_norm_rms_epsilon"),
                "missing".into(),
            )
        })?;
    // Stored as f32: round-trip through the shortest f32 decimal so 1e-5 stays 1e-5.
    let rms_norm_eps = shortest_f32(rms_norm_eps);
    let rope_theta = shortest_f32(md.opt_f64(path, &k("rope.freq_base"))?.unwrap_or(10000.0));
    let mut rope_scaling = match md.opt_str(path, &k("rope.scaling.type"))? {
        None | Some("none") => RopeScaling::Default,
        Some("linear") => {
            let key = k("rope.scaling.factor");
            let factor = md
                .opt_f64(path, &key)?
                .ok_or_else(|| meta_err(path, &key, "missing for linear scaling".into()))?;
            RopeScaling::Linear {
                factor: shortest_f32(factor),
            }
        }
        Some(other) => {
            return Err(unsupported(
                path,
                format!(
                    "RoPE scaling type `{other}` (supported: none, linear, llama3 via rope_freqs)"
                ),
            ))
        }
    };
    let max_position_embeddings = md.opt_usize(path, &k("context_length"))?.unwrap_or(2048);

    let emb = h
        .tensor("token_embd.weight")
        .ok_or_else(|| GgufError::MissingTensor {
            path: path.to_path_buf(),
            tensor: "token_embd.weight".into(),
        })?;
    let emb_shape = emb.shape();
    if emb_shape.len() != 2 || emb_shape[1] != hidden_size {
        return Err(GgufError::Tensor {
            path: path.to_path_buf(),
            tensor: emb.name.clone(),
            msg: format!("shape {emb_shape:?}, expected [vocab, {hidden_size}]"),
        });
    }
    let vocab_size = emb_shape[0];
    if let Some(tokens) = md.get("tokenizer.ggml.tokens").and_then(|v| v.as_array()) {
        if tokens.len() != vocab_size {
            return Err(GgufError::Tensor {
                path: path.to_path_buf(),
                tensor: emb.name.clone(),
                msg: format!(
                    "vocab mismatch: tokenizer.ggml.tokens has {} entries, the embedding has {vocab_size} rows",
                    tokens.len()
                ),
            });
        }
    }
    if let Some(factors) = rope_freqs {
        rope_scaling =
            llama3_from_factors(path, factors, rope_theta, head_dim, max_position_embeddings)?;
    }
    let tok = |s: &str| md.opt_usize(path, s).map(|x| x.map(|x| x as u32));
    let cfg = ModelConfig {
        architecture,
        vocab_size,
        hidden_size,
        intermediate_size,
        num_hidden_layers,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        rms_norm_eps,
        rope_theta,
        rope_scaling,
        max_position_embeddings,
        tie_word_embeddings: h.tensor("output.weight").is_none(),
        qkv_bias: h.tensor("blk.0.attn_q.bias").is_some(),
        o_bias: h.tensor("blk.0.attn_output.bias").is_some(),
        bos_token_id: tok("tokenizer.ggml.bos_token_id")?,
        eos_token_ids: tok("tokenizer.ggml.eos_token_id")?.into_iter().collect(),
        torch_dtype: None,
        sliding_window: None,
        quantization_config: None,
    };
    cfg.validate(&path.display().to_string())
        .map_err(|source| GgufError::Config {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(cfg)
}

/// The f64 closest to the decimal that prints `x as f32` (GGUF stores f32; configs say 1e-5).
fn shortest_f32(x: f64) -> f64 {
    format!("{}", x as f32).parse().unwrap_or(x)
}

/// Recover Llama-3.1 scaling from llama.cpp's `rope_freqs` divisors: factor = the largest
/// divisor; low/high frequency factors and the original context are tried from the values
/// Meta's releases use, and accepted only if they reproduce every divisor.
fn llama3_from_factors(
    path: &Path,
    factors: &[f32],
    theta: f64,
    head_dim: usize,
    ctx: usize,
) -> Result<RopeScaling> {
    if factors.len() != head_dim / 2 {
        return Err(GgufError::Tensor {
            path: path.to_path_buf(),
            tensor: "rope_freqs.weight".into(),
            msg: format!(
                "{} entries, expected head_dim/2 = {}",
                factors.len(),
                head_dim / 2
            ),
        });
    }
    let factor = factors.iter().cloned().fold(f32::MIN, f32::max) as f64;
    let plain = RopeScaling::Default.inv_freq(theta, head_dim);
    for orig in [8192usize, 4096, 2048, 16384, 32768, ctx] {
        for (lff, hff) in [(1.0, 4.0), (1.0, 2.0), (2.0, 4.0)] {
            let cand = RopeScaling::Llama3 {
                factor,
                low_freq_factor: lff,
                high_freq_factor: hff,
                original_max_position_embeddings: orig,
            };
            let scaled = cand.inv_freq(theta, head_dim);
            let ok = plain
                .iter()
                .zip(&scaled)
                .zip(factors)
                .all(|((p, s), f)| ((p / s) - f).abs() <= 1e-3 * f.abs().max(1.0));
            if ok {
                return Ok(cand);
            }
        }
    }
    Err(unsupported(
        path,
        "rope_freqs.weight does not match llama3 RoPE scaling with any known parameters".into(),
    ))
}

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
