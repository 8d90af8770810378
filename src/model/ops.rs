//! Training ops with a backward pass.
//!
//! candle's fused `rms_norm`, `rope` and `softmax_last_dim` record no backward, and its matmul
//! backward always computes the gradient of both operands. These ops fix both:
//! * [`frozen_linear`]: `x · Wᵀ` whose backward returns only `dX = dY · W` (no gradient for a
//!   frozen weight, no wasted matmul);
//! * [`rms_norm`], [`rope`], [`causal_softmax`]: fused f32 CPU kernels (rayon over rows) with
//!   analytic backward, and a composed differentiable fallback for other devices/dtypes.
//!   The composed versions are also the reference the tests hold the fused ones to.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Storage, Tensor, D};
use rayon::prelude::*;

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

struct FrozenMatmul {
    /// (out, in), contiguous.
    w: Tensor,
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let (m, k) = l.shape().dims2()?;
        let (n, kw) = self.w.dims2()?;
        if k != kw {
            candle_core::bail!("frozen-matmul: input width {k} != weight width {kw}");
        }
        let (ws, wl) = self.w.storage_and_layout();
        let Storage::Cpu(w) = &*ws else { candle_core::bail!("frozen-matmul: weight not on cpu") };
        let wt = wl.transpose(0, 1)?;
        let out = s.matmul(w, (1, m, n, k), l, &wt)?;
        Ok((out, Shape::from((m, n))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> CResult<(candle_core::CudaStorage, Shape)> {
        let (m, k) = l.shape().dims2()?;
        let (n, _) = self.w.dims2()?;
        let (ws, wl) = self.w.storage_and_layout();
        let Storage::Cuda(w) = &*ws else { candle_core::bail!("frozen-matmul: weight not on cuda") };
        let wt = wl.transpose(0, 1)?;
        let out = s.matmul(w, (1, m, n, k), l, &wt)?;
        Ok((out, Shape::from((m, n))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        Ok(Some(grad.matmul(&self.w)?))
    }
}

/// `xs · wᵀ` for a frozen `w` of shape (out, in): the backward gives `xs` its gradient and
/// computes nothing for `w`. `xs` may have any number of leading dims.
pub fn frozen_linear(xs: &Tensor, w: &Tensor) -> CResult<Tensor> {
    let dims = xs.dims().to_vec();
    let k = *dims.last().unwrap_or(&0);
    let m: usize = dims[..dims.len().saturating_sub(1)].iter().product();
    let x2 = xs.reshape((m, k))?.contiguous()?;
    let out = if xs.track_op() {
        x2.apply_op1(FrozenMatmul { w: w.clone() })?
    } else {
        x2.matmul(&w.t()?)?
    };
    let mut out_dims = dims;
    if let Some(last) = out_dims.last_mut() {
        *last = w.dim(0)?;
    }
    out.reshape(out_dims)
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
        Ok(Some(arg.apply_op1_no_bwd(&RmsNormGrad { w: self.w.clone(), eps: self.eps, grad: grad.contiguous()? })?))
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

/// RMSNorm over the last dim with a frozen weight, differentiable in `xs`.
pub fn rms_norm(xs: &Tensor, w: &Tensor, eps: f64) -> CResult<Tensor> {
    if use_fused(xs) {
        xs.contiguous()?.apply_op1(RmsNorm { w: w.clone(), eps: eps as f32 })
    } else {
        rms_norm_composed(xs, w, eps)
    }
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
                let c = &cos[p * half..(p + 1) * half];
                let sn = &sin[p * half..(p + 1) * half];
                for i in 0..half {
                    let (x1, x2) = (xr[i], xr[i + half]);
                    let s = sign * sn[i];
                    or[i] = x1 * c[i] - x2 * s;
                    or[i + half] = x2 * c[i] + x1 * s;
                }
            }
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        let inv = Rope { cos: self.cos.clone(), sin: self.sin.clone(), inverse: !self.inverse };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&inv)?))
    }
}

/// Rotary position embedding, HF's rotate-half convention. `xs`: (b, heads, seq, d);
/// `cos`, `sin`: (seq, d/2).
pub fn rope(xs: &Tensor, cos: &Tensor, sin: &Tensor) -> CResult<Tensor> {
    if use_fused(xs) {
        xs.contiguous()?.apply_op1(Rope { cos: cos.clone(), sin: sin.clone(), inverse: false })
    } else {
        rope_composed(xs, cos, sin)
    }
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
    if use_fused(xs) {
        xs.contiguous()?.apply_op1(CausalSoftmax { q_len, scale: scale as f32 })
    } else {
        causal_softmax_composed(xs, q_len, scale)
    }
}

/// Causal softmax from differentiable primitives (reference and non-CPU path).
pub fn causal_softmax_composed(xs: &Tensor, q_len: usize, scale: f64) -> CResult<Tensor> {
    let dims = xs.dims();
    let k_len = dims[dims.len() - 1];
    let rows = dims[dims.len() - 2];
    let offset = k_len - q_len;
    let mask: Vec<f32> = (0..rows)
        .flat_map(|r| (0..k_len).map(move |c| if c <= (r % q_len) + offset { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    let mask = Tensor::from_vec(mask, (rows, k_len), xs.device())?.to_dtype(xs.dtype())?;
    let x = (xs * scale)?.broadcast_add(&mask)?;
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Mean cross-entropy of `logits` (n, vocab) against `targets` (n, u32) over the rows whose
/// target is not `ignore` (given as `mask`, f32 0/1 of shape (n,)), differentiable in logits.
/// Returns (sum of losses over counted rows, as a scalar tensor).
pub fn masked_nll_sum(logits: &Tensor, targets: &Tensor, mask: &Tensor) -> CResult<Tensor> {
    let logits = if logits.dtype() == DType::F64 { logits.clone() } else { logits.to_dtype(DType::F32)? };
    let mask = mask.to_dtype(logits.dtype())?;
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let picked = shifted.gather(&targets.unsqueeze(1)?, 1)?;
    let nll = (lse - picked)?.squeeze(1)?;
    (nll * &mask)?.sum_all()
}
