//! Fused training kernels for NVIDIA GPUs, and their CPU twins.
//!
//! `kernels/fused.cu` (compiled to PTX by `build.rs` under the `cuda` feature) holds one kernel
//! per op below; each reads its operands in their dtype (f32, bf16, f16), computes in f32 and
//! rounds its result once. On a GPU each replaces a chain of candle ops, every one a kernel
//! launch and a pass over memory (and for the causal softmax, a mask built on the host and
//! copied for every block of every layer):
//! * [`swiglu`]: `silu(g)·u` forward and both input gradients, one pass each; the graph keeps
//!   only `g` and `u`;
//! * [`rms_norm_input_grad`]: RMSNorm's input gradient in one row pass;
//! * [`causal_softmax`]: the graph-free causal softmax the blocked attention runs, its mask
//!   taken from the row index;
//! * [`cross_entropy`], [`cross_entropy_loss`]: one chunk of logits to its rows' losses (and
//!   `softmax − onehot` in the logits' dtype);
//! * [`attention_ds`]: the blocked attention backward's `dS = scale·P∘(dP − rowsum(dO∘O))`;
//! * [`dropout`]: inverted dropout whose mask the kernel draws from the seed and the element's
//!   index — [`dropout_mask`]'s stream, bit for bit — so no mask is copied from the host or kept
//!   for the backward;
//! * [`split_heads`]: a projection's (b, s, heads·hd) output to per-head blocks in the layout
//!   attention reads, rotated by RoPE, in one pass (and back in the backward): one graph node
//!   where a reshape, a transpose, a copy, RoPE and a reshape were five, each a zero-filled
//!   gradient and an add in candle's backward; on the CPU it is the f32 training path's op too;
//! * [`adamw_step`]: one AdamW update of an f32 variable in two launches, and
//!   [`adamw_step_in_place`] in three that overwrite the variable and its moments;
//! * [`dequantize`]: a frozen weight held as quantized blocks (QLoRA's base: Q4_0, Q4_1, Q8_0,
//!   Q4_K) to the activations' dtype in one pass, where candle dequantizes to f32 and casts;
//! * [`flash_forward`], [`flash_backward`]: causal attention in f16/bf16 (head_dim 64 or 128) on
//!   the tensor cores, one launch forward and two backward, the scores of one tile at a time in
//!   shared memory ([`flash_applies`]; the blocked attention of [`super::ops`] made each query
//!   block's copies, scores and softmax as tensors, ~20 launches per block backward).
//!
//! Every op but flash attention has a CPU twin in Rust doing the same arithmetic (f32, one
//! rounding); flash attention's scheme runs on the CPU as [`super::attention_cpu`]. The ops in
//! [`super::ops`] take these kernels on CUDA devices ([`active`]; `TUNEBENCH_FUSED_KERNELS=0`
//! turns them off, for comparison), and anywhere inside [`forced`], which is how the op checks
//! (`model::opcheck`, `tests/gradients.rs`) run the twins and the ops' wiring on the CPU against
//! the composed f64 reference; `tunebench check-ops --device cuda:0` checks the kernels.

use std::cell::Cell;
use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use half::{bf16, f16};
use super::profile;

type CResult<T> = candle_core::Result<T>;

thread_local! {
    static FORCED: Cell<bool> = const { Cell::new(false) };
}

/// True when the training ops should take the fused kernels for `t`: an f32, bf16 or f16
/// tensor on a CUDA device (unless `TUNEBENCH_FUSED_KERNELS=0`), or on any device inside
/// [`forced`].
pub fn active(t: &Tensor) -> bool {
    matches!(t.dtype(), DType::F32 | DType::BF16 | DType::F16) && (is_forced() || (t.device().is_cuda() && enabled_by_env()))
}

/// True inside [`forced`] on this thread.
pub fn is_forced() -> bool {
    FORCED.with(Cell::get)
}

/// False when `TUNEBENCH_FUSED_KERNELS=0` asks for the training ops' tensor-op paths (to
/// compare against them).
pub(crate) fn enabled_by_env() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("TUNEBENCH_FUSED_KERNELS").map(|v| v.trim() != "0").unwrap_or(true))
}

/// Runs `f` (forward and backward) with the training ops taking the fused kernels on every
/// device, on this thread: on the CPU, their twins.
pub fn forced<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            FORCED.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(FORCED.with(|c| c.replace(true)));
    f()
}

// ---------------------------------------------------------------------------------------------
// CPU twins' plumbing
// ---------------------------------------------------------------------------------------------

/// A contiguous f32/bf16/f16 operand as f32 values (converted in parallel: the CPU's 16-bit
/// training ops widen whole activations with it).
pub(crate) fn cpu_values(s: &CpuStorage, l: &Layout, op: &str) -> CResult<Vec<f32>> {
    use rayon::prelude::*;
    let Some((a, b)) = l.contiguous_offsets() else { candle_core::bail!("{op}: operand must be contiguous") };
    Ok(match s {
        CpuStorage::F32(v) => v[a..b].to_vec(),
        CpuStorage::BF16(v) => v[a..b].par_iter().with_min_len(4096).map(|x| x.to_f32()).collect(),
        CpuStorage::F16(v) => v[a..b].par_iter().with_min_len(4096).map(|x| x.to_f32()).collect(),
        other => candle_core::bail!("{op}: f32, bf16 or f16 operand expected, got {:?}", other.dtype()),
    })
}

/// f32 results rounded once to `dtype` (in parallel).
pub(crate) fn cpu_store(v: Vec<f32>, dtype: DType, op: &str) -> CResult<CpuStorage> {
    use rayon::prelude::*;
    Ok(match dtype {
        DType::F32 => CpuStorage::F32(v),
        DType::BF16 => CpuStorage::BF16(v.par_iter().with_min_len(4096).map(|&x| bf16::from_f32(x)).collect()),
        DType::F16 => CpuStorage::F16(v.par_iter().with_min_len(4096).map(|&x| f16::from_f32(x)).collect()),
        other => candle_core::bail!("{op}: f32, bf16 or f16 expected, got {other:?}"),
    })
}

fn cpu_targets<'a>(s: &'a CpuStorage, l: &Layout, vocab: usize, op: &str) -> CResult<&'a [u32]> {
    let Some((a, b)) = l.contiguous_offsets() else { candle_core::bail!("{op}: targets must be contiguous") };
    let t = &s.as_slice::<u32>()?[a..b];
    if let Some(bad) = t.iter().find(|&&t| t as usize >= vocab) {
        candle_core::bail!("{op}: target {bad} outside the vocabulary of {vocab}");
    }
    Ok(t)
}

