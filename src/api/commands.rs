//! The app's command set: one [`Command`] per [`Workbench`] operation the UI uses, a coded
//! error, and [`Api`], which runs a command and answers JSON. The Tauri shell and
//! `tunebench serve` both forward to [`Api::call`], so the desktop app and the browser speak
//! exactly the same protocol (`{command, args}` in, the result or `{code, message}` out), and
//! the UI's TypeScript types are generated from these Rust types (see `tests/ts_bindings.rs`).
//!
//! Every path a command carries is listed by [`Command::paths`], so that `serve` can refuse a
//! request that names a file outside its allowed folders before anything reads it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use ts_rs::TS;

use super::chat::CreateChat;
use super::compare::CompareRequest;
use super::datasets::{ImportRequest, PreviewRequest};
use super::estimate::EstimateRequest;
use super::{CreateRun, RunChartRequest, Workbench};
use crate::chart::ImageFormat;
use crate::infer::SampleOptions;
use crate::schema::{Field, Text};
use crate::train::RunConfig;
use crate::{Error, Result};

/// One request of the app.
#[derive(Clone, Debug, Serialize, Deserialize, TS)]
#[serde(tag = "command", content = "args", rename_all = "snake_case")]
pub enum Command {
    /// Version, app data folder, default model. → [`AppInfo`]
    Info,
    /// Forms: every method's fields, the `[train]` and `[data]` fields, presets. → [`FormSchema`]
    Schema,
    /// Registered models (the default model is registered when present). → `ModelRecord[]`
    Models,
    /// Registers a local GGUF file or HF folder. → `ModelRecord`
    AddModel {
        /// The file or folder.
        path: PathBuf,
    },
    /// Looks a repo up on the hub (`$HF_ENDPOINT`): files and what can be loaded. → `HubRepo`
    HubLookup {
        /// `owner/name`.
        repo: String,
        /// Branch, tag or commit (default `main`).
        #[serde(default)]
        revision: Option<String>,
    },
    /// Starts a model download from the hub (progress as `download` events). → `DownloadJob`
    DownloadModel(super::downloads::DownloadRequest),
    /// Downloads of this session, newest first. → `DownloadJob[]`
    Downloads,
    /// Cancels a download (partial files are kept for the next try). → null
    CancelDownload {
        /// The job.
        id: i64,
    },
    /// Imported datasets. → `DatasetRecord[]`
    Datasets,
    /// Imports a dataset file. → `DatasetRecord`
    ImportDataset(ImportRequest),
    /// Renders examples through the chat template. → `Preview`
    PreviewDataset(PreviewRequest),
    /// Forgets an imported dataset. → null
    DeleteDataset {
        /// The dataset.
        id: i64,
    },
    /// Every run. → `RunRecord[]`
    Runs,
    /// One run with checkpoints, samples, logs. → `RunDetail`
    RunDetail {
        /// The run.
        id: i64,
    },
    /// Checks a run config as the engine will; the error names the key. → `RunConfig`
    ValidateConfig {
        /// The config (JSON form of `run.toml`).
        #[ts(type = "unknown")]
        config: Value,
    },
    /// Trainable parameters, memory and time of a config. → `Estimate`
    Estimate(EstimateRequest),
    /// Queues a run. → `RunRecord`
    CreateRun(CreateRun),
    /// Stops a run (checkpoint, then stop). → `RunStatus`
    StopRun {
        /// The run.
        id: i64,
    },
    /// Queues a stopped or interrupted run again from its newest checkpoint. → `RunRecord`
    ResumeRun {
        /// The run.
        id: i64,
    },
    /// Removes a run that has not started from the queue. → null
    CancelQueued {
        /// The run.
        id: i64,
    },
    /// Deletes a run's record (and its folder with `delete_files`). → null
    DeleteRun {
        /// The run.
        id: i64,
        /// Also delete the run folder.
        #[serde(default)]
        delete_files: bool,
    },
    /// A run's chart as SVG ("" before the first step). → string
    RunChartSvg(RunChartRequest),
    /// A run's chart as PNG, base64. → string
    RunChartPng(RunChartRequest),
    /// Several runs side by side (metrics, config diff, samples). → `Comparison`
    Compare(CompareRequest),
    /// The overlay chart of several runs as SVG. → string
    CompareChartSvg(CompareRequest),
    /// The overlay chart as PNG, base64. → string
    CompareChartPng(CompareRequest),
    /// The adapter folder of a run's checkpoint (default: final, else newest). → [`RunAdapter`]
    RunAdapter {
        /// The run.
        run_id: i64,
        /// Checkpoint step.
        #[serde(default)]
        step: Option<i64>,
    },
    /// Chat sessions. → `ChatRecord[]`
    Chats,
    /// One chat session. → `ChatRecord`
    Chat {
        /// The chat.
        id: i64,
    },
    /// Opens a chat session. → `ChatRecord`
    CreateChat(CreateChat),
    /// Deletes a chat session. → null
    DeleteChat {
        /// The chat.
        id: i64,
    },
    /// Changes a chat's sampling settings. → null
    SetChatSampling {
        /// The chat.
        id: i64,
        /// The settings.
        sampling: SampleOptions,
    },
    /// Sends a message; answers stream as events and return complete. → `ChatAnswer[]`
    ChatSend {
        /// The chat.
        chat_id: i64,
        /// The message.
        text: String,
    },
    /// Stops the answer being generated in a chat. → null
    ChatCancel {
        /// The chat.
        chat_id: i64,
    },
}

