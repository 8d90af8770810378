//! Generation: KV-cached decoding with greedy or temperature/top-p sampling.

use candle_core::{DType, Tensor, D};
use rand::{Rng, SeedableRng};

use crate::model::llama::KvCache;
use crate::model::{ForwardCtx, Llama};
use crate::Result;

/// Sampling settings.
#[derive(Clone, Debug)]
pub struct SampleOptions {
    /// Longest answer, in tokens.
    pub max_new_tokens: usize,
    /// 0 = greedy.
    pub temperature: f64,
    /// Nucleus sampling mass (1.0 = off).
    pub top_p: f64,
    /// Seed for sampling.
    pub seed: u64,
    /// Token ids that end the answer.
    pub stop_ids: Vec<u32>,
    /// The stop tokens are suppressed until this many tokens were generated (as HF's
    /// `min_new_tokens`).
    pub min_new_tokens: usize,
}

impl Default for SampleOptions {
    fn default() -> Self {
        SampleOptions { max_new_tokens: 64, temperature: 0.0, top_p: 1.0, seed: 0, stop_ids: vec![], min_new_tokens: 0 }
    }
}

fn pick(logits: &[f32], opts: &SampleOptions, rng: &mut rand::rngs::StdRng) -> u32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .fold((0usize, f32::NEG_INFINITY), |(bi, bv), (i, &v)| if v > bv { (i, v) } else { (bi, bv) })
            .0 as u32
    };
    if opts.temperature <= 0.0 {
        return argmax();
    }
    let t = opts.temperature as f32;
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(usize, f32)> = logits.iter().enumerate().map(|(i, &l)| (i, ((l - max) / t).exp())).collect();
    let total: f32 = probs.iter().map(|p| p.1).sum();
    probs.iter_mut().for_each(|p| p.1 /= total);
    probs.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut keep = probs.len();
    let mut acc = 0.0;
    for (i, p) in probs.iter().enumerate() {
        acc += p.1;
        if acc >= opts.top_p as f32 {
            keep = i + 1;
            break;
        }
    }
    let kept = &probs[..keep];
    let mass: f32 = kept.iter().map(|p| p.1).sum();
    let mut r = rng.random::<f32>() * mass;
    for p in kept {
        r -= p.1;
        if r <= 0.0 {
            return p.0 as u32;
        }
    }
    kept.last().map(|p| p.0 as u32).unwrap_or_else(argmax)
}

/// Generates a continuation of `prompt` (token ids); returns the new tokens (without the stop
/// token). `on_token` sees each new token as it is produced.
pub fn generate(model: &Llama, prompt: &[u32], opts: &SampleOptions, mut on_token: impl FnMut(u32)) -> Result<Vec<u32>> {
    let dev = model.device();
    let ctx = ForwardCtx::default();
    let mut cache = KvCache::default();
    let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);
    let mut out = Vec::new();
    let mut next_input: Vec<u32> = prompt.to_vec();
    let max_ctx = model.config().max_position_embeddings;
    for _ in 0..opts.max_new_tokens {
        if cache.len() + next_input.len() > max_ctx {
            break;
        }
        let ids = Tensor::from_slice(&next_input, (1, next_input.len()), dev)?;
        let h = model.hidden_cached(&ids, &ctx, Some(&mut cache))?;
        let last = h.narrow(1, next_input.len() - 1, 1)?;
        let logits = model.lm_head.forward(&last, &ctx)?.flatten_all()?.to_dtype(DType::F32)?;
        let mut logits: Vec<f32> = logits.to_vec1()?;
        if out.len() < opts.min_new_tokens {
            for &s in &opts.stop_ids {
                if let Some(l) = logits.get_mut(s as usize) {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        let tok = pick(&logits, opts, &mut rng);
        if opts.stop_ids.contains(&tok) {
            break;
        }
        on_token(tok);
        out.push(tok);
        next_input = vec![tok];
    }
    Ok(out)
}

/// Full-sequence logits for `ids` (1-D), shape (seq, vocab), with no cache (the reference the
/// cached path is tested against, and what `tunebench logits` writes).
pub fn sequence_logits(model: &Llama, ids: &[u32]) -> Result<Tensor> {
    let t = Tensor::from_slice(ids, (1, ids.len()), model.device())?;
    Ok(model.logits(&t, &ForwardCtx::default())?.squeeze(0)?.to_dtype(DType::F32)?.contiguous()?)
}

/// Index of the largest value in a 1-D tensor.
pub fn argmax(t: &Tensor) -> Result<u32> {
    Ok(t.argmax(D::Minus1)?.to_scalar::<u32>()?)
}
