//! Model downloads from the hub as background jobs of the workbench: each runs on its own
//! thread (see [`crate::hub`]), reports [`ApiEvent::Download`] as it goes, can be cancelled,
//! and registers the model when it completes.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use super::ApiEvent;
use crate::hub::{self, HubChoice, HubRepo, Progress};
use crate::store::Store;
use crate::{Error, Result};

/// Request: download a model from the hub.
#[derive(Clone, Debug, Serialize, Deserialize, ts_rs::TS)]
pub struct DownloadRequest {
    /// `owner/name`.
    pub repo: String,
    /// Branch, tag or commit (default `main`).
    #[serde(default)]
    pub revision: Option<String>,
    /// A GGUF file of the repo; None: the HF folder (safetensors + config + tokenizer).
    #[serde(default)]
    pub file: Option<String>,
}

/// Where a download stands.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, ts_rs::TS)]
#[serde(rename_all = "snake_case")]
pub enum DownloadState {
    /// Fetching files.
    Running,
    /// Complete; the model is registered.
    Done,
    /// Failed (see `error`).
    Failed,
    /// Cancelled by the user (partial files are kept for the next try).
    Cancelled,
}

/// A download job as the UI shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ts_rs::TS)]
pub struct DownloadJob {
    /// Job id (this app session).
    pub id: i64,
    /// `owner/name`.
    pub repo: String,
    /// The GGUF file, or None for the HF folder.
    pub file: Option<String>,
    /// State.
    pub state: DownloadState,
    /// Latest progress.
    pub progress: Option<Progress>,
    /// Why it failed.
    pub error: Option<String>,
    /// The registered model, once done.
    pub model_id: Option<i64>,
    /// Where the files go.
    pub path: String,
}

#[derive(Default)]
pub(crate) struct Downloads {
    jobs: Mutex<BTreeMap<i64, (DownloadJob, Arc<AtomicBool>)>>,
}

impl Downloads {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<i64, (DownloadJob, Arc<AtomicBool>)>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn list(&self) -> Vec<DownloadJob> {
        self.lock().values().rev().map(|(j, _)| j.clone()).collect()
    }

    pub(crate) fn cancel(&self, id: i64) -> Result<()> {
        let jobs = self.lock();
        let (_, flag) = jobs.get(&id).ok_or(Error::NotFound { what: "download", id })?;
        flag.store(true, Ordering::SeqCst);
        Ok(())
    }

    fn update(&self, events: &broadcast::Sender<ApiEvent>, id: i64, f: impl FnOnce(&mut DownloadJob)) {
        let job = {
            let mut jobs = self.lock();
            let Some((job, _)) = jobs.get_mut(&id) else { return };
            f(job);
            job.clone()
        };
        let _ = events.send(ApiEvent::Download { job });
    }

    /// Starts downloading `choice` of `repo` into `<models>/hub/<owner>--<name>`; the same
    /// download already running is returned instead of started twice.
    pub(crate) fn start(
        self: &Arc<Self>,
        repo: HubRepo,
        choice: HubChoice,
        models_dir: &std::path::Path,
        store: Store,
        events: broadcast::Sender<ApiEvent>,
    ) -> Result<DownloadJob> {
        let dir = hub::local_dir(models_dir, &repo.repo);
        let (job, cancel) = {
            let mut jobs = self.lock();
            if let Some((j, _)) =
                jobs.values().find(|(j, _)| j.state == DownloadState::Running && j.repo == repo.repo && j.file == choice.file)
            {
                return Ok(j.clone());
            }
            let id = jobs.keys().next_back().copied().unwrap_or(0) + 1;
            let job = DownloadJob {
                id,
                repo: repo.repo.clone(),
                file: choice.file.clone(),
                state: DownloadState::Running,
                progress: Some(Progress { file: String::new(), done: 0, total: choice.size, bytes_per_sec: 0.0 }),
                error: None,
                model_id: None,
                path: dir.display().to_string(),
            };
            let cancel = Arc::new(AtomicBool::new(false));
            jobs.insert(id, (job.clone(), cancel.clone()));
            (job, cancel)
        };
        let _ = events.send(ApiEvent::Download { job: job.clone() });
        let (me, id, rt, thread_events) = (self.clone(), job.id, tokio::runtime::Handle::current(), events.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("download-{id}"))
            .spawn(move || {
                let result = hub::download(&repo, &choice, &dir, &cancel, &mut |p| {
                    me.update(&thread_events, id, |j| j.progress = Some(p.clone()));
                })
                .and_then(|path| rt.block_on(super::register_model(&store, &path)));
                me.update(&thread_events, id, |j| match result {
                    Ok(model) => {
                        j.state = DownloadState::Done;
                        j.model_id = Some(model.id);
                        j.path = model.path;
                    }
                    Err(_) if cancel.load(Ordering::SeqCst) => j.state = DownloadState::Cancelled,
                    Err(e) => {
                        j.state = DownloadState::Failed;
                        j.error = Some(e.to_string());
                    }
                });
            });
        if let Err(e) = spawned {
            // No thread to be had (the system is out of them): the job fails, not the app.
            let reason = format!("cannot start a download thread: {e}");
            self.update(&events, id, |j| {
                j.state = DownloadState::Failed;
                j.error = Some(reason.clone());
            });
            return Err(Error::Msg(reason));
        }
        Ok(job)
    }
}

/// Picks the choice `file` names (None: the HF folder) or explains what the repo offers.
pub(crate) fn pick(repo: &HubRepo, file: Option<&str>) -> Result<HubChoice> {
    let found = repo.choices.iter().find(|c| match file {
        Some(f) => c.file.as_deref() == Some(f),
        None => c.kind == "hf",
    });
    if let Some(c) = found {
        return Ok(c.clone());
    }
    let offered: Vec<String> = repo.choices.iter().map(|c| c.file.clone().unwrap_or_else(|| "the HF folder (no file)".into())).collect();
    let what = file.map(|f| format!("`{f}`")).unwrap_or_else(|| "HF folder (config.json + tokenizer.json + *.safetensors)".into());
    Err(Error::config(
        "file",
        if offered.is_empty() {
            format!("`{}` has nothing Tunebench can load: {}", repo.repo, repo.note.clone().unwrap_or_default())
        } else {
            format!("`{}` has no {what}; it offers: {}", repo.repo, offered.join(", "))
        },
    ))
}
