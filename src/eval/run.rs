//! Evaluating a trained adapter on held-out examples: validation loss and perplexity (teacher
//! forcing, exactly as during training), and greedy answers scored against the references
//! with BLEU-4 and ROUGE-1/2/L ([`super::metrics`]).
//!
//! The held-out examples are the run's validation split (same file, options and seed, so the
//! same examples the trainer held out), or every example of another file. Each example's
//! prompt is its tokens before the first trained token (the conversation up to the assistant's
//! turn, rendered by the chat template); its reference is that first trained span without the
//! end-of-turn token.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::metrics::{self, CorpusScores, Lang};
use crate::data::{self, DataOptions, Example, IGNORE_INDEX};
use crate::infer::{generate_tokens, SampleOptions};
use crate::model::LoadedModel;
use crate::peft::Adapter;
use crate::train::RunConfig;
use crate::{Error, Result};

/// What to evaluate.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EvalOptions {
    /// Evaluate every example of this file instead of the run's validation split.
    #[serde(default)]
    pub data: Option<PathBuf>,
    /// At most this many examples (in file order).
    #[serde(default)]
    pub limit: Option<usize>,
    /// Longest generated answer.
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: usize,
    /// Batch size of the loss pass.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
}

fn default_max_new_tokens() -> usize {
    128
}
fn default_batch() -> usize {
    4
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions { data: None, limit: None, max_new_tokens: default_max_new_tokens(), batch_size: default_batch() }
    }
}

/// One scored answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EvalAnswer {
    /// The prompt as text.
    pub prompt: String,
    /// The dataset's answer.
    pub reference: String,
    /// The model's answer.
    pub output: String,
}

/// The result of an evaluation.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EvalReport {
    /// The adapter evaluated (None = the base model).
    pub adapter: Option<PathBuf>,
    /// The examples' file.
    pub data: PathBuf,
    /// Number of examples.
    pub examples: usize,
    /// Mean next-token loss on the reference answers.
    pub val_loss: f64,
    /// exp(val_loss).
    pub perplexity: f64,
    /// BLEU-4 and ROUGE-1/2/L, 0–100.
    pub scores: CorpusScores,
    /// Every answer.
    pub answers: Vec<EvalAnswer>,
    /// Wall time.
    pub seconds: f64,
}

impl EvalReport {
    /// The scores as `(metric name, value)` rows for the run store.
    pub fn metric_rows(&self) -> Vec<(String, f64)> {
        vec![
            ("eval_loss".into(), self.val_loss),
            ("eval_perplexity".into(), self.perplexity),
            ("eval_bleu4".into(), self.scores.bleu4),
            ("eval_rouge1".into(), self.scores.rouge1),
            ("eval_rouge2".into(), self.scores.rouge2),
            ("eval_rougeL".into(), self.scores.rouge_l),
        ]
    }
}

/// Prompt tokens and reference tokens of an example (None when nothing is trained).
pub fn split_example(ex: &Example, eos_id: u32) -> Option<(Vec<u32>, Vec<u32>)> {
    let start = ex.labels.iter().skip(1).position(|&l| l != IGNORE_INDEX)? + 1;
    let end = ex.labels[start..].iter().position(|&l| l == IGNORE_INDEX).map(|p| start + p).unwrap_or(ex.labels.len());
    let reference: Vec<u32> = ex.input_ids[start..end].iter().copied().filter(|&t| t != eos_id).collect();
    Some((ex.input_ids[..start].to_vec(), reference))
}

/// The held-out examples of a run (its validation split, or all of `opts.data`).
pub fn heldout_examples(cfg: &RunConfig, m: &LoadedModel, opts: &EvalOptions) -> Result<(PathBuf, Vec<Example>)> {
    let template = crate::train::trainer::template_for(m)?;
    let d = &cfg.data;
    let (path, val_fraction) = match &opts.data {
        Some(p) => (p.clone(), 0.0),
        None => (d.path.clone(), d.val_fraction),
    };
    let data_opts = DataOptions {
        format: if opts.data.is_some() { data::Format::Auto } else { d.format },
        max_len: d.max_len,
        train_on_prompt: false,
        val_fraction,
        val_max: d.val_max,
        seed: cfg.seed,
        max_examples: None,
    };
    let set = data::load_dataset(&path, &data_opts, &template, &m.tokenizer)?;
    let mut examples = if opts.data.is_some() {
        let mut all = set.train;
        all.extend(set.val);
        all
    } else {
        set.val
    };
    if examples.is_empty() {
        return Err(Error::bad_input(&path, None, "the run has no validation split (data.val_fraction = 0): pass a file of held-out examples"));
    }
    if let Some(n) = opts.limit {
        examples.truncate(n.max(1));
    }
    Ok((path, examples))
}

/// Evaluates `m` (with `adapter` loaded, if any) on the run's held-out examples. `progress`
/// is called after each generated answer with (done, total).
pub fn evaluate(
    cfg: &RunConfig,
    m: &mut LoadedModel,
    adapter: Option<&Path>,
    opts: &EvalOptions,
    mut progress: impl FnMut(usize, usize),
) -> Result<EvalReport> {
    let start = std::time::Instant::now();
    crate::peft::remove_all(&mut m.model);
    if let Some(a) = adapter {
        Adapter::load(&mut m.model, a)?;
    }
    let (path, examples) = heldout_examples(cfg, m, opts)?;
    let val_loss = crate::train::trainer::validate(m, &examples, opts.batch_size, 512)?;
    let eos = m.spec.eos_id;
    let gen = SampleOptions { max_new_tokens: opts.max_new_tokens, stop_ids: vec![eos], ..Default::default() };
    let decode = |ids: &[u32]| m.tokenizer.decode(ids, true).map_err(|e| Error::Tokenizer(e.to_string()));
    let mut answers = Vec::with_capacity(examples.len());
    for (i, ex) in examples.iter().enumerate() {
        let Some((prompt, reference)) = split_example(ex, eos) else { continue };
        let g = generate_tokens(&m.model, &prompt, &gen, None, |_| true)?;
        answers.push(EvalAnswer {
            prompt: m.tokenizer.decode(&prompt, false).map_err(|e| Error::Tokenizer(e.to_string()))?,
            reference: decode(&reference)?,
            output: decode(&g.tokens)?,
        });
        progress(i + 1, examples.len());
    }
    let hyps: Vec<&str> = answers.iter().map(|a| a.output.as_str()).collect();
    let refs: Vec<&str> = answers.iter().map(|a| a.reference.as_str()).collect();
    let scores = metrics::score_corpus(&hyps, &refs, Lang::Auto);
    Ok(EvalReport {
        adapter: adapter.map(Path::to_path_buf),
        data: path,
        examples: answers.len(),
        val_loss,
        perplexity: val_loss.exp(),
        scores,
        answers,
        seconds: start.elapsed().as_secs_f64(),
    })
}
