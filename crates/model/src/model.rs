//! The decoder: its frozen weights ([`Model`]), where it computes ([`Exec`],
//! [`Net`]) and the state a forward shares with the backward; the forward
//! itself is in `forward.rs`, the input/output types in `batch.rs`.

use anyhow::{bail, ensure, Result};
use qlora_config::ModelConfig;
use qlora_lora::Adapter;

use crate::backend::cpu::CpuBackend;
use crate::backend::{Backend, Device, LayerW, Weights};
use crate::batch::{Batch, Logits};
use crate::ops::cross_entropy;
use crate::ops::linear::{FrozenLinear, FrozenWeight};

/// The seven projection linears of a layer, in this index order everywhere
/// (the order `qlora-lora` and PEFT use; the indices below follow it).
pub use qlora_config::LINEAR_NAMES;
pub(crate) const Q: usize = 0;
pub(crate) const K: usize = 1;
pub(crate) const V: usize = 2;
pub(crate) const O: usize = 3;
pub(crate) const GATE: usize = 4;
pub(crate) const UP: usize = 5;
pub(crate) const DOWN: usize = 6;

/// One decoder layer's frozen weights on the host (the CPU backend's layer:
/// norm weights `Vec<f32>`, projections [`FrozenLinear`]).
pub type Layer = LayerW<CpuBackend>;

/// A Llama-family causal LM with frozen (usually 4-bit) weights.
#[derive(Debug, Clone)]
pub struct Model {
    pub config: ModelConfig,
    /// `[vocab, hidden]`, dense (f32 or bf16).
    pub embed_tokens: FrozenWeight,
    pub layers: Vec<Layer>,
    pub norm: Vec<f32>,
    /// `[vocab, hidden]`; shares the embedding's storage when tied.
    pub lm_head: FrozenLinear,
    pub(crate) inv_freq: Vec<f32>,
    /// Where forward/backward run (default: these host weights on the CPU).
    pub(crate) exec: Exec,
    /// `--shard full`: this rank's share of every layer's projection weights
    /// (the [`Layer`]s then hold placeholders there; see [`crate::shard`]).
    pub(crate) shards: Option<std::sync::Arc<crate::shard::ShardedBase>>,
}

/// Per-call context shared by every layer, on backend `B`.
pub(crate) struct Ctx<B: Backend> {
    pub b: usize,
    pub s: usize,
    pub cos: B::Buf,
    pub sin: B::Buf,
    pub seg: Option<B::Ids>,
    /// Dropout mask seed; `None` = no dropout (evaluation).
    pub dropout_seed: Option<u64>,
    /// Mask position of each token (see `StepOptions::dropout_rows`), on the
    /// host and on the device.
    pub mask_rows: Option<Vec<usize>>,
    pub mask_ids: Option<B::Ids>,
}

impl<B: Backend> Ctx<B> {
    pub fn t(&self) -> usize {
        self.b * self.s
    }
}

/// `(A [r, in], B [out, r], r)` of one adapted linear, on backend `B`.
pub(crate) type LoraMats<B> = (<B as Backend>::Buf, <B as Backend>::Buf, usize);

/// DoRA state of one adapted linear on backend `B`: `(m, ‖W + s·B·A‖)`, `[out]` each.
pub(crate) type DoraMats<B> = (<B as Backend>::Buf, <B as Backend>::Buf);

/// An adapter checked against the model: per layer, per linear, `(A, B, r)` as
/// f32 buffers of backend `B`, and for DoRA modules the magnitude and the
/// detached weight norm.
pub(crate) struct AdapterView<B: Backend> {
    pub scale: f32,
    pub dropout: f32,
    pub layers: Vec<[Option<LoraMats<B>>; 7]>,
    pub dora: Vec<[Option<DoraMats<B>>; 7]>,
}

