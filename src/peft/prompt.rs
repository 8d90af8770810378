//! Prompt learning: trained virtual tokens in front of every sequence; the model itself is
//! untouched (no linear layer is wrapped).
//!
//! - **Prompt tuning** (Lester et al. 2021, `prompt_tuning`): `n` trained input embeddings
//!   (a soft prompt) before the token embeddings. Parameters: `n·d` for hidden size `d`.
//!   Initialisation: `SAMPLE_VOCAB` (our default: embeddings of `n` random vocabulary tokens),
//!   `TEXT` (the embeddings of `prompt_tuning_init_text`, repeated or cut to `n` tokens) or
//!   `RANDOM` (N(0, 1), PEFT's default). PEFT defaults to RANDOM; we do not, because N(0, 1)
//!   rows are far longer than the token embeddings of the models we tune (SmolLM2-135M: median
//!   row norm 3.2, entries' standard deviation 0.14, against 24 for an N(0, 1) row of width
//!   576), so the soft prompt starts by drowning out the real tokens.
//! - **P-tuning** (Liu et al. 2021, "GPT Understands, Too", `p_tuning`): the virtual input
//!   embeddings are produced by a prompt encoder from `n` trained seed embeddings, as in PEFT:
//!   `MLP` = Linear(d→h) ReLU Linear(h→h) ReLU Linear(h→d), parameters
//!   `n·d + (d·h+h) + (h·h+h) + (h·d+d)`; `LSTM` = a bidirectional LSTM of `encoder_num_layers`
//!   layers (hidden h, torch's gate order i, f, g, o, dropout `encoder_dropout` between layers)
//!   then Linear(2h→2h) ReLU Linear(2h→d), parameters `n·d + Σ_layers 2·(4h·in + 4h·h + 8h) +
//!   (2h·2h+2h) + (2h·d+d)` with `in = d` for the first layer and `2h` after. `h` =
//!   `encoder_hidden_size`, by default `d`.
//! - **Prefix tuning** (Li & Liang 2021, `prefix_tuning`): every attention layer gets `n`
//!   trained keys and values in front of the real ones (they are not rotated: the real tokens'
//!   positions start at `n`). Reparameterised as in the paper and PEFT (`prefix_projection`):
//!   `n` seed embeddings of width `t = kv_heads·head_dim` pass through Linear(t→h) Tanh
//!   Linear(h→L·2·t); parameters `n·t + (t·h+h) + (h·L·2·t + L·2·t)`, `h` by default `t`.
//! - **P-tuning v2** (Liu et al. 2022, `p_tuning_v2`): the same deep per-layer prefixes,
//!   trained directly (no MLP): `n·L·2·t` parameters.
//!
//! `t` is the key/value width: with grouped-query attention PEFT sizes prefixes by the key/value
//! heads (`num_attention_heads` = `num_key_value_heads` in its config), and so do we.
//!
//! File format: PEFT's. `adapter_config.json` with `peft_type` `PROMPT_TUNING`, `P_TUNING` or
//! `PREFIX_TUNING` (`prefix_projection` true for prefix tuning, false for P-tuning v2),
//! `num_virtual_tokens`, `token_dim`, `num_layers`, `num_attention_heads`,
//! `num_transformer_submodules` 1 and `inference_mode` true; `adapter_model.safetensors`
//! holds one tensor, `prompt_embeddings` (n, d) — or (n, L·2·t) for prefixes — the prompt
//! encoder's output, which is all inference needs (PEFT saves the same). Loading gives that
//! inference form: the encoder is not part of the file.

use candle_core::{DType, Tensor, Var};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::model::{ForwardCtx, Llama, LlamaConfig, PromptSource, VirtualTokens};
use crate::schema::{text, Field, FieldKind};
use crate::{Error, Result};

/// How prompt tuning's soft prompt starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ts_rs::TS)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PromptInit {
    /// N(0, 1) (PEFT's default).
    Random,
    /// The embeddings of `prompt_tuning_init_text`, repeated or cut to the prompt's length.
    Text,
    /// The embeddings of random vocabulary tokens (our default).
    SampleVocab,
}

/// The P-tuning prompt encoder.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ts_rs::TS)]
pub enum EncoderType {
    /// Three linear layers with ReLU between them.
    #[serde(rename = "MLP")]
    Mlp,
    /// A bidirectional LSTM followed by a two-layer MLP.
    #[serde(rename = "LSTM")]
    Lstm,
}

