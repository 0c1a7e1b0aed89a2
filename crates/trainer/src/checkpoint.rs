//! Atomic checkpoints: a crash or kill loses at most the work since the last one.
//!
//! Layout under the run directory:
//!
//! ```text
//! checkpoints/step-000100/model.safetensors       trainable weights, Hugging Face names
//! checkpoints/step-000100/optimizer.safetensors   AdamW moments ({name}.exp_avg, {name}.exp_avg_sq)
//! checkpoints/step-000100/state.json              step, RNG and data cursor (the caller's JSON)
//! checkpoints/latest                              name of the newest complete checkpoint
//! ```
//!
//! A checkpoint is written into `step-000100.tmp/`, synced, renamed into place, and only then is
//! `latest` replaced (write `latest.tmp`, rename). A reader that follows `latest` therefore never
//! sees a partial checkpoint. [`prune`] then removes all but the newest few; it never removes
//! the one `latest` names.
//!
//! The trainer numbers checkpoints by the run's global optimiser step (SFT steps, then
//! preference steps), so names sort in the order they were written.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use crate::{Result, TrainError};

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io { path: path.display().to_string(), source }
}

/// What a checkpoint holds.
pub struct Checkpoint {
    /// Trainable weights by name.
    pub weights: HashMap<String, Tensor>,
    /// Optimiser tensors by name.
    pub optimizer: HashMap<String, Tensor>,
    /// Everything else (step, RNG, cursor), as JSON.
    pub state: serde_json::Value,
}

/// The checkpoint directory of a run.
pub fn checkpoints_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

/// Writes a checkpoint for `step` atomically and points `latest` at it; returns its directory.
pub fn save(run_dir: &Path, step: u64, checkpoint: &Checkpoint) -> Result<PathBuf> {
    let root = checkpoints_dir(run_dir);
    fs::create_dir_all(&root).map_err(io(&root))?;
    let name = format!("step-{step:06}");
    let tmp = root.join(format!("{name}.tmp"));
    let dir = root.join(&name);
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    let write_tensors = |file: &str, tensors: &HashMap<String, Tensor>| -> Result<()> {
        let path = tmp.join(file);
        candle_core::safetensors::save(tensors, &path)
            .map_err(|e| TrainError::Checkpoint(format!("{}: {e}", path.display())))?;
        sync(&path)
    };
    write_tensors("model.safetensors", &checkpoint.weights)?;
    write_tensors("optimizer.safetensors", &checkpoint.optimizer)?;
    let state_path = tmp.join("state.json");
    let text = serde_json::to_string_pretty(&checkpoint.state)
        .map_err(|e| TrainError::Checkpoint(format!("{}: {e}", state_path.display())))?;
    fs::write(&state_path, text).map_err(io(&state_path))?;
    sync(&state_path)?;
    if dir.exists() {
        fs::remove_dir_all(&dir).map_err(io(&dir))?;
    }
    fs::rename(&tmp, &dir).map_err(io(&dir))?;
    let latest_tmp = root.join("latest.tmp");
    fs::write(&latest_tmp, &name).map_err(io(&latest_tmp))?;
    sync(&latest_tmp)?;
    fs::rename(&latest_tmp, root.join("latest")).map_err(io(&root))?;
    Ok(dir)
}

/// Loads the checkpoint `latest` points at, if any, onto `device`.
pub fn load_latest(run_dir: &Path, device: &Device) -> Result<Option<(PathBuf, Checkpoint)>> {
    let root = checkpoints_dir(run_dir);
    let latest = root.join("latest");
    if !latest.exists() {
        return Ok(None);
    }
    let name = fs::read_to_string(&latest).map_err(io(&latest))?;
    let dir = root.join(name.trim());
    let read_tensors = |file: &str| -> Result<HashMap<String, Tensor>> {
        let path = dir.join(file);
        candle_core::safetensors::load(&path, device)
            .map_err(|e| TrainError::Checkpoint(format!("{}: {e}", path.display())))
    };
    let weights = read_tensors("model.safetensors")?;
    let optimizer = read_tensors("optimizer.safetensors")?;
    let state_path = dir.join("state.json");
    let text = fs::read_to_string(&state_path).map_err(io(&state_path))?;
    let state = serde_json::from_str(&text)
        .map_err(|e| TrainError::Checkpoint(format!("{}: invalid JSON: {e}", state_path.display())))?;
    Ok(Some((dir, Checkpoint { weights, optimizer, state })))
}

/// The name `latest` points at (e.g. `step-000100`), if any.
pub fn latest_name(run_dir: &Path) -> Result<Option<String>> {
    let latest = checkpoints_dir(run_dir).join("latest");
    if !latest.exists() {
        return Ok(None);
    }
    Ok(Some(fs::read_to_string(&latest).map_err(io(&latest))?.trim().to_string()))
}

