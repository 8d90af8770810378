//! Dataset import, statistics and preview through the workbench API, on real files (JSONL, JSON,
//! CSV, Parquet) with the default model's tokenizer and chat template, and the bad inputs a
//! user produces: broken lines, wrong columns, a dataset deleted from disk.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tunebench::api::datasets::{DatasetStats, ImportRequest, PreviewRequest};
use tunebench::api::{Workbench, WorkbenchOptions};
use tunebench::data::Format;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

fn import(path: &Path) -> ImportRequest {
    ImportRequest { path: path.to_path_buf(), name: None, format: Format::Auto, max_len: 64, model: Some(common::default_model()) }
}

fn preview(id: Option<i64>, path: Option<PathBuf>, n: usize) -> PreviewRequest {
    PreviewRequest { dataset_id: id, path, n, format: None, max_len: 512, model: Some(common::default_model()) }
}

/// Writes a Parquet file of UTF-8 string columns.
fn write_parquet(path: &Path, columns: &[&str], rows: &[Vec<&str>]) {
    use parquet::data_type::{ByteArray, ByteArrayType};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    let fields: String = columns.iter().map(|c| format!("REQUIRED BYTE_ARRAY {c} (UTF8);")).collect();
    let schema = Arc::new(parquet::schema::parser::parse_message_type(&format!("message m {{ {fields} }}")).unwrap());
    let file = std::fs::File::create(path).unwrap();
    let mut w = SerializedFileWriter::new(file, schema, Arc::new(WriterProperties::builder().build())).unwrap();
    let mut rg = w.next_row_group().unwrap();
    let mut i = 0;
    while let Some(mut col) = rg.next_column().unwrap() {
        let values: Vec<ByteArray> = rows.iter().map(|r| ByteArray::from(r[i])).collect();
        col.typed::<ByteArrayType>().write_batch(&values, None, None).unwrap();
        col.close().unwrap();
        i += 1;
    }
    rg.close().unwrap();
    w.close().unwrap();
}

#[test]
fn import_the_bundled_sample_with_statistics() {
    let home = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let wb = Workbench::open(WorkbenchOptions::new(home.path())).await.unwrap();
        let path = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/datasets/persona/train.jsonl"));
        let mut last = 0;
        let rec = wb.import_dataset(&import(&path), |d, _| last = d).await.unwrap();
        assert_eq!(last, 1000, "progress reaches the end");
        assert_eq!((rec.rows, rec.container.as_str(), rec.format.as_str()), (121, "jsonl", "messages"));
        assert_eq!(rec.errors.as_array().unwrap().len(), 0);
        let st: DatasetStats = serde_json::from_value(rec.stats.clone()).unwrap();
        assert_eq!(st.examples, 121);
        assert_eq!(st.histogram.iter().sum::<u64>(), 121);
        assert!(st.tokens > 121 * 20 && rec.tokens == Some(st.tokens as i64));
        assert!(st.truncated > 0 && st.truncated < 121, "some examples are longer than 64 tokens: {}", st.truncated);
        assert!((st.truncated_share - st.truncated as f64 / 121.0).abs() < 1e-12);
        assert!(st.target_tokens > 0 && st.target_tokens < st.tokens);
        // The hash is of the bytes: importing the same file twice gives the same hash.
        let again = wb.import_dataset(&import(&path), |_, _| {}).await.unwrap();
        assert_eq!(again.content_hash, rec.content_hash);
        assert_eq!(wb.store().datasets().await.unwrap().len(), 2);

        // Preview: the assistant's answer is trained on; the prompt and template are masked.
        let p = wb.preview_dataset(&preview(Some(rec.id), None, 3)).await.unwrap();
        assert_eq!(p.examples.len(), 3);
        let first = std::fs::read_to_string(&path).unwrap();
        let v: serde_json::Value = serde_json::from_str(first.lines().next().unwrap()).unwrap();
        let msgs = v["messages"].as_array().unwrap();
        let user = msgs.iter().find(|m| m["role"] == "user").unwrap()["content"].as_str().unwrap();
        let answer = msgs.iter().find(|m| m["role"] == "assistant").unwrap()["content"].as_str().unwrap();
        let ex = &p.examples[0];
        let trained: String = ex.spans.iter().filter(|s| s.trained).map(|s| s.text.as_str()).collect();
        let masked: String = ex.spans.iter().filter(|s| !s.trained).map(|s| s.text.as_str()).collect();
        assert!(trained.contains(answer), "trained text {trained:?} holds the answer");
        assert!(masked.contains(user) && !trained.contains(user), "the prompt is masked");
        assert!(masked.contains("<|im_start|>"), "the chat template's markup is shown");
        assert!(ex.trained_tokens > 0 && ex.trained_tokens < ex.tokens);
    });
}

