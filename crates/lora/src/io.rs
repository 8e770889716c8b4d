//! PEFT adapter folders: `adapter_config.json` + `adapter_model.safetensors`
//! with keys `base_model.model.<module>.lora_{A,B}.weight` (no adapter name),
//! A `[r, in]`, B `[out, r]`, written as F32 with metadata `{"format": "pt"}`.
//! DoRA adapters (`use_dora: true`) also hold `base_model.model.<module>.lora_magnitude_vector`
//! `[out]` per module: no `.weight` suffix and no adapter name (PEFT saves the
//! `lora_magnitude_vector.default.weight` parameter under that key, FORMATS §3.3).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{bail, Context, Result};
use qlora_config::ModelConfig;
use qlora_formats::write_atomic;
use safetensors::{tensor::TensorView, Dtype, SafeTensors};

use crate::peft::{module_shape, PeftConfig};
use crate::{Adapter, LoraWeights, Matrix};

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
const PREFIX: &str = "base_model.model.";

/// Which of a module's trainable tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    A,
    B,
    /// The DoRA magnitude vector `[out]`.
    Magnitude,
}

const MAGNITUDE: &str = ".lora_magnitude_vector";

/// The saved key of a module's tensor: `base_model.model.<module>.lora_A.weight`,
/// `….lora_B.weight`, or `….lora_magnitude_vector` (DoRA).
pub fn peft_key(module: &str, which: Which) -> String {
    let w = match which {
        Which::A => "A",
        Which::B => "B",
        Which::Magnitude => return format!("{PREFIX}{module}{MAGNITUDE}"),
    };
    format!("{PREFIX}{module}.lora_{w}.weight")
}

/// Inverse of [`peft_key`]; also accepts the in-memory spelling with an
/// adapter name (`.lora_A.default.weight`, `.lora_magnitude_vector.default.weight`).
pub fn parse_peft_key(key: &str) -> Option<(String, Which)> {
    let rest = key.strip_prefix(PREFIX)?;
    if let Some(pos) = rest.rfind(MAGNITUDE) {
        let after = &rest[pos + MAGNITUDE.len()..];
        let named = after
            .strip_prefix('.')
            .and_then(|a| a.strip_suffix(".weight"))
            .is_some_and(|name| !name.is_empty() && !name.contains('.'));
        if after.is_empty() || named {
            return Some((rest[..pos].to_string(), Which::Magnitude));
        }
    }
    let rest = rest.strip_suffix(".weight")?;
    for (tag, which) in [(".lora_A", Which::A), (".lora_B", Which::B)] {
        if let Some(pos) = rest.rfind(tag) {
            let after = &rest[pos + tag.len()..];
            // "" or ".<adapter_name>" without further dots
            if after.is_empty() || (after.starts_with('.') && !after[1..].contains('.')) {
                return Some((rest[..pos].to_string(), which));
            }
        }
    }
    None
}

fn view_to_f32(v: &TensorView<'_>, key: &str) -> Result<Vec<f32>> {
    let d = v.data();
    Ok(match v.dtype() {
        Dtype::F32 => d
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::BF16 => d
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F16 => d
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F64 => d
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32)
            .collect(),
        other => bail!("tensor {key} has dtype {other:?}; expected F32, BF16 or F16"),
    })
}