/// (rows, row length) of a layout whose last dim is the row.
fn rows_of(l: &Layout) -> (usize, usize) {
    let n = l.shape().dims().last().copied().unwrap_or(1);
    (l.shape().elem_count() / n.max(1), n)
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

// ---------------------------------------------------------------------------------------------
// CUDA plumbing
// ---------------------------------------------------------------------------------------------

#[cfg(feature = "cuda")]
mod gpu {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{CudaView, CudaViewMut, DeviceRepr, LaunchConfig};
    use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage};
    use candle_core::{DType, Layout, WithDType};

    use super::CResult;

    /// An element type the kernels take (f32, bf16, f16).
    pub trait Elem: CudaDType + DeviceRepr + WithDType {}
    impl<T: CudaDType + DeviceRepr + WithDType> Elem for T {}

    /// The kernels, compiled by build.rs.
    pub const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fused.ptx"));
    pub const MODULE: &str = "tunebench_fused";

    /// A kernel's name for `dtype` (`tb_<name>_<f32|bf16|f16>`).
    pub fn kernel(name: &str, dtype: DType) -> CResult<String> {
        let suffix = match dtype {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            other => candle_core::bail!("fused {name}: f32, bf16 or f16 expected, got {other:?}"),
        };
        Ok(format!("tb_{name}_{suffix}"))
    }

    /// The contiguous elements of an operand.
    pub fn view<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout, op: &str) -> CResult<CudaView<'a, T>> {
        let Some((a, b)) = l.contiguous_offsets() else { candle_core::bail!("{op}: operand must be contiguous") };
        Ok(s.as_cuda_slice::<T>()?.slice(a..b))
    }

    /// The contiguous elements of an operand, to write (the in-place AdamW launches).
    pub fn view_mut<'a, T: CudaDType>(s: &'a mut CudaStorage, l: &Layout, op: &str) -> CResult<CudaViewMut<'a, T>> {
        let Some((a, b)) = l.contiguous_offsets() else { candle_core::bail!("{op}: operand must be contiguous") };
        Ok(s.as_cuda_slice_mut::<T>()?.slice_mut(a..b))
    }

    /// A grid-stride launch over `n` elements.
    pub fn elementwise(n: usize) -> LaunchConfig {
        LaunchConfig { grid_dim: (n.div_ceil(256).clamp(1, 1 << 16) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
    }

    /// One block of `threads` (a multiple of 32) per row.
    pub fn per_row(rows: usize, threads: u32) -> LaunchConfig {
        LaunchConfig { grid_dim: (rows.max(1) as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
    }

    /// Fresh device memory for `n` values, every one of which the kernel writes.
    pub fn output<T: DeviceRepr>(dev: &CudaDevice, n: usize) -> CResult<candle_core::cuda_backend::cudarc::driver::CudaSlice<T>> {
        // SAFETY: the kernels this is for write all `n` elements before anything reads them.
        unsafe { dev.alloc::<T>(n) }
    }

    pub fn device(s: &CudaStorage) -> CudaDevice {
        s.device().clone()
    }
}

/// Launches kernel `$name` for `$dtype` on `$dev` with `$cfg` and the argument references.
#[cfg(feature = "cuda")]
macro_rules! launch {
    ($dev:expr, $name:expr, $dtype:expr, $cfg:expr, $($arg:expr),+ $(,)?) => {{
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        use candle_core::cuda_backend::WrapErr;
        let func = $dev.get_or_load_custom_func(&gpu::kernel($name, $dtype)?, gpu::MODULE, gpu::PTX)?;
        let mut builder = func.builder();
        $( builder.arg($arg); )+
        // SAFETY: the arguments match the kernel's signature in kernels/fused.cu (device
        // pointers of the dtype, then sizes as size_t/int and scales as float), and every
        // pointer covers the elements the launch reads or writes.
        unsafe { builder.launch($cfg) }.w()?;
    }};
}

/// Calls the generic `$f::<T>` for the element type of `$dtype`.
#[cfg(feature = "cuda")]
macro_rules! by_dtype {
    ($dtype:expr, $f:ident ( $($a:expr),* )) => {
        match $dtype {
            DType::F32 => $f::<f32>($($a),*),
            DType::BF16 => $f::<bf16>($($a),*),
            DType::F16 => $f::<f16>($($a),*),
            other => candle_core::bail!("fused kernels: f32, bf16 or f16 expected, got {other:?}"),
        }
    };
}

/// Calls the generic `$f::<T>` for a 16-bit `$dtype` (the flash kernels' element types).
#[cfg(all(feature = "cuda", tb_flash))]
macro_rules! by_dtype16 {
    ($dtype:expr, $f:ident ( $($a:expr),* )) => {
        match $dtype {
            DType::BF16 => $f::<bf16>($($a),*),
            DType::F16 => $f::<f16>($($a),*),
            other => candle_core::bail!("flash-attention: f16 or bf16 expected, got {other:?}"),
        }
    };
}

/// A custom op's `cuda_fwd` (one, two or three operands): `$run::<T>(self, operands…)` for the
/// first operand's element type; the output's shape is `$shape(first operand's layout)`.
macro_rules! cuda_fwd1 {
    ($run:ident, $shape:ident) => {
        #[cfg(feature = "cuda")]
        fn cuda_fwd(&self, a: &candle_core::CudaStorage, al: &Layout) -> CResult<(candle_core::CudaStorage, Shape)> {
            Ok((by_dtype!(a.dtype(), $run(self, a, al))?, $shape(al)))
        }
    };
}

macro_rules! cuda_fwd2 {
    ($run:ident, $shape:ident) => {
        #[cfg(feature = "cuda")]
        fn cuda_fwd(&self, a: &candle_core::CudaStorage, al: &Layout, b: &candle_core::CudaStorage, bl: &Layout) -> CResult<(candle_core::CudaStorage, Shape)> {
            Ok((by_dtype!(a.dtype(), $run(self, a, al, b, bl))?, $shape(al)))
        }
    };
}

macro_rules! cuda_fwd3 {
    ($run:ident, $shape:ident) => {
        #[cfg(feature = "cuda")]
        fn cuda_fwd(
            &self,
            a: &candle_core::CudaStorage,
            al: &Layout,
            b: &candle_core::CudaStorage,
            bl: &Layout,
            c: &candle_core::CudaStorage,
            cl: &Layout,
        ) -> CResult<(candle_core::CudaStorage, Shape)> {
            Ok((by_dtype!(a.dtype(), $run(self, a, al, b, bl, c, cl))?, $shape(al)))
        }
    };
}

#[cfg(feature = "cuda")]
fn same_shape(l: &Layout) -> Shape {
    l.shape().clone()
}

#[cfg(feature = "cuda")]
fn twice_the_elements(l: &Layout) -> Shape {
    Shape::from(2 * l.shape().elem_count())
}

#[cfg(feature = "cuda")]
fn two_per_row(l: &Layout) -> Shape {
    Shape::from((rows_of(l).0, 2))
}

// ---------------------------------------------------------------------------------------------
// SwiGLU
// ---------------------------------------------------------------------------------------------

struct Swiglu;

impl candle_core::CustomOp2 for Swiglu {
    fn name(&self) -> &'static str {
        "fused-swiglu"
    }

    fn cpu_fwd(&self, a: &CpuStorage, al: &Layout, b: &CpuStorage, bl: &Layout) -> CResult<(CpuStorage, Shape)> {
        let (g, u) = (cpu_values(a, al, "fused-swiglu")?, cpu_values(b, bl, "fused-swiglu")?);
        let out = g.iter().zip(&u).map(|(&x, &y)| x * sigmoid(x) * y).collect();
        Ok((cpu_store(out, a.dtype(), "fused-swiglu")?, al.shape().clone()))
    }

    cuda_fwd2!(swiglu_cuda, same_shape);

    fn bwd(&self, g: &Tensor, u: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        profile::region("swiglu bwd", g.device(), || {
            let (dg, du) = swiglu_grads(g, u, grad)?;
            Ok((Some(dg), Some(du)))
        })
    }
}

/// SwiGLU's input gradients (dg, du) from the operands and the output's gradient `grad`, by
/// the fused kernel (no graph).
pub(crate) fn swiglu_grads(g: &Tensor, u: &Tensor, grad: &Tensor) -> CResult<(Tensor, Tensor)> {
    let n = g.elem_count();
    let both = g.contiguous()?.apply_op3_no_bwd(&u.contiguous()?, &grad.contiguous()?, &SwigluGrad)?;
    Ok((both.narrow(0, 0, n)?.reshape(g.shape())?, both.narrow(0, n, n)?.reshape(u.shape())?))
}

/// SwiGLU's input gradients from (g, u, dOut): (2·n,) holding dg, then du.
struct SwigluGrad;

impl candle_core::CustomOp3 for SwigluGrad {
    fn name(&self) -> &'static str {
        "fused-swiglu-grad"
    }

    fn cpu_fwd(&self, a: &CpuStorage, al: &Layout, b: &CpuStorage, bl: &Layout, c: &CpuStorage, cl: &Layout) -> CResult<(CpuStorage, Shape)> {
        let op = "fused-swiglu-grad";
        let (g, u, d) = (cpu_values(a, al, op)?, cpu_values(b, bl, op)?, cpu_values(c, cl, op)?);
        let n = g.len();
        let mut out = vec![0f32; 2 * n];
        for i in 0..n {
            let (x, y, dy) = (g[i], u[i], d[i]);
            let s = sigmoid(x);
            out[i] = dy * y * s * (1.0 + x * (1.0 - s));
            out[n + i] = dy * x * s;
        }
        Ok((cpu_store(out, a.dtype(), op)?, Shape::from(2 * n)))
    }

    cuda_fwd3!(swiglu_grad_cuda, twice_the_elements);
}

/// `silu(gate)·up` by the fused kernel, differentiable in both (the graph keeps only the two
/// operands).
pub fn swiglu(gate: &Tensor, up: &Tensor) -> CResult<Tensor> {
    if gate.shape() != up.shape() || gate.dtype() != up.dtype() {
        candle_core::bail!("fused-swiglu: gate {:?} {:?} and up {:?} {:?} differ", gate.dims(), gate.dtype(), up.dims(), up.dtype());
    }
    gate.contiguous()?.apply_op2(&up.contiguous()?, Swiglu)
}

// ---------------------------------------------------------------------------------------------
// RMSNorm's input gradient
// ---------------------------------------------------------------------------------------------

struct RmsNormGrad {
    eps: f32,
}

impl candle_core::CustomOp3 for RmsNormGrad {
    fn name(&self) -> &'static str {
        "fused-rms-norm-grad"
    }

    fn cpu_fwd(&self, a: &CpuStorage, al: &Layout, b: &CpuStorage, bl: &Layout, c: &CpuStorage, cl: &Layout) -> CResult<(CpuStorage, Shape)> {
        let op = "fused-rms-norm-grad";
        let (x, g, w) = (cpu_values(a, al, op)?, cpu_values(b, bl, op)?, cpu_values(c, cl, op)?);
        let (_, n) = rows_of(al);
        let mut out = vec![0f32; x.len()];
        for ((o, xr), gr) in out.chunks_mut(n).zip(x.chunks(n)).zip(g.chunks(n)) {
            let ss: f32 = xr.iter().map(|v| v * v).sum();
            let dot: f32 = xr.iter().zip(gr).zip(&w).map(|((x, g), w)| x * g * w).sum();
            let r = 1.0 / (ss / n as f32 + self.eps).sqrt();
            let k = r * r * r * dot / n as f32;
            for (((o, &xv), &gv), &wv) in o.iter_mut().zip(xr).zip(gr).zip(&w) {
                *o = r * gv * wv - xv * k;
            }
        }
        Ok((cpu_store(out, a.dtype(), op)?, al.shape().clone()))
    }

    cuda_fwd3!(rms_norm_grad_cuda, same_shape);
}

/// RMSNorm's input gradient `r·(g∘w) − x·r³/n·Σ(g∘w∘x)` for input `x` (…, n), weight `w`
/// (n,) and output gradient `g`, in `x`'s dtype, by the fused kernel.
pub fn rms_norm_input_grad(x: &Tensor, w: &Tensor, eps: f64, g: &Tensor) -> CResult<Tensor> {
    if x.elem_count() == 0 {
        return x.zeros_like();
    }
    let n = x.dim(candle_core::D::Minus1)?;
    if w.dims() != [n] || g.shape() != x.shape() {
        candle_core::bail!("fused-rms-norm-grad: input {:?}, weight {:?}, gradient {:?}", x.dims(), w.dims(), g.dims());
    }
    let w = w.to_dtype(x.dtype())?.contiguous()?;
    let g = g.to_dtype(x.dtype())?.contiguous()?;
    x.contiguous()?.apply_op3_no_bwd(&g, &w, &RmsNormGrad { eps: eps as f32 })
}

// ---------------------------------------------------------------------------------------------
// Causal softmax (no graph)
// ---------------------------------------------------------------------------------------------

struct CausalSoftmax {
    q_len: usize,
    scale: f32,
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "fused-causal-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let op = "fused-causal-softmax";
        let x = cpu_values(s, l, op)?;
        let (_, k_len) = rows_of(l);
        let offset = k_len - self.q_len;
        let mut out = vec![0f32; x.len()];
        for (r, (o, xr)) in out.chunks_mut(k_len).zip(x.chunks(k_len)).enumerate() {
            let visible = r % self.q_len + offset + 1;
            let m = xr[..visible].iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v * self.scale));
            let sum: f32 = xr[..visible].iter().map(|&v| (v * self.scale - m).exp()).sum();
            let inv = 1.0 / sum;
            for (o, &v) in o[..visible].iter_mut().zip(&xr[..visible]) {
                *o = (v * self.scale - m).exp() * inv;
            }
        }
        Ok((cpu_store(out, s.dtype(), op)?, l.shape().clone()))
    }

    cuda_fwd1!(causal_softmax_cuda, same_shape);
}

/// Softmax over the last dim of `scale·xs` (…, rows, k_len) where row r is query position
/// `r % q_len`, `k_len − q_len` keys ahead, and sees the keys up to its position; no graph
/// (the blocked attention's forward and its recomputing backward).
pub fn causal_softmax(xs: &Tensor, q_len: usize, scale: f64) -> CResult<Tensor> {
    let k_len = xs.dim(candle_core::D::Minus1)?;
    if q_len == 0 || k_len < q_len {
        candle_core::bail!("fused-causal-softmax: {q_len} positions over {k_len} keys");
    }
    if xs.elem_count() == 0 {
        return Ok(xs.clone());
    }
    xs.contiguous()?.apply_op1_no_bwd(&CausalSoftmax { q_len, scale: scale as f32 })
}

// ---------------------------------------------------------------------------------------------
// Cross-entropy of a chunk of logits
// ---------------------------------------------------------------------------------------------

/// Per row of logits (rows, vocab) and targets (rows,) u32: (rows, 2) f32 of the loss
/// `lse − logit[target]` and the log-sum-exp `lse`.
struct CeStats;

impl candle_core::CustomOp2 for CeStats {
    fn name(&self) -> &'static str {
        "fused-ce-stats"
    }

    fn cpu_fwd(&self, a: &CpuStorage, al: &Layout, b: &CpuStorage, bl: &Layout) -> CResult<(CpuStorage, Shape)> {
        let op = "fused-ce-stats";
        let logits = cpu_values(a, al, op)?;
        let (rows, vocab) = rows_of(al);
        let targets = cpu_targets(b, bl, vocab, op)?;
        let mut out = vec![0f32; 2 * rows];
        for ((o, lr), &t) in out.chunks_mut(2).zip(logits.chunks(vocab)).zip(targets) {
            let m = lr.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let ls = lr.iter().map(|&v| (v - m).exp()).sum::<f32>().ln();
            o[0] = ls - (lr[t as usize] - m);
            o[1] = m + ls;
        }
        Ok((CpuStorage::F32(out), Shape::from((rows, 2))))
    }

    cuda_fwd2!(ce_stats_cuda, two_per_row);
}

/// `softmax(logits) − onehot(target)` in the logits' dtype, from logits, targets and the
/// [`CeStats`].
struct CeGrad;

impl candle_core::CustomOp3 for CeGrad {
    fn name(&self) -> &'static str {
        "fused-ce-grad"
    }

    fn cpu_fwd(&self, a: &CpuStorage, al: &Layout, b: &CpuStorage, bl: &Layout, c: &CpuStorage, cl: &Layout) -> CResult<(CpuStorage, Shape)> {
        let op = "fused-ce-grad";
        let logits = cpu_values(a, al, op)?;
        let (_, vocab) = rows_of(al);
        let targets = cpu_targets(b, bl, vocab, op)?;
        let stats = cpu_values(c, cl, op)?;
        let mut out = vec![0f32; logits.len()];
        for (r, (o, lr)) in out.chunks_mut(vocab).zip(logits.chunks(vocab)).enumerate() {
            let lse = stats[2 * r + 1];
            for (o, &v) in o.iter_mut().zip(lr) {
                *o = (v - lse).exp();
            }
            o[targets[r] as usize] -= 1.0;
        }
        Ok((cpu_store(out, a.dtype(), op)?, al.shape().clone()))
    }

    cuda_fwd3!(ce_grad_cuda, same_shape);
}

