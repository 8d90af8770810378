//! The engine's application API: [`Workbench`] is everything the desktop app, the HTTP
//! server and the CLI do — runs (create, queue, stop, resume, delete), live events, metrics,
//! charts, comparison, datasets and estimates — with serde types for every request, response
//! and event.
//!
//! Training never runs inside the caller: the [`Supervisor`] starts one worker process per run
//! (`tunebench worker train`, see [`worker`]). The CLI's `tunebench train` is the exception: it
//! runs [`worker::run_worker`] in its own process, in the foreground, recorded the same way.

pub mod bench;
pub mod chat;
pub mod chat_worker;
pub mod commands;
pub mod compare;
pub mod datasets;
pub mod downloads;
pub mod estimate;
pub mod evaluate;
pub mod supervisor;
pub mod worker;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

pub use supervisor::Supervisor;

use crate::chart::{self, ChartSpec, ImageFormat, Theme, XAxis};
use crate::store::{CheckpointRecord, MetricPoint, NewRun, RunRecord, RunStatus, SampleRecord, Store};
use crate::train::{RunConfig, TrainEvent};
use crate::{Error, Result};

/// Everything the workbench reports as it happens.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ts_rs::TS)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ApiEvent {
    /// A training event of a run (as its worker emitted it).
    Train {
        /// The run.
        run_id: i64,
        /// The event.
        event: TrainEvent,
    },
    /// A run changed status.
    Status {
        /// The run.
        run_id: i64,
        /// The new status.
        status: RunStatus,
        /// Error text, when failed or interrupted.
        error: Option<String>,
    },
    /// A piece of a chat answer, as it is generated.
    ChatText {
        /// The chat.
        chat_id: i64,
        /// The turn being answered.
        turn: i64,
        /// Who is answering (None = the base model).
        variant: Option<String>,
        /// New text.
        text: String,
    },
    /// Evaluation progress of a run's checkpoint.
    EvalProgress {
        /// The run.
        run_id: i64,
        /// Answers generated.
        done: usize,
        /// Examples to answer.
        total: usize,
    },
    /// A chat answer is complete.
    ChatDone {
        /// The chat.
        chat_id: i64,
        /// The turn.
        turn: i64,
        /// The whole answer.
        answer: chat::ChatAnswer,
    },
    /// A model download from the hub progressed, finished or failed.
    Download {
        /// The job as it stands.
        job: downloads::DownloadJob,
    },
}

/// How to open a workbench.
#[derive(Clone, Debug)]
pub struct WorkbenchOptions {
    /// The app data dir (store, runs, models).
    pub home: PathBuf,
    /// The `tunebench` binary that training and chat workers run (default: this executable).
    pub worker_exe: Option<PathBuf>,
    /// Start the supervisor and the queue (the app and `serve`); the CLI's one-shot commands
    /// only read and signal.
    pub supervise: bool,
    /// How long a graceful stop may take before the worker is killed.
    pub stop_timeout: Duration,
}

impl WorkbenchOptions {
    /// Options for the app data dir `home`.
    pub fn new(home: impl Into<PathBuf>) -> Self {
        WorkbenchOptions { home: home.into(), worker_exe: None, supervise: false, stop_timeout: Duration::from_secs(120) }
    }
}

/// Request: create a run.
#[derive(Clone, Debug, Serialize, Deserialize, ts_rs::TS)]
pub struct CreateRun {
    /// The full configuration.
    pub config: RunConfig,
    /// Imported dataset it uses, if any.
    #[serde(default)]
    pub dataset_id: Option<i64>,
    /// Device to train on (`auto`, `cpu`, `cuda:N`); empty = the config's `train.device`.
    /// Runs on one device wait for each other in the queue.
    #[serde(default)]
    pub device: String,
}

