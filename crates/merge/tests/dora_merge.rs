//! Merging a PEFT DoRA adapter equals PEFT's `merge_and_unload()` (f32 base)
//! and PEFT's bnb `Linear4bit.merge` before re-quantization (NF4 base).

use qlora_merge::{merge_model, MergeFrom, MergeOptions};
use qlora_quant::DType;
use qlora_testutil::{dora_fixtures, fixtures};
use safetensors::SafeTensors;

fn f32s(st: &SafeTensors, name: &str) -> Vec<f32> {
    let t = st.tensor(name).unwrap_or_else(|_| panic!("missing {name}"));
    assert_eq!(t.dtype(), safetensors::Dtype::F32, "{name}");
    t.data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

const MODULES: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// Merge the DoRA fixture adapter into `base` and compare every adapted weight
/// with `reference.safetensors`' `<prefix>.<module>`; returns the largest
/// relative difference (|got − want| / max|want| per tensor).
fn check(base: &str, from: Option<MergeFrom>, prefix: &str) -> f32 {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let rep = merge_model(
        &fixtures().join(base),
        &dora_fixtures().join("adapter"),
        &out,
        &MergeOptions {
            dtype: Some(DType::F32),
            from,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(rep.merged_modules, 14);
    let rb = std::fs::read(dora_fixtures().join("reference.safetensors")).unwrap();
    let reference = SafeTensors::deserialize(&rb).unwrap();
    let gb = std::fs::read(out.join("model.safetensors")).unwrap();
    let got = SafeTensors::deserialize(&gb).unwrap();
    let mut worst = 0f32;
    for l in 0..2 {
        for m in MODULES {
            let module = format!("model.layers.{l}.{m}");
            let g = f32s(&got, &format!("{module}.weight"));
            let w = f32s(&reference, &format!("{prefix}.{module}"));
            assert_eq!(g.len(), w.len(), "{module}");
            let scale = w.iter().fold(0f32, |a, v| a.max(v.abs()));
            let d = g
                .iter()
                .zip(&w)
                .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
            worst = worst.max(d / scale);
        }
    }
    eprintln!("{base} {from:?} vs {prefix}: max relative difference {worst:e}");
    worst
}

#[test]
fn dora_merge_from_original_matches_peft_merge_and_unload() {
    let worst = check("tiny_llama/model", Some(MergeFrom::Original), "merged_f32");
    assert!(worst < 1e-6, "max relative difference {worst}");
}

#[test]
fn dora_merge_from_dequantized_nf4_matches_peft_bnb_merge() {
    let worst = check("tiny_llama_bnb4/model", None, "merged_nf4");
    assert!(worst < 1e-6, "max relative difference {worst}");
}

/// An f32 source merged `--from dequantized` re-applies the trainer's NF4
/// quantization, which reproduces the bnb checkpoint's weights exactly, so it
/// equals the NF4 reference too.
#[test]
fn dora_merge_from_dequantized_f32_source_matches_peft_bnb_merge() {
    let worst = check(
        "tiny_llama/model",
        Some(MergeFrom::Dequantized),
        "merged_nf4",
    );
    assert!(worst < 1e-6, "max relative difference {worst}");
}