/// What an adapted linear's forward keeps for its backward: `dropout(x) Aᵀ`,
/// and for DoRA `u = dropout(x) Wᵀ + s·B A dropout(x)` (see [`crate::ops::dora`]).
pub(crate) struct LinSaved<B: Backend> {
    pub xa: B::Buf,
    pub u: Option<B::Buf>,
}

impl<B: Backend> AdapterView<B> {
    /// Lowest layer holding any LoRA module (backward stops there).
    pub fn lowest_layer(&self) -> usize {
        self.layers
            .iter()
            .position(|l| l.iter().any(Option::is_some))
            .unwrap_or(self.layers.len())
    }
}

/// What a layer's backward needs from its forward (besides the layer input).
pub(crate) struct LayerActs<B: Backend> {
    pub n1: B::Buf,
    pub rstd1: B::Buf,
    pub q: B::Buf,
    pub k: B::Buf,
    /// Qwen3: q and k before their per-head RMSNorm, with the norms' 1/rms per head.
    pub qk_pre: Option<QkPre<B>>,
    pub v: B::Buf,
    /// What the attention backward needs besides q, k, v, att (the rows'
    /// log-sum-exp).
    pub attn_saved: B::Buf,
    pub att: B::Buf,
    pub xa: [Option<LinSaved<B>>; 7],
    pub x_mid: B::Buf,
    pub n2: B::Buf,
    pub rstd2: B::Buf,
    pub g: B::Buf,
    pub u: B::Buf,
    pub m: B::Buf,
}

/// What a checkpointed layer keeps from its forward besides its input, so
/// that the recompute before its backward runs none of the attention block
/// but its first norm: q, k (after RoPE; Qwen3 also their per-head norms'
/// inputs) and v, the attention output and its log-sum-exp, the residual
/// stream after attention and the LoRA modules' `x·Aᵀ` (per layer
/// T·(2h + heads·d + 2·kv·d) + heads·T + 7·T·r floats, against the
/// T·(6h + 3·I) of a whole set; the recompute then re-creates the first
/// norm's output and the MLP's tensors only: the q/k/v products were 3-4
/// ms of a TinyLlama layer's ~110 checkpointed, for 5 MiB a layer kept).
pub(crate) struct CkptKept<B: Backend> {
    pub q: B::Buf,
    pub k: B::Buf,
    pub v: B::Buf,
    pub qk_pre: Option<QkPre<B>>,
    pub att: B::Buf,
    pub attn_saved: B::Buf,
    pub x_mid: B::Buf,
    /// Each adapted module's `x·Aᵀ` (T·r): the recompute runs only the LoRA
    /// up-projections (a DoRA module recomputes its own).
    pub xa: [Option<B::Buf>; 7],
}

/// What the backward of Qwen3's q/k RMSNorm needs.
pub(crate) struct QkPre<B: Backend> {
    pub q: B::Buf,
    pub rstd_q: B::Buf,
    pub k: B::Buf,
    pub rstd_k: B::Buf,
}

/// Past keys/values of one layer for incremental decoding (batch 1).
pub(crate) struct LayerKv<B: Backend> {
    pub k: Option<B::Buf>,
    pub v: Option<B::Buf>,
}

impl<B: Backend> Default for LayerKv<B> {
    fn default() -> Self {
        LayerKv { k: None, v: None }
    }
}

/// Where a [`Model`] computes: the host weights themselves (CPU), or copies of
/// them on a CUDA device.
#[derive(Clone, Default)]
pub(crate) enum Exec {
    #[default]
    Cpu,
    #[cfg(feature = "cuda")]
    Cuda(std::sync::Arc<crate::backend::cuda_model::CudaModel>),
}

impl std::fmt::Debug for Exec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exec::Cpu => write!(f, "cpu"),
            #[cfg(feature = "cuda")]
            Exec::Cuda(c) => write!(f, "{}", c.be.describe()),
        }
    }
}

