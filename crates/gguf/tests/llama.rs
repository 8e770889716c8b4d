//! llama mapping: config from metadata, HF names, the Q/K permutation and RoPE equivalence.

use std::collections::HashMap;
use std::path::PathBuf;

use qlora_config::RopeScaling;
use qlora_gguf::llama::{self, hf_name, permute_rows, unpermute_rows};
use qlora_gguf::writer::GgufWriter;
use qlora_gguf::{GgmlType, MetaValue};
use rand::{Rng, SeedableRng};

fn rand_vec(rng: &mut impl Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// HF RoPE (rotate_half) on one head vector.
fn rope_hf(x: &[f32], pos: f32, inv: &[f32]) -> Vec<f32> {
    let h = x.len() / 2;
    let mut o = vec![0f32; x.len()];
    for i in 0..h {
        let (s, c) = (pos * inv[i]).sin_cos();
        o[i] = x[i] * c - x[i + h] * s;
        o[i + h] = x[i + h] * c + x[i] * s;
    }
    o
}

/// llama.cpp / Meta RoPE on adjacent pairs.
fn rope_pairs(x: &[f32], pos: f32, inv: &[f32]) -> Vec<f32> {
    let mut o = vec![0f32; x.len()];
    for i in 0..x.len() / 2 {
        let (s, c) = (pos * inv[i]).sin_cos();
        o[2 * i] = x[2 * i] * c - x[2 * i + 1] * s;
        o[2 * i + 1] = x[2 * i + 1] * c + x[2 * i] * s;
    }
    o
}

#[test]
fn permutation_round_trips_and_moves_rows_as_documented() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let (heads, d, cols) = (3, 8, 5);
    let w = rand_vec(&mut rng, heads * d * cols);
    let p = permute_rows(&w, heads, d, cols);
    assert_ne!(p, w);
    assert_eq!(unpermute_rows(&p, heads, d, cols), w);
    assert_eq!(
        permute_rows(&unpermute_rows(&w, heads, d, cols), heads, d, cols),
        w
    );
    // GGUF row 2i+j of head h is HF row j·d/2+i: check head 1, i = 2, j = 1.
    let (h, i, j) = (1, 2, 1);
    let gguf_row = h * d + 2 * i + j;
    let hf_row = h * d + j * d / 2 + i;
    assert_eq!(
        &p[gguf_row * cols..(gguf_row + 1) * cols],
        &w[hf_row * cols..(hf_row + 1) * cols]
    );
}

#[test]
fn pair_rope_on_gguf_layout_equals_rotate_half_on_hf_layout() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    let (heads, d, hidden) = (4, 16, 12);
    let inv = RopeScaling::Default.inv_freq(10000.0, d);
    let w_hf = rand_vec(&mut rng, heads * d * hidden);
    let w_gguf = permute_rows(&w_hf, heads, d, hidden);
    for pos in [0.0f32, 1.0, 7.0, 123.0] {
        let x = rand_vec(&mut rng, hidden);
        let matvec = |w: &[f32]| -> Vec<f32> {
            w.chunks(hidden)
                .map(|r| r.iter().zip(&x).map(|(a, b)| a * b).sum())
                .collect()
        };
        let (q_hf, q_gguf) = (matvec(&w_hf), matvec(&w_gguf));
        for hd in 0..heads {
            let a = rope_hf(&q_hf[hd * d..(hd + 1) * d], pos, &inv);
            let b = rope_pairs(&q_gguf[hd * d..(hd + 1) * d], pos, &inv);
            let b_hf = unpermute_rows(&b, 1, d, 1);
            for (u, v) in a.iter().zip(&b_hf) {
                assert!((u - v).abs() < 1e-5, "pos {pos} head {hd}: {u} vs {v}");
            }
            // And the wrong pairing really differs (the test can fail).
            if pos > 0.0 {
                let wrong = rope_pairs(&q_hf[hd * d..(hd + 1) * d], pos, &inv);
                assert!(a.iter().zip(&wrong).any(|(u, v)| (u - v).abs() > 1e-3));
            }
        }
    }
}

