//! A model reference loaded as a [`Model`] and, where wanted, its [`Tokenizer`].

use std::path::Path;

use anyhow::{Context, Result};
use qlora_config::ModelConfig;
use qlora_formats::{ModelRef, ModelSource};
use qlora_gguf::llama::GgufModel;
use qlora_model::ops::linear::FrozenWeight;
use qlora_model::{LoadOptions, Model, QuantMode, ShardSpec, WeightSource};
use qlora_tokenizer::Tokenizer;

/// Whether [`load`] loads the model's tokenizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NeedTokenizer {
    /// Weights only (`qlora eval` on pre-tokenized rows).
    No,
    /// A folder's tokenizer when it has a usable one (pre-tokenized training data needs
    /// none); a GGUF file's embedded tokenizer always (an error if it is broken).
    IfPresent,
    /// Always; a model without a usable tokenizer is an error (`qlora generate`).
    Yes,
}

/// A loaded model reference.
pub struct LoadedModel {
    pub model: Model,
    /// With its stop ids extended by the model's `eos_token_id`s.
    pub tokenizer: Option<Tokenizer>,
    pub model_ref: ModelRef,
    /// How the base weights are held (the default resolved: see [`default_quant`]).
    pub quant: QuantMode,
}

/// The `--quant` a model source gets when none is given: `native` for a GGUF file
/// (its own blocks, no second rounding), `nf4` (QLoRA's) for everything else.
pub fn default_quant(source: &ModelSource) -> QuantMode {
    match source {
        ModelSource::Gguf(_) => QuantMode::Native,
        _ => QuantMode::Nf4,
    }
}

/// A GGUF llama model as a [`WeightSource`] (HF names and layout, decoded on demand).
struct GgufSource {
    model: GgufModel,
    names: Vec<String>,
}

impl WeightSource for GgufSource {
    fn names(&self) -> Vec<String> {
        self.names.clone()
    }
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        let gguf_name = self.model.gguf_name(name)?;
        self.model
            .file()
            .tensor_info(gguf_name)
            .ok()
            .map(|t| t.shape())
    }
    fn f32(&self, name: &str) -> Result<Vec<f32>> {
        Ok(self.model.get(name)?.1)
    }
    /// The file's own blocks (shared with its memory map), for `--quant native`.
    fn native(&self, name: &str) -> Result<Option<FrozenWeight>> {
        let raw = self.model.raw(name)?;
        let ty = raw.ggml_type;
        qlora_model::ops::ggml::frozen_from_raw(raw)
            .map(Some)
            .map_err(|e| anyhow::anyhow!("{}: `{name}` ({ty}): {e}", self.origin(name)))
    }
    fn origin(&self, _name: &str) -> String {
        self.model.file().path().display().to_string()
    }
}

/// Resolve `spec` (see [`ModelRef::resolve`]; the hub only with `allow_network`) and load
/// the model with its base weights held as `quant` says ([`default_quant`] when `None`),
/// plus its tokenizer as `tok` says. `native` is refused for sources that are not GGUF.
pub fn load(
    spec: &str,
    quant: Option<QuantMode>,
    allow_network: bool,
    tok: NeedTokenizer,
) -> Result<LoadedModel> {
    load_sharded(spec, quant, allow_network, tok, None)
}

/// [`load`]; with `shard`, this process keeps only its share of every layer's
/// projection weights (`qlora train --shard full`, see `qlora_model::shard`).
pub fn load_sharded(
    spec: &str,
    quant: Option<QuantMode>,
    allow_network: bool,
    tok: NeedTokenizer,
    shard: Option<ShardSpec>,
) -> Result<LoadedModel> {
    let model_ref = ModelRef::resolve(spec, allow_network)?;
    let quant = quant.unwrap_or_else(|| default_quant(&model_ref.source));
    if quant == QuantMode::Native && !model_ref.is_gguf() {
        anyhow::bail!(
            "{}: {}",
            model_ref.path().display(),
            qlora_model::NATIVE_NEEDS_GGUF
        );
    }
    let opts = LoadOptions { quant };
    let (model, tokenizer) = match &model_ref.source {
        ModelSource::Gguf(path) => {
            let t = match tok {
                NeedTokenizer::No => None,
                NeedTokenizer::IfPresent | NeedTokenizer::Yes => Some(Tokenizer::from_gguf(path)?),
            };
            (load_gguf_sharded(path, &opts, shard)?, t)
        }
        // A model folder: `ModelRef::resolve` refuses everything else.
        _ => {
            let dir = model_ref.path();
            let load_model = || {
                Model::from_folder_sharded(dir, &opts, shard)
                    .with_context(|| format!("loading model {}", dir.display()))
            };
            match tok {
                NeedTokenizer::No => (load_model()?, None),
                NeedTokenizer::IfPresent => (load_model()?, Tokenizer::from_folder(dir).ok()),
                NeedTokenizer::Yes => {
                    let m = load_model()?;
                    (m, Some(Tokenizer::from_folder(dir)?))
                }
            }
        }
    };
    let tokenizer = tokenizer.map(|mut t| {
        t.add_stop_ids(&model.config.eos_token_ids);
        t
    });
    Ok(LoadedModel {
        model,
        tokenizer,
        model_ref,
        quant,
    })
}

/// A llama-family GGUF file as a [`Model`]: its own blocks with [`QuantMode::Native`],
/// else dequantized to f32 and held as `opts.quant` says.
pub fn load_gguf(path: &Path, opts: &LoadOptions) -> Result<Model> {
    load_gguf_sharded(path, opts, None)
}

/// [`load_gguf`] keeping only this rank's share of the projection weights.
pub fn load_gguf_sharded(
    path: &Path,
    opts: &LoadOptions,
    shard: Option<ShardSpec>,
) -> Result<Model> {
    let g = GgufModel::open(path)?;
    let config: ModelConfig = g.config().clone();
    let names = g.hf_names().map(str::to_string).collect();
    let src = GgufSource { model: g, names };
    Model::from_source_sharded(config, &src, opts, shard)
        .with_context(|| format!("loading {}", path.display()))
}
