//! Training ops with a backward pass.
//!
//! candle's fused `rms_norm`, `rope` and `softmax_last_dim` record no backward, and its matmul
//! backward always computes the gradient of both operands. These ops fix both:
//! * [`frozen_linear`]: `x · Wᵀ` whose backward returns only `dX = dY · W` (no gradient for a
//!   frozen weight, no wasted matmul); [`trained_linear`], its twin for a trained weight (full
//!   fine-tuning), gives the weight `dYᵀ·X` in its own layout; both take any leading dims as
//!   one graph node (in candle's backward every node costs a zero-filled gradient and an add);
//! * [`rms_norm`], [`rope`], [`causal_softmax`]: fused f32 CPU kernels (rayon over rows) with
//!   analytic backward, and a composed differentiable fallback for other devices/dtypes.
//!   The composed versions are also the reference the tests hold the fused ones to; a trained
//!   RMSNorm weight is the unit-weight norm followed by [`channel_scale`];
//! * [`causal_attention`]: attention in query blocks whose backward recomputes the
//!   probabilities, so no (batch, heads, seq, seq) matrix stays alive between the passes;
//! * on GPUs and for 16-bit activations, RMSNorm, RoPE and the (graph-free) causal softmax run
//!   candle's fused forward kernels, given a backward of ours by a gradient hook
//!   ([`rms_norm_hooked`], [`rope_hooked`]) instead of composed ops whose every temporary
//!   the graph would keep;
//! * on CUDA devices, SwiGLU, RMSNorm's input gradient, the causal softmax, the chunked loss
//!   and attention's score gradient take our own kernels ([`super::fused`]), and on the CPU
//!   attention takes [`super::attention_cpu`]'s (in f32, for 16-bit operands too; both unless
//!   `TUNEBENCH_FUSED_KERNELS=0`).

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::quantized::QTensor;
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Storage, Tensor, D};
use rayon::prelude::*;

use super::{attention_cpu, cpu_math, fused, profile};

type CResult<T> = candle_core::Result<T>;

fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> CResult<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

fn use_fused(xs: &Tensor) -> bool {
    matches!(xs.device(), Device::Cpu) && xs.dtype() == DType::F32
}

// ---------------------------------------------------------------------------------------------
// Frozen linear
// ---------------------------------------------------------------------------------------------

/// The weight a [`FrozenMatmul`] holds: a tensor, or quantized blocks dequantized for each
/// product and again for the backward, so an autograd graph over many layers keeps only the
/// blocks alive (QLoRA's memory saving), never a dense copy.
#[derive(Clone)]
enum Held {
    Dense(Tensor),
    Blocks(Arc<QTensor>),
}

impl Held {
    fn of(w: &super::FrozenWeight) -> Held {
        match w {
            super::FrozenWeight::Dense(t) => Held::Dense(t.clone()),
            super::FrozenWeight::Quantized { q, .. } => Held::Blocks(q.clone()),
        }
    }

    /// The weight, dense, in `dtype` (the activations' dtype: mixed precision multiplies a bf16
    /// base with bf16 activations, an f32 adapter path's input with an f32 copy).
    fn dense(&self, dtype: DType) -> CResult<Tensor> {
        match self {
            Held::Dense(t) => t.to_dtype(dtype),
            Held::Blocks(q) => match super::fused::dequantize(q, dtype)? {
                Some(w) => Ok(w),
                None => q.dequantize(&q.device())?.to_dtype(dtype),
            },
        }
    }
}

struct FrozenMatmul {
    /// (out, in).
    w: Held,
    /// The activations' dtype, which the product and its gradient take.
    dtype: DType,
    /// A frozen bias (out,) in `dtype`, added inside the op (with `heads`, where it must come
    /// before the move, and before a residual).
    bias: Option<Tensor>,
    /// The output laid out per head ([`HeadSplit`]).
    heads: Option<fused::Heads>,
}

impl FrozenMatmul {
    /// The op for `w` in the activations' `dtype`, with a frozen `bias` and `heads`.
    fn with_bias(w: &super::FrozenWeight, dtype: DType, bias: Option<&Tensor>, heads: Option<fused::Heads>) -> CResult<FrozenMatmul> {
        Ok(FrozenMatmul { w: Held::of(w), dtype, bias: bias_in(bias, dtype)?, heads })
    }

    /// `x·Wᵀ [+ bias]` on a backend's storage (`pick`: the backend's variant of [`Storage`];
    /// `device` names it in the error).
    fn forward<S: BackendStorage>(&self, s: &S, l: &Layout, pick: fn(&Storage) -> Option<&S>, device: &str) -> CResult<(S, Shape)> {
        let w = self.w.dense(self.dtype)?;
        let (ws, wl) = w.storage_and_layout();
        let Some(w) = pick(&ws) else { candle_core::bail!("frozen-matmul: weight not on {device}") };
        let (m, k, n, x2) = product_dims(l, wl, "frozen-matmul")?;
        let mut y = s.matmul(w, (1, m, n, k), &x2, &wl.transpose(0, 1)?)?;
        if let Some(bias) = &self.bias {
            let (bs, bl) = bias.storage_and_layout();
            let Some(b) = pick(&bs) else { candle_core::bail!("frozen-matmul: bias not on {device}") };
            y = y.binary_impl::<candle_core::op::Add>(b, &Layout::contiguous((m, n)), &bl.broadcast_as((m, n))?)?;
        }
        Ok((y, out_shape(l, n)))
    }
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        into_heads_cpu(&self.heads, self.forward(s, l, cpu_storage, "the cpu")?)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> CResult<(candle_core::CudaStorage, Shape)> {
        into_heads_cuda(&self.heads, self.forward(s, l, cuda_storage, "cuda")?)
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        profile::region("frozen matmul bwd", grad.device(), || {
            let grad = &out_of_heads(&self.heads, grad)?;
            let w = self.w.dense(self.dtype)?;
            let (m, n) = (grad.elem_count() / w.dim(0)?.max(1), w.dim(0)?);
            Ok(Some(grad.contiguous()?.reshape((m, n))?.matmul(&w)?.reshape(arg.dims())?))
        })
    }
}

/// `xs · wᵀ` for a frozen `w` of shape (out, in): the backward gives `xs` its gradient and
/// computes nothing for `w` (unless `w` itself is trained, i.e. tracks ops: then candle's
/// matmul gives both). `xs` may have any number of leading dims.
pub fn frozen_linear(xs: &Tensor, w: &Tensor) -> CResult<Tensor> {
    frozen_product(xs, Held::Dense(w.clone()), w.dim(0)?)
}

/// [`frozen_linear`] for a weight held as quantized blocks (out, in): dequantized for the
/// product and again in the backward, never kept dense.
pub fn frozen_linear_blocks(xs: &Tensor, q: &Arc<QTensor>) -> CResult<Tensor> {
    let n = q.shape().dims2()?.0;
    frozen_product(xs, Held::Blocks(q.clone()), n)
}

/// `split(xs·Wᵀ + bias)` for a frozen `w` (out, in) and `bias` (out,), `xs` (b, s, in): while
/// `xs` tracks ops, one node whose output is already per head ([`HeadSplit`]); otherwise the
/// product, the bias and [`split_heads`].
pub fn frozen_linear_heads(xs: &Tensor, w: &super::FrozenWeight, bias: Option<&Tensor>, split: HeadSplit) -> CResult<Tensor> {
    if frozen_op_fits(xs, w, bias) {
        if let Some(heads) = split.epilogue(xs, w.dims()[0])? {
            return profile::region("frozen matmul fwd", xs.device(), || {
                xs.contiguous()?.apply_op1(FrozenMatmul::with_bias(w, xs.dtype(), bias, Some(heads))?)
            });
        }
    }
    split.apply(&frozen_linear_biased(xs, w, bias)?)
}

/// `residual + xs·Wᵀ + bias` for a frozen `w` (out, in), `bias` (out,), `xs` (…, in) and the
/// residual stream (…, out) (o_proj, down_proj): while `xs` tracks ops, one node that adds the
/// residual as its last step ([`FrozenResidual`]) — as two, the add's node would hold the
/// product, which its backward never reads; otherwise the product, the bias and the add.
pub fn frozen_linear_residual(xs: &Tensor, w: &super::FrozenWeight, bias: Option<&Tensor>, residual: &Tensor) -> CResult<Tensor> {
    if frozen_op_fits(xs, w, bias) && residual_fits(xs, residual, w.dims()[0])? {
        return profile::region("frozen matmul fwd", xs.device(), || {
            let op = FrozenResidual(FrozenMatmul::with_bias(w, xs.dtype(), bias, None)?);
            xs.contiguous()?.apply_op2(&residual.contiguous()?, op)
        });
    }
    residual + frozen_linear_biased(xs, w, bias)?
}

/// Whether the frozen product can be our op with an epilogue: `xs` tracks ops, the weight is
/// not trained and a bias, if any, is frozen (a trained one gets its gradient from an add).
fn frozen_op_fits(xs: &Tensor, w: &super::FrozenWeight, bias: Option<&Tensor>) -> bool {
    let trained_w = matches!(w, super::FrozenWeight::Dense(t) if t.track_op());
    xs.track_op() && bias.is_none_or(|b| !b.track_op()) && !trained_w
}

/// Whether `residual` can be added inside a projection op on `xs` with `n` outputs: the
/// output's shape and dtype.
fn residual_fits(xs: &Tensor, residual: &Tensor, n: usize) -> CResult<bool> {
    let mut dims = xs.dims().to_vec();
    match dims.last_mut() {
        Some(last) => *last = n,
        None => return Ok(false),
    }
    Ok(residual.dtype() == xs.dtype() && residual.dims() == dims.as_slice() && residual.device().same_device(xs.device()))
}

/// `xs·Wᵀ + bias` as the plain frozen product and an add.
fn frozen_linear_biased(xs: &Tensor, w: &super::FrozenWeight, bias: Option<&Tensor>) -> CResult<Tensor> {
    let y = match w {
        super::FrozenWeight::Dense(t) => frozen_linear(xs, t)?,
        super::FrozenWeight::Quantized { q, .. } => frozen_linear_blocks(xs, q)?,
    };
    match bias {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// [`FrozenMatmul`] with a residual added as its last step ([`frozen_linear_residual`]): a
/// CustomOp2 on (x, residual); the residual's gradient is the output's.
struct FrozenResidual(FrozenMatmul);

impl candle_core::CustomOp2 for FrozenResidual {
    fn name(&self) -> &'static str {
        "frozen-matmul-residual"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout, r: &CpuStorage, rl: &Layout) -> CResult<(CpuStorage, Shape)> {
        add_residual(self.0.forward(s, l, cpu_storage, "the cpu")?, r, rl)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout, r: &candle_core::CudaStorage, rl: &Layout) -> CResult<(candle_core::CudaStorage, Shape)> {
        add_residual(self.0.forward(s, l, cuda_storage, "cuda")?, r, rl)
    }

    fn bwd(&self, x: &Tensor, residual: &Tensor, res: &Tensor, grad: &Tensor) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        Ok((CustomOp1::bwd(&self.0, x, res, grad)?, residual_grad(residual, grad)))
    }
}

/// A projection op's (…, out) result plus the residual stream (same shape and dtype).
fn add_residual<S: BackendStorage>((y, shape): (S, Shape), r: &S, rl: &Layout) -> CResult<(S, Shape)> {
    let y = y.binary_impl::<candle_core::op::Add>(r, &Layout::contiguous(shape.clone()), rl)?;
    Ok((y, shape))
}

/// The residual's gradient from a projection op that added it: the output's, when the
/// residual tracks ops (the first layer's input, from frozen embeddings, does not).
fn residual_grad(residual: &Tensor, grad: &Tensor) -> Option<Tensor> {
    residual.track_op().then(|| grad.clone())
}

/// LoRA's input gradient `dY·W + d·A` (d = s·dY·B) as one buffer on CUDA with the fused
/// kernels on ([`fused::ProductSum`]); None elsewhere (the caller sums candle's products).
fn input_grad_summed(g: &Tensor, d: &Tensor, w: &Tensor, a: &Tensor) -> CResult<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    {
        let dtype_ok = matches!(g.dtype(), DType::F32 | DType::BF16 | DType::F16) && [d, w, a].iter().all(|t| t.dtype() == g.dtype());
        if g.device().is_cuda() && fused::enabled_by_env() && dtype_ok {
            let op = fused::ProductSum { w: w.contiguous()?, a: a.contiguous()? };
            return Ok(Some(g.contiguous()?.apply_op2_no_bwd(&d.contiguous()?, &op)?));
        }
    }
    let _ = (g, d, w, a);
    Ok(None)
}

/// A frozen bias as a projection op holds it: contiguous, in the activations' `dtype`.
fn bias_in(bias: Option<&Tensor>, dtype: DType) -> CResult<Option<Tensor>> {
    bias.map(|b| b.to_dtype(dtype)?.contiguous()).transpose()
}

fn frozen_product(xs: &Tensor, w: Held, n: usize) -> CResult<Tensor> {
    // A weight that is itself trained (full fine-tuning) goes through `trained_linear`, whose
    // backward gives it a gradient; the custom op gives `xs` one only.
    if let Held::Dense(t) = &w {
        if t.track_op() {
            return trained_linear(xs, &t.to_dtype(xs.dtype())?);
        }
    }
    profile::region("frozen matmul fwd", xs.device(), || {
        let dtype = xs.dtype();
        if xs.track_op() {
            // Over any leading dims: no reshape nodes (each a zero-filled gradient and an add
            // in candle's backward).
            return xs.contiguous()?.apply_op1(FrozenMatmul { w, dtype, bias: None, heads: None });
        }
        let dims = xs.dims().to_vec();
        let k = *dims.last().unwrap_or(&0);
        let m: usize = dims[..dims.len().saturating_sub(1)].iter().product();
        let out = xs.reshape((m, k))?.contiguous()?.matmul(&w.dense(dtype)?.t()?)?;
        let mut out_dims = dims;
        if let Some(last) = out_dims.last_mut() {
            *last = n;
        }
        out.reshape(out_dims)
    })
}

// ---------------------------------------------------------------------------------------------
// Trained linear (full fine-tuning)
// ---------------------------------------------------------------------------------------------

/// `x · Wᵀ` for a trained `W` (out, in), as one graph node over `x`'s leading dims.
struct TrainedMatmul;

impl candle_core::CustomOp2 for TrainedMatmul {
    fn name(&self) -> &'static str {
        "trained-matmul"
    }

    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout, w: &CpuStorage, wl: &Layout) -> CResult<(CpuStorage, Shape)> {
        let (m, k, n, x2) = product_dims(xl, wl, "trained-matmul")?;
        Ok((x.matmul(w, (1, m, n, k), &x2, &wl.transpose(0, 1)?)?, out_shape(xl, n)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, x: &candle_core::CudaStorage, xl: &Layout, w: &candle_core::CudaStorage, wl: &Layout) -> CResult<(candle_core::CudaStorage, Shape)> {
        let (m, k, n, x2) = product_dims(xl, wl, "trained-matmul")?;
        Ok((x.matmul(w, (1, m, n, k), &x2, &wl.transpose(0, 1)?)?, out_shape(xl, n)))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        profile::region("trained matmul bwd", grad.device(), || {
            let (n, k) = w.dims2()?;
            let m = x.elem_count() / k.max(1);
            let g = grad.detach().contiguous()?.reshape((m, n))?;
            // dW = dYᵀ·X, made in W's own (out, in) layout.
            let dw = g.t()?.matmul(&x.detach().reshape((m, k))?)?;
            // An input that tracks no ops gets no gradient (and costs no product).
            let dx = if x.track_op() { Some(g.matmul(&w.detach())?.reshape(x.dims())?) } else { None };
            Ok((dx, Some(dw)))
        })
    }
}

/// `xs · wᵀ` for a trained `w` of shape (out, in) (full fine-tuning's layers; `xs` may have any
/// number of leading dims): one graph node whose backward gives `w` its gradient `dYᵀ·X` in its
/// own layout and `xs` its gradient `dY·W` (only when `xs` tracks ops). candle's matmul on the
/// transposed weight, which this replaces, made the weight's gradient as (in, out) and
/// transposed it back, and its backward summed each through a zero-filled buffer (the second
/// by a strided add); the reshapes around it were two more such nodes over the activations.
pub fn trained_linear(xs: &Tensor, w: &Tensor) -> CResult<Tensor> {
    profile::region("trained matmul fwd", xs.device(), || xs.contiguous()?.apply_op2(w, TrainedMatmul))
}

/// A [`candle_core::CustomOp3`]'s `name` and forwards for a node whose result was computed
/// outside the graph and sits in its [`Handoff`] field `$field`.
macro_rules! handed_off_forward3 {
    ($field:ident, $name:literal) => {
        fn name(&self) -> &'static str {
            $name
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> CResult<(CpuStorage, Shape)> {
            self.$field.cpu($name)
        }

        #[cfg(feature = "cuda")]
        fn cuda_fwd(
            &self,
            _: &candle_core::CudaStorage,
            _: &Layout,
            _: &candle_core::CudaStorage,
            _: &Layout,
            _: &candle_core::CudaStorage,
            _: &Layout,
        ) -> CResult<(candle_core::CudaStorage, Shape)> {
            self.$field.cuda($name)
        }
    };
}

// ---------------------------------------------------------------------------------------------
// LoRA beside the frozen product
// ---------------------------------------------------------------------------------------------

/// LoRA's low-rank pair beside a frozen product (see [`lora_linear`]).
#[derive(Clone, Copy)]
pub struct LoraPair<'a> {
    /// (r, in), in the activations' dtype.
    pub a: &'a Tensor,
    /// (out, r), in the activations' dtype.
    pub b: &'a Tensor,
    /// alpha / r (or alpha / √r).
    pub scale: f64,
    /// Dropout on the update's input: (rate, seed) as [`fused::dropout`] draws it.
    pub dropout: Option<(f64, u64)>,
}

/// `y = x·Wᵀ + s·(x̃·Aᵀ)·Bᵀ` as one graph node, x̃ = dropout(x): the forward is two products
/// into the output and an add (`x̃·Aᵀ`, (tokens, r), is made first and held); the backward is
/// `dX = dY·W + dropout(s·(dY·B)·A)`, `dA = (s·dY·B)ᵀ·x̃`, `dB = s·dYᵀ·(x̃·Aᵀ)`, with x̃ drawn again
/// from the seed. The graph keeps `x`, the (tokens, r) product and the output; composed, it
/// kept the base product, the update before and after scaling (three (tokens, out) tensors
/// per adapted projection) and x̃, and spent a pass over (tokens, out) on the scaling in each
/// direction.
struct LoraProduct {
    /// (out, in).
    w: Held,
    /// The projection's frozen bias (out,), in the activations' dtype.
    bias: Option<Tensor>,
    dtype: DType,
    /// x̃·Aᵀ, (m, r), detached.
    xa: Tensor,
    scale: f64,
    dropout: Option<(f64, u64)>,
    /// DoRA's magnitude scale in the op ([`lora_linear_scaled`]): the `b` operand is then
    /// (out, r + 1), B with `g` as its last column, and the output `g ⊙ (x·Wᵀ + s·(x̃·Aᵀ)·Bᵀ)`
    /// (CPU, no bias; the backward reads the unscaled product from the output).
    col_scale: bool,
    /// The output laid out per head ([`HeadSplit`]).
    heads: Option<fused::Heads>,
}

impl LoraProduct {
    /// `x·Wᵀ + (s·xa)·Bᵀ [+ bias]` on a backend's storage.
    #[allow(clippy::too_many_arguments)]
    fn forward<S>(&self, x: &S, xl: &Layout, b: &S, bl: &Layout, w: &S, wl: &Layout, xa: &S, xal: &Layout, bias: Option<(&S, &Layout)>) -> CResult<(S, Shape)>
    where
        S: BackendStorage,
    {
        let (m, k, xl2) = token_rows(xl)?;
        let (n, r) = bl.shape().dims2()?;
        if wl.shape().dims2()? != (n, k) || xal.shape().dims2()? != (m, r) {
            candle_core::bail!("lora-product: x {:?}, W {:?}, B {:?}, x·Aᵀ {:?} do not fit", xl.shape(), wl.shape(), bl.shape(), xal.shape());
        }
        let y = x.matmul(w, (1, m, n, k), &xl2, &wl.transpose(0, 1)?)?;
        let small = Layout::contiguous((m, r));
        let xa_s = xa.affine(xal, self.scale, 0.0)?;
        let up = xa_s.matmul(b, (1, m, n, r), &small, &bl.transpose(0, 1)?)?;
        let out = Layout::contiguous((m, n));
        let mut y = y.binary_impl::<candle_core::op::Add>(&up, &out, &out)?;
        if let Some((bias, bias_l)) = bias {
            y = y.binary_impl::<candle_core::op::Add>(bias, &out, &bias_l.broadcast_as((m, n))?)?;
        }
        Ok((y, out_shape(xl, n)))
    }

    /// [`Self::forward`] with the weight `w`, x̃·Aᵀ and the bias read as the backend's storage
    /// (`pick`: the backend's variant of [`Storage`]; `device` names it in the error).
    #[allow(clippy::too_many_arguments)]
    fn forward_held<S>(&self, x: &S, xl: &Layout, b: &S, bl: &Layout, w: &Tensor, pick: fn(&Storage) -> Option<&S>, device: &str) -> CResult<(S, Shape)>
    where
        S: BackendStorage,
    {
        let (ws, wl) = w.storage_and_layout();
        // x̃·Aᵀ in the operands' dtype (the CPU's 16-bit path holds it in f32).
        let xa = self.xa.to_dtype(self.dtype)?;
        let (xas, xal) = xa.storage_and_layout();
        let bias = self.bias.as_ref().map(|t| t.storage_and_layout());
        let (Some(w), Some(xa)) = (pick(&ws), pick(&xas)) else { candle_core::bail!("lora-product: weight not on {device}") };
        let bias = match &bias {
            Some((st, l)) => Some((pick(st).ok_or_else(|| candle_core::Error::Msg(format!("lora-product: bias not on {device}")))?, *l)),
            None => None,
        };
        self.forward(x, xl, b, bl, w, wl, xa, xal, bias)
    }

