//! LoRA: low-rank adaptation of frozen linear layers.
//!
//! Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (2021); rsLoRA scaling from
//! Kalajdzievski, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA" (2023).
//! Follows HF peft's `tuners/lora` (config keys, init, key names, merge):
//! `y = x·Wᵀ + s·(dropout(x)·Aᵀ)·Bᵀ` with A (r, in) Kaiming-uniform, B (out, r) zero, and
//! `s = alpha / r` (or `alpha / √r` with rsLoRA).
//!
//! DoRA (`use_dora`; Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", 2024) splits
//! the adapted weight into a direction and a learned per-output magnitude `m` (PEFT's
//! `lora_magnitude_vector`, initialised to the row norms of W):
//! `y = m / ‖W + s·B·A‖_row ⊙ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ) + b`. PEFT detaches the norm in the backward
//! (the paper's §4.3 memory saving); we keep its exact gradient, so the forward pass, the file
//! format and the merge are PEFT's while training follows the true gradient (checked against
//! finite differences like every method).

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::{Tensor, Var};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

pub use super::peft_prefix;
use super::{dropout, PeftLayer, TargetModules};
use crate::model::{ops, FrozenWeight, ForwardCtx, LinearAdapter, Llama};
use crate::schema::{target_modules_field, text, Field, FieldKind};
use crate::{Error, Result};

/// LoRA settings; reads and writes HF peft's `adapter_config.json` keys.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ts_rs::TS)]
pub struct LoraConfig {
    /// Rank of the update.
    #[serde(default = "default_r")]
    pub r: usize,
    /// Scaling numerator: the update is multiplied by `lora_alpha / r`.
    #[serde(default = "default_alpha")]
    pub lora_alpha: f64,
    /// Dropout on the adapter's input during training.
    #[serde(default)]
    pub lora_dropout: f64,
    /// Which linear layers get an adapter: module names (`["q_proj", "v_proj"]`) or
    /// `"all-linear"` (every projection except the LM head).
    #[serde(default = "default_targets")]
    pub target_modules: TargetModules,
    /// rsLoRA: scale by `lora_alpha / √r` instead.
    #[serde(default)]
    pub use_rslora: bool,
    /// Per-module rank overrides (module-name suffix → r), as in peft.
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, usize>,
    /// Per-module alpha overrides, as in peft.
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, f64>,
    /// DoRA: learn a magnitude per output feature on top of the low-rank direction update.
    #[serde(default)]
    pub use_dora: bool,
}

fn default_r() -> usize {
    8
}
fn default_alpha() -> f64 {
    16.0
}
/// PEFT's default targets for Llama-family models (LoRA's and AdaLoRA's).
pub(crate) fn default_targets() -> TargetModules {
    TargetModules::Names(vec!["q_proj".into(), "v_proj".into()])
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            r: default_r(),
            lora_alpha: default_alpha(),
            lora_dropout: 0.0,
            target_modules: default_targets(),
            use_rslora: false,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            use_dora: false,
        }
    }
}

/// Checks `lora_alpha` and `lora_dropout` (LoRA and AdaLoRA); errors name the key.
pub(crate) fn check_alpha_and_dropout(alpha: f64, dropout: f64) -> Result<()> {
    if !(alpha.is_finite() && alpha > 0.0) {
        return Err(Error::config("peft.lora_alpha", "must be a positive number"));
    }
    if !(0.0..1.0).contains(&dropout) {
        return Err(Error::config("peft.lora_dropout", "must be in [0, 1)"));
    }
    Ok(())
}

/// The form field of `lora_dropout` (LoRA and AdaLoRA).
pub(crate) fn dropout_field(default: f64) -> Field {
    Field::new("lora_dropout", FieldKind::Float, default, text("Dropout", "Dropout"), text("Dropout on the adapter's input during training.", "训练时对适配器输入做的 dropout。"))
        .range_excl(0.0, 1.0)
}

