//! Data parallelism: N ranks at `--batch-size b` must reproduce one process
//! at `--batch-size N·b` (loss trajectory within 1e-5 relative, final adapter
//! within 1e-5 absolute). The ranks here are threads of one process talking
//! through `qlora_dist::ThreadGroup`; the same trainer code runs over MPI in
//! the CLI's `mpirun` tests.

mod common;
use common::{
    assert_ranks_reproduce, dp_cfg, fixture_trainer, ident, run_to_end, uneven_rows, Run,
};

use qlora_dist::{Communicator, ThreadGroup};
use qlora_model::{LoadOptions, Model, QuantMode};
use qlora_testutil::fixtures as fx;
use qlora_train::{collate_binned, Binning, TrainConfig, Trainer};

fn load_model(dir: &str, quant: QuantMode) -> Model {
    Model::from_folder(fx().join(dir), &LoadOptions { quant }).unwrap()
}

#[derive(Clone, Copy, Debug)]
struct Case {
    world: usize,
    batch: usize,
    accum: usize,
    checkpointing: bool,
    dropout: f64,
    rows: usize,
    steps: u64,
}

fn cfg(c: &Case, batch: usize) -> TrainConfig {
    dp_cfg(batch, c.accum, c.steps, c.dropout, c.checkpointing)
}

fn single(model: &Model, c: &Case) -> Run {
    let mut t = fixture_trainer(
        model,
        cfg(c, c.batch * c.world),
        uneven_rows(c.rows),
        vec![],
    );
    run_to_end(&mut t)
}

