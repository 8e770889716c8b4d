//! Decode speed of the native GGUF weights (`ops::ggml`): every type through the
//! dispatching decoder (AVX2 where there is a kernel) and through the reference, one
//! 4096 x 4096 weight row by row, single-threaded. Random blocks with finite f16 scales.
//!
//! `cargo run --release -p qlora-model --example bench_ggml`

use std::time::Instant;

use qlora_gguf::GgmlType;
use qlora_model::ops::ggml::{decode_row, decode_row_reference, NATIVE_TYPES};

fn scale_offsets(ty: GgmlType) -> &'static [usize] {
    match ty {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 | GgmlType::F16 => &[0],
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
        GgmlType::Q2_K => &[80, 82],
        GgmlType::Q3_K => &[108],
        GgmlType::Q6_K => &[208],
        _ => &[],
    }
}

fn main() {
    let (rows, cols) = (4096usize, 4096usize);
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    println!("| type | reference ns/value | dispatched ns/value | speed-up |");
    println!("|---|---:|---:|---:|");
    for ty in NATIVE_TYPES {
        let ts = ty.type_size();
        let nb = rows * cols / ty.block_size();
        let mut bytes: Vec<u8> = (0..nb * ts).map(|_| next() as u8).collect();
        for b in 0..nb {
            for &o in scale_offsets(ty) {
                let v = (next() % 1000) as f32 / 500.0 - 1.0;
                let h = if ty == GgmlType::BF16 {
                    half::bf16::from_f32(v).to_le_bytes()
                } else {
                    half::f16::from_f32(v).to_le_bytes()
                };
                bytes[b * ts + o..b * ts + o + 2].copy_from_slice(&h);
            }
            if ty == GgmlType::BF16 {
                let v = (next() % 1000) as f32 / 500.0 - 1.0;
                bytes[b * ts..b * ts + 2].copy_from_slice(&half::bf16::from_f32(v).to_le_bytes());
            }
        }
        let row_bytes = cols / ty.block_size() * ts;
        let mut out = vec![0f32; cols];
        let mut time = |f: &dyn Fn(&[u8], &mut [f32])| {
            let mut best = f64::MAX;
            for _ in 0..3 {
                let t = Instant::now();
                for r in 0..rows {
                    f(&bytes[r * row_bytes..(r + 1) * row_bytes], &mut out);
                }
                best = best.min(t.elapsed().as_secs_f64());
                std::hint::black_box(&out);
            }
            best * 1e9 / (rows * cols) as f64
        };
        let reference = time(&|s, o| decode_row_reference(ty, s, o));
        let fast = time(&|s, o| decode_row(ty, s, o));
        println!(
            "| {ty} | {reference:.3} | {fast:.3} | {:.1}x |",
            reference / fast
        );
    }
}
