//! `qlora tokenize --model <ref> (--text STR | --file F) [--chat] [--json]`: the token ids
//! the model's tokenizer gives (what training and generation feed the model).

use std::path::PathBuf;

use anyhow::{Context, Result};
use qlora_formats::ModelRef;
use qlora_tokenizer::Tokenizer;

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["text", "file"])))]
pub struct Args {
    /// Model: an HF folder, a .gguf file, or a hub id already in the local Hugging Face cache.
    #[arg(long)]
    pub model: String,
    /// The text to tokenize.
    #[arg(long)]
    pub text: Option<String>,
    /// Read the text from this file (UTF-8, used as it is, newlines included).
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// Render with the model's chat template first: the input is a JSON list of
    /// {"role","content"} messages (or {"messages": [...]}), else one user message.
    #[arg(long)]
    pub chat: bool,
    /// Print {"ids": [...]} instead of space-separated ids.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let text = match (&a.text, &a.file) {
        (Some(t), _) => t.clone(),
        (None, Some(f)) => {
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?
        }
        (None, None) => unreachable!("clap requires --text or --file"),
    };
    let tok = Tokenizer::for_model(&ModelRef::resolve(&a.model, false)?)?;
    let ids = tok.tokenize_input(&text, a.chat)?;
    if a.json {
        println!("{}", serde_json::json!({ "ids": ids }));
    } else {
        let s: Vec<String> = ids.iter().map(u32::to_string).collect();
        println!("{}", s.join(" "));
    }
    Ok(())
}
