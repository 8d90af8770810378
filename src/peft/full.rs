//! Full fine-tuning: every weight of the model trains.
//!
//! Not a PEFT method, but the baseline every PEFT paper compares against, and what a user with
//! a small model and enough memory often wants. Every linear layer's weight (and bias, where
//! the model has one), every RMSNorm weight and the token embedding (which a tied LM head
//! shares) become trainable copies in the compute dtype; quantized (GGUF) weights are
//! dequantized for it. The frozen base stays as it was, beside the copies: removing the
//! "adapter" gives the base back, and base-vs-tuned comparisons work as for any method.
//!
//! Trainable parameters: all of the model's (`Llama::num_params`, a tied head counted once),
//! less the embedding (and an untied LM head) with `train_embeddings = false`, less the norms
//! with `train_norms = false`. Memory: AdamW keeps two moments per parameter and training a
//! gradient, so about 16 bytes per parameter in f32 before activations — the estimate warns.
//!
//! HF peft has no such method, so the format is our own, in PEFT's folder layout:
//! `adapter_config.json` = `{"peft_type": "FULL", "format_version": 1, "train_embeddings": …,
//! "train_norms": …}`, `adapter_model.safetensors` = every trained tensor under
//! `base_model.model.<HF name>` (`base_model.model.model.layers.0.self_attn.q_proj.weight`,
//! `…input_layernorm.weight`, `…model.embed_tokens.weight`; `lm_head.weight` only when untied):
//! a transformers state dict behind PEFT's prefix. Merging writes the trained tensors into the
//! model, so `tunebench export --merged` gives a plain HF model folder (or GGUF file).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use super::{var_tensor, PeftLayer};
use crate::model::{ForwardCtx, FrozenWeight, LinearAdapter, Llama, NormSite, TunedWeights};
use crate::schema::{text, Field, FieldKind};
use crate::{Error, Result};

/// Full fine-tuning settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ts_rs::TS)]
pub struct FullConfig {
    /// Also train the token embedding (and the LM head, which a tied model shares with it).
    #[serde(default = "yes")]
    pub train_embeddings: bool,
    /// Also train the RMSNorm weights.
    #[serde(default = "yes")]
    pub train_norms: bool,
}

fn yes() -> bool {
    true
}

impl Default for FullConfig {
    fn default() -> Self {
        FullConfig { train_embeddings: true, train_norms: true }
    }
}

impl FullConfig {
    /// The keys a form shows.
    pub fn fields() -> Vec<Field> {
        let d = FullConfig::default();
        vec![
            Field::new(
                "train_embeddings",
                FieldKind::Bool,
                d.train_embeddings,
                text("Train embeddings", "训练嵌入"),
                text(
                    "Also train the token embedding and the LM head (a tied model shares them). Off keeps the vocabulary matrices frozen: a large share of a small model's parameters.",
                    "同时训练词嵌入和 LM head（权重共享的模型二者是同一矩阵）。关闭则冻结词表矩阵：小模型的参数有很大一部分在这里。",
                ),
            ),
            Field::new(
                "train_norms",
                FieldKind::Bool,
                d.train_norms,
                text("Train norms", "训练归一化层"),
                text("Also train the RMSNorm weights.", "同时训练 RMSNorm 的权重。"),
            ),
        ]
    }

    /// Checks the values (every combination is valid).
    pub fn validate(&self) -> Result<()> {
        Ok(())
    }

    /// Trainable parameters for `model` under this config: the documented formula.
    pub fn num_params(&self, cfg: &crate::model::LlamaConfig, base_params: usize) -> usize {
        let h = cfg.hidden_size;
        let vocab = cfg.vocab_size * h * if cfg.tie_word_embeddings { 1 } else { 2 };
        let norms = (2 * cfg.num_hidden_layers + 1) * h;
        base_params - if self.train_embeddings { 0 } else { vocab } - if self.train_norms { 0 } else { norms }
    }
}

/// One linear layer's trained weight (and bias), used in place of the frozen ones.
#[derive(Debug)]
pub struct FullLayer {
    /// (out, in). For a tied LM head: the embedding's variable itself.
    pub weight: Var,
    /// (out,), when the model's layer has a bias.
    pub bias: Option<Var>,
    /// The tied LM head: its weight is the embedding's, saved and counted there.
    tied: bool,
}