fn twenty() -> usize {
    20
}
fn sample_vocab() -> PromptInit {
    PromptInit::SampleVocab
}
fn mlp() -> EncoderType {
    EncoderType::Mlp
}
fn two() -> usize {
    2
}

/// Prompt tuning settings (PEFT's `PromptTuningConfig` keys).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ts_rs::TS)]
pub struct PromptTuningConfig {
    /// Length of the soft prompt.
    #[serde(default = "twenty")]
    pub num_virtual_tokens: usize,
    /// How the soft prompt starts.
    #[serde(default = "sample_vocab")]
    pub prompt_tuning_init: PromptInit,
    /// The text whose embeddings start the soft prompt (with `TEXT`).
    #[serde(default)]
    pub prompt_tuning_init_text: Option<String>,
}

impl Default for PromptTuningConfig {
    fn default() -> Self {
        PromptTuningConfig {
            num_virtual_tokens: twenty(),
            prompt_tuning_init: sample_vocab(),
            prompt_tuning_init_text: None,
        }
    }
}

/// P-tuning settings (PEFT's `PromptEncoderConfig` keys).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ts_rs::TS)]
pub struct PromptEncoderConfig {
    /// Number of virtual tokens.
    #[serde(default = "twenty")]
    pub num_virtual_tokens: usize,
    /// MLP or LSTM prompt encoder.
    #[serde(default = "mlp")]
    pub encoder_reparameterization_type: EncoderType,
    /// Width of the encoder (default: the model's hidden size).
    #[serde(default)]
    pub encoder_hidden_size: Option<usize>,
    /// LSTM layers (the MLP always has PEFT's three linear layers).
    #[serde(default = "two")]
    pub encoder_num_layers: usize,
    /// Dropout between LSTM layers while training.
    #[serde(default)]
    pub encoder_dropout: f64,
}

impl Default for PromptEncoderConfig {
    fn default() -> Self {
        PromptEncoderConfig {
            num_virtual_tokens: twenty(),
            encoder_reparameterization_type: mlp(),
            encoder_hidden_size: None,
            encoder_num_layers: two(),
            encoder_dropout: 0.0,
        }
    }
}

/// Prefix tuning settings (PEFT's `PrefixTuningConfig` with `prefix_projection`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ts_rs::TS)]
pub struct PrefixTuningConfig {
    /// Number of virtual key/value positions per layer.
    #[serde(default = "twenty")]
    pub num_virtual_tokens: usize,
    /// Width of the reparameterisation MLP (default: the key/value width).
    #[serde(default)]
    pub encoder_hidden_size: Option<usize>,
}

impl Default for PrefixTuningConfig {
    fn default() -> Self {
        PrefixTuningConfig {
            num_virtual_tokens: twenty(),
            encoder_hidden_size: None,
        }
    }
}

/// P-tuning v2 settings (PEFT's `PrefixTuningConfig` without `prefix_projection`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ts_rs::TS)]
pub struct PTuningV2Config {
    /// Number of virtual key/value positions per layer.
    #[serde(default = "twenty")]
    pub num_virtual_tokens: usize,
}

impl Default for PTuningV2Config {
    fn default() -> Self {
        PTuningV2Config {
            num_virtual_tokens: twenty(),
        }
    }
}

fn tokens_field() -> Field {
    Field::new(
        "num_virtual_tokens",
        FieldKind::Int,
        20,
        text("Virtual tokens", "虚拟 token 数"),
        text(
            "How many trained positions go in front of every sequence; they take that much of the model's context.",
            "每个序列前加多少个训练出来的位置；它们占用同样多的模型上下文。",
        ),
    )
    .range(Some(1.0), Some(1024.0))
}

fn check_tokens(n: usize) -> Result<()> {
    if n == 0 {
        return Err(Error::config(
            "peft.num_virtual_tokens",
            "must be at least 1",
        ));
    }
    Ok(())
}

fn check_hidden(h: Option<usize>) -> Result<()> {
    if h == Some(0) {
        return Err(Error::config(
            "peft.encoder_hidden_size",
            "must be at least 1 (or left out: the model's width)",
        ));
    }
    Ok(())
}

