//! Unit tests of the plan's terms, derived by hand from the trainer's code.
use super::*;

/// The fixtures' tiny Llama: h 64, I 160, 4 heads / 2 kv heads of 16, 2 layers, V 320.
fn tiny() -> ModelConfig {
    let j = serde_json::json!({
        "vocab_size": 320, "hidden_size": 64, "intermediate_size": 160,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "tie_word_embeddings": false,
    });
    ModelConfig::from_json(&j, "tiny").unwrap()
}

fn input(batch: u64, seq: u64, checkpointing: bool) -> PlanInput {
    PlanInput {
        batch,
        seq,
        checkpointing,
        threads: 2,
        ..PlanInput::cpu_default()
    }
}

/// A bf16 safetensors checkpoint's embedding and lm_head stay bf16 under a
/// 4-bit CPU plan (qlora-model keeps them as stored); norms stay f32, LoRA
/// (f32 base) and GPU plans are unchanged.
#[test]
fn bf16_stored_embedding_and_head_count_two_bytes_under_qlora() {
    let c = tiny();
    let plain = Inventory::from_config(&c);
    let mut bf16 = plain.clone();
    for t in &mut bf16.tensors {
        t.stored_bf16 = true;
    }
    let q = PlanInput {
        method: Method::Qlora,
        ..input(1, 128, false)
    };
    let frozen_of =
        |inv: &Inventory, p: &PlanInput| plan(inv, &c, p).unwrap().per_device.frozen_weights;
    // embed_tokens + lm_head, 320 x 64 each, 4 -> 2 bytes.
    assert_eq!(
        frozen_of(&plain, &q) - frozen_of(&bf16, &q),
        2 * 320 * 64 * 2
    );
    let lora = PlanInput {
        method: Method::Lora,
        ..q.clone()
    };
    assert_eq!(frozen_of(&plain, &lora), frozen_of(&bf16, &lora));
}

/// Batch 4 x 512 (T = 2048), f32, r 8 on all 7 targets, worked out by hand
/// from the shapes of `layer_forward` / `layer_backward` / the flash-style
/// attention / the chunked head.
#[test]
fn tiny_terms_by_hand() {
    let c = tiny();
    let p = input(4, 512, false);
    let saved: u64 = saved_per_layer(&c, &p).iter().map(|s| s.bytes).sum();
    // 5 T·h tensors (input, n1, att, x_mid, n2), 2 T rstd, q/k/v T·128,
    // the attention's log-sum-exp b·a·s (not its b·a·s² probabilities),
    // g/u/m 3 T·I, 7 LoRA x·Aᵀ T·r.
    let expect = 5 * 2048 * 64 * 4
        + 2 * 2048 * 4
        + 2048 * 128 * 4
        + 4 * 4 * 512 * 4
        + 3 * 2048 * 160 * 4
        + 7 * 2048 * 8 * 4;
    assert_eq!(saved, expect);
    assert_eq!(saved, 8_110_080);
    // --compute bf16 on CPU changes nothing here: the CPU backend's buffers
    // are f32 whatever the compute dtype.
    let bf16 = PlanInput {
        compute: DType::BF16,
        ..p.clone()
    };
    assert_eq!(saved_per_layer(&c, &bf16), saved_per_layer(&c, &p));
    // held 2·T·h; MLP 3·T·I = 3,932,160 beats attention (datt T·a·d +
    // final dq/dk/dv T·(a·d + 2·kv·d) on the main thread).
    assert_eq!(
        layer_workspace(&c, &p),
        2 * 2048 * 64 * 4 + 3 * 2048 * 160 * 4
    );
    // Worker arenas: the group gradients T·(a·d + 2·kv·d) (larger than the
    // forward's blocks T·a·(d+1)) + 2 busy threads' p and dp, 64 queries x
    // 512 keys each.
    assert_eq!(worker_arenas(&c, &p), 2048 * 128 * 4 + 2 * 2 * 64 * 512 * 4);
    // A GPU plan (PyTorch-style) has no arenas and keeps the probabilities;
    // there the attention phase (bf16) holds the group gradients and the
    // larger of the copies and the dp scratch.
    let long = PlanInput {
        seq: 2048,
        batch: 1,
        threads: 1,
        gpu: true,
        compute: DType::BF16,
        ..p.clone()
    };
    let t = 2048u64;
    assert_eq!(worker_arenas(&c, &long), 0);
    assert_eq!(
        layer_workspace(&c, &long),
        (2 * t * 64 + t * 64 + t * 128) * 2 + 2048 * 2048 * 4
    );
    assert!(saved_per_layer(&c, &long)
        .iter()
        .any(|s| s.name == "attn_probs" && s.bytes == 4 * 2048 * 2048 * 4));
    // Head phase: x, final norm output, its gradient (3·T·h), 1/rms, the
    // per-position losses (16 B each) and one chunk of f32 logits with its
    // gathered rows of nf: with V = 320 the chunk (2^23 / 320 rows) covers
    // all 2048 positions.
    assert_eq!(
        logits_and_loss(&c, &p, false, false),
        3 * 2048 * 64 * 4 + 2048 * 4 + 2048 * 16 + 2048 * (320 + 64) * 4
    );
}

