//! `--compute-dtype bf16` through the whole model: the fused tile paths (LoRA
//! inside the products' packs and k-steps, SwiGLU's backward in the input
//! gradient's packs, the head's one pass, the dropout masks in the pack's
//! hook) are chosen per call from the shapes, the ranks and dropout; each
//! kernel has its own randomized test, and this one checks what they compose
//! to over a class of models: Llama, Qwen3 (q/k norms) and Mistral (sliding
//! windows longer and shorter than the rows), GQA and MHA, tied
//! and untied heads, sizes that are no multiple of 16 or 32, ranks below and
//! above a tile's 32, LoRA on some targets only, DoRA, dropout on and off, padded
//! rows; NF4, FP4, bf16 and f32 bases. bf16 compute must follow f32 compute within
//! bf16 precision, and checkpointing must give the same bits.
//!
//! On a CPU without bf16 tile products (AMX, AVX512-BF16) bf16 compute runs
//! the f32 fallback and the comparison is trivially exact; the test says so.

use std::collections::BTreeMap;

use qlora_config::ModelConfig;
use qlora_lora::{Adapter, AdapterGrads, LoraConfig, LoraWeights, Matrix};
use qlora_model::{BaseCompute, Batch, LoadOptions, Model, QuantMode, StepOptions};

/// splitmix64 values in [-1, 1).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next() * scale).collect()
    }
}

struct Case {
    name: &'static str,
    config: serde_json::Value,
    quant: QuantMode,
    rank: usize,
    targets: &'static [&'static str],
    dropout: f64,
    dora: bool,
    /// Rows of the batch and their length before padding.
    rows: &'static [usize],
}

fn model(case: &Case, rng: &mut Rng) -> Model {
    let config = ModelConfig::from_json(&case.config, case.name).unwrap();
    let (h, v) = (config.hidden_size, config.vocab_size);
    let mut tensors = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![v, h],
        rng.vec(v * h, 0.1),
    )];
    let norm = |rng: &mut Rng, n: usize| (0..n).map(|_| 1.0 + 0.2 * rng.next()).collect();
    tensors.push(("model.norm.weight".into(), vec![h], norm(rng, h)));
    if !config.tie_word_embeddings {
        tensors.push(("lm_head.weight".into(), vec![v, h], rng.vec(v * h, 0.1)));
    }
    for l in 0..config.num_hidden_layers {
        for n in ["input_layernorm", "post_attention_layernorm"] {
            tensors.push((
                format!("model.layers.{l}.{n}.weight"),
                vec![h],
                norm(rng, h),
            ));
        }
        if config.architecture.qk_norm() {
            let d = config.head_dim;
            for n in ["q_norm", "k_norm"] {
                tensors.push((
                    format!("model.layers.{l}.self_attn.{n}.weight"),
                    vec![d],
                    norm(rng, d),
                ));
            }
        }
        for (short, [o, i]) in config.linear_shapes() {
            tensors.push((
                format!("{}.weight", ModelConfig::linear_path(l, short)),
                vec![o, i],
                rng.vec(o * i, 1.5 / (i as f32).sqrt()),
            ));
        }
    }
    Model::from_tensors(
        config,
        tensors,
        case.name,
        &LoadOptions { quant: case.quant },
    )
    .unwrap()
}

/// An adapter with B away from zero, so that every path carries signal.
fn adapter(case: &Case, m: &Model, rng: &mut Rng) -> Adapter {
    let c = &m.config;
    let r = case.rank;
    let mut layers = BTreeMap::new();
    for l in 0..c.num_hidden_layers {
        for (short, [o, i]) in c.linear_shapes() {
            if !case.targets.contains(&short) {
                continue;
            }
            layers.insert(
                ModelConfig::linear_path(l, short),
                LoraWeights {
                    a: Matrix::new(r, i, rng.vec(r * i, 1.0 / (i as f32).sqrt())).unwrap(),
                    b: Matrix::new(o, r, rng.vec(o * r, 0.2)).unwrap(),
                    magnitude: case
                        .dora
                        .then(|| (0..o).map(|_| 1.0 + 0.3 * rng.next()).collect()),
                },
            );
        }
    }
    Adapter {
        config: LoraConfig {
            r,
            lora_alpha: 2.0 * r as f64,
            lora_dropout: case.dropout,
            target_modules: case.targets.iter().map(|s| s.to_string()).collect(),
            use_rslora: false,
            use_dora: case.dora,
        },
        layers,
    }
}

