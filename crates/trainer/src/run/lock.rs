//! The run directory's lock: one trainer per directory. An advisory exclusive lock on
//! `DIR/.lock` (flock on Unix), held for the whole run and released by the operating system
//! when the process exits or is killed, so a stale lock never blocks a later run. The file
//! holds the owner's pid, for the error a second trainer gets.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::Path;

use crate::{Result, TrainError};

/// The lock file's name inside the run directory.
pub const LOCK_FILE: &str = ".lock";

/// A held lock; dropping it releases the lock.
#[derive(Debug)]
pub struct RunLock {
    _file: File,
}

/// Takes the lock of `run_dir` (which must exist), or fails with "in use by pid N".
pub fn lock(run_dir: &Path) -> Result<RunLock> {
    let path = run_dir.join(LOCK_FILE);
    let io = |source| TrainError::Io { path: path.display().to_string(), source };
    let mut file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(io)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let mut owner = String::new();
            let _ = file.read_to_string(&mut owner);
            let owner = owner.trim();
            let who = if owner.is_empty() { "another process".to_string() } else { format!("pid {owner}") };
            return Err(TrainError::Input(format!(
                "run directory {} in use by {who} (another slime-trainer holds {}); wait for it to end or use \
                 another --run-dir",
                run_dir.display(),
                path.display()
            )));
        }
        Err(TryLockError::Error(source)) => return Err(io(source)),
    }
    file.set_len(0).map_err(io)?;
    file.rewind().map_err(io)?;
    write!(file, "{}", std::process::id()).and_then(|()| file.flush()).map_err(io)?;
    Ok(RunLock { _file: file })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_names_the_holder_and_the_lock_is_released_on_drop() -> Result<()> {
        let dir = tempfile::tempdir().expect("tempdir");
        let held = lock(dir.path())?;
        let err = lock(dir.path()).expect_err("second lock").to_string();
        assert!(err.contains(&format!("in use by pid {}", std::process::id())), "{err}");
        drop(held);
        lock(dir.path())?;
        Ok(())
    }
}
