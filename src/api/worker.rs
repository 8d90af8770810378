//! The training worker: runs one recorded run to its end (or to a stop request), recording
//! every event in the run store. `tunebench worker train --run <id>` calls [`run_worker`]
//! with a JSON-lines observer on stdout (the supervisor reads it); `tunebench train` calls it
//! in-process with a progress bar.
//!
//! Crash safety rests on one ordering rule: a checkpoint folder is complete on disk (atomic
//! rename) *before* its row is committed, and its row is committed in the same transaction as
//! every metric up to its step. On (re)start the worker resumes from the newest recorded
//! checkpoint that exists on disk and deletes everything recorded after it, so a SIGKILL at any
//! moment loses at most the steps after the last checkpoint and never duplicates a row.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::store::{MetricRow, RunStatus, SampleRecord, Store, WriteBatch};
use crate::train::{self, checkpoint, RunConfig, TrainEvent, TrainObserver, TrainOptions};
use crate::{Error, Result};

/// How often buffered metrics are committed while training (checkpoints and the end of the
/// run commit at once).
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(1000);

/// What a worker session ended with.
#[derive(Clone, Debug)]
pub struct WorkerOutcome {
    /// The run's status now.
    pub status: RunStatus,
    /// Steps done.
    pub steps: usize,
    /// The newest adapter (final, or the last checkpoint's when stopped).
    pub adapter_dir: Option<PathBuf>,
    /// Error text when failed.
    pub error: Option<String>,
    /// Held-out (correct, total) before and after training, when measured.
    pub heldout: (Option<(usize, usize)>, Option<(usize, usize)>),
    /// Seconds spent writing to the store (the cost of recording).
    pub recording_s: f64,
}

/// The start time of process `pid` in clock ticks since boot (field 22 of /proc/pid/stat):
/// with the pid it identifies a process even after the pid is reused.
pub fn process_start_ticks(pid: u32) -> Option<i64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces.
    let rest = &s[s.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// True when the process `pid` that started at `start_ticks` is still alive (and not a zombie).
pub fn process_alive(pid: i64, start_ticks: Option<i64>) -> bool {
    let Ok(pid) = u32::try_from(pid) else { return false };
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    let state = stat.rfind(')').and_then(|i| stat[i + 2..].chars().next());
    if matches!(state, Some('Z') | Some('X') | None) {
        return false;
    }
    match start_ticks {
        Some(t) => process_start_ticks(pid) == Some(t),
        None => true,
    }
}

static STOP_FLAG: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();

/// Makes SIGINT and SIGTERM request a graceful stop (checkpoint, then exit) through `stop`.
/// A second SIGINT ends the process at once. Only async-signal-safe work in the handler.
pub fn install_stop_signals(stop: Arc<AtomicBool>) {
    if STOP_FLAG.set(stop).is_err() {
        return;
    }
    extern "C" fn on_signal(sig: libc::c_int) {
        if let Some(flag) = STOP_FLAG.get() {
            if flag.swap(true, Ordering::SeqCst) && sig == libc::SIGINT {
                // SAFETY: _exit is async-signal-safe and ends the process at once.
                unsafe { libc::_exit(130) }
            }
        }
    }
    // SAFETY: installing a handler that only touches an atomic (or calls _exit).
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
}

/// Records training events in the store (batched) and passes them on to `inner`.
struct StoreObserver<'a> {
    rt: &'a tokio::runtime::Runtime,
    store: &'a Store,
    run_id: i64,
    batch: WriteBatch,
    last_flush: Instant,
    inner: &'a mut dyn TrainObserver,
    stop: Arc<AtomicBool>,
    failure: Option<Error>,
    tokens: i64,
    wall: f64,
    last_val: Option<(usize, f64)>,
    heldout: (Option<(usize, usize)>, Option<(usize, usize)>),
    recording: Duration,
}

impl StoreObserver<'_> {
    fn flush(&mut self) {
        if self.batch.is_empty() || self.failure.is_some() {
            return;
        }
        let t = Instant::now();
        let batch = std::mem::take(&mut self.batch);
        if let Err(e) = self.rt.block_on(self.store.write_batch(self.run_id, &batch)) {
            // The run cannot be recorded: stop at the next step boundary and report it.
            self.failure = Some(e);
            self.stop.store(true, Ordering::SeqCst);
        }
        self.last_flush = Instant::now();
        self.recording += t.elapsed();
    }

    fn metric(&mut self, name: &str, step: usize, value: f64) {
        if value.is_finite() {
            self.batch.metrics.push(MetricRow { name: name.into(), step: step as i64, tokens: self.tokens, wall_s: self.wall, value });
        }
    }
}

