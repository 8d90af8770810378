//! Comparing runs: the config keys that differ, a metrics table, sample generations at the
//! steps the runs share, and an overlay chart of one metric.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::Workbench;
use crate::chart::{self, ChartSpec, Theme, XAxis};
use crate::store::{MetricPoint, RunStatus};
use crate::{Error, Result};

/// Config keys left out of the diff: they name a run rather than configure it.
pub const IDENTITY_KEYS: &[&str] = &["name", "output.dir"];

/// Request: compare runs.
#[derive(Clone, Debug, Serialize, Deserialize, ts_rs::TS)]
pub struct CompareRequest {
    /// Runs, in display order (at least one).
    pub run_ids: Vec<i64>,
    /// Metric to overlay (`loss`, `val_loss`, `lr`, `grad_norm`, `tokens_per_s`).
    #[serde(default = "default_metric")]
    pub metric: String,
    /// X axis.
    #[serde(default)]
    pub x_axis: XAxis,
    /// EMA smoothing weight in [0, 1).
    #[serde(default)]
    pub smoothing: f64,
    /// Logarithmic y axis.
    #[serde(default)]
    pub log_y: bool,
    /// Theme.
    #[serde(default)]
    pub theme: Theme,
    /// Chart size in pixels.
    #[serde(default = "super::default_width")]
    pub width: u32,
    /// Chart size in pixels.
    #[serde(default = "default_height")]
    pub height: u32,
}

fn default_metric() -> String {
    "loss".into()
}
fn default_height() -> u32 {
    540
}

impl CompareRequest {
    /// Defaults for `run_ids`.
    pub fn new(run_ids: Vec<i64>) -> Self {
        CompareRequest {
            run_ids,
            metric: default_metric(),
            x_axis: XAxis::default(),
            smoothing: 0.0,
            log_y: false,
            theme: Theme::default(),
            width: super::default_width(),
            height: default_height(),
        }
    }
}

/// One config key whose values differ.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ts_rs::TS)]
pub struct ConfigDiff {
    /// Dotted key (`train.lr`, `peft.r`, ...).
    pub key: String,
    /// Its value in each run (None: the run's config lacks the key).
    pub values: Vec<Option<serde_json::Value>>,
}

/// One row of the metrics table.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ts_rs::TS)]
pub struct MetricsRow {
    /// Run id.
    pub run_id: i64,
    /// Run name.
    pub name: String,
    /// Status.
    pub status: RunStatus,
    /// Chart colour of the run (`#rrggbb`).
    pub color: String,
    /// Steps done.
    pub steps: i64,
    /// Last training loss.
    pub final_loss: Option<f64>,
    /// Last validation loss.
    pub final_val_loss: Option<f64>,
    /// Best validation loss.
    pub best_val_loss: Option<f64>,
    /// exp(best validation loss).
    pub best_perplexity: Option<f64>,
    /// Mean training throughput (tokens / training wall time).
    pub tokens_per_s: Option<f64>,
    /// Training wall time (s).
    pub wall_s: f64,
    /// Peak memory of the worker.
    pub peak_rss_bytes: Option<i64>,
    /// Trainable parameters.
    pub trainable_params: Option<i64>,
    /// Trainable share of all parameters (%).
    pub trainable_pct: Option<f64>,
    /// Held-out accuracy after training (0..1), when measured.
    pub heldout_after: Option<f64>,
}

/// The answers of every run to one prompt at one step.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ts_rs::TS)]
pub struct SampleGroup {
    /// The step (the same in every run).
    pub step: i64,
    /// The prompt.
    pub prompt: String,
    /// Each run's answer (None where a run has none).
    pub outputs: Vec<Option<String>>,
}

/// Response: a comparison of runs.
#[derive(Clone, Debug, Serialize, Deserialize, ts_rs::TS)]
pub struct Comparison {
    /// The metrics table, one row per run in request order.
    pub table: Vec<MetricsRow>,
    /// Config keys that differ (identity keys excluded).
    pub config_diff: Vec<ConfigDiff>,
    /// Samples at the steps every run has samples for.
    pub samples: Vec<SampleGroup>,
}

/// A series as (x, value) for an x axis.
pub fn xy(points: &[MetricPoint], x_axis: XAxis) -> Vec<(f64, f64)> {
    points
        .iter()
        .map(|p| {
            let x = match x_axis {
                XAxis::Step => p.step as f64,
                XAxis::Tokens => p.tokens as f64,
                XAxis::WallTime => p.wall_s,
            };
            (x, p.value)
        })
        .collect()
}

/// Flattens a JSON object into dotted keys (arrays and scalars are leaves).
pub fn flatten(v: &serde_json::Value) -> BTreeMap<String, serde_json::Value> {
    fn go(prefix: &str, v: &serde_json::Value, out: &mut BTreeMap<String, serde_json::Value>) {
        match v {
            serde_json::Value::Object(o) => {
                for (k, v) in o {
                    let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                    go(&key, v, out);
                }
            }
            other => {
                out.insert(prefix.to_string(), other.clone());
            }
        }
    }
    let mut out = BTreeMap::new();
    go("", v, &mut out);
    out
}

