//! Proof that a repository restores, beyond the partner's check of pack hashes:
//!
//! - [`Repo::check_data`]: every snapshot's trees open and every chunk they name is in the
//!   index; then a share of the packs is read whole, checked against its name and trailer, and
//!   every blob in it opened with the key (authenticated, decompressed, its keyed hash equal to
//!   its ID).
//! - [`Repo::drill`]: a restore drill. A snapshot (or a sample of its files) is restored into a
//!   scratch directory, each restored file cut into chunks again and compared with the
//!   snapshot (IDs, size, mode), and the scratch directory removed: the result and its duration
//!   are the evidence an audit asks for.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Instant;

use serde::Serialize;

use super::{Kind, Repo, RestoreOptions, TREE_MAX, pack_file, parse_id};
use crate::BackupError;
use crate::chunker::Chunker;
use crate::pack;

/// What [`Repo::check_data`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DataCheck {
    pub snapshots: u64,
    pub trees: u64,
    pub chunks_named: u64,
    pub packs_read: u64,
    pub blobs_opened: u64,
    pub bytes_read: u64,
    /// What is wrong, each with where.
    pub errors: Vec<String>,
    pub duration_ms: u64,
}

/// What a restore drill found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DrillSummary {
    pub snapshot: String,
    pub sample_pct: u8,
    pub files: u64,
    pub bytes: u64,
    pub mismatches: Vec<String>,
    pub restore_ms: u64,
    pub compare_ms: u64,
}

const ERRORS_LISTED: usize = 100;

fn note(errors: &mut Vec<String>, e: String) {
    if errors.len() < ERRORS_LISTED {
        errors.push(e);
    }
}

impl Repo {
    /// Checks the snapshots' structure, then reads `read_pct` % of the packs (at least one if
    /// any and `read_pct` > 0) and opens every blob in them.
    pub fn check_data(&self, read_pct: u8) -> Result<DataCheck, BackupError> {
        let started = Instant::now();
        let mut c = DataCheck::default();
        let mut seen = std::collections::HashSet::new();
        let mut stack = Vec::new();
        for (id, s) in self.snapshots()? {
            c.snapshots += 1;
            stack.push((format!("snapshot {id}"), s.tree));
        }
        while let Some((at, t)) = stack.pop() {
            if !seen.insert(t.clone()) {
                continue;
            }
            c.trees += 1;
            let tree = match self.tree(&t) {
                Ok(tree) => tree,
                Err(e) => {
                    note(&mut c.errors, format!("{at}: tree {t}: {e}"));
                    continue;
                }
            };
            for n in tree.nodes {
                for (ch, _) in &n.chunks {
                    c.chunks_named += 1;
                    let known = parse_id(ch).is_ok_and(|id| self.index.blobs.contains_key(&id));
                    if !known {
                        note(
                            &mut c.errors,
                            format!("{at}/{}: chunk {ch} is in no pack", n.name),
                        );
                    }
                }
                if let (Kind::Dir, Some(sub)) = (n.kind, n.subtree) {
                    stack.push((format!("{at}/{}", n.name), sub));
                }
            }
        }
        // The blobs of each pack, from the index.
        let mut by_pack: std::collections::HashMap<u32, Vec<[u8; 32]>> = Default::default();
        for (id, l) in &self.index.blobs {
            by_pack.entry(l.pack).or_default().push(*id);
        }
        let mut packs: Vec<u32> = by_pack.keys().copied().collect();
        packs.sort_unstable();
        rand::seq::SliceRandom::shuffle(&mut packs[..], &mut rand::rng());
        let take = if read_pct == 0 {
            0
        } else {
            (packs.len() * usize::from(read_pct.min(100))).div_ceil(100)
        };
        for p in packs.into_iter().take(take) {
            let name = hex::encode(self.index.packs[p as usize]);
            let bytes = self.be.read(&pack_file(&name))?;
            c.packs_read += 1;
            c.bytes_read += bytes.len() as u64;
            let h = blake3::Hash::from_hex(&name).expect("names come from hashes");
            let entries = match pack::verify(&h, &bytes).and_then(|_| pack::read_trailer(&bytes)) {
                Ok(e) => e,
                Err(e) => {
                    note(&mut c.errors, format!("pack {name}: {e}"));
                    continue;
                }
            };
            for id in &by_pack[&p] {
                let opened = entries
                    .iter()
                    .find(|e| e.id == *id)
                    .ok_or_else(|| BackupError::BadPack("not in the pack's trailer".into()))
                    .and_then(|e| pack::blob(&bytes, e))
                    .and_then(|b| self.keys.open_chunk(id, b, TREE_MAX));
                match opened {
                    Ok(_) => c.blobs_opened += 1,
                    Err(e) => note(
                        &mut c.errors,
                        format!("pack {name}: blob {}: {e}", hex::encode(id)),
                    ),
                }
            }
        }
        c.duration_ms = started.elapsed().as_millis() as u64;
        Ok(c)
    }

