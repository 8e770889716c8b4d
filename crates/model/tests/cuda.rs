//! The CUDA backend's kernels against the CPU backend (the reference) on random
//! inputs, forward and backward (the whole model: cuda_model.rs). Needs a GPU: each GPU test prints why it skips where there
//! is none (set QLORA_REQUIRE_GPU=1 to make that a failure instead).
//!
//! `kernels_compile_to_ptx_for_sm90` needs only libnvrtc (no GPU): CI runs it
//! with the PyPI wheel's library (QLORA_REQUIRE_NVRTC=1 makes a missing
//! libnvrtc a failure there).
//!
//! Tolerances. The CUDA GEMMs of the frozen linears take bf16 operands (as the
//! QLoRA recipe does: bnb dequantizes to bf16 and multiplies in bf16 with f32
//! accumulation); the CPU reference multiplies the same weights in f32. bf16
//! keeps 8 significant bits, unit round-off u = 2^-9 ≈ 1.95e-3, so each product
//! carries a relative error ≤ 2u (both operands rounded) and a sum of products
//! of random signs a relative L2 error of about 2u ≈ 4e-3 at worst: the linear
//! checks allow 1e-2 relative L2 (a wrong index or a transposed operand gives
//! O(1)). Kernels that stay in f32 (norms, RoPE, SwiGLU, attention, LoRA,
//! AdamW) differ from the CPU only by summation order / libm: 1e-5 .. 1e-4.
#![cfg(feature = "cuda")]

mod cuda_support;

use std::sync::Arc;

use half::bf16;
use qlora_model::backend::cpu::CpuBackend;
use qlora_model::backend::cuda::{self, CudaBackend};
use qlora_model::backend::{AdamWStep, Backend, LoraOp};
use qlora_model::ops::attention::AttnShape;
use qlora_model::ops::linear::{FrozenLinear, FrozenWeight};
use qlora_model::Device;
use qlora_quant::{Absmax, DType, DoubleQuant, QuantType, Quantized4};

use cuda_support::{gpu, rand_vec, rel_l2};

#[test]
fn kernels_compile_to_ptx_for_sm90() {
    if let Some(why) = cuda::nvrtc_missing() {
        if std::env::var("QLORA_REQUIRE_NVRTC").as_deref() == Ok("1") {
            panic!("QLORA_REQUIRE_NVRTC=1 but {why}");
        }
        eprintln!("SKIP (no NVRTC): {why}");
        return;
    }
    let ptx = cuda::compile_kernels("compute_90").unwrap();
    assert_eq!(ptx.len(), cuda::KERNEL_SOURCES.len());
    for (file, p) in &ptx {
        let src = p.to_src();
        let names = cuda::KERNELS
            .iter()
            .find(|(f, _)| f == file)
            .map(|(_, n)| *n)
            .unwrap();
        for n in names {
            assert!(
                src.contains(&format!(".entry {n}(")),
                "{file}: no PTX entry for kernel {n}"
            );
        }
        assert!(
            src.contains(".target sm_90"),
            "{file}: not compiled for sm_90"
        );
    }
}

#[test]
fn device_parsing_and_no_gpu_error_is_clean() {
    assert_eq!("cpu".parse::<Device>().unwrap(), Device::Cpu);
    assert_eq!("cuda".parse::<Device>().unwrap(), Device::Cuda(0));
    assert_eq!("CUDA:3".parse::<Device>().unwrap(), Device::Cuda(3));
    assert!("cuda:x".parse::<Device>().is_err());
    assert!("tpu".parse::<Device>().is_err());
    if let Some(why) = cuda::cuda_unavailable() {
        // Without a GPU, opening one is an error that says so (not a panic).
        let err = CudaBackend::new(0).unwrap_err().to_string();
        assert!(err.contains("no CUDA GPU found"), "{err}");
        eprintln!("(no GPU here: {why})");
    }
}

