//! AdamW with decoupled weight decay (Loshchilov & Hutter 2019), the learning-rate schedule,
//! and global-norm gradient clipping. Matches PyTorch's `torch.optim.AdamW` update order.

use std::collections::HashMap;

use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::model::fused::{self, AdamWStep};
use crate::{Error, Result};

/// AdamW hyper-parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct AdamWParams {
    /// β₁.
    pub beta1: f64,
    /// β₂.
    pub beta2: f64,
    /// ε.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

/// AdamW over a fixed, named list of variables; its state can be saved and restored.
pub struct AdamW {
    vars: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    step: usize,
    p: AdamWParams,
    /// Whether an f32 variable steps in place ([`fused::adamw_step_in_place`]) on the CPU and,
    /// through our kernels, on a GPU; off with `TUNEBENCH_FUSED_KERNELS=0`, which asks for the
    /// tensor ops.
    in_place: bool,
}

impl AdamW {
    /// A fresh optimizer over `vars`.
    pub fn new(vars: Vec<(String, Var)>, p: AdamWParams) -> Result<Self> {
        let m = vars.iter().map(|(_, v)| v.zeros_like()).collect::<candle_core::Result<Vec<_>>>()?;
        let v = vars.iter().map(|(_, v)| v.zeros_like()).collect::<candle_core::Result<Vec<_>>>()?;
        Ok(AdamW { vars, m, v, step: 0, p, in_place: fused::enabled_by_env() })
    }

