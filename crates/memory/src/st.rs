//! Predicting the exact safetensors header a writer produces (FORMATS.md §4.4).
//! Existing files are read with `qlora-formats`' validated reader.

/// Rank of a safetensors dtype in the reference writer's enum; the writer lays
/// tensors out by descending rank, then by name (`safetensors::tensor::prepare`).
pub fn dtype_rank(dtype: &str) -> Option<u32> {
    const ORDER: [&str; 22] = [
        "BOOL",
        "F4",
        "F6_E2M3",
        "F6_E3M2",
        "U8",
        "I8",
        "F8_E5M2",
        "F8_E4M3",
        "F8_E8M0",
        "F8_E4M3FNUZ",
        "F8_E5M2FNUZ",
        "I16",
        "U16",
        "F16",
        "BF16",
        "I32",
        "U32",
        "F32",
        "C64",
        "F64",
        "I64",
        "U64",
    ];
    ORDER.iter().position(|d| *d == dtype).map(|p| p as u32)
}

/// Bytes per element of a safetensors dtype (sub-byte types excluded).
pub fn dtype_size(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" | "F8_E8M0" | "F8_E4M3FNUZ"
        | "F8_E5M2FNUZ" => 1,
        "I16" | "U16" | "F16" | "BF16" => 2,
        "I32" | "U32" | "F32" => 4,
        "C64" | "F64" | "I64" | "U64" => 8,
        _ => return None,
    })
}

/// One tensor as a writer would lay it out.
#[derive(Debug, Clone)]
pub struct Entry {
    pub name: String,
    pub dtype: &'static str,
    pub shape: Vec<u64>,
    pub nbytes: u64,
}

/// Length of the header JSON (padded to 8 with spaces, without the 8-byte
/// length prefix) that the safetensors writer produces for these tensors with
/// metadata `{"format":"pt"}` (what transformers, PEFT and our writers use).
pub fn header_json_len(entries: &[Entry]) -> u64 {
    let mut sorted: Vec<&Entry> = entries.iter().collect();
    sorted.sort_by(|a, b| {
        let (ra, rb) = (dtype_rank(a.dtype), dtype_rank(b.dtype));
        rb.cmp(&ra).then(a.name.as_bytes().cmp(b.name.as_bytes()))
    });
    let mut s = String::from("{\"__metadata__\":{\"format\":\"pt\"}");
    let mut off = 0u64;
    for e in sorted {
        let shape: Vec<String> = e.shape.iter().map(u64::to_string).collect();
        s.push(',');
        s.push_str(&serde_json::to_string(&e.name).expect("string"));
        s.push_str(&format!(
            ":{{\"dtype\":\"{}\",\"shape\":[{}],\"data_offsets\":[{},{}]}}",
            e.dtype,
            shape.join(","),
            off,
            off + e.nbytes
        ));
        off += e.nbytes;
    }
    s.push('}');
    (s.len() as u64).next_multiple_of(8)
}