    fn dropped(&self, x: &Tensor) -> CResult<Tensor> {
        dropped(x, self.dropout)
    }

    /// The forward's (tokens, out) rows on CUDA, plus the `residual` (…, out) where given:
    /// with the fused kernels on, both products summed in one buffer that starts as the
    /// residual or the broadcast bias ([`fused::lora_rows_cuda`]); else candle's products and
    /// adds ([`Self::forward_held`]).
    #[cfg(feature = "cuda")]
    fn cuda_rows(&self, x: &candle_core::CudaStorage, xl: &Layout, b: &candle_core::CudaStorage, bl: &Layout, residual: Option<(&candle_core::CudaStorage, &Layout)>) -> CResult<(candle_core::CudaStorage, Shape)> {
        let w = self.w.dense(self.dtype)?;
        let n = bl.shape().dims2()?.0;
        let single_init = residual.is_none() || self.bias.is_none();
        if fused::enabled_by_env() && single_init && xl.is_contiguous() && residual.is_none_or(|(_, l)| l.is_contiguous()) {
            let (m, _, _) = token_rows(xl)?;
            let xa = self.xa.to_dtype(self.dtype)?;
            let bias = self.bias.as_ref().map(|t| t.storage_and_layout());
            let init = match (residual, &bias) {
                (Some((r, l)), _) => Some((r, Layout::contiguous_with_offset((m, n), l.start_offset()))),
                (None, Some((st, l))) => match cuda_storage(st) {
                    Some(s) => Some((s, l.broadcast_as((m, n))?)),
                    None => candle_core::bail!("lora-product: bias not on cuda"),
                },
                (None, None) => None,
            };
            if let Some(y) = fused::lora_rows_cuda(x, xl, b, bl, &w, &xa, self.scale, init.as_ref().map(|(s, l)| (*s, l)))? {
                return Ok((y, out_shape(xl, n)));
            }
        }
        let y = self.forward_held(x, xl, b, bl, &w, cuda_storage, "cuda")?;
        match residual {
            Some((r, rl)) => add_residual(y, r, rl),
            None => Ok(y),
        }
    }

    /// The CPU's forward in f32: y = [bias +] x·Wᵀ, then y += s·(x̃·Aᵀ)·Bᵀ into the same
    /// buffer. `x`, `b`: the contiguous operands' values; `w`, `xa`, `bias`: contiguous f32.
    #[allow(clippy::too_many_arguments)]
    fn product_f32(&self, x: &[f32], xl: &Layout, b: &[f32], bl: &Layout, w: &Tensor, xa: &Tensor, bias: Option<&Tensor>) -> CResult<Vec<f32>> {
        let (m, k, _) = token_rows(xl)?;
        let (n, cols) = bl.shape().dims2()?;
        let r = if self.col_scale { cols.saturating_sub(1) } else { cols };
        if self.col_scale && bias.is_some() {
            candle_core::bail!("lora-product: a column scale with a bias inside the op");
        }
        let mut y = vec![0f32; m * n];
        if let Some(bias) = bias {
            cpu_f32(bias, |bias| {
                if bias.len() != n {
                    candle_core::bail!("lora-product: bias of {} for {n} outputs", bias.len());
                }
                y.chunks_mut(n).for_each(|row| row.copy_from_slice(bias));
                Ok(())
            })?;
        }
        cpu_f32(w, |w| cpu_gemm(&mut y, (m, n, k), bias.is_some(), (x, k, 1), (w, 1, k), 1.0, true))?;
        cpu_f32(xa, |xa| cpu_gemm(&mut y, (m, n, r), true, (xa, r, 1), (b, 1, cols), self.scale as f32, true))?;
        if self.col_scale {
            // y ⊙= g, B's last column.
            let g: Vec<f32> = (0..n).map(|j| b[j * cols + r]).collect();
            y.par_chunks_mut(n.max(1)).for_each(|row| row.iter_mut().zip(&g).for_each(|(v, g)| *v *= g));
        }
        Ok(y)
    }
}

/// A product `x·Wᵀ`'s (tokens, in, out) for a contiguous input `xl` of any rank and a weight
/// `wl` (out, in), and the input as the (tokens, in) matrix it reads.
fn product_dims(xl: &Layout, wl: &Layout, op: &str) -> CResult<(usize, usize, usize, Layout)> {
    let (m, k, x2) = token_rows(xl)?;
    let (n, kw) = wl.shape().dims2()?;
    if k != kw {
        candle_core::bail!("{op}: input width {k} != weight width {kw}");
    }
    Ok((m, k, n, x2))
}

/// A contiguous input of any rank as the (tokens, features) matrix a product reads: its rows,
/// columns, and that matrix's layout (at the input's offset).
fn token_rows(l: &Layout) -> CResult<(usize, usize, Layout)> {
    if !l.is_contiguous() {
        candle_core::bail!("product: input {:?} is not contiguous", l.shape());
    }
    let k = l.shape().dims().last().copied().unwrap_or(1);
    let m = if k == 0 { 0 } else { l.shape().elem_count() / k };
    Ok((m, k, Layout::contiguous_with_offset((m, k), l.start_offset())))
}

/// The input's shape with its last dimension replaced by `n` (a product's output).
fn out_shape(l: &Layout, n: usize) -> Shape {
    let mut dims = l.shape().dims().to_vec();
    match dims.last_mut() {
        Some(last) => *last = n,
        None => dims.push(n),
    }
    Shape::from(dims)
}

/// `x` with dropout (rate, seed) applied, or `x` itself.
fn dropped(x: &Tensor, dropout: Option<(f64, u64)>) -> CResult<Tensor> {
    match dropout {
        Some((p, seed)) => fused::dropout(x, p, seed),
        None => Ok(x.clone()),
    }
}

/// `dst (m×n, row-major) = [dst +] beta·lhs·rhs` in f32 on the CPU through gemm (candle's CPU
/// matmul kernel), so a second product accumulates into the first's output instead of making
/// its own and adding (a pass over the output saved). `lhs` (m×k) and `rhs` (k×n) are (data,
/// row stride, column stride). `parallel`: split the product over candle's CPU threads (false
/// inside a task that is already one of many in parallel).
#[allow(clippy::too_many_arguments)]
pub(super) fn cpu_gemm(
    dst: &mut [f32],
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
    lhs: (&[f32], usize, usize),
    rhs: (&[f32], usize, usize),
    beta: f32,
    parallel: bool,
) -> CResult<()> {
    if dst.len() != m * n {
        candle_core::bail!("cpu-gemm: {} outputs for a {m}×{n} product", dst.len());
    }
    cpu_gemm_rows(dst, n, (m, n, k), accumulate, lhs, rhs, beta, parallel)
}

/// [`cpu_gemm`] into `dst` rows `dst_stride` apart (a block of columns of a wider matrix).
#[allow(clippy::too_many_arguments)]
pub(super) fn cpu_gemm_rows(
    dst: &mut [f32],
    dst_stride: usize,
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
    lhs: (&[f32], usize, usize),
    rhs: (&[f32], usize, usize),
    beta: f32,
    parallel: bool,
) -> CResult<()> {
    let reach = |rows: usize, cols: usize, (d, rs, cs): (&[f32], usize, usize)| rows == 0 || cols == 0 || (rows - 1) * rs + (cols - 1) * cs < d.len();
    if dst_stride < n || !reach(m, n, (&*dst, dst_stride, 1)) || !reach(m, k, lhs) || !reach(k, n, rhs) {
        candle_core::bail!("cpu-gemm: operands do not cover a {m}×{k} · {k}×{n} product");
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    let threads = if parallel { candle_core::utils::get_num_threads() } else { 1 };
    let par = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    // SAFETY: every index gemm touches is inside its slice (checked above: the last row and
    // column of each operand are in bounds, strides are non-negative), and `dst` is exclusive.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_stride as isize,
            accumulate,
            lhs.0.as_ptr(),
            lhs.2 as isize,
            lhs.1 as isize,
            rhs.0.as_ptr(),
            rhs.2 as isize,
            rhs.1 as isize,
            1.0,
            beta,
            false,
            false,
            false,
            par,
        );
    }
    Ok(())
}

fn cpu_storage(s: &Storage) -> Option<&CpuStorage> {
    match s {
        Storage::Cpu(c) => Some(c),
        _ => None,
    }
}

#[cfg(feature = "cuda")]
pub(crate) fn cuda_storage(s: &Storage) -> Option<&candle_core::CudaStorage> {
    match s {
        Storage::Cuda(c) => Some(c),
        _ => None,
    }
}

/// `f` on a tensor an op holds, as the backend's storage (`pick`: the backend's variant of
/// [`Storage`]; `device` names it and `what` the tensor in the error).
pub(crate) fn on_storage<S, R>(t: &Tensor, pick: fn(&Storage) -> Option<&S>, device: &str, what: &str, f: impl FnOnce(&S, &Layout) -> CResult<R>) -> CResult<R> {
    let (st, l) = t.storage_and_layout();
    let Some(s) = pick(&st) else { candle_core::bail!("{what} not on {device}") };
    f(s, l)
}

/// `f` on a contiguous f32 CPU tensor's elements.
fn cpu_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> CResult<R>) -> CResult<R> {
    cpu_f32s([t], |[x]| f(x))
}

/// `f` on the elements of several contiguous f32 CPU tensors at once.
fn cpu_f32s<const N: usize, R>(ts: [&Tensor; N], f: impl FnOnce([&[f32]; N]) -> CResult<R>) -> CResult<R> {
    let held = ts.map(|t| t.storage_and_layout());
    let mut slices = Vec::with_capacity(N);
    for (s, l) in &held {
        let Some(c) = cpu_storage(s) else { candle_core::bail!("cpu-f32: tensor not on the cpu") };
        slices.push(contiguous_f32(c, l, "cpu-f32")?);
    }
    let Ok(slices) = <[&[f32]; N]>::try_from(slices) else { candle_core::bail!("cpu-f32: {N} tensors expected") };
    f(slices)
}

fn f32_contiguous(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous()
}

impl candle_core::CustomOp3 for LoraProduct {
    fn name(&self) -> &'static str {
        "lora-product"
    }

    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout, _a: &CpuStorage, _al: &Layout, b: &CpuStorage, bl: &Layout) -> CResult<(CpuStorage, Shape)> {
        into_heads_cpu(&self.heads, self.cpu_rows(x, xl, b, bl)?)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        _a: &candle_core::CudaStorage,
        _al: &Layout,
        b: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> CResult<(candle_core::CudaStorage, Shape)> {
        if self.col_scale {
            candle_core::bail!("lora-product: a column scale is the cpu's");
        }
        into_heads_cuda(&self.heads, self.cuda_rows(x, xl, b, bl, None)?)
    }

    fn bwd(&self, x: &Tensor, a: &Tensor, b: &Tensor, res: &Tensor, grad: &Tensor) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        profile::region("lora product bwd", grad.device(), || self.grads(x, x.track_op(), a, b, res, &out_of_heads(&self.heads, grad)?))
    }
}

impl LoraProduct {
    /// The CPU forward's (tokens, out) rows, before any move into heads.
    fn cpu_rows(&self, x: &CpuStorage, xl: &Layout, b: &CpuStorage, bl: &Layout) -> CResult<(CpuStorage, Shape)> {
        let w = self.w.dense(self.dtype)?;
        let bias_ok = self.bias.as_ref().is_none_or(f32_contiguous);
        let n = bl.shape().dims2()?.0;
        if self.dtype == DType::F32 && f32_contiguous(&w) && f32_contiguous(&self.xa) && bias_ok && xl.is_contiguous() && bl.is_contiguous() {
            let (x, b) = (contiguous_f32(x, xl, "lora-product")?, contiguous_f32(b, bl, "lora-product")?);
            let y = self.product_f32(x, xl, b, bl, &w, &self.xa, self.bias.as_ref())?;
            return Ok((CpuStorage::F32(y), out_shape(xl, n)));
        }
        if matches!(self.dtype, DType::BF16 | DType::F16) && xl.is_contiguous() && bl.is_contiguous() {
            // 16-bit on the CPU: the operands widened to f32 (exactly) for gemm's f32 kernels,
            // the result rounded once; candle's 16-bit products run at a third of f32's rate.
            let op = "lora-product";
            let (x, b) = (fused::cpu_values(x, xl, op)?, fused::cpu_values(b, bl, op)?);
            let bias = self.bias.as_ref().map(f32_copy).transpose()?;
            let y = self.product_f32(&x, xl, &b, bl, &f32_copy(&w)?, &f32_copy(&self.xa)?, bias.as_ref())?;
            return Ok((fused::cpu_store(y, self.dtype, op)?, out_shape(xl, n)));
        }
        if self.col_scale {
            candle_core::bail!("lora-product: a column scale needs contiguous operands on the cpu");
        }
        self.forward_held(x, xl, b, bl, &w, cpu_storage, "the cpu")
    }

    /// The backward from the output's gradient in (tokens, out) rows; `x`'s gradient only
    /// when `x_tracks` (an input that tracks no ops — the first layer's, from frozen embeddings
    /// — gets none).
    #[allow(clippy::too_many_arguments)]
    fn grads(&self, x: &Tensor, x_tracks: bool, a: &Tensor, b: &Tensor, res: &Tensor, grad: &Tensor) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // A column scale g: the gradient of the unscaled product is dY ⊙ g, g's own is
        // Σ_tokens dY ⊙ (x·Wᵀ + s·x̃·Aᵀ·Bᵀ); then LoRA's backward with B alone.
        let (grad, b, dg) = if self.col_scale {
            let (dz, b_only, dg) = self.column_scale_grads(x, b, &out_of_heads(&self.heads, res)?, grad)?;
            (dz, b_only, Some(dg))
        } else {
            (grad.clone(), b.clone(), None)
        };
        let (grad, b) = (&grad, &b);
        // Leading dimensions flattened: (tokens, in) and (tokens, out).
        let x_dims = x.dims().to_vec();
        let (m, k) = (x.elem_count() / a.dim(1)?.max(1), a.dim(1)?);
        // 16-bit on the CPU: computed in f32 (gemm's f32 kernels), the gradients rounded
        // back to each operand's dtype at the end.
        let half_cpu = grad.device().is_cpu() && matches!(self.dtype, DType::BF16 | DType::F16);
        let (x_dtype, a_dtype, b_dtype) = (x.dtype(), a.dtype(), b.dtype());
        let work = if half_cpu { DType::F32 } else { self.dtype };
        let wide = |t: Tensor| in_work(&t, work);
        let (x, a, b) = (wide(x.detach().reshape((m, k))?)?, wide(a.detach())?, wide(b.detach())?);
        let g = wide(grad.detach().contiguous()?.reshape((m, b.dim(0)?))?)?;
        let xa = wide(self.xa.clone())?;
        // s·dY·B, (m, r): the update's input side.
        let dxa = (g.matmul(&b)? * self.scale)?;
        let db = (g.t()?.matmul(&xa)? * self.scale)?;
        let da = dxa.t()?.matmul(&self.dropped(&x)?)?;
        let dx = if !x_tracks {
            None
        } else if self.dropout.is_none() && f32_contiguous(&g) && f32_contiguous(&dxa) && f32_contiguous(&a) {
            // dX = dY·W, then dX += (s·dY·B)·A into the same buffer.
            let w = wide(self.w.dense(self.dtype)?)?.contiguous()?;
            let ((m, n), (r, k)) = (g.dims2()?, a.dims2()?);
            let mut dx = vec![0f32; m * k];
            cpu_f32s([&g, &w], |[g, w]| cpu_gemm(&mut dx, (m, k, n), false, (g, n, 1), (w, k, 1), 1.0, true))?;
            cpu_f32s([&dxa, &a], |[d, a]| cpu_gemm(&mut dx, (m, k, r), true, (d, r, 1), (a, k, 1), 1.0, true))?;
            Some(Tensor::from_vec(dx, x_dims, &Device::Cpu)?)
        } else {
            let w = wide(self.w.dense(self.dtype)?)?;
            match self.dropout.is_none().then(|| input_grad_summed(&g, &dxa, &w, &a)).transpose()?.flatten() {
                Some(dx) => Some(dx.reshape(x_dims)?),
                None => Some((g.matmul(&w)? + self.dropped(&dxa.matmul(&a)?)?)?.reshape(x_dims)?),
            }
        };
        let narrow = |t: Tensor, dtype: DType| if half_cpu { narrowed(&t, dtype) } else { Ok(t) };
        let db = match dg {
            Some(dg) => Tensor::cat(&[&db, &dg.to_dtype(db.dtype())?.unsqueeze(1)?], 1)?,
            None => db,
        };
        Ok((dx.map(|t| narrow(t, x_dtype)).transpose()?, Some(narrow(da, a_dtype)?), Some(narrow(db, b_dtype)?)))
    }
}

impl LoraProduct {
    /// The column scale's part of the backward: from the op's output `y = g ⊙ z` and its
    /// gradient, `dz = dY ⊙ g`, B without g's column, and `dg = Σ_tokens dY ⊙ z` with
    /// `z = y / g` — where some `g_j` is 0 (its column of y is all zeros), that column of z is
    /// computed again, `x·W_jᵀ + s·(x̃·Aᵀ)·B_jᵀ`.
    fn column_scale_grads(&self, x: &Tensor, bg: &Tensor, y: &Tensor, grad: &Tensor) -> CResult<(Tensor, Tensor, Tensor)> {
        let (n, cols) = bg.dims2()?;
        let r = cols - 1;
        let bg = bg.detach();
        let g = bg.narrow(1, r, 1)?.squeeze(1)?.contiguous()?;
        let b = bg.narrow(1, 0, r)?.contiguous()?;
        let m = grad.elem_count() / n.max(1);
        let dy = grad.detach().contiguous()?.reshape((m, n))?;
        let y = y.detach().reshape((m, n))?;
        let gv = g.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let zero: Vec<u32> = (0..n as u32).filter(|&j| gv[j as usize] == 0.0).collect();
        // 1/g, with 0 where g is 0 (those columns are filled below).
        let inv: Vec<f32> = gv.iter().map(|&v| if v == 0.0 { 0.0 } else { 1.0 / v }).collect();
        // (The op takes a column scale only in f32 on the CPU: `lora_linear_scaled`.)
        if !(f32_contiguous(&dy) && f32_contiguous(&y)) {
            candle_core::bail!("lora-product: a column scale's gradient needs contiguous f32 on the cpu");
        }
        // The channel op's backward passes: Σ dY ⊙ y, and dz = dY ⊙ g.
        let (dg, dz) = cpu_f32s([&dy, &y], |[dy, y]| {
            let sums = channel_sums(dy, y, n, Channel::Scale);
            Ok((sums.iter().zip(&inv).map(|(s, i)| s * i).collect::<Vec<f32>>(), channel_rows(dy, &gv, Channel::Scale)))
        })?;
        let (mut dg, dz) = (Tensor::from_vec(dg, n, &Device::Cpu)?, Tensor::from_vec(dz, (m, n), &Device::Cpu)?);
        if !zero.is_empty() {
            let x2 = x.detach().reshape((m, x.dim(D::Minus1)?))?;
            dg = scale_grad_at_zero_g(dg, &zero, &dy, &x2, &self.w.dense(self.dtype)?, &self.xa.to_dtype(y.dtype())?, &b, self.scale)?;
        }
        Ok((dz.reshape(grad.shape())?, b, dg))
    }
}

/// `xs·Wᵀ + bias + s·(dropout(xs)·Aᵀ)·Bᵀ` (a LoRA-adapted projection in training) as one op,
/// for a dense frozen `w` (out, in) or one held as quantized blocks and an optional frozen
/// `bias` (out,); `xs` may have any number of leading dims. Gradients go to `xs` (when it
/// tracks ops), A and B; W and the bias get none (a bias that is trained, i.e. tracks ops, is
/// added after the op instead).
pub fn lora_linear(xs: &Tensor, w: &super::FrozenWeight, bias: Option<&Tensor>, pair: LoraPair) -> CResult<Tensor> {
    if let Some(b) = bias.filter(|b| b.track_op()) {
        return lora_linear(xs, w, None, pair)?.broadcast_add(b);
    }
    lora_product(xs, w, bias, pair, false, None)
}

/// `split(lora_linear(xs, …))` for `xs` (b, s, in): where the split is one op, the same node
/// as [`lora_linear`]'s with its output already per head ([`HeadSplit`]).
pub fn lora_linear_heads(xs: &Tensor, w: &super::FrozenWeight, bias: Option<&Tensor>, pair: LoraPair, split: HeadSplit) -> CResult<Tensor> {
    match split.epilogue(xs, pair.b.dim(0)?)? {
        Some(heads) if bias.is_none_or(|b| !b.track_op()) => lora_product(xs, w, bias, pair, false, Some(heads)),
        _ => split.apply(&lora_linear(xs, w, bias, pair)?),
    }
}

/// DoRA's training product for its magnitude scale `g` (out,), tracked, in PEFT's form:
/// `xs·Wᵀ + (g − 1) ⊙ (x̃·Wᵀ) + g ⊙ s·(x̃·Aᵀ)·Bᵀ`, x̃ = dropout(xs). Without dropout that is
/// `g ⊙ (xs·Wᵀ + s·(xs·Aᵀ)·Bᵀ)`: on the CPU in f32 one [`lora_linear`] op with `g` as an extra
/// column of B, whose backward reads the unscaled product from the op's output (`y / g`), so
/// the graph keeps no (tokens, out) tensor beyond the output. Elsewhere, and with dropout, one
/// node of its own on tensor ops ([`DoraProduct`]), on every device and dtype.
pub fn lora_linear_scaled(xs: &Tensor, w: &super::FrozenWeight, pair: LoraPair, g: &Tensor) -> CResult<Tensor> {
    scaled_product(xs, w, pair, g, None)
}

/// `split(lora_linear_scaled(xs, …))` for `xs` (b, s, in): where the split is one op, the
/// same node as [`lora_linear_scaled`]'s with its output already per head ([`HeadSplit`]).
pub fn lora_linear_scaled_heads(xs: &Tensor, w: &super::FrozenWeight, pair: LoraPair, g: &Tensor, split: HeadSplit) -> CResult<Tensor> {
    match split.epilogue(xs, pair.b.dim(0)?)? {
        Some(heads) => scaled_product(xs, w, pair, g, Some(heads)),
        None => split.apply(&scaled_product(xs, w, pair, g, None)?),
    }
}