/// The model's computation on one backend: the config and host parts of
/// [`Model`], the backend, and the weights as that backend holds them.
pub(crate) struct Net<'a, B: Backend> {
    pub m: &'a Model,
    pub be: &'a B,
    pub w: Weights<'a, B>,
    /// How a sharded model's layers are gathered (`None`: not sharded, or no communicator).
    pub gather: Option<crate::shard::Gather<'a>>,
}

/// Run `$body` with `$net` bound to the model's [`Net`] on its device.
macro_rules! with_net {
    ($model:expr, |$net:ident| $body:expr) => {{
        let model: &Model = $model;
        match &model.exec {
            crate::model::Exec::Cpu => {
                let $net = model.cpu_net();
                $body
            }
            #[cfg(feature = "cuda")]
            crate::model::Exec::Cuda(c) => {
                let $net = c.net(model);
                $body
            }
        }
    }};
}
/// [`with_net!`] gathering a sharded model's layers through `$comm`
/// (`Option<&dyn Communicator>`). One CPU process (no communicator) runs
/// `$body` on a rayon worker ([`crate::ops::on_pool`]): its ops then fork and
/// join inside the pool instead of waking it from outside for each of them.
macro_rules! with_net_on {
    ($model:expr, $comm:expr, |$net:ident| $body:expr) => {{
        let model: &Model = $model;
        let comm: Option<&dyn qlora_dist::Communicator> = $comm;
        match &model.exec {
            crate::model::Exec::Cpu if comm.is_none() => crate::ops::on_pool(|| {
                let $net = model.cpu_net_on(None);
                $body
            }),
            // A one-rank communicator (the trainer's, single process):
            // the pool kept awake as above (the calling thread is the CLI's
            // pool worker 0). Several ranks share the cores with the other
            // processes, so their idle workers sleep.
            crate::model::Exec::Cpu => {
                let comm = comm.expect("a communicator");
                let run = || {
                    let $net = model.cpu_net_on(Some(comm));
                    $body
                };
                if comm.size() == 1 {
                    crate::ops::keep_pool_awake(run)
                } else {
                    run()
                }
            }
            #[cfg(feature = "cuda")]
            crate::model::Exec::Cuda(c) => {
                let $net = c.net(model);
                $body
            }
        }
    }};
}
pub(crate) use with_net;
pub(crate) use with_net_on;

