//! Tokenization with prompt-loss masking: a [`Record`] becomes an [`Example`] of token ids
//! and labels, where only the assistant's text (and the end-of-turn marker after it) is
//! trained on.
//!
//! How assistant turns are found, for any chat template: for assistant turn `i` the template
//! renders `messages[..i]` with the generation prompt (everything the model is given) and
//! `messages[..=i]` without it (everything up to the end of its answer). The text between the
//! two is the answer plus the template's end-of-turn marker (ChatML: `Hello<|im_end|>\n`);
//! trailing whitespace after the marker is not trained (the `\n` after `<|im_end|>` is never
//! generated). The whole conversation is tokenized once (`encode(text, false)`, so special
//! tokens like `<|im_start|>` in the text become single tokens and no extra bos is added) and
//! a token is trained when its byte offsets overlap an answer span.
//!
//! Templates that insert a default system prompt or strip whitespace are handled: when the
//! generation-prompt rendering is not a prefix of the next rendering, the answer's start is
//! found by rendering a sentinel in its place; when a rendering is not a prefix of the whole
//! conversation's, the answer text is searched for in it. A turn that the template renders
//! differently once later turns follow cannot be located: that record is skipped
//! ([`SkipReason::UnlocatedTurn`]).

use std::ops::Range;

use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use super::format::{Message, Record};
use super::template::ChatTemplate;
use crate::{Error, Result};

/// The label of a position that is not trained on (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// One tokenized training example.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Example {
    /// Token ids.
    pub input_ids: Vec<u32>,
    /// One label per token, aligned with `input_ids` (HF convention: the trainer shifts them
    /// to predict the next token): the token id where trained, [`IGNORE_INDEX`] elsewhere.
    pub labels: Vec<i64>,
}

impl Example {
    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    /// Whether the example has no tokens.
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// Number of positions that contribute to the shifted next-token loss: labels other than
    /// [`IGNORE_INDEX`] at positions 1.. (position 0 is never predicted).
    pub fn n_target_tokens(&self) -> usize {
        self.labels.iter().skip(1).filter(|&&l| l != IGNORE_INDEX).count()
    }
}

/// How records are tokenized.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncodeOptions {
    /// Longest example in tokens; longer ones are cut at the end.
    pub max_len: usize,
    /// Train on every token of a conversation, prompts included.
    pub train_on_prompt: bool,
    /// Append the eos token (the template's `eos_token`) to plain-text records.
    pub add_eos_to_text: bool,
}

impl Default for EncodeOptions {
    fn default() -> Self {
        EncodeOptions { max_len: 1024, train_on_prompt: false, add_eos_to_text: true }
    }
}

/// Why a record gives no training example. [`super::load_dataset`] counts these instead of
/// failing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SkipReason {
    /// A conversation without any assistant turn.
    NoAssistantTurn,
    /// A text record that is empty or only whitespace.
    EmptyText,
    /// Nothing left to train on after truncation to `max_len`.
    NoTargetTokens,
    /// The chat template's output could not be matched to an assistant turn (a template that
    /// rewrites or drops turns).
    UnlocatedTurn,
}

impl std::fmt::Display for SkipReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SkipReason::NoAssistantTurn => "the conversation has no assistant turn",
            SkipReason::EmptyText => "the text is empty",
            SkipReason::NoTargetTokens => "no trained token is left within max_len",
            SkipReason::UnlocatedTurn => "an assistant turn could not be located in the chat template's output",
        })
    }
}

/// The result of [`try_encode`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EncodeOutcome {
    /// A usable example.
    Example {
        /// The example.
        example: Example,
        /// Whether it was cut to `max_len`.
        truncated: bool,
    },
    /// The record gives no example.
    Skipped(SkipReason),
}

/// Tokenizes one record; records that give no usable example are an error (use
/// [`try_encode`] to tell those apart from real failures).
pub fn encode(
    record: &Record,
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
    opts: &EncodeOptions,
) -> Result<Example> {
    match try_encode(record, template, tokenizer, opts)? {
        EncodeOutcome::Example { example, .. } => Ok(example),
        EncodeOutcome::Skipped(reason) => Err(Error::Msg(format!("cannot make a training example: {reason}"))),
    }
}

