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
use crate::inventory::Inventory;
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    F32,
    Bf16,
    F16,
}

impl Dtype {
    pub fn bytes(self) -> u64 {
        match self {
            Dtype::F32 => 4,
            _ => 2,
        }
    }
    pub fn parse(s: &str) -> Option<Dtype> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Some(Dtype::F32),
            "bf16" | "bfloat16" => Some(Dtype::Bf16),
            "f16" | "fp16" | "float16" => Some(Dtype::F16),
            _ => None,
        }
    }
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
    pub compute: Dtype,
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
    /// Bytes of the checkpoint files the CPU trainer memory-maps while loading
    /// (0 = unknown / not loading from files). Loading touches every page, so
    /// they are resident until the map is dropped: see [`Breakdown::load_peak`].
    pub load_file_bytes: u64,
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
            compute: Dtype::F32,
            quant: Bnb4::new(QuantType::Nf4, 64, true),
            devices: 1,
            sharding: Sharding::None,
            cpu_offload: false,
            overhead: CPU_OVERHEAD,
            gpu: false,
            threads: 1,
            load_file_bytes: 0,
        }
    }
}

pub const ALL_TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// Fixed resident memory of the `qlora` process (binary, allocator arenas,
/// rayon threads) before any model data. Measured with VmHWM; see
/// BENCHMARKS.md "Memory planner".
pub const CPU_OVERHEAD: u64 = 24 << 20;

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
    /// Tensors saved for the backward (all layers), at peak.
    pub activations: u64,
    /// Transient buffers of one layer's backward. The total counts only the
    /// larger of this and `logits_and_loss` (they are never alive together).
    pub layer_workspace: u64,
    /// Head phase: final norm, f32 logits (turned into their gradient in place).
    pub logits_and_loss: u64,
    /// f32 tile a frozen linear is expanded into before its matmul.
    pub dequant_workspace: u64,
    /// FSDP all-gather / reduce-scatter buffers (GPU plans, >1 device).
    pub communication: u64,
    pub overhead: u64,
    /// Peak while loading (CPU trainer): overhead + the memory-mapped
    /// checkpoint (all pages touched) + the frozen model built so far + one
    /// weight converted to f32. 0 when the files are unknown.
    pub load_peak: u64,
    /// Training peak: the sum of the components above, counting only the larger
    /// of `layer_workspace` and `logits_and_loss`.
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
    let e = p.compute.bytes();
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
/// incoming gradient (T·h), and the larger of the MLP phase (`dm`, `dg`, `du`:
/// 3·T·I, then `dn2` + `dg` + `du`) and the attention phase (`datt`, `dq`,
/// `dk`, `dv`: T·(2·a·d + 2·kv·d), plus per worker thread one head's `dp`
/// s² and `dq, dk, dv` slices (n_rep + 2)·s·d, f32).
pub fn layer_workspace(c: &ModelConfig, p: &PlanInput) -> u64 {
    let Dims { h, i, a, kv, d, .. } = dims(c);
    let (b, s) = (p.batch, p.seq);
    let t = b * s;
    let e = p.compute.bytes();
    let held = 2 * t * h * e;
    let mlp = (3 * t * i * e).max(t * h * e + 2 * t * i * e);
    let n_rep = a / kv.max(1);
    let per_thread = s * s * 4 + (n_rep + 2) * s * d * 4;
    let attn = t * (2 * a * d + 2 * kv * d) * e + p.threads.max(1).min(b * kv) * per_thread;
    held + mlp.max(attn)
}

/// Head phase (`qlora-model::backward`): the last layer's output (T·h), the
/// final norm output and 1/rms (T·h + T), the f32 logits (T·V; the
/// cross-entropy turns them into their gradient in place) and the gradient of
/// the norm output (T·h).
pub fn logits_and_loss(c: &ModelConfig, p: &PlanInput) -> u64 {
    let t = p.batch * p.seq;
    let (h, v) = (c.hidden_size as u64, c.vocab_size as u64);
    3 * t * h * p.compute.bytes() + t * 4 + t * v * 4
}

