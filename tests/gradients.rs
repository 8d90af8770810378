//! Gradient correctness of the fused training ops against their composed references (values
//! and input gradients). The PEFT methods' gradients (central finite differences, frozen base)
//! are checked for every method in `tests/peft_methods.rs`.

use candle_core::{DType, Device, Tensor, Var};
use tunebench::model::{fused, ops};

fn randn(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
}

fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let b = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-12);
    a.iter().zip(&b).fold(0f64, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// Forward value and input gradient of `f` against `reference`, for a random cotangent.
fn check_op(x: &Tensor, f: impl Fn(&Tensor) -> Tensor, reference: impl Fn(&Tensor) -> Tensor, tol: f64) {
    let xv = Var::from_tensor(x).unwrap();
    let y1 = f(xv.as_tensor());
    let y2 = reference(xv.as_tensor());
    assert!(max_rel(&y1, &y2) < tol, "forward differs: {}", max_rel(&y1, &y2));
    let cot = randn(y1.dims(), 99, y1.dtype());
    let g1 = (y1 * &cot).unwrap().sum_all().unwrap().backward().unwrap();
    let g2 = (y2 * &cot).unwrap().sum_all().unwrap().backward().unwrap();
    let (g1, g2) = (g1.get(xv.as_tensor()).unwrap(), g2.get(xv.as_tensor()).unwrap());
    assert!(max_rel(g1, g2) < tol, "gradient differs: {}", max_rel(g1, g2));
}

/// A two-input op in f32 against its reference in f64 on the same values: the value (to 1e-6)
/// and both inputs' gradients for the cotangent `cot` (to 1e-5, with their shapes).
fn check_two_inputs(case: &str, x: &Var, v: &Var, cot: &Tensor, op: impl Fn(&Tensor, &Tensor) -> Tensor, reference: impl Fn(&Tensor, &Tensor) -> Tensor) {
    let wide = |t: &Var| Var::from_tensor(&t.as_tensor().to_dtype(DType::F64).unwrap()).unwrap();
    let (x64, v64) = (wide(x), wide(v));
    let (y, yr) = (op(x.as_tensor(), v.as_tensor()), reference(x64.as_tensor(), v64.as_tensor()));
    assert_eq!(y.dims(), yr.dims(), "{case}: shape");
    assert!(max_rel(&y, &yr) < 1e-6, "{case}: forward off by {}", max_rel(&y, &yr));
    let g = (y * cot).unwrap().sum_all().unwrap().backward().unwrap();
    let gr = (yr * cot.to_dtype(DType::F64).unwrap()).unwrap().sum_all().unwrap().backward().unwrap();
    for (what, a, b) in [("x", g.get(x.as_tensor()).unwrap(), gr.get(x64.as_tensor()).unwrap()), ("v", g.get(v.as_tensor()).unwrap(), gr.get(v64.as_tensor()).unwrap())] {
        assert_eq!(a.dims(), b.dims(), "{case}: d{what}'s shape");
        assert!(max_rel(a, b) < 1e-5, "{case}: d{what} off by {}", max_rel(a, b));
    }
}

#[test]
fn fused_rms_norm_matches_composed() {
    let x = randn(&[3, 5, 16], 1, DType::F32);
    let w = (randn(&[16], 2, DType::F32) + 1.0).unwrap();
    check_op(&x, |x| ops::rms_norm(x, &w, 1e-5).unwrap(), |x| ops::rms_norm_composed(x, &w, 1e-5).unwrap(), 1e-5);
}

#[test]
fn fused_rope_matches_composed() {
    let x = randn(&[2, 3, 7, 8], 3, DType::F32);
    let cos = randn(&[7, 4], 4, DType::F32);
    let sin = randn(&[7, 4], 5, DType::F32);
    check_op(&x, |x| ops::rope(x, &cos, &sin).unwrap(), |x| ops::rope_composed(x, &cos, &sin).unwrap(), 1e-5);
}

/// Heads split out of a projection's (b, s, heads·hd) output, rotated or not, grouped for
/// grouped-query attention: one op against the reshape/transpose/RoPE chain it replaces.
#[test]
fn fused_split_heads_matches_composed() {
    let (b, s, hd) = (2, 5, 8);
    let cos = randn(&[s, hd / 2], 41, DType::F32);
    let sin = randn(&[s, hd / 2], 42, DType::F32);
    for (heads, groups, rotate) in [(6, 2, true), (2, 2, true), (3, 3, false), (4, 1, true)] {
        let x = randn(&[b, s, heads * hd], 43, DType::F32);
        let rope = rotate.then_some((&cos, &sin));
        let composed = |x: &Tensor| {
            let h = x.reshape((b, s, heads, hd)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap();
            let h = if rotate { ops::rope_composed(&h, &cos, &sin).unwrap() } else { h };
            h.reshape((b, groups, heads / groups * s, hd)).unwrap()
        };
        check_op(&x, |x| ops::split_heads(x, heads, groups, rope).unwrap(), composed, 1e-6);
    }
}

#[test]
fn fused_causal_softmax_matches_composed() {
    // Two heads stacked on the row axis (grouped-query layout), with and without a prefix of
    // cached keys (k_len > q_len).
    for (q, k) in [(6, 6), (3, 7)] {
        let x = randn(&[2, 2 * q, k], 6, DType::F32);
        check_op(
            &x,
            |x| ops::causal_softmax(x, q, 0.5).unwrap(),
            |x| ops::causal_softmax_composed(x, q, 0.5).unwrap(),
            1e-5,
        );
    }
}

#[test]
fn fused_swiglu_matches_composed() {
    let g = randn(&[3, 5, 24], 31, DType::F32);
    let u = randn(&[3, 5, 24], 32, DType::F32);
    // Gradient in the gate (u fixed) and in up (g fixed).
    check_op(&g, |g| ops::swiglu(g, &u).unwrap(), |g| ops::swiglu_composed(g, &u).unwrap(), 1e-5);
    check_op(&u, |u| ops::swiglu(&g, u).unwrap(), |u| ops::swiglu_composed(&g, u).unwrap(), 1e-5);
}

/// IA3's scaling and BitFit's shift: values and both gradients (the input's and the vector's)
/// against the broadcast ops in f64, over more rows than one of the kernel's blocks (150 rows
/// of 24 channels) and with IA3's (out, 1) vector shape.
#[test]
fn channel_scale_and_shift_match_composed() {
    type Op = fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>;
    let cases: [(&str, Op, Op, &[usize]); 3] = [
        ("scale", ops::channel_scale, ops::channel_scale_composed, &[24, 1]),
        ("scale", ops::channel_scale, ops::channel_scale_composed, &[1, 24]),
        ("shift", ops::channel_shift, ops::channel_shift_composed, &[24]),
    ];
    for (name, op, composed, vshape) in cases {
        let x = Var::from_tensor(&randn(&[3, 50, 24], 51, DType::F32)).unwrap();
        let v = Var::from_tensor(&(randn(vshape, 52, DType::F32) + 1.0).unwrap()).unwrap();
        let cot = randn(&[3, 50, 24], 53, DType::F32);
        check_two_inputs(&format!("{name} {vshape:?}"), &x, &v, &cot, |x, v| op(x, v).unwrap(), |x, v| composed(x, v).unwrap());
        // The vector's gradient is the same bits whatever the number of threads.
        let dv = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                let y = op(x.as_tensor(), v.as_tensor()).unwrap();
                let g = (y * &cot).unwrap().sum_all().unwrap().backward().unwrap();
                g.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
            })
        };
        assert_eq!(dv(1), dv(3), "{name} {vshape:?}: dv depends on the threads");
    }
}

