//! Llama-family model configuration.
//!
//! Parses a Hugging Face `config.json` as transformers v4 and v5 write it
//! (`rope_scaling` / `rope_parameters`, `torch_dtype` / `dtype`) into one
//! validated [`ModelConfig`]. No tensors, no candle: the memory calculator and
//! the model loader both start from here.
//!
//! Anything the model code cannot honour (another `hidden_act`, an unknown
//! RoPE type, MLP biases, …) is an error that names the field, never a silently
//! different model.

use std::path::Path;

use serde_json::Value;

mod rope;
pub use rope::{RopeScaling, RopeType};

/// Errors from reading or validating a model configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not valid JSON: {source}")]
    Json {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: missing required field `{field}`")]
    Missing { path: String, field: &'static str },
    #[error("{path}: field `{field}`: {msg}")]
    Invalid {
        path: String,
        field: String,
        msg: String,
    },
    #[error("{path}: unsupported {what}: {value} (supported: {supported})")]
    Unsupported {
        path: String,
        what: &'static str,
        value: String,
        supported: &'static str,
    },
}

/// The architectures that share the Llama decoder (pre-norm, RMSNorm, RoPE, SwiGLU, GQA).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Mistral,
    /// Qwen2/2.5: bias on q/k/v projections (no config flag), none on o_proj.
    Qwen2,
    /// Qwen3: per-head RMSNorm on q and k (`q_norm`, `k_norm`, weight `[head_dim]`) after
    /// the projections and before RoPE; no q/k/v bias unless `attention_bias`; `head_dim`
    /// given explicitly (often != hidden/heads).
    Qwen3,
}

impl Architecture {
    pub fn as_str(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Mistral => "mistral",
            Architecture::Qwen2 => "qwen2",
            Architecture::Qwen3 => "qwen3",
        }
    }
    /// The `architectures[0]` string transformers writes for a causal LM of this family.
    pub fn hf_class(self) -> &'static str {
        match self {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Mistral => "MistralForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
            Architecture::Qwen3 => "Qwen3ForCausalLM",
        }
    }
    /// Per-head RMSNorm on queries and keys before RoPE (Qwen3's `q_norm` / `k_norm`).
    pub fn qk_norm(self) -> bool {
        self == Architecture::Qwen3
    }
}

/// Checkpoint dtype as recorded in config.json (`torch_dtype` / `dtype`): the
/// workspace's one dtype enum.
pub use qlora_quant::DType;

/// The seven projection linears of a Llama-family decoder layer, in model order
/// (q, k, v, o, gate, up, down: PyTorch's parameter order). The one list every
/// crate uses.
pub const LINEAR_NAMES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// Largest accepted layer count (see [`ModelConfig::validate`]).
pub const MAX_LAYERS: usize = 1 << 14;
/// Largest accepted value of any other size (vocabulary, widths, heads, context).
pub const MAX_DIM: usize = 1 << 31;
/// Largest accepted parameter count: products of sizes stay far below 2^64.
pub const MAX_PARAMS: u128 = 1 << 50;

/// A validated Llama-family configuration. Field names follow transformers.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v projections (Qwen2, or `attention_bias: true`).
    pub qkv_bias: bool,
    /// Bias on o_proj too (`attention_bias: true` on Llama).
    pub o_bias: bool,
    pub bos_token_id: Option<u32>,
    /// All EOS ids (config.json may give a list).
    pub eos_token_ids: Vec<u32>,
    pub torch_dtype: Option<DType>,
    /// Mistral sliding window, if any. Only honoured when longer than every sequence we run.
    pub sliding_window: Option<usize>,
    /// The raw `quantization_config` object if present (bnb-4bit checkpoints).
    pub quantization_config: Option<Value>,
}

