//! What the trainer allocates per token: the tensors one decoder layer keeps
//! for its backward, the transient buffers of a layer's backward, the head
//! phase (final norm, chunked logits and loss) and the worker threads'
//! scratch. Every term is read off `qlora-model`'s CPU code, cited below;
//! update this file when the trainer changes what it allocates.
//!
//! The CPU backend holds every activation as `Vec<f32>` (`backend/cpu.rs`,
//! `type Buf = Vec<f32>`), whatever `--compute` says (bf16 there only selects
//! the AMX kernels of the frozen linears): [`act_bytes`] is 4 on CPU and the
//! compute dtype's size in GPU plans.

use serde::Serialize;

use super::{DType, Method, PlanInput};
use qlora_config::ModelConfig;

/// Queries per attention block (`qlora-model` `ops/attention.rs`, `Q_BLOCK`):
/// the scores and their gradient exist only for `Q_BLOCK × keys` at a time.
pub const ATTN_Q_BLOCK: u64 = 64;

/// Logits computed at once by the chunked head + cross-entropy
/// (`qlora-model` `ops/cross_entropy.rs`, `HEAD_CHUNK_LOGITS`, 2^23 f32 = 32 MiB).
pub const HEAD_CHUNK_LOGITS: u64 = 1 << 23;

/// The largest lm_head the bf16 AMX path keeps a bf16 copy of (`qlora-model`
/// `ops/cross_entropy.rs`, `HEAD_BF16_COPY_MAX_BYTES`, 4x the logits chunk's bytes).
pub const HEAD_BF16_COPY_MAX_BYTES: u64 = 4 * 4 * HEAD_CHUNK_LOGITS;

/// The shortest lm_head rows (hidden size) the bf16 path keeps a packed copy
/// of (`qlora-model` `ops/cross_entropy.rs`, `HEAD_COPY_MIN_HIDDEN`).
pub const HEAD_COPY_MIN_HIDDEN: u64 = 1025;

/// Vocabulary columns per block of the head's one pass at hidden size `h`
/// (`qlora-model` `ops/cross_entropy/online.rs`, `vocab_block`).
pub fn head_vocab_block(h: u64) -> u64 {
    if h > 1024 {
        1024
    } else {
        256
    }
}

/// Weight elements per chunk of the AMX input gradient (`qlora-model`
/// `ops/amx`, `CHUNK_ELEMS`), converted to bf16 at once.
pub const AMX_CHUNK_ELEMS: u64 = 1 << 22;

/// Packed A bytes from which, with at least [`AMX_GROUP_MIN_PANELS`]
/// output panels, the AMX products run in column groups (`qlora-model`
/// `ops/amx/groups.rs`, `GROUP_MIN_A_BYTES`, `MIN_PANELS`): a 4-bit
/// weight's input gradient is then packed a group of columns at a time
/// into the threads' group buffers, never as a chunk of rows.
pub const AMX_GROUP_MIN_A_BYTES: u64 = 1 << 19;
/// See [`AMX_GROUP_MIN_A_BYTES`] (panels of 32 columns).
pub const AMX_GROUP_MIN_PANELS: u64 = 32;

/// Whether the input gradient of an `[o, i]` 4-bit linear over `t`
/// positions (LoRA rank `r` riding as extra k-steps) runs in column
/// groups (`qlora-model` `ops/amx/backward.rs`, `backward_raw`).
fn input_gradient_grouped(o: u64, i: u64, t: u64, r: u64) -> bool {
    let up = |x: u64| x.div_ceil(32) * 32;
    let a_bytes = up(t) * (up(o) + 32 * r.div_ceil(32)) * 2;
    i.is_multiple_of(32) && i / 32 >= AMX_GROUP_MIN_PANELS && a_bytes >= AMX_GROUP_MIN_A_BYTES
}

