//! Fast paths (every available backend) vs the scalar reference on random inputs:
//! random shapes, block sizes, values (tiny, huge, zeros, exact thresholds/ties), all
//! three input dtypes, both quant types, with and without double quant; dequantization of
//! whole tensors and of random ranges, to f32, bf16 and f16.

use half::{bf16, f16};
use proptest::prelude::*;
use qlora_quant::{
    quantize_4bit_with, quantize_blockwise8, reference, thresholds, Backend, DType, Expand, Input,
    QuantOptions, QuantType,
};

/// One element: mostly ordinary values, plus the cases that break naive kernels.
fn element() -> impl Strategy<Value = f32> {
    prop_oneof![
        6 => -3.0f32..3.0,
        1 => Just(0.0f32),
        1 => Just(-0.0f32),
        1 => -1e-30f32..1e-30,
        1 => -1e30f32..1e30,
        1 => (0usize..15, any::<bool>()).prop_map(|(k, nf4)| {
            thresholds(if nf4 { QuantType::Nf4 } else { QuantType::Fp4 })[k]
        }),
        1 => (0usize..15, -2i32..=2).prop_map(|(k, d)| {
            let t = thresholds(QuantType::Nf4)[k];
            f32::from_bits((t.to_bits() as i32 + d) as u32)
        }),
        1 => Just(1.0f32),
        1 => Just(-1.0f32),
    ]
}

#[derive(Debug, Clone)]
struct Case {
    x: Vec<f32>,
    blocksize: usize,
    quant_type: QuantType,
    double_quant: bool,
    dtype: u8,
    /// Values are multiplied by this (per case) to move whole tensors to tiny/huge scales.
    scale: f32,
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop::sample::select(vec![32usize, 64, 128, 256, 512, 1024, 2048, 4096]),
        0usize..3000,
        any::<bool>(),
        any::<bool>(),
        0u8..3,
        prop::sample::select(vec![1.0f32, 1e-6, 1e6, 1e-35, 3e35]),
    )
        .prop_flat_map(|(bs, n, nf4, dq, dtype, scale)| {
            // Zero whole stretches sometimes, to hit all-zero (full and partial) blocks.
            (prop::collection::vec(element(), n), any::<bool>()).prop_map(move |(mut x, zero)| {
                if zero && n > 0 {
                    let start = n / 3;
                    x[start..]
                        .iter_mut()
                        .step_by(1)
                        .take(bs + 5)
                        .for_each(|v| *v = 0.0);
                }
                Case {
                    x,
                    blocksize: bs,
                    quant_type: if nf4 { QuantType::Nf4 } else { QuantType::Fp4 },
                    double_quant: dq,
                    dtype,
                    scale,
                }
            })
        })
}

