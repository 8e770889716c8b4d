//! `export-gguf`: a base model (+ an optional LoRA adapter, merged in f32) written as a
//! llama-architecture GGUF file that llama.cpp loads.
//!
//! Per tensor: decode to f32 in HF layout ([`SourceModel`]), add `scaling · B·A` for
//! adapted projections ([`crate::add_delta`]), permute q/k rows to llama.cpp's
//! interleaved-RoPE order ([`permute_rows`], `n_heads` for q, `n_kv_heads` for k),
//! encode ([`qlora_gguf::quantize`]) and stream it into the file. Peak memory is one
//! f32 tensor plus its encoding.
//!
//! Tensor types ([`tensor_type`]), following llama.cpp:
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
//!
//! Nothing is written at `out` until the file is complete: it is streamed to a
//! temporary sibling and renamed; an existing `out` is refused unless `force`.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use qlora_config::{Architecture, ModelConfig};
use qlora_gguf::export_meta;
use qlora_gguf::llama::{gguf_name, permute_rows};
use qlora_gguf::writer::{StreamWriter, TensorPlan};
use qlora_gguf::{GgmlType, MetaValue};
use qlora_lora::Adapter;

use crate::source::{expected_names, SourceModel};

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

/// Options of [`export_gguf`].
#[derive(Debug, Clone)]
pub struct ExportOptions {
    pub ty: ExportType,
    /// Replace an existing output file.
    pub force: bool,
    /// `general.name` (default: the source's, else the folder / file name).
    pub name: Option<String>,
    /// Testing only: write q/k rows in HF order (what a converter without llama.cpp's
    /// permutation would produce), to show that the read-back check catches it.
    #[doc(hidden)]
    pub skip_qk_permutation: bool,
}

impl ExportOptions {
    pub fn new(ty: ExportType) -> Self {
        ExportOptions {
            ty,
            force: false,
            name: None,
            skip_qk_permutation: false,
        }
    }
}

/// One written tensor.
#[derive(Debug, Clone)]
pub struct TensorReport {
    pub name: String,
    /// Row-major shape.
    pub shape: Vec<usize>,
    pub ggml_type: GgmlType,
    /// Why the type differs from the export type's rule (row length), if it does.
    pub fallback: Option<String>,
    /// ‖decode(encode(w)) − w‖ / ‖w‖ of this tensor (0 for F32).
    pub rel_rms_error: f64,
    /// Whether an adapter delta was merged into it.
    pub merged: bool,
}

/// What [`export_gguf`] wrote.
#[derive(Debug, Clone)]
pub struct ExportReport {
    pub out: PathBuf,
    pub ty: ExportType,
    pub tensors: Vec<TensorReport>,
    pub merged_modules: usize,
    /// Largest |scaling · (B @ A)| entry over the merged modules.
    pub max_abs_delta: f32,
    pub file_bytes: u64,
    /// Where the tokenizer metadata came from.
    pub tokenizer_source: String,
}

impl ExportReport {
    /// Tensors per ggml type, e.g. `[(Q4_K, 30), (Q5_0, 180), (F32, 61), …]`.
    pub fn type_counts(&self) -> Vec<(GgmlType, usize)> {
        let mut v: Vec<(GgmlType, usize)> = Vec::new();
        for t in &self.tensors {
            match v.iter_mut().find(|(g, _)| *g == t.ggml_type) {
                Some((_, n)) => *n += 1,
                None => v.push((t.ggml_type, 1)),
            }
        }
        v
    }

    /// Largest per-tensor relative RMS encoding error.
    pub fn max_rel_rms_error(&self) -> f64 {
        self.tensors
            .iter()
            .map(|t| t.rel_rms_error)
            .fold(0.0, f64::max)
    }
}

/// Refuse what llama.cpp's architectures (as we write them) cannot represent: attention
/// biases outside Qwen2 (llama.cpp's `qwen2` has q/k/v biases; `llama` as we write it none).
fn check_supported(c: &ModelConfig, origin: &Path) -> Result<()> {
    let biases_ok = match c.architecture {
        Architecture::Qwen2 => !c.o_bias,
        _ => !c.qkv_bias && !c.o_bias,
    };
    if !biases_ok {
        bail!(
            "{}: cannot export attention biases (attention_bias: true) of a {} model as a GGUF; \
             supported: Llama / Mistral / Qwen3 without biases, Qwen2 with q/k/v biases",
            origin.display(),
            c.architecture.as_str()
        );
    }
    Ok(())
}