/// The head's chunk of logits (`cross_entropy::head_forward_backward`):
/// 2^23 logits' worth of rows, at most T, a multiple of 32 from 32 rows on.
#[test]
fn head_chunk_rows_follow_the_trainer() {
    // SmolLM2 (V = 49,152): 8,388,608 / 49,152 = 170.7 -> 170 -> 160 rows
    assert_eq!(head_chunk_rows(49_152, 1024), 160);
    assert_eq!(head_chunk_rows(49_152, 100), 96);
    // Qwen2.5 (V = 151,936): 55 -> 32 rows; a 10^6 vocabulary: 8 rows
    assert_eq!(head_chunk_rows(151_936, 4096), 32);
    assert_eq!(head_chunk_rows(1_000_000, 4096), 8);
    // few positions: all of them (below 32 not rounded)
    assert_eq!(head_chunk_rows(320, 7), 7);
    // so a long sequence no longer pays T x V: SmolLM2 at 1 x 4096 holds
    // 160 x 49,152 f32 logits (31.5 MB), not 4096 x 49,152 (805 MB)
    let j = serde_json::json!({
        "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "head_dim": 64, "tie_word_embeddings": true,
    });
    let smol = ModelConfig::from_json(&j, "smollm2").unwrap();
    let t = 4096u64;
    assert_eq!(
        logits_and_loss(&smol, &input(1, 4096, false), false, false),
        3 * t * 576 * 4 + t * 4 + t * 16 + 160 * (49_152 + 576) * 4
    );
}

/// The one pass's scratch (`cross_entropy/online.rs`): slices of at most
/// 256 positions, as many at once as threads, every slice's gradient
/// accumulator kept until they are gathered.
#[test]
fn head_pass_scratch_follows_the_trainer() {
    let j = serde_json::json!({
        "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "head_dim": 64, "tie_word_embeddings": true,
    });
    let smol = ModelConfig::from_json(&j, "smollm2").unwrap();
    // 512 positions, 2 threads: two slices of 256
    let t = 512u64;
    assert_eq!(
        activations::head_pass_scratch(&smol, &input(2, 256, false)),
        16 * t + t * 4 * 576 + 2 * 256 * (2 * (576 + 256) + 4 * 256)
    );
    // 4096 positions: slices capped at 256, two of them alive at once
    let t = 4096u64;
    assert_eq!(
        activations::head_pass_scratch(&smol, &input(1, 4096, false)),
        16 * t + t * 4 * 576 + 2 * 256 * (2 * (576 + 256) + 4 * 256)
    );
    // 40 positions, 2 threads: one slice of 32 padded rows and one of 8 real in 32
    let t = 40u64;
    assert_eq!(
        activations::head_pass_scratch(&smol, &input(1, 40, false)),
        16 * t + t * 4 * 576 + 2 * 32 * (2 * (576 + 256) + 4 * 256)
    );
}

