//! Ollama `Modelfile`s: `FROM ./<file>.gguf`, a Go `TEMPLATE` derived from the model's Jinja
//! chat template, `PARAMETER stop` for the end-of-turn token and sampling defaults.
//!
//! Ollama renders prompts with a Go `text/template` over `.Messages`, not with the Jinja
//! template in the GGUF. We derive the Go template by rendering the Jinja template with
//! placeholder messages and cutting the output at the placeholders: that gives each role's
//! prefix and suffix, the text before the first message (usually the bos token), the
//! generation prompt, and a default system prompt the template inserts when the conversation
//! has none (SmolLM2's "You are a helpful AI assistant named SmolLM…"). The derived pieces are
//! then checked by rendering four conversations both ways (Jinja, and the Go template's logic
//! evaluated here); a template that does not decompose per role (Llama 2's system prompt inside
//! the first user turn, templates that change with the position of a message) gets no
//! `TEMPLATE` line but a comment saying why, and Ollama falls back to its own detection.
//! ChatML (SmolLM2, Qwen) and Llama-3-style templates decompose.
//!
//! The generated template, as Ollama's own templates do, treats a final assistant message as a
//! reply to continue (no end-of-turn after it) and adds the generation prompt after any other
//! final message. Messages of other roles (`tool`) are skipped.

use std::path::{Path, PathBuf};

use super::staging::{sync_file, Staged};
use crate::data::{ChatTemplate, Message};
use crate::infer::SampleOptions;
use crate::model::TokenizerSpec;
use crate::{Error, Result};

/// The chat format of a model, cut into the pieces a per-role Go template needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GoTemplate {
    /// Text before the first message (after dropping a bos token the tokenizer adds itself).
    pub preamble: String,
    /// Before and after a system message's content.
    pub system: (String, String),
    /// Before and after a user message's content.
    pub user: (String, String),
    /// Before and after an assistant message's content.
    pub assistant: (String, String),
    /// Appended after the last message to make the model answer.
    pub generation_prompt: String,
    /// The system prompt the template inserts when the conversation starts without one
    /// (`Some("")` for a template that always writes a system block, even an empty one).
    pub default_system: Option<String>,
    /// The Go template text for Ollama's `TEMPLATE`.
    pub template: String,
}

const PH_SYSTEM: &str = "QQSYSTEMPLACEHOLDERQQ";
const PH_USER1: &str = "QQUSERPLACEHOLDERONEQQ";
const PH_ASSISTANT1: &str = "QQASSISTANTPLACEHOLDERONEQQ";
const PH_USER2: &str = "QQUSERPLACEHOLDERTWOQQ";
const PH_ASSISTANT2: &str = "QQASSISTANTPLACEHOLDERTWOQQ";

fn unsupported(reason: impl Into<String>) -> Error {
    Error::Template(format!("the chat template cannot be written as an Ollama template: {}", reason.into()))
}

/// Cuts `text` at each of `parts` in order: returns the text before the first, between each
/// pair, and after the last; None when a part is missing or out of order.
fn cut<'a>(text: &'a str, parts: &[&str]) -> Option<Vec<&'a str>> {
    let mut out = Vec::with_capacity(parts.len() + 1);
    let mut rest = text;
    for p in parts {
        let i = rest.find(p)?;
        out.push(&rest[..i]);
        rest = &rest[i + p.len()..];
    }
    out.push(rest);
    Some(out)
}