/// Row-major shape each HF tensor must have according to the config.
fn expected_shape(c: &ModelConfig, name: &str) -> Vec<usize> {
    if name == "model.embed_tokens.weight" || name == "lm_head.weight" {
        return vec![c.vocab_size, c.hidden_size];
    }
    if name.ends_with("q_norm.weight") || name.ends_with("k_norm.weight") {
        return vec![c.head_dim];
    }
    if name.ends_with("norm.weight") {
        return vec![c.hidden_size];
    }
    if let Some(w) = name.strip_suffix(".bias") {
        let short = w.rsplit('.').next().unwrap_or_default();
        return c
            .linear_shapes()
            .iter()
            .find(|(s, _)| *s == short)
            .map(|(_, s)| vec![s[0]])
            .unwrap_or_default();
    }
    let short = name
        .trim_end_matches(".weight")
        .rsplit('.')
        .next()
        .unwrap_or_default();
    c.linear_shapes()
        .iter()
        .find(|(s, _)| *s == short)
        .map(|(_, s)| s.to_vec())
        .unwrap_or_default()
}

fn rel_rms_error(ty: GgmlType, w: &[f32], bytes: &[u8]) -> Result<f64> {
    if ty == GgmlType::F32 {
        return Ok(0.0);
    }
    let back = qlora_gguf::dequant::dequantize(ty, bytes, w.len())
        .map_err(|e| anyhow::anyhow!("decoding our own {ty} encoding: {e}"))?;
    let (mut num, mut den) = (0f64, 0f64);
    for (a, b) in w.iter().zip(&back) {
        num += ((a - b) as f64).powi(2);
        den += (*a as f64).powi(2);
    }
    Ok(if den > 0.0 { (num / den).sqrt() } else { 0.0 })
}

