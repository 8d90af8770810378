//! The store commands of the `tunebench` binary, end to end on a temporary app data dir:
//! datasets import/list/preview, estimate, runs list/show/chart/reorder/stop/delete, compare,
//! methods — exit codes, key output, and clear errors for bad ids and files.

mod common;

use std::path::Path;

use tunebench::store::{MetricRow, NewRun, RunStatus, Store, WriteBatch};

use common::{fails, ok};

/// Two finished runs and one queued run, recorded directly in the store.
fn seed_runs(home: &Path) -> (i64, i64, i64) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let s = Store::open(&home.join("tunebench.db")).await.unwrap();
        let mut ids = Vec::new();
        for (name, lr) in [("first", 1e-3), ("second", 2e-4), ("waiting", 1e-4)] {
            let id = s
                .insert_run(&NewRun {
                    name: name.into(),
                    method: "lora".into(),
                    config: serde_json::json!({"name": name, "train": {"lr": lr}}),
                    model_id: None,
                    model_path: "/m.gguf".into(),
                    dataset_path: "/d.jsonl".into(),
                    dataset_id: None,
                    out_dir: home.join("runs").join(name).display().to_string(),
                    device: "cpu".into(),
                })
                .await
                .unwrap();
            if name != "waiting" {
                s.claim_run(id, 7, None).await.unwrap();
                let metrics = (1..=10)
                    .flat_map(|st| {
                        [("loss", 3.0 - st as f64 * 0.1), ("val_loss", 2.5 - st as f64 * 0.05)]
                            .map(|(n, v)| MetricRow { name: n.into(), step: st, tokens: st * 100, wall_s: st as f64, value: v })
                    })
                    .collect();
                s.write_batch(id, &WriteBatch { metrics, progress: Some((10, 1000, 10.0)), ..Default::default() }).await.unwrap();
                s.finish_run(id, 7, RunStatus::Completed, None, &serde_json::json!({"final_loss": 2.0, "final_val_loss": 2.0}), Some(1 << 30))
                    .await
                    .unwrap();
            }
            ids.push(id);
        }
        (ids[0], ids[1], ids[2])
    })
}

#[test]
fn runs_compare_and_charts_from_the_command_line() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let (a, b, q) = seed_runs(h);
    let list = ok(h, &["runs", "list"]);
    for name in ["first", "second", "waiting", "completed", "queued"] {
        assert!(list.contains(name), "{name} in {list}");
    }
    let json: serde_json::Value = serde_json::from_str(&ok(h, &["runs", "list", "--json"])).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 3);
    let show = ok(h, &["runs", "show", &a.to_string()]);
    assert!(show.contains("`first`: completed") && show.contains("step 10/"), "{show}");

    let cmp = ok(h, &["compare", &a.to_string(), &b.to_string()]);
    assert!(cmp.contains("config differences") && cmp.contains("train.lr"), "{cmp}");
    let png = h.join("cmp.png");
    ok(h, &["compare", &a.to_string(), &b.to_string(), "--out", png.to_str().unwrap(), "--metric", "val_loss"]);
    assert_eq!(&std::fs::read(&png).unwrap()[..4], b"\x89PNG");
    let e = fails(h, &["compare", &a.to_string(), &b.to_string(), "--out", png.to_str().unwrap()]);
    assert!(e.contains("cmp.png") && e.contains("exists"), "{e}");
    let svg = h.join("run.svg");
    ok(h, &["runs", "chart", &a.to_string(), "--out", svg.to_str().unwrap(), "--x", "tokens", "--dark"]);
    assert!(std::fs::read_to_string(&svg).unwrap().contains("data-series=\"train loss\""));
    let e = fails(h, &["runs", "chart", &a.to_string(), "--out", svg.to_str().unwrap(), "--x", "epochs"]);
    assert!(e.contains("unknown x axis"), "{e}");

    // The queue: reorder, stop (= cancel) a queued run, resume it into the queue again.
    ok(h, &["runs", "reorder", &q.to_string()]);
    assert!(ok(h, &["runs", "stop", &q.to_string()]).contains("stopped"));
    assert!(ok(h, &["runs", "resume", &q.to_string(), "--queue"]).contains("queued"));
    let e = fails(h, &["runs", "resume", &a.to_string()]);
    assert!(e.contains("completed"), "{e}");

    // Unknown ids are named; delete removes records and the folder inside runs/.
    let e = fails(h, &["runs", "show", "999"]);
    assert!(e.contains("no run with id 999"), "{e}");
    std::fs::create_dir_all(h.join("runs/first/checkpoints")).unwrap();
    ok(h, &["runs", "delete", &a.to_string()]);
    assert!(!h.join("runs/first").exists());
    assert!(fails(h, &["runs", "show", &a.to_string()]).contains(&format!("no run with id {a}")));

    let methods = ok(h, &["methods"]);
    assert!(methods.contains("lora") && methods.contains("ia3") && methods.contains("bitfit") && methods.contains("[peft]"));
}

#[test]
fn datasets_and_estimate_from_the_command_line() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    std::fs::create_dir_all(h.join("models")).unwrap();
    std::os::unix::fs::symlink(common::default_model(), h.join("models").join(tunebench::paths::DEFAULT_MODEL_FILE)).unwrap();
    let data = concat!(env!("CARGO_MANIFEST_DIR"), "/assets/datasets/persona/train.jsonl");
    let out = ok(h, &["datasets", "import", data, "--name", "persona"]);
    assert!(out.contains("persona") && out.contains("121 rows"), "{out}");
    let list = ok(h, &["datasets", "list"]);
    assert!(list.contains("persona") && list.contains("messages"), "{list}");
    let prev = ok(h, &["datasets", "preview", "1", "-n", "2"]);
    assert!(prev.contains("example 1") && prev.contains("example 2") && prev.contains("\x1b[1;32m"), "{prev}");
    let e = fails(h, &["datasets", "import", "/nonexistent/x.csv"]);
    assert!(e.contains("/nonexistent/x.csv"), "{e}");

    let est = ok(h, &["estimate", "--preset", "quickstart"]);
    assert!(est.contains("trainable") && est.contains("peak memory") && est.contains("s/step"), "{est}");
    let json: serde_json::Value = serde_json::from_str(&ok(h, &["estimate", "--preset", "quickstart", "--json"])).unwrap();
    assert_eq!(json["trainable_params"], 4_884_480);
    // The imported dataset's longest example caps the sequence length (quickstart max_len 128).
    assert!(json["seq_len"].as_u64().unwrap() <= 128);
}
