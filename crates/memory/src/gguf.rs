//! GGUF: "what would this model take as a pure Q4_K file" estimates, with
//! `qlora-gguf`'s ggml type table. Existing files are read with `qlora-gguf`'s
//! header-only reader (see `source::from_gguf`).

use qlora_gguf::GgmlType;

/// The GGUF types `qlora size` reports for every model ("pure" files), with
/// their report names.
pub const REPORTED: &[(&str, GgmlType)] = &[
    ("f16", GgmlType::F16),
    ("q8_0", GgmlType::Q8_0),
    ("q6_k", GgmlType::Q6_K),
    ("q5_k", GgmlType::Q5_K),
    ("q5_0", GgmlType::Q5_0),
    ("q4_k", GgmlType::Q4_K),
    ("q4_0", GgmlType::Q4_0),
    ("iq4_xs", GgmlType::IQ4_XS),
    ("q3_k", GgmlType::Q3_K),
    ("q2_k", GgmlType::Q2_K),
];

/// Bytes of `numel` elements of `ty` (partial blocks rounded up: only for
/// estimates; [`GgmlType::for_row`] makes real rows whole blocks).
pub fn bytes(ty: GgmlType, numel: u64) -> u64 {
    numel.div_ceil(ty.block_size() as u64) * ty.type_size() as u64
}