impl TrainObserver for StoreObserver<'_> {
    fn on_event(&mut self, ev: &TrainEvent) {
        let t = Instant::now();
        let mut flush_now = false;
        match ev {
            TrainEvent::Started { total_steps, trainable_params, total_params, .. } => {
                self.batch.started = Some((*total_steps as i64, *trainable_params as i64, *total_params as i64));
                flush_now = true;
            }
            TrainEvent::Step { step, loss, lr, grad_norm, tokens_seen, tokens_per_s, elapsed_s } => {
                self.tokens = *tokens_seen as i64;
                self.wall = *elapsed_s;
                self.metric("loss", *step, *loss);
                self.metric("lr", *step, *lr);
                self.metric("grad_norm", *step, *grad_norm);
                self.metric("tokens_per_s", *step, *tokens_per_s);
                self.batch.progress = Some((*step as i64, self.tokens, self.wall));
            }
            TrainEvent::Eval { step, val_loss, .. } => {
                self.metric("val_loss", *step, *val_loss);
                self.last_val = Some((*step, *val_loss));
            }
            TrainEvent::Sample { step, prompt, output } => {
                self.batch.samples.push(SampleRecord { step: *step as i64, prompt: prompt.clone(), output: output.clone() });
            }
            TrainEvent::Checkpoint { step, path } => {
                let val = self.last_val.filter(|(s, _)| s == step).map(|(_, v)| v);
                self.batch.checkpoint = Some((*step as i64, path.clone(), val));
                flush_now = true;
            }
            TrainEvent::CheckpointRemoved { step } => self.batch.removed_checkpoints.push(*step as i64),
            TrainEvent::Heldout { phase, correct, total } => {
                let v = Some((*correct, *total));
                if phase == "before" {
                    self.heldout.0 = v;
                } else {
                    self.heldout.1 = v;
                }
                self.batch.logs.push(format!("held-out ({phase} training): {correct}/{total} correct"));
            }
            TrainEvent::Message { text } => self.batch.logs.push(text.clone()),
            TrainEvent::Finished { .. } => flush_now = true,
        }
        self.recording += t.elapsed();
        if flush_now || self.last_flush.elapsed() >= FLUSH_INTERVAL {
            self.flush();
        }
        self.inner.on_event(ev);
    }
}

/// The newest recorded checkpoint of a run that still exists on disk: (step, folder).
async fn resume_point(store: &Store, run_id: i64) -> Result<Option<(i64, PathBuf)>> {
    let ckpts = store.checkpoints(run_id).await?;
    Ok(ckpts.into_iter().rev().filter(|c| !c.removed).map(|c| (c.step, PathBuf::from(c.path))).find(|(_, p)| p.join("trainer_state.json").is_file()))
}

