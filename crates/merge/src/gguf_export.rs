//! `export-gguf`: a base model (+ an optional LoRA adapter, merged in f32) written as a
//! llama-architecture GGUF file that llama.cpp loads.
//!
//! Per tensor: decode to f32 in HF layout ([`SourceModel`]), add `scaling · B·A` for
//! adapted projections ([`crate::add_delta`]), permute q/k rows to llama.cpp's
//! interleaved-RoPE order ([`permute_rows`], `n_heads` for q, `n_kv_heads` for k),
//! encode ([`qlora_gguf::quantize`]) as [`qlora_gguf::recipe`] chooses per tensor (llama.cpp's
//! `llama-quantize` recipes) and stream it into the file. Peak memory is one f32 tensor
//! plus its encoding.
//!
//! Nothing is written at `out` until the file is complete: it is streamed to a
//! temporary sibling and renamed; an existing `out` is refused unless `force`.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use qlora_config::{Architecture, ModelConfig};
use qlora_gguf::export_meta;
use qlora_gguf::llama::{gguf_name, permute_rows};
pub use qlora_gguf::recipe::ExportType;
use qlora_gguf::recipe::{recipe_type, rel_rms_error};
use qlora_gguf::writer::{StreamWriter, TensorPlan};
use qlora_gguf::{GgmlType, MetaValue};
use qlora_lora::Adapter;

use crate::source::{expected_names, SourceModel};

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
