//! Reading llama.cpp GGUF files: config from metadata, weights dequantized to f32 under HF
//! names (q/k rows un-permuted back to HF's rotate-half layout), tokenizer and chat template.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};

use super::config::LlamaConfig;
use super::linear::FrozenWeight;
use super::tokenizer::{self, TokenizerSpec};
use crate::{Error, Result};

/// What a GGUF file holds, read and converted.
pub struct GgufModel {
    /// Architecture hyper-parameters.
    pub config: LlamaConfig,
    /// Weights under HF names (`model.layers.0.self_attn.q_proj.weight`, ...), f32.
    pub tensors: HashMap<String, Tensor>,
    /// The tokenizer built from the metadata.
    pub tokenizer: tokenizers::Tokenizer,
    /// Special tokens and chat template.
    pub spec: TokenizerSpec,
}

fn meta<'a>(c: &'a Content, path: &Path, key: &str) -> Result<&'a Value> {
    c.metadata
        .get(key)
        .ok_or_else(|| Error::bad_input(path, None, format!("GGUF metadata key `{key}` is missing")))
}

fn meta_u(c: &Content, path: &Path, key: &str) -> Result<usize> {
    let v = meta(c, path, key)?;
    let n = match v {
        Value::U8(x) => *x as u64,
        Value::U16(x) => *x as u64,
        Value::U32(x) => *x as u64,
        Value::U64(x) => *x,
        Value::I32(x) if *x >= 0 => *x as u64,
        Value::I64(x) if *x >= 0 => *x as u64,
        _ => return Err(Error::bad_input(path, None, format!("GGUF metadata `{key}` is not an unsigned integer"))),
    };
    Ok(n as usize)
}

fn meta_f(c: &Content, key: &str) -> Option<f64> {
    match c.metadata.get(key)? {
        Value::F32(x) => Some(*x as f64),
        Value::F64(x) => Some(*x),
        _ => None,
    }
}

/// Maps a GGUF tensor name to its HF name (`None` for tensors we do not use).
pub fn hf_name(gguf: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (idx, rest) = rest.split_once('.')?;
    let idx: usize = idx.parse().ok()?;
    let (part, kind) = rest.rsplit_once('.')?;
    let hf = match part {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        _ => return None,
    };
    Some(format!("model.layers.{idx}.{hf}.{kind}"))
}

