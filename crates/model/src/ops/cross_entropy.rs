//! Causal-LM cross-entropy as transformers' `ForCausalLMLoss` computes it
//! (FORMATS §4.3): position `t` of a row predicts that row's label at `t+1`;
//! label −100 is ignored. Returns the SUM over counted targets and their
//! count, so a trainer can divide by the total over all micro-batches.

use rayon::prelude::*;

use super::fastmath;
use super::linear::FrozenLinear;

mod online;

pub const IGNORE_INDEX: i64 = -100;

/// Target of flattened position `p` (row length `s`), if counted.
#[inline]
fn target(labels: &[i64], s: usize, p: usize) -> i64 {
    if (p + 1).is_multiple_of(s) {
        IGNORE_INDEX
    } else {
        labels[p + 1]
    }
}

/// Checks labels are `-100` or in `0..vocab`.
pub fn check_labels(labels: &[i64], vocab: usize) -> anyhow::Result<()> {
    for (i, &l) in labels.iter().enumerate() {
        anyhow::ensure!(
            l == IGNORE_INDEX || (l >= 0 && (l as usize) < vocab),
            "label {l} at flat position {i} is neither -100 nor a token id below the vocabulary size {vocab}"
        );
    }
    Ok(())
}

/// `(sum of −log softmax(logits[p])[target], count)`; `logits [b·s, V]`,
/// `labels [b·s]` (rows of length `s`). The sum is taken in position order
/// (bit-identical whatever the thread count).
pub fn forward(logits: &[f32], labels: &[i64], s: usize, vocab: usize) -> (f64, usize) {
    let per: Vec<Option<f64>> = logits
        .par_chunks(vocab)
        .enumerate()
        .map(|(p, row)| {
            let t = target(labels, s, p);
            (t != IGNORE_INDEX).then(|| lse(row) - row[t as usize] as f64)
        })
        .collect();
    sum_in_order(&per)
}

fn sum_in_order(per: &[Option<f64>]) -> (f64, usize) {
    per.iter()
        .flatten()
        .fold((0.0, 0), |(s, c), l| (s + l, c + 1))
}

/// `log Σ exp(row)` (f32 exponentials summed in a fixed order in f64).
fn lse(row: &[f32]) -> f64 {
    let mx = fastmath::max(row);
    let mut tmp = row.to_vec();
    mx as f64 + fastmath::exp_shift_sum(&mut tmp, mx).ln()
}

/// One counted row: the loss, and `row` overwritten with
/// `(softmax(row) − onehot(t)) · inv`.
fn row_forward_backward(row: &mut [f32], t: usize, inv: f32) -> f64 {
    let mx = fastmath::max(row);
    let target_logit = row[t];
    let z = fastmath::exp_shift_sum(row, mx);
    let loss = mx as f64 + z.ln() - target_logit as f64;
    fastmath::scale(row, (inv as f64 / z) as f32);
    row[t] -= inv;
    loss
}

/// Forward and backward in one pass: returns `(sum, count)` and overwrites
/// `logits` with `d(sum / denominator)/d logits`.
pub fn forward_backward_inplace(
    logits: &mut [f32],
    labels: &[i64],
    s: usize,
    vocab: usize,
    denominator: f32,
) -> (f64, usize) {
    let per = rows_forward_backward(logits, labels, s, vocab, 0, 1.0 / denominator);
    sum_in_order(&per)
}

/// [`forward_backward_inplace`] on the rows of flat positions `p0..`; per-row losses.
fn rows_forward_backward(
    logits: &mut [f32],
    labels: &[i64],
    s: usize,
    vocab: usize,
    p0: usize,
    inv: f32,
) -> Vec<Option<f64>> {
    logits
        .par_chunks_mut(vocab)
        .enumerate()
        .map(|(p, row)| {
            let t = target(labels, s, p0 + p);
            if t == IGNORE_INDEX {
                row.fill(0.0);
                return None;
            }
            Some(row_forward_backward(row, t as usize, inv))
        })
        .collect()
}

/// At most this many f32 logits exist at once in [`head_forward_backward`].
const HEAD_CHUNK_LOGITS: usize = 1 << 23;