/// Checkpointing keeps the L layer inputs through the whole backward (the
/// CPU trainer also each layer's q, k, v, attention output, its
/// log-sum-exp, the residual after attention and the LoRA x·Aᵀ); one
/// layer's other tensors exist only inside that layer's backward.
#[test]
fn checkpointing_recomputes_one_layer_inside_its_backward() {
    let c = tiny();
    let inv = Inventory::from_config(&c);
    let off = plan(&inv, &c, &input(4, 512, false)).unwrap().per_device;
    let on = plan(&inv, &c, &input(4, 512, true)).unwrap().per_device;
    // input, attention output, residual (T x 64 each), q, k, v (T x (4 +
    // 2 + 2 heads) x 16), lse (4 x 4 heads x 512), the 7 targets' x·Aᵀ (T x
    // rank 8)
    let input_bytes = 3 * 2048 * 64 * 4 + 2048 * 128 * 4 + 4 * 4 * 512 * 4 + 7 * 2048 * 8 * 4;
    assert_eq!(off.activations, 2 * 8_110_080);
    assert_eq!(on.activations, 2 * input_bytes);
    assert_eq!(
        on.layer_workspace,
        off.layer_workspace + 8_110_080 - input_bytes
    );
    assert_eq!(on.logits_and_loss, off.logits_and_loss);
    assert_eq!(off.heap_retention, 0);
    assert_eq!(on.heap_retention, 8_110_080 - input_bytes);
    // Same fixed parts; the transient phase differs.
    let fixed = |b: &Breakdown| {
        b.train_peak - b.activations - b.layer_workspace.max(b.logits_and_loss) - b.heap_retention
    };
    assert_eq!(fixed(&on), fixed(&off));
}

/// When the head phase is the larger one (big vocabulary, short layers),
/// checkpointing adds one layer's forward set there only as heap
/// retention, and the layer inputs.
#[test]
fn head_phase_under_checkpointing_counts_heap_retention() {
    let j = serde_json::json!({
        "vocab_size": 100_000, "hidden_size": 64, "intermediate_size": 160,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "tie_word_embeddings": true,
    });
    let c = ModelConfig::from_json(&j, "big-vocab").unwrap();
    let inv = Inventory::from_config(&c);
    let b = plan(&inv, &c, &input(1, 128, true)).unwrap().per_device;
    assert!(b.logits_and_loss > b.layer_workspace);
    let one_layer: u64 = saved_per_layer(&c, &input(1, 128, true))
        .iter()
        .map(|s| s.bytes)
        .sum();
    // kept: input, attention output, residual (128 x 64 each), q, k, v
    // (128 x (4 + 2 + 2 heads) x 16), lse (4 x 128), the 7 targets' x·Aᵀ
    // (128 x rank 8)
    let kept = 3 * 128 * 64 * 4 + 128 * 128 * 4 + 4 * 128 * 4 + 7 * 128 * 8 * 4;
    assert_eq!(b.heap_retention, one_layer - kept);
    assert_eq!(
        b.train_peak,
        b.frozen_weights
            + b.trainable_params
            + b.gradients
            + b.optimizer_states
            + 2 * kept
            + b.logits_and_loss
            + b.heap_retention
            + b.dequant_workspace
            + b.worker_arenas
            + b.gemm_packing
            + b.lora_dropout_buffers
            + b.overhead
    );
    // LoRA dropout (the default): one block of 128 rows, one thread, down_proj's 160 wide
    assert_eq!(b.lora_dropout_buffers, (3 * 128 * 160 + 160) * 4);
    // A GPU plan models live bytes only.
    let g = PlanInput {
        gpu: true,
        ..input(1, 128, true)
    };
    assert_eq!(plan(&inv, &c, &g).unwrap().per_device.heap_retention, 0);
}

/// Loading peak: overhead + the resident mapped bytes + the frozen model +
/// one projection in f32; nothing when the files are unknown.
#[test]
fn load_peak_counts_resident_file_pages() {
    let c = tiny();
    let inv = Inventory::from_config(&c);
    let none = plan(&inv, &c, &input(1, 128, false)).unwrap().per_device;
    assert_eq!(none.load_peak, 0);
    let p = PlanInput {
        load_file_bytes: 1_000_000,
        tokenizer_bytes: tokenizer_bytes(320),
        ..input(1, 128, false)
    };
    let b = plan(&inv, &c, &p).unwrap().per_device;
    assert_eq!(b.tokenizer, 320 * 174);
    // largest projection: gate/up/down 160·64
    assert_eq!(
        b.load_peak,
        CPU_OVERHEAD + 1_000_000 + b.frozen_weights + 4 * 160 * 64 + 320 * 174
    );
    let without = plan(&inv, &c, &input(1, 128, false)).unwrap().per_device;
    assert_eq!(b.train_peak, without.train_peak + 320 * 174);
    assert_eq!(b.total_bytes, b.train_peak.max(b.load_peak));
}