/// The per-row cross-entropy of `h · wᵀ` computed in f64 (as f32).
fn f64_cross_entropy(h: &Tensor, w: &Tensor, targets: &[u32]) -> Tensor {
    let logits = h.to_dtype(DType::F64).unwrap().matmul(&w.to_dtype(DType::F64).unwrap().t().unwrap()).unwrap();
    ops::cross_entropy_rows(&logits, targets).unwrap().to_dtype(DType::F32).unwrap()
}

#[test]
fn fused_linear_cross_entropy_matches_composed() {
    let h = randn(&[7, 16], 21, DType::F32);
    let w = randn(&[50, 16], 22, DType::F32);
    let targets = [3u32, 0, 49, 7, 7, 12, 30];
    // chunk 3 exercises several chunks and a short last one.
    check_op(
        &h,
        |h| ops::linear_cross_entropy(h, &w, &targets, 3).unwrap(),
        |h| ops::cross_entropy_rows(&h.matmul(&w.t().unwrap()).unwrap(), &targets).unwrap(),
        1e-5,
    );
    // At sizes where the kernel's vector passes do the work (rows of 1003 logits: 125 lanes of
    // eight and a remainder), with peaked rows (logits up to ±30), against f64.
    let h = (randn(&[37, 72], 23, DType::F32) * 2.5).unwrap();
    let w = randn(&[1003, 72], 24, DType::F32);
    let targets: Vec<u32> = (0..37u32).map(|i| (i * 271) % 1003).collect();
    check_op(
        &h,
        |h| ops::linear_cross_entropy(h, &w, &targets, 16).unwrap(),
        |h| f64_cross_entropy(h, &w, &targets),
        1e-5,
    );
}

/// A 16-bit run's loss on the CPU: the f32 kernel with the 16-bit weight widened a block of
/// vocabulary rows at a time (2500 rows: two whole blocks and a partial one), against the same
/// 16-bit values in f64. The loss is computed from exact widenings (f32 summation only); the
/// gradient is rounded once to the hidden states' dtype.
#[test]
fn half_linear_cross_entropy_on_the_cpu_matches_f64() {
    let targets: Vec<u32> = (0..37u32).map(|i| (i * 677) % 2500).collect();
    for (dtype, tol) in [(DType::BF16, 5e-3), (DType::F16, 1e-3)] {
        let h = (randn(&[37, 48], 25, DType::F32) * 2.0).unwrap().to_dtype(dtype).unwrap();
        let w = randn(&[2500, 48], 26, dtype);
        check_op(
            &h,
            |h| ops::linear_cross_entropy(h, &w, &targets, 16).unwrap(),
            |h| f64_cross_entropy(h, &w, &targets),
            tol,
        );
    }
}

