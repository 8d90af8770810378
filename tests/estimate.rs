//! The estimate before a run against what the run then measures, on the real default model:
//! trainable parameters exactly, peak memory within 15% on several configs: LoRA's, one with
//! gradient checkpointing, one in bf16, and four of other methods (full fine-tuning, a Houlsby
//! adapter in bf16, P-tuning v2, DoRA with dropout); each run in its own `tunebench train`
//! process, whose peak RSS the worker records.

mod common;

use std::path::Path;
use std::process::Command;

use tunebench::api::estimate::{self, EstimateRequest};
use tunebench::api::{Workbench, WorkbenchOptions};
use tunebench::train::RunConfig;

/// Long plain-text records, so every batch is padded to exactly `max_len`.
fn long_texts(path: &Path) {
    let words = ["the", "model", "learns", "from", "data", "and", "every", "token", "counts", "when", "training", "on", "long", "text"];
    let mut s = String::new();
    for i in 0..24 {
        let text: Vec<&str> = (0..600).map(|j| words[(i * 7 + j * 3 + j / 5) % words.len()]).collect();
        s.push_str(&serde_json::json!({ "text": text.join(" ") }).to_string());
        s.push('\n');
    }
    std::fs::write(path, s).unwrap();
}

fn config(name: &str, data: &Path, batch: usize, max_len: usize, r: usize, targets: &str) -> RunConfig {
    method_config(name, data, batch, max_len, &format!("method = \"lora\"\nr = {r}\nlora_alpha = 16\ntarget_modules = {targets}"), "f32")
}

/// A two-step run of any method (`peft`: the `[peft]` table's lines) in `dtype`.
fn method_config(name: &str, data: &Path, batch: usize, max_len: usize, peft: &str, dtype: &str) -> RunConfig {
    let text = format!(
        "name = \"{name}\"\n[model]\npath = \"{}\"\n[data]\npath = \"{}\"\nmax_len = {max_len}\nval_fraction = 0.0\n\
         [peft]\n{peft}\n[train]\nmax_steps = 2\nbatch_size = {batch}\ndtype = \"{dtype}\"\n",
        common::default_model().display(),
        data.display()
    );
    RunConfig::from_toml(&text, None).unwrap()
}

