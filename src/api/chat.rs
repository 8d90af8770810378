//! Chat through the workbench: sessions stored in SQLite, answers streamed as
//! [`ApiEvent::ChatText`] events, base vs tuned (or adapter A vs B) side by side.
//!
//! Answers come from the chat worker process (`chat_worker`), which keeps the last model used
//! loaded with its adapters; asking a session with the same model reuses it, switching
//! adapters in place. `cancel` ends the current answer (what was generated so far is kept,
//! marked `cancelled`); a worker that crashes fails the message with its exit status and
//! stderr, records nothing, and the next message starts a new one.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::chat_worker::{ChatEvent, ChatWorker};
use super::{ApiEvent, Workbench};
use crate::infer::SampleOptions;
use crate::store::{ChatAdapter, ChatRecord, NewAnswer, NewChat};
use crate::{Error, Result};

/// Request: a new chat session.
#[derive(Clone, Debug, Serialize, Deserialize, ts_rs::TS)]
pub struct CreateChat {
    /// Title (default: the model's name and the variants).
    #[serde(default)]
    pub title: Option<String>,
    /// Model; default: the installed default model.
    #[serde(default)]
    pub model_path: Option<PathBuf>,
    /// Adapters to load.
    #[serde(default)]
    pub adapters: Vec<ChatAdapter>,
    /// Who answers: None = base, Some(name) = adapter. Default: the first adapter, or the base.
    #[serde(default)]
    pub variants: Option<Vec<Option<String>>>,
    /// Sampling settings.
    #[serde(default)]
    pub sampling: SampleOptions,
    /// System prompt.
    #[serde(default)]
    pub system: Option<String>,
    /// Where the model answers: `auto` (the default: the first CUDA GPU when this build has
    /// CUDA support and a GPU answers, else the CPU), `cpu`, `cuda` or `cuda:N`.
    #[serde(default)]
    pub device: Option<String>,
}

/// One answer of a turn (what [`Workbench::chat_send`] returns per variant).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ts_rs::TS)]
pub struct ChatAnswer {
    /// The variant (None = base).
    pub variant: Option<String>,
    /// The text.
    pub text: String,
    /// `stop`, `length`, `context` or `cancelled`.
    pub finish: String,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Answer tokens.
    pub new_tokens: usize,
    /// Seconds to the first token.
    pub ttft_s: f64,
    /// Decode tokens/s.
    pub decode_tok_s: f64,
    /// Where it was computed (`cpu`, `cuda:0`): the chat's device with `auto` resolved.
    pub device: String,
}

/// A chat's device as written (`auto` when none is given), checked: a CUDA device in a build
/// without CUDA support is refused here, when the chat is made, not at its first answer.
fn chat_device(spec: Option<&str>) -> Result<String> {
    use crate::device::DeviceChoice;
    let spec = spec.map(str::trim).filter(|s| !s.is_empty()).unwrap_or("auto");
    let choice = DeviceChoice::parse(spec, "device")?;
    if let DeviceChoice::Cuda(_) = choice {
        if !crate::device::CUDA_BUILD {
            choice.open("device")?; // fails, saying how to get a CUDA build
        }
    }
    Ok(choice.to_string())
}

impl Workbench {
    /// Creates a chat session after checking that the model and adapter folders exist.
    pub async fn create_chat(&self, req: CreateChat) -> Result<ChatRecord> {
        let model_path = req.model_path.clone().unwrap_or_else(crate::paths::default_model);
        if !model_path.exists() {
            return Err(Error::bad_input(&model_path, None, "the model does not exist (run scripts/setup for the default model)"));
        }
        let model_path = std::fs::canonicalize(&model_path).unwrap_or(model_path);
        let mut adapters = Vec::new();
        for a in &req.adapters {
            let p = Path::new(&a.path);
            if !p.join("adapter_config.json").is_file() {
                return Err(Error::bad_input(p, None, "not an adapter folder (no adapter_config.json)"));
            }
            let p = std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
            adapters.push(ChatAdapter { name: a.name.clone(), path: p.display().to_string() });
        }
        let variants = req.variants.clone().unwrap_or_else(|| vec![adapters.first().map(|a| a.name.clone())]);
        req.sampling.validate()?;
        let device = chat_device(req.device.as_deref())?;
        let title = req.title.clone().unwrap_or_else(|| {
            let model = model_path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            let v: Vec<&str> = variants.iter().map(|v| v.as_deref().unwrap_or("base")).collect();
            format!("{model} · {}", v.join(" vs "))
        });
        let id = self
            .store
            .create_chat(&NewChat {
                title,
                model_path: model_path.display().to_string(),
                adapters,
                variants,
                sampling: serde_json::to_value(&req.sampling).map_err(|e| Error::Msg(e.to_string()))?,
                system: req.system,
                device,
            })
            .await?;
        self.store.chat(id).await
    }

