//! Parameter-efficient fine-tuning methods.
//!
//! Mirrors HF peft's tuners: a method is a config (serde, validated, PEFT's JSON keys), an
//! `inject` step that installs trainable tensors into the model's [`Linear`] slots, save/load
//! in PEFT's adapter format (`adapter_config.json` + `adapter_model.safetensors`, PEFT key
//! names), and `merge` where the math allows. [`registry`] lists the methods for the UI/CLI.

pub mod adalora;
pub mod bitfit;
pub mod bottleneck;
pub mod full;
pub mod ia3;
pub mod lora;
pub mod prompt;

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::model::{Linear, LinearAdapter, Llama};
use crate::{Error, Result};
pub use adalora::{AdaLoraConfig, AdaLoraLayer};
pub use bitfit::{BitfitConfig, BitfitLayer};
pub use bottleneck::{BottleneckConfig, BottleneckLayer};
pub use full::{FullConfig, FullLayer, FullWeights};
pub use ia3::{Ia3Config, Ia3Layer};
pub use lora::{LoraConfig, LoraLayer};
pub use prompt::{PTuningV2Config, PrefixTuningConfig, PromptEncoderConfig, PromptModule, PromptTuningConfig};

/// A method's layer installed in a [`Linear`] slot: what it saves beside its trainable tensors
/// ([`LinearAdapter::params`]), and how it folds into the frozen weights.
pub trait PeftLayer: LinearAdapter {
    /// What is saved (default: the trainable tensors as they are).
    fn saved(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(self.params().into_iter().map(|(k, v)| (k, v.as_tensor().clone())).collect())
    }
    /// The frozen weight and bias with this layer folded in, or None when the method cannot
    /// be merged.
    fn merged(&self, weight: &Tensor, bias: Option<&Tensor>) -> Result<Option<(Tensor, Option<Tensor>)>>;
}

/// The dtype a method's trainable tensors take beside frozen weights of `frozen`: f32 under a
/// bf16/f16 base (mixed precision: adapters and optimizer state stay f32), else the base's
/// own (f32, or f64 in gradient checks).
pub fn param_dtype(frozen: candle_core::DType) -> candle_core::DType {
    match frozen {
        candle_core::DType::BF16 | candle_core::DType::F16 => candle_core::DType::F32,
        d => d,
    }
}

/// The tensor of a trainable `Var` for a forward pass: tracked while training; detached
/// otherwise, so inference (generation with a KV cache) builds no autograd graph that would
/// keep every step's intermediates alive.
pub fn var_tensor(v: &Var, ctx: &crate::model::ForwardCtx) -> Tensor {
    // Mixed precision: cast for this pass (the cast is differentiable, so the gradient
    // reaches the f32 tensor in f32).
    if let Some(d) = ctx.compute_dtype.filter(|d| *d != v.dtype()) {
        let t = if ctx.train { v.as_tensor().clone() } else { v.as_tensor().detach() };
        return t.to_dtype(d).unwrap_or(t);
    }
    if ctx.train {
        v.as_tensor().clone()
    } else {
        v.as_detached_tensor()
    }
}

/// `n` draws from N(0, std²) (Box–Muller), as f32.
pub fn normal_samples(rng: &mut impl rand::Rng, n: usize, std: f64) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let u1 = rng.random::<f64>().max(1e-300);
            let u2 = rng.random::<f64>();
            (std * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
        })
        .collect()
}

/// PEFT's module key for a linear: `base_model.model.<HF module path>`.
pub fn peft_prefix(lin: &Linear) -> String {
    format!("base_model.model.{}", lin.name())
}

/// One entry of the method registry.
#[derive(Clone, Debug, Serialize, ts_rs::TS)]
pub struct MethodInfo {
    /// Name used in configs and the CLI (`lora`).
    pub name: &'static str,
    /// HF peft's `peft_type`.
    pub peft_type: &'static str,
    /// One line for the UI (English).
    pub description: &'static str,
    /// The same in Simplified Chinese.
    pub description_zh: &'static str,
    /// The method's config keys, for forms (see [`crate::schema`]).
    #[serde(skip)]
    pub fields: fn() -> Vec<crate::schema::Field>,
}