#[test]
fn every_bad_line_is_listed_and_good_records_are_kept() {
    let home = tempfile::tempdir().unwrap();
    let f = home.path().join("mixed.jsonl");
    std::fs::write(
        &f,
        concat!(
            r#"{"instruction": "Say hi", "output": "hi"}"#,
            "\n",
            r#"{"instruction": "Add 2 and 2", "output": "4"}"#,
            "\n",
            r#"{"instruction": "broken", "output": }"#,
            "\n",
            r#"{"instruction": "Name a colour", "output": "blue"}"#,
            "\n\n",
            r#"{"instruction": "no output"}"#,
            "\n",
            r#"{"instruction": "Capital of France?", "output": "Paris"}"#,
            "\n",
        ),
    )
    .unwrap();
    rt().block_on(async {
        let wb = Workbench::open(WorkbenchOptions::new(home.path())).await.unwrap();
        let rec = wb.import_dataset(&import(&f), |_, _| {}).await.unwrap();
        assert_eq!(rec.rows, 4);
        let errs = rec.errors.as_array().unwrap();
        let lines: Vec<u64> = errs.iter().map(|e| e["line"].as_u64().unwrap()).collect();
        assert_eq!(lines, vec![3, 6], "{errs:?}");
        assert!(errs[0]["reason"].as_str().unwrap().contains("invalid JSON"));
        assert!(errs[1]["reason"].as_str().unwrap().contains("output"));
        let p = wb.preview_dataset(&preview(Some(rec.id), None, 10)).await.unwrap();
        assert_eq!(p.examples.len(), 4);
        assert_eq!(p.issues.iter().map(|i| i.line).collect::<Vec<_>>(), vec![3, 6]);
    });
}

