//! Byte-level mutation of valid GGUF files (metadata of every value type,
//! nested arrays, strings, tensor infos): the reader returns a header or an
//! error, never panics, and what it allocates stays proportional to the file
//! (measured with a counting allocator, per thread).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::Path;

use proptest::prelude::*;
use qlora_gguf::writer::GgufWriter;
use qlora_gguf::{GgmlType, MetaValue};
use qlora_gguf::{GgufHeader, META_ALLOC_BASE, META_ALLOC_PER_FILE_BYTE};

struct Counting;

thread_local! {
    static CUR: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

fn add(n: usize) {
    let _ = CUR.try_with(|c| {
        let v = c.get() + n;
        c.set(v);
        let _ = PEAK.try_with(|p| p.set(p.get().max(v)));
    });
}
fn sub(n: usize) {
    let _ = CUR.try_with(|c| c.set(c.get().saturating_sub(n)));
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        add(l.size());
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        sub(l.size());
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        add(new);
        sub(l.size());
        System.realloc(p, l, new)
    }
}

#[global_allocator]
static A: Counting = Counting;

/// Peak bytes allocated (above the level at the start) by `f` on this thread.
fn peak_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = CUR.with(|c| c.get());
    PEAK.with(|p| p.set(base));
    let r = f();
    (r, PEAK.with(|p| p.get()) - base)
}

fn allowance(len: usize) -> usize {
    // the parser's own bound plus slack for the error message and the header structs
    (META_ALLOC_BASE + META_ALLOC_PER_FILE_BYTE * len as u64) as usize + (1 << 20)
}

fn sample() -> Vec<u8> {
    let mut w = GgufWriter::new();
    w.meta("general.architecture", MetaValue::String("llama".into()))
        .meta("u8", MetaValue::U8(7))
        .meta("i16", MetaValue::I16(-3))
        .meta("f64", MetaValue::F64(0.5))
        .meta("flag", MetaValue::Bool(true))
        .meta(
            "tokens",
            MetaValue::Array(
                (0..12)
                    .map(|i| MetaValue::String(format!("t{i}")))
                    .collect(),
            ),
        )
        .meta(
            "scores",
            MetaValue::Array((0..12).map(|i| MetaValue::F32(i as f32)).collect()),
        )
        .meta(
            "nested",
            MetaValue::Array(vec![
                MetaValue::Array(vec![MetaValue::U64(1), MetaValue::U64(2)]),
                MetaValue::Array(vec![MetaValue::U64(3)]),
            ]),
        )
        .meta("llama.block_count", MetaValue::U32(1));
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
    w.to_bytes()
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    /// Overwrite 8 bytes (a count or offset, usually) with a hostile value.
    U64(usize, u64),
    Truncate(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Flip(i, b)),
        (
            any::<usize>(),
            prop::sample::select(vec![
                0u64,
                1,
                2,
                0xFF,
                1 << 20,
                1 << 32,
                (1 << 32) - 1,
                1 << 40,
                u64::MAX / 32,
                u64::MAX - 1,
                u64::MAX,
            ])
        )
            .prop_map(|(i, v)| Mutation::U64(i, v)),
        any::<usize>().prop_map(Mutation::Truncate),
    ]
}

fn apply(mut b: Vec<u8>, ms: &[Mutation]) -> Vec<u8> {
    for m in ms {
        if b.is_empty() {
            break;
        }
        match *m {
            Mutation::Flip(i, x) => {
                let n = b.len();
                b[i % n] ^= x | 1;
            }
            Mutation::U64(i, v) => {
                if b.len() >= 8 {
                    let at = i % (b.len() - 7);
                    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
                }
            }
            Mutation::Truncate(i) => {
                let n = b.len();
                b.truncate(i % n);
            }
        }
    }
    b
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn mutated_headers_never_panic_and_allocate_in_proportion(ms in prop::collection::vec(mutation(), 1..6)) {
        let bytes = apply(sample(), &ms);
        let (r, peak) = peak_of(|| {
            let h = GgufHeader::parse(Path::new("fuzz.gguf"), &bytes);
            if let Ok(h) = &h {
                // sizing a config from a mutated header must not panic either
                let _ = qlora_gguf::llama::config_from_header(h);
            }
            h.map(|_| ()).map_err(|e| e.to_string())
        });
        if let Err(e) = &r {
            prop_assert!(e.contains("fuzz.gguf"), "error does not name the file: {e}");
        }
        prop_assert!(peak <= allowance(bytes.len()), "{peak} bytes for a {}-byte file", bytes.len());
    }
}

/// An array claiming as many u8 elements as the file has bytes would take 32x
/// the file as `MetaValue`s: refused once past the allowance, before allocating.
#[test]
fn big_arrays_are_bounded_by_the_file() {
    let n: u64 = 24 << 20;
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes()); // tensors
    b.extend_from_slice(&1u64.to_le_bytes()); // kv
    b.extend_from_slice(&1u64.to_le_bytes());
    b.push(b'k');
    b.extend_from_slice(&9u32.to_le_bytes()); // array
    b.extend_from_slice(&0u32.to_le_bytes()); // of u8
    b.extend_from_slice(&n.to_le_bytes());
    b.resize(b.len() + n as usize, 1);
    let (r, peak) = peak_of(|| GgufHeader::parse(Path::new("big.gguf"), &b).map(|_| ()));
    let e = r.unwrap_err().to_string();
    assert!(e.contains("big.gguf") && e.contains("memory"), "{e}");
    assert!(peak < 2 << 20, "allocated {peak} bytes before refusing");
    // nested: an array of arrays each claiming the rest of the file
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    b.extend_from_slice(&1u64.to_le_bytes());
    b.extend_from_slice(&1u64.to_le_bytes());
    b.push(b'k');
    b.extend_from_slice(&9u32.to_le_bytes());
    b.extend_from_slice(&9u32.to_le_bytes()); // of arrays
    let outer = (8u64 << 20) / 12;
    b.extend_from_slice(&outer.to_le_bytes());
    b.resize(b.len() + (8 << 20), 0);
    let (_, peak) = peak_of(|| GgufHeader::parse(Path::new("nested.gguf"), &b).map(|_| ()));
    assert!(peak <= allowance(b.len()), "allocated {peak} bytes");
}

/// `llama.block_count` 1e9 in a small file: refused before anything is sized
/// from it (it used to grow a list of expected tensors to GBs).
#[test]
fn block_count_is_bounded_by_the_tensors_in_the_file() {
    let mut w = GgufWriter::new();
    w.meta("general.architecture", MetaValue::String("llama".into()))
        .meta("llama.block_count", MetaValue::U32(1_000_000_000))
        .meta("llama.embedding_length", MetaValue::U32(64))
        .meta("llama.feed_forward_length", MetaValue::U32(160))
        .meta("llama.attention.head_count", MetaValue::U32(4))
        .meta(
            "llama.attention.layer_norm_rms_epsilon",
            MetaValue::F32(1e-5),
        );
    w.tensor(
        "token_embd.weight",
        &[64, 8],
        GgmlType::F32,
        vec![0; 64 * 8 * 4],
    );
    let bytes = w.to_bytes();
    let h = GgufHeader::parse(Path::new("blocks.gguf"), &bytes).unwrap();
    let (r, peak) = peak_of(|| qlora_gguf::llama::config_from_header(&h).map(|_| ()));
    let e = r.unwrap_err().to_string();
    assert!(
        e.contains("blocks.gguf") && e.contains("block_count") && e.contains("1000000000"),
        "{e}"
    );
    assert!(peak < 1 << 20, "{peak}");
}
