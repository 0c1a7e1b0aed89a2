//! Input paths checked before any work: each error names the path, the setting or flag that
//! gave it, what was found (nothing, a directory, a file) and what was expected.

use std::path::Path;

use crate::{Result, TrainError};

/// What a path turned out to be.
fn found(path: &Path) -> &'static str {
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => "is a directory",
        Ok(_) => "is a file",
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => "does not exist",
        Err(_) => "cannot be read",
    }
}

/// Errors unless `path` is a readable file; `source` names where the path came from (e.g.
/// `data.parquet` or `--data`) and `expected` what it should be.
pub fn expect_file(path: &Path, source: &str, expected: &str) -> Result<()> {
    match std::fs::File::open(path).and_then(|f| f.metadata()) {
        Ok(m) if m.is_file() => Ok(()),
        _ => Err(TrainError::Input(format!("{source} = {}: {}; expected {expected}", path.display(), found(path)))),
    }
}

/// Errors unless `path` is a directory holding each of `files`.
pub fn expect_dir_with(path: &Path, source: &str, expected: &str, files: &[&str]) -> Result<()> {
    if !path.is_dir() {
        return Err(TrainError::Input(format!("{source} = {}: {}; expected {expected}", path.display(), found(path))));
    }
    for file in files {
        let inner = path.join(file);
        if !inner.is_file() {
            return Err(TrainError::Input(format!(
                "{source} = {}: {} {}; expected {expected}",
                path.display(),
                inner.display(),
                found(&inner)
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_tell_a_directory_from_a_missing_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sub = dir.path().join("x.parquet");
        std::fs::create_dir(&sub).expect("mkdir");
        let err = expect_file(&sub, "--data", "a Parquet file").expect_err("dir").to_string();
        assert!(err.contains("--data = ") && err.contains("is a directory; expected a Parquet file"), "{err}");
        let err = expect_file(&dir.path().join("y"), "--data", "a Parquet file").expect_err("missing").to_string();
        assert!(err.contains("does not exist"), "{err}");
        let err = expect_dir_with(&sub, "init", "a model directory", &["config.json"]).expect_err("empty").to_string();
        assert!(err.contains("config.json does not exist"), "{err}");
        std::fs::write(sub.join("config.json"), "{}").expect("write");
        assert!(expect_dir_with(&sub, "init", "a model directory", &["config.json"]).is_ok());
    }
}
