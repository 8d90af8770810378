//! Chat templates: the Jinja templates models ship (`tokenizer.chat_template`), rendered with
//! minijinja the way HF transformers renders them.
//!
//! Compatibility with transformers' `apply_chat_template`: `trim_blocks` and `lstrip_blocks`
//! on, Python string methods (`.strip()`, `.split()`, `.startswith()`, …) through
//! minijinja-contrib's pycompat, `raise_exception(msg)`, a `tojson` filter that writes JSON
//! like Python's `json.dumps(ensure_ascii=False)` (no HTML escaping), and the
//! `{% generation %}` markers (which only tag assistant text for HF's masking) are removed.
//! The context has `messages`, `add_generation_prompt`, `bos_token` and `eos_token`.

use std::fmt;

use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Kwargs, Serde, Value, ValueKind};
use minijinja::{context, Environment, ErrorKind};

use super::format::Message;
use crate::{Error, Result};

/// The ChatML template (used by SmolLM2, Qwen and many others); the fallback when a model
/// ships no template.
pub const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

const NAME: &str = "chat_template";

/// A compiled chat template with the special tokens it refers to.
#[derive(Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
}

impl fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source_len", &self.source.len())
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish()
    }
}

impl ChatTemplate {
    /// Compiles `source` (a Jinja chat template). `bos_token` and `eos_token` are the model's
    /// special-token strings (`""` when it has none); `eos_token` is also the token appended
    /// to plain-text records.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let mut env = Environment::new();
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| Error::Template(e.to_string()))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, strip_generation_tags(source))
            .map_err(|e| Error::Template(format!("cannot parse the template: {}", describe(&e))))?;
        Ok(ChatTemplate {
            env,
            source: source.to_string(),
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        })
    }

    /// The ChatML template ([`CHATML`]) with no bos token and `<|im_end|>` as eos. For a model
    /// whose eos differs, use `ChatTemplate::new(CHATML, bos, eos)`.
    pub fn chatml() -> Self {
        match ChatTemplate::new(CHATML, "", "<|im_end|>") {
            Ok(t) => t,
            // CHATML is a constant that a unit test compiles; this cannot happen.
            Err(e) => unreachable!("the built-in ChatML template does not compile: {e}"),
        }
    }

    /// Renders a conversation. With `add_generation_prompt` the text ends with the header
    /// that makes the model answer as the assistant.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let template = self.env.get_template(NAME).map_err(|e| Error::Template(describe(&e)))?;
        template
            .render(context! {
                messages => Serde(messages),
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token.as_str(),
                eos_token => self.eos_token.as_str(),
            })
            .map_err(|e| Error::Template(describe(&e)))
    }

    /// The template source as given.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The bos token string (`""` when the model has none).
    pub fn bos_token(&self) -> &str {
        &self.bos_token
    }

    /// The eos token string.
    pub fn eos_token(&self) -> &str {
        &self.eos_token
    }
}

/// A minijinja error with its detail and location, on one line.
fn describe(e: &minijinja::Error) -> String {
    let mut msg = match (e.kind(), e.detail()) {
        (ErrorKind::InvalidOperation, Some(detail)) => detail.to_string(),
        (kind, Some(detail)) => format!("{kind}: {detail}"),
        (kind, None) => kind.to_string(),
    };
    if let Some(line) = e.line() {
        msg.push_str(&format!(" (template line {line})"));
    }
    msg
}

fn raise_exception(message: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

/// Removes `{% generation %}` / `{% endgeneration %}` (with any `-` whitespace markers): HF
/// uses them only to tag assistant text, which we find by rendering prefixes instead.
fn strip_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(i) = rest.find("{%") {
        let tail = &rest[i + 2..];
        let inner_start = tail.strip_prefix('-').unwrap_or(tail);
        let word = inner_start.trim_start();
        let is_tag = ["generation", "endgeneration"].iter().any(|w| {
            word.strip_prefix(w).is_some_and(|after| {
                let after = after.trim_start();
                after.starts_with("%}") || after.starts_with("-%}")
            })
        });
        match (is_tag, tail.find("%}")) {
            (true, Some(end)) => {
                out.push_str(&rest[..i]);
                rest = &tail[end + 2..];
            }
            _ => {
                out.push_str(&rest[..i + 2]);
                rest = tail;
            }
        }
    }
    out.push_str(rest);
    out
}

/// `tojson` as transformers defines it: `json.dumps(value, ensure_ascii=False, indent=indent,
/// separators=separators, sort_keys=sort_keys)`. Map keys come out in minijinja's order.
fn tojson(value: &Value, indent: Option<Value>, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let indent = match indent {
        Some(v) => Some(v),
        None => kwargs.get::<Option<Value>>("indent")?,
    };
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => Some(usize::try_from(v)?),
    };
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    // Keys are already sorted when minijinja stores maps in order; accepted for compatibility.
    let _sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let (item_sep, key_sep) = match separators.as_deref() {
        Some([a, b]) => (a.clone(), b.clone()),
        Some(_) => return Err(minijinja::Error::new(ErrorKind::InvalidOperation, "tojson: separators must be a pair")),
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let mut out = String::new();
    let style = JsonStyle { indent, item_sep, key_sep };
    write_json(&mut out, value, &style, 0)?;
    Ok(Value::from(out))
}

