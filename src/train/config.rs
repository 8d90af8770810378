//! The run configuration (`run.toml`) and the built-in presets.
//!
//! Every key is documented in the README. Unknown keys are errors (a typo must not silently
//! fall back to a default); values are validated with the key named in the message.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::optim::Schedule;
use crate::data::Format;
use crate::peft::{LoraConfig, PeftConfig, TargetModules};
use crate::{Error, Result};

/// A whole training run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ts_rs::TS)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Run name (also names the output folder).
    #[serde(default = "default_name")]
    pub name: String,
    /// Seed for initialisation, shuffling, the validation split and dropout.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// The base model.
    #[serde(default)]
    pub model: ModelSection,
    /// The dataset.
    pub data: DataSection,
    /// The PEFT method.
    #[serde(default)]
    pub peft: PeftConfig,
    /// Optimisation.
    #[serde(default)]
    pub train: TrainSection,
    /// Held-out generation check.
    #[serde(default)]
    pub eval: EvalSection,
    /// Where results go.
    #[serde(default)]
    pub output: OutputSection,
}

fn default_name() -> String {
    "run".into()
}
fn default_seed() -> u64 {
    42
}

/// `[model]`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default, ts_rs::TS)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// A `.gguf` file or HF folder; empty = the default model in the app data dir.
    #[serde(default)]
    pub path: Option<PathBuf>,
}

/// `[data]`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ts_rs::TS)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// Dataset file (relative paths are taken from the config file's folder, then the
    /// current folder).
    pub path: PathBuf,
    /// auto | alpaca | sharegpt | messages | text.
    #[serde(default)]
    pub format: Format,
    /// Longest example in tokens; longer ones are truncated.
    #[serde(default = "default_max_len")]
    pub max_len: usize,
    /// Train on prompt tokens too (default: only on assistant turns).
    #[serde(default)]
    pub train_on_prompt: bool,
    /// Share of examples held out for validation.
    #[serde(default = "default_val_fraction")]
    pub val_fraction: f64,
    /// Cap on validation examples.
    #[serde(default = "default_val_max")]
    pub val_max: usize,
    /// Use at most this many records.
    #[serde(default)]
    pub max_examples: Option<usize>,
}

fn default_max_len() -> usize {
    512
}
fn default_val_fraction() -> f64 {
    0.05
}
fn default_val_max() -> usize {
    200
}

/// `[train]`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ts_rs::TS)]
#[serde(default, deny_unknown_fields)]
pub struct TrainSection {
    /// Passes over the training set (ignored when `max_steps` > 0).
    pub epochs: f64,
    /// Stop after this many optimizer steps (0 = use `epochs`).
    pub max_steps: usize,
    /// Examples per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// cosine | linear | constant.
    pub schedule: Schedule,
    /// Warmup steps (overrides `warmup_ratio` when > 0).
    pub warmup_steps: usize,
    /// Warmup as a share of all steps.
    pub warmup_ratio: f64,
    /// Final learning rate as a share of the peak.
    pub min_lr_ratio: f64,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// AdamW β₁.
    pub adam_beta1: f64,
    /// AdamW β₂.
    pub adam_beta2: f64,
    /// AdamW ε.
    pub adam_eps: f64,
    /// Clip gradients to this global L2 norm (0 = off).
    pub max_grad_norm: f64,
    /// Validate every N steps (0 = only at the end).
    pub eval_steps: usize,
    /// Checkpoint every N steps (0 = only at the end).
    pub save_steps: usize,
    /// Keep the newest N checkpoints.
    pub keep_checkpoints: usize,
    /// Rows of the LM head computed at once in the loss (bounds logits memory).
    pub loss_chunk: usize,
    /// Where to train: auto (the first CUDA GPU in a CUDA build, else the CPU), cpu, cuda,
    /// cuda:N.
    pub device: String,
    /// Keep only each decoder layer's input in the forward and recompute the layer in the
    /// backward: activation memory of one layer instead of all, for a second forward.
    pub gradient_checkpointing: bool,
    /// Precision of the frozen base and the activations: f32, bf16 or f16 (mixed precision:
    /// the trainable tensors, their gradients and the optimizer state stay f32).
    pub dtype: Precision,
    /// f16 only: the initial dynamic loss scale (halved when the gradients overflow, doubled
    /// after 2000 finite steps).
    pub loss_scale: f64,
}

/// `train.dtype`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default, ts_rs::TS)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in f32.
    #[default]
    F32,
    /// Base weights and activations in bfloat16; trainable tensors and AdamW state in f32.
    Bf16,
    /// Base weights and activations in float16 with dynamic loss scaling
    /// (`train.loss_scale`); trainable tensors and AdamW state in f32.
    F16,
}