/// The device-agnostic chunked loss (what GPUs and bf16 use): the same per-row losses and
/// input gradient as the composed reference, in f32 and f64; in bf16 within bf16's tolerance
/// (its logits are computed in bf16 and normalised in f32, as the model's are).
#[test]
fn chunked_linear_cross_entropy_matches_composed() {
    let targets = [3u32, 0, 49, 7, 7, 12, 30];
    for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5), (DType::BF16, 3e-2)] {
        let h = randn(&[7, 16], 21, dtype);
        let w = randn(&[50, 16], 22, dtype);
        check_op(
            &h,
            |h| ops::linear_cross_entropy_chunked(h, &w, &targets, 3).unwrap(),
            |h| ops::cross_entropy_rows(&h.matmul(&w.t().unwrap()).unwrap(), &targets).unwrap(),
            tol,
        );
    }
}

/// A trained LM head's chunked loss (full fine-tuning's): the summed loss and the gradients of
/// both the hidden states and the weight against the composed loss in f64, in f32 (the CPU's
/// gemm-accumulated dW over several chunks and a short last one) and f64 (tensor ops).
#[test]
fn trained_head_loss_gives_the_weight_its_gradient() {
    let targets: Vec<u32> = (0..37u32).map(|i| (i * 131) % 203).collect();
    for (dtype, tol) in [(DType::F32, 1e-5), (DType::F64, 1e-12)] {
        let h = Var::from_tensor(&(randn(&[37, 24], 41, dtype) * 1.5).unwrap()).unwrap();
        let w = Var::from_tensor(&randn(&[203, 24], 42, dtype)).unwrap();
        let ours = ops::linear_cross_entropy_trained_sum(h.as_tensor(), w.as_tensor(), &targets, 16).unwrap();
        let g = (&ours * 0.7).unwrap().backward().unwrap();
        let (h64, w64) = (h.as_tensor().to_dtype(DType::F64).unwrap(), w.as_tensor().to_dtype(DType::F64).unwrap());
        let (hv, wv) = (Var::from_tensor(&h64).unwrap(), Var::from_tensor(&w64).unwrap());
        let reference = ops::cross_entropy_rows(&hv.as_tensor().matmul(&wv.as_tensor().t().unwrap()).unwrap(), &targets).unwrap().sum_all().unwrap();
        let gr = (&reference * 0.7).unwrap().backward().unwrap();
        let value = |t: &Tensor| t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
        assert!((value(&ours) - value(&reference)).abs() <= tol * value(&reference).abs(), "{dtype:?}: loss {} vs {}", value(&ours), value(&reference));
        for (name, a, b) in [("h", g.get(h.as_tensor()).unwrap(), gr.get(hv.as_tensor()).unwrap()), ("w", g.get(w.as_tensor()).unwrap(), gr.get(wv.as_tensor()).unwrap())] {
            assert_eq!(a.dtype(), dtype, "{name}'s gradient in its own dtype");
            let rel = max_rel(&a.to_dtype(DType::F64).unwrap(), b);
            assert!(rel < tol, "{dtype:?}: d{name} off by {rel}");
        }
    }
}

#[test]
fn frozen_linear_gives_input_gradient_and_none_to_the_weight() {
    let x = Var::from_tensor(&randn(&[2, 3, 8], 7, DType::F32)).unwrap();
    let w = randn(&[5, 8], 8, DType::F32);
    let cot = randn(&[2, 3, 5], 9, DType::F32);
    let y = ops::frozen_linear(x.as_tensor(), &w).unwrap();
    let reference = x.as_tensor().broadcast_matmul(&w.t().unwrap()).unwrap();
    assert!(max_rel(&y, &reference) < 1e-6);
    let g = (y * &cot).unwrap().sum_all().unwrap().backward().unwrap();
    let want = cot.broadcast_matmul(&w).unwrap();
    assert!(max_rel(g.get(x.as_tensor()).unwrap(), &want) < 1e-6);
    assert!(g.get(&w).is_none(), "the frozen weight must get no gradient");
}

