//! Merge and export on the real default model (SmolLM2-135M-Instruct Q4_1 GGUF) with a LoRA
//! adapter on every projection (random non-zero B):
//! (a) the merged model computes what base + adapter computes;
//! (b) the exported HF folder re-loads with the same logits (f32: equal; bf16: close), its
//!     tokenizer encodes like the GGUF's, and a HF-folder source exports to GGUF with the
//!     original tokenizer metadata;
//! (c) exported GGUFs (f16, q8_0, q4_0, q4_k) re-load (dense and quantized) and decode greedily
//!     like the merged model (f16/q8_0: identical tokens; 4-bit: agreement reported, bounded),
//!     with llama.cpp metadata, types and q/k row layout;
//! (d) overwriting, unwritable destinations and corrupt adapters fail clearly and leave
//!     nothing behind;
//! (e) a full fine-tuning "adapter" exports as a plain HF model with the tuned logits.
//! `export_for_python` writes the exports for tests/reference/export_check.py (PyTorch
//! transformers, llama.cpp) when TUNEBENCH_EXPORT_DIR is set.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Instant;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{Device, Tensor};
use tunebench::data::{ChatTemplate, Message};
use tunebench::export::{self, GgufType, HfDtype};
use tunebench::infer::{self, SampleOptions};
use tunebench::model::{self, LoadedModel, Llama};
use tunebench::peft::{Adapter, LoraConfig, PeftConfig, TargetModules};

const NEW_TOKENS: usize = 16;

struct Fixture {
    /// Kept for the whole test process (under the target folder).
    root: PathBuf,
    adapter: PathBuf,
    merged: LoadedModel,
    prompts: Vec<Vec<u32>>,
    /// Greedy continuations of the merged model.
    greedy: Vec<Vec<u32>>,
    /// Logits of base + adapter (not merged), per prompt.
    unmerged_logits: Vec<Tensor>,
    base_logits: Vec<Tensor>,
}

static FIXTURE: OnceLock<Fixture> = OnceLock::new();

fn fixture() -> &'static Fixture {
    FIXTURE.get_or_init(|| {
        let model_path = common::default_model();
        let root = fixture_root();
        let adapter = root.join("adapter");
        let mut m = model::load(&model_path, &Device::Cpu).unwrap();
        let prompts = prompts(&m);
        let base_logits = prompts.iter().map(|p| infer::sequence_logits(&m.model, p).unwrap()).collect();
        make_lora(&mut m.model, &adapter, &model_path);
        let unmerged_logits = prompts.iter().map(|p| infer::sequence_logits(&m.model, p).unwrap()).collect();
        drop(m);
        let merged = export::load_merged(&model_path, Some(&adapter)).unwrap();
        let greedy = prompts.iter().map(|p| greedy(&merged.model, p)).collect();
        Fixture { root, adapter, merged, prompts, greedy, unmerged_logits, base_logits }
    })
}

