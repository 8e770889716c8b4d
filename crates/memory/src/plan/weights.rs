//! Parameter-side terms of a plan: LoRA parameter counts, the frozen base as
//! the trainer stores it (4-bit codes and statistics, bf16 or f32 tensors),
//! its split into decoder layers and the root unit, optimizer states.

use super::{Method, Optimizer, PlanInput, ALL_TARGETS};
use crate::bnb;
use crate::inventory::{Inventory, Role, TensorSpec};
use crate::MemoryError;
use qlora_config::ModelConfig;

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

/// DoRA magnitude parameters: Σ_layers Σ_targets out (one `m` per output
/// feature, PEFT's `lora_magnitude_vector`).
pub fn dora_params(c: &ModelConfig, targets: &[String]) -> Result<u64, MemoryError> {
    let mut per_layer = 0;
    for t in targets {
        let (_, o) = target_in_out(c, t).ok_or_else(|| {
            MemoryError::Invalid(format!(
                "unknown LoRA target {t:?} (expected one of {})",
                ALL_TARGETS.join(", ")
            ))
        })?;
        per_layer += o;
    }
    Ok(per_layer * c.num_hidden_layers as u64)
}

/// Frozen bytes of one tensor as the trainer holds it, and the part that is
/// quantization statistics.
fn tensor_frozen(t: &TensorSpec, p: &PlanInput) -> (u64, u64) {
    // The CPU trainer's compute dtype changes how products are computed, not
    // how the frozen tensors are stored (an f32 checkpoint stays f32).
    let e = if p.gpu {
        p.compute.size_in_bytes() as u64
    } else {
        4
    };
    match p.method {
        Method::Full => (0, 0),
        Method::Lora => (t.numel() * e, 0),
        // --quant native: the GGUF's blocks as stored (or its norms decoded to f32).
        Method::Qlora if p.native && t.native_bytes.is_some() => (t.native_bytes.unwrap_or(0), 0),
        Method::Qlora if t.quantizable => {
            let parts = bnb::parts(t.numel(), &p.quant);
            // + the f32 offset qlora-model keeps beside the DQ statistics.
            let extra = if p.quant.double_quant { 4 } else { 0 };
            (parts.total() + extra, parts.total() - parts.weight + extra)
        }
        Method::Qlora
            if !p.gpu && t.stored_bf16 && matches!(t.role, Role::Embeddings | Role::LmHead) =>
        {
            // qlora-model keeps a bf16 checkpoint's embedding / lm_head
            // in bf16 under 4-bit (lossless; see its loader).
            (t.numel() * 2, 0)
        }
        Method::Qlora => (t.numel() * e, 0),
    }
}

/// Bytes of the frozen base held by each device before sharding, and the part
/// that is quantization statistics.
pub(crate) fn frozen(inv: &Inventory, p: &PlanInput) -> (u64, u64) {
    inv.tensors
        .iter()
        .map(|t| tensor_frozen(t, p))
        .fold((0, 0), |(a, b), (x, y)| (a + x, b + y))
}

/// Whether a tensor sits outside the decoder layers (embedding, final norm,
/// lm_head): FSDP's root unit, gathered whole, not a per-layer unit.
fn is_root(t: &TensorSpec) -> bool {
    matches!(t.role, Role::Embeddings | Role::LmHead)
        || !(t.name.contains("layers.") || t.name.starts_with("blk."))
}

/// Frozen bytes of the root unit (see [`is_root`]) and of the decoder layers
/// without their quantization statistics (which stay on the module).
pub(crate) fn frozen_root_and_layers(inv: &Inventory, p: &PlanInput) -> (u64, u64) {
    let (mut root, mut layers) = (0, 0);
    for t in &inv.tensors {
        let (bytes, stats) = tensor_frozen(t, p);
        if is_root(t) {
            root += bytes - stats;
        } else {
            layers += bytes - stats;
        }
    }
    (root, layers)
}

