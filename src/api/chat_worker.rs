//! The chat model runs in its own process, `tunebench worker chat`, as training does: a crash
//! or an out-of-memory while answering ends that process, never the app. The workbench keeps
//! one such worker (with the last model and its adapters loaded) and talks to it in JSON lines:
//!
//! - to the worker (stdin): [`ChatRequest::Reply`] (model, device, adapters, who answers, the
//!   conversation, sampling) and [`ChatRequest::Cancel`] (ends the answer in progress);
//! - from the worker (stdout): [`ChatEvent::Text`] pieces, then [`ChatEvent::Done`] with the
//!   answer and its timings, or [`ChatEvent::Error`] (bad input; the worker goes on).
//!
//! A worker that dies is noticed by the end of its stdout: the answer in progress fails with
//! the exit status and the tail of its stderr, and the next message starts a new worker.
//! The worker exits when its stdin closes (the app went away).

use std::collections::VecDeque;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};

use super::chat::ChatAnswer;
use crate::data::Message;
use crate::infer::chat::ChatModel;
use crate::infer::SampleOptions;
use crate::store::ChatAdapter;
use crate::{Error, Result};

/// Lines of the worker's stderr kept for error messages.
const STDERR_TAIL: usize = 20;

/// A request to the chat worker.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ChatRequest {
    /// Answer `messages` with `model` and `variant` (None = the base) active.
    Reply {
        /// Request id, echoed in the events.
        id: u64,
        /// The model file or folder (reloaded only when it or the device changes).
        model: PathBuf,
        /// Where the model answers: `auto`, `cpu`, `cuda` or `cuda:N`.
        #[serde(default = "cpu")]
        device: String,
        /// Adapters the model should hold (loaded, replaced or kept as they are).
        adapters: Vec<ChatAdapter>,
        /// Who answers.
        variant: Option<String>,
        /// The conversation, ending with the user's message.
        messages: Vec<Message>,
        /// Sampling settings.
        sampling: SampleOptions,
        /// Cancelled before it was sent: answered at once with no tokens, finish `cancelled`.
        #[serde(default)]
        cancelled: bool,
    },
    /// Ends the answer in progress (what was generated is kept, finish = `cancelled`).
    Cancel,
}

fn cpu() -> String {
    "cpu".into()
}

/// What the chat worker reports.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ChatEvent {
    /// A piece of the answer.
    Text {
        /// Request id.
        id: u64,
        /// New text.
        text: String,
    },
    /// The answer is complete.
    Done {
        /// Request id.
        id: u64,
        /// The answer, its finish reason and timings.
        answer: ChatAnswer,
    },
    /// The request failed (the worker stays up).
    Error {
        /// Request id.
        id: u64,
        /// Why.
        message: String,
    },
}

impl ChatEvent {
    /// The request this event answers.
    pub fn id(&self) -> u64 {
        match self {
            ChatEvent::Text { id, .. } | ChatEvent::Done { id, .. } | ChatEvent::Error { id, .. } => *id,
        }
    }
}