/// `qlora train --cpu-offload` is a no-op for the CPU trainer: so is it for a
/// CPU plan (it once moved everything but the quant statistics off the
/// "device", whose memory is the same host RAM).
#[test]
fn cpu_offload_changes_nothing_in_a_cpu_plan() {
    let c = tiny();
    let inv = Inventory::from_config(&c);
    let p = input(1, 128, false);
    let off = PlanInput {
        cpu_offload: true,
        ..p.clone()
    };
    assert_eq!(
        plan(&inv, &c, &off).unwrap().per_device,
        plan(&inv, &c, &p).unwrap().per_device
    );
}

/// A GPU plan with CPU offload keeps on the device the quant statistics,
/// two gathered decoder-layer units and the whole root unit (embedding,
/// final norm, lm_head), which FSDP keeps gathered through the step. Before,
/// the root was averaged into the layer units and so counted only 2/L of it.
#[test]
fn gpu_cpu_offload_counts_embedding_and_lm_head_whole() {
    // 8 layers of the tiny shapes, a 100,000-token vocabulary, untied head
    let j = serde_json::json!({
        "vocab_size": 100_000, "hidden_size": 64, "intermediate_size": 160,
        "num_hidden_layers": 8, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "tie_word_embeddings": false,
    });
    let c = ModelConfig::from_json(&j, "big-vocab").unwrap();
    let inv = Inventory::from_config(&c);
    let p = PlanInput {
        gpu: true,
        compute: DType::BF16,
        threads: 1,
        ..input(1, 128, false)
    };
    let offload = PlanInput {
        cpu_offload: true,
        ..p.clone()
    };
    let on = plan(&inv, &c, &offload).unwrap().per_device;
    let off = plan(&inv, &c, &p).unwrap().per_device;
    assert_eq!(on.frozen_weights, on.quant_stats);
    // root: embed_tokens and lm_head 100,000 x 64, final norm 64, bf16
    let root = (2 * 100_000 * 64 + 64) * 2;
    // one layer unit: NF4 codes of q 64x64, k 32x64, v 32x64, o 64x64,
    // gate/up 160x64, down 64x160 (n/2 bytes each) + 2 bf16 norms of 64,
    // + its share of the f32 LoRA weights, r 8 x Σ(in + out) = 8 x 1,120
    let codes = (4096 + 2048 + 2048 + 4096 + 3 * 10_240) / 2;
    let unit = codes + 2 * 64 * 2 + 4 * 8 * 1_120;
    // one device, no peer: nothing gathered without offload
    assert_eq!(off.communication, 0);
    assert_eq!(on.communication, 2 * unit + root);
    assert_eq!(
        on.host_offloaded,
        off.frozen_weights - off.quant_stats
            + off.trainable_params
            + off.gradients
            + off.optimizer_states
    );
}