#[test]
fn names_map_to_hf() {
    assert_eq!(
        hf_name("token_embd.weight").unwrap(),
        "model.embed_tokens.weight"
    );
    assert_eq!(
        hf_name("blk.12.attn_k.weight").unwrap(),
        "model.layers.12.self_attn.k_proj.weight"
    );
    assert_eq!(
        hf_name("blk.0.ffn_norm.weight").unwrap(),
        "model.layers.0.post_attention_layernorm.weight"
    );
    assert_eq!(
        hf_name("blk.3.attn_q.bias").unwrap(),
        "model.layers.3.self_attn.q_proj.bias"
    );
    assert_eq!(hf_name("output.weight").unwrap(), "lm_head.weight");
    assert_eq!(hf_name("blk.0.ffn_gate_exps.weight"), None);
    assert_eq!(hf_name("rope_freqs.weight"), None);
}

struct Tiny {
    hf: HashMap<String, (Vec<usize>, Vec<f32>)>,
    writer: GgufWriter,
}

/// A 2-layer GQA llama in HF layout, written to GGUF as llama.cpp's converter would.
fn tiny(tied: bool, rng: &mut impl Rng) -> Tiny {
    let (v, h, i, a, kv, d, l) = (40usize, 16usize, 24usize, 4usize, 2usize, 4usize, 2usize);
    let mut w = GgufWriter::new();
    let tokens: Vec<MetaValue> = (0..v).map(|t| MetaValue::String(format!("t{t}"))).collect();
    w.meta("general.architecture", MetaValue::String("llama".into()))
        .meta("llama.embedding_length", MetaValue::U32(h as u32))
        .meta("llama.block_count", MetaValue::U32(l as u32))
        .meta("llama.feed_forward_length", MetaValue::U32(i as u32))
        .meta("llama.attention.head_count", MetaValue::U32(a as u32))
        .meta("llama.attention.head_count_kv", MetaValue::U32(kv as u32))
        .meta("llama.rope.freq_base", MetaValue::F32(100000.0))
        .meta(
            "llama.attention.layer_norm_rms_epsilon",
            MetaValue::F32(1e-5),
        )
        .meta("llama.context_length", MetaValue::U32(8192))
        .meta("llama.rope.dimension_count", MetaValue::U32(d as u32))
        .meta("tokenizer.ggml.tokens", MetaValue::Array(tokens))
        .meta("tokenizer.ggml.bos_token_id", MetaValue::U32(1))
        .meta("tokenizer.ggml.eos_token_id", MetaValue::U32(2));
    let mut hf = HashMap::new();
    let mut add = |w: &mut GgufWriter,
                   gguf: &str,
                   shape: Vec<usize>,
                   perm: Option<usize>,
                   rng: &mut dyn rand::RngCore| {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let stored = match perm {
            Some(heads) => permute_rows(&data, heads, d, shape[1]),
            None => data.clone(),
        };
        let dims: Vec<u64> = shape.iter().rev().map(|&x| x as u64).collect();
        w.tensor(gguf, &dims, GgmlType::F32, f32_bytes(&stored));
        hf.insert(hf_name(gguf).unwrap(), (shape, data));
    };
    add(&mut w, "token_embd.weight", vec![v, h], None, rng);
    for b in 0..l {
        add(
            &mut w,
            &format!("blk.{b}.attn_norm.weight"),
            vec![h],
            None,
            rng,
        );
        add(
            &mut w,
            &format!("blk.{b}.attn_q.weight"),
            vec![a * d, h],
            Some(a),
            rng,
        );
        add(
            &mut w,
            &format!("blk.{b}.attn_k.weight"),
            vec![kv * d, h],
            Some(kv),
            rng,
        );
        add(
            &mut w,
            &format!("blk.{b}.attn_v.weight"),
            vec![kv * d, h],
            None,
            rng,
        );
        add(
            &mut w,
            &format!("blk.{b}.attn_output.weight"),
            vec![h, a * d],
            None,
            rng,
        );
        add(
            &mut w,
            &format!("blk.{b}.ffn_norm.weight"),
            vec![h],
            None,
            rng,
        );
        add(
            &mut w,
            &format!("blk.{b}.ffn_gate.weight"),
            vec![i, h],
            None,
            rng,
        );
        add(
            &mut w,
            &format!("blk.{b}.ffn_up.weight"),
            vec![i, h],
            None,
            rng,
        );
        add(
            &mut w,
            &format!("blk.{b}.ffn_down.weight"),
            vec![h, i],
            None,
            rng,
        );
    }
    add(&mut w, "output_norm.weight", vec![h], None, rng);
    if !tied {
        add(&mut w, "output.weight", vec![v, h], None, rng);
    }
    Tiny { hf, writer: w }
}

