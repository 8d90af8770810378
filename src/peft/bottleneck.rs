//! Adapter tuning: small bottleneck modules inside every decoder layer.
//!
//! Houlsby et al., "Parameter-Efficient Transfer Learning for NLP" (2019): after the attention
//! block and after the feed-forward block, before each residual addition, the block's output
//! `y` becomes `y + W_up·f(W_down·y + b_down) + b_up` — a down-projection to `bottleneck_size`,
//! a non-linearity, an up-projection back, and a skip connection. `W_up` and `b_up` start at
//! zero, so training starts from the unchanged model (the paper's near-identity init).
//! Pfeiffer et al., "AdapterFusion" (2021) keep only the adapter after the feed-forward block
//! (`placement = "pfeiffer"`): half the parameters, about the same quality.
//!
//! In a Llama layer the attention block's output is `o_proj`'s output and the feed-forward
//! block's is `down_proj`'s, so the adapters sit in those two linear slots (they transform the
//! projection's whole output). Trainable parameters per adapter: `2·b·d + b + d` for hidden
//! size `d` and bottleneck `b`; two per layer (Houlsby) or one (Pfeiffer). A non-linear
//! adapter cannot be merged into the weights.
//!
//! HF PEFT has no bottleneck adapters, so the file format is our own, in PEFT's layout:
//! `adapter_config.json` = `{"peft_type": "BOTTLENECK", "format_version": 1, "placement",
//! "bottleneck_size", "non_linearity", "init_adapter_weights"}` and `adapter_model.safetensors`
//! with `base_model.model.<module>.adapter_down.weight` (b, d), `….adapter_down.bias` (b),
//! `….adapter_up.weight` (d, b), `….adapter_up.bias` (d) for each wrapped module.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use super::PeftLayer;
use crate::model::{ForwardCtx, FrozenWeight, LinearAdapter, Llama};
use crate::schema::{text, Field, FieldKind};
use crate::{Error, Result};

/// Where the adapters go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ts_rs::TS)]
#[serde(rename_all = "lowercase")]
pub enum Placement {
    /// After attention and after the feed-forward block (Houlsby et al. 2019).
    Houlsby,
    /// After the feed-forward block only (Pfeiffer et al. 2021).
    Pfeiffer,
}

/// The bottleneck's activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ts_rs::TS)]
#[serde(rename_all = "lowercase")]
pub enum NonLinearity {
    /// max(0, x).
    Relu,
    /// x·σ(x) (swish), Llama's own activation.
    Silu,
    /// GELU, tanh approximation.
    Gelu,
}

/// Bottleneck adapter settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ts_rs::TS)]
pub struct BottleneckConfig {
    /// Houlsby (two adapters per layer) or Pfeiffer (one, after the feed-forward block).
    #[serde(default = "houlsby")]
    pub placement: Placement,
    /// Width of the bottleneck.
    #[serde(default = "default_size")]
    pub bottleneck_size: usize,
    /// Activation between the projections.
    #[serde(default = "silu")]
    pub non_linearity: NonLinearity,
    /// Start the up-projection at zero, so training starts from the unchanged model (`false`
    /// draws it at random, for tests).
    #[serde(default = "yes")]
    pub init_adapter_weights: bool,
}

fn houlsby() -> Placement {
    Placement::Houlsby
}
fn default_size() -> usize {
    64
}
fn silu() -> NonLinearity {
    NonLinearity::Silu
}
fn yes() -> bool {
    true
}

impl Default for BottleneckConfig {
    fn default() -> Self {
        BottleneckConfig { placement: houlsby(), bottleneck_size: default_size(), non_linearity: silu(), init_adapter_weights: true }
    }
}

impl BottleneckConfig {
    /// The keys a form shows.
    pub fn fields() -> Vec<Field> {
        let d = BottleneckConfig::default();
        vec![
            Field::new(
                "placement",
                FieldKind::Choice { options: vec!["houlsby".into(), "pfeiffer".into()] },
                d.placement,
                text("Placement", "位置"),
                text(
                    "houlsby: an adapter after attention and one after the feed-forward block of every layer; pfeiffer: only after the feed-forward block (half the parameters).",
                    "houlsby：每层注意力之后和前馈之后各一个适配器；pfeiffer：只在前馈之后（参数减半）。",
                ),
            ),
            Field::new(
                "bottleneck_size",
                FieldKind::Int,
                d.bottleneck_size,
                text("Bottleneck size", "瓶颈宽度"),
                text(
                    "Width of the down-projection: each adapter has 2·b·d + b + d parameters for hidden size d.",
                    "降维投影的宽度：每个适配器有 2·b·d + b + d 个参数（d 为隐藏维度）。",
                ),
            )
            .range(Some(1.0), Some(65536.0)),
            Field::new(
                "non_linearity",
                FieldKind::Choice { options: vec!["silu".into(), "relu".into(), "gelu".into()] },
                d.non_linearity,
                text("Activation", "激活函数"),
                text("Activation between the down- and up-projection.", "降维与升维投影之间的激活函数。"),
            )
            .advanced(),
        ]
    }

    /// Checks the values; errors name the key.
    pub fn validate(&self) -> Result<()> {
        if self.bottleneck_size == 0 {
            return Err(Error::config("peft.bottleneck_size", "must be at least 1"));
        }
        Ok(())
    }

    /// The linear modules whose output gets an adapter (short names).
    pub fn modules(&self) -> &'static [&'static str] {
        match self.placement {
            Placement::Houlsby => &["o_proj", "down_proj"],
            Placement::Pfeiffer => &["down_proj"],
        }
    }

    /// Whether the module path `name` gets an adapter.
    pub fn wraps(&self, name: &str) -> bool {
        let short = name.rsplit('.').next().unwrap_or(name);
        self.modules().contains(&short)
    }

    /// Trainable parameters of one adapter on an output of width `d`.
    pub fn params_per_adapter(&self, d: usize) -> usize {
        2 * self.bottleneck_size * d + self.bottleneck_size + d
    }
}