/// Rows padded to the longest; the padding and each row's first two
/// positions are no targets.
fn batch(case: &Case, vocab: usize, rng: &mut Rng) -> Batch {
    let s = *case.rows.iter().max().unwrap();
    let mut input_ids = vec![];
    let mut labels = vec![];
    for &len in case.rows {
        let ids: Vec<u32> = (0..s)
            .map(|k| {
                if k < len {
                    (((rng.next() + 1.0) * 0.5 * vocab as f32) as u32).min(vocab as u32 - 1)
                } else {
                    0
                }
            })
            .collect();
        labels.push(
            ids.iter()
                .enumerate()
                .map(|(k, &t)| if k < 2 || k >= len { -100 } else { t as i64 })
                .collect(),
        );
        input_ids.push(ids);
    }
    Batch {
        input_ids,
        labels,
        position_ids: None,
        segment_ids: None,
    }
}

fn step(m: &Model, b: &Batch, ad: &Adapter, checkpointing: bool) -> (f64, AdapterGrads) {
    let opts = StepOptions {
        loss_denominator: 100.0,
        checkpointing,
        lora_dropout_seed: 7,
        ..Default::default()
    };
    let (loss, _, grads) = m.forward_backward(b, ad, &opts).unwrap();
    (loss, grads)
}

/// ‖got − want‖ / ‖want‖ over all of a gradient's entries, and the largest
/// such ratio of one module's `A` or `B` (with its name).
fn rel_err(got: &AdapterGrads, want: &AdapterGrads) -> (f64, f64, String) {
    let (mut d2, mut w2) = (0f64, 0f64);
    let mut worst = (0f64, String::new());
    for (k, w) in want {
        let g = &got[k];
        assert_eq!(
            g.magnitude.is_some(),
            w.magnitude.is_some(),
            "{k}: magnitude"
        );
        let mut parts = vec![("A", g.a.data(), w.a.data()), ("B", g.b.data(), w.b.data())];
        if let (Some(gm), Some(wm)) = (&g.magnitude, &w.magnitude) {
            parts.push(("magnitude", gm, wm));
        }
        for (which, gm, wm) in parts {
            let (mut md2, mut mw2) = (0f64, 0f64);
            for (x, y) in gm.iter().zip(wm) {
                md2 += ((x - y) as f64).powi(2);
                mw2 += (*y as f64).powi(2);
            }
            assert!(mw2 > 0.0, "{k} {which}: a zero gradient carries no signal");
            let r = (md2 / mw2).sqrt();
            if r > worst.0 {
                worst = (r, format!("{k} {which}"));
            }
            d2 += md2;
            w2 += mw2;
        }
    }
    ((d2 / w2).sqrt(), worst.0, worst.1)
}

/// A `model_type` config: hidden `h`, MLP `i`, `layers`, `heads` / `kv`
/// heads of `d`, vocabulary `v` (`[h, i, layers, heads, kv, d, v]`).
fn config(model_type: &str, dims: [usize; 7], tied: bool) -> serde_json::Value {
    let [h, i, layers, heads, kv, d, v] = dims;
    let (eps, theta) = if model_type == "qwen3" {
        (1e-6, 1e6)
    } else {
        (1e-5, 1e4)
    };
    serde_json::json!({"model_type": model_type, "hidden_size": h, "intermediate_size": i,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
        "head_dim": d, "vocab_size": v, "tie_word_embeddings": tied,
        "rms_norm_eps": eps, "rope_theta": theta})
}

/// GQA 3/1 heads of 32 on h 96, an MLP of 200 (off the 32-wide tiles).
fn llama_gqa_odd() -> serde_json::Value {
    config("llama", [96, 200, 2, 3, 1, 32, 301], false)
}

/// Qwen3 with heads wider than h / heads, tied.
fn qwen3_wide_head() -> serde_json::Value {
    config("qwen3", [64, 160, 2, 4, 2, 32, 256], true)
}

/// Mistral with a sliding window of `window`.
fn mistral(window: usize) -> serde_json::Value {
    let mut c = config("mistral", [64, 160, 2, 4, 2, 16, 256], false);
    c["sliding_window"] = window.into();
    c
}

