//! The ggml type of each tensor of a llama-family export (`qlora export-gguf --type`),
//! following llama.cpp's `llama-quantize` recipes, and the encoding error of a tensor.
//!
//! Tensor types ([`tensor_type`], [`recipe_type`]):
//! - 1-D tensors (norms, `rope_freqs`): F32 (ggml needs f32 norms).
//! - `f16`: every matrix F16 (`convert_hf_to_gguf.py --outtype f16`).
//! - `q8_0`: every matrix Q8_0, embedding included (`--outtype q8_0`).
//! - `q4_0`: Q4_0, except the output projection (`output.weight`, or `token_embd`
//!   when tied, since it then serves as the output) which gets Q6_K, as
//!   `llama-quantize`'s `llama_tensor_get_type` does for every 4-bit type.
//! - `q4_k`: Q4_K with Q6_K for the output projection: llama.cpp's Q4_K_S base rule
//!   (without its per-layer bumps of a few attn_v / ffn_down tensors to Q5_K/Q6_K).
//!   `general.file_type` says MOSTLY_Q4_K_S.
//! - `q4_k_m` / `q5_k_m`: llama.cpp's mixed recipes LLAMA_FTYPE_MOSTLY_Q4_K_M / Q5_K_M
//!   (`llama_tensor_get_type_impl` in llama.cpp's src/llama-quant.cpp): Q4_K (Q5_K) base;
//!   `attn_v.weight` and `ffn_down.weight` of the layers where `use_more_bits(i_layer,
//!   n_layer)` holds ([`use_more_bits`]: the first and last eighth of the layers and
//!   every third layer in between) take Q6_K; the output projection Q6_K as above (Q8_0
//!   when its rows are not a multiple of 256). The token embedding of an untied model
//!   keeps the base type. For attn_v llama.cpp counts attn_v tensors in file order, which
//!   for these architectures (one attn_v per layer, written by layer) is the layer index.
//! - Fallback when a row length is not a multiple of the block size (K-quants need
//!   256: SmolLM2's 576-wide rows): llama.cpp's own fallback chain, Q4_K → Q5_0,
//!   Q6_K → Q8_0, and anything whose rows are not a multiple of 32 → F16.

use anyhow::{bail, Result};

use crate::GgmlType;

/// The `--type` of an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportType {
    F16,
    Q8_0,
    Q4_0,
    Q4K,
    /// llama.cpp's Q4_K_M mix.
    Q4KM,
    /// llama.cpp's Q5_K_M mix.
    Q5KM,
}

impl std::str::FromStr for ExportType {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "f16" => ExportType::F16,
            "q8_0" => ExportType::Q8_0,
            "q4_0" => ExportType::Q4_0,
            "q4_k" | "q4_k_s" => ExportType::Q4K,
            "q4_k_m" => ExportType::Q4KM,
            "q5_k_m" => ExportType::Q5KM,
            other => bail!(
                "unknown GGUF type `{other}` (expected f16, q8_0, q4_0, q4_k, q4_k_m or q5_k_m)"
            ),
        })
    }
}

impl ExportType {
    pub fn as_str(self) -> &'static str {
        match self {
            ExportType::F16 => "f16",
            ExportType::Q8_0 => "q8_0",
            ExportType::Q4_0 => "q4_0",
            ExportType::Q4K => "q4_k",
            ExportType::Q4KM => "q4_k_m",
            ExportType::Q5KM => "q5_k_m",
        }
    }

    /// llama.cpp's `llama_ftype` for `general.file_type`.
    pub fn file_type(self) -> u32 {
        match self {
            ExportType::F16 => 1,
            ExportType::Q8_0 => 7,
            ExportType::Q4_0 => 2,
            ExportType::Q4K => 14,
            // LLAMA_FTYPE_MOSTLY_Q4_K_M, LLAMA_FTYPE_MOSTLY_Q5_K_M (llama.h)
            ExportType::Q4KM => 15,
            ExportType::Q5KM => 17,
        }
    }

    /// The type of an ordinary (not output-side) matrix.
    fn base(self) -> GgmlType {
        match self {
            ExportType::F16 => GgmlType::F16,
            ExportType::Q8_0 => GgmlType::Q8_0,
            ExportType::Q4_0 => GgmlType::Q4_0,
            ExportType::Q4K | ExportType::Q4KM => GgmlType::Q4_K,
            ExportType::Q5KM => GgmlType::Q5_K,
        }
    }
}

