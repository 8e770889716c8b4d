//! torch's CPU `mean()` of an f32 vector, reproduced bit for bit.
//!
//! bitsandbytes sets the double-quant offset to `absmax.mean()`; the value
//! lands in the checkpoint (`nested_offset`) and shifts every nested code, so
//! a quantizer that wants byte-identical output must round exactly like
//! torch. On CPU, torch's `mean` is `sum(x) / n` in f32, and `sum` is the
//! cascade sum of `aten/src/ATen/native/cpu/SumKernel.cpp`:
//!
//! * `n >= 8` (one AVX2 vector of f32): `vectorized_inner_sum` — the input is
//!   read as ⌊n/8⌋ 8-lane vectors, summed lane-wise by `row_sum` (4 interleaved
//!   accumulators, each a 4-level cascade `multi_row_sum`), the scalar tail is
//!   added sequentially, then the 8 lanes are added in order;
//! * `n < 8`: `scalar_inner_sum` — the same `row_sum` on scalars.
//!
//! This reproduces all 26 double-quant offsets in the shared fixtures
//! (14 tiny-Llama modules, 12 quant cases) where an f64 mean matches only 14;
//! the fixtures were made with one thread (torch splits larger reductions
//! across threads, which changes the order). A CUDA-made checkpoint uses
//! another order again; readers always use the stored value.

/// f32 lanes of the vector width torch's default CPU kernels use (AVX2).
const LANES: usize = 8;
/// `ilp_factor` of `row_sum`.
const ILP: usize = 4;
/// `num_levels` of `multi_row_sum`.
const LEVELS: usize = 4;

/// `multi_row_sum`: `size` rows of `ILP` items (`item(i, k)`), each column
/// summed with a 4-level cascade.
fn multi_row_sum<T: Copy>(
    size: usize,
    zero: T,
    item: impl Fn(usize, usize) -> T,
    add: impl Fn(&mut T, T),
) -> [T; ILP] {
    let ceil_log2 = if size <= 1 {
        0
    } else {
        (usize::BITS - (size - 1).leading_zeros()) as usize
    };
    let level_power = (ceil_log2 / LEVELS).max(4);
    let level_step = 1usize << level_power;
    let level_mask = level_step - 1;
    let mut acc = [[zero; ILP]; LEVELS];
    let mut i = 0usize;
    while i + level_step <= size {
        for _ in 0..level_step {
            for (k, a) in acc[0].iter_mut().enumerate() {
                add(a, item(i, k));
            }
            i += 1;
        }
        for j in 1..LEVELS {
            let (lo, hi) = acc.split_at_mut(j);
            for (a, p) in hi[0].iter_mut().zip(lo[j - 1].iter_mut()) {
                add(a, *p);
                *p = zero;
            }
            if i & (level_mask << (j * level_power)) != 0 {
                break;
            }
        }
    }
    while i < size {
        for (k, a) in acc[0].iter_mut().enumerate() {
            add(a, item(i, k));
        }
        i += 1;
    }
    let (first, rest) = acc.split_at_mut(1);
    for r in rest.iter() {
        for (a, &v) in first[0].iter_mut().zip(r) {
            add(a, v);
        }
    }
    acc[0]
}

/// `row_sum`: `n` items, interleaved into `ILP` cascades, remainder into the first.
fn row_sum<T: Copy>(n: usize, zero: T, item: impl Fn(usize) -> T, add: impl Fn(&mut T, T)) -> T {
    let size_ilp = n / ILP;
    let mut p = multi_row_sum(size_ilp, zero, |i, k| item(i * ILP + k), &add);
    for i in size_ilp * ILP..n {
        add(&mut p[0], item(i));
    }
    for k in 1..ILP {
        let v = p[k];
        add(&mut p[0], v);
    }
    p[0]
}

/// torch CPU `x.sum()` for a contiguous f32 vector (single thread).
pub fn torch_cpu_sum_f32(x: &[f32]) -> f32 {
    let n = x.len();
    if n < LANES {
        return row_sum(n, 0f32, |i| x[i], |a, b| *a += b);
    }
    let nvec = n / LANES;
    let vec_at = |i: usize| -> [f32; LANES] {
        x[i * LANES..(i + 1) * LANES]
            .try_into()
            .expect("LANES elements")
    };
    let lanes = row_sum(nvec, [0f32; LANES], vec_at, |a, b| {
        for (x, y) in a.iter_mut().zip(b) {
            *x += y;
        }
    });
    let mut acc = 0f32;
    for &v in &x[nvec * LANES..] {
        acc += v;
    }
    for l in lanes {
        acc += l;
    }
    acc
}

/// torch CPU `x.mean()` for a contiguous f32 vector: `sum / n` in f32.
/// 0.0 for an empty vector (torch gives NaN; there is nothing to offset).
pub fn torch_cpu_mean_f32(x: &[f32]) -> f32 {
    if x.is_empty() {
        return 0.0;
    }
    torch_cpu_sum_f32(x) / x.len() as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A plain restatement for small sizes where the cascade never triggers:
    /// lanes accumulate vectors 4 apart, then are combined in a fixed order.
    #[test]
    fn small_sizes_follow_the_documented_order() {
        let x: Vec<f32> = (0..5).map(|i| 0.1f32 * (i as f32 + 1.0)).collect();
        // n < 8: ((((x0 + x4) + x1) + x2) + x3)
        let want = ((((0f32 + x[0]) + x[4]) + x[1]) + x[2]) + x[3];
        assert_eq!(torch_cpu_sum_f32(&x).to_bits(), want.to_bits());
        // n = 8: one vector; lanes added in order to 0
        let y: Vec<f32> = (0..8).map(|i| 1.0 / (i as f32 + 3.0)).collect();
        let mut want = 0f32;
        for v in &y {
            want += v;
        }
        assert_eq!(torch_cpu_sum_f32(&y).to_bits(), want.to_bits());
    }

    #[test]
    fn large_sums_are_accurate() {
        // The cascade keeps the error small even for long vectors.
        let x: Vec<f32> = (0..1_000_003)
            .map(|i| ((i % 1000) as f32) * 0.001)
            .collect();
        let exact: f64 = x.iter().map(|&v| v as f64).sum::<f64>() / x.len() as f64;
        let m = torch_cpu_mean_f32(&x) as f64;
        assert!((m - exact).abs() / exact < 1e-6, "{m} vs {exact}");
        assert_eq!(torch_cpu_mean_f32(&[]), 0.0);
    }
}
