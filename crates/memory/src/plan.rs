//! Training-memory plan per device (`qlora plan`).
//!
//! The plan is a sum of named components (FORMATS.md §6.2–6.4). The
//! activation term is *not* a borrowed constant: [`saved_per_layer`] lists the
//! tensors this project's trainer (`qlora-model`'s hand-written per-layer
//! forward/backward) keeps for the backward of one decoder layer, and
//! [`layer_workspace`] the transient buffers of one layer's backward. Update
//! those two functions when the trainer changes what it keeps.

use serde::Serialize;

use crate::bnb::{self, Bnb4, QuantType};
use crate::inventory::{Inventory, Role};
use crate::MemoryError;
use qlora_config::ModelConfig;

/// What is trained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Every parameter trainable.
    Full,
    /// LoRA adapters on a frozen base kept in the compute dtype.
    Lora,
    /// LoRA adapters on a frozen bnb-4bit base.
    Qlora,
}

/// Optimizer state kept per trainable parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Optimizer {
    /// Two f32 moments (8 B/param): torch AdamW and `qlora-train`.
    AdamW,
    /// bitsandbytes 8-bit blockwise AdamW: two u8 moments + an f32 absmax per
    /// 256-element block each (≈2.03 B/param).
    AdamW8bit,
    /// Plain SGD without momentum: no state.
    Sgd,
}

/// How parameters, gradients and optimizer states are split across devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Sharding {
    /// Every device holds everything (DDP / NO_SHARD).
    None,
    /// FSDP FULL_SHARD: params, grads and optimizer states divided by N.
    Full,
    /// FSDP SHARD_GRAD_OP: grads and optimizer states divided by N.
    GradOp,
}

/// Element type of activations and unquantized frozen weights.
pub use qlora_quant::DType;

/// Serialize a dtype by its short name (`f32`, `bf16`, `f16`).
pub(crate) fn serialize_dtype<S: serde::Serializer>(d: &DType, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(d.short_name())
}

/// Everything a plan depends on.
#[derive(Debug, Clone, Serialize)]
pub struct PlanInput {
    pub method: Method,
    /// LoRA rank (ignored for full fine-tuning).
    pub rank: u64,
    /// LoRA target short names (`q_proj`, ..., `down_proj`).
    pub targets: Vec<String>,
    pub optimizer: Optimizer,
    /// Micro-batch per device.
    pub batch: u64,
    pub seq: u64,
    /// Gradient accumulation: gradients persist between micro-batches, so it
    /// adds no memory beyond the (already counted) gradient buffers.
    pub grad_accum: u64,
    pub checkpointing: bool,
    /// Activation / compute dtype (`f32` for this project's CPU trainer).
    #[serde(serialize_with = "serialize_dtype")]
    pub compute: DType,
    /// Storage of the frozen 4-bit base (QLoRA).
    pub quant: Bnb4,
    pub devices: u64,
    pub sharding: Sharding,
    /// FSDP CPU offload of (sharded) parameters, gradients and optimizer states.
    pub cpu_offload: bool,
    /// Fixed runtime overhead per device (process/CUDA context), bytes.
    pub overhead: u64,
    /// GPU-style plan: adds FSDP communication buffers; CPU plans model RSS.
    pub gpu: bool,
    /// Worker threads of the CPU trainer (each holds one attention head's
    /// backward scratch); 1 for GPU plans.
    pub threads: u64,
    /// Bytes of the memory-mapped checkpoint still resident at the end of
    /// loading (0 = unknown / not loading from files): the whole file for a
    /// GGUF (`qlora-gguf` keeps every touched page until the map is dropped),
    /// about one tensor for safetensors (`qlora-formats` releases each
    /// tensor's pages once it is converted). See [`Breakdown::load_peak`].
    pub load_file_bytes: u64,
    /// Bytes of the tokenizer the trainer keeps alive (0 = none: an HF
    /// folder without tokenizer.json). See [`tokenizer_bytes`].
    pub tokenizer_bytes: u64,
}

