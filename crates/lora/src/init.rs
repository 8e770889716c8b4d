//! Fresh adapters: PEFT's initialisation from a seeded, portable RNG (ChaCha8).
//!
//! `init_lora_weights=true`: A = kaiming_uniform(a=√5) on `[r, in]`, which is
//! U(−1/√in, +1/√in) (gain √(2/6), bound √3·gain/√in), and B = 0, so a fresh
//! adapter changes nothing until trained. "gaussian": A ~ N(0, (1/r)²), B = 0.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use qlora_config::ModelConfig;
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::peft::{module_shape, InitKind, PeftConfig};
use crate::{Adapter, LoraWeights, Matrix};

/// Set every module's DoRA magnitude to PEFT's init `m = ‖W + s·B·A‖` per
/// output row, `weight(module)` giving the module's base weight `[out, in]` as
/// f32 (the dequantized weight for a 4-bit base, as PEFT's `dequantize_module_weight`).
pub fn init_dora_magnitudes(
    adapter: &mut Adapter,
    mut weight: impl FnMut(&str) -> Result<Vec<f32>>,
) -> Result<()> {
    let scaling = adapter.scaling() as f32;
    for (path, lw) in adapter.layers.iter_mut() {
        let w = weight(path)?;
        let [out, inp] = [lw.b.rows(), lw.a.cols()];
        if w.len() != out * inp {
            bail!(
                "{path}: base weight has {} values, the adapter is for [{out}, {inp}]",
                w.len()
            );
        }
        lw.magnitude = Some(crate::dora::weight_norm_rows(&w, 0, lw, scaling));
    }
    adapter.config.use_dora = true;
    Ok(())
}

/// `n` samples of U(−bound, bound), drawn exactly as rand 0.8's `gen_range(-bound..bound)`
/// did (23 random mantissa bits scaled into the range, redrawn when rounding reaches
/// `bound`). Written out so that a seed gives the same adapter whatever rand version
/// the workspace uses: rand 0.9 dropped the redraw, which shifts the stream.
fn uniform(rng: &mut ChaCha8Rng, n: usize, bound: f32) -> Vec<f32> {
    let (low, high) = (-bound, bound);
    let scale = high - low;
    (0..n)
        .map(|_| loop {
            // a float in [1, 2) from the top 23 bits, minus 1: [0, 1)
            let value0_1 = f32::from_bits((rng.next_u32() >> 9) | 0x3f80_0000) - 1.0;
            let res = value0_1 * scale + low;
            if res < high {
                break res;
            }
        })
        .collect()
}

/// Standard normal samples by Box–Muller (keeps the dependency set small).
fn normal(rng: &mut ChaCha8Rng, n: usize, std: f32) -> Vec<f32> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let u1: f64 = 1.0 - rng.random::<f64>(); // (0, 1]
        let u2: f64 = rng.random();
        let rad = (-2.0 * u1.ln()).sqrt();
        let th = std::f64::consts::TAU * u2;
        out.push((rad * th.cos()) as f32 * std);
        if out.len() < n {
            out.push((rad * th.sin()) as f32 * std);
        }
    }
    out
}

/// A new adapter for `model` as `peft` describes it; modules are initialised
/// in model order from one RNG seeded with `seed`.
///
/// DoRA (`peft.use_dora`): the magnitude vectors need the base weights
/// (`m = ‖W + s·B·A‖` rows), which this crate does not hold; they are left
/// `None` here and must be set by [`init_dora_magnitudes`] (the model crate's
/// `Model::init_dora` does) before the adapter is used or saved.
pub fn init_adapter(peft: &PeftConfig, model: &ModelConfig, seed: u64) -> Result<Adapter> {
    if peft.r == 0 {
        bail!("LoRA rank r must be at least 1");
    }
    let targets = peft.resolve_targets(model)?;
    // A rank above a layer's dimensions adds nothing (the update B·A has rank
    // <= min(out, in)) and a huge one would only exhaust memory.
    for path in &targets {
        let [out, inp] = module_shape(model, path).expect("resolved targets are projections");
        if peft.r > out.max(inp) {
            bail!(
                "LoRA rank {} exceeds the dimensions of {path} ([{out}, {inp}]); use a rank <= {}",
                peft.r,
                out.min(inp)
            );
        }
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let r = peft.r;
    let mut layers = BTreeMap::new();
    for path in &targets {
        let [out, inp] = module_shape(model, path).expect("resolved targets are projections");
        let a = match peft.init_lora_weights {
            InitKind::Default | InitKind::NoOpFalse => {
                uniform(&mut rng, r * inp, 1.0 / (inp as f32).sqrt())
            }
            InitKind::Gaussian => normal(&mut rng, r * inp, 1.0 / r as f32),
        };
        let b = match peft.init_lora_weights {
            InitKind::NoOpFalse => uniform(&mut rng, out * r, 1.0 / (r as f32).sqrt()),
            _ => vec![0f32; out * r],
        };
        layers.insert(
            path.clone(),
            LoraWeights::new(Matrix::new(r, inp, a)?, Matrix::new(out, r, b)?),
        );
    }
    Ok(Adapter {
        config: peft.lora_config(targets),
        layers,
    })
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    /// A seed's LoRA A init is pinned to what rand 0.8's `gen_range` drew (before the
    /// workspace moved to rand 0.9): the first values and a hash of 100k of them.
    #[test]
    fn uniform_is_pinned_to_the_rand_0_8_draws() {
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let v = super::uniform(&mut r, 100_000, 0.3);
        let bits: Vec<u32> = v.iter().map(|x| x.to_bits()).collect();
        let h = bits
            .iter()
            .fold(0u64, |h, &b| h.wrapping_mul(0x100000001b3) ^ b as u64);
        assert_eq!(
            bits[..6],
            [993246976, 3194819903, 1049287402, 1043153948, 1049579960, 3183438174]
        );
        assert_eq!(h, 6822871514675208848);
    }
}