fn scaled_product(xs: &Tensor, w: &super::FrozenWeight, pair: LoraPair, g: &Tensor, heads: Option<fused::Heads>) -> CResult<Tensor> {
    if !column_scale_fits(xs, pair, g)? {
        return profile::region("dora product fwd", xs.device(), || dora_product(xs, w, pair, g, heads));
    }
    let bg = b_with_scale(pair.b, g)?;
    lora_product(xs, w, None, LoraPair { b: &bg, ..pair }, true, heads)
}

/// Whether DoRA's scale `g` can be LoRA's op's column scale ([`LoraProduct::col_scale`]): f32
/// on the CPU, without dropout.
fn column_scale_fits(xs: &Tensor, pair: LoraPair, g: &Tensor) -> CResult<bool> {
    let fits = g.elem_count() == pair.b.dim(0)? && g.dtype() == DType::F32 && pair.b.dtype() == DType::F32 && pair.a.dtype() == DType::F32;
    Ok(fits && use_fused(xs) && pair.dropout.is_none())
}

/// B (out, r) with DoRA's scale `g` (out,) as its last column: the column-scale op's operand.
fn b_with_scale(b: &Tensor, g: &Tensor) -> CResult<Tensor> {
    Tensor::cat(&[b, &g.reshape((b.dim(0)?, 1))?], 1)
}

/// [`lora_linear_scaled`] on SwiGLU's product of `g`, `u` (DoRA's down_proj): where the scale
/// is the op's column scale (f32 on the CPU, without dropout), the product is made inside the
/// op ([`LoraSwiglu`]), so the graph keeps g and u but not the product. The residual is added
/// after the node: the column scale's backward reads the unscaled product back from the op's
/// output.
pub fn lora_linear_scaled_swiglu(g: &Tensor, u: &Tensor, w: &super::FrozenWeight, pair: LoraPair, scale: &Tensor) -> CResult<Tensor> {
    if swiglu_fits(g, u) && column_scale_fits(g, pair, scale)? {
        let bg = b_with_scale(pair.b, scale)?;
        return lora_swiglu_op(g, u, w, None, LoraPair { b: &bg, ..pair }, true, None);
    }
    lora_linear_scaled(&swiglu(g, u)?, w, pair, scale)
}

/// DoRA's product as one node on tensor ops ([`lora_linear_scaled`] off the CPU's f32 path,
/// and with dropout): `y = (x − x̃)·Wᵀ + g ⊙ z` with `z = x̃·Wᵀ + s·(x̃·Aᵀ)·Bᵀ` (PEFT's
/// `x·Wᵀ + (g − 1) ⊙ (x̃·Wᵀ) + g ⊙ s·(x̃·Aᵀ)·Bᵀ` regrouped; without dropout x̃ = x and y = g ⊙ z),
/// computed outside the graph. Its operands are x, A and B with g as its last column; it keeps
/// x̃·Aᵀ (tokens, r), and with dropout z (tokens, out) for g's gradient `Σ_tokens dY ⊙ z`
/// (without, z is read back from the output as y / g, and computed again for any column
/// whose g is 0); x̃ is drawn again from the seed. With `dZ = dY ⊙ g`:
/// `dX = dY·W + dropout((dZ − dY)·W + s·(dZ·B)·A)` (without dropout `dZ·W + s·(dZ·B)·A`),
/// `dA = (s·dZ·B)ᵀ·x̃`, `dB = s·dZᵀ·(x̃·Aᵀ)`. Composed, the graph kept seven (tokens, out)
/// tensors per projection with dropout (x̃·Wᵀ, its scaling by g − 1, the update before and
/// after s and g, two sums) and x̃, and the unscaled product without.
struct DoraProduct {
    /// (out, in).
    w: Held,
    /// The dtype the products run in: f32 for 16-bit CPU operands (gemm's f32 kernels, as in
    /// [`LoraProduct`]), the operands' own elsewhere.
    work: DType,
    /// x̃·Aᵀ, (tokens, r), in `work`.
    xa: Tensor,
    /// With dropout, z (tokens, out) in the activations' dtype.
    z: Option<Tensor>,
    /// The forward's result.
    out: Handoff,
    scale: f64,
    dropout: Option<(f64, u64)>,
    /// The output laid out per head ([`HeadSplit`]).
    heads: Option<fused::Heads>,
}

/// `t` in `work` (f32 copies of 16-bit CPU tensors).
fn in_work(t: &Tensor, work: DType) -> CResult<Tensor> {
    if t.dtype() == work {
        Ok(t.clone())
    } else {
        f32_copy(t)?.to_dtype(work)
    }
}

fn dora_product(xs: &Tensor, w: &super::FrozenWeight, pair: LoraPair, g: &Tensor, heads: Option<fused::Heads>) -> CResult<Tensor> {
    let x = xs.contiguous()?;
    let k = x.dims().last().copied().unwrap_or(0);
    let m = if k == 0 { 0 } else { x.elem_count() / k };
    let n = pair.b.dim(0)?;
    let dtype = x.dtype();
    let work = if x.device().is_cpu() && matches!(dtype, DType::BF16 | DType::F16) { DType::F32 } else { dtype };
    let held = Held::of(w);
    let wt = held.dense(work)?.t()?;
    let x2 = in_work(&x.detach().reshape((m, k))?, work)?;
    let xd = dropped(&x2, pair.dropout)?;
    let xa = xd.matmul(&in_work(&pair.a.detach(), work)?.t()?)?;
    let update = (xa.matmul(&in_work(&pair.b.detach(), work)?.t()?)? * pair.scale)?;
    let z = (xd.matmul(&wt)? + update)?;
    let scaled = z.broadcast_mul(&in_work(&g.detach(), work)?)?;
    let (out, z) = match pair.dropout {
        Some(_) => (((x2 - xd)?.matmul(&wt)? + scaled)?, Some(narrowed(&z, dtype)?)),
        None => (scaled, None),
    };
    let out = narrowed(&out, dtype)?.reshape(out_shape(x.layout(), n))?;
    let out = match &heads {
        Some(h) => out.apply_op1_no_bwd(h)?,
        None => out,
    };
    let bg = Tensor::cat(&[pair.b, &g.to_dtype(pair.b.dtype())?.reshape((n, 1))?], 1)?;
    let op = DoraProduct { w: held, work, xa, z, out: Handoff::new(out), scale: pair.scale, dropout: pair.dropout, heads };
    x.apply_op3(&pair.a.contiguous()?, &bg, op)
}

impl candle_core::CustomOp3 for DoraProduct {
    handed_off_forward3!(out, "dora-product");

    fn bwd(&self, x: &Tensor, a: &Tensor, bg: &Tensor, res: &Tensor, grad: &Tensor) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        profile::region("dora product bwd", grad.device(), || self.grads(x, a, bg, res, &out_of_heads(&self.heads, grad)?))
    }
}

impl DoraProduct {
    fn grads(&self, x: &Tensor, a: &Tensor, bg: &Tensor, res: &Tensor, grad: &Tensor) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (work, s) = (self.work, self.scale);
        let (n, cols) = bg.dims2()?;
        let r = cols - 1;
        let k = a.dim(1)?;
        let m = grad.elem_count() / n.max(1);
        let dy = in_work(&grad.detach().contiguous()?.reshape((m, n))?, work)?;
        let bgw = in_work(&bg.detach(), work)?;
        let (b, g) = (bgw.narrow(1, 0, r)?.contiguous()?, bgw.narrow(1, r, 1)?.squeeze(1)?.contiguous()?);
        let aw = in_work(&a.detach(), work)?;
        let x2 = in_work(&x.detach().reshape((m, k))?, work)?;
        let dg = match &self.z {
            Some(z) => column_sums(&(&dy * in_work(z, work)?)?)?,
            None => self.scale_grad_from_output(&dy, &out_of_heads(&self.heads, res)?, &g, &x2, &b)?,
        };
        let dz = dy.broadcast_mul(&g)?;
        // s·dZ·B, (tokens, r): the update's input side.
        let dxa = (dz.matmul(&b)? * s)?;
        let db = (dz.t()?.matmul(&self.xa)? * s)?;
        let da = dxa.t()?.matmul(&dropped(&x2, self.dropout)?)?;
        let dx = if x.track_op() {
            let w = self.w.dense(work)?;
            let dx = match self.dropout {
                Some(d) => (dy.matmul(&w)? + dropped(&((dz - &dy)?.matmul(&w)? + dxa.matmul(&aw)?)?, Some(d))?)?,
                None => (dz.matmul(&w)? + dxa.matmul(&aw)?)?,
            };
            Some(dx.reshape(x.dims())?)
        } else {
            None
        };
        let dbg = Tensor::cat(&[&db, &dg.unsqueeze(1)?], 1)?;
        Ok((dx.map(|t| narrowed(&t, x.dtype())).transpose()?, Some(narrowed(&da, a.dtype())?), Some(narrowed(&dbg, bg.dtype())?)))
    }

    /// Without dropout, g's gradient `Σ_tokens dY ⊙ z` from the output `y = g ⊙ z`: `(Σ dY ⊙ y) / g`,
    /// and for a column whose g is 0 (its y all zeros) from z computed again,
    /// `x·W_jᵀ + s·(x·Aᵀ)·B_jᵀ`. All in `work`; `x2` is the input as (tokens, in).
    fn scale_grad_from_output(&self, dy: &Tensor, res: &Tensor, g: &Tensor, x2: &Tensor, b: &Tensor) -> CResult<Tensor> {
        let (m, n) = dy.dims2()?;
        let y = in_work(&res.detach().contiguous()?.reshape((m, n))?, self.work)?;
        // (In f64: exact for every dtype g comes in.)
        let gv = g.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        let inv: Vec<f64> = gv.iter().map(|&v| if v == 0.0 { 0.0 } else { 1.0 / v }).collect();
        let inv = Tensor::from_vec(inv, n, &Device::Cpu)?.to_dtype(self.work)?.to_device(dy.device())?;
        let dg = column_sums(&(dy * y)?)?.mul(&inv)?;
        let zero: Vec<u32> = (0..n as u32).filter(|&j| gv[j as usize] == 0.0).collect();
        if zero.is_empty() {
            return Ok(dg);
        }
        scale_grad_at_zero_g(dg, &zero, dy, x2, &self.w.dense(self.work)?, &self.xa, b, self.scale)
    }
}

/// A column scale g's gradient where g is 0 (the output's column is all zeros there, so y / g
/// cannot give the unscaled product z): `Σ_tokens dY_j ⊙ z_j` with `z_j = x·W_jᵀ + s·(x·Aᵀ)·B_jᵀ`
/// computed again for the `zero` columns only, written into `dg` (n,) there. `x2` is the input
/// as (tokens, in), `xa` x·Aᵀ; all in one dtype on one device. Both readers of z from the
/// output take it: [`LoraProduct`]'s column scale and [`DoraProduct`].
#[allow(clippy::too_many_arguments)]
fn scale_grad_at_zero_g(dg: Tensor, zero: &[u32], dy: &Tensor, x2: &Tensor, w: &Tensor, xa: &Tensor, b: &Tensor, scale: f64) -> CResult<Tensor> {
    let dev = dy.device();
    let idx = Tensor::from_vec(zero.to_vec(), zero.len(), &Device::Cpu)?.to_device(dev)?;
    let z = (x2.matmul(&w.index_select(&idx, 0)?.t()?)? + (xa.matmul(&b.index_select(&idx, 0)?.t()?)? * scale)?)?;
    let dg_zero = column_sums(&(dy.index_select(&idx, 1)? * z)?)?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    let mut all = dg.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    for (j, v) in zero.iter().zip(dg_zero) {
        all[*j as usize] = v;
    }
    let n = all.len();
    Tensor::from_vec(all, n, &Device::Cpu)?.to_dtype(dg.dtype())?.to_device(dev)
}

/// A (tokens, n) matrix's column sums in its dtype, accumulated in f32 for 16-bit ones (a
/// GPU's bf16 sum over thousands of tokens would round at every step).
fn column_sums(t: &Tensor) -> CResult<Tensor> {
    match t.dtype() {
        DType::BF16 | DType::F16 => t.to_dtype(DType::F32)?.sum(0)?.to_dtype(t.dtype()),
        _ => t.sum(0),
    }
}

/// [`lora_linear_scaled`] from differentiable primitives, PEFT's form
/// `xs·Wᵀ + (g − 1) ⊙ (x̃·Wᵀ) + g ⊙ s·(x̃·Aᵀ)·Bᵀ`: the reference it is held to.
pub fn lora_linear_scaled_composed(xs: &Tensor, w: &Tensor, pair: LoraPair, g: &Tensor) -> CResult<Tensor> {
    let x = dropped_composed(xs, pair.dropout)?;
    let base = xs.broadcast_matmul(&w.t()?)?;
    let dropped_base = x.broadcast_matmul(&w.t()?)?;
    let update = (x.broadcast_matmul(&pair.a.t()?)?.broadcast_matmul(&pair.b.t()?)? * pair.scale)?;
    (base + (dropped_base.clone() + update)?.broadcast_mul(g)?)? - dropped_base
}

/// DoRA's row norms `‖W + s·B·A‖_row` (out,) for A (r, in), B (out, r), the frozen `w`
/// (out, in) and its squared row norms `w2` (out,), without forming W + s·B·A: the squared norm
/// is `w2 + 2s·⟨B_j, (A·Wᵀ)ᵀ_j⟩ + s²·B_j·(A·Aᵀ)·B_jᵀ`. Computed outside the graph (in f32, or
/// f64 for f64 operands) and given a backward of its own that hands A and B their gradients
/// directly:
/// `dB = 2s·c ⊙ P` and `dA = 2s·(c ⊙ B)ᵀ·(W + s·B·A)` (as `(c ⊙ B)ᵀ·W + s·((c ⊙ B)ᵀ·B)·A`),
/// with `c = dn / 2n` per row and `P = (A·Wᵀ)ᵀ + s·B·(A·Aᵀ)` (out, r) kept from the forward.
/// The composed form's graph (a product through W, the Gram matrix, products, sums) left a
/// pending (out, r) gradient per node until candle's backward reached it, which it does only
/// after every layer: ~180 MiB for SmolLM2-135M with every projection adapted.
pub fn dora_row_norm(a: &Tensor, b: &Tensor, w: &super::FrozenWeight, w2: &Tensor, scale: f64) -> CResult<Tensor> {
    profile::region("dora norm fwd", a.device(), || dora_row_norm_inner(a, b, w, w2, scale))
}

fn dora_row_norm_inner(a: &Tensor, b: &Tensor, w: &super::FrozenWeight, w2: &Tensor, scale: f64) -> CResult<Tensor> {
    let dtype = a.dtype();
    let work = if dtype == DType::F64 { DType::F64 } else { DType::F32 };
    let (a32, b32) = (a.detach().to_dtype(work)?, b.detach().to_dtype(work)?);
    let held = Held::of(w);
    let awt = a32.matmul(&held.dense(work)?.t()?)?.t()?;
    let bg = b32.matmul(&a32.matmul(&a32.t()?)?)?;
    let cross = (&b32 * &awt)?.sum(1)?;
    let quad = (&bg * &b32)?.sum(1)?;
    let norm = ((w2.to_dtype(work)? + (cross * (2.0 * scale))?)? + (quad * (scale * scale))?)?.sqrt()?;
    if !(a.track_op() || b.track_op()) {
        return norm.to_dtype(dtype);
    }
    let p = (awt + (bg * scale)?)?.contiguous()?;
    a.contiguous()?.apply_op2(&b.contiguous()?, DoraRowNorm { norm: Handoff::new(norm.to_dtype(dtype)?), p, w: held, scale })
}

/// [`dora_row_norm`]'s node: hands back the norm it holds; its backward is the closed form.
struct DoraRowNorm {
    /// The forward's result, (out,), in A's dtype.
    norm: Handoff,
    /// `(A·Wᵀ)ᵀ + s·B·(A·Aᵀ)`, (out, r), in the working dtype.
    p: Tensor,
    w: Held,
    scale: f64,
}

impl candle_core::CustomOp2 for DoraRowNorm {
    fn name(&self) -> &'static str {
        "dora-row-norm"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> CResult<(CpuStorage, Shape)> {
        self.norm.cpu("dora-row-norm")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, _: &candle_core::CudaStorage, _: &Layout, _: &candle_core::CudaStorage, _: &Layout) -> CResult<(candle_core::CudaStorage, Shape)> {
        self.norm.cuda("dora-row-norm")
    }

    fn bwd(&self, a: &Tensor, b: &Tensor, res: &Tensor, grad: &Tensor) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        profile::region("dora norm bwd", grad.device(), || self.grads(a, b, res, grad))
    }
}

impl DoraRowNorm {
    fn grads(&self, a: &Tensor, b: &Tensor, res: &Tensor, grad: &Tensor) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let work = self.p.dtype();
        let s = self.scale;
        let c = (grad.detach().to_dtype(work)? / (res.detach().to_dtype(work)? * 2.0)?)?.unsqueeze(1)?;
        let db = self.p.broadcast_mul(&(c.clone() * (2.0 * s))?)?;
        let (a32, b32) = (a.detach().to_dtype(work)?, b.detach().to_dtype(work)?);
        let cb_t = b32.broadcast_mul(&c)?.t()?.contiguous()?;
        let da = ((cb_t.matmul(&self.w.dense(work)?)? + (cb_t.matmul(&b32)?.matmul(&a32)? * s)?)? * (2.0 * s))?;
        Ok((Some(da.to_dtype(a.dtype())?), Some(db.to_dtype(b.dtype())?)))
    }
}

/// [`dora_row_norm`] as it is defined, `‖W + s·B·A‖_row` from the formed matrix: the reference
/// it is held to.
pub fn dora_row_norm_composed(a: &Tensor, b: &Tensor, w: &Tensor, scale: f64) -> CResult<Tensor> {
    (w + (b.matmul(a)? * scale)?)?.sqr()?.sum(1)?.sqrt()
}

/// [`lora_linear`]'s op (with DoRA's column scale in B's last column when `col_scale`).
fn lora_product(xs: &Tensor, w: &super::FrozenWeight, bias: Option<&Tensor>, pair: LoraPair, col_scale: bool, heads: Option<fused::Heads>) -> CResult<Tensor> {
    profile::region("lora product fwd", xs.device(), || {
        let (x, op) = lora_op(xs, w, bias, pair, col_scale, heads)?;
        x.apply_op3(&pair.a.contiguous()?, &pair.b.contiguous()?, op)
    })
}

/// [`LoraProduct`] for `xs` (made contiguous, returned beside it: the op's input).
fn lora_op(xs: &Tensor, w: &super::FrozenWeight, bias: Option<&Tensor>, pair: LoraPair, col_scale: bool, heads: Option<fused::Heads>) -> CResult<(Tensor, LoraProduct)> {
    let held = Held::of(w);
    // The op takes the input in its own shape (any leading dims) and gives the output in
    // the same: a reshape on each side would be two more graph nodes, each a zero-filled
    // gradient and an add in candle's backward.
    let x = xs.contiguous()?;
    let k = x.dims().last().copied().unwrap_or(0);
    let m = if k == 0 { 0 } else { x.elem_count() / k };
    let dtype = xs.dtype();
    let bias = bias_in(bias, dtype)?;
    // x̃·Aᵀ, (m, r); 16-bit on the CPU in f32 (candle's 16-bit products are slow; the op
    // widens its operands the same way).
    let half_cpu = x.device().is_cpu() && matches!(dtype, DType::BF16 | DType::F16);
    let (x2, a) = (x.detach().reshape((m, k))?, pair.a.detach());
    let (x2, a) = if half_cpu { (f32_copy(&x2)?, f32_copy(&a)?) } else { (x2, a) };
    let xa = dropped(&x2, pair.dropout)?.matmul(&a.t()?)?;
    Ok((x, LoraProduct { w: held, bias, dtype, xa, scale: pair.scale, dropout: pair.dropout, col_scale, heads }))
}

/// `residual + lora_linear(xs, …)` for the residual stream (…, out) (o_proj, down_proj): where
/// the shape and dtypes allow, one node that adds the residual as its last step
/// ([`LoraResidual`]) — as two, the add's node would hold the projection's output, which its
/// backward never reads.
pub fn lora_linear_residual(xs: &Tensor, w: &super::FrozenWeight, bias: Option<&Tensor>, pair: LoraPair, residual: &Tensor) -> CResult<Tensor> {
    let frozen_bias = bias.is_none_or(|b| !b.track_op());
    if frozen_bias && pair.a.dtype() == pair.b.dtype() && residual_fits(xs, residual, pair.b.dim(0)?)? {
        return profile::region("lora product fwd", xs.device(), || {
            let (x, inner) = lora_op(xs, w, bias, pair, false, None)?;
            let (a, b) = (pair.a.contiguous()?, pair.b.contiguous()?);
            let ab = Tensor::cat(&[&a.flatten_all()?, &b.flatten_all()?], 0)?;
            x.apply_op3(&ab, &residual.contiguous()?, LoraResidual { inner, a: a.detach(), b: b.detach() })
        });
    }
    residual + lora_linear(xs, w, bias, pair)?
}

/// [`LoraProduct`] with a residual added as its last step ([`lora_linear_residual`]): a
/// CustomOp3 on (x, A and B flattened into one vector, the residual) — candle's custom ops
/// take three tensors at most, and the vector's node costs r·(in + out) values. The op keeps
/// A and B themselves (detached) for its products; their gradients go back through the vector.
struct LoraResidual {
    inner: LoraProduct,
    a: Tensor,
    b: Tensor,
}

