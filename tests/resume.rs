//! Exact resume on the real default model: a run stopped after k steps and resumed from its
//! checkpoint has the same loss at every later step as an uninterrupted run (same seed), and
//! ends with the same adapter — for LoRA, and for P-tuning, whose prompt encoder is not in the
//! adapter file (only its output is) and comes back from the checkpoint's own file — and for full
//! fine-tuning, whose "adapter" is every weight of the model, and for AdaLoRA, whose rank
//! allocator's state is in the checkpoint's own file too.

mod common;

use tunebench::train::{self, observer::NoObserver, RunConfig, TrainOptions};

fn lora(dropout: f64) -> String {
    format!("method = \"lora\"\nr = 4\nlora_alpha = 8\nlora_dropout = {dropout}\ntarget_modules = [\"q_proj\", \"v_proj\", \"down_proj\"]")
}

fn config(out: &std::path::Path, peft: &str) -> RunConfig {
    // Full fine-tuning wants a far smaller rate than the adapters.
    let lr = if peft.contains("\"full\"") { 5e-5 } else { 1e-3 };
    let text = format!(
        r#"
name = "resume-test"
seed = 7
[model]
path = "{model}"
[data]
path = "{data}"
max_len = 64
val_fraction = 0.1
val_max = 4
[peft]
{peft}
[train]
max_steps = 6
batch_size = 2
grad_accum = 2
lr = {lr}
warmup_steps = 2
save_steps = 100
eval_steps = 3
[output]
dir = "{out}"
"#,
        model = common::default_model().display(),
        data = concat!(env!("CARGO_MANIFEST_DIR"), "/assets/datasets/persona/train.jsonl"),
        out = out.display(),
    );
    RunConfig::from_toml(&text, None).unwrap()
}

#[test]
fn resumed_run_matches_uninterrupted_run() {
    // Dropout on, so the resumed run must also reproduce the random masks.
    check_resume(&lora(0.1));
}

#[test]
fn resumed_prompt_encoder_run_matches_uninterrupted_run() {
    // An LSTM prompt encoder with dropout between its layers.
    check_resume(
        "method = \"p_tuning\"\nnum_virtual_tokens = 8\nencoder_reparameterization_type = \"LSTM\"\nencoder_hidden_size = 32\nencoder_dropout = 0.1",
    );
}

#[test]
fn resumed_adalora_run_matches_uninterrupted_run() {
    // The rank allocator's estimates and masks come back from the checkpoint: ranks are
    // reallocated at every step of this 6-step schedule (including the steps after the stop).
    check_resume("method = \"adalora\"\ninit_r = 4\ntarget_r = 2\nlora_alpha = 8\ntarget_modules = [\"q_proj\", \"v_proj\", \"down_proj\"]\nlora_dropout = 0.1");
}

#[test]
fn resumed_full_fine_tuning_run_matches_uninterrupted_run() {
    // Every weight (the tied embedding/LM head included) and its AdamW state.
    check_resume("method = \"full\"");
}

/// The two adapter files hold the same tensors (same shapes — AdaLoRA: the same ranks kept,
/// possibly none — and values within `tol`).
fn assert_same_adapter(a: &std::path::Path, b: &std::path::Path, tol: f32) {
    let wa = candle_core::safetensors::load(a.join("adapter_model.safetensors"), &candle_core::Device::Cpu).unwrap();
    let wb = candle_core::safetensors::load(b.join("adapter_model.safetensors"), &candle_core::Device::Cpu).unwrap();
    assert_eq!(wa.len(), wb.len());
    for (k, x) in &wa {
        assert_eq!(x.dims(), wb[k].dims(), "{k}");
        if x.elem_count() == 0 {
            continue;
        }
        let d = (x - &wb[k]).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(d < tol, "{k} differs by {d}");
    }
}

fn check_resume(peft: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let full_cfg = config(&tmp.path().join("full"), peft);
    let full = train::train(&full_cfg, &TrainOptions::default(), &mut NoObserver).unwrap();
    assert_eq!(full.losses.len(), 6);

    let cfg = config(&tmp.path().join("split"), peft);
    let first = train::train(&cfg, &TrainOptions { stop_after: Some(3), ..Default::default() }, &mut NoObserver).unwrap();
    assert!(first.stopped);
    assert_eq!(first.losses.len(), 3);
    assert!(first.adapter_dir.join("adapter_model.safetensors").exists(), "a stopped run points at its checkpoint's adapter");
    let ckpts = train::checkpoint::list(&tmp.path().join("split/checkpoints"));
    assert_eq!(ckpts.iter().map(|c| c.0).collect::<Vec<_>>(), vec![3], "one checkpoint, at the stop");
    let second = train::train(&cfg, &TrainOptions { resume: true, ..Default::default() }, &mut NoObserver).unwrap();
    assert!(!second.stopped);
    assert_eq!(second.losses.len(), 6);
    for (i, (a, b)) in full.losses.iter().zip(&second.losses).enumerate() {
        assert!((a - b).abs() <= 1e-6 * a.abs().max(1.0), "step {}: uninterrupted {a} vs resumed {b}", i + 1);
    }
    assert_same_adapter(&full.adapter_dir, &second.adapter_dir, 1e-5);
    // No half-written checkpoint folders are left behind.
    for e in std::fs::read_dir(tmp.path().join("split/checkpoints")).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!name.starts_with('.'), "temporary checkpoint left: {name}");
    }
}

