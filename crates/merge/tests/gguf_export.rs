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

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use qlora_gguf::{GgmlType, GgufFile, MetaValue};
use qlora_merge::gguf_check::{self, check_export, compare, load_f32, pseudo_random_ids};
use qlora_merge::{export_gguf, ExportOptions, ExportReport, ExportType, SourceModel};
use qlora_model::{LoadOptions, Model, QuantMode};
use qlora_testutil::fixtures;
use rand::{Rng, SeedableRng};

/// GPT-2's byte → printable-char table (`bytes_to_unicode`).
fn byte_chars() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut out = vec![' '; 256];
    for (b, c) in bs.iter().zip(&cs) {
        out[*b as usize] = char::from_u32(*c).unwrap();
    }
    out
}

const SPECIALS: [&str; 4] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"];

/// A SmolLM-style byte-level BPE tokenizer.json with exactly `vocab` (≥ 260) tokens:
/// 256 byte tokens, merges of letter pairs, 4 special tokens at the end.
fn write_tokenizer(dir: &Path, vocab: usize) {
    let chars = byte_chars();
    let mut v = serde_json::Map::new();
    for (i, c) in chars.iter().enumerate() {
        v.insert(c.to_string(), i.into());
    }
    let letters: Vec<char> = "etaoinshrdlu".chars().collect();
    let mut merges = Vec::new();
    'outer: for a in &letters {
        for b in &letters {
            if 256 + merges.len() == vocab - SPECIALS.len() {
                break 'outer;
            }
            v.insert(format!("{a}{b}"), (256 + merges.len()).into());
            merges.push(format!("{a} {b}"));
        }
    }
    assert_eq!(256 + merges.len(), vocab - SPECIALS.len());
    let added: Vec<serde_json::Value> = SPECIALS
        .iter()
        .enumerate()
        .map(|(k, s)| {
            serde_json::json!({"id": vocab - 4 + k, "content": s, "single_word": false,
                "lstrip": false, "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let tj = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false, "vocab": v, "merges": merges}
    });
    std::fs::write(dir.join("tokenizer.json"), tj.to_string()).unwrap();
    let tc = serde_json::json!({
        "bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"}, "pad_token": "<|pad|>",
        "add_bos_token": false,
        "chat_template": "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    });
    std::fs::write(dir.join("tokenizer_config.json"), tc.to_string()).unwrap();
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// The fp32 tiny Llama fixture (hidden 64) plus a tokenizer, in a scratch folder.
fn tiny_fixture(tmp: &Path) -> PathBuf {
    let dir = tmp.join("tiny");
    copy_dir(&fixtures().join("tiny_llama/model"), &dir);
    write_tokenizer(&dir, 320);
    dir
}

fn tiny_adapter() -> PathBuf {
    fixtures().join("tiny_lora_adapter/adapter")
}

fn randn(r: &mut rand::rngs::StdRng, n: usize, std: f32, mean: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let u: f32 = r.random_range(1e-7..1.0);
            let v: f32 = r.random();
            mean + std * (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
        })
        .collect()
}

fn write_safetensors(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, d)| d.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((n, s, _), b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    let data = safetensors::tensor::serialize(views, None).unwrap();
    std::fs::write(path, data).unwrap();
}

/// A random tied-embedding Llama whose rows are 256 wide (so the K-quants apply
/// without fallback), 2 layers, GQA 2, head_dim 64, with a tokenizer; and a random
/// PEFT adapter (r 4, alpha 8, all seven projections) for it.
fn wide_model(tmp: &Path) -> (PathBuf, PathBuf) {
    wide_model_layers(tmp, 2)
}

/// [`wide_model`] with `n_layers` layers.
fn wide_model_layers(tmp: &Path, n_layers: usize) -> (PathBuf, PathBuf) {
    let dir = tmp.join(format!("wide{n_layers}"));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
        "intermediate_size": 512, "num_hidden_layers": n_layers, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 320, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "max_position_embeddings": 256, "tie_word_embeddings": true,
        "bos_token_id": 317, "eos_token_id": 318, "torch_dtype": "float32"
    });
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let c = qlora_config::ModelConfig::from_file(dir.join("config.json")).unwrap();
    let mut r = rand::rngs::StdRng::seed_from_u64(7);
    let mut tensors = Vec::new();
    for name in qlora_merge::source::expected_names(&c) {
        let shape = if name.ends_with("norm.weight") {
            vec![256]
        } else if name == "model.embed_tokens.weight" {
            vec![320, 256]
        } else {
            let short = name.trim_end_matches(".weight").rsplit('.').next().unwrap();
            let s = c
                .linear_shapes()
                .iter()
                .find(|(n, _)| *n == short)
                .unwrap()
                .1;
            s.to_vec()
        };
        let n: usize = shape.iter().product();
        let data = if shape.len() == 1 {
            randn(&mut r, n, 0.1, 1.0)
        } else {
            randn(&mut r, n, 0.08, 0.0)
        };
        tensors.push((name, shape, data));
    }
    write_safetensors(&dir.join("model.safetensors"), &tensors);
    write_tokenizer(&dir, 320);

    let ad = tmp.join(format!("wide{n_layers}_adapter"));
    std::fs::create_dir_all(&ad).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tiny_adapter().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    cfg["base_model_name_or_path"] = "wide".into();
    std::fs::write(ad.join("adapter_config.json"), cfg.to_string()).unwrap();
    let mut lora = Vec::new();
    for l in 0..n_layers {
        for (short, [o, i]) in c.linear_shapes() {
            let m = qlora_config::ModelConfig::linear_path(l, short);
            lora.push((
                format!("base_model.model.{m}.lora_A.weight"),
                vec![4, i],
                randn(&mut r, 4 * i, 1.0 / (i as f32).sqrt(), 0.0),
            ));
            lora.push((
                format!("base_model.model.{m}.lora_B.weight"),
                vec![o, 4],
                randn(&mut r, o * 4, 0.02, 0.0),
            ));
        }
    }
    write_safetensors(&ad.join("adapter_model.safetensors"), &lora);
    (dir, ad)
}

