//! The `Linear` slot: a frozen projection that a PEFT method may wrap.

use std::sync::Arc;

use candle_core::Tensor;

use super::ops;
use crate::Result;

/// Per-forward facts an adapter may need (train vs eval, the seed for dropout masks).
#[derive(Clone, Copy, Debug, Default)]
pub struct ForwardCtx {
    /// Training mode: dropout on, and adapters hand their trainable tensors to the graph (in
    /// eval mode they use detached copies, so inference builds no autograd graph).
    pub train: bool,
    /// Seed for this forward pass's random masks; combined with each module's index so every
    /// module draws its own, reproducible, mask.
    pub seed: u64,
}

/// A method that wraps a frozen linear layer (LoRA, DoRA, IA3, …).
pub trait LinearAdapter: Send + Sync + std::fmt::Debug {
    /// Returns the adapted output given the layer input `xs` and the frozen output `base`
    /// (`xs·Wᵀ + b`).
    fn forward(&self, xs: &Tensor, base: Tensor, weight: &Tensor, ctx: &ForwardCtx) -> Result<Tensor>;
    /// Computes the whole layer instead, when the method changes the input of the frozen
    /// product (IA3 on feed-forward layers); `None` (the default) = use [`forward`](Self::forward).
    fn forward_full(&self, _xs: &Tensor, _weight: &Tensor, _bias: Option<&Tensor>, _ctx: &ForwardCtx) -> Option<Result<Tensor>> {
        None
    }
    /// Downcasting support, for saving and merging.
    fn as_any(&self) -> &dyn std::any::Any;
}

/// A frozen projection `y = x·Wᵀ + b` whose weight never becomes a `Var`, with an optional
/// adapter. Its name is the HF module path (`model.layers.3.self_attn.q_proj`), the key PEFT
/// methods target and save under.
#[derive(Clone, Debug)]
pub struct Linear {
    name: String,
    weight: Tensor,
    bias: Option<Tensor>,
    adapter: Option<Arc<dyn LinearAdapter>>,
}

impl Linear {
    /// A frozen linear layer; `weight` is (out, in).
    pub fn new(name: impl Into<String>, weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear { name: name.into(), weight, bias, adapter: None }
    }

    /// The HF module path.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The last component of the module path (`q_proj`).
    pub fn short_name(&self) -> &str {
        self.name.rsplit('.').next().unwrap_or(&self.name)
    }

    /// The frozen weight, (out, in).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The frozen bias, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// (in_features, out_features).
    pub fn in_out(&self) -> (usize, usize) {
        let d = self.weight.dims();
        (d[1], d[0])
    }

    /// Installs (or removes) the adapter.
    pub fn set_adapter(&mut self, adapter: Option<Arc<dyn LinearAdapter>>) {
        self.adapter = adapter;
    }

    /// The installed adapter.
    pub fn adapter(&self) -> Option<&Arc<dyn LinearAdapter>> {
        self.adapter.as_ref()
    }

    /// Replaces the frozen weight (used by merge).
    pub fn set_weight(&mut self, weight: Tensor) {
        self.weight = weight;
    }

    /// Replaces the frozen bias (used by merge).
    pub fn set_bias(&mut self, bias: Option<Tensor>) {
        self.bias = bias;
    }

    /// Forward pass.
    pub fn forward(&self, xs: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        if let Some(a) = &self.adapter {
            if let Some(y) = a.forward_full(xs, &self.weight, self.bias.as_ref(), ctx) {
                return y;
            }
        }
        let mut y = ops::frozen_linear(xs, &self.weight)?;
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        match &self.adapter {
            Some(a) => a.forward(xs, y, &self.weight, ctx),
            None => Ok(y),
        }
    }
}
