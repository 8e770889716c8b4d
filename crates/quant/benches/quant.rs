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

/// CPU time of all threads of this process in ns (Linux `/proc`; None elsewhere). Under
/// load from other processes, wall time overstates the cost; CPU time does not (much).
fn process_cpu_ns() -> Option<u64> {
    let mut total = 0u64;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let stat = std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok()?;
        total += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(total)
}

/// Median wall seconds and median CPU seconds (all threads) of `reps` runs.
fn median_secs(reps: usize, mut f: impl FnMut()) -> (f64, Option<f64>) {
    f(); // warm-up (page faults, caches, thread start)
    let mut wall = Vec::with_capacity(reps);
    let mut cpu = Vec::with_capacity(reps);
    for _ in 0..reps {
        let c0 = process_cpu_ns();
        let s = Instant::now();
        f();
        wall.push(s.elapsed().as_secs_f64());
        if let (Some(a), Some(b)) = (c0, process_cpu_ns()) {
            cpu.push(b.saturating_sub(a) as f64 * 1e-9);
        }
    }
    wall.sort_by(f64::total_cmp);
    cpu.sort_by(f64::total_cmp);
    (wall[reps / 2], (cpu.len() == reps).then(|| cpu[reps / 2]))
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
    /// (median wall seconds, median CPU seconds of all threads).
    time: (f64, Option<f64>),
    bytes: usize,
    /// Wall seconds of a memcpy of the output volume, same thread count.
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
    let mut row = |op: String, threads, time, bytes, memcpy_secs| {
        rows.push(Row {
            op,
            threads,
            time,
            bytes,
            memcpy_secs,
        })
    };
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
                let t = median_secs(reps, || {
                    let q = quantize_4bit_with(backend, Input::F32(&x), &[ROWS, COLS], &opts);
                    black_box(q.unwrap());
                });
                row(
                    format!("quantize f32 -> nf4+dq [{b}]"),
                    threads,
                    t,
                    4 * n + packed_bytes,
                    None,
                );
                let t = median_secs(reps, || {
                    let q = quantize_4bit_with(backend, Input::BF16(&xb), &[ROWS, COLS], &opts);
                    black_box(q.unwrap());
                });
                row(
                    format!("quantize bf16 -> nf4+dq [{b}]"),
                    threads,
                    t,
                    2 * n + packed_bytes,
                    None,
                );
                let t = median_secs(reps, || q.dequantize_range_with(backend, 0, &mut out_f32));
                row(
                    format!("dequantize -> f32 [{b}]"),
                    threads,
                    t,
                    4 * n,
                    Some(mc_f32.0),
                );
                let t = median_secs(reps, || q.dequantize_range_with(backend, 0, &mut out_bf16));
                row(
                    format!("dequantize -> bf16 [{b}]"),
                    threads,
                    t,
                    2 * n,
                    Some(mc_bf16.0),
                );
            }
            row(
                "memcpy, f32 output volume".into(),
                threads,
                mc_f32,
                4 * n,
                None,
            );
            row(
                "memcpy, bf16 output volume".into(),
                threads,
                mc_bf16,
                2 * n,
                None,
            );
        });
    }
    black_box((&out_f32, &out_bf16, &dst));

    println!(
        "tensor {ROWS}x{COLS} = {n} elements, nf4, blocksize 64, double quant; \
         fast backend: {}; median of {reps} runs",
        fast.name()
    );
    println!("GB/s counts output bytes for dequantize/memcpy, input + packed bytes for quantize;");
    println!(
        "'vs memcpy' = memcpy time of the same output volume / dequantize time (same threads);"
    );
    println!("'CPU ms' = CPU time of all threads (robust to other load on the machine).");
    println!();
    println!("| operation | threads | wall ms | CPU ms | G elem/s | GB/s | vs memcpy |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        let (wall, cpu) = r.time;
        let ratio = r
            .memcpy_secs
            .map(|m| format!("{:.0}%", 100.0 * m / wall))
            .unwrap_or_default();
        let cpu = cpu.map(|c| format!("{:.1}", c * 1e3)).unwrap_or_default();
        println!(
            "| {} | {} | {:.1} | {} | {:.2} | {:.2} | {} |",
            r.op,
            r.threads,
            wall * 1e3,
            cpu,
            n as f64 / wall / 1e9,
            r.bytes as f64 / wall / 1e9,
            ratio
        );
    }
}
