//! Locating Hugging Face safetensors files in a model directory.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::{ModelError, Result};

/// `model.safetensors`, or every shard named in `model.safetensors.index.json`'s `weight_map`.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index).map_err(|e| ModelError::Io {
        path: dir.display().to_string(),
        reason: format!("no model.safetensors and no readable model.safetensors.index.json: {e}"),
    })?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| ModelError::Io { path: index.display().to_string(), reason: e.to_string() })?;
    let map = value["weight_map"].as_object().ok_or_else(|| ModelError::Io {
        path: index.display().to_string(),
        reason: "expected an object `weight_map` of tensor name -> shard file".into(),
    })?;
    let shards: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
    Ok(shards.into_iter().map(|s| dir.join(s)).collect())
}