/// Every method this build supports.
pub fn registry() -> &'static [MethodInfo] {
    &[
        MethodInfo {
            name: "lora",
            peft_type: "LORA",
            description: "Low-rank update B·A added to frozen projections (Hu et al. 2021); rsLoRA scaling and DoRA (use_dora: learned per-output magnitude, Liu et al. 2024) optional.",
            description_zh: "对冻结的投影加上低秩更新 B·A（Hu 等，2021）；可选 rsLoRA 缩放和 DoRA（use_dora：为每个输出学习幅度，Liu 等，2024）。",
            fields: lora::LoraConfig::fields,
        },
        MethodInfo {
            name: "qlora",
            peft_type: "LORA",
            description: "LoRA over a base whose linear weights are held as 4-bit blocks (Dettmers et al. 2023), dequantized per product and again in the backward: GGUF 4-bit blocks are kept as they are, other weights become Q4_K (rows a multiple of 256) or Q4_1. Same keys and file format as lora.",
            description_zh: "在线性权重以 4 位块保存的基础模型上做 LoRA（Dettmers 等，2023），每次乘法及反向时反量化：GGUF 的 4 位块原样保留，其他权重转为 Q4_K（行长为 256 的倍数）或 Q4_1。键与文件格式同 lora。",
            fields: lora::LoraConfig::fields,
        },
        MethodInfo {
            name: "adalora",
            peft_type: "ADALORA",
            description: "AdaLoRA: LoRA in SVD form (P·Λ·Q) whose rank budget shrinks from init_r to target_r per layer on average while training, kept where the importance scores are highest (Zhang et al. 2023); orthogonality penalty on P and Q. PEFT's format.",
            description_zh: "AdaLoRA：SVD 形式（P·Λ·Q）的 LoRA，训练中秩预算从 init_r 平均收缩到每层 target_r，按重要性得分保留（Zhang 等，2023）；对 P、Q 加正交惩罚。PEFT 格式。",
            fields: adalora::AdaLoraConfig::fields,
        },
        MethodInfo {
            name: "ia3",
            peft_type: "IA3",
            description: "Learned scaling of attention outputs (k, v) and feed-forward inputs (down) (Liu et al. 2022); a few thousand parameters.",
            description_zh: "学习缩放注意力输出（k、v）和前馈输入（down）的向量（Liu 等，2022）；只有几千个参数。",
            fields: ia3::Ia3Config::fields,
        },
        MethodInfo {
            name: "bitfit",
            peft_type: "BITFIT",
            description: "Train only the bias terms (Ben Zaken et al. 2021); Llama-family models get zero-initialised biases to train. Own file format.",
            description_zh: "只训练偏置项（Ben Zaken 等，2021）；Llama 系模型会加上初始化为零的偏置来训练。自有文件格式。",
            fields: bitfit::BitfitConfig::fields,
        },
        MethodInfo {
            name: "adapter",
            peft_type: "BOTTLENECK",
            description: "Adapter tuning: a small bottleneck (down-projection, activation, up-projection, skip) after the attention and feed-forward blocks of every layer (Houlsby et al. 2019), or only after the feed-forward block (Pfeiffer et al. 2021). Not mergeable. Own file format.",
            description_zh: "适配器微调：在每层注意力和前馈之后各加一个小瓶颈模块（降维、激活、升维、跳连；Houlsby 等，2019），或只在前馈之后（Pfeiffer 等，2021）。不可合并。自有文件格式。",
            fields: bottleneck::BottleneckConfig::fields,
        },
        MethodInfo {
            name: "prompt_tuning",
            peft_type: "PROMPT_TUNING",
            description: "Prompt tuning: a trained soft prompt of virtual input embeddings before every sequence (Lester et al. 2021), started from random vocabulary tokens, a text or N(0, 1). Tiny; wants a high learning rate (1e-2 to 3e-2). Not mergeable.",
            description_zh: "提示微调：在每个序列前加一段训练出来的软提示（虚拟输入嵌入；Lester 等，2021），可从随机词表 token、一段文本或 N(0, 1) 开始。参数极少；需要较高学习率（1e-2 到 3e-2）。不可合并。",
            fields: prompt::PromptTuningConfig::fields,
        },
        MethodInfo {
            name: "p_tuning",
            peft_type: "P_TUNING",
            description: "P-tuning: virtual input tokens produced by a trained prompt encoder, an MLP or a bidirectional LSTM (Liu et al. 2021); saved as the encoder's output. Not mergeable.",
            description_zh: "P-tuning：由训练出来的提示编码器（MLP 或双向 LSTM）生成虚拟输入 token（Liu 等，2021）；保存编码器的输出。不可合并。",
            fields: prompt::PromptEncoderConfig::fields,
        },
        MethodInfo {
            name: "prefix_tuning",
            peft_type: "PREFIX_TUNING",
            description: "Prefix tuning: trained keys and values in front of every attention layer, produced by a reparameterisation MLP during training (Li & Liang 2021); saved as the prefixes. Not mergeable.",
            description_zh: "前缀微调：在每个注意力层前加训练出来的键和值，训练时由重参数化 MLP 生成（Li 和 Liang，2021）；保存前缀本身。不可合并。",
            fields: prompt::PrefixTuningConfig::fields,
        },
        MethodInfo {
            name: "p_tuning_v2",
            peft_type: "PREFIX_TUNING",
            description: "P-tuning v2: deep prompts, trained keys and values in front of every attention layer, learned directly without an MLP (Liu et al. 2022). PEFT's prefix-tuning format. Not mergeable.",
            description_zh: "P-tuning v2：深层提示，在每个注意力层前直接学习键和值，不用 MLP（Liu 等，2022）。PEFT 的前缀微调格式。不可合并。",
            fields: prompt::PTuningV2Config::fields,
        },
        MethodInfo {
            name: "full",
            peft_type: "FULL",
            description: "Full fine-tuning: every weight trains (projections, norms, embeddings; optional), the baseline PEFT methods are measured against. Needs about 16 bytes per parameter for weights, gradients and AdamW state before activations. Mergeable; own file format.",
            description_zh: "全量微调：所有权重都参与训练（投影、归一化、嵌入；后两者可选），是衡量 PEFT 方法的基线。权重、梯度和 AdamW 状态每个参数约需 16 字节（不含激活）。可合并；自有文件格式。",
            fields: full::FullConfig::fields,
        },
    ]
}

