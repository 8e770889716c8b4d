//! Plain scalar implementations: the specification in code.
//!
//! Every function here is written for clarity, element by element, directly from the
//! crate-level semantics (FORMATS.md §1, fixtures README §2.3). The fast paths in this
//! crate are tested against these on random inputs; the fixtures test both.

use crate::tables::{order, thresholds, zero_code};
use crate::{
    check_blocksize, code_table, dynamic_map, num_blocks, Absmax, DoubleQuant, Input, QuantError,
    QuantOptions, QuantType, Quantized4, ABSMAX_EPS, NESTED_BLOCKSIZE,
};

/// How a block's elements are scaled into [-1, 1].
#[derive(Debug, Clone, Copy)]
enum Scale {
    /// Full block: `x * r` with `r = 1.0f / max(absmax, 1e-38f)`.
    Mul(f32),
    /// Partial last block: `x / am` with `am = max(absmax, 1e-38f)`.
    Div(f32),
}

/// The stored absmax and the scaling of a block whose max |x| (over finite values) is
/// `absmax`.
#[inline]
fn block_scale(absmax: f32, partial: bool) -> (f32, Scale) {
    let am = absmax.max(ABSMAX_EPS);
    if partial {
        (am, Scale::Div(am))
    } else {
        (absmax, Scale::Mul(1.0f32 / am))
    }
}

/// Scaled and clamped value of one element (NaN → 0.0, ±inf → ±1; only reachable with
/// `allow_nonfinite`).
#[inline]
fn scaled(x: f32, scale: Scale) -> f32 {
    if x.is_nan() {
        return 0.0;
    }
    let s = match scale {
        Scale::Mul(r) => x * r,
        Scale::Div(am) => x / am,
    };
    s.clamp(-1.0, 1.0)
}

/// The 4-bit code of a scaled value: `order[#{k : thresholds[k] < s}]`.
#[inline]
fn code_of(s: f32, th: &[f32; 15], ord: &[u8; 16]) -> u8 {
    let idx = th.iter().filter(|&&t| t < s).count();
    ord[idx]
}

/// First non-finite element, if any.
fn first_nonfinite(input: &Input<'_>) -> Option<(usize, f32)> {
    (0..input.len())
        .map(|i| (i, input.get_f32(i)))
        .find(|(_, v)| !v.is_finite())
}

/// Checks blocksize and shape; returns n.
fn check_input(
    input: &Input<'_>,
    shape: &[usize],
    opts: &QuantOptions,
) -> Result<usize, QuantError> {
    check_blocksize(opts.blocksize)?;
    let numel = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    match numel {
        Some(n) if n == input.len() => Ok(n),
        _ => Err(QuantError::ShapeMismatch {
            shape: shape.to_vec(),
            numel: numel.unwrap_or(usize::MAX),
            len: input.len(),
        }),
    }
}

/// `mean(absmax)` exactly as torch computes it on CPU (see [`crate::torch_mean`]).
/// 0.0 for no blocks.
pub fn mean_offset(absmax: &[f32]) -> f32 {
    if absmax.is_empty() {
        return 0.0;
    }
    // bitsandbytes stores torch's f32 `absmax.mean()`; its summation order
    // decides the last bit, and the offset shifts every nested code.
    crate::torch_mean::torch_cpu_mean_f32(absmax)
}

/// Double quantization of a per-block absmax vector (crate docs, "Double quantization").
pub fn double_quant(absmax: &[f32]) -> DoubleQuant {
    double_quant_with_offset(absmax, mean_offset(absmax))
}

/// Double quantization with a given offset (e.g. the one stored in a file: with torch's
/// offset this reproduces bnb's codes exactly). Plain and slow (255 compares per value);
/// use [`crate::double_quant_with_offset`] in production code.
pub fn double_quant_with_offset(absmax: &[f32], offset: f32) -> DoubleQuant {
    let centred: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
    let map = dynamic_map();
    let (codes, nested_absmax) = quantize_blockwise8(&centred, &map, NESTED_BLOCKSIZE);
    DoubleQuant {
        codes,
        nested_absmax,
        nested_map: map.to_vec(),
        offset,
        nested_blocksize: NESTED_BLOCKSIZE,
    }
}

/// Reference `quantize_4bit` (same contract as [`crate::quantize_4bit`]).
pub fn quantize_4bit(
    input: Input<'_>,
    shape: &[usize],
    opts: &QuantOptions,
) -> Result<Quantized4, QuantError> {
    let n = check_input(&input, shape, opts)?;
    if !opts.allow_nonfinite {
        if let Some((index, value)) = first_nonfinite(&input) {
            return Err(QuantError::NonFinite { index, value });
        }
    }
    let bs = opts.blocksize;
    let th = thresholds(opts.quant_type);
    let ord = order(opts.quant_type);
    let nb = num_blocks(n, bs);
    let mut absmax = Vec::with_capacity(nb);
    let mut codes: Vec<u8> = Vec::with_capacity(n + 1);
    for b in 0..nb {
        let start = b * bs;
        let end = (start + bs).min(n);
        let am = (start..end)
            .map(|i| input.get_f32(i))
            .filter(|v| v.is_finite())
            .fold(0f32, |m, v| m.max(v.abs()));
        let (stored, scale) = block_scale(am, end - start < bs);
        absmax.push(stored);
        for i in start..end {
            codes.push(code_of(scaled(input.get_f32(i), scale), &th, ord));
        }
    }
    if n % 2 == 1 {
        codes.push(zero_code(opts.quant_type));
    }
    let packed = codes.chunks(2).map(|p| (p[0] << 4) | p[1]).collect();
    let absmax = if opts.double_quant {
        Absmax::Double(double_quant(&absmax))
    } else {
        Absmax::Plain(absmax)
    };
    Ok(Quantized4 {
        quant_type: opts.quant_type,
        blocksize: bs,
        shape: shape.to_vec(),
        dtype: input.dtype(),
        packed,
        absmax,
    })
}

