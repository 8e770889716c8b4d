//! bitsandbytes-compatible blockwise 4-bit quantization (NF4 / FP4), double
//! quantization of the absmax statistics, and bnb's 8-bit blockwise quantizer.
//!
//! Everything follows `shared/reference/FORMATS.md` §1 and the fixtures README §2.3
//! (bitsandbytes 0.50.2 CPU semantics) and is tested **bit-exactly** against the
//! golden fixtures produced by the real library.
//!
//! # Writing (quantizing)
//!
//! The input (f32, f16 or bf16; the latter two are upcast to f32 first) is treated as a
//! flat row-major vector of `n` elements split into blocks of `blocksize` consecutive
//! elements (a power of two in 32..=4096; blocks span rows). Per block:
//!
//! * **full block**: `absmax = max|x|`, `s = x * (1.0f / max(absmax, 1e-38f))`, the
//!   stored absmax is the *unclamped* `absmax` (an all-zero block stores 0.0);
//! * **partial last block** (only when `n % blocksize != 0`): `am = max(max|x|, 1e-38f)`,
//!   `s = x / am` (a division, as bnb's torch backend does), the stored absmax is `am`
//!   (an all-zero partial block stores `1e-38f`);
//! * `s` is clamped to `[-1, 1]`; the code is the number of f32 thresholds (midpoints of the
//!   sorted code table) strictly less than `s` (exact ties go to the lower code); FP4 maps
//!   that sorted index back to its bit pattern with `order[idx]`;
//! * two codes per byte, element `2j` in the **high** nibble; odd `n` pads the last low
//!   nibble with the code of 0.0 (NF4 7, FP4 0). The packed tensor is `[(n+1)/2, 1]` u8.
//!
//! **Double quantization** ([`QuantOptions::double_quant`]): `offset = mean(absmax)` is
//! computed exactly as torch's CPU `mean()` rounds it ([`torch_mean`]: its cascade sum in
//! f32, single-threaded order, independent of our thread count), so the offset and every
//! nested code equal bitsandbytes' (an f64 mean differs by an ulp on one fixture case);
//! readers always use the stored offset. Then
//! `c = absmax - offset` (f32) is quantized with [`quantize_blockwise8`] (blocksize 256,
//! the dynamic map, bnb's CPU 65,536-entry LUT semantics, see [`blockwise8`]).
//! For `n == 0` there are no blocks: the double-quant state has empty codes and nested
//! absmax and `offset = 0.0` (torch would produce NaN for the mean of nothing).
//!
//! # Non-finite inputs
//!
//! By default quantizing a tensor that contains NaN or ±inf fails with
//! [`QuantError::NonFinite`] naming the first bad flat index. With
//! [`QuantOptions::allow_nonfinite`] set, the tensor is quantized as if:
//! * each block's absmax is the max of |x| over its **finite** elements only (0.0 if none),
//! * NaN is quantized like 0.0 (NF4 code 7, FP4 code 0), so it dequantizes to 0.0,
//! * +inf / -inf saturate to `s = +1 / -1` (code of +1.0 / -1.0), so they dequantize to
//!   `±absmax` of their block.
//!
//! # Reading (dequantizing)
//!
//! Stored values are used as they are (files written by CPU or CUDA bnb both work):
//! `w[i] = map[nibble(i)] * absmax[i / blocksize]` in f32, rounded to the target dtype
//! (round-to-nearest-even for bf16/f16). With double quant the absmax is first
//! reconstructed as `nested_map[code[b]] * nested_absmax[b / nested_blocksize] + offset`
//! (f32 multiply, then f32 add — not fused).
//!
//! # Speed
//!
//! [`quantize_4bit`] and the `dequantize_*` methods are the fast paths: rayon across chunks
//! of blocks (64 K elements per task) and, on x86-64, AVX2 (+F16C) kernels selected at run
//! time (`is_x86_feature_detected!`): quantize by a 4-level branch-free binary search over
//! the 15 thresholds, 8 lanes at a time; dequantize by a per-block 16-entry table looked up
//! with in-register permutes (f32) or byte shuffles (bf16/f16), with non-temporal stores for
//! outputs of 16 MiB or more. Elsewhere a portable, auto-vectorizable scalar path is used
//! (also forced by `QLORA_QUANT_BACKEND=scalar`). [`mod@reference`] holds the plain scalar
//! specification; every backend is tested bit-for-bit against it and the fixtures.
//!
//! # API overview
//!
//! * [`quantize_4bit`] → [`Quantized4`]; [`Quantized4::validate`] for data read from files.
//! * Dequantize: [`Quantized4::dequantize_f32`] / `_bf16` / `_f16`, `dequantize_into_*`,
//!   [`Quantized4::dequantize_range_f32`] (any element range, for tiled matmuls),
//!   [`Quantized4::dequantize_range`] (generic over f32/bf16/f16) and
//!   [`Quantized4::dequantize_range_f32_rounded`] (values rounded through the recorded dtype,
//!   i.e. what bnb's matmul sees for bf16/f16 weights).
//! * Tables: [`code_table`], [`thresholds`], [`zero_code`], [`dynamic_map`].
//! * Double quant alone: [`double_quant`], [`double_quant_with_offset`] (e.g. with an exact
//!   torch-mean offset); 8-bit: [`quantize_blockwise8`], [`dequantize_blockwise8`].

