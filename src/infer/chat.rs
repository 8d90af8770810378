//! A loaded model to chat with: the chat template, any number of adapters kept in memory and
//! switched without reloading the base, and the same prompt answered by several variants
//! (base vs tuned, adapter A vs B) side by side.
//!
//! Adapters are applied at run time (never merged into the base), so switching is swapping
//! the layers installed in the [`crate::model::Linear`] slots: the base weights are never
//! written, and "back to the base" is bit-identical to a fresh load. This is what lets a
//! quantized GGUF base serve several adapters (merging into 4-bit blocks would be lossy).

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use candle_core::Device;

use super::{generate_text, SampleOptions, TextGeneration};
use crate::data::{ChatTemplate, Message};
use crate::model::LoadedModel;
use crate::peft::{self, Adapter};
use crate::{Error, Result};

/// A loaded adapter with the name the user knows it by.
pub struct NamedAdapter {
    /// Display name (the folder name unless given).
    pub name: String,
    /// Where it was loaded from.
    pub path: PathBuf,
    /// Its layers.
    pub adapter: Adapter,
}

/// A model ready to chat.
pub struct ChatModel {
    /// Weights, tokenizer, special tokens.
    pub loaded: LoadedModel,
    template: ChatTemplate,
    adapters: Vec<NamedAdapter>,
    active: Option<usize>,
}

impl ChatModel {
    /// Loads `path` (a GGUF file stays quantized) on `device`.
    pub fn open(path: &Path, device: &Device) -> Result<Self> {
        Self::from_loaded(crate::model::load_quantized(path, device)?)
    }

    /// Wraps an already loaded model (its installed adapters, if any, are removed).
    pub fn from_loaded(mut loaded: LoadedModel) -> Result<Self> {
        peft::remove_all(&mut loaded.model);
        let template = crate::train::trainer::template_for(&loaded)?;
        Ok(ChatModel { loaded, template, adapters: vec![], active: None })
    }

    /// Loads an adapter folder and keeps it (inactive). Returns its name: `name`, or the
    /// folder's name. Errors (missing files, another base's shapes) leave the model as it was.
    pub fn add_adapter(&mut self, dir: &Path, name: Option<&str>) -> Result<String> {
        let name = name
            .map(str::to_string)
            .or_else(|| dir.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| dir.display().to_string());
        if self.adapters.iter().any(|a| a.name == name) {
            return Err(Error::Msg(format!("an adapter named `{name}` is already loaded")));
        }
        let loaded = Adapter::load(&mut self.loaded.model, dir);
        // Adapter::load installs what it loads; put back what was active before.
        let restore = self.restore_active();
        let adapter = loaded?;
        restore?;
        self.adapters.push(NamedAdapter { name: name.clone(), path: dir.to_path_buf(), adapter });
        Ok(name)
    }

    fn restore_active(&mut self) -> Result<()> {
        match self.active {
            Some(i) => self.adapters[i].adapter.install(&mut self.loaded.model),
            None => {
                peft::remove_all(&mut self.loaded.model);
                Ok(())
            }
        }
    }

    /// The folder a loaded adapter came from.
    pub fn adapter_path(&self, name: &str) -> Option<&Path> {
        self.adapters.iter().find(|a| a.name == name).map(|a| a.path.as_path())
    }

    /// Forgets a loaded adapter (the base answers if it was active).
    pub fn remove_adapter(&mut self, name: &str) -> Result<()> {
        let i = self.adapters.iter().position(|a| a.name == name).ok_or_else(|| Error::Msg(format!("no adapter named `{name}` is loaded")))?;
        self.adapters.remove(i);
        self.active = match self.active {
            Some(a) if a == i => None,
            Some(a) if a > i => Some(a - 1),
            other => other,
        };
        self.restore_active()
    }

    /// Names of the loaded adapters, in load order.
    pub fn adapter_names(&self) -> Vec<&str> {
        self.adapters.iter().map(|a| a.name.as_str()).collect()
    }

    /// The active adapter's name (None = the base model).
    pub fn active(&self) -> Option<&str> {
        self.active.map(|i| self.adapters[i].name.as_str())
    }

    /// Makes `name` the active adapter (None = the base model alone).
    pub fn use_adapter(&mut self, name: Option<&str>) -> Result<()> {
        let idx = match name {
            None => None,
            Some(n) => Some(self.adapters.iter().position(|a| a.name == n).ok_or_else(|| {
                Error::Msg(format!("no adapter named `{n}` is loaded (loaded: {})", self.adapter_names().join(", ")))
            })?),
        };
        if idx != self.active {
            self.active = idx;
            self.restore_active()?;
        }
        Ok(())
    }

    /// The chat template.
    pub fn template(&self) -> &ChatTemplate {
        &self.template
    }

    /// Token ids of `messages` rendered with the chat template, ready for the assistant's turn.
    pub fn prompt_ids(&self, messages: &[Message]) -> Result<Vec<u32>> {
        if messages.is_empty() || messages.last().is_some_and(|m| m.content.trim().is_empty()) {
            return Err(Error::Msg("the prompt is empty".into()));
        }
        let text = self.template.render(messages, true)?;
        let enc = self.loaded.tokenizer.encode(text, false).map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// `opts` plus the model's end-of-turn token as a stop token.
    fn with_eos(&self, opts: &SampleOptions) -> SampleOptions {
        let mut o = opts.clone();
        if !o.stop_ids.contains(&self.loaded.spec.eos_id) {
            o.stop_ids.push(self.loaded.spec.eos_id);
        }
        o
    }

    /// The active variant's answer to `messages`, streamed through `on_text`.
    pub fn reply(
        &self,
        messages: &[Message],
        opts: &SampleOptions,
        cancel: Option<&AtomicBool>,
        on_text: impl FnMut(&str),
    ) -> Result<TextGeneration> {
        let ids = self.prompt_ids(messages)?;
        generate_text(&self.loaded.model, &self.loaded.tokenizer, &ids, &self.with_eos(opts), cancel, on_text)
    }

    /// The same conversation answered by each variant in turn (None = base, Some(name) = that
    /// adapter), with the same sampling settings and seed. `on_text(i, piece)` streams variant
    /// `i`'s answer. The active adapter is restored afterwards.
    pub fn compare(
        &mut self,
        messages: &[Message],
        variants: &[Option<&str>],
        opts: &SampleOptions,
        cancel: Option<&AtomicBool>,
        mut on_text: impl FnMut(usize, &str),
    ) -> Result<Vec<TextGeneration>> {
        let before = self.active;
        let mut out = Vec::with_capacity(variants.len());
        let mut result = Ok(());
        for (i, v) in variants.iter().enumerate() {
            if let Err(e) = self.use_adapter(*v) {
                result = Err(e);
                break;
            }
            match self.reply(messages, opts, cancel, |t| on_text(i, t)) {
                Ok(g) => out.push(g),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        self.active = before;
        self.restore_active()?;
        result.map(|_| out)
    }
}
