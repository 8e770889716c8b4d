//! The weight-size report of `qlora size`.
//!
//! Quantized formats quantize exactly the tensors transformers would
//! (`Inventory::quantizable`: every Linear except `lm_head`) and keep the rest
//! (embeddings, `lm_head`, norms, biases) in [`SizeOptions::keep`] (bf16 by
//! default), which is what a bnb-4bit checkpoint written by transformers or by
//! `qlora quantize` contains.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::bnb::{self, Bnb4, QuantType};
use crate::gguf;
use crate::inventory::{Inventory, Role, TensorSpec};
use crate::st;
use qlora_quant::DType;

/// What to compute.
#[derive(Debug, Clone)]
pub struct SizeOptions {
    /// dtype of unquantized tensors in quantized formats (and of the source
    /// weights named in the quant-state JSON).
    pub keep: DType,
    /// bnb block sizes to report (64 is always reported under the plain names).
    pub blocksizes: Vec<u64>,
}

impl Default for SizeOptions {
    fn default() -> Self {
        SizeOptions {
            keep: DType::BF16,
            blocksizes: vec![64],
        }
    }
}

/// Size of the whole model in one format.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FormatSize {
    /// Bytes of all tensors, quantization statistics and quant-state JSON included.
    pub bytes: u64,
    /// Of which: absmax, code maps, nested statistics and JSON blobs.
    pub quant_stats_bytes: u64,
    /// Of which: quant-state JSON blobs.
    pub json_bytes: u64,
    /// `false` when some double-quant offsets were unknown and the JSON length
    /// was estimated with [`bnb::TYPICAL_OFFSET_REPR`] (a few bytes per tensor).
    pub exact: bool,
    /// Size of the single `model.safetensors` a writer produces (8-byte prefix +
    /// header + data); `None` for formats without a safetensors layout here.
    pub file_bytes: Option<u64>,
}

/// What `qlora size` prints.
#[derive(Debug, Clone, Serialize)]
pub struct SizeReport {
    pub model: String,
    /// config | preset | hub | safetensors | gguf
    pub source: String,
    pub total_params: u64,
    pub params: BTreeMap<&'static str, u64>,
    pub tied_embeddings: bool,
    pub quantizable_params: u64,
    pub quantizable_modules: u64,
    /// Format → bytes (the acceptance interface: `f32`, `bf16`, `int8`, `nf4`,
    /// `nf4_dq`, `fp4`, `fp4_dq`, `gguf_q4_k`, ...).
    pub bytes: BTreeMap<String, u64>,
    pub formats: BTreeMap<String, FormatSize>,
    /// The files actually read, when the reference was a checkpoint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stored: Option<Stored>,
    pub notes: Vec<String>,
}

/// What an existing checkpoint occupies.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Stored {
    /// e.g. `safetensors BF16`, `safetensors bnb nf4_dq`, `gguf q4_k_m-mix`.
    pub format: String,
    pub tensor_bytes: u64,
    pub file_bytes: u64,
    pub files: usize,
}

/// Bytes of one tensor in a plain dtype (2/4 bytes per element).
fn plain(inv: &Inventory, bytes_per: u64) -> FormatSize {
    let names = inv
        .tensors
        .iter()
        .map(|t| st::Entry {
            name: t.name.clone(),
            dtype: match bytes_per {
                4 => "F32",
                _ => "BF16",
            },
            shape: t.shape.clone(),
            nbytes: t.numel() * bytes_per,
        })
        .collect::<Vec<_>>();
    let bytes = inv.total_params() * bytes_per;
    FormatSize {
        bytes,
        quant_stats_bytes: 0,
        json_bytes: 0,
        exact: true,
        file_bytes: Some(8 + st::header_json_len(&names) + bytes),
    }
}

/// bitsandbytes LLM.int8 layout: int8 `weight` + f32 `SCB` (one scale per
/// output row) for every quantizable Linear; the rest in `keep`.
fn int8(inv: &Inventory, keep: DType) -> FormatSize {
    let mut bytes = 0;
    let mut stats = 0;
    for t in &inv.tensors {
        if t.quantizable {
            let [o, _] = t.out_in().expect("linears are 2-D");
            bytes += t.numel() + 4 * o;
            stats += 4 * o;
        } else {
            bytes += t.numel() * keep.size_in_bytes() as u64;
        }
    }
    FormatSize {
        bytes,
        quant_stats_bytes: stats,
        json_bytes: 0,
        exact: true,
        file_bytes: None,
    }
}

/// The safetensors entries of a bnb-4bit checkpoint and whether all JSON
/// lengths are exact. Exposed so tests can compare with real files.
pub fn bnb4_entries(inv: &Inventory, f: &Bnb4, keep: DType) -> (Vec<st::Entry>, bool) {
    let mut out = Vec::with_capacity(inv.tensors.len() * 6);
    let mut exact = true;
    for t in &inv.tensors {
        if !t.quantizable {
            out.push(st::Entry {
                name: t.name.clone(),
                dtype: keep.safetensors_name(),
                shape: t.shape.clone(),
                nbytes: t.numel() * keep.size_in_bytes() as u64,
            });
            continue;
        }
        let n = t.numel();
        let prefix = t.name.strip_suffix("weight").unwrap_or(&t.name).to_string();
        let p = bnb::parts(n, f);
        let nb = bnb::n_blocks(n, f.blocksize);
        let sizes = [
            (p.weight, vec![p.weight, 1]),
            (p.absmax, vec![nb]),
            (p.quant_map, vec![16]),
            (p.nested_absmax, vec![nb.div_ceil(bnb::NESTED_BLOCKSIZE)]),
            (p.nested_quant_map, vec![256]),
        ];
        for ((suffix, dtype), (nbytes, shape)) in bnb::tensor_suffixes(f).into_iter().zip(sizes) {
            out.push(st::Entry {
                name: format!("{prefix}{suffix}"),
                dtype,
                shape,
                nbytes,
            });
        }
        let json = json_len(t, f, keep, &mut exact);
        out.push(st::Entry {
            name: format!("{prefix}{}", bnb::json_suffix(f)),
            dtype: "U8",
            shape: vec![json],
            nbytes: json,
        });
    }
    (out, exact)
}

