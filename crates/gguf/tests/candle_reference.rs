//! Cross-checks against candle's own GGUF reader and ggml dequantization
//! (`candle_core::quantized`), an independent implementation of the same formats.

use std::borrow::Cow;

use candle_core::quantized::{gguf_file, GgmlDType, QStorage, QTensor};
use candle_core::Device;
use half::{bf16, f16};
use qlora_gguf::writer::GgufWriter;
use qlora_gguf::{dequant, GgmlType, GgufFile, MetaValue};
use rand::{Rng, SeedableRng};

fn candle_type(t: GgmlType) -> GgmlDType {
    match t {
        GgmlType::F32 => GgmlDType::F32,
        GgmlType::F16 => GgmlDType::F16,
        GgmlType::BF16 => GgmlDType::BF16,
        GgmlType::Q4_0 => GgmlDType::Q4_0,
        GgmlType::Q4_1 => GgmlDType::Q4_1,
        GgmlType::Q5_0 => GgmlDType::Q5_0,
        GgmlType::Q5_1 => GgmlDType::Q5_1,
        GgmlType::Q8_0 => GgmlDType::Q8_0,
        GgmlType::Q8_1 => GgmlDType::Q8_1,
        GgmlType::Q2_K => GgmlDType::Q2K,
        GgmlType::Q3_K => GgmlDType::Q3K,
        GgmlType::Q4_K => GgmlDType::Q4K,
        GgmlType::Q5_K => GgmlDType::Q5K,
        GgmlType::Q6_K => GgmlDType::Q6K,
        GgmlType::Q8_K => GgmlDType::Q8K,
        other => panic!("candle has no {other}"),
    }
}

const DEQUANT_TYPES: [GgmlType; 15] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q8_1,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
    GgmlType::Q8_K,
];

/// Random bytes for `n_blocks` blocks, with every scale field set to a finite,
/// moderately sized float so that the comparison is about the decoding, not NaNs.
fn random_blocks(t: GgmlType, n_blocks: usize, rng: &mut impl Rng) -> Vec<u8> {
    let ts = t.type_size();
    let mut data: Vec<u8> = (0..ts * n_blocks).map(|_| rng.random()).collect();
    let f16_fields: &[usize] = match t {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q8_1 | GgmlType::Q4_K | GgmlType::Q5_K => {
            &[0, 2]
        }
        GgmlType::Q2_K => &[80, 82],
        GgmlType::Q3_K => &[108],
        GgmlType::Q6_K => &[208],
        _ => &[],
    };
    for b in data.chunks_exact_mut(ts) {
        for &at in f16_fields {
            let v = f16::from_f32(rng.random_range(-2.0f32..2.0));
            b[at..at + 2].copy_from_slice(&v.to_le_bytes());
        }
        match t {
            GgmlType::F32 => b.copy_from_slice(&rng.random_range(-1e3f32..1e3).to_le_bytes()),
            GgmlType::F16 => {
                b.copy_from_slice(&f16::from_f32(rng.random_range(-1e3f32..1e3)).to_le_bytes())
            }
            GgmlType::BF16 => {
                b.copy_from_slice(&bf16::from_f32(rng.random_range(-1e3f32..1e3)).to_le_bytes())
            }
            GgmlType::Q8_K => {
                b[0..4].copy_from_slice(&rng.random_range(-0.1f32..0.1).to_le_bytes())
            }
            _ => {}
        }
    }
    data
}

fn candle_dequant(t: GgmlType, data: &[u8], n: usize) -> Vec<f32> {
    let storage = QStorage::from_data(Cow::Borrowed(data), &Device::Cpu, candle_type(t)).unwrap();
    let q = QTensor::new(storage, (n,)).unwrap();
    q.dequantize(&Device::Cpu)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

#[test]
fn type_sizes_match_candle() {
    for t in DEQUANT_TYPES {
        let c = candle_type(t);
        assert_eq!(t.block_size(), c.block_size(), "{t} block size");
        assert_eq!(t.type_size(), c.type_size(), "{t} type size");
    }
}

#[test]
fn dequantize_matches_candle_on_random_blocks() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for t in DEQUANT_TYPES {
        for _ in 0..4 {
            let n_blocks = rng.random_range(1..9) * if t.block_size() == 1 { 64 } else { 1 };
            let n = n_blocks * t.block_size();
            let data = random_blocks(t, n_blocks, &mut rng);
            let ours = dequant::dequantize(t, &data, n).unwrap();
            let theirs = candle_dequant(t, &data, n);
            assert_eq!(ours.len(), theirs.len());
            for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
                assert!(
                    a.to_bits() == b.to_bits(),
                    "{t}: element {i} of {n}: ours {a} candle {b}"
                );
            }
            // Not all zeros: the test must be able to fail.
            assert!(ours.iter().any(|x| *x != 0.0), "{t}");
        }
    }
}