/// The keys whose values differ between configs (a key missing from some config differs).
pub fn config_diff(configs: &[serde_json::Value]) -> Vec<ConfigDiff> {
    let flat: Vec<BTreeMap<String, serde_json::Value>> = configs.iter().map(flatten).collect();
    let keys: BTreeSet<&String> = flat.iter().flat_map(|m| m.keys()).collect();
    keys.into_iter()
        .filter(|k| !IDENTITY_KEYS.contains(&k.as_str()))
        .filter_map(|k| {
            let values: Vec<Option<serde_json::Value>> = flat.iter().map(|m| m.get(k).cloned()).collect();
            let first = &values[0];
            values.iter().any(|v| v != first).then(|| ConfigDiff { key: k.clone(), values })
        })
        .collect()
}

fn hex(c: chart::Rgb) -> String {
    format!("#{:02x}{:02x}{:02x}", c.0, c.1, c.2)
}

fn get_f64(m: &serde_json::Value, k: &str) -> Option<f64> {
    m.get(k).and_then(|v| v.as_f64())
}

impl Workbench {
    /// Compares runs: metrics table, config diff and samples at shared steps.
    pub async fn compare(&self, req: &CompareRequest) -> Result<Comparison> {
        if req.run_ids.is_empty() {
            return Err(Error::Msg("compare needs at least one run".into()));
        }
        let mut runs = Vec::new();
        for id in &req.run_ids {
            runs.push(self.store.run(*id).await?);
        }
        let mut table = Vec::new();
        let mut samples_by_run = Vec::new();
        for r in &runs {
            let loss = self.store.series(r.id, "loss").await?;
            let val = self.store.series(r.id, "val_loss").await?;
            let best = val.iter().map(|p| p.value).min_by(|a, b| a.total_cmp(b));
            let trainable_pct = match (r.trainable_params, r.total_params) {
                (Some(t), Some(a)) if a > 0 => Some(100.0 * t as f64 / a as f64),
                _ => None,
            };
            table.push(MetricsRow {
                run_id: r.id,
                name: r.name.clone(),
                status: r.status,
                color: hex(chart::stable_color(r.id)),
                steps: r.step,
                final_loss: loss.last().map(|p| p.value),
                final_val_loss: val.last().map(|p| p.value),
                best_val_loss: best,
                best_perplexity: best.map(f64::exp),
                tokens_per_s: (r.elapsed_s > 0.0).then(|| r.tokens_seen as f64 / r.elapsed_s),
                wall_s: r.elapsed_s,
                peak_rss_bytes: r.peak_rss_bytes,
                trainable_params: r.trainable_params,
                trainable_pct,
                heldout_after: get_f64(&r.final_metrics, "heldout_after"),
            });
            samples_by_run.push(self.store.samples(r.id).await?);
        }
        let configs: Vec<serde_json::Value> = runs.iter().map(|r| r.config.clone()).collect();

        // Steps at which every run has samples, and for each the prompts in first-seen order.
        let step_sets: Vec<BTreeSet<i64>> = samples_by_run.iter().map(|s| s.iter().map(|x| x.step).collect()).collect();
        let common: BTreeSet<i64> = step_sets.into_iter().reduce(|acc, s| acc.intersection(&s).copied().collect()).unwrap_or_default();
        let mut samples = Vec::new();
        for step in common {
            let mut prompts: Vec<&str> = Vec::new();
            for s in samples_by_run.iter().flatten().filter(|s| s.step == step) {
                if !prompts.contains(&s.prompt.as_str()) {
                    prompts.push(&s.prompt);
                }
            }
            for p in prompts {
                let outputs = samples_by_run
                    .iter()
                    .map(|run| run.iter().find(|s| s.step == step && s.prompt == p).map(|s| s.output.clone()))
                    .collect();
                samples.push(SampleGroup { step, prompt: p.to_string(), outputs });
            }
        }
        Ok(Comparison { table, config_diff: config_diff(&configs), samples })
    }

    /// The overlay chart of one metric over the runs.
    pub async fn compare_chart_spec(&self, req: &CompareRequest) -> Result<ChartSpec> {
        if req.run_ids.is_empty() {
            return Err(Error::Msg("compare needs at least one run".into()));
        }
        let mut series = Vec::new();
        for id in &req.run_ids {
            let r = self.store.run(*id).await?;
            let points = self.store.series(r.id, &req.metric).await?;
            // Legend "#id name": runs often share a name.
            series.push((r.id, format!("#{} {}", r.id, r.name), xy(&points, req.x_axis)));
        }
        Ok(chart::compare_chart(&metric_label(&req.metric), series, req.x_axis, req.smoothing, req.log_y, req.theme, req.width, req.height))
    }

    /// The overlay chart as SVG.
    pub async fn compare_chart_svg(&self, req: &CompareRequest) -> Result<String> {
        let spec = self.compare_chart_spec(req).await?;
        chart::render_svg(&spec).map_err(|e| Error::Msg(e.to_string()))
    }
}

/// A metric's axis label.
pub fn metric_label(name: &str) -> String {
    match name {
        "loss" => "train loss".into(),
        "val_loss" => "validation loss".into(),
        "lr" => "learning rate".into(),
        "grad_norm" => "grad norm".into(),
        "tokens_per_s" => "tokens/s".into(),
        other => other.to_string(),
    }
}
