//! Reader validation: every malformed file is an error naming the file (and tensor).

use qlora_gguf::writer::GgufWriter;
use qlora_gguf::{GgmlType, GgufError, GgufFile, MetaValue};

fn sample() -> GgufWriter {
    let mut w = GgufWriter::new();
    w.meta("general.architecture", MetaValue::String("llama".into()))
        .meta("a.b", MetaValue::U32(5));
    // 2 x 32 Q8_0: two blocks of 34 bytes, d = 1.0 (0x3c00), q = i.
    let mut q = Vec::new();
    for b in 0..2u8 {
        q.extend_from_slice(&[0x00, 0x3c]);
        q.extend((0..32u8).map(|i| (i as i8 - 16 + b as i8) as u8));
    }
    w.tensor("w", &[32, 2], GgmlType::Q8_0, q);
    w.tensor(
        "v",
        &[3],
        GgmlType::F32,
        [1.0f32, -2.0, 3.5]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
    );
    w
}

fn write(dir: &tempfile::TempDir, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let p = dir.path().join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn reads_header_and_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(&dir, "ok.gguf", &sample().to_bytes());
    let h = GgufFile::read_header(&p).unwrap();
    assert_eq!(h.version, 3);
    assert_eq!(h.alignment, 32);
    assert_eq!(h.tensors.len(), 2);
    assert_eq!(h.tensor("w").unwrap().shape(), vec![2, 32]);
    assert_eq!(h.tensor("w").unwrap().n_bytes, 68);
    assert_eq!(h.tensor("v").unwrap().offset, 96);
    assert_eq!(h.architecture().unwrap(), "llama");
    assert_eq!(h.data_offset % 32, 0);
    let f = GgufFile::open(&p).unwrap();
    let w = f.dequantize("w").unwrap();
    assert_eq!(w[0], -16.0);
    assert_eq!(w[31], 15.0);
    assert_eq!(w[32], -15.0);
    assert_eq!(f.dequantize("v").unwrap(), vec![1.0, -2.0, 3.5]);
    let e = f.dequantize("nope").unwrap_err();
    assert!(matches!(e, GgufError::MissingTensor { .. }), "{e}");
}

#[test]
fn every_truncation_is_a_clean_error() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = sample().to_bytes();
    // Cutting the file anywhere before the last tensor's end must fail, never panic.
    let last_end = GgufFile::read_header(write(&dir, "full.gguf", &bytes))
        .map(|h| h.data_offset + 96 + 12)
        .unwrap() as usize;
    for cut in 0..last_end {
        let p = write(&dir, "cut.gguf", &bytes[..cut]);
        let e = GgufFile::read_header(&p).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("cut.gguf"), "cut {cut}: {msg}");
        if cut >= 4 {
            assert!(
                msg.contains("truncated") || msg.contains("past the end"),
                "cut {cut}: {msg}"
            );
        }
    }
}

#[test]
fn bad_magic_version_and_tensor_type() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = sample().to_bytes();
    bytes[0] = b'X';
    let e = GgufFile::open(write(&dir, "m.gguf", &bytes)).unwrap_err();
    assert!(matches!(e, GgufError::BadMagic { .. }), "{e}");
    assert!(e.to_string().contains("m.gguf"));

    let mut bytes = sample().to_bytes();
    bytes[4] = 9;
    let e = GgufFile::open(write(&dir, "v.gguf", &bytes)).unwrap_err();
    assert!(e.to_string().contains("version 9"), "{e}");

    // Patch tensor `w`'s type id (u32 after its 2 dims) to 77.
    let mut bytes = sample().to_bytes();
    let name_at = bytes
        .windows(9)
        .position(|w| w == b"\x01\0\0\0\0\0\0\0w")
        .unwrap()
        + 8;
    let type_at = name_at + 1 + 4 + 16;
    assert_eq!(bytes[type_at], 8);
    bytes[type_at] = 77;
    let e = GgufFile::open(write(&dir, "t.gguf", &bytes)).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("t.gguf") && msg.contains("`w`") && msg.contains("77"),
        "{msg}"
    );
}

#[test]
fn offsets_alignment_and_sizes_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    // Inner dim not a multiple of the block size.
    let mut w = GgufWriter::new();
    w.tensor("odd", &[33, 1], GgmlType::Q8_0, vec![0; 34]);
    let e = GgufFile::open(write(&dir, "a.gguf", &w.to_bytes())).unwrap_err();
    assert!(e.to_string().contains("`odd`") && e.to_string().contains("block size"));

    // Data section too short for the declared shape.
    let mut w = GgufWriter::new();
    w.tensor("big", &[32, 4], GgmlType::Q8_0, vec![0; 34]);
    let e = GgufFile::open(write(&dir, "b.gguf", &w.to_bytes())).unwrap_err();
    assert!(e.to_string().contains("`big`") && e.to_string().contains("past the end"));

    // Bad alignment value.
    let mut w = sample();
    w.meta("general.alignment", MetaValue::U32(24));
    let e = GgufFile::open(write(&dir, "c.gguf", &w.to_bytes())).unwrap_err();
    assert!(e.to_string().contains("general.alignment"), "{e}");

    // Duplicate tensor name.
    let mut w = GgufWriter::new();
    w.tensor("d", &[1], GgmlType::F32, vec![0; 4]);
    w.tensor("d", &[1], GgmlType::F32, vec![0; 4]);
    let e = GgufFile::open(write(&dir, "d.gguf", &w.to_bytes())).unwrap_err();
    assert!(e.to_string().contains("duplicate"), "{e}");

    // Unsupported dequantization type is reported with the tensor name.
    let mut w = GgufWriter::new();
    w.tensor("iq", &[256], GgmlType::IQ2_XXS, vec![0; 66]);
    let f = GgufFile::open(write(&dir, "e.gguf", &w.to_bytes())).unwrap();
    let e = f.dequantize("iq").unwrap_err();
    assert!(
        e.to_string().contains("`iq`") && e.to_string().contains("IQ2_XXS"),
        "{e}"
    );

    // Custom alignment is honoured.
    let mut w = sample();
    w.meta("general.alignment", MetaValue::U32(256));
    let h = GgufFile::read_header(write(&dir, "f.gguf", &w.to_bytes())).unwrap();
    assert_eq!(h.alignment, 256);
    assert_eq!(h.data_offset % 256, 0);
    assert_eq!(h.tensor("v").unwrap().offset, 256);
}

#[test]
fn huge_counts_do_not_allocate() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = b"GGUF".to_vec();
    bytes.extend_from_slice(&3u32.to_le_bytes());
    bytes.extend_from_slice(&0u64.to_le_bytes());
    bytes.extend_from_slice(&1u64.to_le_bytes());
    bytes.extend_from_slice(&1u64.to_le_bytes());
    bytes.push(b'k');
    bytes.extend_from_slice(&9u32.to_le_bytes()); // array
    bytes.extend_from_slice(&8u32.to_le_bytes()); // of strings
    bytes.extend_from_slice(&u64::MAX.to_le_bytes());
    let e = GgufFile::read_header(write(&dir, "h.gguf", &bytes)).unwrap_err();
    assert!(e.to_string().contains("truncated"), "{e}");
}