    /// Restores `sample_pct` % of snapshot `id`'s files (100: all) under `scratch` (which
    /// must not exist; it is removed afterwards) and compares them with the snapshot.
    pub fn drill(
        &self,
        id: &str,
        scratch: &Path,
        sample_pct: u8,
    ) -> Result<DrillSummary, BackupError> {
        if scratch.exists() {
            return Err(BackupError::BadPack(format!(
                "{} exists: a drill restores into a new directory",
                scratch.display()
            )));
        }
        let (id, snap) = self.resolve(id)?;
        let opts = RestoreOptions {
            sample_pct,
            ..RestoreOptions::default()
        };
        let started = Instant::now();
        let restored = self.restore(&id, scratch, &opts);
        let restore_ms = started.elapsed().as_millis() as u64;
        let mut d = DrillSummary {
            snapshot: id,
            sample_pct: sample_pct.min(100),
            restore_ms,
            ..DrillSummary::default()
        };
        let compared = restored.and_then(|_| {
            let t = Instant::now();
            self.compare(&snap.tree, scratch, "", sample_pct >= 100, &mut d)?;
            d.compare_ms = t.elapsed().as_millis() as u64;
            Ok(())
        });
        let removed = fs::remove_dir_all(scratch);
        compared?;
        removed.map_err(|e| crate::backend::io(scratch, e))?;
        Ok(d)
    }

    fn compare(
        &self,
        tree: &str,
        dir: &Path,
        at: &str,
        all: bool,
        d: &mut DrillSummary,
    ) -> Result<(), BackupError> {
        let mut chunker = Chunker::new(&self.keys);
        for n in self.tree(tree)?.nodes {
            let p = dir.join(&n.name);
            let at = format!("{at}/{}", n.name);
            match n.kind {
                Kind::Dir => {
                    if let Some(sub) = &n.subtree {
                        self.compare(sub, &p, &at, all, d)?;
                    }
                }
                Kind::Symlink => {
                    let t = fs::read_link(&p).ok().map(|t| t.display().to_string());
                    if t != n.target {
                        note(&mut d.mismatches, format!("{at}: link target {t:?}"));
                    }
                }
                Kind::File => {
                    let Ok(f) = fs::File::open(&p) else {
                        if all {
                            note(&mut d.mismatches, format!("{at}: not restored"));
                        }
                        continue;
                    };
                    let mode = f.metadata().ok().map(|m| m.permissions().mode() & 0o7777);
                    let mut got = Vec::new();
                    let size = chunker.chunks(f, |c| {
                        got.push((hex::encode(self.keys.chunk_id(c)), c.len() as u32));
                        Ok(())
                    })?;
                    d.files += 1;
                    d.bytes += size;
                    if got != n.chunks || size != n.size {
                        note(&mut d.mismatches, format!("{at}: contents differ"));
                    } else if mode != Some(n.mode) {
                        note(&mut d.mismatches, format!("{at}: mode {mode:?}"));
                    }
                }
            }
        }
        Ok(())
    }
}
