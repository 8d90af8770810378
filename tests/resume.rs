//! Exact resume on the real default model: a run stopped after k steps and resumed from its
//! checkpoint has the same loss at every later step as an uninterrupted run (same seed), and
//! ends with the same adapter.

mod common;

use tunebench::train::{self, observer::NoObserver, RunConfig, TrainOptions};

fn config(out: &std::path::Path, dropout: f64) -> RunConfig {
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
method = "lora"
r = 4
lora_alpha = 8
lora_dropout = {dropout}
target_modules = ["q_proj", "v_proj", "down_proj"]
[train]
max_steps = 6
batch_size = 2
grad_accum = 2
lr = 1e-3
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
    let tmp = tempfile::tempdir().unwrap();
    let full_cfg = config(&tmp.path().join("full"), 0.1);
    let full = train::train(&full_cfg, &TrainOptions::default(), &mut NoObserver).unwrap();
    assert_eq!(full.losses.len(), 6);

    let cfg = config(&tmp.path().join("split"), 0.1);
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
    let cfg = config(&tmp.path().join("none"), 0.0);
    let err = train::train(&cfg, &TrainOptions { resume: true, ..Default::default() }, &mut NoObserver).unwrap_err().to_string();
    assert!(err.contains("nothing to resume"), "{err}");
}
