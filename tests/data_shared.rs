//! The real demo datasets in `../shared/data/` (LLaMA-Factory's demo files) parse with the
//! expected record counts, roles and masking.

use std::path::PathBuf;

use tunebench::data::testing::tiny_tokenizer;
use tunebench::data::{self, ChatTemplate, DataOptions, Format, Record, IGNORE_INDEX};

fn shared_data(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data");
    assert!(
        dir.is_dir(),
        "../shared/data is needed for this test (the shared demo datasets beside the checkout); not found at {}",
        dir.display()
    );
    let path = dir.join(name);
    assert!(path.is_file(), "../shared/data/{name} is needed for this test; not found at {}", path.display());
    path
}

fn records(name: &str) -> (Vec<(usize, Record)>, Option<Format>) {
    let path = shared_data(name);
    let mut it = data::read_records(&path, Format::Auto).unwrap();
    let recs: Vec<_> = it.by_ref().collect::<tunebench::Result<_>>().unwrap();
    (recs, it.format())
}

#[test]
fn alpaca_demo_has_999_records() {
    let (recs, format) = records("alpaca_en_demo.json");
    assert_eq!(format, Some(Format::Alpaca));
    assert_eq!(recs.len(), 999);
    for (line, r) in &recs {
        let Record::Chat(m) = r else { panic!("line {line}: not a conversation") };
        assert_eq!(m.len(), 2, "line {line}");
        assert_eq!((m[0].role.as_str(), m[1].role.as_str()), ("user", "assistant"));
    }
    // Line numbers are where each record starts, increasing.
    assert_eq!(recs[0].0, 2);
    assert!(recs.windows(2).all(|w| w[0].0 < w[1].0));
}

#[test]
fn glaive_toolcall_demo_has_300_sharegpt_records() {
    let (recs, format) = records("glaive_toolcall_en_demo.json");
    assert_eq!(format, Some(Format::ShareGpt));
    assert_eq!(recs.len(), 300);
    let mut roles = std::collections::BTreeMap::new();
    for (_, r) in &recs {
        let Record::Chat(m) = r else { panic!("not a conversation") };
        for msg in m {
            *roles.entry(msg.role.clone()).or_insert(0usize) += 1;
        }
    }
    // 746 human, 746 gpt + 211 function_call, 211 observation; 191 records declare tools.
    assert_eq!(roles.get("user"), Some(&746));
    assert_eq!(roles.get("assistant"), Some(&(746 + 211)));
    assert_eq!(roles.get("tool"), Some(&211));
    assert_eq!(roles.get("system"), Some(&191));
}

#[test]
fn glaive_toolcall_demo_masks_tool_results() {
    let path = shared_data("glaive_toolcall_en_demo.json");
    let (template, tok) = (ChatTemplate::chatml(), tiny_tokenizer());
    let opts = DataOptions { max_len: 100_000, max_examples: Some(20), ..DataOptions::default() };
    let d = data::load_dataset(&path, &opts, &template, &tok).unwrap();
    assert_eq!(d.train.len(), 20);
    assert_eq!(d.stats.n_skipped(), 0);
    assert_eq!(d.stats.truncated, 0);
    // The first record: human, gpt, human, function_call, observation, gpt, human, gpt.
    let ex = &d.train[0];
    let trained: Vec<u32> =
        ex.input_ids.iter().zip(&ex.labels).filter(|(_, &l)| l != IGNORE_INDEX).map(|(&i, _)| i).collect();
    let trained = tok.decode(&trained, false).unwrap();
    assert!(trained.contains("\"name\": \"search_recipes\""), "{trained}");
    assert!(trained.contains("I found two recipes for you."), "{trained}");
    assert!(!trained.contains("\"recipes\": ["), "the tool result must not be trained on: {trained}");
    assert!(!trained.contains("I have chicken, bell peppers, and rice."), "{trained}");
    assert_eq!(trained.matches("<|im_end|>").count(), 4);
}
