//! QLoRA on the real default model: the base's projections are held as 4-bit blocks (the
//! GGUF's own Q4_1 blocks, bit for bit), LoRA trains on top with the loss falling — exactly the
//! losses of LoRA on the dequantized base —, the adapter is a plain LoRA folder (PEFT's
//! format), and a HF-style dense base is quantized on load.

mod common;

use candle_core::quantized::GgmlDType;
use candle_core::Device;
use tunebench::model::{self, FrozenWeight};
use tunebench::train::{self, observer::NoObserver, RunConfig, TrainOptions};

fn four_bit(w: &FrozenWeight) -> Option<GgmlDType> {
    match w {
        FrozenWeight::Quantized { q, .. } => Some(q.dtype()),
        FrozenWeight::Dense(_) => None,
    }
}

#[test]
fn the_base_is_held_in_4_bit_blocks() {
    let path = common::default_model();
    let m = model::load_4bit(&path, &Device::Cpu).unwrap();
    let file = model::load_quantized(&path, &Device::Cpu).unwrap();
    for (a, b) in m.model.linears().into_iter().zip(file.model.linears()) {
        if a.name() == "lm_head" {
            continue;
        }
        let t = four_bit(a.weight());
        assert!(matches!(t, Some(GgmlDType::Q4_1 | GgmlDType::Q4K | GgmlDType::Q4_0)), "{}: {t:?}", a.name());
        // The file's Q4_1 blocks are used as they are, not re-quantized.
        if let (FrozenWeight::Quantized { q: qa, .. }, FrozenWeight::Quantized { q: qb, .. }) = (a.weight(), b.weight()) {
            assert_eq!(qa.data().unwrap(), qb.data().unwrap(), "{}", a.name());
        }
    }
    // A dense base (dequantized here) is quantized on load: Q4_1 for rows of 576 (not a
    // multiple of 256), Q4_K for the down projection's rows of 1536.
    let dense = model::load(&path, &Device::Cpu).unwrap();
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    tunebench::export::write_hf(&dense, &dir.path().join("hf"), tunebench::export::HfDtype::F32, |_, _| {}).unwrap();
    let q = model::load_4bit(&dir.path().join("hf"), &Device::Cpu).unwrap();
    let l0 = &q.model.layers[0];
    assert_eq!(four_bit(l0.self_attn.q_proj.weight()), Some(GgmlDType::Q4_1));
    assert_eq!(four_bit(l0.mlp.down_proj.weight()), Some(GgmlDType::Q4K));
}

#[test]
fn qlora_trains_and_saves_a_lora_adapter() {
    let out = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let text = common::persona_run_toml("qlora-test", "qlora", 12, &out.path().join("run"));
    let cfg = RunConfig::from_toml(&text, None).unwrap();
    let r = train::train(&cfg, &TrainOptions { skip_heldout: true, ..Default::default() }, &mut NoObserver).unwrap();
    // On a GGUF whose projections are already 4-bit, dequantizing per product computes what LoRA
    // on the dequantized (dense f32) base computes: the same losses, step by step.
    let dense_text = common::persona_run_toml("qlora-test", "lora", 12, &out.path().join("run-lora"));
    let dense = RunConfig::from_toml(&dense_text, None).unwrap();
    let d = train::train(&dense, &TrainOptions { skip_heldout: true, ..Default::default() }, &mut NoObserver).unwrap();
    assert_eq!(r.losses, d.losses, "qlora on the file's 4-bit blocks == lora on their dequantized values");
    let (first, last) = (r.losses[..3].iter().sum::<f64>() / 3.0, r.losses[r.losses.len() - 3..].iter().sum::<f64>() / 3.0);
    eprintln!("qlora: loss {first:.3} -> {last:.3} over {} steps", r.losses.len());
    assert!(last < 0.8 * first, "loss {first} -> {last}");
    let cfg_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(r.adapter_dir.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg_json["peft_type"], "LORA", "a QLoRA adapter is a LoRA adapter");
    // It loads on the dense base like any LoRA adapter and changes the answer's logits.
    let mut m = model::load(&common::default_model(), &Device::Cpu).unwrap();
    let ids: Vec<u32> = m.tokenizer.encode("Who are you?", false).unwrap().get_ids().to_vec();
    let before = tunebench::infer::sequence_logits(&m.model, &ids).unwrap();
    tunebench::peft::Adapter::load(&mut m.model, &r.adapter_dir).unwrap();
    let after = tunebench::infer::sequence_logits(&m.model, &ids).unwrap();
    let moved = (after - before).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(moved > 0.5, "the adapter moves the logits by {moved}");
}
