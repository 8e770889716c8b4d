//! Code tables: NF4, FP4 (bnb bit-pattern order), the decision thresholds used when
//! quantizing, and bnb's signed 8-bit dynamic map (FORMATS.md §1.1, §1.2, §1.6).
//!
//! Everything here is hard-coded by f32 bit pattern or generated with bnb's exact
//! float recipe, so the tables are bit-identical to what bitsandbytes stores in
//! checkpoints (`quant_map`, `nested_quant_map`); the fixture tests check this.

use std::sync::OnceLock;

use crate::QuantType;

/// NF4 values by 4-bit code (sorted ascending; code 7 is exactly 0.0).
const NF4_BITS: [u32; 16] = [
    0xbf800000, 0xbf3239b1, 0xbf066b30, 0xbeca32a0, 0xbe91a24d, 0xbe3d353f, 0xbdba7871, 0x00000000,
    0x3da2faff, 0x3e24cae3, 0x3e7c04dd, 0x3ead033a, 0x3ee1a4b8, 0x3f1007ab, 0x3f3913b3, 0x3f800000,
];

/// FP4 (bnb's E2M1 variant, normalised by 12) in bit-pattern order; bit 3 is the sign.
/// Code 8 is +0.0 as in bnb's `quant_map` (the CUDA LUT would give -0.0).
const FP4_BITS: [u32; 16] = [
    0x00000000, 0x3baaaaab, 0x3f2aaaab, 0x3f800000, 0x3eaaaaab, 0x3f000000, 0x3e2aaaab, 0x3e800000,
    0x00000000, 0xbbaaaaab, 0xbf2aaaab, 0xbf800000, 0xbeaaaaab, 0xbf000000, 0xbe2aaaab, 0xbe800000,
];

/// `argsort` of the FP4 table: `FP4_ORDER[idx]` is the FP4 code of the idx-th smallest
/// value. bnb's CPU backend quantizes against the sorted table and maps back with this.
/// (The two zeros: code 0 sorts before code 8, so `s == 0.0` maps to code 0 and tiny
/// positive values to code 8, exactly what bnb 0.50.2 CPU writes.)
pub(crate) const FP4_ORDER: [u8; 16] = [11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3];

/// The identity order (NF4 is already sorted).
pub(crate) const NF4_ORDER: [u8; 16] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15];

/// The 16 code values of `t`, indexed by the 4-bit code, exactly as bnb's `quant_map`.
pub fn code_table(t: QuantType) -> [f32; 16] {
    let bits = match t {
        QuantType::Nf4 => &NF4_BITS,
        QuantType::Fp4 => &FP4_BITS,
    };
    bits.map(f32::from_bits)
}

/// Code order used after bucketizing: `code = order(t)[idx]`.
pub(crate) fn order(t: QuantType) -> &'static [u8; 16] {
    match t {
        QuantType::Nf4 => &NF4_ORDER,
        QuantType::Fp4 => &FP4_ORDER,
    }
}

/// The code of the value 0.0 (used to pad the last low nibble when n is odd):
/// NF4 → 7, FP4 → 0.
pub fn zero_code(t: QuantType) -> u8 {
    let idx = thresholds(t).iter().filter(|&&m| m < 0.0).count();
    order(t)[idx]
}

/// The 15 decision thresholds: f32 midpoints `(v[k] + v[k+1]) / 2` of the **sorted**
/// code table. `idx = #{k : thresholds[k] < s}` (strict, so an exact tie goes to the
/// lower code — torch.bucketize(right=False)), then `code = order[idx]`.
pub fn thresholds(t: QuantType) -> [f32; 15] {
    let table = code_table(t);
    let ord = order(t);
    let sorted: [f32; 16] = std::array::from_fn(|i| table[ord[i] as usize]);
    std::array::from_fn(|k| (sorted[k] + sorted[k + 1]) / 2.0)
}

