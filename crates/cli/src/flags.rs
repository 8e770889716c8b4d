//! Flags several commands share, spelled one way everywhere.

use std::ffi::OsString;

/// Boolean flags whose value may be left off (`--double-quant` = `--double-quant true`).
const OPTIONAL_BOOL_FLAGS: &[&str] = &["--double-quant", "--gradient-checkpointing"];

/// Bind the value of an optional-value boolean flag before clap sees the arguments.
///
/// clap gives a `num_args = 0..=1` option the next word whatever it is, so
/// `qlora plan --gradient-checkpointing llama-2-7b` would fail on "llama-2-7b is not a
/// bool" instead of reading the model. `require_equals` would fix that but break the
/// documented `--gradient-checkpointing false`. So: a following `true`/`false` becomes
/// the flag's value (`--flag=false`); anything else is left for the next argument and
/// the flag gets `=true`. Words after `--` are left alone.
pub fn bind_optional_bools(args: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    let mut out = Vec::new();
    let mut it = args.into_iter().peekable();
    while let Some(a) = it.next() {
        if a == "--" {
            out.push(a);
            out.extend(it);
            break;
        }
        let Some(flag) = a.to_str().filter(|f| OPTIONAL_BOOL_FLAGS.contains(f)) else {
            out.push(a);
            continue;
        };
        let value = match it.peek().and_then(|v| v.to_str()) {
            Some(v @ ("true" | "false")) => {
                let v = v.to_string();
                it.next();
                v
            }
            _ => "true".to_string(),
        };
        out.push(format!("{flag}={value}").into());
    }
    out
}

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

#[cfg(test)]
mod tests {
    use super::*;

    fn bind(args: &[&str]) -> Vec<String> {
        bind_optional_bools(args.iter().map(OsString::from))
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect()
    }

    #[test]
    fn optional_bool_flags_leave_a_following_positional_alone() {
        assert_eq!(
            bind(&["qlora", "plan", "--gradient-checkpointing", "llama-2-7b"]),
            [
                "qlora",
                "plan",
                "--gradient-checkpointing=true",
                "llama-2-7b"
            ]
        );
        assert_eq!(
            bind(&["q", "--double-quant", "false", "in"]),
            ["q", "--double-quant=false", "in"]
        );
        assert_eq!(
            bind(&["q", "--double-quant", "true"]),
            ["q", "--double-quant=true"]
        );
        assert_eq!(bind(&["q", "--double-quant"]), ["q", "--double-quant=true"]);
        assert_eq!(
            bind(&["q", "--double-quant=false", "x"]),
            ["q", "--double-quant=false", "x"]
        );
        assert_eq!(
            bind(&["q", "--double-quant", "--out", "o"]),
            ["q", "--double-quant=true", "--out", "o"]
        );
        assert_eq!(
            bind(&["q", "--", "--double-quant", "x"]),
            ["q", "--", "--double-quant", "x"]
        );
    }
}
