//! Tunebench's desktop app: a Tauri 2 window showing the UI in `ui/`, glue only. The UI's
//! `Backend` invokes two commands — `call` (any [`Command`], answered by the engine's
//! [`Api`], the same one `tunebench serve` runs) and `upload` — and listens to `api-event`
//! (every [`tunebench::api::ApiEvent`]). Errors reach the UI as `{code, message}`.
//!
//! Training and chat run in worker processes of the `tunebench` binary, which the app looks for
//! beside its own executable (both are built into the same target folder), then in
//! `$TUNEBENCH_BIN`.
//!
//! [`Command`]: tunebench::api::commands::Command

#![cfg_attr(not(debug_assertions), windows_subsystem = "windows")]

use std::path::PathBuf;
use std::sync::Arc;

use serde_json::Value;
use tauri::{Emitter, Manager};
use tunebench::api::commands::{Api, ApiError, PathPolicy};
use tunebench::api::{Workbench, WorkbenchOptions};

struct AppState {
    api: Arc<Api>,
}

#[tauri::command]
async fn call(state: tauri::State<'_, AppState>, request: Value) -> Result<Value, ApiError> {
    state.api.call_json(request).await
}

#[tauri::command]
async fn upload(state: tauri::State<'_, AppState>, name: String, bytes: Vec<u8>) -> Result<String, ApiError> {
    let api = state.api.clone();
    tauri::async_runtime::spawn_blocking(move || api.save_upload(&name, &bytes))
        .await
        .map_err(|e| ApiError::new("internal", e.to_string()))?
        .map(|p| p.display().to_string())
}

/// The `tunebench` binary that runs training and chat workers.
fn worker_exe() -> Option<PathBuf> {
    let beside = std::env::current_exe().ok()?.parent()?.join(format!("tunebench{}", std::env::consts::EXE_SUFFIX));
    if beside.is_file() {
        return Some(beside);
    }
    std::env::var_os("TUNEBENCH_BIN").map(PathBuf::from).filter(|p| p.is_file())
}

fn main() {
    tauri::Builder::default()
        .setup(|app| {
            let mut opts = WorkbenchOptions::new(tunebench::paths::home());
            opts.supervise = true;
            opts.worker_exe = Some(worker_exe().ok_or("cannot find the `tunebench` binary beside the app (or in $TUNEBENCH_BIN) to run training workers")?);
            let wb = Arc::new(tauri::async_runtime::block_on(Workbench::open(opts))?);
            let mut rx = wb.subscribe();
            let handle = app.handle().clone();
            tauri::async_runtime::spawn(async move {
                use tokio::sync::broadcast::error::RecvError;
                loop {
                    match rx.recv().await {
                        Ok(ev) => {
                            let _ = handle.emit("api-event", &ev);
                        }
                        Err(RecvError::Lagged(_)) => {
                            let _ = handle.emit("api-lagged", ());
                        }
                        Err(RecvError::Closed) => break,
                    }
                }
            });
            // The desktop user's own files: any path (the file pickers are theirs).
            let api = Arc::new(Api::new(wb, PathPolicy::Any));
            tauri::async_runtime::block_on(async { api.warm_up() });
            app.manage(AppState { api });
            Ok(())
        })
        .invoke_handler(tauri::generate_handler![call, upload])
        .run(tauri::generate_context!())
        .unwrap_or_else(|e| {
            eprintln!("tunebench-app: {e}");
            std::process::exit(1);
        });
}
