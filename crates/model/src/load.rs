//! Building a [`Model`] from weights: an HF folder (single or sharded
//! safetensors, memory-mapped), a pre-quantized bitsandbytes 4-bit folder
//! (used as stored), or any source of HF-named tensors (the GGUF loader).
//!
//! Full-precision projection weights are converted one at a time while
//! loading, so peak memory is the converted model plus one full weight.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, bail, ensure, Context, Result};
use half::bf16;
use qlora_config::ModelConfig;
use qlora_formats::ModelFiles;
use qlora_quant::{QuantType, Quantized4};
use safetensors::Dtype;

use crate::model::{Layer, Model, LINEAR_NAMES};
use crate::ops::linear::{FrozenLinear, FrozenWeight};

/// How full-precision projection weights are held after loading.
/// (Pre-quantized bnb-4bit weights are always kept as stored.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QuantMode {
    /// f32, exact (`--quant none`).
    None,
    /// bf16 storage, f32 compute.
    Bf16,
    /// bitsandbytes NF4, blocksize 64 (the QLoRA default).
    #[default]
    Nf4,
    /// bitsandbytes FP4, blocksize 64.
    Fp4,
    /// A GGUF file's own blocks, as stored (`--quant native`, the default for GGUF
    /// sources): Q4_0 … Q6_K and F16/BF16 are dequantized tile by tile like NF4,
    /// F32 tensors are held as f32. Only sources that implement
    /// [`WeightSource::native`] (GGUF files) can be loaded this way.
    Native,
}

impl QuantMode {
    pub fn as_str(self) -> &'static str {
        match self {
            QuantMode::None => "none",
            QuantMode::Bf16 => "bf16",
            QuantMode::Nf4 => "nf4",
            QuantMode::Fp4 => "fp4",
            QuantMode::Native => "native",
        }
    }
}

impl std::fmt::Display for QuantMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for QuantMode {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "none" | "f32" | "fp32" => Ok(QuantMode::None),
            "bf16" => Ok(QuantMode::Bf16),
            "nf4" => Ok(QuantMode::Nf4),
            "fp4" => Ok(QuantMode::Fp4),
            "native" => Ok(QuantMode::Native),
            other => {
                bail!("unknown quantization `{other}` (expected native, none, bf16, nf4 or fp4)")
            }
        }
    }
}

/// Loading options.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    pub quant: QuantMode,
}

/// A model's HF-named weights, decoded on demand (to f32, bf16, or bnb 4-bit
/// as stored). Implemented for safetensors folders and in-memory f32 tensors;
/// the GGUF loader implements it lazily. (`qlora_formats::TensorSource` is the
/// lower level: raw stored bytes of safetensors files.)
pub trait WeightSource {
    /// Every tensor name.
    fn names(&self) -> Vec<String>;
    /// Shape, if the tensor exists.
    fn shape(&self, name: &str) -> Option<Vec<usize>>;
    /// The tensor converted to f32 (float dtypes only).
    fn f32(&self, name: &str) -> Result<Vec<f32>>;
    /// The file (or other origin) a tensor comes from, for error messages.
    fn origin(&self, name: &str) -> String;
    /// The tensor as stored, if it is stored as bfloat16 (`None` otherwise).
    /// Embeddings and lm_head of a 4-bit model stay in this precision, as
    /// transformers keeps them, instead of doubling in f32; reading them
    /// directly also avoids an f32 copy of the largest tensors while loading.
    fn bf16(&self, _name: &str) -> Option<Result<Vec<half::bf16>>> {
        None
    }
    /// The tensor held as the source stores it, for [`QuantMode::Native`]: a GGUF
    /// file's ggml blocks ([`crate::ops::ggml::GgmlWeight`]). `Ok(None)` (the default)
    /// for sources that are not GGUF files.
    fn native(&self, _name: &str) -> Result<Option<FrozenWeight>> {
        Ok(None)
    }
    /// The weight `name` if it is stored as a pre-quantized bitsandbytes 4-bit
    /// weight (its quant state present), `Ok(None)` otherwise. Only safetensors
    /// folders hold such weights; other sources refuse them by default.
    fn bnb4(&self, name: &str) -> Result<Option<Quantized4>> {
        match bnb_state_key(self, name) {
            None => Ok(None),
            Some(state) => bail!(
                "{}: `{state}`: bitsandbytes 4-bit weights are only read from safetensors files",
                self.origin(name)
            ),
        }
    }
}

/// In-memory f32 tensors keyed by HF name.
pub struct MemTensors {
    pub origin: String,
    pub tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
}

