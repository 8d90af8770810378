//! The training loop: micro-batches with gradient accumulation, AdamW, warmup + schedule,
//! global-norm clipping, periodic validation and atomic checkpoints, exact resume.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};

use super::checkpoint::{self, TrainerState};
use super::config::RunConfig;
use super::heldout;
use super::observer::{TrainEvent, TrainObserver};
use super::optim::{self, AdamW, AdamWParams};
use crate::data::{self, Batch, Batcher, ChatTemplate, DataOptions, Example};
use crate::model::{self, profile, ForwardCtx, LoadedModel};
use crate::peft::Adapter;
use crate::{Error, Result};

/// How to run (as opposed to what to train, which is the [`RunConfig`]).
#[derive(Clone, Default)]
pub struct TrainOptions {
    /// Continue from the newest checkpoint in the run folder.
    pub resume: bool,
    /// Continue from this checkpoint folder (the run store's newest recorded checkpoint);
    /// implies `resume`.
    pub resume_from: Option<PathBuf>,
    /// Set to request a graceful stop: checkpoint, then return.
    pub stop: Option<Arc<AtomicBool>>,
    /// Stop (as if requested) after this many steps in this session (tests, benchmarks).
    pub stop_after: Option<usize>,
    /// Skip the held-out generation check.
    pub skip_heldout: bool,
}

/// What a finished run reports.
#[derive(Clone, Debug)]
pub struct TrainSummary {
    /// Steps completed in total.
    pub steps: usize,
    /// Loss of every completed step (earlier sessions included when resumed).
    pub losses: Vec<f64>,
    /// Validation loss per evaluation (step, loss) in this session.
    pub val_losses: Vec<(usize, f64)>,
    /// Held-out score before training, when measured.
    pub heldout_before: Option<heldout::HeldoutReport>,
    /// Held-out score after training, when measured.
    pub heldout_after: Option<heldout::HeldoutReport>,
    /// The final adapter folder.
    pub adapter_dir: PathBuf,
    /// True when stopped early (resumable).
    pub stopped: bool,
}

/// The chat template a model ships, or ChatML.
pub fn template_for(m: &LoadedModel) -> Result<ChatTemplate> {
    template_for_spec(&m.spec)
}

/// The chat template of a tokenizer spec, or ChatML.
pub fn template_for_spec(spec: &model::TokenizerSpec) -> Result<ChatTemplate> {
    match &spec.chat_template {
        Some(src) => ChatTemplate::new(src, spec.bos_token.as_deref().unwrap_or(""), &spec.eos_token),
        None => Ok(ChatTemplate::chatml()),
    }
}

/// Mean validation loss per target token over `val`.
pub fn validate(m: &LoadedModel, val: &[Example], batch_size: usize, chunk: usize) -> Result<f64> {
    let mut sum = 0f64;
    let mut n = 0usize;
    for b in data::eval_batches(val, batch_size.max(1), m.spec.pad_id) {
        let ids = Tensor::from_slice(&b.input_ids, (b.batch_size, b.seq_len), m.model.device())?;
        let (l, k) = m.model.loss_sum(&ids, &b.labels, &ForwardCtx::default(), chunk)?;
        sum += l.to_scalar::<f32>()? as f64;
        n += k;
    }
    Ok(if n == 0 { f64::NAN } else { sum / n as f64 })
}

/// The base model of a run: dense in `dtype` (each tensor converted as it is read), or with
/// its projections in 4-bit blocks for qlora (the rest f32, cast by the caller).
pub fn load_base(cfg: &RunConfig, device: &Device, dtype: DType) -> Result<model::LoadedModel> {
    match cfg.peft {
        crate::peft::PeftConfig::Qlora(_) => model::load_4bit(&cfg.model_path(), device),
        _ => model::load_in(&cfg.model_path(), device, dtype),
    }
}

