//! The bitsandbytes 4-bit checkpoint format, exactly as transformers +
//! bitsandbytes write it (FORMATS.md §2.1–2.3).
//!
//! Per quantized weight `W` (e.g. `model.layers.0.mlp.up_proj.weight`):
//! `W` (packed codes), `W.absmax`, `W.quant_map`, with double quant also
//! `W.nested_absmax` and `W.nested_quant_map`, and the quant state
//! `W.quant_state.bitsandbytes__nf4|fp4` (UTF-8 JSON bytes as Python's
//! `json.dumps` prints them).

use std::borrow::Cow;

use qlora_quant::{
    code_table, Absmax, DType, DoubleQuant, QuantType, Quantized4, NESTED_BLOCKSIZE,
};
use safetensors::Dtype;
use serde_json::{json, Value};

use crate::error::{FormatError, Result};
use crate::reader::TensorView;
use crate::source::TensorSource;
use crate::writer::{TensorData, TensorSpec};

/// Key suffix (after `W.`) of the quant state, without the quant type.
pub const QUANT_STATE_INFIX: &str = "quant_state.bitsandbytes__";

/// Suffixes (after `W.`) of the auxiliary tensors of a quantized weight.
pub const AUX_SUFFIXES: [&str; 4] = ["absmax", "quant_map", "nested_absmax", "nested_quant_map"];

/// `W.quant_state.bitsandbytes__<qt>`.
pub fn quant_state_key(weight_key: &str, qt: QuantType) -> String {
    format!("{weight_key}.{QUANT_STATE_INFIX}{}", qt.as_str())
}

/// If `name` is a quant-state key, the weight key it belongs to.
pub fn weight_of_quant_state(name: &str) -> Option<&str> {
    for qt in ["nf4", "fp4"] {
        let suffix = format!(".{QUANT_STATE_INFIX}{qt}");
        if let Some(w) = name.strip_suffix(suffix.as_str()) {
            return Some(w);
        }
    }
    None
}

/// Every weight key of `src` that has a bnb quant state, sorted.
pub fn bnb4_weight_keys<S: TensorSource + ?Sized>(src: &S) -> Vec<String> {
    let mut v: Vec<String> = src
        .names()
        .into_iter()
        .filter_map(weight_of_quant_state)
        .map(str::to_string)
        .collect();
    v.sort();
    v.dedup();
    v
}

/// True if `name` is one of the tensors that belong to a quantized weight in
/// `weights` (the weight itself, its aux tensors or its quant state).
pub fn is_bnb4_key(name: &str, weights: &std::collections::HashSet<String>) -> bool {
    if weights.contains(name) || weight_of_quant_state(name).is_some() {
        return true;
    }
    AUX_SUFFIXES.iter().any(|s| {
        name.strip_suffix(s)
            .and_then(|p| p.strip_suffix('.'))
            .is_some_and(|w| weights.contains(w))
    })
}

/// Python's `repr(float)`: shortest round-trip digits; fixed notation when
/// the decimal exponent is in [-4, 16), else `d.ddde±XX` (at least two
/// exponent digits); integral fixed values get `.0`. `json.dumps` uses this
/// for `nested_offset` (the f32 mean widened to f64).
pub fn python_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    if x == 0.0 {
        return if x.is_sign_negative() {
            "-0.0".into()
        } else {
            "0.0".into()
        };
    }
    // Rust's `{:e}` gives the shortest round-trip digits, e.g. "1.2345e3", "-1e-5".
    let e = format!("{x:e}");
    let (mant, exp) = e.split_once('e').expect("LowerExp always has an exponent");
    let exp: i32 = exp.parse().expect("integer exponent");
    let (sign, mant) = match mant.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mant),
    };
    let digits: String = mant.chars().filter(|c| *c != '.').collect();
    // value = 0.DIGITS × 10^decpt
    let decpt = exp + 1;
    if -4 < decpt && decpt <= 16 {
        let nd = digits.len() as i32;
        let body = if decpt <= 0 {
            format!("0.{}{}", "0".repeat((-decpt) as usize), digits)
        } else if decpt >= nd {
            format!("{}{}.0", digits, "0".repeat((decpt - nd) as usize))
        } else {
            let (a, b) = digits.split_at(decpt as usize);
            format!("{a}.{b}")
        };
        format!("{sign}{body}")
    } else {
        let m = if digits.len() == 1 {
            digits.clone()
        } else {
            format!("{}.{}", &digits[..1], &digits[1..])
        };
        let es = if exp < 0 { '-' } else { '+' };
        format!("{sign}{m}e{es}{:02}", exp.abs())
    }
}