/// A method and its settings, as written in a run config (`[peft] method = "lora"`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ts_rs::TS)]
#[serde(tag = "method", rename_all = "lowercase", deny_unknown_fields)]
pub enum PeftConfig {
    /// LoRA.
    Lora(LoraConfig),
    /// LoRA over a base held in 4-bit blocks (saved as a LoRA adapter).
    Qlora(LoraConfig),
    /// AdaLoRA (SVD-form LoRA with importance-based rank allocation).
    #[serde(rename = "adalora")]
    AdaLora(AdaLoraConfig),
    /// IA3.
    Ia3(Ia3Config),
    /// BitFit.
    Bitfit(BitfitConfig),
    /// Bottleneck adapters (Houlsby / Pfeiffer).
    Adapter(BottleneckConfig),
    /// Prompt tuning (soft prompt).
    #[serde(rename = "prompt_tuning")]
    PromptTuning(PromptTuningConfig),
    /// P-tuning (prompt encoder).
    #[serde(rename = "p_tuning")]
    PTuning(PromptEncoderConfig),
    /// Prefix tuning (reparameterised per-layer keys and values).
    #[serde(rename = "prefix_tuning")]
    PrefixTuning(PrefixTuningConfig),
    /// P-tuning v2 (per-layer keys and values, trained directly).
    #[serde(rename = "p_tuning_v2")]
    PTuningV2(PTuningV2Config),
    /// Full fine-tuning (every weight).
    Full(FullConfig),
}

impl Default for PeftConfig {
    fn default() -> Self {
        PeftConfig::Lora(LoraConfig::default())
    }
}

impl PeftConfig {
    /// The default config of a registered method (`lora`, `ia3`, `bitfit`), or None.
    pub fn default_for(method: &str) -> Option<PeftConfig> {
        Some(match method {
            "lora" => PeftConfig::Lora(LoraConfig::default()),
            "qlora" => PeftConfig::Qlora(LoraConfig::default()),
            "adalora" => PeftConfig::AdaLora(AdaLoraConfig::default()),
            "ia3" => PeftConfig::Ia3(Ia3Config::default()),
            "bitfit" => PeftConfig::Bitfit(BitfitConfig::default()),
            "adapter" => PeftConfig::Adapter(BottleneckConfig::default()),
            "prompt_tuning" => PeftConfig::PromptTuning(PromptTuningConfig::default()),
            "p_tuning" => PeftConfig::PTuning(PromptEncoderConfig::default()),
            "prefix_tuning" => PeftConfig::PrefixTuning(PrefixTuningConfig::default()),
            "p_tuning_v2" => PeftConfig::PTuningV2(PTuningV2Config::default()),
            "full" => PeftConfig::Full(FullConfig::default()),
            _ => return None,
        })
    }

    /// Checks the values; errors name the key.
    pub fn validate(&self) -> Result<()> {
        match self {
            PeftConfig::Lora(c) | PeftConfig::Qlora(c) => c.validate(),
            PeftConfig::AdaLora(c) => c.validate(),
            PeftConfig::Ia3(c) => c.validate(),
            PeftConfig::Bitfit(c) => c.validate(),
            PeftConfig::Adapter(c) => c.validate(),
            PeftConfig::PromptTuning(c) => c.validate(),
            PeftConfig::PTuning(c) => c.validate(),
            PeftConfig::PrefixTuning(c) => c.validate(),
            PeftConfig::PTuningV2(c) => c.validate(),
            PeftConfig::Full(c) => c.validate(),
        }
    }

    /// Whether the adapter can be folded into the base weights (`merge_into`, merged exports).
    pub fn can_merge(&self) -> bool {
        !matches!(self, PeftConfig::Adapter(_)) && self.prompt_method().is_none()
    }

    /// The prompt-learning method this config describes, if it is one.
    pub fn prompt_method(&self) -> Option<prompt::Method<'_>> {
        Some(match self {
            PeftConfig::PromptTuning(c) => prompt::Method::PromptTuning(c),
            PeftConfig::PTuning(c) => prompt::Method::PTuning(c),
            PeftConfig::PrefixTuning(c) => prompt::Method::PrefixTuning(c),
            PeftConfig::PTuningV2(c) => prompt::Method::PTuningV2(c),
            _ => return None,
        })
    }

    /// Positions a prompt-learning method puts in front of every sequence (0 for others).
    pub fn num_virtual_tokens(&self) -> usize {
        self.prompt_method().map_or(0, |m| m.num_virtual_tokens())
    }

    /// This config as a run of `steps` optimizer steps uses it: AdaLoRA's schedule gets the
    /// run's length when its `total_step` is unset.
    pub fn for_steps(&self, steps: usize) -> PeftConfig {
        match self {
            PeftConfig::AdaLora(c) => PeftConfig::AdaLora(c.for_steps(steps)),
            other => other.clone(),
        }
    }

    /// The method's registry name (`lora`, ...).
    pub fn method_name(&self) -> &'static str {
        match self {
            PeftConfig::Lora(_) => "lora",
            PeftConfig::Qlora(_) => "qlora",
            PeftConfig::AdaLora(_) => "adalora",
            PeftConfig::Ia3(_) => "ia3",
            PeftConfig::Bitfit(_) => "bitfit",
            PeftConfig::Adapter(_) => "adapter",
            PeftConfig::PromptTuning(_) => "prompt_tuning",
            PeftConfig::PTuning(_) => "p_tuning",
            PeftConfig::PrefixTuning(_) => "prefix_tuning",
            PeftConfig::PTuningV2(_) => "p_tuning_v2",
            PeftConfig::Full(_) => "full",
        }
    }
}