impl Precision {
    /// The dtype the base model is held in.
    pub fn base_dtype(self) -> candle_core::DType {
        match self {
            Precision::F32 => candle_core::DType::F32,
            Precision::Bf16 => candle_core::DType::BF16,
            Precision::F16 => candle_core::DType::F16,
        }
    }

    /// The config value (`f32`, `bf16`, `f16`).
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::F16 => "f16",
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            "f16" => Ok(Precision::F16),
            other => Err(format!("`{other}` is not a training precision: use f32, bf16 or f16")),
        }
    }
}


/// The defaults of every `[train]` key (missing keys take these; see the README table).
impl Default for TrainSection {
    fn default() -> Self {
        TrainSection {
            epochs: 3.0,
            max_steps: 0,
            batch_size: 4,
            grad_accum: 1,
            lr: 2e-4,
            schedule: Schedule::Cosine,
            warmup_steps: 0,
            warmup_ratio: 0.0,
            min_lr_ratio: 0.0,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_eps: 1e-8,
            max_grad_norm: 1.0,
            eval_steps: 0,
            save_steps: 0,
            keep_checkpoints: 2,
            loss_chunk: 256,
            device: "auto".into(),
            gradient_checkpointing: false,
            dtype: Precision::F32,
            loss_scale: 65536.0,
        }
    }
}

/// `[eval]`: a held-out generation check run before and after training.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ts_rs::TS)]
#[serde(default, deny_unknown_fields)]
pub struct EvalSection {
    /// JSONL of `{"prompt", "expect": [..]}`; an answer is correct when it contains any
    /// `expect` string (case-insensitive).
    pub prompts: Option<PathBuf>,
    /// Longest generated answer.
    pub max_new_tokens: usize,
    /// Also score the base model before training.
    pub before: bool,
    /// At each validation, answer the first N prompts and record the answers as samples.
    pub samples: usize,
}

impl Default for EvalSection {
    fn default() -> Self {
        EvalSection { prompts: None, max_new_tokens: 48, before: true, samples: 2 }
    }
}

/// `[output]`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default, ts_rs::TS)]
#[serde(deny_unknown_fields)]
pub struct OutputSection {
    /// Run folder; default `<app data>/runs/<name>`.
    #[serde(default)]
    pub dir: Option<PathBuf>,
}

fn check_peft_keys(text: &str, peft: &PeftConfig) -> Result<()> {
    let Ok(table) = toml::from_str::<toml::Table>(text) else { return Ok(()) };
    let Some(toml::Value::Table(given)) = table.get("peft") else { return Ok(()) };
    let known = match serde_json::to_value(peft) {
        Ok(serde_json::Value::Object(o)) => o,
        _ => return Ok(()),
    };
    for key in given.keys() {
        if !known.contains_key(key) {
            let mut names: Vec<&str> = known.keys().map(String::as_str).filter(|k| *k != "method").collect();
            names.sort();
            return Err(Error::config(
                format!("peft.{key}"),
                format!("unknown key for method `{}`; its keys are: {}", peft.method_name(), names.join(", ")),
            ));
        }
    }
    Ok(())
}

/// The bundled presets: (name, description, description in Simplified Chinese, TOML).
pub const PRESETS: &[(&str, &str, &str, &str)] = &[(
    "quickstart",
    "LoRA r16 on all linear layers of the default model, teaching it the Tessel persona from the bundled sample (a few minutes on a laptop CPU)",
    "在默认模型的所有线性层上做 r16 的 LoRA，用自带示例教会它 Tessel 这个身份（笔记本 CPU 上几分钟）",
    include_str!("../../assets/presets/quickstart.toml"),
)];

