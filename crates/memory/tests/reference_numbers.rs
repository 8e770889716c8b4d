//! The calculator against published / measured numbers: FORMATS.md §6.6
//! (parameter counts), §2.4 (NF4+DQ checkpoint bytes), §3.5 (LoRA counts)
//! and the real checkpoints of `shared/fixtures` (memory.json).

use qlora_config::ModelConfig;
use qlora_memory::bnb::{self, Bnb4, QuantType};
use qlora_memory::inventory::{formula_params, Inventory};
use qlora_memory::plan::lora_params;
use qlora_memory::presets;
use qlora_memory::size;
use qlora_quant::DType;
use serde_json::Value;

fn preset(name: &str) -> ModelConfig {
    presets::find(name)
        .unwrap_or_else(|| panic!("preset {name}"))
        .config()
}

/// FORMATS.md §6.6: (preset, total, quantizable linear, one embedding matrix).
const TABLE_6_6: [(&str, u64, u64, u64); 12] = [
    ("llama-2-7b", 6_738_415_616, 6_476_005_376, 131_072_000),
    ("llama-2-13b", 13_015_864_320, 12_687_769_600, 163_840_000),
    ("llama-2-70b", 68_976_648_192, 68_451_041_280, 262_144_000),
    ("llama-3-8b", 8_030_261_248, 6_979_321_856, 525_336_576),
    ("llama-3-70b", 70_553_706_496, 68_451_041_280, 1_050_673_152),
    ("mistral-7b", 7_241_732_096, 6_979_321_856, 131_072_000),
    ("tinyllama-1.1b", 1_100_048_384, 968_884_224, 65_536_000),
    ("smollm2-135m", 134_515_008, 106_168_320, 28_311_552),
    ("smollm2-360m", 361_821_120, 314_572_800, 47_185_920),
    ("smollm2-1.7b", 1_711_376_384, 1_610_612_736, 100_663_296),
    ("qwen2.5-0.5b", 494_032_768, 357_826_560, 136_134_656),
    ("qwen2.5-7b", 7_615_616_512, 6_525_288_448, 544_997_376),
];

#[test]
fn params_match_formats_6_6_every_row() {
    for (name, total, quantizable, embed) in TABLE_6_6 {
        let cfg = preset(name);
        let inv = Inventory::from_config(&cfg);
        assert_eq!(inv.total_params(), total, "{name} total");
        assert_eq!(formula_params(&cfg), total, "{name} formula");
        assert_eq!(inv.quantizable_params(), quantizable, "{name} quantizable");
        assert_eq!(
            inv.quantizable().count() as u64,
            7 * cfg.num_hidden_layers as u64,
            "{name} linear count"
        );
        assert_eq!(
            inv.params_by_role(qlora_memory::Role::Embeddings),
            embed,
            "{name} embed"
        );
        let head = inv.params_by_role(qlora_memory::Role::LmHead);
        assert_eq!(head, if cfg.tie_word_embeddings { 0 } else { embed });
        let bf16 = size::size_report(&inv, name, "preset", &Default::default(), None);
        assert_eq!(bf16.bytes["bf16"], 2 * total);
        assert_eq!(bf16.bytes["f32"], 4 * total);
    }
}

/// FORMATS.md §2.4: NF4+DQ (bs 64, uint8, bf16 rest) tensor bytes, JSON blobs excluded.
#[test]
fn nf4_dq_tensor_bytes_match_formats_2_4_every_row() {
    let rows: [(&str, u64); 11] = [
        ("llama-3-8b", 5_702_539_264),
        ("llama-3-70b", 39_517_719_552),
        ("llama-2-7b", 3_865_835_520),
        ("llama-2-13b", 7_201_722_880),
        ("llama-2-70b", 36_363_602_944),
        ("mistral-7b", 4_125_480_960),
        ("tinyllama-1.1b", 762_313_344),
        ("smollm2-135m", 111_691_056),
        ("smollm2-360m", 257_019_008),
        ("smollm2-1.7b", 1_032_575_488),
        ("qwen2.5-0.5b", 457_186_880),
    ];
    let f = Bnb4::new(QuantType::Nf4, 64, true);
    for (name, want) in rows.into_iter().chain([("qwen2.5-7b", 5_547_064_320)]) {
        let inv = Inventory::from_config(&preset(name));
        let fs = size::bnb4(&inv, &f, DType::BF16);
        assert_eq!(fs.bytes - fs.json_bytes, want, "{name}");
        // The JSON blobs are one per quantized linear, ~170-200 bytes each.
        let n = inv.quantizable().count() as u64;
        assert!(fs.json_bytes > 170 * n && fs.json_bytes < 200 * n, "{name}");
        assert!(!fs.exact, "offsets are unknown from a config");
    }
}