/// The in-memory twin of an export: source weights + merged delta, each matrix
/// encoded with the type the exporter chose and decoded again, in HF layout (no
/// permutation involved: the encoders work row by row, and the permutation only
/// moves whole rows).
fn roundtrip_model(model: &Path, adapter: Option<&Path>, rep: &ExportReport) -> Model {
    let src = SourceModel::open(model).unwrap();
    let c = src.config().clone();
    let ad = adapter.map(|d| qlora_lora::load_adapter(d, Some(&c)).unwrap().1);
    let types: HashMap<&str, GgmlType> = rep
        .tensors
        .iter()
        .map(|t| (t.name.as_str(), t.ggml_type))
        .collect();
    let mut tensors = Vec::new();
    for hf in qlora_merge::source::expected_names(&c) {
        let (shape, mut w) = src.tensor(&hf).unwrap();
        if let Some(a) = &ad {
            if let Some(l) = a.get(hf.trim_end_matches(".weight")) {
                qlora_merge::add_delta(&mut w, l, a.scaling() as f32).unwrap();
            }
        }
        let g = qlora_gguf::llama::gguf_name(&hf).unwrap();
        let ty = types[g.as_str()];
        let bytes = qlora_gguf::quantize::quantize_reference(ty, &w).unwrap();
        let back = qlora_gguf::dequant::dequantize(ty, &bytes, w.len()).unwrap();
        tensors.push((hf, shape, back));
    }
    Model::from_tensors(
        c,
        tensors,
        "roundtrip",
        &LoadOptions {
            quant: QuantMode::None,
        },
    )
    .unwrap()
}

/// sqrt(Σ ε_i²) over the encoded tensors (see the module docs).
fn quadrature_error(rep: &ExportReport) -> f64 {
    rep.tensors
        .iter()
        .map(|t| t.rel_rms_error.powi(2))
        .sum::<f64>()
        .sqrt()
}

struct Checked {
    rep: ExportReport,
    /// vs the in-memory twin
    exact: gguf_check::CheckReport,
    /// vs the source + adapter, unmerged
    source: gguf_check::CheckReport,
}

