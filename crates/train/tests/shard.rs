//! `--shard full`: N ranks, each holding 1/N of every layer's projection weights
//! (and of their quantization statistics) and gathering a layer right before each
//! use, must train exactly like one process holding the whole model at N times
//! the batch (loss trajectory within 1e-5 relative, final adapter within 1e-5
//! absolute). The ranks are threads talking through `qlora_dist::ThreadGroup`;
//! each loads its own shard. The CLI's `mpirun` tests run the same code over MPI.

use std::path::Path;

mod common;
use common::{
    assert_ranks_reproduce, dp_cfg, fixture_trainer, ident, run_to_end, start_adapter, uneven_rows,
    Run,
};

use qlora_dist::{Communicator, ThreadGroup};
use qlora_model::ops::linear::FrozenWeight;
use qlora_model::{LoadOptions, Model, QuantMode, ShardSpec};
use qlora_testutil::fixtures as fx;
use qlora_train::{TrainConfig, Trainer};

fn load(dir: &str, quant: QuantMode, shard: Option<ShardSpec>) -> Model {
    Model::from_folder_sharded(fx().join(dir), &LoadOptions { quant }, shard).unwrap()
}

#[derive(Clone, Copy, Debug)]
struct Case {
    dir: &'static str,
    quant: QuantMode,
    world: usize,
    batch: usize,
    accum: usize,
    checkpointing: bool,
    dropout: f64,
    rows: usize,
    steps: u64,
}

const BASE: Case = Case {
    dir: "tiny_llama/model",
    quant: QuantMode::None,
    world: 2,
    batch: 1,
    accum: 1,
    checkpointing: false,
    dropout: 0.0,
    rows: 12,
    steps: 4,
};

fn cfg(c: &Case, batch: usize) -> TrainConfig {
    dp_cfg(batch, c.accum, c.steps, c.dropout, c.checkpointing)
}

fn single(c: &Case) -> Run {
    let model = load(c.dir, c.quant, None);
    let mut t = fixture_trainer(
        &model,
        cfg(c, c.batch * c.world),
        uneven_rows(c.rows),
        vec![],
    );
    run_to_end(&mut t)
}