    /// The optimized variables.
    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// One update with learning rate `lr`; `grads[i]` is the gradient of `vars[i]`.
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        self.step += 1;
        let AdamWParams { beta1: b1, beta2: b2, eps, weight_decay: wd } = self.p;
        let bc1 = 1.0 - b1.powi(self.step as i32);
        let bc2 = 1.0 - b2.powi(self.step as i32);
        // The step's constants as the tensor ops below apply them (f32), for the fused kernel.
        let fused_step = AdamWStep {
            b1: b1 as f32,
            one_minus_b1: (1.0 - b1) as f32,
            b2: b2 as f32,
            one_minus_b2: (1.0 - b2) as f32,
            decay: if wd != 0.0 { (1.0 - lr * wd) as f32 } else { 1.0 },
            inv_bc1: (1.0 / bc1) as f32,
            inv_bc2: (1.0 / bc2) as f32,
            eps: eps as f32,
            lr: lr as f32,
        };
        // Detached: the moments outlive the step, so they must not hold its graph.
        let grads: Vec<Tensor> = grads.iter().map(Tensor::detach).collect();
        // In place: three passes over each variable and its moments, nothing allocated (the
        // tensor ops below hold ~7 temporaries of its size); on a GPU one launch for every
        // variable (instead of ~16 tensor ops each).
        let in_place = |i: usize| {
            let (var, g) = (&self.vars[i].1, &grads[i]);
            self.in_place && g.dtype() == DType::F32 && var.dtype() == DType::F32 && (var.device().is_cpu() || fused::active(g))
        };
        let all: Vec<[&Tensor; 4]> =
            (0..self.vars.len()).filter(|&i| in_place(i)).map(|i| [self.vars[i].1.as_tensor(), &grads[i], &self.m[i], &self.v[i]]).collect();
        fused::adamw_step_in_place_all(&all, fused_step)?;
        for (i, (_, var)) in self.vars.iter().enumerate() {
            if in_place(i) {
                continue;
            }
            let g = &grads[i];
            let f32 = g.dtype() == DType::F32 && var.dtype() == DType::F32;
            if f32 && fused::active(g) {
                // The kernels' out-of-place twin (new moments and parameter): what the in-place
                // step is held to.
                let (p, m, v) = fused::adamw_step(var.as_tensor(), g, &self.m[i], &self.v[i], fused_step)?;
                var.set(&p)?;
                (self.m[i], self.v[i]) = (m, v);
                continue;
            }
            let m = ((&self.m[i] * b1)? + (g * (1.0 - b1))?)?;
            let v = ((&self.v[i] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let mut p = var.as_tensor().clone();
            if wd != 0.0 {
                p = (p * (1.0 - lr * wd))?;
            }
            let denom = ((v.clone() / bc2)?.sqrt()? + eps)?;
            let upd = ((m.clone() / bc1)? / denom)?;
            var.set(&(p - (upd * lr)?)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    /// Steps taken.
    pub fn steps(&self) -> usize {
        self.step
    }

    /// The state as named tensors (`m.<var>`, `v.<var>`, `step`): views of the live moments,
    /// which the next step updates in place, so write them before stepping again.
    pub fn state(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (i, (name, _)) in self.vars.iter().enumerate() {
            out.insert(format!("m.{name}"), self.m[i].clone());
            out.insert(format!("v.{name}"), self.v[i].clone());
        }
        let dev = self.vars.first().map(|(_, v)| v.device().clone()).unwrap_or(candle_core::Device::Cpu);
        out.insert("step".into(), Tensor::new(&[self.step as u32], &dev)?);
        Ok(out)
    }

    /// Restores state written by [`AdamW::state`]. The moments become the optimizer's own,
    /// which later steps update in place: the caller lets go of `state`.
    pub fn restore(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        for (i, (name, var)) in self.vars.iter().enumerate() {
            for (prefix, slot) in [("m", &mut self.m[i]), ("v", &mut self.v[i])] {
                let key = format!("{prefix}.{name}");
                let t = state.get(&key).ok_or_else(|| Error::Msg(format!("optimizer state has no `{key}`")))?;
                if t.dims() != var.dims() {
                    return Err(Error::Msg(format!("optimizer state `{key}` has shape {:?}, expected {:?}", t.dims(), var.dims())));
                }
                *slot = t.contiguous()?;
            }
        }
        let step = state.get("step").ok_or_else(|| Error::Msg("optimizer state has no `step`".into()))?;
        self.step = step.to_vec1::<u32>()?.first().copied().unwrap_or(0) as usize;
        Ok(())
    }
}

/// Learning-rate schedule after warmup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default, ts_rs::TS)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// Half-cosine from the peak to `min_lr_ratio × peak`.
    #[default]
    Cosine,
    /// Straight line from the peak to `min_lr_ratio × peak`.
    Linear,
    /// Constant at the peak.
    Constant,
}

/// The learning rate for 0-based optimizer step `step` of `total`: linear warmup over
/// `warmup` steps (reaching the peak at step `warmup − 1`), then the schedule.
pub fn lr_at(step: usize, total: usize, warmup: usize, peak: f64, schedule: Schedule, min_ratio: f64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1);
    let progress = ((step - warmup) as f64 / span as f64).min(1.0);
    let min = peak * min_ratio;
    match schedule {
        Schedule::Constant => peak,
        Schedule::Linear => min + (peak - min) * (1.0 - progress),
        Schedule::Cosine => min + (peak - min) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
    }
}

/// Global L2 norm of `grads`: each gradient's sum of squares on its device, all of them
/// brought back in one transfer (one synchronisation of a GPU per step, not one per tensor),
/// added in f64.
pub fn global_norm(grads: &[Tensor]) -> Result<f64> {
    if grads.is_empty() {
        return Ok(0.0);
    }
    let sums = grads.iter().map(|g| g.sqr()?.sum_all()?.to_dtype(DType::F32)).collect::<candle_core::Result<Vec<_>>>()?;
    let sums = Tensor::stack(&sums, 0)?.to_vec1::<f32>()?;
    Ok(sums.iter().map(|&s| s as f64).sum::<f64>().sqrt())
}

/// Scales `grads` in place so their global norm is at most `max_norm` (as
/// `torch.nn.utils.clip_grad_norm_`); returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let norm = global_norm(grads)?;
    if max_norm > 0.0 && norm.is_finite() {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            for g in grads.iter_mut() {
                *g = (&*g * coef)?;
            }
        }
    }
    Ok(norm)
}

/// Dynamic loss scaling for f16 training (`train.dtype = "f16"`), PyTorch's `GradScaler`
/// policy: the loss is multiplied by `scale` before the backward so small gradients survive
/// f16's range, the gradients are divided by it again; a step whose gradients overflowed
/// (inf/NaN) is skipped and the scale halved, and after [`LossScaler::GROWTH_INTERVAL`]
/// finite steps in a row the scale doubles. Saved with each checkpoint, so a resumed run
/// scales as the uninterrupted one would.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    /// The current multiplier.
    pub scale: f64,
    /// Finite steps since the scale last changed.
    pub good_steps: u32,
}

impl LossScaler {
    /// Finite steps in a row before the scale doubles (PyTorch's default).
    pub const GROWTH_INTERVAL: u32 = 2000;

