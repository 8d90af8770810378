//! `tunebench train` → `tunebench eval --run` → `tunebench chat`, end to end through the
//! binary on a temporary app data dir and the real default model: the evaluation is recorded
//! with the run (metrics, samples with references, a JSON file next to the run), chats are
//! recorded and can be resumed, and bad requests fail with clear messages.

mod common;

use std::path::Path;

use tunebench::store::Store;

use common::{fails, ok};

#[test]
fn train_then_evaluate_then_chat() {
    let home = tempfile::tempdir().unwrap();
    let home = home.path();
    let model = common::default_model();
    let cfg = home.join("run.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
name = "evalme"
seed = 5
[model]
path = "{model}"
[data]
path = "{data}"
max_len = 96
val_fraction = 0.1
val_max = 6
[peft]
method = "lora"
r = 8
lora_alpha = 16
target_modules = "all-linear"
[train]
max_steps = 12
batch_size = 4
lr = 3e-3
warmup_steps = 2
save_steps = 6
eval_steps = 6
[eval]
samples = 0
"#,
            model = model.display(),
            data = concat!(env!("CARGO_MANIFEST_DIR"), "/assets/datasets/persona/train.jsonl"),
        ),
    )
    .unwrap();
    ok(home, &["train", "--config", cfg.to_str().unwrap(), "--json", "--no-heldout"]);

    // The final adapter, as JSON.
    let out = ok(home, &["eval", "--run", "1", "--limit", "3", "--max-tokens", "24", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["step"], 12);
    assert_eq!(v["report"]["examples"], 3);
    let loss = v["report"]["val_loss"].as_f64().unwrap();
    assert!(loss.is_finite() && loss > 0.0, "{loss}");
    for k in ["bleu4", "rouge1", "rouge2", "rouge_l"] {
        let s = v["report"]["scores"][k].as_f64().unwrap();
        assert!((0.0..=100.0).contains(&s), "{k} = {s}");
    }
    let file = Path::new(v["file"].as_str().unwrap());
    assert!(file.is_file() && file.starts_with(home.join("runs")), "{}", file.display());
    // An earlier checkpoint, human-readable.
    let text = ok(home, &["eval", "--run", "1", "--checkpoint", "6", "--limit", "2", "--max-tokens", "16", "--device", "cpu"]);
    assert!(text.contains("step 6") && text.contains("BLEU-4") && text.contains("ROUGE-L"), "{text}");
    // Recorded with the run; evaluating step 12 again replaces its rows.
    ok(home, &["eval", "--run", "1", "--limit", "3", "--max-tokens", "24", "--json"]);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let s = Store::open(&home.join("tunebench.db")).await.unwrap();
        let bleu = s.series(1, "eval_bleu4").await.unwrap();
        assert_eq!(bleu.iter().map(|p| p.step).collect::<Vec<_>>(), vec![6, 12]);
        let samples = s.eval_samples(1).await.unwrap();
        assert_eq!(samples.iter().filter(|x| x.step == 12).count(), 3);
        assert_eq!(samples.iter().filter(|x| x.step == 6).count(), 2);
        assert!(samples.iter().all(|x| !x.reference.is_empty() && x.prompt.contains("user")));
        assert!(s.samples(1).await.unwrap().is_empty(), "evaluation answers are not training samples");
    });
    let e = fails(home, &["eval", "--run", "1", "--checkpoint", "5"]);
    assert!(e.contains("no checkpoint at step 5") && e.contains("12"), "{e}");
    let e = fails(home, &["eval", "--run", "9"]);
    assert!(e.contains("9"), "{e}");
    if !tunebench::device::CUDA_BUILD {
        let e = fails(home, &["eval", "--run", "1", "--device", "cuda:3"]);
        assert!(e.contains("cuda:3") && e.contains("without CUDA support"), "{e}");
    }

    // Chat: base vs tuned on one prompt, recorded; then resumed.
    let adapter = home.join("runs").join("1-evalme").join("adapter");
    assert!(adapter.join("adapter_config.json").is_file(), "final adapter at {}", adapter.display());
    let spec = format!("tuned={}", adapter.display());
    let m = model.to_str().unwrap();
    let out = ok(home, &["chat", "--model", m, "--adapter", &spec, "--compare-base", "--max-tokens", "16", "-p", "Who are you?"]);
    assert!(out.contains("[base]") && out.contains("[tuned]"), "{out}");
    let out = ok(home, &["chat", "--resume", "1", "-p", "And your maker?"]);
    assert!(out.contains("[tuned]"), "{out}");
    let list = ok(home, &["chat", "--list"]);
    assert!(list.contains("base vs tuned") && list.contains(", auto)"), "a chat answers where `auto` resolves by default: {list}");
    rt.block_on(async {
        let s = Store::open(&home.join("tunebench.db")).await.unwrap();
        let c = s.chat(1).await.unwrap();
        assert_eq!(c.turns(), 2);
        assert_eq!(c.messages.len(), 6);
    });
    // Export: the adapter, a merged HF folder, a merged GGUF with its Modelfile; never overwrite.
    let x = home.join("exports");
    std::fs::create_dir_all(&x).unwrap();
    let xs = |p: &str| x.join(p).display().to_string();
    let out = ok(home, &["export", "adapter", "--run", "1", "--out", &xs("adapter")]);
    assert!(x.join("adapter/adapter_model.safetensors").is_file(), "{out}");
    ok(home, &["export", "hf", "--run", "1", "--checkpoint", "6", "--dtype", "f32", "--out", &xs("hf")]);
    for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"] {
        assert!(x.join("hf").join(f).is_file(), "hf/{f}");
    }
    let out = ok(home, &["export", "gguf", "--run", "1", "--qtype", "q8_0", "--out", &xs("gguf/tessel.gguf")]);
    assert!(out.contains("Modelfile"), "{out}");
    let mf = std::fs::read_to_string(x.join("gguf/Modelfile")).unwrap();
    assert!(mf.contains("FROM ./tessel.gguf") && mf.contains("TEMPLATE") && mf.contains("PARAMETER stop"), "{mf}");
    let e = fails(home, &["export", "gguf", "--run", "1", "--out", &xs("gguf/tessel.gguf")]);
    assert!(e.contains("tessel.gguf"), "{e}");
    let e = fails(home, &["export", "hf", "--run", "1", "--dtype", "f8", "--out", &xs("hf2")]);
    assert!(e.contains("f8"), "{e}");
    // The exported GGUF is a model like any other: it chats, and it learned the persona.
    let out = ok(home, &["chat", "--model", &xs("gguf/tessel.gguf"), "--device", "cpu", "--max-tokens", "16", "-p", "Who are you?"]);
    assert!(!out.trim().is_empty(), "{out}");
    assert!(ok(home, &["chat", "--list"]).contains("tessel.gguf, cpu)"));
    let e = fails(home, &["chat", "--model", m, "--device", "tpu", "-p", "hi"]);
    assert!(e.contains("`tpu` is not a device"), "{e}");

    let e = fails(home, &["chat", "--model", m, "--adapter", "/nonexistent/adapter", "-p", "hi"]);
    assert!(e.contains("/nonexistent/adapter"), "{e}");
    let e = fails(home, &["chat", "--model", m, "-p", "   "]);
    assert!(e.contains("empty"), "{e}");
    let e = fails(home, &["chat", "-p", "hi"]);
    assert!(e.contains("does not exist"), "the default model of an empty app dir is missing: {e}");
}

