//! AdaLoRA: LoRA in SVD form with a rank budget that is reallocated by importance while
//! training.
//!
//! Zhang et al., "AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning"
//! (ICLR 2023). Follows HF peft's `tuners/adalora` (config keys, init, key names, schedule,
//! file format):
//! * each targeted linear gets `P = lora_B` (out, r), `Λ = lora_E` (r, 1) and `Q = lora_A`
//!   (r, in) with `r = init_r`: `y = x·Wᵀ + (dropout(x)·(Q ⊙ Λ)ᵀ)·Pᵀ · lora_alpha / (init_r + 1e-5)`;
//!   Λ starts at zero (the model is unchanged), P and Q at N(0, 0.02²);
//! * the loss gets `orth_reg_weight × mean over all P and Q of ‖PᵀP − I‖_F, ‖QQᵀ − I‖_F`
//!   (added per micro-batch divided by the accumulation steps, so once per optimizer step; the
//!   reported training loss is the cross-entropy alone);
//! * after each optimizer step (0-based step t), the rank allocator (PEFT's `RankAllocator`):
//!   sensitivity `I = |p ⊙ ∇p|` (the step's clipped gradient, the updated value) for every
//!   entry of P, Λ, Q, smoothed `Ī ← β₁Ī + (1−β₁)I` and uncertainty `Ū ← β₂Ū + (1−β₂)|I − Ī|`
//!   while `t < total_step − tfinal`; a triplet's score is `s(Λᵢ) + mean_j s(Qᵢⱼ) + mean_j s(Pⱼᵢ)`
//!   with `s = Ī ⊙ Ū`. The budget is `init_r · n` up to `tinit`, then falls cubically,
//!   `b(t) = ⌊(b₀ − b_T)(1 − (t − tinit)/(T − tfinal − tinit))³ + b_T⌋` with `b_T = target_r · n`,
//!   and from `T − tfinal` on it is `b_T`. Every `deltaT` steps in between (and once at
//!   `T − tfinal`) the Λ entries whose score is at most the `(b₀ − b)`-th smallest are zeroed;
//!   after `T − tfinal` that mask is re-applied every step. `T = total_step`, by default the
//!   run's number of optimizer steps.
//!
//! Trainable parameters: `init_r · (in + out + 1)` per target (masked triplets stay in the
//! optimizer). Saved in PEFT's ADALORA format: `base_model.model.<module>.lora_A` (k, in),
//! `lora_B` (out, k), `lora_E` (k, 1) with only the k kept triplets, and `rank_pattern`
//! (`<module>.lora_E` → kept flags) in `adapter_config.json`; loading resizes every module to
//! its kept rank (0 allowed) and keeps the scale `lora_alpha / (init_r + 1e-5)`. Merging adds
//! `P·(Q ⊙ Λ) · scale` to W.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Tensor, Var};
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use super::{peft_prefix, var_tensor as t, PeftLayer, TargetModules};
use crate::model::{ops, ForwardCtx, FrozenWeight, LinearAdapter, Llama};
use crate::schema::{target_modules_field, text, Field, FieldKind};
use crate::{Error, Result};

/// AdaLoRA settings; reads and writes HF peft's `adapter_config.json` keys.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ts_rs::TS)]
pub struct AdaLoraConfig {
    /// Rank every target starts with.
    #[serde(default = "default_init_r")]
    pub init_r: usize,
    /// Average rank per target after the budget has shrunk.
    #[serde(default = "default_target_r")]
    pub target_r: usize,
    /// Steps of training before the budget starts to shrink.
    #[serde(default)]
    pub tinit: usize,
    /// Final steps with the budget fixed at `target_r` (the mask no longer changes).
    #[serde(default)]
    pub tfinal: usize,
    /// Steps between two budget allocations.
    #[serde(default = "one", rename = "deltaT")]
    pub delta_t: usize,
    /// EMA factor of the sensitivity.
    #[serde(default = "default_beta")]
    pub beta1: f64,
    /// EMA factor of the uncertainty.
    #[serde(default = "default_beta")]
    pub beta2: f64,
    /// Weight of the orthogonality penalty on P and Q.
    #[serde(default = "default_orth")]
    pub orth_reg_weight: f64,
    /// Length of the schedule in optimizer steps; unset = the run's number of steps.
    #[serde(default)]
    #[ts(type = "number | null")]
    pub total_step: Option<usize>,
    /// Scale numerator: the update is multiplied by `lora_alpha / init_r`.
    #[serde(default = "default_alpha")]
    pub lora_alpha: f64,
    /// Dropout on the adapter's input during training.
    #[serde(default)]
    pub lora_dropout: f64,
    /// Which linear layers get an adapter (names or `"all-linear"`).
    #[serde(default = "super::lora::default_targets")]
    pub target_modules: TargetModules,
    /// Kept triplets per module (`<module>.lora_E` → flags), as the allocator left them;
    /// written when saving, read when loading.
    #[serde(default)]
    #[ts(type = "Record<string, boolean[]> | null")]
    pub rank_pattern: Option<BTreeMap<String, Vec<bool>>>,
}

