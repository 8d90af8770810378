//! Models: configuration, weight loading (GGUF and HF safetensors folders), tokenizers, chat
//! templates, and the Llama-family decoder written for training.

pub mod attend;
pub mod attention_cpu;
pub mod config;
pub mod cpu_math;
pub mod fused;
pub mod gguf;
pub mod linear;
pub mod llama;
pub mod opcheck;
pub mod profile;
pub mod ops;
pub mod qmatmul;
pub mod tokenizer;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

pub use config::LlamaConfig;
pub use linear::{ForwardCtx, FrozenWeight, Linear, LinearAdapter};
pub use llama::{Llama, NormSite, PromptSource, TunedWeights, VirtualTokens};
pub use tokenizer::TokenizerSpec;

use crate::{Error, Result};

/// A model ready to train or run: weights, tokenizer, special tokens, chat template.
pub struct LoadedModel {
    /// The decoder.
    pub model: Llama,
    /// The tokenizer.
    pub tokenizer: tokenizers::Tokenizer,
    /// Special tokens and chat template.
    pub spec: TokenizerSpec,
    /// Where it was loaded from.
    pub source: PathBuf,
}

/// Loads a model from a `.gguf` file or a HF folder (config.json, model.safetensors or a
/// sharded index, tokenizer.json, tokenizer_config.json). Weights are f32 on `device`.
pub fn load(path: &Path, device: &Device) -> Result<LoadedModel> {
    load_in(path, device, DType::F32)
}

/// [`load`] with the weights in `dtype` (mixed-precision training's bf16/f16 base), each
/// converted as it is read: the model never exists in f32 all at once, so loading peaks at
/// about the 16-bit model's size rather than twice it.
pub fn load_in(path: &Path, device: &Device, dtype: DType) -> Result<LoadedModel> {
    if !path.exists() {
        return Err(Error::bad_input(path, None, "model path does not exist (run scripts/setup for the default model)"));
    }
    if path.is_file() {
        let g = gguf::load_in(path, device, dtype)?;
        let model = Llama::from_tensors_dtype(g.config, g.tensors, path, device, dtype)?;
        return Ok(LoadedModel { model, tokenizer: g.tokenizer, spec: g.spec, source: path.to_path_buf() });
    }
    let cfg = LlamaConfig::from_hf_json(&required(path, "config.json")?)?;
    let tensors = read_safetensors_folder(path, device, dtype)?;
    let (tokenizer, spec) = tokenizer::from_hf_folder(path)?;
    let model = Llama::from_tensors_dtype(cfg, tensors, path, device, dtype)?;
    Ok(LoadedModel { model, tokenizer, spec, source: path.to_path_buf() })
}

/// Loads a model for inference: a `.gguf` file keeps its quantized matrices quantized (the
/// matmuls read the blocks directly: less memory and faster decoding); a HF folder loads as
/// [`load`] does. Adapters apply on top as usual; merging needs [`load`]'s dense weights.
pub fn load_quantized(path: &Path, device: &Device) -> Result<LoadedModel> {
    if path.is_file() {
        let g = gguf::load_quantized(path, device)?;
        let model = Llama::from_weights(g.config, g.weights, path, device, DType::F32)?;
        return Ok(LoadedModel { model, tokenizer: g.tokenizer, spec: g.spec, source: path.to_path_buf() });
    }
    load(path, device)
}

/// Loads a model for QLoRA training: like [`load_quantized`], with every decoder projection
/// held as 4-bit blocks. A GGUF's 4-bit blocks (Q4_0, Q4_1, Q4_K) are kept as they are, so the
/// adapter trains against exactly the weights the file runs with; other weights are quantized
/// to Q4_K (256-value super-blocks, 6-bit scales and minimums; 4.5 bits per weight) when a row
/// is a multiple of 256 long, else to Q4_1 (blocks of 32, f16 scale and minimum; 5 bits).
/// These are llama.cpp's own types rather than bitsandbytes' NF4: the file formats we read and
/// export, with SIMD kernels in candle. The embedding (and a tied LM head) stay as loaded.
pub fn load_4bit(path: &Path, device: &Device) -> Result<LoadedModel> {
    let mut m = load_quantized(path, device)?;
    hold_projections_as_blocks(&mut m.model, device, qlora_blocks)?;
    Ok(m)
}

