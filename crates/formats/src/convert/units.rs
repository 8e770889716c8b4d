//! The streaming half of a conversion: output [`Unit`]s (copy / quantize /
//! dequantize), producing each one's bytes from the memory-mapped input, and
//! writing them into shards while releasing the input pages behind them.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use qlora_quant::{DType, Input, QuantOptions, Quantized4};
use rayon::prelude::*;
use safetensors::Dtype;

use crate::bnb::{self, bnb4_tensors, quantize_bnb, read_bnb4};
use crate::error::{FormatError, Result};
use crate::folder::write_model_shards;
use crate::model_files::ModelFiles;
use crate::reader::{SafetensorsFile, TensorView};
use crate::source::TensorSource;
use crate::writer::{SafetensorsWriter, TensorSpec};

/// One output unit: tensors that are produced together and stay in one shard.
pub(super) enum Unit {
    /// Copy (or cast to `Dtype`) an input tensor.
    Copy { name: String, out: TensorSpec },
    /// Quantize an input tensor; `out_key` is the weight key in the output.
    Quantize {
        name: String,
        specs: Vec<TensorSpec>,
    },
    /// Dequantize a bnb weight to `dtype`.
    Dequantize { key: String, out: TensorSpec },
}

impl Unit {
    pub(super) fn specs(&self) -> Vec<TensorSpec> {
        match self {
            Unit::Copy { out, .. } | Unit::Dequantize { out, .. } => vec![out.clone()],
            Unit::Quantize { specs, .. } => specs.clone(),
        }
    }
}

pub(super) fn dtype_name(d: Dtype) -> String {
    d.to_string()
}

/// Borrow the tensor as a quantizer input (zero-copy when aligned on a
/// little-endian machine, converted otherwise), then run `f`.
pub(super) fn with_input<R>(t: &TensorView<'_>, f: impl FnOnce(Input<'_>) -> R) -> Result<R> {
    let le = cfg!(target_endian = "little");
    Ok(match t.dtype {
        Dtype::F32 => match bytemuck::try_cast_slice::<u8, f32>(t.data) {
            Ok(s) if le => f(Input::F32(s)),
            _ => f(Input::F32(&t.to_f32()?)),
        },
        Dtype::BF16 => match bytemuck::try_cast_slice::<u8, bf16>(t.data) {
            Ok(s) if le => f(Input::BF16(s)),
            _ => f(Input::BF16(&t.to_bf16()?)),
        },
        Dtype::F16 => match bytemuck::try_cast_slice::<u8, f16>(t.data) {
            Ok(s) if le => f(Input::F16(s)),
            _ => f(Input::F16(&t.to_f16()?)),
        },
        Dtype::F64 => f(Input::F32(&t.to_f32()?)),
        d => {
            return Err(FormatError::tensor(
                t.file,
                t.name,
                format!("dtype {d} cannot be quantized (only F32, F16, BF16, F64)"),
            ))
        }
    })
}

pub(super) fn quantize_view(t: &TensorView<'_>, opts: &QuantOptions) -> Result<Quantized4> {
    let shape = t.shape.to_vec();
    with_input(t, |inp| quantize_bnb(inp, &shape, opts))?
        .map_err(|e| FormatError::tensor(t.file, t.name, format!("cannot quantize: {e}")))
}

#[derive(Clone, Copy, Default)]
pub(super) struct TensorErr {
    pub(super) sq_err: f64,
    pub(super) sq_ref: f64,
    pub(super) max_abs: f32,
    pub(super) n: u64,
}

/// Compare the dequantized `q` with its input, in chunks (bounded memory).
pub(super) fn quant_error(t: &TensorView<'_>, q: &Quantized4) -> Result<TensorErr> {
    const CH: usize = 1 << 16;
    with_input(t, |inp| {
        let n = inp.len();
        (0..n.div_ceil(CH))
            .into_par_iter()
            .map_init(
                || (vec![0f32; CH], vec![0f32; CH]),
                |(a, b), c| {
                    let s = c * CH;
                    let len = CH.min(n - s);
                    inp.copy_range_f32(s, &mut a[..len]);
                    q.dequantize_range_f32(s, &mut b[..len]);
                    let mut e = TensorErr {
                        n: len as u64,
                        ..Default::default()
                    };
                    for (x, y) in a[..len].iter().zip(&b[..len]) {
                        let d = x - y;
                        e.sq_err += (d as f64) * (d as f64);
                        e.sq_ref += (*x as f64) * (*x as f64);
                        e.max_abs = e.max_abs.max(d.abs());
                    }
                    e
                },
            )
            .reduce(TensorErr::default, |a, b| TensorErr {
                sq_err: a.sq_err + b.sq_err,
                sq_ref: a.sq_ref + b.sq_ref,
                max_abs: a.max_abs.max(b.max_abs),
                n: a.n + b.n,
            })
    })
}

/// Little-endian bytes of a slice of plain numbers (no copy on LE machines).
pub(super) fn le_bytes<T: bytemuck::Pod>(v: &[T], to_le: impl Fn(&T) -> Vec<u8>) -> Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        Cow::Borrowed(bytemuck::cast_slice(v))
    } else {
        Cow::Owned(v.iter().flat_map(to_le).collect())
    }
}