/// Which linear layers a method wraps: module names matched as in peft (a module matches
/// when its path equals the name or ends with `.name`), or `"all-linear"`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ts_rs::TS)]
#[serde(untagged)]
pub enum TargetModules {
    /// `"all-linear"`: every linear layer except the LM head.
    Keyword(String),
    /// Explicit module names.
    Names(Vec<String>),
}

impl TargetModules {
    /// Checks the keyword; names are checked against the model in [`TargetModules::resolve`].
    pub fn validate(&self) -> Result<()> {
        match self {
            TargetModules::Keyword(k) if k == "all-linear" => Ok(()),
            TargetModules::Keyword(k) => Err(Error::config(
                "peft.target_modules",
                format!("`{k}` is neither \"all-linear\" nor a list of module names (e.g. [\"q_proj\", \"v_proj\"])"),
            )),
            TargetModules::Names(n) if n.is_empty() => Err(Error::config("peft.target_modules", "the list is empty")),
            TargetModules::Names(_) => Ok(()),
        }
    }

    /// The full module paths selected in `model`; an unknown name is an error listing the
    /// names the model has.
    pub fn resolve(&self, model: &Llama) -> Result<BTreeSet<String>> {
        let names: Vec<&str> = model.linears().into_iter().map(|l| l.name()).collect();
        self.resolve_names(&names)
    }

    /// [`resolve`](Self::resolve) over a list of full linear module names (`lm_head` is never
    /// selected by `all-linear`).
    pub fn resolve_names(&self, all: &[&str]) -> Result<BTreeSet<String>> {
        self.validate()?;
        let short = |n: &str| n.rsplit('.').next().unwrap_or(n).to_string();
        match self {
            TargetModules::Keyword(_) => Ok(all.iter().filter(|l| **l != "lm_head").map(|l| l.to_string()).collect()),
            TargetModules::Names(names) => {
                let mut out = BTreeSet::new();
                for n in names {
                    let hits: Vec<&&str> = all.iter().filter(|l| **l == n || l.ends_with(&format!(".{n}"))).collect();
                    if hits.is_empty() {
                        let known: BTreeSet<String> = all.iter().map(|l| short(l)).collect();
                        return Err(Error::config(
                            "peft.target_modules",
                            format!("unknown target module `{n}`; this model has: {}", known.into_iter().collect::<Vec<_>>().join(", ")),
                        ));
                    }
                    out.extend(hits.into_iter().map(|l| l.to_string()));
                }
                Ok(out)
            }
        }
    }
}

/// Inverted dropout with a reproducible mask drawn from `seed` (so a resumed run draws the
/// same masks as an uninterrupted one): [`crate::model::fused::dropout_mask`]'s. For f32, bf16
/// and f16 activations the fused op draws it (the kernel on a GPU, its twin on the CPU) and
/// draws it again in the backward, so no mask is kept (measured on the CPU at 8×256 with every
/// projection adapted: 8.4 GB, against 14.3 with the mask kept; bench/RESULTS.md); f64 (the
/// finite-difference tests) multiplies by the mask.
pub fn dropout(xs: &Tensor, p: f64, seed: u64) -> Result<Tensor> {
    Ok(crate::model::fused::dropout(xs, p, seed)?)
}

/// The adapter installed in a model: its config and trainable layers.
#[derive(Debug)]
pub struct Adapter {
    /// The method and settings.
    pub config: PeftConfig,
    /// (PEFT key prefix, layer) for every wrapped module.
    pub layers: Vec<(String, Arc<dyn PeftLayer>)>,
    /// The virtual tokens of a prompt-learning method (which wraps no module).
    pub prompt: Option<Arc<PromptModule>>,
    /// Full fine-tuning's trained embedding and norms.
    pub full: Option<Arc<FullWeights>>,
    /// AdaLoRA's rank allocator (fresh adapters; a loaded one is already allocated).
    pub adalora: Option<Arc<adalora::Allocator>>,
}

const CONFIG_FILE: &str = "adapter_config.json";
const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// Beside a prompt-learning adapter in checkpoints (and from `lora-init`): every trainable
/// tensor under its name (`prompt_encoder.mlp_head.0.weight`, ...), the prompt encoder
/// included, for resuming; the adapter file holds only the encoder's output.
pub const TRAINABLE_FILE: &str = "trainable_state.safetensors";

impl Adapter {
    /// Installs a fresh adapter into `model`.
    pub fn inject(model: &mut Llama, config: &PeftConfig, seed: u64) -> Result<Self> {
        Self::inject_with(model, config, seed, None)
    }