/// The CPU trainer's `--shard full` over `n` processes (`qlora-model`'s
/// `shard` module): `(frozen bytes per process, of which statistics, one
/// decoder layer's projection weights whole)`. Each process keeps 1/N of
/// every decoder layer's projection weights — packed codes, absmax codes and
/// nested absmax alike — while the code maps and the double-quant offset of
/// each weight, the layer norms and the root (embedding, lm_head, final norm)
/// stay whole on every process. GGUF blocks held as stored are not sharded.
pub(crate) fn frozen_cpu_shard(inv: &Inventory, p: &PlanInput, n: u64) -> (u64, u64, u64) {
    let (mut bytes, mut stats, mut layer_lin) = (0, 0, 0);
    for t in &inv.tensors {
        let (b, s) = tensor_frozen(t, p);
        if is_root(t) || !t.quantizable || p.method == Method::Full {
            bytes += b;
            stats += s;
            continue;
        }
        layer_lin += b;
        let replicated = if p.method == Method::Qlora {
            let parts = bnb::parts(t.numel(), &p.quant);
            parts.quant_map + parts.nested_quant_map + if p.quant.double_quant { 4 } else { 0 }
        } else {
            0
        };
        bytes += (b - replicated).div_ceil(n) + replicated;
        stats += (s - replicated.min(s)).div_ceil(n) + replicated.min(s);
    }
    let layers = inv
        .tensors
        .iter()
        .filter(|t| !is_root(t))
        .filter_map(|t| layer_of(&t.name))
        .max()
        .map_or(1, |l| l + 1);
    (bytes, stats, layer_lin.div_ceil(layers))
}

/// Decoder layer index of an HF (`model.layers.N.`) or GGUF (`blk.N.`) tensor name.
fn layer_of(name: &str) -> Option<u64> {
    let rest = name
        .split_once("layers.")
        .map(|x| x.1)
        .or_else(|| name.strip_prefix("blk."))?;
    rest.split('.').next()?.parse().ok()
}

/// Optimizer state bytes for `n` trainable parameters.
pub fn optimizer_bytes(o: Optimizer, n: u64) -> u64 {
    match o {
        Optimizer::AdamW => 8 * n,
        Optimizer::AdamW8bit => 2 * n + 2 * 4 * n.div_ceil(256),
        Optimizer::Sgd => 0,
    }
}

/// CPU plans computing in bf16 (AMX): the bf16 copy of an f32 or ggml-block
/// lm_head (or tied embedding) the trainer makes on its first step and keeps,
/// packed for both directions of the AMX products (`qlora-model`
/// `FrozenLinear::packed_for_amx`: two copies, each padded to multiples of 32
/// rows and columns; for heads of at most 128 MiB in bf16 whose rows are
/// longer than 1024, `ops/cross_entropy.rs` `HEAD_COPY_MIN_HIDDEN`; shorter
/// ones are packed a vocabulary block at a time, [`super::activations::head_block_packs`]).
/// 0 otherwise.
pub(crate) fn cpu_bf16_head_copy(inv: &Inventory, p: &PlanInput) -> u64 {
    if p.gpu || p.compute != super::DType::BF16 || p.method == Method::Full {
        return 0;
    }
    let head = inv
        .tensors
        .iter()
        .find(|t| t.role == Role::LmHead)
        .or_else(|| inv.tensors.iter().find(|t| t.role == Role::Embeddings));
    match head {
        // an f32 head or a GGUF's own blocks (`--quant native`) are copied;
        // a bf16 checkpoint's head is used as it is
        Some(t) if !t.stored_bf16 => {
            if 2 * t.numel() > super::activations::HEAD_BF16_COPY_MAX_BYTES
                || t.shape
                    .get(1)
                    .is_none_or(|&h| h < super::activations::HEAD_COPY_MIN_HIDDEN)
            {
                return 0;
            }
            let padded: u64 = t.shape.iter().map(|&d| d.div_ceil(32) * 32).product();
            2 * 2 * padded
        }
        _ => 0,
    }
}
