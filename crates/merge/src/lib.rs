//! Merging a LoRA adapter into its base model: `W' = W + scaling · (B @ A)`
//! for every adapted projection (DoRA: that, times `m / ‖W + scaling·B·A‖` per
//! output row, see [`add_delta`]), written as a plain Hugging Face folder.
//!
//! Two sources for `W` (the most-filed complaint about the peers is that they
//! silently pick the lossy one):
//! - [`MergeFrom::Original`]: the unquantized weights of the source folder.
//!   Best quality: the 4-bit rounding error of the training base is not baked
//!   into the deployed model.
//! - [`MergeFrom::Dequantized`]: `dequant(W4)`, the weights the adapter was
//!   actually trained against (the only choice for a bnb-4bit source; for an
//!   unquantized source the quantization the trainer used is re-applied, which
//!   is exact because quantization is deterministic).
//!
//! [`requantize`] writes the merged model as a bitsandbytes 4-bit folder and measures
//! what that costs in logits; [`gguf_export`] writes it as a llama.cpp GGUF file (the
//! per-tensor types are `qlora_gguf::recipe`'s, the read-back check `qlora_infer::check`).
//!
//! The work is streamed one tensor at a time from the memory-mapped input:
//! peak memory is one full-precision weight (plus its delta row buffer), not
//! the model.

use std::path::{Path, PathBuf};

pub mod gguf_export;
pub mod prompts;
pub mod requantize;
pub mod source;

pub use gguf_export::{export_gguf, ExportOptions, ExportReport, ExportType};
pub use requantize::{merge_requantized, RequantizationError, RequantizeReport};
pub use source::SourceModel;

use anyhow::{bail, Context, Result};
use half::{bf16, f16};
use qlora_formats::bnb::{self, bnb4_weight_keys, is_bnb4_key, read_bnb4};
use qlora_formats::folder::{
    check_output, copy_side_files, read_config_map, write_config_json, write_model_shards,
    OutputFolder,
};
use qlora_formats::{Dtype, ModelFiles, SafetensorsWriter, TensorSpec, TensorView};
use qlora_lora::LoraWeights;
use qlora_quant::{DType, Input, QuantOptions};
use rayon::prelude::*;
use serde_json::Value;

/// Which weights the delta is added to (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergeFrom {
    Original,
    Dequantized,
}

impl MergeFrom {
    pub fn as_str(self) -> &'static str {
        match self {
            MergeFrom::Original => "original",
            MergeFrom::Dequantized => "dequantized",
        }
    }
}

/// Options of [`merge_model`].
#[derive(Debug, Clone)]
pub struct MergeOptions {
    /// Output dtype; `None`: the source model's dtype (config.json), else bf16.
    pub dtype: Option<DType>,
    /// `None`: `Original` when the source has unquantized weights, else `Dequantized`.
    pub from: Option<MergeFrom>,
    /// The quantization the adapter was trained against, re-applied for
    /// `Dequantized` on an unquantized source (qlora train's default: NF4,
    /// block 64, double quant).
    pub quant: QuantOptions,
    pub max_shard_size: u64,
    pub force: bool,
}

impl Default for MergeOptions {
    fn default() -> Self {
        MergeOptions {
            dtype: None,
            from: None,
            quant: QuantOptions::default(),
            max_shard_size: qlora_formats::DEFAULT_MAX_SHARD_SIZE,
            force: false,
        }
    }
}

/// What [`merge_model`] did.
#[derive(Debug, Clone)]
pub struct MergeReport {
    pub from: MergeFrom,
    /// Why `from` was used (printed for the user).
    pub reason: String,
    pub dtype: DType,
    pub merged_modules: usize,
    pub copied_tensors: usize,
    /// Largest |scaling · (B @ A)| entry over all merged modules.
    pub max_abs_delta: f32,
    pub files: Vec<PathBuf>,
}

/// One output tensor and how to make it.
enum Job {
    /// Copy (casting floats to the output dtype).
    Copy { name: String },
    /// Reconstruct `W` (original, bnb-dequantized, or re-quantized) and add the delta.
    Weight {
        name: String,
        module: Option<String>,
        bnb: bool,
    },
}