/// Full fine-tuning's product: a trained weight (a variable) gets `dYᵀ·X` in its own (out, in)
/// shape and the input `dY·W`, against candle's matmul in f64; an input that tracks no ops
/// gets no gradient.
#[test]
fn trained_linear_gives_both_gradients() {
    let x = Var::from_tensor(&randn(&[2, 7, 24], 17, DType::F32)).unwrap();
    let w = Var::from_tensor(&randn(&[40, 24], 18, DType::F32)).unwrap();
    let cot = randn(&[2, 7, 40], 19, DType::F32);
    // Through the frozen product's entry point, as full fine-tuning's layers call it.
    check_two_inputs("trained_linear", &x, &w, &cot, |x, w| ops::frozen_linear(x, w).unwrap(), |x, w| x.broadcast_matmul(&w.t().unwrap()).unwrap());
    let frozen_x = x.as_tensor().detach();
    let g = ops::trained_linear(&frozen_x, w.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap();
    assert!(g.get(&frozen_x).is_none(), "an input that tracks no ops got a gradient");
    assert!(g.get(w.as_tensor()).is_some());
}

/// Full fine-tuning's norms: RMSNorm with a trained weight (the fused op with a unit weight,
/// then the channel scale) against the composed formula in f64, both gradients.
#[test]
fn rms_norm_with_a_trained_weight_matches_composed() {
    let x = Var::from_tensor(&randn(&[3, 9, 32], 27, DType::F32)).unwrap();
    let w = Var::from_tensor(&(randn(&[32], 28, DType::F32) + 1.0).unwrap()).unwrap();
    let cot = randn(&[3, 9, 32], 29, DType::F32);
    check_two_inputs("rms_norm", &x, &w, &cot, |x, w| ops::rms_norm(x, w, 1e-5).unwrap(), |x, w| ops::rms_norm_composed(x, w, 1e-5).unwrap());
    // The same bits as the fused op with the weight frozen.
    let y = ops::rms_norm(x.as_tensor(), w.as_tensor(), 1e-5).unwrap();
    let frozen = ops::rms_norm(x.as_tensor(), &w.as_tensor().detach(), 1e-5).unwrap();
    assert_eq!(y.flatten_all().unwrap().to_vec1::<f32>().unwrap(), frozen.flatten_all().unwrap().to_vec1::<f32>().unwrap());
}

/// A weight held as 4-bit blocks (QLoRA's base): the product and the input gradient equal
/// those of its dequantized matrix, and finite differences of the loss agree; the graph keeps
/// the blocks, not a dense copy.
#[test]
fn frozen_blocks_give_the_dequantized_products_gradient() {
    use candle_core::quantized::{GgmlDType, QTensor};
    use std::sync::Arc;
    let w = randn(&[6, 64], 10, DType::F32);
    let q = Arc::new(QTensor::quantize(&w, GgmlDType::Q4_1).unwrap());
    let dense = q.dequantize(&Device::Cpu).unwrap();
    let x0 = randn(&[2, 3, 64], 11, DType::F32);
    check_op(&x0, |x| ops::frozen_linear_blocks(x, &q).unwrap(), |x| ops::frozen_linear(x, &dense).unwrap(), 1e-6);

    // Central finite differences in f64 arithmetic on the f32 product (step 1e-2; the loss is
    // linear in x, so only rounding separates them).
    let cot = randn(&[2, 3, 6], 12, DType::F32);
    let loss = |x: &Tensor| -> f64 {
        let y = ops::frozen_linear_blocks(x, &q).unwrap();
        (y * &cot).unwrap().sum_all().unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
    };
    let xv = Var::from_tensor(&x0).unwrap();
    let g = ops::frozen_linear_blocks(xv.as_tensor(), &q).unwrap();
    let grads = (g * &cot).unwrap().sum_all().unwrap().backward().unwrap();
    let analytic: Vec<f32> = grads.get(xv.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let flat: Vec<f32> = x0.flatten_all().unwrap().to_vec1().unwrap();
    for i in [0usize, 17, 64, 200, 383] {
        let bump = |d: f32| {
            let mut v = flat.clone();
            v[i] += d;
            loss(&Tensor::from_vec(v, x0.dims(), &Device::Cpu).unwrap())
        };
        let fd = (bump(1e-2) - bump(-1e-2)) / 2e-2;
        assert!((fd - analytic[i] as f64).abs() < 1e-3 * (1.0 + fd.abs()), "x[{i}]: fd {fd} vs analytic {}", analytic[i]);
    }
    // What the graph holds: the blocks (one more reference while the output is alive), no
    // dense matrix of its own.
    let before = Arc::strong_count(&q);
    let y = ops::frozen_linear_blocks(xv.as_tensor(), &q).unwrap();
    assert_eq!(Arc::strong_count(&q), before + 1);
    drop(y);
    assert_eq!(Arc::strong_count(&q), before);
}

/// Blocked attention (what training runs: no (rows × keys) matrix kept for the backward)
/// against the composed reference, in value and in the gradients of q, k and v: grouped
/// queries (two heads per KV head), with and without earlier keys (prefix/cache), in one block
/// and in several (including a short last one); f64 to rounding, f32, and bf16 within bf16's
/// tolerance. In f32 and bf16 twice: the CPU's attention kernels (`model::attention_cpu`),
/// and inside `fused::forced` the tensor-op path a GPU runs.
#[test]
fn blocked_attention_matches_composed() {
    for forced in [false, true] {
        if forced {
            fused::forced(blocked_attention_cases);
        } else {
            blocked_attention_cases();
        }
    }
}

fn blocked_attention_cases() {
    let scale = 0.35;
    for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5), (DType::BF16, 3e-2)] {
        for (s, k_len, block) in [(7, 7, 3), (7, 7, 7), (5, 9, 2), (6, 6, 1), (9, 9, 4)] {
            let (b, nkv, rep, hd) = (2, 2, 2, 4);
            let q = Var::from_tensor(&randn(&[b, nkv, rep * s, hd], 41, dtype)).unwrap();
            let k = Var::from_tensor(&randn(&[b, nkv, k_len, hd], 42, dtype)).unwrap();
            let v = Var::from_tensor(&randn(&[b, nkv, k_len, hd], 43, dtype)).unwrap();
            let (qt, kt, vt) = (q.as_tensor(), k.as_tensor(), v.as_tensor());
            let y1 = ops::causal_attention_blocked(qt, kt, vt, s, scale, block).unwrap();
            let y2 = ops::causal_attention_composed(qt, kt, vt, s, scale).unwrap();
            let what = format!("{dtype:?} s={s} keys={k_len} block={block} forced={}", fused::is_forced());
            assert!(max_rel(&y1, &y2) < tol, "{what}: forward differs: {}", max_rel(&y1, &y2));
            let cot = randn(y1.dims(), 44, dtype);
            let g1 = (y1 * &cot).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (y2 * &cot).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, t) in [("q", qt), ("k", kt), ("v", vt)] {
                let (a, r) = (g1.get(t).expect("blocked gradient"), g2.get(t).expect("reference gradient"));
                assert_eq!(a.dtype(), dtype, "{what}: d{name} dtype");
                assert!(max_rel(a, r) < tol, "{what}: d{name} differs: {}", max_rel(a, r));
            }
        }
    }
}

