//! The `Linear` slot: a frozen projection that a PEFT method may wrap.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor, Var};

use super::ops;
use crate::Result;

/// A frozen weight matrix (out, in): dense (training, HF folders) or kept in its GGUF
/// quantized blocks (inference from GGUF files), multiplied without ever being expanded.
#[derive(Clone, Debug)]
pub enum FrozenWeight {
    /// A plain tensor.
    Dense(Tensor),
    /// llama.cpp blocks (Q4_1, Q8_0, k-quants, …) and the matmul that reads them directly.
    Quantized {
        /// The blocks.
        q: Arc<QTensor>,
        /// Its matmul.
        mm: QMatMul,
    },
}

/// Rows of activations up to which a GPU multiplies quantized blocks with candle's kernels
/// (activations rounded to 8 bits, as a token's decoding step does); more take the
/// dequantized product.
const CUDA_BLOCK_KERNEL_ROWS: usize = 8;

/// The block types `model::qmatmul` multiplies itself on the CPU.
fn own_kernel(t: GgmlDType) -> Option<super::qmatmul::BlockKind> {
    match t {
        GgmlDType::Q4_1 => Some(super::qmatmul::BlockKind::Q4_1),
        GgmlDType::Q8_0 => Some(super::qmatmul::BlockKind::Q8_0),
        _ => None,
    }
}

impl FrozenWeight {
    /// Wraps quantized blocks.
    pub fn quantized(q: QTensor) -> Result<Self> {
        let q = Arc::new(q);
        let mm = QMatMul::from_arc(q.clone())?;
        Ok(FrozenWeight::Quantized { q, mm })
    }

    /// Shape, (out, in).
    pub fn dims(&self) -> &[usize] {
        match self {
            FrozenWeight::Dense(t) => t.dims(),
            FrozenWeight::Quantized { q, .. } => q.shape().dims(),
        }
    }

    /// Number of elements.
    pub fn elem_count(&self) -> usize {
        self.dims().iter().product()
    }

    /// The dtype products come out in (quantized weights compute in f32).
    pub fn dtype(&self) -> DType {
        match self {
            FrozenWeight::Dense(t) => t.dtype(),
            FrozenWeight::Quantized { .. } => DType::F32,
        }
    }

    /// Where the weight lives.
    pub fn device(&self) -> Device {
        match self {
            FrozenWeight::Dense(t) => t.device().clone(),
            FrozenWeight::Quantized { q, .. } => q.device(),
        }
    }

    /// The dense tensor, when the weight is dense.
    pub fn as_dense(&self) -> Option<&Tensor> {
        match self {
            FrozenWeight::Dense(t) => Some(t),
            FrozenWeight::Quantized { .. } => None,
        }
    }

    /// True when held quantized.
    pub fn is_quantized(&self) -> bool {
        matches!(self, FrozenWeight::Quantized { .. })
    }

    /// The weight as a dense tensor: the tensor itself, or a fresh f32 dequantization (not
    /// kept: callers that need it often should hold on to it).
    pub fn dense(&self) -> Result<Tensor> {
        match self {
            FrozenWeight::Dense(t) => Ok(t.clone()),
            FrozenWeight::Quantized { q, .. } => Ok(q.dequantize(&q.device())?),
        }
    }