/// The cross-entropy of each row of `logits` (rows, vocab) against `targets` (rows,) u32 on the
/// same device: the losses (rows,) in f32 and their gradient with respect to the logits,
/// `softmax − onehot`, in the logits' dtype. Nothing is kept for a backward.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> CResult<(Tensor, Tensor)> {
    let logits = nonempty_logits(logits, targets)?;
    let stats = logits.apply_op2_no_bwd(targets, &CeStats)?;
    let grad = logits.apply_op3_no_bwd(targets, &stats, &CeGrad)?;
    Ok((stats.narrow(1, 0, 1)?.squeeze(1)?, grad))
}

/// Logits (rows ≥ 1, vocab ≥ 1), contiguous, with one u32 target per row (the kernels run a
/// block per row and index the row by its target).
fn nonempty_logits(logits: &Tensor, targets: &Tensor) -> CResult<Tensor> {
    let (rows, vocab) = logits.dims2()?;
    if rows == 0 || vocab == 0 || targets.dims() != [rows] || targets.dtype() != DType::U32 {
        candle_core::bail!("fused cross-entropy: logits {:?} against targets {:?} {:?}", logits.dims(), targets.dims(), targets.dtype());
    }
    logits.contiguous()
}

/// [`cross_entropy`]'s losses alone (evaluation).
pub fn cross_entropy_loss(logits: &Tensor, targets: &Tensor) -> CResult<Tensor> {
    nonempty_logits(logits, targets)?.apply_op2_no_bwd(targets, &CeStats)?.narrow(1, 0, 1)?.squeeze(1)
}

// ---------------------------------------------------------------------------------------------
// Attention backward: dS
// ---------------------------------------------------------------------------------------------

struct AttentionDs {
    scale: f32,
}

impl candle_core::CustomOp3 for AttentionDs {
    fn name(&self) -> &'static str {
        "fused-attention-ds"
    }

    fn cpu_fwd(&self, a: &CpuStorage, al: &Layout, b: &CpuStorage, bl: &Layout, c: &CpuStorage, cl: &Layout) -> CResult<(CpuStorage, Shape)> {
        let op = "fused-attention-ds";
        let (p, dp, row) = (cpu_values(a, al, op)?, cpu_values(b, bl, op)?, cpu_values(c, cl, op)?);
        let (_, k_len) = rows_of(al);
        let out = p.iter().zip(&dp).enumerate().map(|(i, (&p, &d))| self.scale * p * (d - row[i / k_len])).collect();
        Ok((cpu_store(out, a.dtype(), op)?, al.shape().clone()))
    }

    cuda_fwd3!(attention_ds_cuda, same_shape);
}

/// `scale·p∘(dp − rowdot)` for probabilities `p` and their gradient `dp` (…, rows, keys) in
/// one dtype and `rowdot` (…, rows, 1) f32: the gradient of the scores of one attention
/// block, in `p`'s dtype.
pub fn attention_ds(p: &Tensor, dp: &Tensor, rowdot: &Tensor, scale: f64) -> CResult<Tensor> {
    let rows = p.elem_count() / p.dim(candle_core::D::Minus1)?.max(1);
    if p.shape() != dp.shape() || rowdot.elem_count() != rows {
        candle_core::bail!("fused-attention-ds: p {:?}, dp {:?}, rowdot {:?}", p.dims(), dp.dims(), rowdot.dims());
    }
    let rowdot = rowdot.to_dtype(DType::F32)?.contiguous()?;
    p.contiguous()?.apply_op3_no_bwd(&dp.to_dtype(p.dtype())?.contiguous()?, &rowdot, &AttentionDs { scale: scale as f32 })
}

// ---------------------------------------------------------------------------------------------
// Dropout
// ---------------------------------------------------------------------------------------------

/// Elements per stream of [`dropout_mask`]: element i is draw `i % 4096` of the splitmix64 stream
/// seeded with `seed ^ (i / 4096)·0xD1B54A32D192ED03`.
const DROPOUT_CHUNK: usize = 4096;

/// The keep threshold (`p·2⁶⁴`) and the kept elements' scale `1/(1 − p)` of dropout rate `p`.
fn dropout_params(p: f64) -> (u64, f32) {
    ((p * u64::MAX as f64) as u64, (1.0 / (1.0 - p)) as f32)
}

/// Inverted dropout's mask for `n` elements at rate `p`: `1/(1 − p)` where kept, 0 where dropped,
/// drawn from `seed` (splitmix64 streams of [`DROPOUT_CHUNK`] draws, in parallel). The kernel of
/// [`dropout`] draws the same mask.
pub fn dropout_mask(n: usize, p: f64, seed: u64) -> Vec<f32> {
    let mut mask = vec![1f32; n];
    dropout_in_place(&mut mask, p, seed);
    mask
}

/// Multiplies `xs` by [`dropout_mask`]`(xs.len(), p, seed)` in place, drawing the mask as it
/// goes (in parallel over the streams).
fn dropout_in_place(xs: &mut [f32], p: f64, seed: u64) {
    use rayon::prelude::*;
    let (threshold, scale) = dropout_params(p);
    xs.par_chunks_mut(DROPOUT_CHUNK).enumerate().for_each(|(ci, chunk)| {
        let mut state = seed ^ (ci as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
        for x in chunk.iter_mut() {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            *x *= if z >= threshold { scale } else { 0.0 };
        }
    });
}

struct Dropout {
    p: f64,
    seed: u64,
}

impl CustomOp1 for Dropout {
    fn name(&self) -> &'static str {
        "fused-dropout"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let mut x = cpu_values(s, l, "fused-dropout")?;
        dropout_in_place(&mut x, self.p, self.seed);
        Ok((cpu_store(x, s.dtype(), "fused-dropout")?, l.shape().clone()))
    }

    cuda_fwd1!(dropout_cuda, same_shape);

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        // The same mask on the gradient: drawn again from the seed, never stored.
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&Dropout { p: self.p, seed: self.seed })?))
    }
}

/// Inverted dropout of `xs` (any device) at rate `p` with [`dropout_mask`]`(n, p, seed)`'s
/// mask. For f32, bf16 and f16 the kernel or, on the CPU, its twin draws it, and the backward
/// draws it again, so nothing of the mask's size is kept; f64 (the finite-difference tests)
/// multiplies by the mask.
pub fn dropout(xs: &Tensor, p: f64, seed: u64) -> CResult<Tensor> {
    if !(0.0..1.0).contains(&p) {
        candle_core::bail!("fused-dropout: rate {p} outside [0, 1)");
    }
    if !matches!(xs.dtype(), DType::F32 | DType::BF16 | DType::F16) {
        let mask = Tensor::from_vec(dropout_mask(xs.elem_count(), p, seed), xs.shape(), xs.device())?.to_dtype(xs.dtype())?;
        return xs * mask;
    }
    xs.contiguous()?.apply_op1(Dropout { p, seed })
}

// ---------------------------------------------------------------------------------------------
// Heads: a projection's output to per-head blocks (RoPE on the way) and back
// ---------------------------------------------------------------------------------------------

/// Moves values between (b, s, heads·hd) rows and per-head (b, heads, s, hd) blocks, rotating
/// each head row by RoPE (`table`: (s, hd) f32, each position's hd/2 cosines then hd/2 sines)
/// by +θ on the way into the heads and by −θ on the way out (the backward). Besides its own
/// graph node ([`split_heads`]) it is the last step of a projection's op
/// (`ops::HeadSplit`), whose backward starts with [`Heads::reversed`].
#[derive(Clone)]
pub(crate) struct Heads {
    heads: usize,
    groups: usize,
    s: usize,
    hd: usize,
    table: Option<Tensor>,
    into_heads: bool,
}

impl Heads {
    /// The move of a projection's output, (b, s, heads·hd) for `s` positions and `width` =
    /// heads·hd features, into per-head blocks (b, groups, heads/groups·s, hd), rotated by RoPE
    /// when `rope` holds (cos, sin), (s, hd/2); its table goes to `device`.
    pub(crate) fn split(s: usize, width: usize, heads: usize, groups: usize, rope: Option<(&Tensor, &Tensor)>, device: &candle_core::Device) -> CResult<Heads> {
        if heads == 0 || groups == 0 || width % heads != 0 || heads % groups != 0 || (rope.is_some() && (width / heads) % 2 != 0) {
            candle_core::bail!("fused-split-heads: {width} features do not split into {heads} heads in {groups} groups (of even size for RoPE)");
        }
        let hd = width / heads;
        let table = match rope {
            Some((cos, sin)) => {
                if cos.dims() != [s, hd / 2] || sin.dims() != [s, hd / 2] {
                    candle_core::bail!("fused-split-heads: RoPE tables {:?}, {:?} for {s} positions of head size {hd}", cos.dims(), sin.dims());
                }
                Some(Tensor::cat(&[cos, sin], 1)?.to_dtype(DType::F32)?.to_device(device)?.contiguous()?)
            }
            None => None,
        };
        Ok(Heads { heads, groups, s, hd, table, into_heads: true })
    }

    /// The move the other way (the backward's).
    pub(crate) fn reversed(&self) -> Heads {
        Heads { table: self.table.clone(), into_heads: !self.into_heads, ..*self }
    }

    fn name(&self) -> &'static str {
        if self.into_heads { "fused-split-heads" } else { "fused-merge-heads" }
    }

    /// The output's shape for an input of `n` elements: (b, groups, heads/groups·s, hd) into
    /// the heads, (b, s, heads·hd) out of them.
    fn out_shape(&self, n: usize) -> Shape {
        let (s, hd, heads) = (self.s, self.hd, self.heads);
        let b = n / (s * heads * hd).max(1);
        if self.into_heads { Shape::from((b, self.groups, heads / self.groups * s, hd)) } else { Shape::from((b, s, heads * hd)) }
    }

    /// The move on the CPU in f32 (`src` and `dst` of b·s·heads·hd values), in parallel: one
    /// task per destination block (a head's s rows, or a position's heads).
    fn move_cpu(&self, src: &[f32], dst: &mut [f32]) -> CResult<()> {
        use rayon::prelude::*;
        let (s, hd, heads) = (self.s, self.hd, self.heads);
        let width = heads * hd;
        if src.len() != dst.len() || src.len() % (s * width).max(1) != 0 {
            candle_core::bail!("{}: {} values for rows of {s} × {width}", self.name(), src.len());
        }
        let table = match &self.table {
            Some(t) => Some(t.flatten_all()?.to_vec1::<f32>()?),
            None => None,
        };
        if table.as_ref().is_some_and(|t| t.len() != s * hd) {
            candle_core::bail!("{}: RoPE table of {} values for {s} positions of {hd}", self.name(), table.map_or(0, |t| t.len()));
        }
        let half = hd / 2;
        let place = |from: &[f32], to: &mut [f32], p: usize, sign: f32| match &table {
            Some(t) => {
                let (cos, sin) = t[p * hd..(p + 1) * hd].split_at(half);
                super::cpu_math::rotate_half(from, to, cos, sin, sign);
            }
            None => to.copy_from_slice(from),
        };
        if s * hd == 0 {
            return Ok(());
        }
        if self.into_heads {
            dst.par_chunks_mut(s * hd).enumerate().for_each(|(bh, block)| {
                let (bi, h) = (bh / heads, bh % heads);
                for (p, row) in block.chunks_mut(hd).enumerate() {
                    let at = (bi * s + p) * width + h * hd;
                    place(&src[at..at + hd], row, p, 1.0);
                }
            });
        } else {
            dst.par_chunks_mut(width).enumerate().for_each(|(bp, row)| {
                let (bi, p) = (bp / s, bp % s);
                for (h, out) in row.chunks_mut(hd).enumerate() {
                    let at = ((bi * heads + h) * s + p) * hd;
                    place(&src[at..at + hd], out, p, -1.0);
                }
            });
        }
        Ok(())
    }
}