impl PromptTuningConfig {
    /// The keys a form shows.
    pub fn fields() -> Vec<Field> {
        vec![
            tokens_field(),
            Field::new(
                "prompt_tuning_init",
                FieldKind::Choice { options: vec!["SAMPLE_VOCAB".into(), "TEXT".into(), "RANDOM".into()] },
                PromptInit::SampleVocab,
                text("Initialisation", "初始化"),
                text(
                    "SAMPLE_VOCAB: embeddings of random vocabulary tokens; TEXT: the embeddings of the text below; RANDOM: N(0, 1), PEFT's default, far larger than real token embeddings.",
                    "SAMPLE_VOCAB：随机词表 token 的嵌入；TEXT：下面文本的嵌入；RANDOM：N(0, 1)（PEFT 的默认），远大于真实 token 的嵌入。",
                ),
            ),
            Field::new(
                "prompt_tuning_init_text",
                FieldKind::Text,
                serde_json::Value::Null,
                text("Initial text", "初始文本"),
                text(
                    "With TEXT: a description of the task (e.g. \"Answer as Tessel, a helpful assistant:\"), repeated or cut to the prompt's length.",
                    "选 TEXT 时：任务描述（如 \"以 Tessel 的身份回答：\"），重复或截断到提示长度。",
                ),
            ),
        ]
    }

    /// Checks the values; errors name the key.
    pub fn validate(&self) -> Result<()> {
        check_tokens(self.num_virtual_tokens)?;
        if self.prompt_tuning_init == PromptInit::Text
            && self
                .prompt_tuning_init_text
                .as_deref()
                .is_none_or(|t| t.trim().is_empty())
        {
            return Err(Error::config(
                "peft.prompt_tuning_init_text",
                "prompt_tuning_init = \"TEXT\" needs the text to start from",
            ));
        }
        Ok(())
    }
}

impl PromptEncoderConfig {
    /// The keys a form shows.
    pub fn fields() -> Vec<Field> {
        vec![
            tokens_field(),
            Field::new(
                "encoder_reparameterization_type",
                FieldKind::Choice { options: vec!["MLP".into(), "LSTM".into()] },
                EncoderType::Mlp,
                text("Prompt encoder", "提示编码器"),
                text(
                    "MLP: three linear layers with ReLU; LSTM: a bidirectional LSTM then two linear layers (the paper's encoder; slower).",
                    "MLP：三层线性层加 ReLU；LSTM：双向 LSTM 再接两层线性层（论文中的编码器；较慢）。",
                ),
            ),
            Field::new(
                "encoder_hidden_size",
                FieldKind::Int,
                serde_json::Value::Null,
                text("Encoder width", "编码器宽度"),
                text("Hidden width of the prompt encoder; empty: the model's hidden size.", "提示编码器的隐藏宽度；留空：模型的隐藏维度。"),
            )
            .range(Some(1.0), None),
            Field::new(
                "encoder_num_layers",
                FieldKind::Int,
                2,
                text("LSTM layers", "LSTM 层数"),
                text("Layers of the LSTM encoder (the MLP encoder always has three linear layers).", "LSTM 编码器的层数（MLP 编码器总是三层线性层）。"),
            )
            .range(Some(1.0), Some(8.0))
            .advanced(),
            Field::new(
                "encoder_dropout",
                FieldKind::Float,
                0.0,
                text("LSTM dropout", "LSTM dropout"),
                text("Dropout between LSTM layers while training.", "训练时 LSTM 层之间的 dropout。"),
            )
            .range_excl(-1e-9, 1.0)
            .advanced(),
        ]
    }

    /// Checks the values; errors name the key.
    pub fn validate(&self) -> Result<()> {
        check_tokens(self.num_virtual_tokens)?;
        check_hidden(self.encoder_hidden_size)?;
        if self.encoder_num_layers == 0 {
            return Err(Error::config(
                "peft.encoder_num_layers",
                "must be at least 1",
            ));
        }
        if !(0.0..1.0).contains(&self.encoder_dropout) {
            return Err(Error::config(
                "peft.encoder_dropout",
                format!("{} is not in [0, 1)", self.encoder_dropout),
            ));
        }
        Ok(())
    }
}