    /// `xs·Wᵀ` over the last axis, exact: dense weights get no gradient (see
    /// `ops::frozen_linear`); quantized ones are dequantized for the product and again for its
    /// backward (`ops::frozen_linear_blocks`: an autograd graph holds the blocks, never a dense
    /// copy — QLoRA's memory saving).
    pub fn product(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            FrozenWeight::Dense(w) => Ok(ops::frozen_linear(xs, w)?),
            FrozenWeight::Quantized { q, .. } => Ok(ops::frozen_linear_blocks(xs, q)?),
        }
    }

    /// [`product`](Self::product) for generation: quantized weights multiply with activations
    /// rounded to 8 bits (`model::qmatmul`, or candle's kernels for other block types) unless
    /// a gradient must flow to `xs`.
    pub fn product_fast(&self, xs: &Tensor) -> Result<Tensor> {
        let (q, mm) = match self {
            FrozenWeight::Dense(_) => return self.product(xs),
            FrozenWeight::Quantized { q, mm } => (q, mm),
        };
        if xs.track_op() || xs.dtype() != DType::F32 {
            // Gradients, or half-precision activations: the exact dequantized product.
            return self.product(xs);
        }
        let rows = xs.elem_count() / xs.dim(candle_core::D::Minus1)?.max(1);
        match own_kernel(q.dtype()) {
            Some(kind) if xs.device().is_cpu() && xs.dtype() == DType::F32 => {
                let (n, k) = q.shape().dims2()?;
                super::qmatmul::matmul(kind, xs, &q.data()?, n, k)
            }
            // A prompt's many rows on a GPU: the dequantized product (cuBLAS), which is
            // compute-bound there anyway. candle 0.11's kernel for many rows of Q8_0 blocks
            // gave logits 60% off the CPU's on the H200 (bench/gpu_session.sh's inference
            // check, 2026-12-04); its one-row kernels (decoding) agree.
            _ if xs.device().is_cuda() && rows > CUDA_BLOCK_KERNEL_ROWS => self.product(xs),
            _ => Ok(mm.forward(xs)?),
        }
    }

    /// Rows of the matrix for the given ids (embedding lookup), (…, in).
    pub fn rows(&self, ids: &Tensor) -> Result<Tensor> {
        match self {
            FrozenWeight::Dense(w) => {
                let mut dims = ids.dims().to_vec();
                dims.push(w.dim(1)?);
                Ok(w.embedding(&ids.flatten_all()?)?.reshape(dims)?)
            }
            FrozenWeight::Quantized { q, .. } => Ok(q.embedding(ids)?),
        }
    }
}

/// Per-forward facts an adapter may need (train vs eval, the seed for dropout masks).
#[derive(Clone, Copy, Debug, Default)]
pub struct ForwardCtx {
    /// Training mode: dropout on, and adapters hand their trainable tensors to the graph (in
    /// eval mode they use detached copies, so inference builds no autograd graph).
    pub train: bool,
    /// Seed for this forward pass's random masks; combined with each module's index so every
    /// module draws its own, reproducible, mask.
    pub seed: u64,
    /// A generation pass (set by `Llama::hidden_cached`): quantized weights multiply with
    /// activations rounded to 8 bits (llama.cpp's scheme, fast). Otherwise (training, losses)
    /// they are dequantized for an exact f32 product.
    pub generation: bool,
    /// Mixed precision: the dtype adapters compute in (the activations'; set by
    /// [`Linear::forward`] for half-precision activations). Their trainable tensors stay f32
    /// and are cast for the forward (`peft::var_tensor`), so gradients reach them in f32.
    pub compute_dtype: Option<DType>,
}

impl ForwardCtx {
    /// The context of a generation pass (see [`ForwardCtx::generation`]).
    pub fn for_generation() -> Self {
        ForwardCtx { generation: true, ..Default::default() }
    }
}