fn default_init_r() -> usize {
    12
}
fn default_target_r() -> usize {
    8
}
fn one() -> usize {
    1
}
fn default_beta() -> f64 {
    0.85
}
fn default_orth() -> f64 {
    0.5
}
fn default_alpha() -> f64 {
    8.0
}

impl Default for AdaLoraConfig {
    fn default() -> Self {
        AdaLoraConfig {
            init_r: default_init_r(),
            target_r: default_target_r(),
            tinit: 0,
            tfinal: 0,
            delta_t: 1,
            beta1: default_beta(),
            beta2: default_beta(),
            orth_reg_weight: default_orth(),
            total_step: None,
            lora_alpha: default_alpha(),
            lora_dropout: 0.0,
            target_modules: super::lora::default_targets(),
            rank_pattern: None,
        }
    }
}

impl AdaLoraConfig {
    /// The keys a form shows.
    pub fn fields() -> Vec<Field> {
        use FieldKind::*;
        let d = AdaLoraConfig::default();
        vec![
            Field::new("init_r", Int, d.init_r, text("Initial rank", "初始秩"), text("Rank every targeted layer starts with.", "每个目标层开始时的秩。"))
                .range(Some(1.0), Some(4096.0)),
            Field::new("target_r", Int, d.target_r, text("Target rank", "目标秩"), text("Average rank per layer once the budget has shrunk; important layers keep more.", "预算收缩后每层的平均秩；重要的层保留更多。"))
                .range(Some(1.0), Some(4096.0)),
            Field::new("lora_alpha", Float, d.lora_alpha, text("Alpha", "Alpha"), text("Scaling numerator: the update is multiplied by alpha / init_r.", "缩放分子：更新乘以 alpha / init_r。"))
                .range(Some(1e-9), None),
            target_modules_field(&d.target_modules, text("Linear layers that get an adapter: module names or all-linear.", "加适配器的线性层：模块名或 all-linear。")),
            Field::new("tinit", Int, d.tinit, text("Warm-up steps", "预热步数"), text("Steps before the budget starts to shrink.", "预算开始收缩前的步数。"))
                .range(Some(0.0), None)
                .advanced(),
            Field::new("tfinal", Int, d.tfinal, text("Final steps", "最终步数"), text("Last steps with the ranks fixed at the target budget.", "最后这些步的秩固定在目标预算。"))
                .range(Some(0.0), None)
                .advanced(),
            Field::new("deltaT", Int, d.delta_t, text("Allocation interval", "分配间隔"), text("Steps between two rank allocations.", "两次秩分配之间的步数。"))
                .range(Some(1.0), None)
                .advanced(),
            Field::new("orth_reg_weight", Float, d.orth_reg_weight, text("Orthogonality weight", "正交正则权重"), text("Weight of the penalty keeping P and Q orthogonal (SVD form).", "使 P、Q 保持正交（SVD 形式）的惩罚权重。"))
                .range(Some(0.0), None)
                .advanced(),
            Field::new("beta1", Float, d.beta1, text("Sensitivity EMA", "敏感度 EMA"), text("Smoothing of the importance (sensitivity) estimate.", "重要性（敏感度）估计的平滑系数。"))
                .range_excl(0.0, 1.0)
                .advanced(),
            Field::new("beta2", Float, d.beta2, text("Uncertainty EMA", "不确定性 EMA"), text("Smoothing of the uncertainty estimate.", "不确定性估计的平滑系数。"))
                .range_excl(0.0, 1.0)
                .advanced(),
            super::lora::dropout_field(d.lora_dropout).advanced(),
        ]
    }

