//! `qlora-infer`: what `qlora generate`, `qlora eval` and `qlora train` share to get
//! from a model reference to a model that runs.
//!
//! * [`load`]: a model reference (HF folder, bnb-4bit folder, `.gguf` file or hub id)
//!   loaded as a [`qlora_model::Model`] (base weights held as the [`QuantMode`] says)
//!   and, where wanted, its [`qlora_tokenizer::Tokenizer`].
//! * [`generate`]: the sampler (greedy, temperature + top-p), the KV-cached decode
//!   loop with streamed text, prefill / decode tokens-per-second statistics, and the
//!   greedy before/after samples `qlora train` writes.
//! * [`check`]: a written model's logits against its source's (the read-back check of
//!   `qlora export-gguf`, the measurements of `qlora merge --requantize`).

pub mod check;
pub mod generate;
pub mod load;

pub use check::{check_export, CheckReport};
pub use generate::{
    argmax, generate, greedy_samples, prompt_ids, samples_markdown, GenLimits, GenStats, Sampler,
};
pub use load::{
    default_quant, load, load_gguf, load_gguf_sharded, load_sharded, LoadedModel, NeedTokenizer,
};
pub use qlora_model::QuantMode;
