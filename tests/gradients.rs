//! Gradient correctness of the fused training ops against their composed references (values
//! and input gradients). The PEFT methods' gradients (central finite differences, frozen base)
//! are checked for every method in `tests/peft_methods.rs`.

use candle_core::{DType, Device, Tensor, Var};
use tunebench::model::ops;

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
