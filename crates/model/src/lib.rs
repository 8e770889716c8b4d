//! `qlora-model`: the frozen Llama-family base model QLoRA trains against.
//!
//! * [`ops`]: the decoder's kernels, each with a hand-written backward.
//! * [`backend`]: the seam the forward/backward is written over (CPU = [`ops`];
//!   CUDA behind the `cuda` feature); [`Model::to_device`] picks one.
//! * [`Model`]: weights (4-bit / bf16 / f32 frozen linears), forward, loss,
//!   [`Model::forward_backward`] into LoRA adapters, KV-cache generation steps.
//! * Loading from HF folders (f32/f16/bf16, single or sharded safetensors),
//!   pre-quantized bitsandbytes 4-bit folders, or any tensor iterator.

pub mod alloc;
pub mod backend;
pub mod ops;

mod backward;
mod batch;
mod cache;
mod compute;
mod forward;
mod load;
mod model;
pub mod shard;

pub use backend::Device;
pub use backward::{DropoutRows, StepOptions};
pub use batch::{Batch, Logits};
pub use cache::KvCache;
pub use load::{LoadOptions, QuantMode, WeightSource, NATIVE_NEEDS_GGUF};
pub use model::{Layer, Model, LINEAR_NAMES};
pub use ops::linear::BaseCompute;
pub use qlora_lora::{Adapter, AdapterGrads};
pub use shard::{ShardSpec, ShardedBase, WeightShard};