impl PlanInput {
    /// This project's trainer on CPU: QLoRA NF4+DQ, r=8 on all 7 projections,
    /// AdamW f32, f32 compute, one process.
    pub fn cpu_default() -> PlanInput {
        PlanInput {
            method: Method::Qlora,
            rank: 8,
            targets: ALL_TARGETS.iter().map(|s| s.to_string()).collect(),
            optimizer: Optimizer::AdamW,
            batch: 1,
            seq: 512,
            grad_accum: 1,
            checkpointing: false,
            compute: DType::F32,
            quant: Bnb4::new(QuantType::Nf4, 64, true),
            devices: 1,
            sharding: Sharding::None,
            cpu_offload: false,
            overhead: CPU_OVERHEAD,
            gpu: false,
            threads: 1,
            load_file_bytes: 0,
            tokenizer_bytes: 0,
        }
    }
}

/// Every LoRA target (the seven projection linears, `qlora-config`'s list).
pub const ALL_TARGETS: [&str; 7] = qlora_config::LINEAR_NAMES;

/// Fixed resident memory of a `qlora train` process apart from the model,
/// adapter, optimizer and activations: the pages of the binary's code it
/// touches (file-backed, ~8 MiB), thread stacks, rayon and gemm per-thread
/// scratch and allocator arenas (anonymous, ~1.3 MiB). Calibrated from
/// measurement (BENCHMARKS.md "Memory planner: validation against the
/// trainer"): the smallest run (tiny fixture model, QLoRA r 8, batch 1 x 8
/// tokens, 2 steps, `QLORA_MEM_TRACE=reset`) peaks at VmHWM 10,244 KiB =
/// 10,489,856 B, of which the plan's other terms are 785,072 B:
/// 10,489,856 − 785,072 = 9,704,784 B ≈ 9.26 MiB.
pub const CPU_OVERHEAD: u64 = 9_704_784;

/// Resident bytes per vocabulary entry of a loaded byte-level BPE tokenizer
/// (`tokenizers`' vocab and reverse vocab maps, merges, added tokens).
/// Measured: building SmolLM2's 49,152-token tokenizer from its GGUF metadata
/// and dropping it again frees 8,356 KiB of anonymous memory → 174 B/token.
pub const TOKENIZER_BYTES_PER_TOKEN: u64 = 174;

/// Tokenizer memory for a vocabulary of `vocab` entries.
pub fn tokenizer_bytes(vocab: u64) -> u64 {
    vocab * TOKENIZER_BYTES_PER_TOKEN
}

/// Assumed CUDA context + allocator slack on a GPU (not measurable here;
/// typical PyTorch CUDA 12 context ≈ 0.5 GiB).
pub const GPU_OVERHEAD: u64 = 512 << 20;

/// Elements of a frozen weight expanded to f32 at once (`qlora-model`
/// `ops::linear::TILE_ELEMS`, 4 MiB).
pub const DEQUANT_TILE_ELEMS: u64 = 1 << 20;