/// The largest bf16 weight chunk the AMX input gradient holds for this
/// model's linears (`qlora-model` `ops/amx/backward.rs`, `backward_raw`):
/// `kc` rows (`AMX_CHUNK_ELEMS / in` rounded down to 32, at least 32, at most
/// `out` rounded up to 32) of `in` rounded up to 32, over the linears not
/// in column groups (`four_bit` weights over `t` positions, rank `r`).
pub fn amx_chunk_elems(c: &ModelConfig, t: u64, r: u64, four_bit: bool) -> u64 {
    let up = |x: u64| x.div_ceil(32) * 32;
    c.linear_shapes()
        .iter()
        .map(|&(_, [o, i])| (o as u64, i as u64))
        .filter(|&(o, i)| !(four_bit && input_gradient_grouped(o, i, t, r)))
        .map(|(o, i)| {
            let kc = ((AMX_CHUNK_ELEMS / i.max(1)) / 32 * 32).clamp(32, up(o).max(32));
            kc * up(i)
        })
        .max()
        .unwrap_or(0)
}

/// Weight elements per round of the AMX forward's row split (`qlora-model`
/// `ops/amx`, `ROW_SPLIT_ROUND_ELEMS`): its packed bf16 panels, at most.
/// The column groups' buffers (`GROUP_PANEL_BYTES`, 1 MiB per thread) come
/// to the same 2 MiB on two threads and are not counted apart.
pub const AMX_ROUND_ELEMS: u64 = 1 << 20;

/// The dimensions the planner needs.
#[derive(Clone, Copy)]
pub(crate) struct Dims {
    pub h: u64,
    pub i: u64,
    pub l: u64,
    pub a: u64,
    pub kv: u64,
    pub d: u64,
}

pub(crate) fn dims(c: &ModelConfig) -> Dims {
    Dims {
        h: c.hidden_size as u64,
        i: c.intermediate_size as u64,
        l: c.num_hidden_layers as u64,
        a: c.num_attention_heads as u64,
        kv: c.num_key_value_heads as u64,
        d: c.head_dim as u64,
    }
}

/// Bytes of one activation element: f32 on CPU (see the module docs), the
/// compute dtype in GPU plans.
pub fn act_bytes(p: &PlanInput) -> u64 {
    if p.gpu {
        p.compute.size_in_bytes() as u64
    } else {
        4
    }
}

/// One tensor the trainer keeps for the backward of a decoder layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Saved {
    pub name: &'static str,
    pub bytes: u64,
}

/// What `qlora-model`'s decoder layer keeps from its forward for its
/// backward (`model.rs`, `LayerActs`, plus the layer input that
/// `backward.rs` keeps in `inputs`), for one layer and `b` sequences of `s`
/// tokens (T = b·s), `e` = [`act_bytes`] per element (the RMSNorm
/// reciprocals and the attention's log-sum-exp are f32):
///
/// | tensor | shape |
/// |---|---|
/// | layer input `x` | T·h |
/// | `n1 = rmsnorm₁(x)` + `rstd1` | T·h + T |
/// | `q`, `k` after RoPE, `v` | T·(a·d + 2·kv·d) |
/// | Qwen3 only: `q`, `k` before their per-head norm + 1/rms per head (`QkPre`) | T·(a·d + kv·d) + T·(a + kv) |
/// | `attn_saved` (CPU): the row log-sum-exp (`attention::forward` returns `lse [b, a, s]`; the probabilities are recomputed in the backward, never kept) | b·a·s |
/// | `att`, the attention output (input of o_proj) | T·a·d |
/// | `x_mid = x + o_proj(att)` | T·h |
/// | `n2 = rmsnorm₂(x_mid)` + `rstd2` | T·h + T |
/// | `g`, `u`, `m = silu(g)·u` | 3·T·I |
/// | LoRA `x·Aᵀ` per target (`xa`) | T·r each |
/// | DoRA only: `u = x'Wᵀ + s·B A x'` per target (`LinSaved::u`), and the detached norm `‖W + s·B·A‖` (`AdapterView::dora`, with the magnitude's device copy) | T·out + 2·out each |
///
/// GPU plans model PyTorch (bnb + FSDP) instead: the attention probabilities
/// b·a·s² (f32) in place of the log-sum-exp, no Qwen3 extras.
pub fn saved_per_layer(c: &ModelConfig, p: &PlanInput) -> Vec<Saved> {
    let Dims { h, i, a, kv, d, .. } = dims(c);
    let (b, s) = (p.batch, p.seq);
    let t = b * s;
    let e = act_bytes(p);
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
    ];
    if c.architecture.qk_norm() && !p.gpu {
        v.push(Saved {
            name: "qk_norm_inputs",
            bytes: t * (a * d + kv * d) * e + t * (a + kv) * 4,
        });
    }
    v.push(if p.gpu {
        // GPU plans model PyTorch's eager attention, which keeps the
        // probabilities (FORMATS.md §6.3)
        Saved {
            name: "attn_probs",
            bytes: b * a * s * s * 4,
        }
    } else {
        Saved {
            name: "attn_lse",
            bytes: b * a * s * 4,
        }
    });
    v.extend([
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
    ]);
    if p.method != Method::Full {
        let n = p.targets.len() as u64;
        v.push(Saved {
            name: "lora_xa",
            bytes: n * t * p.rank * e,
        });
        if p.dora {
            let outs = dora_outs(c, p);
            v.push(Saved {
                name: "dora_u",
                bytes: outs * t * e + outs * 2 * 4,
            });
        }
    }
    v
}

