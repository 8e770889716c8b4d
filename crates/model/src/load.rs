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
use half::{bf16, f16};
use qlora_config::ModelConfig;
use qlora_formats::ModelFiles;
use safetensors::Dtype;

use crate::model::{Layer, Model, LINEAR_NAMES};
use crate::ops::linear::{Absmax, FrozenLinear, FrozenWeight, OrigDType, Packed4};

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
}

impl std::str::FromStr for QuantMode {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "none" | "f32" | "fp32" => Ok(QuantMode::None),
            "bf16" => Ok(QuantMode::Bf16),
            "nf4" => Ok(QuantMode::Nf4),
            "fp4" => Ok(QuantMode::Fp4),
            other => bail!("unknown quantization `{other}` (expected none, bf16, nf4 or fp4)"),
        }
    }
}

/// Loading options.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    pub quant: QuantMode,
}

/// A set of HF-named tensors. Implemented for safetensors folders and for
/// in-memory f32 tensors; the GGUF loader may implement it lazily.
pub trait TensorSource {
    /// Every tensor name.
    fn names(&self) -> Vec<String>;
    /// Shape, if the tensor exists.
    fn shape(&self, name: &str) -> Option<Vec<usize>>;
    /// The tensor converted to f32 (float dtypes only).
    fn f32(&self, name: &str) -> Result<Vec<f32>>;
    /// Raw little-endian bytes and dtype (bitsandbytes parts).
    fn raw(&self, name: &str) -> Result<(Dtype, Vec<u8>)>;
    /// The file (or other origin) a tensor comes from, for error messages.
    fn origin(&self, name: &str) -> String;
    /// The tensor as stored, if it is stored as bfloat16 (`None` otherwise).
    /// Embeddings and lm_head of a 4-bit model stay in this precision, as
    /// transformers keeps them, instead of doubling in f32; reading them
    /// directly also avoids an f32 copy of the largest tensors while loading.
    fn bf16(&self, _name: &str) -> Option<Result<Vec<half::bf16>>> {
        None
    }
}

/// In-memory f32 tensors keyed by HF name.
pub struct MemTensors {
    pub origin: String,
    pub tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
}

impl TensorSource for MemTensors {
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
    fn raw(&self, name: &str) -> Result<(Dtype, Vec<u8>)> {
        let v = self.f32(name)?;
        Ok((Dtype::F32, bytemuck::cast_slice(&v).to_vec()))
    }
    fn origin(&self, _name: &str) -> String {
        self.origin.clone()
    }
}

fn to_f32(dtype: Dtype, b: &[u8], what: &str) -> Result<Vec<f32>> {
    Ok(match dtype {
        Dtype::F32 => b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => b
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => b
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F64 => b
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
            .collect(),
        other => bail!("{what}: dtype {other:?} is not a float type"),
    })
}

/// An HF folder's safetensors (single or sharded, memory-mapped by
/// `qlora-formats`). Each tensor's pages are released right after it is read,
/// so resident memory stays near the converted model plus one tensor.
impl TensorSource for ModelFiles {
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
    fn raw(&self, name: &str) -> Result<(Dtype, Vec<u8>)> {
        let t = self.tensor(name)?;
        let out = (t.dtype, t.data.to_vec());
        self.release(name);
        Ok(out)
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

/// The bitsandbytes quant-state blob key of a module, if it is stored 4-bit.
fn bnb_state_key(src: &dyn TensorSource, weight: &str) -> Option<String> {
    ["nf4", "fp4"]
        .iter()
        .map(|q| format!("{weight}.quant_state.bitsandbytes__{q}"))
        .find(|k| src.shape(k).is_some())
}

fn f32_from_raw(dt: Dtype, b: &[u8], what: &str) -> Result<Vec<f32>> {
    ensure!(dt == Dtype::F32, "{what}: expected F32, got {dt:?}");
    to_f32(dt, b, what)
}

/// Read a pre-quantized bitsandbytes 4-bit weight (FORMATS §2.1) as stored.
fn load_bnb4(
    src: &dyn TensorSource,
    weight: &str,
    state_key: &str,
    expect: [usize; 2],
) -> Result<Packed4> {
    let origin = src.origin(weight);
    let what = format!("{origin}: `{weight}`");
    let (_, blob) = src.raw(state_key)?;
    let js: serde_json::Value = serde_json::from_slice(&blob)
        .with_context(|| format!("{what}: quant_state JSON is not valid"))?;
    let shape: Vec<usize> = js
        .get("shape")
        .and_then(|s| s.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_u64().map(|v| v as usize))
                .collect()
        })
        .ok_or_else(|| anyhow!("{what}: quant_state has no shape"))?;
    ensure!(
        shape == expect,
        "{what}: quantized shape {shape:?} but config.json implies {expect:?}"
    );
    let blocksize =
        js.get("blocksize")
            .and_then(|b| b.as_u64())
            .ok_or_else(|| anyhow!("{what}: quant_state has no blocksize"))? as usize;
    let dtype = match js
        .get("dtype")
        .and_then(|d| d.as_str())
        .unwrap_or("float32")
    {
        "float32" => OrigDType::F32,
        "float16" => OrigDType::F16,
        "bfloat16" => OrigDType::BF16,
        other => bail!("{what}: unsupported quant_state dtype `{other}`"),
    };
    let (_, packed) = src.raw(weight)?; // u8 or any quant_storage dtype: reinterpret bytes
    let (qdt, qm) = src.raw(&format!("{weight}.quant_map"))?;
    let qm = f32_from_raw(qdt, &qm, &format!("{what}.quant_map"))?;
    ensure!(
        qm.len() == 16,
        "{what}: quant_map has {} entries (expected 16)",
        qm.len()
    );
    let mut code = [0f32; 16];
    code.copy_from_slice(&qm);
    let (adt, abytes) = src.raw(&format!("{weight}.absmax"))?;
    let nested_key = format!("{weight}.nested_absmax");
    let absmax = if src.shape(&nested_key).is_some() {
        ensure!(
            adt == Dtype::U8,
            "{what}: double-quantized absmax must be U8, got {adt:?}"
        );
        let (ndt, nb) = src.raw(&nested_key)?;
        let (mdt, mb) = src.raw(&format!("{weight}.nested_quant_map"))?;
        let offset = js
            .get("nested_offset")
            .and_then(|o| o.as_f64())
            .ok_or_else(|| anyhow!("{what}: quant_state has nested_absmax but no nested_offset"))?;
        Absmax::Double {
            codes: abytes,
            nested_absmax: f32_from_raw(ndt, &nb, &format!("{what}.nested_absmax"))?,
            nested_map: f32_from_raw(mdt, &mb, &format!("{what}.nested_quant_map"))?,
            offset: offset as f32,
            nested_blocksize: js
                .get("nested_blocksize")
                .and_then(|b| b.as_u64())
                .unwrap_or(256) as usize,
        }
    } else {
        Absmax::F32(f32_from_raw(adt, &abytes, &format!("{what}.absmax"))?)
    };
    let p = Packed4 {
        rows: expect[0],
        cols: expect[1],
        blocksize,
        code,
        packed,
        absmax,
        dtype,
    };
    p.validate(&what)?;
    Ok(p)
}