/// Merge `adapter_dir` into the model folder `model_dir`, writing `out`.
pub fn merge_model(
    model_dir: &Path,
    adapter_dir: &Path,
    out: &Path,
    opts: &MergeOptions,
) -> Result<MergeReport> {
    check_output(model_dir, out, opts.force)?;
    let cfg_path = model_dir.join("config.json");
    let cfg = qlora_config::ModelConfig::from_file(&cfg_path)?;
    let (_peft, adapter) =
        qlora_lora::load_adapter(adapter_dir, Some(&cfg)).with_context(|| {
            format!(
                "adapter {} does not fit the base model {}",
                adapter_dir.display(),
                model_dir.display()
            )
        })?;
    let src = ModelFiles::open(model_dir)?;
    let bnb_weights: std::collections::HashSet<String> =
        bnb4_weight_keys(&src).into_iter().collect();
    let quantized_source = !bnb_weights.is_empty();

    let (from, reason) = match (opts.from, quantized_source) {
        (Some(MergeFrom::Original), true) => bail!(
            "{}: --from original needs the unquantized weights, but this is a bitsandbytes 4-bit \
             checkpoint; pass the original full-precision model folder as --model, or use --from dequantized",
            model_dir.display()
        ),
        (Some(MergeFrom::Original), false) => (
            MergeFrom::Original,
            "as requested: the original full-precision weights (best quality: no 4-bit rounding baked in)".to_string(),
        ),
        (None, false) => (
            MergeFrom::Original,
            "the source has full-precision weights, so the merge uses them (best quality: the 4-bit \
             rounding error of the training base is not baked in); --from dequantized reproduces the trained base instead"
                .to_string(),
        ),
        (Some(MergeFrom::Dequantized), false) => (
            MergeFrom::Dequantized,
            format!(
                "as requested: dequant(quantize(W)) with {} blocksize {}{} — the weights the adapter was trained against",
                opts.quant.quant_type.as_str(),
                opts.quant.blocksize,
                if opts.quant.double_quant { " + double quant" } else { "" }
            ),
        ),
        (_, true) => (
            MergeFrom::Dequantized,
            "the source is a bitsandbytes 4-bit checkpoint: its dequantized weights are the only ones available \
             (and exactly what the adapter was trained against)"
                .to_string(),
        ),
    };

    let dtype = match opts.dtype {
        Some(d) => d,
        None => match cfg.torch_dtype {
            Some(qlora_config::DType::F32) if !quantized_source => DType::F32,
            Some(qlora_config::DType::F16) => DType::F16,
            _ => DType::BF16,
        },
    };
    let out_dtype = to_st_dtype(dtype);

    // Plan: one job per output tensor, in the source's name order.
    let mut jobs = Vec::new();
    let mut units = Vec::new();
    let mut merged_modules = 0usize;
    for name in src.names() {
        let t = src.tensor(name)?;
        let is_bnb = bnb_weights.contains(name);
        if !is_bnb && is_bnb4_key(name, &bnb_weights) {
            continue; // absmax, quant maps, quant state: consumed with their weight
        }
        let module = name
            .strip_suffix(".weight")
            .filter(|m| adapter.layers.contains_key(*m));
        if is_bnb || module.is_some() {
            let shape = if is_bnb {
                read_bnb4(&src, name)?
                    .with_context(|| format!("{name}: quant state vanished"))?
                    .shape
            } else {
                t.shape.to_vec()
            };
            if let Some(m) = module {
                let w = &adapter.layers[m];
                let (o, i) = (w.b.rows(), w.a.cols());
                if shape != [o, i] {
                    bail!(
                        "{}: {name} is {shape:?} but the adapter's {m} is for [{o}, {i}] (adapter made for another base model?)",
                        src.file_of(name).unwrap_or(model_dir).display()
                    );
                }
                merged_modules += 1;
            }
            units.push(vec![TensorSpec::new(name, out_dtype, shape)]);
            jobs.push(Job::Weight {
                name: name.to_string(),
                module: module.map(str::to_string),
                bnb: is_bnb,
            });
        } else {
            let d = if is_float(t.dtype) {
                out_dtype
            } else {
                t.dtype
            };
            units.push(vec![TensorSpec::new(name, d, t.shape.to_vec())]);
            jobs.push(Job::Copy {
                name: name.to_string(),
            });
        }
    }
    if merged_modules != adapter.layers.len() {
        let missing: Vec<&String> = adapter
            .layers
            .keys()
            .filter(|m| !src.contains(&format!("{m}.weight")))
            .collect();
        bail!(
            "{}: the adapter adapts modules the model does not have: {missing:?}",
            model_dir.display()
        );
    }

    let folder = OutputFolder::new(out)?;
    let scaling = adapter.scaling() as f32;
    let mut max_abs_delta = 0f32;
    let mut copied_tensors = 0usize;
    let files = write_model_shards(folder.path(), &units, opts.max_shard_size, |k, w| {
        match &jobs[k] {
            Job::Copy { name } => {
                let t = src.tensor(name)?;
                copied_tensors += 1;
                write_cast(w, &t, out_dtype)?;
            }
            Job::Weight { name, module, bnb } => {
                let mut wt = match (bnb, from) {
                    (true, _) => read_bnb4(&src, name)?
                        .expect("planned as bnb")
                        .dequantize_f32(),
                    (false, MergeFrom::Original) => src.tensor(name)?.to_f32()?,
                    (false, MergeFrom::Dequantized) => requantized(&src.tensor(name)?, &opts.quant)
                        .map_err(|e| {
                            invalid(
                                src.file_of(name).unwrap_or(model_dir),
                                format!("{name}: {e:#}"),
                            )
                        })?,
                };
                if let Some(m) = module {
                    let d = add_delta(&mut wt, &adapter.layers[m], scaling)
                        .map_err(|e| invalid(adapter_dir, format!("{m}: {e:#}")))?;
                    max_abs_delta = max_abs_delta.max(d);
                }
                write_f32_as(w, name, &wt, out_dtype)?;
            }
        }
        src.release(names_of(&jobs[k]));
        Ok(())
    })?;

    let mut config = read_config_map(model_dir)?;
    config.remove("quantization_config");
    let dname = Value::String(dtype.torch_name().into());
    let mut wrote_dtype = false;
    for k in ["dtype", "torch_dtype"] {
        if config.contains_key(k) {
            config.insert(k.into(), dname.clone());
            wrote_dtype = true;
        }
    }
    if !wrote_dtype {
        config.insert("torch_dtype".into(), dname);
    }
    write_config_json(&folder.path().join("config.json"), &config)?;
    copy_side_files(model_dir, folder.path())?;
    folder.commit(out)?;
    Ok(MergeReport {
        from,
        reason,
        dtype,
        merged_modules,
        copied_tensors,
        max_abs_delta,
        files: files
            .iter()
            .map(|f| out.join(f.file_name().expect("shard has a name")))
            .collect(),
    })
}

