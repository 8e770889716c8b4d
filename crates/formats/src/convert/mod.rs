//! The work behind `qlora quantize` and `qlora dequantize`: whole model
//! folders (sharded or not) and bare safetensors files, streamed tensor by
//! tensor from the memory-mapped input.
//!
//! Streaming with a header-first format needs every output tensor's size up
//! front, and the quant-state JSON's length depends on the double-quant
//! offset, which is only known after quantizing. So quantization runs twice:
//! a planning pass (sizes, JSON, error statistics; results dropped tensor by
//! tensor) and a writing pass. Quantizing is cheap next to reading and
//! writing the data, and this keeps peak memory near one tensor.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use qlora_quant::{DType, QuantOptions};
use serde_json::Value;

use crate::bnb::{self, bnb4_specs, is_quantized_linear};
use crate::error::{FormatError, Result};
use crate::folder::{
    check_output, copy_side_files, read_config_map, write_config_json, OutputFolder,
};
use crate::model_files::{ModelFiles, INDEX_FILE, SINGLE_FILE};
use crate::reader::{SafetensorsFile, TensorView};
use crate::source::TensorSource;
use crate::writer::{SafetensorsWriter, TensorSpec};

mod units;
use units::{
    add_bytes, dtype_name, is_float, quant_error, quantize_view, release_unit, source_dtype,
    write_sharded, write_unit, ReleasePages, TensorErr, Unit,
};

/// Options of `qlora quantize`.
#[derive(Debug, Clone)]
pub struct QuantizeOptions {
    pub quant: QuantOptions,
    /// torch name written as `bnb_4bit_compute_dtype` (`bfloat16`, `float16`, `float32`).
    pub compute_dtype: String,
    /// Split the output into shards of at most this many data bytes.
    pub max_shard_size: u64,
    /// Replace an existing output.
    pub force: bool,
}

impl Default for QuantizeOptions {
    fn default() -> Self {
        QuantizeOptions {
            quant: QuantOptions::default(),
            compute_dtype: "bfloat16".into(),
            max_shard_size: crate::shards::DEFAULT_MAX_SHARD_SIZE,
            force: false,
        }
    }
}

/// Options of `qlora dequantize`.
#[derive(Debug, Clone)]
pub struct DequantizeOptions {
    /// Output dtype of the dequantized weights (and of the other float
    /// tensors); `None`: each weight's recorded dtype, others unchanged.
    pub dtype: Option<DType>,
    pub max_shard_size: u64,
    pub force: bool,
}

impl Default for DequantizeOptions {
    fn default() -> Self {
        DequantizeOptions {
            dtype: None,
            max_shard_size: crate::shards::DEFAULT_MAX_SHARD_SIZE,
            force: false,
        }
    }
}

/// Error statistics of the quantized weights (against their input values).
#[derive(Debug, Clone, Default)]
pub struct ErrorStats {
    /// Σ (w − deq(w))² over all quantized elements.
    pub sum_sq_err: f64,
    /// Σ w².
    pub sum_sq_ref: f64,
    /// max |w − deq(w)|.
    pub max_abs_err: f32,
    /// The tensor with the largest relative RMS error, and that error.
    pub worst: Option<(String, f64)>,
    /// Number of elements compared.
    pub elements: u64,
}

impl ErrorStats {
    /// sqrt(Σ err² / Σ w²) over everything.
    pub fn rel_rms(&self) -> f64 {
        if self.sum_sq_ref > 0.0 {
            (self.sum_sq_err / self.sum_sq_ref).sqrt()
        } else {
            0.0
        }
    }
    fn add(&mut self, name: &str, t: TensorErr) {
        self.sum_sq_err += t.sq_err;
        self.sum_sq_ref += t.sq_ref;
        self.max_abs_err = self.max_abs_err.max(t.max_abs);
        self.elements += t.n;
        let rel = if t.sq_ref > 0.0 {
            (t.sq_err / t.sq_ref).sqrt()
        } else {
            0.0
        };
        if self.worst.as_ref().is_none_or(|(_, w)| rel > *w) {
            self.worst = Some((name.to_string(), rel));
        }
    }
}

/// What a conversion did.
#[derive(Debug, Clone, Default)]
pub struct ConvertReport {
    /// Tensors quantized (quantize) or dequantized (dequantize).
    pub converted: usize,
    /// Tensors copied unchanged (or only cast).
    pub copied: usize,
    /// Input data bytes per dtype name.
    pub input_bytes: BTreeMap<String, u64>,
    /// Output data bytes per dtype name.
    pub output_bytes: BTreeMap<String, u64>,
    /// Weight files written (final paths).
    pub files: Vec<PathBuf>,
    /// Quantization error (quantize only).
    pub error: ErrorStats,
}