impl LoraConfig {
    /// The keys a form shows (lora and qlora).
    pub fn fields() -> Vec<Field> {
        use FieldKind::*;
        let d = LoraConfig::default();
        vec![
            Field::new("r", Int, d.r, text("Rank", "秩"), text("Rank of the low-rank update: larger learns more and costs more.", "低秩更新的秩：越大学得越多，开销也越大。"))
                .range(Some(1.0), Some(4096.0)),
            Field::new("lora_alpha", Float, d.lora_alpha, text("Alpha", "Alpha"), text("Scaling numerator: the update is multiplied by alpha / r (alpha / √r with rsLoRA).", "缩放分子：更新乘以 alpha / r（rsLoRA 时为 alpha / √r）。"))
                .range(Some(1e-9), None),
            dropout_field(d.lora_dropout),
            target_modules_field(&d.target_modules, text("Linear layers that get an adapter: module names (q_proj, v_proj, ...) or all-linear (every projection except the LM head).", "加适配器的线性层：模块名（q_proj、v_proj 等）或 all-linear（除输出头外的所有投影）。")),
            Field::new("use_rslora", Bool, d.use_rslora, text("rsLoRA", "rsLoRA"), text("Scale by alpha / √r instead of alpha / r (stabler at high ranks).", "按 alpha / √r 而不是 alpha / r 缩放（高秩时更稳定）。"))
                .advanced(),
            Field::new("use_dora", Bool, d.use_dora, text("DoRA", "DoRA"), text("Also learn a magnitude per output feature on top of the low-rank direction update.", "在低秩方向更新之外，再为每个输出特征学习一个幅度。"))
                .advanced(),
            Field::new("rank_pattern", NumberMap, &d.rank_pattern, text("Rank per module", "按模块设置秩"), text("Rank overrides by module-name suffix, as in peft.", "按模块名后缀覆盖秩，同 peft。"))
                .advanced(),
            Field::new("alpha_pattern", NumberMap, &d.alpha_pattern, text("Alpha per module", "按模块设置 Alpha"), text("Alpha overrides by module-name suffix, as in peft.", "按模块名后缀覆盖 alpha，同 peft。"))
                .advanced(),
        ]
    }

    /// Checks the values; errors name the key.
    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(Error::config("peft.r", "rank must be at least 1"));
        }
        check_alpha_and_dropout(self.lora_alpha, self.lora_dropout)?;
        if let Some((k, _)) = self.rank_pattern.iter().find(|(_, &r)| r == 0) {
            return Err(Error::config(format!("peft.rank_pattern.{k}"), "rank must be at least 1"));
        }
        self.target_modules.validate()
    }

    /// The entry of a `rank_pattern`/`alpha_pattern` that applies to `module` (its key equals
    /// the module path or is a suffix of it after a dot).
    fn pattern_entry<'a, T: Copy>(map: &'a BTreeMap<String, T>, module: &str) -> Option<(&'a String, T)> {
        map.iter().find(|(k, _)| module == k.as_str() || module.ends_with(&format!(".{k}"))).map(|(k, v)| (k, *v))
    }

    fn pattern<T: Copy>(map: &BTreeMap<String, T>, module: &str) -> Option<T> {
        Self::pattern_entry(map, module).map(|(_, v)| v)
    }

    /// Checks the rank for a module of `inp` inputs and `out` outputs: above `min(inp, out)`
    /// the update B·A is already of full rank, so a larger rank only adds parameters; such a
    /// config is an error naming the module (PEFT accepts it silently).
    pub fn check_rank(&self, module: &str, inp: usize, out: usize) -> Result<()> {
        let (r, _) = self.rank_and_scale(module);
        let full = inp.min(out);
        if r > full {
            let key = match Self::pattern_entry(&self.rank_pattern, module) {
                Some((k, _)) => format!("peft.rank_pattern.{k}"),
                None => "peft.r".to_string(),
            };
            return Err(Error::config(
                key,
                format!("rank {r} is larger than `{module}` ({inp} → {out} features) allows: rank {full} is already full rank there; use at most {full}"),
            ));
        }
        Ok(())
    }

    /// (rank, scale) for one module.
    pub fn rank_and_scale(&self, module: &str) -> (usize, f64) {
        let r = Self::pattern(&self.rank_pattern, module).unwrap_or(self.r);
        let alpha = Self::pattern(&self.alpha_pattern, module).unwrap_or(self.lora_alpha);
        let scale = if self.use_rslora { alpha / (r as f64).sqrt() } else { alpha / r as f64 };
        (r, scale)
    }
}