/// A random NF4 double-quantized weight `[rows, cols]`, bnb layout.
fn random_q4(rows: usize, cols: usize, seed: u64, dtype: DType) -> Quantized4 {
    let n = rows * cols;
    let bs = 64;
    let nb = n.div_ceil(bs);
    let bytes: Vec<u8> = rand_vec(n.div_ceil(2), seed, 1.0)
        .iter()
        .map(|v| ((v + 1.0) * 127.9) as u8)
        .collect();
    let codes: Vec<u8> = rand_vec(nb, seed + 1, 1.0)
        .iter()
        .map(|v| ((v + 1.0) * 127.9) as u8)
        .collect();
    let nested_map: Vec<f32> = (0..256).map(|i| (i as f32 - 127.5) / 128.0).collect();
    let nested_absmax: Vec<f32> = rand_vec(nb.div_ceil(256), seed + 2, 0.01)
        .iter()
        .map(|v| v.abs() + 0.01)
        .collect();
    let q = Quantized4 {
        quant_type: QuantType::Nf4,
        blocksize: bs,
        shape: vec![rows, cols],
        dtype,
        packed: bytes,
        absmax: Absmax::Double(DoubleQuant {
            codes,
            nested_absmax,
            nested_map,
            offset: 0.02,
            nested_blocksize: 256,
        }),
    };
    q.validate().unwrap();
    q
}

fn linears(o: usize, i: usize) -> Vec<(&'static str, FrozenLinear)> {
    let f32w = rand_vec(o * i, 7, 0.1);
    let bf: Vec<bf16> = f32w.iter().map(|v| bf16::from_f32(*v)).collect();
    let mk = |w: FrozenWeight, bias: Option<Vec<f32>>| FrozenLinear {
        out_features: o,
        in_features: i,
        weight: w,
        bias,
        compute: Default::default(),
        bf16_copy: Default::default(),
    };
    vec![
        (
            "f32+bias",
            mk(FrozenWeight::F32(Arc::new(f32w)), Some(rand_vec(o, 8, 0.5))),
        ),
        ("bf16", mk(FrozenWeight::BF16(Arc::new(bf)), None)),
        (
            "nf4-dq-bf16",
            mk(
                FrozenWeight::Quant(Arc::new(random_q4(o, i, 9, DType::BF16))),
                None,
            ),
        ),
        (
            "nf4-dq-f16",
            mk(
                FrozenWeight::Quant(Arc::new(random_q4(o, i, 10, DType::F16))),
                None,
            ),
        ),
    ]
}

#[test]
fn frozen_linear_forward_and_input_gradient_match_cpu() {
    let Some(g) = gpu() else { return };
    let c = CpuBackend;
    let (t, o, i) = (37, 96, 160);
    for (name, lin) in linears(o, i) {
        let x = rand_vec(t * i, 11, 1.0);
        let dy = rand_vec(t * o, 12, 1.0);
        let dx0 = rand_vec(t * i, 13, 1.0);
        let wc = c.prepare_linear(&lin).unwrap();
        let wg = g.prepare_linear(&lin).unwrap();
        let yc = c.linear_forward(&wc, &x, t).unwrap();
        let yg = g
            .download(&g.linear_forward(&wg, &g.upload(&x).unwrap(), t).unwrap())
            .unwrap();
        let e = rel_l2(&yg, &yc);
        assert!(e < 1e-2, "{name}: forward rel L2 {e}");
        let mut dxc = dx0.clone();
        c.linear_backward_input(&wc, &dy, t, &mut dxc).unwrap();
        let mut dxg = g.upload(&dx0).unwrap();
        g.linear_backward_input(&wg, &g.upload(&dy).unwrap(), t, &mut dxg)
            .unwrap();
        let e = rel_l2(&g.download(&dxg).unwrap(), &dxc);
        assert!(e < 1e-2, "{name}: input gradient rel L2 {e}");
    }
}

/// The 4-bit dequantization itself is exact: a one-hot input reads one weight
/// column back through the bf16 GEMM (the value is bf16 already, so exact).
#[test]
fn nf4_dequantization_is_bnb_exact() {
    let Some(g) = gpu() else { return };
    let (o, i) = (64, 128);
    let q = random_q4(o, i, 21, DType::BF16);
    let mut dense = vec![0f32; o * i];
    q.dequantize_rows_f32(0, o, &mut dense);
    let lin = FrozenLinear {
        out_features: o,
        in_features: i,
        weight: FrozenWeight::Quant(Arc::new(q)),
        bias: None,
        compute: Default::default(),
        bf16_copy: Default::default(),
    };
    let wg = g.prepare_linear(&lin).unwrap();
    // x = identity rows: y[r, :] = column r of W = W[:, r].
    let t = i;
    let mut x = vec![0f32; t * i];
    for r in 0..t {
        x[r * i + r] = 1.0;
    }
    let y = g
        .download(&g.linear_forward(&wg, &g.upload(&x).unwrap(), t).unwrap())
        .unwrap();
    for r in 0..t {
        for c in 0..o {
            assert_eq!(y[r * o + c], dense[c * i + r], "W[{c},{r}]");
        }
    }
}

