//! `export_gguf`'s file: metadata and tokenizer round trips, Llama-3 RoPE scaling written
//! as `rope_freqs`, and bad inputs refused with clear errors that leave nothing behind.

mod support;

use support::*;

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