/// Response: a run with everything recorded about it.
#[derive(Clone, Debug, Serialize, Deserialize, ts_rs::TS)]
pub struct RunDetail {
    /// The run.
    pub run: RunRecord,
    /// Its checkpoints.
    pub checkpoints: Vec<CheckpointRecord>,
    /// Sample generations.
    pub samples: Vec<SampleRecord>,
    /// The newest log lines (Unix ms, text).
    pub logs: Vec<(i64, String)>,
    /// Metric names recorded.
    pub metric_names: Vec<String>,
}

/// Request: a run's live chart.
#[derive(Clone, Debug, Serialize, Deserialize, ts_rs::TS)]
pub struct RunChartRequest {
    /// The run.
    pub run_id: i64,
    /// X axis.
    #[serde(default)]
    pub x_axis: XAxis,
    /// Theme.
    #[serde(default)]
    pub theme: Theme,
    /// Size in pixels.
    #[serde(default = "default_width")]
    pub width: u32,
    /// Size in pixels.
    #[serde(default = "default_height")]
    pub height: u32,
}

pub(crate) fn default_width() -> u32 {
    960
}
fn default_height() -> u32 {
    720
}

/// The workbench: one per app (or per CLI command).
pub struct Workbench {
    store: Store,
    home: PathBuf,
    events: broadcast::Sender<ApiEvent>,
    supervisor: Option<Arc<Supervisor>>,
    stop_timeout: Duration,
    worker_exe: Option<PathBuf>,
    chat_worker: tokio::sync::Mutex<Option<chat_worker::ChatWorker>>,
    /// The chat worker's pid (0: none), readable while it answers.
    chat_pid: std::sync::atomic::AtomicU32,
    downloads: Arc<downloads::Downloads>,
}

impl Workbench {
    /// Opens the store of `opts.home`; marks runs whose worker is gone as `interrupted`; with
    /// `supervise`, re-attaches to live workers and starts the queue.
    pub async fn open(opts: WorkbenchOptions) -> Result<Workbench> {
        let store = Store::open(&opts.home.join(crate::store::DB_FILE)).await?;
        let (events, _) = broadcast::channel(4096);
        let worker_exe = opts.worker_exe.clone().or_else(|| std::env::current_exe().ok());
        let supervisor = if opts.supervise {
            let exe = worker_exe.clone().ok_or_else(|| Error::Msg("cannot find the tunebench binary to run workers".into()))?;
            let sup = Supervisor::new(store.clone(), exe, events.clone(), opts.stop_timeout);
            sup.start().await?;
            Some(sup)
        } else {
            supervisor::sweep(&store).await?;
            None
        };
        Ok(Workbench {
            store,
            home: opts.home,
            events,
            supervisor,
            stop_timeout: opts.stop_timeout,
            worker_exe,
            chat_worker: Default::default(),
            chat_pid: Default::default(),
            downloads: Default::default(),
        })
    }

    /// The run store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The app data dir.
    pub fn home(&self) -> &Path {
        &self.home
    }

    /// Live events (runs started by this workbench's supervisor, status changes).
    pub fn subscribe(&self) -> broadcast::Receiver<ApiEvent> {
        self.events.subscribe()
    }