/// Load a PEFT adapter folder. With `model`, every module must be a projection
/// of that model with matching shapes, and every targeted module must be present.
pub fn load_adapter(
    dir: impl AsRef<Path>,
    model: Option<&ModelConfig>,
) -> Result<(PeftConfig, Adapter)> {
    let dir = dir.as_ref();
    let peft = PeftConfig::from_file(dir.join(CONFIG_FILE))?;
    let wpath = dir.join(WEIGHTS_FILE);
    if !wpath.exists() && dir.join("adapter_model.bin").exists() {
        bail!(
            "{}: only adapter_model.safetensors is supported (found the legacy adapter_model.bin)",
            dir.display()
        );
    }
    let bytes = std::fs::read(&wpath).with_context(|| format!("reading {}", wpath.display()))?;
    let st = SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{}: not a valid safetensors file", wpath.display()))?;
    let ctx = |m: String| format!("{}: {m}", wpath.display());
    type Parts = (Option<Matrix>, Option<Matrix>, Option<Vec<f32>>);
    let mut parts: BTreeMap<String, Parts> = BTreeMap::new();
    let mut ignored: Vec<String> = Vec::new();
    for (key, view) in st.tensors() {
        let Some((module, which)) = parse_peft_key(&key) else {
            bail!(ctx(format!(
                "unsupported tensor {key:?} (only lora_A/lora_B weights and DoRA magnitude vectors \
                 of linear layers are supported)"
            )));
        };
        if which == Which::Magnitude && !peft.use_dora {
            bail!(ctx(format!(
                "{key} is a DoRA magnitude vector but adapter_config.json has `use_dora: false`"
            )));
        }
        // PEFT injects LoRA layers only into the modules `target_modules`
        // (minus `exclude_modules`) selects — with `target_modules` absent,
        // its per-architecture default, q_proj and v_proj for llama — and then
        // loads the state dict with `strict=False`: weights of any other module
        // are unexpected keys, reported and never applied. Do the same.
        if !peft.targets_module(&module)? {
            ignored.push(key);
            continue;
        }
        let shape = view.shape().to_vec();
        if which == Which::Magnitude {
            if shape.len() != 1 {
                bail!(ctx(format!(
                    "{key} has shape {shape:?}, expected [out_features]"
                )));
            }
        } else if shape.len() != 2 {
            bail!(ctx(format!(
                "{key} has shape {shape:?}, expected 2 dimensions"
            )));
        }
        let data = view_to_f32(&view, &key).map_err(|e| anyhow::anyhow!(ctx(e.to_string())))?;
        if let Some(i) = data.iter().position(|x| !x.is_finite()) {
            bail!(ctx(format!(
                "{key}[{i}] is {}: the adapter holds non-finite weights",
                data[i]
            )));
        }
        let e = parts.entry(module).or_default();
        if which == Which::Magnitude {
            e.2 = Some(data);
            continue;
        }
        let t = Matrix::new(shape[0], shape[1], data)
            .map_err(|e| anyhow::anyhow!(ctx(format!("{key}: {e}"))))?;
        match which {
            Which::A => e.0 = Some(t),
            Which::B => e.1 = Some(t),
            Which::Magnitude => unreachable!("handled above"),
        }
    }
    let mut layers = BTreeMap::new();
    for (module, (a, b, magnitude)) in parts {
        let (Some(a), Some(b)) = (a, b) else {
            bail!(ctx(format!(
                "module {module} has only one of lora_A / lora_B"
            )));
        };
        match &magnitude {
            None if peft.use_dora => bail!(ctx(format!(
                "`use_dora: true` but module {module} has no lora_magnitude_vector"
            ))),
            Some(m) if m.len() != b.rows() => bail!(ctx(format!(
                "{module}: lora_magnitude_vector has {} values but lora_B has {} rows (out_features)",
                m.len(),
                b.rows()
            ))),
            _ => {}
        }
        let [r_a, inf] = a.dims();
        let [outf, r_b] = b.dims();
        if r_a != peft.r || r_b != peft.r {
            bail!(ctx(format!(
                "{module}: lora_A is [{r_a}, {inf}] and lora_B [{outf}, {r_b}] but r = {}",
                peft.r
            )));
        }
        if let Some(m) = model {
            let Some([o, i]) = module_shape(m, &module) else {
                bail!(ctx(format!(
                    "{module} is not a projection layer of the base model"
                )));
            };
            if (o, i) != (outf, inf) {
                bail!(ctx(format!(
                    "{module}: adapter is for a [{outf}, {inf}] weight but the base model's is [{o}, {i}] \
                     (adapter made for a different model?)"
                )));
            }
        }
        layers.insert(module, LoraWeights { a, b, magnitude });
    }
    if !ignored.is_empty() {
        ignored.sort();
        eprintln!(
            "warning: {}: {} tensor(s) of modules outside target_modules {:?} are ignored, as PEFT ignores them: {}{}",
            wpath.display(),
            ignored.len(),
            peft.target_modules,
            ignored.iter().take(4).cloned().collect::<Vec<_>>().join(", "),
            if ignored.len() > 4 { ", …" } else { "" }
        );
    }
    if layers.is_empty() {
        bail!(ctx(if ignored.is_empty() {
            "no LoRA tensors".into()
        } else {
            format!(
                "no LoRA tensors of the modules target_modules {:?} selects",
                peft.target_modules
            )
        }));
    }
    if let Some(m) = model {
        let want = peft
            .resolve_targets(m)
            .with_context(|| format!("{}", dir.display()))?;
        if let Some(missing) = want.iter().find(|p| !layers.contains_key(*p)) {
            bail!(ctx(format!(
                "target_modules selects {missing} but the file has no weights for it"
            )));
        }
    }
    let mut modules: Vec<String> = layers.keys().cloned().collect();
    modules.sort_by_key(|p| crate::module_order_key(p));
    let config = peft.lora_config(modules);
    Ok((peft, Adapter { config, layers }))
}

