//! Resolving a model reference (`config.json`, model folder, `.safetensors`
//! file or folder, `.gguf`, preset name, hub id) into an [`Inventory`].

use std::path::Path;

use qlora_config::ModelConfig;

use crate::inventory::{Inventory, KnownQuantState, Role, TensorSpec};
use crate::presets;
use crate::size::Stored;
use crate::MemoryError;
use qlora_formats::model_ref::{
    default_hub_cache, Fetch, ModelRef, ModelSource, RefErrorKind, Resolve, Weights,
};
use qlora_formats::{ModelFiles, SafetensorsFile};

/// A resolved model: its tensors, and its config when one is known (the
/// training planner needs the attention dimensions).
#[derive(Debug, Clone)]
pub struct Loaded {
    pub label: String,
    /// config | preset | hub | safetensors | gguf
    pub kind: &'static str,
    pub inventory: Inventory,
    pub config: Option<ModelConfig>,
    pub stored: Option<Stored>,
    pub notes: Vec<String>,
}

/// Resolve `reference` with the one resolver ([`ModelRef`]), presets layered on top:
/// an existing path first; then a preset name (one without `/`); then a hub id, its
/// config.json only, cache first, the network unless `HF_HUB_OFFLINE` is set; a hub id
/// that cannot be had falls back to the preset of the same model, if there is one.
pub fn resolve(reference: &str) -> Result<Loaded, MemoryError> {
    if !Path::new(reference).exists() && !reference.contains('/') {
        if let Some(p) = presets::find(reference) {
            return Ok(from_preset(p));
        }
    }
    let how = Resolve {
        allow_network: !hub_offline(),
        hub_cache: default_hub_cache(),
        fetch: Fetch::Config,
    };
    match ModelRef::resolve_with(reference, &how) {
        Ok(r) => from_ref(&r),
        Err(e) => match e.kind {
            RefErrorKind::NotFound => Err(presets::unknown(reference)),
            RefErrorKind::Hub => {
                let id = reference;
                if let Some(p) = presets::find(id) {
                    let mut l = from_preset(p);
                    l.notes.push(format!(
                        "hub id {id}: {}; using the built-in preset {}",
                        e.msg, p.name
                    ));
                    return Ok(l);
                }
                Err(MemoryError::Hub {
                    id: id.to_string(),
                    msg: format!(
                        "{}. Pass a local folder or config.json, or a preset (closest: {})",
                        e.msg,
                        presets::closest(id).join(", ")
                    ),
                })
            }
            RefErrorKind::Unusable => Err(MemoryError::BadFile {
                path: reference.to_string(),
                msg: e.msg,
            }),
        },
    }
}

/// Whether `reference` resolves (locally or from the hub cache, never the network) to a
/// GGUF file: `--quant`'s default is `native` for those.
pub fn is_gguf(reference: &str) -> bool {
    let how = Resolve {
        fetch: Fetch::Config,
        ..Resolve::new(false)
    };
    ModelRef::resolve_with(reference, &how).is_ok_and(|r| r.is_gguf())
}

fn hub_offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v == "true")
}

/// A resolved reference's tensors (and config when it has one).
pub fn from_ref(r: &ModelRef) -> Result<Loaded, MemoryError> {
    let label = r.spec.clone();
    match &r.source {
        ModelSource::Gguf(p) => from_gguf(p),
        ModelSource::Config(p) if r.hub_id.is_some() => {
            let mut l = from_config_file(p, "hub", &label)?;
            l.notes
                .push(format!("config.json from the hub cache: {}", p.display()));
            Ok(l)
        }
        ModelSource::Config(p) => from_config_file(p, "config", &label),
        ModelSource::Folder(dir) => {
            let mut l = from_config_file(&dir.join("config.json"), "config", &label)?;
            let weights = open_weights(r)?;
            if !weights.is_empty() {
                // The headers tell what is actually on disk; the config gives the
                // exact architecture. Use the checkpoint's known quant states.
                let from_files = from_safetensors(&weights, &label)?;
                l.stored = from_files.stored;
                merge_known(&mut l.inventory, &from_files.inventory);
            }
            Ok(l)
        }
        ModelSource::Weights(_) | ModelSource::Safetensors(_) => {
            from_safetensors(&open_weights(r)?, &label)
        }
    }
}

/// The reference's safetensors files, opened (headers validated by `qlora-formats`).
fn open_weights(r: &ModelRef) -> Result<Vec<SafetensorsFile>, MemoryError> {
    match r.weights() {
        None => Ok(Vec::new()),
        Some(Weights::Sharded { index }) => index_shards(&index),
        Some(Weights::Files(files)) => files.iter().map(|p| open_safetensors(p)).collect(),
    }
}

