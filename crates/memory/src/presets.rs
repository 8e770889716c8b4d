//! Built-in configurations of well-known models, so `qlora size llama-3-8b`
//! works offline.
//!
//! Numbers come from FORMATS.md §6.6 (checked there against hub config.json
//! files) or from the official config.json files (Qwen2.5 1.5B/3B/14B/32B/72B,
//! Llama-3.1/3.2). Only dimensions matter for memory; RoPE fields are carried
//! so the config is complete. Mixture-of-experts models (Mixtral) are not
//! supported by this project and have no preset.

use qlora_config::ModelConfig;
use serde_json::{json, Value};

use crate::MemoryError;

/// One preset: canonical name, HF repo id, config numbers.
pub struct Preset {
    pub name: &'static str,
    pub hub_id: &'static str,
    /// model_type, V, h, I, L, a, kv, head_dim (0 = h/a), tied
    pub dims: (&'static str, u64, u64, u64, u64, u64, u64, u64, bool),
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    pub max_position: u64,
    /// Llama-3.1-style `rope_scaling.factor` (llama3 type), if any.
    pub llama3_factor: Option<f64>,
}

macro_rules! p {
    ($n:expr, $id:expr, $mt:expr, $v:expr, $h:expr, $i:expr, $l:expr, $a:expr, $kv:expr, $d:expr, $tied:expr, $theta:expr, $eps:expr, $maxp:expr, $l3:expr) => {
        Preset {
            name: $n,
            hub_id: $id,
            dims: ($mt, $v, $h, $i, $l, $a, $kv, $d, $tied),
            rope_theta: $theta,
            rms_norm_eps: $eps,
            max_position: $maxp,
            llama3_factor: $l3,
        }
    };
}

pub const PRESETS: &[Preset] = &[
    p!(
        "llama-2-7b",
        "meta-llama/Llama-2-7b-hf",
        "llama",
        32000,
        4096,
        11008,
        32,
        32,
        32,
        0,
        false,
        1e4,
        1e-5,
        4096,
        None
    ),
    p!(
        "llama-2-13b",
        "meta-llama/Llama-2-13b-hf",
        "llama",
        32000,
        5120,
        13824,
        40,
        40,
        40,
        0,
        false,
        1e4,
        1e-5,
        4096,
        None
    ),
    p!(
        "llama-2-70b",
        "meta-llama/Llama-2-70b-hf",
        "llama",
        32000,
        8192,
        28672,
        80,
        64,
        8,
        0,
        false,
        1e4,
        1e-5,
        4096,
        None
    ),
    p!(
        "llama-3-8b",
        "meta-llama/Meta-Llama-3-8B",
        "llama",
        128256,
        4096,
        14336,
        32,
        32,
        8,
        0,
        false,
        5e5,
        1e-5,
        8192,
        None
    ),
    p!(
        "llama-3-70b",
        "meta-llama/Meta-Llama-3-70B",
        "llama",
        128256,
        8192,
        28672,
        80,
        64,
        8,
        0,
        false,
        5e5,
        1e-5,
        8192,
        None
    ),
    p!(
        "llama-3.1-8b",
        "meta-llama/Llama-3.1-8B",
        "llama",
        128256,
        4096,
        14336,
        32,
        32,
        8,
        0,
        false,
        5e5,
        1e-5,
        131072,
        Some(8.0)
    ),
    p!(
        "llama-3.1-70b",
        "meta-llama/Llama-3.1-70B",
        "llama",
        128256,
        8192,
        28672,
        80,
        64,
        8,
        0,
        false,
        5e5,
        1e-5,
        131072,
        Some(8.0)
    ),
    p!(
        "llama-3.1-405b",
        "meta-llama/Llama-3.1-405B",
        "llama",
        128256,
        16384,
        53248,
        126,
        128,
        8,
        0,
        false,
        5e5,
        1e-5,
        131072,
        Some(8.0)
    ),
    p!(
        "llama-3.2-1b",
        "meta-llama/Llama-3.2-1B",
        "llama",
        128256,
        2048,
        8192,
        16,
        32,
        8,
        64,
        true,
        5e5,
        1e-5,
        131072,
        Some(32.0)
    ),
    p!(
        "llama-3.2-3b",
        "meta-llama/Llama-3.2-3B",
        "llama",
        128256,
        3072,
        8192,
        28,
        24,
        8,
        128,
        true,
        5e5,
        1e-5,
        131072,
        Some(32.0)
    ),
    p!(
        "mistral-7b",
        "mistralai/Mistral-7B-v0.1",
        "mistral",
        32000,
        4096,
        14336,
        32,
        32,
        8,
        0,
        false,
        1e4,
        1e-5,
        32768,
        None
    ),
    p!(
        "tinyllama-1.1b",
        "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
        "llama",
        32000,
        2048,
        5632,
        22,
        32,
        4,
        0,
        false,
        1e4,
        1e-5,
        2048,
        None
    ),
    p!(
        "smollm2-135m",
        "HuggingFaceTB/SmolLM2-135M",
        "llama",
        49152,
        576,
        1536,
        30,
        9,
        3,
        64,
        true,
        1e5,
        1e-5,
        8192,
        None
    ),
    p!(
        "smollm2-360m",
        "HuggingFaceTB/SmolLM2-360M",
        "llama",
        49152,
        960,
        2560,
        32,
        15,
        5,
        64,
        true,
        1e5,
        1e-5,
        8192,
        None
    ),
    p!(
        "smollm2-1.7b",
        "HuggingFaceTB/SmolLM2-1.7B",
        "llama",
        49152,
        2048,
        8192,
        24,
        32,
        32,
        64,
        true,
        1.3e5,
        1e-5,
        8192,
        None
    ),
    p!(
        "qwen2.5-0.5b",
        "Qwen/Qwen2.5-0.5B",
        "qwen2",
        151936,
        896,
        4864,
        24,
        14,
        2,
        0,
        true,
        1e6,
        1e-6,
        32768,
        None
    ),
    p!(
        "qwen2.5-1.5b",
        "Qwen/Qwen2.5-1.5B",
        "qwen2",
        151936,
        1536,
        8960,
        28,
        12,
        2,
        0,
        true,
        1e6,
        1e-6,
        131072,
        None
    ),
    p!(
        "qwen2.5-3b",
        "Qwen/Qwen2.5-3B",
        "qwen2",
        151936,
        2048,
        11008,
        36,
        16,
        2,
        0,
        true,
        1e6,
        1e-6,
        32768,
        None
    ),
    p!(
        "qwen2.5-7b",
        "Qwen/Qwen2.5-7B",
        "qwen2",
        152064,
        3584,
        18944,
        28,
        28,
        4,
        0,
        false,
        1e6,
        1e-6,
        131072,
        None
    ),
    p!(
        "qwen2.5-14b",
        "Qwen/Qwen2.5-14B",
        "qwen2",
        152064,
        5120,
        13824,
        48,
        40,
        8,
        0,
        false,
        1e6,
        1e-5,
        131072,
        None
    ),
    p!(
        "qwen2.5-32b",
        "Qwen/Qwen2.5-32B",
        "qwen2",
        152064,
        5120,
        27648,
        64,
        40,
        8,
        0,
        false,
        1e6,
        1e-5,
        131072,
        None
    ),
    p!(
        "qwen2.5-72b",
        "Qwen/Qwen2.5-72B",
        "qwen2",
        152064,
        8192,
        29568,
        80,
        64,
        8,
        0,
        false,
        1e6,
        1e-6,
        131072,
        None
    ),
];

/// Lower-case, `_`/space → `-`, org prefix and `meta-` / `-hf` noise removed.
pub fn normalize(name: &str) -> String {
    let mut s = name.trim().to_ascii_lowercase().replace(['_', ' '], "-");
    if let Some((_, tail)) = s.rsplit_once('/') {
        s = tail.to_string();
    }
    if let Some(t) = s.strip_prefix("meta-") {
        s = t.to_string();
    }
    for suf in ["-hf", "-v0.1"] {
        if let Some(t) = s.strip_suffix(suf) {
            s = t.to_string();
        }
    }
    s.replace("llama3", "llama-3")
        .replace("llama2", "llama-2")
        .replace("qwen2-5", "qwen2.5")
}

impl Preset {
    /// The config.json this preset stands for.
    pub fn config_json(&self) -> Value {
        let (mt, v, h, i, l, a, kv, d, tied) = self.dims;
        let mut j = json!({
            "model_type": mt,
            "hidden_act": "silu",
            "vocab_size": v,
            "hidden_size": h,
            "intermediate_size": i,
            "num_hidden_layers": l,
            "num_attention_heads": a,
            "num_key_value_heads": kv,
            "tie_word_embeddings": tied,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position,
            "torch_dtype": "bfloat16",
        });
        if d != 0 {
            j["head_dim"] = json!(d);
        }
        if let Some(f) = self.llama3_factor {
            j["rope_scaling"] = json!({"rope_type": "llama3", "factor": f, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        }
        j
    }

    pub fn config(&self) -> ModelConfig {
        ModelConfig::from_json(&self.config_json(), &format!("preset {}", self.name))
            .expect("built-in presets are valid configs")
    }
}

/// Find a preset by (normalized) name.
pub fn find(name: &str) -> Option<&'static Preset> {
    let n = normalize(name);
    PRESETS
        .iter()
        .find(|p| p.name == n || normalize(p.hub_id) == n)
}

/// Levenshtein distance (for "did you mean" suggestions).
pub fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The (up to) three preset names closest to `name`.
pub fn closest(name: &str) -> Vec<&'static str> {
    let n = normalize(name);
    let mut v: Vec<(usize, &'static str)> = PRESETS
        .iter()
        .map(|p| (edit_distance(&n, p.name), p.name))
        .collect();
    v.sort();
    v.into_iter().take(3).map(|(_, n)| n).collect()
}

/// Error for a name that is neither a path nor a preset.
pub fn unknown(reference: &str) -> MemoryError {
    let n = normalize(reference);
    let hint = if n.starts_with("mixtral") {
        " (mixture-of-experts models are not supported)".to_string()
    } else {
        format!(
            "; closest presets: {} (all presets: `qlora size --list-presets`)",
            closest(reference).join(", ")
        )
    };
    MemoryError::UnknownReference {
        reference: reference.to_string(),
        hint,
    }
}
