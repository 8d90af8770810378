//! Evaluating a run's checkpoint through the workbench: the scores go into the run's metrics
//! (`eval_loss`, `eval_perplexity`, `eval_bleu4`, `eval_rouge1`, `eval_rouge2`,
//! `eval_rougeL` at the checkpoint's step), the answers into its samples (source `eval`, with
//! references) and the whole report next to the run (`<run folder>/eval/step-<N>.json`).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{ApiEvent, Workbench};
use crate::eval::run::{evaluate, EvalOptions, EvalReport};
use crate::store::EvalSampleRecord;
use crate::train::{checkpoint, RunConfig};
use crate::{Error, Result};

/// Request: evaluate a run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EvaluateRun {
    /// The run.
    pub run_id: i64,
    /// The checkpoint's step; default: the final adapter of a completed run, else the newest
    /// checkpoint on disk.
    #[serde(default)]
    pub checkpoint: Option<i64>,
    /// What and how much to evaluate.
    #[serde(default)]
    pub options: EvalOptions,
    /// Where to evaluate (`auto`, `cpu`, `cuda`, `cuda:N`); default: the device the run trained
    /// on (its `train.device`).
    #[serde(default)]
    pub device: Option<String>,
}

/// Response: the evaluation and where it was written.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunEvaluation {
    /// The run.
    pub run_id: i64,
    /// The step evaluated.
    pub step: i64,
    /// The report.
    pub report: EvalReport,
    /// The JSON file next to the run.
    pub file: PathBuf,
}

impl Workbench {
    /// The adapter folder and step of a run's checkpoint (see [`EvaluateRun::checkpoint`]).
    pub async fn checkpoint_adapter(&self, run_id: i64, step: Option<i64>) -> Result<(i64, PathBuf)> {
        let run = self.store.run(run_id).await?;
        let ckpts = self.store.checkpoints(run_id).await?;
        let on_disk = |path: &str| PathBuf::from(path).join(checkpoint::ADAPTER_DIR).join("adapter_config.json").is_file();
        match step {
            Some(s) => {
                let c = ckpts.iter().find(|c| c.step == s).ok_or_else(|| {
                    let have: Vec<String> = ckpts.iter().filter(|c| !c.removed).map(|c| c.step.to_string()).collect();
                    Error::Msg(format!("run {run_id} has no checkpoint at step {s} (checkpoints: {})", have.join(", ")))
                })?;
                if c.removed || !on_disk(&c.path) {
                    return Err(Error::Msg(format!("run {run_id}: the checkpoint of step {s} was pruned from disk ({})", c.path)));
                }
                Ok((s, PathBuf::from(&c.path).join(checkpoint::ADAPTER_DIR)))
            }
            None => {
                let final_dir = PathBuf::from(&run.out_dir).join(checkpoint::ADAPTER_DIR);
                if run.status == crate::store::RunStatus::Completed && final_dir.join("adapter_config.json").is_file() {
                    return Ok((run.step, final_dir));
                }
                ckpts
                    .iter()
                    .rev()
                    .find(|c| !c.removed && on_disk(&c.path))
                    .map(|c| (c.step, PathBuf::from(&c.path).join(checkpoint::ADAPTER_DIR)))
                    .ok_or_else(|| Error::Msg(format!("run {run_id} has no adapter on disk yet (status {})", run.status.as_str())))
            }
        }
    }

    /// Evaluates a run's checkpoint and records the result (see the module docs). Progress is
    /// reported as [`ApiEvent::EvalProgress`].
    pub async fn evaluate_run(&self, req: EvaluateRun) -> Result<RunEvaluation> {
        let run = self.store.run(req.run_id).await?;
        let cfg: RunConfig = serde_json::from_value(run.config.clone())
            .map_err(|e| Error::Msg(format!("run {}: stored config is unreadable: {e}", run.id)))?;
        let (step, adapter) = self.checkpoint_adapter(req.run_id, req.checkpoint).await?;
        let events = self.events.clone();
        let run_id = run.id;
        let opts = req.options.clone();
        let spec = req.device.clone().unwrap_or_else(|| cfg.train.device.clone());
        let report = tokio::task::spawn_blocking(move || -> Result<EvalReport> {
            let device = crate::device::open(&spec, "device")?;
            let mut m = crate::train::trainer::load_base(&cfg, &device, candle_core::DType::F32)?;
            evaluate(&cfg, &mut m, Some(&adapter), &opts, |done, total| {
                let _ = events.send(ApiEvent::EvalProgress { run_id, done, total });
            })
            .map_err(|e| match crate::device::is_out_of_memory(&e) {
                true => Error::Msg(format!("{e}. Evaluating on {} ran out of memory: evaluate on the cpu, or when a training run holds this GPU, after it ends", crate::device::describe(&device))),
                false => e,
            })
        })
        .await
        .map_err(|e| Error::Msg(format!("evaluation thread failed: {e}")))??;
        let samples: Vec<EvalSampleRecord> = report
            .answers
            .iter()
            .map(|a| EvalSampleRecord { step, prompt: a.prompt.clone(), reference: a.reference.clone(), output: a.output.clone() })
            .collect();
        self.store.record_eval(run_id, step, &report.metric_rows(), &samples).await?;
        let dir = PathBuf::from(&run.out_dir).join("eval");
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let file = dir.join(format!("step-{step}.json"));
        let text = serde_json::to_string_pretty(&report).map_err(|e| Error::Msg(e.to_string()))?;
        checkpoint::atomic_write(&file, |p| std::fs::write(p, &text).map_err(|e| Error::io(p, e)))?;
        Ok(RunEvaluation { run_id, step, report, file })
    }
}
