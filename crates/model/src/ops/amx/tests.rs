use super::super::testutil::*;
use super::*;

/// A weight source giving `wv`'s elements as bf16.
fn bf16_source(wv: &[f32]) -> impl Fn(usize, &mut [u16]) + Sync + '_ {
    move |start, out| {
        for (d, v) in out.iter_mut().zip(&wv[start..]) {
            *d = bf16_bits(*v);
        }
    }
}

/// The largest error of `got` against f64 sums `want` (`(sum, Σ|term|)`
/// per element) as a fraction of f32 summation's bound, `4ε·Σ|term|`: at
/// most 1 for products of bf16 operands summed in f32 in any order.
fn worst_vs_f32_summation(got: &[f32], want: &[(f64, f64)]) -> f64 {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .map(|(g, &(sum, mag))| {
            (*g as f64 - sum).abs() / (mag * f32::EPSILON as f64 * 4.0).max(1e-30)
        })
        .fold(0.0, f64::max)
}

fn bf(v: f32) -> f64 {
    f32::from_bits((bf16_bits(v) as u32) << 16) as f64
}

/// `y` (`[t, o]`) against `x · Wᵀ` summed in f64 over the bf16-rounded
/// operands (`x` `[t, i]`, `W` `[o, i]`), within f32 summation of `i` terms.
fn assert_forward_matches_bf16_reference(
    x: &[f32],
    w: &[f32],
    y: &[f32],
    t: usize,
    i: usize,
    o: usize,
    what: &str,
) {
    let mut worst = 0f64;
    for r in 0..t {
        for c in 0..o {
            let s: f64 = (0..i).map(|k| bf(x[r * i + k]) * bf(w[c * i + k])).sum();
            worst = worst.max((s - y[r * o + c] as f64).abs());
        }
    }
    assert!(worst < 1e-4 * (i as f64).sqrt(), "{what}: {worst}");
}

#[test]
fn bf16_rounding_matches_half() {
    for v in rand_vec(10_000, 7, 100.0).into_iter().chain([
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::MAX,
        1e-40,
        f32::NAN,
    ]) {
        let h = half::bf16::from_f32(v).to_bits();
        if v.is_nan() {
            assert!(f32::from_bits((bf16_bits(v) as u32) << 16).is_nan());
        } else {
            assert_eq!(bf16_bits(v), h, "{v}");
        }
    }
}

