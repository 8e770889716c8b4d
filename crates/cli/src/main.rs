//! `qlora`: fine-tune Llama-family models with QLoRA on the hardware you have.
//!
//! Each subcommand lives in its own module under `commands/` with its clap
//! `Args` struct and a `run` function that calls the library crates and prints; this
//! file only dispatches. Command modules never import each other: what two of them
//! share is in a library crate, or (presentation only) in a module beside `commands/`.

use clap::{Parser, Subcommand};

mod commands;
mod config_file;
mod flags;
mod plot;
mod report;
mod text;
mod train_view;

#[derive(Parser)]
#[command(
    name = "qlora",
    version,
    about = "QLoRA fine-tuning, 4-bit quantization and memory planning for Llama-family models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show a model's configuration as qlora understands it.
    Inspect(commands::inspect::Args),
    /// Mean next-token loss and perplexity of a model (+ adapter) on a data file in any format train reads.
    Eval(commands::eval::Args),
    /// Generate text from a model (+ adapter) with a KV cache; streams tokens, prints tokens/s.
    Generate(commands::generate::Args),
    /// QLoRA / LoRA fine-tuning; writes a PEFT adapter, metrics.jsonl, a loss curve, checkpoints.
    Train(Box<commands::train::Args>),
    /// Dataset utilities (e.g. convert the chatterbot corpus to chat JSONL).
    Data(commands::data::Args),
    /// Quantize a Hugging Face model (or a .safetensors file) to bitsandbytes NF4/FP4.
    Quantize(commands::quantize::Args),
    /// Turn a bitsandbytes 4-bit model (or file) back into plain float weights.
    Dequantize(commands::dequantize::Args),
    /// Parameter count and exact weight bytes (f32, bf16, int8, bnb NF4/FP4, GGUF).
    Size(commands::size::Args),
    /// Training memory per device; with --budget: fits?, largest batch/sequence, fewest devices.
    Plan(Box<commands::plan::Args>),
    /// Merge a LoRA adapter into its base model (HF folder, or bnb-4bit with --requantize).
    Merge(commands::merge::Args),
    /// Export a model (+ merged adapter) as a llama.cpp GGUF file (f16, q8_0, q4_0, q4_k, q4_k_m, q5_k_m), then
    /// check it.
    ExportGguf(commands::export_gguf::Args),
    /// Token ids of a text (or a chat with --chat) under a model's tokenizer.
    Tokenize(commands::tokenize::Args),
}

/// Big blocks cache-line aligned: the AMX products write their result tiles
/// straight into the activations (see `qlora_model::alloc`).
#[global_allocator]
static ALLOC: qlora_model::alloc::LineAligned = qlora_model::alloc::LineAligned;

fn main() {
    // The main thread drives training steps as worker 0 of the rayon pool.
    qlora_model::ops::init_pool();
    let cli = Cli::parse_from(flags::bind_optional_bools(std::env::args_os()));
    let result = match cli.command {
        Command::Inspect(a) => commands::inspect::run(a),
        Command::Eval(a) => commands::eval::run(a),
        Command::Generate(a) => commands::generate::run(a),
        Command::Train(a) => commands::train::run(*a),
        Command::Data(a) => commands::data::run(a),
        Command::Quantize(a) => commands::quantize::run(a),
        Command::Dequantize(a) => commands::dequantize::run(a),
        Command::Size(a) => commands::size::run(a),
        Command::Plan(a) => commands::plan::run(*a),
        Command::Merge(a) => commands::merge::run(a),
        Command::ExportGguf(a) => commands::export_gguf::run(a),
        Command::Tokenize(a) => commands::tokenize::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