impl candle_core::CustomOp3 for LoraResidual {
    fn name(&self) -> &'static str {
        "lora-product-residual"
    }

    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout, _ab: &CpuStorage, _abl: &Layout, r: &CpuStorage, rl: &Layout) -> CResult<(CpuStorage, Shape)> {
        let y = on_storage(&self.b, cpu_storage, "the cpu", "lora-product: B", |b, bl| self.inner.cpu_rows(x, xl, b, bl))?;
        add_residual(y, r, rl)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        _ab: &candle_core::CudaStorage,
        _abl: &Layout,
        r: &candle_core::CudaStorage,
        rl: &Layout,
    ) -> CResult<(candle_core::CudaStorage, Shape)> {
        on_storage(&self.b, cuda_storage, "cuda", "lora-product: B", |b, bl| self.inner.cuda_rows(x, xl, b, bl, Some((r, rl))))
    }

    fn bwd(&self, x: &Tensor, _ab: &Tensor, residual: &Tensor, res: &Tensor, grad: &Tensor) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        profile::region("lora product bwd", grad.device(), || {
            let (dx, da, db) = self.inner.grads(x, x.track_op(), &self.a, &self.b, res, grad)?;
            let (Some(da), Some(db)) = (da, db) else { candle_core::bail!("lora-product: no gradient for A or B") };
            let dab = Tensor::cat(&[&da.flatten_all()?, &db.flatten_all()?], 0)?;
            Ok((dx, Some(dab), residual_grad(residual, grad)))
        })
    }
}

// ---------------------------------------------------------------------------------------------
// SwiGLU's product as a projection's input (down_proj)
// ---------------------------------------------------------------------------------------------

/// Whether SwiGLU's product of `g` and `u` can be made inside a projection op: one shape and
/// dtype, on one device.
fn swiglu_fits(g: &Tensor, u: &Tensor) -> bool {
    g.dims() == u.dims() && g.dtype() == u.dtype() && g.device().same_device(u.device())
}

/// `residual + silu(g)·u·Wᵀ + bias` for a frozen `w` (out, in), the gate and up projections'
/// outputs `g`, `u` (…, in) and the residual stream (…, out) (down_proj without an adapter):
/// while g or u tracks ops, one node on (g, u, residual) ([`FrozenSwiglu`]). As SwiGLU's node
/// and the product's, the graph would hold SwiGLU's (…, in) product for the product's backward,
/// which never reads it; the op's backward needs only g and u (SwiGLU's own backward reads
/// them), so what stays between the passes is one (tokens, intermediate) tensor fewer.
pub fn frozen_linear_swiglu_residual(g: &Tensor, u: &Tensor, w: &super::FrozenWeight, bias: Option<&Tensor>, residual: &Tensor) -> CResult<Tensor> {
    let tracks = g.track_op() || u.track_op();
    let trained_w = matches!(w, super::FrozenWeight::Dense(t) if t.track_op());
    if tracks && !trained_w && bias.is_none_or(|b| !b.track_op()) && swiglu_fits(g, u) && residual_fits(g, residual, w.dims()[0])? {
        let act = swiglu_value(g, u)?;
        return profile::region("frozen matmul fwd", g.device(), || {
            let op = FrozenSwiglu { inner: FrozenMatmul::with_bias(w, g.dtype(), bias, None)?, act: Handoff::new(act) };
            g.contiguous()?.apply_op3(&u.contiguous()?, &residual.contiguous()?, op)
        });
    }
    residual + frozen_linear_biased(&swiglu(g, u)?, w, bias)?
}

/// [`FrozenMatmul`] on SwiGLU's product, plus the residual ([`frozen_linear_swiglu_residual`]):
/// a CustomOp3 on (g, u, residual). The product is made before the node (the forward takes it
/// from `act` and drops it); the backward is `dAct = dY·W`, then SwiGLU's backward on g and u.
struct FrozenSwiglu {
    inner: FrozenMatmul,
    act: Handoff,
}

impl FrozenSwiglu {
    const NAME: &'static str = "frozen-matmul-swiglu";

    /// The product of the handed-over activation, plus the residual `r`, on a backend's storage.
    fn forward<S: BackendStorage>(&self, r: &S, rl: &Layout, pick: fn(&Storage) -> Option<&S>, device: &str) -> CResult<(S, Shape)> {
        let act = self.act.take(Self::NAME)?;
        on_storage(&act, pick, device, "frozen-matmul-swiglu: the product", |x, l| add_residual(self.inner.forward(x, l, pick, device)?, r, rl))
    }
}

impl candle_core::CustomOp3 for FrozenSwiglu {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout, r: &CpuStorage, rl: &Layout) -> CResult<(CpuStorage, Shape)> {
        self.forward(r, rl, cpu_storage, "the cpu")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        r: &candle_core::CudaStorage,
        rl: &Layout,
    ) -> CResult<(candle_core::CudaStorage, Shape)> {
        self.forward(r, rl, cuda_storage, "cuda")
    }

    fn bwd(&self, g: &Tensor, u: &Tensor, residual: &Tensor, res: &Tensor, grad: &Tensor) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // The product's gradient needs only its shape, which is g's.
        let Some(d_act) = CustomOp1::bwd(&self.inner, g, res, grad)? else { candle_core::bail!("{}: no gradient for the product", Self::NAME) };
        let (dg, du) = swiglu_grads(g, u, &d_act)?;
        Ok((g.track_op().then_some(dg), u.track_op().then_some(du), residual_grad(residual, grad)))
    }
}

/// `lora_linear(silu(g)·u, …)` for the gate and up projections' outputs `g`, `u` (…, in)
/// (down_proj with LoRA or AdaLoRA): one node on (g, u, A and B flattened into one vector)
/// ([`LoraSwiglu`]), so the graph keeps g and u but not SwiGLU's product (the LoRA product's
/// backward makes it again for A's gradient).
pub fn lora_linear_swiglu(g: &Tensor, u: &Tensor, w: &super::FrozenWeight, bias: Option<&Tensor>, pair: LoraPair) -> CResult<Tensor> {
    if lora_swiglu_fits(g, u, bias, pair) {
        return lora_swiglu_op(g, u, w, bias, pair, false, None);
    }
    lora_linear(&swiglu(g, u)?, w, bias, pair)
}

/// `residual + lora_linear_swiglu(g, u, …)` (down_proj with LoRA or AdaLoRA, adding to the
/// residual stream (…, out)): one node that also adds the residual as its last step, so the
/// graph keeps neither SwiGLU's product nor the projection's output. That is a fourth input,
/// and candle's custom ops take three: u and the residual go in through a [`Joint`].
pub fn lora_linear_swiglu_residual(g: &Tensor, u: &Tensor, w: &super::FrozenWeight, bias: Option<&Tensor>, pair: LoraPair, residual: &Tensor) -> CResult<Tensor> {
    if lora_swiglu_fits(g, u, bias, pair) && residual_fits(g, residual, pair.b.dim(0)?)? {
        return lora_swiglu_op(g, u, w, bias, pair, false, Some(residual));
    }
    residual + lora_linear_swiglu(g, u, w, bias, pair)?
}

/// Whether [`LoraSwiglu`] can take g, u and the pair: a frozen bias (a trained one gets its
/// gradient from an add), A and B of one dtype, g and u alike.
fn lora_swiglu_fits(g: &Tensor, u: &Tensor, bias: Option<&Tensor>, pair: LoraPair) -> bool {
    bias.is_none_or(|b| !b.track_op()) && pair.a.dtype() == pair.b.dtype() && swiglu_fits(g, u)
}

/// [`LoraSwiglu`]'s node (with DoRA's scale as B's last column when `col_scale`), adding
/// `residual` as its last step when there is one.
#[allow(clippy::too_many_arguments)]
fn lora_swiglu_op(g: &Tensor, u: &Tensor, w: &super::FrozenWeight, bias: Option<&Tensor>, pair: LoraPair, col_scale: bool, residual: Option<&Tensor>) -> CResult<Tensor> {
    if col_scale && residual.is_some() {
        candle_core::bail!("lora-product-swiglu: a column scale reads its output back, which a residual inside would hide");
    }
    let act = swiglu_value(g, u)?;
    profile::region("lora product fwd", g.device(), || {
        let (act, inner) = lora_op(&act, w, bias, pair, col_scale, None)?;
        let (a, b) = (pair.a.contiguous()?, pair.b.contiguous()?);
        let ab = Tensor::cat(&[&a.flatten_all()?, &b.flatten_all()?], 0)?;
        let (g, u) = (g.contiguous()?, u.contiguous()?);
        let mut op = LoraSwiglu { inner, a: a.detach(), b: b.detach(), act: Handoff::new(act), joined: None };
        let second = match residual {
            None => u,
            Some(r) => {
                let r = r.contiguous()?;
                let slot = Arc::new(std::sync::Mutex::new(None));
                let joint = u.apply_op2(&r, Joint { slot: slot.clone() })?;
                op.joined = Some(Joined { u_tracks: u.track_op(), r_tracks: r.track_op(), u: u.detach(), residual: r.detach(), slot });
                joint
            }
        };
        g.apply_op3(&second, &ab, op)
    })
}

/// The gradients a [`LoraSwiglu`]'s backward leaves for its [`Joint`]: (du, dResidual).
type JointSlot = Arc<std::sync::Mutex<Option<(Option<Tensor>, Option<Tensor>)>>>;

/// Two tensors as one input of a node that needs four (candle's custom ops take three): a
/// one-element node on (u, residual). The consuming op ([`LoraSwiglu`]) takes the joint's
/// result in their place and holds u and the residual itself, detached (the storage this node
/// keeps anyway: no copy). The consumer's backward leaves their gradients in `slot` and
/// returns a zero for the joint's element; this node's backward then hands them on. candle
/// runs a node's backward only after the backward of every node that reads its result, so the
/// slot is filled by then.
struct Joint {
    slot: JointSlot,
}

impl candle_core::CustomOp2 for Joint {
    fn name(&self) -> &'static str {
        "joint"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> CResult<(CpuStorage, Shape)> {
        Ok((CpuStorage::F32(vec![0.0]), Shape::from(1)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, u: &candle_core::CudaStorage, _: &Layout, _: &candle_core::CudaStorage, _: &Layout) -> CResult<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendDevice;
        Ok((u.device().zeros_impl(&Shape::from(1), DType::F32)?, Shape::from(1)))
    }

    fn bwd(&self, _: &Tensor, _: &Tensor, _res: &Tensor, _grad: &Tensor) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        match self.slot.lock().ok().and_then(|mut s| s.take()) {
            Some(grads) => Ok(grads),
            None => candle_core::bail!("joint: the consuming op's backward left no gradients"),
        }
    }
}

/// u and the residual as [`LoraSwiglu`] holds them when they come in through a [`Joint`].
struct Joined {
    u: Tensor,
    residual: Tensor,
    u_tracks: bool,
    r_tracks: bool,
    slot: JointSlot,
}

/// [`LoraProduct`] on SwiGLU's product ([`lora_linear_swiglu`]): a CustomOp3 on (g, u, A‖B),
/// or on (g, a [`Joint`] of u and the residual, A‖B) adding the residual as its last step
/// ([`lora_linear_swiglu_residual`]). The product is made before the node (for x̃·Aᵀ, then
/// handed to the forward and dropped) and again in the backward; its gradient goes on through
/// SwiGLU's backward to g and u.
struct LoraSwiglu {
    inner: LoraProduct,
    a: Tensor,
    b: Tensor,
    act: Handoff,
    joined: Option<Joined>,
}

impl LoraSwiglu {
    const NAME: &'static str = "lora-product-swiglu";

    /// The op's result `y`, plus the residual when it came in through the joint.
    fn then_residual<S: BackendStorage>(&self, y: (S, Shape), pick: fn(&Storage) -> Option<&S>, device: &str) -> CResult<(S, Shape)> {
        match &self.joined {
            None => Ok(y),
            Some(j) => on_storage(&j.residual, pick, device, "lora-product-swiglu: the residual", |r, rl| add_residual(y, r, rl)),
        }
    }
}

impl candle_core::CustomOp3 for LoraSwiglu {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> CResult<(CpuStorage, Shape)> {
        let (act, dev) = (self.act.take(Self::NAME)?, "the cpu");
        let y = on_storage(&act, cpu_storage, dev, "lora-product-swiglu: the product", |x, xl| {
            on_storage(&self.b, cpu_storage, dev, "lora-product-swiglu: B", |b, bl| self.inner.cpu_rows(x, xl, b, bl))
        })?;
        self.then_residual(y, cpu_storage, dev)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> CResult<(candle_core::CudaStorage, Shape)> {
        let (act, dev) = (self.act.take(Self::NAME)?, "cuda");
        on_storage(&act, cuda_storage, dev, "lora-product-swiglu: the product", |x, xl| {
            on_storage(&self.b, cuda_storage, dev, "lora-product-swiglu: B", |b, bl| match &self.joined {
                Some(j) => on_storage(&j.residual, cuda_storage, dev, "lora-product-swiglu: the residual", |r, rl| self.inner.cuda_rows(x, xl, b, bl, Some((r, rl)))),
                None => self.inner.cuda_rows(x, xl, b, bl, None),
            })
        })
    }

    fn bwd(&self, g: &Tensor, second: &Tensor, _ab: &Tensor, res: &Tensor, grad: &Tensor) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (u, u_tracks) = match &self.joined {
            Some(j) => (&j.u, j.u_tracks),
            None => (second, second.track_op()),
        };
        let act = swiglu_value(g, u)?;
        let tracks = g.track_op() || u_tracks;
        let (d_act, da, db) = profile::region("lora product bwd", grad.device(), || self.inner.grads(&act, tracks, &self.a, &self.b, res, grad))?;
        let (Some(da), Some(db)) = (da, db) else { candle_core::bail!("{}: no gradient for A or B", Self::NAME) };
        let dab = Tensor::cat(&[&da.flatten_all()?, &db.flatten_all()?], 0)?;
        let (dg, du) = match d_act {
            Some(d) => {
                let (dg, du) = swiglu_grads(g, u, &d)?;
                (g.track_op().then_some(dg), u_tracks.then_some(du))
            }
            None => (None, None),
        };
        let Some(j) = &self.joined else { return Ok((dg, du, Some(dab))) };
        // u's and the residual's gradients go back through the joint's node.
        let dr = j.r_tracks.then(|| grad.clone());
        match j.slot.lock() {
            Ok(mut slot) => *slot = Some((du, dr)),
            Err(_) => candle_core::bail!("{}: the joint's slot is poisoned", Self::NAME),
        }
        let joint_grad = second.track_op().then(|| second.zeros_like()).transpose()?;
        Ok((dg, joint_grad, Some(dab)))
    }
}

/// What a projection op does last with its (…, out) product: nothing, the move into heads
/// (q, k, v), or the residual added (o_proj, down_proj). As the op's own step, the graph keeps
/// no copy of the product beside the result.
#[derive(Clone, Copy)]
pub enum Epilogue<'a> {
    /// The product is the output.
    Rows,
    /// [`split_heads`] of it.
    Heads(HeadSplit<'a>),
    /// The residual stream plus it.
    Residual(&'a Tensor),
}

impl Epilogue<'_> {
    /// The step on a product `y` computed on its own.
    pub fn apply(&self, y: Tensor) -> CResult<Tensor> {
        match self {
            Epilogue::Rows => Ok(y),
            Epilogue::Heads(split) => split.apply(&y),
            Epilogue::Residual(r) => *r + y,
        }
    }
}

/// [`lora_linear`] followed by `then`, as one op where it can be ([`lora_linear_heads`],
/// [`lora_linear_residual`]).
pub fn lora_linear_then(xs: &Tensor, w: &super::FrozenWeight, bias: Option<&Tensor>, pair: LoraPair, then: Epilogue) -> CResult<Tensor> {
    match then {
        Epilogue::Rows => lora_linear(xs, w, bias, pair),
        Epilogue::Heads(split) => lora_linear_heads(xs, w, bias, pair, split),
        Epilogue::Residual(r) => lora_linear_residual(xs, w, bias, pair, r),
    }
}

/// [`lora_linear_swiglu`] followed by `then`, the residual add inside the op
/// ([`lora_linear_swiglu_residual`]).
pub fn lora_linear_swiglu_then(g: &Tensor, u: &Tensor, w: &super::FrozenWeight, bias: Option<&Tensor>, pair: LoraPair, then: Epilogue) -> CResult<Tensor> {
    match then {
        Epilogue::Residual(r) => lora_linear_swiglu_residual(g, u, w, bias, pair, r),
        then => then.apply(lora_linear_swiglu(g, u, w, bias, pair)?),
    }
}

/// [`lora_linear`] from differentiable primitives: the reference it is held to.
pub fn lora_linear_composed(xs: &Tensor, w: &Tensor, bias: Option<&Tensor>, pair: LoraPair) -> CResult<Tensor> {
    let x = dropped_composed(xs, pair.dropout)?;
    let mut base = xs.broadcast_matmul(&w.t()?)?;
    if let Some(b) = bias {
        base = base.broadcast_add(b)?;
    }
    base + (x.broadcast_matmul(&pair.a.t()?)?.broadcast_matmul(&pair.b.t()?)? * pair.scale)?
}

/// `xs` times [`fused::dropout_mask`] as a differentiable product (the references' dropout).
fn dropped_composed(xs: &Tensor, dropout: Option<(f64, u64)>) -> CResult<Tensor> {
    match dropout {
        Some((p, seed)) => {
            let mask = Tensor::from_vec(fused::dropout_mask(xs.elem_count(), p, seed), xs.shape(), &Device::Cpu)?;
            xs * mask.to_dtype(xs.dtype())?.to_device(xs.device())?
        }
        None => Ok(xs.clone()),
    }
}

// ---------------------------------------------------------------------------------------------
// Gradient hooks: a backward for outputs computed without a graph
// ---------------------------------------------------------------------------------------------

/// A row-major copy of the elements `l` selects from `s` (any strides and offset), as a custom
/// op's forward hands back a tensor it holds.
fn copy_held<S>(s: &S, l: &Layout) -> CResult<(S, Shape)>
where
    S: BackendStorage,
    S::Device: candle_core::backend::BackendDevice<Storage = S>,
{
    use candle_core::backend::BackendDevice;
    // SAFETY: every element of the new storage is written by the strided copy below.
    let mut dst = unsafe { s.device().alloc_uninit(l.shape(), s.dtype())? };
    s.copy_strided_src(&mut dst, 0, l)?;
    Ok((dst, l.shape().clone()))
}

/// A result computed before its node is made (outside the graph), handed to the node's
/// forward once: the forward copies it into the storage candle makes the node's output of and
/// drops it, so one copy stays between the passes, not two (the node would otherwise hold it
/// until the graph goes).
struct Handoff(std::sync::Mutex<Option<Tensor>>);

impl Handoff {
    fn new(t: Tensor) -> Self {
        Handoff(std::sync::Mutex::new(Some(t)))
    }

    fn take(&self, op: &str) -> CResult<Tensor> {
        match self.0.lock().ok().and_then(|mut t| t.take()) {
            Some(t) => Ok(t),
            None => candle_core::bail!("{op}: the forward ran twice"),
        }
    }

    /// The result as the CPU forward's output.
    fn cpu(&self, op: &str) -> CResult<(CpuStorage, Shape)> {
        let t = self.take(op)?;
        let (st, l) = t.storage_and_layout();
        let Storage::Cpu(s) = &*st else { candle_core::bail!("{op}: held tensor not on the cpu") };
        copy_held(s, l)
    }

    /// The result as the CUDA forward's output.
    #[cfg(feature = "cuda")]
    fn cuda(&self, op: &str) -> CResult<(candle_core::CudaStorage, Shape)> {
        let t = self.take(op)?;
        let (st, l) = t.storage_and_layout();
        let Storage::Cuda(s) = &*st else { candle_core::bail!("{op}: held tensor not on cuda") };
        copy_held(s, l)
    }
}

/// The input gradient of a hooked op: (the op's input, the output's gradient) → dInput.
type InputGrad = Arc<dyn Fn(&Tensor, &Tensor) -> CResult<Tensor> + Send + Sync>;

/// Gives an output computed without a graph (by a kernel that records none, such as candle's
/// fused RMSNorm and RoPE on CUDA) a backward: applied to the op's input, its forward hands
/// back the output it holds and its backward calls `grad`.
struct GradHook {
    out: Handoff,
    grad: InputGrad,
    /// The backward's profile region (`rms_norm bwd` …).
    name: &'static str,
}

impl CustomOp1 for GradHook {
    fn name(&self) -> &'static str {
        "grad-hook"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> CResult<(CpuStorage, Shape)> {
        self.out.cpu("grad-hook")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, _: &candle_core::CudaStorage, _: &Layout) -> CResult<(candle_core::CudaStorage, Shape)> {
        self.out.cuda("grad-hook")
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        profile::region(self.name, grad.device(), || {
            Ok(Some((self.grad)(&arg.detach(), &grad.detach())?))
        })
    }
}

/// `out` (computed from `x` without a graph) with `grad` as its backward when `x` tracks ops
/// (profiled as region `name`).
fn with_input_grad(x: &Tensor, out: Tensor, name: &'static str, grad: InputGrad) -> CResult<Tensor> {
    if !x.track_op() {
        return Ok(out);
    }
    x.apply_op1(GradHook { out: Handoff::new(out), grad, name })
}

/// Where candle's fused forward kernels (with a backward of ours) beat composed ops: on GPUs,
/// and for 16-bit activations on the CPU (our own CPU kernels are f32; f64 stays composed,
/// the finite-difference tests' precision).
fn use_candle_kernels(xs: &Tensor) -> bool {
    !matches!(xs.device(), Device::Cpu) || matches!(xs.dtype(), DType::BF16 | DType::F16)
}

// ---------------------------------------------------------------------------------------------
// RMSNorm
// ---------------------------------------------------------------------------------------------

struct RmsNorm {
    w: Tensor,
    eps: f32,
}

impl CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm-bwd"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, "rms-norm")?;
        let n = l.shape().dims().last().copied().unwrap_or(1);
        let w = self.w.to_vec1::<f32>()?;
        let mut out = vec![0f32; x.len()];
        let eps = self.eps;
        out.par_chunks_mut(n).zip(x.par_chunks(n)).for_each(|(o, xr)| {
            let ms = xr.iter().map(|v| v * v).sum::<f32>() / n as f32;
            let r = 1.0 / (ms + eps).sqrt();
            for ((o, &xv), &wv) in o.iter_mut().zip(xr).zip(&w) {
                *o = xv * r * wv;
            }
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        profile::region("rms_norm bwd", grad.device(), || {
            Ok(Some(arg.apply_op1_no_bwd(&RmsNormGrad { w: self.w.clone(), eps: self.eps, grad: grad.contiguous()? })?))
        })
    }
}

