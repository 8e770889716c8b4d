//! The test vectors of FORMATS.md §1.3 and §1.5 and edge cases (block sizes, odd n,
//! empty tensors, partial all-zero blocks, non-finite inputs, validation).
#![allow(clippy::excessive_precision)] // literals copied from FORMATS.md as printed

use half::{bf16, f16};
use qlora_quant::{
    quantize_4bit, quantize_4bit_with, reference, Absmax, Backend, DType, Input, QuantError,
    QuantOptions, QuantType, Quantized4,
};

fn opts(quant_type: QuantType, blocksize: usize, double_quant: bool) -> QuantOptions {
    QuantOptions {
        quant_type,
        blocksize,
        double_quant,
        allow_nonfinite: false,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Every quantizer (reference + all fast backends) must give the same result; returns it.
fn quantize_all(input: Input<'_>, shape: &[usize], o: &QuantOptions) -> Quantized4 {
    let r = reference::quantize_4bit(input, shape, o).unwrap();
    for b in Backend::available() {
        assert_eq!(
            quantize_4bit_with(b, input, shape, o).unwrap(),
            r,
            "backend {}",
            b.name()
        );
    }
    r
}

fn formats_13_input() -> Vec<f32> {
    // 0.03979014977812767 is the NF4 7/8 midpoint (f32 0x3d22faff).
    let mut x = vec![
        1.0f32,
        0.0,
        -1.0,
        0.5,
        0.25,
        -0.125,
        f32::from_bits(0x3d22faff),
        -2.0,
    ];
    assert_eq!(x[6], 0.039_790_15);
    x.extend(std::iter::repeat_n(0.0, 64));
    x.extend([3.0, -1.5, 0.75]);
    x
}

#[test]
fn formats_1_3_nf4_vector() {
    let x = formats_13_input();
    assert_eq!(x.len(), 75);
    let q = quantize_all(Input::F32(&x), &[75], &opts(QuantType::Nf4, 64, false));
    assert_eq!(q.absmax, Absmax::Plain(vec![2.0, 3.0]));
    assert_eq!(q.packed.len(), 38);
    assert_eq!(hex(&q.packed[..4]), "c7 2a 96 70");
    assert!(q.packed[4..36].iter().all(|&b| b == 0x77));
    assert_eq!(hex(&q.packed[36..]), "f2 a7");
    let d = q.dequantize_f32();
    assert_eq!(&d[..4], &[0.881_419_66f32, 0.0, -1.050_146_1, 0.492_224_6]);
}

#[test]
fn formats_1_3_fp4_vector() {
    let x = formats_13_input();
    let q = quantize_all(Input::F32(&x), &[75], &opts(QuantType::Fp4, 64, false));
    assert_eq!(hex(&q.packed[..4]), "50 d7 69 1b");
    // Odd n: FP4 pads the low nibble with code 0 (the code of 0.0).
    assert_eq!(q.packed[37] & 0x0f, 0);
}

#[test]
fn formats_1_5_double_quant_vector() {
    let x: Vec<f32> = (0..19200usize)
        .map(|i| (((i * 37) % 101) as f32 - 50.0) / 50.0 * (1 + (i / 64) % 5) as f32)
        .collect();
    let q = quantize_all(Input::F32(&x), &[19200], &opts(QuantType::Nf4, 64, true));
    let Absmax::Double(d) = &q.absmax else {
        panic!("expected double quant")
    };
    assert_eq!(d.offset, 2.996_799_945_831_299f32);
    assert_eq!(
        d.nested_absmax,
        vec![2.016_799_926_757_812_5f32, 2.003_200_054_168_701]
    );
    assert_eq!(
        &d.codes[..12],
        &[0, 35, 144, 219, 254, 0, 35, 144, 219, 254, 0, 35]
    );
    assert_eq!(&d.codes[256..260], &[35, 144, 219, 255]);
    assert_eq!(hex(&q.packed[..8]), "04 c1 6e 29 f3 b0 5d 17");
    let a = q.absmax_f32();
    assert_eq!(
        &a[..4],
        &[0.994_180_68f32, 1.986_824_4, 3.000_518_3, 4.006_775_4]
    );
}

#[test]
fn every_blocksize_and_odd_lengths_agree_with_reference() {
    let mut seed = 12345u64;
    let mut next = move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((seed >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
    };
    for bs in [32, 64, 128, 256, 512, 1024, 2048, 4096] {
        for n in [1usize, 2, 3, 31, 33, bs - 1, bs, bs + 1, 2 * bs + 7, 3 * bs] {
            let x: Vec<f32> = (0..n).map(|_| next() * 3.0).collect();
            for qt in [QuantType::Nf4, QuantType::Fp4] {
                for dq in [false, true] {
                    let q = quantize_all(Input::F32(&x), &[n], &opts(qt, bs, dq));
                    assert_eq!(q.packed.len(), n.div_ceil(2));
                    assert_eq!(q.absmax.len(), n.div_ceil(bs));
                    q.validate().unwrap();
                    let r = reference::dequantize_f32(&q);
                    for b in Backend::available() {
                        let mut out = vec![0f32; n];
                        q.dequantize_range_with(b, 0, &mut out);
                        assert_eq!(out, r, "bs {bs} n {n} {qt} dq {dq} {}", b.name());
                    }
                }
            }
        }
    }
}

#[test]
fn single_element() {
    let q = quantize_all(Input::F32(&[-0.3]), &[1], &opts(QuantType::Nf4, 64, false));
    // Partial block: absmax 0.3 stored, -0.3/0.3 = -1 -> code 0; pad low nibble with 7.
    assert_eq!(q.packed, vec![0x07]);
    assert_eq!(q.absmax, Absmax::Plain(vec![0.3]));
    assert_eq!(q.dequantize_f32(), vec![-0.3]);
    let q = quantize_all(Input::F32(&[0.3]), &[1, 1], &opts(QuantType::Fp4, 32, true));
    assert_eq!(q.packed, vec![0x30]);
}

#[test]
fn all_zero_blocks() {
    // Full all-zero block stores 0.0 (and codes 7); a partial all-zero last block stores 1e-38f.
    let x = vec![0f32; 64 + 10];
    let q = quantize_all(Input::F32(&x), &[74], &opts(QuantType::Nf4, 64, false));
    let Absmax::Plain(a) = &q.absmax else {
        panic!()
    };
    assert_eq!(a[0].to_bits(), 0f32.to_bits());
    assert_eq!(a[1].to_bits(), 1e-38f32.to_bits());
    assert_eq!(a[1], 9.999_999_35e-39);
    assert!(q.packed.iter().all(|&b| b == 0x77));
    assert!(q.dequantize_f32().iter().all(|&v| v == 0.0));
    let q = quantize_all(Input::F32(&x), &[74], &opts(QuantType::Fp4, 64, false));
    assert!(q.packed.iter().all(|&b| b == 0x00));
}

#[test]
fn empty_tensor() {
    for dq in [false, true] {
        let q = quantize_all(Input::F32(&[]), &[0, 4096], &opts(QuantType::Nf4, 64, dq));
        assert!(q.packed.is_empty());
        assert_eq!(q.absmax.len(), 0);
        assert_eq!(q.numel(), 0);
        q.validate().unwrap();
        assert!(q.dequantize_f32().is_empty());
        assert!(q.dequantize_bf16().is_empty());
        if let Absmax::Double(d) = &q.absmax {
            assert_eq!(d.offset, 0.0);
            assert!(d.nested_absmax.is_empty());
        }
    }
}

#[test]
fn half_inputs_are_upcast() {
    let xf: Vec<f32> = (0..300)
        .map(|i| ((i * 7919) % 200) as f32 / 37.0 - 2.5)
        .collect();
    let xb: Vec<bf16> = xf.iter().map(|&v| bf16::from_f32(v)).collect();
    let xh: Vec<f16> = xf.iter().map(|&v| f16::from_f32(v)).collect();
    let o = opts(QuantType::Nf4, 64, true);
    let qb = quantize_all(Input::BF16(&xb), &[3, 100], &o);
    let qh = quantize_all(Input::F16(&xh), &[3, 100], &o);
    assert_eq!(qb.dtype, DType::BF16);
    assert_eq!(qh.dtype, DType::F16);
    let up_b: Vec<f32> = xb.iter().map(|v| v.to_f32()).collect();
    let up_h: Vec<f32> = xh.iter().map(|v| v.to_f32()).collect();
    assert_eq!(
        quantize_4bit(Input::F32(&up_b), &[3, 100], &o)
            .unwrap()
            .packed,
        qb.packed
    );
    assert_eq!(
        quantize_4bit(Input::F32(&up_h), &[3, 100], &o)
            .unwrap()
            .packed,
        qh.packed
    );
    // Dequantize rounds the f32 product to the recorded dtype.
    let f = qb.dequantize_f32();
    assert_eq!(
        qb.dequantize_bf16(),
        f.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>()
    );
    assert_eq!(
        qh.dequantize_f16(),
        qh.dequantize_f32()
            .iter()
            .map(|&v| f16::from_f32(v))
            .collect::<Vec<_>>()
    );
}

#[test]
fn bad_arguments_are_errors() {
    let x = vec![1f32; 100];
    for bs in [0, 16, 48, 8192] {
        assert_eq!(
            quantize_4bit(Input::F32(&x), &[100], &opts(QuantType::Nf4, bs, false)),
            Err(QuantError::InvalidBlocksize(bs))
        );
    }
    let e = quantize_4bit(Input::F32(&x), &[10, 11], &QuantOptions::default()).unwrap_err();
    assert!(
        matches!(
            e,
            QuantError::ShapeMismatch {
                numel: 110,
                len: 100,
                ..
            }
        ),
        "{e}"
    );
    let e = quantize_4bit(Input::F32(&x), &[usize::MAX, 2], &QuantOptions::default()).unwrap_err();
    assert!(matches!(e, QuantError::ShapeMismatch { .. }), "{e}");
}

#[test]
fn nonfinite_rejected_with_first_index() {
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut x = vec![0.5f32; 1000];
        x[777] = bad;
        x[900] = f32::NAN;
        for b in Backend::available() {
            let e = quantize_4bit_with(b, Input::F32(&x), &[1000], &QuantOptions::default())
                .unwrap_err();
            match e {
                QuantError::NonFinite { index, value } => {
                    assert_eq!(index, 777);
                    assert_eq!(value.to_bits(), bad.to_bits());
                }
                other => panic!("{other}"),
            }
            assert!(e.to_string().contains("777"));
        }
        let e = reference::quantize_4bit(Input::F32(&x), &[1000], &QuantOptions::default())
            .unwrap_err();
        assert!(matches!(e, QuantError::NonFinite { index: 777, .. }));
        let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
        let e = quantize_4bit(Input::BF16(&xb), &[1000], &QuantOptions::default()).unwrap_err();
        assert!(matches!(e, QuantError::NonFinite { index: 777, .. }));
    }
}

#[test]
fn nonfinite_allowed_semantics() {
    // Block 0 (64 elements): finite max 2.0, plus NaN, +inf, -inf.
    let mut x: Vec<f32> = (0..128).map(|i| (i % 9) as f32 / 4.0 - 1.0).collect();
    x[3] = f32::NAN;
    x[4] = f32::INFINITY;
    x[5] = f32::NEG_INFINITY;
    // Block 1 (partial, 30 elements) only non-finite values.
    x.truncate(94);
    for v in &mut x[64..] {
        *v = f32::INFINITY;
    }
    x[70] = f32::NAN;
    let o = QuantOptions {
        double_quant: false,
        allow_nonfinite: true,
        ..Default::default()
    };
    let q = quantize_all(Input::F32(&x), &[94], &o);
    let Absmax::Plain(a) = &q.absmax else {
        panic!()
    };
    assert_eq!(a[0], 1.0); // max |finite| of block 0 = |(8/4) - 1|
    assert_eq!(a[1], 1e-38); // partial block without finite values: clamped absmax
    let d = q.dequantize_f32();
    assert_eq!(d[3], 0.0); // NaN -> code of 0.0
    assert_eq!(d[4], 1.0); // +inf -> +absmax
    assert_eq!(d[5], -1.0); // -inf -> -absmax
    assert_eq!(d[64], 1e-38);
    assert_eq!(d[70], 0.0);
    // Finite elements are quantized as if the others were absent.
    let finite_ref: Vec<f32> = x[..64]
        .iter()
        .map(|v| if v.is_finite() { *v } else { 0.0 })
        .collect();
    let qf = quantize_all(Input::F32(&finite_ref), &[64], &o);
    for i in (0..64).filter(|i| ![3, 4, 5].contains(i)) {
        assert_eq!(d[i], qf.dequantize_f32()[i], "element {i}");
    }
}

#[test]
fn validate_reports_inconsistencies() {
    let x = vec![0.25f32; 300];
    let good = quantize_4bit(Input::F32(&x), &[3, 100], &QuantOptions::default()).unwrap();
    good.validate().unwrap();
    let mut q = good.clone();
    q.packed.pop();
    assert!(matches!(q.validate(), Err(QuantError::Inconsistent(m)) if m.contains("149 bytes")));
    let mut q = good.clone();
    q.shape = vec![3, 101];
    assert!(q.validate().is_err());
    let mut q = good.clone();
    q.blocksize = 100;
    assert_eq!(q.validate(), Err(QuantError::InvalidBlocksize(100)));
    let mut q = good.clone();
    if let Absmax::Double(d) = &mut q.absmax {
        d.nested_map.pop();
    }
    assert!(q.validate().is_err());
    let mut q = good.clone();
    if let Absmax::Double(d) = &mut q.absmax {
        d.nested_absmax.push(1.0);
    }
    assert!(q.validate().is_err());
    let mut q = good;
    q.absmax = Absmax::Plain(vec![1.0; 4]);
    assert!(matches!(q.validate(), Err(QuantError::Inconsistent(m)) if m.contains("absmax has 4")));
}

/// Dequantization of a checkpoint's stored statistics, whatever they hold: blocks whose
/// absmax is infinite, NaN (with payloads that a naive bf16 rounding carries into the
/// exponent or the sign), zero, subnormal or huge give bit for bit the reference's bf16,
/// f16 and f32 on every backend, from every start, whole blocks and partial ones.
#[test]
fn any_stored_absmax_dequantizes_like_the_reference() {
    let specials = [
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        f32::from_bits(0x7fff_ffff),
        f32::from_bits(0xff80_0001),
        f32::from_bits(0x7fc0_0001),
        0.0,
        -0.0,
        1e-45,
        1.1e-38,
        3.3e38,
        f32::MAX,
        0.75,
        -2.5,
    ];
    for bs in [32usize, 64, 128] {
        let n = specials.len() * bs;
        let packed: Vec<u8> = (0..n / 2).map(|j| (j * 37 + 11) as u8).collect();
        for qt in [QuantType::Nf4, QuantType::Fp4] {
            let q = Quantized4 {
                quant_type: qt,
                blocksize: bs,
                shape: vec![n],
                dtype: DType::F32,
                packed: packed.clone(),
                absmax: Absmax::Plain(specials.to_vec()),
            };
            let want = reference::dequantize_f32(&q);
            for b in Backend::available() {
                for start in [0, 1, bs - 1, bs, 3 * bs + 5] {
                    let len = n - start;
                    let mut h = vec![bf16::ZERO; len];
                    q.dequantize_range_with(b, start, &mut h);
                    let mut f = vec![f16::ZERO; len];
                    q.dequantize_range_with(b, start, &mut f);
                    let mut s = vec![0f32; len];
                    q.dequantize_range_with(b, start, &mut s);
                    for (k, w) in want[start..].iter().enumerate() {
                        let at = format!("{} bs {bs} {qt:?} start {start} element {k}", b.name());
                        assert_eq!(h[k].to_bits(), bf16::from_f32(*w).to_bits(), "bf16 {at}");
                        assert_eq!(f[k].to_bits(), f16::from_f32(*w).to_bits(), "f16 {at}");
                        assert_eq!(s[k].to_bits(), w.to_bits(), "f32 {at}");
                    }
                }
            }
        }
    }
}