/// Export `model` (HF folder, bnb-4bit folder or .gguf) with `adapter` merged to `out`.
pub fn export_gguf(
    model: &Path,
    adapter: Option<&Path>,
    out: &Path,
    opts: &ExportOptions,
) -> Result<ExportReport> {
    let same = |a: &Path, b: &Path| matches!((std::fs::canonicalize(a), std::fs::canonicalize(b)), (Ok(x), Ok(y)) if x == y);
    if out.exists() && same(out, model) {
        bail!(
            "{}: the output is the source model itself; write to another file",
            out.display()
        );
    }
    if out.exists() && !opts.force {
        bail!(
            "{}: output exists (use --force to replace it)",
            out.display()
        );
    }
    if out.is_dir() {
        bail!(
            "{}: output is a folder, expected a .gguf file path",
            out.display()
        );
    }
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.is_dir() {
            bail!("{}: output folder does not exist", parent.display());
        }
    }
    let src = SourceModel::open(model)?;
    let c = src.config().clone();
    check_supported(&c, model)?;
    let adapter: Option<Adapter> = match adapter {
        Some(dir) => Some(
            qlora_lora::load_adapter(dir, Some(&c))
                .with_context(|| {
                    format!(
                        "adapter {} does not fit the base model {}",
                        dir.display(),
                        model.display()
                    )
                })?
                .1,
        ),
        None => None,
    };

    // Metadata.
    let default_name = model
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let (general, tokenizer, tokenizer_source) = match src.gguf() {
        Some(g) => {
            let (keys, tok) = export_meta::copied_from_gguf(g.file().header(), c.vocab_size)?;
            (keys, tok, format!("copied from {}", model.display()))
        }
        None => (
            Vec::new(),
            export_meta::tokenizer_from_folder(model, &c)?,
            format!("converted from {}", model.join("tokenizer.json").display()),
        ),
    };
    let mut md: Vec<(String, MetaValue)> = vec![(
        "general.architecture".into(),
        MetaValue::String(export_meta::gguf_arch(&c).into()),
    )];
    let name = opts.name.clone().or_else(|| {
        general
            .iter()
            .find(|(k, _)| k == "general.name")
            .and_then(|(_, v)| v.as_str().map(str::to_string))
    });
    md.push((
        "general.name".into(),
        MetaValue::String(name.unwrap_or(default_name)),
    ));
    md.extend(general.into_iter().filter(|(k, _)| k != "general.name"));
    md.extend(export_meta::hyper_params(&c));
    md.push((
        "general.file_type".into(),
        MetaValue::U32(opts.ty.file_type()),
    ));
    md.extend(tokenizer);
    md.push(("general.quantization_version".into(), MetaValue::U32(2)));
    md.push(("general.alignment".into(), MetaValue::U32(32)));

    // Tensor plan, in llama.cpp's usual order (rope_freqs, embedding, layers, norm, output).
    let rope = export_meta::rope_freqs(&c);
    let hf_names = expected_names(&c);
    let mut plans = Vec::new();
    let mut types = Vec::new();
    if let Some(f) = &rope {
        plans.push(TensorPlan {
            name: "rope_freqs.weight".into(),
            dims: vec![f.len() as u64],
            ggml_type: GgmlType::F32,
        });
    }
    for hf in &hf_names {
        let shape = expected_shape(&c, hf);
        let g = gguf_name(hf).with_context(|| format!("no GGUF name for {hf}"))?;
        let (t, why) = recipe_type(
            opts.ty,
            &g,
            &shape,
            c.tie_word_embeddings,
            c.num_hidden_layers,
        );
        plans.push(TensorPlan {
            name: g,
            dims: shape.iter().rev().map(|&d| d as u64).collect(),
            ggml_type: t,
        });
        types.push((hf.clone(), shape, t, why));
    }

    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        // partial files of killed exports (`.<name>.tmp-<pid>`)
        qlora_formats::durable::remove_stale_temps(parent);
    }
    let mut w = StreamWriter::create(out, &md, plans)?;
    let mut reports = Vec::new();
    if let Some(f) = &rope {
        let bytes = qlora_gguf::quantize::quantize(GgmlType::F32, f)?;
        w.write_tensor("rope_freqs.weight", &bytes)?;
        reports.push(TensorReport {
            name: "rope_freqs.weight".into(),
            shape: vec![f.len()],
            ggml_type: GgmlType::F32,
            fallback: None,
            rel_rms_error: 0.0,
            merged: false,
        });
    }
    let scaling = adapter.as_ref().map(|a| a.scaling() as f32).unwrap_or(0.0);
    let (mut merged_modules, mut max_abs_delta) = (0usize, 0f32);
    for (hf, shape, ty, why) in types {
        let (got, mut data) = src.tensor(&hf)?;
        if got != shape {
            bail!(
                "{}: tensor `{hf}` is {got:?} but the config implies {shape:?}",
                model.display()
            );
        }
        let module = hf.trim_end_matches(".weight");
        let mut merged = false;
        if let Some(l) = adapter.as_ref().and_then(|a| a.get(module)) {
            let d = crate::add_delta(&mut data, l, scaling).with_context(|| {
                format!("merging the adapter's {module} into {}", model.display())
            })?;
            max_abs_delta = max_abs_delta.max(d);
            merged_modules += 1;
            merged = true;
        }
        let g = gguf_name(&hf).expect("planned names are mapped");
        // llama.cpp's llama architecture wants interleaved-RoPE q/k rows; its qwen2/qwen3
        // converters keep HF's order.
        if !opts.skip_qk_permutation && export_meta::gguf_arch(&c) == "llama" {
            if hf.ends_with("self_attn.q_proj.weight") {
                data = permute_rows(&data, c.num_attention_heads, c.head_dim, c.hidden_size);
            } else if hf.ends_with("self_attn.k_proj.weight") {
                data = permute_rows(&data, c.num_key_value_heads, c.head_dim, c.hidden_size);
            }
        }
        let bytes = qlora_gguf::quantize::quantize(ty, &data)
            .with_context(|| format!("{}: encoding `{hf}` as {ty}", model.display()))?;
        let rel = rel_rms_error(ty, &data, &bytes)?;
        drop(data);
        src.release(&hf);
        w.write_tensor(&g, &bytes)?;
        reports.push(TensorReport {
            name: g,
            shape,
            ggml_type: ty,
            fallback: why,
            rel_rms_error: rel,
            merged,
        });
    }
    if let Some(a) = &adapter {
        ensure!(
            merged_modules == a.layers.len(),
            "{}: merged {merged_modules} of the adapter's {} modules",
            model.display(),
            a.layers.len()
        );
    }
    w.finish()?;
    let file_bytes = std::fs::metadata(out)
        .with_context(|| format!("reading back {}", out.display()))?
        .len();
    Ok(ExportReport {
        out: out.to_path_buf(),
        ty: opts.ty,
        tensors: reports,
        merged_modules,
        max_abs_delta,
        file_bytes,
        tokenizer_source,
    })
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
