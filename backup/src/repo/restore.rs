//! Restoring a snapshot into a directory: plain relative paths only, never through a link,
//! files with their modes and times, links, directories' modes and times last, owners when
//! the restorer may set them.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path};

use serde::Serialize;

use super::{Kind, Node, Repo, io};
use crate::BackupError;

/// What a restore did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RestoreSummary {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub bytes: u64,
    /// Owners that could not be set (not root): the files are the restorer's.
    pub owners_not_set: u64,
}

impl Repo {
    /// Restores snapshot `id` under `target` (created if absent).
    pub fn restore(&self, id: &str, target: &Path) -> Result<RestoreSummary, BackupError> {
        let snap = self.snapshot(id)?;
        let mut sum = RestoreSummary::default();
        let mut dirs = Vec::new();
        fs::create_dir_all(target).map_err(|e| io(target, e))?;
        for n in &snap.nodes {
            // A node's path is relative and plain: never `..`, never absolute.
            let rel = Path::new(&n.path);
            if n.path.is_empty() || !rel.components().all(|c| matches!(c, Component::Normal(_))) {
                return Err(BackupError::BadPack(format!(
                    "snapshot path {:?} is not a plain relative path",
                    n.path
                )));
            }
            // Nor through a link: a link restored earlier (or already in the target) must not
            // carry a later node outside the target.
            let mut at = target.to_path_buf();
            for c in rel.parent().into_iter().flat_map(Path::components) {
                at.push(c);
                if fs::symlink_metadata(&at).is_ok_and(|m| m.file_type().is_symlink()) {
                    return Err(BackupError::BadPack(format!(
                        "snapshot path {:?} goes through the link {}",
                        n.path,
                        at.display()
                    )));
                }
            }
            let dest = target.join(rel);
            if n.kind != Kind::Dir && fs::symlink_metadata(&dest).is_ok() {
                fs::remove_file(&dest).map_err(|e| io(&dest, e))?;
            }
            match n.kind {
                Kind::Dir => {
                    fs::create_dir_all(&dest).map_err(|e| io(&dest, e))?;
                    dirs.push((dest, n));
                    sum.dirs += 1;
                    continue;
                }
                Kind::Symlink => {
                    let t = n.target.as_deref().unwrap_or_default();
                    std::os::unix::fs::symlink(t, &dest).map_err(|e| io(&dest, e))?;
                    let when = nix::sys::time::TimeVal::new(n.mtime_s, (n.mtime_ns / 1000).into());
                    nix::sys::stat::lutimes(&dest, &when, &when)
                        .map_err(|e| io(&dest, std::io::Error::from(e)))?;
                    sum.symlinks += 1;
                }
                Kind::File => {
                    let mut f = fs::File::create(&dest).map_err(|e| io(&dest, e))?;
                    for c in &n.chunks {
                        let data = self.chunk(c)?;
                        f.write_all(&data).map_err(|e| io(&dest, e))?;
                        sum.bytes += data.len() as u64;
                    }
                    f.set_permissions(fs::Permissions::from_mode(n.mode))
                        .map_err(|e| io(&dest, e))?;
                    f.set_modified(mtime(n)).map_err(|e| io(&dest, e))?;
                    sum.files += 1;
                }
            }
            if std::os::unix::fs::lchown(&dest, Some(n.uid), Some(n.gid)).is_err() {
                sum.owners_not_set += 1;
            }
        }
        // Directories last, deepest first: writing into them changed their times.
        for (dest, n) in dirs.into_iter().rev() {
            fs::set_permissions(&dest, fs::Permissions::from_mode(n.mode))
                .map_err(|e| io(&dest, e))?;
            if std::os::unix::fs::lchown(&dest, Some(n.uid), Some(n.gid)).is_err() {
                sum.owners_not_set += 1;
            }
            fs::File::open(&dest)
                .and_then(|d| d.set_modified(mtime(n)))
                .map_err(|e| io(&dest, e))?;
        }
        Ok(sum)
    }
}

fn mtime(n: &Node) -> std::time::SystemTime {
    let base = std::time::UNIX_EPOCH;
    if n.mtime_s >= 0 {
        base + std::time::Duration::new(n.mtime_s as u64, n.mtime_ns)
    } else {
        base - std::time::Duration::from_secs(n.mtime_s.unsigned_abs())
    }
}
