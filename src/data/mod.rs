//! Datasets: reading files ([`read_records`]), chat templating ([`ChatTemplate`]),
//! tokenization with prompt-loss masking ([`encode`]), train/validation splits
//! ([`load_dataset`]) and batching ([`Batcher`], [`eval_batches`]).
//!
//! The flow the trainer uses:
//! ```text
//! file ──read_records──► Record ──encode (template + tokenizer)──► Example ──load_dataset──► Dataset{train, val}
//!                                                                              Batcher ──► Batch [batch, seq]
//! ```
//! Labels follow HF's convention: aligned with `input_ids`, `-100` ([`IGNORE_INDEX`]) where
//! not trained on; the trainer shifts them to predict the next token.

mod batch;
mod encode;
mod format;
mod template;
pub mod testing;

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

pub use batch::{eval_batches, Batch, Batcher, BatcherState};
pub use encode::{encode, eos_id, try_encode, EncodeOptions, EncodeOutcome, Example, SkipReason, IGNORE_INDEX};
pub use format::{container_name, read_records, Format, Message, Record, RecordIter, TOOLS_PREAMBLE};
pub use template::{ChatTemplate, CHATML};

use crate::{Error, Result};

/// How a dataset is loaded.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DataOptions {
    /// The file's schema; `auto` detects it.
    pub format: Format,
    /// Longest example in tokens (longer ones are truncated and counted).
    pub max_len: usize,
    /// Train on prompts too, not only on the assistant's answers.
    pub train_on_prompt: bool,
    /// Fraction of the examples held out for validation, in `[0, 1)`.
    pub val_fraction: f64,
    /// At most this many validation examples.
    pub val_max: usize,
    /// Seed of the validation split.
    pub seed: u64,
    /// Use only the first this-many usable examples of the file (reading stops there).
    pub max_examples: Option<usize>,
}

impl Default for DataOptions {
    fn default() -> Self {
        DataOptions {
            format: Format::Auto,
            max_len: 1024,
            train_on_prompt: false,
            val_fraction: 0.0,
            val_max: 256,
            seed: 42,
            max_examples: None,
        }
    }
}

impl DataOptions {
    /// Checks the values; errors name the offending key (`data.<field>`).
    pub fn validate(&self) -> Result<()> {
        if self.max_len == 0 {
            return Err(Error::config("data.max_len", "must be at least 1"));
        }
        if !(0.0..1.0).contains(&self.val_fraction) {
            return Err(Error::config("data.val_fraction", format!("must be in [0, 1), got {}", self.val_fraction)));
        }
        if self.max_examples == Some(0) {
            return Err(Error::config("data.max_examples", "must be at least 1 (leave it unset for all)"));
        }
        Ok(())
    }
}

/// How many records were skipped for one reason.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkipCount {
    /// Why.
    pub reason: SkipReason,
    /// How many records.
    pub count: usize,
    /// Line of the first such record (for a JSON array, the line the record starts on).
    pub first_line: usize,
}

/// Facts about a loaded dataset, for logs and the UI.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DataStats {
    /// The schema read (after detection).
    pub format: Format,
    /// Records read from the file.
    pub records: usize,
    /// Examples kept (train + validation).
    pub examples: usize,
    /// Records that gave no example, by reason.
    pub skipped: Vec<SkipCount>,
    /// Kept examples cut to `max_len` (records cut so short that nothing trained was left
    /// are counted in `skipped` as `no_target_tokens` instead).
    pub truncated: usize,
    /// Tokens in the kept examples.
    pub tokens: usize,
    /// Trained-on tokens in the kept examples (as counted for the shifted loss).
    pub target_tokens: usize,
    /// Longest kept example, in tokens.
    pub max_len: usize,
    /// Mean kept example length, in tokens.
    pub mean_len: f64,
}

impl DataStats {
    /// Total records skipped.
    pub fn n_skipped(&self) -> usize {
        self.skipped.iter().map(|s| s.count).sum()
    }
}

/// A tokenized dataset, split.
#[derive(Clone, Debug, Default)]
pub struct Dataset {
    /// Training examples, in file order.
    pub train: Vec<Example>,
    /// Validation examples, in file order.
    pub val: Vec<Example>,
    /// What was read, kept, skipped and truncated.
    pub stats: DataStats,
}