/// One LoRA-wrapped linear layer's trainable pair.
#[derive(Debug)]
pub struct LoraLayer {
    /// (r, in).
    pub a: Var,
    /// (out, r).
    pub b: Var,
    /// alpha / r (or alpha / √r).
    pub scale: f64,
    /// DoRA's magnitude vector (out,), when `use_dora`.
    pub magnitude: Option<Var>,
    /// DoRA: the squared row norms of the frozen W (it never changes while installed).
    w2: Option<Tensor>,
    /// DoRA: `m / ‖W + s·B·A‖_row` from the last eval-mode forward. Valid until the next
    /// training forward (which clears it: only training changes A, B and m through the
    /// optimizer), so generation computes it once instead of once per token.
    eval_scale: std::sync::Mutex<Option<Tensor>>,
    dropout: f64,
    index: u64,
}

use super::var_tensor as t;

/// The adapter's input in training: `xs` with dropout `p` (seeded per step and layer `index`),
/// or `xs` itself (LoRA and AdaLoRA).
pub(crate) fn adapter_input(xs: &Tensor, p: f64, index: u64, ctx: &ForwardCtx) -> Result<Tensor> {
    Ok(if ctx.train && p > 0.0 { dropout(xs, p, dropout_seed(index, ctx))? } else { xs.clone() })
}

/// In training, `xs·Wᵀ [+ bias] + scale·(x̃·Aᵀ)·Bᵀ` as one op (`ops::lora_linear`), x̃ = `xs`
/// with dropout `p` drawn as [`adapter_input`] draws it: LoRA's and AdaLoRA's (Q ⊙ Λ as A)
/// projection; followed by `then` inside the op where it can be (`ops::lora_linear_then`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn train_product(
    xs: &Tensor,
    weight: &FrozenWeight,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    p: f64,
    index: u64,
    ctx: &ForwardCtx,
    then: ops::Epilogue,
) -> Result<Tensor> {
    Ok(ops::lora_linear_then(xs, weight, bias, ops::LoraPair { a, b, scale, dropout: train_dropout(p, index, ctx) }, then)?)
}

/// [`train_product`] on SwiGLU's product of `g` and `u` (down_proj), made inside the op
/// (`ops::lora_linear_swiglu_then`: the graph keeps g and u, not the product), then `then`.
pub(crate) fn train_product_swiglu(g: &Tensor, u: &Tensor, weight: &FrozenWeight, bias: Option<&Tensor>, pair: ops::LoraPair, then: ops::Epilogue) -> Result<Tensor> {
    Ok(ops::lora_linear_swiglu_then(g, u, weight, bias, pair, then)?)
}

/// The op's dropout for adapted layer `index` in a training pass: (rate `p`, the mask's seed),
/// drawn as [`adapter_input`] draws it; `None` at rate 0.
pub(crate) fn train_dropout(p: f64, index: u64, ctx: &ForwardCtx) -> Option<(f64, u64)> {
    (p > 0.0).then(|| (p, dropout_seed(index, ctx)))
}

