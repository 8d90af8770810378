//! Datasets: import (validate every record, count rows and tokens, record it in the store),
//! statistics, and a preview that shows each example rendered through the chat template with
//! the trained spans marked.
//!
//! Import streams the file twice (a content hash, then the records) and keeps only counters,
//! a length histogram and at most [`MAX_ERRORS`] error entries, so memory stays bounded for a
//! file of any size.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::Workbench;
use crate::data::{self, try_encode, ChatTemplate, EncodeOptions, EncodeOutcome, Format, IGNORE_INDEX};
use crate::store::{now_ms, DatasetRecord};
use crate::{Error, Result};

/// Errors kept per import (the rest are counted).
pub const MAX_ERRORS: usize = 1000;

/// Bins of the token-length histogram.
pub const HISTOGRAM_BINS: usize = 16;

/// Request: import a dataset file.
#[derive(Clone, Debug, Serialize, Deserialize, ts_rs::TS)]
pub struct ImportRequest {
    /// The file.
    pub path: PathBuf,
    /// Display name (default: the file name).
    #[serde(default)]
    pub name: Option<String>,
    /// Schema (default: detected).
    #[serde(default)]
    pub format: Format,
    /// Length cut-off the truncation share is measured at.
    #[serde(default = "default_max_len")]
    pub max_len: usize,
    /// Model whose tokenizer and chat template count tokens (default: the default model).
    #[serde(default)]
    pub model: Option<PathBuf>,
}

fn default_max_len() -> usize {
    512
}

/// One problem found in a file.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ts_rs::TS)]
pub struct DatasetIssue {
    /// 1-based line (row for Parquet); 0 when not line-specific.
    pub line: usize,
    /// What is wrong.
    pub reason: String,
}

/// Statistics of an imported dataset (stored as the record's `stats`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, ts_rs::TS)]
pub struct DatasetStats {
    /// Records read without error.
    pub records: usize,
    /// Records that give a training example.
    pub examples: usize,
    /// Records skipped by reason (no assistant turn, empty text, ...): (reason, count).
    pub skipped: Vec<(String, usize)>,
    /// Records with errors (all of them, even beyond the stored list).
    pub errors: usize,
    /// Tokens of the examples (before truncation).
    pub tokens: u64,
    /// Trained-on tokens (after truncation).
    pub target_tokens: u64,
    /// Examples longer than `max_len`.
    pub truncated: usize,
    /// `truncated / examples`.
    pub truncated_share: f64,
    /// The cut-off used.
    pub max_len: usize,
    /// Longest example in tokens.
    pub longest: usize,
    /// Mean example length in tokens.
    pub mean_len: f64,
    /// Histogram of example lengths: `bin_width`-token bins from 0; the last bin also holds
    /// every longer example.
    pub histogram: Vec<u64>,
    /// Width of a histogram bin in tokens.
    pub bin_width: usize,
}

/// Request: preview a dataset.
#[derive(Clone, Debug, Serialize, Deserialize, ts_rs::TS)]
pub struct PreviewRequest {
    /// An imported dataset…
    #[serde(default)]
    pub dataset_id: Option<i64>,
    /// …or a file.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Examples to show.
    #[serde(default = "default_n")]
    pub n: usize,
    /// Schema (default: the record's, or detected).
    #[serde(default)]
    pub format: Option<Format>,
    /// Length cut-off.
    #[serde(default = "default_max_len")]
    pub max_len: usize,
    /// Model whose chat template and tokenizer render the examples (default: the default
    /// model).
    #[serde(default)]
    pub model: Option<PathBuf>,
}

fn default_n() -> usize {
    5
}

/// A run of text that is all trained on or all masked.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ts_rs::TS)]
pub struct Span {
    /// The text (as the tokenizer decodes it, special tokens included).
    pub text: String,
    /// Whether the loss is computed on these tokens.
    pub trained: bool,
}

/// One example as the model will see it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ts_rs::TS)]
pub struct PreviewExample {
    /// Line (row) of the record.
    pub line: usize,
    /// Tokens after truncation.
    pub tokens: usize,
    /// Trained-on tokens.
    pub trained_tokens: usize,
    /// Cut at `max_len`.
    pub truncated: bool,
    /// The rendered text in spans.
    pub spans: Vec<Span>,
}

/// Response: a preview.
#[derive(Clone, Debug, Serialize, Deserialize, ts_rs::TS)]
pub struct Preview {
    /// The file.
    pub path: String,
    /// The schema read.
    pub format: String,
    /// Examples (records that give none are listed in `issues`).
    pub examples: Vec<PreviewExample>,
    /// Problems among the records read.
    pub issues: Vec<DatasetIssue>,
    /// The file differs in size from when it was imported.
    pub changed_since_import: bool,
}

