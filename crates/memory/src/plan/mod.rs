//! Training-memory plan per device (`qlora plan`).
//!
//! The plan is a sum of named components (FORMATS.md §6.2–6.4). The
//! activation terms are *not* borrowed constants: [`activations`] lists, from
//! `qlora-model`'s code, what this project's trainer keeps for the backward
//! of a decoder layer ([`saved_per_layer`]), the transient buffers of one
//! layer's backward ([`layer_workspace`]), the chunked head and loss
//! ([`logits_and_loss`]) and the worker threads' scratch ([`worker_arenas`]).
//! [`weights`] holds the parameter side. Update them when the trainer changes
//! what it allocates.

use serde::Serialize;

use crate::bnb::{Bnb4, QuantType};
use crate::inventory::Inventory;
use crate::MemoryError;
use qlora_config::ModelConfig;

pub mod activations;
pub mod weights;

use activations::{checkpoint_kept_bytes, dims};
pub use activations::{
    head_chunk_rows, layer_workspace, logits_and_loss, saved_per_layer, worker_arenas, Saved,
};
pub use weights::{dora_params, lora_params, optimizer_bytes};
use weights::{frozen, frozen_cpu_shard, frozen_root_and_layers};

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
    /// DoRA (`qlora train --use-dora`): a trainable magnitude per output
    /// feature of every target ([`dora_params`]), and per target the saved
    /// `u` and its backward buffers ([`activations`]).
    pub dora: bool,
    /// LoRA dropout probability (`qlora train --lora-dropout`, default
    /// [`DEFAULT_LORA_DROPOUT`]): above 0 the CPU trainer keeps per-thread
    /// mask buffers ([`activations::lora_dropout_buffers`]).
    pub lora_dropout: f64,
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
    /// QLoRA on a GGUF's own blocks (`--quant native`): the frozen matrices at their
    /// stored size ([`crate::inventory::TensorSpec::native_bytes`]) instead of `quant`.
    pub native: bool,
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
    /// Per-core L2 cache in bytes: the size of the packing slab the `gemm`
    /// crate gives each thread (see [`activations::gemm_packing`]).
    pub l2_bytes: u64,
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
            dora: false,
            lora_dropout: DEFAULT_LORA_DROPOUT,
            optimizer: Optimizer::AdamW,
            batch: 1,
            seq: 512,
            grad_accum: 1,
            checkpointing: false,
            compute: DType::F32,
            quant: Bnb4::new(QuantType::Nf4, 64, true),
            native: false,
            devices: 1,
            sharding: Sharding::None,
            cpu_offload: false,
            overhead: CPU_OVERHEAD,
            gpu: false,
            threads: 1,
            l2_bytes: DEFAULT_L2_BYTES,
            load_file_bytes: 0,
            tokenizer_bytes: 0,
        }
    }
}

/// `qlora train`'s LoRA dropout when it starts a new adapter.
pub const DEFAULT_LORA_DROPOUT: f64 = 0.05;

/// Every LoRA target (the seven projection linears, `qlora-config`'s list).
pub const ALL_TARGETS: [&str; 7] = qlora_config::LINEAR_NAMES;

/// Fixed resident memory of a `qlora train` process apart from the model,
/// adapter, optimizer and activations: the pages of the binary's code it
/// touches (file-backed, ~8 MiB), thread stacks, rayon and gemm per-thread
/// scratch and allocator arenas (anonymous, ~1.3 MiB). Calibrated from
/// measurement (BENCHMARKS.md "Memory planner: validation against the
/// trainer"): the smallest run (tiny fixture model, QLoRA r 8, batch 1 x 8
/// tokens, 2 steps, `QLORA_MEM_TRACE=reset`) peaks at VmHWM 11,968 KiB =
/// 12,255,232 B, of which the plan's other terms are 865,712 B:
/// 12,255,232 − 865,712 = 11,389,520 B ≈ 10.9 MiB (2026-12-07, Zen 4; the
/// binary's touched code grew from ~8 to ~10 MiB since the first
/// calibration's 9,704,784 B).
pub const CPU_OVERHEAD: u64 = 11_389_520;