/// One micro-batch's share of the step loss (its cross-entropy sum over the step's
/// `n_targets` target tokens) and its gradients for `vars` (values only, no graph). A method's
/// penalty (AdaLoRA's) is added to the gradient, once per optimizer step over the
/// micro-batches; the reported loss stays the cross-entropy. `loss_scale` (f16's dynamic
/// loss scale, 1 otherwise) multiplies what the backward starts from, and the gradients come
/// back divided by it again (inf/NaN when they overflowed f16 on the way).
#[allow(clippy::too_many_arguments)]
pub(super) fn micro_grads(
    model: &model::Llama,
    adapter: &Adapter,
    ids: &Tensor,
    labels: &[i64],
    ctx: &ForwardCtx,
    t: &super::config::TrainSection,
    n_targets: usize,
    vars: &[(String, candle_core::Var)],
    loss_scale: f64,
) -> Result<(f64, Vec<Option<Tensor>>)> {
    let scale = 1.0 / n_targets as f64;
    let unscale = |grads: Vec<Option<Tensor>>| -> Result<Vec<Option<Tensor>>> {
        if loss_scale == 1.0 {
            return Ok(grads);
        }
        Ok(grads.into_iter().map(|g| g.map(|g| g * (1.0 / loss_scale)).transpose()).collect::<candle_core::Result<_>>()?)
    };
    // candle leaves a variable's gradient attached to the graph it came from when the
    // variable met another tracked tensor (DoRA's `m / ‖W + s·B·A‖`): kept in the optimizer's
    // moments, that graph (and every earlier step's) would stay alive. Only values go on.
    let collect = |store: &candle_core::backprop::GradStore| -> Vec<Option<Tensor>> {
        vars.iter().map(|(_, v)| store.get(v.as_tensor()).map(|g| g.detach())).collect()
    };
    if t.gradient_checkpointing {
        let tensors: Vec<&Tensor> = vars.iter().map(|(_, v)| v.as_tensor()).collect();
        let (sum, _, mut grads) = model.loss_grads_checkpointed(ids, labels, ctx, t.loss_chunk, scale * loss_scale, &tensors)?;
        let lv = sum.to_scalar::<f32>()? as f64 * scale;
        if let Some(r) = adapter.regularizer(ctx)? {
            model::llama::add_grads(&mut grads, collect(&(r * (loss_scale / t.grad_accum as f64))?.backward()?))?;
        }
        return unscale(grads).map(|g| (lv, g));
    }
    let dev = model.device();
    let (lv, loss) = profile::region("forward", dev, || -> Result<_> {
        let (sum, _) = model.loss_sum(ids, labels, ctx, t.loss_chunk)?;
        let lv = sum.to_scalar::<f32>()? as f64 * scale;
        let loss = (sum * (scale * loss_scale))?;
        let loss = match adapter.regularizer(ctx)? {
            Some(r) => (loss + (r * (loss_scale / t.grad_accum as f64))?)?,
            None => loss,
        };
        Ok((lv, loss))
    })?;
    if !lv.is_finite() {
        return Ok((lv, vec![None; vars.len()]));
    }
    let grads = profile::region("backward", dev, || loss.backward())?;
    unscale(collect(&grads)).map(|g| (lv, g))
}

/// An out-of-memory error becomes one that says what to change.
fn out_of_memory(e: Error, device: &Device, cfg: &RunConfig) -> Error {
    let qlora = matches!(cfg.peft, crate::peft::PeftConfig::Qlora(_));
    crate::device::with_out_of_memory_advice(e, device, cfg.train.batch_size, cfg.data.max_len, cfg.train.gradient_checkpointing, qlora)
}

