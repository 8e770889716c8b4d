//! Choosing the arithmetic of the frozen base products for a loaded model.

use crate::model::Model;
use crate::ops::linear::BaseCompute;

impl Model {
    /// Compute every frozen linear (the seven per layer and the lm_head) in
    /// `compute`: [`BaseCompute::Bf16`] rounds weights and activations to bf16
    /// and accumulates in f32 (AMX tiles where the CPU has them; there
    /// LoRA's up-projection and input-gradient term join the products as
    /// extra k-steps); norms, softmax, the loss, LoRA's weights, `x·Aᵀ` and
    /// gradients, and the optimizer stay f32 either way.
    pub fn set_base_compute(&mut self, compute: BaseCompute) {
        for l in &mut self.layers {
            for lin in &mut l.linears {
                lin.compute = compute;
            }
        }
        self.lm_head.compute = compute;
    }

    /// How the frozen linears are computed (that of the lm_head).
    pub fn base_compute(&self) -> BaseCompute {
        self.lm_head.compute
    }
}