fn parallel(model: &Model, c: &Case) -> Vec<Run> {
    std::thread::scope(|s| {
        let hs: Vec<_> = ThreadGroup::new(c.world)
            .into_iter()
            .map(|comm| {
                s.spawn(move || {
                    let t = fixture_trainer(model, cfg(c, c.batch), uneven_rows(c.rows), vec![]);
                    let mut t = t.with_communicator(&comm).unwrap();
                    assert_eq!((t.rank(), t.world_size()), (comm.rank(), c.world));
                    run_to_end(&mut t)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn check(model: &Model, c: Case) {
    assert_ranks_reproduce(&c, &single(model, &c), &parallel(model, &c));
}

const BASE: Case = Case {
    world: 2,
    batch: 1,
    accum: 1,
    checkpointing: false,
    dropout: 0.0,
    rows: 12,
    steps: 4,
};

#[test]
fn two_ranks_reproduce_one_process_f32() {
    let model = load_model("tiny_llama/model", QuantMode::None);
    check(&model, BASE);
    check(
        &model,
        Case {
            checkpointing: true,
            accum: 2,
            ..BASE
        },
    );
}

#[test]
fn two_ranks_reproduce_one_process_nf4() {
    for model in [
        load_model("tiny_llama/model", QuantMode::Nf4),
        load_model("tiny_llama_bnb4/model", QuantMode::None),
    ] {
        check(&model, BASE);
        check(
            &model,
            Case {
                checkpointing: true,
                accum: 3,
                ..BASE
            },
        );
    }
}

/// LoRA dropout masks follow the rows' places in the global batch.
#[test]
fn dropout_masks_follow_the_global_batch() {
    let model = load_model("tiny_llama/model", QuantMode::None);
    check(
        &model,
        Case {
            dropout: 0.2,
            batch: 2,
            ..BASE
        },
    );
}

/// Epoch ends with a short global batch: some ranks get no row (zeros).
#[test]
fn short_last_batch_and_more_ranks() {
    let model = load_model("tiny_llama/model", QuantMode::None);
    check(
        &model,
        Case {
            world: 2,
            batch: 2,
            rows: 5,
            steps: 4,
            ..BASE
        },
    );
    check(
        &model,
        Case {
            world: 3,
            batch: 1,
            accum: 2,
            rows: 7,
            steps: 3,
            ..BASE
        },
    );
}

/// Distributed eval gives the one-process eval loss.
#[test]
fn evaluation_is_split_and_summed() {
    let model = load_model("tiny_llama/model", QuantMode::None);
    let c = BASE;
    let t = fixture_trainer(&model, cfg(&c, 1), uneven_rows(4), uneven_rows(9));
    let want = t.evaluate().unwrap().unwrap().0;
    let got: Vec<f64> = std::thread::scope(|s| {
        let hs: Vec<_> = ThreadGroup::new(2)
            .into_iter()
            .map(|comm| {
                let model = &model;
                s.spawn(move || {
                    let t = fixture_trainer(model, cfg(&c, 1), uneven_rows(4), uneven_rows(9))
                        .with_communicator(&comm)
                        .unwrap();
                    t.evaluate().unwrap().unwrap().0
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for g in got {
        assert!((g - want).abs() < 1e-9 * want, "{g} vs {want}");
    }
}

/// A 2-rank checkpoint resumes with 2 ranks onto the uninterrupted
/// trajectory, and is refused by a single process (and vice versa).
#[test]
fn resume_needs_the_same_number_of_ranks() {
    let model = load_model("tiny_llama/model", QuantMode::None);
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("checkpoint-2");
    let c = BASE;
    let full = parallel(&model, &c);
    // first two steps, checkpoint (rank 0 writes; the others must not)
    std::thread::scope(|s| {
        for comm in ThreadGroup::new(2) {
            let (model, ck) = (&model, &ck);
            s.spawn(move || {
                let mut t = fixture_trainer(model, cfg(&c, 1), uneven_rows(12), vec![])
                    .with_communicator(&comm)
                    .unwrap();
                t.train_step().unwrap();
                t.train_step().unwrap();
                comm.barrier().unwrap();
                t.save_checkpoint(ck).unwrap();
            });
        }
    });
    let state = std::fs::read_to_string(ck.join("trainer_state.json")).unwrap();
    assert!(state.contains("\"world_size\": 2"), "{state}");
    // a single process refuses it, naming both counts
    let mut t1 =
        Trainer::resume(&model, cfg(&c, 1), ident(), uneven_rows(12), vec![], &ck).unwrap();
    let e = t1.train_step().unwrap_err().to_string();
    assert!(
        e.contains("2 data-parallel processes") && e.contains("this run has 1"),
        "{e}"
    );
    // two ranks continue exactly
    let resumed: Vec<Run> = std::thread::scope(|s| {
        let hs: Vec<_> = ThreadGroup::new(2)
            .into_iter()
            .map(|comm| {
                let (model, ck) = (&model, &ck);
                s.spawn(move || {
                    let mut t =
                        Trainer::resume(model, cfg(&c, 1), ident(), uneven_rows(12), vec![], ck)
                            .unwrap()
                            .with_communicator(&comm)
                            .unwrap();
                    run_to_end(&mut t)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(resumed[0].1, full[0].1);
    assert_eq!(resumed[0].0.len(), 2);
    assert_eq!(resumed[0].0[1].loss, full[0].0[3].loss);
    // three ranks are refused when attaching the communicator
    let errs: Vec<String> = std::thread::scope(|s| {
        let hs: Vec<_> = ThreadGroup::new(3)
            .into_iter()
            .map(|comm| {
                let (model, ck) = (&model, &ck);
                s.spawn(move || {
                    match Trainer::resume(model, cfg(&c, 1), ident(), uneven_rows(12), vec![], ck)
                        .unwrap()
                        .with_communicator(&comm)
                    {
                        Ok(_) => String::new(),
                        Err(e) => e.to_string(),
                    }
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for e in errs {
        assert!(e.contains("mpirun -n 2"), "{e}");
    }
}

/// Ranks started with different settings are stopped before training.
#[test]
fn ranks_must_agree_on_settings() {
    let model = load_model("tiny_llama/model", QuantMode::None);
    let errs: Vec<String> = std::thread::scope(|s| {
        let hs: Vec<_> = ThreadGroup::new(2)
            .into_iter()
            .map(|comm| {
                let model = &model;
                s.spawn(move || {
                    let mut c = cfg(&BASE, 1);
                    c.lr = if comm.rank() == 0 { 1e-3 } else { 2e-3 };
                    match fixture_trainer(model, c, uneven_rows(6), vec![]).with_communicator(&comm)
                    {
                        Ok(_) => String::new(),
                        Err(e) => e.to_string(),
                    }
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for e in errs {
        assert!(e.contains("ranks disagree on the training settings"), "{e}");
    }
}

/// Padding-free batching (short rows placed together into one row,
/// `collate_binned`) trains as the padded batches do: the same losses,
/// gradient norms and adapter within f32 rounding, dropout masks included
/// (each token keeps its padded place's mask), with and without
/// checkpointing and accumulation, on f32 and 4-bit bases.
#[test]
fn rows_placed_together_train_as_the_padded_batches() {
    let rows = uneven_rows(BASE.rows);
    let refs: Vec<&qlora_data::rows::Row> = rows.iter().take(4).collect();
    let how = Binning {
        max_len: 512,
        attention: 1e-3,
    };
    assert!(
        collate_binned(&refs, 0, how).binned,
        "the test rows must be placed together"
    );
    for (dir, quant) in [
        ("tiny_llama/model", QuantMode::None),
        ("tiny_llama/model", QuantMode::Nf4),
    ] {
        let model = load_model(dir, quant);
        for (checkpointing, dropout, accum) in [(false, 0.0, 1), (true, 0.2, 2), (false, 0.2, 1)] {
            let c = Case {
                world: 1,
                batch: 4,
                accum,
                checkpointing,
                dropout,
                ..BASE
            };
            let run = |binning: Binning| {
                let mut t = fixture_trainer(&model, cfg(&c, c.batch), uneven_rows(c.rows), vec![])
                    .with_binning(binning);
                run_to_end(&mut t)
            };
            let padded = run(Binning::default());
            let placed = run(how);
            assert_ranks_reproduce(&(dir, quant, c), &padded, &[placed]);
        }
    }
}