/// One bottleneck adapter on a projection's output.
#[derive(Debug)]
pub struct BottleneckLayer {
    /// (b, d).
    pub down: Var,
    /// (b,).
    pub down_bias: Var,
    /// (d, b).
    pub up: Var,
    /// (d,).
    pub up_bias: Var,
    /// Activation.
    pub act: NonLinearity,
}

impl LinearAdapter for BottleneckLayer {
    fn forward(&self, _xs: &Tensor, base: Tensor, _w: &FrozenWeight, ctx: &ForwardCtx) -> Result<Tensor> {
        let t = |v: &Var| super::var_tensor(v, ctx);
        let dims = base.dims().to_vec();
        let d = *dims.last().unwrap_or(&0);
        let y = base.reshape(((), d))?;
        let h = y.matmul(&t(&self.down).t()?)?.broadcast_add(&t(&self.down_bias))?;
        let h = match self.act {
            NonLinearity::Relu => h.relu()?,
            NonLinearity::Silu => h.silu()?,
            NonLinearity::Gelu => h.gelu()?,
        };
        let u = h.matmul(&t(&self.up).t()?)?.broadcast_add(&t(&self.up_bias))?;
        Ok((y + u)?.reshape(dims)?)
    }

    fn params(&self) -> Vec<(String, Var)> {
        vec![
            ("adapter_down.weight".into(), self.down.clone()),
            ("adapter_down.bias".into(), self.down_bias.clone()),
            ("adapter_up.weight".into(), self.up.clone()),
            ("adapter_up.bias".into(), self.up_bias.clone()),
        ]
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

impl PeftLayer for BottleneckLayer {
    fn merged(&self, _weight: &Tensor, _bias: Option<&Tensor>) -> Result<Option<(Tensor, Option<Tensor>)>> {
        // y + W_up·f(W_down·y) is not linear in y.
        Ok(None)
    }
}

/// Installs bottleneck adapters (fresh, or from `weights` of a saved adapter, whose file
/// `source` names errors). Returns `(peft key prefix, layer)` per module.
pub fn inject(
    model: &mut Llama,
    cfg: &BottleneckConfig,
    seed: u64,
    weights: Option<(&HashMap<String, Tensor>, &std::path::Path)>,
) -> Result<Vec<(String, Arc<dyn PeftLayer>)>> {
    cfg.validate()?;
    let b = cfg.bottleneck_size;
    let mut out: Vec<(String, Arc<dyn PeftLayer>)> = Vec::new();
    for (index, lin) in model.linears_mut().into_iter().enumerate() {
        if !cfg.wraps(lin.name()) {
            continue;
        }
        let d = lin.in_out().1;
        let (dtype, device) = (super::param_dtype(lin.weight().dtype()), lin.weight().device());
        let prefix = super::peft_prefix(lin);
        let shapes: [(&str, Vec<usize>); 4] =
            [("adapter_down.weight", vec![b, d]), ("adapter_down.bias", vec![b]), ("adapter_up.weight", vec![d, b]), ("adapter_up.bias", vec![d])];
        let mut tensors = Vec::with_capacity(4);
        for (i, (key, shape)) in shapes.iter().enumerate() {
            let t = match weights {
                Some((w, source)) => {
                    let full = format!("{prefix}.{key}");
                    let t = w.get(&full).ok_or_else(|| Error::bad_input(source, None, format!("adapter tensor `{full}` is missing")))?;
                    if t.dims() != shape.as_slice() {
                        return Err(Error::bad_input(source, None, format!("{full} is {:?}; this model needs {shape:?}", t.dims())));
                    }
                    t.to_dtype(dtype)?.to_device(&device)?
                }
                None => {
                    // Down: uniform ±1/√d (like a fresh linear layer); biases and the
                    // up-projection zero, unless random init is asked for.
                    let random = i == 0 || !cfg.init_adapter_weights;
                    let bound = if i == 0 { 1.0 / (d as f64).sqrt() } else { 0.1 };
                    let n: usize = shape.iter().product();
                    let v: Vec<f32> = if random {
                        use rand::{Rng, SeedableRng};
                        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ ((index * 4 + i) as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                        (0..n).map(|_| ((rng.random::<f64>() * 2.0 - 1.0) * bound) as f32).collect()
                    } else {
                        vec![0.0; n]
                    };
                    Tensor::from_vec(v, shape.as_slice(), &device)?.to_dtype(dtype)?
                }
            };
            tensors.push(Var::from_tensor(&t)?);
        }
        let [down, down_bias, up, up_bias]: [Var; 4] = tensors.try_into().map_err(|_| Error::Msg("bottleneck: expected 4 tensors".into()))?;
        let layer = Arc::new(BottleneckLayer { down, down_bias, up, up_bias, act: cfg.non_linearity });
        lin.set_adapter(Some(layer.clone()));
        out.push((prefix, layer));
    }
    if out.is_empty() {
        return Err(Error::config("peft.placement", format!("this model has no {} modules to put adapters after", cfg.modules().join(" or "))));
    }
    if let Some((w, source)) = weights {
        let n = w.keys().filter(|k| k.ends_with(".adapter_up.weight")).count();
        if n != out.len() {
            return Err(Error::bad_input(source, None, format!("the file has {n} adapters but placement `{:?}` needs {}", cfg.placement, out.len())));
        }
    }
    Ok(out)
}
