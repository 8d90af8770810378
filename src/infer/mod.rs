//! Generation: KV-cached decoding, sampling, streaming text with stop strings, cancellation.
//!
//! [`generate_tokens`] is the decoding loop (prefill the prompt once, then one token per step
//! against the KV cache); [`generate_text`] adds the tokenizer: text streamed as it becomes
//! final (never half a UTF-8 character, never the start of a stop string that may still
//! complete), cut at the first stop string. Models from GGUF files keep their quantized
//! weights ([`crate::model::load_quantized`]); adapters apply on top (see [`chat`]).

pub mod chat;
pub mod sampling;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{DType, Tensor, D};
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::model::llama::KvCache;
use crate::model::{ForwardCtx, Llama};
use crate::{Error, Result};
pub use sampling::SampleOptions;

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// A stop token or stop string.
    Stop,
    /// `max_new_tokens` reached.
    Length,
    /// The model's context is full.
    Context,
    /// Cancelled by the caller.
    Cancelled,
}

/// The tokens of one answer and how long they took.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Generation {
    /// New tokens (without the stop token).
    pub tokens: Vec<u32>,
    /// Why it ended.
    pub finish: FinishReason,
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// Seconds from the call to the first new token (prompt processing + one step).
    pub ttft_s: f64,
    /// Seconds for the whole call.
    pub total_s: f64,
}

impl Generation {
    /// Tokens per second after the first one (decode speed), 0 when fewer than 2 tokens.
    pub fn decode_tok_s(&self) -> f64 {
        let n = self.tokens.len().saturating_sub(1);
        let t = self.total_s - self.ttft_s;
        if n == 0 || t <= 0.0 {
            0.0
        } else {
            n as f64 / t
        }
    }
}

/// Checks a prompt against the model's context before any work: empty prompts and prompts
/// that leave no room for an answer are errors that say so.
pub fn check_prompt(model: &Llama, prompt: &[u32]) -> Result<()> {
    let virt = model.num_virtual_tokens();
    let ctx = model.config().max_position_embeddings.saturating_sub(virt);
    if prompt.is_empty() {
        return Err(Error::Msg("the prompt is empty".into()));
    }
    if prompt.len() >= ctx {
        let note = if virt > 0 { format!(" (after the adapter's {virt} virtual tokens)") } else { String::new() };
        return Err(Error::Msg(format!(
            "the prompt has {} tokens; the model's context is {ctx} tokens{note}, leaving no room for an answer (shorten the prompt or the conversation)",
            prompt.len()
        )));
    }
    if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= model.config().vocab_size) {
        return Err(Error::Msg(format!("token id {bad} is outside the vocabulary ({} tokens)", model.config().vocab_size)));
    }
    Ok(())
}

/// The thread pool decoding steps run in. A step runs *on* one of its threads, so the
/// quantized matmuls' parallel loops (`model::qmatmul`) are joined by a worker that takes part
/// in the work, instead of a caller that sleeps and is woken for each of the ~200 matmuls of a
/// token (measured: ~20% of decode time went to those wake-ups on 2 cores).
fn decode_pool() -> &'static rayon::ThreadPool {
    static POOL: std::sync::OnceLock<rayon::ThreadPool> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        let n = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .thread_name(|i| format!("tunebench-decode-{i}"))
            .build()
            .unwrap_or_else(|_| rayon::ThreadPoolBuilder::new().num_threads(1).build().expect("a one-thread pool"))
    })
}

/// Last-position logits of `ids` appended to `cache`, as f32 values.
fn step(model: &Llama, ids: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
    decode_pool().install(|| step_here(model, ids, cache))
}

fn step_here(model: &Llama, ids: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
    let ctx = ForwardCtx::for_generation();
    let t = Tensor::from_slice(ids, (1, ids.len()), model.device())?;
    let h = model.hidden_cached(&t, &ctx, Some(cache))?;
    let last = h.narrow(1, ids.len() - 1, 1)?;
    let logits = model.lm_head.forward(&last, &ctx)?.flatten_all()?.to_dtype(DType::F32)?;
    Ok(logits.to_vec1()?)
}

/// Decodes after `prompt` with a KV cache. `on_token` sees each new token and returns false
/// to stop (finish = `Stop`); `cancel` (checked before every step) ends with `Cancelled`.
pub fn generate_tokens(
    model: &Llama,
    prompt: &[u32],
    opts: &SampleOptions,
    cancel: Option<&AtomicBool>,
    mut on_token: impl FnMut(u32) -> bool,
) -> Result<Generation> {
    opts.validate()?;
    check_prompt(model, prompt)?;
    let start = Instant::now();
    let max_ctx = model.config().max_position_embeddings;
    let mut cache = KvCache::default();
    let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);
    let mut context: Vec<u32> = prompt.to_vec();
    let mut out = Vec::new();
    let mut ttft = None;
    let mut next: Vec<u32> = prompt.to_vec();
    let finish = loop {
        if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
            break FinishReason::Cancelled;
        }
        if out.len() >= opts.max_new_tokens {
            break FinishReason::Length;
        }
        // The first pass also places the adapter's virtual tokens, if any.
        let virt = if cache.is_empty() { model.num_virtual_tokens() } else { 0 };
        if cache.len() + virt + next.len() > max_ctx {
            break FinishReason::Context;
        }
        let mut logits = step(model, &next, &mut cache)?;
        sampling::apply_repetition_penalty(&mut logits, &context, opts.repetition_penalty);
        if out.len() < opts.min_new_tokens {
            for &s in &opts.stop_ids {
                if let Some(l) = logits.get_mut(s as usize) {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        let tok = sampling::pick(&logits, opts, &mut rng);
        ttft.get_or_insert_with(|| start.elapsed().as_secs_f64());
        if opts.stop_ids.contains(&tok) {
            break FinishReason::Stop;
        }
        out.push(tok);
        context.push(tok);
        if !on_token(tok) {
            break FinishReason::Stop;
        }
        next = vec![tok];
    };
    let total_s = start.elapsed().as_secs_f64();
    Ok(Generation { tokens: out, finish, prompt_tokens: prompt.len(), ttft_s: ttft.unwrap_or(total_s), total_s })
}

/// Generates a continuation of `prompt` (token ids); returns the new tokens (without the stop
/// token). `on_token` sees each new token as it is produced.
pub fn generate(model: &Llama, prompt: &[u32], opts: &SampleOptions, mut on_token: impl FnMut(u32)) -> Result<Vec<u32>> {
    Ok(generate_tokens(model, prompt, opts, None, |t| {
        on_token(t);
        true
    })?
    .tokens)
}

/// An answer as text.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TextGeneration {
    /// The answer (cut before a stop string).
    pub text: String,
    /// Tokens and timings.
    #[serde(flatten)]
    pub generation: Generation,
}