/// The CPU's attention kernels at a model's sizes (head_dim 64, three query heads per KV head,
/// 150 positions after 20 earlier keys: two full tiles of 64 and a short one, rows whose lengths
/// are not multiples of the vector width) against the composed reference in f64, in value and
/// in the gradients of q, k and v; scaled as a model scales them, with scores large enough
/// that the softmax is peaked.
#[test]
fn cpu_attention_kernels_match_composed_at_model_sizes() {
    let (b, nkv, rep, s, keys, hd) = (2, 2, 3, 150, 170, 64);
    let scale = 1.0 / (hd as f64).sqrt();
    let mk = |shape: &[usize], seed: u64| (randn(shape, seed, DType::F32) * 3.0).unwrap();
    let (q, k, v) = (mk(&[b, nkv, rep * s, hd], 61), mk(&[b, nkv, keys, hd], 62), mk(&[b, nkv, keys, hd], 63));
    let vars = [&q, &k, &v].map(|t| Var::from_tensor(t).unwrap());
    let wide = [&q, &k, &v].map(|t| Var::from_tensor(&t.to_dtype(DType::F64).unwrap()).unwrap());
    let y1 = ops::causal_attention(vars[0].as_tensor(), vars[1].as_tensor(), vars[2].as_tensor(), s, scale).unwrap();
    let y2 = ops::causal_attention_composed(wide[0].as_tensor(), wide[1].as_tensor(), wide[2].as_tensor(), s, scale).unwrap();
    assert!(max_rel(&y1, &y2) < 1e-5, "forward differs: {}", max_rel(&y1, &y2));
    let cot = randn(y1.dims(), 64, DType::F32);
    let g1 = (y1 * &cot).unwrap().sum_all().unwrap().backward().unwrap();
    let g2 = (y2 * cot.to_dtype(DType::F64).unwrap()).unwrap().sum_all().unwrap().backward().unwrap();
    for (name, (a, r)) in ["q", "k", "v"].iter().zip(vars.iter().zip(&wide)) {
        let (a, r) = (g1.get(a.as_tensor()).unwrap(), g2.get(r.as_tensor()).unwrap());
        assert!(max_rel(a, r) < 1e-5, "d{name} differs: {}", max_rel(a, r));
    }
}

/// Without anything to differentiate the blocked attention returns its output with no graph,
/// and the block length follows the byte budget (at least 16 positions, at most the sequence).
#[test]
fn attention_blocks_follow_the_budget() {
    assert_eq!(ops::attention_block_len(1, 1, 100, 100), 100);
    let long = ops::attention_block_len(8, 32, 4096, 4096);
    assert!(long >= 16 && long < 4096, "{long}");
    assert!(8 * 32 * long * 4096 * 4 <= ops::ATTENTION_BLOCK_BYTES.max(8 * 32 * 16 * 4096 * 4));
    let q = randn(&[1, 1, 8, 4], 1, DType::F32);
    let k = randn(&[1, 1, 4, 4], 2, DType::F32);
    let y = ops::causal_attention(&q, &k, &k, 4, 0.5).unwrap();
    assert!(!y.track_op());
}

/// candle's fused RMSNorm and RoPE kernels with our backward (what GPUs and 16-bit activations
/// run): value and input gradient against the composed references, in f32 and in bf16 (the
/// candle kernels have CPU versions of the same kernels, so this runs here).
#[test]
fn hooked_rms_norm_and_rope_match_composed() {
    for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 3e-2)] {
        let x = randn(&[3, 5, 16], 51, dtype);
        let w = (randn(&[16], 52, DType::F32) + 1.0).unwrap().to_dtype(dtype).unwrap();
        check_op(&x, |x| ops::rms_norm_hooked(x, &w, 1e-5).unwrap(), |x| ops::rms_norm_composed(x, &w, 1e-5).unwrap(), tol);
        let x = randn(&[2, 3, 7, 8], 53, dtype);
        let cos = randn(&[7, 4], 54, DType::F32);
        let sin = randn(&[7, 4], 55, DType::F32);
        check_op(&x, |x| ops::rope_hooked(x, &cos, &sin).unwrap(), |x| ops::rope_composed(x, &cos, &sin).unwrap(), tol);
    }
}

