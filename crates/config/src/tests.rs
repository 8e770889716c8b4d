use super::*;

#[test]
fn tiny_llama_v5_config() {
    let c =
        ModelConfig::from_file(qlora_testutil::fixture("tiny_llama/model/config.json")).unwrap();
    assert_eq!(c.architecture, Architecture::Llama);
    assert_eq!(
        (c.hidden_size, c.intermediate_size, c.num_hidden_layers),
        (64, 160, 2)
    );
    assert_eq!(
        (c.num_attention_heads, c.num_key_value_heads, c.head_dim),
        (4, 2, 16)
    );
    assert_eq!(c.vocab_size, 320);
    assert_eq!(c.rope_theta, 10000.0);
    assert_eq!(c.rope_scaling, RopeScaling::Default);
    assert!(!c.tie_word_embeddings);
    assert_eq!(c.rms_norm_eps, 1e-5);
    assert_eq!(c.torch_dtype, Some(DType::F32));
    assert!(c.quantization_config.is_none());
}

#[test]
fn bnb4_config_keeps_quantization_config() {
    let c = ModelConfig::from_file(qlora_testutil::fixture("tiny_llama_bnb4/model/config.json"))
        .unwrap();
    let q = c.quantization_config.unwrap();
    assert_eq!(q["bnb_4bit_quant_type"], "nf4");
}

#[test]
fn v4_spelling_with_llama3_scaling() {
    let j = r#"{"model_type":"llama","hidden_size":4096,"intermediate_size":14336,"num_hidden_layers":32,
      "num_attention_heads":32,"num_key_value_heads":8,"vocab_size":128256,"rope_theta":500000.0,
      "rope_scaling":{"factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,
      "original_max_position_embeddings":8192,"rope_type":"llama3"},"torch_dtype":"bfloat16",
      "eos_token_id":[128001,128008,128009],"rms_norm_eps":1e-5}"#;
    let c = ModelConfig::from_json_str(j, "x").unwrap();
    assert_eq!(c.head_dim, 128);
    assert_eq!(c.rope_theta, 500000.0);
    assert_eq!(c.rope_scaling.rope_type(), RopeType::Llama3);
    assert_eq!(c.eos_token_ids, vec![128001, 128008, 128009]);
    assert_eq!(c.torch_dtype, Some(DType::BF16));
    let inv = c.rope_scaling.inv_freq(c.rope_theta, c.head_dim);
    // Highest frequency unchanged; lowest divided by the factor.
    assert_eq!(inv[0], 1.0);
    let plain = RopeScaling::Default.inv_freq(c.rope_theta, c.head_dim);
    assert!((inv[63] - plain[63] / 8.0).abs() <= f32::EPSILON * plain[63]);
    // A medium frequency lies strictly between the two.
    let mid = (0..64)
        .find(|&j| inv[j] != plain[j] && (inv[j] - plain[j] / 8.0).abs() > 1e-12)
        .unwrap();
    assert!(inv[mid] < plain[mid] && inv[mid] > plain[mid] / 8.0);
}

#[test]
fn legacy_type_key_and_linear() {
    let j = r#"{"hidden_size":64,"intermediate_size":128,"num_hidden_layers":1,"num_attention_heads":4,
      "vocab_size":10,"rope_scaling":{"type":"linear","factor":2.0}}"#;
    let c = ModelConfig::from_json_str(j, "x").unwrap();
    assert_eq!(c.rope_scaling, RopeScaling::Linear { factor: 2.0 });
    let inv = c.rope_scaling.inv_freq(c.rope_theta, c.head_dim);
    assert_eq!(inv[0], 0.5);
}

#[test]
fn qwen2_has_qkv_bias() {
    let j = r#"{"model_type":"qwen2","hidden_size":896,"intermediate_size":4864,"num_hidden_layers":24,
      "num_attention_heads":14,"num_key_value_heads":2,"vocab_size":151936,"tie_word_embeddings":true,
      "rope_theta":1000000.0,"sliding_window":32768,"use_sliding_window":false}"#;
    let c = ModelConfig::from_json_str(j, "x").unwrap();
    assert!(c.qkv_bias && !c.o_bias);
    assert_eq!(c.head_dim, 64);
    assert_eq!(c.sliding_window, None);
}

#[test]
fn errors_name_the_problem() {
    let e = ModelConfig::from_json_str(r#"{"model_type":"gpt2"}"#, "m/config.json").unwrap_err();
    assert!(
        e.to_string().contains("m/config.json") && e.to_string().contains("gpt2"),
        "{e}"
    );
    let e = ModelConfig::from_json_str(
        r#"{"hidden_size":64,"intermediate_size":1,"num_hidden_layers":1,"num_attention_heads":4,"vocab_size":1,
        "rope_scaling":{"rope_type":"yarn","factor":4.0}}"#,
        "c.json",
    )
    .unwrap_err();
    assert!(e.to_string().contains("yarn"), "{e}");
    let e = ModelConfig::from_json_str(r#"{"hidden_size":64}"#, "c.json").unwrap_err();
    assert!(e.to_string().contains("missing required field"), "{e}");
    let e = ModelConfig::from_json_str(
        r#"{"hidden_size":64,"intermediate_size":1,"num_hidden_layers":1,"num_attention_heads":4,
        "num_key_value_heads":3,"vocab_size":1}"#,
        "c.json",
    )
    .unwrap_err();
    assert!(e.to_string().contains("num_key_value_heads"), "{e}");
    let e = ModelConfig::from_json_str(
        r#"{"hidden_size":64,"intermediate_size":1,"num_hidden_layers":1,"num_attention_heads":4,
        "vocab_size":1,"hidden_act":"gelu"}"#,
        "c.json",
    )
    .unwrap_err();
    assert!(e.to_string().contains("gelu"), "{e}");
}
