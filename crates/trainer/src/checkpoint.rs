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
//! sees a partial checkpoint.

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
