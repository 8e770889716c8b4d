//! Forward and forward+backward throughput on the SmolLM2-135M shape with
//! random weights (h 576, I 1536, L 30, 9 heads, 3 kv heads, d 64, V 49152,
//! tied), batch 2 x 256, LoRA r 16 on all 7 linears.
//!
//! `cargo run --release -p qlora-model --example bench_compute -- [nf4|none|bf16] [ckpt|nockpt] [layers] [iters] [f32|bf16 compute] [smollm|tinyllama]`
//! `... --example bench_compute -- peak [n]`: the f32 (gemm) and bf16 (AMX) matmul peak reached here.
//! `... --example bench_compute -- shapes [tinyllama]`: the AMX products at a step's shapes
//! (`SHAPE=name` runs one of them, `REPS=n` takes the best of n instead of 5, `NF4=1` dequantizes
//! an NF4 + DQ weight per panel as a step does instead of copying bf16; with `NF4=1`, `COLD=1` adds
//! the forward over 30 weights and inputs in turn with fresh outputs, out of cache as in a step).
//! `... --example bench_compute -- lora [tinyllama]`: the six f32 LoRA products of one linear (r 16,
//! t 512), then old and new `LoraRef` on a layer's linears (cold buffers) and the kernels one by one.
//! `... --example bench_compute -- elementwise`: RMSNorm, SwiGLU, RoPE at the step's shapes.
//! `... --example bench_compute -- attention [tinyllama]`: causal attention forward and backward at the step's shape
//! (`BF16=1`: the bf16 compute mode's AMX products; `COLD=1`: 30 layers' inputs in turn, the median;
//! `BATCH=`, `SEQ=`: other than 2 x 256).
//! Prints tokens/s and the process peak RSS (VmHWM), so run one mode per process.

use std::collections::BTreeMap;
use std::time::Instant;

use qlora_config::ModelConfig;
use qlora_lora::{Adapter, LoraConfig, LoraWeights, Matrix};
use qlora_model::{Batch, LoadOptions, Model, QuantMode, StepOptions, LINEAR_NAMES};

#[path = "bench/lora_ab.rs"]
mod lora_ab;

#[global_allocator]
static ALLOC: qlora_model::alloc::LineAligned = qlora_model::alloc::LineAligned;

fn rss_peak_mib() -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmHWM"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// CPU seconds (user + system, all threads) this process has used so far:
/// on a shared machine, a measure of the work less sensitive to other load
/// than wall time (rayon's idle spinning counts too).
fn cpu_seconds() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // fields after the parenthesized command name; utime, stime are 14, 15
    let rest = s.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (tick(11) + tick(12)) / 100.0
}

struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next() * scale).collect()
    }
}

/// The machine's matmul peak as this crate reaches it: f32 through gemm and
/// bf16 through the AMX kernels, `n×n×n` products (best of 5).
fn peak(n: usize) {
    use qlora_model::ops;
    let mut rng = Lcg(7);
    let (a, b) = (rng.vec(n * n, 1.0), rng.vec(n * n, 1.0));
    let mut c = vec![0f32; n * n];
    let flop = 2.0 * (n * n * n) as f64;
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        ops::matmul(n, n, n, &a, false, &b, true, &mut c, false, 1.0);
        best = best.min(t.elapsed().as_secs_f64());
    }
    println!("f32 gemm {n}^3: {:.0} GFLOP/s", flop / best / 1e9);
    if ops::amx::available() {
        let w = |s: usize, out: &mut [u16]| ops::fastmath::to_bf16(&b[s..s + out.len()], out);
        let mut best = f64::MAX;
        for _ in 0..5 {
            let t = Instant::now();
            ops::amx::linear_forward(n, n, n, &a, &mut c, &w);
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!(
            "bf16 tiles ({}) {n}^3 (incl. rounding the operands): {:.0} GFLOP/s",
            ops::amx::isa().map_or("none", |i| i.name()),
            flop / best / 1e9
        );
    }
}

