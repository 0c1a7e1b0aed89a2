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

    /// Opens `path` for appending after cutting it to its first `len` bytes (a resumed run drops
    /// the lines written after its checkpoint; `len = 0` starts the file afresh).
    pub fn open_truncated(path: &Path, len: u64) -> Result<Self> {
        let err = |source| TrainError::Io { path: path.display().to_string(), source };
        let file = OpenOptions::new().create(true).write(true).truncate(false).open(path).map_err(err)?;
        let size = file.metadata().map_err(err)?.len();
        if size < len {
            return Err(TrainError::Checkpoint(format!(
                "{} has {size} bytes, fewer than the {len} the checkpoint recorded",
                path.display()
            )));
        }
        file.set_len(len).map_err(err)?;
        drop(file);
        Self::open(path)
    }

    /// Bytes written so far (everything is flushed after each line).
    pub fn len_bytes(&self) -> Result<u64> {
        let err = |source| TrainError::Io { path: self.path.display().to_string(), source };
        Ok(self.out.get_ref().metadata().map_err(err)?.len())
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
        // Cutting back to the first line and appending gives two lines again.
        let first_len = text.lines().next().map_or(0, |l| l.len() as u64 + 1);
        let mut log = MetricsLog::open_truncated(&path, first_len)?;
        assert_eq!(log.len_bytes()?, first_len);
        log.write("preference", 3, &values)?;
        let text = std::fs::read_to_string(&path).map_err(|source| TrainError::Io { path: "read".into(), source })?;
        let steps: Vec<u64> = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json")["step"].as_u64().expect("step"))
            .collect();
        assert_eq!(steps, [1, 3]);
        assert!(MetricsLog::open_truncated(&path, 1 << 20).is_err());
        Ok(())
    }
}
