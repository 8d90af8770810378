//! Shared helpers for integration tests that need the real default model.
#![allow(dead_code)]

use std::path::PathBuf;

/// The default model, installed by `scripts/setup`; panics with instructions when missing.
pub fn default_model() -> PathBuf {
    // Same CPU thread settings as the binaries (training tests are several times slower with
    // candle's spinning element-wise pool on a 2-core machine).
    tunebench::init_cpu_runtime();
    let p = tunebench::paths::default_model();
    assert!(
        p.exists(),
        "the default model is needed at {} — run `bash scripts/setup` first (or set TUNEBENCH_HOME)",
        p.display()
    );
    p
}
