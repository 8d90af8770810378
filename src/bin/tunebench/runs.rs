//! CLI commands over the run store: runs, compare, datasets, estimate and the worker.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use clap::{Args, Subcommand};
use tunebench::api::compare::CompareRequest;
use tunebench::api::datasets::{ImportRequest, PreviewRequest};
use tunebench::api::estimate::EstimateRequest;
use tunebench::api::{worker, RunChartRequest, Workbench, WorkbenchOptions};
use tunebench::chart::{Theme, XAxis};
use tunebench::store::{RunRecord, RunStatus};
use tunebench::train::observer::JsonLines;
use tunebench::train::RunConfig;
use tunebench::{Error, Result};

use crate::Progress;

#[derive(Subcommand)]
pub enum RunsCmd {
    /// List runs, newest first.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one run: status, progress, metrics, checkpoints, samples, log tail.
    Show {
        /// Run id.
        id: i64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop a running run (it checkpoints first) or take a queued one out of the queue.
    Stop {
        /// Run id.
        id: i64,
    },
    /// Continue a stopped, interrupted or failed run from its last checkpoint, here in the
    /// foreground.
    Resume {
        /// Run id.
        id: i64,
        /// Print events as JSON lines.
        #[arg(long)]
        json: bool,
        /// Skip the held-out generation check.
        #[arg(long)]
        no_heldout: bool,
        /// Only put it back in the queue (`tunebench queue` or the app runs it).
        #[arg(long)]
        queue: bool,
    },
    /// Put queued runs first in the queue, in this order (others keep their order).
    Reorder {
        /// Queued run ids.
        #[arg(required = true, num_args = 1..)]
        ids: Vec<i64>,
    },
    /// Delete a run's records and its folder.
    Delete {
        /// Run id.
        id: i64,
        /// Keep the run folder (checkpoints, adapter) on disk.
        #[arg(long)]
        keep_files: bool,
    },
    /// Write a run's chart (loss, learning rate, grad norm, tokens/s) as PNG or SVG.
    Chart {
        /// Run id.
        id: i64,
        /// Output file (.png or .svg).
        #[arg(long)]
        out: PathBuf,
        /// X axis: step, tokens or time.
        #[arg(long, default_value = "step")]
        x: String,
        /// Dark theme.
        #[arg(long)]
        dark: bool,
        /// Replace an existing file.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Args)]
pub struct CompareArgs {
    /// Run ids.
    #[arg(required = true, num_args = 1..)]
    runs: Vec<i64>,
    /// Write the overlay chart here (.png or .svg).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Metric to overlay: loss, val_loss, lr, grad_norm, tokens_per_s.
    #[arg(long, default_value = "loss")]
    metric: String,
    /// X axis: step, tokens or time.
    #[arg(long, default_value = "step")]
    x: String,
    /// EMA smoothing weight in [0, 1).
    #[arg(long, default_value_t = 0.0)]
    smoothing: f64,
    /// Logarithmic y axis.
    #[arg(long)]
    log_y: bool,
    /// Dark theme.
    #[arg(long)]
    dark: bool,
    /// Replace an existing chart file.
    #[arg(long)]
    force: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
pub enum DatasetsCmd {
    /// Validate a dataset file, count rows and tokens, and record it.
    Import {
        /// JSON, JSONL, CSV, Parquet or text file.
        path: PathBuf,
        /// Display name (default: the file name).
        #[arg(long)]
        name: Option<String>,
        /// auto | alpaca | sharegpt | messages | text.
        #[arg(long, default_value = "auto")]
        format: String,
        /// Longest example in tokens (for the truncation share).
        #[arg(long, default_value_t = 512)]
        max_len: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show the first examples rendered through the chat template, trained spans marked.
    Preview {
        /// Dataset id or file.
        dataset: String,
        /// Examples.
        #[arg(short, default_value_t = 3)]
        n: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List imported datasets.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
pub struct EstimateArgs {
    /// Run config (TOML).
    #[arg(long, conflicts_with = "preset")]
    config: Option<PathBuf>,
    /// A bundled preset.
    #[arg(long)]
    preset: Option<String>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
pub enum WorkerCmd {
    /// Train one recorded run.
    Train {
        /// Run id.
        #[arg(long)]
        run: i64,
        /// The store (default: the app data dir's).
        #[arg(long)]
        db: Option<PathBuf>,
        /// Skip the held-out generation check.
        #[arg(long)]
        no_heldout: bool,
    },
    /// Answer chat requests (JSON lines on stdin, events on stdout) until stdin closes.
    Chat,
}

pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| Error::Msg(format!("tokio runtime: {e}")))
}

pub fn workbench(rt: &tokio::runtime::Runtime) -> Result<Workbench> {
    rt.block_on(Workbench::open(WorkbenchOptions::new(tunebench::paths::home())))
}

/// `tunebench eval --run`: evaluates a run's checkpoint with a progress bar and prints the
/// scores (or the whole report as JSON).
#[allow(clippy::too_many_arguments)]
pub fn cmd_eval_run(
    run_id: i64,
    checkpoint: Option<i64>,
    data: Option<PathBuf>,
    limit: Option<usize>,
    max_new_tokens: usize,
    device: Option<String>,
    json: bool,
    verbose: bool,
) -> Result<()> {
    let rt = runtime()?;
    let wb = workbench(&rt)?;
    let options = tunebench::eval::run::EvalOptions { data, limit, max_new_tokens, ..Default::default() };
    let req = tunebench::api::evaluate::EvaluateRun { run_id, checkpoint, options, device };
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("eval {bar:30} {pos}/{len} answers · {elapsed} (eta {eta})").unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut rx = wb.subscribe();
    let fut = wb.evaluate_run(req);
    let r = rt.block_on(async {
        tokio::pin!(fut);
        loop {
            tokio::select! {
                r = &mut fut => break r,
                ev = rx.recv() => if let Ok(tunebench::api::ApiEvent::EvalProgress { run_id: id, done, total }) = ev {
                    if id == run_id {
                        bar.set_length(total as u64);
                        bar.set_position(done as u64);
                    }
                }
            }
        }
    });
    bar.finish_and_clear();
    let r = r?;
    if json {
        return json_out(&r);
    }
    if verbose {
        for a in &r.report.answers {
            println!("--- prompt\n{}\n--- reference\n{}\n--- answer\n{}\n", a.prompt.trim_end(), a.reference, a.output);
        }
    }
    let s = &r.report.scores;
    println!("run {run_id} step {}: {} held-out examples from {}", r.step, r.report.examples, r.report.data.display());
    println!("  val loss {:.4}  perplexity {:.2}", r.report.val_loss, r.report.perplexity);
    println!("  BLEU-4 {:.2}  ROUGE-1 {:.2}  ROUGE-2 {:.2}  ROUGE-L {:.2}", s.bleu4, s.rouge1, s.rouge2, s.rouge_l);
    println!("  answers and scores: {}", r.file.display());
    Ok(())
}

fn json_out<T: serde::Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v).map_err(|e| Error::Msg(e.to_string()))?);
    Ok(())
}

fn x_axis(s: &str) -> Result<XAxis> {
    match s {
        "step" | "steps" => Ok(XAxis::Step),
        "tokens" => Ok(XAxis::Tokens),
        "time" | "wall" | "wall_time" => Ok(XAxis::WallTime),
        other => Err(Error::Msg(format!("unknown x axis `{other}`: use step, tokens or time"))),
    }
}

fn theme(dark: bool) -> Theme {
    if dark {
        Theme::Dark
    } else {
        Theme::Light
    }
}

/// Trains run `run_id` in this process (Ctrl-C: checkpoint and stop).
pub fn foreground(rt: &tokio::runtime::Runtime, run_id: i64, json: bool, no_heldout: bool) -> Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    worker::install_stop_signals(stop.clone());
    let db = tunebench::paths::home().join(tunebench::store::DB_FILE);
    let out = if json {
        worker::run_worker(&db, run_id, stop, no_heldout, &mut JsonLines)?
    } else {
        worker::run_worker(&db, run_id, stop, no_heldout, &mut Progress { bar: None })?
    };
    if json {
        return match out.error {
            Some(e) => Err(Error::Msg(e)),
            None => Ok(()),
        };
    }
    let wb = workbench(rt)?;
    let run = rt.block_on(wb.store().run(run_id))?;
    let fm = &run.final_metrics;
    if let (Some(b), Some(a)) = (fm.get("heldout_before").and_then(|v| v.as_f64()), fm.get("heldout_after").and_then(|v| v.as_f64())) {
        println!("held-out accuracy: {:.0}% before -> {:.0}% after", 100.0 * b, 100.0 * a);
    }
    if let Some(l) = fm.get("final_loss").and_then(|v| v.as_f64()) {
        println!("final train loss {l:.4}");
    }
    if let Some(v) = fm.get("final_val_loss").and_then(|v| v.as_f64()) {
        println!("final val loss {v:.4} (perplexity {:.2})", v.exp());
    }
    match out.status {
        RunStatus::Failed => Err(Error::Msg(format!("run {run_id} failed: {}", out.error.unwrap_or_default()))),
        RunStatus::Stopped => {
            println!("run {run_id} stopped at step {}; continue with `tunebench runs resume {run_id}`", out.steps);
            Ok(())
        }
        _ => {
            if let Some(a) = out.adapter_dir {
                println!("run {run_id} completed; adapter: {}", a.display());
            }
            Ok(())
        }
    }
}

fn print_runs(runs: &[RunRecord]) {
    println!("{:>4}  {:<24} {:<11} {:<6} {:>11} {:>10} {:>10}  created", "id", "name", "status", "method", "step", "loss", "val loss");
    for r in runs {
        let fm = &r.final_metrics;
        let f = |k: &str| fm.get(k).and_then(|v| v.as_f64()).map(|v| format!("{v:.4}")).unwrap_or_else(|| "-".into());
        println!(
            "{:>4}  {:<24} {:<11} {:<6} {:>11} {:>10} {:>10}  {}",
            r.id,
            truncate(&r.name, 24),
            r.status.as_str(),
            r.method,
            format!("{}/{}", r.step, r.total_steps.map(|t| t.to_string()).unwrap_or_else(|| "?".into())),
            f("final_loss"),
            f("final_val_loss"),
            age(r.created_at)
        );
    }
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        s.chars().take(n - 1).collect::<String>() + "…"
    }
}

fn age(ms: i64) -> String {
    let s = (tunebench::store::now_ms() - ms).max(0) / 1000;
    match s {
        0..=59 => format!("{s}s ago"),
        60..=3599 => format!("{}m ago", s / 60),
        3600..=86399 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86400),
    }
}

