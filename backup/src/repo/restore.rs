//! Restoring a snapshot (or one path of it) into a directory, in parallel and resumable.
//!
//! 1. Walk the snapshot's trees: make directories and links, list the files and where each
//!    chunk goes (file, offset). A file already there with its size and modification time is
//!    taken as restored (a file's time is set only once all of it is written, so a file an
//!    interrupted restore left half-written has another time and is written again).
//! 2. Workers take one pack at a time, read the ranges of it the plan needs (one read when
//!    they are most of it), open each blob once and write it wherever it goes. A file whose
//!    last chunk is written gets its length, mode, owner, attributes and time.
//! 3. Hard links, then directories' modes and times, deepest first.
//!
//! Nothing is written through a link: a name in a tree is one plain component, names in a
//! tree are unique, a directory or file's place holding anything else is emptied first, and
//! files are opened with `O_NOFOLLOW`.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use serde::Serialize;

use super::{Kind, Loc, Node, Repo, Tree, pack_file, parse_id};
use crate::BackupError;
use crate::backend::io;
use crate::chunker;
use crate::crypto::ChunkId;

/// How to restore.
#[derive(Clone, Debug)]
pub struct RestoreOptions {
    /// Only this path of the snapshot (`name/inside/it`), with its parent directories.
    pub path: Option<String>,
    /// Pack readers (at least 1).
    pub threads: usize,
    /// Only about this share of the files (a restore drill's sample), chosen anew each run;
    /// 100: all.
    pub sample_pct: u8,
}

impl Default for RestoreOptions {
    fn default() -> RestoreOptions {
        RestoreOptions {
            path: None,
            threads: std::thread::available_parallelism().map_or(2, |n| n.get()) + 1,
            sample_pct: 100,
        }
    }
}

/// What a restore did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RestoreSummary {
    pub snapshot: String,
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub hardlinks: u64,
    pub bytes: u64,
    /// Files already there, whole, from an interrupted restore.
    pub already_there: u64,
    /// Owners that could not be set (not root): the files are the restorer's.
    pub owners_not_set: u64,
    pub xattrs_not_set: u64,
    pub duration_ms: u64,
}

/// A file to write.
struct FileJob {
    dest: PathBuf,
    node: Node,
    /// Chunk writes still to come.
    left: AtomicU32,
}

/// Refuses a name that is not one plain path component.
fn check_component(name: &str) -> Result<(), BackupError> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        return Err(BackupError::BadPack(format!(
            "snapshot name {name:?} is not a plain relative path component"
        )));
    }
    Ok(())
}

/// Makes `dest` a directory, removing a file or link in its place.
fn make_dir(dest: &Path) -> Result<(), BackupError> {
    match fs::symlink_metadata(dest) {
        Ok(m) if m.is_dir() => return Ok(()),
        Ok(_) => fs::remove_file(dest).map_err(|e| io(dest, e))?,
        Err(_) => {}
    }
    fs::create_dir(dest).map_err(|e| io(dest, e))
}