#[test]
fn bnb_bytes_per_param_match_formats_1_5() {
    // 4.127 bits/param with DQ, 4.5 without (bs 64), for a large tensor.
    let n = 64 * 256 * 1000;
    let dq = bnb::parts(n, &Bnb4::new(QuantType::Nf4, 64, true));
    let plain = bnb::parts(n, &Bnb4::new(QuantType::Fp4, 64, false));
    assert_eq!(plain.total(), n / 2 + 4 * n / 64 + 64);
    assert_eq!(dq.total(), n / 2 + n / 64 + 4 * n / (64 * 256) + 1024 + 64);
    let bits = (dq.total() - 1088) as f64 * 8.0 / n as f64;
    assert!((bits - 4.127).abs() < 1e-3, "{bits}");
}

/// FORMATS.md §3.5.
#[test]
fn lora_counts_match_formats_3_5_every_row() {
    let all: Vec<String> = qlora_memory::plan::ALL_TARGETS
        .iter()
        .map(|s| s.to_string())
        .collect();
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let fq_all = s(&[
        "k_proj",
        "q_proj",
        "v_proj",
        "up_proj",
        "down_proj",
        "gate_proj",
    ]);
    let cases: Vec<(&str, u64, Vec<String>, u64)> = vec![
        ("llama-2-7b", 8, s(&["q_proj", "v_proj"]), 4_194_304),
        ("llama-2-7b", 64, all.clone(), 159_907_840),
        ("llama-2-7b", 64, fq_all.clone(), 143_130_624),
        ("llama-2-70b", 64, fq_all, 744_488_960),
        ("llama-2-70b", 8, all.clone(), 103_546_880),
        ("llama-3-8b", 16, all.clone(), 41_943_040),
        ("llama-3.1-8b", 32, all.clone(), 83_886_080),
        ("tinyllama-1.1b", 8, all.clone(), 6_307_840),
        ("smollm2-135m", 8, all, 2_442_240),
    ];
    for (name, r, targets, want) in cases {
        assert_eq!(
            lora_params(&preset(name), r, &targets).unwrap(),
            want,
            "{name} r={r}"
        );
    }
    // PEFT's "all params" print for Llama-2-7B r=8 q,v.
    assert_eq!(
        Inventory::from_config(&preset("llama-2-7b")).total_params() + 4_194_304,
        6_742_609_920
    );
}

#[test]
fn llama_3_1_405b_preset() {
    let cfg = preset("Llama-3.1-405B");
    let inv = Inventory::from_config(&cfg);
    assert_eq!(inv.total_params(), formula_params(&cfg));
    // Derived from V 128256, h 16384, I 53248, L 126, a 128, kv 8 (§6.1
    // formula); consistent with the "405B" name.
    assert_eq!(inv.total_params(), 405_853_388_800);
}

fn memory_json() -> Value {
    let t = std::fs::read_to_string(qlora_testutil::fixture("memory/memory.json")).unwrap();
    serde_json::from_str(&t).unwrap()
}