/// FNV-1a 64 of a file, hex, its size and its number of lines; `progress(done, total)` in
/// bytes after each block.
pub fn content_hash(path: &Path, mut progress: impl FnMut(u64, u64)) -> Result<(String, u64, u64)> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let total = f.metadata().map(|m| m.len()).unwrap_or(0);
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    let mut lines = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        for &b in &buf[..n] {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
            lines += u64::from(b == b'\n');
        }
        done += n as u64;
        progress(done, total);
    }
    Ok((format!("{h:016x}"), done, lines))
}

fn model_or_default(m: &Option<PathBuf>) -> PathBuf {
    m.clone().unwrap_or_else(crate::paths::default_model)
}

fn issue_of(e: &Error) -> DatasetIssue {
    match e {
        Error::BadInput { line, reason, .. } => DatasetIssue { line: line.unwrap_or(0), reason: reason.clone() },
        other => DatasetIssue { line: 0, reason: other.to_string() },
    }
}

/// Reads, validates and measures a dataset file without keeping its records.
/// `progress(line)` reports the line (row) reached every 256 records.
pub fn scan(
    path: &Path,
    format: Format,
    max_len: usize,
    template: &ChatTemplate,
    tokenizer: &tokenizers::Tokenizer,
    mut progress: impl FnMut(u64),
) -> Result<(Format, DatasetStats, Vec<DatasetIssue>)> {
    let mut records = data::read_records(path, format)?.keep_going();
    let enc = EncodeOptions { max_len: usize::MAX, train_on_prompt: false, add_eos_to_text: true };
    let bin_width = max_len.div_ceil(HISTOGRAM_BINS - 1).max(1);
    let mut st = DatasetStats { max_len, bin_width, histogram: vec![0; HISTOGRAM_BINS], ..Default::default() };
    let mut issues = Vec::new();
    let mut skipped: std::collections::BTreeMap<String, usize> = Default::default();
    let mut lens_sum = 0u64;
    let mut n = 0u64;
    for item in records.by_ref() {
        n += 1;
        let (line, record) = match item {
            Ok(x) => x,
            Err(e) => {
                st.errors += 1;
                if issues.len() < MAX_ERRORS {
                    issues.push(issue_of(&e));
                }
                continue;
            }
        };
        st.records += 1;
        if n.is_multiple_of(256) {
            progress(line as u64);
        }
        match try_encode(&record, template, tokenizer, &enc) {
            Ok(EncodeOutcome::Example { example, .. }) => {
                let len = example.len();
                st.examples += 1;
                st.tokens += len as u64;
                lens_sum += len as u64;
                st.longest = st.longest.max(len);
                if len > max_len {
                    st.truncated += 1;
                }
                st.target_tokens += example.labels.iter().take(max_len).filter(|&&l| l != IGNORE_INDEX).count() as u64;
                st.histogram[(len / bin_width).min(HISTOGRAM_BINS - 1)] += 1;
            }
            Ok(EncodeOutcome::Skipped(reason)) => *skipped.entry(reason.to_string()).or_default() += 1,
            Err(e) => {
                st.errors += 1;
                if issues.len() < MAX_ERRORS {
                    issues.push(DatasetIssue { line, reason: e.to_string() });
                }
            }
        }
    }
    st.skipped = skipped.into_iter().collect();
    if st.examples > 0 {
        st.mean_len = lens_sum as f64 / st.examples as f64;
        st.truncated_share = st.truncated as f64 / st.examples as f64;
    }
    let fmt = records.format().unwrap_or(format);
    Ok((fmt, st, issues))
}

/// Splits an example's tokens into runs of trained / masked text.
pub fn spans(tokenizer: &tokenizers::Tokenizer, ids: &[u32], labels: &[i64]) -> Result<Vec<Span>> {
    let decode = |k: usize| tokenizer.decode(&ids[..k], false).map_err(|e| Error::Tokenizer(e.to_string()));
    let mut out = Vec::new();
    let mut prev_text = String::new();
    let mut start = 0;
    while start < ids.len() {
        let trained = labels[start] != IGNORE_INDEX;
        let mut end = start + 1;
        while end < ids.len() && (labels[end] != IGNORE_INDEX) == trained {
            end += 1;
        }
        let text = decode(end)?;
        // Byte-level BPE can split a character across the boundary: take what follows the
        // longest common prefix with the previous decode.
        let common = prev_text.char_indices().zip(text.chars()).take_while(|((_, a), b)| a == b).last().map(|((i, c), _)| i + c.len_utf8()).unwrap_or(0);
        out.push(Span { text: text[common..].to_string(), trained });
        prev_text = text;
        start = end;
    }
    Ok(out)
}