/// `(in, out)` of every target of a layer.
fn target_shapes(c: &ModelConfig, p: &PlanInput) -> Vec<(u64, u64)> {
    p.targets
        .iter()
        .filter_map(|t| {
            c.linear_shapes()
                .iter()
                .find(|(n, _)| n == t)
                .map(|(_, [o, i])| (*i as u64, *o as u64))
        })
        .collect()
}

/// Σ out over a layer's targets.
fn dora_outs(c: &ModelConfig, p: &PlanInput) -> u64 {
    target_shapes(c, p).iter().map(|(_, o)| o).sum()
}

/// Transient buffers of the largest DoRA backward (`ops/dora.rs`, dropout
/// on, as `qlora train`'s default 0.05): `g ⊙ dy` and `(g − 1) ⊙ dy`
/// (T·out each) and the masked base gradient (T·in). The forward's own
/// transients (`x'Wᵀ`, T·out) are smaller and never alive with these.
/// GPU plans model PEFT instead, whose DoRA forward materialises
/// `W + s·B·A` of a target (`get_weight_norm`; `out·in` in the compute dtype,
/// plus `B·A` itself): the largest such pair is added.
fn dora_backward_workspace(c: &ModelConfig, p: &PlanInput) -> u64 {
    let t = p.batch * p.seq;
    let e = act_bytes(p);
    target_shapes(c, p)
        .iter()
        .map(|(i, o)| (2 * o + i) * t * e + if p.gpu { 2 * o * i * e } else { 0 })
        .max()
        .unwrap_or(0)
}

/// What gradient checkpointing keeps per layer. GPU plans model PyTorch's
/// checkpointing, as they model PyTorch elsewhere: the layer's input `x`
/// (T·h). CPU plans model this project's trainer (`qlora-model` `CkptKept`,
/// on every backend): the input, q/k (after RoPE; Qwen3 also their norms'
/// inputs) and v, the attention output, its log-sum-exp, the residual after
/// attention and the LoRA modules' `x·Aᵀ`, so the recompute skips the whole
/// attention block but its first norm, and the LoRA down-projections (of
/// [`saved_per_layer`]: `layer_input`, `q_k_v_rope`, `qk_norm_inputs`,
/// `attn_out`, `attn_lse`, `residual1`, `lora_xa`).
pub(crate) fn checkpoint_kept_bytes(c: &ModelConfig, p: &PlanInput) -> u64 {
    let kept: &[&str] = if p.gpu {
        &["layer_input"]
    } else {
        &[
            "layer_input",
            "q_k_v_rope",
            "qk_norm_inputs",
            "attn_out",
            "attn_lse",
            "residual1",
            "lora_xa",
        ]
    };
    saved_per_layer(c, p)
        .iter()
        .filter(|s| kept.contains(&s.name))
        .map(|s| s.bytes)
        .sum()
}

