//! Write a synthetic Llama-shaped bf16 checkpoint (sharded, with index and
//! config.json) for benchmarking `qlora quantize`.
//!
//! `cargo run --release -p qlora-formats --example make_synthetic -- OUT_DIR [LAYERS] [MAX_SHARD_BYTES]`
//!
//! Shapes are TinyLlama-1.1B's (hidden 2048, intermediate 5632, 32 heads, 4 KV
//! heads, vocab 32000); the default 8 layers give ≈0.97 GB of bf16 weights in
//! two shards. Values are N(0, 0.02²)-like from a fixed-seed generator.

use std::path::PathBuf;

use half::bf16;
use qlora_formats::shards::{plan_shards, shard_file_name, write_index};
use qlora_formats::{Dtype, SafetensorsWriter, TensorSpec};
use rayon::prelude::*;

/// SplitMix64 → approximately normal via the sum of four uniforms.
fn fill(seed: u64, out: &mut [bf16]) {
    out.par_chunks_mut(1 << 16).enumerate().for_each(|(c, ch)| {
        let mut s = seed ^ (c as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let mut next = || {
            s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32
        };
        for v in ch {
            let u = next() + next() + next() + next() - 2.0; // variance 1/3
            *v = bf16::from_f32(u * 0.02 * 1.732);
        }
    });
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let out = PathBuf::from(
        args.get(1)
            .expect("usage: make_synthetic OUT_DIR [LAYERS] [MAX_SHARD_BYTES]"),
    );
    let layers: usize = args.get(2).map_or(8, |s| s.parse().expect("LAYERS"));
    let max_shard: u64 = args
        .get(3)
        .map_or(500_000_000, |s| s.parse().expect("MAX_SHARD_BYTES"));
    let (h, inter, vocab, heads, kv) = (2048usize, 5632usize, 32000usize, 32usize, 4usize);
    let hd = h / heads;
    std::fs::create_dir_all(&out).expect("create output folder");

    let mut units = vec![vec![TensorSpec::new(
        "model.embed_tokens.weight",
        Dtype::BF16,
        vec![vocab, h],
    )]];
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        for (n, shape) in [
            ("input_layernorm.weight", vec![h]),
            ("self_attn.q_proj.weight", vec![h, h]),
            ("self_attn.k_proj.weight", vec![kv * hd, h]),
            ("self_attn.v_proj.weight", vec![kv * hd, h]),
            ("self_attn.o_proj.weight", vec![h, h]),
            ("post_attention_layernorm.weight", vec![h]),
            ("mlp.gate_proj.weight", vec![inter, h]),
            ("mlp.up_proj.weight", vec![inter, h]),
            ("mlp.down_proj.weight", vec![h, inter]),
        ] {
            units.push(vec![TensorSpec::new(
                format!("{p}.{n}"),
                Dtype::BF16,
                shape,
            )]);
        }
    }
    units.push(vec![TensorSpec::new(
        "model.norm.weight",
        Dtype::BF16,
        vec![h],
    )]);
    units.push(vec![TensorSpec::new(
        "lm_head.weight",
        Dtype::BF16,
        vec![vocab, h],
    )]);

    let shards = plan_shards(units, max_shard);
    let n = shards.len();
    let mut index = Vec::new();
    let mut seed = 1u64;
    let mut total = 0usize;
    for (k, specs) in shards.into_iter().enumerate() {
        let name = shard_file_name(k, n);
        let mut w = SafetensorsWriter::create(out.join(&name), &specs).expect("create shard");
        for s in &specs {
            let mut v = vec![bf16::ZERO; s.numel()];
            if s.shape.len() == 1 {
                v.fill(bf16::ONE);
            } else {
                fill(seed, &mut v);
            }
            seed += 1;
            w.write_bf16(&s.name, &v).expect("write tensor");
            total += s.nbytes();
        }
        w.finish().expect("finish shard");
        index.push((name, specs));
    }
    if n > 1 {
        write_index(&out, &index).expect("write index");
    }
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": h,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": false,
        "torch_dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 2
    });
    std::fs::write(
        out.join("config.json"),
        serde_json::to_string_pretty(&config).unwrap() + "\n",
    )
    .expect("write config.json");
    println!(
        "wrote {} ({} shards, {} bytes of bf16 tensors)",
        out.display(),
        n,
        total
    );
}