impl PrefixTuningConfig {
    /// The keys a form shows.
    pub fn fields() -> Vec<Field> {
        vec![
            tokens_field(),
            Field::new(
                "encoder_hidden_size",
                FieldKind::Int,
                serde_json::Value::Null,
                text("MLP width", "MLP 宽度"),
                text(
                    "Hidden width of the reparameterisation MLP; empty: the key/value width (kv_heads × head_dim).",
                    "重参数化 MLP 的隐藏宽度；留空：键/值宽度（kv_heads × head_dim）。",
                ),
            )
            .range(Some(1.0), None),
        ]
    }

    /// Checks the values; errors name the key.
    pub fn validate(&self) -> Result<()> {
        check_tokens(self.num_virtual_tokens)?;
        check_hidden(self.encoder_hidden_size)
    }
}

impl PTuningV2Config {
    /// The keys a form shows.
    pub fn fields() -> Vec<Field> {
        vec![tokens_field()]
    }

    /// Checks the values; errors name the key.
    pub fn validate(&self) -> Result<()> {
        check_tokens(self.num_virtual_tokens)
    }
}

/// Where the virtual tokens go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Input embeddings (prompt tuning, P-tuning).
    Input,
    /// Keys and values of every attention layer (prefix tuning, P-tuning v2).
    Prefix {
        /// Decoder layers.
        layers: usize,
        /// Key/value heads.
        kv_heads: usize,
        /// Width of a head.
        head_dim: usize,
    },
}

impl Placement {
    /// PEFT's `token_dim`, `num_layers`, `num_attention_heads` for this placement on `cfg`.
    fn peft_dims(&self, cfg: &LlamaConfig) -> (usize, usize, usize) {
        let heads = match self {
            Placement::Input => cfg.num_attention_heads,
            Placement::Prefix { kv_heads, .. } => *kv_heads,
        };
        (self.token_dim(cfg), cfg.num_hidden_layers, heads)
    }

    /// For `model`'s architecture.
    pub fn of(cfg: &LlamaConfig, prefix: bool) -> Placement {
        if prefix {
            Placement::Prefix {
                layers: cfg.num_hidden_layers,
                kv_heads: cfg.kv_heads(),
                head_dim: cfg.head_dim(),
            }
        } else {
            Placement::Input
        }
    }

    /// Width of one seed embedding (`token_dim` in PEFT): the hidden size, or the key/value
    /// width for prefixes.
    pub fn token_dim(&self, cfg: &LlamaConfig) -> usize {
        match self {
            Placement::Input => cfg.hidden_size,
            Placement::Prefix {
                kv_heads, head_dim, ..
            } => kv_heads * head_dim,
        }
    }

