//! Bit-exact comparison with the bitsandbytes 0.50.2 golden fixtures
//! (`shared/fixtures/quant`, README §2).

mod common;

use common::*;
use half::bf16;
use qlora_quant::{
    code_table, dequantize_blockwise8, dynamic_map, quantize_4bit_with, quantize_blockwise8,
    reference, Absmax, Backend, DType, DoubleQuant, Input, QuantOptions, QuantType, Quantized4,
};
use safetensors::SafeTensors;

struct Case {
    file: String,
    quant_type: QuantType,
    blocksize: usize,
    dq: bool,
    shape: Vec<usize>,
    bf16_input: bool,
}

fn cases() -> Vec<Case> {
    let idx = index();
    let cases = idx["cases"].as_array().expect("cases");
    assert_eq!(cases.len(), 24, "fixture index lists 24 4-bit cases");
    cases
        .iter()
        .map(|c| Case {
            file: c["file"].as_str().unwrap().to_string(),
            quant_type: c["quant_type"].as_str().unwrap().parse().unwrap(),
            blocksize: c["blocksize"].as_u64().unwrap() as usize,
            dq: c["compress_statistics"].as_bool().unwrap(),
            shape: c["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect(),
            bf16_input: match c["input_dtype"].as_str().unwrap() {
                "float32" => false,
                "bfloat16" => true,
                other => panic!("unexpected input dtype {other}"),
            },
        })
        .collect()
}

type Quantizer = Box<dyn Fn(Input<'_>, &[usize], &QuantOptions) -> Quantized4>;

/// The quantizers under test: the reference and every backend of the fast path.
fn quantizers() -> Vec<(String, Quantizer)> {
    let mut v: Vec<(String, Quantizer)> = vec![(
        "reference".into(),
        Box::new(|i, s, o| reference::quantize_4bit(i, s, o).unwrap()),
    )];
    for b in Backend::available() {
        v.push((
            b.name().into(),
            Box::new(move |i, s, o| quantize_4bit_with(b, i, s, o).unwrap()),
        ));
    }
    v
}

/// Rebuilds the quantized tensor from the STORED fixture tensors (what a reader does).
fn stored(st: &SafeTensors<'_>, c: &Case) -> Quantized4 {
    let absmax = if c.dq {
        let offset = f32s(st, "offset");
        assert_eq!(offset.len(), 1);
        Absmax::Double(DoubleQuant {
            codes: u8s(st, "absmax"),
            nested_absmax: f32s(st, "nested_absmax"),
            nested_map: f32s(st, "nested_quant_map"),
            offset: offset[0],
            nested_blocksize: 256,
        })
    } else {
        Absmax::Plain(f32s(st, "absmax"))
    };
    let q = Quantized4 {
        quant_type: c.quant_type,
        blocksize: c.blocksize,
        shape: c.shape.clone(),
        dtype: if c.bf16_input {
            DType::BF16
        } else {
            DType::F32
        },
        packed: u8s(st, "packed"),
        absmax,
    };
    q.validate().unwrap();
    q
}

/// Equal bit patterns, except that FP4's +0.0/-0.0 may differ (README §2.6).
fn same_f32(a: f32, b: f32, fp4: bool) -> bool {
    a.to_bits() == b.to_bits() || (fp4 && a == 0.0 && b == 0.0)
}

#[test]
fn quantize_matches_bnb_bytes() {
    for c in cases() {
        let bytes = read(&c.file);
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let stored_packed = u8s(&st, "packed");
        assert_eq!(
            shape(&st, "packed"),
            vec![stored_packed.len(), 1],
            "{}",
            c.file
        );
        let opts = QuantOptions {
            quant_type: c.quant_type,
            blocksize: c.blocksize,
            double_quant: c.dq,
            allow_nonfinite: false,
        };
        let in_f32;
        let in_bf16;
        let input = if c.bf16_input {
            in_bf16 = bf16s(&st, "input");
            Input::BF16(&in_bf16)
        } else {
            in_f32 = f32s(&st, "input");
            Input::F32(&in_f32)
        };
        for (name, quantize) in quantizers() {
            let q = quantize(input, &c.shape, &opts);
            let ctx = format!("{} [{name}]", c.file);
            assert_eq!(q.packed, stored_packed, "{ctx}: packed");
            assert_eq!(q.shape, c.shape, "{ctx}");
            assert_eq!(
                q.dtype,
                if c.bf16_input {
                    DType::BF16
                } else {
                    DType::F32
                },
                "{ctx}"
            );
            q.validate().unwrap();
            match (&q.absmax, c.dq) {
                (Absmax::Plain(a), false) => {
                    let want = f32s(&st, "absmax");
                    assert_eq!(
                        a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        "{ctx}: absmax"
                    );
                }
                (Absmax::Double(d), true) => check_double(&st, d, c.blocksize, &ctx),
                _ => panic!("{ctx}: wrong absmax kind"),
            }
        }
    }
}

fn check_double(st: &SafeTensors<'_>, d: &DoubleQuant, blocksize: usize, ctx: &str) {
    let want_codes = u8s(st, "absmax");
    let want_nested = f32s(st, "nested_absmax");
    let want_map = f32s(st, "nested_quant_map");
    let want_offset = f32s(st, "offset")[0];
    assert_eq!(d.nested_blocksize, 256);
    assert_eq!(
        d.nested_map.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        want_map.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        "{ctx}: nested map"
    );
    // The offset is torch's f32 mean reproduced bit for bit, so everything
    // downstream of it (codes, nested absmax) is exact too.
    assert_eq!(
        d.offset.to_bits(),
        want_offset.to_bits(),
        "{ctx}: offset {} vs stored {} ({} ulps)",
        d.offset,
        want_offset,
        ulps(d.offset, want_offset)
    );
    assert_eq!(d.codes, want_codes, "{ctx}: codes");
    assert_eq!(
        d.nested_absmax
            .iter()
            .map(|v| v.to_bits())
            .collect::<Vec<_>>(),
        want_nested.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        "{ctx}: nested absmax"
    );
    // With the stored offset, the 8-bit stage itself must be exact in every case.
    let absmax_true = reference_absmax_of_input(st, blocksize);
    let exact = reference::double_quant_with_offset(&absmax_true, want_offset);
    assert_eq!(
        qlora_quant::double_quant_with_offset(&absmax_true, want_offset),
        exact,
        "{ctx}: fast vs reference double quant"
    );
    assert_eq!(
        exact.codes, want_codes,
        "{ctx}: codes with the stored offset"
    );
    assert_eq!(
        exact
            .nested_absmax
            .iter()
            .map(|v| v.to_bits())
            .collect::<Vec<_>>(),
        want_nested.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        "{ctx}: nested absmax with the stored offset"
    );
}

/// The unquantized per-block absmax of the fixture's input, from the dq0 twin file.
fn reference_absmax_of_input(st: &SafeTensors<'_>, blocksize: usize) -> Vec<f32> {
    let input = match st.tensor("input").unwrap().dtype() {
        safetensors::Dtype::BF16 => bf16s(st, "input")
            .iter()
            .map(|v| v.to_f32())
            .collect::<Vec<_>>(),
        _ => f32s(st, "input"),
    };
    let q = reference::quantize_4bit(
        Input::F32(&input),
        &[input.len()],
        &QuantOptions {
            blocksize,
            double_quant: false,
            ..Default::default()
        },
    )
    .unwrap();
    match q.absmax {
        Absmax::Plain(a) => a,
        _ => unreachable!(),
    }
}

#[test]
fn dequantize_stored_matches_bnb() {
    for c in cases() {
        let bytes = read(&c.file);
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let q = stored(&st, &c);
        let fp4 = c.quant_type == QuantType::Fp4;
        let qm = f32s(&st, "quant_map");
        assert_eq!(
            qm.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            code_table(c.quant_type).map(f32::to_bits).to_vec(),
            "{}: quant_map",
            c.file
        );
        if c.dq {
            let want = f32s(&st, "absmax_reconstructed");
            let got = q.absmax_f32();
            assert_eq!(
                got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{}: absmax_reconstructed",
                c.file
            );
        }
        let n = q.numel();
        for backend in Backend::available() {
            let ctx = format!("{} [{}]", c.file, backend.name());
            if c.bf16_input {
                let want = bf16s(&st, "dequantized");
                let mut got = vec![bf16::ZERO; n];
                q.dequantize_range_with(backend, 0, &mut got);
                for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        same_f32(a.to_f32(), b.to_f32(), fp4)
                            && (a.to_bits() == b.to_bits() || fp4),
                        "{ctx}: element {i}: {a} vs {b}"
                    );
                }
                // Rounded f32 (what a matmul sees) = the bf16 values widened.
                let mut wide = vec![0f32; n];
                q.dequantize_range_f32_rounded_with(backend, 0, &mut wide);
                for (i, (a, b)) in wide.iter().zip(&want).enumerate() {
                    assert!(
                        same_f32(*a, b.to_f32(), fp4),
                        "{ctx}: rounded f32 element {i}"
                    );
                }
                let r = reference::dequantize_bf16(&q);
                assert!(
                    r.iter()
                        .zip(&want)
                        .all(|(a, b)| same_f32(a.to_f32(), b.to_f32(), fp4)),
                    "{ctx}: reference"
                );
            } else {
                let want = f32s(&st, "dequantized");
                let mut got = vec![0f32; n];
                q.dequantize_range_with(backend, 0, &mut got);
                for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                    assert!(same_f32(*a, *b, fp4), "{ctx}: element {i}: {a} vs {b}");
                }
                // Ranges at awkward offsets reproduce the same values.
                for (start, len) in [
                    (0, 1),
                    (1, 1),
                    (1, 64),
                    (63, 130),
                    (n / 2 + 1, n / 2 - 1),
                    (n - 1, 1),
                    (n, 0),
                ] {
                    let len = len.min(n - start);
                    let mut part = vec![f32::NAN; len];
                    q.dequantize_range_with(backend, start, &mut part);
                    assert!(
                        part.iter()
                            .zip(&want[start..start + len])
                            .all(|(a, b)| same_f32(*a, *b, fp4)),
                        "{ctx}: range {start}+{len}"
                    );
                }
                let r = reference::dequantize_f32(&q);
                assert!(
                    r.iter().zip(&want).all(|(a, b)| same_f32(*a, *b, fp4)),
                    "{ctx}: reference"
                );
            }
        }
        // The public entry points agree too.
        if c.bf16_input {
            assert_eq!(q.dequantize_bf16().len(), n);
        } else {
            let want = f32s(&st, "dequantized");
            assert!(
                q.dequantize_f32()
                    .iter()
                    .zip(&want)
                    .all(|(a, b)| same_f32(*a, *b, fp4)),
                "{}",
                c.file
            );
        }
    }
}