impl WeightSource for MemTensors {
    fn names(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.tensors.get(name).map(|t| t.0.clone())
    }
    fn f32(&self, name: &str) -> Result<Vec<f32>> {
        self.tensors
            .get(name)
            .map(|t| t.1.clone())
            .ok_or_else(|| anyhow!("{}: missing tensor `{name}`", self.origin))
    }
    fn origin(&self, _name: &str) -> String {
        self.origin.clone()
    }
}

/// An HF folder's safetensors (single or sharded, memory-mapped by
/// `qlora-formats`). Each tensor's pages are released right after it is read,
/// so resident memory stays near the converted model plus one tensor.
impl WeightSource for ModelFiles {
    fn names(&self) -> Vec<String> {
        ModelFiles::names(self)
            .into_iter()
            .map(str::to_string)
            .collect()
    }
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.get(name).map(|t| t.shape.to_vec())
    }
    fn f32(&self, name: &str) -> Result<Vec<f32>> {
        let v = self.tensor(name)?.to_f32()?;
        self.release(name);
        Ok(v)
    }
    fn bf16(&self, name: &str) -> Option<Result<Vec<half::bf16>>> {
        let t = self.get(name).filter(|t| t.dtype == Dtype::BF16)?;
        let v = t
            .data
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]))
            .collect();
        self.release(name);
        Some(Ok(v))
    }
    /// Through `qlora-formats`' bnb reader (every length and the code table checked).
    fn bnb4(&self, name: &str) -> Result<Option<Quantized4>> {
        let q = qlora_formats::read_bnb4(self, name)?;
        if q.is_some() {
            self.release(name);
            for suffix in qlora_formats::bnb::AUX_SUFFIXES {
                self.release(&format!("{name}.{suffix}"));
            }
        }
        Ok(q)
    }
    fn origin(&self, name: &str) -> String {
        match self.file_of(name) {
            Some(p) => p.display().to_string(),
            None => self.dir().display().to_string(),
        }
    }
}

/// Number of decoder layers present in the tensor names.
fn layers_in(names: &[String]) -> usize {
    names
        .iter()
        .filter_map(|n| n.strip_prefix("model.layers."))
        .filter_map(|r| r.split('.').next()?.parse::<usize>().ok())
        .map(|l| l + 1)
        .max()
        .unwrap_or(0)
}

/// The bitsandbytes quant-state key of a weight, if it is stored 4-bit.
fn bnb_state_key<S: WeightSource + ?Sized>(src: &S, weight: &str) -> Option<String> {
    [QuantType::Nf4, QuantType::Fp4]
        .into_iter()
        .map(|q| qlora_formats::bnb::quant_state_key(weight, q))
        .find(|k| src.shape(k).is_some())
}

fn check_shape(src: &dyn WeightSource, name: &str, expect: &[usize], why: &str) -> Result<()> {
    let origin = src.origin(name);
    let shape = src
        .shape(name)
        .ok_or_else(|| anyhow!("{origin}: missing tensor `{name}`"))?;
    ensure!(
        shape == expect,
        "{origin}: tensor `{name}` has shape {shape:?}, expected {expect:?} ({why})"
    );
    Ok(())
}

/// Why `--quant native` cannot load a source that is not a GGUF file.
pub const NATIVE_NEEDS_GGUF: &str = "--quant native keeps a GGUF file's own quantized blocks, and \
     this model is not a .gguf file; use --quant nf4, fp4, bf16 or none";

/// `name` as the source stores it (`--quant native`).
fn native(src: &dyn WeightSource, name: &str) -> Result<FrozenWeight> {
    src.native(name)?
        .ok_or_else(|| anyhow!("{}: `{name}`: {NATIVE_NEEDS_GGUF}", src.origin(name)))
}

/// A full-precision weight `[rows, cols]` held as `mode` says.
pub(crate) fn dense(
    w: Vec<f32>,
    shape: [usize; 2],
    mode: QuantMode,
    what: &str,
) -> Result<FrozenWeight> {
    Ok(match mode {
        QuantMode::None => FrozenWeight::F32(Arc::new(w)),
        QuantMode::Bf16 => {
            FrozenWeight::BF16(Arc::new(w.iter().map(|v| bf16::from_f32(*v)).collect()))
        }
        QuantMode::Native => bail!("{what}: {NATIVE_NEEDS_GGUF}"),
        QuantMode::Nf4 | QuantMode::Fp4 => {
            let opts = qlora_quant::QuantOptions {
                quant_type: if mode == QuantMode::Nf4 {
                    qlora_quant::QuantType::Nf4
                } else {
                    qlora_quant::QuantType::Fp4
                },
                ..Default::default()
            };
            let q = qlora_quant::quantize_4bit(qlora_quant::Input::F32(&w), &shape, &opts)
                .map_err(|e| anyhow!("{what}: quantizing to {mode:?}: {e}"))?;
            FrozenWeight::Quant(Arc::new(q))
        }
    })
}