/// `tunebench worker chat`: reads requests from `input` until it closes, writes events to
/// `output`. Cancel requests are read while an answer is generated.
pub fn run_chat_worker(input: impl BufRead + Send + 'static, mut output: impl Write) -> Result<()> {
    let cancel = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel::<ChatRequest>();
    let flag = cancel.clone();
    std::thread::spawn(move || {
        for line in input.lines() {
            let Ok(line) = line else { break };
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<ChatRequest>(&line) {
                Ok(ChatRequest::Cancel) => flag.store(true, Ordering::SeqCst),
                Ok(r) => {
                    // Requests come one at a time (the next after the previous one's end): a
                    // cancel read after this line is for this request.
                    flag.store(matches!(r, ChatRequest::Reply { cancelled: true, .. }), Ordering::SeqCst);
                    if tx.send(r).is_err() {
                        break;
                    }
                }
                Err(e) => eprintln!("chat worker: ignoring an unreadable request ({e}): {line}"),
            }
        }
        // The app went away: stop the answer in progress; the loop ends with the channel.
        flag.store(true, Ordering::SeqCst);
    });
    let mut slot: Option<Loaded> = None;
    while let Ok(req) = rx.recv() {
        let ChatRequest::Reply { id, model, device, adapters, variant, messages, sampling, .. } = req else { continue };
        let mut write_err = None;
        let result = (|| -> Result<ChatEvent> {
            let m = prepare(&mut slot, &model, &device, &adapters)?;
            m.use_adapter(variant.as_deref())?;
            let g = m.reply(&messages, &sampling, Some(&cancel), |piece| {
                if write_err.is_none() {
                    write_err = emit(&ChatEvent::Text { id, text: piece.to_string() }, &mut output).err();
                }
            })?;
            Ok(ChatEvent::Done {
                id,
                answer: ChatAnswer {
                    variant: variant.clone(),
                    finish: serde_json::to_value(g.generation.finish).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default(),
                    prompt_tokens: g.generation.prompt_tokens,
                    new_tokens: g.generation.tokens.len(),
                    ttft_s: g.generation.ttft_s,
                    decode_tok_s: g.generation.decode_tok_s(),
                    device: crate::device::describe(m.loaded.model.device()),
                    text: g.text,
                },
            })
        })();
        if let Some(e) = write_err {
            return Err(e); // stdout is gone: nobody is listening
        }
        let event = result.unwrap_or_else(|e| ChatEvent::Error { id, message: answer_error(&e, &device) });
        emit(&event, &mut output)?;
    }
    Ok(())
}

fn emit(e: &ChatEvent, out: &mut impl Write) -> Result<()> {
    let line = serde_json::to_string(e).map_err(|e| Error::Msg(e.to_string()))?;
    writeln!(out, "{line}").and_then(|_| out.flush()).map_err(|e| Error::Msg(format!("chat worker: cannot write to stdout: {e}")))
}

/// A failed answer in words; running out of device memory says what to do about it.
fn answer_error(e: &Error, device: &str) -> String {
    if crate::device::is_out_of_memory(e) {
        format!(
            "{e}. The chat's device ({device}) ran out of memory: start a chat on the cpu, or stop the training run that holds this GPU, then ask again"
        )
    } else {
        e.to_string()
    }
}

/// The model the worker holds: its path, the device spec it was asked for, and the model.
type Loaded = (PathBuf, String, ChatModel);

/// The model for a request: reused when the path and device are the same (loading only the
/// adapters it lacks or whose folder changed), loaded afresh otherwise (the old one is dropped
/// first, so a device's memory holds one model at a time).
fn prepare<'a>(slot: &'a mut Option<Loaded>, path: &Path, device: &str, adapters: &[ChatAdapter]) -> Result<&'a mut ChatModel> {
    if slot.as_ref().map(|(p, d, _)| p != path || d != device).unwrap_or(true) {
        *slot = None;
        let dev = crate::device::open(device, "device")?;
        let m = ChatModel::open(path, &dev)?;
        *slot = Some((path.to_path_buf(), device.to_string(), m));
    }
    let (_, _, model) = slot.as_mut().ok_or_else(|| Error::Msg("chat model not loaded".into()))?;
    for a in adapters {
        match model.adapter_path(&a.name) {
            Some(p) if p == Path::new(&a.path) => {}
            Some(_) => {
                model.remove_adapter(&a.name)?;
                model.add_adapter(Path::new(&a.path), Some(&a.name))?;
            }
            None => {
                model.add_adapter(Path::new(&a.path), Some(&a.name))?;
            }
        }
    }
    Ok(model)
}

/// The workbench's handle on a running chat worker.
pub(crate) struct ChatWorker {
    child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
    next_id: u64,
    /// A request was sent and its end not read: its caller went away mid-answer.
    busy: bool,
}