/// The causal softmax the blocked attention asks for in 16-bit (no graph: candle's fused
/// softmax after the mask) gives the composed reference's probabilities, masked entries 0.
#[test]
fn detached_half_causal_softmax_matches_composed() {
    for (q, k) in [(6, 6), (3, 7)] {
        let x = randn(&[2, 2 * q, k], 61, DType::BF16);
        let got = ops::causal_softmax(&x, q, 0.5).unwrap();
        let want = ops::causal_softmax_composed(&x, q, 0.5).unwrap();
        assert_eq!(got.dtype(), DType::BF16);
        assert!(max_rel(&got, &want) < 1e-2, "{}", max_rel(&got, &want));
        let p = got.to_dtype(DType::F32).unwrap().to_vec3::<f32>().unwrap();
        assert_eq!(p[0][0][k - q + 1], 0.0, "a key after the query's position is masked");
    }
}

/// LoRA beside the frozen product as one op (`ops::lora_linear`): value and the gradients of x,
/// A and B equal the composed `x·Wᵀ + s·(dropout(x)·Aᵀ)·Bᵀ` (f64 to rounding, f32 to f32's),
/// with and without dropout; an input that tracks no ops gets no gradient while A and B still
/// do; W never gets one.
#[test]
fn lora_linear_matches_composed() {
    use tunebench::model::FrozenWeight;
    for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
        for (dropout, with_bias) in [(None, false), (Some((0.3, 5u64)), false), (None, true), (Some((0.3, 6u64)), true)] {
            for x_tracks in [true, false] {
                let x0 = randn(&[2, 7, 12], 40, dtype);
                let w = randn(&[10, 12], 41, dtype);
                let (a, b) = (Var::from_tensor(&randn(&[4, 12], 42, dtype)).unwrap(), Var::from_tensor(&randn(&[10, 4], 43, dtype)).unwrap());
                let xv = Var::from_tensor(&x0).unwrap();
                let x = if x_tracks { xv.as_tensor().clone() } else { x0.clone() };
                let pair = ops::LoraPair { a: a.as_tensor(), b: b.as_tensor(), scale: 1.5, dropout };
                let bias = with_bias.then(|| randn(&[10], 49, dtype));
                let y1 = ops::lora_linear(&x, &FrozenWeight::Dense(w.clone()), bias.as_ref(), pair).unwrap();
                let y2 = ops::lora_linear_composed(&x, &w, bias.as_ref(), pair).unwrap();
                let what = format!("{dtype:?} dropout {dropout:?} bias {with_bias} x tracks {x_tracks}");
                assert_eq!(y1.dims(), &[2, 7, 10]);
                assert!(max_rel(&y1, &y2) < tol, "{what}: forward differs {}", max_rel(&y1, &y2));
                let cot = randn(y1.dims(), 44, dtype);
                let g1 = (y1 * &cot).unwrap().sum_all().unwrap().backward().unwrap();
                let g2 = (y2 * &cot).unwrap().sum_all().unwrap().backward().unwrap();
                for (name, t) in [("A", a.as_tensor()), ("B", b.as_tensor())] {
                    let (u, v) = (g1.get(t).unwrap(), g2.get(t).unwrap());
                    assert!(max_rel(u, v) < tol, "{what}: d{name} differs {}", max_rel(u, v));
                }
                assert!(g1.get(&w).is_none(), "the frozen weight gets no gradient");
                assert!(bias.as_ref().is_none_or(|b| g1.get(b).is_none()), "the frozen bias gets no gradient");
                match x_tracks {
                    true => {
                        let (u, v) = (g1.get(xv.as_tensor()).unwrap(), g2.get(xv.as_tensor()).unwrap());
                        assert!(max_rel(u, v) < tol, "{what}: dX differs {}", max_rel(u, v));
                    }
                    false => assert!(g1.get(xv.as_tensor()).is_none() && g1.get(&x).is_none(), "{what}: an untracked input got a gradient"),
                }
            }
        }
    }
    // Dropout reaches the update: without it the value differs.
    let (x, w) = (randn(&[3, 12], 45, DType::F64), randn(&[10, 12], 46, DType::F64));
    let (a, b) = (randn(&[4, 12], 47, DType::F64), randn(&[10, 4], 48, DType::F64));
    let with = |d| ops::lora_linear(&x, &FrozenWeight::Dense(w.clone()), None, ops::LoraPair { a: &a, b: &b, scale: 1.0, dropout: d }).unwrap();
    assert!(max_rel(&with(Some((0.5, 1))), &with(None)) > 1e-3);
    // A bias that trains (tracks ops) gets its gradient, added after the op.
    let bv = Var::from_tensor(&randn(&[10], 50, DType::F64)).unwrap();
    let pair = ops::LoraPair { a: &a, b: &b, scale: 1.0, dropout: None };
    let y = ops::lora_linear(&x, &FrozenWeight::Dense(w.clone()), Some(bv.as_tensor()), pair).unwrap();
    assert!(max_rel(&y, &ops::lora_linear_composed(&x, &w, Some(bv.as_tensor()), pair).unwrap()) < 1e-12);
    let g = y.sum_all().unwrap().backward().unwrap();
    assert_eq!(g.get(bv.as_tensor()).unwrap().to_vec1::<f64>().unwrap(), vec![3.0; 10], "three rows, each adding the bias once");
}