impl Command {
    /// Every file or folder the command names (to be checked against allowed folders).
    pub fn paths(&self) -> Vec<&Path> {
        fn config(c: &RunConfig) -> Vec<&Path> {
            let mut v: Vec<&Path> = vec![c.data.path.as_path()];
            v.extend(c.model.path.as_deref());
            v.extend(c.eval.prompts.as_deref());
            v.extend(c.output.dir.as_deref());
            v
        }
        match self {
            Command::AddModel { path } => vec![path.as_path()],
            Command::ImportDataset(r) => std::iter::once(r.path.as_path()).chain(r.model.as_deref()).collect(),
            Command::PreviewDataset(r) => r.path.as_deref().into_iter().chain(r.model.as_deref()).collect(),
            Command::Estimate(r) => config(&r.config),
            Command::CreateRun(r) => config(&r.config),
            Command::CreateChat(r) => r.model_path.as_deref().into_iter().chain(r.adapters.iter().map(|a| Path::new(&a.path))).collect(),
            _ => Vec::new(),
        }
    }
}

/// A failure as the UI receives it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, TS)]
pub struct ApiError {
    /// Machine-readable: `bad_input`, `config`, `not_found`, `io`, `network`, `out_of_memory`,
    /// `training`, `store`, `unauthorized`, `forbidden`, `path_not_allowed`, `bad_request`,
    /// `internal`.
    pub code: String,
    /// For the user, as it is.
    pub message: String,
}

impl ApiError {
    /// An error with a code.
    pub fn new(code: &str, message: impl Into<String>) -> Self {
        ApiError { code: code.into(), message: message.into() }
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let message = e.to_string();
        let lower = message.to_ascii_lowercase();
        let code = if lower.contains("out of memory") || lower.contains("cannot allocate memory") {
            "out_of_memory"
        } else {
            match &e {
                Error::BadInput { .. } => "bad_input",
                Error::Config { .. } => "config",
                Error::NotFound { .. } => "not_found",
                Error::Io { .. } => "io",
                Error::Training(_) => "training",
                Error::Store { .. } => "store",
                Error::Tokenizer(_) | Error::Template(_) => "bad_input",
                Error::Network { .. } => "network",
                Error::Candle(_) | Error::Msg(_) => "failed",
            }
        };
        ApiError { code: code.into(), message }
    }
}

