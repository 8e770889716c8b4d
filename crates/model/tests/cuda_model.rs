//! The whole model on CUDA against the CPU f32 path (tiny fixture, f32 and bnb-4bit):
//! loss, one training step's LoRA gradients, and KV-cached generation steps. Needs a
//! GPU (see cuda.rs for the skip rule and the tolerances).
#![cfg(feature = "cuda")]

mod cuda_support;

use cuda_support::{gpu, rel_l2};
use qlora_model::{Batch, Device, LoadOptions, Model, QuantMode, StepOptions};
use qlora_testutil::fixtures;

/// The whole model (tiny fixture, f32 and bnb-4bit): loss, logits and one
/// training step's LoRA gradients against the CPU f32 path.
#[test]
fn whole_model_loss_and_step_match_cpu() {
    if gpu().is_none() {
        return;
    }
    for dir in ["tiny_llama/model", "tiny_llama_bnb4/model"] {
        let cpu = Model::from_folder(
            fixtures().join(dir),
            &LoadOptions {
                quant: QuantMode::None,
            },
        )
        .unwrap();
        let mut dev = cpu.clone();
        dev.to_device(Device::Cuda(0)).unwrap();
        assert_eq!(dev.device(), Device::Cuda(0));
        let (_, adapter) = qlora_lora::load_adapter(
            fixtures().join("tiny_lora_adapter/adapter"),
            Some(&cpu.config),
        )
        .unwrap();
        let rows: Vec<Vec<u32>> = (0..2)
            .map(|r| {
                (0..24)
                    .map(|i| ((i * 37 + r * 101 + 5) % 320) as u32)
                    .collect()
            })
            .collect();
        let batch = Batch::from_ids(rows);
        let (lc, nc) = cpu.loss(&batch, Some(&adapter)).unwrap();
        let (lg, ng) = dev.loss(&batch, Some(&adapter)).unwrap();
        assert_eq!(nc, ng);
        assert!((lc - lg).abs() < 1e-2 * lc, "{dir}: loss {lc} vs {lg}");
        for checkpointing in [false, true] {
            let opts = StepOptions {
                loss_denominator: nc as f32,
                checkpointing,
                lora_dropout_seed: 3,
                ..Default::default()
            };
            let (sc, _, gc) = cpu.forward_backward(&batch, &adapter, &opts).unwrap();
            let (sg, _, gg) = dev.forward_backward(&batch, &adapter, &opts).unwrap();
            assert!((sc - sg).abs() < 1e-2 * sc, "{dir}: step loss {sc} vs {sg}");
            for (k, wc) in &gc {
                let wg = &gg[k];
                for (name, a, b) in [("A", &wg.a, &wc.a), ("B", &wg.b, &wc.b)] {
                    let (a, b) = (a.data(), b.data());
                    let e = rel_l2(a, b);
                    // bf16 GEMM operands through every layer: a few times 4e-3.
                    assert!(
                        e < 5e-2,
                        "{dir} {k} d{name}: rel L2 {e} (ckpt {checkpointing})"
                    );
                }
            }
        }
        // Generation path: KV-cached steps equal the full forward on the device.
        let toks: Vec<u32> = (0..9).map(|i| (i * 13 + 7) % 320).collect();
        let full: Vec<f32> = dev
            .forward_logits(&Batch::from_ids(vec![toks.clone()]), None)
            .unwrap()
            .into_vec();
        let mut cache = dev.new_cache();
        dev.forward_step(&mut cache, &toks[..5], None).unwrap();
        let last = dev.forward_step(&mut cache, &toks[5..6], None).unwrap();
        assert!(rel_l2(&last, &full[5 * 320..6 * 320]) < 1e-2);
    }
}