/// The forward weight panel: the dispatched (AVX-512 transposes where
/// the CPU has it) packing equals the plain loop on random shapes.
#[test]
fn forward_panel_packing_matches_the_plain_loop() {
    if !super::super::fastmath::Isa::V4.available() {
        eprintln!("SKIPPED: no AVX-512 here; only the plain panel packing ran");
    }
    // (nn, i, k-steps past the row: LoRA's terms ride there, zeros here)
    for &(nn, i, extra) in &[
        (32usize, 576usize, 0usize),
        (32, 64, 0),
        (32, 2048, 0),
        (17, 96, 0),
        (32, 45, 0),
        (5, 33, 0),
        (16, 32, 0),
        (32, 100, 0),
        (32, 576, 1),
        (32, 64, 2),
        (17, 96, 1),
        (32, 45, 1),
    ] {
        let ksteps = i.div_ceil(32) + extra;
        let wv: Vec<u16> = rand_vec(nn * i, 31, 1.0)
            .iter()
            .map(|v| bf16_bits(*v))
            .collect();
        let mut want = vec![7u16; 2 * ksteps * TILE_U16];
        let mut got = vec![9u16; 2 * ksteps * TILE_U16];
        if nn < 32 || !i.is_multiple_of(32) {
            // the padding must come out zero whatever was there
            want.fill(0);
        }
        pack_b_forward_ref(&wv, nn, i, ksteps, &mut want);
        pack_b_forward(&wv, nn, i, ksteps, &mut got);
        assert_eq!(got, want, "nn {nn} i {i} extra {extra}");
        // and element by element, the documented layout
        for s in 0..2 {
            for ks in 0..ksteps {
                for q in 0..16 {
                    for j in 0..16 {
                        for e in 0..2 {
                            let (row, col) = (16 * s + j, 2 * (16 * ks + q) + e);
                            let v = if row < nn && col < i {
                                wv[row * i + col]
                            } else {
                                0
                            };
                            assert_eq!(got[(s * ksteps + ks) * TILE_U16 + q * 32 + j * 2 + e], v);
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn an_empty_inner_dimension_gives_zeros() {
    if skip_without_tiles("the tile kernels were") {
        return;
    }
    let w = |_: usize, _: &mut [u16]| {};
    assert_eq!(linear_forward_new(3, 0, 4, &[], &w), vec![0f32; 12]);
    assert!(linear_forward_new(0, 5, 4, &[0.0; 20], &w).is_empty());
}

/// f64 reference of `x Wᵀ` (forward) and `dy W` (backward) on bf16-rounded inputs.
#[test]
fn amx_forward_and_backward_match_bf16_reference() {
    let Some(isa) = isa() else {
        eprintln!("SKIPPED: no bf16 tile ISA here (AMX, AVX512-BF16; or QLORA_NO_AMX / QLORA_TILE_ISA): the tile kernels were not run");
        return;
    };
    eprintln!("tile products on {}", isa.name());
    for other in [TileIsa::Amx, TileIsa::Avx512Bf16] {
        if other != isa && !other.supported() {
            eprintln!(
                "NOT RUN here: the {} tile products (not on this CPU)",
                other.name()
            );
        }
    }
    for &(o, i, t) in &[
        (32, 32, 32),
        (64, 96, 64),
        (70, 45, 33),
        (7, 3, 5),
        (200, 1100, 40),
        (1100, 200, 17),
        // o·i over CHUNK_ELEMS: the input gradient runs in two weight chunks
        // (1888 rows, then 612), the second reading A from a later k-step on.
        (2500, 1100, 12),
    ] {
        let wv = rand_vec(o * i, 21, 1.0);
        let x = rand_vec(t * i, 22, 1.0);
        let dy = rand_vec(t * o, 23, 1.0);
        let w = bf16_source(&wv);
        let mut y = vec![f32::NAN; t * o];
        linear_forward(o, i, t, &x, &mut y, &w);
        // the fresh-vector form writes every element (nothing zeroed first)
        let fresh = linear_forward_new(o, i, t, &x, &w);
        assert_eq!(
            fresh.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            y.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            "fresh forward {o}x{i}x{t}"
        );
        assert_forward_matches_bf16_reference(
            &x,
            &wv,
            &y,
            t,
            i,
            o,
            &format!("forward {o}x{i}x{t}"),
        );
        let init = rand_vec(t * i, 24, 1.0);
        let mut dx = init.clone();
        linear_backward(o, i, t, &dy, &mut dx, &w);
        let mut worst = 0f64;
        for r in 0..t {
            for c in 0..i {
                let s: f64 = (0..o).map(|k| bf(dy[r * o + k]) * bf(wv[k * i + c])).sum();
                worst = worst.max((init[r * i + c] as f64 + s - dx[r * i + c] as f64).abs());
            }
        }
        assert!(
            worst < 1e-4 * (o as f64).sqrt(),
            "backward {o}x{i}x{t}: {worst}"
        );
    }
}

/// A is packed tile by tile: every element lands where `a_index` says,
/// rounded to bf16, and the padding rows and columns are zero, whatever the
/// buffer held before (it is reused between calls).
#[test]
fn a_operand_is_packed_tile_by_tile_with_zero_padding() {
    for &(rows, cols, ld, col0) in &[
        (32usize, 64usize, 64usize, 0usize),
        (5, 33, 40, 7),
        (47, 100, 100, 0),
        (64, 576, 600, 24),
        (1, 1, 1, 0),
        (17, 32, 32, 0),
    ] {
        let src = rand_vec(rows * ld, 41, 3.0);
        let kp = round_up(cols, 32);
        let mp = round_up(rows, 32);
        let mut a = TileBuf::new();
        a.resize(mp * kp + 5);
        a.fill(0xFFFF);
        pack_a(&src, rows, cols, ld, col0, kp, &mut a);
        assert!(
            (a.as_ptr() as usize).is_multiple_of(64),
            "packed A not 64-byte aligned"
        );
        let mut seen = vec![false; mp * kp];
        for r in 0..mp {
            for c in 0..kp {
                let at = a_index(r, c, kp);
                assert!(!seen[at], "two elements at {at}");
                seen[at] = true;
                let want = if r < rows && c < cols {
                    bf16_bits(src[r * ld + col0 + c])
                } else {
                    0
                };
                assert_eq!(a[at], want, "rows {rows} cols {cols} r {r} c {c}");
            }
        }
    }
}

#[test]
fn tile_buffers_start_on_a_cache_line_and_keep_contents_while_not_growing() {
    let mut b = TileBuf::new();
    for n in [1usize, 7, 512, 100_000, 3, 250_000, 0] {
        b.resize(n);
        assert_eq!(b.len(), n);
        assert!((b.as_ptr() as usize).is_multiple_of(64), "n {n}");
    }
    b.resize(1000);
    for (k, v) in b.iter_mut().enumerate() {
        *v = k as u16;
    }
    b.resize(600); // no growth: the same storage, the same contents
    assert!(b.iter().enumerate().all(|(k, v)| *v == k as u16));
}

/// Several weights on one input give, bit for bit, what each gives alone
/// (partial panels, an empty output, an empty inner dimension).
#[test]
fn shared_input_forward_equals_separate_forwards() {
    if skip_without_tiles("the tile kernels were") {
        return;
    }
    for &(i, t) in &[(96usize, 40usize), (45, 33), (0, 5)] {
        let x = rand_vec(t * i, 51, 1.0);
        let os = [70usize, 0, 32, 7];
        let ws: Vec<Vec<f32>> = os
            .iter()
            .enumerate()
            .map(|(k, &o)| rand_vec(o * i, 52 + k as u64, 1.0))
            .collect();
        let srcs: Vec<_> = ws.iter().map(|wv| bf16_source(wv)).collect();
        let outs: Vec<(usize, &WeightBf16)> = os
            .iter()
            .zip(&srcs)
            .map(|(&o, f)| (o, f as &WeightBf16))
            .collect();
        let many = linear_forward_multi(i, t, &x, &outs);
        for (k, &(o, w)) in outs.iter().enumerate() {
            let one = linear_forward_new(o, i, t, &x, w);
            assert_eq!(
                many[k].iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                one.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "output {k} (o {o}, i {i}, t {t})"
            );
        }
    }
}

/// A bf16 weight whose input-gradient writer is the trait's default
/// (through its elements, any column range), announced as its own: the
/// products take the paths of a weight with a writer.
struct WithWriter<'a>(&'a (dyn Fn(usize, &mut [u16]) + Sync));

impl WeightSource for WithWriter<'_> {
    fn elems(&self, start: usize, out: &mut [u16]) {
        (self.0)(start, out)
    }
    fn has_rows_interleaved(&self) -> bool {
        true
    }
}

/// The column groups (A too big for a core's L2: each thread packs a
/// group of panels and runs all of A's rows through them; see `groups`)
/// give bit for bit what one task per panel gives: both accumulate every
/// output's k-steps in the same order in f32 tiles. Pools of 1-3 threads
/// (group sizes differ with the thread count), shapes with partial row
/// blocks, partial forward panels, W's rows off the 32 grid, a LoRA term
/// (the input gradient's extra k-steps), weights with and without their
/// own writers; one shape also against the bf16 reference.
#[test]
fn group_products_equal_one_task_per_panel_bit_for_bit() {
    use std::sync::atomic::Ordering;
    if skip_without_tiles("the tile kernels were") {
        return;
    }
    let pool = |n: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .expect("pool")
    };
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    // (o, i, t, r, (forward, input gradient) in groups with 2 threads):
    // groups need A packed >= 512 KiB
    // and enough panels; the rest take the row split (forward: few
    // panels; input gradient: i off the 32 grid); o = 1100 is off the 32
    // grid, o = 2500 takes two passes of W's rows
    for &(o, i, t, r, grouped) in &[
        (1600usize, 1344usize, 393usize, 0usize, (true, true)),
        (1100, 1536, 480, 19, (true, true)),
        (2500, 1120, 400, 40, (true, true)),
        (1200, 1100, 480, 0, (true, false)),
        (70, 1400, 353, 0, (false, false)),
        (45, 4200, 390, 5, (false, false)),
    ] {
        let kp = round_up(i, 32);
        let wv = rand_vec(o * i, 61, 1.0);
        let x = rand_vec(t * i, 62, 1.0);
        let dy = rand_vec(t * o, 63, 1.0);
        let init = rand_vec(t * i, 64, 1.0);
        let dxa = rand_vec(t * r, 65, 1.0);
        let la: Vec<u16> = rand_vec(r * i, 66, 0.1)
            .iter()
            .map(|v| bf16_bits(*v))
            .collect();
        let closure = bf16_source(&wv);
        let with_writer = WithWriter(&closure);
        let mp = round_up(t, 32);
        let uses_groups = pool(2).install(|| {
            let fwd = groups::group_size(mp * kp * 2, o.div_ceil(32), 64 * kp);
            let bwd = groups::group_size(mp * round_up(o, 32) * 2, i / 32, 64 * o.min(2048));
            (fwd.is_some(), bwd.is_some() && i.is_multiple_of(32))
        });
        assert_eq!(uses_groups, grouped, "{o}x{i}x{t}: groups");
        let run = |n: usize, off: bool, src: &WeightBf16| {
            groups::GROUPS_OFF.store(off, Ordering::SeqCst);
            let got = pool(n).install(|| {
                let y = linear_forward_new(o, i, t, &x, src);
                let mut dx = init.clone();
                linear_backward(o, i, t, &dy, &mut dx, src);
                let fresh = if r > 0 {
                    let term = InputUpTerm {
                        dxa: &dxa,
                        a: &la,
                        r,
                    };
                    linear_backward_up(o, i, t, &dy, None, src, term).expect("fresh")
                } else {
                    linear_backward_new(o, i, t, &dy, src)
                };
                (y, dx, fresh)
            });
            groups::GROUPS_OFF.store(false, Ordering::SeqCst);
            got
        };
        for (name, src) in [
            ("closure", &closure as &WeightBf16),
            ("writer", &with_writer),
        ] {
            let (y1, dx1, f1) = run(1, true, src);
            for n in [1, 2, 3] {
                let (y, dx, f) = run(n, false, src);
                let what = format!("{name} {o}x{i}x{t} r {r}, {n} threads");
                assert_eq!(bits(&y), bits(&y1), "forward {what}");
                assert_eq!(bits(&dx), bits(&dx1), "input gradient {what}");
                assert_eq!(bits(&f), bits(&f1), "fresh input gradient {what}");
            }
            if o == 70 {
                assert_forward_matches_bf16_reference(&x, &wv, &y1, t, i, o, "forward reference");
            }
        }
    }
}

#[test]
fn row_interleave_matches_the_plain_loop() {
    for &(cols, stride) in &[(16usize, 32usize), (2048, 96), (576, 1024), (48, 40)] {
        let even: Vec<u16> = (0..cols as u16).collect();
        let odd: Vec<u16> = (0..cols as u16).map(|v| v ^ 0x8000).collect();
        let len = (cols / 16 - 1) * stride + 32;
        let mut want = vec![7u16; len];
        let mut got = vec![7u16; len];
        backward::interleave_rows_ref(&even, &odd, &mut want, stride);
        backward::interleave_rows(&even, &odd, &mut got, stride);
        assert_eq!(got, want, "cols {cols} stride {stride}");
        assert_eq!(&want[..4], &[0, 0x8000, 1, 1 ^ 0x8000]);
        if cols >= 32 {
            assert_eq!(
                &want[stride..stride + 4],
                &[16, 16 ^ 0x8000, 17, 17 ^ 0x8000]
            );
        }
    }
}

/// [`linear_forward_lora`]: each module's `x·Aᵀ` made inside the input's
/// pack equals its own pass ([`crate::ops::skinny::nn`]) bit for bit (kept
/// ones are returned as given), and each output is the base product plus
/// its module's up-projection `bf16(xa)·bf16(s·Bᵀ)` as extra k-steps: within
/// f32 summation of the f64 sum over both (several modules sharing the
/// extra k-steps, ranks above and below 16, rank 0, kept and made `xa`,
/// inputs masked in the pack's hook (dropout) for some modules,
/// column and row splits, 1-3 threads, the same bits for every thread
/// count).
#[test]
fn lora_forward_adds_the_up_projection_in_the_products() {
    use crate::ops::fastmath::Isa;
    use crate::ops::skinny;
    if skip_without_tiles("the tile kernels were") {
        return;
    }
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    type Case = (usize, usize, &'static [(usize, usize, bool)]);
    // (i, t, [(o, r, kept)])
    let cases: &[Case] = &[
        (
            576,
            100,
            &[(576, 16, false), (192, 8, true), (192, 0, false)],
        ),
        (1100, 480, &[(1200, 16, false), (70, 33, false)]),
        (45, 7, &[(33, 3, false), (20, 5, true)]),
        (64, 40, &[(96, 16, false), (64, 16, false), (32, 16, false)]),
    ];
    for (n, &(i, t, mods)) in cases.iter().enumerate() {
        let seed = 900 + 10 * n as u64;
        let x = rand_vec(t * i, seed, 1.0);
        let ws: Vec<Vec<f32>> = mods
            .iter()
            .enumerate()
            .map(|(k, &(o, _, _))| rand_vec(o * i, seed + 1 + k as u64, 0.3))
            .collect();
        let srcs: Vec<_> = ws.iter().map(|wv| bf16_source(wv)).collect();
        let outs: Vec<(usize, &WeightBf16)> = mods
            .iter()
            .zip(&srcs)
            .map(|(&(o, _, _), f)| (o, f as &WeightBf16))
            .collect();
        let ats: Vec<Vec<f32>> = mods
            .iter()
            .enumerate()
            .map(|(k, &(_, r, _))| {
                skinny::pack_transposed(&rand_vec(r * i, seed + 20 + k as u64, 0.3), r, i, 1.0)
            })
            .collect();
        let ps: Vec<Vec<f32>> = mods
            .iter()
            .enumerate()
            .map(|(k, &(o, r, _))| {
                skinny::pack_transposed(&rand_vec(o * r, seed + 40 + k as u64, 0.3), o, r, 2.0)
            })
            .collect();
        // odd modules drop their input (a mask of their own: every third
        // element by row and module zeroed, the rest scaled), made in the
        // pack's hook one row group at a time
        let masked = |k: usize| k % 2 == 1;
        let masks: Vec<Box<crate::ops::amx::RowMask>> = (0..mods.len())
            .map(|k| {
                Box::new(move |row: usize, src: &[f32], dst: &mut [f32]| {
                    for (c, (d, v)) in dst.iter_mut().zip(src).enumerate() {
                        *d = if (row + c + k).is_multiple_of(3) {
                            0.0
                        } else {
                            v * 1.25
                        };
                    }
                }) as Box<crate::ops::amx::RowMask>
            })
            .collect();
        // x·Aᵀ by its own pass over the (masked) input, or kept
        let want_xa: Vec<Vec<f32>> = mods
            .iter()
            .enumerate()
            .map(|(k, &(_, r, kept))| {
                if kept {
                    rand_vec(t * r, seed + 60 + k as u64, 1.0)
                } else {
                    let mut xin = x.clone();
                    if masked(k) {
                        for (row, (s, d)) in x.chunks(i).zip(xin.chunks_mut(i)).enumerate() {
                            masks[k](row, s, d);
                        }
                    }
                    let mut xa = vec![0f32; t * r];
                    skinny::nn(Isa::best(), t, r, i, &xin, i, &ats[k], &mut xa, r, false);
                    xa
                }
            })
            .collect();
        // per output, the f64 sum of each element and of its terms' magnitudes
        let want: Vec<Vec<(f64, f64)>> = mods
            .iter()
            .enumerate()
            .map(|(k, &(o, r, _))| {
                let ldp = skinny::padded(o);
                let mut w = vec![(0f64, 0f64); t * o];
                for row in 0..t {
                    for c in 0..o {
                        let (mut sum, mut mag) = (0f64, 0f64);
                        for kk in 0..i {
                            let v = bf(x[row * i + kk]) * bf(ws[k][c * i + kk]);
                            (sum, mag) = (sum + v, mag + v.abs());
                        }
                        for j in 0..r {
                            let v = bf(want_xa[k][row * r + j]) * bf(ps[k][j * ldp + c]);
                            (sum, mag) = (sum + v, mag + v.abs());
                        }
                        w[row * o + c] = (sum, mag);
                    }
                }
                w
            })
            .collect();
        let mut first: Option<Vec<Vec<f32>>> = None;
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("pool");
            let terms: Vec<Option<LoraTerm>> = mods
                .iter()
                .enumerate()
                .map(|(k, &(o, r, kept))| {
                    Some(LoraTerm {
                        kept: kept.then(|| want_xa[k].clone()),
                        at: &ats[k],
                        ldat: skinny::padded(r),
                        r,
                        p: &ps[k],
                        ldp: skinny::padded(o),
                        mask: masked(k).then(|| &*masks[k]),
                    })
                })
                .collect();
            let (ys, xas) = pool.install(|| linear_forward_lora(i, t, &x, &outs, terms));
            for k in 0..mods.len() {
                let what = format!("case {n} output {k}, {threads} threads");
                let xa = xas[k].as_ref().expect("a LoRA module's x·Aᵀ");
                assert_eq!(bits(xa), bits(&want_xa[k]), "x·Aᵀ {what}");
                let worst = worst_vs_f32_summation(&ys[k], &want[k]);
                assert!(worst <= 1.0, "y {what}: {worst} of the f32 summation bound");
            }
            match &first {
                None => first = Some(ys),
                Some(f) => {
                    for k in 0..mods.len() {
                        assert_eq!(
                            bits(&ys[k]),
                            bits(&f[k]),
                            "case {n} output {k}: {threads} threads"
                        );
                    }
                }
            }
        }
    }
}

/// `init + dy·W + dxa·A` (`[t, i]`) over the bf16-rounded operands, as f64
/// sums of each element and of its terms' magnitudes (for
/// [`worst_vs_f32_summation`]); `(o, i, t, r)`: W `[o, i]`, A `[r, i]`.
fn input_gradient_with_term_f64(
    init: &[f32],
    dy: &[f32],
    wv: &[f32],
    dxa: &[f32],
    af: &[f32],
    (o, i, t, r): (usize, usize, usize, usize),
) -> Vec<(f64, f64)> {
    let mut want = vec![(0f64, 0f64); t * i];
    for row in 0..t {
        for c in 0..i {
            let (mut sum, mut mag) = (init[row * i + c] as f64, init[row * i + c].abs() as f64);
            for k in 0..o {
                let v = bf(dy[row * o + k]) * bf(wv[k * i + c]);
                (sum, mag) = (sum + v, mag + v.abs());
            }
            for j in 0..r {
                let v = bf(dxa[row * r + j]) * bf(af[j * i + c]);
                (sum, mag) = (sum + v, mag + v.abs());
            }
            want[row * i + c] = (sum, mag);
        }
    }
    want
}

/// [`linear_backward_up`]: the input gradient plus a LoRA module's term
/// `bf16(dxa)·bf16(A)` as extra k-steps of the products, against the f64
/// sum over both within f32 summation, added into a gradient and into a
/// fresh one (the same bits as into zeros), on the column split, the row
/// split and two weight chunks, ranks 16, 7 and 40, 1-3 threads.
#[test]
fn lora_input_gradient_term_in_the_products_matches_the_f64_sum() {
    if skip_without_tiles("the tile kernels were") {
        return;
    }
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    // (o, i, t, r): column split; row split (dy >= 1 MiB packed); two
    // chunks of weight rows (o·i > CHUNK_ELEMS) on the row split; tiny.
    for (n, &(o, i, t, r)) in [
        (70usize, 96usize, 40usize, 16usize),
        (1100, 100, 480, 7),
        (2500, 1100, 400, 16),
        (33, 45, 7, 40),
    ]
    .iter()
    .enumerate()
    {
        let seed = 1300 + 10 * n as u64;
        let wv = rand_vec(o * i, seed, 1.0);
        let w = bf16_source(&wv);
        let dy = rand_vec(t * o, seed + 1, 1.0);
        let init = rand_vec(t * i, seed + 2, 1.0);
        let dxa = rand_vec(t * r, seed + 3, 2.0);
        let af = rand_vec(r * i, seed + 4, 0.5);
        let a: Vec<u16> = af.iter().map(|v| bf16_bits(*v)).collect();
        let up = InputUpTerm {
            dxa: &dxa,
            a: &a,
            r,
        };
        let want = input_gradient_with_term_f64(&init, &dy, &wv, &dxa, &af, (o, i, t, r));
        let mut first: Option<(Vec<f32>, Vec<f32>)> = None;
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("pool");
            let mut added = init.clone();
            pool.install(|| linear_backward_up(o, i, t, &dy, Some(&mut added), &w, up));
            let fresh = pool
                .install(|| linear_backward_up(o, i, t, &dy, None, &w, up))
                .expect("a fresh gradient");
            let mut zeros = vec![0f32; t * i];
            pool.install(|| linear_backward_up(o, i, t, &dy, Some(&mut zeros), &w, up));
            assert_eq!(
                bits(&fresh),
                bits(&zeros),
                "{o}x{i}x{t} r {r}: fresh vs into zeros"
            );
            let worst = worst_vs_f32_summation(&added, &want);
            assert!(
                worst <= 1.0,
                "{o}x{i}x{t} r {r}, {threads} threads: {worst} of the bound"
            );
            match &first {
                None => first = Some((added, fresh)),
                Some(f) => assert!(
                    bits(&f.0) == bits(&added) && bits(&f.1) == bits(&fresh),
                    "{o}x{i}x{t} r {r}: {threads} threads differ"
                ),
            }
        }
    }
}

/// The input gradient written into a fresh buffer (zero tiles to start,
/// no zeroed buffer to load) equals the product added into zeros, bit for
/// bit, with and without a low-rank term: column and row splits, two
/// weight chunks, partial blocks, an empty K, 1-3 threads.
#[test]
fn fresh_input_gradient_equals_the_product_into_zeros_bit_for_bit() {
    if skip_without_tiles("the tile kernels were") {
        return;
    }
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    for (n, &(o, i, t, r)) in [
        (70usize, 96usize, 40usize, 16usize),
        (1100, 100, 480, 0),
        (2500, 1100, 400, 16),
        (33, 45, 7, 3),
        (0, 64, 32, 2),
    ]
    .iter()
    .enumerate()
    {
        let seed = 1100 + 10 * n as u64;
        let wv = rand_vec(o * i, seed, 1.0);
        let w = bf16_source(&wv);
        let dy = rand_vec(t * o, seed + 1, 1.0);
        let dxa = rand_vec(t * r, seed + 2, 2.0);
        let a: Vec<u16> = rand_vec(r * i, seed + 3, 0.5)
            .iter()
            .map(|v| bf16_bits(*v))
            .collect();
        let up = InputUpTerm {
            dxa: &dxa,
            a: &a,
            r,
        };
        let mut want = vec![0f32; t * i];
        linear_backward(o, i, t, &dy, &mut want, &w);
        assert!(o == 0 || want.iter().any(|v| *v != 0.0));
        let mut want_up = vec![0f32; t * i];
        if o > 0 {
            linear_backward_up(o, i, t, &dy, Some(&mut want_up), &w, up);
        }
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("pool");
            let got = pool.install(|| linear_backward_new(o, i, t, &dy, &w));
            assert_eq!(bits(&got), bits(&want), "{o}x{i}x{t}, {threads} threads");
            if o > 0 {
                let got = pool
                    .install(|| linear_backward_up(o, i, t, &dy, None, &w, up))
                    .expect("a fresh gradient");
                assert_eq!(
                    bits(&got),
                    bits(&want_up),
                    "{o}x{i}x{t} r {r} with the LoRA term, {threads} threads"
                );
            }
        }
    }
}

/// A 4-bit weight with its own writer of interleaved rows
/// ([`WeightSource::rows_interleaved`]) straight from the codes.
struct Nf4Source<'a>(&'a qlora_quant::Quantized4);

impl WeightSource for Nf4Source<'_> {
    fn elems(&self, start: usize, out: &mut [u16]) {
        self.0
            .dequantize_range::<half::bf16>(start, bytemuck::cast_slice_mut(out))
    }
    fn has_rows_interleaved(&self) -> bool {
        true
    }
    fn rows_interleaved(
        &self,
        _width: usize,
        rows: std::ops::Range<usize>,
        cols: std::ops::Range<usize>,
        out: &mut [u16],
        stride: usize,
    ) {
        self.0.dequantize_rows_interleaved_bf16_cols(
            rows.start,
            rows.len(),
            cols.start,
            cols.len(),
            out,
            stride,
        )
    }
    fn forward_panel(&self, _cols: usize, r0: usize, nr: usize, ksteps: usize, out: &mut [u16]) {
        self.0
            .dequantize_rows_as_tile_columns_bf16(r0, nr, ksteps, out)
    }
}