/// Response of [`Command::Info`].
#[derive(Clone, Debug, Serialize, Deserialize, TS)]
pub struct AppInfo {
    /// Tunebench's version.
    pub version: String,
    /// The app data folder.
    pub home: String,
    /// The default model's path, when installed.
    pub default_model: Option<String>,
    /// The bundled sample dataset (training file).
    pub sample_dataset: Option<String>,
    /// CPU threads.
    pub cpus: usize,
    /// Installed memory, bytes.
    pub ram_bytes: Option<u64>,
    /// The devices a run or chat can ask for in this build (`auto`, `cpu`, and `cuda:0` in a
    /// CUDA build).
    pub devices: Vec<String>,
}

/// One method in [`FormSchema`].
#[derive(Clone, Debug, Serialize, Deserialize, TS)]
pub struct MethodSchema {
    /// Registry name (`lora`).
    pub name: String,
    /// HF peft's `peft_type`.
    pub peft_type: String,
    /// What it does.
    pub description: Text,
    /// Its keys.
    pub fields: Vec<Field>,
    /// Its default `[peft]` section (with `method`).
    #[ts(type = "Record<string, unknown>")]
    pub defaults: Value,
}

/// A bundled preset.
#[derive(Clone, Debug, Serialize, Deserialize, TS)]
pub struct PresetInfo {
    /// Name.
    pub name: String,
    /// What it does.
    pub description: Text,
    /// The whole config.
    pub config: RunConfig,
}

/// Response of [`Command::Schema`]: what the New run form is built from.
#[derive(Clone, Debug, Serialize, Deserialize, TS)]
pub struct FormSchema {
    /// Every PEFT method of this build.
    pub methods: Vec<MethodSchema>,
    /// `[train]` keys.
    pub train: Vec<Field>,
    /// `[data]` keys.
    pub data: Vec<Field>,
    /// Bundled presets.
    pub presets: Vec<PresetInfo>,
    /// Section titles.
    pub sections: Vec<(String, Text)>,
}

/// Response of [`Command::RunAdapter`].
#[derive(Clone, Debug, Serialize, Deserialize, TS)]
pub struct RunAdapter {
    /// The checkpoint's step.
    pub step: i64,
    /// The adapter folder.
    pub path: String,
}

/// Which paths a caller may name.
#[derive(Clone, Debug)]
pub enum PathPolicy {
    /// Any (the desktop app: the user's own machine and file pickers).
    Any,
    /// Only inside these folders (canonical); `serve`.
    Within(Vec<PathBuf>),
}

impl PathPolicy {
    /// Folders as given (made canonical; missing ones are created first).
    pub fn within(roots: &[PathBuf]) -> Result<PathPolicy> {
        let mut v = Vec::new();
        for r in roots {
            std::fs::create_dir_all(r).map_err(|e| Error::io(r, e))?;
            v.push(std::fs::canonicalize(r).map_err(|e| Error::io(r, e))?);
        }
        Ok(PathPolicy::Within(v))
    }

    /// Refuses `path` unless it lies inside an allowed folder (symbolic links and `..`
    /// resolved; for a path that does not exist yet, its nearest existing ancestor).
    pub fn check(&self, path: &Path) -> std::result::Result<(), ApiError> {
        let PathPolicy::Within(roots) = self else { return Ok(()) };
        let refuse = || ApiError::new("path_not_allowed", format!("{}: outside the folders this server may read or write", path.display()));
        if !path.is_absolute() {
            return Err(refuse());
        }
        let mut existing = path;
        let mut rest = Vec::new();
        while !existing.exists() {
            rest.push(existing.file_name().ok_or_else(refuse)?);
            existing = existing.parent().ok_or_else(refuse)?;
        }
        if rest.iter().any(|c| *c == "..") {
            return Err(refuse());
        }
        let real = std::fs::canonicalize(existing).map_err(|_| refuse())?;
        if roots.iter().any(|r| real.starts_with(r)) {
            Ok(())
        } else {
            Err(refuse())
        }
    }
}

/// Runs commands against a workbench (one per app or server).
pub struct Api {
    wb: Arc<Workbench>,
    policy: PathPolicy,
    cancels: Mutex<HashMap<i64, Arc<AtomicBool>>>,
}

