//! The trainable parameters as flat f32 buffers in PyTorch's parameter order
//! (layer, q,k,v,o,gate,up,down; A before B), copied to and from the
//! matrices of an [`Adapter`].

use anyhow::{bail, Context, Result};
use qlora_lora::{peft_key, Adapter, AdapterGrads, LoraWeights, Matrix, Which};

/// One trainable tensor.
#[derive(Debug, Clone)]
pub struct Param {
    pub module: String,
    pub which: Which,
    pub shape: [usize; 2],
    pub data: Vec<f32>,
}

impl Param {
    /// The PEFT key (`base_model.model.<module>.lora_A.weight`).
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
                shape: t.dims(),
                data: t.data().to_vec(),
            });
        }
    }
    Ok(out)
}

/// Write the buffers back into the adapter's matrices (in place when the
/// module is already there with the same shapes).
pub fn store_params(adapter: &mut Adapter, params: &[Param]) -> Result<()> {
    for pair in params.chunks(2) {
        let [a, b] = pair else {
            bail!("odd parameter list")
        };
        match adapter.layers.get_mut(&a.module) {
            Some(w) if w.a.dims() == a.shape && w.b.dims() == b.shape => {
                w.a.data_mut().copy_from_slice(&a.data);
                w.b.data_mut().copy_from_slice(&b.data);
            }
            _ => {
                let mk = |p: &Param| Matrix::new(p.shape[0], p.shape[1], p.data.clone());
                adapter.layers.insert(
                    a.module.clone(),
                    LoraWeights {
                        a: mk(a)?,
                        b: mk(b)?,
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
            let t = if p.which == Which::A {
                &mut w.a
            } else {
                &mut w.b
            };
            let v = std::mem::replace(t, Matrix::zeros(0, 0)).into_data();
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
