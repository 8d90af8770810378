//! The run store: one SQLite file (`<app data>/tunebench.db`) that records models, dataset
//! imports, runs, their metrics, checkpoints, sample generations and log lines.
//!
//! * Opened with WAL journaling, `synchronous = NORMAL` (a commit is durable once the WAL is
//!   synced at checkpoint; a crash of the process never corrupts the file), a busy timeout
//!   (workers and the app write concurrently) and foreign keys on.
//! * The schema lives in `migrations/`, embedded with `sqlx::migrate!` and applied on open;
//!   applying them again is a no-op.
//! * Workers write in batches ([`WriteBatch`]): one transaction per batch, so a batch (for
//!   example a checkpoint row together with every metric row up to its step) is all there or
//!   not at all.
//! * Metrics are one row per (run, name, step) in a `WITHOUT ROWID` table clustered on that
//!   key: reading a series is one range scan, and recording a step twice fails loudly.
//!
//! Everything here is async (sqlx); synchronous callers (the training worker) drive it with
//! a small current-thread runtime.

pub mod chats;
pub mod evals;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow, SqliteSynchronous};
use sqlx::Row;

use crate::{Error, Result};
pub use chats::{ChatAdapter, ChatMessage, ChatRecord, NewAnswer, NewChat};
pub use evals::EvalSampleRecord;

/// The file name of the store inside the app data dir.
pub const DB_FILE: &str = "tunebench.db";

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Where a run is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Hash, ts_rs::TS)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    /// Waiting for its device.
    Queued,
    /// A worker is training it.
    Running,
    /// Trained to the end.
    Completed,
    /// Ended by an error (the run's `error` says which).
    Failed,
    /// Stopped on request after a checkpoint; resumable.
    Stopped,
    /// Its worker disappeared (killed, crashed, machine rebooted); resumable from the last
    /// checkpoint.
    Interrupted,
}

impl RunStatus {
    /// The name stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Queued => "queued",
            RunStatus::Running => "running",
            RunStatus::Completed => "completed",
            RunStatus::Failed => "failed",
            RunStatus::Stopped => "stopped",
            RunStatus::Interrupted => "interrupted",
        }
    }
    /// True when a worker may pick the run up (again).
    pub fn is_resumable(self) -> bool {
        matches!(self, RunStatus::Queued | RunStatus::Failed | RunStatus::Stopped | RunStatus::Interrupted)
    }
}

impl FromStr for RunStatus {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s {
            "queued" => RunStatus::Queued,
            "running" => RunStatus::Running,
            "completed" => RunStatus::Completed,
            "failed" => RunStatus::Failed,
            "stopped" => RunStatus::Stopped,
            "interrupted" => RunStatus::Interrupted,
            other => return Err(format!("unknown run status `{other}`")),
        })
    }
}

impl std::fmt::Display for RunStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A run as recorded.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ts_rs::TS)]
pub struct RunRecord {
    /// Run id.
    pub id: i64,
    /// Display name.
    pub name: String,
    /// Status.
    pub status: RunStatus,
    /// PEFT method (`lora`, ...).
    pub method: String,
    /// The full run configuration (JSON of `RunConfig`).
    pub config: serde_json::Value,
    /// Registered base model, if any.
    pub model_id: Option<i64>,
    /// Base model file or folder.
    pub model_path: String,
    /// Imported dataset, if any.
    pub dataset_id: Option<i64>,
    /// Dataset file.
    pub dataset_path: String,
    /// The run folder (checkpoints, final adapter).
    pub out_dir: String,
    /// `cpu`, `cuda:0`, ...
    pub device: String,
    /// Position in the device's queue while queued.
    pub queue_pos: Option<i64>,
    /// Created (Unix ms).
    pub created_at: i64,
    /// First started (Unix ms).
    pub started_at: Option<i64>,
    /// Ended (Unix ms).
    pub finished_at: Option<i64>,
    /// Why it failed or was interrupted.
    pub error: Option<String>,
    /// The worker process while running.
    pub worker_pid: Option<i64>,
    /// The worker's start time in clock ticks since boot (guards against pid reuse).
    pub worker_start: Option<i64>,
    /// Optimizer steps done.
    pub step: i64,
    /// Optimizer steps planned.
    pub total_steps: Option<i64>,
    /// Tokens trained on.
    pub tokens_seen: i64,
    /// Training wall time so far (s).
    pub elapsed_s: f64,
    /// Final metrics (JSON object: final_loss, best_val_loss, heldout_after, ...).
    pub final_metrics: serde_json::Value,
    /// Peak resident memory of the worker.
    pub peak_rss_bytes: Option<i64>,
    /// Trainable parameters.
    pub trainable_params: Option<i64>,
    /// All parameters of the base model.
    pub total_params: Option<i64>,
}