/// A training step's model FLOPs (multiply-adds x 2; what the step must
/// compute, not what an implementation recomputes: no checkpointing
/// recompute, attention's causal half) for LoRA rank `r` on all 7 linears
/// over `b` rows of `s` tokens: the frozen linears' forward and input
/// gradient (none for layer 0's q/k/v: the frozen embedding takes no
/// gradient), LoRA's forward (2 products) and backward (4), the head's
/// forward and input gradient, attention's `Q·Kᵀ`, `P·V` and their four
/// gradients over the `s(s+1)/2` visible pairs.
fn step_model_flops(c: &ModelConfig, r: usize, b: usize, s: usize) -> f64 {
    let t = (b * s) as f64;
    let l = c.num_hidden_layers as f64;
    let (mut base, mut qkv, mut lora) = (0f64, 0f64, 0f64);
    for (short, [o, i]) in c.linear_shapes() {
        base += (o * i) as f64;
        if matches!(short, "q_proj" | "k_proj" | "v_proj") {
            qkv += (o * i) as f64;
        }
        lora += (r * (o + i)) as f64;
    }
    let linears = 2.0 * t * base * l * 2.0 - 2.0 * t * qkv + 6.0 * t * lora * l;
    let head = 2.0 * 2.0 * t * (c.hidden_size * c.vocab_size) as f64;
    let pairs = b as f64 * (s * (s + 1) / 2) as f64;
    let attention = 6.0 * 2.0 * pairs * (c.num_attention_heads * c.head_dim) as f64 * l;
    linears + head + attention
}

