//! Learning-rate schedules, transformers' formulas
//! (`get_{constant,linear,cosine}_schedule_with_warmup`). The multiplier for
//! the optimizer step with 0-based index `s` (the scheduler has been stepped
//! `s` times when that update runs):
//!
//! * warmup (`s < w`): `s / max(1, w)`
//! * constant: 1
//! * linear: `max(0, (T − s) / max(1, T − w))`
//! * cosine: `max(0, ½(1 + cos(π · 2c · p)))`, `p = (s − w) / max(1, T − w)`, c = 0.5

use std::str::FromStr;

use anyhow::bail;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    Constant,
    Linear,
    Cosine,
}

impl FromStr for ScheduleKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        Ok(match s {
            "constant" | "constant_with_warmup" => ScheduleKind::Constant,
            "linear" => ScheduleKind::Linear,
            "cosine" => ScheduleKind::Cosine,
            o => bail!("unknown schedule `{o}` (expected constant, linear or cosine)"),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
}

impl Schedule {
    /// The multiplier at 0-based step `s`.
    pub fn factor(&self, s: u64) -> f64 {
        let (w, t) = (self.warmup_steps, self.total_steps);
        if s < w {
            return s as f64 / w.max(1) as f64;
        }
        match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Linear => {
                (t.saturating_sub(s) as f64 / t.saturating_sub(w).max(1) as f64).max(0.0)
            }
            ScheduleKind::Cosine => {
                let p = (s - w) as f64 / t.saturating_sub(w).max(1) as f64;
                (0.5 * (1.0 + (std::f64::consts::PI * 2.0 * 0.5 * p).cos())).max(0.0)
            }
        }
    }

    /// The learning rate of 0-based step `s`.
    pub fn lr_at(&self, s: u64) -> f64 {
        self.lr * self.factor(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sch(kind: ScheduleKind, w: u64, t: u64) -> Schedule {
        Schedule {
            kind,
            lr: 1.0,
            warmup_steps: w,
            total_steps: t,
        }
    }

    #[test]
    fn schedules_follow_transformers() {
        let c = sch(ScheduleKind::Constant, 2, 10);
        assert_eq!(
            [c.factor(0), c.factor(1), c.factor(2), c.factor(9)],
            [0.0, 0.5, 1.0, 1.0]
        );
        let l = sch(ScheduleKind::Linear, 2, 10);
        assert_eq!(
            [
                l.factor(1),
                l.factor(2),
                l.factor(6),
                l.factor(10),
                l.factor(12)
            ],
            [0.5, 1.0, 0.5, 0.0, 0.0]
        );
        let k = sch(ScheduleKind::Cosine, 0, 10);
        assert_eq!(k.factor(0), 1.0);
        assert!((k.factor(5) - 0.5).abs() < 1e-15);
        assert!(k.factor(10).abs() < 1e-15);
        let k = sch(ScheduleKind::Cosine, 4, 8);
        assert_eq!(k.factor(2), 0.5);
        assert!((k.factor(6) - 0.5).abs() < 1e-15);
        assert!(
            (sch(ScheduleKind::Cosine, 0, 4).factor(1)
                - (0.5 * (1.0 + (std::f64::consts::PI / 4.0).cos())))
            .abs()
                < 1e-15
        );
        assert_eq!(
            "cosine".parse::<ScheduleKind>().unwrap(),
            ScheduleKind::Cosine
        );
        assert!("step".parse::<ScheduleKind>().is_err());
    }
}