/// The quant-state JSON bnb writes (`QuantState.as_dict(packed=True)` then
/// `json.dumps`): keys `quant_type, blocksize, dtype, shape` and, with double
/// quant, `nested_blocksize, nested_dtype, nested_offset`; Python separators.
pub fn quant_state_json(q: &Quantized4) -> String {
    let shape: Vec<String> = q.shape.iter().map(|d| d.to_string()).collect();
    let mut s = format!(
        "{{\"quant_type\": \"{}\", \"blocksize\": {}, \"dtype\": \"{}\", \"shape\": [{}]",
        q.quant_type.as_str(),
        q.blocksize,
        q.dtype.torch_name(),
        shape.join(", ")
    );
    if let Absmax::Double(d) = &q.absmax {
        s.push_str(&format!(
            ", \"nested_blocksize\": {}, \"nested_dtype\": \"float32\", \"nested_offset\": {}",
            d.nested_blocksize,
            python_float_repr(d.offset as f64)
        ));
    }
    s.push('}');
    s
}

/// Specs (name, dtype, shape) of the tensors [`bnb4_tensors`] produces, in
/// the same order, for planning a streaming write.
pub fn bnb4_specs(weight_key: &str, q: &Quantized4) -> Vec<TensorSpec> {
    bnb4_tensors(weight_key, q)
        .into_iter()
        .map(|t| t.spec)
        .collect()
}

/// The tensors a transformers `save_pretrained` writes for one quantized
/// weight (uint8 quant storage): `W` U8 `[(n+1)/2, 1]`, `W.absmax` (U8 codes
/// with double quant, else F32), `W.quant_map` F32 `[16]`, with double quant
/// `W.nested_absmax` F32 and `W.nested_quant_map` F32 `[256]`, and
/// `W.quant_state.bitsandbytes__<qt>` U8 JSON bytes.
pub fn bnb4_tensors<'a>(weight_key: &str, q: &'a Quantized4) -> Vec<TensorData<'a>> {
    let w = weight_key;
    let mut v = vec![TensorData::new(
        w,
        Dtype::U8,
        vec![q.packed.len(), 1],
        Cow::Borrowed(q.packed.as_slice()),
    )];
    match &q.absmax {
        Absmax::Plain(a) => v.push(TensorData::from_f32(
            format!("{w}.absmax"),
            vec![a.len()],
            a,
        )),
        Absmax::Double(d) => {
            v.push(TensorData::new(
                format!("{w}.absmax"),
                Dtype::U8,
                vec![d.codes.len()],
                Cow::Borrowed(d.codes.as_slice()),
            ));
        }
    }
    v.push(TensorData::from_f32(
        format!("{w}.quant_map"),
        vec![16],
        &q.quant_map(),
    ));
    if let Absmax::Double(d) = &q.absmax {
        v.push(TensorData::from_f32(
            format!("{w}.nested_absmax"),
            vec![d.nested_absmax.len()],
            &d.nested_absmax,
        ));
        v.push(TensorData::from_f32(
            format!("{w}.nested_quant_map"),
            vec![d.nested_map.len()],
            &d.nested_map,
        ));
    }
    let js = quant_state_json(q).into_bytes();
    v.push(TensorData::new(
        quant_state_key(w, q.quant_type),
        Dtype::U8,
        vec![js.len()],
        js,
    ));
    v
}