/// Tokenizes one record, reporting records that give no usable example as
/// [`EncodeOutcome::Skipped`]. Errors are template failures (a template that raises on these
/// messages), tokenizer failures and a zero `max_len`.
pub fn try_encode(
    record: &Record,
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
    opts: &EncodeOptions,
) -> Result<EncodeOutcome> {
    if opts.max_len == 0 {
        return Err(Error::config("data.max_len", "must be at least 1"));
    }
    if !record.has_target() {
        return Ok(EncodeOutcome::Skipped(match record {
            Record::Chat(_) => SkipReason::NoAssistantTurn,
            Record::Text(_) => SkipReason::EmptyText,
        }));
    }
    let (mut input_ids, mut labels) = match record {
        Record::Text(text) => {
            let mut ids = tokenize(tokenizer, text)?.get_ids().to_vec();
            if opts.add_eos_to_text {
                ids.push(eos_id(template, tokenizer)?);
            }
            let labels = ids.iter().map(|&i| i64::from(i)).collect();
            (ids, labels)
        }
        Record::Chat(messages) => {
            let text = template.render(messages, false)?;
            let spans = if opts.train_on_prompt {
                None
            } else {
                match assistant_spans(messages, template, &text)? {
                    Some(spans) => Some(spans),
                    None => return Ok(EncodeOutcome::Skipped(SkipReason::UnlocatedTurn)),
                }
            };
            let encoding = tokenize(tokenizer, &text)?;
            let ids = encoding.get_ids().to_vec();
            let labels = match spans {
                Some(spans) => mask(&ids, encoding.get_offsets(), &spans),
                None => ids.iter().map(|&i| i64::from(i)).collect(),
            };
            (ids, labels)
        }
    };
    let truncated = input_ids.len() > opts.max_len;
    if truncated {
        input_ids.truncate(opts.max_len);
        labels.truncate(opts.max_len);
    }
    let example = Example { input_ids, labels };
    if example.n_target_tokens() == 0 {
        return Ok(EncodeOutcome::Skipped(SkipReason::NoTargetTokens));
    }
    Ok(EncodeOutcome::Example { example, truncated })
}

/// The eos token id: the template's `eos_token` looked up in the tokenizer.
pub fn eos_id(template: &ChatTemplate, tokenizer: &Tokenizer) -> Result<u32> {
    tokenizer
        .token_to_id(template.eos_token())
        .ok_or_else(|| Error::Tokenizer(format!("the eos token `{}` is not in the vocabulary", template.eos_token())))
}

fn tokenize(tokenizer: &Tokenizer, text: &str) -> Result<tokenizers::Encoding> {
    tokenizer.encode(text, false).map_err(|e| Error::Tokenizer(e.to_string()))
}

/// Labels for `ids`: the id where the token's byte range overlaps a span (sorted, disjoint),
/// [`IGNORE_INDEX`] elsewhere.
fn mask(ids: &[u32], offsets: &[(usize, usize)], spans: &[Range<usize>]) -> Vec<i64> {
    let mut labels = Vec::with_capacity(ids.len());
    let mut k = 0;
    for (&id, &(s, e)) in ids.iter().zip(offsets) {
        while k < spans.len() && spans[k].end <= s {
            k += 1;
        }
        let trained =
            spans.get(k).is_some_and(|span| if s == e { span.contains(&s) } else { s < span.end && e > span.start });
        labels.push(if trained { i64::from(id) } else { IGNORE_INDEX });
    }
    labels
}

