//! Per-step metrics as JSON lines (`metrics.jsonl`): one object per step with TRL's names
//! (`loss`, `rewards/margins`, ...), each loss term, `learning_rate`, `grad_norm`,
//! `tokens_per_second`, and the unlearning and collapse metrics.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::{Result, TrainError};

/// Appends one JSON object per line and flushes after each, so a killed run keeps every
/// completed step.
pub struct MetricsLog {
    path: PathBuf,
    out: BufWriter<File>,
}

impl MetricsLog {
    /// Opens (appends to) `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|source| TrainError::Io { path: path.display().to_string(), source })?;
        Ok(Self { path: path.to_path_buf(), out: BufWriter::new(file) })
    }

    /// Writes `{"stage": .., "step": .., name: value, ...}`. Non-finite values are written as
    /// `null` (JSON has no NaN).
    pub fn write(&mut self, stage: &str, step: u64, values: &BTreeMap<String, f64>) -> Result<()> {
        let mut object = serde_json::Map::new();
        object.insert("stage".into(), stage.into());
        object.insert("step".into(), step.into());
        for (k, &v) in values {
            object.insert(k.clone(), serde_json::Number::from_f64(v).map_or(serde_json::Value::Null, Into::into));
        }
        let line = serde_json::Value::Object(object).to_string();
        let err = |source| TrainError::Io { path: self.path.display().to_string(), source };
        writeln!(self.out, "{line}").map_err(err)?;
        self.out.flush().map_err(|source| TrainError::Io { path: self.path.display().to_string(), source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_valid_json_and_appended() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|source| TrainError::Io { path: "tempdir".into(), source })?;
        let path = dir.path().join("metrics.jsonl");
        let mut values = BTreeMap::new();
        values.insert("loss".to_string(), 0.5);
        values.insert("grad_norm".to_string(), f64::NAN);
        MetricsLog::open(&path)?.write("preference", 1, &values)?;
        MetricsLog::open(&path)?.write("preference", 2, &values)?;
        let text = std::fs::read_to_string(&path).map_err(|source| TrainError::Io { path: "read".into(), source })?;
        let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).expect("json line")).collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1]["step"], 2);
        assert_eq!(lines[0]["loss"], 0.5);
        assert!(lines[0]["grad_norm"].is_null());
        Ok(())
    }
}
