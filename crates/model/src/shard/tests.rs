use super::*;
use qlora_dist::ThreadGroup;
use rand::{Rng, SeedableRng};

fn same(a: &FrozenWeight, b: &FrozenWeight) -> bool {
    match (a, b) {
        (FrozenWeight::F32(x), FrozenWeight::F32(y)) => {
            x.len() == y.len()
                && x.iter()
                    .zip(y.iter())
                    .all(|(p, q)| p.to_bits() == q.to_bits())
        }
        (FrozenWeight::BF16(x), FrozenWeight::BF16(y)) => x == y,
        (FrozenWeight::Quant(x), FrozenWeight::Quant(y)) => x == y,
        _ => false,
    }
}

/// Every rank's shard, gathered over `n` threads: each rank's copy.
fn gather_all(n: usize, make: impl Fn(ShardSpec) -> WeightShard + Sync) -> Vec<FrozenWeight> {
    std::thread::scope(|s| {
        let hs: Vec<_> = ThreadGroup::new(n)
            .into_iter()
            .map(|comm| {
                let make = &make;
                s.spawn(move || {
                    let spec = ShardSpec::new(comm.rank(), n).unwrap();
                    let sh = make(spec);
                    // a second weight in the same collective
                    let mut out = gather(&[&sh, &sh], &comm).unwrap();
                    assert!(same(&out[0], &out[1]));
                    (sh.bytes(), out.remove(0))
                })
            })
            .collect();
        let got: Vec<(usize, FrozenWeight)> = hs.into_iter().map(|h| h.join().unwrap()).collect();
        got.into_iter().map(|g| g.1).collect()
    })
}

/// Sharded quantization and slicing, gathered, give byte for byte the
/// unsharded weight, for every storage, 1..=5 ranks (uneven splits), sizes
/// that are and are not multiples of the 64-value and 256-block units.
#[test]
fn gathered_shards_are_the_unsharded_weight() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    for &(rows, cols) in &[
        (64usize, 64usize),
        (3, 37),
        (160, 64),
        (129, 257),
        (300, 128),
    ] {
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| rng.random_range(-1.0f32..1.0) * (1.0 + (i % 97) as f32 / 9.0))
            .collect();
        for mode in [
            QuantMode::None,
            QuantMode::Bf16,
            QuantMode::Nf4,
            QuantMode::Fp4,
        ] {
            let full = crate::load::dense(w.clone(), [rows, cols], mode, "test").unwrap();
            let full_bytes = full.bytes();
            for n in 1..=5 {
                let what = format!("[{rows}, {cols}] {mode:?} over {n}");
                for g in gather_all(n, |spec| {
                    WeightShard::from_dense(&w, [rows, cols], mode, spec).unwrap()
                }) {
                    assert!(same(&g, &full), "{what}: quantized shards");
                }
                for g in gather_all(n, |spec| WeightShard::of_full(&full, spec).unwrap()) {
                    assert!(same(&g, &full), "{what}: sliced shards");
                }
                // every rank holds about 1/n (the replicated code map aside)
                let held: Vec<usize> = (0..n)
                    .map(|r| {
                        let spec = ShardSpec::new(r, n).unwrap();
                        WeightShard::from_dense(&w, [rows, cols], mode, spec)
                            .unwrap()
                            .parts
                            .iter()
                            .map(|p| p.mine.len())
                            .sum()
                    })
                    .collect();
                let total: usize = held.iter().sum();
                let extra = match mode {
                    QuantMode::Nf4 | QuantMode::Fp4 => 256 * 4 + 4,
                    _ => 0,
                };
                assert_eq!(total + extra, full_bytes, "{what}: shard sizes {held:?}");
                let (lo, hi) = (held.iter().min().unwrap(), held.iter().max().unwrap());
                assert!(hi - lo <= 3 * 32 + 8, "{what}: unbalanced {held:?}");
            }
        }
    }
}

#[test]
fn a_rank_out_of_step_is_an_error() {
    let w = vec![0.5f32; 64 * 64];
    let errs: Vec<String> = std::thread::scope(|s| {
        let hs: Vec<_> = ThreadGroup::new(2)
            .into_iter()
            .map(|comm| {
                let w = &w;
                s.spawn(move || {
                    // rank 1 loaded a different shape
                    let rows = if comm.rank() == 0 { 64 } else { 32 };
                    let spec = ShardSpec::new(comm.rank(), 2).unwrap();
                    let sh =
                        WeightShard::from_dense(&w[..rows * 64], [rows, 64], QuantMode::Nf4, spec)
                            .unwrap();
                    format!("{:#}", gather(&[&sh], &comm).unwrap_err())
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(errs.iter().all(|e| e.contains("expected")), "{errs:?}");
    // a communicator of another size
    let sh = WeightShard::from_dense(&w, [64, 64], QuantMode::None, ShardSpec::new(0, 2).unwrap())
        .unwrap();
    let e = gather(&[&sh], &qlora_dist::SingleProcess).unwrap_err();
    assert!(e.to_string().contains("rank 0 of 2"), "{e}");
}