impl ModelConfig {
    /// Read and validate `config.json` (or any file of that shape).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: p.clone(),
            source,
        })?;
        Self::from_json_str(&text, &p)
    }

    /// Parse from JSON text; `origin` names the source in error messages.
    pub fn from_json_str(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let v: Value = serde_json::from_str(text).map_err(|source| ConfigError::Json {
            path: origin.to_string(),
            source,
        })?;
        Self::from_json(&v, origin)
    }

    /// Parse from an already decoded JSON value.
    pub fn from_json(v: &Value, origin: &str) -> Result<Self, ConfigError> {
        let f = Fields { v, origin };
        let model_type = f.opt_str("model_type")?.unwrap_or_else(|| "llama".into());
        let architecture = match model_type.as_str() {
            "llama" => Architecture::Llama,
            "mistral" => Architecture::Mistral,
            "qwen2" => Architecture::Qwen2,
            "qwen3" => Architecture::Qwen3,
            other => {
                return Err(ConfigError::Unsupported {
                    path: origin.into(),
                    what: "model_type",
                    value: other.into(),
                    supported: "llama, mistral, qwen2, qwen3",
                })
            }
        };
        if let Some(act) = f.opt_str("hidden_act")? {
            if act != "silu" {
                return Err(ConfigError::Unsupported {
                    path: origin.into(),
                    what: "hidden_act",
                    value: act,
                    supported: "silu",
                });
            }
        }
        if f.opt_bool("mlp_bias")?.unwrap_or(false) {
            return Err(ConfigError::Unsupported {
                path: origin.into(),
                what: "mlp_bias",
                value: "true".into(),
                supported: "false",
            });
        }
        let hidden_size = f.req_usize("hidden_size")?;
        let num_attention_heads = f.req_usize("num_attention_heads")?;
        let num_key_value_heads = f
            .opt_usize("num_key_value_heads")?
            .unwrap_or(num_attention_heads);
        let head_dim = match f.opt_usize("head_dim")? {
            Some(d) => d,
            None => {
                if num_attention_heads == 0 || !hidden_size.is_multiple_of(num_attention_heads) {
                    return Err(f.invalid(
                        "head_dim",
                        format!(
                            "not given, and hidden_size {hidden_size} is not divisible by num_attention_heads {num_attention_heads}"
                        ),
                    ));
                }
                hidden_size / num_attention_heads
            }
        };
        let attention_bias = f.opt_bool("attention_bias")?.unwrap_or(false);
        let (qkv_bias, o_bias) = match architecture {
            Architecture::Qwen2 => (true, false),
            _ => (attention_bias, attention_bias),
        };
        let (rope_theta, rope_scaling) = rope::parse(&f)?;
        let eos_token_ids = match v.get("eos_token_id") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| {
                    x.as_u64()
                        .and_then(|x| u32::try_from(x).ok())
                        .ok_or_else(|| {
                            f.invalid("eos_token_id", format!("expected token ids, got {x}"))
                        })
                })
                .collect::<Result<_, _>>()?,
            Some(x) => vec![x
                .as_u64()
                .and_then(|x| u32::try_from(x).ok())
                .ok_or_else(|| {
                    f.invalid("eos_token_id", format!("expected a token id, got {x}"))
                })?],
        };
        let bos_token_id =
            match f.opt_usize("bos_token_id")? {
                None => None,
                Some(x) => Some(u32::try_from(x).map_err(|_| {
                    f.invalid("bos_token_id", format!("{x} is not a valid token id"))
                })?),
            };
        let dtype_str = match f.opt_str("dtype")? {
            Some(s) => Some(s),
            None => f.opt_str("torch_dtype")?,
        };
        let torch_dtype = match dtype_str {
            None => None,
            Some(s) => Some(
                DType::parse(&s)
                    .ok_or_else(|| f.invalid("dtype", format!("unknown dtype {s:?}")))?,
            ),
        };
        let use_sliding = f.opt_bool("use_sliding_window")?;
        let sliding_window = match (architecture, use_sliding) {
            (Architecture::Qwen2 | Architecture::Qwen3, Some(false) | None) => None,
            _ => f.opt_usize("sliding_window")?,
        };
        let cfg = ModelConfig {
            architecture,
            vocab_size: f.req_usize("vocab_size")?,
            hidden_size,
            intermediate_size: f.req_usize("intermediate_size")?,
            num_hidden_layers: f.req_usize("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: f.opt_f64("rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: f.opt_usize("max_position_embeddings")?.unwrap_or(2048),
            tie_word_embeddings: f.opt_bool("tie_word_embeddings")?.unwrap_or(false),
            qkv_bias,
            o_bias,
            bos_token_id,
            eos_token_ids,
            torch_dtype,
            sliding_window,
            quantization_config: v.get("quantization_config").cloned(),
        };
        cfg.validate(origin)?;
        Ok(cfg)
    }

    /// Structural checks that every consumer relies on.
    pub fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let inv = |field: &str, msg: String| ConfigError::Invalid {
            path: origin.into(),
            field: field.into(),
            msg,
        };
        for (name, val) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
        ] {
            if val == 0 {
                return Err(inv(name, "must be positive".into()));
            }
        }
        // Sizes read from a downloaded file are used to allocate and are
        // multiplied together (parameter and byte counts): bound them so no
        // product wraps and no allocation is sized by a typo. The bounds are
        // far beyond every published model (largest: ~2e12 parameters, ~200
        // layers, 256k vocabulary).
        for (name, val) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if val > MAX_DIM {
                return Err(inv(name, format!("{val} exceeds the supported {MAX_DIM}")));
            }
        }
        if self.num_hidden_layers > MAX_LAYERS {
            return Err(inv(
                "num_hidden_layers",
                format!(
                    "{} exceeds the supported {MAX_LAYERS}",
                    self.num_hidden_layers
                ),
            ));
        }
        let params = self.param_count_u128();
        if params > MAX_PARAMS {
            return Err(inv(
                "num_hidden_layers",
                format!("the sizes give {params} parameters, more than the supported {MAX_PARAMS}"),
            ));
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(inv(
                "num_key_value_heads",
                format!(
                    "{} does not divide num_attention_heads {}",
                    self.num_key_value_heads, self.num_attention_heads
                ),
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(inv(
                "head_dim",
                format!("{} is odd; RoPE needs pairs", self.head_dim),
            ));
        }
        if self.rms_norm_eps.is_nan() || self.rms_norm_eps <= 0.0 {
            return Err(inv(
                "rms_norm_eps",
                format!("{} must be positive", self.rms_norm_eps),
            ));
        }
        if self.rope_theta.is_nan() || self.rope_theta <= 0.0 {
            return Err(inv(
                "rope_theta",
                format!("{} must be positive", self.rope_theta),
            ));
        }
        Ok(())
    }

    /// The parameter count in u128 (cannot overflow for any usize sizes):
    /// embeddings (twice when untied), every layer's linears, norms and biases.
    pub fn param_count_u128(&self) -> u128 {
        let (v, h, i) = (
            self.vocab_size as u128,
            self.hidden_size as u128,
            self.intermediate_size as u128,
        );
        let (l, a, kv, d) = (
            self.num_hidden_layers as u128,
            self.num_attention_heads as u128,
            self.num_key_value_heads as u128,
            self.head_dim as u128,
        );
        let untied = u128::from(!self.tie_word_embeddings);
        let mut per_layer = 2 * h * a * d + 2 * h * kv * d + 3 * h * i + 2 * h;
        if self.qkv_bias {
            per_layer += a * d + 2 * kv * d;
        }
        if self.o_bias {
            per_layer += h;
        }
        v * h * (1 + untied) + l * per_layer + h
    }

    /// Number of query-head groups sharing one KV head.
    pub fn gqa_groups(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// `[out, in]` shapes of the seven projection linears of one layer, by HF short name.
    pub fn linear_shapes(&self) -> [(&'static str, [usize; 2]); 7] {
        let (h, d, i) = (self.hidden_size, self.head_dim, self.intermediate_size);
        let (a, kv) = (self.num_attention_heads, self.num_key_value_heads);
        let shapes = [
            [a * d, h],
            [kv * d, h],
            [kv * d, h],
            [h, a * d],
            [i, h],
            [i, h],
            [h, i],
        ];
        std::array::from_fn(|m| (LINEAR_NAMES[m], shapes[m]))
    }

    /// Full HF module path of a projection: `model.layers.{l}.self_attn.q_proj` etc.
    pub fn linear_path(layer: usize, short: &str) -> String {
        let group = match short {
            "gate_proj" | "up_proj" | "down_proj" => "mlp",
            _ => "self_attn",
        };
        format!("model.layers.{layer}.{group}.{short}")
    }
}

/// Typed access to JSON fields with errors that name the file and the field.
pub(crate) struct Fields<'a> {
    pub v: &'a Value,
    pub origin: &'a str,
}

impl Fields<'_> {
    pub fn invalid(&self, field: &str, msg: String) -> ConfigError {
        ConfigError::Invalid {
            path: self.origin.into(),
            field: field.into(),
            msg,
        }
    }
    fn get(&self, k: &str) -> Option<&Value> {
        match self.v.get(k) {
            None | Some(Value::Null) => None,
            Some(x) => Some(x),
        }
    }
    pub fn opt_usize(&self, k: &str) -> Result<Option<usize>, ConfigError> {
        self.get(k)
            .map(|x| {
                x.as_u64().map(|u| u as usize).ok_or_else(|| {
                    self.invalid(k, format!("expected a non-negative integer, got {x}"))
                })
            })
            .transpose()
    }
    pub fn req_usize(&self, k: &'static str) -> Result<usize, ConfigError> {
        self.opt_usize(k)?.ok_or(ConfigError::Missing {
            path: self.origin.into(),
            field: k,
        })
    }
    pub fn opt_f64(&self, k: &str) -> Result<Option<f64>, ConfigError> {
        self.get(k)
            .map(|x| {
                x.as_f64()
                    .ok_or_else(|| self.invalid(k, format!("expected a number, got {x}")))
            })
            .transpose()
    }
    pub fn opt_bool(&self, k: &str) -> Result<Option<bool>, ConfigError> {
        self.get(k)
            .map(|x| {
                x.as_bool()
                    .ok_or_else(|| self.invalid(k, format!("expected true/false, got {x}")))
            })
            .transpose()
    }
    pub fn opt_str(&self, k: &str) -> Result<Option<String>, ConfigError> {
        self.get(k)
            .map(|x| {
                x.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| self.invalid(k, format!("expected a string, got {x}")))
            })
            .transpose()
    }
}

#[cfg(test)]
mod tests;