/// Transient buffers alive during one layer's backward
/// (`backward.rs`, `layer_backward`), at the worst moment: the last layer's
/// output `x` (kept by `forward_backward` for the final norm's backward until
/// the end of the step, T·h), the incoming gradient `dout` (T·h), and the
/// larger of
/// * the MLP phase: `dm` (T·I), then `dg`, `du` from `swiglu_backward` while
///   `dm` is alive (3·T·I), then `dn2` + `dg` + `du` (T·h + 2·T·I) (an upper
///   bound on CPU with bf16 compute, where `dg`, `du` are made and packed a
///   row group at a time inside the input gradient and never exist whole:
///   measured TinyLlama shape, 512 tokens, 11-22 MiB below the unfused peak);
/// * the attention phase: `datt` (T·a·d, later `dn1`, T·h) beside the final
///   `dq, dk, dv` (T·(a·d + 2·kv·d)) that `attention::backward` copies out of
///   its per-(sequence, kv head) groups (those groups and the per-thread
///   score scratch live in the worker threads: [`worker_arenas`] on CPU; GPU
///   plans add them here); Qwen3 adds `dq_pre`, `dk_pre` (T·(a·d + kv·d)).
///
/// With gradient checkpointing the layer's forward is recomputed right before
/// its backward, so its saved tensors (all of [`saved_per_layer`] except what
/// [`checkpoint_kept_bytes`] kept) are alive here too and are added.
pub fn layer_workspace(c: &ModelConfig, p: &PlanInput) -> u64 {
    let Dims { h, i, a, kv, d, .. } = dims(c);
    let (b, s) = (p.batch, p.seq);
    let t = b * s;
    let e = act_bytes(p);
    let held = 2 * t * h * e;
    let mlp = (3 * t * i * e).max(t * h * e + 2 * t * i * e);
    let final_grads = t * (a * d + 2 * kv * d) * e;
    let attn = if p.gpu {
        // PyTorch-style: datt, the group gradients, and the larger of the
        // final copies and the s² score gradients in flight
        let dp_in_flight = p.threads.max(1).min(b * kv) * s * s * 4;
        t * a * d * e + final_grads + final_grads.max(dp_in_flight)
    } else {
        let qk_norm = if c.architecture.qk_norm() {
            t * (a * d + kv * d) * e
        } else {
            0
        };
        (t * a * d).max(t * h) * e + final_grads + qk_norm
    };
    let recomputed = if p.checkpointing {
        let saved: u64 = saved_per_layer(c, p).iter().map(|x| x.bytes).sum();
        saved - checkpoint_kept_bytes(c, p)
    } else {
        0
    };
    let dora = if p.dora && p.method != Method::Full {
        dora_backward_workspace(c, p)
    } else {
        0
    };
    recomputed + held + mlp.max(attn) + dora
}

/// Score scratch of the CPU attention backward in flight at once: each busy
/// worker holds `p` and `dp`, `min(Q_BLOCK, s) × s` f32 each
/// (`attention::backward`, `p.resize(rows·kl)`, `dp.resize(rows·kl)`), one
/// worker per (sequence, kv head) group at most.
fn attention_scratch(c: &ModelConfig, p: &PlanInput) -> u64 {
    let busy = p.threads.max(1).min(p.batch * c.num_key_value_heads as u64);
    busy * 2 * ATTN_Q_BLOCK.min(p.seq) * p.seq * 4
}