/// The AMX bf16 products at the shapes of a step (t = 512 tokens; the
/// weight read from a ready bf16 copy, so this is the kernel and its panel
/// packing, not the dequantization): GFLOP/s per shape, best of 5.
fn shapes(tiny: bool) {
    use qlora_model::ops;
    if !ops::amx::available() {
        println!("no AMX here");
        return;
    }
    let mut rng = Lcg(9);
    let (h, inter, kv, vocab) = if tiny {
        (2048, 5632, 256, 32000)
    } else {
        (576, 1536, 192, 49152)
    };
    let t = 512;
    let only = std::env::var("SHAPE").ok();
    for (name, o, i, tt) in [
        ("q/o", h, h, t),
        ("k/v", kv, h, t),
        ("gate/up", inter, h, t),
        ("down", h, inter, t),
        ("lm_head chunk", vocab, h, 160),
        ("lm_head whole", vocab, h, 512),
    ] {
        if only.as_deref().is_some_and(|n| n != name) {
            continue;
        }
        let wf = rng.vec(o * i, 0.05);
        let wv: Vec<u16> = wf.iter().map(|v| ops::fastmath::bf16_bits(*v)).collect();
        let nf4 = std::env::var_os("NF4").is_some();
        // NF4=1: the weight as a training step holds it (NF4 + DQ, dequantized per panel)
        let q = nf4.then(|| {
            qlora_quant::quantize_4bit(
                qlora_quant::Input::F32(&wf),
                &[o, i],
                &qlora_quant::QuantOptions::default(),
            )
            .expect("quantize")
        });
        let w = |s: usize, out: &mut [u16]| match &q {
            Some(q) => q.dequantize_range::<half::bf16>(s, bytemuck::cast_slice_mut(out)),
            None => out.copy_from_slice(&wv[s..s + out.len()]),
        };
        // a 4-bit weight read as a step reads it: interleaved rows for the
        // input gradient (NO_WRITERS=1: its elements only, the path before)
        struct Nf4<'a>(&'a qlora_quant::Quantized4, bool);
        impl ops::amx::WeightSource for Nf4<'_> {
            fn elems(&self, s: usize, out: &mut [u16]) {
                self.0
                    .dequantize_range::<half::bf16>(s, bytemuck::cast_slice_mut(out))
            }
            fn has_rows_interleaved(&self) -> bool {
                self.1 && self.0.rows_interleaved_fast()
            }
            fn rows_interleaved(
                &self,
                _: usize,
                rows: std::ops::Range<usize>,
                cols: std::ops::Range<usize>,
                out: &mut [u16],
                st: usize,
            ) {
                let (r0, c0) = (rows.start, cols.start);
                self.0.dequantize_rows_interleaved_bf16_cols(
                    r0,
                    rows.len(),
                    c0,
                    cols.len(),
                    out,
                    st,
                )
            }
            fn forward_panel(&self, c: usize, r0: usize, nr: usize, ks: usize, out: &mut [u16]) {
                if self.1 && self.0.rows_as_tile_columns_fast() {
                    self.0.dequantize_rows_as_tile_columns_bf16(r0, nr, ks, out)
                } else {
                    ops::amx::forward_panel_via_elems(self, c, r0, nr, ks, out)
                }
            }
        }
        let writers = std::env::var_os("NO_WRITERS").is_none();
        let nf4_src = q.as_ref().map(|q| Nf4(q, writers));
        let src: &ops::amx::WeightBf16 = match &nf4_src {
            Some(n) => n,
            None => &w,
        };
        let x = rng.vec(tt * i, 1.0);
        let dy = rng.vec(tt * o, 1.0);
        let mut y = vec![0f32; tt * o];
        let mut dx = vec![0f32; tt * i];
        let flop = 2.0 * (o * i * tt) as f64;
        let (mut bf, mut bb) = (f64::MAX, f64::MAX);
        let reps: usize = std::env::var("REPS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(5);
        for _ in 0..reps {
            let t0 = Instant::now();
            ops::amx::linear_forward(o, i, tt, &x, &mut y, src);
            bf = bf.min(t0.elapsed().as_secs_f64());
            let t0 = Instant::now();
            ops::amx::linear_backward(o, i, tt, &dy, &mut dx, src);
            bb = bb.min(t0.elapsed().as_secs_f64());
        }
        if std::env::var_os("COLD").is_some() && q.is_some() {
            // 30 weights and inputs in turn and a fresh output per call, as a
            // step meets them (out of cache): the median pass over the 30
            let qs: Vec<_> = (0..30)
                .map(|_| {
                    let wf = rng.vec(o * i, 0.05);
                    qlora_quant::quantize_4bit(
                        qlora_quant::Input::F32(&wf),
                        &[o, i],
                        &qlora_quant::QuantOptions::default(),
                    )
                    .expect("quantize")
                })
                .collect();
            let srcs: Vec<Nf4> = qs.iter().map(|q| Nf4(q, writers)).collect();
            let xs: Vec<Vec<f32>> = (0..30).map(|_| rng.vec(tt * i, 1.0)).collect();
            let mut times = vec![];
            for _ in 0..reps {
                let t0 = Instant::now();
                let ys: Vec<Vec<f32>> = srcs
                    .iter()
                    .zip(&xs)
                    .map(|(w, x)| ops::amx::linear_forward_new(o, i, tt, x, w))
                    .collect();
                times.push(t0.elapsed().as_secs_f64() / 30.0);
                drop(std::hint::black_box(ys));
            }
            times.sort_by(f64::total_cmp);
            println!(
                "{name:>14} [{o}x{i}] t {tt}, cold: forward {:.0} GFLOP/s (median of {reps})",
                flop / times[times.len() / 2] / 1e9
            );
        }
        println!(
            "{name:>14} [{o}x{i}] t {tt}: forward {:.0} GFLOP/s, input gradient {:.0} GFLOP/s",
            flop / bf / 1e9,
            flop / bb / 1e9
        );
    }
}