    /// [`inject`](Self::inject), with the model's tokenizer for initialisations that need it
    /// (prompt tuning from a text).
    pub fn inject_with(model: &mut Llama, config: &PeftConfig, seed: u64, tokenizer: Option<&tokenizers::Tokenizer>) -> Result<Self> {
        config.validate()?;
        if let Some(method) = config.prompt_method() {
            remove_all(model);
            let module = Arc::new(PromptModule::new(model, &method, seed, tokenizer)?);
            model.set_prompt(Some(module.clone() as Arc<dyn crate::model::PromptSource>));
            return Ok(Adapter { config: config.clone(), layers: Vec::new(), prompt: Some(module), full: None, adalora: None });
        }
        if let PeftConfig::Full(c) = config {
            remove_all(model);
            let (layers, full) = full::inject(model, c, None)?;
            return Ok(Adapter { config: config.clone(), layers, prompt: None, full: Some(full), adalora: None });
        }
        let mut adalora = None;
        let layers = match config {
            PeftConfig::Lora(c) | PeftConfig::Qlora(c) => lora::inject(model, c, seed)?.into_iter().map(|(p, l)| (p, l as Arc<dyn PeftLayer>)).collect(),
            PeftConfig::AdaLora(c) => {
                let layers = adalora::inject(model, c, seed)?;
                adalora = Some(Arc::new(adalora::Allocator::new(c, &layers)));
                layers.into_iter().map(|(p, l)| (p, l as Arc<dyn PeftLayer>)).collect()
            }
            PeftConfig::Ia3(c) => ia3::inject(model, c, seed, None)?,
            PeftConfig::Bitfit(c) => bitfit::inject(model, c, None)?,
            PeftConfig::Adapter(c) => bottleneck::inject(model, c, seed, None)?,
            PeftConfig::PromptTuning(_) | PeftConfig::PTuning(_) | PeftConfig::PrefixTuning(_) | PeftConfig::PTuningV2(_) | PeftConfig::Full(_) => {
                unreachable!("prompt-learning methods and full fine-tuning are handled above")
            }
        };
        Ok(Adapter { config: config.clone(), layers, prompt: None, full: None, adalora })
    }

    /// For a process that trains this adapter and needs the untuned base no more (the
    /// trainer, after its held-out check before training): full fine-tuning's frozen weights
    /// become views of the trained ones ([`full::share_frozen_with_trained`]), so the base is
    /// not held twice. Other methods train beside their frozen base: nothing changes.
    pub fn share_base_with_trained(&self, model: &mut Llama) -> Result<()> {
        match &self.full {
            Some(f) => full::share_frozen_with_trained(model, &self.layers, f),
            None => Ok(()),
        }
    }

    /// The trainable tensors under their PEFT keys (`….lora_A.weight`), in a fixed order.
    pub fn trainable(&self) -> Vec<(String, Var)> {
        let mut v = Vec::with_capacity(self.layers.len() * 2);
        for (p, l) in &self.layers {
            for (k, var) in l.params() {
                v.push((format!("{p}.{k}"), var));
            }
        }
        if let Some(p) = &self.prompt {
            v.extend(p.params());
        }
        if let Some(f) = &self.full {
            v.extend(f.params());
        }
        v
    }

    /// The LoRA layers (empty for other methods).
    pub fn lora_layers(&self) -> Vec<(&str, &LoraLayer)> {
        self.layers.iter().filter_map(|(p, l)| l.as_any().downcast_ref::<LoraLayer>().map(|x| (p.as_str(), x))).collect()
    }

