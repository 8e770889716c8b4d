//! Random bytes and mutated headers fed to the reader must give errors, never panics.

use proptest::prelude::*;
use qlora_formats::SafetensorsFile;

fn valid_file() -> Vec<u8> {
    let h = r#"{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"b":{"dtype":"U8","shape":[3],"data_offsets":[16,19]}}"#;
    let mut h = h.to_string();
    while !h.len().is_multiple_of(8) {
        h.push(' ');
    }
    let mut v = (h.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(h.as_bytes());
    v.extend((0..19u8).collect::<Vec<_>>());
    v
}

/// Opening must not panic; if it succeeds every view must lie inside the file.
fn check(bytes: Vec<u8>) {
    let len = bytes.len();
    if let Ok(f) = SafetensorsFile::from_bytes(bytes, "fuzz.safetensors") {
        let mut total = 0;
        for t in f.tensors() {
            total += t.data.len();
            let _ = t.to_f32();
        }
        assert!(total <= len);
    }
}

#[test]
fn the_unmutated_file_is_valid() {
    let f = SafetensorsFile::from_bytes(valid_file(), "ok.safetensors").unwrap();
    assert_eq!(f.len(), 2);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        check(bytes);
    }

    #[test]
    fn random_header_after_valid_length_never_panics(body in proptest::collection::vec(any::<u8>(), 0..120)) {
        let mut v = (body.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(&body);
        check(v);
    }

    #[test]
    fn mutated_valid_file_never_panics(muts in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6), cut in any::<usize>()) {
        let mut v = valid_file();
        for (i, b) in muts {
            let i = i % v.len();
            v[i] = b;
        }
        let keep = v.len() - cut % 4;
        v.truncate(keep);
        check(v);
    }

    #[test]
    fn mutated_header_digits_never_panic(pos in 0usize..160, digit in b'0'..=b'9') {
        // Change one character of the JSON text into a digit: offsets and shapes go wrong.
        let mut v = valid_file();
        let i = 8 + pos % (v.len() - 8 - 19);
        v[i] = digit;
        check(v);
    }
}

/// The tiny bnb-4bit fixture's bytes.
fn bnb_fixture() -> &'static [u8] {
    static BYTES: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    BYTES.get_or_init(|| {
        std::fs::read(qlora_testutil::fixtures().join("tiny_llama_bnb4/model/model.safetensors"))
            .unwrap()
    })
}

/// `(start, end)` of every quant-state JSON blob in `bytes`.
fn quant_state_spans(bytes: &[u8]) -> Vec<(usize, usize)> {
    let open = b"{\"quant_type\"";
    let mut v = Vec::new();
    let mut i = 0;
    while let Some(k) = bytes[i..].windows(open.len()).position(|w| w == open) {
        let s = i + k;
        let e = s + bytes[s..].iter().position(|&b| b == b'}').unwrap() + 1;
        v.push((s, e));
        i = e;
    }
    v
}

#[test]
fn the_fixture_has_a_quant_state_per_quantized_linear() {
    assert_eq!(quant_state_spans(bnb_fixture()).len(), 14);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Bytes of the quant-state JSON blobs mutated in place (the file stays
    /// well-formed safetensors): the quant-state parser, which the loader and
    /// `qlora size`/`plan` share, returns errors, never panics, and what it
    /// accepts is consistent (the packed bytes and absmax fit the shape) and
    /// dequantizes.
    #[test]
    fn mutated_bnb_quant_states_never_panic(
        muts in proptest::collection::vec(
            (any::<usize>(), prop_oneof![any::<u8>(), b'0'..=b'9', Just(b' '), Just(b'-')]),
            1..4,
        )
    ) {
        let mut v = bnb_fixture().to_vec();
        let spans = quant_state_spans(&v);
        for (i, b) in muts {
            let (s, e) = spans[i % spans.len()];
            v[s + (i / spans.len()) % (e - s)] = b;
        }
        if let Ok(f) = qlora_formats::SafetensorsFile::from_bytes(v, "bnb.safetensors") {
            for key in qlora_formats::bnb::bnb4_weight_keys(&f) {
                if let Ok(Some(q)) = qlora_formats::read_bnb4(&f, &key) {
                    let n: usize = q.shape.iter().product();
                    prop_assert!(q.packed.len() >= n.div_ceil(2));
                    let mut out = vec![0f32; n.min(4096)];
                    q.dequantize_range(0, &mut out);
                }
            }
        }
    }
}