pub fn cmd_runs(cmd: RunsCmd) -> Result<()> {
    let rt = runtime()?;
    let wb = workbench(&rt)?;
    match cmd {
        RunsCmd::List { json } => {
            let runs = rt.block_on(wb.runs())?;
            if json {
                json_out(&runs)?;
            } else {
                print_runs(&runs);
            }
        }
        RunsCmd::Show { id, json } => {
            let d = rt.block_on(wb.run_detail(id))?;
            if json {
                return json_out(&d);
            }
            let r = &d.run;
            println!("run {} `{}`: {} ({})", r.id, r.name, r.status, r.method);
            println!("  model    {}", r.model_path);
            println!("  dataset  {}", r.dataset_path);
            println!("  folder   {}", r.out_dir);
            println!("  progress step {}/{}, {} tokens, {:.0}s", r.step, r.total_steps.unwrap_or(0), r.tokens_seen, r.elapsed_s);
            if let (Some(t), Some(a)) = (r.trainable_params, r.total_params) {
                println!("  params   {t} trainable of {a} ({:.2}%)", 100.0 * t as f64 / a.max(1) as f64);
            }
            if let Some(p) = r.peak_rss_bytes {
                let gib = |b: f64| b / (1u64 << 30) as f64;
                match r.final_metrics.get("device_peak_bytes").and_then(|v| v.as_f64()) {
                    Some(d) => println!("  memory   peak {:.2} GiB on the device, {:.2} GiB of host memory", gib(d), gib(p as f64)),
                    None => println!("  memory   peak {:.2} GiB", gib(p as f64)),
                }
            }
            if let Some(e) = &r.error {
                println!("  error    {e}");
            }
            if let Some(o) = r.final_metrics.as_object().filter(|o| !o.is_empty()) {
                println!("  metrics  {}", serde_json::to_string(o).unwrap_or_default());
            }
            for c in &d.checkpoints {
                println!(
                    "  checkpoint step {:>6} {}{}",
                    c.step,
                    c.path,
                    if c.removed { " (pruned)" } else { "" }
                );
            }
            for s in d.samples.iter().rev().take(4).rev() {
                println!("  sample @{}: {} => {}", s.step, s.prompt, s.output.replace('\n', " "));
            }
            for (_, l) in d.logs.iter().rev().take(8).rev() {
                println!("  log: {l}");
            }
        }
        RunsCmd::Stop { id } => {
            eprintln!("stopping run {id} (it writes a checkpoint first)…");
            let s = rt.block_on(wb.stop_run(id))?;
            println!("run {id}: {s}");
        }
        RunsCmd::Resume { id, queue: true, .. } => {
            rt.block_on(wb.resume_run(id))?;
            println!("run {id} queued");
        }
        RunsCmd::Resume { id, json, no_heldout, queue: false } => {
            let run = rt.block_on(wb.store().run(id))?;
            if !run.status.is_resumable() {
                return Err(Error::Msg(format!("run {id} is {}: only stopped, interrupted or failed runs can be resumed", run.status)));
            }
            drop(wb);
            foreground(&rt, id, json, no_heldout)?;
        }
        RunsCmd::Reorder { ids } => {
            rt.block_on(wb.reorder_queue(&ids))?;
            let queued = rt.block_on(wb.store().runs_with_status(RunStatus::Queued))?;
            println!("queue: {}", queued.iter().map(|r| format!("{} ({})", r.id, r.name)).collect::<Vec<_>>().join(", "));
        }
        RunsCmd::Delete { id, keep_files } => {
            rt.block_on(wb.delete_run(id, !keep_files))?;
            println!("deleted run {id}");
        }
        RunsCmd::Chart { id, out, x, dark, force } => {
            let req = RunChartRequest { run_id: id, x_axis: x_axis(&x)?, theme: theme(dark), width: 1200, height: 900 };
            let spec = rt.block_on(wb.run_chart_spec(&req))?;
            Workbench::export_chart(&spec, &out, force)?;
            println!("wrote {}", out.display());
        }
    }
    Ok(())
}

