//! The trainable parameters as flat f32 buffers in PyTorch's parameter order
//! (layer, q,k,v,o,gate,up,down; A before B), converted to and from the
//! candle tensors of an [`Adapter`].

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use qlora_lora::{peft_key, Adapter, AdapterGrads, LoraWeights, Which};

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

fn to_vec(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1()?)
}

/// Flatten an adapter in parameter order.
pub fn params_of(adapter: &Adapter) -> Result<Vec<Param>> {
    let mut out = Vec::new();
    for module in adapter.ordered_modules() {
        let w = &adapter.layers[&module];
        for (which, t) in [(Which::A, &w.a), (Which::B, &w.b)] {
            let (r, c) = t.dims2()?;
            out.push(Param {
                module: module.clone(),
                which,
                shape: [r, c],
                data: to_vec(t)?,
            });
        }
    }
    Ok(out)
}

/// Write the buffers back into the adapter's tensors.
pub fn store_params(adapter: &mut Adapter, params: &[Param]) -> Result<()> {
    for pair in params.chunks(2) {
        let [a, b] = pair else {
            bail!("odd parameter list")
        };
        let mk =
            |p: &Param| Tensor::from_vec(p.data.clone(), (p.shape[0], p.shape[1]), &Device::Cpu);
        adapter.layers.insert(
            a.module.clone(),
            LoraWeights {
                a: mk(a)?,
                b: mk(b)?,
            },
        );
    }
    Ok(())
}

/// Gradients in the same order as `params` (errors if a module is missing or misshapen).
pub fn grads_in_order(grads: &AdapterGrads, params: &[Param]) -> Result<Vec<Vec<f32>>> {
    params
        .iter()
        .map(|p| {
            let w = grads
                .get(&p.module)
                .with_context(|| format!("model returned no gradient for {}", p.module))?;
            let t = if p.which == Which::A { &w.a } else { &w.b };
            let v = to_vec(t)?;
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
