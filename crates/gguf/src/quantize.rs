//! Encoding f32 rows into ggml tensor types (feature `quantize`).
//!
//! The block quantizers are candle's ports of llama.cpp's *reference* quantizers
//! (`quantize_row_q8_0_ref`, `quantize_row_q4_K_ref`, … — the ones `llama-quantize` uses
//! without an importance matrix), reached through `candle_core::quantized::QTensor`. We do
//! not hand-roll them: the maintained port is the better source of truth, and the tests
//! check its bytes against our own independent decoder ([`crate::dequant`]).
//!
//! F32 / F16 / BF16 are plain casts (round-to-nearest-even, as ggml's
//! `ggml_fp32_to_fp16_row` and numpy's `astype(float16)` do).
//!
//! Fast path: [`quantize`] splits a tensor into chunks of whole blocks and encodes the
//! chunks on the rayon pool; every ggml block is encoded independently of every other, so
//! the bytes equal those of one [`quantize_reference`] call (tested on random inputs).

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

use crate::GgmlType;

/// Why a tensor cannot be encoded.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum QuantizeError {
    #[error("cannot encode ggml type {0} (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K)")]
    Unsupported(GgmlType),
    #[error("{n} values are not a whole number of {ty} blocks of {block}")]
    Size {
        ty: GgmlType,
        n: usize,
        block: usize,
    },
    #[error("non-finite value {value} at index {index}")]
    NonFinite { index: usize, value: f32 },
    #[error("candle quantizer: {0}")]
    Candle(String),
}

/// The candle block type behind a ggml type, `None` for the plain float types and for
/// types candle cannot encode.
fn candle_type(ty: GgmlType) -> Option<GgmlDType> {
    Some(match ty {
        GgmlType::Q4_0 => GgmlDType::Q4_0,
        GgmlType::Q4_1 => GgmlDType::Q4_1,
        GgmlType::Q5_0 => GgmlDType::Q5_0,
        GgmlType::Q5_1 => GgmlDType::Q5_1,
        GgmlType::Q8_0 => GgmlDType::Q8_0,
        GgmlType::Q2_K => GgmlDType::Q2K,
        GgmlType::Q3_K => GgmlDType::Q3K,
        GgmlType::Q4_K => GgmlDType::Q4K,
        GgmlType::Q5_K => GgmlDType::Q5K,
        GgmlType::Q6_K => GgmlDType::Q6K,
        _ => return None,
    })
}

/// Whether [`quantize`] can produce this type.
pub fn can_quantize(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) || candle_type(ty).is_some()
}

fn check(ty: GgmlType, data: &[f32]) -> Result<(), QuantizeError> {
    if !can_quantize(ty) {
        return Err(QuantizeError::Unsupported(ty));
    }
    let block = ty.block_size();
    if !data.len().is_multiple_of(block) {
        return Err(QuantizeError::Size {
            ty,
            n: data.len(),
            block,
        });
    }
    // A NaN/inf would silently poison a whole block's scale; refuse it with its position.
    if let Some((index, &value)) = data.iter().enumerate().find(|(_, x)| !x.is_finite()) {
        return Err(QuantizeError::NonFinite { index, value });
    }
    Ok(())
}

fn encode_plain(ty: GgmlType, data: &[f32]) -> Vec<u8> {
    match ty {
        GgmlType::F32 => data.iter().flat_map(|x| x.to_le_bytes()).collect(),
        GgmlType::F16 => data
            .iter()
            .flat_map(|&x| f16::from_f32(x).to_le_bytes())
            .collect(),
        GgmlType::BF16 => data
            .iter()
            .flat_map(|&x| bf16::from_f32(x).to_le_bytes())
            .collect(),
        _ => unreachable!("encode_plain is only called for float types"),
    }
}

fn encode_candle(dt: GgmlDType, data: &[f32]) -> Result<Vec<u8>, QuantizeError> {
    let err = |e: candle_core::Error| QuantizeError::Candle(e.to_string());
    let t = Tensor::from_slice(data, data.len(), &Device::Cpu).map_err(err)?;
    let q = QTensor::quantize(&t, dt).map_err(err)?;
    Ok(q.data().map_err(err)?.into_owned())
}

/// Encode `data` (a whole number of blocks) as `ty` in one call: the plain reference path.
pub fn quantize_reference(ty: GgmlType, data: &[f32]) -> Result<Vec<u8>, QuantizeError> {
    check(ty, data)?;
    match candle_type(ty) {
        Some(dt) => encode_candle(dt, data),
        None => Ok(encode_plain(ty, data)),
    }
}