/// Run `f` on `n` thread ranks, each with its own shard of `dir` loaded as `quant`.
fn on_shards<T: Send>(
    n: usize,
    dir: &str,
    quant: QuantMode,
    f: impl Fn(&Model, &ThreadGroup) -> T + Sync,
) -> Vec<T> {
    std::thread::scope(|s| {
        let hs: Vec<_> = ThreadGroup::new(n)
            .into_iter()
            .map(|comm| {
                let f = &f;
                s.spawn(move || {
                    let spec = ShardSpec::new(comm.rank(), n).unwrap();
                    let model = load(dir, quant, Some(spec));
                    assert_eq!(model.shard_spec(), Some(spec));
                    f(&model, &comm)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn sharded(c: &Case) -> Vec<Run> {
    on_shards(c.world, c.dir, c.quant, |model, comm| {
        let t = fixture_trainer(model, cfg(c, c.batch), uneven_rows(c.rows), vec![]);
        let mut t = t.with_communicator(comm).unwrap();
        run_to_end(&mut t)
    })
}

fn check(c: Case) {
    assert_ranks_reproduce(&c, &single(&c), &sharded(&c));
}

#[test]
fn sharded_ranks_reproduce_one_process_f32() {
    check(BASE);
    check(Case {
        checkpointing: true,
        accum: 2,
        ..BASE
    });
}

#[test]
fn sharded_ranks_reproduce_one_process_nf4() {
    for (dir, quant) in [
        ("tiny_llama/model", QuantMode::Nf4),
        // a pre-quantized bitsandbytes checkpoint: each rank keeps its byte ranges
        ("tiny_llama_bnb4/model", QuantMode::None),
    ] {
        let c = Case { dir, quant, ..BASE };
        check(c);
        check(Case {
            checkpointing: true,
            accum: 3,
            dropout: 0.1,
            ..c
        });
    }
}

/// Three and four ranks: uneven shards, and short global batches where some
/// ranks have no row (they still take part in every gather).
#[test]
fn uneven_shards_and_idle_ranks() {
    check(Case {
        world: 3,
        accum: 2,
        rows: 7,
        steps: 3,
        ..BASE
    });
    check(Case {
        quant: QuantMode::Nf4,
        world: 4,
        rows: 10,
        checkpointing: true,
        ..BASE
    });
    check(Case {
        quant: QuantMode::Bf16,
        world: 3,
        batch: 2,
        rows: 5,
        ..BASE
    });
}

fn bits(w: &FrozenWeight) -> Vec<u8> {
    match w {
        FrozenWeight::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        FrozenWeight::BF16(v) => v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect(),
        FrozenWeight::Quant(q) => format!("{q:?}").into_bytes(),
        FrozenWeight::Ggml(_) => panic!("not sharded"),
    }
}

/// Every rank's gathered layer is bit for bit the unsharded one, and each rank
/// holds its 1/N of the layers' weights.
#[test]
fn gathered_layers_are_the_unsharded_layers() {
    for (dir, quant) in [
        ("tiny_llama/model", QuantMode::Nf4),
        ("tiny_llama/model", QuantMode::None),
        ("tiny_llama_bnb4/model", QuantMode::None),
    ] {
        let whole = load(dir, quant, None);
        let layer_bytes: usize = whole
            .layers
            .iter()
            .flat_map(|l| l.linears.iter())
            .map(|l| l.weight.bytes())
            .sum();
        for n in [2, 3, 4] {
            let held = on_shards(n, dir, quant, |model, comm| {
                for l in 0..whole.layers.len() {
                    let g = model.gathered_layer(l, comm).unwrap();
                    for (m, lin) in g.linears.iter().enumerate() {
                        assert_eq!(
                            bits(&lin.weight),
                            bits(&whole.layers[l].linears[m].weight),
                            "{dir} {quant:?} over {n}: layer {l} linear {m}"
                        );
                    }
                }
                // the embedding, lm_head and norms stay whole on every rank
                assert_eq!(
                    model.weight_bytes() - model.shard_bytes(),
                    whole.weight_bytes() - layer_bytes
                );
                model.shard_bytes()
            });
            let total: usize = held.iter().sum();
            let replicated =
                if quant == QuantMode::None && dir.contains("bnb4") || quant == QuantMode::Nf4 {
                    // each rank keeps the 256-entry nested map and the offset of every weight
                    (n - 1) * whole.layers.len() * 7 * (256 * 4 + 4)
                } else {
                    0
                };
            assert_eq!(
                total,
                layer_bytes + replicated,
                "{dir} {quant:?} over {n}: {held:?}"
            );
            let max = *held.iter().max().unwrap() as f64;
            assert!(
                max < 1.15 * layer_bytes as f64 / n as f64 + (256 * 4 + 4) as f64 * 14.0,
                "{dir} {quant:?} over {n}: shards {held:?} of {layer_bytes}"
            );
        }
    }
}

/// Evaluation over sharded ranks (a rank without a batch left runs a masked one).
#[test]
fn sharded_evaluation_matches_one_process() {
    let c = BASE;
    let model = load(c.dir, QuantMode::Nf4, None);
    let t = fixture_trainer(&model, cfg(&c, 2), uneven_rows(4), uneven_rows(9));
    let want = t.evaluate().unwrap().unwrap().0;
    for n in [2, 3] {
        let got = on_shards(n, c.dir, QuantMode::Nf4, |model, comm| {
            fixture_trainer(model, cfg(&c, 2), uneven_rows(4), uneven_rows(9))
                .with_communicator(comm)
                .unwrap()
                .evaluate()
                .unwrap()
                .unwrap()
                .0
        });
        for g in got {
            assert!((g - want).abs() < 1e-9 * want, "{n} ranks: {g} vs {want}");
        }
    }
}

/// A sharded 2-rank checkpoint resumes with 2 sharded ranks onto the uninterrupted run.
#[test]
fn sharded_resume_continues_exactly() {
    let c = Case {
        quant: QuantMode::Nf4,
        checkpointing: true,
        ..BASE
    };
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("checkpoint-2");
    let full = sharded(&c);
    let run_from = |ck: &Path| {
        on_shards(2, c.dir, c.quant, |model, comm| {
            let mut t = fixture_trainer(model, cfg(&c, 1), uneven_rows(c.rows), vec![])
                .with_communicator(comm)
                .unwrap();
            t.train_step().unwrap();
            t.train_step().unwrap();
            comm.barrier().unwrap();
            if comm.rank() == 0 {
                t.save_checkpoint(ck).unwrap();
            }
            comm.barrier().unwrap();
            let mut t =
                Trainer::resume(model, cfg(&c, 1), ident(), uneven_rows(c.rows), vec![], ck)
                    .unwrap()
                    .with_communicator(comm)
                    .unwrap();
            run_to_end(&mut t)
        })
    };
    let resumed = run_from(&ck);
    assert_eq!(resumed[0].1, full[0].1);
    assert_eq!(resumed[1].1, full[0].1);
    assert_eq!(resumed[0].0.len(), 2);
    assert_eq!(resumed[0].0[1].loss, full[0].0[3].loss);
}

/// A shard alone cannot run the model: a clear error, not a panic.
#[test]
fn a_shard_without_its_communicator_is_an_error() {
    let model = load(
        "tiny_llama/model",
        QuantMode::Nf4,
        Some(ShardSpec::new(0, 2).unwrap()),
    );
    let batch = qlora_model::Batch::from_ids(vec![vec![1, 2, 3]]);
    let e = model.loss(&batch, None).unwrap_err().to_string();
    assert!(
        e.contains("--shard full") && e.contains("rank 0 of 2"),
        "{e}"
    );
    let e = model
        .loss_on(&batch, None, Some(&qlora_dist::SingleProcess))
        .unwrap_err();
    assert!(format!("{e:#}").contains("rank 0 of 2"), "{e:#}");
    let (_, mut ad) = start_adapter(&model);
    let e = model.init_dora(&mut ad).unwrap_err().to_string();
    assert!(e.contains("--shard none"), "{e}");
}
