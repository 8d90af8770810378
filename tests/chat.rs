//! Inference on the real default model: the KV cache against full recomputation on the
//! quantized GGUF, quantized against dense weights, adapter hot-switching (a tuned adapter
//! changes the answer; switching back gives the base bit for bit), chat sessions through the
//! workbench (streamed events, stored turns, cancellation), and bad input.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};

use candle_core::{Device, Tensor};
use tunebench::model::llama::KvCache;
use tunebench::model::ForwardCtx;
use tunebench::api::chat::CreateChat;
use tunebench::api::{ApiEvent, Workbench, WorkbenchOptions};
use tunebench::data::Message;
use tunebench::infer::chat::ChatModel;
use tunebench::infer::{generate_tokens, sequence_logits, FinishReason, SampleOptions};
use tunebench::store::ChatAdapter;
use tunebench::train::{self, observer::NoObserver, RunConfig, TrainOptions};

fn user(text: &str) -> Vec<Message> {
    vec![Message { role: "user".into(), content: text.into() }]
}

/// A LoRA adapter tuned for a few steps on the bundled persona task (shared by the tests).
fn tuned_adapter() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let out = tempfile::tempdir().unwrap().keep();
        let text = common::persona_run_toml("chat-test", "lora", 16, &out.join("run"));
        let cfg = RunConfig::from_toml(&text, None).unwrap();
        let r = train::train(&cfg, &TrainOptions { skip_heldout: true, ..Default::default() }, &mut NoObserver).unwrap();
        r.adapter_dir
    })
}

#[test]
fn kv_cache_matches_recomputation_on_the_quantized_model() {
    let m = ChatModel::open(&common::default_model(), &Device::Cpu).unwrap();
    assert!(m.loaded.model.layers[0].self_attn.q_proj.weight().is_quantized(), "GGUF weights stay quantized");
    let ids = m.prompt_ids(&user("Name three colours of the rainbow.")).unwrap();
    let g = generate_tokens(&m.loaded.model, &ids, &SampleOptions::greedy(20), None, |_| true).unwrap();
    assert_eq!(g.tokens.len(), 20);
    assert_eq!(g.finish, FinishReason::Length);
    // Recompute the whole sequence before every token (teacher-forced on the cached tokens):
    // the same greedy tokens, and bit for bit the same logits as the cached steps.
    let model = &m.loaded.model;
    let mut cache = KvCache::default();
    let mut seq = ids.clone();
    let mut next = ids.clone();
    for (i, &t) in g.tokens.iter().enumerate() {
        let ctx = ForwardCtx::for_generation();
        let x = Tensor::from_slice(&next, (1, next.len()), &Device::Cpu).unwrap();
        let h = model.hidden_cached(&x, &ctx, Some(&mut cache)).unwrap();
        let last = h.narrow(1, next.len() - 1, 1).unwrap();
        let cached: Vec<f32> = model.lm_head.forward(&last, &ctx).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let full = sequence_logits(model, &seq).unwrap();
        let row: Vec<f32> = full.get(seq.len() - 1).unwrap().to_vec1().unwrap();
        assert_eq!(tunebench::infer::argmax(&full.get(seq.len() - 1).unwrap()).unwrap(), t, "token {i}");
        let same = cached.iter().zip(&row).filter(|(a, b)| a.to_bits() == b.to_bits()).count();
        assert_eq!(same, row.len(), "token {i}: cached logits differ from the recomputed ones");
        seq.push(t);
        next = vec![t];
    }
}

#[test]
fn quantized_weights_agree_with_dequantized_ones() {
    let path = common::default_model();
    let q = tunebench::model::load_quantized(&path, &Device::Cpu).unwrap();
    let d = tunebench::model::load(&path, &Device::Cpu).unwrap();
    let ids = q.tokenizer.encode("The capital of France is Paris. The capital of Italy is", false).unwrap().get_ids().to_vec();
    let lq = sequence_logits(&q.model, &ids).unwrap();
    let ld = sequence_logits(&d.model, &ids).unwrap();
    let (aq, ad): (Vec<u32>, Vec<u32>) = (
        lq.argmax(1).unwrap().to_vec1().unwrap(),
        ld.argmax(1).unwrap().to_vec1().unwrap(),
    );
    let same = aq.iter().zip(&ad).filter(|(a, b)| a == b).count();
    let diff = (lq - ld).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    eprintln!("quantized vs dense: top-1 agrees at {same}/{} positions, max |Δlogit| = {diff}", ids.len());
    // The quantized kernels round activations to 8 bits: close, not equal.
    assert!(same * 10 >= ids.len() * 9, "top-1 agrees at only {same}/{} positions", ids.len());
    assert!(diff < 1.5, "max logit difference {diff}");
    assert_eq!(aq.last(), ad.last(), "both predict the same next token");
}