impl LinearAdapter for FullLayer {
    fn forward(&self, xs: &Tensor, _base: Tensor, w: &FrozenWeight, ctx: &ForwardCtx) -> Result<Tensor> {
        // Not reached: `forward_full` always answers.
        self.forward_full(xs, w, None, ctx).unwrap_or_else(|| Err(Error::Msg("full fine-tuning layer without forward".into())))
    }

    fn forward_full(&self, xs: &Tensor, _w: &FrozenWeight, _bias: Option<&Tensor>, ctx: &ForwardCtx) -> Option<Result<Tensor>> {
        let run = || -> Result<Tensor> {
            let w = FrozenWeight::Dense(var_tensor(&self.weight, ctx));
            let y = if ctx.generation { w.product_fast(xs)? } else { w.product(xs)? };
            Ok(match &self.bias {
                Some(b) => y.broadcast_add(&var_tensor(b, ctx))?,
                None => y,
            })
        };
        Some(run())
    }

    fn trained_weight(&self, ctx: &ForwardCtx) -> Option<Tensor> {
        (ctx.train && !ctx.generation && self.bias.is_none()).then(|| var_tensor(&self.weight, ctx))
    }

    fn params(&self) -> Vec<(String, Var)> {
        if self.tied {
            return Vec::new();
        }
        let mut v = vec![("weight".to_string(), self.weight.clone())];
        if let Some(b) = &self.bias {
            v.push(("bias".into(), b.clone()));
        }
        v
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

impl PeftLayer for FullLayer {
    fn merged(&self, _weight: &Tensor, bias: Option<&Tensor>) -> Result<Option<(Tensor, Option<Tensor>)>> {
        let b = match &self.bias {
            Some(b) => Some(b.as_detached_tensor()),
            None => bias.cloned(),
        };
        Ok(Some((self.weight.as_detached_tensor(), b)))
    }
}

/// The trained embedding and norms (installed with `Llama::set_tuned`).
#[derive(Debug)]
pub struct FullWeights {
    /// (vocab, hidden), when `train_embeddings`.
    pub embedding: Option<Var>,
    /// (site, (hidden,)) for every norm, when `train_norms`.
    pub norms: Vec<(NormSite, Var)>,
}

const EMBED_KEY: &str = "model.embed_tokens.weight";

impl TunedWeights for FullWeights {
    fn embedding(&self, ctx: &ForwardCtx) -> Option<Tensor> {
        self.embedding.as_ref().map(|v| var_tensor(v, ctx))
    }

    fn norm(&self, site: NormSite, ctx: &ForwardCtx) -> Option<Tensor> {
        self.norms.iter().find(|(s, _)| *s == site).map(|(_, v)| var_tensor(v, ctx))
    }
}

impl FullWeights {
    /// Trainable tensors under their saved keys (`base_model.model.<HF name>`).
    pub fn params(&self) -> Vec<(String, Var)> {
        let mut v = Vec::new();
        if let Some(e) = &self.embedding {
            v.push((format!("base_model.model.{EMBED_KEY}"), e.clone()));
        }
        for (site, w) in &self.norms {
            v.push((format!("base_model.model.{}", site.hf_name()), w.clone()));
        }
        v
    }

    /// Writes the trained embedding and norms into the model's frozen weights (a tied LM head
    /// gets the very same tensor, so exports still see it tied).
    pub fn merge_into(&self, model: &mut Llama) -> Result<()> {
        if let Some(e) = &self.embedding {
            let w = e.as_detached_tensor();
            let tied = model.config().tie_word_embeddings;
            model.set_embed_tokens(w.clone())?;
            if tied {
                model.lm_head.set_weight(w);
            }
        }
        for (site, w) in &self.norms {
            model.set_norm_weight(*site, w.as_detached_tensor())?;
        }
        Ok(())
    }
}

/// Makes every frozen weight that `layers` and `tuned` train a view of its variable, so a
/// training process does not hold the base twice (the trained copy beside the frozen one: 4
/// bytes a trained parameter, 513 MiB on the default model). The frozen weights then follow
/// the training: [`super::remove_all`] no longer gives the base back, so only a process that
/// needs the untuned base no more calls this (the trainer, after its held-out check before
/// training).
pub fn share_frozen_with_trained(model: &mut Llama, layers: &[(String, Arc<dyn PeftLayer>)], tuned: &FullWeights) -> Result<()> {
    let by_prefix: HashMap<&str, &FullLayer> =
        layers.iter().filter_map(|(p, l)| l.as_any().downcast_ref::<FullLayer>().map(|f| (p.as_str(), f))).collect();
    for lin in model.linears_mut() {
        if let Some(l) = by_prefix.get(super::peft_prefix(lin).as_str()) {
            lin.set_frozen_weight(FrozenWeight::Dense(l.weight.as_detached_tensor()))?;
            if let Some(b) = &l.bias {
                lin.set_bias(Some(b.as_detached_tensor()));
            }
        }
    }
    tuned.merge_into(model)
}

fn trainable_copy(t: &Tensor) -> Result<Var> {
    // A copy, never the frozen storage itself: the optimizer updates a Var in place.
    Ok(Var::from_tensor(&t.copy()?)?)
}

/// What [`inject`] installs: `(PEFT prefix, layer)` per linear, and the embedding and norms.
pub type Installed = (Vec<(String, Arc<dyn PeftLayer>)>, Arc<FullWeights>);

/// Installs trainable copies of the model's weights (or, with `weights`, the saved trained
/// ones from the adapter file `source`): a layer in every linear slot, and the embedding and
/// norms as the model's `TunedWeights` (`Llama::set_tuned`).
pub fn inject(model: &mut Llama, cfg: &FullConfig, weights: Option<(&HashMap<String, Tensor>, &Path)>) -> Result<Installed> {
    cfg.validate()?;
    let mut taken = std::collections::HashSet::new();
    let mut take = |key: &str, like: &Tensor| -> Result<Var> {
        let Some((w, source)) = weights else { return trainable_copy(like) };
        let full = format!("base_model.model.{key}");
        let t = w.get(&full).ok_or_else(|| Error::bad_input(source, None, format!("adapter tensor `{full}` is missing")))?;
        if t.dims() != like.dims() {
            return Err(Error::bad_input(source, None, format!("{full} is {:?}; this model needs {:?}", t.dims(), like.dims())));
        }
        taken.insert(full);
        trainable_copy(&t.to_dtype(like.dtype())?.to_device(like.device())?)
    };
    let tied = model.config().tie_word_embeddings;
    let embedding = if cfg.train_embeddings { Some(take(EMBED_KEY, &model.embed_tokens().dense()?)?) } else { None };
    let mut norms = Vec::new();
    if cfg.train_norms {
        for site in model.norm_sites() {
            let w = take(&site.hf_name(), model.norm_weight(site)?)?;
            norms.push((site, w));
        }
    }
    let mut layers: Vec<(String, Arc<dyn PeftLayer>)> = Vec::new();
    for lin in model.linears_mut() {
        let is_head = lin.name() == "lm_head";
        if is_head && !cfg.train_embeddings {
            continue;
        }
        let layer = match (&embedding, is_head && tied) {
            (Some(e), true) => FullLayer { weight: e.clone(), bias: None, tied: true },
            _ => {
                let weight = take(&format!("{}.weight", lin.name()), &lin.weight().dense()?)?;
                let bias = lin.bias().map(|b| take(&format!("{}.bias", lin.name()), b)).transpose()?;
                FullLayer { weight, bias, tied: false }
            }
        };
        let layer = Arc::new(layer);
        lin.set_adapter(Some(layer.clone()));
        layers.push((super::peft_prefix(lin), layer));
    }
    if let Some((w, source)) = weights {
        let mut extra: Vec<&String> = w.keys().filter(|k| !taken.contains(*k)).collect();
        extra.sort();
        if let Some(k) = extra.first() {
            return Err(Error::bad_input(
                source,
                None,
                format!("adapter tensor `{k}` is not a weight this model trains under its train_embeddings/train_norms settings ({} such tensors)", extra.len()),
            ));
        }
    }
    let tuned = Arc::new(FullWeights { embedding, norms });
    model.set_tuned(Some(tuned.clone() as Arc<dyn TunedWeights>));
    Ok((layers, tuned))
}