/// Positions per chunk of [`head_forward_backward`]: at most
/// [`HEAD_CHUNK_LOGITS`] logits, a multiple of 32 (whole AMX row blocks)
/// where that allows, and the chunks as even as that allows: SmolLM2's 512
/// positions go in 4 x 128, not 3 x 160 + 32 (a 32-row chunk reads the whole
/// head for a fifth of a big chunk's work; the head 96 -> 91 ms per step,
/// medians of 3).
/// The memory planner counts the maximum (`qlora-memory` `head_chunk_rows`).
fn head_chunk_rows(vocab: usize, t: usize) -> usize {
    let max = (HEAD_CHUNK_LOGITS / vocab.max(1)).clamp(1, t.max(1));
    if max < 32 {
        return max;
    }
    let max = max / 32 * 32;
    let even = t.div_ceil(t.div_ceil(max));
    (even.div_ceil(32) * 32).min(max)
}

/// The largest head [`head_forward_backward`] copies to bf16 once per call
/// (128 MiB, 4x the logits chunk's bytes).
const HEAD_BF16_COPY_MAX_BYTES: usize = 4 * 4 * HEAD_CHUNK_LOGITS;

/// The head packed for AMX (bf16 compute): the weight rounded to bf16 and
/// packed for both directions once (kept from step to step: +4 bytes per
/// weight element) when its bf16 is at most [`HEAD_BF16_COPY_MAX_BYTES`]
/// and its rows are longer than [`HEAD_COPY_MIN_HIDDEN`]: TinyLlama's
/// 32000 x 2048 (2 x 125 MiB), never the 250 MiB to 1 GiB of a 7B-8B model's
/// head. Otherwise the one pass packs a vocabulary block at a time
/// ([`one_pass`]).
fn packed_head(head: &FrozenLinear, t: usize) -> Option<std::sync::Arc<super::amx::PackedWeight>> {
    (head.out_features * head.in_features * 2 <= HEAD_BF16_COPY_MAX_BYTES
        && head.in_features >= HEAD_COPY_MIN_HIDDEN)
        .then(|| head.packed_for_amx(t))
        .flatten()
}

/// The shortest head rows (hidden size) for which the kept copy pays: up to
/// h = 1024 the one pass's vocabulary blocks are 256 rows and a slice packs
/// each inside its L2 at no measurable cost (SmolLM2's 49152 x 576 f32 head:
/// lm_head + cross-entropy 154-160 vs 154-170 ms a step, and 106 MiB less);
/// above, its 1024-row blocks (8 MiB packed at h 2048) leave L2 and packing
/// them per slice cost TinyLlama's f32 head 3-5% of its step (2 pairs of
/// `qlora train` runs). The planner mirrors it (`qlora-memory`).
const HEAD_COPY_MIN_HIDDEN: usize = 1025;

/// The head's one pass over the vocabulary ([`online::head_pass`], `inv` as
/// there) on the bf16 tile path: over the kept packed copy where
/// [`packed_head`] makes one, else packing a vocabulary block at a time
/// ([`online::HeadWeight::PerBlock`]: a bf16 checkpoint's head, one too big
/// to copy, rows of at most 1024). `None` off the tile path (or with a
/// bias): the chunked path then. The per-block pass replaced the chunked
/// path for heads without a copy, which packed every panel again per chunk
/// of positions and direction and kept a chunk of f32 logits: SmolLM2's bf16
/// head 183-191 -> 147-149 ms a step, 790 -> 736 MiB; TinyLlama's 419-422 ->
/// 374-387 ms, 2378 -> 2336 MiB (BENCHMARKS.md).
fn one_pass(
    head: &FrozenLinear,
    nf: &[f32],
    labels: &[i64],
    s: usize,
    inv: Option<f32>,
) -> Option<online::HeadPass> {
    let t = labels.len();
    if let Some(pw) = packed_head(head, t) {
        return Some(online::head_pass(
            &online::HeadWeight::Kept(&pw),
            nf,
            labels,
            s,
            inv,
        ));
    }
    if !head.use_amx(t) || head.bias.is_some() {
        return None;
    }
    Some(head.with_bf16_source(|w| {
        let hw = online::HeadWeight::PerBlock {
            w,
            vocab: head.out_features,
            h: head.in_features,
        };
        online::head_pass(&hw, nf, labels, s, inv)
    }))
}