impl CustomOp1 for Heads {
    fn name(&self) -> &'static str {
        Heads::name(self)
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let n = l.shape().elem_count();
        let shape = self.out_shape(n);
        if let (CpuStorage::F32(v), Some((a, b))) = (st, l.contiguous_offsets()) {
            // f32 read in place (the CPU's training path).
            let mut out = vec![0f32; n];
            self.move_cpu(&v[a..b], &mut out)?;
            return Ok((CpuStorage::F32(out), shape));
        }
        let x = cpu_values(st, l, self.name())?;
        let mut out = vec![0f32; n];
        self.move_cpu(&x, &mut out)?;
        Ok((cpu_store(out, st.dtype(), self.name())?, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, st: &candle_core::CudaStorage, l: &Layout) -> CResult<(candle_core::CudaStorage, Shape)> {
        Ok((by_dtype!(st.dtype(), heads_cuda(self, st, l))?, self.out_shape(l.shape().elem_count())))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        profile::region("split heads bwd", grad.device(), || {
            Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&self.reversed())?))
        })
    }
}

/// `x` (b, s, heads·hd), a projection's output, as per-head blocks (b, groups,
/// heads/groups·s, hd) — with `groups` the KV head count, the query heads sharing a KV head
/// stacked on the row axis — each head row rotated by RoPE when `rope` holds (cos, sin),
/// (s, hd/2). Differentiable in `x`; the kernel (or on the CPU its twin) moves the values in
/// one pass each way.
pub fn split_heads(x: &Tensor, heads: usize, groups: usize, rope: Option<(&Tensor, &Tensor)>) -> CResult<Tensor> {
    let (_, s, width) = x.dims3()?;
    x.contiguous()?.apply_op1(Heads::split(s, width, heads, groups, rope, x.device())?)
}

// ---------------------------------------------------------------------------------------------
// AdamW
// ---------------------------------------------------------------------------------------------

/// One AdamW step's constants, in f32 as the tensor ops apply them.
#[derive(Clone, Copy, Debug)]
pub struct AdamWStep {
    /// β₁.
    pub b1: f32,
    /// 1 − β₁.
    pub one_minus_b1: f32,
    /// β₂.
    pub b2: f32,
    /// 1 − β₂.
    pub one_minus_b2: f32,
    /// 1 − lr·weight_decay (1 without weight decay).
    pub decay: f32,
    /// 1 / (1 − β₁ᵗ).
    pub inv_bc1: f32,
    /// 1 / (1 − β₂ᵗ).
    pub inv_bc2: f32,
    /// ε.
    pub eps: f32,
    /// The learning rate.
    pub lr: f32,
}

/// (g, m, v) → (2·n,): the new m, then the new v.
struct AdamMoments(AdamWStep);

impl candle_core::CustomOp3 for AdamMoments {
    fn name(&self) -> &'static str {
        "fused-adamw-moments"
    }

    fn cpu_fwd(&self, a: &CpuStorage, al: &Layout, b: &CpuStorage, bl: &Layout, c: &CpuStorage, cl: &Layout) -> CResult<(CpuStorage, Shape)> {
        let op = "fused-adamw-moments";
        let (g, m, v) = (cpu_f32(a, al, op)?, cpu_f32(b, bl, op)?, cpu_f32(c, cl, op)?);
        let h = &self.0;
        let n = g.len();
        let mut out = vec![0f32; 2 * n];
        for i in 0..n {
            out[i] = m[i] * h.b1 + g[i] * h.one_minus_b1;
            out[n + i] = v[i] * h.b2 + (g[i] * g[i]) * h.one_minus_b2;
        }
        Ok((CpuStorage::F32(out), Shape::from(2 * n)))
    }

    cuda_fwd3!(adamw_moments_cuda, twice_the_elements);
}

/// (p, new moments) → the new p.
struct AdamParam(AdamWStep);

impl candle_core::CustomOp2 for AdamParam {
    fn name(&self) -> &'static str {
        "fused-adamw-param"
    }

    fn cpu_fwd(&self, a: &CpuStorage, al: &Layout, b: &CpuStorage, bl: &Layout) -> CResult<(CpuStorage, Shape)> {
        let op = "fused-adamw-param";
        let (p, mv) = (cpu_f32(a, al, op)?, cpu_f32(b, bl, op)?);
        let h = &self.0;
        let n = p.len();
        let out = (0..n)
            .map(|i| {
                let denom = (mv[n + i] * h.inv_bc2).sqrt() + h.eps;
                p[i] * h.decay - (mv[i] * h.inv_bc1) / denom * h.lr
            })
            .collect();
        Ok((CpuStorage::F32(out), al.shape().clone()))
    }

    cuda_fwd2!(adamw_param_cuda, same_shape);
}

/// One of AdamW's moments updated in place from the gradient (the only source): the first
/// (`m·β₁ + g·(1 − β₁)`) or, with `second`, the second (`v·β₂ + g²·(1 − β₂)`).
struct AdamMomentInPlace {
    h: AdamWStep,
    second: bool,
}

/// Elements per parallel chunk of the in-place AdamW passes (small variables stay on one
/// thread).
pub(crate) const ADAMW_CHUNK: usize = 1 << 14;

impl candle_core::InplaceOp2 for AdamMomentInPlace {
    fn name(&self) -> &'static str {
        "adamw-moment-in-place"
    }

    fn cpu_fwd(&self, dst: &mut CpuStorage, dst_l: &Layout, g: &CpuStorage, gl: &Layout) -> CResult<()> {
        use rayon::prelude::*;
        let op = self.name();
        let g = cpu_f32(g, gl, op)?;
        let d = cpu_f32_mut(dst, dst_l, op)?;
        if d.len() != g.len() {
            candle_core::bail!("{op}: {} moments for {} gradients", d.len(), g.len());
        }
        let h = self.h;
        let (keep, take, square) = if self.second { (h.b2, h.one_minus_b2, true) } else { (h.b1, h.one_minus_b1, false) };
        d.par_chunks_mut(ADAMW_CHUNK).zip(g.par_chunks(ADAMW_CHUNK)).for_each(|(d, g)| {
            for (d, &g) in d.iter_mut().zip(g) {
                *d = *d * keep + if square { g * g } else { g } * take;
            }
        });
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, dst: &mut candle_core::CudaStorage, dst_l: &Layout, g: &candle_core::CudaStorage, gl: &Layout) -> CResult<()> {
        let op = self.name();
        let dev = gpu::device(dst);
        let (n, g) = (dst_l.shape().elem_count(), gpu::view::<f32>(g, gl, op)?);
        if g.len() != n {
            candle_core::bail!("{op}: {n} moments for {} gradients", g.len());
        }
        let h = self.h;
        let (keep, take, square) = if self.second { (h.b2, h.one_minus_b2, 1i32) } else { (h.b1, h.one_minus_b1, 0i32) };
        let mut d = gpu::view_mut::<f32>(dst, dst_l, op)?;
        launch!(dev, "adamw_moment_inplace", DType::F32, gpu::elementwise(n), &mut d, &g, &n, &keep, &take, &square);
        Ok(())
    }
}

/// The parameter updated in place from the new moments (m, v), as [`AdamParam`] computes it.
struct AdamParamInPlace(AdamWStep);

impl candle_core::InplaceOp3 for AdamParamInPlace {
    fn name(&self) -> &'static str {
        "adamw-param-in-place"
    }

    fn cpu_fwd(&self, dst: &mut CpuStorage, dst_l: &Layout, m: &CpuStorage, ml: &Layout, v: &CpuStorage, vl: &Layout) -> CResult<()> {
        use rayon::prelude::*;
        let op = self.name();
        let (m, v) = (cpu_f32(m, ml, op)?, cpu_f32(v, vl, op)?);
        let p = cpu_f32_mut(dst, dst_l, op)?;
        if (m.len(), v.len()) != (p.len(), p.len()) {
            candle_core::bail!("{op}: {} parameters with {} and {} moments", p.len(), m.len(), v.len());
        }
        let h = self.0;
        p.par_chunks_mut(ADAMW_CHUNK).zip(m.par_chunks(ADAMW_CHUNK).zip(v.par_chunks(ADAMW_CHUNK))).for_each(|(p, (m, v))| {
            for ((p, &m), &v) in p.iter_mut().zip(m).zip(v) {
                let denom = (v * h.inv_bc2).sqrt() + h.eps;
                *p = *p * h.decay - (m * h.inv_bc1) / denom * h.lr;
            }
        });
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, dst: &mut candle_core::CudaStorage, dst_l: &Layout, m: &candle_core::CudaStorage, ml: &Layout, v: &candle_core::CudaStorage, vl: &Layout) -> CResult<()> {
        let op = self.name();
        let dev = gpu::device(dst);
        let n = dst_l.shape().elem_count();
        let (m, v) = (gpu::view::<f32>(m, ml, op)?, gpu::view::<f32>(v, vl, op)?);
        if (m.len(), v.len()) != (n, n) {
            candle_core::bail!("{op}: {n} parameters with {} and {} moments", m.len(), v.len());
        }
        let h = &self.0;
        let mut p = gpu::view_mut::<f32>(dst, dst_l, op)?;
        launch!(dev, "adamw_param_inplace", DType::F32, gpu::elementwise(n), &mut p, &m, &v, &n, &h.decay, &h.inv_bc1, &h.inv_bc2, &h.eps, &h.lr);
        Ok(())
    }
}

/// A contiguous f32 operand's values, to write (the in-place AdamW passes).
fn cpu_f32_mut<'a>(s: &'a mut CpuStorage, l: &Layout, op: &str) -> CResult<&'a mut [f32]> {
    let Some((a, b)) = l.contiguous_offsets() else { candle_core::bail!("{op}: operand must be contiguous") };
    match s {
        CpuStorage::F32(v) => Ok(&mut v[a..b]),
        other => candle_core::bail!("{op}: f32 expected, got {:?}", other.dtype()),
    }
}

/// One AdamW step of an f32 variable `p` with gradient `g`, all in place: `m`, `v`, then `p`
/// are overwritten where they are (three passes on the CPU, three launches on a GPU; nothing
/// allocated; the arithmetic of [`adamw_step`], so on the CPU the same values to the bit).
/// The tensor-op step allocates about seven temporaries of the variable's size at its peak and
/// [`adamw_step`] three (its new moments and parameter): for full fine-tuning's largest
/// variable, the embedding, that is the step's memory peak. `m` and `v` must be the
/// optimizer's own (no other tensor shares their storage).
pub fn adamw_step_in_place(p: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor, h: AdamWStep) -> CResult<()> {
    for t in [p, g, m, v] {
        if t.shape() != p.shape() || t.dtype() != DType::F32 || !t.device().same_device(p.device()) {
            candle_core::bail!("adamw-in-place: variable {:?} {:?} with operand {:?} {:?} on {:?}", p.dims(), p.dtype(), t.dims(), t.dtype(), t.device().location());
        }
    }
    let g = g.contiguous()?;
    m.inplace_op2(&g, &AdamMomentInPlace { h, second: false })?;
    v.inplace_op2(&g, &AdamMomentInPlace { h, second: true })?;
    p.inplace_op3(m, v, &AdamParamInPlace(h))
}

