//! `qlora size` / `qlora plan` end to end (the acceptance interface).

use std::process::Command;

use serde_json::Value;

fn qlora(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_qlora"));
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    let o = c.output().expect("run qlora");
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn json(args: &[&str]) -> Value {
    let (ok, out, err) = qlora(args, &[]);
    assert!(ok, "qlora {args:?} failed: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("not one JSON object ({e}): {out}"))
}

#[test]
fn size_preset_json_has_the_interface_fields() {
    let v = json(&["size", "smollm2-135m", "--json"]);
    assert_eq!(v["total_params"].as_u64(), Some(134_515_008));
    let b = &v["bytes"];
    assert_eq!(b["f32"].as_u64(), Some(4 * 134_515_008));
    assert_eq!(b["bf16"].as_u64(), Some(2 * 134_515_008));
    for k in [
        "int8",
        "nf4",
        "nf4_dq",
        "fp4",
        "fp4_dq",
        "gguf_q4_0",
        "gguf_q8_0",
    ] {
        assert!(b[k].as_u64().is_some(), "bytes.{k} missing");
    }
    // FORMATS.md §2.4 (tensor bytes without JSON) + 210 JSON blobs of ~180 B.
    let dq = b["nf4_dq"].as_u64().unwrap();
    assert!(dq > 111_691_056 && dq < 111_691_056 + 210 * 200, "{dq}");
    assert!(b["nf4"].as_u64().unwrap() > dq, "double quant saves bytes");
    assert_eq!(b["nf4"], b["fp4"]);
}

#[test]
fn size_of_real_checkpoint_and_config() {
    let bnb = qlora_testutil::fixture_str("tiny_llama_bnb4/model/model.safetensors");
    let v = json(&["size", &bnb, "--json", "--keep", "f32"]);
    assert_eq!(v["total_params"].as_u64(), Some(127_296));
    assert_eq!(v["stored"]["file_bytes"].as_u64(), Some(237_283));
    assert_eq!(v["formats"]["nf4_dq"]["file_bytes"].as_u64(), Some(237_283));
    assert_eq!(v["formats"]["nf4_dq"]["exact"].as_bool(), Some(true));
    let cfg = qlora_testutil::fixture_str("tiny_llama/model/config.json");
    let v = json(&["size", &cfg, "--json"]);
    assert_eq!(v["total_params"].as_u64(), Some(127_296));
    assert_eq!(v["params"]["lm_head"].as_u64(), Some(20_480));
    let (ok, out, _) = qlora(&["size", &cfg], &[]);
    assert!(ok && out.contains("127,296"), "{out}");
}

#[test]
fn size_of_gguf_header() {
    use qlora_gguf::writer::GgufWriter;
    use qlora_gguf::{GgmlType, MetaValue};
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.gguf");
    let (h, i, v) = (64u64, 160u64, 320u64);
    let mut tensors = vec![
        ("token_embd.weight".to_string(), vec![h, v], GgmlType::Q8_0),
        ("output_norm.weight".to_string(), vec![h], GgmlType::F32),
    ];
    for l in 0..2 {
        for (n, dims, ty) in [
            ("attn_norm", vec![h], GgmlType::F32),
            ("ffn_norm", vec![h], GgmlType::F32),
            ("attn_q", vec![h, h], GgmlType::Q4_0),
            ("attn_k", vec![h, 32], GgmlType::Q4_0),
            ("attn_v", vec![h, 32], GgmlType::Q4_0),
            ("attn_output", vec![h, h], GgmlType::Q4_0),
            ("ffn_gate", vec![h, i], GgmlType::Q4_0),
            ("ffn_up", vec![h, i], GgmlType::Q4_0),
            ("ffn_down", vec![i, h], GgmlType::Q8_0),
        ] {
            tensors.push((format!("blk.{l}.{n}.weight"), dims, ty));
        }
    }
    let mut w = GgufWriter::new();
    w.meta("general.architecture", MetaValue::String("llama".into()))
        .meta("llama.block_count", MetaValue::U32(2))
        .meta("llama.embedding_length", MetaValue::U32(64))
        .meta("llama.feed_forward_length", MetaValue::U32(160))
        .meta("llama.attention.head_count", MetaValue::U32(4))
        .meta("llama.attention.head_count_kv", MetaValue::U32(2))
        .meta(
            "llama.attention.layer_norm_rms_epsilon",
            MetaValue::F32(1e-5),
        );
    for (n, dims, ty) in &tensors {
        let bytes = ty.bytes_for(dims.iter().product()).unwrap();
        w.tensor(n, dims, *ty, vec![0u8; bytes as usize]);
    }
    w.write(&p).unwrap();
    let v = json(&["size", p.to_str().unwrap(), "--json"]);
    // The tiny Llama of the fixtures with a tied head: 127,296 − 20,480.
    assert_eq!(v["total_params"].as_u64(), Some(106_816));
    assert_eq!(v["tied_embeddings"].as_bool(), Some(true));
    // q4_0: 18 B per 32; q8_0: 34 B per 32; f32 norms.
    let q4 = 2 * (64 * 64 * 2 + 64 * 32 * 2 + 64 * 160 * 2) / 32 * 18;
    let q8 = (64 * 320 + 2 * 160 * 64) / 32 * 34;
    let f32b = 4 * (64 + 2 * 2 * 64);
    assert_eq!(v["stored"]["tensor_bytes"].as_u64(), Some(q4 + q8 + f32b));
    // The planner rebuilt the architecture from the GGUF metadata.
    let file_bytes = std::fs::metadata(&p).unwrap().len();
    let p = json(&["plan", p.to_str().unwrap(), "--quant", "nf4", "--json"]);
    assert!(p["total_bytes"].as_u64().unwrap() > 0);
    assert_eq!(p["vocab_size"].as_u64(), Some(320));
    // `qlora train --quant nf4` keeps the whole GGUF mapped while loading and rebuilds the
    // tokenizer from its metadata (174 B per vocabulary entry).
    let d = &p["per_device"];
    assert_eq!(p["input"]["load_file_bytes"].as_u64(), Some(file_bytes));
    assert_eq!(d["tokenizer"].as_u64(), Some(320 * 174));
    let frozen = d["frozen_weights"].as_u64().unwrap();
    assert!(d["load_peak"].as_u64().unwrap() > file_bytes + frozen + 320 * 174);
}

#[test]
fn unknown_preset_suggests_closest_names() {
    let (ok, _, err) = qlora(&["size", "llama-2-7", "--json"], &[]);
    assert!(!ok);
    assert!(err.contains("llama-2-7b"), "{err}");
    let (ok, _, err) = qlora(&["size", "mixtral-8x7b"], &[]);
    assert!(!ok && err.contains("mixture-of-experts"), "{err}");
}

#[test]
fn hub_id_offline_and_not_cached_is_a_clear_error() {
    let home = tempfile::tempdir().unwrap();
    let env = [
        ("HF_HUB_OFFLINE", "1"),
        ("HF_HOME", home.path().to_str().unwrap()),
    ];
    let (ok, _, err) = qlora(&["size", "someorg/not-a-model"], &env);
    assert!(!ok);
    assert!(
        err.contains("someorg/not-a-model") && err.contains("cache"),
        "{err}"
    );
    // A hub id of a known model falls back to its preset offline.
    let (ok, out, err) = qlora(&["size", "meta-llama/Llama-2-7b-hf", "--json"], &env);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["total_params"].as_u64(), Some(6_738_415_616));
}

#[test]
fn plan_json_and_budget_answers() {
    let v = json(&[
        "plan",
        "llama-2-70b",
        "--gpu",
        "--devices",
        "2",
        "--batch",
        "2",
        "--seq",
        "2048",
        "--checkpointing",
        "--cpu-offload",
        "--json",
    ]);
    let t = v["total_bytes"].as_u64().unwrap();
    assert_eq!(v["per_device"]["total_bytes"].as_u64(), Some(t));
    // Everything but the quant statistics is offloaded: the device holds far
    // less than the 35 GB 4-bit model.
    assert!(t < 24 << 30, "{t}");
    assert!(v["per_device"]["host_offloaded"].as_u64().unwrap() > 15 << 30);

    let v = json(&["plan", "smollm2-135m", "--budget", "24GB", "--json"]);
    let b = &v["budget"];
    assert_eq!(b["fits"].as_bool(), Some(true));
    assert!(b["margin_bytes"].as_i64().unwrap() > 0);
    assert!(b["max_batch"].as_u64().unwrap() > 1);
    assert!(b["max_seq"].as_u64().unwrap() > 512);
    assert_eq!(b["min_devices"].as_u64(), Some(1));

    let v = json(&[
        "plan",
        "llama-2-70b",
        "--gpu",
        "--budget",
        "24GB",
        "--seq",
        "2048",
        "--checkpointing",
        "--json",
    ]);
    assert_eq!(v["budget"]["fits"].as_bool(), Some(false));
    assert!(v["budget"]["min_devices"].as_u64().unwrap() >= 2);

    let (ok, out, _) = qlora(&["plan", "tinyllama-1.1b", "--budget", "2GB"], &[]);
    assert!(ok && out.contains("largest batch"), "{out}");
    let (ok, _, err) = qlora(&["plan", "tinyllama-1.1b", "--targets", "q_proj,foo"], &[]);
    assert!(!ok && err.contains("foo"), "{err}");
}

/// `--lora-dropout` as `qlora train` takes it: 0.05 by default, its buffers in
/// CPU plans only, a probability in [0, 1) or a clear error.
#[test]
fn plan_lora_dropout_flag() {
    let base = ["plan", "smollm2-135m", "--threads", "2", "--json"];
    let with = |extra: &[&str]| json(&[&base[..], extra].concat());
    let (default, off, on) = (
        with(&[]),
        with(&["--lora-dropout", "0"]),
        with(&["--lora-dropout", "0.1"]),
    );
    assert_eq!(default["input"]["lora_dropout"].as_f64(), Some(0.05));
    let buffers = |v: &Value| v["per_device"]["lora_dropout_buffers"].as_u64().unwrap();
    assert_eq!(buffers(&off), 0);
    // batch 1 x 1024: 8 row blocks of 128, down_proj's input 1536 wide, 2 threads
    assert_eq!(buffers(&default), 2 * (3 * 128 * 1536 + 1536) * 4);
    assert_eq!(buffers(&on), buffers(&default));
    assert_eq!(
        default["total_bytes"].as_u64().unwrap() - off["total_bytes"].as_u64().unwrap(),
        buffers(&default)
    );
    let gpu = |d: &str| {
        json(&[
            "plan",
            "smollm2-135m",
            "--gpu",
            "--lora-dropout",
            d,
            "--json",
        ])
    };
    assert_eq!(gpu("0")["total_bytes"], gpu("0.05")["total_bytes"]);
    for bad in ["1", "-0.1", "1.5"] {
        let (ok, _, err) = qlora(
            &["plan", "smollm2-135m", &format!("--lora-dropout={bad}")],
            &[],
        );
        assert!(
            !ok && err.contains("--lora-dropout") && err.contains("[0, 1)"),
            "{bad}: {err}"
        );
    }
}

/// A bare `--gradient-checkpointing` before the model reference does not swallow it
/// (clap would take the next word as the flag's value); `true`/`false` after the flag,
/// with or without `=`, stay its value.
#[test]
fn plan_optional_bool_flag_before_the_positional() {
    let bare = json(&["plan", "--gradient-checkpointing", "llama-2-7b", "--json"]);
    let on = json(&[
        "plan",
        "llama-2-7b",
        "--gradient-checkpointing",
        "true",
        "--json",
    ]);
    let off = json(&[
        "plan",
        "--gradient-checkpointing",
        "false",
        "llama-2-7b",
        "--json",
    ]);
    let off_eq = json(&[
        "plan",
        "--gradient-checkpointing=false",
        "llama-2-7b",
        "--json",
    ]);
    assert_eq!(bare, on);
    assert_eq!(off, off_eq);
    assert_ne!(on, off);
    assert!(on["total_bytes"].as_u64() < off["total_bytes"].as_u64());
}

/// The checkpoint `qlora quantize` writes has exactly the size `qlora size`
/// predicts from the config (its layout, JSON blobs and header), for several
/// formats: with the offsets read back from the written file, to the byte.
#[test]
fn size_predicts_the_files_qlora_quantize_writes() {
    let model = qlora_testutil::fixture_str("tiny_llama/model");
    for (opts, key) in [
        (vec![], "nf4_dq"),
        (vec!["--no-double-quant"], "nf4"),
        (vec!["--quant", "fp4", "--blocksize", "128"], "fp4_bs128_dq"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("q");
        let mut args = vec!["quantize", model.as_str(), "--out", out.to_str().unwrap()];
        args.extend(opts.iter().copied());
        let (ok, _, err) = qlora(&args, &[]);
        assert!(ok, "quantize {opts:?}: {err}");
        let written = std::fs::metadata(out.join("model.safetensors"))
            .unwrap()
            .len();
        let v = json(&[
            "size",
            out.to_str().unwrap(),
            "--json",
            "--keep",
            "f32",
            "--blocksize",
            "128",
        ]);
        assert_eq!(v["stored"]["file_bytes"].as_u64(), Some(written));
        let f = &v["formats"][key];
        assert_eq!(f["exact"].as_bool(), Some(true), "{key}");
        assert_eq!(f["file_bytes"].as_u64(), Some(written), "{key} {opts:?}");
    }
}

/// A config.json without a required field: the error names the file and the
/// field, for `size` and `plan` alike.
#[test]
fn config_missing_a_field_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let src =
        std::fs::read_to_string(qlora_testutil::fixture("tiny_llama/model/config.json")).unwrap();
    let mut cfg: Value = serde_json::from_str(&src).unwrap();
    cfg.as_object_mut().unwrap().remove("num_attention_heads");
    let path = dir.path().join("config.json");
    std::fs::write(&path, cfg.to_string()).unwrap();
    for cmd in ["size", "plan"] {
        let (ok, _, err) = qlora(&[cmd, path.to_str().unwrap()], &[]);
        assert!(!ok, "{cmd} accepted a config without num_attention_heads");
        assert!(
            err.contains("config.json") && err.contains("num_attention_heads"),
            "{cmd}: {err}"
        );
    }
}

/// The budget answers are the boundaries of the plan itself: the largest
/// batch fits and one more does not; likewise the longest sequence; the
/// fewest devices fit and one fewer does not.
#[test]
fn budget_answers_are_boundaries() {
    let total = |extra: &[&str]| -> u64 {
        let mut args = vec!["plan", "tinyllama-1.1b", "--seq", "1024", "--json"];
        args.extend_from_slice(extra);
        json(&args)["total_bytes"].as_u64().unwrap()
    };
    let budget = 16u64 << 30;
    let v = json(&[
        "plan",
        "tinyllama-1.1b",
        "--seq",
        "1024",
        "--budget",
        "16GiB",
        "--json",
    ]);
    let b = &v["budget"];
    assert_eq!(
        b["margin_bytes"].as_i64().unwrap(),
        budget as i64 - v["total_bytes"].as_i64().unwrap()
    );
    let mb = b["max_batch"].as_u64().unwrap();
    assert!(mb >= 1);
    assert!(total(&["--batch", &mb.to_string()]) <= budget);
    assert!(total(&["--batch", &(mb + 1).to_string()]) > budget);
    let ms = b["max_seq"].as_u64().unwrap();
    assert!(ms >= 1);
    let at = |s: u64| {
        let s = s.to_string();
        let mut args = vec!["plan", "tinyllama-1.1b", "--seq", s.as_str(), "--json"];
        args.push("--batch");
        args.push("1");
        json(&args)["total_bytes"].as_u64().unwrap()
    };
    assert!(at(ms) <= budget && at(ms + 1) > budget, "max_seq {ms}");

    // Fewest devices: Llama-2-70B QLoRA under FSDP on 16 GiB GPUs.
    let g = [
        "plan",
        "llama-2-70b",
        "--gpu",
        "--seq",
        "2048",
        "--checkpointing",
        "--json",
    ];
    let v = json(&[&g[..], &["--budget", "16GiB"]].concat());
    let n = v["budget"]["min_devices"].as_u64().unwrap();
    assert!(n >= 2, "{n}");
    let at_n = |k: u64| {
        let k = k.to_string();
        json(&[&g[..], &["--devices", k.as_str()]].concat())["total_bytes"]
            .as_u64()
            .unwrap()
    };
    assert!(
        at_n(n) <= 16 << 30 && at_n(n - 1) > 16 << 30,
        "min_devices {n}"
    );
}

/// A safetensors file from a header JSON and a data section.
fn safetensors_bytes(header: &serde_json::Value, data: &[u8]) -> Vec<u8> {
    let h = header.to_string();
    let mut v = (h.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(h.as_bytes());
    v.extend_from_slice(data);
    v
}

/// `qlora size` and `qlora plan` read existing files with the loader's
/// validation (`qlora-formats`): every malformed safetensors / bnb file is a
/// clear error naming the file, a failing exit status, and no panic.
#[test]
fn size_and_plan_refuse_malformed_safetensors_and_bnb_files() {
    use serde_json::json;
    let tmp = tempfile::tempdir().unwrap();
    let t = |dtype: &str, shape: &[u64], off: [u64; 2]| json!({ "dtype": dtype, "shape": shape, "data_offsets": off });
    // (case, file name, bytes, what the message must say besides the file)
    let cases: Vec<(&str, &str, Vec<u8>, &[&str])> = vec![
        (
            "overlapping offsets",
            "overlap.safetensors",
            safetensors_bytes(
                &json!({ "a": t("F32", &[2], [0, 8]), "b": t("F32", &[2], [4, 12]) }),
                &[0u8; 12],
            ),
            &[],
        ),
        (
            "shape x dtype does not match the bytes",
            "mismatch.safetensors",
            safetensors_bytes(&json!({ "a": t("F32", &[4], [0, 8]) }), &[0u8; 8]),
            &[],
        ),
        (
            "u64-wrapping offsets",
            "wrap.safetensors",
            safetensors_bytes(
                &json!({ "a": t("U8", &[16], [u64::MAX - 7, 8]) }),
                &[0u8; 16],
            ),
            &[],
        ),
        (
            "a shape whose byte count wraps u64",
            "wrapshape.safetensors",
            safetensors_bytes(&json!({ "a": t("F32", &[1u64 << 62, 4], [0, 0]) }), &[]),
            &[],
        ),
    ];
    for (case, name, bytes, want) in &cases {
        let p = tmp.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        let path = p.display().to_string();
        for cmd in ["size", "plan"] {
            let (ok, out, err) = qlora(&[cmd, &path], &[]);
            assert!(!ok, "{cmd} {case}: accepted\n{out}");
            assert!(
                err.contains(&path) && want.iter().all(|w| err.contains(w)),
                "{cmd} {case}: {err}"
            );
            assert!(!err.contains("panicked"), "{cmd} {case}: {err}");
        }
    }

    // A sharded folder whose index points outside it.
    let dir = tmp.path().join("escape");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        qlora_testutil::fixture("tiny_llama/model/config.json"),
        dir.join("config.json"),
    )
    .unwrap();
    std::fs::copy(
        qlora_testutil::fixture("tiny_llama/model/model.safetensors"),
        tmp.path().join("outside.safetensors"),
    )
    .unwrap();
    let index = json!({
        "metadata": {},
        "weight_map": { "model.embed_tokens.weight": "../outside.safetensors" }
    });
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    for target in [
        dir.display().to_string(),
        dir.join("model.safetensors.index.json")
            .display()
            .to_string(),
    ] {
        for cmd in ["size", "plan"] {
            let (ok, out, err) = qlora(&[cmd, &target], &[]);
            assert!(!ok, "{cmd} ../ shard: accepted\n{out}");
            assert!(
                err.contains("model.safetensors.index.json")
                    && err.contains("../outside.safetensors"),
                "{cmd} ../ shard: {err}"
            );
            assert!(!err.contains("panicked"), "{cmd}: {err}");
        }
    }

    // A bnb-4bit checkpoint whose quant states say blocksize 0 (same length
    // JSON, so the file stays well-formed safetensors).
    let bnb = std::fs::read(qlora_testutil::fixture(
        "tiny_llama_bnb4/model/model.safetensors",
    ))
    .unwrap();
    let (from, to) = (b"\"blocksize\": 64", b"\"blocksize\":  0");
    let mut edited = bnb.clone();
    let mut n = 0;
    let mut i = 0;
    while let Some(k) = edited[i..].windows(from.len()).position(|w| w == from) {
        edited[i + k..i + k + to.len()].copy_from_slice(to);
        i += k + to.len();
        n += 1;
    }
    assert_eq!(n, 14, "the fixture's 14 quantized linears");
    let p = tmp.path().join("bs0.safetensors");
    std::fs::write(&p, &edited).unwrap();
    let path = p.display().to_string();
    for cmd in ["size", "plan"] {
        let (ok, out, err) = qlora(&[cmd, &path], &[]);
        assert!(!ok, "{cmd} blocksize 0: accepted\n{out}");
        assert!(
            err.contains(&path) && err.contains("quant_state") && err.contains("blocksize"),
            "{cmd} blocksize 0: {err}"
        );
        assert!(!err.contains("panicked"), "{cmd}: {err}");
    }
}

/// `qlora plan` of a .gguf defaults to `--quant native` and counts the frozen base at the
/// file's real size: every matrix's stored blocks (+ a 4-byte row map per llama q/k row),
/// norms as f32 (what qlora-model holds: see crates/infer/tests/native.rs), with no file
/// pages counted twice while loading. `--quant nf4` still plans the requantized base, and
/// a folder refuses `native`.
#[test]
fn plan_counts_native_gguf_weights_at_their_stored_size() {
    let Some(g) = qlora_testutil::demo_gguf() else {
        return;
    };
    let gs = g.to_str().unwrap();
    let h = qlora_gguf::GgufFile::read_header(&g).unwrap();
    let expected: u64 = h
        .tensors
        .iter()
        .map(|t| {
            if t.shape().len() == 2 {
                let qk = t.name.contains(".attn_q.") || t.name.contains(".attn_k.");
                t.n_bytes + if qk { 4 * t.shape()[0] as u64 } else { 0 }
            } else {
                4 * t.n_elements()
            }
        })
        .sum();
    let plan = |extra: &[&str]| -> Value {
        let mut args = vec!["plan", gs, "--method", "qlora", "--json"];
        args.extend_from_slice(extra);
        let (ok, out, err) = qlora(&args, &[]);
        assert!(ok, "{err}");
        serde_json::from_str::<Value>(&out).unwrap()["per_device"].clone()
    };
    let native = plan(&[]);
    assert_eq!(native, plan(&["--quant", "native"]));
    assert_eq!(native["frozen_weights"].as_u64().unwrap(), expected);
    assert_eq!(native["quant_stats"].as_u64().unwrap(), 0);
    // SmolLM2-135M Q4_1 with a Q8_0 embedding: ~95 MiB stored.
    assert!((90 << 20..100 << 20).contains(&expected), "{expected}");
    let nf4 = plan(&["--quant", "nf4"]);
    assert!(nf4["frozen_weights"].as_u64().unwrap() > expected);
    assert!(nf4["load_peak"].as_u64().unwrap() > native["load_peak"].as_u64().unwrap());
    let fx = qlora_testutil::fixture_str("tiny_llama/model");
    let (ok, _, err) = qlora(&["plan", &fx, "--quant", "native"], &[]);
    assert!(!ok && err.contains("not a .gguf file"), "{err}");
}

#[test]
fn the_plan_counts_the_f32_tile_the_products_expand() {
    use qlora_memory::plan::{
        dequant_tile_rows, DEQUANT_ROW_GROUP, DEQUANT_TILE_ELEMS, DEQUANT_TILE_MIN_ROWS,
    };
    use qlora_model::ops::linear;
    assert_eq!(DEQUANT_TILE_ELEMS as usize, linear::TILE_ELEMS);
    assert_eq!(DEQUANT_TILE_MIN_ROWS as usize, linear::TILE_MIN_ROWS);
    assert_eq!(DEQUANT_ROW_GROUP as usize, linear::T_GROUP);
    for rows in [1, 15, 16, 100, 256, 576, 1536, 5632, 14336, 128256] {
        for cols in [1, 64, 576, 2048, 5632, 14336, 1 << 20, 3 << 20] {
            assert_eq!(
                dequant_tile_rows(rows as u64, cols as u64) as usize,
                linear::tile_rows(rows, cols),
                "{rows} x {cols}"
            );
        }
    }
}
