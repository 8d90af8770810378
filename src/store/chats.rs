//! Chat sessions in the store (`migrations/0002_chats.sql`): the session (model, adapters,
//! variants answering each turn, sampling settings, system prompt) and its messages. Each
//! variant keeps its own thread: the history sent to a variant is every user turn plus that
//! variant's own answers ([`ChatRecord::history`]).

use serde::{Deserialize, Serialize};
use sqlx::sqlite::SqliteRow;
use sqlx::Row;

use super::{json_text, now_ms, parse_json, Store};
use crate::data::Message;
use crate::{Error, Result};

/// An adapter a chat loads.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ts_rs::TS)]
pub struct ChatAdapter {
    /// The name variants refer to it by.
    pub name: String,
    /// Its folder.
    pub path: String,
}

/// A new chat session.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NewChat {
    /// Title shown in lists.
    pub title: String,
    /// The model (GGUF file or HF folder).
    pub model_path: String,
    /// Adapters to load.
    pub adapters: Vec<ChatAdapter>,
    /// Who answers each turn: None = the base model, Some(name) = that adapter; two or more
    /// = side by side.
    pub variants: Vec<Option<String>>,
    /// Sampling settings (JSON of [`crate::infer::SampleOptions`]).
    pub sampling: serde_json::Value,
    /// Optional system prompt.
    pub system: Option<String>,
    /// Where the model answers: `auto`, `cpu`, `cuda` or `cuda:N`.
    pub device: String,
}

/// One stored message.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ts_rs::TS)]
pub struct ChatMessage {
    /// Row id.
    pub id: i64,
    /// Turn number, from 0.
    pub turn: i64,
    /// `user` or `assistant`.
    pub role: String,
    /// For answers: the variant (None = the base model).
    pub variant: Option<String>,
    /// Text.
    pub content: String,
    /// Why the answer ended (`stop`, `length`, `context`, `cancelled`).
    pub finish: Option<String>,
    /// Prompt length in tokens.
    pub prompt_tokens: Option<i64>,
    /// Answer length in tokens.
    pub new_tokens: Option<i64>,
    /// Time to first token.
    pub ttft_s: Option<f64>,
    /// Decode speed.
    pub decode_tok_s: Option<f64>,
    /// Settings used for this answer.
    pub sampling: Option<serde_json::Value>,
    /// Milliseconds since the epoch.
    pub created_at: i64,
}

/// A chat session with its messages.
#[derive(Clone, Debug, Serialize, Deserialize, ts_rs::TS)]
pub struct ChatRecord {
    /// Id.
    pub id: i64,
    /// Title.
    pub title: String,
    /// Model.
    pub model_path: String,
    /// Adapters.
    pub adapters: Vec<ChatAdapter>,
    /// Variants answering each turn.
    pub variants: Vec<Option<String>>,
    /// Sampling settings.
    pub sampling: serde_json::Value,
    /// System prompt.
    pub system: Option<String>,
    /// Where the model answers: `auto`, `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// Created (ms).
    pub created_at: i64,
    /// Last message (ms).
    pub updated_at: i64,
    /// Messages in turn order (user first, then the answers in variant order).
    pub messages: Vec<ChatMessage>,
}

/// An answer to record.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct NewAnswer {
    /// Variant (None = base).
    pub variant: Option<String>,
    /// Text.
    pub content: String,
    /// Why it ended.
    pub finish: String,
    /// Prompt tokens.
    pub prompt_tokens: i64,
    /// New tokens.
    pub new_tokens: i64,
    /// Time to first token.
    pub ttft_s: f64,
    /// Decode speed.
    pub decode_tok_s: f64,
    /// Settings used.
    pub sampling: serde_json::Value,
}

impl ChatRecord {
    /// Number of user turns so far.
    pub fn turns(&self) -> i64 {
        self.messages.iter().filter(|m| m.role == "user").count() as i64
    }