/// The ggml type of one tensor and, when it differs from the rule, why.
/// `shape` is row-major (`[out, in]`); `output_side` is true for `output.weight`, or
/// for `token_embd.weight` when the embedding is tied (it is then the output too).
pub fn tensor_type(
    ty: ExportType,
    shape: &[usize],
    output_side: bool,
) -> (GgmlType, Option<String>) {
    if shape.len() < 2 {
        return (GgmlType::F32, None);
    }
    let mut t = ty.base();
    if output_side
        && matches!(
            ty,
            ExportType::Q4_0 | ExportType::Q4K | ExportType::Q4KM | ExportType::Q5KM
        )
    {
        t = GgmlType::Q6_K;
    }
    let cols = shape[shape.len() - 1];
    let wanted = t;
    t = t.for_row(cols as u64);
    let why = (t != wanted).then(|| {
        format!(
            "{wanted} needs rows that are a multiple of {}, these have {cols}",
            wanted.block_size()
        )
    });
    (t, why)
}

/// llama.cpp's `use_more_bits(i_layer, n_layers)` (src/llama-quant.cpp): the layers whose
/// `attn_v` / `ffn_down` the `_M` recipes give more bits: the first eighth, the last
/// eighth, and every third layer in between (integer division as in C).
pub fn use_more_bits(i_layer: usize, n_layers: usize) -> bool {
    let e = n_layers / 8;
    i_layer < e || i_layer >= 7 * n_layers / 8 || (i_layer - e) % 3 == 2
}

/// The ggml type of the GGUF tensor `name` (`blk.N.attn_v.weight`, `output.weight`, ...)
/// of shape `shape` in a model of `n_layers` layers: [`tensor_type`] plus the per-layer
/// Q6_K bumps of the `_M` recipes (see the module docs).
pub fn recipe_type(
    ty: ExportType,
    name: &str,
    shape: &[usize],
    tied: bool,
    n_layers: usize,
) -> (GgmlType, Option<String>) {
    let output_side = name == "output.weight" || (tied && name == "token_embd.weight");
    let bumped = matches!(ty, ExportType::Q4KM | ExportType::Q5KM)
        && shape.len() >= 2
        && (name.ends_with(".attn_v.weight") || name.ends_with(".ffn_down.weight"))
        && name
            .strip_prefix("blk.")
            .and_then(|r| r.split('.').next())
            .and_then(|i| i.parse::<usize>().ok())
            .is_some_and(|i| use_more_bits(i, n_layers));
    if !bumped {
        return tensor_type(ty, shape, output_side);
    }
    let cols = shape[shape.len() - 1];
    let t = GgmlType::Q6_K.for_row(cols as u64);
    let why = (t != GgmlType::Q6_K).then(|| {
        format!(
            "{} needs rows that are a multiple of {}, these have {cols}",
            GgmlType::Q6_K,
            GgmlType::Q6_K.block_size()
        )
    });
    (t, why)
}

