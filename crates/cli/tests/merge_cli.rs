//! `qlora merge` end to end, running the built binary: the merged folder and the
//! `--requantize` report of what 4-bit requantization costs in logits.

mod common;
use common::{fixtures, qlora_run as qlora};

/// The number after `key` in `line` (e.g. "max |Δlogit| 1.2e-3").
fn number_after(line: &str, key: &str) -> f64 {
    let rest = &line[line
        .find(key)
        .unwrap_or_else(|| panic!("`{key}` in {line}"))
        + key.len()..];
    rest.split_whitespace()
        .next()
        .unwrap()
        .trim_end_matches([',', ';'])
        .parse()
        .unwrap()
}

#[test]
fn requantize_reports_the_logit_error_it_adds() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("merged-nf4");
    let (ok, stdout, stderr) = qlora(&[
        "merge",
        "--model",
        fixtures().join("tiny_llama/model").to_str().unwrap(),
        "--adapter",
        fixtures()
            .join("tiny_lora_adapter/adapter")
            .to_str()
            .unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--requantize",
        "nf4",
    ]);
    assert!(ok, "merge failed:\n{stdout}\n{stderr}");
    assert!(out.join("model.safetensors").is_file());
    assert!(out.join("config.json").is_file());
    let line = |prefix: &str| {
        stdout
            .lines()
            .find(|l| l.trim_start().starts_with(prefix))
            .unwrap_or_else(|| panic!("no `{prefix}` line in:\n{stdout}"))
            .to_string()
    };
    let requant = line("logits of the requantized merged model");
    let mean = number_after(&requant, "mean");
    let rms = number_after(&requant, "RMS");
    let ref_rms = number_after(&requant, "(source logits RMS");
    // Before requantizing, the merge is exact up to f32 rounding.
    let merged_max = number_after(&line("merged before requantizing"), "max |Δlogit|");
    assert!(
        merged_max < 1e-4,
        "merged f32 model vs base + adapter: {merged_max}"
    );
    // Requantizing adds a real, bounded error: one NF4 rounding of every weight
    // (≈9% relative RMS per weight) moves the logits by a fraction of their scale...
    assert!(mean > 10.0 * merged_max.max(1e-7), "{requant}");
    assert!(rms < 0.5 * ref_rms, "{requant}");
    // ...of the same size as the 4-bit base the adapter was trained on: both are
    // one NF4 rounding of nearly the same weights.
    let trained = line("for scale, the 4-bit base + adapter");
    let trained_mean = number_after(&trained, "mean |Δlogit|");
    assert!(
        mean < 2.0 * trained_mean && mean > 0.5 * trained_mean,
        "requantized {mean} vs trained-as {trained_mean}"
    );
}

/// A .gguf base (trained with `--quant native` by default) is merged by `export-gguf`,
/// which adds the adapter to the file's own dequantized weights: `merge` says so.
#[test]
fn merge_of_a_gguf_base_points_to_export_gguf() {
    let Some(g) = common::demo_gguf() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let adapter = fixtures().join("tiny_lora_adapter/adapter");
    let (ok, _, err) = qlora(&[
        "merge",
        "--model",
        g.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(
        err.contains("qlora export-gguf") && err.contains("--quant native"),
        "{err}"
    );
}
