//! A repository on a [`Backend`]: init, open, the index, snapshots and trees. Backing up is in
//! `backup.rs`, restoring in `restore.rs`, browsing (`ls`, `diff`) in `browse.rs`, prune in
//! `prune.rs`, checks with the key and restore drills in `verify.rs`.
//!
//! ```text
//! config                   JSON: format version, repository ID, chunker sizes (not secret)
//! keys/<holder>.json       key files (crypto::KeyFile)
//! packs/<2 hex>/<name>     packs (pack.rs), named by their BLAKE3 hash
//! index/<name>             sealed: which blobs each pack holds
//! snapshots/<id>           sealed: one snapshot (its root tree and totals)
//! pending/<name>           JSON, not secret: packs a prune marked, to delete after a grace period
//! ```
//!
//! Write order packs → index → snapshot, each file whole or absent: a crash at any point leaves
//! a valid repository. A pack without an index (the crash came between them) is found on the
//! next open and indexed from its trailer, which needs no key: a resumed backup sends nothing
//! that is already stored.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::BackupError;
use crate::backend::{Backend, Local};
use crate::chunker;
use crate::crypto::{ChunkId, KdfParams, KeyFile, Keys};
use crate::pack;
pub use crate::snapshot::{Kind, Node, Snapshot, Totals, Tree};
pub use backup::{BackupOptions, BackupSummary, Progress};
pub use browse::{Change, LsEntry};
pub use prune::{PruneOptions, PruneSummary};
pub use restore::{RestoreOptions, RestoreSummary};
pub use verify::{DataCheck, DrillSummary};

mod backup;
mod browse;
mod prune;
mod restore;
mod verify;

/// The largest tree (one directory's entries) a reader accepts, decompressed.
pub const TREE_MAX: usize = 256 << 20;
/// The largest index or snapshot file, decompressed.
const FILE_MAX: usize = 1 << 30;
const INDEX_AAD: &[u8] = b"tiandi-backup index v1";
const SNAPSHOT_AAD: &[u8] = b"tiandi-backup snapshot v1";

/// Where a blob is: its pack (a number in [`Index::packs`]), offset and length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Loc {
    pub pack: u32,
    pub offset: u32,
    pub length: u32,
}

/// Every blob's place: 32 bytes of ID and 12 of place per blob, pack names once.
#[derive(Default)]
pub(crate) struct Index {
    pub packs: Vec<[u8; 32]>,
    by_name: HashMap<[u8; 32], u32>,
    pub blobs: HashMap<ChunkId, Loc>,
}

impl Index {
    fn pack_no(&mut self, name: [u8; 32]) -> u32 {
        *self.by_name.entry(name).or_insert_with(|| {
            self.packs.push(name);
            (self.packs.len() - 1) as u32
        })
    }