    /// Width of one virtual token as the model consumes it (what is saved).
    pub fn out_dim(&self, cfg: &LlamaConfig) -> usize {
        match self {
            Placement::Input => cfg.hidden_size,
            Placement::Prefix {
                layers,
                kv_heads,
                head_dim,
            } => layers * 2 * kv_heads * head_dim,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Act {
    Relu,
    Tanh,
}

/// Linear layers (weight (out, in), bias) with `act` between them (not after the last).
#[derive(Debug)]
struct Mlp {
    /// PEFT module name (`mlp_head`, `transform`).
    name: &'static str,
    layers: Vec<(Var, Var)>,
    act: Act,
}

impl Mlp {
    fn forward(&self, xs: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        let mut xs = xs.clone();
        for (i, (w, b)) in self.layers.iter().enumerate() {
            let (w, b) = (super::var_tensor(w, ctx), super::var_tensor(b, ctx));
            xs = xs.matmul(&w.t()?)?.broadcast_add(&b)?;
            if i + 1 < self.layers.len() {
                xs = match self.act {
                    Act::Relu => xs.relu()?,
                    Act::Tanh => xs.tanh()?,
                };
            }
        }
        Ok(xs)
    }

    fn params(&self, out: &mut Vec<(String, Var)>) {
        for (i, (w, b)) in self.layers.iter().enumerate() {
            // torch's Sequential numbers the activations too: linears are 0, 2, 4.
            out.push((
                format!("prompt_encoder.{}.{}.weight", self.name, 2 * i),
                w.clone(),
            ));
            out.push((
                format!("prompt_encoder.{}.{}.bias", self.name, 2 * i),
                b.clone(),
            ));
        }
    }
}

/// One direction of one LSTM layer (torch's parameter layout: gates i, f, g, o stacked).
#[derive(Debug)]
struct LstmDir {
    w_ih: Var,
    w_hh: Var,
    b_ih: Var,
    b_hh: Var,
}

fn sigmoid(x: &Tensor) -> Result<Tensor> {
    Ok((x.neg()?.exp()? + 1.0)?.recip()?)
}

impl LstmDir {
    /// Runs over the sequence `xs` (n, in) forwards or backwards; (n, h).
    fn forward(&self, xs: &Tensor, reverse: bool, ctx: &ForwardCtx) -> Result<Tensor> {
        let t = |v: &Var| super::var_tensor(v, ctx);
        let w_hh_t = t(&self.w_hh).t()?;
        let h_size = w_hh_t.dim(0)?;
        let n = xs.dim(0)?;
        let gx = xs
            .matmul(&t(&self.w_ih).t()?)?
            .broadcast_add(&t(&self.b_ih))?
            .broadcast_add(&t(&self.b_hh))?;
        let mut h = Tensor::zeros((1, h_size), xs.dtype(), xs.device())?;
        let mut c = h.clone();
        let mut outs: Vec<Option<Tensor>> = vec![None; n];
        let steps: Vec<usize> = if reverse {
            (0..n).rev().collect()
        } else {
            (0..n).collect()
        };
        for s in steps {
            let g = (gx.narrow(0, s, 1)? + h.matmul(&w_hh_t)?)?;
            let i = sigmoid(&g.narrow(1, 0, h_size)?)?;
            let f = sigmoid(&g.narrow(1, h_size, h_size)?)?;
            let gg = g.narrow(1, 2 * h_size, h_size)?.tanh()?;
            let o = sigmoid(&g.narrow(1, 3 * h_size, h_size)?)?;
            c = ((f * &c)? + (i * gg)?)?;
            h = (o * c.tanh()?)?;
            outs[s] = Some(h.clone());
        }
        let outs: Vec<Tensor> = outs.into_iter().flatten().collect();
        Ok(Tensor::cat(&outs, 0)?)
    }
}

#[derive(Debug)]
enum Encoder {
    /// The seed embeddings are the virtual tokens (prompt tuning, P-tuning v2, loaded files).
    None,
    Mlp(Mlp),
    Lstm {
        layers: Vec<[LstmDir; 2]>,
        dropout: f64,
        head: Mlp,
    },
}

/// A prompt-learning method's trained tensors, installed on the model as its
/// [`PromptSource`].
#[derive(Debug)]
pub struct PromptModule {
    placement: Placement,
    /// PEFT's `token_dim`, `num_layers`, `num_attention_heads` for the model it was built for.
    dims: (usize, usize, usize),
    n: usize,
    /// Seed embeddings (n, token_dim), or the virtual tokens themselves without an encoder.
    embedding: Var,
    encoder: Encoder,
}

/// Seeded random numbers for initialisation.
struct Init {
    rng: rand::rngs::StdRng,
    dtype: DType,
    device: candle_core::Device,
}

impl Init {
    /// U(-bound, bound).
    fn uniform(&mut self, shape: &[usize], bound: f64) -> Result<Var> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| ((self.rng.random::<f64>() * 2.0 - 1.0) * bound) as f32)
            .collect();
        Ok(Var::from_tensor(
            &Tensor::from_vec(v, shape, &self.device)?.to_dtype(self.dtype)?,
        )?)
    }

    /// N(0, 1) (Box–Muller), like a fresh `torch.nn.Embedding`.
    fn normal(&mut self, shape: &[usize]) -> Result<Var> {
        let v = super::normal_samples(&mut self.rng, shape.iter().product(), 1.0);
        Ok(Var::from_tensor(
            &Tensor::from_vec(v, shape, &self.device)?.to_dtype(self.dtype)?,
        )?)
    }

    /// A fresh `torch.nn.Linear(i, o)`: weight and bias U(±1/√i).
    fn linear(&mut self, i: usize, o: usize) -> Result<(Var, Var)> {
        let bound = 1.0 / (i as f64).sqrt();
        Ok((self.uniform(&[o, i], bound)?, self.uniform(&[o], bound)?))
    }
}

/// What a prompt-learning method builds.
pub enum Method<'a> {
    /// Prompt tuning.
    PromptTuning(&'a PromptTuningConfig),
    /// P-tuning.
    PTuning(&'a PromptEncoderConfig),
    /// Prefix tuning.
    PrefixTuning(&'a PrefixTuningConfig),
    /// P-tuning v2.
    PTuningV2(&'a PTuningV2Config),
}

impl Method<'_> {
    /// Positions the method puts in front of every sequence.
    pub fn num_virtual_tokens(&self) -> usize {
        match self {
            Method::PromptTuning(c) => c.num_virtual_tokens,
            Method::PTuning(c) => c.num_virtual_tokens,
            Method::PrefixTuning(c) => c.num_virtual_tokens,
            Method::PTuningV2(c) => c.num_virtual_tokens,
        }
    }

    /// Whether the virtual tokens are per-layer key/value prefixes (else input embeddings).
    pub fn is_prefix(&self) -> bool {
        matches!(self, Method::PrefixTuning(_) | Method::PTuningV2(_))
    }

    fn placement(&self, cfg: &LlamaConfig) -> Placement {
        Placement::of(cfg, self.is_prefix())
    }

    /// Trainable parameters on a model of architecture `cfg` (the formulas in the module
    /// documentation).
    pub fn num_params(&self, cfg: &LlamaConfig) -> usize {
        let p = self.placement(cfg);
        let (n, t, out) = (self.num_virtual_tokens(), p.token_dim(cfg), p.out_dim(cfg));
        let lin = |i: usize, o: usize| i * o + o;
        match self {
            Method::PromptTuning(_) => n * t,
            Method::PTuningV2(_) => n * out,
            Method::PrefixTuning(c) => {
                let h = c.encoder_hidden_size.unwrap_or(t);
                n * t + lin(t, h) + lin(h, out)
            }
            Method::PTuning(c) => {
                let h = c.encoder_hidden_size.unwrap_or(t);
                match c.encoder_reparameterization_type {
                    EncoderType::Mlp => n * t + lin(t, h) + lin(h, h) + lin(h, t),
                    EncoderType::Lstm => {
                        let lstm: usize = (0..c.encoder_num_layers)
                            .map(|l| {
                                2 * (4 * h * if l == 0 { t } else { 2 * h } + 4 * h * h + 8 * h)
                            })
                            .sum();
                        n * t + lstm + lin(2 * h, 2 * h) + lin(2 * h, t)
                    }
                }
            }
        }
    }
}

/// Checks that `n` virtual tokens leave room in the model's context.
pub fn check_fits(cfg: &LlamaConfig, n: usize) -> Result<()> {
    if n >= cfg.max_position_embeddings {
        return Err(Error::config(
            "peft.num_virtual_tokens",
            format!("{n} virtual tokens fill the model's whole context ({} positions), leaving no room for text", cfg.max_position_embeddings),
        ));
    }
    Ok(())
}

impl PromptModule {
    /// A fresh module for `model`, initialised from `seed` (and, for prompt tuning's `TEXT`
    /// init, `tokenizer`).
    pub fn new(
        model: &Llama,
        method: &Method,
        seed: u64,
        tokenizer: Option<&tokenizers::Tokenizer>,
    ) -> Result<Self> {
        let cfg = model.config();
        let n = method.num_virtual_tokens();
        check_fits(cfg, n)?;
        let placement = method.placement(cfg);
        let (t, out) = (placement.token_dim(cfg), placement.out_dim(cfg));
        let mut init = Init {
            rng: rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed_0f_9e57),
            dtype: super::param_dtype(model.embed_tokens().dtype()),
            device: model.device().clone(),
        };
        let (embedding, encoder) = match method {
            Method::PromptTuning(c) => {
                let ids: Vec<u32> = match c.prompt_tuning_init {
                    PromptInit::Random => {
                        return Ok(PromptModule {
                            placement,
                            dims: placement.peft_dims(cfg),
                            n,
                            embedding: init.normal(&[n, t])?,
                            encoder: Encoder::None,
                        })
                    }
                    PromptInit::SampleVocab => (0..n)
                        .map(|_| init.rng.random_range(0..cfg.vocab_size as u32))
                        .collect(),
                    PromptInit::Text => {
                        let text = c.prompt_tuning_init_text.as_deref().unwrap_or_default();
                        let tok = tokenizer.ok_or_else(|| {
                            Error::config("peft.prompt_tuning_init", "TEXT initialisation needs the model's tokenizer, and none was given")
                        })?;
                        let enc = tok.encode(text, true).map_err(|e| {
                            Error::Msg(format!("tokenizing prompt_tuning_init_text: {e}"))
                        })?;
                        let ids = enc.get_ids();
                        if ids.is_empty() {
                            return Err(Error::config(
                                "peft.prompt_tuning_init_text",
                                "the text has no tokens",
                            ));
                        }
                        ids.iter().copied().cycle().take(n).collect()
                    }
                };
                if let Some(bad) = ids.iter().find(|&&i| i as usize >= cfg.vocab_size) {
                    return Err(Error::config(
                        "peft.prompt_tuning_init_text",
                        format!("token {bad} is outside the model's vocabulary: wrong tokenizer?"),
                    ));
                }
                let rows = model
                    .embed_tokens()
                    .rows(&Tensor::new(ids.as_slice(), model.device())?)?;
                (
                    Var::from_tensor(&rows.to_dtype(init.dtype)?)?,
                    Encoder::None,
                )
            }
            Method::PTuningV2(_) => (init.normal(&[n, out])?, Encoder::None),
            Method::PrefixTuning(c) => {
                let h = c.encoder_hidden_size.unwrap_or(t);
                let e = init.normal(&[n, t])?;
                let layers = vec![init.linear(t, h)?, init.linear(h, out)?];
                (
                    e,
                    Encoder::Mlp(Mlp {
                        name: "transform",
                        layers,
                        act: Act::Tanh,
                    }),
                )
            }
            Method::PTuning(c) => {
                let h = c.encoder_hidden_size.unwrap_or(t);
                let e = init.normal(&[n, t])?;
                match c.encoder_reparameterization_type {
                    EncoderType::Mlp => {
                        let layers =
                            vec![init.linear(t, h)?, init.linear(h, h)?, init.linear(h, t)?];
                        (
                            e,
                            Encoder::Mlp(Mlp {
                                name: "mlp_head",
                                layers,
                                act: Act::Relu,
                            }),
                        )
                    }
                    EncoderType::Lstm => {
                        let bound = 1.0 / (h as f64).sqrt();
                        let mut layers = Vec::new();
                        for l in 0..c.encoder_num_layers {
                            let input = if l == 0 { t } else { 2 * h };
                            let mut dir = || -> Result<LstmDir> {
                                Ok(LstmDir {
                                    w_ih: init.uniform(&[4 * h, input], bound)?,
                                    w_hh: init.uniform(&[4 * h, h], bound)?,
                                    b_ih: init.uniform(&[4 * h], bound)?,
                                    b_hh: init.uniform(&[4 * h], bound)?,
                                })
                            };
                            layers.push([dir()?, dir()?]);
                        }
                        let head = Mlp {
                            name: "mlp_head",
                            layers: vec![init.linear(2 * h, 2 * h)?, init.linear(2 * h, t)?],
                            act: Act::Relu,
                        };
                        (
                            e,
                            Encoder::Lstm {
                                layers,
                                dropout: c.encoder_dropout,
                                head,
                            },
                        )
                    }
                }
            }
        };
        Ok(PromptModule {
            placement,
            dims: placement.peft_dims(cfg),
            n,
            embedding,
            encoder,
        })
    }

    /// The inference form from a saved `prompt_embeddings` tensor (n, d) — (n, L·2·t) for
    /// prefixes — checked against `model`; `source` names the file in errors.
    pub fn from_saved(
        model: &Llama,
        prefix: bool,
        n: usize,
        t: &Tensor,
        source: &std::path::Path,
    ) -> Result<Self> {
        let cfg = model.config();
        let placement = Placement::of(cfg, prefix);
        let want = [n, placement.out_dim(cfg)];
        if t.dims() != want {
            let what = if prefix {
                format!(
                    "num_virtual_tokens × layers·2·kv_heads·head_dim = {n} × {}·2·{}·{}",
                    cfg.num_hidden_layers,
                    cfg.kv_heads(),
                    cfg.head_dim()
                )
            } else {
                format!(
                    "num_virtual_tokens × hidden_size = {n} × {}",
                    cfg.hidden_size
                )
            };
            return Err(Error::bad_input(
                source,
                None,
                format!(
                    "prompt_embeddings is {:?}; this model needs {want:?} ({what})",
                    t.dims()
                ),
            ));
        }
        check_fits(cfg, n)?;
        let embedding = Var::from_tensor(
            &t.to_dtype(super::param_dtype(model.embed_tokens().dtype()))?
                .to_device(model.device())?,
        )?;
        Ok(PromptModule {
            placement,
            dims: placement.peft_dims(cfg),
            n,
            embedding,
            encoder: Encoder::None,
        })
    }

    /// The trainable tensors under their names in PEFT's prompt encoder.
    pub fn params(&self) -> Vec<(String, Var)> {
        let mut out = vec![(
            "prompt_encoder.embedding.weight".to_string(),
            self.embedding.clone(),
        )];
        match &self.encoder {
            Encoder::None => {}
            Encoder::Mlp(m) => m.params(&mut out),
            Encoder::Lstm { layers, head, .. } => {
                for (l, dirs) in layers.iter().enumerate() {
                    for (d, suffix) in dirs.iter().zip(["", "_reverse"]) {
                        for (name, v) in [
                            ("weight_ih", &d.w_ih),
                            ("weight_hh", &d.w_hh),
                            ("bias_ih", &d.b_ih),
                            ("bias_hh", &d.b_hh),
                        ] {
                            out.push((
                                format!("prompt_encoder.lstm_head.{name}_l{l}{suffix}"),
                                v.clone(),
                            ));
                        }
                    }
                }
                head.params(&mut out);
            }
        }
        out
    }

    /// The virtual tokens as the model consumes them, (n, d) or (n, L·2·t): the encoder's
    /// output.
    pub fn output(&self, ctx: &ForwardCtx) -> Result<Tensor> {
        let e = super::var_tensor(&self.embedding, ctx);
        Ok(match &self.encoder {
            Encoder::None => e,
            Encoder::Mlp(m) => m.forward(&e, ctx)?,
            Encoder::Lstm {
                layers,
                dropout,
                head,
            } => {
                let mut xs = e;
                for (l, [fwd, bwd]) in layers.iter().enumerate() {
                    if l > 0 && ctx.train && *dropout > 0.0 {
                        xs = super::dropout(
                            &xs,
                            *dropout,
                            ctx.seed.wrapping_mul(31).wrapping_add(l as u64),
                        )?;
                    }
                    xs = Tensor::cat(
                        &[fwd.forward(&xs, false, ctx)?, bwd.forward(&xs, true, ctx)?],
                        1,
                    )?;
                }
                head.forward(&xs, ctx)?
            }
        })
    }

    /// What PEFT saves: `prompt_embeddings`.
    pub fn saved(&self) -> Result<Tensor> {
        Ok(self.output(&ForwardCtx::default())?.detach())
    }

    /// Number of virtual positions.
    pub fn len(&self) -> usize {
        self.n
    }

    /// Always false: a module has at least one virtual token (`num_virtual_tokens` ≥ 1).
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Input embeddings or per-layer prefixes.
    pub fn placement(&self) -> Placement {
        self.placement
    }

    /// PEFT's `token_dim`, `num_layers` and `num_attention_heads` (the key/value heads for
    /// prefixes, as PEFT sets them for grouped-query attention).
    pub fn peft_dims(&self) -> (usize, usize, usize) {
        self.dims
    }
}

impl PromptSource for PromptModule {
    fn num_virtual_tokens(&self) -> usize {
        self.n
    }

    fn virtual_tokens(&self, ctx: &ForwardCtx) -> Result<VirtualTokens> {
        let out = self.output(ctx)?;
        Ok(match self.placement {
            Placement::Input => VirtualTokens::Embeddings(out),
            Placement::Prefix {
                layers,
                kv_heads,
                head_dim,
            } => {
                // (n, L·2·t) → (L·2, kv_heads, n, head_dim), as PEFT lays out past_key_values;
                // layer l takes keys 2l and values 2l + 1.
                let kv = out
                    .reshape((self.n, layers * 2, kv_heads, head_dim))?
                    .permute((1, 2, 0, 3))?
                    .contiguous()?;
                let mut per_layer = Vec::with_capacity(layers);
                for l in 0..layers {
                    per_layer.push((kv.get(2 * l)?, kv.get(2 * l + 1)?));
                }
                VirtualTokens::KeyValues(per_layer)
            }
        })
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}