pub fn from_preset(p: &presets::Preset) -> Loaded {
    let cfg = p.config();
    Loaded {
        label: p.name.to_string(),
        kind: "preset",
        inventory: Inventory::from_config(&cfg),
        config: Some(cfg),
        stored: None,
        notes: vec![format!("built-in preset (config of {})", p.hub_id)],
    }
}

fn from_config_file(path: &Path, kind: &'static str, label: &str) -> Result<Loaded, MemoryError> {
    let cfg = ModelConfig::from_file(path)?;
    Ok(Loaded {
        label: label.to_string(),
        kind,
        inventory: Inventory::from_config(&cfg),
        config: Some(cfg),
        stored: None,
        notes: Vec::new(),
    })
}

fn format_error(e: qlora_formats::FormatError) -> MemoryError {
    // FormatError's message already names the file.
    MemoryError::Invalid(e.to_string())
}

/// One safetensors file through `qlora-formats`' validated reader (memory-mapped:
/// only the header, and later the few quant-state bytes, are read).
fn open_safetensors(path: &Path) -> Result<SafetensorsFile, MemoryError> {
    SafetensorsFile::open(path).map_err(format_error)
}

/// The shards of a `model.safetensors.index.json`, checked by `qlora-formats`
/// (plain file names in the index's folder, every shard and tensor present).
fn index_shards(index: &Path) -> Result<Vec<SafetensorsFile>, MemoryError> {
    let dir = index.parent().filter(|p| !p.as_os_str().is_empty());
    let dir = dir.unwrap_or(Path::new("."));
    let name = index.file_name().unwrap_or_default();
    if name != qlora_formats::model_files::INDEX_FILE {
        return Err(MemoryError::BadFile {
            path: index.display().to_string(),
            msg: format!(
                "a shard index must be named {} in the model folder",
                qlora_formats::model_files::INDEX_FILE
            ),
        });
    }
    Ok(ModelFiles::open(dir).map_err(format_error)?.into_files())
}

/// Copy quant states read from a checkpoint onto the config-built inventory.
fn merge_known(inv: &mut Inventory, from: &Inventory) {
    let known: std::collections::HashMap<&str, &KnownQuantState> = from
        .tensors
        .iter()
        .filter_map(|t| t.known.as_ref().map(|k| (t.name.as_str(), k)))
        .collect();
    // and which tensors the files store in bf16: the trainer keeps a bf16
    // embedding / lm_head as stored (without this a bf16 folder was planned
    // with an f32 embedding and the head's f32 copy)
    let bf16: std::collections::HashSet<&str> = from
        .tensors
        .iter()
        .filter(|t| t.stored_bf16)
        .map(|t| t.name.as_str())
        .collect();
    for t in &mut inv.tensors {
        if let Some(k) = known.get(t.name.as_str()) {
            t.known = Some((*k).clone());
        }
        t.stored_bf16 = bf16.contains(t.name.as_str());
    }
}

/// Role of a tensor from its HF name.
pub fn role_of(name: &str) -> Role {
    if name.contains("embed_tokens") {
        Role::Embeddings
    } else if name.starts_with("lm_head") {
        Role::LmHead
    } else if name.contains("norm") {
        Role::Norms
    } else if name.contains(".mlp.") {
        Role::Mlp
    } else if name.contains("self_attn") {
        Role::Attention
    } else {
        Role::Other
    }
}

const QS_MARK: &str = ".weight.quant_state.bitsandbytes__";
const BNB_AUX: [&str; 4] = [
    ".weight.absmax",
    ".weight.quant_map",
    ".weight.nested_absmax",
    ".weight.nested_quant_map",
];

