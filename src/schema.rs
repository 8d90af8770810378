//! Config schemas: every key a form may set — its kind, default, range, label and help text in
//! English and Simplified Chinese — so the app builds its forms from the engine and a new PEFT
//! method appears without UI work. Each method declares its own fields next to its config
//! ([`crate::peft::MethodInfo::fields`]); the `[train]` and `[data]` keys are declared here.
//! Values are still checked by the configs' own `validate` (which names the key); the ranges
//! here are what a form enforces before sending.

use serde::{Deserialize, Serialize};
use ts_rs::TS;

/// A text in the app's two languages.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, TS)]
pub struct Text {
    /// English.
    pub en: String,
    /// Simplified Chinese.
    pub zh: String,
}

/// `Text` from two literals.
pub fn text(en: &str, zh: &str) -> Text {
    Text { en: en.into(), zh: zh.into() }
}

/// How a value is entered.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, TS)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FieldKind {
    /// A whole number.
    Int,
    /// A number.
    Float,
    /// On/off.
    Bool,
    /// Free text.
    Text,
    /// One of `options`.
    Choice {
        /// The allowed values.
        options: Vec<String>,
    },
    /// Module names (`q_proj`, ...) or the keyword `all-linear`.
    Modules,
    /// Module-name suffix → number (peft's `rank_pattern` and `alpha_pattern`).
    NumberMap,
}

/// One config key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, TS)]
pub struct Field {
    /// The key inside its section (`r`, `lr`).
    pub key: String,
    /// How it is entered.
    pub kind: FieldKind,
    /// Its default.
    #[ts(type = "unknown")]
    pub default: serde_json::Value,
    /// Smallest allowed value (numbers).
    pub min: Option<f64>,
    /// Largest allowed value (numbers).
    pub max: Option<f64>,
    /// Whether `max` itself is excluded.
    pub max_exclusive: bool,
    /// Short label.
    pub label: Text,
    /// What it does.
    pub help: Text,
    /// Shown only under "advanced".
    pub advanced: bool,
}

impl Field {
    /// A field with no range, not advanced.
    pub fn new(key: &str, kind: FieldKind, default: impl Serialize, label: Text, help: Text) -> Field {
        Field {
            key: key.into(),
            kind,
            default: serde_json::to_value(default).unwrap_or(serde_json::Value::Null),
            min: None,
            max: None,
            max_exclusive: false,
            label,
            help,
            advanced: false,
        }
    }
    /// With a range `[min, max]` (either open).
    pub fn range(mut self, min: Option<f64>, max: Option<f64>) -> Field {
        self.min = min;
        self.max = max;
        self
    }
    /// With the range `[min, max)`.
    pub fn range_excl(mut self, min: f64, max: f64) -> Field {
        self.min = Some(min);
        self.max = Some(max);
        self.max_exclusive = true;
        self
    }
    /// Shown only under "advanced".
    pub fn advanced(mut self) -> Field {
        self.advanced = true;
        self
    }

    /// Checks a value of this field as a form would; None when it is fine.
    pub fn check(&self, value: &serde_json::Value) -> Option<String> {
        // A key whose default is empty (null: "use the model's value") may be left empty.
        if value.is_null() && self.default.is_null() {
            return None;
        }
        let num = value.as_f64();
        match &self.kind {
            FieldKind::Int if value.as_i64().is_none() && value.as_u64().is_none() => return Some("must be a whole number".into()),
            FieldKind::Float if num.is_none_or(|x| !x.is_finite()) => return Some("must be a number".into()),
            FieldKind::Bool if !value.is_boolean() => return Some("must be true or false".into()),
            FieldKind::Choice { options } if !value.as_str().is_some_and(|s| options.iter().any(|o| o == s)) => {
                return Some(format!("must be one of {}", options.join(", ")))
            }
            _ => {}
        }
        if let Some(x) = num {
            if self.min.is_some_and(|m| x < m) {
                return Some(format!("must be at least {}", self.min.unwrap_or_default()));
            }
            if let Some(m) = self.max {
                if x > m || (self.max_exclusive && x == m) {
                    return Some(format!("must be {} {m}", if self.max_exclusive { "below" } else { "at most" }));
                }
            }
        }
        None
    }
}

