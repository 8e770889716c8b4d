//! GGUF: ggml block layouts for "what would this model take as a pure Q4_K
//! file" estimates. Existing files are read with `qlora-gguf`'s header-only
//! reader (see `source::from_gguf`).

use std::path::Path;

use serde::Serialize;

/// A metadata value for [`write_test_file`].
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    Int(i128),
    F32(f32),
    Str(String),
}

/// A ggml tensor type: id, name, elements per block, bytes per block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct GgmlType {
    pub id: u32,
    pub name: &'static str,
    pub block: u64,
    pub block_bytes: u64,
}

/// ggml types with their block layouts (ggml-common.h block structs).
pub const GGML_TYPES: &[GgmlType] = &[
    t(0, "f32", 1, 4),
    t(1, "f16", 1, 2),
    t(2, "q4_0", 32, 18),
    t(3, "q4_1", 32, 20),
    t(6, "q5_0", 32, 22),
    t(7, "q5_1", 32, 24),
    t(8, "q8_0", 32, 34),
    t(9, "q8_1", 32, 36),
    t(10, "q2_k", 256, 84),
    t(11, "q3_k", 256, 110),
    t(12, "q4_k", 256, 144),
    t(13, "q5_k", 256, 176),
    t(14, "q6_k", 256, 210),
    t(15, "q8_k", 256, 292),
    t(16, "iq2_xxs", 256, 66),
    t(17, "iq2_xs", 256, 74),
    t(18, "iq3_xxs", 256, 98),
    t(19, "iq1_s", 256, 50),
    t(20, "iq4_nl", 32, 18),
    t(21, "iq3_s", 256, 110),
    t(22, "iq2_s", 256, 82),
    t(23, "iq4_xs", 256, 136),
    t(24, "i8", 1, 1),
    t(25, "i16", 1, 2),
    t(26, "i32", 1, 4),
    t(27, "i64", 1, 8),
    t(28, "f64", 1, 8),
    t(29, "iq1_m", 256, 56),
    t(30, "bf16", 1, 2),
    t(34, "tq1_0", 256, 54),
    t(35, "tq2_0", 256, 66),
    t(39, "mxfp4", 32, 17),
];

const fn t(id: u32, name: &'static str, block: u64, block_bytes: u64) -> GgmlType {
    GgmlType {
        id,
        name,
        block,
        block_bytes,
    }
}

/// The GGUF types `qlora size` reports for every model ("pure" files).
pub const REPORTED: &[&str] = &[
    "f16", "q8_0", "q6_k", "q5_k", "q5_0", "q4_k", "q4_0", "iq4_xs", "q3_k", "q2_k",
];

pub fn by_id(id: u32) -> Option<GgmlType> {
    GGML_TYPES.iter().copied().find(|t| t.id == id)
}

pub fn by_name(name: &str) -> Option<GgmlType> {
    let n = name.to_ascii_lowercase();
    GGML_TYPES.iter().copied().find(|t| t.name == n)
}

impl GgmlType {
    /// Bytes of a tensor of `numel` elements (rows are whole blocks in valid files).
    pub fn bytes(&self, numel: u64) -> u64 {
        numel.div_ceil(self.block) * self.block_bytes
    }

    /// llama.cpp's fallback when a row (`ne0`) is not a multiple of the block:
    /// k-quants and i-quants → a 32-block type, and then `f16` if even that
    /// does not divide (`llama_tensor_get_type` in llama-quant.cpp).
    pub fn for_row(self, row: u64) -> GgmlType {
        if row.is_multiple_of(self.block) {
            return self;
        }
        let fb = match self.name {
            "q4_k" => "q5_0",
            "q5_k" => "q5_1",
            "q6_k" => "q8_0",
            "q2_k" | "q3_k" | "iq4_xs" | "iq2_xxs" | "iq2_xs" | "iq2_s" | "iq3_xxs" | "iq3_s"
            | "iq1_s" | "iq1_m" | "tq1_0" | "tq2_0" => "iq4_nl",
            _ => "f16",
        };
        let fb = by_name(fb).expect("fallback type listed");
        if row.is_multiple_of(fb.block) {
            fb
        } else {
            by_name("f16").expect("f16 listed")
        }
    }
}

/// Write a minimal GGUF header + zero data (for tests): string, u32 and f32 metadata.
#[doc(hidden)]
pub fn write_test_file(
    path: &Path,
    meta: &[(&str, MetaValue)],
    tensors: &[(&str, Vec<u64>, u32)],
) -> std::io::Result<()> {
    let mut b: Vec<u8> = Vec::new();
    let s = |b: &mut Vec<u8>, x: &str| {
        b.extend((x.len() as u64).to_le_bytes());
        b.extend(x.as_bytes());
    };
    b.extend(b"GGUF");
    b.extend(3u32.to_le_bytes());
    b.extend((tensors.len() as u64).to_le_bytes());
    b.extend((meta.len() as u64).to_le_bytes());
    for (k, v) in meta {
        s(&mut b, k);
        match v {
            MetaValue::Str(x) => {
                b.extend(8u32.to_le_bytes());
                s(&mut b, x);
            }
            MetaValue::F32(x) => {
                b.extend(6u32.to_le_bytes());
                b.extend(x.to_le_bytes());
            }
            MetaValue::Int(i) => {
                b.extend(4u32.to_le_bytes());
                b.extend((*i as u32).to_le_bytes());
            }
        }
    }
    let mut off = 0u64;
    let mut sizes = Vec::new();
    for (name, dims, ty) in tensors {
        s(&mut b, name);
        b.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            b.extend(d.to_le_bytes());
        }
        b.extend(ty.to_le_bytes());
        b.extend(off.to_le_bytes());
        let n = by_id(*ty).expect("known type").bytes(dims.iter().product());
        sizes.push(n);
        off += n.next_multiple_of(32);
    }
    b.resize(b.len().next_multiple_of(32), 0);
    b.resize(b.len() + off as usize, 0);
    std::fs::write(path, b)
}
