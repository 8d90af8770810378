//! Where Tunebench keeps its files: the app data dir and the folders under it.

use std::path::PathBuf;

/// The file name of the default model inside the models folder.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The app data dir: `$TUNEBENCH_HOME`, else `$XDG_DATA_HOME/tunebench`, else
/// `~/.local/share/tunebench` (the same rule `scripts/setup` uses).
pub fn home() -> PathBuf {
    if let Some(h) = std::env::var_os("TUNEBENCH_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(h);
    }
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(x).join("tunebench");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".local").join("share").join("tunebench")
}

/// The models folder.
pub fn models_dir() -> PathBuf {
    home().join("models")
}

/// The runs folder (one sub-folder per run).
pub fn runs_dir() -> PathBuf {
    home().join("runs")
}

/// The path of the default model (it exists after `scripts/setup`).
pub fn default_model() -> PathBuf {
    models_dir().join(DEFAULT_MODEL_FILE)
}

/// The bundled assets folder (presets, sample datasets): `$TUNEBENCH_ASSETS`, else the
/// source tree's `assets/` when it exists (development builds), else a copy of the assets
/// embedded in the binary, unpacked once into `<app data>/assets`.
pub fn assets_dir() -> PathBuf {
    if let Some(a) = std::env::var_os("TUNEBENCH_ASSETS").filter(|a| !a.is_empty()) {
        return PathBuf::from(a);
    }
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets");
    if src.join("presets").exists() {
        return src;
    }
    let dir = home().join("assets");
    for (rel, text) in EMBEDDED_ASSETS {
        let p = dir.join(rel);
        if !p.exists() {
            if let Some(parent) = p.parent() {
                let _ = std::fs::create_dir_all(parent);
            }
            let _ = std::fs::write(&p, text);
        }
    }
    dir
}

/// Assets compiled into the binary so an installed `tunebench` runs the quickstart anywhere.
const EMBEDDED_ASSETS: &[(&str, &str)] = &[
    ("presets/quickstart.toml", include_str!("../assets/presets/quickstart.toml")),
    ("datasets/persona/train.jsonl", include_str!("../assets/datasets/persona/train.jsonl")),
    ("datasets/persona/eval.jsonl", include_str!("../assets/datasets/persona/eval.jsonl")),
    ("datasets/persona/README.md", include_str!("../assets/datasets/persona/README.md")),
];