fn export_and_check(
    model: &Path,
    adapter: Option<&Path>,
    out: &Path,
    opts: &ExportOptions,
) -> Checked {
    let rep = export_gguf(model, adapter, out, opts).unwrap();
    let vocab = SourceModel::open(model).unwrap().config().vocab_size;
    let seqs = pseudo_random_ids(vocab, 2, 24, 1);
    let source = check_export(model, adapter, out, &seqs).unwrap();
    let twin = roundtrip_model(model, adapter, &rep);
    let twin_logits = gguf_check::logits(&twin, None, &seqs).unwrap();
    let read_back = gguf_check::logits(&load_f32(out).unwrap(), None, &seqs).unwrap();
    let exact = compare(&twin_logits, &read_back, vocab, seqs.len());
    eprintln!(
        "{} {:?}: vs source {source}; vs twin max {:.3e}; sqrt(Σε²) = {:.3e}",
        out.display(),
        rep.type_counts(),
        exact.max_abs_diff,
        quadrature_error(&rep)
    );
    Checked { rep, exact, source }
}

fn assert_within_bounds(c: &Checked) {
    // (a) layout: the read-back model is the in-memory twin, to float rounding.
    assert!(
        c.exact.max_abs_diff <= 1e-5,
        "read-back differs from the in-memory twin by {}",
        c.exact.max_abs_diff
    );
    // (b) quantization: first-order bound (module docs).
    let bound = 2.0 * quadrature_error(&c.rep) * c.source.ref_rms as f64;
    assert!(
        (c.source.rms_diff as f64) <= bound,
        "RMS logit error {} exceeds the first-order bound {bound}",
        c.source.rms_diff
    );
}

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

fn meta<'a>(f: &'a GgufFile, k: &str) -> &'a MetaValue {
    f.metadata().get(k).unwrap_or_else(|| panic!("missing {k}"))
}

