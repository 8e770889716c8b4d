//! `bench_compute lora [tinyllama]`: old and new `LoraRef` A/B (see [`lora_ab`]).

use std::time::Instant;

use super::Lcg;

/// `LoraRef::forward` / `backward` (the row-block kernels) against their
/// `ops::matmul` references, on the seven linears of a SmolLM2-135M (or
/// TinyLlama, `lora tinyllama`) layer
/// (r 16, t 512) with buffers of 4 layers in turn (caches as cold as in a
/// step), on the pool like a step; old and new alternate, medians of 15.
pub fn lora_ab(tinyllama: bool) {
    use qlora_model::ops::lora::LoraRef;
    let (t, r) = (512, 16);
    let (h, kv, im, sets) = if tinyllama {
        (2048, 256, 5632, 2)
    } else {
        (576, 192, 1536, 4)
    };
    let shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, im), (h, im), (im, h)];
    let mut rng = Lcg(5);
    struct Buf {
        x: Vec<f32>,
        dy: Vec<f32>,
        y: Vec<f32>,
        dx: Vec<f32>,
        xa: Vec<f32>,
    }
    // per set and linear: (A, B) and the activations
    let weights: Vec<Vec<(Vec<f32>, Vec<f32>)>> = (0..sets)
        .map(|_| {
            shapes
                .iter()
                .map(|&(i, o)| (rng.vec(r * i, 0.05), rng.vec(o * r, 0.05)))
                .collect()
        })
        .collect();
    let mut bufs: Vec<Vec<Buf>> = (0..sets)
        .map(|_| {
            shapes
                .iter()
                .map(|&(i, o)| Buf {
                    x: rng.vec(t * i, 1.0),
                    dy: rng.vec(t * o, 1.0),
                    y: vec![0.0; t * o],
                    dx: vec![0.0; t * i],
                    xa: vec![0.0; t * r],
                })
                .collect()
        })
        .collect();
    let loras: Vec<Vec<LoraRef>> = weights
        .iter()
        .map(|set| {
            set.iter()
                .zip(&shapes)
                .map(|((a, b), &(i, o))| LoraRef {
                    a,
                    b,
                    r,
                    in_features: i,
                    out_features: o,
                    scale: 2.0,
                    dropout: 0.0,
                    dropout_key: 1,
                    mask_rows: None,
                })
                .collect()
        })
        .collect();
    let (mut fw, mut bw) = ([vec![], vec![]], [vec![], vec![]]);
    qlora_model::ops::on_pool(|| {
        for rep in 0..32 {
            let new = rep % 2;
            let (mut tf, mut tb) = (0.0, 0.0);
            for (set, ls) in bufs.iter_mut().zip(&loras) {
                let t0 = Instant::now();
                for (bf, l) in set.iter_mut().zip(ls) {
                    bf.xa = if new == 1 {
                        l.forward(&bf.x, t, &mut bf.y)
                    } else {
                        l.forward_ref(&bf.x, t, &mut bf.y)
                    };
                }
                tf += t0.elapsed().as_secs_f64();
                let t0 = Instant::now();
                for (bf, l) in set.iter_mut().zip(ls) {
                    std::hint::black_box(if new == 1 {
                        l.backward(&bf.x, &bf.xa, &bf.dy, t, &mut bf.dx)
                    } else {
                        l.backward_ref(&bf.x, &bf.xa, &bf.dy, t, &mut bf.dx)
                    });
                }
                tb += t0.elapsed().as_secs_f64();
            }
            if rep >= 2 {
                fw[new].push(tf / sets as f64);
                bw[new].push(tb / sets as f64);
            }
        }
    });
    {
        // the kernels one by one (one thread), same cold buffers
        use qlora_model::ops::{fastmath::Isa, skinny};
        let isa = Isa::best();
        let mut tk = [0f64; 5];
        for _ in 0..6 {
            for (set, ls) in bufs.iter_mut().zip(&loras) {
                for (bf, l) in set.iter_mut().zip(ls) {
                    let (i, o) = (l.in_features, l.out_features);
                    let at = skinny::pack_transposed(l.a, r, i, 1.0);
                    let sbt = skinny::pack_transposed(l.b, o, r, 2.0);
                    let sb = skinny::pack_rows(l.b, o, r, 2.0);
                    let ap = skinny::pack_rows(l.a, r, i, 1.0);
                    let mut part = vec![0f32; r * (i + o)];
                    let mut dxa = vec![0f32; t * r];
                    let t0 = Instant::now();
                    skinny::nn(isa, t, r, i, &bf.x, i, &at, &mut bf.xa, r, false);
                    let t1 = Instant::now();
                    skinny::nn(isa, t, o, r, &bf.xa, r, &sbt, &mut bf.y, o, true);
                    let t2 = Instant::now();
                    skinny::nn(isa, t, r, o, &bf.dy, o, &sb, &mut dxa, r, false);
                    skinny::tn(
                        isa,
                        r,
                        o,
                        t,
                        &bf.xa,
                        r,
                        &bf.dy,
                        o,
                        &mut part[i..],
                        i + o,
                        false,
                    );
                    let t3 = Instant::now();
                    skinny::tn(isa, r, i, t, &dxa, r, &bf.x, i, &mut part, i + o, false);
                    let t4 = Instant::now();
                    skinny::nn(isa, t, i, r, &dxa, r, &ap, &mut bf.dx, i, true);
                    let t5 = Instant::now();
                    for (k, (a, b)) in [(t0, t1), (t1, t2), (t2, t3), (t3, t4), (t4, t5)]
                        .iter()
                        .enumerate()
                    {
                        tk[k] += (*b - *a).as_secs_f64();
                    }
                }
            }
        }
        let n = 6.0 * sets as f64;
        println!(
            "kernels per layer, one thread: x At {:.2} ms, y += {:.2} ms, dy sB + dBt {:.2} ms, dA {:.2} ms, dx += {:.2} ms",
            tk[0] / n * 1e3, tk[1] / n * 1e3, tk[2] / n * 1e3, tk[3] / n * 1e3, tk[4] / n * 1e3
        );
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2] * 1e3
    };
    for (k, name) in ["matmul (old)", "skinny (new)"].iter().enumerate() {
        println!(
            "LoRA of one layer, {name}: forward {:.2} ms, backward {:.2} ms (x30 layers: {:.0} + {:.0} ms)",
            med(&mut fw[k]),
            med(&mut bw[k]),
            30.0 * med(&mut fw[k]),
            30.0 * med(&mut bw[k])
        );
    }
}
