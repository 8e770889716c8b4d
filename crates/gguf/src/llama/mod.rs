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

mod config;
mod model;

pub use config::config_from_header;
pub use model::{gguf_row, load_hf_tensors, GgufModel, HfTensor, HfTensors, RawTensor};

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