    /// A scaler starting at `scale` (`train.loss_scale`).
    pub fn new(scale: f64) -> Self {
        LossScaler { scale, good_steps: 0 }
    }

    /// The scaler a run with these settings uses: f16's, from `train.loss_scale`; none in
    /// f32 and bf16.
    pub fn for_run(t: &super::config::TrainSection) -> Option<Self> {
        (t.dtype == super::config::Precision::F16).then(|| Self::new(t.loss_scale))
    }

    /// Records one step's outcome; returns whether the step is applied. An overflow halves
    /// the scale and fails once the scale would drop below 1: then f16 cannot hold the
    /// unscaled gradients themselves.
    pub fn update(&mut self, finite: bool) -> Result<bool> {
        if finite {
            self.good_steps += 1;
            if self.good_steps >= Self::GROWTH_INTERVAL {
                self.scale *= 2.0;
                self.good_steps = 0;
            }
            return Ok(true);
        }
        self.good_steps = 0;
        self.scale /= 2.0;
        if self.scale < 1.0 {
            return Err(Error::Training(
                "the f16 gradients overflow even without loss scaling: this model's activations exceed f16's range; use train.dtype = \"bf16\" (or \"f32\")".into(),
            ));
        }
        Ok(false)
    }
}

#[cfg(test)]
mod scaler_tests {
    use super::LossScaler;

    #[test]
    fn overflow_halves_and_skips_finite_steps_grow_after_the_interval() {
        let mut s = LossScaler::new(65536.0);
        assert!(!s.update(false).unwrap(), "an overflowed step is skipped");
        assert_eq!(s.scale, 32768.0);
        for _ in 0..LossScaler::GROWTH_INTERVAL - 1 {
            assert!(s.update(true).unwrap());
        }
        assert_eq!(s.scale, 32768.0, "not before the interval");
        assert!(s.update(true).unwrap());
        assert_eq!((s.scale, s.good_steps), (65536.0, 0));
        // An overflow resets the count of finite steps.
        s.update(true).unwrap();
        s.update(false).unwrap();
        assert_eq!(s.good_steps, 0);
    }

    #[test]
    fn overflow_at_scale_one_is_an_error_naming_bf16() {
        let mut s = LossScaler::new(2.0);
        assert!(!s.update(false).unwrap());
        assert_eq!(s.scale, 1.0);
        let e = s.update(false).unwrap_err().to_string();
        assert!(e.contains("bf16") && e.contains("f16"), "{e}");
    }
}

#[cfg(test)]
mod adamw_tests {
    use candle_core::{DType, Device, Tensor, Var};

    use super::{global_norm, AdamW, AdamWParams};
    use crate::model::fused;

    fn random(shape: &[usize], seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        Tensor::from_vec((0..n).map(|_| rng.random::<f32>() - 0.5).collect::<Vec<_>>(), shape, &Device::Cpu).unwrap()
    }

    /// Six steps with weight decay: the fused AdamW (its CPU twin, forced) gives the tensor
    /// ops' parameters and moments, also after a save and restore of its state.
    #[test]
    fn fused_adamw_matches_the_tensor_ops() {
        let p = AdamWParams { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 };
        let make = || {
            let vars = vec![("a".to_string(), Var::from_tensor(&random(&[3, 5], 1)).unwrap()), ("b".to_string(), Var::from_tensor(&random(&[7], 2)).unwrap())];
            AdamW::new(vars, p.clone()).unwrap()
        };
        let (mut plain, mut fast) = (make(), make());
        (plain.in_place, fast.in_place) = (false, false);
        for step in 0..6u64 {
            let grads = vec![random(&[3, 5], 10 + step), random(&[7], 20 + step)];
            plain.step(&grads, 1e-2).unwrap();
            fused::forced(|| fast.step(&grads, 1e-2)).unwrap();
            if step == 2 {
                let state = fast.state().unwrap();
                fast = make();
                for ((_, v), (_, src)) in fast.vars.iter().zip(plain.vars()) {
                    v.set(src.as_tensor()).unwrap();
                }
                fast.restore(&state).unwrap();
            }
        }
        let diff = |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        for i in 0..2 {
            assert!(diff(plain.vars()[i].1.as_tensor(), fast.vars()[i].1.as_tensor()) < 1e-7, "parameter {i}");
            assert!(diff(&plain.m[i], &fast.m[i]) < 1e-8 && diff(&plain.v[i], &fast.v[i]) < 1e-8, "moments {i}");
        }
        assert_eq!(fast.m[0].dims(), &[3, 5]);
        assert!(diff(plain.vars()[0].1.as_tensor(), &random(&[3, 5], 1)) > 1e-3, "the parameters moved");
    }