#[test]
fn blockwise8_matches_bnb_cpu() {
    let idx = index();
    let entry = &idx["blockwise8"][0];
    let bs = entry["blocksize"].as_u64().unwrap() as usize;
    let bytes = read(entry["file"].as_str().unwrap());
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let input = f32s(&st, "input");
    let code: [f32; 256] = f32s(&st, "code").try_into().unwrap();
    let want_q = u8s(&st, "packed");
    let want_absmax = f32s(&st, "absmax");
    let want_deq = f32s(&st, "dequantized");
    assert_eq!(
        code.map(f32::to_bits),
        dynamic_map().map(f32::to_bits),
        "code == dynamic map"
    );

    let (q, absmax) = quantize_blockwise8(&input, &code, bs);
    assert_eq!(q, want_q, "fast codes");
    assert_eq!(
        absmax.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        want_absmax.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    );
    let (rq, rabs) = reference::quantize_blockwise8(&input, &code, bs);
    assert_eq!(rq, want_q, "reference codes");
    assert_eq!(rabs, absmax);

    let mut out = vec![0f32; input.len()];
    dequantize_blockwise8(&want_q, &want_absmax, &code, bs, &mut out);
    assert_eq!(
        out.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        want_deq.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    );
    assert_eq!(
        reference::dequantize_blockwise8(&want_q, &want_absmax, &code, bs),
        out
    );
}

#[test]
fn tables_match_stored_maps() {
    for c in cases() {
        let bytes = read(&c.file);
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let qm = f32s(&st, "quant_map");
        assert_eq!(
            qm.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            code_table(c.quant_type).map(f32::to_bits).to_vec()
        );
        if c.dq {
            let nm = f32s(&st, "nested_quant_map");
            assert_eq!(
                nm.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                dynamic_map().map(f32::to_bits).to_vec()
            );
        }
    }
}
