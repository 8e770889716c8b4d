//! A base model as HF-named f32 tensors, from any of the inputs `qlora` accepts:
//! an HF folder (f32/f16/bf16 safetensors, single or sharded), a bitsandbytes 4-bit
//! folder (dequantized), or a llama-family `.gguf` file (dequantized, q/k rows back in
//! HF order). One tensor is decoded at a time.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use qlora_config::ModelConfig;
use qlora_formats::bnb::{bnb4_weight_keys, is_bnb4_key, read_bnb4};
use qlora_formats::model_ref::{ModelRef, ModelSource, Resolve};
use qlora_formats::ModelFiles;
use qlora_gguf::llama::GgufModel;

enum Inner {
    Folder {
        files: ModelFiles,
        bnb: HashSet<String>,
    },
    Gguf(Box<GgufModel>),
}

/// An opened base model (see the module docs).
pub struct SourceModel {
    path: PathBuf,
    config: ModelConfig,
    inner: Inner,
}

/// HF tensor names of a llama-family model in loading order: embedding, each layer's
/// norm and projections, the final norm, and `lm_head` unless the embedding is tied.
pub fn expected_names(c: &ModelConfig) -> Vec<String> {
    let mut v = vec!["model.embed_tokens.weight".to_string()];
    for l in 0..c.num_hidden_layers {
        let p = format!("model.layers.{l}");
        v.push(format!("{p}.input_layernorm.weight"));
        for (short, _) in c.linear_shapes() {
            if short == "gate_proj" {
                v.push(format!("{p}.post_attention_layernorm.weight"));
            }
            if short == "o_proj" && c.architecture.qk_norm() {
                v.push(format!("{p}.self_attn.q_norm.weight"));
                v.push(format!("{p}.self_attn.k_norm.weight"));
            }
            let path = ModelConfig::linear_path(l, short);
            v.push(format!("{path}.weight"));
            let bias = match short {
                "q_proj" | "k_proj" | "v_proj" => c.qkv_bias,
                "o_proj" => c.o_bias,
                _ => false,
            };
            if bias {
                v.push(format!("{path}.bias"));
            }
        }
    }
    v.push("model.norm.weight".into());
    if !c.tie_word_embeddings {
        v.push("lm_head.weight".into());
    }
    v
}

impl SourceModel {
    /// Open a model folder or `.gguf` file (resolved by [`ModelRef`], never from the hub)
    /// and check that its tensors are exactly those of the llama architecture its config
    /// describes.
    pub fn open(path: &Path) -> Result<SourceModel> {
        if !path.exists() {
            bail!("{}: no such file or folder", path.display());
        }
        let r = ModelRef::resolve_with(&path.to_string_lossy(), &Resolve::new(false))?;
        Self::from_ref(&r)
    }

    /// Open a resolved model reference (see [`SourceModel::open`]).
    pub fn from_ref(r: &ModelRef) -> Result<SourceModel> {
        let path = r.path();
        if let ModelSource::Gguf(file) = &r.source {
            let g = GgufModel::open(file)?;
            let config = g.config().clone();
            return Ok(SourceModel {
                path: file.clone(),
                config,
                inner: Inner::Gguf(Box::new(g)),
            });
        }
        let ModelSource::Folder(dir) = &r.source else {
            bail!(
                "{}: not a model folder (no config.json) and not a .gguf file",
                path.display()
            );
        };
        let path = dir.as_path();
        let cfg_path = path.join("config.json");
        let config = ModelConfig::from_file(&cfg_path)?;
        let files = ModelFiles::open(path)?;
        let bnb: HashSet<String> = bnb4_weight_keys(&files).into_iter().collect();
        let expected: HashSet<String> = expected_names(&config).into_iter().collect();
        for name in files.names() {
            let known = expected.contains(name)
                || is_bnb4_key(name, &bnb)
                || name.ends_with("rotary_emb.inv_freq")
                || (config.tie_word_embeddings && name == "lm_head.weight");
            if !known {
                bail!(
                    "{}: tensor `{name}` is not part of a {}-layer {} model \
                     (unsupported architecture or a config.json that does not match the weights)",
                    files.file_of(name).unwrap_or(path).display(),
                    config.num_hidden_layers,
                    config.architecture.as_str()
                );
            }
        }
        for name in &expected {
            if !files.contains(name) {
                bail!("{}: missing tensor `{name}`", path.display());
            }
        }
        Ok(SourceModel {
            path: path.to_path_buf(),
            config,
            inner: Inner::Folder { files, bnb },
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The GGUF file behind this source, if it is one.
    pub fn gguf(&self) -> Option<&GgufModel> {
        match &self.inner {
            Inner::Gguf(g) => Some(g),
            Inner::Folder { .. } => None,
        }
    }

    /// One tensor by HF name: row-major shape and f32 values in HF layout.
    pub fn tensor(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        match &self.inner {
            Inner::Gguf(g) => Ok(g.get(name)?),
            Inner::Folder { files, bnb } => {
                if bnb.contains(name) {
                    let q = read_bnb4(files, name)?
                        .with_context(|| format!("{name}: quant state vanished"))?;
                    let shape = q.shape.clone();
                    return Ok((shape, q.dequantize_f32()));
                }
                let t = files.tensor(name)?;
                Ok((t.shape.to_vec(), t.to_f32()?))
            }
        }
    }

    /// Let the OS drop the pages of a tensor that has been consumed.
    pub fn release(&self, name: &str) {
        if let Inner::Folder { files, .. } = &self.inner {
            files.release(name);
        }
    }
}
