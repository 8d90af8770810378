//! Training-throughput benchmark on fixed batches (the Rust half of
//! `bench/cpu_lora_bench.py`, which runs PyTorch + PEFT on the same weights and batches).

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Tensor};
use serde::Serialize;

use super::config::RunConfig;
use super::optim::{AdamW, AdamWParams};
use crate::model::profile::{self, ProfileRow};
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
    /// Where it ran (`cpu`, `cuda:0`).
    pub device: String,
    /// Precision of the base and activations (`f32`, `bf16`, `f16`).
    pub dtype: String,
    /// Rows and tokens per row of the batches trained on.
    pub batch: usize,
    /// See `batch`.
    pub seq: usize,
    /// With `--profile`: where the time of the profiled steps (run after the timed ones) went,
    /// by region, largest first ([`crate::model::profile`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<Vec<ProfileRow>>,
    /// What `tunebench estimate` predicts for the same run's peak memory, bytes (set by the
    /// caller: the estimate lives above training), so a benchmark checks it against the peak
    /// it measures.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub estimated_peak_bytes: Option<u64>,
    /// On a GPU: the most memory this process's tensors held at once (the CUDA memory pool's
    /// high-water mark, [`crate::device::pool_peak_bytes`]), beside the device-wide figure a
    /// benchmark samples.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_peak_bytes: Option<u64>,
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

/// The model a benchmark trains: a real one from disk, or a named shape with seeded random
/// weights (the GPU benchmark's shapes, which PyTorch builds the same way from a config).
pub enum BenchModel<'a> {
    /// A GGUF file or HF folder.
    Path(&'a Path),
    /// A shape from [`SHAPES`], random-init.
    Shape(&'a str),
}

/// Benchmark shapes: (name, hidden, layers, heads, kv heads, intermediate, vocab); all with
/// tied embeddings, as in `bench/gpu_bench.py`.
pub const SHAPES: &[(&str, usize, usize, usize, usize, usize, usize)] = &[
    ("tiny", 64, 2, 4, 2, 128, 512),
    // head_dim 64: attention through the flash kernels on a GPU in f16/bf16.
    ("tiny-hd64", 256, 2, 4, 2, 512, 512),
    ("smollm2-135m", 576, 30, 9, 3, 1536, 49152),
    ("llama-1b", 2048, 16, 32, 8, 8192, 128256),
    ("qwen1.5b-like", 1536, 28, 12, 2, 8960, 151936),
];

/// The config of a named benchmark shape.
pub fn shape_config(name: &str) -> Result<crate::model::LlamaConfig> {
    let &(_, h, l, nh, nkv, ff, vocab) = SHAPES
        .iter()
        .find(|s| s.0 == name)
        .ok_or_else(|| Error::Msg(format!("unknown shape `{name}`; shapes: {}", SHAPES.iter().map(|s| s.0).collect::<Vec<_>>().join(", "))))?;
    let mut c = crate::model::LlamaConfig::tiny(vocab);
    (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size) = (h, l, nh, Some(nkv), ff);
    c.max_position_embeddings = 4096;
    Ok(c)
}

/// How a benchmark trains.
pub struct BenchOptions<'a> {
    /// LoRA rank.
    pub rank: usize,
    /// LoRA alpha.
    pub alpha: f64,
    /// LoRA dropout rate.
    pub dropout: f64,
    /// LoRA targets.
    pub targets: &'a [&'a str],
    /// Constant learning rate.
    pub lr: f64,
    /// Untimed steps first.
    pub warmup: usize,
    /// Timed steps.
    pub steps: usize,
    /// Where to train.
    pub device: &'a str,
    /// Gradient checkpointing per decoder layer.
    pub gradient_checkpointing: bool,
    /// Precision of the base and activations (adapters and AdamW stay f32).
    pub dtype: super::config::Precision,
    /// After the timed steps, profile this many more (0: none).
    pub profile_steps: usize,
    /// Any method's config instead of LoRA from `rank`, `alpha`, `dropout` and `targets`.
    pub peft: Option<crate::peft::PeftConfig>,
}

/// The method a benchmark trains: `o.peft`, or LoRA from the LoRA options.
pub fn peft_config(o: &BenchOptions) -> Result<crate::peft::PeftConfig> {
    let peft = match &o.peft {
        Some(p) => p.clone(),
        None => {
            let mut peft = RunConfig::lora(o.rank, o.alpha, o.targets);
            if let crate::peft::PeftConfig::Lora(l) = &mut peft {
                l.lora_dropout = o.dropout;
            }
            peft
        }
    };
    peft.validate()?;
    Ok(peft)
}