use std::fmt;
use std::str::FromStr;

pub mod blockwise8;
mod dequantize;
mod quantize;
pub mod reference;
mod rows_as_columns;
mod rows_interleaved;
mod simd;
mod tables;
pub mod torch_mean;

pub use blockwise8::{dequantize_blockwise8, quantize_blockwise8};
pub use dequantize::DequantElem;
#[doc(hidden)]
pub use dequantize::Expand;
#[doc(hidden)]
pub use quantize::quantize_4bit_with;
pub use quantize::{
    block_absmax, double_quant, double_quant_with_offset, dq_offset, quantize_4bit,
};
/// The 16 × 16 u32 register transpose the tile writers use (`qlora-model`'s
/// AMX packing shares it). AVX-512 F; see its own documentation.
#[cfg(target_arch = "x86_64")]
#[doc(hidden)]
pub use simd::x86_512::transpose16x16_u32;
pub use simd::Backend;
pub use tables::{code_table, dynamic_map, thresholds, zero_code};

/// Smallest allowed 4-bit blocksize (bnb: 32..=4096, powers of two).
pub const MIN_BLOCKSIZE: usize = 32;
/// Largest allowed 4-bit blocksize.
pub const MAX_BLOCKSIZE: usize = 4096;
/// Nested blocksize bnb uses for double quantization.
pub const NESTED_BLOCKSIZE: usize = 256;
/// The clamp bnb's torch backend applies to absmax before scaling (stored for partial blocks).
pub const ABSMAX_EPS: f32 = 1e-38;

/// Errors from quantization and from validating quantized data read from files.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum QuantError {
    #[error("shape {shape:?} has {numel} elements but the input has {len}")]
    ShapeMismatch {
        shape: Vec<usize>,
        numel: usize,
        len: usize,
    },
    #[error("blocksize {0} is not supported (must be a power of two in 32..=4096)")]
    InvalidBlocksize(usize),
    #[error(
        "input element {index} is not finite ({value}); set allow_nonfinite to quantize anyway"
    )]
    NonFinite { index: usize, value: f32 },
    #[error("unknown 4-bit quant type {0:?} (expected \"nf4\" or \"fp4\")")]
    UnknownQuantType(String),
    #[error("unknown dtype {0:?} (expected \"float32\", \"float16\" or \"bfloat16\")")]
    UnknownDType(String),
    #[error("inconsistent quantized tensor: {0}")]
    Inconsistent(String),
}

/// The 4-bit data type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum QuantType {
    #[default]
    Nf4,
    Fp4,
}

impl QuantType {
    /// `"nf4"` / `"fp4"`, bnb's spelling (also used in the quant-state key suffix).
    pub fn as_str(self) -> &'static str {
        match self {
            QuantType::Nf4 => "nf4",
            QuantType::Fp4 => "fp4",
        }
    }
}