/// Per-device memory, by component (bytes).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Breakdown {
    /// Frozen base: quantized storage (4-bit codes) and unquantized tensors.
    pub frozen_weights: u64,
    /// Of `frozen_weights`: absmax / code maps (never sharded by FSDP, §5.1).
    pub quant_stats: u64,
    pub trainable_params: u64,
    pub gradients: u64,
    pub optimizer_states: u64,
    /// Tensors saved for the backward that persist through the whole
    /// backward: every layer's set, or only the layer inputs with checkpointing.
    pub activations: u64,
    /// Transient buffers of one layer's backward (with checkpointing also the
    /// layer's re-created activations). The total counts only the larger of
    /// this and `logits_and_loss` (they are never alive together).
    pub layer_workspace: u64,
    /// Head phase: final norm, f32 logits (turned into their gradient in place).
    pub logits_and_loss: u64,
    /// CPU plans with checkpointing: one layer's forward tensors, freed by
    /// the forward pass but kept in the heap by glibc's allocator (blocks are
    /// reused, not returned to the system), resident in the head phase. The
    /// total counts `logits_and_loss + heap_retention` against
    /// `layer_workspace` (whose re-created layer reuses those blocks).
    pub heap_retention: u64,
    /// The tokenizer `qlora train` keeps (GGUF metadata or tokenizer.json).
    pub tokenizer: u64,
    /// CPU plans: attention-backward buffers retained in the worker threads'
    /// allocator arenas (see [`worker_arenas`]).
    pub worker_arenas: u64,
    /// f32 tile a frozen linear is expanded into before its matmul.
    pub dequant_workspace: u64,
    /// FSDP all-gather / reduce-scatter buffers (GPU plans, >1 device).
    pub communication: u64,
    pub overhead: u64,
    /// Peak while loading (CPU trainer): overhead + the resident part of the
    /// memory-mapped checkpoint + the frozen model + the f32 copy of the
    /// largest projection being converted. 0 when the files are unknown.
    pub load_peak: u64,
    /// Training peak: the sum of the components above, counting only the larger
    /// of `layer_workspace` and `logits_and_loss + heap_retention`.
    pub train_peak: u64,
    /// `max(train_peak, load_peak)`: what the process needs at its peak.
    pub total_bytes: u64,
    /// Held in host RAM instead (CPU offload).
    pub host_offloaded: u64,
}

/// A plan with its inputs.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub input: PlanInput,
    pub trainable_count: u64,
    pub per_device: Breakdown,
}

/// The dimensions the planner needs.
#[derive(Clone, Copy)]
struct Dims {
    h: u64,
    i: u64,
    l: u64,
    a: u64,
    kv: u64,
    d: u64,
}

fn dims(c: &ModelConfig) -> Dims {
    Dims {
        h: c.hidden_size as u64,
        i: c.intermediate_size as u64,
        l: c.num_hidden_layers as u64,
        a: c.num_attention_heads as u64,
        kv: c.num_key_value_heads as u64,
        d: c.head_dim as u64,
    }
}

/// `(in, out)` of a projection by short name.
fn target_in_out(c: &ModelConfig, t: &str) -> Option<(u64, u64)> {
    c.linear_shapes()
        .iter()
        .find(|(n, _)| *n == t)
        .map(|(_, [o, i])| (*i as u64, *o as u64))
}

/// LoRA parameters: Σ_layers Σ_targets r·(in + out) (FORMATS.md §3.5).
pub fn lora_params(c: &ModelConfig, rank: u64, targets: &[String]) -> Result<u64, MemoryError> {
    let mut per_layer = 0;
    for t in targets {
        let (i, o) = target_in_out(c, t).ok_or_else(|| {
            MemoryError::Invalid(format!(
                "unknown LoRA target {t:?} (expected one of {})",
                ALL_TARGETS.join(", ")
            ))
        })?;
        per_layer += rank * (i + o);
    }
    Ok(per_layer * c.num_hidden_layers as u64)
}

/// One tensor the trainer keeps for the backward of a decoder layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Saved {
    pub name: &'static str,
    pub bytes: u64,
}