/// [`adamw_step_in_place`] for every variable of a step at once: each `[p, g, m, v]` updated as
/// that function updates it. On a GPU one launch for all of them (`tb_adamw_multi_f32`, given a
/// table of their addresses) instead of three per variable: with LoRA on every projection of a
/// 1B model that was ~670 launches a step, each a few microseconds of a mostly idle GPU.
/// Elsewhere (the CPU, or variables on different devices) variable by variable.
pub fn adamw_step_in_place_all(items: &[[&Tensor; 4]], h: AdamWStep) -> CResult<()> {
    let Some(first) = items.first() else { return Ok(()) };
    for [p, g, m, v] in items {
        for t in [p, g, m, v] {
            if t.shape() != p.shape() || t.dtype() != DType::F32 || !t.device().same_device(p.device()) {
                candle_core::bail!("adamw-in-place: variable {:?} {:?} with operand {:?} {:?} on {:?}", p.dims(), p.dtype(), t.dims(), t.dtype(), t.device().location());
            }
        }
    }
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(dev) = first[0].device().clone() {
        if items.iter().all(|[p, ..]| p.device().same_device(first[0].device())) {
            // One launch reads every operand where it is: g must be contiguous like the rest.
            let gs = items.iter().map(|[_, g, _, _]| g.contiguous()).collect::<CResult<Vec<_>>>()?;
            return adamw_multi_cuda(&dev, items, &gs, h);
        }
    }
    #[cfg(not(feature = "cuda"))]
    let _ = first;
    for [p, g, m, v] in items {
        adamw_step_in_place(p, g, m, v, h)?;
    }
    Ok(())
}

/// Values one block of `tb_adamw_multi_f32` updates (256 threads, 8 each).
#[cfg(feature = "cuda")]
const ADAMW_MULTI_CHUNK: usize = 2048;

#[cfg(feature = "cuda")]
fn adamw_multi_cuda(dev: &candle_core::CudaDevice, items: &[[&Tensor; 4]], gs: &[Tensor], h: AdamWStep) -> CResult<()> {
    use candle_core::cuda_backend::cudarc::driver::{DevicePtr, LaunchConfig};
    let op = "adamw-multi";
    let stream = dev.cuda_stream();
    // Every operand's storage, held (read-locked) until the launch is queued. The kernel writes
    // p, m and v through these addresses, as the in-place ops write them: the optimizer owns the
    // moments, and nothing reads the variables while it steps.
    let held: Vec<[_; 4]> = items.iter().zip(gs).map(|([p, _, m, v], g)| [p, g, m, v].map(|t| t.storage_and_layout())).collect();
    let mut table: Vec<u64> = Vec::with_capacity(items.len() * 6);
    let mut guards = Vec::with_capacity(items.len() * 4);
    let mut blocks = 0usize;
    for operands in &held {
        let n = operands[0].1.shape().elem_count();
        for (st, l) in operands {
            let candle_core::Storage::Cuda(s) = &**st else { candle_core::bail!("{op}: operand not on cuda") };
            let Some((a, _)) = l.contiguous_offsets() else { candle_core::bail!("{op}: operand must be contiguous") };
            let (ptr, guard) = s.as_cuda_slice::<f32>()?.device_ptr(&stream);
            table.push(ptr + (a * std::mem::size_of::<f32>()) as u64);
            guards.push(guard);
        }
        table.extend([n as u64, blocks as u64]);
        blocks += n.div_ceil(ADAMW_MULTI_CHUNK);
    }
    if blocks == 0 {
        return Ok(());
    }
    let table = dev.clone_htod(&table)?;
    let (count, chunk) = (items.len() as i32, ADAMW_MULTI_CHUNK as u32);
    let cfg = LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    launch!(dev, "adamw_multi", DType::F32, cfg, &table, &count, &chunk, &h.b1, &h.one_minus_b1, &h.b2, &h.one_minus_b2, &h.decay, &h.inv_bc1, &h.inv_bc2, &h.eps, &h.lr);
    drop(guards);
    Ok(())
}

/// A contiguous f32 operand's values (AdamW's operands are all f32).
fn cpu_f32<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> CResult<&'a [f32]> {
    let Some((a, b)) = l.contiguous_offsets() else { candle_core::bail!("{op}: operand must be contiguous") };
    Ok(&s.as_slice::<f32>()?[a..b])
}

/// One AdamW step of an f32 variable `p` with gradient `g` and moments `m`, `v` (all of `p`'s
/// shape): the new parameter and the new moments (views of one buffer).
pub fn adamw_step(p: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor, h: AdamWStep) -> CResult<(Tensor, Tensor, Tensor)> {
    for t in [g, m, v] {
        if t.shape() != p.shape() || t.dtype() != DType::F32 || p.dtype() != DType::F32 {
            candle_core::bail!("fused-adamw: variable {:?} {:?} with operand {:?} {:?}", p.dims(), p.dtype(), t.dims(), t.dtype());
        }
    }
    let n = p.elem_count();
    let mv = g.contiguous()?.apply_op3_no_bwd(&m.contiguous()?, &v.contiguous()?, &AdamMoments(h))?;
    let new_p = p.contiguous()?.apply_op2_no_bwd(&mv, &AdamParam(h))?;
    Ok((new_p, mv.narrow(0, 0, n)?.reshape(p.shape())?, mv.narrow(0, n, n)?.reshape(p.shape())?))
}

// ---------------------------------------------------------------------------------------------
// Flash attention (CUDA, f16/bf16)
// ---------------------------------------------------------------------------------------------

/// Query positions per tile of the flash kernels (one thread block of 4 warps each).
pub const FLASH_ROWS: usize = 64;

/// Whether this build's kernels hold the flash-attention kernels (a CUDA build for compute
/// capability 8.0 or newer, build.rs's default).
pub const FLASH_BUILT: bool = cfg!(all(feature = "cuda", tb_flash));

/// True when causal attention over these operands takes the flash kernels: all three f16 or
/// all three bf16, head_dim 64 or 128, on a CUDA device in a build that has them (unless
/// `TUNEBENCH_FUSED_KERNELS=0` or `TUNEBENCH_FLASH_ATTENTION=0`, which keeps the blocked
/// tensor-op attention, to compare against), or on any device inside [`forced`] (on the CPU
/// the twin: [`super::attention_cpu`]'s kernels, the same scheme in f32).
pub fn flash_applies(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    let dtype = q.dtype();
    matches!(dtype, DType::BF16 | DType::F16)
        && (k.dtype(), v.dtype()) == (dtype, dtype)
        && matches!(q.dims().last(), Some(64 | 128))
        && (is_forced()
            || (FLASH_BUILT
                && q.device().is_cuda()
                && enabled_by_env()
                && *ON.get_or_init(|| std::env::var("TUNEBENCH_FLASH_ATTENTION").map(|v| v.trim() != "0").unwrap_or(true))))
}

/// The operands' shapes: (b, nkv, rep, keys, hd) for `q` (b, nkv, rep·q_len, hd) and `k`, `v`
/// (b, nkv, keys, hd), keys ≥ q_len.
fn flash_dims(q: &Tensor, k: &Tensor, v: &Tensor, q_len: usize) -> CResult<(usize, usize, usize, usize, usize)> {
    let (b, nkv, rows, hd) = q.dims4()?;
    let keys = k.dim(2)?;
    if q_len == 0 || rows % q_len != 0 || keys < q_len || k.dims4()? != (b, nkv, keys, hd) || v.dims4()? != (b, nkv, keys, hd) {
        candle_core::bail!("flash-attention: q {:?}, k {:?}, v {:?} for {q_len} positions", q.dims(), k.dims(), v.dims());
    }
    Ok((b, nkv, rows / q_len, keys, hd))
}

/// Causal attention's forward by the flash kernel, without a graph: the output (b, q_len,
/// heads·hd), heads merged, in the operands' dtype, and each query row's log-sum-exp of its
/// scaled scores, (b, nkv, rep·q_len) in f32, which [`flash_backward`] takes. Shapes as
/// [`super::ops::causal_attention`]'s. On the CPU, the twin.
pub fn flash_forward(q: &Tensor, k: &Tensor, v: &Tensor, q_len: usize, scale: f64) -> CResult<(Tensor, Tensor)> {
    let (b, nkv, rep, keys, hd) = flash_dims(q, k, v, q_len)?;
    #[cfg(all(feature = "cuda", tb_flash))]
    if q.device().is_cuda() {
        return by_dtype16!(q.dtype(), flash_forward_cuda(q, k, v, q_len, (b, nkv, rep, keys, hd), scale as f32));
    }
    // The CPU twin.
    let d = flash_twin_dims(q, (b, nkv, rep, keys, hd), q_len)?;
    let (o, lse) = super::ops::attention_cpu_forward(q, k, v, d, scale as f32, super::attention_cpu::TILE.min(q_len))?;
    Ok((o, Tensor::from_vec(lse, (b, nkv, rep * q_len), q.device())?))
}

/// The twin's shapes, on the CPU; elsewhere, an error: this build has no flash kernels there.
fn flash_twin_dims(q: &Tensor, (b, nkv, rep, keys, hd): (usize, usize, usize, usize, usize), q_len: usize) -> CResult<super::attention_cpu::Dims> {
    if !q.device().is_cpu() {
        candle_core::bail!("flash-attention: this build has no flash kernels for {:?} on {:?}", q.dtype(), q.device().location());
    }
    Ok(super::attention_cpu::Dims { b, nkv, rep, s: q_len, keys, hd })
}

/// The gradients (dq, dk, dv) of [`flash_forward`]'s output for its gradient `grad` (b, q_len,
/// heads·hd), from the operands, the output `o` and the log-sum-exp `lse` the forward returned:
/// the probabilities are made again tile by tile, never kept.
#[allow(clippy::too_many_arguments)]
pub fn flash_backward(q: &Tensor, k: &Tensor, v: &Tensor, o: &Tensor, lse: &Tensor, grad: &Tensor, q_len: usize, scale: f64) -> CResult<(Tensor, Tensor, Tensor)> {
    let (b, nkv, rep, keys, hd) = flash_dims(q, k, v, q_len)?;
    let merged = o.dims3()?;
    if merged != (b, q_len, nkv * rep * hd) || grad.dims3()? != merged || lse.dims3()? != (b, nkv, rep * q_len) || lse.dtype() != DType::F32 {
        candle_core::bail!("flash-attention backward: output {:?}, gradient {:?}, log-sum-exp {:?} {:?} for q {:?}", o.dims(), grad.dims(), lse.dims(), lse.dtype(), q.dims());
    }
    #[cfg(all(feature = "cuda", tb_flash))]
    if q.device().is_cuda() {
        return by_dtype16!(q.dtype(), flash_backward_cuda(q, k, v, o, lse, grad, q_len, (b, nkv, rep, keys, hd), scale as f32));
    }
    // The CPU twin.
    let d = flash_twin_dims(q, (b, nkv, rep, keys, hd), q_len)?;
    let lse = lse.flatten_all()?.to_vec1::<f32>()?;
    super::ops::attention_cpu_backward(q, k, v, o, &lse, grad, d, scale as f32, super::attention_cpu::TILE.min(q_len))
}

// ---------------------------------------------------------------------------------------------
// Quantized blocks to dense values
// ---------------------------------------------------------------------------------------------

/// The kernel that dequantizes a block format, when there is one.
fn dequant_kernel(ty: candle_core::quantized::GgmlDType) -> Option<&'static str> {
    use candle_core::quantized::GgmlDType;
    match ty {
        GgmlDType::Q4_0 => Some("dequant_q4_0"),
        GgmlDType::Q4_1 => Some("dequant_q4_1"),
        GgmlDType::Q8_0 => Some("dequant_q8_0"),
        GgmlDType::Q4K => Some("dequant_q4k"),
        _ => None,
    }
}

