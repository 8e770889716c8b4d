//! `--config file.toml`: a TOML file holding any of a command's options (same names,
//! `-` or `_`); what the command line sets wins over the file.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use serde::{de::DeserializeOwned, Serialize};

/// The options of `file` (if any) under those the command line set: a set option or a
/// `true` switch on the command line wins; the rest come from the file.
pub fn overlay<A: Serialize + DeserializeOwned>(file: Option<PathBuf>, cli: A) -> Result<A> {
    let Some(path) = file else {
        return Ok(cli);
    };
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    // accept kebab-case keys too
    let table: toml::Table = text
        .parse()
        .with_context(|| format!("{}: invalid TOML", path.display()))?;
    let table: toml::Table = table
        .into_iter()
        .map(|(k, v)| (k.replace('-', "_"), v))
        .collect();
    let invalid = || format!("{}: invalid option", path.display());
    // Check the file alone first, so its errors name the file's own options.
    let _: A = toml::Value::Table(table.clone())
        .try_into()
        .with_context(invalid)?;
    let mut merged = table;
    let toml::Value::Table(given) = toml::Value::try_from(&cli).with_context(invalid)? else {
        bail!("options are not a table");
    };
    for (k, v) in given {
        if v != toml::Value::Boolean(false) {
            merged.insert(k, v);
        }
    }
    toml::Value::Table(merged).try_into().with_context(invalid)
}