/// Derives the per-role pieces and the Go template of a model's Jinja chat template.
pub fn derive_go_template(spec: &TokenizerSpec) -> Result<GoTemplate> {
    let source = spec.chat_template.as_deref().ok_or_else(|| unsupported("the model has no chat template"))?;
    let bos = spec.bos_token.clone().unwrap_or_default();
    let t = ChatTemplate::new(source, &bos, &spec.eos_token)?;
    let render = |msgs: &[Message], gp: bool| t.render(msgs, gp);
    let (s, u1, a1, u2, a2) =
        (Message::system(PH_SYSTEM), Message::new("user", PH_USER1), Message::new("assistant", PH_ASSISTANT1), Message::new("user", PH_USER2), Message::new("assistant", PH_ASSISTANT2));

    let full = render(&[s.clone(), u1.clone(), a1.clone(), u2.clone(), a2.clone()], false)?;
    let seg = cut(&full, &[PH_SYSTEM, PH_USER1, PH_ASSISTANT1, PH_USER2, PH_ASSISTANT2])
        .ok_or_else(|| unsupported("a message's content does not appear in the rendering as it was given"))?;
    let (p0, x1, x2, x3, x4, x5) = (seg[0], seg[1], seg[2], seg[3], seg[4], seg[5]);
    let asst_suffix = x5;
    let user_prefix = x3.strip_prefix(asst_suffix).ok_or_else(|| unsupported("assistant turns end differently in the middle and at the end"))?;
    let su = render(&[s.clone(), u1.clone()], false)?;
    let user_suffix = su
        .strip_prefix(&format!("{p0}{PH_SYSTEM}{x1}{PH_USER1}"))
        .ok_or_else(|| unsupported("a conversation's rendering depends on the messages after it"))?;
    let asst_prefix = x2.strip_prefix(user_suffix).ok_or_else(|| unsupported("user turns end differently depending on what follows"))?;
    if x4 != x2 {
        return Err(unsupported("the second user turn is written differently from the first"));
    }
    let sys_suffix = x1.strip_suffix(user_prefix).ok_or_else(|| unsupported("the system prompt is not a turn of its own"))?;
    let with_gp = render(&[s.clone(), u1.clone()], true)?;
    let generation_prompt = with_gp.strip_prefix(su.as_str()).ok_or_else(|| unsupported("the generation prompt is not appended at the end"))?;

    // Without a system message: either the same text minus the system turn, or a default
    // system turn the template inserts.
    let only_user = render(std::slice::from_ref(&u1), false)?;
    let q0 = only_user
        .strip_suffix(&format!("{PH_USER1}{user_suffix}"))
        .ok_or_else(|| unsupported("a user-only conversation is written differently"))?;
    let (preamble, sys_prefix, default_system) = match q0.strip_suffix(user_prefix) {
        Some(pre) if p0.starts_with(pre) => (pre, &p0[pre.len()..], None),
        _ => {
            let middle = q0
                .strip_prefix(p0)
                .and_then(|r| r.strip_suffix(&format!("{sys_suffix}{user_prefix}")))
                .ok_or_else(|| unsupported("the text before the first user turn cannot be explained by a system turn"))?;
            // The preamble cannot be told apart from the system prefix here: a bos token is
            // one, unless every turn starts with it (ChatML models whose bos is <|im_start|>).
            let pre = if !bos.is_empty() && p0.starts_with(&bos) && !user_prefix.starts_with(&bos) { bos.as_str() } else { "" };
            (pre, &p0[pre.len()..], Some(middle.to_string()))
        }
    };
    // llama.cpp (and so Ollama) prepends bos itself when the tokenizer says so.
    let preamble = if spec.add_bos && !bos.is_empty() { preamble.strip_prefix(bos.as_str()).unwrap_or(preamble) } else { preamble };

    let mut g = GoTemplate {
        preamble: preamble.to_string(),
        system: (sys_prefix.to_string(), sys_suffix.to_string()),
        user: (user_prefix.to_string(), user_suffix.to_string()),
        assistant: (asst_prefix.to_string(), asst_suffix.to_string()),
        generation_prompt: generation_prompt.to_string(),
        default_system,
        template: String::new(),
    };
    g.template = g.go_text();
    // Check the pieces on conversations they were not derived from.
    let (u3, a3) = (Message::new("user", "How are you?"), Message::new("assistant", "Fine, thanks."));
    let sys = Message::system("Be brief.");
    let cases: Vec<Vec<Message>> = vec![
        vec![u3.clone()],
        vec![sys.clone(), u3.clone()],
        vec![u3.clone(), a3.clone(), u3.clone()],
        vec![sys.clone(), u3.clone(), a3.clone(), u3.clone(), a3.clone(), u3.clone()],
    ];
    for (i, msgs) in cases.iter().enumerate() {
        let mut want = render(msgs, true)?;
        if spec.add_bos && !bos.is_empty() && !preamble.starts_with(bos.as_str()) {
            if let Some(rest) = want.strip_prefix(bos.as_str()) {
                want = rest.to_string();
            }
        }
        if g.emulate(msgs) != want {
            return Err(unsupported(format!("the derived per-role template renders check conversation {} differently", i + 1)));
        }
    }
    Ok(g)
}