fn write(dir: &tempfile::TempDir, name: &str, w: &GgufWriter) -> PathBuf {
    let p = dir.path().join(name);
    w.write(&p).unwrap();
    p
}

#[test]
fn load_hf_tensors_recovers_hf_weights_and_config() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let dir = tempfile::tempdir().unwrap();
    for tied in [true, false] {
        let t = tiny(tied, &mut rng);
        let p = write(&dir, "tiny.gguf", &t.writer);
        let (cfg, it) = llama::load_hf_tensors(&p).unwrap();
        assert_eq!(cfg.vocab_size, 40);
        assert_eq!(cfg.hidden_size, 16);
        assert_eq!(cfg.num_hidden_layers, 2);
        assert_eq!(cfg.num_key_value_heads, 2);
        assert_eq!(cfg.head_dim, 4);
        assert_eq!(cfg.rms_norm_eps, 1e-5);
        assert_eq!(cfg.rope_theta, 100000.0);
        assert_eq!(cfg.max_position_embeddings, 8192);
        assert_eq!(cfg.tie_word_embeddings, tied);
        assert_eq!(cfg.bos_token_id, Some(1));
        assert_eq!(cfg.eos_token_ids, vec![2]);
        let mut seen = 0;
        for item in it {
            let (name, shape, data) = item.unwrap();
            let (s, d) = &t.hf[&name];
            assert_eq!(&shape, s, "{name}");
            assert_eq!(&data, d, "{name}");
            seen += 1;
        }
        assert_eq!(seen, t.hf.len());
    }
}

#[test]
fn inconsistent_files_are_errors_naming_file_and_tensor() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(4);
    let dir = tempfile::tempdir().unwrap();

    // Metadata says 3 layers, tensors have 2.
    let mut t = tiny(true, &mut rng);
    t.writer.metadata.retain(|(k, _)| k != "llama.block_count");
    t.writer.meta("llama.block_count", MetaValue::U32(3));
    let p = write(&dir, "layers.gguf", &t.writer);
    let e = llama::load_hf_tensors(&p).err().unwrap().to_string();
    assert!(
        e.contains("layers.gguf") && e.contains("blk.2.attn_norm.weight"),
        "{e}"
    );

    // Vocab mismatch between the token list and the embedding.
    let mut t = tiny(true, &mut rng);
    t.writer
        .metadata
        .retain(|(k, _)| k != "tokenizer.ggml.tokens");
    t.writer.meta(
        "tokenizer.ggml.tokens",
        MetaValue::Array(vec![MetaValue::String("a".into()); 39]),
    );
    let p = write(&dir, "vocab.gguf", &t.writer);
    let e = llama::load_hf_tensors(&p).err().unwrap().to_string();
    assert!(
        e.contains("vocab.gguf") && e.contains("39") && e.contains("40"),
        "{e}"
    );

    // Wrong shape for one projection.
    let mut t = tiny(true, &mut rng);
    let k = t
        .writer
        .tensors
        .iter_mut()
        .find(|x| x.name == "blk.1.ffn_up.weight")
        .unwrap();
    k.dims = vec![16, 20];
    k.data.truncate(16 * 20 * 4);
    let p = write(&dir, "shape.gguf", &t.writer);
    let e = llama::load_hf_tensors(&p).err().unwrap().to_string();
    assert!(
        e.contains("blk.1.ffn_up.weight") && e.contains("[24, 16]"),
        "{e}"
    );

    // Another architecture.
    let mut t = tiny(true, &mut rng);
    t.writer.metadata[0].1 = MetaValue::String("falcon".into());
    let p = write(&dir, "arch.gguf", &t.writer);
    let e = llama::load_hf_tensors(&p).err().unwrap().to_string();
    assert!(e.contains("falcon"), "{e}");

    // An extra unknown tensor.
    let mut t = tiny(true, &mut rng);
    t.writer.tensor(
        "blk.0.ffn_gate_exps.weight",
        &[4],
        GgmlType::F32,
        vec![0; 16],
    );
    let p = write(&dir, "extra.gguf", &t.writer);
    let e = llama::load_hf_tensors(&p).err().unwrap().to_string();
    assert!(e.contains("ffn_gate_exps"), "{e}");
}

