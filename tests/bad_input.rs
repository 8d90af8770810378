//! Bad input gives a clear error naming the file and line (or key) and the reason. Dataset
//! parsing errors are covered in depth by the data module's unit tests; these go through the
//! public entry points a user reaches (run config, model loading, dataset loading).

use std::path::Path;

use tunebench::data::{load_dataset, ChatTemplate, DataOptions};
use tunebench::train::RunConfig;

const MINIMAL: &str = "[data]\npath = \"x.jsonl\"\n";

fn err_of(toml_text: &str) -> String {
    RunConfig::from_toml(toml_text, Some(Path::new("/cfg/run.toml"))).unwrap_err().to_string()
}

#[test]
fn config_errors_name_the_file_line_and_key() {
    assert!(RunConfig::from_toml(MINIMAL, None).is_ok());
    // Unknown key: a typo must not silently fall back to a default.
    let e = err_of("[data]\npath = \"x.jsonl\"\n[train]\nlearning_rate = 1e-4\n");
    assert!(e.contains("/cfg/run.toml:4") && e.contains("learning_rate"), "{e}");
    // Wrong type.
    let e = err_of("[data]\npath = \"x.jsonl\"\n[train]\nbatch_size = \"eight\"\n");
    assert!(e.contains("/cfg/run.toml:4") && e.contains("batch_size") || e.contains("invalid type"), "{e}");
    // Bad values name the key.
    let e = err_of("[data]\npath = \"x.jsonl\"\n[train]\nlr = -1\n");
    assert!(e.contains("train.lr") && e.contains("/cfg/run.toml"), "{e}");
    let e = err_of("[data]\npath = \"x.jsonl\"\n[peft]\nmethod = \"lora\"\nr = 0\n");
    assert!(e.contains("peft.r"), "{e}");
    let e = err_of("[data]\npath = \"x.jsonl\"\n[peft]\nmethod = \"lorax\"\n");
    assert!(e.contains("lorax") && e.contains("/cfg/run.toml:4"), "{e}");
    let e = err_of("[data]\npath = \"x.jsonl\"\nformat = \"yaml\"\n");
    assert!(e.contains("yaml") && e.contains("/cfg/run.toml:3"), "{e}");
    // Missing section.
    let e = err_of("name = \"x\"\n");
    assert!(e.contains("data"), "{e}");
    let e = RunConfig::preset("slowstart").unwrap_err().to_string();
    assert!(e.contains("unknown preset") && e.contains("quickstart"), "{e}");
}

#[test]
fn model_folder_without_tokenizer_or_weights_says_which_file() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = serde_json::json!({
        "vocab_size": 40, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 1,
        "num_attention_heads": 4, "num_key_value_heads": 2, "model_type": "llama"
    });
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    let e = tunebench::model::load(dir.path(), &candle_core::Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("model.safetensors"), "{e}");
    // Weights present but no tokenizer.json.
    let mut t = std::collections::HashMap::new();
    t.insert("dummy".to_string(), candle_core::Tensor::zeros(1, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap());
    candle_core::safetensors::save(&t, dir.path().join("model.safetensors")).unwrap();
    let e = tunebench::model::load(dir.path(), &candle_core::Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("tokenizer.json"), "{e}");
    // A config that does not parse names the file and line.
    std::fs::write(dir.path().join("config.json"), "{\n  \"hidden_size\": 16,\n  oops\n}").unwrap();
    let e = tunebench::model::load(dir.path(), &candle_core::Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("config.json:3"), "{e}");
    let e = tunebench::model::load(Path::new("/no/such/model.gguf"), &candle_core::Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("/no/such/model.gguf") && e.contains("does not exist"), "{e}");
    let junk = dir.path().join("junk.gguf");
    std::fs::write(&junk, b"not a gguf file at all").unwrap();
    let e = tunebench::model::load(&junk, &candle_core::Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("junk.gguf") && e.contains("GGUF"), "{e}");
}

#[test]
fn dataset_errors_name_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tunebench::data::testing::tiny_tokenizer();
    let tmpl = ChatTemplate::chatml();
    let opts = DataOptions::default();
    let cases: Vec<(&str, &[u8], &str)> = vec![
        ("malformed.jsonl", b"{\"instruction\": \"a\", \"output\": \"b\"}\n{\"instruction\": \"a\", \n", ":2"),
        ("missing.jsonl", b"{\"instruction\": \"a\", \"output\": \"b\"}\n{\"instruction\": \"a\"}\n", "output"),
        ("empty.jsonl", b"\n\n", "empty.jsonl"),
        ("latin1.jsonl", b"{\"instruction\": \"caf\xe9\", \"output\": \"b\"}\n", "UTF-8"),
    ];
    for (name, bytes, want) in cases {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        let e = load_dataset(&p, &opts, &tmpl, &tok).err().unwrap_or_else(|| panic!("{name} should fail")).to_string();
        assert!(e.contains(name) && e.contains(want), "{name}: {e}");
    }
}

/// The README's run-config table states the real defaults (rows whose default is a TOML
/// literal are checked against a config that sets nothing but `data.path`).
#[test]
fn readme_defaults_are_the_real_defaults() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let cfg = RunConfig::from_toml(MINIMAL, None).unwrap();
    let actual = toml::Value::try_from(&cfg).unwrap();
    let mut checked = 0;
    for line in readme.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let (key, default) = (cells[1], cells[2]);
        if key.contains(',') || key.contains('/') || !default.starts_with('`') || default.contains('/') {
            continue;
        }
        let key = key.trim_matches('`');
        let Ok(want) = format!("v = {}", default.trim_matches('`')).parse::<toml::Table>() else { continue };
        let mut v = &actual;
        for part in key.split('.') {
            v = v.get(part).unwrap_or_else(|| panic!("README documents `{key}`, which the config does not have"));
        }
        let want = &want["v"];
        let same = match (v, want) {
            (toml::Value::Float(a), toml::Value::Integer(b)) => *a == *b as f64,
            (a, b) => a == b,
        };
        assert!(same, "README says `{key}` defaults to {want}, the code says {v}");
        checked += 1;
    }
    assert!(checked >= 20, "only {checked} README defaults were checked");
}
