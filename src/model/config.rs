//! Llama-family model configuration, read from a HF `config.json` or GGUF metadata.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The architecture hyper-parameters of a Llama-family decoder (Llama, SmolLM, Mistral,
/// Qwen2). Field names follow HF's `config.json`, so the struct reads and writes it as is.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// Width of the SwiGLU feed-forward block.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key/value heads (grouped-query attention); defaults to the query heads.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Per-head width; defaults to hidden_size / num_attention_heads.
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// RMSNorm epsilon.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base frequency.
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// Longest context the model was trained for.
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    /// Whether the LM head shares the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Whether q/k/v projections carry a bias (Qwen2 does).
    #[serde(default)]
    pub attention_bias: bool,
    /// Beginning-of-sequence token id.
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token id.
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
    /// HF `model_type` (llama, mistral, qwen2, ...).
    #[serde(default = "default_model_type")]
    pub model_type: String,
}

fn default_eps() -> f64 {
    1e-5
}
fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_max_pos() -> usize {
    2048
}
fn default_model_type() -> String {
    "llama".into()
}

impl LlamaConfig {
    /// Number of key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Per-head width.
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// Reads a HF `config.json`.
    pub fn from_hf_json(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let mut cfg: LlamaConfig = serde_json::from_str(&text)
            .map_err(|e| Error::bad_input(path, Some(e.line()), e.to_string()))?;
        // Qwen2 always has q/k/v biases but its config.json does not say so.
        if cfg.model_type == "qwen2" {
            cfg.attention_bias = true;
        }
        cfg.validate().map_err(|reason| Error::bad_input(path, None, reason))?;
        Ok(cfg)
    }

    /// Checks the shapes are consistent; returns the reason when they are not.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let LlamaConfig { hidden_size: h, num_attention_heads: nh, .. } = *self;
        if h == 0 || nh == 0 || self.num_hidden_layers == 0 || self.vocab_size == 0 {
            return Err("hidden_size, num_attention_heads, num_hidden_layers and vocab_size must be > 0".into());
        }
        if self.head_dim.is_none() && h % nh != 0 {
            return Err(format!("hidden_size {h} is not divisible by num_attention_heads {nh}"));
        }
        if nh % self.kv_heads() != 0 {
            return Err(format!("num_attention_heads {nh} is not a multiple of num_key_value_heads {}", self.kv_heads()));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(format!("head_dim {} must be even for RoPE", self.head_dim()));
        }
        Ok(())
    }

    /// A tiny random-init-sized config for tests.
    pub fn tiny(vocab_size: usize) -> Self {
        LlamaConfig {
            vocab_size,
            hidden_size: 16,
            intermediate_size: 24,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: Some(2),
            head_dim: None,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            max_position_embeddings: 128,
            tie_word_embeddings: true,
            attention_bias: false,
            bos_token_id: None,
            eos_token_id: None,
            model_type: "llama".into(),
        }
    }
}
