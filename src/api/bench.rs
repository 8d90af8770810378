//! `tunebench bench-store`: the run store's performance on a large run — recording a run with
//! N metric points, then querying and charting it (the Rust half of `bench/store_bench.py`,
//! which reads the same database with Python's sqlite3 as the reference).

use std::path::Path;
use std::time::Instant;

use serde::Serialize;

use super::{RunChartRequest, Workbench, WorkbenchOptions};
use crate::chart::{self, Theme, XAxis};
use crate::store::{MetricRow, NewRun, WriteBatch};
use crate::{Error, Result};

/// What `bench-store` prints.
#[derive(Debug, Serialize)]
pub struct StoreBench {
    /// Metric points of the `loss` series.
    pub points: usize,
    /// Rows written in all (loss + lr + grad_norm + tokens_per_s).
    pub rows: usize,
    /// Seconds to record them, in batches of `batch` steps per transaction.
    pub write_s: f64,
    /// Steps per batch (transaction).
    pub batch: usize,
    /// Mean seconds per batch (what a worker pays per flush).
    pub write_per_batch_s: f64,
    /// Seconds to read the `loss` series.
    pub query_s: f64,
    /// Seconds to read all four series of the run chart.
    pub query_all_s: f64,
    /// Seconds to build and render the run chart (query included) as SVG.
    pub chart_svg_s: f64,
    /// Seconds to build and render the run chart (query included) as PNG.
    pub chart_png_s: f64,
    /// The database file (for the reference reader).
    pub db: String,
    /// The run id in it.
    pub run_id: i64,
}

/// Records a run of `points` steps (4 metrics per step, `batch` steps per transaction) in a
/// fresh store under `home`, then times reading and charting it.
pub async fn store_bench(home: &Path, points: usize, batch: usize) -> Result<StoreBench> {
    let wb = Workbench::open(WorkbenchOptions::new(home)).await?;
    let store = wb.store();
    let id = store
        .insert_run(&NewRun {
            name: "bench".into(),
            method: "lora".into(),
            config: serde_json::json!({}),
            model_id: None,
            model_path: String::new(),
            dataset_path: String::new(),
            dataset_id: None,
            out_dir: String::new(),
            device: "cpu".into(),
        })
        .await?;
    let batch = batch.max(1);
    let t = Instant::now();
    let mut n_batches = 0usize;
    let mut step = 1usize;
    while step <= points {
        let mut b = WriteBatch::default();
        for s in step..(step + batch).min(points + 1) {
            let x = s as f64;
            let (tokens, wall) = (s as i64 * 512, x * 0.8);
            let loss = 2.0 + 1.5 * (-x / (points as f64 / 5.0)).exp() + 0.05 * (x * 0.37).sin();
            for (name, value) in [("loss", loss), ("lr", 1e-3 * (1.0 - x / points as f64)), ("grad_norm", 1.0 + 0.3 * (x * 0.11).cos()), ("tokens_per_s", 600.0 + 20.0 * (x * 0.05).sin())] {
                b.metrics.push(MetricRow { name: name.into(), step: s as i64, tokens, wall_s: wall, value });
            }
        }
        b.progress = Some(((step + batch - 1).min(points) as i64, 0, 0.0));
        store.write_batch(id, &b).await?;
        n_batches += 1;
        step += batch;
    }
    let write_s = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let loss = store.series(id, "loss").await?;
    let query_s = t.elapsed().as_secs_f64();
    if loss.len() != points {
        return Err(Error::Msg(format!("read {} points, wrote {points}", loss.len())));
    }
    let t = Instant::now();
    for name in ["loss", "val_loss", "lr", "grad_norm", "tokens_per_s"] {
        store.series(id, name).await?;
    }
    let query_all_s = t.elapsed().as_secs_f64();

    let req = RunChartRequest { run_id: id, x_axis: XAxis::Step, theme: Theme::Light, width: 960, height: 720 };
    let t = Instant::now();
    let svg = wb.run_chart_svg(&req).await?;
    let chart_svg_s = t.elapsed().as_secs_f64();
    if !svg.contains("series") {
        return Err(Error::Msg("the chart has no series".into()));
    }
    let t = Instant::now();
    let spec = wb.run_chart_spec(&req).await?;
    let png = chart::render_png(&spec).map_err(|e| Error::Msg(e.to_string()))?;
    let chart_png_s = t.elapsed().as_secs_f64();
    if png.len() < 100 {
        return Err(Error::Msg("empty PNG".into()));
    }
    Ok(StoreBench {
        points,
        rows: points * 4,
        write_s,
        batch,
        write_per_batch_s: write_s / n_batches.max(1) as f64,
        query_s,
        query_all_s,
        chart_svg_s,
        chart_png_s,
        db: store.path().display().to_string(),
        run_id: id,
    })
}

/// Records `n` completed runs of `points` steps each in the store under `home` — varied
/// learning rates, ranks and methods, loss curves, final metrics — as the app would show them
/// after many experiments (for the runs-table benchmark and the desktop smoke test; no model
/// is trained). Returns their ids.
pub async fn seed_runs(home: &Path, n: usize, points: usize) -> Result<Vec<i64>> {
    let wb = Workbench::open(WorkbenchOptions::new(home)).await?;
    let store = wb.store();
    let pid = std::process::id() as i64;
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let (lr, r) = ([1e-4, 3e-4, 1e-3, 3e-3][i % 4], [4usize, 8, 16, 32][(i / 4) % 4]);
        let method = ["lora", "qlora", "ia3", "bitfit"][(i / 16) % 4];
        let mut config = serde_json::to_value(crate::train::RunConfig::preset("quickstart")?).map_err(|e| Error::Msg(e.to_string()))?;
        config["name"] = format!("seed-{i}").into();
        config["train"]["lr"] = lr.into();
        config["peft"]["r"] = r.into();
        let id = store
            .insert_run(&NewRun {
                name: format!("seed-{i}"),
                method: method.into(),
                config,
                model_id: None,
                model_path: crate::paths::default_model().display().to_string(),
                dataset_path: String::new(),
                dataset_id: None,
                out_dir: String::new(),
                device: "cpu".into(),
            })
            .await?;
        store.claim_run(id, pid, None).await?;
        let mut b = WriteBatch { started: Some((points as i64, 460_800 * r as i64 / 8, 134_515_008)), ..Default::default() };
        let mut last = 0.0;
        for s in 1..=points {
            let x = s as f64 / points as f64;
            last = 1.0 + 2.5 * (-x * (1.0 + 1e3 * lr)).exp() + 0.05 * ((s * 7 + i) as f64).sin();
            b.metrics.push(MetricRow { name: "loss".into(), step: s as i64, tokens: s as i64 * 1024, wall_s: s as f64 * 0.9, value: last });
            b.metrics.push(MetricRow { name: "lr".into(), step: s as i64, tokens: s as i64 * 1024, wall_s: s as f64 * 0.9, value: lr * (1.0 - x) });
        }
        b.progress = Some((points as i64, points as i64 * 1024, points as f64 * 0.9));
        store.write_batch(id, &b).await?;
        let metrics = serde_json::json!({ "final_loss": last, "wall_s": points as f64 * 0.9 });
        store.finish_run(id, pid, crate::store::RunStatus::Completed, None, &metrics, Some(1 << 30)).await?;
        ids.push(id);
    }
    Ok(ids)
}
