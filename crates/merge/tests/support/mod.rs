//! What the GGUF export tests share: tiny and wide Llama models with a byte-level
//! tokenizer, random adapters, and the in-memory twin of an export with its error bound.
#![allow(dead_code)]

pub use std::collections::HashMap;
pub use std::path::{Path, PathBuf};

pub use qlora_gguf::{GgmlType, GgufFile, MetaValue};
pub use qlora_infer::check::{
    self as gguf_check, check_export, compare, load_f32, pseudo_random_ids,
};
pub use qlora_merge::{export_gguf, ExportOptions, ExportReport, ExportType, SourceModel};
pub use qlora_model::{LoadOptions, Model, QuantMode};
pub use qlora_testutil::fixtures;
pub use rand::{Rng, SeedableRng};

pub use qlora_testutil::gpt2_byte_chars as byte_chars;

pub const SPECIALS: [&str; 4] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"];

/// A SmolLM-style byte-level BPE tokenizer.json with exactly `vocab` (≥ 260) tokens:
/// 256 byte tokens, merges of letter pairs, 4 special tokens at the end.
pub fn write_tokenizer(dir: &Path, vocab: usize) {
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

pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// The fp32 tiny Llama fixture (hidden 64) plus a tokenizer, in a scratch folder.
pub fn tiny_fixture(tmp: &Path) -> PathBuf {
    let dir = tmp.join("tiny");
    copy_dir(&fixtures().join("tiny_llama/model"), &dir);
    write_tokenizer(&dir, 320);
    dir
}

pub fn tiny_adapter() -> PathBuf {
    fixtures().join("tiny_lora_adapter/adapter")
}

pub fn randn(r: &mut rand::rngs::StdRng, n: usize, std: f32, mean: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let u: f32 = r.random_range(1e-7..1.0);
            let v: f32 = r.random();
            mean + std * (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
        })
        .collect()
}

pub fn write_safetensors(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) {
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
pub fn wide_model(tmp: &Path) -> (PathBuf, PathBuf) {
    wide_model_layers(tmp, 2)
}

/// [`wide_model`] with `n_layers` layers.
pub fn wide_model_layers(tmp: &Path, n_layers: usize) -> (PathBuf, PathBuf) {
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
pub fn roundtrip_model(model: &Path, adapter: Option<&Path>, rep: &ExportReport) -> Model {
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
pub fn quadrature_error(rep: &ExportReport) -> f64 {
    rep.tensors
        .iter()
        .map(|t| t.rel_rms_error.powi(2))
        .sum::<f64>()
        .sqrt()
}

pub struct Checked {
    pub rep: ExportReport,
    /// vs the in-memory twin
    pub exact: gguf_check::CheckReport,
    /// vs the source + adapter, unmerged
    pub source: gguf_check::CheckReport,
}

pub fn export_and_check(
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

pub fn assert_within_bounds(c: &Checked) {
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

pub fn meta<'a>(f: &'a GgufFile, k: &str) -> &'a MetaValue {
    f.metadata().get(k).unwrap_or_else(|| panic!("missing {k}"))
}

pub fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}