#[test]
fn csv_and_parquet_import_and_wrong_columns_are_explained() {
    let home = tempfile::tempdir().unwrap();
    let dir = home.path();
    let csv = dir.join("qa.csv");
    std::fs::write(&csv, "question,answer\n\"Who are you?\",\"I am Tessel, made by Marrowfield Labs.\"\n\"Two, three\",\"A list: two, three\nand a newline\"\nPing,Pong\n").unwrap();
    let bad_csv = dir.join("bad.csv");
    std::fs::write(&bad_csv, "foo,bar\n1,2\n").unwrap();
    let ragged = dir.join("ragged.csv");
    std::fs::write(&ragged, "instruction,output\na,b\nc,d,e\nf,g\n").unwrap();
    let pq = dir.join("chat.parquet");
    write_parquet(&pq, &["instruction", "input", "output"], &[vec!["Translate", "chat", "Katze"], vec!["Say hi", "", "hi"]]);
    let bad_pq = dir.join("wrong.parquet");
    write_parquet(&bad_pq, &["question_text", "label"], &[vec!["x", "y"]]);
    std::fs::write(dir.join("not.parquet"), b"PAR1 this is not parquet").unwrap();
    rt().block_on(async {
        let wb = Workbench::open(WorkbenchOptions::new(dir)).await.unwrap();
        let rec = wb.import_dataset(&import(&csv), |_, _| {}).await.unwrap();
        assert_eq!((rec.rows, rec.container.as_str(), rec.format.as_str()), (3, "csv", "alpaca"));
        let p = wb.preview_dataset(&preview(Some(rec.id), None, 3)).await.unwrap();
        let trained: String = p.examples[1].spans.iter().filter(|s| s.trained).map(|s| s.text.as_str()).collect();
        assert!(trained.contains("A list: two, three\nand a newline"), "quoted cells keep commas and newlines: {trained:?}");
        assert_eq!(p.examples[2].line, 5, "rows are numbered by the line they start on");

        let e = wb.import_dataset(&import(&bad_csv), |_, _| {}).await.unwrap_err().to_string();
        assert!(e.contains("bad.csv:1") && e.contains("[foo, bar]") && e.contains("instruction"), "{e}");

        let rec = wb.import_dataset(&import(&ragged), |_, _| {}).await.unwrap();
        assert_eq!(rec.rows, 2);
        let errs = rec.errors.as_array().unwrap();
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0]["line"], 3);
        assert!(errs[0]["reason"].as_str().unwrap().contains("3 fields; the header has 2"), "{errs:?}");

        let rec = wb.import_dataset(&import(&pq), |_, _| {}).await.unwrap();
        assert_eq!((rec.rows, rec.container.as_str(), rec.format.as_str()), (2, "parquet", "alpaca"), "{}", rec.errors);
        let p = wb.preview_dataset(&preview(Some(rec.id), None, 2)).await.unwrap();
        let all: String = p.examples[0].spans.iter().map(|s| s.text.as_str()).collect();
        assert!(all.contains("Translate") && all.contains("chat") && all.contains("Katze"), "{all:?}");

        let e = wb.import_dataset(&import(&bad_pq), |_, _| {}).await.unwrap_err().to_string();
        assert!(e.contains("wrong.parquet") && e.contains("[question_text, label]"), "{e}");
        let e = wb.import_dataset(&import(&dir.join("not.parquet")), |_, _| {}).await.unwrap_err().to_string();
        assert!(e.contains("not.parquet") && e.contains("not a readable Parquet file"), "{e}");
        assert_eq!(wb.store().datasets().await.unwrap().len(), 3, "failed imports record nothing");
    });
}

#[test]
fn a_dataset_deleted_from_disk_is_reported_and_its_record_kept() {
    let home = tempfile::tempdir().unwrap();
    let f = home.path().join("gone.jsonl");
    std::fs::write(&f, "{\"text\": \"hello world\"}\n{\"text\": \"more text\"}\n").unwrap();
    rt().block_on(async {
        let wb = Workbench::open(WorkbenchOptions::new(home.path())).await.unwrap();
        let rec = wb.import_dataset(&import(&f), |_, _| {}).await.unwrap();
        assert_eq!(rec.format, "text");
        std::fs::remove_file(&f).unwrap();
        let e = wb.preview_dataset(&preview(Some(rec.id), None, 2)).await.unwrap_err().to_string();
        assert!(e.contains("gone.jsonl") && e.contains("no longer exists"), "{e}");
        assert_eq!(wb.store().dataset(rec.id).await.unwrap().rows, 2, "the record is kept");
        // A run on it is refused up front, naming the file.
        let mut cfg = tunebench::train::RunConfig::preset("quickstart").unwrap();
        cfg.data.path = f.clone();
        cfg.model.path = Some(common::default_model());
        let e = wb.create_run(tunebench::api::CreateRun { config: cfg, dataset_id: Some(rec.id), device: "cpu".into() }).await.unwrap_err().to_string();
        assert!(e.contains("gone.jsonl") && e.contains("does not exist"), "{e}");
        assert!(wb.runs().await.unwrap().is_empty());
    });
}

#[test]
fn the_shared_alpaca_demo_imports() {
    let path = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/data/alpaca_en_demo.json"));
    if !path.exists() {
        eprintln!("skipped: {} not present", path.display());
        return;
    }
    let home = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let wb = Workbench::open(WorkbenchOptions::new(home.path())).await.unwrap();
        let mut req = import(&path);
        req.max_len = 512;
        let rec = wb.import_dataset(&req, |_, _| {}).await.unwrap();
        assert_eq!((rec.container.as_str(), rec.format.as_str()), ("json", "alpaca"));
        assert!(rec.rows > 500, "{}", rec.rows);
        assert_eq!(rec.errors.as_array().unwrap().len(), 0);
    });
}