/// What `qlora-model`'s decoder layer keeps from its forward for its
/// backward, for one layer and `b` sequences of `s` tokens (T = b·s), in the
/// compute dtype (`e` bytes; the attention probabilities and RMSNorm
/// reciprocals are f32 whatever the compute dtype):
///
/// | tensor | shape |
/// |---|---|
/// | layer input `x` | T·h |
/// | `rmsnorm₁(x)` (input of q/k/v and of their LoRA A) + 1/rms | T·h + T |
/// | q, k, v after RoPE | T·(a·d + 2·kv·d) |
/// | attention probabilities | b·a·s² |
/// | attention output (input of o_proj) | T·a·d |
/// | `x + attn` (input of norm₂) | T·h |
/// | `rmsnorm₂` + 1/rms | T·h + T |
/// | gate, up, `silu(gate)·up` (input of down_proj) | 3·T·I |
/// | LoRA `x·Aᵀ` per target | T·r each |
pub fn saved_per_layer(c: &ModelConfig, p: &PlanInput) -> Vec<Saved> {
    let Dims { h, i, a, kv, d, .. } = dims(c);
    let (b, s) = (p.batch, p.seq);
    let t = b * s;
    let e = p.compute.size_in_bytes() as u64;
    let mut v = vec![
        Saved {
            name: "layer_input",
            bytes: t * h * e,
        },
        Saved {
            name: "norm1_out",
            bytes: t * h * e + t * 4,
        },
        Saved {
            name: "q_k_v_rope",
            bytes: t * (a * d + 2 * kv * d) * e,
        },
        Saved {
            name: "attn_probs",
            bytes: b * a * s * s * 4,
        },
        Saved {
            name: "attn_out",
            bytes: t * a * d * e,
        },
        Saved {
            name: "residual1",
            bytes: t * h * e,
        },
        Saved {
            name: "norm2_out",
            bytes: t * h * e + t * 4,
        },
        Saved {
            name: "gate_up_act",
            bytes: 3 * t * i * e,
        },
    ];
    if p.method != Method::Full {
        let n = p.targets.len() as u64;
        v.push(Saved {
            name: "lora_xa",
            bytes: n * t * p.rank * e,
        });
    }
    v
}

/// Transient buffers alive during one layer's backward
/// (`qlora-model::backward::layer_backward`), at the worst moment: the final
/// norm output (kept alive by the head until the end of the step, T·h), the
/// incoming gradient (T·h), and the larger of
/// * the MLP phase: `dm`, `dg`, `du` (3·T·I), then `dn2` + `dg` + `du`;
/// * the attention phase: `datt` (T·a·d) and the final `dq, dk, dv`
///   (T·(a·d + 2·kv·d)); the per-(sequence, kv head) gradients and `dp`
///   scratch that `attention::backward`'s worker threads allocate are
///   [`worker_arenas`] on CPU (GPU plans add them here: the group gradients
///   T·(a·d + 2·kv·d) plus the larger of the final copies and the `dp`s).
///
/// With gradient checkpointing the layer's forward is recomputed right before
/// its backward, so its saved tensors (all of [`saved_per_layer`] except the
/// kept input) are alive here too and are added.
pub fn layer_workspace(c: &ModelConfig, p: &PlanInput) -> u64 {
    let Dims { h, i, a, kv, d, .. } = dims(c);
    let (b, s) = (p.batch, p.seq);
    let t = b * s;
    let e = p.compute.size_in_bytes() as u64;
    let held = 2 * t * h * e;
    let mlp = (3 * t * i * e).max(t * h * e + 2 * t * i * e);
    let groups = t * (a * d + 2 * kv * d) * e;
    let attn = if p.gpu {
        let dp_in_flight = p.threads.max(1).min(b * kv) * s * s * 4;
        t * a * d * e + groups + groups.max(dp_in_flight)
    } else {
        t * a * d * e + groups
    };
    let recomputed = if p.checkpointing {
        let saved: u64 = saved_per_layer(c, p).iter().map(|x| x.bytes).sum();
        saved - layer_input_bytes(c, p)
    } else {
        0
    };
    recomputed + held + mlp.max(attn)
}