/// A method that wraps a frozen linear layer (LoRA, DoRA, IA3, …).
pub trait LinearAdapter: Send + Sync + std::fmt::Debug {
    /// Returns the adapted output given the layer input `xs` and the frozen output `base`
    /// (`xs·Wᵀ + b`).
    fn forward(&self, xs: &Tensor, base: Tensor, weight: &FrozenWeight, ctx: &ForwardCtx) -> Result<Tensor>;
    /// Computes the whole layer instead, when the method changes the input of the frozen
    /// product (IA3 on feed-forward layers); `None` (the default) = use [`forward`](Self::forward).
    fn forward_full(&self, _xs: &Tensor, _weight: &FrozenWeight, _bias: Option<&Tensor>, _ctx: &ForwardCtx) -> Option<Result<Tensor>> {
        None
    }
    /// The whole layer's output followed by `then` ([`Linear::forward_then`]: laid out per
    /// head, or added to the residual stream), where the method's op can take that step
    /// itself. `None` (the default) = the layer's output, then the step on its own.
    fn forward_full_then(&self, _xs: &Tensor, _weight: &FrozenWeight, _bias: Option<&Tensor>, _ctx: &ForwardCtx, _then: ops::Epilogue) -> Option<Result<Tensor>> {
        None
    }
    /// The whole layer on SwiGLU's product `silu(g)·u` ([`Linear::forward_swiglu_then`]:
    /// down_proj), followed by `then`, where the method's op can make the product itself (so
    /// the graph keeps g and u but not the product). `None` (the default) = SwiGLU's node, then
    /// [`forward_full_then`](Self::forward_full_then) on its output.
    #[allow(clippy::too_many_arguments)]
    fn forward_swiglu_then(&self, _g: &Tensor, _u: &Tensor, _weight: &FrozenWeight, _bias: Option<&Tensor>, _ctx: &ForwardCtx, _then: ops::Epilogue) -> Option<Result<Tensor>> {
        None
    }
    /// The weight that replaces the frozen one wholesale while training (full fine-tuning,
    /// without a bias), tracked for its gradient: an LM head with one trains through the
    /// chunked loss ([`super::ops::linear_cross_entropy_trained_sum`]) instead of keeping every
    /// row's logits. `None` (the default) for every other method.
    fn trained_weight(&self, _ctx: &ForwardCtx) -> Option<Tensor> {
        None
    }
    /// LoRA's pair on an LM head while training (plain LoRA; not DoRA): the update's input
    /// (`xs`, the head's input rows, with the method's dropout applied), A, B and the scale, so
    /// the head's loss runs chunk by chunk with the pair's gradients
    /// ([`super::ops::linear_cross_entropy_lora_sum`]) instead of keeping every row's logits.
    /// `None` (the default) for every other method.
    fn head_pair(&self, _xs: &Tensor, _ctx: &ForwardCtx) -> Option<Result<(Tensor, Tensor, Tensor, f64)>> {
        None
    }
    /// What the method does to an LM head's output column by column while training, as
    /// `(scale, shift)`: `z = (x·Wᵀ + b + shift) ⊙ scale` (IA3's output scaling, BitFit's change
    /// of bias), so the head's loss runs chunk by chunk with their gradients
    /// ([`super::ops::linear_cross_entropy_affine_sum`]) instead of through the slot's graph.
    /// `None` (the default) for every other method.
    fn head_affine(&self, _ctx: &ForwardCtx) -> Option<(Option<Tensor>, Option<Tensor>)> {
        None
    }
    /// The method's trainable tensors, each under its key suffix after the module's PEFT
    /// prefix (`lora_A.weight`): what the optimizer updates and what is saved.
    fn params(&self) -> Vec<(String, Var)>;
    /// The tensors of [`params`](Self::params)' `Var`s (the ones gradients are keyed by): an
    /// adapted LM head's loss runs chunk by chunk, each chunk's graph differentiated on its
    /// own, and hands them the summed gradients (`Llama`'s adapted-head loss).
    fn trainable_tensors(&self) -> Vec<Tensor> {
        self.params().iter().map(|(_, v)| v.as_tensor().clone()).collect()
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
    weight: FrozenWeight,
    bias: Option<Tensor>,
    adapter: Option<Arc<dyn LinearAdapter>>,
}

impl Linear {
    /// A frozen linear layer; `weight` is (out, in).
    pub fn new(name: impl Into<String>, weight: Tensor, bias: Option<Tensor>) -> Self {
        Self::with_weight(name, FrozenWeight::Dense(weight), bias)
    }