/// The 4-bit code of element `i`.
#[inline]
pub fn nibble(packed: &[u8], i: usize) -> u8 {
    let byte = packed[i / 2];
    if i & 1 == 0 {
        byte >> 4
    } else {
        byte & 0x0f
    }
}

/// Reconstructed absmax of block `b`.
pub fn absmax_at(q: &Quantized4, b: usize) -> f32 {
    match &q.absmax {
        Absmax::Plain(v) => v[b],
        Absmax::Double(d) => {
            let scaled =
                d.nested_map[d.codes[b] as usize] * d.nested_absmax[b / d.nested_blocksize];
            scaled + d.offset
        }
    }
}

/// Element `i` dequantized to f32: `map[nibble(i)] * absmax[i / blocksize]`.
pub fn dequantize_element(q: &Quantized4, map: &[f32; 16], i: usize) -> f32 {
    map[nibble(&q.packed, i) as usize] * absmax_at(q, i / q.blocksize)
}

/// Reference dequantization to f32.
pub fn dequantize_f32(q: &Quantized4) -> Vec<f32> {
    let map = code_table(q.quant_type);
    (0..q.numel())
        .map(|i| dequantize_element(q, &map, i))
        .collect()
}

/// Reference dequantization of elements `start..start+len` to f32.
pub fn dequantize_range_f32(q: &Quantized4, start: usize, len: usize) -> Vec<f32> {
    let map = code_table(q.quant_type);
    (start..start + len)
        .map(|i| dequantize_element(q, &map, i))
        .collect()
}

/// Reference dequantization to the recorded dtype, widened back to f32.
pub fn dequantize_f32_rounded(q: &Quantized4) -> Vec<f32> {
    let f = dequantize_f32(q);
    match q.dtype {
        crate::DType::F32 => f,
        crate::DType::BF16 => f
            .into_iter()
            .map(|v| half::bf16::from_f32(v).to_f32())
            .collect(),
        crate::DType::F16 => f
            .into_iter()
            .map(|v| half::f16::from_f32(v).to_f32())
            .collect(),
    }
}

/// Reference dequantization to bf16 (f32 result rounded to nearest even).
pub fn dequantize_bf16(q: &Quantized4) -> Vec<half::bf16> {
    dequantize_f32(q)
        .into_iter()
        .map(half::bf16::from_f32)
        .collect()
}

/// Reference dequantization to f16 (f32 result rounded to nearest even).
pub fn dequantize_f16(q: &Quantized4) -> Vec<half::f16> {
    dequantize_f32(q)
        .into_iter()
        .map(half::f16::from_f32)
        .collect()
}

/// The value bin `i` of bnb's CPU LUT stands for: `-1.0f + (2.0f*i)/65535.0f`.
fn bin_centre(i: usize) -> f32 {
    -1.0f32 + (2.0f32 * i as f32) / 65535.0f32
}

/// The LUT bin of a scaled value `v` in [-1, 1]: `trunc(((v + 1) * 0.5f) * 65535 + 0.5f)`
/// (four separate f32 operations, as bnb's `cpu_ops.cpp`).
fn bin_of(v: f32) -> u16 {
    let t = ((v + 1.0f32) * 0.5f32) * 65535.0f32 + 0.5f32;
    t as u16
}

/// Reference bnb-CPU 8-bit blockwise quantization (see [`crate::blockwise8`]): the LUT
/// lookup is written out as the count it stands for.
pub fn quantize_blockwise8(x: &[f32], code: &[f32; 256], blocksize: usize) -> (Vec<u8>, Vec<f32>) {
    assert!(blocksize > 0, "blocksize must be > 0");
    let mids: Vec<f32> = (0..255).map(|k| 0.5f32 * (code[k] + code[k + 1])).collect();
    let mut q = Vec::with_capacity(x.len());
    let mut absmax = Vec::new();
    for block in x.chunks(blocksize) {
        let am = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        absmax.push(am);
        for &v in block {
            if am == 0.0 {
                q.push(0);
                continue;
            }
            let s = (v * (1.0f32 / am)).clamp(-1.0, 1.0);
            let centre = bin_centre(bin_of(s) as usize);
            q.push(mids.iter().filter(|&&m| m < centre).count() as u8);
        }
    }
    (q, absmax)
}

/// Reference 8-bit blockwise dequantization: `code[q[i]] * absmax[i / blocksize]`.
pub fn dequantize_blockwise8(
    q: &[u8],
    absmax: &[f32],
    code: &[f32; 256],
    blocksize: usize,
) -> Vec<f32> {
    q.iter()
        .enumerate()
        .map(|(i, &c)| code[c as usize] * absmax[i / blocksize])
        .collect()
}

/// Convenience: the code table of `t` (re-exported for symmetry with the fast API).
pub fn quant_map(t: QuantType) -> [f32; 16] {
    code_table(t)
}