impl Model {
    /// Load an HF model folder (config.json + safetensors), full precision or bnb-4bit.
    pub fn from_folder(dir: impl AsRef<Path>, opts: &LoadOptions) -> Result<Model> {
        Model::from_folder_sharded(dir, opts, None)
    }

    /// [`Self::from_folder`] keeping only this rank's share of the projection
    /// weights (see [`Self::from_source_sharded`]).
    pub fn from_folder_sharded(
        dir: impl AsRef<Path>,
        opts: &LoadOptions,
        shard: Option<crate::shard::ShardSpec>,
    ) -> Result<Model> {
        let dir = dir.as_ref();
        let config = ModelConfig::from_file(dir.join("config.json"))?;
        let src = ModelFiles::open(dir)?;
        Model::from_source_sharded(config, &src, opts, shard)
    }

    /// Build from `(HF tensor name, shape, f32 data)` triples (e.g. converted GGUF).
    pub fn from_tensors(
        config: ModelConfig,
        tensors: impl IntoIterator<Item = (String, Vec<usize>, Vec<f32>)>,
        origin: &str,
        opts: &LoadOptions,
    ) -> Result<Model> {
        let mut map = HashMap::new();
        for (n, s, d) in tensors {
            ensure!(
                s.iter().product::<usize>() == d.len(),
                "{origin}: tensor `{n}` has shape {s:?} but {} values",
                d.len()
            );
            map.insert(n, (s, d));
        }
        Model::from_source(
            config,
            &MemTensors {
                origin: origin.to_string(),
                tensors: map,
            },
            opts,
        )
    }

    /// Build from any [`WeightSource`], checking every name and shape against `config`.
    pub fn from_source(
        config: ModelConfig,
        src: &dyn WeightSource,
        opts: &LoadOptions,
    ) -> Result<Model> {
        Model::from_source_sharded(config, src, opts, None)
    }

