//! LoRA properties on a tiny random Llama: merged == unmerged, save→load round-trips in
//! PEFT's format, and bad configs/adapters fail with clear messages.

use candle_core::{Device, Tensor};
use tunebench::model::{ForwardCtx, Llama, LlamaConfig};
use tunebench::peft::{Adapter, LoraConfig, PeftConfig, TargetModules};

fn model() -> Llama {
    Llama::random(LlamaConfig::tiny(40), 5, &Device::Cpu).unwrap()
}

fn ids() -> Tensor {
    Tensor::from_vec(vec![1u32, 5, 9, 3, 7, 2, 30, 11], (1, 8), &Device::Cpu).unwrap()
}

fn cfg(targets: TargetModules, rslora: bool) -> PeftConfig {
    PeftConfig::Lora(LoraConfig { r: 4, lora_alpha: 8.0, target_modules: targets, use_rslora: rslora, ..Default::default() })
}

fn perturb(a: &Adapter) {
    for (i, (_, l)) in a.lora_layers().into_iter().enumerate() {
        let b = Tensor::randn(0f32, 0.2, l.b.dims(), &Device::Cpu).unwrap();
        assert_eq!(b.dims(), l.b.dims(), "layer {i}");
        l.b.set(&b).unwrap();
    }
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn merged_equals_unmerged_and_adapter_changes_output() {
    for rslora in [false, true] {
        let mut m = model();
        let base = m.logits(&ids(), &ForwardCtx::default()).unwrap();
        let a = Adapter::inject(&mut m, &cfg(TargetModules::Keyword("all-linear".into()), rslora), 1).unwrap();
        assert_eq!(a.layers.len(), 2 * 7);
        let zero_b = m.logits(&ids(), &ForwardCtx::default()).unwrap();
        assert!(max_diff(&base, &zero_b) < 1e-6, "a fresh LoRA (B = 0) must not change the output");
        perturb(&a);
        let unmerged = m.logits(&ids(), &ForwardCtx::default()).unwrap();
        assert!(max_diff(&base, &unmerged) > 1e-3, "the adapter must change the output");
        a.merge_into(&mut m).unwrap();
        assert!(m.linears().iter().all(|l| l.adapter().is_none()));
        let merged = m.logits(&ids(), &ForwardCtx::default()).unwrap();
        assert!(max_diff(&merged, &unmerged) < 1e-4, "merged {}", max_diff(&merged, &unmerged));
    }
}

#[test]
fn save_load_round_trip_in_peft_format() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = model();
    let a = Adapter::inject(&mut m, &cfg(TargetModules::Names(vec!["q_proj".into(), "down_proj".into()]), false), 1).unwrap();
    perturb(&a);
    let want = m.logits(&ids(), &ForwardCtx::default()).unwrap();
    a.save(dir.path(), "tiny").unwrap();

    let cfg_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg_json["peft_type"], "LORA");
    assert_eq!(cfg_json["r"], 4);
    assert_eq!(cfg_json["target_modules"], serde_json::json!(["q_proj", "down_proj"]));
    let w = candle_core::safetensors::load(dir.path().join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    assert!(w.contains_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"));
    assert!(w.contains_key("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"));
    assert_eq!(w.len(), 2 * 2 * 2);

    let mut fresh = model();
    let loaded = Adapter::load(&mut fresh, dir.path()).unwrap();
    assert_eq!(loaded.num_params(), a.num_params());
    let got = fresh.logits(&ids(), &ForwardCtx::default()).unwrap();
    assert_eq!(max_diff(&got, &want), 0.0);
}

#[test]
fn bad_lora_configs_name_the_key() {
    let mut m = model();
    let err = Adapter::inject(&mut m, &cfg(TargetModules::Names(vec!["q_projection".into()]), false), 1).unwrap_err().to_string();
    assert!(err.contains("peft.target_modules") && err.contains("unknown target module `q_projection`") && err.contains("q_proj"), "{err}");
    let zero = PeftConfig::Lora(LoraConfig { r: 0, ..Default::default() });
    let err = Adapter::inject(&mut m, &zero, 1).unwrap_err().to_string();
    assert!(err.contains("peft.r") && err.contains("at least 1"), "{err}");
    let err = Adapter::inject(&mut m, &cfg(TargetModules::Keyword("everything".into()), false), 1).unwrap_err().to_string();
    assert!(err.contains("all-linear"), "{err}");
}

#[test]
fn bad_adapter_folders_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = model();
    let err = Adapter::load(&mut m, dir.path()).unwrap_err().to_string();
    assert!(err.contains("adapter_config.json"), "{err}");
    // An adapter for a different shape (rank mismatch) names the tensor.
    let a = Adapter::inject(&mut m, &cfg(TargetModules::Names(vec!["v_proj".into()]), false), 1).unwrap();
    a.save(dir.path(), "tiny").unwrap();
    let p = dir.path().join("adapter_config.json");
    let text = std::fs::read_to_string(&p).unwrap().replace("\"r\": 4", "\"r\": 3");
    std::fs::write(&p, text).unwrap();
    let err = Adapter::load(&mut model(), dir.path()).unwrap_err().to_string();
    assert!(err.contains("v_proj") && err.contains("do not fit"), "{err}");
}