/// Blocks per parallel work item: large enough to amortize the per-call setup, small
/// enough to balance a 2-core machine on a 576-wide model.
const BLOCKS_PER_CHUNK: usize = 1024;

/// Encode `data` (a whole number of blocks) as `ty`, chunks of blocks in parallel.
/// Same bytes as [`quantize_reference`].
pub fn quantize(ty: GgmlType, data: &[f32]) -> Result<Vec<u8>, QuantizeError> {
    check(ty, data)?;
    let Some(dt) = candle_type(ty) else {
        return Ok(encode_plain(ty, data));
    };
    let chunk = ty.block_size() * BLOCKS_PER_CHUNK;
    if data.len() <= chunk {
        return encode_candle(dt, data);
    }
    let parts: Vec<Vec<u8>> = data
        .par_chunks(chunk)
        .map(|c| encode_candle(dt, c))
        .collect::<Result<_, _>>()?;
    Ok(parts.concat())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dequant::dequantize;
    use rand::{Rng, SeedableRng};

    fn randn(n: usize, seed: u64) -> Vec<f32> {
        let mut r = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n)
            .map(|_| {
                // Box-Muller: Gaussian weights like a real checkpoint's.
                let u: f32 = r.random_range(1e-7..1.0);
                let v: f32 = r.random();
                (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
            })
            .collect()
    }

    const TYPES: [GgmlType; 10] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
    ];

    /// Worst-case |error| of one element relative to its block's absmax, from each
    /// format's definition (not measured):
    /// - F16 / BF16: half an ulp, 2^-11 / 2^-8 relative to the element itself (f16
    ///   subnormals: 2^-25 absolute).
    /// - Q8_0: d = absmax/127 and round-to-nearest: d/2, plus the f16 rounding of d
    ///   times the largest code 127 (and f32 rounding of x·(1/d), ~1e-7 relative).
    /// - Q4_0: d = max/-8, codes -8..7 with the extreme on -8: the opposite extreme
    ///   (+absmax) lands on code 7 at most, error ≤ |d| = absmax/8.
    /// - Q4_1: step d = (max-min)/15 ≤ 2·absmax/15, error ≤ d/2, plus the f16 rounding
    ///   of d (×15) and of the min.
    /// - Q5_0: d = max/-16, like Q4_0: ≤ absmax/16.
    /// - K-quants: each 32 (Q6_K: 16) sub-block gets a 6-bit (8-bit) scale relative to
    ///   the super-block's; the per-element bound is half a step of the sub-block
    ///   quantizer plus the scale rounding. We use the block-type step with the
    ///   super-block absmax: Q4_K (max-min)/15 → ≤ 2·absmax/15 per step, allowing one
    ///   full step because the min/scale are rounded to 6 bits; Q5_K /31; Q6_K /63 (two
    ///   steps allowed for its 8-bit sub-scales).
    fn bound(ty: GgmlType, x: f32, absmax: f32) -> f32 {
        let f16_eps = 2f32.powi(-11);
        // Rounding error of a scale stored as f16: relative 2^-11 for normal numbers,
        // absolute 2^-25 (half the subnormal spacing) below 2^-14 — tiny blocks hit that.
        let fq = |d: f32| (d.abs() * f16_eps).max(2f32.powi(-25));
        match ty {
            GgmlType::F32 => 0.0,
            GgmlType::F16 => fq(x),
            GgmlType::BF16 => x.abs() * 2f32.powi(-8),
            GgmlType::Q8_0 => {
                let d = absmax / 127.0;
                d / 2.0 + 127.0 * fq(d) + 1e-7 * absmax
            }
            GgmlType::Q4_0 => {
                let d = absmax / 8.0;
                d + 8.0 * fq(d)
            }
            GgmlType::Q5_0 => {
                let d = absmax / 16.0;
                d + 16.0 * fq(d)
            }
            GgmlType::Q4_1 => {
                let d = 2.0 * absmax / 15.0;
                d / 2.0 + 15.0 * fq(d) + fq(absmax)
            }
            GgmlType::Q4_K => 2.0 * absmax / 15.0,
            GgmlType::Q5_K => 2.0 * absmax / 31.0,
            GgmlType::Q6_K => 2.0 * 2.0 * absmax / 63.0,
            other => panic!("no bound for {other}"),
        }
    }

    #[test]
    fn decoded_values_stay_within_each_types_error_bound() {
        // 8 rows of 512: whole blocks of every type; a scaled row and a zero block too.
        let mut x = randn(8 * 512, 1);
        for v in &mut x[512..1024] {
            *v *= 1e-3;
        }
        for v in &mut x[1024..1024 + 256] {
            *v = 0.0;
        }
        for ty in TYPES {
            let bytes = quantize(ty, &x).unwrap();
            assert_eq!(bytes.len() as u64, ty.bytes_for(x.len() as u64).unwrap());
            let y = dequantize(ty, &bytes, x.len()).unwrap();
            let bs = ty.block_size().max(32);
            let mut worst = 0f32;
            for (blk, (xb, yb)) in x.chunks(bs).zip(y.chunks(bs)).enumerate() {
                let absmax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
                for (i, (a, b)) in xb.iter().zip(yb).enumerate() {
                    let e = (a - b).abs();
                    let lim = bound(ty, *a, absmax);
                    assert!(
                        e <= lim,
                        "{ty}: block {blk} elem {i}: {a} decoded as {b}, error {e} > bound {lim}"
                    );
                    if absmax > 0.0 {
                        worst = worst.max(e / absmax);
                    }
                }
                if absmax == 0.0 {
                    assert!(yb.iter().all(|v| *v == 0.0), "{ty}: zero block not zero");
                }
            }
            // Not vacuous: the quantized types really do lose precision.
            if ty != GgmlType::F32 {
                assert!(worst > 0.0, "{ty}: no error at all is implausible");
            }
        }
    }

    #[test]
    fn our_decoder_agrees_exactly_with_candles() {
        let x = randn(4 * 1024, 2);
        for ty in TYPES {
            let Some(dt) = candle_type(ty) else { continue };
            let bytes = quantize(ty, &x).unwrap();
            let ours = dequantize(ty, &bytes, x.len()).unwrap();
            let t = Tensor::from_slice(&x, x.len(), &Device::Cpu).unwrap();
            let q = QTensor::quantize(&t, dt).unwrap();
            let theirs: Vec<f32> = q.dequantize(&Device::Cpu).unwrap().to_vec1().unwrap();
            assert_eq!(q.data().unwrap().as_ref(), bytes.as_slice(), "{ty} bytes");
            assert_eq!(ours, theirs, "{ty}: decoders disagree");
        }
    }

    #[test]
    fn parallel_chunks_give_the_reference_bytes() {
        // More than one chunk for every block size, and a ragged last chunk.
        let n = 256 * (BLOCKS_PER_CHUNK * 2 + 3);
        let x = randn(n, 3);
        for ty in TYPES {
            assert_eq!(
                quantize(ty, &x).unwrap(),
                quantize_reference(ty, &x).unwrap(),
                "{ty}"
            );
        }
    }

    #[test]
    fn q8_0_matches_the_llama_cpp_formula_on_a_hand_block() {
        // quantize_row_q8_0_ref: d = amax/127, q = round(x/d) (half away from zero).
        let mut x = [0f32; 32];
        for (i, v) in x.iter_mut().enumerate() {
            *v = (i as f32 - 12.5) / 4.0;
        }
        let b = quantize(GgmlType::Q8_0, &x).unwrap();
        let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
        assert_eq!(d, f16::from_f32(4.625 / 127.0).to_f32());
        let id = 1.0 / (4.625f32 / 127.0);
        for (i, v) in x.iter().enumerate() {
            assert_eq!(b[2 + i] as i8, (v * id).round() as i8, "elem {i}");
        }
    }

    #[test]
    fn bad_inputs_are_errors_not_panics() {
        assert_eq!(
            quantize(GgmlType::Q4_K, &[0.0; 300]),
            Err(QuantizeError::Size {
                ty: GgmlType::Q4_K,
                n: 300,
                block: 256
            })
        );
        assert_eq!(
            quantize(GgmlType::IQ4_XS, &[0.0; 256]),
            Err(QuantizeError::Unsupported(GgmlType::IQ4_XS))
        );
        let mut x = vec![0.5f32; 64];
        x[40] = f32::NAN;
        assert!(matches!(
            quantize(GgmlType::Q8_0, &x),
            Err(QuantizeError::NonFinite { index: 40, .. })
        ));
    }
}