/// Runs (or resumes) run `run_id` of the store at `db` in this process until it completes,
/// fails or is stopped through `stop`. Every event goes to the store and to `inner`.
pub fn run_worker(db: &Path, run_id: i64, stop: Arc<AtomicBool>, skip_heldout: bool, inner: &mut dyn TrainObserver) -> Result<WorkerOutcome> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| Error::Msg(format!("tokio runtime: {e}")))?;
    let store = rt.block_on(Store::open(db))?;
    let run = rt.block_on(store.run(run_id))?;
    let cfg: RunConfig = serde_json::from_value(run.config.clone())
        .map_err(|e| Error::Store { path: db.to_path_buf(), reason: format!("run {run_id} has an unreadable config: {e}") })?;
    let pid = std::process::id();
    rt.block_on(store.claim_run(run_id, pid as i64, process_start_ticks(pid)))?;

    // Where to continue from; everything recorded after it is forgotten, and checkpoint
    // folders newer than it (written but never recorded) are removed.
    let resume = match rt.block_on(resume_point(&store, run_id)) {
        Ok(r) => r,
        Err(e) => return finish_failed(&rt, &store, run_id, pid, e),
    };
    let resume_step = resume.as_ref().map(|(s, _)| *s).unwrap_or(0);
    if let Err(e) = rt.block_on(store.truncate_after(run_id, resume_step)) {
        return finish_failed(&rt, &store, run_id, pid, e);
    }
    let ckpt_dir = cfg.output_dir().join("checkpoints");
    checkpoint::clean_leftovers(&ckpt_dir);
    for (step, dir) in checkpoint::list(&ckpt_dir) {
        if step as i64 > resume_step {
            let _ = checkpoint::remove(&dir);
        }
    }

    let opts = TrainOptions { resume: false, resume_from: resume.map(|(_, p)| p), stop: Some(stop.clone()), stop_after: None, skip_heldout };
    let mut obs = StoreObserver {
        rt: &rt,
        store: &store,
        run_id,
        batch: WriteBatch::default(),
        last_flush: Instant::now(),
        inner,
        stop,
        failure: None,
        tokens: 0,
        wall: 0.0,
        last_val: None,
        heldout: (None, None),
        recording: Duration::ZERO,
    };
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| train::train(&cfg, &opts, &mut obs)));
    obs.flush();
    let failure = obs.failure.take();
    let heldout = obs.heldout;
    let recording_s = obs.recording.as_secs_f64();
    let result = match (result, failure) {
        (_, Some(store_err)) => Err(store_err),
        (Ok(r), None) => r,
        (Err(panic), None) => {
            let msg = panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()));
            Err(Error::Msg(format!("internal error (please report): {}", msg.unwrap_or_else(|| "panic".into()))))
        }
    };
    let peak = Some(crate::train::bench::peak_rss_bytes() as i64).filter(|&b| b > 0);
    match result {
        Ok(summary) => {
            let status = if summary.stopped { RunStatus::Stopped } else { RunStatus::Completed };
            let mut finals = rt.block_on(final_metrics(&store, run_id, heldout))?;
            // The cost of recording this session (store writes), for bench/RESULTS.md.
            finals["recording_s"] = json!(recording_s);
            // On a GPU, the device memory the run's tensors peaked at (the estimate predicts
            // device memory there; the peak RSS above is the host's).
            if let Some(b) = crate::device::pool_peak_bytes_for(&cfg.train.device) {
                finals["device_peak_bytes"] = json!(b);
            }
            rt.block_on(store.finish_run(run_id, pid as i64, status, None, &finals, peak))?;
            Ok(WorkerOutcome {
                status,
                steps: summary.steps,
                adapter_dir: Some(summary.adapter_dir),
                error: None,
                heldout,
                recording_s,
            })
        }
        Err(e) => {
            let mut out = finish_failed(&rt, &store, run_id, pid, e)?;
            out.heldout = heldout;
            out.recording_s = recording_s;
            Ok(out)
        }
    }
}

fn finish_failed(rt: &tokio::runtime::Runtime, store: &Store, run_id: i64, pid: u32, e: Error) -> Result<WorkerOutcome> {
    let msg = e.to_string();
    let finals = rt.block_on(final_metrics(store, run_id, (None, None))).unwrap_or_else(|_| json!({}));
    rt.block_on(store.finish_run(run_id, pid as i64, RunStatus::Failed, Some(&msg), &finals, Some(crate::train::bench::peak_rss_bytes() as i64).filter(|&b| b > 0)))?;
    let step = rt.block_on(store.run(run_id)).map(|r| r.step as usize).unwrap_or(0);
    Ok(WorkerOutcome { status: RunStatus::Failed, steps: step, adapter_dir: None, error: Some(msg), heldout: (None, None), recording_s: 0.0 })
}

/// The summary numbers a finished session leaves on the run (what the compare table shows).
pub async fn final_metrics(store: &Store, run_id: i64, heldout: (Option<(usize, usize)>, Option<(usize, usize)>)) -> Result<serde_json::Value> {
    let run = store.run(run_id).await?;
    let loss = store.series(run_id, "loss").await?;
    let val = store.series(run_id, "val_loss").await?;
    let mut m = match run.final_metrics {
        serde_json::Value::Object(o) => o,
        _ => Default::default(),
    };
    if let Some(l) = loss.last() {
        m.insert("final_loss".into(), json!(l.value));
    }
    if let Some(v) = val.last() {
        m.insert("final_val_loss".into(), json!(v.value));
        m.insert("final_perplexity".into(), json!(v.value.exp()));
    }
    if let Some(best) = val.iter().min_by(|a, b| a.value.total_cmp(&b.value)) {
        m.insert("best_val_loss".into(), json!(best.value));
        m.insert("best_val_step".into(), json!(best.step));
        m.insert("best_perplexity".into(), json!(best.value.exp()));
    }
    if run.elapsed_s > 0.0 {
        m.insert("tokens_per_s".into(), json!(run.tokens_seen as f64 / run.elapsed_s));
    }
    m.insert("wall_s".into(), json!(run.elapsed_s));
    if let Some((c, t)) = heldout.0 {
        m.insert("heldout_before".into(), json!(c as f64 / t.max(1) as f64));
    }
    if let Some((c, t)) = heldout.1 {
        m.insert("heldout_after".into(), json!(c as f64 / t.max(1) as f64));
    }
    Ok(serde_json::Value::Object(m))
}