/// Undoes llama.cpp's q/k row permutation (interleaved RoPE → HF rotate-half layout), as
/// PyTorch transformers does when it reads a GGUF: rows viewed as
/// (heads, head_dim/2, 2) are transposed to (heads, 2, head_dim/2).
pub fn unpermute_rows(w: &Tensor, n_heads: usize) -> Result<Tensor> {
    let dims = w.dims().to_vec();
    let rows = dims[0];
    let rest: usize = dims[1..].iter().product();
    let half = rows / n_heads / 2;
    let t = w
        .reshape((n_heads, half, 2, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?;
    Ok(t)
}

/// Reads a GGUF file: config, dequantized f32 weights under HF names, tokenizer.
pub fn load(path: &Path, device: &Device) -> Result<GgufModel> {
    load_in(path, device, DType::F32)
}

/// [`load`] with the tensors in `dtype`: each is dequantized and converted before the next is
/// read, so a 16-bit model never exists in f32 all at once (training's load peak).
pub fn load_in(path: &Path, device: &Device, dtype: DType) -> Result<GgufModel> {
    let (config, weights, tokenizer, spec) = read(path, device, false, dtype)?;
    let tensors = weights.into_iter().map(|(k, w)| Ok((k, w.dense()?))).collect::<Result<_>>()?;
    Ok(GgufModel { config, tensors, tokenizer, spec })
}

/// What a GGUF file holds with its matrices left in their quantized blocks (for inference).
pub struct GgufQuantized {
    /// Architecture hyper-parameters.
    pub config: LlamaConfig,
    /// Weights under HF names: quantized matrices, dense f32 vectors.
    pub weights: HashMap<String, FrozenWeight>,
    /// The tokenizer built from the metadata.
    pub tokenizer: tokenizers::Tokenizer,
    /// Special tokens and chat template.
    pub spec: TokenizerSpec,
}

/// Reads a GGUF file keeping quantized matrices quantized (q/k rows are still moved to HF's
/// layout, block rows being independent), so inference multiplies the blocks directly.
pub fn load_quantized(path: &Path, device: &Device) -> Result<GgufQuantized> {
    let (config, weights, tokenizer, spec) = read(path, device, true, DType::F32)?;
    Ok(GgufQuantized { config, weights, tokenizer, spec })
}

type Read = (LlamaConfig, HashMap<String, FrozenWeight>, tokenizers::Tokenizer, TokenizerSpec);

/// `dense`: the dtype of the tensors that are not kept as blocks.
fn read(path: &Path, device: &Device, keep_quantized: bool, dense: DType) -> Result<Read> {
    let mut file = std::io::BufReader::with_capacity(1 << 16, std::fs::File::open(path).map_err(|e| Error::io(path, e))?);
    let content = Content::read(&mut file)
        .map_err(|e| Error::bad_input(path, None, format!("not a readable GGUF file: {e}")))?;
    let arch = match meta(&content, path, "general.architecture")? {
        Value::String(s) => s.clone(),
        _ => return Err(Error::bad_input(path, None, "general.architecture is not a string")),
    };
    if !matches!(arch.as_str(), "llama" | "mistral" | "qwen2") {
        return Err(Error::bad_input(
            path,
            None,
            format!("architecture `{arch}` is not supported (llama, mistral, qwen2 are)"),
        ));
    }
    let config = config_of(&content, path, &arch)?;
    let n_heads = config.num_attention_heads;
    let n_kv = config.kv_heads();

    let mut weights = HashMap::new();
    let names: Vec<String> = content.tensor_infos.keys().cloned().collect();
    for name in names {
        let Some(hf) = hf_name(&name) else {
            tracing::debug!("skipping GGUF tensor {name}");
            continue;
        };
        let qt = content
            .tensor(&mut file, &name, device)
            .map_err(|e| Error::bad_input(path, None, format!("tensor {name}: {e}")))?;
        // llama.cpp permutes q/k rows for its interleaved RoPE; Qwen2 conversions do not.
        let heads = match () {
            _ if arch == "qwen2" => None,
            _ if name.contains(".attn_q.") => Some(n_heads),
            _ if name.contains(".attn_k.") => Some(n_kv),
            _ => None,
        };
        let block_quantized = !matches!(qt.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
        let w = if keep_quantized && block_quantized && qt.shape().rank() == 2 {
            let qt = match heads {
                Some(h) => unpermute_quantized_rows(&qt, h, device)?,
                None => qt,
            };
            FrozenWeight::quantized(qt)?
        } else {
            let mut t = qt.dequantize(device)?;
            if let Some(h) = heads {
                t = unpermute_rows(&t, h)?;
            }
            FrozenWeight::Dense(t.to_dtype(dense)?)
        };
        weights.insert(hf, w);
    }
    let (tokenizer, spec) = tokenizer::from_gguf(&content, path)?;
    Ok((config, weights, tokenizer, spec))
}

/// [`unpermute_rows`] on quantized blocks: a row's blocks move together, byte for byte.
fn unpermute_quantized_rows(q: &QTensor, n_heads: usize, device: &Device) -> Result<QTensor> {
    let (rows, cols) = q.shape().dims2()?;
    let dtype = q.dtype();
    let row_bytes = cols / dtype.block_size() * dtype.type_size();
    let data = q.data()?;
    if data.len() != rows * row_bytes || rows % (2 * n_heads) != 0 {
        return Err(Error::Msg(format!("cannot permute the rows of a {rows}x{cols} {dtype:?} tensor for {n_heads} heads")));
    }
    let half = rows / n_heads / 2;
    let mut out = vec![0u8; data.len()];
    for h in 0..n_heads {
        for j in 0..half {
            for t in 0..2 {
                let old = h * 2 * half + j * 2 + t;
                let new = h * 2 * half + t * half + j;
                out[new * row_bytes..(new + 1) * row_bytes].copy_from_slice(&data[old * row_bytes..(old + 1) * row_bytes]);
            }
        }
    }
    let storage = QStorage::from_data(std::borrow::Cow::Owned(out), device, dtype)?;
    Ok(QTensor::new(storage, (rows, cols))?)
}

/// The architecture of a GGUF file from its metadata alone (no tensor data is read).
pub fn read_config(path: &Path) -> Result<LlamaConfig> {
    // Buffered (here and wherever a GGUF header is parsed): the tokenizer's metadata alone is
    // ~100k small reads, ~0.2 s as syscalls.
    let mut file = std::io::BufReader::with_capacity(1 << 16, std::fs::File::open(path).map_err(|e| Error::io(path, e))?);
    let content = Content::read(&mut file).map_err(|e| Error::bad_input(path, None, format!("not a readable GGUF file: {e}")))?;
    let arch = match meta(&content, path, "general.architecture")? {
        Value::String(s) => s.clone(),
        _ => return Err(Error::bad_input(path, None, "general.architecture is not a string")),
    };
    config_of(&content, path, &arch)
}

fn config_of(content: &Content, path: &Path, arch: &str) -> Result<LlamaConfig> {
    let k = |s: &str| format!("{arch}.{s}");
    let n_heads = meta_u(content, path, &k("attention.head_count"))?;
    let n_kv = content
        .metadata
        .get(&k("attention.head_count_kv"))
        .map(|_| meta_u(content, path, &k("attention.head_count_kv")))
        .transpose()?
        .unwrap_or(n_heads);
    let hidden = meta_u(content, path, &k("embedding_length"))?;
    let has_output = content.tensor_infos.contains_key("output.weight");
    let vocab_size = content
        .tensor_infos
        .get("token_embd.weight")
        .map(|t| t.shape.dims()[0])
        .ok_or_else(|| Error::bad_input(path, None, "tensor token_embd.weight is missing"))?;
    let head_dim = content
        .metadata
        .get(&k("attention.key_length"))
        .and_then(|v| v.to_u32().ok())
        .map(|v| v as usize)
        .filter(|&d| d != hidden / n_heads);
    let config = LlamaConfig {
        vocab_size,
        hidden_size: hidden,
        intermediate_size: meta_u(content, path, &k("feed_forward_length"))?,
        num_hidden_layers: meta_u(content, path, &k("block_count"))?,
        num_attention_heads: n_heads,
        num_key_value_heads: Some(n_kv),
        head_dim,
        rms_norm_eps: meta_f(content, &k("attention.layer_norm_rms_epsilon")).unwrap_or(1e-5),
        rope_theta: meta_f(content, &k("rope.freq_base")).unwrap_or(10_000.0),
        max_position_embeddings: meta_u(content, path, &k("context_length")).unwrap_or(2048),
        tie_word_embeddings: !has_output,
        attention_bias: content.tensor_infos.contains_key("blk.0.attn_q.bias"),
        bos_token_id: content.metadata.get("tokenizer.ggml.bos_token_id").and_then(|v| v.to_u32().ok()),
        eos_token_id: content
            .metadata
            .get("tokenizer.ggml.eos_token_id")
            .and_then(|v| v.to_u32().ok())
            .map(serde_json::Value::from),
        model_type: arch.to_string(),
    };
    config.validate().map_err(|r| Error::bad_input(path, None, r))?;
    Ok(config)
}

/// Prints-friendly summary of GGUF metadata (for `tunebench model info`): every key except
/// the large token arrays.
pub fn metadata_summary(path: &Path) -> Result<Vec<(String, String)>> {
    let mut file = std::io::BufReader::with_capacity(1 << 16, std::fs::File::open(path).map_err(|e| Error::io(path, e))?);
    let content = Content::read(&mut file)
        .map_err(|e| Error::bad_input(path, None, format!("not a readable GGUF file: {e}")))?;
    let mut out: Vec<(String, String)> = content
        .metadata
        .iter()
        .map(|(k, v)| {
            let s = match v {
                Value::Array(a) => format!("[array of {}]", a.len()),
                Value::String(s) if s.len() > 200 => format!("{}…", &s[..s.floor_char_boundary(200)]),
                other => format!("{other:?}"),
            };
            (k.clone(), s)
        })
        .collect();
    out.sort();
    Ok(out)
}
