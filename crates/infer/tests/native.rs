//! `--quant native` (a GGUF file's own blocks) against `--quant none` (the same file
//! dequantized to f32) on small llama GGUFs of every type it holds, written with
//! llama.cpp's reference quantizers (candle's port, `qlora_gguf::quantize`).

use std::path::{Path, PathBuf};

use qlora_gguf::llama::{hf_name, permute_rows};
use qlora_gguf::writer::GgufWriter;
use qlora_gguf::{GgmlType, MetaValue};
use qlora_model::ops::ggml::NATIVE_TYPES;
use qlora_model::ops::linear::FrozenWeight;
use qlora_model::{Batch, LoadOptions, Model, QuantMode};
use rand::{Rng, SeedableRng};

// hidden and intermediate sizes are multiples of 256 (K-quant blocks)
const V: usize = 96;
const H: usize = 256;
const I: usize = 512;
const HEADS: usize = 4;
const KV: usize = 2;
const D: usize = 64;
const L: usize = 2;

/// A 2-layer GQA llama GGUF whose matrices are all of type `ty` (norms F32), q/k rows
/// permuted as llama.cpp's converter writes them. Returns the file's path and the
/// number of bytes of its matrices.
fn write_gguf(dir: &Path, ty: GgmlType, tied: bool, seed: u64) -> (PathBuf, usize) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut w = GgufWriter::new();
    let tokens: Vec<MetaValue> = (0..V).map(|t| MetaValue::String(format!("t{t}"))).collect();
    w.meta("general.architecture", MetaValue::String("llama".into()))
        .meta("llama.embedding_length", MetaValue::U32(H as u32))
        .meta("llama.block_count", MetaValue::U32(L as u32))
        .meta("llama.feed_forward_length", MetaValue::U32(I as u32))
        .meta("llama.attention.head_count", MetaValue::U32(HEADS as u32))
        .meta("llama.attention.head_count_kv", MetaValue::U32(KV as u32))
        .meta("llama.rope.freq_base", MetaValue::F32(10000.0))
        .meta(
            "llama.attention.layer_norm_rms_epsilon",
            MetaValue::F32(1e-5),
        )
        .meta("llama.context_length", MetaValue::U32(512))
        .meta("tokenizer.ggml.tokens", MetaValue::Array(tokens));
    let mut matrix_bytes = 0;
    let mut add = |w: &mut GgufWriter, name: &str, shape: Vec<usize>, perm: Option<usize>| {
        let n: usize = shape.iter().product();
        let scale = if shape.len() == 1 { 0.2 } else { 0.08 };
        let mut data: Vec<f32> = (0..n)
            .map(|_| rng.random_range(-1.0f32..1.0) * scale)
            .collect();
        if shape.len() == 1 {
            data.iter_mut().for_each(|x| *x += 1.0);
        }
        if let Some(heads) = perm {
            data = permute_rows(&data, heads, D, shape[1]);
        }
        let t = if shape.len() == 1 { GgmlType::F32 } else { ty };
        let bytes = qlora_gguf::quantize::quantize(t, &data).unwrap();
        if shape.len() == 2 {
            matrix_bytes += bytes.len();
        }
        let dims: Vec<u64> = shape.iter().rev().map(|&x| x as u64).collect();
        assert!(hf_name(name).is_some(), "{name}");
        w.tensor(name, &dims, t, bytes);
    };
    add(&mut w, "token_embd.weight", vec![V, H], None);
    for b in 0..L {
        let n = |s: &str| format!("blk.{b}.{s}.weight");
        add(&mut w, &n("attn_norm"), vec![H], None);
        add(&mut w, &n("attn_q"), vec![HEADS * D, H], Some(HEADS));
        add(&mut w, &n("attn_k"), vec![KV * D, H], Some(KV));
        add(&mut w, &n("attn_v"), vec![KV * D, H], None);
        add(&mut w, &n("attn_output"), vec![H, HEADS * D], None);
        add(&mut w, &n("ffn_norm"), vec![H], None);
        add(&mut w, &n("ffn_gate"), vec![I, H], None);
        add(&mut w, &n("ffn_up"), vec![I, H], None);
        add(&mut w, &n("ffn_down"), vec![H, I], None);
    }
    add(&mut w, "output_norm.weight", vec![H], None);
    if !tied {
        add(&mut w, "output.weight", vec![V, H], None);
    }
    let p = dir.join(format!("tiny-{ty}-{tied}.gguf"));
    w.write(&p).unwrap();
    (p, matrix_bytes)
}