/// Escapes literal text for a Go template (`{{` would start an action).
fn go_literal(s: &str) -> String {
    s.replace("{{", "{{ \"{{\" }}")
}

impl GoTemplate {
    /// The Go template: one line of actions, with no whitespace trimming (`{{-`), so the
    /// literal newlines of each piece survive exactly.
    fn go_text(&self) -> String {
        let lit = go_literal;
        let mut t = lit(&self.preamble);
        t.push_str("{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}");
        if let Some(d) = &self.default_system {
            t.push_str(&format!(
                "{{{{ if and (eq $i 0) (ne .Role \"system\") }}}}{}{{{{ end }}}}",
                lit(&format!("{}{d}{}", self.system.0, self.system.1))
            ));
        }
        t.push_str(&format!(
            "{{{{ if eq .Role \"system\" }}}}{}{{{{ .Content }}}}{}\
             {{{{ else if eq .Role \"user\" }}}}{}{{{{ .Content }}}}{}\
             {{{{ else if eq .Role \"assistant\" }}}}{}{{{{ .Content }}}}{{{{ if not $last }}}}{}{{{{ end }}}}{{{{ end }}}}",
            lit(&self.system.0),
            lit(&self.system.1),
            lit(&self.user.0),
            lit(&self.user.1),
            lit(&self.assistant.0),
            lit(&self.assistant.1),
        ));
        t.push_str(&format!("{{{{ if and $last (ne .Role \"assistant\") }}}}{}{{{{ end }}}}{{{{ end }}}}", lit(&self.generation_prompt)));
        t
    }

    /// What the Go template renders for `messages` (the same logic, evaluated here).
    pub fn emulate(&self, messages: &[Message]) -> String {
        let mut out = self.preamble.clone();
        for (i, m) in messages.iter().enumerate() {
            let last = i + 1 == messages.len();
            if let (0, Some(d)) = (i, &self.default_system) {
                if m.role != "system" {
                    out.push_str(&format!("{}{d}{}", self.system.0, self.system.1));
                }
            }
            let (pre, suf) = match m.role.as_str() {
                "system" => (&self.system.0, self.system.1.as_str()),
                "user" => (&self.user.0, self.user.1.as_str()),
                "assistant" => (&self.assistant.0, if last { "" } else { self.assistant.1.as_str() }),
                _ => continue,
            };
            out.push_str(pre);
            out.push_str(&m.content);
            out.push_str(suf);
            if last && m.role != "assistant" {
                out.push_str(&self.generation_prompt);
            }
        }
        out
    }

    /// The strings that end an assistant turn: the end of its suffix, trimmed (`<|im_end|>`,
    /// `<|eot_id|>`).
    fn end_of_turn(&self) -> Option<String> {
        let s = self.assistant.1.trim();
        (!s.is_empty()).then(|| s.to_string())
    }
}

/// A Modelfile string value: plain quotes, or triple quotes when it holds quotes or newlines.
fn quoted(s: &str) -> String {
    if s.contains('"') || s.contains('\n') || s.contains('\\') {
        format!("\"\"\"{s}\"\"\"")
    } else {
        format!("\"{s}\"")
    }
}

