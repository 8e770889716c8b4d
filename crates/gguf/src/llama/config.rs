//! A llama-family GGUF's metadata as a [`ModelConfig`], RoPE scaling included (a
//! `rope_freqs` tensor mapped back to Llama-3 scaling).

use super::*;

/// Architectures we map, and whether their q/k rows were permuted by the converter.
pub(super) fn arch_of(path: &Path, arch: &str) -> Result<(Architecture, bool)> {
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

pub(super) fn config_with_rope_freqs(
    h: &GgufHeader,
    rope_freqs: Option<&[f32]>,
) -> Result<ModelConfig> {
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
