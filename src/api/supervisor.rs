//! The supervisor: starts training workers (`tunebench worker train --run <id>`, one process
//! per run, each in its own process group so it outlives the app), reads their JSON-lines
//! events, stops them (SIGTERM → checkpoint and exit; SIGKILL after a timeout), runs a queue
//! with one training job per device, and at start-up re-attaches to workers it left running
//! or marks their runs `interrupted` when they are gone.
//!
//! The worker owns its run's row while it runs; the supervisor only changes a row whose worker
//! has disappeared (`Store::mark_interrupted` checks the pid), so a supervisor killed at any
//! moment leaves nothing inconsistent behind.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::{broadcast, Notify};

use super::worker::process_alive;
use super::ApiEvent;
use crate::store::{RunStatus, Store};
use crate::train::TrainEvent;
use crate::{Error, Result};

/// Lines of a worker's stderr kept for error reports.
const STDERR_TAIL: usize = 40;

/// Runs and watches training workers.
pub struct Supervisor {
    store: Store,
    exe: PathBuf,
    events: broadcast::Sender<ApiEvent>,
    /// Runs with a worker started or watched by this supervisor: run id → pid (0 while starting).
    workers: Mutex<HashMap<i64, i64>>,
    wake: Notify,
    /// How long a graceful stop may take before the worker is killed.
    pub stop_timeout: Duration,
}

impl Supervisor {
    /// A supervisor over `store` that starts workers with the binary `exe`.
    pub fn new(store: Store, exe: PathBuf, events: broadcast::Sender<ApiEvent>, stop_timeout: Duration) -> Arc<Self> {
        Arc::new(Supervisor { store, exe, events, workers: Mutex::new(HashMap::new()), wake: Notify::new(), stop_timeout })
    }

    /// Re-attaches to live workers of `running` runs and marks the others `interrupted`, then
    /// starts the queue. Call once, inside a tokio runtime.
    pub async fn start(self: &Arc<Self>) -> Result<()> {
        for (run_id, pid, start) in sweep(&self.store).await? {
            self.workers.lock().unwrap_or_else(|p| p.into_inner()).insert(run_id, pid);
            let me = self.clone();
            tokio::spawn(async move { me.watch_foreign(run_id, pid, start).await });
        }
        let me = self.clone();
        tokio::spawn(async move { me.schedule_loop().await });
        Ok(())
    }

    /// Wakes the queue (after a run was queued or reordered).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Run ids with a worker this supervisor started or watches.
    pub fn active(&self) -> Vec<i64> {
        self.workers.lock().unwrap_or_else(|p| p.into_inner()).keys().copied().collect()
    }

