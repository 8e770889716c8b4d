//! RoPE parameters (`rope_theta` + `rope_scaling` in transformers v4,
//! `rope_parameters` in v5) and the inverse frequencies exactly as
//! transformers computes them (in f32).

use serde_json::Value;

use crate::{ConfigError, Fields};

/// Which RoPE frequency schedule a model uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeType {
    Default,
    Linear,
    Llama3,
}

/// RoPE scaling with its parameters.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    Default,
    /// Positions divided by `factor` (equivalently `inv_freq / factor`).
    Linear {
        factor: f64,
    },
    /// Llama-3.1 frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

impl RopeScaling {
    pub fn rope_type(&self) -> RopeType {
        match self {
            RopeScaling::Default => RopeType::Default,
            RopeScaling::Linear { .. } => RopeType::Linear,
            RopeScaling::Llama3 { .. } => RopeType::Llama3,
        }
    }

    /// `inv_freq[j]` for j in 0..head_dim/2, as transformers' `_compute_*_rope_parameters`
    /// computes it: `1 / theta^(2j/d)` in f32, then the scaling rule.
    pub fn inv_freq(&self, rope_theta: f64, head_dim: usize) -> Vec<f32> {
        let base = rope_theta as f32;
        let d = head_dim as f32;
        let plain: Vec<f32> = (0..head_dim / 2)
            .map(|j| 1.0f32 / base.powf((2 * j) as f32 / d))
            .collect();
        match *self {
            RopeScaling::Default => plain,
            RopeScaling::Linear { factor } => {
                plain.into_iter().map(|f| f / factor as f32).collect()
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old = original_max_position_embeddings as f32;
                let (factor, lff, hff) = (
                    factor as f32,
                    low_freq_factor as f32,
                    high_freq_factor as f32,
                );
                let low_wl = old / lff;
                let high_wl = old / hff;
                plain
                    .into_iter()
                    .map(|f| {
                        let wl = 2.0 * std::f32::consts::PI / f;
                        if wl > low_wl {
                            f / factor
                        } else if wl < high_wl {
                            f
                        } else {
                            let smooth = (old / wl - lff) / (hff - lff);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }
}

/// Parse `(rope_theta, scaling)` from either spelling.
pub(crate) fn parse(f: &Fields) -> Result<(f64, RopeScaling), ConfigError> {
    // v5: everything in `rope_parameters`; v4: `rope_theta` + optional `rope_scaling`.
    let (theta, obj): (f64, Option<&Value>) = match f.v.get("rope_parameters") {
        Some(p @ Value::Object(_)) => {
            let theta = match p.get("rope_theta") {
                Some(t) => t.as_f64().ok_or_else(|| {
                    f.invalid(
                        "rope_parameters.rope_theta",
                        format!("expected a number, got {t}"),
                    )
                })?,
                None => f.opt_f64("rope_theta")?.unwrap_or(10000.0),
            };
            (theta, Some(p))
        }
        Some(Value::Null) | None => {
            let theta = f.opt_f64("rope_theta")?.unwrap_or(10000.0);
            let s = match f.v.get("rope_scaling") {
                Some(Value::Null) | None => None,
                Some(s @ Value::Object(_)) => Some(s),
                Some(other) => {
                    return Err(
                        f.invalid("rope_scaling", format!("expected an object, got {other}"))
                    )
                }
            };
            (theta, s)
        }
        Some(other) => {
            return Err(f.invalid(
                "rope_parameters",
                format!("expected an object, got {other}"),
            ))
        }
    };
    let Some(obj) = obj else {
        return Ok((theta, RopeScaling::Default));
    };
    let ty = obj
        .get("rope_type")
        .or_else(|| obj.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let num = |k: &str| -> Result<f64, ConfigError> {
        obj.get(k).and_then(Value::as_f64).ok_or_else(|| {
            f.invalid(
                &format!("rope scaling `{k}`"),
                format!("missing or not a number for rope_type {ty}"),
            )
        })
    };
    let scaling = match ty {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear {
            factor: num("factor")?,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")? as usize,
        },
        other => {
            return Err(ConfigError::Unsupported {
                path: f.origin.into(),
                what: "rope type",
                value: other.into(),
                supported: "default, linear, llama3",
            })
        }
    };
    // Positions are divided by the factor: 0 gives inf/NaN angles, a negative
    // one reversed positions; neither is a model anyone trained.
    let factor = match scaling {
        RopeScaling::Linear { factor } | RopeScaling::Llama3 { factor, .. } => Some(factor),
        _ => None,
    };
    if let Some(factor) = factor {
        // (computed in f32: the factor must be a positive normal f32 too)
        if !(factor > 0.0 && (factor as f32).is_normal()) {
            return Err(f.invalid(
                "rope scaling `factor`",
                format!("{factor} must be a positive number (within f32 range)"),
            ));
        }
    }
    if let RopeScaling::Llama3 {
        low_freq_factor,
        high_freq_factor,
        ..
    } = scaling
    {
        if high_freq_factor <= low_freq_factor {
            return Err(f.invalid(
                "rope scaling",
                "high_freq_factor must exceed low_freq_factor".into(),
            ));
        }
    }
    Ok((theta, scaling))
}