#[test]
fn metadata_and_tokenizer_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_fixture(tmp.path());
    let out = tmp.path().join("meta.gguf");
    let mut opts = ExportOptions::new(ExportType::Q8_0);
    opts.name = Some("tiny test".into());
    export_gguf(&model, None, &out, &opts).unwrap();
    let f = GgufFile::open(&out).unwrap();
    assert_eq!(meta(&f, "general.architecture").as_str(), Some("llama"));
    assert_eq!(meta(&f, "general.name").as_str(), Some("tiny test"));
    assert_eq!(meta(&f, "general.file_type"), &MetaValue::U32(7));
    assert_eq!(meta(&f, "general.alignment"), &MetaValue::U32(32));
    assert_eq!(meta(&f, "llama.context_length"), &MetaValue::U32(128));
    assert_eq!(
        meta(&f, "llama.attention.head_count_kv"),
        &MetaValue::U32(2)
    );
    assert_eq!(meta(&f, "llama.rope.dimension_count"), &MetaValue::U32(16));
    assert_eq!(meta(&f, "llama.vocab_size"), &MetaValue::U32(320));
    assert_eq!(meta(&f, "llama.rope.freq_base"), &MetaValue::F32(10000.0));
    assert_eq!(
        meta(&f, "llama.attention.layer_norm_rms_epsilon"),
        &MetaValue::F32(1e-5)
    );
    // The config our loader derives from the file equals the source's where GGUF can say it.
    let src = qlora_config::ModelConfig::from_file(model.join("config.json")).unwrap();
    let back = qlora_gguf::llama::config_from_header(f.header()).unwrap();
    assert_eq!(
        (
            back.hidden_size,
            back.intermediate_size,
            back.num_hidden_layers
        ),
        (
            src.hidden_size,
            src.intermediate_size,
            src.num_hidden_layers
        )
    );
    assert_eq!(
        (
            back.num_attention_heads,
            back.num_key_value_heads,
            back.head_dim
        ),
        (
            src.num_attention_heads,
            src.num_key_value_heads,
            src.head_dim
        )
    );
    assert_eq!(
        (back.rms_norm_eps, back.rope_theta),
        (src.rms_norm_eps, src.rope_theta)
    );
    assert_eq!(back.rope_scaling, src.rope_scaling);
    assert_eq!(back.tie_word_embeddings, src.tie_word_embeddings);
    assert_eq!(back.max_position_embeddings, src.max_position_embeddings);
    // Tokenizer: same ids from the GGUF-rebuilt tokenizer as from tokenizer.json.
    assert_eq!(meta(&f, "tokenizer.ggml.model").as_str(), Some("gpt2"));
    assert_eq!(meta(&f, "tokenizer.ggml.pre").as_str(), Some("smollm"));
    assert_eq!(
        meta(&f, "tokenizer.ggml.bos_token_id"),
        &MetaValue::U32(317)
    );
    assert_eq!(
        meta(&f, "tokenizer.ggml.eos_token_id"),
        &MetaValue::U32(318)
    );
    assert_eq!(
        meta(&f, "tokenizer.ggml.padding_token_id"),
        &MetaValue::U32(319)
    );
    assert_eq!(
        meta(&f, "tokenizer.ggml.add_bos_token"),
        &MetaValue::Bool(false)
    );
    let types = meta(&f, "tokenizer.ggml.token_type").as_array().unwrap();
    assert_eq!(types.len(), 320);
    assert_eq!(types[0], MetaValue::I32(1));
    assert_eq!(types[318], MetaValue::I32(3));
    let hf = qlora_tokenizer::Tokenizer::from_folder(&model).unwrap();
    let gg = qlora_tokenizer::Tokenizer::from_gguf(&out).unwrap();
    for text in [
        "the rain in spain stays mainly 2024 times",
        "<|im_start|>hello there<|im_end|> ünïcödé\n\ttabs",
    ] {
        let a = hf.encode(text, false).unwrap();
        assert!(a.len() > 5);
        assert_eq!(gg.encode(text, false).unwrap(), a, "{text:?}");
    }
    assert!(meta(&f, "tokenizer.chat_template")
        .as_str()
        .unwrap()
        .contains("<|im_start|>"));

    // GGUF → GGUF: tokenizer.* and general.name copied verbatim, weights re-encoded.
    let out2 = tmp.path().join("meta2.gguf");
    let rep = export_gguf(&out, None, &out2, &ExportOptions::new(ExportType::F16)).unwrap();
    assert!(rep.tokenizer_source.starts_with("copied from"));
    let f2 = GgufFile::open(&out2).unwrap();
    for (k, v) in f.metadata().entries() {
        if k.starts_with("tokenizer.") || k == "general.name" {
            assert_eq!(f2.metadata().get(k), Some(v), "{k}");
        }
    }
    assert_eq!(meta(&f2, "general.file_type"), &MetaValue::U32(1));
    let seqs = pseudo_random_ids(320, 2, 16, 3);
    let c = check_export(&out, None, &out2, &seqs).unwrap();
    assert!(c.rms_diff <= 2e-3 * c.ref_rms, "{c}");
}