/// A weight held as quantized blocks on a CUDA device, dense in `dtype` (f32, bf16, f16), by one
/// kernel pass from the blocks (`kernels/fused.cu`'s `dequant_*`); `None` where that does not
/// apply — not on a GPU, a block format without a kernel, another dtype, or the fused kernels
/// turned off — and the caller dequantizes with candle (to f32, then a cast). The values are
/// candle's, rounded once to `dtype` (`tests/cuda_kernels_emulated.rs` holds the kernels to
/// candle's CPU dequantizer; `tunebench check-ops` compares them with candle's on the GPU).
pub fn dequantize(q: &candle_core::quantized::QTensor, dtype: DType) -> CResult<Option<Tensor>> {
    let Some(kernel) = dequant_kernel(q.dtype()) else { return Ok(None) };
    if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) || !enabled_by_env() {
        return Ok(None);
    }
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(dev) = q.device() {
        let n = q.shape().elem_count();
        let storage = by_dtype!(dtype, dequant_cuda(&dev, q, kernel, n))?;
        return Ok(Some(Tensor::from_storage(candle_core::Storage::Cuda(storage), q.shape().clone(), candle_core::op::BackpropOp::none(), false)));
    }
    let _ = kernel;
    Ok(None)
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, D};

    use super::*;
    use crate::model::ops;

    fn random(shape: &[usize], seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random::<f32>() * 6.0 - 3.0).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
        let (a, b) = (a.to_dtype(DType::F32).unwrap().flatten_all().unwrap(), b.to_dtype(DType::F32).unwrap().flatten_all().unwrap());
        (a - b).unwrap().abs().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn forced_applies_on_this_thread_and_is_undone() {
        let x = Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap();
        assert!(!active(&x), "the CPU takes the fused kernels only when forced");
        assert!(forced(|| active(&x) && !active(&x.to_dtype(DType::F64).unwrap())));
        let r = std::panic::catch_unwind(|| forced(|| panic!("inside")));
        assert!(r.is_err());
        assert!(!active(&x), "forcing ends with the closure, also when it panics");
    }

    /// The causal softmax twin against the composed one: rows stacking two heads, keys ahead
    /// of the queries (an offset of 3), each row's masked keys exactly 0.
    #[test]
    fn causal_softmax_matches_the_composed_one() {
        let x = random(&[2, 2 * 5, 8], 1);
        let fused = causal_softmax(&x, 5, 0.3).unwrap();
        let composed = ops::causal_softmax_composed(&x, 5, 0.3).unwrap();
        assert!(max_abs(&fused, &composed) < 1e-6, "{}", max_abs(&fused, &composed));
        let rows = fused.flatten_to(1).unwrap().to_vec2::<f32>().unwrap();
        for (r, row) in rows.iter().enumerate() {
            let visible = r % 5 + 3 + 1;
            assert!(row[visible..].iter().all(|&p| p == 0.0), "row {r}: {row:?}");
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        }
        assert!(causal_softmax(&x, 9, 0.3).is_err(), "more positions than keys");
    }

    /// Loss, log-sum-exp and softmax − onehot of a chunk of logits, in f32 and bf16, against the
    /// composed cross-entropy; a target outside the vocabulary is an error naming it.
    #[test]
    fn cross_entropy_matches_the_composed_one() {
        let logits = (random(&[6, 50], 2) * 4.0).unwrap();
        let targets = [0u32, 49, 7, 7, 21, 33];
        let t = Tensor::new(&targets, &Device::Cpu).unwrap();
        let reference = ops::cross_entropy_rows(&logits, &targets).unwrap();
        let (loss, grad) = cross_entropy(&logits, &t).unwrap();
        assert!(max_abs(&loss, &reference) < 1e-5, "{}", max_abs(&loss, &reference));
        assert!(max_abs(&cross_entropy_loss(&logits, &t).unwrap(), &reference) < 1e-5);
        let softmax = candle_nn::ops::softmax_last_dim(&logits).unwrap();
        let onehot = Tensor::zeros((6, 50), DType::F32, &Device::Cpu).unwrap().scatter_add(&t.unsqueeze(1).unwrap(), &Tensor::ones((6, 1), DType::F32, &Device::Cpu).unwrap(), 1).unwrap();
        assert!(max_abs(&grad, &(softmax - onehot).unwrap()) < 1e-6);
        assert!(grad.sum(D::Minus1).unwrap().abs().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap() < 1e-5, "each row of the gradient sums to 0");
        let (loss16, grad16) = cross_entropy(&logits.to_dtype(DType::BF16).unwrap(), &t).unwrap();
        assert_eq!((loss16.dtype(), grad16.dtype()), (DType::F32, DType::BF16));
        assert!(max_abs(&loss16, &reference) < 0.1, "{}", max_abs(&loss16, &reference));
        let bad = Tensor::new(&[0u32, 50, 1, 1, 1, 1], &Device::Cpu).unwrap();
        let err = cross_entropy(&logits, &bad).unwrap_err().to_string();
        assert!(err.contains("target 50 outside the vocabulary of 50"), "{err}");
    }

    /// The dropout op (its CPU twin) applies [`dropout_mask`]'s mask, and its backward the same
    /// mask to the gradient; rate 0 keeps everything.
    #[test]
    fn dropout_applies_the_seeded_mask_both_ways() {
        let x = candle_core::Var::from_tensor(&random(&[3, 3000], 6)).unwrap();
        let y = dropout(x.as_tensor(), 0.25, 99).unwrap();
        let mask = Tensor::from_vec(dropout_mask(9000, 0.25, 99), (3, 3000), &Device::Cpu).unwrap();
        assert_eq!(max_abs(&y, &(x.as_tensor() * &mask).unwrap()), 0.0);
        let kept = mask.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().filter(|&&m| m > 0.0).count();
        assert!((6400..7100).contains(&kept), "{kept} of 9000 kept at rate 0.25");
        let cot = random(&[3, 3000], 7);
        let g = (y * &cot).unwrap().sum_all().unwrap().backward().unwrap();
        assert_eq!(max_abs(g.get(x.as_tensor()).unwrap(), &(cot * &mask).unwrap()), 0.0);
        assert_eq!(max_abs(&dropout(x.as_tensor(), 0.0, 99).unwrap(), x.as_tensor()), 0.0);
        assert!(dropout(x.as_tensor(), 1.0, 99).is_err());
    }

    /// SwiGLU's gradients (through the op's backward) against candle's composed silu·up.
    #[test]
    fn swiglu_gradients_match_the_composed_ones() {
        let (g, u) = (candle_core::Var::from_tensor(&random(&[3, 7], 3)).unwrap(), candle_core::Var::from_tensor(&random(&[3, 7], 4)).unwrap());
        let cot = random(&[3, 7], 5);
        let grads = |y: Tensor| {
            let gs = (y * &cot).unwrap().sum_all().unwrap().backward().unwrap();
            (gs.get(g.as_tensor()).unwrap().clone(), gs.get(u.as_tensor()).unwrap().clone())
        };
        let (fg, fu) = grads(swiglu(g.as_tensor(), u.as_tensor()).unwrap());
        let (cg, cu) = grads(ops::swiglu_composed(g.as_tensor(), u.as_tensor()).unwrap());
        assert!(max_abs(&fg, &cg) < 1e-5 && max_abs(&fu, &cu) < 1e-5, "{} {}", max_abs(&fg, &cg), max_abs(&fu, &cu));
        assert!(swiglu(g.as_tensor(), &u.as_tensor().to_dtype(DType::BF16).unwrap()).is_err());
    }
}

// ---------------------------------------------------------------------------------------------
// The launches (CUDA builds)
// ---------------------------------------------------------------------------------------------

#[cfg(feature = "cuda")]
use candle_core::CudaStorage as Cs;

#[cfg(feature = "cuda")]
fn swiglu_cuda<T: gpu::Elem>(_: &Swiglu, a: &Cs, al: &Layout, b: &Cs, bl: &Layout) -> CResult<Cs> {
    let op = "fused-swiglu";
    let dev = gpu::device(a);
    let n = al.shape().elem_count();
    let (g, u) = (gpu::view::<T>(a, al, op)?, gpu::view::<T>(b, bl, op)?);
    let mut out = gpu::output::<T>(&dev, n)?;
    launch!(dev, "swiglu_fwd", T::DTYPE, gpu::elementwise(n), &g, &u, &mut out, &n);
    Ok(Cs::wrap_cuda_slice(out, dev))
}

#[cfg(feature = "cuda")]
fn swiglu_grad_cuda<T: gpu::Elem>(_: &SwigluGrad, a: &Cs, al: &Layout, b: &Cs, bl: &Layout, c: &Cs, cl: &Layout) -> CResult<Cs> {
    let op = "fused-swiglu-grad";
    let dev = gpu::device(a);
    let n = al.shape().elem_count();
    let (g, u, d) = (gpu::view::<T>(a, al, op)?, gpu::view::<T>(b, bl, op)?, gpu::view::<T>(c, cl, op)?);
    let mut out = gpu::output::<T>(&dev, 2 * n)?;
    launch!(dev, "swiglu_bwd", T::DTYPE, gpu::elementwise(n), &g, &u, &d, &mut out, &n);
    Ok(Cs::wrap_cuda_slice(out, dev))
}

#[cfg(feature = "cuda")]
fn rms_norm_grad_cuda<T: gpu::Elem>(o: &RmsNormGrad, a: &Cs, al: &Layout, b: &Cs, bl: &Layout, c: &Cs, cl: &Layout) -> CResult<Cs> {
    let op = "fused-rms-norm-grad";
    let dev = gpu::device(a);
    let (rows, n) = rows_of(al);
    let (x, g, w) = (gpu::view::<T>(a, al, op)?, gpu::view::<T>(b, bl, op)?, gpu::view::<T>(c, cl, op)?);
    let mut out = gpu::output::<T>(&dev, rows * n)?;
    let width = n as i32;
    launch!(dev, "rmsnorm_bwd", T::DTYPE, gpu::per_row(rows, 256), &x, &g, &w, &mut out, &width, &o.eps);
    Ok(Cs::wrap_cuda_slice(out, dev))
}

#[cfg(feature = "cuda")]
fn causal_softmax_cuda<T: gpu::Elem>(o: &CausalSoftmax, s: &Cs, l: &Layout) -> CResult<Cs> {
    let dev = gpu::device(s);
    let (rows, k_len) = rows_of(l);
    let x = gpu::view::<T>(s, l, "fused-causal-softmax")?;
    let mut out = gpu::output::<T>(&dev, rows * k_len)?;
    let (k, q, offset) = (k_len as i32, o.q_len as i32, (k_len - o.q_len) as i32);
    launch!(dev, "causal_softmax", T::DTYPE, gpu::per_row(rows, 256), &x, &mut out, &k, &q, &offset, &o.scale);
    Ok(Cs::wrap_cuda_slice(out, dev))
}

#[cfg(feature = "cuda")]
fn ce_stats_cuda<T: gpu::Elem>(_: &CeStats, a: &Cs, al: &Layout, b: &Cs, bl: &Layout) -> CResult<Cs> {
    let op = "fused-ce-stats";
    let dev = gpu::device(a);
    let (rows, vocab) = rows_of(al);
    let (logits, targets) = (gpu::view::<T>(a, al, op)?, gpu::view::<u32>(b, bl, op)?);
    let mut out = gpu::output::<f32>(&dev, 2 * rows)?;
    let v = vocab as i32;
    launch!(dev, "ce_stats", T::DTYPE, gpu::per_row(rows, 1024), &logits, &targets, &mut out, &v);
    Ok(Cs::wrap_cuda_slice(out, dev))
}