    /// A frozen linear layer over a dense or quantized weight.
    pub fn with_weight(name: impl Into<String>, weight: FrozenWeight, bias: Option<Tensor>) -> Self {
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
    pub fn weight(&self) -> &FrozenWeight {
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

    /// Replaces the frozen weight with a dense one (used by merge).
    pub fn set_weight(&mut self, weight: Tensor) {
        self.weight = FrozenWeight::Dense(weight);
    }

    /// Replaces the frozen weight (dense or quantized) with one of the same shape.
    pub fn set_frozen_weight(&mut self, weight: FrozenWeight) -> Result<()> {
        if weight.dims() != self.weight.dims() {
            return Err(crate::Error::Msg(format!("{}: weight {:?} does not replace {:?}", self.name, weight.dims(), self.weight.dims())));
        }
        self.weight = weight;
        Ok(())
    }

    /// Replaces the frozen bias (used by merge).
    pub fn set_bias(&mut self, bias: Option<Tensor>) {
        self.bias = bias;
    }

    /// Forward pass. With half-precision activations an adapter computes in their dtype too
    /// (autocast's behaviour: no f32 copies of activations), from f32 trainable tensors cast
    /// for the pass ([`ForwardCtx::compute_dtype`]).
    pub fn forward(&self, xs: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        let ctx = &self.pass_ctx(xs, ctx);
        if let Some(a) = &self.adapter {
            if let Some(y) = a.forward_full(xs, &self.weight, self.bias.as_ref(), ctx) {
                return y;
            }
        }
        let mut y = if ctx.generation { self.weight.product_fast(xs)? } else { self.weight.product(xs)? };
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        match &self.adapter {
            Some(a) => super::profile::region("adapter fwd", xs.device(), || a.forward(xs, y, &self.weight, ctx)),
            None => Ok(y),
        }
    }

    /// The pass's context for this layer: with half-precision activations an adapter computes
    /// in their dtype.
    fn pass_ctx(&self, xs: &Tensor, ctx: &ForwardCtx) -> ForwardCtx {
        match xs.dtype() {
            DType::BF16 | DType::F16 if self.adapter.is_some() => ForwardCtx { compute_dtype: Some(xs.dtype()), ..*ctx },
            _ => *ctx,
        }
    }

    /// [`forward`](Self::forward), then `then`: q, k and v split into heads, o_proj's and
    /// down_proj's output added to the residual stream. In training the step is the last one
    /// of the projection's own op where it can be — the frozen product's
    /// ([`ops::frozen_linear_heads`], [`ops::frozen_linear_residual`]) and LoRA's
    /// ([`LinearAdapter::forward_full_then`]) — so the graph never holds the projection's
    /// output beside its per-head copy or the sum (neither backward reads it).
    pub fn forward_then(&self, xs: &Tensor, ctx: &ForwardCtx, then: ops::Epilogue) -> Result<Tensor> {
        if !ctx.generation {
            let ctx = &self.pass_ctx(xs, ctx);
            match (&self.adapter, then) {
                (_, ops::Epilogue::Rows) => {}
                (Some(a), then) => {
                    if let Some(y) = a.forward_full_then(xs, &self.weight, self.bias.as_ref(), ctx, then) {
                        return y;
                    }
                }
                (None, ops::Epilogue::Heads(split)) if xs.track_op() => return Ok(ops::frozen_linear_heads(xs, &self.weight, self.bias.as_ref(), split)?),
                (None, ops::Epilogue::Residual(r)) if xs.track_op() => return Ok(ops::frozen_linear_residual(xs, &self.weight, self.bias.as_ref(), r)?),
                (None, _) => {}
            }
        }
        Ok(then.apply(self.forward(xs, ctx)?)?)
    }

    /// [`forward_then`](Self::forward_then) on SwiGLU's product `silu(g)·u` of the gate and up
    /// projections' outputs (down_proj). In training the product is made inside the
    /// projection's own op where it can be — the frozen product's
    /// ([`ops::frozen_linear_swiglu_residual`]) and LoRA's
    /// ([`LinearAdapter::forward_swiglu_then`]) — so the graph keeps g and u, which SwiGLU's
    /// backward reads, and never the (tokens, intermediate) product, which the op makes again
    /// when its backward needs it.
    pub fn forward_swiglu_then(&self, g: &Tensor, u: &Tensor, ctx: &ForwardCtx, then: ops::Epilogue) -> Result<Tensor> {
        if !ctx.generation {
            let ctx = &self.pass_ctx(g, ctx);
            match (&self.adapter, then) {
                (Some(a), then) => {
                    if let Some(y) = a.forward_swiglu_then(g, u, &self.weight, self.bias.as_ref(), ctx, then) {
                        return y;
                    }
                }
                (None, ops::Epilogue::Residual(r)) if g.track_op() || u.track_op() => {
                    return Ok(ops::frozen_linear_swiglu_residual(g, u, &self.weight, self.bias.as_ref(), r)?);
                }
                (None, _) => {}
            }
        }
        self.forward_then(&ops::swiglu(g, u)?, ctx, then)
    }
}