/// Runs (or resumes) a training run end to end.
pub fn train(cfg: &RunConfig, opts: &TrainOptions, obs: &mut dyn TrainObserver) -> Result<TrainSummary> {
    let device = crate::device::open(&cfg.train.device, "train.device")?;
    let out_dir = cfg.output_dir();
    std::fs::create_dir_all(&out_dir).map_err(|e| Error::io(&out_dir, e))?;
    let cfg_text = toml::to_string_pretty(cfg).map_err(|e| Error::Msg(e.to_string()))?;
    checkpoint::atomic_write(&out_dir.join("config.toml"), |p| std::fs::write(p, &cfg_text).map_err(|e| Error::io(p, e)))?;

    // The model itself may not fit on the device. Mixed precision loads the base in its 16-bit
    // dtype tensor by tensor (QLoRA's blocks stay blocks; the rest is cast below).
    let mut m = load_base(cfg, &device, cfg.train.dtype.base_dtype()).map_err(|e| out_of_memory(e, &device, cfg))?;
    if cfg.train.dtype != super::config::Precision::F32 {
        m.model.cast(cfg.train.dtype.base_dtype()).map_err(|e| out_of_memory(e, &device, cfg))?;
    }
    // A GPU step's widest activation must fit candle's 32-bit element counts.
    let rows = cfg.data.max_len + cfg.peft.num_virtual_tokens();
    if let Some(why) = crate::device::activation_too_large(&device, cfg.train.batch_size, rows, m.model.config()) {
        return Err(Error::config("train.batch_size", why));
    }
    let template = template_for(&m)?;
    let d = &cfg.data;
    let data_opts = DataOptions {
        format: d.format,
        max_len: d.max_len,
        train_on_prompt: d.train_on_prompt,
        val_fraction: d.val_fraction,
        val_max: d.val_max,
        seed: cfg.seed,
        max_examples: d.max_examples,
    };
    let dataset = data::load_dataset(&d.path, &data_opts, &template, &m.tokenizer)?;
    obs.on_event(&TrainEvent::Message {
        text: format!(
            "device: {}, {}{}",
            crate::device::describe(&device),
            match cfg.train.dtype {
                super::config::Precision::F32 => "f32".to_string(),
                super::config::Precision::Bf16 => "bf16 base and activations, f32 adapter and optimizer".to_string(),
                super::config::Precision::F16 => format!(
                    "f16 base and activations with dynamic loss scaling (from {}), f32 adapter and optimizer",
                    cfg.train.loss_scale
                ),
            },
            if cfg.train.gradient_checkpointing { ", gradient checkpointing per decoder layer" } else { "" }
        ),
    });
    if dataset.train.is_empty() {
        return Err(Error::bad_input(&d.path, None, "no training examples left after the validation split"));
    }
    obs.on_event(&TrainEvent::Message {
        text: format!(
            "data: {} train / {} val examples, {} tokens, {} truncated",
            dataset.train.len(),
            dataset.val.len(),
            dataset.stats.tokens,
            dataset.stats.truncated
        ),
    });

    let heldout_prompts = match (&cfg.eval.prompts, opts.skip_heldout) {
        (Some(p), false) => Some(heldout::read_prompts(p)?),
        _ => None,
    };
    let mut heldout_before = None;
    let resuming = opts.resume || opts.resume_from.is_some();
    if let (Some(prompts), true, false) = (&heldout_prompts, cfg.eval.before, resuming) {
        let r = heldout::score(&m, &template, prompts, cfg.eval.max_new_tokens, |_, _| {})?;
        obs.on_event(&TrainEvent::Heldout { phase: "before".into(), correct: r.correct, total: r.total });
        heldout_before = Some(r);
    }

    let virt = cfg.peft.num_virtual_tokens();
    if virt > 0 && d.max_len + virt > m.model.config().max_position_embeddings {
        return Err(Error::config(
            "peft.num_virtual_tokens",
            format!(
                "{virt} virtual tokens + data.max_len {} exceed the model's context ({} positions); lower one of them",
                d.max_len,
                m.model.config().max_position_embeddings
            ),
        ));
    }
    let t = &cfg.train;
    let mut batcher = Batcher::new(dataset.train.len(), t.batch_size, cfg.seed, m.spec.pad_id);
    let micro_per_epoch = batcher.steps_per_epoch();
    let total_steps = if t.max_steps > 0 {
        t.max_steps
    } else {
        ((t.epochs * micro_per_epoch as f64) / t.grad_accum as f64).ceil().max(1.0) as usize
    };
    // AdaLoRA's rank schedule runs over the whole run unless its config says otherwise.
    let adapter = Adapter::inject_with(&mut m.model, &cfg.peft.for_steps(total_steps), cfg.seed, Some(&m.tokenizer))?;
    // The held-out check before training has run: full fine-tuning's frozen base becomes a view
    // of the trained weights instead of a second copy.
    adapter.share_base_with_trained(&mut m.model)?;
    let vars = adapter.trainable();
    let mut opt = AdamW::new(
        vars.clone(),
        AdamWParams { beta1: t.adam_beta1, beta2: t.adam_beta2, eps: t.adam_eps, weight_decay: t.weight_decay },
    )?;
    let warmup = if t.warmup_steps > 0 { t.warmup_steps } else { (t.warmup_ratio * total_steps as f64).round() as usize };

    let ckpt_dir = out_dir.join("checkpoints");
    let mut state = TrainerState {
        step: 0,
        tokens_seen: 0,
        batcher: serde_json::Value::Null,
        seed: cfg.seed,
        elapsed_s: 0.0,
        val_loss: None,
        losses: vec![],
        loss_scale: optim::LossScaler::for_run(&cfg.train),
    };
    if resuming {
        let last = match &opts.resume_from {
            Some(dir) => dir.clone(),
            None => match checkpoint::list(&ckpt_dir).pop() {
                Some((_, last)) => last,
                None => return Err(Error::Msg(format!("nothing to resume: no checkpoint in {}", ckpt_dir.display()))),
            },
        };
        let ck = checkpoint::load(&last, &device)?;
        // Prompt encoders are saved only as their output, AdaLoRA only with its kept ranks:
        // their trainable tensors (and AdaLoRA's allocator) are in a file of their own.
        let wpath = match ck.adapter_dir.join(crate::peft::TRAINABLE_FILE) {
            p if p.exists() => p,
            _ => ck.adapter_dir.join("adapter_model.safetensors"),
        };
        let w = candle_core::safetensors::load(&wpath, &device).map_err(|e| Error::bad_input(&wpath, None, e.to_string()))?;
        for (k, v) in &vars {
            let t = w.get(k).ok_or_else(|| Error::bad_input(&wpath, None, format!("checkpoint has no `{k}`")))?;
            v.set(t)?;
        }
        adapter.restore_state(&w)?;
        opt.restore(&ck.optim)?;
        let bs: data::BatcherState =
            serde_json::from_value(ck.state.batcher.clone()).map_err(|e| Error::bad_input(&last, None, format!("data position: {e}")))?;
        batcher.restore(bs);
        state = ck.state;
        // A checkpoint of a run whose precision changed on resume scales as the new one.
        if state.loss_scale.is_some() != (t.dtype == super::config::Precision::F16) {
            state.loss_scale = optim::LossScaler::for_run(t);
        }
        obs.on_event(&TrainEvent::Message { text: format!("resumed from {} (step {})", last.display(), state.step) });
    }

    obs.on_event(&TrainEvent::Started {
        total_steps,
        start_step: state.step,
        train_examples: dataset.train.len(),
        val_examples: dataset.val.len(),
        trainable_params: adapter.num_params(),
        total_params: m.model.num_params(),
    });

    let base_name = cfg.model_path().display().to_string();
    // A checkpoint is announced (and recorded by the store) before older ones are pruned, so
    // the newest recorded checkpoint always exists on disk.
    let save_ckpt = |state: &TrainerState, opt: &AdamW, obs: &mut dyn TrainObserver| -> Result<PathBuf> {
        let dir = ckpt_dir.join(checkpoint::dir_name(state.step));
        let save_adapter = |p: &std::path::Path| -> Result<()> {
            adapter.save(p, &base_name)?;
            if adapter.needs_trainable_file() {
                adapter.save_trainable(p)?;
            }
            Ok(())
        };
        checkpoint::save(&dir, save_adapter, &opt.state()?, state)?;
        obs.on_event(&TrainEvent::Checkpoint { step: state.step, path: dir.display().to_string() });
        let all = checkpoint::list(&ckpt_dir);
        if all.len() > t.keep_checkpoints.max(1) {
            for (step, old) in &all[..all.len() - t.keep_checkpoints.max(1)] {
                if checkpoint::remove(old).is_ok() {
                    obs.on_event(&TrainEvent::CheckpointRemoved { step: *step });
                }
            }
        }
        Ok(dir)
    };

    let session_start = Instant::now();
    let elapsed_before = state.elapsed_s;
    let mut val_losses = Vec::new();
    let mut stopped = false;
    let mut session_steps = 0usize;
    while state.step < total_steps {
        let step_start = Instant::now();
        let micro: Vec<Batch> = (0..t.grad_accum).map(|_| batcher.next_batch(&dataset.train)).collect();
        let n_targets: usize = micro.iter().map(|b| b.n_target_tokens).sum();
        let mut acc: Vec<Option<Tensor>> = vec![None; vars.len()];
        let mut loss_total = 0f64;
        let mut step_tokens = 0u64;
        for (mi, b) in micro.iter().enumerate() {
            step_tokens += (b.batch_size * b.seq_len) as u64;
            if n_targets == 0 {
                continue;
            }
            let ids = Tensor::from_slice(&b.input_ids, (b.batch_size, b.seq_len), &device)?;
            let ctx = ForwardCtx { train: true, seed: cfg.seed ^ ((state.step as u64) << 20) ^ mi as u64, ..Default::default() };
            let loss_scale = state.loss_scale.map_or(1.0, |s| s.scale);
            let (lv, grads) =
                micro_grads(&m.model, &adapter, &ids, &b.labels, &ctx, t, n_targets, &vars, loss_scale).map_err(|e| out_of_memory(e, &device, cfg))?;
            if !lv.is_finite() {
                let lr = optim::lr_at(state.step, total_steps, warmup, t.lr, t.schedule, t.min_lr_ratio);
                let f16 = if t.dtype == super::config::Precision::F16 {
                    " In f16 the forward pass itself can overflow: train.dtype = \"bf16\" has f32's range."
                } else {
                    ""
                };
                return Err(Error::Training(format!(
                    "the loss became {lv} at step {}; nothing was saved from this step. Lower train.lr (now {lr:.2e}) or train.max_grad_norm and resume from the last checkpoint.{f16}",
                    state.step + 1
                )));
            }
            loss_total += lv;
            model::llama::add_grads(&mut acc, grads)?;
        }
        let mut grads: Vec<Tensor> =
            acc.into_iter().zip(&vars).map(|(g, (_, v))| g.map(Ok).unwrap_or_else(|| v.zeros_like())).collect::<candle_core::Result<_>>()?;
        let grad_norm = optim::clip_grad_norm(&mut grads, t.max_grad_norm).map_err(|e| out_of_memory(e, &device, cfg))?;
        if let Some(scaler) = state.loss_scale.as_mut() {
            // f16: gradients that overflowed skip the step (its batches are used up) and
            // halve the scale, as PyTorch's GradScaler does.
            let before = scaler.scale;
            if !scaler.update(grad_norm.is_finite())? {
                obs.on_event(&TrainEvent::Message {
                    text: format!(
                        "step {}: the f16 gradients overflowed at loss scale {before}; step skipped, loss scale now {}",
                        state.step + 1,
                        scaler.scale
                    ),
                });
                continue;
            }
        }
        if !grad_norm.is_finite() {
            return Err(Error::Training(format!("the gradient norm became {grad_norm} at step {}; lower train.lr", state.step + 1)));
        }
        let lr = optim::lr_at(state.step, total_steps, warmup, t.lr, t.schedule, t.min_lr_ratio);
        opt.step(&grads, lr).map_err(|e| out_of_memory(e, &device, cfg))?;
        adapter.after_step(state.step, &grads).map_err(|e| out_of_memory(e, &device, cfg))?;
        state.step += 1;
        session_steps += 1;
        state.tokens_seen += step_tokens;
        state.losses.push(loss_total);
        state.batcher = serde_json::to_value(batcher.state()).map_err(|e| Error::Msg(e.to_string()))?;
        state.elapsed_s = elapsed_before + session_start.elapsed().as_secs_f64();
        let dt = step_start.elapsed().as_secs_f64();
        obs.on_event(&TrainEvent::Step {
            step: state.step,
            loss: loss_total,
            lr,
            grad_norm,
            tokens_seen: state.tokens_seen,
            tokens_per_s: step_tokens as f64 / dt.max(1e-9),
            elapsed_s: state.elapsed_s,
        });
        let last = state.step == total_steps;
        if !dataset.val.is_empty() && ((t.eval_steps > 0 && state.step.is_multiple_of(t.eval_steps)) || last) {
            let vl = validate(&m, &dataset.val, t.batch_size, t.loss_chunk).map_err(|e| out_of_memory(e, &device, cfg))?;
            state.val_loss = Some(vl);
            val_losses.push((state.step, vl));
            obs.on_event(&TrainEvent::Eval { step: state.step, val_loss: vl, perplexity: vl.exp() });
            if let Some(prompts) = &heldout_prompts {
                let k = cfg.eval.samples.min(prompts.len());
                if k > 0 {
                    let r = heldout::score(&m, &template, &prompts[..k], cfg.eval.max_new_tokens, |_, _| {})?;
                    for a in r.answers {
                        obs.on_event(&TrainEvent::Sample { step: state.step, prompt: a.prompt, output: a.answer });
                    }
                }
            }
        }
        let stop_requested = opts.stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst))
            || opts.stop_after.is_some_and(|n| session_steps >= n && !last);
        if (t.save_steps > 0 && state.step.is_multiple_of(t.save_steps)) || last || stop_requested {
            save_ckpt(&state, &opt, obs)?;
        }
        if stop_requested {
            stopped = true;
            break;
        }
    }

    // A stopped run's newest adapter is the one in its last checkpoint.
    let adapter_dir = if stopped {
        ckpt_dir.join(checkpoint::dir_name(state.step)).join(checkpoint::ADAPTER_DIR)
    } else {
        let dir = out_dir.join("adapter");
        adapter.save(&dir, &base_name)?;
        dir
    };
    let mut heldout_after = None;
    if let (Some(prompts), false) = (&heldout_prompts, stopped) {
        let r = heldout::score(&m, &template, prompts, cfg.eval.max_new_tokens, |_, _| {})?;
        obs.on_event(&TrainEvent::Heldout { phase: "after".into(), correct: r.correct, total: r.total });
        let report = serde_json::to_string_pretty(&r).map_err(|e| Error::Msg(e.to_string()))?;
        let p = out_dir.join("heldout_after.json");
        checkpoint::atomic_write(&p, |tmp| std::fs::write(tmp, &report).map_err(|e| Error::io(tmp, e)))?;
        heldout_after = Some(r);
    }
    obs.on_event(&TrainEvent::Finished { step: state.step, stopped, adapter: adapter_dir.display().to_string() });
    Ok(TrainSummary { steps: state.step, losses: state.losses, val_losses, heldout_before, heldout_after, adapter_dir, stopped })
}
