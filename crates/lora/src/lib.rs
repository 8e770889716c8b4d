//! LoRA adapters on the frozen (usually 4-bit) base.
//!
//! An [`Adapter`] maps HF module paths (`model.layers.0.self_attn.q_proj`) to a
//! pair of f32 matrices `A: [r, in]`, `B: [out, r]`, exactly PEFT's shapes, and
//! the forward of an adapted linear is `y = W x + scaling · B (A dropout(x))`.
//!
//! DoRA (PEFT's `use_dora`, FORMATS §3.4) adds a trainable magnitude vector
//! `m: [out]` per module ([`LoraWeights::magnitude`]); see [`dora`] for the math.

use std::collections::BTreeMap;

pub mod dora;
pub mod init;
pub mod io;
pub mod peft;
#[cfg(test)]
mod tests;

pub use init::{init_adapter, init_dora_magnitudes};
pub use io::{load_adapter, peft_key, save_adapter, Which};
pub use peft::{InitKind, PeftConfig, TargetModules};
use qlora_config::LINEAR_NAMES;

/// Sort key putting module paths in model order: layer index, then
/// q,k,v,o,gate,up,down (PyTorch's parameter order, which the trainer uses for
/// the global gradient norm); unknown paths sort after, by name.
pub fn module_order_key(path: &str) -> (usize, usize, String) {
    let layer = path
        .strip_prefix("model.layers.")
        .and_then(|r| r.split('.').next())
        .and_then(|l| l.parse().ok())
        .unwrap_or(usize::MAX);
    let short = path.rsplit('.').next().unwrap_or("");
    let idx = LINEAR_NAMES
        .iter()
        .position(|n| *n == short)
        .unwrap_or(LINEAR_NAMES.len());
    (layer, idx, path.to_string())
}

/// The hyper-parameters of a LoRA adapter (the subset of PEFT's `LoraConfig` we honour).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    /// Short module names (`q_proj`, …) or full paths, PEFT's matching rule.
    pub target_modules: Vec<String>,
    pub use_rslora: bool,
    /// DoRA: every module also has a magnitude vector (PEFT's `use_dora`).
    pub use_dora: bool,
}

impl LoraConfig {
    /// `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }
}

/// A dense row-major f32 matrix: the storage of LoRA weights and their gradients.
#[derive(Debug, Clone, PartialEq)]
pub struct Matrix {
    rows: usize,
    cols: usize,
    data: Vec<f32>,
}

impl Matrix {
    /// `rows × cols` values in row-major order; errors if the count does not match.
    pub fn new(rows: usize, cols: usize, data: Vec<f32>) -> anyhow::Result<Self> {
        anyhow::ensure!(
            rows.checked_mul(cols) == Some(data.len()),
            "a [{rows}, {cols}] matrix needs {} values, got {}",
            rows.saturating_mul(cols),
            data.len()
        );
        Ok(Self { rows, cols, data })
    }
    pub fn zeros(rows: usize, cols: usize) -> Self {
        Self {
            rows,
            cols,
            data: vec![0.0; rows * cols],
        }
    }
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// `[rows, cols]`.
    pub fn dims(&self) -> [usize; 2] {
        [self.rows, self.cols]
    }
    /// Number of values.
    pub fn len(&self) -> usize {
        self.data.len()
    }
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
    /// The values, row-major.
    pub fn data(&self) -> &[f32] {
        &self.data
    }
    pub fn data_mut(&mut self) -> &mut [f32] {
        &mut self.data
    }
    pub fn into_data(self) -> Vec<f32> {
        self.data
    }
}

/// One adapted linear: `A: [r, in]`, `B: [out, r]` (f32), and for DoRA the
/// magnitude `m: [out]` (PEFT's `lora_magnitude_vector`).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraWeights {
    pub a: Matrix,
    pub b: Matrix,
    /// DoRA magnitude `[out]` (`None` for plain LoRA). In [`AdapterGrads`]: `dL/dm`.
    pub magnitude: Option<Vec<f32>>,
}

impl LoraWeights {
    /// Plain LoRA weights (no DoRA magnitude).
    pub fn new(a: Matrix, b: Matrix) -> Self {
        LoraWeights {
            a,
            b,
            magnitude: None,
        }
    }
}

/// A whole adapter: configuration plus weights keyed by HF module path.
#[derive(Debug, Clone)]
pub struct Adapter {
    pub config: LoraConfig,
    pub layers: BTreeMap<String, LoraWeights>,
}

impl Adapter {
    pub fn scaling(&self) -> f64 {
        self.config.scaling()
    }
    pub fn get(&self, module_path: &str) -> Option<&LoraWeights> {
        self.layers.get(module_path)
    }
    /// Module paths in model order (see [`module_order_key`]).
    pub fn ordered_modules(&self) -> Vec<String> {
        let mut v: Vec<String> = self.layers.keys().cloned().collect();
        v.sort_by_key(|p| module_order_key(p));
        v
    }
    /// Number of trainable parameters.
    pub fn num_params(&self) -> usize {
        self.layers
            .values()
            .map(|w| w.a.len() + w.b.len() + w.magnitude.as_ref().map_or(0, Vec::len))
            .sum()
    }
}

/// Gradients of an adapter, same keys and shapes as [`Adapter::layers`].
pub type AdapterGrads = BTreeMap<String, LoraWeights>;