/// Memory the CPU trainer's worker threads keep in their own glibc arenas:
/// `attention::backward` runs one task per (sequence, kv head) on the rayon
/// workers, each allocating its `n_rep` query heads' `dq`, its `dk`, `dv`
/// (T·(a·d + 2·kv·d) f32 over all tasks, freed after being copied out) and one
/// `dp` s² scratch per busy worker. glibc gives every thread its own arena and
/// trims an arena only when its free top exceeds the (dynamic) trim threshold,
/// so these pages stay resident from the first layer backward on, through
/// every later phase and step (measured: `MALLOC_ARENA_MAX=1` removes them,
/// BENCHMARKS.md).
pub fn worker_arenas(c: &ModelConfig, p: &PlanInput) -> u64 {
    if p.gpu {
        return 0;
    }
    let Dims { a, kv, d, .. } = dims(c);
    let (b, s) = (p.batch, p.seq);
    let groups = b * s * (a * d + 2 * kv * d) * 4;
    groups + p.threads.max(1).min(b * kv) * s * s * 4
}

/// One layer's input `x` (T·h): all that gradient checkpointing keeps per layer.
fn layer_input_bytes(c: &ModelConfig, p: &PlanInput) -> u64 {
    p.batch * p.seq * c.hidden_size as u64 * (p.compute.size_in_bytes() as u64)
}

/// Head phase (`qlora-model::backward`): the last layer's output (T·h), the
/// final norm output and 1/rms (T·h + T), the f32 logits (T·V; the
/// cross-entropy turns them into their gradient in place) and the gradient of
/// the norm output (T·h).
pub fn logits_and_loss(c: &ModelConfig, p: &PlanInput) -> u64 {
    let t = p.batch * p.seq;
    let (h, v) = (c.hidden_size as u64, c.vocab_size as u64);
    3 * t * h * (p.compute.size_in_bytes() as u64) + t * 4 + t * v * 4
}

/// Bytes of the frozen base held by each device before sharding, and the part
/// that is quantization statistics.
fn frozen(inv: &Inventory, p: &PlanInput) -> (u64, u64) {
    let e = p.compute.size_in_bytes() as u64;
    match p.method {
        Method::Full => (0, 0),
        Method::Lora => (inv.total_params() * e, 0),
        Method::Qlora => {
            let mut total = 0;
            let mut stats = 0;
            for t in &inv.tensors {
                if t.quantizable {
                    let parts = bnb::parts(t.numel(), &p.quant);
                    // + the f32 offset qlora-model keeps beside the DQ statistics.
                    let extra = if p.quant.double_quant { 4 } else { 0 };
                    total += parts.total() + extra;
                    stats += parts.total() - parts.weight + extra;
                } else if !p.gpu
                    && t.stored_bf16
                    && matches!(t.role, Role::Embeddings | Role::LmHead)
                {
                    // qlora-model keeps a bf16 checkpoint's embedding / lm_head
                    // in bf16 under 4-bit (lossless; see its loader).
                    total += t.numel() * 2;
                } else {
                    total += t.numel() * e;
                }
            }
            (total, stats)
        }
    }
}

/// Optimizer state bytes for `n` trainable parameters.
pub fn optimizer_bytes(o: Optimizer, n: u64) -> u64 {
    match o {
        Optimizer::AdamW => 8 * n,
        Optimizer::AdamW8bit => 2 * n + 2 * 4 * n.div_ceil(256),
        Optimizer::Sgd => 0,
    }
}