impl RunConfig {
    /// Parses TOML; `origin` names the file in errors and anchors relative paths.
    pub fn from_toml(text: &str, origin: Option<&Path>) -> Result<Self> {
        let mut cfg: RunConfig = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| text.as_bytes()[..s.start.min(text.len())].iter().filter(|&&b| b == b'\n').count() + 1);
            let what = e.message().to_string();
            match origin {
                Some(p) => Error::bad_input(p, line, format!("config: {what}")),
                None => Error::Config { path: None, key: format!("line {}", line.unwrap_or(0)), reason: what },
            }
        })?;
        if let Some(dir) = origin.and_then(|p| p.parent()) {
            cfg.resolve_paths(dir);
        }
        // `[peft]` keys are checked here: each method's config also reads PEFT's
        // adapter_config.json, which has keys of its own, so it cannot deny unknown fields.
        let checked = check_peft_keys(text, &cfg.peft);
        checked.and_then(|_| cfg.validate()).map_err(|e| match (e, origin) {
            (Error::Config { key, reason, .. }, Some(p)) => Error::Config { path: Some(p.to_path_buf()), key, reason },
            (e, _) => e,
        })?;
        Ok(cfg)
    }

    /// Reads a config file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_toml(&text, Some(path))
    }

    /// A bundled preset by name.
    pub fn preset(name: &str) -> Result<Self> {
        let (_, _, _, text) = PRESETS.iter().find(|(n, _, _, _)| *n == name).ok_or_else(|| {
            Error::config("preset", format!("unknown preset `{name}`; presets: {}", PRESETS.iter().map(|p| p.0).collect::<Vec<_>>().join(", ")))
        })?;
        let mut cfg = Self::from_toml(text, None)?;
        cfg.resolve_paths(&crate::paths::assets_dir().join("presets"));
        Ok(cfg)
    }

    /// Makes relative dataset/eval paths absolute against `base` when the file exists
    /// there (config-relative), else leaves them relative to the current folder.
    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() && base.join(&*p).exists() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.data.path);
        if let Some(p) = self.eval.prompts.as_mut() {
            fix(p);
        }
    }

    /// Checks every value; errors name the key.
    pub fn validate(&self) -> Result<()> {
        let t = &self.train;
        let bad = |k: &str, r: &str| Err(Error::config(k, r));
        if t.batch_size == 0 {
            return bad("train.batch_size", "must be at least 1");
        }
        if t.grad_accum == 0 {
            return bad("train.grad_accum", "must be at least 1");
        }
        if !(t.lr.is_finite() && t.lr > 0.0) {
            return bad("train.lr", "must be a positive number");
        }
        if t.max_steps == 0 && !(t.epochs.is_finite() && t.epochs > 0.0) {
            return bad("train.epochs", "must be > 0 (or set train.max_steps)");
        }
        if !(0.0..1.0).contains(&t.warmup_ratio) {
            return bad("train.warmup_ratio", "must be in [0, 1)");
        }
        if !(0.0..=1.0).contains(&t.min_lr_ratio) {
            return bad("train.min_lr_ratio", "must be in [0, 1]");
        }
        if !(0.0..1.0).contains(&t.adam_beta1) || !(0.0..1.0).contains(&t.adam_beta2) {
            return bad("train.adam_beta1/adam_beta2", "must be in [0, 1)");
        }
        if t.weight_decay < 0.0 || t.max_grad_norm < 0.0 {
            return bad("train.weight_decay/max_grad_norm", "must not be negative");
        }
        if t.loss_chunk == 0 {
            return bad("train.loss_chunk", "must be at least 1");
        }
        crate::device::DeviceChoice::parse(&t.device, "train.device")?;
        if t.dtype != Precision::F32 && matches!(self.peft, PeftConfig::Full(_)) {
            return bad("train.dtype", "full fine-tuning trains every weight in f32; use train.dtype = \"f32\" (or a LoRA-family method for bf16/f16)");
        }
        if !(t.loss_scale.is_finite() && t.loss_scale >= 1.0) {
            return bad("train.loss_scale", "must be a finite number ≥ 1 (the initial f16 loss scale; 65536 by default)");
        }
        if self.data.max_len < 2 {
            return bad("data.max_len", "must be at least 2");
        }
        if !(0.0..1.0).contains(&self.data.val_fraction) {
            return bad("data.val_fraction", "must be in [0, 1)");
        }
        if self.name.is_empty() || self.name.contains(['/', '\\']) {
            return bad("name", "must be non-empty and contain no path separators");
        }
        self.peft.validate()
    }

    /// The model path, defaulting to the installed default model.
    pub fn model_path(&self) -> PathBuf {
        self.model.path.clone().unwrap_or_else(crate::paths::default_model)
    }

    /// The run folder.
    pub fn output_dir(&self) -> PathBuf {
        self.output.dir.clone().unwrap_or_else(|| crate::paths::runs_dir().join(&self.name))
    }

    /// Convenience: a LoRA config with the given targets (used by benches and tests).
    pub fn lora(r: usize, alpha: f64, targets: &[&str]) -> PeftConfig {
        let target_modules = if targets == ["all-linear"] {
            TargetModules::Keyword("all-linear".into())
        } else {
            TargetModules::Names(targets.iter().map(|s| s.to_string()).collect())
        };
        PeftConfig::Lora(LoraConfig { r, lora_alpha: alpha, target_modules, ..Default::default() })
    }
}
