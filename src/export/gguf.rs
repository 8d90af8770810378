//! The merged model as a llama.cpp GGUF file.
//!
//! Written as llama.cpp's `convert_hf_to_gguf.py` (+ `llama-quantize`) writes a Llama model:
//! `general.*` and `llama.*` metadata keys, tensors under llama.cpp names (`token_embd`,
//! `blk.N.attn_q`, …, `output_norm`, `output` when untied), q/k projection rows (and biases)
//! permuted for llama.cpp's interleaved RoPE, 1-D tensors (norms, biases) in F32. The
//! tokenizer metadata is copied verbatim from a GGUF source (`tokenizer.*`: vocabulary,
//! merges, token types, special ids, pre-tokenizer name, chat template); for a HF-folder
//! source it is built from `tokenizer.json` (byte-level BPE only, llama.cpp's `gpt2` model),
//! and the pre-tokenizer name llama.cpp needs is found by encoding a check text with each
//! candidate and keeping the one that matches `tokenizer.json` (llama.cpp's converter
//! identifies it by a hash of the same kind of encoding).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::time::Instant;

use candle_core::quantized::gguf_file::{Content, Value, VersionedMagic};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use super::gguf_stream::{self, TensorPlan};
use super::hf::read_gguf_meta;
use super::modelfile::{modelfile_path, ollama_modelfile};
use super::staging::{Staged, sync_file};
use super::{ensure_merged, ExportReport};
use crate::infer::SampleOptions;
use crate::model::LoadedModel;
use crate::{Error, Result};

/// How the matrices of an exported GGUF are stored. Vectors (norms, biases) are always F32.
///
/// The 4-bit types follow `llama-quantize`: the LM head (the token embedding when it is tied)
/// gets Q6_K, every other matrix the named type. k-quant blocks span 256 values of a row, so a
/// row length that 256 does not divide (SmolLM2's hidden size 576) cannot be k-quantized; such
/// tensors fall back the way llama.cpp falls back: Q4_K → Q5_0 and Q6_K → Q8_0. For SmolLM2
/// `q4_k` therefore gives Q4_K `ffn_down` matrices (rows of 1536), Q5_0 for the other
/// projections and a Q8_0 embedding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GgufType {
    /// Half precision (`general.file_type` 1, `MOSTLY_F16`).
    F16,
    /// 8-bit blocks of 32 (`MOSTLY_Q8_0`); near-lossless.
    Q8_0,
    /// 4-bit blocks of 32 with a scale (`MOSTLY_Q4_0`).
    Q4_0,
    /// 4-bit blocks of 32 with a scale and a minimum (`MOSTLY_Q4_1`, the default model's type).
    Q4_1,
    /// 4-bit k-quant super-blocks of 256 (`MOSTLY_Q4_K_S`), with the fallbacks above.
    #[serde(rename = "q4_k")]
    Q4K,
}

impl GgufType {
    /// llama.cpp's `general.file_type` (`llama_ftype`).
    pub fn file_type(self) -> u32 {
        match self {
            GgufType::F16 => 1,
            GgufType::Q4_0 => 2,
            GgufType::Q4_1 => 3,
            GgufType::Q8_0 => 7,
            GgufType::Q4K => 14,
        }
    }

    /// The storage of a matrix with rows of `cols` values; `is_output`: the LM head (or the
    /// embedding that doubles as it).
    pub fn matrix_type(self, cols: usize, is_output: bool) -> GgmlDType {
        let want = match self {
            GgufType::F16 => GgmlDType::F16,
            GgufType::Q8_0 => GgmlDType::Q8_0,
            GgufType::Q4_0 | GgufType::Q4_1 | GgufType::Q4K if is_output => GgmlDType::Q6K,
            GgufType::Q4_0 => GgmlDType::Q4_0,
            GgufType::Q4_1 => GgmlDType::Q4_1,
            GgufType::Q4K => GgmlDType::Q4K,
        };
        let fits = |t: GgmlDType| cols.is_multiple_of(t.block_size());
        let t = match want {
            t if fits(t) => t,
            GgmlDType::Q4K => GgmlDType::Q5_0,
            GgmlDType::Q6K => GgmlDType::Q8_0,
            t => t,
        };
        if fits(t) {
            t
        } else {
            GgmlDType::F16
        }
    }
}