/// dX of RMSNorm: r·(g∘w) − x·r³/n·Σ(g∘w∘x).
struct RmsNormGrad {
    w: Tensor,
    eps: f32,
    grad: Tensor,
}

impl CustomOp1 for RmsNormGrad {
    fn name(&self) -> &'static str {
        "rms-norm-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, "rms-norm-grad")?;
        let n = l.shape().dims().last().copied().unwrap_or(1);
        let w = self.w.to_vec1::<f32>()?;
        let (gs, gl) = self.grad.storage_and_layout();
        let Storage::Cpu(gs) = &*gs else { candle_core::bail!("rms-norm-grad: grad not on cpu") };
        let g = contiguous_f32(gs, gl, "rms-norm-grad")?;
        let mut out = vec![0f32; x.len()];
        let eps = self.eps;
        out.par_chunks_mut(n).zip(x.par_chunks(n).zip(g.par_chunks(n))).for_each(|(o, (xr, gr))| {
            let ms = xr.iter().map(|v| v * v).sum::<f32>() / n as f32;
            let r = 1.0 / (ms + eps).sqrt();
            let dot: f32 = xr.iter().zip(gr).zip(&w).map(|((x, g), w)| x * g * w).sum();
            let c = r * r * r * dot / n as f32;
            for (((o, &xv), &gv), &wv) in o.iter_mut().zip(xr).zip(gr).zip(&w) {
                *o = r * gv * wv - xv * c;
            }
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
}

/// RMSNorm over the last dim, differentiable in `xs` and also in `w` when `w` is trained (full
/// fine-tuning's norms: the normalized rows, from the fused op with a unit weight, times `w`
/// through [`channel_scale`], whose backward makes `w`'s gradient in one pass).
pub fn rms_norm(xs: &Tensor, w: &Tensor, eps: f64) -> CResult<Tensor> {
    if w.track_op() && (fused::active(xs) || use_fused(xs) || use_candle_kernels(xs)) {
        let unit = Tensor::ones(w.dims(), xs.dtype(), xs.device())?;
        return channel_scale(&rms_norm(xs, &unit, eps)?, w);
    }
    profile::region("rms_norm fwd", xs.device(), || {
        if fused::active(xs) && !w.track_op() {
            rms_norm_hooked(xs, w, eps)
        } else if use_fused(xs) && !w.track_op() {
            xs.contiguous()?.apply_op1(RmsNorm { w: w.clone(), eps: eps as f32 })
        } else if use_candle_kernels(xs) && !w.track_op() {
            rms_norm_hooked(xs, w, eps)
        } else {
            rms_norm_composed(xs, w, eps)
        }
    })
}

/// RMSNorm with our analytic input gradient, so the graph keeps only `xs`, not the composed
/// version's temporaries. The forward is candle's fused kernel on GPUs (it accumulates in f32
/// and rounds once); on the CPU it is the composed formula without a graph, since candle's
/// CPU kernel rounds the row's norm to 16 bits before dividing (measured: twice the gradient
/// error of the composed forward through a model, `tests/peft_methods.rs`).
pub fn rms_norm_hooked(xs: &Tensor, w: &Tensor, eps: f64) -> CResult<Tensor> {
    let out = if matches!(xs.device(), Device::Cpu) {
        rms_norm_composed(&xs.detach(), &w.detach(), eps)?
    } else {
        candle_nn::ops::rms_norm(&xs.detach().contiguous()?, &w.detach().to_dtype(xs.dtype())?, eps as f32)?
    };
    let w = w.detach();
    with_input_grad(
        xs,
        out,
        "rms_norm bwd",
        Arc::new(move |x, g| if fused::active(x) { fused::rms_norm_input_grad(x, &w, eps, g) } else { rms_norm_input_grad(x, &w, eps, g) }),
    )
}

/// dX of RMSNorm, `r·(g∘w) − x·r³/n·Σ(g∘w∘x)`, from tensor ops in f32 (f64 for f64), in
/// `x`'s dtype.
fn rms_norm_input_grad(x: &Tensor, w: &Tensor, eps: f64, g: &Tensor) -> CResult<Tensor> {
    let acc = if x.dtype() == DType::F64 { DType::F64 } else { DType::F32 };
    let (x32, gw) = (x.to_dtype(acc)?, g.to_dtype(acc)?.broadcast_mul(&w.to_dtype(acc)?)?);
    let n = x.dim(D::Minus1)? as f64;
    let r = (x32.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    let dot = (&gw * &x32)?.sum_keepdim(D::Minus1)?;
    let c = ((r.powf(3.0)? * dot)? / n)?;
    (gw.broadcast_mul(&r)? - x32.broadcast_mul(&c)?)?.to_dtype(x.dtype())
}

/// RMSNorm from differentiable primitives (reference and non-CPU path).
pub fn rms_norm_composed(xs: &Tensor, w: &Tensor, eps: f64) -> CResult<Tensor> {
    let dtype = xs.dtype();
    let x = if dtype == DType::F64 { xs.clone() } else { xs.to_dtype(DType::F32)? };
    let r = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    x.broadcast_mul(&r)?.to_dtype(dtype)?.broadcast_mul(w)
}

// ---------------------------------------------------------------------------------------------
// RoPE (rotate-half / HF layout)
// ---------------------------------------------------------------------------------------------

struct Rope {
    /// (seq, d/2) each.
    cos: Tensor,
    sin: Tensor,
    /// Rotate by −θ (the backward of a rotation is the inverse rotation).
    inverse: bool,
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "rope-bwd"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, "rope")?;
        let (_b, _h, seq, d) = l.shape().dims4()?;
        let cos = self.cos.flatten_all()?.to_vec1::<f32>()?;
        let sin = self.sin.flatten_all()?.to_vec1::<f32>()?;
        let half = d / 2;
        let sign = if self.inverse { -1.0 } else { 1.0 };
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(seq * d).zip(x.par_chunks(seq * d)).for_each(|(o, xh)| {
            for p in 0..seq {
                let xr = &xh[p * d..(p + 1) * d];
                let or = &mut o[p * d..(p + 1) * d];
                cpu_math::rotate_half(xr, or, &cos[p * half..(p + 1) * half], &sin[p * half..(p + 1) * half], sign);
            }
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        profile::region("rope bwd", grad.device(), || {
            let inv = Rope { cos: self.cos.clone(), sin: self.sin.clone(), inverse: !self.inverse };
            Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&inv)?))
        })
    }
}

/// Rotary position embedding, HF's rotate-half convention. `xs`: (b, heads, seq, d);
/// `cos`, `sin`: (seq, d/2).
pub fn rope(xs: &Tensor, cos: &Tensor, sin: &Tensor) -> CResult<Tensor> {
    profile::region("rope fwd", xs.device(), || {
        if use_fused(xs) {
            xs.contiguous()?.apply_op1(Rope { cos: cos.clone(), sin: sin.clone(), inverse: false })
        } else if use_candle_kernels(xs) {
            rope_hooked(xs, cos, sin)
        } else {
            rope_composed(xs, cos, sin)
        }
    })
}

/// RoPE by candle's fused kernel (CUDA, 16-bit); its backward is the same kernel rotating the
/// gradient by −θ (`sin` negated).
pub fn rope_hooked(xs: &Tensor, cos: &Tensor, sin: &Tensor) -> CResult<Tensor> {
    let dtype = xs.dtype();
    let (cos, sin) = (cos.detach().to_dtype(dtype)?.contiguous()?, sin.detach().to_dtype(dtype)?.contiguous()?);
    let out = candle_nn::rotary_emb::rope(&xs.detach().contiguous()?, &cos, &sin)?;
    let neg_sin = sin.neg()?;
    with_input_grad(xs, out, "rope bwd", Arc::new(move |_, g| candle_nn::rotary_emb::rope(&g.contiguous()?, &cos, &neg_sin)))
}

/// RoPE from differentiable primitives (reference and non-CPU path).
pub fn rope_composed(xs: &Tensor, cos: &Tensor, sin: &Tensor) -> CResult<Tensor> {
    let d = xs.dim(D::Minus1)?;
    let cos = Tensor::cat(&[cos, cos], D::Minus1)?.to_dtype(xs.dtype())?;
    let sin = Tensor::cat(&[sin, sin], D::Minus1)?.to_dtype(xs.dtype())?;
    let x1 = xs.narrow(D::Minus1, 0, d / 2)?;
    let x2 = xs.narrow(D::Minus1, d / 2, d / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    xs.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
}

/// A projection's output (b, s, heads·hd) laid out per head, (b, groups, heads/groups·s, hd)
/// (the heads sharing a KV head stacked on the row axis when `groups` is the KV head count,
/// as [`causal_attention`] reads q), rotated by RoPE when `rope` holds (cos, sin), (s, hd/2).
/// In f32/bf16/f16 on the CPU, and on CUDA with the fused kernels on, this is one op
/// ([`fused::split_heads`]) whose backward rotates back and merges the heads in one pass;
/// otherwise (f64, or `TUNEBENCH_FUSED_KERNELS=0` on a GPU) the chain it replaces: a reshape,
/// a transpose, a copy, RoPE and a reshape — five graph nodes, each a zero-filled gradient and
/// an add in candle's backward.
pub fn split_heads(x: &Tensor, heads: usize, groups: usize, rope: Option<(&Tensor, &Tensor)>) -> CResult<Tensor> {
    profile::region("split heads fwd", x.device(), || {
        if fused_heads(x) {
            return fused::split_heads(x, heads, groups, rope);
        }
        split_heads_composed(x, heads, groups, rope)
    })
}

/// Where [`split_heads`] is one op: f32, bf16 and f16 on the CPU, and on CUDA with the fused
/// kernels on.
fn fused_heads(x: &Tensor) -> bool {
    matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16) && (x.device().is_cpu() || fused::active(x))
}

/// A projection's output laid out per head: [`split_heads`]'s arguments, for the projections
/// that do the move as the last step of their own op ([`frozen_linear_heads`],
/// [`lora_linear_heads`], [`lora_linear_scaled_heads`]). As its own node, [`split_heads`]
/// holds its input — the projection's (tokens, heads·hd) output, which its backward never
/// reads — until the graph goes; inside the projection's op that copy is gone as soon as the
/// heads are made, and the op's backward starts by moving its output's gradient back.
#[derive(Clone, Copy)]
pub struct HeadSplit<'a> {
    /// Query heads when this is q's projection, KV heads for k's and v's.
    pub heads: usize,
    /// KV groups: the heads' order in the output (see [`split_heads`]).
    pub groups: usize,
    /// RoPE's (cos, sin), (s, hd/2), for q and k: a rotation (cos² + sin² = 1), since a
    /// backward that reads the op's output (DoRA's) takes it out of the heads by the move the
    /// other way, which rotates by the transpose.
    pub rope: Option<(&'a Tensor, &'a Tensor)>,
}

impl HeadSplit<'_> {
    /// [`split_heads`] of `x`.
    pub fn apply(&self, x: &Tensor) -> CResult<Tensor> {
        split_heads(x, self.heads, self.groups, self.rope)
    }

    /// The move as a projection op's last step, for the op's input `xs` (b, s, in) and `width`
    /// outputs: where [`split_heads`] would be one op (the same kernels either way), else
    /// `None` (the projection's output goes through [`Self::apply`]).
    fn epilogue(&self, xs: &Tensor, width: usize) -> CResult<Option<fused::Heads>> {
        if !fused_heads(xs) || xs.rank() != 3 {
            return Ok(None);
        }
        fused::Heads::split(xs.dim(1)?, width, self.heads, self.groups, self.rope, xs.device()).map(Some)
    }
}

/// A projection op's (b, s, out) result moved into per-head blocks by its epilogue, if any.
fn into_heads_cpu(heads: &Option<fused::Heads>, (st, shape): (CpuStorage, Shape)) -> CResult<(CpuStorage, Shape)> {
    match heads {
        Some(h) => h.cpu_fwd(&st, &Layout::contiguous(shape)),
        None => Ok((st, shape)),
    }
}

/// [`into_heads_cpu`] on CUDA.
#[cfg(feature = "cuda")]
fn into_heads_cuda(heads: &Option<fused::Heads>, (st, shape): (candle_core::CudaStorage, Shape)) -> CResult<(candle_core::CudaStorage, Shape)> {
    match heads {
        Some(h) => h.cuda_fwd(&st, &Layout::contiguous(shape)),
        None => Ok((st, shape)),
    }
}

/// A tensor in a projection op's per-head output layout (the output's gradient, or the
/// output itself) as (b, s, out) rows again, the epilogue undone; without one, `t`.
fn out_of_heads(heads: &Option<fused::Heads>, t: &Tensor) -> CResult<Tensor> {
    match heads {
        Some(h) => t.contiguous()?.apply_op1_no_bwd(&h.reversed()),
        None => Ok(t.clone()),
    }
}

/// [`split_heads`] from reshapes, a transpose and [`rope`] (the reference, and the path on a
/// GPU without the fused kernels).
pub fn split_heads_composed(x: &Tensor, heads: usize, groups: usize, rope: Option<(&Tensor, &Tensor)>) -> CResult<Tensor> {
    let (b, s, width) = x.dims3()?;
    if heads == 0 || groups == 0 || width % heads != 0 || heads % groups != 0 {
        candle_core::bail!("split-heads: {width} features do not split into {heads} heads in {groups} groups");
    }
    let hd = width / heads;
    let h = x.reshape((b, s, heads, hd))?.transpose(1, 2)?.contiguous()?;
    let h = match rope {
        Some((cos, sin)) => self::rope(&h, cos, sin)?,
        None => h,
    };
    h.reshape((b, groups, heads / groups * s, hd))
}

// ---------------------------------------------------------------------------------------------
// Causal softmax
// ---------------------------------------------------------------------------------------------

struct CausalSoftmax {
    /// Key length; query row r sits at position (r % q_len) + (k_len − q_len).
    q_len: usize,
    scale: f32,
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, "causal-softmax")?;
        let k_len = l.shape().dims().last().copied().unwrap_or(1);
        let q_len = self.q_len;
        let offset = k_len - q_len;
        let scale = self.scale;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(k_len).zip(x.par_chunks(k_len)).enumerate().for_each(|(r, (o, xr))| {
            let visible = (r % q_len) + offset + 1;
            let max = xr[..visible].iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v * scale));
            let mut sum = 0f32;
            for (o, &v) in o[..visible].iter_mut().zip(&xr[..visible]) {
                *o = (v * scale - max).exp();
                sum += *o;
            }
            let inv = 1.0 / sum;
            o[..visible].iter_mut().for_each(|o| *o *= inv);
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        // dx = scale · y ∘ (dy − Σ dy∘y); masked entries have y = 0 so get 0.
        let dot = (grad * res)?.sum_keepdim(D::Minus1)?;
        let dx = (res * grad.broadcast_sub(&dot)?)?;
        Ok(Some((dx * self.scale as f64)?))
    }
}

/// Softmax over the last dim of `scale · xs` with a causal mask: `xs` is (..., rows, k_len)
/// where row r is query position `r % q_len` (rows may stack several heads sharing one key
/// set, as grouped-query attention does); keys after the query's position get probability 0.
pub fn causal_softmax(xs: &Tensor, q_len: usize, scale: f64) -> CResult<Tensor> {
    if fused::active(xs) && !xs.track_op() {
        fused::causal_softmax(xs, q_len, scale)
    } else if use_fused(xs) {
        xs.contiguous()?.apply_op1(CausalSoftmax { q_len, scale: scale as f32 })
    } else if use_candle_kernels(xs) && !xs.track_op() {
        // What the blocked attention asks for (no graph): the mask added, then candle's fused
        // softmax over the last dim, in f32.
        let x = (xs.to_dtype(DType::F32)? * scale)?.broadcast_add(&causal_mask(xs, q_len)?)?;
        candle_nn::ops::softmax_last_dim(&x.contiguous()?)?.to_dtype(xs.dtype())
    } else {
        causal_softmax_composed(xs, q_len, scale)
    }
}