/// Refuse inputs whose byte counts could exceed 2^63 before any of the u64
/// arithmetic of [`plan`] runs (so no count wraps, and none panics under
/// `overflow-checks`). Every term of a plan is a sum of at most a few dozen
/// products, per layer, of the bounded quantities below; their largest
/// product, times a margin of 64 per layer, is computed in f64 (which cannot
/// overflow) and must stay below 2^63. Such a plan would need more than
/// ~2^63 / (64·(layers+1)) bytes (a petabyte for 126 layers): it fits nothing.
pub fn check_magnitude(inv: &Inventory, c: &ModelConfig, p: &PlanInput) -> Result<(), MemoryError> {
    let f = |x: u64| x as f64;
    let (b, s) = (f(p.batch), f(p.seq));
    let t = b * s;
    let (h, i, v) = (
        c.hidden_size as f64,
        c.intermediate_size as f64,
        c.vocab_size as f64,
    );
    let (l, a, kv, d) = (
        c.num_hidden_layers as f64,
        c.num_attention_heads as f64,
        c.num_key_value_heads as f64,
        c.head_dim as f64,
    );
    let n_targets = p.targets.len() as f64;
    let width = [h, i, a * d + 2.0 * kv * d, v, n_targets * f(p.rank)]
        .into_iter()
        .fold(0.0, f64::max);
    let params: f64 = inv.tensors.iter().map(|t| t.numel() as f64).sum();
    let lora = f(p.rank) * (h + i + a * d + kv * d) * 7.0 * l.max(1.0);
    let per_layer = [
        t * width * 8.0,
        b * a * s * s * 4.0,
        f(p.threads).max(1.0) * s * s * 4.0,
        (params + lora) * 16.0 * f(p.grad_accum).clamp(1.0, 4.0),
    ]
    .into_iter()
    .fold(0.0, f64::max);
    let bound =
        64.0 * (l + 1.0) * per_layer + f(p.overhead) + f(p.load_file_bytes) + f(p.tokenizer_bytes);
    // (NaN cannot occur: every term is a finite or infinite product of non-negatives)
    if bound.is_nan() || bound >= 9.2e18 {
        return Err(MemoryError::TooLarge(format!(
            "the plan's byte counts would exceed 2^63 (batch {}, sequence {}, {} layers, {} parameters): too large to plan",
            p.batch, p.seq, c.num_hidden_layers, params
        )));
    }
    Ok(())
}

