//! Where a repository's files live. The repository reads and writes named files
//! (`config`, `keys/…`, `packs/ab/…`, `index/…`, `snapshots/…`, `pending/…`) through
//! [`Backend`]; a local directory is [`Local`]. Names are `/`-separated and checked by
//! [`check_name`] before they touch a path or a key.
//!
//! A backend's writes are whole or absent (a reader never sees half a file) and durable when
//! `write` returns; `list` never shows a file being written.

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::BackupError;

/// The most a file read whole may be (configs, keys, indexes, snapshots).
pub const MAX_WHOLE: u64 = 1 << 30;

pub trait Backend: Send + Sync {
    /// A file, whole (at most [`MAX_WHOLE`] bytes).
    fn read(&self, name: &str) -> Result<Vec<u8>, BackupError>;
    /// `len` bytes of a file from `offset`.
    fn read_range(&self, name: &str, offset: u64, len: u64) -> Result<Vec<u8>, BackupError>;
    /// Writes a file whole (replacing one of the same name), durably.
    fn write(&self, name: &str, bytes: &[u8]) -> Result<(), BackupError>;
    /// The files under `prefix` (a folder name such as `packs`), at any depth, with their
    /// sizes, sorted by name.
    fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>, BackupError>;
    /// Removes a file; removing an absent file is not an error.
    fn remove(&self, name: &str) -> Result<(), BackupError>;
    /// Whether the repository location holds anything yet.
    fn is_empty(&self) -> Result<bool, BackupError>;
    /// Where it is, for messages.
    fn describe(&self) -> String;
}

/// Refuses a name that is not plain: empty parts, `.` or `..`, a leading `/`, a part that
/// starts with `.` (temporary files), anything but letters, digits, `-`, `_` and `.`.
pub fn check_name(name: &str) -> Result<(), BackupError> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && name.split('/').all(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        });
    if ok {
        Ok(())
    } else {
        Err(BackupError::BadPack(format!(
            "{name:?} is not a repository file name"
        )))
    }
}

pub(crate) fn io(path: &Path, e: std::io::Error) -> BackupError {
    BackupError::Io(std::io::Error::new(
        e.kind(),
        format!("{}: {e}", path.display()),
    ))
}

/// Bytes of the files under `dir` (links not followed; 0 if it is not there): a local
/// repository's size.
pub fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    // The layout is shallow (packs/ab/…); the depth bound only stops a pathological tree.
    let mut stack = vec![(dir.to_path_buf(), 0u32)];
    while let Some((d, depth)) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let Ok(md) = e.metadata() else { continue };
            if md.is_dir() && depth < 16 {
                stack.push((e.path(), depth + 1));
            } else if md.is_file() {
                total += md.len();
            }
        }
    }
    total
}

/// Writes `path` whole or not at all: a temporary file beside it, synced, renamed over it.
pub fn write_durable(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, path)
}

/// A repository in a local directory.
pub struct Local {
    dir: PathBuf,
}