/// `tunebench logits`: a random-init shape's full-sequence logits equal the ones generation
/// computes token by token through the KV cache (`--decode`) — the pair `bench/gpu_session.sh`
/// compares between a GPU and the CPU; bad ids and a device this build lacks fail clearly.
#[test]
fn logits_full_and_token_by_token_agree() {
    let home = tempfile::tempdir().unwrap();
    let home = home.path();
    let ids = home.join("ids.json");
    std::fs::write(&ids, "[[1, 5, 9, 200, 31, 7, 7, 300, 12, 0, 45, 99], [3, 4]]").unwrap();
    let read = |name: &str, extra: &[&str]| {
        let out = home.join(name);
        let mut args = vec!["logits", "--shape", "tiny", "--tokens", ids.to_str().unwrap(), "--out", out.to_str().unwrap()];
        args.extend_from_slice(extra);
        ok(home, &args);
        candle_core::safetensors::load(&out, &candle_core::Device::Cpu).unwrap()
    };
    let (full, decoded) = (read("full.safetensors", &[]), read("decoded.safetensors", &["--decode", "--device", "cpu"]));
    for k in ["logits.0", "logits.1"] {
        let (a, b) = (&full[k], &decoded[k]);
        assert_eq!(a.dims(), b.dims(), "{k}");
        assert_eq!(a.dim(1).unwrap(), 512, "{k}: the tiny shape's vocabulary");
        let diff = (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        let scale = a.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(diff <= 1e-5 * scale, "{k}: {diff} of {scale}");
    }
    // The projections held as quantized blocks (what a GGUF model is for chat): the quantized
    // inference kernels, full == token by token, near the dense logits but not equal to them.
    for b in ["q4_1", "q8_0", "q4_0"] {
        let full_q = read(&format!("full-{b}.safetensors"), &["--blocks", b]);
        let decoded_q = read(&format!("decoded-{b}.safetensors"), &["--blocks", b, "--decode"]);
        for k in ["logits.0", "logits.1"] {
            let rel = |a: &candle_core::Tensor, b: &candle_core::Tensor| {
                let diff = (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
                diff / a.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
            };
            assert!(rel(&full_q[k], &decoded_q[k]) <= 1e-5, "{b} {k}: full vs decoded {}", rel(&full_q[k], &decoded_q[k]));
            let off = rel(&full[k], &full_q[k]);
            assert!(off > 1e-4 && off < 0.5, "{b} {k}: the blocks' logits are {off} (relative) from the dense ones");
        }
    }
    let e = fails(home, &["logits", "--shape", "tiny", "--blocks", "q4_k", "--tokens", ids.to_str().unwrap(), "--out", home.join("x").to_str().unwrap()]);
    assert!(e.contains("--blocks") && e.contains("rows of 64 values do not split into q4_k blocks of 256"), "{e}");
    let e = fails(home, &["logits", "--shape", "tiny", "--blocks", "q5", "--tokens", ids.to_str().unwrap(), "--out", home.join("x").to_str().unwrap()]);
    assert!(e.contains("--blocks") && e.contains("`q5` is not a block type"), "{e}");
    std::fs::write(&ids, "[[1, 999]]").unwrap();
    let e = fails(home, &["logits", "--shape", "tiny", "--tokens", ids.to_str().unwrap(), "--out", home.join("x").to_str().unwrap()]);
    assert!(e.contains("ids.json") && e.contains("token 999 outside the vocabulary of 512"), "{e}");
    if !tunebench::device::CUDA_BUILD {
        let e = fails(home, &["logits", "--shape", "tiny", "--tokens", ids.to_str().unwrap(), "--out", "x", "--device", "cuda:0"]);
        assert!(e.contains("without CUDA support"), "{e}");
        for args in [&["generate", "--prompt", "Hi", "--device", "cuda:1"][..], &["eval", "--device", "cuda"]] {
            let e = fails(home, args);
            assert!(e.contains("without CUDA support"), "{args:?}: {e}");
        }
    }
    let e = fails(home, &["generate", "--prompt", "Hi", "--device", "tpu"]);
    assert!(e.contains("--device") && e.contains("tpu"), "{e}");
}
