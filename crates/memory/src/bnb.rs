//! Exact byte sizes of bitsandbytes 4-bit (NF4/FP4) checkpoint tensors.
//!
//! Per quantized Linear with `n = out·in` parameters and block size `bs`
//! (FORMATS.md §2.1, §2.4), the checkpoint holds
//! `ceil(n/2)` packed bytes + absmax (`ceil(n/bs)` × 1 B with double quant, × 4 B
//! without) + a 16-entry f32 `quant_map` (64 B) + with double quant
//! `4·ceil(ceil(n/bs)/256)` B of `nested_absmax` and a 256-entry f32
//! `nested_quant_map` (1,024 B) + the quant-state JSON blob, whose length
//! depends on the shape, the source dtype name and — with double quant — on
//! Python's `repr` of the f32 offset (data dependent; see [`TYPICAL_OFFSET_REPR`]).

use serde::Serialize;

/// Second-level block size of double quantization (fixed in bitsandbytes).
pub const NESTED_BLOCKSIZE: u64 = 256;

/// The 4-bit code: NormalFloat4 or bnb's FP4 (E2M1); same sizes, different JSON key.
pub use qlora_quant::QuantType;

fn serialize_quant_type<S: serde::Serializer>(q: &QuantType, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(q.as_str())
}

/// A bitsandbytes 4-bit storage format (uint8 `quant_storage`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct Bnb4 {
    #[serde(serialize_with = "serialize_quant_type")]
    pub quant_type: QuantType,
    pub blocksize: u64,
    pub double_quant: bool,
}

impl Bnb4 {
    pub fn new(quant_type: QuantType, blocksize: u64, double_quant: bool) -> Bnb4 {
        Bnb4 {
            quant_type,
            blocksize,
            double_quant,
        }
    }

    /// Name used in reports: `nf4`, `nf4_dq`, `fp4_bs128_dq`, ...
    pub fn key(&self) -> String {
        let bs = if self.blocksize == 64 {
            String::new()
        } else {
            format!("_bs{}", self.blocksize)
        };
        let dq = if self.double_quant { "_dq" } else { "" };
        format!("{}{bs}{dq}", self.quant_type.as_str())
    }
}

/// Bytes of each tensor a quantized Linear weight becomes (JSON blob excluded).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Bnb4Parts {
    /// `P.weight`: packed nibbles, `ceil(n/2)` bytes.
    pub weight: u64,
    /// `P.weight.absmax`: u8 codes with double quant, f32 without.
    pub absmax: u64,
    /// `P.weight.quant_map`: 16 × f32.
    pub quant_map: u64,
    /// `P.weight.nested_absmax`: f32 per 256 blocks (double quant only).
    pub nested_absmax: u64,
    /// `P.weight.nested_quant_map`: 256 × f32 (double quant only).
    pub nested_quant_map: u64,
}

impl Bnb4Parts {
    pub fn total(&self) -> u64 {
        self.weight + self.absmax + self.quant_map + self.nested_absmax + self.nested_quant_map
    }
}

/// Number of first-level blocks of a tensor with `n` elements.
pub fn n_blocks(n: u64, blocksize: u64) -> u64 {
    n.div_ceil(blocksize)
}

/// Byte size of every tensor a quantized weight of `n` elements is stored as.
pub fn parts(n: u64, f: &Bnb4) -> Bnb4Parts {
    let nb = n_blocks(n, f.blocksize);
    if f.double_quant {
        Bnb4Parts {
            weight: n.div_ceil(2),
            absmax: nb,
            quant_map: 16 * 4,
            nested_absmax: 4 * nb.div_ceil(NESTED_BLOCKSIZE),
            nested_quant_map: 256 * 4,
        }
    } else {
        Bnb4Parts {
            weight: n.div_ceil(2),
            absmax: 4 * nb,
            quant_map: 16 * 4,
            nested_absmax: 0,
            nested_quant_map: 0,
        }
    }
}

/// A typical Python `repr` of the double-quant offset (mean absmax) used when
/// the real value is unknown (sizing from a config). Real Llama weights have a
/// mean block absmax in [0.01, 0.1); the f32 value widened to f64 then prints
/// with 16–17 significant digits, i.e. 19–20 characters: we assume 20.
pub const TYPICAL_OFFSET_REPR: &str = "0.012345678901234567";

/// How many bytes the JSON of one tensor may differ from the estimate when the
/// offset is unknown: reprs range from 1 (`0.0`-like short values are 3) to 24
/// characters (`1.2345678901234567e-05`); ±4 covers every offset in [1e-4, 10).
pub const OFFSET_REPR_UNCERTAINTY: u64 = 4;

/// The quant-state JSON exactly as bitsandbytes writes it (`json.dumps` with
/// default separators; FORMATS.md §2.1). `dtype` is the torch dtype name of the
/// weight before quantization (`bfloat16`, `float16`, `float32`).
pub fn quant_state_json(f: &Bnb4, shape: [u64; 2], dtype: &str, offset_repr: &str) -> String {
    let mut s = format!(
        "{{\"quant_type\": \"{}\", \"blocksize\": {}, \"dtype\": \"{}\", \"shape\": [{}, {}]",
        f.quant_type.as_str(),
        f.blocksize,
        dtype,
        shape[0],
        shape[1]
    );
    if f.double_quant {
        s.push_str(&format!(
            ", \"nested_blocksize\": {NESTED_BLOCKSIZE}, \"nested_dtype\": \"float32\", \"nested_offset\": {offset_repr}"
        ));
    }
    s.push('}');
    s
}

/// Python's `repr(float(x))` (the quant-state JSON's `nested_offset`): the
/// one implementation, shared with the checkpoint writer.
pub use qlora_formats::bnb::python_float_repr;

/// The `__metadata__`-free name suffixes of the tensors of one quantized weight,
/// with their safetensors dtype, in the order bnb's `as_dict(packed=True)` lists them.
pub fn tensor_suffixes(f: &Bnb4) -> Vec<(&'static str, &'static str)> {
    let mut v = vec![
        ("weight", "U8"),
        ("weight.absmax", if f.double_quant { "U8" } else { "F32" }),
        ("weight.quant_map", "F32"),
    ];
    if f.double_quant {
        v.push(("weight.nested_absmax", "F32"));
        v.push(("weight.nested_quant_map", "F32"));
    }
    v
}

/// Name of the JSON blob tensor: `weight.quant_state.bitsandbytes__nf4`.
pub fn json_suffix(f: &Bnb4) -> String {
    format!("weight.quant_state.bitsandbytes__{}", f.quant_type.as_str())
}
