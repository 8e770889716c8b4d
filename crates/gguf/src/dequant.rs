//! ggml block formats decoded to f32, following ggml's reference `dequantize_row_*`.
//!
//! Each function takes whole blocks of raw little-endian bytes (the `block_*`
//! structs laid end to end) and writes `block_size` floats per block. The
//! arithmetic order follows ggml's scalar code so the results are bit-identical
//! to llama.cpp's and candle's reference paths (tested against candle).

use half::{bf16, f16};

use crate::GgmlType;

#[derive(Debug, thiserror::Error)]
pub enum DequantError {
    #[error("cannot dequantize ggml type {0}")]
    Unsupported(GgmlType),
    #[error("{ty}: {n_elements} elements need {expected} bytes, got {got}")]
    Size {
        ty: GgmlType,
        n_elements: usize,
        expected: u64,
        got: usize,
    },
}

/// Decode `n_elements` values of type `ty` from `data` (exactly the tensor's bytes).
pub fn dequantize(ty: GgmlType, data: &[u8], n_elements: usize) -> Result<Vec<f32>, DequantError> {
    let mut out = vec![0f32; n_elements];
    dequantize_into(ty, data, &mut out)?;
    Ok(out)
}

/// Like [`dequantize`] into a caller-provided buffer (its length is the element count).
pub fn dequantize_into(ty: GgmlType, data: &[u8], out: &mut [f32]) -> Result<(), DequantError> {
    let n = out.len();
    let expected = ty.bytes_for(n as u64);
    if expected != Some(data.len() as u64) {
        return Err(DequantError::Size {
            ty,
            n_elements: n,
            expected: expected.unwrap_or(u64::MAX),
            got: data.len(),
        });
    }
    let f: fn(&[u8], &mut [f32]) = match ty {
        GgmlType::F32 => f32_block,
        GgmlType::F16 => f16_block,
        GgmlType::BF16 => bf16_block,
        GgmlType::Q4_0 => q4_0,
        GgmlType::Q4_1 => q4_1,
        GgmlType::Q5_0 => q5_0,
        GgmlType::Q5_1 => q5_1,
        GgmlType::Q8_0 => q8_0,
        GgmlType::Q8_1 => q8_1,
        GgmlType::Q2_K => q2_k,
        GgmlType::Q3_K => q3_k,
        GgmlType::Q4_K => q4_k,
        GgmlType::Q5_K => q5_k,
        GgmlType::Q6_K => q6_k,
        GgmlType::Q8_K => q8_k,
        other => return Err(DequantError::Unsupported(other)),
    };
    let bs = ty.block_size();
    let ts = ty.type_size();
    if bs == 1 {
        // Plain types: decode element by element (a "block" of one).
        for (x, y) in data.chunks_exact(ts).zip(out.iter_mut()) {
            f(x, std::slice::from_mut(y));
        }
    } else {
        for (x, y) in data.chunks_exact(ts).zip(out.chunks_exact_mut(bs)) {
            f(x, y);
        }
    }
    Ok(())
}

