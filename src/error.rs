//! The engine's one error type.

use std::path::PathBuf;

/// Every failure the engine reports. Messages name the file, line or key and the reason,
/// because they are shown to users as they are.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// An I/O failure on a named path.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Bad content in an input file (dataset, model folder, adapter, checkpoint).
    #[error("{path}{}: {reason}", line.map(|l| format!(":{l}")).unwrap_or_default())]
    BadInput {
        /// The file.
        path: PathBuf,
        /// 1-based line number, when the file is line-oriented.
        line: Option<usize>,
        /// What is wrong.
        reason: String,
    },
    /// A bad configuration key or value.
    #[error("config{}: `{key}`: {reason}", path.as_ref().map(|p| format!(" {}", p.display())).unwrap_or_default())]
    Config {
        /// The config file, when there is one.
        path: Option<PathBuf>,
        /// The offending key (dotted path).
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// The tokenizer failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A chat template failed to render.
    #[error("chat template: {0}")]
    Template(String),
    /// Training diverged or could not continue.
    #[error("training stopped: {0}")]
    Training(String),
    /// The run store (SQLite) failed or holds something unexpected.
    #[error("run store {}: {reason}", path.display())]
    Store {
        /// The database file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// A run, dataset, model or checkpoint id that does not exist.
    #[error("no {what} with id {id}")]
    NotFound {
        /// "run", "dataset", ...
        what: &'static str,
        /// The id asked for.
        id: i64,
    },
    /// A network failure (model downloads), explained.
    #[error("{reason} ({url})")]
    Network {
        /// What was fetched.
        url: String,
        /// What went wrong and what to do.
        reason: String,
    },
    /// Anything else, with a message for the user.
    #[error("{0}")]
    Msg(String),
}

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
    /// Bad content in `path` (at `line`, 1-based, when known).
    pub fn bad_input(path: impl Into<PathBuf>, line: Option<usize>, reason: impl Into<String>) -> Self {
        Error::BadInput { path: path.into(), line, reason: reason.into() }
    }
    /// A bad config key or value.
    pub fn config(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Config { path: None, key: key.into(), reason: reason.into() }
    }
}

/// The engine's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
