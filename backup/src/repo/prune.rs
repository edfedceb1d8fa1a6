//! Prune: give back the space of data no snapshot needs, in two phases, safe beside a backup.
//!
//! - **Sweep** the marks of earlier prunes older than the grace period: find again which blobs
//!   the snapshots use (a backup that ran meanwhile may use a marked blob); delete each marked
//!   pack that holds no used blob found nowhere else; a pack that does is kept. Then the index
//!   is rewritten in a few files without the deleted packs.
//! - **Mark**: packs no snapshot uses are listed in `pending/<time>-<random>` (plain JSON, so
//!   the partner storing them can see what will go). Packs mostly unused are repacked first:
//!   their used blobs are copied, still sealed, into new packs (no key material is needed to
//!   move a sealed blob), and the old packs are marked too.
//!
//! A marked pack's blobs stay readable (a restore still finds them) but a backup never uses
//! them again, so after the grace period (longer than any backup runs; the controller lets one
//! job at a time touch a repository) nothing new refers to them. Memory: the IDs of the used
//! blobs (about 48 bytes each), a counter per pack, and one pack being copied, whatever the
//! size of the data.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use serde::Serialize;

use super::{Kind, Pending, Repo, base, pack_file, parse_id};
use crate::BackupError;
use crate::crypto::ChunkId;
use crate::pack::{self, PackWriter};

/// How to prune.
#[derive(Clone, Debug)]
pub struct PruneOptions {
    pub now_ms: i64,
    /// How long a marked pack waits before it is deleted.
    pub grace_ms: i64,
    /// A pack with less than this share of its bytes used is repacked.
    pub repack_below: f64,
    /// Say what would happen; change nothing.
    pub dry_run: bool,
}

impl PruneOptions {
    pub fn new(now_ms: i64) -> PruneOptions {
        PruneOptions {
            now_ms,
            grace_ms: 24 * 3600 * 1000,
            repack_below: 0.5,
            dry_run: false,
        }
    }
}

/// What a prune did.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct PruneSummary {
    pub snapshots: u64,
    pub packs: u64,
    pub used_blobs: u64,
    /// Packs marked now (unused, or repacked), and their bytes.
    pub marked_packs: u64,
    pub marked_bytes: u64,
    pub repacked_packs: u64,
    pub repacked_blobs: u64,
    /// Packs deleted now (marked at least a grace period ago), and their bytes.
    pub deleted_packs: u64,
    pub deleted_bytes: u64,
    /// Marked packs kept because a snapshot made after the mark uses them.
    pub rescued_packs: u64,
    /// Marks still waiting for their grace period.
    pub waiting_packs: u64,
    pub index_files_before: u64,
    pub index_files_after: u64,
    pub duration_ms: u64,
}

/// Index entries per rewritten index file.
const PACKS_PER_INDEX: usize = 4096;

impl Repo {
    /// Every blob the snapshots use: data chunks and trees, each tree read once.
    fn used(&self, sum: &mut PruneSummary) -> Result<HashSet<ChunkId>, BackupError> {
        let mut used = HashSet::new();
        let mut stack = Vec::new();
        for (_, s) in self.snapshots()? {
            sum.snapshots += 1;
            stack.push(s.tree);
        }
        while let Some(t) = stack.pop() {
            if !used.insert(parse_id(&t)?) {
                continue;
            }
            for n in self.tree(&t)?.nodes {
                for (c, _) in &n.chunks {
                    used.insert(parse_id(c)?);
                }
                if let (Kind::Dir, Some(sub)) = (n.kind, n.subtree) {
                    stack.push(sub);
                }
            }
        }
        sum.used_blobs = used.len() as u64;
        Ok(used)
    }

    /// Removes data no snapshot uses, as the module says.
    pub fn prune(&mut self, opts: &PruneOptions) -> Result<PruneSummary, BackupError> {
        let started = Instant::now();
        let mut sum = PruneSummary {
            index_files_before: self.index_files.len() as u64,
            ..PruneSummary::default()
        };
        let used = self.used(&mut sum)?;
        self.sweep(opts, &used, &mut sum)?;
        self.mark(opts, &used, &mut sum)?;
        sum.packs = self.index.packs.len() as u64;
        sum.index_files_after = self.index_files.len() as u64;
        sum.duration_ms = started.elapsed().as_millis() as u64;
        Ok(sum)
    }