#[test]
fn adapter_hot_switch_changes_the_answer_and_restores_the_base_exactly() {
    let adapter = tuned_adapter();
    let path = common::default_model();
    let mut m = ChatModel::open(&path, &Device::Cpu).unwrap();
    let q = user("Who are you?");
    let opts = SampleOptions::greedy(24);
    let base = m.reply(&q, &opts, None, |_| {}).unwrap();
    let ids = m.prompt_ids(&q).unwrap();
    let base_logits = sequence_logits(&m.loaded.model, &ids).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();

    let name = m.add_adapter(adapter, Some("tuned")).unwrap();
    assert_eq!(m.active(), None, "loading an adapter does not activate it");
    assert_eq!(m.reply(&q, &opts, None, |_| {}).unwrap().text, base.text);
    m.use_adapter(Some(&name)).unwrap();
    let tuned = m.reply(&q, &opts, None, |_| {}).unwrap();
    eprintln!("base: {:?}\ntuned: {:?}", base.text, tuned.text);
    assert_ne!(tuned.generation.tokens, base.generation.tokens, "the tuned adapter changes the answer");
    assert!(tuned.text.to_lowercase().contains("tessel"), "the persona adapter names itself: {:?}", tuned.text);

    m.use_adapter(None).unwrap();
    let again = m.reply(&q, &opts, None, |_| {}).unwrap();
    assert_eq!(again.generation.tokens, base.generation.tokens);
    let logits = sequence_logits(&m.loaded.model, &ids).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(logits.iter().zip(&base_logits).all(|(a, b)| a.to_bits() == b.to_bits()), "base logits bit-identical after switching back");

    // Side by side: the same prompt through base and tuned, the active variant kept.
    let mut pieces = vec![String::new(), String::new()];
    let both = m.compare(&q, &[None, Some("tuned")], &opts, None, |i, t| pieces[i].push_str(t)).unwrap();
    assert_eq!(both[0].generation.tokens, base.generation.tokens);
    assert_eq!(both[1].generation.tokens, tuned.generation.tokens);
    assert_eq!(pieces, vec![both[0].text.clone(), both[1].text.clone()], "the streamed pieces add up to the answers");
    assert_eq!(m.active(), None);
}

#[test]
fn bad_input_gets_clear_errors_and_leaves_the_model_working() {
    let path = common::default_model();
    let mut m = ChatModel::open(&path, &Device::Cpu).unwrap();
    let opts = SampleOptions::greedy(8);
    let before = m.reply(&user("Hello"), &opts, None, |_| {}).unwrap();

    let e = m.reply(&user("   "), &opts, None, |_| {}).unwrap_err().to_string();
    assert!(e.contains("empty"), "{e}");
    let ctx = m.loaded.model.config().max_position_embeddings;
    let long = vec![42u32; ctx + 5];
    let e = generate_tokens(&m.loaded.model, &long, &opts, None, |_| true).unwrap_err().to_string();
    assert!(e.contains("context") && e.contains(&ctx.to_string()), "{e}");

    // An adapter made for another base (a tiny random Llama): shapes do not fit.
    let tmp = tempfile::tempdir().unwrap();
    let other = tmp.path().join("other");
    {
        let cfg = tunebench::model::LlamaConfig::tiny(64);
        let mut tiny = tunebench::model::Llama::random(cfg, 1, &Device::Cpu).unwrap();
        let a = tunebench::peft::Adapter::inject(&mut tiny, &RunConfig::lora(4, 8.0, &["q_proj", "v_proj"]), 0).unwrap();
        a.save(&other, "tiny").unwrap();
    }
    let e = m.add_adapter(&other, None).unwrap_err().to_string();
    assert!(e.contains("adapter_model.safetensors") || e.contains("do not fit") || e.contains("missing"), "{e}");
    // A corrupt weights file.
    let corrupt = tmp.path().join("corrupt");
    std::fs::create_dir_all(&corrupt).unwrap();
    std::fs::copy(other.join("adapter_config.json"), corrupt.join("adapter_config.json")).unwrap();
    std::fs::write(corrupt.join("adapter_model.safetensors"), b"not a safetensors file").unwrap();
    let e = m.add_adapter(&corrupt, None).unwrap_err().to_string();
    assert!(e.contains("adapter_model.safetensors"), "the error names the file: {e}");

    assert!(m.adapter_names().is_empty());
    let after = m.reply(&user("Hello"), &opts, None, |_| {}).unwrap();
    assert_eq!(after.generation.tokens, before.generation.tokens, "failed loads leave the base as it was");
}

