//! A repository in a local directory: init, open, back up paths, list snapshots, restore.
//!
//! ```text
//! config                   JSON: format version, repository ID, chunker sizes (not secret)
//! keys/<holder>.json       key files (crypto::KeyFile)
//! packs/<2 hex>/<name>     packs (pack.rs), named by their BLAKE3 hash
//! index/<name>             sealed JSON: which blobs each pack holds
//! snapshots/<id>           sealed JSON: one snapshot (its files and their chunks)
//! ```
//!
//! Write order packs → index → snapshot, each file written to a temporary name, synced and
//! renamed: a crash at any point leaves a valid repository. A pack without an index (the crash
//! came between them) is found on the next open and indexed from its trailer, which needs no
//! key: a resumed backup sends nothing that is already stored.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::BackupError;
use crate::chunker;
use crate::crypto::{ChunkId, KdfParams, KeyFile, Keys};
use crate::pack::{self, PackWriter};
pub use crate::snapshot::{Kind, Node, Snapshot};
pub use restore::RestoreSummary;

mod restore;

/// Where a blob is.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Loc {
    pack: String,
    offset: u64,
    length: u32,
}

#[derive(Serialize, Deserialize)]
struct Config {
    version: u8,
    id: String,
    created_ms: i64,
    chunk_min: usize,
    chunk_avg: usize,
    chunk_max: usize,
}

#[derive(Serialize, Deserialize, Default)]
struct IndexFile {
    packs: Vec<IndexPack>,
}

#[derive(Serialize, Deserialize)]
struct IndexPack {
    name: String,
    /// (chunk ID hex, offset, length)
    blobs: Vec<(String, u64, u32)>,
}

/// What a backup did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct BackupSummary {
    pub snapshot: String,
    pub files: u64,
    pub dirs: u64,
    pub bytes: u64,
    /// Chunks (and their plaintext bytes) not already in the repository.
    pub new_chunks: u64,
    pub new_bytes: u64,
    pub packs_written: u64,
    /// Paths left out, with why (unreadable, not UTF-8, a socket or device).
    pub skipped: Vec<String>,
}

pub struct Repo {
    dir: PathBuf,
    keys: Keys,
    index: HashMap<ChunkId, Loc>,
}

const INDEX_AAD: &[u8] = b"tiandi-backup index v1";
const SNAPSHOT_AAD: &[u8] = b"tiandi-backup snapshot v1";
/// The most a sealed index or snapshot file may be (read whole).
const MAX_META: u64 = 1 << 30;

fn io(path: &Path, e: std::io::Error) -> BackupError {
    BackupError::Io(std::io::Error::new(
        e.kind(),
        format!("{}: {e}", path.display()),
    ))
}

/// Writes `bytes` at `path` whole or not at all: a temporary name, synced, renamed, the
/// directory synced.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), BackupError> {
    let dir = path.parent().expect("repository paths have a parent");
    fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let tmp = dir.join(format!(
        ".tmp-{}",
        path.file_name().unwrap_or_default().to_string_lossy()
    ));
    let mut f = fs::File::create(&tmp).map_err(|e| io(&tmp, e))?;
    f.write_all(bytes).map_err(|e| io(&tmp, e))?;
    f.sync_all().map_err(|e| io(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| io(path, e))?;
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io(dir, e))
}

fn read_limited(path: &Path) -> Result<Vec<u8>, BackupError> {
    let f = fs::File::open(path).map_err(|e| io(path, e))?;
    let mut out = Vec::new();
    f.take(MAX_META + 1)
        .read_to_end(&mut out)
        .map_err(|e| io(path, e))?;
    if out.len() as u64 > MAX_META {
        return Err(BackupError::BadPack(format!(
            "{} is too large",
            path.display()
        )));
    }
    Ok(out)
}

/// The names in a repository folder (temporary files left by a crash are not names).
fn names(dir: &Path) -> Result<Vec<String>, BackupError> {
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir(dir) else {
        return Ok(out);
    };
    for e in rd {
        let e = e.map_err(|e| io(dir, e))?;
        let n = e.file_name().to_string_lossy().into_owned();
        if !n.starts_with('.') {
            out.push(n);
        }
    }
    out.sort();
    Ok(out)
}