/// The lm_head and the loss without the backward (evaluation): `(sum,
/// count)` as [`forward`] of the whole logits gives them, without ever
/// holding them all: the tile path's one pass over the vocabulary
/// ([`online`]), or the counted positions a chunk at a time ([`chunked`]).
pub fn head_loss(head: &FrozenLinear, nf: &[f32], labels: &[i64], s: usize) -> (f64, usize) {
    let t = labels.len();
    assert_eq!(nf.len(), t * head.in_features, "head: input size");
    if let Some(pass) = one_pass(head, nf, labels, s, None) {
        return sum_in_order(&pass.per);
    }
    sum_in_order(&chunked(head, nf, labels, s, None).0)
}

/// The lm_head, the loss and their backward, never all `[b·s, vocab]`
/// logits at once. `nf [b·s, hidden]` is the final norm's output. Returns
/// `(sum, count, d(sum / denominator)/d nf)`; the sum is taken in position
/// order. A head packed for AMX takes one pass over the vocabulary for all
/// positions ([`online`]); otherwise the counted positions a chunk at a
/// time ([`chunked`]).
pub fn head_forward_backward(
    head: &FrozenLinear,
    nf: &[f32],
    labels: &[i64],
    s: usize,
    denominator: f32,
) -> (f64, usize, Vec<f32>) {
    super::keep_freed_memory();
    let t = labels.len();
    assert_eq!(nf.len(), t * head.in_features, "head: input size");
    let inv = 1.0 / denominator;
    if let Some(pass) = one_pass(head, nf, labels, s, Some(inv)) {
        let (sum, count) = sum_in_order(&pass.per);
        return (sum, count, pass.dx.expect("the pass ran its backward"));
    }
    let (per, dnf) = chunked(head, nf, labels, s, Some(inv));
    let (sum, count) = sum_in_order(&per);
    (sum, count, dnf.expect("the chunks ran their backward"))
}

/// The head off the one pass: the logits of the counted positions only, a
/// chunk of them at a time ([`head_chunk_rows`] of the counted count): their
/// rows of `nf` gathered, their losses, and with `inv` (the backward) their
/// input gradient `d(loss · inv)/d nf` scattered back into a `[t, h]`
/// gradient that is zero at the other positions. Returns the per-position
/// losses and that gradient. Chat data masks its prompts (the demo's
/// chatterbot rows: ~61 targets of ~214 tokens), and until this path was
/// counted-only every position of a chunk with one target paid for its
/// vocabulary-wide logits; an evaluation kept all `[t, vocab]` logits.
fn chunked(
    head: &FrozenLinear,
    nf: &[f32],
    labels: &[i64],
    s: usize,
    inv: Option<f32>,
) -> (Vec<Option<f64>>, Option<Vec<f32>>) {
    let counted = (0..labels.len())
        .filter(|&p| target(labels, s, p) != IGNORE_INDEX)
        .count();
    let rows = head_chunk_rows(head.out_features, counted);
    chunked_by(head, nf, labels, s, inv, rows)
}