    /// Every chat session (without messages), most recent first.
    pub async fn chats(&self) -> Result<Vec<ChatRecord>> {
        self.store.chats().await
    }

    /// A chat session with its messages.
    pub async fn chat(&self, id: i64) -> Result<ChatRecord> {
        self.store.chat(id).await
    }

    /// Deletes a chat session.
    pub async fn delete_chat(&self, id: i64) -> Result<()> {
        self.store.delete_chat(id).await
    }

    /// Changes the sampling settings of a chat (checked first).
    pub async fn set_chat_sampling(&self, id: i64, sampling: &SampleOptions) -> Result<()> {
        sampling.validate()?;
        self.store.set_chat_sampling(id, &serde_json::to_value(sampling).map_err(|e| Error::Msg(e.to_string()))?).await
    }

    /// The process id of the chat worker, when one is running (started by the first message).
    pub fn chat_worker_pid(&self) -> Option<u32> {
        Some(self.chat_pid.load(Ordering::SeqCst)).filter(|&p| p != 0)
    }

    /// Sends a user message: every variant of the chat answers it in turn (streamed as
    /// `ChatText` events, then `ChatDone`), and the turn is recorded with all answers. An error
    /// (empty prompt, context full, model missing) records nothing.
    pub async fn chat_send(&self, chat_id: i64, text: &str, cancel: Arc<AtomicBool>) -> Result<Vec<ChatAnswer>> {
        let chat = self.store.chat(chat_id).await?;
        if text.trim().is_empty() {
            return Err(Error::Msg("the message is empty".into()));
        }
        let sampling: SampleOptions = serde_json::from_value(chat.sampling.clone())
            .map_err(|e| Error::Msg(format!("chat {chat_id}: stored sampling settings are unreadable: {e}")))?;
        let turn = chat.turns();
        let exe = self.worker_exe.clone().ok_or_else(|| Error::Msg("cannot find the tunebench binary to run the chat worker".into()))?;
        let mut slot = self.chat_worker.lock().await;
        let mut answers = Vec::new();
        for variant in &chat.variants {
            if slot.as_ref().is_some_and(|w| w.abandoned()) {
                *slot = None; // killed on drop
            }
            if slot.is_none() {
                let w = ChatWorker::spawn(&exe)?;
                self.chat_pid.store(w.pid().unwrap_or(0), Ordering::SeqCst);
                *slot = Some(w);
            }
            let Some(worker) = slot.as_mut() else { continue };
            let mut history = chat.history(variant.as_deref());
            history.push(crate::data::Message { role: "user".into(), content: text.to_string() });
            let events = &self.events;
            let on_text = |piece: &str| {
                let _ = events.send(ApiEvent::ChatText { chat_id, turn, variant: variant.clone(), text: piece.to_string() });
            };
            let model = Path::new(&chat.model_path);
            let event = match worker.reply(model, &chat.device, &chat.adapters, variant.clone(), history, &sampling, &cancel, on_text).await {
                Ok(e) => e,
                Err(gone) => {
                    *slot = None;
                    self.chat_pid.store(0, Ordering::SeqCst);
                    return Err(Error::Msg(format!("chat {chat_id}: {}; nothing was recorded", gone.0)));
                }
            };
            let answer = match event {
                ChatEvent::Done { answer, .. } => answer,
                ChatEvent::Error { message, .. } => return Err(Error::Msg(message)),
                ChatEvent::Text { .. } => return Err(Error::Msg("chat worker: unexpected event".into())),
            };
            let _ = self.events.send(ApiEvent::ChatDone { chat_id, turn, answer: answer.clone() });
            answers.push(answer);
        }
        drop(slot);
        let sampling_json = serde_json::to_value(&sampling).map_err(|e| Error::Msg(e.to_string()))?;
        let rows: Vec<NewAnswer> = answers
            .iter()
            .map(|a| NewAnswer {
                variant: a.variant.clone(),
                content: a.text.clone(),
                finish: a.finish.clone(),
                prompt_tokens: a.prompt_tokens as i64,
                new_tokens: a.new_tokens as i64,
                ttft_s: a.ttft_s,
                decode_tok_s: a.decode_tok_s,
                sampling: sampling_json.clone(),
            })
            .collect();
        self.store.add_chat_turn(chat_id, text, &rows).await?;
        Ok(answers)
    }
}
