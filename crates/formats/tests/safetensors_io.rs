//! Reading, validating and writing safetensors files against the shared fixtures,
//! plus one test per kind of corrupted input.

use std::path::Path;

use qlora_formats::shards::{plan_shards, shard_file_name, write_index};
use qlora_formats::{
    parse_size, write_safetensors, Dtype, FormatError, ModelFiles, SafetensorsFile,
    SafetensorsWriter, TensorData, TensorSpec,
};
use qlora_testutil::fixtures;

/// A file image from a header string and a data buffer (header padded to 8).
fn raw(header: &str, data: &[u8]) -> Vec<u8> {
    let mut h = header.to_string();
    while !h.len().is_multiple_of(8) {
        h.push(' ');
    }
    let mut v = (h.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(h.as_bytes());
    v.extend_from_slice(data);
    v
}

fn open_err(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    let e = SafetensorsFile::open(&p).expect_err("corrupt file must be rejected");
    let msg = e.to_string();
    assert!(msg.contains(name), "error does not name the file: {msg}");
    msg
}

#[test]
fn reads_tiny_llama_fixture() {
    let f = SafetensorsFile::open(fixtures().join("tiny_llama/model/model.safetensors")).unwrap();
    assert_eq!(f.len(), 21);
    assert_eq!(
        f.metadata().unwrap().get("format").map(String::as_str),
        Some("pt")
    );
    let e = f.tensor("model.embed_tokens.weight").unwrap();
    assert_eq!(e.dtype, Dtype::F32);
    assert_eq!(e.shape, &[320, 64]);
    let v = e.to_f32().unwrap();
    assert_eq!(v.len(), 320 * 64);
    // f32 decode equals the raw little-endian bytes.
    assert_eq!(v[5].to_le_bytes(), e.data[20..24]);
    // 127,296 parameters, all F32 (fixtures README §7).
    assert_eq!(f.data_len(), 127_296 * 4);
    assert_eq!(f.header_len() + 8 + f.data_len(), 511_328);
    assert!(matches!(
        f.tensor("nope"),
        Err(FormatError::NotFound { .. })
    ));
    // bf16 / f16 conversions round to nearest even.
    let b = e.to_bf16().unwrap();
    assert_eq!(b[5], half::bf16::from_f32(v[5]));
    let h = e.to_f16().unwrap();
    assert_eq!(h[7], half::f16::from_f32(v[7]));
}

/// Re-writing every tensor of a file produced by the Python reference writer
/// must give the identical file: same order, same header bytes, same padding.
fn rewrite_identical(path: &Path) {
    let f = SafetensorsFile::open(path).unwrap();
    let tensors: Vec<TensorData> = f
        .tensors()
        .map(|t| TensorData::new(t.name, t.dtype, t.shape.to_vec(), t.data))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    write_safetensors(&out, &tensors).unwrap();
    let a = std::fs::read(path).unwrap();
    let b = std::fs::read(&out).unwrap();
    assert_eq!(a.len(), b.len());
    assert!(a == b, "{} re-written differs", path.display());
    // nothing but the output is left in the folder
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn writer_reproduces_reference_layout_fp32() {
    rewrite_identical(&fixtures().join("tiny_llama/model/model.safetensors"));
}

#[test]
fn writer_reproduces_reference_layout_bnb4() {
    rewrite_identical(&fixtures().join("tiny_llama_bnb4/model/model.safetensors"));
}

#[test]
fn writer_reproduces_reference_layout_quant_fixture() {
    rewrite_identical(&fixtures().join("quant/odd_3x100.nf4.bs64.dq1.safetensors"));
}

#[test]
fn writer_accepts_any_order_and_zero_size() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.safetensors");
    let specs = vec![
        TensorSpec::new("b", Dtype::F32, vec![2]),
        TensorSpec::new("a", Dtype::U8, vec![3]),
        TensorSpec::new("empty", Dtype::BF16, vec![0, 4]),
        TensorSpec::new("scalar", Dtype::F32, vec![]),
    ];
    let mut w = SafetensorsWriter::create(&p, &specs).unwrap();
    w.write("a", &[1, 2, 3]).unwrap();
    w.write("scalar", &7.5f32.to_le_bytes()).unwrap();
    w.write_f32("b", &[1.0, -2.0]).unwrap();
    assert!(w.write("a", &[1, 2, 3]).is_err(), "second write must fail");
    assert!(w.write("b", &[0; 3]).is_err(), "wrong size must fail");
    w.finish().unwrap();
    let f = SafetensorsFile::open(&p).unwrap();
    assert_eq!(f.tensor("b").unwrap().to_f32().unwrap(), vec![1.0, -2.0]);
    assert_eq!(f.tensor("a").unwrap().data, &[1, 2, 3]);
    assert_eq!(f.tensor("scalar").unwrap().to_f32().unwrap(), vec![7.5]);
    assert_eq!(f.tensor("empty").unwrap().data.len(), 0);
    assert_eq!(f.header_len() % 8, 0);
}

#[test]
fn writer_leaves_nothing_behind_on_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.safetensors");
    let specs = vec![
        TensorSpec::new("a", Dtype::F32, vec![4]),
        TensorSpec::new("b", Dtype::F32, vec![1]),
    ];
    let mut w = SafetensorsWriter::create(&p, &specs).unwrap();
    w.write_f32("a", &[0.0; 4]).unwrap();
    // the temporary file exists while writing, beside the target
    let tmp: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(tmp.len(), 1);
    assert!(tmp[0].to_string_lossy().starts_with("x.safetensors.tmp-"));
    let err = w.finish().unwrap_err().to_string();
    assert!(
        err.contains("never written") && err.contains("`b`"),
        "{err}"
    );
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    // dropping an unfinished writer also cleans up
    let w = SafetensorsWriter::create(&p, &specs).unwrap();
    drop(w);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    // duplicate names are refused up front
    let dup = vec![
        TensorSpec::new("a", Dtype::F32, vec![1]),
        TensorSpec::new("a", Dtype::U8, vec![1]),
    ];
    assert!(SafetensorsWriter::create(&p, &dup).is_err());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn rejects_truncated_header() {
    let d = tempfile::tempdir().unwrap();
    let m = open_err(d.path(), "short.safetensors", &[1, 0, 0]);
    assert!(m.contains("too short"), "{m}");
    let m = open_err(d.path(), "empty.safetensors", &[]);
    assert!(m.contains("too short"), "{m}");
}

#[test]
fn rejects_header_length_beyond_file() {
    let d = tempfile::tempdir().unwrap();
    let mut b = raw(
        r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#,
        &[0],
    );
    b[0..8].copy_from_slice(&4000u64.to_le_bytes());
    let m = open_err(d.path(), "long.safetensors", &b);
    assert!(m.contains("runs past the end of the file"), "{m}");
    let mut b2 = b.clone();
    b2[0..8].copy_from_slice(&u64::MAX.to_le_bytes());
    let m = open_err(d.path(), "huge.safetensors", &b2);
    assert!(m.contains("exceeds"), "{m}");
}

#[test]
fn rejects_bad_json() {
    let d = tempfile::tempdir().unwrap();
    let m = open_err(
        d.path(),
        "bad.safetensors",
        &raw(
            r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]"#,
            &[0],
        ),
    );
    assert!(m.contains("not valid JSON"), "{m}");
    let m = open_err(d.path(), "notobj.safetensors", &raw("[1,2]", &[]));
    assert!(m.contains("does not start with"), "{m}");
    let m = open_err(
        d.path(),
        "field.safetensors",
        &raw(
            r#"{"a":{"dtype":"U8","shape":"x","data_offsets":[0,1]}}"#,
            &[0],
        ),
    );
    assert!(m.contains("`a`") && m.contains("shape"), "{m}");
}