    /// The CPU's in-place step (a variable of several parallel chunks, and a small one) gives
    /// the fused kernels' twin's values to the bit and the tensor ops' within rounding, over six
    /// steps with a save and restore of its state between; it writes the variable and the
    /// moments where they are.
    #[test]
    fn in_place_adamw_matches_the_fused_twin_and_the_tensor_ops() {
        let p = AdamWParams { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 };
        let big = [3 * fused::ADAMW_CHUNK + 17];
        let make = |in_place: bool| {
            let vars = vec![("a".to_string(), Var::from_tensor(&random(&big, 1)).unwrap()), ("b".to_string(), Var::from_tensor(&random(&[7], 2)).unwrap())];
            let mut o = AdamW::new(vars, p.clone()).unwrap();
            o.in_place = in_place;
            o
        };
        let (mut plain, mut twin, mut inplace) = (make(false), make(false), make(true));
        let storage = |t: &Tensor| match &*t.storage_and_layout().0 {
            candle_core::Storage::Cpu(c) => c.as_slice::<f32>().unwrap().as_ptr() as usize,
            _ => unreachable!("a CPU test"),
        };
        let before = (storage(inplace.vars()[0].1.as_tensor()), storage(&inplace.m[0]), storage(&inplace.v[0]));
        for step in 0..6u64 {
            let grads = vec![random(&big, 10 + step), random(&[7], 20 + step)];
            plain.step(&grads, 1e-2).unwrap();
            fused::forced(|| twin.step(&grads, 1e-2)).unwrap();
            inplace.step(&grads, 1e-2).unwrap();
            if step == 0 {
                assert_eq!(before, (storage(inplace.vars()[0].1.as_tensor()), storage(&inplace.m[0]), storage(&inplace.v[0])), "updated in place");
            }
            if step == 2 {
                let state = inplace.state().unwrap();
                let params: Vec<Tensor> = inplace.vars().iter().map(|(_, v)| v.as_tensor().copy().unwrap()).collect();
                inplace = make(true);
                for ((_, v), src) in inplace.vars.iter().zip(&params) {
                    v.set(src).unwrap();
                }
                inplace.restore(&state).unwrap();
            }
        }
        let diff = |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        for i in 0..2 {
            let (x, y) = (inplace.vars()[i].1.as_tensor(), twin.vars()[i].1.as_tensor());
            assert_eq!(x.flatten_all().unwrap().to_vec1::<f32>().unwrap(), y.flatten_all().unwrap().to_vec1::<f32>().unwrap(), "parameter {i} against the twin");
            assert_eq!(inplace.m[i].flatten_all().unwrap().to_vec1::<f32>().unwrap(), twin.m[i].flatten_all().unwrap().to_vec1::<f32>().unwrap(), "m {i}");
            assert_eq!(inplace.v[i].flatten_all().unwrap().to_vec1::<f32>().unwrap(), twin.v[i].flatten_all().unwrap().to_vec1::<f32>().unwrap(), "v {i}");
            assert!(diff(x, plain.vars()[i].1.as_tensor()) < 1e-7, "parameter {i} against the tensor ops");
            assert!(diff(&inplace.m[i], &plain.m[i]) < 1e-8 && diff(&inplace.v[i], &plain.v[i]) < 1e-8, "moments {i} against the tensor ops");
        }
        assert!(diff(inplace.vars()[0].1.as_tensor(), &random(&big, 1)) > 1e-3, "the parameters moved");
    }

    #[test]
    fn global_norm_is_the_l2_norm_of_all_gradients() {
        let grads = [Tensor::new(&[3f32, 0.0], &Device::Cpu).unwrap(), Tensor::new(&[[4f32]], &Device::Cpu).unwrap(), Tensor::zeros(0, DType::F32, &Device::Cpu).unwrap()];
        assert_eq!(global_norm(&grads).unwrap(), 5.0);
        assert_eq!(global_norm(&[]).unwrap(), 0.0);
    }
}