/// Positions 0..n of `torch.linspace(start, end, n)` in f32 exactly as torch's CPU
/// kernel computes them: the first half as `start + step*k`, the second half as
/// `end - step*(n-1-k)`, each a single fused multiply-add.
fn linspace_f32(start: f32, end: f32, n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|k| {
            if k < half {
                step.mul_add(k as f32, start)
            } else {
                (-step).mul_add((n - 1 - k) as f32, end)
            }
        })
        .collect()
}

/// bnb `create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)`, bit-exact:
/// index 0..126 negative, 127 = 0.0, 128..254 positive, 255 = +1.0.
pub fn dynamic_map() -> [f32; 256] {
    static MAP: OnceLock<[f32; 256]> = OnceLock::new();
    *MAP.get_or_init(build_dynamic_map)
}

fn build_dynamic_map() -> [f32; 256] {
    // 10^(i-6) for i = 0..6, rounded to f32 before the f32 multiplication.
    const SCALES: [f64; 7] = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0];
    let mut values: Vec<f32> = Vec::with_capacity(256);
    for (i, &scale) in SCALES.iter().enumerate() {
        let n = (1usize << i) + 1;
        let b = linspace_f32(0.1, 1.0, n);
        let scale = scale as f32;
        for k in 0..n - 1 {
            let mean = (b[k] + b[k + 1]) / 2.0;
            let v = mean * scale;
            values.push(v);
            values.push(-v);
        }
    }
    values.push(0.0);
    values.push(1.0);
    values.sort_by(f32::total_cmp);
    let mut out = [0f32; 256];
    out.copy_from_slice(&values);
    out
}

#[cfg(test)]
#[allow(clippy::excessive_precision)] // literals copied from the docs as printed
mod tests {
    use super::*;

    #[test]
    fn nf4_thresholds_match_formats_hex() {
        // FORMATS.md §1.2 table, k -> k+1.
        let expected: [u32; 15] = [
            0xbf591cd8, 0xbf1c5270, 0xbeeb8480, 0xbeadea76, 0xbe703cec, 0xbe0d38bc, 0xbd3a7871,
            0x3d22faff, 0x3df64862, 0x3e5067e0, 0x3e9582d4, 0x3ec753f9, 0x3f006d04, 0x3f248daf,
            0x3f5c89da,
        ];
        let got = thresholds(QuantType::Nf4).map(f32::to_bits);
        assert_eq!(got, expected);
    }

    #[test]
    fn fp4_thresholds_match_readme() {
        // fixtures README §2.4: 0.0026041667, 0.0859375, 0.20833334, 0.29166669,
        // 0.41666669, 0.58333337, 0.83333337 (positive half), and 0.0 in the middle.
        let t = thresholds(QuantType::Fp4);
        assert_eq!(t[7], 0.0);
        let pos = [
            0.0026041667f32,
            0.0859375,
            0.20833334,
            0.29166669,
            0.41666669,
            0.58333337,
            0.83333337,
        ];
        for (k, &p) in pos.iter().enumerate() {
            assert_eq!(t[8 + k], p, "k={k}");
            assert_eq!(t[6 - k], -p, "k={k}");
        }
    }

    #[test]
    fn zero_codes() {
        assert_eq!(zero_code(QuantType::Nf4), 7);
        assert_eq!(zero_code(QuantType::Fp4), 0);
    }

    #[test]
    fn dynamic_map_layout() {
        let m = dynamic_map();
        assert_eq!(m[127], 0.0);
        assert_eq!(m[255], 1.0);
        assert_eq!(m[128].to_bits(), 0x3513a3b7);
        assert_eq!(m[192].to_bits(), 0x3df80000);
        assert_eq!(m[254].to_bits(), 0x3f7e3333);
        for k in 0..127 {
            assert_eq!(m[k], -m[254 - k]);
        }
        assert!(m.windows(2).all(|w| w[0] < w[1]));
    }
}