/// Read the quantized weight `weight_key` from `src`, or `Ok(None)` if it has
/// no quant state (an ordinary tensor). Accepts CPU- and CUDA-written files
/// and any quant storage dtype (the bytes are reinterpreted, never
/// converted). Every length is checked; errors name the file and the key.
pub fn read_bnb4<S: TensorSource + ?Sized>(
    src: &S,
    weight_key: &str,
) -> Result<Option<Quantized4>> {
    let nf4 = quant_state_key(weight_key, QuantType::Nf4);
    let fp4 = quant_state_key(weight_key, QuantType::Fp4);
    let (qs_key, qs) = match (src.get(&nf4), src.get(&fp4)) {
        (None, None) => return Ok(None),
        (Some(_), Some(_)) => {
            return Err(FormatError::tensor(
                src.origin_of(&nf4),
                weight_key,
                "has both an nf4 and an fp4 quant state",
            ))
        }
        (Some(t), None) => (nf4, t),
        (None, Some(t)) => (fp4, t),
    };
    let key_qt = if qs_key.ends_with("nf4") {
        QuantType::Nf4
    } else {
        QuantType::Fp4
    };
    let bad = |key: &str, msg: String| FormatError::tensor(src.origin_of(key), key, msg);

    let state = parse_quant_state(&qs).map_err(|m| bad(&qs_key, m))?;
    if state.quant_type != key_qt {
        return Err(bad(
            &qs_key,
            format!(
                "quant state says {} but the key says {}",
                state.quant_type, key_qt
            ),
        ));
    }
    let n = state
        .shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| bad(&qs_key, format!("shape {:?} overflows", state.shape)))?;

    let get = |key: &str| {
        src.get(key)
            .ok_or_else(|| bad(key, format!("missing (needed by the quant state {qs_key})")))
    };
    let packed_t = get(weight_key)?;
    let packed = packed_t.data.to_vec();
    if packed.len() != n.div_ceil(2) {
        return Err(bad(
            weight_key,
            format!(
                "packed weight has {} bytes ({} {:?}) but shape {:?} needs {}",
                packed.len(),
                packed_t.dtype,
                packed_t.shape,
                state.shape,
                n.div_ceil(2)
            ),
        ));
    }

    let map_key = format!("{weight_key}.quant_map");
    let map = f32s(&get(&map_key)?, 16).map_err(|m| bad(&map_key, m))?;
    let want = code_table(state.quant_type);
    if map.iter().zip(want.iter()).any(|(a, b)| a != b) {
        return Err(bad(
            &map_key,
            format!("differs from bitsandbytes' {} code table", state.quant_type),
        ));
    }

    let nb = n.div_ceil(state.blocksize.max(1));
    let absmax_key = format!("{weight_key}.absmax");
    let absmax_t = get(&absmax_key)?;
    let absmax = match state.nested {
        None => Absmax::Plain(f32s(&absmax_t, nb).map_err(|m| bad(&absmax_key, m))?),
        Some((nbs, offset)) => {
            if absmax_t.dtype != Dtype::U8 || absmax_t.data.len() != nb {
                return Err(bad(
                    &absmax_key,
                    format!(
                        "double-quantized absmax must be U8 [{nb}], found {} {:?}",
                        absmax_t.dtype, absmax_t.shape
                    ),
                ));
            }
            let nak = format!("{weight_key}.nested_absmax");
            let nested_absmax =
                f32s(&get(&nak)?, nb.div_ceil(nbs.max(1))).map_err(|m| bad(&nak, m))?;
            let nmk = format!("{weight_key}.nested_quant_map");
            let nested_map = f32s(&get(&nmk)?, 256).map_err(|m| bad(&nmk, m))?;
            Absmax::Double(DoubleQuant {
                codes: absmax_t.data.to_vec(),
                nested_absmax,
                nested_map,
                offset,
                nested_blocksize: nbs,
            })
        }
    };
    let q = Quantized4 {
        quant_type: state.quant_type,
        blocksize: state.blocksize,
        shape: state.shape,
        dtype: state.dtype,
        packed,
        absmax,
    };
    q.validate().map_err(|e| bad(&qs_key, e.to_string()))?;
    Ok(Some(q))
}

/// An F32 tensor of exactly `len` elements.
fn f32s(t: &TensorView<'_>, len: usize) -> std::result::Result<Vec<f32>, String> {
    if t.dtype != Dtype::F32 || t.numel() != len {
        return Err(format!(
            "expected F32 with {len} elements, found {} {:?}",
            t.dtype, t.shape
        ));
    }
    Ok(t.data
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect())
}

/// The parsed quant-state JSON.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantState {
    pub quant_type: QuantType,
    pub blocksize: usize,
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// `(nested_blocksize, nested_offset)` when double-quantized.
    pub nested: Option<(usize, f32)>,
}

/// Parse a quant-state tensor (U8 JSON bytes).
pub fn parse_quant_state(t: &TensorView<'_>) -> std::result::Result<QuantState, String> {
    if t.dtype != Dtype::U8 {
        return Err(format!(
            "quant state must be U8 JSON bytes, found {}",
            t.dtype
        ));
    }
    let text = std::str::from_utf8(t.data).map_err(|e| format!("quant state is not UTF-8: {e}"))?;
    parse_quant_state_str(text)
}