#[test]
fn llama3_rope_scaling_is_written_as_rope_freqs_and_read_back() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_fixture(tmp.path());
    let cfg_path = model.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["max_position_embeddings"] = 65536.into();
    cfg["rope_parameters"] = serde_json::json!({"rope_type": "llama3", "rope_theta": 500000.0,
        "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192});
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let src = qlora_config::ModelConfig::from_file(&cfg_path).unwrap();
    assert!(matches!(
        src.rope_scaling,
        qlora_config::RopeScaling::Llama3 { .. }
    ));
    let out = tmp.path().join("l3.gguf");
    let c = export_and_check(&model, None, &out, &ExportOptions::new(ExportType::F16));
    assert_within_bounds(&c);
    let g = qlora_gguf::llama::GgufModel::open(&out).unwrap();
    assert_eq!(g.config().rope_scaling, src.rope_scaling);
    assert_eq!(
        g.file().tensor_info("rope_freqs.weight").unwrap().shape(),
        vec![8]
    );
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

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn bad_inputs_are_clear_errors_and_leave_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_fixture(tmp.path());
    let (wide, wide_adapter) = wide_model(tmp.path());
    let outdir = tmp.path().join("out");
    std::fs::create_dir_all(&outdir).unwrap();
    let out = outdir.join("m.gguf");
    let opts = ExportOptions::new(ExportType::Q8_0);
    let err = |m: &Path, a: Option<&Path>, o: &Path, opts: &ExportOptions| {
        format!("{:#}", export_gguf(m, a, o, opts).unwrap_err())
    };

    // Adapter trained on another base (shapes differ).
    let e = err(&model, Some(&wide_adapter), &out, &opts);
    assert!(
        e.contains("does not fit the base model") && e.contains("different model"),
        "{e}"
    );
    let e = err(&wide, Some(&tiny_adapter()), &out, &opts);
    assert!(e.contains("does not fit the base model"), "{e}");
    // Adapter whose target names are not in the model (layer 5 of a 2-layer model).
    let odd = tmp.path().join("odd_adapter");
    copy_dir(&tiny_adapter(), &odd);
    let bytes = std::fs::read(odd.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut renamed = Vec::new();
    for (k, v) in st.tensors() {
        let d: Vec<f32> = v
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        renamed.push((k.replace("layers.1.", "layers.5."), v.shape().to_vec(), d));
    }
    write_safetensors(&odd.join("adapter_model.safetensors"), &renamed);
    let e = err(&model, Some(&odd), &out, &opts);
    assert!(
        e.contains("model.layers.5") && e.contains("not a projection layer"),
        "{e}"
    );
    // Missing files.
    let e = err(&tmp.path().join("nope"), None, &out, &opts);
    assert!(e.contains("nope") && e.contains("no such file"), "{e}");
    let no_tok = tmp.path().join("no_tok");
    copy_dir(&fixtures().join("tiny_llama/model"), &no_tok);
    let e = err(&no_tok, None, &out, &opts);
    assert!(e.contains("no tokenizer.json"), "{e}");
    let e = err(
        &model,
        Some(&tmp.path().join("missing_adapter")),
        &out,
        &opts,
    );
    assert!(e.contains("missing_adapter"), "{e}");
    let e = err(&model, None, &tmp.path().join("no/such/dir/m.gguf"), &opts);
    assert!(e.contains("does not exist"), "{e}");
    assert!(files_in(&outdir).is_empty(), "{:?}", files_in(&outdir));

    // Existing output without --force: refused, old file untouched.
    std::fs::write(&out, b"precious").unwrap();
    let e = err(&model, None, &out, &opts);
    assert!(e.contains("output exists") && e.contains("--force"), "{e}");
    assert_eq!(std::fs::read(&out).unwrap(), b"precious");
    // With --force it is replaced by a complete file.
    let mut forced = opts.clone();
    forced.force = true;
    export_gguf(&model, None, &out, &forced).unwrap();
    assert!(GgufFile::open(&out).is_ok());

    // The source itself as the output, even with --force.
    let e = err(&out, None, &out, &forced);
    assert!(e.contains("the source model itself"), "{e}");
    assert!(GgufFile::open(&out).is_ok());

    // A failure midway (a NaN in the last layer) leaves the old file and no temporary.
    let bad = tmp.path().join("bad");
    copy_dir(&model, &bad);
    let src = SourceModel::open(&model).unwrap();
    let mut tensors = Vec::new();
    for name in qlora_merge::source::expected_names(src.config()) {
        let (s, mut d) = src.tensor(&name).unwrap();
        if name == "model.layers.1.mlp.down_proj.weight" {
            d[17] = f32::NAN;
        }
        tensors.push((name, s, d));
    }
    write_safetensors(&bad.join("model.safetensors"), &tensors);
    let before = std::fs::read(&out).unwrap();
    let e = err(&bad, None, &out, &forced);
    assert!(
        e.contains("model.layers.1.mlp.down_proj.weight") && e.contains("non-finite"),
        "{e}"
    );
    assert_eq!(std::fs::read(&out).unwrap(), before);
    assert_eq!(files_in(&outdir), vec!["m.gguf".to_string()]);
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
