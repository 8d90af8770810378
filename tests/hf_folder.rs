//! Loading a HF model folder (config.json, safetensors — single file or sharded index —,
//! tokenizer.json, tokenizer_config.json with a chat template) gives the same model as the
//! tensors it was written from.

mod common;

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use common::write_folder;
use tunebench::model::{self, ForwardCtx, Llama, LlamaConfig};

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
        t.insert("model.embed_tokens.weight".to_string(), reference.embed_tokens().dense().unwrap());
        for lin in reference.linears() {
            if lin.name() != "lm_head" {
                t.insert(format!("{}.weight", lin.name()), lin.weight().dense().unwrap());
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
