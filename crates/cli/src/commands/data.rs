//! `qlora data`: dataset helpers. `qlora data chatterbot <dir> --out f.jsonl`
//! converts the chatterbot-corpus YAML conversations (unpacked wheel, see
//! `scripts/fetch-demo.sh chatterbot`) into chat JSONL for `qlora train`.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Subcommand;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    cmd: DataCmd,
}

#[derive(Subcommand, Debug)]
enum DataCmd {
    /// chatterbot-corpus YAML folder -> chat JSONL (`{"messages": [...]}` per line).
    Chatterbot {
        /// Folder holding the YAML files (the unpacked wheel or its data/ folder).
        dir: PathBuf,
        /// Output JSONL file.
        #[arg(long)]
        out: PathBuf,
        /// Languages (sub-folder names) to include, comma separated; empty = all.
        #[arg(long, default_value = "english")]
        lang: String,
        /// Overwrite an existing output file.
        #[arg(long)]
        force: bool,
    },
}

pub fn run(args: Args) -> Result<()> {
    match args.cmd {
        DataCmd::Chatterbot {
            dir,
            out,
            lang,
            force,
        } => {
            if out.exists() && !force {
                bail!("{} exists (use --force to overwrite)", out.display());
            }
            let langs: Vec<String> = lang
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect();
            let c = qlora_data::chatterbot::convert_dir(&dir, &langs)?;
            for s in &c.skipped {
                eprintln!("skipped: {s}");
            }
            let mut text = String::new();
            for r in &c.records {
                text.push_str(&r.to_string());
                text.push('\n');
            }
            qlora_formats::write_atomic(&out, text.as_bytes())?;
            println!(
                "{} conversations from {} files -> {} ({} skipped)",
                c.records.len(),
                c.files,
                out.display(),
                c.skipped.len()
            );
            Ok(())
        }
    }
}
