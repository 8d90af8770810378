//! Choosing the next token from logits: repetition penalty, temperature, top-k, top-p and
//! min-p, applied in that order (HF transformers' logits-processor order), then a seeded draw;
//! temperature 0 is greedy.

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Sampling settings (what a chat session stores and the UI edits).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ts_rs::TS)]
#[serde(default, deny_unknown_fields)]
pub struct SampleOptions {
    /// Longest answer, in tokens.
    pub max_new_tokens: usize,
    /// Softmax temperature; 0 = greedy (argmax).
    pub temperature: f64,
    /// Nucleus sampling: keep the most likely tokens whose mass reaches `top_p` (1 = off).
    pub top_p: f64,
    /// Keep only the `top_k` most likely tokens (0 = off).
    pub top_k: usize,
    /// Drop tokens whose probability is below `min_p` × the top token's (0 = off).
    pub min_p: f64,
    /// Divide positive (multiply negative) logits of tokens already in the context by this
    /// (CTRL's penalty, as HF's `repetition_penalty`; 1 = off).
    pub repetition_penalty: f64,
    /// Seed of the draw: the same seed, settings and prompt give the same answer.
    pub seed: u64,
    /// Token ids that end the answer (the model's end-of-turn token is added by callers).
    pub stop_ids: Vec<u32>,
    /// Strings that end the answer; the answer is cut before the first one.
    pub stop_strings: Vec<String>,
    /// Stop tokens are suppressed until this many tokens were generated (HF's
    /// `min_new_tokens`).
    pub min_new_tokens: usize,
}

impl Default for SampleOptions {
    fn default() -> Self {
        SampleOptions {
            max_new_tokens: 256,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            seed: 0,
            stop_ids: vec![],
            stop_strings: vec![],
            min_new_tokens: 0,
        }
    }
}

impl SampleOptions {
    /// Greedy decoding of at most `max_new_tokens`.
    pub fn greedy(max_new_tokens: usize) -> Self {
        SampleOptions { max_new_tokens, ..Default::default() }
    }

    /// Checks the values; errors name the setting.
    pub fn validate(&self) -> Result<()> {
        let bad = |k: &str, why: &str| Err(Error::config(format!("sampling.{k}"), why));
        if self.max_new_tokens == 0 {
            return bad("max_new_tokens", "must be at least 1");
        }
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad("temperature", "must be 0 (greedy) or positive");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", "must be in (0, 1]");
        }
        if !(0.0..1.0).contains(&self.min_p) {
            return bad("min_p", "must be in [0, 1)");
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad("repetition_penalty", "must be positive (1 = off)");
        }
        if self.stop_strings.iter().any(|s| s.is_empty()) {
            return bad("stop_strings", "a stop string is empty");
        }
        Ok(())
    }
}

/// Applies the repetition penalty for every distinct token of `context` in place.
pub fn apply_repetition_penalty(logits: &mut [f32], context: &[u32], penalty: f64) {
    if penalty == 1.0 {
        return;
    }
    let p = penalty as f32;
    let mut seen = std::collections::HashSet::with_capacity(context.len());
    for &t in context {
        if seen.insert(t) {
            if let Some(l) = logits.get_mut(t as usize) {
                *l = if *l > 0.0 { *l / p } else { *l * p };
            }
        }
    }
}

fn argmax(logits: &[f32]) -> u32 {
    let mut best = (0usize, f32::NEG_INFINITY);
    for (i, &v) in logits.iter().enumerate() {
        if v > best.1 {
            best = (i, v);
        }
    }
    best.0 as u32
}