/// A tensor to write: `(PEFT key, shape, values)`.
type NamedTensor<'a> = (String, Vec<usize>, &'a [f32]);

/// The adapter's tensors as PEFT names them, in module order, each checked
/// finite.
fn adapter_tensors(adapter: &Adapter) -> Result<Vec<NamedTensor<'_>>> {
    let mut out = Vec::new();
    for (module, w) in &adapter.layers {
        let mut tensors = vec![
            (Which::A, w.a.dims().to_vec(), w.a.data()),
            (Which::B, w.b.dims().to_vec(), w.b.data()),
        ];
        match &w.magnitude {
            Some(m) => tensors.push((Which::Magnitude, vec![m.len()], &m[..])),
            None if adapter.config.use_dora => {
                bail!("DoRA adapter module {module} has no magnitude vector")
            }
            None => {}
        }
        for (which, shape, v) in tensors {
            if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                bail!(
                    "refusing to write a non-finite adapter: {}[{i}] is {}",
                    peft_key(module, which),
                    v[i]
                );
            }
            out.push((peft_key(module, which), shape, v));
        }
    }
    Ok(out)
}

/// Writes the adapter's weights (F32) as a safetensors file at `path`,
/// atomically, streaming each tensor from the adapter (no serialized copy
/// in memory: an 8B model's all-linear r 16 adapter is 160 MiB); the same
/// bytes as [`adapter_safetensors_bytes`].
pub fn write_adapter_safetensors(path: &Path, adapter: &Adapter) -> Result<()> {
    use qlora_formats::writer::{SafetensorsWriter, TensorSpec};
    let tensors = adapter_tensors(adapter)?;
    let specs: Vec<TensorSpec> = tensors
        .iter()
        .map(|(k, s, _)| TensorSpec::new(k.clone(), Dtype::F32, s.clone()))
        .collect();
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    let mut w = SafetensorsWriter::create_with_metadata(path, &specs, Some(&meta))?;
    for (k, _, v) in &tensors {
        w.write_f32(k, v)?;
    }
    w.finish()?;
    Ok(())
}

/// Serialize the adapter's weights (F32) to safetensors bytes.
pub fn adapter_safetensors_bytes(adapter: &Adapter) -> Result<Vec<u8>> {
    let bufs: Vec<(String, Vec<usize>, Vec<u8>)> = adapter_tensors(adapter)?
        .into_iter()
        .map(|(k, s, v)| (k, s, v.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    let views = bufs
        .iter()
        .map(|(k, s, b)| Ok((k.clone(), TensorView::new(Dtype::F32, s.clone(), b)?)))
        .collect::<Result<Vec<_>>>()?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    Ok(safetensors::serialize(views, Some(meta))?)
}

/// Save a PEFT adapter folder. Weights and config are written into a
/// temporary folder beside `dir` which then replaces `dir` in one step
/// ([`qlora_formats::durable::replace_dir`]), so a crash never leaves the
/// weights of one adapter beside the config of another. Non-finite weights
/// are refused.
pub fn save_adapter(dir: impl AsRef<Path>, adapter: &Adapter, peft: &PeftConfig) -> Result<()> {
    let dir = dir.as_ref();
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = dir
        .file_name()
        .context("adapter path has no folder name")?
        .to_string_lossy()
        .to_string();
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let mut modules: Vec<String> = adapter.layers.keys().cloned().collect();
    modules.sort_by_key(|p| crate::module_order_key(p));
    let json = serde_json::to_string_pretty(&peft.to_json(&modules))?;
    // refuse a non-finite adapter before touching the disk
    adapter_tensors(adapter)?;
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
    }
    let res = (|| -> Result<()> {
        std::fs::create_dir(&tmp)?;
        write_adapter_safetensors(&tmp.join(WEIGHTS_FILE), adapter)?;
        write_atomic(&tmp.join(CONFIG_FILE), json.as_bytes())?;
        qlora_formats::durable::fsync_dir(&tmp)?;
        qlora_formats::durable::replace_dir(&tmp, dir)?;
        Ok(())
    })();
    if res.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    res.with_context(|| format!("writing adapter {}", dir.display()))
}