impl Workbench {
    /// Imports a dataset: validates every record (all problems listed with their line), counts
    /// rows and tokens, measures lengths, and records it. A file with no usable example at all
    /// is an error; a file with some bad records is imported with its problems listed.
    /// `progress(done, 1000)` reports per mille (hashing is the first fifth).
    pub async fn import_dataset(&self, req: &ImportRequest, mut progress: impl FnMut(u64, u64) + Send) -> Result<DatasetRecord> {
        let path = std::path::absolute(&req.path).unwrap_or_else(|_| req.path.clone());
        if !path.is_file() {
            return Err(Error::bad_input(&path, None, "no such file"));
        }
        let container = data::container_name(&path, req.format)?;
        let model = model_or_default(&req.model);
        let (tokenizer, spec) = crate::model::load_tokenizer(&model)?;
        let template = crate::train::trainer::template_for_spec(&spec)?;
        let (hash, bytes, lines) = content_hash(&path, |d, t| progress(200 * d / t.max(1), 1000))?;
        let (format, stats, issues) =
            scan(&path, req.format, req.max_len, &template, &tokenizer, |line| progress(200 + 800 * line.min(lines) / lines.max(1), 1000))?;
        progress(1000, 1000);
        if stats.examples == 0 {
            let first: Vec<String> = issues.iter().take(5).map(|i| format!("line {}: {}", i.line, i.reason)).collect();
            return Err(Error::bad_input(
                &path,
                issues.first().map(|i| i.line),
                format!(
                    "no usable examples in {} records ({} errors; skipped: {:?}){}",
                    stats.records + stats.errors,
                    stats.errors,
                    stats.skipped,
                    if first.is_empty() { String::new() } else { format!(": {}", first.join("; ")) }
                ),
            ));
        }
        let name = req.name.clone().unwrap_or_else(|| path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
        let mut rec = DatasetRecord {
            id: 0,
            name,
            path: path.display().to_string(),
            container: container.to_string(),
            format: format.name().to_string(),
            rows: stats.records as i64,
            tokens: Some(stats.tokens as i64),
            tokenizer_of: Some(model.display().to_string()),
            bytes: bytes as i64,
            content_hash: hash,
            errors: serde_json::to_value(&issues).map_err(|e| Error::Msg(e.to_string()))?,
            stats: serde_json::to_value(&stats).map_err(|e| Error::Msg(e.to_string()))?,
            imported_at: now_ms(),
        };
        rec.id = self.store.insert_dataset(&rec).await?;
        Ok(rec)
    }

    /// The first `n` examples of a dataset (imported or a file), rendered through the chat
    /// template with trained and masked spans.
    pub async fn preview_dataset(&self, req: &PreviewRequest) -> Result<Preview> {
        let (path, format, changed) = match (req.dataset_id, &req.path) {
            (Some(id), _) => {
                let d = self.store.dataset(id).await?;
                let p = PathBuf::from(&d.path);
                if !p.is_file() {
                    return Err(Error::bad_input(&p, None, format!("dataset {id} (`{}`): the file no longer exists (moved or deleted?)", d.name)));
                }
                let size = std::fs::metadata(&p).map(|m| m.len() as i64).unwrap_or(-1);
                let fmt = req.format.unwrap_or_else(|| d.format.parse().unwrap_or_default());
                (p, fmt, size != d.bytes)
            }
            (None, Some(p)) => (p.clone(), req.format.unwrap_or_default(), false),
            (None, None) => return Err(Error::Msg("preview needs a dataset id or a file".into())),
        };
        let (tokenizer, spec) = crate::model::load_tokenizer(&model_or_default(&req.model))?;
        let template = crate::train::trainer::template_for_spec(&spec)?;
        let enc = EncodeOptions { max_len: req.max_len.max(1), train_on_prompt: false, add_eos_to_text: true };
        let mut records = data::read_records(&path, format)?.keep_going();
        let mut examples = Vec::new();
        let mut issues = Vec::new();
        let mut read = 0;
        for item in records.by_ref() {
            if examples.len() >= req.n || read >= req.n * 20 + 20 {
                break;
            }
            read += 1;
            let (line, record) = match item {
                Ok(x) => x,
                Err(e) => {
                    issues.push(issue_of(&e));
                    continue;
                }
            };
            match try_encode(&record, &template, &tokenizer, &enc) {
                Ok(EncodeOutcome::Example { example, truncated }) => {
                    let trained_tokens = example.labels.iter().filter(|&&l| l != IGNORE_INDEX).count();
                    examples.push(PreviewExample {
                        line,
                        tokens: example.len(),
                        trained_tokens,
                        truncated,
                        spans: spans(&tokenizer, &example.input_ids, &example.labels)?,
                    });
                }
                Ok(EncodeOutcome::Skipped(reason)) => issues.push(DatasetIssue { line, reason: format!("skipped: {reason}") }),
                Err(e) => issues.push(DatasetIssue { line, reason: e.to_string() }),
            }
        }
        Ok(Preview {
            path: path.display().to_string(),
            format: records.format().unwrap_or(format).name().to_string(),
            examples,
            issues,
            changed_since_import: changed,
        })
    }
}