fn check_shape(src: &dyn TensorSource, name: &str, expect: &[usize], why: &str) -> Result<()> {
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

fn dense(w: Vec<f32>, mode: QuantMode, what: &str) -> Result<FrozenWeight> {
    Ok(match mode {
        QuantMode::None => FrozenWeight::F32(Arc::new(w)),
        QuantMode::Bf16 => {
            FrozenWeight::BF16(Arc::new(w.iter().map(|v| bf16::from_f32(*v)).collect()))
        }
        QuantMode::Nf4 | QuantMode::Fp4 => {
            let n = w.len();
            let opts = qlora_quant::QuantOptions {
                quant_type: if mode == QuantMode::Nf4 {
                    qlora_quant::QuantType::Nf4
                } else {
                    qlora_quant::QuantType::Fp4
                },
                ..Default::default()
            };
            let q = qlora_quant::quantize_4bit(qlora_quant::Input::F32(&w), &[n], &opts)
                .map_err(|e| anyhow!("{what}: quantizing to {mode:?}: {e}"))?;
            FrozenWeight::Quant(Arc::new(q))
        }
    })
}

impl Model {
    /// Load an HF model folder (config.json + safetensors), full precision or bnb-4bit.
    pub fn from_folder(dir: impl AsRef<Path>, opts: &LoadOptions) -> Result<Model> {
        let dir = dir.as_ref();
        let config = ModelConfig::from_file(dir.join("config.json"))?;
        let src = ModelFiles::open(dir)?;
        Model::from_source(config, &src, opts)
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

    /// Build from any [`TensorSource`], checking every name and shape against `config`.
    pub fn from_source(
        config: ModelConfig,
        src: &dyn TensorSource,
        opts: &LoadOptions,
    ) -> Result<Model> {
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
            if opts.quant != QuantMode::None {
                if let Some(w) = src.bf16(name) {
                    return Ok(FrozenWeight::BF16(Arc::new(w?)));
                }
            }
            let mode = match opts.quant {
                QuantMode::Bf16 => QuantMode::Bf16,
                _ => QuantMode::None,
            };
            dense(src.f32(name)?, mode, name)
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
            for (m, short) in LINEAR_NAMES.iter().enumerate() {
                let [out, inp] = shapes[m].1;
                let path = ModelConfig::linear_path(l, short);
                let wname = format!("{path}.weight");
                let weight = if let Some(state) = bnb_state_key(src, &wname) {
                    FrozenWeight::Q4(Arc::new(load_bnb4(src, &wname, &state, [out, inp])?))
                } else {
                    check_shape(src, &wname, &[out, inp], "from config.json")?;
                    dense(
                        src.f32(&wname)?,
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
                });
            }
            let linears: [FrozenLinear; 7] = lins.try_into().expect("seven linears");
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
            },
            config,
            embed_tokens,
            layers,
            norm,
            inv_freq,
            exec: Default::default(),
        })
    }
}