/// The additive causal mask for scores `xs` (..., rows, k_len), f32: 0 where row r's query
/// (position `r % q_len`, `k_len − q_len` keys ahead) sees the key, −∞ elsewhere.
fn causal_mask(xs: &Tensor, q_len: usize) -> CResult<Tensor> {
    let dims = xs.dims();
    let (rows, k_len) = (dims[dims.len() - 2], dims[dims.len() - 1]);
    let offset = k_len - q_len;
    let mask: Vec<f32> = (0..rows)
        .flat_map(|r| (0..k_len).map(move |c| if c <= (r % q_len) + offset { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    Tensor::from_vec(mask, (rows, k_len), xs.device())
}

/// Causal softmax from differentiable primitives (reference and non-CPU path).
pub fn causal_softmax_composed(xs: &Tensor, q_len: usize, scale: f64) -> CResult<Tensor> {
    // Half-precision scores are normalised in f32 (as PyTorch's attention does) and the
    // probabilities handed back in the scores' dtype.
    if matches!(xs.dtype(), DType::BF16 | DType::F16) {
        return causal_softmax_composed(&xs.to_dtype(DType::F32)?, q_len, scale)?.to_dtype(xs.dtype());
    }
    let mask = causal_mask(xs, q_len)?.to_dtype(xs.dtype())?;
    let x = (xs * scale)?.broadcast_add(&mask)?;
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

// ---------------------------------------------------------------------------------------------
// Causal attention in query blocks, recomputed in the backward
// ---------------------------------------------------------------------------------------------

/// Bytes one block's f32 scores may take (the forward holds one block of scores and
/// probabilities at a time; the backward one block of probabilities and their gradients).
pub const ATTENTION_BLOCK_BYTES: usize = 32 << 20;

/// Positions per query block: as many as fit [`ATTENTION_BLOCK_BYTES`] for `heads` query
/// heads over `k_len` keys in `b` rows, at least 16.
pub fn attention_block_len(b: usize, heads: usize, q_len: usize, k_len: usize) -> usize {
    let per_position = (b * heads * k_len * 4).max(1);
    (ATTENTION_BLOCK_BYTES / per_position).max(16).min(q_len.max(1))
}

/// One query block's operands: the block's queries (b, nkv, rep·n, hd) and the keys and values
/// it may see, (b, nkv, keys, hd) — keys after the block's last position are left out.
struct Block {
    start: usize,
    n: usize,
    keys: usize,
    q: Tensor,
    k: Tensor,
    v: Tensor,
}

/// The query blocks of `q` (b, nkv, rep·s, hd; rows r = head j · s + position, as
/// [`causal_softmax`] reads them) against `k`, `v` (b, nkv, k_len, hd), each key `k_len − s`
/// positions ahead of the queries (a prefix or a cache). Made one at a time, as the caller
/// iterates: only one block's copies exist at once.
fn blocks<'a>(q: &'a Tensor, k: &'a Tensor, v: &'a Tensor, s: usize, block: usize) -> CResult<impl Iterator<Item = CResult<Block>> + 'a> {
    let k_len = k.dim(2)?;
    let offset = k_len - s;
    let block = block.max(1);
    Ok((0..s).step_by(block).map(move |start| {
        let n = block.min(s - start);
        let keys = offset + start + n;
        let qb = block_rows(q, s, start, n)?;
        let (kb, vb) = if keys == k_len { (k.clone(), v.clone()) } else { (k.narrow(2, 0, keys)?.contiguous()?, v.narrow(2, 0, keys)?.contiguous()?) };
        Ok(Block { start, n, keys, q: qb, k: kb, v: vb })
    }))
}

/// The rows of positions `start..start + n` of every stacked head of `t` (b, nkv, rep·s, hd),
/// as (b, nkv, rep·n, hd).
fn block_rows(t: &Tensor, s: usize, start: usize, n: usize) -> CResult<Tensor> {
    if n == s {
        return Ok(t.clone());
    }
    let (b, nkv, rows, hd) = t.dims4()?;
    let rep = rows / s;
    t.reshape((b, nkv, rep, s, hd))?.narrow(3, start, n)?.contiguous()?.reshape((b, nkv, rep * n, hd))
}

/// Joins per-block (b, nkv, rep·n, hd) results back into (b, nkv, rep·s, hd).
fn join_blocks(parts: Vec<Tensor>, b: usize, nkv: usize, rep: usize, hd: usize) -> CResult<Tensor> {
    if parts.len() == 1 {
        return Ok(parts.into_iter().next().expect("one part"));
    }
    let parts = parts
        .into_iter()
        .map(|p| {
            let n = p.dim(2)? / rep;
            p.reshape((b, nkv, rep, n, hd))
        })
        .collect::<CResult<Vec<_>>>()?;
    let s: usize = parts.iter().map(|p| p.dim(3)).sum::<CResult<usize>>()?;
    Tensor::cat(&parts, 3)?.reshape((b, nkv, rep * s, hd))
}

/// The attention output of detached operands, block by block (no graph).
fn attention_forward(q: &Tensor, k: &Tensor, v: &Tensor, s: usize, scale: f64, block: usize) -> CResult<Tensor> {
    let (b, nkv, rows, hd) = q.dims4()?;
    let mut parts = Vec::new();
    for blk in blocks(q, k, v, s, block)? {
        let blk = blk?;
        let p = causal_softmax(&blk.q.matmul(&blk.k.t()?)?, blk.n, scale)?;
        parts.push(p.matmul(&blk.v)?);
    }
    join_blocks(parts, b, nkv, rows / s, hd)
}

/// Heads laid out (b, nkv, rep·s, hd) → (b, s, heads·hd), the input of `o_proj`.
fn merge_heads(o: &Tensor, s: usize) -> CResult<Tensor> {
    let (b, nkv, rows, hd) = o.dims4()?;
    let nh = nkv * rows / s;
    o.reshape((b, nh, s, hd))?.transpose(1, 2)?.reshape((b, s, nh * hd))
}

/// (b, s, heads·hd) → (b, nkv, rep·s, hd), the inverse of [`merge_heads`].
fn head_blocks(o: &Tensor, nkv: usize, hd: usize) -> CResult<Tensor> {
    let (b, s, width) = o.dims3()?;
    let nh = width / hd;
    o.reshape((b, s, nh, hd))?.transpose(1, 2)?.contiguous()?.reshape((b, nkv, nh / nkv * s, hd))
}

/// The gradient hook of [`causal_attention`], applied to `(q, k, v)`: its forward hands back
/// the attention output it holds (computed without a graph, heads merged); its backward
/// recomputes each query block's probabilities from `q` and `k` and returns the gradients of
/// `q`, `k` and `v` — flash attention's backward, on tensor ops, so it runs on every device
/// and dtype. The graph keeps q, k, v and the output, never the (rows × keys) matrices.
struct AttentionGrad {
    /// The output, (b, s, heads·hd), detached: handed over as the op's result by the forward;
    /// the backward reads the result instead.
    o: Handoff,
    q_len: usize,
    scale: f64,
    block: usize,
    /// What the forward kept for the backward besides the output.
    lse: SavedLse,
}

/// Each query row's log-sum-exp of its scaled scores, when the forward ran a kernel that keeps
/// it: the backward then runs that kernel's backward too.
enum SavedLse {
    /// The forward ran on tensor ops (the backward recomputes whole blocks).
    None,
    /// [`attention_cpu`]'s kernel ran (on the CPU).
    Cpu(Arc<Vec<f32>>),
    /// The flash kernels ran (on a GPU, in 16 bits): (b, nkv, rep·s) f32 on the device.
    Flash(Tensor),
}

impl AttentionGrad {
    fn new(o: Tensor, q_len: usize, scale: f64, block: usize, lse: SavedLse) -> Self {
        AttentionGrad { o: Handoff::new(o), q_len, scale, block, lse }
    }
}

impl candle_core::CustomOp3 for AttentionGrad {
    handed_off_forward3!(o, "attention-grad");

    fn bwd(&self, q: &Tensor, k: &Tensor, v: &Tensor, res: &Tensor, grad: &Tensor) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        profile::region("attention bwd", q.device(), || {
            let (b, nkv, rows, hd) = q.dims4()?;
            let s = self.q_len;
            let rep = rows / s;
            let k_len = k.dim(2)?;
            if let SavedLse::Flash(lse) = &self.lse {
                let (dq, dk, dv) = fused::flash_backward(q, k, v, res, lse, grad, s, self.scale)?;
                return Ok((Some(dq), Some(dk), Some(dv)));
            }
            if let SavedLse::Cpu(lse) = &self.lse {
                let d = attention_cpu::Dims { b, nkv, rep, s, keys: k_len, hd };
                let (dq, dk, dv) = attention_cpu_backward(q, k, v, res, lse, grad, d, self.scale as f32, self.block)?;
                return Ok((Some(dq), Some(dk), Some(dv)));
            }
            let dtype = q.dtype();
            // Sums over blocks and the softmax's row terms in f32 (f64 for f64 operands).
            let acc = if dtype == DType::F64 { DType::F64 } else { DType::F32 };
            let o = head_blocks(&res.detach(), nkv, hd)?;
            let g = head_blocks(grad, nkv, hd)?;
            let (mut dk, mut dv) = (Tensor::zeros((b, nkv, k_len, hd), acc, q.device())?, Tensor::zeros((b, nkv, k_len, hd), acc, q.device())?);
            let mut dq = Vec::new();
            let (qd, kd, vd) = (q.detach(), k.detach(), v.detach());
            for blk in blocks(&qd, &kd, &vd, s, self.block)? {
                let blk = blk?;
                let (gb, ob) = (block_rows(&g, s, blk.start, blk.n)?, block_rows(&o, s, blk.start, blk.n)?);
                let p = causal_softmax(&blk.q.matmul(&blk.k.t()?)?, blk.n, self.scale)?;
                // dS = scale · P ∘ (dO·Vᵀ − rowsum(dO ∘ O)); masked entries have P = 0.
                let dp = gb.matmul(&blk.v.t()?)?;
                let row = (gb.to_dtype(acc)? * ob.to_dtype(acc)?)?.sum_keepdim(D::Minus1)?;
                let ds = if fused::active(&p) {
                    fused::attention_ds(&p, &dp, &row, self.scale)?
                } else {
                    ((p.to_dtype(acc)? * dp.to_dtype(acc)?.broadcast_sub(&row)?)? * self.scale)?.to_dtype(dtype)?
                };
                let pad = k_len - blk.keys;
                dv = (dv + p.t()?.matmul(&gb)?.to_dtype(acc)?.pad_with_zeros(2, 0, pad)?)?;
                dk = (dk + ds.t()?.matmul(&blk.q)?.to_dtype(acc)?.pad_with_zeros(2, 0, pad)?)?;
                dq.push(ds.matmul(&blk.k)?);
            }
            let dq = join_blocks(dq, b, nkv, rep, hd)?;
            Ok((Some(dq), Some(dk.to_dtype(dtype)?), Some(dv.to_dtype(dtype)?)))
        })
    }
}

/// Causal attention `softmax(scale · q·kᵀ, causal) · v` that keeps no (rows × keys) matrix
/// for the backward, with the heads merged: (b, q_len, heads·hd), `o_proj`'s input. `q` is
/// (b, nkv, rep·q_len, hd) with the `rep` query heads sharing a KV head stacked on the row
/// axis (as [`causal_softmax`] reads them), `k`, `v` (b, nkv, k_len, hd) with
/// `k_len ≥ q_len` (earlier keys: a prefix or a cache). The forward runs in query blocks, each
/// seeing only the keys up to its last position; the backward recomputes each block's
/// probabilities (flash attention's scheme). On the CPU both passes are [`attention_cpu`]'s
/// kernels (in f32; 16-bit operands are cast), in blocks of [`attention_cpu::TILE`]
/// positions; on a GPU in f16/bf16 with head_dim 64 or 128, the flash kernels
/// ([`fused::flash_applies`]: one launch forward, two backward); elsewhere they are tensor
/// ops (every device and dtype) in blocks of at most [`ATTENTION_BLOCK_BYTES`] of scores.
/// What stays for the backward: q, k, v and the output (and with either kernel one
/// log-sum-exp per query row).
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, q_len: usize, scale: f64) -> CResult<Tensor> {
    profile::region("attention fwd", q.device(), || {
        let (b, nkv, rows, _) = q.dims4()?;
        let block = if cpu_attention(q, k, v) {
            attention_cpu::TILE.min(q_len.max(1))
        } else {
            attention_block_len(b, nkv * rows / q_len.max(1), q_len, k.dim(2)?)
        };
        causal_attention_blocked(q, k, v, q_len, scale, block)
    })
}

/// Whether attention over these operands runs [`attention_cpu`]'s kernels: on the CPU, in f32,
/// or in bf16/f16 (computed in f32); not with `TUNEBENCH_FUSED_KERNELS=0`, nor inside
/// [`fused::forced`] (which checks the tensor-op path a GPU runs, on its CPU twins).
fn cpu_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    let dtype = q.dtype();
    q.device().is_cpu()
        && matches!(dtype, DType::F32 | DType::BF16 | DType::F16)
        && (k.dtype(), v.dtype()) == (dtype, dtype)
        && fused::enabled_by_env()
        && !fused::is_forced()
}

/// `t` as a contiguous f32 tensor (itself when it is one already).
fn f32_copy(t: &Tensor) -> CResult<Tensor> {
    if t.device().is_cpu() && matches!(t.dtype(), DType::BF16 | DType::F16) && t.is_contiguous() {
        // Widened in parallel (candle's cast is one thread).
        let (st, l) = t.storage_and_layout();
        let Some(cpu) = cpu_storage(&st) else { candle_core::bail!("f32-copy: tensor not on the cpu") };
        let v = fused::cpu_values(cpu, l, "f32-copy")?;
        drop(st);
        return Tensor::from_vec(v, t.shape(), &Device::Cpu);
    }
    t.to_dtype(DType::F32)?.contiguous()
}

/// `t` rounded to `dtype`: an f32 CPU tensor to bf16/f16 in parallel (candle's cast is one
/// thread), anything else by `to_dtype`.
fn narrowed(t: &Tensor, dtype: DType) -> CResult<Tensor> {
    if !(f32_contiguous(t) && matches!(dtype, DType::BF16 | DType::F16)) {
        return t.to_dtype(dtype);
    }
    let shape = t.shape().clone();
    cpu_f32(t, |v| match dtype {
        DType::BF16 => Tensor::from_vec(v.par_iter().with_min_len(4096).map(|&x| half::bf16::from_f32(x)).collect::<Vec<_>>(), shape, &Device::Cpu),
        _ => Tensor::from_vec(v.par_iter().with_min_len(4096).map(|&x| half::f16::from_f32(x)).collect::<Vec<_>>(), shape, &Device::Cpu),
    })
}

/// [`attention_cpu`]'s forward on CPU operands in f32, bf16 or f16 (computed in f32): the
/// output (b, s, heads·hd) in q's dtype and each q row's log-sum-exp.
pub(crate) fn attention_cpu_forward(q: &Tensor, k: &Tensor, v: &Tensor, d: attention_cpu::Dims, scale: f32, tile: usize) -> CResult<(Tensor, Vec<f32>)> {
    let (qf, kf, vf) = (f32_copy(&q.contiguous()?)?, f32_copy(&k.contiguous()?)?, f32_copy(&v.contiguous()?)?);
    let (o, lse) = cpu_f32s([&qf, &kf, &vf], |[qs, ks, vs]| attention_cpu::forward(qs, ks, vs, d, scale, tile))?;
    Ok((Tensor::from_vec(o, (d.b, d.s, d.nkv * d.rep * d.hd), &Device::Cpu)?.to_dtype(q.dtype())?, lse))
}

/// [`attention_cpu`]'s backward: (dq, dk, dv) in q's dtype from the operands, the output `o`,
/// the forward's log-sum-exps and the output's gradient `g` (16-bit ones computed in f32).
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_cpu_backward(q: &Tensor, k: &Tensor, v: &Tensor, o: &Tensor, lse: &[f32], g: &Tensor, d: attention_cpu::Dims, scale: f32, tile: usize) -> CResult<(Tensor, Tensor, Tensor)> {
    let [q32, k32, v32, o32, g32] = [q, k, v, o, g].map(f32_copy);
    let (q32, k32, v32, o32, g32) = (q32?, k32?, v32?, o32?, g32?);
    let (dq, dk, dv) = cpu_f32s([&q32, &k32, &v32, &o32, &g32], |[q, k, v, o, g]| attention_cpu::backward(q, k, v, o, lse, g, d, scale, tile))?;
    let grad = |x: Vec<f32>, rows: usize| Tensor::from_vec(x, (d.b, d.nkv, rows, d.hd), &Device::Cpu)?.to_dtype(q.dtype());
    Ok((grad(dq, d.rep * d.s)?, grad(dk, d.keys)?, grad(dv, d.keys)?))
}

/// [`causal_attention`] with a given block length (positions per query block).
pub fn causal_attention_blocked(q: &Tensor, k: &Tensor, v: &Tensor, q_len: usize, scale: f64, block: usize) -> CResult<Tensor> {
    let (b, nkv, rows, hd) = q.dims4()?;
    let k_len = k.dim(2)?;
    if q_len == 0 || rows % q_len != 0 || k_len < q_len || k.dims4()? != (b, nkv, k_len, hd) || v.dims4()? != (b, nkv, k_len, hd) {
        candle_core::bail!("causal-attention: q {:?}, k {:?}, v {:?} for {q_len} positions", q.dims(), k.dims(), v.dims());
    }
    let tracked = q.track_op() || k.track_op() || v.track_op();
    if cpu_attention(q, k, v) {
        let d = attention_cpu::Dims { b, nkv, rep: rows / q_len, s: q_len, keys: k_len, hd };
        let (o, lse) = attention_cpu_forward(q, k, v, d, scale as f32, block)?;
        if !tracked {
            return Ok(o);
        }
        return q.apply_op3(k, v, AttentionGrad::new(o, q_len, scale, block, SavedLse::Cpu(Arc::new(lse))));
    }
    if fused::flash_applies(q, k, v) {
        let (o, lse) = fused::flash_forward(q, k, v, q_len, scale)?;
        if !tracked {
            return Ok(o);
        }
        return q.apply_op3(k, v, AttentionGrad::new(o, q_len, scale, block, SavedLse::Flash(lse)));
    }
    let o = merge_heads(&attention_forward(&q.detach(), &k.detach(), &v.detach(), q_len, scale, block)?, q_len)?;
    if !tracked {
        return Ok(o);
    }
    q.apply_op3(k, v, AttentionGrad::new(o, q_len, scale, block, SavedLse::None))
}

/// Causal attention from differentiable primitives, heads merged: the scores, their causal
/// softmax and the product with the values, all kept by the graph (the reference
/// [`causal_attention`] is held to).
pub fn causal_attention_composed(q: &Tensor, k: &Tensor, v: &Tensor, q_len: usize, scale: f64) -> CResult<Tensor> {
    merge_heads(&causal_softmax_composed(&q.matmul(&k.t()?)?, q_len, scale)?.matmul(v)?, q_len)
}

// ---------------------------------------------------------------------------------------------
// Fused LM head + cross-entropy
// ---------------------------------------------------------------------------------------------

struct LinearCrossEntropy {
    /// (vocab, hidden), frozen (f32, bf16 or f16); taken by the forward, so the op in the graph
    /// keeps nothing of it for the backward (which reads only `dh`).
    w: std::sync::Mutex<Option<Tensor>>,
    targets: Vec<u32>,
    chunk: usize,
    /// dLoss_i/dh_i for every row, computed in the forward pass (the loss is per row, so the
    /// backward only scales it by the incoming gradient).
    dh: std::sync::Arc<std::sync::Mutex<Option<Tensor>>>,
}

impl LinearCrossEntropy {
    /// The op on f32 hidden states `hs` and the weight `w` (f32, bf16 or f16) on the CPU.
    fn apply(hs: &Tensor, w: &Tensor, targets: &[u32], chunk: usize) -> CResult<Tensor> {
        hs.apply_op1(LinearCrossEntropy { w: std::sync::Mutex::new(Some(w.clone())), targets: targets.to_vec(), chunk, dh: Default::default() })
    }
}

impl CustomOp1 for LinearCrossEntropy {
    fn name(&self) -> &'static str {
        "linear-cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let op = "linear-cross-entropy";
        let h = contiguous_f32(s, l, op)?;
        let (n, d) = l.shape().dims2()?;
        let Some(w) = self.w.lock().ok().and_then(|mut w| w.take()) else { candle_core::bail!("{op}: forward run twice") };
        let (losses, dh) = cpu_head_loss(h, (n, d), &w, &self.targets, self.chunk, |_, _, _| Ok(()), |_, _, _| Ok(()))?;
        if let Ok(mut slot) = self.dh.lock() {
            *slot = Some(Tensor::from_vec(dh, (n, d), &Device::Cpu)?);
        }
        Ok((CpuStorage::F32(losses), Shape::from(n)))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        profile::region("lm head + loss bwd", grad.device(), || {
            let dh = self.dh.lock().ok().and_then(|s| s.clone());
            let Some(dh) = dh else { candle_core::bail!("linear-cross-entropy: backward without forward") };
            Ok(Some(dh.broadcast_mul(&grad.unsqueeze(1)?)?))
        })
    }
}

/// The CPU's chunked LM-head loss on f32 rows `h` (n, d) and a head `w` (vocab, d; f32, bf16 or
/// f16): per chunk of rows, the logits `h·Wᵀ` by gemm into one reused buffer, then
/// `extra(start, rows, logits)` (LoRA adds its update there), then each row turned in place into
/// softmax − onehot `g` with its loss, `after(start, rows, g)` (LoRA's gradients read `g` there;
/// a scaled head rescales it in place into the gradient of the unscaled logits), and
/// `dh = g·W` into the chunk's rows. Returns the rows' losses and dh.
#[allow(clippy::type_complexity)]
fn cpu_head_loss(
    h: &[f32],
    (n, d): (usize, usize),
    w: &Tensor,
    targets: &[u32],
    chunk: usize,
    mut extra: impl FnMut(usize, usize, &mut [f32]) -> CResult<()>,
    mut after: impl FnMut(usize, usize, &mut [f32]) -> CResult<()>,
) -> CResult<(Vec<f32>, Vec<f32>)> {
    let op = "linear-cross-entropy";
    let vocab = w.dim(0)?;
    if w.dims() != [vocab, d] || h.len() != n * d || targets.len() != n {
        candle_core::bail!("{op}: weight {:?}, {} targets for {n} rows of hidden size {d}", w.dims(), targets.len());
    }
    let w = w.contiguous()?;
    let (ws, wl) = w.storage_and_layout();
    let Some(ws) = cpu_storage(&ws) else { candle_core::bail!("{op}: weight not on the cpu") };
    let Some((w0, _)) = wl.contiguous_offsets() else { candle_core::bail!("{op}: weight must be contiguous") };
    // The weight's vocabulary rows a block at a time: an f32 weight in one block, read in
    // place; a 16-bit one widened HALF_VOCAB_BLOCK rows at a time into a reused buffer
    // (exactly), so no f32 copy of the whole weight exists (1 GiB at a 128k vocabulary and
    // hidden 2048). Each block is widened twice per chunk, for the logits and for dh.
    let block_rows = if matches!(ws, CpuStorage::F32(_)) { vocab } else { HALF_VOCAB_BLOCK.min(vocab) };
    let mut wide = Vec::new();
    let chunk = chunk.max(1).min(n.max(1));
    let mut losses = vec![0f32; n];
    let mut dh = vec![0f32; n * d];
    // One chunk's logits, reused: made by gemm in place, turned into softmax − onehot row by
    // row (a row, vocab floats, stays in cache through its passes), then multiplied by W
    // straight into the chunk's rows of dh.
    let mut logits = vec![0f32; chunk * vocab];
    for start in (0..n).step_by(chunk) {
        let rows = chunk.min(n - start);
        let lg = &mut logits[..rows * vocab];
        // logits = h_chunk · Wᵀ (Wᵀ read in place: row stride 1, column stride d), a block
        // of columns at a time.
        for v0 in (0..vocab).step_by(block_rows) {
            let vl = block_rows.min(vocab - v0);
            let wb = vocab_rows(ws, w0 + v0 * d, vl * d, &mut wide, op)?;
            cpu_gemm_rows(&mut lg[v0..], vocab, (rows, vl, d), false, (&h[start * d..(start + rows) * d], d, 1), (wb, 1, d), 1.0, true)?;
        }
        extra(start, rows, lg)?;
        let targets = &targets[start..start + rows];
        let out = &mut losses[start..start + rows];
        softmax_grad_rows(lg, vocab, targets, out);
        after(start, rows, lg)?;
        // dh_chunk = g · W, summed over the blocks.
        for v0 in (0..vocab).step_by(block_rows) {
            let vl = block_rows.min(vocab - v0);
            let wb = vocab_rows(ws, w0 + v0 * d, vl * d, &mut wide, op)?;
            cpu_gemm(&mut dh[start * d..(start + rows) * d], (rows, d, vl), v0 > 0, (&lg[v0..], vocab, 1), (wb, d, 1), 1.0, true)?;
        }
    }
    Ok((losses, dh))
}

/// Each row of `logits` (rows of `vocab`) turned in place into softmax − onehot at its target,
/// and its loss (lse − logit[target]) written to `losses`, the rows in parallel.
fn softmax_grad_rows(logits: &mut [f32], vocab: usize, targets: &[u32], losses: &mut [f32]) {
    logits.par_chunks_mut(vocab).zip(losses.par_iter_mut()).zip(targets.par_iter()).for_each(|((row, loss), &t)| {
        let t = t as usize;
        let target_logit = row[t];
        let max = cpu_math::max(row);
        let sum = cpu_math::exp_shifted(row, 1.0, max);
        // lse − logit[t], in the shifted form (exact even when exp underflows; NaN logits give
        // a NaN loss, which the trainer reports).
        *loss = sum.ln() - (target_logit - max);
        let inv = 1.0 / sum;
        row.iter_mut().for_each(|v| *v *= inv);
        row[t] -= 1.0;
    });
}

/// The summed cross-entropy of `logits` (n, vocab) against `targets`, its gradient
/// (softmax − onehot) made in the forward and handed back by [`carry_gradient`]: on the CPU in
/// f32 one pass a row (the vector `exp`) into one (n, vocab) buffer, with the fused kernels
/// on a GPU theirs; elsewhere, and without a graph, [`cross_entropy_rows`]' composed ops
/// (whose graph keeps the shifted logits, their exp and the gradients of each: an adapted LM
/// head's loss spent 3.6 s of a 14 s step in them at 8×256).
pub fn cross_entropy_sum(logits: &Tensor, targets: &[u32]) -> CResult<Tensor> {
    profile::region("cross-entropy fwd", logits.device(), || cross_entropy_sum_inner(logits, targets))
}

fn cross_entropy_sum_inner(logits: &Tensor, targets: &[u32]) -> CResult<Tensor> {
    let (n, vocab) = logits.dims2()?;
    check_targets(logits, targets, vocab)?;
    if !logits.track_op() || n == 0 || !(use_fused(logits) || fused::active(logits)) {
        return cross_entropy_rows(logits, targets)?.sum_all();
    }
    if fused::active(logits) {
        let t = Tensor::from_slice(targets, n, logits.device())?;
        let (losses, g) = fused::cross_entropy(&logits.detach().contiguous()?, &t)?;
        return losses.to_dtype(DType::F32)?.sum_all()? + carry_gradient(logits, g)?;
    }
    let l = logits.detach().contiguous()?;
    let (losses, g) = cpu_f32s([&l], |[x]| {
        let (mut g, mut losses) = (x.to_vec(), vec![0f32; n]);
        softmax_grad_rows(&mut g, vocab, targets, &mut losses);
        Ok((losses, g))
    })?;
    loss_total(&losses)? + carry_cpu(logits, g, (n, vocab))?
}