/// Memory the CPU trainer's worker threads keep in their own glibc arenas.
/// `attention::backward` runs one task per (sequence, kv head) on the rayon
/// workers; each allocates its `n_rep` query heads' `dq`, its `dk`, `dv`
/// (T·(a·d + 2·kv·d) f32 over all tasks, collected, then copied out and
/// freed) and the `p`/`dp` score scratch of [`attention_scratch`].
/// `attention::forward` allocates, per (sequence, head, query block), the
/// block's output and log-sum-exp (T·a·(d + 1) f32 over all tasks,
/// collected) and a `Q_BLOCK × keys` score scratch: the same arenas serve
/// both passes, so the larger counts. glibc gives every thread its own arena
/// and the trainer raises the trim threshold (`ops::keep_freed_memory`), so
/// these pages stay resident from the first layer on, through every later
/// phase and step. With bf16 compute a long sequence's groups run in parts
/// ([`attention_part_ends`]), whose partial `dK`, `dV` come on top
/// ([`attention_part_sums`]).
pub fn worker_arenas(c: &ModelConfig, p: &PlanInput) -> u64 {
    if p.gpu {
        return 0;
    }
    let Dims { a, kv, d, .. } = dims(c);
    let t = p.batch * p.seq;
    let groups = t * (a * d + 2 * kv * d) * 4 + attention_part_sums(c, p);
    let forward_blocks = t * a * (d + 1) * 4;
    groups.max(forward_blocks) + attention_scratch(c, p)
}

/// Most parts of a group (`qlora-model` `ops/attention_amx.rs`, `MAX_PARTS`).
pub const ATTN_MAX_PARTS: u64 = 4;
/// Causal block pairs a part aims at (`PART_PAIRS` there).
pub const ATTN_PART_PAIRS: u64 = 40;

/// Where the parts of a group's `nb` query blocks end (`qlora-model`
/// `ops/attention_amx.rs`, `query_parts`: near-equal causal cost, groups of
/// up to 8 blocks whole, at most [`ATTN_MAX_PARTS`]).
pub fn attention_part_ends(nb: u64) -> Vec<u64> {
    let total = nb * (nb + 1) / 2;
    let n = total
        .div_ceil(ATTN_PART_PAIRS)
        .clamp(1, ATTN_MAX_PARTS.min(nb.max(1)));
    let mut ends = Vec::with_capacity(n as usize);
    let mut cost = 0;
    for j in 0..nb {
        cost += j + 1;
        if ends.len() as u64 + 1 == n {
            break;
        }
        let target = total * (ends.len() as u64 + 1) / n;
        let next = cost + j + 2;
        if cost >= target || next.abs_diff(target) > cost.abs_diff(target) {
            ends.push(j + 1);
        }
    }
    ends.push(nb);
    ends
}

/// The attention's backward with a group's queries in several parts: every
/// part but the first keeps its own `dK`, `dV` until the group adds them to
/// the first's, in the worker threads' arenas: with bf16 compute over the
/// keys the part sees (`ends · 64`, `qlora-model` `attention_amx::backward`),
/// in f32 (and under a Mistral window shorter than the sequence) over all of
/// them (`attention::backward`).
fn attention_part_sums(c: &ModelConfig, p: &PlanInput) -> u64 {
    let Dims { kv, d, .. } = dims(c);
    let s = p.seq;
    let ends = attention_part_ends(s.div_ceil(ATTN_Q_BLOCK));
    // the tile path, unless a Mistral window shorter than the sequence
    // leaves the attention to the f32 one
    let short_window = c.architecture == qlora_config::Architecture::Mistral
        && c.sliding_window.is_some_and(|w| (w as u64) < s);
    let tiles = p.compute == DType::BF16 && !short_window;
    let keys = |e: &u64| {
        if tiles {
            (e * ATTN_Q_BLOCK).min(s)
        } else {
            s
        }
    };
    let later: u64 = ends.iter().skip(1).map(keys).sum();
    p.batch * kv * later * 2 * d * 4
}