    async fn schedule_loop(self: Arc<Self>) {
        loop {
            if let Err(e) = self.schedule_once().await {
                tracing::warn!("queue: {e}");
            }
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            }
        }
    }

    /// Starts the first queued run of every idle device.
    async fn schedule_once(self: &Arc<Self>) -> Result<()> {
        let queued = self.store.runs_with_status(RunStatus::Queued).await?;
        if queued.is_empty() {
            return Ok(());
        }
        let running = self.store.runs_with_status(RunStatus::Running).await?;
        let mut busy: Vec<String> = running.iter().map(|r| r.device.clone()).collect();
        {
            let workers = self.workers.lock().unwrap_or_else(|p| p.into_inner());
            for r in queued.iter().filter(|r| workers.contains_key(&r.id)) {
                busy.push(r.device.clone());
            }
        }
        for run in queued {
            if busy.contains(&run.device) || self.workers.lock().unwrap_or_else(|p| p.into_inner()).contains_key(&run.id) {
                continue;
            }
            busy.push(run.device.clone());
            self.spawn_worker(run.id).await?;
        }
        Ok(())
    }

    async fn spawn_worker(self: &Arc<Self>, run_id: i64) -> Result<()> {
        let mut cmd = tokio::process::Command::new(&self.exe);
        cmd.arg("worker")
            .arg("train")
            .arg("--run")
            .arg(run_id.to_string())
            .arg("--db")
            .arg(self.store.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(false);
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                let reason = format!("cannot start the worker {}: {e}", self.exe.display());
                self.store.fail_queued(run_id, &reason).await?;
                let _ = self.events.send(ApiEvent::Status { run_id, status: RunStatus::Failed, error: Some(reason) });
                return Ok(());
            }
        };
        let pid = child.id().map(|p| p as i64).unwrap_or(0);
        self.workers.lock().unwrap_or_else(|p| p.into_inner()).insert(run_id, pid);
        let _ = self.events.send(ApiEvent::Status { run_id, status: RunStatus::Running, error: None });

        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let events = self.events.clone();
        // Whether the worker got as far as training (it claims the run before its first event).
        let out_task = tokio::spawn(async move {
            let mut trained = false;
            let Some(out) = stdout else { return trained };
            let mut lines = BufReader::new(out).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(event) = serde_json::from_str::<TrainEvent>(&line) {
                    trained = true;
                    let _ = events.send(ApiEvent::Train { run_id, event });
                }
            }
            trained
        });
        let err_task = tokio::spawn(async move {
            let mut tail = VecDeque::new();
            let Some(err) = stderr else { return tail };
            let mut lines = BufReader::new(err).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if tail.len() == STDERR_TAIL {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
            tail
        });
        let me = self.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            let trained = out_task.await.unwrap_or(false);
            let tail: Vec<String> = err_task.await.map(|t| t.into_iter().collect()).unwrap_or_default();
            let how = match status {
                Ok(s) => describe_exit(s),
                Err(e) => format!("could not be waited for: {e}"),
            };
            me.after_exit(run_id, pid, &how, &tail, trained).await;
        });
        Ok(())
    }

    /// Polls a worker this supervisor did not start (found running at start-up).
    async fn watch_foreign(self: Arc<Self>, run_id: i64, pid: i64, start: Option<i64>) {
        while process_alive(pid, start) {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        self.after_exit(run_id, pid, "ended", &[], true).await;
    }

    async fn after_exit(&self, run_id: i64, pid: i64, how: &str, stderr_tail: &[String], trained: bool) {
        {
            let mut workers = self.workers.lock().unwrap_or_else(|p| p.into_inner());
            if workers.get(&run_id) == Some(&pid) {
                workers.remove(&run_id);
            }
        }
        let detail = if stderr_tail.is_empty() { String::new() } else { format!(": {}", stderr_tail.join("\n")) };
        let reason = format!("the worker (pid {pid}) {how}{detail}");
        if let Ok(run) = self.store.run(run_id).await {
            match run.status {
                RunStatus::Running if run.worker_pid == Some(pid) => {
                    let _ = mark_gone(&self.store, run_id, pid, &reason).await;
                }
                // A worker that trained (stopped, then the run was queued again before its
                // exit was seen here) says nothing about the new attempt.
                RunStatus::Queued if !trained => {
                    // The worker died before claiming the run (bad binary, unreadable store).
                    let _ = self.store.fail_queued(run_id, &reason).await;
                }
                _ => {}
            }
        }
        if let Ok(run) = self.store.run(run_id).await {
            let _ = self.events.send(ApiEvent::Status { run_id, status: run.status, error: run.error });
        }
        self.wake.notify_one();
    }
}

/// Marks every `running` run whose worker is gone `interrupted`; returns the runs whose worker
/// is alive: (run id, pid, process start time).
pub async fn sweep(store: &Store) -> Result<Vec<(i64, i64, Option<i64>)>> {
    let mut live = Vec::new();
    for run in store.runs_with_status(RunStatus::Running).await? {
        let pid = run.worker_pid.unwrap_or(0);
        if pid > 0 && process_alive(pid, run.worker_start) {
            live.push((run.id, pid, run.worker_start));
        } else {
            mark_gone(store, run.id, pid, "its worker is gone (the app or machine stopped while it trained)").await?;
        }
    }
    Ok(live)
}

/// Marks a run whose worker is gone `interrupted` (resumable from its last checkpoint).
pub async fn mark_gone(store: &Store, run_id: i64, pid: i64, reason: &str) -> Result<bool> {
    store.mark_interrupted(run_id, pid, reason).await
}

/// A worker's exit in words ("exited with code 1", "was killed (SIGKILL; out of memory?)").
pub(crate) fn describe_exit(s: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (s.code(), s.signal()) {
        (Some(0), _) => "exited".into(),
        (Some(c), _) => format!("exited with code {c}"),
        (None, Some(9)) => "was killed (SIGKILL; out of memory?)".into(),
        (None, Some(sig)) => format!("was killed by signal {sig}"),
        _ => "ended".into(),
    }
}

/// Sends `sig` to a worker; Ok(false) when it is already gone.
pub fn signal_worker(pid: i64, start: Option<i64>, sig: libc::c_int) -> Result<bool> {
    if !process_alive(pid, start) {
        return Ok(false);
    }
    // SAFETY: kill(2) with a pid we recorded and checked (pid + start time) just now.
    let rc = unsafe { libc::kill(pid as libc::pid_t, sig) };
    if rc != 0 {
        return Err(Error::Msg(format!("cannot signal worker {pid}: {}", std::io::Error::last_os_error())));
    }
    Ok(true)
}