/// Bytes of the frozen base held by each device before sharding, and the part
/// that is quantization statistics.
fn frozen(inv: &Inventory, p: &PlanInput) -> (u64, u64) {
    let e = p.compute.bytes();
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

/// Compute the per-device plan.
pub fn plan(inv: &Inventory, c: &ModelConfig, p: &PlanInput) -> Result<Plan, MemoryError> {
    if p.batch == 0 || p.seq == 0 || p.devices == 0 {
        return Err(MemoryError::Invalid(
            "batch, sequence length and devices must be at least 1".into(),
        ));
    }
    let dm = dims(c);
    let n = p.devices;
    let (frozen_all, stats) = frozen(inv, p);
    let (trainable, train_w_bytes, grad_bytes, opt_bytes) = match p.method {
        Method::Full => {
            let n_p = inv.total_params();
            // Weights in the compute dtype, gradients likewise, plus an f32
            // master copy inside the optimizer when weights are 16-bit.
            let master = if p.compute == Dtype::F32 { 0 } else { 4 * n_p };
            (
                n_p,
                n_p * p.compute.bytes(),
                n_p * p.compute.bytes(),
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
    let input_only = p.batch * p.seq * dm.h * p.compute.bytes();
    b.activations = if p.checkpointing {
        // Layer inputs of all layers + the rest of one layer's saved tensors,
        // re-created while that layer's backward runs.
        dm.l * input_only + (saved - input_only)
    } else {
        dm.l * saved
    };
    b.layer_workspace = layer_workspace(c, p);
    b.logits_and_loss = logits_and_loss(c, p);
    let largest_linear = inv.quantizable().map(|t| t.numel()).max().unwrap_or(0);
    b.dequant_workspace = match p.method {
        // A GPU kernel path (bnb MatMul4Bit) dequantizes the whole weight to
        // the compute dtype before the matmul (FORMATS.md §6.2).
        Method::Qlora if p.gpu => p.compute.bytes() * largest_linear,
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
        + b.layer_workspace.max(b.logits_and_loss)
        + b.dequant_workspace
        + b.communication
        + b.overhead;
    if !p.gpu && p.load_file_bytes > 0 {
        let largest = inv.tensors.iter().map(|t| t.numel()).max().unwrap_or(0);
        b.load_peak = p.overhead + p.load_file_bytes + frozen_all + 4 * largest;
    }
    b.total_bytes = b.train_peak.max(b.load_peak);
    Ok(Plan {
        input: p.clone(),
        trainable_count: trainable,
        per_device: b,
    })
}

/// Parse sizes like `24GB`, `24GiB`, `512MB`, `1.5G`, `1000000` (bytes).
/// Units are binary whatever the spelling (`GB` = `GiB` = 2³⁰), the way GPU
/// memory is sold and reported (a "24 GB" card has 24 GiB).
pub fn parse_bytes(s: &str) -> Result<u64, MemoryError> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let x: f64 = num
        .parse()
        .map_err(|_| MemoryError::Invalid(format!("bad size {s:?} (e.g. 24GB, 24GiB, 512MiB)")))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" | "kib" => 1024.0,
        "m" | "mb" | "mib" => 1024.0 * 1024.0,
        "g" | "gb" | "gib" => 1024.0f64.powi(3),
        "t" | "tb" | "tib" => 1024.0f64.powi(4),
        _ => {
            return Err(MemoryError::Invalid(format!(
                "bad size unit in {s:?} (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"
            )))
        }
    };
    Ok((x * mult).round() as u64)
}

/// Largest value in `1..=hi` for which `fits` holds (monotone: true then
/// false), or 0 if even 1 does not fit.
pub fn largest_fitting(
    hi: u64,
    mut fits: impl FnMut(u64) -> Result<bool, MemoryError>,
) -> Result<u64, MemoryError> {
    if !fits(1)? {
        return Ok(0);
    }
    let (mut lo, mut hi) = (1u64, hi);
    if fits(hi)? {
        return Ok(hi);
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if fits(mid)? {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(lo)
}