#[inline]
fn h(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

fn f32_block(x: &[u8], y: &mut [f32]) {
    y[0] = f32::from_le_bytes([x[0], x[1], x[2], x[3]]);
}
fn f16_block(x: &[u8], y: &mut [f32]) {
    y[0] = h(x, 0);
}
fn bf16_block(x: &[u8], y: &mut [f32]) {
    y[0] = bf16::from_le_bytes([x[0], x[1]]).to_f32();
}

/// `block_q4_0 { f16 d; u8 qs[16] }`: y = (q - 8)·d, low nibbles first half, high second.
fn q4_0(x: &[u8], y: &mut [f32]) {
    let d = h(x, 0);
    let qs = &x[2..18];
    for j in 0..16 {
        y[j] = ((qs[j] & 0x0f) as i32 - 8) as f32 * d;
        y[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
    }
}

/// `block_q4_1 { f16 d, m; u8 qs[16] }`: y = q·d + m.
fn q4_1(x: &[u8], y: &mut [f32]) {
    let d = h(x, 0);
    let m = h(x, 2);
    let qs = &x[4..20];
    for j in 0..16 {
        y[j] = (qs[j] & 0x0f) as f32 * d + m;
        y[j + 16] = (qs[j] >> 4) as f32 * d + m;
    }
}

/// `block_q5_0 { f16 d; u8 qh[4]; u8 qs[16] }`: 5th bit of element j is bit j of qh.
fn q5_0(x: &[u8], y: &mut [f32]) {
    let d = h(x, 0);
    let qh = u32::from_le_bytes([x[2], x[3], x[4], x[5]]);
    let qs = &x[6..22];
    for j in 0..16 {
        let xh0 = ((qh >> j) << 4) & 0x10;
        let xh1 = (qh >> (j + 12)) & 0x10;
        let x0 = ((qs[j] as u32 & 0x0f) | xh0) as i32 - 16;
        let x1 = ((qs[j] as u32 >> 4) | xh1) as i32 - 16;
        y[j] = x0 as f32 * d;
        y[j + 16] = x1 as f32 * d;
    }
}

/// `block_q5_1 { f16 d, m; u8 qh[4]; u8 qs[16] }`.
fn q5_1(x: &[u8], y: &mut [f32]) {
    let d = h(x, 0);
    let m = h(x, 2);
    let qh = u32::from_le_bytes([x[4], x[5], x[6], x[7]]);
    let qs = &x[8..24];
    for j in 0..16 {
        let xh0 = ((qh >> j) << 4) & 0x10;
        let xh1 = (qh >> (j + 12)) & 0x10;
        let x0 = (qs[j] as u32 & 0x0f) | xh0;
        let x1 = (qs[j] as u32 >> 4) | xh1;
        y[j] = x0 as f32 * d + m;
        y[j + 16] = x1 as f32 * d + m;
    }
}

/// `block_q8_0 { f16 d; i8 qs[32] }`.
fn q8_0(x: &[u8], y: &mut [f32]) {
    let d = h(x, 0);
    for j in 0..32 {
        y[j] = x[2 + j] as i8 as f32 * d;
    }
}

/// `block_q8_1 { f16 d, s; i8 qs[32] }` (s = d·Σq is only used by dot products).
fn q8_1(x: &[u8], y: &mut [f32]) {
    let d = h(x, 0);
    for j in 0..32 {
        y[j] = x[4 + j] as i8 as f32 * d;
    }
}

/// `block_q2_K { u8 scales[16]; u8 qs[64]; f16 d, dmin }`: 16 sub-blocks of 16, 4-bit
/// scale and min per sub-block.
fn q2_k(x: &[u8], y: &mut [f32]) {
    let scales = &x[0..16];
    let d = h(x, 80);
    let min = h(x, 82);
    let mut out = 0;
    let mut is = 0;
    for n in 0..2 {
        let q = &x[16 + 32 * n..16 + 32 * n + 32];
        let mut shift = 0;
        for _ in 0..4 {
            for half in 0..2 {
                let sc = scales[is];
                is += 1;
                let dl = d * (sc & 0x0f) as f32;
                let ml = min * (sc >> 4) as f32;
                for l in 0..16 {
                    y[out] = dl * ((q[l + 16 * half] >> shift) & 3) as i8 as f32 - ml;
                    out += 1;
                }
            }
            shift += 2;
        }
    }
}

/// `block_q3_K { u8 hmask[32]; u8 qs[64]; u8 scales[12]; f16 d }`: 6-bit signed scales
/// packed in 12 bytes, 2 low bits in qs, the high bit (inverted) in hmask.
fn q3_k(x: &[u8], y: &mut [f32]) {
    const KMASK1: u32 = 0x0303_0303;
    const KMASK2: u32 = 0x0f0f_0f0f;
    let hm = &x[0..32];
    let d_all = h(x, 108);
    let s = &x[96..108];
    let mut aux = [0u32; 4];
    for (i, a) in aux.iter_mut().take(3).enumerate() {
        *a = u32::from_le_bytes([s[4 * i], s[4 * i + 1], s[4 * i + 2], s[4 * i + 3]]);
    }
    let tmp = aux[2];
    aux[2] = ((aux[0] >> 4) & KMASK2) | (((tmp >> 4) & KMASK1) << 4);
    aux[3] = ((aux[1] >> 4) & KMASK2) | (((tmp >> 6) & KMASK1) << 4);
    aux[0] = (aux[0] & KMASK2) | ((tmp & KMASK1) << 4);
    aux[1] = (aux[1] & KMASK2) | (((tmp >> 2) & KMASK1) << 4);
    let mut scales = [0i8; 16];
    for (i, a) in aux.iter().enumerate() {
        for (k, b) in a.to_le_bytes().iter().enumerate() {
            scales[4 * i + k] = *b as i8;
        }
    }
    let mut out = 0;
    let mut is = 0;
    let mut m: u8 = 1;
    for n in 0..2 {
        let q = &x[32 + 32 * n..32 + 32 * n + 32];
        let mut shift = 0;
        for _ in 0..4 {
            for half in 0..2 {
                let dl = d_all * (scales[is] as i32 - 32) as f32;
                is += 1;
                for l in 0..16 {
                    let idx = l + 16 * half;
                    let low = ((q[idx] >> shift) & 3) as i8;
                    let hi = if hm[idx] & m != 0 { 0 } else { 4 };
                    y[out] = dl * (low - hi) as f32;
                    out += 1;
                }
            }
            shift += 2;
            m <<= 1;
        }
    }
}

/// 6-bit scale and min number `j` of the 12-byte K-quant scale array (Q4_K, Q5_K).
#[inline]
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// `block_q4_K { f16 d, dmin; u8 scales[12]; u8 qs[128] }`: 8 sub-blocks of 32.
fn q4_k(x: &[u8], y: &mut [f32]) {
    let d = h(x, 0);
    let min = h(x, 2);
    let scales = &x[4..16];
    let mut out = 0;
    for (k, q) in x[16..144].chunks_exact(32).enumerate() {
        let (sc, m) = scale_min_k4(2 * k, scales);
        let (d1, m1) = (d * sc as f32, min * m as f32);
        let (sc, m) = scale_min_k4(2 * k + 1, scales);
        let (d2, m2) = (d * sc as f32, min * m as f32);
        for &b in q {
            y[out] = d1 * (b & 0x0f) as f32 - m1;
            out += 1;
        }
        for &b in q {
            y[out] = d2 * (b >> 4) as f32 - m2;
            out += 1;
        }
    }
}

/// `block_q5_K { f16 d, dmin; u8 scales[12]; u8 qh[32]; u8 qs[128] }`.
fn q5_k(x: &[u8], y: &mut [f32]) {
    let d = h(x, 0);
    let min = h(x, 2);
    let scales = &x[4..16];
    let qh = &x[16..48];
    let mut out = 0;
    let (mut u1, mut u2) = (1u8, 2u8);
    for (k, ql) in x[48..176].chunks_exact(32).enumerate() {
        let (sc, m) = scale_min_k4(2 * k, scales);
        let (d1, m1) = (d * sc as f32, min * m as f32);
        let (sc, m) = scale_min_k4(2 * k + 1, scales);
        let (d2, m2) = (d * sc as f32, min * m as f32);
        for l in 0..32 {
            let hi = if qh[l] & u1 != 0 { 16 } else { 0 };
            y[out] = d1 * ((ql[l] & 0x0f) + hi) as f32 - m1;
            out += 1;
        }
        for l in 0..32 {
            let hi = if qh[l] & u2 != 0 { 16 } else { 0 };
            y[out] = d2 * ((ql[l] >> 4) + hi) as f32 - m2;
            out += 1;
        }
        u1 <<= 2;
        u2 <<= 2;
    }
}

/// `block_q6_K { u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d }`: 16 sub-blocks of 16.
fn q6_k(x: &[u8], y: &mut [f32]) {
    let d = h(x, 208);
    for n in 0..2 {
        let ql = &x[64 * n..64 * n + 64];
        let qh = &x[128 + 32 * n..128 + 32 * n + 32];
        let sc = &x[192 + 8 * n..192 + 8 * n + 8];
        let y = &mut y[128 * n..128 * n + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) as i8 - 32;
            let q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
            y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
}

/// `block_q8_K { f32 d; i8 qs[256]; i16 bsums[16] }`.
fn q8_k(x: &[u8], y: &mut [f32]) {
    let d = f32::from_le_bytes([x[0], x[1], x[2], x[3]]);
    for j in 0..256 {
        y[j] = d * x[4 + j] as i8 as f32;
    }
}
