//! Model behaviour beyond the golden fixtures: KV cache, packing, loading errors,
//! quantization on load.

use qlora_config::ModelConfig;
use qlora_model::{Batch, LoadOptions, Model, QuantMode};
use qlora_testutil::fixtures;
use safetensors::SafeTensors;

fn tiny(quant: QuantMode) -> Model {
    Model::from_folder(fixtures().join("tiny_llama/model"), &LoadOptions { quant }).unwrap()
}

fn ids(n: usize, seed: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i * 37 + seed * 101 + 5) % 320)
        .collect()
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn kv_cache_steps_equal_the_full_forward() {
    let model = tiny(QuantMode::None);
    let toks = ids(12, 1);
    let full = model
        .forward_logits(&Batch::from_ids(vec![toks.clone()]), None)
        .unwrap();
    let full: Vec<f32> = full.into_vec();
    let v = 320;
    let mut cache = model.new_cache();
    let last = model.forward_step(&mut cache, &toks[..5], None).unwrap();
    assert!(max_abs(&last, &full[4 * v..5 * v]) < 1e-5);
    for p in 5..12 {
        let l = model
            .forward_step(&mut cache, &toks[p..p + 1], None)
            .unwrap();
        assert!(
            max_abs(&l, &full[p * v..(p + 1) * v]) < 1e-5,
            "position {p}"
        );
    }
    assert_eq!(cache.len(), 12);
    cache.clear();
    let again = model.forward_step(&mut cache, &toks[..5], None).unwrap();
    assert_eq!(again, last);
}

#[test]
fn packed_rows_with_segments_equal_separate_rows() {
    let model = tiny(QuantMode::None);
    let (a, b) = (ids(7, 2), ids(9, 3));
    let sep_a = model.loss(&Batch::from_ids(vec![a.clone()]), None).unwrap();
    let sep_b = model.loss(&Batch::from_ids(vec![b.clone()]), None).unwrap();
    let mut packed = Batch::from_ids(vec![[a.clone(), b.clone()].concat()]);
    packed.labels[0][7] = -100; // a's last position must not predict b's first token
    packed.position_ids = Some(vec![(0..7).chain(0..9).collect()]);
    packed.segment_ids = Some(vec![[vec![0; 7], vec![1; 9]].concat()]);
    let (s, n) = model.loss(&packed, None).unwrap();
    assert_eq!(n, sep_a.1 + sep_b.1);
    assert!(
        (s - (sep_a.0 + sep_b.0)).abs() < 1e-4,
        "{s} vs {}",
        sep_a.0 + sep_b.0
    );
    // Logits of the second example equal its standalone logits.
    let lp: Vec<f32> = model.forward_logits(&packed, None).unwrap().into_vec();
    let lb: Vec<f32> = model
        .forward_logits(&Batch::from_ids(vec![b]), None)
        .unwrap()
        .into_vec();
    assert!(max_abs(&lp[7 * 320..], &lb) < 1e-5);
}

#[test]
fn nf4_quantization_on_load_reproduces_the_bnb_checkpoint() {
    // bitsandbytes quantized the same f32 weights (NF4, double quant) into tiny_llama_bnb4.
    let ours = tiny(QuantMode::Nf4);
    let bnb = Model::from_folder(
        fixtures().join("tiny_llama_bnb4/model"),
        &LoadOptions::default(),
    )
    .unwrap();
    let mut worst = 0f32;
    for (l1, l2) in ours.layers.iter().zip(&bnb.layers) {
        for (a, b) in l1.linears.iter().zip(&l2.linears) {
            worst = worst.max(max_abs(&a.dense_f32(), &b.dense_f32()));
        }
    }
    // Rare ±1 nested-code differences (torch's f32 mean) move an absmax by one 8-bit step.
    assert!(worst < 1e-3, "dequantized weights differ by {worst}");
    let batch = Batch::from_ids(vec![ids(20, 4), ids(20, 5)]);
    let (s1, n) = ours.loss(&batch, None).unwrap();
    let (s2, _) = bnb.loss(&batch, None).unwrap();
    assert!(((s1 - s2) / n as f64).abs() < 1e-3);
    assert!(ours.weight_bytes() < tiny(QuantMode::None).weight_bytes());
}

/// The fixture tensors as (name, shape, f32) triples.
fn fixture_tensors() -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(fixtures().join("tiny_llama/model/model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| {
            let d = v
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (n, v.shape().to_vec(), d)
        })
        .collect()
}