    /// Checks the values; errors name the key.
    pub fn validate(&self) -> Result<()> {
        if self.init_r == 0 {
            return Err(Error::config("peft.init_r", "rank must be at least 1"));
        }
        if self.target_r == 0 || self.target_r > self.init_r {
            return Err(Error::config("peft.target_r", format!("must be between 1 and init_r ({})", self.init_r)));
        }
        if self.delta_t == 0 {
            return Err(Error::config("peft.deltaT", "must be at least 1"));
        }
        for (key, b) in [("peft.beta1", self.beta1), ("peft.beta2", self.beta2)] {
            if !(b > 0.0 && b < 1.0) {
                return Err(Error::config(key, "must be in (0, 1)"));
            }
        }
        if !(self.orth_reg_weight.is_finite() && self.orth_reg_weight >= 0.0) {
            return Err(Error::config("peft.orth_reg_weight", "must be 0 or more"));
        }
        super::lora::check_alpha_and_dropout(self.lora_alpha, self.lora_dropout)?;
        if let Some(total) = self.total_step {
            if total == 0 || self.tinit + self.tfinal >= total {
                return Err(Error::config(
                    "peft.total_step",
                    format!("tinit ({}) + tfinal ({}) leave no steps to reallocate ranks in {total} steps: lower them or train longer", self.tinit, self.tfinal),
                ));
            }
        }
        if let Some((k, v)) = self.rank_pattern.iter().flatten().find(|(_, v)| v.len() != self.init_r) {
            return Err(Error::config(format!("peft.rank_pattern.{k}"), format!("{} flags for init_r {}", v.len(), self.init_r)));
        }
        self.target_modules.validate()
    }

    /// `init_r` above a module's full rank `min(inp, out)` only adds parameters: a config
    /// error naming the module.
    pub fn check_rank(&self, module: &str, inp: usize, out: usize) -> Result<()> {
        let full = inp.min(out);
        if self.init_r > full {
            return Err(Error::config(
                "peft.init_r",
                format!("rank {} is larger than `{module}` ({inp} → {out} features) allows: rank {full} is already full rank there; use at most {full}", self.init_r),
            ));
        }
        Ok(())
    }

    /// The adapter's scale `lora_alpha / (init_r + 1e-5)` (PEFT's `scaling / ranknum`).
    pub fn scale(&self) -> f64 {
        self.lora_alpha / (self.init_r as f64 + 1e-5)
    }

    /// This config with the schedule's length filled in (the run's optimizer steps) when it
    /// was left unset.
    pub fn for_steps(&self, steps: usize) -> AdaLoraConfig {
        AdaLoraConfig { total_step: Some(self.total_step.unwrap_or(steps)), ..self.clone() }
    }

    /// Budget (kept triplets over all targets) and whether to mask at 0-based step `step`, for
    /// `n` targets (PEFT's `budget_schedule`).
    pub fn budget(&self, step: usize, n: usize) -> (usize, bool) {
        let (init, target) = (self.init_r * n, self.target_r * n);
        let total = self.total_step.unwrap_or(self.tinit + self.tfinal + 1);
        if step <= self.tinit {
            (init, false)
        } else if step > total - self.tfinal {
            (target, true)
        } else {
            let span = (total - self.tfinal - self.tinit) as f64;
            let mul = 1.0 - (step - self.tinit) as f64 / span;
            (((init - target) as f64 * mul.powi(3) + target as f64) as usize, step.is_multiple_of(self.delta_t))
        }
    }

    /// The `rank_pattern` key of a module (`model.layers.0.self_attn.q_proj.lora_E`).
    pub fn pattern_key(module: &str) -> String {
        format!("{module}.lora_E")
    }

    /// This config with `rank_pattern` keys in PEFT's current form: an adapter name after
    /// `lora_E` (`….lora_E.default`, as allocators name parameters) is dropped.
    pub fn normalized(mut self) -> AdaLoraConfig {
        if let Some(p) = self.rank_pattern.take() {
            let fixed = p
                .into_iter()
                .map(|(k, v)| match k.rfind(".lora_E.") {
                    Some(i) => (k[..i + ".lora_E".len()].to_string(), v),
                    None => (k, v),
                })
                .collect();
            self.rank_pattern = Some(fixed);
        }
        self
    }

