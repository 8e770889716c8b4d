//! FSDP-style sharding of the frozen base over the ranks of a communicator
//! (`qlora train --shard full` under `mpirun -n N`).
//!
//! What is split: the seven projection linears of every decoder layer. Each
//! frozen weight is a few flat buffers, and each buffer is cut into N
//! contiguous, balanced ranges of its natural unit; rank r keeps range r:
//!
//! | storage            | buffers (unit)                                                        |
//! |--------------------|-----------------------------------------------------------------------|
//! | f32 (`--quant none`)  | values (one f32)                                                   |
//! | bf16 (`--quant bf16`) | values (one bf16)                                                  |
//! | NF4/FP4, plain absmax | packed nibbles (one 4-bit block), absmax (one f32)                 |
//! | NF4/FP4, double quant | packed nibbles (one 4-bit block), absmax codes (one u8), nested absmax (one f32) |
//!
//! so every rank holds ~1/N of the packed weights **and** of their quantization
//! statistics. Replicated on every rank (tiny): the 256-entry nested code map,
//! the double-quant offset, shapes and types. Gathering concatenates each
//! buffer's ranges in rank order, which is exactly the unsharded buffer: the
//! gathered weight is bit-identical to the one an unsharded load holds, so a
//! sharded run computes exactly what an unsharded one does.
//!
//! Not split (held whole on every rank): the token embedding, the lm_head
//! (tied or not), the RMSNorm weights and biases. For the models qlora targets
//! they are a small part of the weights (a 70B Llama: 1 GiB of 35), and the
//! embedding lookup and the loss's chunked lm_head product would need a
//! gather of the whole matrix on every micro-batch.
//!
//! Loading (see [`crate::Model::from_source_sharded`]): every rank reads each
//! full-precision projection weight once (one tensor at a time, as the
//! unsharded loader does), computes the absmax of every 4-bit block (one f32
//! per 64 values) and from them the tensor's double-quant offset (torch's f32
//! mean over all blocks) and its absmax codes, keeps its range of those, and
//! 4-bit-encodes only its own range of blocks. Blocks are independent, so the
//! result is byte for byte the matching range of the unsharded quantization.
//! A pre-quantized bitsandbytes checkpoint's tensor is read and its ranges kept.
//! GGUF blocks held as stored (`--quant native`) are not sharded (refused).
//!
//! At run time a layer's shards are all-gathered ([`Communicator::all_gather_var_bytes`],
//! one collective per layer use) right before its forward, again before its
//! backward (and before the recomputed forward with gradient checkpointing),
//! and the gathered copy is dropped when that use ends. Every rank must make
//! the same forward/backward calls in the same order (the trainer runs a
//! masked dummy batch on a rank that has no rows).

use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use half::bf16;
use qlora_dist::Communicator;
use qlora_quant::{Absmax, DType, DoubleQuant, Input, QuantOptions, QuantType, Quantized4};

use crate::backend::{Backend, LayerRef, LayerW};
use crate::load::QuantMode;
use crate::model::{Layer, Model, Net};
use crate::ops::linear::FrozenWeight;

/// This process's place in a sharded run: rank `rank` of `size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardSpec {
    pub rank: usize,
    pub size: usize,
}

impl ShardSpec {
    pub fn new(rank: usize, size: usize) -> Result<ShardSpec> {
        ensure!(
            size > 0 && rank < size,
            "shard rank {rank} of {size} processes"
        );
        Ok(ShardSpec { rank, size })
    }

    /// Units `[u0, u1)` of `units` held by rank `r`: contiguous, balanced
    /// (sizes differ by at most one), in rank order.
    pub fn unit_range(&self, units: usize, r: usize) -> (usize, usize) {
        let n = self.size;
        (units * r / n, units * (r + 1) / n)
    }
}

/// One buffer of a sharded weight: `total` bytes in units of `unit` bytes
/// (the last unit may be short); this rank keeps its range in `mine`.
#[derive(Clone)]
struct Part {
    unit: usize,
    total: usize,
    mine: Vec<u8>,
}

