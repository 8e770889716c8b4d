//! Wall-clock time per op family of the CPU backend, for benchmarks and
//! `qlora train` profiles: switched on by `QLORA_OP_TIMES=1` (off, one relaxed
//! load per op otherwise).
//!
//! Each [`crate::backend::cpu::CpuBackend`] method holds a [`time`] guard, so
//! the families partition the step's time spent inside backend calls; what is
//! left of a step's wall time (the model code between calls, gathering,
//! allocation outside the ops) is reported as the remainder by the caller.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// The op families timed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Frozen base linear, forward (dequantize + product).
    LinearForward,
    /// Frozen base linear, input gradient.
    LinearBackward,
    /// LoRA (or DoRA) forward: the two small products added to `y`.
    LoraForward,
    /// LoRA (or DoRA) backward: A/B gradients and the input gradient.
    LoraBackward,
    AttentionForward,
    AttentionBackward,
    /// lm_head + cross-entropy (forward, and its backward when training).
    Head,
    /// RMSNorm forward and backward.
    Norm,
    Rope,
    /// SwiGLU forward and backward.
    Swiglu,
    /// Embedding lookup, residual adds, scaling, copies.
    Elementwise,
    /// AdamW and gradient norms.
    Optimizer,
}

impl Op {
    pub const ALL: [Op; 12] = [
        Op::LinearForward,
        Op::LinearBackward,
        Op::LoraForward,
        Op::LoraBackward,
        Op::AttentionForward,
        Op::AttentionBackward,
        Op::Head,
        Op::Norm,
        Op::Rope,
        Op::Swiglu,
        Op::Elementwise,
        Op::Optimizer,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Op::LinearForward => "base linear forward",
            Op::LinearBackward => "base linear input grad",
            Op::LoraForward => "LoRA forward",
            Op::LoraBackward => "LoRA backward",
            Op::AttentionForward => "attention forward",
            Op::AttentionBackward => "attention backward",
            Op::Head => "lm_head + cross-entropy",
            Op::Norm => "RMSNorm",
            Op::Rope => "RoPE",
            Op::Swiglu => "SwiGLU",
            Op::Elementwise => "embedding, adds, copies",
            Op::Optimizer => "AdamW, norms",
        }
    }
}

const N: usize = Op::ALL.len();
static NANOS: [AtomicU64; N] = [const { AtomicU64::new(0) }; N];
static CALLS: [AtomicU64; N] = [const { AtomicU64::new(0) }; N];

/// Whether timing is on (`QLORA_OP_TIMES` set and not `0`).
pub fn enabled() -> bool {
    static ENV: OnceLock<bool> = OnceLock::new();
    *ENV.get_or_init(|| std::env::var_os("QLORA_OP_TIMES").is_some_and(|v| v != "0"))
}

/// Adds the time until it is dropped to `op` (nothing when timing is off).
#[must_use = "the time is taken when the guard is dropped"]
pub struct Guard(Option<(Op, Instant)>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some((op, t0)) = self.0.take() {
            let i = op as usize;
            NANOS[i].fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
            CALLS[i].fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Starts timing one call of `op`.
pub fn time(op: Op) -> Guard {
    Guard(enabled().then(|| (op, Instant::now())))
}

/// One family's totals since the last [`reset`].
#[derive(Debug, Clone, Copy)]
pub struct OpTime {
    pub op: Op,
    pub seconds: f64,
    pub calls: u64,
}

/// Totals of every family (zeros included), in [`Op::ALL`] order.
pub fn totals() -> Vec<OpTime> {
    Op::ALL
        .iter()
        .map(|&op| OpTime {
            op,
            seconds: NANOS[op as usize].load(Ordering::Relaxed) as f64 * 1e-9,
            calls: CALLS[op as usize].load(Ordering::Relaxed),
        })
        .collect()
}

/// Clears the totals.
pub fn reset() {
    for i in 0..N {
        NANOS[i].store(0, Ordering::Relaxed);
        CALLS[i].store(0, Ordering::Relaxed);
    }
}

/// A table of `rows` (from [`totals`]) as shares of `wall` seconds (the time
/// the timed steps took), with the untimed remainder as its last line.
pub fn table(rows: &[OpTime], wall: f64, steps: usize) -> String {
    let steps = steps.max(1) as f64;
    let mut out = format!(
        "{:<26} {:>10} {:>7} {:>8}\n",
        "op family", "ms/step", "share", "calls"
    );
    let mut timed = 0.0;
    let mut rows = rows.to_vec();
    rows.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
    for r in rows.iter().filter(|r| r.calls > 0) {
        timed += r.seconds;
        out += &format!(
            "{:<26} {:>10.1} {:>6.1}% {:>8.0}\n",
            r.op.name(),
            r.seconds / steps * 1e3,
            100.0 * r.seconds / wall.max(f64::MIN_POSITIVE),
            r.calls as f64 / steps
        );
    }
    let rest = (wall - timed).max(0.0);
    out += &format!(
        "{:<26} {:>10.1} {:>6.1}%\n",
        "(outside the ops)",
        rest / steps * 1e3,
        100.0 * rest / wall.max(f64::MIN_POSITIVE)
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guards_add_time_and_calls_to_their_family() {
        // The guards `time` makes when timing is on. Other tests may time ops
        // concurrently (with QLORA_OP_TIMES set): only Rope, which no other
        // test of this crate's lib times, is asserted.
        let on = |op| Guard(Some((op, Instant::now())));
        let before = totals()[Op::Rope as usize];
        {
            let _g = on(Op::Rope);
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        drop(on(Op::Rope));
        let after = totals()[Op::Rope as usize];
        assert!(after.calls - before.calls >= 2);
        assert!(after.seconds - before.seconds >= 0.019);
    }

    #[test]
    fn table_lists_shares_of_the_wall_time_and_the_remainder() {
        let rows = [
            OpTime {
                op: Op::Head,
                seconds: 0.5,
                calls: 2,
            },
            OpTime {
                op: Op::Rope,
                seconds: 1.0,
                calls: 120,
            },
            OpTime {
                op: Op::Norm,
                seconds: 0.0,
                calls: 0,
            },
        ];
        let t = table(&rows, 2.0, 2);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4, "{t}");
        // Sorted by time, per step, shares of the 2 s; Norm (no calls) left out.
        assert!(
            lines[1].starts_with("RoPE")
                && lines[1].contains("500.0")
                && lines[1].contains("50.0%")
                && lines[1].ends_with("60"),
            "{t}"
        );
        assert!(
            lines[2].starts_with("lm_head")
                && lines[2].contains("250.0")
                && lines[2].contains("25.0%"),
            "{t}"
        );
        assert!(
            lines[3].starts_with("(outside the ops)")
                && lines[3].contains("250.0")
                && lines[3].contains("25.0%"),
            "{t}"
        );
    }
}