    /// Number of trainable parameters.
    pub fn num_params(&self) -> usize {
        self.trainable().iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// PEFT's `adapter_config.json` for this adapter.
    pub fn peft_config_json(&self, base_model: &str) -> serde_json::Value {
        match &self.config {
            PeftConfig::Lora(c) | PeftConfig::Qlora(c) => serde_json::json!({
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "base_model_name_or_path": base_model,
                "r": c.r,
                "lora_alpha": c.lora_alpha,
                "lora_dropout": c.lora_dropout,
                "target_modules": c.target_modules,
                "use_rslora": c.use_rslora,
                "rank_pattern": c.rank_pattern,
                "alpha_pattern": c.alpha_pattern,
                "bias": "none",
                "fan_in_fan_out": false,
                "inference_mode": true,
                "init_lora_weights": true,
                "modules_to_save": null,
                "use_dora": c.use_dora,
                "revision": null,
            }),
            PeftConfig::AdaLora(c) => {
                // The allocator's current pattern (a loaded adapter keeps the one it came with);
                // PEFT insists on a positive total_step even when only loading.
                let rank_pattern = self.adalora.as_ref().and_then(|a| a.rank_pattern()).or_else(|| c.rank_pattern.clone());
                serde_json::json!({
                    "peft_type": "ADALORA",
                    "task_type": "CAUSAL_LM",
                    "base_model_name_or_path": base_model,
                    "r": 8,
                    "init_r": c.init_r,
                    "target_r": c.target_r,
                    "tinit": c.tinit,
                    "tfinal": c.tfinal,
                    "deltaT": c.delta_t,
                    "beta1": c.beta1,
                    "beta2": c.beta2,
                    "orth_reg_weight": c.orth_reg_weight,
                    "total_step": c.total_step.unwrap_or(c.tinit + c.tfinal + 1),
                    "rank_pattern": rank_pattern,
                    "lora_alpha": c.lora_alpha,
                    "lora_dropout": c.lora_dropout,
                    "target_modules": c.target_modules,
                    "bias": "none",
                    "fan_in_fan_out": false,
                    "inference_mode": true,
                    "init_lora_weights": true,
                    "modules_to_save": null,
                    "use_dora": false,
                    "use_rslora": false,
                    "revision": null,
                })
            }
            PeftConfig::Ia3(c) => serde_json::json!({
                "peft_type": "IA3",
                "task_type": "CAUSAL_LM",
                "base_model_name_or_path": base_model,
                "target_modules": c.target_modules,
                "feedforward_modules": c.feedforward_modules,
                "fan_in_fan_out": false,
                "inference_mode": true,
                "init_ia3_weights": c.init_ia3_weights,
                "modules_to_save": null,
                "revision": null,
            }),
            PeftConfig::Bitfit(c) => serde_json::json!({
                "peft_type": "BITFIT",
                "format_version": 1,
                "base_model_name_or_path": base_model,
                "target_modules": c.target_modules,
            }),
            PeftConfig::Adapter(c) => serde_json::json!({
                "peft_type": "BOTTLENECK",
                "format_version": 1,
                "base_model_name_or_path": base_model,
                "placement": c.placement,
                "bottleneck_size": c.bottleneck_size,
                "non_linearity": c.non_linearity,
                "init_adapter_weights": c.init_adapter_weights,
                "target_modules": c.modules(),
            }),
            PeftConfig::Full(c) => serde_json::json!({
                "peft_type": "FULL",
                "format_version": 1,
                "base_model_name_or_path": base_model,
                "train_embeddings": c.train_embeddings,
                "train_norms": c.train_norms,
            }),
            PeftConfig::PromptTuning(_) | PeftConfig::PTuning(_) | PeftConfig::PrefixTuning(_) | PeftConfig::PTuningV2(_) => {
                self.prompt_config_json(base_model)
            }
        }
    }

    /// PEFT's config for a prompt-learning method: the method's keys plus the architecture
    /// keys PEFT fills in from the model (`token_dim`, `num_layers`, `num_attention_heads` —
    /// the key/value heads for prefixes, as PEFT does for grouped-query attention).
    fn prompt_config_json(&self, base_model: &str) -> serde_json::Value {
        let (token_dim, layers, heads) = self.prompt.as_ref().map_or((0, 0, 0), |p| p.peft_dims());
        let mut v = serde_json::json!({
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "num_virtual_tokens": self.config.num_virtual_tokens(),
            "token_dim": token_dim,
            "num_transformer_submodules": 1,
            "num_attention_heads": heads,
            "num_layers": layers,
            "inference_mode": true,
            "modules_to_save": null,
            "revision": null,
        });
        let extra = match &self.config {
            PeftConfig::PromptTuning(c) => serde_json::json!({
                "peft_type": "PROMPT_TUNING",
                "prompt_tuning_init": c.prompt_tuning_init,
                "prompt_tuning_init_text": c.prompt_tuning_init_text,
                // PEFT insists on a tokenizer for TEXT init (it only uses it when training).
                "tokenizer_name_or_path": base_model,
            }),
            PeftConfig::PTuning(c) => serde_json::json!({
                "peft_type": "P_TUNING",
                "encoder_reparameterization_type": c.encoder_reparameterization_type,
                "encoder_hidden_size": c.encoder_hidden_size,
                "encoder_num_layers": c.encoder_num_layers,
                "encoder_dropout": c.encoder_dropout,
            }),
            PeftConfig::PrefixTuning(c) => serde_json::json!({
                "peft_type": "PREFIX_TUNING",
                "prefix_projection": true,
                "encoder_hidden_size": c.encoder_hidden_size,
            }),
            _ => serde_json::json!({ "peft_type": "PREFIX_TUNING", "prefix_projection": false }),
        };
        if let (Some(o), serde_json::Value::Object(e)) = (v.as_object_mut(), extra) {
            o.extend(e);
        }
        v
    }

    /// Saves in PEFT's format into `dir` (created if needed). Each file is written to a
    /// temporary name, fsynced and renamed, so a crash never leaves a half-written adapter.
    pub fn save(&self, dir: &Path, base_model: &str) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let mut map = HashMap::new();
        for (p, l) in &self.layers {
            for (k, t) in l.saved()? {
                map.insert(format!("{p}.{k}"), t);
            }
        }
        if let Some(p) = &self.prompt {
            map.insert("prompt_embeddings".to_string(), p.saved()?);
        }
        if let Some(f) = &self.full {
            map.extend(f.params().into_iter().map(|(k, v)| (k, v.as_tensor().clone())));
        }
        let weights = dir.join(WEIGHTS_FILE);
        crate::train::checkpoint::atomic_write(&weights, |tmp| Ok(candle_core::safetensors::save(&map, tmp)?))?;
        let cfg = serde_json::to_string_pretty(&self.peft_config_json(base_model)).map_err(|e| Error::Msg(e.to_string()))?;
        let cfg_path = dir.join(CONFIG_FILE);
        crate::train::checkpoint::atomic_write(&cfg_path, |tmp| std::fs::write(tmp, cfg.as_bytes()).map_err(|e| Error::io(tmp, e)))?;
        Ok(())
    }

    /// Whether checkpoints need [`TRAINABLE_FILE`] to resume: the adapter file does not hold
    /// the trainable tensors as they are (a prompt encoder's output; AdaLoRA's kept ranks and
    /// its allocator's estimates).
    pub fn needs_trainable_file(&self) -> bool {
        self.prompt.is_some() || self.adalora.is_some()
    }

    /// The training objective's extra term for this adapter (AdaLoRA's orthogonality
    /// penalty), if any.
    pub fn regularizer(&self, ctx: &crate::model::ForwardCtx) -> Result<Option<Tensor>> {
        match &self.adalora {
            Some(a) => a.regularizer(ctx),
            None => Ok(None),
        }
    }

