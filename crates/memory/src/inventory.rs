//! The list of weight tensors of a model, with the role each one plays.
//!
//! Every size in this crate is computed from an [`Inventory`], whatever the
//! source (config.json, preset, safetensors headers, GGUF header), so one code
//! path decides what is quantized and what is kept in 16 bits.

use qlora_config::ModelConfig;
use serde::Serialize;

/// What a tensor is for; the size report splits parameters by role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Embeddings,
    Attention,
    Mlp,
    Norms,
    LmHead,
    Other,
}

impl Role {
    pub const ALL: [Role; 6] = [
        Role::Embeddings,
        Role::Attention,
        Role::Mlp,
        Role::Norms,
        Role::LmHead,
        Role::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Embeddings => "embeddings",
            Role::Attention => "attention",
            Role::Mlp => "mlp",
            Role::Norms => "norms",
            Role::LmHead => "lm_head",
            Role::Other => "other",
        }
    }
}

/// One weight tensor (HF naming and `[out, in]` layout for linears).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<u64>,
    pub role: Role,
    /// An `nn.Linear` weight that transformers' bnb integration replaces by
    /// `Linear4bit` (every Linear except `lm_head`; FORMATS.md §2.2).
    pub quantizable: bool,
    /// What an existing bnb-4bit checkpoint recorded for this weight (from its
    /// quant-state JSON): lets the sizes of other 4-bit formats be exact too.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub known: Option<KnownQuantState>,
    /// Stored as bfloat16 in a safetensors checkpoint. A 4-bit model in
    /// `qlora-model` keeps such an embedding / lm_head in bf16 as stored
    /// (unknown, so false, when sizing from a config or a GGUF).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub stored_bf16: bool,
    /// Bytes `qlora-model` holds for this tensor under `--quant native`: a GGUF
    /// file's stored blocks as they are (plus the 4-byte-per-row map of a llama
    /// q/k weight, whose rows the converter permuted). `None` outside GGUF files.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub native_bytes: Option<u64>,
}

/// Source dtype name and `nested_offset` repr read from a quant-state blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KnownQuantState {
    pub dtype: String,
    /// The double-quant offset is the mean of this blocksize's absmax: it is
    /// known only for formats with the same blocksize (NF4 and FP4 share it).
    pub blocksize: u64,
    pub offset_repr: Option<String>,
}

impl TensorSpec {
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }

    /// `[out, in]` of a 2-D tensor (linears); `None` otherwise.
    pub fn out_in(&self) -> Option<[u64; 2]> {
        match self.shape.as_slice() {
            [o, i] => Some([*o, *i]),
            _ => None,
        }
    }
}

/// All weight tensors of a model.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Inventory {
    pub tensors: Vec<TensorSpec>,
    /// `lm_head` shares `embed_tokens` (absent from checkpoints, counted once).
    pub tied: bool,
}

impl Inventory {
    /// The tensors transformers instantiates for a Llama/Mistral/Qwen2 config
    /// (FORMATS.md §4.2), in HF naming.
    pub fn from_config(cfg: &ModelConfig) -> Inventory {
        let (v, h) = (cfg.vocab_size as u64, cfg.hidden_size as u64);
        let mut t = Vec::with_capacity(cfg.num_hidden_layers * 12 + 3);
        let mut push = |name: String, shape: Vec<u64>, role: Role, quantizable: bool| {
            t.push(TensorSpec {
                name,
                shape,
                role,
                quantizable,
                known: None,
                stored_bf16: false,
                native_bytes: None,
            })
        };
        push(
            "model.embed_tokens.weight".into(),
            vec![v, h],
            Role::Embeddings,
            false,
        );
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            push(
                format!("{p}.input_layernorm.weight"),
                vec![h],
                Role::Norms,
                false,
            );
            push(
                format!("{p}.post_attention_layernorm.weight"),
                vec![h],
                Role::Norms,
                false,
            );
            for (short, [o, i]) in cfg.linear_shapes() {
                let path = ModelConfig::linear_path(l, short);
                let role = if path.contains(".mlp.") {
                    Role::Mlp
                } else {
                    Role::Attention
                };
                push(
                    format!("{path}.weight"),
                    vec![o as u64, i as u64],
                    role,
                    true,
                );
                let bias = match short {
                    "q_proj" | "k_proj" | "v_proj" => cfg.qkv_bias,
                    "o_proj" => cfg.o_bias,
                    _ => false,
                };
                if bias {
                    push(
                        format!("{path}.bias"),
                        vec![o as u64],
                        Role::Attention,
                        false,
                    );
                }
            }
        }
        push("model.norm.weight".into(), vec![h], Role::Norms, false);
        if !cfg.tie_word_embeddings {
            push("lm_head.weight".into(), vec![v, h], Role::LmHead, false);
        }
        Inventory {
            tensors: t,
            tied: cfg.tie_word_embeddings,
        }
    }

    /// Unique parameters (a tied head is counted once, like `model.num_parameters()`).
    pub fn total_params(&self) -> u64 {
        self.tensors.iter().map(TensorSpec::numel).sum()
    }

    pub fn params_by_role(&self, role: Role) -> u64 {
        self.tensors
            .iter()
            .filter(|t| t.role == role)
            .map(TensorSpec::numel)
            .sum()
    }

    /// Parameters of the Linear weights that 4-bit quantization replaces.
    pub fn quantizable_params(&self) -> u64 {
        self.quantizable().map(TensorSpec::numel).sum()
    }

    pub fn quantizable(&self) -> impl Iterator<Item = &TensorSpec> {
        self.tensors.iter().filter(|t| t.quantizable)
    }
}

/// Exact parameter count of FORMATS.md §6.1, written independently of
/// [`Inventory::from_config`] so each checks the other:
/// `P = V·h·(1 + untied) + L·(h·a·d + 2·h·kv·d + a·d·h + 3·h·I + 2·h) + h` (+ biases).
pub fn formula_params(cfg: &ModelConfig) -> u64 {
    let (v, h, i) = (
        cfg.vocab_size as u64,
        cfg.hidden_size as u64,
        cfg.intermediate_size as u64,
    );
    let (l, a, kv, d) = (
        cfg.num_hidden_layers as u64,
        cfg.num_attention_heads as u64,
        cfg.num_key_value_heads as u64,
        cfg.head_dim as u64,
    );
    let untied = u64::from(!cfg.tie_word_embeddings);
    let mut per_layer = h * a * d + 2 * h * kv * d + a * d * h + 3 * h * i + 2 * h;
    if cfg.qkv_bias {
        per_layer += a * d + 2 * kv * d;
    }
    if cfg.o_bias {
        per_layer += h;
    }
    v * h * (1 + untied) + l * per_layer + h
}