/// Inventory from safetensors headers (all shards). bnb-4bit weights are
/// recognised by their quant-state blob, whose JSON (a few hundred bytes) is
/// the only data read: it holds the original shape and offset.
pub fn from_safetensors(files: &[SafetensorsFile], label: &str) -> Result<Loaded, MemoryError> {
    let mut tensors = Vec::new();
    let mut tensor_bytes = 0;
    let mut file_bytes = 0;
    let mut dtypes = std::collections::BTreeSet::new();
    let mut bnb_formats = std::collections::BTreeSet::new();
    for f in files {
        let path = f.path().display().to_string();
        file_bytes += (8 + f.header_len() + f.data_len()) as u64;
        // `P.weight` of every bnb-quantized module (its packed data).
        let packed: std::collections::HashSet<String> = f
            .infos()
            .iter()
            .filter_map(|t| {
                t.name
                    .split_once(QS_MARK)
                    .map(|(p, _)| format!("{p}.weight"))
            })
            .collect();
        for t in f.infos() {
            tensor_bytes += t.nbytes() as u64;
            if let Some((prefix, qt)) = t.name.split_once(QS_MARK) {
                let blob = f.tensor(&t.name).map_err(format_error)?;
                let (shape, known, nested, bs) = parse_quant_state(&blob, &path, &t.name)?;
                bnb_formats.insert(format!(
                    "{qt}{}{}",
                    if bs == 64 {
                        String::new()
                    } else {
                        format!("_bs{bs}")
                    },
                    if nested { "_dq" } else { "" }
                ));
                tensors.push(TensorSpec {
                    name: format!("{prefix}.weight"),
                    shape: shape.to_vec(),
                    role: role_of(prefix),
                    quantizable: true,
                    known: Some(known),
                    stored_bf16: false,
                    native_bytes: None,
                });
                continue;
            }
            let is_bnb_part =
                BNB_AUX.iter().any(|s| t.name.ends_with(s)) || packed.contains(&t.name);
            if is_bnb_part || t.name.ends_with("rotary_emb.inv_freq") {
                continue;
            }
            dtypes.insert(t.dtype.to_string());
            let role = role_of(&t.name);
            let quantizable = t.shape.len() == 2
                && t.name.ends_with(".weight")
                && matches!(role, Role::Attention | Role::Mlp);
            tensors.push(TensorSpec {
                name: t.name.clone(),
                shape: t.shape.iter().map(|&d| d as u64).collect(),
                role,
                quantizable,
                known: None,
                stored_bf16: t.dtype == qlora_formats::Dtype::BF16,
                native_bytes: None,
            });
        }
    }
    let has_head = tensors.iter().any(|t| t.role == Role::LmHead);
    let has_embed = tensors.iter().any(|t| t.role == Role::Embeddings);
    let mut format = format!(
        "safetensors {}",
        dtypes.into_iter().collect::<Vec<_>>().join("+")
    );
    if !bnb_formats.is_empty() {
        format.push_str(&format!(
            " + bnb {}",
            bnb_formats.into_iter().collect::<Vec<_>>().join("+")
        ));
    }
    Ok(Loaded {
        label: label.to_string(),
        kind: "safetensors",
        inventory: Inventory {
            tensors,
            tied: has_embed && !has_head,
        },
        config: None,
        stored: Some(Stored {
            format,
            tensor_bytes,
            file_bytes,
            files: files.len(),
        }),
        notes: vec!["parameter count from the safetensors headers".into()],
    })
}

/// `(shape, known, nested, blocksize)` from a quant-state tensor, checked by
/// `qlora-formats`' quant-state parser (quant type, blocksize a power of two in
/// 32..=4096, dtype, shape, nested fields).
fn parse_quant_state(
    blob: &qlora_formats::TensorView<'_>,
    path: &str,
    name: &str,
) -> Result<([u64; 2], KnownQuantState, bool, u64), MemoryError> {
    let bad = |msg: &str| MemoryError::BadFile {
        path: path.to_string(),
        msg: format!("{name}: {msg}"),
    };
    let state = qlora_formats::bnb::parse_quant_state(blob).map_err(|m| bad(&m))?;
    let text = std::str::from_utf8(blob.data).map_err(|_| bad("quant state is not UTF-8"))?;
    let &[rows, cols] = state.shape.as_slice() else {
        return Err(bad("quant state has no 2-D `shape`"));
    };
    let shape = [rows as u64, cols as u64];
    let dtype = state.dtype.torch_name().to_string();
    let blocksize = state.blocksize as u64;
    // The offset's text as written (not re-printed), so lengths stay exact.
    let offset_repr = text
        .split_once("\"nested_offset\": ")
        .map(|(_, rest)| rest.trim_end_matches('}').trim().to_string());
    let nested = offset_repr.is_some();
    Ok((
        [shape[0], shape[1]],
        KnownQuantState {
            dtype,
            blocksize,
            offset_repr,
        },
        nested,
        blocksize,
    ))
}

