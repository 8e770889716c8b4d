//! PEFT's `adapter_config.json`: parsing (tolerant of unknown and missing keys,
//! as older and newer PEFT versions write different key sets), writing, and
//! PEFT's rule for which modules a `target_modules` entry selects.

use std::path::Path;

use anyhow::{bail, Context, Result};
use qlora_config::{ModelConfig, LINEAR_NAMES};
use serde_json::{json, Map, Value};

use crate::LoraConfig;

/// `target_modules` as PEFT accepts it.
#[derive(Debug, Clone, PartialEq)]
pub enum TargetModules {
    /// Names: a module matches when its path equals an entry or ends with `"." + entry`.
    List(Vec<String>),
    /// A Python regex that must match the whole module path.
    Regex(String),
    /// Every linear except the output layer (`lm_head`).
    AllLinear,
}

impl TargetModules {
    /// Parse the CLI spelling: `all-linear`, a comma-separated list, or `re:<regex>`.
    pub fn parse_cli(s: &str) -> Result<Self> {
        let s = s.trim();
        if s == "all-linear" {
            return Ok(TargetModules::AllLinear);
        }
        if let Some(r) = s.strip_prefix("re:") {
            regex::Regex::new(r).with_context(|| format!("invalid target regex {r:?}"))?;
            return Ok(TargetModules::Regex(r.to_string()));
        }
        let v: Vec<String> = s
            .split(',')
            .map(|x| x.trim().to_string())
            .filter(|x| !x.is_empty())
            .collect();
        if v.is_empty() {
            bail!("empty --target list");
        }
        Ok(TargetModules::List(v))
    }

    fn matches(&self, path: &str, full_match: &Option<regex::Regex>) -> bool {
        match self {
            TargetModules::AllLinear => path != "lm_head",
            TargetModules::Regex(_) => full_match.as_ref().is_some_and(|r| r.is_match(path)),
            TargetModules::List(v) => v.iter().any(|t| list_entry_matches(t, path)),
        }
    }
}

/// PEFT's list rule (`check_target_module_exists`): equal, or a `.`-separated suffix.
pub fn list_entry_matches(entry: &str, path: &str) -> bool {
    path == entry
        || (path.len() > entry.len()
            && path.ends_with(entry)
            && path.as_bytes()[path.len() - entry.len() - 1] == b'.')
}

fn full_regex(r: &str) -> Result<regex::Regex> {
    regex::Regex::new(&format!("^(?:{r})$"))
        .with_context(|| format!("target_modules regex {r:?} is not a valid regex"))
}

/// How LoRA matrices are initialised (`init_lora_weights`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitKind {
    /// `true`: A ~ kaiming_uniform(a=√5) = U(±1/√in), B = 0 (the adapter starts as a no-op).
    Default,
    /// `"gaussian"`: A ~ N(0, (1/r)²), B = 0.
    Gaussian,
    /// `false`: both A and B keep nn.Linear's default init (A: U(±1/√in), B: U(±1/√r)); for tests.
    NoOpFalse,
}

/// A parsed `adapter_config.json`. Keys we do not interpret are kept in `raw`
/// and written back unchanged.
#[derive(Debug, Clone, PartialEq)]
pub struct PeftConfig {
    pub r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub target_modules: TargetModules,
    pub exclude_modules: Option<TargetModules>,
    pub use_rslora: bool,
    /// DoRA (`use_dora`): a trainable magnitude vector per module ([`crate::dora`]).
    pub use_dora: bool,
    pub init_lora_weights: InitKind,
    pub base_model_name_or_path: Option<String>,
    /// The JSON object as read (or empty), for round-tripping unknown keys.
    pub raw: Map<String, Value>,
}

