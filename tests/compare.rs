//! Comparing recorded runs through the workbench API: the config diff lists exactly the keys
//! that differ, the metrics table holds final/best values, samples line up at shared steps, and
//! the charts (run chart and overlay) carry one line per series with the run names.

use tunebench::api::compare::{config_diff, CompareRequest};
use tunebench::api::{RunChartRequest, Workbench, WorkbenchOptions};
use tunebench::chart::{self, Theme, XAxis};
use tunebench::store::{MetricRow, NewRun, RunStatus, SampleRecord, WriteBatch};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

async fn recorded_run(wb: &Workbench, name: &str, lr: f64, r: u64, steps: i64, samples_at: &[i64]) -> i64 {
    let s = wb.store();
    let config = serde_json::json!({
        "name": name, "seed": 42,
        "peft": {"method": "lora", "r": r, "lora_alpha": 2 * r},
        "train": {"lr": lr, "batch_size": 4},
        "output": {"dir": format!("/tmp/{name}")},
    });
    let id = s
        .insert_run(&NewRun {
            name: name.into(),
            method: "lora".into(),
            config,
            model_id: None,
            model_path: "/m.gguf".into(),
            dataset_path: "/d.jsonl".into(),
            dataset_id: None,
            out_dir: format!("/tmp/{name}"),
            device: "cpu".into(),
        })
        .await
        .unwrap();
    s.claim_run(id, 1, None).await.unwrap();
    let mut b = WriteBatch { started: Some((steps, 1000 * r as i64, 100_000)), ..Default::default() };
    for step in 1..=steps {
        let x = step as f64;
        b.metrics.push(MetricRow { name: "loss".into(), step, tokens: step * 512, wall_s: x * 2.0, value: 3.0 / (1.0 + lr * 1000.0 * x) });
        b.metrics.push(MetricRow { name: "lr".into(), step, tokens: step * 512, wall_s: x * 2.0, value: lr });
        if step % 5 == 0 {
            b.metrics.push(MetricRow { name: "val_loss".into(), step, tokens: step * 512, wall_s: x * 2.0, value: 2.0 + (x - 10.0).abs() / 10.0 });
        }
    }
    for &st in samples_at {
        b.samples.push(SampleRecord { step: st, prompt: "Who are you?".into(), output: format!("{name} at {st}") });
    }
    b.progress = Some((steps, steps * 512, steps as f64 * 2.0));
    s.write_batch(id, &b).await.unwrap();
    s.finish_run(id, 1, RunStatus::Completed, None, &serde_json::json!({"heldout_after": 0.5}), Some(1 << 30)).await.unwrap();
    id
}