/// Resident bytes per vocabulary entry of a loaded byte-level BPE tokenizer
/// (`tokenizers`' vocab and reverse vocab maps, merges, added tokens).
/// Measured: building SmolLM2's 49,152-token tokenizer from its GGUF metadata
/// and dropping it again frees 8,356 KiB of anonymous memory → 174 B/token.
pub const TOKENIZER_BYTES_PER_TOKEN: u64 = 174;

/// Heap high-water mark of building a byte-level BPE tokenizer from a GGUF's
/// metadata, per vocabulary entry (the final tokenizer included). Measured:
/// SmolLM2's 49,152 tokens, `qlora train --shard full` at 2 and 4 processes —
/// anonymous memory at `model-loaded` (170.4 / 170.9 MiB) less the f32
/// embedding (108.0 MiB) and the process baseline (1.3 MiB) → 61.5 MiB →
/// 1,312 B/token. (`qlora tokenize` on that file peaks at 86.6 MiB RSS.)
pub const TOKENIZER_BUILD_BYTES_PER_TOKEN: u64 = 1312;

/// Tokenizer memory for a vocabulary of `vocab` entries.
pub fn tokenizer_bytes(vocab: u64) -> u64 {
    vocab * TOKENIZER_BYTES_PER_TOKEN
}

/// Per-core L2 cache assumed when the machine's is unknown (2 MiB: recent
/// Xeon and EPYC cores). `qlora plan` reads this machine's from sysfs.
pub const DEFAULT_L2_BYTES: u64 = 2 << 20;

/// This machine's per-core L2 cache size (Linux sysfs), if it can be read.
pub fn host_l2_bytes() -> Option<u64> {
    let dir = std::path::Path::new("/sys/devices/system/cpu/cpu0/cache");
    for i in 0..8 {
        let d = dir.join(format!("index{i}"));
        let level = std::fs::read_to_string(d.join("level")).ok()?;
        if level.trim() != "2" {
            continue;
        }
        let size = std::fs::read_to_string(d.join("size")).ok()?;
        let size = size.trim();
        let (num, mult) = match size.strip_suffix('K') {
            Some(n) => (n, 1 << 10),
            None => match size.strip_suffix('M') {
                Some(n) => (n, 1 << 20),
                None => (size, 1),
            },
        };
        return num.parse::<u64>().ok().map(|n| n * mult);
    }
    None
}

/// Assumed CUDA context + allocator slack on a GPU (not measurable here;
/// typical PyTorch CUDA 12 context ≈ 0.5 GiB).
pub const GPU_OVERHEAD: u64 = 512 << 20;

/// Elements of a frozen weight expanded to f32 at once (`qlora-model`
/// `ops::linear::TILE_ELEMS`, 4 MiB), unless [`DEQUANT_TILE_MIN_ROWS`] rows
/// take more.
pub const DEQUANT_TILE_ELEMS: u64 = 1 << 20;
/// `ops::linear::TILE_MIN_ROWS`.
pub const DEQUANT_TILE_MIN_ROWS: u64 = 256;
/// `ops::linear::T_GROUP`: rows each thread expands before writing them
/// into the tile transposed.
pub const DEQUANT_ROW_GROUP: u64 = 16;

/// Rows of a `[rows, cols]` weight in one f32 tile (`ops::linear::tile_rows`).
pub fn dequant_tile_rows(rows: u64, cols: u64) -> u64 {
    let fit = DEQUANT_TILE_ELEMS / cols.max(1) / DEQUANT_ROW_GROUP * DEQUANT_ROW_GROUP;
    fit.max(DEQUANT_TILE_MIN_ROWS).min(rows).max(1)
}

