//! Crash-safe files: atomic writes and training checkpoints (adapter + optimizer state +
//! trainer state), each checkpoint a folder that appears complete or not at all.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Writes `path` by writing a temporary sibling with `write`, fsyncing it and renaming it over
/// `path`, then fsyncing the folder: readers see the old file or the new one, never half.
pub fn atomic_write(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{file_name}.tmp"));
    write(&tmp)?;
    File::open(&tmp).and_then(|f| f.sync_all()).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    sync_dir(path.parent().unwrap_or(Path::new(".")));
    Ok(())
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Trainer position saved with each checkpoint: enough to continue exactly.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub step: usize,
    /// Tokens trained on so far.
    pub tokens_seen: u64,
    /// The data loader's position (epoch, index, shuffle seed).
    pub batcher: serde_json::Value,
    /// The run seed (dropout masks are drawn from seed and step, so this is the RNG state).
    pub seed: u64,
    /// Wall-clock seconds spent training before this checkpoint.
    pub elapsed_s: f64,
    /// Last validation loss, if any.
    pub val_loss: Option<f64>,
    /// Loss of every completed step (for charts and the resume check).
    pub losses: Vec<f64>,
    /// f16 training's dynamic loss scale (absent otherwise, and in older checkpoints).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<super::optim::LossScaler>,
}

/// File names inside a checkpoint folder.
pub const ADAPTER_DIR: &str = "adapter";
const OPTIM_FILE: &str = "optimizer.safetensors";
const STATE_FILE: &str = "trainer_state.json";

/// Writes a checkpoint folder `dir` (e.g. `checkpoints/step-000120`): the tree is built under
/// a temporary name, every file fsynced, then renamed into place.
pub fn save(dir: &Path, write_adapter: impl FnOnce(&Path) -> Result<()>, optim: &HashMap<String, Tensor>, state: &TrainerState) -> Result<()> {
    let parent = dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = parent.join(format!(".{name}.partial"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    write_adapter(&tmp.join(ADAPTER_DIR))?;
    let optim_path = tmp.join(OPTIM_FILE);
    candle_core::safetensors::save(optim, &optim_path)?;
    let state_json = serde_json::to_vec_pretty(state).map_err(|e| Error::Msg(e.to_string()))?;
    let state_path = tmp.join(STATE_FILE);
    std::fs::write(&state_path, state_json).map_err(|e| Error::io(&state_path, e))?;
    for f in [&optim_path, &state_path] {
        File::open(f).and_then(|f| f.sync_all()).map_err(|e| Error::io(f, e))?;
    }
    sync_dir(&tmp.join(ADAPTER_DIR));
    sync_dir(&tmp);
    if dir.exists() {
        remove(dir)?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))?;
    sync_dir(parent);
    Ok(())
}

/// Deletes a checkpoint folder so that it is never seen half-deleted: it is first renamed to
/// a hidden `.<name>.deleting` sibling (atomic), then removed. Leftovers of a process killed
/// while removing are cleaned by [`clean_leftovers`].
pub fn remove(dir: &Path) -> Result<()> {
    let parent = dir.parent().unwrap_or(Path::new("."));
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let doomed = parent.join(format!(".{name}.deleting"));
    if doomed.exists() {
        std::fs::remove_dir_all(&doomed).map_err(|e| Error::io(&doomed, e))?;
    }
    std::fs::rename(dir, &doomed).map_err(|e| Error::io(dir, e))?;
    sync_dir(parent);
    std::fs::remove_dir_all(&doomed).map_err(|e| Error::io(&doomed, e))
}

/// Removes what a killed process left under `checkpoints_dir`: half-written (`.partial`) and
/// half-deleted (`.deleting`) folders.
pub fn clean_leftovers(checkpoints_dir: &Path) {
    for e in std::fs::read_dir(checkpoints_dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') && (name.ends_with(".partial") || name.ends_with(".deleting")) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// A checkpoint read back.
pub struct Loaded {
    /// The adapter folder inside the checkpoint.
    pub adapter_dir: PathBuf,
    /// Optimizer tensors.
    pub optim: HashMap<String, Tensor>,
    /// Trainer position.
    pub state: TrainerState,
}

/// Reads a checkpoint folder.
pub fn load(dir: &Path, device: &Device) -> Result<Loaded> {
    let state_path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&state_path).map_err(|e| Error::io(&state_path, e))?;
    let state: TrainerState = serde_json::from_str(&text).map_err(|e| Error::bad_input(&state_path, Some(e.line()), e.to_string()))?;
    let optim_path = dir.join(OPTIM_FILE);
    let optim = candle_core::safetensors::load(&optim_path, device).map_err(|e| Error::bad_input(&optim_path, None, e.to_string()))?;
    Ok(Loaded { adapter_dir: dir.join(ADAPTER_DIR), optim, state })
}

/// The checkpoint folders under `checkpoints_dir`, oldest first (complete ones only).
pub fn list(checkpoints_dir: &Path) -> Vec<(usize, PathBuf)> {
    let mut v: Vec<(usize, PathBuf)> = std::fs::read_dir(checkpoints_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("step-")?.parse().ok()?;
            Some((step, e.path()))
        })
        .collect();
    v.sort();
    v
}

/// The folder name of the checkpoint at `step`.
pub fn dir_name(step: usize) -> String {
    format!("step-{step:06}")
}
