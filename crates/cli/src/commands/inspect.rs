//! `qlora inspect <config.json | model dir>`: the parsed configuration.

use std::path::PathBuf;

use anyhow::{Context, Result};

#[derive(clap::Args)]
pub struct Args {
    /// A model folder or its config.json.
    pub model: PathBuf,
}

pub fn run(a: Args) -> Result<()> {
    // A folder's config.json; any other file is read as a config (and refused by the parser).
    let how = qlora_formats::model_ref::Resolve::new(false);
    let r = qlora_formats::ModelRef::resolve_with(&a.model.to_string_lossy(), &how)?;
    let path = r.config_path().unwrap_or_else(|| r.path().to_path_buf());
    let cfg = qlora_config::ModelConfig::from_file(&path)
        .with_context(|| format!("reading the configuration of {}", a.model.display()))?;
    println!("{cfg:#?}");
    Ok(())
}
