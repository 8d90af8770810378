//! Evaluation of generated answers: text-generation metrics (BLEU-4, ROUGE-1/2/L) that score
//! a model's answers against reference answers, matching the reference Python implementations
//! (sacrebleu, Google's rouge-score) number for number.
//! [`run`] evaluates a trained adapter on held-out examples (loss, perplexity, those scores).

pub mod metrics;
pub mod run;
