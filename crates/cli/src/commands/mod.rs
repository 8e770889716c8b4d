//! One module per subcommand.

pub mod inspect;
pub mod plan;
pub mod size;
pub mod dequantize;
pub mod quantize;
