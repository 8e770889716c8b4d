//! Rows -> model batches: padding, packed-row position/segment ids, and the
//! count of loss targets (which normalises gradient accumulation).

use qlora_data::rows::Row;
use qlora_model::Batch;

/// Build a model batch from rows: right padding with labels −100; packed rows
/// (several parts) get position ids restarting per part and segment ids
/// (padding gets its own segment).
pub fn collate(rows: &[&Row], pad_id: u32) -> Batch {
    let s = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let packed = rows.iter().any(|r| r.parts.len() > 1);
    let mut b = Batch::default();
    let (mut pos_rows, mut seg_rows) = (Vec::new(), Vec::new());
    for r in rows {
        let (mut ids, mut labels, mut pos, mut seg) = r.flatten();
        let n = ids.len();
        let pad_seg = r.parts.len() as u32;
        ids.resize(s, pad_id);
        labels.resize(s, qlora_data::IGNORE_INDEX);
        pos.extend(0..(s - n) as u32);
        seg.resize(s, pad_seg);
        b.input_ids.push(ids);
        b.labels.push(labels);
        pos_rows.push(pos);
        seg_rows.push(seg);
    }
    if packed {
        b.position_ids = Some(pos_rows);
        b.segment_ids = Some(seg_rows);
    }
    b
}

/// A micro-batch as the model runs it: the rows of a batch, or the same rows
/// placed together into fewer, longer rows (padding-free batching, as
/// `--packing` lays rows out: positions restarting and attention inside each
/// part). The arithmetic per token is the padded batch's (the same
/// positions, the same keys seen, the same targets) on fewer padded
/// positions: chat rows vary in length (the demo's chatterbot batches are
/// ~29% padding).
pub struct Collated {
    pub batch: Batch,
    /// For each token of `batch` (row-major), its source row (an index into
    /// the rows given) and position there; `None` for padding.
    pub sources: Vec<Option<(usize, usize)>>,
    /// Whether rows were placed together (else `batch` is [`collate`]'s).
    pub binned: bool,
}

/// Rows this long are always allowed ([`Binning::for_model`]): the demo's
/// batches of four chat rows up to 128 tokens go into one row of ~210.
pub const BIN_MIN_LEN: usize = 512;

/// How [`collate_binned`] may place rows together: into rows of at most
/// `max_len` tokens, with no more positions than the padded batch, where
/// the estimated work ([`Binning::layout_cost`]) is lower. `attention` is a
/// causal attention's work per position per token of its span relative to a
/// position's linear work; 0 places nothing together.
#[derive(Debug, Clone, Copy, Default)]
pub struct Binning {
    pub max_len: usize,
    pub attention: f64,
}

impl Binning {
    /// For a model: attention `Q Kᵀ` and `P V` over a causal row of `s`
    /// tokens take `q_dim · s` multiply-adds a position (half the keys, two
    /// products), its linears `h · (2·q_dim + 2·kv_dim) + 3 · h · inter`;
    /// the attention counted at twice that for its lower rate on the CPU
    /// (40-50% of the products' peak, the linears 60-80%).
    /// `longest`: the longest row of the data; rows up to [`BIN_MIN_LEN`]
    /// may be placed into one that long (the memory plan's row length
    /// counts only in per-thread attention scratch, a few MiB there).
    pub fn for_model(c: &qlora_config::ModelConfig, longest: usize) -> Self {
        let (h, q, kv) = (
            c.hidden_size as f64,
            (c.num_attention_heads * c.head_dim) as f64,
            (c.num_key_value_heads * c.head_dim) as f64,
        );
        let linear = h * (2.0 * q + 2.0 * kv) + 3.0 * h * c.intermediate_size as f64;
        Binning {
            max_len: longest.max(BIN_MIN_LEN),
            attention: if linear > 0.0 { 2.0 * q / linear } else { 0.0 },
        }
    }