/// `<target tmp>/export-test-<pid>`: the fixture lives as long as the test process; folders of
/// processes that are gone are removed first (each test also removes its large exports).
fn fixture_root() -> PathBuf {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    for e in std::fs::read_dir(tmp).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(pid) = name.strip_prefix("export-test-").and_then(|p| p.parse::<u32>().ok()) {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    let root = tmp.join(format!("export-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    root
}

/// A LoRA (r 8, alpha 16) on all seven projections with B uniform in ±0.0346 (std 0.02),
/// seeded, saved in PEFT's format.
fn make_lora(model: &mut Llama, dir: &Path, base: &Path) {
    use rand::{Rng, SeedableRng};
    let cfg = PeftConfig::Lora(LoraConfig { r: 8, lora_alpha: 16.0, target_modules: TargetModules::Keyword("all-linear".into()), ..Default::default() });
    let a = Adapter::inject(model, &cfg, 7).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    for (_, l) in a.lora_layers() {
        let v: Vec<f32> = (0..l.b.elem_count()).map(|_| (rng.random::<f32>() * 2.0 - 1.0) * 0.0346).collect();
        l.b.set(&Tensor::from_vec(v, l.b.dims(), &Device::Cpu).unwrap()).unwrap();
    }
    a.save(dir, &base.display().to_string()).unwrap();
}

const CHAT: &str = "Give me three tips for staying healthy.";
const TEXTS: [&str; 2] = [
    "Fine-tuning a small language model on a laptop is slow, but it works if you are patient.",
    "低秩适配只训练很少的参数。 for (int i = 0; i < 42; ++i) { sum += a[i]; }",
];

fn prompts(m: &LoadedModel) -> Vec<Vec<u32>> {
    let t = ChatTemplate::new(m.spec.chat_template.as_deref().unwrap(), m.spec.bos_token.as_deref().unwrap_or(""), &m.spec.eos_token).unwrap();
    let chat = t.render(&[Message::new("user", CHAT)], true).unwrap();
    std::iter::once(chat.as_str()).chain(TEXTS).map(|s| m.tokenizer.encode(s, false).unwrap().get_ids().to_vec()).collect()
}

fn greedy(model: &Llama, prompt: &[u32]) -> Vec<u32> {
    infer::generate_tokens(model, prompt, &SampleOptions::greedy(NEW_TOKENS), None, |_| true).unwrap().tokens
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn max_abs(a: &Tensor) -> f32 {
    a.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// Share of the reference continuation's tokens that `model` predicts as its top token when
/// fed the reference text (teacher forcing), over all prompts.
fn teacher_forced_agreement(model: &Llama, prompts: &[Vec<u32>], refs: &[Vec<u32>]) -> f64 {
    let (mut agree, mut total) = (0, 0);
    for (p, r) in prompts.iter().zip(refs) {
        let full: Vec<u32> = p.iter().chain(r).copied().collect();
        let logits = infer::sequence_logits(model, &full).unwrap();
        for (j, &want) in r.iter().enumerate() {
            let row = logits.get(p.len() - 1 + j).unwrap();
            agree += usize::from(infer::argmax(&row).unwrap() == want);
            total += 1;
        }
    }
    agree as f64 / total as f64
}

/// Share of greedy tokens equal to the reference's, counted up to the first difference.
fn prefix_agreement(got: &[Vec<u32>], want: &[Vec<u32>]) -> f64 {
    let mut same = 0;
    let mut total = 0;
    for (g, w) in got.iter().zip(want) {
        same += g.iter().zip(w).take_while(|(a, b)| a == b).count();
        total += w.len();
    }
    same as f64 / total as f64
}

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".partial"))
        .collect()
}

fn dir_size(path: &Path) -> u64 {
    if path.is_file() {
        return path.metadata().unwrap().len();
    }
    std::fs::read_dir(path).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum()
}

fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

#[test]
fn merged_model_computes_base_plus_adapter() {
    let f = fixture();
    for (i, p) in f.prompts.iter().enumerate() {
        let merged = infer::sequence_logits(&f.merged.model, p).unwrap();
        let d = max_diff(&merged, &f.unmerged_logits[i]);
        let moved = max_diff(&f.base_logits[i], &f.unmerged_logits[i]);
        println!("(a) prompt {i}: max|merged - (base+adapter)| = {d:.2e} (logits up to {:.1}; the adapter moves them by {moved:.2})", max_abs(&merged));
        assert!(moved > 0.1, "the adapter must change the logits (moved {moved})");
        assert!(d < 2e-3, "merged logits differ from base + adapter by {d}");
    }
    assert!(f.merged.model.linears().iter().all(|l| l.adapter().is_none()));
}

#[test]
fn hf_export_reloads_with_the_same_logits_and_tokenizer() {
    let f = fixture();
    let dir = f.root.join("hf-f32");
    let t = Instant::now();
    let mut calls = Vec::new();
    let r = export::write_hf(&f.merged, &dir, HfDtype::F32, |d, n| calls.push((d, n))).unwrap();
    println!("(b) HF f32 folder: {} in {:.1}s (model already merged)", mb(r.bytes), t.elapsed().as_secs_f64());
    assert_eq!(calls.len(), r.tensors, "one progress call per tensor");
    assert_eq!(calls.last(), Some(&(r.tensors, r.tensors)));
    for name in ["model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"] {
        assert!(dir.join(name).is_file(), "{name} missing");
    }
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["architectures"][0], "LlamaForCausalLM");
    assert_eq!(cfg["tie_word_embeddings"], true);
    assert_eq!(cfg["torch_dtype"], "float32");
    assert_eq!(cfg["rope_theta"], 100000.0);
    assert_eq!(cfg["rms_norm_eps"], 1e-5);
    assert_eq!(cfg["max_position_embeddings"], 8192);
    assert_eq!((cfg["bos_token_id"].as_u64(), cfg["eos_token_id"].as_u64()), (Some(1), Some(2)));
    let st = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    assert!(!st.contains_key("lm_head.weight"), "a tied head is stored once, as transformers does");
    assert_eq!(st.len(), 1 + 30 * 9 + 1);
    let tc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer_config.json")).unwrap()).unwrap();
    assert_eq!(tc["chat_template"].as_str(), f.merged.spec.chat_template.as_deref());
    assert_eq!((tc["bos_token"].as_str(), tc["eos_token"].as_str()), (Some("<|im_start|>"), Some("<|im_end|>")));

    let back = model::load(&dir, &Device::Cpu).unwrap();
    for (i, p) in f.prompts.iter().enumerate() {
        let want = infer::sequence_logits(&f.merged.model, p).unwrap();
        let got = infer::sequence_logits(&back.model, p).unwrap();
        let d = max_diff(&want, &got);
        println!("(b) HF f32 prompt {i}: max|logit diff| = {d:.2e}");
        assert!(d < 1e-4, "{d}");
    }
    // The tokenizer written from the GGUF metadata encodes and templates as the GGUF's does.
    for text in TEXTS.iter().chain(&["<|im_start|>user\nHi<|im_end|>\n"]) {
        assert_eq!(back.tokenizer.encode(*text, false).unwrap().get_ids(), f.merged.tokenizer.encode(*text, false).unwrap().get_ids(), "{text}");
    }
    assert_eq!(back.spec.chat_template, f.merged.spec.chat_template);
    assert_eq!((back.spec.eos_id, back.spec.pad_id, back.spec.add_bos), (f.merged.spec.eos_id, f.merged.spec.pad_id, f.merged.spec.add_bos));
    assert_eq!(back.spec.bos_token, f.merged.spec.bos_token);

    // A HF-folder source exports to GGUF with the original tokenizer metadata.
    let gguf = f.root.join("from-hf.q8_0.gguf");
    export::write_gguf(&back, &gguf, GgufType::Q8_0, None, |_, _| {}).unwrap();
    let src = read_content(&common::default_model());
    let out = read_content(&gguf);
    for key in ["tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.chat_template"] {
        assert_eq!(meta_str(&out, key), meta_str(&src, key), "{key}");
    }
    // Control tokens stay control tokens; other token types are only kept apart by GGUF.
    let types = |c: &Content| match &c.metadata["tokenizer.ggml.token_type"] {
        Value::Array(a) => a.iter().map(|v| v.to_i32().unwrap()).collect::<Vec<_>>(),
        _ => panic!(),
    };
    let (ts, to) = (types(&src), types(&out));
    assert_eq!(ts.len(), to.len());
    assert!(ts.iter().zip(&to).all(|(a, b)| (*a == 3) == (*b == 3)), "control tokens differ");
    let g = model::load_quantized(&gguf, &Device::Cpu).unwrap();
    let got: Vec<Vec<u32>> = f.prompts.iter().map(|p| greedy(&g.model, p)).collect();
    println!("(b) HF folder -> GGUF q8_0: greedy prefix agreement with the merged model {:.3}", prefix_agreement(&got, &f.greedy));
    assert_eq!(got, f.greedy);

    // A HF-folder source exports to a HF folder: config kept (dtype updated), tokenizer copied.
    let again = f.root.join("hf-from-hf-f16");
    export::write_hf(&back, &again, HfDtype::F16, |_, _| {}).unwrap();
    for name in ["tokenizer.json", "special_tokens_map.json", "generation_config.json"] {
        assert_eq!(std::fs::read(again.join(name)).unwrap(), std::fs::read(dir.join(name)).unwrap(), "{name}");
    }
    let mut cfg2: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(again.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg2["torch_dtype"], "float16");
    cfg2["torch_dtype"] = cfg["torch_dtype"].clone();
    assert_eq!(cfg2, cfg);
    let m16 = model::load(&again, &Device::Cpu).unwrap();
    let d = max_diff(&infer::sequence_logits(&m16.model, &f.prompts[0]).unwrap(), &infer::sequence_logits(&f.merged.model, &f.prompts[0]).unwrap());
    println!("(b) HF folder -> HF f16 folder: max|logit diff| {d:.3}");
    assert!(d < 0.5, "{d}");
    drop((back, m16));

    // bf16, through the path API (load + merge from the adapter folder).
    let dir16 = f.root.join("hf-bf16");
    let t = Instant::now();
    let r = export::export_hf(&common::default_model(), Some(&f.adapter), &dir16, HfDtype::Bf16, |_, _| {}).unwrap();
    println!("(b) HF bf16 folder (load + merge + write): {} in {:.1}s", mb(r.bytes), t.elapsed().as_secs_f64());
    assert_eq!(r.tensor_types.keys().collect::<Vec<_>>(), vec!["BF16"]);
    let back = model::load(&dir16, &Device::Cpu).unwrap();
    let mut worst: f32 = 0.0;
    for p in &f.prompts {
        let d = max_diff(&infer::sequence_logits(&f.merged.model, p).unwrap(), &infer::sequence_logits(&back.model, p).unwrap());
        worst = worst.max(d);
    }
    let tf = teacher_forced_agreement(&back.model, &f.prompts, &f.greedy);
    println!("(b) HF bf16: max|logit diff| = {worst:.3}, teacher-forced top-1 agreement {tf:.3}");
    assert!(worst < 1.0, "bf16 logits differ by {worst}");
    assert!(tf >= 0.9, "{tf}");
    for d in [&dir, &dir16, &again] {
        std::fs::remove_dir_all(d).unwrap();
    }
    std::fs::remove_file(&gguf).unwrap();
}

fn read_content(path: &Path) -> Content {
    let mut file = std::fs::File::open(path).unwrap();
    Content::read(&mut file).unwrap()
}

fn meta_str(c: &Content, key: &str) -> String {
    format!("{:?}", c.metadata.get(key))
}

#[test]
fn gguf_exports_reload_and_decode_like_the_merged_model() {
    let f = fixture();
    let src = read_content(&common::default_model());
    let opts = SampleOptions { temperature: 0.7, top_p: 0.9, top_k: 40, max_new_tokens: 200, ..SampleOptions::default() };
    for qtype in [GgufType::F16, GgufType::Q8_0, GgufType::Q4K, GgufType::Q4_0] {
        let dir = f.root.join(format!("gguf-{qtype}"));
        let file = dir.join(format!("merged.{qtype}.gguf"));
        let t = Instant::now();
        let mut calls = 0;
        let r = export::write_gguf(&f.merged, &file, qtype, Some(&opts), |_, _| calls += 1).unwrap();
        let secs = t.elapsed().as_secs_f64();
        assert_eq!(calls, r.tensors);
        assert_eq!(r.tensors, 30 * 9 + 2, "tied: no output.weight");
        let c = read_content(&file);
        // Metadata: llama.cpp's keys and the source's tokenizer, verbatim.
        assert_eq!(meta_str(&c, "general.architecture"), meta_str(&src, "general.architecture"));
        assert_eq!(c.metadata["general.file_type"].to_u32().unwrap(), qtype.file_type());
        for key in src.metadata.keys().filter(|k| k.starts_with("llama.") || k.starts_with("tokenizer.") || k.as_str() == "general.name") {
            assert_eq!(meta_str(&c, key), meta_str(&src, key), "{key}");
        }
        assert!(!c.tensor_infos.contains_key("output.weight"));
        for (name, info) in &c.tensor_infos {
            if info.shape.rank() == 1 {
                assert_eq!(info.ggml_dtype, candle_core::quantized::GgmlDType::F32, "{name}");
            }
        }
        let ty = |n: &str| format!("{:?}", c.tensor_infos[n].ggml_dtype);
        println!(
            "(c) {qtype}: {} in {secs:.1}s; token_embd {}, attn_q {}, ffn_down {}; types {:?}",
            mb(dir_size(&file)),
            ty("token_embd.weight"),
            ty("blk.0.attn_q.weight"),
            ty("blk.0.ffn_down.weight"),
            r.tensor_types
        );
        let mf = std::fs::read_to_string(dir.join("Modelfile")).unwrap();
        assert!(mf.contains(&format!("FROM ./merged.{qtype}.gguf\n")), "{mf}");
        assert!(mf.contains("TEMPLATE \"\"\"{{ range $i, $_ := .Messages }}"), "{mf}");
        assert!(mf.contains("PARAMETER stop \"<|im_end|>\"\nPARAMETER temperature 0.7\nPARAMETER top_p 0.9\nPARAMETER top_k 40\n"), "{mf}");

        for quantized in [false, true] {
            let m = if quantized { model::load_quantized(&file, &Device::Cpu) } else { model::load(&file, &Device::Cpu) }.unwrap();
            let got: Vec<Vec<u32>> = f.prompts.iter().map(|p| greedy(&m.model, p)).collect();
            let prefix = prefix_agreement(&got, &f.greedy);
            let tf = teacher_forced_agreement(&m.model, &f.prompts, &f.greedy);
            let d = f.prompts.iter().map(|p| max_diff(&infer::sequence_logits(&m.model, p).unwrap(), &infer::sequence_logits(&f.merged.model, p).unwrap())).fold(0f32, f32::max);
            println!(
                "(c) {qtype} via {}: greedy prefix agreement {prefix:.3}, teacher-forced top-1 agreement {tf:.3}, max|logit diff| {d:.3}",
                if quantized { "load_quantized" } else { "load" }
            );
            match qtype {
                GgufType::F16 | GgufType::Q8_0 => assert_eq!(got, f.greedy, "{qtype}: greedy tokens differ from the merged model's"),
                _ => assert!(tf >= 0.6, "{qtype}: teacher-forced agreement {tf}"),
            }
        }
    }
    // The q/k rows are in llama.cpp's layout: the exported f16 attn_k is close to the source
    // file's raw attn_k (they differ by the LoRA update and quantization), and far from it
    // when un-permuted.
    let f16 = f.root.join("gguf-f16/merged.f16.gguf");
    let raw = |path: &Path, name: &str| {
        let c = read_content(path);
        let mut file = std::fs::File::open(path).unwrap();
        c.tensor(&mut file, name, &Device::Cpu).unwrap().dequantize(&Device::Cpu).unwrap()
    };
    for (name, heads) in [("blk.3.attn_k.weight", 3), ("blk.3.attn_q.weight", 9)] {
        let (ours, theirs) = (raw(&f16, name), raw(&common::default_model(), name));
        let mean = |t: Tensor| t.abs().unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap();
        let right = mean((&ours - &theirs).unwrap());
        let wrong = mean((model::gguf::unpermute_rows(&ours, heads).unwrap() - &theirs).unwrap());
        println!("(c) {name}: mean|exported - source| = {right:.4}, un-permuted {wrong:.4}");
        assert!(right < 0.3 * wrong, "{right} vs {wrong}");
    }
    for qtype in [GgufType::F16, GgufType::Q8_0, GgufType::Q4K, GgufType::Q4_0] {
        std::fs::remove_dir_all(f.root.join(format!("gguf-{qtype}"))).unwrap();
    }
}

/// BitFit adds biases: merged into q/k/v, o_proj and down_proj they are written to both
/// formats (q/k biases permuted like their rows in GGUF) and read back.
#[test]
fn merged_biases_are_exported() {
    use rand::{Rng, SeedableRng};
    let base = common::default_model();
    let mut m = model::load(&base, &Device::Cpu).unwrap();
    let prompt = prompts(&m).swap_remove(0);
    let base_logits = infer::sequence_logits(&m.model, &prompt).unwrap();
    let names = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"].map(String::from).to_vec();
    let cfg = PeftConfig::Bitfit(tunebench::peft::BitfitConfig { target_modules: TargetModules::Names(names) });
    let a = Adapter::inject(&mut m.model, &cfg, 3).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    for (_, v) in a.trainable() {
        let x: Vec<f32> = (0..v.elem_count()).map(|_| (rng.random::<f32>() * 2.0 - 1.0) * 0.5).collect();
        v.set(&Tensor::from_vec(x, v.dims(), &Device::Cpu).unwrap()).unwrap();
    }
    let want = infer::sequence_logits(&m.model, &prompt).unwrap();
    a.merge_into(&mut m.model).unwrap();
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    export::write_hf(&m, &dir.path().join("hf"), HfDtype::F32, |_, _| {}).unwrap();
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join("hf/config.json")).unwrap()).unwrap();
    assert_eq!((cfg["attention_bias"].as_bool(), cfg["mlp_bias"].as_bool()), (Some(true), Some(true)));
    let st = candle_core::safetensors::load(dir.path().join("hf/model.safetensors"), &Device::Cpu).unwrap();
    assert!(max_abs(&st["model.layers.0.self_attn.o_proj.bias"]) > 0.0);
    assert_eq!(max_abs(&st["model.layers.0.mlp.up_proj.bias"]), 0.0, "transformers' Llama wants all three MLP biases: zeros");
    let gguf = dir.path().join("m.f16.gguf");
    export::write_gguf(&m, &gguf, GgufType::F16, None, |_, _| {}).unwrap();
    // In the GGUF the q/k biases are permuted like their rows (and stored in F32).
    let c = read_content(&gguf);
    let mut file = std::fs::File::open(&gguf).unwrap();
    let layer = &m.model.layers[4].self_attn;
    for (name, heads, lin) in [("blk.4.attn_q.bias", 9, &layer.q_proj), ("blk.4.attn_k.bias", 3, &layer.k_proj), ("blk.4.attn_v.bias", 0, &layer.v_proj)] {
        let raw = c.tensor(&mut file, name, &Device::Cpu).unwrap().dequantize(&Device::Cpu).unwrap();
        let back = if heads > 0 { model::gguf::unpermute_rows(&raw, heads).unwrap() } else { raw };
        assert_eq!(back.to_vec1::<f32>().unwrap(), lin.bias().unwrap().to_vec1::<f32>().unwrap(), "{name}");
    }
    let hf_f16 = dir.path().join("hf-f16");
    export::write_hf(&m, &hf_f16, HfDtype::F16, |_, _| {}).unwrap();
    let logits = |p: &Path| infer::sequence_logits(&model::load(p, &Device::Cpu).unwrap().model, &prompt).unwrap();
    let (hf32, hf16, g16) = (logits(&dir.path().join("hf")), logits(&hf_f16), logits(&gguf));
    let moved = max_diff(&want, &base_logits);
    println!(
        "(b/c) BitFit q/k/v/o/down biases (they move logits by {moved:.1}): HF f32 max|logit diff| {:.2e}; GGUF f16 {:.3}, HF f16 {:.3}, GGUF f16 vs HF f16 {:.3}",
        max_diff(&want, &hf32),
        max_diff(&want, &g16),
        max_diff(&want, &hf16),
        max_diff(&g16, &hf16)
    );
    assert!(max_diff(&want, &hf32) < 1e-3, "every merged bias is read back");
    let back = model::load(&dir.path().join("hf"), &Device::Cpu).unwrap();
    assert!(back.model.layers[2].mlp.down_proj.bias().is_some() && back.model.layers[2].self_attn.o_proj.bias().is_some());
    // f16 weights cost the same in both formats (the GGUF keeps biases in F32).
    assert!(max_diff(&g16, &hf16) < 0.5 && max_diff(&want, &g16) < 2.0 * max_diff(&want, &hf16).max(0.1));
}