/// Parse quant-state JSON text.
pub fn parse_quant_state_str(text: &str) -> std::result::Result<QuantState, String> {
    let v: Value =
        serde_json::from_str(text).map_err(|e| format!("quant state is not valid JSON: {e}"))?;
    let field = |k: &str| v.get(k).ok_or_else(|| format!("quant state lacks `{k}`"));
    let quant_type: QuantType = field("quant_type")?
        .as_str()
        .ok_or("`quant_type` is not a string")?
        .parse()
        .map_err(|e: qlora_quant::QuantError| e.to_string())?;
    let blocksize = field("blocksize")?
        .as_u64()
        .ok_or("`blocksize` is not a non-negative integer")? as usize;
    qlora_quant::check_blocksize(blocksize).map_err(|e| e.to_string())?;
    let dtype: DType = field("dtype")?
        .as_str()
        .ok_or("`dtype` is not a string")?
        .parse()
        .map_err(|e: qlora_quant::QuantError| e.to_string())?;
    let shape = field("shape")?
        .as_array()
        .ok_or("`shape` is not an array")?
        .iter()
        .map(|d| {
            d.as_u64()
                .map(|d| d as usize)
                .ok_or(format!("shape entry {d} is not an integer"))
        })
        .collect::<std::result::Result<Vec<usize>, String>>()?;
    let nested = match v.get("nested_offset") {
        None => {
            if v.get("nested_blocksize").is_some() {
                return Err("quant state has `nested_blocksize` but no `nested_offset`".into());
            }
            None
        }
        Some(off) => {
            let off = off.as_f64().ok_or("`nested_offset` is not a number")?;
            let nbs = match v.get("nested_blocksize") {
                Some(b) => b.as_u64().ok_or("`nested_blocksize` is not an integer")? as usize,
                None => NESTED_BLOCKSIZE,
            };
            if nbs == 0 {
                return Err("`nested_blocksize` is 0".into());
            }
            if let Some(d) = v.get("nested_dtype") {
                if d.as_str() != Some("float32") {
                    return Err(format!("unsupported `nested_dtype` {d} (only float32)"));
                }
            }
            Some((nbs, off as f32))
        }
    };
    Ok(QuantState {
        quant_type,
        blocksize,
        dtype,
        shape,
        nested,
    })
}

/// `config.json`'s `quantization_config` as transformers 5 writes it for a
/// bnb 4-bit model (the fixture's exact key set). `compute_dtype` is a torch
/// dtype name (`bfloat16`, `float16`, `float32`).
pub fn quantization_config(
    quant_type: QuantType,
    double_quant: bool,
    compute_dtype: &str,
) -> Value {
    json!({
        "_load_in_4bit": true,
        "_load_in_8bit": false,
        "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": quant_type.as_str(),
        "bnb_4bit_use_double_quant": double_quant,
        "llm_int8_enable_fp32_cpu_offload": false,
        "llm_int8_has_fp16_weight": false,
        "llm_int8_skip_modules": null,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": true,
        "load_in_8bit": false,
        "quant_method": "bitsandbytes"
    })
}

/// Modules transformers leaves unquantized when `llm_int8_skip_modules` is null.
pub const DEFAULT_SKIP_MODULES: [&str; 1] = ["lm_head"];

/// Whether `module` (a full module path) is matched by a skip pattern: equal,
/// a `.`-bounded prefix (`model.layers.1` skips everything below it) or a
/// `.`-bounded suffix (`lm_head`, `self_attn.o_proj`) — transformers 5's rule
/// without the regex form.
pub fn is_skipped(module: &str, skip: &[String]) -> bool {
    skip.iter().any(|p| {
        let p = p.as_str();
        module == p
            || module.strip_prefix(p).is_some_and(|r| r.starts_with('.'))
            || module.strip_suffix(p).is_some_and(|r| r.ends_with('.'))
    })
}

/// The skip list of a config's `quantization_config.llm_int8_skip_modules`
/// (default `["lm_head"]` when absent or null).
pub fn skip_modules(config: &Value) -> Vec<String> {
    match config
        .get("quantization_config")
        .and_then(|q| q.get("llm_int8_skip_modules"))
        .and_then(Value::as_array)
    {
        Some(a) => a
            .iter()
            .filter_map(|s| s.as_str().map(str::to_string))
            .collect(),
        None => DEFAULT_SKIP_MODULES.iter().map(|s| s.to_string()).collect(),
    }
}

/// Whether a tensor of a Hugging Face model folder is the weight of a Linear
/// that bnb-4bit quantizes: a 2-D floating `*.weight` that is not an
/// embedding, the output head or a norm, and not skipped. In Llama-family
/// models these are exactly `q/k/v/o_proj` and `gate/up/down_proj`.
pub fn is_quantized_linear(name: &str, dtype: Dtype, shape: &[usize], skip: &[String]) -> bool {
    let Some(module) = name.strip_suffix(".weight") else {
        return false;
    };
    if shape.len() != 2 || !matches!(dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16) {
        return false;
    }
    let last = module.rsplit('.').next().unwrap_or(module);
    if last == "lm_head"
        || last.contains("embed")
        || last.contains("norm")
        || last == "wte"
        || last == "wpe"
    {
        return false;
    }
    !is_skipped(module, skip)
}

/// Quantize like bitsandbytes on CPU, including the double-quant offset
/// (torch's CPU `absmax.mean()`, see [`crate::torch_mean`]): this is what
/// makes `qlora quantize` output byte-identical to a transformers + bnb save.
/// (qlora-quant's [`qlora_quant::quantize_4bit`] implements exactly this.)
pub fn quantize_bnb(
    input: qlora_quant::Input<'_>,
    shape: &[usize],
    opts: &qlora_quant::QuantOptions,
) -> std::result::Result<Quantized4, qlora_quant::QuantError> {
    qlora_quant::quantize_4bit(input, shape, opts)
}
