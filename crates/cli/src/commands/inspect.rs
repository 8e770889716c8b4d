//! `qlora inspect <config.json | model dir>`: the parsed configuration.

use std::path::PathBuf;

use anyhow::{Context, Result};

#[derive(clap::Args)]
pub struct Args {
    /// A model folder or its config.json.
    pub model: PathBuf,
}

pub fn run(a: Args) -> Result<()> {
    let path = if a.model.is_dir() {
        a.model.join("config.json")
    } else {
        a.model.clone()
    };
    let cfg = qlora_config::ModelConfig::from_file(&path)
        .with_context(|| format!("reading the configuration of {}", a.model.display()))?;
    println!("{cfg:#?}");
    Ok(())
}