impl Local {
    pub fn new(dir: &Path) -> Local {
        Local {
            dir: dir.to_path_buf(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, name: &str) -> Result<PathBuf, BackupError> {
        check_name(name)?;
        Ok(self.dir.join(name))
    }
}

impl Backend for Local {
    fn read(&self, name: &str) -> Result<Vec<u8>, BackupError> {
        let path = self.path(name)?;
        let f = fs::File::open(&path).map_err(|e| io(&path, e))?;
        let mut out = Vec::new();
        f.take(MAX_WHOLE + 1)
            .read_to_end(&mut out)
            .map_err(|e| io(&path, e))?;
        if out.len() as u64 > MAX_WHOLE {
            return Err(BackupError::BadPack(format!(
                "{} is too large",
                path.display()
            )));
        }
        Ok(out)
    }

    fn read_range(&self, name: &str, offset: u64, len: u64) -> Result<Vec<u8>, BackupError> {
        let path = self.path(name)?;
        if len > MAX_WHOLE {
            return Err(BackupError::BadPack(format!(
                "{}: a read of {len} bytes",
                path.display()
            )));
        }
        let mut f = fs::File::open(&path).map_err(|e| io(&path, e))?;
        f.seek(SeekFrom::Start(offset)).map_err(|e| io(&path, e))?;
        let mut out = vec![0u8; len as usize];
        f.read_exact(&mut out).map_err(|e| io(&path, e))?;
        Ok(out)
    }

    fn write(&self, name: &str, bytes: &[u8]) -> Result<(), BackupError> {
        let path = self.path(name)?;
        let dir = path.parent().expect("repository paths have a parent");
        fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        let tmp = dir.join(format!(
            ".tmp-{}-{}",
            std::process::id(),
            path.file_name().unwrap_or_default().to_string_lossy()
        ));
        let mut f = fs::File::create(&tmp).map_err(|e| io(&tmp, e))?;
        f.write_all(bytes).map_err(|e| io(&tmp, e))?;
        f.sync_all().map_err(|e| io(&tmp, e))?;
        fs::rename(&tmp, &path).map_err(|e| io(&path, e))?;
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io(dir, e))
    }

    fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>, BackupError> {
        check_name(prefix)?;
        let mut out = Vec::new();
        let mut stack = vec![(self.dir.join(prefix), prefix.to_string())];
        while let Some((dir, name)) = stack.pop() {
            let rd = match fs::read_dir(&dir) {
                Ok(rd) => rd,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io(&dir, e)),
            };
            for e in rd {
                let e = e.map_err(|e| io(&dir, e))?;
                let n = e.file_name().to_string_lossy().into_owned();
                if n.starts_with('.') {
                    continue;
                }
                let md = e.metadata().map_err(|err| io(&e.path(), err))?;
                if md.is_dir() {
                    stack.push((e.path(), format!("{name}/{n}")));
                } else {
                    out.push((format!("{name}/{n}"), md.len()));
                }
            }
        }
        out.sort();
        Ok(out)
    }

    fn remove(&self, name: &str) -> Result<(), BackupError> {
        let path = self.path(name)?;
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io(&path, e)),
        }
        let dir = path.parent().expect("repository paths have a parent");
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io(dir, e))
    }

    fn is_empty(&self) -> Result<bool, BackupError> {
        match fs::read_dir(&self.dir) {
            Ok(mut d) => Ok(d.next().is_none()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
            Err(e) => Err(io(&self.dir, e)),
        }
    }

    fn describe(&self) -> String {
        self.dir.display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_plain() {
        for good in ["config", "packs/ab/abcdef", "keys/ministry-ops.json"] {
            check_name(good).unwrap();
        }
        for bad in [
            "",
            "/etc",
            "../x",
            "a//b",
            "packs/.tmp-1",
            "a/./b",
            "a b",
            "a\\b",
        ] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn local_writes_whole_files_and_lists_them() {
        let t = tempfile::tempdir().unwrap();
        let b = Local::new(&t.path().join("repo"));
        assert!(b.is_empty().unwrap());
        b.write("packs/ab/abcd", b"pack").unwrap();
        b.write("index/01", b"index").unwrap();
        fs::write(t.path().join("repo/packs/ab/.tmp-9-x"), b"half").unwrap();
        assert_eq!(b.list("packs").unwrap(), vec![("packs/ab/abcd".into(), 4)]);
        assert_eq!(b.read_range("packs/ab/abcd", 1, 2).unwrap(), b"ac");
        assert!(b.read_range("packs/ab/abcd", 3, 2).is_err(), "past the end");
        b.remove("packs/ab/abcd").unwrap();
        b.remove("packs/ab/abcd").unwrap();
        assert!(b.list("packs").unwrap().is_empty());
        assert!(b.read("../x").is_err());
    }
}
