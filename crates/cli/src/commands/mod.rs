//! One module per subcommand.

pub mod data;
pub mod dequantize;
pub mod eval;
pub mod export_gguf;
pub mod generate;
pub mod inspect;
pub mod merge;
pub mod plan;
pub mod quantize;
pub mod size;
pub mod tokenize;
pub mod train;