impl Part {
    fn units(&self) -> usize {
        self.total.div_ceil(self.unit)
    }
    /// Byte range of rank `r`.
    fn range(&self, spec: ShardSpec, r: usize) -> std::ops::Range<usize> {
        let (u0, u1) = spec.unit_range(self.units(), r);
        (u0 * self.unit).min(self.total)..(u1 * self.unit).min(self.total)
    }
    /// A part of `full` keeping rank `spec.rank`'s range.
    fn of(full: &[u8], unit: usize, spec: ShardSpec) -> Part {
        let mut p = Part {
            unit,
            total: full.len(),
            mine: Vec::new(),
        };
        p.mine = full[p.range(spec, spec.rank)].to_vec();
        p
    }
}

/// How a gathered weight's buffers are put back together.
#[derive(Debug, Clone)]
enum Kind {
    F32,
    Bf16,
    Quant {
        quant_type: QuantType,
        blocksize: usize,
        shape: Vec<usize>,
        dtype: DType,
        /// Double quant: `(nested_map, offset, nested_blocksize)` (replicated).
        dq: Option<(Vec<f32>, f32, usize)>,
    },
}

/// One frozen weight as this rank holds it: its range of every buffer.
#[derive(Clone)]
pub struct WeightShard {
    spec: ShardSpec,
    kind: Kind,
    parts: Vec<Part>,
}