/// A run to insert.
#[derive(Clone, Debug)]
pub struct NewRun {
    /// Display name.
    pub name: String,
    /// PEFT method.
    pub method: String,
    /// Full config (JSON).
    pub config: serde_json::Value,
    /// Registered base model.
    pub model_id: Option<i64>,
    /// Base model path.
    pub model_path: String,
    /// Dataset path.
    pub dataset_path: String,
    /// Imported dataset id.
    pub dataset_id: Option<i64>,
    /// Run folder.
    pub out_dir: String,
    /// Device.
    pub device: String,
}

/// One metric value.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct MetricRow {
    /// `loss`, `val_loss`, `lr`, `grad_norm`, `tokens_per_s`, ...
    pub name: String,
    /// Optimizer step.
    pub step: i64,
    /// Tokens seen at this step.
    pub tokens: i64,
    /// Training wall time at this step (s).
    pub wall_s: f64,
    /// The value.
    pub value: f64,
}

/// One point of a series (what charts read).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, ts_rs::TS)]
pub struct MetricPoint {
    /// Step.
    pub step: i64,
    /// Tokens seen.
    pub tokens: i64,
    /// Wall time (s).
    pub wall_s: f64,
    /// Value.
    pub value: f64,
}

/// A checkpoint row.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ts_rs::TS)]
pub struct CheckpointRecord {
    /// Step.
    pub step: i64,
    /// Its folder.
    pub path: String,
    /// Validation loss at that step, when measured.
    pub val_loss: Option<f64>,
    /// Written (Unix ms).
    pub created_at: i64,
    /// Pruned from disk (`keep_checkpoints`).
    pub removed: bool,
}

/// A sample generation made during training.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ts_rs::TS)]
pub struct SampleRecord {
    /// Step.
    pub step: i64,
    /// Prompt (user message).
    pub prompt: String,
    /// Generated answer.
    pub output: String,
}

/// What a worker writes in one transaction.
#[derive(Clone, Debug, Default)]
pub struct WriteBatch {
    /// Metric values.
    pub metrics: Vec<MetricRow>,
    /// Sample generations.
    pub samples: Vec<SampleRecord>,
    /// Log lines.
    pub logs: Vec<String>,
    /// A checkpoint written to disk (recorded after every metric of this batch).
    pub checkpoint: Option<(i64, String, Option<f64>)>,
    /// Checkpoints pruned from disk (steps).
    pub removed_checkpoints: Vec<i64>,
    /// Progress: (step, tokens_seen, elapsed_s).
    pub progress: Option<(i64, i64, f64)>,
    /// Known once training starts: (total_steps, trainable_params, total_params).
    pub started: Option<(i64, i64, i64)>,
}

impl WriteBatch {
    /// True when there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.metrics.is_empty()
            && self.samples.is_empty()
            && self.logs.is_empty()
            && self.checkpoint.is_none()
            && self.removed_checkpoints.is_empty()
            && self.progress.is_none()
            && self.started.is_none()
    }
}

/// A dataset import record.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ts_rs::TS)]
pub struct DatasetRecord {
    /// Id (0 before insertion).
    pub id: i64,
    /// Display name.
    pub name: String,
    /// The file.
    pub path: String,
    /// jsonl | json | csv | parquet | text.
    pub container: String,
    /// alpaca | sharegpt | messages | text.
    pub format: String,
    /// Records read (valid ones).
    pub rows: i64,
    /// Tokens after templating, when counted.
    pub tokens: Option<i64>,
    /// The model whose tokenizer counted them.
    pub tokenizer_of: Option<String>,
    /// File size.
    pub bytes: i64,
    /// FNV-1a 64 of the bytes, hex.
    pub content_hash: String,
    /// Validation errors: `[{line, reason}]`.
    pub errors: serde_json::Value,
    /// Statistics (length histogram, truncated share, ...).
    pub stats: serde_json::Value,
    /// Imported (Unix ms).
    pub imported_at: i64,
}

