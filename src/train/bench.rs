//! Training-throughput benchmark on fixed batches (the Rust half of
//! `bench/cpu_lora_bench.py`, which runs PyTorch + PEFT on the same weights and batches).

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use super::config::RunConfig;
use super::optim::{AdamW, AdamWParams};
use crate::model::{self, ForwardCtx};
use crate::peft::Adapter;
use crate::{Error, Result};

/// What `tunebench bench-train` prints.
#[derive(Debug, Serialize)]
pub struct BenchResult {
    /// Tokens (batch × seq) per second over the timed steps.
    pub tokens_per_s: f64,
    /// Peak resident memory of this process (VmHWM), bytes.
    pub peak_rss_bytes: u64,
    /// Loss of every step, warmup included.
    pub losses: Vec<f64>,
    /// Seconds per timed step.
    pub step_s: Vec<f64>,
}

/// This process's peak resident set size in bytes (Linux `VmHWM`; 0 elsewhere).
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<u64>().ok()))
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// Runs `warmup + steps` LoRA training steps (full causal-LM loss on every token, AdamW
/// without weight decay at a constant `lr`) cycling through the batches in `batches_file`.
#[allow(clippy::too_many_arguments)]
pub fn run(model_path: &Path, batches_file: &Path, rank: usize, alpha: f64, targets: &[&str], lr: f64, warmup: usize, steps: usize) -> Result<BenchResult> {
    let device = Device::Cpu;
    let mut m = model::load(model_path, &device)?;
    let t = candle_core::safetensors::load(batches_file, &device).map_err(|e| Error::bad_input(batches_file, None, e.to_string()))?;
    let ids = t
        .get("input_ids")
        .ok_or_else(|| Error::bad_input(batches_file, None, "no `input_ids` tensor"))?
        .to_dtype(DType::U32)?;
    let (n, b, s) = ids.dims3().map_err(|_| Error::bad_input(batches_file, None, "`input_ids` must be [n_batches, batch, seq]"))?;
    let adapter = Adapter::inject(&mut m.model, &RunConfig::lora(rank, alpha, targets), 0)?;
    let mut opt = AdamW::new(adapter.trainable(), AdamWParams { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 })?;
    let vars = adapter.trainable();
    let mut losses = Vec::new();
    let mut step_s = Vec::new();
    for i in 0..warmup + steps {
        let start = Instant::now();
        let batch = ids.get(i % n)?;
        let labels: Vec<i64> = batch.flatten_all()?.to_vec1::<u32>()?.into_iter().map(|x| x as i64).collect();
        let (sum, cnt) = m.model.loss_sum(&batch, &labels, &ForwardCtx { train: true, seed: i as u64, ..Default::default() }, 256)?;
        let loss = (sum / cnt as f64)?;
        losses.push(loss.to_scalar::<f32>()? as f64);
        let g = loss.backward()?;
        let grads: Vec<Tensor> = vars
            .iter()
            .map(|(_, v)| g.get(v.as_tensor()).cloned().map(Ok).unwrap_or_else(|| v.zeros_like()))
            .collect::<candle_core::Result<_>>()?;
        opt.step(&grads, lr)?;
        if i >= warmup {
            step_s.push(start.elapsed().as_secs_f64());
        }
    }
    let total: f64 = step_s.iter().sum();
    Ok(BenchResult { tokens_per_s: (steps * b * s) as f64 / total.max(1e-9), peak_rss_bytes: peak_rss_bytes(), losses, step_s })
}