    /// The conversation as `variant` sees it: the system prompt, every user turn and that
    /// variant's own answers (a turn it did not answer contributes only the user message).
    pub fn history(&self, variant: Option<&str>) -> Vec<Message> {
        let mut out = Vec::new();
        if let Some(s) = self.system.as_deref().filter(|s| !s.trim().is_empty()) {
            out.push(Message { role: "system".into(), content: s.to_string() });
        }
        for m in &self.messages {
            if m.role == "user" || m.variant.as_deref() == variant {
                out.push(Message { role: m.role.clone(), content: m.content.clone() });
            }
        }
        out
    }
}

fn variant_key(v: Option<&str>) -> &str {
    v.unwrap_or("")
}

/// The columns `chat_from_row` reads, named rather than `*`: on a database upgraded by
/// migration 0003 (which added `device`), sqlx's SQLite driver read `SELECT *` rows one value
/// short of the columns it had described, and its worker panicked (tests/run_store.rs upgrades
/// such a database).
macro_rules! chat_columns {
    () => {
        "id, title, model_path, adapters, variants, sampling, system, device, created_at, updated_at"
    };
}

fn message_from_row(r: &SqliteRow) -> std::result::Result<ChatMessage, sqlx::Error> {
    let variant: String = r.try_get("variant")?;
    let sampling: Option<String> = r.try_get("sampling")?;
    Ok(ChatMessage {
        id: r.try_get("id")?,
        turn: r.try_get("turn")?,
        role: r.try_get("role")?,
        variant: if variant.is_empty() { None } else { Some(variant) },
        content: r.try_get("content")?,
        finish: r.try_get("finish")?,
        prompt_tokens: r.try_get("prompt_tokens")?,
        new_tokens: r.try_get("new_tokens")?,
        ttft_s: r.try_get("ttft_s")?,
        decode_tok_s: r.try_get("decode_tok_s")?,
        sampling: sampling.as_deref().map(parse_json),
        created_at: r.try_get("created_at")?,
    })
}

impl Store {
    /// Creates a chat session; returns its id.
    pub async fn create_chat(&self, c: &NewChat) -> Result<i64> {
        if c.variants.is_empty() {
            return Err(Error::Msg("a chat needs at least one variant (the base model or an adapter)".into()));
        }
        for v in c.variants.iter().flatten() {
            if !c.adapters.iter().any(|a| &a.name == v) {
                return Err(Error::Msg(format!("variant `{v}` names no adapter of this chat")));
            }
        }
        let now = now_ms();
        let adapters = serde_json::to_value(&c.adapters).map_err(|e| Error::Msg(e.to_string()))?;
        let variants = serde_json::to_value(&c.variants).map_err(|e| Error::Msg(e.to_string()))?;
        sqlx::query_scalar(
            "INSERT INTO chats (title, model_path, adapters, variants, sampling, system, device, created_at, updated_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
        )
        .bind(&c.title)
        .bind(&c.model_path)
        .bind(json_text(&adapters))
        .bind(json_text(&variants))
        .bind(json_text(&c.sampling))
        .bind(&c.system)
        .bind(&c.device)
        .bind(now)
        .bind(now)
        .fetch_one(self.pool())
        .await
        .map_err(|e| self.err(e))
    }

    /// A chat session with its messages.
    pub async fn chat(&self, id: i64) -> Result<ChatRecord> {
        let row = sqlx::query(concat!("SELECT ", chat_columns!(), " FROM chats WHERE id = ?")).bind(id).fetch_optional(self.pool()).await.map_err(|e| self.err(e))?;
        let row = row.ok_or(Error::NotFound { what: "chat", id })?;
        let mut c = self.chat_from_row(&row)?;
        let rows = sqlx::query("SELECT * FROM chat_messages WHERE chat_id = ? ORDER BY turn, role DESC, id")
            .bind(id)
            .fetch_all(self.pool())
            .await
            .map_err(|e| self.err(e))?;
        c.messages = rows.iter().map(message_from_row).collect::<std::result::Result<_, _>>().map_err(|e| self.err(e))?;
        Ok(c)
    }