/// Checkpointed CPU runs keep at least `activations / CKPT_FRAGMENTATION_DIV`
/// of freed heap resident (see [`Breakdown::heap_retention`]; measured).
pub const CKPT_FRAGMENTATION_DIV: u64 = 3;

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
    /// Head phase: final norm, the loss's scratch (a chunk of f32 logits, or
    /// the one pass's blocks).
    pub logits_and_loss: u64,
    /// CPU plans with checkpointing: one layer's forward tensors, freed by
    /// the forward pass but kept in the heap by glibc's allocator (blocks are
    /// reused, not returned to the system), resident from then on, or, where
    /// larger, a third of the kept tensors (the heap's fragments between
    /// them, measured): the total counts it on top of the larger transient
    /// phase.
    pub heap_retention: u64,
    /// The tokenizer `qlora train` keeps (GGUF metadata or tokenizer.json).
    pub tokenizer: u64,
    /// CPU plans: attention-backward buffers retained in the worker threads'
    /// allocator arenas (see [`worker_arenas`]).
    pub worker_arenas: u64,
    /// f32 tile a frozen linear is expanded into before its matmul.
    pub dequant_workspace: u64,
    /// CPU plans: the `gemm` crate's per-thread packing slabs (see
    /// [`activations::gemm_packing`]).
    pub gemm_packing: u64,
    /// CPU plans with LoRA dropout: the per-thread mask buffers kept from
    /// call to call (see [`activations::lora_dropout_buffers`]).
    pub lora_dropout_buffers: u64,
    /// FSDP all-gather / reduce-scatter buffers (GPU plans, >1 device).
    pub communication: u64,
    pub overhead: u64,
    /// Peak while loading (CPU trainer): overhead + the resident part of the
    /// memory-mapped checkpoint + the frozen model + the f32 copy of the
    /// largest projection being converted. 0 when the files are unknown.
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
        f(p.threads).max(1.0) * f(p.l2_bytes),
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
            let n_l = lora_params(c, p.rank, &p.targets)?
                + if p.dora {
                    dora_params(c, &p.targets)?
                } else {
                    0
                };
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
    // The CPU trainer (`qlora train --shard full` under mpirun) shards only the
    // decoder layers' frozen projections, statistics included; the adapter, its
    // gradients and AdamW states stay whole (all-reduced). SHARD_GRAD_OP is
    // FSDP's, not the CPU trainer's: a CPU plan treats it as none.
    let cpu_shard = !p.gpu && n > 1 && p.sharding == Sharding::Full && !p.native;
    let cpu = !p.gpu;
    let shard_params = p.sharding == Sharding::Full && !cpu;
    let shard_rest = p.sharding != Sharding::None && !cpu;
    // The quant statistics live on the module, outside FSDP's flat parameter.
    let (frozen_sharded, stats, cpu_layer) = if cpu_shard {
        frozen_cpu_shard(inv, p, n)
    } else {
        (div(frozen_all - stats, shard_params) + stats, stats, 0)
    };
    let w = div(train_w_bytes, shard_params);
    let g = div(grad_bytes, shard_rest);
    let o = div(opt_bytes, shard_rest);

    let mut b = Breakdown {
        quant_stats: stats,
        overhead: p.overhead,
        ..Default::default()
    };
    // `qlora train --cpu-offload` is a no-op for the CPU trainer (it says so:
    // everything is in host memory already), so a CPU plan ignores it too.
    let offload = p.cpu_offload && p.gpu;
    // FSDP units: one decoder layer's weights as stored (gathered one at a
    // time, plus the prefetched one), and the root unit — embedding, final
    // norm and lm_head — which FSDP's root module holds and keeps gathered
    // through the whole forward and backward (the root is not resharded
    // after its forward). Averaging the root into the layer units, as this
    // plan once did, hid a large vocabulary's embedding and head.
    let (root, layers_frozen) = frozen_root_and_layers(inv, p);
    let layer_unit = (layers_frozen + train_w_bytes) / dm.l.max(1);
    if offload {
        b.host_offloaded = (frozen_sharded - stats) + w + g + o;
        b.frozen_weights = stats;
        b.trainable_params = 0;
        b.gradients = 0;
        b.optimizer_states = 0;
    } else {
        b.frozen_weights = frozen_sharded + weights::cpu_bf16_head_copy(inv, p);
        b.trainable_params = w;
        b.gradients = g;
        b.optimizer_states = o;
    }

    let saved: u64 = saved_per_layer(c, p).iter().map(|s| s.bytes).sum();
    b.activations = if p.checkpointing {
        // Only the layer inputs (CPU: and the attention's output and the
        // residual after it) persist; one layer's other tensors are
        // re-created inside its backward (counted in `layer_workspace`, so
        // they are not added to the head phase, where none is alive).
        dm.l * checkpoint_kept_bytes(c, p)
    } else {
        dm.l * saved
    };
    b.layer_workspace = layer_workspace(c, p);
    // bf16 compute takes the head and the loss in one pass over the
    // vocabulary, with a kept packed copy of the head or packing its blocks
    let head_one_pass = !p.gpu && p.compute == DType::BF16 && p.method != Method::Full;
    let head_copy = weights::cpu_bf16_head_copy(inv, p) > 0;
    b.logits_and_loss = logits_and_loss(c, p, head_one_pass, head_one_pass && !head_copy);
    if p.checkpointing && !p.gpu {
        // With checkpointing the forward frees each layer's tensors as soon
        // as the next layer's input exists. glibc serves them from its heap
        // (below its mmap threshold, which the trainer raises to 32 MiB, the
        // most glibc allows, in `ops::keep_freed_memory`, with a 512 MiB trim
        // threshold) and keeps
        // freed blocks there for reuse, so about one layer's set stays
        // resident from the head phase on (measured, BENCHMARKS.md). The
        // layer backward's workspace comes on top of it, not out of it:
        // SmolLM2 bf16, batch 2 x 256, resident 540 MiB after the head and
        // 552 / 561 MiB after the first / tenth layer backward (the head
        // phase, once bigger than the layer's, had hidden this).
        // Over many layers and long batches the kept tensors, allocated
        // between each layer's freed ones, also fragment the heap: from the
        // second step on (the first step's forward runs below glibc's
        // adaptive threshold, on fresh mappings) resident memory exceeds the
        // live heap by about a third of the kept tensors (SmolLM2 demo GGUF,
        // f32, r 8, 2 steps; heaptrack's live peak stays at the plan's: 950
        // MiB at 4 x 512, VmHWM 1203 MiB; the gap over one layer's set 40-43
        // MiB at 512 tokens, 175 MiB at 2048, LoRA and QLoRA alike,
        // BENCHMARKS.md "Checkpointed runs: the heap's fragments").
        b.heap_retention =
            (saved - checkpoint_kept_bytes(c, p)).max(b.activations / CKPT_FRAGMENTATION_DIV);
    }
    b.tokenizer = if p.gpu { 0 } else { p.tokenizer_bytes };
    b.worker_arenas = worker_arenas(c, p);
    b.gemm_packing = activations::gemm_packing(c, p);
    b.lora_dropout_buffers = activations::lora_dropout_buffers(c, p);
    let largest_linear = inv.quantizable().map(|t| t.numel()).max().unwrap_or(0);
    b.dequant_workspace = match p.method {
        // A GPU kernel path (bnb MatMul4Bit) dequantizes the whole weight to
        // the compute dtype before the matmul (FORMATS.md §6.2).
        Method::Qlora if p.gpu => (p.compute.size_in_bytes() as u64) * largest_linear,
        // CPU, bf16 compute (AMX tiles, or AVX512-BF16 on their layouts): the input gradient's bf16 weight chunk
        // (up to 2^22 elements; none for products in column groups), the forward's round of packed panels (2^20) and
        // the largest bf16 activation pack: a layer's widest input, or the
        // chunked head's logit gradients (rows x V) where the head is not
        // packed (its one pass packs in its own scratch).
        _ if !p.gpu && p.compute == DType::BF16 && p.method != Method::Full => {
            let t = p.batch * p.seq;
            let rows = activations::head_chunk_rows(c.vocab_size as u64, t);
            let widest = (c.hidden_size.max(c.intermediate_size) as u64) * t;
            let head = if head_one_pass {
                0
            } else {
                rows * c.vocab_size as u64
            };
            let chunk = activations::amx_chunk_elems(c, t, p.rank, p.method == Method::Qlora);
            2 * (chunk + activations::AMX_ROUND_ELEMS) + 2 * head.max(widest)
        }
        // CPU, f32 compute: the calling thread's tile of expanded rows, and
        // each thread's group of rows it writes into the tile transposed, for
        // the frozen linears and the head (f32 weights too, unless both the
        // batch and the rows are short: counted either way).
        Method::Qlora | Method::Lora if !p.gpu => {
            let shapes = inv
                .quantizable()
                .map(|t| (t.shape[0], t.numel() / t.shape[0].max(1)))
                .chain([(c.vocab_size as u64, c.hidden_size as u64)]);
            let (tile, widest) = shapes.fold((0, 0), |(tile, widest), (rows, cols)| {
                (
                    tile.max(dequant_tile_rows(rows, cols) * cols),
                    widest.max(cols),
                )
            });
            4 * tile + 4 * p.threads.max(1) * DEQUANT_ROW_GROUP * widest
        }
        _ => 0,
    };
    // Communication buffers. FSDP (as fsdp_qlora runs it, also on one GPU)
    // all-gathers the running and the prefetched layer unit and
    // reduce-scatters one unit's gradients; DDP copies every gradient into its
    // all-reduce buckets (`gradient_as_bucket_view=False`, the default) once
    // there is a peer. Whatever of the root unit the device does not hold
    // (all of it with CPU offload, all but its shard with FULL_SHARD) is
    // gathered for the whole step. CPU plans: none.
    let gather = 2 * layer_unit;
    let grad_unit = grad_bytes / dm.l.max(1);
    let unit_gather = if offload || shard_params { gather } else { 0 };
    let root_gather = if offload {
        root
    } else {
        root - div(root, shard_params)
    };
    b.communication = if cpu_shard {
        // one decoder layer gathered whole for its use, plus the receive
        // buffer the all-gather fills and hands over (`qlora-dist`)
        2 * cpu_layer
    } else if p.gpu {
        unit_gather
            + root_gather
            + match p.sharding {
                Sharding::Full | Sharding::GradOp => grad_unit,
                Sharding::None if n > 1 => grad_bytes,
                Sharding::None => 0,
            }
    } else {
        0
    };
    b.train_peak = b.frozen_weights
        + b.trainable_params
        + b.gradients
        + b.optimizer_states
        + b.activations
        + b.layer_workspace.max(b.logits_and_loss)
        + b.heap_retention
        + b.dequant_workspace
        + b.communication
        + b.tokenizer
        + b.worker_arenas
        + b.gemm_packing
        + b.lora_dropout_buffers
        + b.overhead;
    if !p.gpu && p.load_file_bytes > 0 {
        // The embedding is decoded straight into its frozen f32 copy; a
        // projection exists as f32 once more while it is quantized (QLoRA) or
        // un-permuted (GGUF q/k).
        // Sharded, each process reads every projection whole (the offset of
        // the double quantization is a mean over all of a tensor's blocks) but
        // keeps only its share.
        let frozen_kept = if cpu_shard {
            frozen_sharded
        } else {
            frozen_all
        };
        b.load_peak =
            p.overhead + p.load_file_bytes + frozen_kept + 4 * largest_linear + b.tokenizer;
        if cpu_shard && b.tokenizer > 0 {
            // The tokenizer is built before the weights (GGUF) and its
            // construction's heap ([`TOKENIZER_BUILD_BYTES_PER_TOKEN`]) stays
            // resident (glibc keeps freed memory); the root's large buffers go
            // above it, the layers' small ones into it. Unsharded, the layers
            // refill it; a rank's share of them may not (measured,
            // BENCHMARKS.md "Sharded base over MPI").
            let vocab = b.tokenizer / TOKENIZER_BYTES_PER_TOKEN;
            let build = vocab * TOKENIZER_BUILD_BYTES_PER_TOKEN;
            let rest = frozen_kept.saturating_sub(root) + 4 * largest_linear + b.tokenizer;
            b.load_peak = p.overhead + p.load_file_bytes + root + rest.max(build);
        }
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
mod tests;
