-- Tunebench run store, schema version 1. Times are Unix milliseconds (UTC).

CREATE TABLE models (
    id          INTEGER PRIMARY KEY,
    name        TEXT NOT NULL,
    path        TEXT NOT NULL UNIQUE,
    kind        TEXT NOT NULL CHECK (kind IN ('gguf', 'hf')),
    params      INTEGER,
    info        TEXT NOT NULL DEFAULT '{}',       -- JSON: architecture, sizes, template
    added_at    INTEGER NOT NULL
);

CREATE TABLE datasets (
    id           INTEGER PRIMARY KEY,
    name         TEXT NOT NULL,
    path         TEXT NOT NULL,
    container    TEXT NOT NULL,                   -- jsonl | json | csv | parquet | text
    format       TEXT NOT NULL,                   -- alpaca | sharegpt | messages | text
    rows         INTEGER NOT NULL,
    tokens       INTEGER,                         -- with the tokenizer of `tokenizer_of`
    tokenizer_of TEXT,
    bytes        INTEGER NOT NULL,
    content_hash TEXT NOT NULL,                   -- FNV-1a 64 of the file bytes, hex
    errors       TEXT NOT NULL DEFAULT '[]',      -- JSON [{line, reason}]
    stats        TEXT NOT NULL DEFAULT '{}',      -- JSON: lengths histogram, truncated share
    imported_at  INTEGER NOT NULL
);
CREATE INDEX datasets_path ON datasets (path);

CREATE TABLE runs (
    id               INTEGER PRIMARY KEY,
    name             TEXT NOT NULL,
    status           TEXT NOT NULL CHECK (status IN
                       ('queued', 'running', 'completed', 'failed', 'stopped', 'interrupted')),
    method           TEXT NOT NULL,
    config           TEXT NOT NULL,               -- JSON of the full RunConfig
    model_id         INTEGER REFERENCES models (id) ON DELETE SET NULL,
    model_path       TEXT NOT NULL,
    dataset_id       INTEGER REFERENCES datasets (id) ON DELETE SET NULL,
    dataset_path     TEXT NOT NULL,
    out_dir          TEXT NOT NULL,
    device           TEXT NOT NULL DEFAULT 'cpu',
    queue_pos        INTEGER,                     -- order among queued runs
    created_at       INTEGER NOT NULL,
    started_at       INTEGER,
    finished_at      INTEGER,
    error            TEXT,
    worker_pid       INTEGER,
    worker_start     INTEGER,                     -- the worker's start time (/proc/<pid>/stat), guards pid reuse
    step             INTEGER NOT NULL DEFAULT 0,
    total_steps      INTEGER,
    tokens_seen      INTEGER NOT NULL DEFAULT 0,
    elapsed_s        REAL NOT NULL DEFAULT 0,
    final_metrics    TEXT NOT NULL DEFAULT '{}',  -- JSON
    peak_rss_bytes   INTEGER,
    trainable_params INTEGER,
    total_params     INTEGER
);
CREATE INDEX runs_status ON runs (status);

-- One row per (run, metric, step). Clustered on the primary key, so one series of one run is
-- a single range scan; a step recorded twice is an error, never a silent duplicate.
CREATE TABLE metrics (
    run_id  INTEGER NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    name    TEXT NOT NULL,
    step    INTEGER NOT NULL,
    tokens  INTEGER NOT NULL,
    wall_s  REAL NOT NULL,
    value   REAL NOT NULL,
    PRIMARY KEY (run_id, name, step)
) WITHOUT ROWID;

CREATE TABLE checkpoints (
    id         INTEGER PRIMARY KEY,
    run_id     INTEGER NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    step       INTEGER NOT NULL,
    path       TEXT NOT NULL,
    val_loss   REAL,
    created_at INTEGER NOT NULL,
    removed    INTEGER NOT NULL DEFAULT 0,        -- pruned from disk (keep_checkpoints)
    UNIQUE (run_id, step)
);

CREATE TABLE samples (
    id         INTEGER PRIMARY KEY,
    run_id     INTEGER NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    step       INTEGER NOT NULL,
    prompt     TEXT NOT NULL,
    output     TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX samples_run ON samples (run_id, step);

CREATE TABLE run_logs (
    id      INTEGER PRIMARY KEY,
    run_id  INTEGER NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    at      INTEGER NOT NULL,
    text    TEXT NOT NULL
);
CREATE INDEX run_logs_run ON run_logs (run_id, id);