    fn sweep(
        &mut self,
        opts: &PruneOptions,
        used: &HashSet<ChunkId>,
        sum: &mut PruneSummary,
    ) -> Result<(), BackupError> {
        let sizes: HashMap<String, u64> = self
            .be
            .list("packs")?
            .into_iter()
            .map(|(f, n)| (base(&f).to_string(), n))
            .collect();
        // Which marked packs hold a used blob that no unmarked pack has.
        let mut needed: HashSet<u32> = HashSet::new();
        for id in used {
            if let Some(l) = self
                .index
                .blobs
                .get(id)
                .filter(|l| self.doomed.contains(&l.pack))
            {
                needed.insert(l.pack);
            }
        }
        let by_name: HashMap<String, u32> = self
            .index
            .packs
            .iter()
            .enumerate()
            .map(|(i, p)| (hex::encode(p), i as u32))
            .collect();
        let mut done_marks = Vec::new();
        let mut deleted = HashSet::new();
        for (file, _) in self.be.list("pending")? {
            let p: Pending = serde_json::from_slice(&self.be.read(&file)?)
                .map_err(|e| BackupError::BadPack(format!("{file}: {e}")))?;
            if opts.now_ms - p.marked_ms < opts.grace_ms {
                sum.waiting_packs += p.packs.len() as u64;
                continue;
            }
            for name in &p.packs {
                if by_name.get(name).is_some_and(|n| needed.contains(n)) {
                    sum.rescued_packs += 1;
                    continue;
                }
                if let Some(bytes) = sizes.get(name) {
                    sum.deleted_packs += 1;
                    sum.deleted_bytes += bytes;
                    if !opts.dry_run {
                        self.be.remove(&pack_file(name))?;
                    }
                }
                deleted.insert(name.clone());
            }
            done_marks.push(file);
        }
        if opts.dry_run {
            return Ok(());
        }
        // The index again, in few files, without what is gone.
        let old_files = std::mem::take(&mut self.index_files);
        let mut groups: HashMap<u32, Vec<pack::Entry>> = HashMap::new();
        for (id, l) in &self.index.blobs {
            groups.entry(l.pack).or_default().push(pack::Entry {
                id: *id,
                offset: u64::from(l.offset),
                length: l.length,
            });
        }
        let mut packs: Vec<([u8; 32], Vec<pack::Entry>)> = groups
            .into_iter()
            .map(|(p, mut e)| {
                e.sort_by_key(|e| e.offset);
                (self.index.packs[p as usize], e)
            })
            .filter(|(name, _)| !deleted.contains(&hex::encode(name)))
            .collect();
        packs.sort_by_key(|(n, _)| *n);
        let mut new_files = Vec::new();
        for group in packs.chunks(PACKS_PER_INDEX) {
            let f = super::IndexFile {
                packs: group
                    .iter()
                    .map(|(name, entries)| super::IndexPack {
                        name: hex::encode(name),
                        blobs: entries
                            .iter()
                            .map(|e| (hex::encode(e.id), e.offset, e.length))
                            .collect(),
                    })
                    .collect(),
            };
            new_files.push(self.seal_index(&f)?);
        }
        for f in &old_files {
            if !new_files.contains(f) {
                self.be.remove(f)?;
            }
        }
        for f in done_marks {
            self.be.remove(&f)?;
        }
        self.load_index()
    }

    fn mark(
        &mut self,
        opts: &PruneOptions,
        used: &HashSet<ChunkId>,
        sum: &mut PruneSummary,
    ) -> Result<(), BackupError> {
        // Bytes used and stored per pack (doomed packs are already marked).
        let n = self.index.packs.len();
        let (mut used_bytes, mut all_bytes) = (vec![0u64; n], vec![0u64; n]);
        for (id, l) in &self.index.blobs {
            all_bytes[l.pack as usize] += u64::from(l.length);
            if used.contains(id) {
                used_bytes[l.pack as usize] += u64::from(l.length);
            }
        }
        let mut marked = Vec::new();
        let mut repack = Vec::new();
        for p in 0..n as u32 {
            if self.doomed.contains(&p) || all_bytes[p as usize] == 0 {
                continue;
            }
            let share = used_bytes[p as usize] as f64 / all_bytes[p as usize] as f64;
            if used_bytes[p as usize] == 0 {
                marked.push(p);
            } else if share < opts.repack_below {
                repack.push(p);
            }
        }
        sum.repacked_packs = repack.len() as u64;
        sum.marked_packs = (marked.len() + repack.len()) as u64;
        sum.marked_bytes = marked
            .iter()
            .chain(&repack)
            .map(|&p| all_bytes[p as usize])
            .sum();
        if opts.dry_run || sum.marked_packs == 0 {
            return Ok(());
        }
        // Copy the used blobs of sparse packs into new packs, still sealed.
        let mut blobs_of: HashMap<u32, Vec<(ChunkId, super::Loc)>> = HashMap::new();
        for (id, l) in &self.index.blobs {
            if used.contains(id) && repack.contains(&l.pack) {
                blobs_of.entry(l.pack).or_default().push((*id, *l));
            }
        }
        let mut w = PackWriter::new();
        let mut written = Vec::new();
        for p in &repack {
            let name = hex::encode(self.index.packs[*p as usize]);
            let bytes = self.be.read(&pack_file(&name))?;
            for (id, l) in blobs_of.remove(p).unwrap_or_default() {
                let e = pack::Entry {
                    id,
                    offset: u64::from(l.offset),
                    length: l.length,
                };
                w.add(id, pack::blob(&bytes, &e)?);
                sum.repacked_blobs += 1;
                if w.full() {
                    written.push(self.write_pack(std::mem::take(&mut w))?);
                }
            }
        }
        if !w.is_empty() {
            written.push(self.write_pack(w)?);
        }
        if !written.is_empty() {
            self.write_index(written)?;
        }
        let mark = Pending {
            marked_ms: opts.now_ms,
            packs: marked
                .iter()
                .chain(&repack)
                .map(|&p| hex::encode(self.index.packs[p as usize]))
                .collect(),
        };
        let mut rand = [0u8; 4];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut rand);
        self.be.write(
            &format!("pending/{}-{}", opts.now_ms.max(0), hex::encode(rand)),
            &serde_json::to_vec_pretty(&mark).expect("a mark serialises"),
        )?;
        self.load_index()
    }

    fn write_pack(&self, w: PackWriter) -> Result<([u8; 32], Vec<pack::Entry>), BackupError> {
        let (name, bytes, entries) = w.finish();
        self.be.write(&pack_file(name.to_hex().as_str()), &bytes)?;
        Ok((*name.as_bytes(), entries))
    }
}