#[test]
fn rejects_offsets_out_of_range() {
    let d = tempfile::tempdir().unwrap();
    let m = open_err(
        d.path(),
        "oor.safetensors",
        &raw(
            r#"{"a":{"dtype":"U8","shape":[8],"data_offsets":[0,8]}}"#,
            &[0; 4],
        ),
    );
    assert!(m.contains("out of range") && m.contains("`a`"), "{m}");
}

#[test]
fn rejects_overlapping_offsets() {
    let d = tempfile::tempdir().unwrap();
    let m = open_err(
        d.path(),
        "overlap.safetensors",
        &raw(
            r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}"#,
            &[0; 6],
        ),
    );
    assert!(
        m.contains("overlap") && m.contains("`a`") && m.contains("`b`"),
        "{m}"
    );
}

#[test]
fn rejects_holes_and_trailing_bytes() {
    let d = tempfile::tempdir().unwrap();
    let m = open_err(
        d.path(),
        "hole.safetensors",
        &raw(
            r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[2],"data_offsets":[4,6]}}"#,
            &[0; 6],
        ),
    );
    assert!(m.contains("hole"), "{m}");
    let m = open_err(
        d.path(),
        "trail.safetensors",
        &raw(
            r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}"#,
            &[0; 5],
        ),
    );
    assert!(m.contains("trailing"), "{m}");
}

#[test]
fn rejects_unknown_dtype() {
    let d = tempfile::tempdir().unwrap();
    let m = open_err(
        d.path(),
        "dtype.safetensors",
        &raw(
            r#"{"w":{"dtype":"F128","shape":[1],"data_offsets":[0,16]}}"#,
            &[0; 16],
        ),
    );
    assert!(
        m.contains("unknown dtype `F128`") && m.contains("`w`"),
        "{m}"
    );
}

#[test]
fn rejects_byte_count_mismatch() {
    let d = tempfile::tempdir().unwrap();
    let m = open_err(
        d.path(),
        "count.safetensors",
        &raw(
            r#"{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
            &[0; 8],
        ),
    );
    assert!(m.contains("needs 12 bytes") && m.contains("span 8"), "{m}");
}

#[test]
fn rejects_duplicate_names() {
    let d = tempfile::tempdir().unwrap();
    let m = open_err(
        d.path(),
        "dup.safetensors",
        &raw(
            r#"{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"w":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#,
            &[0; 2],
        ),
    );
    assert!(m.contains("duplicate") && m.contains("`w`"), "{m}");
}