/// Reads, tokenizes and splits a dataset file.
///
/// Records are streamed (see [`read_records`]); a bad record (malformed JSON, a missing
/// field, invalid UTF-8) stops loading with an error naming the file, line and reason.
/// Records that give no example (no assistant turn, empty text, nothing left after
/// truncation) are skipped and counted in [`DataStats::skipped`]; if all are, that is an
/// error. Plain-text records get the eos token appended.
///
/// The validation set is `min(val_max, round(val_fraction × n))` of the `n` kept examples,
/// chosen by a shuffle seeded with `seed` (and at least one example is left for training);
/// the same file, options and tokenizer always give the same split.
pub fn load_dataset(
    path: &Path,
    opts: &DataOptions,
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
) -> Result<Dataset> {
    opts.validate()?;
    let span = tracing::info_span!("load_dataset", path = %path.display());
    let _guard = span.enter();
    let enc = EncodeOptions { max_len: opts.max_len, train_on_prompt: opts.train_on_prompt, add_eos_to_text: true };
    let mut records = read_records(path, opts.format)?;
    let mut examples = Vec::new();
    let mut stats = DataStats::default();
    let mut skipped: BTreeMap<SkipReason, SkipCount> = BTreeMap::new();
    while opts.max_examples.is_none_or(|m| examples.len() < m) {
        let Some(item) = records.next() else { break };
        let (line, record) = item?;
        stats.records += 1;
        let outcome = try_encode(&record, template, tokenizer, &enc).map_err(|e| match e {
            Error::Template(_) | Error::Tokenizer(_) => Error::bad_input(path, Some(line), e.to_string()),
            other => other,
        })?;
        match outcome {
            EncodeOutcome::Example { example, truncated } => {
                stats.truncated += usize::from(truncated);
                examples.push(example);
            }
            EncodeOutcome::Skipped(reason) => {
                let entry = skipped.entry(reason).or_insert_with(|| {
                    tracing::warn!(
                        "{}:{line}: skipped: {reason} (further such records are only counted)",
                        path.display()
                    );
                    SkipCount { reason, count: 0, first_line: line }
                });
                entry.count += 1;
            }
        }
    }
    stats.format = records.format().unwrap_or(opts.format);
    stats.skipped = skipped.into_values().collect();
    if examples.is_empty() {
        let reasons: Vec<String> = stats
            .skipped
            .iter()
            .map(|s| format!("{} × {} (first at line {})", s.count, s.reason, s.first_line))
            .collect();
        return Err(Error::bad_input(
            path,
            None,
            format!("no usable examples: all {} records were skipped: {}", stats.records, reasons.join("; ")),
        ));
    }
    stats.examples = examples.len();
    stats.tokens = examples.iter().map(Example::len).sum();
    stats.target_tokens = examples.iter().map(Example::n_target_tokens).sum();
    stats.max_len = examples.iter().map(Example::len).max().unwrap_or(0);
    stats.mean_len = stats.tokens as f64 / stats.examples as f64;

    let (train, val) = split(examples, opts.val_fraction, opts.val_max, opts.seed);
    tracing::info!(
        format = %stats.format,
        records = stats.records,
        train = train.len(),
        val = val.len(),
        skipped = stats.n_skipped(),
        truncated = stats.truncated,
        tokens = stats.tokens,
        target_tokens = stats.target_tokens,
        max_len = stats.max_len,
        mean_len = stats.mean_len,
        "dataset loaded"
    );
    Ok(Dataset { train, val, stats })
}

/// Number of validation examples for `n` examples.
fn val_count(n: usize, val_fraction: f64, val_max: usize) -> usize {
    let wanted = (val_fraction * n as f64).round() as usize;
    wanted.min(val_max).min(n.saturating_sub(1))
}

/// Splits off a seeded random validation set; both parts keep file order.
fn split(examples: Vec<Example>, val_fraction: f64, val_max: usize, seed: u64) -> (Vec<Example>, Vec<Example>) {
    let n = examples.len();
    let n_val = val_count(n, val_fraction, val_max);
    if n_val == 0 {
        return (examples, Vec::new());
    }
    // A different stream from the batcher's epoch-0 shuffle with the same seed.
    let order = batch::shuffled_indices(n, seed ^ 0x5EED_5EED_5EED_5EED);
    let mut is_val = vec![false; n];
    for &i in &order[..n_val] {
        is_val[i] = true;
    }
    let (mut train, mut val) = (Vec::with_capacity(n - n_val), Vec::with_capacity(n_val));
    for (ex, v) in examples.into_iter().zip(is_val) {
        if v {
            val.push(ex);
        } else {
            train.push(ex);
        }
    }
    (train, val)
}