/// down_proj on SwiGLU's product made inside its op (`ops::frozen_linear_swiglu_residual`,
/// `ops::lora_linear_swiglu`, `ops::lora_linear_swiglu_residual`, whose u and residual go in
/// through a joint node): value and every gradient equal the composed `residual +
/// swiglu(g, u)·Wᵀ (+ LoRA)`, with each of g, u and the residual tracking ops or not (an input
/// that does not gets no gradient; A and B always do).
#[test]
fn down_projection_on_swiglu_matches_composed() {
    use tunebench::model::FrozenWeight;
    for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
        for tracks in [[true, true, true], [true, false, true], [false, true, false], [false, false, true], [true, true, false]] {
            let vals = [randn(&[2, 5, 12], 60, dtype), randn(&[2, 5, 12], 61, dtype), randn(&[2, 5, 10], 62, dtype)];
            let vars: Vec<Var> = vals.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
            let ins: Vec<Tensor> = (0..3).map(|i| if tracks[i] { vars[i].as_tensor().clone() } else { vals[i].clone() }).collect();
            let (g, u, r) = (&ins[0], &ins[1], &ins[2]);
            let w = randn(&[10, 12], 63, dtype);
            let (a, b) = (Var::from_tensor(&randn(&[4, 12], 64, dtype)).unwrap(), Var::from_tensor(&randn(&[10, 4], 65, dtype)).unwrap());
            let pair = ops::LoraPair { a: a.as_tensor(), b: b.as_tensor(), scale: 1.5, dropout: Some((0.3, 7)) };
            let dense = FrozenWeight::Dense(w.clone());
            let act = ops::swiglu_composed(g, u).unwrap();
            let cases: [(&str, Tensor, Tensor, bool); 3] = [
                ("frozen", ops::frozen_linear_swiglu_residual(g, u, &dense, None, r).unwrap(), (r + act.broadcast_matmul(&w.t().unwrap()).unwrap()).unwrap(), true),
                ("lora", ops::lora_linear_swiglu(g, u, &dense, None, pair).unwrap(), ops::lora_linear_composed(&act, &w, None, pair).unwrap(), false),
                ("lora + residual", ops::lora_linear_swiglu_residual(g, u, &dense, None, pair, r).unwrap(), (r + ops::lora_linear_composed(&act, &w, None, pair).unwrap()).unwrap(), true),
            ];
            for (name, y1, y2, with_residual) in cases {
                let what = format!("{name} {dtype:?} g, u, residual tracking {tracks:?}");
                assert!(max_rel(&y1, &y2) < tol, "{what}: forward differs {}", max_rel(&y1, &y2));
                let cot = randn(y1.dims(), 66, dtype);
                let g1 = (&y1 * &cot).unwrap().sum_all().unwrap().backward().unwrap();
                let g2 = (&y2 * &cot).unwrap().sum_all().unwrap().backward().unwrap();
                let lora = name != "frozen";
                for (i, v) in vars.iter().enumerate() {
                    let used = i < 2 || with_residual;
                    match (tracks[i] && used, g1.get(v.as_tensor()), g2.get(v.as_tensor())) {
                        (true, Some(x), Some(y)) => assert!(max_rel(x, y) < tol, "{what}: input {i}'s gradient differs {}", max_rel(x, y)),
                        (false, None, _) => {}
                        (want, got, _) => panic!("{what}: input {i} tracks {want}, gradient {}", got.is_some()),
                    }
                }
                for (n, t) in [("A", a.as_tensor()), ("B", b.as_tensor())] {
                    match (lora, g1.get(t)) {
                        (true, Some(x)) => assert!(max_rel(x, g2.get(t).unwrap()) < tol, "{what}: d{n} differs"),
                        (false, None) => {}
                        (_, got) => panic!("{what}: d{n} present {}", got.is_some()),
                    }
                }
                assert!(g1.get(&w).is_none(), "the frozen weight gets no gradient");
            }
        }
    }
}