fn cases() -> Vec<Case> {
    const ALL: &[&str] = &[
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ];
    vec![
        Case {
            name: "llama_gqa_odd_mlp_nf4",
            config: llama_gqa_odd(),
            quant: QuantMode::Nf4,
            rank: 5,
            targets: ALL,
            dropout: 0.0,
            dora: false,
            rows: &[80, 61],
        },
        Case {
            name: "llama_gqa_odd_mlp_nf4_dropout",
            config: llama_gqa_odd(),
            quant: QuantMode::Nf4,
            rank: 5,
            targets: ALL,
            dropout: 0.1,
            dora: false,
            rows: &[80, 61],
        },
        Case {
            name: "qwen3_wide_head_tied_dropout",
            config: qwen3_wide_head(),
            quant: QuantMode::Nf4,
            rank: 16,
            targets: ALL,
            dropout: 0.05,
            dora: false,
            rows: &[47, 47, 30],
        },
        Case {
            name: "llama_mha_sizes_off_the_tiles_rank_33_f32_base",
            config: config("llama", [72, 136, 2, 2, 2, 36, 199], true),
            quant: QuantMode::None,
            rank: 33,
            targets: ALL,
            dropout: 0.0,
            dora: false,
            rows: &[33],
        },
        Case {
            name: "llama_some_targets_long_rows_fp4",
            config: config("llama", [64, 192, 3, 4, 2, 16, 320], false),
            quant: QuantMode::Fp4,
            rank: 8,
            targets: &["q_proj", "v_proj", "up_proj", "down_proj"],
            dropout: 0.0,
            dora: false,
            rows: &[150, 150],
        },
        Case {
            name: "llama_gate_without_up_dropout_bf16_base",
            config: config("llama", [64, 192, 2, 4, 4, 16, 320], false),
            quant: QuantMode::Bf16,
            rank: 12,
            targets: &["k_proj", "o_proj", "gate_proj"],
            dropout: 0.2,
            dora: false,
            rows: &[70, 20],
        },
        Case {
            name: "mistral_window_longer_than_the_rows",
            config: mistral(4096),
            quant: QuantMode::Nf4,
            rank: 8,
            targets: ALL,
            dropout: 0.05,
            dora: false,
            rows: &[90, 64],
        },
        Case {
            name: "mistral_short_window",
            config: mistral(24),
            quant: QuantMode::Nf4,
            rank: 8,
            targets: ALL,
            dropout: 0.0,
            dora: false,
            rows: &[90, 64],
        },
        Case {
            name: "llama_dora_nf4_dropout",
            config: llama_gqa_odd(),
            quant: QuantMode::Nf4,
            rank: 8,
            targets: ALL,
            dropout: 0.1,
            dora: true,
            rows: &[64, 50],
        },
        Case {
            name: "qwen3_dora_f32_base",
            config: qwen3_wide_head(),
            quant: QuantMode::None,
            rank: 4,
            targets: &["q_proj", "v_proj", "down_proj"],
            dropout: 0.0,
            dora: true,
            rows: &[40],
        },
    ]
}

#[test]
fn bf16_compute_follows_f32_compute_over_model_shapes() {
    let tiles = qlora_model::ops::amx::isa();
    match tiles {
        Some(isa) => eprintln!("bf16 compute on the {} tile products", isa.name()),
        None => eprintln!(
            "NOTE: no bf16 tile ISA (AMX, AVX512-BF16) here: bf16 compute runs the f32 fallback, \
             so this test compares f32 with itself"
        ),
    }
    let mut worst = 0f64;
    for (n, case) in cases().iter().enumerate() {
        let mut rng = Rng(1000 + n as u64);
        let mut m = model(case, &mut rng);
        let ad = adapter(case, &m, &mut rng);
        let b = batch(case, m.config.vocab_size, &mut rng);
        let (loss32, g32) = step(&m, &b, &ad, false);
        m.set_base_compute(BaseCompute::Bf16);
        let (loss16, g16) = step(&m, &b, &ad, false);
        let (loss_ck, g_ck) = step(&m, &b, &ad, true);
        let name = case.name;
        // checkpointing recomputes the same products: the same bits
        assert_eq!(
            loss16.to_bits(),
            loss_ck.to_bits(),
            "{name}: checkpointed loss"
        );
        for (k, g) in &g16 {
            assert_eq!(g.a.data(), g_ck[k].a.data(), "{name}: {k} A, checkpointed");
            assert_eq!(g.b.data(), g_ck[k].b.data(), "{name}: {k} B, checkpointed");
            assert_eq!(
                g.magnitude, g_ck[k].magnitude,
                "{name}: {k} m, checkpointed"
            );
        }
        assert_eq!(g16.len(), g32.len(), "{name}: modules");
        let rl = ((loss16 - loss32) / loss32).abs();
        let (rg, rm, module) = rel_err(&g16, &g32);
        eprintln!(
            "{name}: loss {loss32:.6} f32 vs {loss16:.6} bf16 (rel {rl:.2e}), gradients rel {rg:.2e}, \
             worst module {rm:.2e} ({module})"
        );
        // bf16 operands (8 bits of mantissa, rounding error 2^-9 each) under
        // f32 accumulation: a few units of 2^-9 through two or three layers;
        // a wrong index, a missing or doubled term is of order 1
        assert!(rl < 2f64.powi(-8), "{name}: loss rel {rl}");
        assert!(rg < 2f64.powi(-5), "{name}: gradients rel {rg}");
        assert!(rm < 2f64.powi(-4), "{name}: {module} rel {rm}");
        if tiles.is_some() {
            // the products did run in bf16
            assert!(rg > 0.0, "{name}: bf16 gradients equal f32's bit for bit");
        }
        worst = worst.max(rg);
    }
    eprintln!("worst gradient rel error {worst:.2e}");
}