#[test]
fn norms_rope_swiglu_match_cpu() {
    let Some(g) = gpu() else { return };
    let c = CpuBackend;
    let (t, h) = (19, 200);
    let x = rand_vec(t * h, 1, 2.0);
    let w = rand_vec(h, 2, 1.0);
    let (yc, rc) = c.rmsnorm_forward(&x, &w, 1e-5).unwrap();
    let (yg, rg) = g
        .rmsnorm_forward(&g.upload(&x).unwrap(), &g.upload(&w).unwrap(), 1e-5)
        .unwrap();
    assert!(rel_l2(&g.download(&yg).unwrap(), &yc) < 1e-6);
    assert!(rel_l2(&g.download(&rg).unwrap(), &rc) < 1e-6);
    let dy = rand_vec(t * h, 3, 1.0);
    let dx0 = rand_vec(t * h, 4, 1.0);
    let mut dxc = dx0.clone();
    c.rmsnorm_backward_add(&dy, &x, &w, &rc, &mut dxc).unwrap();
    let mut dxg = g.upload(&dx0).unwrap();
    g.rmsnorm_backward_add(
        &g.upload(&dy).unwrap(),
        &g.upload(&x).unwrap(),
        &g.upload(&w).unwrap(),
        &rg,
        &mut dxg,
    )
    .unwrap();
    assert!(rel_l2(&g.download(&dxg).unwrap(), &dxc) < 1e-5);

    let (heads, d) = (4, 16);
    let q = rand_vec(t * heads * d, 5, 1.0);
    let cos = rand_vec(t * d / 2, 6, 1.0);
    let sin = rand_vec(t * d / 2, 7, 1.0);
    for inverse in [false, true] {
        let mut qc = q.clone();
        c.rope(&mut qc, heads, d, &cos, &sin, inverse).unwrap();
        let mut qg = g.upload(&q).unwrap();
        g.rope(
            &mut qg,
            heads,
            d,
            &g.upload(&cos).unwrap(),
            &g.upload(&sin).unwrap(),
            inverse,
        )
        .unwrap();
        assert!(
            rel_l2(&g.download(&qg).unwrap(), &qc) < 1e-6,
            "rope {inverse}"
        );
    }

    let n = 5000;
    let (gv, uv, dm) = (
        rand_vec(n, 8, 6.0),
        rand_vec(n, 9, 2.0),
        rand_vec(n, 10, 1.0),
    );
    let mc = c.swiglu_forward(&gv, &uv).unwrap();
    let (gg, ug) = (g.upload(&gv).unwrap(), g.upload(&uv).unwrap());
    let mg = g.swiglu_forward(&gg, &ug).unwrap();
    assert!(rel_l2(&g.download(&mg).unwrap(), &mc) < 1e-5);
    let (dgc, duc) = c.swiglu_backward(&dm, &gv, &uv).unwrap();
    let (dgg, dug) = g
        .swiglu_backward(&g.upload(&dm).unwrap(), &gg, &ug)
        .unwrap();
    assert!(rel_l2(&g.download(&dgg).unwrap(), &dgc) < 1e-5);
    assert!(rel_l2(&g.download(&dug).unwrap(), &duc) < 1e-5);
}

