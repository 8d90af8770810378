//! Tokenizers: built from GGUF metadata (gpt2-style byte-level BPE) or read from a HF
//! `tokenizer.json`, plus the special tokens and chat template a model ships with.

use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::{Error, Result};

/// Special tokens and the chat template that go with a tokenizer.
#[derive(Clone, Debug, Default)]
pub struct TokenizerSpec {
    /// Beginning-of-sequence token text, if the model has one.
    pub bos_token: Option<String>,
    /// End-of-sequence token text.
    pub eos_token: String,
    /// End-of-sequence token id.
    pub eos_id: u32,
    /// Padding token id (the eos id when the model has no pad token).
    pub pad_id: u32,
    /// Whether plain text should start with the bos token.
    pub add_bos: bool,
    /// The model's Jinja chat template, when it ships one.
    pub chat_template: Option<String>,
}

const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn split_regex(re: &str) -> Result<PreTokenizerWrapper> {
    let split = Split::new(SplitPattern::Regex(re.to_string()), SplitDelimiterBehavior::Isolated, false)
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    Ok(PreTokenizerWrapper::Split(split))
}

/// The pre-tokenizer llama.cpp's `tokenizer.ggml.pre` names.
fn pre_tokenizer(pre: &str) -> Result<PreTokenizerWrapper> {
    let byte_level = |use_regex| PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, use_regex));
    Ok(match pre {
        // StarCoder-family tokenizers (SmolLM, SmolLM2): digits split one by one, then GPT-2.
        "smollm" | "starcoder" | "refact" => PreTokenizerWrapper::Sequence(Sequence::new(vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            byte_level(true),
        ])),
        "llama-bpe" | "llama3" => PreTokenizerWrapper::Sequence(Sequence::new(vec![split_regex(LLAMA3_REGEX)?, byte_level(false)])),
        "qwen2" => PreTokenizerWrapper::Sequence(Sequence::new(vec![split_regex(QWEN2_REGEX)?, byte_level(false)])),
        "gpt2" | "default" => byte_level(true),
        other => {
            tracing::warn!("unknown GGUF pre-tokenizer `{other}`; using GPT-2 byte-level splitting");
            byte_level(true)
        }
    })
}

fn strings(v: &Value) -> Option<Vec<String>> {
    match v {
        Value::Array(items) => items.iter().map(|i| i.to_string().ok().cloned()).collect(),
        _ => None,
    }
}