    fn chat_from_row(&self, r: &SqliteRow) -> Result<ChatRecord> {
        let get = || -> std::result::Result<ChatRecord, sqlx::Error> {
            Ok(ChatRecord {
                id: r.try_get("id")?,
                title: r.try_get("title")?,
                model_path: r.try_get("model_path")?,
                adapters: serde_json::from_str(r.try_get::<&str, _>("adapters")?).unwrap_or_default(),
                variants: serde_json::from_str(r.try_get::<&str, _>("variants")?).unwrap_or_else(|_| vec![None]),
                sampling: parse_json(r.try_get::<&str, _>("sampling")?),
                system: r.try_get("system")?,
                device: r.try_get("device")?,
                created_at: r.try_get("created_at")?,
                updated_at: r.try_get("updated_at")?,
                messages: vec![],
            })
        };
        get().map_err(|e| self.err(e))
    }

    /// Every chat session (without messages), most recently used first.
    pub async fn chats(&self) -> Result<Vec<ChatRecord>> {
        let rows = sqlx::query(concat!("SELECT ", chat_columns!(), " FROM chats ORDER BY updated_at DESC, id DESC")).fetch_all(self.pool()).await.map_err(|e| self.err(e))?;
        rows.iter().map(|r| self.chat_from_row(r)).collect()
    }

    /// Changes a chat's sampling settings (later answers use them).
    pub async fn set_chat_sampling(&self, id: i64, sampling: &serde_json::Value) -> Result<()> {
        let n = sqlx::query("UPDATE chats SET sampling = ?, updated_at = ? WHERE id = ?")
            .bind(json_text(sampling))
            .bind(now_ms())
            .bind(id)
            .execute(self.pool())
            .await
            .map_err(|e| self.err(e))?
            .rows_affected();
        if n == 0 {
            return Err(Error::NotFound { what: "chat", id });
        }
        Ok(())
    }

    /// Records a user turn and the answers to it, in one transaction; returns the turn.
    pub async fn add_chat_turn(&self, chat_id: i64, user: &str, answers: &[NewAnswer]) -> Result<i64> {
        let mut tx = self.pool().begin().await.map_err(|e| self.err(e))?;
        let now = now_ms();
        let turn: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM chat_messages WHERE chat_id = ? AND role = 'user'")
            .bind(chat_id)
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| self.err(e))?;
        sqlx::query("INSERT INTO chat_messages (chat_id, turn, role, variant, content, created_at) VALUES (?, ?, 'user', '', ?, ?)")
            .bind(chat_id)
            .bind(turn)
            .bind(user)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.err(e))?;
        for a in answers {
            sqlx::query(
                "INSERT INTO chat_messages (chat_id, turn, role, variant, content, finish, prompt_tokens, new_tokens, ttft_s, decode_tok_s, sampling, created_at)
                 VALUES (?, ?, 'assistant', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(chat_id)
            .bind(turn)
            .bind(variant_key(a.variant.as_deref()))
            .bind(&a.content)
            .bind(&a.finish)
            .bind(a.prompt_tokens)
            .bind(a.new_tokens)
            .bind(a.ttft_s)
            .bind(a.decode_tok_s)
            .bind(json_text(&a.sampling))
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.err(e))?;
        }
        let n = sqlx::query("UPDATE chats SET updated_at = ? WHERE id = ?")
            .bind(now)
            .bind(chat_id)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.err(e))?
            .rows_affected();
        if n == 0 {
            return Err(Error::NotFound { what: "chat", id: chat_id });
        }
        tx.commit().await.map_err(|e| self.err(e))?;
        Ok(turn)
    }

    /// Deletes a chat session and its messages.
    pub async fn delete_chat(&self, id: i64) -> Result<()> {
        let n = sqlx::query("DELETE FROM chats WHERE id = ?").bind(id).execute(self.pool()).await.map_err(|e| self.err(e))?.rows_affected();
        if n == 0 {
            return Err(Error::NotFound { what: "chat", id });
        }
        Ok(())
    }
}
