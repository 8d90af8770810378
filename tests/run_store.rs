//! The run store on a real SQLite file: migrations, runs, metrics, checkpoints, the queue, and
//! bad input (a corrupt file, unknown ids). Each test uses a fresh temporary database.

use tunebench::store::{MetricRow, NewRun, RunStatus, SampleRecord, Store, WriteBatch};
use tunebench::Error;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

fn new_run(name: &str) -> NewRun {
    NewRun {
        name: name.into(),
        method: "lora".into(),
        config: serde_json::json!({"name": name, "train": {"lr": 1e-3}}),
        model_id: None,
        model_path: "/m.gguf".into(),
        dataset_path: "/d.jsonl".into(),
        dataset_id: None,
        out_dir: "/tmp/x".into(),
        device: "cpu".into(),
    }
}

fn metric(name: &str, step: i64, value: f64) -> MetricRow {
    MetricRow { name: name.into(), step, tokens: step * 100, wall_s: step as f64, value }
}

#[test]
fn migrations_apply_from_empty_and_are_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    rt().block_on(async {
        let s = Store::open(&path).await.unwrap();
        let tables: Vec<String> =
            sqlx::query_scalar("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")
                .fetch_all(s.pool())
                .await
                .unwrap();
        for t in ["checkpoints", "datasets", "metrics", "models", "run_logs", "runs", "samples"] {
            assert!(tables.iter().any(|x| x == t), "table {t} missing: {tables:?}");
        }
        let mode: String = sqlx::query_scalar("PRAGMA journal_mode").fetch_one(s.pool()).await.unwrap();
        assert_eq!(mode, "wal");
        let fk: i64 = sqlx::query_scalar("PRAGMA foreign_keys").fetch_one(s.pool()).await.unwrap();
        assert_eq!(fk, 1);
        let id = s.insert_run(&new_run("a")).await.unwrap();
        s.close().await;

        // Opening again applies nothing and keeps the data.
        let s = Store::open(&path).await.unwrap();
        let applied: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM _sqlx_migrations").fetch_one(s.pool()).await.unwrap();
        let files = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations")).unwrap().count() as i64;
        assert_eq!(applied, files);
        assert_eq!(s.run(id).await.unwrap().name, "a");
        assert_eq!(s.integrity_check().await.unwrap(), "ok");
    });
}

/// A database made before chats had a device (migrations 0001–0002 only, a chat in it) is
/// upgraded on open; its chat answers on the CPU, as it did.
#[test]
fn a_database_from_before_chat_devices_keeps_its_chats_on_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let (path, old) = (dir.path().join("old.db"), dir.path().join("migrations"));
    std::fs::create_dir_all(&old).unwrap();
    for f in ["0001_init.sql", "0002_chats_eval.sql"] {
        std::fs::copy(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/").to_string() + f, old.join(f)).unwrap();
    }
    rt().block_on(async {
        let opts = sqlx::sqlite::SqliteConnectOptions::new().filename(&path).create_if_missing(true);
        let pool = sqlx::SqlitePool::connect_with(opts).await.unwrap();
        sqlx::migrate::Migrator::new(old.as_path()).await.unwrap().run(&pool).await.unwrap();
        sqlx::query("INSERT INTO chats (title, model_path, sampling, created_at, updated_at) VALUES ('old', 'm.gguf', '{}', 1, 1)")
            .execute(&pool)
            .await
            .unwrap();
        pool.close().await;
        let s = Store::open(&path).await.unwrap();
        let chats = s.chats().await.unwrap();
        assert_eq!((chats.len(), chats[0].title.as_str(), chats[0].device.as_str()), (1, "old", "cpu"));
    });
}

#[test]
fn run_lifecycle_metrics_checkpoints_and_cascade() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let s = Store::open(&dir.path().join("t.db")).await.unwrap();
        let id = s.insert_run(&new_run("life")).await.unwrap();
        let r = s.run(id).await.unwrap();
        assert_eq!(r.status, RunStatus::Queued);
        assert!(r.queue_pos.is_some());

        s.claim_run(id, 4242, Some(1)).await.unwrap();
        let err = s.claim_run(id, 4343, Some(2)).await.unwrap_err().to_string();
        assert!(err.contains("already running") && err.contains("4242"), "{err}");

        let mut b = WriteBatch { started: Some((10, 1000, 100_000)), ..Default::default() };
        for step in 1..=4 {
            b.metrics.push(metric("loss", step, 3.0 - step as f64 * 0.1));
            b.metrics.push(metric("lr", step, 1e-3));
        }
        b.samples.push(SampleRecord { step: 4, prompt: "who?".into(), output: "Tessel".into() });
        b.checkpoint = Some((4, "/tmp/x/checkpoints/step-000004".into(), Some(2.5)));
        b.progress = Some((4, 400, 4.0));
        b.logs.push("hello".into());
        s.write_batch(id, &b).await.unwrap();

        let loss = s.series(id, "loss").await.unwrap();
        assert_eq!(loss.iter().map(|p| p.step).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
        assert_eq!(loss[3].tokens, 400);
        assert_eq!(s.metric_names(id).await.unwrap(), vec!["loss", "lr"]);
        let r = s.run(id).await.unwrap();
        assert_eq!((r.step, r.tokens_seen, r.total_steps, r.trainable_params), (4, 400, Some(10), Some(1000)));
        assert_eq!(s.checkpoints(id).await.unwrap()[0].val_loss, Some(2.5));

        // A step recorded twice is an error, and the failed batch leaves nothing behind.
        let dup = WriteBatch { metrics: vec![metric("lr", 5, 1.0), metric("loss", 4, 9.9)], ..Default::default() };
        assert!(s.write_batch(id, &dup).await.is_err());
        assert!(s.series(id, "lr").await.unwrap().iter().all(|p| p.step <= 4), "the batch was rolled back");

        // Resume point: forget what came after step 2.
        s.truncate_after(id, 2).await.unwrap();
        assert_eq!(s.series(id, "loss").await.unwrap().len(), 2);
        assert!(s.checkpoints(id).await.unwrap().is_empty());
        assert!(s.samples(id).await.unwrap().is_empty());

        // Only the worker holding the run can end it; a gone worker is marked interrupted.
        s.finish_run(id, 1, RunStatus::Completed, None, &serde_json::json!({}), None).await.unwrap();
        assert_eq!(s.run(id).await.unwrap().status, RunStatus::Running);
        assert!(s.mark_interrupted(id, 4242, "gone").await.unwrap());
        let r = s.run(id).await.unwrap();
        assert_eq!((r.status, r.error.as_deref(), r.worker_pid), (RunStatus::Interrupted, Some("gone"), None));

        s.delete_run(id).await.unwrap();
        let left: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM metrics").fetch_one(s.pool()).await.unwrap();
        assert_eq!(left, 0, "metrics are deleted with their run");
        assert!(matches!(s.run(id).await, Err(Error::NotFound { what: "run", .. })));
    });
}

