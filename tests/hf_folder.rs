//! Loading a HF model folder (config.json, safetensors — single file or sharded index —,
//! tokenizer.json, tokenizer_config.json with a chat template) gives the same model as the
//! tensors it was written from.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use tunebench::model::{self, ForwardCtx, Llama, LlamaConfig};

fn write_folder(dir: &std::path::Path, cfg: &LlamaConfig, model: &Llama, sharded: bool) {
    std::fs::write(dir.join("config.json"), serde_json::to_string(cfg).unwrap()).unwrap();
    let mut t: HashMap<String, Tensor> = HashMap::new();
    t.insert("model.embed_tokens.weight".into(), model.embed_tokens().clone());
    for lin in model.linears() {
        if lin.name() != "lm_head" {
            t.insert(format!("{}.weight", lin.name()), lin.weight().clone());
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

#[test]
fn hf_folder_loads_single_file_and_sharded() {
    let tok = tunebench::data::testing::tiny_tokenizer();
    let cfg = LlamaConfig { tie_word_embeddings: true, ..LlamaConfig::tiny(tok.get_vocab_size(true)) };
    let reference = Llama::random(cfg.clone(), 3, &Device::Cpu).unwrap();
    let ids = Tensor::new(&[[1u32, 4, 2, 5, 3]], &Device::Cpu).unwrap();
    for sharded in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        write_folder(dir.path(), &cfg, &reference, sharded);
        let loaded = model::load(dir.path(), &Device::Cpu).unwrap();
        assert_eq!(loaded.model.config().num_hidden_layers, 2);
        assert_eq!(loaded.spec.eos_token, "<|im_end|>");
        assert!(loaded.spec.chat_template.as_deref().unwrap_or("").contains("im_start"));
        // Same weights → same logits as a model built from the same tensors in memory.
        let mut t = HashMap::new();
        t.insert("model.embed_tokens.weight".to_string(), reference.embed_tokens().clone());
        for lin in reference.linears() {
            if lin.name() != "lm_head" {
                t.insert(format!("{}.weight", lin.name()), lin.weight().clone());
            }
        }
        for i in 0..cfg.num_hidden_layers {
            for n in ["input_layernorm", "post_attention_layernorm"] {
                t.insert(format!("model.layers.{i}.{n}.weight"), Tensor::ones(cfg.hidden_size, candle_core::DType::F32, &Device::Cpu).unwrap());
            }
        }
        t.insert("model.norm.weight".into(), Tensor::ones(cfg.hidden_size, candle_core::DType::F32, &Device::Cpu).unwrap());
        let want = Llama::from_tensors(cfg.clone(), t, std::path::Path::new("mem"), &Device::Cpu).unwrap();
        let a = loaded.model.logits(&ids, &ForwardCtx::default()).unwrap();
        let b = want.logits(&ids, &ForwardCtx::default()).unwrap();
        let d = (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(d, 0.0, "sharded={sharded}");
        // A shard listed in the index but missing is named.
        if sharded {
            std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).unwrap();
            let e = model::load(dir.path(), &Device::Cpu).err().unwrap().to_string();
            assert!(e.contains("model-00002-of-00002.safetensors") && e.contains("missing"), "{e}");
        }
    }
}