/// Runs `warmup + steps` training steps of LoRA or `o.peft` (full causal-LM loss on every token, AdamW
/// without weight decay at a constant `lr`) cycling through the batches: those in
/// `batches_file` (`input_ids` [n, batch, seq]), or `random` = (batch, seq) seeded random
/// tokens.
pub fn run(which: BenchModel, batches_file: Option<&Path>, random: (usize, usize), o: &BenchOptions) -> Result<BenchResult> {
    let device = crate::device::open(o.device, "--device")?;
    // In the base's dtype from the start (a 16-bit model is never held in f32 all at once).
    let base = o.dtype.base_dtype();
    let qlora = matches!(o.peft, Some(crate::peft::PeftConfig::Qlora(_)));
    // Running out of device memory ends the benchmark with the trainer's advice.
    let advise = |e: Error, (b, s): (usize, usize)| crate::device::with_out_of_memory_advice(e, &device, b, s, o.gradient_checkpointing, qlora);
    let random_shape = matches!(which, BenchModel::Shape(_));
    let mut model = match which {
        // As the trainer loads a QLoRA base (its 4-bit blocks kept, the rest cast).
        BenchModel::Path(p) if qlora => {
            let mut m = model::load_4bit(p, &device).map_err(|e| advise(e, random))?.model;
            m.cast(base).map_err(|e| advise(e, random))?;
            m
        }
        BenchModel::Path(p) => model::load_in(p, &device, base).map_err(|e| advise(e, random))?.model,
        BenchModel::Shape(name) => model::Llama::random_dtype(shape_config(name)?, 0, &device, base).map_err(|e| advise(e, random))?,
    };
    if qlora && random_shape {
        // A random shape's projections held as 4-bit blocks, as `model::load_4bit` holds them.
        model::hold_projections_as_blocks(&mut model, &device, model::qlora_blocks).map_err(|e| advise(e, random))?;
    }
    let ids = match batches_file {
        Some(f) => {
            let t = candle_core::safetensors::load(f, &device).map_err(|e| Error::bad_input(f, None, e.to_string()))?;
            t.get("input_ids").ok_or_else(|| Error::bad_input(f, None, "no `input_ids` tensor"))?.to_dtype(DType::U32)?
        }
        None => {
            use rand::{Rng, SeedableRng};
            let (b, s) = random;
            let vocab = model.config().vocab_size as u32;
            let mut rng = rand::rngs::StdRng::seed_from_u64(1);
            let v: Vec<u32> = (0..2 * b * s).map(|_| rng.random_range(0..vocab)).collect();
            Tensor::from_vec(v, (2, b, s), &device)?
        }
    };
    let source = batches_file.map(|f| f.display().to_string()).unwrap_or_else(|| "random batches".into());
    let (n, b, s) = ids.dims3().map_err(|_| Error::Msg(format!("{source}: `input_ids` must be [n_batches, batch, seq]")))?;
    if let Some(why) = crate::device::activation_too_large(&device, b, s, model.config()) {
        return Err(Error::Msg(why));
    }
    let peft = peft_config(o)?;
    let adapter = Adapter::inject(&mut model, &peft, 0)?;
    // As the trainer: full fine-tuning's frozen base becomes a view of the trained weights.
    adapter.share_base_with_trained(&mut model)?;
    let mut opt = AdamW::new(adapter.trainable(), AdamWParams { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 })?;
    let vars = adapter.trainable();
    let train = super::config::TrainSection { gradient_checkpointing: o.gradient_checkpointing, loss_chunk: 256, grad_accum: 1, dtype: o.dtype, ..Default::default() };
    // f16: dynamic loss scaling as in training (an overflowed step is timed, not applied).
    let mut scaler = super::optim::LossScaler::for_run(&train);
    let mut losses = Vec::new();
    let mut step_s = Vec::new();
    let mut step = |i: usize| -> Result<f64> {
        let batch = ids.get(i % n)?;
        let labels: Vec<i64> = batch.flatten_all()?.to_vec1::<u32>()?.into_iter().map(|x| x as i64).collect();
        let ctx = ForwardCtx { train: true, seed: i as u64, ..Default::default() };
        // Every position but each row's first predicts a label.
        let loss_scale = scaler.map_or(1.0, |s| s.scale);
        let (loss, grads) = super::trainer::micro_grads(&model, &adapter, &batch, &labels, &ctx, &train, labels.len() - b, &vars, loss_scale)?;
        let grads: Vec<Tensor> =
            grads.into_iter().zip(&vars).map(|(g, (_, v))| g.map(Ok).unwrap_or_else(|| v.zeros_like())).collect::<candle_core::Result<_>>()?;
        let apply = match scaler.as_mut() {
            Some(s) => s.update(super::optim::global_norm(&grads)?.is_finite())?,
            None => true,
        };
        if apply {
            profile::region("optimizer", &device, || opt.step(&grads, o.lr))?;
        }
        Ok(loss)
    };
    for i in 0..o.warmup + o.steps {
        let start = Instant::now();
        losses.push(step(i).map_err(|e| advise(e, (b, s)))?);
        device.synchronize().map_err(|e| advise(e.into(), (b, s)))?;
        if i >= o.warmup {
            step_s.push(start.elapsed().as_secs_f64());
        }
    }
    // Profiled steps after the timed ones (a profile synchronizes the device around every
    // region, which would slow the timed steps); their losses are not reported.
    let profile = if o.profile_steps > 0 {
        profile::start();
        for i in 0..o.profile_steps {
            profile::region("step (other)", &device, || step(o.warmup + o.steps + i))?;
        }
        Some(profile::finish(o.profile_steps))
    } else {
        None
    };
    let total: f64 = step_s.iter().sum();
    Ok(BenchResult {
        tokens_per_s: (o.steps * b * s) as f64 / total.max(1e-9),
        peak_rss_bytes: peak_rss_bytes(),
        losses,
        step_s,
        device: crate::device::describe(&device),
        dtype: o.dtype.name().into(),
        batch: b,
        seq: s,
        profile,
        estimated_peak_bytes: None,
        device_peak_bytes: crate::device::pool_peak_bytes(&device),
    })
}