/// [`chunked`] with `rows` counted positions per chunk (the tests' small
/// chunks).
fn chunked_by(
    head: &FrozenLinear,
    nf: &[f32],
    labels: &[i64],
    s: usize,
    inv: Option<f32>,
    rows: usize,
) -> (Vec<Option<f64>>, Option<Vec<f32>>) {
    let (vocab, h) = (head.out_features, head.in_features);
    let t = labels.len();
    let counted: Vec<(usize, usize)> = (0..t)
        .filter_map(|p| {
            let tg = target(labels, s, p);
            (tg != IGNORE_INDEX).then_some((p, tg as usize))
        })
        .collect();
    let mut per: Vec<Option<f64>> = vec![None; t];
    let mut dnf = inv.map(|_| vec![0f32; t * h]);
    if counted.is_empty() {
        return (per, dnf);
    }
    let rows = rows.max(1);
    // a chunk's rows of nf, then (the backward) of its input gradient
    let mut xg = vec![0f32; rows.min(counted.len()) * h];
    let mut logits: Vec<f32> = Vec::new();
    for chunk in counted.chunks(rows) {
        let n = chunk.len();
        let xg = &mut xg[..n * h];
        for (dst, &(p, _)) in xg.chunks_exact_mut(h).zip(chunk) {
            dst.copy_from_slice(&nf[p * h..(p + 1) * h]);
        }
        logits.resize(n * vocab, 0.0);
        head.forward_into(xg, n, &mut logits);
        let losses: Vec<f64> = logits
            .par_chunks_mut(vocab)
            .zip(chunk)
            .map(|(row, &(_, tg))| match inv {
                Some(inv) => row_forward_backward(row, tg, inv),
                None => lse(row) - row[tg] as f64,
            })
            .collect();
        for (&(p, _), l) in chunk.iter().zip(losses) {
            per[p] = Some(l);
        }
        if let Some(dnf) = dnf.as_mut() {
            xg.fill(0.0);
            head.backward_input(&logits, n, xg);
            for (src, &(p, _)) in xg.chunks_exact(h).zip(chunk) {
                dnf[p * h..(p + 1) * h].copy_from_slice(src);
            }
        }
    }
    (per, dnf)
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    /// The chunked head (f32 products), which gathers the counted positions,
    /// against the whole logits: the same losses and input gradient (zero at
    /// the other positions), in chunks of any size, over masks from none to
    /// all.
    #[test]
    fn chunked_head_over_the_counted_positions_matches_the_whole_logits() {
        use super::super::linear::{BaseCompute, FrozenWeight};
        let (vocab, h, b, s) = (301, 24, 3, 17);
        let t = b * s;
        let head = FrozenLinear {
            out_features: vocab,
            in_features: h,
            weight: FrozenWeight::F32(std::sync::Arc::new(rand_vec(vocab * h, 31, 0.5))),
            bias: None,
            compute: BaseCompute::F32,
            bf16_copy: Default::default(),
        };
        let nf = rand_vec(t * h, 32, 1.0);
        let label = |p: usize| ((p * 37 + 5) % vocab) as i64;
        // (position, sequence length) -> masked
        type Mask = fn(usize, usize) -> bool;
        let masks: [(&str, Mask); 6] = [
            ("none", |_, _| false),
            ("all", |_, _| true),
            // a chat row: its prompt masked, the answer counted
            ("prompts", |p, s| p % s < 11),
            ("every other", |p, _| p % 2 == 0),
            ("the middle sequence", |p, s| (s..2 * s).contains(&p)),
            ("one target", |p, _| p != 40),
        ];
        for (name, masked) in &masks {
            let labels: Vec<i64> = (0..t)
                .map(|p| if masked(p, s) { IGNORE_INDEX } else { label(p) })
                .collect();
            let den = 9.0f32;
            // the whole logits: loss, gradient, input gradient
            let mut logits = head.forward(&nf, t);
            let (want_sum, want_count) = forward(&logits, &labels, s, vocab);
            forward_backward_inplace(&mut logits, &labels, s, vocab, den);
            let mut want_dx = vec![0f32; t * h];
            head.backward_input(&logits, t, &mut want_dx);
            let close = |a: f64, b: f64| (a - b).abs() <= 1e-5 * (1.0 + b.abs());
            for rows in [1, 4, 7, 64] {
                let (per, dx) = chunked_by(&head, &nf, &labels, s, Some(1.0 / den), rows);
                let (sum, count) = sum_in_order(&per);
                assert_eq!(count, want_count, "{name}, rows {rows}");
                assert!(
                    close(sum, want_sum),
                    "{name}, rows {rows}: {sum} vs {want_sum}"
                );
                let dx = dx.unwrap();
                for p in 0..t {
                    let (got, want) = (&dx[p * h..(p + 1) * h], &want_dx[p * h..(p + 1) * h]);
                    if per[p].is_none() {
                        assert!(got.iter().all(|&g| g == 0.0), "{name}: position {p}");
                    }
                    for (g, w) in got.iter().zip(want) {
                        assert!(
                            (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                            "{name}, rows {rows}, position {p}: {g} vs {w}"
                        );
                    }
                }
                let (fwd, none) = chunked_by(&head, &nf, &labels, s, None, rows);
                assert!(none.is_none());
                let f = sum_in_order(&fwd);
                assert_eq!(f.1, want_count);
                assert!(close(f.0, want_sum), "{name}, rows {rows}, forward only");
            }
            // the public entry points take the chunked path here (f32)
            let (sum, count, dx) = head_forward_backward(&head, &nf, &labels, s, den);
            assert_eq!(count, want_count);
            assert!(close(sum, want_sum), "{name}");
            assert_eq!(dx.len(), t * h);
            let (lsum, lcount) = head_loss(&head, &nf, &labels, s);
            assert_eq!(lcount, want_count);
            assert!(close(lsum, want_sum), "{name}: head_loss");
        }
    }

    #[test]
    fn loss_sum_is_bit_identical_whatever_the_thread_count() {
        let (rows, v) = (257, 33);
        let logits = rand_vec(rows * v, 7, 4.0);
        let labels: Vec<i64> = (0..rows as i64).map(|i| (i * 7) % v as i64).collect();
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let f = forward(&logits, &labels, rows, v);
                let mut g = logits.clone();
                let fb = forward_backward_inplace(&mut g, &labels, rows, v, 100.0);
                (f.0.to_bits(), f.1, fb.0.to_bits(), fb.1)
            })
        };
        let one = run(1);
        for t in [2, 3, 8] {
            assert_eq!(run(t), one, "{t} threads");
        }
        // and the order is the plain row order
        let mut seq = 0f64;
        for p in 0..rows - 1 {
            let row = &logits[p * v..(p + 1) * v];
            seq += lse(row) - row[labels[p + 1] as usize] as f64;
        }
        assert_eq!(seq.to_bits(), one.0);
    }

    #[test]
    fn cross_entropy_matches_candle_and_finite_differences() {
        use candle_core::{Device, Tensor};
        let (b, s, v) = (2, 5, 11);
        let logits = rand_vec(b * s * v, 1, 3.0);
        let labels: Vec<i64> = vec![3, -100, 4, 10, 0, 1, 2, -100, -100, 7];
        let (sum, count) = forward(&logits, &labels, s, v);
        // targets: row0 positions 0..3 -> labels[1..5] = -100,4,10,0 (3 counted);
        // row1 -> 2,-100,-100,7 (2 counted)
        assert_eq!(count, 5);
        // candle reference: log_softmax then gather.
        let t = Tensor::from_slice(&logits, (b * s, v), &Device::Cpu).unwrap();
        let ls = candle_core::Tensor::log_sum_exp(&t, 1).unwrap();
        let ls: Vec<f32> = ls.to_vec1().unwrap();
        let mut want = 0.0f64;
        for p in 0..b * s {
            let tg = if (p + 1).is_multiple_of(s) {
                -100
            } else {
                labels[p + 1]
            };
            if tg >= 0 {
                want += (ls[p] - logits[p * v + tg as usize]) as f64;
            }
        }
        assert!((sum - want).abs() < 1e-4);
        let mut g = logits.clone();
        let (s2, c2) = forward_backward_inplace(&mut g, &labels, s, v, 4.0);
        assert_eq!((s2, c2), (sum, count));
        let dir = rand_vec(logits.len(), 2, 1.0);
        let fd = directional_fd(&logits, &dir, 1e-4, |x| {
            let mut tot = 0.0;
            for p in 0..b * s {
                let tg = if (p + 1).is_multiple_of(s) {
                    -100
                } else {
                    labels[p + 1]
                };
                if tg >= 0 {
                    let row = &x[p * v..(p + 1) * v];
                    let mx = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = row.iter().map(|r| (r - mx).exp()).sum();
                    tot += mx + z.ln() - row[tg as usize];
                }
            }
            tot / 4.0
        });
        assert!((fd - dot(&g, &dir)).abs() < 1e-5);
        assert!(check_labels(&labels, v).is_ok());
        assert!(check_labels(&[11], v).is_err());
    }
}