/// Byte ranges of `full` (the rendered conversation) that hold the assistant turns and
/// their end-of-turn markers; `None` when a turn cannot be located.
fn assistant_spans(messages: &[Message], template: &ChatTemplate, full: &str) -> Result<Option<Vec<Range<usize>>>> {
    let mut spans = Vec::new();
    let mut cursor = 0;
    for (i, message) in messages.iter().enumerate() {
        if !message.is_assistant() {
            continue;
        }
        // A template may refuse a prefix (e.g. one that must start with a user turn); the
        // content search below covers that case.
        let before = template.render(&messages[..i], true).ok();
        let upto = template.render(&messages[..=i], false)?;
        let start = match before.as_deref().filter(|b| upto.starts_with(b)) {
            Some(b) => b.len(),
            None => match content_start(messages, i, template, &upto) {
                Some(s) => s,
                None => return Ok(None),
            },
        };
        let span_text = upto[start..].trim_end();
        if span_text.is_empty() {
            continue;
        }
        let range = if full.starts_with(upto.as_str()) && start >= cursor {
            start..start + span_text.len()
        } else {
            match full.get(cursor..).and_then(|rest| rest.find(span_text)) {
                Some(p) => cursor + p..cursor + p + span_text.len(),
                None => return Ok(None),
            }
        };
        cursor = range.end;
        spans.push(range);
    }
    Ok(Some(spans))
}

/// Text that no template changes (no letters, digits or whitespace) and no dataset contains.
const SENTINEL: &str = "\u{E000}\u{E001}\u{E002}";

