//! The bundled persona sample (`assets/datasets/persona/train.jsonl`, OpenAI messages
//! format) loads without a single error or skipped record.

use std::path::PathBuf;

use tunebench::data::testing::tiny_tokenizer;
use tunebench::data::{self, ChatTemplate, DataOptions, Format};

fn persona_train() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/datasets/persona/train.jsonl")
}

#[test]
fn persona_train_reads_every_line() {
    let path = persona_train();
    let lines = std::fs::read_to_string(&path).unwrap().lines().filter(|l| !l.trim().is_empty()).count();
    let mut it = data::read_records(&path, Format::Auto).unwrap();
    let recs: Vec<_> = it.by_ref().collect::<tunebench::Result<_>>().unwrap();
    assert_eq!(it.format(), Some(Format::Messages));
    assert_eq!(recs.len(), lines);
    assert!(recs.iter().all(|(_, r)| r.has_target()));
}

#[test]
fn persona_train_loads_with_nothing_skipped() {
    let path = persona_train();
    let opts = DataOptions { format: Format::Messages, val_fraction: 0.1, val_max: 8, ..DataOptions::default() };
    let d = data::load_dataset(&path, &opts, &ChatTemplate::chatml(), &tiny_tokenizer()).unwrap();
    assert_eq!(d.stats.n_skipped(), 0);
    assert_eq!(d.stats.truncated, 0);
    assert_eq!(d.train.len() + d.val.len(), d.stats.records);
    assert!(d.val.len() <= 8 && !d.val.is_empty());
}