#[cfg(test)]
mod tests {
    use super::testing::tiny_tokenizer;
    use super::*;
    use std::io::Write;
    use std::path::PathBuf;

    fn write(dir: &tempfile::TempDir, name: &str, content: &str) -> PathBuf {
        let path = dir.path().join(name);
        std::fs::File::create(&path).unwrap().write_all(content.as_bytes()).unwrap();
        path
    }

    fn alpaca_lines(n: usize) -> String {
        (0..n).map(|i| format!("{{\"instruction\": \"question {i}\", \"output\": \"answer {i}\"}}\n")).collect()
    }

    #[test]
    fn loads_and_splits_deterministically() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(&dir, "a.jsonl", &alpaca_lines(50));
        let opts = DataOptions { val_fraction: 0.1, val_max: 3, seed: 5, ..DataOptions::default() };
        let (t, tok) = (ChatTemplate::chatml(), tiny_tokenizer());
        let d = load_dataset(&p, &opts, &t, &tok).unwrap();
        assert_eq!((d.train.len(), d.val.len()), (47, 3));
        assert_eq!(d.stats.records, 50);
        assert_eq!(d.stats.examples, 50);
        assert_eq!(d.stats.format, Format::Alpaca);
        assert_eq!(d.stats.tokens, d.train.iter().chain(&d.val).map(Example::len).sum::<usize>());
        assert!(d.stats.mean_len > 0.0 && d.stats.max_len >= d.stats.mean_len as usize);
        let again = load_dataset(&p, &opts, &t, &tok).unwrap();
        assert_eq!(again.val, d.val);
        assert_eq!(again.train, d.train);
        let other = load_dataset(&p, &DataOptions { seed: 6, ..opts.clone() }, &t, &tok).unwrap();
        assert_ne!(other.val, d.val);
        // round(0.1 × 50) = 5 when val_max allows.
        let d = load_dataset(&p, &DataOptions { val_max: 100, ..opts }, &t, &tok).unwrap();
        assert_eq!(d.val.len(), 5);
    }

    #[test]
    fn val_count_rounds_caps_and_leaves_training_data() {
        assert_eq!(val_count(100, 0.05, 10), 5);
        assert_eq!(val_count(100, 0.05, 2), 2);
        assert_eq!(val_count(10, 0.04, 10), 0);
        assert_eq!(val_count(10, 0.05, 10), 1); // 0.5 rounds away from zero
        assert_eq!(val_count(1, 0.9, 10), 0);
        assert_eq!(val_count(3, 0.99, 10), 2);
    }

    #[test]
    fn skips_are_counted_and_truncation_reported() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            &dir,
            "m.jsonl",
            concat!(
                "{\"messages\": [{\"role\": \"user\", \"content\": \"no answer\"}]}\n",
                "{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"assistant\", \"content\": \"a\"}]}\n",
                "{\"messages\": [{\"role\": \"system\", \"content\": \"s\"}, {\"role\": \"user\", \"content\": \"q\"}]}\n",
                "{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"assistant\", \"content\": \"a much longer answer that gets cut\"}]}\n",
            ),
        );
        let (t, tok) = (ChatTemplate::chatml(), tiny_tokenizer());
        let d = load_dataset(&p, &DataOptions { max_len: 40, ..DataOptions::default() }, &t, &tok).unwrap();
        assert_eq!(d.stats.records, 4);
        assert_eq!(d.train.len(), 2);
        assert_eq!(d.stats.truncated, 1);
        assert_eq!(d.stats.max_len, 40);
        assert_eq!(d.stats.skipped, vec![SkipCount { reason: SkipReason::NoAssistantTurn, count: 2, first_line: 1 }]);
        assert_eq!(d.stats.n_skipped(), 2);
    }

    #[test]
    fn everything_skipped_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            &dir,
            "m.jsonl",
            "{\"conversations\": [{\"from\": \"human\", \"value\": \"hi\"}]}\n\n{\"conversations\": []}\n",
        );
        let e = load_dataset(&p, &DataOptions::default(), &ChatTemplate::chatml(), &tiny_tokenizer())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("m.jsonl") && e.contains("all 2 records were skipped") && e.contains("no assistant turn"),
            "{e}"
        );
        assert!(e.contains("first at line 1"), "{e}");
    }

    #[test]
    fn empty_dataset_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(&dir, "empty.jsonl", "\n");
        let e = load_dataset(&p, &DataOptions::default(), &ChatTemplate::chatml(), &tiny_tokenizer())
            .unwrap_err()
            .to_string();
        assert!(e.contains("empty.jsonl") && e.contains("no records"), "{e}");
    }

    #[test]
    fn bad_record_stops_loading_with_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(&dir, "a.jsonl", &(alpaca_lines(3) + "{\"instruction\": \"x\"}\n"));
        let e = load_dataset(&p, &DataOptions::default(), &ChatTemplate::chatml(), &tiny_tokenizer())
            .unwrap_err()
            .to_string();
        assert!(e.contains("a.jsonl:4:") && e.contains("missing field `output`"), "{e}");
    }

    #[test]
    fn template_errors_name_the_record() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(&dir, "a.jsonl", "{\"instruction\": \"x\", \"output\": \"y\", \"system\": \"s\"}\n");
        let t = ChatTemplate::new(
            "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{{ m.content }}{% endfor %}",
            "",
            "<|im_end|>",
        )
        .unwrap();
        let e = load_dataset(&p, &DataOptions::default(), &t, &tiny_tokenizer()).unwrap_err().to_string();
        assert!(e.contains("a.jsonl:1:") && e.contains("System role not supported"), "{e}");
    }

    #[test]
    fn max_examples_stops_early_and_options_are_validated() {
        let dir = tempfile::tempdir().unwrap();
        // Line 4 is malformed, but reading stops before it.
        let p = write(&dir, "a.jsonl", &(alpaca_lines(3) + "not json\n"));
        let (t, tok) = (ChatTemplate::chatml(), tiny_tokenizer());
        let d = load_dataset(&p, &DataOptions { max_examples: Some(3), ..DataOptions::default() }, &t, &tok).unwrap();
        assert_eq!(d.train.len(), 3);
        for (bad, key) in [
            (DataOptions { val_fraction: 1.0, ..DataOptions::default() }, "data.val_fraction"),
            (DataOptions { max_len: 0, ..DataOptions::default() }, "data.max_len"),
            (DataOptions { max_examples: Some(0), ..DataOptions::default() }, "data.max_examples"),
        ] {
            let e = load_dataset(&p, &bad, &t, &tok).unwrap_err();
            assert!(matches!(&e, Error::Config { key: k, .. } if k == key), "{e:?}");
        }
    }

    #[test]
    fn text_file_dataset() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(&dir, "corpus.txt", "First block.\n\nSecond block\nwith two lines.\n");
        let (t, tok) = (ChatTemplate::chatml(), tiny_tokenizer());
        let d = load_dataset(&p, &DataOptions::default(), &t, &tok).unwrap();
        assert_eq!(d.stats.format, Format::Text);
        assert_eq!(d.train.len(), 2);
        let eos = tok.token_to_id("<|im_end|>").unwrap();
        assert!(d.train.iter().all(|e| e.input_ids.last() == Some(&eos)));
        assert_eq!(d.stats.target_tokens, d.stats.tokens - 2);
    }

    #[test]
    fn types_can_cross_threads() {
        fn send_sync<T: Send + Sync>() {}
        fn send<T: Send>() {}
        send_sync::<ChatTemplate>();
        send_sync::<Dataset>();
        send_sync::<Batcher>();
        send::<RecordIter>();
    }

    #[test]
    fn data_options_serde_defaults() {
        let o: DataOptions = serde_json::from_str(r#"{"format": "sharegpt", "max_len": 512}"#).unwrap();
        assert_eq!(o.format, Format::ShareGpt);
        assert_eq!(o.max_len, 512);
        assert_eq!(o.seed, DataOptions::default().seed);
        assert!(serde_json::from_str::<DataOptions>(r#"{"format": "csvx"}"#).is_err());
    }
}