/// Rows of logits the head computes at once (`ops/cross_entropy.rs`,
/// `head_forward_backward`): `HEAD_CHUNK_LOGITS / V` rows, at least 1 and at
/// most T, rounded down to a multiple of 32 when there are at least 32. The
/// trainer evens its chunks out below that (512 positions of a 49,152
/// vocabulary in 4 x 128, not 3 x 160 + 32); the plan keeps this bound,
/// which never shrinks as T grows (the even size can: 161 positions take
/// 2 x 96 rows where 160 take 1 x 160).
pub fn head_chunk_rows(vocab: u64, tokens: u64) -> u64 {
    let rows = (HEAD_CHUNK_LOGITS / vocab.max(1)).clamp(1, tokens.max(1));
    if rows >= 32 {
        rows / 32 * 32
    } else {
        rows
    }
}

/// Head phase (`backward.rs` `forward_backward` and
/// `cross_entropy::head_forward_backward`): the last layer's output `x`
/// (T·h), the final norm output `nf` and 1/rms (T·h + T), the gradient `dnf`
/// (T·h; `nf` is dropped after the loss and `dx` takes its place), the
/// per-position losses (`Vec<Option<f64>>`, 16 B each), and either the
/// one pass's scratch ([`head_pass_scratch`], `one_pass`: a head packed for
/// AMX) or one chunk of f32 logits ([`head_chunk_rows`] × V, turned into their
/// gradient in place) with the chunk's gathered rows of `nf` (`rows × h`
/// f32, then their input gradient: the chunks take the counted positions
/// only) — never all T × V logits. GPU plans keep the full logits (no
/// chunking there).
/// `one_pass`: the head takes the one pass over the vocabulary (bf16
/// compute); `packs_blocks`: with no kept copy of the head, each slice
/// packing its blocks ([`head_block_packs`]).
pub fn logits_and_loss(c: &ModelConfig, p: &PlanInput, one_pass: bool, packs_blocks: bool) -> u64 {
    let t = p.batch * p.seq;
    let (h, v) = (c.hidden_size as u64, c.vocab_size as u64);
    let e = act_bytes(p);
    if p.gpu {
        return 3 * t * h * e + t * 4 + t * v * 4;
    }
    let work = if one_pass {
        head_pass_scratch(c, p)
            + if packs_blocks {
                head_block_packs(c, p)
            } else {
                0
            }
    } else {
        head_chunk_rows(v, t) * (v + h) * 4
    };
    3 * t * h * e + t * 4 + t * 16 + work
}

/// Positions per slice of the head's one pass at most (`qlora-model`
/// `ops/cross_entropy/online.rs`, `MAX_SLICE_ROWS`).
pub const HEAD_MAX_SLICE_ROWS: u64 = 256;

/// The head's one pass over the vocabulary (`qlora-model`
/// `ops/cross_entropy/online.rs`), with every position counted: the counted
/// positions (16 B each) and every slice's f32 gradient accumulator (`t × h`
/// in all, kept until the slices are gathered); per slice running at once
/// (one per worker thread; slices of whole 32-row blocks, at most
/// [`HEAD_MAX_SLICE_ROWS`]) its inputs and a block's probabilities as bf16
/// (`rows × h` and `rows ×` [`head_vocab_block`], padded) and a block of f32
/// logits.
pub fn head_pass_scratch(c: &ModelConfig, p: &PlanInput) -> u64 {
    let t = p.batch * p.seq;
    let h = c.hidden_size as u64;
    let up = |x: u64| x.div_ceil(32) * 32;
    let (rows, live) = head_slices(p);
    let vb = head_vocab_block(h);
    16 * t + t * 4 * h + live * rows * (2 * (up(h) + vb) + 4 * vb)
}

/// The head's one pass without a kept copy of the head (`qlora-model`
/// `ops/cross_entropy/online.rs`, `HeadWeight::PerBlock`): each slice
/// running at once packs its vocabulary block in both layouts into a buffer
/// of its own, [`head_vocab_block`] rows × `h` padded, bf16, twice.
pub fn head_block_packs(c: &ModelConfig, p: &PlanInput) -> u64 {
    let h = c.hidden_size as u64;
    let up = |x: u64| x.div_ceil(32) * 32;
    let (_, live) = head_slices(p);
    let vb = up(head_vocab_block(h).min(c.vocab_size as u64));
    live * 2 * 2 * vb * up(h)
}