#[test]
fn queue_order_cancel_and_resume() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let s = Store::open(&dir.path().join("t.db")).await.unwrap();
        let a = s.insert_run(&new_run("a")).await.unwrap();
        let b = s.insert_run(&new_run("b")).await.unwrap();
        let c = s.insert_run(&new_run("c")).await.unwrap();
        let order = |v: Vec<tunebench::store::RunRecord>| v.into_iter().map(|r| r.id).collect::<Vec<_>>();
        assert_eq!(order(s.runs_with_status(RunStatus::Queued).await.unwrap()), vec![a, b, c]);
        s.reorder_queue(&[c, a]).await.unwrap();
        assert_eq!(order(s.runs_with_status(RunStatus::Queued).await.unwrap()), vec![c, a, b]);
        s.cancel_queued(a).await.unwrap();
        assert_eq!(s.run(a).await.unwrap().status, RunStatus::Stopped);
        assert!(s.reorder_queue(&[a]).await.unwrap_err().to_string().contains("not queued"));
        s.enqueue(a).await.unwrap();
        assert_eq!(order(s.runs_with_status(RunStatus::Queued).await.unwrap()), vec![c, b, a]);
        // A completed run cannot be queued again.
        s.claim_run(b, 1, None).await.unwrap();
        s.finish_run(b, 1, RunStatus::Completed, None, &serde_json::json!({}), None).await.unwrap();
        assert!(s.enqueue(b).await.unwrap_err().to_string().contains("completed"));
    });
}

#[test]
fn a_corrupt_database_file_is_reported_and_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tunebench.db");
    let garbage: Vec<u8> = (0..8192u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    std::fs::write(&path, &garbage).unwrap();
    let err = rt().block_on(Store::open(&path)).err().expect("a corrupt file must not open").to_string();
    assert!(err.contains(&path.display().to_string()), "the message names the file: {err}");
    assert!(err.contains("untouched"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), garbage, "the file was not modified");

    // A real database whose pages were damaged: integrity problems are reported, not hidden.
    let path2 = dir.path().join("damaged.db");
    rt().block_on(async {
        let s = Store::open(&path2).await.unwrap();
        let id = s.insert_run(&new_run("x")).await.unwrap();
        let b = WriteBatch { metrics: (1..=3000).map(|i| metric("loss", i, 1.0)).collect(), ..Default::default() };
        s.write_batch(id, &b).await.unwrap();
        sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)").execute(s.pool()).await.unwrap();
        s.close().await;
    });
    let mut bytes = std::fs::read(&path2).unwrap();
    let page = 4096;
    let pages = bytes.len() / page;
    assert!(pages > 8, "{pages} pages");
    // A page of the metrics b-tree (the table written last, at the end of the file).
    let at = (pages - 2) * page;
    for b in &mut bytes[at + 8..at + 2000] {
        *b = 0xA5;
    }
    std::fs::write(&path2, &bytes).unwrap();
    let err = rt().block_on(Store::open(&path2)).err().expect("a damaged file must not open silently").to_string();
    assert!(err.contains("damaged.db"), "{err}");
    assert_eq!(std::fs::read(&path2).unwrap(), bytes, "the damaged file was not modified");
}

#[test]
fn unknown_ids_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let wb = tunebench::api::Workbench::open(tunebench::api::WorkbenchOptions::new(dir.path())).await.unwrap();
        for e in [
            wb.run_detail(999).await.unwrap_err(),
            wb.stop_run(999).await.unwrap_err(),
            wb.resume_run(999).await.unwrap_err(),
            wb.delete_run(999, true).await.unwrap_err(),
            wb.metrics(999, "loss").await.unwrap_err(),
        ] {
            assert_eq!(e.to_string(), "no run with id 999");
        }
        let e = wb.store().dataset(7).await.unwrap_err();
        assert_eq!(e.to_string(), "no dataset with id 7");
    });
}