/// Length of the longest suffix of `text` that is a proper prefix of some stop string (that
/// text must be held back: the stop string may still complete).
fn pending_stop_prefix(text: &str, stops: &[String]) -> usize {
    let mut keep = 0;
    for s in stops {
        for (i, _) in s.char_indices().skip(1) {
            if i > keep && text.ends_with(&s[..i]) {
                keep = i;
            }
        }
    }
    keep
}

/// Like [`generate_tokens`], streaming text: `on_text` receives each piece once it is final.
/// Stops at the first of `opts.stop_strings` (cut from the answer).
pub fn generate_text(
    model: &Llama,
    tokenizer: &tokenizers::Tokenizer,
    prompt: &[u32],
    opts: &SampleOptions,
    cancel: Option<&AtomicBool>,
    mut on_text: impl FnMut(&str),
) -> Result<TextGeneration> {
    let mut ids: Vec<u32> = Vec::new();
    let mut text = String::new();
    let mut sent = 0usize;
    let mut stopped_at: Option<usize> = None;
    let mut err: Option<Error> = None;
    let mut generation = generate_tokens(model, prompt, opts, cancel, |tok| {
        ids.push(tok);
        match tokenizer.decode(&ids, true) {
            Ok(t) => text = t,
            Err(e) => {
                err = Some(Error::Tokenizer(e.to_string()));
                return false;
            }
        }
        if let Some(pos) = opts.stop_strings.iter().filter_map(|s| text.find(s.as_str())).min() {
            stopped_at = Some(pos);
            if pos > sent {
                on_text(&text[sent..pos]);
            }
            sent = pos;
            return false;
        }
        // A trailing U+FFFD is half a character still being spelled out byte by byte.
        let mut safe = text.trim_end_matches('\u{FFFD}').len();
        safe -= pending_stop_prefix(&text[..safe], &opts.stop_strings);
        if safe > sent && text.is_char_boundary(safe) {
            on_text(&text[sent..safe]);
            sent = safe;
        }
        true
    })?;
    if let Some(e) = err {
        return Err(e);
    }
    match stopped_at {
        Some(pos) => {
            text.truncate(pos);
            generation.finish = FinishReason::Stop;
        }
        None if text.len() > sent => on_text(&text[sent..]),
        None => {}
    }
    Ok(TextGeneration { text, generation })
}

/// Full-sequence logits for `ids` (1-D), shape (seq, vocab), computed in one pass from an
/// empty cache (the recomputation the cached path is tested against, and what `tunebench
/// logits` writes).
pub fn sequence_logits(model: &Llama, ids: &[u32]) -> Result<Tensor> {
    let t = Tensor::from_slice(ids, (1, ids.len()), model.device())?;
    let ctx = ForwardCtx::for_generation();
    // Through a fresh inference cache: the same kernels as generation, all rows at once.
    let h = model.hidden_cached(&t, &ctx, Some(&mut KvCache::default()))?;
    Ok(model.lm_head.forward(&h, &ctx)?.squeeze(0)?.to_dtype(DType::F32)?.contiguous()?)
}

/// The same logits as [`sequence_logits`], computed the way generation does: the first token,
/// then every next one alone through the growing KV cache (the decode path's check on a new
/// device).
pub fn decoded_logits(model: &Llama, ids: &[u32]) -> Result<Tensor> {
    let mut cache = KvCache::default();
    let mut rows = Vec::with_capacity(ids.len());
    for &id in ids {
        rows.extend(step(model, &[id], &mut cache)?);
    }
    Ok(Tensor::from_vec(rows, (ids.len(), model.config().vocab_size), &candle_core::Device::Cpu)?)
}

/// Index of the largest value in a 1-D tensor.
pub fn argmax(t: &Tensor) -> Result<u32> {
    Ok(t.argmax(D::Minus1)?.to_scalar::<u32>()?)
}

#[cfg(test)]
mod tests {
    use super::pending_stop_prefix;

    #[test]
    fn held_back_text_is_the_longest_started_stop_string() {
        let stops = vec!["<|im_end|>".to_string(), "\nUser:".to_string()];
        assert_eq!(pending_stop_prefix("Hello <|im", &stops), 4);
        assert_eq!(pending_stop_prefix("Hello\nUs", &stops), 3);
        assert_eq!(pending_stop_prefix("Hello", &stops), 0);
        assert_eq!(pending_stop_prefix("a <", &stops), 1);
    }
}
