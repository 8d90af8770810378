//! Training events and the observer trait that receives them (in the style of ripgrep's
//! `Sink`): the CLI progress bar, the JSON-lines stream and (later) the SQLite logger each
//! implement [`TrainObserver`].

use serde::{Deserialize, Serialize};

/// Everything a training run reports, in order.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ts_rs::TS)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum TrainEvent {
    /// Training is about to start (or resume).
    Started {
        /// Optimizer steps in the whole run.
        total_steps: usize,
        /// First step to run (0 unless resuming).
        start_step: usize,
        /// Training examples.
        train_examples: usize,
        /// Validation examples.
        val_examples: usize,
        /// Trainable parameters.
        trainable_params: usize,
        /// All parameters of the base model.
        total_params: usize,
    },
    /// One optimizer step finished.
    Step {
        /// 1-based step number.
        step: usize,
        /// Mean training loss of the step.
        loss: f64,
        /// Learning rate used.
        lr: f64,
        /// Gradient norm before clipping.
        grad_norm: f64,
        /// Tokens trained on so far (targets and context).
        tokens_seen: u64,
        /// Throughput of this step (all tokens through the model per second).
        tokens_per_s: f64,
        /// Seconds since the run started (including earlier sessions when resumed).
        elapsed_s: f64,
    },
    /// Validation finished.
    Eval {
        /// After this step.
        step: usize,
        /// Mean validation loss per target token.
        val_loss: f64,
        /// exp(val_loss).
        perplexity: f64,
    },
    /// Held-out generation check.
    Heldout {
        /// "before" or "after".
        phase: String,
        /// Prompts answered correctly.
        correct: usize,
        /// Prompts asked.
        total: usize,
    },
    /// A checkpoint was written.
    Checkpoint {
        /// At this step.
        step: usize,
        /// Its folder.
        path: String,
    },
    /// An old checkpoint was pruned from disk (`train.keep_checkpoints`).
    CheckpointRemoved {
        /// Its step.
        step: usize,
    },
    /// A sample answer generated at a validation step (the first `eval.samples` held-out
    /// prompts, greedy).
    Sample {
        /// After this step.
        step: usize,
        /// The prompt.
        prompt: String,
        /// The answer.
        output: String,
    },
    /// The run ended normally or by request.
    Finished {
        /// Steps completed.
        step: usize,
        /// True when stopped early by request (resumable).
        stopped: bool,
        /// Where the final adapter is.
        adapter: String,
    },
    /// A free-form message for the log.
    Message {
        /// The text.
        text: String,
    },
}

/// Receives every training event.
pub trait TrainObserver {
    /// Called for each event, in order.
    fn on_event(&mut self, event: &TrainEvent);
}

/// Ignores everything.
pub struct NoObserver;

impl TrainObserver for NoObserver {
    fn on_event(&mut self, _: &TrainEvent) {}
}

/// Collects events (tests, and the CLI summary).
#[derive(Default)]
pub struct Collect(pub Vec<TrainEvent>);

impl TrainObserver for Collect {
    fn on_event(&mut self, event: &TrainEvent) {
        self.0.push(event.clone());
    }
}

/// Writes each event as one JSON line to stdout (the worker protocol).
pub struct JsonLines;

impl TrainObserver for JsonLines {
    fn on_event(&mut self, event: &TrainEvent) {
        if let Ok(s) = serde_json::to_string(event) {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{s}");
            let _ = out.flush();
        }
    }
}