pub fn cmd_compare(a: CompareArgs) -> Result<()> {
    let rt = runtime()?;
    let wb = workbench(&rt)?;
    let mut req = CompareRequest::new(a.runs.clone());
    req.metric = a.metric;
    req.x_axis = x_axis(&a.x)?;
    req.smoothing = a.smoothing;
    req.log_y = a.log_y;
    req.theme = theme(a.dark);
    let c = rt.block_on(wb.compare(&req))?;
    if let Some(out) = &a.out {
        req.width = 1200;
        req.height = 700;
        let spec = rt.block_on(wb.compare_chart_spec(&req))?;
        Workbench::export_chart(&spec, out, a.force)?;
        if !a.json {
            println!("wrote {}", out.display());
        }
    }
    if a.json {
        return json_out(&c);
    }
    let opt = |v: Option<f64>| v.map(|v| format!("{v:.4}")).unwrap_or_else(|| "-".into());
    println!(
        "{:>4}  {:<20} {:<10} {:>6} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8} {:>9} {:>10}",
        "id", "name", "status", "steps", "loss", "val", "best val", "ppl", "tok/s", "wall s", "peak GiB", "trainable"
    );
    for r in &c.table {
        println!(
            "{:>4}  {:<20} {:<10} {:>6} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8.0} {:>9} {:>10}",
            r.run_id,
            truncate(&r.name, 20),
            r.status.as_str(),
            r.steps,
            opt(r.final_loss),
            opt(r.final_val_loss),
            opt(r.best_val_loss),
            r.best_perplexity.map(|v| format!("{v:.2}")).unwrap_or_else(|| "-".into()),
            r.tokens_per_s.map(|v| format!("{v:.0}")).unwrap_or_else(|| "-".into()),
            r.wall_s,
            r.peak_rss_bytes.map(|b| format!("{:.2}", b as f64 / (1u64 << 30) as f64)).unwrap_or_else(|| "-".into()),
            r.trainable_params.map(|t| t.to_string()).unwrap_or_else(|| "-".into()),
        );
    }
    if c.config_diff.is_empty() {
        println!("\nconfigs: identical");
    } else {
        println!("\nconfig differences:");
        for d in &c.config_diff {
            let vals: Vec<String> = d.values.iter().map(|v| v.as_ref().map(|v| v.to_string()).unwrap_or_else(|| "(unset)".into())).collect();
            println!("  {:<28} {}", d.key, vals.join("  |  "));
        }
    }
    for g in &c.samples {
        println!("\nsample @ step {}: {}", g.step, g.prompt);
        for (r, o) in c.table.iter().zip(&g.outputs) {
            println!("  [{}] {}", r.name, o.as_deref().unwrap_or("-").replace('\n', " "));
        }
    }
    Ok(())
}