/// A HF folder with a small byte-level BPE exports to GGUF (tokenizer metadata built from its
/// tokenizer.json, a Modelfile from its ChatML template); one with a WordLevel tokenizer is
/// refused with the reason, and nothing is written.
#[test]
fn hf_folder_tokenizers_convert_to_gguf_or_are_refused() {
    let tok = tunebench::data::testing::tiny_tokenizer();
    let cfg = tunebench::model::LlamaConfig { tie_word_embeddings: true, ..tunebench::model::LlamaConfig::tiny(tok.get_vocab_size(true)) };
    let reference = Llama::random(cfg.clone(), 3, &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    common::write_folder(&src, &cfg, &reference, false);
    let m = model::load(&src, &Device::Cpu).unwrap();
    let out = dir.path().join("gguf").join("tiny.f16.gguf");
    let r = export::write_gguf(&m, &out, GgufType::F16, Some(&SampleOptions::default()), |_, _| {}).unwrap();
    assert_eq!(r.tensor_types.get("F16"), Some(&(2 * 7 + 1)), "{:?}", r.tensor_types);
    let c = read_content(&out);
    assert_eq!(meta_str(&c, "tokenizer.ggml.model"), "Some(String(\"gpt2\"))");
    assert_eq!(meta_str(&c, "tokenizer.ggml.eos_token_id"), format!("Some(U32({}))", m.spec.eos_id));
    let back = model::load(&out, &Device::Cpu).unwrap();
    let text = "the winter in 2024 was <|im_end|> ünïcödé";
    assert_eq!(back.tokenizer.encode(text, false).unwrap().get_ids(), m.tokenizer.encode(text, false).unwrap().get_ids());
    assert_eq!(back.spec.chat_template, m.spec.chat_template);
    let ids = [1u32, 4, 2, 5, 3];
    // f16 weights: the GGUF computes what the same weights in a f16 HF folder compute.
    export::write_hf(&m, &dir.path().join("hf16"), HfDtype::F16, |_, _| {}).unwrap();
    let hf16 = model::load(&dir.path().join("hf16"), &Device::Cpu).unwrap();
    let want = infer::sequence_logits(&hf16.model, &ids).unwrap();
    let d = max_diff(&infer::sequence_logits(&back.model, &ids).unwrap(), &want);
    let rounding = max_diff(&infer::sequence_logits(&m.model, &ids).unwrap(), &want);
    println!("tiny f16 GGUF vs f16 HF folder: {d:.2e} (f16 rounding itself: {rounding:.2e})");
    assert!(d < 1e-4, "{d}");
    let mf = std::fs::read_to_string(out.with_file_name("Modelfile")).unwrap();
    assert!(mf.contains("TEMPLATE \"\"\"{{ range") && mf.contains("PARAMETER stop \"<|im_end|>\""), "{mf}");

    // WordLevel: not something llama.cpp's gpt2 tokenizer can hold.
    let vocab: std::collections::HashMap<String, u32> = tok.get_vocab(true).into_iter().collect();
    let wl = tokenizers::models::wordlevel::WordLevel::builder().vocab(vocab.into_iter().collect()).unk_token("<|endoftext|>".into()).build().unwrap();
    let mut wl_tok = tokenizers::Tokenizer::new(wl);
    wl_tok.add_special_tokens(&tunebench::data::testing::SPECIAL_TOKENS.map(|s| tokenizers::AddedToken::from(s, true)));
    wl_tok.save(src.join("tokenizer.json"), false).unwrap();
    let m = model::load(&src, &Device::Cpu).unwrap();
    let out = dir.path().join("wl").join("tiny.gguf");
    let err = export::write_gguf(&m, &out, GgufType::F16, Some(&SampleOptions::default()), |_, _| {}).unwrap_err().to_string();
    assert!(err.contains("tokenizer.json") && err.contains("WordLevel") && err.contains("byte-level BPE"), "{err}");
    assert_eq!(std::fs::read_dir(out.parent().unwrap()).unwrap().count(), 0, "nothing is left behind");
}

/// The unmodified model exported at its own type (Q4_1, embedding Q8_0) comes back block for
/// block: re-quantizing dequantized blocks reproduces them, and the q/k rows go back exactly
/// where llama.cpp's converter had put them.
#[test]
fn unmodified_model_round_trips_through_its_own_gguf_type() {
    let base = common::default_model();
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let out = dir.path().join("base.q4_1.gguf");
    let t = Instant::now();
    let r = export::export_gguf(&base, None, &out, GgufType::Q4_1, None, |_, _| {}).unwrap();
    println!("(c) unmodified model -> q4_1: {} (source {}) in {:.1}s", mb(r.bytes), mb(dir_size(&base)), t.elapsed().as_secs_f64());
    let (src, ours) = (read_content(&base), read_content(&out));
    let mut names: Vec<&String> = src.tensor_infos.keys().collect();
    names.sort();
    assert_eq!(names, { let mut n: Vec<&String> = ours.tensor_infos.keys().collect(); n.sort(); n });
    let (mut fs, mut fo) = (std::fs::File::open(&base).unwrap(), std::fs::File::open(&out).unwrap());
    let mut identical = 0;
    for name in &names {
        let a = src.tensor(&mut fs, name, &Device::Cpu).unwrap();
        let b = ours.tensor(&mut fo, name, &Device::Cpu).unwrap();
        assert_eq!((a.dtype(), a.shape()), (b.dtype(), b.shape()), "{name}");
        identical += usize::from(a.data().unwrap() == b.data().unwrap());
    }
    println!("(c) unmodified model -> q4_1: {identical}/{} tensors byte-identical to the source", names.len());
    assert_eq!(identical, names.len());
}

#[test]
fn exports_refuse_to_overwrite_and_leave_nothing_behind() {
    let f = fixture();
    let base = common::default_model();
    let root = f.root.join("errors");
    std::fs::create_dir_all(&root).unwrap();

    // The adapter folder, copied as is; a second copy to the same place is refused.
    let copy = root.join("adapter-copy");
    export::export_adapter(&f.adapter, &copy).unwrap();
    for name in ["adapter_config.json", "adapter_model.safetensors"] {
        assert_eq!(std::fs::read(copy.join(name)).unwrap(), std::fs::read(f.adapter.join(name)).unwrap(), "{name}");
    }
    let err = export::export_adapter(&f.adapter, &copy).unwrap_err().to_string();
    assert!(err.contains("already exists") && err.contains("adapter-copy"), "{err}");
    let err = export::export_adapter(&root, &root.join("x")).unwrap_err().to_string();
    assert!(err.contains("no adapter_config.json"), "{err}");

    // An existing non-empty folder is never overwritten.
    let taken = root.join("taken");
    std::fs::create_dir_all(&taken).unwrap();
    std::fs::write(taken.join("keep.txt"), "mine").unwrap();
    let err = export::export_hf(&base, Some(&f.adapter), &taken, HfDtype::F32, |_, _| {}).unwrap_err().to_string();
    assert!(err.contains("already exists") && err.contains("taken"), "{err}");
    let err = export::write_hf(&f.merged, &taken, HfDtype::F32, |_, _| {}).unwrap_err().to_string();
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(std::fs::read_to_string(taken.join("keep.txt")).unwrap(), "mine");
    assert_eq!(std::fs::read_dir(&taken).unwrap().count(), 1);

    // An existing file, or an existing Modelfile next to the GGUF, is not overwritten either.
    let file = root.join("m.gguf");
    std::fs::write(&file, "mine").unwrap();
    let err = export::export_gguf(&base, None, &file, GgufType::Q8_0, None, |_, _| {}).unwrap_err().to_string();
    assert!(err.contains("already exists") && err.contains("m.gguf"), "{err}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "mine");
    let sub = root.join("with-modelfile");
    std::fs::create_dir_all(&sub).unwrap();
    std::fs::write(sub.join("Modelfile"), "FROM x").unwrap();
    let err = export::write_gguf(&f.merged, &sub.join("m.gguf"), GgufType::Q8_0, Some(&SampleOptions::default()), |_, _| {}).unwrap_err().to_string();
    assert!(err.contains("Modelfile") && err.contains("already exists"), "{err}");
    assert!(!sub.join("m.gguf").exists());
    // A model with an adapter still installed is refused (it would be exported without it).
    let mut unmerged = model::load(&base, &Device::Cpu).unwrap();
    Adapter::load(&mut unmerged.model, &f.adapter).unwrap();
    let err = export::write_gguf(&unmerged, &root.join("unmerged.gguf"), GgufType::Q8_0, None, |_, _| {}).unwrap_err().to_string();
    assert!(err.contains("still has an adapter"), "{err}");
    drop(unmerged);

    // An unwritable destination. Root ignores permission bits, so it gets a folder in /sys.
    let ro = root.join("read-only");
    std::fs::create_dir_all(&ro).unwrap();
    let mut perms = std::fs::metadata(&ro).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o555);
    std::fs::set_permissions(&ro, perms).unwrap();
    let probe = ro.join("probe");
    let ro_dest = if std::fs::write(&probe, "x").is_ok() {
        let _ = std::fs::remove_file(&probe);
        PathBuf::from("/sys/tunebench-export-test/out")
    } else {
        ro.join("out")
    };
    let err = export::export_hf(&base, None, &ro_dest, HfDtype::F32, |_, _| {}).unwrap_err().to_string();
    assert!(err.contains("not writable"), "{err}");
    let err = export::write_gguf(&f.merged, &ro_dest.with_extension("gguf"), GgufType::Q8_0, None, |_, _| {}).unwrap_err().to_string();
    assert!(err.contains("not writable"), "{err}");
    assert!(!ro_dest.exists());

    // Corrupt adapters: a broken config, a truncated weights file. Nothing is written.
    for (what, broken) in [("config", "adapter_config.json"), ("weights", "adapter_model.safetensors")] {
        let bad = root.join(format!("bad-{what}"));
        std::fs::create_dir_all(&bad).unwrap();
        for name in ["adapter_config.json", "adapter_model.safetensors"] {
            std::fs::copy(f.adapter.join(name), bad.join(name)).unwrap();
        }
        let bytes = std::fs::read(bad.join(broken)).unwrap();
        std::fs::write(bad.join(broken), &bytes[..bytes.len() / 2]).unwrap();
        let out = root.join(format!("out-{what}"));
        let err = export::export_hf(&base, Some(&bad), &out, HfDtype::F32, |_, _| {}).unwrap_err().to_string();
        println!("(d) corrupt adapter {what}: {err}");
        assert!(err.contains(broken), "the error names the broken file: {err}");
        let err = export::export_gguf(&base, Some(&bad), &out.with_extension("gguf"), GgufType::Q8_0, Some(&SampleOptions::default()), |_, _| {})
            .unwrap_err()
            .to_string();
        assert!(err.contains(broken), "{err}");
        assert!(!out.exists() && !out.with_extension("gguf").exists() && !root.join("Modelfile").exists());
    }
    assert_eq!(leftovers(&root), Vec::<String>::new(), "temporary files left behind");
    assert_eq!(leftovers(&sub), Vec::<String>::new());
    std::fs::remove_dir_all(&root).unwrap();
}

/// Writes the exports that tests/reference/export_check.py checks against PyTorch transformers
/// and llama.cpp, into $TUNEBENCH_EXPORT_DIR (does nothing when it is not set).
#[test]
fn export_for_python() {
    let Some(out) = std::env::var_os("TUNEBENCH_EXPORT_DIR").map(PathBuf::from) else { return };
    let f = fixture();
    std::fs::create_dir_all(&out).unwrap();
    export::export_adapter(&f.adapter, &out.join("adapter")).unwrap();
    export::write_hf(&f.merged, &out.join("hf"), HfDtype::F32, |_, _| {}).unwrap();
    let mut continuations = serde_json::Map::new();
    continuations.insert("merged".into(), serde_json::json!(f.greedy));
    for qtype in [GgufType::F16, GgufType::Q8_0, GgufType::Q4K] {
        let file = out.join(format!("gguf-{qtype}")).join("model.gguf");
        export::write_gguf(&f.merged, &file, qtype, Some(&SampleOptions::default()), |_, _| {}).unwrap();
        let m = model::load_quantized(&file, &Device::Cpu).unwrap();
        let g: Vec<Vec<u32>> = f.prompts.iter().map(|p| greedy(&m.model, p)).collect();
        continuations.insert(qtype.to_string(), serde_json::json!(g));
    }
    let t = ChatTemplate::new(f.merged.spec.chat_template.as_deref().unwrap(), f.merged.spec.bos_token.as_deref().unwrap_or(""), &f.merged.spec.eos_token).unwrap();
    let chat = [Message::new("user", CHAT)];
    let encodings: Vec<Vec<u32>> = TEXTS.iter().map(|s| f.merged.tokenizer.encode(*s, false).unwrap().get_ids().to_vec()).collect();
    let expected = serde_json::json!({
        "base_model": common::default_model(),
        "prompts": f.prompts,
        "greedy": continuations,
        "texts": TEXTS,
        "encodings": encodings,
        "chat": {"messages": [{"role": "user", "content": CHAT}], "rendered": t.render(&chat, true).unwrap()},
    });
    std::fs::write(out.join("expected.json"), serde_json::to_string_pretty(&expected).unwrap()).unwrap();
}

/// Full fine-tuning exports as a plain model: every trained tensor (embedding, norms,
/// projections) is written into the HF folder, which re-loads on its own with the logits of
/// base + the full fine-tuning "adapter", its tied head still stored once.
#[test]
fn full_fine_tuning_exports_as_a_plain_hf_model() {
    use rand::{Rng, SeedableRng};
    let root = tempfile::tempdir().unwrap();
    let base_path = common::default_model();
    let mut m = model::load(&base_path, &Device::Cpu).unwrap();
    let a = Adapter::inject(&mut m.model, &PeftConfig::Full(Default::default()), 1).unwrap();
    // Nudge every trained tensor, as training would.
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    for (_, v) in a.trainable() {
        let noise: Vec<f32> = (0..v.elem_count()).map(|_| (rng.random::<f32>() * 2.0 - 1.0) * 0.01).collect();
        let t = (v.as_tensor() + Tensor::from_vec(noise, v.dims(), &Device::Cpu).unwrap()).unwrap();
        v.set(&t).unwrap();
    }
    let adapter_dir = root.path().join("adapter");
    a.save(&adapter_dir, &base_path.display().to_string()).unwrap();
    let prompt: Vec<u32> = m.tokenizer.encode(TEXTS[0], false).unwrap().get_ids().to_vec();
    let tuned = infer::sequence_logits(&m.model, &prompt).unwrap();
    tunebench::peft::remove_all(&mut m.model);
    let base = infer::sequence_logits(&m.model, &prompt).unwrap();

    let out = root.path().join("hf");
    export::export_hf(&base_path, Some(&adapter_dir), &out, HfDtype::F32, |_, _| {}).unwrap();
    let st = candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
    assert!(!st.contains_key("lm_head.weight"), "the tied head is stored once");
    let back = model::load(&out, &Device::Cpu).unwrap();
    let got = infer::sequence_logits(&back.model, &prompt).unwrap();
    let (d, moved) = (max_diff(&got, &tuned), max_diff(&base, &tuned));
    println!("full fine-tuning export: max|exported − tuned| = {d:.2e} (training moved the logits by {moved:.2})");
    assert!(moved > 0.1, "the nudged weights change the model ({moved})");
    assert!(d < 1e-4, "{d}");
}