impl std::fmt::Debug for WeightShard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "WeightShard({:?}, rank {} of {}, {} of {} bytes)",
            self.kind,
            self.spec.rank,
            self.spec.size,
            self.bytes(),
            self.parts.iter().map(|p| p.total).sum::<usize>()
        )
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f32_of(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn bf16_bytes(v: &[bf16]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect()
}

impl WeightShard {
    /// Rank `spec.rank`'s share of a whole weight (pre-quantized checkpoints,
    /// tests). GGUF blocks held as stored are refused.
    pub fn of_full(w: &FrozenWeight, spec: ShardSpec) -> Result<WeightShard> {
        let (kind, parts) = match w {
            FrozenWeight::F32(v) => (Kind::F32, vec![Part::of(&f32_bytes(v), 4, spec)]),
            FrozenWeight::BF16(v) => (Kind::Bf16, vec![Part::of(&bf16_bytes(v), 2, spec)]),
            FrozenWeight::Quant(q) => {
                let mut parts = vec![Part::of(&q.packed, q.blocksize / 2, spec)];
                let dq = match &q.absmax {
                    Absmax::Plain(a) => {
                        parts.push(Part::of(&f32_bytes(a), 4, spec));
                        None
                    }
                    Absmax::Double(d) => {
                        parts.push(Part::of(&d.codes, 1, spec));
                        parts.push(Part::of(&f32_bytes(&d.nested_absmax), 4, spec));
                        Some((d.nested_map.clone(), d.offset, d.nested_blocksize))
                    }
                };
                let kind = Kind::Quant {
                    quant_type: q.quant_type,
                    blocksize: q.blocksize,
                    shape: q.shape.clone(),
                    dtype: q.dtype,
                    dq,
                };
                (kind, parts)
            }
            FrozenWeight::Ggml(_) => bail!(SHARD_NATIVE),
        };
        Ok(WeightShard { spec, kind, parts })
    }

    /// Rank `spec.rank`'s share of the full-precision weight `w` (`shape`
    /// `[rows, cols]`) held as `mode` says, computed without building the
    /// whole stored weight: byte for byte the matching ranges of what the
    /// unsharded loader would hold (see the module docs).
    pub fn from_dense(
        w: &[f32],
        shape: [usize; 2],
        mode: QuantMode,
        spec: ShardSpec,
    ) -> Result<WeightShard> {
        ensure!(
            w.len() == shape[0] * shape[1],
            "{} values for a [{}, {}] weight",
            w.len(),
            shape[0],
            shape[1]
        );
        let n = w.len();
        let range = |unit: usize, total: usize| {
            let p = Part {
                unit,
                total,
                mine: Vec::new(),
            };
            p.range(spec, spec.rank)
        };
        let (kind, parts) = match mode {
            QuantMode::None => {
                let r = range(4, n * 4);
                let mine = f32_bytes(&w[r.start / 4..r.end / 4]);
                (
                    Kind::F32,
                    vec![Part {
                        unit: 4,
                        total: n * 4,
                        mine,
                    }],
                )
            }
            QuantMode::Bf16 => {
                let r = range(2, n * 2);
                let v: Vec<bf16> = w[r.start / 2..r.end / 2]
                    .iter()
                    .map(|&x| bf16::from_f32(x))
                    .collect();
                (
                    Kind::Bf16,
                    vec![Part {
                        unit: 2,
                        total: n * 2,
                        mine: bf16_bytes(&v),
                    }],
                )
            }
            QuantMode::Native => bail!(SHARD_NATIVE),
            QuantMode::Nf4 | QuantMode::Fp4 => {
                let opts = QuantOptions {
                    quant_type: if mode == QuantMode::Nf4 {
                        QuantType::Nf4
                    } else {
                        QuantType::Fp4
                    },
                    ..Default::default()
                };
                let bs = opts.blocksize;
                // every block's absmax (small), hence the offset and the codes of the whole tensor
                let absmax = qlora_quant::block_absmax(&Input::F32(w), bs)?;
                let nb = absmax.len();
                let offset = qlora_quant::dq_offset(&absmax);
                let dq: DoubleQuant = qlora_quant::double_quant_with_offset(&absmax, offset);
                // only this rank's blocks are 4-bit encoded
                let packed_total = n.div_ceil(2);
                let pr = range(bs / 2, packed_total);
                let (b0, b1) = (pr.start / (bs / 2), pr.end.div_ceil(bs / 2));
                let (e0, e1) = (b0 * bs, (b1 * bs).min(n));
                let mine_packed = if e1 > e0 {
                    let q = qlora_quant::quantize_4bit(
                        Input::F32(&w[e0..e1]),
                        &[e1 - e0],
                        &QuantOptions {
                            double_quant: false,
                            ..opts
                        },
                    )?;
                    debug_assert_eq!(q.absmax, Absmax::Plain(absmax[b0..b1].to_vec()));
                    q.packed
                } else {
                    Vec::new()
                };
                debug_assert_eq!(mine_packed.len(), pr.len());
                let parts = vec![
                    Part {
                        unit: bs / 2,
                        total: packed_total,
                        mine: mine_packed,
                    },
                    Part::of(&dq.codes, 1, spec),
                    Part::of(&f32_bytes(&dq.nested_absmax), 4, spec),
                ];
                debug_assert_eq!(dq.codes.len(), nb);
                let kind = Kind::Quant {
                    quant_type: opts.quant_type,
                    blocksize: bs,
                    shape: shape.to_vec(),
                    dtype: DType::F32,
                    dq: Some((dq.nested_map, dq.offset, dq.nested_blocksize)),
                };
                (kind, parts)
            }
        };
        Ok(WeightShard { spec, kind, parts })
    }

    /// Bytes this rank holds.
    pub fn bytes(&self) -> usize {
        self.parts.iter().map(|p| p.mine.len()).sum::<usize>()
            + match &self.kind {
                Kind::Quant { dq: Some(d), .. } => d.0.len() * 4 + 4,
                _ => 0,
            }
    }

    /// Bytes rank `r` contributes to a gather.
    fn len_of(&self, r: usize) -> usize {
        self.parts.iter().map(|p| p.range(self.spec, r).len()).sum()
    }

    /// The whole weight from every rank's ranges (`blobs[r][off[r]..]`),
    /// advancing each rank's offset.
    fn rebuild(&self, blobs: &[Vec<u8>], off: &mut [usize]) -> Result<FrozenWeight> {
        let mut full: Vec<Vec<u8>> = Vec::with_capacity(self.parts.len());
        for p in &self.parts {
            let mut buf = Vec::with_capacity(p.total);
            for (r, blob) in blobs.iter().enumerate() {
                let len = p.range(self.spec, r).len();
                buf.extend_from_slice(&blob[off[r]..off[r] + len]);
                off[r] += len;
            }
            full.push(buf);
        }
        Ok(match &self.kind {
            Kind::F32 => FrozenWeight::F32(Arc::new(f32_of(&full[0]))),
            Kind::Bf16 => FrozenWeight::BF16(Arc::new(
                full[0]
                    .chunks_exact(2)
                    .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])))
                    .collect(),
            )),
            Kind::Quant {
                quant_type,
                blocksize,
                shape,
                dtype,
                dq,
            } => {
                let mut it = full.into_iter();
                let packed = it.next().expect("packed part");
                let absmax = match dq {
                    None => Absmax::Plain(f32_of(&it.next().expect("absmax part"))),
                    Some((map, offset, nbs)) => Absmax::Double(DoubleQuant {
                        codes: it.next().expect("codes part"),
                        nested_absmax: f32_of(&it.next().expect("nested absmax part")),
                        nested_map: map.clone(),
                        offset: *offset,
                        nested_blocksize: *nbs,
                    }),
                };
                FrozenWeight::Quant(Arc::new(Quantized4 {
                    quant_type: *quant_type,
                    blocksize: *blocksize,
                    shape: shape.clone(),
                    dtype: *dtype,
                    packed,
                    absmax,
                }))
            }
        })
    }
}