/// Products through a 4-bit weight's own writer (the input gradient's tiles
/// from interleaved rows) equal the ones through its bf16 elements, bit for
/// bit: row and column splits, several weight chunks, odd row counts, widths
/// off the 16 grid (the writer unused), the trait's default writer, fresh
/// and accumulating, 1-3 threads (and the forward, which reads elements).
#[test]
fn weight_writers_give_the_same_products_bit_for_bit() {
    use qlora_quant::{quantize_4bit, Input, QuantOptions, QuantType};
    if skip_without_tiles("the tile kernels were") {
        return;
    }
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    for (n, &(o, i, t, qt)) in [
        (70usize, 96usize, 40usize, QuantType::Nf4),
        (1101, 128, 480, QuantType::Fp4),
        (2500, 1104, 400, QuantType::Nf4),
        (33, 48, 7, QuantType::Nf4),
        (64, 40, 50, QuantType::Nf4),
        (96, 576, 512, QuantType::Nf4),
        (64, 2048, 520, QuantType::Nf4),
    ]
    .iter()
    .enumerate()
    {
        let seed = 1300 + 10 * n as u64;
        let wv = rand_vec(o * i, seed, 1.0);
        let opts = QuantOptions {
            quant_type: qt,
            ..Default::default()
        };
        let q = quantize_4bit(Input::F32(&wv), &[o, i], &opts).expect("quantize");
        let w = |s: usize, out: &mut [u16]| {
            q.dequantize_range::<half::bf16>(s, bytemuck::cast_slice_mut(out))
        };
        // the trait's default writers, through the elements
        struct Defaults<'a>(&'a (dyn Fn(usize, &mut [u16]) + Sync));
        impl WeightSource for Defaults<'_> {
            fn elems(&self, start: usize, out: &mut [u16]) {
                (self.0)(start, out)
            }
            fn has_rows_interleaved(&self) -> bool {
                true
            }
        }
        let nf4 = Nf4Source(&q);
        let defaults = Defaults(&w);
        let x = rand_vec(t * i, seed + 3, 1.0);
        let dy = rand_vec(t * o, seed + 1, 1.0);
        let dx0 = rand_vec(t * i, seed + 2, 1.0);
        let want_y = linear_forward_new(o, i, t, &x, &w);
        let mut want = dx0.clone();
        linear_backward(o, i, t, &dy, &mut want, &w);
        let want_new = linear_backward_new(o, i, t, &dy, &w);
        for (name, src) in [("4-bit", &nf4 as &WeightBf16), ("defaults", &defaults)] {
            for threads in [1, 2, 3] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .expect("pool");
                let what = format!("{name} {o}x{i}x{t}, {threads} threads");
                let y = pool.install(|| linear_forward_new(o, i, t, &x, src));
                assert_eq!(bits(&y), bits(&want_y), "forward {what}");
                let mut got = dx0.clone();
                pool.install(|| linear_backward(o, i, t, &dy, &mut got, src));
                assert_eq!(bits(&got), bits(&want), "input gradient {what}");
                let got = pool.install(|| linear_backward_new(o, i, t, &dy, src));
                assert_eq!(bits(&got), bits(&want_new), "fresh input gradient {what}");
            }
        }
    }
}