    /// Records a new run (status `queued`). Its folder is `<home>/runs/<id>-<name>` unless the
    /// config names one. With a supervisor, the queue starts it when its device is free.
    pub async fn create_run(&self, req: CreateRun) -> Result<RunRecord> {
        let mut cfg = req.config;
        if !req.device.is_empty() {
            cfg.train.device = req.device.clone();
        }
        let device = crate::device::queue_key(&cfg.train.device, "train.device")?;
        if cfg.model.path.is_none() {
            cfg.model.path = Some(cfg.model_path());
        }
        let data_path = cfg.data.path.clone();
        if !data_path.is_file() {
            return Err(Error::bad_input(&data_path, None, "the dataset file does not exist (moved or deleted?)"));
        }
        // Record plain absolute paths (`a/../b` makes config diffs noisy).
        let data_path = std::fs::canonicalize(&data_path).unwrap_or(data_path);
        cfg.data.path = data_path.clone();
        if let Some(p) = cfg.eval.prompts.as_ref().and_then(|p| std::fs::canonicalize(p).ok()) {
            cfg.eval.prompts = Some(p);
        }
        let model_path = cfg.model_path();
        if !model_path.exists() {
            return Err(Error::bad_input(&model_path, None, "the base model does not exist"));
        }
        let model = self.add_model(&model_path).await?;
        let model_path = PathBuf::from(&model.path);
        let model_id = model.id;
        let new = NewRun {
            model_id: Some(model_id),
            name: cfg.name.clone(),
            method: cfg.peft.method_name().to_string(),
            config: serde_json::to_value(&cfg).map_err(|e| Error::Msg(e.to_string()))?,
            model_path: model_path.display().to_string(),
            dataset_path: data_path.display().to_string(),
            dataset_id: req.dataset_id,
            out_dir: String::new(),
            device,
        };
        let id = self.store.insert_run(&new).await?;
        if cfg.output.dir.is_none() {
            cfg.output.dir = Some(self.home.join("runs").join(format!("{id}-{}", sanitize(&cfg.name))));
        }
        let out_dir = cfg.output_dir();
        let config = serde_json::to_value(&cfg).map_err(|e| Error::Msg(e.to_string()))?;
        self.store.set_out_dir(id, &out_dir.display().to_string(), &config).await?;
        if let Some(s) = &self.supervisor {
            s.wake();
        }
        self.store.run(id).await
    }

    /// Imported datasets, newest first.
    pub async fn datasets(&self) -> Result<Vec<crate::store::DatasetRecord>> {
        self.store.datasets().await
    }

    /// Forgets an imported dataset (the file is not touched).
    pub async fn delete_dataset(&self, id: i64) -> Result<()> {
        self.store.delete_dataset(id).await
    }

    /// Registered base models.
    pub async fn models(&self) -> Result<Vec<crate::store::ModelRecord>> {
        self.store.models().await
    }

    /// Registered base models, the installed default model first registered when it is not
    /// yet (so the app has a model ready on first start).
    pub async fn models_with_default(&self) -> Result<Vec<crate::store::ModelRecord>> {
        let default = crate::paths::default_model();
        let have = self.store.models().await?;
        let known = |p: &Path| have.iter().any(|m| Path::new(&m.path) == p);
        if default.is_file() && !known(&std::fs::canonicalize(&default).unwrap_or(default.clone())) {
            self.add_model(&default).await?;
            return self.store.models().await;
        }
        Ok(have)
    }

    /// Registers a base model (a `.gguf` file or a HF folder) after reading its config; the
    /// same path again updates the record.
    pub async fn add_model(&self, path: &Path) -> Result<crate::store::ModelRecord> {
        register_model(&self.store, path).await
    }

    /// Looks a repo up on the hub: its files and what can be loaded from it.
    pub async fn hub_lookup(&self, repo: &str, revision: Option<&str>) -> Result<crate::hub::HubRepo> {
        let (repo, revision) = (repo.trim().to_string(), revision.map(str::to_string));
        tokio::task::spawn_blocking(move || crate::hub::lookup(&repo, revision.as_deref()))
            .await
            .map_err(|e| Error::Msg(format!("hub lookup: {e}")))?
    }

    /// Starts downloading a model from the hub into `<home>/models/hub/`; progress arrives as
    /// [`ApiEvent::Download`], and the model is registered when it completes.
    pub async fn download_model(&self, req: &downloads::DownloadRequest) -> Result<downloads::DownloadJob> {
        let repo = self.hub_lookup(&req.repo, req.revision.as_deref()).await?;
        self.download_from(repo, req.file.as_deref())
    }

    /// [`download_model`](Self::download_model) from a repo already looked up (`file`: a
    /// GGUF file of it; None: its HF folder).
    pub fn download_from(&self, repo: crate::hub::HubRepo, file: Option<&str>) -> Result<downloads::DownloadJob> {
        let choice = downloads::pick(&repo, file)?;
        self.downloads.start(repo, choice, &self.home.join("models"), self.store.clone(), self.events.clone())
    }

