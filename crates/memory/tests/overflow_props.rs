//! Huge sizes never wrap or panic: config.json values up to 2^40 (and 0) are
//! either refused by the config's bounds or sized without overflow, and plans
//! with huge batch / sequence / rank / threads either succeed or are refused
//! as too large. The test profile has `overflow-checks = true` (root
//! Cargo.toml), so any wrapping product in the size or plan arithmetic
//! panics here.

use proptest::prelude::*;
use qlora_config::ModelConfig;
use qlora_memory::plan::{self, PlanInput};
use qlora_memory::{size_report, Inventory, SizeOptions};

/// Log-uniform-ish u64 in [0, 2^bits): small values are as likely as huge ones.
fn wide(bits: u32) -> impl Strategy<Value = u64> {
    (0u32..bits, any::<u64>()).prop_map(|(b, x)| if b == 0 { 0 } else { x >> (64 - b) })
}

fn config_json() -> impl Strategy<Value = serde_json::Value> {
    (
        (wide(40), wide(40), wide(40)),
        (wide(40), wide(40), wide(40), wide(40)),
        any::<bool>(),
    )
        .prop_map(|((v, h, i), (l, a, kv, d), tie)| {
            serde_json::json!({
                "vocab_size": v, "hidden_size": h, "intermediate_size": i,
                "num_hidden_layers": l, "num_attention_heads": a, "num_key_value_heads": kv,
                "head_dim": d & !1, "tie_word_embeddings": tie,
            })
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn huge_config_values_are_refused_or_sized_exactly(j in config_json()) {
        let Ok(c) = ModelConfig::from_json(&j, "config.json") else {
            return Ok(());
        };
        // Accepted: the parameter count fits comfortably in u64 ...
        let p = c.param_count_u128();
        prop_assert!(p <= qlora_config::MAX_PARAMS);
        prop_assert!(c.num_hidden_layers <= qlora_config::MAX_LAYERS);
        // ... and the inventory agrees with it exactly (no wrapped product).
        let inv = Inventory::from_config(&c);
        prop_assert_eq!(inv.total_params() as u128, p);
        let r = size_report(&inv, "m", "config", &SizeOptions::default(), None);
        prop_assert_eq!(r.total_params as u128, p);
        prop_assert!(r.bytes["f32"] as u128 >= 4 * p);
    }

    #[test]
    fn huge_plan_inputs_are_planned_or_refused(
        (batch, seq, rank, threads) in (wide(64), wide(64), wide(64), wide(64)),
        ckpt in any::<bool>(),
        gpu in any::<bool>(),
        layers in 1u64..5,
    ) {
        let j = serde_json::json!({
            "vocab_size": 4096, "hidden_size": 256, "intermediate_size": 704,
            "num_hidden_layers": layers, "num_attention_heads": 8, "num_key_value_heads": 2,
        });
        let c = ModelConfig::from_json(&j, "c").unwrap();
        let inv = Inventory::from_config(&c);
        let p = PlanInput {
            batch: batch.max(1),
            seq: seq.max(1),
            rank,
            threads,
            checkpointing: ckpt,
            gpu,
            ..PlanInput::cpu_default()
        };
        match plan::plan(&inv, &c, &p) {
            Ok(pl) => {
                let b = &pl.per_device;
                prop_assert!(b.total_bytes >= b.frozen_weights);
                prop_assert!(b.total_bytes < 1 << 63);
            }
            Err(e) => prop_assert!(e.to_string().contains("too large"), "{e}"),
        }
        // the budget search treats "too large" as "does not fit"
        let budget = u64::MAX;
        let n = plan::largest_fitting(1 << 22, |s| {
            Ok(plan::plan(&inv, &c, &PlanInput { seq: s, ..p.clone() })?.per_device.total_bytes <= budget)
        });
        prop_assert!(n.is_ok());
    }
}