#[test]
fn compare_table_diff_and_samples() {
    let home = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let wb = Workbench::open(WorkbenchOptions::new(home.path())).await.unwrap();
        let a = recorded_run(&wb, "alpha", 1e-3, 8, 20, &[10, 20]).await;
        let b = recorded_run(&wb, "beta", 3e-4, 16, 15, &[5, 10]).await;
        let c = wb.compare(&CompareRequest::new(vec![a, b])).await.unwrap();

        let keys: Vec<&str> = c.config_diff.iter().map(|d| d.key.as_str()).collect();
        assert_eq!(keys, vec!["peft.lora_alpha", "peft.r", "train.lr"], "identity keys (name, output.dir) and equal keys are left out");
        assert_eq!(c.config_diff[2].values, vec![Some(serde_json::json!(1e-3)), Some(serde_json::json!(3e-4))]);

        let ra = &c.table[0];
        assert_eq!((ra.run_id, ra.name.as_str(), ra.steps), (a, "alpha", 20));
        assert_eq!(ra.best_val_loss, Some(2.0), "val loss is lowest at step 10");
        assert_eq!(ra.final_val_loss, Some(3.0));
        assert!((ra.best_perplexity.unwrap() - 2f64.exp()).abs() < 1e-12);
        assert!((ra.tokens_per_s.unwrap() - 256.0).abs() < 1e-9, "20·512 tokens in 40 s");
        assert_eq!((ra.trainable_params, ra.peak_rss_bytes, ra.heldout_after), (Some(8000), Some(1 << 30), Some(0.5)));
        assert!((ra.trainable_pct.unwrap() - 8.0).abs() < 1e-9);
        assert_eq!(ra.color, chart::stable_color(a).to_hex().to_lowercase());
        assert_eq!(c.table[1].final_val_loss, Some(2.5));

        // Only step 10 has samples in both runs.
        assert_eq!(c.samples.len(), 1);
        assert_eq!(c.samples[0].step, 10);
        assert_eq!(c.samples[0].outputs, vec![Some("alpha at 10".to_string()), Some("beta at 10".to_string())]);

        // Overlay chart: one line per run, named in the legend, in the run's colour.
        let mut req = CompareRequest::new(vec![a, b]);
        req.metric = "val_loss".into();
        req.x_axis = XAxis::Tokens;
        req.smoothing = 0.5;
        req.theme = Theme::Dark;
        let svg = wb.compare_chart_svg(&req).await.unwrap();
        let doc = roxmltree::Document::parse(&svg).unwrap();
        let lines: Vec<_> = doc.descendants().filter(|n| n.attribute("class") == Some("series")).collect();
        assert_eq!(lines.len(), 2);
        let (la, lb) = (format!("#{a} alpha"), format!("#{b} beta"));
        assert_eq!(lines.iter().map(|n| n.attribute("data-series").unwrap()).collect::<Vec<_>>(), vec![la.as_str(), lb.as_str()]);
        assert!(lines[0].attribute("stroke").unwrap().eq_ignore_ascii_case(&chart::stable_color(a).to_hex()));
        let texts: Vec<String> = doc.descendants().filter(|n| n.has_tag_name("text")).filter_map(|n| n.text()).map(|t| t.trim().to_string()).collect();
        for t in [la.as_str(), lb.as_str(), "tokens", "validation loss"] {
            assert!(texts.iter().any(|x| x == t), "`{t}` in {texts:?}");
        }

        // Export: PNG of the requested size; never over an existing file unless asked.
        let spec = wb.compare_chart_spec(&req).await.unwrap();
        let out = home.path().join("cmp.png");
        Workbench::export_chart(&spec, &out, false).unwrap();
        let png = std::fs::read(&out).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        assert_eq!(u32::from_be_bytes(png[16..20].try_into().unwrap()), req.width);
        assert_eq!(u32::from_be_bytes(png[20..24].try_into().unwrap()), req.height);
        let e = Workbench::export_chart(&spec, &out, false).unwrap_err().to_string();
        assert!(e.contains("cmp.png") && e.contains("exists"), "{e}");
        assert_eq!(std::fs::read(&out).unwrap(), png, "the existing file is untouched");
        let e = Workbench::export_chart(&spec, &home.path().join("cmp.jpg"), false).unwrap_err().to_string();
        assert!(e.contains("cmp.jpg") && e.contains(".svg or .png"), "{e}");

        // The run chart: loss panel with train and validation loss, and the lr panel.
        let svg = wb.run_chart_svg(&RunChartRequest { run_id: a, x_axis: XAxis::Step, theme: Theme::Light, width: 900, height: 700 }).await.unwrap();
        let doc = roxmltree::Document::parse(&svg).unwrap();
        let names: Vec<&str> = doc.descendants().filter(|n| n.attribute("class") == Some("series")).filter_map(|n| n.attribute("data-series")).collect();
        assert_eq!(names.len(), 3, "train loss, val loss, lr: {names:?}");

        // Unknown runs are named.
        let e = wb.compare(&CompareRequest::new(vec![a, 77])).await.unwrap_err().to_string();
        assert_eq!(e, "no run with id 77");
    });
}

#[test]
fn config_diff_counts_missing_keys_as_different() {
    let d = config_diff(&[
        serde_json::json!({"a": 1, "b": {"c": [1, 2]}, "name": "x"}),
        serde_json::json!({"a": 1, "b": {"c": [1, 3]}, "d": true, "name": "y"}),
    ]);
    let keys: Vec<&str> = d.iter().map(|x| x.key.as_str()).collect();
    assert_eq!(keys, vec!["b.c", "d"]);
    assert_eq!(d[1].values, vec![None, Some(serde_json::json!(true))]);
}