/// Builds the tokenizer described by GGUF metadata (`tokenizer.ggml.*`). Only byte-level BPE
/// (`tokenizer.ggml.model = gpt2`) is supported: it is what Llama-3, SmolLM, Qwen2 and most
/// recent models use.
pub fn from_gguf(c: &Content, path: &Path) -> Result<(Tokenizer, TokenizerSpec)> {
    let bad = |r: String| Error::bad_input(path, None, r);
    let model = c
        .metadata
        .get("tokenizer.ggml.model")
        .and_then(|v| v.to_string().ok())
        .ok_or_else(|| bad("the GGUF has no tokenizer (tokenizer.ggml.model is missing)".into()))?;
    if model != "gpt2" {
        return Err(bad(format!("tokenizer model `{model}` is not supported yet (only gpt2-style BPE is)")));
    }
    let tokens = c
        .metadata
        .get("tokenizer.ggml.tokens")
        .and_then(strings)
        .ok_or_else(|| bad("tokenizer.ggml.tokens is missing or not a string array".into()))?;
    let merges: Vec<(String, String)> = c
        .metadata
        .get("tokenizer.ggml.merges")
        .and_then(strings)
        .ok_or_else(|| bad("tokenizer.ggml.merges is missing".into()))?
        .into_iter()
        .filter_map(|m| m.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())))
        .collect();
    let types: Vec<i32> = match c.metadata.get("tokenizer.ggml.token_type") {
        Some(Value::Array(a)) => a.iter().map(|v| v.to_i32().unwrap_or(1)).collect(),
        _ => vec![1; tokens.len()],
    };
    let vocab: tokenizers::models::bpe::Vocab =
        tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
    let mut tok = Tokenizer::new(bpe);
    let pre = c.metadata.get("tokenizer.ggml.pre").and_then(|v| v.to_string().ok()).cloned();
    tok.with_pre_tokenizer(Some(pre_tokenizer(pre.as_deref().unwrap_or("default"))?));
    tok.with_decoder(Some(ByteLevelDecoder::default()));
    // Control tokens (type 3) are special; user-defined ones (type 4) are added tokens.
    let special: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|(_, &t)| t == 3)
        .map(|(s, _)| AddedToken::from(s.clone(), true))
        .collect();
    let user: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|(_, &t)| t == 4)
        .map(|(s, _)| AddedToken::from(s.clone(), false))
        .collect();
    tok.add_special_tokens(&special);
    tok.add_tokens(&user);

    let id = |key: &str| c.metadata.get(key).and_then(|v| v.to_u32().ok());
    let name = |i: u32| tokens.get(i as usize).cloned();
    let eos_id = id("tokenizer.ggml.eos_token_id").ok_or_else(|| bad("tokenizer.ggml.eos_token_id is missing".into()))?;
    let eos_token = name(eos_id).ok_or_else(|| bad(format!("eos token id {eos_id} is outside the vocabulary")))?;
    let spec = TokenizerSpec {
        bos_token: id("tokenizer.ggml.bos_token_id").and_then(name),
        eos_token,
        eos_id,
        pad_id: id("tokenizer.ggml.padding_token_id").unwrap_or(eos_id),
        add_bos: c.metadata.get("tokenizer.ggml.add_bos_token").and_then(|v| v.to_bool().ok()).unwrap_or(false),
        chat_template: c.metadata.get("tokenizer.chat_template").and_then(|v| v.to_string().ok()).cloned(),
    };
    Ok((tok, spec))
}

/// Reads a HF model folder's `tokenizer.json` and `tokenizer_config.json` (chat template,
/// bos/eos tokens).
pub fn from_hf_folder(dir: &Path) -> Result<(Tokenizer, TokenizerSpec)> {
    let tj = dir.join("tokenizer.json");
    if !tj.exists() {
        return Err(Error::bad_input(dir, None, "model folder has no tokenizer.json"));
    }
    let tok = Tokenizer::from_file(&tj).map_err(|e| Error::bad_input(&tj, None, e.to_string()))?;
    let tc_path = dir.join("tokenizer_config.json");
    let tc: serde_json::Value = if tc_path.exists() {
        let text = std::fs::read_to_string(&tc_path).map_err(|e| Error::io(&tc_path, e))?;
        serde_json::from_str(&text).map_err(|e| Error::bad_input(&tc_path, Some(e.line()), e.to_string()))?
    } else {
        serde_json::Value::Null
    };
    let token_str = |key: &str| -> Option<String> {
        match tc.get(key)? {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(str::to_string),
            _ => None,
        }
    };
    let eos_token = token_str("eos_token").unwrap_or_else(|| "</s>".into());
    let eos_id = tok
        .token_to_id(&eos_token)
        .ok_or_else(|| Error::bad_input(&tc_path, None, format!("eos_token `{eos_token}` is not in the vocabulary")))?;
    let pad_id = token_str("pad_token").and_then(|p| tok.token_to_id(&p)).unwrap_or(eos_id);
    let mut chat_template = tc.get("chat_template").and_then(|v| v.as_str()).map(str::to_string);
    let jinja = dir.join("chat_template.jinja");
    if chat_template.is_none() && jinja.exists() {
        chat_template = Some(std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?);
    }
    let spec = TokenizerSpec {
        bos_token: token_str("bos_token"),
        eos_token,
        eos_id,
        pad_id,
        add_bos: tc.get("add_bos_token").and_then(|v| v.as_bool()).unwrap_or(false),
        chat_template,
    };
    Ok((tok, spec))
}
