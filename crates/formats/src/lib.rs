//! `qlora-formats`: checkpoint files without a tensor library.
//!
//! * [`SafetensorsFile`]: a memory-mapped safetensors file whose header is
//!   fully validated at open (truncation, bad JSON, offsets out of range /
//!   overlapping / with holes, unknown dtypes, byte counts, duplicate names),
//!   so a bad file is an error naming the file, never a panic.
//! * [`ModelFiles`]: a model folder, single-file or sharded via
//!   `model.safetensors.index.json`, behind one name → tensor lookup.
//! * [`SafetensorsWriter`]: streaming, atomic writing (`<file>.tmp-<pid>` +
//!   rename) in the reference layout; [`shards`] splits large outputs and
//!   writes the index.
//! * [`bnb`]: the bitsandbytes 4-bit checkpoint keys ([`read_bnb4`],
//!   [`bnb4_tensors`], [`quantization_config`]); [`convert`]: the
//!   `qlora quantize` / `qlora dequantize` pipelines.
//! * [`ModelRef`]: the one model-reference resolver (file, folder, hub id, cache
//!   first) every command uses.
//!
//! No candle here on purpose: the memory calculator and the CLI link this
//! crate and must start instantly.

pub mod bnb;
pub mod convert;
pub mod durable;
pub mod error;
pub mod folder;
pub mod header;
pub mod model_files;
pub mod model_ref;
pub mod reader;
pub mod shards;
pub mod source;
/// torch's CPU `mean()` emulation (lives in qlora-quant, which uses it for the double-quant offset).
pub use qlora_quant::torch_mean;
pub mod writer;

pub use bnb::{bnb4_tensors, quantization_config, read_bnb4};
pub use error::{FormatError, Result};
pub use header::TensorInfo;
pub use model_files::ModelFiles;
pub use model_ref::{ModelRef, ModelSource, RefError, SourceKind};
pub use reader::{SafetensorsFile, TensorView};
/// The safetensors dtype enum (re-exported so users need not depend on `safetensors`).
pub use safetensors::Dtype;
pub use shards::{parse_bytes, parse_size, sync_dir, write_atomic, DEFAULT_MAX_SHARD_SIZE};
pub use source::TensorSource;
pub use writer::{write_safetensors, SafetensorsWriter, TensorData, TensorSpec};
