//! The `tunebench` command line: thin argument parsing over the engine.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use candle_core::Device;
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use tunebench::data::Message;
use tunebench::model::{self, LoadedModel};
use tunebench::peft::Adapter;
use tunebench::train::{self, heldout, RunConfig, TrainEvent, TrainObserver};
use tunebench::{Error, Result};

mod chat;
mod runs;

#[derive(Parser)]
#[command(name = "tunebench", version, about = "Fine-tune language models on your own workstation")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Train an adapter: `--config run.toml` or `--preset quickstart`.
    Train(TrainArgs),
    /// List the bundled presets.
    Presets,
    /// List the PEFT methods with their `[peft]` keys and defaults.
    Methods,
    /// Chat with a model and its adapters in the terminal (streamed; `--compare-base` answers
    /// with the base model too, side by side); every turn is recorded.
    Chat(chat::ChatArgs),
    /// Export a tuned model: the PEFT adapter folder, a merged HF transformers folder, or a
    /// merged GGUF file (+ an Ollama Modelfile). Never overwrites.
    Export {
        #[command(subcommand)]
        cmd: ExportCmd,
    },
    /// Recorded runs: list, show, stop, resume, delete, chart.
    Runs {
        #[command(subcommand)]
        cmd: runs::RunsCmd,
    },
    /// Compare runs: metrics table, config diff, samples; `--out` writes the overlay chart.
    Compare(runs::CompareArgs),
    /// Datasets: import (with validation and statistics), preview, list.
    Datasets {
        #[command(subcommand)]
        cmd: runs::DatasetsCmd,
    },
    /// Predict parameters, peak memory and time per step of a run config before running it.
    Estimate(runs::EstimateArgs),
    /// Run queued runs (one per device at a time) until Ctrl-C, printing events as JSON lines;
    /// workers keep running when it exits, and the next `queue` re-attaches to them.
    Queue {
        /// Exit once nothing is queued or running.
        #[arg(long)]
        exit_when_idle: bool,
    },
    /// Serve the app over HTTP for a browser (API, live events, the built UI): binds
    /// 127.0.0.1 and prints a URL with a random access token; runs queued runs like `queue`.
    Serve(runs::ServeArgs),
    /// Internal: the training worker the app's supervisor starts (JSON lines on stdout).
    #[command(hide = true)]
    Worker {
        #[command(subcommand)]
        cmd: runs::WorkerCmd,
    },
    /// Evaluate a run's checkpoint (`--run N [--checkpoint STEP]`: validation loss, perplexity,
    /// BLEU-4 and ROUGE-1/2/L of greedy answers on its held-out examples, recorded with the
    /// run), or score a model/adapter on held-out prompts (share of answers that contain an
    /// expected string).
    Eval {
        /// A recorded run to evaluate.
        #[arg(long, conflicts_with_all = ["model", "adapter", "prompts"])]
        run: Option<i64>,
        /// With --run: the checkpoint's step (default: the final adapter, else the newest
        /// checkpoint).
        #[arg(long, requires = "run")]
        checkpoint: Option<i64>,
        /// With --run: evaluate every example of this file instead of the run's validation split.
        #[arg(long, requires = "run")]
        data: Option<PathBuf>,
        /// With --run: at most this many examples.
        #[arg(long, requires = "run")]
        limit: Option<usize>,
        /// With --run: print the report as JSON.
        #[arg(long, requires = "run")]
        json: bool,
        /// Model (default: the installed default model).
        #[arg(long)]
        model: Option<PathBuf>,
        /// PEFT adapter folder.
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// Held-out prompts (JSONL of {prompt, expect}); default: the bundled persona set.
        #[arg(long)]
        prompts: Option<PathBuf>,
        /// Longest answer in tokens (default: 128 with --run, else 32).
        #[arg(long)]
        max_tokens: Option<usize>,
        /// Print every answer.
        #[arg(long)]
        verbose: bool,
        /// Where to run: auto, cpu, cuda or cuda:N (default: with --run, the device the run
        /// trained on; else cpu).
        #[arg(long)]
        device: Option<String>,
    },
    /// Inspect a model file or folder.
    Model {
        #[command(subcommand)]
        cmd: ModelCmd,
    },
    /// Generate an answer (quick check of a model or adapter).
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
        /// Where to run: cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
        #[command(flatten)]
        sampling: chat::SamplingArgs,
    },
    /// Write full-sequence logits for token-id sequences to a safetensors file (`logits.N`,
    /// f32 [seq, vocab]); used by the PEFT interop check.
    Logits {
        /// Model: a .gguf file or HF folder.
        #[arg(long, conflicts_with = "shape")]
        model: Option<PathBuf>,
        /// Instead of a model: a benchmark shape with seeded random weights (tiny,
        /// smollm2-135m, ...), as `bench-train --shape` builds it.
        #[arg(long)]
        shape: Option<String>,
        /// PEFT adapter folder to apply.
        #[arg(long, conflicts_with = "shape")]
        adapter: Option<PathBuf>,
        /// Where to run: cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Compute each row as generation does: one token at a time through the KV cache.
        #[arg(long)]
        decode: bool,
        /// With --shape: hold every decoder projection as quantized blocks (q4_0, q4_1, q8_0 or
        /// q4_k), as a GGUF model is held for chat, so the logits go through the quantized
        /// inference kernels of the device.
        #[arg(long, requires = "shape")]
        blocks: Option<String>,
        /// JSON file: a list of lists of token ids.
        #[arg(long)]
        tokens: PathBuf,
        /// Output .safetensors file.
        #[arg(long)]
        out: PathBuf,
    },
    /// Write a freshly initialised adapter in PEFT's format (interop checks): LoRA, IA3, or
    /// any method with its keys given by --config.
    LoraInit {
        /// Model.
        #[arg(long)]
        model: Option<PathBuf>,
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
        /// Rank.
        #[arg(long, default_value_t = 8)]
        rank: usize,
        /// Alpha.
        #[arg(long, default_value_t = 16.0)]
        alpha: f64,
        /// Comma-separated module names, or all-linear.
        #[arg(long, default_value = "q_proj,v_proj")]
        targets: String,
        /// Seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Give B random non-zero values (a fresh LoRA has B = 0 and changes nothing; for IA3,
        /// scale vectors around 1 instead of exactly 1; for AdaLoRA, Λ from N(0, 1)).
        #[arg(long)]
        random_b: bool,
        /// lora, ia3, or another registered method (prompt_tuning, p_tuning, prefix_tuning, ...)
        /// configured with --config.
        #[arg(long, default_value = "lora")]
        method: String,
        /// Methods other than lora and ia3: the method's keys as a JSON object, e.g.
        /// '{"num_virtual_tokens": 8}' (unset keys take their defaults).
        #[arg(long, default_value = "{}")]
        config: String,
        /// IA3: comma-separated feed-forward modules (their input is scaled).
        #[arg(long, default_value = "down_proj")]
        feedforward: String,
        /// LoRA: DoRA (learned magnitude per output feature).
        #[arg(long)]
        dora: bool,
    },
    /// Benchmark the run store: record a run with N metric points in a fresh store under
    /// `--home`, then time querying and charting it; prints one JSON line.
    #[command(hide = true)]
    BenchStore {
        /// Folder for the fresh store.
        #[arg(long)]
        home: PathBuf,
        /// Steps (points per series).
        #[arg(long, default_value_t = 1_000_000)]
        points: usize,
        /// Steps per transaction.
        #[arg(long, default_value_t = 1000)]
        batch: usize,
    },
    /// Record N completed runs with loss curves in the store under `--home` (no training):
    /// for the runs-table benchmark and the desktop smoke test.
    #[command(hide = true)]
    BenchSeedRuns {
        /// The app data folder.
        #[arg(long)]
        home: PathBuf,
        /// Runs to record.
        #[arg(long, default_value_t = 1000)]
        runs: usize,
        /// Steps per run.
        #[arg(long, default_value_t = 50)]
        points: usize,
    },
    /// Benchmark decoding: greedy, EOS ignored, `--repeats` times on the same prompt (raw text,
    /// no chat template); prints one JSON line (prompt ids, time to first token and decode
    /// tokens/s per repeat, the generated ids). bench/decode_bench.py compares it to llama.cpp.
    #[command(hide = true)]
    BenchDecode {
        /// Model (GGUF files stay quantized).
        #[arg(long)]
        model: Option<PathBuf>,
        /// Prompt text.
        #[arg(long)]
        prompt: String,
        /// New tokens per repeat.
        #[arg(long, default_value_t = 128)]
        max_tokens: usize,
        /// Repeats.
        #[arg(long, default_value_t = 3)]
        repeats: usize,
    },
    /// Check the training ops' values and gradients on a device against the composed f64
    /// reference on the CPU (f32, bf16, f16; on a GPU through our fused kernels, on the CPU
    /// also through their CPU twins); exits non-zero when one is off.
    CheckOps {
        /// auto, cpu, cuda or cuda:N.
        #[arg(long, default_value = "auto")]
        device: String,
    },
    /// Benchmark training steps of LoRA (or any method: --peft) on fixed batches (a
    /// safetensors file holding an i64 `input_ids` [n, batch, seq]); prints one JSON line.
    BenchTrain {
        /// Model.
        #[arg(long, conflicts_with = "shape")]
        model: Option<PathBuf>,
        /// A named shape with seeded random weights instead of a model: tiny, smollm2-135m,
        /// llama-1b, qwen1.5b-like.
        #[arg(long)]
        shape: Option<String>,
        /// Batches file (safetensors `input_ids` [n, batch, seq]); without it, random tokens of
        /// --batch × --seq.
        #[arg(long)]
        batches: Option<PathBuf>,
        /// Rows per random batch.
        #[arg(long, default_value_t = 8)]
        batch: usize,
        /// Tokens per row of a random batch.
        #[arg(long, default_value_t = 512)]
        seq: usize,
        /// auto, cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Gradient checkpointing per decoder layer.
        #[arg(long)]
        gradient_checkpointing: bool,
        /// Precision of the base and activations: f32, bf16 or f16 (with dynamic loss scaling;
        /// adapter and AdamW stay f32).
        #[arg(long, default_value = "f32")]
        dtype: String,
        /// Rank.
        #[arg(long, default_value_t = 16)]
        rank: usize,
        /// Alpha.
        #[arg(long, default_value_t = 32.0)]
        alpha: f64,
        /// LoRA dropout rate.
        #[arg(long, default_value_t = 0.0)]
        dropout: f64,
        /// Comma-separated module names, or all-linear.
        #[arg(long, default_value = "all-linear")]
        targets: String,
        /// Learning rate.
        #[arg(long, default_value_t = 1e-4)]
        lr: f64,
        /// Untimed steps first.
        #[arg(long, default_value_t = 2)]
        warmup_steps: usize,
        /// Timed steps.
        #[arg(long, default_value_t = 6)]
        steps: usize,
        /// After the timed steps, run N more with the time of each region (forward and
        /// backward of every op, optimizer) measured, and print that table to stderr (the
        /// JSON line gets a `profile` field). Regions synchronize the device, so these steps
        /// are slower; the timed ones are not profiled.
        #[arg(long, value_name = "N", default_value_t = 0)]
        profile: usize,
        /// Any method instead of LoRA: the `[peft]` table's lines, as in a run config (e.g.
        /// 'method = "ia3"'); the LoRA options are then unused.
        #[arg(long, value_name = "TOML")]
        peft: Option<String>,
    },
}