/// [`linear_backward_lora`]: a LoRA module's `dxa = s·dy·B` and
/// `dB = s·dyᵀ·xa` from the packed `dy` (the parity products for `dB`),
/// against f64 sums over the bf16-rounded operands within f32 summation,
/// and the input gradient with the term `bf16(dxa)·A`; ranks below, at and
/// above one and two 16-row tiles, `t` and `o` off the tile sizes (an odd
/// count of 32-column blocks), `dy` in one chunk and in several, the
/// column split, the row split and groups; into `dx` and fresh (the same
/// bits as into zeros), the same bits on 1-3 threads.
#[test]
fn lora_dy_products_on_the_tiles_match_the_f64_sums() {
    if skip_without_tiles("the tile kernels were") {
        return;
    }
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    for (n, &(o, i, t, r)) in [
        (70usize, 96usize, 40usize, 16usize),
        (1100, 100, 480, 7),
        (33, 45, 7, 40),
        (96, 64, 300, 33),
        (5632, 32, 129, 8),
        (1024, 1024, 256, 16),
    ]
    .iter()
    .enumerate()
    {
        let seed = 1700 + 10 * n as u64;
        let wv = rand_vec(o * i, seed, 1.0);
        let w = bf16_source(&wv);
        let dy = rand_vec(t * o, seed + 1, 1.0);
        let init = rand_vec(t * i, seed + 2, 1.0);
        let b = rand_vec(o * r, seed + 3, 0.5);
        let xa = rand_vec(t * r, seed + 4, 2.0);
        let af = rand_vec(r * i, seed + 5, 0.5);
        let a: Vec<u16> = af.iter().map(|v| bf16_bits(*v)).collect();
        let scale = 1.75f32;
        let lora = LowRankBackward {
            b: &b,
            scale,
            xa: &xa,
            a: &a,
            r,
        };
        // the 1-thread run's dx (added, fresh), dxa and dB
        let mut first: Option<[Vec<f32>; 4]> = None;
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("pool");
            let what = format!("{o}x{i}x{t} r {r}, {threads} threads");
            let mut added = init.clone();
            let (none, g) =
                pool.install(|| linear_backward_lora(o, i, t, &dy, Some(&mut added), &w, lora));
            assert!(none.is_none());
            let (fresh, _) = pool.install(|| linear_backward_lora(o, i, t, &dy, None, &w, lora));
            let fresh = fresh.expect("a fresh gradient");
            let mut zeros = vec![0f32; t * i];
            pool.install(|| linear_backward_lora(o, i, t, &dy, Some(&mut zeros), &w, lora));
            assert_eq!(bits(&fresh), bits(&zeros), "{what}: fresh vs into zeros");
            if let Some(f) = &first {
                assert!(
                    bits(&f[0]) == bits(&added)
                        && bits(&f[1]) == bits(&fresh)
                        && bits(&f[2]) == bits(&g.dxa)
                        && bits(&f[3]) == bits(&g.db),
                    "{what}: differs from 1 thread"
                );
                continue;
            }
            assert_eq!((g.dxa.len(), g.db.len()), (t * r, o * r), "{what}: sizes");
            // dxa = Σ_k bf(dy)·bf(s·B), dB = s·Σ_t bf(dy)·bf(xa)
            let mut want_dxa = vec![(0f64, 0f64); t * r];
            let mut want_db = vec![(0f64, 0f64); o * r];
            for row in 0..t {
                for k in 0..o {
                    let d = bf(dy[row * o + k]);
                    for j in 0..r {
                        let v = d * bf(b[k * r + j] * scale);
                        let e = &mut want_dxa[row * r + j];
                        *e = (e.0 + v, e.1 + v.abs());
                        let v = d * bf(xa[row * r + j]) * scale as f64;
                        let e = &mut want_db[k * r + j];
                        *e = (e.0 + v, e.1 + v.abs());
                    }
                }
            }
            let worst = worst_vs_f32_summation(&g.dxa, &want_dxa);
            assert!(worst <= 1.0, "{what}: dxa {worst} of the bound");
            let worst = worst_vs_f32_summation(&g.db, &want_db);
            assert!(worst <= 1.0, "{what}: dB {worst} of the bound");
            // dx = init + dy·W + bf16(dxa)·A
            let want = input_gradient_with_term_f64(&init, &dy, &wv, &g.dxa, &af, (o, i, t, r));
            let worst = worst_vs_f32_summation(&added, &want);
            assert!(worst <= 1.0, "{what}: dx {worst} of the bound");
            first = Some([added, fresh, g.dxa, g.db]);
        }
    }
}

