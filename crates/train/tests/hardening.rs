//! The trainer never trains on, or writes, non-finite numbers: settings are
//! validated up front, an update that makes a parameter or moment inf/NaN
//! stops the run naming the step, a checkpoint with non-finite state is never
//! written, and evaluation refuses a non-finite loss.

mod common;
use common::{ident, reference_cfg};
use qlora_data::rows::Row;
use qlora_data::Example;
use qlora_lora::load_adapter;
use qlora_model::{LoadOptions, Model, QuantMode};
use qlora_testutil::fixtures as fx;
use qlora_train::{AdamW, TrainConfig, Trainer};

fn rows() -> Vec<Row> {
    (0..4u32)
        .map(|r| {
            Row::single(Example::unmasked(
                (0..8).map(|i| (r * 31 + i * 7) % 300 + 3).collect(),
            ))
        })
        .collect()
}

#[test]
fn settings_are_validated() {
    let ok = reference_cfg(3);
    ok.validate().unwrap();
    let bad: Vec<(TrainConfig, &str)> = vec![
        (
            TrainConfig {
                adamw: AdamW {
                    eps: 0.0,
                    ..AdamW::default()
                },
                ..reference_cfg(3)
            },
            "eps",
        ),
        (
            TrainConfig {
                adamw: AdamW {
                    beta1: 1.0,
                    ..AdamW::default()
                },
                ..reference_cfg(3)
            },
            "beta1",
        ),
        (
            TrainConfig {
                adamw: AdamW {
                    beta2: f64::NAN,
                    ..AdamW::default()
                },
                ..reference_cfg(3)
            },
            "beta2",
        ),
        (
            TrainConfig {
                adamw: AdamW {
                    weight_decay: -1.0,
                    ..AdamW::default()
                },
                ..reference_cfg(3)
            },
            "weight decay",
        ),
        (
            TrainConfig {
                lr: 1e300,
                ..reference_cfg(3)
            },
            "learning rate",
        ),
        (
            TrainConfig {
                lr: f64::INFINITY,
                ..reference_cfg(3)
            },
            "learning rate",
        ),
        (
            TrainConfig {
                max_grad_norm: Some(f64::NAN),
                ..reference_cfg(3)
            },
            "grad norm",
        ),
        (
            TrainConfig {
                lora_dropout: 1.0,
                ..reference_cfg(3)
            },
            "dropout",
        ),
        (
            TrainConfig {
                max_steps: 0,
                ..reference_cfg(3)
            },
            "steps",
        ),
        (
            TrainConfig {
                batch_size: 0,
                ..reference_cfg(3)
            },
            "batch size",
        ),
    ];
    for (c, want) in bad {
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains(want), "{want}: {e}");
    }
    let s = qlora_train::RunSettings {
        max_seq_len: Some(1),
        ..Default::default()
    };
    assert!(s
        .validate()
        .unwrap_err()
        .to_string()
        .contains("--max-seq-len"));
    for s in [
        qlora_train::RunSettings {
            epochs: Some(0.0),
            ..Default::default()
        },
        qlora_train::RunSettings {
            eval_split: Some(1.0),
            ..Default::default()
        },
        qlora_train::RunSettings {
            rank: Some(0),
            ..Default::default()
        },
        qlora_train::RunSettings {
            lora_dropout: Some(1.0),
            ..Default::default()
        },
    ] {
        assert!(s.validate().is_err(), "{s:?}");
    }
}

#[test]
fn a_non_finite_update_stops_the_run_and_is_never_checkpointed() {
    let model = Model::from_folder(
        fx().join("tiny_llama/model"),
        &LoadOptions {
            quant: QuantMode::None,
        },
    )
    .unwrap();
    let (peft, ad) =
        load_adapter(fx().join("tiny_lora_adapter/adapter"), Some(&model.config)).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    // a good step and checkpoint first
    let mut t = Trainer::new(
        &model,
        reference_cfg(3),
        ident(),
        peft.clone(),
        ad.clone(),
        rows(),
        rows(),
    )
    .unwrap();
    t.train_step().unwrap();
    t.check_finite().unwrap();
    t.save_checkpoint(&tmp.path().join("checkpoint-1")).unwrap();
    // 1 - lr·wd overflows f32: every parameter becomes inf/NaN in step 1
    let c = TrainConfig {
        lr: 1e38,
        adamw: AdamW {
            weight_decay: 10.0,
            ..AdamW::default()
        },
        ..reference_cfg(3)
    };
    let mut t = Trainer::new(&model, c, ident(), peft.clone(), ad.clone(), rows(), rows()).unwrap();
    let before = t.adapter.layers["model.layers.0.self_attn.q_proj"]
        .a
        .clone();
    let e = format!("{:#}", t.train_step().unwrap_err());
    assert!(e.contains("non-finite update at step 1"), "{e}");
    assert_eq!(t.step, 0);
    // the adapter the run would write is untouched; a checkpoint is refused
    assert_eq!(
        t.adapter.layers["model.layers.0.self_attn.q_proj"].a,
        before
    );
    let e = format!(
        "{:#}",
        t.save_checkpoint(&tmp.path().join("checkpoint-x"))
            .unwrap_err()
    );
    assert!(
        e.contains("refusing to write checkpoint") && e.contains("is "),
        "{e}"
    );
    assert!(!tmp.path().join("checkpoint-x").exists());
    // evaluation with a NaN adapter: an error, not a NaN loss
    let mut bad = ad.clone();
    let w = bad.layers.get_mut("model.layers.1.mlp.down_proj").unwrap();
    w.b.data_mut().iter_mut().for_each(|x| *x *= f32::NAN);
    let e = qlora_train::evaluate_rows(&model, Some(&bad), &rows(), 2, 0).unwrap_err();
    assert!(e.to_string().contains("not finite"), "{e}");
}

#[test]
fn resume_refuses_a_different_adapter() {
    let model = Model::from_folder(
        fx().join("tiny_llama/model"),
        &LoadOptions {
            quant: QuantMode::None,
        },
    )
    .unwrap();
    let (peft, ad) =
        load_adapter(fx().join("tiny_lora_adapter/adapter"), Some(&model.config)).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mut t = Trainer::new(
        &model,
        reference_cfg(3),
        ident(),
        peft.clone(),
        ad,
        rows(),
        vec![],
    )
    .unwrap();
    t.train_step().unwrap();
    let ck = tmp.path().join("checkpoint-1");
    t.save_checkpoint(&ck).unwrap();
    let r = Trainer::resume(&model, reference_cfg(3), ident(), rows(), vec![], &ck).unwrap();
    r.check_same_adapter(&peft).unwrap();
    let mut other = peft.clone();
    other.r += 1;
    other.lora_alpha *= 2.0;
    let e = r.check_same_adapter(&other).unwrap_err().to_string();
    assert!(e.contains("rank: checkpoint") && e.contains("alpha"), "{e}");
    let mut other = peft.clone();
    other.target_modules = qlora_lora::TargetModules::List(vec!["q_proj".into()]);
    let e = r.check_same_adapter(&other).unwrap_err().to_string();
    assert!(e.contains("target modules"), "{e}");
}