/// The LoRA products of one q-shaped linear (r 16, t 512) through `ops::matmul`.
fn lora_products() {
    use qlora_model::ops::matmul;
    let mut rng = Lcg(5);
    let (t, i, o, r) = (512, 576, 576, 16);
    let x = rng.vec(t * i, 1.0);
    let a = rng.vec(r * i, 0.05);
    let b = rng.vec(o * r, 0.05);
    let dy = rng.vec(t * o, 1.0);
    let mut xa = vec![0f32; t * r];
    let mut y = vec![0f32; t * o];
    let mut db = vec![0f32; o * r];
    let mut dxa = vec![0f32; t * r];
    let mut da = vec![0f32; r * i];
    let mut dx = vec![0f32; t * i];
    let mut best = [f64::MAX; 6];
    for _ in 0..50 {
        let mut tm = |k: usize, f: &mut dyn FnMut()| {
            let t0 = Instant::now();
            f();
            best[k] = best[k].min(t0.elapsed().as_secs_f64());
        };
        tm(0, &mut || {
            matmul(t, r, i, &x, false, &a, true, &mut xa, false, 1.0)
        });
        tm(1, &mut || {
            matmul(t, o, r, &xa, false, &b, true, &mut y, true, 2.0)
        });
        tm(2, &mut || {
            matmul(o, r, t, &dy, true, &xa, false, &mut db, false, 2.0)
        });
        tm(3, &mut || {
            matmul(t, r, o, &dy, false, &b, false, &mut dxa, false, 2.0)
        });
        tm(4, &mut || {
            matmul(r, i, t, &dxa, true, &x, false, &mut da, false, 1.0)
        });
        tm(5, &mut || {
            matmul(t, i, r, &dxa, false, &a, false, &mut dx, true, 1.0)
        });
    }
    let flop = 2.0 * (t * i * r) as f64;
    for (k, name) in [
        "xa = x At",
        "y += xa Bt",
        "dB = dyT xa",
        "dxa = dy B",
        "dA = dxaT x",
        "dx += dxa A",
    ]
    .iter()
    .enumerate()
    {
        println!(
            "{name:>12}: {:.1} us, {:.0} GFLOP/s",
            best[k] * 1e6,
            flop / best[k] / 1e9
        );
    }
}

/// RMSNorm (h 576), SwiGLU (I 1536) and RoPE over 512 tokens, best of 30:
/// per call, and the bytes each moves per nanosecond.
fn elementwise() {
    use qlora_model::ops::{rmsnorm, rope, swiglu};
    let mut rng = Lcg(9);
    let (t, h, im, heads, d) = (512, 576, 1536, 9, 64);
    let x = rng.vec(t * h, 1.0);
    let w = rng.vec(h, 1.0);
    let dy = rng.vec(t * h, 1.0);
    let g = rng.vec(t * im, 2.0);
    let u = rng.vec(t * im, 1.0);
    let positions: Vec<u32> = (0..t as u32).collect();
    let inv: Vec<f32> = (0..d / 2)
        .map(|k| 1e5f32.powf(-((2 * k) as f32) / d as f32))
        .collect();
    let (cos, sin) = rope::tables(&inv, &positions);
    let mut q = rng.vec(t * heads * d, 1.0);
    let mut best = [f64::MAX; 5];
    for _ in 0..30 {
        let mut tm = |k: usize, f: &mut dyn FnMut()| {
            let t0 = Instant::now();
            f();
            best[k] = best[k].min(t0.elapsed().as_secs_f64());
        };
        let mut rstd = Vec::new();
        tm(0, &mut || {
            rstd = std::hint::black_box(rmsnorm::forward(&x, &w, 1e-5)).1
        });
        let mut dx = vec![0f32; t * h];
        tm(1, &mut || {
            rmsnorm::backward_add(&dy, &x, &w, &rstd, &mut dx)
        });
        tm(2, &mut || {
            std::hint::black_box(swiglu::forward(&g, &u));
        });
        tm(3, &mut || {
            std::hint::black_box(swiglu::backward(&g, &g, &u));
        });
        tm(4, &mut || rope::apply(&mut q, heads, d, &cos, &sin, false));
    }
    let bytes = [
        3 * t * h * 4,
        4 * t * h * 4,
        3 * t * im * 4,
        5 * t * im * 4,
        2 * t * heads * d * 4,
    ];
    for (k, name) in [
        "RMSNorm forward",
        "RMSNorm backward",
        "SwiGLU forward",
        "SwiGLU backward",
        "RoPE (q)",
    ]
    .iter()
    .enumerate()
    {
        println!(
            "{name:>17}: {:7.1} us, {:5.1} GB/s",
            best[k] * 1e6,
            bytes[k] as f64 / best[k] / 1e9
        );
    }
}