pub fn cmd_datasets(cmd: DatasetsCmd) -> Result<()> {
    let rt = runtime()?;
    let wb = workbench(&rt)?;
    match cmd {
        DatasetsCmd::Import { path, name, format, max_len, json } => {
            let req = ImportRequest { path, name, format: parse_format(&format)?, max_len, model: None };
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template("{bar:30} {percent}% importing [{elapsed_precise} < {eta_precise}]")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            let rec = rt.block_on(wb.import_dataset(&req, |done, total| {
                bar.set_length(total);
                bar.set_position(done);
            }))?;
            bar.finish_and_clear();
            if json {
                return json_out(&rec);
            }
            println!("dataset {} `{}`: {} rows ({} / {}), {} bytes", rec.id, rec.name, rec.rows, rec.container, rec.format, rec.bytes);
            if let Some(t) = rec.tokens {
                println!("  tokens {t}");
            }
            if let Some(st) = rec.stats.as_object() {
                if let Some(tr) = st.get("truncated").and_then(|v| v.as_u64()) {
                    println!("  truncated at {} tokens: {tr}", max_len);
                }
            }
            let errs = rec.errors.as_array().cloned().unwrap_or_default();
            if !errs.is_empty() {
                println!("  {} problem(s):", errs.len());
                for e in errs.iter().take(20) {
                    println!("    line {}: {}", e.get("line").and_then(|l| l.as_u64()).unwrap_or(0), e.get("reason").and_then(|r| r.as_str()).unwrap_or(""));
                }
            }
        }
        DatasetsCmd::Preview { dataset, n, json } => {
            let req = match dataset.parse::<i64>() {
                Ok(id) => PreviewRequest { dataset_id: Some(id), path: None, n, format: None, max_len: 512, model: None },
                Err(_) => PreviewRequest { dataset_id: None, path: Some(PathBuf::from(dataset)), n, format: None, max_len: 512, model: None },
            };
            let p = rt.block_on(wb.preview_dataset(&req))?;
            if json {
                return json_out(&p);
            }
            for (i, ex) in p.examples.iter().enumerate() {
                println!("── example {} ({} tokens, {} trained){}", i + 1, ex.tokens, ex.trained_tokens, if ex.truncated { ", truncated" } else { "" });
                for span in &ex.spans {
                    if span.trained {
                        print!("\x1b[1;32m{}\x1b[0m", span.text);
                    } else {
                        print!("\x1b[2m{}\x1b[0m", span.text);
                    }
                }
                println!();
            }
            println!("(bright green: trained on; dim: masked from the loss)");
        }
        DatasetsCmd::List { json } => {
            let ds = rt.block_on(wb.store().datasets())?;
            if json {
                return json_out(&ds);
            }
            println!("{:>4}  {:<24} {:<8} {:<9} {:>8} {:>10} {:>7}  path", "id", "name", "type", "format", "rows", "tokens", "errors");
            for d in ds {
                println!(
                    "{:>4}  {:<24} {:<8} {:<9} {:>8} {:>10} {:>7}  {}",
                    d.id,
                    truncate(&d.name, 24),
                    d.container,
                    d.format,
                    d.rows,
                    d.tokens.map(|t| t.to_string()).unwrap_or_else(|| "-".into()),
                    d.errors.as_array().map(|a| a.len()).unwrap_or(0),
                    d.path
                );
            }
        }
    }
    Ok(())
}