fn run_case(c: &Case) -> Result<(), TestCaseError> {
    let xf = scaled(c);
    // Keep the half-precision inputs finite too (f16 tops out at 65504).
    let xb: Vec<bf16> = xf
        .iter()
        .map(|&v| bf16::from_f32(v.clamp(-3.3e38, 3.3e38)))
        .collect();
    let xh: Vec<f16> = xf
        .iter()
        .map(|&v| f16::from_f32(v.clamp(-65504.0, 65504.0)))
        .collect();
    let input = match c.dtype {
        0 => Input::F32(&xf),
        1 => Input::BF16(&xb),
        _ => Input::F16(&xh),
    };
    let n = xf.len();
    let shape = if n > 0 && n.is_multiple_of(3) {
        vec![3, n / 3]
    } else {
        vec![n]
    };
    let opts = QuantOptions {
        quant_type: c.quant_type,
        blocksize: c.blocksize,
        double_quant: c.double_quant,
        allow_nonfinite: false,
    };
    let r = reference::quantize_4bit(input, &shape, &opts).unwrap();
    let want_f32 = reference::dequantize_f32(&r);
    let want_bf16 = reference::dequantize_bf16(&r);
    let want_f16 = reference::dequantize_f16(&r);
    let want_rounded = reference::dequantize_f32_rounded(&r);
    // The rounded f32 is the recorded dtype's value, widened.
    let widened: Vec<f32> = match c.dtype {
        0 => want_f32.clone(),
        1 => want_bf16.iter().map(|v| v.to_f32()).collect(),
        _ => want_f16.iter().map(|v| v.to_f32()).collect(),
    };
    prop_assert!(same_bits(&want_rounded, &widened));
    for b in Backend::available() {
        let q = quantize_4bit_with(b, input, &shape, &opts).unwrap();
        prop_assert_eq!(&q, &r, "quantize, backend {}", b.name());
        let mut f = vec![0f32; n];
        q.dequantize_range_with(b, 0, &mut f);
        prop_assert!(same_bits(&f, &want_f32), "f32, backend {}", b.name());
        let mut h = vec![bf16::ZERO; n];
        q.dequantize_range_with(b, 0, &mut h);
        prop_assert!(
            h.iter()
                .zip(&want_bf16)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "bf16"
        );
        // Non-temporal stores (normally only for outputs > 16 MiB), aligned or not.
        for start in [0, 1, 2, 3, 4, 5, 8] {
            if start > n {
                continue;
            }
            let cx = Expand {
                backend: b,
                round: DType::F32,
                stream: true,
            };
            let mut f = vec![0f32; n - start];
            q.dequantize_range_expand(cx, start, &mut f);
            prop_assert!(
                same_bits(&f, &want_f32[start..]),
                "streamed f32 at {}",
                start
            );
            let mut h = vec![bf16::ZERO; n - start];
            q.dequantize_range_expand(cx, start, &mut h);
            prop_assert!(
                h.iter()
                    .zip(&want_bf16[start..])
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "streamed bf16"
            );
            let mut h = vec![f16::ZERO; n - start];
            q.dequantize_range_expand(cx, start, &mut h);
            prop_assert!(
                h.iter()
                    .zip(&want_f16[start..])
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "streamed f16"
            );
        }
        let mut f = vec![0f32; n];
        q.dequantize_range_f32_rounded_with(b, 0, &mut f);
        prop_assert!(
            same_bits(&f, &want_rounded),
            "rounded f32, backend {}",
            b.name()
        );
        if n > 3 {
            let mut part = vec![0f32; n - 3];
            q.dequantize_range_f32_rounded_with(b, 1, &mut part);
            prop_assert!(same_bits(&part, &want_rounded[1..n - 2]), "rounded range");
        }
        let mut h = vec![f16::ZERO; n];
        q.dequantize_range_with(b, 0, &mut h);
        prop_assert!(
            h.iter()
                .zip(&want_f16)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "f16"
        );
    }
    Ok(())
}

/// The case's values times its scale, saturated to finite f32.
fn scaled(c: &Case) -> Vec<f32> {
    c.x.iter()
        .map(|v| {
            let s = v * c.scale;
            if s.is_finite() {
                s
            } else {
                f32::MAX.copysign(s)
            }
        })
        .collect()
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn fast_matches_reference(c in case()) {
        run_case(&c)?;
    }

    #[test]
    fn range_dequant_matches_reference(
        c in case(),
        a in 0.0f64..1.0,
        b in 0.0f64..1.0,
    ) {
        let xf = scaled(&c);
        let n = xf.len();
        let opts = QuantOptions { quant_type: c.quant_type, blocksize: c.blocksize, double_quant: c.double_quant, allow_nonfinite: false };
        let q = reference::quantize_4bit(Input::F32(&xf), &[n], &opts).unwrap();
        let start = (a * n as f64) as usize;
        let len = ((b * (n - start) as f64) as usize).min(n - start);
        let want = reference::dequantize_range_f32(&q, start, len);
        for be in Backend::available() {
            let mut out = vec![f32::NAN; len];
            q.dequantize_range_with(be, start, &mut out);
            prop_assert!(same_bits(&out, &want), "range {}+{} backend {}", start, len, be.name());
            let mut out16 = vec![bf16::NAN; len];
            q.dequantize_range_with(be, start, &mut out16);
            prop_assert!(out16.iter().zip(&want).all(|(h, w)| h.to_bits() == bf16::from_f32(*w).to_bits()));
        }
    }

    #[test]
    fn row_tiles_match_reference(
        rows in 1usize..40,
        cols in 1usize..200,
        a in 0.0f64..1.0,
        b in 0.0f64..1.0,
        dtype in 0u8..3,
        dq in any::<bool>(),
        x in prop::collection::vec(element(), 8000),
    ) {
        let n = rows * cols;
        let opts = QuantOptions { quant_type: QuantType::Nf4, blocksize: 64, double_quant: dq, allow_nonfinite: false };
        let mut q = reference::quantize_4bit(Input::F32(&x[..n]), &[rows, cols], &opts).unwrap();
        // the recorded dtype only changes the rounding of the result
        q.dtype = [DType::F32, DType::BF16, DType::F16][dtype as usize];
        let want = reference::dequantize_f32_rounded(&q);
        let r0 = (a * rows as f64) as usize;
        let r1 = r0 + ((b * (rows - r0) as f64) as usize).min(rows - r0);
        let mut out = vec![f32::NAN; (r1 - r0) * cols];
        q.dequantize_rows_f32(r0, r1, &mut out);
        prop_assert!(same_bits(&out, &want[r0 * cols..r1 * cols]), "rows {}..{} of [{}, {}]", r0, r1, rows, cols);
    }

    #[test]
    fn double_quant_fast_matches_reference(
        absmax in prop::collection::vec(prop_oneof![0.0f32..10.0, Just(0.0f32), 1e-30f32..1e-20, 1e3f32..1e5], 0..3000),
        shift in -1.0f32..1.0,
    ) {
        prop_assert_eq!(qlora_quant::double_quant(&absmax), reference::double_quant(&absmax));
        let offset = reference::mean_offset(&absmax) + shift;
        prop_assert_eq!(
            qlora_quant::double_quant_with_offset(&absmax, offset),
            reference::double_quant_with_offset(&absmax, offset)
        );
    }

    #[test]
    fn blockwise8_lut_matches_reference(
        x in prop::collection::vec(element(), 0..2000),
        bs in prop::sample::select(vec![64usize, 256, 4096]),
    ) {
        let code = qlora_quant::dynamic_map();
        prop_assert_eq!(quantize_blockwise8(&x, &code, bs), reference::quantize_blockwise8(&x, &code, bs));
    }
}

