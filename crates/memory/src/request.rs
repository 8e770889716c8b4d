//! `qlora plan`'s flags as given, turned into a [`PlanInput`]: the defaults of `qlora
//! train` (and of the target, CPU or GPU) applied, every value checked. The CLI copies
//! its flags into a [`PlanRequest`]; everything it means is decided here.

use crate::bnb::{Bnb4, QuantType};
use crate::plan::{self, DType, Method, PlanInput};
use crate::MemoryError;

/// The flags of `qlora plan` (spellings and defaults of `qlora train`), before defaults.
#[derive(Debug, Clone)]
pub struct PlanRequest {
    /// full | lora | qlora
    pub method: String,
    pub rank: u64,
    /// all-linear or a comma list of short names.
    pub target: String,
    pub dora: bool,
    /// LoRA dropout probability, in [0, 1).
    pub lora_dropout: f64,
    /// adamw | adamw8bit | sgd
    pub optimizer: String,
    pub batch: u64,
    pub seq: u64,
    pub grad_accum: u64,
    /// As given; `None` leaves it to the trainer's default (see [`crate::plan_model`]).
    pub checkpointing: Option<bool>,
    /// f32 | bf16 | f16; `None`: bf16 with `gpu`, else f32.
    pub compute: Option<String>,
    pub devices: u64,
    /// none | full | grad-op
    pub sharding: String,
    pub cpu_offload: bool,
    pub gpu: bool,
    /// nf4 | fp4 | native; `None`: native for a GGUF model, else nf4.
    pub quant: Option<String>,
    pub blocksize: u64,
    pub double_quant: bool,
    /// Bytes; `None`: the measured CPU baseline, or a CUDA context with `gpu`.
    pub overhead: Option<u64>,
    /// `None`: this machine's CPUs (1 with `gpu`).
    pub threads: Option<u64>,
}

impl PlanRequest {
    /// The plan's input for `model` (a reference [`crate::resolve`] takes).
    pub fn input(&self, model: &str) -> Result<PlanInput, MemoryError> {
        let bad = |m: String| Err(MemoryError::Invalid(m));
        let method: Method = self.method.parse()?;
        let compute = match &self.compute {
            Some(c) => match DType::parse(c) {
                Some(d) => d,
                None => return bad(format!("--compute {c:?}: expected f32, bf16 or f16")),
            },
            None if self.gpu => DType::BF16,
            None => DType::F32,
        };
        let quant = match &self.quant {
            Some(q) => q.to_ascii_lowercase(),
            None if crate::is_gguf(model) => "native".into(),
            None => "nf4".into(),
        };
        let (quant_type, native) = match quant.as_str() {
            "nf4" => (QuantType::Nf4, false),
            "fp4" => (QuantType::Fp4, false),
            "native" => (QuantType::Nf4, true),
            q => {
                return bad(format!(
                    "--quant {q:?}: expected nf4, fp4 or native (a base kept in f32/bf16 is --method lora)"
                ))
            }
        };
        if self.blocksize < 16 || !self.blocksize.is_power_of_two() {
            return bad(format!(
                "--blocksize {}: expected a power of two such as 64",
                self.blocksize
            ));
        }
        let targets = crate::planner::parse_targets(&self.target);
        if method != Method::Full && (targets.is_empty() || self.rank == 0) {
            return bad("LoRA needs --rank ≥ 1 and at least one target".into());
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return bad(format!(
                "--lora-dropout {}: expected a probability in [0, 1)",
                self.lora_dropout
            ));
        }
        if self.grad_accum == 0 {
            return bad("--grad-accum must be at least 1".into());
        }
        let overhead = match self.overhead {
            Some(o) => o,
            None if self.gpu => plan::GPU_OVERHEAD,
            None => plan::CPU_OVERHEAD,
        };
        let threads = match self.threads {
            _ if self.gpu => 1,
            Some(t) => t,
            None => std::thread::available_parallelism().map_or(1, |n| n.get() as u64),
        };
        Ok(PlanInput {
            method,
            rank: self.rank,
            targets,
            dora: self.dora,
            lora_dropout: self.lora_dropout,
            optimizer: self.optimizer.parse()?,
            batch: self.batch,
            seq: self.seq,
            grad_accum: self.grad_accum,
            checkpointing: self.checkpointing.unwrap_or(false),
            compute,
            quant: Bnb4::new(quant_type, self.blocksize, self.double_quant),
            native,
            devices: self.devices,
            sharding: self.sharding.parse()?,
            cpu_offload: self.cpu_offload,
            overhead,
            gpu: self.gpu,
            load_file_bytes: 0,
            tokenizer_bytes: 0,
            l2_bytes: plan::host_l2_bytes().unwrap_or(plan::DEFAULT_L2_BYTES),
            threads,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{Optimizer, Sharding};

    fn req() -> PlanRequest {
        PlanRequest {
            method: "qlora".into(),
            rank: 16,
            target: "all-linear".into(),
            dora: false,
            lora_dropout: plan::DEFAULT_LORA_DROPOUT,
            optimizer: "adamw".into(),
            batch: 4,
            seq: 1024,
            grad_accum: 1,
            checkpointing: None,
            compute: None,
            devices: 1,
            sharding: "full".into(),
            cpu_offload: false,
            gpu: false,
            quant: None,
            blocksize: 64,
            double_quant: true,
            overhead: None,
            threads: Some(3),
        }
    }

    #[test]
    fn defaults_follow_the_target_and_the_model() {
        let p = req().input("llama-2-7b").unwrap();
        assert_eq!((p.compute, p.native, p.threads), (DType::F32, false, 3));
        assert_eq!((p.overhead, p.targets.len()), (plan::CPU_OVERHEAD, 7));
        assert_eq!(
            (p.optimizer, p.sharding),
            (Optimizer::AdamW, Sharding::Full)
        );
        assert_eq!(p.quant.quant_type, QuantType::Nf4);
        let g = PlanRequest { gpu: true, ..req() };
        let p = g.input("llama-2-7b").unwrap();
        assert_eq!(
            (p.compute, p.overhead, p.threads),
            (DType::BF16, plan::GPU_OVERHEAD, 1)
        );
        // A .gguf model's default is its own blocks.
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("m.gguf");
        std::fs::write(&f, b"GGUF").unwrap();
        assert!(req().input(f.to_str().unwrap()).unwrap().native);
    }

    #[test]
    fn bad_values_are_refused_naming_the_flag() {
        let e = |r: PlanRequest| r.input("llama-2-7b").unwrap_err().to_string();
        let q = PlanRequest {
            quant: Some("q4".into()),
            ..req()
        };
        assert!(e(q).contains("--quant \"q4\": expected nf4, fp4 or native"));
        let b = PlanRequest {
            blocksize: 48,
            ..req()
        };
        assert!(e(b).contains("--blocksize 48"));
        let r = PlanRequest { rank: 0, ..req() };
        assert!(e(r).contains("--rank ≥ 1"));
        let c = PlanRequest {
            compute: Some("f8".into()),
            ..req()
        };
        assert!(e(c).contains("--compute \"f8\""));
        let m = PlanRequest {
            method: "dpo".into(),
            ..req()
        };
        assert!(e(m).contains("--method \"dpo\""));
    }
}