    /// [`Self::from_source`]; with `shard`, this rank keeps only its share of
    /// every layer's projection weights and quantizes only that (see
    /// [`crate::shard`]); the model then runs through a communicator of that
    /// rank and size.
    pub fn from_source_sharded(
        config: ModelConfig,
        src: &dyn WeightSource,
        opts: &LoadOptions,
        shard: Option<crate::shard::ShardSpec>,
    ) -> Result<Model> {
        use crate::shard::{placeholder, WeightShard, SHARD_NATIVE};
        let mut shards: Vec<Vec<WeightShard>> = Vec::new();
        let names = src.names();
        let origin = src.origin("model.embed_tokens.weight");
        let (h, v, nl) = (
            config.hidden_size,
            config.vocab_size,
            config.num_hidden_layers,
        );
        let found = layers_in(&names);
        ensure!(
            found == nl,
            "{origin}: config.json says num_hidden_layers = {nl} but the weights have {found} layers"
        );
        let emb_name = "model.embed_tokens.weight";
        let emb_shape = src
            .shape(emb_name)
            .ok_or_else(|| anyhow!("{origin}: missing tensor `{emb_name}`"))?;
        ensure!(
            emb_shape == [v, h],
            "{}: `{emb_name}` is {emb_shape:?} but config.json says vocab_size {v}, hidden_size {h}",
            src.origin(emb_name)
        );
        // Embedding and lm_head are never quantized. They are held in bf16 when
        // asked for (--quant bf16) or when a 4-bit model's checkpoint stores
        // them in bf16 (lossless, half the f32 bytes: 1 GiB saved on an 8B
        // Llama-3); `--quant none` keeps f32.
        let keep = |name: &str| -> Result<FrozenWeight> {
            if opts.quant == QuantMode::Native {
                return native(src, name);
            }
            if opts.quant != QuantMode::None {
                if let Some(w) = src.bf16(name) {
                    return Ok(FrozenWeight::BF16(Arc::new(w?)));
                }
            }
            let mode = match opts.quant {
                QuantMode::Bf16 => QuantMode::Bf16,
                _ => QuantMode::None,
            };
            dense(src.f32(name)?, [v, h], mode, name)
        };
        let embed_tokens = keep(emb_name)?;

        let mut layers = Vec::with_capacity(nl);
        for l in 0..nl {
            let norm = |n: &str| -> Result<Vec<f32>> {
                let name = format!("model.layers.{l}.{n}.weight");
                check_shape(src, &name, &[h], "hidden_size")?;
                src.f32(&name)
            };
            let input_layernorm = norm("input_layernorm")?;
            let post_attention_layernorm = norm("post_attention_layernorm")?;
            // Qwen3: per-head RMSNorm weights of q and k, `[head_dim]` each.
            let qk_norm = if config.architecture.qk_norm() {
                let hn = |n: &str| -> Result<Vec<f32>> {
                    let name = format!("model.layers.{l}.self_attn.{n}.weight");
                    check_shape(src, &name, &[config.head_dim], "head_dim")?;
                    src.f32(&name)
                };
                Some((hn("q_norm")?, hn("k_norm")?))
            } else {
                None
            };
            let shapes = config.linear_shapes();
            let mut lins = Vec::with_capacity(7);
            let mut layer_shards = Vec::with_capacity(7);
            for (m, short) in LINEAR_NAMES.iter().enumerate() {
                let [out, inp] = shapes[m].1;
                let path = ModelConfig::linear_path(l, short);
                let wname = format!("{path}.weight");
                let weight = if let Some(q) = src.bnb4(&wname)? {
                    ensure!(
                        q.shape == [out, inp],
                        "{}: `{wname}`: quantized shape {:?} but config.json implies {:?}",
                        src.origin(&wname),
                        q.shape,
                        [out, inp]
                    );
                    let w = FrozenWeight::Quant(Arc::new(q));
                    match shard {
                        // a pre-quantized tensor: read, keep this rank's ranges
                        Some(spec) => {
                            layer_shards.push(WeightShard::of_full(&w, spec)?);
                            placeholder()
                        }
                        None => w,
                    }
                } else if let Some(spec) = shard {
                    ensure!(
                        opts.quant != QuantMode::Native,
                        "{}: {SHARD_NATIVE}",
                        src.origin(&wname)
                    );
                    check_shape(src, &wname, &[out, inp], "from config.json")?;
                    let what = format!("{}: `{wname}`", src.origin(&wname));
                    let s =
                        WeightShard::from_dense(&src.f32(&wname)?, [out, inp], opts.quant, spec)
                            .with_context(|| format!("{what}: quantizing this rank's shard"))?;
                    layer_shards.push(s);
                    placeholder()
                } else if opts.quant == QuantMode::Native {
                    check_shape(src, &wname, &[out, inp], "from config.json")?;
                    native(src, &wname)?
                } else {
                    check_shape(src, &wname, &[out, inp], "from config.json")?;
                    dense(
                        src.f32(&wname)?,
                        [out, inp],
                        opts.quant,
                        &format!("{}: `{wname}`", src.origin(&wname)),
                    )?
                };
                let has_bias = match m {
                    0..=2 => config.qkv_bias,
                    3 => config.o_bias,
                    _ => false,
                };
                let bname = format!("{path}.bias");
                let bias = if has_bias {
                    check_shape(src, &bname, &[out], "bias of the projection")?;
                    Some(src.f32(&bname)?)
                } else {
                    ensure!(
                        src.shape(&bname).is_none(),
                        "{}: unexpected tensor `{bname}` (config.json declares no bias on {short})",
                        src.origin(&bname)
                    );
                    None
                };
                lins.push(FrozenLinear {
                    out_features: out,
                    in_features: inp,
                    weight,
                    bias,
                    compute: Default::default(),
                    bf16_copy: Default::default(),
                });
            }
            let linears: [FrozenLinear; 7] = lins.try_into().expect("seven linears");
            if shard.is_some() {
                shards.push(layer_shards);
            }
            layers.push(Layer {
                input_layernorm,
                post_attention_layernorm,
                qk_norm,
                linears,
            });
        }
        check_shape(src, "model.norm.weight", &[h], "hidden_size")?;
        let norm = src.f32("model.norm.weight")?;
        let lm_weight = if config.tie_word_embeddings {
            embed_tokens.clone()
        } else if src.shape("lm_head.weight").is_some() {
            check_shape(src, "lm_head.weight", &[v, h], "vocab_size x hidden_size")?;
            keep("lm_head.weight")?
        } else {
            bail!("{origin}: missing tensor `lm_head.weight` (config.json has tie_word_embeddings = false)")
        };
        let inv_freq = config
            .rope_scaling
            .inv_freq(config.rope_theta, config.head_dim);
        Ok(Model {
            lm_head: FrozenLinear {
                out_features: v,
                in_features: h,
                weight: lm_weight,
                bias: None,
                compute: Default::default(),
                bf16_copy: Default::default(),
            },
            config,
            embed_tokens,
            layers,
            norm,
            inv_freq,
            exec: Default::default(),
            shards: shard.map(|spec| {
                Arc::new(crate::shard::ShardedBase {
                    spec,
                    layers: shards,
                })
            }),
        })
    }
}
