//! Held-out generation check: ask each prompt, greedy-decode an answer, and count answers
//! that contain any expected string (case-insensitive). The bundled persona sample uses it
//! to measure whether tuning taught the model what it could not do before.

use std::io::BufRead;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::data::{ChatTemplate, Message};
use crate::infer::{generate, SampleOptions};
use crate::model::LoadedModel;
use crate::{Error, Result};

/// One held-out prompt.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HeldoutPrompt {
    /// The user message.
    pub prompt: String,
    /// Language tag (informational).
    #[serde(default)]
    pub lang: Option<String>,
    /// An answer is correct when it contains any of these (case-insensitive).
    pub expect: Vec<String>,
}

/// One scored answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HeldoutAnswer {
    /// The prompt.
    pub prompt: String,
    /// What the model said.
    pub answer: String,
    /// Whether it counts as correct.
    pub correct: bool,
}

/// The score over a prompt file.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HeldoutReport {
    /// Correct answers.
    pub correct: usize,
    /// Prompts.
    pub total: usize,
    /// Every answer.
    pub answers: Vec<HeldoutAnswer>,
}

impl HeldoutReport {
    /// Share correct, 0..1.
    pub fn accuracy(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.correct as f64 / self.total as f64
        }
    }
}

/// Reads a held-out prompt file (JSONL); errors name the line.
pub fn read_prompts(path: &Path) -> Result<Vec<HeldoutPrompt>> {
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.map_err(|e| Error::bad_input(path, Some(i + 1), format!("cannot read line: {e}")))?;
        if line.trim().is_empty() {
            continue;
        }
        let p: HeldoutPrompt = serde_json::from_str(&line).map_err(|e| Error::bad_input(path, Some(i + 1), e.to_string()))?;
        if p.expect.is_empty() {
            return Err(Error::bad_input(path, Some(i + 1), "`expect` is empty"));
        }
        out.push(p);
    }
    if out.is_empty() {
        return Err(Error::bad_input(path, None, "no prompts"));
    }
    Ok(out)
}

/// Whether `answer` contains any of `expect`, ignoring case.
pub fn is_correct(answer: &str, expect: &[String]) -> bool {
    let a = answer.to_lowercase();
    expect.iter().any(|e| a.contains(&e.to_lowercase()))
}

/// Asks every prompt (greedy, `max_new_tokens`) and scores the answers. `progress` is called
/// after each prompt with (done, total).
pub fn score(
    m: &LoadedModel,
    template: &ChatTemplate,
    prompts: &[HeldoutPrompt],
    max_new_tokens: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<HeldoutReport> {
    let opts = SampleOptions { max_new_tokens, stop_ids: vec![m.spec.eos_id], ..Default::default() };
    let mut answers = Vec::with_capacity(prompts.len());
    for (i, p) in prompts.iter().enumerate() {
        let text = template.render(&[Message { role: "user".into(), content: p.prompt.clone() }], true)?;
        let enc = m.tokenizer.encode(text, false).map_err(|e| Error::Tokenizer(e.to_string()))?;
        let out = generate(&m.model, enc.get_ids(), &opts, |_| {})?;
        let answer = m.tokenizer.decode(&out, true).map_err(|e| Error::Tokenizer(e.to_string()))?;
        let correct = is_correct(&answer, &p.expect);
        answers.push(HeldoutAnswer { prompt: p.prompt.clone(), answer, correct });
        progress(i + 1, prompts.len());
    }
    let correct = answers.iter().filter(|a| a.correct).count();
    Ok(HeldoutReport { correct, total: answers.len(), answers })
}