#[derive(clap::Args)]
struct TrainArgs {
    /// Run config (TOML; every key is documented in the README).
    #[arg(long, conflicts_with = "preset")]
    config: Option<PathBuf>,
    /// A bundled preset (see `tunebench presets`).
    #[arg(long)]
    preset: Option<String>,
    /// Continue the newest stopped, interrupted or failed run of this config's name.
    #[arg(long)]
    resume: bool,
    /// Override the run folder.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Override the model path.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Override train.max_steps.
    #[arg(long)]
    max_steps: Option<usize>,
    /// Override train.device: auto, cpu, cuda or cuda:N.
    #[arg(long)]
    device: Option<String>,
    /// Turn on train.gradient_checkpointing (recompute each layer in the backward).
    #[arg(long)]
    gradient_checkpointing: bool,
    /// Print events as JSON lines instead of a progress bar.
    #[arg(long)]
    json: bool,
    /// Skip the held-out generation check.
    #[arg(long)]
    no_heldout: bool,
    }

/// What to export, from `--run N` (its final adapter, or `--checkpoint STEP`) or `--adapter DIR`.
#[derive(clap::Args)]
struct ExportSource {
    /// A recorded run (its base model and adapter).
    #[arg(long, conflicts_with = "adapter")]
    run: Option<i64>,
    /// With --run: the checkpoint's step (default: the final adapter, else the newest checkpoint).
    #[arg(long, requires = "run")]
    checkpoint: Option<i64>,
    /// A PEFT adapter folder (with --model, or the default model).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Base model (default: the run's, else the installed default model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Destination (must not exist).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Subcommand)]
enum ExportCmd {
    /// The PEFT adapter folder, as HF PEFT loads it.
    Adapter(ExportSource),
    /// The base with the adapter merged, as a HF transformers folder.
    Hf {
        #[command(flatten)]
        src: ExportSource,
        /// Weight dtype: f32, bf16 or f16.
        #[arg(long, default_value = "bf16")]
        dtype: String,
    },
    /// The base with the adapter merged, as a GGUF file for llama.cpp runtimes, with an Ollama
    /// Modelfile next to it.
    Gguf {
        #[command(flatten)]
        src: ExportSource,
        /// f16, q8_0, q4_0, q4_1 or q4_k.
        #[arg(long, default_value = "q8_0")]
        qtype: String,
        /// Do not write the Modelfile.
        #[arg(long)]
        no_modelfile: bool,
        /// Sampling temperature written into the Modelfile.
        #[arg(long, default_value_t = 0.7)]
        temperature: f64,
        /// top_p written into the Modelfile.
        #[arg(long, default_value_t = 0.9)]
        top_p: f64,
    },
}

#[derive(Subcommand)]
enum ModelCmd {
    /// Print a model's architecture and metadata.
    Info {
        /// A .gguf file or HF folder (default: the installed default model).
        path: Option<PathBuf>,
    },
    /// Look a repo up on the Hugging Face hub (or the mirror in HF_ENDPOINT): what Tunebench
    /// can load from it (the HF folder, each GGUF file) and the sizes.
    Hub {
        /// `owner/name`.
        repo: String,
        /// Branch, tag or commit.
        #[arg(long)]
        revision: Option<String>,
    },
    /// Download a model from the hub into `<app data>/models/hub/` with a progress bar
    /// (resumable: run it again after an interruption) and register it. HF_TOKEN is sent for
    /// gated repos.
    Download {
        /// `owner/name`.
        repo: String,
        /// The GGUF file to fetch (see `tunebench model hub REPO`); default: the HF folder
        /// (safetensors + config + tokenizer), or the only GGUF file of a GGUF-only repo.
        #[arg(long)]
        file: Option<String>,
        /// Branch, tag or commit.
        #[arg(long)]
        revision: Option<String>,
    },
}

fn model_path(p: Option<PathBuf>) -> PathBuf {
    p.unwrap_or_else(tunebench::paths::default_model)
}

fn attach(mut m: LoadedModel, adapter: Option<&Path>) -> Result<LoadedModel> {
    if let Some(a) = adapter {
        Adapter::load(&mut m.model, a)?;
    }
    Ok(m)
}

fn human_bytes(n: u64) -> String {
    let (mut v, mut unit) = (n as f64, 0);
    while v >= 1024.0 && unit < 4 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", ["B", "KiB", "MiB", "GiB", "TiB"][unit])
}

fn targets_of(s: &str) -> Vec<&str> {
    s.split(',').map(str::trim).filter(|t| !t.is_empty()).collect()
}

/// The CLI's observer: a progress bar with loss, tokens/s and ETA, plus event lines.
pub(crate) struct Progress {
    pub(crate) bar: Option<ProgressBar>,
}

impl TrainObserver for Progress {
    fn on_event(&mut self, ev: &TrainEvent) {
        match ev {
            TrainEvent::Started { total_steps, start_step, train_examples, val_examples, trainable_params, total_params } => {
                eprintln!(
                    "training {total_steps} steps on {train_examples} examples ({val_examples} held for validation); trainable params {trainable_params} of {total_params} ({:.2}%)",
                    100.0 * *trainable_params as f64 / *total_params as f64
                );
                let bar = ProgressBar::new(*total_steps as u64);
                bar.set_style(
                    ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]")
                        .unwrap_or_else(|_| ProgressStyle::default_bar()),
                );
                bar.set_position(*start_step as u64);
                bar.reset_eta();
                self.bar = Some(bar);
            }
            TrainEvent::Step { step, loss, lr, tokens_per_s, .. } => {
                if let Some(b) = &self.bar {
                    b.set_position(*step as u64);
                    b.set_message(format!("loss {loss:.4}  lr {lr:.2e}  {tokens_per_s:.0} tok/s"));
                }
            }
            other => {
                let line = match other {
                    TrainEvent::Eval { step, val_loss, perplexity } => format!("step {step}: val loss {val_loss:.4}, perplexity {perplexity:.2}"),
                    TrainEvent::Heldout { phase, correct, total } => {
                        format!("held-out prompts answered correctly ({phase} training): {correct}/{total} ({:.0}%)", 100.0 * *correct as f64 / (*total).max(1) as f64)
                    }
                    TrainEvent::Checkpoint { step, path } => format!("step {step}: checkpoint {path}"),
                    TrainEvent::Finished { step, stopped: true, .. } => {
                        format!("stopped at step {step} (checkpoint saved); continue with `tunebench runs resume RUN`")
                    }
                    TrainEvent::Finished { step, adapter, .. } => format!("finished {step} steps; adapter: {adapter}"),
                    TrainEvent::Message { text } => text.clone(),
                    _ => String::new(),
                };
                match &self.bar {
                    Some(b) if !b.is_finished() && !b.is_hidden() => b.println(line),
                    _ => eprintln!("{line}"),
                }
                if matches!(other, TrainEvent::Finished { .. }) {
                    if let Some(b) = &self.bar {
                        b.finish_and_clear();
                    }
                }
            }
        }
    }
}