    /// Called after optimizer step `step` (0-based) with the step's gradients, in
    /// [`trainable`](Self::trainable) order: AdaLoRA reallocates its ranks.
    pub fn after_step(&self, step: usize, grads: &[Tensor]) -> Result<()> {
        if let Some(a) = &self.adalora {
            let by_key: HashMap<String, Tensor> = self.trainable().into_iter().map(|(k, _)| k).zip(grads.iter().cloned()).collect();
            a.after_step(step, &by_key)?;
        }
        Ok(())
    }

    /// Restores training state beyond the trainable tensors from a [`TRAINABLE_FILE`]'s
    /// contents (AdaLoRA's allocator).
    pub fn restore_state(&self, saved: &HashMap<String, Tensor>) -> Result<()> {
        match &self.adalora {
            Some(a) => a.restore(saved),
            None => Ok(()),
        }
    }

    /// Writes every trainable tensor to `dir`/[`TRAINABLE_FILE`] (atomically), with any
    /// training state of the method (AdaLoRA's allocator).
    pub fn save_trainable(&self, dir: &Path) -> Result<()> {
        let mut all: HashMap<String, Tensor> = self.trainable().into_iter().map(|(k, v)| (k, v.as_tensor().clone())).collect();
        if let Some(a) = &self.adalora {
            all.extend(a.state()?);
        }
        let path = dir.join(TRAINABLE_FILE);
        crate::train::checkpoint::atomic_write(&path, |tmp| Ok(candle_core::safetensors::save(&all, tmp)?))
    }

    /// Loads an adapter folder (PEFT's LORA, IA3, PROMPT_TUNING, P_TUNING or PREFIX_TUNING, or
    /// our BITFIT, BOTTLENECK or FULL) into `model`, replacing any installed adapter.
    pub fn load(model: &mut Llama, dir: &Path) -> Result<Self> {
        let cfg_path = dir.join(CONFIG_FILE);
        if !cfg_path.exists() {
            return Err(Error::bad_input(dir, None, format!("adapter folder has no {CONFIG_FILE}")));
        }
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::bad_input(&cfg_path, Some(e.line()), e.to_string()))?;
        let peft_type = v.get("peft_type").and_then(|t| t.as_str()).unwrap_or("LORA").to_string();
        for (key, unsupported) in [("fan_in_fan_out", true)] {
            if v.get(key).and_then(|x| x.as_bool()) == Some(unsupported) {
                return Err(Error::bad_input(&cfg_path, None, format!("`{key}: true` is not supported yet")));
            }
        }
        if v.get("modules_to_save").is_some_and(|m| !m.is_null()) {
            return Err(Error::bad_input(&cfg_path, None, "`modules_to_save` is not supported yet"));
        }
        fn parse_in<T: serde::de::DeserializeOwned>(v: serde_json::Value, path: &Path) -> Result<T> {
            serde_json::from_value(v).map_err(|e| Error::bad_input(path, None, e.to_string()))
        }
        let config = match peft_type.as_str() {
            "LORA" => PeftConfig::Lora(parse_in(v, &cfg_path)?),
            "IA3" => PeftConfig::Ia3(parse_in(v, &cfg_path)?),
            "ADALORA" => PeftConfig::AdaLora(parse_in::<AdaLoraConfig>(v, &cfg_path)?.normalized()),
            "BITFIT" => PeftConfig::Bitfit(parse_in(v, &cfg_path)?),
            "BOTTLENECK" => PeftConfig::Adapter(parse_in(v, &cfg_path)?),
            "FULL" => PeftConfig::Full(parse_in(v, &cfg_path)?),
            "PROMPT_TUNING" => PeftConfig::PromptTuning(parse_in(v, &cfg_path)?),
            "P_TUNING" => PeftConfig::PTuning(parse_in(v, &cfg_path)?),
            "PREFIX_TUNING" => {
                if v.get("num_transformer_submodules").and_then(|x| x.as_u64()).is_some_and(|n| n != 1) {
                    return Err(Error::bad_input(&cfg_path, None, "num_transformer_submodules other than 1 is for encoder-decoder models"));
                }
                if v.get("prefix_projection").and_then(|x| x.as_bool()) == Some(true) {
                    PeftConfig::PrefixTuning(parse_in(v, &cfg_path)?)
                } else {
                    PeftConfig::PTuningV2(parse_in(v, &cfg_path)?)
                }
            }
            other => return Err(Error::bad_input(&cfg_path, None, format!("peft_type `{other}` is not supported yet"))),
        };
        let weights_path = dir.join(WEIGHTS_FILE);
        if !weights_path.exists() {
            return Err(Error::bad_input(dir, None, format!("adapter folder has no {WEIGHTS_FILE}")));
        }
        let weights = candle_core::safetensors::load(&weights_path, model.device())
            .map_err(|e| Error::bad_input(&weights_path, None, e.to_string()))?;
        // peft may save keys with the adapter name (`lora_A.default.weight`, `ia3_l.default`);
        // accept both.
        let weights: HashMap<String, Tensor> = weights
            .into_iter()
            .map(|(k, t)| (k.replace(".default.weight", ".weight").trim_end_matches(".default").to_string(), t))
            .collect();
        remove_all(model);
        if let Some(method) = config.prompt_method() {
            let t = weights
                .get("prompt_embeddings")
                .ok_or_else(|| Error::bad_input(&weights_path, None, "adapter tensor `prompt_embeddings` is missing"))?;
            let module = Arc::new(PromptModule::from_saved(model, method.is_prefix(), method.num_virtual_tokens(), t, &weights_path)?);
            model.set_prompt(Some(module.clone() as Arc<dyn crate::model::PromptSource>));
            return Ok(Adapter { config, layers: Vec::new(), prompt: Some(module), full: None, adalora: None });
        }
        if let PeftConfig::Full(c) = &config {
            let (layers, full) = full::inject(model, c, Some((&weights, &weights_path)))?;
            return Ok(Adapter { config, layers, prompt: None, full: Some(full), adalora: None });
        }
        let layers = match &config {
            PeftConfig::Lora(c) | PeftConfig::Qlora(c) => lora::inject_loaded(model, c, &weights, &weights_path)?
                .into_iter()
                .map(|(p, l)| (p, l as Arc<dyn PeftLayer>))
                .collect(),
            PeftConfig::AdaLora(c) => adalora::inject_loaded(model, c, &weights, &weights_path)?
                .into_iter()
                .map(|(p, l)| (p, l as Arc<dyn PeftLayer>))
                .collect(),
            PeftConfig::Ia3(c) => ia3::inject(model, c, 0, Some((&weights, &weights_path)))?,
            PeftConfig::Bitfit(c) => bitfit::inject(model, c, Some((&weights, &weights_path)))?,
            PeftConfig::Adapter(c) => bottleneck::inject(model, c, 0, Some((&weights, &weights_path)))?,
            PeftConfig::PromptTuning(_) | PeftConfig::PTuning(_) | PeftConfig::PrefixTuning(_) | PeftConfig::PTuningV2(_) | PeftConfig::Full(_) => {
                unreachable!("prompt-learning methods and full fine-tuning are handled above")
            }
        };
        Ok(Adapter { config, layers, prompt: None, full: None, adalora: None })
    }

    /// Folds the adapter into the base weights (LoRA: `W += s·B·A`; IA3: rows/columns scaled;
    /// BitFit: the trained bias; full fine-tuning: every trained tensor) and uninstalls it: the model then computes the same function
    /// with no adapter overhead.
    pub fn merge_into(&self, model: &mut Llama) -> Result<()> {
        if self.prompt.is_some() {
            return Err(Error::Msg(format!(
                "a {} adapter cannot be merged into the weights (its virtual tokens are not weights); export the adapter folder and load it on the base instead",
                self.config.method_name()
            )));
        }
        let by_prefix: HashMap<&str, &Arc<dyn PeftLayer>> = self.layers.iter().map(|(p, l)| (p.as_str(), l)).collect();
        for lin in model.linears_mut() {
            if let Some(l) = by_prefix.get(peft_prefix(lin).as_str()) {
                let Some((w, b)) = l.merged(&lin.weight().dense()?, lin.bias())? else {
                    return Err(Error::Msg(format!(
                        "a {} adapter cannot be merged into the weights (it is not linear); export the adapter folder and load it on the base instead",
                        self.config.method_name()
                    )));
                };
                lin.set_weight(w);
                lin.set_bias(b);
                lin.set_adapter(None);
            }
        }
        if let Some(f) = &self.full {
            f.merge_into(model)?;
            model.set_tuned(None);
        }
        Ok(())
    }
}

