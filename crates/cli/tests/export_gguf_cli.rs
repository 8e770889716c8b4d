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
    let g = qlora()
        .args(["generate", "--model"])
        .arg(&out)
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