    /// Kept rank of `module` in a saved adapter: its `rank_pattern` flags, or `init_r`.
    pub fn saved_rank(&self, module: &str) -> usize {
        match self.rank_pattern.as_ref().and_then(|p| p.get(&Self::pattern_key(module))) {
            Some(flags) => flags.iter().filter(|&&k| k).count(),
            None => self.init_r,
        }
    }
}

/// One AdaLoRA-wrapped linear layer: the SVD-form triplets.
#[derive(Debug)]
pub struct AdaLoraLayer {
    /// Q, (r, in).
    pub a: Var,
    /// P, (out, r).
    pub b: Var,
    /// Λ, (r, 1).
    pub e: Var,
    /// `lora_alpha / (init_r + 1e-5)`.
    pub scale: f64,
    /// Triplets the allocator keeps (None: all); saving writes only these.
    kept: Mutex<Option<Vec<bool>>>,
    dropout: f64,
    index: u64,
}

impl AdaLoraLayer {
    fn rank(&self) -> usize {
        self.a.dims()[0]
    }

    /// `Q ⊙ Λ`, (r, in).
    fn scaled_a(&self, ctx: &ForwardCtx) -> Result<Tensor> {
        Ok(t(&self.a, ctx).broadcast_mul(&t(&self.e, ctx))?)
    }

    /// The weight update `P·(Q ⊙ Λ) · scale`, (out, in).
    pub fn delta_weight(&self) -> Result<Tensor> {
        let ctx = ForwardCtx::default();
        Ok((t(&self.b, &ctx).matmul(&self.scaled_a(&ctx)?)? * self.scale)?)
    }

    /// The kept flags (None: every triplet).
    pub fn kept(&self) -> Option<Vec<bool>> {
        self.kept.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_kept(&self, kept: Option<Vec<bool>>) {
        *self.kept.lock().unwrap_or_else(|p| p.into_inner()) = kept;
    }

    /// Zeroes Λ where a triplet is not kept.
    fn apply_mask(&self, kept: &[bool]) -> Result<()> {
        let e = self.e.as_tensor();
        let mask: Vec<f32> = kept.iter().map(|&k| if k { 1.0 } else { 0.0 }).collect();
        let mask = Tensor::from_vec(mask, (kept.len(), 1), e.device())?.to_dtype(e.dtype())?;
        self.e.set(&(e * mask)?)?;
        Ok(())
    }
}

impl AdaLoraLayer {
    /// [`LinearAdapter::forward_full`]'s op, followed by `then`.
    fn full(&self, xs: &Tensor, weight: &FrozenWeight, bias: Option<&Tensor>, ctx: &ForwardCtx, then: ops::Epilogue) -> Option<Result<Tensor>> {
        if !ctx.train || ctx.generation || self.rank() == 0 {
            return None;
        }
        let run = || -> Result<Tensor> {
            let (a, b) = (self.scaled_a(ctx)?, t(&self.b, ctx));
            super::lora::train_product(xs, weight, bias, &a, &b, self.scale, self.dropout, self.index, ctx, then)
        };
        Some(run())
    }
}

impl LinearAdapter for AdaLoraLayer {
    /// Training: the frozen product and the update `s·(x̃·(Q ⊙ Λ)ᵀ)·Pᵀ` as one op, LoRA's
    /// (`ops::lora_linear`, with Q ⊙ Λ as its A: Λ's gradient comes through it).
    fn forward_full(&self, xs: &Tensor, weight: &FrozenWeight, bias: Option<&Tensor>, ctx: &ForwardCtx) -> Option<Result<Tensor>> {
        self.full(xs, weight, bias, ctx, ops::Epilogue::Rows)
    }

    fn forward_full_then(&self, xs: &Tensor, weight: &FrozenWeight, bias: Option<&Tensor>, ctx: &ForwardCtx, then: ops::Epilogue) -> Option<Result<Tensor>> {
        self.full(xs, weight, bias, ctx, then)
    }