/// Causal attention forward and backward at the step's shape (b 2, s 256,
/// 9 heads, 3 kv heads, d 64; `tinyllama`: 32 heads, 4 kv heads; `BATCH=`, `SEQ=` other sizes),
/// best of 20, and the GFLOP/s of its products (the causal half of the score and value products,
/// 64-query blocks).
fn attention_bench(tinyllama: bool) {
    use qlora_model::ops::attention::{self, AttnShape};
    let mut rng = Lcg(11);
    // BATCH=, SEQ=: other than the step's 2 x 256
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let (b, s) = (env("BATCH", 2), env("SEQ", 256));
    let (heads, kvh, d) = if tinyllama { (32, 4, 64) } else { (9, 3, 64) };
    let sh = AttnShape {
        b,
        q_len: s,
        k_len: s,
        q_offset: 0,
        heads,
        kv_heads: kvh,
        d,
        window: None,
        bf16: std::env::var_os("BF16").is_some(),
    };
    // COLD=1: 30 layers' inputs in turn (out of cache, as a step meets
    // them), the median call; else one set, the best of 20
    let cold = std::env::var_os("COLD").is_some();
    let sets: Vec<[Vec<f32>; 4]> = (0..if cold { 30 } else { 1 })
        .map(|_| {
            [
                rng.vec(b * s * heads * d, 1.0),
                rng.vec(b * s * kvh * d, 1.0),
                rng.vec(b * s * kvh * d, 1.0),
                rng.vec(b * s * heads * d, 1.0),
            ]
        })
        .collect();
    let (mut tf, mut tb) = (vec![], vec![]);
    for rep in 0..if cold { 90 } else { 20 } {
        let [q, k, v, dout] = &sets[rep % sets.len()];
        let t0 = Instant::now();
        let (out, lse) = attention::forward(&sh, q, k, v, None);
        tf.push(t0.elapsed().as_secs_f64());
        let t0 = Instant::now();
        std::hint::black_box(attention::backward(&sh, q, k, v, &out, &lse, dout, None));
        tb.push(t0.elapsed().as_secs_f64());
    }
    tf.sort_by(f64::total_cmp);
    tb.sort_by(f64::total_cmp);
    let (bf, bb) = if cold {
        (tf[tf.len() / 2], tb[tb.len() / 2])
    } else {
        (tf[0], tb[0])
    };
    // each 64-query block sees keys up to its end: rows · keys per product
    let pairs: usize = (0..s)
        .step_by(64)
        .map(|i0| (s - i0).min(64) * (i0 + 64).min(s))
        .sum();
    let prod = 2.0 * (b * heads) as f64 * (pairs * d) as f64;
    println!(
        "attention forward {:.0} us ({:.0} GFLOP/s), backward {:.0} us ({:.0} GFLOP/s); per step (30 layers) {:.0} ms",
        bf * 1e6,
        2.0 * prod / bf / 1e9,
        bb * 1e6,
        5.0 * prod / bb / 1e9,
        30.0 * (bf + bb) * 1e3
    );
}

/// NF4 + DQ -> bf16 dequantization of one forward panel (32 rows) at the
/// step's row lengths, one thread, best of 200: ns per element.
fn dequant_bench() {
    let mut rng = Lcg(13);
    for i in [576usize, 1536, 2048, 5632] {
        let w = rng.vec(32 * i, 0.05);
        let q = qlora_quant::quantize_4bit(
            qlora_quant::Input::F32(&w),
            &[32, i],
            &qlora_quant::QuantOptions::default(),
        )
        .expect("quantize");
        let mut out = vec![half::bf16::ZERO; 32 * i];
        let mut best = f64::MAX;
        for _ in 0..200 {
            let t0 = Instant::now();
            q.dequantize_range::<half::bf16>(0, &mut out);
            best = best.min(t0.elapsed().as_secs_f64());
        }
        println!(
            "NF4+DQ -> bf16, 32 x {i}: {:.1} us, {:.2} ns/element",
            best * 1e6,
            best * 1e9 / (32 * i) as f64
        );
        // the forward's B panel straight from the codes (rows as tile columns)
        let ks = i.div_ceil(32);
        let mut panel = vec![0u16; 2 * ks * 512];
        let mut best = f64::MAX;
        for _ in 0..200 {
            let t0 = Instant::now();
            q.dequantize_rows_as_tile_columns_bf16(0, 32, ks, &mut panel);
            best = best.min(t0.elapsed().as_secs_f64());
        }
        println!(
            "NF4+DQ -> forward panel, 32 x {i}: {:.1} us, {:.2} ns/element",
            best * 1e6,
            best * 1e9 / (32 * i) as f64
        );
    }
}

