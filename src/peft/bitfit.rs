//! BitFit: train only the bias terms.
//!
//! Ben Zaken et al., "BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based
//! Masked Language-models" (2021). Every targeted linear layer trains its bias vector. Most
//! Llama-family models have no biases (Qwen2 has them on q/k/v): there a zero bias is added and
//! trained, which is what BitFit means for such a model. Trainable parameters: the output size
//! of every targeted layer.
//!
//! HF peft has no BitFit, so the format is our own, in PEFT's folder layout:
//! `adapter_config.json` = `{"peft_type": "BITFIT", "target_modules": …, "format_version": 1}`,
//! `adapter_model.safetensors` = `base_model.model.<module>.bias` → the *trained* bias (out,)
//! (for a model with biases, the original bias plus the learned change). Merging writes that
//! bias into the model.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use super::{PeftLayer, TargetModules};
use crate::model::{ops, ForwardCtx, FrozenWeight, LinearAdapter, Llama};
use crate::schema::{target_modules_field, text, Field};
use crate::{Error, Result};

/// BitFit settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ts_rs::TS)]
pub struct BitfitConfig {
    /// Which linear layers train a bias (names or `"all-linear"`, the default).
    #[serde(default = "default_targets")]
    pub target_modules: TargetModules,
}

fn default_targets() -> TargetModules {
    TargetModules::Keyword("all-linear".into())
}

impl Default for BitfitConfig {
    fn default() -> Self {
        BitfitConfig { target_modules: default_targets() }
    }
}

impl BitfitConfig {
    /// The keys a form shows.
    pub fn fields() -> Vec<Field> {
        vec![target_modules_field(
            &BitfitConfig::default().target_modules,
            text("Linear layers whose bias is trained (names or all-linear).", "训练偏置的线性层（模块名或 all-linear）。"),
        )]
    }

    /// Checks the values; errors name the key.
    pub fn validate(&self) -> Result<()> {
        self.target_modules.validate()
    }
}

/// One layer's trainable bias change.
#[derive(Debug)]
pub struct BitfitLayer {
    /// Added to the frozen output, (out,); starts at zero.
    pub delta: Var,
    /// The frozen bias, if the model has one (saved bias = frozen + delta).
    pub frozen: Option<Tensor>,
}

impl LinearAdapter for BitfitLayer {
    fn forward(&self, _xs: &Tensor, base: Tensor, _w: &FrozenWeight, ctx: &ForwardCtx) -> Result<Tensor> {
        Ok(ops::channel_shift(&base, &super::var_tensor(&self.delta, ctx))?)
    }

    fn head_affine(&self, ctx: &ForwardCtx) -> Option<(Option<Tensor>, Option<Tensor>)> {
        (ctx.train && !ctx.generation).then(|| (None, Some(super::var_tensor(&self.delta, ctx))))
    }

    fn params(&self) -> Vec<(String, Var)> {
        vec![("bias".into(), self.delta.clone())]
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

impl BitfitLayer {
    /// The trained bias: frozen bias (or zero) + learned change.
    pub fn trained_bias(&self) -> Result<Tensor> {
        Ok(match &self.frozen {
            Some(b) => (b + self.delta.as_tensor())?,
            None => self.delta.as_tensor().clone(),
        })
    }
}

impl PeftLayer for BitfitLayer {
    fn saved(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(vec![("bias".into(), self.trained_bias()?)])
    }

    fn merged(&self, weight: &Tensor, _bias: Option<&Tensor>) -> Result<Option<(Tensor, Option<Tensor>)>> {
        Ok(Some((weight.clone(), Some(self.trained_bias()?))))
    }
}

/// Installs trainable biases on the targeted linears (zero change, or the saved trained biases
/// from `weights`, whose file `source` names errors).
pub fn inject(
    model: &mut Llama,
    cfg: &BitfitConfig,
    weights: Option<(&HashMap<String, Tensor>, &std::path::Path)>,
) -> Result<Vec<(String, Arc<dyn PeftLayer>)>> {
    cfg.validate()?;
    let targets = cfg.target_modules.resolve(model)?;
    let mut out: Vec<(String, Arc<dyn PeftLayer>)> = Vec::new();
    for lin in model.linears_mut() {
        if !targets.contains(lin.name()) {
            continue;
        }
        let (_, outf) = lin.in_out();
        let prefix = super::peft_prefix(lin);
        let (dev, dtype) = (lin.weight().device(), super::param_dtype(lin.weight().dtype()));
        let frozen = lin.bias().cloned();
        let delta = match weights {
            None => Tensor::zeros(outf, dtype, &dev)?,
            Some((w, source)) => {
                let key = format!("{prefix}.bias");
                let t = w.get(&key).ok_or_else(|| Error::bad_input(source, None, format!("adapter tensor `{key}` is missing")))?;
                if t.dims() != [outf] {
                    return Err(Error::bad_input(source, None, format!("{key} is {:?}; this model needs [{outf}]", t.dims())));
                }
                let t = t.to_dtype(dtype)?.to_device(&dev)?;
                match &frozen {
                    Some(b) => (t - b)?,
                    None => t,
                }
            }
        };
        let layer = Arc::new(BitfitLayer { delta: Var::from_tensor(&delta)?, frozen });
        lin.set_adapter(Some(layer.clone()));
        out.push((prefix, layer));
    }
    if let Some((w, source)) = weights {
        let n = w.keys().filter(|k| k.ends_with(".bias")).count();
        if n != out.len() {
            return Err(Error::bad_input(source, None, format!("adapter has {n} biases but its target_modules select {}", out.len())));
        }
    }
    Ok(out)
}