/// The rows' losses summed (in f64) into a scalar f32 tensor on the CPU.
fn loss_total(losses: &[f32]) -> CResult<Tensor> {
    Tensor::new(losses.iter().map(|&l| l as f64).sum::<f64>() as f32, &Device::Cpu)
}

/// [`carry_gradient`] with a gradient made on the CPU as a flat f32 buffer of shape `dims`.
fn carry_cpu(t: &Tensor, g: Vec<f32>, dims: (usize, usize)) -> CResult<Tensor> {
    carry_gradient(t, Tensor::from_vec(g, dims, &Device::Cpu)?)
}

/// Vocabulary rows a 16-bit LM-head weight is widened to f32 at a time in the CPU loss (8 MiB
/// at hidden 2048).
const HALF_VOCAB_BLOCK: usize = 1024;

/// `len` elements of a weight from element `at` as f32: in place for an f32 weight, widened
/// (in parallel, exactly) into `buf` for a bf16/f16 one.
fn vocab_rows<'a>(w: &'a CpuStorage, at: usize, len: usize, buf: &'a mut Vec<f32>, op: &str) -> CResult<&'a [f32]> {
    fn widen<T: Copy + Sync>(src: &[T], buf: &mut Vec<f32>, f: impl Fn(T) -> f32 + Sync) {
        buf.resize(src.len(), 0.0);
        buf.par_chunks_mut(8192).zip(src.par_chunks(8192)).for_each(|(d, s)| d.iter_mut().zip(s).for_each(|(d, &s)| *d = f(s)));
    }
    match w {
        CpuStorage::F32(v) => return Ok(&v[at..at + len]),
        CpuStorage::BF16(v) => widen(&v[at..at + len], buf, |x| x.to_f32()),
        CpuStorage::F16(v) => widen(&v[at..at + len], buf, |x| x.to_f32()),
        other => candle_core::bail!("{op}: f32, bf16 or f16 weight expected, got {:?}", other.dtype()),
    }
    Ok(&buf[..len])
}

/// Per-row cross-entropy of `hs · wᵀ` (an LM head with frozen weight `w`, (vocab, hidden))
/// against `targets`, shape (n,). On CPU/f32 the logits are produced `chunk` rows at a time and
/// dropped at once; the gradient for `hs` is computed in the same pass (Liger-style), so the
/// (n, vocab) logits never stay in memory and need no composed log-softmax backward.
pub fn linear_cross_entropy(hs: &Tensor, w: &Tensor, targets: &[u32], chunk: usize) -> CResult<Tensor> {
    profile::region("lm head + loss fwd", hs.device(), || {
        check_targets(hs, targets, w.dim(0)?)?;
        if use_fused(hs) && hs.track_op() && !fused::active(hs) {
            return LinearCrossEntropy::apply(&hs.contiguous()?, w, targets, chunk);
        }
        if hs.device().is_cpu() && matches!(hs.dtype(), DType::BF16 | DType::F16) && hs.track_op() && !fused::is_forced() {
            // 16-bit on the CPU: the f32 op above on the hidden states cast to f32, the weight
            // widened a block of rows at a time inside it (exactly), gemm at f32's rate where
            // candle's bf16 products run at a third of it; the gradient goes back to 16 bits
            // through the cast. Logits in f32 are the more exact ones.
            return LinearCrossEntropy::apply(&hs.to_dtype(DType::F32)?.contiguous()?, w, targets, chunk);
        }
        if hs.track_op() {
            return linear_cross_entropy_chunked(hs, w, targets, chunk);
        }
        // Composed path (other devices/dtypes, and no-grad evaluation), chunk by chunk.
        let n = hs.dim(0)?;
        // The fused kernels read the targets on the device: copied there once, not per chunk.
        let on_device = if fused::active(hs) { Some(Tensor::from_slice(targets, targets.len(), hs.device())?) } else { None };
        let mut parts = Vec::new();
        for start in (0..n).step_by(chunk.max(1)) {
            let rows = chunk.max(1).min(n - start);
            let logits = frozen_linear(&hs.narrow(0, start, rows)?, w)?;
            parts.push(match &on_device {
                Some(t) => fused::cross_entropy_loss(&logits, &t.narrow(0, start, rows)?)?,
                None => cross_entropy_rows(&logits, &targets[start..start + rows])?,
            });
        }
        Tensor::cat(&parts, 0)
    })
}

/// [`linear_cross_entropy`] for any device and dtype (GPUs, bf16), from tensor ops: each chunk's
/// logits are made, turned into the rows' losses and their gradient `dh = (softmax − onehot)·W`
/// in f32, and dropped — no graph holds them. The result carries that gradient with the
/// surrogate `loss + Σ_j h_j·dh_j − Σ_j sg(h_j)·dh_j` (sg = no gradient): its value is the
/// loss (the last two terms are the same numbers, so they cancel exactly) and its gradient
/// with respect to `hs` is `dh`. Memory: one chunk of logits at a time plus `dh` (n, hidden),
/// never the (n, vocab) logits PyTorch keeps without a fused kernel.
pub fn linear_cross_entropy_chunked(hs: &Tensor, w: &Tensor, targets: &[u32], chunk: usize) -> CResult<Tensor> {
    check_targets(hs, targets, w.dim(0)?)?;
    let n = hs.dim(0)?;
    let dtype = if hs.dtype() == DType::F64 { DType::F64 } else { DType::F32 };
    let h = hs.detach();
    let wd = w.detach();
    let (mut losses, mut grads) = (Vec::new(), Vec::new());
    // The targets on the device, copied once (one host-to-device transfer per loss, not per chunk).
    let all_targets = Tensor::from_slice(targets, targets.len(), hs.device())?;
    for start in (0..n).step_by(chunk.max(1)) {
        let rows = chunk.max(1).min(n - start);
        let (loss, g) = chunk_loss_and_softmax_grad(&h.narrow(0, start, rows)?.matmul(&wd.t()?)?, &all_targets.narrow(0, start, rows)?, dtype)?;
        losses.push(loss);
        grads.push(g.to_dtype(wd.dtype())?.matmul(&wd)?.to_dtype(dtype)?);
    }
    let loss = Tensor::cat(&losses, 0)?;
    let dh = Tensor::cat(&grads, 0)?;
    let h32 = hs.to_dtype(dtype)?;
    let tracked = (&h32 * &dh)?.sum(1)?;
    let constant = (h32.detach() * &dh)?.sum(1)?;
    (loss + tracked)? - constant
}

/// One chunk's logits (rows, vocab), made in the activations' dtype: each row's loss in `dtype`
/// and softmax − onehot (rows, vocab) (in the logits' dtype from the fused kernels on a GPU,
/// else in `dtype`).
fn chunk_loss_and_softmax_grad(logits: &Tensor, t: &Tensor, dtype: DType) -> CResult<(Tensor, Tensor)> {
    if fused::active(logits) {
        // One kernel for the rows' losses and log-sum-exps, one for softmax − onehot in the
        // logits' dtype.
        let (loss, g) = fused::cross_entropy(logits, t)?;
        return Ok((loss.to_dtype(dtype)?, g));
    }
    // Normalised in f32.
    let logits = logits.to_dtype(dtype)?;
    let rows = logits.dim(0)?;
    let max = logits.max_keepdim(D::Minus1)?;
    let shifted = logits.broadcast_sub(&max)?;
    let e = shifted.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    let picked = shifted.gather(&t.unsqueeze(1)?, 1)?;
    let loss = (sum.log()? - picked)?.squeeze(1)?;
    let onehot = Tensor::zeros((rows, logits.dim(1)?), dtype, logits.device())?.scatter_add(&t.unsqueeze(1)?, &Tensor::ones((rows, 1), dtype, logits.device())?, 1)?;
    Ok((loss, (e.broadcast_div(&sum)? - onehot)?))
}

/// The summed cross-entropy of `hs · wᵀ` against `targets` for an LM head whose weight `w`
/// trains (full fine-tuning's, tracked): [`linear_cross_entropy_chunked`]'s scheme with the
/// weight's gradient too. Each chunk's logits are made, turned into softmax − onehot `g` and
/// dropped; `dh = g·W` per row and `dW = Σ gᵀ·h` over the chunks accumulate in f32 (f64 for
/// f64). The scalar returned is the summed loss (computed outside the graph) plus two
/// [`CarryGradient`] zeros, one over `hs` and one over `w`, whose backward hands them dh and dW
/// scaled by the incoming gradient. Memory: one chunk of logits, dh and dW,
/// where the composed loss keeps every row's logits and their log-softmax for the backward
/// (5.25 copies of (rows, vocab) f32 measured; 2 GiB for 2048 rows of a 49k vocabulary).
pub fn linear_cross_entropy_trained_sum(hs: &Tensor, w: &Tensor, targets: &[u32], chunk: usize) -> CResult<Tensor> {
    profile::region("lm head + loss fwd", hs.device(), || {
        check_targets(hs, targets, w.dim(0)?)?;
        let n = hs.dim(0)?;
        if use_fused(hs) && !fused::active(hs) && n > 0 {
            return trained_head_loss_cpu(hs, w, targets, chunk);
        }
        let dtype = if hs.dtype() == DType::F64 { DType::F64 } else { DType::F32 };
        let (h, wd) = (hs.detach(), w.detach());
        let all_targets = Tensor::from_slice(targets, targets.len(), hs.device())?;
        let mut loss = Tensor::zeros((), dtype, hs.device())?;
        let mut grads = Vec::new();
        let mut dw: Option<Tensor> = None;
        for start in (0..n).step_by(chunk.max(1)) {
            let rows = chunk.max(1).min(n - start);
            let hc = h.narrow(0, start, rows)?;
            let (l, g) = chunk_loss_and_softmax_grad(&hc.matmul(&wd.t()?)?, &all_targets.narrow(0, start, rows)?, dtype)?;
            loss = (loss + l.sum_all()?)?;
            grads.push(g.to_dtype(wd.dtype())?.matmul(&wd)?.to_dtype(dtype)?);
            let part = g.to_dtype(dtype)?.t()?.matmul(&hc.to_dtype(dtype)?)?;
            dw = Some(match dw {
                Some(acc) => (acc + part)?,
                None => part,
            });
        }
        let loss = (loss + carry_gradient(hs, Tensor::cat(&grads, 0)?)?)?;
        match dw {
            Some(dw) => loss + carry_gradient(w, dw)?,
            None => Ok(loss),
        }
    })
}

/// [`linear_cross_entropy_trained_sum`] on the CPU in f32: [`cpu_head_loss`]'s chunks (one
/// reused buffer of logits, turned into softmax − onehot `g` in place), with each chunk's
/// `gᵀ·h` accumulated by gemm into one f32 dW.
fn trained_head_loss_cpu(hs: &Tensor, w: &Tensor, targets: &[u32], chunk: usize) -> CResult<Tensor> {
    let h = hs.detach().contiguous()?;
    let ((n, d), vocab) = (h.dims2()?, w.dim(0)?);
    let mut dw = vec![0f32; vocab * d];
    let (losses, dh) = cpu_f32s([&h], |[h]| {
        // dW += gᵀ·h_chunk (gᵀ read in place: row stride 1, column stride vocab).
        let dw_chunk = |start: usize, rows: usize, g: &mut [f32]| cpu_gemm(&mut dw, (vocab, d, rows), start > 0, (g, 1, vocab), (&h[start * d..(start + rows) * d], d, 1), 1.0, true);
        cpu_head_loss(h, (n, d), &w.detach(), targets, chunk, |_, _, _| Ok(()), dw_chunk)
    })?;
    (loss_total(&losses)? + carry_cpu(hs, dh, (n, d))?)? + carry_cpu(w, dw, (vocab, d))?
}

/// LoRA's pair on an LM head (see [`linear_cross_entropy_lora_sum`]).
#[derive(Clone, Copy)]
pub struct HeadPair<'a> {
    /// The update's input rows (`hs` with LoRA's dropout applied, or `hs` itself), tracked.
    pub input: &'a Tensor,
    /// (r, hidden), in the activations' dtype.
    pub a: &'a Tensor,
    /// (vocab, r), in the activations' dtype.
    pub b: &'a Tensor,
    /// alpha / r (or alpha / √r).
    pub scale: f64,
}

/// The summed cross-entropy of `hs·Wᵀ + s·(x·Aᵀ)·Bᵀ` against `targets` for a LoRA-adapted LM
/// head (frozen `w` (vocab, hidden)): [`linear_cross_entropy_trained_sum`]'s scheme with the
/// pair's gradients. Per chunk the logits are made, turned into softmax − onehot `g` and
/// dropped; `dh = g·W`, `dx = s·(g·B)·A`, `dB += s·gᵀ·(x·Aᵀ)` and `dA += s·(g·B)ᵀ·x`
/// accumulate in f32 (f64 for f64), and [`CarryGradient`] zeros hand them to `hs`, `x`, A
/// and B. The composed loss kept every row's logits and their log-softmax for the backward
/// (5.25 copies of (rows, vocab) f32 measured); this keeps one chunk.
pub fn linear_cross_entropy_lora_sum(hs: &Tensor, w: &Tensor, pair: HeadPair, targets: &[u32], chunk: usize) -> CResult<Tensor> {
    profile::region("lm head + loss fwd", hs.device(), || {
        check_targets(hs, targets, w.dim(0)?)?;
        let n = hs.dim(0)?;
        if use_fused(hs) && !fused::active(hs) && n > 0 {
            return lora_head_loss_cpu(hs, w, pair, targets, chunk);
        }
        let dtype = if hs.dtype() == DType::F64 { DType::F64 } else { DType::F32 };
        let (h, x, wd) = (hs.detach(), pair.input.detach(), w.detach().to_dtype(hs.dtype())?);
        let (a32, b32) = (pair.a.detach().to_dtype(dtype)?, pair.b.detach().to_dtype(dtype)?);
        let all_targets = Tensor::from_slice(targets, targets.len(), hs.device())?;
        let mut loss = Tensor::zeros((), dtype, hs.device())?;
        let (mut dh, mut dx) = (Vec::new(), Vec::new());
        let (mut da, mut db) = (a32.zeros_like()?, b32.zeros_like()?);
        for start in (0..n).step_by(chunk.max(1)) {
            let rows = chunk.max(1).min(n - start);
            let (hc, xc) = (h.narrow(0, start, rows)?, x.narrow(0, start, rows)?);
            // The low-rank path in f32 (LoRA's pair may be f32 beside 16-bit activations).
            let xc = xc.to_dtype(dtype)?;
            let xa = xc.matmul(&a32.t()?)?;
            let logits = (hc.matmul(&wd.t()?)?.to_dtype(dtype)? + (xa.matmul(&b32.t()?)? * pair.scale)?)?;
            let (l, g) = chunk_loss_and_softmax_grad(&logits, &all_targets.narrow(0, start, rows)?, dtype)?;
            loss = (loss + l.sum_all()?)?;
            dh.push(g.to_dtype(wd.dtype())?.matmul(&wd)?.to_dtype(dtype)?);
            let g = g.to_dtype(dtype)?;
            let gb = g.matmul(&b32)?;
            dx.push((gb.matmul(&a32)? * pair.scale)?);
            db = (db + (g.t()?.matmul(&xa)? * pair.scale)?)?;
            da = (da + (gb.t()?.matmul(&xc)? * pair.scale)?)?;
        }
        if n == 0 {
            return Ok(loss);
        }
        let loss = (loss + carry_gradient(hs, Tensor::cat(&dh, 0)?)?)?;
        let loss = (loss + carry_gradient(pair.input, Tensor::cat(&dx, 0)?)?)?;
        (loss + carry_gradient(pair.a, da)?)? + carry_gradient(pair.b, db)?
    })
}

/// [`linear_cross_entropy_lora_sum`] on the CPU in f32: [`cpu_head_loss`]'s chunks, the update
/// `s·(x·Aᵀ)·Bᵀ` added into each chunk's logits by gemm and the pair's gradients read from each
/// chunk's softmax − onehot (`g·B` into one (n, r) buffer, `s·gᵀ·(x·Aᵀ)` accumulated into dB),
/// then `dx = s·(g·B)·A` and `dA = s·(g·B)ᵀ·x` once over all rows.
fn lora_head_loss_cpu(hs: &Tensor, w: &Tensor, pair: HeadPair, targets: &[u32], chunk: usize) -> CResult<Tensor> {
    let f32_rows = |t: &Tensor| -> CResult<Tensor> { t.detach().to_dtype(DType::F32)?.contiguous() };
    let (h, x, a, b) = (f32_rows(hs)?, f32_rows(pair.input)?, f32_rows(pair.a)?, f32_rows(pair.b)?);
    let ((n, d), (r, k), (vocab, rb)) = (h.dims2()?, a.dims2()?, b.dims2()?);
    if x.dims() != [n, k] || rb != r || k != d {
        candle_core::bail!("lora-head-loss: rows {:?}, input {:?}, A {:?}, B {:?}", h.dims(), x.dims(), a.dims(), b.dims());
    }
    let s = pair.scale as f32;
    let (losses, dh, gb, db) = cpu_f32s([&h, &x, &a, &b], |[h, x, a, b]| {
        // x·Aᵀ for every row, (n, r).
        let mut xa = vec![0f32; n * r];
        cpu_gemm(&mut xa, (n, r, k), false, (x, k, 1), (a, 1, k), 1.0, true)?;
        let mut gb = vec![0f32; n * r];
        let mut db = vec![0f32; vocab * r];
        let (losses, dh) = cpu_head_loss(
            h,
            (n, d),
            &w.detach(),
            targets,
            chunk,
            // logits += s·(x·Aᵀ)_chunk·Bᵀ (Bᵀ read in place: row stride 1, column stride r).
            |start, rows, lg| cpu_gemm(lg, (rows, vocab, r), true, (&xa[start * r..(start + rows) * r], r, 1), (b, 1, r), s, true),
            |start, rows, g| {
                cpu_gemm(&mut gb[start * r..(start + rows) * r], (rows, r, vocab), false, (g, vocab, 1), (b, r, 1), 1.0, true)?;
                // dB += s·gᵀ·(x·Aᵀ)_chunk.
                cpu_gemm(&mut db, (vocab, r, rows), start > 0, (g, 1, vocab), (&xa[start * r..(start + rows) * r], r, 1), s, true)
            },
        )?;
        Ok((losses, dh, gb, db))
    })?;
    let (mut dx, mut da) = (vec![0f32; n * k], vec![0f32; r * k]);
    cpu_f32s([&x, &a], |[x, a]| {
        cpu_gemm(&mut dx, (n, k, r), false, (&gb, r, 1), (a, k, 1), s, true)?;
        cpu_gemm(&mut da, (r, k, n), false, (&gb, 1, r), (x, k, 1), s, true)
    })?;
    let loss = ((loss_total(&losses)? + carry_cpu(hs, dh, (n, d))?)? + carry_cpu(pair.input, dx, (n, k))?)?;
    (loss + carry_cpu(pair.a, da, (r, k))?)? + carry_cpu(pair.b, db, (vocab, r))?
}

/// What an adapter does to an LM head's output column by column, `z = (h·Wᵀ + shift) ⊙ scale`:
/// IA3's output scaling (`scale`), BitFit's change of bias and a frozen bias (`shift`). Each
/// holds one value per vocabulary entry (any shape of that many elements; IA3's is (vocab, 1)).
#[derive(Clone, Copy, Default)]
pub struct HeadAffine<'a> {
    /// Multiplies each logit (after the shift): IA3's `l`.
    pub scale: Option<&'a Tensor>,
    /// Added to each logit: a frozen bias, BitFit's change of it, or their sum.
    pub shift: Option<&'a Tensor>,
}

/// The summed cross-entropy of an LM head whose output an adapter scales and shifts
/// ([`HeadAffine`]; frozen `w` (vocab, hidden)): [`linear_cross_entropy_trained_sum`]'s scheme
/// with the affine's gradients. With `y = h·Wᵀ + shift` and `g` = softmax − onehot of
/// `z = y ⊙ scale` per chunk: `dscale = Σ_rows g ⊙ y`, `dshift = Σ_rows g ⊙ scale` and
/// `dh = (g ⊙ scale)·W`, accumulated over the chunks and handed on by [`carry_gradient`].
/// One chunk's logits live at a time (and, for a scale, the chunk's `y`), where the slot's
/// graph through [`cross_entropy_sum`] kept seven copies of a chunk's logits and did the
/// backward's bookkeeping per chunk (1.5 s of a 10.8 s IA3 step at 8×256).
pub fn linear_cross_entropy_affine_sum(hs: &Tensor, w: &Tensor, affine: HeadAffine, targets: &[u32], chunk: usize) -> CResult<Tensor> {
    profile::region("lm head + loss fwd", hs.device(), || {
        let vocab = w.dim(0)?;
        check_targets(hs, targets, vocab)?;
        for t in [affine.scale, affine.shift].into_iter().flatten() {
            if t.elem_count() != vocab {
                candle_core::bail!("head-affine-loss: {:?} for a vocabulary of {vocab}", t.dims());
            }
        }
        let n = hs.dim(0)?;
        if use_fused(hs) && !fused::active(hs) && n > 0 {
            return affine_head_loss_cpu(hs, w, affine, targets, chunk);
        }
        let dtype = if hs.dtype() == DType::F64 { DType::F64 } else { DType::F32 };
        let (h, wd) = (hs.detach(), w.detach().to_dtype(hs.dtype())?);
        let row = |t: Option<&Tensor>| t.map(|t| t.detach().to_dtype(dtype)?.reshape((1, vocab))).transpose();
        let (scale, shift) = (row(affine.scale)?, row(affine.shift)?);
        let all_targets = Tensor::from_slice(targets, targets.len(), hs.device())?;
        let mut loss = Tensor::zeros((), dtype, hs.device())?;
        let mut dh = Vec::new();
        let (mut dscale, mut dshift) = (Tensor::zeros((1, vocab), dtype, hs.device())?, Tensor::zeros((1, vocab), dtype, hs.device())?);
        for start in (0..n).step_by(chunk.max(1)) {
            let rows = chunk.max(1).min(n - start);
            let mut y = h.narrow(0, start, rows)?.matmul(&wd.t()?)?.to_dtype(dtype)?;
            if let Some(b) = &shift {
                y = y.broadcast_add(b)?;
            }
            let z = match &scale {
                Some(l) => y.broadcast_mul(l)?,
                None => y.clone(),
            };
            let (l, g) = chunk_loss_and_softmax_grad(&z, &all_targets.narrow(0, start, rows)?, dtype)?;
            loss = (loss + l.sum_all()?)?;
            let mut g = g.to_dtype(dtype)?;
            if let Some(l) = &scale {
                dscale = (dscale + (&g * &y)?.sum_keepdim(0)?)?;
                g = g.broadcast_mul(l)?;
            }
            dshift = (dshift + g.sum_keepdim(0)?)?;
            dh.push(g.to_dtype(wd.dtype())?.matmul(&wd)?);
        }
        if n == 0 {
            return Ok(loss);
        }
        affine_carry(loss, hs, Tensor::cat(&dh, 0)?, affine, dscale, dshift)
    })
}