pub(super) fn source_dtype(d: DType) -> Dtype {
    match d {
        DType::F32 => Dtype::F32,
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::BF16,
    }
}

/// Cast a float tensor to `to` (bytes), or borrow it unchanged.
pub(super) fn cast_bytes<'a>(t: &TensorView<'a>, to: Dtype) -> Result<Cow<'a, [u8]>> {
    if t.dtype == to {
        return Ok(Cow::Borrowed(t.data));
    }
    Ok(match to {
        Dtype::F32 => Cow::Owned(le_bytes(&t.to_f32()?, |x| x.to_le_bytes().to_vec()).into_owned()),
        Dtype::BF16 => {
            Cow::Owned(le_bytes(&t.to_bf16()?, |x| x.to_le_bytes().to_vec()).into_owned())
        }
        Dtype::F16 => Cow::Owned(le_bytes(&t.to_f16()?, |x| x.to_le_bytes().to_vec()).into_owned()),
        d => {
            return Err(FormatError::tensor(
                t.file,
                t.name,
                format!("cannot cast {} to {d}", t.dtype),
            ))
        }
    })
}

pub(super) fn is_float(d: Dtype) -> bool {
    matches!(d, Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64)
}

/// Produce and write the tensors of one unit.
pub(super) fn write_unit<S: TensorSource + ?Sized>(
    src: &S,
    unit: &Unit,
    opts: &QuantOptions,
    w: &mut SafetensorsWriter,
) -> Result<()> {
    let view = |name: &str| {
        src.get(name)
            .ok_or_else(|| FormatError::not_found(src.origin_of(name), name))
    };
    match unit {
        Unit::Copy { name, out } => {
            let t = view(name)?;
            w.write(&out.name, &cast_bytes(&t, out.dtype)?)?;
        }
        Unit::Quantize { name, specs } => {
            let t = view(name)?;
            let q = quantize_view(&t, opts)?;
            let tensors = bnb4_tensors(name, &q);
            for (td, spec) in tensors.iter().zip(specs) {
                if td.spec != *spec {
                    return Err(FormatError::tensor(
                        t.file,
                        name,
                        format!(
                            "quantizing twice gave different layouts ({:?} vs {:?}): is the input file changing?",
                            td.spec, spec
                        ),
                    ));
                }
                w.write(&td.spec.name, &td.data)?;
            }
        }
        Unit::Dequantize { key, out } => {
            let q = read_bnb4(src, key)?.ok_or_else(|| {
                FormatError::tensor(src.origin_of(key), key, "quant state disappeared")
            })?;
            match out.dtype {
                Dtype::F32 => w.write(
                    &out.name,
                    &le_bytes(&q.dequantize_f32(), |x| x.to_le_bytes().to_vec()),
                )?,
                Dtype::BF16 => w.write(
                    &out.name,
                    &le_bytes(&q.dequantize_bf16(), |x| x.to_le_bytes().to_vec()),
                )?,
                Dtype::F16 => w.write(
                    &out.name,
                    &le_bytes(&q.dequantize_f16(), |x| x.to_le_bytes().to_vec()),
                )?,
                d => unreachable!("dequantize target {d} is always a float dtype"),
            }
        }
    }
    Ok(())
}

/// Release the input pages a unit used.
pub(super) fn release_unit<S: ReleasePages + ?Sized>(src: &S, unit: &Unit) {
    match unit {
        Unit::Copy { name, .. } | Unit::Quantize { name, .. } => src.release_pages(name),
        Unit::Dequantize { key, .. } => {
            src.release_pages(key);
            for s in bnb::AUX_SUFFIXES {
                src.release_pages(&format!("{key}.{s}"));
            }
        }
    }
}

/// Dropping resident pages of a tensor after use.
pub(super) trait ReleasePages {
    fn release_pages(&self, name: &str);
}
impl ReleasePages for SafetensorsFile {
    fn release_pages(&self, name: &str) {
        self.release(name)
    }
}
impl ReleasePages for ModelFiles {
    fn release_pages(&self, name: &str) {
        self.release(name)
    }
}

/// Write `units` into shards in `dir` (one `model.safetensors`, or
/// `model-0000k-of-0000n.safetensors` + index when over `max_shard`).
pub(super) fn write_sharded<S: TensorSource + ReleasePages + ?Sized>(
    src: &S,
    units: Vec<Unit>,
    dir: &Path,
    max_shard: u64,
    opts: &QuantOptions,
) -> Result<Vec<PathBuf>> {
    let groups: Vec<Vec<TensorSpec>> = units.iter().map(Unit::specs).collect();
    write_model_shards(dir, &groups, max_shard, |i, w| {
        write_unit(src, &units[i], opts, w)?;
        release_unit(src, &units[i]);
        Ok(())
    })
}

pub(super) fn add_bytes(m: &mut BTreeMap<String, u64>, specs: &[TensorSpec]) {
    for s in specs {
        *m.entry(dtype_name(s.dtype)).or_default() += s.nbytes() as u64;
    }
}