#[test]
fn dequantize_rejects_wrong_byte_count() {
    let err = dequant::dequantize(GgmlType::Q4_K, &[0u8; 143], 256).unwrap_err();
    assert!(err.to_string().contains("144"), "{err}");
    let err = dequant::dequantize(GgmlType::IQ2_XXS, &[0u8; 66], 256).unwrap_err();
    assert!(err.to_string().contains("IQ2_XXS"), "{err}");
}

/// A file written by our writer, read by candle's GGUF reader: metadata and tensors agree
/// with our reader's view of the same file.
#[test]
fn candle_reads_our_files_like_we_do() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut w = GgufWriter::new();
    w.meta("general.architecture", MetaValue::String("llama".into()))
        .meta("general.alignment", MetaValue::U32(64))
        .meta("x.u8", MetaValue::U8(7))
        .meta("x.i8", MetaValue::I8(-7))
        .meta("x.u16", MetaValue::U16(65535))
        .meta("x.i16", MetaValue::I16(-300))
        .meta("x.u32", MetaValue::U32(123456))
        .meta("x.i32", MetaValue::I32(-123456))
        .meta("x.f32", MetaValue::F32(1.5e-5))
        .meta("x.bool", MetaValue::Bool(true))
        .meta("x.u64", MetaValue::U64(1 << 40))
        .meta("x.i64", MetaValue::I64(-(1 << 40)))
        .meta("x.f64", MetaValue::F64(-2.25))
        .meta(
            "x.strs",
            MetaValue::Array(vec![
                MetaValue::String("a".into()),
                MetaValue::String("ĠParis".into()),
            ]),
        )
        .meta(
            "x.ints",
            MetaValue::Array(vec![MetaValue::I32(1), MetaValue::I32(-3)]),
        );
    let mut expected = Vec::new();
    // candle's file reader does not load Q8_1/Q8_K tensors (their dequantization is checked above).
    for (i, t) in DEQUANT_TYPES
        .iter()
        .filter(|t| !matches!(t, GgmlType::Q8_1 | GgmlType::Q8_K))
        .enumerate()
    {
        let rows = 3;
        let cols = t.block_size().max(32) * 2;
        let n_blocks = rows * cols / t.block_size();
        let data = random_blocks(*t, n_blocks, &mut rng);
        let name = format!("t{i}.{}", t.name());
        w.tensor(&name, &[cols as u64, rows as u64], *t, data);
        expected.push((name, *t, vec![rows, cols]));
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    w.write(&path).unwrap();

    let ours = GgufFile::open(&path).unwrap();
    let mut f = std::fs::File::open(&path).unwrap();
    let content = gguf_file::Content::read(&mut f).unwrap();
    assert_eq!(content.tensor_data_offset, ours.header().data_offset);
    assert_eq!(content.metadata.len(), ours.metadata().len());
    let md = ours.metadata();
    assert_eq!(content.metadata["x.u16"].to_u16().unwrap(), 65535);
    assert_eq!(md.get("x.u16"), Some(&MetaValue::U16(65535)));
    assert_eq!(content.metadata["x.i64"].to_i64().unwrap(), -(1 << 40));
    assert_eq!(md.get("x.i64").unwrap().as_int(), Some(-(1i128 << 40)));
    assert_eq!(md.get("x.f32"), Some(&MetaValue::F32(1.5e-5)));
    assert_eq!(
        md.opt_str_array(&path, "x.strs").unwrap().unwrap(),
        vec!["a", "ĠParis"]
    );
    assert_eq!(
        md.opt_int_array(&path, "x.ints").unwrap().unwrap(),
        vec![1, -3]
    );
    for (name, t, shape) in expected {
        let info = ours.tensor_info(&name).unwrap();
        assert_eq!(info.ggml_type, t);
        assert_eq!(info.shape(), shape);
        let ci = &content.tensor_infos[&name];
        assert_eq!(ci.offset, info.offset, "{name}");
        assert_eq!(ci.shape.dims(), &shape[..], "{name}");
        let qt = content.tensor(&mut f, &name, &Device::Cpu).unwrap();
        let theirs = qt
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let mine = ours.dequantize(&name).unwrap();
        assert_eq!(mine.len(), theirs.len());
        assert!(
            mine.iter()
                .zip(&theirs)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{name}"
        );
    }
}