    /// Downloads of this session, newest first.
    pub fn downloads(&self) -> Vec<downloads::DownloadJob> {
        self.downloads.list()
    }

    /// Cancels a running download (its partial files stay, so the next try resumes).
    pub fn cancel_download(&self, id: i64) -> Result<()> {
        self.downloads.cancel(id)
    }

    /// Every run, newest first.
    pub async fn runs(&self) -> Result<Vec<RunRecord>> {
        self.store.runs().await
    }

    /// One run with its checkpoints, samples and log tail.
    pub async fn run_detail(&self, id: i64) -> Result<RunDetail> {
        Ok(RunDetail {
            run: self.store.run(id).await?,
            checkpoints: self.store.checkpoints(id).await?,
            samples: self.store.samples(id).await?,
            logs: self.store.logs(id, 200).await?,
            metric_names: self.store.metric_names(id).await?,
        })
    }

    /// One metric series of a run.
    pub async fn metrics(&self, id: i64, name: &str) -> Result<Vec<MetricPoint>> {
        self.store.run(id).await?;
        self.store.series(id, name).await
    }

    /// Asks a run to stop. Queued: taken out of the queue. Running: SIGTERM (the worker
    /// checkpoints and exits, status `stopped`); if it is still alive after the stop timeout it
    /// is killed and marked `interrupted`. Returns the status once the run has left `running`.
    pub async fn stop_run(&self, id: i64) -> Result<RunStatus> {
        let run = self.store.run(id).await?;
        match run.status {
            RunStatus::Queued => {
                self.store.cancel_queued(id).await?;
                Ok(RunStatus::Stopped)
            }
            RunStatus::Running => {
                let pid = run.worker_pid.unwrap_or(0);
                supervisor::signal_worker(pid, run.worker_start, libc::SIGTERM)?;
                let deadline = Instant::now() + self.stop_timeout;
                loop {
                    let r = self.store.run(id).await?;
                    if r.status != RunStatus::Running || r.worker_pid != Some(pid) {
                        return Ok(r.status);
                    }
                    if !worker::process_alive(pid, run.worker_start) {
                        supervisor::mark_gone(&self.store, id, pid, "the worker died while stopping").await?;
                        return Ok(RunStatus::Interrupted);
                    }
                    if Instant::now() > deadline {
                        // Marked first so the reason is this one, not the watcher's "was killed";
                        // anything the worker writes in between lies after its last checkpoint
                        // and is discarded on resume.
                        let reason = format!("killed: it did not stop within the stop timeout ({:?})", self.stop_timeout);
                        supervisor::mark_gone(&self.store, id, pid, &reason).await?;
                        supervisor::signal_worker(pid, run.worker_start, libc::SIGKILL)?;
                        return Ok(RunStatus::Interrupted);
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            s => Err(Error::Msg(format!("run {id} is {s}, not running or queued"))),
        }
    }

    /// Queues a stopped, interrupted or failed run again; it continues from its last
    /// checkpoint.
    pub async fn resume_run(&self, id: i64) -> Result<RunRecord> {
        self.store.enqueue(id).await?;
        if let Some(s) = &self.supervisor {
            s.wake();
        }
        self.store.run(id).await
    }

    /// Takes a queued run out of the queue.
    pub async fn cancel_queued(&self, id: i64) -> Result<()> {
        self.store.cancel_queued(id).await
    }

    /// Puts `ids` (queued runs) first in the queue, in this order.
    pub async fn reorder_queue(&self, ids: &[i64]) -> Result<()> {
        self.store.reorder_queue(ids).await
    }

    /// Deletes a run's records and, with `delete_files`, its folder (only a folder inside
    /// `<home>/runs`, never one the user pointed elsewhere).
    pub async fn delete_run(&self, id: i64, delete_files: bool) -> Result<()> {
        let run = self.store.run(id).await?;
        self.store.delete_run(id).await?;
        if delete_files && !run.out_dir.is_empty() {
            let dir = PathBuf::from(&run.out_dir);
            let runs = self.home.join("runs");
            if dir.starts_with(&runs) && dir != runs && dir.is_dir() {
                std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
            }
        }
        Ok(())
    }

    /// Waits until run `id` leaves `queued`/`running` (tests, CLI `--wait`).
    pub async fn wait_run(&self, id: i64, timeout: Duration) -> Result<RunRecord> {
        let deadline = Instant::now() + timeout;
        loop {
            let r = self.store.run(id).await?;
            if !matches!(r.status, RunStatus::Queued | RunStatus::Running) {
                return Ok(r);
            }
            if Instant::now() > deadline {
                return Err(Error::Msg(format!("run {id} is still {} after {:?}", r.status, timeout)));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// A run's chart spec: loss (train and validation) and the secondary panels.
    pub async fn run_chart_spec(&self, req: &RunChartRequest) -> Result<ChartSpec> {
        let run = self.store.run(req.run_id).await?;
        let x = |p: &[MetricPoint]| compare::xy(p, req.x_axis);
        let loss = self.store.series(run.id, "loss").await?;
        let val = self.store.series(run.id, "val_loss").await?;
        let lr = self.store.series(run.id, "lr").await?;
        let gn = self.store.series(run.id, "grad_norm").await?;
        let tps = self.store.series(run.id, "tokens_per_s").await?;
        Ok(chart::run_chart(&run.name, x(&loss), x(&val), x(&lr), x(&gn), x(&tps), req.x_axis, req.theme, req.width, req.height))
    }

    /// A run's chart as SVG (for the UI); empty before the first step is recorded.
    pub async fn run_chart_svg(&self, req: &RunChartRequest) -> Result<String> {
        let spec = self.run_chart_spec(req).await?;
        if spec.panels.is_empty() {
            return Ok(String::new());
        }
        chart::render_svg(&spec).map_err(|e| Error::Msg(e.to_string()))
    }

    /// Writes a chart spec to `path` (SVG or PNG by extension), never over an existing file
    /// unless `overwrite`.
    pub fn export_chart(spec: &ChartSpec, path: &Path, overwrite: bool) -> Result<()> {
        if ImageFormat::from_path(path).is_none() {
            return Err(Error::bad_input(path, None, "unknown image type: use .svg or .png"));
        }
        if path.exists() && !overwrite {
            return Err(Error::bad_input(path, None, "the file exists; choose another name or allow overwriting"));
        }
        chart::render_to_file(spec, path).map_err(|e| Error::bad_input(path, None, e.to_string()))
    }
}

/// A name safe for a folder: letters, digits, `-`, `_`, `.`; others become `_`.
pub fn sanitize(name: &str) -> String {
    let s: String = name.chars().map(|c| if c.is_alphanumeric() || "-_.".contains(c) { c } else { '_' }).take(64).collect();
    if s.is_empty() || s.starts_with('.') {
        format!("run{s}")
    } else {
        s
    }
}

/// [`Workbench::add_model`] on a store.
pub(crate) async fn register_model(store: &Store, path: &Path) -> Result<crate::store::ModelRecord> {
    if !path.exists() {
        return Err(Error::bad_input(path, None, "no such model file or folder"));
    }
    let path = std::fs::canonicalize(path).map_err(|e| Error::io(path, e))?;
    let arch = crate::model::load_config(&path)?;
    // A folder's whole name (`Qwen2.5-0.5B` has no extension to strip).
    let name = if path.is_file() { path.file_stem() } else { path.file_name() };
    let name = name.map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let id = store
        .upsert_model(
            &name,
            &path.display().to_string(),
            if path.is_file() { "gguf" } else { "hf" },
            Some(estimate::total_params(&arch) as i64),
            &serde_json::to_value(&arch).map_err(|e| Error::Msg(e.to_string()))?,
        )
        .await?;
    store.models().await?.into_iter().find(|m| m.id == id).ok_or(Error::NotFound { what: "model", id })
}