impl Api {
    /// Commands on `wb`, naming only paths `policy` allows.
    pub fn new(wb: Arc<Workbench>, policy: PathPolicy) -> Self {
        Api { wb, policy, cancels: Mutex::new(HashMap::new()) }
    }

    /// The workbench.
    pub fn workbench(&self) -> &Arc<Workbench> {
        &self.wb
    }

    /// The path policy.
    pub fn policy(&self) -> &PathPolicy {
        &self.policy
    }

    /// Saves a file the user picked or dropped in the UI under `<app data>/uploads/` (never
    /// over an earlier one: `name`, `name-2`, ...) and returns its path, for `import_dataset`.
    pub fn save_upload(&self, name: &str, bytes: &[u8]) -> std::result::Result<PathBuf, ApiError> {
        let base = Path::new(name).file_name().map(|n| super::sanitize(&n.to_string_lossy())).unwrap_or_default();
        if base.is_empty() || base.starts_with('.') {
            return Err(ApiError::new("bad_request", format!("`{name}` is not a file name")));
        }
        let dir = self.wb.home().join("uploads");
        std::fs::create_dir_all(&dir).map_err(|e| ApiError::from(Error::io(&dir, e)))?;
        let (stem, ext) = match base.rsplit_once('.') {
            Some((a, b)) => (a.to_string(), format!(".{b}")),
            None => (base.clone(), String::new()),
        };
        for i in 1..10_000 {
            let path = dir.join(if i == 1 { base.clone() } else { format!("{stem}-{i}{ext}") });
            match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut f) => {
                    use std::io::Write;
                    f.write_all(bytes).and_then(|_| f.sync_all()).map_err(|e| ApiError::from(Error::io(&path, e)))?;
                    return Ok(path);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(Error::io(&path, e).into()),
            }
        }
        Err(ApiError::new("io", format!("{}: too many uploads named {base}", dir.display())))
    }

    /// Work the first screen would otherwise wait for, done in the background right after
    /// start: registering the installed default model (reads its GGUF metadata). (The matmul
    /// rate for estimates is measured at the first estimate: measuring it here would take both
    /// cores of a small machine just while the UI loads.)
    pub fn warm_up(self: &Arc<Self>) {
        let api = self.clone();
        tokio::spawn(async move {
            if let Err(e) = api.wb.models_with_default().await {
                tracing::warn!("registering the default model: {e}");
            }
        });
    }

    /// Parses `{command, args}` and runs it.
    pub async fn call_json(&self, request: Value) -> std::result::Result<Value, ApiError> {
        let cmd: Command = serde_json::from_value(request).map_err(|e| ApiError::new("bad_request", format!("bad request: {e}")))?;
        self.call(cmd).await
    }

    /// Runs one command after checking its paths.
    pub async fn call(&self, cmd: Command) -> std::result::Result<Value, ApiError> {
        for p in cmd.paths() {
            self.policy.check(p)?;
        }
        self.run(cmd).await.map_err(ApiError::from)
    }

    async fn run(&self, cmd: Command) -> Result<Value> {
        let wb = &self.wb;
        Ok(match cmd {
            Command::Info => out(&info()),
            Command::Schema => out(&form_schema()?),
            Command::Models => out(&wb.models_with_default().await?),
            Command::AddModel { path } => out(&wb.add_model(&path).await?),
            Command::HubLookup { repo, revision } => out(&wb.hub_lookup(&repo, revision.as_deref()).await?),
            Command::DownloadModel(r) => out(&wb.download_model(&r).await?),
            Command::Downloads => out(&wb.downloads()),
            Command::CancelDownload { id } => out(&wb.cancel_download(id)?),
            Command::Datasets => out(&wb.datasets().await?),
            Command::ImportDataset(r) => out(&wb.import_dataset(&r, |_, _| {}).await?),
            Command::PreviewDataset(r) => out(&wb.preview_dataset(&r).await?),
            Command::DeleteDataset { id } => out(&wb.delete_dataset(id).await?),
            Command::Runs => out(&wb.runs().await?),
            Command::RunDetail { id } => out(&wb.run_detail(id).await?),
            Command::ValidateConfig { config } => {
                let cfg: RunConfig = serde_json::from_value(config).map_err(|e| Error::config("config", e.to_string()))?;
                cfg.validate()?;
                out(&cfg)
            }
            Command::Estimate(r) => out(&wb.estimate(&r).await?),
            Command::CreateRun(r) => {
                r.config.validate()?;
                out(&wb.create_run(r).await?)
            }
            Command::StopRun { id } => out(&wb.stop_run(id).await?),
            Command::ResumeRun { id } => out(&wb.resume_run(id).await?),
            Command::CancelQueued { id } => out(&wb.cancel_queued(id).await?),
            Command::DeleteRun { id, delete_files } => out(&wb.delete_run(id, delete_files).await?),
            Command::RunChartSvg(r) => out(&wb.run_chart_svg(&r).await?),
            Command::RunChartPng(r) => {
                let spec = wb.run_chart_spec(&r).await?;
                if spec.panels.is_empty() {
                    return Err(Error::Msg(format!("run {} has no metrics to chart yet", r.run_id)));
                }
                out(&base64(&png(&spec)?))
            }
            Command::Compare(r) => out(&wb.compare(&r).await?),
            Command::CompareChartSvg(r) => out(&wb.compare_chart_svg(&r).await?),
            Command::CompareChartPng(r) => {
                out(&base64(&png(&wb.compare_chart_spec(&r).await?)?))
            }
            Command::RunAdapter { run_id, step } => {
                let (step, path) = wb.checkpoint_adapter(run_id, step).await?;
                out(&RunAdapter { step, path: path.display().to_string() })
            }
            Command::Chats => out(&wb.chats().await?),
            Command::Chat { id } => out(&wb.chat(id).await?),
            Command::CreateChat(r) => out(&wb.create_chat(r).await?),
            Command::DeleteChat { id } => out(&wb.delete_chat(id).await?),
            Command::SetChatSampling { id, sampling } => out(&wb.set_chat_sampling(id, &sampling).await?),
            Command::ChatSend { chat_id, text } => {
                let cancel = Arc::new(AtomicBool::new(false));
                self.lock_cancels().insert(chat_id, cancel.clone());
                let answers = wb.chat_send(chat_id, &text, cancel).await;
                self.lock_cancels().remove(&chat_id);
                out(&answers?)
            }
            Command::ChatCancel { chat_id } => {
                if let Some(c) = self.lock_cancels().get(&chat_id) {
                    c.store(true, std::sync::atomic::Ordering::SeqCst);
                }
                Value::Null
            }
        })
    }

    fn lock_cancels(&self) -> std::sync::MutexGuard<'_, HashMap<i64, Arc<AtomicBool>>> {
        self.cancels.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn png(spec: &crate::chart::ChartSpec) -> Result<Vec<u8>> {
    crate::chart::render_image(spec, ImageFormat::Png).map_err(|e| Error::Msg(e.to_string()))
}