#[test]
fn rejects_truncated_data() {
    // A real file cut in the middle of its data.
    let bytes = std::fs::read(fixtures().join("tiny_llama/model/model.safetensors")).unwrap();
    let d = tempfile::tempdir().unwrap();
    let m = open_err(d.path(), "cut.safetensors", &bytes[..bytes.len() / 2]);
    assert!(m.contains("out of range") || m.contains("truncated"), "{m}");
}

fn write_sharded(dir: &Path, max: u64) -> Vec<(String, Vec<TensorSpec>)> {
    let src = SafetensorsFile::open(fixtures().join("tiny_llama/model/model.safetensors")).unwrap();
    let units: Vec<Vec<TensorSpec>> = src
        .infos()
        .iter()
        .map(|t| vec![TensorSpec::new(t.name.clone(), t.dtype, t.shape.clone())])
        .collect();
    let plan = plan_shards(units, max);
    let n = plan.len();
    let mut out = Vec::new();
    for (k, specs) in plan.into_iter().enumerate() {
        let name = shard_file_name(k, n);
        let mut w = SafetensorsWriter::create(dir.join(&name), &specs).unwrap();
        for s in &specs {
            w.write(&s.name, src.tensor(&s.name).unwrap().data).unwrap();
        }
        w.finish().unwrap();
        out.push((name, specs));
    }
    write_index(dir, &out).unwrap();
    out
}

#[test]
fn sharded_model_files_round_trip() {
    let d = tempfile::tempdir().unwrap();
    let shards = write_sharded(d.path(), 100_000);
    assert!(shards.len() >= 4, "{} shards", shards.len());
    assert_eq!(
        shards[0].0,
        format!("model-00001-of-{:05}.safetensors", shards.len())
    );
    for (_, specs) in &shards[..shards.len() - 1] {
        let b: usize = specs.iter().map(|s| s.nbytes()).sum();
        assert!(b <= 100_000 || specs.len() == 1);
    }
    let idx: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(d.path().join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(idx["metadata"]["total_size"], 509_184);
    assert_eq!(idx["metadata"]["total_parameters"], 127_296);
    let m = ModelFiles::open(d.path()).unwrap();
    let src = ModelFiles::open(fixtures().join("tiny_llama/model")).unwrap();
    assert_eq!(m.names(), src.names());
    for n in src.names() {
        assert_eq!(m.tensor(n).unwrap().data, src.tensor(n).unwrap().data);
        assert_eq!(m.tensor(n).unwrap().shape, src.tensor(n).unwrap().shape);
    }
    assert_eq!(m.total_data_bytes(), 509_184);
    assert!(m
        .file_of("model.norm.weight")
        .unwrap()
        .starts_with(d.path()));
    assert!(m
        .tensor("missing")
        .unwrap_err()
        .to_string()
        .contains("model.safetensors.index.json"));
}

#[test]
fn index_naming_missing_shard_is_error() {
    let d = tempfile::tempdir().unwrap();
    let shards = write_sharded(d.path(), 100_000);
    std::fs::remove_file(d.path().join(&shards[1].0)).unwrap();
    let e = ModelFiles::open(d.path()).unwrap_err().to_string();
    assert!(
        e.contains("model.safetensors.index.json")
            && e.contains(&shards[1].0)
            && e.contains("does not exist"),
        "{e}"
    );
}

#[test]
fn index_naming_missing_tensor_is_error() {
    let d = tempfile::tempdir().unwrap();
    let shards = write_sharded(d.path(), 100_000);
    let first = shards[0].0.as_str();
    let p = d.path().join("model.safetensors.index.json");
    let mut idx: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    idx["weight_map"]["model.layers.9.mlp.up_proj.weight"] = first.into();
    std::fs::write(&p, serde_json::to_string(&idx).unwrap()).unwrap();
    let e = ModelFiles::open(d.path()).unwrap_err().to_string();
    assert!(
        e.contains("model.layers.9.mlp.up_proj.weight")
            && e.contains(first)
            && e.contains("no such tensor"),
        "{e}"
    );
}

#[test]
fn model_files_single_and_missing() {
    let m = ModelFiles::open(fixtures().join("tiny_llama/model")).unwrap();
    assert_eq!(m.len(), 21);
    assert!(m.index_path().is_none());
    let d = tempfile::tempdir().unwrap();
    let e = ModelFiles::open(d.path()).unwrap_err().to_string();
    assert!(e.contains("no model.safetensors"), "{e}");
}

#[test]
fn parse_size_like_transformers() {
    assert_eq!(parse_size("5GB").unwrap(), 5_000_000_000);
    assert_eq!(parse_size("500MB").unwrap(), 500_000_000);
    assert_eq!(parse_size("2GiB").unwrap(), 2 * 1024 * 1024 * 1024);
    assert_eq!(parse_size("1000").unwrap(), 1000);
    assert_eq!(parse_size("1.5kb").unwrap(), 1500);
    assert!(parse_size("5XB").is_err());
    assert!(parse_size("GB").is_err());
    assert!(parse_size("0").is_err());
}