struct JsonStyle {
    indent: Option<usize>,
    item_sep: String,
    key_sep: String,
}

fn json_string(out: &mut String, s: &str) {
    // serde_json escapes exactly what Python does with ensure_ascii=False.
    out.push_str(&serde_json::Value::from(s).to_string());
}

fn newline(out: &mut String, style: &JsonStyle, depth: usize) {
    if let Some(n) = style.indent {
        out.push('\n');
        out.push_str(&" ".repeat(n * depth));
    }
}

fn write_json(
    out: &mut String,
    v: &Value,
    style: &JsonStyle,
    depth: usize,
) -> std::result::Result<(), minijinja::Error> {
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if v.is_integer() {
                out.push_str(&v.to_string());
            } else {
                let x = f64::try_from(v.clone())?;
                out.push_str(&if x.is_finite() { format!("{x:?}") } else { v.to_string() });
            }
        }
        ValueKind::String => json_string(out, v.as_str().unwrap_or_default()),
        ValueKind::Map => {
            let keys: Vec<Value> = v.try_iter()?.collect();
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(&style.item_sep);
                }
                newline(out, style, depth + 1);
                match key.as_str() {
                    Some(k) => json_string(out, k),
                    None => json_string(out, &key.to_string()),
                }
                out.push_str(&style.key_sep);
                write_json(out, &v.get_item(key)?, style, depth + 1)?;
            }
            newline(out, style, depth);
            out.push('}');
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&style.item_sep);
                }
                newline(out, style, depth + 1);
                write_json(out, item, style, depth + 1)?;
            }
            newline(out, style, depth);
            out.push(']');
        }
        _ => json_string(out, &v.to_string()),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn conv() -> Vec<Message> {
        vec![Message::user("Hi"), Message::assistant("Hello!")]
    }

    #[test]
    fn chatml_renders_like_transformers() {
        let t = ChatTemplate::chatml();
        assert_eq!(
            t.render(&conv(), false).unwrap(),
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        );
        assert_eq!(t.render(&conv()[..1], true).unwrap(), "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
        assert_eq!(t.eos_token(), "<|im_end|>");
    }

    #[test]
    fn smollm2_inserts_default_system_prompt() {
        let t = ChatTemplate::new(SMOLLM2, "", "<|im_end|>").unwrap();
        let s = t.render(&conv(), false).unwrap();
        assert!(s.starts_with("<|im_start|>system\nYou are a helpful AI assistant named SmolLM"), "{s}");
        assert!(s.ends_with("<|im_start|>assistant\nHello!<|im_end|>\n"), "{s}");
    }

    #[test]
    fn pycompat_raise_exception_tokens_and_whitespace_control() {
        // A Llama-3-style template: bos_token, strip(), trim_blocks/lstrip_blocks.
        let src = "{{ bos_token }}{% for m in messages %}\n    {% if m['role'] not in ['user', 'assistant'] %}\n        {{ raise_exception('Only user and assistant roles are supported!') }}\n    {% endif %}\n<{{ m['role'] }}>{{ m['content'].strip() }}{{ eos_token }}\n{% endfor %}";
        let t = ChatTemplate::new(src, "<s>", "</s>").unwrap();
        let s = t.render(&[Message::user("  Hi  "), Message::assistant("Yo")], false).unwrap();
        assert_eq!(s, "<s><user>Hi</s>\n<assistant>Yo</s>\n");
        let e = t.render(&[Message::system("x")], false).unwrap_err();
        assert!(matches!(e, Error::Template(_)));
        assert!(e.to_string().contains("Only user and assistant roles are supported!"), "{e}");
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let t = ChatTemplate::new(
            "{{ {'b': [1, 2.5, none, true], 'a': '<x> é \"q\"'} | tojson }}|{{ [1, {'k': 'v'}] | tojson(indent=2) }}|{{ [] | tojson }}",
            "",
            "",
        )
        .unwrap();
        let s = t.render(&[], false).unwrap();
        assert_eq!(
            s,
            "{\"a\": \"<x> é \\\"q\\\"\", \"b\": [1, 2.5, null, true]}|[\n  1,\n  {\n    \"k\": \"v\"\n  }\n]|[]"
        );
    }

    #[test]
    fn generation_tags_are_ignored() {
        let src = "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{%- endgeneration %}{% else %}{{ m.content }}{% endif %}{% endfor %}";
        let t = ChatTemplate::new(src, "", "").unwrap();
        assert_eq!(t.render(&conv(), false).unwrap(), "HiHello!");
    }

    #[test]
    fn syntax_errors_are_template_errors() {
        let e = ChatTemplate::new("{% for m in messages %}", "", "").unwrap_err();
        assert!(matches!(e, Error::Template(_)), "{e:?}");
        assert!(e.to_string().contains("cannot parse"), "{e}");
    }
}