    /// The estimated work of `bins` (each a row of `rows` placed together)
    /// as rows of `len` positions, in units of a position's linear work:
    /// the positions, plus `attention · n · (n + 32)` for each span
    /// attention runs over: each part of a row with segment ids and its
    /// padding (attention skips the keys before a part, from a 32-key step),
    /// a whole row without.
    fn layout_cost(&self, rows: &[&Row], bins: &[Vec<usize>], len: usize, segmented: bool) -> f64 {
        let span = |n: usize| self.attention * (n * (n + 32)) as f64;
        let mut cost = (bins.len() * len) as f64;
        for bin in bins {
            if segmented {
                let parts = bin
                    .iter()
                    .flat_map(|&r| rows[r].parts.iter().map(|p| p.len()));
                let fill: usize = parts.clone().sum();
                cost += parts.map(span).sum::<f64>() + span(len - fill);
            } else {
                cost += span(len);
            }
        }
        cost
    }
}

/// Rows -> [`Collated`]: placed together where [`Binning`] finds that
/// cheaper, else [`collate`].
pub fn collate_binned(rows: &[&Row], pad_id: u32, how: Binning) -> Collated {
    let bins = best_bins(rows, how);
    let binned = bins.len() < rows.len();
    let bins = if binned {
        bins
    } else {
        (0..rows.len()).map(|r| vec![r]).collect()
    };
    let batch = if binned {
        let placed: Vec<Row> = bins
            .iter()
            .map(|bin| Row {
                parts: bin
                    .iter()
                    .flat_map(|&r| rows[r].parts.iter().cloned())
                    .collect(),
            })
            .collect();
        collate(&placed.iter().collect::<Vec<_>>(), pad_id)
    } else {
        collate(rows, pad_id)
    };
    let s = batch.input_ids.first().map_or(0, Vec::len);
    let mut sources = Vec::with_capacity(bins.len() * s);
    for bin in &bins {
        let start = sources.len();
        for &r in bin {
            sources.extend((0..rows[r].len()).map(|p| Some((r, p))));
        }
        sources.resize(start + s, None);
    }
    Collated {
        batch,
        sources,
        binned,
    }
}

/// The cheapest placement ([`Binning::layout_cost`]) of first-fit
/// decreasing over the capacities from the longest row to `max_len` (or
/// all the tokens), with no more positions than the padded batch; the
/// padded batch (rows one to a row) wins ties.
fn best_bins(rows: &[&Row], how: Binning) -> Vec<Vec<usize>> {
    let longest = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let total: usize = rows.iter().map(|r| r.len()).sum();
    let one_each: Vec<Vec<usize>> = (0..rows.len()).map(|r| vec![r]).collect();
    if how.attention <= 0.0 || rows.len() < 2 || longest == 0 {
        return one_each;
    }
    let segmented = rows.iter().any(|r| r.parts.len() > 1);
    let padded = rows.len() * longest;
    let mut best = (
        how.layout_cost(rows, &one_each, longest, segmented),
        one_each,
    );
    let top = how.max_len.max(longest).min(total);
    // capacities a few tokens apart: the fills are what count, not the cap
    let step = ((top - longest) / 64).max(1);
    for cap in (longest + step..=top).step_by(step) {
        let bins = first_fit_decreasing(rows, cap);
        let fill = bins.iter().map(|(used, _)| *used).max().unwrap_or(0);
        if bins.len() * fill > padded {
            continue;
        }
        let bins: Vec<Vec<usize>> = bins.into_iter().map(|(_, b)| b).collect();
        let cost = how.layout_cost(rows, &bins, fill, true);
        if cost < best.0 {
            best = (cost, bins);
        }
    }
    best.1
}

/// First-fit decreasing into bins of `cap` tokens: rows by length, longest
/// first (ties in input order), each into the first bin with room; each
/// bin's rows in input order, with its fill.
fn first_fit_decreasing(rows: &[&Row], cap: usize) -> Vec<(usize, Vec<usize>)> {
    let mut order: Vec<usize> = (0..rows.len()).collect();
    order.sort_by_key(|&r| std::cmp::Reverse(rows[r].len()));
    let mut bins: Vec<(usize, Vec<usize>)> = Vec::new();
    for r in order {
        let n = rows[r].len();
        match bins.iter_mut().find(|(used, _)| used + n <= cap) {
            Some((used, bin)) => {
                *used += n;
                bin.push(r);
            }
            None => bins.push((n, vec![r])),
        }
    }
    for (_, bin) in &mut bins {
        bin.sort_unstable();
    }
    bins
}