fn cmd_train(args: TrainArgs) -> Result<()> {
    let TrainArgs { config, preset, resume, out, model, max_steps, device, gradient_checkpointing, json, no_heldout } = args;
    let mut cfg = match (config, preset) {
        (Some(c), _) => RunConfig::from_file(&c)?,
        (None, Some(p)) => RunConfig::preset(&p)?,
        (None, None) => return Err(Error::Msg("give --config run.toml or --preset NAME (see `tunebench presets`)".into())),
    };
    if let Some(o) = out {
        cfg.output.dir = Some(o);
    }
    if let Some(m) = model {
        cfg.model.path = Some(m);
    }
    if let Some(s) = max_steps {
        cfg.train.max_steps = s;
    }
    if let Some(d) = device {
        tunebench::device::DeviceChoice::parse(&d, "--device")?;
        cfg.train.device = d;
    }
    cfg.train.gradient_checkpointing |= gradient_checkpointing;
    let rt = runs::runtime()?;
    let wb = runs::workbench(&rt)?;
    let run_id = if resume {
        let runs = rt.block_on(wb.runs())?;
        let found = runs.iter().find(|r| r.name == cfg.name && r.status.is_resumable() && r.status != tunebench::store::RunStatus::Queued);
        match found {
            Some(r) => r.id,
            None => {
                return Err(Error::Msg(format!(
                    "no stopped, interrupted or failed run named `{}` to resume (see `tunebench runs list`)",
                    cfg.name
                )))
            }
        }
    } else {
        let r = rt.block_on(wb.create_run(tunebench::api::CreateRun { config: cfg, dataset_id: None, device: String::new() }))?;
        r.id
    };
    drop(wb);
    if !json {
        eprintln!("run {run_id}");
    }
    runs::foreground(&rt, run_id, json, no_heldout)
}