#[test]
fn resume_without_checkpoint_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(&tmp.path().join("none"), &lora(0.0));
    let err = train::train(&cfg, &TrainOptions { resume: true, ..Default::default() }, &mut NoObserver).unwrap_err().to_string();
    assert!(err.contains("nothing to resume"), "{err}");
}

/// Gradient checkpointing per decoder layer trains exactly like the plain backward on the real
/// default model: the same loss at every step (dropout on, two micro-batches per step) and the
/// same adapter — for LoRA, and for AdaLoRA, whose orthogonality penalty then takes a
/// backward of its own.
#[test]
fn checkpointed_training_matches_plain_training() {
    for peft in [
        lora(0.1),
        "method = \"adalora\"\ninit_r = 4\ntarget_r = 2\nlora_alpha = 8\ntarget_modules = [\"q_proj\", \"v_proj\", \"down_proj\"]".to_string(),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let plain = train::train(&config(&tmp.path().join("plain"), &peft), &TrainOptions::default(), &mut NoObserver).unwrap();
        let mut cfg = config(&tmp.path().join("ckpt"), &peft);
        cfg.train.gradient_checkpointing = true;
        let ckpt = train::train(&cfg, &TrainOptions::default(), &mut NoObserver).unwrap();
        assert_eq!(plain.losses.len(), ckpt.losses.len());
        for (i, (a, b)) in plain.losses.iter().zip(&ckpt.losses).enumerate() {
            assert!((a - b).abs() <= 1e-5 * a.abs().max(1.0), "step {}: plain {a} vs checkpointed {b}", i + 1);
        }
        assert_same_adapter(&plain.adapter_dir, &ckpt.adapter_dir, 1e-4);
    }
}

#[test]
fn the_device_is_checked_before_anything_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let text = "[data]\npath = \"x.jsonl\"\n[train]\ndevice = \"tpu:0\"\n";
    let e = RunConfig::from_toml(&text, None).unwrap_err().to_string();
    assert!(e.contains("train.device") && e.contains("tpu:0") && e.contains("cuda:N"), "{e}");
    if !tunebench::device::CUDA_BUILD {
        let mut cfg = config(&tmp.path().join("gpu"), &lora(0.0));
        cfg.train.device = "cuda:1".into();
        let e = train::train(&cfg, &TrainOptions::default(), &mut NoObserver).unwrap_err().to_string();
        assert!(e.contains("without CUDA support") && e.contains("scripts/build-cuda"), "{e}");
        assert!(!tmp.path().join("gpu").exists(), "nothing is written for a run that cannot start");
    }
}