    /// Training: LoRA's op on SwiGLU's product (`ops::lora_linear_swiglu`), Q ⊙ Λ as its A.
    fn forward_swiglu_then(&self, g: &Tensor, u: &Tensor, weight: &FrozenWeight, bias: Option<&Tensor>, ctx: &ForwardCtx, then: ops::Epilogue) -> Option<Result<Tensor>> {
        if !ctx.train || ctx.generation || self.rank() == 0 {
            return None;
        }
        let run = || -> Result<Tensor> {
            let (a, b) = (self.scaled_a(ctx)?, t(&self.b, ctx));
            let pair = ops::LoraPair { a: &a, b: &b, scale: self.scale, dropout: super::lora::train_dropout(self.dropout, self.index, ctx) };
            super::lora::train_product_swiglu(g, u, weight, bias, pair, then)
        };
        Some(run())
    }

    fn forward(&self, xs: &Tensor, base: Tensor, _w: &FrozenWeight, ctx: &ForwardCtx) -> Result<Tensor> {
        if self.rank() == 0 {
            return Ok(base);
        }
        let x = super::lora::adapter_input(xs, self.dropout, self.index, ctx)?;
        Ok((base + super::lora::low_rank_update(&x, &self.scaled_a(ctx)?, &t(&self.b, ctx), self.scale)?)?)
    }