impl fmt::Display for GgufType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            GgufType::F16 => "f16",
            GgufType::Q8_0 => "q8_0",
            GgufType::Q4_0 => "q4_0",
            GgufType::Q4_1 => "q4_1",
            GgufType::Q4K => "q4_k",
        })
    }
}

impl FromStr for GgufType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f16" => Ok(GgufType::F16),
            "q8_0" => Ok(GgufType::Q8_0),
            "q4_0" => Ok(GgufType::Q4_0),
            "q4_1" => Ok(GgufType::Q4_1),
            "q4_k" | "q4_k_s" => Ok(GgufType::Q4K),
            _ => Err(Error::config("qtype", format!("`{s}` is not a GGUF export type (f16, q8_0, q4_0, q4_1 or q4_k)"))),
        }
    }
}

/// Permutes q/k projection rows from HF's rotate-half layout to llama.cpp's interleaved one,
/// as `convert_hf_to_gguf.py` does: rows viewed as (heads, 2, head_dim/2) are transposed to
/// (heads, head_dim/2, 2). The inverse of [`crate::model::gguf::unpermute_rows`]; works on
/// weights (rows, cols) and biases (rows,).
pub fn permute_rows(w: &Tensor, n_heads: usize) -> Result<Tensor> {
    let dims = w.dims().to_vec();
    let rows = dims.first().copied().unwrap_or(0);
    if n_heads == 0 || rows % (2 * n_heads) != 0 {
        return Err(Error::Msg(format!("cannot permute {rows} rows for {n_heads} heads")));
    }
    let rest: usize = dims[1..].iter().product();
    let half = rows / n_heads / 2;
    Ok(w.reshape((n_heads, 2, half, rest))?.transpose(1, 2)?.contiguous()?.reshape(dims)?)
}

/// The llama.cpp name of a HF weight (the inverse of [`crate::model::gguf::hf_name`]).
fn gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (idx, rest) = rest.split_once('.')?;
    let idx: usize = idx.parse().ok()?;
    let (module, kind) = rest.rsplit_once('.')?;
    let part = match module {
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        _ => return None,
    };
    Some(format!("blk.{idx}.{part}.{kind}"))
}

