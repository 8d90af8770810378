//! Gradient checks of the training ops on any device: each op runs on the device in each
//! dtype, on random inputs, and its value and input gradients (for a random cotangent) are held
//! to the composed reference computed on the CPU in f64 from the same inputs. What
//! `tests/gradients.rs` runs on the CPU and `tunebench check-ops --device cuda:0` runs on a
//! GPU (`bench/gpu_session.sh`), so the kernels a GPU takes (our fused kernels of
//! `kernels/fused.cu`, candle's fused forward with our backward, the blocked attention and
//! (head_dim 64, 128 in 16 bits) the flash kernels, the chunked loss, the frozen product with
//! a weight held as quantized blocks, full fine-tuning's trained product and norms, LoRA on the
//! LM head) are checked where they run. On the CPU every op runs a second time with the fused
//! ops forced ([`super::fused::forced`]): their CPU twins and the ops' wiring to them.

use candle_core::{DType, Device, Tensor, Var};
use serde::Serialize;

use super::{fused, ops};
use crate::Result;

/// One op in one dtype: the worst relative errors (max |a − b| over max |b|) of the value and
/// of the input gradients, and the limit both must meet.
#[derive(Clone, Debug, Serialize)]
pub struct OpCheck {
    /// The op and its case.
    pub op: String,
    /// The dtype it ran in on the device.
    pub dtype: String,
    /// Relative error of the value.
    pub forward: f64,
    /// Worst relative error of the input gradients.
    pub gradient: f64,
    /// The limit for this dtype.
    pub limit: f64,
}

impl OpCheck {
    /// Both errors within the limit (and finite).
    pub fn ok(&self) -> bool {
        self.forward <= self.limit && self.gradient <= self.limit
    }
}

/// Relative-error limits per dtype: f32 rounding over a few hundred terms, and 16-bit
/// inputs and activations (bf16 keeps 8 bits of mantissa, f16 11).
pub fn limit(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => 1e-10,
        DType::F32 => 1e-4,
        DType::F16 => 1e-2,
        _ => 3e-2,
    }
}

fn random(shape: &[usize], seed: u64) -> Result<Tensor> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.random::<f64>() * 2.0 - 1.0).collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

fn max_rel(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = a.to_device(&Device::Cpu)?.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let b = b.to_device(&Device::Cpu)?.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-12);
    let worst = a.iter().zip(&b).fold(0f64, |m, (x, y)| if (x - y).is_nan() { f64::INFINITY } else { m.max((x - y).abs()) });
    Ok(worst / scale)
}

type OpFn<'a> = &'a dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>;

/// Runs `op` on `inputs` moved to `device` in `dtype` (forward and backward inside
/// [`fused::forced`] when `force_fused`) and `reference` on them in f64 on the CPU; compares
/// values and the gradients of every input.
fn check(name: &str, force_fused: bool, device: &Device, dtype: DType, inputs: &[Tensor], op: OpFn, reference: OpFn) -> Result<OpCheck> {
    let run = |dev: &Device, dt: DType, f: OpFn| -> Result<(Tensor, Vec<Tensor>)> {
        let vars = inputs.iter().map(|t| Var::from_tensor(&t.to_dtype(dt)?.to_device(dev)?)).collect::<candle_core::Result<Vec<_>>>()?;
        let xs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let y = f(&xs)?;
        let cot = random(y.dims(), 977)?.to_dtype(y.dtype())?.to_device(dev)?;
        let grads = (y.to_dtype(DType::F64)? * cot.to_dtype(DType::F64)?)?.sum_all()?.backward()?;
        let g = xs.iter().map(|x| grads.get(x).cloned().unwrap_or(x.zeros_like()?).to_dtype(DType::F64)).collect::<candle_core::Result<Vec<_>>>()?;
        Ok((y, g))
    };
    let (y, g) = if force_fused { fused::forced(|| run(device, dtype, op))? } else { run(device, dtype, op)? };
    let (ry, rg) = run(&Device::Cpu, DType::F64, reference)?;
    let mut gradient = 0f64;
    for (a, b) in g.iter().zip(&rg) {
        gradient = gradient.max(max_rel(a, b)?);
    }
    let name = if force_fused { format!("{name} [fused, forced]") } else { name.to_string() };
    Ok(OpCheck { op: name, dtype: format!("{dtype:?}").to_lowercase(), forward: max_rel(&y, &ry)?, gradient, limit: limit(dtype) })
}

