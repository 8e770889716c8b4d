//! `qlora export-gguf` end to end on the demo model (SmolLM2-135M-Instruct, Q4_1 GGUF,
//! tied embedding, 576-wide rows). Without the file the test prints SKIP and passes,
//! unless QLORA_REQUIRE_DEMO=1 (CI), where it fails.

mod common;
use common::{demo_gguf, qlora_cmd as qlora};

use qlora_gguf::{GgmlType, GgufFile};

#[test]
fn demo_exports_to_q4_k_with_fallbacks_checks_and_generates() {
    let Some(demo) = demo_gguf() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("demo-q4_k.gguf");
    let o = qlora()
        .args(["export-gguf", "--model"])
        .arg(&demo)
        .arg("--out")
        .arg(&out)
        .args(["--type", "q4_k"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(stdout.contains("read-back check"), "{stdout}");
    assert!(stdout.contains("fallback:"), "{stdout}");

    let src = GgufFile::open(&demo).unwrap();
    let f = GgufFile::open(&out).unwrap();
    let ty = |n: &str| f.tensor_info(n).unwrap().ggml_type;
    // 1536-wide ffn_down rows take Q4_K; 576-wide rows fall back to Q5_0; the tied
    // embedding (the output projection) wants Q6_K and falls back to Q8_0.
    assert_eq!(ty("blk.0.ffn_down.weight"), GgmlType::Q4_K);
    assert_eq!(ty("blk.0.attn_q.weight"), GgmlType::Q5_0);
    assert_eq!(ty("blk.29.ffn_up.weight"), GgmlType::Q5_0);
    assert_eq!(ty("token_embd.weight"), GgmlType::Q8_0);
    assert_eq!(ty("output_norm.weight"), GgmlType::F32);
    assert!(f.tensor_info("output.weight").is_err());
    assert_eq!(f.tensors().len(), src.tensors().len());
    // Tokenizer metadata copied verbatim.
    let mut n = 0;
    for (k, v) in src.metadata().entries() {
        if k.starts_with("tokenizer.") {
            assert_eq!(f.metadata().get(k), Some(v), "{k}");
            n += 1;
        }
    }
    assert!(n >= 8, "{n} tokenizer keys");

    // Our own generator runs on the export.
    assert_generates(&out);

    // Existing output without --force: refused, file untouched.
    let before = std::fs::read(&out).unwrap();
    let o = qlora()
        .args(["export-gguf", "--no-check", "--model"])
        .arg(&demo)
        .arg("--out")
        .arg(&out)
        .args(["--type", "f16"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("output exists") && e.contains("--force"), "{e}");
    assert_eq!(std::fs::read(&out).unwrap(), before);
}

/// `--type q4_k_m` / `q5_k_m` on the demo model (30 layers, 576-wide rows, tied
/// embedding): llama.cpp's recipe (`llama_tensor_get_type_impl`, src/llama-quant.cpp) gives
/// attn_v and ffn_down Q6_K in the layers where use_more_bits(i, 30) holds (0, 1, 2, 5, 8,
/// ..., 23, 26..29), the base type elsewhere, and the tied embedding (the output) Q6_K;
/// then the row-length fallbacks (576: Q6_K → Q8_0, Q4_K → Q5_0, Q5_K → Q5_1; ffn_down's
/// 1536-wide rows keep the K-quants). The bytes equal the reference quantizer's (candle's
/// port of ggml's `quantize_row_*_ref`) applied to the source weights in GGUF row order; the
/// export passes its read-back check and generates.
#[test]
fn demo_exports_to_q4_k_m_and_q5_k_m_with_llama_cpps_recipe() {
    let Some(demo) = demo_gguf() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let src = GgufFile::open(&demo).unwrap();
    let more = [0usize, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29];
    for (ty, base, fb) in [
        ("q4_k_m", GgmlType::Q4_K, GgmlType::Q5_0),
        ("q5_k_m", GgmlType::Q5_K, GgmlType::Q5_1),
    ] {
        let out = tmp.path().join(format!("demo-{ty}.gguf"));
        let mut cmd = qlora();
        cmd.args(["export-gguf", "--model"])
            .arg(&demo)
            .arg("--out")
            .arg(&out)
            .args(["--type", ty]);
        if ty == "q5_k_m" {
            cmd.arg("--no-check"); // one read-back check (q4_k_m) is enough for the test's time
        }
        let o = cmd.output().unwrap();
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success(),
            "{stdout}\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
        if ty == "q4_k_m" {
            assert!(stdout.contains("read-back check"), "{stdout}");
        }
        let f = GgufFile::open(&out).unwrap();
        assert_eq!(f.tensors().len(), src.tensors().len());
        for t in f.tensors() {
            let n = t.name.as_str();
            let layer: Option<usize> = n
                .strip_prefix("blk.")
                .map(|r| r.split('.').next().unwrap().parse().unwrap());
            let want = if t.dims.len() == 1 {
                GgmlType::F32
            } else if n == "token_embd.weight" {
                GgmlType::Q8_0 // Q6_K, 576-wide rows
            } else if n.ends_with("ffn_down.weight") {
                if more.contains(&layer.unwrap()) {
                    GgmlType::Q6_K
                } else {
                    base
                }
            } else if n.ends_with("attn_v.weight") && more.contains(&layer.unwrap()) {
                GgmlType::Q8_0 // Q6_K, 576-wide rows
            } else {
                fb
            };
            assert_eq!(t.ggml_type, want, "{ty} {n}");
        }
        // Bytes: the reference quantizer on the source's own weights (same row order), for
        // every tensor of a bumped and an unbumped layer and the embedding.
        let mut checked = 0;
        for t in f.tensors() {
            let n = t.name.as_str();
            if !(n.starts_with("blk.5.") || n.starts_with("blk.6.") || n == "token_embd.weight") {
                continue;
            }
            let s = src.tensor_info(n).unwrap();
            let w = qlora_gguf::dequant::dequantize(
                s.ggml_type,
                src.tensor_data(n).unwrap(),
                s.n_elements() as usize,
            )
            .unwrap();
            let reference = qlora_gguf::quantize::quantize_reference(t.ggml_type, &w).unwrap();
            assert!(
                f.tensor_data(n).unwrap() == reference.as_slice(),
                "{ty} {n}: bytes differ from the reference quantizer"
            );
            checked += 1;
        }
        assert_eq!(checked, 2 * 9 + 1);
        assert_generates(&out);
    }
}

/// `qlora generate` runs on the export `gguf` and writes some text.
fn assert_generates(gguf: &std::path::Path) {
    let g = qlora()
        .args(["generate", "--model"])
        .arg(gguf)
        .args([
            "--prompt",
            "The capital of France is",
            "--max-new-tokens",
            "4",
            "--quant",
            "none",
        ])
        .output()
        .unwrap();
    assert!(g.status.success(), "{}", String::from_utf8_lossy(&g.stderr));
    assert!(!String::from_utf8_lossy(&g.stdout).trim().is_empty());
}