fn run(cli: Cli) -> Result<()> {
    let device = Device::Cpu;
    match cli.cmd {
        Cmd::Train(args) => cmd_train(args)?,
        Cmd::Runs { cmd } => runs::cmd_runs(cmd)?,
        Cmd::Export { cmd } => cmd_export(cmd)?,
        Cmd::Chat(a) => chat::cmd_chat(a)?,
        Cmd::Compare(a) => runs::cmd_compare(a)?,
        Cmd::Datasets { cmd } => runs::cmd_datasets(cmd)?,
        Cmd::Estimate(a) => runs::cmd_estimate(a)?,
        Cmd::Worker { cmd } => runs::cmd_worker(cmd)?,
        Cmd::Queue { exit_when_idle } => runs::cmd_queue(exit_when_idle)?,
        Cmd::Serve(args) => runs::cmd_serve(args)?,
        Cmd::Methods => {
            for m in tunebench::peft::registry() {
                println!("{} ({})\n  {}", m.name, m.peft_type, m.description);
                if let Some(cfg) = tunebench::peft::PeftConfig::default_for(m.name) {
                    let mut t = toml::Table::new();
                    t.insert("peft".into(), toml::Value::try_from(&cfg).map_err(|e| Error::Msg(e.to_string()))?);
                    let text = toml::to_string(&t).map_err(|e| Error::Msg(e.to_string()))?;
                    for line in text.lines() {
                        println!("    {line}");
                    }
                }
            }
        }
        Cmd::Presets => {
            for (name, desc, _, _) in train::config::PRESETS {
                println!("{name:12} {desc}");
            }
        }
        Cmd::Eval { run: Some(run_id), checkpoint, data, limit, json, max_tokens, verbose, device, .. } => {
            runs::cmd_eval_run(run_id, checkpoint, data, limit, max_tokens.unwrap_or(128), device, json, verbose)?
        }
        Cmd::Eval { model, adapter, prompts, max_tokens, verbose, device, .. } => {
            let dev = tunebench::device::open(device.as_deref().unwrap_or("cpu"), "--device")?;
            let m = attach(model::load(&model_path(model), &dev)?, adapter.as_deref())?;
            let template = train::trainer::template_for(&m)?;
            let path = prompts.unwrap_or_else(|| tunebench::paths::assets_dir().join("datasets/persona/eval.jsonl"));
            let ps = heldout::read_prompts(&path)?;
            let bar = ProgressBar::new(ps.len() as u64);
            let r = heldout::score(&m, &template, &ps, max_tokens.unwrap_or(32), |d, _| bar.set_position(d as u64))?;
            bar.finish_and_clear();
            if verbose {
                for a in &r.answers {
                    println!("[{}] {} => {}", if a.correct { "ok" } else { "--" }, a.prompt, a.answer.replace('\n', " "));
                }
            }
            println!("held-out accuracy: {}/{} ({:.0}%)", r.correct, r.total, 100.0 * r.accuracy());
        }
        Cmd::Model { cmd: ModelCmd::Info { path } } => {
            let path = model_path(path);
            if path.is_file() {
                for (k, v) in model::gguf::metadata_summary(&path)? {
                    println!("{k} = {v}");
                }
            }
            let m = model::load(&path, &device)?;
            println!("{}", serde_json::to_string_pretty(m.model.config()).unwrap_or_default());
            println!("parameters: {}", m.model.num_params());
        }
        Cmd::Model { cmd: ModelCmd::Hub { repo, revision } } => {
            let r = tunebench::hub::lookup(&repo, revision.as_deref())?;
            println!("{} @ {}", r.repo, r.commit);
            for c in &r.choices {
                let what = c.file.clone().unwrap_or_else(|| format!("HF folder ({} files)", c.files.len()));
                println!("  {:<60} {:>10}", what, human_bytes(c.size));
            }
            if let Some(n) = &r.note {
                println!("  {n}");
            }
        }
        Cmd::Model { cmd: ModelCmd::Download { repo, file, revision } } => runs::cmd_download(&repo, file, revision)?,
        Cmd::Generate { model, adapter, prompt, raw, max_tokens, device, sampling } => {
            let dev = tunebench::device::open(&device, "--device")?;
            let m = attach(model::load_quantized(&model_path(model), &dev)?, adapter.as_deref())?;
            let text = if raw {
                prompt
            } else {
                train::trainer::template_for(&m)?.render(&[Message { role: "user".into(), content: prompt }], true)?
            };
            let enc = m.tokenizer.encode(text, false).map_err(|e| Error::Tokenizer(e.to_string()))?;
            let opts = tunebench::infer::SampleOptions { stop_ids: vec![m.spec.eos_id], ..sampling.options(max_tokens) };
            let g = tunebench::infer::generate_text(&m.model, &m.tokenizer, enc.get_ids(), &opts, None, |_| {})?;
            println!("{}", g.text);
        }
        Cmd::Logits { model, shape, adapter, device, decode, blocks, tokens, out } => {
            use candle_core::quantized::GgmlDType;
            let dev = tunebench::device::open(&device, "--device")?;
            let mut m = match &shape {
                Some(s) => model::Llama::random(tunebench::train::bench::shape_config(s)?, 0, &dev)?,
                None => attach(model::load(&model_path(model), &dev)?, adapter.as_deref())?.model,
            };
            if let Some(b) = &blocks {
                let ty = match b.to_ascii_lowercase().as_str() {
                    "q4_0" => GgmlDType::Q4_0,
                    "q4_1" => GgmlDType::Q4_1,
                    "q8_0" => GgmlDType::Q8_0,
                    "q4_k" => GgmlDType::Q4K,
                    _ => return Err(Error::config("--blocks", format!("`{b}` is not a block type; use q4_0, q4_1, q8_0 or q4_k"))),
                };
                model::hold_projections_as_blocks(&mut m, &dev, |l, k| match k % ty.block_size() {
                    0 => Ok(Some(ty)),
                    _ => Err(Error::config("--blocks", format!("{}: rows of {k} values do not split into {b} blocks of {}", l.name(), ty.block_size()))),
                })?;
            }
            let text = std::fs::read_to_string(&tokens).map_err(|e| Error::io(&tokens, e))?;
            let seqs: Vec<Vec<u32>> = serde_json::from_str(&text).map_err(|e| Error::bad_input(&tokens, Some(e.line()), e.to_string()))?;
            let vocab = m.config().vocab_size;
            let mut map = std::collections::HashMap::new();
            for (i, s) in seqs.iter().enumerate() {
                if s.is_empty() {
                    return Err(Error::bad_input(&tokens, None, format!("sequence {i} is empty")));
                }
                if let Some(bad) = s.iter().find(|&&t| t as usize >= vocab) {
                    return Err(Error::bad_input(&tokens, None, format!("sequence {i}: token {bad} outside the vocabulary of {vocab}")));
                }
                let logits = if decode { tunebench::infer::decoded_logits(&m, s)? } else { tunebench::infer::sequence_logits(&m, s)? };
                map.insert(format!("logits.{i}"), logits.to_device(&candle_core::Device::Cpu)?);
            }
            candle_core::safetensors::save(&map, &out)?;
        }
        Cmd::LoraInit { model, out, rank, alpha, targets, seed, random_b, method, feedforward, .. } if method == "ia3" => {
            let _ = (rank, alpha);
            let mut m = model::load(&model_path(model.clone()), &device)?;
            let names: Vec<String> = targets_of(&targets).into_iter().map(String::from).collect();
            let cfg = tunebench::peft::PeftConfig::Ia3(tunebench::peft::Ia3Config {
                target_modules: tunebench::peft::TargetModules::Names(names),
                feedforward_modules: targets_of(&feedforward).into_iter().map(String::from).collect(),
                init_ia3_weights: true,
            });
            let a = Adapter::inject(&mut m.model, &cfg, seed)?;
            if random_b {
                // 1 ± 0.2, seeded, so the adapter is reproducible.
                use rand::{Rng, SeedableRng};
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x1A3);
                for (_, v) in a.trainable() {
                    let x: Vec<f32> = (0..v.elem_count()).map(|_| 1.0 + (rng.random::<f32>() * 2.0 - 1.0) * 0.2).collect();
                    v.set(&candle_core::Tensor::from_vec(x, v.dims(), &device)?)?;
                }
            }
            a.save(&out, &model_path(model).display().to_string())?;
        }
        Cmd::LoraInit { model, out, seed, method, config, random_b, .. } if method != "lora" => {
            let mut keys: serde_json::Map<String, serde_json::Value> =
                serde_json::from_str(&config).map_err(|e| Error::Msg(format!("lora-init --config: {e}")))?;
            if tunebench::peft::PeftConfig::default_for(&method).is_none() {
                let names: Vec<&str> = tunebench::peft::registry().iter().map(|m| m.name).collect();
                return Err(Error::Msg(format!("lora-init: unknown method `{method}` ({})", names.join(", "))));
            }
            keys.insert("method".into(), method.clone().into());
            let cfg: tunebench::peft::PeftConfig =
                serde_json::from_value(keys.into()).map_err(|e| Error::Msg(format!("lora-init --config for {method}: {e}")))?;
            let mut m = model::load(&model_path(model.clone()), &device)?;
            let a = Adapter::inject_with(&mut m.model, &cfg, seed, Some(&m.tokenizer))?;
            if random_b {
                // AdaLoRA starts with Λ = 0 (no effect): Λ ~ N(0, 1), zero where its
                // rank_pattern masks a triplet.
                use rand::SeedableRng;
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0xADA);
                for (_, l) in &a.layers {
                    if let Some(l) = l.as_any().downcast_ref::<tunebench::peft::AdaLoraLayer>() {
                        let kept = l.kept().unwrap_or_else(|| vec![true; l.e.dims()[0]]);
                        let v: Vec<f32> = kept.iter().map(|&k| if k { tunebench::peft::normal_samples(&mut rng, 1, 1.0)[0] } else { 0.0 }).collect();
                        l.e.set(&candle_core::Tensor::from_vec(v, l.e.dims(), &device)?)?;
                    }
                }
            }
            a.save(&out, &model_path(model).display().to_string())?;
            if a.prompt.is_some() {
                // The prompt encoder's own tensors, so its output can be checked independently.
                a.save_trainable(&out)?;
            }
        }
        Cmd::LoraInit { model, out, rank, alpha, targets, seed, random_b, dora, .. } => {
            let mut m = model::load(&model_path(model.clone()), &device)?;
            let mut cfg = RunConfig::lora(rank, alpha, &targets_of(&targets));
            if let tunebench::peft::PeftConfig::Lora(c) = &mut cfg {
                c.use_dora = dora;
            }
            let a = Adapter::inject(&mut m.model, &cfg, seed)?;
            if random_b {
                // Uniform in ±0.035 (std 0.02), seeded, so the adapter is reproducible.
                use rand::{Rng, SeedableRng};
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0xB);
                for (_, l) in a.lora_layers() {
                    let v: Vec<f32> = (0..l.b.elem_count()).map(|_| (rng.random::<f32>() * 2.0 - 1.0) * 0.0346).collect();
                    l.b.set(&candle_core::Tensor::from_vec(v, l.b.dims(), &device)?)?;
                }
            }
            a.save(&out, &model_path(model).display().to_string())?;
        }
        Cmd::BenchStore { home, points, batch } => {
            let rt = runs::runtime()?;
            let r = rt.block_on(tunebench::api::bench::store_bench(&home, points, batch))?;
            println!("{}", serde_json::to_string(&r).map_err(|e| Error::Msg(e.to_string()))?);
        }
        Cmd::BenchSeedRuns { home, runs, points } => {
            let rt = runs::runtime()?;
            let ids = rt.block_on(tunebench::api::bench::seed_runs(&home, runs, points))?;
            println!("{}", serde_json::json!({ "runs": ids.len(), "first": ids.first(), "last": ids.last() }));
        }
        Cmd::BenchDecode { model, prompt, max_tokens, repeats } => {
            let m = model::load_quantized(&model_path(model), &device)?;
            let enc = m.tokenizer.encode(prompt, false).map_err(|e| Error::Tokenizer(e.to_string()))?;
            let ids = enc.get_ids().to_vec();
            let opts = tunebench::infer::SampleOptions::greedy(max_tokens);
            let (mut ttft, mut tps, mut tokens) = (vec![], vec![], vec![]);
            for _ in 0..repeats.max(1) {
                let g = tunebench::infer::generate_tokens(&m.model, &ids, &opts, None, |_| true)?;
                ttft.push(g.ttft_s);
                tps.push(g.decode_tok_s());
                tokens = g.tokens;
            }
            let out = serde_json::json!({
                "prompt_ids": ids, "new_tokens": tokens.len(), "ttft_s": ttft, "decode_tok_s": tps, "tokens": tokens,
            });
            println!("{out}");
        }
        Cmd::CheckOps { device } => {
            let dev = tunebench::device::open(&device, "--device")?;
            let checks = tunebench::model::opcheck::run(&dev)?;
            println!("training ops on {} against the f64 reference on the CPU", tunebench::device::describe(&dev));
            let width = checks.iter().map(|c| c.op.chars().count()).max().unwrap_or(2);
            println!("{:width$} {:5} {:>10} {:>10} {:>8}", "op", "dtype", "value", "gradient", "limit");
            for c in &checks {
                println!("{:width$} {:5} {:>10.2e} {:>10.2e} {:>8.0e} {}", c.op, c.dtype, c.forward, c.gradient, c.limit, if c.ok() { "ok" } else { "FAILED" });
            }
            let failed = checks.iter().filter(|c| !c.ok()).count();
            if failed > 0 {
                return Err(Error::Msg(format!("{failed} of {} op checks failed", checks.len())));
            }
        }
        Cmd::BenchTrain { model, shape, batches, batch, seq, device, gradient_checkpointing, dtype, rank, alpha, dropout, targets, lr, warmup_steps, steps, profile, peft } => {
            use tunebench::train::bench::{self, BenchModel, BenchOptions};
            let path = model_path(model);
            let which = match &shape {
                Some(s) => BenchModel::Shape(s),
                None => BenchModel::Path(&path),
            };
            let targets = targets_of(&targets);
            let dtype: tunebench::train::config::Precision = dtype.parse().map_err(|e| Error::Msg(format!("--dtype: {e}")))?;
            let peft = match peft {
                Some(text) => Some(
                    tunebench::train::RunConfig::from_toml(&format!("[data]\npath = \"bench-train batches\"\n[peft]\n{text}\n"), None)
                        .map_err(|e| Error::Msg(format!("--peft: {e}")))?
                        .peft,
                ),
                None => None,
            };
            let o = BenchOptions { rank, alpha, dropout, targets: &targets, lr, warmup: warmup_steps, steps, device: &device, gradient_checkpointing, dtype, profile_steps: profile, peft };
            let mut r = bench::run(which, batches.as_deref(), (batch, seq), &o)?;
            r.estimated_peak_bytes = Some(bench_estimate(&shape, &path, (r.batch, r.seq), &o)?);
            if let Some(rows) = &r.profile {
                eprintln!("where a step's time goes ({profile} profiled steps after the timed ones, {} {}):", r.device, r.dtype);
                eprint!("{}", tunebench::model::profile::table(rows));
            }
            println!("{}", serde_json::to_string(&r).map_err(|e| Error::Msg(e.to_string()))?);
        }
    }
    Ok(())
}