/// Names of the complete checkpoints (`step-NNNNNN`, no temporaries), oldest first.
pub fn list(run_dir: &Path) -> Result<Vec<String>> {
    let root = checkpoints_dir(run_dir);
    if !root.exists() {
        return Ok(Vec::new());
    }
    let mut names = Vec::new();
    for entry in fs::read_dir(&root).map_err(io(&root))? {
        let name = entry.map_err(io(&root))?.file_name().to_string_lossy().into_owned();
        if name.strip_prefix("step-").is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())) {
            names.push(name);
        }
    }
    names.sort_by_key(|n| n[5..].parse::<u64>().unwrap_or(u64::MAX));
    Ok(names)
}

/// Removes all but the newest `keep_last` checkpoints (and stale temporaries); the checkpoint
/// `latest` names is always kept. Returns the names removed.
pub fn prune(run_dir: &Path, keep_last: usize) -> Result<Vec<String>> {
    let root = checkpoints_dir(run_dir);
    let latest = latest_name(run_dir)?;
    let names = list(run_dir)?;
    let cut = names.len().saturating_sub(keep_last.max(1));
    let mut removed = Vec::new();
    for name in &names[..cut] {
        if latest.as_deref() == Some(name.as_str()) {
            continue;
        }
        let dir = root.join(name);
        fs::remove_dir_all(&dir).map_err(io(&dir))?;
        removed.push(name.clone());
    }
    Ok(removed)
}

/// Removes every checkpoint of a run (a fresh start in an old run directory).
pub fn clear(run_dir: &Path) -> Result<()> {
    let root = checkpoints_dir(run_dir);
    if root.exists() {
        fs::remove_dir_all(&root).map_err(io(&root))?;
    }
    Ok(())
}

fn sync(path: &Path) -> Result<()> {
    fs::File::open(path).and_then(|f| f.sync_all()).map_err(io(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_load_round_trip_and_latest_pointer() -> Result<()> {
        let dir = tempfile::tempdir().map_err(io(Path::new("tempdir")))?;
        let t = Tensor::new(&[[1.5f32, -2.0], [0.25, 8.0]], &Device::Cpu)?;
        let mut weights = HashMap::new();
        weights.insert("model.embed_tokens.weight".to_string(), t.clone());
        let mut optimizer = HashMap::new();
        optimizer.insert("model.embed_tokens.weight.exp_avg".to_string(), t.affine(0.5, 0.0)?);
        let state = serde_json::json!({"step": 7, "cursor": {"epoch": 1, "position": 3}});
        assert!(load_latest(dir.path(), &Device::Cpu)?.is_none());
        save(dir.path(), 7, &Checkpoint { weights: weights.clone(), optimizer, state: state.clone() })?;
        // A stale temporary directory from a killed writer does not confuse the next save.
        fs::create_dir_all(checkpoints_dir(dir.path()).join("step-000009.tmp")).map_err(io(dir.path()))?;
        save(dir.path(), 9, &Checkpoint { weights, optimizer: HashMap::new(), state: serde_json::json!({"step": 9}) })?;
        let (path, back) = load_latest(dir.path(), &Device::Cpu)?.expect("latest");
        assert!(path.ends_with("step-000009"));
        assert_eq!(back.state["step"], 9);
        assert_eq!(back.weights["model.embed_tokens.weight"].to_vec2::<f32>()?, t.to_vec2::<f32>()?);
        assert!(!checkpoints_dir(dir.path()).join("step-000009.tmp").exists());
        Ok(())
    }

    #[test]
    fn prune_keeps_the_newest_and_latest() -> Result<()> {
        let dir = tempfile::tempdir().map_err(io(Path::new("tempdir")))?;
        let empty = || Checkpoint { weights: HashMap::new(), optimizer: HashMap::new(), state: serde_json::json!({}) };
        for step in [2, 4, 10, 6, 8] {
            save(dir.path(), step, &empty())?;
        }
        // `latest` is step 8 (the last written), although step 10 sorts later.
        assert_eq!(list(dir.path())?, ["step-000002", "step-000004", "step-000006", "step-000008", "step-000010"]);
        let removed = prune(dir.path(), 1)?;
        assert_eq!(removed, ["step-000002", "step-000004", "step-000006"]);
        assert_eq!(list(dir.path())?, ["step-000008", "step-000010"]);
        assert_eq!(latest_name(dir.path())?.as_deref(), Some("step-000008"));
        clear(dir.path())?;
        assert!(list(dir.path())?.is_empty() && latest_name(dir.path())?.is_none());
        Ok(())
    }

    #[test]
    fn corrupt_state_is_reported_with_its_path() -> Result<()> {
        let dir = tempfile::tempdir().map_err(io(Path::new("tempdir")))?;
        save(
            dir.path(),
            1,
            &Checkpoint { weights: HashMap::new(), optimizer: HashMap::new(), state: serde_json::json!({}) },
        )?;
        let state = checkpoints_dir(dir.path()).join("step-000001").join("state.json");
        fs::write(&state, "{not json").map_err(io(&state))?;
        let err = load_latest(dir.path(), &Device::Cpu).err().expect("corrupt");
        assert!(err.to_string().contains("state.json"), "{err}");
        Ok(())
    }
}