impl Model {
    pub fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }
    pub fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }

    /// Where this model computes.
    pub fn device(&self) -> Device {
        match &self.exec {
            Exec::Cpu => Device::Cpu,
            #[cfg(feature = "cuda")]
            Exec::Cuda(c) => Device::Cuda(c.ordinal()),
        }
    }

    /// A description of the compute device (`cpu (4 threads), base products
    /// bf16 on AMX tiles`, `cuda:0 (NVIDIA H200, sm_90)`): on the CPU with
    /// what its base products run on ([`crate::ops::linear::BaseCompute::describe_on_cpu`]).
    pub fn device_description(&self) -> String {
        let dev = with_net!(self, |net| net.be.describe());
        match self.exec {
            Exec::Cpu => format!("{dev}, {}", self.base_compute().describe_on_cpu()),
            #[cfg(feature = "cuda")]
            Exec::Cuda(_) => dev,
        }
    }

    /// Compute on `device` from now on: `cuda[:N]` copies the frozen weights to
    /// that GPU (kept in their storage format); `cpu` drops any GPU copy. The
    /// host weights stay, so the trainer, checkpoints and PEFT I/O are unchanged.
    ///
    /// Errors (never panics) when this build lacks the `cuda` feature, when
    /// there is no GPU or driver, or when the CUDA libraries are missing.
    pub fn to_device(&mut self, device: Device) -> Result<()> {
        match device {
            Device::Cpu => {
                self.exec = Exec::Cpu;
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(n) => {
                if let Some(s) = self.shard_spec() {
                    bail!(
                        "--device {device} with --shard full (rank {} of {}) is not implemented: \
                         the sharded base is gathered on the CPU only; use --shard none",
                        s.rank,
                        s.size
                    );
                }
                let c = crate::backend::cuda_model::CudaModel::new(self, n)?;
                self.exec = Exec::Cuda(std::sync::Arc::new(c));
                Ok(())
            }
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => bail!(
                "--device {device}: this qlora binary was built without the `cuda` feature; \
                 rebuild it with `cargo build --release --features cuda` ({})",
                crate::backend::CUDA_HELP
            ),
        }
    }

    /// The CPU computation over the host weights.
    pub(crate) fn cpu_net(&self) -> Net<'_, CpuBackend> {
        static CPU: CpuBackend = CpuBackend;
        Net {
            m: self,
            be: &CPU,
            w: Weights {
                embed: &self.embed_tokens,
                layers: &self.layers,
                norm: &self.norm,
                lm_head: &self.lm_head,
            },
            gather: None,
        }
    }

    /// Bytes held by the frozen weights.
    pub fn weight_bytes(&self) -> usize {
        let mut n = self.embed_tokens.bytes() + self.norm.len() * 4;
        let tied = self.embed_tokens.same_storage(&self.lm_head.weight);
        if !tied {
            n += self.lm_head.weight.bytes();
        }
        n += self.shard_bytes();
        for l in &self.layers {
            n += (l.input_layernorm.len() + l.post_attention_layernorm.len()) * 4;
            for lin in &l.linears {
                n += lin.weight.bytes() + lin.bias.as_ref().map_or(0, |b| b.len() * 4);
            }
        }
        n
    }

    /// Mistral's sliding attention window (transformers applies it only there).
    pub(crate) fn sliding_window(&self) -> Option<usize> {
        match self.config.architecture {
            qlora_config::Architecture::Mistral => self.config.sliding_window,
            _ => None,
        }
    }

    pub(crate) fn eps(&self) -> f32 {
        self.config.rms_norm_eps as f32
    }

    /// Check an adapter against this model and put its matrices on backend `be` as f32.
    /// Each projection linear's module path (`model.layers.{l}.self_attn.q_proj`,
    /// ...) to its (layer, index in [`LINEAR_NAMES`]): one lookup per adapter
    /// module instead of formatting every path for each (210 x 210 strings
    /// per step at SmolLM2's 30 layers, ~5 ms).
    fn linear_index(&self) -> std::collections::HashMap<String, (usize, usize)> {
        (0..self.layers.len())
            .flat_map(|l| {
                LINEAR_NAMES
                    .iter()
                    .enumerate()
                    .map(move |(m, n)| (ModelConfig::linear_path(l, n), (l, m)))
            })
            .collect()
    }

    pub(crate) fn adapter_view<B: Backend>(
        &self,
        be: &B,
        adapter: &Adapter,
    ) -> Result<AdapterView<B>> {
        let nl = self.layers.len();
        let mut layers: Vec<[Option<LoraMats<B>>; 7]> =
            (0..nl).map(|_| Default::default()).collect();
        let mut dora: Vec<[Option<DoraMats<B>>; 7]> = (0..nl).map(|_| Default::default()).collect();
        let scale = adapter.scaling() as f32;
        let index = self.linear_index();
        for (path, w) in &adapter.layers {
            let Some(&(l, m)) = index.get(path.as_str()) else {
                bail!(
                    "adapter module `{path}` is not one of this model's projection linears \
                     (model.layers.<0..{nl}>.self_attn.{{q,k,v,o}}_proj / mlp.{{gate,up,down}}_proj)"
                );
            };
            let lin = &self.layers[l].linears[m];
            let a_dims = w.a.dims();
            let b_dims = w.b.dims();
            ensure!(
                a_dims[0] == b_dims[1],
                "adapter module `{path}`: lora_A {a_dims:?} and lora_B {b_dims:?} are not [r, in] and [out, r]"
            );
            let r = a_dims[0];
            ensure!(
                a_dims[1] == lin.in_features && b_dims[0] == lin.out_features,
                "adapter module `{path}`: lora_A {a_dims:?} / lora_B {b_dims:?} do not fit the base linear [out {}, in {}]",
                lin.out_features,
                lin.in_features
            );
            layers[l][m] = Some((be.upload(w.a.data())?, be.upload(w.b.data())?, r));
            match &w.magnitude {
                Some(_) if self.shards.is_some() => {
                    bail!("DoRA adapters with --shard full are not supported (DoRA's weight norm needs the whole base weight); use --shard none")
                }
                Some(mag) => {
                    ensure!(
                        mag.len() == lin.out_features,
                        "adapter module `{path}`: lora_magnitude_vector has {} values, the base linear has {} outputs",
                        mag.len(),
                        lin.out_features
                    );
                    // PEFT recomputes ‖W + s·B·A‖ from the current A, B on every
                    // forward (on the dequantized weight for a 4-bit base) and
                    // detaches it; A and B are fixed within one call, so once here.
                    let norm = crate::ops::dora::weight_norm(lin, w, scale);
                    dora[l][m] = Some((be.upload(mag)?, be.upload_owned(norm)?));
                }
                None => ensure!(
                    !adapter.config.use_dora,
                    "DoRA adapter module `{path}` has no magnitude vector"
                ),
            }
        }
        Ok(AdapterView {
            scale,
            dropout: adapter.config.lora_dropout as f32,
            layers,
            dora,
        })
    }

    /// Set every module's DoRA magnitude to PEFT's init `m = ‖W + s·B·A‖` per
    /// output row (`‖W‖` for a fresh adapter, whose B is 0), `W` dequantized
    /// for a 4-bit base, and mark the adapter as DoRA.
    pub fn init_dora(&self, adapter: &mut Adapter) -> Result<()> {
        ensure!(
            self.shards.is_none(),
            "DoRA adapters with --shard full are not supported (DoRA's weight norm needs the whole base weight); use --shard none"
        );
        let scale = adapter.scaling() as f32;
        let index = self.linear_index();
        for (path, w) in adapter.layers.iter_mut() {
            let lin = index
                .get(path.as_str())
                .map(|&(l, m)| &self.layers[l].linears[m])
                .ok_or_else(|| {
                    anyhow::anyhow!("adapter module `{path}` is not a projection of this model")
                })?;
            ensure!(
                w.a.cols() == lin.in_features && w.b.rows() == lin.out_features,
                "adapter module `{path}` does not fit the base linear [{}, {}]",
                lin.out_features,
                lin.in_features
            );
            w.magnitude = Some(crate::ops::dora::weight_norm(lin, w, scale));
        }
        adapter.config.use_dora = true;
        Ok(())
    }

    /// Logits `[b, s, vocab]` (f32), no dropout.
    pub fn forward_logits(&self, batch: &Batch, adapter: Option<&Adapter>) -> Result<Logits> {
        let (b, s) = batch.dims(self.vocab_size())?;
        let logits = with_net!(self, |net| net.forward_logits(batch, adapter))?;
        Ok(Logits {
            data: logits,
            batch: b,
            seq: s,
            vocab: self.vocab_size(),
        })
    }

    /// Shifted cross-entropy: `(sum over counted targets, count)`; mean = sum / count.
    pub fn loss(&self, batch: &Batch, adapter: Option<&Adapter>) -> Result<(f64, usize)> {
        self.loss_on(batch, adapter, None)
    }

    /// [`Self::loss`]; a sharded model gathers its layers through `comm`
    /// (collective: every rank of `comm` makes the same calls).
    pub fn loss_on(
        &self,
        batch: &Batch,
        adapter: Option<&Adapter>,
        comm: Option<&dyn qlora_dist::Communicator>,
    ) -> Result<(f64, usize)> {
        let labels = batch.flat_labels();
        cross_entropy::check_labels(&labels, self.vocab_size())?;
        with_net_on!(self, comm, |net| net.loss(batch, &labels, adapter))
    }
}