fn config_with(edit: impl FnOnce(&mut serde_json::Value)) -> ModelConfig {
    let text = std::fs::read_to_string(fixtures().join("tiny_llama/model/config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    edit(&mut v);
    ModelConfig::from_json(&v, "config.json").unwrap()
}

fn load_err(config: ModelConfig, tensors: Vec<(String, Vec<usize>, Vec<f32>)>) -> String {
    let e = Model::from_tensors(
        config,
        tensors,
        "weights.safetensors",
        &LoadOptions {
            quant: QuantMode::None,
        },
    )
    .unwrap_err();
    format!("{e:#}")
}

#[test]
fn from_tensors_equals_from_folder() {
    let a = tiny(QuantMode::None);
    let b = Model::from_tensors(
        config_with(|_| {}),
        fixture_tensors(),
        "mem",
        &LoadOptions {
            quant: QuantMode::None,
        },
    )
    .unwrap();
    let batch = Batch::from_ids(vec![ids(10, 6)]);
    assert_eq!(a.loss(&batch, None).unwrap(), b.loss(&batch, None).unwrap());
}

#[test]
fn inconsistent_weights_are_errors_naming_the_mismatch() {
    let e = load_err(
        config_with(|v| v["num_hidden_layers"] = 3.into()),
        fixture_tensors(),
    );
    assert!(
        e.contains("weights.safetensors")
            && e.contains("num_hidden_layers = 3")
            && e.contains("2 layers"),
        "{e}"
    );
    let e = load_err(
        config_with(|v| v["vocab_size"] = 321.into()),
        fixture_tensors(),
    );
    assert!(
        e.contains("vocab_size 321") && e.contains("[320, 64]"),
        "{e}"
    );
    let mut t = fixture_tensors();
    t.retain(|(n, _, _)| n != "model.layers.1.mlp.up_proj.weight");
    let e = load_err(config_with(|_| {}), t);
    assert!(
        e.contains("missing tensor `model.layers.1.mlp.up_proj.weight`"),
        "{e}"
    );
    let e = load_err(
        config_with(|v| v["intermediate_size"] = 128.into()),
        fixture_tensors(),
    );
    assert!(
        e.contains("gate_proj.weight") && e.contains("[160, 64]") && e.contains("[128, 64]"),
        "{e}"
    );
    let mut t = fixture_tensors();
    t.retain(|(n, _, _)| n != "lm_head.weight");
    let e = load_err(config_with(|_| {}), t);
    assert!(
        e.contains("lm_head.weight") && e.contains("tie_word_embeddings"),
        "{e}"
    );
    let e = load_err(
        config_with(|v| v["model_type"] = "qwen2".into()),
        fixture_tensors(),
    );
    assert!(e.contains("q_proj.bias"), "{e}");
    // Bad batches are errors too.
    let m = tiny(QuantMode::None);
    let e = m
        .loss(&Batch::from_ids(vec![vec![1, 2, 999]]), None)
        .unwrap_err();
    assert!(format!("{e}").contains("999"));
    let mut b = Batch::from_ids(vec![vec![1, 2, 3]]);
    b.labels[0][1] = 400;
    assert!(m.loss(&b, None).is_err());
}

/// Pre-quantized weights go through `qlora-formats`' checked bnb reader: a
/// corrupt code table is an error naming the file and the tensor, and a source
/// that cannot hold bnb weights refuses a quant state instead of misreading it.
#[test]
fn bnb4_weights_are_read_by_the_checked_reader() {
    let src = fixtures().join("tiny_llama_bnb4/model");
    let tmp = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), tmp.path().join(e.file_name())).unwrap();
    }
    let file = tmp.path().join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let bad_key = "model.layers.1.mlp.up_proj.weight.quant_map";
    let mut owned: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    let t = owned.iter_mut().find(|t| t.0 == bad_key).unwrap();
    t.3[0..4].copy_from_slice(&0.5f32.to_le_bytes());
    let views: Vec<_> = owned
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    let meta = st_metadata(&bytes);
    std::fs::write(&file, safetensors::serialize(views, meta).unwrap()).unwrap();
    let e = format!(
        "{:#}",
        Model::from_folder(tmp.path(), &LoadOptions::default()).unwrap_err()
    );
    assert!(
        e.contains("model.safetensors") && e.contains(bad_key) && e.contains("code table"),
        "{e}"
    );

    let mut t = fixture_tensors();
    t.push((
        "model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4".into(),
        vec![4],
        vec![0.0; 4],
    ));
    let e = load_err(config_with(|_| {}), t);
    assert!(
        e.contains("weights.safetensors") && e.contains("bitsandbytes__nf4"),
        "{e}"
    );
}

fn st_metadata(bytes: &[u8]) -> Option<std::collections::HashMap<String, String>> {
    let (_, meta) = SafeTensors::read_metadata(bytes).unwrap();
    meta.metadata().clone()
}

#[test]
fn untied_and_tied_heads_and_missing_folder() {
    let e = Model::from_folder("/nonexistent/model", &LoadOptions::default()).unwrap_err();
    assert!(format!("{e:#}").contains("/nonexistent/model"));
    // Tied: lm_head taken from the embedding even if present in the file.
    let tied = Model::from_tensors(
        config_with(|v| v["tie_word_embeddings"] = true.into()),
        fixture_tensors(),
        "mem",
        &LoadOptions {
            quant: QuantMode::None,
        },
    )
    .unwrap();
    let untied = tiny(QuantMode::None);
    assert_eq!(tied.lm_head.dense_f32(), {
        let mut w = vec![0f32; 320 * 64];
        tied.embed_tokens.rows_f32(0, 320, 64, &mut w);
        w
    });
    assert_ne!(tied.lm_head.dense_f32(), untied.lm_head.dense_f32());
}