/// `--use-dora`: one magnitude per output feature of every target (the count
/// PEFT reports for the DoRA fixture: 10,112 − 8,960 = 1,152 on the tiny model
/// with all 7 targets), with its f32 copies, gradients and AdamW moments like
/// the LoRA matrices; per layer the saved `u` (T·out per target) and the
/// norm and magnitude copies (2·out f32 per target); in the layer backward the
/// largest target's DoRA buffers ((2·out + in)·T: gate/up, out 160, in 64).
#[test]
fn dora_adds_magnitudes_and_their_activations() {
    let c = tiny();
    let inv = Inventory::from_config(&c);
    assert_eq!(dora_params(&c, &input(1, 1, false).targets).unwrap(), 1152);
    for ck in [false, true] {
        let p = input(2, 64, ck);
        let d = PlanInput {
            dora: true,
            ..p.clone()
        };
        let (a, b) = (plan(&inv, &c, &p).unwrap(), plan(&inv, &c, &d).unwrap());
        assert_eq!(b.trainable_count - a.trainable_count, 1152);
        let (x, y) = (&a.per_device, &b.per_device);
        assert_eq!(y.trainable_params - x.trainable_params, 8 * 1152);
        assert_eq!(y.gradients - x.gradients, 8 * 1152);
        assert_eq!(y.optimizer_states - x.optimizer_states, 8 * 1152);
        let t = 128;
        let per_layer = t * 576 * 4 + 576 * 2 * 4;
        let workspace = (2 * 160 + 64) * t * 4;
        if ck {
            // only layer inputs persist; one layer's DoRA tensors are recomputed
            assert_eq!(y.activations, x.activations);
            assert_eq!(y.layer_workspace - x.layer_workspace, per_layer + workspace);
        } else {
            assert_eq!(y.activations - x.activations, 2 * per_layer);
            assert_eq!(y.layer_workspace - x.layer_workspace, workspace);
        }
        assert!(y.total_bytes > x.total_bytes);
    }
}

/// The gemm crate's per-thread packing slab: resident as far as the
/// largest packed left operand reaches, at most the L2 size.
#[test]
fn gemm_packing_slabs_by_hand() {
    let c = tiny();
    // T = 1024: the head's logits gradient (all 1024 rows x V 320, k below
    // 512) is the largest left operand: 1,310,720 B per thread, 2 threads
    let p = input(1, 1024, false);
    assert_eq!(activations::gemm_packing(&c, &p), 2 * 1024 * 320 * 4);
    // with a 1 MiB L2 the slab caps it
    let small_l2 = PlanInput {
        l2_bytes: 1 << 20,
        ..p.clone()
    };
    assert_eq!(activations::gemm_packing(&c, &small_l2), 2 << 20);
    // SmolLM2 at 1 x 1024: a layer's rows x kc = 512 (I = 1536 > 512) is 2 MiB,
    // the head's 160 rows x 512 only 320 KiB: one 2 MiB slab per thread
    let j = serde_json::json!({
        "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "head_dim": 64, "tie_word_embeddings": true,
    });
    let smol = ModelConfig::from_json(&j, "smollm2").unwrap();
    assert_eq!(activations::gemm_packing(&smol, &p), 2 * 1024 * 512 * 4);
    // GPU plans: none
    let g = PlanInput { gpu: true, ..p };
    assert_eq!(activations::gemm_packing(&c, &g), 0);
}

/// LoRA dropout's per-thread buffers (`ops/lora.rs` `DropoutScratch`, the
/// AMX forward's masked row groups), by hand.
#[test]
fn lora_dropout_buffers_by_hand() {
    let c = tiny();
    let inv = Inventory::from_config(&c);
    // T = 512: 4 LoRA row blocks of 128; the widest target input is
    // down_proj's 160; 2 threads each keep a block's mask, masked input and
    // unmasked term (3 x 128 x 160 f32) and a row of ones
    let p = input(2, 256, false);
    assert_eq!(activations::lora_chunk_rows(512), 128);
    assert_eq!(
        activations::lora_dropout_buffers(&c, &p),
        2 * (3 * 128 * 160 + 160) * 4
    );
    // bf16 compute adds the AMX forward's masked row group, 16 rows, per thread
    let bf16 = PlanInput {
        compute: DType::BF16,
        ..p.clone()
    };
    assert_eq!(
        activations::lora_dropout_buffers(&c, &bf16),
        2 * (3 * 128 * 160 + 160) * 4 + 2 * 16 * 160 * 4
    );
    // a short batch is one block: one thread runs it (T = 100: 100 rows)
    let short = input(1, 100, false);
    assert_eq!(activations::lora_chunk_rows(100), 100);
    assert_eq!(
        activations::lora_dropout_buffers(&c, &short),
        (3 * 100 * 160 + 160) * 4
    );
    // T = 4096: 8 blocks of 512 rows
    assert_eq!(activations::lora_chunk_rows(4096), 512);
    // targets without down_proj: the widest input is h = 64
    let attn = PlanInput {
        targets: vec!["q_proj".into(), "v_proj".into()],
        ..p.clone()
    };
    assert_eq!(
        activations::lora_dropout_buffers(&c, &attn),
        2 * (3 * 128 * 64 + 64) * 4
    );
    // none without dropout, for full fine-tuning and in GPU plans
    for q in [
        PlanInput {
            lora_dropout: 0.0,
            ..p.clone()
        },
        PlanInput {
            method: Method::Full,
            ..p.clone()
        },
        PlanInput {
            gpu: true,
            ..p.clone()
        },
    ] {
        assert_eq!(activations::lora_dropout_buffers(&c, &q), 0);
    }
    // the plan adds them to the training peak and nothing else
    let (with, without) = (
        plan(&inv, &c, &p).unwrap().per_device,
        plan(
            &inv,
            &c,
            &PlanInput {
                lora_dropout: 0.0,
                ..p.clone()
            },
        )
        .unwrap()
        .per_device,
    );
    assert_eq!(with.lora_dropout_buffers, 2 * (3 * 128 * 160 + 160) * 4);
    assert_eq!(without.lora_dropout_buffers, 0);
    assert_eq!(
        with.train_peak,
        without.train_peak + with.lora_dropout_buffers
    );
}

