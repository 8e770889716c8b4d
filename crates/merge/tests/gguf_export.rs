//! `export_gguf` end to end on tiny models: the written file read back by our own GGUF
//! loader must (a) equal, to float rounding, an in-memory model built from the same
//! merged + encoded + decoded weights in HF layout (catches any layout, naming,
//! permutation or metadata error, for every type), and (b) stay within the first-order
//! quantization error bound of the source model running the adapter unmerged.
//!
//! Bound of (b), derived rather than fitted: to first order the logit error is
//! Σ_i J_i·Δw_i over the encoded matrices i. Encoding errors of different tensors are
//! independent and zero-mean, so their contributions add in quadrature; a matrix whose
//! weights carry relative RMS error ε_i perturbs the signal through it by ≈ ε_i relative
//! (RMSNorm keeps the activations at unit scale, so there is no amplification beyond
//! that at first order). Hence rms(Δlogits) ≈ sqrt(Σ ε_i²)·rms(logits); the tests allow
//! twice that for the second-order terms (softmax, SiLU, products of errors). The ε_i are
//! measured per tensor by the exporter (‖decode(encode(w)) − w‖/‖w‖).

mod support;

use support::*;

#[test]
fn f16_and_q8_0_exports_of_the_fixture_match_source_plus_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_fixture(tmp.path());
    for ty in [ExportType::F16, ExportType::Q8_0] {
        let out = tmp.path().join(format!("tiny-{}.gguf", ty.as_str()));
        let c = export_and_check(&model, Some(&tiny_adapter()), &out, &ExportOptions::new(ty));
        assert_within_bounds(&c);
        assert_eq!(c.rep.merged_modules, 14);
        // The first-order estimate is not just an upper bound but the actual size of the
        // error (measured: 0.93× for f16, 0.95× for q8_0): a logit error far *below*
        // it would mean the check compared the source with itself.
        let estimate = quadrature_error(&c.rep) * c.source.ref_rms as f64;
        assert!(
            c.source.rms_diff as f64 >= 0.25 * estimate,
            "{ty:?}: {} vs first-order estimate {estimate}",
            c.source
        );
    }
}

#[test]
fn q4_0_and_q4_k_exports_stay_within_the_quantization_bound() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, adapter) = wide_model(tmp.path());
    for ty in [ExportType::Q4_0, ExportType::Q4K] {
        let out = tmp.path().join(format!("wide-{}.gguf", ty.as_str()));
        let c = export_and_check(&model, Some(&adapter), &out, &ExportOptions::new(ty));
        assert_within_bounds(&c);
        let types: HashMap<&str, GgmlType> = c
            .rep
            .tensors
            .iter()
            .map(|t| (t.name.as_str(), t.ggml_type))
            .collect();
        // Tied embedding = output projection: Q6_K (rows of 256 allow it).
        assert_eq!(types["token_embd.weight"], GgmlType::Q6_K);
        assert!(!types.contains_key("output.weight"));
        let base = if ty == ExportType::Q4K {
            GgmlType::Q4_K
        } else {
            GgmlType::Q4_0
        };
        assert_eq!(types["blk.1.ffn_down.weight"], base);
        assert_eq!(types["blk.0.attn_q.weight"], base);
        assert_eq!(types["blk.0.attn_norm.weight"], GgmlType::F32);
        // Not vacuous: 4-bit weights really are approximate.
        assert!(
            c.rep.max_rel_rms_error() > 0.05,
            "{}",
            c.rep.max_rel_rms_error()
        );
        assert!(c.source.max_abs_diff > 1e-3);
    }
    // The fixture (64-wide rows): Q4_K falls back to Q5_0, per tensor, and still checks out.
    let model = tiny_fixture(tmp.path());
    let out = tmp.path().join("tiny-q4_k.gguf");
    let c = export_and_check(
        &model,
        Some(&tiny_adapter()),
        &out,
        &ExportOptions::new(ExportType::Q4K),
    );
    assert_within_bounds(&c);
    let q = c
        .rep
        .tensors
        .iter()
        .find(|t| t.name == "blk.0.attn_q.weight")
        .unwrap();
    assert_eq!(q.ggml_type, GgmlType::Q5_0);
    assert!(q.fallback.as_deref().unwrap().contains("multiple of 256"));
    let out_t = c
        .rep
        .tensors
        .iter()
        .find(|t| t.name == "output.weight")
        .unwrap();
    assert_eq!(out_t.ggml_type, GgmlType::Q8_0, "Q6_K → Q8_0 fallback");
}