fn parse_format(s: &str) -> Result<tunebench::data::Format> {
    serde_json::from_value(serde_json::Value::String(s.to_string()))
        .map_err(|_| Error::Msg(format!("unknown dataset format `{s}`: use auto, alpaca, sharegpt, messages or text")))
}

pub fn cmd_estimate(a: EstimateArgs) -> Result<()> {
    let cfg = match (a.config, a.preset) {
        (Some(c), _) => RunConfig::from_file(&c)?,
        (None, Some(p)) => RunConfig::preset(&p)?,
        (None, None) => return Err(Error::Msg("give --config run.toml or --preset NAME".into())),
    };
    let rt = runtime()?;
    let wb = workbench(&rt)?;
    let e = rt.block_on(wb.estimate(&EstimateRequest { config: cfg }))?;
    if a.json {
        return json_out(&e);
    }
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    println!("parameters   {} total, {} trainable ({:.3}%)", e.total_params, e.trainable_params, e.trainable_pct);
    println!("peak memory  {:.2} GiB predicted", gib(e.memory.total_bytes));
    for (k, v) in &e.memory.parts {
        println!("  {k:<22} {:.3} GiB", gib(*v));
    }
    println!("time         {:.2} s/step predicted ({} steps, about {:.0} s)", e.step_s, e.total_steps, e.total_s);
    for w in &e.warnings {
        println!("warning: {w}");
    }
    Ok(())
}