/// `tunebench estimate`'s peak memory for what `bench-train` ran: the same model (or shape),
/// method, batch shape, dtype and checkpointing.
fn bench_estimate(shape: &Option<String>, path: &Path, (batch, seq): (usize, usize), o: &tunebench::train::bench::BenchOptions) -> Result<u64> {
    let model = match shape {
        Some(s) => tunebench::train::bench::shape_config(s)?,
        None => tunebench::model::load_config(path)?,
    };
    // Only the model, adapter and batch shape matter to the estimate (no data is read).
    let mut cfg = tunebench::train::RunConfig::from_toml("[data]\npath = \"bench-train batches\"\n", None)?;
    cfg.peft = tunebench::train::bench::peft_config(o)?;
    (cfg.data.max_len, cfg.train.batch_size, cfg.train.max_steps) = (seq, batch, o.warmup + o.steps);
    (cfg.train.gradient_checkpointing, cfg.train.dtype, cfg.train.device, cfg.train.loss_chunk) = (o.gradient_checkpointing, o.dtype, o.device.to_string(), 256);
    Ok(tunebench::api::estimate::estimate(&cfg, &model, None, Some(seq))?.memory.total_bytes)
}

/// (base model, adapter folder) of an export.
fn export_source(src: &ExportSource) -> Result<(PathBuf, Option<PathBuf>)> {
    match src.run {
        Some(run_id) => {
            let rt = runs::runtime()?;
            let wb = runs::workbench(&rt)?;
            let run = rt.block_on(wb.store().run(run_id))?;
            let (_, adapter) = rt.block_on(wb.checkpoint_adapter(run_id, src.checkpoint))?;
            Ok((src.model.clone().unwrap_or_else(|| PathBuf::from(&run.model_path)), Some(adapter)))
        }
        None => Ok((model_path(src.model.clone()), src.adapter.clone())),
    }
}