fn invalid(path: &Path, msg: String) -> qlora_formats::FormatError {
    qlora_formats::FormatError::Invalid {
        path: path.display().to_string(),
        msg,
    }
}

fn names_of(j: &Job) -> &str {
    match j {
        Job::Copy { name } | Job::Weight { name, .. } => name,
    }
}

/// `W += scaling · (B @ A)` in f32, row by row: `(B @ A)` accumulated over the
/// rank in order, then scaled, then added (PEFT's `get_delta_weight` order).
/// Returns the largest |delta| entry.
///
/// DoRA (`lora.magnitude` set): then each row is multiplied by
/// `m[o] / ‖W + s·B·A‖[o]`, PEFT's `DoraLinearVariant.merge_safe`: the norm is
/// the row norm of the un-merged base plus the delta (`get_weight_norm(W,
/// delta, scaling=1)`), i.e. of the row just formed, and the bias is unchanged.
pub fn add_delta(w: &mut [f32], lora: &LoraWeights, scaling: f32) -> Result<f32> {
    let [r, inf] = lora.a.dims();
    let [outf, rb] = lora.b.dims();
    if rb != r || w.len() != outf * inf {
        bail!(
            "A is [{r}, {inf}], B is [{outf}, {rb}], weight has {} elements",
            w.len()
        );
    }
    if let Some(m) = &lora.magnitude {
        if m.len() != outf {
            bail!("DoRA magnitude has {} values, B has {outf} rows", m.len());
        }
    }
    let magnitude = lora.magnitude.as_deref();
    let (a, b) = (lora.a.data(), lora.b.data());
    // (|x| of NaN is not > m, so a NaN entry is reported through `NAN` here.)
    let max = w
        .par_chunks_mut(inf)
        .enumerate()
        .map_init(
            || vec![0f32; inf],
            |acc, (o, row)| {
                acc.fill(0.0);
                for k in 0..r {
                    let c = b[o * r + k];
                    for (x, ak) in acc.iter_mut().zip(&a[k * inf..(k + 1) * inf]) {
                        *x += c * ak;
                    }
                }
                let mut m = 0f32;
                let mut finite = true;
                for (x, d) in row.iter_mut().zip(acc.iter()) {
                    let d = d * scaling;
                    m = m.max(d.abs());
                    *x += d;
                    finite &= x.is_finite();
                }
                if let Some(mag) = magnitude {
                    let norm = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt() as f32;
                    let factor = mag[o] / norm;
                    row.iter_mut().for_each(|v| *v *= factor);
                    finite &= factor.is_finite();
                }
                if finite {
                    m
                } else {
                    f32::NAN
                }
            },
        )
        .reduce(
            || 0f32,
            |a, b| {
                if a.is_nan() || b.is_nan() {
                    f32::NAN
                } else {
                    a.max(b)
                }
            },
        );
    if max.is_nan() {
        bail!("the merged weight has non-finite values (inf/NaN in the base weight or the adapter); refusing to write it");
    }
    Ok(max)
}