/// Writes an already loaded (and merged) model as the GGUF file `out_file`, and with
/// `modelfile` an Ollama `Modelfile` next to it; see [`super::export_gguf`].
pub fn write_gguf(
    m: &LoadedModel,
    out_file: &Path,
    qtype: GgufType,
    modelfile: Option<&SampleOptions>,
    mut progress: impl FnMut(usize, usize),
) -> Result<ExportReport> {
    let start = Instant::now();
    ensure_merged(m)?;
    let cfg = m.model.config();
    let arch = if cfg.model_type == "qwen2" { "qwen2" } else { "llama" };
    let stage = Staged::file(out_file)?;
    let mf_stage = modelfile.map(|_| Staged::file(&modelfile_path(out_file))).transpose()?;
    let source_meta = if m.source.is_file() { Some(read_gguf_meta(&m.source)?) } else { None };

    let named = m.model.named_tensors()?;
    let tied = !named.iter().any(|(k, _)| k == "lm_head.weight");
    let total = named.len();
    // Plan every tensor (name, shape, storage type) first: the header comes before the data,
    // and then each tensor is converted and written alone (gguf_stream).
    let mut plan = Vec::with_capacity(total);
    let mut types = BTreeMap::new();
    for (hf, t) in &named {
        let name = gguf_name(hf).ok_or_else(|| Error::Msg(format!("tensor `{hf}` has no llama.cpp name")))?;
        check_bias_supported(arch, hf)?;
        let ty = if t.rank() < 2 {
            GgmlDType::F32
        } else {
            let is_output = name == "output.weight" || (tied && name == "token_embd.weight");
            qtype.matrix_type(t.dim(candle_core::D::Minus1)?, is_output)
        };
        *types.entry(format!("{ty:?}").to_uppercase()).or_insert(0usize) += 1;
        plan.push(TensorPlan { name, dims: t.dims().to_vec(), ty });
    }
    let meta = metadata(m, arch, qtype, source_meta.as_ref())?;
    {
        let file = std::fs::OpenOptions::new().write(true).truncate(true).open(stage.tmp_path()).map_err(|e| Error::io(stage.tmp_path(), e))?;
        let w = std::io::BufWriter::with_capacity(1 << 20, file);
        gguf_stream::write(w, &meta, &plan, |i| {
            let (name, ty) = (&plan[i].name, plan[i].ty);
            let mut t = named[i].1.to_dtype(DType::F32)?;
            if arch == "llama" {
                if name.contains(".attn_q.") {
                    t = permute_rows(&t, cfg.num_attention_heads)?;
                } else if name.contains(".attn_k.") {
                    t = permute_rows(&t, cfg.kv_heads())?;
                }
            }
            let q = QTensor::quantize(&t, ty).map_err(|e| Error::Msg(format!("quantizing {name} as {ty:?}: {e}")))?;
            progress(i + 1, total);
            Ok(q.data()?.to_vec())
        })
        .map_err(|e| Error::Msg(format!("{}: {e}", out_file.display())))?;
    }
    let mut files = vec![out_file.to_path_buf()];
    if let (Some(opts), Some(mf)) = (modelfile, &mf_stage) {
        let file_name = out_file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let text = ollama_modelfile(&file_name, &m.spec, opts);
        std::fs::write(mf.tmp_path(), text).map_err(|e| Error::io(mf.tmp_path(), e))?;
        sync_file(mf.tmp_path())?;
        files.push(mf.dest().to_path_buf());
    }
    let mut bytes = stage.commit()?;
    if let Some(mf) = mf_stage {
        match mf.commit() {
            Ok(b) => bytes += b,
            Err(e) => {
                Staged::undo(out_file, false);
                return Err(e);
            }
        }
    }
    Ok(ExportReport {
        path: out_file.to_path_buf(),
        files,
        bytes,
        tensors: total,
        tensor_types: types,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// llama.cpp's `llama` architecture has optional biases on every projection; `qwen2` on q/k/v
/// only; no architecture has an LM-head bias.
fn check_bias_supported(arch: &str, hf: &str) -> Result<()> {
    let Some(module) = hf.strip_suffix(".bias") else { return Ok(()) };
    let short = module.rsplit('.').next().unwrap_or("");
    let ok = match arch {
        "qwen2" => matches!(short, "q_proj" | "k_proj" | "v_proj"),
        _ => short != "lm_head",
    };
    if ok {
        Ok(())
    } else {
        Err(Error::Msg(format!("the merged model has a bias on {module}, which llama.cpp's `{arch}` architecture cannot hold")))
    }
}

/// The metadata keys, in the order llama.cpp's converter writes them.
fn metadata(m: &LoadedModel, arch: &str, qtype: GgufType, source: Option<&Content>) -> Result<Vec<(String, Value)>> {
    let cfg = m.model.config();
    let u32_of = |n: usize, key: &str| -> Result<Value> {
        u32::try_from(n).map(Value::U32).map_err(|_| Error::Msg(format!("{key} = {n} does not fit a GGUF u32")))
    };
    let mut out: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        ("general.type".into(), Value::String("model".into())),
    ];
    let mut general: Vec<(String, Value)> = source
        .map(|c| {
            c.metadata
                .iter()
                .filter(|(k, _)| k.starts_with("general.") && !matches!(k.as_str(), "general.architecture" | "general.type" | "general.file_type" | "general.quantization_version" | "general.alignment"))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        })
        .unwrap_or_default();
    general.sort_by(|a, b| a.0.cmp(&b.0));
    if !general.iter().any(|(k, _)| k == "general.name") {
        let name = m.source.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
        out.push(("general.name".into(), Value::String(name)));
    }
    out.extend(general);
    let k = |s: &str| format!("{arch}.{s}");
    out.extend([
        (k("block_count"), u32_of(cfg.num_hidden_layers, "block_count")?),
        (k("context_length"), u32_of(cfg.max_position_embeddings, "context_length")?),
        (k("embedding_length"), u32_of(cfg.hidden_size, "embedding_length")?),
        (k("feed_forward_length"), u32_of(cfg.intermediate_size, "feed_forward_length")?),
        (k("attention.head_count"), u32_of(cfg.num_attention_heads, "head_count")?),
        (k("attention.head_count_kv"), u32_of(cfg.kv_heads(), "head_count_kv")?),
        (k("rope.freq_base"), Value::F32(cfg.rope_theta as f32)),
        (k("attention.layer_norm_rms_epsilon"), Value::F32(cfg.rms_norm_eps as f32)),
    ]);
    if cfg.head_dim() != cfg.hidden_size / cfg.num_attention_heads {
        out.push((k("attention.key_length"), u32_of(cfg.head_dim(), "key_length")?));
        out.push((k("attention.value_length"), u32_of(cfg.head_dim(), "value_length")?));
    }
    out.push(("general.file_type".into(), Value::U32(qtype.file_type())));
    out.push((k("vocab_size"), u32_of(cfg.vocab_size, "vocab_size")?));
    out.push((k("rope.dimension_count"), u32_of(cfg.head_dim(), "rope.dimension_count")?));
    match source {
        Some(c) => {
            let mut tok: Vec<(String, Value)> =
                c.metadata.iter().filter(|(k, _)| k.starts_with("tokenizer.")).map(|(k, v)| (k.clone(), v.clone())).collect();
            tok.sort_by_key(|a| tokenizer_key_order(&a.0));
            out.extend(tok);
        }
        None => out.extend(tokenizer_from_hf(m)?),
    }
    out.push(("general.quantization_version".into(), Value::U32(2)));
    Ok(out)
}

/// The converter's order of the tokenizer keys (others after, alphabetically).
fn tokenizer_key_order(key: &str) -> (usize, String) {
    const ORDER: &[&str] = &[
        "tokenizer.ggml.model",
        "tokenizer.ggml.pre",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.unknown_token_id",
        "tokenizer.ggml.padding_token_id",
        "tokenizer.ggml.add_bos_token",
        "tokenizer.ggml.add_eos_token",
        "tokenizer.chat_template",
    ];
    (ORDER.iter().position(|k| *k == key).unwrap_or(ORDER.len()), key.to_string())
}

/// A check text for the pre-tokenizer: whitespace runs, digits of every length, emoji,
/// scripts without spaces, apostrophe contractions, punctuation runs.
const PRE_CHECK_TEXT: &str = "\n \n\n \t\t x\n   \n    y 🚀 🦙🦙 😶‍🌫️ ✅ 7 42 512 2048 65536 1234567 3.14 3..4 \
    人工智能很有趣2024年 ไทย ----===== Привет, мир! ''``\"\"....!!??? I've you'll she'D WE'RE It's 'tis \
    hello  world   spaced\r\nline";

/// llama.cpp pre-tokenizer names this crate's GGUF tokenizer understands, most specific first.
const PRE_CANDIDATES: &[&str] = &["smollm", "llama-bpe", "qwen2", "gpt2"];

/// `tokenizer.*` metadata built from a HF folder's `tokenizer.json` (byte-level BPE only).
fn tokenizer_from_hf(m: &LoadedModel) -> Result<Vec<(String, Value)>> {
    let path = m.source.join("tokenizer.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let j: Json = serde_json::from_str(&text).map_err(|e| Error::bad_input(&path, Some(e.line()), e.to_string()))?;
    let model = &j["model"];
    let kind = model["type"].as_str().unwrap_or("(none)");
    if kind != "BPE" {
        return Err(Error::bad_input(
            &path,
            None,
            format!("tokenizer model `{kind}` cannot be written to GGUF: only byte-level BPE tokenizers (GPT-2 style, llama.cpp's `gpt2`) can"),
        ));
    }
    let byte_level = |v: &Json| v.to_string().contains("\"ByteLevel\"");
    if !byte_level(&j["pre_tokenizer"]) && !byte_level(&j["decoder"]) {
        return Err(Error::bad_input(
            &path,
            None,
            "this BPE tokenizer is not byte-level (SentencePiece-style BPE): only byte-level BPE tokenizers (GPT-2 style, llama.cpp's `gpt2`) can be written to GGUF",
        ));
    }
    let vocab = model["vocab"].as_object().ok_or_else(|| Error::bad_input(&path, None, "model.vocab is not an object"))?;
    let mut by_id: BTreeMap<u32, (String, i32)> = BTreeMap::new();
    for (tok, id) in vocab {
        let id = id.as_u64().ok_or_else(|| Error::bad_input(&path, None, format!("vocabulary id of `{tok}` is not a number")))?;
        by_id.insert(id as u32, (tok.clone(), 1));
    }
    for a in j["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(content)) = (a["id"].as_u64(), a["content"].as_str()) else { continue };
        // Special added tokens are llama.cpp CONTROL tokens (3), the others USER_DEFINED (4).
        let ty = if a["special"].as_bool().unwrap_or(false) { 3 } else { 4 };
        by_id.insert(id as u32, (content.to_string(), ty));
    }
    let n = by_id.keys().next_back().map(|&i| i as usize + 1).unwrap_or(0).max(m.model.config().vocab_size);
    let mut tokens = Vec::with_capacity(n);
    let mut types = Vec::with_capacity(n);
    for i in 0..n {
        match by_id.get(&(i as u32)) {
            Some((t, ty)) => {
                tokens.push(Value::String(t.clone()));
                types.push(Value::I32(*ty));
            }
            // Embedding rows beyond the tokenizer: llama.cpp's converter names them so (UNUSED, 5).
            None => {
                tokens.push(Value::String(format!("[PAD{i}]")));
                types.push(Value::I32(5));
            }
        }
    }
    let merges: Vec<Value> = model["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|mg| match mg {
            Json::String(s) => Ok(Value::String(s.clone())),
            Json::Array(p) if p.len() == 2 => Ok(Value::String(format!("{} {}", p[0].as_str().unwrap_or(""), p[1].as_str().unwrap_or("")))),
            other => Err(Error::bad_input(&path, None, format!("unexpected merge entry {other}"))),
        })
        .collect::<Result<_>>()?;

    let id_of = |t: &str| m.tokenizer.token_to_id(t);
    let bos_id = m.spec.bos_token.as_deref().and_then(id_of);
    let unk_id = unk_token(&m.source).as_deref().and_then(id_of);
    // A post-processor that prepends bos (Llama 3's TemplateProcessing) means add_bos.
    let adds_bos = match (bos_id, m.tokenizer.encode("a", true)) {
        (Some(b), Ok(enc)) => enc.get_ids().first() == Some(&b),
        _ => false,
    };
    let mut out: Vec<(String, Value)> = vec![
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String(String::new())),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens)),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        ("tokenizer.ggml.merges".into(), Value::Array(merges)),
    ];
    if let Some(b) = bos_id {
        out.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(b)));
    }
    out.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(m.spec.eos_id)));
    if let Some(u) = unk_id {
        out.push(("tokenizer.ggml.unknown_token_id".into(), Value::U32(u)));
    }
    out.push(("tokenizer.ggml.padding_token_id".into(), Value::U32(m.spec.pad_id)));
    out.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(m.spec.add_bos || adds_bos)));
    if let Some(t) = &m.spec.chat_template {
        out.push(("tokenizer.chat_template".into(), Value::String(t.clone())));
    }
    let pre = detect_pre(m, &out, &path)?;
    out[1].1 = Value::String(pre.into());
    Ok(out)
}

