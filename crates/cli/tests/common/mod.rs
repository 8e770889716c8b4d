//! Helpers shared by the CLI integration tests (each test file is its own crate
//! and uses a subset, hence the `dead_code` allowance).
#![allow(dead_code, unused_imports)]

pub use qlora_testutil::demo_gguf;
pub use qlora_testutil::fixtures;
use std::process::Command;

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