/// ‖decode(encode(w)) − w‖ / ‖w‖ of one tensor encoded as `ty` (0 for F32).
pub fn rel_rms_error(ty: GgmlType, w: &[f32], bytes: &[u8]) -> Result<f64> {
    if ty == GgmlType::F32 {
        return Ok(0.0);
    }
    let back = crate::dequant::dequantize(ty, bytes, w.len())
        .map_err(|e| anyhow::anyhow!("decoding our own {ty} encoding: {e}"))?;
    let (mut num, mut den) = (0f64, 0f64);
    for (a, b) in w.iter().zip(&back) {
        num += ((a - b) as f64).powi(2);
        den += (*a as f64).powi(2);
    }
    Ok(if den > 0.0 { (num / den).sqrt() } else { 0.0 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_rules_and_fallbacks_follow_llama_cpp() {
        use ExportType::*;
        use GgmlType as G;
        let t = |ty, shape: &[usize], out| tensor_type(ty, shape, out).0;
        // Norms stay F32 for every type.
        for ty in [F16, Q8_0, Q4_0, Q4K] {
            assert_eq!(t(ty, &[576], false), G::F32);
        }
        assert_eq!(t(F16, &[192, 576], false), G::F16);
        assert_eq!(t(Q8_0, &[49152, 576], true), G::Q8_0);
        assert_eq!(t(Q4_0, &[192, 576], false), G::Q4_0);
        // Output projection: Q6_K, which needs 256-multiples: 576 falls back to Q8_0.
        assert_eq!(t(Q4_0, &[32000, 4096], true), G::Q6_K);
        assert_eq!(t(Q4_0, &[49152, 576], true), G::Q8_0);
        assert_eq!(t(Q4K, &[32000, 4096], true), G::Q6_K);
        // Q4_K: 1536-wide rows (ffn_down of SmolLM2) are fine, 576-wide fall back to Q5_0.
        assert_eq!(t(Q4K, &[576, 1536], false), G::Q4_K);
        let (ty, why) = tensor_type(Q4K, &[1536, 576], false);
        assert_eq!(ty, G::Q5_0);
        assert!(why.unwrap().contains("multiple of 256"));
        // Rows that are not even a multiple of 32: F16.
        assert_eq!(t(Q4K, &[64, 80], false), G::F16);
        assert_eq!(t(Q8_0, &[64, 80], false), G::F16);
        assert_eq!(tensor_type(F16, &[64, 80], false).1, None);
    }

    #[test]
    fn k_m_recipes_bump_attn_v_and_ffn_down_where_llama_cpp_does() {
        use ExportType::*;
        use GgmlType as G;
        // 32 layers (Llama-3-8B): n/8 = 4, 7n/8 = 28, and (i - 4) % 3 == 2 in between.
        let more: Vec<usize> = (0..32).filter(|&i| use_more_bits(i, 32)).collect();
        assert_eq!(
            more,
            [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
        );
        // 30 layers (the demo model): n/8 = 3, 7n/8 = 26.
        let more: Vec<usize> = (0..30).filter(|&i| use_more_bits(i, 30)).collect();
        assert_eq!(more, [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]);
        // 2 layers: n/8 = 0, 7n/8 = 1: only the last layer.
        assert!(!use_more_bits(0, 2) && use_more_bits(1, 2));
        let r = |ty, name: &str, shape: &[usize], tied| recipe_type(ty, name, shape, tied, 32).0;
        for (ty, base) in [(Q4KM, G::Q4_K), (Q5KM, G::Q5_K)] {
            assert_eq!(r(ty, "blk.0.attn_v.weight", &[1024, 4096], false), G::Q6_K);
            assert_eq!(r(ty, "blk.4.attn_v.weight", &[1024, 4096], false), base);
            assert_eq!(
                r(ty, "blk.6.ffn_down.weight", &[4096, 14336], false),
                G::Q6_K
            );
            assert_eq!(r(ty, "blk.7.ffn_down.weight", &[4096, 14336], false), base);
            // only attn_v and ffn_down are bumped
            for n in ["attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"] {
                assert_eq!(
                    r(ty, &format!("blk.0.{n}.weight"), &[4096, 4096], false),
                    base
                );
            }
            assert_eq!(r(ty, "output.weight", &[128256, 4096], false), G::Q6_K);
            assert_eq!(r(ty, "token_embd.weight", &[128256, 4096], false), base);
            assert_eq!(r(ty, "token_embd.weight", &[128256, 4096], true), G::Q6_K);
            assert_eq!(r(ty, "blk.0.attn_norm.weight", &[4096], false), G::F32);
            // fallbacks: Q6_K -> Q8_0, Q4_K -> Q5_0, Q5_K -> Q5_1 (576-wide rows)
            assert_eq!(r(ty, "blk.0.attn_v.weight", &[192, 576], false), G::Q8_0);
            let fb = if ty == Q4KM { G::Q5_0 } else { G::Q5_1 };
            assert_eq!(r(ty, "blk.4.attn_v.weight", &[192, 576], false), fb);
            assert_eq!(r(ty, "blk.0.attn_v.weight", &[64, 80], false), G::F16);
        }
    }

    #[test]
    fn export_type_parses_the_cli_spellings() {
        assert_eq!("Q4_K".parse::<ExportType>().unwrap(), ExportType::Q4K);
        assert_eq!("q8_0".parse::<ExportType>().unwrap(), ExportType::Q8_0);
        let e = "q3_k".parse::<ExportType>().unwrap_err().to_string();
        assert!(
            e.contains("expected f16, q8_0, q4_0, q4_k, q4_k_m or q5_k_m"),
            "{e}"
        );
    }
}