/// All-gather the whole weights of `shards` in one collective (every rank
/// passes its shards of the same weights in the same order).
pub fn gather(shards: &[&WeightShard], comm: &dyn Communicator) -> Result<Vec<FrozenWeight>> {
    let Some(first) = shards.first() else {
        return Ok(Vec::new());
    };
    let spec = first.spec;
    ensure!(
        comm.size() == spec.size && comm.rank() == spec.rank,
        "the weights are sharded for rank {} of {} but the communicator is rank {} of {}",
        spec.rank,
        spec.size,
        comm.rank(),
        comm.size()
    );
    let mut mine = Vec::with_capacity(shards.iter().map(|s| s.len_of(spec.rank)).sum());
    for s in shards {
        for p in &s.parts {
            mine.extend_from_slice(&p.mine);
        }
    }
    let blobs = comm
        .all_gather_var_bytes(&mine)
        .context("gathering a sharded layer")?;
    drop(mine);
    ensure!(
        blobs.len() == spec.size,
        "gather: {} blobs from {} ranks",
        blobs.len(),
        spec.size
    );
    for (r, b) in blobs.iter().enumerate() {
        let want: usize = shards.iter().map(|s| s.len_of(r)).sum();
        ensure!(
            b.len() == want,
            "gather: rank {r} sent {} bytes of shards, {want} expected (the ranks loaded different models?)",
            b.len()
        );
    }
    let mut off = vec![0usize; spec.size];
    shards.iter().map(|s| s.rebuild(&blobs, &mut off)).collect()
}

/// Why GGUF blocks held as stored are not sharded.
pub const SHARD_NATIVE: &str =
    "--shard full cannot split a GGUF file's own blocks (--quant native); \
     use --quant nf4 (or bf16 / none) with --shard full, or --shard none";

/// The sharded projection weights of a model: per layer, per linear (in
/// [`crate::LINEAR_NAMES`] order), this rank's [`WeightShard`].
#[derive(Debug)]
pub struct ShardedBase {
    pub spec: ShardSpec,
    pub(crate) layers: Vec<Vec<WeightShard>>,
}

impl ShardedBase {
    /// Bytes of weights this rank holds.
    pub fn bytes(&self) -> usize {
        self.layers.iter().flatten().map(WeightShard::bytes).sum()
    }
}