/// `dequant(quantize(W))`: the base the adapter was trained against.
fn requantized(t: &TensorView<'_>, q: &QuantOptions) -> Result<Vec<f32>> {
    let shape = t.shape.to_vec();
    // `quantize_bnb`: bitsandbytes' exact double-quant offset, so this equals
    // the dequantized weights of a `qlora quantize` / transformers checkpoint.
    let q4 = match t.dtype {
        Dtype::BF16 => bnb::quantize_bnb(Input::BF16(&t.to_bf16()?), &shape, q)?,
        Dtype::F16 => bnb::quantize_bnb(Input::F16(&t.to_f16()?), &shape, q)?,
        _ => bnb::quantize_bnb(Input::F32(&t.to_f32()?), &shape, q)?,
    };
    Ok(q4.dequantize_f32())
}

fn to_st_dtype(d: DType) -> Dtype {
    match d {
        DType::F32 => Dtype::F32,
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::BF16,
    }
}

fn is_float(d: Dtype) -> bool {
    matches!(d, Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64)
}

fn write_f32_as(
    w: &mut SafetensorsWriter,
    name: &str,
    v: &[f32],
    d: Dtype,
) -> qlora_formats::Result<()> {
    match d {
        Dtype::F32 => w.write_f32(name, v),
        Dtype::BF16 => w.write_bf16(
            name,
            &v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>(),
        ),
        Dtype::F16 => w.write_f16(
            name,
            &v.iter().map(|&x| f16::from_f32(x)).collect::<Vec<_>>(),
        ),
        other => unreachable!("merge output dtype {other} is always a float dtype"),
    }
}

fn write_cast(
    w: &mut SafetensorsWriter,
    t: &TensorView<'_>,
    d: Dtype,
) -> qlora_formats::Result<()> {
    if t.dtype == d || !is_float(t.dtype) {
        return w.write(t.name, t.data);
    }
    write_f32_as(w, t.name, &t.to_f32()?, d)
}