/// The `[train]` keys a form shows.
pub fn train_fields() -> Vec<Field> {
    use FieldKind::*;
    let d = crate::train::config::TrainSection::default();
    vec![
        Field::new("epochs", Float, d.epochs, text("Epochs", "训练轮数"), text("Passes over the training set (ignored when max steps is set).", "遍历训练集的次数（设置了最大步数时忽略）。"))
            .range(Some(0.0), None),
        Field::new("max_steps", Int, d.max_steps, text("Max steps", "最大步数"), text("Stop after this many optimizer steps (0 = use epochs).", "优化器走这么多步后停止（0 表示按轮数）。"))
            .range(Some(0.0), None),
        Field::new("batch_size", Int, d.batch_size, text("Batch size", "批大小"), text("Examples per micro-batch.", "每个微批次的样本数。")).range(Some(1.0), None),
        Field::new("grad_accum", Int, d.grad_accum, text("Gradient accumulation", "梯度累积"), text("Micro-batches per optimizer step.", "每个优化器步累积的微批次数。"))
            .range(Some(1.0), None),
        Field::new("lr", Float, d.lr, text("Learning rate", "学习率"), text("Peak learning rate.", "峰值学习率。")).range(Some(1e-12), None),
        Field::new("schedule", Choice { options: vec!["cosine".into(), "linear".into(), "constant".into()] }, "cosine", text("Schedule", "学习率调度"), text("How the learning rate decays after warmup.", "预热之后学习率如何衰减。")),
        Field::new("warmup_steps", Int, d.warmup_steps, text("Warmup steps", "预热步数"), text("Linear warmup steps (overrides the warmup ratio when > 0).", "线性预热的步数（大于 0 时覆盖预热比例）。"))
            .range(Some(0.0), None),
        Field::new("warmup_ratio", Float, d.warmup_ratio, text("Warmup ratio", "预热比例"), text("Warmup as a share of all steps.", "预热占全部步数的比例。"))
            .range_excl(0.0, 1.0)
            .advanced(),
        Field::new("min_lr_ratio", Float, d.min_lr_ratio, text("Final LR ratio", "最终学习率比例"), text("Final learning rate as a share of the peak.", "最终学习率与峰值之比。"))
            .range(Some(0.0), Some(1.0))
            .advanced(),
        Field::new("weight_decay", Float, d.weight_decay, text("Weight decay", "权重衰减"), text("AdamW decoupled weight decay.", "AdamW 的解耦权重衰减。"))
            .range(Some(0.0), None)
            .advanced(),
        Field::new("max_grad_norm", Float, d.max_grad_norm, text("Gradient clipping", "梯度裁剪"), text("Clip gradients to this global L2 norm (0 = off).", "把梯度的全局 L2 范数裁剪到此值（0 表示不裁剪）。"))
            .range(Some(0.0), None)
            .advanced(),
        Field::new("eval_steps", Int, d.eval_steps, text("Validate every", "验证间隔"), text("Compute validation loss and sample answers every N steps (0 = only at the end).", "每 N 步计算验证损失并生成示例回答（0 表示只在最后）。"))
            .range(Some(0.0), None),
        Field::new("save_steps", Int, d.save_steps, text("Checkpoint every", "保存间隔"), text("Save a checkpoint every N steps (0 = only at the end); runs resume from the newest.", "每 N 步保存一次检查点（0 表示只在最后）；续训从最新的检查点开始。"))
            .range(Some(0.0), None),
        Field::new("device", Choice { options: crate::device::choices() }, &d.device, text("Device", "设备"), text("Where to train: auto takes the first CUDA GPU when this build has CUDA support and a GPU answers, else the CPU.", "在哪里训练：auto 在本程序支持 CUDA 且有可用 GPU 时用第一块 GPU，否则用 CPU。")),
        Field::new("dtype", Choice { options: vec!["f32".into(), "bf16".into(), "f16".into()] }, d.dtype, text("Precision", "精度"), text("Precision of the frozen base model and the activations. bf16 and f16 halve their memory; the trained tensors and the optimizer stay f32; f16 scales the loss dynamically against overflow. On the CPU both are slower than f32 (for about two thirds of its memory).", "冻结的基础模型和激活值的精度。bf16 和 f16 让它们的内存减半；训练的张量和优化器保持 f32；f16 动态缩放损失以防溢出。在 CPU 上两者都比 f32 慢（内存约为其三分之二）。"))
            .advanced(),
        Field::new("loss_scale", Float, d.loss_scale, text("f16 loss scale", "f16 损失缩放"), text("Only for f16: the initial dynamic loss scale. It halves when the gradients overflow (that step is skipped) and doubles after 2000 clean steps.", "仅用于 f16：动态损失缩放的初始值。梯度溢出时减半（跳过该步），连续 2000 步正常后加倍。"))
            .range(Some(1.0), None)
            .advanced(),
        Field::new("gradient_checkpointing", Bool, d.gradient_checkpointing, text("Gradient checkpointing", "梯度检查点"), text("Keep only each layer's input and recompute the layer in the backward pass: far less activation memory for about a third more time per step. Same results.", "只保存每层的输入，反向传播时重算该层：激活内存大幅减少，每步多约三分之一的时间。结果相同。")),
        Field::new("keep_checkpoints", Int, d.keep_checkpoints, text("Checkpoints kept", "保留检查点数"), text("Keep the newest N checkpoints.", "保留最新的 N 个检查点。"))
            .range(Some(1.0), None)
            .advanced(),
    ]
}

/// The `[data]` keys a form shows (the dataset itself is picked separately).
pub fn data_fields() -> Vec<Field> {
    use FieldKind::*;
    vec![
        Field::new("max_len", Int, 512, text("Max length", "最大长度"), text("Longest example in tokens; longer ones are truncated.", "样本的最大词元数；更长的会被截断。"))
            .range(Some(2.0), None),
        Field::new("train_on_prompt", Bool, false, text("Train on prompts", "在提示上训练"), text("Compute the loss on prompt tokens too (default: only on assistant turns).", "提示部分也计算损失（默认只在助手回复上计算）。"))
            .advanced(),
        Field::new("val_fraction", Float, 0.05, text("Validation share", "验证集比例"), text("Share of examples held out for validation.", "留作验证的样本比例。"))
            .range_excl(0.0, 1.0),
        Field::new("max_examples", Int, serde_json::Value::Null, text("Max examples", "最多样本数"), text("Use at most this many records (empty = all).", "最多使用这么多条记录（留空表示全部）。"))
            .range(Some(1.0), None)
            .advanced(),
    ]
}

/// Common fields of the methods: `target_modules`.
pub fn target_modules_field(default: impl Serialize, help: Text) -> Field {
    Field::new("target_modules", FieldKind::Modules, default, text("Target modules", "目标模块"), help)
}