#[test]
fn tiny_llama_counts_match_memory_json() {
    let m = memory_json();
    let cfg =
        ModelConfig::from_file(qlora_testutil::fixture("tiny_llama/model/config.json")).unwrap();
    let inv = Inventory::from_config(&cfg);
    assert_eq!(inv.total_params(), m["total_params"].as_u64().unwrap());
    assert_eq!(
        inv.quantizable_params(),
        m["quantizable_linear_params"].as_u64().unwrap()
    );
    assert_eq!(
        inv.quantizable().count() as u64,
        m["quantizable_linear_modules"].as_u64().unwrap()
    );
    let per_type = m["params_per_module_type"].as_object().unwrap();
    for (ty, want) in per_type {
        let got: u64 = inv
            .tensors
            .iter()
            .filter(|t| {
                let stem = t.name.strip_suffix(".weight").unwrap();
                stem.rsplit('.').next() == Some(ty.as_str())
            })
            .map(|t| t.numel())
            .sum();
        assert_eq!(got, want.as_u64().unwrap(), "{ty}");
    }
    let lora = &m["lora"];
    let targets: Vec<String> = lora["target_modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let n = lora_params(&cfg, lora["r"].as_u64().unwrap(), &targets).unwrap();
    assert_eq!(n, lora["trainable_params"].as_u64().unwrap());
    assert_eq!(4 * n, lora["f32_bytes"].as_u64().unwrap());
}

/// Per-module bytes of the real bnb checkpoint = formula + that module's JSON length.
#[test]
fn bnb4_per_module_bytes_match_memory_json() {
    let m = memory_json();
    let ck = &m["bnb4_checkpoint"];
    let tensors = ck["tensors"].as_object().unwrap();
    let f = Bnb4::new(QuantType::Nf4, 64, true);
    let mut quantized_total = 0;
    for (module, want) in ck["bytes_per_quantized_module"].as_object().unwrap() {
        let w = &tensors[&format!("{module}.weight.quant_state.bitsandbytes__nf4")];
        let json = w["nbytes"].as_u64().unwrap();
        let shape: Vec<u64> = tensors[&format!("{module}.weight")]["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        let n = shape[0] * 2; // packed [n/2, 1]
        let got = bnb::parts(n, &f).total() + json;
        assert_eq!(got, want.as_u64().unwrap(), "{module}");
        quantized_total += got;
    }
    assert_eq!(
        quantized_total,
        ck["quantized_bytes_total"].as_u64().unwrap()
    );
}

/// From the config alone, with the offsets the checkpoint recorded, the
/// predicted checkpoint is exact to the byte: tensor bytes, header and file.
#[test]
fn bnb4_checkpoint_predicted_to_the_byte() {
    let m = memory_json();
    let ck = &m["bnb4_checkpoint"];
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(qlora_testutil::fixture("tiny_llama_bnb4/reference.json"))
            .unwrap(),
    )
    .unwrap();
    let cfg =
        ModelConfig::from_file(qlora_testutil::fixture("tiny_llama/model/config.json")).unwrap();
    let mut inv = Inventory::from_config(&cfg);
    let f = Bnb4::new(QuantType::Nf4, 64, true);
    // Our JSON template reproduces each blob exactly.
    for (module, blob) in reference["quant_state_json"].as_object().unwrap() {
        let blob = blob.as_str().unwrap();
        let t = inv
            .tensors
            .iter_mut()
            .find(|t| t.name == format!("{module}.weight"))
            .unwrap();
        // Parse the text with Rust's exact parser (serde_json's default float
        // parsing is not correctly rounded).
        let text = blob.split_once("\"nested_offset\": ").unwrap().1;
        let offset: f64 = text.trim_end_matches('}').parse().unwrap();
        let repr = bnb::python_float_repr(offset);
        let shape = [t.shape[0], t.shape[1]];
        assert_eq!(bnb::quant_state_json(&f, shape, "float32", &repr), blob);
        t.known = Some(qlora_memory::inventory::KnownQuantState {
            dtype: "float32".into(),
            blocksize: 64,
            offset_repr: Some(repr),
        });
    }
    let fs = size::bnb4(&inv, &f, DType::F32);
    assert!(fs.exact);
    assert_eq!(fs.bytes, ck["total_tensor_bytes"].as_u64().unwrap());
    assert_eq!(fs.file_bytes, Some(ck["file_size"].as_u64().unwrap()));
    let (entries, _) = size::bnb4_entries(&inv, &f, DType::F32);
    assert_eq!(
        qlora_memory::st::header_json_len(&entries),
        ck["header_json_bytes"].as_u64().unwrap()
    );
    // Without the offsets: estimated JSON, within the stated uncertainty.
    let est = size::bnb4(&Inventory::from_config(&cfg), &f, DType::F32);
    assert!(!est.exact);
    let slack = bnb::OFFSET_REPR_UNCERTAINTY * 14;
    assert!(
        est.bytes.abs_diff(fs.bytes) <= slack,
        "{} vs {}",
        est.bytes,
        fs.bytes
    );
}

/// Sizing the real files from their headers reproduces their exact sizes.
#[test]
fn sizes_from_real_checkpoint_headers() {
    let m = memory_json();
    let bnb_file = qlora_testutil::fixture_str("tiny_llama_bnb4/model/model.safetensors");
    let l = qlora_memory::resolve(&bnb_file).unwrap();
    let stored = l.stored.clone().unwrap();
    assert_eq!(stored.file_bytes, 237_283);
    assert_eq!(
        stored.tensor_bytes,
        m["bnb4_checkpoint"]["total_tensor_bytes"].as_u64().unwrap()
    );
    assert_eq!(l.inventory.total_params(), 127_296);
    assert_eq!(l.inventory.quantizable().count(), 14);
    let f = Bnb4::new(QuantType::Nf4, 64, true);
    let fs = size::bnb4(&l.inventory, &f, DType::F32);
    assert!(fs.exact, "offsets come from the file");
    assert_eq!(fs.file_bytes, Some(237_283));
    // The file's offsets are means of 64-blocks: a 128-block size is an estimate.
    let f128 = Bnb4::new(QuantType::Fp4, 128, true);
    assert!(!size::bnb4(&l.inventory, &f128, DType::F32).exact);
    assert!(
        size::bnb4(
            &l.inventory,
            &Bnb4::new(QuantType::Fp4, 64, true),
            DType::F32
        )
        .exact
    );

    let f32_file = qlora_testutil::fixture_str("tiny_llama/model/model.safetensors");
    let l = qlora_memory::resolve(&f32_file).unwrap();
    assert_eq!(l.inventory.total_params(), 127_296);
    assert_eq!(l.stored.as_ref().unwrap().file_bytes, 511_328);
    let r = size::size_report(&l.inventory, "t", "safetensors", &Default::default(), None);
    assert_eq!(r.formats["f32"].file_bytes, Some(511_328));
    assert_eq!(r.bytes["f32"], m["f32_bytes"].as_u64().unwrap());
    assert_eq!(r.bytes["bf16"], m["bf16_bytes"].as_u64().unwrap());

    // A model folder: config for the architecture, headers for what is stored.
    let dir = qlora_testutil::fixture_str("tiny_llama_bnb4/model");
    let l = qlora_memory::resolve(&dir).unwrap();
    assert_eq!(l.kind, "config");
    assert_eq!(l.stored.unwrap().file_bytes, 237_283);
    let fs = size::bnb4(&l.inventory, &f, DType::F32);
    assert_eq!(fs.file_bytes, Some(237_283));
}

#[test]
fn python_float_repr_matches_python() {
    for (x, s) in [
        (1e-5, "1e-05"),
        (0.0001, "0.0001"),
        (1e16, "1e+16"),
        (1234567890123456.0, "1234567890123456.0"),
        (0.1, "0.1"),
        (2.0, "2.0"),
        (-0.5, "-0.5"),
        (1.5e-7, "1.5e-07"),
        (123.456, "123.456"),
        (0.051685333251953125, "0.051685333251953125"),
        (2.996799945831299, "2.996799945831299"),
    ] {
        assert_eq!(bnb::python_float_repr(x), s, "{x}");
    }
    // Every offset in the fixture prints back as Python printed it.
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(qlora_testutil::fixture("tiny_llama_bnb4/reference.json"))
            .unwrap(),
    )
    .unwrap();
    for blob in reference["quant_state_json"].as_object().unwrap().values() {
        let blob = blob.as_str().unwrap();
        let text = blob.split_once("\"nested_offset\": ").unwrap().1;
        let text = text.trim_end_matches('}');
        let x: f64 = text.parse().unwrap();
        assert_eq!(bnb::python_float_repr(x), text);
    }
}