#[test]
fn large_tensor_crosses_parallel_chunks() {
    // > 2 * 65,536 elements with an odd start: exercises the rayon split of ranges.
    let n = 3 * 65_536 + 77;
    let x: Vec<f32> = (0..n)
        .map(|i| ((i * 2_654_435_761usize) % 10_007) as f32 / 5_000.0 - 1.0)
        .collect();
    for qt in [QuantType::Nf4, QuantType::Fp4] {
        let opts = QuantOptions {
            quant_type: qt,
            blocksize: 128,
            ..Default::default()
        };
        let r = reference::quantize_4bit(Input::F32(&x), &[n], &opts).unwrap();
        let want = reference::dequantize_f32(&r);
        for b in Backend::available() {
            assert_eq!(
                quantize_4bit_with(b, Input::F32(&x), &[n], &opts).unwrap(),
                r
            );
            let start = 65_535;
            let mut out = vec![0f32; n - start - 3];
            r.dequantize_range_with(b, start, &mut out);
            assert!(same_bits(&out, &want[start..n - 3]));
        }
    }
}

#[test]
fn large_blockwise8_crosses_parallel_tasks() {
    // 200,000 values in blocks of 64: several rayon tasks of 1024 blocks, plus a partial one.
    let n = 200_000;
    let x: Vec<f32> = (0..n)
        .map(|i| ((i * 48_271usize) % 65_521) as f32 / 30_000.0 - 1.1)
        .collect();
    let code = qlora_quant::dynamic_map();
    for bs in [64, 256] {
        assert_eq!(
            quantize_blockwise8(&x, &code, bs),
            reference::quantize_blockwise8(&x, &code, bs)
        );
    }
}

/// `block_absmax` is the absmax `quantize_4bit` stores, and double quantization
/// of any 256-block-aligned range with the whole tensor's `dq_offset` is that
/// range of the whole double quantization (what a sharded load relies on).
#[test]
fn block_absmax_and_ranged_double_quant_match_the_whole() {
    use qlora_quant::{
        block_absmax, double_quant_with_offset, dq_offset, quantize_4bit, Absmax, Input,
        QuantOptions,
    };
    let mut s = 0x9E37_79B9u32;
    for &n in &[1usize, 63, 64, 65, 64 * 256, 64 * 256 * 3 + 17, 100_001] {
        let x: Vec<f32> = (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32 - 0.5) * 4.0
            })
            .collect();
        let whole = quantize_4bit(Input::F32(&x), &[n], &QuantOptions::default()).unwrap();
        let plain = quantize_4bit(
            Input::F32(&x),
            &[n],
            &QuantOptions {
                double_quant: false,
                ..Default::default()
            },
        )
        .unwrap();
        let am = block_absmax(&Input::F32(&x), 64).unwrap();
        assert_eq!(Absmax::Plain(am.clone()), plain.absmax, "n={n}");
        let Absmax::Double(d) = &whole.absmax else {
            panic!("double quant")
        };
        let off = dq_offset(&am);
        assert_eq!(off.to_bits(), d.offset.to_bits(), "n={n}");
        for start in (0..am.len()).step_by(256) {
            let end = (start + 512).min(am.len());
            let part = double_quant_with_offset(&am[start..end], off);
            assert_eq!(
                part.codes,
                d.codes[start..end],
                "n={n} blocks {start}..{end}"
            );
            assert_eq!(
                part.nested_absmax,
                d.nested_absmax[start / 256..end.div_ceil(256)],
                "n={n}"
            );
        }
    }
}