fn is_hex_name(s: &str) -> bool {
    (8..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// What a check of the packs found (without the key).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CheckSummary {
    pub packs: u64,
    pub blobs: u64,
    pub bytes: u64,
    /// Packs whose bytes are not their name, or whose trailer is wrong, with why.
    pub damaged: Vec<String>,
}

/// Checks every pack of the repository in `dir` against its name and trailer: what the
/// partner storing it runs, without the key. Reads one pack at a time.
pub fn check_packs(dir: &Path) -> Result<CheckSummary, BackupError> {
    let mut sum = CheckSummary::default();
    for sub in names(&dir.join("packs"))? {
        for n in names(&dir.join("packs").join(&sub))? {
            let p = dir.join("packs").join(&sub).join(&n);
            sum.packs += 1;
            let Ok(name) = blake3::Hash::from_hex(&n) else {
                sum.damaged
                    .push(format!("{}: not a pack name", p.display()));
                continue;
            };
            let bytes = fs::read(&p).map_err(|e| io(&p, e))?;
            sum.bytes += bytes.len() as u64;
            match pack::verify(&name, &bytes) {
                Ok(blobs) => sum.blobs += blobs as u64,
                Err(e) => sum.damaged.push(format!("{}: {e}", p.display())),
            }
        }
    }
    Ok(sum)
}

impl Repo {
    /// Creates a repository in `dir` (absent or empty), with a first key file for `holder`.
    pub fn init(
        dir: &Path,
        holder: &str,
        secret: &[u8],
        params: KdfParams,
        now_ms: i64,
    ) -> Result<Repo, BackupError> {
        if fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some()) {
            return Err(BackupError::KeyFile(format!(
                "{} is not empty: a repository is made in a new directory",
                dir.display()
            )));
        }
        if !holder
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            || holder.is_empty()
            || holder.len() > 64
        {
            return Err(BackupError::KeyFile(format!(
                "holder {holder:?}: letters, digits, - and _ only"
            )));
        }
        let keys = Keys::generate();
        let kf = KeyFile::wrap(&keys, holder, secret, params, now_ms)?;
        let config = Config {
            version: crate::FORMAT_VERSION,
            id: hex::encode(&Keys::generate().chunk_id(b"repository id")[..16]),
            created_ms: now_ms,
            chunk_min: chunker::MIN,
            chunk_avg: chunker::AVG,
            chunk_max: chunker::MAX,
        };
        write_atomic(
            &dir.join("config"),
            &serde_json::to_vec_pretty(&config).expect("config serialises"),
        )?;
        write_atomic(
            &dir.join("keys").join(format!("{holder}.json")),
            &serde_json::to_vec_pretty(&kf).expect("key file serialises"),
        )?;
        Ok(Repo {
            dir: dir.to_path_buf(),
            keys,
            index: HashMap::new(),
        })
    }

    /// Opens the repository in `dir` with a secret one of its key files takes, loads its
    /// index, and indexes any pack a crash left without one.
    pub fn open(dir: &Path, secret: &[u8]) -> Result<Repo, BackupError> {
        let config: Config = serde_json::from_slice(&read_limited(&dir.join("config"))?)
            .map_err(|e| BackupError::KeyFile(format!("{}: {e}", dir.join("config").display())))?;
        if config.version > crate::FORMAT_VERSION {
            return Err(BackupError::Version(config.version));
        }
        let mut keys = None;
        for n in names(&dir.join("keys"))? {
            let p = dir.join("keys").join(&n);
            let kf: KeyFile = serde_json::from_slice(&read_limited(&p)?)
                .map_err(|e| BackupError::KeyFile(format!("{}: {e}", p.display())))?;
            match kf.unwrap(secret) {
                Ok(k) => {
                    keys = Some(k);
                    break;
                }
                Err(BackupError::WrongKey) => continue,
                Err(e) => return Err(e),
            }
        }
        let mut repo = Repo {
            dir: dir.to_path_buf(),
            keys: keys.ok_or(BackupError::WrongKey)?,
            index: HashMap::new(),
        };
        let mut indexed = HashSet::new();
        for n in names(&dir.join("index"))? {
            let sealed = read_limited(&dir.join("index").join(&n))?;
            let plain = repo.keys.open(INDEX_AAD, &sealed)?;
            let f: IndexFile = serde_json::from_slice(&plain)
                .map_err(|e| BackupError::BadPack(format!("index {n}: {e}")))?;
            for p in f.packs {
                for (id, offset, length) in p.blobs {
                    let id = hex::decode(&id)
                        .ok()
                        .and_then(|v| ChunkId::try_from(v).ok())
                        .ok_or_else(|| {
                            BackupError::BadPack(format!("index {n}: chunk ID {id:?}"))
                        })?;
                    repo.index.insert(
                        id,
                        Loc {
                            pack: p.name.clone(),
                            offset,
                            length,
                        },
                    );
                }
                indexed.insert(p.name);
            }
        }
        // Packs a crash left without an index: read their trailers (no key needed).
        let mut orphans = Vec::new();
        for sub in names(&dir.join("packs"))? {
            for n in names(&dir.join("packs").join(&sub))? {
                if !indexed.contains(&n) && is_hex_name(&n) {
                    let bytes =
                        fs::read(dir.join("packs").join(&sub).join(&n)).map_err(|e| io(dir, e))?;
                    let name = blake3::Hash::from_hex(&n)
                        .map_err(|_| BackupError::BadPack(format!("pack name {n}")))?;
                    pack::verify(&name, &bytes)?;
                    let entries = pack::read_trailer(&bytes)?;
                    orphans.push((n, entries));
                }
            }
        }
        if !orphans.is_empty() {
            repo.write_index(orphans)?;
        }
        Ok(repo)
    }

    fn pack_path(&self, name: &str) -> PathBuf {
        self.dir.join("packs").join(&name[..2]).join(name)
    }

    fn write_index(&mut self, packs: Vec<(String, Vec<pack::Entry>)>) -> Result<(), BackupError> {
        let mut f = IndexFile::default();
        for (name, entries) in packs {
            for e in &entries {
                self.index.insert(
                    e.id,
                    Loc {
                        pack: name.clone(),
                        offset: e.offset,
                        length: e.length,
                    },
                );
            }
            f.packs.push(IndexPack {
                blobs: entries
                    .iter()
                    .map(|e| (hex::encode(e.id), e.offset, e.length))
                    .collect(),
                name,
            });
        }
        let sealed = self.keys.seal(
            INDEX_AAD,
            &serde_json::to_vec(&f).expect("index serialises"),
        );
        let name = blake3::hash(&sealed).to_hex();
        write_atomic(&self.dir.join("index").join(name.as_str()), &sealed)
    }

    fn flush_pack(
        &self,
        w: PackWriter,
        done: &mut Vec<(String, Vec<pack::Entry>)>,
    ) -> Result<(), BackupError> {
        let (name, bytes, entries) = w.finish();
        let name = name.to_hex().to_string();
        write_atomic(&self.pack_path(&name), &bytes)?;
        done.push((name, entries));
        Ok(())
    }

    /// Backs up `paths` (files or directories) into a new snapshot.
    pub fn backup(
        &mut self,
        paths: &[PathBuf],
        host: &str,
        tags: &[String],
        now_ms: i64,
    ) -> Result<BackupSummary, BackupError> {
        let mut sum = BackupSummary::default();
        let mut nodes = Vec::new();
        let mut writer = PackWriter::new();
        let mut written: Vec<(String, Vec<pack::Entry>)> = Vec::new();
        let mut pending: HashSet<ChunkId> = HashSet::new();
        for root in paths {
            let base = root
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "root".into());
            let mut stack = vec![(root.clone(), base)];
            while let Some((path, rel)) = stack.pop() {
                let md = match fs::symlink_metadata(&path) {
                    Ok(m) => m,
                    Err(e) => {
                        sum.skipped.push(format!("{}: {e}", path.display()));
                        continue;
                    }
                };
                let mut node = Node {
                    path: rel.clone(),
                    kind: Kind::File,
                    mode: md.mode() & 0o7777,
                    uid: md.uid(),
                    gid: md.gid(),
                    mtime_s: md.mtime(),
                    mtime_ns: md.mtime_nsec() as u32,
                    size: 0,
                    chunks: Vec::new(),
                    target: None,
                };
                let ft = md.file_type();
                if ft.is_dir() {
                    node.kind = Kind::Dir;
                    sum.dirs += 1;
                    let mut children = Vec::new();
                    match fs::read_dir(&path) {
                        Ok(rd) => {
                            for e in rd.flatten() {
                                match e.file_name().into_string() {
                                    Ok(n) => children.push(n),
                                    Err(n) => sum
                                        .skipped
                                        .push(format!("{}: not UTF-8", path.join(n).display())),
                                }
                            }
                        }
                        Err(e) => sum.skipped.push(format!("{}: {e}", path.display())),
                    }
                    children.sort();
                    for n in children.into_iter().rev() {
                        stack.push((path.join(&n), format!("{rel}/{n}")));
                    }
                } else if ft.is_symlink() {
                    node.kind = Kind::Symlink;
                    match fs::read_link(&path).map(|t| t.into_os_string().into_string()) {
                        Ok(Ok(t)) => node.target = Some(t),
                        _ => {
                            sum.skipped
                                .push(format!("{}: unreadable or non-UTF-8 link", path.display()));
                            continue;
                        }
                    }
                } else if ft.is_file() {
                    let f = match fs::File::open(&path) {
                        Ok(f) => f,
                        Err(e) => {
                            sum.skipped.push(format!("{}: {e}", path.display()));
                            continue;
                        }
                    };
                    for c in chunker::chunks(&self.keys, f) {
                        let c = c?;
                        let id = self.keys.chunk_id(&c.data);
                        node.size += c.data.len() as u64;
                        node.chunks.push(hex::encode(id));
                        if !self.index.contains_key(&id) && pending.insert(id) {
                            writer.add(id, &self.keys.seal_chunk(&id, &c.data)?);
                            sum.new_chunks += 1;
                            sum.new_bytes += c.data.len() as u64;
                            if writer.full() {
                                let full = std::mem::take(&mut writer);
                                self.flush_pack(full, &mut written)?;
                            }
                        }
                    }
                    sum.files += 1;
                    sum.bytes += node.size;
                } else {
                    sum.skipped
                        .push(format!("{}: not a file, directory or link", path.display()));
                    continue;
                }
                nodes.push(node);
            }
        }
        if !writer.is_empty() {
            self.flush_pack(writer, &mut written)?;
        }
        sum.packs_written = written.len() as u64;
        if !written.is_empty() {
            self.write_index(written)?;
        }
        let snap = Snapshot {
            time_ms: now_ms,
            host: host.to_string(),
            paths: paths.iter().map(|p| p.display().to_string()).collect(),
            tags: tags.to_vec(),
            nodes,
        };
        let sealed = self.keys.seal(
            SNAPSHOT_AAD,
            &serde_json::to_vec(&snap).expect("snapshot serialises"),
        );
        let id = blake3::hash(&sealed).to_hex()[..16].to_string();
        write_atomic(&self.dir.join("snapshots").join(&id), &sealed)?;
        sum.snapshot = id;
        Ok(sum)
    }

    /// Every snapshot, oldest first.
    pub fn snapshots(&self) -> Result<Vec<(String, Snapshot)>, BackupError> {
        let mut out = Vec::new();
        for n in names(&self.dir.join("snapshots"))? {
            out.push((n.clone(), self.snapshot(&n)?));
        }
        out.sort_by_key(|(_, s)| s.time_ms);
        Ok(out)
    }

    /// One snapshot by its ID.
    pub fn snapshot(&self, id: &str) -> Result<Snapshot, BackupError> {
        if !is_hex_name(id) {
            return Err(BackupError::BadPack(format!(
                "snapshot ID {id:?} is not one"
            )));
        }
        let sealed = read_limited(&self.dir.join("snapshots").join(id))?;
        let plain = self.keys.open(SNAPSHOT_AAD, &sealed)?;
        serde_json::from_slice(&plain)
            .map_err(|e| BackupError::BadPack(format!("snapshot {id}: {e}")))
    }

    /// Removes snapshot `id` (its data stays until a prune finds it unused).
    pub fn forget(&self, id: &str) -> Result<(), BackupError> {
        if !is_hex_name(id) {
            return Err(BackupError::BadPack(format!(
                "snapshot ID {id:?} is not one"
            )));
        }
        let dir = self.dir.join("snapshots");
        let p = dir.join(id);
        fs::remove_file(&p).map_err(|e| io(&p, e))?;
        fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io(&dir, e))
    }

    fn chunk(&self, id_hex: &str) -> Result<Vec<u8>, BackupError> {
        let id = hex::decode(id_hex)
            .ok()
            .and_then(|v| ChunkId::try_from(v).ok())
            .ok_or_else(|| BackupError::BadPack(format!("chunk ID {id_hex:?}")))?;
        let loc = self
            .index
            .get(&id)
            .ok_or_else(|| BackupError::BadPack(format!("chunk {id_hex} is in no pack")))?;
        let p = self.pack_path(&loc.pack);
        let mut f = fs::File::open(&p).map_err(|e| io(&p, e))?;
        f.seek(SeekFrom::Start(loc.offset)).map_err(|e| io(&p, e))?;
        let mut sealed = vec![0u8; loc.length as usize];
        f.read_exact(&mut sealed).map_err(|e| io(&p, e))?;
        self.keys.open_chunk(&id, &sealed, chunker::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngCore, SeedableRng};
    use std::os::unix::fs::PermissionsExt;

    const FAST: KdfParams = crate::crypto::TEST_KDF;

    fn tree(root: &Path) {
        fs::create_dir_all(root.join("db/old")).unwrap();
        fs::write(root.join("notes.txt"), "drill at 10:00\n").unwrap();
        fs::write(root.join("empty"), "").unwrap();
        let mut big = vec![0u8; 9 << 20];
        rand::rngs::StdRng::seed_from_u64(3).fill_bytes(&mut big);
        fs::write(root.join("db/dump.sql"), &big).unwrap();
        fs::write(root.join("db/old/dump.sql"), &big).unwrap();
        fs::set_permissions(root.join("notes.txt"), fs::Permissions::from_mode(0o640)).unwrap();
        std::os::unix::fs::symlink("db/dump.sql", root.join("latest")).unwrap();
    }

    fn same(a: &Path, b: &Path) {
        for e in fs::read_dir(a).unwrap() {
            let e = e.unwrap();
            let (pa, pb) = (e.path(), b.join(e.file_name()));
            let (ma, mb) = (
                fs::symlink_metadata(&pa).unwrap(),
                fs::symlink_metadata(&pb).unwrap(),
            );
            assert_eq!(ma.mode(), mb.mode(), "{}", pa.display());
            assert_eq!(ma.mtime(), mb.mtime(), "{}", pa.display());
            if ma.is_dir() {
                same(&pa, &pb);
            } else if ma.file_type().is_symlink() {
                assert_eq!(fs::read_link(&pa).unwrap(), fs::read_link(&pb).unwrap());
            } else {
                assert_eq!(
                    fs::read(&pa).unwrap(),
                    fs::read(&pb).unwrap(),
                    "{}",
                    pa.display()
                );
            }
        }
    }

    #[test]
    fn back_up_restore_and_deduplicate() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("gd-office");
        tree(&src);
        let dir = t.path().join("repo");
        let mut repo = Repo::init(&dir, "ministry", b"a long passphrase", FAST, 1).unwrap();
        let s1 = repo
            .backup(
                std::slice::from_ref(&src),
                "gd-001",
                &["daily".into()],
                1000,
            )
            .unwrap();
        assert_eq!((s1.files, s1.dirs), (4, 3), "{s1:?}");
        assert!(s1.skipped.is_empty());
        // The two copies of the dump are stored once.
        assert!(s1.new_bytes < s1.bytes * 6 / 10, "{s1:?}");
        let out = t.path().join("restored");
        let r = Repo::open(&dir, b"a long passphrase")
            .unwrap()
            .restore(&s1.snapshot, &out)
            .unwrap();
        assert_eq!((r.files, r.symlinks), (4, 1));
        same(&src, &out.join("gd-office"));
        // Nothing changed: nothing new is stored.
        let s2 = repo
            .backup(std::slice::from_ref(&src), "gd-001", &[], 2000)
            .unwrap();
        assert_eq!((s2.new_chunks, s2.packs_written), (0, 0), "{s2:?}");
        assert_eq!(repo.snapshots().unwrap().len(), 2);
        // Wrong passphrase, a second repository's passphrase: refused.
        assert!(matches!(
            Repo::open(&dir, b"wrong"),
            Err(BackupError::WrongKey)
        ));
        assert!(
            Repo::init(&dir, "x", b"p", FAST, 1).is_err(),
            "not an empty directory"
        );
        // The partner's check, without the key: all good, then one flipped byte found.
        let c = check_packs(&dir).unwrap();
        assert!(
            c.packs >= 1 && c.blobs == s1.new_chunks && c.damaged.is_empty(),
            "{c:?}"
        );
        let sub = names(&dir.join("packs")).unwrap().remove(0);
        let first = dir
            .join("packs")
            .join(&sub)
            .join(names(&dir.join("packs").join(&sub)).unwrap().remove(0));
        let mut bytes = fs::read(&first).unwrap();
        bytes[100] ^= 1;
        fs::write(&first, bytes).unwrap();
        let c = check_packs(&dir).unwrap();
        assert_eq!(c.damaged.len(), 1, "{c:?}");
        assert!(c.damaged[0].contains("not its name"), "{c:?}");
    }

    #[test]
    fn packs_a_crash_left_without_an_index_are_not_sent_again() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("data");
        tree(&src);
        let dir = t.path().join("repo");
        let mut repo = Repo::init(&dir, "ministry", b"pass phrase", FAST, 1).unwrap();
        repo.backup(std::slice::from_ref(&src), "h", &[], 1)
            .unwrap();
        // The crash: packs on disk, their index and the snapshot lost.
        fs::remove_dir_all(dir.join("index")).unwrap();
        fs::remove_dir_all(dir.join("snapshots")).unwrap();
        let mut again = Repo::open(&dir, b"pass phrase").unwrap();
        let s = again
            .backup(std::slice::from_ref(&src), "h", &[], 2)
            .unwrap();
        assert_eq!(s.new_chunks, 0, "{s:?}");
        let out = t.path().join("out");
        again.restore(&s.snapshot, &out).unwrap();
        same(&src, &out.join("data"));
    }

    fn node(path: &str, kind: Kind, target: Option<String>) -> Node {
        Node {
            path: path.into(),
            kind,
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime_s: 0,
            mtime_ns: 0,
            size: 0,
            chunks: vec![],
            target,
        }
    }

    /// Writes a snapshot of these nodes as a key holder could, and restores it into `out`.
    fn restore_planted(repo: &Repo, id: &str, nodes: Vec<Node>, out: &Path) -> BackupError {
        let snap = Snapshot {
            time_ms: 1,
            host: "h".into(),
            paths: vec![],
            tags: vec![],
            nodes,
        };
        let sealed = repo
            .keys
            .seal(SNAPSHOT_AAD, &serde_json::to_vec(&snap).unwrap());
        write_atomic(&repo.dir.join("snapshots").join(id), &sealed).unwrap();
        repo.restore(id, out).unwrap_err()
    }

    #[test]
    fn a_snapshot_path_that_climbs_out_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let repo = Repo::init(&t.path().join("repo"), "m", b"pass phrase", FAST, 1).unwrap();
        for bad in ["../escape", "/etc/x", "a/../../b", ""] {
            let err = restore_planted(
                &repo,
                "0123456789abcdef",
                vec![node(bad, Kind::Dir, None)],
                &t.path().join("out"),
            );
            assert!(err.to_string().contains("plain relative"), "{bad}: {err}");
        }
        assert!(!t.path().join("escape").exists());
        // A link, then a file "inside" it: refused before anything is written through it.
        let outside = t.path().join("outside");
        fs::create_dir_all(&outside).unwrap();
        let err = restore_planted(
            &repo,
            "00000000000000aa",
            vec![
                node("r", Kind::Dir, None),
                node("r/a", Kind::Symlink, Some(outside.display().to_string())),
                node("r/a/planted", Kind::File, None),
            ],
            &t.path().join("out2"),
        );
        assert!(err.to_string().contains("goes through the link"), "{err}");
        assert!(!outside.join("planted").exists());
        assert!(repo.snapshot("../config").is_err());
    }
}
