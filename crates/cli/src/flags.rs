//! Flags several commands share, spelled one way everywhere.

/// Double quantization of the 4-bit absmax statistics (8-bit blockwise, QLoRA's default):
/// `--double-quant`, `--double-quant true|false`, or the older `--no-double-quant`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct DoubleQuant {
    /// Quantize the absmax statistics too [default: true]; `--double-quant false` keeps them f32.
    #[arg(
        long = "double-quant",
        num_args = 0..=1,
        default_missing_value = "true",
        value_name = "BOOL",
        overrides_with = "no_double_quant"
    )]
    pub double_quant: Option<bool>,
    /// Keep the absmax statistics in f32 (= `--double-quant false`).
    #[arg(long = "no-double-quant", overrides_with = "double_quant")]
    pub no_double_quant: bool,
}

impl DoubleQuant {
    pub fn enabled(&self) -> bool {
        self.double_quant.unwrap_or(!self.no_double_quant)
    }
}

/// torch dtype name of a CLI dtype spelling.
pub fn torch_dtype_name(s: &str) -> &'static str {
    match s {
        "f32" | "float32" => "float32",
        "f16" | "float16" => "float16",
        _ => "bfloat16",
    }
}