/// The device checker (`tunebench check-ops`, which bench/gpu_session.sh runs on a GPU) on the
/// CPU: every op in f32, bf16 and f16 within its limit against the f64 reference, and the
/// errors are real measurements (16-bit ones well above f32's).
#[test]
fn op_checks_pass_on_the_cpu() {
    let checks = tunebench::model::opcheck::run(&Device::Cpu).unwrap();
    assert!(checks.len() >= 204, "{}", checks.len());
    let flash_shapes = checks.iter().filter(|c| c.op.starts_with("causal_attention hd=")).count();
    assert_eq!(flash_shapes, 12, "head_dim 64 and 128 (the flash kernels' on a GPU); three dtypes, plain and forced");
    assert!(checks.iter().filter(|c| c.op.ends_with("[fused, forced]")).count() >= 33, "the fused twins run too");
    let blocks = checks.iter().filter(|c| c.op.starts_with("frozen_linear_blocks")).count();
    assert_eq!(blocks, 24, "four block formats, three dtypes, plain and forced");
    let dora = checks.iter().filter(|c| c.op.starts_with("lora_linear_scaled") && !c.op.contains("_heads") && !c.op.contains("_swiglu")).count();
    assert_eq!(dora, 18, "DoRA's product without dropout, with dropout, on Q4_1 blocks with dropout; three dtypes, plain and forced");
    let norms = checks.iter().filter(|c| c.op.starts_with("dora_row_norm")).count();
    assert_eq!(norms, 6, "DoRA's row norms; three dtypes, plain and forced");
    let lora = checks.iter().filter(|c| c.op.starts_with("lora_linear") && !c.op.starts_with("lora_linear_scaled") && !c.op.contains("_heads") && !c.op.contains("_residual") && !c.op.contains("_swiglu")).count();
    assert_eq!(lora, 18, "dense, dense with dropout and Q4_1 blocks with dropout; three dtypes, plain and forced");
    let heads = checks.iter().filter(|c| c.op.contains("_linear_heads ") || c.op.starts_with("lora_linear_scaled_heads ")).count();
    assert_eq!(heads, 36, "frozen, LoRA and DoRA products ending in the split into heads, for q (RoPE, grouped) and v; three dtypes, plain and forced");
    let residual = checks.iter().filter(|c| c.op.contains("_linear_residual ")).count();
    assert_eq!(residual, 24, "frozen and LoRA products ending in the residual add, dense with a bias and Q4_1 blocks; three dtypes, plain and forced");
    let swiglu = checks.iter().filter(|c| c.op.contains("_linear_swiglu") || c.op.contains("_scaled_swiglu")).count();
    assert_eq!(swiglu, 48, "frozen, LoRA and DoRA products on SwiGLU's product made inside the op (LoRA with and without the residual add), dense and Q4_1 blocks; three dtypes, plain and forced");
    let trained_head = checks.iter().filter(|c| c.op.starts_with("linear_cross_entropy_trained_sum")).count();
    assert_eq!(trained_head, 6, "the trained head's loss; three dtypes, plain and forced");
    let lora_head = checks.iter().filter(|c| c.op.starts_with("linear_cross_entropy_lora_sum")).count();
    assert_eq!(lora_head, 6, "LoRA on the head; three dtypes, plain and forced");
    let affine_head = checks.iter().filter(|c| c.op.starts_with("linear_cross_entropy_affine_sum")).count();
    assert_eq!(affine_head, 12, "IA3's scale and shift, BitFit's shift, on the head; three dtypes, plain and forced");
    let ce = checks.iter().filter(|c| c.op.starts_with("cross_entropy_sum")).count();
    assert_eq!(ce, 6, "the summed cross-entropy; three dtypes, plain and forced");
    let channel = checks.iter().filter(|c| c.op.starts_with("channel_")).count();
    assert_eq!(channel, 12, "scale and shift; three dtypes, plain and forced");
    let full = checks.iter().filter(|c| c.op.starts_with("trained_linear") || c.op.starts_with("rms_norm trained")).count();
    assert_eq!(full, 12, "full fine-tuning's product and norms; three dtypes, plain and forced");
    for c in &checks {
        assert!(c.ok(), "{c:?}");
    }
    let worst = |dtype: &str| checks.iter().filter(|c| c.dtype == dtype).map(|c| c.forward.max(c.gradient)).fold(0f64, f64::max);
    assert!(worst("f32") > 0.0 && worst("bf16") > 10.0 * worst("f32"), "f32 {} bf16 {}", worst("f32"), worst("bf16"));
}

/// The LM head's loss with IA3's scale and BitFit's shift (`ops::linear_cross_entropy_affine_sum`,
/// its CPU loop summing the scale's and shift's gradients over rows in parallel) gives the same
/// bits every time: the partial sums come in a fixed block order, not in the order threads end.
#[test]
fn affine_head_gradients_are_the_same_bits_every_run() {
    let (rows, d, vocab) = (200, 32, 3000);
    let head = randn(&[vocab, d], 41, DType::F32);
    let targets: Vec<u32> = (0..rows as u32).map(|i| (i * 7919 + 13) % vocab as u32).collect();
    let run = || {
        let h = Var::from_tensor(&randn(&[rows, d], 42, DType::F32)).unwrap();
        let shift = Var::from_tensor(&(randn(&[vocab], 43, DType::F32) * 0.1).unwrap()).unwrap();
        let scale = Var::from_tensor(&randn(&[vocab, 1], 44, DType::F32).affine(0.2, 1.0).unwrap()).unwrap();
        let affine = ops::HeadAffine { scale: Some(scale.as_tensor()), shift: Some(shift.as_tensor()) };
        let loss = ops::linear_cross_entropy_affine_sum(h.as_tensor(), &head, affine, &targets, 128).unwrap();
        let g = loss.backward().unwrap();
        let bits = |v: &Var| g.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
        (bits(&scale), bits(&shift), bits(&h))
    };
    let first = run();
    assert!(first.0.iter().any(|&b| b != 0) && first.1.iter().any(|&b| b != 0), "the scale and the shift get gradients");
    for _ in 0..8 {
        assert!(run() == first, "the head's gradients changed between identical runs");
    }
}