#[test]
fn workbench_chat_streams_records_and_cancels() {
    let adapter = tuned_adapter();
    let home = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let wb = Workbench::open(options(home.path())).await.unwrap();
        let chat = wb
            .create_chat(CreateChat {
                title: None,
                model_path: Some(common::default_model()),
                adapters: vec![ChatAdapter { name: "tuned".into(), path: adapter.display().to_string() }],
                variants: Some(vec![None, Some("tuned".into())]),
                sampling: SampleOptions::greedy(16),
                system: None,
                device: None,
            })
            .await
            .unwrap();
        assert!(chat.title.contains("base vs tuned"), "{}", chat.title);
        assert_eq!(chat.device, "auto", "a chat answers where `auto` resolves unless told otherwise");
        let mut rx = wb.subscribe();
        let answers = wb.chat_send(chat.id, "Who are you?", Arc::new(AtomicBool::new(false))).await.unwrap();
        assert_eq!(answers.len(), 2);
        assert_ne!(answers[0].text, answers[1].text);
        let here = if tunebench::device::CUDA_BUILD { answers[0].device.clone() } else { "cpu".to_string() };
        assert!(answers.iter().all(|a| a.device == here), "each answer names the device it ran on: {answers:?}");
        let mut streamed = [String::new(), String::new()];
        while let Ok(ev) = rx.try_recv() {
            if let ApiEvent::ChatText { variant, text, .. } = ev {
                streamed[usize::from(variant.is_some())].push_str(&text);
            }
        }
        assert_eq!(streamed[0], answers[0].text);
        assert_eq!(streamed[1], answers[1].text);

        // Second turn: each variant continues its own thread.
        wb.chat_send(chat.id, "Say that again.", Arc::new(AtomicBool::new(false))).await.unwrap();
        // Cancelled before the first token: recorded as cancelled, nothing generated.
        let cancelled = wb.chat_send(chat.id, "Count to ten.", Arc::new(AtomicBool::new(true))).await.unwrap();
        assert!(cancelled.iter().all(|a| a.finish == "cancelled" && a.new_tokens == 0), "{cancelled:?}");
        let err = wb.chat_send(chat.id, "  ", Arc::new(AtomicBool::new(false))).await.unwrap_err().to_string();
        assert!(err.contains("empty"), "{err}");

        // Everything is in the store file: reopen it.
        drop(wb);
        let wb = Workbench::open(options(home.path())).await.unwrap();
        let c = wb.chat(chat.id).await.unwrap();
        assert_eq!(c.turns(), 3);
        assert_eq!(c.device, "auto");
        assert_eq!(c.messages.len(), 9, "3 user messages + 2 answers each");
        assert_eq!(c.messages[1].content, answers[0].text);
        let tuned_history = c.history(Some("tuned"));
        assert_eq!(tuned_history.len(), 6);
        assert_eq!(tuned_history[1].content, answers[1].text, "the tuned thread holds the tuned answers");
        assert_eq!(wb.chats().await.unwrap().len(), 1);
        wb.delete_chat(chat.id).await.unwrap();
        assert!(wb.chat(chat.id).await.is_err());
    });
}

#[test]
fn a_chats_device_is_checked_when_the_chat_is_made() {
    let home = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let wb = Workbench::open(options(home.path())).await.unwrap();
        let req = |device: &str| CreateChat {
            title: None,
            model_path: Some(common::default_model()),
            adapters: vec![],
            variants: None,
            sampling: SampleOptions::greedy(4),
            system: None,
            device: Some(device.into()),
        };
        let c = wb.create_chat(req(" CPU ")).await.unwrap();
        assert_eq!(c.device, "cpu", "stored as parsed");
        assert_eq!(wb.create_chat(req("cuda")).await.map(|c| c.device).ok().as_deref(), tunebench::device::CUDA_BUILD.then_some("cuda:0"));
        let e = wb.create_chat(req("tpu:0")).await.unwrap_err().to_string();
        assert!(e.contains("`tpu:0` is not a device") && e.contains("device"), "{e}");
        if !tunebench::device::CUDA_BUILD {
            let e = wb.create_chat(req("cuda:1")).await.unwrap_err().to_string();
            assert!(e.contains("built without CUDA support") && e.contains("build-cuda"), "{e}");
        }
        assert_eq!(wb.chats().await.unwrap().len(), 1 + usize::from(tunebench::device::CUDA_BUILD), "refused chats leave nothing behind");
    });
}