/// What a [`Net`] needs to gather a sharded model's layers.
#[derive(Clone, Copy)]
pub(crate) struct Gather<'a> {
    base: &'a ShardedBase,
    comm: &'a dyn Communicator,
}

/// A placeholder in a sharded model's [`Layer`] where the whole weight would be.
pub(crate) fn placeholder() -> FrozenWeight {
    FrozenWeight::F32(Arc::new(Vec::new()))
}

impl Gather<'_> {
    /// Layer `l` on the host with its whole weights.
    fn layer(&self, l: usize, host: &Layer) -> Result<Layer> {
        let shards: Vec<&WeightShard> = self.base.layers[l].iter().collect();
        let mut whole = gather(&shards, self.comm).with_context(|| format!("layer {l}"))?;
        let mut out = host.clone();
        for (lin, w) in out.linears.iter_mut().zip(whole.drain(..)) {
            lin.weight = w;
        }
        Ok(out)
    }
}

impl<'a, B: Backend> Net<'a, B> {
    /// Layer `l`'s weights for one use: the resident copy, or for a sharded
    /// model the whole layer gathered from every rank (dropped after the use).
    pub(crate) fn fetch_layer(&self, l: usize) -> Result<LayerRef<'a, B>> {
        match (&self.m.shards, &self.gather) {
            (None, _) => self.be.fetch_layer(l, &self.w.layers[l]),
            (Some(_), Some(g)) => {
                let host = g.layer(l, &self.m.layers[l])?;
                Ok(LayerRef::Owned(Box::new(to_backend(self.be, &host)?)))
            }
            (Some(s), None) => bail!(
                "this process holds only its share (rank {} of {}) of the base weights (--shard full); \
                 running the model needs every rank (the trainer's calls with its communicator)",
                s.spec.rank,
                s.spec.size
            ),
        }
    }
}

/// A host layer on backend `B`.
fn to_backend<B: Backend>(be: &B, host: &Layer) -> Result<LayerW<B>> {
    let lin = |m: usize| be.prepare_linear(&host.linears[m]);
    Ok(LayerW {
        input_layernorm: be.upload(&host.input_layernorm)?,
        post_attention_layernorm: be.upload(&host.post_attention_layernorm)?,
        qk_norm: match &host.qk_norm {
            Some((q, k)) => Some((be.upload(q)?, be.upload(k)?)),
            None => None,
        },
        linears: [
            lin(0)?,
            lin(1)?,
            lin(2)?,
            lin(3)?,
            lin(4)?,
            lin(5)?,
            lin(6)?,
        ],
    })
}

impl Model {
    /// Where this process stands in a sharded model (`None`: it holds every weight).
    pub fn shard_spec(&self) -> Option<ShardSpec> {
        self.shards.as_ref().map(|s| s.spec)
    }

    /// Bytes of sharded projection weights this rank holds (0 when not sharded).
    pub fn shard_bytes(&self) -> usize {
        self.shards.as_ref().map_or(0, |s| s.bytes())
    }

    /// The CPU computation, gathering a sharded model's layers through `comm`.
    pub(crate) fn cpu_net_on<'a>(
        &'a self,
        comm: Option<&'a dyn Communicator>,
    ) -> Net<'a, crate::backend::cpu::CpuBackend> {
        let mut net = self.cpu_net();
        if let (Some(base), Some(comm)) = (&self.shards, comm) {
            net.gather = Some(Gather { base, comm });
        }
        net
    }

    /// Layer `l`'s projection weights, whole, gathered from every rank
    /// (collective: every rank calls it), or the resident ones.
    pub fn gathered_layer(&self, l: usize, comm: &dyn Communicator) -> Result<Layer> {
        ensure!(l < self.layers.len(), "layer {l} of {}", self.layers.len());
        match &self.shards {
            None => Ok(self.layers[l].clone()),
            Some(base) => Gather { base, comm }.layer(l, &self.layers[l]),
        }
    }
}

#[cfg(test)]
mod tests;