/// Map a GGUF tensor name (llama.cpp naming) to an HF-style role.
fn gguf_role(name: &str) -> (Role, bool) {
    if name.starts_with("token_embd") {
        (Role::Embeddings, false)
    } else if name.starts_with("output_norm") || name.contains("_norm") {
        (Role::Norms, false)
    } else if name.starts_with("output.") {
        (Role::LmHead, false)
    } else if name.contains(".attn_") {
        (Role::Attention, name.ends_with(".weight"))
    } else if name.contains(".ffn_") {
        (Role::Mlp, name.ends_with(".weight"))
    } else {
        (Role::Other, false)
    }
}

/// Inventory from a GGUF header (`qlora-gguf`'s header-only reader: no tensor
/// data is read); the config comes from the llama metadata mapping.
pub fn from_gguf(path: &Path) -> Result<Loaded, MemoryError> {
    let bad = |e: qlora_gguf::GgufError| MemoryError::BadFile {
        path: path.display().to_string(),
        msg: e.to_string(),
    };
    let h = qlora_gguf::GgufFile::read_header(path).map_err(bad)?;
    let llama_arch = h.architecture().is_ok_and(|a| a == "llama");
    let mut tensors = Vec::new();
    let mut data = 0;
    let mut types = std::collections::BTreeMap::<&str, u64>::new();
    for t in &h.tensors {
        data += t.n_bytes;
        if t.name.starts_with("rope_freqs") {
            // llama.cpp's Llama-3.1 RoPE divisors: a buffer, not a parameter.
            continue;
        }
        *types.entry(t.ggml_type.name()).or_default() += t.n_elements();
        let (role, lin) = gguf_role(&t.name);
        let shape: Vec<u64> = t.shape().iter().map(|&d| d as u64).collect();
        // `--quant native`: matrices stay as stored (F32 ones too, as f32); llama q/k
        // weights add their row map; vectors (norms) are decoded to f32.
        let permuted = llama_arch && (t.name.contains(".attn_q.") || t.name.contains(".attn_k."));
        let native_bytes = if shape.len() == 2 {
            t.n_bytes + if permuted { 4 * shape[0] } else { 0 }
        } else {
            4 * t.n_elements()
        };
        tensors.push(TensorSpec {
            name: t.name.clone(),
            quantizable: lin && shape.len() == 2,
            shape,
            role,
            known: None,
            stored_bf16: false,
            native_bytes: Some(native_bytes),
        });
    }
    let has_head = tensors.iter().any(|t| t.role == Role::LmHead);
    let mix: Vec<String> = types.iter().map(|(k, v)| format!("{k}:{v}")).collect();
    let mut notes = vec!["parameter count from the GGUF header".to_string()];
    let config = match qlora_gguf::llama::config_from_header(&h) {
        Ok(c) => Some(c),
        Err(e) => {
            notes.push(format!(
                "no llama config from the GGUF metadata ({e}); `qlora plan` needs one"
            ));
            None
        }
    };
    Ok(Loaded {
        label: path.display().to_string(),
        kind: "gguf",
        inventory: Inventory {
            tensors,
            tied: !has_head,
        },
        config,
        stored: Some(Stored {
            format: format!("gguf v{} ({})", h.version, mix.join(", ")),
            tensor_bytes: data,
            file_bytes: h.file_size,
            files: 1,
        }),
        notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A model folder's config gives the architecture, its safetensors
    /// headers what is stored: a bf16 embedding is planned at 2 bytes (the
    /// trainer keeps it so), an f32 norm at 4.
    #[test]
    fn a_folder_plans_its_bf16_stored_tensors_as_bf16() {
        use safetensors::tensor::{serialize, Dtype, TensorView};
        let dir = tempfile::tempdir().unwrap();
        let config = serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
            "tie_word_embeddings": true,
        });
        std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
        let (emb, norm) = (vec![0u8; 64 * 32 * 2], vec![0u8; 32 * 4]);
        let tensors = [
            (
                "model.embed_tokens.weight",
                TensorView::new(Dtype::BF16, vec![64, 32], &emb).unwrap(),
            ),
            (
                "model.norm.weight",
                TensorView::new(Dtype::F32, vec![32], &norm).unwrap(),
            ),
        ];
        let bytes = serialize(tensors, None).unwrap();
        std::fs::write(dir.path().join("model.safetensors"), bytes).unwrap();
        let l = resolve(dir.path().to_str().unwrap()).unwrap();
        let stored = |name: &str| {
            l.inventory
                .tensors
                .iter()
                .find(|t| t.name == name)
                .unwrap_or_else(|| panic!("{name} planned"))
                .stored_bf16
        };
        assert!(stored("model.embed_tokens.weight"));
        assert!(!stored("model.norm.weight"));
    }
}
