//! Atomic, checksummed checkpoints: a crash or kill loses at most the work since the last one,
//! and a damaged checkpoint is never resumed from.
//!
//! Layout under the run directory:
//!
//! ```text
//! checkpoints/step-000100/model.safetensors       trainable weights, Hugging Face names
//! checkpoints/step-000100/optimizer.safetensors   AdamW moments ({name}.exp_avg, {name}.exp_avg_sq)
//! checkpoints/step-000100/state.json              step, RNG and data cursor (the caller's JSON)
//!                                                 and the sha256 of every file ("sha256")
//! checkpoints/latest                              name of the newest complete checkpoint
//! ```
//!
//! A checkpoint is written into `step-000100.tmp/`, synced, renamed into place, and only then is
//! `latest` replaced (write `latest.tmp`, rename); each rename is followed by a sync of its
//! directory. A reader that follows `latest` therefore never sees a partial checkpoint.
//! [`prune`] then removes all but the newest few; it never removes the one `latest` names.
//!
//! `state.json` records the SHA-256 of both tensor files and of its own content (the compact
//! JSON of everything but the `sha256` object). [`load_intact`] verifies them and falls back from
//! a damaged, missing or empty checkpoint to the newest intact one, naming each one it skipped
//! and why.
//!
//! The trainer numbers checkpoints by the run's global optimiser step (SFT steps, then
//! preference steps), so names sort in the order they were written.

use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use sha2::{Digest, Sha256};

use crate::atomic;
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
    /// Everything else (step, RNG, cursor), as a JSON object.
    pub state: serde_json::Value,
}

/// The key of `state.json` that holds the checksums.
const SHA256_KEY: &str = "sha256";

/// The checksummed files of a checkpoint.
const TENSOR_FILES: [&str; 2] = ["model.safetensors", "optimizer.safetensors"];

/// The checkpoint directory of a run.
pub fn checkpoints_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

/// Lower-case hex SHA-256 of a file's bytes, read in a stream.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = fs::File::open(path).map_err(io(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