#[test]
fn kv_cache_with_adapter_equals_full_forward() {
    use qlora_lora::{Adapter, LoraConfig, LoraWeights, Matrix};
    use rand::{Rng, SeedableRng};
    let model = tiny(QuantMode::Bf16);
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let mut randn =
        |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-0.35f32..0.35)).collect() };
    let mut layers = std::collections::BTreeMap::new();
    for l in 0..2 {
        for (short, [o, i]) in model.config.linear_shapes() {
            let a = Matrix::new(3, i, randn(3 * i)).unwrap();
            let b = Matrix::new(o, 3, randn(o * 3)).unwrap();
            layers.insert(ModelConfig::linear_path(l, short), LoraWeights::new(a, b));
        }
    }
    let adapter = Adapter {
        config: LoraConfig {
            r: 3,
            lora_alpha: 6.0,
            lora_dropout: 0.1,
            target_modules: vec![],
            use_rslora: false,
            use_dora: false,
        },
        layers,
    };
    let toks = ids(9, 7);
    let full: Vec<f32> = model
        .forward_logits(&Batch::from_ids(vec![toks.clone()]), Some(&adapter))
        .unwrap()
        .into_vec();
    let base: Vec<f32> = model
        .forward_logits(&Batch::from_ids(vec![toks.clone()]), None)
        .unwrap()
        .into_vec();
    assert!(
        max_abs(&full, &base) > 1e-3,
        "the adapter changes the logits"
    );
    let mut cache = model.new_cache();
    model
        .forward_step(&mut cache, &toks[..4], Some(&adapter))
        .unwrap();
    for p in 4..9 {
        let l = model
            .forward_step(&mut cache, &toks[p..p + 1], Some(&adapter))
            .unwrap();
        assert!(
            max_abs(&l, &full[p * 320..(p + 1) * 320]) < 1e-5,
            "position {p}"
        );
    }
}

/// A 4-bit model keeps a bf16 checkpoint's embedding in bf16 (lossless, half
/// the bytes of f32); `--quant none` still holds f32; an f32 checkpoint's
/// embedding stays f32.
#[test]
fn bf16_checkpoint_keeps_its_embedding_in_bf16_under_nf4() {
    use half::bf16;
    use qlora_model::ops::linear::FrozenWeight;
    use safetensors::{serialize_to_file, Dtype, View};
    struct T(Vec<usize>, Vec<u8>);
    impl View for &T {
        fn dtype(&self) -> Dtype {
            Dtype::BF16
        }
        fn shape(&self) -> &[usize] {
            &self.0
        }
        fn data(&self) -> std::borrow::Cow<'_, [u8]> {
            (&self.1[..]).into()
        }
        fn data_len(&self) -> usize {
            self.1.len()
        }
    }
    let dir = std::env::temp_dir().join(format!("qlora-bf16-emb-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        fixtures().join("tiny_llama/model/config.json"),
        dir.join("config.json"),
    )
    .unwrap();
    let tensors: Vec<(String, T)> = fixture_tensors()
        .into_iter()
        .map(|(n, s, d)| {
            let b = d
                .iter()
                .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
                .collect();
            (n, T(s, b))
        })
        .collect();
    let emb_src: Vec<f32> = tensors
        .iter()
        .find(|(n, _)| n == "model.embed_tokens.weight")
        .map(|(_, t)| {
            t.1.chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect()
        })
        .unwrap();
    serialize_to_file(
        tensors.iter().map(|(n, t)| (n.as_str(), t)),
        None,
        &dir.join("model.safetensors"),
    )
    .unwrap();
    let load = |quant| Model::from_folder(&dir, &LoadOptions { quant }).unwrap();
    let (nf4, f32m) = (load(QuantMode::Nf4), load(QuantMode::None));
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(matches!(nf4.embed_tokens, FrozenWeight::BF16(_)));
    assert!(matches!(f32m.embed_tokens, FrozenWeight::F32(_)));
    let (v, h) = (nf4.config.vocab_size, nf4.config.hidden_size);
    let mut got = vec![0f32; v * h];
    nf4.embed_tokens.rows_f32(0, v, h, &mut got);
    assert_eq!(got, emb_src, "bf16 embedding held exactly");
    assert!(
        f32m.weight_bytes() - nf4.weight_bytes() >= v * h * 2,
        "the bf16 embedding saves at least its f32 half"
    );
    // And an f32 checkpoint's embedding is not narrowed.
    assert!(matches!(
        tiny(QuantMode::Nf4).embed_tokens,
        FrozenWeight::F32(_)
    ));
}