/// Compute the per-device plan.
pub fn plan(inv: &Inventory, c: &ModelConfig, p: &PlanInput) -> Result<Plan, MemoryError> {
    if p.batch == 0 || p.seq == 0 || p.devices == 0 {
        return Err(MemoryError::Invalid(
            "batch, sequence length and devices must be at least 1".into(),
        ));
    }
    check_magnitude(inv, c, p)?;
    let dm = dims(c);
    let n = p.devices;
    let (frozen_all, stats) = frozen(inv, p);
    let (trainable, train_w_bytes, grad_bytes, opt_bytes) = match p.method {
        Method::Full => {
            let n_p = inv.total_params();
            // Weights in the compute dtype, gradients likewise, plus an f32
            // master copy inside the optimizer when weights are 16-bit.
            let master = if p.compute == DType::F32 { 0 } else { 4 * n_p };
            (
                n_p,
                n_p * (p.compute.size_in_bytes() as u64),
                n_p * (p.compute.size_in_bytes() as u64),
                optimizer_bytes(p.optimizer, n_p) + master,
            )
        }
        _ => {
            let n_l = lora_params(c, p.rank, &p.targets)?;
            if p.gpu {
                (n_l, 4 * n_l, 4 * n_l, optimizer_bytes(p.optimizer, n_l))
            } else {
                // `qlora-train` keeps the adapter tensors and its flat f32
                // parameter copies (2 copies); gradients come back as adapter
                // tensors and are copied into flat vectors (2 copies), plus the
                // accumulator when accumulating over several micro-batches.
                let grad_copies = 2 + u64::from(p.grad_accum > 1);
                (
                    n_l,
                    8 * n_l,
                    4 * grad_copies * n_l,
                    optimizer_bytes(p.optimizer, n_l),
                )
            }
        }
    };
    // Sharding: which of (frozen+trainable weights, grads, optimizer) divide by N.
    let div = |x: u64, yes: bool| if yes && n > 1 { x.div_ceil(n) } else { x };
    let shard_params = p.sharding == Sharding::Full;
    let shard_rest = p.sharding != Sharding::None;
    // The quant statistics live on the module, outside FSDP's flat parameter.
    let frozen_sharded = div(frozen_all - stats, shard_params) + stats;
    let w = div(train_w_bytes, shard_params);
    let g = div(grad_bytes, shard_rest);
    let o = div(opt_bytes, shard_rest);

    let mut b = Breakdown {
        quant_stats: stats,
        overhead: p.overhead,
        ..Default::default()
    };
    // Largest FSDP unit (one decoder layer's weights as stored) — gathered.
    let layer_unit = (frozen_all - stats + train_w_bytes) / dm.l.max(1);
    if p.cpu_offload {
        b.host_offloaded = (frozen_sharded - stats) + w + g + o;
        b.frozen_weights = stats;
        b.trainable_params = 0;
        b.gradients = 0;
        b.optimizer_states = 0;
    } else {
        b.frozen_weights = frozen_sharded;
        b.trainable_params = w;
        b.gradients = g;
        b.optimizer_states = o;
    }

    let saved: u64 = saved_per_layer(c, p).iter().map(|s| s.bytes).sum();
    b.activations = if p.checkpointing {
        // Only the layer inputs persist; one layer's other tensors are
        // re-created inside its backward (counted in `layer_workspace`, so
        // they are not added to the head phase, where none is alive).
        dm.l * layer_input_bytes(c, p)
    } else {
        dm.l * saved
    };
    b.layer_workspace = layer_workspace(c, p);
    b.logits_and_loss = logits_and_loss(c, p);
    if p.checkpointing && !p.gpu {
        // With checkpointing the forward frees each layer's tensors as soon
        // as the next layer's input exists. glibc serves blocks below its
        // (dynamic, ≤ 32 MiB) mmap threshold from its heap and keeps freed
        // ones there for reuse, so about one layer's set stays resident when
        // the head allocates its logits (measured, BENCHMARKS.md). The layer
        // backward re-creates a layer in those blocks, so it adds nothing there.
        b.heap_retention = saved - layer_input_bytes(c, p);
    }
    b.tokenizer = if p.gpu { 0 } else { p.tokenizer_bytes };
    b.worker_arenas = worker_arenas(c, p);
    let largest_linear = inv.quantizable().map(|t| t.numel()).max().unwrap_or(0);
    b.dequant_workspace = match p.method {
        // A GPU kernel path (bnb MatMul4Bit) dequantizes the whole weight to
        // the compute dtype before the matmul (FORMATS.md §6.2).
        Method::Qlora if p.gpu => (p.compute.size_in_bytes() as u64) * largest_linear,
        Method::Qlora => {
            4 * largest_linear.min(DEQUANT_TILE_ELEMS.max(
                // a tile holds at least one whole row
                inv.quantizable().map(|t| t.shape[1]).max().unwrap_or(0),
            ))
        }
        _ => 0,
    };
    // Communication buffers. FSDP (as fsdp_qlora runs it, also on one GPU)
    // all-gathers the running and the prefetched unit and reduce-scatters one
    // unit's gradients; DDP copies every gradient into its all-reduce buckets
    // (`gradient_as_bucket_view=False`, the default) once there is a peer;
    // CPU offload gathers units onto the device in any case.
    let gather = 2 * layer_unit;
    let grad_unit = grad_bytes / dm.l.max(1);
    let offload_gather = if p.cpu_offload { gather } else { 0 };
    b.communication = if p.gpu {
        match p.sharding {
            Sharding::Full => gather + grad_unit,
            Sharding::GradOp => grad_unit + offload_gather,
            Sharding::None => (if n > 1 { grad_bytes } else { 0 }) + offload_gather,
        }
    } else {
        offload_gather
    };
    b.train_peak = b.frozen_weights
        + b.trainable_params
        + b.gradients
        + b.optimizer_states
        + b.activations
        + b.layer_workspace.max(b.logits_and_loss + b.heap_retention)
        + b.dequant_workspace
        + b.communication
        + b.tokenizer
        + b.worker_arenas
        + b.overhead;
    if !p.gpu && p.load_file_bytes > 0 {
        // The embedding is decoded straight into its frozen f32 copy; a
        // projection exists as f32 once more while it is quantized (QLoRA) or
        // un-permuted (GGUF q/k).
        b.load_peak =
            p.overhead + p.load_file_bytes + frozen_all + 4 * largest_linear + b.tokenizer;
    }
    b.total_bytes = b.train_peak.max(b.load_peak);
    Ok(Plan {
        input: p.clone(),
        trainable_count: trainable,
        per_device: b,
    })
}