impl fmt::Display for QuantType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for QuantType {
    type Err = QuantError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "nf4" => Ok(QuantType::Nf4),
            "fp4" => Ok(QuantType::Fp4),
            _ => Err(QuantError::UnknownQuantType(s.to_string())),
        }
    }
}

/// A floating-point element type: f32, f16 or bf16. The one dtype enum of the
/// workspace: a quantized tensor's original dtype (dequantize back to it), a
/// checkpoint's `torch_dtype`, the compute and keep dtypes of the planners.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    /// torch's name without the `torch.` prefix, as in bnb's quant-state JSON.
    pub fn torch_name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
        }
    }

    /// The short lower-case name used on command lines and in reports (`f32`, `f16`, `bf16`).
    pub fn short_name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }

    /// The safetensors dtype name (`F32`, `F16`, `BF16`).
    pub fn safetensors_name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
        }
    }

    /// Size of one element in bytes.
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// Any common spelling, case-insensitive: torch names (optionally `torch.`-prefixed,
    /// plus torch's aliases `float` and `half`) and the short names (`f32`, `fp32`, `bf16`,
    /// `f16`, `fp16`). Used for config.json and command lines; bnb quant states are read
    /// with the strict [`FromStr`].
    pub fn parse(s: &str) -> Option<DType> {
        let l = s.to_ascii_lowercase();
        match l.strip_prefix("torch.").unwrap_or(&l) {
            "float32" | "float" | "f32" | "fp32" => Some(DType::F32),
            "float16" | "half" | "f16" | "fp16" => Some(DType::F16),
            "bfloat16" | "bf16" => Some(DType::BF16),
            _ => None,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.torch_name())
    }
}

impl FromStr for DType {
    type Err = QuantError;
    /// Accepts `float32`/`float16`/`bfloat16` (optionally prefixed `torch.`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.strip_prefix("torch.").unwrap_or(s) {
            "float32" => Ok(DType::F32),
            "float16" => Ok(DType::F16),
            "bfloat16" => Ok(DType::BF16),
            _ => Err(QuantError::UnknownDType(s.to_string())),
        }
    }
}

