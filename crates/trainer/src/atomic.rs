//! Crash-safe file output: every file and directory the trainer leaves is written under a
//! temporary sibling name, synced, renamed into place, and its parent directory synced, so a
//! kill or power loss leaves either the old version or the complete new one, never a part.
//! Files get the mode the process umask gives a new file (`0o666 & !umask`), also those that
//! libraries write with a private mode.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::{Result, TrainError};

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io { path: path.display().to_string(), source }
}

/// `dir/.NAME.tmp`: the temporary sibling of `path` (hidden, and never a name the trainer
/// reads as a result).
pub fn temp_sibling(path: &Path) -> PathBuf {
    let name = path.file_name().map_or_else(|| "out".into(), |n| n.to_string_lossy().into_owned());
    path.with_file_name(format!(".{name}.tmp"))
}

fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Flushes a directory's entries (renames, creations) to disk.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|f| f.sync_all()).map_err(io(dir))
}

/// Flushes a file's contents to disk.
pub fn sync_file(path: &Path) -> Result<()> {
    File::open(path).and_then(|f| f.sync_all()).map_err(io(path))
}

/// Writes `bytes` to `path` atomically: a temporary sibling, synced, renamed over `path`, the
/// directory synced. The file is created with the process umask.
pub fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temp_sibling(path);
    remove_if_present(&tmp)?;
    let mut file = OpenOptions::new().write(true).create_new(true).open(&tmp).map_err(io(&tmp))?;
    file.write_all(bytes).and_then(|()| file.sync_all()).map_err(io(&tmp))?;
    drop(file);
    rename_into_place(&tmp, path)
}

/// Writes `value` as pretty JSON to `path` atomically.
pub fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| TrainError::Io { path: path.display().to_string(), source: std::io::Error::other(e) })?;
    write(path, text.as_bytes())
}

/// Produces the file `path` atomically with `produce`, which writes the file it is given (a
/// temporary sibling); on success the file gets the umask's mode, is synced and renamed into
/// place; on failure the temporary file is removed.
pub fn produce_file(path: &Path, produce: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = temp_sibling(path);
    remove_if_present(&tmp)?;
    let outcome = produce(&tmp).and_then(|()| {
        set_default_mode(&tmp)?;
        sync_file(&tmp)
    });
    if let Err(e) = outcome {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    rename_into_place(&tmp, path)
}

/// Produces the directory `dir` atomically with `produce`, which fills the (fresh, empty)
/// directory it is given (a temporary sibling): its files get the umask's mode and are synced,
/// then it replaces `dir` (an earlier `dir` is moved aside first and removed after). On failure
/// the temporary directory is removed and `dir` is left as it was.
pub fn produce_dir(dir: &Path, produce: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = temp_sibling(dir);
    remove_if_present(&tmp)?;
    fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    let outcome = produce(&tmp).and_then(|()| {
        for entry in fs::read_dir(&tmp).map_err(io(&tmp))? {
            let path = entry.map_err(io(&tmp))?.path();
            if path.is_file() {
                set_default_mode(&path)?;
                sync_file(&path)?;
            }
        }
        sync_dir(&tmp)
    });
    if let Err(e) = outcome {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let parent = parent_of(dir);
    let old = parent
        .join(format!(".{}.old", dir.file_name().map_or_else(|| "out".into(), |n| n.to_string_lossy().into_owned())));
    remove_if_present(&old)?;
    if dir.exists() {
        fs::rename(dir, &old).map_err(io(dir))?;
    }
    fs::rename(&tmp, dir).map_err(io(dir))?;
    sync_dir(parent)?;
    remove_if_present(&old)
}

/// Renames `tmp` over `path` and syncs their directory.
pub fn rename_into_place(tmp: &Path, path: &Path) -> Result<()> {
    fs::rename(tmp, path).map_err(io(path))?;
    sync_dir(parent_of(path))
}

/// Removes a file or directory tree if it exists.
pub fn remove_if_present(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path).map_err(io(path)),
        Ok(_) => fs::remove_file(path).map_err(io(path)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(TrainError::Io { path: path.display().to_string(), source }),
    }
}

/// Gives `path` the permissions a file newly created by this process gets (`0o666 & !umask`),
/// whatever mode the library that wrote it chose. The umask is read from a probe file created
/// beside it (the only portable way to read it without changing it).
#[cfg(unix)]
pub fn set_default_mode(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let probe = parent_of(path).join(format!(".mode-probe-{}", std::process::id()));
    let file = OpenOptions::new().write(true).create(true).truncate(true).open(&probe).map_err(io(&probe))?;
    let mode = file.metadata().map_err(io(&probe))?.permissions().mode() & 0o777;
    drop(file);
    fs::remove_file(&probe).map_err(io(&probe))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io(path))
}

/// Elsewhere files keep the mode they were created with.
#[cfg(not(unix))]
pub fn set_default_mode(_path: &Path) -> Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir() -> tempfile::TempDir {
        tempfile::tempdir().expect("tempdir")
    }

    #[test]
    fn write_replaces_the_file_and_leaves_no_temporary() -> Result<()> {
        let dir = tmpdir();
        let path = dir.path().join("result.json");
        write(&path, b"old")?;
        write(&path, b"new")?;
        assert_eq!(fs::read(&path).map_err(io(&path))?, b"new");
        let names: Vec<_> =
            fs::read_dir(dir.path()).map_err(io(dir.path()))?.flatten().map(|e| e.file_name()).collect();
        assert_eq!(names, ["result.json"]);
        Ok(())
    }

    #[test]
    fn a_failed_directory_keeps_the_old_one() -> Result<()> {
        let dir = tmpdir();
        let model = dir.path().join("model");
        produce_dir(&model, |d| write(&d.join("a"), b"1"))?;
        let err = produce_dir(&model, |d| {
            write(&d.join("a"), b"2")?;
            Err(TrainError::Config("boom".into()))
        });
        assert!(err.is_err());
        assert_eq!(fs::read(model.join("a")).map_err(io(&model))?, b"1");
        assert!(!temp_sibling(&model).exists());
        produce_dir(&model, |d| write(&d.join("b"), b"3"))?;
        assert!(!model.join("a").exists() && model.join("b").is_file());
        Ok(())
    }

    #[cfg(unix)]
    #[test]
    fn produced_files_get_the_umask_mode_not_a_private_one() -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let dir = tmpdir();
        let reference = dir.path().join("reference");
        File::create(&reference).map_err(io(&reference))?;
        let expected = fs::metadata(&reference).map_err(io(&reference))?.permissions().mode() & 0o777;
        let path = dir.path().join("weights");
        produce_file(&path, |tmp| {
            File::create(tmp).map_err(io(tmp))?;
            fs::set_permissions(tmp, fs::Permissions::from_mode(0o600)).map_err(io(tmp))
        })?;
        assert_eq!(fs::metadata(&path).map_err(io(&path))?.permissions().mode() & 0o777, expected);
        Ok(())
    }
}
