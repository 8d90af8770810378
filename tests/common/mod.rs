//! Shared helpers for integration tests that need the real default model.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use tunebench::model::{Llama, LlamaConfig};

/// The default model, installed by `scripts/setup`; panics with instructions when missing.
pub fn default_model() -> PathBuf {
    // Same CPU thread settings as the binaries (training tests are several times slower with
    // candle's spinning element-wise pool on a 2-core machine).
    tunebench::init_cpu_runtime();
    let p = tunebench::paths::default_model();
    assert!(
        p.exists(),
        "the default model is needed at {} — run `bash scripts/setup` first (or set TUNEBENCH_HOME)",
        p.display()
    );
    p
}

/// Writes `model` as a HF folder (config.json, safetensors — one file or two shards with an
/// index —, the tiny test tokenizer, tokenizer_config.json with a ChatML template). Norm
/// weights are written as ones.
pub fn write_folder(dir: &std::path::Path, cfg: &LlamaConfig, model: &Llama, sharded: bool) {
    std::fs::write(dir.join("config.json"), serde_json::to_string(cfg).unwrap()).unwrap();
    let mut t: HashMap<String, Tensor> = HashMap::new();
    t.insert("model.embed_tokens.weight".into(), model.embed_tokens().dense().unwrap());
    for lin in model.linears() {
        if lin.name() != "lm_head" {
            t.insert(format!("{}.weight", lin.name()), lin.weight().dense().unwrap());
        }
    }
    // Norm weights are not exposed; write ones (the reference model below uses ones too).
    let h = cfg.hidden_size;
    for i in 0..cfg.num_hidden_layers {
        for n in ["input_layernorm", "post_attention_layernorm"] {
            t.insert(format!("model.layers.{i}.{n}.weight"), Tensor::ones(h, candle_core::DType::F32, &Device::Cpu).unwrap());
        }
    }
    t.insert("model.norm.weight".into(), Tensor::ones(h, candle_core::DType::F32, &Device::Cpu).unwrap());
    if sharded {
        let (mut a, mut b) = (HashMap::new(), HashMap::new());
        let mut map = serde_json::Map::new();
        for (i, (k, v)) in t.into_iter().enumerate() {
            let shard = if i % 2 == 0 { "model-00001-of-00002.safetensors" } else { "model-00002-of-00002.safetensors" };
            map.insert(k.clone(), shard.into());
            if i % 2 == 0 { a.insert(k, v) } else { b.insert(k, v) };
        }
        candle_core::safetensors::save(&a, dir.join("model-00001-of-00002.safetensors")).unwrap();
        candle_core::safetensors::save(&b, dir.join("model-00002-of-00002.safetensors")).unwrap();
        let index = serde_json::json!({"metadata": {}, "weight_map": map});
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    } else {
        candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
    }
    tunebench::data::testing::tiny_tokenizer().save(dir.join("tokenizer.json"), false).unwrap();
    let tc = serde_json::json!({
        "eos_token": "<|im_end|>",
        "chat_template": "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}",
    });
    std::fs::write(dir.join("tokenizer_config.json"), tc.to_string()).unwrap();
}


/// Runs the `tunebench` binary with `TUNEBENCH_HOME` = `home`.
pub fn tb(home: &std::path::Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_tunebench")).args(args).env("TUNEBENCH_HOME", home).output().unwrap()
}

/// Runs the binary, asserts success, returns stdout.
pub fn ok(home: &std::path::Path, args: &[&str]) -> String {
    let o = tb(home, args);
    assert!(o.status.success(), "tunebench {args:?} failed: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Runs the binary, asserts failure, returns stderr.
pub fn fails(home: &std::path::Path, args: &[&str]) -> String {
    let o = tb(home, args);
    assert!(!o.status.success(), "tunebench {args:?} should fail");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A short run on the bundled persona task (seed 3, max_len 96, r 8, all-linear, batch 4, no
/// validation split, no checkpoints before the end, no samples), written to `out`. `method` is
/// `lora` or `qlora`.
pub fn persona_run_toml(name: &str, method: &str, max_steps: usize, out: &std::path::Path) -> String {
    format!(
        r#"
name = "{name}"
seed = 3
[model]
path = "{model}"
[data]
path = "{data}"
max_len = 96
val_fraction = 0.0
[peft]
method = "{method}"
r = 8
lora_alpha = 16
target_modules = "all-linear"
[train]
max_steps = {max_steps}
batch_size = 4
lr = 3e-3
warmup_steps = 2
save_steps = 1000
eval_steps = 1000
[eval]
samples = 0
[output]
dir = "{out}"
"#,
        model = default_model().display(),
        data = concat!(env!("CARGO_MANIFEST_DIR"), "/assets/datasets/persona/train.jsonl"),
        out = out.display(),
    )
}