fn main() -> anyhow::Result<()> {
    qlora_model::ops::init_pool();
    // as the training step does (cross_entropy::head_forward_backward)
    qlora_model::ops::keep_freed_memory();
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).is_some_and(|s| s == "gemmsmall") {
        use qlora_model::ops::matmul;
        let mut rng = Lcg(3);
        for (m, n, k, bt) in [
            (64usize, 256usize, 64usize, true),
            (192, 256, 64, true),
            (64, 64, 256, false),
            (192, 64, 256, false),
        ] {
            let a = rng.vec(m * k, 1.0);
            let b = rng.vec(n * k, 1.0);
            let mut c = vec![0f32; m * n];
            let mut best = f64::MAX;
            for _ in 0..200 {
                let t0 = Instant::now();
                matmul(m, n, k, &a, false, &b, bt, &mut c, false, 1.0);
                best = best.min(t0.elapsed().as_secs_f64());
            }
            println!(
                "{m}x{n}x{k} (b^T {bt}): {:.1} us, {:.0} GFLOP/s",
                best * 1e6,
                2.0 * (m * n * k) as f64 / best / 1e9
            );
        }
        return Ok(());
    }
    if args.get(1).is_some_and(|s| s == "dequant") {
        dequant_bench();
        return Ok(());
    }
    if args.get(1).is_some_and(|s| s == "attention") {
        attention_bench(args.get(2).is_some_and(|s| s == "tinyllama"));
        return Ok(());
    }
    if args.get(1).is_some_and(|s| s == "elementwise") {
        elementwise();
        return Ok(());
    }
    if args.get(1).is_some_and(|s| s == "lora") {
        lora_products();
        lora_ab::lora_ab(args.get(2).is_some_and(|s| s == "tinyllama"));
        return Ok(());
    }
    if args.get(1).is_some_and(|s| s == "shapes") {
        shapes(args.get(2).is_some_and(|s| s == "tinyllama"));
        return Ok(());
    }
    if args.get(1).is_some_and(|s| s == "peak") {
        peak(args.get(2).and_then(|s| s.parse().ok()).unwrap_or(2048));
        return Ok(());
    }
    let quant: QuantMode = args
        .get(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(QuantMode::Nf4);
    let ckpt = args.get(2).is_some_and(|s| s == "ckpt");
    let layers: usize = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(30);
    let compute: qlora_model::BaseCompute = args
        .get(5)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or_default();
    let cfg_json = if args.get(6).is_some_and(|s| s == "tinyllama") {
        format!(
            r#"{{"model_type":"llama","hidden_size":2048,"intermediate_size":5632,"num_hidden_layers":{layers},
        "num_attention_heads":32,"num_key_value_heads":4,"head_dim":64,"vocab_size":32000,
        "rms_norm_eps":1e-5,"rope_theta":10000.0,"tie_word_embeddings":false,"max_position_embeddings":2048}}"#
        )
    } else {
        format!(
            r#"{{"model_type":"llama","hidden_size":576,"intermediate_size":1536,"num_hidden_layers":{layers},
        "num_attention_heads":9,"num_key_value_heads":3,"head_dim":64,"vocab_size":49152,
        "rms_norm_eps":1e-5,"rope_theta":100000.0,"tie_word_embeddings":true,"max_position_embeddings":8192}}"#
        )
    };
    let config = ModelConfig::from_json_str(&cfg_json, "bench")?;
    let mut rng = Lcg(42);
    let (h, v) = (config.hidden_size, config.vocab_size);
    let mut tensors = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![v, h],
        rng.vec(v * h, 0.05),
    )];
    tensors.push(("model.norm.weight".into(), vec![h], vec![1.0; h]));
    if !config.tie_word_embeddings {
        tensors.push(("lm_head.weight".into(), vec![v, h], rng.vec(v * h, 0.05)));
    }
    for l in 0..layers {
        for n in ["input_layernorm", "post_attention_layernorm"] {
            tensors.push((
                format!("model.layers.{l}.{n}.weight"),
                vec![h],
                vec![1.0; h],
            ));
        }
        for (short, [o, i]) in config.linear_shapes() {
            let path = ModelConfig::linear_path(l, short);
            tensors.push((
                format!("{path}.weight"),
                vec![o, i],
                rng.vec(o * i, 1.0 / (i as f32).sqrt()),
            ));
        }
    }
    let t0 = Instant::now();
    let mut model = Model::from_tensors(config.clone(), tensors, "random", &LoadOptions { quant })?;
    model.set_base_compute(compute);
    eprintln!(
        "built {quant:?} model in {:.1}s, weights {:.1} MiB",
        t0.elapsed().as_secs_f64(),
        model.weight_bytes() as f64 / 1048576.0
    );
    let r = 16;
    let mut lay = BTreeMap::new();
    for l in 0..layers {
        for (m, (short, [o, i])) in config.linear_shapes().into_iter().enumerate() {
            assert_eq!(short, LINEAR_NAMES[m]);
            lay.insert(
                ModelConfig::linear_path(l, short),
                LoraWeights {
                    a: Matrix::new(r, i, rng.vec(r * i, 1.0 / (i as f32).sqrt()))?,
                    b: Matrix::new(o, r, rng.vec(o * r, 0.01))?,
                    magnitude: None,
                },
            );
        }
    }
    let adapter = Adapter {
        config: LoraConfig {
            r,
            lora_alpha: 32.0,
            lora_dropout: 0.0,
            target_modules: vec![],
            use_rslora: false,
            use_dora: false,
        },
        layers: lay,
    };
    let (b, s) = (2, 256);
    let ids: Vec<Vec<u32>> = (0..b)
        .map(|_| {
            (0..s)
                // uniform over the vocabulary (rng.next() is in [-1, 1))
                .map(|_| (((rng.next() + 1.0) * 0.5 * (v - 1) as f32) as u32).min(v as u32 - 1))
                .collect()
        })
        .collect();
    let batch = Batch::from_ids(ids);
    let tokens = (b * s) as f64;
    // warm-up + forward
    model.loss(&batch, Some(&adapter))?;
    let iters: usize = args.get(4).map(|s| s.parse()).transpose()?.unwrap_or(2);
    let t = Instant::now();
    for _ in 0..iters {
        model.loss(&batch, Some(&adapter))?;
    }
    let fwd = tokens * iters as f64 / t.elapsed().as_secs_f64();
    let rss_fwd = rss_peak_mib();
    let opts = StepOptions {
        loss_denominator: 510.0,
        checkpointing: ckpt,
        lora_dropout_seed: 1,
        ..Default::default()
    };
    qlora_model::ops::profile::reset();
    let (t, c0) = (Instant::now(), cpu_seconds());
    for _ in 0..iters {
        model.forward_backward(&batch, &adapter, &opts)?;
    }
    let wall = t.elapsed().as_secs_f64();
    let fb = tokens * iters as f64 / wall;
    if qlora_model::ops::profile::enabled() {
        let rows = qlora_model::ops::profile::totals();
        eprint!("{}", qlora_model::ops::profile::table(&rows, wall, iters));
    }
    let fb_cpu = (cpu_seconds() - c0) / iters as f64;
    let flops = step_model_flops(&config, r, b, s);
    println!(
        "model FLOPs {:.1} GFLOP a step: {:.0} GFLOP/s",
        flops / 1e9,
        flops * iters as f64 / wall / 1e9
    );
    println!(
        "quant {quant:?} compute {compute:?} (tiles {}) checkpointing {ckpt} layers {layers}: forward {fwd:.0} tok/s, forward+backward {fb:.0} tok/s ({fb_cpu:.2} CPU s per step), \
         peak RSS after forward {rss_fwd:.0} MiB, after training steps {:.0} MiB, threads {}",
        qlora_model::ops::amx::isa().map_or("none", |i| i.name()),
        rss_peak_mib(),
        rayon::current_num_threads()
    );
    Ok(())
}