/// Where assistant message `i`'s text begins in `upto` (the rendering of `messages[..=i]`),
/// found by rendering the same messages with that text replaced by a sentinel. Used when the
/// generation-prompt rendering is not a prefix of `upto` (e.g. a template that inserts a
/// default system prompt only when there are messages).
fn content_start(messages: &[Message], i: usize, template: &ChatTemplate, upto: &str) -> Option<usize> {
    let mut probe = messages[..=i].to_vec();
    probe[i].content = SENTINEL.to_string();
    let rendered = template.render(&probe, false).ok()?;
    let start = rendered.find(SENTINEL)?;
    (upto.len() >= start && upto.as_bytes()[..start] == rendered.as_bytes()[..start]).then_some(start)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::testing::tiny_tokenizer;

    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn opts() -> EncodeOptions {
        EncodeOptions { max_len: 4096, train_on_prompt: false, add_eos_to_text: true }
    }

    /// The trained text: decoded runs of consecutive trained tokens.
    fn trained_runs(ex: &Example, tok: &Tokenizer) -> Vec<String> {
        let mut runs = Vec::new();
        let mut cur: Vec<u32> = Vec::new();
        for (&id, &l) in ex.input_ids.iter().zip(&ex.labels) {
            if l == IGNORE_INDEX {
                if !cur.is_empty() {
                    runs.push(tok.decode(&cur, false).unwrap());
                    cur.clear();
                }
            } else {
                assert_eq!(l, i64::from(id));
                cur.push(id);
            }
        }
        if !cur.is_empty() {
            runs.push(tok.decode(&cur, false).unwrap());
        }
        runs
    }

    fn conversation() -> Record {
        Record::Chat(vec![
            Message::user("Hi there"),
            Message::assistant("Hello! How can I help?"),
            Message::user("Say 2+2"),
            Message::assistant("4"),
        ])
    }

    #[test]
    fn chatml_masks_all_but_answers_and_im_end() {
        let tok = tiny_tokenizer();
        let t = ChatTemplate::chatml();
        let ex = encode(&conversation(), &t, &tok, &opts()).unwrap();
        let text = t
            .render(
                match &conversation() {
                    Record::Chat(m) => m,
                    _ => unreachable!(),
                },
                false,
            )
            .unwrap();
        assert_eq!(tok.decode(&ex.input_ids, false).unwrap(), text);
        assert_eq!(trained_runs(&ex, &tok), ["Hello! How can I help?<|im_end|>", "4<|im_end|>"]);
        // Special tokens are single tokens.
        let im_start = tok.token_to_id("<|im_start|>").unwrap();
        assert_eq!(ex.input_ids[0], im_start);
        assert_eq!(ex.input_ids.iter().filter(|&&i| i == im_start).count(), 4);
        assert_eq!(ex.labels.len(), ex.input_ids.len());
    }

    #[test]
    fn default_system_prompt_template_masks_the_same_answers() {
        let tok = tiny_tokenizer();
        let t = ChatTemplate::new(SMOLLM2, "", "<|im_end|>").unwrap();
        let ex = encode(&conversation(), &t, &tok, &opts()).unwrap();
        let decoded = tok.decode(&ex.input_ids, false).unwrap();
        assert!(decoded.starts_with("<|im_start|>system\nYou are a helpful AI assistant named SmolLM"), "{decoded}");
        assert_eq!(trained_runs(&ex, &tok), ["Hello! How can I help?<|im_end|>", "4<|im_end|>"]);

        // Assistant first: the prefix rendering (no messages) has no system prompt, so the
        // span is found by searching.
        let r = Record::Chat(vec![Message::assistant("I speak first."), Message::user("ok")]);
        let ex = encode(&r, &t, &tok, &opts()).unwrap();
        assert_eq!(trained_runs(&ex, &tok), ["I speak first.<|im_end|>"]);
    }

    #[test]
    fn tool_turns_and_system_are_not_trained() {
        let tok = tiny_tokenizer();
        let t = ChatTemplate::chatml();
        let r = Record::Chat(vec![
            Message::system("sys"),
            Message::user("weather?"),
            Message::assistant("{\"name\": \"w\"}"),
            Message::new("tool", "sunny"),
            Message::assistant("Sunny."),
        ]);
        let ex = encode(&r, &t, &tok, &opts()).unwrap();
        assert_eq!(trained_runs(&ex, &tok), ["{\"name\": \"w\"}<|im_end|>", "Sunny.<|im_end|>"]);
    }

    #[test]
    fn template_that_strips_content_and_uses_bos() {
        // Llama-3 style: bos, headers, content | trim, end-of-turn marker without newline.
        let src = "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n\n{{ m['content'] | trim }}<|endoftext|>{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n\n{% endif %}";
        let tok = tiny_tokenizer();
        let t = ChatTemplate::new(src, "<|endoftext|>", "<|endoftext|>").unwrap();
        let r = Record::Chat(vec![Message::user("q"), Message::assistant("  answer  ")]);
        let ex = encode(&r, &t, &tok, &opts()).unwrap();
        assert_eq!(trained_runs(&ex, &tok), ["answer<|endoftext|>"]);
    }

    #[test]
    fn template_whose_prefixes_do_not_line_up() {
        // A marker before the last message moves as turns are added, so no rendering of a
        // prefix is a prefix of the whole; spans are searched for.
        let src = "{% for m in messages %}{% if loop.last %}(end){% endif %}[{{ m.role }}]{{ m.content }}<|im_end|>{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}";
        let tok = tiny_tokenizer();
        let t = ChatTemplate::new(src, "", "<|im_end|>").unwrap();
        let r =
            Record::Chat(vec![Message::user("a"), Message::assistant("d"), Message::user("c"), Message::assistant("")]);
        let ex = encode(&r, &t, &tok, &opts()).unwrap();
        assert_eq!(
            tok.decode(&ex.input_ids, false).unwrap(),
            "[user]a<|im_end|>[assistant]d<|im_end|>[user]c<|im_end|>(end)[assistant]<|im_end|>"
        );
        assert_eq!(trained_runs(&ex, &tok), ["d<|im_end|>", "<|im_end|>"]);
    }

    #[test]
    fn template_that_rewrites_earlier_turns() {
        // Earlier assistant turns are upper-cased once a later turn exists: the first answer
        // as rendered alone ("b") is not in the whole conversation, so the record is skipped.
        let src = "{% for m in messages %}[{{ m.role }}]{% if m.role == 'assistant' and not loop.last %}{{ m.content | upper }}{% else %}{{ m.content }}{% endif %}<|im_end|>{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}";
        let tok = tiny_tokenizer();
        let t = ChatTemplate::new(src, "", "<|im_end|>").unwrap();
        let r = Record::Chat(vec![
            Message::user("a"),
            Message::assistant("b"),
            Message::user("c"),
            Message::assistant("d"),
        ]);
        assert_eq!(try_encode(&r, &t, &tok, &opts()).unwrap(), EncodeOutcome::Skipped(SkipReason::UnlocatedTurn));
        let r = Record::Chat(vec![Message::user("a"), Message::assistant("b")]);
        let ex = encode(&r, &t, &tok, &opts()).unwrap();
        assert_eq!(trained_runs(&ex, &tok), ["b<|im_end|>"]);
    }

    #[test]
    fn train_on_prompt_trains_everything() {
        let tok = tiny_tokenizer();
        let o = EncodeOptions { train_on_prompt: true, ..opts() };
        let ex = encode(&conversation(), &ChatTemplate::chatml(), &tok, &o).unwrap();
        assert!(ex.labels.iter().zip(&ex.input_ids).all(|(&l, &i)| l == i64::from(i)));
    }

    #[test]
    fn text_records_get_eos_and_are_all_trained() {
        let tok = tiny_tokenizer();
        let t = ChatTemplate::chatml();
        let ex = encode(&Record::Text("abc def".into()), &t, &tok, &opts()).unwrap();
        let eos = tok.token_to_id("<|im_end|>").unwrap();
        assert_eq!(*ex.input_ids.last().unwrap(), eos);
        assert_eq!(tok.decode(&ex.input_ids, false).unwrap(), "abc def<|im_end|>");
        assert!(ex.labels.iter().all(|&l| l != IGNORE_INDEX));
        let no_eos =
            encode(&Record::Text("abc def".into()), &t, &tok, &EncodeOptions { add_eos_to_text: false, ..opts() })
                .unwrap();
        assert_eq!(no_eos.len() + 1, ex.len());
        // An eos token that is not in the vocabulary.
        let t = ChatTemplate::new(super::super::template::CHATML, "", "</s>").unwrap();
        let e = encode(&Record::Text("abc".into()), &t, &tok, &opts()).unwrap_err();
        assert!(e.to_string().contains("`</s>`"), "{e}");
    }

    #[test]
    fn truncation_and_skips() {
        let tok = tiny_tokenizer();
        let t = ChatTemplate::chatml();
        let full = encode(&conversation(), &t, &tok, &opts()).unwrap();
        let o = EncodeOptions { max_len: full.len() - 3, ..opts() };
        match try_encode(&conversation(), &t, &tok, &o).unwrap() {
            EncodeOutcome::Example { example, truncated } => {
                assert!(truncated);
                assert_eq!(example.input_ids[..], full.input_ids[..full.len() - 3]);
                assert_eq!(example.labels[..], full.labels[..full.len() - 3]);
            }
            other => panic!("{other:?}"),
        }
        // Cut before the first answer: nothing to train on.
        let o = EncodeOptions { max_len: 6, ..opts() };
        assert_eq!(
            try_encode(&conversation(), &t, &tok, &o).unwrap(),
            EncodeOutcome::Skipped(SkipReason::NoTargetTokens)
        );
        let r = Record::Chat(vec![Message::user("only a question")]);
        assert_eq!(try_encode(&r, &t, &tok, &opts()).unwrap(), EncodeOutcome::Skipped(SkipReason::NoAssistantTurn));
        let e = encode(&r, &t, &tok, &opts()).unwrap_err();
        assert!(e.to_string().contains("no assistant turn"), "{e}");
        assert_eq!(
            try_encode(&Record::Text(" \n".into()), &t, &tok, &opts()).unwrap(),
            EncodeOutcome::Skipped(SkipReason::EmptyText)
        );
        let e = try_encode(&conversation(), &t, &tok, &EncodeOptions { max_len: 0, ..opts() }).unwrap_err();
        assert!(matches!(e, Error::Config { .. }));
    }

    #[test]
    fn mask_handles_boundaries() {
        // Tokens: [0,2) [2,4) [4,4) [4,6) [6,8); span [3,5).
        let ids = [10, 11, 12, 13, 14];
        let offsets = [(0, 2), (2, 4), (4, 4), (4, 6), (6, 8)];
        let span = 3..5;
        assert_eq!(mask(&ids, &offsets, std::slice::from_ref(&span)), [IGNORE_INDEX, 11, 12, 13, IGNORE_INDEX]);
        assert_eq!(mask(&ids, &offsets, &[0..1, 6..7]), [10, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 14]);
        assert_eq!(mask(&ids, &offsets, &[]), [IGNORE_INDEX; 5]);
    }
}
