//! The trainable parameters as flat f32 buffers in PyTorch's parameter order
//! (layer, q,k,v,o,gate,up,down; per module A, B, then the DoRA magnitude, the
//! order PEFT registers `lora_A`, `lora_B`, `lora_magnitude_vector`), copied to
//! and from the tensors of an [`Adapter`].

use anyhow::{bail, Context, Result};
use qlora_lora::{peft_key, Adapter, AdapterGrads, LoraWeights, Matrix, Which};

/// One trainable tensor.
#[derive(Debug, Clone)]
pub struct Param {
    pub module: String,
    pub which: Which,
    /// `[r, in]` / `[out, r]` for A / B, `[out]` for a DoRA magnitude.
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Param {
    /// The PEFT key (`base_model.model.<module>.lora_A.weight`, `….lora_magnitude_vector`).
    pub fn key(&self) -> String {
        peft_key(&self.module, self.which)
    }
}

/// Flatten an adapter in parameter order.
pub fn params_of(adapter: &Adapter) -> Result<Vec<Param>> {
    let mut out = Vec::new();
    for module in adapter.ordered_modules() {
        let w = &adapter.layers[&module];
        for (which, t) in [(Which::A, &w.a), (Which::B, &w.b)] {
            out.push(Param {
                module: module.clone(),
                which,
                shape: t.dims().to_vec(),
                data: t.data().to_vec(),
            });
        }
        match &w.magnitude {
            Some(m) => out.push(Param {
                module: module.clone(),
                which: Which::Magnitude,
                shape: vec![m.len()],
                data: m.clone(),
            }),
            None if adapter.config.use_dora => {
                bail!("DoRA adapter module {module} has no magnitude vector")
            }
            None => {}
        }
    }
    Ok(out)
}

/// Write the buffers back into the adapter's tensors (in place when the
/// module is already there with the same shapes).
pub fn store_params(adapter: &mut Adapter, params: &[Param]) -> Result<()> {
    let mut i = 0;
    while i < params.len() {
        let (a, b) = match (&params[i], params.get(i + 1)) {
            (a, Some(b)) if a.which == Which::A && b.which == Which::B && a.module == b.module => {
                (a, b)
            }
            _ => bail!("parameter list out of order at {}", params[i].key()),
        };
        i += 2;
        let m = match params.get(i) {
            Some(m) if m.which == Which::Magnitude && m.module == a.module => {
                i += 1;
                Some(m)
            }
            _ => None,
        };
        let dims = |p: &Param| -> Result<[usize; 2]> {
            match p.shape[..] {
                [r, c] => Ok([r, c]),
                _ => bail!("{} has shape {:?}, expected 2 dimensions", p.key(), p.shape),
            }
        };
        let (da, db) = (dims(a)?, dims(b)?);
        match adapter.layers.get_mut(&a.module) {
            Some(w) if w.a.dims() == da && w.b.dims() == db => {
                w.a.data_mut().copy_from_slice(&a.data);
                w.b.data_mut().copy_from_slice(&b.data);
                w.magnitude = m.map(|m| m.data.clone());
            }
            _ => {
                let mk = |p: &Param, [r, c]: [usize; 2]| Matrix::new(r, c, p.data.clone());
                adapter.layers.insert(
                    a.module.clone(),
                    LoraWeights {
                        a: mk(a, da)?,
                        b: mk(b, db)?,
                        magnitude: m.map(|m| m.data.clone()),
                    },
                );
            }
        }
    }
    Ok(())
}

/// Gradients in the same order as `params`, moved out of `grads` (errors if a
/// module is missing or misshapen).
pub fn grads_in_order(mut grads: AdapterGrads, params: &[Param]) -> Result<Vec<Vec<f32>>> {
    params
        .iter()
        .map(|p| {
            let w = grads
                .get_mut(&p.module)
                .with_context(|| format!("model returned no gradient for {}", p.module))?;
            let v = match p.which {
                Which::A => std::mem::replace(&mut w.a, Matrix::zeros(0, 0)).into_data(),
                Which::B => std::mem::replace(&mut w.b, Matrix::zeros(0, 0)).into_data(),
                Which::Magnitude => w
                    .magnitude
                    .take()
                    .with_context(|| format!("model returned no gradient for {}", p.key()))?,
            };
            if v.len() != p.data.len() {
                bail!(
                    "gradient of {} has {} values, expected {}",
                    p.key(),
                    v.len(),
                    p.data.len()
                );
            }
            Ok(v)
        })
        .collect()
}
