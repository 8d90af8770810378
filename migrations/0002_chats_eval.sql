-- Chat sessions: a conversation with a model, optionally with adapters, answered by one or
-- more variants side by side (the base model and/or named adapters). Each variant keeps its
-- own thread: the history sent to variant V is every user turn plus V's own answers.
CREATE TABLE chats (
    id          INTEGER PRIMARY KEY,
    title       TEXT NOT NULL,
    model_path  TEXT NOT NULL,
    -- JSON list of {"name": ..., "path": ...}: the adapters loaded for this chat.
    adapters    TEXT NOT NULL DEFAULT '[]',
    -- JSON list of variants answering each turn: null = the base model, a string = an adapter.
    variants    TEXT NOT NULL DEFAULT '[null]',
    -- JSON SampleOptions.
    sampling    TEXT NOT NULL,
    system      TEXT,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
);

CREATE TABLE chat_messages (
    id            INTEGER PRIMARY KEY,
    chat_id       INTEGER NOT NULL REFERENCES chats (id) ON DELETE CASCADE,
    turn          INTEGER NOT NULL,
    role          TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
    -- For assistant messages: which variant answered ('' = the base model).
    variant       TEXT NOT NULL DEFAULT '',
    content       TEXT NOT NULL,
    finish        TEXT,
    prompt_tokens INTEGER,
    new_tokens    INTEGER,
    ttft_s        REAL,
    decode_tok_s  REAL,
    -- JSON SampleOptions actually used for this answer.
    sampling      TEXT,
    created_at    INTEGER NOT NULL,
    UNIQUE (chat_id, turn, role, variant)
);
CREATE INDEX chat_messages_chat ON chat_messages (chat_id, turn);

-- Evaluation answers (`tunebench eval`) are samples too, with the reference they are scored
-- against; training-time samples have source 'train' and no reference.
ALTER TABLE samples ADD COLUMN source TEXT NOT NULL DEFAULT 'train';
ALTER TABLE samples ADD COLUMN reference TEXT;