/// Loss targets of one row after the shift (label ≠ −100 at t ≥ 1).
pub fn row_targets(r: &Row) -> usize {
    let (_, labels, _, _) = r.flatten();
    labels
        .iter()
        .skip(1)
        .filter(|&&l| l != qlora_data::IGNORE_INDEX)
        .count()
}

/// Loss targets of a batch after the shift (label ≠ −100 at t ≥ 1).
pub fn batch_targets(b: &Batch) -> usize {
    b.labels
        .iter()
        .map(|r| {
            r.iter()
                .skip(1)
                .filter(|&&l| l != qlora_data::IGNORE_INDEX)
                .count()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use qlora_data::{Example, IGNORE_INDEX};

    /// A row of `len` tokens (ids from `seed`), its first `masked` labels −100.
    fn row(len: usize, seed: u32, masked: usize) -> Row {
        let ids: Vec<u32> = (0..len as u32).map(|j| (seed * 31 + j * 7) % 97).collect();
        let labels = ids
            .iter()
            .enumerate()
            .map(|(j, &x)| if j < masked { IGNORE_INDEX } else { x as i64 })
            .collect();
        Row::single(Example {
            input_ids: ids,
            labels,
        })
    }

    const SOME: Binning = Binning {
        max_len: 512,
        attention: 3e-4,
    };

    /// Every token of the placed batch is its source row's token, with its
    /// label and position; padding is masked; the targets are the same.
    fn check_sources(rows: &[&Row], c: &Collated) {
        let b = &c.batch;
        let s = b.input_ids[0].len();
        assert_eq!(c.sources.len(), b.input_ids.len() * s);
        let mut seen = vec![vec![false; 0]; rows.len()];
        for (r, row) in rows.iter().enumerate() {
            seen[r] = vec![false; row.len()];
        }
        for (k, src) in c.sources.iter().enumerate() {
            let (j, i) = (k / s, k % s);
            match *src {
                Some((r, p)) => {
                    let (ids, labels, pos, _) = rows[r].flatten();
                    assert_eq!(b.input_ids[j][i], ids[p]);
                    assert_eq!(b.labels[j][i], labels[p]);
                    if let Some(ps) = &b.position_ids {
                        assert_eq!(ps[j][i], pos[p]);
                    }
                    assert!(!seen[r][p], "token {r}/{p} placed twice");
                    seen[r][p] = true;
                }
                None => assert_eq!(b.labels[j][i], IGNORE_INDEX),
            }
        }
        assert!(seen.iter().flatten().all(|&x| x), "a token was not placed");
        let plain = collate(rows, 0);
        assert_eq!(batch_targets(b), batch_targets(&plain));
    }

    /// The source rows of each placed row, from `sources`.
    fn bins_of(c: &Collated, n_rows: usize) -> Vec<Vec<usize>> {
        let s = c.batch.input_ids[0].len();
        let bins: Vec<Vec<usize>> = c
            .sources
            .chunks(s)
            .map(|row| {
                let mut b: Vec<usize> = row.iter().flatten().map(|&(r, _)| r).collect();
                b.dedup();
                b
            })
            .collect();
        assert_eq!(bins.iter().map(Vec::len).sum::<usize>(), n_rows);
        bins
    }

    #[test]
    fn short_rows_of_varied_lengths_are_placed_together() {
        // the demo's kind of batch: chat rows of 30-60 tokens, prompts masked
        let rows = [row(37, 1, 12), row(41, 2, 9), row(55, 3, 20), row(30, 4, 8)];
        let refs: Vec<&Row> = rows.iter().collect();
        let c = collate_binned(&refs, 0, SOME);
        assert!(c.binned);
        // 163 tokens: one row instead of 4 x 55 = 220 positions
        assert_eq!(c.batch.input_ids.len(), 1);
        assert_eq!(c.batch.input_ids[0].len(), 163);
        let seg = c.batch.segment_ids.as_ref().expect("parts get segments");
        // each source row its own segment, in input order
        assert_eq!(seg[0][0], 0);
        assert_eq!(seg[0][37], 1);
        assert_eq!(seg[0][162], 3);
        check_sources(&refs, &c);
    }

    #[test]
    fn placement_never_costs_more_than_the_padded_batch() {
        for (lens, max_len) in [
            (vec![100usize, 100, 100, 100], 512usize),
            (vec![1000, 990, 980], 4096),
            (vec![5, 500, 7, 9, 480, 3], 512),
            (vec![64, 1, 1, 1, 1, 1, 1, 1], 64),
            (vec![3], 512),
            (vec![0, 0, 4], 512),
        ] {
            let rows: Vec<Row> = lens
                .iter()
                .enumerate()
                .map(|(i, &n)| row(n, i as u32, i % 3))
                .collect();
            let refs: Vec<&Row> = rows.iter().collect();
            let how = Binning {
                max_len,
                attention: 3e-4,
            };
            let c = collate_binned(&refs, 0, how);
            let (n, s) = (c.batch.input_ids.len(), c.batch.input_ids[0].len());
            let longest = *lens.iter().max().unwrap();
            let one_each: Vec<Vec<usize>> = (0..lens.len()).map(|r| vec![r]).collect();
            let placed: Vec<Vec<usize>> = if c.binned {
                bins_of(&c, lens.len())
            } else {
                one_each.clone()
            };
            assert!(
                how.layout_cost(&refs, &placed, s, c.binned)
                    <= how.layout_cost(&refs, &one_each, longest, false),
                "{lens:?}: {n} x {s}"
            );
            assert!(n * s <= lens.len() * longest, "{lens:?}: {n} x {s}");
            assert!(s <= max_len.max(longest), "{lens:?}: rows of {s}");
            assert_eq!(c.binned, n < lens.len(), "{lens:?}");
            check_sources(&refs, &c);
        }
        // equal full rows: nothing to gain
        let rows: Vec<Row> = (0..4).map(|i| row(100, i, 0)).collect();
        let refs: Vec<&Row> = rows.iter().collect();
        assert!(!collate_binned(&refs, 0, SOME).binned);
        // without the attention's weight nothing is placed together
        let rows = [row(10, 1, 0), row(90, 2, 0)];
        let refs: Vec<&Row> = rows.iter().collect();
        let c = collate_binned(&refs, 0, Binning::default());
        assert!(!c.binned);
        assert_eq!(c.batch.input_ids, collate(&refs, 0).input_ids);
        check_sources(&refs, &c);
    }

    #[test]
    fn first_fit_decreasing_respects_the_capacity() {
        let lens = [9usize, 3, 7, 5, 5, 1, 8];
        let rows: Vec<Row> = lens
            .iter()
            .enumerate()
            .map(|(i, &n)| row(n, i as u32, 0))
            .collect();
        let refs: Vec<&Row> = rows.iter().collect();
        for cap in 9..=38 {
            let bins = first_fit_decreasing(&refs, cap);
            let mut all: Vec<usize> = bins.iter().flat_map(|(_, b)| b.clone()).collect();
            all.sort_unstable();
            assert_eq!(all, (0..lens.len()).collect::<Vec<_>>(), "cap {cap}");
            for (used, bin) in &bins {
                assert_eq!(*used, bin.iter().map(|&r| lens[r]).sum::<usize>());
                assert!(*used <= cap, "cap {cap}: {used}");
                assert!(bin.windows(2).all(|w| w[0] < w[1]), "input order");
            }
            // the lower bound: never more bins than ceil(2 x total / cap) + 1
            assert!(bins.len() <= (2 * 38usize).div_ceil(cap) + 1);
        }
        assert_eq!(first_fit_decreasing(&refs, 38).len(), 1);
    }
}
