//! `qlora eval` on every data format `qlora train` reads, with train's masking: the eval
//! loss of a chat file equals `qlora train`'s evaluation of the same rows before training
//! (LoRA B starts at zero, so that is the base model's loss). Model: the random tiny Qwen3
//! of crates/model/tests/fixtures/qwen3 with a 64-token byte-level tokenizer and a chat
//! template written here.

mod common;

use std::path::{Path, PathBuf};

use common::{eval_json as eval, qlora_run};

fn model_dir(tmp: &Path) -> PathBuf {
    let src = common::qwen3_fixture("gqa_tied");
    let dir = tmp.join("model");
    std::fs::create_dir(&dir).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    common::write_byte_tokenizer(&dir);
    let cfg = serde_json::json!({
        "eos_token": "@",
        "chat_template": "{% for m in messages %}<{{ m['role'] | upper }}>{{ m['content'] }}@{% endfor %}{% if add_generation_prompt %}<ASSISTANT>{% endif %}"
    });
    std::fs::write(dir.join("tokenizer_config.json"), cfg.to_string()).unwrap();
    dir
}

#[test]
fn eval_reads_every_train_format_with_train_masking() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_dir(tmp.path());
    let chat = tmp.path().join("chat.jsonl");
    std::fs::write(
        &chat,
        [
            r#"{"messages":[{"role":"user","content":"HI"},{"role":"assistant","content":"HELLO!"}]}"#,
            r#"{"messages":[{"role":"user","content":"2+2?"},{"role":"assistant","content":"4"},{"role":"user","content":"3*3?"},{"role":"assistant","content":"9."}]}"#,
            r#"{"messages":[{"role":"user","content":"NAME[A]FOX"},{"role":"assistant","content":"REYNARD"}]}"#,
        ]
        .join("\n"),
    )
    .unwrap();
    let e = eval(&model, &chat, &[]);
    // assistant turns only: HELLO!@ (7), 4@ + 9.@ (5), REYNARD@ (8) = 20 targets
    assert_eq!(e["tokens"], 20, "{e}");
    assert_eq!(e["rows"], 3);
    let all = eval(&model, &chat, &["--train-on-inputs"]);
    assert_eq!(
        all["tokens"].as_u64().unwrap() + 3,
        all["input_tokens"].as_u64().unwrap()
    );

    // train's evaluation of the same rows before its first step
    let out = tmp.path().join("run");
    let (ok, _, err) = qlora_run(&[
        "train",
        "--model",
        model.to_str().unwrap(),
        "--data",
        chat.to_str().unwrap(),
        "--eval-data",
        chat.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--max-steps",
        "1",
        "--quant",
        "none",
    ]);
    assert!(ok, "{err}");
    let line = err
        .lines()
        .find(|l| l.contains("eval before training: loss"))
        .unwrap_or_else(|| panic!("no initial eval in:\n{err}"));
    let train_loss: f64 = line
        .split("loss ")
        .nth(1)
        .unwrap()
        .split(',')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let eval_loss = e["loss"].as_f64().unwrap();
    eprintln!("eval {eval_loss} vs train's initial eval {train_loss}");
    assert!(
        (eval_loss - train_loss).abs() <= 5e-5,
        "{eval_loss} vs {train_loss}"
    );

    // the other formats: trained-on parts only, EOS appended
    for (name, rec, targets) in [
        (
            "alpaca",
            r#"{"instruction":"ADD","input":"2+2","output":"4"}"#,
            2,
        ),
        ("pc", r#"{"prompt":"Q:","completion":"A!"}"#, 3),
        ("text", r#"{"text":"ABCDEF"}"#, 6),
        (
            "pre",
            r#"{"input_ids":[5,6,7,8],"labels":[-100,-100,7,8]}"#,
            2,
        ),
    ] {
        let f = tmp.path().join(format!("{name}.jsonl"));
        std::fs::write(&f, rec).unwrap();
        let v = eval(&model, &f, &[]);
        assert_eq!(v["tokens"], targets, "{name}: {v}");
        assert!(v["loss"].as_f64().unwrap().is_finite());
    }
    // --max-seq-len truncates as train does
    let f = tmp.path().join("long.jsonl");
    std::fs::write(&f, r#"{"text":"ABCDEFGHIJKLMNOP"}"#).unwrap();
    assert_eq!(eval(&model, &f, &["--max-seq-len", "8"])["input_tokens"], 8);
}