fn sha256_bytes(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The checksum of a state object without its `sha256` entry: SHA-256 of its compact JSON.
fn state_digest(state: &serde_json::Value) -> Result<String> {
    let text = serde_json::to_vec(state).map_err(|e| TrainError::Checkpoint(format!("state.json: {e}")))?;
    Ok(sha256_bytes(&text))
}

/// Writes a checkpoint for `step` atomically and points `latest` at it; returns its directory.
pub fn save(run_dir: &Path, step: u64, checkpoint: &Checkpoint) -> Result<PathBuf> {
    let root = checkpoints_dir(run_dir);
    fs::create_dir_all(&root).map_err(io(&root))?;
    let name = format!("step-{step:06}");
    let tmp = root.join(format!("{name}.tmp"));
    let dir = root.join(&name);
    atomic::remove_if_present(&tmp)?;
    fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    let mut sums = serde_json::Map::new();
    for (file, tensors) in TENSOR_FILES.iter().zip([&checkpoint.weights, &checkpoint.optimizer]) {
        let path = tmp.join(file);
        candle_core::safetensors::save(tensors, &path)
            .map_err(|e| TrainError::Checkpoint(format!("{}: {e}", path.display())))?;
        atomic::set_default_mode(&path)?;
        atomic::sync_file(&path)?;
        sums.insert((*file).to_string(), sha256_file(&path)?.into());
    }
    let state_path = tmp.join("state.json");
    let serde_json::Value::Object(mut state) = checkpoint.state.clone() else {
        return Err(TrainError::Checkpoint(format!("{}: the state must be a JSON object", state_path.display())));
    };
    if state.contains_key(SHA256_KEY) {
        return Err(TrainError::Checkpoint(format!("{}: `{SHA256_KEY}` is a reserved key", state_path.display())));
    }
    sums.insert("state.json".into(), state_digest(&serde_json::Value::Object(state.clone()))?.into());
    state.insert(SHA256_KEY.into(), serde_json::Value::Object(sums));
    atomic::write_json(&state_path, &serde_json::Value::Object(state))?;
    atomic::sync_dir(&tmp)?;
    atomic::remove_if_present(&dir)?;
    atomic::rename_into_place(&tmp, &dir)?;
    atomic::write(&root.join("latest"), name.as_bytes())?;
    Ok(dir)
}

/// A checkpoint read back and verified.
pub struct Loaded {
    /// Its directory.
    pub dir: PathBuf,
    /// Its contents (`state` without the checksums).
    pub checkpoint: Checkpoint,
    /// Newer or `latest`-named checkpoints passed over, with the reason (e.g. `step-000010:
    /// model.safetensors: SHA-256 mismatch`).
    pub skipped: Vec<String>,
}

/// Reads and verifies the checkpoint in `dir`: every checksum must match and every file parse.
pub fn load_dir(dir: &Path, device: &Device) -> Result<Checkpoint> {
    let state_path = dir.join("state.json");
    if !dir.is_dir() {
        return Err(TrainError::Checkpoint(format!("{}: missing", dir.display())));
    }
    let text = fs::read_to_string(&state_path).map_err(io(&state_path))?;
    let mut state: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| TrainError::Checkpoint(format!("{}: invalid JSON: {e}", state_path.display())))?;
    let sums = state.as_object_mut().and_then(|o| o.remove(SHA256_KEY)).ok_or_else(|| {
        TrainError::Checkpoint(format!(
            "{}: no `{SHA256_KEY}` checksums, so it cannot be verified",
            state_path.display()
        ))
    })?;
    let expected = |file: &str| -> Result<String> {
        sums.get(file)
            .and_then(|v| v.as_str())
            .map(str::to_owned)
            .ok_or_else(|| TrainError::Checkpoint(format!("{}: `{SHA256_KEY}.{file}` missing", state_path.display())))
    };
    if state_digest(&state)? != expected("state.json")? {
        return Err(TrainError::Checkpoint(format!(
            "{}: SHA-256 mismatch (the file was changed or damaged)",
            state_path.display()
        )));
    }
    let mut tensors = Vec::new();
    for file in TENSOR_FILES {
        let path = dir.join(file);
        if sha256_file(&path)? != expected(file)? {
            return Err(TrainError::Checkpoint(format!(
                "{}: SHA-256 mismatch (the file was changed or damaged)",
                path.display()
            )));
        }
        tensors.push(
            candle_core::safetensors::load(&path, device)
                .map_err(|e| TrainError::Checkpoint(format!("{}: {e}", path.display())))?,
        );
    }
    let optimizer = tensors.pop().unwrap_or_default();
    let weights = tensors.pop().unwrap_or_default();
    Ok(Checkpoint { weights, optimizer, state })
}

/// The newest intact checkpoint of a run onto `device`: the one `latest` names, else (when it
/// is missing, empty or damaged) the complete checkpoints from the newest down. `None` when the
/// run has no checkpoint at all; an error naming each one when none is intact.
pub fn load_intact(run_dir: &Path, device: &Device) -> Result<Option<Loaded>> {
    let root = checkpoints_dir(run_dir);
    let latest = latest_name(run_dir).unwrap_or(None).filter(|n| is_checkpoint_name(n));
    let mut candidates: Vec<String> = latest.iter().cloned().collect();
    candidates.extend(list(run_dir)?.into_iter().rev().filter(|n| Some(n) != latest.as_ref()));
    let mut skipped = Vec::new();
    if candidates.is_empty() {
        if let Ok(Some(name)) = latest_name(run_dir) {
            skipped.push(format!("`latest` names `{name}`, which is not a checkpoint"));
        } else {
            return Ok(None);
        }
    }
    for name in candidates {
        let dir = root.join(&name);
        match load_dir(&dir, device) {
            Ok(checkpoint) => return Ok(Some(Loaded { dir, checkpoint, skipped })),
            Err(e) => skipped.push(format!("{name}: {}", strip(&e))),
        }
    }
    Err(TrainError::Checkpoint(format!(
        "{}: no intact checkpoint to resume from ({}); start the run again without --resume",
        root.display(),
        skipped.join("; ")
    )))
}