impl PeftConfig {
    /// A fresh config with PEFT's field defaults and the given hyper-parameters.
    pub fn new(r: usize, lora_alpha: f64, target_modules: TargetModules) -> Self {
        PeftConfig {
            r,
            lora_alpha,
            lora_dropout: 0.0,
            target_modules,
            exclude_modules: None,
            use_rslora: false,
            use_dora: false,
            init_lora_weights: InitKind::Default,
            base_model_name_or_path: None,
            raw: Map::new(),
        }
    }

    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }

    /// Read `adapter_config.json` (the file itself or the folder holding it).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let mut path = path.as_ref().to_path_buf();
        if path.is_dir() {
            path = path.join("adapter_config.json");
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        Self::from_json_str(&text).with_context(|| format!("{}", path.display()))
    }

    pub fn from_json_str(text: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(text).context("not valid JSON")?;
        let Value::Object(raw) = v else {
            bail!("adapter_config.json must be a JSON object");
        };
        Self::from_map(raw)
    }

    fn from_map(raw: Map<String, Value>) -> Result<Self> {
        let get = |k: &str| raw.get(k).filter(|v| !v.is_null());
        if let Some(t) = get("peft_type").and_then(Value::as_str) {
            if t != "LORA" {
                bail!("peft_type is {t:?}; only LORA adapters are supported");
            }
        }
        if let Some(t) = get("task_type").and_then(Value::as_str) {
            if t != "CAUSAL_LM" {
                bail!("task_type is {t:?}; only CAUSAL_LM adapters are supported");
            }
        }
        let num = |k: &str, default: f64| -> Result<f64> {
            match get(k) {
                None => Ok(default),
                Some(v) => v
                    .as_f64()
                    .with_context(|| format!("field `{k}` must be a number, got {v}")),
            }
        };
        let flag = |k: &str| -> Result<bool> {
            match get(k) {
                None => Ok(false),
                Some(v) => v
                    .as_bool()
                    .with_context(|| format!("field `{k}` must be a boolean, got {v}")),
            }
        };
        let r = num("r", 8.0)?;
        if r < 1.0 || r.fract() != 0.0 {
            bail!("field `r` must be a positive integer, got {r}");
        }
        let lora_alpha = num("lora_alpha", 8.0)?;
        let lora_dropout = num("lora_dropout", 0.0)?;
        if !(0.0..1.0).contains(&lora_dropout) {
            bail!("lora_dropout must be in [0, 1), got {lora_dropout}");
        }
        // Features whose semantics we do not implement: refuse rather than load wrongly.
        // (`use_dora` is supported: see crate::dora.)
        for k in ["fan_in_fan_out", "lora_bias", "use_qalora"] {
            if flag(k)? {
                bail!("`{k}: true` adapters are not supported");
            }
        }
        if let Some(b) = get("bias").and_then(Value::as_str) {
            if b != "none" {
                bail!("bias = {b:?} is not supported (only \"none\")");
            }
        }
        for k in [
            "modules_to_save",
            "layers_to_transform",
            "layer_replication",
            "trainable_token_indices",
            "target_parameters",
        ] {
            if let Some(v) = get(k) {
                if !(v.as_array().is_some_and(|a| a.is_empty())) {
                    bail!("`{k}` = {v} is not supported");
                }
            }
        }
        for k in ["rank_pattern", "alpha_pattern"] {
            if let Some(v) = get(k) {
                if !(v.as_object().is_some_and(|o| o.is_empty())) {
                    bail!("`{k}` = {v} (per-module rank/alpha) is not supported");
                }
            }
        }
        let target_modules = match get("target_modules") {
            // PEFT's default for llama/mistral/qwen2
            None => TargetModules::List(vec!["q_proj".into(), "v_proj".into()]),
            Some(v) => parse_targets(v).context("field `target_modules`")?,
        };
        let exclude_modules = match get("exclude_modules") {
            None => None,
            Some(v) => Some(parse_targets(v).context("field `exclude_modules`")?),
        };
        let init_lora_weights = match get("init_lora_weights") {
            None | Some(Value::Bool(true)) => InitKind::Default,
            Some(Value::Bool(false)) => InitKind::NoOpFalse,
            Some(Value::String(s)) if s == "gaussian" => InitKind::Gaussian,
            // Other inits (pissa, loftq, …) only matter at creation; saved weights are final.
            Some(_) => InitKind::Default,
        };
        Ok(PeftConfig {
            r: r as usize,
            lora_alpha,
            lora_dropout,
            target_modules,
            exclude_modules,
            use_rslora: flag("use_rslora")?,
            use_dora: flag("use_dora")?,
            init_lora_weights,
            base_model_name_or_path: get("base_model_name_or_path")
                .and_then(Value::as_str)
                .map(str::to_string),
            raw,
        })
    }

    /// The JSON PEFT writes, with our values over any keys read from a file.
    pub fn to_json(&self, resolved: &[String]) -> Value {
        let mut m = self.raw.clone();
        let defaults = json!({
            "alpha_pattern": {}, "auto_mapping": null, "bias": "none", "exclude_modules": null,
            "fan_in_fan_out": false, "layer_replication": null, "layers_pattern": null,
            "layers_to_transform": null, "loftq_config": {}, "lora_bias": false,
            "megatron_config": null, "megatron_core": "megatron.core", "modules_to_save": null,
            "rank_pattern": {}, "revision": null, "use_dora": false,
        });
        for (k, v) in defaults.as_object().unwrap() {
            m.entry(k.clone()).or_insert(v.clone());
        }
        let targets = match &self.target_modules {
            TargetModules::Regex(r) => Value::String(r.clone()),
            TargetModules::List(v) => json!(v),
            TargetModules::AllLinear => json!(compact_targets(resolved)),
        };
        let init = match self.init_lora_weights {
            InitKind::Default => json!(true),
            InitKind::Gaussian => json!("gaussian"),
            InitKind::NoOpFalse => json!(false),
        };
        let alpha = if self.lora_alpha.fract() == 0.0 && self.lora_alpha.abs() < 1e15 {
            json!(self.lora_alpha as i64)
        } else {
            json!(self.lora_alpha)
        };
        let sets = [
            ("peft_type", json!("LORA")),
            ("task_type", json!("CAUSAL_LM")),
            ("r", json!(self.r)),
            ("lora_alpha", alpha),
            ("lora_dropout", json!(self.lora_dropout)),
            ("target_modules", targets),
            ("use_rslora", json!(self.use_rslora)),
            ("use_dora", json!(self.use_dora)),
            ("init_lora_weights", init),
            ("inference_mode", json!(true)),
            (
                "base_model_name_or_path",
                json!(self.base_model_name_or_path),
            ),
        ];
        for (k, v) in sets {
            m.insert(k.to_string(), v);
        }
        if let Some(ex) = &self.exclude_modules {
            m.insert(
                "exclude_modules".into(),
                match ex {
                    TargetModules::Regex(r) => json!(r),
                    TargetModules::List(v) => json!(v),
                    TargetModules::AllLinear => json!("all-linear"),
                },
            );
        }
        Value::Object(m)
    }

    /// The module paths of `model` this config adapts, in model order
    /// (layer, then q,k,v,o,gate,up,down). `lm_head` is never adapted.
    pub fn resolve_targets(&self, model: &ModelConfig) -> Result<Vec<String>> {
        let re = |t: &TargetModules| -> Result<Option<regex::Regex>> {
            match t {
                TargetModules::Regex(r) => Ok(Some(full_regex(r)?)),
                _ => Ok(None),
            }
        };
        let tre = re(&self.target_modules)?;
        let ere = match &self.exclude_modules {
            Some(e) => re(e)?,
            None => None,
        };
        let excluded = |p: &str| {
            self.exclude_modules
                .as_ref()
                .is_some_and(|e| e.matches(p, &ere))
        };
        if !matches!(self.target_modules, TargetModules::AllLinear)
            && self.target_modules.matches("lm_head", &tre)
            && !excluded("lm_head")
        {
            bail!("LoRA on lm_head is not supported; remove it from target_modules");
        }
        let mut out = Vec::new();
        for l in 0..model.num_hidden_layers {
            for name in LINEAR_NAMES {
                let p = ModelConfig::linear_path(l, name);
                if self.target_modules.matches(&p, &tre) && !excluded(&p) {
                    out.push(p);
                }
            }
        }
        if out.is_empty() {
            bail!(
                "target_modules {:?} matches none of the model's linear layers \
                 (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)",
                self.target_modules
            );
        }
        Ok(out)
    }

    /// Whether PEFT would put a LoRA layer on the module at `path`
    /// (`target_modules` matches and `exclude_modules` does not). `lm_head`
    /// is never adapted here.
    pub fn targets_module(&self, path: &str) -> Result<bool> {
        let re = |t: &TargetModules| -> Result<Option<regex::Regex>> {
            match t {
                TargetModules::Regex(r) => Ok(Some(full_regex(r)?)),
                _ => Ok(None),
            }
        };
        let tre = re(&self.target_modules)?;
        if !self.target_modules.matches(path, &tre) {
            return Ok(false);
        }
        Ok(match &self.exclude_modules {
            Some(e) => !e.matches(path, &re(e)?),
            None => true,
        })
    }

    /// The [`LoraConfig`] for a set of resolved module paths.
    pub fn lora_config(&self, resolved: Vec<String>) -> LoraConfig {
        LoraConfig {
            r: self.r,
            lora_alpha: self.lora_alpha,
            lora_dropout: self.lora_dropout,
            target_modules: resolved,
            use_rslora: self.use_rslora,
            use_dora: self.use_dora,
        }
    }

    /// A config describing an in-memory [`LoraConfig`] (targets as written there).
    pub fn from_lora_config(c: &LoraConfig) -> Self {
        PeftConfig {
            r: c.r,
            lora_alpha: c.lora_alpha,
            lora_dropout: c.lora_dropout,
            // full paths: exact under PEFT's list rule whatever subset of layers is adapted
            target_modules: TargetModules::List(c.target_modules.clone()),
            exclude_modules: None,
            use_rslora: c.use_rslora,
            use_dora: c.use_dora,
            init_lora_weights: InitKind::Default,
            base_model_name_or_path: None,
            raw: Map::new(),
        }
    }
}