/// `tunebench bench-train` on a random-init shape (what bench/gpu_bench.py runs on a GPU):
/// with and without gradient checkpointing the same losses at every step, on the device named.
#[test]
fn bench_train_runs_a_shape_with_and_without_checkpointing() {
    let run = |extra: &[&str]| -> serde_json::Value {
        let mut args = vec!["bench-train", "--shape", "tiny", "--batch", "2", "--seq", "24", "--warmup-steps", "1", "--steps", "3", "--lr", "1e-2", "--device", "cpu"];
        args.extend_from_slice(extra);
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tunebench")).args(&args).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let plain = run(&[]);
    let ckpt = run(&["--gradient-checkpointing"]);
    assert_eq!(plain["device"], "cpu");
    let (a, b) = (plain["losses"].as_array().unwrap(), ckpt["losses"].as_array().unwrap());
    assert_eq!(a.len(), 4);
    for (x, y) in a.iter().zip(b) {
        let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
        assert!((x - y).abs() < 1e-5 * x.abs(), "plain {x} vs checkpointed {y}");
    }
    assert!(a[3].as_f64() < a[0].as_f64(), "the loss falls on repeated batches: {a:?}");
    assert!(plain["tokens_per_s"].as_f64().unwrap() > 0.0);
    // The estimate of the same run rides along (checkpointing predicts no more; this shape's
    // two layers leave it next to nothing to save).
    let est = |r: &serde_json::Value| r["estimated_peak_bytes"].as_u64().unwrap();
    assert!(est(&plain) >= est(&ckpt) && est(&ckpt) > 0, "{} {}", est(&plain), est(&ckpt));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tunebench")).args(["bench-train", "--shape", "llama-7b"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("unknown shape") && err.contains("llama-1b"), "{err}");
    // --profile: steps after the timed ones, each region by name; the timed steps' losses are
    // unchanged; with checkpointing the recomputed layers are a region of their own.
    for (extra, recompute) in [(&["--profile", "2"][..], false), (&["--profile", "2", "--gradient-checkpointing"][..], true)] {
        let p = run(extra);
        assert_eq!(p["losses"], plain["losses"], "profiling changes nothing in the timed steps");
        let rows = p["profile"].as_array().unwrap();
        let get = |name: &str| rows.iter().find(|r| r["region"] == name).unwrap_or_else(|| panic!("no region {name}: {rows:?}"));
        let layers = 2.0; // the tiny shape
        assert_eq!(get("lora product fwd")["calls_per_step"].as_f64().unwrap(), 7.0 * layers * if recompute { 2.0 } else { 1.0 });
        assert_eq!(get("lora product bwd")["calls_per_step"].as_f64().unwrap(), 7.0 * layers);
        for name in ["attention fwd", "attention bwd", "swiglu fwd", "swiglu bwd", "rms_norm fwd", "lm head + loss fwd", "backward", "optimizer"] {
            assert!(get(name)["seconds_per_step"].as_f64().unwrap() >= 0.0);
        }
        // q, k and v come out of LoRA's op already per head (`ops::Epilogue::Heads`): no
        // split of its own runs.
        assert!(!rows.iter().any(|r| r["region"] == "split heads fwd" || r["region"] == "split heads bwd"), "{rows:?}");
        // down_proj's LoRA op makes SwiGLU's product itself, and again in its backward
        // (`ops::lora_linear_swiglu`): the graph never holds it.
        assert_eq!(get("swiglu fwd")["calls_per_step"].as_f64().unwrap(), layers * if recompute { 3.0 } else { 2.0 });
        assert_eq!(get("swiglu bwd")["calls_per_step"].as_f64().unwrap(), layers);
        assert_eq!(rows.iter().any(|r| r["region"] == "forward (recompute)"), recompute);
        let share: f64 = rows.iter().map(|r| r["share"].as_f64().unwrap()).sum();
        assert!((share - 1.0).abs() < 1e-6, "{share}");
        assert!(plain.get("profile").is_none());
    }
    // --peft: any method instead of LoRA (both start from the base's loss, their identity
    // inits; then IA3 trains its own way, no LoRA op runs, and the estimate is IA3's); a bad
    // key is named.
    let ia3 = run(&["--peft", "method = \"ia3\"", "--profile", "1"]);
    let l = ia3["losses"].as_array().unwrap();
    assert!(l[0] == a[0] && l[1] != a[1], "IA3's own losses: {l:?} (LoRA {a:?})");
    let rows = ia3["profile"].as_array().unwrap();
    assert!(rows.iter().any(|r| r["region"] == "adapter fwd") && !rows.iter().any(|r| r["region"] == "lora product fwd"), "{rows:?}");
    assert!(est(&ia3) < est(&plain), "IA3 trains far fewer parameters: {} vs {}", est(&ia3), est(&plain));
    // QLoRA: the shape's projections held as 4-bit blocks, as the trainer loads a QLoRA base,
    // so its first loss is the quantized base's: near LoRA's (the same weights, rounded), not
    // equal to it.
    let q = run(&["--peft", "method = \"qlora\"\nr = 16\nlora_alpha = 32\ntarget_modules = \"all-linear\""]);
    let ql = q["losses"].as_array().unwrap();
    let (q0, a0) = (ql[0].as_f64().unwrap(), a[0].as_f64().unwrap());
    assert!(q0 != a0 && (q0 - a0).abs() < 0.05 * a0, "QLoRA's first loss {q0} against LoRA's {a0}");
    assert!(ql[3].as_f64() < ql[0].as_f64(), "QLoRA's loss falls: {ql:?}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tunebench"))
        .args(["bench-train", "--shape", "tiny", "--peft", "method = \"ia3\"\nfeedforward_modules = [\"nope\"]"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--peft") && err.contains("feedforward_modules"), "{err}");
}

/// Mixed precision on the real default model: a bf16 run's loss curve follows the f32 run's
/// within bf16's tolerance at every step (same seed, data and adapter initialisation), and its
/// adapter is saved in f32. Full fine-tuning refuses bf16 with the key named.
#[test]
fn bf16_training_follows_the_f32_loss_curve() {
    let tmp = tempfile::tempdir().unwrap();
    let f32_run = train::train(&config(&tmp.path().join("f32"), &lora(0.0)), &TrainOptions::default(), &mut NoObserver).unwrap();
    let mut cfg = config(&tmp.path().join("bf16"), &lora(0.0));
    cfg.train.dtype = tunebench::train::config::Precision::Bf16;
    let bf16_run = train::train(&cfg, &TrainOptions::default(), &mut NoObserver).unwrap();
    for (i, (a, b)) in f32_run.losses.iter().zip(&bf16_run.losses).enumerate() {
        assert!((a - b).abs() <= 0.03 * a.abs(), "step {}: f32 {a} vs bf16 {b}", i + 1);
    }
    let w = candle_core::safetensors::load(bf16_run.adapter_dir.join("adapter_model.safetensors"), &candle_core::Device::Cpu).unwrap();
    assert!(w.values().all(|t| t.dtype() == candle_core::DType::F32), "the adapter is saved in f32");

    let text = "[data]\npath = \"x.jsonl\"\n[peft]\nmethod = \"full\"\n[train]\ndtype = \"bf16\"\n";
    let e = RunConfig::from_toml(text, None).unwrap_err().to_string();
    assert!(e.contains("train.dtype") && e.contains("f32"), "{e}");
}

/// f16 with dynamic loss scaling on the real default model: with the default scale the loss
/// curve follows the f32 run's within half precision's tolerance and the adapter is saved in
/// f32. Started at a scale far beyond f16's range (2²⁰; it overflows above 2¹⁶ here), the first steps' gradients overflow:
/// each is skipped (announced, its batches used up) and the scale halves until they fit, and
/// the run still makes its 6 updates with finite losses. Stopped after 3 steps and resumed,
/// that run gives the uninterrupted run's losses and adapter: the scale and the skipped
/// batches come back from the checkpoint.
#[test]
fn f16_training_scales_the_loss_and_resumes_exactly() {
    use tunebench::train::config::Precision;
    use tunebench::train::observer::{Collect, TrainEvent};
    let tmp = tempfile::tempdir().unwrap();
    let f32_run = train::train(&config(&tmp.path().join("f32"), &lora(0.0)), &TrainOptions::default(), &mut NoObserver).unwrap();
    let mut cfg = config(&tmp.path().join("f16"), &lora(0.0));
    cfg.train.dtype = Precision::F16;
    let mut events = Collect::default();
    let f16_run = train::train(&cfg, &TrainOptions::default(), &mut events).unwrap();
    for (i, (a, b)) in f32_run.losses.iter().zip(&f16_run.losses).enumerate() {
        assert!((a - b).abs() <= 0.03 * a.abs(), "step {}: f32 {a} vs f16 {b}", i + 1);
    }
    assert_ne!(f32_run.losses, f16_run.losses, "f16 must actually run in f16");
    let w = candle_core::safetensors::load(f16_run.adapter_dir.join("adapter_model.safetensors"), &candle_core::Device::Cpu).unwrap();
    assert!(w.values().all(|t| t.dtype() == candle_core::DType::F32), "the adapter is saved in f32");

    let overflowing = |dir: &str| {
        let mut c = config(&tmp.path().join(dir), &lora(0.0));
        c.train.dtype = Precision::F16;
        c.train.loss_scale = 2f64.powi(20);
        // One micro-batch a step: the skipped steps cost half as much.
        c.train.grad_accum = 1;
        c
    };
    let mut events = Collect::default();
    let full = train::train(&overflowing("big"), &TrainOptions::default(), &mut events).unwrap();
    let skips: Vec<String> = events
        .0
        .iter()
        .filter_map(|e| match e {
            TrainEvent::Message { text } if text.contains("overflowed") => Some(text.clone()),
            _ => None,
        })
        .collect();
    assert!(!skips.is_empty(), "a loss scale of 2^20 must overflow f16");
    assert!(skips[0].contains("step 1") && skips[0].contains("1048576") && skips[0].contains("524288"), "{}", skips[0]);
    assert_eq!(full.losses.len(), 6);
    assert!(full.losses.iter().all(|l| l.is_finite()));
    let steps = events.0.iter().filter(|e| matches!(e, TrainEvent::Step { .. })).count();
    assert_eq!(steps, 6, "skipped steps are not counted");

    let cfg = overflowing("split");
    train::train(&cfg, &TrainOptions { stop_after: Some(3), ..Default::default() }, &mut NoObserver).unwrap();
    let second = train::train(&cfg, &TrainOptions { resume: true, ..Default::default() }, &mut NoObserver).unwrap();
    for (i, (a, b)) in full.losses.iter().zip(&second.losses).enumerate() {
        assert!((a - b).abs() <= 1e-6 * a.abs().max(1.0), "step {}: uninterrupted {a} vs resumed {b}", i + 1);
    }
    assert_same_adapter(&full.adapter_dir, &second.adapter_dir, 1e-5);
}