/// The attention's query parts (`qlora-model` `query_parts`, whose test pins
/// the same ends) and the later parts' `dK`, `dV` in the worker arenas.
#[test]
fn attention_parts_follow_the_trainer() {
    assert_eq!(activations::attention_part_ends(4), vec![4]);
    assert_eq!(activations::attention_part_ends(8), vec![8]);
    assert_eq!(activations::attention_part_ends(16), vec![8, 11, 14, 16]);
    assert_eq!(activations::attention_part_ends(0), vec![0]);
    for nb in 9..60 {
        let ends = activations::attention_part_ends(nb);
        assert!((2..=4).contains(&ends.len()) && *ends.last().unwrap() == nb);
    }
    let c = tiny();
    // 512 positions (8 blocks): one part, nothing more
    let short = PlanInput {
        compute: DType::BF16,
        ..input(2, 512, false)
    };
    let long = PlanInput {
        compute: DType::BF16,
        ..input(1, 1024, false)
    };
    let f32_long = input(1, 1024, false);
    let base = |p: &PlanInput| {
        let t = p.batch * p.seq;
        t * (4 * 16 + 2 * 2 * 16) * 4 + 2 * 2 * 64 * p.seq * 4
    };
    assert_eq!(worker_arenas(&c, &short), base(&short));
    // in f32 the later parts keep dK, dV over all 1024 keys each
    assert_eq!(
        worker_arenas(&c, &f32_long),
        base(&f32_long) + 2 * 3 * 1024 * 2 * 16 * 4
    );
    // 1024 positions: parts ending at blocks 8, 11, 14, 16; the later three
    // keep dK, dV over 704, 896 and 1024 keys, per kv head (2), d 16
    assert_eq!(
        worker_arenas(&c, &long),
        base(&long) + 2 * (704 + 896 + 1024) * 2 * 16 * 4
    );
    // a Mistral window shorter than the sequence: the f32 attention's parts
    // even with bf16 compute; one at least as long: the tiles'
    let mistral = |w: u64| {
        ModelConfig::from_json(
            &serde_json::json!({
                "model_type": "mistral", "vocab_size": 320, "hidden_size": 64,
                "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "head_dim": 16, "sliding_window": w,
            }),
            "mistral",
        )
        .unwrap()
    };
    assert_eq!(
        worker_arenas(&mistral(256), &long),
        base(&long) + 2 * 3 * 1024 * 2 * 16 * 4
    );
    assert_eq!(
        worker_arenas(&mistral(4096), &long),
        worker_arenas(&c, &long)
    );
}