/// Length of one quant-state JSON blob; clears `exact` when estimated.
fn json_len(t: &TensorSpec, f: &Bnb4, keep: DType, exact: &mut bool) -> u64 {
    let shape = t.out_in().expect("linears are 2-D");
    let dtype = t
        .known
        .as_ref()
        .map(|k| k.dtype.as_str())
        .unwrap_or(keep.torch_name());
    let offset = match t
        .known
        .as_ref()
        .filter(|k| k.blocksize == f.blocksize)
        .and_then(|k| k.offset_repr.as_deref())
    {
        Some(o) => o,
        None => {
            if f.double_quant {
                *exact = false;
            }
            bnb::TYPICAL_OFFSET_REPR
        }
    };
    bnb::quant_state_json(f, shape, dtype, offset).len() as u64
}

/// Size of the model as a bnb-4bit checkpoint (what `qlora quantize` writes).
pub fn bnb4(inv: &Inventory, f: &Bnb4, keep: DType) -> FormatSize {
    let (entries, exact) = bnb4_entries(inv, f, keep);
    let bytes: u64 = entries.iter().map(|e| e.nbytes).sum();
    let mut stats = 0;
    let mut json = 0;
    for e in &entries {
        if e.name.contains(".quant_state.bitsandbytes__") {
            json += e.nbytes;
            stats += e.nbytes;
        } else if e.name.ends_with(".absmax")
            || e.name.ends_with("quant_map")
            || e.name.ends_with(".nested_absmax")
        {
            stats += e.nbytes;
        }
    }
    FormatSize {
        bytes,
        quant_stats_bytes: stats,
        json_bytes: json,
        exact,
        file_bytes: Some(8 + st::header_json_len(&entries) + bytes),
    }
}

/// A "pure" GGUF file of one type (`llama-quantize --pure`): every 2-D weight
/// in that type (llama.cpp's fallback when a row is not a whole number of
/// blocks), 1-D tensors (norms, biases) in f32. Tensor data only.
pub fn gguf_pure(inv: &Inventory, ty: qlora_gguf::GgmlType) -> FormatSize {
    let mut bytes = 0;
    for t in &inv.tensors {
        let tt = match t.shape.as_slice() {
            [_, row] => ty.for_row(*row),
            _ => qlora_gguf::GgmlType::F32,
        };
        bytes += gguf::bytes(tt, t.numel());
    }
    FormatSize {
        bytes,
        quant_stats_bytes: 0,
        json_bytes: 0,
        exact: true,
        file_bytes: None,
    }
}

/// Compute the full report for an inventory.
pub fn size_report(
    inv: &Inventory,
    model: &str,
    source: &str,
    opts: &SizeOptions,
    stored: Option<Stored>,
) -> SizeReport {
    let mut formats = BTreeMap::new();
    formats.insert("f32".to_string(), plain(inv, 4));
    let half = plain(inv, 2);
    formats.insert("bf16".to_string(), half.clone());
    formats.insert("f16".to_string(), half);
    formats.insert("int8".to_string(), int8(inv, opts.keep));
    let mut bss = vec![64];
    bss.extend(opts.blocksizes.iter().copied().filter(|b| *b != 64));
    for bs in bss {
        for qt in [QuantType::Nf4, QuantType::Fp4] {
            for dq in [false, true] {
                let f = Bnb4::new(qt, bs, dq);
                formats.insert(f.key(), bnb4(inv, &f, opts.keep));
            }
        }
    }
    for (name, ty) in gguf::REPORTED {
        formats.insert(format!("gguf_{name}"), gguf_pure(inv, *ty));
    }
    let bytes = formats.iter().map(|(k, v)| (k.clone(), v.bytes)).collect();
    let params = Role::ALL
        .iter()
        .map(|r| (r.as_str(), inv.params_by_role(*r)))
        .filter(|(k, v)| *v > 0 || *k != "other")
        .collect();
    let mut notes = vec![format!(
        "quantized formats keep embeddings, lm_head, norms and biases in {}",
        opts.keep.torch_name()
    )];
    if formats.values().any(|f| !f.exact) {
        notes.push(format!(
            "double-quant sizes assume a {}-character nested_offset repr per tensor (the real \
             length depends on the weights: typically within ±{} bytes per quantized tensor)",
            bnb::TYPICAL_OFFSET_REPR.len(),
            bnb::OFFSET_REPR_UNCERTAINTY
        ));
    }
    notes.push(
        "int8 = bitsandbytes LLM.int8 layout (int8 weight + f32 SCB per output row)".to_string(),
    );
    notes.push(
        "gguf_* = pure files (every 2-D tensor in that type, 1-D in f32), tensor data only"
            .to_string(),
    );
    SizeReport {
        model: model.to_string(),
        source: source.to_string(),
        total_params: inv.total_params(),
        params,
        tied_embeddings: inv.tied,
        quantizable_params: inv.quantizable_params(),
        quantizable_modules: inv.quantizable().count() as u64,
        bytes,
        formats,
        stored,
        notes,
    }
}
