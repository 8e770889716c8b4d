//! DoRA (weight-decomposed LoRA) exactly as PEFT 0.21.2 computes it
//! (`peft/tuners/lora/dora.py::DoraLinearLayer`, `variants.py::DoraLinearVariant`;
//! FORMATS §3.4).
//!
//! Per adapted linear with frozen `W: [out, in]`, `A: [r, in]`, `B: [out, r]`,
//! `s = scaling` and the trainable magnitude `m: [out]`
//! (`…lora_magnitude_vector` in the file, no `.weight` suffix, no adapter name):
//!
//! * `norm = ‖W + s·B·A‖₂` over each **output row** (`torch.linalg.norm(…, dim=1)`
//!   on the `[out, in]` weight; PEFT's comment says "column-wise" because the
//!   paper writes the transposed weight). For a 4-bit base, `W` is the
//!   dequantized weight (`dequantize_module_weight`).
//! * The norm is recomputed from the current `A`, `B` on every forward but is
//!   **detached** (DoRA paper §4.3): no gradient flows through it, so it is a
//!   constant of each step for the backward.
//! * Forward: `y = base(x) + (m/norm − 1) ⊙ (x' Wᵀ) + (m/norm) ⊙ s·B(A(x'))`
//!   where `x' = dropout(x)`. Without dropout (p = 0, or evaluation) PEFT
//!   reuses the base output minus its bias for `x' Wᵀ`, so
//!   `y = (m/norm) ⊙ (x Wᵀ + s·B A x) + bias`. **With** dropout in training,
//!   PEFT passes the *dropped* input to the DoRA term and recomputes
//!   `F.linear(dropout(x), W)` (no bias) for it, while `base(x)` keeps the
//!   undropped input: the base product is then computed twice.
//! * Init: `m = ‖W + s·B·A‖` rows (`update_layer`; with PEFT's `B = 0` that is `‖W‖`).
//! * Merge: `W' = (m/‖W + s·B·A‖)[:, None] ⊙ (W + s·B·A)`; the bias is unchanged.

use crate::LoraWeights;

/// `‖W + s·B·A‖₂` of rows `r0 .. r0 + w_rows.len()/in` of a module, given those
/// rows of `W` (f32, row-major). `(B·A)` is accumulated over the rank in f32,
/// scaled, added to `W` in f32 (PEFT's order), and the squares are summed in f64.
pub fn weight_norm_rows(w_rows: &[f32], r0: usize, lw: &LoraWeights, scaling: f32) -> Vec<f32> {
    let [r, inf] = lw.a.dims();
    let (a, b) = (lw.a.data(), lw.b.data());
    let mut acc = vec![0f32; inf];
    w_rows
        .chunks_exact(inf)
        .enumerate()
        .map(|(j, row)| {
            let o = r0 + j;
            acc.fill(0.0);
            for k in 0..r {
                let c = b[o * r + k];
                for (x, ak) in acc.iter_mut().zip(&a[k * inf..(k + 1) * inf]) {
                    *x += c * ak;
                }
            }
            let ss: f64 = row
                .iter()
                .zip(&acc)
                .map(|(w, d)| {
                    let v = (w + scaling * d) as f64;
                    v * v
                })
                .sum();
            ss.sqrt() as f32
        })
        .collect()
}

/// `m / norm` per output row: the DoRA scale of the base-plus-LoRA output.
pub fn magnitude_scale(m: &[f32], norm: &[f32]) -> Vec<f32> {
    m.iter().zip(norm).map(|(m, n)| m / n).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Matrix;

    #[test]
    fn weight_norm_is_the_row_norm_of_w_plus_scaled_ba() {
        // W [2, 3], A [1, 3], B [2, 1], s = 2
        let w = [1.0f32, 2.0, 2.0, 0.0, 3.0, 4.0];
        let lw = LoraWeights::new(
            Matrix::new(1, 3, vec![1.0, 0.0, -1.0]).unwrap(),
            Matrix::new(2, 1, vec![0.5, 0.0]).unwrap(),
        );
        let n = weight_norm_rows(&w, 0, &lw, 2.0);
        // row 0: [1+1, 2, 2-1] = [2, 2, 1] -> 3; row 1: B = 0 -> [0, 3, 4] -> 5
        assert_eq!(n, vec![3.0, 5.0]);
        // rows given from an offset use B's matching rows
        assert_eq!(weight_norm_rows(&w[3..], 1, &lw, 2.0), vec![5.0]);
        assert_eq!(magnitude_scale(&[6.0, 5.0], &n), vec![2.0, 1.0]);
    }
}