/// The CPU trainer's `--shard full` over 2 processes, by hand on the tiny model
/// (NF4 + DQ): each of the 14 projections keeps half of its codes and statistics
/// but its whole 16-entry map, nested map and offset (64 + 1024 + 4 bytes); the
/// root, the adapter, its gradients and AdamW states stay whole; one layer
/// (29,848 bytes as stored) is gathered with its receive copy.
#[test]
fn cpu_full_sharding_by_hand() {
    let c = tiny();
    let inv = Inventory::from_config(&c);
    let one = plan(&inv, &c, &input(1, 64, false)).unwrap().per_device;
    let two = plan(
        &inv,
        &c,
        &PlanInput {
            devices: 2,
            sharding: Sharding::Full,
            ..input(1, 64, false)
        },
    )
    .unwrap()
    .per_device;
    // per layer as stored: q, o 3,208 B; k, v 2,152 B; gate, up, down 6,376 B
    let layer = 2 * 3208 + 2 * 2152 + 3 * 6376;
    assert_eq!(layer, 29_848);
    // kept of each: (bytes - 1,092) / 2 + 1,092
    let kept = 2 * 2150 + 2 * 1622 + 3 * 3734;
    assert_eq!(
        one.frozen_weights - two.frozen_weights,
        2 * (layer - kept) as u64
    );
    assert_eq!(two.communication, 2 * layer as u64);
    assert_eq!(
        (two.trainable_params, two.gradients, two.optimizer_states),
        (one.trainable_params, one.gradients, one.optimizer_states)
    );
    // none: nothing divided, no gathers
    let none = plan(
        &inv,
        &c,
        &PlanInput {
            devices: 2,
            sharding: Sharding::None,
            ..input(1, 64, false)
        },
    )
    .unwrap()
    .per_device;
    assert_eq!(none, one);
}

/// A sharded process's load peak: the tokenizer's construction heap when the
/// rank's share of the layers is smaller than it (by hand on the tiny model).
#[test]
fn sharded_load_peak_counts_the_tokenizer_build() {
    let c = tiny();
    let inv = Inventory::from_config(&c);
    let p = PlanInput {
        devices: 2,
        sharding: Sharding::Full,
        load_file_bytes: 1 << 20,
        tokenizer_bytes: tokenizer_bytes(320),
        ..input(1, 64, false)
    };
    let b = plan(&inv, &c, &p).unwrap().per_device;
    // root: f32 embedding and lm_head 2 x 320 x 64 x 4 + final norm 64 x 4
    let root = 2 * 320 * 64 * 4 + 64 * 4;
    let build = 320 * TOKENIZER_BUILD_BYTES_PER_TOKEN;
    assert_eq!(b.load_peak, p.overhead + (1 << 20) + root + build);
    // unsharded: the old sum
    let q = PlanInput {
        sharding: Sharding::None,
        ..p.clone()
    };
    let u = plan(&inv, &c, &q).unwrap().per_device;
    let largest = 4 * 160 * 64;
    assert_eq!(
        u.load_peak,
        q.overhead + (1 << 20) + u.frozen_weights + largest + tokenizer_bytes(320)
    );
}