/// The budget search lives beside `qlora plan`'s other answers.
pub use crate::planner::largest_fitting;

#[cfg(test)]
mod tests {
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
    /// from the shapes of `layer_forward` / `layer_backward`.
    #[test]
    fn tiny_terms_by_hand() {
        let c = tiny();
        let p = input(4, 512, false);
        let saved: u64 = saved_per_layer(&c, &p).iter().map(|s| s.bytes).sum();
        // 5 T·h tensors, 2 T rstd, q/k/v T·128, probs 4·4·512², 3 T·I, 7 T·r.
        let expect = 5 * 2048 * 64 * 4
            + 2 * 2048 * 4
            + 2048 * 128 * 4
            + 4 * 4 * 512 * 512 * 4
            + 3 * 2048 * 160 * 4
            + 7 * 2048 * 8 * 4;
        assert_eq!(saved, expect);
        assert_eq!(saved, 24_854_528);
        // held 2·T·h; MLP 3·T·I = 3,932,160 beats attention (datt T·a·d +
        // final dq/dk/dv T·(a·d + 2·kv·d) on the main thread).
        assert_eq!(
            layer_workspace(&c, &p),
            2 * 2048 * 64 * 4 + 3 * 2048 * 160 * 4
        );
        // Worker arenas: the group gradients T·(a·d + 2·kv·d) + 2 threads' dp s².
        assert_eq!(worker_arenas(&c, &p), 2048 * 128 * 4 + 2 * 512 * 512 * 4);
        // A GPU plan has no arenas; there the attention phase (bf16) holds the
        // group gradients and the larger of the copies and the dp scratch.
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
        // Head phase: x, final norm output, its gradient (3·T·h), 1/rms, f32 logits.
        assert_eq!(
            logits_and_loss(&c, &p),
            3 * 2048 * 64 * 4 + 2048 * 4 + 2048 * 320 * 4
        );
    }

    /// Checkpointing keeps the L layer inputs through the whole backward; one
    /// layer's other tensors exist only inside that layer's backward.
    #[test]
    fn checkpointing_recomputes_one_layer_inside_its_backward() {
        let c = tiny();
        let inv = Inventory::from_config(&c);
        let off = plan(&inv, &c, &input(4, 512, false)).unwrap().per_device;
        let on = plan(&inv, &c, &input(4, 512, true)).unwrap().per_device;
        let input_bytes = 2048 * 64 * 4;
        assert_eq!(off.activations, 2 * 24_854_528);
        assert_eq!(on.activations, 2 * input_bytes);
        assert_eq!(
            on.layer_workspace,
            off.layer_workspace + 24_854_528 - input_bytes
        );
        assert_eq!(on.logits_and_loss, off.logits_and_loss);
        assert_eq!(off.heap_retention, 0);
        assert_eq!(on.heap_retention, 24_854_528 - input_bytes);
        // Same fixed parts; the transient phase differs.
        let fixed = |b: &Breakdown| {
            b.train_peak
                - b.activations
                - b.layer_workspace.max(b.logits_and_loss + b.heap_retention)
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
        assert_eq!(b.heap_retention, one_layer - 128 * 64 * 4);
        assert_eq!(
            b.train_peak,
            b.frozen_weights
                + b.trainable_params
                + b.gradients
                + b.optimizer_states
                + 2 * 128 * 64 * 4
                + b.logits_and_loss
                + b.heap_retention
                + b.dequant_workspace
                + b.worker_arenas
                + b.overhead
        );
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
}