#[test]
fn attention_forward_backward_match_cpu() {
    let Some(g) = gpu() else { return };
    let c = CpuBackend;
    // GQA 8 query heads over 2 kv heads; plain causal, packed segments, sliding window,
    // and a long row (more keys than one 128-key tile).
    for (b, s, window, packed) in [
        (2, 33, None, false),
        (2, 40, None, true),
        (1, 50, Some(7), false),
        (1, 300, None, false),
    ] {
        let (heads, kv_heads, d) = (8, 2, 32);
        let sh = AttnShape {
            b,
            q_len: s,
            k_len: s,
            q_offset: 0,
            heads,
            kv_heads,
            d,
            window,
            bf16: false,
        };
        let q = rand_vec(b * s * heads * d, 1, 1.0);
        let k = rand_vec(b * s * kv_heads * d, 2, 1.0);
        let v = rand_vec(b * s * kv_heads * d, 3, 1.0);
        let dout = rand_vec(b * s * heads * d, 4, 1.0);
        let seg: Option<Vec<u32>> =
            packed.then(|| (0..b * s).map(|p| ((p % s) / 13) as u32).collect());
        let (oc, pc) = c.attention_forward(&sh, &q, &k, &v, seg.as_ref()).unwrap();
        let (qg, kg, vg) = (
            g.upload(&q).unwrap(),
            g.upload(&k).unwrap(),
            g.upload(&v).unwrap(),
        );
        let segg = seg.as_ref().map(|s| g.upload_ids(s).unwrap());
        let (og, lse) = g
            .attention_forward(&sh, &qg, &kg, &vg, segg.as_ref())
            .unwrap();
        let e = rel_l2(&g.download(&og).unwrap(), &oc);
        assert!(
            e < 1e-5,
            "b{b} s{s} {window:?} {packed}: forward rel L2 {e}"
        );
        let (dqc, dkc, dvc) = c
            .attention_backward(&sh, &q, &k, &v, &oc, &pc, seg.as_ref(), &dout)
            .unwrap();
        let (dqg, dkg, dvg) = g
            .attention_backward(
                &sh,
                &qg,
                &kg,
                &vg,
                &og,
                &lse,
                segg.as_ref(),
                &g.upload(&dout).unwrap(),
            )
            .unwrap();
        for (name, gg, cc) in [("dq", dqg, dqc), ("dk", dkg, dkc), ("dv", dvg, dvc)] {
            let e = rel_l2(&g.download(&gg).unwrap(), &cc);
            assert!(e < 1e-4, "b{b} s{s} {window:?} {packed}: {name} rel L2 {e}");
        }
    }
}

#[test]
fn kv_cached_attention_matches_cpu() {
    let Some(g) = gpu() else { return };
    let c = CpuBackend;
    let (past, new, heads, kv_heads, d) = (20, 3, 4, 2, 16);
    let sh = AttnShape {
        b: 1,
        q_len: new,
        k_len: past + new,
        q_offset: past,
        heads,
        kv_heads,
        d,
        window: None,
        bf16: false,
    };
    let q = rand_vec(new * heads * d, 1, 1.0);
    let k = rand_vec((past + new) * kv_heads * d, 2, 1.0);
    let v = rand_vec((past + new) * kv_heads * d, 3, 1.0);
    let (oc, _) = c.attention_forward(&sh, &q, &k, &v, None).unwrap();
    let (og, _) = g
        .attention_forward(
            &sh,
            &g.upload(&q).unwrap(),
            &g.upload(&k).unwrap(),
            &g.upload(&v).unwrap(),
            None,
        )
        .unwrap();
    assert!(rel_l2(&g.download(&og).unwrap(), &oc) < 1e-5);
}

#[test]
fn lora_forward_backward_with_dropout_match_cpu() {
    let Some(g) = gpu() else { return };
    let c = CpuBackend;
    let (t, i, o, r) = (21, 48, 40, 8);
    let (a, b) = (rand_vec(r * i, 1, 0.3), rand_vec(o * r, 2, 0.3));
    let x = rand_vec(t * i, 3, 1.0);
    let y0 = rand_vec(t * o, 4, 1.0);
    let dy = rand_vec(t * o, 5, 1.0);
    let dx0 = rand_vec(t * i, 6, 1.0);
    let (ag, bg) = (g.upload(&a).unwrap(), g.upload(&b).unwrap());
    // Rows at other places of a larger batch (data-parallel ranks): masks by position.
    let rows: Vec<usize> = (0..t).map(|r| r * 3 + 1).collect();
    let rows_g = g
        .upload_ids(&rows.iter().map(|&r| r as u32).collect::<Vec<_>>())
        .unwrap();
    for (dropout, masked) in [(0.0f32, false), (0.3, false), (0.3, true)] {
        let opc = LoraOp::<CpuBackend> {
            a: &a,
            b: &b,
            r,
            in_features: i,
            out_features: o,
            scale: 2.0,
            dropout,
            dropout_key: 0xABCDEF,
            mask_rows: masked.then_some(&rows[..]),
            mask_ids: None,
        };
        let opg = LoraOp::<CudaBackend> {
            a: &ag,
            b: &bg,
            r,
            in_features: i,
            out_features: o,
            scale: 2.0,
            dropout,
            dropout_key: 0xABCDEF,
            mask_rows: masked.then_some(&rows[..]),
            mask_ids: masked.then_some(&rows_g),
        };
        let mut yc = y0.clone();
        let xac = c.lora_forward(&opc, &x, t, &mut yc).unwrap();
        let (xg, mut yg) = (g.upload(&x).unwrap(), g.upload(&y0).unwrap());
        let xag = g.lora_forward(&opg, &xg, t, &mut yg).unwrap();
        assert!(
            rel_l2(&g.download(&yg).unwrap(), &yc) < 1e-5,
            "y p={dropout}"
        );
        assert!(
            rel_l2(&g.download(&xag).unwrap(), &xac) < 1e-5,
            "xa p={dropout}"
        );
        let mut dxc = dx0.clone();
        let (dac, dbc) = c.lora_backward(&opc, &x, &xac, &dy, t, &mut dxc).unwrap();
        let mut dxg = g.upload(&dx0).unwrap();
        let (dag, dbg) = g
            .lora_backward(&opg, &xg, &xag, &g.upload(&dy).unwrap(), t, &mut dxg)
            .unwrap();
        assert!(
            rel_l2(&g.download(&dag).unwrap(), &dac) < 1e-5,
            "dA p={dropout}"
        );
        assert!(
            rel_l2(&g.download(&dbg).unwrap(), &dbc) < 1e-5,
            "dB p={dropout}"
        );
        assert!(
            rel_l2(&g.download(&dxg).unwrap(), &dxc) < 1e-5,
            "dx p={dropout}"
        );
    }
}