impl ConvertReport {
    pub fn input_total(&self) -> u64 {
        self.input_bytes.values().sum()
    }
    pub fn output_total(&self) -> u64 {
        self.output_bytes.values().sum()
    }
}

/// Planning pass of quantization over `names`: decides per tensor, quantizes
/// the chosen ones once for their exact layout and error statistics.
fn plan_quantize<S: TensorSource + ReleasePages + ?Sized>(
    src: &S,
    names: &[&str],
    choose: impl Fn(&TensorView<'_>) -> bool,
    opts: &QuantOptions,
    report: &mut ConvertReport,
) -> Result<Vec<Unit>> {
    let mut units = Vec::with_capacity(names.len());
    for &name in names {
        let t = src
            .get(name)
            .ok_or_else(|| FormatError::not_found(src.origin_of(name), name))?;
        *report.input_bytes.entry(dtype_name(t.dtype)).or_default() += t.data.len() as u64;
        let unit = if choose(&t) {
            let q = quantize_view(&t, opts)?;
            report.error.add(name, quant_error(&t, &q)?);
            report.converted += 1;
            Unit::Quantize {
                name: name.to_string(),
                specs: bnb4_specs(name, &q),
            }
        } else {
            report.copied += 1;
            Unit::Copy {
                name: name.to_string(),
                out: TensorSpec::new(name, t.dtype, t.shape.to_vec()),
            }
        };
        add_bytes(&mut report.output_bytes, &unit.specs());
        src.release_pages(name);
        units.push(unit);
    }
    Ok(units)
}

/// Quantize a Hugging Face model folder into a bnb-4bit folder transformers
/// can load (see the module docs for the two passes).
pub fn quantize_model(input: &Path, out: &Path, opts: &QuantizeOptions) -> Result<ConvertReport> {
    check_output(input, out, opts.force)?;
    let mut config = read_config_map(input)?;
    if config.contains_key("quantization_config") {
        return Err(FormatError::invalid(
            &input.join("config.json"),
            "the model is already quantized (config.json has quantization_config)",
        ));
    }
    let src = ModelFiles::open(input)?;
    let skip = bnb::skip_modules(&Value::Object(config.clone()));
    let names = src.names();
    let mut report = ConvertReport::default();
    let units = plan_quantize(
        &src,
        &names,
        |t| is_quantized_linear(t.name, t.dtype, t.shape, &skip),
        &opts.quant,
        &mut report,
    )?;
    if report.converted == 0 {
        return Err(FormatError::invalid(
            input,
            "no Linear weights to quantize (expected 2-D *_proj.weight tensors)",
        ));
    }
    let tmp = OutputFolder::new(out)?;
    let files = write_sharded(&src, units, tmp.path(), opts.max_shard_size, &opts.quant)?;
    config.insert(
        "quantization_config".into(),
        bnb::quantization_config(
            opts.quant.quant_type,
            opts.quant.double_quant,
            &opts.compute_dtype,
        ),
    );
    write_config_json(&tmp.path().join("config.json"), &config)?;
    copy_side_files(input, tmp.path())?;
    tmp.commit(out)?;
    report.files = files
        .iter()
        .map(|f| out.join(f.file_name().expect("shard has a file name")))
        .collect();
    Ok(report)
}

/// Quantize every floating tensor (1-D or more) of a bare safetensors file,
/// under bnb's per-tensor keys (`NAME`, `NAME.absmax`, …).
pub fn quantize_file(input: &Path, out: &Path, opts: &QuantizeOptions) -> Result<ConvertReport> {
    check_output(input, out, opts.force)?;
    let src = SafetensorsFile::open(input)?;
    let names: Vec<&str> = {
        let mut v = src.names();
        v.sort_unstable();
        v
    };
    let mut report = ConvertReport::default();
    let units = plan_quantize(
        &src,
        &names,
        |t| is_float(t.dtype) && !t.shape.is_empty() && t.numel() > 0,
        &opts.quant,
        &mut report,
    )?;
    let specs: Vec<TensorSpec> = units.iter().flat_map(Unit::specs).collect();
    let mut w = SafetensorsWriter::create(out, &specs)?;
    for u in &units {
        write_unit(&src, u, &opts.quant, &mut w)?;
        release_unit(&src, u);
    }
    report.files = vec![w.finish()?];
    Ok(report)
}

/// Planning pass of dequantization: one unit per bnb weight (its aux tensors
/// are consumed), everything else copied (cast to `dtype` if given).
fn plan_dequantize<S: TensorSource + ?Sized>(
    src: &S,
    dtype: Option<DType>,
    report: &mut ConvertReport,
) -> Result<Vec<Unit>> {
    let weights: HashSet<String> = bnb::bnb4_weight_keys(src).into_iter().collect();
    let mut units = Vec::new();
    for name in src.names() {
        let t = src.get(name).expect("listed names exist");
        *report.input_bytes.entry(dtype_name(t.dtype)).or_default() += t.data.len() as u64;
        let unit = if weights.contains(name) {
            let nf4 = bnb::quant_state_key(name, qlora_quant::QuantType::Nf4);
            let fp4 = bnb::quant_state_key(name, qlora_quant::QuantType::Fp4);
            let qs = src
                .get(&nf4)
                .or_else(|| src.get(&fp4))
                .expect("weight has a quant state");
            let state = bnb::parse_quant_state(&qs)
                .map_err(|m| FormatError::tensor(qs.file, qs.name, m))?;
            let d = source_dtype(dtype.unwrap_or(state.dtype));
            report.converted += 1;
            Unit::Dequantize {
                key: name.to_string(),
                out: TensorSpec::new(name, d, state.shape),
            }
        } else if bnb::is_bnb4_key(name, &weights) {
            continue;
        } else {
            let d = match dtype {
                Some(d) if is_float(t.dtype) => source_dtype(d),
                _ => t.dtype,
            };
            report.copied += 1;
            Unit::Copy {
                name: name.to_string(),
                out: TensorSpec::new(name, d, t.shape.to_vec()),
            }
        };
        add_bytes(&mut report.output_bytes, &unit.specs());
        units.push(unit);
    }
    if weights.is_empty() {
        return Err(FormatError::invalid(
            src.origin_of(""),
            "no bitsandbytes 4-bit tensors found (no `*.quant_state.bitsandbytes__nf4|fp4` keys)",
        ));
    }
    Ok(units)
}

/// Dequantize a bnb-4bit model folder into a plain Hugging Face folder
/// (config.json without `quantization_config`).
pub fn dequantize_model(
    input: &Path,
    out: &Path,
    opts: &DequantizeOptions,
) -> Result<ConvertReport> {
    check_output(input, out, opts.force)?;
    let mut config = read_config_map(input)?;
    let src = ModelFiles::open(input)?;
    let mut report = ConvertReport::default();
    let units = plan_dequantize(&src, opts.dtype, &mut report)?;
    let tmp = OutputFolder::new(out)?;
    let files = write_sharded(
        &src,
        units,
        tmp.path(),
        opts.max_shard_size,
        &QuantOptions::default(),
    )?;
    config.remove("quantization_config");
    if let Some(d) = opts.dtype {
        for k in ["dtype", "torch_dtype"] {
            if config.contains_key(k) {
                config.insert(k.into(), Value::String(d.torch_name().into()));
            }
        }
    }
    write_config_json(&tmp.path().join("config.json"), &config)?;
    copy_side_files(input, tmp.path())?;
    tmp.commit(out)?;
    report.files = files
        .iter()
        .map(|f| out.join(f.file_name().expect("file name")))
        .collect();
    Ok(report)
}

/// Dequantize every bnb weight of a bare safetensors file.
pub fn dequantize_file(
    input: &Path,
    out: &Path,
    opts: &DequantizeOptions,
) -> Result<ConvertReport> {
    check_output(input, out, opts.force)?;
    let src = SafetensorsFile::open(input)?;
    let mut report = ConvertReport::default();
    let units = plan_dequantize(&src, opts.dtype, &mut report)?;
    let specs: Vec<TensorSpec> = units.iter().flat_map(Unit::specs).collect();
    let mut w = SafetensorsWriter::create(out, &specs)?;
    for u in &units {
        write_unit(&src, u, &QuantOptions::default(), &mut w)?;
        release_unit(&src, u);
    }
    report.files = vec![w.finish()?];
    Ok(report)
}

/// Whether `path` is a model folder (as opposed to a bare `.safetensors` file).
pub fn is_model_dir(path: &Path) -> bool {
    path.is_dir() && (path.join(SINGLE_FILE).is_file() || path.join(INDEX_FILE).is_file())
}
