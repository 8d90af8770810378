//! IA3: learned rescaling vectors on frozen projections.
//!
//! Liu et al., "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
//! Learning" (2022). Follows HF peft's `tuners/ia3` (config keys, init, key names, merge):
//! * attention projections (default `k_proj`, `v_proj`): the output is scaled,
//!   `y = (x·Wᵀ + b) ⊙ l` with `l` of shape (out, 1);
//! * feed-forward projections (`feedforward_modules`, default `down_proj`): the input is
//!   scaled, `y = (x ⊙ l)·Wᵀ + b` with `l` of shape (1, in).
//!
//! `l` starts at ones (the model is unchanged before training). Trainable parameters: `out` per
//! attention target plus `in` per feed-forward target. Merging multiplies W's rows (and the
//! bias) or columns by `l`. Saved under PEFT's key `base_model.model.<module>.ia3_l`.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use super::{PeftLayer, TargetModules};
use crate::model::{ops, ForwardCtx, FrozenWeight, LinearAdapter, Llama};
use crate::schema::{target_modules_field, text, Field, FieldKind};
use crate::{Error, Result};

/// IA3 settings; reads and writes HF peft's `adapter_config.json` keys.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ts_rs::TS)]
pub struct Ia3Config {
    /// Which linear layers get a scaling vector (names or `"all-linear"`).
    #[serde(default = "default_targets")]
    pub target_modules: TargetModules,
    /// Which of the targets are feed-forward layers (their input is scaled instead of their
    /// output); each must also be a target.
    #[serde(default = "default_ff")]
    pub feedforward_modules: Vec<String>,
    /// Start from ones (peft's default; `false` draws them at random, for tests).
    #[serde(default = "yes")]
    pub init_ia3_weights: bool,
}

fn default_targets() -> TargetModules {
    TargetModules::Names(vec!["k_proj".into(), "v_proj".into(), "down_proj".into()])
}
fn default_ff() -> Vec<String> {
    vec!["down_proj".into()]
}
fn yes() -> bool {
    true
}

impl Default for Ia3Config {
    fn default() -> Self {
        Ia3Config { target_modules: default_targets(), feedforward_modules: default_ff(), init_ia3_weights: true }
    }
}

impl Ia3Config {
    /// The keys a form shows.
    pub fn fields() -> Vec<Field> {
        let d = Ia3Config::default();
        vec![
            target_modules_field(&d.target_modules, text("Linear layers that get a learned scaling vector (names or all-linear).", "学习缩放向量的线性层（模块名或 all-linear）。")),
            Field::new("feedforward_modules", FieldKind::Modules, &d.feedforward_modules, text("Feed-forward modules", "前馈模块"), text("Targets whose input is scaled instead of their output; each must also be a target.", "缩放输入而非输出的目标模块；每个都必须也是目标模块。")),
        ]
    }

    /// Checks the values; errors name the key.
    pub fn validate(&self) -> Result<()> {
        self.target_modules.validate()?;
        if let TargetModules::Names(names) = &self.target_modules {
            for f in &self.feedforward_modules {
                if !names.iter().any(|n| n == f || f.ends_with(&format!(".{n}")) || n.ends_with(&format!(".{f}"))) {
                    return Err(Error::config("peft.feedforward_modules", format!("`{f}` is not in target_modules")));
                }
            }
        }
        Ok(())
    }

    /// Whether `module` (a path or a short name) is one of the feed-forward targets.
    pub fn is_feedforward(&self, module: &str) -> bool {
        self.feedforward_modules.iter().any(|f| module == f || module.ends_with(&format!(".{f}")))
    }
}

/// One IA3-wrapped linear layer.
#[derive(Debug)]
pub struct Ia3Layer {
    /// (out, 1) for attention targets, (1, in) for feed-forward targets.
    pub l: Var,
    /// Scales the input (feed-forward) rather than the output.
    pub feedforward: bool,
}

impl LinearAdapter for Ia3Layer {
    fn forward(&self, _xs: &Tensor, base: Tensor, _w: &FrozenWeight, ctx: &ForwardCtx) -> Result<Tensor> {
        // Attention targets only (feed-forward ones compute in `forward_full`).
        Ok(ops::channel_scale(&base, &super::var_tensor(&self.l, ctx))?)
    }