impl ChatWorker {
    /// Starts `exe worker chat`.
    pub(crate) fn spawn(exe: &Path) -> Result<ChatWorker> {
        let mut child = tokio::process::Command::new(exe)
            .args(["worker", "chat"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group: a terminal's Ctrl-C (which `tunebench chat` turns into a
            // cancel) must not reach the worker.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| Error::Msg(format!("cannot start the chat worker {}: {e}", exe.display())))?;
        let (Some(stdin), Some(stdout), Some(stderr)) = (child.stdin.take(), child.stdout.take(), child.stderr.take()) else {
            return Err(Error::Msg("chat worker: no pipes".into()));
        };
        let stderr_tail = Arc::new(Mutex::new(VecDeque::new()));
        let tail = stderr_tail.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let mut t = tail.lock().unwrap_or_else(|p| p.into_inner());
                if t.len() == STDERR_TAIL {
                    t.pop_front();
                }
                t.push_back(line);
            }
        });
        Ok(ChatWorker { child, stdin, stdout: BufReader::new(stdout).lines(), stderr_tail, next_id: 0, busy: false })
    }

    /// The worker's process id.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// True when a request was abandoned mid-answer (its future dropped): the worker may still
    /// be generating it, so the caller replaces the worker rather than wait behind it.
    pub(crate) fn abandoned(&self) -> bool {
        self.busy
    }

    /// Sends a reply request and follows it to its end: `on_text` sees each piece; `cancel`
    /// (polled) is forwarded to the worker once. A worker that dies fails the request with
    /// its exit status and stderr; the caller then drops this handle.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn reply(
        &mut self,
        model: &Path,
        device: &str,
        adapters: &[ChatAdapter],
        variant: Option<String>,
        messages: Vec<Message>,
        sampling: &SampleOptions,
        cancel: &AtomicBool,
        mut on_text: impl FnMut(&str),
    ) -> std::result::Result<ChatEvent, WorkerGone> {
        self.next_id += 1;
        let id = self.next_id;
        let cancelled = cancel.load(Ordering::SeqCst);
        let req = ChatRequest::Reply {
            id,
            model: model.to_path_buf(),
            device: device.to_string(),
            adapters: adapters.to_vec(),
            variant,
            messages,
            sampling: sampling.clone(),
            cancelled,
        };
        let line = serde_json::to_string(&req).map_err(|e| WorkerGone(format!("cannot encode the request: {e}")))?;
        if let Err(e) = self.send(&line).await {
            return Err(self.died(&format!("could not be written to ({e})")).await);
        }
        self.busy = true;
        let mut sent_cancel = cancelled;
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        loop {
            tokio::select! {
                line = self.stdout.next_line() => {
                    let line = match line {
                        Ok(Some(l)) => l,
                        Ok(None) => return Err(self.died("stopped").await),
                        Err(e) => return Err(self.died(&format!("could not be read ({e})")).await),
                    };
                    match serde_json::from_str::<ChatEvent>(&line) {
                        Ok(e) if e.id() != id => {}
                        Ok(ChatEvent::Text { text, .. }) => on_text(&text),
                        Ok(e) => {
                            self.busy = false;
                            return Ok(e);
                        }
                        Err(_) => tracing::warn!("chat worker printed: {line}"),
                    }
                }
                _ = tick.tick(), if !sent_cancel => {
                    if cancel.load(Ordering::Relaxed) {
                        sent_cancel = true;
                        let line = serde_json::to_string(&ChatRequest::Cancel).unwrap_or_default();
                        if let Err(e) = self.send(&line).await {
                            return Err(self.died(&format!("could not be written to ({e})")).await);
                        }
                    }
                }
            }
        }
    }

    async fn send(&mut self, line: &str) -> std::io::Result<()> {
        self.stdin.write_all(line.as_bytes()).await?;
        self.stdin.write_all(b"\n").await?;
        self.stdin.flush().await
    }

    /// The error for a worker that stopped answering: its exit status (waited for briefly)
    /// and the end of its stderr.
    async fn died(&mut self, what: &str) -> WorkerGone {
        let how = match tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await {
            Ok(Ok(s)) => super::supervisor::describe_exit(s),
            Ok(Err(e)) => format!("could not be waited for ({e})"),
            Err(_) => {
                let _ = self.child.start_kill();
                "did not exit and was killed".to_string()
            }
        };
        // Let the stderr reader take the last lines.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let tail: Vec<String> = self.stderr_tail.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned().collect();
        let mut msg = format!("the chat worker {what} while answering: it {how}");
        if !tail.is_empty() {
            msg.push_str(": ");
            msg.push_str(&tail.join("\n"));
        }
        WorkerGone(msg)
    }
}

/// A chat worker that can no longer be used, and why.
#[derive(Debug)]
pub(crate) struct WorkerGone(pub String);