#[test]
fn memory_prediction_is_within_15_percent_of_measured_peak() {
    let home = tempfile::tempdir().unwrap();
    let data = home.path().join("long.jsonl");
    long_texts(&data);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    // Configs other than the six the constants were calibrated on (bench/RESULTS.md).
    let configs = [
        config("qkvo-gate", &data, 3, 200, 12, r#"["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"]"#),
        config("all-r32", &data, 6, 96, 32, r#""all-linear""#),
        config("v-down", &data, 2, 320, 8, r#"["v_proj", "down_proj"]"#),
        {
            // Gradient checkpointing per decoder layer: a sixth of the plain peak here.
            let mut c = config("all-checkpointed", &data, 6, 320, 16, r#""all-linear""#);
            c.train.gradient_checkpointing = true;
            c
        },
        {
            // LoRA dropout: each target keeps its dropped input (the mask is drawn again in
            // the backward, not kept).
            let mut c = config("dropout", &data, 3, 200, 12, r#"["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"]"#);
            if let tunebench::peft::PeftConfig::Lora(l) = &mut c.peft {
                l.lora_dropout = 0.1;
            }
            c
        },
        {
            // Mixed precision (bf16 base and activations) on the CPU's unfused ops.
            let mut c = config("bf16", &data, 3, 200, 12, r#"["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"]"#);
            c.train.dtype = tunebench::train::config::Precision::Bf16;
            c
        },
        // Methods on composed ops (their constants were fitted on other shapes,
        // bench/RESULTS.md 2026-12-03). Full fine-tuning: every weight and the tied embedding
        // trained, the head's chunked loss with its weight's gradient.
        method_config("full", &data, 3, 96, "method = \"full\"", "f32"),
        // IA3 on the LM head too: each loss chunk's graph differentiated on its own.
        method_config("ia3-head", &data, 5, 128, "method = \"ia3\"\ntarget_modules = [\"k_proj\", \"v_proj\", \"down_proj\", \"lm_head\"]\nfeedforward_modules = [\"down_proj\"]", "f32"),
        method_config("houlsby-bf16", &data, 5, 144, "method = \"adapter\"\nplacement = \"houlsby\"", "bf16"),
        method_config("p-tuning-v2", &data, 6, 112, "method = \"p_tuning_v2\"\nnum_virtual_tokens = 12", "f32"),
        method_config(
            "dora-dropout",
            &data,
            3,
            160,
            "method = \"lora\"\nr = 8\nlora_alpha = 16\nuse_dora = true\nlora_dropout = 0.1\ntarget_modules = \"all-linear\"",
            "f32",
        ),
    ];
    let mut report = Vec::new();
    for cfg in configs {
        let wb = rt.block_on(Workbench::open(WorkbenchOptions::new(home.path()))).unwrap();
        let est = rt.block_on(wb.estimate(&EstimateRequest { config: cfg.clone() })).unwrap();
        let run = rt.block_on(wb.create_run(tunebench::api::CreateRun { config: cfg.clone(), dataset_id: None, device: "cpu".into() })).unwrap();
        drop(wb);
        let out = Command::new(env!("CARGO_BIN_EXE_tunebench"))
            .args(["runs", "resume", &run.id.to_string(), "--json", "--no-heldout"])
            .env("TUNEBENCH_HOME", home.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let wb = rt.block_on(Workbench::open(WorkbenchOptions::new(home.path()))).unwrap();
        let r = rt.block_on(wb.store().run(run.id)).unwrap();
        assert_eq!(r.trainable_params, Some(est.trainable_params as i64), "{}: trainable parameters", cfg.name);
        assert_eq!(r.total_params, Some(est.total_params as i64), "{}: total parameters", cfg.name);
        let measured = r.peak_rss_bytes.unwrap() as f64;
        let err = est.memory.total_bytes as f64 / measured - 1.0;
        let line = format!(
            "{}: predicted {:.0} MiB, measured {:.0} MiB ({:+.1}%); step {:.2} s predicted, {:.2} s measured",
            cfg.name,
            est.memory.total_bytes as f64 / 1048576.0,
            measured / 1048576.0,
            100.0 * err,
            est.step_s,
            r.elapsed_s / r.step as f64
        );
        eprintln!("{line}");
        report.push((line, err));
    }
    for (line, err) in &report {
        assert!(err.abs() <= 0.15, "memory estimate off by more than 15%: {line}");
    }
}

#[test]
fn parameter_counts_follow_the_lora_formula() {
    let model = tunebench::model::load_config(&common::default_model()).unwrap();
    let cfg = RunConfig::lora(8, 16.0, &["q_proj", "v_proj"]);
    let mut rc = RunConfig::preset("quickstart").unwrap();
    rc.peft = cfg;
    let e = estimate::estimate(&rc, &model, Some(100), Some(64)).unwrap();
    // r·(in + out) for q (576→576) and v (576→192) in each of the 30 layers.
    assert_eq!(e.trainable_params, 30 * 8 * ((576 + 576) + (576 + 192)));
    assert_eq!(e.total_params, 134_515_008, "SmolLM2-135M (tied embeddings)");
    assert_eq!(e.seq_len, 64, "batches are padded to the longest example, not max_len");
    assert!(e.memory.total_bytes_checkpointed < e.memory.total_bytes);
    // A GPU run is told the estimate is the CPU's, and not that bf16 is slow on the CPU; its
    // memory holds the CUDA runtime's share beside its tensors, as a part of its own.
    let mut gpu = rc.clone();
    (gpu.train.device, gpu.train.dtype) = ("cuda:0".into(), tunebench::train::config::Precision::Bf16);
    let on_gpu = estimate::estimate(&gpu, &model, Some(100), Some(64)).unwrap();
    let w = on_gpu.warnings.join("\n");
    assert!(w.contains("train.device = \"cuda:0\"") && w.contains("calibrated on the CPU") && !w.contains("meant for GPUs"), "{w}");
    gpu.train.device = "cpu".into();
    let on_cpu = estimate::estimate(&gpu, &model, Some(100), Some(64)).unwrap();
    let w = on_cpu.warnings.join("\n");
    assert!(w.contains("meant for GPUs") && !w.contains("calibrated on the CPU"), "{w}");
    // (The GPU's attention term differs from the CPU's too, so the totals differ by more.)
    assert!(on_gpu.memory.total_bytes_checkpointed > estimate::CUDA_RUNTIME_BYTES);
    let runtime: Vec<u64> = on_gpu.memory.parts.iter().filter(|(name, _)| name.starts_with("CUDA runtime")).map(|p| p.1).collect();
    assert_eq!(runtime, [estimate::CUDA_RUNTIME_BYTES]);
    assert_eq!(on_gpu.memory.parts.iter().map(|p| p.1).sum::<u64>(), on_gpu.memory.total_bytes);
    assert!(!on_cpu.memory.parts.iter().any(|(name, _)| name.starts_with("CUDA runtime")));
    // A bad target is a config error naming the key.
    rc.peft = RunConfig::lora(8, 16.0, &["qq_proj"]);
    let err = estimate::estimate(&rc, &model, None, None).unwrap_err().to_string();
    assert!(err.contains("peft.target_modules") && err.contains("qq_proj"), "{err}");
}

/// A small data file that is not imported is measured like an import: the estimate assumes
/// batches as long as its longest example (not max_len), the same as after importing it.
#[test]
fn a_small_unimported_file_is_measured_for_the_estimate() {
    let home = tempfile::tempdir().unwrap();
    let data = std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/datasets/persona/train.jsonl"));
    let mut cfg = RunConfig::preset("quickstart").unwrap();
    cfg.model.path = Some(common::default_model());
    cfg.data.path = data.clone();
    cfg.data.max_len = 512;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let wb = rt.block_on(Workbench::open(WorkbenchOptions::new(home.path()))).unwrap();
    let before = rt.block_on(wb.estimate(&EstimateRequest { config: cfg.clone() })).unwrap();
    assert!(before.seq_len < 512, "longest example, not max_len: {}", before.seq_len);
    let req = tunebench::api::datasets::ImportRequest {
        path: data,
        name: None,
        format: Default::default(),
        max_len: 512,
        model: Some(common::default_model()),
    };
    let rec = rt.block_on(wb.import_dataset(&req, |_, _| {})).unwrap();
    let after = rt.block_on(wb.estimate(&EstimateRequest { config: cfg })).unwrap();
    assert_eq!(before.seq_len, after.seq_len);
    assert_eq!(Some(before.seq_len as u64), rec.stats.get("longest").and_then(|v| v.as_u64()));
    assert_eq!(before.memory, after.memory);
}