    fn forward_full(&self, xs: &Tensor, weight: &FrozenWeight, bias: Option<&Tensor>, ctx: &ForwardCtx) -> Option<Result<Tensor>> {
        if !self.feedforward {
            return None;
        }
        let run = || -> Result<Tensor> {
            let scaled = ops::channel_scale(xs, &super::var_tensor(&self.l, ctx))?;
            let y = weight.product(&scaled)?;
            Ok(match bias {
                Some(b) => y.broadcast_add(b)?,
                None => y,
            })
        };
        Some(run())
    }

    fn head_affine(&self, ctx: &ForwardCtx) -> Option<(Option<Tensor>, Option<Tensor>)> {
        // Output scaling only (a feed-forward head scales its input: through the slot).
        (!self.feedforward && ctx.train && !ctx.generation).then(|| (Some(super::var_tensor(&self.l, ctx)), None))
    }

    fn params(&self) -> Vec<(String, Var)> {
        vec![("ia3_l".into(), self.l.clone())]
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

impl PeftLayer for Ia3Layer {
    fn merged(&self, weight: &Tensor, bias: Option<&Tensor>) -> Result<Option<(Tensor, Option<Tensor>)>> {
        let l = self.l.as_tensor();
        if self.feedforward {
            // (out, in) ⊙ (1, in): columns scaled; the bias is applied after the product.
            Ok(Some((weight.broadcast_mul(l)?, bias.cloned())))
        } else {
            let b = match bias {
                Some(b) => Some(b.broadcast_mul(&l.flatten_all()?)?),
                None => None,
            };
            Ok(Some((weight.broadcast_mul(l)?, b)))
        }
    }
}

fn fresh(shape: (usize, usize), init_ones: bool, seed: u64, weight: &FrozenWeight) -> Result<Tensor> {
    let n = shape.0 * shape.1;
    let v: Vec<f32> = if init_ones {
        vec![1.0; n]
    } else {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n).map(|_| 0.5 + rng.random::<f32>()).collect()
    };
    Ok(Tensor::from_vec(v, shape, &weight.device())?.to_dtype(super::param_dtype(weight.dtype()))?)
}

/// Installs IA3 vectors on the targeted linears (fresh, or from `weights` of a saved adapter,
/// whose file `source` names errors). Returns `(peft key prefix, layer)` per module.
pub fn inject(
    model: &mut Llama,
    cfg: &Ia3Config,
    seed: u64,
    weights: Option<(&HashMap<String, Tensor>, &std::path::Path)>,
) -> Result<Vec<(String, Arc<dyn PeftLayer>)>> {
    cfg.validate()?;
    let targets = cfg.target_modules.resolve(model)?;
    let mut out: Vec<(String, Arc<dyn PeftLayer>)> = Vec::new();
    for (index, lin) in model.linears_mut().into_iter().enumerate() {
        if !targets.contains(lin.name()) {
            continue;
        }
        let (inp, outf) = lin.in_out();
        let feedforward = cfg.is_feedforward(lin.name());
        let shape = if feedforward { (1, inp) } else { (outf, 1) };
        let prefix = super::peft_prefix(lin);
        let l = match weights {
            None => fresh(shape, cfg.init_ia3_weights, seed ^ (index as u64).wrapping_mul(0x9E37_79B9), lin.weight())?,
            Some((w, source)) => {
                let key = format!("{prefix}.ia3_l");
                let t = w.get(&key).ok_or_else(|| Error::bad_input(source, None, format!("adapter tensor `{key}` is missing")))?;
                if t.dims() != [shape.0, shape.1] {
                    return Err(Error::bad_input(source, None, format!("{key} is {:?}; this model needs {shape:?}", t.dims())));
                }
                t.to_dtype(super::param_dtype(lin.weight().dtype()))?.to_device(&lin.weight().device())?
            }
        };
        let layer = Arc::new(Ia3Layer { l: Var::from_tensor(&l)?, feedforward });
        lin.set_adapter(Some(layer.clone()));
        out.push((prefix, layer));
    }
    if let Some((w, source)) = weights {
        let n = w.keys().filter(|k| k.ends_with(".ia3_l")).count();
        if n != out.len() {
            return Err(Error::bad_input(source, None, format!("adapter has {n} IA3 vectors but its target_modules select {}", out.len())));
        }
    }
    Ok(out)
}
