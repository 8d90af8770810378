//! The `tunebench` command line: thin argument parsing over the engine.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tunebench::{model, Result};

#[derive(Parser)]
#[command(name = "tunebench", version, about = "Fine-tune language models on your own workstation")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Inspect a model file or folder.
    Model {
        #[command(subcommand)]
        cmd: ModelCmd,
    },
    /// Generate a continuation of a prompt (quick check of a model or adapter).
    Generate {
        /// Model: a .gguf file or HF folder (default: the installed default model).
        #[arg(long)]
        model: Option<PathBuf>,
        /// PEFT adapter folder to apply.
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// The prompt (a user message, rendered with the model's chat template).
        #[arg(long)]
        prompt: String,
        /// Feed the prompt as raw text, without the chat template.
        #[arg(long)]
        raw: bool,
        /// Longest answer in tokens.
        #[arg(long, default_value_t = 128)]
        max_tokens: usize,
        /// Sampling temperature (0 = greedy).
        #[arg(long, default_value_t = 0.0)]
        temperature: f64,
        /// Seed for sampling.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Write full-sequence logits for token-id sequences to a safetensors file (`logits.N`,
    /// f32 [seq, vocab]); used by the PEFT interop check.
    Logits {
        /// Model: a .gguf file or HF folder.
        #[arg(long)]
        model: Option<PathBuf>,
        /// PEFT adapter folder to apply.
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// JSON file: a list of lists of token ids.
        #[arg(long)]
        tokens: PathBuf,
        /// Output .safetensors file.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum ModelCmd {
    /// Print a model's architecture and metadata.
    Info {
        /// A .gguf file or HF folder (default: the installed default model).
        path: Option<PathBuf>,
    },
}

fn model_path(p: Option<PathBuf>) -> PathBuf {
    p.unwrap_or_else(tunebench::paths::default_model)
}

fn run(cli: Cli) -> Result<()> {
    let device = candle_core::Device::Cpu;
    match cli.cmd {
        Cmd::Model { cmd: ModelCmd::Info { path } } => {
            let path = model_path(path);
            if path.is_file() {
                for (k, v) in model::gguf::metadata_summary(&path)? {
                    println!("{k} = {v}");
                }
            }
            let m = model::load(&path, &device)?;
            println!("{}", serde_json::to_string_pretty(m.model.config()).unwrap_or_default());
        }
        Cmd::Generate { model, adapter, prompt, raw, max_tokens, temperature, seed } => {
            let m = model::load(&model_path(model), &device)?;
            if adapter.is_some() {
                return Err(tunebench::Error::Msg("adapters: not wired yet".into()));
            }
            let text = if raw { prompt } else { format!("<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n") };
            let enc = m.tokenizer.encode(text, false).map_err(|e| tunebench::Error::Tokenizer(e.to_string()))?;
            let opts = tunebench::infer::SampleOptions {
                max_new_tokens: max_tokens,
                temperature,
                seed,
                stop_ids: vec![m.spec.eos_id],
                ..Default::default()
            };
            let out = tunebench::infer::generate(&m.model, enc.get_ids(), &opts, |_| {})?;
            let s = m.tokenizer.decode(&out, true).map_err(|e| tunebench::Error::Tokenizer(e.to_string()))?;
            println!("{s}");
        }
        Cmd::Logits { model, adapter, tokens, out } => {
            let m = model::load(&model_path(model), &device)?;
            if adapter.is_some() {
                return Err(tunebench::Error::Msg("adapters: not wired yet".into()));
            }
            let text = std::fs::read_to_string(&tokens).map_err(|e| tunebench::Error::io(&tokens, e))?;
            let seqs: Vec<Vec<u32>> =
                serde_json::from_str(&text).map_err(|e| tunebench::Error::bad_input(&tokens, Some(e.line()), e.to_string()))?;
            let mut map = std::collections::HashMap::new();
            for (i, s) in seqs.iter().enumerate() {
                map.insert(format!("logits.{i}"), tunebench::infer::sequence_logits(&m.model, s)?);
            }
            candle_core::safetensors::save(&map, &out)?;
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