fn parse_targets(v: &Value) -> Result<TargetModules> {
    match v {
        Value::String(s) if s == "all-linear" => Ok(TargetModules::AllLinear),
        Value::String(s) => {
            full_regex(s)?;
            Ok(TargetModules::Regex(s.clone()))
        }
        Value::Array(a) => a
            .iter()
            .map(|x| {
                x.as_str()
                    .map(str::to_string)
                    .with_context(|| format!("entry {x} is not a string"))
            })
            .collect::<Result<Vec<_>>>()
            .map(TargetModules::List),
        other => bail!("must be a list of names or a regex string, got {other}"),
    }
}

/// For `all-linear` (every layer has the same set): the short names
/// (`["q_proj", …]`), which select exactly `paths` under PEFT's list rule;
/// full paths otherwise.
fn compact_targets(paths: &[String]) -> Vec<String> {
    use std::collections::{BTreeMap, BTreeSet};
    let mut per_layer: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for p in paths {
        let (layer, short) = match p.rsplit_once('.') {
            Some((pre, s)) => (pre.rsplit_once('.').map(|x| x.0).unwrap_or(""), s),
            None => ("", p.as_str()),
        };
        per_layer.entry(layer).or_default().insert(short);
    }
    let sets: BTreeSet<&BTreeSet<&str>> = per_layer.values().collect();
    let uniform = sets.len() == 1 && paths.iter().all(|p| p.starts_with("model.layers."));
    if uniform {
        let set = sets.into_iter().next().unwrap();
        LINEAR_NAMES
            .iter()
            .filter(|n| set.contains(*n))
            .map(|s| s.to_string())
            .collect()
    } else {
        paths.to_vec()
    }
}

/// Check that `paths` are projection modules of `model` and return their `[out, in]` shapes.
pub fn module_shape(model: &ModelConfig, path: &str) -> Option<[usize; 2]> {
    let rest = path.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    if layer >= model.num_hidden_layers {
        return None;
    }
    let short = rest.rsplit('.').next()?;
    if ModelConfig::linear_path(layer, short) != path {
        return None;
    }
    model
        .linear_shapes()
        .iter()
        .find(|(n, _)| *n == short)
        .map(|(_, s)| *s)
}