pub fn cmd_worker(cmd: WorkerCmd) -> Result<()> {
    match cmd {
        WorkerCmd::Train { run, db, no_heldout } => {
            let db = db.unwrap_or_else(|| tunebench::paths::home().join(tunebench::store::DB_FILE));
            let stop = Arc::new(AtomicBool::new(false));
            worker::install_stop_signals(stop.clone());
            let out = worker::run_worker(&db, run, stop, no_heldout, &mut JsonLines)?;
            match out.error {
                Some(e) => Err(Error::Msg(e)),
                None => Ok(()),
            }
        }
        WorkerCmd::Chat => tunebench::api::chat_worker::run_chat_worker(std::io::BufReader::new(std::io::stdin()), std::io::stdout().lock()),
    }
}

pub fn cmd_queue(exit_when_idle: bool) -> Result<()> {
    let rt = runtime()?;
    rt.block_on(async {
        let mut o = WorkbenchOptions::new(tunebench::paths::home());
        o.supervise = true;
        let wb = Workbench::open(o).await?;
        let mut rx = wb.subscribe();
        eprintln!("queue: running queued runs from {} (Ctrl-C to leave; workers keep going)", wb.store().path().display());
        loop {
            tokio::select! {
                ev = rx.recv() => {
                    if let Ok(ev) = ev {
                        println!("{}", serde_json::to_string(&ev).unwrap_or_default());
                    }
                }
                _ = tokio::signal::ctrl_c() => break,
                _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {
                    if exit_when_idle {
                        let runs = wb.runs().await?;
                        if !runs.iter().any(|r| matches!(r.status, RunStatus::Queued | RunStatus::Running)) {
                            break;
                        }
                    }
                }
            }
        }
        Ok(())
    })
}

/// `tunebench serve`.
#[derive(clap::Args)]
pub struct ServeArgs {
    /// Address to listen on (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:7860")]
    pub addr: std::net::SocketAddr,
    /// Allow listening on an address other machines can reach (the token still guards it).
    #[arg(long)]
    pub allow_remote: bool,
    /// A folder whose files requests may name (datasets, models), besides the app data
    /// folder and the bundled assets; repeatable.
    #[arg(long = "allow-dir")]
    pub allow_dirs: Vec<PathBuf>,
    /// The built UI folder (default: ui/dist of the source tree, or `ui` beside the binary).
    #[arg(long)]
    pub ui: Option<PathBuf>,
    /// Use this access token instead of a random one (for scripts; keep it secret; default:
    /// $TUNEBENCH_TOKEN, else random).
    #[arg(long)]
    pub token: Option<String>,
}

