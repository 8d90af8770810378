//! `tunebench chat`: talk to a model (and its adapters) in the terminal, answers streamed,
//! base vs tuned side by side, every turn recorded in the store.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tunebench::api::chat::CreateChat;
use tunebench::api::ApiEvent;
use tunebench::infer::SampleOptions;
use tunebench::store::ChatAdapter;
use tunebench::{Error, Result};

use super::runs::{runtime, workbench};

#[derive(clap::Args)]
pub struct ChatArgs {
    /// Model: a .gguf file (kept quantized) or HF folder; default: the installed default model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Adapter folder (PEFT format), `DIR` or `NAME=DIR`; repeat for several. With several,
    /// each answers every message, side by side.
    #[arg(long)]
    adapter: Vec<String>,
    /// Also answer with the base model (first), next to the adapter(s).
    #[arg(long)]
    compare_base: bool,
    /// Continue a recorded chat (its model, adapters and settings).
    #[arg(long, conflicts_with_all = ["model", "adapter", "compare_base", "system", "device"])]
    resume: Option<i64>,
    /// Where the model answers: auto (default: the first CUDA GPU when this build has CUDA
    /// support and a GPU answers, else the CPU), cpu, cuda or cuda:N.
    #[arg(long)]
    device: Option<String>,
    /// List recorded chats and exit.
    #[arg(long)]
    list: bool,
    /// System prompt.
    #[arg(long)]
    system: Option<String>,
    /// Ask this one message and exit (no interactive prompt).
    #[arg(long, short = 'p')]
    prompt: Option<String>,
    /// Longest answer in tokens.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
}

/// Sampling flags shared by `chat` and `generate`.
#[derive(clap::Args)]
pub struct SamplingArgs {
    /// Temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Nucleus sampling mass (1 = off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// Keep only the k most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Drop tokens below min_p × the top probability (0 = off).
    #[arg(long, default_value_t = 0.0)]
    min_p: f64,
    /// Repetition penalty (1 = off).
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f64,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
}

impl SamplingArgs {
    /// The settings, answering at most `max_tokens` tokens.
    pub fn options(&self, max_tokens: usize) -> SampleOptions {
        SampleOptions {
            max_new_tokens: max_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
            stop_strings: self.stop.clone(),
            ..Default::default()
        }
    }
}

fn adapter_arg(s: &str) -> ChatAdapter {
    match s.split_once('=') {
        Some((name, path)) if !name.is_empty() && !name.contains('/') => ChatAdapter { name: name.into(), path: path.into() },
        _ => {
            let p = PathBuf::from(s);
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| s.to_string());
            ChatAdapter { name, path: s.into() }
        }
    }
}

pub fn cmd_chat(a: ChatArgs) -> Result<()> {
    let rt = runtime()?;
    let wb = workbench(&rt)?;
    if a.list {
        for c in rt.block_on(wb.chats())? {
            println!("{:>4}  {}  ({}, {})", c.id, c.title, c.model_path, c.device);
        }
        return Ok(());
    }
    if a.prompt.as_deref().is_some_and(|p| p.trim().is_empty()) {
        return Err(Error::Msg("the prompt is empty".into()));
    }
    let chat = match a.resume {
        Some(id) => rt.block_on(wb.chat(id))?,
        None => {
            let adapters: Vec<ChatAdapter> = a.adapter.iter().map(|s| adapter_arg(s)).collect();
            let mut names: Vec<&str> = adapters.iter().map(|x| x.name.as_str()).collect();
            names.sort_unstable();
            if names.windows(2).any(|w| w[0] == w[1]) {
                return Err(Error::Msg("two adapters have the same name; give them names with NAME=DIR".into()));
            }
            let mut variants: Vec<Option<String>> = adapters.iter().map(|x| Some(x.name.clone())).collect();
            if a.compare_base || variants.is_empty() {
                variants.insert(0, None);
            }
            let sampling = a.sampling.options(a.max_tokens);
            rt.block_on(wb.create_chat(CreateChat {
                title: None,
                model_path: a.model.clone(),
                adapters,
                variants: Some(variants),
                sampling,
                system: a.system.clone(),
                device: a.device.clone(),
            }))?
        }
    };
    let cancel = Arc::new(AtomicBool::new(false));
    tunebench::api::worker::install_stop_signals(cancel.clone());
    let side_by_side = chat.variants.len() > 1;
    let ask = |text: &str| -> Result<()> {
        cancel.store(false, Ordering::SeqCst);
        let mut rx = wb.subscribe();
        let send = wb.chat_send(chat.id, text, cancel.clone());
        let out = rt.block_on(async {
            tokio::pin!(send);
            let mut current: Option<Option<String>> = None;
            loop {
                tokio::select! {
                    r = &mut send => break r,
                    ev = rx.recv() => {
                        let mut stdout = std::io::stdout().lock();
                        match ev {
                            Ok(ApiEvent::ChatText { chat_id, variant, text, .. }) if chat_id == chat.id => {
                                if side_by_side && current.as_ref() != Some(&variant) {
                                    let _ = write!(stdout, "\n[{}] ", variant.as_deref().unwrap_or("base"));
                                    current = Some(variant);
                                }
                                let _ = write!(stdout, "{text}");
                                let _ = stdout.flush();
                            }
                            Ok(ApiEvent::ChatDone { chat_id, answer, .. }) if chat_id == chat.id => {
                                if side_by_side && current.as_ref() != Some(&answer.variant) {
                                    let _ = write!(stdout, "\n[{}] ", answer.variant.as_deref().unwrap_or("base"));
                                    current = Some(answer.variant.clone());
                                }
                                if answer.finish == "cancelled" {
                                    let _ = write!(stdout, " [cancelled]");
                                }
                                let _ = writeln!(stdout);
                            }
                            _ => {}
                        }
                    }
                }
            }
        });
        out.map(|_| ())
    };
    if let Some(p) = &a.prompt {
        return ask(p);
    }
    eprintln!(
        "chat {} · {} · Ctrl-C stops an answer, Ctrl-D (or /quit) leaves; `tunebench chat --resume {}` continues it",
        chat.id, chat.title, chat.id
    );
    let stdin = std::io::stdin();
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line).map_err(|e| Error::Msg(format!("stdin: {e}")))? == 0 {
            break;
        }
        let line = line.trim();
        if line == "/quit" || line == "/exit" {
            break;
        }
        if line.is_empty() {
            continue;
        }
        if let Err(e) = ask(line) {
            eprintln!("error: {e}");
        }
    }
    Ok(())
}