/// The seed of adapted layer `index`'s dropout mask in a pass.
fn dropout_seed(index: u64, ctx: &ForwardCtx) -> u64 {
    ctx.seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// `scale·(x·Aᵀ)·Bᵀ` for A (r, in), B (out, r) with plain 2-D matmuls on (tokens, features):
/// one GEMM each instead of one per batch row (and no broadcast to reduce in the backward).
pub(crate) fn low_rank_update(x: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    let (inp, out) = (a.dim(1)?, b.dim(0)?);
    let down = x.reshape(((), inp))?.matmul(&a.t()?)?;
    let up = (down.matmul(&b.t()?)? * scale)?;
    let mut out_dims = x.dims().to_vec();
    if let Some(last) = out_dims.last_mut() {
        *last = out;
    }
    Ok(up.reshape(out_dims)?)
}

impl LoraLayer {
    /// The whole layer where LoRA computes it ([`LinearAdapter::forward_full`]): in training
    /// one op with the frozen product (LoRA, and DoRA's scaled form); DoRA's in evaluation too.
    /// Followed by `then` (inside the op where it can be).
    fn full(&self, xs: &Tensor, weight: &FrozenWeight, bias: Option<&Tensor>, ctx: &ForwardCtx, then: ops::Epilogue) -> Option<Result<Tensor>> {
        let Some(magnitude) = self.magnitude.as_ref() else {
            // Training: the frozen product and the update as one op (`ops::lora_linear`: what
            // the graph keeps is the input and a (tokens, r) product, not three (tokens, out)
            // tensors, and the scaling costs no pass over the output). Inference keeps the
            // separate products (quantized weights multiply faster there).
            if !ctx.train || ctx.generation {
                return None;
            }
            let (a, b) = (t(&self.a, ctx), t(&self.b, ctx));
            return Some(train_product(xs, weight, bias, &a, &b, self.scale, self.dropout, self.index, ctx, then));
        };
        let run = || -> Result<Tensor> {
            // PEFT's form: base(x) + (g − 1)·(x̃·Wᵀ) + g·s·(x̃·Aᵀ)·Bᵀ with g = m / ‖W + s·B·A‖_row
            // and x̃ = dropout(x) (= x when dropout is off, giving g·(x·Wᵀ + update) + b).
            let g = self.dora_scale(magnitude, weight, ctx)?;
            if ctx.train && !ctx.generation {
                // One node (`ops::lora_linear_scaled`): without dropout g·(x·Wᵀ + s·(x·Aᵀ)·Bᵀ),
                // the unscaled sum read back from the output; with it, the form above, keeping
                // one (tokens, out) tensor for g's gradient where the composed form kept seven.
                let (a, b) = (t(&self.a, ctx), t(&self.b, ctx));
                let pair = ops::LoraPair { a: &a, b: &b, scale: self.scale, dropout: train_dropout(self.dropout, self.index, ctx) };
                return Ok(match (bias, then) {
                    (None, ops::Epilogue::Heads(split)) => ops::lora_linear_scaled_heads(xs, weight, pair, &g, split)?,
                    (Some(b), then) => then.apply(ops::lora_linear_scaled(xs, weight, pair, &g)?.broadcast_add(b)?)?,
                    (None, then) => then.apply(ops::lora_linear_scaled(xs, weight, pair, &g)?)?,
                });
            }
            let y = weight.product(xs)?;
            let x = self.dropped(xs, ctx)?;
            let (plain, y_drop) = if ctx.train && self.dropout > 0.0 { (y.clone(), weight.product(&x)?) } else { (y.clone(), y) };
            let mut out = (plain + (ops::channel_scale(&y_drop, &(&g - 1.0)?)? + ops::channel_scale(&self.update(&x, ctx)?, &g)?)?)?;
            if let Some(b) = bias {
                out = out.broadcast_add(b)?;
            }
            Ok(then.apply(out)?)
        };
        Some(run())
    }

    fn dropped(&self, xs: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        adapter_input(xs, self.dropout, self.index, ctx)
    }

    /// `s·(x·Aᵀ)·Bᵀ`.
    fn update(&self, x: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        low_rank_update(x, &t(&self.a, ctx), &t(&self.b, ctx), self.scale)
    }

    /// DoRA's `m / ‖W + s·B·A‖_row`, (out,), without forming W + s·B·A (`ops::dora_row_norm`:
    /// the frozen W gets no gradient, and the norm's backward hands A and B theirs directly).
    fn dora_scale(&self, magnitude: &Var, weight: &FrozenWeight, ctx: &ForwardCtx) -> Result<Tensor> {
        let mut cached = self.eval_scale.lock().unwrap_or_else(|p| p.into_inner());
        if ctx.train {
            *cached = None;
        } else if let Some(g) = cached.as_ref() {
            return Ok(g.clone());
        }
        let (a, b) = (t(&self.a, ctx), t(&self.b, ctx));
        let w2 = match &self.w2 {
            Some(w2) => w2.clone(),
            None => weight.dense()?.to_dtype(a.dtype())?.sqr()?.sum(1)?,
        };
        let norm = ops::dora_row_norm(&a, &b, weight, &w2, self.scale)?;
        let g = (t(magnitude, ctx) / norm)?;
        if !ctx.train {
            *cached = Some(g.clone());
        }
        Ok(g)
    }
}

impl LinearAdapter for LoraLayer {
    fn head_pair(&self, xs: &Tensor, ctx: &ForwardCtx) -> Option<Result<(Tensor, Tensor, Tensor, f64)>> {
        if self.magnitude.is_some() || !ctx.train || ctx.generation {
            return None;
        }
        Some(self.dropped(xs, ctx).map(|x| (x, t(&self.a, ctx), t(&self.b, ctx), self.scale)))
    }

    fn forward(&self, xs: &Tensor, base: Tensor, _w: &FrozenWeight, ctx: &ForwardCtx) -> Result<Tensor> {
        let x = self.dropped(xs, ctx)?;
        Ok((base + self.update(&x, ctx)?)?)
    }

    fn forward_full(&self, xs: &Tensor, weight: &FrozenWeight, bias: Option<&Tensor>, ctx: &ForwardCtx) -> Option<Result<Tensor>> {
        self.full(xs, weight, bias, ctx, ops::Epilogue::Rows)
    }

    fn forward_full_then(&self, xs: &Tensor, weight: &FrozenWeight, bias: Option<&Tensor>, ctx: &ForwardCtx, then: ops::Epilogue) -> Option<Result<Tensor>> {
        self.full(xs, weight, bias, ctx, then)
    }

    /// Training: the frozen product and the update on SwiGLU's product, made inside the op —
    /// LoRA's, and DoRA's without a bias (`ops::lora_linear_scaled_swiglu`, which makes the
    /// product in the op where the scale is its column scale).
    fn forward_swiglu_then(&self, g: &Tensor, u: &Tensor, weight: &FrozenWeight, bias: Option<&Tensor>, ctx: &ForwardCtx, then: ops::Epilogue) -> Option<Result<Tensor>> {
        if !ctx.train || ctx.generation {
            return None;
        }
        let (a, b) = (t(&self.a, ctx), t(&self.b, ctx));
        let pair = ops::LoraPair { a: &a, b: &b, scale: self.scale, dropout: train_dropout(self.dropout, self.index, ctx) };
        match (&self.magnitude, bias) {
            (None, _) => Some(train_product_swiglu(g, u, weight, bias, pair, then)),
            (Some(magnitude), None) => {
                let run = || -> Result<Tensor> {
                    let scale = self.dora_scale(magnitude, weight, ctx)?;
                    Ok(then.apply(ops::lora_linear_scaled_swiglu(g, u, weight, pair, &scale)?)?)
                };
                Some(run())
            }
            (Some(_), Some(_)) => None,
        }
    }

    fn params(&self) -> Vec<(String, Var)> {
        let mut v = vec![("lora_A.weight".into(), self.a.clone()), ("lora_B.weight".into(), self.b.clone())];
        if let Some(m) = &self.magnitude {
            v.push(("lora_magnitude_vector".into(), m.clone()));
        }
        v
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

impl PeftLayer for LoraLayer {
    fn merged(&self, weight: &Tensor, bias: Option<&Tensor>) -> Result<Option<(Tensor, Option<Tensor>)>> {
        let w = (weight + self.delta_weight()?)?;
        let w = match &self.magnitude {
            Some(m) => w.broadcast_mul(&self.dora_scale(m, &FrozenWeight::Dense(weight.clone()), &ForwardCtx { train: true, seed: 0, ..Default::default() })?.unsqueeze(1)?)?,
            None => w,
        };
        Ok(Some((w, bias.cloned())))
    }
}

impl LoraLayer {
    /// The weight update `scale · B·A`, (out, in).
    pub fn delta_weight(&self) -> Result<Tensor> {
        Ok((self.b.as_tensor().matmul(self.a.as_tensor())? * self.scale)?)
    }
}

/// Installs fresh LoRA layers on the targeted linears. Returns `(peft key prefix, layer)` for
/// every wrapped module, e.g. `base_model.model.model.layers.0.self_attn.q_proj`.
pub fn inject(model: &mut Llama, cfg: &LoraConfig, seed: u64) -> Result<Vec<(String, Arc<LoraLayer>)>> {
    cfg.validate()?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let targets = cfg.target_modules.resolve(model)?;
    // Every rank is checked before the model is touched.
    for lin in model.linears().into_iter().filter(|l| targets.contains(l.name())) {
        let (inp, outf) = lin.in_out();
        cfg.check_rank(lin.name(), inp, outf)?;
    }
    let mut out = Vec::new();
    for (index, lin) in model.linears_mut().into_iter().enumerate() {
        if !targets.contains(lin.name()) {
            continue;
        }
        let (inp, outf) = lin.in_out();
        let (r, scale) = cfg.rank_and_scale(lin.name());
        // Kaiming-uniform with a = √5, as nn.Linear and peft: bound = 1/√fan_in.
        let bound = 1.0 / (inp as f32).sqrt();
        let a: Vec<f32> = (0..r * inp).map(|_| (rng.random::<f32>() * 2.0 - 1.0) * bound).collect();
        let dev = &lin.weight().device();
        let dtype = super::param_dtype(lin.weight().dtype());
        let a = Var::from_tensor(&Tensor::from_vec(a, (r, inp), dev)?.to_dtype(dtype)?)?;
        let b = Var::from_tensor(&Tensor::zeros((outf, r), dtype, dev)?)?;
        // DoRA starts with m = ‖W‖_row (B = 0), so the model is unchanged.
        let w2 = if cfg.use_dora { Some(lin.weight().dense()?.to_dtype(dtype)?.sqr()?.sum(1)?) } else { None };
        let magnitude = match &w2 {
            Some(w2) => Some(Var::from_tensor(&w2.sqrt()?)?),
            None => None,
        };
        let layer = Arc::new(LoraLayer { a, b, scale, magnitude, w2, eval_scale: Default::default(), dropout: cfg.lora_dropout, index: index as u64 });
        lin.set_adapter(Some(layer.clone()));
        out.push((peft_prefix(lin), layer));
    }
    Ok(out)
}

/// Installs LoRA layers with given weights (from a saved adapter). `weights` maps PEFT keys
/// (`…q_proj.lora_A.weight`) to tensors; `source` names the file in errors.
pub fn inject_loaded(
    model: &mut Llama,
    cfg: &LoraConfig,
    weights: &std::collections::HashMap<String, Tensor>,
    source: &std::path::Path,
) -> Result<Vec<(String, Arc<LoraLayer>)>> {
    cfg.validate()?;
    let targets = cfg.target_modules.resolve(model)?;
    let mut out = Vec::new();
    let mut used = 0usize;
    for (index, lin) in model.linears_mut().into_iter().enumerate() {
        if !targets.contains(lin.name()) {
            continue;
        }
        let prefix = peft_prefix(lin);
        let get = |which: &str| -> Result<Tensor> {
            let key = format!("{prefix}.{which}.weight");
            weights
                .get(&key)
                .cloned()
                .ok_or_else(|| Error::bad_input(source, None, format!("adapter tensor `{key}` is missing")))
        };
        let (dtype, dev) = (super::param_dtype(lin.weight().dtype()), lin.weight().device());
        let a = get("lora_A")?.to_dtype(dtype)?.to_device(&dev)?;
        let b = get("lora_B")?.to_dtype(dtype)?.to_device(&dev)?;
        let (inp, outf) = lin.in_out();
        let (r, scale) = cfg.rank_and_scale(lin.name());
        if a.dims() != [r, inp] || b.dims() != [outf, r] {
            return Err(Error::bad_input(
                source,
                None,
                format!("{prefix}: lora_A {:?} / lora_B {:?} do not fit r={r}, in={inp}, out={outf}", a.dims(), b.dims()),
            ));
        }
        used += 2;
        let magnitude = if cfg.use_dora {
            let key = format!("{prefix}.lora_magnitude_vector");
            let m = weights.get(&key).ok_or_else(|| Error::bad_input(source, None, format!("adapter tensor `{key}` is missing (use_dora)")))?;
            if m.dims() != [outf] {
                return Err(Error::bad_input(source, None, format!("{key} is {:?}; this model needs [{outf}]", m.dims())));
            }
            Some(Var::from_tensor(&m.to_dtype(dtype)?.to_device(&dev)?)?)
        } else {
            None
        };
        let w2 = if cfg.use_dora { Some(lin.weight().dense()?.to_dtype(dtype)?.sqr()?.sum(1)?) } else { None };
        let layer = Arc::new(LoraLayer {
            a: Var::from_tensor(&a)?,
            b: Var::from_tensor(&b)?,
            scale,
            magnitude,
            w2,
            eval_scale: Default::default(),
            dropout: cfg.lora_dropout,
            index: index as u64,
        });
        lin.set_adapter(Some(layer.clone()));
        out.push((prefix, layer));
    }
    let lora_keys = weights.keys().filter(|k| k.contains(".lora_A.") || k.contains(".lora_B.")).count();
    if used != lora_keys {
        return Err(Error::bad_input(
            source,
            None,
            format!("adapter has {lora_keys} LoRA tensors but its target_modules select {used}: the files do not match"),
        ));
    }
    Ok(out)
}

