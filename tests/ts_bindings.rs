//! The UI's TypeScript types (`ui/src/bindings/`) are generated from the engine's API types
//! with ts-rs. This test regenerates them and fails when the committed files differ, so a
//! change to a Rust API type cannot silently leave the UI's types stale.
//! `TUNEBENCH_UPDATE_BINDINGS=1 cargo test --test ts_bindings` rewrites them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ts_rs::{Config, TS};
use tunebench::api::commands::{ApiError, AppInfo, Command, FormSchema, RunAdapter};
use tunebench::api::{self, chat, compare, datasets, estimate};
use tunebench::store;

fn export(dir: &Path) {
    let cfg = Config::new().with_large_int("number").with_out_dir(dir);
    let all: &[fn(&Config) -> Result<(), ts_rs::ExportError>] = &[
        Command::export_all,
        ApiError::export_all,
        AppInfo::export_all,
        FormSchema::export_all,
        RunAdapter::export_all,
        api::ApiEvent::export_all,
        api::RunDetail::export_all,
        store::RunRecord::export_all,
        store::DatasetRecord::export_all,
        store::ModelRecord::export_all,
        store::ChatRecord::export_all,
        datasets::Preview::export_all,
        datasets::DatasetStats::export_all,
        estimate::Estimate::export_all,
        compare::Comparison::export_all,
        chat::ChatAnswer::export_all,
        api::downloads::DownloadJob::export_all,
        tunebench::hub::HubRepo::export_all,
    ];
    for f in all {
        f(&cfg).unwrap();
    }
}

/// Every `.ts` file under `dir`, by path relative to it.
fn read_dir(dir: &Path) -> BTreeMap<PathBuf, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, String>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for e in entries {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else if p.extension().is_some_and(|x| x == "ts") {
                out.insert(p.strip_prefix(root).unwrap().to_path_buf(), std::fs::read_to_string(&p).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

#[test]
fn ui_bindings_are_generated_from_the_rust_types() {
    let committed = Path::new(env!("CARGO_MANIFEST_DIR")).join("ui/src/bindings");
    let tmp = tempfile::tempdir().unwrap();
    export(tmp.path());
    let fresh = read_dir(tmp.path());
    assert!(fresh.contains_key(Path::new("Command.ts")) && fresh.len() > 30, "exported {} files", fresh.len());
    if std::env::var_os("TUNEBENCH_UPDATE_BINDINGS").is_some() {
        let _ = std::fs::remove_dir_all(&committed);
        std::fs::create_dir_all(&committed).unwrap();
        for (name, text) in &fresh {
            let path = committed.join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        return;
    }
    let old = read_dir(&committed);
    let stale: Vec<_> = fresh.iter().filter(|(n, t)| old.get(*n) != Some(t)).map(|(n, _)| n.display().to_string()).collect();
    let extra: Vec<_> = old.keys().filter(|n| !fresh.contains_key(*n)).map(|n| n.display().to_string()).collect();
    assert!(
        stale.is_empty() && extra.is_empty(),
        "ui/src/bindings is out of date (changed: {stale:?}, no longer generated: {extra:?}); run TUNEBENCH_UPDATE_BINDINGS=1 cargo test --test ts_bindings"
    );
}
