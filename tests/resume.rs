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
    let wa = candle_core::safetensors::load(full.adapter_dir.join("adapter_model.safetensors"), &candle_core::Device::Cpu).unwrap();
    let wb = candle_core::safetensors::load(second.adapter_dir.join("adapter_model.safetensors"), &candle_core::Device::Cpu).unwrap();
    assert_eq!(wa.len(), wb.len());
    for (k, a) in &wa {
        // Same shapes (AdaLoRA: the same ranks kept, possibly none).
        assert_eq!(a.dims(), wb[k].dims(), "{k}");
        if a.elem_count() == 0 {
            continue;
        }
        let d = (a - &wb[k]).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 1e-5, "{k} differs by {d}");
    }
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