#[cfg(feature = "cuda")]
fn ce_grad_cuda<T: gpu::Elem>(_: &CeGrad, a: &Cs, al: &Layout, b: &Cs, bl: &Layout, c: &Cs, cl: &Layout) -> CResult<Cs> {
    let op = "fused-ce-grad";
    let dev = gpu::device(a);
    let (rows, vocab) = rows_of(al);
    let (logits, targets, stats) = (gpu::view::<T>(a, al, op)?, gpu::view::<u32>(b, bl, op)?, gpu::view::<f32>(c, cl, op)?);
    let mut out = gpu::output::<T>(&dev, rows * vocab)?;
    let v = vocab as i32;
    launch!(dev, "ce_grad", T::DTYPE, gpu::per_row(rows, 1024), &logits, &targets, &stats, &mut out, &v);
    Ok(Cs::wrap_cuda_slice(out, dev))
}

#[cfg(feature = "cuda")]
fn attention_ds_cuda<T: gpu::Elem>(o: &AttentionDs, a: &Cs, al: &Layout, b: &Cs, bl: &Layout, c: &Cs, cl: &Layout) -> CResult<Cs> {
    let op = "fused-attention-ds";
    let dev = gpu::device(a);
    let (rows, k_len) = rows_of(al);
    let n = rows * k_len;
    let (p, dp, row) = (gpu::view::<T>(a, al, op)?, gpu::view::<T>(b, bl, op)?, gpu::view::<f32>(c, cl, op)?);
    let mut out = gpu::output::<T>(&dev, n)?;
    let k = k_len as i32;
    launch!(dev, "attention_ds", T::DTYPE, gpu::elementwise(n), &p, &dp, &row, &mut out, &n, &k, &o.scale);
    Ok(Cs::wrap_cuda_slice(out, dev))
}

#[cfg(feature = "cuda")]
fn adamw_moments_cuda<T: gpu::Elem>(o: &AdamMoments, a: &Cs, al: &Layout, b: &Cs, bl: &Layout, c: &Cs, cl: &Layout) -> CResult<Cs> {
    let op = "fused-adamw-moments";
    let dev = gpu::device(a);
    let n = al.shape().elem_count();
    let (g, m, v) = (gpu::view::<f32>(a, al, op)?, gpu::view::<f32>(b, bl, op)?, gpu::view::<f32>(c, cl, op)?);
    let mut out = gpu::output::<f32>(&dev, 2 * n)?;
    let h = &o.0;
    launch!(dev, "adamw_moments", T::DTYPE, gpu::elementwise(n), &g, &m, &v, &mut out, &n, &h.b1, &h.one_minus_b1, &h.b2, &h.one_minus_b2);
    Ok(Cs::wrap_cuda_slice(out, dev))
}

#[cfg(feature = "cuda")]
fn adamw_param_cuda<T: gpu::Elem>(o: &AdamParam, a: &Cs, al: &Layout, b: &Cs, bl: &Layout) -> CResult<Cs> {
    let op = "fused-adamw-param";
    let dev = gpu::device(a);
    let n = al.shape().elem_count();
    let (p, mv) = (gpu::view::<f32>(a, al, op)?, gpu::view::<f32>(b, bl, op)?);
    let mut out = gpu::output::<f32>(&dev, n)?;
    let h = &o.0;
    launch!(dev, "adamw_param", T::DTYPE, gpu::elementwise(n), &p, &mv, &mut out, &n, &h.decay, &h.inv_bc1, &h.inv_bc2, &h.eps, &h.lr);
    Ok(Cs::wrap_cuda_slice(out, dev))
}

#[cfg(feature = "cuda")]
fn dequant_cuda<T: gpu::Elem>(dev: &candle_core::CudaDevice, q: &candle_core::quantized::QTensor, kernel: &str, n: usize) -> CResult<Cs> {
    let stream = dev.cuda_stream();
    // The blocks' device pointer, guarded until the launch is queued on the stream.
    let (blocks, _guard) = q.device_ptr_with_guard(&stream)?;
    let blocks = blocks as u64;
    let mut out = gpu::output::<T>(dev, n)?;
    launch!(dev, kernel, T::DTYPE, gpu::elementwise(n), &blocks, &mut out, &n);
    Ok(Cs::wrap_cuda_slice(out, dev.clone()))
}

#[cfg(feature = "cuda")]
fn heads_cuda<T: gpu::Elem>(o: &Heads, st: &Cs, l: &Layout) -> CResult<Cs> {
    let op = o.name();
    let dev = gpu::device(st);
    let n = l.shape().elem_count();
    // The kernel maps every destination index to a source index of the same full shape.
    if n % (o.s * o.heads * o.hd).max(1) != 0 || o.table.as_ref().is_some_and(|t| t.elem_count() != o.s * o.hd) {
        candle_core::bail!("{op}: {n} values for rows of {} × {} × {}", o.s, o.heads, o.hd);
    }
    let x = gpu::view::<T>(st, l, op)?;
    let mut out = gpu::output::<T>(&dev, n)?;
    let (s, heads, hd, into) = (o.s as i32, o.heads as i32, o.hd as i32, i32::from(o.into_heads));
    match &o.table {
        Some(t) => {
            let (ts, tl) = t.storage_and_layout();
            let candle_core::Storage::Cuda(ts) = &*ts else { candle_core::bail!("{op}: RoPE table not on cuda") };
            let table = gpu::view::<f32>(ts, tl, op)?;
            launch!(dev, "split_heads_rope", T::DTYPE, gpu::elementwise(n), &x, &table, &mut out, &n, &s, &heads, &hd, &into);
        }
        None => launch!(dev, "split_heads", T::DTYPE, gpu::elementwise(n), &x, &mut out, &n, &s, &heads, &hd, &into),
    }
    Ok(Cs::wrap_cuda_slice(out, dev))
}

#[cfg(feature = "cuda")]
fn dropout_cuda<T: gpu::Elem>(o: &Dropout, s: &Cs, l: &Layout) -> CResult<Cs> {
    let dev = gpu::device(s);
    let n = l.shape().elem_count();
    let x = gpu::view::<T>(s, l, "fused-dropout")?;
    let mut out = gpu::output::<T>(&dev, n)?;
    let (threshold, scale) = dropout_params(o.p);
    launch!(dev, "dropout", T::DTYPE, gpu::elementwise(n), &x, &mut out, &n, &o.seed, &threshold, &scale);
    Ok(Cs::wrap_cuda_slice(out, dev))
}

/// A device buffer a launch filled, handed to candle as a tensor: applied (without a graph) to
/// any tensor on the device, the op's forward returns the buffer. How launches outside a
/// custom op (the flash kernels take six operands and return several results) make tensors.
#[cfg(all(feature = "cuda", tb_flash))]
struct Filled {
    storage: std::sync::Mutex<Option<Cs>>,
    shape: Shape,
}

#[cfg(all(feature = "cuda", tb_flash))]
impl CustomOp1 for Filled {
    fn name(&self) -> &'static str {
        "filled"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> CResult<(CpuStorage, Shape)> {
        candle_core::bail!("filled: a device buffer, not on the cpu")
    }

    fn cuda_fwd(&self, _: &Cs, _: &Layout) -> CResult<(Cs, Shape)> {
        match self.storage.lock().ok().and_then(|mut s| s.take()) {
            Some(s) => Ok((s, self.shape.clone())),
            None => candle_core::bail!("filled: the buffer was handed over already"),
        }
    }
}

#[cfg(all(feature = "cuda", tb_flash))]
fn filled<T: gpu::Elem>(slice: candle_core::cuda_backend::cudarc::driver::CudaSlice<T>, dev: &candle_core::CudaDevice, shape: impl Into<Shape>, anchor: &Tensor) -> CResult<Tensor> {
    anchor.apply_op1_no_bwd(&Filled { storage: std::sync::Mutex::new(Some(Cs::wrap_cuda_slice(slice, dev.clone()))), shape: shape.into() })
}

/// An operand as the flash kernels read it: contiguous, its first element at a multiple of 8
/// values (16-byte loads); copied when it is not.
#[cfg(all(feature = "cuda", tb_flash))]
fn flash_operand(t: &Tensor) -> CResult<Tensor> {
    let t = t.detach();
    if t.is_contiguous() && t.layout().start_offset() % 8 == 0 {
        Ok(t)
    } else {
        t.force_contiguous()
    }
}

/// The CUDA storages of flash operands (read-locked for the launches).
#[cfg(all(feature = "cuda", tb_flash))]
fn cuda_of<'a>(st: &'a candle_core::Storage, op: &str) -> CResult<&'a Cs> {
    match st {
        candle_core::Storage::Cuda(s) => Ok(s),
        _ => candle_core::bail!("{op}: operand not on cuda"),
    }
}

/// One block of [`FLASH_ROWS`] query positions (or keys) per tile.
#[cfg(all(feature = "cuda", tb_flash))]
fn flash_launch(blocks: usize) -> candle_core::cuda_backend::cudarc::driver::LaunchConfig {
    candle_core::cuda_backend::cudarc::driver::LaunchConfig { grid_dim: (blocks.max(1) as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 }
}

#[cfg(all(feature = "cuda", tb_flash))]
fn flash_forward_cuda<T: gpu::Elem>(q: &Tensor, k: &Tensor, v: &Tensor, s: usize, (b, nkv, rep, keys, hd): (usize, usize, usize, usize, usize), scale: f32) -> CResult<(Tensor, Tensor)> {
    let op = "flash-attention";
    let (q, k, v) = (flash_operand(q)?, flash_operand(k)?, flash_operand(v)?);
    let (dev, o, lse) = {
        let ((qs, ql), (ks, kl), (vs, vl)) = (q.storage_and_layout(), k.storage_and_layout(), v.storage_and_layout());
        let (qc, kc, vc) = (cuda_of(&qs, op)?, cuda_of(&ks, op)?, cuda_of(&vs, op)?);
        let dev = gpu::device(qc);
        let (qv, kv, vv) = (gpu::view::<T>(qc, ql, op)?, gpu::view::<T>(kc, kl, op)?, gpu::view::<T>(vc, vl, op)?);
        let mut o = gpu::output::<T>(&dev, b * s * nkv * rep * hd)?;
        let mut lse = gpu::output::<f32>(&dev, b * nkv * rep * s)?;
        let [bi, nkvi, repi, si, keysi] = [b, nkv, rep, s, keys].map(|x| x as i32);
        let cfg = flash_launch(b * nkv * rep * s.div_ceil(FLASH_ROWS));
        launch!(dev, &format!("flash_fwd_hd{hd}"), T::DTYPE, cfg, &qv, &kv, &vv, &mut o, &mut lse, &bi, &nkvi, &repi, &si, &keysi, &scale);
        (dev, o, lse)
    };
    Ok((filled(o, &dev, (b, s, nkv * rep * hd), &q)?, filled(lse, &dev, (b, nkv, rep * s), &q)?))
}

#[cfg(all(feature = "cuda", tb_flash))]
#[allow(clippy::too_many_arguments)]
fn flash_backward_cuda<T: gpu::Elem>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    lse: &Tensor,
    grad: &Tensor,
    s: usize,
    (b, nkv, rep, keys, hd): (usize, usize, usize, usize, usize),
    scale: f32,
) -> CResult<(Tensor, Tensor, Tensor)> {
    let op = "flash-attention backward";
    let [q, k, v, o, grad] = [q, k, v, o, grad].map(flash_operand);
    let (q, k, v, o, grad) = (q?, k?, v?, o?, grad?);
    let lse = lse.contiguous()?;
    let (dev, dq, dk, dv) = {
        let ((qs, ql), (ks, kl), (vs, vl)) = (q.storage_and_layout(), k.storage_and_layout(), v.storage_and_layout());
        let ((os, ol), (gs, gl), (ls, ll)) = (o.storage_and_layout(), grad.storage_and_layout(), lse.storage_and_layout());
        let (qc, kc, vc) = (cuda_of(&qs, op)?, cuda_of(&ks, op)?, cuda_of(&vs, op)?);
        let (oc, gc, lc) = (cuda_of(&os, op)?, cuda_of(&gs, op)?, cuda_of(&ls, op)?);
        let dev = gpu::device(qc);
        let (qv, kv, vv) = (gpu::view::<T>(qc, ql, op)?, gpu::view::<T>(kc, kl, op)?, gpu::view::<T>(vc, vl, op)?);
        let (ov, gv, lv) = (gpu::view::<T>(oc, ol, op)?, gpu::view::<T>(gc, gl, op)?, gpu::view::<f32>(lc, ll, op)?);
        let rows = b * nkv * rep * s;
        let mut dot = gpu::output::<f32>(&dev, rows)?;
        let mut dq = gpu::output::<T>(&dev, rows * hd)?;
        let mut dk = gpu::output::<T>(&dev, b * nkv * keys * hd)?;
        let mut dv = gpu::output::<T>(&dev, b * nkv * keys * hd)?;
        let [bi, nkvi, repi, si, keysi] = [b, nkv, rep, s, keys].map(|x| x as i32);
        // dQ (and each row's dO·O, which the dK/dV kernel reads), then dK and dV.
        let cfg = flash_launch(b * nkv * rep * s.div_ceil(FLASH_ROWS));
        launch!(dev, &format!("flash_bwd_dq_hd{hd}"), T::DTYPE, cfg, &qv, &kv, &vv, &ov, &gv, &lv, &mut dot, &mut dq, &bi, &nkvi, &repi, &si, &keysi, &scale);
        let cfg = flash_launch(b * nkv * keys.div_ceil(FLASH_ROWS));
        launch!(dev, &format!("flash_bwd_dkv_hd{hd}"), T::DTYPE, cfg, &qv, &kv, &vv, &gv, &lv, &dot, &mut dk, &mut dv, &bi, &nkvi, &repi, &si, &keysi, &scale);
        (dev, dq, dk, dv)
    };
    Ok((filled(dq, &dev, (b, nkv, rep * s, hd), &q)?, filled(dk, &dev, (b, nkv, keys, hd), &q)?, filled(dv, &dev, (b, nkv, keys, hd), &q)?))
}