impl Adapter {
    /// Installs this adapter's layers on `model` in place of whatever was installed (the
    /// base weights are never touched, so switching adapters — or back to none with
    /// [`remove_all`] — leaves the base bit-identical). Fails when the model lacks a module
    /// the adapter wraps or its shape differs.
    pub fn install(&self, model: &mut Llama) -> Result<()> {
        let by_prefix: HashMap<&str, &Arc<dyn PeftLayer>> = self.layers.iter().map(|(p, l)| (p.as_str(), l)).collect();
        let mut placed = 0usize;
        let mut plan = Vec::new();
        for (i, lin) in model.linears().into_iter().enumerate() {
            if let Some(l) = by_prefix.get(peft_prefix(lin).as_str()) {
                plan.push((i, Arc::clone(l)));
                placed += 1;
            }
        }
        if let Some(p) = &self.prompt {
            let cfg = model.config();
            let want = p.peft_dims();
            let have = prompt::Placement::of(cfg, !matches!(p.placement(), prompt::Placement::Input));
            if have != p.placement() || (have.token_dim(cfg), cfg.num_hidden_layers) != (want.0, want.1) {
                return Err(Error::Msg("the adapter's virtual tokens were trained for a model of another shape".into()));
            }
            prompt::check_fits(cfg, p.len())?;
        }
        if placed != self.layers.len() {
            return Err(Error::Msg(format!(
                "the adapter wraps {} modules but this model has only {placed} of them: it was trained on a different base",
                self.layers.len()
            )));
        }
        remove_all(model);
        let mut lins = model.linears_mut();
        for (i, l) in plan {
            lins[i].set_adapter(Some(l as Arc<dyn LinearAdapter>));
        }
        drop(lins);
        model.set_prompt(self.prompt.clone().map(|p| p as Arc<dyn crate::model::PromptSource>));
        model.set_tuned(self.full.clone().map(|f| f as Arc<dyn crate::model::TunedWeights>));
        Ok(())
    }
}

/// Removes every adapter from `model`.
pub fn remove_all(model: &mut Llama) {
    for lin in model.linears_mut() {
        lin.set_adapter(None);
    }
    model.set_prompt(None);
    model.set_tuned(None);
}