/// The loss plus the carried gradients of an affine head's rows, scale and shift.
fn affine_carry(loss: Tensor, hs: &Tensor, dh: Tensor, affine: HeadAffine, dscale: Tensor, dshift: Tensor) -> CResult<Tensor> {
    let mut loss = (loss + carry_gradient(hs, dh)?)?;
    for (t, g) in [(affine.scale, dscale), (affine.shift, dshift)] {
        if let Some(t) = t {
            loss = (loss + carry_gradient(t, g.reshape(t.shape())?)?)?;
        }
    }
    Ok(loss)
}

/// [`linear_cross_entropy_affine_sum`] on the CPU in f32: [`cpu_head_loss`]'s chunks, the shift
/// added to and the scale multiplied into each chunk's logits in place (the shifted chunk `y`
/// kept for `dscale` when the scale trains), and the affine's gradients read from softmax −
/// onehot as it is rescaled for `dh`: one pass over the chunk, each thread summing its rows
/// into its own pair of vocabulary-long sums.
/// Rows per block of the head's scale and shift partial sums (a block's two vocab-long sums
/// are its memory: 6 MiB for a 256-row chunk at a 49k vocabulary).
const HEAD_SUM_ROWS: usize = 16;

fn affine_head_loss_cpu(hs: &Tensor, w: &Tensor, affine: HeadAffine, targets: &[u32], chunk: usize) -> CResult<Tensor> {
    let flat = |t: Option<&Tensor>, fill: f64| -> CResult<Tensor> {
        match t {
            Some(t) => t.detach().to_dtype(DType::F32)?.flatten_all()?.contiguous(),
            None => Tensor::full(fill as f32, w.dim(0)?, &Device::Cpu),
        }
    };
    let (scale, shift) = (flat(affine.scale, 1.0)?, flat(affine.shift, 0.0)?);
    let h = hs.detach().contiguous()?;
    let ((n, d), vocab) = (h.dims2()?, w.dim(0)?);
    let chunk = chunk.max(1).min(n);
    let (has_scale, has_shift) = (affine.scale.is_some(), affine.shift.is_some());
    // dscale needs each chunk's y; dshift is a plain column sum of the rescaled g.
    let want_scale = affine.scale.is_some_and(|t| t.track_op());
    let want_shift = affine.shift.is_some_and(|t| t.track_op());
    let (mut dscale, mut dshift) = (vec![0f32; vocab], vec![0f32; vocab]);
    let (losses, dh) = cpu_f32s([&h, &scale, &shift], |[h, l, b]| {
        // (Both hooks reach it: a RefCell.)
        let y = std::cell::RefCell::new(vec![0f32; if want_scale { chunk * vocab } else { 0 }]);
        let add = |acc: &mut [f32], part: &[f32]| acc.iter_mut().zip(part).for_each(|(a, p)| *a += p);
        cpu_head_loss(
            h,
            (n, d),
            &w.detach(),
            targets,
            chunk,
            |_, rows, lg| {
                let shift_row = |row: &mut [f32]| {
                    if has_shift {
                        row.iter_mut().zip(b).for_each(|(v, b)| *v += b);
                    }
                };
                let scale_row = |row: &mut [f32]| {
                    if has_scale {
                        row.iter_mut().zip(l).for_each(|(v, l)| *v *= l);
                    }
                };
                if want_scale {
                    lg.par_chunks_mut(vocab).zip(y.borrow_mut()[..rows * vocab].par_chunks_mut(vocab)).for_each(|(row, y)| {
                        shift_row(row);
                        y.copy_from_slice(row);
                        scale_row(row);
                    });
                } else {
                    lg.par_chunks_mut(vocab).for_each(|row| {
                        shift_row(row);
                        scale_row(row);
                    });
                }
                Ok(())
            },
            |_, rows, g| {
                let y = y.borrow();
                let y = y.as_slice();
                // Partial sums over fixed blocks of HEAD_SUM_ROWS rows, added in block order:
                // the same sums whatever the threads do (a work-stealing fold's split points,
                // and so its rounding, vary from run to run).
                let block = HEAD_SUM_ROWS * vocab;
                let parts: Vec<(Vec<f32>, Vec<f32>)> = g[..rows * vocab]
                    .par_chunks_mut(block)
                    .enumerate()
                    .map(|(bi, gs)| {
                        let (mut ds, mut db) = (vec![0f32; if want_scale { vocab } else { 0 }], vec![0f32; if want_shift { vocab } else { 0 }]);
                        for (i, gr) in gs.chunks_mut(vocab).enumerate() {
                            if want_scale {
                                // dscale += g ⊙ y, before g is rescaled.
                                let at = bi * block + i * vocab;
                                ds.iter_mut().zip(gr.iter()).zip(&y[at..at + vocab]).for_each(|((d, g), y)| *d += g * y);
                            }
                            if has_scale {
                                gr.iter_mut().zip(l).for_each(|(g, l)| *g *= l);
                            }
                            if want_shift {
                                add(&mut db, gr);
                            }
                        }
                        (ds, db)
                    })
                    .collect();
                for (ds, db) in parts {
                    add(&mut dscale[..ds.len()], &ds);
                    add(&mut dshift[..db.len()], &db);
                }
                Ok(())
            },
        )
    })?;
    let dev = Device::Cpu;
    let (dscale, dshift) = (Tensor::from_vec(dscale, vocab, &dev)?, Tensor::from_vec(dshift, vocab, &dev)?);
    affine_carry(loss_total(&losses)?, hs, Tensor::from_vec(dh, (n, d), &dev)?, affine, dscale, dshift)
}

/// A scalar zero (f32, or f64 for an f64 gradient) whose backward hands `t` the gradient `g`
/// (same shape), scaled by the incoming one: how a loss differentiated outside the graph
/// passes its gradients on.
pub fn carry_gradient(t: &Tensor, g: Tensor) -> CResult<Tensor> {
    if t.dims() != g.dims() {
        candle_core::bail!("carry-gradient: gradient {:?} for a tensor {:?}", g.dims(), t.dims());
    }
    t.apply_op1(CarryGradient(g))
}

/// A scalar zero whose backward hands its input the gradient it carries (scaled by the incoming
/// one): how a loss computed outside the graph gives a tensor its gradient without a
/// surrogate product over it.
struct CarryGradient(Tensor);

impl CustomOp1 for CarryGradient {
    fn name(&self) -> &'static str {
        "carry-gradient"
    }

    fn cpu_fwd(&self, _s: &CpuStorage, _l: &Layout) -> CResult<(CpuStorage, Shape)> {
        Ok((match self.0.dtype() {
            DType::F64 => CpuStorage::F64(vec![0.0]),
            _ => CpuStorage::F32(vec![0.0]),
        }, Shape::from(())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, _l: &Layout) -> CResult<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendDevice;
        let dtype = if self.0.dtype() == DType::F64 { DType::F64 } else { DType::F32 };
        Ok((s.device().zeros_impl(&Shape::from(()), dtype)?, Shape::from(())))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        profile::region("lm head + loss bwd", grad.device(), || {
            let g = self.0.broadcast_mul(&grad.to_dtype(self.0.dtype())?)?;
            Ok(Some(if g.dtype() == arg.dtype() { g } else { g.to_dtype(arg.dtype())? }))
        })
    }
}

/// One target per row of `hs`, each inside the vocabulary (the fused kernels index the logits
/// by them).
fn check_targets(hs: &Tensor, targets: &[u32], vocab: usize) -> CResult<()> {
    if targets.len() != hs.dim(0)? {
        candle_core::bail!("cross-entropy: {} targets for {} rows", targets.len(), hs.dim(0)?);
    }
    match targets.iter().find(|&&t| t as usize >= vocab) {
        Some(t) => candle_core::bail!("cross-entropy: target {t} outside the vocabulary of {vocab}"),
        None => Ok(()),
    }
}

/// Per-row cross-entropy of `logits` (n, vocab) against `targets`, from differentiable
/// primitives (computed in f32, or f64 for f64 input).
pub fn cross_entropy_rows(logits: &Tensor, targets: &[u32]) -> CResult<Tensor> {
    let logits = if logits.dtype() == DType::F64 { logits.clone() } else { logits.to_dtype(DType::F32)? };
    let tgt = Tensor::from_slice(targets, targets.len(), logits.device())?;
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let picked = shifted.gather(&tgt.unsqueeze(1)?, 1)?;
    (lse - picked)?.squeeze(1)
}

// ---------------------------------------------------------------------------------------------
// SwiGLU
// ---------------------------------------------------------------------------------------------

struct SwiGlu;

fn binary_slices<'a>(a: &'a CpuStorage, al: &Layout, b: &'a CpuStorage, bl: &Layout, op: &str) -> CResult<(&'a [f32], &'a [f32])> {
    let (x, y) = (contiguous_f32(a, al, op)?, contiguous_f32(b, bl, op)?);
    if x.len() != y.len() {
        candle_core::bail!("{op}: operands differ in size");
    }
    Ok((x, y))
}

impl candle_core::CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(&self, a: &CpuStorage, al: &Layout, b: &CpuStorage, bl: &Layout) -> CResult<(CpuStorage, Shape)> {
        let (g, u) = binary_slices(a, al, b, bl, "swiglu")?;
        let mut out = vec![0f32; g.len()];
        out.par_chunks_mut(4096).zip(g.par_chunks(4096).zip(u.par_chunks(4096))).for_each(|(o, (g, u))| {
            // exp(−g) first, eight at a time, then silu(g)·u over it.
            o.copy_from_slice(g);
            cpu_math::exp_shifted(o, -1.0, 0.0);
            for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                *o = g / (1.0 + *o) * u;
            }
        });
        Ok((CpuStorage::F32(out), al.shape().clone()))
    }

    fn bwd(&self, g: &Tensor, u: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        profile::region("swiglu bwd", g.device(), || {
            let (dg, du) = swiglu_grads_cpu(g, u, grad)?;
            Ok((Some(dg), Some(du)))
        })
    }
}

/// [`SwiGlu`]'s input gradients (dg, du): contiguous f32 operands on the CPU, read in place.
fn swiglu_grads_cpu(g: &Tensor, u: &Tensor, grad: &Tensor) -> CResult<(Tensor, Tensor)> {
    let grad = grad.contiguous()?;
    let n = g.elem_count();
    let mut dg = vec![0f32; n];
    let mut du = vec![0f32; n];
    cpu_f32s([g, u, &grad], |[gd, ud, dd]| {
        if gd.len() != n || ud.len() != n || dd.len() != n {
            candle_core::bail!("swiglu: operands and gradient differ in size");
        }
        dg.par_chunks_mut(4096).zip(du.par_chunks_mut(4096)).enumerate().for_each(|(c, (dg, du))| {
            let base = c * 4096;
            // exp(−x) into dg first, eight at a time.
            dg.copy_from_slice(&gd[base..base + dg.len()]);
            cpu_math::exp_shifted(dg, -1.0, 0.0);
            for i in 0..dg.len() {
                let (x, y, d) = (gd[base + i], ud[base + i], dd[base + i]);
                let s = 1.0 / (1.0 + dg[i]);
                du[i] = d * x * s;
                dg[i] = d * y * s * (1.0 + x * (1.0 - s));
            }
        });
        Ok(())
    })?;
    let dev = g.device();
    Ok((Tensor::from_vec(dg, g.shape(), dev)?, Tensor::from_vec(du, u.shape(), dev)?))
}

/// `silu(gate) · up`, the SwiGLU activation, with a fused CPU kernel and analytic backward.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> CResult<Tensor> {
    profile::region("swiglu fwd", gate.device(), || {
        // 16-bit on the CPU: the kernel's twin (one pass each way in f32) beats candle's
        // composed SiLU and product in bf16.
        let half_cpu = gate.device().is_cpu() && matches!(gate.dtype(), DType::BF16 | DType::F16);
        if (fused::active(gate) || half_cpu) && up.dtype() == gate.dtype() {
            fused::swiglu(gate, up)
        } else if use_fused(gate) && up.dtype() == DType::F32 {
            gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
        } else {
            swiglu_composed(gate, up)
        }
    })
}

/// SwiGLU from differentiable primitives (reference and non-CPU path).
pub fn swiglu_composed(gate: &Tensor, up: &Tensor) -> CResult<Tensor> {
    gate.silu()? * up
}

/// `silu(g)·u` as a value (no graph): what a projection op that takes SwiGLU's product as
/// its input multiplies ([`frozen_linear_swiglu_residual`], [`lora_linear_swiglu`]), by the
/// kernel [`swiglu`] picks, so the backward's copy is the forward's bit for bit.
fn swiglu_value(g: &Tensor, u: &Tensor) -> CResult<Tensor> {
    swiglu(&g.detach(), &u.detach())
}

/// SwiGLU's input gradients (dg, du) from g, u and the product's gradient `d`, by the
/// backward of the kernel [`swiglu`] picks (no graph).
fn swiglu_grads(g: &Tensor, u: &Tensor, d: &Tensor) -> CResult<(Tensor, Tensor)> {
    profile::region("swiglu bwd", g.device(), || {
        let (g, u, d) = (g.detach(), u.detach(), d.detach());
        let half_cpu = g.device().is_cpu() && matches!(g.dtype(), DType::BF16 | DType::F16);
        if (fused::active(&g) || half_cpu) && u.dtype() == g.dtype() {
            fused::swiglu_grads(&g, &u, &d)
        } else if use_fused(&g) && u.dtype() == DType::F32 {
            swiglu_grads_cpu(&g.contiguous()?, &u.contiguous()?, &d)
        } else {
            // silu'(g) = s·(1 + g·(1 − s)), s = sigmoid(g).
            let s = (g.neg()?.exp()? + 1.0)?.recip()?;
            let du = ((&d * &g)? * &s)?;
            let dg = (((&d * &u)? * &s)? * ((&g * (1.0 - &s)?)? + 1.0)?)?;
            Ok((dg, du))
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Per-channel scale and shift (IA3's vectors, BitFit's biases)
// ---------------------------------------------------------------------------------------------

/// What a [`ChannelOp`] does with its vector `v` (one value per channel, the last dim of x).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Channel {
    /// `x ⊙ v` (IA3).
    Scale,
    /// `x + v` (BitFit's trained bias).
    Shift,
}

/// `x ⊙ v` or `x + v` with `v` broadcast over every row of `x`, on contiguous f32 CPU tensors.
/// Composed, the broadcast's backward multiplies into a full-size temporary and then sums it
/// over the leading dims with strided reductions; here the vector's gradient is one parallel
/// pass over row blocks (a partial sum per block, then added up in block order, so the result
/// does not depend on the threads), and for a scale the input's gradient another.
struct ChannelOp(Channel);

/// Rows per block of the vector gradient's partial sums.
const CHANNEL_ROWS: usize = 64;

impl candle_core::CustomOp2 for ChannelOp {
    fn name(&self) -> &'static str {
        match self.0 {
            Channel::Scale => "channel-scale",
            Channel::Shift => "channel-shift",
        }
    }

    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout, v: &CpuStorage, vl: &Layout) -> CResult<(CpuStorage, Shape)> {
        let op = self.name();
        let (x, v) = (contiguous_f32(x, xl, op)?, contiguous_f32(v, vl, op)?);
        let n = v.len();
        if n == 0 || x.len() % n != 0 || xl.dims().last() != Some(&n) {
            candle_core::bail!("{op}: input {:?} does not end in the vector's {n} channels", xl.dims());
        }
        Ok((CpuStorage::F32(channel_rows(x, v, self.0)), xl.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, v: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        profile::region("adapter bwd", grad.device(), || {
            let grad = grad.contiguous()?;
            let n = v.elem_count();
            let mode = self.0;
            // The vector's gradient: Σ over rows of grad ⊙ x (scale) or of grad (shift).
            let dv = cpu_f32s([x, &grad], |[xd, gd]| {
                if xd.len() != gd.len() || gd.len() % n != 0 {
                    candle_core::bail!("{}: input and gradient differ in size", self.name());
                }
                Ok(channel_sums(gd, xd, n, mode))
            })?;
            let dv = Tensor::from_vec(dv, v.shape(), v.device())?;
            let dx = match mode {
                // The input's gradient: grad ⊙ v, the forward's scaling applied to grad.
                Channel::Scale => Tensor::from_vec(cpu_f32s([&grad, v], |[gd, vd]| Ok(channel_rows(gd, vd, Channel::Scale)))?, x.shape(), x.device())?,
                // A shift hands the gradient through unchanged.
                Channel::Shift => grad,
            };
            Ok((Some(dx), Some(dv)))
        })
    }
}

/// A channel vector's gradient over rows of `n`: Σ_rows `g ⊙ x` (scale) or Σ_rows `g` (shift),
/// in parallel over row blocks and summed in block order, not as threads finish (the same bits
/// every run).
fn channel_sums(g: &[f32], x: &[f32], n: usize, mode: Channel) -> Vec<f32> {
    g.par_chunks(n * CHANNEL_ROWS)
        .zip(x.par_chunks(n * CHANNEL_ROWS))
        .map(|(gs, xs)| {
            let mut acc = vec![0f32; n];
            for (gr, xr) in gs.chunks(n).zip(xs.chunks(n)) {
                match mode {
                    Channel::Scale => acc.iter_mut().zip(gr.iter().zip(xr)).for_each(|(a, (g, x))| *a += g * x),
                    Channel::Shift => acc.iter_mut().zip(gr).for_each(|(a, g)| *a += g),
                }
            }
            acc
        })
        .collect::<Vec<_>>()
        .into_iter()
        .fold(vec![0f32; n], |mut a, b| {
            a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
            a
        })
}

/// Every row of `x` (rows of `v.len()`) scaled by or shifted by `v`, in parallel over row
/// blocks.
fn channel_rows(x: &[f32], v: &[f32], mode: Channel) -> Vec<f32> {
    let n = v.len();
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(n * CHANNEL_ROWS).zip(x.par_chunks(n * CHANNEL_ROWS)).for_each(|(o, xs)| {
        for (o, xr) in o.chunks_mut(n).zip(xs.chunks(n)) {
            match mode {
                Channel::Scale => o.iter_mut().zip(xr.iter().zip(v)).for_each(|(o, (a, b))| *o = a * b),
                Channel::Shift => o.iter_mut().zip(xr.iter().zip(v)).for_each(|(o, (a, b))| *o = a + b),
            }
        }
    });
    out
}

/// The channel op where it has a kernel (f32 on the CPU, `x` of any rank whose last dim is the
/// vector's length), else `composed`.
fn channel_op(x: &Tensor, v: &Tensor, mode: Channel, composed: impl FnOnce(&Tensor, &Tensor) -> CResult<Tensor>) -> CResult<Tensor> {
    let fits = x.dims().last() == Some(&v.elem_count());
    if fits && use_fused(x) && v.device().is_cpu() && v.dtype() == DType::F32 {
        x.contiguous()?.apply_op2(&v.flatten_all()?.contiguous()?, ChannelOp(mode))
    } else {
        composed(x, v)
    }
}

/// `x ⊙ v`, `v` a vector over the last dim of `x` (IA3's learned scaling), with a CPU kernel
/// whose backward makes the vector's gradient in one pass; elsewhere a broadcast multiply.
pub fn channel_scale(x: &Tensor, v: &Tensor) -> CResult<Tensor> {
    channel_op(x, v, Channel::Scale, channel_scale_composed)
}

/// [`channel_scale`] from differentiable primitives (reference and non-CPU path).
pub fn channel_scale_composed(x: &Tensor, v: &Tensor) -> CResult<Tensor> {
    x.broadcast_mul(&v.flatten_all()?)
}

/// `x + v`, `v` a vector over the last dim of `x` (BitFit's trained bias), with a CPU kernel as
/// [`channel_scale`]'s; elsewhere a broadcast add.
pub fn channel_shift(x: &Tensor, v: &Tensor) -> CResult<Tensor> {
    channel_op(x, v, Channel::Shift, channel_shift_composed)
}

/// [`channel_shift`] from differentiable primitives (reference and non-CPU path).
pub fn channel_shift_composed(x: &Tensor, v: &Tensor) -> CResult<Tensor> {
    x.broadcast_add(&v.flatten_all()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hook holding a strided view (an offset into its storage, transposed) hands back
    /// exactly the view's elements, and its backward is what it was given.
    #[test]
    fn a_hook_hands_back_the_view_it_holds() {
        let base = Tensor::arange(0f32, 12.0, &Device::Cpu).unwrap().reshape((3, 4)).unwrap();
        let out = base.narrow(0, 1, 2).unwrap().t().unwrap();
        let x = candle_core::Var::zeros((4, 2), DType::F32, &Device::Cpu).unwrap();
        let y = with_input_grad(x.as_tensor(), out.clone(), "test", Arc::new(|_, g| g * 3.0)).unwrap();
        assert_eq!(y.to_vec2::<f32>().unwrap(), out.to_vec2::<f32>().unwrap());
        assert_eq!(y.to_vec2::<f32>().unwrap()[0], vec![4.0, 8.0]);
        let g = y.sum_all().unwrap().backward().unwrap();
        assert_eq!(g.get(x.as_tensor()).unwrap().to_vec2::<f32>().unwrap(), vec![vec![3.0f32; 2]; 4]);
    }
}