/// Empties the place of a file or link (a directory there is an error: say so).
fn clear(dest: &Path) -> Result<(), BackupError> {
    match fs::symlink_metadata(dest) {
        Ok(m) if m.is_dir() => Err(BackupError::BadPack(format!(
            "{} is a directory where the snapshot has a file",
            dest.display()
        ))),
        Ok(_) => fs::remove_file(dest).map_err(|e| io(dest, e)),
        Err(_) => Ok(()),
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

/// Owner and extended attributes (counted when they cannot be set).
fn owner_and_xattrs(dest: &Path, n: &Node, sum: &Counters) {
    if std::os::unix::fs::lchown(dest, Some(n.uid), Some(n.gid)).is_err() {
        sum.owners.fetch_add(1, Ordering::Relaxed);
    }
    for (k, v) in &n.xattrs {
        let ok = hex::decode(v).is_ok_and(|v| xattr::set(dest, k, &v).is_ok());
        if !ok {
            sum.xattrs.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[derive(Default)]
struct Counters {
    owners: AtomicU64,
    xattrs: AtomicU64,
    bytes: AtomicU64,
}

/// The walk's result: what to write, and what to finish afterwards.
#[derive(Default)]
struct Plan {
    files: Vec<FileJob>,
    /// Chunk → every (file, offset) it goes to.
    targets: HashMap<ChunkId, Vec<(u32, u64)>>,
    hardlinks: Vec<(PathBuf, PathBuf)>,
    dirs: Vec<(PathBuf, Node)>,
    first_link: HashMap<(u64, u64), PathBuf>,
    sample_pct: u8,
    salt: [u8; 32],
}

impl Repo {
    fn plan_tree(
        &self,
        tree: &Tree,
        dir: &Path,
        only: &[&str],
        plan: &mut Plan,
        sum: &mut RestoreSummary,
        counters: &Counters,
    ) -> Result<(), BackupError> {
        for pair in tree.nodes.windows(2) {
            if pair[0].name >= pair[1].name {
                return Err(BackupError::BadPack(format!(
                    "a tree's names are not sorted and unique ({:?}, {:?})",
                    pair[0].name, pair[1].name
                )));
            }
        }
        for n in &tree.nodes {
            check_component(&n.name)?;
            if only.first().is_some_and(|o| *o != n.name) {
                continue;
            }
            let rest = only.get(1..).unwrap_or_default();
            let dest = dir.join(&n.name);
            match n.kind {
                Kind::Dir => {
                    make_dir(&dest)?;
                    let sub = n
                        .subtree
                        .as_deref()
                        .ok_or_else(|| BackupError::BadPack(format!("{} has no tree", n.name)))?;
                    self.plan_tree(&self.tree(sub)?, &dest, rest, plan, sum, counters)?;
                    let mut meta = n.clone();
                    meta.subtree = None;
                    plan.dirs.push((dest, meta));
                    sum.dirs += 1;
                }
                Kind::Symlink if only.len() <= 1 => {
                    clear(&dest)?;
                    let t = n.target.as_deref().unwrap_or_default();
                    std::os::unix::fs::symlink(t, &dest).map_err(|e| io(&dest, e))?;
                    let when = nix::sys::time::TimeSpec::new(n.mtime_s, n.mtime_ns.into());
                    nix::sys::stat::utimensat(
                        nix::fcntl::AT_FDCWD,
                        &dest,
                        &when,
                        &when,
                        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
                    )
                    .map_err(|e| io(&dest, std::io::Error::from(e)))?;
                    owner_and_xattrs(&dest, n, counters);
                    sum.symlinks += 1;
                }
                Kind::File if only.len() <= 1 => self.plan_file(n, dest, plan, sum, counters)?,
                _ => {}
            }
        }
        Ok(())
    }

    fn plan_file(
        &self,
        n: &Node,
        dest: PathBuf,
        plan: &mut Plan,
        sum: &mut RestoreSummary,
        counters: &Counters,
    ) -> Result<(), BackupError> {
        if plan.sample_pct < 100 {
            let h = blake3::keyed_hash(&plan.salt, dest.as_os_str().as_encoded_bytes());
            if h.as_bytes()[0] as u32 * 100 >= u32::from(plan.sample_pct) * 256 {
                return Ok(());
            }
        }
        if n.links > 1 {
            if let Some(first) = plan.first_link.get(&(n.device, n.inode)) {
                plan.hardlinks.push((dest, first.clone()));
                return Ok(());
            }
            plan.first_link.insert((n.device, n.inode), dest.clone());
        }
        sum.files += 1;
        if let Ok(m) = fs::symlink_metadata(&dest) {
            use std::os::unix::fs::MetadataExt;
            if m.is_file()
                && m.len() == n.size
                && (m.mtime(), m.mtime_nsec() as u32) == (n.mtime_s, n.mtime_ns)
            {
                sum.already_there += 1;
                return Ok(());
            }
            if !m.is_file() {
                clear(&dest)?;
            }
        }
        if n.chunks.is_empty() {
            let f = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
                .open(&dest)
                .map_err(|e| io(&dest, e))?;
            finish_file(&f, &dest, n, counters)?;
            return Ok(());
        }
        let no = u32::try_from(plan.files.len())
            .map_err(|_| BackupError::BadPack("more than 4 billion files".into()))?;
        let mut offset = 0u64;
        for (c, len) in &n.chunks {
            plan.targets
                .entry(parse_id(c)?)
                .or_default()
                .push((no, offset));
            offset += u64::from(*len);
        }
        if offset != n.size {
            return Err(BackupError::BadPack(format!(
                "{}: its chunks add up to {offset} bytes, not {}",
                n.name, n.size
            )));
        }
        plan.files.push(FileJob {
            dest,
            node: n.clone(),
            left: AtomicU32::new(n.chunks.len() as u32),
        });
        Ok(())
    }

    /// Restores snapshot `id` (an ID, a unique prefix, or `latest`) under `target` (created if
    /// absent).
    pub fn restore(
        &self,
        id: &str,
        target: &Path,
        opts: &RestoreOptions,
    ) -> Result<RestoreSummary, BackupError> {
        let started = Instant::now();
        let (id, snap) = self.resolve(id)?;
        let mut sum = RestoreSummary {
            snapshot: id,
            ..RestoreSummary::default()
        };
        let counters = Counters::default();
        fs::create_dir_all(target).map_err(|e| io(target, e))?;
        let only: Vec<&str> = match &opts.path {
            Some(p) => p.split('/').filter(|c| !c.is_empty()).collect(),
            None => Vec::new(),
        };
        for c in &only {
            check_component(c)?;
        }
        let mut plan = Plan {
            sample_pct: opts.sample_pct.min(100),
            ..Plan::default()
        };
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut plan.salt);
        self.plan_tree(
            &self.tree(&snap.tree)?,
            target,
            &only,
            &mut plan,
            &mut sum,
            &counters,
        )?;
        if !only.is_empty() && sum.files + sum.dirs + sum.symlinks == 0 && plan.hardlinks.is_empty()
        {
            return Err(BackupError::BadPack(format!(
                "the snapshot has no {}",
                only.join("/")
            )));
        }
        // Packs in the order they are stored, each with its blobs by offset.
        let mut by_pack: HashMap<u32, Vec<(Loc, ChunkId)>> = HashMap::new();
        for id in plan.targets.keys() {
            let loc = *self.index.blobs.get(id).ok_or_else(|| {
                BackupError::BadPack(format!("blob {} is in no pack", hex::encode(id)))
            })?;
            by_pack.entry(loc.pack).or_default().push((loc, *id));
        }
        let mut work: Vec<(u32, Vec<(Loc, ChunkId)>)> = by_pack.into_iter().collect();
        work.sort_by_key(|(p, _)| *p);
        for (_, blobs) in &mut work {
            blobs.sort_by_key(|(l, _)| l.offset);
        }
        let next = AtomicUsize::new(0);
        let stop = AtomicBool::new(false);
        let error: Mutex<Option<BackupError>> = Mutex::new(None);
        let plan = &plan;
        std::thread::scope(|s| {
            for _ in 0..opts.threads.max(1) {
                s.spawn(|| {
                    while !stop.load(Ordering::Relaxed) {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some((pack, blobs)) = work.get(i) else {
                            return;
                        };
                        if let Err(e) = self.restore_pack(*pack, blobs, plan, &counters) {
                            stop.store(true, Ordering::Relaxed);
                            error.lock().expect("error lock").get_or_insert(e);
                        }
                    }
                });
            }
        });
        if let Some(e) = error.into_inner().expect("error lock") {
            return Err(e);
        }
        for (dest, first) in &plan.hardlinks {
            clear(dest)?;
            fs::hard_link(first, dest).map_err(|e| io(dest, e))?;
            sum.hardlinks += 1;
        }
        // Directories last, deepest first: writing into them changed their times.
        for (dest, n) in plan.dirs.iter() {
            fs::set_permissions(dest, fs::Permissions::from_mode(n.mode))
                .map_err(|e| io(dest, e))?;
            owner_and_xattrs(dest, n, &counters);
            fs::File::open(dest)
                .and_then(|d| d.set_modified(mtime(n)))
                .map_err(|e| io(dest, e))?;
        }
        sum.bytes = counters.bytes.load(Ordering::Relaxed);
        sum.owners_not_set = counters.owners.load(Ordering::Relaxed);
        sum.xattrs_not_set = counters.xattrs.load(Ordering::Relaxed);
        sum.duration_ms = started.elapsed().as_millis() as u64;
        Ok(sum)
    }

    /// Reads the blobs of one pack the plan needs and writes them where they go.
    fn restore_pack(
        &self,
        pack: u32,
        blobs: &[(Loc, ChunkId)],
        plan: &Plan,
        counters: &Counters,
    ) -> Result<(), BackupError> {
        let name = pack_file(&hex::encode(self.index.packs[pack as usize]));
        let first = u64::from(blobs[0].0.offset);
        let last = blobs
            .iter()
            .map(|(l, _)| u64::from(l.offset) + u64::from(l.length))
            .max()
            .unwrap_or(first);
        let needed: u64 = blobs.iter().map(|(l, _)| u64::from(l.length)).sum();
        // One read when the blobs are most of the span, else one read per blob.
        let span = if needed * 2 >= last - first {
            Some(self.be.read_range(&name, first, last - first)?)
        } else {
            None
        };
        let mut open: Option<(u32, fs::File)> = None;
        for (loc, id) in blobs {
            let sealed = match &span {
                Some(b) => {
                    let at = (u64::from(loc.offset) - first) as usize;
                    std::borrow::Cow::Borrowed(&b[at..at + loc.length as usize])
                }
                None => std::borrow::Cow::Owned(self.be.read_range(
                    &name,
                    u64::from(loc.offset),
                    u64::from(loc.length),
                )?),
            };
            let plain = self.keys.open_chunk(id, &sealed, chunker::MAX)?;
            for &(file, offset) in &plan.targets[id] {
                let job = &plan.files[file as usize];
                if open.as_ref().is_none_or(|(n, _)| *n != file) {
                    let f = fs::OpenOptions::new()
                        .write(true)
                        .create(true)
                        .truncate(false)
                        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
                        .open(&job.dest)
                        .map_err(|e| io(&job.dest, e))?;
                    open = Some((file, f));
                }
                let f = &open.as_ref().expect("opened above").1;
                f.write_all_at(&plain, offset)
                    .map_err(|e| io(&job.dest, e))?;
                counters
                    .bytes
                    .fetch_add(plain.len() as u64, Ordering::Relaxed);
                if job.left.fetch_sub(1, Ordering::AcqRel) == 1 {
                    finish_file(f, &job.dest, &job.node, counters)?;
                }
            }
        }
        Ok(())
    }
}

fn finish_file(
    f: &fs::File,
    dest: &Path,
    n: &Node,
    counters: &Counters,
) -> Result<(), BackupError> {
    f.set_len(n.size).map_err(|e| io(dest, e))?;
    f.set_permissions(fs::Permissions::from_mode(n.mode))
        .map_err(|e| io(dest, e))?;
    owner_and_xattrs(dest, n, counters);
    f.set_modified(mtime(n)).map_err(|e| io(dest, e))
}