/// `--compute bf16` on the CPU trainer (AMX): storage as in f32 (an f32
/// checkpoint stays f32); for an lm_head with rows longer than 1024 its bf16
/// copy kept after the first step (packed twice: the forward's and the input
/// gradient's layouts), for a shorter one each slice's packs of a vocabulary
/// block instead; plus the AMX workspace (the input gradient's bf16 weight chunk, at most
/// 2^22 elements, as big as the model's linears make it; the forward's
/// 2^20-element round of panels and the largest bf16 activation pack). Measured on the
/// SmolLM2 shape without checkpointing: plan 950 MiB, trainer 944 MiB
/// (BENCHMARKS.md).
#[test]
fn cpu_bf16_compute_counts_the_head_copy_and_the_amx_workspace() {
    let c = tiny();
    let inv = Inventory::from_config(&c);
    let f32p = PlanInput {
        method: Method::Qlora,
        ..input(1, 128, false)
    };
    let bf16p = PlanInput {
        compute: DType::BF16,
        ..f32p.clone()
    };
    let (a, b) = (
        plan(&inv, &c, &f32p).unwrap().per_device,
        plan(&inv, &c, &bf16p).unwrap().per_device,
    );
    // the untied lm_head, 320 x 64: rows of 64, no kept copy
    assert_eq!(b.frozen_weights, a.frozen_weights);
    // the weight chunk (gate/up: all 160 rows of 64; down: 64 rows of 160),
    // bf16 + the forward's round of panels 2^20 bf16 + the widest layer
    // input (128 x 160), bf16: the packed head's one pass packs its own
    assert_eq!(activations::amx_chunk_elems(&c, 128, 8, true), 160 * 64);
    assert_eq!(
        b.dequant_workspace,
        2 * 160 * 64 + 2 * (1 << 20) + 2 * 128 * 160
    );
    // the head phase: no chunk of 128 x 320 f32 logits (and its 128 x 64
    // gathered rows), the one pass's
    // scratch instead: 128 counted positions (16 B), 2 slices of 64 rows
    // with their bf16 inputs (64 wide) and probabilities (a block of 256),
    // f32 logits of a block and the gradient accumulator, and each slice's
    // block of 256 head rows packed in both layouts (bf16)
    assert_eq!(
        b.logits_and_loss + 128 * (320 + 64) * 4,
        a.logits_and_loss
            + 128 * 16
            + 2 * 64 * 2 * (64 + 256)
            + 128 * 4 * (256 + 64)
            + 2 * 2 * 2 * 256 * 64
    );
    // TinyLlama's shapes fill the chunk: q/o and gate/up 2048 rows of 2048,
    // down 736 rows of 5632; a 4-bit base over 512 positions runs those in
    // column groups (dy packed >= 512 KiB, >= 32 panels), k/v's 256 rows of
    // 2048 stay (dy 512 x 288 packed is 288 KiB)
    let tl = ModelConfig::from_json(
        &serde_json::json!({
            "vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632,
            "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
        }),
        "tinyllama",
    )
    .unwrap();
    assert_eq!(
        activations::amx_chunk_elems(&tl, 512, 16, false),
        2048 * 2048
    );
    // its f32 head (rows of 2048) is copied, packed for both directions,
    // and the one pass packs no blocks
    let tl_inv = Inventory::from_config(&tl);
    let (tf, tb) = (
        plan(&tl_inv, &tl, &f32p).unwrap().per_device,
        plan(&tl_inv, &tl, &bf16p).unwrap().per_device,
    );
    assert_eq!(tb.frozen_weights - tf.frozen_weights, 2 * 2 * 32000 * 2048);
    assert_eq!(
        tb.logits_and_loss + 128 * (32000 + 2048) * 4,
        tf.logits_and_loss + activations::head_pass_scratch(&tl, &bf16p)
    );
    assert_eq!(activations::amx_chunk_elems(&tl, 512, 16, true), 256 * 2048);
    // over 64 positions dy packed is 64 x 5664 x 2 = 708 KiB for gate/up
    // (grouped), 64 x 2080 x 2 = 260 KiB for q/o and down (chunks)
    assert_eq!(activations::amx_chunk_elems(&tl, 64, 16, true), 2048 * 2048);
    assert_eq!(
        (b.activations, b.layer_workspace),
        (a.activations, a.layer_workspace)
    );
    // GPU plans keep their meaning of --compute (16-bit storage and activations)
    let gpu = PlanInput {
        gpu: true,
        ..bf16p.clone()
    };
    assert!(plan(&inv, &c, &gpu).unwrap().per_device.frozen_weights < a.frozen_weights);
}

/// Many layers, long batches: the kept tensors' fragments (a third of
/// them) outweigh one layer's freed set.
#[test]
fn checkpointing_many_layers_retains_a_third_of_the_kept_tensors() {
    let j = serde_json::json!({
        "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "head_dim": 64, "tie_word_embeddings": true,
    });
    let c = ModelConfig::from_json(&j, "smollm2-like").unwrap();
    let inv = Inventory::from_config(&c);
    let p = input(4, 512, true);
    let b = plan(&inv, &c, &p).unwrap().per_device;
    let one_layer: u64 = saved_per_layer(&c, &p).iter().map(|s| s.bytes).sum();
    assert_eq!(b.activations, 30 * checkpoint_kept_bytes(&c, &p));
    assert!(b.activations / CKPT_FRAGMENTATION_DIV > one_layer - checkpoint_kept_bytes(&c, &p));
    assert_eq!(b.heap_retention, b.activations / CKPT_FRAGMENTATION_DIV);
    // without checkpointing nothing is counted
    let off = plan(&inv, &c, &input(4, 512, false)).unwrap().per_device;
    assert_eq!(off.heap_retention, 0);
}