/// The Ollama `Modelfile` for the GGUF file `gguf_file_name` (in the same folder) of a model
/// with this tokenizer spec: `FROM`, the derived `TEMPLATE` (or a comment saying why there is
/// none), `PARAMETER stop` for the end-of-turn token(s) and `opts`' stop strings, and
/// `temperature`, `top_p`, `top_k`, `min_p`, `repeat_penalty`, `num_predict` from `opts`.
/// The seed is left to Ollama (a fixed seed would make every answer the same).
pub fn ollama_modelfile(gguf_file_name: &str, spec: &TokenizerSpec, opts: &SampleOptions) -> String {
    let mut out = String::new();
    out.push_str("# Ollama Modelfile written by Tunebench. Create the model with:\n");
    out.push_str("#   ollama create <name> -f Modelfile   (in this folder)\n");
    out.push_str(&format!("FROM ./{gguf_file_name}\n\n"));
    let mut stops: Vec<String> = Vec::new();
    match derive_go_template(spec) {
        Ok(g) if !g.template.contains("\"\"\"") => {
            out.push_str("# Chat format derived from the model's Jinja chat template.\n");
            out.push_str(&format!("TEMPLATE \"\"\"{}\"\"\"\n\n", g.template));
            stops.extend(g.end_of_turn());
        }
        Ok(_) => out.push_str("# No TEMPLATE: the chat format contains \"\"\", which a Modelfile cannot quote.\n\n"),
        Err(e) => out.push_str(&format!("# No TEMPLATE ({}); Ollama will use the template it detects.\n\n", e.to_string().replace('\n', " "))),
    }
    stops.push(spec.eos_token.clone());
    stops.extend(opts.stop_strings.iter().cloned());
    let mut seen = std::collections::HashSet::new();
    for s in stops.into_iter().filter(|s| !s.is_empty()) {
        if seen.insert(s.clone()) {
            out.push_str(&format!("PARAMETER stop {}\n", quoted(&s)));
        }
    }
    out.push_str(&format!("PARAMETER temperature {}\n", opts.temperature));
    out.push_str(&format!("PARAMETER top_p {}\n", opts.top_p));
    out.push_str(&format!("PARAMETER top_k {}\n", opts.top_k));
    out.push_str(&format!("PARAMETER min_p {}\n", opts.min_p));
    out.push_str(&format!("PARAMETER repeat_penalty {}\n", opts.repetition_penalty));
    out.push_str(&format!("PARAMETER num_predict {}\n", opts.max_new_tokens));
    out
}

/// Where the Modelfile of a GGUF file goes: `Modelfile` in the same folder.
pub(super) fn modelfile_path(gguf: &Path) -> PathBuf {
    gguf.with_file_name("Modelfile")
}