fn export_bar(what: &str) -> ProgressBar {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(&format!("{what} {{bar:30}} {{pos}}/{{len}} tensors · {{elapsed}}"))
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

fn print_export(r: &tunebench::export::ExportReport) {
    println!("wrote {} ({:.1} MB, {} tensors, {:.1} s)", r.path.display(), r.bytes as f64 / 1e6, r.tensors, r.seconds);
    for f in &r.files {
        println!("  {}", f.display());
    }
}

fn cmd_export(cmd: ExportCmd) -> Result<()> {
    use tunebench::export;
    match cmd {
        ExportCmd::Adapter(src) => {
            let (_, adapter) = export_source(&src)?;
            let adapter = adapter.ok_or_else(|| Error::Msg("export adapter: give --run N or --adapter DIR".into()))?;
            print_export(&export::export_adapter(&adapter, &src.out)?);
        }
        ExportCmd::Hf { src, dtype } => {
            let dtype: export::HfDtype = dtype.parse()?;
            let (model, adapter) = export_source(&src)?;
            let bar = export_bar("hf");
            let r = export::export_hf(&model, adapter.as_deref(), &src.out, dtype, |d, t| {
                bar.set_length(t as u64);
                bar.set_position(d as u64);
            });
            bar.finish_and_clear();
            print_export(&r?);
        }
        ExportCmd::Gguf { src, qtype, no_modelfile, temperature, top_p } => {
            let qtype: export::GgufType = qtype.parse()?;
            let (model, adapter) = export_source(&src)?;
            let sampling = tunebench::infer::SampleOptions { temperature, top_p, ..Default::default() };
            sampling.validate()?;
            let bar = export_bar("gguf");
            let r = export::export_gguf(&model, adapter.as_deref(), &src.out, qtype, (!no_modelfile).then_some(&sampling), |d, t| {
                bar.set_length(t as u64);
                bar.set_position(d as u64);
            });
            bar.finish_and_clear();
            print_export(&r?);
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let workload = match cli.cmd {
        Cmd::Chat(_) | Cmd::Generate { .. } | Cmd::BenchDecode { .. } => tunebench::Workload::Inference,
        Cmd::Worker { cmd: runs::WorkerCmd::Chat } => tunebench::Workload::Inference,
        _ => tunebench::Workload::Training,
    };
    tunebench::init_cpu_runtime_for(workload);
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