/// [`linear_backward_swiglu_pair`]: SwiGLU's backward made and packed per
/// row group inside the gate/up input gradient is bit for bit
/// `swiglu::backward`, then the gate's [`linear_backward_lora`] into a
/// fresh gradient and the up's into it (or the plain input gradient for a
/// module without LoRA): `dx` and both modules' `dxa`, `dB`; ranks in one
/// and two k-steps, different ranks in the same k-steps, no LoRA, the row
/// split and groups, one and several chunks of rows, 1-3 threads.
#[test]
fn swiglu_pair_equals_swiglu_then_both_input_gradients_bit_for_bit() {
    if skip_without_tiles("the tile kernels were") {
        return;
    }
    assert!(swiglu_pair_fits(Some(7), Some(32)) && swiglu_pair_fits(None, None));
    assert!(!swiglu_pair_fits(Some(16), None) && !swiglu_pair_fits(Some(16), Some(33)));
    assert!(!swiglu_pair_fits(Some(0), Some(0)));
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    for (n, &(o, i, t, rg, ru)) in [
        (96usize, 64usize, 40usize, Some(16usize), Some(16usize)),
        (1100, 100, 480, Some(7), Some(16)),
        (70, 96, 300, None, None),
        (1024, 1024, 256, Some(16), Some(16)),
        (33, 45, 7, Some(40), Some(33)),
    ]
    .iter()
    .enumerate()
    {
        let seed = 2100 + 10 * n as u64;
        let (wgv, wuv) = (rand_vec(o * i, seed, 1.0), rand_vec(o * i, seed + 1, 1.0));
        let (wg, wu) = (bf16_source(&wgv), bf16_source(&wuv));
        let dm = rand_vec(t * o, seed + 2, 1.0);
        let g = rand_vec(t * o, seed + 3, 3.0);
        let u = rand_vec(t * o, seed + 4, 2.0);
        let module = |r: Option<usize>, s: u64| {
            r.map(|r| {
                let a: Vec<u16> = rand_vec(r * i, s, 0.5)
                    .iter()
                    .map(|v| bf16_bits(*v))
                    .collect();
                (
                    rand_vec(o * r, s + 1, 0.5),
                    rand_vec(t * r, s + 2, 2.0),
                    a,
                    r,
                )
            })
        };
        let (mg, mu) = (module(rg, seed + 10), module(ru, seed + 20));
        type Module = (Vec<f32>, Vec<f32>, Vec<u16>, usize);
        fn low(m: &Option<Module>) -> Option<LowRankBackward<'_>> {
            m.as_ref().map(|(b, xa, a, r)| LowRankBackward {
                b,
                scale: 2.0,
                xa,
                a,
                r: *r,
            })
        }
        let (lg, lu) = (low(&mg), low(&mu));
        let (dg, du) = crate::ops::swiglu::backward(&dm, &g, &u);
        let (mut want, want_g) = match lg {
            Some(l) => {
                let (dx, gr) = linear_backward_lora(o, i, t, &dg, None, &wg, l);
                (dx.expect("fresh"), Some(gr))
            }
            None => (linear_backward_new(o, i, t, &dg, &wg), None),
        };
        let want_u = match lu {
            Some(l) => Some(linear_backward_lora(o, i, t, &du, Some(&mut want), &wu, l).1),
            None => {
                linear_backward(o, i, t, &du, &mut want, &wu);
                None
            }
        };
        let grads_bits =
            |gr: &Option<LowRankGrads>| gr.as_ref().map(|g| (bits(&g.dxa), bits(&g.db)));
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("pool");
            let (dx, gg, gu) = pool
                .install(|| linear_backward_swiglu_pair(o, i, t, &dm, &g, &u, &wg, &wu, lg, lu));
            let what = format!("{o}x{i}x{t} ranks {rg:?}/{ru:?}, {threads} threads");
            assert_eq!(bits(&dx), bits(&want), "{what}: dx");
            assert_eq!(
                grads_bits(&gg),
                grads_bits(&want_g),
                "{what}: gate's dxa, dB"
            );
            assert_eq!(grads_bits(&gu), grads_bits(&want_u), "{what}: up's dxa, dB");
        }
    }
}
