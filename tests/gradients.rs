//! Gradient correctness on a tiny random Llama: fused ops against composed references,
//! LoRA gradients against central finite differences (in f64), gradients reach exactly the
//! trainable tensors, and the frozen base is bit-identical after training.

use candle_core::{DType, Device, Tensor, Var};
use tunebench::model::{ops, ForwardCtx, Llama, LlamaConfig};
use tunebench::peft::{Adapter, LoraConfig, PeftConfig, TargetModules};

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

fn tiny(dtype: DType, bias: bool) -> Llama {
    let mut cfg = LlamaConfig::tiny(40);
    cfg.attention_bias = bias;
    Llama::random_dtype(cfg, 11, &Device::Cpu, dtype).unwrap()
}

fn lora_all(r: usize) -> PeftConfig {
    PeftConfig::Lora(LoraConfig { r, lora_alpha: 2.0 * r as f64, target_modules: TargetModules::Keyword("all-linear".into()), ..Default::default() })
}

/// Sets every LoRA B to small random values so that every A receives a gradient too.
fn randomize_b(adapter: &Adapter, dtype: DType) {
    for (i, (_, l)) in adapter.lora_layers().into_iter().enumerate() {
        let b = (randn(l.b.dims(), 100 + i as u64, dtype) * 0.3).unwrap();
        l.b.set(&b).unwrap();
    }
}

fn batch() -> (Tensor, Vec<i64>) {
    let ids: Vec<u32> = vec![1, 5, 9, 3, 7, 2, 30, 11, 4, 8, 12, 3, 3, 17, 21, 6];
    let mut labels: Vec<i64> = ids.iter().map(|&x| x as i64).collect();
    labels[0] = -100;
    labels[1] = -100;
    labels[8] = -100;
    labels[9] = -100;
    (Tensor::from_vec(ids, (2, 8), &Device::Cpu).unwrap(), labels)
}

#[test]
fn lora_gradients_match_central_finite_differences() {
    for bias in [false, true] {
        let mut model = tiny(DType::F64, bias);
        let adapter = Adapter::inject(&mut model, &lora_all(2), 3).unwrap();
        randomize_b(&adapter, DType::F64);
        let (ids, labels) = batch();
        let ctx = ForwardCtx::default();
        let loss = |m: &Llama| -> f64 {
            let (s, n) = m.loss_sum(&ids, &labels, &ctx, 5).unwrap();
            s.to_scalar::<f64>().unwrap() / n as f64
        };
        let (s, n) = model.loss_sum(&ids, &labels, &ctx, 5).unwrap();
        let grads = (s / n as f64).unwrap().backward().unwrap();
        let eps = 1e-5;
        let mut checked = 0;
        for (name, var) in adapter.trainable() {
            let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name} got no gradient"));
            let gv = g.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let orig = var.as_tensor().flatten_all().unwrap().to_vec1::<f64>().unwrap();
            // Probe a few entries of every tensor.
            for &j in &[0, orig.len() / 2, orig.len() - 1] {
                let mut plus = orig.clone();
                plus[j] += eps;
                var.set(&Tensor::from_vec(plus, var.dims(), &Device::Cpu).unwrap()).unwrap();
                let lp = loss(&model);
                let mut minus = orig.clone();
                minus[j] -= eps;
                var.set(&Tensor::from_vec(minus, var.dims(), &Device::Cpu).unwrap()).unwrap();
                let lm = loss(&model);
                var.set(&Tensor::from_vec(orig.clone(), var.dims(), &Device::Cpu).unwrap()).unwrap();
                let fd = (lp - lm) / (2.0 * eps);
                let err = (fd - gv[j]).abs() / fd.abs().max(gv[j].abs()).max(1e-4);
                assert!(err < 1e-4, "{name}[{j}] bias={bias}: analytic {} vs finite difference {fd}", gv[j]);
                checked += 1;
            }
        }
        assert_eq!(checked, 2 * 7 * 2 * 3);
    }
}

#[test]
fn gradients_reach_exactly_the_trainable_tensors_and_the_base_stays_frozen() {
    let mut model = tiny(DType::F32, false);
    let before: Vec<Vec<f32>> =
        model.linears().iter().map(|l| l.weight().flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect();
    let embed_before = model.embed_tokens().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let adapter = Adapter::inject(&mut model, &lora_all(4), 3).unwrap();
    randomize_b(&adapter, DType::F32);
    let (ids, labels) = batch();
    let mut opt = tunebench::train::optim::AdamW::new(
        adapter.trainable(),
        tunebench::train::optim::AdamWParams { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 },
    )
    .unwrap();
    let mut first = None;
    let mut last = 0.0;
    for _ in 0..5 {
        let (s, n) = model.loss_sum(&ids, &labels, &ForwardCtx { train: true, seed: 1 }, 7).unwrap();
        let loss = (s / n as f64).unwrap();
        last = loss.to_scalar::<f32>().unwrap();
        first.get_or_insert(last);
        let g = loss.backward().unwrap();
        let mut grads = Vec::new();
        for (name, v) in adapter.trainable() {
            let gt = g.get(v.as_tensor()).unwrap_or_else(|| panic!("{name} got no gradient")).clone();
            let norm = gt.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(norm > 0.0, "{name} got an all-zero gradient");
            grads.push(gt);
        }
        for lin in model.linears() {
            assert!(g.get(lin.weight()).is_none(), "{} (frozen) got a gradient", lin.name());
        }
        assert!(g.get(model.embed_tokens()).is_none(), "the embedding got a gradient");
        opt.step(&grads, 1e-2).unwrap();
    }
    assert!(last < first.unwrap(), "loss should fall: {first:?} -> {last}");
    let after: Vec<Vec<f32>> =
        model.linears().iter().map(|l| l.weight().flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect();
    assert!(before == after, "a frozen base weight changed");
    assert!(embed_before == model.embed_tokens().flatten_all().unwrap().to_vec1::<f32>().unwrap());
}