// ---------------------------------------------------------------------------------------------
// Products summed in one buffer (cuBLAS's beta)
// ---------------------------------------------------------------------------------------------

/// `C = alpha·op(A)·op(B) + beta·C` by cuBLAS (f32 accumulation, one rounding) for row-major
/// contiguous operands: C (m, n); A (m, k), or held as (k, m) when `ta`; B (k, n), or held as
/// (n, k) when `tb`.
#[cfg(feature = "cuda")]
#[allow(clippy::too_many_arguments)]
fn gemm_cuda<T: gpu::Elem>(
    dev: &candle_core::CudaDevice,
    c: &mut candle_core::cuda_backend::cudarc::driver::CudaViewMut<T>,
    (m, n, k): (usize, usize, usize),
    (a, ta): (&candle_core::cuda_backend::cudarc::driver::CudaView<T>, bool),
    (b, tb): (&candle_core::cuda_backend::cudarc::driver::CudaView<T>, bool),
    alpha: f32,
    beta: f32,
) -> CResult<()> {
    use candle_core::cuda_backend::cudarc::cublas::{result, sys};
    use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut};
    let data = match T::DTYPE {
        DType::F32 => sys::cudaDataType_t::CUDA_R_32F,
        DType::BF16 => sys::cudaDataType_t::CUDA_R_16BF,
        DType::F16 => sys::cudaDataType_t::CUDA_R_16F,
        other => candle_core::bail!("gemm: f32, bf16 or f16 expected, got {other:?}"),
    };
    if a.len() < m * k || b.len() < k * n || c.len() < m * n {
        candle_core::bail!("gemm: ({m}, {k})·({k}, {n}) from {} and {} values into {}", a.len(), b.len(), c.len());
    }
    let dim = |v: usize| i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("gemm: dimension {v} too large")));
    let op = |t: bool| if t { sys::cublasOperation_t::CUBLAS_OP_T } else { sys::cublasOperation_t::CUBLAS_OP_N };
    // cuBLAS is column-major, where a row-major (r, c) matrix reads as its (c, r) transpose:
    // C's rows come out as Cᵀ = op(B)ᵀ·op(A)ᵀ, B's buffer first.
    let (lda, ldb) = (if tb { k } else { n }, if ta { m } else { k });
    let blas = dev.cublas_handle();
    let stream = dev.cuda_stream();
    let (bp, _b_guard) = b.device_ptr(&stream);
    let (ap, _a_guard) = a.device_ptr(&stream);
    let (cp, _c_guard) = c.device_ptr_mut(&stream);
    // SAFETY: the three buffers hold at least the values the product reads and writes (checked
    // above), in the dtype named, and the handle queues on the stream the guards record.
    unsafe {
        result::gemm_ex(
            *blas.handle(),
            op(tb),
            op(ta),
            dim(n)?,
            dim(m)?,
            dim(k)?,
            (&alpha as *const f32).cast(),
            bp as *const _,
            data,
            dim(lda)?,
            ap as *const _,
            data,
            dim(ldb)?,
            (&beta as *const f32).cast(),
            cp as *mut _,
            data,
            dim(n)?,
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(|e| candle_core::Error::Msg(format!("gemm: cublas: {e:?}")))
}

/// `f` on a contiguous tensor's values on the device.
#[cfg(feature = "cuda")]
fn on_cuda_view<T: gpu::Elem, R>(t: &Tensor, f: impl FnOnce(&candle_core::cuda_backend::cudarc::driver::CudaView<T>) -> CResult<R>) -> CResult<R> {
    super::ops::on_storage(t, super::ops::cuda_storage, "cuda", "gemm: operand", |s, l| f(&gpu::view::<T>(s, l, "gemm")?))
}

/// Whether `t` is a contiguous tensor of `dims` in `dtype`.
#[cfg(feature = "cuda")]
fn plain(t: &Tensor, dims: &[usize], dtype: DType) -> bool {
    t.is_contiguous() && t.dims() == dims && t.dtype() == dtype && t.device().is_cuda()
}

/// `init + x·Wᵀ + s·xa·Bᵀ` as (m, n) rows on the device, LoRA's training product, with both
/// products summed in the output buffer (cuBLAS's beta): the low-rank term and the sum are no
/// tensors of their own, which saves three passes over the output and one (m, n) buffer.
/// `x` (…, k) and B (n, r) are the op's operands; W (n, k) and x̃·Aᵀ (m, r) tensors in x's
/// dtype; `init` (a layout that reads as (m, n): the frozen bias broadcast, or the residual
/// stream) is copied in first. None where an operand is not contiguous or not in x's dtype
/// (the caller then takes candle's products).
#[cfg(feature = "cuda")]
#[allow(clippy::too_many_arguments)]
pub fn lora_rows_cuda(x: &Cs, xl: &Layout, b: &Cs, bl: &Layout, w: &Tensor, xa: &Tensor, scale: f64, init: Option<(&Cs, &Layout)>) -> CResult<Option<Cs>> {
    if !matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16) {
        return Ok(None);
    }
    by_dtype!(x.dtype(), lora_rows_typed(x, xl, b, bl, w, xa, scale, init))
}

#[cfg(feature = "cuda")]
#[allow(clippy::too_many_arguments)]
fn lora_rows_typed<T: gpu::Elem>(x: &Cs, xl: &Layout, b: &Cs, bl: &Layout, w: &Tensor, xa: &Tensor, scale: f64, init: Option<(&Cs, &Layout)>) -> CResult<Option<Cs>> {
    let op = "lora-product";
    let (n, r) = bl.shape().dims2()?;
    let k = xl.shape().dims().last().copied().unwrap_or(0);
    let m = if k == 0 { 0 } else { xl.shape().elem_count() / k };
    let fits = xl.is_contiguous() && bl.is_contiguous() && b.dtype() == T::DTYPE && plain(w, &[n, k], T::DTYPE) && plain(xa, &[m, r], T::DTYPE);
    if !fits || m * n * k * r == 0 || init.is_some_and(|(s, l)| s.dtype() != T::DTYPE || l.shape().dims() != [m, n]) {
        return Ok(None);
    }
    let dev = gpu::device(x);
    let mut out = Cs::wrap_cuda_slice(gpu::output::<T>(&dev, m * n)?, dev.clone());
    if let Some((s, l)) = init {
        s.copy_strided_src(&mut out, 0, l)?;
    }
    let (xv, bv) = (gpu::view::<T>(x, xl, op)?, gpu::view::<T>(b, bl, op)?);
    {
        let mut cv = out.as_cuda_slice_mut::<T>()?.slice_mut(0..m * n);
        let beta = if init.is_some() { 1.0 } else { 0.0 };
        on_cuda_view::<T, _>(w, |wv| gemm_cuda(&dev, &mut cv, (m, n, k), (&xv, false), (wv, true), 1.0, beta))?;
        on_cuda_view::<T, _>(xa, |xav| gemm_cuda(&dev, &mut cv, (m, n, r), (xav, false), (&bv, true), scale as f32, 1.0))?;
    }
    Ok(Some(out))
}

/// `dY·W + d·A` (m, k) on the device, LoRA's input gradient (`d` = s·dY·B, (m, r); W (n, k),
/// A (r, k)), the second product summed into the first's buffer. A CustomOp2 on (dY, d),
/// without a backward, for CUDA tensors only (the CPU's backward sums its products itself).
#[cfg(feature = "cuda")]
pub struct ProductSum {
    /// The frozen weight W (n, k), contiguous in dY's dtype.
    pub w: Tensor,
    /// LoRA's A (r, k), likewise.
    pub a: Tensor,
}

#[cfg(feature = "cuda")]
impl candle_core::CustomOp2 for ProductSum {
    fn name(&self) -> &'static str {
        "lora-input-grad"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> CResult<(CpuStorage, Shape)> {
        candle_core::bail!("lora-input-grad: a cuda op")
    }

    fn cuda_fwd(&self, g: &Cs, gl: &Layout, d: &Cs, dl: &Layout) -> CResult<(Cs, Shape)> {
        let storage = by_dtype!(g.dtype(), product_sum_cuda(self, g, gl, d, dl))?;
        Ok((storage, Shape::from((gl.shape().dims2()?.0, self.w.dim(1)?))))
    }
}

#[cfg(feature = "cuda")]
fn product_sum_cuda<T: gpu::Elem>(o: &ProductSum, g: &Cs, gl: &Layout, d: &Cs, dl: &Layout) -> CResult<Cs> {
    let op = "lora-input-grad";
    let ((m, n), (md, r), (nw, k)) = (gl.shape().dims2()?, dl.shape().dims2()?, o.w.dims2()?);
    if md != m || nw != n || o.a.dims() != [r, k] || m * n * k * r == 0 {
        candle_core::bail!("{op}: dY {:?}, d {:?}, W {:?}, A {:?} do not fit", gl.shape(), dl.shape(), o.w.shape(), o.a.shape());
    }
    if !(plain(&o.w, &[n, k], T::DTYPE) && plain(&o.a, &[r, k], T::DTYPE)) {
        candle_core::bail!("{op}: W and A must be contiguous in dY's dtype");
    }
    let dev = gpu::device(g);
    let mut out = gpu::output::<T>(&dev, m * k)?;
    let (gv, dv) = (gpu::view::<T>(g, gl, op)?, gpu::view::<T>(d, dl, op)?);
    {
        let mut cv = out.slice_mut(0..m * k);
        on_cuda_view::<T, _>(&o.w, |wv| gemm_cuda(&dev, &mut cv, (m, k, n), (&gv, false), (wv, false), 1.0, 0.0))?;
        on_cuda_view::<T, _>(&o.a, |av| gemm_cuda(&dev, &mut cv, (m, k, r), (&dv, false), (av, false), 1.0, 1.0))?;
    }
    Ok(Cs::wrap_cuda_slice(out, dev))
}