/// The `unk_token` of a HF folder's tokenizer_config.json (a string or `{content}`).
fn unk_token(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join("tokenizer_config.json")).ok()?;
    let v: Json = serde_json::from_str(&text).ok()?;
    match &v["unk_token"] {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// The pre-tokenizer name whose GGUF tokenizer encodes [`PRE_CHECK_TEXT`] exactly as the
/// folder's tokenizer.json does.
fn detect_pre(m: &LoadedModel, meta: &[(String, Value)], path: &Path) -> Result<&'static str> {
    let want = m.tokenizer.encode(PRE_CHECK_TEXT, false).map_err(|e| Error::Tokenizer(e.to_string()))?;
    let mut content = Content {
        magic: VersionedMagic::GgufV3,
        metadata: meta.iter().cloned().collect::<HashMap<_, _>>(),
        tensor_infos: HashMap::new(),
        tensor_data_offset: 0,
    };
    for &pre in PRE_CANDIDATES {
        content.metadata.insert("tokenizer.ggml.pre".into(), Value::String(pre.into()));
        let (tok, _) = crate::model::tokenizer::from_gguf(&content, path)?;
        let got = tok.encode(PRE_CHECK_TEXT, false).map_err(|e| Error::Tokenizer(e.to_string()))?;
        if got.get_ids() == want.get_ids() {
            return Ok(pre);
        }
    }
    Err(Error::bad_input(
        path,
        None,
        format!(
            "this tokenizer's pre-tokenizer matches none that llama.cpp names here ({}): the GGUF would tokenize differently",
            PRE_CANDIDATES.join(", ")
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_the_loader_mapping() {
        for hf in [
            "model.embed_tokens.weight",
            "model.norm.weight",
            "lm_head.weight",
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.12.self_attn.k_proj.bias",
            "model.layers.3.self_attn.o_proj.weight",
            "model.layers.29.mlp.down_proj.weight",
            "model.layers.1.input_layernorm.weight",
            "model.layers.1.post_attention_layernorm.weight",
        ] {
            let g = gguf_name(hf).unwrap();
            assert_eq!(crate::model::gguf::hf_name(&g).as_deref(), Some(hf), "{g}");
        }
        assert_eq!(gguf_name("model.layers.x.mlp.up_proj.weight"), None);
    }

    #[test]
    fn permute_inverts_the_loaders_unpermute() {
        let dev = candle_core::Device::Cpu;
        let w = Tensor::arange(0f32, 12.0 * 8.0 * 5.0, &dev).unwrap().reshape((12 * 8, 5)).unwrap();
        let back = crate::model::gguf::unpermute_rows(&permute_rows(&w, 12).unwrap(), 12).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
        // A bias vector moves like the rows it belongs to.
        let b = Tensor::arange(0f32, 16.0, &dev).unwrap();
        let p = permute_rows(&b, 2).unwrap().to_vec1::<f32>().unwrap();
        // head 0: rows [0..4 | 4..8] (first half, second half) interleave to 0,4,1,5,2,6,3,7.
        assert_eq!(&p[..8], &[0.0, 4.0, 1.0, 5.0, 2.0, 6.0, 3.0, 7.0]);
        assert!(permute_rows(&b, 3).is_err());
    }

    #[test]
    fn storage_types_follow_llama_quantize_with_its_fallbacks() {
        use GgmlDType as G;
        assert_eq!(GgufType::F16.matrix_type(576, true), G::F16);
        assert_eq!(GgufType::Q8_0.matrix_type(576, false), G::Q8_0);
        assert_eq!(GgufType::Q4_0.matrix_type(576, false), G::Q4_0);
        assert_eq!(GgufType::Q4_1.matrix_type(576, true), G::Q8_0, "Q6_K cannot hold rows of 576");
        assert_eq!(GgufType::Q4_1.matrix_type(4096, true), G::Q6K);
        assert_eq!(GgufType::Q4K.matrix_type(576, false), G::Q5_0, "llama.cpp's Q4_K fallback");
        assert_eq!(GgufType::Q4K.matrix_type(1536, false), G::Q4K);
        assert_eq!(GgufType::Q8_0.matrix_type(48, false), G::F16, "rows 32 does not divide");
        for t in ["f16", "q8_0", "q4_0", "q4_1", "q4_k"] {
            assert_eq!(t.parse::<GgufType>().unwrap().to_string(), t);
        }
        assert!("q3_k".parse::<GgufType>().unwrap_err().to_string().contains("q4_k"));
    }
}