/// Every training op in f32, bf16 and f16 on `device` (on a CUDA device, through our fused
/// kernels unless `TUNEBENCH_FUSED_KERNELS=0`); on the CPU, then again with the fused ops'
/// CPU twins forced. The inputs and constants are rounded to the dtype first, so the
/// reference sees exactly what the device does and the error is the op's own.
pub fn run(device: &Device) -> Result<Vec<OpCheck>> {
    let mut out = run_pass(device, false)?;
    if device.is_cpu() {
        out.extend(run_pass(device, true)?);
    }
    Ok(out)
}

fn run_pass(device: &Device, force_fused: bool) -> Result<Vec<OpCheck>> {
    let mut out = Vec::new();
    let check = |name: &str, device: &Device, dtype: DType, inputs: &[Tensor], op: OpFn, reference: OpFn| check(name, force_fused, device, dtype, inputs, op, reference);
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let random = |shape: &[usize], seed: u64| -> Result<Tensor> { Ok(random(shape, seed)?.to_dtype(dtype)?.to_dtype(DType::F64)?) };
        let x = random(&[3, 5, 64], 1)?;
        let w = (random(&[64], 2)? + 1.0)?.to_dtype(dtype)?.to_dtype(DType::F64)?;
        out.push(check(
            "rms_norm",
            device,
            dtype,
            &[x.clone()],
            &|t| ops::rms_norm(&t[0], &w.to_dtype(t[0].dtype())?.to_device(t[0].device())?, 1e-5),
            &|t| ops::rms_norm_composed(&t[0], &w, 1e-5),
        )?);
        // Full fine-tuning's norms: the weight trained too.
        out.push(check(
            "rms_norm trained weight",
            device,
            dtype,
            &[x.clone(), w.clone()],
            &|t| ops::rms_norm(&t[0], &t[1], 1e-5),
            &|t| ops::rms_norm_composed(&t[0], &t[1], 1e-5),
        )?);
        let (cos, sin) = (random(&[7, 16], 3)?, random(&[7, 16], 4)?);
        out.push(check(
            "rope",
            device,
            dtype,
            &[random(&[2, 3, 7, 32], 5)?],
            &|t| ops::rope(&t[0], &cos.to_dtype(DType::F32)?.to_device(t[0].device())?, &sin.to_dtype(DType::F32)?.to_device(t[0].device())?),
            &|t| ops::rope_composed(&t[0], &cos, &sin),
        )?);
        // A projection's output split into 4 heads in 2 groups (grouped queries) and rotated.
        out.push(check(
            "split_heads",
            device,
            dtype,
            &[random(&[2, 7, 4 * 32], 11)?],
            &|t| ops::split_heads(&t[0], 4, 2, Some((&cos.to_dtype(DType::F32)?.to_device(t[0].device())?, &sin.to_dtype(DType::F32)?.to_device(t[0].device())?))),
            &|t| {
                let h = t[0].reshape((2, 7, 4, 32))?.transpose(1, 2)?.contiguous()?;
                ops::rope_composed(&h, &cos, &sin)?.reshape((2, 2, 2 * 7, 32))
            },
        )?);
        out.push(check(
            "swiglu",
            device,
            dtype,
            &[random(&[3, 5, 48], 6)?, random(&[3, 5, 48], 7)?],
            &|t| ops::swiglu(&t[0], &t[1]),
            &|t| ops::swiglu_composed(&t[0], &t[1]),
        )?);
        // Grouped queries (2 per KV head), earlier keys (a prefix), several blocks.
        for (s, keys, block) in [(24, 24, 24), (24, 24, 7), (20, 26, 8)] {
            let (b, nkv, rep, hd) = (2, 2, 2, 32);
            out.push(check(
                &format!("causal_attention s={s} keys={keys} block={block}"),
                device,
                dtype,
                &[random(&[b, nkv, rep * s, hd], 8)?, random(&[b, nkv, keys, hd], 9)?, random(&[b, nkv, keys, hd], 10)?],
                &|t| ops::causal_attention_blocked(&t[0], &t[1], &t[2], s, 0.18, block),
                &|t| ops::causal_attention_composed(&t[0], &t[1], &t[2], s, 0.18),
            )?);
        }
        // The head sizes the flash kernels take on a GPU in f16/bf16 (64 and 128): two query
        // tiles (the second partial), keys ahead of the queries, two query heads per KV head.
        for hd in [64, 128] {
            let (b, nkv, rep, s, keys) = (1, 2, 2, 70, 75);
            let scale = 1.0 / (hd as f64).sqrt();
            out.push(check(
                &format!("causal_attention hd={hd} s={s} keys={keys}"),
                device,
                dtype,
                &[random(&[b, nkv, rep * s, hd], 20)?, random(&[b, nkv, keys, hd], 21)?, random(&[b, nkv, keys, hd], 22)?],
                &|t| ops::causal_attention(&t[0], &t[1], &t[2], s, scale),
                &|t| ops::causal_attention_composed(&t[0], &t[1], &t[2], s, scale),
            )?);
        }
        // A frozen weight held as quantized blocks (QLoRA's base): dequantized for the product
        // and again for the input gradient (on a GPU by our dequant kernels) against the
        // product with candle's CPU dequantization of the same blocks.
        {
            use candle_core::quantized::{GgmlDType, QTensor};
            let w = random(&[48, 256], 13)?.to_dtype(DType::F32)?;
            for ty in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0, GgmlDType::Q4K] {
                let q = std::sync::Arc::new(if device.is_cpu() { QTensor::quantize(&w, ty)? } else { QTensor::quantize_onto(&w, ty, device)? });
                let dense = q.dequantize(&Device::Cpu)?.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
                out.push(check(
                    &format!("frozen_linear_blocks {ty:?}"),
                    device,
                    dtype,
                    &[random(&[3, 5, 256], 14)?],
                    &|t| ops::frozen_linear_blocks(&t[0], &q),
                    &|t| t[0].broadcast_matmul(&dense.t()?),
                )?);
            }
        }
        // Full fine-tuning's product: the weight trained, both gradients.
        out.push(check(
            "trained_linear",
            device,
            dtype,
            &[random(&[3, 5, 64], 25)?, random(&[48, 64], 26)?],
            &|t| ops::trained_linear(&t[0], &t[1]),
            &|t| t[0].broadcast_matmul(&t[1].t()?),
        )?);
        // LoRA beside the frozen product (one op, its backward ours), with and without dropout
        // on the update's input, the weight dense and as Q4_1 blocks (QLoRA). DoRA's product:
        // without dropout its magnitude scale g inside LoRA's op, the unscaled product read
        // back from the output; with dropout (PEFT's form, the base product not dropped) its
        // own node. One g_j is 0 (without dropout, that column's gradient is computed again
        // from the operands). Then the projections whose op ends by moving its output into
        // per-head blocks (q with RoPE in 4 heads of 12 in 2 groups, v in 4 groups without),
        // against the product followed by the composed split, and those whose op ends by
        // adding the residual stream.
        {
            use super::FrozenWeight;
            let w = random(&[48, 64], 15)?;
            let w32 = w.to_dtype(DType::F32)?;
            let q = candle_core::quantized::QTensor::quantize(&w32, candle_core::quantized::GgmlDType::Q4_1)?;
            let q_dense = q.dequantize(&Device::Cpu)?.to_dtype(DType::F64)?;
            let q = if device.is_cpu() { q } else { candle_core::quantized::QTensor::quantize_onto(&w32, candle_core::quantized::GgmlDType::Q4_1, device)? };
            let blocks = FrozenWeight::quantized(q)?;
            let bias = random(&[48], 19)?;
            let mut g = random(&[48], 34)?.affine(0.5, 1.0)?.to_vec1::<f64>()?;
            g[5] = 0.0;
            let g = Tensor::from_vec(g, 48, &Device::Cpu)?;
            // The weight on the op's device in its dtype, or the blocks; and the reference's.
            let weight_for = |held: Option<&FrozenWeight>, like: &Tensor| -> candle_core::Result<FrozenWeight> {
                Ok(match held {
                    Some(b) => b.clone(),
                    None => FrozenWeight::Dense(w.to_dtype(like.dtype())?.to_device(like.device())?),
                })
            };
            let reference_of = |held: Option<&FrozenWeight>| if held.is_some() { &q_dense } else { &w };
            let on = |t: &Tensor, like: &Tensor| t.to_dtype(like.dtype())?.to_device(like.device());
            for (case, dropout, held, with_bias) in [
                ("dense", None, None, false),
                ("dense + bias, dropout 0.25", Some((0.25, 77)), None, true),
                ("Q4_1 blocks, dropout 0.25", Some((0.25, 78)), Some(&blocks), false),
            ] {
                out.push(check(
                    &format!("lora_linear {case}"),
                    device,
                    dtype,
                    &[random(&[3, 5, 64], 16)?, random(&[8, 64], 17)?, random(&[48, 8], 18)?],
                    &|t| {
                        let b = if with_bias { Some(on(&bias, &t[0])?) } else { None };
                        ops::lora_linear(&t[0], &weight_for(held, &t[0])?, b.as_ref(), ops::LoraPair { a: &t[1], b: &t[2], scale: 2.0, dropout })
                    },
                    &|t| ops::lora_linear_composed(&t[0], reference_of(held), with_bias.then_some(&bias), ops::LoraPair { a: &t[1], b: &t[2], scale: 2.0, dropout }),
                )?);
            }
            for (case, dropout, held) in [("", None, None), (" dropout 0.25", Some((0.25, 79)), None), (" Q4_1 blocks, dropout 0.25", Some((0.25, 80)), Some(&blocks))] {
                out.push(check(
                    &format!("lora_linear_scaled{case}"),
                    device,
                    dtype,
                    &[random(&[3, 5, 64], 16)?, random(&[8, 64], 17)?, random(&[48, 8], 18)?, g.clone()],
                    &|t| ops::lora_linear_scaled(&t[0], &weight_for(held, &t[0])?, ops::LoraPair { a: &t[1], b: &t[2], scale: 2.0, dropout }, &t[3]),
                    &|t| ops::lora_linear_scaled_composed(&t[0], reference_of(held), ops::LoraPair { a: &t[1], b: &t[2], scale: 2.0, dropout }, &t[3]),
                )?);
            }
            // RoPE's tables as a rotation (cos² + sin² = 1): DoRA's backward reads its output
            // back through the move the other way, the rotation's transpose.
            let angles = (random(&[7, 6], 37)? * std::f64::consts::PI)?;
            let (cos, sin) = (angles.cos()?, angles.sin()?);
            // (heads, groups, RoPE): q's split and v's.
            for (heads, groups, rotated) in [(4, 2, true), (4, 4, false)] {
                let split_on = |like: &Tensor| -> candle_core::Result<(Tensor, Tensor)> { Ok((cos.to_dtype(DType::F32)?.to_device(like.device())?, sin.to_dtype(DType::F32)?.to_device(like.device())?)) };
                let split_ref = |y: &Tensor| ops::split_heads_composed(y, heads, groups, rotated.then_some((&cos, &sin)));
                let shape = format!("{heads} heads in {groups} groups{}", if rotated { ", RoPE" } else { "" });
                let held = if rotated { None } else { Some(&blocks) };
                let weight = if rotated { "dense + bias" } else { "Q4_1 blocks" };
                let x = random(&[2, 7, 64], 39)?;
                out.push(check(
                    &format!("frozen_linear_heads {weight}, {shape}"),
                    device,
                    dtype,
                    std::slice::from_ref(&x),
                    &|t| {
                        let (c, s) = split_on(&t[0])?;
                        let b = if rotated { Some(on(&bias, &t[0])?) } else { None };
                        ops::frozen_linear_heads(&t[0], &weight_for(held, &t[0])?, b.as_ref(), ops::HeadSplit { heads, groups, rope: rotated.then_some((&c, &s)) })
                    },
                    &|t| {
                        let y = t[0].broadcast_matmul(&reference_of(held).t()?)?;
                        split_ref(&if rotated { y.broadcast_add(&bias)? } else { y })
                    },
                )?);
                let dropout = Some((0.25, 81));
                out.push(check(
                    &format!("lora_linear_heads {weight}, dropout 0.25, {shape}"),
                    device,
                    dtype,
                    &[x.clone(), random(&[8, 64], 17)?, random(&[48, 8], 18)?],
                    &|t| {
                        let (c, s) = split_on(&t[0])?;
                        let b = if rotated { Some(on(&bias, &t[0])?) } else { None };
                        let split = ops::HeadSplit { heads, groups, rope: rotated.then_some((&c, &s)) };
                        ops::lora_linear_heads(&t[0], &weight_for(held, &t[0])?, b.as_ref(), ops::LoraPair { a: &t[1], b: &t[2], scale: 2.0, dropout }, split)
                    },
                    &|t| split_ref(&ops::lora_linear_composed(&t[0], reference_of(held), rotated.then_some(&bias), ops::LoraPair { a: &t[1], b: &t[2], scale: 2.0, dropout })?),
                )?);
                // DoRA: without dropout (LoRA's op with g as a column) on the dense weight,
                // with dropout (its own node) on the blocks.
                let dropout = if rotated { None } else { Some((0.25, 82)) };
                out.push(check(
                    &format!("lora_linear_scaled_heads {weight}{}, {shape}", if rotated { "" } else { ", dropout 0.25" }).replace(" + bias", ""),
                    device,
                    dtype,
                    &[x.clone(), random(&[8, 64], 17)?, random(&[48, 8], 18)?, g.clone()],
                    &|t| {
                        let (c, s) = split_on(&t[0])?;
                        let split = ops::HeadSplit { heads, groups, rope: rotated.then_some((&c, &s)) };
                        ops::lora_linear_scaled_heads(&t[0], &weight_for(held, &t[0])?, ops::LoraPair { a: &t[1], b: &t[2], scale: 2.0, dropout }, &t[3], split)
                    },
                    &|t| split_ref(&ops::lora_linear_scaled_composed(&t[0], reference_of(held), ops::LoraPair { a: &t[1], b: &t[2], scale: 2.0, dropout }, &t[3])?),
                )?);
            }
            // The projections whose op ends by adding the residual stream (o_proj, down_proj),
            // the residual's gradient the output's.
            for held in [None, Some(&blocks)] {
                let weight = if held.is_some() { "Q4_1 blocks" } else { "dense + bias" };
                let with_bias = held.is_none();
                let (x, residual) = (random(&[2, 7, 64], 40)?, random(&[2, 7, 48], 41)?);
                out.push(check(
                    &format!("frozen_linear_residual {weight}"),
                    device,
                    dtype,
                    &[x.clone(), residual.clone()],
                    &|t| {
                        let b = if with_bias { Some(on(&bias, &t[0])?) } else { None };
                        ops::frozen_linear_residual(&t[0], &weight_for(held, &t[0])?, b.as_ref(), &t[1])
                    },
                    &|t| {
                        let y = t[0].broadcast_matmul(&reference_of(held).t()?)?;
                        &t[1] + if with_bias { y.broadcast_add(&bias)? } else { y }
                    },
                )?);
                let dropout = Some((0.25, 83));
                out.push(check(
                    &format!("lora_linear_residual {weight}, dropout 0.25"),
                    device,
                    dtype,
                    &[x.clone(), random(&[8, 64], 17)?, random(&[48, 8], 18)?, residual.clone()],
                    &|t| {
                        let b = if with_bias { Some(on(&bias, &t[0])?) } else { None };
                        ops::lora_linear_residual(&t[0], &weight_for(held, &t[0])?, b.as_ref(), ops::LoraPair { a: &t[1], b: &t[2], scale: 2.0, dropout }, &t[3])
                    },
                    &|t| &t[3] + ops::lora_linear_composed(&t[0], reference_of(held), with_bias.then_some(&bias), ops::LoraPair { a: &t[1], b: &t[2], scale: 2.0, dropout })?,
                )?);
                // down_proj: SwiGLU's product made inside the op from the gate's and up's
                // outputs (g, u), its gradient going on to both.
                let (gate, up) = (random(&[2, 7, 64], 42)?, random(&[2, 7, 64], 43)?);
                out.push(check(
                    &format!("frozen_linear_swiglu_residual {weight}"),
                    device,
                    dtype,
                    &[gate.clone(), up.clone(), residual.clone()],
                    &|t| {
                        let b = if with_bias { Some(on(&bias, &t[0])?) } else { None };
                        ops::frozen_linear_swiglu_residual(&t[0], &t[1], &weight_for(held, &t[0])?, b.as_ref(), &t[2])
                    },
                    &|t| {
                        let y = ops::swiglu_composed(&t[0], &t[1])?.broadcast_matmul(&reference_of(held).t()?)?;
                        &t[2] + if with_bias { y.broadcast_add(&bias)? } else { y }
                    },
                )?);
                let dropout = Some((0.25, 84));
                out.push(check(
                    &format!("lora_linear_swiglu {weight}, dropout 0.25"),
                    device,
                    dtype,
                    &[gate.clone(), up.clone(), random(&[8, 64], 17)?, random(&[48, 8], 18)?],
                    &|t| {
                        let b = if with_bias { Some(on(&bias, &t[0])?) } else { None };
                        ops::lora_linear_swiglu(&t[0], &t[1], &weight_for(held, &t[0])?, b.as_ref(), ops::LoraPair { a: &t[2], b: &t[3], scale: 2.0, dropout })
                    },
                    &|t| {
                        let act = ops::swiglu_composed(&t[0], &t[1])?;
                        ops::lora_linear_composed(&act, reference_of(held), with_bias.then_some(&bias), ops::LoraPair { a: &t[2], b: &t[3], scale: 2.0, dropout })
                    },
                )?);
                // … adding the residual too: u and the residual go in through a joint node.
                out.push(check(
                    &format!("lora_linear_swiglu_residual {weight}, dropout 0.25"),
                    device,
                    dtype,
                    &[gate.clone(), up.clone(), random(&[8, 64], 17)?, random(&[48, 8], 18)?, residual.clone()],
                    &|t| {
                        let b = if with_bias { Some(on(&bias, &t[0])?) } else { None };
                        ops::lora_linear_swiglu_residual(&t[0], &t[1], &weight_for(held, &t[0])?, b.as_ref(), ops::LoraPair { a: &t[2], b: &t[3], scale: 2.0, dropout }, &t[4])
                    },
                    &|t| {
                        let act = ops::swiglu_composed(&t[0], &t[1])?;
                        &t[4] + ops::lora_linear_composed(&act, reference_of(held), with_bias.then_some(&bias), ops::LoraPair { a: &t[2], b: &t[3], scale: 2.0, dropout })?
                    },
                )?);
                // DoRA's down_proj (without dropout: its scale as the op's column scale), the
                // residual added after the op.
                out.push(check(
                    &format!("lora_linear_scaled_swiglu {weight}").replace(" + bias", ""),
                    device,
                    dtype,
                    &[gate.clone(), up.clone(), random(&[8, 64], 17)?, random(&[48, 8], 18)?, g.clone()],
                    &|t| ops::lora_linear_scaled_swiglu(&t[0], &t[1], &weight_for(held, &t[0])?, ops::LoraPair { a: &t[2], b: &t[3], scale: 2.0, dropout: None }, &t[4]),
                    &|t| ops::lora_linear_scaled_composed(&ops::swiglu_composed(&t[0], &t[1])?, reference_of(held), ops::LoraPair { a: &t[2], b: &t[3], scale: 2.0, dropout: None }, &t[4]),
                )?);
            }
        }
        // DoRA's row norms ‖W + s·B·A‖_row without the formed matrix, against the formed one;
        // the gradients of A and B from the op's closed-form backward.
        {
            let w = random(&[48, 64], 15)?;
            let w2 = w.sqr()?.sum(1)?;
            out.push(check(
                "dora_row_norm",
                device,
                dtype,
                &[random(&[8, 64], 35)?, random(&[48, 8], 36)?],
                &|t| {
                    let dense = super::FrozenWeight::Dense(w.to_dtype(t[0].dtype())?.to_device(t[0].device())?);
                    ops::dora_row_norm(&t[0], &t[1], &dense, &w2.to_dtype(DType::F32)?.to_device(t[0].device())?, 2.0)
                },
                &|t| ops::dora_row_norm_composed(&t[0], &t[1], &w, 2.0),
            )?);
        }
        let targets: Vec<u32> = (0..9u32).map(|i| (i * 37 + 5) % 300).collect();
        let head = random(&[300, 64], 11)?;
        out.push(check(
            "linear_cross_entropy_chunked",
            device,
            dtype,
            &[random(&[9, 64], 12)?],
            &|t| ops::linear_cross_entropy_chunked(&t[0], &head.to_dtype(t[0].dtype())?.to_device(t[0].device())?, &targets, 4),
            &|t| ops::cross_entropy_rows(&t[0].matmul(&head.t()?)?, &targets),
        )?);
        // A head whose weight trains (full fine-tuning): the summed loss, with the weight's
        // gradient (accumulated over three chunks, the last one short) as well as the rows'.
        out.push(check(
            "linear_cross_entropy_trained_sum",
            device,
            dtype,
            &[random(&[9, 64], 12)?, random(&[300, 64], 11)?],
            &|t| ops::linear_cross_entropy_trained_sum(&t[0], &t[1], &targets, 4),
            &|t| ops::cross_entropy_rows(&t[0].matmul(&t[1].t()?)?, &targets)?.sum_all(),
        )?);
        // LoRA on the head: the summed loss with the gradients of the rows, the update's
        // (separate) input and the pair (three chunks, the last one short).
        out.push(check(
            "linear_cross_entropy_lora_sum",
            device,
            dtype,
            &[random(&[9, 64], 12)?, random(&[9, 64], 27)?, random(&[4, 64], 28)?, random(&[300, 4], 29)?],
            &|t| {
                let pair = ops::HeadPair { input: &t[1], a: &t[2], b: &t[3], scale: 2.0 };
                ops::linear_cross_entropy_lora_sum(&t[0], &head.to_dtype(t[0].dtype())?.to_device(t[0].device())?, pair, &targets, 4)
            },
            &|t| {
                let logits = (t[0].matmul(&head.t()?)? + (t[1].matmul(&t[2].t()?)?.matmul(&t[3].t()?)? * 2.0)?)?;
                ops::cross_entropy_rows(&logits, &targets)?.sum_all()
            },
        )?);
        // IA3 and BitFit on the head: the summed loss of `(h·Wᵀ + shift) ⊙ scale`, with the
        // gradients of the rows and of the scale and shift (three chunks, the last one short);
        // the shift alone is BitFit's.
        for (case, scaled) in [("scale + shift", true), ("shift", false)] {
            let mut inputs = vec![random(&[9, 64], 12)?, random(&[300], 33)?];
            if scaled {
                inputs.push(random(&[300, 1], 32)?.affine(0.5, 1.0)?);
            }
            out.push(check(
                &format!("linear_cross_entropy_affine_sum {case}"),
                device,
                dtype,
                &inputs,
                &|t| {
                    let affine = ops::HeadAffine { scale: t.get(2), shift: Some(&t[1]) };
                    ops::linear_cross_entropy_affine_sum(&t[0], &head.to_dtype(t[0].dtype())?.to_device(t[0].device())?, affine, &targets, 4)
                },
                &|t| {
                    let y = t[0].matmul(&head.t()?)?.broadcast_add(&t[1])?;
                    let z = match t.get(2) {
                        Some(l) => y.broadcast_mul(&l.t()?)?,
                        None => y,
                    };
                    ops::cross_entropy_rows(&z, &targets)?.sum_all()
                },
            )?);
        }
        // The summed cross-entropy with its gradient made in the forward (an adapted LM head's
        // chunks).
        out.push(check(
            "cross_entropy_sum",
            device,
            dtype,
            &[(random(&[9, 300], 31)? * 3.0)?],
            &|t| ops::cross_entropy_sum(&t[0], &targets),
            &|t| ops::cross_entropy_rows(&t[0], &targets)?.sum_all(),
        )?);
        // IA3's scaling and BitFit's shift by a trained vector over the last dim.
        for (name, op, reference) in [
            ("channel_scale", ops::channel_scale as fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>, ops::channel_scale_composed as fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>),
            ("channel_shift", ops::channel_shift, ops::channel_shift_composed),
        ] {
            out.push(check(name, device, dtype, &[random(&[3, 70, 48], 23)?, random(&[48], 24)?], &|t| op(&t[0], &t[1]), &|t| reference(&t[0], &t[1]))?);
        }
    }
    Ok(out)
}