/// A checkpoint error's message without the `checkpoint: ` prefix.
fn strip(e: &TrainError) -> String {
    match e {
        TrainError::Checkpoint(m) => m.clone(),
        other => other.to_string(),
    }
}

/// The name `latest` points at (e.g. `step-000100`), if any.
pub fn latest_name(run_dir: &Path) -> Result<Option<String>> {
    let latest = checkpoints_dir(run_dir).join("latest");
    if !latest.exists() {
        return Ok(None);
    }
    Ok(Some(fs::read_to_string(&latest).map_err(io(&latest))?.trim().to_string()))
}

fn is_checkpoint_name(name: &str) -> bool {
    name.strip_prefix("step-").is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
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
        if is_checkpoint_name(&name) {
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
    if !removed.is_empty() {
        atomic::sync_dir(&root)?;
    }
    Ok(removed)
}

/// Removes every checkpoint of a run (a fresh start in an old run directory).
pub fn clear(run_dir: &Path) -> Result<()> {
    atomic::remove_if_present(&checkpoints_dir(run_dir))
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
        assert!(load_intact(dir.path(), &Device::Cpu)?.is_none());
        save(dir.path(), 7, &Checkpoint { weights: weights.clone(), optimizer, state: state.clone() })?;
        // A stale temporary directory from a killed writer does not confuse the next save.
        fs::create_dir_all(checkpoints_dir(dir.path()).join("step-000009.tmp")).map_err(io(dir.path()))?;
        save(dir.path(), 9, &Checkpoint { weights, optimizer: HashMap::new(), state: serde_json::json!({"step": 9}) })?;
        let loaded = load_intact(dir.path(), &Device::Cpu)?.expect("latest");
        let (path, back) = (loaded.dir, loaded.checkpoint);
        assert!(path.ends_with("step-000009") && loaded.skipped.is_empty());
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
        let err = load_intact(dir.path(), &Device::Cpu).err().expect("corrupt");
        assert!(err.to_string().contains("state.json"), "{err}");
        Ok(())
    }

    fn tensors(value: f32) -> Result<HashMap<String, Tensor>> {
        let t = Tensor::new(&[value, value + 1.0, value + 2.0], &Device::Cpu)?;
        Ok(HashMap::from([("w".to_string(), t)]))
    }

    fn save_step(dir: &Path, step: u64) -> Result<PathBuf> {
        let state = serde_json::json!({"step": step});
        save(dir, step, &Checkpoint { weights: tensors(step as f32)?, optimizer: tensors(-1.0)?, state })
    }

    fn flip_byte(path: &Path, offset_from_end: usize) -> Result<()> {
        let mut bytes = fs::read(path).map_err(io(path))?;
        let i = bytes.len() - offset_from_end;
        bytes[i] ^= 0x01;
        fs::write(path, bytes).map_err(io(path))
    }

    #[test]
    fn a_flipped_byte_anywhere_is_caught_and_the_newest_intact_checkpoint_is_used() -> Result<()> {
        for file in ["model.safetensors", "optimizer.safetensors", "state.json"] {
            let dir = tempfile::tempdir().map_err(io(Path::new("tempdir")))?;
            save_step(dir.path(), 2)?;
            let newest = save_step(dir.path(), 4)?;
            // A byte of the data (the tensor values; the step number in state.json).
            let from_end = if file == "state.json" { 3 } else { 2 };
            let text_before = fs::read(newest.join(file)).map_err(io(&newest))?;
            flip_byte(&newest.join(file), from_end)?;
            assert_ne!(text_before, fs::read(newest.join(file)).map_err(io(&newest))?);
            let loaded = load_intact(dir.path(), &Device::Cpu)?.expect("a checkpoint");
            assert!(loaded.dir.ends_with("step-000002"), "{file}: {}", loaded.dir.display());
            assert_eq!(loaded.checkpoint.state, serde_json::json!({"step": 2}), "{file}");
            assert_eq!(loaded.skipped.len(), 1, "{file}: {:?}", loaded.skipped);
            assert!(loaded.skipped[0].starts_with("step-000004: "), "{:?}", loaded.skipped);
            assert!(loaded.skipped[0].contains(file), "{:?}", loaded.skipped);
            // The only checkpoint damaged: an error naming it, not a fresh start.
            fs::remove_dir_all(checkpoints_dir(dir.path()).join("step-000002")).map_err(io(dir.path()))?;
            let err = load_intact(dir.path(), &Device::Cpu).err().expect("none intact").to_string();
            assert!(err.contains("no intact checkpoint") && err.contains("step-000004"), "{err}");
        }
        Ok(())
    }

    #[test]
    fn latest_naming_a_missing_or_empty_checkpoint_falls_back() -> Result<()> {
        let dir = tempfile::tempdir().map_err(io(Path::new("tempdir")))?;
        save_step(dir.path(), 2)?;
        let root = checkpoints_dir(dir.path());
        // `latest` names a checkpoint that is not there.
        fs::write(root.join("latest"), "step-000009").map_err(io(&root))?;
        let loaded = load_intact(dir.path(), &Device::Cpu)?.expect("fallback");
        assert!(loaded.dir.ends_with("step-000002"));
        assert!(loaded.skipped[0].starts_with("step-000009: ") && loaded.skipped[0].contains("missing"));
        // An empty checkpoint directory, newer than the intact one.
        fs::create_dir_all(root.join("step-000004")).map_err(io(&root))?;
        fs::write(root.join("latest"), "step-000004").map_err(io(&root))?;
        let loaded = load_intact(dir.path(), &Device::Cpu)?.expect("fallback");
        assert!(loaded.dir.ends_with("step-000002"), "{:?}", loaded.skipped);
        assert!(loaded.skipped[0].contains("state.json"), "{:?}", loaded.skipped);
        // An empty model file.
        let newest = save_step(dir.path(), 6)?;
        fs::write(newest.join("model.safetensors"), b"").map_err(io(&newest))?;
        let loaded = load_intact(dir.path(), &Device::Cpu)?.expect("fallback");
        assert!(loaded.dir.ends_with("step-000002"), "{:?}", loaded.skipped);
        assert_eq!(loaded.skipped.len(), 2, "{:?}", loaded.skipped);
        // Garbage in `latest` with nothing else: an error, not a fresh start.
        let lone = tempfile::tempdir().map_err(io(Path::new("tempdir")))?;
        fs::create_dir_all(checkpoints_dir(lone.path())).map_err(io(lone.path()))?;
        fs::write(checkpoints_dir(lone.path()).join("latest"), "../x").map_err(io(lone.path()))?;
        assert!(load_intact(lone.path(), &Device::Cpu).is_err());
        Ok(())
    }

    #[cfg(unix)]
    #[test]
    fn checkpoint_files_are_not_private_to_the_owner() -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().map_err(io(Path::new("tempdir")))?;
        let probe = dir.path().join("probe");
        fs::File::create(&probe).map_err(io(&probe))?;
        let expected = fs::metadata(&probe).map_err(io(&probe))?.permissions().mode() & 0o777;
        let saved = save_step(dir.path(), 1)?;
        for file in ["model.safetensors", "optimizer.safetensors", "state.json"] {
            let mode = fs::metadata(saved.join(file)).map_err(io(&saved))?.permissions().mode() & 0o777;
            assert_eq!(mode, expected, "{file}: {mode:o}");
        }
        Ok(())
    }
}