/// A registered base model.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ts_rs::TS)]
pub struct ModelRecord {
    /// Id.
    pub id: i64,
    /// Display name.
    pub name: String,
    /// File or folder.
    pub path: String,
    /// gguf | hf.
    pub kind: String,
    /// Parameter count.
    pub params: Option<i64>,
    /// Details (JSON).
    pub info: serde_json::Value,
    /// Added (Unix ms).
    pub added_at: i64,
}

/// The run store. Cheap to clone (a connection pool).
#[derive(Clone)]
pub struct Store {
    pool: SqlitePool,
    path: PathBuf,
}

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

fn json_text(v: &serde_json::Value) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".into())
}

fn parse_json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or(serde_json::Value::Null)
}

impl Store {
    /// The default store of the app data dir.
    pub fn default_path() -> PathBuf {
        crate::paths::home().join(DB_FILE)
    }

    /// Opens (creating if missing) the store at `path` and brings its schema up to date.
    /// A file that is not a SQLite database, or a damaged one, is reported and left alone.
    pub async fn open(path: &Path) -> Result<Store> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        let store_err = |reason: String| Error::Store { path: path.to_path_buf(), reason };
        let opts = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(15))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts)
            .await
            .map_err(|e| store_err(format!("cannot open: {e} (is it a Tunebench database? it was left untouched)")))?;
        let quick: String = sqlx::query_scalar("PRAGMA quick_check")
            .fetch_one(&pool)
            .await
            .map_err(|e| store_err(format!("cannot read: {e} (the file was left untouched)")))?;
        if quick != "ok" {
            pool.close().await;
            let quick: String = quick.lines().take(3).collect::<Vec<_>>().join("; ");
            return Err(store_err(format!("the database is damaged ({quick}); it was left untouched — restore a backup or move it away")));
        }
        MIGRATOR.run(&pool).await.map_err(|e| store_err(format!("schema migration failed: {e}")))?;
        Ok(Store { pool, path: path.to_path_buf() })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The connection pool (for queries this module does not wrap).
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Closes every connection (tests; the pool also closes on drop).
    pub async fn close(&self) {
        self.pool.close().await;
    }

    fn err(&self, e: sqlx::Error) -> Error {
        Error::Store { path: self.path.clone(), reason: e.to_string() }
    }

    /// `PRAGMA integrity_check`: "ok" or the problems found.
    pub async fn integrity_check(&self) -> Result<String> {
        let rows: Vec<String> = sqlx::query_scalar("PRAGMA integrity_check").fetch_all(&self.pool).await.map_err(|e| self.err(e))?;
        Ok(rows.join("; "))
    }

    // ---------------------------------------------------------------- models

    /// Registers a model (or updates the record of the same path); returns its id.
    pub async fn upsert_model(&self, name: &str, path: &str, kind: &str, params: Option<i64>, info: &serde_json::Value) -> Result<i64> {
        sqlx::query_scalar(
            "INSERT INTO models (name, path, kind, params, info, added_at) VALUES (?, ?, ?, ?, ?, ?)
             ON CONFLICT (path) DO UPDATE SET name = excluded.name, kind = excluded.kind, params = excluded.params, info = excluded.info
             RETURNING id",
        )
        .bind(name)
        .bind(path)
        .bind(kind)
        .bind(params)
        .bind(json_text(info))
        .bind(now_ms())
        .fetch_one(&self.pool)
        .await
        .map_err(|e| self.err(e))
    }

    /// Every registered model.
    pub async fn models(&self) -> Result<Vec<ModelRecord>> {
        let rows = sqlx::query("SELECT id, name, path, kind, params, info, added_at FROM models ORDER BY id")
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        rows.iter()
            .map(|r| {
                Ok(ModelRecord {
                    id: r.try_get("id")?,
                    name: r.try_get("name")?,
                    path: r.try_get("path")?,
                    kind: r.try_get("kind")?,
                    params: r.try_get("params")?,
                    info: parse_json(r.try_get::<&str, _>("info")?),
                    added_at: r.try_get("added_at")?,
                })
            })
            .collect::<std::result::Result<_, sqlx::Error>>()
            .map_err(|e| self.err(e))
    }

    // ---------------------------------------------------------------- datasets

    /// Records a dataset import; returns its id.
    pub async fn insert_dataset(&self, d: &DatasetRecord) -> Result<i64> {
        sqlx::query_scalar(
            "INSERT INTO datasets (name, path, container, format, rows, tokens, tokenizer_of, bytes, content_hash, errors, stats, imported_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
        )
        .bind(&d.name)
        .bind(&d.path)
        .bind(&d.container)
        .bind(&d.format)
        .bind(d.rows)
        .bind(d.tokens)
        .bind(&d.tokenizer_of)
        .bind(d.bytes)
        .bind(&d.content_hash)
        .bind(json_text(&d.errors))
        .bind(json_text(&d.stats))
        .bind(d.imported_at)
        .fetch_one(&self.pool)
        .await
        .map_err(|e| self.err(e))
    }

    fn dataset_from_row(r: &SqliteRow) -> std::result::Result<DatasetRecord, sqlx::Error> {
        Ok(DatasetRecord {
            id: r.try_get("id")?,
            name: r.try_get("name")?,
            path: r.try_get("path")?,
            container: r.try_get("container")?,
            format: r.try_get("format")?,
            rows: r.try_get("rows")?,
            tokens: r.try_get("tokens")?,
            tokenizer_of: r.try_get("tokenizer_of")?,
            bytes: r.try_get("bytes")?,
            content_hash: r.try_get("content_hash")?,
            errors: parse_json(r.try_get::<&str, _>("errors")?),
            stats: parse_json(r.try_get::<&str, _>("stats")?),
            imported_at: r.try_get("imported_at")?,
        })
    }

    /// One dataset record.
    pub async fn dataset(&self, id: i64) -> Result<DatasetRecord> {
        let row = sqlx::query("SELECT * FROM datasets WHERE id = ?").bind(id).fetch_optional(&self.pool).await.map_err(|e| self.err(e))?;
        let row = row.ok_or(Error::NotFound { what: "dataset", id })?;
        Self::dataset_from_row(&row).map_err(|e| self.err(e))
    }

    /// Every dataset record, newest first.
    pub async fn datasets(&self) -> Result<Vec<DatasetRecord>> {
        let rows = sqlx::query("SELECT * FROM datasets ORDER BY id DESC").fetch_all(&self.pool).await.map_err(|e| self.err(e))?;
        rows.iter().map(Self::dataset_from_row).collect::<std::result::Result<_, _>>().map_err(|e| self.err(e))
    }

    /// Forgets a dataset record (the file is not touched; runs keep their path).
    pub async fn delete_dataset(&self, id: i64) -> Result<()> {
        let n = sqlx::query("DELETE FROM datasets WHERE id = ?").bind(id).execute(&self.pool).await.map_err(|e| self.err(e))?.rows_affected();
        if n == 0 {
            return Err(Error::NotFound { what: "dataset", id });
        }
        Ok(())
    }

    // ---------------------------------------------------------------- runs

    /// Inserts a run in the `queued` state at the end of its device's queue.
    pub async fn insert_run(&self, r: &NewRun) -> Result<i64> {
        sqlx::query_scalar(
            "INSERT INTO runs (name, status, method, config, model_id, model_path, dataset_path, dataset_id, out_dir, device, queue_pos, created_at)
             VALUES (?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?, (SELECT COALESCE(MAX(queue_pos), 0) + 1 FROM runs), ?) RETURNING id",
        )
        .bind(&r.name)
        .bind(&r.method)
        .bind(json_text(&r.config))
        .bind(r.model_id)
        .bind(&r.model_path)
        .bind(&r.dataset_path)
        .bind(r.dataset_id)
        .bind(&r.out_dir)
        .bind(&r.device)
        .bind(now_ms())
        .fetch_one(&self.pool)
        .await
        .map_err(|e| self.err(e))
    }

    /// Sets a run's output folder (known once the id is).
    pub async fn set_out_dir(&self, id: i64, out_dir: &str, config: &serde_json::Value) -> Result<()> {
        sqlx::query("UPDATE runs SET out_dir = ?, config = ? WHERE id = ?")
            .bind(out_dir)
            .bind(json_text(config))
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    fn run_from_row(r: &SqliteRow) -> std::result::Result<RunRecord, sqlx::Error> {
        let status: &str = r.try_get("status")?;
        Ok(RunRecord {
            id: r.try_get("id")?,
            name: r.try_get("name")?,
            status: status.parse().map_err(|e: String| sqlx::Error::Decode(e.into()))?,
            method: r.try_get("method")?,
            config: parse_json(r.try_get::<&str, _>("config")?),
            model_id: r.try_get("model_id")?,
            model_path: r.try_get("model_path")?,
            dataset_id: r.try_get("dataset_id")?,
            dataset_path: r.try_get("dataset_path")?,
            out_dir: r.try_get("out_dir")?,
            device: r.try_get("device")?,
            queue_pos: r.try_get("queue_pos")?,
            created_at: r.try_get("created_at")?,
            started_at: r.try_get("started_at")?,
            finished_at: r.try_get("finished_at")?,
            error: r.try_get("error")?,
            worker_pid: r.try_get("worker_pid")?,
            worker_start: r.try_get("worker_start")?,
            step: r.try_get("step")?,
            total_steps: r.try_get("total_steps")?,
            tokens_seen: r.try_get("tokens_seen")?,
            elapsed_s: r.try_get("elapsed_s")?,
            final_metrics: parse_json(r.try_get::<&str, _>("final_metrics")?),
            peak_rss_bytes: r.try_get("peak_rss_bytes")?,
            trainable_params: r.try_get("trainable_params")?,
            total_params: r.try_get("total_params")?,
        })
    }

    /// One run.
    pub async fn run(&self, id: i64) -> Result<RunRecord> {
        let row = sqlx::query("SELECT * FROM runs WHERE id = ?").bind(id).fetch_optional(&self.pool).await.map_err(|e| self.err(e))?;
        let row = row.ok_or(Error::NotFound { what: "run", id })?;
        Self::run_from_row(&row).map_err(|e| self.err(e))
    }

    /// Every run, newest first.
    pub async fn runs(&self) -> Result<Vec<RunRecord>> {
        let rows = sqlx::query("SELECT * FROM runs ORDER BY id DESC").fetch_all(&self.pool).await.map_err(|e| self.err(e))?;
        rows.iter().map(Self::run_from_row).collect::<std::result::Result<_, _>>().map_err(|e| self.err(e))
    }

    /// Runs in a status.
    pub async fn runs_with_status(&self, status: RunStatus) -> Result<Vec<RunRecord>> {
        let rows = sqlx::query("SELECT * FROM runs WHERE status = ? ORDER BY queue_pos, id")
            .bind(status.as_str())
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        rows.iter().map(Self::run_from_row).collect::<std::result::Result<_, _>>().map_err(|e| self.err(e))
    }

    /// Claims a run for a worker: `queued`/`stopped`/`interrupted`/`failed` → `running`.
    /// Fails (naming the current state) when another worker has it or it is completed.
    pub async fn claim_run(&self, id: i64, pid: i64, start_ticks: Option<i64>) -> Result<()> {
        let n = sqlx::query(
            "UPDATE runs SET status = 'running', worker_pid = ?, worker_start = ?, started_at = COALESCE(started_at, ?),
                 finished_at = NULL, error = NULL, queue_pos = NULL
             WHERE id = ? AND status IN ('queued', 'stopped', 'interrupted', 'failed')",
        )
        .bind(pid)
        .bind(start_ticks)
        .bind(now_ms())
        .bind(id)
        .execute(&self.pool)
        .await
        .map_err(|e| self.err(e))?
        .rows_affected();
        if n == 1 {
            return Ok(());
        }
        let r = self.run(id).await?;
        Err(match r.status {
            RunStatus::Running => Error::Msg(format!("run {id} is already running (worker pid {})", r.worker_pid.unwrap_or(0))),
            RunStatus::Completed => Error::Msg(format!("run {id} is already completed")),
            s => Error::Msg(format!("run {id} cannot start from status {s}")),
        })
    }

    /// Ends a run: status, error text, final metrics, peak memory. Only the worker that
    /// holds the run (`pid`) may end it.
    pub async fn finish_run(
        &self,
        id: i64,
        pid: i64,
        status: RunStatus,
        error: Option<&str>,
        final_metrics: &serde_json::Value,
        peak_rss: Option<i64>,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE runs SET status = ?, error = ?, final_metrics = ?, peak_rss_bytes = MAX(COALESCE(peak_rss_bytes, 0), COALESCE(?, 0)),
                 finished_at = ?, worker_pid = NULL, worker_start = NULL
             WHERE id = ? AND status = 'running' AND worker_pid = ?",
        )
        .bind(status.as_str())
        .bind(error)
        .bind(json_text(final_metrics))
        .bind(peak_rss)
        .bind(now_ms())
        .bind(id)
        .bind(pid)
        .execute(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Marks a `running` run whose worker `pid` is gone as `interrupted`. Returns true when
    /// the row changed (false: the worker ended it itself, or another worker has it now).
    pub async fn mark_interrupted(&self, id: i64, pid: i64, reason: &str) -> Result<bool> {
        let n = sqlx::query(
            "UPDATE runs SET status = 'interrupted', error = ?, finished_at = ?, worker_pid = NULL, worker_start = NULL
             WHERE id = ? AND status = 'running' AND worker_pid = ?",
        )
        .bind(reason)
        .bind(now_ms())
        .bind(id)
        .bind(pid)
        .execute(&self.pool)
        .await
        .map_err(|e| self.err(e))?
        .rows_affected();
        Ok(n == 1)
    }

    /// Marks a queued run that never started as failed (its worker could not start).
    pub async fn fail_queued(&self, id: i64, reason: &str) -> Result<()> {
        sqlx::query("UPDATE runs SET status = 'failed', error = ?, finished_at = ?, queue_pos = NULL WHERE id = ? AND status = 'queued'")
            .bind(reason)
            .bind(now_ms())
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Puts a resumable run (back) at the end of the queue.
    pub async fn enqueue(&self, id: i64) -> Result<()> {
        let r = self.run(id).await?;
        if !r.status.is_resumable() {
            return Err(Error::Msg(format!("run {id} is {}: only stopped, interrupted or failed runs can be resumed", r.status)));
        }
        sqlx::query("UPDATE runs SET status = 'queued', queue_pos = (SELECT COALESCE(MAX(queue_pos), 0) + 1 FROM runs) WHERE id = ?")
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Takes a queued run out of the queue (it becomes `stopped`, resumable later).
    pub async fn cancel_queued(&self, id: i64) -> Result<()> {
        let n = sqlx::query("UPDATE runs SET status = 'stopped', queue_pos = NULL WHERE id = ? AND status = 'queued'")
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(|e| self.err(e))?
            .rows_affected();
        if n == 0 {
            let r = self.run(id).await?;
            return Err(Error::Msg(format!("run {id} is {}, not queued", r.status)));
        }
        Ok(())
    }

    /// Reorders the queue: `ids` first, in this order, then the other queued runs as they were.
    pub async fn reorder_queue(&self, ids: &[i64]) -> Result<()> {
        let queued = self.runs_with_status(RunStatus::Queued).await?;
        for id in ids {
            if !queued.iter().any(|r| r.id == *id) {
                return Err(Error::Msg(format!("run {id} is not queued")));
            }
        }
        let mut order: Vec<i64> = ids.to_vec();
        order.extend(queued.iter().map(|r| r.id).filter(|id| !ids.contains(id)));
        let mut tx = self.pool.begin().await.map_err(|e| self.err(e))?;
        for (i, id) in order.iter().enumerate() {
            sqlx::query("UPDATE runs SET queue_pos = ? WHERE id = ?").bind(i as i64 + 1).bind(id).execute(&mut *tx).await.map_err(|e| self.err(e))?;
        }
        tx.commit().await.map_err(|e| self.err(e))
    }

    /// Deletes a run and everything recorded about it (not its folder: see the API).
    pub async fn delete_run(&self, id: i64) -> Result<()> {
        let r = self.run(id).await?;
        if r.status == RunStatus::Running {
            return Err(Error::Msg(format!("run {id} is running; stop it first")));
        }
        sqlx::query("DELETE FROM runs WHERE id = ?").bind(id).execute(&self.pool).await.map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Forgets everything recorded after `step` (metrics, samples, checkpoints), so a resumed
    /// run continues from its checkpoint with neither gaps nor duplicates.
    pub async fn truncate_after(&self, id: i64, step: i64) -> Result<()> {
        let mut tx = self.pool.begin().await.map_err(|e| self.err(e))?;
        for sql in [
            "DELETE FROM metrics WHERE run_id = ? AND step > ?",
            "DELETE FROM samples WHERE run_id = ? AND step > ?",
            "DELETE FROM checkpoints WHERE run_id = ? AND step > ?",
        ] {
            sqlx::query(sql).bind(id).bind(step).execute(&mut *tx).await.map_err(|e| self.err(e))?;
        }
        sqlx::query("UPDATE runs SET step = ? WHERE id = ?").bind(step).bind(id).execute(&mut *tx).await.map_err(|e| self.err(e))?;
        tx.commit().await.map_err(|e| self.err(e))
    }

    /// Writes one batch in one transaction.
    pub async fn write_batch(&self, run_id: i64, b: &WriteBatch) -> Result<()> {
        if b.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await.map_err(|e| self.err(e))?;
        for m in &b.metrics {
            sqlx::query("INSERT INTO metrics (run_id, name, step, tokens, wall_s, value) VALUES (?, ?, ?, ?, ?, ?)")
                .bind(run_id)
                .bind(&m.name)
                .bind(m.step)
                .bind(m.tokens)
                .bind(m.wall_s)
                .bind(m.value)
                .execute(&mut *tx)
                .await
                .map_err(|e| self.err(e))?;
        }
        let now = now_ms();
        for s in &b.samples {
            sqlx::query("INSERT INTO samples (run_id, step, prompt, output, created_at) VALUES (?, ?, ?, ?, ?)")
                .bind(run_id)
                .bind(s.step)
                .bind(&s.prompt)
                .bind(&s.output)
                .bind(now)
                .execute(&mut *tx)
                .await
                .map_err(|e| self.err(e))?;
        }
        for l in &b.logs {
            sqlx::query("INSERT INTO run_logs (run_id, at, text) VALUES (?, ?, ?)")
                .bind(run_id)
                .bind(now)
                .bind(l)
                .execute(&mut *tx)
                .await
                .map_err(|e| self.err(e))?;
        }
        if let Some((total, trainable, all)) = b.started {
            sqlx::query("UPDATE runs SET total_steps = ?, trainable_params = ?, total_params = ? WHERE id = ?")
                .bind(total)
                .bind(trainable)
                .bind(all)
                .bind(run_id)
                .execute(&mut *tx)
                .await
                .map_err(|e| self.err(e))?;
        }
        if let Some((step, tokens, elapsed)) = b.progress {
            sqlx::query("UPDATE runs SET step = ?, tokens_seen = ?, elapsed_s = ? WHERE id = ?")
                .bind(step)
                .bind(tokens)
                .bind(elapsed)
                .bind(run_id)
                .execute(&mut *tx)
                .await
                .map_err(|e| self.err(e))?;
        }
        if let Some((step, path, val)) = &b.checkpoint {
            sqlx::query(
                "INSERT INTO checkpoints (run_id, step, path, val_loss, created_at) VALUES (?, ?, ?, ?, ?)
                 ON CONFLICT (run_id, step) DO UPDATE SET path = excluded.path, val_loss = excluded.val_loss, created_at = excluded.created_at, removed = 0",
            )
            .bind(run_id)
            .bind(step)
            .bind(path)
            .bind(val)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.err(e))?;
        }
        for step in &b.removed_checkpoints {
            sqlx::query("UPDATE checkpoints SET removed = 1 WHERE run_id = ? AND step = ?")
                .bind(run_id)
                .bind(step)
                .execute(&mut *tx)
                .await
                .map_err(|e| self.err(e))?;
        }
        tx.commit().await.map_err(|e| self.err(e))
    }

    /// One series of a run, in step order.
    ///
    /// This is the one hot read (charts of long runs): it runs on the raw SQLite handle of a
    /// pooled connection, because sqlx's per-row overhead (~1 µs) would dominate a
    /// million-point series (bench/RESULTS.md).
    pub async fn series(&self, run_id: i64, name: &str) -> Result<Vec<MetricPoint>> {
        let mut conn = self.pool.acquire().await.map_err(|e| self.err(e))?;
        let mut handle = conn.lock_handle().await.map_err(|e| self.err(e))?;
        let db = handle.as_raw_handle().as_ptr();
        read_series(db, run_id, name).map_err(|reason| Error::Store { path: self.path.clone(), reason })
    }

    /// The metric names a run has.
    pub async fn metric_names(&self, run_id: i64) -> Result<Vec<String>> {
        sqlx::query_scalar("SELECT DISTINCT name FROM metrics WHERE run_id = ? ORDER BY name")
            .bind(run_id)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.err(e))
    }

    /// A run's checkpoints, oldest first.
    pub async fn checkpoints(&self, run_id: i64) -> Result<Vec<CheckpointRecord>> {
        let rows: Vec<(i64, String, Option<f64>, i64, i64)> =
            sqlx::query_as("SELECT step, path, val_loss, created_at, removed FROM checkpoints WHERE run_id = ? ORDER BY step")
                .bind(run_id)
                .fetch_all(&self.pool)
                .await
                .map_err(|e| self.err(e))?;
        Ok(rows
            .into_iter()
            .map(|(step, path, val_loss, created_at, removed)| CheckpointRecord { step, path, val_loss, created_at, removed: removed != 0 })
            .collect())
    }

    /// A run's sample generations, in step order.
    pub async fn samples(&self, run_id: i64) -> Result<Vec<SampleRecord>> {
        let rows: Vec<(i64, String, String)> = sqlx::query_as("SELECT step, prompt, output FROM samples WHERE run_id = ? AND source = 'train' ORDER BY step, id")
            .bind(run_id)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        Ok(rows.into_iter().map(|(step, prompt, output)| SampleRecord { step, prompt, output }).collect())
    }

    /// The newest `limit` log lines of a run, oldest first: (Unix ms, text).
    pub async fn logs(&self, run_id: i64, limit: i64) -> Result<Vec<(i64, String)>> {
        let mut rows: Vec<(i64, String)> = sqlx::query_as("SELECT at, text FROM run_logs WHERE run_id = ? ORDER BY id DESC LIMIT ?")
            .bind(run_id)
            .bind(limit)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        rows.reverse();
        Ok(rows)
    }
}

/// Reads one metric series with the SQLite C API on a connection the caller has locked.
fn read_series(db: *mut libsqlite3_sys::sqlite3, run_id: i64, name: &str) -> std::result::Result<Vec<MetricPoint>, String> {
    use libsqlite3_sys as ffi;
    const SQL: &str = "SELECT step, tokens, wall_s, value FROM metrics WHERE run_id = ?1 AND name = ?2 ORDER BY step";
    let errmsg = |db: *mut ffi::sqlite3| {
        // SAFETY: sqlite3_errmsg returns a NUL-terminated string owned by the connection.
        unsafe { std::ffi::CStr::from_ptr(ffi::sqlite3_errmsg(db)) }.to_string_lossy().into_owned()
    };
    let mut stmt: *mut ffi::sqlite3_stmt = std::ptr::null_mut();
    // SAFETY: `db` is a live connection locked for this thread by the caller; SQL and the
    // bound name outlive the statement (SQLITE_TRANSIENT copies the name).
    unsafe {
        if ffi::sqlite3_prepare_v2(db, SQL.as_ptr().cast(), SQL.len() as i32, &mut stmt, std::ptr::null_mut()) != ffi::SQLITE_OK {
            return Err(errmsg(db));
        }
        ffi::sqlite3_bind_int64(stmt, 1, run_id);
        ffi::sqlite3_bind_text(stmt, 2, name.as_ptr().cast(), name.len() as i32, ffi::SQLITE_TRANSIENT());
        let mut out = Vec::new();
        let result = loop {
            match ffi::sqlite3_step(stmt) {
                ffi::SQLITE_ROW => out.push(MetricPoint {
                    step: ffi::sqlite3_column_int64(stmt, 0),
                    tokens: ffi::sqlite3_column_int64(stmt, 1),
                    wall_s: ffi::sqlite3_column_double(stmt, 2),
                    value: ffi::sqlite3_column_double(stmt, 3),
                }),
                ffi::SQLITE_DONE => break Ok(out),
                _ => break Err(errmsg(db)),
            }
        };
        ffi::sqlite3_finalize(stmt);
        result
    }
}