/// A response as JSON (every response type serialises; Null would mean a bug, not bad input).
fn out<T: Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

/// [`Command::Info`].
pub fn info() -> AppInfo {
    let model = crate::paths::default_model();
    let sample = crate::paths::assets_dir().join("datasets").join("persona").join("train.jsonl");
    AppInfo {
        version: env!("CARGO_PKG_VERSION").into(),
        home: crate::paths::home().display().to_string(),
        default_model: model.exists().then(|| model.display().to_string()),
        sample_dataset: sample.exists().then(|| sample.display().to_string()),
        cpus: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        ram_bytes: super::estimate::machine_ram_bytes(),
        devices: crate::device::choices(),
    }
}

/// [`Command::Schema`].
pub fn form_schema() -> Result<FormSchema> {
    let methods = crate::peft::registry()
        .iter()
        .map(|m| MethodSchema {
            name: m.name.into(),
            peft_type: m.peft_type.into(),
            description: crate::schema::text(m.description, m.description_zh),
            fields: (m.fields)(),
            defaults: crate::peft::PeftConfig::default_for(m.name).map(|d| json!(d)).unwrap_or(Value::Null),
        })
        .collect();
    let presets = crate::train::config::PRESETS
        .iter()
        .map(|(name, en, zh, _)| Ok(PresetInfo { name: (*name).into(), description: crate::schema::text(en, zh), config: RunConfig::preset(name)? }))
        .collect::<Result<Vec<_>>>()?;
    let t = crate::schema::text;
    Ok(FormSchema {
        methods,
        train: crate::schema::train_fields(),
        data: crate::schema::data_fields(),
        presets,
        sections: vec![
            ("peft".into(), t("Method", "方法")),
            ("train".into(), t("Training", "训练")),
            ("data".into(), t("Data", "数据")),
        ],
    })
}