/// Picks the next token from `logits` (already penalised). Greedy when the temperature is 0;
/// otherwise temperature → top-k → top-p → min-p → draw from what is left.
pub fn pick(logits: &[f32], opts: &SampleOptions, rng: &mut impl Rng) -> u32 {
    if opts.temperature <= 0.0 {
        return argmax(logits);
    }
    let t = opts.temperature as f32;
    let mut cand: Vec<(u32, f32)> = logits.iter().enumerate().filter(|(_, l)| l.is_finite()).map(|(i, &l)| (i as u32, l / t)).collect();
    if cand.is_empty() {
        return argmax(logits);
    }
    if opts.top_k > 0 && opts.top_k < cand.len() {
        cand.select_nth_unstable_by(opts.top_k - 1, |a, b| b.1.total_cmp(&a.1));
        cand.truncate(opts.top_k);
    }
    cand.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let max = cand[0].1;
    let mut probs: Vec<f32> = cand.iter().map(|c| (c.1 - max).exp()).collect();
    let total: f32 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    let mut keep = probs.len();
    if opts.top_p < 1.0 {
        let mut acc = 0.0f32;
        for (i, p) in probs.iter().enumerate() {
            acc += p;
            if acc >= opts.top_p as f32 {
                keep = i + 1;
                break;
            }
        }
    }
    if opts.min_p > 0.0 {
        let floor = probs[0] * opts.min_p as f32;
        keep = keep.min(probs.iter().take_while(|&&p| p >= floor).count().max(1));
    }
    let kept = &probs[..keep];
    let mass: f32 = kept.iter().sum();
    let mut r = rng.random::<f32>() * mass;
    for (i, p) in kept.iter().enumerate() {
        r -= p;
        if r <= 0.0 {
            return cand[i].0;
        }
    }
    cand[keep - 1].0
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn draws(logits: &[f32], opts: &SampleOptions, n: usize) -> Vec<usize> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);
        let mut counts = vec![0; logits.len()];
        for _ in 0..n {
            counts[pick(logits, opts, &mut rng) as usize] += 1;
        }
        counts
    }

    #[test]
    fn greedy_is_argmax() {
        let opts = SampleOptions::greedy(1);
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        assert_eq!(pick(&[0.1, 3.0, -1.0, 2.9], &opts, &mut rng), 1);
    }

    #[test]
    fn top_k_and_top_p_and_min_p_restrict_the_support() {
        // probabilities ∝ exp(logits): 0.64, 0.24, 0.09, 0.03
        let logits = [2.0f32, 1.0, 0.0, -1.1];
        let base = SampleOptions { temperature: 1.0, seed: 7, ..Default::default() };
        let all = draws(&logits, &base, 4000);
        assert!(all.iter().all(|&c| c > 0), "every token drawn without restriction: {all:?}");
        let k2 = draws(&logits, &SampleOptions { top_k: 2, ..base.clone() }, 4000);
        assert_eq!((k2[2], k2[3]), (0, 0), "{k2:?}");
        let p = draws(&logits, &SampleOptions { top_p: 0.8, ..base.clone() }, 4000);
        assert_eq!((p[2], p[3]), (0, 0), "top_p 0.8 keeps the two tokens reaching 0.88: {p:?}");
        let m = draws(&logits, &SampleOptions { min_p: 0.2, ..base.clone() }, 4000);
        assert_eq!((m[2], m[3]), (0, 0), "min_p 0.2 drops p < 0.128: {m:?}");
        // The kept tokens keep their relative odds (0.64 : 0.24 ≈ 2.7).
        let ratio = k2[0] as f64 / k2[1] as f64;
        assert!((2.2..3.3).contains(&ratio), "{ratio}");
    }

    #[test]
    fn same_seed_same_draws_and_temperature_sharpens() {
        let logits = [1.0f32, 0.5, 0.2, 0.0];
        let o = SampleOptions { temperature: 1.0, seed: 3, ..Default::default() };
        assert_eq!(draws(&logits, &o, 200), draws(&logits, &o, 200));
        let cold = draws(&logits, &SampleOptions { temperature: 0.1, ..o.clone() }, 2000);
        assert!(cold[0] > 1950, "{cold:?}");
    }

    #[test]
    fn repetition_penalty_follows_hf() {
        let mut l = vec![2.0f32, -2.0, 1.0];
        apply_repetition_penalty(&mut l, &[0, 1, 1], 2.0);
        assert_eq!(l, vec![1.0, -4.0, 1.0]);
    }

    #[test]
    fn bad_settings_are_named() {
        let e = SampleOptions { top_p: 0.0, ..Default::default() }.validate().unwrap_err().to_string();
        assert!(e.contains("top_p"), "{e}");
        let e = SampleOptions { stop_strings: vec![String::new()], ..Default::default() }.validate().unwrap_err().to_string();
        assert!(e.contains("stop_strings"), "{e}");
    }
}