    fn params(&self) -> Vec<(String, Var)> {
        vec![("lora_A".into(), self.a.clone()), ("lora_B".into(), self.b.clone()), ("lora_E".into(), self.e.clone())]
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

impl PeftLayer for AdaLoraLayer {
    fn saved(&self) -> Result<Vec<(String, Tensor)>> {
        let (a, b, e) = (&self.a.as_detached_tensor(), &self.b.as_detached_tensor(), &self.e.as_detached_tensor());
        let Some(kept) = self.kept() else {
            return Ok(vec![("lora_A".into(), a.clone()), ("lora_B".into(), b.clone()), ("lora_E".into(), e.clone())]);
        };
        let idx: Vec<u32> = kept.iter().enumerate().filter(|(_, &k)| k).map(|(i, _)| i as u32).collect();
        let (rows, cols) = if idx.is_empty() {
            // PEFT writes empty (0, in) / (out, 0) / (0, 1) tensors for a module with no rank left.
            (Tensor::zeros((0, a.dim(1)?), a.dtype(), a.device())?, Tensor::zeros((b.dim(0)?, 0), b.dtype(), b.device())?)
        } else {
            let i = Tensor::from_vec(idx.clone(), idx.len(), a.device())?;
            (a.index_select(&i, 0)?, b.index_select(&i, 1)?)
        };
        let e = if idx.is_empty() {
            Tensor::zeros((0, 1), e.dtype(), e.device())?
        } else {
            e.index_select(&Tensor::from_vec(idx.clone(), idx.len(), e.device())?, 0)?
        };
        Ok(vec![("lora_A".into(), rows), ("lora_B".into(), cols), ("lora_E".into(), e)])
    }

    fn merged(&self, weight: &Tensor, bias: Option<&Tensor>) -> Result<Option<(Tensor, Option<Tensor>)>> {
        if self.rank() == 0 {
            return Ok(Some((weight.clone(), bias.cloned())));
        }
        Ok(Some(((weight + self.delta_weight()?.to_dtype(weight.dtype())?)?, bias.cloned())))
    }
}

/// Checks every target's `init_r` against the layer's full rank before anything is installed.
fn check_ranks(model: &Llama, cfg: &AdaLoraConfig, targets: &std::collections::BTreeSet<String>) -> Result<()> {
    for lin in model.linears().into_iter().filter(|l| targets.contains(l.name())) {
        let (inp, out) = lin.in_out();
        cfg.check_rank(lin.name(), inp, out)?;
    }
    Ok(())
}

/// Installs fresh AdaLoRA layers (Λ = 0; P, Q ~ N(0, 0.02²)); with a `rank_pattern` in the
/// config, its unkept triplets start masked.
pub fn inject(model: &mut Llama, cfg: &AdaLoraConfig, seed: u64) -> Result<Vec<(String, Arc<AdaLoraLayer>)>> {
    cfg.validate()?;
    let targets = cfg.target_modules.resolve(model)?;
    check_ranks(model, cfg, &targets)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let r = cfg.init_r;
    let mut out = Vec::new();
    for (index, lin) in model.linears_mut().into_iter().enumerate() {
        if !targets.contains(lin.name()) {
            continue;
        }
        let (inp, outf) = lin.in_out();
        let (dev, dtype) = (lin.weight().device(), super::param_dtype(lin.weight().dtype()));
        let mut draw = |n: usize, shape: (usize, usize)| -> Result<Var> {
            let v = super::normal_samples(&mut rng, n, 0.02);
            Ok(Var::from_tensor(&Tensor::from_vec(v, shape, &dev)?.to_dtype(dtype)?)?)
        };
        let a = draw(r * inp, (r, inp))?;
        let b = draw(outf * r, (outf, r))?;
        let e = Var::from_tensor(&Tensor::zeros((r, 1), dtype, &dev)?)?;
        // (validate checked every pattern's length)
        let kept = cfg.rank_pattern.as_ref().and_then(|p| p.get(&AdaLoraConfig::pattern_key(lin.name()))).cloned();
        let layer = Arc::new(AdaLoraLayer { a, b, e, scale: cfg.scale(), kept: Mutex::new(kept), dropout: cfg.lora_dropout, index: index as u64 });
        lin.set_adapter(Some(layer.clone()));
        out.push((peft_prefix(lin), layer));
    }
    Ok(out)
}

/// Installs AdaLoRA layers from a saved adapter: each module at its kept rank (from the
/// config's `rank_pattern`, else `init_r`), scale from `init_r`. `source` names the file.
pub fn inject_loaded(
    model: &mut Llama,
    cfg: &AdaLoraConfig,
    weights: &HashMap<String, Tensor>,
    source: &std::path::Path,
) -> Result<Vec<(String, Arc<AdaLoraLayer>)>> {
    cfg.validate()?;
    let targets = cfg.target_modules.resolve(model)?;
    if let Some(k) = cfg.rank_pattern.iter().flatten().map(|(k, _)| k).find(|k| !targets.iter().any(|t| AdaLoraConfig::pattern_key(t) == **k)) {
        return Err(Error::bad_input(source, None, format!("adapter_config.json's rank_pattern names `{k}`, which is not one of the adapter's target modules on this model")));
    }
    let mut out = Vec::new();
    let mut used = 0usize;
    for (index, lin) in model.linears_mut().into_iter().enumerate() {
        if !targets.contains(lin.name()) {
            continue;
        }
        let prefix = peft_prefix(lin);
        let (inp, outf) = lin.in_out();
        let k = cfg.saved_rank(lin.name());
        let (dev, dtype) = (lin.weight().device(), super::param_dtype(lin.weight().dtype()));
        let mut get = |which: &str, shape: [usize; 2]| -> Result<Var> {
            let key = format!("{prefix}.{which}");
            let t = weights.get(&key).ok_or_else(|| Error::bad_input(source, None, format!("adapter tensor `{key}` is missing")))?;
            if t.dims() != shape {
                return Err(Error::bad_input(source, None, format!("{key} is {:?}; rank {k} on this model needs {shape:?}", t.dims())));
            }
            used += 1;
            Ok(Var::from_tensor(&t.to_dtype(dtype)?.to_device(&dev)?)?)
        };
        let a = get("lora_A", [k, inp])?;
        let b = get("lora_B", [outf, k])?;
        let e = get("lora_E", [k, 1])?;
        let layer = Arc::new(AdaLoraLayer { a, b, e, scale: cfg.scale(), kept: Mutex::new(None), dropout: cfg.lora_dropout, index: index as u64 });
        lin.set_adapter(Some(layer.clone()));
        out.push((prefix, layer));
    }
    let ada_keys = weights.keys().filter(|k| k.ends_with(".lora_A") || k.ends_with(".lora_B") || k.ends_with(".lora_E")).count();
    if used != ada_keys {
        return Err(Error::bad_input(source, None, format!("adapter has {ada_keys} AdaLoRA tensors but its target_modules select {used}: the files do not match")));
    }
    Ok(out)
}

/// PEFT's `RankAllocator` over an adapter's AdaLoRA layers (see the module documentation).
#[derive(Debug)]
pub struct Allocator {
    cfg: AdaLoraConfig,
    /// (HF module path, layer).
    layers: Vec<(String, Arc<AdaLoraLayer>)>,
    /// Per trainable key (`<prefix>.lora_A`, …): (smoothed sensitivity, uncertainty).
    ema: Mutex<HashMap<String, (Tensor, Tensor)>>,
}

/// Prefix of the allocator's tensors in `trainable_state.safetensors`.
const STATE_PREFIX: &str = "adalora_state.";

impl Allocator {
    /// An allocator for `layers` (`(PEFT prefix, layer)`), with the schedule of `cfg`.
    pub fn new(cfg: &AdaLoraConfig, layers: &[(String, Arc<AdaLoraLayer>)]) -> Self {
        let layers = layers.iter().map(|(p, l)| (p.trim_start_matches("base_model.model.").to_string(), l.clone())).collect();
        Allocator { cfg: cfg.clone(), layers, ema: Mutex::new(HashMap::new()) }
    }

    /// The kept flags of every module that has been masked (`rank_pattern`), or None before the
    /// first allocation.
    pub fn rank_pattern(&self) -> Option<BTreeMap<String, Vec<bool>>> {
        let pattern: BTreeMap<String, Vec<bool>> =
            self.layers.iter().filter_map(|(m, l)| l.kept().map(|k| (AdaLoraConfig::pattern_key(m), k))).collect();
        (!pattern.is_empty()).then_some(pattern)
    }

    /// `orth_reg_weight ×` the mean of `‖QQᵀ − I‖_F` and `‖PᵀP − I‖_F` over every layer (None
    /// when the weight is 0).
    pub fn regularizer(&self, ctx: &ForwardCtx) -> Result<Option<Tensor>> {
        if self.cfg.orth_reg_weight == 0.0 || self.layers.is_empty() {
            return Ok(None);
        }
        let mut total: Option<Tensor> = None;
        let mut n = 0usize;
        for (_, l) in &self.layers {
            let (a, b) = (t(&l.a, ctx), t(&l.b, ctx));
            let r = a.dim(0)?;
            n += 2;
            if r == 0 {
                continue;
            }
            let eye = Tensor::eye(r, a.dtype(), a.device())?;
            for cov in [a.matmul(&a.t()?)?, b.t()?.matmul(&b)?] {
                let fro = (cov - &eye)?.sqr()?.sum_all()?.sqrt()?;
                total = Some(match total {
                    Some(s) => (s + fro)?,
                    None => fro,
                });
            }
        }
        Ok(total.map(|s| s * (self.cfg.orth_reg_weight / n as f64)).transpose()?)
    }

    /// After optimizer step `step` (0-based): update the importance estimates from `grads`
    /// (trainable key → the step's gradient) and mask to the budget (PEFT's
    /// `update_and_allocate`).
    pub fn after_step(&self, step: usize, grads: &HashMap<String, Tensor>) -> Result<()> {
        let total = self.cfg.total_step.unwrap_or(self.cfg.tinit + self.cfg.tfinal + 1);
        let end = total.saturating_sub(self.cfg.tfinal);
        if step < end {
            self.update_ipt(grads)?;
            let (budget, mask) = self.cfg.budget(step, self.layers.len());
            if mask {
                self.mask_to_budget(budget)?;
            }
        } else if step == end {
            // As PEFT: no new estimate at this step, a final mask, then the estimates go.
            self.mask_to_budget(self.cfg.budget(step, self.layers.len()).0)?;
            self.ema.lock().unwrap_or_else(|p| p.into_inner()).clear();
        } else {
            for (_, l) in &self.layers {
                if let Some(k) = l.kept() {
                    l.apply_mask(&k)?;
                }
            }
        }
        Ok(())
    }

    fn update_ipt(&self, grads: &HashMap<String, Tensor>) -> Result<()> {
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        let mut ema = self.ema.lock().unwrap_or_else(|p| p.into_inner());
        for (m, l) in &self.layers {
            for (suffix, v) in l.params() {
                let key = format!("base_model.model.{m}.{suffix}");
                let Some(g) = grads.get(&key) else { continue };
                // Values only: the estimates outlive the step and must hold no graph.
                let ipt = (v.as_detached_tensor() * g.detach())?.abs()?;
                let (avg, unc) = match ema.remove(&key) {
                    Some((avg, unc)) => (avg, unc),
                    None => (ipt.zeros_like()?, ipt.zeros_like()?),
                };
                let avg = ((avg * b1)? + (&ipt * (1.0 - b1))?)?;
                let unc = ((unc * b2)? + ((ipt - &avg)?.abs()? * (1.0 - b2))?)?;
                ema.insert(key, (avg, unc));
            }
        }
        Ok(())
    }

    /// The element score `Ī ⊙ Ū` of one trainable tensor (zeros before any update).
    fn score(&self, ema: &HashMap<String, (Tensor, Tensor)>, key: &str, like: &Var) -> Result<Tensor> {
        Ok(match ema.get(key) {
            Some((avg, unc)) => (avg * unc)?.to_dtype(DType::F32)?,
            None => Tensor::zeros(like.dims(), DType::F32, like.device())?,
        })
    }

    fn mask_to_budget(&self, budget: usize) -> Result<()> {
        let ema = self.ema.lock().unwrap_or_else(|p| p.into_inner());
        let mut scores: Vec<Vec<f32>> = Vec::with_capacity(self.layers.len());
        for (m, l) in &self.layers {
            let key = |s: &str| format!("base_model.model.{m}.{s}");
            let se = self.score(&ema, &key("lora_E"), &l.e)?.flatten_all()?;
            let sa = self.score(&ema, &key("lora_A"), &l.a)?.mean(1)?;
            let sb = self.score(&ema, &key("lora_B"), &l.b)?.mean(0)?;
            scores.push(((se + sa)? + sb)?.to_vec1::<f32>()?);
        }
        drop(ema);
        let init: usize = self.layers.iter().map(|(_, l)| l.rank()).sum();
        let k = init.saturating_sub(budget);
        if k == 0 {
            return Ok(());
        }
        let mut all: Vec<f32> = scores.iter().flatten().copied().collect();
        all.sort_by(|a, b| a.total_cmp(b));
        let threshold = all[k.min(all.len()) - 1];
        for ((_, l), s) in self.layers.iter().zip(&scores) {
            let kept: Vec<bool> = s.iter().map(|&v| v > threshold).collect();
            l.apply_mask(&kept)?;
            l.set_kept(Some(kept));
        }
        Ok(())
    }

    /// The allocator's state as tensors for `trainable_state.safetensors` (exact resume): the
    /// smoothed estimates and the kept flags.
    pub fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for (k, (avg, unc)) in self.ema.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            out.push((format!("{STATE_PREFIX}ipt.{k}"), avg.clone()));
            out.push((format!("{STATE_PREFIX}unc.{k}"), unc.clone()));
        }
        for (m, l) in &self.layers {
            if let Some(kept) = l.kept() {
                let v: Vec<f32> = kept.iter().map(|&k| if k { 1.0 } else { 0.0 }).collect();
                out.push((format!("{STATE_PREFIX}kept.{m}"), Tensor::from_vec(v, kept.len(), &candle_core::Device::Cpu)?));
            }
        }
        Ok(out)
    }

    /// Restores [`state`](Self::state) (missing entries: nothing estimated or masked yet).
    pub fn restore(&self, saved: &HashMap<String, Tensor>) -> Result<()> {
        let mut ema = self.ema.lock().unwrap_or_else(|p| p.into_inner());
        ema.clear();
        for (k, avg) in saved {
            if let Some(key) = k.strip_prefix(&format!("{STATE_PREFIX}ipt.")) {
                let unc = saved
                    .get(&format!("{STATE_PREFIX}unc.{key}"))
                    .ok_or_else(|| Error::Msg(format!("checkpoint has `{k}` without its uncertainty")))?;
                ema.insert(key.to_string(), (avg.clone(), unc.clone()));
            }
        }
        for (m, l) in &self.layers {
            let kept = match saved.get(&format!("{STATE_PREFIX}kept.{m}")) {
                Some(t) => Some(t.to_dtype(DType::F32)?.to_vec1::<f32>()?.into_iter().map(|v| v > 0.5).collect()),
                None => None,
            };
            l.set_kept(kept);
        }
        Ok(())
    }
}