/// The head's one pass: positions per slice (one per worker thread, whole
/// 32-row blocks, at most [`HEAD_MAX_SLICE_ROWS`]) and slices running at once.
fn head_slices(p: &PlanInput) -> (u64, u64) {
    let t = p.batch * p.seq;
    let threads = p.threads.max(1);
    let rows = (t.div_ceil(threads).div_ceil(32) * 32).clamp(32, HEAD_MAX_SLICE_ROWS);
    (rows, t.div_ceil(rows).min(threads))
}

/// Depth of the `gemm` crate's packed blocks: `kernel_params` (gemm-common
/// `cache.rs`) takes at least 512 (or all of k when k is smaller).
pub const GEMM_KC: u64 = 512;

/// The `gemm` crate packs the left operand of every product into a
/// thread-local slab of the L2 cache's size (gemm-common `gemm.rs`,
/// `L2_SLAB`); allocated once per thread and never freed, its pages become
/// resident as far as the largest packed block reaches: `min(m, mc) ×
/// min(k, kc)` f32, at most the slab. Every rayon worker packs its own copy.
/// The trainer's largest left operands: a layer's activations or their
/// gradients (m = T rows, k up to max(h, I, a·d)) and the head's logits
/// gradient in its backward (m = one chunk of rows, k = V).
pub fn gemm_packing(c: &ModelConfig, p: &PlanInput) -> u64 {
    if p.gpu {
        return 0;
    }
    let Dims { h, i, a, d, .. } = dims(c);
    let t = p.batch * p.seq;
    let v = c.vocab_size as u64;
    let body = t * h.max(i).max(a * d).min(GEMM_KC);
    let head = head_chunk_rows(v, t) * v.min(GEMM_KC);
    p.threads.max(1) * (4 * body.max(head)).min(p.l2_bytes)
}

/// Rows per block of the LoRA products (`qlora-model` `ops/lora.rs`,
/// `chunk_rows`): at most 8 blocks of 128 rows or more.
pub fn lora_chunk_rows(t: u64) -> u64 {
    t.div_ceil(t.div_ceil(128).clamp(1, 8)).max(1)
}

/// Rows of a group the AMX forward's pack hands its hook at once
/// (`qlora-model` `ops/amx`, `pack_a_hooked`).
pub const AMX_HOOK_ROWS: u64 = 16;

/// What LoRA dropout keeps resident on CPU (`qlora-model`): the backward's
/// dropout branch (`ops/lora.rs`, `DropoutScratch`) works in per-thread
/// buffers kept from call to call, each thread's grown to its largest row
/// block: the block's mask, its masked input and the unmasked input-gradient
/// term ([`lora_chunk_rows`] × the widest target input, f32, three times) and
/// a row of ones; one such set per thread that runs a block (at most one per
/// block). With bf16 compute the AMX forward masks each row group in a
/// per-thread buffer too (`ops/amx/forward.rs`, `MASKED_ROWS`:
/// [`AMX_HOOK_ROWS`] rows). No dropout, full fine-tuning and GPU plans
/// (hashed masks, nothing kept): 0.
pub fn lora_dropout_buffers(c: &ModelConfig, p: &PlanInput) -> u64 {
    if p.gpu || p.method == Method::Full || p.rank == 0 || p.lora_dropout <= 0.0 {
        return 0;
    }
    let Some(widest) = target_shapes(c, p).iter().map(|&(i, _)| i).max() else {
        return 0;
    };
    let t = p.batch * p.seq;
    let rows = lora_chunk_rows(t);
    let threads = p.threads.max(1).min(t.div_ceil(rows));
    let backward = threads * (3 * rows * widest + widest) * 4;
    let forward = if p.compute == DType::BF16 {
        p.threads.max(1) * AMX_HOOK_ROWS.min(t) * widest * 4
    } else {
        0
    };
    backward + forward
}
