//! The merged model as a HF transformers folder: `model.safetensors`, `config.json`,
//! `generation_config.json` and the tokenizer files.
//!
//! Follows what `PreTrainedModel.save_pretrained` writes for `LlamaForCausalLM`: the tied LM
//! head is not stored (transformers re-ties it to `model.embed_tokens.weight`), the
//! safetensors header carries `{"format": "pt"}`, and `config.json` has every key the
//! `LlamaConfig` constructor reads (legacy spellings `rope_theta` and `torch_dtype`, which both
//! transformers 4 and 5 accept). For a HF-folder source the original `config.json` is kept
//! (so keys this crate does not model, e.g. `rope_scaling`, survive) with the dtype, tying and
//! bias flags updated, and the tokenizer files are copied as they are.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::Tensor;
use serde_json::{json, Map, Value as Json};

use super::staging::{self, Staged};
use super::{ensure_merged, f32_clean, ExportReport, HfDtype};
use crate::model::LoadedModel;
use crate::{Error, Result};

/// Tokenizer-side files of a HF folder, copied as they are from a HF-folder source.
const TOKENIZER_FILES: &[&str] =
    &["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json"];

/// Writes an already loaded (and merged) model as a HF folder `out_dir`; see [`super::export_hf`].
pub fn write_hf(m: &LoadedModel, out_dir: &Path, dtype: HfDtype, mut progress: impl FnMut(usize, usize)) -> Result<ExportReport> {
    let start = Instant::now();
    ensure_merged(m)?;
    let stage = Staged::dir(out_dir)?;
    let dir = stage.tmp_path().to_path_buf();

    let named = m.model.named_tensors()?;
    let tied = !named.iter().any(|(k, _)| k == "lm_head.weight");
    let biases = Biases::of(&named);
    let cfg = m.model.config();
    check_biases(&cfg.model_type, &biases)?;
    let mut tensors: Vec<(String, Tensor)> = Vec::with_capacity(named.len() + 8);
    let total = named.len();
    for (i, (name, t)) in named.into_iter().enumerate() {
        tensors.push((name, t.to_dtype(dtype.dtype())?.contiguous()?));
        progress(i + 1, total);
    }
    // transformers' Llama has all four attention biases (or none), and all three MLP biases:
    // the ones a merge did not create are zeros.
    tensors.extend(missing_biases(m, &biases, dtype)?);
    let mut types = std::collections::BTreeMap::new();
    for (_, t) in &tensors {
        *types.entry(format!("{:?}", t.dtype()).to_uppercase()).or_insert(0usize) += 1;
    }
    let n_tensors = tensors.len();
    let st_path = dir.join("model.safetensors");
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(tensors.iter().map(|(k, t)| (k.as_str(), t)), Some(meta), &st_path)
        .map_err(|e| Error::Msg(format!("{}: {e}", st_path.display())))?;
    drop(tensors);

    let source_gguf = if m.source.is_file() { Some(read_gguf_meta(&m.source)?) } else { None };
    let config = config_json(m, dtype, tied, &biases)?;
    write_json(&dir.join("config.json"), &config)?;
    let src_gen = m.source.join("generation_config.json");
    if m.source.is_dir() && src_gen.is_file() {
        copy(&src_gen, &dir.join("generation_config.json"))?;
    } else {
        write_json(&dir.join("generation_config.json"), &generation_config(m))?;
    }
    match &source_gguf {
        Some(meta) => write_tokenizer_from_gguf(m, meta, &dir)?,
        None => copy_tokenizer_files(m, &dir)?,
    }
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .map_err(|e| Error::io(&dir, e))?
        .filter_map(|e| e.ok())
        .map(|e| out_dir.join(e.file_name()))
        .collect();
    files.sort();
    for f in &files {
        staging::sync_file(&dir.join(f.file_name().unwrap_or_default()))?;
    }
    let bytes = stage.commit()?;
    Ok(ExportReport {
        path: out_dir.to_path_buf(),
        files,
        bytes,
        tensors: n_tensors,
        tensor_types: types,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Which kinds of projection carry a bias after the merge (BitFit adds them).
#[derive(Debug, Default)]
struct Biases {
    /// q/k/v.
    qkv: bool,
    /// o_proj.
    o: bool,
    /// gate/up/down.
    mlp: bool,
    /// The LM head.
    lm_head: bool,
}

impl Biases {
    fn of(named: &[(String, Tensor)]) -> Self {
        let mut b = Biases::default();
        for (k, _) in named {
            let Some(module) = k.strip_suffix(".bias") else { continue };
            match module.rsplit('.').next().unwrap_or("") {
                "q_proj" | "k_proj" | "v_proj" => b.qkv = true,
                "o_proj" => b.o = true,
                "gate_proj" | "up_proj" | "down_proj" => b.mlp = true,
                _ => b.lm_head = true,
            }
        }
        b
    }
    fn attention(&self) -> bool {
        self.qkv || self.o
    }
}

fn check_biases(model_type: &str, b: &Biases) -> Result<()> {
    let unsupported = match model_type {
        "qwen2" if b.o || b.mlp => Some("o_proj or MLP biases (Qwen2 has q/k/v biases only)"),
        "mistral" if b.attention() || b.mlp => Some("biases (Mistral has none)"),
        _ if b.lm_head => Some("an LM-head bias"),
        _ => None,
    };
    match unsupported {
        Some(what) => Err(Error::Msg(format!(
            "the merged model has {what}, which a transformers `{model_type}` checkpoint cannot hold"
        ))),
        None => Ok(()),
    }
}

/// Zero biases for the projections of a bias group that has none (llama: `attention_bias`
/// covers q/k/v/o, `mlp_bias` gate/up/down).
fn missing_biases(m: &LoadedModel, b: &Biases, dtype: HfDtype) -> Result<Vec<(String, Tensor)>> {
    let mut out = Vec::new();
    if m.model.config().model_type != "llama" {
        return Ok(out);
    }
    for lin in m.model.linears() {
        let short = lin.short_name();
        let wanted = match short {
            "q_proj" | "k_proj" | "v_proj" | "o_proj" => b.attention(),
            "gate_proj" | "up_proj" | "down_proj" => b.mlp,
            _ => false,
        };
        if wanted && lin.bias().is_none() {
            let (_, out_features) = lin.in_out();
            out.push((format!("{}.bias", lin.name()), Tensor::zeros(out_features, dtype.dtype(), &candle_core::Device::Cpu)?));
        }
    }
    Ok(out)
}

fn architecture(model_type: &str) -> &'static str {
    match model_type {
        "qwen2" => "Qwen2ForCausalLM",
        "mistral" => "MistralForCausalLM",
        _ => "LlamaForCausalLM",
    }
}

/// `config.json`: the source's (HF folder) updated, or built from the architecture (GGUF).
fn config_json(m: &LoadedModel, dtype: HfDtype, tied: bool, b: &Biases) -> Result<Json> {
    let cfg = m.model.config();
    let src = m.source.join("config.json");
    let mut obj: Map<String, Json> = if m.source.is_dir() && src.is_file() {
        let text = std::fs::read_to_string(&src).map_err(|e| Error::io(&src, e))?;
        match serde_json::from_str(&text).map_err(|e| Error::bad_input(&src, Some(e.line()), e.to_string()))? {
            Json::Object(o) => o,
            _ => return Err(Error::bad_input(&src, None, "config.json is not a JSON object")),
        }
    } else {
        let eos = cfg.eos_token_id.clone().unwrap_or_else(|| json!(m.spec.eos_id));
        let bos = cfg.bos_token_id.map(Json::from).unwrap_or(Json::Null);
        let o = json!({
            "architectures": [architecture(&cfg.model_type)],
            "model_type": if cfg.model_type == "qwen2" || cfg.model_type == "mistral" { cfg.model_type.as_str() } else { "llama" },
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.kv_heads(),
            "head_dim": cfg.head_dim(),
            "hidden_act": "silu",
            "max_position_embeddings": cfg.max_position_embeddings,
            "rms_norm_eps": f32_clean(cfg.rms_norm_eps),
            "rope_theta": f32_clean(cfg.rope_theta),
            "rope_scaling": null,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "pretraining_tp": 1,
            "use_cache": true,
            "bos_token_id": bos,
            "eos_token_id": eos,
            "pad_token_id": m.spec.pad_id,
        });
        match o {
            Json::Object(o) => o,
            _ => unreachable!("json! of an object literal"),
        }
    };
    obj.insert("tie_word_embeddings".into(), json!(tied));
    obj.insert("torch_dtype".into(), json!(dtype.torch_name()));
    if obj.contains_key("dtype") {
        obj.insert("dtype".into(), json!(dtype.torch_name()));
    }
    // The weights are dense now, whatever the source was.
    obj.remove("quantization_config");
    if cfg.model_type == "llama" {
        obj.insert("attention_bias".into(), json!(b.attention()));
        obj.insert("mlp_bias".into(), json!(b.mlp));
    }
    Ok(Json::Object(obj))
}

fn generation_config(m: &LoadedModel) -> Json {
    let cfg = m.model.config();
    let mut o = Map::new();
    if let Some(b) = cfg.bos_token_id {
        o.insert("bos_token_id".into(), json!(b));
    }
    o.insert("eos_token_id".into(), cfg.eos_token_id.clone().unwrap_or_else(|| json!(m.spec.eos_id)));
    o.insert("pad_token_id".into(), json!(m.spec.pad_id));
    Json::Object(o)
}

/// The metadata of a GGUF file (no tensor data).
pub(super) fn read_gguf_meta(path: &Path) -> Result<Content> {
    let mut file = std::io::BufReader::with_capacity(1 << 16, std::fs::File::open(path).map_err(|e| Error::io(path, e))?);
    Content::read(&mut file).map_err(|e| Error::bad_input(path, None, format!("not a readable GGUF file: {e}")))
}

fn token_text(m: &LoadedModel, id: u32) -> Option<String> {
    m.tokenizer.id_to_token(id)
}

/// tokenizer.json (the tokenizer built from the GGUF metadata), tokenizer_config.json and
/// special_tokens_map.json.
fn write_tokenizer_from_gguf(m: &LoadedModel, meta: &Content, dir: &Path) -> Result<()> {
    let tj = dir.join("tokenizer.json");
    m.tokenizer.save(&tj, false).map_err(|e| Error::Tokenizer(format!("{}: {e}", tj.display())))?;
    let id = |key: &str| meta.metadata.get(key).and_then(|v: &Value| v.to_u32().ok());
    let bos = m.spec.bos_token.clone();
    let eos = m.spec.eos_token.clone();
    let pad = token_text(m, m.spec.pad_id);
    let unk = id("tokenizer.ggml.unknown_token_id").and_then(|i| token_text(m, i));
    let mut specials = Map::new();
    for (k, v) in [("bos_token", &bos), ("eos_token", &Some(eos.clone())), ("pad_token", &pad), ("unk_token", &unk)] {
        if let Some(v) = v {
            specials.insert(k.into(), json!(v));
        }
    }
    let mut tc = specials.clone();
    tc.insert("add_bos_token".into(), json!(m.spec.add_bos));
    tc.insert("add_eos_token".into(), json!(false));
    tc.insert("clean_up_tokenization_spaces".into(), json!(false));
    tc.insert("model_max_length".into(), json!(m.model.config().max_position_embeddings));
    tc.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
    if let Some(t) = &m.spec.chat_template {
        tc.insert("chat_template".into(), json!(t));
    }
    write_json(&dir.join("tokenizer_config.json"), &Json::Object(tc))?;
    write_json(&dir.join("special_tokens_map.json"), &Json::Object(specials))
}

/// A HF-folder source's tokenizer files, copied; `tokenizer_config.json` gains the chat
/// template and eos token when it lacks them (a template read from `chat_template.jinja` is
/// also copied as that file).
fn copy_tokenizer_files(m: &LoadedModel, dir: &Path) -> Result<()> {
    for f in TOKENIZER_FILES {
        let src = m.source.join(f);
        if src.is_file() && *f != "tokenizer_config.json" {
            copy(&src, &dir.join(f))?;
        }
    }
    let src = m.source.join("tokenizer_config.json");
    let mut tc: Map<String, Json> = if src.is_file() {
        let text = std::fs::read_to_string(&src).map_err(|e| Error::io(&src, e))?;
        match serde_json::from_str(&text).map_err(|e| Error::bad_input(&src, Some(e.line()), e.to_string()))? {
            Json::Object(o) => o,
            _ => return Err(Error::bad_input(&src, None, "tokenizer_config.json is not a JSON object")),
        }
    } else {
        Map::new()
    };
    let has_jinja = m.source.join("chat_template.jinja").is_file();
    if let (false, false, Some(t)) = (tc.contains_key("chat_template"), has_jinja, &m.spec.chat_template) {
        tc.insert("chat_template".into(), json!(t));
    }
    tc.entry("eos_token").or_insert_with(|| json!(m.spec.eos_token));
    if let Some(b) = &m.spec.bos_token {
        tc.entry("bos_token").or_insert_with(|| json!(b));
    }
    write_json(&dir.join("tokenizer_config.json"), &Json::Object(tc.clone()))?;
    if !dir.join("special_tokens_map.json").exists() {
        let mut sp = Map::new();
        for k in ["bos_token", "eos_token", "pad_token", "unk_token"] {
            if let Some(v) = tc.get(k).filter(|v| !v.is_null()) {
                sp.insert(k.into(), v.clone());
            }
        }
        write_json(&dir.join("special_tokens_map.json"), &Json::Object(sp))?;
    }
    Ok(())
}

fn write_json(path: &Path, v: &Json) -> Result<()> {
    let mut text = serde_json::to_string_pretty(v).map_err(|e| Error::Msg(e.to_string()))?;
    text.push('\n');
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

fn copy(src: &Path, dst: &Path) -> Result<()> {
    std::fs::copy(src, dst).map(|_| ()).map_err(|e| Error::io(src, e))
}