/// QLoRA's block type for projection `l` with rows of `k` values (see [`load_4bit`]): `None`
/// for weights already in 4-bit blocks, Q4_K for rows a multiple of 256 long, else Q4_1.
pub fn qlora_blocks(l: &Linear, k: usize) -> Result<Option<candle_core::quantized::GgmlDType>> {
    use candle_core::quantized::GgmlDType;
    if let FrozenWeight::Quantized { q, .. } = l.weight() {
        if matches!(q.dtype(), GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q4K) {
            return Ok(None);
        }
    }
    match k {
        _ if k % 256 == 0 => Ok(Some(GgmlDType::Q4K)),
        _ if k % 32 == 0 => Ok(Some(GgmlDType::Q4_1)),
        _ => Err(Error::Msg(format!(
            "{}: rows of {k} values do not split into 4-bit blocks of 32; this model cannot be trained with qlora (use lora)",
            l.name()
        ))),
    }
}

/// Holds every decoder projection of `model` (not the LM head) as quantized blocks of the type
/// `choose` picks for it from the layer and its row length (`None` leaves it as it is); the
/// blocks are quantized on the CPU and go where the model lives (a GPU's products dequantize
/// them there). What [`load_4bit`] does for QLoRA and `tunebench logits --blocks` for the
/// quantized inference kernels.
pub fn hold_projections_as_blocks(
    model: &mut Llama,
    device: &Device,
    choose: impl Fn(&Linear, usize) -> Result<Option<candle_core::quantized::GgmlDType>>,
) -> Result<()> {
    use candle_core::quantized::QTensor;
    for l in model.linears_mut() {
        if l.name() == "lm_head" {
            continue;
        }
        let k = l.weight().dims().get(1).copied().unwrap_or(0);
        let Some(ty) = choose(l, k)? else { continue };
        let w = l.weight().dense()?.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
        let q = if device.is_cpu() { QTensor::quantize(&w, ty) } else { QTensor::quantize_onto(&w, ty, device) };
        let q = q.map_err(|e| Error::Msg(format!("{}: quantizing to {ty:?}: {e}", l.name())))?;
        l.set_frozen_weight(FrozenWeight::quantized(q)?)?;
    }
    Ok(())
}

/// Reads only the architecture of a `.gguf` file or HF folder (for estimates).
pub fn load_config(path: &Path) -> Result<LlamaConfig> {
    if !path.exists() {
        return Err(Error::bad_input(path, None, "model path does not exist (run scripts/setup for the default model)"));
    }
    if path.is_file() {
        return gguf::read_config(path);
    }
    LlamaConfig::from_hf_json(&required(path, "config.json")?)
}

/// Loads only the tokenizer (and its special tokens and chat template) of a `.gguf` file or
/// HF folder, without the weights: what dataset import and preview need.
pub fn load_tokenizer(path: &Path) -> Result<(tokenizers::Tokenizer, TokenizerSpec)> {
    if !path.exists() {
        return Err(Error::bad_input(path, None, "model path does not exist (run scripts/setup for the default model)"));
    }
    if path.is_file() {
        let mut file = std::io::BufReader::with_capacity(1 << 16, std::fs::File::open(path).map_err(|e| Error::io(path, e))?);
        let content = candle_core::quantized::gguf_file::Content::read(&mut file)
            .map_err(|e| Error::bad_input(path, None, format!("not a readable GGUF file: {e}")))?;
        return tokenizer::from_gguf(&content, path);
    }
    tokenizer::from_hf_folder(path)
}

fn required(dir: &Path, file: &str) -> Result<PathBuf> {
    let p = dir.join(file);
    if p.exists() {
        Ok(p)
    } else {
        Err(Error::bad_input(dir, None, format!("model folder has no {file}")))
    }
}

/// Reads `model.safetensors`, or every shard listed in `model.safetensors.index.json`.
fn read_safetensors_folder(dir: &Path, device: &Device, dtype: DType) -> Result<HashMap<String, Tensor>> {
    let single = dir.join("model.safetensors");
    let files: Vec<PathBuf> = if single.exists() {
        vec![single]
    } else {
        let index = required(dir, "model.safetensors.index.json")
            .map_err(|_| Error::bad_input(dir, None, "model folder has neither model.safetensors nor model.safetensors.index.json"))?;
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::bad_input(&index, Some(e.line()), e.to_string()))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::bad_input(&index, None, "no `weight_map` object"))?;
        let mut shards: Vec<String> = map.values().filter_map(|s| s.as_str().map(str::to_string)).collect();
        shards.sort();
        shards.dedup();
        shards.into_iter().map(|s| dir.join(s)).collect()
    };
    let mut out = HashMap::new();
    for f in files {
        if !f.exists() {
            return Err(Error::bad_input(&f, None, "weight shard listed in the index is missing"));
        }
        let t = candle_core::safetensors::load(&f, device).map_err(|e| Error::bad_input(&f, None, e.to_string()))?;
        for (k, v) in t {
            out.insert(k, v.to_dtype(dtype)?);
        }
    }
    Ok(out)
}
