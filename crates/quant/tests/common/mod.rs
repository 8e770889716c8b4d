//! Fixture access shared by the integration tests.
#![allow(dead_code)]

use half::bf16;
pub use qlora_testutil::fixtures as fixtures_dir;
use safetensors::{Dtype, SafeTensors};

pub fn index() -> serde_json::Value {
    let path = fixtures_dir().join("quant/index.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

pub fn read(rel: &str) -> Vec<u8> {
    let path = fixtures_dir().join(rel);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn f32s(st: &SafeTensors<'_>, name: &str) -> Vec<f32> {
    let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(t.dtype(), Dtype::F32, "{name}");
    t.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

pub fn bf16s(st: &SafeTensors<'_>, name: &str) -> Vec<bf16> {
    let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(t.dtype(), Dtype::BF16, "{name}");
    t.data()
        .chunks_exact(2)
        .map(|b| bf16::from_bits(u16::from_le_bytes([b[0], b[1]])))
        .collect()
}

pub fn u8s(st: &SafeTensors<'_>, name: &str) -> Vec<u8> {
    let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(t.dtype(), Dtype::U8, "{name}");
    t.data().to_vec()
}

pub fn shape(st: &SafeTensors<'_>, name: &str) -> Vec<usize> {
    st.tensor(name).unwrap().shape().to_vec()
}

/// Distance in ulps between two finite f32 of the same sign.
pub fn ulps(a: f32, b: f32) -> u32 {
    (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
}
