//! Custom timing harness (no criterion): quantize / dequantize a 4096 x 11008 tensor (one
//! Llama-7B MLP matrix) with 1 and 2 rayon threads, next to a memcpy of the same output
//! byte volume measured in the same run (the bandwidth ceiling). Medians of several runs.
//!
//! Run: `cargo bench -p qlora-quant` (add `-- --quick` for fewer repetitions).
//! `QLORA_QUANT_BACKEND=scalar` is not needed: the scalar kernels are timed explicitly.

use std::hint::black_box;
use std::time::Instant;

use half::bf16;
use qlora_quant::{quantize_4bit_with, Backend, Input, QuantOptions, QuantType, Quantized4};
use rayon::prelude::*;

const ROWS: usize = 4096;
const COLS: usize = 11008;

fn median_secs(reps: usize, mut f: impl FnMut()) -> f64 {
    f(); // warm-up (page faults, caches, thread start)
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

/// Parallel memcpy of `src` into `dst` (same chunking as the kernels: 1 MiB pieces).
fn memcpy(dst: &mut [u8], src: &[u8]) {
    dst.par_chunks_mut(1 << 20)
        .zip(src.par_chunks(1 << 20))
        .for_each(|(d, s)| d.copy_from_slice(s));
}

struct Row {
    op: String,
    threads: usize,
    secs: f64,
    bytes: usize,
    /// Seconds of a memcpy of the output volume, same thread count.
    memcpy_secs: Option<f64>,
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let reps = if quick { 3 } else { 7 };
    let n = ROWS * COLS;
    // Deterministic pseudo-normal-ish weights (sum of uniforms), scale like real weights.
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let x: Vec<f32> = (0..n)
        .map(|_| {
            let mut s = 0f32;
            for _ in 0..4 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                s += (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            }
            s * 0.02
        })
        .collect();
    let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
    let opts = QuantOptions {
        quant_type: QuantType::Nf4,
        blocksize: 64,
        double_quant: true,
        allow_nonfinite: false,
    };
    let fast = Backend::detect();
    let q: Quantized4 = quantize_4bit_with(fast, Input::F32(&x), &[ROWS, COLS], &opts).unwrap();
    let packed_bytes = q.packed.len() + q.absmax.len(); // 4-bit codes + 8-bit DQ codes

    let mut out_f32 = vec![0f32; n];
    let mut out_bf16 = vec![bf16::ZERO; n];
    let src = vec![1u8; 4 * n];
    let mut dst = vec![0u8; 4 * n];

    let mut rows: Vec<Row> = Vec::new();
    for threads in [1usize, 2] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let mc_f32 = median_secs(reps, || memcpy(&mut dst, &src));
            let mc_bf16 = median_secs(reps, || memcpy(&mut dst[..2 * n], &src[..2 * n]));
            for backend in Backend::available() {
                let b = backend.name();
                let s = median_secs(reps, || {
                    black_box(
                        quantize_4bit_with(backend, Input::F32(&x), &[ROWS, COLS], &opts).unwrap(),
                    );
                });
                rows.push(Row {
                    op: format!("quantize nf4+dq f32->4bit [{b}]"),
                    threads,
                    secs: s,
                    bytes: 4 * n + packed_bytes,
                    memcpy_secs: None,
                });
                let s = median_secs(reps, || {
                    black_box(
                        quantize_4bit_with(backend, Input::BF16(&xb), &[ROWS, COLS], &opts)
                            .unwrap(),
                    );
                });
                rows.push(Row {
                    op: format!("quantize nf4+dq bf16->4bit [{b}]"),
                    threads,
                    secs: s,
                    bytes: 2 * n + packed_bytes,
                    memcpy_secs: None,
                });
                let s = median_secs(reps, || q.dequantize_range_with(backend, 0, &mut out_f32));
                rows.push(Row {
                    op: format!("dequantize ->f32 [{b}]"),
                    threads,
                    secs: s,
                    bytes: 4 * n,
                    memcpy_secs: Some(mc_f32),
                });
                let s = median_secs(reps, || q.dequantize_range_with(backend, 0, &mut out_bf16));
                rows.push(Row {
                    op: format!("dequantize ->bf16 [{b}]"),
                    threads,
                    secs: s,
                    bytes: 2 * n,
                    memcpy_secs: Some(mc_bf16),
                });
            }
            rows.push(Row {
                op: "memcpy (f32 output volume)".into(),
                threads,
                secs: mc_f32,
                bytes: 4 * n,
                memcpy_secs: None,
            });
            rows.push(Row {
                op: "memcpy (bf16 output volume)".into(),
                threads,
                secs: mc_bf16,
                bytes: 2 * n,
                memcpy_secs: None,
            });
        });
    }
    black_box((&out_f32, &out_bf16, &dst));

    println!("tensor {ROWS}x{COLS} = {n} elements, nf4, blocksize 64, double quant; fast backend: {}; median of {reps} runs", fast.name());
    println!(
        "bytes = output bytes for dequantize/memcpy, input bytes + packed output for quantize"
    );
    println!();
    println!("| operation | threads | ms | G elem/s | GB/s | vs memcpy |");
    println!("|---|---:|---:|---:|---:|---:|");
    for r in &rows {
        let ratio = r
            .memcpy_secs
            .map(|m| format!("{:.0}%", 100.0 * m / r.secs))
            .unwrap_or_default();
        println!(
            "| {} | {} | {:.1} | {:.2} | {:.2} | {} |",
            r.op,
            r.threads,
            r.secs * 1e3,
            n as f64 / r.secs / 1e9,
            r.bytes as f64 / r.secs / 1e9,
            ratio
        );
    }
}