#[test]
fn llama3_scaling_recovered_from_rope_freqs() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let dir = tempfile::tempdir().unwrap();
    let mut t = tiny(true, &mut rng);
    // With head_dim 4 and theta 5e8 the two frequencies fall in different llama3 regimes.
    t.writer
        .metadata
        .retain(|(k, _)| k != "llama.rope.freq_base");
    t.writer.meta("llama.rope.freq_base", MetaValue::F32(5e8));
    let want = RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192,
    };
    let plain = RopeScaling::Default.inv_freq(5e8, 4);
    let scaled = want.inv_freq(5e8, 4);
    let factors: Vec<f32> = plain.iter().zip(&scaled).map(|(p, s)| p / s).collect();
    assert!(factors.iter().any(|f| *f > 1.0));
    t.writer.tensor(
        "rope_freqs.weight",
        &[2],
        GgmlType::F32,
        f32_bytes(&factors),
    );
    let p = write(&dir, "l3.gguf", &t.writer);
    let (cfg, _) = llama::load_hf_tensors(&p).unwrap();
    assert_eq!(cfg.rope_scaling, want);
}

/// The real demo file (scripts/fetch-demo.sh): SmolLM2-135M-Instruct, Q4_1 + Q8_0 embedding.
#[test]
fn demo_gguf_config_and_tensors() {
    let Some(p) = qlora_testutil::demo_gguf() else {
        return;
    };
    let h = qlora_gguf::GgufFile::read_header(&p).unwrap();
    assert_eq!(h.tensors.len(), 272);
    assert_eq!(
        h.tensor("token_embd.weight").unwrap().ggml_type,
        GgmlType::Q8_0
    );
    assert_eq!(
        h.tensor("blk.0.attn_q.weight").unwrap().ggml_type,
        GgmlType::Q4_1
    );
    let (cfg, it) = llama::load_hf_tensors(&p).unwrap();
    assert_eq!(
        (
            cfg.vocab_size,
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.num_hidden_layers
        ),
        (49152, 576, 1536, 30)
    );
    assert_eq!(
        (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim
        ),
        (9, 3, 64)
    );
    assert_eq!((cfg.rope_theta, cfg.rms_norm_eps), (100000.0, 1e-5));
    assert_eq!(cfg.max_position_embeddings, 8192);
    assert!(cfg.tie_word_embeddings);
    assert_eq!(cfg.eos_token_ids, vec![2]);
    let mut n = 0usize;
    for t in it {
        let (name, shape, data) = t.unwrap();
        assert_eq!(shape.iter().product::<usize>(), data.len(), "{name}");
        assert!(data.iter().all(|x| x.is_finite()), "{name}");
        n += data.len();
    }
    assert_eq!(n, 134_515_008);
}

#[test]
fn gguf_name_inverts_hf_name_for_every_llama_tensor() {
    let mut gguf = vec![
        "token_embd.weight".to_string(),
        "output_norm.weight".into(),
        "output.weight".into(),
    ];
    for m in [
        "attn_norm",
        "ffn_norm",
        "attn_q",
        "attn_k",
        "attn_v",
        "attn_output",
        "ffn_gate",
        "ffn_up",
        "ffn_down",
    ] {
        gguf.push(format!("blk.7.{m}.weight"));
    }
    gguf.push("blk.3.attn_q.bias".into());
    for g in gguf {
        let hf = hf_name(&g).unwrap();
        assert_eq!(llama::gguf_name(&hf).as_deref(), Some(g.as_str()), "{hf}");
    }
    assert_eq!(
        llama::gguf_name("model.layers.0.mlp.experts.0.weight"),
        None
    );
    assert_eq!(llama::gguf_name("model.rotary_emb.inv_freq"), None);
}