#[test]
fn chunked_cross_entropy_matches_cpu() {
    let Some(g) = gpu() else { return };
    let c = CpuBackend;
    let (b, s, h, vocab) = (3, 11, 64, 1000);
    let t = b * s;
    let head = FrozenLinear {
        out_features: vocab,
        in_features: h,
        weight: FrozenWeight::BF16(Arc::new(
            rand_vec(vocab * h, 1, 0.5)
                .iter()
                .map(|v| bf16::from_f32(*v))
                .collect(),
        )),
        bias: None,
        compute: Default::default(),
        bf16_copy: Default::default(),
    };
    let x = rand_vec(t * h, 2, 1.0);
    let mut labels: Vec<i64> = (0..t).map(|p| ((p * 37) % vocab) as i64).collect();
    labels[4] = -100;
    labels[15] = -100;
    let wc = c.prepare_linear(&head).unwrap();
    let wg = g.prepare_linear(&head).unwrap();
    let xg = g.upload(&x).unwrap();
    for den in [None, Some(17.0f32)] {
        let rc = c.cross_entropy(&wc, &x, &labels, s, den).unwrap();
        let rg = g.cross_entropy(&wg, &xg, &labels, s, den).unwrap();
        assert_eq!(rg.count, rc.count);
        // bf16 GEMM operands: logits carry ~4e-3 relative error (see the header).
        let e = (rg.sum - rc.sum).abs() / rc.sum;
        assert!(e < 1e-2, "loss {} vs {} (rel {e})", rg.sum, rc.sum);
        if den.is_some() {
            let e = rel_l2(&g.download(&rg.dx.unwrap()).unwrap(), &rc.dx.unwrap());
            assert!(e < 2e-2, "dx rel L2 {e}");
        }
    }
}

#[test]
fn adamw_and_norm_match_cpu() {
    let Some(g) = gpu() else { return };
    let c = CpuBackend;
    let n = 3001;
    let mut p = rand_vec(n, 1, 1.0);
    let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
    let (mut pg, mut mg, mut vg) = (
        g.upload(&p).unwrap(),
        g.zeros(n).unwrap(),
        g.zeros(n).unwrap(),
    );
    for step in 1..=5u64 {
        let grad = rand_vec(n, 10 + step, 0.1);
        let st = AdamWStep::new(1e-3, 0.9, 0.999, 1e-8, 0.01, step);
        c.adamw(&mut p, &grad, &mut m, &mut v, &st).unwrap();
        g.adamw(&mut pg, &g.upload(&grad).unwrap(), &mut mg, &mut vg, &st)
            .unwrap();
    }
    assert!(rel_l2(&g.download(&pg).unwrap(), &p) < 1e-6);
    let x = rand_vec(100_003, 3, 1.0);
    let (nc, ng) = (
        c.sq_norm(&x).unwrap(),
        g.sq_norm(&g.upload(&x).unwrap()).unwrap(),
    );
    assert!((nc - ng).abs() < 1e-9 * nc, "{nc} vs {ng}");
}