    /// Records a blob; with `keep`, a blob already known stays where it is.
    fn insert(&mut self, pack: [u8; 32], e: &pack::Entry, keep: bool) -> Result<(), BackupError> {
        let offset = u32::try_from(e.offset)
            .map_err(|_| BackupError::BadPack(format!("offset {} in a pack", e.offset)))?;
        let loc = Loc {
            pack: self.pack_no(pack),
            offset,
            length: e.length,
        };
        if keep {
            self.blobs.entry(e.id).or_insert(loc);
        } else {
            self.blobs.insert(e.id, loc);
        }
        Ok(())
    }
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
pub(crate) struct IndexFile {
    pub packs: Vec<IndexPack>,
}

#[derive(Serialize, Deserialize)]
pub(crate) struct IndexPack {
    pub name: String,
    /// (chunk ID hex, offset, length)
    pub blobs: Vec<(String, u64, u32)>,
}

/// Packs a prune marked for deletion (`pending/<name>`): readable without the key.
#[derive(Serialize, Deserialize)]
pub(crate) struct Pending {
    pub marked_ms: i64,
    pub packs: Vec<String>,
}

pub struct Repo {
    be: Arc<dyn Backend>,
    keys: Keys,
    pub(crate) index: Index,
    /// Packs marked by a prune: their blobs are read if a snapshot needs them, never reused.
    pub(crate) doomed: HashSet<u32>,
    /// Index files as found at open (prune replaces them).
    pub(crate) index_files: Vec<String>,
}

pub(crate) fn pack_file(name: &str) -> String {
    format!("packs/{}/{name}", &name[..2])
}

pub(crate) fn parse_id(s: &str) -> Result<ChunkId, BackupError> {
    hex::decode(s)
        .ok()
        .and_then(|v| ChunkId::try_from(v).ok())
        .ok_or_else(|| BackupError::BadPack(format!("{s:?} is not a blob ID")))
}

fn is_hex_name(s: &str) -> bool {
    (8..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// The last part of a repository file name.
fn base(name: &str) -> &str {
    name.rsplit('/').next().unwrap_or(name)
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

/// Checks every pack against its name and trailer: what the partner storing a repository runs,
/// without the key. Reads one pack at a time.
pub fn check_packs(be: &dyn Backend) -> Result<CheckSummary, BackupError> {
    let mut sum = CheckSummary::default();
    for (file, _) in be.list("packs")? {
        sum.packs += 1;
        let Ok(name) = blake3::Hash::from_hex(base(&file)) else {
            sum.damaged.push(format!("{file}: not a pack name"));
            continue;
        };
        let bytes = be.read(&file)?;
        sum.bytes += bytes.len() as u64;
        match pack::verify(&name, &bytes) {
            Ok(blobs) => sum.blobs += blobs as u64,
            Err(e) => sum.damaged.push(format!("{file}: {e}")),
        }
    }
    Ok(sum)
}

fn check_holder(holder: &str) -> Result<(), BackupError> {
    if holder.is_empty()
        || holder.len() > 64
        || !holder
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(BackupError::KeyFile(format!(
            "holder {holder:?}: letters, digits, - and _ only"
        )));
    }
    Ok(())
}

/// One key file of a repository, as `key list` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct KeyInfo {
    pub holder: String,
    pub created_ms: i64,
    /// Whether this is the key the repository was opened with.
    pub current: bool,
}

impl Repo {
    /// Creates a repository in a local directory (absent or empty).
    pub fn init(
        dir: &std::path::Path,
        holder: &str,
        secret: &[u8],
        params: KdfParams,
        now_ms: i64,
    ) -> Result<Repo, BackupError> {
        Repo::init_on(Arc::new(Local::new(dir)), holder, secret, params, now_ms)
    }

    /// Creates a repository on `be` (which holds nothing yet), with a first key for `holder`.
    pub fn init_on(
        be: Arc<dyn Backend>,
        holder: &str,
        secret: &[u8],
        params: KdfParams,
        now_ms: i64,
    ) -> Result<Repo, BackupError> {
        if !be.is_empty()? {
            return Err(BackupError::KeyFile(format!(
                "{} is not empty: a repository is made in a new place",
                be.describe()
            )));
        }
        check_holder(holder)?;
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
        be.write(
            "config",
            &serde_json::to_vec_pretty(&config).expect("config serialises"),
        )?;
        be.write(
            &format!("keys/{holder}.json"),
            &serde_json::to_vec_pretty(&kf).expect("key file serialises"),
        )?;
        Ok(Repo {
            be,
            keys,
            index: Index::default(),
            doomed: HashSet::new(),
            index_files: Vec::new(),
        })
    }

    /// Opens the repository in a local directory.
    pub fn open(dir: &std::path::Path, secret: &[u8]) -> Result<Repo, BackupError> {
        Repo::open_on(Arc::new(Local::new(dir)), secret)
    }

    /// The key files and which one `secret` opens.
    fn key_files(be: &dyn Backend) -> Result<Vec<(String, KeyFile)>, BackupError> {
        let mut out = Vec::new();
        for (file, _) in be.list("keys")? {
            let kf: KeyFile = serde_json::from_slice(&be.read(&file)?)
                .map_err(|e| BackupError::KeyFile(format!("{file}: {e}")))?;
            out.push((file, kf));
        }
        Ok(out)
    }

    /// Opens the repository on `be` with a secret one of its key files takes, loads its index,
    /// and indexes any pack a crash left without one.
    pub fn open_on(be: Arc<dyn Backend>, secret: &[u8]) -> Result<Repo, BackupError> {
        let config: Config = serde_json::from_slice(&be.read("config")?)
            .map_err(|e| BackupError::KeyFile(format!("{}: config: {e}", be.describe())))?;
        if config.version > crate::FORMAT_VERSION {
            return Err(BackupError::Version(config.version));
        }
        let mut keys = None;
        for (_, kf) in Repo::key_files(&*be)? {
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
            be,
            keys: keys.ok_or(BackupError::WrongKey)?,
            index: Index::default(),
            doomed: HashSet::new(),
            index_files: Vec::new(),
        };
        repo.load_index()?;
        Ok(repo)
    }

    /// Reads the index files, the prune marks and the pack list; indexes orphan packs.
    pub(crate) fn load_index(&mut self) -> Result<(), BackupError> {
        self.index = Index::default();
        self.doomed.clear();
        let present: HashMap<String, u64> = self
            .be
            .list("packs")?
            .into_iter()
            .map(|(f, n)| (base(&f).to_string(), n))
            .collect();
        let mut doomed_names = HashSet::new();
        for (file, _) in self.be.list("pending")? {
            let p: Pending = serde_json::from_slice(&self.be.read(&file)?)
                .map_err(|e| BackupError::BadPack(format!("{file}: {e}")))?;
            doomed_names.extend(p.packs);
        }
        let mut files = Vec::new();
        let mut later = Vec::new();
        for (file, _) in self.be.list("index")? {
            let plain = self
                .keys
                .open_file(INDEX_AAD, &self.be.read(&file)?, FILE_MAX)?;
            let f: IndexFile = serde_json::from_slice(&plain)
                .map_err(|e| BackupError::BadPack(format!("{file}: {e}")))?;
            files.push(file);
            for p in f.packs {
                // A pack a prune removed since this index was written: its blobs are elsewhere.
                if !present.contains_key(&p.name) {
                    continue;
                }
                if doomed_names.contains(&p.name) {
                    later.push(p);
                } else {
                    self.insert_pack(&p, false)?;
                }
            }
        }
        // Doomed packs last: a blob a prune copied elsewhere is read from its new pack.
        for p in later {
            let no = self.insert_pack(&p, true)?;
            self.doomed.insert(no);
        }
        self.index_files = files;
        // Packs a crash left without an index: read their trailers (no key needed).
        let known: HashSet<[u8; 32]> = self.index.packs.iter().copied().collect();
        let mut orphans = Vec::new();
        for name in present.keys() {
            let Ok(h) = blake3::Hash::from_hex(name) else {
                continue;
            };
            if known.contains(h.as_bytes()) {
                continue;
            }
            let bytes = self.be.read(&pack_file(name))?;
            pack::verify(&h, &bytes)?;
            orphans.push((*h.as_bytes(), pack::read_trailer(&bytes)?));
        }
        if !orphans.is_empty() {
            self.write_index(orphans)?;
        }
        Ok(())
    }

    fn insert_pack(&mut self, p: &IndexPack, keep: bool) -> Result<u32, BackupError> {
        let name = blake3::Hash::from_hex(&p.name)
            .map_err(|_| BackupError::BadPack(format!("pack name {:?}", p.name)))?;
        let no = self.index.pack_no(*name.as_bytes());
        for (id, offset, length) in &p.blobs {
            let e = pack::Entry {
                id: parse_id(id)?,
                offset: *offset,
                length: *length,
            };
            self.index.insert(*name.as_bytes(), &e, keep)?;
        }
        Ok(no)
    }

    /// Writes one index file naming these packs (and records them in memory).
    pub(crate) fn write_index(
        &mut self,
        packs: Vec<([u8; 32], Vec<pack::Entry>)>,
    ) -> Result<(), BackupError> {
        let mut f = IndexFile::default();
        for (name, entries) in packs {
            for e in &entries {
                self.index.insert(name, e, false)?;
            }
            f.packs.push(IndexPack {
                blobs: entries
                    .iter()
                    .map(|e| (hex::encode(e.id), e.offset, e.length))
                    .collect(),
                name: hex::encode(name),
            });
        }
        let file = self.seal_index(&f)?;
        self.index_files.push(file);
        Ok(())
    }

    /// Seals and writes an index file; its name.
    pub(crate) fn seal_index(&self, f: &IndexFile) -> Result<String, BackupError> {
        let sealed = self
            .keys
            .seal_file(INDEX_AAD, &serde_json::to_vec(f).expect("index serialises"))?;
        let file = format!("index/{}", blake3::hash(&sealed).to_hex());
        self.be.write(&file, &sealed)?;
        Ok(file)
    }

    /// The backend, for a check of the packs.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.be
    }

    /// Every snapshot, oldest first.
    pub fn snapshots(&self) -> Result<Vec<(String, Snapshot)>, BackupError> {
        let mut out = Vec::new();
        for (file, _) in self.be.list("snapshots")? {
            let id = base(&file).to_string();
            out.push((id.clone(), self.snapshot(&id)?));
        }
        out.sort_by_key(|(_, s)| s.time_ms);
        Ok(out)
    }

    /// One snapshot by its ID, or by a unique prefix of it, or `latest`.
    pub fn resolve(&self, id: &str) -> Result<(String, Snapshot), BackupError> {
        if id == "latest" {
            return self
                .snapshots()?
                .pop()
                .ok_or_else(|| BackupError::BadPack("the repository has no snapshot".into()));
        }
        if !id.bytes().all(|b| b.is_ascii_hexdigit()) || id.len() < 4 || id.len() > 64 {
            return Err(BackupError::BadPack(format!(
                "snapshot ID {id:?} is not one"
            )));
        }
        let ids: Vec<String> = self
            .be
            .list("snapshots")?
            .into_iter()
            .map(|(f, _)| base(&f).to_string())
            .filter(|n| n.starts_with(id))
            .collect();
        match ids.as_slice() {
            [one] => Ok((one.clone(), self.snapshot(one)?)),
            [] => Err(BackupError::BadPack(format!("no snapshot {id}"))),
            _ => Err(BackupError::BadPack(format!(
                "{id} is the start of {} snapshot IDs: give more of it",
                ids.len()
            ))),
        }
    }

    /// One snapshot by its full ID.
    pub fn snapshot(&self, id: &str) -> Result<Snapshot, BackupError> {
        if !is_hex_name(id) {
            return Err(BackupError::BadPack(format!(
                "snapshot ID {id:?} is not one"
            )));
        }
        let plain = self.keys.open_file(
            SNAPSHOT_AAD,
            &self.be.read(&format!("snapshots/{id}"))?,
            FILE_MAX,
        )?;
        serde_json::from_slice(&plain)
            .map_err(|e| BackupError::BadPack(format!("snapshot {id}: {e}")))
    }

    /// Writes a snapshot; its ID.
    pub(crate) fn write_snapshot(&self, snap: &Snapshot) -> Result<String, BackupError> {
        let sealed = self.keys.seal_file(
            SNAPSHOT_AAD,
            &serde_json::to_vec(snap).expect("snapshot serialises"),
        )?;
        let id = blake3::hash(&sealed).to_hex()[..16].to_string();
        self.be.write(&format!("snapshots/{id}"), &sealed)?;
        Ok(id)
    }

    /// Removes snapshot `id` (its data stays until a prune finds it unused).
    pub fn forget(&self, id: &str) -> Result<(), BackupError> {
        if !is_hex_name(id) {
            return Err(BackupError::BadPack(format!(
                "snapshot ID {id:?} is not one"
            )));
        }
        self.be.remove(&format!("snapshots/{id}"))
    }

    /// A blob's sealed bytes as stored.
    pub(crate) fn sealed_blob(&self, id: &ChunkId) -> Result<Vec<u8>, BackupError> {
        let loc = self.index.blobs.get(id).ok_or_else(|| {
            BackupError::BadPack(format!("blob {} is in no pack", hex::encode(id)))
        })?;
        let name = hex::encode(self.index.packs[loc.pack as usize]);
        self.be.read_range(
            &pack_file(&name),
            u64::from(loc.offset),
            u64::from(loc.length),
        )
    }

    /// A tree by its ID.
    pub fn tree(&self, id_hex: &str) -> Result<Tree, BackupError> {
        let id = parse_id(id_hex)?;
        let plain = self
            .keys
            .open_chunk(&id, &self.sealed_blob(&id)?, TREE_MAX)?;
        serde_json::from_slice(&plain)
            .map_err(|e| BackupError::BadPack(format!("tree {id_hex}: {e}")))
    }

    /// The key files, for `key list`.
    pub fn keys_list(&self, secret: &[u8]) -> Result<Vec<KeyInfo>, BackupError> {
        let mut out = Vec::new();
        let mut found = false;
        for (_, kf) in Repo::key_files(&*self.be)? {
            let current = !found && kf.unwrap(secret).is_ok_and(|k| k == self.keys);
            found |= current;
            out.push(KeyInfo {
                holder: kf.holder,
                created_ms: kf.created_ms,
                current,
            });
        }
        Ok(out)
    }

    /// Adds a key file for `holder` wrapping this repository's keys.
    pub fn key_add(
        &self,
        holder: &str,
        secret: &[u8],
        params: KdfParams,
        now_ms: i64,
    ) -> Result<(), BackupError> {
        check_holder(holder)?;
        let file = format!("keys/{holder}.json");
        if self.be.list("keys")?.iter().any(|(f, _)| *f == file) {
            return Err(BackupError::KeyFile(format!(
                "{holder} already holds a key: remove it first, or pick another name"
            )));
        }
        let kf = KeyFile::wrap(&self.keys, holder, secret, params, now_ms)?;
        self.be.write(
            &file,
            &serde_json::to_vec_pretty(&kf).expect("key file serialises"),
        )
    }

    /// Removes `holder`'s key file; the last one, or the one in use, is refused.
    pub fn key_remove(&self, holder: &str, secret: &[u8]) -> Result<(), BackupError> {
        check_holder(holder)?;
        let files = Repo::key_files(&*self.be)?;
        let Some((file, kf)) = files.iter().find(|(_, k)| k.holder == holder) else {
            return Err(BackupError::KeyFile(format!("no key held by {holder}")));
        };
        if files.len() == 1 {
            return Err(BackupError::KeyFile(
                "that is the last key: the repository could never be opened again".into(),
            ));
        }
        if kf.unwrap(secret).is_ok() {
            return Err(BackupError::KeyFile(format!(
                "{holder}'s key is the one in use: remove it with another key"
            )));
        }
        self.be.remove(file)
    }
}

#[cfg(test)]
mod tests;