fn load(p: &Path, quant: QuantMode) -> Model {
    qlora_infer::load_gguf(p, &LoadOptions { quant }).unwrap()
}

fn batch(seed: u64) -> Batch {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    Batch::from_ids(
        (0..3)
            .map(|_| (0..20).map(|_| rng.random_range(0..V as u32)).collect())
            .collect(),
    )
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Every native type: the weights the native model multiplies by are bit-identical to
/// `--quant none`'s (the file dequantized by `qlora_gguf`, q/k rows unpermuted), so the
/// loss may differ only by f32 summation order (tiled vs whole products): we allow
/// 2e-6 relative (measured: at most a few 1e-7).
#[test]
fn native_equals_none_on_every_type() {
    let dir = tempfile::tempdir().unwrap();
    let b = batch(7);
    for (k, ty) in NATIVE_TYPES.into_iter().enumerate() {
        let tied = k % 2 == 0;
        let (p, matrix_bytes) = write_gguf(dir.path(), ty, tied, 100 + k as u64);
        let nat = load(&p, QuantMode::Native);
        let f32m = load(&p, QuantMode::None);
        for (ln, lf) in nat.layers.iter().zip(&f32m.layers) {
            for (a, b) in ln.linears.iter().zip(&lf.linears) {
                assert!(matches!(a.weight, FrozenWeight::Ggml(_)), "{ty}");
                assert_eq!(bits(&a.dense_f32()), bits(&b.dense_f32()), "{ty}");
            }
        }
        assert!(matches!(nat.embed_tokens, FrozenWeight::Ggml(_)), "{ty}");
        assert_eq!(
            bits(&nat.lm_head.dense_f32()),
            bits(&f32m.lm_head.dense_f32()),
            "{ty} lm_head"
        );
        // Memory: the matrices at their stored size, plus the q/k row maps and norms.
        let row_maps = L * (HEADS * D + KV * D) * 4;
        let norms = (2 * L + 1) * H * 4;
        assert_eq!(
            nat.weight_bytes(),
            matrix_bytes + row_maps + norms,
            "{ty} native bytes"
        );
        let (ln, nn) = nat.loss(&b, None).unwrap();
        let (lf, nf) = f32m.loss(&b, None).unwrap();
        assert_eq!(nn, nf);
        let (ln, lf) = (ln / nn as f64, lf / nf as f64);
        assert!(
            (ln - lf).abs() <= 2e-6 * lf.abs(),
            "{ty}: native loss {ln} vs none {lf}"
        );
        // a sane model: near-uniform predictions over V tokens
        assert!((lf - (V as f64).ln()).abs() < 1.0, "{ty}: loss {lf}");
    }
}

/// Gradients through a native base equal those through its f32 dequantization.
#[test]
fn native_input_gradients_follow_f32() {
    let dir = tempfile::tempdir().unwrap();
    let (p, _) = write_gguf(dir.path(), GgmlType::Q4_K, false, 3);
    let nat = load(&p, QuantMode::Native);
    let f32m = load(&p, QuantMode::None);
    let x: Vec<f32> = {
        let mut r = rand::rngs::StdRng::seed_from_u64(4);
        (0..5 * H).map(|_| r.random_range(-1.0f32..1.0)).collect()
    };
    for (a, b) in nat.layers[1].linears.iter().zip(&f32m.layers[1].linears) {
        if a.in_features != H {
            continue;
        }
        let ya = a.forward(&x, 5);
        let yb = b.forward(&x, 5);
        let maxd = ya
            .iter()
            .zip(&yb)
            .map(|(p, q)| (p - q).abs())
            .fold(0f32, f32::max);
        assert!(maxd < 1e-5, "forward {maxd}");
        let mut dxa = vec![0f32; 5 * H];
        let mut dxb = vec![0f32; 5 * H];
        a.backward_input(&ya, 5, &mut dxa);
        b.backward_input(&ya, 5, &mut dxb);
        let maxd = dxa
            .iter()
            .zip(&dxb)
            .map(|(p, q)| (p - q).abs())
            .fold(0f32, f32::max);
        assert!(maxd < 1e-5, "backward {maxd}");
    }
}

/// `--quant native` is for GGUF files only.
#[test]
fn native_refuses_folders() {
    let folder = qlora_testutil::fixture_str("tiny_llama/model");
    let e = qlora_infer::load(
        &folder,
        Some(QuantMode::Native),
        false,
        qlora_infer::NeedTokenizer::No,
    )
    .err()
    .expect("a folder with --quant native must be refused");
    let msg = format!("{e:#}");
    assert!(msg.contains("not a .gguf file"), "{msg}");
}