pub fn cmd_serve(args: ServeArgs) -> Result<()> {
    use tunebench::api::commands::{Api, PathPolicy};
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| Error::Msg(format!("tokio runtime: {e}")))?;
    rt.block_on(async {
        let home = tunebench::paths::home();
        let mut o = WorkbenchOptions::new(&home);
        o.supervise = true;
        let wb = std::sync::Arc::new(Workbench::open(o).await?);
        let mut roots = vec![home, tunebench::paths::assets_dir()];
        roots.extend(args.allow_dirs.iter().cloned());
        let api = std::sync::Arc::new(Api::new(wb, PathPolicy::within(&roots)?));
        let ui_dir = args.ui.clone().unwrap_or_else(tunebench::serve::default_ui_dir);
        let ui_built = ui_dir.join("index.html").exists();
        let opts = tunebench::serve::ServeOptions {
            addr: args.addr,
            allow_remote: args.allow_remote,
            ui_dir,
            token: args.token.clone().or_else(|| std::env::var("TUNEBENCH_TOKEN").ok().filter(|t| !t.is_empty())),
        };
        if !args.addr.ip().is_loopback() && args.allow_remote {
            eprintln!("warning: listening on {}, reachable from other machines; anyone with the URL below can train, read and delete runs", args.addr);
        }
        api.warm_up();
        let server = tunebench::serve::bind(api, opts).await?;
        if !ui_built {
            eprintln!("note: the UI is not built (npm --prefix ui run build); the API works without it");
        }
        // The URL on stdout alone, so scripts can read it; the rest on stderr.
        println!("{}", server.url);
        use std::io::Write;
        let _ = std::io::stdout().flush();
        eprintln!("tunebench serve: open the URL above (Ctrl-C to stop; training workers keep going)");
        server.run(async { let _ = tokio::signal::ctrl_c().await; }).await
    })
}

/// `tunebench model download`: downloads from the hub with a progress bar, registers the model.
pub fn cmd_download(repo: &str, file: Option<String>, revision: Option<String>) -> Result<()> {
    use indicatif::{ProgressBar, ProgressStyle};
    use tunebench::api::downloads::DownloadState;
    use tunebench::api::ApiEvent;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| Error::Msg(format!("tokio runtime: {e}")))?;
    rt.block_on(async {
        let wb = Workbench::open(WorkbenchOptions::new(tunebench::paths::home())).await?;
        let found = wb.hub_lookup(repo, revision.as_deref()).await?;
        // Without --file, a GGUF-only repo with exactly one GGUF file needs no choice.
        let file = file.or_else(|| match found.choices.as_slice() {
            [only] if only.kind == "gguf" => only.file.clone(),
            _ => None,
        });
        let mut events = wb.subscribe();
        let job = wb.download_from(found, file.as_deref())?;
        let bar = ProgressBar::new(job.progress.as_ref().map(|p| p.total).unwrap_or(0));
        bar.set_style(
            ProgressStyle::with_template("{bar:30} {bytes}/{total_bytes} {bytes_per_sec} [{elapsed_precise} < {eta_precise}] {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        let cancel = tokio::signal::ctrl_c();
        tokio::pin!(cancel);
        let mut cancelled = false;
        let done = loop {
            let ev = tokio::select! {
                ev = events.recv() => ev,
                _ = &mut cancel, if !cancelled => {
                    cancelled = true;
                    wb.cancel_download(job.id)?;
                    continue;
                }
            };
            let Ok(ApiEvent::Download { job: j }) = ev else { continue };
            if j.id != job.id {
                continue;
            }
            if let Some(p) = &j.progress {
                bar.set_length(p.total);
                bar.set_position(p.done);
                bar.set_message(p.file.clone());
            }
            if j.state != DownloadState::Running {
                break j;
            }
        };
        bar.finish_and_clear();
        match done.state {
            DownloadState::Done => {
                println!("{}", done.path);
                eprintln!("registered as model {} (use it as [model] path = \"{}\")", done.model_id.unwrap_or_default(), done.path);
                Ok(())
            }
            DownloadState::Cancelled => Err(Error::Msg("download cancelled; run the same command again to resume".into())),
            _ => Err(Error::Msg(done.error.unwrap_or_else(|| "download failed".into()))),
        }
    })
}