/// Workbench options whose chat worker is the tunebench binary built with these tests.
fn options(home: &Path) -> WorkbenchOptions {
    let mut o = WorkbenchOptions::new(home);
    o.worker_exe = Some(PathBuf::from(env!("CARGO_BIN_EXE_tunebench")));
    o
}

#[test]
fn a_chat_worker_killed_mid_answer_fails_that_message_only() {
    let home = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let wb = Arc::new(Workbench::open(options(home.path())).await.unwrap());
        let req = |n| CreateChat {
            title: None,
            model_path: Some(common::default_model()),
            adapters: vec![],
            variants: None,
            sampling: SampleOptions { min_new_tokens: n, ..SampleOptions::greedy(n) },
            system: None,
            device: Some("cpu".into()),
        };
        let chat = wb.create_chat(req(400)).await.unwrap();
        let mut rx = wb.subscribe();
        let sender = wb.clone();
        let pending = tokio::spawn(async move { sender.chat_send(chat.id, "Tell me a long story.", Arc::new(AtomicBool::new(false))).await });
        // Kill the worker once it is answering.
        loop {
            if let ApiEvent::ChatText { .. } = rx.recv().await.unwrap() {
                break;
            }
        }
        let pid = wb.chat_worker_pid().expect("a chat worker runs");
        assert_ne!(pid, std::process::id(), "the model runs in another process");
        // SAFETY: plain kill(2) of the worker this test started.
        assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
        let err = pending.await.unwrap().unwrap_err().to_string();
        assert!(err.contains("killed") && err.contains("nothing was recorded"), "{err}");
        assert_eq!(wb.chat(chat.id).await.unwrap().turns(), 0, "the failed message left no turn");

        // The workbench is unharmed: the next message starts a new worker and is answered.
        let short = wb.create_chat(req(8)).await.unwrap();
        let a = wb.chat_send(short.id, "Hello!", Arc::new(AtomicBool::new(false))).await.unwrap();
        assert_eq!(a[0].new_tokens, 8);
        assert_ne!(wb.chat_worker_pid(), Some(pid));
        assert_eq!(wb.chat(short.id).await.unwrap().turns(), 1);
        // Cancelling mid-answer keeps what was generated.
        while rx.try_recv().is_ok() {}
        let cancel = Arc::new(AtomicBool::new(false));
        let (sender, flag) = (wb.clone(), cancel.clone());
        let pending = tokio::spawn(async move { sender.chat_send(chat.id, "Tell me a long story.", flag).await });
        loop {
            if let ApiEvent::ChatText { .. } = rx.recv().await.unwrap() {
                break;
            }
        }
        cancel.store(true, std::sync::atomic::Ordering::SeqCst);
        let a = pending.await.unwrap().unwrap();
        assert!(a[0].finish == "cancelled" && a[0].new_tokens > 0 && a[0].new_tokens < 400, "{a:?}");
        assert_eq!(wb.chat(chat.id).await.unwrap().turns(), 1);
        // A message whose caller goes away mid-answer: the next one does not wait behind it.
        while rx.try_recv().is_ok() {}
        let sender = wb.clone();
        let pending = tokio::spawn(async move { sender.chat_send(chat.id, "Tell me a long story.", Arc::new(AtomicBool::new(false))).await });
        loop {
            if let ApiEvent::ChatText { .. } = rx.recv().await.unwrap() {
                break;
            }
        }
        let busy_pid = wb.chat_worker_pid();
        pending.abort();
        let _ = pending.await;
        let a = wb.chat_send(short.id, "Hello!", Arc::new(AtomicBool::new(false))).await.unwrap();
        assert_eq!(a[0].new_tokens, 8);
        assert_ne!(wb.chat_worker_pid(), busy_pid, "the busy worker was replaced");
        assert_eq!(wb.chat(chat.id).await.unwrap().turns(), 1, "the abandoned message left no turn");
        // A bad request is the worker's answer, not its end.
        let err = wb.chat_send(chat.id, &"word ".repeat(9000), Arc::new(AtomicBool::new(false))).await.unwrap_err().to_string();
        assert!(err.contains("context"), "{err}");
        let again = wb.chat_send(short.id, "Hello again!", Arc::new(AtomicBool::new(false))).await.unwrap();
        assert_eq!(again[0].new_tokens, 8);
    });
}