/// Standard base64 (RFC 4648, padded).
pub fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                s.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (i, o) in [("", ""), ("f", "Zg=="), ("fo", "Zm8="), ("foo", "Zm9v"), ("foob", "Zm9vYg=="), ("fooba", "Zm9vYmE="), ("foobar", "Zm9vYmFy")] {
            assert_eq!(base64(i.as_bytes()), o);
        }
    }

    #[test]
    fn path_policy_refuses_outside_and_dotdot() {
        let dir = tempfile::tempdir().unwrap();
        let allowed = dir.path().join("home");
        let policy = PathPolicy::within(std::slice::from_ref(&allowed)).unwrap();
        std::fs::write(allowed.join("a.jsonl"), "{}").unwrap();
        assert!(policy.check(&allowed.join("a.jsonl")).is_ok());
        assert!(policy.check(&allowed.join("new/run/dir")).is_ok(), "not-yet-existing folder inside");
        assert_eq!(policy.check(Path::new("/etc/passwd")).unwrap_err().code, "path_not_allowed");
        assert!(policy.check(&allowed.join("../outside")).is_err());
        assert!(policy.check(&allowed.join("missing/../../outside")).is_err());
        assert!(policy.check(Path::new("relative.jsonl")).is_err());
        std::os::unix::fs::symlink("/etc", allowed.join("link")).unwrap();
        assert!(policy.check(&allowed.join("link/passwd")).is_err(), "a symlink out of the folder is resolved");
        assert!(PathPolicy::Any.check(Path::new("/etc/passwd")).is_ok());
    }

    #[test]
    fn commands_list_their_paths() {
        let cmd: Command = serde_json::from_value(json!({"command": "import_dataset", "args": {"path": "/x/data.jsonl"}})).unwrap();
        assert_eq!(cmd.paths(), vec![Path::new("/x/data.jsonl")]);
        let cmd: Command = serde_json::from_value(json!({"command": "runs"})).unwrap();
        assert!(cmd.paths().is_empty());
    }

    #[test]
    fn form_schema_covers_every_method_with_checked_defaults() {
        let s = form_schema().unwrap();
        assert_eq!(s.methods.len(), crate::peft::registry().len());
        for m in &s.methods {
            assert!(!m.fields.is_empty(), "{} has no fields", m.name);
            for f in &m.fields {
                let d = m.defaults.get(&f.key).unwrap_or_else(|| panic!("{}.{} is not a key of its config", m.name, f.key));
                assert_eq!(d, &f.default, "{}.{}: schema default differs from the config's", m.name, f.key);
                assert!(f.check(d).is_none(), "{}.{}: default fails its own check", m.name, f.key);
                assert!(!f.help.en.is_empty() && !f.help.zh.is_empty());
            }
        }
        let train = serde_json::to_value(crate::train::config::TrainSection::default()).unwrap();
        for f in &s.train {
            assert_eq!(train.get(&f.key), Some(&f.default), "train.{}", f.key);
        }
        let lr = s.train.iter().find(|f| f.key == "lr").unwrap();
        assert!(lr.check(&json!(-1.0)).is_some() && lr.check(&json!("x")).is_some());
        let drop = &s.methods[0].fields.iter().find(|f| f.key == "lora_dropout").unwrap();
        assert!(drop.check(&json!(1.0)).is_some() && drop.check(&json!(0.5)).is_none());
    }
}