/// A borrowed input tensor in one of the supported float dtypes.
#[derive(Debug, Clone, Copy)]
pub enum Input<'a> {
    F32(&'a [f32]),
    F16(&'a [half::f16]),
    BF16(&'a [half::bf16]),
}

impl Input<'_> {
    pub fn len(&self) -> usize {
        match self {
            Input::F32(x) => x.len(),
            Input::F16(x) => x.len(),
            Input::BF16(x) => x.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn dtype(&self) -> DType {
        match self {
            Input::F32(_) => DType::F32,
            Input::F16(_) => DType::F16,
            Input::BF16(_) => DType::BF16,
        }
    }

    /// Element `i` upcast to f32.
    #[inline]
    pub fn get_f32(&self, i: usize) -> f32 {
        match self {
            Input::F32(x) => x[i],
            Input::F16(x) => x[i].to_f32(),
            Input::BF16(x) => x[i].to_f32(),
        }
    }

    /// Upcasts elements `start..start+out.len()` into `out`.
    pub fn copy_range_f32(&self, start: usize, out: &mut [f32]) {
        use half::slice::HalfFloatSliceExt;
        let end = start + out.len();
        match self {
            Input::F32(x) => out.copy_from_slice(&x[start..end]),
            Input::F16(x) => x[start..end].convert_to_f32_slice(out),
            Input::BF16(x) => x[start..end].convert_to_f32_slice(out),
        }
    }
}

/// Quantization options. Default: NF4, blocksize 64, double quant on, non-finite rejected
/// (the QLoRA recipe; note bnb's own *function* defaults differ, FORMATS.md §1.8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantOptions {
    pub quant_type: QuantType,
    pub blocksize: usize,
    pub double_quant: bool,
    /// See the crate docs, "Non-finite inputs".
    pub allow_nonfinite: bool,
}

impl Default for QuantOptions {
    fn default() -> Self {
        QuantOptions {
            quant_type: QuantType::Nf4,
            blocksize: 64,
            double_quant: true,
            allow_nonfinite: false,
        }
    }
}

/// The double-quantized absmax statistics (bnb's `state2` + offset).
#[derive(Debug, Clone, PartialEq)]
pub struct DoubleQuant {
    /// One 8-bit code per 4-bit block (`absmax` U8 `[nblocks]` in checkpoints).
    pub codes: Vec<u8>,
    /// Per nested block (of `nested_blocksize` codes) absmax of `absmax - offset`.
    pub nested_absmax: Vec<f32>,
    /// The 256-entry dynamic map (`nested_quant_map`).
    pub nested_map: Vec<f32>,
    /// `mean(absmax)` (`nested_offset` / the `offset` tensor).
    pub offset: f32,
    /// Always 256 when written by bnb or by us.
    pub nested_blocksize: usize,
}

impl DoubleQuant {
    /// Reconstructed absmax of block `b`: `nested_map[code] * nested_absmax[b / nbs] + offset`
    /// (f32 multiply then f32 add, exactly bnb's `dequantize_blockwise(..) + offset`).
    #[inline]
    pub fn absmax_at(&self, b: usize) -> f32 {
        self.nested_map[self.codes[b] as usize] * self.nested_absmax[b / self.nested_blocksize]
            + self.offset
    }

    /// Reconstructs absmax for blocks `first..first+out.len()` (as [`Self::absmax_at`],
    /// with one division per call instead of one per block).
    pub fn absmax_range(&self, first: usize, out: &mut [f32]) {
        let nbs = self.nested_blocksize;
        let (mut group, mut within) = (first / nbs, first % nbs);
        for (o, &code) in out.iter_mut().zip(&self.codes[first..]) {
            *o = self.nested_map[code as usize] * self.nested_absmax[group] + self.offset;
            within += 1;
            if within == nbs {
                (group, within) = (group + 1, 0);
            }
        }
    }
}

/// Per-block absmax statistics: plain f32, or double-quantized.
#[derive(Debug, Clone, PartialEq)]
pub enum Absmax {
    Plain(Vec<f32>),
    Double(DoubleQuant),
}

impl Absmax {
    /// Number of blocks described.
    pub fn len(&self) -> usize {
        match self {
            Absmax::Plain(v) => v.len(),
            Absmax::Double(d) => d.codes.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Absmax of blocks `first..first+out.len()` as f32 (reconstructed if double-quantized).
    pub fn range_f32(&self, first: usize, out: &mut [f32]) {
        match self {
            Absmax::Plain(v) => out.copy_from_slice(&v[first..first + out.len()]),
            Absmax::Double(d) => d.absmax_range(first, out),
        }
    }
}

/// A 4-bit quantized tensor in bnb's layout.
#[derive(Debug, Clone, PartialEq)]
pub struct Quantized4 {
    pub quant_type: QuantType,
    pub blocksize: usize,
    /// Original shape (e.g. `[out, in]`).
    pub shape: Vec<usize>,
    /// Original dtype (dequantize back to this).
    pub dtype: DType,
    /// `(n+1)/2` bytes, element 2j in the high nibble (bnb shape `[(n+1)/2, 1]`).
    pub packed: Vec<u8>,
    pub absmax: Absmax,
}

/// `ceil(n / bs)`.
#[inline]
pub fn num_blocks(n: usize, blocksize: usize) -> usize {
    n.div_ceil(blocksize)
}

/// Checks a 4-bit blocksize: a power of two in 32..=4096.
pub fn check_blocksize(blocksize: usize) -> Result<(), QuantError> {
    if blocksize.is_power_of_two() && (MIN_BLOCKSIZE..=MAX_BLOCKSIZE).contains(&blocksize) {
        Ok(())
    } else {
        Err(QuantError::InvalidBlocksize(blocksize))
    }
}

impl Quantized4 {
    /// Number of elements (product of `shape`; 1 for a 0-d shape).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Number of 4-bit blocks.
    pub fn num_blocks(&self) -> usize {
        num_blocks(self.numel(), self.blocksize)
    }

    /// Whether the absmax is double-quantized.
    pub fn is_double_quant(&self) -> bool {
        matches!(self.absmax, Absmax::Double(_))
    }

    /// The per-block absmax as f32 (reconstructed when double-quantized).
    pub fn absmax_f32(&self) -> Vec<f32> {
        match &self.absmax {
            Absmax::Plain(v) => v.clone(),
            Absmax::Double(d) => {
                let mut out = vec![0f32; d.codes.len()];
                d.absmax_range(0, &mut out);
                out
            }
        }
    }

    /// The 16-entry code table (`quant_map`).
    pub fn quant_map(&self) -> [f32; 16] {
        code_table(self.quant_type)
    }

    /// Checks that every length is consistent with `shape` and `blocksize` (use on data read
    /// from files before dequantizing: the dequantize methods panic on inconsistent data).
    pub fn validate(&self) -> Result<(), QuantError> {
        check_blocksize(self.blocksize)?;
        let n = self
            .shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| {
                QuantError::Inconsistent(format!("shape {:?} overflows usize", self.shape))
            })?;
        let want_bytes = n.div_ceil(2);
        if self.packed.len() != want_bytes {
            return Err(QuantError::Inconsistent(format!(
                "packed weight has {} bytes but shape {:?} ({} elements) needs {}",
                self.packed.len(),
                self.shape,
                n,
                want_bytes
            )));
        }
        let nb = num_blocks(n, self.blocksize);
        if self.absmax.len() != nb {
            return Err(QuantError::Inconsistent(format!(
                "absmax has {} entries but {} elements in blocks of {} need {}",
                self.absmax.len(),
                n,
                self.blocksize,
                nb
            )));
        }
        if let Absmax::Double(d) = &self.absmax {
            if d.nested_blocksize == 0 {
                return Err(QuantError::Inconsistent("nested_blocksize is 0".into()));
            }
            if d.nested_map.len() != 256 {
                return Err(QuantError::Inconsistent(format!(
                    "nested_quant_map has {} entries, expected 256",
                    d.nested_map.len()
                )));
            }
            let nn = num_blocks(nb, d.nested_blocksize);
            if d.nested_absmax.len() != nn {
                return Err(QuantError::Inconsistent(format!(
                    "nested_absmax has {} entries but {} blocks in nested blocks of {} need {}",
                    d.nested_absmax.len(),
                    nb,
                    d.nested_blocksize,
                    nn
                )));
            }
        }
        Ok(())
    }
}

/// A deterministic `[rows, cols]` test matrix in [-0.1, 0.1) (an LCG).
#[cfg(test)]
pub(crate) fn test_matrix(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..rows * cols)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * 0.2
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for t in [QuantType::Nf4, QuantType::Fp4] {
            assert_eq!(t.as_str().parse::<QuantType>().unwrap(), t);
        }
        for d in [DType::F32, DType::F16, DType::BF16] {
            assert_eq!(d.torch_name().parse::<DType>().unwrap(), d);
        }
        assert_eq!("torch.bfloat16".parse::<DType>().unwrap(), DType::BF16);
        assert!("int8".parse::<QuantType>().is_err());
        assert!("float64".parse::<DType>().is_err());
        // the strict form is for bnb quant states; `parse` takes every common spelling
        assert!("half".parse::<DType>().is_err());
        for (s, d) in [
            ("float", DType::F32),
            ("torch.float32", DType::F32),
            ("FP32", DType::F32),
            ("half", DType::F16),
            ("f16", DType::F16),
            ("bf16", DType::BF16),
            ("BFloat16", DType::BF16),
        ] {
            assert_eq!(DType::parse(s), Some(d), "{s}");
        }
        assert_eq!(DType::parse("float64"), None);
        for d in [DType::F32, DType::F16, DType::BF16] {
            assert_eq!(DType::parse(d.short_name()), Some(d));
            assert_eq!(DType::parse(d.torch_name()), Some(d));
        }
    }

    #[test]
    fn blocksize_rules() {
        for bs in [32, 64, 128, 256, 512, 1024, 2048, 4096] {
            check_blocksize(bs).unwrap();
        }
        for bs in [0, 1, 16, 48, 96, 8192] {
            assert_eq!(check_blocksize(bs), Err(QuantError::InvalidBlocksize(bs)));
        }
    }
}