/// Writes the `Modelfile` of an existing GGUF file next to it (its tokenizer spec read from the
/// file's metadata); refuses to overwrite one. Returns its path.
pub fn write_modelfile(gguf: &Path, opts: &SampleOptions) -> Result<PathBuf> {
    let (_, spec) = crate::model::load_tokenizer(gguf)?;
    let name = gguf.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let path = modelfile_path(gguf);
    let stage = Staged::file(&path)?;
    std::fs::write(stage.tmp_path(), ollama_modelfile(&name, &spec, opts)).map_err(|e| Error::io(stage.tmp_path(), e))?;
    sync_file(stage.tmp_path())?;
    stage.commit()?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(template: &str, bos: Option<&str>, eos: &str, add_bos: bool) -> TokenizerSpec {
        TokenizerSpec {
            bos_token: bos.map(str::to_string),
            eos_token: eos.into(),
            eos_id: 2,
            pad_id: 2,
            add_bos,
            chat_template: Some(template.into()),
        }
    }

    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
    const LLAMA3: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";
    // Llama 3.1's shape: a system block is always written, with a fixed header line.
    const ALWAYS_SYSTEM: &str = "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}{% set rest = messages[1:] %}{% else %}{% set sys = '' %}{% set rest = messages %}{% endif %}<|start_header_id|>system<|end_header_id|>\n\nToday Date: 26 Jul 2024\n\n{{ sys }}<|eot_id|>{% for m in rest %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}";
    const LLAMA2: &str = "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}";

    #[test]
    fn chatml_decomposes_per_role() {
        let g = derive_go_template(&spec(crate::data::CHATML, None, "<|im_end|>", false)).unwrap();
        assert_eq!(g.preamble, "");
        assert_eq!(g.user, ("<|im_start|>user\n".into(), "<|im_end|>\n".into()));
        assert_eq!(g.assistant, ("<|im_start|>assistant\n".into(), "<|im_end|>\n".into()));
        assert_eq!(g.system, ("<|im_start|>system\n".into(), "<|im_end|>\n".into()));
        assert_eq!(g.generation_prompt, "<|im_start|>assistant\n");
        assert_eq!(g.default_system, None);
        assert_eq!(
            g.template,
            "{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}\
             {{ if eq .Role \"system\" }}<|im_start|>system\n{{ .Content }}<|im_end|>\n\
             {{ else if eq .Role \"user\" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n\
             {{ else if eq .Role \"assistant\" }}<|im_start|>assistant\n{{ .Content }}{{ if not $last }}<|im_end|>\n{{ end }}{{ end }}\
             {{ if and $last (ne .Role \"assistant\") }}<|im_start|>assistant\n{{ end }}{{ end }}"
        );
    }

    #[test]
    fn smollm2_default_system_prompt_is_found() {
        let g = derive_go_template(&spec(SMOLLM2, Some("<|im_start|>"), "<|im_end|>", false)).unwrap();
        assert_eq!(g.default_system.as_deref(), Some("You are a helpful AI assistant named SmolLM, trained by Hugging Face"));
        assert_eq!(g.preamble, "");
        assert!(g.template.contains("{{ if and (eq $i 0) (ne .Role \"system\") }}<|im_start|>system\nYou are a helpful"));
        let mf = ollama_modelfile("m.gguf", &spec(SMOLLM2, Some("<|im_start|>"), "<|im_end|>", false), &SampleOptions::default());
        assert!(mf.contains("FROM ./m.gguf\n"), "{mf}");
        assert_eq!(mf.matches("PARAMETER stop").count(), 1, "{mf}");
        assert!(mf.contains("PARAMETER stop \"<|im_end|>\"\nPARAMETER temperature 0\nPARAMETER top_p 1\n"), "{mf}");
    }

    #[test]
    fn llama3_drops_the_bos_the_tokenizer_adds() {
        let g = derive_go_template(&spec(LLAMA3, Some("<|begin_of_text|>"), "<|eot_id|>", true)).unwrap();
        assert_eq!(g.preamble, "");
        assert_eq!(g.user.0, "<|start_header_id|>user<|end_header_id|>\n\n");
        assert_eq!(g.assistant.1, "<|eot_id|>");
        assert_eq!(g.generation_prompt, "<|start_header_id|>assistant<|end_header_id|>\n\n");
        // Without add_bos the bos token stays in the template.
        let g = derive_go_template(&spec(LLAMA3, Some("<|begin_of_text|>"), "<|eot_id|>", false)).unwrap();
        assert_eq!(g.preamble, "<|begin_of_text|>");
        assert!(g.template.starts_with("<|begin_of_text|>{{ range"));
    }

    #[test]
    fn an_always_written_system_block_becomes_an_empty_default() {
        let g = derive_go_template(&spec(ALWAYS_SYSTEM, Some("<|begin_of_text|>"), "<|eot_id|>", true)).unwrap();
        assert_eq!(g.default_system.as_deref(), Some(""));
        assert_eq!(g.system.0, "<|start_header_id|>system<|end_header_id|>\n\nToday Date: 26 Jul 2024\n\n");
        let msgs = [Message::new("user", "hi")];
        assert_eq!(
            g.emulate(&msgs),
            "<|start_header_id|>system<|end_header_id|>\n\nToday Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        );
    }

    #[test]
    fn llama2_is_refused_and_the_modelfile_says_why() {
        let s = spec(LLAMA2, Some("<s>"), "</s>", true);
        let err = derive_go_template(&s).unwrap_err().to_string();
        assert!(err.contains("cannot be written as an Ollama template"), "{err}");
        let mf = ollama_modelfile("m.gguf", &s, &SampleOptions { stop_strings: vec!["\nUser:".into()], ..SampleOptions::default() });
        assert!(!mf.contains("TEMPLATE \"\"\""), "{mf}");
        assert!(mf.contains("# No TEMPLATE ("), "{mf}");
        assert!(mf.contains("PARAMETER stop \"</s>\"\nPARAMETER stop \"\"\"\nUser:\"\"\"\n"), "{mf}");
    }

    #[test]
    fn go_action_braces_in_literal_text_are_escaped() {
        assert_eq!(go_literal("a{{b"), "a{{ \"{{\" }}b");
    }
}