/// `--type q4_k_m` / `q5_k_m` on an 8-layer model with 256-wide rows: every tensor has
/// the type llama.cpp's recipe gives it (`llama_tensor_get_type_impl`, src/llama-quant.cpp:
/// attn_v and ffn_down of the layers where use_more_bits(i, 8) holds, i.e. 0, 3, 6, 7,
/// take Q6_K; the tied embedding, being the output, Q6_K), its bytes are those of the
/// reference quantizer (candle's port of ggml's quantize_row_*_ref) applied to the merged
/// weights in GGUF row order, and the file reads back within the quantization bound.
#[test]
fn q4_k_m_and_q5_k_m_follow_llama_cpps_recipe_byte_for_byte() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, adapter) = wide_model_layers(tmp.path(), 8);
    let src = SourceModel::open(&model).unwrap();
    let c = src.config().clone();
    let (_, ad) = qlora_lora::load_adapter(&adapter, Some(&c)).unwrap();
    for (ty, base, file_type) in [
        (ExportType::Q4KM, GgmlType::Q4_K, 15u32),
        (ExportType::Q5KM, GgmlType::Q5_K, 17),
    ] {
        let out = tmp.path().join(format!("wide8-{}.gguf", ty.as_str()));
        let ck = export_and_check(&model, Some(&adapter), &out, &ExportOptions::new(ty));
        assert_within_bounds(&ck);
        let f = GgufFile::open(&out).unwrap();
        assert_eq!(
            f.metadata().get("general.file_type"),
            Some(&MetaValue::U32(file_type))
        );
        let mut bumped = Vec::new();
        for hf in qlora_merge::source::expected_names(&c) {
            let g = qlora_gguf::llama::gguf_name(&hf).unwrap();
            let (shape, mut w) = src.tensor(&hf).unwrap();
            let layer: Option<usize> = g
                .strip_prefix("blk.")
                .map(|r| r.split('.').next().unwrap().parse().unwrap());
            let want = if shape.len() == 1 {
                GgmlType::F32
            } else if g == "token_embd.weight" {
                GgmlType::Q6_K
            } else if (g.ends_with("attn_v.weight") || g.ends_with("ffn_down.weight"))
                && [0, 3, 6, 7].contains(&layer.unwrap())
            {
                bumped.push(g.clone());
                GgmlType::Q6_K
            } else {
                base
            };
            let got = f.tensor_info(&g).unwrap().ggml_type;
            assert_eq!(got, want, "{ty:?} {g}");
            if let Some(l) = ad.get(hf.trim_end_matches(".weight")) {
                qlora_merge::add_delta(&mut w, l, ad.scaling() as f32).unwrap();
            }
            if hf.ends_with("q_proj.weight") {
                w = qlora_gguf::llama::permute_rows(&w, 4, 64, 256);
            } else if hf.ends_with("k_proj.weight") {
                w = qlora_gguf::llama::permute_rows(&w, 2, 64, 256);
            }
            let reference = qlora_gguf::quantize::quantize_reference(want, &w).unwrap();
            assert!(
                f.tensor_data(&g).unwrap() == reference.as_slice(),
                "{ty:?} {g}: bytes differ from the reference quantizer"
            );
        }
        assert_eq!(bumped.len(), 8, "{bumped:?}");
    }
}

#[test]
fn a_wrong_qk_permutation_fails_the_check() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_fixture(tmp.path());
    let out = tmp.path().join("noperm.gguf");
    let mut opts = ExportOptions::new(ExportType::F16);
    opts.skip_qk_permutation = true;
    let c = export_and_check(&model, Some(&tiny_adapter()), &out, &opts);
    let bound = 2.0 * quadrature_error(&c.rep) * c.source.ref_rms as f64;
    assert!(
        c.source.rms_diff as f64 > 10.0 * bound,
        "a model with HF-order q/k rows in a GGUF must fail the check: {}",
        c.source
    );
    assert!(c.exact.max_abs_diff > 1e-2, "{}", c.exact.max_abs_diff);
}

#[test]
fn bnb4_source_exports_and_checks() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("bnb");
    copy_dir(&fixtures().join("tiny_llama_bnb4/model"), &dir);
    write_tokenizer(&dir, 320);
    let out = tmp.path().join("bnb.gguf");
    let c = export_and_check(
        &dir,
        Some(&tiny_adapter()),
        &out,
        &ExportOptions::new(ExportType::F16),
    );
    assert_within_bounds(&c);
}

/// export-gguf with a PEFT DoRA adapter merges it first (`W' = m/‖W + s·B·A‖ ⊙ (W + s·B·A)`):
/// the file's logits equal the source running the DoRA adapter unmerged, within the f16
/// bound, and are far from the same A, B without the magnitudes (plain LoRA).
#[test]
fn f16_export_with_a_dora_adapter_matches_source_plus_dora() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_fixture(tmp.path());
    let adapter = qlora_testutil::dora_fixtures().join("adapter");
    let out = tmp.path().join("tiny-dora-f16.gguf");
    let c = export_and_check(
        &model,
        Some(&adapter),
        &out,
        &ExportOptions::new(ExportType::F16),
    );
    assert_within_bounds(&c);
    assert_eq!(c.rep.merged_modules, 14);
    let src = load_f32(&model).unwrap();
    let (_, mut plain) = qlora_lora::load_adapter(&adapter, Some(&src.config)).unwrap();
    plain.config.use_dora = false;
    plain.layers.values_mut().for_each(|w| w.magnitude = None);
    let vocab = src.config.vocab_size;
    let seqs = pseudo_random_ids(vocab, 2, 24, 1);
    let lora_logits = gguf_check::logits(&src, Some(&plain), &seqs).unwrap();
    let read_back = gguf_check::logits(&load_f32(&out).unwrap(), None, &seqs).unwrap();
    let vs_lora = compare(&lora_logits, &read_back, vocab, seqs.len());
    assert!(
        vs_lora.rms_diff > 10.0 * c.source.rms_diff,
        "DoRA export vs plain LoRA {vs_lora} / vs DoRA {}",
        c.source
    );
}
